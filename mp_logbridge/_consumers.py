"""Consumers: where Mixpanel messages go once a front door has built them.

Every consumer has the same small contract, so every front door works with every consumer:

* ``send(kind, message)`` with ``kind`` one of ``"event"``, ``"profile_update"``,
  ``"group_update"``, ``"import"`` (the Ruby SDK's message types; the official ``mixpanel``
  package's ``"events"``/``"people"``/``"groups"``/``"imports"`` and its
  ``send(endpoint, json_message, api_key=None, api_secret=None)`` form are accepted too);
* ``flush(timeout=None) -> bool``, ``close(timeout=None)``, ``stats()``, and use as a context
  manager.

This module holds the synchronous ones — :class:`Consumer` (one request per message, errors
raised at the call, like the Ruby SDK's ``Consumer#send!``) and :class:`BufferedConsumer`
(batches per endpoint, sent on the caller's thread) — plus :class:`CallableSink`, which lets any
``callable(kind, message)`` stand in for a consumer, as a block does in the Ruby SDK. The
background consumer is :class:`mp_logbridge.BackgroundConsumer`.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

from . import _capture
from ._aio import off_loop
from ._diagnostics import DeliveryStats, report_loss, warn
from ._errors import ConfigurationError, DeliveryError, InvalidMessageError, MessagesDropped
from ._export import Batch, Exporter, HttpExporter
from ._messages import MessageSource
from ._records import (
    MAX_BATCH_RECORDS,
    MAX_REQUEST_BYTES,
    decode_record,
    encode_message,
    normalize_send_args,
    route,
    take_batch,
)
from ._retry import RetryPolicy, next_attempt
from ._transport import (
    Credentials,
    ServiceAccount,
    Transport,
    as_credentials,
    resolve_endpoints,
    safe_url,
)
from ._values import to_json_value

__all__ = [
    "BufferedConsumer",
    "CallableSink",
    "Consumer",
    "ConsumerLike",
    "ConsumerProtocol",
    "CountingConsumer",
    "DisabledConsumer",
    "ErrorCallback",
    "as_consumer",
]

#: ``on_error(exc, messages)``: told about messages that will not be delivered.
ErrorCallback = Callable[[BaseException, list[Any]], object]
_C = TypeVar("_C", bound="_ConsumerBase")


@runtime_checkable
class ConsumerProtocol(Protocol):
    """What front doors need from a consumer: every consumer here, and any object of yours with
    these methods (``stats`` may return an empty mapping)."""

    def send(self, kind: str, message: Any) -> Any:
        """Accept one message of ``kind`` for delivery (``False``: it was refused)."""

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver what is pending; ``True`` when all of it was delivered."""

    def close(self, timeout: float | None = None) -> None:
        """Flush and release resources."""

    def stats(self) -> Mapping[str, Any]:
        """Delivery counters: ``sent``, ``dropped`` by reason, ..."""


#: What a front door's ``consumer=`` takes: a consumer, or ``callable(kind, record)`` (the Ruby
#: SDK's block form).
ConsumerLike = ConsumerProtocol | Callable[[str, dict[str, Any]], object]


def positive_int(value: Any, name: str, maximum: int | None = None) -> int:
    """``value`` when it is a positive integer (at most ``maximum``), else a clear error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigurationError(f"{name} must be at most {maximum}, got {value}")
    return value


def positive_number(value: Any, name: str) -> float:
    """``value`` as a float when it is a positive finite number, else a clear error."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value < float("inf")
    ):
        raise ConfigurationError(f"{name} must be a positive number, got {value!r}")
    return float(value)


_api_key_warned = False


def _warn_api_key_once() -> None:
    global _api_key_warned
    if not _api_key_warned:
        _api_key_warned = True
        warn(
            "mp_logbridge ignores the legacy api_key argument: /import authenticates with the "
            "consumer's credentials (ServiceAccount or api_secret) or a per-call api_secret"
        )


_consumers: weakref.WeakSet[_ConsumerBase] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for consumer in list(_consumers):
        consumer._reinit_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _ConsumerBase:
    """Endpoint resolution, transport, counters and error reporting shared by all consumers."""

    def __init__(
        self,
        events_url: str | None = None,
        people_url: str | None = None,
        groups_url: str | None = None,
        import_url: str | None = None,
        *,
        region: str | None = None,
        api_host: str | None = None,
        credentials: Credentials | None = None,
        api_secret: str | None = None,
        request_timeout: float = 10.0,
        verify: bool | str = True,
        retry: RetryPolicy | Mapping[str, Any] | None = None,
        on_error: ErrorCallback | None = None,
        report_interval: float = 10.0,
        transport: Transport | None = None,
        debug: bool = False,
    ) -> None:
        if transport is not None:
            given = {"events_url": events_url, "people_url": people_url, "groups_url": groups_url}
            given.update(import_url=import_url, region=region, api_host=api_host)
            extra = sorted(name for name, value in given.items() if value is not None)
            if extra:
                raise ConfigurationError(
                    f"{', '.join(extra)} configure the transport made for you; with transport= "
                    "given, configure that transport instead"
                )
            self.endpoints = transport.endpoints
            self.credentials = as_credentials(credentials, api_secret) or transport.credentials
            self.transport = transport
        else:
            self.endpoints = resolve_endpoints(
                region=region,
                api_host=api_host,
                events_url=events_url,
                people_url=people_url,
                groups_url=groups_url,
                import_url=import_url,
            )
            self.credentials = as_credentials(credentials, api_secret)
            self.transport = Transport(
                self.endpoints,
                credentials=self.credentials,
                timeout=request_timeout,
                verify=verify,
            )
        self.exporter: Exporter = HttpExporter(self.transport)
        self.debug = bool(debug)
        if self.debug:
            self.exporter = self._debug_exporter(self.exporter)
        self.retry = RetryPolicy.from_options(retry)
        if on_error is not None and not callable(on_error):
            raise ConfigurationError("on_error must be callable as on_error(exc, messages)")
        self.on_error = on_error
        self._stats = DeliveryStats(report_interval)
        self._pid = os.getpid()
        _consumers.add(self)

    def _reinit_after_fork(self) -> None:
        """In a forked child: the parent's connections (and locks) are not this process's."""
        self._pid = os.getpid()
        self.transport.reinit_after_fork()

    def _check_pid(self) -> None:
        """A child forked without Python's fork hooks (uWSGI's default) notices here."""
        if self._pid != os.getpid():
            self._reinit_after_fork()

    def _debug_exporter(self, exporter: Exporter) -> Exporter:
        """``exporter``, logging one line per request (``debug=True``)."""
        from ._debug import DebugExporter, show_debug_output

        show_debug_output()
        endpoints = self.endpoints
        return DebugExporter(exporter, lambda kind: safe_url(endpoints.url(kind)))

    async def aflush(self, timeout: float | None = None) -> bool:
        """:meth:`flush` for asyncio code: runs in a thread, so the event loop keeps running."""
        return await off_loop(self.flush, timeout)

    async def aclose(self, timeout: float | None = None) -> None:
        """:meth:`close` for asyncio code: runs in a thread, so the event loop keeps running."""
        await off_loop(self.close, timeout)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(track={safe_url(self.endpoints.event)!r}, credentials={self.credentials!r})"

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def flush(self, timeout: float | None = None) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self, timeout: float | None = None) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _message_credentials(self, api_key: Any, api_secret: Any) -> Credentials | None:
        """Per-call import credentials of the ``mixpanel`` package's ``send``.

        As in that package, the consumer's own service account takes precedence over a per-call
        ``api_secret`` (and so does a consumer's ``api_secret``); the legacy ``api_key`` is
        ignored, with one warning.
        """
        if isinstance(api_key, tuple):
            api_key, api_secret = (*api_key, None, None)[:2]
        if api_key:
            _warn_api_key_once()
        if not api_secret or isinstance(self.credentials, (ServiceAccount,)):
            return None
        if self.credentials is not None:
            return None
        return as_credentials(None, api_secret)

    def _drop(
        self,
        reason: str,
        error: BaseException,
        messages: list[Any] | Callable[[], list[Any]],
        count: int | None = None,
    ) -> None:
        """Count lost messages and tell ``on_error`` (never raises).

        ``messages`` may be a callable producing the list, so that records are only rebuilt for
        the report when somebody listens.
        """
        if count is None:
            assert isinstance(messages, list)
            count = len(messages)
        report_loss(self._stats, self.on_error, reason, error, messages, count)

    def _encode(self, message: Any) -> bytes:
        """Encode at the call; a message that cannot be sent is counted, then raised."""
        try:
            return encode_message(message)
        except InvalidMessageError as exc:
            self._stats.add_dropped(exc.drop_reason, 1, str(exc))
            raise

    def _stats_snapshot(self, depth: int = 0, size: int = 0) -> dict[str, Any]:
        snapshot = self._stats.snapshot()
        snapshot["queue_depth"] = depth
        snapshot["queue_bytes"] = size
        return snapshot

    def _deliver(
        self, kind: str, batch: list[bytes], credentials: Credentials | None
    ) -> tuple[list[bytes], DeliveryError | None]:
        """Send ``batch`` now on this thread, retrying (and sleeping) as the policy says.

        Records refused for good are counted (and reported to ``on_error``) here.

        Returns:
            the records still undelivered when retries ran out (the caller keeps or drops them),
            and the first error that cost records (``None`` when everything was delivered, even
            after a retry or a 413 split).
        """
        work: deque[list[bytes]] = deque([batch])
        left: list[bytes] = []
        first_error: DeliveryError | None = None
        exporter = self.exporter
        while work:
            current = work.popleft()
            attempts = 0
            started = time.monotonic()
            while current:
                outcome = exporter.export(
                    Batch(kind, current, credentials), time.monotonic() + exporter.timeout
                )
                attempts += 1
                if outcome.delivered:
                    self._stats.add_sent(len(outcome.delivered))
                for reason, items, error in outcome.dropped:
                    self._drop(reason, error, _records_of(items), len(items))
                    first_error = first_error or error
                if outcome.split:
                    work.extendleft(reversed(outcome.split))
                    break
                if not outcome.retry:
                    break
                assert outcome.error is not None
                now = time.monotonic()
                decision = next_attempt(self.retry, outcome.error, attempts, started, now)
                if decision.retry_at is None:
                    first_error = first_error or outcome.error
                    left.extend(outcome.retry)
                    for rest in work:
                        left.extend(rest)
                    work.clear()
                    break
                self._stats.add_retry()
                time.sleep(max(0.0, decision.retry_at - now))
                current = outcome.retry
        self._stats.report()
        return left, first_error


def _records_of(items: list[bytes]) -> Callable[[], list[Any]]:
    """Lazily decode encoded records for an ``on_error`` report."""
    return lambda: [decode_record(item) for item in items]


class Consumer(_ConsumerBase):
    """Sends every message at once, on the caller's thread (the Ruby SDK's ``Consumer``).

    Positional arguments are the events, people, groups and import URLs, in the Ruby SDK's order,
    so its EU example works as written::

        eu = Consumer(
            "https://api-eu.mixpanel.com/track",
            "https://api-eu.mixpanel.com/engage",
            "https://api-eu.mixpanel.com/groups",
        )

    More often you give ``region="eu"`` (or ``"in"``) or ``api_host=``. ``send`` raises a
    :class:`~mp_logbridge.DeliveryError` when a message cannot be delivered (a
    :class:`~mp_logbridge.Tracker` catches it, passes it to its ``error_handler`` and returns
    ``False``), and :class:`~mp_logbridge.InvalidMessageError` for a message that cannot be sent.
    By default there is no retry (``retry={"max_attempts": 3}`` adds some, sleeping on the caller's
    thread); use :class:`~mp_logbridge.BackgroundConsumer` to keep the network off the caller's thread.

    The keyword options are every consumer's (``region``, ``api_host``, ``credentials``,
    ``request_timeout``, ``retry``, ``on_error``, ...: see
    :class:`~mp_logbridge.BackgroundConsumer`).
    """

    def __init__(
        self,
        events_url: str | None = None,
        people_url: str | None = None,
        groups_url: str | None = None,
        import_url: str | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("retry", {"max_attempts": 1})
        super().__init__(events_url, people_url, groups_url, import_url, **options)

    def send(self, kind: str, message: Any, api_key: Any = None, api_secret: Any = None) -> bool:
        """Deliver one message now.

        Returns:
            ``True`` once the server accepted it.

        Raises:
            InvalidMessageError: the message cannot be sent as given.
            DeliveryError: the server refused it or could not be reached.
        """
        self._check_pid()
        kind, message = normalize_send_args(kind, message)
        if _capture.active:  # mp_logbridge.testing.capture_messages()
            return _capture.take(kind, message)
        credentials = self._message_credentials(api_key, api_secret)
        payload = self._encode(message)
        kind = route(kind, payload)  # a $merge goes to /import on its own
        left, error = self._deliver(kind, [payload], credentials)
        if left:
            self._drop(
                "retries_exhausted",
                error or DeliveryError("not delivered"),
                _records_of(left),
                len(left),
            )
        if error is not None:
            raise error
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Nothing is ever pending in this consumer: returns ``True``."""
        return True

    def close(self, timeout: float | None = None) -> None:
        """Release pooled connections."""
        self.transport.close()

    def stats(self) -> dict[str, Any]:
        """Delivery counters: ``sent``, ``batches``, ``retries``, ``dropped`` by reason."""
        return self._stats_snapshot()


class BufferedConsumer(_ConsumerBase):
    """Batches messages per endpoint and sends a batch, on the caller's thread, when it is full.

    All four endpoints are buffered (imports and group updates too), by count (``max_size``,
    default 50, at most 2000) and by bytes (``max_batch_bytes``). Thread-safe. ``flush()`` sends
    everything buffered and raises the first :class:`~mp_logbridge.DeliveryError` met; a batch
    that was delivered is never sent again, and records that could not be delivered (network
    errors, 5xx, 429) stay buffered for the next flush. Records the server refused for good are
    dropped and counted. At most ``max_buffer`` records are kept; beyond that the oldest are
    dropped (counted as ``queue_full``).

    The other keyword options are every consumer's (``region``, ``api_host``, ``credentials``,
    ``request_timeout``, ``retry``, ``on_error``, ...: see
    :class:`~mp_logbridge.BackgroundConsumer`); by default there is no retry.
    """

    def __init__(
        self,
        events_url: str | None = None,
        people_url: str | None = None,
        groups_url: str | None = None,
        import_url: str | None = None,
        *,
        max_size: int = 50,
        max_batch_bytes: int = MAX_REQUEST_BYTES,
        max_buffer: int = 10_000,
        **options: Any,
    ) -> None:
        options.setdefault("retry", {"max_attempts": 1})
        super().__init__(events_url, people_url, groups_url, import_url, **options)
        self.max_size = positive_int(max_size, "max_size", MAX_BATCH_RECORDS)
        self.max_batch_bytes = positive_int(max_batch_bytes, "max_batch_bytes")
        self.max_buffer = positive_int(max_buffer, "max_buffer")
        self._lock = threading.RLock()
        self._buffers: dict[tuple[str, Credentials | None], deque[bytes]] = {}

    def _reinit_after_fork(self) -> None:
        # A thread of the parent may have held the lock (flushing); what is buffered is the
        # parent's, which sends it.
        super()._reinit_after_fork()
        self._lock = threading.RLock()
        self._buffers = {}

    def send(self, kind: str, message: Any, api_key: Any = None, api_secret: Any = None) -> bool:
        """Buffer one message; sends its endpoint's batch when ``max_size`` is reached.

        Raises:
            InvalidMessageError: the message cannot be sent as given (it is not buffered).
            DeliveryError: a batch sent because the buffer was full could not be delivered.
        """
        self._check_pid()
        kind, message = normalize_send_args(kind, message)
        if _capture.active:  # mp_logbridge.testing.capture_messages()
            return _capture.take(kind, message)
        credentials = self._message_credentials(api_key, api_secret)
        payload = self._encode(message)
        kind = route(kind, payload)  # a $merge goes to /import on its own
        with self._lock:
            buffer = self._buffers.setdefault((kind, credentials), deque())
            buffer.append(payload)
            overflow = sum(len(b) for b in self._buffers.values()) - self.max_buffer
            if overflow > 0:
                evicted = [buffer.popleft() for _ in range(min(overflow, len(buffer)))]
                full = MessagesDropped("queue_full", "buffer full; oldest messages dropped")
                self._drop("queue_full", full, _records_of(evicted), len(evicted))
            if len(buffer) >= self.max_size:
                self._flush_buffer(kind, credentials)
        return True

    def _flush_buffer(self, kind: str, credentials: Credentials | None) -> None:
        """Send one endpoint's buffer; stop at the first batch that could not be delivered."""
        buffer = self._buffers.get((kind, credentials))
        first: DeliveryError | None = None
        while buffer:
            batch = take_batch(buffer, self.max_size, self.max_batch_bytes)
            left, error = self._deliver(kind, batch, credentials)
            first = first or error
            if left:
                buffer.extendleft(reversed(left))
                break
        if first is not None:
            raise first

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything buffered, endpoint by endpoint.

        Returns:
            ``True`` when everything was delivered.

        Raises:
            DeliveryError: the first error met (undelivered records stay buffered).
        """
        self._check_pid()
        first: DeliveryError | None = None
        with self._lock:
            for kind, credentials in list(self._buffers):
                try:
                    self._flush_buffer(kind, credentials)
                except DeliveryError as exc:
                    first = first or exc
        if first is not None:
            raise first
        return True

    def close(self, timeout: float | None = None) -> None:
        """Flush, then release pooled connections (raises like :meth:`flush`)."""
        try:
            self.flush(timeout)
        finally:
            self.transport.close()

    def stats(self) -> dict[str, Any]:
        """Delivery counters plus what is buffered (``queue_depth``, ``queue_bytes``)."""
        with self._lock:
            depth = sum(len(b) for b in self._buffers.values())
            size = sum(len(p) for b in self._buffers.values() for p in b)
        return self._stats_snapshot(depth, size)


class CallableSink:
    """Lets ``callable(kind, message)`` stand in for a consumer (the Ruby SDK's block form).

    The callable receives each message as a finished, JSON-ready record dict; what it does with
    it is up to it (forward it to another consumer, put it on a queue, write it to a file).
    Exceptions it raises are counted (a :class:`~mp_logbridge.DeliveryError` under its drop
    reason, anything else as ``consumer_error``) and propagate to the caller of ``send`` (a
    :class:`~mp_logbridge.Tracker` turns a ``DeliveryError`` into ``False`` plus an
    ``error_handler`` call).
    """

    __slots__ = ("_stats", "sink")

    def __init__(self, sink: Callable[[str, dict[str, Any]], object]) -> None:
        if not callable(sink):
            raise ConfigurationError("a sink must be callable as sink(kind, message)")
        self.sink = sink
        self._stats = DeliveryStats()

    def send(
        self,
        kind: str,
        message: dict[str, Any] | MessageSource | str,
        api_key: Any = None,
        api_secret: Any = None,
    ) -> bool:
        """Build the record and hand it to the callable (``/import`` credentials given per call,
        in the ``mixpanel`` package's form, are not the sink's business and are ignored)."""
        kind, source = normalize_send_args(kind, message)
        if _capture.active:  # mp_logbridge.testing.capture_messages()
            return _capture.take(kind, source)
        try:
            if isinstance(source, bytes):
                record = decode_record(source)
            else:
                record = source if isinstance(source, dict) else source.build()
            value = to_json_value(record, "message")
        except InvalidMessageError as exc:
            self._stats.add_dropped(exc.drop_reason, 1, str(exc))
            raise
        try:
            self.sink(kind, value)
        except DeliveryError as exc:
            reason = "retries_exhausted" if exc.retryable else exc.drop_reason
            self._stats.add_dropped(reason, 1, f"{type(exc).__name__}: {exc}")
            raise
        except Exception as exc:
            self._stats.add_dropped("consumer_error", 1, f"{type(exc).__name__}: {exc}")
            raise
        self._stats.add_sent(1)
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Nothing is pending here; flushes the wrapped object when it can flush."""
        flush = getattr(self.sink, "flush", None)
        return bool(flush(timeout)) if callable(flush) else True

    def close(self, timeout: float | None = None) -> None:
        """Nothing to release (the callable's owner closes it)."""

    async def aflush(self, timeout: float | None = None) -> bool:
        """:meth:`flush`, in a thread (the event loop keeps running)."""
        return await off_loop(self.flush, timeout)

    async def aclose(self, timeout: float | None = None) -> None:
        """Nothing to release."""

    def stats(self) -> dict[str, Any]:
        """Counters: records handed to the callable (``sent``) and ``dropped`` by reason."""
        return self._stats.snapshot()

    def __enter__(self) -> CallableSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CallableSink({self.sink!r})"


class DisabledConsumer:
    """Accepts every message and sends nothing: no thread, no socket (``disabled=True`` or
    ``MIXPANEL_DISABLED=1`` on a front door or Tracker, for tests and local development).

    Inside :func:`mp_logbridge.testing.capture_messages` the messages are captured as usual, so
    a test suite that disables delivery everywhere can still look at what would have been sent.
    ``stats()`` says ``disabled`` and counts what was ``accepted``.
    """

    __slots__ = ("accepted",)

    def __init__(self) -> None:
        self.accepted = 0

    def send(self, kind: str, message: Any, api_key: Any = None, api_secret: Any = None) -> bool:
        """Accept ``message`` (captured inside ``capture_messages()``, else forgotten)."""
        if _capture.active:
            kind, message = normalize_send_args(kind, message)
            return _capture.take(kind, message)
        self.accepted += 1
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Nothing is ever pending: ``True``."""
        return True

    def close(self, timeout: float | None = None) -> None:
        """Nothing to release."""

    async def aflush(self, timeout: float | None = None) -> bool:
        """Nothing is ever pending: ``True``."""
        return True

    async def aclose(self, timeout: float | None = None) -> None:
        """Nothing to release."""

    def stats(self) -> dict[str, Any]:
        """Zero deliveries; ``accepted`` messages, ``disabled`` set."""
        return {
            "sent": 0,
            "batches": 0,
            "retries": 0,
            "dropped": {},
            "dropped_total": 0,
            "queue_depth": 0,
            "queue_bytes": 0,
            "accepted": self.accepted,
            "disabled": True,
        }

    def __enter__(self) -> DisabledConsumer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return "DisabledConsumer()"


class CountingConsumer:
    """An object of the application's with ``send(kind, message)`` seen through the whole
    :class:`ConsumerProtocol`: what it accepted and what it raised are counted here (``stats()``),
    and ``flush``/``close`` reach it when it has them."""

    __slots__ = ("_stats", "target")

    def __init__(self, target: Any) -> None:
        self.target = target
        self._stats = DeliveryStats()

    def send(self, kind: str, message: Any) -> Any:
        """Hand the message on; a refusal (an exception, or ``False``) is counted, and raised."""
        try:
            result = self.target.send(kind, message)
        except InvalidMessageError as exc:
            self._stats.add_dropped(exc.drop_reason, 1, f"{type(exc).__name__}: {exc}")
            raise
        except DeliveryError as exc:
            reason = "retries_exhausted" if exc.retryable else exc.drop_reason
            self._stats.add_dropped(reason, 1, f"{type(exc).__name__}: {exc}")
            raise
        except Exception as exc:
            self._stats.add_dropped("consumer_error", 1, f"{type(exc).__name__}: {exc}")
            raise
        if result is False:
            self._stats.add_dropped("consumer_error", 1, f"{self.target!r} refused a message")
        else:
            self._stats.add_sent(1)
        return result

    def flush(self, timeout: float | None = None) -> bool:
        """The wrapped object's ``flush`` when it has one (``True`` otherwise)."""
        flush = getattr(self.target, "flush", None)
        return bool(flush(timeout)) if callable(flush) else True

    def close(self, timeout: float | None = None) -> None:
        """The wrapped object's ``close`` when it has one."""
        close = getattr(self.target, "close", None)
        if callable(close):
            close(timeout)

    def stats(self) -> dict[str, Any]:
        """Counters: ``sent`` (accepted by the wrapped object) and ``dropped`` by reason, plus
        the wrapped object's own counters when it keeps some."""
        counted = self._stats.snapshot()
        own = getattr(self.target, "stats", None)
        if callable(own):
            try:
                counted.update(dict(own()))
            except Exception as exc:  # an application's object must not break stats()
                warn("mp_logbridge could not read %r stats: %s", self.target, exc)
        return counted

    def __repr__(self) -> str:
        return f"CountingConsumer({self.target!r})"


def as_consumer(consumer: Any) -> ConsumerProtocol:
    """``consumer`` as a full :class:`ConsumerProtocol`: this library's consumers as they are, a
    callable wrapped in :class:`CallableSink`, and any other object with ``send`` in
    :class:`CountingConsumer` (so every consumer reports ``stats()``)."""
    if isinstance(consumer, (_ConsumerBase, CallableSink, CountingConsumer)):
        return cast(ConsumerProtocol, consumer)
    if callable(getattr(consumer, "send", None)):
        if all(callable(getattr(consumer, name, None)) for name in ("flush", "close", "stats")):
            return cast(ConsumerProtocol, consumer)
        return CountingConsumer(consumer)
    if callable(consumer):
        return CallableSink(consumer)
    raise ConfigurationError(
        f"consumer must have a send(kind, message) method or be a callable, got {type(consumer).__name__}"
    )

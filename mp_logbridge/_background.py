"""The background consumer: ``send`` queues, a worker delivers — batched, retried, bounded.

:class:`BackgroundConsumer` is the consumer API (``send``/``flush``/``close``/``stats``, the
official ``mixpanel`` package's ``send`` form included) over a
:class:`~mp_logbridge._worker.BatchWorker` posting through an
:class:`~mp_logbridge._export.HttpExporter`. It is threads, not asyncio: ``send`` never waits on
the network, so it is safe from any thread, a signal handler or a finalizer.
"""

from __future__ import annotations

import os
import random
import weakref
from collections.abc import Mapping
from typing import Any

from ._consumers import ErrorCallback, _ConsumerBase, positive_int, positive_number
from ._errors import ConfigurationError
from ._export import Exporter
from ._messages import KINDS
from ._records import (
    MAX_BATCH_RECORDS,
    MAX_REQUEST_BYTES,
    EncodedRecord,
    JsonText,
    normalize_send_args,
    route,
)
from ._retry import RetryPolicy
from ._worker import BatchWorker

__all__ = ["DEFAULT_WEIGHT", "OVERFLOW_POLICIES", "BackgroundConsumer"]

_KIND_SET = frozenset(KINDS)
#: What the consumer's ``overflow`` option accepts.
OVERFLOW_POLICIES = ("drop_newest", "drop_oldest")
#: Bytes a deferred message that does not say its ``weight`` counts for until it is encoded.
DEFAULT_WEIGHT = 1024


class _Setting:
    """A setting kept by the worker, read through the consumer."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return getattr(instance._worker, self.name)


class BackgroundConsumer(_ConsumerBase):
    """Delivers messages from background threads; ``send`` never blocks on the network.

    Positional arguments are the events, people, groups and import URLs (as for
    :class:`~mp_logbridge.Consumer`); usually ``region=`` or ``api_host=`` is enough.

    Batching: each endpoint has its own lane, sent when it holds ``batch_size`` records (at most
    2000), ``max_batch_bytes`` of encoded records (a request stays under it), or when its oldest
    record has waited ``flush_interval`` seconds. Each lane's requests run on its own threads,
    so a slow endpoint never delays the others. At most ``max_in_flight`` requests (default 2,
    at most 16) are under way on ``/track`` and ``/import``, so high latency does not cap
    throughput (Mixpanel's guidance is 10-20 concurrent clients sending batches of up to 2000);
    profile and group updates go one request at a time, since their order matters. gzip is used
    on ``/track`` and ``/import``.

    Deadlines: ``request_timeout`` (default 10 s) bounds each request as a whole — connecting,
    sending and reading the answer — even against a server that drips bytes; answers over 64 KB
    are not read.

    Retries: network errors, 408, 429 and 5xx are retried per ``retry`` (a
    :class:`~mp_logbridge.consumers.RetryPolicy` or a mapping of its fields: 2 s doubling to 60 s plus 1-5 s
    of jitter, ``Retry-After`` as a lower bound, at most 10 attempts and 600 s per batch by
    default); other 4xx and TLS failures are not; a 413 splits the batch; a strict ``/import``
    400 drops exactly the records the server listed. A flush or close cuts a backoff short. The
    first failure of an outage is reported at once on the ``mp_logbridge`` logger, and the
    recovery too.

    Bounds: at most ``max_queue_size`` messages wait, and they take at most ``max_queue_bytes``
    — counted in encoded bytes, batches in flight included; a message not encoded yet counts for
    the size its front door measured at the call. When full, ``overflow`` decides:
    ``"drop_newest"`` (default: the new message is refused) or ``"drop_oldest"``. Every loss is
    counted under a reason in :meth:`stats`, reported to ``on_error(exc, messages)`` and summed
    into one rate-limited warning on the ``mp_logbridge`` logger.

    ``send`` returning ``True`` means "accepted for delivery"; failures found later reach
    ``on_error``. A record dict is encoded at the call, so what is sent is what the values were
    then, and a record that cannot be sent raises :class:`~mp_logbridge.InvalidMessageError`
    at once. :meth:`flush` and :meth:`close` are bounded (``flush_timeout``). Every exit that
    still runs Python code delivers within ``exit_timeout``: interpreter exit, ``multiprocessing``
    children, and SIGTERM with :func:`~mp_logbridge.deliver_on_signal`. A forked child starts
    with an empty queue of its own and never sends its parent's messages. A consumer nobody
    references any more delivers what it holds and stops its threads.

    ``exporter=`` replaces the HTTP exporter (the seam the durable spool and broker streams use);
    ``transport=`` replaces the HTTP transport under it.

    Durable spool (off by default): ``spool="path/to/dir"`` (or ``MIXPANEL_SPOOL``) commits
    captured records to a SQLite file in that directory at most every 50 ms, sends them from
    there and deletes them once Mixpanel acknowledged them, so a crash, ``kill -9``, a
    terminated pool worker, ``os._exit`` or an outage longer than memory loses at most the last
    commit window; ``durability="call"`` commits each record before ``send`` returns.
    ``max_spool_bytes`` (default 256 MiB) bounds the file (the oldest records are dropped as
    ``spool_full``). With a spool, :meth:`flush` waits for Mixpanel's acknowledgement, and
    :meth:`close` leaves what it could not deliver on disk for the next process. See
    :mod:`mp_logbridge.spool`.

    Usable as the ``consumer=`` of the official ``mixpanel`` package, too:
    ``Mixpanel(token, consumer=BackgroundConsumer())``.

    Args:
        **options: the options every consumer takes (:class:`~mp_logbridge.Consumer` and
            :class:`~mp_logbridge.BufferedConsumer` too): ``region`` (``"us"``, ``"eu"`` or
            ``"in"``; default ``MIXPANEL_REGION``, then the US) or ``api_host`` (a host or base
            URL; default ``MIXPANEL_API_HOST``, which wins over the region); ``credentials``
            (a :class:`~mp_logbridge.ServiceAccount` or :class:`~mp_logbridge.ProjectSecret`,
            for ``/import`` only) or ``api_secret``; ``request_timeout`` (seconds for a whole
            request, default 10); ``verify`` (TLS verification, or a CA bundle path; default
            on); ``report_interval`` (seconds between loss warnings, default 10);
            ``transport`` (a :class:`~mp_logbridge.transport.Transport` to use instead of the
            one made from the options above).
    """

    def __init__(
        self,
        events_url: str | None = None,
        people_url: str | None = None,
        groups_url: str | None = None,
        import_url: str | None = None,
        *,
        batch_size: int = MAX_BATCH_RECORDS,
        max_batch_bytes: int = MAX_REQUEST_BYTES,
        flush_interval: float = 1.0,
        max_queue_size: int = 10_000,
        max_queue_bytes: int = 64 * 1024 * 1024,
        overflow: str = "drop_newest",
        flush_timeout: float = 5.0,
        exit_timeout: float = 5.0,
        max_in_flight: int = 2,
        on_error: ErrorCallback | None = None,
        retry: RetryPolicy | Mapping[str, Any] | None = None,
        exporter: Exporter | None = None,
        rng: random.Random | None = None,
        clock: Any = None,
        spool: str | os.PathLike[str] | bool | None = None,
        durability: str = "batch",
        max_spool_bytes: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            events_url,
            people_url,
            groups_url,
            import_url,
            on_error=on_error,
            retry=retry,
            **options,
        )
        if overflow not in OVERFLOW_POLICIES:
            raise ConfigurationError(
                f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {overflow!r}"
            )
        if exporter is not None:
            self.exporter = self._debug_exporter(exporter) if self.debug else exporter
        batch_size = positive_int(batch_size, "batch_size", MAX_BATCH_RECORDS)
        max_batch_bytes = positive_int(max_batch_bytes, "max_batch_bytes")
        flush_interval = positive_number(flush_interval, "flush_interval")
        # The durable spool (opt-in, mp_logbridge/_spool.py) plugs in at the exporter seam: the
        # worker commits its batches to disk (its flush interval becomes the commit window) and
        # the spool's drainer sends them through ``self.exporter``.
        self._spool: Any = None
        worker_exporter, worker_interval = self.exporter, flush_interval
        if (
            spool is not None
            or os.environ.get("MIXPANEL_SPOOL")
            or durability != "batch"
            or max_spool_bytes is not None
        ):  # (checked even without a spool, so a configuration error shows everywhere)
            worker_exporter, worker_interval = self._open_spool(
                spool,
                durability,
                max_spool_bytes,
                batch_size,
                max_batch_bytes,
                flush_interval,
                flush_timeout,
                exit_timeout,
            )
        self._worker = BatchWorker(
            worker_exporter,
            batch_size=batch_size,
            max_batch_bytes=max_batch_bytes,
            flush_interval=worker_interval,
            max_queue_size=positive_int(max_queue_size, "max_queue_size"),
            max_queue_bytes=positive_int(max_queue_bytes, "max_queue_bytes"),
            overflow=overflow,
            flush_timeout=positive_number(flush_timeout, "flush_timeout"),
            exit_timeout=positive_number(exit_timeout, "exit_timeout"),
            # Writes to the spool stay in the order of the calls (one at a time per endpoint).
            max_in_flight=1
            if self._spool is not None
            else positive_int(max_in_flight, "max_in_flight", 16),
            retry=self.retry,
            on_error=self.on_error,
            stats=self._stats,
            clock=clock,
            rng=rng,
        )
        # Nobody refers to the consumer any more: deliver what it holds, then stop the threads
        # (they refer to the worker only, so the consumer itself can be collected).
        self._finalizer = weakref.finalize(self, _release, self._worker)
        self._finalizer.atexit = False
        if self._spool is not None:
            self._spool.attach(self._worker, self)

    def _open_spool(
        self,
        spool: Any,
        durability: Any,
        max_spool_bytes: Any,
        batch_size: int,
        max_batch_bytes: int,
        flush_interval: float,
        flush_timeout: float,
        exit_timeout: float,
    ) -> tuple[Exporter, float]:
        """Make the spool when one is asked for; returns the worker's exporter and interval."""
        from ._spool import COMMIT_INTERVAL, DEFAULT_MAX_SPOOL_BYTES, Spool, resolve_spool_options

        bound = DEFAULT_MAX_SPOOL_BYTES if max_spool_bytes is None else max_spool_bytes
        directory, mode, bound = resolve_spool_options(spool, durability, bound)
        if directory is None:
            return self.exporter, flush_interval
        self._spool = Spool(
            directory,
            durability=mode,
            max_spool_bytes=bound,
            endpoints=self.endpoints,
            credentials=self.credentials,
            exporter=self.exporter,
            timeout=self.transport.timeout,
            verify=self.transport.verify,
            retry=self.retry,
            batch_size=batch_size,
            max_batch_bytes=max_batch_bytes,
            flush_interval=flush_interval,
            flush_timeout=positive_number(flush_timeout, "flush_timeout"),
            exit_timeout=positive_number(exit_timeout, "exit_timeout"),
            stats=self._stats,
            on_error=self.on_error,
        )
        return self._spool.writer, min(flush_interval, COMMIT_INTERVAL)

    batch_size = _Setting()
    max_batch_bytes = _Setting()
    flush_interval = _Setting()
    max_queue_size = _Setting()
    max_in_flight = _Setting()
    max_queue_bytes = _Setting()
    flush_timeout = _Setting()
    exit_timeout = _Setting()

    @property
    def overflow(self) -> str:
        """``"drop_newest"`` or ``"drop_oldest"``."""
        return "drop_oldest" if self._worker.drop_oldest else "drop_newest"

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (the consumer accepts no more messages)."""
        return self._worker.closed

    def send(self, kind: str, message: Any, api_key: Any = None, api_secret: Any = None) -> bool:
        """Queue one message for delivery; never blocks on the network.

        ``message`` is a record dict (encoded now), JSON text (the official package's form,
        decoded on the worker) or a deferred message with ``build()`` (built on the worker;
        its ``weight`` attribute, when present, is its size in bytes until then).

        Returns:
            ``True`` when the message was accepted, ``False`` when it was dropped (queue full,
            consumer closed) — the drop is counted and reported to ``on_error``.

        Raises:
            InvalidMessageError: for an unknown ``kind``, a message of an unusable type, or a
                record dict that cannot be sent (too large, NaN, values of other types, ...).
        """
        if api_key is None and api_secret is None and kind in _KIND_SET:
            if type(message) is EncodedRecord:  # a Tracker's: encoded and checked already
                return self._worker.put(route(kind, message), message, None, len(message))
            if type(message) is dict:
                payload = self._encode(message)
                return self._worker.put(route(kind, message), payload, None, len(payload))
            weight = getattr(message, "weight", None)
            if weight is not None:
                return self._worker.put(kind, message, None, weight)
        return self._send_checked(kind, message, api_key, api_secret)

    def _send_checked(self, kind: Any, message: Any, api_key: Any, api_secret: Any) -> bool:
        """``send`` off the common path: other forms of arguments and messages."""
        if type(message) is EncodedRecord:
            name = route(normalize_send_args(kind, message)[0], message)
            credentials = self._message_credentials(api_key, api_secret)
            return self._worker.put(name, message, credentials, len(message))
        if isinstance(message, (str, bytes)) and normalize_send_args(kind, {})[0] != "import":
            message = JsonText(message)  # the mixpanel package's form: decoded later
            name, _ = normalize_send_args(kind, {})
        else:  # imports are decoded now: a $merge goes its own way
            name, message = normalize_send_args(kind, message)
            name = route(name, message)
        credentials = self._message_credentials(api_key, api_secret)
        if type(message) is dict:
            payload = self._encode(message)
            return self._worker.put(name, payload, credentials, len(payload))
        weight = getattr(message, "weight", None)
        size = weight if isinstance(weight, int) and weight > 0 else DEFAULT_WEIGHT
        return self._worker.put(name, message, credentials, size)

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver everything queued before this call, waiting at most ``timeout`` seconds
        (default ``flush_timeout``).

        Returns:
            ``True`` when all of it was delivered; ``False`` on timeout, or when anything was
            dropped since the previous flush. Called on a sender thread or while the logging
            module's lock is held (as ``dictConfig`` does), it starts the delivery and returns
            ``False`` at once instead of waiting. With a spool, "delivered" still means
            acknowledged by Mixpanel; what is not stays on disk.
        """
        if self._spool is not None:
            return bool(self._spool.flush(timeout))
        return self._worker.flush(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting messages, deliver what is queued within ``timeout``, stop the threads.

        Idempotent. What cannot be delivered in time is dropped and counted as
        ``shutdown_timeout`` (records whose request was still in flight are counted as sent if
        the server's answer comes later). Called while the logging module's lock is held
        (``dictConfig`` reconfiguring), it does not wait: delivery goes on for up to
        ``exit_timeout`` seconds, and the exit hook waits for it. With a spool, what is not
        delivered in time is not dropped: it stays on disk and the next process sends it.
        """
        if self._spool is not None:
            self._spool.close(timeout)
            return
        self._worker.close(timeout)

    def stats(self) -> dict[str, Any]:
        """Counters: ``sent``, ``batches``, ``retries``, ``dropped`` by reason, ``dropped_total``,
        ``queue_depth`` and ``queue_bytes`` (messages waiting and their size) and ``in_flight``;
        with a spool also ``spooled``, ``spool_bytes``, ``spool_fallback``, ``spool_corrupt``
        and ``spool_adopted`` (see :meth:`mp_logbridge._spool.Spool.stats`)."""
        snapshot = self._worker.stats()
        if self._spool is not None:
            snapshot.update(self._spool.stats())
        return snapshot


def _release(worker: BatchWorker) -> None:
    """A consumer was collected: deliver in the background, within its ``exit_timeout``."""
    if worker.running():
        worker.begin_close(worker._clock.monotonic() + worker.exit_timeout)

"""Plumbing shared by the front doors: where their messages go, and the caller-thread capture.

* :class:`ConsumerShare`: the consumer a front door sends through — given explicitly, or a
  :class:`~mp_logbridge.BackgroundConsumer` made from delivery options and shared with every
  other front door configured the same way (handlers and processors by reference count; Trackers
  keep theirs for the life of the process), so ten handlers, or a ``Tracker`` made per request,
  do not mean ten threads and ten connection pools.
* :class:`Bridge`: one project's way in for tags — token and tag settings, the share, the
  "already sent" mark, the caller-thread part of turning a tag into messages (snapshot and split
  it, capture the context once, queue one deferred :class:`~mp_logbridge._tags.TagMessage` per
  entry), and counting of the losses that happen before a consumer sees a message. The handler
  and the structlog processor are thin adapters around one.

A log record can also reach a front door as a copy: OpenTelemetry's ``LoggingHandler`` turns it
into an OpenTelemetry log record whose attributes are a copy of the record's ``__dict__``, and a
log record processor sees only that copy. Marking the copy tells nobody else, so such a front
door notes on its thread what it sent (:meth:`Bridge.claim_copy`); a handler of the same project
handling the same record next on that thread finds the note and skips it, and a handler that
ran first left its mark in ``__dict__``, which the copy carries along.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from ._aio import off_loop
from ._background import BackgroundConsumer
from ._consumers import CallableSink, DisabledConsumer, _ConsumerBase, as_consumer
from ._context import BoundContext, otel_context
from ._diagnostics import DeliveryStats, warn
from ._errors import ConfigurationError, InvalidMessageError
from ._messages import check_distinct_id, clean_token
from ._policy import LOST, Policy
from ._records import EncodedRecord, encode_message
from ._retry import RetryPolicy
from ._tags import (
    RECORD_OVERHEAD,
    BridgeSpec,
    BuiltTag,
    Capture,
    TagMessage,
    names_event,
    split_tag,
)
from ._transport import (
    Credentials,
    as_credentials,
    normalize_region,
    resolve_endpoints,
    will_send,
)
from ._values import snapshot_mapping

__all__ = [
    "DELIVERY_OPTIONS",
    "SENT_MARK",
    "Bridge",
    "ConsumerShare",
    "created_ns",
    "disabled_by_environment",
    "takes_encoded",
]

#: Marks log records and event dicts whose tag was sent: a tuple of senders, each a short digest
#: of a project token and tag name — never the token itself, since the mark travels with
#: ``extra`` into formatters, copies and pickles.
SENT_MARK = "_mp_logbridge_sent"

#: Options a front door passes to the BackgroundConsumer it makes (all of them decide sharing).
DELIVERY_OPTIONS = (
    "batch_size",
    "max_batch_bytes",
    "flush_interval",
    "max_queue_size",
    "max_queue_bytes",
    "overflow",
    "request_timeout",
    "verify",
    "flush_timeout",
    "exit_timeout",
    "max_in_flight",
    "on_error",
    "debug",
    # Scale-out (mp_logbridge.redis): write to a Redis Stream that relay workers deliver from.
    "redis_url",
    "stream",
    "stream_maxlen",
    "spool",
    "durability",
    "max_spool_bytes",
)


#: How many Tracker settings keep their shared consumer pinned (the most recently used).
MAX_PINNED = 16


class _SharedConsumers:
    """Consumers shared by front doors with identical delivery settings.

    Front doors that release their share (handlers, processors) are counted, and the last one
    closes the consumer; a share that is never given back (a Tracker's) pins the consumer until
    the process exits, so Trackers made per request reuse one thread and one connection pool.
    At most :data:`MAX_PINNED` settings stay pinned (the most recently used): Trackers whose
    settings differ every time (an error handler made per request) would otherwise pin a
    consumer, and its threads, each. One no longer pinned lives on while Trackers use it, then
    delivers what it holds and stops its threads, as any consumer nobody refers to.
    """

    def __init__(self) -> None:
        # Re-entrant: making a consumer allocates, so the garbage collector may run a finalizer
        # in the middle of it (or a signal handler may run), and that code may make a front
        # door too (a Tracker per call) on this very thread.
        self._lock = threading.RLock()
        self._entries: dict[Any, list[Any]] = {}  # key -> [consumer, references, pinned]
        self._pinned: dict[Any, None] = {}  # keys pinned, the most recently used last

    def acquire(
        self, key: Any, factory: Callable[[], BackgroundConsumer], *, pin: bool = False
    ) -> BackgroundConsumer:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0].closed:
                made = factory()
                entry = self._entries.get(key)  # a nested call made one meanwhile: share it
                if entry is None or entry[0].closed:
                    entry = self._entries[key] = [made, 0, False]
                else:
                    made.close()
            if pin:
                entry[2] = True
                self._pinned.pop(key, None)
                self._pinned[key] = None
                if len(self._pinned) > MAX_PINNED:
                    self._unpin_oldest()
            else:
                entry[1] += 1
            consumer: BackgroundConsumer = entry[0]
            return consumer

    def _unpin_oldest(self) -> None:
        """Forget the least recently used pinned consumer that no handler shares (a handler's
        release would otherwise close it under the Trackers still using it)."""
        # Dropping an entry may run finalizers that make front doors on this thread (the lock
        # is re-entrant), changing both dicts: iterate over a copy, remove what is still there.
        for key in list(self._pinned):
            entry = self._entries.get(key)
            if entry is None or entry[1] <= 0:
                self._pinned.pop(key, None)
                if entry is not None and self._entries.get(key) is entry:
                    del self._entries[key]
                return

    def release(self, key: Any, consumer: BackgroundConsumer) -> BackgroundConsumer | None:
        """Drop one reference to ``consumer``; returns it when nothing needs it any more."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] is not consumer:  # replaced since (it had been closed)
                return None
            entry[1] -= 1
            if entry[1] > 0 or entry[2]:
                return None
            del self._entries[key]
            released: BackgroundConsumer = entry[0]
            return released

    def reinit_after_fork(self) -> None:
        self._lock = threading.RLock()


class _SentCopies(threading.local):
    """Per thread: ``(created_ns, logger_name, sender)`` of the last record a front door sent
    from a copy of it (see :meth:`Bridge.claim_copy`)."""

    last: tuple[int, str, str] | None = None


_otel_get = otel_context
_sent_copies = _SentCopies()
#: Whether any front door claims records from copies (an OpenTelemetry log processor): until
#: one does, handlers need not look for its notes.
copies_claimed = False


def created_ns(created: Any) -> int | None:
    """A log record's ``created`` as OpenTelemetry's logging handlers stamp it (integer ns)."""
    if type(created) is float or type(created) is int:
        return int(created * 1e9)
    return None


_shared = _SharedConsumers()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_shared.reinit_after_fork)


def disabled_by_environment() -> bool:
    """Whether ``MIXPANEL_DISABLED`` turns delivery off (``1``, ``true``, ``yes``, ``on``)."""
    value = os.environ.get("MIXPANEL_DISABLED", "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def takes_encoded(consumer: Any) -> bool:
    """Whether ``consumer`` takes records encoded at the call (the library's own consumers)."""
    return isinstance(consumer, (_ConsumerBase, CallableSink, DisabledConsumer))


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _stream_options(settings: dict[str, Any]) -> dict[str, Any]:
    """Take the Redis Stream options out of ``settings`` (``redis_url`` falls back on
    ``MIXPANEL_REDIS_URL``); empty when the consumer posts to Mixpanel itself."""
    url = settings.pop("redis_url", None) or os.environ.get("MIXPANEL_REDIS_URL") or None
    stream = settings.pop("stream", None)
    maxlen = settings.pop("stream_maxlen", None)
    if url is None:
        if stream is not None or maxlen is not None:
            raise ConfigurationError(
                "stream and stream_maxlen need redis_url (or MIXPANEL_REDIS_URL)"
            )
        return {}
    return {"url": url, "stream": stream, "stream_maxlen": maxlen}


class ConsumerShare:
    """The consumer behind one front door, and whether the front door holds a share of it.

    With ``consumer=`` given, that consumer is used as is (a callable is wrapped in
    :class:`~mp_logbridge.CallableSink`); delivery options are then an error. Otherwise a shared
    :class:`~mp_logbridge.BackgroundConsumer` is made from the options (``pin=True``: the share is
    kept for the life of the process). ``enabled=False`` checks the options and makes nothing;
    ``disabled=True`` checks them and gives a :class:`~mp_logbridge.consumers.DisabledConsumer`
    (everything accepted, nothing sent, no thread, no socket), even when ``consumer=`` is given.
    """

    __slots__ = ("_key", "consumer")

    def __init__(
        self,
        *,
        consumer: Any = None,
        region: str | None = None,
        api_host: str | None = None,
        credentials: Credentials | None = None,
        api_secret: str | None = None,
        retry: RetryPolicy | Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        enabled: bool = True,
        pin: bool = False,
        owner: str = "front door",
        disabled: bool = False,
    ) -> None:
        options = dict(options or {})
        unknown = sorted(set(options) - set(DELIVERY_OPTIONS))
        if unknown:
            raise ConfigurationError(
                f"{owner} got unknown option(s): {', '.join(unknown)}; delivery options are "
                f"{', '.join(DELIVERY_OPTIONS)}"
            )
        self._key: Any = None
        if region is not None:
            normalize_region(region)  # checked even when api_host overrides it
        if consumer is not None:
            given: dict[str, Any] = {"region": region, "api_host": api_host, "retry": retry}
            given.update(credentials=credentials, api_secret=api_secret, **options)
            extra = sorted(name for name, value in given.items() if value is not None)
            if extra:
                raise ConfigurationError(
                    f"{owner}: {', '.join(extra)} configure the consumer made for you; with "
                    "consumer= given, configure that consumer instead"
                )
            self.consumer: Any = DisabledConsumer() if disabled else as_consumer(consumer)
            return
        endpoints = resolve_endpoints(region=region, api_host=api_host)
        creds = as_credentials(credentials, api_secret)
        settings = {name: options[name] for name in options}
        if retry is not None:
            settings["retry"] = RetryPolicy.from_options(retry)
        streaming = _stream_options(settings)

        def make() -> BackgroundConsumer:
            if streaming:  # scale-out: a Redis Stream instead of HTTP
                from ._redis_stream import RedisStreamConsumer

                return RedisStreamConsumer(
                    **streaming, region=region, api_host=api_host, credentials=creds, **settings
                )
            return BackgroundConsumer(
                endpoints.event,
                endpoints.profile_update,
                endpoints.group_update,
                endpoints.import_,
                credentials=creds,
                **settings,
            )

        if not enabled or disabled:
            if not streaming:  # options are checked even when nothing will be sent
                checking = will_send.set(False)
                try:
                    make().close()
                finally:
                    will_send.reset(checking)
            self.consumer = DisabledConsumer() if disabled else None
            return
        key = (endpoints, creds, _freeze(settings), _freeze(streaming))
        self.consumer = _shared.acquire(key, make, pin=pin)
        self._key = None if pin else key

    def release(self) -> None:
        """Give back this front door's share; the last one closes the consumer. Idempotent.

        A consumer given with ``consumer=`` (or a pinned share) is flushed, not closed.
        """
        key, self._key = self._key, None
        if key is not None:
            last = _shared.release(key, self.consumer)
            if last is not None:
                last.close()
        elif self.consumer is not None:
            self.flush()

    def flush(self, timeout: float | None = None) -> bool:
        """Flush the consumer (``True`` when everything was delivered)."""
        consumer = self.consumer
        return True if consumer is None else bool(consumer.flush(timeout))

    def stats(self) -> dict[str, Any]:
        """The consumer's counters (empty when it keeps none)."""
        consumer = self.consumer
        return {} if consumer is None else dict(consumer.stats())


class Bridge:
    """One project's way from tags to a consumer, shared by the handler and the processor.

    Resolves the token (``MIXPANEL_TOKEN`` when none is given; without one the bridge is
    disabled, warns once and counts what it skips), owns the :class:`ConsumerShare`, marks what it
    sent so a second front door of the same project skips it, and counts the losses a consumer
    cannot count itself (a tag that cannot be captured, a record that fails before reaching it,
    a message after ``close()``, a consumer of the application's that keeps no counters).

    Options it takes out of ``options`` before the delivery options: ``disabled`` (default
    ``MIXPANEL_DISABLED``: everything accepted, nothing sent; no token needed) and the
    :class:`~mp_logbridge._policy.Policy` options (``before_send``, ``sample_rate``, ``redact``,
    ``redact_mode``, ``redact_key``). With a policy, records are built, filtered and encoded at
    the call; without one the hot path is the one below, unchanged.
    """

    __slots__ = (
        "_local",
        "_local_seen",
        "_overhead",
        "_seen",
        "_send_one",
        "closed",
        "delivery",
        "disabled",
        "enabled",
        "fast",
        "policy",
        "skipped",
        "spec",
        "tag",
    )

    def __init__(
        self,
        owner: str,
        token: str | None,
        *,
        tag: str,
        super_properties: Mapping[str, Any] | None,
        default_distinct_id: str | int | None,
        include_trace: bool,
        include_exception: bool,
        consumer: Any,
        region: str | None,
        api_host: str | None,
        credentials: Credentials | None,
        api_secret: str | None,
        retry: RetryPolicy | Mapping[str, Any] | None,
        options: Mapping[str, Any],
    ) -> None:
        if super_properties is not None and not isinstance(super_properties, Mapping):
            raise ConfigurationError(f"{owner}: super_properties must be a mapping")
        if default_distinct_id is not None:
            try:
                check_distinct_id(default_distinct_id, "default_distinct_id")
            except InvalidMessageError as error:
                raise ConfigurationError(f"{owner}: {error}") from None
        options = dict(options)
        disabled = options.pop("disabled", None)
        self.disabled = disabled_by_environment() if disabled is None else bool(disabled)
        self.policy = Policy.from_options(owner, options)
        token = token if token is not None else os.environ.get("MIXPANEL_TOKEN")
        has_token = isinstance(token, str) and bool(token.strip())
        self.enabled = has_token or self.disabled
        if has_token:
            token = clean_token(token, owner)  # type: ignore[arg-type]
        self.tag = tag
        self.spec = BridgeSpec(
            token if has_token else "",  # type: ignore[arg-type]
            super_properties={k: super_properties[k] for k in super_properties}
            if super_properties
            else None,
            default_distinct_id=default_distinct_id,
            include_trace=include_trace,
            include_exception=include_exception,
        )
        self._seen = hashlib.blake2b(f"{self.spec.token}|{tag}".encode(), digest_size=8).hexdigest()
        self.delivery = ConsumerShare(
            consumer=consumer,
            region=region,
            api_host=api_host,
            credentials=credentials,
            api_secret=api_secret,
            retry=retry,
            options=options,
            enabled=self.enabled,
            owner=owner,
            disabled=self.disabled,
        )
        consumer_ = self.delivery.consumer
        # A background consumer builds on its own thread (nothing raises here); others build on
        # this one, so each message is sent on its own and a bad one spares the rest.
        self._send_one: Callable[[str, Any], Any] | None
        if consumer_ is None or not self.enabled:
            self._send_one = None
        elif isinstance(consumer_, BackgroundConsumer):
            self._send_one = consumer_.send
        else:
            self._send_one = self._send_now
        if self.policy is not None and self._send_one is not None:
            self._send_one = self._filtered(self._send_one, takes_encoded(consumer_))
        self._local = DeliveryStats()
        self._local_seen = 0
        self._overhead = RECORD_OVERHEAD + len(self.spec.token)
        self.skipped = 0
        self.closed = False
        #: ``fast(value, created, message, context)`` sends one message a tag builder made;
        #: ``None`` while the bridge cannot send (disabled, closed): the general path counts.
        self.fast: Callable[..., None] | None = (
            self._make_fast() if self._send_one is not None else None
        )
        if not self.enabled:
            warn(
                "%s has no Mixpanel token (pass token= or set MIXPANEL_TOKEN): it is disabled "
                "and will count what it skips",
                owner,
            )

    @property
    def mark(self) -> str:
        """This project's and tag's entry in :data:`SENT_MARK` (a digest, never the token)."""
        return self._seen

    @property
    def consumer(self) -> Any:
        """The consumer messages go to (``None`` when disabled)."""
        return self.delivery.consumer

    def claim(self, holder: MutableMapping[str, Any]) -> bool:
        """Mark ``holder`` (a record's ``__dict__`` or an event dict) as sent by this project and
        tag; ``False`` when it already was (another front door of this project sent it)."""
        mark = holder.get(SENT_MARK)
        if mark:
            if self._seen in mark:
                return False
            holder[SENT_MARK] = (*mark, self._seen)
            return True
        holder[SENT_MARK] = (self._seen,)
        if not copies_claimed:
            return True
        last = _sent_copies.last  # sent from a copy of this very record, earlier on this thread?
        return (
            last is None
            or last[2] != self._seen
            or last[1] != holder.get("name")
            or last[0] != created_ns(holder.get("created"))
        )

    def claim_copy(self, mark: Any, created: int, logger_name: str) -> bool:
        """Claim a log record seen only as a copy (an OpenTelemetry log record made from it).

        ``mark`` is the copy's :data:`SENT_MARK` (what handlers that ran before left on the
        record), ``created`` the record's creation time in integer nanoseconds and
        ``logger_name`` its logger. ``False`` when this project sent the record already; else
        the claim is noted on this thread, so that a handler of this project handling the same
        record next (it runs on the same thread, within the same logging call) skips it.
        """
        global copies_claimed
        copies_claimed = True
        if mark and isinstance(mark, (tuple, list)) and self._seen in mark:
            return False
        key = (created, logger_name, self._seen)
        if _sent_copies.last == key:
            return False
        _sent_copies.last = key
        return True

    def send(
        self,
        value: Any,
        created: float,
        message: Callable[[], str | None],
        context: BoundContext,
        extra: Mapping[str, Any] | None = None,
        seed: str | None = None,
    ) -> None:
        """Queue the messages of one tag; on the caller's thread, so only cheap work happens here.

        Takes private copies of the tag's values and of ``extra`` as they are now (changing them
        afterwards does not change what is sent) and snapshots of what does not cross threads
        (the bound context, the OpenTelemetry context); span ids, baggage, ``$insert_id`` and the
        record itself are made by ``TagMessage.build`` on the sender thread. ``message`` is called
        only when an event takes its name from the log message; ``seed``, when given, makes the
        messages' ``$insert_id`` values derive from it (an import of the same line gives the same
        ids). Entries of the tag that cannot be used are counted as ``invalid``; the others are
        still sent.

        Raises:
            Exception: what ``message`` raised (the caller counts the record as lost).
        """
        send = self._send_one
        if send is None or self.closed:
            self._refuse()
            return
        fast = self.fast
        if fast is not None and type(value) is BuiltTag and not extra and seed is None:
            fast(value, created, message, context)
            return
        parts, problems = split_tag(value)
        for problem in problems:
            self.lose("invalid", f"InvalidMessageError: {problem}")
        if not parts:
            return
        text = None
        for kind, item, _op, _size in parts:
            if kind == "event" and not names_event(item):
                text = message()
                break
        overhead = self._overhead
        if extra:
            try:
                extra, extra_size = snapshot_mapping(extra, "record")
            except InvalidMessageError as problem:
                self.lose("invalid", f"InvalidMessageError: {problem}")
                return
            overhead += extra_size
        otel = _otel_get() if self.spec.needs_otel else None
        capture = Capture(self.spec, created, text, context, otel, extra, seed)
        for index, (kind, item, op, size) in enumerate(parts):
            send(kind, capture.message_for(kind, item, op, index, size + overhead))

    def _make_fast(self) -> Callable[[BuiltTag, float, Callable[[], str | None], Any], None]:
        """The caller-thread path for one message a tag builder made, with every setting bound
        now: nothing is looked up per call."""
        spec = self.spec
        overhead = self._overhead
        otel_get = _otel_get
        consumer = self.delivery.consumer
        send_one = self._send_one
        if isinstance(consumer, BackgroundConsumer) and send_one == consumer.send:
            put = consumer._worker.put

            def fast(
                value: BuiltTag, created: float, message: Callable[[], str | None], context: Any
            ) -> None:
                kind = value.kind
                text = message() if kind == "event" and not value.named else None
                put(
                    kind,
                    TagMessage(
                        spec, created, text, context, otel_get(), None, None, kind, value, value.op
                    ),
                    None,
                    value.size + overhead,
                )

            return fast

        def send_fast(
            value: BuiltTag, created: float, message: Callable[[], str | None], context: Any
        ) -> None:
            kind = value.kind
            text = message() if kind == "event" and not value.named else None
            message_ = TagMessage(
                spec, created, text, context, otel_get(), None, None, kind, value, value.op
            )
            message_.weight = value.size + overhead
            if send_one is None or self.closed:
                self._refuse()
            else:
                send_one(kind, message_)

        return send_fast

    def _filtered(
        self, send: Callable[[str, Any], Any], encoded: bool
    ) -> Callable[[str, Any], Any]:
        """``send`` behind the policy: each message is built here, on the caller's thread, given
        to the policy (sampling, ``before_send``, redaction), checked and encoded again, then
        sent (encoded, to the library's consumers)."""
        policy = self.policy
        assert policy is not None
        apply = policy.apply
        lose = self.lose

        def send_filtered(kind: str, message: Any) -> Any:
            try:
                record = message if type(message) is dict else message.build()
                record = apply(kind, record)
                if record is None:
                    return True  # left out on purpose, and counted
                if record is LOST:
                    return False  # the hook cost it (counted)
                payload = EncodedRecord(encode_message(record))
            except InvalidMessageError as error:
                lose(error.drop_reason, f"{type(error).__name__}: {error}")
                return False
            except Exception as error:  # a deferred message failed in an unexpected way
                lose("invalid", f"the message could not be built: {type(error).__name__}: {error}")
                return False
            return send(kind, payload if encoded else record)

        return send_filtered

    def _refuse(self) -> None:
        if self.closed:
            self.lose("closed", "the front door is closed")
        else:
            self.skipped += 1

    def send_message(self, kind: str, message: Any) -> None:
        """Queue one message a front door made itself (a :class:`~mp_logbridge.MessageSource`
        to build on the sender thread, or a record); counted like a tag's messages."""
        if self.closed:
            self.lose("closed", "the front door is closed")
            return
        send = self._send_one
        if send is None:
            self.skipped += 1
            return
        send(kind, message)

    def _send_now(self, kind: str, message: Any) -> None:
        """Send through a consumer that builds on this thread: a bad message spares the rest.

        The consumer counts what it refuses (every consumer does, see ``as_consumer``); the
        failure is only reported here, so the log call goes on.
        """
        try:
            self.delivery.consumer.send(kind, message)
        except Exception as error:
            warn(
                "mp_logbridge: the consumer refused a message: %s: %s", type(error).__name__, error
            )

    def lose(self, reason: str, detail: str) -> None:
        """Count a message lost before reaching a consumer able to count it, and report it."""
        self._local.add_dropped(reason, 1, detail)
        self._local.report()

    def flush(self, timeout: float | None = None) -> bool:
        """Flush the consumer; ``True`` when everything was delivered and nothing was lost here
        since the previous flush (never raises)."""
        try:
            delivered = self.delivery.flush(timeout)
        except Exception as exc:
            warn("mp_logbridge flush failed: %s: %s", type(exc).__name__, exc)
            delivered = False
        lost = self._local.total_dropped()
        if self.policy is not None:
            lost += self.policy.losses.total_dropped()
        clean = lost == self._local_seen
        self._local_seen = lost
        return delivered and clean

    def close(self) -> None:
        """Release the consumer (closed when nothing else shares it). Idempotent, never raises."""
        if self.closed:
            return
        self.closed = True
        self.fast = None
        try:
            self.delivery.release()
        except Exception as exc:
            warn("mp_logbridge close failed: %s: %s", type(exc).__name__, exc)
        self._local.report(force=True)  # losses the rate limit held back

    def stats(self) -> dict[str, Any]:
        """The consumer's counters plus the losses counted here, ``skipped`` and ``enabled``."""
        try:
            result = self.delivery.stats()
        except Exception as exc:
            warn("mp_logbridge could not read stats: %s: %s", type(exc).__name__, exc)
            result = {}
        dropped = dict(result.get("dropped") or {})
        for reason, count in self._local.snapshot()["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + count
        result["dropped"] = dropped
        result["dropped_total"] = sum(dropped.values())
        result["skipped"] = self.skipped
        result["enabled"] = self.enabled
        if self.policy is not None:
            self.policy.merge_stats(result)
        return result

    async def aflush(self, timeout: float | None = None) -> bool:
        """:meth:`flush` in a thread: the event loop keeps running while it waits."""
        return await off_loop(self.flush, timeout)

"""The background consumer: non-blocking, batched, retrying, bounded, exit- and fork-safe.

The caller's thread only appends to a bounded queue under a short lock that the sender never
holds during I/O. One daemon sender thread, started on first use, sleeps on a condition until
there is work or a deadline (never polling while idle), moves queued messages into one lane per
endpoint, encodes them (a bad one is dropped alone), and posts batches cut by count and bytes.
A lane that is backing off after a retryable failure holds only itself up: other lanes keep
flowing and new messages keep being accepted, within the queue's bounds.

Between the queue and the lanes sits :meth:`AsyncConsumer._admit`, the seam where a durable
(on-disk) store can later take over what the in-memory lanes keep.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from ._consumers import ErrorCallback, _ConsumerBase, _positive_int, _positive_number
from ._delivery import (
    MAX_BATCH_RECORDS,
    MAX_REQUEST_BYTES,
    JsonText,
    Pending,
    RetryPolicy,
    encode_message,
    normalize_send_args,
    post_batch,
    take_batch,
)
from ._diagnostics import DeliveryStats
from ._errors import ConfigurationError, DeliveryError, InvalidMessageError, MessageTooLargeError
from ._messages import KINDS
from ._transport import Credentials

__all__ = ["AsyncConsumer", "MessagesDropped", "is_sender_thread"]

_KIND_SET = frozenset(KINDS)
_INF = float("inf")
_OVERFLOW_POLICIES = ("drop_newest", "drop_oldest")
#: Bytes a message not yet encoded counts for against ``max_queue_bytes`` (its size is not
#: known before the sender encodes it; a small event takes about this much memory meanwhile).
_UNENCODED_ESTIMATE = 1536
#: Default number of records per request (see benchmarks/README.md for how it was chosen).
DEFAULT_BATCH_SIZE = 2000

_getpid = os.getpid
_reinit_lock = threading.Lock()  # only ever taken in a process that noticed it was forked
# Thread ident -> the process it runs in: a forked child's first thread often reuses the ident
# of a parent's sender thread, which does not exist in the child.
_sender_idents: dict[int, int] = {}


def is_sender_thread() -> bool:
    """Whether the current thread is one of this library's sender threads."""
    pid = _sender_idents.get(threading.get_ident())
    return pid is not None and pid == os.getpid()


class MessagesDropped(DeliveryError):
    """Messages were dropped before reaching the server; ``reason`` is the drop reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _SystemClock:
    """Real time; tests substitute a clock that does not sleep."""

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()

    @staticmethod
    def wait(condition: threading.Condition, timeout: float | None) -> None:
        condition.wait(timeout)


class _Lane:
    """The sender thread's queue for one endpoint (and one set of import credentials)."""

    __slots__ = (
        "attempts",
        "bytes",
        "credentials",
        "first_attempt",
        "interrupted_gen",
        "kind",
        "last_error",
        "not_before",
        "oldest",
        "queue",
        "ready",
        "retry_batch",
    )

    def __init__(self, kind: str, credentials: Credentials | None) -> None:
        self.kind = kind
        self.credentials = credentials
        self.queue: deque[Pending] = deque()
        self.ready: deque[list[Pending]] = deque()  # batches to send as they are (413 halves)
        self.bytes = 0
        self.oldest = _INF
        self.retry_batch: list[Pending] | None = None
        self.attempts = 0
        self.first_attempt = 0.0
        self.not_before = 0.0
        self.interrupted_gen = 0
        self.last_error: DeliveryError | None = None

    def min_seq(self) -> float:
        if self.retry_batch:
            return self.retry_batch[0].seq
        if self.ready:
            return self.ready[0][0].seq
        if self.queue:
            return self.queue[0].seq
        return _INF

    def take_all(self) -> list[Pending]:
        items = list(self.retry_batch or ())
        for batch in self.ready:
            items.extend(batch)
        items.extend(self.queue)
        self.retry_batch = None
        self.ready.clear()
        self.queue.clear()
        self.bytes = 0
        self.oldest = _INF
        return items


class _FlushWaiter:
    __slots__ = ("done", "failed", "target")

    def __init__(self, target: int) -> None:
        self.target = target
        self.failed = False
        self.done = threading.Event()


_live: weakref.WeakSet[AsyncConsumer] = weakref.WeakSet()
_exiting = False  # set once the exit hook has run: no sender thread may start after that


def _logging_lock_held() -> bool:
    """Whether this thread holds the logging module's lock (``dictConfig`` does while it works)."""
    lock = getattr(logging, "_lock", None)
    is_owned = getattr(lock, "_is_owned", None)
    try:
        return bool(is_owned()) if is_owned is not None else False
    except Exception:  # pragma: no cover - private API changed shape
        return False


def _at_exit() -> None:
    """Deliver what is queued, through the running threads, within the consumers' deadlines."""
    global _exiting
    _exiting = True
    consumers = [c for c in list(_live) if c._thread is not None]
    if not consumers:
        return
    now = time.monotonic()
    deadline = now + max(c.exit_timeout for c in consumers)
    for consumer in consumers:
        consumer._begin_close(consumer._clock.monotonic() + consumer.exit_timeout)  # own clock
    for consumer in consumers:
        consumer._finish_close(max(0.0, deadline - time.monotonic()))


def _after_fork_in_child() -> None:
    _sender_idents.clear()  # the parent's sender threads do not exist here
    for consumer in list(_live):
        consumer._reinit_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
# Registered at import, after ``import logging``: it runs before ``logging.shutdown`` and after
# every exit hook registered later, so messages those hooks send are still delivered.
atexit.register(_at_exit)


class AsyncConsumer(_ConsumerBase):
    """Delivers messages from a background thread; ``send`` never blocks on the network.

    Positional arguments are the events, people, groups and import URLs (as for
    :class:`~mp_logbridge.Consumer`); usually ``region=`` or ``api_host=`` is enough.

    Batching: a lane per endpoint is sent when it holds ``batch_size`` records (at most 2000),
    ``max_batch_bytes`` of encoded records (a request stays under it), or its oldest record has
    waited ``flush_interval`` seconds. gzip is used on ``/track`` and ``/import``.

    Retries: network errors, 408, 429 and 5xx are retried per ``retry`` (a
    :class:`~mp_logbridge.RetryPolicy` or a mapping of its fields: 2 s doubling to 60 s plus 1-5 s
    of jitter, ``Retry-After`` as a lower bound, at most 10 attempts and 600 s per batch by
    default); other 4xx are not; a 413 splits the batch; a strict ``/import`` 400 drops exactly
    the records the server listed. Waits are cut short by :meth:`flush` and :meth:`close`.

    Bounds: at most ``max_queue_size`` messages wait to be encoded, and the records waiting for
    delivery take at most ``max_queue_bytes`` (encoded size, plus 1.5 KB for each message not yet
    encoded; the batch in flight comes on top). When full, ``overflow`` decides:
    ``"drop_newest"`` (default: the new message is refused) or ``"drop_oldest"``. Every loss is
    counted under a reason in :meth:`stats`, reported to ``on_error(exc, messages)`` and summed
    into one rate-limited warning on the ``mp_logbridge`` logger.

    ``send`` returning ``True`` means "accepted for delivery"; failures found later reach
    ``on_error``. :meth:`flush` and :meth:`close` are bounded (``flush_timeout``); at interpreter
    exit whatever is queued is delivered within ``exit_timeout`` by the already running thread.
    A forked child starts with an empty queue of its own and never sends its parent's messages.

    Usable as the ``consumer=`` of the official ``mixpanel`` package, too:
    ``Mixpanel(token, consumer=AsyncConsumer())``.
    """

    def __init__(
        self,
        events_url: str | None = None,
        people_url: str | None = None,
        groups_url: str | None = None,
        import_url: str | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_batch_bytes: int = MAX_REQUEST_BYTES,
        flush_interval: float = 1.0,
        max_queue_size: int = 10_000,
        max_queue_bytes: int = 64 * 1024 * 1024,
        overflow: str = "drop_newest",
        flush_timeout: float = 5.0,
        exit_timeout: float = 5.0,
        on_error: ErrorCallback | None = None,
        retry: RetryPolicy | Mapping[str, Any] | None = None,
        rng: random.Random | None = None,
        clock: Any = None,
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
        self.batch_size = _positive_int(batch_size, "batch_size", MAX_BATCH_RECORDS)
        self.max_batch_bytes = _positive_int(max_batch_bytes, "max_batch_bytes")
        self.flush_interval = _positive_number(flush_interval, "flush_interval")
        self.max_queue_size = _positive_int(max_queue_size, "max_queue_size")
        self.max_queue_bytes = _positive_int(max_queue_bytes, "max_queue_bytes")
        if overflow not in _OVERFLOW_POLICIES:
            raise ConfigurationError(
                f"overflow must be one of {', '.join(_OVERFLOW_POLICIES)}, got {overflow!r}"
            )
        self.overflow = overflow
        self.flush_timeout = _positive_number(flush_timeout, "flush_timeout")
        self.exit_timeout = _positive_number(exit_timeout, "exit_timeout")
        self._rng = rng or random.Random()
        self._clock = clock or _SystemClock()
        self._reset_state()
        _live.add(self)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (the consumer accepts no more messages)."""
        return self._closed

    # ------------------------------------------------------------------ state

    def _reset_state(self) -> None:
        """Fresh locks, queue, lanes and counters (at construction and in a forked child).

        ``_pid`` is set last: until then, callers in this process take the slow path.
        """
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._incoming: deque[tuple[str, Any, Credentials | None, int]] = deque()
        self._seq = 0
        self._wake_at = _INF  # when the sleeping sender will wake up by itself
        self._sleeping = False  # whether the sender waits on the condition (then send wakes it)
        self._wake_count = self.batch_size  # queued messages that may fill a lane's batch
        self._incoming_since = 0.0  # when the first message now in ``_incoming`` arrived
        self._thread: threading.Thread | None = None
        self._closing = False
        self._closed = False
        self._close_deadline = _INF
        self._abandoned = False
        self._urgent_gen = 0
        self._urgent_seq = 0  # messages up to this one were flushed: due now, waited for or not
        self._flushed_seq = 0  # the last message the previous flush covered
        self._failed_seq = 0  # the last message dropped
        self._waiters: list[_FlushWaiter] = []
        self._lanes: dict[tuple[str, Credentials | None], _Lane] = {}
        # Counters shared with callers (read under the lock): records grabbed but not yet
        # encoded, records waiting in lanes, their encoded bytes, records in the current request.
        self._admitting = 0
        self._admitting_seq = _INF
        self._lane_records = 0
        self._lane_bytes = 0
        self._in_flight = 0
        interval = self._stats.report_interval if hasattr(self, "_stats") else 10.0
        self._stats = DeliveryStats(interval)
        self._pid = os.getpid()

    def _reinit_after_fork(self) -> None:
        """In a forked child: forget the parent's queue, lock, thread and HTTP session.

        Serialised by a lock the parent never takes (so it cannot be held at fork): threads of
        a child forked without fork hooks (uWSGI) may all notice the new PID at once.
        """
        with _reinit_lock:
            if self._pid == os.getpid():
                return
            closed = self._closed
            self.transport.reinit_after_fork()
            self._reset_state()
            self._closed = closed

    def _pending_locked(self) -> int:
        return len(self._incoming) + self._admitting + self._lane_records + self._in_flight

    # ------------------------------------------------------------------ caller side

    def send(self, kind: str, message: Any, api_key: Any = None, api_secret: Any = None) -> bool:
        """Queue one message for delivery; never blocks on the network.

        Returns:
            ``True`` when the message was accepted, ``False`` when it was dropped (queue full,
            consumer closed) — the drop is counted and reported to ``on_error``.

        Raises:
            InvalidMessageError: only for an unknown ``kind`` or a message of an unusable type;
                values inside the message are checked on the sender thread.
        """
        if (
            api_key is None
            and api_secret is None
            and kind in _KIND_SET
            and (type(message) is dict or hasattr(message, "build"))
            and self._pid == _getpid()
        ):
            # The common case, kept short: room in the queue, sender running, nothing to refuse.
            # (``with``: a signal handler raising between acquire and release cannot leak it.)
            with self._lock:
                incoming = self._incoming
                size = len(incoming)
                if (
                    size < self.max_queue_size
                    and self._thread is not None
                    and not self._closed
                    and self._lane_bytes + size * _UNENCODED_ESTIMATE < self.max_queue_bytes
                ):
                    self._seq = seq = self._seq + 1
                    incoming.append((kind, message, None, seq))
                    if size == 0:  # the first since the sender last looked: note the time
                        self._incoming_since = self._clock.monotonic()
                    if self._sleeping:
                        self._wake_if_due(size + 1)
                    return True
        return self._send_checked(kind, message, api_key, api_secret)

    def _send_checked(self, kind: str, message: Any, api_key: Any, api_secret: Any) -> bool:
        """``send`` for everything off the common path: another process, another form of
        arguments, a full queue, a closed consumer, the first message."""
        if self._pid != _getpid():
            self._reinit_after_fork()
        if isinstance(message, (str, bytes)):  # the mixpanel package's form: decode it later
            message = JsonText(message)
        if kind not in _KIND_SET or not (type(message) is dict or hasattr(message, "build")):
            kind, message = normalize_send_args(kind, message)
        credentials = (
            self._message_credentials(api_key, api_secret) if (api_key or api_secret) else None
        )
        accepted = False
        with self._lock:
            incoming = self._incoming
            if self._closed:
                refused, victim = "closed", message
            elif self.overflow == "drop_newest" and (
                len(incoming) >= self.max_queue_size
                or self._lane_bytes + len(incoming) * _UNENCODED_ESTIMATE >= self.max_queue_bytes
            ):
                refused, victim = "queue_full", message
            else:
                refused, victim = None, None
                if incoming and (  # drop_oldest
                    len(incoming) >= self.max_queue_size
                    or self._lane_bytes + len(incoming) * _UNENCODED_ESTIMATE
                    >= self.max_queue_bytes
                ):
                    _kind, victim, _creds, evicted_seq = incoming.popleft()
                    refused = "queue_full"
                    self._mark_failed_locked(evicted_seq, evicted_seq)
                self._seq += 1
                incoming.append((kind, message, credentials, self._seq))
                if self._thread is None and not self._start_thread():
                    incoming.pop()
                    refused, victim = "shutdown_timeout", message
                else:
                    accepted = True
                    size = len(incoming)
                    if size == 1:  # the first since the sender last looked: note the time
                        self._incoming_since = self._clock.monotonic()
                    if self._sleeping:
                        self._wake_if_due(size)
            if refused is None:
                return True
        self._refuse(refused, victim)
        return accepted

    def _wake_if_due(self, size: int) -> None:
        """Wake the sleeping sender (called with the lock held) when ``size`` queued messages
        fill a batch, or when the first one must leave before the sender would wake by itself."""
        if size >= self._wake_count or (
            size == 1 and self._wake_at > self._incoming_since + self.flush_interval
        ):
            self._cond.notify()

    def _refuse(self, reason: str, message: Any) -> None:
        texts = {
            "closed": "the consumer is closed",
            "queue_full": f"the queue is full ({self.max_queue_size} messages / {self.max_queue_bytes} bytes)",
            "shutdown_timeout": "the interpreter is shutting down",
        }
        self._drop(reason, MessagesDropped(reason, texts[reason]), lambda: [_as_record(message)], 1)
        if reason != "queue_full":  # no sender thread is left to report it (rate limited)
            self._stats.report()

    def _start_thread(self) -> bool:
        """Start the sender thread (called with the lock held). ``False`` if threads cannot start.

        Once the exit hook has run nothing would wait for a new thread (and Python 3.12+ may
        refuse to start one), so a first message after that is refused rather than lost.
        """
        if _exiting:
            return False
        thread = threading.Thread(target=self._run, name="mp_logbridge-sender", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            return False
        self._thread = thread
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver everything queued before this call, waiting at most ``timeout`` seconds.

        Returns:
            ``True`` when all of it was delivered (``False`` on timeout, or when some of it was
            dropped, before or during the call; a drop reported by an earlier flush is not
            reported again). Called while the logging module's lock is held (as ``dictConfig``
            does), it starts the delivery and returns ``False`` at once instead of waiting.
        """
        if self._pid != os.getpid():
            self._reinit_after_fork()
        limit = self.flush_timeout if timeout is None else max(0.0, float(timeout))
        with self._lock:
            # A message queued since the previous flush may have been dropped already.
            dropped_before = self._failed_seq > self._flushed_seq
            self._flushed_seq = self._seq
            if self._pending_locked() == 0:
                return not dropped_before
            waiter = _FlushWaiter(self._seq)
            self._waiters.append(waiter)
            self._urgent_seq = self._seq
            self._urgent_gen += 1
            self._cond.notify()
        if is_sender_thread() or _logging_lock_held():
            return False
        finished = waiter.done.wait(limit)
        if not finished:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return finished and not waiter.failed and not dropped_before

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting messages, deliver what is queued within ``timeout``, stop the thread.

        Idempotent. What cannot be delivered in time is dropped and counted as
        ``shutdown_timeout``. Called while the logging module's lock is held (``dictConfig``
        reconfiguring), it does not wait: the thread keeps delivering for up to ``exit_timeout``
        seconds and the exit hook waits for it.
        """
        limit = self.flush_timeout if timeout is None else max(0.0, float(timeout))
        if _logging_lock_held() or is_sender_thread():
            self._begin_close(self._clock.monotonic() + max(limit, self.exit_timeout))
            return
        self._begin_close(self._clock.monotonic() + limit)
        self._finish_close(limit)

    def _begin_close(self, deadline: float) -> None:
        if self._pid != os.getpid():
            self._reinit_after_fork()
        with self._lock:
            self._closed = True
            self._closing = True
            self._close_deadline = min(self._close_deadline, deadline)
            self._urgent_gen += 1
            self._cond.notify()

    def _finish_close(self, timeout: float) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout + 0.25)
            if thread.is_alive():
                self._abandon()
        if thread is None or not thread.is_alive():
            self.transport.close()
        self._stats.report(force=True)

    def _abandon(self) -> None:
        """The thread did not finish in time: count what it still holds as lost."""
        with self._lock:
            if self._abandoned:
                return
            self._abandoned = True
            left = self._pending_locked()
        self._stats.add_dropped("shutdown_timeout", left, "not delivered before the close deadline")

    def stats(self) -> dict[str, Any]:
        """Counters: ``sent``, ``batches``, ``retries``, ``dropped`` by reason, ``queue_depth``,
        ``queue_bytes`` (encoded records awaiting delivery) and ``in_flight``."""
        if self._pid != _getpid():
            self._reinit_after_fork()
        with self._lock:
            depth = self._pending_locked()
            size = self._lane_bytes
            in_flight = self._in_flight
        snapshot = self._stats_snapshot(depth, size)
        snapshot["in_flight"] = in_flight
        return snapshot

    # ------------------------------------------------------------------ sender thread

    def _run(self) -> None:
        _sender_idents[threading.get_ident()] = os.getpid()
        try:
            self._loop()
            # A consumer closed without waiting (under dictConfig) gets no other final report.
            self._stats.report(force=True)
        except BaseException as exc:  # pragma: no cover - a bug: make it visible, count the loss
            self._stats.add_dropped("shutdown_timeout", self._pending_locked(), repr(exc))
            self._stats.report(force=True)
            raise
        finally:
            _sender_idents.pop(threading.get_ident(), None)

    def _loop(self) -> None:
        clock = self._clock
        while True:
            with self._lock:
                while True:
                    if self._closing and not self._incoming and self._lane_records == 0:
                        self._resolve_waiters()
                        return
                    now = clock.monotonic()
                    deadline = self._next_deadline()
                    if self._incoming or deadline <= now:
                        break
                    self._wake_at = deadline
                    self._wake_count = self._batch_room()
                    self._sleeping = True
                    try:
                        clock.wait(self._cond, None if deadline == _INF else deadline - now)
                    finally:
                        self._sleeping = False
                grabbed, self._incoming = self._incoming, deque()
                if grabbed:
                    self._admitting, self._admitting_seq = len(grabbed), grabbed[0][3]
                since = self._incoming_since
                gen = self._urgent_gen
                closing, close_deadline = self._closing, self._close_deadline
            if grabbed:
                self._admit(grabbed, since)
                grabbed.clear()  # do not keep the raw messages alive while sleeping
            if closing and clock.monotonic() >= close_deadline:
                self._expire_all()
                continue
            for lane in list(self._lanes.values()):
                self._service(lane, gen, closing, close_deadline)
            with self._lock:
                self._resolve_waiters()
            self._stats.report()

    def _next_deadline(self) -> float:
        """When the sender must act next (called with the lock held)."""
        urgent = bool(self._waiters) or self._closing
        deadline = self._close_deadline if self._closing else _INF
        for lane in self._lanes.values():
            deadline = min(deadline, self._lane_due(lane, urgent, self._urgent_gen))
        return deadline

    def _batch_room(self) -> int:
        """How many more messages may fill the fullest waiting lane (called with the lock held)."""
        fullest = max(
            (len(lane.queue) for lane in self._lanes.values() if lane.retry_batch is None),
            default=0,
        )
        return max(1, self.batch_size - fullest)

    def _lane_due(self, lane: _Lane, urgent: bool, gen: int) -> float:
        if lane.retry_batch is not None:
            # A flush or close cuts a backoff short, but not a wait the server asked for.
            error = lane.last_error
            if lane.interrupted_gen < gen and (error is None or error.retry_after is None):
                return -_INF
            return lane.not_before
        if lane.ready:
            return -_INF
        if not lane.queue:
            return _INF
        if (
            urgent
            or lane.queue[0].seq <= self._urgent_seq
            or len(lane.queue) >= self.batch_size
            or lane.bytes >= self.max_batch_bytes
        ):
            return -_INF
        return lane.oldest + self.flush_interval

    def _admit(
        self, grabbed: Iterable[tuple[str, Any, Credentials | None, int]], since: float
    ) -> None:
        """Encode queued messages into their lanes.

        ``since`` is when the first of them was queued: a lane they start waits
        ``flush_interval`` from then, not from now.

        This is the seam between the in-memory queue and delivery: a durable store would keep
        the encoded records here, before any send attempt.
        """
        now = min(self._clock.monotonic(), since)
        added_records = added_bytes = 0
        for kind, message, credentials, seq in grabbed:
            try:
                payload = encode_message(message)
            except MessageTooLargeError as exc:
                self._drop_seq("too_large", exc, message, seq)
                continue
            except InvalidMessageError as exc:
                self._drop_seq("invalid", exc, message, seq)
                continue
            except Exception as exc:  # a MessageSource failed in an unexpected way
                problem = InvalidMessageError("message", f"{type(exc).__name__}: {exc}")
                self._drop_seq("invalid", problem, message, seq)
                continue
            size = len(payload)
            if self._lane_bytes + added_bytes + size > self.max_queue_bytes and not self._make_room(
                added_bytes + size
            ):
                full = MessagesDropped("queue_full", "the queue's byte budget is used up")
                self._drop_seq("queue_full", full, message, seq)
                continue
            lane = self._lanes.get((kind, credentials))
            if lane is None:
                lane = self._lanes[(kind, credentials)] = _Lane(kind, credentials)
            if not lane.queue:
                lane.oldest = now
            lane.queue.append(Pending(payload, seq))
            lane.bytes += size
            added_records += 1
            added_bytes += size
        with self._lock:
            self._lane_records += added_records
            self._lane_bytes += added_bytes
            self._admitting, self._admitting_seq = 0, _INF

    def _make_room(self, needed: int) -> bool:
        """Under ``drop_oldest``, evict the oldest waiting records until ``needed`` more bytes fit."""
        if self.overflow != "drop_oldest":
            return False
        for lane in sorted(self._lanes.values(), key=lambda item: item.min_seq()):
            evicted: list[Pending] = []
            freed = 0
            while lane.queue and self._lane_bytes - freed + needed > self.max_queue_bytes:
                item = lane.queue.popleft()
                evicted.append(item)
                freed += len(item.payload)
            if evicted:
                lane.bytes -= freed
                if not lane.queue:
                    lane.oldest = _INF
                with self._lock:
                    self._lane_records -= len(evicted)
                    self._lane_bytes -= freed
                full = MessagesDropped(
                    "queue_full", "the queue's byte budget is used up; oldest dropped"
                )
                self._drop_pending("queue_full", full, evicted)
            if self._lane_bytes + needed <= self.max_queue_bytes:
                return True
        return False

    def _service(self, lane: _Lane, gen: int, closing: bool, close_deadline: float) -> None:
        """Send what is due in one lane (returns when the lane must wait or is backing off)."""
        clock = self._clock
        while True:
            now = clock.monotonic()
            if self._lane_due(lane, closing or bool(self._waiters), gen) > now:
                return
            if lane.retry_batch is not None:
                batch, lane.retry_batch = lane.retry_batch, None
            else:
                if lane.ready:
                    batch = lane.ready.popleft()
                else:
                    batch = take_batch(lane.queue, self.batch_size, self.max_batch_bytes)
                    lane.bytes -= sum(len(item.payload) for item in batch)
                    if not lane.queue:
                        lane.oldest = _INF
                lane.attempts, lane.first_attempt = 0, now
            size = sum(len(item.payload) for item in batch)
            with self._lock:
                self._in_flight = len(batch)
                self._lane_records -= len(batch)
                self._lane_bytes -= size
            timeout = close_deadline - now if closing else None
            outcome = post_batch(self.transport, lane.kind, batch, lane.credentials, timeout)
            lane.attempts += 1
            if outcome.delivered and not self._abandoned:  # abandoned: already counted lost
                self._stats.add_sent(len(outcome.delivered))
            for reason, items, error in outcome.dropped:
                self._drop_pending(reason, error, items)
            again: list[Pending] = []
            lane.last_error = None  # set again below when this batch is retried
            if outcome.split:
                lane.ready.extendleft(reversed(outcome.split))
                again = batch
            elif outcome.retry:
                failure = outcome.error
                assert failure is not None
                now = clock.monotonic()
                delay = self.retry.delay(lane.attempts, failure.retry_after, self._rng.uniform)
                if self.retry.gives_up(lane.attempts, now - lane.first_attempt, delay):
                    self._drop_pending("retries_exhausted", failure, outcome.retry)
                elif closing and now + delay > close_deadline:
                    self._drop_pending("shutdown_timeout", failure, outcome.retry)
                else:
                    self._stats.add_retry()
                    lane.retry_batch, lane.not_before, lane.last_error = (
                        outcome.retry,
                        now + delay,
                        failure,
                    )
                    lane.interrupted_gen = self._urgent_gen
                    again = outcome.retry
            with self._lock:
                self._in_flight = 0
                self._lane_records += len(again)
                self._lane_bytes += sum(len(item.payload) for item in again)
                self._resolve_waiters()

    def _expire_all(self) -> None:
        """The close deadline passed: drop what is left as ``shutdown_timeout``."""
        late = MessagesDropped("shutdown_timeout", "not delivered before the close deadline")
        with self._lock:
            leftover = list(self._incoming)
            self._incoming.clear()
        for _kind, message, _credentials, seq in leftover:
            self._drop_seq("shutdown_timeout", late, message, seq)
        for lane in self._lanes.values():
            retrying = lane.retry_batch or []
            items = lane.take_all()
            if items:
                with self._lock:
                    self._lane_records -= len(items)
                    self._lane_bytes -= sum(len(item.payload) for item in items)
                # The batch being retried failed with the lane's last error; the rest never left.
                self._drop_pending(
                    "shutdown_timeout", lane.last_error or late, items[: len(retrying)]
                )
                self._drop_pending("shutdown_timeout", late, items[len(retrying) :])
            lane.last_error = None

    def _drop_pending(self, reason: str, error: BaseException, items: list[Pending]) -> None:
        if self._abandoned or not items:
            return
        seqs = [item.seq for item in items]
        with self._lock:
            self._mark_failed_locked(min(seqs), max(seqs))
        self._drop(reason, error, lambda: [item.record() for item in items], len(items))

    def _drop_seq(self, reason: str, error: BaseException, message: Any, seq: int) -> None:
        if self._abandoned:
            return
        with self._lock:
            self._mark_failed_locked(seq, seq)
        self._drop(reason, error, lambda: [_as_record(message)], 1)

    def _mark_failed_locked(self, low: int, high: int) -> None:
        """Messages ``low``..``high`` were dropped: fail the flushes waiting for any of them."""
        self._failed_seq = max(self._failed_seq, high)
        for waiter in self._waiters:
            if low <= waiter.target:
                waiter.failed = True

    def _resolve_waiters(self) -> None:
        """Wake flushes whose messages are all resolved (called with the lock held)."""
        if not self._waiters:
            return
        pending = min(self._incoming[0][3] if self._incoming else _INF, self._admitting_seq)
        for lane in self._lanes.values():
            pending = min(pending, lane.min_seq())
        still = []
        for waiter in self._waiters:
            if pending > waiter.target and self._in_flight == 0:
                waiter.done.set()
            else:
                still.append(waiter)
        self._waiters = still


def _as_record(message: Any) -> Any:
    """A message as a record for an error report (builds deferred messages when possible)."""
    if isinstance(message, dict) or not callable(getattr(message, "build", None)):
        return message
    try:
        return message.build()
    except Exception:
        return message

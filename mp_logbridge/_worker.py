"""The background worker: a bounded queue, a dispatcher thread and one sender per lane.

Generic over an :class:`~mp_logbridge._export.Exporter` (HTTP to Mixpanel, a durable spool, a
broker stream), in the way OpenTelemetry's batch processor is generic over its exporter.

The caller's side takes **no lock**: ``put`` appends to a ``deque`` (an atomic operation) and, when
the dispatcher must wake up early, releases a lock used as a one-bit semaphore (``release`` never
waits). So a signal handler or a finalizer that sends while its thread is already inside ``put``
completes instead of waiting for itself, and no thread is ever started while a lock the caller
could wait on is held.

The **dispatcher** thread owns everything else: it moves queued messages into one
:class:`~mp_logbridge._lanes.Lane` per endpoint (building and encoding deferred messages, so
memory is counted in real encoded bytes), decides when each lane's next batch leaves, hands it to
that lane's **sender** thread, and applies the outcome through the one retry decision
(:func:`~mp_logbridge._retry.next_attempt`). It never does I/O itself, so it keeps admitting
messages and enforcing the memory bound while requests are slow, and one stuck endpoint never
delays another. It sleeps until work arrives or a deadline passes; it never polls.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from . import _capture, _lifecycle
from ._diagnostics import DeliveryStats, OutageNotice, report_loss, warn
from ._errors import (
    InvalidMessageError,
    MessagesDropped,
    MessageTooLargeError,
    MixpanelConnectionError,
)
from ._export import Batch, Exporter, Outcome, classify
from ._lanes import INF, Flight, Lane
from ._messages import new_insert_id
from ._records import decode_record, encode_message
from ._retry import RetryPolicy, next_attempt
from ._transport import Credentials

__all__ = ["BatchWorker", "SystemClock"]

#: Lanes kept while idle (with their sender threads); beyond this many lanes (per-call
#: ``/import`` credentials of many projects), idle ones are retired and made again when needed.
IDLE_LANES_KEPT = 8

#: Seconds an export may run past its own deadline before the lane gives up on it and retries
#: the batch with a new sender thread (an exporter that ignores its deadline, a DNS lookup).
OVERRUN_GRACE = 2.0

_getpid = os.getpid


class SystemClock:
    """Real time; tests substitute a clock that does not sleep."""

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()

    @staticmethod
    def wait(wakeup: threading.Lock, timeout: float | None) -> None:
        """Sleep until ``wakeup`` is released or ``timeout`` seconds pass."""
        if wakeup.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            pass


class _FlushWaiter:
    """A flush request travelling through the queue behind the messages it waits for."""

    __slots__ = ("done", "marks")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.marks: list[tuple[Lane, int]] = []


class _Job:
    """One batch handed to a lane's sender thread."""

    __slots__ = (
        "abandoned",
        "batch",
        "counted_lost",
        "deadline",
        "flight",
        "lane",
        "outcome",
        "sender",
    )

    def __init__(self, lane: Lane, flight: Flight, batch: Batch, deadline: float) -> None:
        self.lane = lane
        self.flight = flight
        self.batch = batch
        self.deadline = deadline  # time.monotonic(): exports always run on real time
        self.outcome: Outcome | None = None
        self.abandoned = False  # the dispatcher stopped waiting for it
        self.counted_lost = False  # counted as shutdown_timeout when abandoned at a deadline
        self.sender: _LaneSender | None = None


_STOP = object()


class _LaneSender:
    """A thread that runs a lane's exports, one at a time (a lane has up to ``max_in_flight``)."""

    def __init__(self, worker: BatchWorker, lane: Lane) -> None:
        self.worker = worker
        self.busy = False  # set by the dispatcher when it gives a job, cleared when it is done
        self.jobs: deque[Any] = deque()
        self.wakeup = threading.Lock()
        self.wakeup.acquire()
        self.thread = threading.Thread(
            target=self._run, name=f"mp_logbridge-{lane.kind}", daemon=True
        )

    def submit(self, job: Any) -> None:
        self.jobs.append(job)
        try:
            self.wakeup.release()
        except RuntimeError:
            pass

    def _run(self) -> None:
        _lifecycle.register_sender_thread()
        worker, jobs, wakeup = self.worker, self.jobs, self.wakeup
        try:
            while True:
                if not jobs:
                    wakeup.acquire()
                    continue
                job = jobs.popleft()
                if job is _STOP:
                    return
                job.sender = self
                worker._export(job, self)
                if job.abandoned:  # replaced by another thread: this one retires
                    return
        finally:
            _lifecycle.unregister_sender_thread()


class BatchWorker:
    """Queues messages and delivers them in batches through an exporter, in the background.

    See :class:`~mp_logbridge.BackgroundConsumer` for what the options mean; this class is the
    machinery, without the consumer API.
    """

    def __init__(
        self,
        exporter: Exporter,
        *,
        batch_size: int,
        max_batch_bytes: int,
        flush_interval: float,
        max_queue_size: int,
        max_queue_bytes: int,
        overflow: str,
        flush_timeout: float,
        exit_timeout: float,
        retry: RetryPolicy,
        on_error: Callable[[BaseException, list[Any]], object] | None = None,
        stats: DeliveryStats | None = None,
        clock: Any = None,
        rng: random.Random | None = None,
        name: str = "mp_logbridge-dispatcher",
        max_in_flight: int = 2,
    ) -> None:
        self.exporter = exporter
        self.max_in_flight = max_in_flight
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        self.flush_interval = flush_interval
        self.max_queue_size = max_queue_size
        self.max_queue_bytes = max_queue_bytes
        self.drop_oldest = overflow == "drop_oldest"
        self.flush_timeout = flush_timeout
        self.exit_timeout = exit_timeout
        self.retry = retry
        self.on_error = on_error
        self.name = name
        self._rng = rng or random.Random()
        self._clock = clock or SystemClock()
        self._stats = stats or DeliveryStats()
        self._closed = False
        self._closed_at_exit = False
        self._reset()
        _lifecycle.register(self)

    # ------------------------------------------------------------------ state

    def _reset(self) -> None:
        """Fresh queue, threads and bookkeeping (at construction and in a forked child)."""
        self._incoming: deque[Any] = deque()
        self._results: deque[_Job] = deque()
        self._wakeup = threading.Lock()
        self._wakeup.acquire()
        self._start_token = threading.Lock()
        self._thread: threading.Thread | None = None
        self._in_bytes = 0  # estimated bytes ever queued (written by callers only)
        self._out_bytes = 0  # estimated bytes ever taken from the queue (dispatcher only)
        self._held_bytes = 0  # encoded bytes admitted and not resolved (dispatcher only)
        self._held_records = 0
        self._first_arrival = INF  # when the first message now queued arrived
        self._asleep = False
        self._wake_on_arrival = True  # a new message must leave before the dispatcher wakes
        self._admitted_now = False  # whether the current round admitted anything
        self._wake_count = self.batch_size
        self._wake_bytes = max(1, min(self.max_batch_bytes, self.max_queue_bytes // 8))
        self._close_deadline = INF
        self._closing = False
        self._close_seen = False
        self._finished = threading.Event()
        self._abandoned = False
        self._lanes: dict[tuple[str, Credentials | None], Lane] = {}
        self._waiters: list[_FlushWaiter] = []
        self._urgent_gen = 0
        self._outage = OutageNotice("retrying")
        self._drops_seen = self._stats.total_dropped()
        self._pid = _getpid()

    def reinit_after_fork(self) -> None:
        """In a forked child: forget the parent's queue, threads and connections."""
        if self._pid != _getpid():
            new_insert_id.reset()  # a fork without hooks: this process's own id series
        closed = self._closed
        self._stats.reinit()  # this process's own counters (and a lock nobody holds)
        try:
            self.exporter.reinit_after_fork()
        except Exception as exc:  # pragma: no cover - an exporter's bug must not break the fork
            warn("mp_logbridge: exporter reinit after fork failed: %s", exc)
        self._reset()
        self._closed = closed

    def _check_pid(self) -> None:
        """A child forked without fork hooks (some servers) notices here, on a slow path."""
        if self._pid != _getpid():
            self.reinit_after_fork()

    @property
    def closed(self) -> bool:
        """Whether the worker accepts no more messages."""
        return self._closed

    def running(self) -> bool:
        """Whether the dispatcher thread runs in this process."""
        thread = self._thread
        return thread is not None and self._pid == _getpid() and not self._finished.is_set()

    # ------------------------------------------------------------------ caller side

    def put(self, kind: str, message: Any, credentials: Credentials | None, size: int) -> bool:
        """Queue one message (an encoded record or a deferred message of about ``size`` bytes).

        Never blocks and takes no lock. Returns ``False`` when the message was refused (the
        queue is full, the worker is closed); the refusal is counted and reported.
        """
        if _capture.active:  # mp_logbridge.testing.capture_messages()
            return _capture.take(kind, message)
        if self._pid != _getpid():
            # Forked without Python's fork hooks (uWSGI does by default): what is queued is the
            # parent's, which delivers it. Checked on every call (one system call): a check
            # skipped now would let this process's messages join the parent's copy, to be
            # forgotten with it later.
            self.reinit_after_fork()
        incoming = self._incoming
        n = len(incoming)
        if (
            self._closed
            or n + self._held_records >= self.max_queue_size
            or self._held_bytes + self._in_bytes - self._out_bytes + size > self.max_queue_bytes
        ):
            if self._closed and self._closed_at_exit:
                return self._put_at_exit(kind, message, credentials, size)
            if not self._make_room(n, message):
                return False
        incoming.append((kind, message, credentials, size))
        self._in_bytes += size
        if self._closed and self._finished.is_set():  # closed (and done) since the check above
            return self._after_finish()
        if not n:
            self._first_arrival = self._clock.monotonic()
        n += 1
        if self._thread is None:
            self._start()
        elif self._asleep and (
            self._wake_on_arrival
            or n >= self._wake_count
            or self._in_bytes - self._out_bytes >= self._wake_bytes
        ):
            self._wake()
        return True

    def _put_at_exit(
        self, kind: str, message: Any, credentials: Credentials | None, size: int
    ) -> bool:
        """A message sent after the exit hook closed the worker (by a later exit hook): deliver
        it on this thread, within ``exit_timeout``, rather than lose it."""
        self._incoming.append((kind, message, credentials, size))
        self._in_bytes += size
        if self._finished.is_set() or self._thread is None:
            self._drain_inline(self._exit_deadline())
        else:
            self._wake()
        return True

    def _after_finish(self) -> bool:
        """Messages queued after the dispatcher finished (a close completed while they were
        being queued: on another thread, in a signal handler, in a finalizer): delivered on
        this thread when the exit hook closed the worker, otherwise refused and counted.
        Returns whether they are delivered."""
        if self._closed_at_exit:
            self._drain_inline(self._exit_deadline())
            return True
        while self._incoming:
            try:
                item = self._incoming.popleft()
            except IndexError:  # pragma: no cover - taken by another thread meanwhile
                break
            if isinstance(item, tuple):
                self._out_bytes += item[3]
                self._refuse("closed", "the consumer is closed", item[1])
            elif type(item) is _FlushWaiter:
                item.done.set()
        return False

    def _make_room(self, queued: int, message: Any) -> bool:
        """The queue is full (or the worker closed): refuse the message, or under ``drop_oldest``
        drop the oldest queued one instead. Returns whether the new message may be queued."""
        self._check_pid()
        if self._closed:
            self._refuse("closed", "the consumer is closed", message)
            return False
        if self.drop_oldest:
            if queued:
                try:
                    victim = self._incoming.popleft()
                except IndexError:
                    victim = None
                if isinstance(victim, tuple):
                    self._out_bytes += victim[3]
                    self._drop(
                        "queue_full",
                        MessagesDropped("queue_full", "the queue is full; oldest dropped"),
                        lambda: [_report_form(victim[1])],
                        1,
                    )
                elif victim is not None:  # a flush marker: keep it
                    self._incoming.appendleft(victim)
            return True  # the dispatcher evicts from the lanes if the bytes are still over
        limits = f"{self.max_queue_size} messages / {self.max_queue_bytes} bytes"
        self._refuse("queue_full", f"the queue is full ({limits})", message)
        self._wake()
        return False

    def _refuse(self, reason: str, text: str, message: Any) -> None:
        self._drop(reason, MessagesDropped(reason, text), _reported(message), 1)

    def _wake(self) -> None:
        try:
            self._wakeup.release()
        except RuntimeError:  # already released: the dispatcher will wake anyway
            pass

    def _start(self) -> None:
        """Start the dispatcher (once). A nested call (a signal handler, a finalizer, another
        thread) that finds the start under way leaves its message queued for it."""
        if not self._start_token.acquire(blocking=False):
            return
        try:
            self._check_pid()
            if self._thread is not None or self._finished.is_set():
                return
            if not _lifecycle.exiting():
                thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread = thread  # before start(): a nested put must not start another
                try:
                    _lifecycle.start_thread(thread)
                    return
                except RuntimeError:  # "can't create new thread at interpreter shutdown"
                    self._thread = None
        finally:
            self._start_token.release()
        # The process is exiting and no thread can start: deliver on this thread, bounded.
        self._drain_inline(self._exit_deadline())

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver everything queued before this call, waiting at most ``timeout`` seconds.

        Returns ``True`` when all of it was delivered and nothing was dropped since the previous
        flush. On a sender thread, or while the logging module's lock is held (as
        ``dictConfig`` does), it starts the delivery and returns ``False`` without waiting.
        """
        self._check_pid()
        limit = _lifecycle.wait_limit(timeout, self.flush_timeout)
        finished = True
        if (self._thread is not None or self._incoming) and not self._finished.is_set():
            waiter = _FlushWaiter()
            self._incoming.append(waiter)
            if self._thread is None:
                self._start()
            else:
                self._wake()
            if _lifecycle.is_sender_thread() or _lifecycle.logging_lock_held():
                return False
            finished = waiter.done.wait(limit)
        drops = self._stats.total_dropped()
        clean = drops == self._drops_seen
        self._drops_seen = drops
        return finished and clean

    def begin_close(self, deadline: float, *, at_exit: bool = False) -> None:
        """Stop accepting messages; deliver what is queued until ``deadline`` (on this worker's
        clock), without waiting here. ``at_exit``: closed by the exit hook, so messages that
        later exit hooks send are still delivered (on their thread)."""
        self._check_pid()
        if at_exit and not self._closed:
            self._closed_at_exit = True
        self._closed = True
        self._close_deadline = min(self._close_deadline, deadline)
        self._closing = True
        if self._thread is None and self._incoming:
            self._start()
        self._wake()

    def wait_closed(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the dispatcher to finish; count what it still holds
        as lost if it does not."""
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        if not self._finished.wait(timeout + 0.25):
            self._abandon()

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting messages, deliver what is queued within ``timeout``, stop the threads.

        Idempotent. What cannot be delivered in time is counted as ``shutdown_timeout``. On a
        sender thread or under the logging module's lock it does not wait: delivery goes on for
        up to ``exit_timeout`` seconds, and the exit hook waits for it.
        """
        limit = _lifecycle.wait_limit(timeout, self.flush_timeout)
        if _lifecycle.logging_lock_held() or _lifecycle.is_sender_thread():
            self.begin_close(self._clock.monotonic() + max(limit, self.exit_timeout))
            return
        self.begin_close(self._clock.monotonic() + limit)
        self.wait_closed(limit)
        self._stats.report(force=True)

    def _abandon(self) -> None:
        """The dispatcher did not finish in time (a bug, or an inline export at exit); counted
        once, however many callers waited for it."""
        if self._abandoned:
            return
        self._abandoned = True
        left = len(self._incoming) + self._held_records
        self._stats.add_dropped("shutdown_timeout", left, "not delivered before the close deadline")

    def stats(self) -> dict[str, Any]:
        """Counters: ``sent``, ``batches``, ``retries``, ``dropped`` by reason, ``queue_depth``
        (messages not delivered yet), ``queue_bytes`` (their encoded size, estimated for those
        not encoded yet) and ``in_flight``."""
        self._check_pid()
        snapshot = self._stats.snapshot()
        pending = sum(1 for item in list(self._incoming) if isinstance(item, tuple))
        snapshot["queue_depth"] = pending + self._held_records
        snapshot["queue_bytes"] = self._held_bytes + max(0, self._in_bytes - self._out_bytes)
        snapshot["in_flight"] = sum(
            len(flight.records) for lane in list(self._lanes.values()) for flight in lane.flights
        )
        return snapshot

    # ------------------------------------------------------------------ losses

    def _drop(
        self,
        reason: str,
        error: BaseException,
        records: list[Any] | Callable[[], list[Any]],
        count: int,
    ) -> None:
        """Count lost messages and tell ``on_error`` (never raises)."""
        report_loss(self._stats, self.on_error, reason, error, records, count)

    def _drop_records(self, reason: str, error: BaseException, items: list[bytes]) -> None:
        self._drop(reason, error, lambda: [decode_record(item) for item in items], len(items))

    # ------------------------------------------------------------------ the dispatcher

    def _run(self) -> None:
        _lifecycle.register_sender_thread()
        try:
            while not self._step():
                pass
        finally:
            self._stop_senders()
            self._stats.report(force=True)  # before waiters of close() see the end
            self._finished.set()
            if self._incoming:  # queued while it was finishing (see ``put``)
                self._after_finish()
            _lifecycle.unregister_sender_thread()

    def _exit_deadline(self) -> float:
        """The exit's deadline for this worker, on its clock (shared by every late message)."""
        left = _lifecycle.exit_deadline(self.exit_timeout) - time.monotonic()
        return self._clock.monotonic() + max(0.0, left)

    def _drain_inline(self, deadline: float) -> None:
        """Run the dispatcher on this thread until everything is delivered or ``deadline``
        (the process is exiting: later messages are delivered the same way, not refused)."""
        if not self._start_token.acquire(blocking=False):
            return
        try:
            if not self._closed:
                self._closed_at_exit = True
            self._closed = True
            self._closing = True
            self._close_deadline = deadline
            while not self._step(inline=True):
                pass
            self._stats.report(force=True)
        finally:
            self._start_token.release()

    def _step(self, inline: bool = False) -> bool:
        """One round of the dispatcher; ``True`` when it is done for good."""
        try:
            clock = self._clock
            now = clock.monotonic()
            self._apply_results(now)
            self._admitted_now = False
            self._admit(now)
            closing = self._closing
            if closing and not self._close_seen:
                self._close_seen = True
                self._urgent_gen += 1  # the close cuts every backoff short, once
            if closing and now >= self._close_deadline:
                self._expire()
            else:
                self._dispatch(now, closing, inline)
                self._check_overruns(now)
            self._stats.report()  # before a flush waiting for these records returns
            self._resolve_waiters()
            if len(self._lanes) > IDLE_LANES_KEPT:
                self._retire_idle_lanes()
            if closing and not self._incoming and self._held_records == 0:
                return True
            self._sleep(now, closing)
        except Exception as exc:  # pragma: no cover - a bug: make it visible, keep delivering
            warn("mp_logbridge dispatcher error: %s: %s", type(exc).__name__, exc)
            self._clock.wait(self._wakeup, 0.1)
        return False

    def _sleep(self, now: float, closing: bool) -> None:
        wake_at = self._close_deadline if closing else INF
        urgent_gen = self._urgent_gen
        fullest_count = fullest_bytes = 0
        overrun = INF
        for lane in self._lanes.values():
            wake_at = min(
                wake_at,
                lane.due(
                    urgent=closing,
                    urgent_gen=urgent_gen,
                    batch_size=self.batch_size,
                    max_batch_bytes=self.max_batch_bytes,
                    flush_interval=self.flush_interval,
                ),
            )
            fullest_count = max(fullest_count, len(lane.queue))
            fullest_bytes = max(fullest_bytes, lane.queue_bytes)
            for flight in lane.flights:
                overrun = min(overrun, flight.job.deadline + OVERRUN_GRACE)
        self._wake_count = max(1, self.batch_size - fullest_count)
        self._wake_bytes = max(
            1, min(self.max_batch_bytes - fullest_bytes, self.max_queue_bytes // 8)
        )
        # Real-time limits on the sleep: an export's deadline, and while busy the next look at
        # the queue (rather than be woken by every message — a thread switch per message — look
        # again within flush_interval; a message waits at most that long anyway; a round that
        # finds nothing new goes back to sleeping until woken: never poll while idle).
        real_until = overrun
        if wake_at > now + self.flush_interval:
            self._wake_on_arrival = not self._admitted_now
            if self._admitted_now:
                real_until = min(real_until, time.monotonic() + self.flush_interval)
        else:
            self._wake_on_arrival = False
        self._asleep = True
        try:
            # Checked after ``_asleep`` is set: a message queued before this point is seen
            # here; one queued after it sees ``_asleep`` and wakes the dispatcher.
            if self._incoming or self._results:
                return
            timeout = None if wake_at == INF else wake_at - now
            if real_until != INF:
                real = max(0.0, real_until - time.monotonic())
                if timeout is None or real < timeout:
                    self._wakeup.acquire(timeout=real)
                    return
            if timeout is None or timeout > 0:
                self._clock.wait(self._wakeup, timeout)
        finally:
            self._asleep = False

    def _admit(self, now: float) -> None:
        """Move queued messages into their lanes, encoding the deferred ones."""
        incoming = self._incoming
        if not incoming:
            return
        arrived = min(now, self._first_arrival)
        self._first_arrival = INF
        self._admitted_now = True
        while incoming:
            try:
                item = incoming.popleft()
            except IndexError:  # pragma: no cover - emptied by a caller dropping the oldest
                break
            if type(item) is _FlushWaiter:
                self._add_waiter(item)
                continue
            kind, message, credentials, size = item
            self._out_bytes += size
            if isinstance(message, bytes):  # encoded at the call
                payload = message
            else:
                try:
                    payload = encode_message(message)
                except MessageTooLargeError as exc:
                    self._drop("too_large", exc, _reported(message), 1)
                    continue
                except InvalidMessageError as exc:
                    self._drop("invalid", exc, _reported(message), 1)
                    continue
                except BaseException as exc:  # a MessageSource failed in an unexpected way
                    if not isinstance(exc, Exception) and not _lifecycle.is_sender_thread():
                        raise  # on the application's thread (an inline drain): its own
                    # (On this library's thread, even sys.exit() in build() only means that
                    # this message cannot be made: it must not end delivery.)
                    problem = InvalidMessageError("message", f"{type(exc).__name__}: {exc}")
                    self._drop("invalid", problem, _reported(message), 1)
                    continue
            real = len(payload)
            if (
                self._held_bytes + real > self.max_queue_bytes
                or self._held_records >= self.max_queue_size
            ) and not self._evict(real):
                full = MessagesDropped("queue_full", "the queue's byte budget is used up")
                self._drop("queue_full", full, _reported(payload), 1)
                continue
            key = (kind, credentials)
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = Lane(kind, credentials, self.max_in_flight)
            lane.add(payload, arrived)
            self._held_bytes += real
            self._held_records += 1

    def _retire_idle_lanes(self) -> None:
        """Stop the senders of lanes that hold nothing and forget the lanes (a flush waiting
        on one still sees it resolved)."""
        for key, lane in list(self._lanes.items()):
            if lane.unresolved or any(sender.busy for sender in lane.senders):
                continue
            for sender in lane.senders:
                sender.submit(_STOP)
            del self._lanes[key]

    def _fits(self, size: int) -> bool:
        return (
            self._held_bytes + size <= self.max_queue_bytes
            and self._held_records < self.max_queue_size
        )

    def _evict(self, needed: int) -> bool:
        """Under ``drop_oldest``, drop the oldest waiting records until one more record of
        ``needed`` bytes fits (records in flight cannot be taken back)."""
        if not self.drop_oldest:
            return False
        for lane in sorted(self._lanes.values(), key=lambda item: item.oldest):
            while lane.queue and not self._fits(needed):
                excess = max(1, self._held_bytes + needed - self.max_queue_bytes)
                evicted = lane.evict_oldest(excess)
                self._resolve(lane, evicted)
                full = MessagesDropped("queue_full", "the queue is full; oldest dropped")
                self._drop_records("queue_full", full, evicted)
            if self._fits(needed):
                return True
        return self._fits(needed)

    def _resolve(self, lane: Lane, records: list[bytes]) -> None:
        self._held_bytes -= lane.resolve(records)
        self._held_records -= len(records)

    def _add_waiter(self, waiter: _FlushWaiter) -> None:
        self._urgent_gen += 1
        for lane in self._lanes.values():
            if lane.unresolved:
                waiter.marks.append((lane, lane.admitted))
                lane.urgent_mark = max(lane.urgent_mark, lane.admitted)
        self._waiters.append(waiter)

    def _resolve_waiters(self) -> None:
        if not self._waiters:
            return
        still = []
        for waiter in self._waiters:
            if all(lane.first_unresolved() >= mark for lane, mark in waiter.marks):
                waiter.done.set()
            else:
                still.append(waiter)
        self._waiters = still

    def _dispatch(self, now: float, closing: bool, inline: bool) -> None:
        """Hand each lane's due batches to its senders."""
        for lane in list(self._lanes.values()):
            while (
                lane.due(
                    urgent=closing,
                    urgent_gen=self._urgent_gen,
                    batch_size=self.batch_size,
                    max_batch_bytes=self.max_batch_bytes,
                    flush_interval=self.flush_interval,
                )
                <= now
            ):
                flight = lane.take(now, self.batch_size, self.max_batch_bytes)
                if not flight.records:  # pragma: no cover - nothing was due after all
                    lane.landed(flight)
                    break
                batch = Batch(lane.kind, flight.records, lane.credentials)
                job = _Job(lane, flight, batch, time.monotonic() + self.exporter.timeout)
                flight.job = job
                if inline or not self._submit(lane, job):
                    # On this thread (the process is exiting): the close deadline bounds the
                    # request too, or one slow answer would hold the exit for request_timeout.
                    left = max(0.0, self._close_deadline - now)
                    job.deadline = min(job.deadline, time.monotonic() + left)
                    self._export(job, None)
                    self._apply_results(self._clock.monotonic())

    def _submit(self, lane: Lane, job: _Job) -> bool:
        """Give ``job`` to an idle sender of the lane (one more is made while the lane has fewer
        than ``max_in_flight``); ``False`` when no thread can be started (the interpreter is
        exiting): the caller exports it inline."""
        sender = next((each for each in lane.senders if not each.busy), None)
        if sender is None:
            sender = _LaneSender(self, lane)
            try:
                _lifecycle.start_thread(sender.thread)
            except RuntimeError:
                return False
            lane.senders.append(sender)
        sender.busy = True
        sender.submit(job)
        return True

    def _export(self, job: _Job, sender: _LaneSender | None) -> None:
        """Run one export (on a lane's sender thread, or inline) and post the outcome."""
        try:
            outcome = self.exporter.export(job.batch, job.deadline)
        except BaseException as exc:  # an exporter must not raise; never lose the batch
            failure = MixpanelConnectionError(f"export failed: {type(exc).__name__}: {exc}")
            outcome = classify(job.batch.records, failure)
            if not isinstance(exc, Exception):
                job.outcome = outcome
                self._results.append(job)
                raise
        finally:
            if sender is not None:
                sender.busy = False
        job.outcome = outcome
        if job.abandoned:
            if job.counted_lost and outcome.delivered:
                self._stats.recover("shutdown_timeout", len(outcome.delivered))
            return
        self._results.append(job)
        try:
            self._wakeup.release()
        except RuntimeError:
            pass

    def _apply_results(self, now: float) -> None:
        results = self._results
        while results:
            job = results.popleft()
            if job.abandoned or job.outcome is None:
                continue
            self._apply(job, job.outcome, now)

    def _apply(self, job: _Job, outcome: Outcome, now: float) -> None:
        """What an export's outcome does to its lane: count, drop, split or schedule a retry."""
        lane, flight = job.lane, job.flight
        lane.landed(flight)
        flight.attempts += 1
        if outcome.delivered:
            self._resolve(lane, outcome.delivered)
            self._stats.add_sent(len(outcome.delivered))
            self._outage.recovered(now)
        if outcome.stored:  # committed to the durable spool, which sends and counts them
            self._resolve(lane, outcome.stored)
        for reason, items, error in outcome.dropped:
            self._resolve(lane, items)
            self._drop_records(reason, error, items)
        if outcome.split:
            lane.split(flight, outcome.split)
        elif outcome.retry:
            error = outcome.error or MixpanelConnectionError("export failed")
            deadline = self._close_deadline if self._closing else INF
            decision = next_attempt(
                self.retry,
                error,
                flight.attempts,
                flight.first_attempt,
                now,
                rng=self._rng.uniform,
                deadline=deadline,
            )
            if decision.retry_at is None:
                self._resolve(lane, outcome.retry)
                self._drop_records(decision.reason or "retries_exhausted", error, outcome.retry)
            else:
                self._stats.add_retry()
                lane.schedule_retry(
                    flight, outcome.retry, decision.retry_at, error, self._urgent_gen
                )
                self._outage.failed(now, error)

    def _check_overruns(self, now: float) -> None:
        """An export running well past its deadline is given up on and its batch retried."""
        real = time.monotonic()
        for lane in self._lanes.values():
            for flight in list(lane.flights):
                job = flight.job
                if real < job.deadline + OVERRUN_GRACE:
                    continue
                job.abandoned = True
                stuck = job.sender
                if stuck is not None and stuck in lane.senders:
                    lane.senders.remove(stuck)  # it retires when (if) its export returns
                failure = MixpanelConnectionError(
                    f"the export of {len(job.batch.records)} record(s) did not finish within "
                    f"{self.exporter.timeout:g} s",
                    endpoint=lane.kind,
                )
                self._apply(job, classify(job.batch.records, failure), now)

    def _expire(self) -> None:
        """The close deadline passed: count what is left as ``shutdown_timeout``."""
        late = MessagesDropped("shutdown_timeout", "not delivered before the close deadline")
        while self._incoming:
            try:
                item = self._incoming.popleft()
            except IndexError:  # pragma: no cover
                break
            if isinstance(item, tuple):
                self._out_bytes += item[3]
                self._drop("shutdown_timeout", late, _reported(item[1]), 1)
            elif type(item) is _FlushWaiter:
                self._waiters.append(item)
        for lane in self._lanes.values():
            retrying, rest = lane.take_all()
            for records, error in retrying:
                self._resolve(lane, records)
                self._drop_records("shutdown_timeout", error or late, records)
            if rest:
                self._resolve(lane, rest)
                self._drop_records("shutdown_timeout", late, rest)
            for flight in list(lane.flights):
                job = flight.job
                job.abandoned = job.counted_lost = True
                lane.landed(flight)
                in_flight = MessagesDropped(
                    "shutdown_timeout",
                    "in flight when the close deadline passed (counted as sent if the server's "
                    "answer still comes)",
                )
                self._resolve(lane, job.batch.records)
                self._drop_records("shutdown_timeout", in_flight, job.batch.records)
        for waiter in self._waiters:
            waiter.done.set()
        self._waiters = []

    def _stop_senders(self) -> None:
        idle = True
        for lane in self._lanes.values():
            if lane.flights:
                idle = False
            for sender in lane.senders:
                sender.submit(_STOP)
        if idle:
            try:
                self.exporter.shutdown()
            except Exception as exc:  # pragma: no cover
                warn("mp_logbridge: exporter shutdown failed: %s", exc)


def _reported(message: Any) -> Callable[[], list[Any]]:
    """The list an ``on_error`` report gets for one message, made only if somebody listens."""
    return lambda: [_report_form(message)]


def _report_form(message: Any) -> Any:
    """A message as a record for an error report (builds deferred messages when possible)."""
    if isinstance(message, bytes):
        try:
            return decode_record(message)
        except ValueError:  # pragma: no cover
            return message
    if isinstance(message, dict) or not callable(getattr(message, "build", None)):
        return message
    try:
        return message.build()
    except Exception:
        return message

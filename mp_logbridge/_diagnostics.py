"""The library's own voice: delivery counters, drop reasons and the internal logger.

Nothing is lost silently: every message is delivered or counted under a named drop reason, and
losses are reported as one aggregated, rate-limited warning on the ``mp_logbridge`` logger.

That logger does not propagate (so its records never reach application handlers, the
Mixpanel handler included) and has no handler of its own, so by default Python's "last resort"
handler prints its warnings to stderr. Route it like any logger (``handlers``, ``propagate``,
``level``) to send them elsewhere. Its warnings are emitted even if ``dictConfig`` marked the
logger disabled (its default ``disable_existing_loggers=True`` would otherwise silence loss
reports); set its level above WARNING to silence them on purpose.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = [
    "DROP_REASONS",
    "DeliveryStats",
    "OutageNotice",
    "callback_thread_idents",
    "delivery_callback",
    "info",
    "logger",
    "mask_secret",
    "report_all",
    "report_loss",
    "warn",
]

#: The named reasons a message can be dropped for.
DROP_REASONS = (
    "queue_full",
    "invalid",
    "too_large",
    "rejected_by_server",
    "tls_error",
    "retries_exhausted",
    "shutdown_timeout",
    "closed",
    "consumer_error",
    "feedback_loop",
    "spool_full",
    "expired",
    "hook_error",
)

logger = logging.getLogger("mp_logbridge")
logger.propagate = False


def warn(message: str, *args: Any) -> None:
    """Log a warning on the library logger, whatever ``dictConfig`` did to its ``disabled`` flag."""
    try:
        if logger.getEffectiveLevel() > logging.WARNING:
            return
        record = logger.makeRecord(
            logger.name, logging.WARNING, "(mp_logbridge)", 0, message, args, None
        )
        logger.callHandlers(record)
    except Exception:  # pragma: no cover - reporting must never raise into the caller
        pass


def info(message: str, *args: Any) -> None:
    """Log an informational line on the library logger (``debug=True`` output), whatever
    ``dictConfig`` did to its ``disabled`` flag."""
    try:
        if logger.getEffectiveLevel() > logging.INFO:
            return
        record = logger.makeRecord(
            logger.name, logging.INFO, "(mp_logbridge)", 0, message, args, None
        )
        logger.callHandlers(record)
    except Exception:  # pragma: no cover - reporting must never raise into the caller
        pass


def mask_secret(text: str | None) -> str:
    """A token or key fit to show: its first four and last two characters (``"abcd…yz"``);
    short values are hidden completely."""
    if not text:
        return ""
    if len(text) < 12:
        return "***"
    return f"{text[:4]}…{text[-2:]}"


_all_stats: weakref.WeakSet[DeliveryStats] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for stats in list(_all_stats):  # a lock held at fork would stay held in the child
        stats._lock = threading.RLock()


def report_all() -> None:
    """Report every loss not reported yet (at exit: the rate limit must not hide any)."""
    for stats in list(_all_stats):
        stats.report(force=True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


#: Threads running an ``on_error`` callback now (read on the handler's hot path: a tagged record
#: logged from there could fail and call it again, without end).
callback_thread_idents: set[int] = set()


@contextmanager
def delivery_callback() -> Iterator[None]:
    """Mark the current thread as running an application callback about delivery."""
    ident = threading.get_ident()
    callback_thread_idents.add(ident)
    try:
        yield
    finally:
        callback_thread_idents.discard(ident)


def report_loss(
    stats: DeliveryStats,
    on_error: Callable[[BaseException, list[Any]], object] | None,
    reason: str,
    error: BaseException,
    records: Sequence[Any] | Callable[[], list[Any]],
    count: int,
) -> None:
    """Count ``count`` lost messages under ``reason`` and tell ``on_error(error, records)``.

    ``records`` may be a callable producing the list, so that records are only rebuilt for the
    report when somebody listens. An error of the application's callback is reported on the
    library's logger, never raised into delivery.
    """
    if count <= 0:
        return
    stats.add_dropped(reason, count, f"{type(error).__name__}: {error}")
    if on_error is None:
        return
    try:
        with delivery_callback():
            listed = records() if callable(records) else records
            on_error(error, listed if isinstance(listed, list) else list(listed))
    except Exception as exc:
        warn("mp_logbridge on_error callback raised %s: %s", type(exc).__name__, exc)
    except BaseException as exc:
        # SystemExit (``sys.exit()`` in the callback): on the library's own threads it could not
        # end the process, only the thread that delivers; on the application's thread (a
        # refusal at the call) it goes on to the application, as its own exception.
        from ._lifecycle import is_sender_thread

        if not is_sender_thread():
            raise
        warn("mp_logbridge on_error callback raised %s: %s", type(exc).__name__, exc)


class OutageNotice:
    """Says once that Mixpanel became unreachable, and once that it is reachable again.

    ``waiting`` finishes the first sentence (what happens to the messages meanwhile).
    """

    __slots__ = ("_since", "waiting")

    def __init__(self, waiting: str) -> None:
        self.waiting = waiting
        self._since: tuple[float, str] | None = None

    def failed(self, now: float, error: BaseException) -> None:
        """A retryable failure: the first of an outage is reported at once, the rest are not."""
        if self._since is None:
            self._since = (now, str(error))
            warn("mp_logbridge: Mixpanel unreachable, %s: %s", self.waiting, error)

    def recovered(self, now: float) -> None:
        """A success: ends the outage, if there was one."""
        if self._since is not None:
            since, cause = self._since
            self._since = None
            warn(
                "mp_logbridge: Mixpanel reachable again after %.1f s (it failed with: %s)",
                now - since,
                cause,
            )


class DeliveryStats:
    """Thread-safe delivery counters plus the aggregated loss report.

    ``report_interval`` bounds how often a loss warning is logged; drops in between are summed
    into the next one, and whatever is left unreported is reported at exit. The lock is
    re-entrant: a signal handler or a finalizer that counts a loss while its thread is already
    counting one must not wait for itself.
    """

    __slots__ = (
        "__weakref__",
        "_clock",
        "_details",
        "_last_report",
        "_lock",
        "_unreported",
        "batches",
        "dropped",
        "report_interval",
        "retries",
        "sent",
    )

    def __init__(
        self, report_interval: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._lock = threading.RLock()
        _all_stats.add(self)
        self._clock = clock
        self.report_interval = report_interval
        self.sent = 0
        self.batches = 0
        self.retries = 0
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self._unreported: dict[str, int] = {}
        self._details: dict[str, str] = {}
        self._last_report = float("-inf")

    def add_sent(self, count: int) -> None:
        """Count records the server accepted, in one request."""
        with self._lock:
            self.sent += count
            self.batches += 1

    def add_retry(self) -> None:
        """Count one retried request."""
        with self._lock:
            self.retries += 1

    def add_dropped(self, reason: str, count: int = 1, detail: str | None = None) -> None:
        """Count ``count`` lost messages under ``reason`` (one of :data:`DROP_REASONS`)."""
        if count <= 0:
            return
        with self._lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + count
            self._unreported[reason] = self._unreported.get(reason, 0) + count
            if detail:
                self._details[reason] = detail

    def reinit(self) -> None:
        """Start over with zero counters and a fresh lock (a child forked without fork hooks
        counts its own messages only)."""
        self._lock = threading.RLock()
        self.sent = self.batches = self.retries = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self._unreported = {}
        self._details = {}

    def recover(self, reason: str, count: int) -> None:
        """Records counted as dropped for ``reason`` were delivered after all (an answer that
        came after a close deadline): count them as sent instead."""
        if count <= 0:
            return
        with self._lock:
            taken = min(count, self.dropped.get(reason, 0))
            self.dropped[reason] -= taken
            self.sent += taken
            self.batches += 1

    def total_dropped(self) -> int:
        """How many messages were dropped so far, all reasons together."""
        with self._lock:
            return sum(self.dropped.values())

    def report(self, force: bool = False) -> None:
        """Log one warning summarising drops since the last one, at most once per interval."""
        with self._lock:
            if not self._unreported:
                return
            now = self._clock()
            if not force and now - self._last_report < self.report_interval:
                return
            self._last_report = now
            unreported, self._unreported = self._unreported, {}
            details, self._details = self._details, {}
        parts = []
        for reason, count in unreported.items():
            detail = details.get(reason)
            parts.append(f"{reason}: {count}" + (f" (last: {detail})" if detail else ""))
        total = sum(unreported.values())
        warn("mp_logbridge dropped %d message(s): %s", total, "; ".join(parts))

    def snapshot(self) -> dict[str, Any]:
        """A copy of the counters."""
        with self._lock:
            return {
                "sent": self.sent,
                "batches": self.batches,
                "retries": self.retries,
                "dropped": dict(self.dropped),
                "dropped_total": sum(self.dropped.values()),
            }

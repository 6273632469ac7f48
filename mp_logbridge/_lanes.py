"""Scheduling per endpoint: when each lane's next batch leaves, and what an outcome does to it.

A :class:`Lane` holds the encoded records waiting for one endpoint (and one set of ``/import``
credentials). It has at most one request in flight, so a slow or stuck endpoint holds up only
itself. Everything here is plain data and arithmetic on a clock value passed in: no threads, no
I/O, so the schedule can be tested by calling it.

Records are counted by position: ``admitted`` records ever entered the lane and ``resolved`` ones
were delivered or dropped. Batches leave in order and one at a time, so a flush that must wait
for the first ``n`` records of a lane waits until ``resolved >= n``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from ._errors import DeliveryError
from ._records import take_batch
from ._transport import Credentials

__all__ = ["INF", "Lane"]

INF = float("inf")


class Lane:
    """The records waiting for one endpoint, and the state of its current attempt."""

    __slots__ = (
        "admitted",
        "attempts",
        "credentials",
        "error",
        "first_attempt",
        "held_bytes",
        "in_flight",
        "kind",
        "oldest",
        "queue",
        "queue_bytes",
        "ready",
        "resolved",
        "retry",
        "retry_at",
        "retry_gen",
        "thread",
        "urgent_mark",
    )

    def __init__(self, kind: str, credentials: Credentials | None = None) -> None:
        self.kind = kind
        self.credentials = credentials
        self.queue: deque[bytes] = deque()
        self.queue_bytes = 0
        self.oldest = INF  # when the oldest record in ``queue`` arrived
        self.ready: deque[list[bytes]] = deque()  # halves of a batch the server found too large
        self.retry: list[bytes] | None = None  # the batch waiting for its next attempt
        self.retry_at = 0.0
        self.retry_gen = 0
        self.error: DeliveryError | None = None  # why ``retry`` failed last
        self.attempts = 0
        self.first_attempt = 0.0
        self.in_flight: Any = None  # the job being exported, if any
        self.held_bytes = 0  # bytes of every record not yet resolved (queue, ready, retry, flight)
        self.admitted = 0
        self.resolved = 0
        self.urgent_mark = 0  # records before this position must leave now (a flush waits)
        self.thread: Any = None  # the thread that exports this lane's batches

    @property
    def key(self) -> tuple[str, Credentials | None]:
        """What the lane is for: the kind of message and the ``/import`` credentials."""
        return (self.kind, self.credentials)

    @property
    def unresolved(self) -> int:
        """Records admitted and neither delivered nor dropped yet."""
        return self.admitted - self.resolved

    def add(self, payload: bytes, arrived: float) -> None:
        """Admit one encoded record that arrived at ``arrived``."""
        if not self.queue:
            self.oldest = arrived
        self.queue.append(payload)
        size = len(payload)
        self.queue_bytes += size
        self.held_bytes += size
        self.admitted += 1

    def due(
        self,
        *,
        urgent: bool,
        urgent_gen: int,
        batch_size: int,
        max_batch_bytes: int,
        flush_interval: float,
    ) -> float:
        """When the next batch should leave (``-INF``: now; ``INF``: nothing to send).

        ``urgent`` (a close) sends whatever is queued now; ``urgent_gen`` counts flushes and the
        close, and one newer than a backoff cuts it short — once, and not a wait the server asked
        for with ``Retry-After``.
        """
        if self.in_flight is not None:
            return INF
        if self.retry is not None:
            # A flush or close made since this retry was scheduled cuts its backoff short, once.
            error = self.error
            if urgent_gen > self.retry_gen and (error is None or error.retry_after is None):
                return -INF
            return self.retry_at
        if self.ready:
            return -INF
        if not self.queue:
            return INF
        if (
            urgent
            or self.urgent_mark > self.admitted - len(self.queue)
            or len(self.queue) >= batch_size
            or self.queue_bytes >= max_batch_bytes
        ):
            return -INF
        return self.oldest + flush_interval

    def take(self, now: float, batch_size: int, max_batch_bytes: int) -> tuple[list[bytes], bool]:
        """The batch to send now, and whether it is a retry of the previous one."""
        if self.retry is not None:
            batch, self.retry = self.retry, None
            return batch, True
        if self.ready:
            batch = self.ready.popleft()
        else:
            batch = take_batch(self.queue, batch_size, max_batch_bytes)
            self.queue_bytes -= sum(len(item) for item in batch)
            if not self.queue:
                self.oldest = INF
        self.attempts, self.first_attempt, self.error = 0, now, None
        return batch, False

    def resolve(self, records: list[bytes]) -> int:
        """Records delivered or dropped for good; returns their size in bytes."""
        size = sum(len(item) for item in records)
        self.resolved += len(records)
        self.held_bytes -= size
        return size

    def schedule_retry(
        self, batch: list[bytes], at: float, error: DeliveryError, urgent_gen: int
    ) -> None:
        """Keep ``batch`` for another attempt at ``at``."""
        self.retry, self.retry_at, self.error, self.retry_gen = batch, at, error, urgent_gen

    def evict_oldest(self, needed: int) -> list[bytes]:
        """Drop queued records from the front until ``needed`` bytes are freed (or none are left)."""
        evicted: list[bytes] = []
        freed = 0
        while self.queue and freed < needed:
            item = self.queue.popleft()
            evicted.append(item)
            freed += len(item)
        self.queue_bytes -= freed
        if not self.queue:
            self.oldest = INF
        return evicted

    def take_all(self) -> tuple[list[bytes], list[bytes]]:
        """Everything not in flight: ``(the batch being retried, the rest)``, for a final drop."""
        retrying = self.retry or []
        rest: list[bytes] = []
        for batch in self.ready:
            rest.extend(batch)
        rest.extend(self.queue)
        self.retry = None
        self.ready.clear()
        self.queue.clear()
        self.queue_bytes = 0
        self.oldest = INF
        return retrying, rest

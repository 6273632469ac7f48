"""Scheduling per endpoint: when each lane's next batch leaves, and what an outcome does to it.

A :class:`Lane` holds the encoded records waiting for one endpoint (and one set of ``/import``
credentials). It has at most ``max_in_flight`` requests under way, so a slow or stuck endpoint
holds up only itself, and at high latency a lane keeps several batches moving. Everything here
is plain data and arithmetic on a clock value passed in: no threads, no I/O, so the schedule can
be tested by calling it.

Records are counted by position in the lane: ``admitted`` records ever entered it, and every
batch knows where it starts. A flush that must wait for the first ``n`` records of a lane waits
until :meth:`Lane.first_unresolved` is at least ``n`` — whatever order concurrent batches finish
in. While a batch waits to be retried, no new batch starts (the server is struggling); batches
already under way finish as they will.
"""

from __future__ import annotations

import bisect
from collections import deque
from typing import Any

from ._errors import DeliveryError
from ._records import take_batch
from ._transport import Credentials

__all__ = ["INF", "Flight", "Lane"]

INF = float("inf")


class Flight:
    """One batch of a lane: where it starts, its records, and its attempts so far.

    ``retry_at``/``error``/``gen`` are set while it waits for another attempt; ``job`` is what
    the worker attached while it is under way.
    """

    __slots__ = ("attempts", "error", "first_attempt", "gen", "job", "records", "retry_at", "start")

    def __init__(self, start: int, records: list[bytes], first_attempt: float) -> None:
        self.start = start
        self.records = records
        self.attempts = 0
        self.first_attempt = first_attempt
        self.retry_at = 0.0
        self.error: DeliveryError | None = None
        self.gen = 0
        self.job: Any = None

    def __lt__(self, other: Flight) -> bool:  # kept in order of position
        return self.start < other.start


class Lane:
    """The records waiting for one endpoint, and the batches under way or waiting to retry."""

    __slots__ = (
        "admitted",
        "credentials",
        "flights",
        "held_bytes",
        "kind",
        "max_in_flight",
        "oldest",
        "queue",
        "queue_bytes",
        "ready",
        "retries",
        "senders",
        "urgent_mark",
    )

    def __init__(
        self, kind: str, credentials: Credentials | None = None, max_in_flight: int = 1
    ) -> None:
        self.kind = kind
        self.credentials = credentials
        # Updates apply in the order they arrive ($set then $unset must not swap): one request
        # at a time. Events carry their own time, so their batches may overlap.
        ordered = kind in ("profile_update", "group_update")
        self.max_in_flight = 1 if ordered else max(1, max_in_flight)
        self.queue: deque[bytes] = deque()
        self.queue_bytes = 0
        self.oldest = INF  # when the oldest record in ``queue`` arrived
        self.ready: deque[Flight] = deque()  # halves of a batch the server found too large
        self.retries: list[Flight] = []  # batches waiting for another attempt, by position
        self.flights: list[Flight] = []  # batches under way
        self.held_bytes = 0  # bytes of every record not yet resolved (queue, ready, retry, flight)
        self.admitted = 0
        self.urgent_mark = 0  # records before this position must leave now (a flush waits)
        self.senders: list[Any] = []  # the threads that export this lane's batches

    @property
    def key(self) -> tuple[str, Credentials | None]:
        """What the lane is for: the kind of message and the ``/import`` credentials."""
        return (self.kind, self.credentials)

    def first_unresolved(self) -> int:
        """The position of the first record neither delivered nor dropped (``admitted`` when
        every record is resolved)."""
        first = self.admitted - len(self.queue)
        for flight in self.flights:
            first = min(first, flight.start)
        if self.retries:
            first = min(first, self.retries[0].start)
        if self.ready:
            first = min(first, self.ready[0].start)
        return first

    @property
    def unresolved(self) -> bool:
        """Whether any record is neither delivered nor dropped yet."""
        return bool(self.queue or self.flights or self.retries or self.ready)

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
        """When the next batch should leave (``-INF``: now; ``INF``: nothing to send now).

        ``urgent`` (a close) sends whatever is queued now; ``urgent_gen`` counts flushes and the
        close, and one newer than a backoff cuts it short — once, and not a wait the server asked
        for with ``Retry-After``.
        """
        if len(self.flights) >= self.max_in_flight:
            return INF
        if self.retries:
            flight = self.retries[0]
            error = flight.error
            if urgent_gen > flight.gen and (error is None or error.retry_after is None):
                return -INF
            return flight.retry_at
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

    def take(self, now: float, batch_size: int, max_batch_bytes: int) -> Flight:
        """The batch to send now (a retry first, then a half of a split, then new records); it
        is counted as under way."""
        if self.retries:
            flight = self.retries.pop(0)
        elif self.ready:
            flight = self.ready.popleft()
        else:
            start = self.admitted - len(self.queue)
            records = take_batch(self.queue, batch_size, max_batch_bytes)
            self.queue_bytes -= sum(len(item) for item in records)
            if not self.queue:
                self.oldest = INF
            flight = Flight(start, records, now)
        self.flights.append(flight)
        return flight

    def landed(self, flight: Flight) -> None:
        """``flight`` is no longer under way (its outcome is being applied)."""
        self.flights.remove(flight)

    def resolve(self, records: list[bytes]) -> int:
        """Records delivered or dropped for good; returns their size in bytes."""
        size = sum(len(item) for item in records)
        self.held_bytes -= size
        return size

    def split(self, flight: Flight, halves: list[list[bytes]]) -> None:
        """The server found ``flight`` too large: send its halves, in order, as they are."""
        start = flight.start
        parts = []
        for half in halves:
            parts.append(Flight(start, half, flight.first_attempt))
            start += len(half)
        self.ready.extendleft(reversed(parts))

    def schedule_retry(
        self, flight: Flight, records: list[bytes], at: float, error: DeliveryError, gen: int
    ) -> None:
        """Keep ``records`` (all of ``flight`` or what is left of it) for another attempt at
        ``at``."""
        flight.records = records
        flight.retry_at, flight.error, flight.gen = at, error, gen
        bisect.insort(self.retries, flight)

    def evict_oldest(self, needed: int) -> list[bytes]:
        """Drop queued records from the front until ``needed`` bytes are freed (or none are left).

        The dropped records keep their positions: they count as resolved (no batch holds them).
        """
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

    def take_all(self) -> tuple[list[tuple[list[bytes], DeliveryError | None]], list[bytes]]:
        """Everything not under way, for a final drop: ``([(records waiting to retry, their last
        error), ...], the rest)``."""
        retrying = [(flight.records, flight.error) for flight in self.retries]
        rest: list[bytes] = []
        for flight in self.ready:
            rest.extend(flight.records)
        rest.extend(self.queue)
        self.retries = []
        self.ready.clear()
        self.queue.clear()
        self.queue_bytes = 0
        self.oldest = INF
        return retrying, rest

"""The relay: a stateless worker that delivers what producers wrote to a broker stream.

Any number of relay workers share one consumer group. Each one:

* reads entries (new ones, and entries idle on a worker that died, taken over after
  ``claim_idle`` seconds) and keeps at most ``max_held`` of them at a time;
* checks each entry (a garbage entry goes to the dead-letter stream with the reason instead of
  spoiling a request) and routes it by destination (a region, or a label mapped to a host) and,
  for ``/import``, by the project whose credentials the relay holds;
* hands the records to one background worker per destination — the library's own lanes,
  batching (2000 records, 1 MB), 413 splits and one retry decision — whose exporter posts to
  Mixpanel, then **acknowledges the entries the server accepted**, and moves what it refused for
  good to the dead-letter stream with the server's reason. Retryable failures are retried for as
  long as it takes: the backlog waits in the stream, not in memory;
* keeps the entries it works on from being claimed by others (it resets their idle time), and
  on a stop gives back at once what it could not finish;
* takes its share of one rate limit per project kept in the broker, so the whole fleet stays
  under it;
* reports progress as one JSON line per interval, and stops with an exit code saying why.

The broker is an object with the methods :class:`~mp_logbridge._redis_stream.RedisBroker` has;
the relay knows nothing else about Redis.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ._diagnostics import DeliveryStats, warn
from ._errors import (
    ConfigurationError,
    DeliveryError,
    MixpanelConnectionError,
    PartialImportError,
    RateLimitedError,
)
from ._export import Batch, HttpExporter, Outcome
from ._records import MAX_BATCH_RECORDS, MAX_REQUEST_BYTES
from ._retry import RetryPolicy
from ._streamentry import FIELD_RECORD, MalformedEntry, StreamRecord, parse_entry
from ._transport import Credentials, Endpoints, Transport, _base_url, safe_url
from ._worker import BatchWorker

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_LEFT_PENDING",
    "EXIT_OK",
    "EXIT_REDIS_UNREACHABLE",
    "EXIT_USAGE",
    "Broker",
    "Relay",
    "RelayStats",
]

#: Stopped as asked (a signal, :meth:`Relay.stop`, or nothing left with ``until_empty``): the
#: requests under way finished, and every record it had taken was delivered, dead-lettered, or
#: handed back to the group (other workers take those at once).
EXIT_OK = 0
#: Stopped as asked, but the stop deadline passed with requests still under way: their records
#: were handed back too (if the server did take them, they will arrive twice); nothing was lost.
EXIT_LEFT_PENDING = 1
#: A usage or configuration error.
EXIT_USAGE = 2
#: The broker could not be reached at start (within ``connect_timeout``).
EXIT_REDIS_UNREACHABLE = 3
#: An unexpected error stopped the relay (a bug: the message says what).
EXIT_ERROR = 70
#: Interrupted a second time: stopped at once (unfinished records stay pending; others take
#: them over after ``claim_idle``).
EXIT_INTERRUPTED = 130


class Broker(Protocol):
    """What the relay needs from a broker (Redis Streams today; Kafka could follow)."""

    consumer: str
    stream: str
    dead_stream: str

    def describe(self, exc: BaseException) -> str: ...
    def is_missing_group(self, exc: BaseException) -> bool: ...
    def ensure_group(self) -> None: ...
    def read(self, count: int, block: float | None = None) -> list[tuple[bytes, Any]]: ...
    def claim(
        self, min_idle: float, count: int, cursor: bytes = b"0-0"
    ) -> tuple[bytes, list[tuple[bytes, Any]]]: ...
    def keep(self, ids: list[bytes]) -> None: ...
    def release(self, ids: list[bytes], idle: float) -> None: ...
    def ack(self, ids: list[bytes]) -> None: ...
    def dead_letter(self, items: list[tuple[bytes, Mapping[bytes, bytes]]]) -> None: ...
    def take_rate(self, keys: list[str], counts: list[int], rate: float, burst: float) -> float: ...
    def progress(self) -> dict[str, Any]: ...
    def forget_consumer(self) -> bool: ...
    def forget_idle_consumers(self, idle: float) -> int: ...
    def close(self) -> None: ...


@dataclass
class RelayStats:
    """What one relay worker did so far (see :meth:`Relay.stats`)."""

    delivered: int = 0
    dead_lettered: int = 0
    malformed: int = 0
    claimed: int = 0
    read: int = 0
    broker_errors: int = 0


class _QuietStats(DeliveryStats):
    """The destinations' counters: the relay reports them in its own progress line (a record
    a destination "drops" at a stop is handed back to the group, not lost)."""

    __slots__ = ()

    def report(self, force: bool = False) -> None:
        return


_INFINITE_ATTEMPTS = 2**62


def _relay_policy(retry: RetryPolicy | Mapping[str, Any] | None) -> RetryPolicy:
    """The retry schedule, without a limit on attempts or time: records wait in the stream
    until Mixpanel takes them (a stop hands unfinished ones back)."""
    policy = RetryPolicy.from_options(retry)
    return RetryPolicy(
        initial_backoff=policy.initial_backoff,
        max_backoff=policy.max_backoff,
        jitter=policy.jitter,
        max_attempts=_INFINITE_ATTEMPTS,
        max_elapsed=float("inf"),
        max_retry_after=policy.max_retry_after,
    )


class _Destination:
    """One host: a background worker whose exporter posts there and settles entries."""

    def __init__(self, relay: Relay, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        transport = Transport(endpoints, timeout=relay.request_timeout, verify=relay.verify)
        self.exporter = _SettlingExporter(relay, HttpExporter(transport))
        self.worker = BatchWorker(
            self.exporter,
            batch_size=relay.batch_size,
            max_batch_bytes=relay.max_batch_bytes,
            flush_interval=relay.flush_interval,
            max_queue_size=relay.max_held * 2 + 16,
            max_queue_bytes=relay.max_held_bytes * 2 + MAX_REQUEST_BYTES,
            overflow="drop_newest",
            flush_timeout=relay.stop_timeout,
            exit_timeout=relay.stop_timeout,
            max_in_flight=relay.max_in_flight,
            retry=relay.retry,
            stats=_QuietStats(),
            name=f"mp_logbridge-relay-{safe_url(endpoints.event)}",
        )


class _SettlingExporter:
    """Posts a batch, then acknowledges what the server accepted and dead-letters what it
    refused for good; waits for the shared rate limit first."""

    def __init__(self, relay: Relay, http: HttpExporter) -> None:
        self.relay = relay
        self.http = http

    @property
    def timeout(self) -> float:
        return self.http.timeout + (self.relay.rate_wait if self.relay.max_rate else 0.0)

    def export(self, batch: Batch, deadline: float) -> Outcome:
        relay = self.relay
        if relay.stopping:
            return relay._hold_back(batch, deadline)
        if relay.max_rate:
            refused = relay._wait_for_rate(batch, deadline - self.http.timeout)
            if refused is not None:
                return refused
        with relay._lock:
            if relay.stopping:  # checked again where _finish counts what is in flight
                return relay._hold_back(batch, deadline)
            relay._active += 1
        try:
            outcome = self.http.export(batch, deadline)
            relay._settle(batch, outcome)
        finally:
            with relay._lock:
                relay._active -= 1
        return outcome

    def shutdown(self) -> None:
        self.http.shutdown()

    def reinit_after_fork(self) -> None:
        self.http.reinit_after_fork()


def _rate_key(value: str) -> str:
    return hashlib.blake2b(value.encode(), digest_size=8).hexdigest()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _print_line(stats: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(stats, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Relay:
    """A relay worker: reads a broker stream as one consumer of a group and delivers.

    Args:
        broker: where to read (a :class:`~mp_logbridge.redis.RedisBroker`).
        routes: destination label -> host or base URL, added to the regions (``us``, ``eu``,
            ``in``). The relay sends only to hosts it knows: an entry naming a host it was not
            given goes to the dead-letter stream.
        credentials: ``/import`` credentials by project (the ``project`` producers write: a
            project id for a service account).
        default_project: the project for ``/import`` entries that name none.
        claim_idle: seconds an entry may sit unacknowledged on another worker before this one
            takes it over (the other is presumed dead). Workers reset the idle time of what they
            hold every third of it, so a slow request is not taken from a live worker.
        max_rate: records per second per project, for all workers together (``None``: no
            limit).
        burst: how many records may go at once (default ``max(max_rate, batch_size)``).
        max_held: records one worker holds at most (reading pauses beyond).
        max_held_bytes: the size of the records one worker holds at most.
        stop_timeout: seconds a stop may take to finish what is in flight.
        stats_interval: seconds between progress lines (``0``: none); ``on_stats`` receives
            them (default: one JSON line on standard output).
        connect_timeout: seconds to wait for the broker at start.

    ``batch_size``, ``max_batch_bytes``, ``max_in_flight``, ``flush_interval``,
    ``request_timeout``, ``verify`` and ``retry`` mean what they mean for
    :class:`~mp_logbridge.BackgroundConsumer`, except that retryable failures are retried
    without a limit (the records wait in the stream).
    """

    def __init__(
        self,
        broker: Broker,
        *,
        routes: Mapping[str, str] | None = None,
        credentials: Mapping[str, Credentials] | None = None,
        default_project: str | None = None,
        claim_idle: float = 60.0,
        max_rate: float | None = None,
        burst: float | None = None,
        batch_size: int = MAX_BATCH_RECORDS,
        max_batch_bytes: int = MAX_REQUEST_BYTES,
        max_in_flight: int = 2,
        flush_interval: float = 0.1,
        request_timeout: float = 10.0,
        verify: bool | str = True,
        retry: RetryPolicy | Mapping[str, Any] | None = None,
        max_held: int = 20_000,
        max_held_bytes: int = 256 * 1024 * 1024,
        stop_timeout: float = 25.0,
        stats_interval: float = 10.0,
        on_stats: Callable[[dict[str, Any]], object] | None = _print_line,
        connect_timeout: float = 30.0,
        read_block: float = 0.5,
    ) -> None:
        self.broker = broker
        self.routes = self._routes(routes)
        self._resolved: dict[str, Endpoints | None] = {}
        self.credentials = dict(credentials or {})
        self.default_project = default_project
        for name, value in (
            ("claim_idle", claim_idle),
            ("flush_interval", flush_interval),
            ("request_timeout", request_timeout),
            ("stop_timeout", stop_timeout),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigurationError(f"{name} must be a positive number, got {value!r}")
        if not 1 <= batch_size <= MAX_BATCH_RECORDS:
            raise ConfigurationError(f"batch_size must be between 1 and {MAX_BATCH_RECORDS}")
        if max_rate is not None and not max_rate > 0:
            raise ConfigurationError("max_rate must be a positive number of records per second")
        if max_held < 1 or max_held_bytes < MAX_REQUEST_BYTES:
            raise ConfigurationError("max_held must be positive and max_held_bytes at least 1 MB")
        self.claim_idle = float(claim_idle)
        self.max_rate = float(max_rate) if max_rate else None
        self.burst = float(burst) if burst else max(self.max_rate or 0.0, float(batch_size))
        self.rate_wait = 30.0
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        if (
            isinstance(max_in_flight, bool)
            or not isinstance(max_in_flight, int)
            or not (1 <= max_in_flight <= 16)
        ):
            raise ConfigurationError(
                f"max_in_flight must be between 1 and 16, got {max_in_flight!r}"
            )
        self.max_in_flight = max_in_flight
        self.flush_interval = float(flush_interval)
        self.request_timeout = float(request_timeout)
        self.verify = verify
        self.retry = _relay_policy(retry)
        self.max_held = max_held
        self.max_held_bytes = max_held_bytes
        self.stop_timeout = float(stop_timeout)
        self.stats_interval = float(stats_interval)
        self.on_stats = on_stats
        self.connect_timeout = float(connect_timeout)
        self.read_block = float(read_block)
        self.counters = RelayStats()
        self._lock = threading.Lock()
        self._held: dict[bytes, int] = {}  # entry id -> record size, until acknowledged
        self._held_bytes = 0
        self._room = threading.Event()
        self._ack_backlog: deque[bytes] = deque()
        self._dead_backlog: deque[tuple[bytes, Mapping[bytes, bytes]]] = deque()
        self._destinations: dict[Endpoints, _Destination] = {}
        # A plain flag: stop() runs in signal handlers, where taking a lock (as Event.set
        # does) could wait on the interrupted code itself. Every wait below is short.
        self._stop_requested = False
        self._active = 0  # requests under way (what a stop waits for)
        self._handed_back = threading.Event()  # set once a stop gave back what was not sent
        self._broker_down_since: float | None = None
        self._last_stats = (time.monotonic(), 0)

    # ------------------------------------------------------------------ configuration

    @staticmethod
    def _routes(routes: Mapping[str, str] | None) -> dict[str, Endpoints]:
        from ._redis_stream import default_routes

        table = {**default_routes(), **dict(routes or {})}
        result = {}
        for label, host in table.items():
            if not isinstance(label, str) or not label:
                raise ConfigurationError(f"route labels must be non-empty strings, got {label!r}")
            result[label] = Endpoints.for_host(host)
        return result

    def _endpoints_for(self, destination: str) -> Endpoints | None:
        try:
            return self._resolved[destination]
        except KeyError:
            pass
        endpoints = self.routes.get(destination)
        if endpoints is None and "://" in destination:
            # A host a producer named: only one the relay was given.
            try:
                named = Endpoints.for_host(_base_url(destination, "destination"))
            except ConfigurationError:
                named = None
            if named in self.routes.values():
                endpoints = named
        if len(self._resolved) < 1024:  # labels come from the stream: keep the cache bounded
            self._resolved[destination] = endpoints
        return endpoints

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        """Stop reading, finish the requests under way (within ``stop_timeout``), hand the
        records not sent yet back to the group, then return from :meth:`run`. Safe from a
        signal handler and from any thread."""
        self._stop_requested = True

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop_requested

    def stats(self) -> dict[str, Any]:
        """This worker's counters (``delivered``, ``dead_lettered``, ``claimed``, ``held``,
        ``retries``, ...), without asking the broker."""
        with self._lock:
            held = len(self._held)
            counters = dict(vars(self.counters))
        retries = sum(d.worker.stats()["retries"] for d in list(self._destinations.values()))
        return {"worker": self.broker.consumer, **counters, "held": held, "retries": retries}

    # ------------------------------------------------------------------ the loop

    def run(self, *, until_empty: bool = False) -> int:
        """Deliver until :meth:`stop` (or, with ``until_empty``, until the group has nothing
        left: no entry unread, none pending anywhere). Returns an exit code (``EXIT_*``)."""
        try:
            if not self._start():
                return EXIT_REDIS_UNREACHABLE
            now = time.monotonic()
            next_keep = now + self.claim_idle / 3
            next_claim = now  # entries left by workers that died before this one started
            next_stats = now + self.stats_interval if self.stats_interval else float("inf")
            next_tidy = now + 60.0
            while not self._stop_requested:
                try:
                    self._retry_backlogs()
                    now = time.monotonic()
                    if now >= next_keep:
                        self._keep_held()
                        next_keep = now + self.claim_idle / 3
                    claimed = 0
                    if now >= next_claim:
                        claimed = self._claim()
                        next_claim = now + min(self.claim_idle / 2, 10.0)
                    if now >= next_tidy:
                        self.broker.forget_idle_consumers(max(3600.0, self.claim_idle * 10))
                        next_tidy = now + 600.0
                    room = self._capacity()
                    if room <= 0:
                        self._room.clear()
                        if self._capacity() <= 0:
                            self._room.wait(min(0.2, self.claim_idle / 6))
                        continue
                    entries = self.broker.read(
                        room, block=min(self.read_block, self.claim_idle / 6)
                    )
                    self._broker_back()
                    if entries:
                        with self._lock:
                            self.counters.read += len(entries)
                        self._admit(entries)
                    elif until_empty and not claimed and self._drained():
                        break
                except Exception as exc:
                    if not self._broker_failed(exc, pause=True):
                        raise
                now = time.monotonic()
                if now >= next_stats:
                    self._report()
                    next_stats = now + self.stats_interval
            return self._finish()
        except Exception as exc:
            warn(
                "mp_logbridge relay stopped by an unexpected error: %s: %s", type(exc).__name__, exc
            )
            self._abort()
            return EXIT_ERROR

    def _start(self) -> bool:
        deadline = time.monotonic() + self.connect_timeout
        while True:
            try:
                self.broker.ensure_group()
                return True
            except Exception as exc:
                if not _is_broker_error(self.broker, exc):
                    raise
                if time.monotonic() >= deadline or self._stop_requested:
                    warn(
                        "mp_logbridge relay cannot reach the broker: %s", self.broker.describe(exc)
                    )
                    return False
                time.sleep(0.25)

    def _capacity(self) -> int:
        with self._lock:
            if self._held_bytes >= self.max_held_bytes:
                return 0
            return min(self.batch_size, self.max_held - len(self._held))

    def _drained(self) -> bool:
        with self._lock:
            if self._held or self._ack_backlog or self._dead_backlog:
                return False
        progress = self.broker.progress()
        return bool(progress["pending"] == 0 and progress["lag"] == 0)

    def _claim(self) -> int:
        """Take over entries idle on other workers; returns how many."""
        cursor = b"0-0"
        taken = 0
        for _round in range(10):
            room = self._capacity()
            if room <= 0:
                break
            cursor, entries = self.broker.claim(self.claim_idle, room, cursor)
            with self._lock:
                entries = [entry for entry in entries if entry[0] not in self._held]
                self.counters.claimed += len(entries)
            if entries:
                self._admit(entries)
                taken += len(entries)
            if cursor in (b"0-0", "0-0"):
                break
        return taken

    def _keep_held(self) -> None:
        with self._lock:
            ids = list(self._held)
        if ids:
            self.broker.keep(ids)

    def _admit(self, entries: list[tuple[bytes, Any]]) -> None:
        """Route checked entries to their destination; dead-letter the others."""
        dead: list[tuple[bytes, Mapping[bytes, bytes]]] = []
        routed: list[tuple[_Destination, str, StreamRecord, Credentials | None]] = []
        for entry_id, fields in entries:
            try:
                parsed = parse_entry(entry_id, fields)
            except MalformedEntry as problem:
                dead.append(
                    (
                        entry_id,
                        _dead_fields(entry_id, fields, f"malformed entry: {problem}", "invalid"),
                    )
                )
                continue
            endpoints = self._endpoints_for(parsed.destination)
            if endpoints is None:
                reason = (
                    f"unknown destination {parsed.destination!r}: this relay sends to "
                    f"{', '.join(sorted(self.routes))} (add --route LABEL=URL)"
                )
                dead.append(
                    (entry_id, _dead_fields(entry_id, fields, reason, "rejected_by_server"))
                )
                continue
            credentials = None
            if parsed.kind == "import":
                project = parsed.project or self.default_project
                credentials = self.credentials.get(project) if project else None
                if credentials is None:
                    reason = (
                        f"no /import credentials for project {project!r} at this relay"
                        if project
                        else "an /import entry that names no project (and no default project)"
                    )
                    dead.append(
                        (entry_id, _dead_fields(entry_id, fields, reason, "rejected_by_server"))
                    )
                    continue
            record = parsed.record
            if self.max_rate:
                record.rate_key = _rate_key(record.rate_key)
            destination = self._destinations.get(endpoints)
            if destination is None:
                destination = self._destinations[endpoints] = _Destination(self, endpoints)
            routed.append((destination, parsed.kind, record, credentials))
        with self._lock:
            for _destination, _kind, record, _credentials in routed:
                self._held[record.entry_id] = len(record)
                self._held_bytes += len(record)
            self.counters.malformed += sum(1 for _i, f in dead if f.get(b"drop") == b"invalid")
        for destination, kind, record, credentials in routed:
            destination.worker.put(kind, record, credentials, len(record))
        if dead:
            self._dead_letter(dead, held=False)

    # ------------------------------------------------------------------ settling (sender threads)

    def _settle(self, batch: Batch, outcome: Outcome) -> None:
        """Acknowledge what the server accepted; dead-letter what it refused for good."""
        if outcome.delivered:
            self._ack([_entry_id(record) for record in outcome.delivered])
        if outcome.dropped:
            positions = {id(record): index for index, record in enumerate(batch.records)}
            dead: list[tuple[bytes, Mapping[bytes, bytes]]] = []
            for reason, items, error in outcome.dropped:
                for record in items:
                    why = _reason(error, positions.get(id(record)))
                    entry_id = _entry_id(record)
                    fields = getattr(record, "source", None) or {FIELD_RECORD: bytes(record)}
                    dead.append(
                        (entry_id, _dead_fields(entry_id, fields, why, reason, error.status_code))
                    )
            self._dead_letter(dead)

    def _ack(self, ids: list[bytes]) -> None:
        try:
            self.broker.ack(ids)
        except Exception as exc:
            if not _is_broker_error(self.broker, exc):
                raise
            self._broker_failed(exc)
            self._ack_backlog.extend(ids)
            return
        self._release_held(ids, dead=False)

    def _dead_letter(
        self, items: list[tuple[bytes, Mapping[bytes, bytes]]], *, held: bool = True
    ) -> None:
        """Move entries to the dead-letter stream (``held``: entries this worker had taken on;
        otherwise refused when read)."""
        if not held:
            with self._lock:
                self.counters.dead_lettered += len(items)
        try:
            self.broker.dead_letter(items)
        except Exception as exc:
            if not _is_broker_error(self.broker, exc):
                raise
            self._broker_failed(exc)
            self._dead_backlog.extend(items)
            return
        if held:
            self._release_held([entry_id for entry_id, _ in items], dead=True)

    def _release_held(self, ids: list[bytes], *, dead: bool) -> None:
        """Entries settled for good: no longer held (an entry settled twice — a batch retried
        after its first attempt overran — counts once)."""
        with self._lock:
            settled = 0
            for entry_id in ids:
                size = self._held.pop(entry_id, None)
                if size is not None:
                    self._held_bytes -= size
                    settled += 1
            if dead:
                self.counters.dead_lettered += settled
            else:
                self.counters.delivered += settled
        self._room.set()

    def _retry_backlogs(self) -> None:
        """Acknowledgements and dead letters that failed while the broker was away."""
        if self._ack_backlog:
            ids = _drain(self._ack_backlog)
            self._ack(ids)
        if self._dead_backlog:
            items = _drain(self._dead_backlog)
            self._dead_letter(items)

    def _wait_for_rate(self, batch: Batch, deadline: float) -> Outcome | None:
        """Wait for the batch's share of each project's rate; an outcome when it cannot be had
        before ``deadline`` (retried later, like a 429)."""
        counts = Counter(getattr(record, "rate_key", "") for record in batch.records)
        keys = list(counts)
        needs = [counts[key] for key in keys]
        assert self.max_rate is not None
        while True:
            try:
                wait = self.broker.take_rate(keys, needs, self.max_rate, self.burst)
            except Exception as exc:
                if not _is_broker_error(self.broker, exc):
                    raise
                self._broker_failed(exc)
                wait = 0.5
            if wait <= 0:
                return None
            if self.stopping:
                return self._hold_back(batch, deadline)
            if time.monotonic() + wait > deadline:
                error = RateLimitedError(
                    f"waiting {wait:.1f} s for the shared rate limit ({self.max_rate:g} records/s "
                    "per project)",
                    retry_after=wait,
                    endpoint=batch.kind,
                )
                return Outcome(retry=batch.records, error=error)
            time.sleep(wait)

    # ------------------------------------------------------------------ broker trouble

    def _broker_failed(self, exc: BaseException, *, pause: bool = False) -> bool:
        """Note a broker failure (reported once per outage; ``pause``: wait a little before
        the caller tries again); ``False`` if ``exc`` is not one."""
        if not _is_broker_error(self.broker, exc):
            return False
        with self._lock:
            self.counters.broker_errors += 1
            first = self._broker_down_since is None
            if first:
                self._broker_down_since = time.monotonic()
        if self.broker.is_missing_group(exc):
            try:
                self.broker.ensure_group()
                warn("mp_logbridge relay: the consumer group was missing; made it again")
            except Exception:
                pass
        elif first:
            warn("mp_logbridge relay: broker unreachable, retrying: %s", self.broker.describe(exc))
        if pause:
            time.sleep(0.5)
        return True

    def _broker_back(self) -> None:
        since = self._broker_down_since
        if since is not None:
            self._broker_down_since = None
            warn(
                "mp_logbridge relay: broker reachable again after %.1f s", time.monotonic() - since
            )

    # ------------------------------------------------------------------ progress and stop

    def _report(self, final: bool = False) -> None:
        if self.on_stats is None:
            return
        stats = self.stats()
        now = time.monotonic()
        since, delivered_before = self._last_stats
        self._last_stats = (now, stats["delivered"])
        stats["rate"] = round((stats["delivered"] - delivered_before) / max(1e-9, now - since), 1)
        try:
            stats.update(self.broker.progress())
            stats["broker"] = "ok"
        except Exception as exc:
            stats.update(lag=None, pending=None, broker=f"unreachable: {self.broker.describe(exc)}")
        stats["time"] = _now_ms()
        if final:
            stats["stopped"] = True
        try:
            self.on_stats(stats)
        except Exception as exc:  # a broken stats sink must not stop delivery
            warn("mp_logbridge relay: the stats callback raised %s: %s", type(exc).__name__, exc)

    def _hold_back(self, batch: Batch, deadline: float) -> Outcome:
        """A batch due after a stop began: not sent; it waits (on its sender thread) until the
        stop has given it back to the group, so nothing retries it meanwhile."""
        self._handed_back.wait(max(0.0, deadline - time.monotonic()))
        error = MixpanelConnectionError("not sent: the relay stopped", endpoint=batch.kind)
        return Outcome(retry=batch.records, error=error)

    def _finish(self) -> int:
        """Let the requests under way finish (by the stop deadline); hand back the rest."""
        deadline = time.monotonic() + self.stop_timeout
        while True:
            with self._lock:
                active = self._active
            if not active or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        destinations = list(self._destinations.values())
        for destination in destinations:  # what was not sent is dropped here, kept in Redis
            destination.worker.begin_close(time.monotonic())
        for destination in destinations:
            destination.worker.wait_closed(1.0)
        self._handed_back.set()
        for _attempt in range(10):  # acknowledgements the broker missed, while it is back
            try:
                self._retry_backlogs()
            except Exception:
                pass
            if not self._ack_backlog and not self._dead_backlog:
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        with self._lock:
            left = list(self._held)
        code = EXIT_LEFT_PENDING if active else EXIT_OK
        if left:
            try:
                self.broker.release(left, idle=self.claim_idle + 1)
            except Exception as exc:
                warn(
                    "mp_logbridge relay: %d record(s) stay pending until another worker takes "
                    "them over: %s",
                    len(left),
                    self.broker.describe(exc),
                )
        else:
            try:
                self.broker.forget_consumer()
            except Exception:
                pass
        self._report(final=True)
        self.broker.close()
        return code

    def _abort(self) -> None:
        for destination in list(self._destinations.values()):
            destination.worker.begin_close(time.monotonic())
        try:
            self.broker.close()
        except Exception:
            pass


def _drain(queue: deque[Any]) -> list[Any]:
    items = []
    while queue:
        try:
            items.append(queue.popleft())
        except IndexError:  # pragma: no cover
            break
    return items


def _is_broker_error(broker: Any, exc: BaseException) -> bool:
    redis = getattr(broker, "redis", None)
    if redis is not None and isinstance(exc, redis.exceptions.RedisError):
        return True
    return isinstance(exc, (OSError, ConnectionError))


def _reason(error: DeliveryError, position: int | None) -> str:
    """Why the server refused one record: its entry in a strict ``/import`` answer, else the
    error as a whole."""
    if isinstance(error, PartialImportError) and position is not None:
        for entry in error.failed_records:
            if isinstance(entry, dict) and entry.get("index") == position:
                field = entry.get("field")
                message = entry.get("message") or entry.get("error") or "refused"
                return f"{field}: {message}" if field else str(message)
    return str(error)


def _entry_id(record: bytes) -> bytes:
    entry_id: bytes = getattr(record, "entry_id", b"")
    return entry_id


def _dead_fields(
    entry_id: bytes,
    fields: Mapping[bytes, bytes] | None,
    reason: str,
    drop: str,
    status: int | None = None,
) -> dict[bytes, bytes]:
    """A dead-letter entry: the original fields plus why and when."""
    dead = {
        key if isinstance(key, bytes) else str(key).encode(): value
        if isinstance(value, bytes)
        else str(value).encode()
        for key, value in (fields or {}).items()
        if key not in (b"reason", b"drop", b"status", b"at", b"entry")
    }
    dead[b"entry"] = entry_id
    dead[b"reason"] = reason[:2000].encode("utf-8", "replace")
    dead[b"drop"] = drop.encode()
    if status is not None:
        dead[b"status"] = str(status).encode()
    dead[b"at"] = str(_now_ms()).encode()
    return dead

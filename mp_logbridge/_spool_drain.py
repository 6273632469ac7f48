"""The spool's drainer: delivers spooled rows and deletes them once acknowledged.

One thread schedules: it reads the oldest rows of each lane (a kind of message for one
destination, in one file), marks them as taken, hands each batch to the lane's own sender
thread (so one slow endpoint never stalls another), applies the outcome through the one retry
decision (:func:`~mp_logbridge._retry.next_attempt`) and deletes what was delivered or refused
for good. It serves a consumer's own file (:class:`~mp_logbridge._spool_store.OwnStore`) and,
one after the other, files adopted from processes that are gone; ``mp-logbridge spool --drain``
runs one standalone.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import _lifecycle
from ._diagnostics import DeliveryStats, warn
from ._errors import (
    DeliveryError,
    InvalidMessageError,
    MessagesDropped,
    MixpanelConnectionError,
)
from ._export import Batch, Exporter, HttpExporter, Outcome, classify
from ._messages import KINDS
from ._records import decode_record
from ._retry import RetryPolicy, next_attempt
from ._spool_store import (
    REOPEN_AFTER,
    Chunk,
    LaneInfo,
    OwnStore,
    SpoolCorrupt,
    SpoolError,
    StoreFile,
    list_files,
    remove_stale_locks,
    set_aside,
)
from ._transport import Credentials, Endpoints, Transport

__all__ = [
    "ADOPT_INTERVAL",
    "CHECK_AGE_MS",
    "TRACK_WINDOW_MS",
    "Drainer",
    "Waiter",
    "fingerprint",
    "parse_endpoints",
    "run_drain",
]

#: Seconds between two looks for files of processes that are gone.
ADOPT_INTERVAL = 30.0
#: ``/track`` accepts events of the last five days.
TRACK_WINDOW_MS = 5 * 86_400_000
#: Rows spooled longer ago than this have their own ``time`` checked against the window.
CHECK_AGE_MS = 4 * 86_400_000
#: Seconds an export may run past its deadline before the lane retries with a new thread.
OVERRUN_GRACE = 2.0
#: Bytes of just-committed records a lane keeps in memory to send them without reading them
#: back; beyond it (a backlog) they are read from the file.
CACHE_BYTES = 4 * 1024 * 1024

INF = float("inf")
_STOP = object()


def fingerprint(credentials: Credentials | None, import_url: str) -> str:
    """What a spool row records about the ``/import`` credentials that go with it: a digest of
    the credentials and the URL they are for, never the secret. A process can send those rows
    only with the same credentials to the same URL."""
    if credentials is None:
        return ""
    material = json.dumps(
        [credentials.authorization(), sorted(credentials.query().items()), import_url]
    )
    digest = hashlib.blake2b(material.encode(), digest_size=16, person=b"mp_logbridge-spl")
    return digest.hexdigest()


def parse_endpoints(text: str) -> Endpoints | None:
    try:
        urls = json.loads(text)
    except (ValueError, TypeError):
        return None
    if (
        not isinstance(urls, list)
        or len(urls) != 4
        or not all(isinstance(url, str) and url.startswith(("http://", "https://")) for url in urls)
    ):
        return None
    return Endpoints(*urls)


def _report_form(body: bytes) -> Any:
    try:
        return decode_record(body)
    except ValueError:
        return body


def _event_time_ms(body: bytes) -> float | None:
    try:
        value = json.loads(body)["properties"]["time"]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value > 100_000_000_000 else float(value) * 1000.0


class _Source:
    """A file being delivered: this consumer's own, or one adopted from a process that is gone."""

    __slots__ = ("failed_until", "file", "label", "lock", "own", "reported")

    def __init__(self, file: StoreFile, own: OwnStore | None) -> None:
        self.file = file
        self.own = own  # the own store (its lock guards the file), or None when adopted
        self.lock = threading.Lock()
        self.failed_until = 0.0
        self.label = file.path.name
        self.reported = False

    @contextmanager
    def locked(self) -> Iterator[bool]:
        if self.own is not None:
            with self.own.locked() as held:
                # The own file may have been replaced (set aside, released) meanwhile.
                yield held and self.own.file is self.file
        else:
            with self.lock:
                yield True


class _Piece:
    """Records of one lane sent together, and the chunk each of them belongs to."""

    __slots__ = ("created_ms", "owners", "records")

    def __init__(self, records: list[bytes], owners: list[int], created_ms: int) -> None:
        self.records = records
        self.owners = owners
        self.created_ms = created_ms  # when the oldest of them was written

    def cut(self, start: int, end: int | None = None) -> _Piece:
        return _Piece(self.records[start:end], self.owners[start:end], self.created_ms)


class _Lane:
    """The chunks of one lane of one file, and the state of their current attempt."""

    __slots__ = (
        "attempts",
        "cache",
        "cached_bytes",
        "chunks",
        "credentials",
        "cursor",
        "error",
        "exporter",
        "first_attempt",
        "info",
        "invalid",
        "job",
        "more",
        "parked",
        "pending",
        "ready",
        "retry",
        "retry_at",
        "retry_gen",
        "sender",
        "since",
        "source",
    )

    def __init__(self, source: _Source, info: LaneInfo) -> None:
        self.source = source
        self.info = info
        self.exporter: Exporter | None = None
        self.credentials: Credentials | None = None  # matched with the lane's fingerprint
        self.invalid = False  # the lane cannot be delivered (unknown kind, bad URLs)
        self.parked: str | None = None  # why the lane stopped (its chunks stay on disk)
        self.cursor = 0  # chunks up to this id were taken
        self.more = source.own is None  # adopted files: read until empty
        self.pending = 0  # records written since the last read (own file)
        self.cache: deque[Chunk] = deque()  # the newest chunks, still in memory
        self.cached_bytes = 0
        self.since = INF  # when the first of the pending records was written
        # Chunks taken and not deleted yet: id -> (the chunk, records not resolved yet).
        self.chunks: dict[int, list[Any]] = {}
        self.job: _Job | None = None
        self.ready: deque[_Piece] = deque()  # the next piece, or halves of one found too large
        self.retry: _Piece | None = None
        self.retry_at = 0.0
        self.retry_gen = 0
        self.error: DeliveryError | None = None
        self.attempts = 0
        self.first_attempt = 0.0
        self.sender: _Sender | None = None

    @property
    def kind(self) -> str:
        return self.info.kind

    def idle(self) -> bool:
        """Nothing in flight, waiting or known to be left to read (parked lanes are idle)."""
        if self.job is not None:
            return False
        if self.parked:
            return True
        return self.retry is None and not self.ready and not self.more and self.pending <= 0

    def due(self, urgent: bool, urgent_gen: int, batch_size: int, flush_interval: float) -> float:
        if self.job is not None or self.parked:
            return INF
        if self.retry is not None:
            error = self.error
            if (urgent or urgent_gen > self.retry_gen) and (
                error is None or error.retry_after is None
            ):
                return -INF
            return self.retry_at
        if self.ready:
            return -INF
        if self.more or (self.pending > 0 and (urgent or self.pending >= batch_size)):
            return -INF
        if self.pending > 0:
            return self.since + flush_interval
        return INF


class _Notice:
    """Chunks the writer committed: what the drainer needs to send them without reading them."""

    __slots__ = ("chunks", "file", "lane", "when")

    def __init__(self, file: StoreFile, lane: int, chunks: list[Chunk], when: float) -> None:
        self.file = file
        self.lane = lane
        self.chunks = chunks
        self.when = when


class _Job:
    __slots__ = ("abandoned", "batch", "deadline", "lane", "outcome", "piece")

    def __init__(self, lane: _Lane, piece: _Piece, batch: Batch, deadline: float) -> None:
        self.lane = lane
        self.piece = piece
        self.batch = batch
        self.deadline = deadline
        self.outcome: Outcome | None = None
        self.abandoned = False


class _Sender:
    """The thread that runs one lane's exports, one at a time."""

    def __init__(self, drainer: Drainer, name: str) -> None:
        self.drainer = drainer
        self.jobs: deque[Any] = deque()
        self.wakeup = threading.Lock()
        self.wakeup.acquire()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def submit(self, job: Any) -> None:
        self.jobs.append(job)
        try:
            self.wakeup.release()
        except RuntimeError:
            pass

    def _run(self) -> None:
        _lifecycle.register_sender_thread()
        try:
            while True:
                if not self.jobs:
                    self.wakeup.acquire()
                    continue
                job = self.jobs.popleft()
                if job is _STOP:
                    return
                self.drainer._export(job)
                if job.abandoned:
                    return
        finally:
            _lifecycle.unregister_sender_thread()


class Waiter:
    __slots__ = ("done", "file", "ok", "target")

    def __init__(self, file: StoreFile | None, target: int) -> None:
        self.file = file
        self.target = target
        self.ok = False
        self.done = threading.Event()


def _part(piece: _Piece, bodies: list[bytes], batch: list[bytes]) -> _Piece:
    """The records of ``piece`` an outcome lists (the same objects the batch was made of)."""
    if bodies is batch or (
        len(bodies) == len(batch) and all(a is b for a, b in zip(bodies, batch, strict=True))
    ):
        return piece
    positions: dict[bytes, deque[int]] = {}
    for index, record in enumerate(piece.records):
        positions.setdefault(record, deque()).append(index)
    records, owners = [], []
    for body in bodies:
        found = positions.get(body)
        if found:
            index = found.popleft()
            records.append(piece.records[index])
            owners.append(piece.owners[index])
    return _Piece(records, owners, piece.created_ms)


class Drainer:
    """Delivers spooled rows: this consumer's own file and files adopted from processes that are
    gone. One thread schedules (reads, marks, deletes, decides retries); each lane's requests
    run on a sender thread of its own, so one slow endpoint never stalls another.

    ``standalone`` drainers (``mp-logbridge spool --drain``) have no file of their own, adopt
    every orphaned file one after the other, give a lane up (its rows stay on disk) when the
    retry policy does, and stop when nothing is left.
    """

    def __init__(
        self,
        directory: Path,
        *,
        own: OwnStore | None,
        endpoints: Endpoints | None,
        exporter: Exporter | None,
        credentials: list[Credentials],
        timeout: float,
        verify: bool | str,
        retry: RetryPolicy,
        batch_size: int,
        max_batch_bytes: int,
        flush_interval: float,
        stats: DeliveryStats,
        on_error: Callable[[BaseException, list[Any]], object] | None,
        writer_done: Callable[[], bool] = lambda: True,
        standalone: bool = False,
        name: str = "mp_logbridge-spool",
    ) -> None:
        self.directory = directory
        self.own = own
        self.endpoints = endpoints
        self.exporter = exporter
        self.credentials = credentials
        self.timeout = timeout
        self.verify = verify
        self.retry = retry
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        self.flush_interval = flush_interval
        self.stats = stats
        self.on_error = on_error
        self.writer_done = writer_done
        self.standalone = standalone
        self.name = name
        self.adopted_files = 0
        self._rng = random.Random()
        self._foreign: dict[Endpoints, Exporter] = {}
        self._reset()

    def _reset(self) -> None:
        self._notices: deque[_Notice] = deque()
        self._results: deque[_Job] = deque()
        self._wakeup = threading.Lock()
        self._wakeup.acquire()
        self._start_token = threading.Lock()
        self._thread: threading.Thread | None = None
        self._finished = threading.Event()
        self._sources: list[_Source] = []
        self._lanes: list[_Lane] = []
        self._adopted: _Source | None = None
        self._skipped: set[Path] = set()
        self._next_scan = 0.0
        self._waiters: list[Waiter] = []
        self._new_waiters: deque[Waiter] = deque()
        self._urgent_gen = 0
        self._closing = False
        self._close_deadline = INF
        self._outage: tuple[float, str] | None = None
        self._deletes: list[tuple[_Lane, list[Chunk]]] = []
        self._asleep = False
        self._wake_on_notice = True
        self._noticed = 0
        self._pid = os.getpid()

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        """Start the thread (once per process; not while the interpreter exits)."""
        if self._pid != os.getpid():
            self.reinit_after_fork()
        if self._thread is not None or self._finished.is_set() or _lifecycle.exiting():
            return
        if not self._start_token.acquire(blocking=False):
            return
        try:
            if self._thread is not None:
                return
            thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread = thread
            try:
                thread.start()
            except RuntimeError:  # the interpreter is exiting: rows stay for the next process
                self._thread = None
        finally:
            self._start_token.release()

    def running(self) -> bool:
        thread = self._thread
        return thread is not None and self._pid == os.getpid() and not self._finished.is_set()

    def notice(self, file: StoreFile, lane: int, chunks: list[Chunk]) -> None:
        """The writer committed ``chunks`` to ``lane`` of the own file (any thread; takes no
        lock)."""
        self._notices.append(_Notice(file, lane, chunks, time.monotonic()))

    def wake_for(self, count: int) -> None:
        """After :meth:`notice` (outside the writer's lock): start or wake the drainer if the
        new rows need it now."""
        if self._thread is None:
            self.start()
            return
        self._noticed += count
        if self._asleep and (self._wake_on_notice or self._noticed >= self.batch_size):
            self._wake()

    def learn(self, credentials: Credentials) -> None:
        """Credentials seen by the writer (per-call ``/import`` credentials)."""
        if credentials not in self.credentials:
            self.credentials.append(credentials)

    def add_waiter(self, waiter: Waiter) -> None:
        self._new_waiters.append(waiter)
        self.start()
        self._wake()

    def begin_close(self, deadline: float) -> None:
        """Deliver what can be delivered until ``deadline`` (``time.monotonic()``), then stop;
        what is left stays on disk for the next process."""
        self._closing = True
        self._close_deadline = min(self._close_deadline, deadline)
        self._wake()

    def wait_closed(self, timeout: float) -> bool:
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        return self._finished.wait(max(0.0, timeout))

    def reinit_after_fork(self) -> None:
        """In a forked child: the parent's adopted files and threads are not this process's."""
        if self._pid == os.getpid():
            return
        for source in self._sources:
            if source.own is None:
                source.file.forget()
        for exporter in self._foreign.values():
            exporter.reinit_after_fork()
        closing = self._closing and not _lifecycle.exiting()
        self._reset()
        self._closing = closing
        self.adopted_files = 0

    def adopted_rows(self) -> tuple[int, int]:
        """Rows and bytes in adopted files now."""
        rows = nbytes = 0
        for source in list(self._sources):
            if source.own is None:
                rows += source.file.rows
                nbytes += source.file.bytes
        return rows, nbytes

    def _wake(self) -> None:
        try:
            self._wakeup.release()
        except RuntimeError:
            pass

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        _lifecycle.register_sender_thread()
        try:
            self.run_here()
        finally:
            _lifecycle.unregister_sender_thread()

    def run_here(self) -> None:
        """Run the drainer on this thread until it is done (closed, or standalone and empty)."""
        try:
            while not self._step():
                pass
        finally:
            self._finish()

    def _step(self) -> bool:
        try:
            now = time.monotonic()
            self._take_notices(now)
            self._apply_results(now)
            while self._new_waiters:
                self._waiters.append(self._new_waiters.popleft())
                self._urgent_gen += 1
            closing = self._closing
            if now >= self._close_deadline:
                return True
            if not closing:
                self._adopt(now)
            self._dispatch(now, closing or bool(self._waiters))
            # Deletes and the next reads run while the batches just handed over are in flight.
            self._delete_finished()
            self._prefetch()
            self._check_overruns(now)
            self._retire_sources()
            self._resolve_waiters()
            self.stats.report()
            if closing and self._done_closing():
                return True
            if self.standalone and self._adopted is None and self._nothing_left(now):
                return True
            self._sleep(now)
        except Exception as exc:  # pragma: no cover - a bug: make it visible, keep going
            warn("mp_logbridge spool drainer error: %s: %s", type(exc).__name__, exc)
            time.sleep(0.1)
        return False

    def _done_closing(self) -> bool:
        """Closing ends once the worker committed everything and the own file's rows are
        delivered (or their lanes gave up); adopted files are not waited for beyond the
        requests in flight: they stay on disk for the next process."""
        if self._notices or not self.writer_done():
            return False
        return all(
            lane.job is None if lane.source.own is None else lane.idle() for lane in self._lanes
        )

    def _nothing_left(self, now: float) -> bool:
        if self._next_scan <= now:
            return False  # look once more for files to adopt
        return all(lane.idle() for lane in self._lanes)

    def _sleep(self, now: float) -> None:
        if self._notices or self._results or self._new_waiters:
            return
        closing = self._closing
        urgent = closing or bool(self._waiters)
        wake_at = INF if closing or self._adopted is not None else self._next_scan
        if closing and not self.writer_done():
            wake_at = now + 0.01  # the worker is committing its last batches: look again soon
        for lane in self._lanes:
            if lane.job is not None:
                wake_at = min(wake_at, lane.job.deadline + OVERRUN_GRACE)
            source = lane.source
            if closing and source.own is None:
                continue
            due = lane.due(urgent, self._urgent_gen, self.batch_size, self.flush_interval)
            if due != INF and source.failed_until > now:
                due = max(due, source.failed_until)
            wake_at = min(wake_at, due)
        wake_at = min(wake_at, self._close_deadline)
        # A notice needs to wake the drainer only when nothing is scheduled before its rows
        # would be due anyway, or when a batch's worth of rows has come.
        self._noticed = 0
        self._wake_on_notice = wake_at > now + self.flush_interval
        self._asleep = True
        try:
            if self._notices or self._results or self._new_waiters:
                return
            timeout = wake_at - time.monotonic()
            if timeout <= 0:
                return
            self._wakeup.acquire(timeout=-1 if wake_at == INF else timeout)
        finally:
            self._asleep = False

    def _finish(self) -> None:
        self._delete_finished()
        for job_lane in self._lanes:
            if job_lane.job is not None:
                job_lane.job.abandoned = True
            if job_lane.sender is not None:
                job_lane.sender.submit(_STOP)
        for source in list(self._sources):
            if source.own is None:
                self._release(source)
        for exporter in self._foreign.values():
            try:
                exporter.shutdown()
            except Exception:  # pragma: no cover
                pass
        own = self.own
        if own is not None and own.pid == os.getpid():
            with own.locked() as held:
                if held:
                    own.release()
        self._sources = [s for s in self._sources if s.own is not None]
        self._lanes = []
        for waiter in self._waiters + list(self._new_waiters):
            waiter.done.set()
        self._waiters = []
        self._new_waiters.clear()
        self.stats.report(force=True)
        self._finished.set()

    # ------------------------------------------------------------------ sources and lanes

    def _take_notices(self, now: float) -> None:
        own = self.own
        while self._notices:
            notice = self._notices.popleft()
            file, lane_id = notice.file, notice.lane
            if own is None or own.file is not file:
                continue  # the file was replaced since: its chunks went with it
            source = next((s for s in self._sources if s.file is file), None)
            if source is None:
                source = _Source(file, own)
                self._sources.append(source)
            lane = next(
                (item for item in self._lanes if item.source is source and item.info.id == lane_id),
                None,
            )
            if lane is None:
                info = file.lane(lane_id)
                if info is None:  # pragma: no cover - the writer made it on this object
                    continue
                lane = self._make_lane(source, info)
            if lane.pending <= 0:
                lane.since = notice.when
            for chunk in notice.chunks:
                lane.pending += chunk.count
                if lane.cached_bytes + chunk.size <= CACHE_BYTES:  # else read back when due
                    lane.cache.append(chunk)
                    lane.cached_bytes += chunk.size

    def _make_lane(self, source: _Source, info: LaneInfo) -> _Lane:
        lane = _Lane(source, info)
        endpoints = parse_endpoints(info.endpoints)
        if endpoints is None or info.kind not in KINDS:
            lane.invalid = True
        else:
            if endpoints == self.endpoints and self.exporter is not None:
                lane.exporter = self.exporter
            else:
                lane.exporter = self._foreign_exporter(endpoints)
            lane.credentials = self._match(info.cred, endpoints.import_)
            if info.kind == "import" and info.cred and lane.credentials is None:
                lane.parked = "credentials"
        self._lanes.append(lane)
        return lane

    def _foreign_exporter(self, endpoints: Endpoints) -> Exporter:
        exporter = self._foreign.get(endpoints)
        if exporter is None:
            transport = Transport(endpoints, timeout=self.timeout, verify=self.verify)
            exporter = self._foreign[endpoints] = HttpExporter(transport)
        return exporter

    def _match(self, cred: str, import_url: str) -> Credentials | None:
        if not cred:
            return None
        for credentials in list(self.credentials):
            if fingerprint(credentials, import_url) == cred:
                return credentials
        return None

    def _adopt(self, now: float) -> None:
        """Take over the oldest file of a process that is gone (one at a time)."""
        if self._adopted is not None or now < self._next_scan:
            return
        self._next_scan = now + (0.0 if self.standalone else ADOPT_INTERVAL)
        own = self.own
        own_path = own.file.path if own is not None and own.file is not None else None
        remove_stale_locks(self.directory)
        for path in list_files(self.directory):
            if path == own_path or path in self._skipped:
                continue
            if own is not None and any(s.file.path == path for s in self._sources):
                continue
            try:
                file = StoreFile.adopt(path)
            except SpoolCorrupt as exc:
                if own is not None:
                    own.corrupt += 1
                warn(
                    "mp_logbridge: spool file %s is corrupt (%s); moved aside to %s",
                    path,
                    exc,
                    exc.moved_to or "(deleted)",
                )
                continue
            except SpoolError as exc:
                self._skipped.add(path)
                warn("mp_logbridge: spool file %s cannot be delivered: %s", path, exc)
                continue
            if file is None:  # its process is alive
                continue
            if file.rows == 0:
                file.close(delete_if_empty=True)
                continue
            self._take_over(file)
            return
        if self.standalone:
            self._next_scan = INF  # nothing more to find

    def _take_over(self, file: StoreFile) -> None:
        source = _Source(file, None)
        self.adopted_files += 1
        try:
            strays = file.drop_strays()
            taken = file.taken_counts()
        except SpoolError as exc:
            warn("mp_logbridge: spool file %s cannot be read: %s", file.path, exc)
            self._skipped.add(file.path)
            file.close(delete_if_empty=False)
            return
        if strays:
            self._drop(
                "invalid",
                MessagesDropped("invalid", f"records of {file.path.name} name no destination"),
                [record for chunk in strays for record in _unreadable(chunk).records],
            )
        self._sources.append(source)
        self._adopted = source
        for info in file.lanes():
            self._make_lane(source, info)
        updates = taken.get("profile_update", 0) + taken.get("group_update", 0)
        note = (
            f"; {updates} profile/group update(s) were being sent when it stopped and are sent "
            "again ($add, $append and charges among them may apply twice)"
            if updates
            else ""
        )
        warn(
            "mp_logbridge: delivering %d record(s) left in the spool by process %s (%s)%s",
            file.rows,
            file.meta.get("pid", "?"),
            file.path.name,
            note,
        )

    def _retire_sources(self) -> None:
        """Adopted files whose lanes are all done are deleted (or released when rows stay);
        own files replaced since are forgotten."""
        for source in list(self._sources):
            lanes = [lane for lane in self._lanes if lane.source is source]
            if source.own is not None:
                if source.own.file is not source.file and all(item.job is None for item in lanes):
                    self._forget(source)
                continue
            if not all(lane.idle() for lane in lanes):
                continue
            if self._closing:
                continue  # released at the end
            parked = [lane for lane in lanes if lane.parked]
            if parked and source.file.rows:
                self._skipped.add(source.file.path)
                reasons = sorted({lane.parked or "" for lane in parked})
                warn(
                    "mp_logbridge: %d record(s) in %s are left in the spool (%s)",
                    source.file.rows,
                    source.file.path.name,
                    ", ".join(
                        "no matching /import credentials"
                        if reason == "credentials"
                        else reason.replace("_", " ")
                        for reason in reasons
                    ),
                )
            self._release(source)

    def _release(self, source: _Source) -> None:
        with source.locked():
            source.file.close(delete_if_empty=True)
        self._forget(source)

    def _forget(self, source: _Source) -> None:
        for lane in [lane for lane in self._lanes if lane.source is source]:
            if lane.sender is not None:
                lane.sender.submit(_STOP)
            self._lanes.remove(lane)
        if source in self._sources:
            self._sources.remove(source)
        if self._adopted is source:
            self._adopted = None

    def _failed(
        self, source: _Source, error: SpoolError, now: float, *, reading: bool = True
    ) -> None:
        """A file refused a read (its lanes wait a while) or a delete (a full disk: sending
        goes on, the rows stay on disk and are sent again by the next process)."""
        if isinstance(error, SpoolCorrupt):
            own = source.own
            if own is not None:
                with own.locked() as held:
                    if held:
                        own.set_aside(source.file, error)
            else:
                try:
                    source.file.conn.close()
                except Exception:
                    pass
                moved = set_aside(source.file.path)
                warn(
                    "mp_logbridge: spool file %s is corrupt (%s); moved aside to %s",
                    source.file.path,
                    error,
                    moved or "(deleted)",
                )
                try:
                    os.close(source.file.lock_fd)
                except OSError:
                    pass
            for lane in self._lanes:
                if lane.source is source and lane.job is not None:
                    lane.job.abandoned = True
                    lane.job = None
            self._forget(source)
            return
        if source.own is not None and source.own.file is not source.file:
            return  # the own file was replaced or released: nothing to report
        if reading:
            source.failed_until = now + REOPEN_AFTER
        if not source.reported:
            source.reported = True
            warn("mp_logbridge: spool file %s: %s (retrying later)", source.file.path, error)

    # ------------------------------------------------------------------ sending

    def _dispatch(self, now: float, urgent: bool) -> None:
        closing = self._closing
        for lane in list(self._lanes):
            if lane.source.failed_until > now or lane not in self._lanes:
                continue
            if closing and lane.source.own is None:
                continue  # adopted chunks wait for the next process rather than delay an exit
            due = lane.due(urgent, self._urgent_gen, self.batch_size, self.flush_interval)
            if due > now:
                continue
            piece = self._take(lane, now)
            if piece is None or not piece.records:
                continue
            if lane.invalid or lane.exporter is None:
                self._resolve(lane, None, [("invalid", _invalid(lane), piece)])
                continue
            kind, credentials = lane.kind, lane.credentials
            if kind == "event":
                routed, kind, credentials = self._route(lane, piece)
                if routed is None:
                    continue
                piece = routed
            batch = Batch(kind, piece.records, credentials)
            job = _Job(lane, piece, batch, time.monotonic() + lane.exporter.timeout)
            lane.job = job
            self._submit(lane, job)

    def _take(self, lane: _Lane, now: float) -> _Piece | None:
        """The lane's next piece: the one to retry, a half or a prefetched piece, or chunks
        taken now."""
        if lane.retry is not None:
            again, lane.retry = lane.retry, None
            return again
        piece = lane.ready.popleft() if lane.ready else self._read(lane, now)
        lane.attempts, lane.first_attempt, lane.error = 0, now, None
        return piece

    def _read(self, lane: _Lane, now: float) -> _Piece | None:
        """The lane's next chunks, recorded as taken: just committed ones still in memory, else
        read back from the file."""
        chunks = self._from_cache(lane, now) if lane.cache else []
        more = False
        if not chunks:
            source = lane.source
            try:
                with source.locked() as held:
                    if not held:
                        return None
                    chunks, more = source.file.take(
                        lane.info.id, lane.cursor, self.batch_size, self.max_batch_bytes
                    )
            except SpoolError as exc:
                self._failed(source, exc, now)
                return None
            lane.more = more if source.own is None else False
            if not more:
                lane.pending = 0
        if not chunks:
            lane.pending = 0
            lane.since = INF
            return None
        lane.cursor = chunks[-1].id
        count = sum(chunk.count for chunk in chunks)
        if lane.source.own is not None:
            lane.pending = max(1 if more else 0, lane.pending - count)
        if lane.pending <= 0:
            lane.since = INF
        records: list[bytes] = []
        owners: list[int] = []
        bad = []
        for chunk in chunks:
            lane.chunks[chunk.id] = [chunk, chunk.count]
            if chunk.records is None:
                bad.append(chunk)
                continue
            records.extend(chunk.records)
            owners.extend([chunk.id] * chunk.count)
        if bad:
            problem = InvalidMessageError("message", "a spooled chunk cannot be read back")
            for chunk in bad:
                self._resolve(lane, None, [("invalid", problem, _unreadable(chunk))])
        return _Piece(records, owners, chunks[0].created_ms)

    def _from_cache(self, lane: _Lane, now: float) -> list[Chunk]:
        cache = lane.cache
        cursor = lane.cursor
        while cache and cache[0].id <= cursor:  # read from the file meanwhile
            lane.cached_bytes -= cache.popleft().size
        if not cache or cache[0].id <= cursor:
            return []
        chunks: list[Chunk] = []
        records = 0
        total = 2
        while cache:
            chunk = cache[0]
            if chunks and (
                records + chunk.count > self.batch_size
                or total + chunk.size + 1 > self.max_batch_bytes
            ):
                break
            chunks.append(cache.popleft())
            lane.cached_bytes -= chunk.size
            records += chunk.count
            total += chunk.size + 1
        source = lane.source
        try:
            with source.locked() as held:
                # Every chunk between the cursor and the last cached one must be among them
                # (none only on disk, none pushed out by a full spool meanwhile).
                ok = held and source.file.mark_taken(
                    lane.info.id, cursor + 1, chunks[-1].id, len(chunks)
                )
        except SpoolError as exc:
            self._failed(source, exc, now)
            return []
        if not ok:  # read the file instead
            cache.clear()
            lane.cached_bytes = 0
            return []
        return chunks

    def _prefetch(self) -> None:
        """Read the next piece of lanes that have one in flight and more waiting, so it leaves
        the moment the answer comes."""
        now = time.monotonic()
        closing = self._closing
        for lane in self._lanes:
            if lane.job is None or lane.ready or lane.retry is not None or lane.parked:
                continue
            source = lane.source
            if lane.invalid or source.failed_until > now or (closing and source.own is None):
                continue
            if lane.more or (source.own is not None and lane.pending >= self.batch_size):
                piece = self._read(lane, now)
                if piece is not None and piece.records:
                    lane.ready.append(piece)

    def _route(self, lane: _Lane, piece: _Piece) -> tuple[_Piece | None, str, Credentials | None]:
        """Events too old for ``/track`` go to ``/import`` (with credentials) or are dropped as
        ``expired``; a request never mixes the two."""
        wall = time.time() * 1000.0
        if wall - piece.created_ms <= CHECK_AGE_MS:
            return piece, "event", None
        cutoff = wall - TRACK_WINDOW_MS + 60_000  # a minute of margin for the request itself
        old = []
        for record in piece.records:
            moment = _event_time_ms(record)
            old.append(moment is not None and moment < cutoff)
        first = old[0]
        cut = next((i for i, flag in enumerate(old) if flag != first), len(old))
        if cut < len(old):
            lane.ready.appendleft(piece.cut(cut))
        piece = piece.cut(0, cut)
        if not first:
            return piece, "event", None
        if lane.credentials is not None:
            return piece, "import", lane.credentials
        if lane.info.cred:
            # Written with /import credentials this process does not hold: keep them for a
            # process (or a drain) that has them rather than drop them.
            lane.ready.appendleft(piece)
            lane.parked = "credentials"
            return None, "event", None
        expired = MessagesDropped(
            "expired",
            "older than the 5 days /track accepts, and no /import credentials are configured",
        )
        self._resolve(lane, None, [("expired", expired, piece)])
        return None, "event", None

    def _submit(self, lane: _Lane, job: _Job) -> None:
        sender = lane.sender
        if sender is None:
            sender = _Sender(self, f"{self.name}-{lane.kind}")
            try:
                sender.thread.start()
            except RuntimeError:  # exiting: export on this thread
                self._export(job)
                return
            lane.sender = sender
        sender.submit(job)

    def _export(self, job: _Job) -> None:
        exporter = job.lane.exporter
        assert exporter is not None
        try:
            outcome = exporter.export(job.batch, job.deadline)
        except Exception as exc:  # an exporter must not raise; never lose the rows
            failure = MixpanelConnectionError(f"export failed: {type(exc).__name__}: {exc}")
            outcome = classify(job.batch.records, failure)
        job.outcome = outcome
        if job.abandoned:
            return
        self._results.append(job)
        self._wake()

    def _check_overruns(self, now: float) -> None:
        real = time.monotonic()
        for lane in self._lanes:
            job = lane.job
            if job is None or real < job.deadline + OVERRUN_GRACE:
                continue
            job.abandoned = True
            lane.sender = None  # the stuck thread retires when (if) its export returns
            failure = MixpanelConnectionError(
                f"the export of {len(job.piece.records)} spooled record(s) did not finish in time",
                endpoint=lane.kind,
            )
            job.outcome = classify(job.batch.records, failure)
            self._apply(job, now)

    def _apply_results(self, now: float) -> None:
        while self._results:
            job = self._results.popleft()
            if job.abandoned or job.outcome is None or job.lane not in self._lanes:
                continue
            self._apply(job, now)

    def _apply(self, job: _Job, now: float) -> None:
        lane = job.lane
        outcome = job.outcome
        assert outcome is not None
        lane.job = None
        lane.attempts += 1
        piece, records = job.piece, job.batch.records
        delivered = _part(piece, outcome.delivered, records) if outcome.delivered else None
        drops: list[tuple[str, BaseException, _Piece]] = [
            (reason, error, _part(piece, items, records))
            for reason, items, error in outcome.dropped
        ]
        self._resolve(lane, delivered, drops)
        if outcome.split:
            halves = [_part(piece, half, records) for half in outcome.split]
            lane.ready.extendleft(reversed(halves))
        elif outcome.retry:
            again = _part(piece, outcome.retry, records)
            error = outcome.error or MixpanelConnectionError("export failed")
            deadline = self._close_deadline if self._closing else INF
            decision = next_attempt(
                self.retry,
                error,
                lane.attempts,
                lane.first_attempt,
                now,
                rng=self._rng.uniform,
                deadline=deadline,
            )
            lane.retry, lane.error = again, error
            if decision.retry_at is None:
                lane.parked = decision.reason or "retries_exhausted"
            else:
                self.stats.add_retry()
                lane.retry_at, lane.retry_gen = decision.retry_at, self._urgent_gen
                self._unreachable(now, error)

    def _resolve(
        self,
        lane: _Lane,
        delivered: _Piece | None,
        drops: list[tuple[str, BaseException, _Piece]],
    ) -> None:
        """Count records delivered or dropped for good; chunks with no record left to resolve
        are deleted (after the dispatch of this round)."""
        resolved: list[int] = []
        if delivered is not None and delivered.records:
            resolved.extend(delivered.owners)
            self.stats.add_sent(len(delivered.records))
            self._recovered(time.monotonic())
        for reason, error, piece in drops:
            resolved.extend(piece.owners)
            self._drop(reason, error, piece.records)
        done = []
        chunks = lane.chunks
        for chunk_id, count in Counter(resolved).items():
            entry = chunks.get(chunk_id)
            if entry is None:
                continue
            entry[1] -= count
            if entry[1] <= 0:
                done.append(entry[0])
                del chunks[chunk_id]
        if done:
            self._deletes.append((lane, done))

    def _delete_finished(self) -> None:
        """Delete the chunks resolved since the last step, one transaction per lane."""
        deletes, self._deletes = self._deletes, []
        for lane, chunks in deletes:
            source = lane.source
            if source not in self._sources:
                continue
            try:
                with source.locked() as held:
                    if held:
                        source.file.delete(lane.info.id, chunks)
            except SpoolError as exc:
                # The chunks stay on disk; this process never reads them again (its cursor is
                # past them), the next one sends them again (at-least-once).
                self._failed(source, exc, time.monotonic(), reading=False)

    def _drop(self, reason: str, error: BaseException, records: Sequence[bytes]) -> None:
        if not records:
            return
        self.stats.add_dropped(reason, len(records), f"{type(error).__name__}: {error}")
        if self.on_error is not None:
            _lifecycle.tell_on_error(
                self.on_error, error, lambda: [_report_form(record) for record in records]
            )

    def _unreachable(self, now: float, error: DeliveryError) -> None:
        if self._outage is None:
            self._outage = (now, str(error))
            warn("mp_logbridge: Mixpanel unreachable, spooled records wait on disk: %s", error)

    def _recovered(self, now: float) -> None:
        if self._outage is not None:
            since, cause = self._outage
            self._outage = None
            warn(
                "mp_logbridge: Mixpanel reachable again after %.1f s (it failed with: %s)",
                now - since,
                cause,
            )

    # ------------------------------------------------------------------ flush

    def _resolve_waiters(self) -> None:
        if not self._waiters:
            return
        own = self.own
        still = []
        for waiter in self._waiters:
            if self._own_done(own, waiter):
                waiter.ok = True
                waiter.done.set()
            else:
                still.append(waiter)
        self._waiters = still

    def _own_done(self, own: OwnStore | None, waiter: Waiter) -> bool:
        file = waiter.file
        if own is None or file is None or own.file is not file or file.rows == 0:
            return True
        lanes = [lane for lane in self._lanes if lane.source.file is file]
        if lanes and all(lane.idle() and not lane.parked for lane in lanes):
            # Every row written was taken and acknowledged (or dropped): rows still in the file
            # are ones whose delete failed (a full disk); they were delivered all the same.
            return True
        try:
            with own.locked() as held:
                if not held or own.file is not file:
                    return True
                first = file.first_id()
        except SpoolError:
            return False
        return first is None or first > waiter.target


def _unreadable(chunk: Chunk) -> _Piece:
    """A chunk as a piece, even when its records cannot be read back (reported as empty)."""
    records = chunk.records if chunk.records is not None else [b""] * chunk.count
    return _Piece(records, [chunk.id] * chunk.count, chunk.created_ms)


def _invalid(lane: _Lane) -> InvalidMessageError:
    return InvalidMessageError(
        "message",
        f"spooled for a destination that cannot be used (kind {lane.kind!r}, "
        f"URLs {lane.info.endpoints[:200]!r})",
    )


def run_drain(drainer: Drainer, timeout: float | None) -> None:
    """Run a standalone drainer on this thread, bounded by ``timeout`` seconds."""
    if timeout is not None:
        drainer._close_deadline = time.monotonic() + timeout  # a deadline, not a close
    drainer.run_here()

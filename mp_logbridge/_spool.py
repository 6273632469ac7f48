"""The durable spool: records reach disk before they are sent, and leave it once acknowledged.

How it plugs into the delivery core (``_worker.py``, ``_export.py``)::

    send() ─► BatchWorker (memory, lock-free put)
                 │  a batch per lane, at most every COMMIT_INTERVAL
                 ▼
              SpoolWriter.export ─► one SQLite transaction ─► Outcome(stored=...)
                                                  │ rows on disk (this process's own file)
                                                  ▼
              Drainer thread: oldest rows first per lane ─► sender thread per lane
                 ─► HttpExporter.export ─► delete what Mixpanel acknowledged or refused for good

* The caller's path does not change: ``send`` still only appends to the worker's queue. The
  worker's ``flush_interval`` becomes the **commit window** (``COMMIT_INTERVAL``, 50 ms): a
  ``kill -9`` loses at most what was captured during the last window. ``durability="call"``
  writes each record before ``send`` returns instead (one SQLite commit: about 25 µs a call,
  median, on the benchmark machine).
* Retries use the one retry decision (:func:`~mp_logbridge._retry.next_attempt`) with the
  consumer's backoff, but spooled records are not dropped when attempts run out: they wait on
  disk (an outage may outlast any memory bound). They leave the spool when delivered, refused
  for good by the server, pushed out by ``max_spool_bytes`` (``spool_full``, oldest first) or
  too old for ``/track`` (sent to ``/import`` when credentials are configured, else ``expired``).
* Each consumer of each process writes its own file, locked with ``flock`` for its life; a
  process adopts the files of processes that are gone (checked at start and every
  ``ADOPT_INTERVAL``) and delivers them, oldest file first, next to its own traffic.
* Delivery is at least once. Events carry a ``$insert_id`` fixed before the first write, so
  Mixpanel de-duplicates a record sent twice. Profile and group updates are not de-duplicated:
  a batch is marked as taken before it is sent, so a crash sends again at most the batch that
  was in flight per lane (``$add``, ``$append`` and ``track_charge`` may then apply twice).
* A disk that refuses (full, read-only) sends the worker's batches from memory instead, with
  one warning (``spool_fallback`` counts them); a corrupt file is set aside as ``*.corrupt``,
  reported once, and a new one started.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _lifecycle
from ._diagnostics import DeliveryStats
from ._errors import ConfigurationError, MessagesDropped
from ._export import Batch, Exporter, Outcome
from ._records import encode_message
from ._retry import RetryPolicy
from ._spool_drain import Drainer, Waiter, fingerprint
from ._spool_store import (
    Chunk,
    OwnStore,
    SpoolCorrupt,
    SpoolError,
    StoreFile,
    endpoints_json,
)
from ._transport import Credentials, Endpoints

__all__ = [
    "COMMIT_INTERVAL",
    "DEFAULT_MAX_SPOOL_BYTES",
    "DURABILITY_MODES",
    "Spool",
    "SpoolWriter",
    "resolve_spool_options",
]

#: ``"batch"``: the worker commits what it captured every ``COMMIT_INTERVAL`` (or per batch);
#: ``"call"``: every ``send`` commits before it returns.
DURABILITY_MODES = ("batch", "call")
#: Default bound of one consumer's spool file.
DEFAULT_MAX_SPOOL_BYTES = 256 * 1024 * 1024
#: Seconds captured records may wait in memory before they are committed to the spool.
COMMIT_INTERVAL = 0.05

INF = float("inf")


def resolve_spool_options(
    spool: Any, durability: Any, max_spool_bytes: Any
) -> tuple[Path | None, str, int]:
    """Check the spool options (``spool=None`` reads ``MIXPANEL_SPOOL``; ``False`` turns it off).

    Raises:
        ConfigurationError: for a value of the wrong type or out of range.
    """
    if spool is None:
        spool = os.environ.get("MIXPANEL_SPOOL") or None
    if spool is False or spool is None:
        path = None
    elif isinstance(spool, (str, os.PathLike)) and str(os.fspath(spool)).strip():
        path = Path(os.fspath(spool)).expanduser()
    else:
        raise ConfigurationError(f"spool must be a directory path (or False), got {spool!r}")
    if durability not in DURABILITY_MODES:
        raise ConfigurationError(
            f"durability must be one of {', '.join(DURABILITY_MODES)}, got {durability!r}"
        )
    if (
        isinstance(max_spool_bytes, bool)
        or not isinstance(max_spool_bytes, int)
        or max_spool_bytes < 1
    ):
        raise ConfigurationError(
            f"max_spool_bytes must be a positive integer, got {max_spool_bytes!r}"
        )
    return path, durability, max_spool_bytes


# --------------------------------------------------------------------------- the writer


class SpoolWriter:
    """The exporter the background worker writes through when the spool is on: a batch is
    committed in one transaction and reported as ``stored``; when the disk refuses, the batch is
    sent from memory through the HTTP exporter instead (the worker then retries it as usual)."""

    def __init__(self, spool: Spool, fallback: Exporter) -> None:
        self.spool = spool
        self.fallback = fallback

    @property
    def timeout(self) -> float:
        """The HTTP exporter's deadline (a write is much shorter; a fallback send is not)."""
        return self.fallback.timeout

    def export(self, batch: Batch, deadline: float) -> Outcome:
        """Commit ``batch`` to the spool, or send it when the disk refuses."""
        if self.spool.write(batch.kind, batch.credentials, batch.records):
            return Outcome(stored=batch.records)
        return self.fallback.export(batch, deadline)

    def shutdown(self) -> None:
        """Nothing to release: the drainer owns the HTTP exporter and the files."""

    def reinit_after_fork(self) -> None:
        """In a forked child: forget the parent's file and HTTP session."""
        self.fallback.reinit_after_fork()
        self.spool.reinit_after_fork()

    def __repr__(self) -> str:
        return f"SpoolWriter({str(self.spool.directory)!r})"


# --------------------------------------------------------------------------- the composition


class Spool:
    """A background consumer's spool: its own file, the writer the worker exports to, and the
    drainer. Registered with the exit hooks like a worker: at exit, what the worker holds is
    committed and the drainer delivers until ``exit_timeout``; the rest waits on disk."""

    def __init__(
        self,
        directory: Path,
        *,
        durability: str,
        max_spool_bytes: int,
        endpoints: Endpoints,
        credentials: Credentials | None,
        exporter: Exporter,
        timeout: float,
        verify: bool | str,
        retry: RetryPolicy,
        batch_size: int,
        max_batch_bytes: int,
        flush_interval: float,
        flush_timeout: float,
        exit_timeout: float,
        stats: DeliveryStats,
        on_error: Callable[[BaseException, list[Any]], object] | None,
    ) -> None:
        self.directory = directory
        self.durability = durability
        self.flush_timeout = flush_timeout
        self.exit_timeout = exit_timeout
        self.endpoints = endpoints
        self._stats = stats
        self._on_error = on_error
        self._endpoints_json = endpoints_json(
            [endpoints.event, endpoints.profile_update, endpoints.group_update, endpoints.import_]
        )
        self._credentials = credentials
        self._own_cred = fingerprint(credentials, endpoints.import_)
        self._worker: Any = None
        self._drops_seen = stats.total_dropped()
        self.store = OwnStore(directory, max_spool_bytes)
        self.writer = SpoolWriter(self, exporter)
        # Spooled records are retried with the consumer's backoff for as long as they are kept:
        # their bounds are the disk and the age /track accepts, not a number of attempts.
        forever = dataclasses.replace(retry, max_attempts=sys.maxsize, max_elapsed=INF)
        self.drainer = Drainer(
            directory,
            own=self.store,
            endpoints=endpoints,
            exporter=exporter,
            credentials=[credentials] if credentials is not None else [],
            timeout=timeout,
            verify=verify,
            retry=forever,
            batch_size=batch_size,
            max_batch_bytes=max_batch_bytes,
            flush_interval=flush_interval,
            stats=stats,
            on_error=on_error,
            writer_done=self._writer_done,
        )
        _lifecycle.register(self)
        self.drainer.start()  # adopts what processes that are gone left behind

    def __repr__(self) -> str:
        return f"Spool({str(self.directory)!r}, durability={self.durability!r})"

    def attach(self, worker: Any, owner: object) -> None:
        """Bind the worker that writes through :attr:`writer`; with ``durability="call"``, its
        ``put`` commits each record before returning. The spool is closed when ``owner`` (the
        consumer) is collected."""
        self._worker = worker
        if self.durability == "call":
            worker.put = _call_put(self, worker, worker.put)
        finalizer = weakref.finalize(owner, _collected, weakref.ref(self))
        finalizer.atexit = False

    def _writer_done(self) -> bool:
        worker = self._worker
        return worker is None or not worker.running()

    # ------------------------------------------------------------------ writing

    def write(self, kind: str, credentials: Credentials | None, records: list[bytes]) -> bool:
        """Commit ``records`` of one lane in one transaction; ``False`` when the disk refused
        (the caller then delivers them from memory) or this thread is already writing."""
        store = self.store
        if store.pid != os.getpid():
            self.reinit_after_fork()
        if time.monotonic() < store.retry_at:
            store.fallback += len(records)
            return False
        if kind == "import" and credentials is not None:
            self.drainer.learn(credentials)
            cred = fingerprint(credentials, self.endpoints.import_)
        else:
            cred = self._own_cred
        evicted: list[Chunk] = []
        refused: list[bytes] = []
        stored: list[Chunk] = []
        written: StoreFile | None = None
        lane = 0
        with store.locked() as held:
            if not held:
                store.fallback += len(records)
                return False
            for _attempt in range(2):  # a corrupt file is set aside and a new one tried once
                current: StoreFile | None = None
                try:
                    current = store.open()
                    lane = current.lane_id(kind, self._endpoints_json, cred)
                    created_ms = int(time.time() * 1000)
                    evicted, refused, stored = current.append(
                        lane, created_ms, records, store.max_bytes
                    )
                    written = current
                    if stored:  # queued under the lock, so notices of a lane come in order
                        self.drainer.notice(written, lane, stored)
                    break
                except SpoolCorrupt as exc:
                    if current is not None:
                        store.set_aside(current, exc)
                    else:
                        store.refused(exc)
                        break
                except SpoolError as exc:
                    store.refused(exc)
                    break
            if written is not None:
                store.recovered()
        if written is None:
            store.fallback += len(records)
            return False
        if stored:
            self.drainer.wake_for(sum(chunk.count for chunk in stored))
        full = MessagesDropped(
            "spool_full", f"the spool is full ({store.max_bytes} bytes); oldest dropped"
        )
        if evicted:
            lost = [record for chunk in evicted for record in chunk.records or [b""] * chunk.count]
            self.drainer._drop("spool_full", full, lost)
        if refused:
            self.drainer._drop("spool_full", full, refused)
        return True

    # ------------------------------------------------------------------ worker protocol

    def running(self) -> bool:
        """Whether the drainer runs in this process."""
        return self.drainer.running()

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver everything sent before this call to Mixpanel (acknowledged, not just on disk),
        waiting at most ``timeout`` seconds. ``True`` when all of it was delivered and nothing
        was dropped since the previous flush; what is not delivered stays on disk."""
        if self.store.pid != os.getpid():
            self.reinit_after_fork()
        limit = _lifecycle.wait_limit(timeout, self.flush_timeout)
        deadline = time.monotonic() + limit
        worker = self._worker
        ok = bool(worker.flush(limit)) if worker is not None else True
        if _lifecycle.is_sender_thread() or _lifecycle.logging_lock_held():
            return False
        store = self.store
        current = store.file
        waiter = Waiter(current, current.last_id if current is not None else 0)
        if current is not None and current.rows:
            self.drainer.add_waiter(waiter)
            ok = waiter.done.wait(max(0.0, deadline - time.monotonic())) and waiter.ok and ok
        drops = self._stats.total_dropped()
        clean = drops == self._drops_seen
        self._drops_seen = drops
        return ok and clean

    def begin_close(self, deadline: float, *, at_exit: bool = False) -> None:
        """Stop accepting messages; commit what the worker holds and deliver until
        ``deadline``, without waiting here."""
        worker = self._worker
        if worker is not None:
            worker.begin_close(deadline, at_exit=at_exit)
        self.drainer.begin_close(deadline)
        if not self.drainer.running() and self.store.file is not None:
            self.drainer.start()

    def wait_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        worker = self._worker
        if worker is not None:
            worker.wait_closed(max(0.0, deadline - time.monotonic()))
        self.drainer.wait_closed(max(0.0, deadline - time.monotonic()) + 0.25)

    def close(self, timeout: float | None = None) -> None:
        """Commit what the worker holds, deliver what can be within ``timeout``, stop; what is
        not delivered stays on disk for the next process."""
        limit = _lifecycle.wait_limit(timeout, self.flush_timeout)
        worker = self._worker
        if _lifecycle.logging_lock_held() or _lifecycle.is_sender_thread():
            exit_timeout = worker.exit_timeout if worker is not None else self.exit_timeout
            self.begin_close(time.monotonic() + max(limit, exit_timeout))
            return
        deadline = time.monotonic() + limit
        if worker is not None:
            worker.close(limit)
        self.drainer.begin_close(deadline)
        self.drainer.wait_closed(max(0.0, deadline - time.monotonic()) + 0.25)
        self._stats.report(force=True)

    def reinit_after_fork(self) -> None:
        """In a forked child: a file of its own, no threads, no adopted files."""
        self.store.reinit_after_fork()
        self.drainer.reinit_after_fork()

    def stats(self) -> dict[str, Any]:
        """``spooled`` rows on disk (own file and adopted ones), ``spool_bytes``,
        ``spool_fallback`` (records sent from memory because the disk refused them),
        ``spool_corrupt`` (files set aside) and ``spool_adopted`` (files taken over)."""
        store = self.store
        if store.pid != os.getpid():
            self.reinit_after_fork()
        current = store.file
        rows, nbytes = self.drainer.adopted_rows()
        if current is not None:
            rows += current.rows
            nbytes += current.bytes
        return {
            "spooled": rows + store.left_behind,
            "spool_bytes": nbytes,
            "spool_fallback": store.fallback,
            "spool_corrupt": store.corrupt,
            "spool_adopted": self.drainer.adopted_files,
        }


def _collected(ref: weakref.ReferenceType[Spool]) -> None:
    """The consumer was collected: stop the drainer (what is left stays on disk)."""
    spool = ref()
    if spool is not None and spool.running():
        spool.begin_close(time.monotonic() + spool.exit_timeout)


def _call_put(spool: Spool, worker: Any, put: Callable[..., bool]) -> Callable[..., bool]:
    """``durability="call"``: the worker's ``put`` that commits each record before returning.

    A message that cannot be encoded, a disk that refuses, a closed worker or a write re-entered
    from a signal handler on a writing thread take the worker's own path (memory, counted)."""

    def put_durably(kind: str, message: Any, credentials: Credentials | None, size: int) -> bool:
        if worker.closed:
            return put(kind, message, credentials, size)
        if isinstance(message, bytes):
            payload = message
        else:
            try:
                payload = encode_message(message)
            except Exception:  # the worker encodes it again and counts the problem
                return put(kind, message, credentials, size)
        if spool.write(kind, credentials, [payload]):
            return True
        return put(kind, payload, credentials, len(payload))

    return put_durably

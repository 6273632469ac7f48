"""The durable spool's files: one SQLite database per consumer and process, locked by its owner.

A spool directory holds, for each consumer of each process that spools into it:

* ``<started-ms>-<pid>-<random>.sqlite3``: the records, one row per encoded record, in the order
  they were written (WAL mode, ``synchronous=NORMAL``: a committed row survives the death of the
  process; ``-wal`` and ``-shm`` files sit beside the database while it is open);
* the same name plus ``.lock``: held with ``flock(LOCK_EX)`` for as long as its process lives.
  A database whose lock can be taken belongs to nobody any more (its process is gone: a crash,
  a kill, a deploy) and is adopted by another process, which delivers it and deletes it;
* ``*.corrupt``: files set aside because they could not be read; they are never read again.

Liveness is the lock, never a guess from process ids (ids are reused, containers all run as
pid 1). Each process writes only its own file, so processes never contend for one writer lock.

This module stores, reads, marks and deletes rows; it starts no thread and knows nothing of HTTP.
Methods are not thread-safe: the caller serializes access to a file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._diagnostics import warn

__all__ = [
    "FORMAT",
    "ROW_OVERHEAD",
    "VERSION",
    "Chunk",
    "FileReport",
    "LaneInfo",
    "OwnStore",
    "SpoolCorrupt",
    "SpoolError",
    "SpoolUnavailable",
    "StoreFile",
    "inspect_file",
    "list_files",
    "remove_stale_locks",
]

#: What the ``meta`` table says a spool file is, and the version of its layout.
FORMAT = "mp_logbridge-spool"
VERSION = 1
#: Seconds before a disk that refused a write is tried again.
REOPEN_AFTER = 30.0
#: Bytes a chunk takes on disk beyond its records (row header, rowid, page slack), for the bound.
ROW_OVERHEAD = 24
_NEWLINE = b"\n"
SUFFIX = ".sqlite3"
LOCK_SUFFIX = ".lock"
CORRUPT_SUFFIX = ".corrupt"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)",
    # A lane is where rows go: the kind of message, the four ingestion URLs of the writer's
    # destination (so a spool written for another region or proxy is delivered there), and a
    # fingerprint of the /import credentials that go with them (never the secret itself).
    "CREATE TABLE IF NOT EXISTS lanes (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, "
    "endpoints TEXT NOT NULL, cred TEXT NOT NULL DEFAULT '', UNIQUE (kind, endpoints, cred))",
    # One row per committed batch of a lane (a "chunk"): ``count`` encoded records joined by
    # newlines (compact JSON never holds a raw newline; a record that does is a chunk of its
    # own). ``id`` only grows (given by the writer, never reused): readers keep their place by id.
    "CREATE TABLE IF NOT EXISTS records (id INTEGER PRIMARY KEY, lane INTEGER NOT NULL, "
    "created_ms INTEGER NOT NULL, count INTEGER NOT NULL, body BLOB NOT NULL)",
    # The chunks of a lane from ``first`` to ``last`` were taken for sending (one row per
    # request, not a mark on every chunk): chunks still covered when their process died may have
    # reached Mixpanel (they are sent again: at-least-once); taken chunks are never evicted.
    "CREATE TABLE IF NOT EXISTS taken (lane INTEGER NOT NULL, first INTEGER NOT NULL, "
    "last INTEGER NOT NULL)",
)


class SpoolError(Exception):
    """A spool file cannot be used; ``path`` names it."""

    def __init__(self, message: str, path: Path | str | None = None) -> None:
        super().__init__(message)
        self.path = path


class SpoolUnavailable(SpoolError):
    """The disk refuses: full, read-only, not a directory, an I/O error. Worth trying later."""


class SpoolCorrupt(SpoolError):
    """The file is not a readable spool file. ``moved_to`` is where it was set aside, if it was."""

    moved_to: Path | None = None


@dataclass(frozen=True)
class LaneInfo:
    """One lane of a file: ``kind``, the destination's URLs (JSON) and credentials fingerprint."""

    id: int
    kind: str
    endpoints: str
    cred: str


@dataclass(slots=True)
class Chunk:
    """One stored chunk: ``records`` (``None`` when the stored value cannot be read back into
    ``count`` records), when it was written, and its size on disk (without ``ROW_OVERHEAD``)."""

    id: int
    records: list[bytes] | None
    created_ms: int
    size: int
    count: int


def chunk_records(records: Sequence[bytes]) -> list[list[bytes]]:
    """Cut records into runs stored as one chunk each (a record holding a raw newline, which
    the library's encoder never makes, is a chunk of its own)."""
    runs: list[list[bytes]] = []
    current: list[bytes] = []
    for record in records:
        if _NEWLINE in record:
            if current:
                runs.append(current)
                current = []
            runs.append([record])
        else:
            current.append(record)
    if current:
        runs.append(current)
    return runs


def _is_corruption(exc: BaseException) -> bool:
    name = getattr(exc, "sqlite_errorname", None)
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
        return True
    text = str(exc).lower()
    return type(exc) is sqlite3.DatabaseError or "malformed" in text or "not a database" in text


def _failure(exc: BaseException, path: Path | None, doing: str) -> SpoolError:
    """The spool error for a failure of SQLite or of the file system."""
    cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    message = f"{doing} {path}: {cause}" if path is not None else f"{doing}: {cause}"
    if isinstance(exc, sqlite3.Error) and _is_corruption(exc):
        return SpoolCorrupt(message, path)
    return SpoolUnavailable(message, path)


def lock_path(path: Path) -> Path:
    """The lock file of a spool database."""
    return path.with_name(path.name + LOCK_SUFFIX)


def _take_lock(path: Path, *, create: bool) -> int | None:
    """An open descriptor holding ``flock(LOCK_EX)`` on ``path``; ``None`` when a live process
    holds it (or it vanished: another process finished with it)."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    # The previous holder may have deleted the lock file between our open and our flock: then
    # we hold a lock on a file nobody else can see. Only the file at ``path`` counts.
    try:
        here = os.stat(path)
    except FileNotFoundError:
        os.close(fd)
        return None
    mine = os.fstat(fd)
    if (here.st_ino, here.st_dev) != (mine.st_ino, mine.st_dev):
        os.close(fd)
        return None
    return fd


def _connect(path: Path, *, must_exist: bool, read_only: bool = False) -> sqlite3.Connection:
    if must_exist or read_only:
        mode = "ro" if read_only else "rw"
        target = f"{path.resolve().as_uri()}?mode={mode}"
        conn = sqlite3.connect(
            target, uri=True, isolation_level=None, check_same_thread=False, timeout=5.0
        )
    else:
        conn = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=5.0
        )
    return conn


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class StoreFile:
    """One open spool database, with its lock held (as owner or adopter)."""

    __slots__ = (
        "_lane_ids",
        "_lane_info",
        "bytes",
        "conn",
        "created",
        "last_id",
        "lock_fd",
        "meta",
        "path",
        "rows",
    )

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int) -> None:
        self.path = path
        self.conn = conn
        self.lock_fd = lock_fd
        self.rows = 0
        self.bytes = 0
        self.last_id = 0  # the highest id written through this object (or found at opening)
        self.created = False
        self.meta: dict[str, str] = {}
        self._lane_ids: dict[tuple[str, str, str], int] = {}
        self._lane_info: dict[int, LaneInfo] = {}

    def __repr__(self) -> str:
        return f"StoreFile({str(self.path)!r}, rows={self.rows})"

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(cls, directory: Path) -> StoreFile:
        """A new file of this process in ``directory`` (made if needed, private to the user).

        Raises:
            SpoolUnavailable: the directory or the file cannot be made or written.
        """
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            name = f"{int(time.time() * 1000):013d}-{os.getpid()}-{secrets.token_hex(3)}{SUFFIX}"
            path = directory / name
            fd = _take_lock(lock_path(path), create=True)
            if fd is None:  # pragma: no cover - a fresh random name
                raise SpoolUnavailable(f"cannot lock a new spool file in {directory}", directory)
        except OSError as exc:
            raise _failure(exc, directory, "cannot use the spool directory") from exc
        conn: sqlite3.Connection | None = None
        try:
            # Made here with owner-only permissions; SQLite gives -wal and -shm the same ones.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            conn = _connect(path, must_exist=True)
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            store = cls(path, conn, fd)
            store._configure()
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            meta = {
                "format": FORMAT,
                "version": str(VERSION),
                "pid": str(os.getpid()),
                "host": os.uname().nodename,
                "started_ms": str(int(time.time() * 1000)),
            }
            conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(meta.items()))
            conn.execute("COMMIT")
            store.meta = meta
            store.created = True
            return store
        except (OSError, sqlite3.Error) as exc:
            if conn is not None:
                conn.close()
            for suffix in ("", "-wal", "-shm"):
                _unlink(path.with_name(path.name + suffix))
            _unlink(lock_path(path))
            os.close(fd)
            raise _failure(exc, path, "cannot create spool file") from exc

    @classmethod
    def adopt(cls, path: Path) -> StoreFile | None:
        """Take over the file of a process that is gone; ``None`` when its owner is alive (or
        another process took it first).

        Raises:
            SpoolCorrupt: the file is not a readable spool file; it was set aside (``moved_to``).
            SpoolUnavailable: it cannot be opened (permissions, I/O, a newer layout): left as is.
        """
        try:
            fd = _take_lock(lock_path(path), create=True)
        except OSError as exc:
            raise _failure(exc, path, "cannot lock spool file") from exc
        if fd is None:
            return None
        if not path.exists():  # finished and deleted by another process
            _unlink(lock_path(path))
            os.close(fd)
            return None
        conn: sqlite3.Connection | None = None
        try:
            if path.stat().st_size == 0:  # its process died creating it: nothing to deliver
                for suffix in ("", "-wal", "-shm"):
                    _unlink(path.with_name(path.name + suffix))
                _unlink(lock_path(path))
                os.close(fd)
                return None
            conn = _connect(path, must_exist=True)
            store = cls(path, conn, fd)
            check = conn.execute("PRAGMA quick_check").fetchone()
            if not check or check[0] != "ok":
                raise SpoolCorrupt(f"spool file {path} fails its integrity check: {check}", path)
            store._read_meta()
            store._configure()
            store.count()
            store._cache_lanes()
            return store
        except SpoolUnavailable:
            if conn is not None:
                conn.close()
            os.close(fd)
            raise
        except (sqlite3.Error, SpoolCorrupt, OSError) as exc:
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            error = exc if isinstance(exc, SpoolError) else _failure(exc, path, "cannot read")
            if isinstance(error, SpoolCorrupt):
                error.moved_to = set_aside(path)
                _unlink(lock_path(path))
            os.close(fd)
            raise error from (None if exc is error else exc)

    def _configure(self) -> None:
        conn = self.conn
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()
        if not mode or str(mode[0]).lower() != "wal":
            raise SpoolUnavailable(f"cannot use WAL mode for {self.path}: {mode}", self.path)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA journal_size_limit=16777216")

    def _read_meta(self) -> None:
        try:
            rows = self.conn.execute("SELECT key, value FROM meta").fetchall()
        except sqlite3.OperationalError as exc:  # no such table: some other database
            raise SpoolCorrupt(f"{self.path} is not a spool file ({exc})", self.path) from exc
        self.meta = {str(key): str(value) for key, value in rows}
        if self.meta.get("format") != FORMAT:
            raise SpoolCorrupt(f"{self.path} is not a spool file (no format mark)", self.path)
        try:
            version = int(self.meta.get("version", "0"))
        except ValueError:
            raise SpoolCorrupt(f"{self.path} has an unreadable version", self.path) from None
        if version > VERSION:
            raise SpoolUnavailable(
                f"{self.path} was written by a newer mp_logbridge (layout {version}); left as is",
                self.path,
            )

    def count(self) -> None:
        """Recount records and bytes from the file."""
        row = self.conn.execute(
            "SELECT coalesce(sum(count), 0), coalesce(sum(length(body)), 0), count(*), "
            "coalesce(max(id), 0) FROM records"
        ).fetchone()
        self.rows = int(row[0])
        self.bytes = int(row[1]) + ROW_OVERHEAD * int(row[2])
        self.last_id = int(row[3])

    def _cache_lanes(self) -> None:
        for lane_id, kind, endpoints, cred in self.conn.execute(
            "SELECT id, kind, endpoints, cred FROM lanes"
        ):
            info = LaneInfo(int(lane_id), str(kind), str(endpoints), str(cred or ""))
            self._lane_info[info.id] = info
            self._lane_ids[(info.kind, info.endpoints, info.cred)] = info.id

    # ------------------------------------------------------------------ lanes

    def lane_id(self, kind: str, endpoints: str, cred: str) -> int:
        """The id of the lane for this destination, made on first use."""
        key = (kind, endpoints, cred)
        lane = self._lane_ids.get(key)
        if lane is not None:
            return lane
        try:
            self.conn.execute(
                "INSERT OR IGNORE INTO lanes (kind, endpoints, cred) VALUES (?, ?, ?)", key
            )
            found = self.conn.execute(
                "SELECT id FROM lanes WHERE kind = ? AND endpoints = ? AND cred = ?", key
            ).fetchone()
        except sqlite3.Error as exc:
            raise _failure(exc, self.path, "cannot write") from exc
        lane = int(found[0])
        self._lane_ids[key] = lane
        self._lane_info[lane] = LaneInfo(lane, kind, endpoints, cred)
        return lane

    def lane(self, lane_id: int) -> LaneInfo | None:
        """What a lane is for (``None``: not a lane of this file)."""
        return self._lane_info.get(lane_id)

    def lanes(self) -> list[LaneInfo]:
        """Every lane of the file."""
        return list(self._lane_info.values())

    def drop_strays(self) -> list[Chunk]:
        """Delete chunks that name no lane of the file (a damaged or hand-edited file)."""
        try:
            found = self.conn.execute(
                "SELECT id, body, created_ms, count FROM records "
                "WHERE lane NOT IN (SELECT id FROM lanes)"
            ).fetchall()
            if found:
                self._delete_ids([int(row[0]) for row in found])
        except sqlite3.Error as exc:
            raise _failure(exc, self.path, "cannot clean") from exc
        chunks = [_chunk(item) for item in found]
        self._forget(chunks)
        return chunks

    # ------------------------------------------------------------------ writing

    def append(
        self, lane: int, created_ms: int, bodies: Sequence[bytes], max_bytes: int
    ) -> tuple[list[Chunk], list[bytes], list[Chunk]]:
        """Store ``bodies`` (normally as one chunk) in one transaction, keeping the file under
        ``max_bytes``.

        Room is made by deleting the oldest chunks not taken for sending; when that is not
        enough (or one batch alone is larger than the bound) the oldest of ``bodies`` are
        refused.

        Returns:
            ``(evicted chunks, refused bodies, chunks stored)``.
        """
        keep = list(bodies)
        refused: list[bytes] = []
        size = sum(len(body) + 1 for body in keep) + ROW_OVERHEAD
        while keep and size > max_bytes:
            oldest = keep.pop(0)
            refused.append(oldest)
            size -= len(oldest) + 1
        evicted: list[Chunk] = []
        stored: list[Chunk] = []
        conn = self.conn
        runs = chunk_records(keep)
        if len(runs) == 1 and self.bytes + size <= max_bytes:
            # The common case (one chunk, room enough): one statement is one transaction.
            body = _NEWLINE.join(keep)
            chunk = Chunk(self.last_id + 1, keep, created_ms, len(body), len(keep))
            try:
                conn.execute(_INSERT, (chunk.id, lane, created_ms, chunk.count, body))
            except sqlite3.Error as exc:
                raise _failure(exc, self.path, "cannot write to") from exc
            self.last_id = chunk.id
            self.rows += chunk.count
            self.bytes += chunk.size + ROW_OVERHEAD
            return evicted, refused, [chunk]
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                need = self.bytes + size - max_bytes
                if need > 0 and keep:
                    evicted = self._evict(need)
                    freed = sum(chunk.size + ROW_OVERHEAD for chunk in evicted)
                    while keep and self.bytes - freed + size > max_bytes:
                        oldest = keep.pop(0)
                        refused.append(oldest)
                        size -= len(oldest) + 1
                # Ids are given here, always above every id this file ever held: SQLite would
                # reuse the ids of deleted rows, and readers keep their place by id.
                next_id = self.last_id + 1
                rows = []
                for run in chunk_records(keep):  # (keep may have lost its oldest)
                    body = _NEWLINE.join(run)
                    rows.append((next_id, lane, created_ms, len(run), body))
                    stored.append(Chunk(next_id, run, created_ms, len(body), len(run)))
                    next_id += 1
                if len(rows) == 1:
                    conn.execute(_INSERT, rows[0])
                elif rows:
                    conn.executemany(_INSERT, rows)
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        except sqlite3.Error as exc:
            raise _failure(exc, self.path, "cannot write to") from exc
        self._forget(evicted)
        if stored:
            self.last_id = stored[-1].id
            self.rows += len(keep)
            self.bytes += sum(chunk.size + ROW_OVERHEAD for chunk in stored)
        return evicted, refused, stored

    def _evict(self, need: int) -> list[Chunk]:
        """Delete the oldest chunks not taken for sending until ``need`` bytes are freed
        (inside the caller's transaction)."""
        taken = self.conn.execute("SELECT lane, first, last FROM taken").fetchall()
        evicted: list[Chunk] = []
        freed = 0
        after = 0
        while freed < need:
            found = self.conn.execute(
                "SELECT id, body, created_ms, count, lane FROM records WHERE id > ? "
                "ORDER BY id LIMIT 64",
                (after,),
            ).fetchall()
            if not found:
                break
            for item in found:
                after = item[0]
                if any(lane == item[4] and first <= after <= last for lane, first, last in taken):
                    continue
                chunk = _chunk(item[:4])
                evicted.append(chunk)
                freed += chunk.size + ROW_OVERHEAD
                if freed >= need:
                    break
        if evicted:
            self._delete_ids([chunk.id for chunk in evicted])
        return evicted

    # ------------------------------------------------------------------ reading

    def take(self, lane: int, after: int, limit: int, max_bytes: int) -> tuple[list[Chunk], bool]:
        """The next chunks of ``lane`` after id ``after``, as many as fit one request (at most
        ``limit`` records joined under ``max_bytes``; always at least one chunk), recorded as
        taken for sending; and whether more may follow."""
        window = limit  # chunks hold one record or more: never more chunks than records
        try:
            # Sizes first (a blob's length is in its row header), then only the bodies used.
            found = self.conn.execute(
                "SELECT id, count, length(body) FROM records WHERE lane = ? AND id > ? "
                "ORDER BY id LIMIT ?",
                (lane, after, window),
            ).fetchall()
            records = 0
            total = 2
            used = 0
            for _id, count, size in found:
                count = count if isinstance(count, int) else 1
                size = size if isinstance(size, int) else 0
                if used and (records + count > limit or total + size + 1 > max_bytes):
                    break
                used += 1
                records += count
                total += size + 1
            rows = (
                self.conn.execute(
                    "SELECT id, body, created_ms, count FROM records WHERE lane = ? "
                    "AND id BETWEEN ? AND ? ORDER BY id",
                    (lane, found[0][0], found[used - 1][0]),
                ).fetchall()
                if used
                else []
            )
        except sqlite3.Error as exc:
            raise _failure(exc, self.path, "cannot read") from exc
        chunks = [_chunk(item) for item in rows]
        if chunks:
            self._record_taken(lane, chunks[0].id, chunks[-1].id)
        return chunks, used < len(found) or len(found) >= window

    def _record_taken(self, lane: int, first: int, last: int) -> None:
        try:
            self.conn.execute(
                "INSERT INTO taken (lane, first, last) VALUES (?, ?, ?)", (lane, first, last)
            )
        except sqlite3.OperationalError:
            # A full disk: send them all the same. Unrecorded, they are not protected from
            # eviction and a crash report will not count them; delivery does not depend on it.
            pass
        except sqlite3.Error as exc:
            raise _failure(exc, self.path, "cannot write to") from exc

    def mark_taken(self, lane: int, first: int, last: int, chunks: int) -> bool:
        """Record chunks ``first``-``last`` of ``lane`` (``chunks`` of them, known to the caller)
        as taken for sending; ``False`` (nothing recorded) when some are not in the file."""
        try:
            found = self.conn.execute(
                "SELECT count(*) FROM records WHERE lane = ? AND id BETWEEN ? AND ?",
                (lane, first, last),
            ).fetchone()[0]
        except sqlite3.Error as exc:
            raise _failure(exc, self.path, "cannot read") from exc
        if found != chunks:
            return False
        self._record_taken(lane, first, last)
        return True

    def delete(self, lane: int, chunks: list[Chunk]) -> None:
        """Delete chunks of ``lane`` whose records were all delivered or dropped for good, in
        one transaction."""
        if not chunks:
            return
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                deleted = self._delete_ids([chunk.id for chunk in chunks])
                conn.execute(
                    "DELETE FROM taken WHERE lane = ? AND NOT EXISTS (SELECT 1 FROM records "
                    "WHERE records.lane = taken.lane AND records.id BETWEEN taken.first "
                    "AND taken.last)",
                    (lane,),
                )
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        except sqlite3.Error as exc:
            raise _failure(exc, self.path, "cannot delete from") from exc
        if deleted == len(chunks):
            self._forget(chunks)
        else:  # some were gone already: count again
            try:
                self.count()
            except sqlite3.Error as exc:
                raise _failure(exc, self.path, "cannot read") from exc

    def _delete_ids(self, ids: list[int]) -> int:
        if len(ids) == 1:
            return self.conn.execute("DELETE FROM records WHERE id = ?", (ids[0],)).rowcount
        cursor = self.conn.executemany("DELETE FROM records WHERE id = ?", [(i,) for i in ids])
        return cursor.rowcount

    def _forget(self, chunks: list[Chunk]) -> None:
        self.rows = max(0, self.rows - sum(chunk.count for chunk in chunks))
        self.bytes = max(
            0, self.bytes - sum(chunk.size for chunk in chunks) - ROW_OVERHEAD * len(chunks)
        )

    def first_id(self) -> int | None:
        """The id of the oldest row (``None`` when the file is empty)."""
        try:
            row = self.conn.execute("SELECT min(id) FROM records").fetchone()
        except sqlite3.Error as exc:
            raise _failure(exc, self.path, "cannot read") from exc
        return None if row is None or row[0] is None else int(row[0])

    def taken_counts(self) -> dict[str, int]:
        """Rows per kind that were taken for sending (by the process that wrote them)."""
        try:
            found = self.conn.execute(_TAKEN_BY_KIND).fetchall()
        except sqlite3.Error as exc:
            raise _failure(exc, self.path, "cannot read") from exc
        return {str(kind): int(count) for kind, count in found}

    def shrink(self) -> None:
        """Give the free pages of an emptied file back to the file system."""
        try:
            self.conn.execute("PRAGMA incremental_vacuum")
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass

    # ------------------------------------------------------------------ closing

    def close(self, *, delete_if_empty: bool) -> bool:
        """Close the file and give up the lock; delete it first when it holds no rows and
        ``delete_if_empty``. Returns whether it was deleted. Never raises."""
        deleted = False
        if delete_if_empty:
            try:
                self.count()
            except sqlite3.Error:
                delete_if_empty = False
        try:
            self.conn.close()  # checkpoints the WAL into the file, removes -wal and -shm
        except sqlite3.Error:
            pass
        if delete_if_empty and self.rows == 0:
            for suffix in ("", "-wal", "-shm"):
                _unlink(self.path.with_name(self.path.name + suffix))
            _unlink(lock_path(self.path))  # after the database: a lock file alone is harmless
            deleted = True
        try:
            os.close(self.lock_fd)
        except OSError:
            pass
        return deleted

    def forget(self) -> None:
        """In a forked child: let go of the parent's file without touching it. The descriptor
        copy is closed (the parent keeps its lock); the connection is never used or closed
        here, since SQLite connections must not cross a fork."""
        _inherited.append(self.conn)
        try:
            os.close(self.lock_fd)
        except OSError:
            pass


_INSERT = "INSERT INTO records (id, lane, created_ms, count, body) VALUES (?, ?, ?, ?, ?)"
_TAKEN_BY_KIND = (
    "SELECT lanes.kind, sum(records.count) FROM taken JOIN records ON records.lane = taken.lane "
    "AND records.id BETWEEN taken.first AND taken.last JOIN lanes ON lanes.id = taken.lane "
    "GROUP BY lanes.kind"
)
_TAKEN_BY_LANE = (
    "SELECT taken.lane, sum(records.count) FROM taken JOIN records ON records.lane = taken.lane "
    "AND records.id BETWEEN taken.first AND taken.last GROUP BY taken.lane"
)

# Connections inherited through a fork: kept referenced so the child never finalizes them.
_inherited: list[Any] = []


def set_aside(path: Path) -> Path | None:
    """Rename an unreadable file (and its WAL) so that it is never read again; returns the new
    name of the database (``None`` when it could not be moved and was deleted instead)."""
    moved: Path | None = path.with_name(path.name + CORRUPT_SUFFIX)
    for suffix in ("", "-wal"):
        source = path.with_name(path.name + suffix)
        if not source.exists():
            continue
        target = source.with_name(source.name + CORRUPT_SUFFIX)
        try:
            os.replace(source, target)
        except OSError:
            _unlink(source)  # cannot rename: never read it again either way
            if not suffix:
                moved = None
    _unlink(path.with_name(path.name + "-shm"))
    return moved


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def _chunk(item: Sequence[Any]) -> Chunk:
    """A chunk from a ``(id, body, created_ms, count)`` row, checked: its body must split into
    ``count`` records, else ``records`` is ``None`` (a damaged or hand-edited row)."""
    row_id, body, created, count = item
    if type(body) is not bytes:
        if isinstance(body, str):  # stored as text by hand: its UTF-8
            body = body.encode("utf-8", "surrogatepass")
        elif isinstance(body, (bytearray, memoryview)):
            body = bytes(body)
    if not isinstance(body, bytes) or not isinstance(count, int) or count < 1:
        size = len(body) if isinstance(body, bytes) else 0
        return Chunk(int(row_id), None, _int(created), size, max(1, _int(count)))
    records = body.split(_NEWLINE) if count > 1 else [body]
    if len(records) != count:
        return Chunk(int(row_id), None, _int(created), len(body), count)
    return Chunk(
        row_id, records, created if type(created) is int else _int(created), len(body), count
    )


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def list_files(directory: Path) -> list[Path]:
    """The spool databases in ``directory``, least recently written first."""
    found = []
    try:
        for path in directory.glob("*" + SUFFIX):
            try:
                found.append((path.stat().st_mtime, path.name, path))
            except OSError:
                continue
    except OSError:
        return []
    return [path for _mtime, _name, path in sorted(found)]


def remove_stale_locks(directory: Path) -> None:
    """Delete lock files whose database is gone and whose owner is too (a process that died
    between deleting the two)."""
    try:
        candidates = list(directory.glob("*" + SUFFIX + LOCK_SUFFIX))
    except OSError:
        return
    for lock in candidates:
        database = lock.with_name(lock.name[: -len(LOCK_SUFFIX)])
        if database.exists():
            continue
        try:
            fd = _take_lock(lock, create=False)
        except OSError:
            continue
        if fd is not None:
            if not database.exists():
                _unlink(lock)
            os.close(fd)


# --------------------------------------------------------------------------- the own file


class OwnStore:
    """This consumer's file in this process: made on first write, shared by the writer (the
    worker's sender threads, and callers with ``durability="call"``) and the drainer."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self.inside = threading.local()  # ``active``: this thread is taking or holds ``lock``
        self.file: StoreFile | None = None
        self.generation = 0
        self.retry_at = 0.0  # after a refusal, the disk is tried again from then on
        self.failing: str | None = None
        self.fallback = 0  # records delivered from memory because the disk refused them
        self.corrupt = 0  # files set aside
        self.left_behind = 0  # rows left on disk when the file was released
        self.pid = os.getpid()

    @contextmanager
    def locked(self) -> Iterator[bool]:
        """Hold the lock; yields ``False`` without waiting when this thread is already on its
        way in or out (a signal handler or finalizer that sends while its thread writes).

        The thread's mark is set before the lock is taken and cleared after it is given back,
        so a signal landing between any two of those steps sees it and never waits for a lock
        its own thread holds."""
        inside = self.inside
        if getattr(inside, "active", False):
            yield False
            return
        inside.active = True
        try:
            with self.lock:
                yield True
        finally:
            inside.active = False

    def open(self) -> StoreFile:
        """The current file, made when there is none (caller holds the lock)."""
        current = self.file
        if current is None:
            current = self.file = StoreFile.create(self.directory)
            self.generation += 1
        return current

    def set_aside(self, store: StoreFile, error: SpoolError) -> None:
        """The current file turned out corrupt: move it aside; the next write starts a new one
        (caller holds the lock)."""
        if self.file is store:
            self.file = None
        try:
            store.conn.close()
        except Exception:
            pass
        moved = set_aside(store.path)
        try:
            os.close(store.lock_fd)
        except OSError:
            pass
        try:
            os.unlink(lock_path(store.path))
        except OSError:
            pass
        self.corrupt += 1
        warn(
            "mp_logbridge: spool file %s is corrupt (%s); moved aside to %s, starting a new one "
            "(what it held is lost)",
            store.path,
            error,
            moved or "(deleted)",
        )

    def refused(self, error: SpoolError) -> None:
        """The disk refused: deliver from memory for a while (caller holds the lock)."""
        self.retry_at = time.monotonic() + REOPEN_AFTER
        if self.failing is None:
            warn(
                "mp_logbridge: the spool at %s cannot be written (%s); delivering from memory "
                "until it can (records held in memory are lost if the process dies)",
                self.directory,
                error,
            )
        self.failing = str(error)
        current = self.file
        if current is not None and isinstance(error, SpoolUnavailable) and current.rows == 0:
            # Nothing of ours in it: give it up, so a read-only or full disk is tried afresh.
            current.close(delete_if_empty=True)
            self.file = None

    def recovered(self) -> None:
        if self.failing is not None:
            warn("mp_logbridge: the spool at %s is written again", self.directory)
            self.failing = None

    def release(self) -> None:
        """Close the file and give up its lock (deleted when empty); caller holds the lock."""
        current, self.file = self.file, None
        if current is not None:
            rows = current.rows
            if not current.close(delete_if_empty=True):
                self.left_behind += rows

    def reinit_after_fork(self) -> None:
        """In a forked child: the parent's file stays the parent's; this process makes its own."""
        if self.pid == os.getpid():
            return
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.inside = threading.local()
        current, self.file = self.file, None
        if current is not None:
            current.forget()
        self.generation += 1
        self.fallback = self.corrupt = self.left_behind = 0
        self.retry_at = 0.0
        self.failing = None


# --------------------------------------------------------------------------- reports


@dataclass
class LaneReport:
    """What one lane of a file holds."""

    kind: str
    url: str
    records: int
    bytes: int
    oldest_ms: int | None
    taken: int
    credentials: bool


@dataclass
class FileReport:
    """What one spool file holds, and whether a live process owns it."""

    path: Path
    state: str  # "live", "orphaned", "corrupt", "unreadable"
    pid: int | None = None
    records: int = 0
    bytes: int = 0
    file_bytes: int = 0
    oldest_ms: int | None = None
    lanes: list[LaneReport] = field(default_factory=list)
    problem: str | None = None


def _owner_alive(path: Path) -> bool:
    """Whether a process holds the file's lock (checked without creating anything)."""
    try:
        fd = os.open(lock_path(path), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: treat as owned, never disturb it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def inspect_file(path: Path, url_of: Any) -> FileReport:
    """Read what a spool file holds without changing it (``url_of(kind, endpoints_json)`` shows
    a lane's destination)."""
    size = 0
    for suffix in ("", "-wal"):
        try:
            size += path.with_name(path.name + suffix).stat().st_size
        except OSError:
            pass
    report = FileReport(path, "live" if _owner_alive(path) else "orphaned", file_bytes=size)
    conn: sqlite3.Connection | None = None
    try:
        if size == 0:
            return report
        conn = _connect(path, must_exist=True, read_only=True)
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format") != FORMAT:
            raise SpoolCorrupt("not a spool file", path)
        pid = meta.get("pid")
        report.pid = int(pid) if pid and str(pid).isdigit() else None
        lanes = {
            int(lane): (str(kind), str(endpoints), str(cred or ""))
            for lane, kind, endpoints, cred in conn.execute(
                "SELECT id, kind, endpoints, cred FROM lanes"
            )
        }
        taken_by_lane = {int(lane): int(n) for lane, n in conn.execute(_TAKEN_BY_LANE)}
        for lane, count, nbytes, oldest in conn.execute(
            "SELECT lane, sum(count), coalesce(sum(length(body)), 0), min(created_ms) "
            "FROM records GROUP BY lane ORDER BY min(id)"
        ):
            kind, endpoints, cred = lanes.get(int(lane), ("?", "", ""))
            report.lanes.append(
                LaneReport(
                    kind,
                    url_of(kind, endpoints),
                    int(count),
                    int(nbytes),
                    int(oldest) if oldest is not None else None,
                    taken_by_lane.get(int(lane), 0),
                    bool(cred),
                )
            )
        report.records = sum(lane.records for lane in report.lanes)
        report.bytes = sum(lane.bytes for lane in report.lanes)
        oldest_values = [lane.oldest_ms for lane in report.lanes if lane.oldest_ms is not None]
        report.oldest_ms = min(oldest_values) if oldest_values else None
    except (sqlite3.Error, SpoolCorrupt, OSError, ValueError) as exc:
        corrupt = isinstance(exc, SpoolCorrupt) or (
            isinstance(exc, sqlite3.Error) and _is_corruption(exc)
        )
        report.state = "corrupt" if corrupt else "unreadable"
        report.problem = str(exc)
    finally:
        if conn is not None:
            conn.close()
    return report


def endpoints_json(urls: Sequence[str]) -> str:
    """How a destination's four URLs are stored."""
    return json.dumps(list(urls), separators=(",", ":"))

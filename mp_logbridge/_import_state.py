"""The progress of ``mp-logbridge import`` kept between runs, and when it may be trusted.

A progress file belongs to one *destination*: the ``/import`` URL, who the credentials say the
sender is (service-account user and project id, or a keyed fingerprint of a project API secret;
never a secret), the project token and the tag name — everything that changes what is sent or
where. It lives in ``$XDG_STATE_HOME/mp-logbridge/import/`` (``~/.local/state`` by default), named
after the destination and the set of files, unless ``--state`` names it.

For each regular file it keeps the file's identity (device, inode, size, modification time),
the entries that are done (accepted by the server, or blank) and, for each segment of
:data:`SEGMENT_ENTRIES` entries, a digest of the positions and contents of its done entries. A
later run reads the file first and trusts an entry as done only if its segment's digest is the
same on what it reads now; so a fixed or added line does not disturb what was imported, while a
changed, moved or removed one makes its segment's entries be sent again (``$insert_id`` makes
that harmless). Records refused by the server or by the local checks are never done.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ._import_input import Entry, Identity
from ._transport import Credentials, ServiceAccount

__all__ = [
    "SEGMENT_ENTRIES",
    "Destination",
    "ProgressFile",
    "Ranges",
    "Scan",
    "SegmentDigests",
    "SourceProgress",
    "SourceRecord",
    "default_progress_path",
    "destination_of",
    "scan_entries",
    "segment_of",
]

#: Entries per content digest: a change re-sends at most the done entries of its segment.
SEGMENT_ENTRIES = 10_000
_VERSION = 2


class Ranges:
    """A set of positive integers kept as sorted, disjoint, inclusive ranges."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, pairs: Iterable[Sequence[int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for first, last in pairs:
            self.add(int(first), int(last))

    def add(self, first: int, last: int) -> None:
        """Add ``first..last``, merging with the ranges it touches."""
        if last < first:
            return
        lo = bisect.bisect_left(self._ends, first - 1)
        hi = bisect.bisect_right(self._starts, last + 1)
        if lo < hi:
            first = min(first, self._starts[lo])
            last = max(last, self._ends[hi - 1])
        self._starts[lo:hi] = [first]
        self._ends[lo:hi] = [last]

    def add_all(self, positions: Iterable[int]) -> None:
        """Add each position (runs of consecutive ones are added as one range)."""
        run: list[int] = []
        for position in sorted(positions):
            if run and position == run[1] + 1:
                run[1] = position
                continue
            if run:
                self.add(run[0], run[1])
            run = [position, position]
        if run:
            self.add(run[0], run[1])

    def __contains__(self, position: object) -> bool:
        if not isinstance(position, int):
            return False
        index = bisect.bisect_right(self._starts, position) - 1
        return index >= 0 and self._ends[index] >= position

    def __len__(self) -> int:
        return sum(last - first + 1 for first, last in zip(self._starts, self._ends, strict=True))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._ends, strict=True))

    def below(self, limit: int) -> Ranges:
        """The positions under ``limit``."""
        return Ranges((first, min(last, limit - 1)) for first, last in self if first < limit)

    def within(self, other: Ranges) -> Ranges:
        """The positions also in ``other``."""
        out = Ranges()
        for first, last in other:
            lo = bisect.bisect_right(self._ends, first - 1)
            for index in range(lo, len(self._starts)):
                if self._starts[index] > last:
                    break
                out.add(max(first, self._starts[index]), min(last, self._ends[index]))
        return out

    def pairs(self) -> list[list[int]]:
        """The ranges as ``[first, last]`` lists (for JSON)."""
        return [[first, last] for first, last in self]


def segment_of(position: int) -> int:
    """The segment an entry position belongs to (0 for the first :data:`SEGMENT_ENTRIES`)."""
    return (position - 1) // SEGMENT_ENTRIES


def _segment_span(segment: int) -> tuple[int, int]:
    return segment * SEGMENT_ENTRIES + 1, (segment + 1) * SEGMENT_ENTRIES


def _hash_done(pairs: Iterable[tuple[int, bytes]]) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    for position, digest in pairs:
        hasher.update(position.to_bytes(8, "big"))
        hasher.update(digest)
    return hasher.hexdigest()


class SegmentDigests:
    """Digests of a file's whole content, segment by segment (to notice it change mid-run)."""

    __slots__ = ("_hasher", "closed", "first", "last")

    def __init__(self) -> None:
        self.closed: list[tuple[int, int, str]] = []
        self._hasher = hashlib.blake2b(digest_size=16)
        self.first = 1
        self.last = 0

    def add(self, position: int, digest: bytes) -> None:
        """Account for the entry at ``position`` (positions come 1, 2, 3, ...)."""
        if self.last and (position - 1) % SEGMENT_ENTRIES == 0:
            self.closed.append((self.first, self.last, self._hasher.hexdigest()))
            self._hasher = hashlib.blake2b(digest_size=16)
            self.first = position
        self._hasher.update(digest)
        self.last = position

    def current(self) -> str:
        """The digest of the open segment so far (``first..last``)."""
        return self._hasher.hexdigest()

    def all(self) -> list[tuple[int, int, str]]:
        """Every segment, the open one included."""
        if not self.last:
            return list(self.closed)
        return [*self.closed, (self.first, self.last, self.current())]


@dataclass
class SourceRecord:
    """What the progress file says of one input file.

    ``digests`` maps a segment to the digest of its done entries (their positions and contents):
    the done entries of a segment are trusted only while that digest holds.
    """

    identity: Identity | None
    done: Ranges = field(default_factory=Ranges)
    digests: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The record as stored."""
        return {
            "identity": None if self.identity is None else vars(self.identity),
            "done": self.done.pairs(),
            "digests": {str(segment): digest for segment, digest in sorted(self.digests.items())},
        }

    @classmethod
    def from_json(cls, data: Any) -> SourceRecord:
        """Read a stored record (raises ``ValueError``/``TypeError``/``KeyError`` if malformed)."""
        identity = data.get("identity")
        return cls(
            identity=None if identity is None else Identity(**identity),
            done=Ranges(data["done"]),
            digests={int(segment): str(digest) for segment, digest in data["digests"].items()},
        )


@dataclass
class Scan:
    """A file read once before sending: its size in entries and what an earlier run did of it."""

    entries: int = 0
    nonblank: int = 0
    content: list[tuple[int, int, str]] = field(default_factory=list)  # whole-content digests
    skip: Ranges = field(default_factory=Ranges)  # done earlier, content unchanged
    skip_nonblank: int = 0
    verified: dict[int, str] = field(default_factory=dict)  # segment -> digest still true
    stale: int = 0  # entries done earlier whose content (or position) has changed since
    change: str | None = None  # "replaced" or "modified" since the earlier run


def scan_entries(
    items: Iterable[Entry], identity: Identity | None, earlier: SourceRecord | None
) -> Scan:
    """Read a file's entries and work out which of them an earlier run already did."""
    scan = Scan()
    content = SegmentDigests()
    done = earlier.done if earlier else Ranges()
    stored = earlier.digests if earlier else {}
    segment, hasher, done_nonblank = -1, hashlib.blake2b(digest_size=16), 0

    def close() -> None:
        if segment in stored and stored[segment] == hasher.hexdigest():
            scan.verified[segment] = stored[segment]
            scan.skip_nonblank += done_nonblank

    for entry in items:
        position = entry.position
        if segment_of(position) != segment:
            close()
            segment, hasher, done_nonblank = (
                segment_of(position),
                hashlib.blake2b(digest_size=16),
                0,
            )
        content.add(position, entry.digest)
        scan.entries = position
        if position in done:
            hasher.update(position.to_bytes(8, "big"))
            hasher.update(entry.digest)
            done_nonblank += not entry.blank
        scan.nonblank += not entry.blank
        if entry.final:
            break
    close()
    scan.content = content.all()
    scan.skip = done.within(Ranges(_segment_span(k) for k in sorted(scan.verified)))
    if earlier is not None:
        scan.stale = len(done) - len(scan.skip)
        before, now = earlier.identity, identity
        if before is not None and now is not None and before != now:
            same_file = (before.device, before.inode) == (now.device, now.inode)
            scan.change = "modified" if same_file else "replaced"
    return scan


class _OpenSegment:
    __slots__ = ("digests", "first", "outstanding", "read")

    def __init__(self, first: int) -> None:
        self.first = first
        self.digests: list[bytes] = []  # of each entry read, by position - first
        self.outstanding = 0  # batches of this segment not finished yet
        self.read = False  # every entry of it has been read


class SourceProgress:
    """One file's progress during a run: entries done, and digests a later run can check.

    Entries are fed in order as they are read (skipped ones too); batches never span segments.
    A segment's digest is worked out once it has been read and its batches have finished.
    """

    def __init__(self, identity: Identity | None, done: Ranges, digests: dict[int, str]) -> None:
        self.identity = identity
        self.done = Ranges(done)
        self.digests = dict(digests)
        self._open: dict[int, _OpenSegment] = {}

    def read(self, position: int, digest: bytes) -> None:
        """Account for the entry read at ``position``."""
        segment = segment_of(position)
        current = self._open.get(segment)
        if current is None:
            for earlier in self._open.values():
                earlier.read = True
            current = self._open[segment] = _OpenSegment(_segment_span(segment)[0])
        current.digests.append(digest)

    def begin(self, segment: int) -> None:
        """A batch of ``segment`` is on its way."""
        if segment in self._open:
            self._open[segment].outstanding += 1

    def finish(self, segment: int, done: Iterable[int]) -> None:
        """A batch of ``segment`` finished; ``done`` are the positions now done."""
        if segment not in self._open:
            return  # cut off by :meth:`truncate`
        self.done.add_all(done)
        self._open[segment].outstanding -= 1
        self._close_ready()

    def end(self) -> None:
        """Every entry has been read."""
        for segment in self._open.values():
            segment.read = True
        self._close_ready()

    def truncate(self, first: int) -> None:
        """Keep nothing from position ``first`` on (the file is not what it was)."""
        self.done = self.done.below(first)
        cut = segment_of(first)
        self.digests = {k: v for k, v in self.digests.items() if k < cut}
        self._open = {k: v for k, v in self._open.items() if k < cut}

    def _digest(self, segment: int, current: _OpenSegment) -> str | None:
        first, last = _segment_span(segment)
        last = min(last, first + len(current.digests) - 1)
        done = self.done.within(Ranges([(first, last)]))
        if not len(done):
            return None
        return _hash_done((p, current.digests[p - first]) for a, b in done for p in range(a, b + 1))

    def _close_ready(self) -> None:
        for segment, current in list(self._open.items()):
            if current.read and current.outstanding <= 0:
                self._settle(segment, current)
                del self._open[segment]

    def _settle(self, segment: int, current: _OpenSegment) -> None:
        digest = self._digest(segment, current)
        if digest is None:
            self.digests.pop(segment, None)
        else:
            self.digests[segment] = digest

    def record(self) -> SourceRecord:
        """What to store now (open segments are digested as far as they are done)."""
        for segment, current in self._open.items():
            self._settle(segment, current)
        return SourceRecord(self.identity, self.done, dict(self.digests))


@dataclass(frozen=True)
class Destination:
    """Where and as whom records are imported, and what shapes them (never holds a secret)."""

    key: str
    description: str


def _safe_url(url: str) -> str:
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def destination_of(
    import_url: str, credentials: Credentials | None, token: str | None, tag: str
) -> Destination:
    """The destination of an import: the URL, the credentials' identity, the token and the tag.

    A service account is known by its user name and project id (a new secret for the same account
    keeps the progress); a project API secret, which is all there is to know of its project, by a
    keyed fingerprint of it.
    """
    if isinstance(credentials, ServiceAccount):
        who = f"service account {credentials.username!r}, project {credentials.project_id}"
    elif credentials is not None:
        fingerprint = hashlib.blake2b(
            credentials.authorization().encode(), key=b"mp-logbridge import", digest_size=8
        ).hexdigest()
        who = f"project API secret {fingerprint}"
    else:
        who = "no credentials"
    token_digest = (
        hashlib.blake2b(token.encode(), key=b"mp-logbridge token", digest_size=8).hexdigest()
        if token
        else ""
    )
    key = hashlib.sha256(
        json.dumps([import_url, who, token_digest, tag]).encode("utf-8")
    ).hexdigest()
    description = f"{_safe_url(import_url)} as {who}, tag {tag!r}, " + (
        "with a token" if token else "without a token"
    )
    return Destination(key, description)


def default_progress_path(destination: Destination, source_keys: Iterable[str]) -> Path:
    """Where the progress of importing these files to this destination is kept by default."""
    base = os.environ.get("XDG_STATE_HOME")
    if not base and sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA")
    root = Path(base) if base else Path.home() / ".local" / "state"
    name = hashlib.sha256(
        "\0".join([destination.key, *sorted(source_keys)]).encode("utf-8")
    ).hexdigest()[:20]
    return root / "mp-logbridge" / "import" / f"{name}.json"


class ProgressFile:
    """The progress file of one run: loaded at the start, saved as batches complete."""

    def __init__(self, path: Path, destination: Destination) -> None:
        self.path = path
        self.destination = destination
        self.sources: dict[str, SourceRecord] = {}  # as loaded (files of other runs included)
        self.live: dict[str, SourceProgress] = {}  # files of this run
        self.saved_at: float | None = None  # when the loaded progress was saved
        self._last_save = 0.0

    def load(self) -> str | None:
        """Read the file if there is one; returns why its progress is not used, if it is not."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"cannot read {self.path} ({exc.strerror or exc}): its progress is not used"
        try:
            data = json.loads(text)
            if data.get("version") != _VERSION:
                return f"{self.path} was written by another version: its progress is not used"
            if data.get("destination") != self.destination.key:
                where = data.get("description", "another destination")
                return (
                    f"{self.path} holds the progress of an import to {where}; it is not used "
                    "here and will be replaced"
                )
            self.sources = {
                str(key): SourceRecord.from_json(value) for key, value in data["sources"].items()
            }
            self.saved_at = float(data.get("saved_at", 0)) or None
        except (ValueError, TypeError, KeyError, AttributeError):
            self.sources = {}
            return f"{self.path} is not a progress file this version can read: it is not used"
        return None

    def save(self, *, every: float = 0.0) -> None:
        """Write the file atomically (skipped if the last write is under ``every`` seconds old).

        Raises:
            OSError: it cannot be written.
        """
        now = time.monotonic()
        if every and now - self._last_save < every:
            return
        self._last_save = now
        data = {
            "version": _VERSION,
            "destination": self.destination.key,
            "description": self.destination.description,
            "saved_at": time.time(),
            "sources": {
                **{key: record.to_json() for key, record in self.sources.items()},
                **{key: live.record().to_json() for key, live in self.live.items()},
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(temp, "w", encoding="utf-8") as handle:
                json.dump(data, handle, separators=(",", ":"))
            os.replace(temp, self.path)
        finally:
            with contextlib.suppress(OSError):
                temp.unlink()

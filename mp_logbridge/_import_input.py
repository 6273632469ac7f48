"""Reading what ``mp-logbridge import`` is given: JSON lines or one JSON array, plain or gzipped.

A source is a file name or ``-`` for standard input. It is opened once per pass, its compression
(gzip, by its magic bytes, whatever its name) and its format (a first non-blank character ``[``
means one JSON array, anything else JSON lines) are recognised, and it is read as *entries*: the
lines of a JSON-lines file (blank ones included, so positions are line numbers) or the elements of
an array. Each entry carries a digest of its bytes, which the progress state compares on a later
run, and either its JSON value or the reason it cannot be used. A bad entry never stops the
source; only what makes the rest unreadable does (a truncated gzip stream, broken array syntax),
and then as a last entry saying so. Memory is bounded: an entry over :data:`MAX_ENTRY_BYTES` is
reported without being held.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import stat
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, cast

__all__ = [
    "MAX_ENTRY_BYTES",
    "READ_ERRORS",
    "STDIN",
    "Entry",
    "Identity",
    "Opened",
    "entries",
    "is_regular_file",
    "open_source",
]

#: The name that stands for standard input.
STDIN = "-"
#: Longest line (or array element) read; Mixpanel's records must be under 1 MB anyway.
MAX_ENTRY_BYTES = 16 * 1024 * 1024

_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"
_SPACE = b" \t\r\n"
_HEAD_LIMIT = 1 << 20  # bytes of leading whitespace looked through to tell the format
_NON_SPACE = re.compile(r"[^ \t\r\n]")
#: What reading a source can raise (an unreadable file, a broken compressed stream).
READ_ERRORS = (OSError, EOFError, zlib.error)


@dataclass(frozen=True)
class Identity:
    """What the file system says of a regular file: which file it is and when it changed."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, status: os.stat_result) -> Identity:
        """The identity in a ``stat`` result."""
        return cls(status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


class Entry:
    """One line of a JSON-lines source or one element of a JSON array.

    ``position`` counts entries from 1 (the line number for JSON lines), ``line`` is the line it
    starts on. ``problem`` says why it cannot be used; ``final`` marks a problem that ends the
    source (nothing after it can be read).
    """

    __slots__ = ("blank", "digest", "final", "line", "position", "problem", "value")

    def __init__(
        self,
        position: int,
        line: int,
        digest: bytes,
        *,
        value: Any = None,
        problem: str | None = None,
        blank: bool = False,
        final: bool = False,
    ) -> None:
        self.position = position
        self.line = line
        self.digest = digest
        self.value = value
        self.problem = problem
        self.blank = blank
        self.final = final


@dataclass
class Opened:
    """A source ready to be read: its decompressed bytes, format and file identity."""

    stream: IO[bytes]
    format: str  # "lines" or "array"
    gzipped: bool
    identity: Identity | None  # None for standard input, pipes and other non-regular files


def is_regular_file(name: str) -> bool:
    """Whether ``name`` is a regular file (one that can be read twice and resumed)."""
    if name == STDIN:
        return False
    try:
        return stat.S_ISREG(os.stat(name).st_mode)
    except OSError:
        return False


class _Rejoined(io.RawIOBase):
    """Bytes already read from a stream, then the rest of the stream."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        super().__init__()
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            size = min(len(view), len(self._head))
            view[:size] = self._head[:size]
            self._head = self._head[size:]
            return size
        read1 = getattr(self._rest, "read1", None)
        data = read1(len(view)) if read1 is not None else self._rest.read(len(view))
        view[: len(data)] = data
        return len(data)


def _read_head(stream: IO[bytes], size: int) -> bytes:
    head = b""
    while len(head) < size:
        chunk = stream.read(size - len(head))
        if not chunk:
            break
        head += chunk
    return head


def _leading_bytes(stream: IO[bytes]) -> bytes:
    """Bytes up to the first one that is not a byte-order mark or whitespace (or a limit)."""
    head = b""
    while len(head) < _HEAD_LIMIT:
        chunk = stream.read(65536)
        if not chunk:
            break
        head += chunk
        if head.removeprefix(_BOM).lstrip(_SPACE):
            break
    return head


@contextlib.contextmanager
def open_source(name: str) -> Iterator[Opened]:
    """Open ``name`` (``-`` for standard input) for reading its entries.

    Raises:
        OSError, EOFError, zlib.error: the source cannot be opened or its start cannot be read.
    """
    if name == STDIN:
        raw: IO[bytes] = sys.stdin.buffer
        identity = None
    else:
        raw = open(name, "rb")  # noqa: SIM115 - closed below
    try:
        if name != STDIN:
            status = os.fstat(raw.fileno())
            identity = Identity.of(status) if stat.S_ISREG(status.st_mode) else None
        magic = _read_head(raw, 2)
        stream: IO[bytes] = io.BufferedReader(_Rejoined(magic, raw), 1 << 16)
        gzipped = magic == _GZIP_MAGIC
        if gzipped:
            stream = cast(IO[bytes], gzip.GzipFile(fileobj=stream, mode="rb"))
        head = _leading_bytes(stream)
        kind = "array" if head.removeprefix(_BOM).lstrip(_SPACE)[:1] == b"[" else "lines"
        yield Opened(io.BufferedReader(_Rejoined(head, stream), 1 << 16), kind, gzipped, identity)
    finally:
        if name != STDIN:
            raw.close()


def entries(opened: Opened, *, parse: bool = True) -> Iterator[Entry]:
    """The entries of an opened source, in order (values decoded only when ``parse``)."""
    if opened.format == "array":
        return _ArrayReader(opened.stream).entries()
    return _line_entries(opened.stream, parse)


def _unreadable(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "cannot read further: the compressed data ends early"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot read further: {exc.strerror}"
    return f"cannot read further: {exc}"


def _decode(raw: bytes) -> tuple[Any, str | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON: {exc.msg} (column {exc.colno})"
    except RecursionError:
        return None, "not valid JSON: nested too deeply"


def _line_entries(stream: IO[bytes], parse: bool) -> Iterator[Entry]:
    number = 0
    while True:
        try:
            raw = stream.readline(MAX_ENTRY_BYTES + 1)
        except READ_ERRORS as exc:
            yield Entry(number + 1, number + 1, b"", problem=_unreadable(exc), final=True)
            return
        if not raw:
            return
        number += 1
        digest = hashlib.blake2b(raw, digest_size=16)
        if len(raw) > MAX_ENTRY_BYTES and not raw.endswith(b"\n"):
            size = len(raw)
            try:
                while not raw.endswith(b"\n"):  # pass over the rest of the line, unkept
                    raw = stream.readline(1 << 20)
                    if not raw:
                        break
                    digest.update(raw)
                    size += len(raw)
            except READ_ERRORS as exc:
                yield Entry(number, number, b"", problem=_unreadable(exc), final=True)
                return
            yield Entry(
                number,
                number,
                digest.digest(),
                problem=f"line of {size:,} bytes, over the {MAX_ENTRY_BYTES:,}-byte limit "
                "(Mixpanel takes records under 1 MB)",
            )
            continue
        if number == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        if not raw.strip():
            yield Entry(number, number, digest.digest(), blank=True)
            continue
        value, problem = _decode(raw) if parse else (None, None)
        yield Entry(number, number, digest.digest(), value=value, problem=problem)


class _ArrayReader:
    """The elements of one JSON array, read a piece at a time."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.text = codecs.getincrementaldecoder("utf-8-sig")()
        self.json = json.JSONDecoder()
        self.buffer = ""
        self.pos = 0
        self.line = 1
        self.eof = False

    def _fill(self, size: int = 1 << 16) -> bool:
        """Read more; ``False`` at the end of the stream."""
        if self.eof:
            return False
        data = self.stream.read(size)
        text = self.text.decode(data, final=not data)
        self.eof = not data
        self.buffer = self.buffer[self.pos :] + text
        self.pos = 0
        return bool(data)

    def _next_char(self) -> str:
        """The next character that is not whitespace ('' at the end), moved to."""
        while True:
            found = _NON_SPACE.search(self.buffer, self.pos)
            end = found.start() if found else len(self.buffer)
            self.line += self.buffer.count("\n", self.pos, end)
            self.pos = end
            if found:
                return self.buffer[end]
            if not self._fill():
                return ""

    def _element(self) -> tuple[Any, int]:
        """Decode the element at ``pos``; returns it and where it ends."""
        size = 1 << 16
        while True:
            try:
                value, end = self.json.raw_decode(self.buffer, self.pos)
                if end < len(self.buffer) or self.eof:
                    return value, end
            except json.JSONDecodeError as exc:
                # An error well before the end of what was read is real; near the end it may
                # only mean the element goes on in the next piece.
                cut = exc.pos >= len(self.buffer) - 16 or exc.msg.startswith("Unterminated")
                if self.eof or not cut:
                    raise
            if len(self.buffer) - self.pos > MAX_ENTRY_BYTES:
                raise _TooLarge
            self._fill(size)
            size = min(size * 2, 1 << 24)

    def entries(self) -> Iterator[Entry]:
        index = 0
        try:
            if self._next_char() != "[":
                return
            self.pos += 1
            while True:
                char = self._next_char()
                if char == "]":
                    self.pos += 1
                    if self._next_char():
                        yield self._final(index + 1, "text after the end of the JSON array")
                    return
                if index:
                    if char != ",":
                        yield self._final(
                            index + 1, f"not valid JSON: expected ',' or ']' after element {index}"
                        )
                        return
                    self.pos += 1
                    char = self._next_char()
                if not char:
                    yield self._final(index + 1, "the JSON array is not closed (the input ends)")
                    return
                index += 1
                start, line = self.pos, self.line
                try:
                    value, end = self._element()
                except json.JSONDecodeError as exc:
                    yield self._final(index, f"element {index}: not valid JSON: {exc.msg}")
                    return
                except RecursionError:
                    yield self._final(index, f"element {index}: not valid JSON: nested too deeply")
                    return
                except _TooLarge:
                    yield self._final(
                        index, f"element {index} is over the {MAX_ENTRY_BYTES:,}-byte limit"
                    )
                    return
                raw = self.buffer[start:end].encode("utf-8")
                self.line += self.buffer.count("\n", start, end)
                self.pos = end
                yield Entry(index, line, hashlib.blake2b(raw, digest_size=16).digest(), value=value)
        except UnicodeDecodeError as exc:
            yield self._final(
                index + 1,
                f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); the rest is not read",
            )
        except READ_ERRORS as exc:
            yield self._final(index + 1, _unreadable(exc))

    def _final(self, position: int, problem: str) -> Entry:
        return Entry(position, self.line, b"", problem=problem, final=True)


class _TooLarge(Exception):
    """An array element longer than :data:`MAX_ENTRY_BYTES`."""

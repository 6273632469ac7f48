"""Bulk import of historical events from JSON-lines files into ``/import``.

Each line is a Mixpanel event (``{"event": ..., "properties": {...}}``) or a JSON log line that
carries the tag (``{"message": ..., "created": ..., "mixpanel": {...}}``, as a JSON formatter or
structlog's ``JSONRenderer`` writes it). Lines are read in order, cut into batches of up to 2000
records (and under the request byte budget), and posted by a few worker threads with the same
retry rules as the background consumer; gzip is used.

Events without a ``$insert_id`` get one derived from their content, so importing the same file
twice cannot duplicate them. Progress is saved to a state file after every batch: an
interrupted run, started again with the same arguments, skips the lines already accepted.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ._consumers import Consumer
from ._context import BoundContext
from ._errors import InvalidMessageError, PartialImportError, RejectedError
from ._records import MAX_BATCH_RECORDS, MAX_REQUEST_BYTES, encode_message
from ._rules import check_record
from ._tags import DEFAULT_TAG, BridgeSpec, Capture, TagMessage, split_tag

__all__ = ["ImportOptions", "ImportSummary", "Importer", "Rejected"]

_TIME_KEYS = ("created", "timestamp", "time", "asctime", "@timestamp")
_MESSAGE_KEYS = ("message", "msg", "event")


@dataclass(frozen=True)
class Rejected:
    """A record that will not be imported, and where it came from."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class ImportSummary:
    """What an import run did."""

    imported: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    undelivered: int = 0
    skipped_lines: int = 0
    resumed_lines: int = 0
    interrupted: bool = False
    fatal: str | None = None
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether every record was imported."""
        return not (self.rejected or self.undelivered or self.interrupted or self.fatal)


@dataclass
class ImportOptions:
    """Settings of one import run (see ``mp-logbridge import --help``)."""

    files: Sequence[str]
    batch_size: int = MAX_BATCH_RECORDS
    max_batch_bytes: int = MAX_REQUEST_BYTES
    workers: int = 4
    dry_run: bool = False
    state_path: str | None = None
    tag: str = DEFAULT_TAG
    token: str | None = None


@dataclass
class _Batch:
    path: str
    first_line: int
    last_line: int
    items: list[bytes]
    origins: dict[str, int]  # $insert_id -> line


def _line_time(line: Mapping[str, Any]) -> float | None:
    for key in _TIME_KEYS:
        value = line.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) / 1000 if value > 100_000_000_000 else float(value)
        if isinstance(value, str):
            text = value.strip().replace("Z", "+00:00").replace(",", ".")
            try:
                parsed = _dt.datetime.fromisoformat(text)
            except ValueError:
                continue
            return parsed.timestamp()  # without an offset: local time, as logging's asctime
    return None


def _content_id(value: Any, index: int = 0) -> str:
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.blake2b(f"{index}|{text}".encode(), digest_size=16).hexdigest()


def records_of_line(line: Any, *, tag: str, spec: BridgeSpec | None) -> list[dict[str, Any]]:
    """The events a JSON line stands for (raises :class:`InvalidMessageError` when none can be made)."""
    if not isinstance(line, dict):
        raise InvalidMessageError("line", "must be a JSON object")
    if tag in line:
        if spec is None:
            raise InvalidMessageError(
                "line", "tagged log lines need the project token (--token or MIXPANEL_TOKEN)"
            )
        created = _line_time(line)
        if created is None:
            raise InvalidMessageError(
                "line", f"a tagged log line needs a time ({', '.join(_TIME_KEYS)})"
            )
        message = next(
            (str(line[key]) for key in _MESSAGE_KEYS if isinstance(line.get(key), str)), None
        )
        capture = Capture(spec, created, message, BoundContext(), seed=_content_id(line))
        records = []
        parts, problems = split_tag(line[tag])
        if problems:
            raise problems[0]
        for index, (kind, item, op, _size) in enumerate(parts):
            if kind != "event":
                raise InvalidMessageError(
                    "line",
                    f"only events can be imported; this tag holds a {kind.replace('_', ' ')}",
                )
            records.append(TagMessage(capture, kind, item, op, index).build())
        return records
    if "event" in line and isinstance(line.get("properties"), dict):
        properties = line["properties"]
        if "$insert_id" not in properties:
            line = {**line, "properties": {**properties, "$insert_id": _content_id(line)}}
        return [line]
    raise InvalidMessageError(
        "line", f"neither a Mixpanel event nor a log line carrying the {tag!r} tag"
    )


class _State:
    """Lines already accepted, per file, saved atomically after every batch."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.done: dict[str, list[list[int]]] = {}
        if path is not None and path.exists():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
                self.done = {
                    str(k): [list(r) for r in v] for k, v in loaded.get("done", {}).items()
                }
            except (OSError, ValueError, AttributeError, TypeError):
                self.done = {}

    def is_done(self, path: str, line: int) -> bool:
        return any(start <= line <= end for start, end in self.done.get(path, ()))

    def mark(self, path: str, first: int, last: int) -> None:
        with self._lock:
            ranges = sorted([*self.done.get(path, []), [first, last]])
            merged: list[list[int]] = []
            for start, end in ranges:
                if merged and start <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], end)
                else:
                    merged.append([start, end])
            self.done[path] = merged
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        temp = self.path.with_name(self.path.name + ".tmp")
        temp.write_text(json.dumps({"version": 1, "done": self.done}), encoding="utf-8")
        os.replace(temp, self.path)

    def discard(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()


class _Progress:
    """A progress bar on a terminal, plain periodic lines otherwise."""

    def __init__(self, stream: TextIO, total: int, interval: float = 5.0) -> None:
        self.stream = stream
        self.total = max(total, 1)
        self.tty = stream.isatty()
        self.interval = 0.2 if self.tty else interval
        self.started = time.monotonic()
        self._last = 0.0
        self.done = 0

    def update(self, done: int, force: bool = False) -> None:
        self.done = done
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        elapsed = max(now - self.started, 1e-6)
        rate = done / elapsed
        remaining = (self.total - done) / rate if rate > 0 else float("inf")
        eta = (
            "--:--" if remaining == float("inf") else time.strftime("%M:%S", time.gmtime(remaining))
        )
        if self.tty:
            width = 30
            filled = int(width * min(done / self.total, 1.0))
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(
                f"\r[{bar}] {done:,}/{self.total:,} records  {rate:,.0f}/s  ETA {eta} "
            )
        else:
            percent = 100 * done / self.total
            self.stream.write(
                f"processed {done:,}/{self.total:,} records ({percent:.0f}%), {rate:,.0f}/s, ETA {eta}\n"
            )
        self.stream.flush()

    def finish(self) -> None:
        self.update(self.done, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class Importer:
    """Runs one import: read, batch, post with retries, record progress, summarise.

    ``consumer_factory`` makes the synchronous :class:`~mp_logbridge.Consumer` each worker
    thread posts with (one per thread: its own connection pool and error reports).
    """

    def __init__(
        self,
        options: ImportOptions,
        consumer_factory: Callable[[], Consumer] | None,
        *,
        progress: TextIO | None = None,
        now: Callable[[], float] = time.time,
        interrupt_grace: float = 10.0,
    ) -> None:
        self.options = options
        self.consumer_factory = consumer_factory
        self.progress_stream = progress or sys.stderr
        self.now = now
        self.interrupt_grace = interrupt_grace
        self.summary = ImportSummary()
        self._lock = threading.Lock()
        self._spec = BridgeSpec(options.token) if options.token else None
        state = options.state_path
        self.state = _State(Path(state) if state and not options.dry_run else None)

    # ------------------------------------------------------------------ reading

    def _lines(self) -> Iterator[tuple[str, int, str]]:
        for name in self.options.files:
            with open(name, encoding="utf-8") as handle:
                for number, text in enumerate(handle, start=1):
                    yield name, number, text

    def _count(self) -> int:
        total = 0
        for name in self.options.files:
            with open(name, "rb") as handle:
                total += sum(1 for raw in handle if raw.strip())
        return total

    def _reject(self, path: str, line: int, reason: str) -> None:
        with self._lock:
            self.summary.rejected.append(Rejected(path, line, reason))

    def _batches(self) -> Iterator[_Batch]:
        options = self.options
        batch: _Batch | None = None
        size = 2
        for path, number, text in self._lines():
            if not text.strip():
                continue
            if self.state.is_done(path, number):
                self.summary.resumed_lines += 1
                continue
            if batch is not None and batch.path != path:
                yield batch
                batch, size = None, 2
            try:
                records = records_of_line(json.loads(text), tag=options.tag, spec=self._spec)
                encoded = [encode_message(record) for record in records]
            except ValueError as exc:  # JSON errors and InvalidMessageError
                reason = (
                    str(exc) if isinstance(exc, InvalidMessageError) else f"not valid JSON: {exc}"
                )
                self._reject(path, number, reason)
                records, encoded = [], []
            for record, payload in zip(records, encoded, strict=True):
                problem = check_record("/import", record, now=self.now())
                if problem is not None:
                    self._reject(path, number, f"{problem[0] or 'record'}: {problem[1]}")
                    continue
                if batch is not None and (
                    len(batch.items) >= options.batch_size
                    or size + len(payload) + 1 > options.max_batch_bytes
                ):
                    yield batch
                    batch, size = None, 2
                if batch is None:
                    batch = _Batch(path, number, number, [], {})
                batch.items.append(payload)
                batch.origins[str(record["properties"].get("$insert_id"))] = number
                size += len(payload) + 1
            if batch is None:
                batch = _Batch(path, number, number, [], {})
            batch.last_line = number
        if batch is not None:
            yield batch

    # ------------------------------------------------------------------ sending

    def _send(
        self, consumer: Consumer, failures: list[tuple[BaseException, list[Any]]], batch: _Batch
    ) -> tuple[int, int]:
        """Post one batch with retries; returns ``(imported, undelivered)``."""
        if not batch.items:
            return 0, 0
        failures.clear()
        before = consumer.stats()["sent"]
        left, _error = consumer._deliver("import", batch.items, None)
        imported = consumer.stats()["sent"] - before
        for exc, records in failures:  # refused for good (retries that ran out are in ``left``)
            if isinstance(exc, RejectedError) and exc.status_code in (401, 403):
                self.summary.fatal = str(
                    exc
                )  # bad credentials: every batch would fail the same way
                return imported, len(batch.items) - imported
            details = {}
            if isinstance(exc, PartialImportError):
                for entry in exc.failed_records:
                    key = entry.get("insert_id") or entry.get("$insert_id")
                    details[str(key)] = (
                        f"{entry.get('field', '')}: {entry.get('message', '')}".strip(": ")
                    )
            for record in records:
                props = record.get("properties", {}) if isinstance(record, dict) else {}
                insert_id = str(props.get("$insert_id"))
                line = batch.origins.get(insert_id, batch.first_line)
                self._reject(batch.path, line, details.get(insert_id) or str(exc))
        return imported, len(left)

    def _worker(
        self, work: queue.Queue[_Batch | None], results: queue.Queue[tuple[_Batch, int, int]]
    ) -> None:
        assert self.consumer_factory is not None
        consumer = self.consumer_factory()
        failures: list[tuple[BaseException, list[Any]]] = []
        consumer.on_error = lambda exc, records: failures.append((exc, records))
        try:
            while True:
                batch = work.get()
                if batch is None:
                    return
                if self.summary.fatal:  # credentials were refused: do not send more batches
                    results.put((batch, 0, len(batch.items)))
                    continue
                try:
                    imported, undelivered = self._send(consumer, failures, batch)
                except (
                    Exception
                ) as exc:  # a bug must not hang the run: count the batch as undelivered
                    self._reject(batch.path, batch.first_line, f"{type(exc).__name__}: {exc}")
                    imported, undelivered = 0, len(batch.items)
                results.put((batch, imported, undelivered))
        finally:
            consumer.close()

    def run(self) -> ImportSummary:
        """Import every file; returns the summary.

        ``KeyboardInterrupt`` stops reading, waits up to ``interrupt_grace`` seconds for the
        batches in flight, saves the progress and returns with ``interrupted`` set.
        """
        started = time.monotonic()
        progress = _Progress(self.progress_stream, self._count())
        try:
            if self.options.dry_run:
                for batch in self._batches():
                    self.summary.imported += len(batch.items)
                    progress.update(self.summary.imported)
                return self.summary
            self._post_all(progress)
            if self.summary.ok:
                self.state.discard()
            return self.summary
        finally:
            progress.finish()
            self.summary.elapsed = time.monotonic() - started

    def _post_all(self, progress: _Progress) -> None:
        workers = max(1, self.options.workers)
        work: queue.Queue[_Batch | None] = queue.Queue(maxsize=workers * 2)
        results: queue.Queue[tuple[_Batch, int, int]] = queue.Queue()
        threads = [
            threading.Thread(
                target=self._worker, args=(work, results), name="mp-import", daemon=True
            )
            for _ in range(workers)
        ]
        for thread in threads:
            thread.start()
        in_flight = 0
        done = 0

        def collect(block: bool, timeout: float | None = None) -> bool:
            nonlocal in_flight, done
            try:
                batch, imported, undelivered = results.get(block=block, timeout=timeout)
            except queue.Empty:
                return False
            in_flight -= 1
            self.summary.imported += imported
            self.summary.undelivered += undelivered
            if not undelivered:
                self.state.mark(batch.path, batch.first_line, batch.last_line)
            done += len(batch.items)
            progress.update(done)
            return True

        try:
            for batch in self._batches():
                if self.summary.fatal:
                    break
                while True:
                    try:
                        work.put(batch, timeout=0.2)
                        break
                    except queue.Full:
                        collect(block=False)
                in_flight += 1
                while collect(block=False):
                    pass
            if self.summary.fatal:
                with contextlib.suppress(queue.Empty):
                    while True:  # batches not started yet are not sent
                        if work.get_nowait() is not None:
                            in_flight -= 1
            for _ in threads:
                work.put(None)
            while in_flight:
                collect(block=True)
        except KeyboardInterrupt:
            self.summary.interrupted = True
            with contextlib.suppress(queue.Empty):
                while True:  # batches not started yet are simply not sent
                    if work.get_nowait() is not None:
                        in_flight -= 1
            deadline = time.monotonic() + self.interrupt_grace
            while in_flight and time.monotonic() < deadline:
                collect(block=True, timeout=max(0.0, deadline - time.monotonic()))

"""Bulk import of historical events into ``/import`` (``mp-logbridge import``).

The input (read by :mod:`._import_input`) is JSON lines or one JSON array, plain or gzipped, from
files or standard input. Each entry is a Mixpanel event (``{"event": ..., "properties": {...}}``)
or a JSON log line that carries the tag (``{"message": ..., "created": ..., "mixpanel": {...}}``,
as a JSON formatter or structlog's ``JSONRenderer`` writes it). Entries are cut into batches of up
to 2000 records and under the request byte budget (an entry's records stay together) and posted
by a few worker threads; :func:`send_import_batch` is the one place that talks to the server.

Events without a ``$insert_id`` get one derived from their content, so sending the same entry
twice cannot duplicate it. What was imported is kept in a progress file (:mod:`._import_state`)
so that a later run sends only what was not: entries refused, not delivered, changed or new.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import http.client
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ._context import BoundContext
from ._errors import (
    ConfigurationError,
    DeliveryError,
    InvalidMessageError,
    PartialImportError,
    PayloadTooLargeError,
)
from ._export import Batch, HttpExporter
from ._import_input import READ_ERRORS, STDIN, Entry, entries, is_regular_file, open_source
from ._import_state import (
    ProgressFile,
    Ranges,
    Scan,
    SegmentDigests,
    SourceProgress,
    default_progress_path,
    destination_of,
    scan_entries,
    segment_of,
)
from ._lifecycle import start_thread
from ._messages import as_seconds
from ._records import MAX_BATCH_RECORDS, MAX_REQUEST_BYTES, encode_message
from ._retry import RetryPolicy, next_attempt
from ._rules import check_record
from ._tags import DEFAULT_TAG, BridgeSpec, Capture, split_tag
from ._transport import Credentials, Endpoints, Transport

__all__ = [
    "BatchResult",
    "ImportOptions",
    "ImportSummary",
    "Importer",
    "Rejected",
    "describe_failure",
    "records_of_line",
    "send_import_batch",
]

_TIME_KEYS = ("created", "timestamp", "time", "asctime", "@timestamp")
_MESSAGE_KEYS = ("message", "msg", "event")
_KEPT_REJECTS = 1000  # examples kept in the summary (all of them go to ``on_reject``)
_EMPTY_BATCH = 1000  # entries without records are accounted for this many at a time


@dataclass(frozen=True)
class Rejected:
    """An entry (or one of its records) that was not imported, where it is, and why."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return (
            f"{self.path}:{self.line}: {self.reason}"
            if self.line
            else f"{self.path}: {self.reason}"
        )


@dataclass
class ImportSummary:
    """What an import run did."""

    imported: int = 0  # records the server accepted (or, in a dry run, found valid)
    lines: int = 0  # non-blank entries read and handled this run
    rejected: list[Rejected] = field(default_factory=list)  # the first ones
    rejected_count: int = 0
    undelivered: int = 0  # records the server could not be made to take (retries ran out)
    skipped_lines: int = 0  # entries done by an earlier run, not read again
    interrupted: bool = False
    stopped_at_once: bool = False  # a second interrupt: requests in flight were abandoned
    fatal: str | None = None  # the server refused the requests themselves (credentials, ...)
    gave_up: str | None = None  # why sending stopped after a batch ran out of retries
    progress_path: str | None = None
    progress_error: str | None = None
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether everything read was imported."""
        return not (
            self.rejected_count
            or self.undelivered
            or self.interrupted
            or self.fatal
            or self.gave_up
        )


@dataclass
class ImportOptions:
    """Settings of one import run (see ``mp-logbridge import --help``).

    ``state_path`` is the progress file (``None``: the default place, see
    :func:`~mp_logbridge._import_state.default_progress_path`); ``keep_progress=False`` keeps
    none; ``resume=False`` ignores what it holds and replaces it.
    """

    files: Sequence[str]
    endpoints: Endpoints | None = None
    credentials: Credentials | None = None
    request_timeout: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    batch_size: int = MAX_BATCH_RECORDS
    max_batch_bytes: int = MAX_REQUEST_BYTES
    workers: int = 4
    dry_run: bool = False
    state_path: str | None = None
    keep_progress: bool = True
    resume: bool = True
    tag: str = DEFAULT_TAG
    token: str | None = None
    interrupt_grace: float = 10.0


# --------------------------------------------------------------------------- entries to records


def _line_time(line: Mapping[str, Any]) -> float | None:
    for key in _TIME_KEYS:
        value = line.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return as_seconds(value)
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
            records.append(capture.message_for(kind, item, op, index).build())
        return records
    if "event" in line and isinstance(line.get("properties"), dict):
        properties = line["properties"]
        if "$insert_id" not in properties:
            line = {**line, "properties": {**properties, "$insert_id": _content_id(line)}}
        return [line]
    raise InvalidMessageError(
        "line", f"neither a Mixpanel event nor a log line carrying the {tag!r} tag"
    )


# --------------------------------------------------------------------------- sending


@dataclass
class BatchResult:
    """What became of one batch sent to ``/import``; numbers are indexes in the batch."""

    accepted: list[int] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)  # (index, the server's reason)
    undelivered: list[int] = field(default_factory=list)  # retries ran out, or sending stopped
    retry_cause: str | None = None  # the last reason a request had to be tried again
    fatal: str | None = None  # the request as such was refused: every other one would be too


_CAUSE_TYPES: tuple[tuple[type[BaseException], str], ...] = (
    (http.client.RemoteDisconnected, "connection closed by the server"),
    (ConnectionRefusedError, "connection refused"),
    (ConnectionResetError, "connection reset"),
    (ConnectionAbortedError, "connection aborted"),
    (socket.gaierror, "host name not found"),
    (TimeoutError, "timed out"),
)
_CAUSE_WORDS = (
    ("connection refused", "connection refused"),
    ("remotedisconnected", "connection closed by the server"),
    ("connection reset", "connection reset"),
    ("timed out", "timed out"),
    ("name or service not known", "host name not found"),
    ("failed to resolve", "host name not found"),
)


def describe_failure(error: BaseException) -> str:
    """A few words on why a request failed: ``HTTP 503``, ``connection refused``, ``timed out``."""
    status = getattr(error, "status_code", None)
    if isinstance(status, int):
        return f"HTTP {status}" + (" (rate limited)" if status == 429 else "")
    seen: set[int] = set()
    todo: deque[BaseException] = deque([error])
    while todo:  # the network error under the library's, and under requests' and urllib3's
        exc = todo.popleft()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        for kind, words in _CAUSE_TYPES:
            if isinstance(exc, kind):
                return words
        linked = (exc.__cause__, exc.__context__, getattr(exc, "reason", None), *exc.args)
        todo.extend(item for item in linked if isinstance(item, BaseException))
    text = str(error)
    lowered = text.lower()
    return next((words for needle, words in _CAUSE_WORDS if needle in lowered), text[:120])


def _refusal_reasons(error: DeliveryError, sent: list[bytes]) -> dict[int, str]:
    """What the server said about each refused record, by its position in ``sent``."""
    reasons: dict[int, str] = {}
    if isinstance(error, PartialImportError):
        for entry in error.failed_records:
            index = entry.get("index")
            if isinstance(index, int) and 0 <= index < len(sent):
                words = f"{entry.get('field') or ''}: {entry.get('message') or ''}".strip(": ")
                reasons[index] = words or str(error)
    return reasons


def send_import_batch(
    transport: Transport,
    payloads: Sequence[bytes],
    policy: RetryPolicy,
    *,
    stop: threading.Event,
    on_retry: Callable[[str], None] | None = None,
) -> BatchResult:
    """Post encoded records to ``/import``, retrying as ``policy`` says; never raises.

    A 413 splits the batch; a strict 400 refuses exactly the records it lists; a request refused
    as a whole (401, 403, another 400, a TLS or URL error) sets ``fatal``. ``stop`` cuts a wait
    between attempts short (what was not delivered is then ``undelivered``); ``on_retry`` hears
    each retry as it is scheduled (``retrying: connection refused (attempt 3, next in 9 s)``).
    """
    result = BatchResult()
    exporter = HttpExporter(transport)
    records = [bytes(payload) for payload in payloads]  # distinct objects: found by identity
    position = {id(record): index for index, record in enumerate(records)}
    work = deque([records])

    def leave(items: list[bytes]) -> BatchResult:
        result.undelivered.extend(position[id(item)] for item in items)
        result.undelivered.extend(position[id(item)] for rest in work for item in rest)
        return result

    while work:
        current = work.popleft()
        attempts, started = 0, time.monotonic()
        while current:
            outcome = exporter.export(Batch("import", current), time.monotonic() + exporter.timeout)
            attempts += 1
            result.accepted.extend(position[id(item)] for item in outcome.delivered)
            for _reason, items, error in outcome.dropped:
                if isinstance(error, PartialImportError) or (
                    isinstance(error, PayloadTooLargeError) and len(items) == 1
                ):
                    reasons = {
                        position[id(current[index])]: words
                        for index, words in _refusal_reasons(error, current).items()
                    }
                    result.refused.extend(
                        (position[id(item)], reasons.get(position[id(item)], str(error)))
                        for item in items
                    )
                else:
                    result.fatal = str(error)
                    return leave(items)
            if outcome.split:
                work.extendleft(reversed(outcome.split))
                break
            if not outcome.retry:
                break
            assert outcome.error is not None
            result.retry_cause = describe_failure(outcome.error)
            now = time.monotonic()
            decision = next_attempt(policy, outcome.error, attempts, started, now)
            if stop.is_set() or decision.retry_at is None:
                return leave(outcome.retry)
            delay = decision.retry_at - now
            if on_retry is not None:
                on_retry(
                    f"retrying: {result.retry_cause} (attempt {attempts}, next in {delay:.0f} s)"
                )
            if stop.wait(delay):
                return leave(outcome.retry)
            current = outcome.retry
    return result


# --------------------------------------------------------------------------- progress display


class _Progress:
    """A progress bar on a terminal, plain periodic lines otherwise (main thread only)."""

    def __init__(self, stream: TextIO, interval: float = 5.0) -> None:
        self.stream = stream
        try:
            self.tty = stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.interval = 0.2 if self.tty else interval
        self.total: int | None = None
        self.done = 0
        self.started = time.monotonic()
        self._note: str | None = None
        self._last = 0.0
        self._drawn = False

    def start(self, total: int | None) -> None:
        self.total, self.started = total, time.monotonic()
        if total != 0:
            self.draw(force=True)

    def advance(self, count: int) -> None:
        self.done += count
        self.draw()

    def note(self, text: str | None) -> None:
        """Show ``text`` (why requests are being retried) beside the counts; ``None`` clears it."""
        if text != self._note:
            self._note = text
            self.draw(force=text is not None)

    def message(self, text: str) -> None:
        """A line of its own (the bar, if any, is drawn again after it)."""
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()
        self._drawn = False

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        done, total = self.done, self.total
        rate = done / max(now - self.started, 1e-6)
        note = f"  {self._note}" if self._note else ""
        if total is None:
            counts, eta = f"{done:,} lines", ""
        else:
            left = max(total - done, 0)
            eta = (
                "--:--"
                if rate <= 0 and left
                else time.strftime("%M:%S", time.gmtime(left / rate if left else 0))
            )
            counts = f"{done:,}/{total:,} lines"
        if self.tty:
            bar = ""
            if total is not None:
                filled = int(30 * min(done / total, 1.0)) if total else 30
                bar = "[" + "#" * filled + "." * (30 - filled) + "] "
            timing = f"  ETA {eta}" if eta else ""
            self.stream.write(f"\r{bar}{counts}  {rate:,.0f}/s{timing}{note}\x1b[K")
            self._drawn = True
        else:
            share = f" ({100 * done / total:.0f}%)" if total else ""
            timing = f", ETA {eta}" if eta else ""
            self.stream.write(f"processed {counts}{share}, {rate:,.0f}/s{timing}{note}\n")
        self.stream.flush()

    def finish(self) -> None:
        self._note = None
        self.draw(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------- the run


@dataclass
class _Plan:
    """One input of the run."""

    name: str  # as given
    key: str  # absolute path (the progress file's key), or "-"
    regular: bool  # a regular file: read twice, resumable
    scan: Scan | None = None
    live: SourceProgress | None = None  # its progress, when kept


class _Batch:
    """Records of consecutive entries of one input, sent as one request."""

    __slots__ = ("clean", "entries", "lines", "origin", "payloads", "plan", "segment", "size")

    def __init__(self, plan: _Plan, segment: int) -> None:
        self.plan = plan
        self.segment = segment  # batches never span segments (see SourceProgress)
        self.payloads: list[bytes] = []
        self.origin: list[int] = []  # the entry position of each payload
        self.lines: dict[int, int] = {}  # entry position -> line it starts on
        self.clean: list[int] = []  # entries done without a record: blank, or none to send
        self.entries = 0  # non-blank entries handled (what the progress counts)
        self.size = 2  # the request body's brackets

    def take(self, entry: Entry, payloads: list[bytes] | None) -> None:
        """Account for a non-blank entry: its records, none (done as is) or ``None`` (refused)."""
        self.entries += 1
        if payloads is None:
            return
        if not payloads:
            self.clean.append(entry.position)
            return
        self.payloads.extend(payloads)
        self.origin.extend([entry.position] * len(payloads))
        self.lines[entry.position] = entry.line
        self.size += sum(len(payload) + 1 for payload in payloads)


class Importer:
    """Runs one import: read, batch, post with retries, keep progress, summarise.

    ``progress`` is where the progress line and notices go (standard error by default);
    ``on_reject`` hears of every entry or record not imported, as it happens.
    """

    def __init__(
        self,
        options: ImportOptions,
        *,
        progress: TextIO | None = None,
        now: Callable[[], float] = time.time,
        on_reject: Callable[[Rejected], None] | None = None,
    ) -> None:
        if options.endpoints is None and not options.dry_run:
            raise ConfigurationError("importing needs the endpoints to send to")
        self.options = options
        self.now = now
        self.on_reject = on_reject
        self.summary = ImportSummary()
        self.progress = _Progress(progress or sys.stderr)
        self.progress_file: ProgressFile | None = None
        self._spec = BridgeSpec(options.token) if options.token else None
        self._stop = threading.Event()
        self._interrupted = False  # a first Ctrl-C while sending (see _interrupts_deferred)
        self._lock = threading.Lock()
        self._notes: dict[int, str] = {}  # worker -> why it is retrying
        self._gave_up: str | None = None  # why a batch ran out of retries
        self._in_flight = 0
        self._plans = [
            _Plan(name, STDIN if name == STDIN else os.path.realpath(name), is_regular_file(name))
            for name in options.files
        ]

    # ------------------------------------------------------------------ run

    def run(self) -> ImportSummary:
        """Import every input; returns the summary.

        A first ``KeyboardInterrupt`` stops reading, waits up to ``interrupt_grace`` seconds for
        the requests in flight and saves the progress; a second one stops at once (the progress
        is saved all the same).

        Raises:
            ConfigurationError: the progress file cannot be written.
        """
        started = time.monotonic()
        sending = False
        try:
            self._prepare()
            self.progress.start(self._total())
            sending = True
            if self.options.dry_run:
                self._check_all()
            else:
                self._post_all()
        except KeyboardInterrupt:  # while reading the files first: nothing was sent
            self.summary.interrupted = True
        finally:
            if sending:
                self._save(final=True)
                self.progress.finish()
            self.summary.elapsed = time.monotonic() - started
        return self.summary

    def _notice(self, text: str) -> None:
        self.progress.message(text)

    def _prepare(self) -> None:
        """Read each regular file once: its size, and what an earlier run already imported."""
        options = self.options
        regular = [plan for plan in self._plans if plan.regular]
        if options.keep_progress and not options.dry_run and regular:
            assert options.endpoints is not None
            destination = destination_of(
                options.endpoints.import_, options.credentials, options.token, options.tag
            )
            path = (
                Path(options.state_path)
                if options.state_path
                else default_progress_path(destination, (plan.key for plan in regular))
            )
            self.progress_file = progress = ProgressFile(path, destination)
            if options.resume:
                why = progress.load()
                if why:
                    self._notice(why)
                elif progress.saved_at is not None:
                    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(progress.saved_at))
                    self._notice(f"resuming with the progress saved in {path} at {when}")
            elif path.exists():
                self._notice(f"--no-resume: the progress in {path} is not used; it is replaced")
        files = self.progress_file.sources if self.progress_file else {}
        for plan in regular:
            earlier = files.get(plan.key)
            try:
                with open_source(plan.name) as opened:
                    plan.scan = scan_entries(entries(opened, parse=False), opened.identity, earlier)
                    identity = opened.identity
            except READ_ERRORS:
                continue  # reported when it is read for sending
            if self.progress_file is not None:
                plan.live = SourceProgress(identity, plan.scan.skip, plan.scan.verified)
                self.progress_file.live[plan.key] = plan.live
            self._report_scan(plan, plan.scan, earlier is not None)
        if self.progress_file is not None:
            try:
                self.progress_file.save()
                self.summary.progress_path = str(self.progress_file.path)
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot write the progress file {self.progress_file.path}: "
                    f"{exc.strerror or exc} (choose another with --state)"
                ) from exc

    def _report_scan(self, plan: _Plan, scan: Scan, known: bool) -> None:
        if not known:
            return
        if scan.change or scan.stale:
            what = f"was {scan.change}" if scan.change else "has changed"
            again = (
                f"; {scan.stale:,} line(s) imported then are not the same now and are sent again"
                if scan.stale
                else ""
            )
            self._notice(f"{plan.name} {what} since the earlier run{again}")
        if scan.skip_nonblank:
            self._notice(
                f"{plan.name}: {scan.skip_nonblank:,} of {scan.nonblank:,} line(s) were imported "
                "by an earlier run and are skipped"
            )

    def _total(self) -> int | None:
        if any(plan.scan is None for plan in self._plans):
            return None  # standard input or a pipe: read once, length unknown
        return sum(p.scan.nonblank - p.scan.skip_nonblank for p in self._plans if p.scan)

    def _save(self, final: bool = False) -> None:
        progress = self.progress_file
        if progress is None or self.summary.progress_error:
            return
        try:
            progress.save(every=0.0 if final else 1.0)
        except OSError as exc:
            self.summary.progress_error = f"cannot save the progress in {progress.path}: {exc}"
            self._notice(f"warning: {self.summary.progress_error}")

    def _reject(self, path: str, line: int, reason: str) -> None:
        item = Rejected(path, line, reason)
        with self._lock:
            self.summary.rejected_count += 1
            if len(self.summary.rejected) < _KEPT_REJECTS:
                self.summary.rejected.append(item)
        if self.on_reject is not None:
            self.on_reject(item)

    # ------------------------------------------------------------------ reading

    def _read(self, plan: _Plan) -> Iterator[Entry]:
        """The entries of one input, checked against what the first reading saw."""
        scan = plan.scan
        expected = {last: digest for _first, last, digest in scan.content} if scan else {}
        digests = SegmentDigests()
        try:
            with open_source(plan.name) as opened:
                for entry in entries(opened):
                    if scan is not None:
                        if entry.position > scan.entries:
                            self._notice(
                                f"{plan.name} grew while it was being imported; what was added "
                                "is left for the next run"
                            )
                            return
                        digests.add(entry.position, entry.digest)
                        if expected.get(entry.position, digests.current()) != digests.current():
                            self._changed_while_read(plan, digests.first, entry.line)
                            return
                    yield entry
                    if entry.final:
                        return
        except READ_ERRORS as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._reject(plan.name, 0, f"cannot read: {reason}")
            return
        if scan is not None and digests.last < scan.entries:
            self._changed_while_read(plan, digests.first, digests.last)

    def _changed_while_read(self, plan: _Plan, first: int, line: int) -> None:
        """The file is not what was read first: keep only the progress before ``first``."""
        self._reject(
            plan.name,
            line,
            "the file changed while it was being imported; the rest is left for the next run",
        )
        if plan.live is not None:
            plan.live.truncate(first)

    def _records(self, plan: _Plan, entry: Entry) -> list[bytes] | None:
        """The encoded records of an entry, or ``None`` (reported) if it cannot be imported.

        All or nothing: if one record of an entry is refused, none of them is sent.
        """
        problem = entry.problem
        payloads = []
        if problem is None:
            try:
                for record in records_of_line(entry.value, tag=self.options.tag, spec=self._spec):
                    payload = encode_message(record)
                    found = check_record("/import", record, now=self.now())
                    if found is not None:
                        problem = f"{found[0] or 'record'}: {found[1]}"
                        break
                    payloads.append(payload)
            except InvalidMessageError as exc:
                problem = str(exc)
            except (ValueError, TypeError, RecursionError) as exc:
                problem = f"cannot be imported: {type(exc).__name__}: {exc}"
        if problem is None and len(payloads) > MAX_BATCH_RECORDS:
            problem = f"holds {len(payloads):,} events; one request takes at most 2000"
        if problem is not None:
            self._reject(plan.name, entry.line, problem)
            return None
        return payloads

    def _batches(self) -> Iterator[_Batch]:
        options = self.options
        for plan in self._plans:
            skip, live = plan.scan.skip if plan.scan else Ranges(), plan.live
            batch = _Batch(plan, 0)
            for entry in self._read(plan):
                if self._stop.is_set():
                    return
                segment = segment_of(entry.position)
                if segment != batch.segment:
                    if batch.entries or batch.clean:
                        yield self._dispatch(batch)
                    batch = _Batch(plan, segment)
                if live is not None:
                    live.read(entry.position, entry.digest)
                if entry.position in skip:
                    self.summary.skipped_lines += int(not entry.blank)
                    continue
                if entry.blank:
                    batch.clean.append(entry.position)
                else:
                    self.summary.lines += 1
                    payloads = self._records(plan, entry)
                    if payloads and batch.payloads:
                        size = sum(len(payload) + 1 for payload in payloads)
                        if (
                            len(batch.payloads) + len(payloads) > options.batch_size
                            or batch.size + size > options.max_batch_bytes
                        ):
                            yield self._dispatch(batch)
                            batch = _Batch(plan, segment)
                    batch.take(entry, payloads)
                if not batch.payloads and batch.entries + len(batch.clean) >= _EMPTY_BATCH:
                    yield self._dispatch(batch)  # entries without records, a few at a time
                    batch = _Batch(plan, segment)
            if batch.entries or batch.clean:
                yield self._dispatch(batch)
            if live is not None:
                live.end()

    @staticmethod
    def _dispatch(batch: _Batch) -> _Batch:
        if batch.plan.live is not None:
            batch.plan.live.begin(batch.segment)
        return batch

    # ------------------------------------------------------------------ dry run

    def _check_all(self) -> None:
        for batch in self._batches():
            self.summary.imported += len(batch.payloads)
            self.progress.advance(batch.entries)

    # ------------------------------------------------------------------ sending

    def _post_all(self) -> None:
        workers = max(1, self.options.workers)
        work: queue.Queue[_Batch | None] = queue.Queue(maxsize=workers * 2)
        results: queue.Queue[tuple[_Batch, BatchResult]] = queue.Queue()
        threads = [
            threading.Thread(
                target=self._worker, args=(index, work, results), name="mp-import", daemon=True
            )
            for index in range(workers)
        ]
        for thread in threads:
            start_thread(thread)
        try:
            with self._interrupts_deferred():
                try:
                    for batch in self._batches():
                        if not batch.payloads:
                            self._complete(batch, BatchResult())
                            continue
                        while not self._interrupted:
                            try:
                                work.put(batch, timeout=0.2)
                                self._in_flight += 1
                                break
                            except queue.Full:
                                self._collect(results, 0)
                        while self._collect(results, 0):
                            pass
                        if self._stop.is_set() or self._interrupted:
                            break
                    while self._in_flight and not self._interrupted:
                        self._collect(results, 0.2)
                    if self._interrupted:
                        self._wind_down(work, results)
                except KeyboardInterrupt:
                    try:
                        if not (self.summary.interrupted or self._interrupted):
                            self._wind_down(work, results)
                        else:  # a second interrupt during the wind-down
                            raise
                    except KeyboardInterrupt:
                        self.summary.stopped_at_once = True
                        self._notice(
                            "stopped; requests still in flight are sent again by the next run"
                        )
        finally:
            self._stop.set()
            self._unqueue(work)
            for _ in threads:
                work.put_nowait(None)

    @contextmanager
    def _interrupts_deferred(self) -> Iterator[None]:
        """While batches are sent, a first Ctrl-C only asks to stop (``self._interrupted``).

        A ``KeyboardInterrupt`` raised between taking a finished batch and recording it would
        lose the record of a batch the server has: the next run would send it again. So the
        first SIGINT sets a flag the sending loop looks at between steps; a second one raises
        ``KeyboardInterrupt`` (stop at once). Off the main thread, or under an application's
        own SIGINT handler, interrupts arrive as they always do.
        """

        def on_sigint(signum: int, frame: Any) -> None:
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted = True

        try:
            if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
                yield
                return
            previous = signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # not the main thread
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _unqueue(self, work: queue.Queue[_Batch | None]) -> None:
        """Take back the batches no worker has started (they are left for the next run)."""
        while True:
            try:
                if work.get_nowait() is not None:
                    self._in_flight -= 1
            except queue.Empty:
                return

    def _wind_down(
        self, work: queue.Queue[_Batch | None], results: queue.Queue[tuple[_Batch, BatchResult]]
    ) -> None:
        """After a first interrupt: send nothing new, give the requests in flight a moment."""
        self.summary.interrupted = True
        self._stop.set()
        self._unqueue(work)
        grace = self.options.interrupt_grace
        if self._in_flight:
            self._notice(
                f"interrupted: waiting up to {grace:g} s for {self._in_flight} request(s) in "
                "flight; press Ctrl-C again to stop at once"
            )
        else:
            self._notice("interrupted: no request in flight; stopping")
        deadline = time.monotonic() + grace
        while self._in_flight and time.monotonic() < deadline:
            self._collect(results, min(0.2, max(0.0, deadline - time.monotonic())))

    def _collect(self, results: queue.Queue[tuple[_Batch, BatchResult]], wait: float) -> bool:
        """Take one finished batch, waiting up to ``wait`` seconds; refresh the display."""
        try:
            batch, result = results.get(timeout=wait) if wait > 0 else results.get_nowait()
        except queue.Empty:
            with self._lock:
                note = next(iter(self._notes.values()), None)
            self.progress.note(note)
            self.progress.draw()
            return False
        self._in_flight -= 1
        self._complete(batch, result)
        return True

    def _complete(self, batch: _Batch, result: BatchResult) -> None:
        summary, plan = self.summary, batch.plan
        summary.imported += len(result.accepted)
        summary.undelivered += len(result.undelivered)
        for index, reason in result.refused:
            position = batch.origin[index]
            self._reject(plan.name, batch.lines[position], reason)
        if plan.live is not None:  # an entry is done once every record of it was accepted
            accepted = set(result.accepted)
            left = {p for index, p in enumerate(batch.origin) if index not in accepted}
            done = set(batch.origin) - left
            plan.live.finish(batch.segment, [*done, *batch.clean])
            self._save()
        if result.fatal and not summary.fatal:
            summary.fatal = result.fatal
        if self._gave_up and not summary.gave_up:
            summary.gave_up = self._gave_up
            self._notice(
                f"giving up after retrying for a while ({summary.gave_up}); "
                "nothing more is sent this run"
            )
        self.progress.advance(batch.entries)

    def _worker(
        self,
        index: int,
        work: queue.Queue[_Batch | None],
        results: queue.Queue[tuple[_Batch, BatchResult]],
    ) -> None:
        options = self.options
        assert options.endpoints is not None
        transport = Transport(
            options.endpoints, credentials=options.credentials, timeout=options.request_timeout
        )

        def on_retry(text: str) -> None:
            with self._lock:
                self._notes[index] = text

        try:
            while True:
                batch = work.get()
                if batch is None:
                    return
                if self._stop.is_set():
                    result = BatchResult()  # not sent: left for the next run, not counted
                else:
                    try:
                        result = send_import_batch(
                            transport,
                            batch.payloads,
                            options.retry,
                            stop=self._stop,
                            on_retry=on_retry,
                        )
                    except Exception as exc:  # a bug must not hang the run
                        result = BatchResult(
                            undelivered=list(range(len(batch.payloads))),
                            fatal=f"unexpected error while sending: {type(exc).__name__}: {exc}",
                        )
                with self._lock:
                    self._notes.pop(index, None)
                    if result.undelivered and not result.fatal and not self._stop.is_set():
                        self._gave_up = result.retry_cause or "the server kept failing"
                if result.fatal or self._gave_up:
                    self._stop.set()  # before this worker or another takes the next batch
                results.put((batch, result))
        finally:
            transport.close()

"""A Mixpanel ingestion API on loopback, for tests, demos and local development.

:class:`MixpanelServer` is a real HTTP server that accepts what Mixpanel's ``/track``,
``/engage``, ``/groups`` and ``/import`` accept — JSON array bodies (gzip where allowed), NDJSON
on ``/import``, and the legacy form body ``data=`` holding plain or base64 JSON — checks every
request against the ingestion API's published rules (method, parameters and their values,
content type and encoding, credentials, each record's fields and types per operation, limits),
answers the way the API documents (``verbose`` answers, strict ``/import`` with
``failed_records``, 401, 413, ...), and keeps what it accepted::

    from mp_logbridge import Tracker, Consumer
    from mp_logbridge.testing import MixpanelServer

    with MixpanelServer() as server:
        tracker = Tracker("TOKEN", Consumer(api_host=server.url))
        tracker.track("user-1", "Signed Up", {"plan": "pro"})
        assert server.events[0]["event"] == "Signed Up"
        assert server.spec_violations == []

Every request that breaks a rule of the spec is listed in :attr:`MixpanelServer.spec_violations`
(and collected by :func:`collect_spec_violations`, whichever server saw it), besides being
answered as Mixpanel would.

For tests that need no HTTP at all, :func:`capture_messages` collects the exact records a block
of code produced (the ``mixpanel_messages`` pytest fixture does the same per test)::

    from mp_logbridge.testing import capture_messages

    with capture_messages() as captured:
        log.info("signed up", extra=tag.track("Signed Up", distinct_id="u1"))
    assert captured.events("Signed Up")[0]["properties"]["distinct_id"] == "u1"

The server can be told to misbehave for the next requests: :meth:`MixpanelServer.fail_next` (a status,
with or without ``Retry-After``), :meth:`~MixpanelServer.delay_next`,
:meth:`~MixpanelServer.drop_next` (close the connection without answering), and like a hostile
proxy: :meth:`~MixpanelServer.stall_next` (never answer), :meth:`~MixpanelServer.drip_next` (one
byte every few seconds), :meth:`~MixpanelServer.huge_next` (a huge answer); or a constant
``latency``. With pytest, the ``mixpanel_server`` fixture (installed with this package) gives a
started server per test.
"""

from __future__ import annotations

import base64
import http
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from . import _capture
from ._capture import Capture, CapturedMessage
from ._lifecycle import start_thread
from ._rules import (
    ENDPOINTS,
    Access,
    Endpoint,
    Refusal,
    SpecViolation,
    check_access,
    check_event,
    check_params,
    check_record,
    check_update,
    decode_records,
    endpoint_for,
    is_silent_drop,
    too_large,
)


@contextmanager
def capture_messages() -> Iterator[Capture]:
    """Collect, instead of sending, every message this library's consumers are given in the
    block, from any thread: built, checked and encoded as they would be sent, then decoded
    (times in milliseconds, ``$insert_id`` filled in). Nothing reaches a server.

    Front doors behave as usual (handlers, the structlog processor, ``@instrument``, the
    Tracker); a record dict that cannot be sent still raises at the call. Captures nest (the
    innermost collects).
    """
    capture = Capture()
    with _capture._lock:
        _capture.active.append(capture)
    try:
        yield capture
    finally:
        with _capture._lock:
            _capture.active.remove(capture)


_collectors: list[list[SpecViolation]] = []
_collectors_lock = threading.Lock()


@contextmanager
def collect_spec_violations() -> Iterator[list[SpecViolation]]:
    """Collect every :class:`SpecViolation` that any :class:`MixpanelServer` of this process
    sees during the block (from any thread), in arrival order. Blocks nest; each collects."""
    found: list[SpecViolation] = []
    with _collectors_lock:
        _collectors.append(found)
    try:
        yield found
    finally:
        with _collectors_lock:
            _collectors.remove(found)


__all__ = [
    "Capture",
    "CapturedMessage",
    "MixpanelServer",
    "ReceivedRequest",
    "SpecViolation",
    "capture_messages",
    "check_record",
    "collect_spec_violations",
]

_PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
_STORES = {
    "/track": "events",
    "/engage": "profile_updates",
    "/groups": "group_updates",
    "/import": "imports",
}
_KINDS = (*_STORES.values(), "all")
#: A gzip body may be this much larger than the uncompressed limit (incompressible data).
_GZIP_SLACK = 1024
#: Bodies over the limit are read (and dropped) up to this size so that the client reads the
#: 413; past it the connection is closed unread.
_DRAIN_LIMIT = 64 * 1024 * 1024
#: Documented answers for statuses :meth:`MixpanelServer.fail_next` injects without a body.
_DOCUMENTED_ERRORS = {
    401: "Invalid credentials",
    413: "request exceeds max limit of 2097152 bytes",
    429: "Project exceeded rate limits. Please retry the request with exponential backoff.",
}


@dataclass
class ReceivedRequest:
    """One request as the server saw it (body already decompressed).

    ``query`` is the URL's query string; ``records`` what the body carried (accepted or not);
    ``violations`` the rules of the spec it broke.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    status: int
    records: list[Any] = field(default_factory=list)
    gzipped: bool = False
    violations: list[SpecViolation] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """A request header, looked up case-insensitively."""
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return None


@dataclass
class _Fault:
    action: str  # "status", "delay", "drop", "stall", "drip", "huge"
    remaining: int
    endpoint: str | None
    status: int = 503
    retry_after: str | None = None
    body: bytes | None = None
    seconds: float = 0.0
    size: int = 0


@dataclass
class _Verdict:
    """What the server makes of one request: the answer, and what to keep."""

    status: int
    headers: dict[str, str]
    body: bytes
    request: ReceivedRequest
    accepted: list[Any] = field(default_factory=list)
    refused: list[tuple[Any, str]] = field(default_factory=list)


def _json_answer(status: int, payload: Any, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(payload).encode()


#: The ``status`` texts Mixpanel's documented answers use where they differ from this
#: Python's (3.13 renamed 413 "Content Too Large").
_MIXPANEL_PHRASES = {413: "Request Entity Too Large", 422: "Unprocessable Entity"}


def _phrase(status: int) -> str:
    if status in _MIXPANEL_PHRASES:
        return _MIXPANEL_PHRASES[status]
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _injected_body(status: int) -> bytes:
    """The body of a :meth:`MixpanelServer.fail_next` answer given none: a verbose failure for
    a 2xx, else the documented error shape (with Mixpanel's words for 401, 413, 429)."""
    error = _DOCUMENTED_ERRORS.get(status, f"injected failure {status}")
    if 200 <= status < 300:
        return json.dumps({"status": 0, "error": error}).encode()
    return json.dumps({"code": status, "error": error, "status": _phrase(status)}).encode()


def _refusal_answer(
    path: str, endpoint: Endpoint | None, refusal: Refusal
) -> tuple[int, dict[str, str], bytes]:
    """A refused request's answer, in the shape the spec documents for that endpoint."""
    status = refusal.status
    extra = {}
    allowed = ENDPOINTS.get(path.rstrip("/") or "/")
    if status == 405 and allowed is not None:
        extra["Allow"] = ", ".join(sorted(allowed.methods))
    endpoint = endpoint or allowed
    if endpoint is None or endpoint.authenticated or status == 413:
        # /import's documented errors (StrictInvalid, StrictUnauthorized, StrictTooLarge).
        return _json_answer(
            status, {"code": status, "error": refusal.message, "status": _phrase(status)}, **extra
        )
    if status in (401, 403):
        return _json_answer(status, {"error": refusal.message, "status": "error"}, **extra)
    return _json_answer(status, {"error": refusal.message, "status": 0}, **extra)


# --------------------------------------------------------------------------- judging a request


def _judge(
    access: Access,
    max_request_bytes: int,
    method: str,
    target: str,
    headers: dict[str, str],
    raw: bytes,
    problem: Refusal | None = None,
) -> _Verdict:
    """Check one request against the rules and work out the answer; keeps nothing."""
    parts = urlsplit(target)
    path = parts.path
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        pairs = []
        problem = problem or Refusal(400, "query", "the query string is not UTF-8")
    query = dict(pairs)
    request = ReceivedRequest(method, path, query, headers, raw, 200)
    violations = request.violations

    def violate(rule: str, message: str, index: int | None = None) -> None:
        violations.append(SpecViolation(method, path, rule, message, index))

    endpoint: Endpoint | None = None
    try:
        endpoint = endpoint_for(method, path)
        if problem is not None:
            raise problem
        given: dict[str, set[str]] = {}
        for key, value in pairs:
            given.setdefault(key, set()).add(value)
        repeated = [key for key, values in given.items() if len(values) > 1]
        if repeated:
            raise Refusal(400, "query", f"parameters given twice: {', '.join(sorted(repeated))}")
        check_params(endpoint, query)
        check_access(endpoint, request.header("Authorization"), query, access)
        decoded = decode_records(
            endpoint, method, query, headers, raw, max_request_bytes=max_request_bytes
        )
        request.body, request.gzipped, request.records = (
            decoded.body,
            decoded.gzipped,
            decoded.records,
        )
        check_params(endpoint, decoded.params)
    except Refusal as refusal:
        if refusal.violation:
            violate(refusal.rule, refusal.message)
        status, answer_headers, body = _refusal_answer(path, endpoint, refusal)
        request.status = status
        return _Verdict(status, answer_headers, body, request)
    verdict = _check_records(access.token, endpoint, decoded.params, request, violate)
    request.status = verdict.status
    return verdict


def _check_records(
    project_token: str | None,
    endpoint: Endpoint,
    params: Mapping[str, str],
    request: ReceivedRequest,
    violate: Callable[[str, str, int | None], None],
) -> _Verdict:
    """Check each record of a well-formed request; records of another project's token are
    refused (not a breach of the spec), then the answer is worked out."""
    now = time.time()
    # spec: /import marks `strict` required, with a default of 1; the official SDKs omit it.
    strict = params.get("strict", "1" if endpoint.authenticated else "0") == "1"
    accepted: list[Any] = []
    refused: list[tuple[Any, str]] = []
    failed: list[dict[str, Any]] = []
    foreign = dropped = 0
    for index, record in enumerate(request.records):
        if endpoint.kind in ("event", "import"):
            problem = check_event(record, endpoint.path, now=now)
        else:
            problem = check_update(record, group=endpoint.kind == "group_update")
        if problem is None and project_token is not None and not endpoint.authenticated:
            token = (
                record.get("$token")
                if endpoint.kind != "event"
                else record["properties"].get("token")
            )
            if token != project_token:
                foreign += 1
                refused.append((record, f"token {token!r} is not this project's token"))
                continue
        if problem is None:
            accepted.append(record)
            continue
        field_name, message = problem
        violate(f"record.{field_name or 'record'}", message, index)
        refused.append((record, message))
        if is_silent_drop(problem):
            dropped += 1
            continue
        props = record.get("properties") if isinstance(record, dict) else None
        insert_id = props.get("$insert_id") if isinstance(props, dict) else None
        failed.append(
            {"index": index, "insert_id": insert_id, "field": field_name, "message": message}
        )
    status, headers, body = _record_answer(
        endpoint, params, strict, len(request.records), len(accepted) + dropped, failed, foreign
    )
    return _Verdict(status, headers, body, request, accepted, refused)


def _record_answer(
    endpoint: Endpoint,
    params: Mapping[str, str],
    strict: bool,
    total: int,
    accepted: int,
    failed: list[dict[str, Any]],
    foreign: int,
) -> tuple[int, dict[str, str], bytes]:
    """The answer to a well-formed request, in the documented shape for its mode; ``accepted``
    counts the records answered as well formed."""
    if endpoint.authenticated:
        if "strict" not in params and params.get("verbose") == "1":
            # What the official Python SDK sends and reads (its import checks `status`,
            # then `error`); the docs do not say which answer this request gets.
            error = None if accepted else (failed[0]["message"] if failed else "no records")
            return _json_answer(200, {"status": 1 if accepted else 0, "error": error})
        if not strict:
            return 200, {"Content-Type": "text/plain"}, b"1" if accepted else b"0"
        if failed:
            return _json_answer(
                400,
                {
                    "code": 400,
                    "error": "some data points in the request failed validation",
                    "status": "Bad Request",
                    "num_records_imported": accepted,
                    "failed_records": failed,
                },
            )
        return _json_answer(200, {"code": 200, "num_records_imported": accepted, "status": "OK"})
    if foreign and not accepted and foreign == total:
        return _json_answer(
            401, {"error": "the project token is not this project's", "status": "error"}
        )
    if strict and failed:  # /engage and /groups with strict=1: per-record messages
        return _json_answer(
            400,
            {
                "error": "some data points in the request failed validation",
                "status": 0,
                "num_records_imported": accepted,
                "failed_records": [
                    {"index": f["index"], "field": f["field"], "message": f["message"]}
                    for f in failed
                ],
            },
        )
    if params.get("img") == "1":
        return 200, {"Content-Type": "image/gif"}, _PIXEL
    if params.get("verbose") == "1":
        error = (
            None
            if accepted or total == 0
            else (failed[0]["message"] if failed else "no valid records")
        )
        payload: Any = {"status": 1 if accepted else 0, "error": error}
    else:
        payload = 1 if accepted else 0
    callback = params.get("callback")
    if callback:
        return (
            200,
            {"Content-Type": "text/javascript"},
            f"{callback}({json.dumps(payload)})".encode(),
        )
    if isinstance(payload, int):
        return 200, {"Content-Type": "text/plain"}, str(payload).encode()
    return _json_answer(200, payload)


# --------------------------------------------------------------------------- the server


class MixpanelServer:
    """A loopback HTTP server that behaves like Mixpanel's ingestion API.

    Args:
        service_account: ``(username, secret, project_id)`` (or an object with those attributes)
            that ``/import`` requires; by default ``/import`` accepts any Basic credentials.
        api_secret: a project secret ``/import`` also accepts as Basic ``secret:``.
        token: the project token: records carrying another one are refused as Mixpanel refuses
            data for another project (401 when no record of the request is this project's);
            ``/import`` also accepts it as Basic ``token:``. By default any token is accepted.
        latency: seconds to wait before answering every request.
        max_request_bytes: uncompressed request size above which the server answers 413.
        read_timeout: seconds a client may take to send its request before it is answered 408
            and disconnected (a client that declares more body than it sends).
        port: the port to listen on (default: a free one).
        on_record: called with ``(kind, record)`` for each accepted record.
        on_invalid: called with ``(path, record, reason)`` for each refused record.
        on_violation: called with each :class:`SpecViolation`.

    Accepted records are kept per kind, in arrival order: :attr:`events` (``/track``),
    :attr:`profile_updates`, :attr:`group_updates`, :attr:`imports`; records the server refused
    are in :attr:`invalid`, the spec's rules broken in :attr:`spec_violations` and every
    request in :attr:`requests`. All are thread-safe snapshots.
    """

    def __init__(
        self,
        *,
        service_account: Any = None,
        api_secret: str | None = None,
        token: str | None = None,
        latency: float = 0.0,
        max_request_bytes: int = 2_097_152,
        read_timeout: float = 30.0,
        port: int = 0,
        on_record: Callable[[str, dict[str, Any]], None] | None = None,
        on_invalid: Callable[[str, Any, str], None] | None = None,
        on_violation: Callable[[SpecViolation], None] | None = None,
    ) -> None:
        if service_account is not None and not isinstance(service_account, tuple):
            service_account = (
                service_account.username,
                service_account.secret,
                service_account.project_id,
            )
        self.service_account: tuple[str, str, str] | None = (
            tuple(str(part) for part in service_account) if service_account else None  # type: ignore[assignment]
        )
        self.api_secret = api_secret
        self.token = token
        self.latency = latency
        self.max_request_bytes = max_request_bytes
        self.read_timeout = read_timeout
        self.on_record = on_record
        self.on_invalid = on_invalid
        self.on_violation = on_violation
        self._port = port
        self._lock = threading.Condition()
        self._faults: list[_Fault] = []
        self._stores: dict[str, list[Any]] = {name: [] for name in _STORES.values()}
        self._invalid: list[tuple[str, Any, str]] = []
        self._violations: list[SpecViolation] = []
        self._requests: list[ReceivedRequest] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        #: For each :meth:`huge_next` answer, how many body bytes were written before the client
        #: stopped reading (or all of them).
        self.huge_bytes_written: list[int] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> MixpanelServer:
        """Start listening (in a daemon thread). Returns ``self``."""
        if self._httpd is not None:
            return self
        self._stopped.clear()
        server = self

        class Handler(_RequestHandler):
            owner = server
            timeout = server.read_timeout

        httpd = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="mixpanel-server",
            daemon=True,
        )
        start_thread(self._thread)  # signals are the application's, not the receiver's
        return self

    def stop(self) -> None:
        """Stop listening and close the socket."""
        httpd, self._httpd = self._httpd, None
        self._stopped.set()  # releases stalled and dripping requests
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> MixpanelServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port the server listens on."""
        if self._httpd is None:
            raise RuntimeError("the server is not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL to use as ``api_host`` (``http://127.0.0.1:<port>``)."""
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ what arrived

    def _snapshot(self, name: str) -> list[Any]:
        with self._lock:
            return list(self._stores[name])

    @property
    def events(self) -> list[dict[str, Any]]:
        """Events accepted on ``/track``."""
        return self._snapshot("events")

    @property
    def profile_updates(self) -> list[dict[str, Any]]:
        """Profile updates accepted on ``/engage``."""
        return self._snapshot("profile_updates")

    @property
    def group_updates(self) -> list[dict[str, Any]]:
        """Group updates accepted on ``/groups``."""
        return self._snapshot("group_updates")

    @property
    def imports(self) -> list[dict[str, Any]]:
        """Events accepted on ``/import``."""
        return self._snapshot("imports")

    @property
    def invalid(self) -> list[tuple[str, Any, str]]:
        """Records the server refused: ``(path, record, reason)``."""
        with self._lock:
            return list(self._invalid)

    @property
    def spec_violations(self) -> list[SpecViolation]:
        """Every rule of the ingestion spec a request broke, in arrival order (requests the
        server was told to fail included)."""
        with self._lock:
            return list(self._violations)

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Every request received, faulted ones included."""
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        """Forget everything received (faults still scheduled stay)."""
        with self._lock:
            for store in self._stores.values():
                store.clear()
            self._invalid.clear()
            self._violations.clear()
            self._requests.clear()

    def wait_for(
        self, count: int, kind: str = "events", timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Wait until at least ``count`` records of ``kind`` arrived; return them.

        ``kind`` is ``"events"``, ``"profile_updates"``, ``"group_updates"``, ``"imports"`` or
        ``"all"``. Raises ``TimeoutError`` saying what did arrive (and what was refused) when
        the time runs out.
        """
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
        deadline = time.monotonic() + timeout

        def current() -> list[Any]:
            if kind == "all":
                return [record for store in self._stores.values() for record in store]
            return list(self._stores[kind])

        with self._lock:
            while True:
                records = current()
                if len(records) >= count:
                    return records
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    refused = "; ".join(
                        f"{path}: {reason}" for path, _record, reason in self._invalid[-3:]
                    )
                    raise TimeoutError(
                        f"only {len(records)} of {count} {kind} arrived within {timeout} s "
                        f"({len(self._requests)} requests received, {len(self._invalid)} "
                        f"records refused{': ' + refused if refused else ''})"
                    )
                self._lock.wait(remaining)

    # ------------------------------------------------------------------ faults

    def fail_next(
        self,
        count: int = 1,
        status: int = 503,
        *,
        retry_after: float | str | None = None,
        body: bytes | str | Mapping[str, Any] | None = None,
        endpoint: str | None = None,
    ) -> None:
        """Answer the next ``count`` requests (to ``endpoint``, e.g. ``"/track"``, or any) with
        ``status``, optionally with a ``Retry-After`` header and a given body (by default
        ``{"code", "error", "status"}``, with Mixpanel's documented words for 401, 413, 429).
        Nothing they carry is accepted."""
        if isinstance(body, Mapping):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        header = None if retry_after is None else str(retry_after)
        self._add_fault(
            _Fault("status", count, endpoint, status=status, retry_after=header, body=body)
        )

    def delay_next(self, count: int, seconds: float, *, endpoint: str | None = None) -> None:
        """Wait ``seconds`` before handling each of the next ``count`` requests."""
        self._add_fault(_Fault("delay", count, endpoint, seconds=seconds))

    def drop_next(self, count: int = 1, *, endpoint: str | None = None) -> None:
        """Close the connection of the next ``count`` requests without answering (nothing they
        carry is accepted)."""
        self._add_fault(_Fault("drop", count, endpoint))

    def stall_next(
        self, count: int = 1, seconds: float = 3600.0, *, endpoint: str | None = None
    ) -> None:
        """Read each of the next ``count`` requests and then neither answer nor close for
        ``seconds`` (or until the server stops): a stuck proxy. Nothing is accepted."""
        self._add_fault(_Fault("stall", count, endpoint, seconds=seconds))

    def drip_next(
        self, count: int = 1, interval: float = 5.0, *, endpoint: str | None = None
    ) -> None:
        """Answer each of the next ``count`` requests one byte every ``interval`` seconds, so
        that no socket timeout ever fires. Nothing is accepted."""
        self._add_fault(_Fault("drip", count, endpoint, seconds=interval))

    def huge_next(
        self, count: int = 1, size: int = 512 * 1024 * 1024, *, endpoint: str | None = None
    ) -> None:
        """Accept each of the next ``count`` requests, then answer ``200`` with a body of ``size``
        bytes (streamed, never held in memory here)."""
        self._add_fault(_Fault("huge", count, endpoint, size=size))

    def _add_fault(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.endpoint in (None, path):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    # ------------------------------------------------------------------ request handling

    def _judge(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        raw: bytes,
        problem: Refusal | None = None,
    ) -> _Verdict:
        """Check one request against the rules, with the server's settings of the moment."""
        access = Access(self.service_account, self.api_secret, self.token)
        return _judge(access, self.max_request_bytes, method, target, headers, raw, problem)

    def _keep(self, verdict: _Verdict, *, store: bool) -> None:
        """Record a request, its violations and (with ``store``) what it delivered."""
        request = verdict.request
        path = request.path.rstrip("/") or "/"
        accepted = verdict.accepted if store else []
        refused = verdict.refused if store else []
        with self._lock:
            self._requests.append(request)
            self._violations.extend(request.violations)
            if accepted:
                self._stores[_STORES[path]].extend(accepted)
            self._invalid.extend((path, record, reason) for record, reason in refused)
            self._lock.notify_all()
        if request.violations:
            with _collectors_lock:
                for collector in _collectors:
                    collector.extend(request.violations)
            if self.on_violation is not None:
                for violation in request.violations:
                    self.on_violation(violation)
        if self.on_invalid is not None:
            for record, reason in refused:
                self.on_invalid(path, record, reason)
        if self.on_record is not None:
            for record in accepted:
                self.on_record(_STORES[path], record)


class _RequestHandler(BaseHTTPRequestHandler):
    owner: MixpanelServer
    protocol_version = "HTTP/1.1"
    server_version = "mp-logbridge-mixpanel-server"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    # ------------------------------------------------------------------ reading

    def _read_body(self) -> tuple[bytes, Refusal | None]:
        """The request body, or why it could not be read whole (the connection is then closed:
        what is left of it cannot be told from the next request)."""
        limit = self.owner.max_request_bytes + _GZIP_SLACK
        try:
            encoding = self.headers.get("Transfer-Encoding")
            if encoding is not None:
                if encoding.strip().lower() != "chunked":
                    self.close_connection = True
                    return b"", Refusal(
                        501, "transfer-encoding", f"Transfer-Encoding {encoding!r} is not supported"
                    )
                return self._read_chunked(limit)
            declared = self.headers.get_all("Content-Length") or []
            if not declared:
                return b"", None
            if len(set(declared)) != 1 or not declared[0].strip().isdigit():
                self.close_connection = True
                return b"", Refusal(400, "content-length", f"invalid Content-Length {declared!r}")
            length = int(declared[0])
            if length > limit:
                self.close_connection = True
                self._drain(length)
                return b"", too_large(self.owner.max_request_bytes, length)
            raw = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            return b"", Refusal(408, "content-length", "the request body did not arrive in time")
        if len(raw) < length:
            self.close_connection = True
            return raw, Refusal(
                400,
                "content-length",
                f"the body is shorter ({len(raw)} bytes) than its Content-Length ({length})",
            )
        return raw, None

    def _read_chunked(self, limit: int) -> tuple[bytes, Refusal | None]:
        chunks: list[bytes] = []
        size = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                chunk_size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                return b"", Refusal(400, "transfer-encoding", "malformed chunked body")
            if chunk_size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return b"".join(chunks), None
            size += chunk_size
            if size > limit:
                self.close_connection = True
                return b"", too_large(self.owner.max_request_bytes, size)
            chunk = self.rfile.read(chunk_size)
            self.rfile.readline(3)
            if len(chunk) < chunk_size:
                self.close_connection = True
                return b"", Refusal(400, "transfer-encoding", "the chunked body ended early")
            chunks.append(chunk)

    def _drain(self, length: int) -> None:
        """Read and drop up to :data:`_DRAIN_LIMIT` bytes of an oversized body, so that the
        client gets to read the answer instead of a reset connection."""
        left = min(length, _DRAIN_LIMIT)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                return
            left -= len(chunk)

    # ------------------------------------------------------------------ answering

    def _serve(self, method: str) -> None:
        owner = self.owner
        raw, problem = self._read_body()
        headers = {key: value for key, value in self.headers.items()}
        verdict = owner._judge(method, self.path, headers, raw, problem)
        request = verdict.request
        fault = owner._take_fault(request.path.rstrip("/") or "/")
        if owner.latency:
            time.sleep(owner.latency)
        if fault is not None and fault.action == "delay":
            time.sleep(fault.seconds)
            fault = None
        if fault is not None and fault.action in ("stall", "drip", "drop"):
            request.status = 0
            owner._keep(verdict, store=False)
            if fault.action == "drop":
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            else:
                self._misbehave(fault)
            return
        if fault is not None and fault.action == "status":
            body = fault.body if fault.body is not None else _injected_body(fault.status)
            request.status = fault.status
            owner._keep(verdict, store=False)
            extra = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            self._respond(fault.status, {"Content-Type": "application/json", **extra}, body)
            return
        owner._keep(verdict, store=True)
        if fault is not None and fault.action == "huge":
            self._respond_huge(fault.size)
            return
        self._respond(verdict.status, verdict.headers, verdict.body)

    def _misbehave(self, fault: _Fault) -> None:
        """Stall without answering, or drip an answer one byte at a time."""
        self.close_connection = True
        stopped = self.owner._stopped
        if fault.action == "stall":
            stopped.wait(fault.seconds)
            return
        answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 28\r\n\r\n"
        answer += b'{"status": 1, "error": null}'
        try:
            for byte in answer:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                if stopped.wait(fault.seconds):
                    return
        except OSError:  # the client gave up
            return

    def _respond_huge(self, size: int) -> None:
        """A 200 with a ``size``-byte body, written until done or the client stops reading; the
        bytes written are added to :attr:`MixpanelServer.huge_bytes_written`."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b" " * 65536
        head = b'{"status": 1, "error": null, "padding": "'
        written = 0
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(head), head))
            left = size
            while left > 0 and not self.owner._stopped.is_set():
                part = chunk[: min(left, len(chunk))]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                written += len(part)
                left -= len(part)
            self.wfile.write(b'2\r\n"}\r\n0\r\n\r\n')
        except OSError:  # the client stopped reading
            pass
        finally:
            with self.owner._lock:
                self.owner.huge_bytes_written.append(written)

    def _respond(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        try:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client went away
            self.close_connection = True

"""A Mixpanel ingestion API on loopback, for tests, demos and local development.

:class:`MixpanelServer` is a real HTTP server that accepts what Mixpanel's ``/track``,
``/engage``, ``/groups`` and ``/import`` accept — JSON array bodies (gzip where allowed), NDJSON
on ``/import``, and the legacy form body ``data=`` holding plain or base64 JSON — checks each
record against the ingestion API's rules, answers the way the API documents (``verbose``
answers, strict ``/import`` with ``failed_records``, 401, 413, 429, ...), and keeps what it
accepted::

    from mp_logbridge import Tracker, Consumer
    from mp_logbridge.testing import MixpanelServer

    with MixpanelServer() as server:
        tracker = Tracker("TOKEN", Consumer(api_host=server.url))
        tracker.track("user-1", "Signed Up", {"plan": "pro"})
        assert server.events[0]["event"] == "Signed Up"

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
import binascii
import gzip
import hmac
import json
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import _capture
from ._capture import Capture, CapturedMessage
from ._rules import check_event, check_record, check_update


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


__all__ = [
    "Capture",
    "CapturedMessage",
    "MixpanelServer",
    "ReceivedRequest",
    "capture_messages",
    "check_record",
]

_MAX_RECORDS = 2000
_PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
_STORES = {
    "/track": "events",
    "/engage": "profile_updates",
    "/groups": "group_updates",
    "/import": "imports",
}


@dataclass
class ReceivedRequest:
    """One request as the server saw it (body already decompressed)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    status: int
    records: list[Any] = field(default_factory=list)
    gzipped: bool = False

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


class _Reject(Exception):
    def __init__(self, status: int, payload: Mapping[str, Any]) -> None:
        super().__init__(payload.get("error"))
        self.status = status
        self.payload = payload


# --------------------------------------------------------------------------- the server


class MixpanelServer:
    """A loopback HTTP server that behaves like Mixpanel's ingestion API.

    Args:
        service_account: ``(username, secret, project_id)`` (or an object with those attributes)
            that ``/import`` requires; by default ``/import`` accepts any Basic credentials.
        api_secret: a project secret ``/import`` also accepts as Basic ``secret:``.
        latency: seconds to wait before answering every request.
        max_request_bytes: uncompressed request size above which the server answers 413.
        port: the port to listen on (default: a free one).

    Accepted records are kept per kind, in arrival order: :attr:`events` (``/track``),
    :attr:`profile_updates`, :attr:`group_updates`, :attr:`imports`; records the server refused
    are in :attr:`invalid` and every request in :attr:`requests`. All are thread-safe snapshots.
    """

    def __init__(
        self,
        *,
        service_account: Any = None,
        api_secret: str | None = None,
        latency: float = 0.0,
        max_request_bytes: int = 2_097_152,
        port: int = 0,
        on_record: Callable[[str, dict[str, Any]], None] | None = None,
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
        self.latency = latency
        self.max_request_bytes = max_request_bytes
        self.on_record = on_record
        self._port = port
        self._lock = threading.Condition()
        self._faults: list[_Fault] = []
        self._stores: dict[str, list[Any]] = {name: [] for name in _STORES.values()}
        self._invalid: list[tuple[str, Any, str]] = []
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
        self._thread.start()
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
            self._requests.clear()

    def wait_for(
        self, count: int, kind: str = "events", timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Wait until at least ``count`` records of ``kind`` arrived; return them.

        ``kind`` is ``"events"``, ``"profile_updates"``, ``"group_updates"``, ``"imports"`` or
        ``"all"``. Raises ``TimeoutError`` with what did arrive when the time runs out.
        """
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
                    raise TimeoutError(
                        f"{len(records)} of {count} {kind} arrived within {timeout} s"
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
        ``status``, optionally with a ``Retry-After`` header and a given body."""
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
        """Close the connection of the next ``count`` requests without answering."""
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

    def _record(self, request: ReceivedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _accept(
        self, path: str, records: Iterable[Any], invalid: Iterable[tuple[Any, str]]
    ) -> None:
        accepted = list(records)
        with self._lock:
            self._stores[_STORES[path]].extend(accepted)
            self._invalid.extend((path, record, reason) for record, reason in invalid)
            self._lock.notify_all()
        if self.on_record is not None:
            for record in accepted:
                self.on_record(_STORES[path], record)

    def _check_import_auth(self, header: str | None, query: Mapping[str, str]) -> None:
        unauthorized = _Reject(
            401, {"code": 401, "error": "Invalid credentials", "status": "Unauthorized"}
        )
        if not header or not header.startswith("Basic "):
            raise unauthorized
        try:
            user, _, secret = base64.b64decode(header[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise unauthorized from None
        if self.service_account is None and self.api_secret is None:
            return
        if self.service_account is not None:
            name, key, project = self.service_account
            if user == name and hmac.compare_digest(secret, key):
                if query.get("project_id") != project:
                    raise _Reject(
                        400,
                        {
                            "code": 400,
                            "error": "project_id does not match the service account",
                            "status": "Bad Request",
                        },
                    )
                return
        if (
            self.api_secret is not None
            and secret == ""
            and hmac.compare_digest(user, self.api_secret)
        ):
            return
        raise unauthorized

    def _handle(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], raw: bytes
    ) -> tuple[int, dict[str, str], bytes, ReceivedRequest]:
        """Process one request; returns ``(status, headers, body, record of the request)``."""
        request = ReceivedRequest(method, path, query, headers, raw, 200)
        lower = {key.lower(): value for key, value in headers.items()}
        try:
            if path not in _STORES:
                raise _Reject(404, {"error": f"unknown endpoint {path}", "status": 0})
            body = raw
            if lower.get("content-encoding", "").lower() == "gzip":
                if path in ("/engage", "/groups"):
                    raise _Reject(
                        400, {"error": f"{path} does not support gzip encoding", "status": 0}
                    )
                try:
                    body = gzip.decompress(raw)
                except (OSError, EOFError, zlib.error):
                    raise _Reject(400, {"error": "body is not valid gzip", "status": 0}) from None
                request.gzipped = True
            request.body = body
            if len(body) > self.max_request_bytes:
                raise _Reject(
                    413,
                    {
                        "code": 413,
                        "error": f"request exceeds max limit of {self.max_request_bytes} bytes",
                        "status": "Request Entity Too Large",
                    },
                )
            fields = dict(query)
            records = self._parse(method, lower.get("content-type", ""), body, fields)
            request.records = records
            if len(records) > _MAX_RECORDS:
                raise _Reject(
                    400,
                    {"error": f"a request may carry at most {_MAX_RECORDS} records", "status": 0},
                )
            if path == "/import":
                self._check_import_auth(lower.get("authorization"), fields)
                status, payload = self._ingest_import(records, fields)
            else:
                if lower.get("authorization"):
                    raise _Reject(
                        400, {"error": f"credentials must not be sent to {path}", "status": 0}
                    )
                status, payload = self._ingest(path, records, fields)
        except _Reject as reject:
            status, payload = reject.status, reject.payload
            if path in _STORES and path != "/import" and "code" not in payload:
                payload = {"error": payload.get("error"), "status": 0}
        request.status = status
        if path == "/track" and _param(query, "img") == "1" and status == 200:
            return status, {"Content-Type": "image/gif"}, _PIXEL, request
        if isinstance(payload, (int, str)):
            return status, {"Content-Type": "text/plain"}, str(payload).encode(), request
        return status, {"Content-Type": "application/json"}, json.dumps(payload).encode(), request

    @staticmethod
    def _parse(method: str, content_type: str, body: bytes, fields: dict[str, str]) -> list[Any]:
        """Records from a JSON/NDJSON body or a ``data=`` form field (plain or base64 JSON)."""
        text = ""
        ctype = content_type.split(";")[0].strip().lower()
        if method == "GET" or ctype == "application/x-www-form-urlencoded":
            if method == "POST":
                for key, values in parse_qs(
                    body.decode("utf-8", "replace"), keep_blank_values=True
                ).items():
                    fields[key] = values[-1]
            data = fields.get("data")
            if data is None:
                raise _Reject(400, {"error": "no 'data' field in the request", "status": 0})
            text = data
            try:
                decoded: Any = json.loads(text)
            except ValueError:
                try:
                    padded = text + "=" * (-len(text) % 4)
                    decoded = json.loads(
                        base64.b64decode(padded.replace("-", "+").replace("_", "/"))
                    )
                except (ValueError, binascii.Error):
                    raise _Reject(
                        400, {"error": "'data' is neither JSON nor base64 JSON", "status": 0}
                    ) from None
        elif ctype == "application/x-ndjson":
            try:
                decoded = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            except ValueError as exc:
                raise _Reject(400, {"error": f"invalid NDJSON: {exc}", "status": 0}) from None
        elif ctype in ("application/json", ""):
            try:
                decoded = json.loads(body)
            except ValueError as exc:
                raise _Reject(400, {"error": f"invalid JSON: {exc}", "status": 0}) from None
        else:
            raise _Reject(415, {"error": f"unsupported content type {content_type!r}", "status": 0})
        return decoded if isinstance(decoded, list) else [decoded]

    def _ingest(self, path: str, records: list[Any], fields: Mapping[str, str]) -> tuple[int, Any]:
        now = time.time()
        good, bad = [], []
        for record in records:
            if path == "/track":
                problem = check_event(record, False, now)
                reason = problem[1] if problem else None
            else:
                reason = check_update(record, group=path == "/groups")
            if reason is None:
                good.append(record)
            else:
                bad.append((record, reason))
        self._accept(path, good, bad)
        verbose = _param(fields, "verbose") == "1"
        if not verbose:
            return 200, 1 if good else 0
        if good or not records:
            return 200, {"status": 1, "error": None}
        return 200, {"status": 0, "error": bad[0][1] if bad else "no records"}

    def _ingest_import(self, records: list[Any], fields: Mapping[str, str]) -> tuple[int, Any]:
        now = time.time()
        strict = _param(fields, "strict", "1") == "1"
        good, bad, failed = [], [], []
        for index, record in enumerate(records):
            problem = check_event(record, strict, now)
            if problem is None:
                good.append(record)
                continue
            bad.append((record, problem[1]))
            props = record.get("properties") if isinstance(record, dict) else None
            insert_id = props.get("$insert_id") if isinstance(props, dict) else None
            failed.append(
                {"index": index, "insert_id": insert_id, "field": problem[0], "message": problem[1]}
            )
        self._accept("/import", good, bad)
        if not strict:
            return 200, 1 if good else 0
        if failed:
            return 400, {
                "code": 400,
                "error": "some data points in the request failed validation",
                "status": "Bad Request",
                "num_records_imported": len(good),
                "failed_records": failed,
            }
        return 200, {"code": 200, "num_records_imported": len(good), "status": "OK"}


def _param(fields: Mapping[str, str], key: str, default: str | None = None) -> str | None:
    """A request parameter (query string or form field)."""
    return fields.get(key, default)


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

    def _serve(self, method: str) -> None:
        owner = self.owner
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        query = {
            key: values[-1] for key, values in parse_qs(parts.query, keep_blank_values=True).items()
        }
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {key: value for key, value in self.headers.items()}
        fault = owner._take_fault(path)
        if owner.latency:
            time.sleep(owner.latency)
        if fault is not None and fault.action == "delay":
            time.sleep(fault.seconds)
            fault = None
        if fault is not None and fault.action in ("stall", "drip"):
            owner._record(ReceivedRequest(method, path, query, headers, raw, 0))
            self._misbehave(fault)
            return
        if fault is not None and fault.action == "drop":
            owner._record(ReceivedRequest(method, path, query, headers, raw, 0))
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if fault is not None and fault.action == "status":
            body = fault.body
            if body is None:
                body = json.dumps(
                    {"code": fault.status, "error": f"injected failure {fault.status}", "status": 0}
                ).encode()
            owner._record(ReceivedRequest(method, path, query, headers, raw, fault.status))
            extra = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            self._respond(fault.status, {"Content-Type": "application/json", **extra}, body)
            return
        status, response_headers, body, request = owner._handle(method, path, query, headers, raw)
        owner._record(request)
        if fault is not None and fault.action == "huge":
            self._respond_huge(fault.size)
            return
        self._respond(status, response_headers, body)

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
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

"""A fast Mixpanel-style receiver in its own process, driven over stdin/stdout by the benchmarks.

The library's validating ``mp_logbridge.testing.MixpanelServer`` checks every record against the
ingestion rules, which makes it too slow to measure throughput; this receiver only parses and
counts. It is a small HTTP/1.1 server on asyncio streams (keep-alive, ``Content-Length`` and
chunked request bodies, gzip request bodies) answering like Mixpanel:

* ``/track``, ``/engage``, ``/groups``: ``{"status":1,"error":null}``;
* ``/import``: ``{"code":200,"status":"OK","num_records_imported":N}``;
* ``/batch`` (PostHog), ``/v1/batch`` (Segment) and ``/v1/logs`` (the OpenTelemetry exporter of
  the benchmarks, one JSON array per batch): ``{"status":"Ok"}``.

Bodies are JSON arrays (or one object), or the official ``mixpanel`` package's form encoding
(``data=<json>``). Records are counted per endpoint and per *source* — the project token of a
Mixpanel record (``properties.token`` or ``$token``), else the peer's name — with the number of
distinct ids per source (``$insert_id``, PostHog's ``uuid``, Segment's ``messageId``), so a
client that sends a record twice shows duplicates.

Running the receiver in a child process keeps its CPU time out of the measured process, so the
figures a benchmark reports for a client are the client's own; the receiver's CPU seconds are
reported separately. Run as ``python benchmarks/_server.py``; the first line printed is
``{"url": ...}``. Then one JSON answer is printed per command read from stdin:

* ``stats`` — records per endpoint and per source, distinct ids, requests, the hostile modes'
  counters, and the receiver process's CPU seconds;
* ``clear`` — forget everything received;
* ``latency SECONDS`` — answer every request after that delay from now on;
* ``mode normal`` / ``mode stuck`` / ``mode drip [SECONDS]`` / ``mode huge [BYTES]`` — how to
  answer requests that arrive from now on: normally; never (the request is read, the connection
  held open until the client gives up); one byte of a valid answer every ``SECONDS`` (default
  2); a 200 whose body is ``BYTES`` long (default 512 MiB: a valid answer followed by spaces,
  streamed from a generator, never held in memory). Records of requests not answered normally
  are counted under ``unanswered_records``, not as received;
* ``wait COUNT TIMEOUT [SOURCE]`` — wait until ``COUNT`` records (of ``SOURCE``, or in all)
  arrived, then ``stats``;
* ``quit``.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

MIXPANEL_PATHS = {"/track": "track", "/engage": "engage", "/groups": "groups", "/import": "import"}
PEER_PATHS = {"/batch": "posthog", "/v1/batch": "segment", "/v1/logs": "otel"}
_ID_FIELDS = {"posthog": "uuid", "segment": "messageId"}
_OK = b'{"status":1,"error":null}'
_PEER_OK = b'{"status":"Ok"}'
_CHUNK = b" " * (1 << 20)
HUGE_DEFAULT = 512 * 1024 * 1024


def _response(status: str, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\nConnection: keep-alive\r\n\r\n"
    ).encode("ascii") + body


class Tally:
    """What arrived, per endpoint and per source (updated on the event loop, read by the
    control thread under the lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        with self.lock:
            self.endpoints: dict[str, int] = {}
            self.sources: dict[str, int] = {}
            self.ids: dict[str, set[str]] = {}
            self.requests = 0
            self.bytes_in = 0
            self.bad_requests = 0
            self.unanswered_requests = 0
            self.unanswered_records = 0
            self.huge_bytes_sent = 0
            self.drip_bytes_sent = 0
            self.connections = 0

    def add(self, endpoint: str, records: list[Any], size: int) -> None:
        per_source: dict[str, int] = {}
        new_ids: dict[str, list[str]] = {}
        for record in records:
            source, record_id = _source_and_id(endpoint, record)
            per_source[source] = per_source.get(source, 0) + 1
            if record_id is not None:
                new_ids.setdefault(source, []).append(record_id)
        with self.lock:
            self.requests += 1
            self.bytes_in += size
            self.endpoints[endpoint] = self.endpoints.get(endpoint, 0) + len(records)
            for source, count in per_source.items():
                self.sources[source] = self.sources.get(source, 0) + count
            for source, ids in new_ids.items():
                self.ids.setdefault(source, set()).update(ids)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            sources = {
                name: {"records": count, "distinct_ids": len(self.ids.get(name, ()))}
                for name, count in self.sources.items()
            }
            return {
                "total": sum(self.sources.values()),
                "endpoints": dict(self.endpoints),
                "sources": sources,
                "requests": self.requests,
                "bytes_in": self.bytes_in,
                "bad_requests": self.bad_requests,
                "unanswered_requests": self.unanswered_requests,
                "unanswered_records": self.unanswered_records,
                "huge_bytes_sent": self.huge_bytes_sent,
                "drip_bytes_sent": self.drip_bytes_sent,
                "connections": self.connections,
                "cpu": time.process_time(),
            }

    def count_of(self, source: str | None) -> int:
        with self.lock:
            if source is None:
                return sum(self.sources.values())
            return self.sources.get(source, 0)


def _source_and_id(endpoint: str, record: Any) -> tuple[str, str | None]:
    if not isinstance(record, dict):
        return "?", None
    if endpoint in _ID_FIELDS:
        value = record.get(_ID_FIELDS[endpoint])
        return endpoint, None if value is None else str(value)
    if endpoint == "otel":
        return endpoint, None
    properties = record.get("properties")
    if isinstance(properties, dict):
        token = properties.get("token")
        insert_id = properties.get("$insert_id")
    else:
        token, insert_id = record.get("$token"), record.get("$insert_id")
    return str(token or "?"), None if insert_id is None else str(insert_id)


def parse_records(endpoint: str, headers: dict[str, str], body: bytes) -> list[Any]:
    """The records of one request body (raises ``ValueError`` on a body it cannot read)."""
    if "gzip" in headers.get("content-encoding", ""):
        body = gzip.decompress(body)
    form = headers.get("content-type", "").startswith("application/x-www-form-urlencoded")
    if form and body.lstrip()[:1] not in (b"[", b"{"):
        form = parse_qs(body.decode("utf-8"))
        text = form.get("data", [""])[0].strip()
        if text[:1] not in ("[", "{"):
            text = base64.b64decode(text).decode("utf-8")
        payload: Any = json.loads(text)
    else:
        payload = json.loads(body)
    if endpoint in ("posthog", "segment"):
        payload = payload.get("batch") or []
    if isinstance(payload, dict):
        payload = [payload]
    if not isinstance(payload, list):
        raise ValueError("not a list of records")
    return payload


class Receiver:
    """The asyncio HTTP/1.1 server; its answers depend on ``latency`` and ``mode``."""

    def __init__(self) -> None:
        self.tally = Tally()
        self.latency = 0.0
        self.mode = "normal"
        self.drip_interval = 2.0
        self.huge_bytes = HUGE_DEFAULT
        self.url = ""
        self.loop: asyncio.AbstractEventLoop | None = None

    async def _read_request(
        self, reader: asyncio.StreamReader
    ) -> tuple[str, str, dict[str, str], bytes] | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(parts)
        else:
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        return method, target, headers, body

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tally = self.tally
        with tally.lock:
            tally.connections += 1
        try:
            while True:
                request = await self._read_request(reader)
                if request is None:
                    return
                _method, target, headers, body = request
                path = target.split("?", 1)[0].rstrip("/") or "/"
                endpoint = MIXPANEL_PATHS.get(path) or PEER_PATHS.get(path)
                if endpoint is None:
                    writer.write(_response("404 Not Found", b'{"error":"not found"}'))
                    await writer.drain()
                    continue
                try:
                    records = parse_records(endpoint, headers, body)
                except (ValueError, OSError, EOFError, UnicodeDecodeError, AttributeError):
                    with tally.lock:
                        tally.bad_requests += 1
                    writer.write(_response("400 Bad Request", b'{"status":0,"error":"bad body"}'))
                    await writer.drain()
                    continue
                mode = self.mode
                if mode != "normal":
                    with tally.lock:
                        tally.unanswered_requests += 1
                        tally.unanswered_records += len(records)
                    if mode == "stuck":
                        await reader.read()  # until the client gives up and closes
                    elif mode == "drip":
                        await self._drip(writer)
                    else:
                        await self._huge(writer)
                    return
                tally.add(endpoint, records, len(body))
                if self.latency > 0:
                    await asyncio.sleep(self.latency)
                if endpoint == "import":
                    answer = b'{"code":200,"status":"OK","num_records_imported":%d}' % len(records)
                elif endpoint in PEER_PATHS.values():
                    answer = _PEER_OK
                else:
                    answer = _OK
                writer.write(_response("200 OK", answer))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            writer.close()

    async def _drip(self, writer: asyncio.StreamWriter) -> None:
        response = _response("200 OK", _OK)
        for index in range(len(response)):
            writer.write(response[index : index + 1])
            await writer.drain()
            with self.tally.lock:
                self.tally.drip_bytes_sent += 1
            await asyncio.sleep(self.drip_interval)

    async def _huge(self, writer: asyncio.StreamWriter) -> None:
        total = self.huge_bytes
        writer.write(_response("200 OK", b"", length=total))
        for chunk in _huge_body(total):
            writer.write(chunk)
            await writer.drain()  # waits while the client does not read: nothing piles up here
            with self.tally.lock:
                self.tally.huge_bytes_sent += len(chunk)

    async def run(self, started: threading.Event) -> None:
        self.loop = asyncio.get_running_loop()
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=512)
        port = server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        started.set()
        async with server:
            await server.serve_forever()


def _huge_body(total: int) -> Iterator[memoryview]:
    """A valid answer followed by spaces (still valid JSON), ``total`` bytes in all."""
    view = memoryview(_CHUNK)
    yield memoryview(_OK[:total])
    remaining = total - min(total, len(_OK))
    while remaining > 0:
        size = min(remaining, len(view))
        yield view[:size]
        remaining -= size


def serve() -> None:
    receiver = Receiver()
    started = threading.Event()
    thread = threading.Thread(
        target=lambda: asyncio.run(receiver.run(started)), name="receiver", daemon=True
    )
    thread.start()
    if not started.wait(30):
        raise SystemExit("the receiver did not start")
    print(json.dumps({"url": receiver.url}), flush=True)
    tally = receiver.tally
    for line in sys.stdin:
        command, *args = line.split()
        answer: dict[str, Any] = {"ok": True}
        if command == "quit":
            break
        if command == "clear":
            tally.clear()
        elif command == "latency":
            receiver.latency = float(args[0])
        elif command == "mode":
            receiver.mode = args[0]
            if args[0] == "drip" and len(args) > 1:
                receiver.drip_interval = float(args[1])
            if args[0] == "huge":
                receiver.huge_bytes = int(args[1]) if len(args) > 1 else HUGE_DEFAULT
            if args[0] not in ("normal", "stuck", "drip", "huge"):
                answer = {"ok": False, "error": f"unknown mode {args[0]}"}
        elif command == "wait":
            count, timeout = int(args[0]), float(args[1])
            source = args[2] if len(args) > 2 else None
            deadline = time.monotonic() + timeout
            while tally.count_of(source) < count and time.monotonic() < deadline:
                time.sleep(0.005)
            answer = tally.snapshot()
        else:
            answer = tally.snapshot()
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    serve()

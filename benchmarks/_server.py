"""A ``MixpanelServer`` in its own process, driven over stdin/stdout by the benchmark scripts.

Running the server in a child process keeps its CPU time out of the measured process, so the
figures a benchmark reports for a client are the client's own, and the server's CPU time is
reported separately. Run as ``python benchmarks/_server.py [--latency SECONDS]``; the first line
printed is ``{"url": ...}``. Then one JSON answer is printed per command read from stdin:

* ``stats`` — records accepted per kind, peer records, requests, refused records, and the
  server process's CPU seconds;
* ``clear`` — forget everything received;
* ``latency SECONDS`` — answer every request after that delay from now on;
* ``wait COUNT TIMEOUT`` — wait until ``COUNT`` records in all arrived, then ``stats``;
* ``quit``.

Besides Mixpanel's endpoints, the server counts the records of two other analytics clients'
batch endpoints (``/batch`` as PostHog uses it, ``/v1/batch`` as Segment uses it), so those
clients can be measured against the same HTTP server, with the same latency.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import threading
import time
from typing import Any

from mp_logbridge.testing import MixpanelServer, ReceivedRequest

PEER_PATHS = ("/batch", "/v1/batch")
_KINDS = ("events", "profile_updates", "group_updates", "imports")


class BenchServer(MixpanelServer):
    """``MixpanelServer`` that also accepts (and only counts) peers' batch requests."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._peer_lock = threading.Lock()
        self.peer_records = 0

    def _handle(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], raw: bytes
    ) -> tuple[int, dict[str, str], bytes, ReceivedRequest]:
        if path not in PEER_PATHS:
            return super()._handle(method, path, query, headers, raw)
        body = raw
        if any(k.lower() == "content-encoding" and "gzip" in v for k, v in headers.items()):
            body = gzip.decompress(raw)
        count = len(json.loads(body).get("batch") or ())
        with self._peer_lock:
            self.peer_records += count
        request = ReceivedRequest(method, path, query, headers, b"", 200)
        return 200, {"Content-Type": "application/json"}, b'{"status": "Ok"}', request

    def counts(self) -> dict[str, Any]:
        """What arrived so far, and the CPU seconds this process has used."""
        counts: dict[str, Any] = {kind: len(getattr(self, kind)) for kind in _KINDS}
        counts["peer"] = self.peer_records
        counts["total"] = sum(counts[kind] for kind in (*_KINDS, "peer"))
        counts["requests"] = len(self.requests)
        counts["invalid"] = len(self.invalid)
        counts["cpu"] = time.process_time()
        return counts

    def forget(self) -> None:
        self.clear()
        with self._peer_lock:
            self.peer_records = 0

    def wait_total(self, count: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        counts = self.counts()
        while counts["total"] < count and time.monotonic() < deadline:
            time.sleep(0.005)
            counts = self.counts()
        return counts


def serve(latency: float) -> None:
    server = BenchServer(latency=latency).start()
    print(json.dumps({"url": server.url}), flush=True)
    try:
        for line in sys.stdin:
            command, *args = line.split()
            if command == "quit":
                break
            if command == "clear":
                server.forget()
                answer: dict[str, Any] = {"ok": True}
            elif command == "latency":
                server.latency = float(args[0])
                answer = {"ok": True}
            elif command == "wait":
                answer = server.wait_total(int(args[0]), float(args[1]))
            else:
                answer = server.counts()
            print(json.dumps(answer), flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.0)
    serve(parser.parse_args().latency)

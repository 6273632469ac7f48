"""Zero-code: an auto-instrumented Flask app sends page views, configured by environment only.

The app (``otel_flask_app.py``, which knows nothing of Mixpanel) runs in a child process under
``opentelemetry-instrument`` with ``OTEL_TRACES_EXPORTER=mixpanel,...``; real HTTP requests go to
it, events arrive at a loopback ``MixpanelServer`` (``MIXPANEL_API_HOST``) and the other exporter
(OTLP over HTTP to a loopback collector stand-in, or the console) still gets every span.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from support import ROOT, child_env, closed_port_url

from mp_logbridge.testing import MixpanelServer

pytestmark = [pytest.mark.subprocess, pytest.mark.timeout(120)]

INSTRUMENT = Path(sys.executable).parent / "opentelemetry-instrument"
APP = ROOT / "tests" / "otel_flask_app.py"
TOKEN = "zero-code-token"


class Collector:
    """An OTLP/HTTP trace receiver on loopback: keeps the names and kinds of the spans posted."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                with collector.lock:
                    for resource in request.resource_spans:
                        for scope in resource.scope_spans:
                            collector.spans.extend((span.name, span.kind) for span in scope.spans)
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def names(self) -> list[str]:
        with self.lock:
            return [name for name, _kind in self.spans]

    def wait_for(self, count: int, timeout: float = 15.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.names()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the collector got {self.names()}")
            time.sleep(0.02)
        return self.names()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    stand_in = Collector()
    yield stand_in
    stand_in.stop()


class App:
    """The Flask app in a child process under ``opentelemetry-instrument``."""

    def __init__(self, **env: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        settings = {
            "OTEL_SERVICE_NAME": "shop",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }
        settings.update(env)
        self.process = subprocess.Popen(
            [str(INSTRUMENT), sys.executable, str(APP), str(self.port)],
            env=child_env(**settings),
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.stdout = self.stderr = ""
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{self.url}/health", timeout=2)
                return
            except requests.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the app did not start: {self.stderr[-3000:]}") from None
                time.sleep(0.05)

    def get(self, path: str, **headers: str) -> requests.Response:
        return requests.get(self.url + path, headers=headers, timeout=10)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        """Interrupt the app (a normal exit: exit hooks run) and wait for it, within bounds."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.stdout, self.stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.stdout, self.stderr = self.process.communicate(timeout=10)
            raise AssertionError(
                f"the app did not exit in {timeout} s: {self.stderr[-3000:]}"
            ) from None
        return self.process.returncode


@pytest.fixture
def apps() -> Iterator[Any]:
    started: list[App] = []

    def start(**env: str) -> App:
        app = App(**env)
        started.append(app)
        return app

    yield start
    for app in started:
        if app.process.poll() is None:
            app.process.kill()
            app.process.communicate(timeout=10)


def _requests(app: App) -> None:
    assert app.get("/users/7", **{"X-User": "u-7"}).status_code == 200
    assert app.get("/users/8", baggage="enduser.id=u-8").status_code == 200
    assert app.get("/boom", **{"X-User": "u-9"}).status_code == 500
    assert app.get("/health").status_code == 200  # nobody: a span, but no event
    response = requests.post(f"{app.url}/checkout", headers={"X-User": "u-7"}, timeout=10)
    assert response.status_code == 201


@pytest.mark.parametrize(
    "semconv", ["", "http"], ids=["old-http-conventions", "new-http-conventions"]
)
def test_page_views_with_otlp_beside(
    apps: Any, collector: Collector, mixpanel_server: MixpanelServer, semconv: str
) -> None:
    app = apps(
        OTEL_TRACES_EXPORTER="mixpanel,otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
        OTEL_SEMCONV_STABILITY_OPT_IN=semconv,
        MIXPANEL_TOKEN=TOKEN,
        MIXPANEL_API_HOST=mixpanel_server.url,
    )
    collector.wait_for(1)  # the readiness probe's /health span
    _requests(app)
    events = mixpanel_server.wait_for(4, timeout=20)
    by_path = {e["properties"]["path"]: e for e in events}
    assert set(by_path) == {"/users/7", "/users/8", "/boom", "/checkout"}
    for event in events:
        props = event["properties"]
        assert event["event"] == "Page Viewed"
        assert props["token"] == TOKEN and props["service"] == "shop"
        assert props["span_kind"] == "server"
        assert isinstance(props["duration_ms"], float) and props["duration_ms"] > 0
        assert len(props["trace_id"]) == 32
    user = by_path["/users/7"]["properties"]
    assert user["distinct_id"] == "u-7"
    assert user["route"] == "/users/<int:user_id>"
    assert user["method"] == "GET" and user["status_code"] == 200 and user["success"] is True
    assert by_path["/users/8"]["properties"]["distinct_id"] == "u-8"  # from baggage
    boom = by_path["/boom"]["properties"]
    assert boom["status_code"] == 500 and boom["status"] == "error" and boom["success"] is False
    assert boom["exception_type"] == "RuntimeError" and boom["exception_message"] == "kaboom"
    checkout = by_path["/checkout"]["properties"]
    assert checkout["method"] == "POST" and checkout["status_code"] == 201
    # The OTLP exporter beside it got every server span, /health included.
    names = collector.wait_for(6)
    assert names.count("GET /health") == 2 and "GET /users/<int:user_id>" in names
    assert app.stop() == 0
    assert len(mixpanel_server.events) == 4  # nothing more, nothing twice
    assert mixpanel_server.invalid == []
    assert "mp_logbridge" not in app.stderr


def test_what_is_queued_is_delivered_at_exit(apps: Any, mixpanel_server: MixpanelServer) -> None:
    app = apps(
        OTEL_TRACES_EXPORTER="mixpanel",
        OTEL_BSP_SCHEDULE_DELAY="60000",  # spans stay in the batch processor until exit
        MIXPANEL_TOKEN=TOKEN,
        MIXPANEL_API_HOST=mixpanel_server.url,
    )
    _requests(app)
    assert mixpanel_server.events == []
    assert app.stop() == 0
    assert len(mixpanel_server.wait_for(4, timeout=10)) == 4


def test_console_exporter_beside(apps: Any, mixpanel_server: MixpanelServer) -> None:
    app = apps(
        OTEL_TRACES_EXPORTER="console,mixpanel",
        MIXPANEL_TOKEN=TOKEN,
        MIXPANEL_API_HOST=mixpanel_server.url,
    )
    assert app.get("/users/3", **{"X-User": "u-3"}).status_code == 200
    (event,) = mixpanel_server.wait_for(1, timeout=20)
    assert event["properties"]["distinct_id"] == "u-3"
    assert app.stop() == 0
    assert app.stdout.count('"kind": "SpanKind.SERVER"') == 2  # /health and /users/3
    assert '"enduser.id": "u-3"' in app.stdout


def test_without_a_token_the_app_and_the_other_exporter_are_unaffected(
    apps: Any, collector: Collector
) -> None:
    app = apps(OTEL_TRACES_EXPORTER="mixpanel,otlp", OTEL_EXPORTER_OTLP_ENDPOINT=collector.url)
    _requests(app)
    assert len(collector.wait_for(6)) >= 6
    assert app.stop() == 0
    assert "MixpanelSpanExporter has no Mixpanel token" in app.stderr


def test_mixpanel_down_never_holds_up_the_app(apps: Any, collector: Collector) -> None:
    app = apps(
        OTEL_TRACES_EXPORTER="mixpanel,otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
        MIXPANEL_TOKEN=TOKEN,
        MIXPANEL_API_HOST=closed_port_url(),
    )
    for _ in range(3):
        _requests(app)
    assert len(collector.wait_for(16)) >= 16
    started = time.monotonic()
    assert app.stop(timeout=40) == 0
    # The exit waits for delivery within the consumer's bounded flush, not for ever.
    assert time.monotonic() - started < 30
    assert "dropped" in app.stderr or "could not" in app.stderr

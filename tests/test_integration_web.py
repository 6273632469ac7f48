"""ASGI (Starlette/FastAPI, served by uvicorn or driven through httpx's ASGI transport), Flask
and AWS Lambda integrations, against the real frameworks and the real receiver."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

# Endpoint annotations are resolved by FastAPI from this module's globals.
from fastapi import WebSocket
from support import attached, wait_until

from mp_logbridge import MixpanelHandler, tag
from mp_logbridge.context import current_context
from mp_logbridge.testing import MixpanelServer

TOKEN = "web-test-token"
log = logging.getLogger("webapp.views")


@pytest.fixture
def handler(mixpanel_server: MixpanelServer) -> Iterator[MixpanelHandler]:
    made = MixpanelHandler(
        TOKEN, api_host=mixpanel_server.url, flush_interval=0.05, default_distinct_id="nobody-yet"
    )
    log.setLevel(logging.INFO)
    with attached(log, made):
        yield made
    made.close()


# --------------------------------------------------------------------------- ASGI


def _fastapi_app(**middleware: Any) -> Any:
    from fastapi import APIRouter, FastAPI
    from starlette.routing import Mount, Route

    from mp_logbridge.integrations.asgi import MixpanelMiddleware, identify

    app = FastAPI()
    router = APIRouter(prefix="/api")

    @router.get("/users/{user_id}")
    async def user(user_id: int) -> dict[str, int]:
        await asyncio.sleep(0.001)  # other requests run meanwhile
        log.info("user", extra=tag.track("User Viewed", viewed=user_id))
        return {"user": user_id}

    @app.get("/login")
    def login() -> dict[str, str]:  # a sync endpoint: FastAPI runs it in a thread
        identify("late-user")
        log.info("logged in", extra=tag.track("Logged In"))
        return {}

    @app.get("/boom")
    async def boom() -> None:
        log.info("boom", extra=tag.track("Boom"))
        raise RuntimeError("endpoint failed")

    @app.websocket("/ws/{room}")
    async def ws(websocket: WebSocket, room: str) -> None:
        await websocket.accept()
        log.info("joined", extra=tag.track("Room Joined", room=room))
        await websocket.send_text("hi")
        await websocket.close()

    async def legacy(request: Any) -> Any:
        from starlette.responses import PlainTextResponse

        log.info("legacy", extra=tag.track("Legacy Viewed"))
        return PlainTextResponse("ok")

    app.include_router(router)
    app.router.routes.append(Mount("/old", routes=[Route("/pages/{page}", legacy)]))
    app.add_middleware(MixpanelMiddleware, **middleware)
    return app


def _user_header(scope: Any) -> str | None:
    return dict(scope["headers"]).get(b"x-user", b"").decode() or None


def test_asgi_binds_user_route_and_request_id_per_request(
    handler: MixpanelHandler, mixpanel_server: MixpanelServer
) -> None:
    import httpx

    app = _fastapi_app(distinct_id=_user_header)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            calls = [
                client.get(f"/api/users/{n}", headers={"x-user": f"u{n}", "x-request-id": f"r{n}"})
                for n in range(40)
            ]
            responses = await asyncio.gather(*calls)
            assert all(r.status_code == 200 for r in responses)
            assert (
                await client.get("/old/pages/3", headers={"x-user": "u-old"})
            ).status_code == 200
            assert (await client.get("/login")).status_code == 200
            assert (await client.get("/boom", headers={"x-user": "u-boom"})).status_code == 500
        assert current_context().distinct_id is None

    asyncio.run(main())
    assert handler.flush(5)
    users = [e for e in mixpanel_server.events if e["event"] == "User Viewed"]
    assert len(users) == 40
    for event in users:  # every event has its own request's user and id: nothing leaked
        props = event["properties"]
        assert props["distinct_id"] == f"u{props['viewed']}"
        assert props["request_id"] == f"r{props['viewed']}"
        assert props["route"] == "/api/users/{user_id}"
    by_name = {e["event"]: e["properties"] for e in mixpanel_server.events}
    assert by_name["Legacy Viewed"]["route"] == "/old/pages/{page}"
    assert by_name["Legacy Viewed"]["distinct_id"] == "u-old"
    assert by_name["Logged In"]["distinct_id"] == "late-user"
    assert by_name["Boom"]["distinct_id"] == "u-boom"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Starlette's TestClient on httpx
def test_asgi_async_user_callable_errors_and_websockets(
    handler: MixpanelHandler, mixpanel_server: MixpanelServer, library_warnings: Any
) -> None:
    from starlette.testclient import TestClient

    async def user_of(scope: Any) -> Any:
        if scope["path"].endswith("/13"):
            raise LookupError("session store down")
        return {"user": "ws-user"}.get("user") if scope["type"] == "websocket" else "async-user"

    client = TestClient(_fastapi_app(distinct_id=user_of, route=False))
    assert client.get("/api/users/12").status_code == 200
    assert client.get("/api/users/13").status_code == 200  # the callable failed: served anyway
    with client.websocket_connect("/ws/lobby") as websocket:
        assert websocket.receive_text() == "hi"
    assert handler.flush(5)
    props = {
        (e["event"], e["properties"].get("viewed")): e["properties"] for e in mixpanel_server.events
    }
    assert props["User Viewed", 12]["distinct_id"] == "async-user"
    assert props["User Viewed", 12]["route"] == "/api/users/12"  # route=False: the path
    assert props["User Viewed", 13]["distinct_id"] == "nobody-yet"
    assert props["Room Joined", None]["distinct_id"] == "ws-user"
    library_warnings.wait_for("session store down")


class _Uvicorn:
    """A real uvicorn server on a free loopback port, in a thread of this process."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        # log_config=None: uvicorn's own logging setup is a dictConfig, which closes every
        # handler made before it (the test's MixpanelHandler included).
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", log_config=None
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        wait_until(lambda: self.server.started, 10, "uvicorn did not start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def test_asgi_under_uvicorn_with_opentelemetry_names_the_user_on_the_span(
    mixpanel_server: MixpanelServer,
) -> None:
    """OpenTelemetry's ASGI middleware ends the server span after the app returned, when the
    user bound for the request is gone: the span attribute the middleware set names it."""
    import httpx
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.trace import TracerProvider

    from mp_logbridge.integrations.opentelemetry import MixpanelSpanProcessor

    provider = TracerProvider()
    spans = MixpanelSpanProcessor(TOKEN, api_host=mixpanel_server.url, flush_interval=0.05)
    provider.add_span_processor(spans)
    app = OpenTelemetryMiddleware(_fastapi_app(distinct_id=_user_header), tracer_provider=provider)
    with _Uvicorn(app) as url:
        assert httpx.get(f"{url}/api/users/5", headers={"x-user": "span-user"}).status_code == 200
        assert httpx.get(f"{url}/api/users/6").status_code == 200  # nobody
    assert spans.force_flush(5000)
    pages = [e for e in mixpanel_server.events if e["event"] == "Page Viewed"]
    assert [p["properties"]["distinct_id"] for p in pages] == ["span-user"]
    assert spans.stats()["no_user"] == 1
    spans.shutdown()
    provider.shutdown()


def test_asgi_flush_after_each_request_does_not_block_the_loop(
    mixpanel_server: MixpanelServer,
) -> None:
    import httpx

    handler = MixpanelHandler(TOKEN, api_host=mixpanel_server.url, flush_interval=60)
    app = _fastapi_app(distinct_id=_user_header, flush_timeout=5.0)
    mixpanel_server.delay_next(1, 1.5)  # the first delivery is slow
    with attached(log, handler), _Uvicorn(app) as url:
        # The response goes out before the middleware flushes; the flush then waits ~1.5 s.
        assert httpx.get(f"{url}/api/users/1", headers={"x-user": "u1"}).status_code == 200
        time.sleep(0.2)
        started = time.monotonic()
        assert httpx.get(f"{url}/old/pages/1", headers={"x-user": "u2"}).status_code == 200
        other = time.monotonic() - started
        # Served while the first request's flush was still waiting for the receiver: the
        # flush runs off the event loop.
        assert "User Viewed" not in {e["event"] for e in mixpanel_server.events}
        assert other < 1.0, other
        # ... and it did deliver, a minute before the handler's flush_interval would have.
        mixpanel_server.wait_for(2, timeout=10)
        assert {e["event"] for e in mixpanel_server.events} == {"User Viewed", "Legacy Viewed"}
    handler.close()


# --------------------------------------------------------------------------- Flask


def _flask_app(**options: Any) -> Any:
    from flask import Flask, request

    from mp_logbridge.integrations.flask import MixpanelFlask, identify

    app = Flask("webtest")
    extension = MixpanelFlask(**options)
    extension.init_app(app)

    @app.get("/users/<int:user_id>")
    def user(user_id: int) -> dict[str, int]:
        log.info("user", extra=tag.track("User Viewed", viewed=user_id))
        return {"user": user_id}

    @app.post("/login")
    def login() -> dict[str, str]:
        identify(request.form["user"])
        log.info("in", extra=tag.track("Logged In"))
        return {}

    @app.get("/boom")
    def boom() -> None:
        log.info("boom", extra=tag.track("Boom"))
        raise RuntimeError("view failed")

    return app


def test_flask_binds_user_route_request_id_and_unbinds(
    handler: MixpanelHandler, mixpanel_server: MixpanelServer
) -> None:
    app = _flask_app(distinct_id=lambda request: request.headers.get("X-User"))
    client = app.test_client()
    assert (
        client.get("/users/3", headers={"X-User": "f-3", "X-Request-ID": "req-3"}).status_code
        == 200
    )
    assert client.post("/login", data={"user": "f-login"}).status_code == 200
    assert client.get("/boom", headers={"X-User": "f-boom"}).status_code == 500
    assert client.get("/users/4").status_code == 200
    assert current_context().distinct_id is None
    assert handler.flush(5)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for event in mixpanel_server.events:
        by_name.setdefault(event["event"], []).append(event["properties"])
    first, second = by_name["User Viewed"]
    assert (first["distinct_id"], first["route"], first["request_id"]) == (
        "f-3",
        "/users/<int:user_id>",
        "req-3",
    )
    assert second["distinct_id"] == "nobody-yet"  # the previous requests left nothing bound
    assert by_name["Logged In"][0]["distinct_id"] == "f-login"
    assert by_name["Boom"][0]["distinct_id"] == "f-boom"


def test_flask_flushes_at_teardown_when_asked(mixpanel_server: MixpanelServer) -> None:
    handler = MixpanelHandler(TOKEN, api_host=mixpanel_server.url, flush_interval=60)
    app = _flask_app(distinct_id=lambda request: "serverless-user", flush_timeout=5)
    with attached(log, handler):
        app.test_client().get("/users/9")
        # delivered when the request was torn down: no flush here, and the interval is a minute
        assert [e["properties"]["viewed"] for e in mixpanel_server.events] == [9]
    handler.close()


def test_flask_opentelemetry_span_gets_the_user_whatever_the_hook_order(
    mixpanel_server: MixpanelServer,
) -> None:
    from opentelemetry.instrumentation.flask import FlaskInstrumentor
    from opentelemetry.sdk.trace import TracerProvider

    from mp_logbridge.integrations.opentelemetry import MixpanelSpanProcessor

    provider = TracerProvider()
    spans = MixpanelSpanProcessor(TOKEN, api_host=mixpanel_server.url, flush_interval=0.05)
    provider.add_span_processor(spans)
    # The extension's hooks are registered first, so its before_request runs before the
    # instrumentation started the span: the user is named on the span after the response.
    app = _flask_app(distinct_id=lambda request: request.headers.get("X-User"))
    FlaskInstrumentor().instrument_app(app, tracer_provider=provider)
    try:
        client = app.test_client()
        client.get("/users/1", headers={"X-User": "otel-user"})
        client.post("/login", data={"user": "otel-login"})
        assert spans.force_flush(5000)
        pages = sorted(
            (e["properties"]["route"], e["properties"]["distinct_id"])
            for e in mixpanel_server.events
            if e["event"] == "Page Viewed"
        )
        assert pages == [("/login", "otel-login"), ("/users/<int:user_id>", "otel-user")]
    finally:
        FlaskInstrumentor().uninstrument_app(app)
        spans.shutdown()
        provider.shutdown()


# --------------------------------------------------------------------------- AWS Lambda


class FakeContext:
    """What the Lambda runtime passes as ``context`` (the parts the decorator reads)."""

    def __init__(self, remaining_ms: float, request_id: str = "req-abc") -> None:
        self.deadline = time.monotonic() + remaining_ms / 1000
        self.aws_request_id = request_id
        self.function_name = "thumbnailer"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline - time.monotonic()) * 1000))


def test_lambda_handler_delivers_before_returning(mixpanel_server: MixpanelServer) -> None:
    from mp_logbridge import bound
    from mp_logbridge.integrations.aws_lambda import flush_before_return

    handler = MixpanelHandler(TOKEN, api_host=mixpanel_server.url, flush_interval=60)

    @flush_before_return
    def function(event: dict[str, Any], context: Any) -> dict[str, int]:
        with bound(distinct_id=event["user"]):
            log.info("made", extra=tag.track("Thumbnail Created", size=event["size"]))
        return {"status": 200}

    with attached(log, handler):
        for n, size in enumerate((64, 128)):
            assert function({"user": "u9", "size": size}, FakeContext(3000, f"req-{n}")) == {
                "status": 200
            }
            assert len(mixpanel_server.events) == n + 1  # delivered before the handler returned
    props = mixpanel_server.events[1]["properties"]
    assert (props["request_id"], props["function"], props["size"]) == ("req-1", "thumbnailer", 128)
    handler.close()


def test_lambda_flush_is_bounded_by_the_remaining_time(mixpanel_server: MixpanelServer) -> None:
    from mp_logbridge.integrations.aws_lambda import flush_before_return, flush_budget

    handler = MixpanelHandler(TOKEN, api_host=mixpanel_server.url, flush_interval=60)
    mixpanel_server.latency = 3.0  # Mixpanel is slow today

    @flush_before_return(max_flush=10.0, margin_ms=500)
    def function(event: Any, context: Any) -> str:
        log.info("x", extra=tag.track("Slow Day", distinct_id="u1"))
        return "done"

    try:
        with attached(log, handler):
            started = time.monotonic()
            assert function({}, FakeContext(800)) == "done"
            took = time.monotonic() - started
        # a hang guard, not a timing measurement: the flush had 0.3 s (800 ms - 500 ms margin)
        assert took < 2.0, took
    finally:
        mixpanel_server.latency = 0.0
        handler.close()
    assert flush_budget(FakeContext(100), 2.0, 500) == 0.0
    assert flush_budget(object(), 2.0, 500) == 2.0
    assert 0.0 < flush_budget(FakeContext(10_000), 2.0, 500) <= 2.0


def test_lambda_async_handler(mixpanel_server: MixpanelServer) -> None:
    from mp_logbridge.integrations.aws_lambda import flush_before_return

    handler = MixpanelHandler(TOKEN, api_host=mixpanel_server.url, flush_interval=60)

    @flush_before_return(max_flush=3)
    async def function(event: Any, context: Any) -> int:
        await asyncio.sleep(0)
        log.info("x", extra=tag.track("Async Invoked", distinct_id="u1"))
        return 7

    with attached(log, handler):
        assert asyncio.run(function({}, FakeContext(5000))) == 7
        assert [e["event"] for e in mixpanel_server.events] == ["Async Invoked"]
    handler.close()

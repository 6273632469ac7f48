"""A FastAPI app (any ASGI app works the same) whose requests know their user.

``MixpanelMiddleware`` binds the user (a callable reading the ASGI scope; here a header, in a
real app the session or token), the route template and a request id around each request,
without blocking the event loop; the lifespan's shutdown closes the handler with
``await handler.aclose()``, which waits for delivery in a thread while the loop keeps running.
Run it: ``python examples/fastapi_app.py`` — it drives the app through httpx's ASGI transport
against a local receiver; to serve it for real: ``uvicorn fastapi_app:app``.
"""

import asyncio
import contextlib
import logging

import httpx
from fastapi import FastAPI

from mp_logbridge import MixpanelHandler, tag
from mp_logbridge.integrations.asgi import MixpanelMiddleware
from mp_logbridge.testing import MixpanelServer

log = logging.getLogger("api")


def user_of(scope: dict) -> str | None:
    return dict(scope["headers"]).get(b"x-user-id", b"").decode() or None


def create_app(handler: MixpanelHandler) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await handler.aclose()  # deliver what is left, off the event loop

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(MixpanelMiddleware, distinct_id=user_of)

    @app.get("/reports/{report_id}")
    async def report(report_id: int) -> dict:
        log.info("report", extra=tag.track("Report Viewed", report_id=report_id))
        return {"id": report_id}

    return app


async def drive(app: FastAPI) -> None:
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))
        transport = httpx.ASGITransport(app=app)
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://api")
        )
        await asyncio.gather(
            client.get("/reports/1", headers={"x-user-id": "u-1"}),
            client.get("/reports/2", headers={"x-user-id": "u-2"}),
        )


def main() -> None:
    with MixpanelServer() as receiver:
        handler = MixpanelHandler("YOUR_PROJECT_TOKEN", api_host=receiver.url, flush_interval=30)
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        asyncio.run(drive(create_app(handler)))
        for event in sorted(receiver.events, key=lambda e: e["properties"]["report_id"]):
            p = event["properties"]
            print(event["event"], p["distinct_id"], p["route"], p["report_id"])


if __name__ == "__main__":
    main()

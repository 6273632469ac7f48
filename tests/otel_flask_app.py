"""A Flask app already instrumented the OpenTelemetry way, knowing nothing of Mixpanel.

Run by the zero-code tests under ``opentelemetry-instrument`` (which instruments Flask and
installs the exporters named by ``OTEL_TRACES_EXPORTER``): ``python otel_flask_app.py PORT``.
It names the signed-in user on the request's span (``enduser.id``), as OpenTelemetry's
conventions suggest; ``X-User`` stands for a real session.
"""

from __future__ import annotations

import sys

from flask import Flask, request
from opentelemetry import trace

app = Flask(__name__)


@app.before_request
def name_the_user() -> None:
    user = request.headers.get("X-User")
    if user:
        trace.get_current_span().set_attribute("enduser.id", user)


@app.get("/health")
def health() -> str:
    return "ok"


@app.get("/users/<int:user_id>")
def user_page(user_id: int) -> dict[str, int]:
    return {"user": user_id}


@app.post("/checkout")
def checkout() -> tuple[str, int]:
    return "created", 201


@app.get("/boom")
def boom() -> str:
    raise RuntimeError("kaboom")


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True, use_reloader=False)

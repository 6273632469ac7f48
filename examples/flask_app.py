"""A Flask app whose requests know their user: the ``MixpanelFlask`` extension.

The extension binds the request's user (here from a header; in a real app the session's user),
its URL rule as ``route`` and a ``request_id`` for every tagged log record and instrumented
call made during the request, and unbinds them when the request ends. Run it:
``python examples/flask_app.py`` — it drives the app with Flask's test client against a local
receiver; to serve it for real, call ``create_app().run()``.
"""

import logging

from flask import Flask, request

from mp_logbridge import MixpanelHandler, instrument, tag
from mp_logbridge.integrations.flask import MixpanelFlask
from mp_logbridge.testing import MixpanelServer

log = logging.getLogger("webapp")


@instrument("Search", capture_args=["query"], capture_result=lambda hits: {"results": len(hits)})
def search(query: str) -> list:
    return [item for item in ("blue shoes", "red shoes", "blue hat") if query in item]


def create_app() -> Flask:
    app = Flask(__name__)
    MixpanelFlask(app, distinct_id=lambda request: request.headers.get("X-User-Id"))

    @app.post("/signup")
    def signup() -> dict:
        plan = request.json.get("plan", "free")
        log.info(
            "signed up", extra=tag.track("Signed Up", plan=plan) + tag.people.set({"plan": plan})
        )
        return {"ok": True}

    @app.get("/search")
    def search_view() -> dict:
        return {"hits": search(request.args.get("q", ""))}

    return app


def main() -> None:
    with MixpanelServer() as receiver:
        handler = MixpanelHandler("YOUR_PROJECT_TOKEN", api_host=receiver.url)
        logging.basicConfig(level=logging.INFO, handlers=[handler])
        client = create_app().test_client()
        client.post("/signup", json={"plan": "pro"}, headers={"X-User-Id": "u-100"})
        client.get("/search?q=blue", headers={"X-User-Id": "u-100"})
        client.get("/search?q=red", headers={"X-User-Id": "u-200"})
        handler.flush()
        for event in receiver.events:
            p = event["properties"]
            print(
                event["event"],
                p["distinct_id"],
                p["route"],
                {k: p[k] for k in ("plan", "query", "results") if k in p},
            )


if __name__ == "__main__":
    main()

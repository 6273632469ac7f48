"""A Flask app that binds the signed-in user per request.

``mp_logbridge.bind``/``unbind`` in ``before_request``/``teardown_request`` make every tagged log
record and instrumented call during the request belong to that user, with request-wide
super-properties. Run it: ``python examples/flask_app.py`` — it drives the app with Flask's test
client against a local receiver; to serve it for real, call ``create_app(...).run()``.
"""

import logging

from flask import Flask, g, request

import mp_logbridge
from mp_logbridge import MixpanelHandler, instrument, tag
from mp_logbridge.testing import MixpanelServer

log = logging.getLogger("webapp")


@instrument("Search", capture_args=["query"], capture_result=lambda hits: {"results": len(hits)})
def search(query: str) -> list:
    return [item for item in ("blue shoes", "red shoes", "blue hat") if query in item]


def create_app() -> Flask:
    app = Flask(__name__)

    @app.before_request
    def bind_user() -> None:
        user = request.headers.get("X-User-Id")  # in a real app: the session's user
        g.mixpanel_token = mp_logbridge.bind(distinct_id=user, route=request.path)

    @app.teardown_request
    def unbind_user(_exc: BaseException | None) -> None:
        token = g.pop("mixpanel_token", None)
        if token is not None:
            mp_logbridge.unbind(token)

    @app.post("/signup")
    def signup() -> dict:
        plan = request.json.get("plan", "free")
        log.info("signed up", extra=tag.track("Signed Up", plan=plan) + tag.people.set({"plan": plan}))
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
            print(event["event"], p["distinct_id"], p["route"], {k: p[k] for k in ("plan", "query", "results") if k in p})


if __name__ == "__main__":
    main()

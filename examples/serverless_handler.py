"""A serverless function (AWS Lambda style) that flushes before returning.

Serverless runtimes freeze or discard the process between invocations, so background delivery
must finish before the handler returns: call ``flush(timeout=...)`` at the end of every
invocation (bounded, so a Mixpanel outage cannot eat the function's time budget). Create the
handler once, at module level, so invocations reuse its connection.
Run it: ``python examples/serverless_handler.py`` (simulates three invocations).
"""

import logging

from mp_logbridge import MixpanelHandler, bound, tag
from mp_logbridge.testing import MixpanelServer

log = logging.getLogger("fn")
mixpanel: MixpanelHandler | None = None  # created once per cold start


def handler(event: dict, context: object = None) -> dict:
    """The function entry point."""
    assert mixpanel is not None
    try:
        with bound(distinct_id=event["user"]):
            log.info("invoked", extra=tag.track("Thumbnail Created", size=event["size"]))
            return {"status": 200}
    finally:
        delivered = mixpanel.flush(timeout=2.0)  # before the runtime freezes us
        if not delivered:
            log.warning("some analytics were not delivered in time")


def main() -> None:
    global mixpanel
    with MixpanelServer() as receiver:
        mixpanel = MixpanelHandler("YOUR_PROJECT_TOKEN", api_host=receiver.url, flush_interval=0.5)
        logging.basicConfig(level=logging.INFO, handlers=[mixpanel])
        for size in (64, 128, 256):
            handler({"user": "u-9", "size": size})
            print(f"after invocation: {len(receiver.events)} event(s) delivered")


if __name__ == "__main__":
    main()

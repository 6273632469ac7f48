"""A serverless function (AWS Lambda style) that delivers before returning.

Serverless runtimes freeze or discard the process between invocations, so background delivery
must finish before the handler returns — without eating the function's time budget when
Mixpanel is slow. ``flush_before_return`` flushes every background consumer after each
invocation, bounded by ``max_flush`` and by the invocation's remaining time
(``context.get_remaining_time_in_millis()``) minus a margin. Create the handler once, at module
level, so invocations reuse its connection.
Run it: ``python examples/serverless_handler.py`` (simulates three invocations).
"""

import logging
import time

from mp_logbridge import MixpanelHandler, bound, tag
from mp_logbridge.integrations.aws_lambda import flush_before_return
from mp_logbridge.testing import MixpanelServer

log = logging.getLogger("fn")


@flush_before_return(max_flush=2.0, margin_ms=300)
def handler(event: dict, context: object) -> dict:
    """The function entry point."""
    with bound(distinct_id=event["user"]):
        log.info("invoked", extra=tag.track("Thumbnail Created", size=event["size"]))
        return {"status": 200}


class LambdaContext:
    """Stands in for the runtime's context object."""

    def __init__(self, request_id: str, budget_ms: int = 3000) -> None:
        self.aws_request_id = request_id
        self.function_name = "thumbnailer"
        self._deadline = time.monotonic() + budget_ms / 1000

    def get_remaining_time_in_millis(self) -> int:
        return int((self._deadline - time.monotonic()) * 1000)


def main() -> None:
    with MixpanelServer() as receiver:
        # created once per cold start; the interval is long: the decorator delivers
        mixpanel = MixpanelHandler("YOUR_PROJECT_TOKEN", api_host=receiver.url, flush_interval=30)
        logging.basicConfig(level=logging.INFO, handlers=[mixpanel])
        for n, size in enumerate((64, 128, 256)):
            handler({"user": "u-9", "size": size}, LambdaContext(f"req-{n}"))
            print(f"after invocation: {len(receiver.events)} event(s) delivered")
        print("request ids:", [e["properties"]["request_id"] for e in receiver.events])


if __name__ == "__main__":
    main()

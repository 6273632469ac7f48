"""Mixpanel analytics from structlog, in the two usual setups.

Run it with ``python examples/structlog_app.py``: it starts a local stand-in for Mixpanel's
ingestion API (``mp_logbridge.testing.MixpanelServer``), logs a few tagged events and prints
the log lines and then what the server received.

1. structlog only: ``MixpanelProcessor`` sits in the processor chain. It sends what the ``mixpanel``
   key of an event carries, removes that key and hands the event on to the renderer, so every
   log line is still written.
2. structlog on top of stdlib logging: the same processor in structlog's chain, stdlib renders
   through ``ProcessorFormatter``, and a ``MixpanelHandler`` on the stdlib logger serves plain
   ``logging`` calls tagged with ``extra=``. Each message is sent once: the processor removed the
   tag before structlog handed the event to stdlib, so the handler has nothing to send again.
"""

from __future__ import annotations

import logging
import sys

import structlog

from mp_logbridge import MixpanelHandler, MixpanelProcessor, bound, tag
from mp_logbridge.testing import MixpanelServer

TOKEN = "example-project-token"


def structlog_only(server: MixpanelServer) -> None:
    """structlog writes the lines; MixpanelProcessor sends the tagged ones."""
    mixpanel = MixpanelProcessor(
        TOKEN,
        api_host=server.url,  # omit it to send to Mixpanel (region= "us", "eu" or "in")
        distinct_id_key="user_id",  # the user, as bound with bind_contextvars below
        copy_keys=["request_id"],  # event-dict keys that become event properties
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,  # first, so the processor sees user_id
            structlog.processors.add_log_level,
            mixpanel,  # before format_exc_info, so it can read exc_info
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=True),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
    )
    log = structlog.get_logger()
    structlog.contextvars.bind_contextvars(user_id="user-42", request_id="req-1")
    try:
        log.info("signed up", **tag.track("Signed Up", plan="pro"))
        log.info("profile saved", **tag.people.set({"$email": "ann@example.com"}))
        log.info("company created", **tag.groups.set("Company", "Acme", {"seats": 10}))
        log.info("paid", **tag.charge(19.0))
        log.info("report exported", mixpanel=True)  # the event is named after the log message
        log.info("cache warmed")  # no tag: a log line only
    finally:
        structlog.contextvars.clear_contextvars()
        mixpanel.flush(5.0)
        mixpanel.close()


def structlog_on_stdlib(server: MixpanelServer) -> None:
    """structlog hands its events to stdlib logging; stdlib handlers write and send."""
    mixpanel = MixpanelProcessor(TOKEN, api_host=server.url)
    handler = MixpanelHandler(TOKEN, api_host=server.url)  # for plain logging calls
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.KeyValueRenderer(key_order=["event"]),
            ],
        )
    )
    app_logger = logging.getLogger("shop")
    app_logger.setLevel(logging.INFO)
    app_logger.propagate = False
    app_logger.addHandler(console)
    app_logger.addHandler(handler)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            mixpanel,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
    )
    try:
        with bound(distinct_id="user-7"):  # the user for both kinds of call
            structlog.get_logger("shop").info("checkout", **tag.track("Checkout", items=3))
            logging.getLogger("shop.legacy").info("refund", extra=tag.track("Refunded"))
    finally:
        mixpanel.close()
        handler.close()
        app_logger.removeHandler(console)
        app_logger.removeHandler(handler)


def print_received(server: MixpanelServer) -> None:
    """What reached the (local) Mixpanel server."""
    for event in server.events:
        props = event["properties"]
        own = {k: v for k, v in props.items() if k not in ("token", "time", "$insert_id")}
        own = {k: v for k, v in own.items() if not k.startswith(("mp_", "$lib"))}
        print(f"  event {event['event']!r}: {own}")
    for kind in ("profile_updates", "group_updates"):
        for update in getattr(server, kind):
            own = {k: v for k, v in update.items() if k not in ("$token", "$time")}
            print(f"  {kind[:-1].replace('_', ' ')}: {own}")


def main() -> None:
    with MixpanelServer() as server:
        print("== structlog only")
        structlog_only(server)
        print("-- received:")
        print_received(server)
        server.clear()

        print("== structlog on top of stdlib logging")
        structlog_on_stdlib(server)
        print("-- received:")
        print_received(server)
    structlog.reset_defaults()


if __name__ == "__main__":
    main()

"""``mp-logbridge demo``: the library doing its whole job, end to end, with no Mixpanel account.

Starts the local receiver (:class:`mp_logbridge.testing.MixpanelServer`), configures logging
through ``dictConfig`` with a :class:`MixpanelHandler` pointed at it, runs a small simulated shop
that uses every front door — tagged log records (an event, a profile update, a group update, a
charge), instrumented function calls (one of them failing), structlog when it is installed, and a
direct :class:`Tracker` — then flushes and prints what the receiver accepted and the delivery
counters. The receiver fails one request on purpose, so the retry is visible too.
"""

from __future__ import annotations

import logging
import logging.config
from collections import Counter
from typing import Any, TextIO

from ._context import bound
from ._handler import MixpanelHandler
from ._instrument import instrument
from ._tags import tag
from ._tracker import Tracker
from .testing import MixpanelServer

__all__ = ["run_demo"]

TOKEN = "demo-project-token"
_FAST_RETRY = {"initial_backoff": 0.2, "max_backoff": 1.0, "jitter": [0.0, 0.1]}

log = logging.getLogger("demo_shop")


@instrument(
    "Report Exported",
    distinct_id="user_id",
    capture_args=["fmt"],
    capture_result="rows",
    logger="demo_shop",
)
def export_report(user_id: str, fmt: str = "csv") -> int:
    """A business function: each call becomes a "Report Exported" event."""
    return {"csv": 120, "pdf": 12}.get(fmt, 0)


@instrument("Card Charged", capture_args=["amount"], logger="demo_shop")
def charge_card(amount: float) -> str:
    """Fails for large amounts: the event records the failure, the exception propagates."""
    if amount > 500:
        raise ValueError("card declined: amount over limit")
    return "ch_123"


def _simulated_shop(out: TextIO) -> None:
    # Tagged log records: ordinary log calls that also carry a Mixpanel message.
    log.info(
        "user signed up",
        extra=tag.track("Signed Up", distinct_id="u-1001", plan="pro", source="ads"),
    )
    log.info(
        "profile updated",
        extra=tag.people.set({"$email": "ada@example.com", "plan": "pro"}, distinct_id="u-1001"),
    )
    log.info(
        "company created",
        extra=tag.groups.set("Company", "Acme", {"$name": "Acme Inc.", "plan": "enterprise"}),
    )
    with bound(distinct_id="u-1001", Company="Acme"):  # the user of this "request"
        log.info(
            "payment captured",
            extra=tag.track("Purchase", amount=49.0) + tag.charge(49.0, {"sku": "PRO-M"}),
        )
        # Instrumented calls: one event per call, with duration and outcome.
        export_report("u-1001", "csv")
        export_report("u-1001", fmt="pdf")
        try:
            charge_card(900.0)
        except ValueError as exc:
            log.warning("charge failed: %s", exc)
    _structlog_part(out)


def _structlog_part(out: TextIO) -> Any:
    try:
        import structlog
    except ImportError:
        out.write("(structlog is not installed: skipping the structlog front door)\n")
        return None
    from ._structlog import MixpanelProcessor

    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, MixpanelHandler)
    processor = MixpanelProcessor(consumer=handler.consumer, token=TOKEN)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            processor,
            structlog.processors.KeyValueRenderer(key_order=["event"]),
        ],
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    slog = structlog.get_logger()
    structlog.contextvars.bind_contextvars(user_id="u-1002")
    slog.info(
        "search", **tag.track("Searched", distinct_id="u-1002", query="blue shoes", results=42)
    )
    structlog.contextvars.clear_contextvars()
    return processor


def _summary(server: MixpanelServer, stats: dict[str, Any], out: TextIO) -> None:
    events = server.events
    names = Counter(event["event"] for event in events)
    failed = sum(1 for event in events if event["properties"].get("success") is False)
    profiles = server.profile_updates
    ops = Counter(
        next(
            k
            for k in update
            if k.startswith("$") and k not in ("$token", "$time", "$distinct_id", "$ip")
        )
        for update in profiles
    )
    charges = [
        update["$append"]["$transactions"]
        for update in profiles
        if isinstance(update.get("$append"), dict) and "$transactions" in update["$append"]
    ]
    groups = server.group_updates
    write = out.write
    write(f"\nThe local Mixpanel receiver at {server.url} accepted:\n")
    write(f"  events: {len(events)}\n")
    for name, count in sorted(names.items()):
        extra = f" ({failed} failed)" if name == "Card Charged" and failed else ""
        write(f"    {name:<20} x{count}{extra}\n")
    write(
        f"  profile updates: {len(profiles)} ({', '.join(f'{op} x{n}' for op, n in sorted(ops.items()))})\n"
    )
    write(
        f"  group updates: {len(groups)} ({', '.join(sorted({g['$group_key'] + '/' + str(g['$group_id']) for g in groups}))})\n"
    )
    total = sum(float(charge.get("$amount", 0)) for charge in charges)
    write(f"  revenue: {total:.2f} in {len(charges)} charge(s)\n")
    dropped = {reason: n for reason, n in stats.get("dropped", {}).items() if n}
    write(
        f"Delivery through logging: {stats.get('sent', 0)} records sent in {stats.get('batches', 0)} requests, "
        f"{stats.get('retries', 0)} retried after a server error, dropped: {dropped or 'none'}\n"
    )
    invalid = server.invalid
    if invalid:
        write(f"The receiver refused {len(invalid)} record(s): {invalid[:3]}\n")


def run_demo(out: TextIO) -> int:
    """Run the demo, writing to ``out``; returns an exit code (0 when everything arrived)."""
    with MixpanelServer() as server:
        server.fail_next(1, 503, endpoint="/track")  # the first batch of events is retried
        logging.config.dictConfig(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "formatters": {"plain": {"format": "log: %(levelname)s %(name)s: %(message)s"}},
                "handlers": {
                    "mixpanel": {
                        "class": "mp_logbridge.MixpanelHandler",
                        "token": TOKEN,
                        "api_host": server.url,
                        "super_properties": {"app": "demo-shop"},
                        "flush_interval": 0.2,
                        "retry": _FAST_RETRY,
                    },
                    "console": {
                        "class": "logging.StreamHandler",
                        "stream": out,
                        "formatter": "plain",
                    },
                },
                "root": {"level": "INFO", "handlers": ["mixpanel", "console"]},
            }
        )
        handler = logging.getLogger().handlers[0]
        assert isinstance(handler, MixpanelHandler)
        out.write(f"Local Mixpanel receiver listening at {server.url}\n\n")
        _simulated_shop(out)
        delivered = handler.flush(10)
        stats = handler.stats()
        with Tracker(TOKEN, api_host=server.url) as tracker:  # the Ruby SDK's vocabulary
            tracker.track("u-1002", "Invited Teammate", {"invitee": "u-1003"})
            tracker.people.increment("u-1002", {"invites sent": 1})
        delivered = delivered and not tracker.stats()["dropped_total"]
        _summary(server, stats, out)
        logging.getLogger().removeHandler(handler)
        handler.close()
        expected_events = 6 + (1 if "Searched" in {e["event"] for e in server.events} else 0)
        ok = delivered and len(server.events) >= expected_events and not server.invalid
        out.write("\nEverything arrived.\n" if ok else "\nSomething did not arrive (see above).\n")
        return 0 if ok else 1

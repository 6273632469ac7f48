"""Tagged log records through OpenTelemetry's logging pipeline: the log record processor.

Real OpenTelemetry logger providers and ``LoggingHandler`` objects (the one of
``opentelemetry-instrumentation-logging`` and the SDK's deprecated one), stdlib loggers, a real
``MixpanelHandler``, and loopback ``MixpanelServer`` receivers.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.instrumentation.logging.handler import LoggingHandler as InstrumentationHandler
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs import LoggingHandler as SdkHandler
from opentelemetry.sdk.trace import TracerProvider
from support import RecordCollector

import mp_logbridge
from mp_logbridge import tag
from mp_logbridge.integrations.opentelemetry import MixpanelLogProcessor
from mp_logbridge.testing import MixpanelServer

TOKEN = "otel-log-token"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _handler_classes() -> list[Any]:
    return [InstrumentationHandler, SdkHandler]


class OtelLogs:
    """A logger provider with the Mixpanel log processor, and OpenTelemetry logging handlers."""

    def __init__(self, server: MixpanelServer, handler_class: Any, **options: Any) -> None:
        self.provider = LoggerProvider()
        options.setdefault("api_host", server.url)
        options.setdefault("flush_interval", 0.05)
        self.processor = MixpanelLogProcessor(options.pop("token", TOKEN), **options)
        self.provider.add_log_record_processor(self.processor)
        self.handler_class = handler_class

    def handler(self) -> logging.Handler:
        handler: logging.Handler = self.handler_class(logger_provider=self.provider)
        return handler

    def close(self) -> None:
        self.provider.shutdown()


@pytest.fixture(params=_handler_classes(), ids=["instrumentation-handler", "sdk-handler"])
def otel_logs(
    request: pytest.FixtureRequest, mixpanel_server: MixpanelServer
) -> Iterator[Callable[..., OtelLogs]]:
    made: list[OtelLogs] = []

    def make(server: MixpanelServer = mixpanel_server, **options: Any) -> OtelLogs:
        logs = OtelLogs(server, request.param, **options)
        made.append(logs)
        return logs

    yield make
    for logs in made:
        logs.close()


def _without_ids(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records with the per-send ``$insert_id`` left out (everything else must be equal)."""
    out = []
    for record in records:
        record = dict(record)
        if "properties" in record:
            record["properties"] = {
                k: v for k, v in record["properties"].items() if k != "$insert_id"
            }
        out.append(record)
    return out


# --------------------------------------------------------------------------- the same messages


def test_the_processor_sends_what_the_handler_sends(
    otel_logs: Callable[..., OtelLogs], make_handler, make_logger
) -> None:
    with MixpanelServer() as through_handler, MixpanelServer() as through_otel:
        logs = otel_logs(through_otel, super_properties={"service": "shop"})
        handler = make_handler(api_host=through_handler.url, super_properties={"service": "shop"})
        via_handler = make_logger(handler)
        via_otel = make_logger(logs.handler())
        lines: list[tuple[str, dict[str, Any]]] = [
            ("signed up", tag.track("Signed Up", plan="pro", items=["a", "b"], n={"k": 1})),
            ("Exported Report", {"mixpanel": True}),
            ("paid", tag.track("Purchase", amount=30.5) + tag.charge(30.5)),
            (
                "profile",
                tag.people.set({"$email": "a@example.com"}) + tag.people.increment({"n": 1}),
            ),
            ("company", tag.groups.set("Company", "Acme", {"$name": "Acme Inc."})),
        ]
        with mp_logbridge.bound(distinct_id="u-1", tier="gold"):
            for text, extra in lines:
                # One record, handled by each way in (a copy made before either saw it).
                record = via_handler.makeRecord(
                    "shop", logging.INFO, "f", 1, text, (), None, extra=extra
                )
                copy = logging.makeLogRecord(dict(record.__dict__))
                via_handler.handle(record)
                via_otel.handle(copy)
        handler.flush()
        logs.processor.force_flush()
        for kind, count in (("events", 3), ("profile_updates", 3), ("group_updates", 1)):
            expected = _without_ids(through_handler.wait_for(count, kind))
            assert _without_ids(through_otel.wait_for(count, kind)) == expected, kind
        assert through_otel.invalid == [] and through_handler.invalid == []
        events = through_otel.events
        assert events[1]["event"] == "Exported Report"  # named by the log message
        assert events[0]["properties"]["items"] == ["a", "b"]  # OTel's tuple, sent as a list
        assert events[0]["properties"]["tier"] == "gold"


def test_events_carry_the_active_span_and_baggage_user(
    otel_logs: Callable[..., OtelLogs], mixpanel_server: MixpanelServer, make_logger
) -> None:
    from opentelemetry import baggage
    from opentelemetry import context as otel_context

    logs = otel_logs()
    logger = make_logger(logs.handler())
    provider = TracerProvider()
    token = otel_context.attach(baggage.set_baggage("enduser.id", "from-baggage"))
    try:
        with provider.get_tracer("t").start_as_current_span("request") as span:
            logger.info("clicked", extra=tag.track("Clicked"))
    finally:
        otel_context.detach(token)
        provider.shutdown()
    logs.processor.force_flush()
    props = mixpanel_server.wait_for(1)[0]["properties"]
    assert props["distinct_id"] == "from-baggage"
    assert props["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert props["span_id"] == format(span.get_span_context().span_id, "016x")


def test_exceptions_of_the_record_become_properties(
    otel_logs: Callable[..., OtelLogs], mixpanel_server: MixpanelServer, make_logger
) -> None:
    logs = otel_logs(default_distinct_id="u")
    logger = make_logger(logs.handler())
    try:
        raise ValueError("declined")
    except ValueError:
        logger.exception("payment failed", extra=tag.track("Payment Failed"))
    logs.processor.force_flush()
    props = mixpanel_server.wait_for(1)[0]["properties"]
    assert props["exception_type"] == "ValueError"
    assert props["exception_message"] == "declined"


def test_what_opentelemetry_does_to_tag_values(
    otel_logs: Callable[..., OtelLogs], mixpanel_server: MixpanelServer, make_logger
) -> None:
    """The installed SDK copies a dict ``extra`` value into the attributes: mappings stay
    mappings, sequences become tuples, other objects become their ``str()``."""
    logs = otel_logs(default_distinct_id="u")
    logger = make_logger(logs.handler())
    when = dt.datetime(2024, 5, 6, 7, 8, 9)
    logger.info("x", extra=tag.track("Typed", when=when, tags=("a", "b"), nested={"l": [1, 2]}))
    logs.processor.force_flush()
    props = mixpanel_server.wait_for(1)[0]["properties"]
    assert props["when"] == str(when)  # not Mixpanel's form, which the handler would send
    assert props["tags"] == ["a", "b"]
    assert props["nested"] == {"l": [1, 2]}


# --------------------------------------------------------------------------- exactly once


@pytest.mark.parametrize("otel_first", [True, False], ids=["otel-first", "handler-first"])
def test_sent_exactly_once_with_both_on_one_logger(
    otel_logs: Callable[..., OtelLogs],
    mixpanel_server: MixpanelServer,
    make_handler,
    make_logger,
    otel_first: bool,
) -> None:
    logs = otel_logs()
    otel_handler, handler = logs.handler(), make_handler()
    logger = make_logger(*((otel_handler, handler) if otel_first else (handler, otel_handler)))
    with mp_logbridge.bound(distinct_id="u-1"):
        for n in range(20):
            logger.info("signed up", extra=tag.track("Signed Up", n=n) + tag.people.set({"n": n}))
    handler.flush()
    logs.processor.force_flush()
    events = mixpanel_server.wait_for(20)
    updates = mixpanel_server.wait_for(20, "profile_updates")
    handler.flush()
    logs.processor.force_flush()
    assert sorted(e["properties"]["n"] for e in mixpanel_server.events) == list(range(20))
    assert len(mixpanel_server.profile_updates) == 20
    assert len(events) == len(updates) == 20


@pytest.mark.parametrize("otel_on_child", [True, False], ids=["otel-on-child", "otel-on-root"])
def test_sent_exactly_once_across_propagation(
    otel_logs: Callable[..., OtelLogs],
    mixpanel_server: MixpanelServer,
    make_handler,
    make_logger,
    request: pytest.FixtureRequest,
    otel_on_child: bool,
) -> None:
    logs = otel_logs()
    otel_handler, handler = logs.handler(), make_handler()
    parent_name = f"otel-once-{request.node.name}"
    child_handler, parent_handler = (
        (otel_handler, handler) if otel_on_child else (handler, otel_handler)
    )
    make_logger(parent_handler, name=parent_name)
    child = make_logger(child_handler, name=f"{parent_name}.child", propagate=True)
    for n in range(10):
        child.info("viewed", extra=tag.track("Viewed", n=n, distinct_id="u"))
    handler.flush()
    logs.processor.force_flush()
    mixpanel_server.wait_for(10)
    handler.flush()
    logs.processor.force_flush()
    assert sorted(e["properties"]["n"] for e in mixpanel_server.events) == list(range(10))


def test_opentelemetry_handler_on_two_loggers_sends_once(
    otel_logs: Callable[..., OtelLogs],
    mixpanel_server: MixpanelServer,
    make_logger,
    request: pytest.FixtureRequest,
) -> None:
    logs = otel_logs()
    parent_name = f"otel-twice-{request.node.name}"
    make_logger(logs.handler(), name=parent_name)
    child = make_logger(logs.handler(), name=f"{parent_name}.child", propagate=True)
    for n in range(5):
        child.info("viewed", extra=tag.track("Viewed", n=n, distinct_id="u"))
    logs.processor.force_flush()
    mixpanel_server.wait_for(5)
    logs.processor.force_flush()
    assert len(mixpanel_server.events) == 5


def test_two_projects_each_get_the_record(
    otel_logs: Callable[..., OtelLogs], mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    logs = otel_logs()
    other_project = make_handler("another-token")
    for order in ((logs.handler(), other_project), (other_project, logs.handler())):
        make_logger(*order).info("x", extra=tag.track("Both", distinct_id="u"))
    other_project.flush()
    logs.processor.force_flush()
    tokens = sorted(e["properties"]["token"] for e in mixpanel_server.wait_for(4))
    assert tokens == ["another-token", "another-token", TOKEN, TOKEN]


def test_the_same_time_on_another_logger_is_another_record(
    otel_logs: Callable[..., OtelLogs], mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    """The note the processor leaves names the record's logger and time: a record of another
    logger made at the very same time is not mistaken for it."""
    logs = otel_logs()
    handler = make_handler()
    otel_only, handler_only = make_logger(logs.handler()), make_logger(handler)
    first = otel_only.makeRecord(
        otel_only.name, logging.INFO, "f", 1, "a", (), None, extra=tag.track("A", distinct_id="u")
    )
    second = handler_only.makeRecord(
        handler_only.name,
        logging.INFO,
        "f",
        1,
        "b",
        (),
        None,
        extra=tag.track("B", distinct_id="u"),
    )
    second.created = first.created
    otel_only.handle(first)
    handler_only.handle(second)
    handler.flush()
    logs.processor.force_flush()
    assert sorted(e["event"] for e in mixpanel_server.wait_for(2)) == ["A", "B"]


# --------------------------------------------------------------------------- other ways in


def test_a_tag_set_directly_through_the_logs_api(mixpanel_server: MixpanelServer) -> None:
    from opentelemetry._logs import LogRecord

    provider = LoggerProvider()
    processor = MixpanelLogProcessor(TOKEN, api_host=mixpanel_server.url, flush_interval=0.05)
    provider.add_log_record_processor(processor)
    try:
        otel_logger = provider.get_logger("shop.events")
        otel_logger.emit(
            LogRecord(
                body="order placed",
                attributes={
                    "mixpanel": {"event": "Order Placed", "distinct_id": "u-5", "total": 12}
                },
            )
        )
        otel_logger.emit(LogRecord(body="plain line", attributes={"other": 1}))
        otel_logger.emit(
            LogRecord(body="Named By Body", attributes={"mixpanel": True, "enduser": 1})
        )
        processor.force_flush()
        events = mixpanel_server.wait_for(1)
        assert [(e["event"], e["properties"]["total"]) for e in events] == [("Order Placed", 12)]
        assert processor.stats()["dropped"]["invalid"] == 1  # ``True`` and nobody to send it for
    finally:
        provider.shutdown()


def test_bad_tags_are_counted_and_logging_goes_on(
    otel_logs: Callable[..., OtelLogs],
    mixpanel_server: MixpanelServer,
    make_logger,
    library_warnings: RecordCollector,
) -> None:
    logs = otel_logs(default_distinct_id="u")
    logger = make_logger(logs.handler())
    logger.info("x", extra={"mixpanel": 42})
    logger.info("x", extra={"mixpanel": {"event": "NaN", "value": float("nan")}})  # by hand
    logger.info("x", extra=tag.track("Fine"))
    logs.processor.force_flush()
    assert [e["event"] for e in mixpanel_server.wait_for(1)] == ["Fine"]
    assert logs.processor.stats()["dropped"]["invalid"] == 2
    library_warnings.wait_for("invalid")


def test_without_a_token_records_are_counted(
    otel_logs: Callable[..., OtelLogs], make_logger
) -> None:
    logs = otel_logs(token=None)
    logger = make_logger(logs.handler())
    logger.info("x", extra=tag.track("E", distinct_id="u"))
    assert logs.processor.stats()["skipped"] == 1
    assert logs.processor.consumer is None


def test_after_shutdown_records_are_counted_as_closed(
    otel_logs: Callable[..., OtelLogs], make_logger
) -> None:
    logs = otel_logs()
    logger = make_logger(logs.handler())
    logs.processor.shutdown()
    logger.info("x", extra=tag.track("E", distinct_id="u"))
    assert logs.processor.stats()["dropped"]["closed"] == 1


def test_an_sdk_that_drops_mappings_is_reported(
    monkeypatch: pytest.MonkeyPatch, library_warnings: RecordCollector
) -> None:
    import importlib.metadata

    from mp_logbridge.integrations import opentelemetry as bridge

    assert bridge._sdk_keeps_mappings()  # the installed one keeps them
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.32.1")
    processor = MixpanelLogProcessor(TOKEN, consumer=lambda kind, message: None)
    processor.shutdown()
    library_warnings.wait_for("drops dict-valued log attributes")

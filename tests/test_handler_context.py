"""Who a tagged record is for and what it carries: bound context, baggage, record facts, traces.

The context (``bound``/``bind``), the OpenTelemetry baggage and the active span are read on the
caller's thread when the record is logged, so each thread and asyncio task sees its own; the
records are built later on the sender thread and delivered to a loopback ``MixpanelServer``.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from support import RecordCollector

from mp_logbridge import InvalidMessageError, bind, bound, tag, unbind
from mp_logbridge.context import BoundContext, current_context
from mp_logbridge.stdlib import DEFAULT_RECORD_PROPERTIES
from mp_logbridge.testing import MixpanelServer

TOKEN = "context-test-token"


# --------------------------------------------------------------------------- helpers


class _Baggage:
    """``with _Baggage("enduser.id", "u"):`` — OpenTelemetry baggage for the block."""

    def __init__(self, key: str, value: str) -> None:
        self._context = baggage.set_baggage(key, value)
        self._token: Any = None

    def __enter__(self) -> None:
        self._token = otel_context.attach(self._context)

    def __exit__(self, *exc: object) -> None:
        otel_context.detach(self._token)


def _by_event(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {event["event"]: event["properties"] for event in events}


# --------------------------------------------------------------------------- binding


def test_each_thread_sees_only_its_own_binding(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler()
    log = make_logger(handler)
    threads_count, per_thread = 4, 25
    all_bound = threading.Barrier(threads_count)
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            with bound(distinct_id=f"user-{index}", thread_index=index):
                all_bound.wait(10)  # every thread is inside its binding before anyone logs
                for sequence in range(per_thread):
                    log.info("work", extra=tag.track("Work", logged_by=index, seq=sequence))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with bound(distinct_id="main-thread-user", thread_index=-1):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert errors == []
    assert handler.flush(10)
    events = mixpanel_server.wait_for(threads_count * per_thread)
    for event in events:
        props = event["properties"]
        assert props["distinct_id"] == f"user-{props['logged_by']}"
        assert props["thread_index"] == props["logged_by"]


def test_each_asyncio_task_sees_only_its_own_binding(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler()
    log = make_logger(handler)

    async def request(index: int) -> None:
        with bound(distinct_id=f"task-user-{index}", task_index=index):
            await asyncio.sleep(0)  # let the other tasks bind before this one logs
            for sequence in range(3):
                log.info("step", extra=tag.track("Step", logged_by=index, seq=sequence))
                await asyncio.sleep(0)

    async def main() -> None:
        with bound(distinct_id="outer-user", task_index=-1):
            await asyncio.gather(*(request(index) for index in range(5)))
            log.info("outer", extra=tag.track("Outer"))

    asyncio.run(main())
    assert handler.flush(10)
    events = mixpanel_server.wait_for(16)
    for event in events:
        props = event["properties"]
        if event["event"] == "Outer":
            assert (props["distinct_id"], props["task_index"]) == ("outer-user", -1)
        else:
            assert props["distinct_id"] == f"task-user-{props['logged_by']}"
            assert props["task_index"] == props["logged_by"]


def test_nested_bindings_merge_and_unwind(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler()
    log = make_logger(handler)
    with bound(distinct_id="u1", plan="pro", level_a=1) as outer:
        assert outer == BoundContext("u1", {"plan": "pro", "level_a": 1})
        with bound(level_a=2, level_b=3) as inner:
            assert inner == BoundContext("u1", {"plan": "pro", "level_a": 2, "level_b": 3})
            log.info("inner", extra=tag.track("Inner"))
            with bound(distinct_id="u2"):
                log.info("innermost", extra=tag.track("Innermost"))
        log.info("outer", extra=tag.track("Outer"))
    assert current_context() == BoundContext()
    assert handler.flush(10)
    events = _by_event(mixpanel_server.wait_for(3))
    assert events["Inner"]["distinct_id"] == "u1"
    assert (events["Inner"]["plan"], events["Inner"]["level_a"], events["Inner"]["level_b"]) == (
        "pro",
        2,
        3,
    )
    assert events["Innermost"]["distinct_id"] == "u2"
    assert events["Innermost"]["level_b"] == 3
    assert events["Outer"]["level_a"] == 1
    assert "level_b" not in events["Outer"]


def test_bind_and_unbind_restore_what_was_bound(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler(flush_interval=30.0)
    log = make_logger(handler)
    first = bind("u1", shard=1)
    second = bind("u2", shard=2)
    log.info("second", extra=tag.track("Second"))
    unbind(second)
    assert current_context() == BoundContext("u1", {"shard": 1})
    log.info("first", extra=tag.track("First"))
    unbind(first)
    assert current_context() == BoundContext()
    with pytest.raises(InvalidMessageError, match="distinct_id"):
        bind(True)
    with pytest.raises(InvalidMessageError, match="distinct_id"):
        bind(1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidMessageError, match=r"properties\.score"):
        bind("u3", score=float("nan"))
    assert handler.flush(10)  # sent after the bindings ended: captured when logged
    events = _by_event(mixpanel_server.wait_for(2))
    assert (events["Second"]["distinct_id"], events["Second"]["shard"]) == ("u2", 2)
    assert (events["First"]["distinct_id"], events["First"]["shard"]) == ("u1", 1)


# --------------------------------------------------------------------------- who the user is


def test_distinct_id_resolution_order(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    """Tag, then bound context, then baggage ``enduser.id``, then ``default_distinct_id``."""
    handler = make_handler(default_distinct_id="default-user")
    log = make_logger(handler)
    with _Baggage("enduser.id", "baggage-user"):
        with bound(distinct_id="bound-user"):
            log.info("x", extra=tag.track("Tag Wins", distinct_id="tag-user"))
            log.info("x", extra=tag.track("Bound Wins"))
            log.info("x", extra=tag.people.set({"a": 1}))
        log.info("x", extra=tag.track("Baggage Wins"))
        log.info("x", extra=tag.people.set({"b": 2}))
    log.info("x", extra=tag.track("Default Wins"))
    assert handler.flush(10)
    users = {name: p["distinct_id"] for name, p in _by_event(mixpanel_server.wait_for(4)).items()}
    assert users == {
        "Tag Wins": "tag-user",
        "Bound Wins": "bound-user",
        "Baggage Wins": "baggage-user",
        "Default Wins": "default-user",
    }
    updates = mixpanel_server.wait_for(2, "profile_updates")
    assert [u["$distinct_id"] for u in updates] == ["bound-user", "baggage-user"]


def test_no_user_anywhere_is_dropped_as_invalid_with_a_clear_reason(
    mixpanel_server: MixpanelServer,
    make_handler,
    make_logger,
    library_warnings: RecordCollector,
) -> None:
    handler = make_handler()
    log = make_logger(handler)
    with _Baggage("other.key", "not-a-user"):
        log.info("anonymous", extra={"mixpanel": True})
    log.info("anonymous", extra=tag.people.set({"a": 1}))
    log.info("named", extra=tag.track("Named", distinct_id="u1"))
    handler.flush(10)
    assert [e["event"] for e in mixpanel_server.wait_for(1)] == ["Named"]
    assert mixpanel_server.profile_updates == []
    assert handler.stats()["dropped"]["invalid"] == 2
    handler.close()
    text = " ".join(library_warnings.messages())
    assert "invalid" in text
    assert "no distinct_id" in text and "mp_logbridge.bound()" in text


# --------------------------------------------------------------------------- what events carry


def test_super_properties_then_bound_properties_then_the_tag(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler(
        super_properties={"service": "billing", "env": "prod", "plan": "from-super"}
    )
    log = make_logger(handler)
    with bound(distinct_id="u1", env="from-bound", plan="from-bound", request="r-1"):
        log.info("x", extra=tag.track("Merged", plan="from-tag"))
        log.info("x", extra=tag.people.set({"plan": "profile"}))
    assert handler.flush(10)
    (event,) = mixpanel_server.wait_for(1)
    props = event["properties"]
    assert props["service"] == "billing"
    assert props["env"] == "from-bound"
    assert props["request"] == "r-1"
    assert props["plan"] == "from-tag"
    (update,) = mixpanel_server.wait_for(1, "profile_updates")
    assert update["$set"] == {"plan": "profile"}  # super/bound properties are for events only


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        pytest.param(None, {}, id="off by default"),
        pytest.param(
            True,
            {"logger": "LOGGER", "level": "WARNING", "function": "log_it", "module": "MODULE"},
            id="True",
        ),
        pytest.param(["name", "levelno"], {"name": "LOGGER", "levelno": 30}, id="list"),
        pytest.param(
            {"levelname": "severity", "funcName": "where"},
            {"severity": "WARNING", "where": "log_it"},
            id="mapping",
        ),
    ],
)
def test_record_properties(
    option: Any,
    expected: dict[str, Any],
    mixpanel_server: MixpanelServer,
    make_handler,
    make_logger,
) -> None:
    handler = make_handler(record_properties=option)
    log = make_logger(handler)

    def log_it() -> int:
        log.warning("x", extra=tag.track("Facts", distinct_id="u1"))
        return log_it.__code__.co_firstlineno + 1

    line = log_it()
    assert handler.flush(10)
    (event,) = mixpanel_server.wait_for(1)
    props = event["properties"]
    names = {"LOGGER": log.name, "MODULE": __name__.rpartition(".")[2]}
    for key, value in expected.items():
        assert props[key] == names.get(value, value)
    if option is True:
        assert props["line"] == line
        assert set(DEFAULT_RECORD_PROPERTIES.values()) <= set(props)
    for attribute, prop in DEFAULT_RECORD_PROPERTIES.items():
        if prop not in expected and attribute not in expected and option is not True:
            assert prop not in props and attribute not in props


def test_extra_properties_copies_only_the_listed_fields(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler(extra_properties=["request_id", "tenant", "absent"])
    log = make_logger(handler)
    log.info(
        "x",
        extra={
            **tag.track("Extra", distinct_id="u1"),
            "request_id": "r-7",
            "tenant": "acme",
            "password": "hunter2",
            "payload": {"big": "blob"},
        },
    )
    assert handler.flush(10)
    (event,) = mixpanel_server.wait_for(1)
    props = event["properties"]
    assert (props["request_id"], props["tenant"]) == ("r-7", "acme")
    for unlisted in ("password", "payload", "absent"):
        assert unlisted not in props


class PaymentDeclined(Exception):
    """An application exception (not a built-in)."""


@pytest.mark.parametrize("include", [True, False], ids=["default", "opted out"])
def test_exception_type_and_message_from_exc_info(
    include: bool, mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler(include_exception=include)
    log = make_logger(handler)
    try:
        raise PaymentDeclined("card expired")
    except PaymentDeclined:
        log.exception("payment failed", extra=tag.track("Payment Failed", distinct_id="u1"))
    try:
        {}["missing"]
    except KeyError:
        log.warning("lookup", exc_info=True, extra=tag.track("Lookup Failed", distinct_id="u1"))
    log.info("fine", extra=tag.track("No Exception", distinct_id="u1"))
    assert handler.flush(10)
    events = _by_event(mixpanel_server.wait_for(3))
    assert "exception_type" not in events["No Exception"]
    if include:
        declined = events["Payment Failed"]
        assert declined["exception_type"] == f"{PaymentDeclined.__module__}.PaymentDeclined"
        assert declined["exception_message"] == "card expired"
        assert events["Lookup Failed"]["exception_type"] == "KeyError"
        assert events["Lookup Failed"]["exception_message"] == "'missing'"
    else:
        for name in ("Payment Failed", "Lookup Failed"):
            assert "exception_type" not in events[name]
            assert "exception_message" not in events[name]


# --------------------------------------------------------------------------- trace context


@pytest.fixture
def tracer() -> Iterator[trace.Tracer]:
    """A tracer of a local SDK provider (the global provider is left untouched)."""
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
    provider = sdk_trace.TracerProvider()
    try:
        yield provider.get_tracer("tests.context")
    finally:
        provider.shutdown()


def test_trace_and_span_ids_of_the_active_span(
    tracer: trace.Tracer, mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler()
    log = make_logger(handler)
    with tracer.start_as_current_span("checkout") as span:
        log.info("in span", extra=tag.track("In Span", distinct_id="u1"))
        ids = span.get_span_context()
    child = tracer.start_span("child")
    with trace.use_span(child, end_on_exit=True):
        log.info("in child", extra=tag.track("In Child", distinct_id="u1"))
    remote = trace.NonRecordingSpan(
        trace.SpanContext(trace_id=0xABC, span_id=0xDEF, is_remote=True)
    )
    with trace.use_span(remote):  # valid but not recording: its ids still identify the trace
        log.info("remote", extra=tag.track("Remote", distinct_id="u1"))
    with trace.use_span(trace.INVALID_SPAN):
        log.info("invalid", extra=tag.track("Invalid Span", distinct_id="u1"))
    log.info("outside", extra=tag.track("Outside", distinct_id="u1"))
    assert handler.flush(10)
    events = _by_event(mixpanel_server.wait_for(5))

    in_span = events["In Span"]
    assert re.fullmatch("[0-9a-f]{32}", in_span["trace_id"])
    assert re.fullmatch("[0-9a-f]{16}", in_span["span_id"])
    assert in_span["trace_id"] == trace.format_trace_id(ids.trace_id)
    assert in_span["span_id"] == trace.format_span_id(ids.span_id)
    assert events["In Child"]["span_id"] == trace.format_span_id(child.get_span_context().span_id)
    assert events["In Child"]["trace_id"] != in_span["trace_id"]  # started outside "checkout"
    assert events["Remote"]["trace_id"] == "0" * 29 + "abc"
    assert events["Remote"]["span_id"] == "0" * 13 + "def"
    for name in ("Invalid Span", "Outside"):
        assert "trace_id" not in events[name] and "span_id" not in events[name]


def test_trace_ids_can_be_turned_off(
    tracer: trace.Tracer, mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler(include_trace=False)
    log = make_logger(handler)
    with tracer.start_as_current_span("checkout"):
        log.info("in span", extra=tag.track("In Span", distinct_id="u1"))
    assert handler.flush(10)
    (event,) = mixpanel_server.wait_for(1)
    assert "trace_id" not in event["properties"] and "span_id" not in event["properties"]


def test_trace_ids_follow_the_thread_that_logged(
    tracer: trace.Tracer, mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    """A span active in one thread is not another thread's (context does not cross threads)."""
    handler = make_handler()
    log = make_logger(handler)
    with tracer.start_as_current_span("main"):
        worker = threading.Thread(
            target=lambda: log.info("worker", extra=tag.track("Worker", distinct_id="u1"))
        )
        worker.start()
        worker.join(10)
        log.info("main", extra=tag.track("Main", distinct_id="u1"))
    assert handler.flush(10)
    events = _by_event(mixpanel_server.wait_for(2))
    assert "trace_id" in events["Main"]
    assert "trace_id" not in events["Worker"]

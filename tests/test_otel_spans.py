"""Spans as Mixpanel events: the span processor and exporter wired in code.

Real OpenTelemetry SDK tracer providers, a real in-memory exporter beside the Mixpanel processor,
and a loopback ``MixpanelServer`` receiving what the background consumer sends.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from support import RecordCollector

import mp_logbridge
from mp_logbridge import ConfigurationError
from mp_logbridge.integrations.opentelemetry import (
    ATTRIBUTE_PROPERTIES,
    DEFAULT_RULES,
    MAX_STRING_LENGTH,
    MixpanelSpanExporter,
    MixpanelSpanProcessor,
    SpanRule,
    is_http_span,
)
from mp_logbridge.testing import MixpanelServer

TOKEN = "otel-span-token"

OLD_HTTP = {
    "http.method": "GET",
    "http.route": "/users/<id>",
    "http.target": "/users/7?tab=orders",
    "http.status_code": 200,
    "http.scheme": "https",
    "http.host": "shop.example",
    "net.host.port": 443,
    "http.user_agent": "Mozilla/5.0",
    "http.flavor": "1.1",
}
NEW_HTTP = {
    "http.request.method": "GET",
    "http.route": "/users/<id>",
    "url.path": "/users/7",
    "url.query": "tab=orders",
    "http.response.status_code": 200,
    "url.scheme": "https",
    "server.address": "shop.example",
    "server.port": 443,
    "user_agent.original": "Mozilla/5.0",
    "network.protocol.version": "1.1",
}


class Pipeline:
    """A tracer provider with an in-memory exporter and a Mixpanel span processor."""

    def __init__(self, server: MixpanelServer, limits: SpanLimits | None = None, **options: Any):
        self.provider = TracerProvider(span_limits=limits)
        self.memory = InMemorySpanExporter()
        self.provider.add_span_processor(SimpleSpanProcessor(self.memory))
        options.setdefault("api_host", server.url)
        options.setdefault("flush_interval", 0.05)
        self.processor = MixpanelSpanProcessor(TOKEN, **options)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("tests.app", "1.0")

    def span(self, name: str, kind: SpanKind = SpanKind.INTERNAL, **attributes: Any) -> Any:
        return self.tracer.start_as_current_span(name, kind=kind, attributes=attributes)

    def close(self) -> None:
        self.provider.shutdown()


@pytest.fixture
def pipelines(mixpanel_server: MixpanelServer) -> Iterator[Callable[..., Pipeline]]:
    made: list[Pipeline] = []

    def make(**options: Any) -> Pipeline:
        pipeline = Pipeline(mixpanel_server, **options)
        made.append(pipeline)
        return pipeline

    yield make
    for pipeline in made:
        pipeline.close()


class _Baggage:
    def __init__(self, **entries: str) -> None:
        ctx = otel_context.get_current()
        for key, value in entries.items():
            ctx = baggage.set_baggage(key.replace("_", "."), value, ctx)
        self._context = ctx
        self._token: Any = None

    def __enter__(self) -> None:
        self._token = otel_context.attach(self._context)

    def __exit__(self, *exc: object) -> None:
        otel_context.detach(self._token)


# --------------------------------------------------------------------------- beside other processors


def test_processor_beside_an_in_memory_exporter(
    pipelines: Callable[..., Pipeline], mixpanel_server: MixpanelServer
) -> None:
    pipe = pipelines()
    with (
        pipe.span("GET /users/<id>", SpanKind.SERVER, **NEW_HTTP, **{"enduser.id": "u-7"}),
        pipe.span("SELECT users", SpanKind.CLIENT, **{"db.system": "postgresql"}),
    ):
        pass
    with pipe.span("internal work"):
        pass
    assert pipe.processor.force_flush(5000)
    # The in-memory exporter got every span, untouched.
    finished = pipe.memory.get_finished_spans()
    assert [span.name for span in finished] == ["SELECT users", "GET /users/<id>", "internal work"]
    server_span = finished[1]
    assert dict(server_span.attributes or {}) == {**NEW_HTTP, "enduser.id": "u-7"}
    # Mixpanel got one event, for the HTTP server span only.
    (event,) = mixpanel_server.events
    props = event["properties"]
    assert event["event"] == "Page Viewed"
    assert props["distinct_id"] == "u-7"
    assert props["token"] == TOKEN
    assert props["route"] == "/users/<id>"
    assert props["method"] == "GET"
    assert props["status_code"] == 200
    assert props["path"] == "/users/7"
    assert props["query"] == "tab=orders"
    assert props["host"] == "shop.example" and props["port"] == 443
    assert props["user_agent"] == "Mozilla/5.0"
    assert props["span_kind"] == "server" and props["span_name"] == "GET /users/<id>"
    assert props["status"] == "unset" and props["success"] is True
    start, end = server_span.start_time or 0, server_span.end_time or 0
    assert props["duration_ms"] == round((end - start) / 1e6, 3)
    assert props["time"] == start // 1_000_000
    assert props["trace_id"] == format(server_span.context.trace_id, "032x")
    assert props["span_id"] == format(server_span.context.span_id, "016x")
    assert "enduser.id" not in props and "http.route" not in props
    assert mixpanel_server.invalid == []


def test_old_and_new_http_conventions_give_the_same_properties(
    pipelines: Callable[..., Pipeline], mixpanel_server: MixpanelServer
) -> None:
    pipe = pipelines(default_distinct_id="visitor")
    with pipe.span("old", SpanKind.SERVER, **OLD_HTTP):
        pass
    with pipe.span("new", SpanKind.SERVER, **NEW_HTTP):
        pass
    with pipe.span("both", SpanKind.SERVER, **{**OLD_HTTP, **NEW_HTTP, "url.path": "/new"}):
        pass
    pipe.processor.force_flush()
    events = {e["properties"]["span_name"]: e["properties"] for e in mixpanel_server.wait_for(3)}
    keys = ["route", "method", "status_code", "path", "scheme", "host", "port", "user_agent"]
    assert {k: events["old"][k] for k in keys} == {k: events["new"][k] for k in keys}
    assert events["old"]["path"] == "/users/7"  # http.target without its query string
    assert events["old"]["http_version"] == events["new"]["http_version"] == "1.1"
    assert events["both"]["path"] == "/new"  # the new convention's name wins


def test_default_rules_choose_http_server_spans_and_mixpanel_event_spans(
    pipelines: Callable[..., Pipeline], mixpanel_server: MixpanelServer
) -> None:
    pipe = pipelines(default_distinct_id="visitor")
    with pipe.span("GET", SpanKind.CLIENT, **{"http.request.method": "GET"}):
        pass  # an outgoing request is not a page view
    with pipe.span("grpc", SpanKind.SERVER, **{"rpc.system": "grpc"}):
        pass  # a server span without HTTP
    with pipe.span("checkout", **{"mixpanel.event": "Checkout Completed", "mixpanel.items": 3}):
        pass
    with pipe.span("POST /pay", SpanKind.SERVER, **{"http.method": "POST"}):
        pass
    pipe.processor.force_flush()
    assert [e["event"] for e in mixpanel_server.events] == ["Checkout Completed", "Page Viewed"]
    checkout = mixpanel_server.events[0]["properties"]
    assert checkout["items"] == 3  # mixpanel.* attributes become properties without the prefix
    assert "event" not in checkout
    assert len(DEFAULT_RULES) == 2


def test_error_spans_carry_the_exception(
    pipelines: Callable[..., Pipeline], mixpanel_server: MixpanelServer
) -> None:
    pipe = pipelines(default_distinct_id="visitor")
    with (
        pytest.raises(KeyError),
        pipe.span("GET /boom", SpanKind.SERVER, **{"http.request.method": "GET"}),
    ):
        raise KeyError("missing")
    pipe.processor.force_flush()
    props = mixpanel_server.wait_for(1)[0]["properties"]
    assert props["status"] == "error" and props["success"] is False
    assert props["exception_type"] == "KeyError"
    assert props["exception_message"] == "'missing'"


# --------------------------------------------------------------------------- who the user is


def test_user_precedence_attribute_bound_baggage_default(
    pipelines: Callable[..., Pipeline], mixpanel_server: MixpanelServer
) -> None:
    pipe = pipelines(default_distinct_id="fallback")
    event = {"mixpanel.event": "E"}
    with _Baggage(enduser_id="from-baggage"), mp_logbridge.bound(distinct_id="from-bound"):
        with pipe.span("a", **event, **{"enduser.id": "from-attribute", "case": "a"}):
            pass
        with pipe.span("b", **event, **{"user.id": "from-user-id"}):
            pass
        with pipe.span("c", **event):
            pass
    with _Baggage(enduser_id="from-baggage"), pipe.span("d", **event):
        pass
    with pipe.span("e", **event):
        pass
    with pipe.span("f", **event, **{"enduser.id": True}):  # not a user: the next source decides
        pass
    pipe.processor.force_flush()
    users = {
        e["properties"]["span_name"]: e["properties"]["distinct_id"]
        for e in mixpanel_server.wait_for(6)
    }
    assert users == {
        "a": "from-attribute",
        "b": "from-user-id",
        "c": "from-bound",
        "d": "from-baggage",
        "e": "fallback",
        "f": "fallback",
    }


def test_a_chosen_span_without_a_user_is_counted_not_sent(
    pipelines: Callable[..., Pipeline], mixpanel_server: MixpanelServer
) -> None:
    pipe = pipelines()
    for _ in range(3):
        with pipe.span("GET /health", SpanKind.SERVER, **{"http.request.method": "GET"}):
            pass
    with pipe.span("GET /me", SpanKind.SERVER, **{"http.request.method": "GET", "enduser.id": 5}):
        pass
    pipe.processor.force_flush()
    assert [e["properties"]["distinct_id"] for e in mixpanel_server.events] == [5]
    stats = pipe.processor.stats()
    assert stats["no_user"] == 3
    assert stats["sent"] == 1 and stats["dropped_total"] == 0


def test_bound_properties_are_read_on_the_span_thread(
    pipelines: Callable[..., Pipeline], mixpanel_server: MixpanelServer
) -> None:
    pipe = pipelines(super_properties={"service_tier": "gold", "plan": "free"})

    def worker() -> None:
        with (
            mp_logbridge.bound(distinct_id="thread-user", plan="pro"),
            pipe.span("job", **{"mixpanel.event": "Job Done"}),
        ):
            pass

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    with pipe.span("outside", **{"mixpanel.event": "Job Done"}):
        pass  # nothing bound on this thread, no default: not an event
    pipe.processor.force_flush()
    (event,) = mixpanel_server.events
    props = event["properties"]
    assert props["distinct_id"] == "thread-user"
    assert props["plan"] == "pro" and props["service_tier"] == "gold"
    assert pipe.processor.stats()["no_user"] == 1


# --------------------------------------------------------------------------- rules


def test_rules_select_by_name_kind_scope_attributes_and_condition(
    pipelines: Callable[..., Pipeline], mixpanel_server: MixpanelServer
) -> None:
    rules = [
        SpanRule("Glob", name="report.*", kind=["internal", SpanKind.PRODUCER]),
        SpanRule("Regex", name=re.compile(r"job-\d+")),
        SpanRule("Scoped", scope="tests.other*"),
        SpanRule("Equal", attributes={"plan": "pro", "tier": ...}),
        SpanRule("Callable", attributes={"amount": lambda amount: amount > 100}),
        SpanRule("When", when=lambda span: span.name.endswith("!")),
        SpanRule(lambda span: f"Named {span.name}" if span.name.startswith("dyn") else None),
        SpanRule("Viewed {http.route}", kind="server"),
    ]
    pipe = pipelines(rules=rules, default_distinct_id="u")
    other = pipe.provider.get_tracer("tests.other.lib")
    cases = [
        ("report.daily", {}, SpanKind.INTERNAL),  # Glob
        ("report.daily", {}, SpanKind.CLIENT),  # wrong kind: nothing
        ("job-42", {}, SpanKind.INTERNAL),  # Regex
        ("job-x", {}, SpanKind.INTERNAL),  # nothing
        ("eq", {"plan": "pro", "tier": 1}, SpanKind.INTERNAL),  # Equal
        ("eq", {"plan": "pro"}, SpanKind.INTERNAL),  # tier missing: nothing
        ("big", {"amount": 150}, SpanKind.INTERNAL),  # Callable
        ("small", {"amount": 50}, SpanKind.INTERNAL),  # nothing
        ("hey!", {}, SpanKind.INTERNAL),  # When
        ("dynamic", {}, SpanKind.INTERNAL),  # Named dynamic
        ("GET", {"http.route": "/cart"}, SpanKind.SERVER),  # Viewed /cart
        ("GET", {}, SpanKind.SERVER),  # no http.route: the template does not match
    ]
    for name, attributes, kind in cases:
        with pipe.span(name, kind, **attributes):
            pass
    with other.start_as_current_span("anything"):
        pass  # Scoped
    pipe.processor.force_flush()
    assert [e["event"] for e in mixpanel_server.events] == [
        "Glob",
        "Regex",
        "Equal",
        "Callable",
        "When",
        "Named dynamic",
        "Viewed /cart",
        "Scoped",
    ]


def test_first_matching_rule_decides_one_event_per_span(
    pipelines: Callable[..., Pipeline], mixpanel_server: MixpanelServer
) -> None:
    pipe = pipelines(
        rules=[SpanRule("First", name="x"), SpanRule("Second", name="x")], default_distinct_id="u"
    )
    with pipe.span("x"):
        pass
    pipe.processor.force_flush()
    assert [e["event"] for e in mixpanel_server.events] == ["First"]


def test_rule_properties_all_attributes_and_raw_names(
    pipelines: Callable[..., Pipeline], mixpanel_server: MixpanelServer
) -> None:
    attributes = {
        "http.route": "/a",
        "app.plan": "pro",
        "app.cart": ["x", "y"],
        "app.secret": "s",
        "enduser.id": "u1",
    }
    table = pipelines(
        rules=[
            SpanRule("Listed", name="listed", properties=["app.plan", "app.cart", "http.route"]),
            SpanRule("Renamed", name="renamed", properties={"app.plan": "Plan"}),
            SpanRule("All", name="all", all_attributes=True),
        ]
    )
    for name in ("listed", "renamed", "all"):
        with table.span(name, **attributes):
            pass
    table.processor.force_flush()
    got = {e["event"]: e["properties"] for e in mixpanel_server.wait_for(3)}
    assert got["Listed"]["app.plan"] == "pro"
    assert got["Listed"]["app.cart"] == ["x", "y"] and got["Listed"]["route"] == "/a"
    assert "app.secret" not in got["Listed"]
    assert got["Renamed"]["Plan"] == "pro" and "app.plan" not in got["Renamed"]
    assert {"app.plan", "app.cart", "app.secret", "route"} <= set(got["All"])
    assert "enduser.id" not in got["All"]  # the user is the distinct_id, not a property
    mixpanel_server.clear()

    raw = pipelines(raw_attribute_names=True, rules=[SpanRule("Raw", all_attributes=True)])
    with raw.span("raw", SpanKind.SERVER, **OLD_HTTP, **{"enduser.id": "u1"}):
        pass
    raw.processor.force_flush()
    props = mixpanel_server.wait_for(1)[0]["properties"]
    assert props["http.route"] == "/users/<id>" and props["http.target"] == "/users/7?tab=orders"
    assert "route" not in props and "path" not in props


def test_rules_are_checked_when_made() -> None:
    for bad in (
        lambda: SpanRule(""),
        lambda: SpanRule(42),  # type: ignore[arg-type]
        lambda: SpanRule("E", kind="sideways"),
        lambda: SpanRule("E", name=""),
        lambda: SpanRule("E", when=True),  # type: ignore[arg-type]
        lambda: SpanRule("E", properties="app.plan"),
        lambda: MixpanelSpanProcessor(TOKEN, rules=["not a rule"]),  # type: ignore[list-item]
        lambda: MixpanelSpanProcessor(TOKEN, default_distinct_id=1.5),  # type: ignore[arg-type]
        lambda: MixpanelSpanProcessor(TOKEN, batch_sise=10),
    ):
        with pytest.raises(ConfigurationError):
            bad()


def test_the_attribute_table_covers_both_http_conventions() -> None:
    pairs = [
        ("http.method", "http.request.method", "method"),
        ("http.status_code", "http.response.status_code", "status_code"),
        ("http.target", "url.path", "path"),
        ("http.url", "url.full", "url"),
        ("http.scheme", "url.scheme", "scheme"),
        ("http.host", "server.address", "host"),
        ("http.user_agent", "user_agent.original", "user_agent"),
        ("http.client_ip", "client.address", "client_address"),
        ("http.flavor", "network.protocol.version", "http_version"),
    ]
    for old, new, prop in pairs:
        assert ATTRIBUTE_PROPERTIES[old] == ATTRIBUTE_PROPERTIES[new] == prop
    assert ATTRIBUTE_PROPERTIES["http.route"] == "route"


# --------------------------------------------------------------------------- the exporter in code


def test_exporter_in_a_batch_processor_keeps_the_span_threads_context(
    mixpanel_server: MixpanelServer,
) -> None:
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    exporter = MixpanelSpanExporter(
        TOKEN, api_host=mixpanel_server.url, flush_interval=0.05, tracer_provider=provider
    )
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=50))
    tracer = provider.get_tracer("tests.exporter")
    try:
        with (
            mp_logbridge.bound(distinct_id="bound-user", plan="pro"),
            tracer.start_as_current_span("a", attributes={"mixpanel.event": "A"}),
        ):
            pass
        with (
            _Baggage(enduser_id="baggage-user"),
            tracer.start_as_current_span("b", attributes={"mixpanel.event": "B"}),
        ):
            pass
        with tracer.start_as_current_span("c", attributes={"mixpanel.event": "C"}):
            pass  # no user anywhere
        assert provider.force_flush(5000)
        events = {e["event"]: e["properties"] for e in mixpanel_server.wait_for(2)}
        assert events["A"]["distinct_id"] == "bound-user" and events["A"]["plan"] == "pro"
        assert events["B"]["distinct_id"] == "baggage-user"
        assert "C" not in events
        assert exporter.stats()["no_user"] == 1
        assert len(memory.get_finished_spans()) == 3
    finally:
        provider.shutdown()


def test_exporter_delivers_at_provider_shutdown_with_the_noted_context(
    mixpanel_server: MixpanelServer,
) -> None:
    """The provider shuts the note-taker down before the batch processor exports its last
    spans: the notes must still be there for them."""
    provider = TracerProvider()
    exporter = MixpanelSpanExporter(TOKEN, api_host=mixpanel_server.url, tracer_provider=provider)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000))
    tracer = provider.get_tracer("tests.exporter")
    for n in range(5):
        with (
            _Baggage(enduser_id=f"u{n}"),
            tracer.start_as_current_span("s", attributes={"mixpanel.event": "E"}),
        ):
            pass
    assert mixpanel_server.events == []
    provider.shutdown()
    users = sorted(e["properties"]["distinct_id"] for e in mixpanel_server.wait_for(5))
    assert users == [f"u{n}" for n in range(5)]
    assert exporter.stats()["no_user"] == 0


def test_context_notes_are_bounded() -> None:
    from mp_logbridge.integrations.opentelemetry import _ContextRecorder

    provider = TracerProvider()
    recorder = _ContextRecorder(limit=10)
    provider.add_span_processor(recorder)
    tracer = provider.get_tracer("t")
    with mp_logbridge.bound(distinct_id="u"):
        spans = []
        for _ in range(1000):  # spans never exported: their notes must not pile up
            with tracer.start_as_current_span("s") as span:
                spans.append(span)
    assert len(recorder._current) + len(recorder._previous) <= 22
    assert recorder.take(spans[-1])[0].distinct_id == "u"
    assert recorder.take(spans[0])[0].distinct_id is None  # forgotten long ago
    provider.shutdown()


def test_processor_and_exporter_give_a_span_the_same_insert_id(
    mixpanel_server: MixpanelServer,
) -> None:
    provider = TracerProvider()
    options: dict[str, Any] = {"api_host": mixpanel_server.url, "flush_interval": 0.05}
    processor = MixpanelSpanProcessor(TOKEN, **options)
    exporter = MixpanelSpanExporter(TOKEN, record_context=False, **options)
    provider.add_span_processor(processor)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tests")
    try:
        for _ in range(3):
            with tracer.start_as_current_span(
                "s", attributes={"mixpanel.event": "E", "user.id": "u"}
            ):
                pass
        provider.force_flush()
        events = mixpanel_server.wait_for(6)
        ids = [e["properties"]["$insert_id"] for e in events]
        assert len(set(ids)) == 3 and all(ids.count(i) == 2 for i in ids)
        assert all(re.fullmatch(r"[0-9a-f]{36}", i) for i in ids)
    finally:
        provider.shutdown()


def test_exporter_without_a_sdk_provider_adds_nothing() -> None:
    exporter = MixpanelSpanExporter(TOKEN, tracer_provider=object())
    try:
        assert exporter._recorder is None
    finally:
        exporter.shutdown()


# --------------------------------------------------------------------------- many threads, many tasks


def test_spans_from_many_threads_and_tasks(
    pipelines: Callable[..., Pipeline], mixpanel_server: MixpanelServer
) -> None:
    pipe = pipelines(max_queue_size=100_000)
    threads, per_thread, tasks = 8, 150, 60

    def worker(index: int) -> None:
        for n in range(per_thread):
            with (
                mp_logbridge.bound(distinct_id=f"t{index}"),
                pipe.span(
                    "job", **{"mixpanel.event": "Job", "mixpanel.worker": f"t{index}", "n": n}
                ),
            ):
                pass

    async def task(index: int) -> None:
        with mp_logbridge.bound(distinct_id=f"a{index}"):
            await asyncio.sleep(0)
            with pipe.span("task", **{"mixpanel.event": "Task", "mixpanel.worker": f"a{index}"}):
                await asyncio.sleep(0.001)

    async def all_tasks() -> None:
        await asyncio.gather(*(task(i) for i in range(tasks)))

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    asyncio.run(all_tasks())
    for thread in pool:
        thread.join()
    total = threads * per_thread + tasks
    assert pipe.processor.force_flush(20_000)
    events = mixpanel_server.wait_for(total, timeout=30)
    assert len(events) == total
    assert all(e["properties"]["distinct_id"] == e["properties"]["worker"] for e in events)
    assert len({e["properties"]["$insert_id"] for e in events}) == total
    assert pipe.processor.stats()["dropped_total"] == 0


# --------------------------------------------------------------------------- hostile spans


def test_huge_and_hostile_attributes_never_break_the_app(
    pipelines: Callable[..., Pipeline], mixpanel_server: MixpanelServer
) -> None:
    limits = SpanLimits(max_span_attributes=20_000, max_span_attribute_length=None)
    pipe = pipelines(limits=limits, rules=[SpanRule("{mixpanel.event}", all_attributes=True)])
    many = {f"attr.{i}": i for i in range(10_000)}
    with pipe.span("many", **many, **{"mixpanel.event": "Many", "enduser.id": "u"}):
        pass
    huge = "x" * 10_000_000
    with pipe.span("huge", **{"mixpanel.event": "Huge", "enduser.id": "u", "http.route": huge}):
        pass
    hostile = {
        "bytes.ok": "é".encode(),
        "bytes.bad": b"\xff\xfe",
        "nan": math.nan,
        "inf": -math.inf,
        "list": ["a", 1, 2.5, True],
        "mapping": {"a": {"b": {"c": {"d": 1}}}},
        "none.in.list": [None, "x"],
    }
    with pipe.span("hostile", **hostile, **{"mixpanel.event": "Hostile", "enduser.id": "u"}):
        pass
    # A value that cannot be sent at all: the event is dropped, and counted.
    with pipe.span("unsendable", **{"mixpanel.event": "Unsendable", "enduser.id": "u"}) as span:
        span.set_attribute("http.response.status_code", 10**5000)
    pipe.processor.force_flush()
    events = {e["event"]: e["properties"] for e in mixpanel_server.wait_for(3)}
    assert len(events["Many"]) <= 255
    assert events["Huge"]["route"] == "x" * MAX_STRING_LENGTH
    got = events["Hostile"]
    assert got["bytes.ok"] == "é"
    assert got["list"] == ["a", 1, 2.5, True] and got["none.in.list"] == [None, "x"]
    assert got["mapping"] == {"a": {"b": {}}}  # deeper than Mixpanel's 3 levels is left out
    assert not {"bytes.bad", "nan", "inf"} & set(got)
    stats = pipe.processor.stats()
    assert stats["attributes_dropped"] >= 10_000 - 255 + 3
    assert stats["dropped"]["invalid"] == 1
    assert "Unsendable" not in events
    assert len(pipe.memory.get_finished_spans()) == 4


def test_rules_that_raise_are_counted_and_the_app_goes_on(
    pipelines: Callable[..., Pipeline], library_warnings: RecordCollector
) -> None:
    def broken(span: ReadableSpan) -> bool:
        raise ValueError("rule broke")

    pipe = pipelines(rules=[SpanRule("E", when=broken)])
    with pipe.span("a"):
        pass
    assert pipe.processor.stats()["dropped"]["invalid"] == 1
    library_warnings.wait_for("rule broke")
    assert len(pipe.memory.get_finished_spans()) == 1


def test_a_span_that_cannot_be_read_is_counted() -> None:
    class Broken:
        name = "x"
        kind = SpanKind.INTERNAL
        instrumentation_scope = None

        @property
        def attributes(self) -> Any:
            raise RuntimeError("unreadable")

    processor = MixpanelSpanProcessor(TOKEN, consumer=lambda kind, message: None)
    processor.on_end(Broken())  # type: ignore[arg-type]
    assert processor.stats()["dropped"]["invalid"] == 1


def test_without_a_token_spans_are_counted_and_other_processors_unaffected(
    library_warnings: RecordCollector,
) -> None:
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    processor = MixpanelSpanProcessor()
    provider.add_span_processor(processor)
    try:
        assert not processor.enabled and processor.consumer is None
        with provider.get_tracer("t").start_as_current_span(
            "x", attributes={"mixpanel.event": "E", "enduser.id": "u"}
        ):
            pass
        assert processor.stats()["skipped"] == 1
        assert len(memory.get_finished_spans()) == 1
        library_warnings.wait_for("no Mixpanel token")
    finally:
        provider.shutdown()


def test_spans_after_shutdown_are_counted_as_closed(
    pipelines: Callable[..., Pipeline], mixpanel_server: MixpanelServer
) -> None:
    pipe = pipelines(default_distinct_id="u")
    with pipe.span("a", **{"mixpanel.event": "Before"}):
        pass
    pipe.processor.shutdown()
    assert [e["event"] for e in mixpanel_server.wait_for(1)] == ["Before"]
    with pipe.span("b", **{"mixpanel.event": "After"}):
        pass
    assert pipe.processor.stats()["dropped"]["closed"] == 1
    pipe.processor.shutdown()  # idempotent


def test_error_status_from_the_app_is_reported(
    pipelines: Callable[..., Pipeline], mixpanel_server: MixpanelServer
) -> None:
    pipe = pipelines(default_distinct_id="u")
    with pipe.span("GET", SpanKind.SERVER, **{"http.method": "GET"}) as span:
        span.set_status(Status(StatusCode.ERROR, "bad gateway"))
    with pipe.span("GET", SpanKind.SERVER, **{"http.method": "GET"}) as span:
        span.set_status(Status(StatusCode.OK))
    pipe.processor.force_flush()
    statuses = [
        (e["properties"]["status"], e["properties"]["success"]) for e in mixpanel_server.wait_for(2)
    ]
    assert statuses == [("error", False), ("ok", True)]


def test_is_http_span() -> None:
    provider = TracerProvider()
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("a", attributes={"http.method": "GET"}) as a:
        pass
    with tracer.start_as_current_span("b") as b:
        pass
    assert is_http_span(a) and not is_http_span(b)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- exit and fork


@pytest.mark.subprocess
def test_events_queued_at_exit_are_delivered(
    run_python: Callable[..., Any], mixpanel_server: MixpanelServer
) -> None:
    result = run_python(
        f"""
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from mp_logbridge.integrations.opentelemetry import MixpanelSpanProcessor

        provider = TracerProvider()   # shuts down at exit, and the processor with it
        provider.add_span_processor(
            MixpanelSpanProcessor("{TOKEN}", api_host="{mixpanel_server.url}", flush_interval=60)
        )
        trace.set_tracer_provider(provider)
        tracer = trace.get_tracer("exit")
        for n in range(50):
            with tracer.start_as_current_span("s", attributes={{"mixpanel.event": "E", "user.id": "u", "mixpanel.n": n}}):
                pass
        print("ended")
        """,
        timeout=30,
    )
    assert result.returncode == 0, result
    assert sorted(e["properties"]["n"] for e in mixpanel_server.wait_for(50)) == list(range(50))


@pytest.mark.subprocess
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_sends_its_own_spans_only(
    run_python: Callable[..., Any], mixpanel_server: MixpanelServer
) -> None:
    result = run_python(
        f"""
        import os
        from opentelemetry.sdk.trace import TracerProvider
        from mp_logbridge.integrations.opentelemetry import MixpanelSpanProcessor

        provider = TracerProvider()
        processor = MixpanelSpanProcessor(
            "{TOKEN}", api_host="{mixpanel_server.url}", flush_interval=60
        )
        provider.add_span_processor(processor)
        tracer = provider.get_tracer("fork")

        def span(who, n):
            attributes = {{"mixpanel.event": "E", "user.id": who, "mixpanel.n": n}}
            with tracer.start_as_current_span("s", attributes=attributes):
                pass

        for n in range(5):
            span("parent", n)          # queued in the parent, not yet sent
        pid = os.fork()
        if pid == 0:
            for n in range(3):
                span("child", n)
            ok = processor.force_flush(10_000)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        assert processor.force_flush(10_000)
        print("done")
        """,
        timeout=60,
    )
    assert result.returncode == 0, result
    events = mixpanel_server.wait_for(8)
    users = sorted((e["properties"]["distinct_id"], e["properties"]["n"]) for e in events)
    assert users == [("child", n) for n in range(3)] + [("parent", n) for n in range(5)]
    assert len({e["properties"]["$insert_id"] for e in events}) == 8


@pytest.mark.subprocess
def test_importing_the_library_does_not_import_the_sdk(run_python: Callable[..., Any]) -> None:
    result = run_python(
        """
        import sys
        import mp_logbridge, mp_logbridge.integrations
        print(sorted(name for name in sys.modules if name.startswith("opentelemetry.sdk")))
        """
    )
    assert result.returncode == 0, result
    assert result.stdout.strip() == "[]"


def test_a_queued_span_message_says_roughly_what_it_weighs() -> None:
    """The consumer's memory bound counts a deferred message by its ``weight`` until it is
    encoded: it must be of the order of the encoded record."""
    from mp_logbridge._values import encode

    queued: list[Any] = []

    class Keep:
        def send(self, kind: str, message: Any) -> None:
            queued.append(message)

        def flush(self, timeout: float | None = None) -> bool:
            return True

    provider = TracerProvider()
    provider.add_span_processor(MixpanelSpanProcessor(TOKEN, consumer=Keep()))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span(
        "GET", kind=SpanKind.SERVER, attributes={**NEW_HTTP, "enduser.id": "u"}
    ):
        pass
    with tracer.start_as_current_span("x", attributes={"mixpanel.event": "E", "enduser.id": "u"}):
        pass
    provider.shutdown()
    for message in queued:
        size = len(encode(message.build()))
        assert size / 2 <= message.weight <= size * 2, (size, message.weight)

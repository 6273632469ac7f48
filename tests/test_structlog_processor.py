"""``MixpanelProcessor``: tagged structlog events become Mixpanel messages, delivered once.

Everything is delivered for real to a loopback ``MixpanelServer``. Covered: the tag format (the
handler's, compared record for record), the log line still being rendered, where the user comes
from, copied keys and exception info, bad input (never raised, counted, reported), async code,
structlog forwarding to stdlib logging next to a ``MixpanelHandler`` (each message sent once),
structlog being optional, lifecycle and the runnable example.
"""

from __future__ import annotations

import asyncio
import copy
import io
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import TracerProvider
from support import RecordCollector

from mp_logbridge import (
    ConfigurationError,
    Consumer,
    MixpanelHandler,
    MixpanelProcessor,
    Tracker,
    bound,
    tag,
)
from mp_logbridge._tags import split_tag
from mp_logbridge.tags import TagBuilder
from mp_logbridge.testing import MixpanelServer

TOKEN = "structlog-test-token"
SENT_MARK = "_mp_logbridge_sent"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "structlog_app.py"


class PaymentDeclined(Exception):
    """An application exception (reported with its qualified name)."""


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """Each test configures structlog itself; nothing leaks into the next one."""
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def make_processor(mixpanel_server: MixpanelServer) -> Iterator[Callable[..., MixpanelProcessor]]:
    """MixpanelProcessors sending to the test's server (closed after the test)."""
    made: list[MixpanelProcessor] = []

    def make(token: str | None = TOKEN, **options: Any) -> MixpanelProcessor:
        if "consumer" not in options and "tracker" not in options:
            options.setdefault("api_host", mixpanel_server.url)
            options.setdefault("flush_interval", 0.05)
        processor = MixpanelProcessor(token, **options)
        made.append(processor)
        return processor

    yield make
    for processor in made:
        processor.close()


# --------------------------------------------------------------------------- helpers


def render_with(*processors: Any, exc: bool = False) -> io.StringIO:
    """Configure structlog: bound context, the given processors, a real renderer to a buffer."""
    out = io.StringIO()
    chain: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        *processors,
    ]
    if exc:
        chain.append(structlog.processors.format_exc_info)
    chain.append(structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=True))
    structlog.configure(processors=chain, logger_factory=structlog.PrintLoggerFactory(out))
    return out


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def props_of(server: MixpanelServer, name: str) -> dict[str, Any]:
    """The properties of the one event called ``name``."""
    [event] = [event for event in server.events if event["event"] == name]
    return dict(event["properties"])


def meaning(kind: str, record: Mapping[str, Any]) -> tuple[str, Any]:
    """A record without what is stamped from the clock (``time``, ``$time``, ``$insert_id``)."""
    record = copy.deepcopy(dict(record))
    if kind == "events":
        record["properties"].pop("time")
        record["properties"].pop("$insert_id")
    else:
        record.pop("$time")
        transaction = record.get("$append", {}).get("$transactions")
        if isinstance(transaction, dict):
            transaction.pop("$time")
    return kind, repr(record)


def everything(server: MixpanelServer) -> list[tuple[str, Any]]:
    """Every record the server accepted, as comparable meanings."""
    return sorted(
        meaning(kind, record)
        for kind in ("events", "profile_updates", "group_updates")
        for record in getattr(server, kind)
    )


def assert_each_event_once(server: MixpanelServer, names: list[str]) -> list[dict[str, Any]]:
    events = server.events
    assert sorted(event["event"] for event in events) == sorted(names)
    insert_ids = Counter(event["properties"]["$insert_id"] for event in events)
    assert set(insert_ids.values()) == {1}, insert_ids
    return events


@contextmanager
def user_layers(
    *, key: str | None = None, bound_user: str | None = None, baggage_user: str | None = None
) -> Iterator[None]:
    """Put a user in the event dict's bound contextvars, mp_logbridge.bound() and/or baggage."""
    with ExitStack() as stack:
        if key is not None:
            stack.enter_context(structlog.contextvars.bound_contextvars(user_id=key))
        if bound_user is not None:
            stack.enter_context(bound(distinct_id=bound_user))
        if baggage_user is not None:
            token = otel_context.attach(baggage.set_baggage("enduser.id", baggage_user))
            stack.callback(otel_context.detach, token)
        yield


# --------------------------------------------------------------------------- the tag format

SAME_TAGS = [
    pytest.param(tag.track("Signed Up", distinct_id="u1", plan="pro", seats=3), id="track"),
    pytest.param(
        {"mixpanel": {"event": "Clicked", "properties": {"distinct_id": "u1", "button": "buy"}}},
        id="plain-event",
    ),
    pytest.param({"mixpanel": True}, id="true"),
    pytest.param({"mixpanel": "Page Viewed"}, id="string"),
    pytest.param(tag.people.set({"name": "Ann", "age": 41}, distinct_id="u1"), id="people.set"),
    pytest.param(tag.people.increment({"logins": 1}), id="people.increment-bound-user"),
    pytest.param(tag.groups.set("Company", "Acme", {"size": 10}), id="groups.set"),
    pytest.param(tag.charge(9.99, {"sku": "A1"}, distinct_id="u1"), id="charge"),
    pytest.param(
        {
            "mixpanel": [
                {"event": "A", "distinct_id": "u1"},
                {"$distinct_id": "u1", "$set": {"k": 1}, "$add": {"n": 2}},
            ]
        },
        id="list",
    ),
    pytest.param(
        tag.track("Bought", distinct_id="u1") + tag.people.union({"skus": ["A1"]}), id="sum"
    ),
]


@pytest.mark.parametrize("tagged", SAME_TAGS)
def test_structlog_tag_sends_what_the_handler_sends(
    tagged: Mapping[str, Any],
    make_processor: Callable[..., MixpanelProcessor],
    make_handler: Callable[..., MixpanelHandler],
    make_logger: Callable[..., logging.Logger],
    mixpanel_server: MixpanelServer,
) -> None:
    """One tag, two front doors: the processor's records mean exactly what the handler's do."""
    handler = make_handler()
    with bound(distinct_id="bound-user", team="core"):
        make_logger(handler).info("log message", extra=dict(tagged))
    assert handler.flush(10)
    from_handler = everything(mixpanel_server)
    assert from_handler, "the handler sent nothing: the comparison would be empty"
    mixpanel_server.clear()

    processor = make_processor()
    out = render_with(processor)
    with bound(distinct_id="bound-user", team="core"):
        structlog.get_logger().info("log message", **tagged)
    assert processor.flush(10)
    assert everything(mixpanel_server) == from_handler
    # The line is still written, without the tag.
    assert lines(out) == ["event='log message' level='info'"]


def test_capture_logs_sees_the_line_and_the_event_is_sent(
    make_processor: Callable[..., MixpanelProcessor], mixpanel_server: MixpanelServer
) -> None:
    processor = make_processor()
    log = structlog.get_logger()
    chain = [structlog.contextvars.merge_contextvars, processor]
    with structlog.testing.capture_logs(processors=chain) as captured:
        log.info("report exported", rows=12, **tag.track(distinct_id="u9", format="csv"))
        log.warning("disk almost full")
    assert captured == [
        {"event": "report exported", "rows": 12, "log_level": "info"},
        {"event": "disk almost full", "log_level": "warning"},
    ]
    assert processor.flush(10)
    [event] = mixpanel_server.events
    assert event["event"] == "report exported"  # named after structlog's ``event``
    assert event["properties"]["distinct_id"] == "u9"
    assert event["properties"]["format"] == "csv"
    assert "rows" not in event["properties"]  # only copy_keys are copied


def test_keep_tag_leaves_the_tag_marked_and_sends_once(
    make_processor: Callable[..., MixpanelProcessor], mixpanel_server: MixpanelServer
) -> None:
    processor = make_processor(keep_tag=True)
    capture = structlog.testing.LogCapture()
    # Twice in the chain: the mark stops the second pass.
    structlog.configure(processors=[processor, processor, capture])
    structlog.get_logger().info("signed up", **tag.track("Signed Up", distinct_id="u1"))
    [entry] = capture.entries
    mark = entry.pop(SENT_MARK)
    assert entry == {
        "event": "signed up",
        "log_level": "info",
        "mixpanel": {"event": "Signed Up", "properties": {"distinct_id": "u1"}},
    }
    assert_mark_names_one_sender(mark)
    assert processor.flush(10)
    assert_each_event_once(mixpanel_server, ["Signed Up"])


def assert_mark_names_one_sender(mark: object) -> None:
    """The sent mark: one sender digest, never the token in clear (it reaches log output)."""
    assert isinstance(mark, tuple) and len(mark) == 1
    assert all(isinstance(part, str) for part in mark)
    assert TOKEN not in repr(mark)


def test_other_tag_key(
    make_processor: Callable[..., MixpanelProcessor], mixpanel_server: MixpanelServer
) -> None:
    analytics = TagBuilder("analytics")
    processor = make_processor(tag="analytics")
    out = render_with(processor)
    log = structlog.get_logger()
    log.info("a", **analytics.track("Under Analytics", distinct_id="u1"))
    log.info("b", **tag.track("Under Mixpanel", distinct_id="u1"))  # not this processor's key
    assert processor.flush(10)
    assert [event["event"] for event in mixpanel_server.events] == ["Under Analytics"]
    assert "analytics" not in lines(out)[0]
    assert "mixpanel=" in lines(out)[1]


# --------------------------------------------------------------------------- who the user is


def test_distinct_id_precedence(
    make_processor: Callable[..., MixpanelProcessor], mixpanel_server: MixpanelServer
) -> None:
    """tag → distinct_id_key → mp_logbridge.bound() → baggage enduser.id → default_distinct_id."""
    processor = make_processor(distinct_id_key="user_id", default_distinct_id="default-user")
    render_with(processor)
    log = structlog.get_logger()
    everyone = {"key": "key-user", "bound_user": "bound-user", "baggage_user": "baggage-user"}
    with user_layers(**everyone):
        log.info("x", **tag.track("Tag Wins", distinct_id="tag-user"))
        log.info("x", **tag.people.set({"a": 1}, distinct_id="tag-user"))
        log.info("x", **tag.track("Key Next"))
        log.info("x", user_id="explicit-user", **tag.track("Explicit Key Over Bound Key"))
    with user_layers(bound_user="bound-user", baggage_user="baggage-user"):
        log.info("x", **tag.track("Bound Next"))
    with user_layers(baggage_user="baggage-user"):
        log.info("x", **tag.track("Baggage Next"))
        log.info("x", **tag.people.set({"b": 2}))
    log.info("x", user_id="", **tag.track("Default Last"))  # an empty key counts as none
    assert processor.flush(10)
    users = {e["event"]: e["properties"]["distinct_id"] for e in mixpanel_server.events}
    assert users == {
        "Tag Wins": "tag-user",
        "Key Next": "key-user",
        "Explicit Key Over Bound Key": "explicit-user",
        "Bound Next": "bound-user",
        "Baggage Next": "baggage-user",
        "Default Last": "default-user",
    }
    updates = {tuple(u["$set"]): u["$distinct_id"] for u in mixpanel_server.profile_updates}
    assert updates == {("a",): "tag-user", ("b",): "baggage-user"}


def test_no_user_anywhere_is_dropped_as_invalid(
    make_processor: Callable[..., MixpanelProcessor],
    mixpanel_server: MixpanelServer,
    library_warnings: RecordCollector,
) -> None:
    processor = make_processor(distinct_id_key="user_id")
    out = render_with(processor)
    log = structlog.get_logger()
    log.info("nobody", **tag.track("Nobody"))
    log.info("somebody", **tag.track("Somebody", distinct_id="u1"))
    processor.flush(10)  # True or False: it depends on when the sender thread dropped it
    assert [event["event"] for event in mixpanel_server.events] == ["Somebody"]
    assert processor.stats()["dropped"]["invalid"] == 1
    warning = library_warnings.wait_for("no distinct_id")
    assert "invalid: 1" in warning
    assert len(lines(out)) == 2


def test_copy_keys(
    make_processor: Callable[..., MixpanelProcessor], mixpanel_server: MixpanelServer
) -> None:
    processor = make_processor(copy_keys=["request_id", "route", "absent"])
    render_with(processor)
    log = structlog.get_logger()
    with structlog.contextvars.bound_contextvars(request_id="req-1"):
        log.info("viewed", route="/home", **tag.track("Viewed", distinct_id="u1"))
        log.info("moved", route="/a", **tag.track("Moved", distinct_id="u1", route="/b"))
    log.info("other", **tag.track("Other", distinct_id="u1"))
    assert processor.flush(10)
    viewed = props_of(mixpanel_server, "Viewed")
    assert (viewed["request_id"], viewed["route"]) == ("req-1", "/home")
    assert "absent" not in viewed
    assert props_of(mixpanel_server, "Moved")["route"] == "/b"  # the tag's own property wins
    assert not {"request_id", "route"} & set(props_of(mixpanel_server, "Other"))


def test_exception_info(
    make_processor: Callable[..., MixpanelProcessor], mixpanel_server: MixpanelServer
) -> None:
    processor = make_processor()
    out = render_with(processor, exc=True)
    log = structlog.get_logger()
    try:
        raise ValueError("bad amount")
    except ValueError:
        log.info("charge failed", exc_info=True, **tag.track("Charge Failed", distinct_id="u1"))
    try:
        raise PaymentDeclined("card expired")
    except PaymentDeclined:
        log.exception("payment failed", **tag.track("Payment Failed", distinct_id="u1"))
    log.error("given", exc_info=KeyError("k"), **tag.track("Given", distinct_id="u1"))
    log.info("fine", **tag.track("No Error", distinct_id="u1"))
    assert processor.flush(10)

    charge = props_of(mixpanel_server, "Charge Failed")
    assert (charge["exception_type"], charge["exception_message"]) == ("ValueError", "bad amount")
    payment = props_of(mixpanel_server, "Payment Failed")
    assert payment["exception_type"] == f"{PaymentDeclined.__module__}.PaymentDeclined"
    assert payment["exception_message"] == "card expired"
    assert props_of(mixpanel_server, "Given")["exception_type"] == "KeyError"
    assert "exception_type" not in props_of(mixpanel_server, "No Error")
    # format_exc_info after the processor still renders the traceback.
    rendered = out.getvalue()
    assert "ValueError: bad amount" in rendered
    assert "card expired" in rendered


def test_include_exception_off(
    make_processor: Callable[..., MixpanelProcessor], mixpanel_server: MixpanelServer
) -> None:
    processor = make_processor(include_exception=False)
    render_with(processor, exc=True)
    try:
        raise ValueError("hidden")
    except ValueError:
        structlog.get_logger().exception("failed", **tag.track("Failed", distinct_id="u1"))
    assert processor.flush(10)
    assert "exception_type" not in props_of(mixpanel_server, "Failed")


# --------------------------------------------------------------------------- bad input


class ExplodingMapping(Mapping[str, Any]):
    """A tag that fails as soon as it is read."""

    def __getitem__(self, key: str) -> Any:
        raise RuntimeError("cannot read this tag")

    def __iter__(self) -> Iterator[str]:
        return iter(["event"])

    def __len__(self) -> int:
        return 1


def test_bad_tags_are_counted_and_reported_and_the_lines_written(
    make_processor: Callable[..., MixpanelProcessor],
    mixpanel_server: MixpanelServer,
    library_warnings: RecordCollector,
) -> None:
    processor = make_processor(default_distinct_id="fallback")
    out = render_with(processor)
    log = structlog.get_logger()
    bad = [
        42,
        object(),
        {"event": "Bad Props", "properties": 5},
        ["Good Event", 3.5],  # one good, one bad
        {"$distinct_id": "u1"},  # a profile update without an operation
        ExplodingMapping(),  # fails on the caller's thread
        ExplodingMapping(),  # again: its report is held back by the rate limit until close()
    ]
    for index, value in enumerate(bad):
        line = f"line {index}"
        log.info(line, mixpanel=value)
    processor.flush(10)  # True or False: it depends on when the sender thread dropped them
    assert [event["event"] for event in mixpanel_server.events] == ["Good Event"]
    assert processor.stats()["dropped"]["invalid"] == 7
    assert lines(out) == [f"event='line {index}' level='info'" for index in range(len(bad))]
    # Reported in aggregate and rate limited (closing reports the rest): those that failed
    # on this thread in the processor's reports, those the sender thread refused in the
    # consumer's.
    processor.close()
    library_warnings.wait_until(lambda _messages: library_warnings.invalid_reported() == 7)


def test_a_broken_consumer_never_reaches_the_caller(
    make_processor: Callable[..., MixpanelProcessor], library_warnings: RecordCollector
) -> None:
    class BrokenConsumer:
        def send(self, kind: str, message: Any) -> bool:
            raise RuntimeError("sink is down")

        def flush(self, timeout: float | None = None) -> bool:
            raise RuntimeError("cannot flush")

        def stats(self) -> dict[str, Any]:
            raise RuntimeError("no stats")

    broken = make_processor(consumer=BrokenConsumer())
    raising_callable = make_processor(consumer=lambda kind, record: 1 / 0)
    out = render_with(broken, raising_callable)
    log = structlog.get_logger()
    log.info("one", **tag.track("One", distinct_id="u1"))
    log.info("two", **tag.track("Two", distinct_id="u1"))
    assert lines(out) == ["event='one' level='info'", "event='two' level='info'"]
    library_warnings.wait_for("sink is down")
    # The first processor removed the tag, so the second saw none; call it directly.
    event_dict = {"event": "three", **tag.track(distinct_id="u1")}
    assert raising_callable(None, "info", event_dict) is event_dict
    library_warnings.wait_for("ZeroDivisionError")
    assert broken.flush(1) is False
    library_warnings.wait_for("cannot flush")
    assert broken.stats()["enabled"] is True
    broken.close()
    broken.close()


def test_not_an_event_dict_is_returned_as_it_is(
    make_processor: Callable[..., MixpanelProcessor],
) -> None:
    processor = make_processor()
    rendered = "event='already rendered'"
    assert processor(None, "info", rendered) is rendered  # type: ignore[arg-type]
    assert processor(None, "info", None) is None  # type: ignore[arg-type]
    assert processor.stats()["dropped_total"] == 0  # no tag read, so none lost


TAG_KEYS = ("event", "properties", "distinct_id", "$distinct_id", "$set", "$add", "$group_key")
TAG_KEYS += ("$group_id", "$unset", "x")
JSON_LIKE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(TAG_KEYS), children, max_size=4)
    ),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=JSON_LIKE)
def test_any_tag_is_sent_or_counted(value: Any) -> None:
    """Nothing is lost silently: each message of any tag is handed on or counted as invalid."""
    delivered: list[str] = []
    processor = MixpanelProcessor(
        TOKEN, consumer=lambda kind, record: delivered.append(kind), default_distinct_id="d"
    )
    try:
        event_dict = {"event": "line", "mixpanel": value}
        assert processor(None, "info", event_dict) is event_dict
        if value is None or value is False:
            assert event_dict == {"event": "line", "mixpanel": value}
            expected = 0
        else:
            assert event_dict == {"event": "line"}
            parts, problems = split_tag(value)
            expected = len(parts) + len(problems)
        assert len(delivered) + processor.stats()["dropped"]["invalid"] == expected
    finally:
        processor.close()


# --------------------------------------------------------------------------- async code


def test_async_methods_and_concurrent_tasks(
    make_processor: Callable[..., MixpanelProcessor], mixpanel_server: MixpanelServer
) -> None:
    """Each task's user, bound properties and span reach its own events (ainfo, aexception)."""
    processor = make_processor(distinct_id_key="user_id")
    out = render_with(processor)
    log = structlog.get_logger()
    tracer = TracerProvider().get_tracer(__name__)
    traces: dict[int, str] = {}
    tasks = 8

    async def request(index: int) -> None:
        structlog.contextvars.bind_contextvars(user_id=f"user-{index}")
        with bound(plan=f"plan-{index}"), tracer.start_as_current_span("request") as span:
            traces[index] = format(span.get_span_context().trace_id, "032x")
            await asyncio.sleep(0)  # let the other tasks bind their own users
            await log.ainfo("task done", **tag.track("Task Done", task=index))
            try:
                raise KeyError(index)
            except KeyError:
                await log.aexception("task failed", **tag.track("Task Failed", task=index))

    async def main() -> None:
        await asyncio.gather(*(request(index) for index in range(tasks)))

    asyncio.run(main())
    assert processor.flush(10)
    events = mixpanel_server.events
    assert Counter(event["event"] for event in events) == {"Task Done": tasks, "Task Failed": tasks}
    for event in events:
        props = event["properties"]
        index = props["task"]
        assert props["distinct_id"] == f"user-{index}"
        assert props["plan"] == f"plan-{index}"
        assert props["trace_id"] == traces[index]
        if event["event"] == "Task Failed":
            assert props["exception_type"] == "KeyError"
    assert len(lines(out)) == 2 * tasks


# --------------------------------------------------------------------------- structlog → stdlib


def log_a_session(log: Any) -> None:
    """Three events and a profile update through a structlog logger."""
    with bound(distinct_id="u1"):
        log.info("signed up", **tag.track("Signed Up", plan="pro"))
        log.info("page viewed", mixpanel=True)
        log.info("searched", **(tag.track("Searched", terms="red") + tag.people.set({"x": 1})))


SESSION_EVENTS = ["Signed Up", "page viewed", "Searched"]


class SeenByStdlib(logging.Handler):
    """Remembers the tag and the sent mark each forwarded record carried."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[Any, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.__dict__.get("mixpanel"), record.__dict__.get(SENT_MARK)))


def configure_forwarding(*processors: Any) -> None:
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *processors],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
    )


@pytest.mark.parametrize("keep_tag", [False, True], ids=["tag-removed", "keep-tag"])
def test_render_to_log_kwargs_with_a_handler_sends_once(
    keep_tag: bool,
    make_processor: Callable[..., MixpanelProcessor],
    make_handler: Callable[..., MixpanelHandler],
    make_logger: Callable[..., logging.Logger],
    mixpanel_server: MixpanelServer,
) -> None:
    processor = make_processor(keep_tag=keep_tag)
    handler = make_handler()
    seen = SeenByStdlib()
    out = io.StringIO()
    console = logging.StreamHandler(out)
    logger = make_logger(handler, seen, console)
    configure_forwarding(processor, structlog.stdlib.render_to_log_kwargs)
    log_a_session(structlog.get_logger(logger.name))
    assert processor.flush(10) and handler.flush(10)
    assert_each_event_once(mixpanel_server, SESSION_EVENTS)
    assert len(mixpanel_server.profile_updates) == 1
    assert out.getvalue().splitlines() == ["signed up", "page viewed", "searched"]
    if keep_tag:  # the handler got the tag, and the mark through ``extra``
        for _tagged, mark in seen.seen:
            assert_mark_names_one_sender(mark)
        assert all(tagged is not None for tagged, _mark in seen.seen)
    else:
        assert seen.seen == [(None, None)] * 3


def test_sent_mark_is_per_project(
    make_processor: Callable[..., MixpanelProcessor],
    make_handler: Callable[..., MixpanelHandler],
    make_logger: Callable[..., logging.Logger],
    mixpanel_server: MixpanelServer,
) -> None:
    """A handler of another project sends a kept tag too: the mark names the project."""
    processor = make_processor(keep_tag=True)
    handler = make_handler("other-project-token")
    logger = make_logger(handler)
    configure_forwarding(processor, structlog.stdlib.render_to_log_kwargs)
    structlog.get_logger(logger.name).info("x", **tag.track("Shared", distinct_id="u1"))
    assert processor.flush(10) and handler.flush(10)
    tokens = sorted(event["properties"]["token"] for event in mixpanel_server.events)
    assert tokens == sorted([TOKEN, "other-project-token"])


def formatted_console(out: io.StringIO) -> logging.Handler:
    console = logging.StreamHandler(out)
    console.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.KeyValueRenderer(key_order=["event"]),
            ]
        )
    )
    return console


@pytest.mark.parametrize("keep_tag", [False, True], ids=["tag-removed", "keep-tag"])
def test_wrap_for_formatter_with_a_handler_sends_once(
    keep_tag: bool,
    make_processor: Callable[..., MixpanelProcessor],
    make_handler: Callable[..., MixpanelHandler],
    make_logger: Callable[..., logging.Logger],
    mixpanel_server: MixpanelServer,
) -> None:
    processor = make_processor(keep_tag=keep_tag)
    handler = make_handler()
    out = io.StringIO()
    logger = make_logger(formatted_console(out), handler)
    configure_forwarding(processor, structlog.stdlib.ProcessorFormatter.wrap_for_formatter)
    log_a_session(structlog.get_logger(logger.name))
    assert processor.flush(10) and handler.flush(10)
    assert_each_event_once(mixpanel_server, SESSION_EVENTS)
    assert len(mixpanel_server.profile_updates) == 1
    rendered = out.getvalue().splitlines()
    assert len(rendered) == 3
    for line, event in zip(rendered, ["signed up", "page viewed", "searched"], strict=True):
        assert line.startswith(f"event={event!r}")
    assert all(("mixpanel=" in line) is keep_tag for line in rendered)


def test_render_to_log_kwargs_handler_only(
    make_handler: Callable[..., MixpanelHandler],
    make_logger: Callable[..., logging.Logger],
    mixpanel_server: MixpanelServer,
) -> None:
    """structlog on top of stdlib without the processor: the tag travels in ``extra=``."""
    handler = make_handler()
    logger = make_logger(handler)
    configure_forwarding(structlog.stdlib.render_to_log_kwargs)
    log_a_session(structlog.get_logger(logger.name))
    assert handler.flush(10)
    assert_each_event_once(mixpanel_server, SESSION_EVENTS)
    assert len(mixpanel_server.profile_updates) == 1


def test_wrap_for_formatter_handler_only(
    make_handler: Callable[..., MixpanelHandler],
    make_logger: Callable[..., logging.Logger],
    mixpanel_server: MixpanelServer,
) -> None:
    """structlog on top of stdlib without the processor, through ProcessorFormatter."""
    handler = make_handler()
    out = io.StringIO()
    logger = make_logger(formatted_console(out), handler)
    configure_forwarding(structlog.stdlib.ProcessorFormatter.wrap_for_formatter)
    log_a_session(structlog.get_logger(logger.name))
    assert len(out.getvalue().splitlines()) == 3
    assert handler.flush(10)
    assert_each_event_once(mixpanel_server, SESSION_EVENTS)


# --------------------------------------------------------------------------- structlog is optional


@pytest.mark.subprocess
def test_import_and_use_without_structlog(run_python: Any) -> None:
    result = run_python(
        """
        import sys
        sys.modules["structlog"] = None  # as if it were not installed
        import mp_logbridge
        from mp_logbridge.testing import MixpanelServer
        try:
            import structlog
        except ImportError:
            print("structlog: not importable")
        with MixpanelServer() as server:
            processor = mp_logbridge.MixpanelProcessor("tok", api_host=server.url)
            event_dict = {"event": "child", **mp_logbridge.tag.track(distinct_id="u1")}
            assert processor(None, "info", event_dict) is event_dict
            print("left:", sorted(event_dict))
            print("flushed:", processor.flush(10))
            print("events:", [event["event"] for event in server.events])
            processor.close()
        """,
        timeout=60,
    )
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == [
        "structlog: not importable",
        "left: ['event']",
        "flushed: True",
        "events: ['child']",
    ]


# --------------------------------------------------------------------------- lifecycle


def test_processor_and_handler_with_the_same_options_share_one_consumer(
    make_processor: Callable[..., MixpanelProcessor],
    make_handler: Callable[..., MixpanelHandler],
    make_logger: Callable[..., logging.Logger],
    mixpanel_server: MixpanelServer,
) -> None:
    processor = make_processor(batch_size=7)
    handler = make_handler(batch_size=7)
    render_with(processor)
    structlog.get_logger().info("a", **tag.track("From Structlog", distinct_id="u1"))
    make_logger(handler).info("b", extra=tag.track("From Logging", distinct_id="u1"))
    assert processor.flush(10) and handler.flush(10)
    assert len(mixpanel_server.events) == 2
    # One consumer: both front doors read the same counters.
    assert processor.stats()["sent"] == handler.stats()["sent"] == 2


def test_processors_with_the_same_options_share_one_consumer(
    make_processor: Callable[..., MixpanelProcessor], mixpanel_server: MixpanelServer
) -> None:
    first = make_processor(batch_size=7)
    second = make_processor(batch_size=7)
    other = make_processor(batch_size=8)
    for processor, name in ((first, "First"), (second, "Second"), (other, "Other")):
        processor(None, "info", {"event": name, **tag.track(distinct_id="u1")})
        assert processor.flush(10)
    assert (first.stats()["sent"], second.stats()["sent"], other.stats()["sent"]) == (2, 2, 1)
    first.close()  # the second still holds a share: the consumer keeps working
    second(None, "info", {"event": "After", **tag.track(distinct_id="u1")})
    assert second.flush(10)
    assert [event["event"] for event in mixpanel_server.events][-1] == "After"


def test_flush_stats_close(
    make_processor: Callable[..., MixpanelProcessor],
    mixpanel_server: MixpanelServer,
    library_warnings: RecordCollector,
) -> None:
    processor = make_processor()
    out = render_with(processor)
    log = structlog.get_logger()
    for index in range(3):
        log.info("tick", **tag.track("Tick", distinct_id="u1", n=index))
    assert processor.flush(10)
    stats = processor.stats()
    assert (stats["sent"], stats["dropped_total"], stats["enabled"]) == (3, 0, True)
    assert "MixpanelProcessor" in repr(processor)
    processor.close()
    processor.close()  # idempotent
    log.info("late", **tag.track("Late", distinct_id="u1"))  # never raises, the line is written
    assert lines(out)[-1] == "event='late' level='info'"
    assert processor.stats()["dropped"]["closed"] == 1
    library_warnings.wait_for("closed")
    assert len(mixpanel_server.events) == 3


def test_disabled_without_token(
    library_warnings: RecordCollector, make_logger: Callable[..., logging.Logger]
) -> None:
    handed_on: list[Any] = []
    processor = MixpanelProcessor()  # no token=, no MIXPANEL_TOKEN
    with_consumer = MixpanelProcessor(consumer=lambda kind, record: handed_on.append(record))
    try:
        tokenless = [m for m in library_warnings.messages() if "no Mixpanel token" in m]
        assert len(tokenless) == 2  # one per processor, at construction
        out = render_with(processor, with_consumer)
        log = structlog.get_logger()
        for name in ("A", "B", "C"):
            log.info(name, **tag.track(name, distinct_id="u1"))
        log.info("untagged")
        assert len(lines(out)) == 4
        assert with_consumer(None, "info", {"event": "D", "mixpanel": True})["event"] == "D"
        assert (processor.stats()["skipped"], processor.stats()["enabled"]) == (3, False)
        assert with_consumer.stats()["skipped"] == 1
        assert handed_on == []  # nothing is sent without a token, not even to a consumer
        assert processor.flush(1) is True
        own = [m for m in library_warnings.messages() if "MixpanelProcessor" in m]
        assert own == tokenless  # skipping is counted, not warned
    finally:
        processor.close()
        with_consumer.close()


def test_token_from_environment_and_tracker(
    make_processor: Callable[..., MixpanelProcessor],
    mixpanel_server: MixpanelServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MIXPANEL_TOKEN", "env-token")
    from_env = make_processor(None)
    from_env(None, "info", {"event": "From Env", **tag.track(distinct_id="u1")})
    assert from_env.flush(10)
    with Tracker(TOKEN, Consumer(api_host=mixpanel_server.url)) as tracker:
        from_tracker = make_processor(None, tracker=tracker)
        from_tracker(None, "info", {"event": "From Tracker", **tag.track(distinct_id="u1")})
    tokens = {e["event"]: e["properties"]["token"] for e in mixpanel_server.events}
    assert tokens == {"From Env": "env-token", "From Tracker": TOKEN}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tag": ""}, "tag must be"),
        ({"copy_keys": "request_id"}, "copy_keys"),
        ({"region": "mars", "api_host": "http://127.0.0.1:1"}, "unknown Mixpanel region"),
        ({"batch_size": 0}, "batch_size"),
        ({"colour": "blue"}, "unknown option"),
        ({"super_properties": ["a"]}, "super_properties"),
    ],
)
def test_bad_configuration_fails_at_construction(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        MixpanelProcessor(TOKEN, **options)


# --------------------------------------------------------------------------- the example


@pytest.mark.subprocess
def test_example_runs(run_python: Any) -> None:
    result = run_python(
        f"import runpy; runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')", timeout=60
    )
    assert result.returncode == 0, result
    out = result.stdout
    assert "event='signed up' level='info' request_id='req-1' user_id='user-42'" in out
    assert "event='cache warmed'" in out  # untagged: a log line only
    assert "mixpanel=" not in out  # the processor removed the tags before rendering
    received = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert received == [
        "event 'Signed Up': {'distinct_id': 'user-42', 'request_id': 'req-1', 'plan': 'pro'}",
        "event 'report exported': {'distinct_id': 'user-42', 'request_id': 'req-1'}",
        "profile update: {'$distinct_id': 'user-42', '$set': {'$email': 'ann@example.com'}}",
        received[3],  # the charge, stamped with the time of the log call
        "group update: {'$group_key': 'Company', '$group_id': 'Acme', '$set': {'seats': 10}}",
        "event 'Checkout': {'distinct_id': 'user-7', 'items': 3}",
        "event 'Refunded': {'distinct_id': 'user-7'}",
    ]
    assert received[3].startswith(
        "profile update: {'$distinct_id': 'user-42', '$append': {'$transactions': "
        "{'$amount': 19.0, '$time': '"
    )

"""``@instrument`` and dotted-path instrumentation, delivered to a real ``MixpanelServer``.

Events travel the default way — a tagged log record on a logger, sent by a ``MixpanelHandler``
(background consumer) — or through an explicit ``Tracker`` with a synchronous ``Consumer``.
OpenTelemetry spans come from a local SDK ``TracerProvider`` with an in-memory exporter, passed
as ``tracer_provider=``, so the global provider is never set; the "API only" case runs in a child
interpreter that cannot import the SDK.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import functools
import inspect
import json
import logging
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import wrapt
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from support import RecordCollector, attached

from mp_logbridge import (
    ConfigurationError,
    Consumer,
    InvalidMessageError,
    MixpanelHandler,
    Tracker,
    bound,
    instrument,
)
from mp_logbridge.consumers import CallableSink
from mp_logbridge.instrumentation import (
    instrument_function,
    instrument_functions,
    instrumentation_stats,
    uninstrument_function,
)
from mp_logbridge.testing import MixpanelServer

TOKEN = "instrument-token"
KINDS = "tests.instrument.kinds"  # the logger of the module-level examples below

Event = dict[str, Any]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server() -> Iterator[MixpanelServer]:
    with MixpanelServer() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def handler(server: MixpanelServer) -> Iterator[MixpanelHandler]:
    mixpanel = MixpanelHandler(TOKEN, api_host=server.url)
    try:
        yield mixpanel
    finally:
        mixpanel.close()


class Delivery:
    """The loggers a test logs on (all routed to the handler) and what reached the server."""

    def __init__(self, server: MixpanelServer, handler: MixpanelHandler) -> None:
        self.server = server
        self.handler = handler
        self._attached: list[tuple[logging.Logger, int, bool]] = []

    def route(self, name: str, level: int = logging.INFO) -> logging.Logger:
        """Route logger ``name`` (at ``level``) to the Mixpanel handler for this test."""
        logger = logging.getLogger(name)
        self._attached.append((logger, logger.level, logger.propagate))
        logger.setLevel(level)
        logger.propagate = False
        logger.addHandler(self.handler)
        return logger

    def events(self, count: int) -> list[Event]:
        """Exactly ``count`` events delivered (waits for the background consumer)."""
        assert self.handler.flush(10)
        events = self.server.wait_for(count, timeout=10) if count else self.server.events
        assert len(events) == count, [event["event"] for event in events]
        return events

    def one(self) -> Event:
        """The single event delivered; returns its properties with ``event`` added."""
        event = self.events(1)[0]
        return {**event["properties"], "event": event["event"]}

    def detach(self) -> None:
        self.handler.flush(10)
        for logger, level, propagate in reversed(self._attached):
            logger.removeHandler(self.handler)
            logger.setLevel(level)
            logger.propagate = propagate


@pytest.fixture
def delivery(server: MixpanelServer, handler: MixpanelHandler) -> Iterator[Delivery]:
    server.clear()
    routes = Delivery(server, handler)
    routes.route(KINDS)
    try:
        yield routes
    finally:
        routes.detach()


@pytest.fixture
def log(delivery: Delivery, request: pytest.FixtureRequest) -> logging.Logger:
    """A logger of this test, routed to the Mixpanel handler at INFO."""
    return delivery.route(f"tests.instrument.{request.node.name}")


@pytest.fixture
def tracker(server: MixpanelServer) -> Iterator[Tracker]:
    consumer = Consumer(api_host=server.url)
    try:
        yield Tracker(TOKEN, consumer)
    finally:
        consumer.close()


@pytest.fixture
def otel() -> Iterator[tuple[Any, Any]]:
    """A local SDK provider and its in-memory exporter (the global provider stays untouched)."""
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield provider, exporter
    finally:
        provider.shutdown()


def dropped_invalid() -> int:
    return int(instrumentation_stats()["dropped"]["invalid"])


def hex_ids(span: Any) -> tuple[str, str]:
    context = span.get_span_context() if hasattr(span, "get_span_context") else span.context
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


# --------------------------------------------------------------------------- function kinds


class Account:
    """Every kind of method, decorated outside and inside ``classmethod``/``staticmethod``."""

    def __init__(self, owner: str) -> None:
        self.owner = owner

    @instrument(
        "Deposit", logger=KINDS, distinct_id=lambda a: a["self"].owner, capture_args=["amount"]
    )
    def deposit(self, amount: int, note: str = "") -> int:
        """Deposit money."""
        return amount * 2

    @instrument("Open", logger=KINDS, distinct_id="owner", capture_args=["amount"])
    @classmethod
    def open_outside(cls, owner: str, amount: int = 1) -> Account:
        return cls(owner)

    @classmethod
    @instrument("Open Inside", logger=KINDS, distinct_id="owner", capture_args=["amount"])
    def open_inside(cls, owner: str, amount: int = 1) -> Account:
        return cls(owner)

    @instrument("Rate", logger=KINDS, distinct_id="user", capture_args=["amount"])
    @staticmethod
    def rate_outside(user: str, amount: int = 1) -> float:
        return amount * 1.5

    @staticmethod
    @instrument("Rate Inside", logger=KINDS, distinct_id="user", capture_args=["amount"])
    def rate_inside(user: str, amount: int = 1) -> float:
        return amount * 1.5


@instrument("Transfer", logger=KINDS, distinct_id="user", capture_args=["amount"])
def transfer(user: str, amount: int = 1) -> str:
    return f"sent {amount}"


_account = Account("u-acc")

CALLS: dict[str, tuple[Callable[[], Any], Any, str, str, int, str]] = {
    # label: (call, result, event, distinct_id, captured amount, function)
    "function": (lambda: transfer("u-f", 3), "sent 3", "Transfer", "u-f", 3, "transfer"),
    "function-keywords": (
        lambda: transfer(amount=3, user="u-f"),
        "sent 3",
        "Transfer",
        "u-f",
        3,
        "transfer",
    ),
    "method": (lambda: _account.deposit(4), 8, "Deposit", "u-acc", 4, "Account.deposit"),
    "method-keywords": (
        lambda: _account.deposit(amount=4, note="x"),
        8,
        "Deposit",
        "u-acc",
        4,
        "Account.deposit",
    ),
    "method-through-class": (
        lambda: Account.deposit(_account, 4),
        8,
        "Deposit",
        "u-acc",
        4,
        "Account.deposit",
    ),
    "classmethod-outside": (
        lambda: Account.open_outside("u-o", amount=2).owner,
        "u-o",
        "Open",
        "u-o",
        2,
        "Account.open_outside",
    ),
    "classmethod-outside-on-instance": (
        lambda: _account.open_outside("u-o").owner,
        "u-o",
        "Open",
        "u-o",
        1,
        "Account.open_outside",
    ),
    "classmethod-inside": (
        lambda: Account.open_inside("u-i", 2).owner,
        "u-i",
        "Open Inside",
        "u-i",
        2,
        "Account.open_inside",
    ),
    "classmethod-inside-on-instance": (
        lambda: _account.open_inside(owner="u-i").owner,
        "u-i",
        "Open Inside",
        "u-i",
        1,
        "Account.open_inside",
    ),
    "staticmethod-outside": (
        lambda: Account.rate_outside("u-s", 2),
        3.0,
        "Rate",
        "u-s",
        2,
        "Account.rate_outside",
    ),
    "staticmethod-outside-on-instance": (
        lambda: _account.rate_outside(user="u-s"),
        1.5,
        "Rate",
        "u-s",
        1,
        "Account.rate_outside",
    ),
    "staticmethod-inside": (
        lambda: Account.rate_inside("u-s", 2),
        3.0,
        "Rate Inside",
        "u-s",
        2,
        "Account.rate_inside",
    ),
    "staticmethod-inside-on-instance": (
        lambda: _account.rate_inside("u-s", amount=2),
        3.0,
        "Rate Inside",
        "u-s",
        2,
        "Account.rate_inside",
    ),
}


@pytest.mark.parametrize("label", list(CALLS))
def test_every_function_kind_becomes_one_event(label: str, delivery: Delivery) -> None:
    call, result, event, user, amount, function = CALLS[label]
    before = int(time.time() * 1000)
    assert call() == result
    props = delivery.one()
    assert props["event"] == event
    assert props["distinct_id"] == user
    assert props["amount"] == amount
    assert props["success"] is True
    assert props["function"] == f"{__name__}.{function}"
    assert before <= props["time"] <= int(time.time() * 1000)
    assert props["duration_ms"] >= 0
    assert props["token"] == TOKEN
    assert "exception_type" not in props


def test_decorated_functions_keep_their_identity() -> None:
    def plain(a: int, b: str = "x") -> str:
        """Plain docstring."""
        return b * a

    async def coroutine(a: int) -> int:
        return a

    def generator(n: int) -> Iterator[int]:
        yield from range(n)

    async def agenerator(n: int) -> Any:
        yield n

    for raw in (plain, coroutine, generator, agenerator):
        decorated = instrument("Kind")(raw)
        assert decorated.__name__ == raw.__name__
        assert decorated.__qualname__ == raw.__qualname__
        assert decorated.__doc__ == raw.__doc__
        assert decorated.__wrapped__ is raw
        assert inspect.signature(decorated) == inspect.signature(raw)
        for check in (
            inspect.iscoroutinefunction,
            inspect.isgeneratorfunction,
            inspect.isasyncgenfunction,
        ):
            assert check(decorated) == check(raw), (raw.__name__, check.__name__)
    assert Account.deposit.__doc__ == "Deposit money."
    assert str(inspect.signature(Account.deposit)) == (
        "(self, amount: 'int', note: 'str' = '') -> 'int'"
    )
    assert str(inspect.signature(_account.deposit)) == "(amount: 'int', note: 'str' = '') -> 'int'"
    assert Account.open_outside.__qualname__ == "Account.open_outside"
    assert str(inspect.signature(Account.open_inside)) == (
        "(owner: 'str', amount: 'int' = 1) -> 'Account'"
    )
    assert Account.rate_outside.__name__ == "rate_outside"


def test_bare_decorator_and_default_route(delivery: Delivery) -> None:
    """``@instrument`` without arguments: the event is the qualified name and the record goes to
    the logger named after the function's module."""

    @instrument
    def ping() -> str:
        return "pong"

    delivery.route(__name__)
    with bound(distinct_id="u-bare"):
        assert ping() == "pong"
    props = delivery.one()
    assert props["event"] == "test_bare_decorator_and_default_route.<locals>.ping"
    assert props["function"] == f"{__name__}.test_bare_decorator_and_default_route.<locals>.ping"
    assert props["distinct_id"] == "u-bare"


# --------------------------------------------------------------------------- async functions


def test_coroutine_event_is_sent_when_it_finishes(log: logging.Logger, delivery: Delivery) -> None:
    seen: dict[str, float] = {}

    @instrument("Fetched", logger=log, distinct_id="user", capture_args=["delay"])
    async def fetch(user: str, delay: float) -> str:
        seen["start"] = time.time()
        await asyncio.sleep(delay)
        seen["end"] = time.time()
        return "body"

    async def main() -> str:
        pending = fetch("u-async", 0.05)
        assert pending.__qualname__ == fetch.__qualname__  # what task reprs show
        assert delivery.events(0) == []  # created, not yet run: nothing sent
        return await pending

    assert asyncio.run(main()) == "body"
    props = delivery.one()
    assert props["event"] == "Fetched"
    assert props["distinct_id"] == "u-async"
    assert props["delay"] == 0.05
    assert props["success"] is True
    # asyncio.sleep(0.05) is measured: the duration is that of the coroutine, not of its creation
    assert props["duration_ms"] >= 49.9
    assert props["time"] <= int(seen["start"] * 1000) < int(seen["end"] * 1000)


def test_async_method_and_wrong_arguments_raise_at_the_call(
    log: logging.Logger, delivery: Delivery
) -> None:
    class Client:
        def __init__(self, user: str) -> None:
            self.user = user

        @instrument("Async Method", logger=log, distinct_id=lambda a: a["self"].user)
        async def get(self, path: str) -> str:
            return path.upper()

    assert asyncio.run(Client("u-m").get("/x")) == "/X"
    with pytest.raises(TypeError):
        Client("u-m").get()  # type: ignore[call-arg]  # as undecorated: at the call, not the await
    props = delivery.one()
    assert (props["event"], props["distinct_id"], props["success"]) == ("Async Method", "u-m", True)


def test_async_failure_and_cancellation(log: logging.Logger, delivery: Delivery) -> None:
    running = None

    @instrument("Slow Task", logger=log, distinct_id=lambda a: "u-cancel")
    async def slow() -> None:
        running.set()
        await asyncio.sleep(30)

    @instrument("Failing Task", logger=log, distinct_id=lambda a: "u-cancel")
    async def failing() -> None:
        await asyncio.sleep(0)
        raise ConnectionError("lost")

    async def main() -> None:
        nonlocal running
        running = asyncio.Event()
        task = asyncio.ensure_future(slow())
        await running.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(ConnectionError, match="lost"):
            await failing()

    asyncio.run(main())
    events = {e["event"]: e["properties"] for e in delivery.events(2)}
    cancelled = events["Slow Task"]
    assert cancelled["success"] is False
    assert cancelled["exception_type"] == f"{asyncio.CancelledError.__module__}.CancelledError"
    assert cancelled["exception_type"].startswith("asyncio.")
    failed = events["Failing Task"]
    assert (failed["success"], failed["exception_type"]) == (False, "ConnectionError")
    assert failed["exception_message"] == "lost"


# --------------------------------------------------------------------------- generators


def test_generator_event_at_exhaustion(log: logging.Logger, delivery: Delivery) -> None:
    @instrument("Rows Read", logger=log, distinct_id=lambda a: "u-gen", capture_result="total")
    def rows(n: int) -> Any:
        received = []
        for i in range(n):
            received.append((yield i))
        return len(received)

    with pytest.raises(TypeError):
        rows()  # type: ignore[call-arg]  # at the call, as undecorated
    iterator = rows(3)
    assert next(iterator) == 0
    assert iterator.send("a") == 1
    assert delivery.events(0) == []  # suspended: not finished yet
    assert list(iterator) == [2]
    props = delivery.one()
    assert props["event"] == "Rows Read"
    assert props["success"] is True
    assert props["total"] == 3  # the generator's return value


def test_generator_early_close_and_failure(log: logging.Logger, delivery: Delivery) -> None:
    closed = []

    @instrument("Stream", logger=log, distinct_id="user")
    def stream(user: str, fail_at: int | None = None) -> Iterator[int]:
        try:
            for i in range(10):
                if i == fail_at:
                    raise ValueError(f"bad row {i}")
                yield i
        finally:
            closed.append(user)

    for i in stream("u-early"):
        if i == 2:
            break
    early = stream("u-early-close")
    next(early)
    early.close()
    with pytest.raises(ValueError, match="bad row 1"):
        list(stream("u-fail", fail_at=1))
    thrown = stream("u-thrown")
    next(thrown)
    with pytest.raises(KeyError):
        thrown.throw(KeyError("from consumer"))
    assert closed == ["u-early", "u-early-close", "u-fail", "u-thrown"]
    by_user = {e["properties"]["distinct_id"]: e["properties"] for e in delivery.events(4)}
    assert by_user["u-early"]["success"] is True
    assert by_user["u-early-close"]["success"] is True
    assert by_user["u-fail"]["success"] is False
    assert by_user["u-fail"]["exception_type"] == "ValueError"
    assert by_user["u-fail"]["exception_message"] == "bad row 1"
    assert by_user["u-thrown"]["exception_type"] == "KeyError"


def test_async_generator(log: logging.Logger, delivery: Delivery) -> None:
    finalized = []

    @instrument("Ticks", logger=log, distinct_id="user", capture_args=["n"])
    async def ticks(user: str, n: int, fail_at: int = -1) -> Any:
        try:
            for i in range(n):
                if i == fail_at:
                    raise RuntimeError(f"tick {i} failed")
                reply = yield i
                if reply is not None:
                    yield f"got {reply}"
        finally:
            finalized.append(user)

    @instrument("Recovering", logger=log, distinct_id="user")
    async def recovering(user: str) -> Any:
        try:
            while True:
                try:
                    yield "item"
                except LookupError:
                    yield "recovered"
        finally:
            finalized.append(user)

    async def main() -> None:
        with pytest.raises(TypeError):
            ticks("u-missing")  # type: ignore[call-arg]  # at the call, as undecorated
        assert [i async for i in ticks("u-all", 3)] == [0, 1, 2]
        early = ticks("u-early", 10)
        async for i in early:
            if i == 1:
                break
        await early.aclose()
        with pytest.raises(RuntimeError, match="tick 2 failed"):
            async for _ in ticks("u-fail", 5, fail_at=2):
                pass
        talk = ticks("u-talk", 2)
        assert await talk.__anext__() == 0
        assert await talk.asend("hi") == "got hi"
        with pytest.raises(LookupError):
            await talk.athrow(LookupError("thrown in"))
        recover = recovering("u-recover")
        assert await recover.__anext__() == "item"
        assert await recover.athrow(LookupError("handled")) == "recovered"
        await recover.aclose()  # closes the wrapped generator too, at once
        assert finalized[-1] == "u-recover"

    asyncio.run(main())
    assert finalized == ["u-all", "u-early", "u-fail", "u-talk", "u-recover"]
    by_user = {e["properties"]["distinct_id"]: e["properties"] for e in delivery.events(5)}
    assert by_user["u-recover"]["success"] is True
    assert by_user["u-all"]["success"] is True
    assert by_user["u-all"]["n"] == 3
    assert by_user["u-early"]["success"] is True
    assert by_user["u-fail"]["success"] is False
    assert by_user["u-fail"]["exception_type"] == "RuntimeError"
    assert by_user["u-talk"]["exception_type"] == "LookupError"


# --------------------------------------------------------------------------- stacked decorators


def wraps_decorator(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return ("wrapped", func(*args, **kwargs))

    return wrapper


@wrapt.decorator
def wrapt_decorator(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    return ("wrapt", wrapped(*args, **kwargs))


def test_stacked_with_other_decorators(log: logging.Logger, delivery: Delivery) -> None:
    options = {"logger": log, "distinct_id": "user", "capture_args": ["n"]}

    @instrument("Outer Wraps", **options)
    @wraps_decorator
    def inside_wraps(user: str, n: int = 1) -> int:
        return n

    @wraps_decorator
    @instrument("Inner Wraps", **options)
    def outside_wraps(user: str, n: int = 1) -> int:
        return n

    @instrument("Outer Wrapt", **options)
    @wrapt_decorator
    def inside_wrapt(user: str, n: int = 1) -> int:
        return n

    @wrapt_decorator
    @instrument("Inner Wrapt", **options)
    def outside_wrapt(user: str, n: int = 1) -> int:
        return n

    class Service:
        @instrument("Method Over Wrapt", **options)
        @wrapt_decorator
        def run(self, user: str, n: int = 1) -> int:
            return n

        @wrapt_decorator
        @instrument("Method Under Wrapt", **options)
        def walk(self, user: str, n: int = 1) -> int:
            return n

    with attached(log, RecordCollector()) as keep:
        assert inside_wraps("u1", 2) == ("wrapped", 2)
    [record] = keep.records  # where the record says it comes from: the function itself
    _source, first_line = inspect.getsourcelines(inspect.unwrap(inside_wraps))
    assert (record.pathname, record.lineno) == (__file__, first_line)
    assert record.funcName == "inside_wraps"
    assert outside_wraps("u1", n=2) == ("wrapped", 2)
    assert inside_wrapt("u1", 2) == ("wrapt", 2)
    assert outside_wrapt(user="u1", n=2) == ("wrapt", 2)
    assert Service().run("u1", 2) == ("wrapt", 2)
    assert Service().walk("u1", n=2) == ("wrapt", 2)
    for decorated in (inside_wraps, outside_wraps, inside_wrapt, outside_wrapt):
        assert decorated.__name__.endswith(("_wraps", "_wrapt"))
        assert str(inspect.signature(decorated)) == "(user: 'str', n: 'int' = 1) -> 'int'"
    events = {e["event"]: e["properties"] for e in delivery.events(6)}
    assert set(events) == {
        "Outer Wraps",
        "Inner Wraps",
        "Outer Wrapt",
        "Inner Wrapt",
        "Method Over Wrapt",
        "Method Under Wrapt",
    }
    for props in events.values():
        assert (props["distinct_id"], props["n"], props["success"]) == ("u1", 2, True)
    assert events["Outer Wraps"]["function"].endswith("<locals>.inside_wraps")
    assert events["Method Over Wrapt"]["function"].endswith("<locals>.Service.run")


def test_stacked_async_wraps_decorator(log: logging.Logger, delivery: Delivery) -> None:
    def async_wraps(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            return [await func(*args, **kwargs)]

        return wrapper

    @instrument("Async Stack", logger=log, distinct_id="user")
    @async_wraps
    async def work(user: str) -> str:
        await asyncio.sleep(0.01)
        return user

    assert inspect.iscoroutinefunction(work)
    assert asyncio.run(work("u-stack")) == ["u-stack"]
    props = delivery.one()
    assert props["success"] is True
    assert props["duration_ms"] >= 9.9


# --------------------------------------------------------------------------- properties


class Blob:
    def __repr__(self) -> str:
        return "<Blob 3 bytes>"


def test_capture_args_by_name(log: logging.Logger, delivery: Delivery) -> None:
    when = _dt.datetime(2024, 5, 1, 12, 30, 0)
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")

    @instrument(
        "Report Exported",
        logger=log,
        distinct_id="user",
        capture_args=["fmt", "rows", "tags", "blob", "when", "ident", "ratio", "options"],
    )
    def export(
        user: str,
        fmt: str = "csv",
        rows: int = 10,
        *tags: str,
        blob: Any = None,
        when: Any = None,
        ident: Any = None,
        ratio: float = 0.5,
        **options: Any,
    ) -> None:
        return None

    export("u1", "pdf", 5, "a", "b", blob=Blob(), when=when, ident=ident, ratio=float("nan"))
    export(user="u1", fmt="pdf", rows=5, blob=Blob(), when=when, ident=ident, ratio=float("nan"))
    export("u1", extra=1)
    first, second, third = (e["properties"] for e in delivery.events(3))
    assert first["fmt"] == second["fmt"] == "pdf"
    assert first["rows"] == second["rows"] == 5
    assert first["tags"] == ["a", "b"] and second["tags"] == []
    assert first["blob"] == second["blob"] == "<Blob 3 bytes>"  # not plain: its repr
    assert first["when"] == second["when"] == "2024-05-01T12:30:00"
    assert first["ident"] == second["ident"] == str(ident)
    assert first["ratio"] == second["ratio"] == "nan"  # not JSON: its repr, the event survives
    assert first["options"] == second["options"] == {}
    # defaults applied for what the call left out
    assert (third["fmt"], third["rows"], third["blob"], third["ratio"]) == ("csv", 10, None, 0.5)
    assert third["options"] == {"extra": 1}


def test_capture_matches_signature_binding(log: logging.Logger, delivery: Delivery) -> None:
    """Captured arguments are exactly what ``inspect.Signature.bind`` + defaults gives, for
    simple signatures and for ones with positional-only, ``*args`` and ``**kwargs``."""

    def simple(a: int, b: int = 2, *, c: int = 3) -> None:
        pass

    def rich(a: int, /, b: int, *rest: int, d: int = 4, **more: int) -> None:
        pass

    calls: list[tuple[Callable[..., None], tuple[Any, ...], dict[str, Any]]] = [
        (simple, (1,), {}),
        (simple, (1, 5), {}),
        (simple, (), {"a": 1, "c": 9}),
        (simple, (1,), {"b": 7, "c": 8}),
        (rich, (1, 2), {}),
        (rich, (1, 2, 3), {"x": 5}),
        (rich, (1,), {"b": 2, "d": 0}),
    ]
    decorated = {
        func: instrument(
            func.__name__,
            logger=log,
            distinct_id=lambda a: "u-bind",
            capture_args=list(inspect.signature(func).parameters),
        )(func)
        for func in (simple, rich)
    }
    expected = []
    for func, args, kwargs in calls:
        decorated[func](*args, **kwargs)
        bound = inspect.signature(func).bind(*args, **kwargs)
        bound.apply_defaults()
        expected.append(
            {k: list(v) if isinstance(v, tuple) else v for k, v in bound.arguments.items()}
        )
    for func, args, kwargs in [
        (simple, (), {}),
        (simple, (1,), {"a": 1}),
        (rich, (1, 2), {"b": 3}),
    ]:
        with pytest.raises(TypeError) as info:
            decorated[func](*args, **kwargs)
        with pytest.raises(TypeError) as plain_info:
            func(*args, **kwargs)
        assert str(info.value) == str(plain_info.value)  # the function's own error
    got = [
        {k: v for k, v in e["properties"].items() if k in expected[i]}
        for i, e in enumerate(delivery.events(len(calls)))
    ]
    assert got == expected


def test_renamed_captures_results_and_properties(log: logging.Logger, delivery: Delivery) -> None:
    @instrument(
        "Search",
        logger=log,
        distinct_id="user",
        capture_args={"query": "search_query", "page": "page_number"},
        capture_result="hits",
        properties={"feature": "search", "page_number": "overridden"},
    )
    def search(user: str, query: str, page: int = 1) -> list[str]:
        return [query] * 2

    @instrument(
        "Basket",
        logger=log,
        distinct_id="user",
        capture_result=lambda result: {"items": len(result), "first": result[0]},
        properties=lambda a: {"size": len(a["items"]), "currency": a["currency"]},
    )
    def basket(user: str, items: list[str], currency: str = "EUR") -> list[str]:
        return sorted(items)

    @instrument("Opaque", logger=log, distinct_id=lambda a: "u1", capture_result="value")
    def opaque() -> Blob:
        return Blob()

    assert search("u1", "shoes") == ["shoes", "shoes"]
    assert basket("u1", ["b", "a"]) == ["a", "b"]
    assert isinstance(opaque(), Blob)
    events = {e["event"]: e["properties"] for e in delivery.events(3)}
    found = events["Search"]
    assert (found["search_query"], found["page_number"]) == ("shoes", 1)
    assert "query" not in found and "page" not in found
    assert found["feature"] == "search"
    assert found["hits"] == ["shoes", "shoes"]
    cart = events["Basket"]
    assert (cart["items"], cart["first"], cart["size"], cart["currency"]) == (2, "a", 2, "EUR")
    assert events["Opaque"]["value"] == "<Blob 3 bytes>"


def test_exception_is_recorded_and_reraised_unchanged(
    log: logging.Logger, delivery: Delivery
) -> None:
    error = PermissionError("not yours")

    def undecorated(user: str) -> None:
        raise error

    decorated = instrument("Denied", logger=log, distinct_id="user", capture_result="x")(
        undecorated
    )
    with pytest.raises(PermissionError) as info:
        decorated("u-denied")
    assert info.value is error
    assert error.__context__ is None and error.__cause__ is None
    frames = traceback.extract_tb(error.__traceback__)
    assert (frames[-1].name, frames[-1].line) == ("undecorated", "raise error")
    props = delivery.one()
    assert props["success"] is False
    assert props["exception_type"] == "PermissionError"
    assert props["exception_message"] == "not yours"
    assert "x" not in props  # no result to capture

    class Declined(Exception):
        pass

    @instrument("Declined", logger=log, distinct_id="user")
    def charge(user: str) -> None:
        raise Declined("card")

    with pytest.raises(Declined):
        charge("u2")
    event = delivery.events(2)[1]["properties"]
    assert event["exception_type"] == f"{__name__}.{Declined.__qualname__}"


# --------------------------------------------------------------------------- distinct_id


class User:
    def __init__(self, id: str) -> None:
        self.id = id


def test_distinct_id_resolution(log: logging.Logger, delivery: Delivery) -> None:
    @instrument("By Attribute", logger=log, distinct_id=lambda a: a["user"].id)
    def by_attribute(user: User) -> None:
        pass

    @instrument("Fixed", logger=log, distinct_id=lambda a: "service-account")
    def fixed() -> None:
        pass

    @instrument("By Parameter", logger=log, distinct_id="user_id")
    def by_parameter(user_id: str | None = None) -> None:
        pass

    @instrument("From Context", logger=log)
    def from_context() -> None:
        pass

    by_attribute(User("u-attr"))
    fixed()
    by_parameter(user_id="u-param")
    with bound(distinct_id="u-bound", plan="pro"):
        from_context()
        by_parameter()  # the parameter is None: the bound user applies
    token = otel_context.attach(baggage.set_baggage("enduser.id", "u-baggage"))
    try:
        from_context()
        with bound(distinct_id="u-bound-wins"):
            from_context()
    finally:
        otel_context.detach(token)
    got = [(e["event"], e["properties"]["distinct_id"]) for e in delivery.events(7)]
    assert got == [
        ("By Attribute", "u-attr"),
        ("Fixed", "service-account"),
        ("By Parameter", "u-param"),
        ("From Context", "u-bound"),
        ("By Parameter", "u-bound"),
        ("From Context", "u-baggage"),
        ("From Context", "u-bound-wins"),
    ]
    assert delivery.server.events[3]["properties"]["plan"] == "pro"  # bound super-property


def test_configuration_errors_at_decoration_time() -> None:
    def report(user_id: str, fmt: str = "csv") -> None:
        pass

    cases: list[tuple[dict[str, Any], str]] = [
        ({"distinct_id": "user"}, "has no parameter 'user'"),
        ({"capture_args": ["fmt", "format"]}, "has no parameter 'format'"),
        ({"capture_args": {"nope": "x"}}, "has no parameter 'nope'"),
        ({"capture_args": "fmt"}, "capture_args must be a list"),
        ({"distinct_id": 42}, "distinct_id must be a parameter name or a callable"),
        ({"properties": ["a"]}, "properties must be a mapping or a callable"),
        ({"capture_result": 3}, "capture_result must be a property name or a callable"),
        ({"level": "LOUD"}, "unknown logging level"),
        ({"tracer_provider": object()}, "tracer_provider must be"),
        ({"tracker": object()}, "tracker must have a track"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            instrument("Report", **options)(report)
    with pytest.raises(ConfigurationError, match="event name must be a string"):
        instrument(42)  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="not callable"):
        instrument("Nothing")(42)


# --------------------------------------------------------------------------- disabled logger


def test_disabled_logger_fast_path(log: logging.Logger, delivery: Delivery) -> None:
    made: list[str] = []
    evaluated: list[str] = []
    previous = logging.getLogRecordFactory()

    def counting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        made.append(args[0])
        return previous(*args, **kwargs)

    class Watched:
        def __repr__(self) -> str:
            evaluated.append("repr")
            return "<Watched>"

    def who(arguments: Any) -> str:
        evaluated.append("distinct_id")
        return "u-fast"

    @instrument(
        "Debug Only",
        logger=log,
        level="DEBUG",
        distinct_id=who,
        capture_args=["item"],
        properties=lambda a: evaluated.append("properties") or {},
    )
    def handle(item: Any) -> str:
        return "done"

    @instrument("Debug Gen", logger=log, level=logging.DEBUG, distinct_id=who)
    def produce() -> Iterator[int]:
        yield 1

    logging.setLogRecordFactory(counting_factory)
    try:
        assert handle(Watched()) == "done"
        assert list(produce()) == [1]
        assert made == [] and evaluated == []  # no record made, no argument looked at
        log.setLevel(logging.DEBUG)
        assert handle(Watched()) == "done"
    finally:
        logging.setLogRecordFactory(previous)
    assert made == [log.name]
    assert sorted(evaluated) == ["distinct_id", "properties", "repr"]
    props = delivery.one()
    assert (props["event"], props["item"]) == ("Debug Only", "<Watched>")


def test_disabled_by_logging_configuration(delivery: Delivery) -> None:
    """The default route obeys the module logger's level, as dictConfig would set it."""

    @instrument("Module Route", distinct_id=lambda a: "u-mod")
    def work() -> int:
        return 1

    module_logger = delivery.route(__name__, level=logging.WARNING)
    assert work() == 1
    assert delivery.events(0) == []
    module_logger.setLevel(logging.INFO)
    assert work() == 1
    assert delivery.one()["event"] == "Module Route"


# --------------------------------------------------------------------------- failures inside


def test_instrumentation_failures_never_change_the_call(log: logging.Logger) -> None:
    def no_user(arguments: Any) -> str:
        raise LookupError("no user")

    def bad_result(result: Any) -> dict[str, Any]:
        raise ZeroDivisionError("bad result")

    @instrument("No User", logger=log, distinct_id=no_user)
    def first(x: int) -> int:
        return x + 1

    @instrument("Bad Result", logger=log, distinct_id=lambda a: "u1", capture_result=bad_result)
    def second() -> str:
        return "ok"

    @instrument("Bad Properties", logger=log, properties=lambda a: 1 / 0)
    def third(x: int) -> int:
        raise ValueError("own error")

    before = dropped_invalid()
    assert first(1) == 2
    assert second() == "ok"
    with pytest.raises(ValueError, match="own error") as info:
        third(3)
    assert info.value.__context__ is None
    assert dropped_invalid() == before + 3


def test_raising_handlers_never_change_the_call(
    log: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    class Exploding(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise OSError("disk full")

    def refuse(kind: str, message: Any) -> None:
        raise RuntimeError("consumer refused")

    failing = logging.getLogger(f"{log.name}.raising")
    failing.propagate = False
    failing.setLevel(logging.INFO)
    exploding = Exploding()
    refusing = MixpanelHandler(TOKEN, consumer=refuse)
    failing.addHandler(exploding)

    @instrument("Explodes", logger=failing, distinct_id=lambda a: "u1")
    def compute(x: int) -> int:
        if x < 0:
            raise ArithmeticError("negative")
        return x * 3

    try:
        before = dropped_invalid()
        assert compute(2) == 6
        with pytest.raises(ArithmeticError) as info:
            compute(-1)
        assert info.value.__context__ is None
        assert dropped_invalid() == before + 2  # the handler's error reached the wrapper
        failing.removeHandler(exploding)
        failing.addHandler(refusing)
        assert compute(3) == 9  # MixpanelHandler counts its consumer's error itself
        assert refusing.stats()["dropped"]["consumer_error"] == 1
        assert dropped_invalid() == before + 2  # not an instrumentation failure
    finally:
        failing.removeHandler(exploding)
        failing.removeHandler(refusing)
        refusing.close()


def test_failures_are_reported_on_the_library_logger(run_python: Any) -> None:
    """A fresh interpreter, so the rate-limited report is the first one."""
    result = run_python(
        """
        import json, logging
        from mp_logbridge import instrument
        from mp_logbridge.instrumentation import instrumentation_stats

        warnings = []
        class Keep(logging.Handler):
            def emit(self, record):
                warnings.append(record.getMessage())

        logging.getLogger("mp_logbridge").addHandler(Keep())
        app = logging.getLogger("app")
        app.setLevel(logging.INFO)

        def no_user(arguments):
            raise LookupError("no user here")

        @instrument("Child Event", logger=app, distinct_id=no_user)
        def work(x):
            return x * 2

        print(json.dumps({"result": work(21), "stats": instrumentation_stats(),
                          "warnings": warnings}))
        """,
        timeout=60,
    )
    assert result.returncode == 0, result
    out = json.loads(result.stdout)
    assert out["result"] == 42
    assert out["stats"]["dropped"]["invalid"] == 1
    [warning] = out["warnings"]
    assert "Child Event: instrumentation failed: LookupError: no user here" in warning


# --------------------------------------------------------------------------- OpenTelemetry


def test_event_carries_the_active_span_ids(
    log: logging.Logger, delivery: Delivery, otel: tuple[Any, Any]
) -> None:
    provider, _exporter = otel
    tracer = provider.get_tracer("tests.instrument")

    @instrument("In Span", logger=log, distinct_id=lambda a: "u-otel")
    def work() -> None:
        pass

    with tracer.start_as_current_span("request") as span:
        work()
        trace_id, span_id = hex_ids(span)
    work()  # no active span: no ids
    inside, outside = (e["properties"] for e in delivery.events(2))
    assert (inside["trace_id"], inside["span_id"]) == (trace_id, span_id)
    assert len(inside["trace_id"]) == 32 and len(inside["span_id"]) == 16
    assert int(inside["trace_id"], 16) and int(inside["span_id"], 16)
    assert "trace_id" not in outside and "span_id" not in outside


def test_span_true_opens_a_span_with_the_same_ids(
    log: logging.Logger, delivery: Delivery, otel: tuple[Any, Any]
) -> None:
    provider, exporter = otel
    seen: list[Any] = []

    @instrument(
        "Export Report", logger=log, distinct_id="user", span=True, tracer_provider=provider
    )
    def export(user: str) -> str:
        seen.append(trace.get_current_span())
        return "ok"

    @instrument("Async Export", logger=log, distinct_id="user", span=True, tracer_provider=provider)
    async def export_async(user: str) -> str:
        await asyncio.sleep(0)
        seen.append(trace.get_current_span())
        return "ok"

    @instrument("Export Rows", logger=log, distinct_id="user", span=True, tracer_provider=provider)
    def export_rows(user: str) -> Iterator[int]:
        yield 1

    with provider.get_tracer("tests").start_as_current_span("request") as parent:
        assert export("u1") == "ok"
        assert asyncio.run(export_async("u2")) == "ok"
        assert list(export_rows("u3")) == [1]
        parent_ids = hex_ids(parent)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"Export Report", "Async Export", "Export Rows", "request"}
    events = {e["event"]: e["properties"] for e in delivery.events(3)}
    for name in ("Export Report", "Async Export", "Export Rows"):
        span = spans[name]
        assert (events[name]["trace_id"], events[name]["span_id"]) == hex_ids(span), name
        assert events[name]["trace_id"] == parent_ids[0]  # a child of the active span
        assert span.parent.span_id == spans["request"].context.span_id
        assert span.status.status_code == trace.StatusCode.UNSET
        assert span.attributes["code.function.name"] == events[name]["function"]
    # for functions and coroutines the span is the current one while the call runs
    assert [hex_ids(span) for span in seen] == [
        hex_ids(spans["Export Report"]),
        hex_ids(spans["Async Export"]),
    ]


def test_span_records_exceptions(
    log: logging.Logger, delivery: Delivery, otel: tuple[Any, Any], tracker: Tracker
) -> None:
    provider, exporter = otel

    @instrument("Pay", logger=log, distinct_id="user", span=True, tracer_provider=provider)
    def pay(user: str, amount: float) -> None:
        raise ValueError("declined")

    with pytest.raises(ValueError, match="declined"):
        pay("u-pay", 250.0)
    [span] = exporter.get_finished_spans()
    assert span.name == "Pay"
    assert span.status.status_code == trace.StatusCode.ERROR
    assert span.status.description == "ValueError: declined"
    [recorded] = [event for event in span.events if event.name == "exception"]
    assert recorded.attributes["exception.type"] == "ValueError"
    assert recorded.attributes["exception.message"] == "declined"
    props = delivery.one()
    assert (props["trace_id"], props["span_id"]) == hex_ids(span)
    assert props["exception_type"] == "ValueError"


def test_span_is_a_no_op_without_an_sdk(run_python: Any) -> None:
    """The OpenTelemetry API alone (the SDK cannot be imported): no span, no ids."""
    result = run_python(
        """
        import json, logging, sys
        sys.modules["opentelemetry.sdk"] = None  # the API only
        from opentelemetry import trace
        from mp_logbridge import Consumer, MixpanelHandler, instrument
        from mp_logbridge.testing import MixpanelServer

        with MixpanelServer() as server:
            consumer = Consumer(api_host=server.url)
            handler = MixpanelHandler("t", consumer=consumer)
            log = logging.getLogger("child")
            log.addHandler(handler)
            log.setLevel(logging.INFO)

            @instrument("Api Only", logger=log, distinct_id=lambda a: "u1", span=True)
            def work():
                return trace.get_current_span().get_span_context().is_valid

            valid = work()
            handler.close()
            consumer.close()
            print(json.dumps({
                "valid": valid,
                "events": server.events,
                "sdk": sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk.")),
            }))
        """,
        timeout=60,
    )
    assert result.returncode == 0, result
    out = json.loads(result.stdout)
    assert out["valid"] is False
    assert out["sdk"] == []
    [event] = out["events"]
    assert event["event"] == "Api Only"
    assert event["properties"]["success"] is True
    assert "trace_id" not in event["properties"] and "span_id" not in event["properties"]


# --------------------------------------------------------------------------- explicit tracker


def test_tracker_route_delivers_the_same_properties(
    log: logging.Logger, delivery: Delivery, tracker: Tracker, otel: tuple[Any, Any]
) -> None:
    def export(user: str, fmt: str = "csv", blob: Any = None) -> int:
        if fmt == "bad":
            raise ValueError("bad format")
        return 7

    options: dict[str, Any] = {
        "distinct_id": "user",
        "capture_args": ["fmt", "blob"],
        "capture_result": "rows",
        "properties": {"source": "api"},
    }
    via_log = instrument("Exported", logger=log, **options)(export)
    via_tracker = instrument("Exported", tracker=tracker, **options)(export)
    context_only = instrument("Context", tracker=tracker)(lambda: None)
    tracer = otel[0].get_tracer("tests")
    with tracer.start_as_current_span("request") as span, bound(plan="pro"):
        for decorated in (via_log, via_tracker):
            assert decorated("u-t", "pdf", blob=Blob()) == 7
            with pytest.raises(ValueError):
                decorated("u-t", "bad")
        with bound(distinct_id="u-ctx"):
            context_only()
        ids = hex_ids(span)
    before = dropped_invalid()
    context_only()  # the tracker route with no user anywhere: counted, not sent
    assert dropped_invalid() == before + 1
    records = delivery.events(5)  # 2 logged, 2 + 1 tracked
    tracked = [r["properties"] for r in records if r["properties"]["distinct_id"] != "u-ctx"]
    assert len(tracked) == 4
    ignored = {"time", "$insert_id", "duration_ms", "mp_lib", "$lib_version"}
    by_route: dict[bool, list[dict[str, Any]]] = {}
    for props in tracked:
        by_route.setdefault(props["success"], []).append(
            {k: v for k, v in props.items() if k not in ignored}
        )
    for outcomes in by_route.values():
        one_route, other_route = outcomes
        assert one_route == other_route
    ok = by_route[True][0]
    assert ok["distinct_id"] == "u-t"
    assert (ok["fmt"], ok["blob"], ok["rows"], ok["source"], ok["plan"]) == (
        "pdf",
        "<Blob 3 bytes>",
        7,
        "api",
        "pro",
    )
    assert (ok["trace_id"], ok["span_id"]) == ids
    assert ok["function"].endswith("<locals>.export")
    assert by_route[False][0]["exception_type"] == "ValueError"
    [ctx] = [r for r in records if r["properties"]["distinct_id"] == "u-ctx"]
    assert ctx["event"] == "Context" and ctx["properties"]["plan"] == "pro"


def test_tracker_consumer_failure_never_changes_the_call() -> None:
    def refuse(kind: str, message: Any) -> None:
        raise RuntimeError("sink down")

    tracker = Tracker(TOKEN, CallableSink(refuse))

    @instrument("Sink Down", tracker=tracker, distinct_id=lambda a: "u1")
    def work() -> str:
        return "done"

    before = dropped_invalid()
    assert work() == "done"
    assert dropped_invalid() == before + 1


# --------------------------------------------------------------------------- dotted paths

TARGETS_SOURCE = '''
"""Code the tests instrument by dotted path."""

CONSTANT = 3


def greet(name, punctuation="!"):
    return f"hello {name}{punctuation}"


class Greeter:
    def __init__(self, prefix="hi"):
        self.prefix = prefix

    def greet(self, name):
        return f"{self.prefix} {name}"

    @classmethod
    def create(cls, prefix="hey"):
        return cls(prefix)

    @staticmethod
    def shout(text):
        return text.upper()


class Child(Greeter):
    pass
'''


class Targets:
    """A fresh module of targets, its logger routed to the handler; every patch undone after."""

    def __init__(self, module: Any, delivery: Delivery) -> None:
        self.module = module
        self.name = module.__name__
        self.delivery = delivery
        self.logger = delivery.route(self.name)
        self.used: list[str] = []

    def target(self, path: str) -> str:
        target = f"{self.name}:{path}"
        self.used.append(target)
        return target


@pytest.fixture
def targets(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    delivery: Delivery,
    request: pytest.FixtureRequest,
) -> Iterator[Targets]:
    name = f"instrument_targets_{request.node.name}".replace("[", "_").replace("]", "_")
    (tmp_path / f"{name}.py").write_text(TARGETS_SOURCE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    helper = Targets(importlib.import_module(name), delivery)
    try:
        yield helper
    finally:
        for target in helper.used:
            uninstrument_function(target)
        sys.modules.pop(name, None)


def test_instrument_function_by_dotted_path(targets: Targets) -> None:
    mod = targets.module
    originals = (
        mod.greet,
        vars(mod.Greeter)["greet"],
        vars(mod.Greeter)["create"],
        vars(mod.Greeter)["shout"],
    )
    common = {"distinct_id": lambda a: "u-path"}
    instrument_function(targets.target("greet"), "Greeted", capture_args=["name"], **common)
    instrument_function(targets.target("Greeter.greet"), "Method Greeted", **common)
    instrument_function(
        targets.target("Greeter.create"), "Created", capture_args=["prefix"], **common
    )
    instrument_function(targets.target("Greeter.shout"), capture_args=["text"], **common)
    for _ in range(2):  # idempotent: no double wrapping
        instrument_function(targets.target("greet"), "Greeted", capture_args=["name"], **common)
        instrument_function(targets.target("Greeter.create"), "Created", **common)
    assert isinstance(vars(mod.Greeter)["create"], classmethod)
    assert isinstance(vars(mod.Greeter)["shout"], staticmethod)

    assert mod.greet("ada") == "hello ada!"
    greeter = mod.Greeter.create()
    assert greeter.greet("bob") == "hey bob"
    assert mod.Greeter.shout("hi") == "HI"
    assert greeter.shout(text="yo") == "YO"
    events = targets.delivery.events(5)
    assert [e["event"] for e in events] == [
        "Greeted",
        "Created",
        "Method Greeted",
        "Greeter.shout",
        "Greeter.shout",
    ]
    props = [e["properties"] for e in events]
    assert props[0]["name"] == "ada"
    assert props[1]["prefix"] == "hey"  # default applied
    assert props[2]["function"] == f"{targets.name}.Greeter.greet"
    assert props[3]["text"] == "hi" and props[4]["text"] == "yo"
    assert all(p["distinct_id"] == "u-path" for p in props)

    for path in ("greet", "Greeter.greet", "Greeter.create", "Greeter.shout"):
        assert uninstrument_function(f"{targets.name}:{path}") is True
        assert uninstrument_function(f"{targets.name}:{path}") is False
    assert mod.greet is originals[0]
    assert vars(mod.Greeter)["greet"] is originals[1]
    assert vars(mod.Greeter)["create"] is originals[2]
    assert vars(mod.Greeter)["shout"] is originals[3]
    assert mod.greet("eve") == "hello eve!"
    assert mod.Greeter.create().greet("x") == "hey x"
    assert len(targets.delivery.events(5)) == 5  # nothing more after undoing


def test_inherited_method_and_already_decorated(targets: Targets) -> None:
    mod = targets.module
    instrument_function(targets.target("Child.greet"), "Child Greeted", distinct_id=lambda a: "u")
    assert "greet" in vars(mod.Child)
    assert mod.Greeter("a").greet("b") == "a b"  # the base class is untouched
    assert mod.Child("c").greet("d") == "c d"
    assert uninstrument_function(f"{targets.name}:Child.greet") is True
    assert "greet" not in vars(mod.Child)  # uncovered again, not shadowed by a copy
    assert mod.Child.greet is mod.Greeter.greet

    mod.greet = instrument("Decorated", distinct_id=lambda a: "u")(mod.greet)
    instrument_function(targets.target("greet"), "Patched", distinct_id=lambda a: "u")
    assert mod.greet("z") == "hello z!"
    assert [e["event"] for e in targets.delivery.events(2)] == ["Child Greeted", "Decorated"]


def test_instrument_functions_from_data_and_files(targets: Targets, tmp_path: Path) -> None:
    mod = targets.module
    entries = [
        {"target": targets.target("greet"), "event": "Greeted", "capture_args": ["name"]},
        {"target": targets.target("Greeter.create"), "event": "Created", "level": "INFO"},
        {"target": targets.target("Greeter.shout"), "capture_args": {"text": "said"}},
    ]
    assert instrument_functions(entries) == [entry["target"] for entry in entries]
    with bound(distinct_id="u-data"):
        mod.greet("x")
        mod.Greeter.create()
        mod.Greeter.shout("y")
    got = {e["event"]: e["properties"] for e in targets.delivery.events(3)}
    assert got["Greeted"]["name"] == "x"
    assert got["Greeter.shout"]["said"] == "y"
    assert "Created" in got
    for entry in entries:
        assert uninstrument_function(entry["target"])

    json_file = tmp_path / "instrument.json"
    json_file.write_text(json.dumps({"instrument": entries[:1]}), encoding="utf-8")
    yaml_file = tmp_path / "instrument.yaml"
    yaml_file.write_text(
        f"- target: {targets.name}:Greeter.greet\n"
        "  event: YAML Greeted\n"
        "  capture_args: [name]\n"
        "  distinct_id: name\n",
        encoding="utf-8",
    )
    targets.used.append(f"{targets.name}:Greeter.greet")
    assert instrument_functions(json_file) == [entries[0]["target"]]
    assert instrument_functions(str(yaml_file)) == [f"{targets.name}:Greeter.greet"]
    with bound(distinct_id="u-file"):
        mod.greet("json")
    mod.Greeter().greet("yaml-user")
    events = targets.delivery.events(5)[3:]
    assert [(e["event"], e["properties"]["distinct_id"]) for e in events] == [
        ("Greeted", "u-file"),
        ("YAML Greeted", "yaml-user"),
    ]


def test_bad_targets_give_clear_errors(targets: Targets, tmp_path: Path) -> None:
    name = targets.name
    cases = [
        ("no_colon_here", "must look like 'package.module:function'"),
        (f"{name}:", "must look like"),
        ("no_such_module_for_instrument:f", "cannot import 'no_such_module_for_instrument'"),
        (f"{name}:missing", "'missing' not found"),
        (f"{name}:Greeter.missing", "'missing' not found"),
        (f"{name}:Nope.greet", "'Nope' not found"),
        (f"{name}:CONSTANT", "is a int, not a function or method"),
        (f"{name}:Greeter", "not a function or method"),
    ]
    for target, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            instrument_function(target)
    with pytest.raises(ConfigurationError, match="target must be a string"):
        instrument_function(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="has no parameter 'who'"):
        instrument_function(targets.target("greet"), distinct_id="who")
    assert uninstrument_function(f"{name}:greet") is False  # nothing was patched

    original = targets.module.greet
    bad_entries: list[tuple[Any, str]] = [
        ([{"target": targets.target("greet")}, {"event": "x"}], "needs a 'target'"),
        ([{"target": targets.target("greet")}, {"target": f"{name}:missing"}], "not found"),
        ([{"target": targets.target("greet"), "capture": ["name"]}], "unknown option.*capture"),
        ({"target": f"{name}:greet"}, "must be a list of mappings"),
    ]
    for entries, message in bad_entries:
        with pytest.raises(ConfigurationError, match=message):
            instrument_functions(entries)
        assert targets.module.greet is original  # all or nothing

    broken = tmp_path / "broken.json"
    broken.write_text("[{", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="not valid JSON"):
        instrument_functions(broken)
    broken_yaml = tmp_path / "broken.yml"
    broken_yaml.write_text("- target: [", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        instrument_functions(broken_yaml)
    with pytest.raises(ConfigurationError, match="cannot read instrumentation file"):
        instrument_functions(tmp_path / "absent.json")


@pytest.mark.allow_spec_violations("record.properties.distinct_id")
def test_the_tracker_route_resolves_the_user_as_the_handler_does(
    tracker: Tracker, server: MixpanelServer
) -> None:
    """A bound user is the event's user on the Tracker route too; an integer id is kept as an
    integer. (Placeholders such as ``0`` are refused already when bound.)"""

    @instrument("Numbered User", tracker=tracker)
    def work() -> None:
        return None

    with bound(distinct_id=42):
        work()
    with pytest.raises(InvalidMessageError, match="placeholder"), bound(distinct_id=0):
        pass
    tracker.flush()
    sent = [e for r in server.requests if r.path == "/track" for e in r.records]
    [event] = [e for e in sent if e["event"] == "Numbered User"]
    assert event["properties"]["distinct_id"] == 42

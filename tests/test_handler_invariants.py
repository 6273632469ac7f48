"""What users of a logging handler rely on: it never raises, never blocks, never feeds back, never
counts a record twice, and costs nothing for records it does not want.

Deliveries go to a loopback ``MixpanelServer`` (or to a port where nothing listens).
"""

from __future__ import annotations

import copy
import logging
import pickle
import sys
import threading
import time
from typing import Any

import pytest

from mp_logbridge import InvalidMessageError, MixpanelHandler, tag
from mp_logbridge.consumers import BackgroundConsumer
from mp_logbridge.stdlib import RESERVED_RECORD_ATTRIBUTES
from mp_logbridge.testing import MixpanelServer

TOKEN = "invariants-test-token"

#: ``LogRecord`` attributes on every supported Python, plus the two that formatters add.
STDLIB_RECORD_ATTRIBUTES = {
    "args",
    "created",
    "exc_info",
    "exc_text",
    "filename",
    "funcName",
    "levelname",
    "levelno",
    "lineno",
    "module",
    "msecs",
    "msg",
    "name",
    "pathname",
    "process",
    "processName",
    "relativeCreated",
    "stack_info",
    "thread",
    "threadName",
    "message",
    "asctime",
}


class CountingHandler(MixpanelHandler):
    """A MixpanelHandler that counts the records reaching ``emit``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.emitted: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.emitted.append(record)
        super().emit(record)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def handler_class() -> type[MixpanelHandler]:
    """``make_handler`` builds counting handlers here."""
    return CountingHandler


# --------------------------------------------------------------------------- extra= collisions


def test_reserved_record_attributes_are_the_stdlib_ones() -> None:
    expected = set(STDLIB_RECORD_ATTRIBUTES)
    if sys.version_info >= (3, 12):
        expected.add("taskName")  # filled from the asyncio task since 3.12
    assert expected == RESERVED_RECORD_ATTRIBUTES


def test_extra_keys_colliding_with_record_attributes_raise_at_the_call(
    make_handler, make_logger, monkeypatch
) -> None:
    """The stdlib raises ``KeyError`` in the caller (``raiseExceptions`` does not change that)."""
    monkeypatch.setattr(logging, "raiseExceptions", False)
    handler = make_handler()
    log = make_logger(handler, name="tests.invariants.collisions")
    for key in sorted(RESERVED_RECORD_ATTRIBUTES):
        with pytest.raises(KeyError, match=key):
            log.info("x", extra={key: "clash", **tag.track("Never", distinct_id="u1")})
    assert handler.emitted == []


def test_the_tag_name_avoids_record_attributes(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    assert "mixpanel" not in RESERVED_RECORD_ATTRIBUTES
    assert set(tag.track("E")) == {"mixpanel"}
    handler = make_handler()
    make_logger(handler, name="tests.invariants.tag_name").info(
        "ok", extra=tag.track("Ok", distinct_id="u")
    )
    assert handler.flush(10)
    assert [e["event"] for e in mixpanel_server.wait_for(1)] == ["Ok"]


# --------------------------------------------------------------------------- no feedback loops


@pytest.mark.parametrize("name", ["mp_logbridge", "mp_logbridge.internal"])
def test_records_of_the_library_loggers_are_rejected(
    name: str, mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler()
    library = logging.getLogger("mp_logbridge")
    saved_level = library.level
    try:
        make_logger(handler, name=name).warning("own", extra=tag.track("Own", distinct_id="u1"))
    finally:
        library.setLevel(saved_level)
        library.propagate = False
    app = make_logger(handler, name="mp_logbridge_app")  # a prefix of the name is not the library
    app.info("app", extra=tag.track("App", distinct_id="u1"))
    assert handler.flush(10)
    assert [e["event"] for e in mixpanel_server.wait_for(1)] == ["App"]
    assert [r.name for r in handler.emitted] == ["mp_logbridge_app"]


class _Unbuildable:
    """A message source the sender thread cannot build: it reports it through ``on_error``."""

    def build(self) -> dict[str, Any]:
        raise InvalidMessageError("message", "cannot be built")


def test_records_logged_from_an_on_error_callback_are_counted_not_sent(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler()
    log = make_logger(handler, name="tests.invariants.sender_thread")
    callback_done = threading.Event()
    callback_threads: list[str] = []

    def on_error(error: BaseException, messages: list[Any]) -> None:
        callback_threads.append(threading.current_thread().name)
        log.error("delivery failed", extra=tag.track("Feedback", distinct_id="u1"))
        callback_done.set()

    reporter = BackgroundConsumer(api_host=mixpanel_server.url, on_error=on_error)
    try:
        with handler.lock:  # a handler that took its lock here would hang the sender thread
            reporter.send("event", _Unbuildable())
            assert callback_done.wait(10), "the sender thread blocked on the handler"
    finally:
        reporter.close()
    assert len(callback_threads) == 1 and callback_threads[0].startswith("mp_logbridge-")
    assert handler.emitted == []
    assert handler.stats()["dropped"]["feedback_loop"] == 1  # no loop, and never silent
    assert handler.flush(10) is False
    log.info("app thread", extra=tag.track("App Thread", distinct_id="u1"))
    assert handler.flush(10)
    assert [e["event"] for e in mixpanel_server.wait_for(1)] == ["App Thread"]


# --------------------------------------------------------------------------- never twice


def test_a_record_reaching_two_handlers_of_one_project_is_sent_once(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    root_like = make_handler()
    child_handler = make_handler(batch_size=10)  # another consumer: dedup is not the consumer's
    make_logger(root_like, name="tests.invariants.once")
    child = make_logger(child_handler, name="tests.invariants.once.child", propagate=True)
    child.info("x", extra=tag.track("Once", distinct_id="u1") + tag.charge(3, distinct_id="u1"))
    child.info("y", extra=tag.track("Twice Logged", distinct_id="u1"))
    assert child_handler.flush(10) and root_like.flush(10)
    assert sorted(e["event"] for e in mixpanel_server.wait_for(2)) == ["Once", "Twice Logged"]
    assert len(mixpanel_server.wait_for(1, "profile_updates")) == 1
    assert len(child_handler.emitted) == 2 and len(root_like.emitted) == 2
    assert len(mixpanel_server.events) == 2  # both handlers flushed: nothing more will come


def test_a_record_reaching_handlers_of_two_projects_is_sent_to_each(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    parent = make_handler("project-a")
    child_handler = make_handler("project-b")
    make_logger(parent, name="tests.invariants.projects")
    child = make_logger(child_handler, name="tests.invariants.projects.child", propagate=True)
    child.info("x", extra=tag.track("Shared", distinct_id="u1"))
    assert child_handler.flush(10) and parent.flush(10)
    events = mixpanel_server.wait_for(2)
    assert sorted(e["properties"]["token"] for e in events) == ["project-a", "project-b"]


def test_handlers_of_one_project_reading_different_tags_each_send_theirs(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    default = make_handler()
    other = make_handler(tag="analytics")
    log = make_logger(default, other, name="tests.invariants.two_tags")
    log.info(
        "x",
        extra={
            **tag.track("From Default Tag", distinct_id="u1"),
            "analytics": {"event": "From Other Tag", "distinct_id": "u1"},
        },
    )
    assert default.flush(10) and other.flush(10)
    events = mixpanel_server.wait_for(2)
    assert sorted(e["event"] for e in events) == ["From Default Tag", "From Other Tag"]
    assert len({e["properties"]["$insert_id"] for e in events}) == 2


def test_copies_of_a_sent_record_are_not_sent_again(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    """Copies (QueueHandler.prepare) and pickles of a record a handler sent carry its mark:
    handlers of that project skip them; another project sends them, with its own ids."""
    handler = make_handler()
    other_project = make_handler(token="another-project-token")
    log = make_logger(handler, name="tests.invariants.insert_ids")
    record = log.makeRecord(
        log.name,
        logging.INFO,
        __file__,
        10,
        "x",
        (),
        None,
        extra=tag.track("First", distinct_id="u1") + tag.track("Second", distinct_id="u1"),
    )
    handler.handle(record)
    shallow = copy.copy(record)
    pickled = pickle.loads(pickle.dumps(record))
    for each in (shallow, pickled):
        handler.handle(each)
    other_project.handle(pickled)
    later = log.makeRecord(
        log.name,
        logging.INFO,
        __file__,
        11,
        "x",
        (),
        None,
        extra=tag.track("First", distinct_id="u1"),
    )
    handler.handle(later)
    assert handler.flush(10) and other_project.flush(10)
    events = mixpanel_server.wait_for(5)
    by_token: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_token.setdefault(event["properties"]["token"], []).append(event)
    ours, theirs = by_token[TOKEN], by_token["another-project-token"]
    assert sorted(e["event"] for e in ours) == ["First", "First", "Second"]
    assert sorted(e["event"] for e in theirs) == ["First", "Second"]
    ids = [e["properties"]["$insert_id"] for e in events]
    assert len(set(ids)) == 5  # every message of every record and project has its own id
    assert all(len(i) <= 36 for i in ids)
    mark = pickled.__dict__["_mp_logbridge_sent"]
    assert len(mark) == 2 and TOKEN not in repr(mark)  # two senders, and no token in clear


def test_consecutive_records_from_one_line_get_distinct_insert_ids(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler()
    log = make_logger(handler, name="tests.invariants.loop")
    for index in range(300):
        log.info("purchase %d", index, extra=tag.track("Purchase", distinct_id="u1", n=index))
    assert handler.flush(10)
    events = mixpanel_server.wait_for(300)
    assert len({e["properties"]["$insert_id"] for e in events}) == 300


def test_records_sharing_time_and_line_get_distinct_insert_ids(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    """On a coarse (or frozen) clock, records of one line can share ``created``, even their
    content: they are still separate occurrences, which Mixpanel must not merge."""
    handler = make_handler()
    log = make_logger(handler, name="tests.invariants.coarse_clock")
    frozen = float(int(time.time()))

    def record(message: str, *args: Any, **properties: Any) -> logging.LogRecord:
        made = log.makeRecord(
            log.name, logging.INFO, __file__, 20, message, args, None, extra=tag.track(**properties)
        )
        made.created = frozen  # one clock tick, recent (/track takes the last 5 days only)
        return made

    for made in (
        record("Bought", distinct_id="u1", sku="a"),
        record("Bought", distinct_id="u1", sku="b"),
        record("step %d", 1, distinct_id="u1"),
        record("step %d", 2, distinct_id="u1"),
        record("Bought", distinct_id="u1", sku="a"),  # a second, identical purchase
    ):
        handler.handle(made)
    assert handler.flush(10)
    ids = [e["properties"]["$insert_id"] for e in mixpanel_server.wait_for(5)]
    assert len(set(ids)) == 5


# --------------------------------------------------------------------------- cheap rejection


def test_untagged_records_never_reach_emit(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler()
    log = make_logger(handler, name="tests.invariants.untagged")
    log.debug("debug")
    log.info("info %s", "args", extra={"request_id": "r-1"})
    log.warning("tag off", extra={"mixpanel": None})
    log.error("tag off", extra={"mixpanel": False})
    log.info("another handler's tag", extra={"analytics": {"event": "E", "distinct_id": "u1"}})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("untagged exception")
    assert handler.emitted == []
    log.info("tagged", extra=tag.track("Tagged", distinct_id="u1"))
    assert len(handler.emitted) == 1
    assert handler.flush(10)
    assert [e["event"] for e in mixpanel_server.wait_for(1)] == ["Tagged"]


# --------------------------------------------------------------------------- never raises


class _BrokenConsumer:
    """A consumer whose ``send`` fails for events and records everything else."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send(self, kind: str, message: Any) -> bool:
        if kind == "event":
            raise RuntimeError("the consumer is broken")
        self.sent.append((kind, message.build()))
        return True

    def flush(self, timeout: float | None = None) -> bool:
        raise RuntimeError("flush is broken too")

    def close(self, timeout: float | None = None) -> None:
        raise AssertionError("a handler does not close a consumer it was given")


def test_a_broken_consumer_never_raises_into_the_application(
    make_logger, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _BrokenConsumer()
    handler = MixpanelHandler(TOKEN, consumer=broken)
    log = make_logger(handler, name="tests.invariants.broken")
    log.info(
        "x", extra=tag.track("E", distinct_id="u1") + tag.people.set({"a": 1}, distinct_id="u1")
    )
    log.info("bad %d format", "not a number", extra={"mixpanel": True})  # getMessage() fails
    assert handler.flush() is False
    handler.close()
    assert [kind for kind, _ in broken.sent] == ["profile_update"]  # the rest of the record
    # The message the consumer failed on is counted (and reported on the library's logger);
    # the record whose message cannot be formatted is counted too, and goes to
    # Handler.handleError.
    assert handler.stats()["dropped"]["consumer_error"] == 1
    assert handler.stats()["dropped"]["invalid"] == 1
    errors = capsys.readouterr().err
    assert errors.count("--- Logging error ---") == 1
    assert "bad %d format" in errors


def test_with_raise_exceptions_off_a_broken_consumer_is_still_counted(
    make_logger, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setattr(logging, "raiseExceptions", False)
    handler = MixpanelHandler(TOKEN, consumer=_BrokenConsumer())
    log = make_logger(handler, name="tests.invariants.silent")
    log.info("x", extra=tag.track("E", distinct_id="u1"))
    handler.close()
    assert "Logging error" not in capsys.readouterr().err
    assert handler.stats()["dropped"]["consumer_error"] == 1  # lost, but never silently


@pytest.mark.timeout(60)
def test_log_calls_do_not_wait_for_a_server_that_is_down(down_url: str, make_logger) -> None:
    """A hang guard: with nothing listening, 1000 tagged calls complete and all are accounted."""
    handler = CountingHandler(
        TOKEN, api_host=down_url, flush_interval=0.01, flush_timeout=0.5, exit_timeout=0.5
    )
    log = make_logger(handler, name="tests.invariants.down")
    try:
        for index in range(1000):
            log.info("x", extra=tag.track("Down", distinct_id="u1", n=index))
        assert len(handler.emitted) == 1000
    finally:
        handler.close()
    stats = handler.stats()
    assert stats["sent"] == 0
    assert stats["dropped_total"] == 1000  # nothing lost silently
    assert stats["queue_depth"] == 0


def test_a_delivery_error_from_a_sink_without_counters_is_counted(
    make_handler, make_logger
) -> None:
    from mp_logbridge.errors import RejectedError

    def refuse(kind: str, message: Any) -> None:
        raise RejectedError("the sink refused it")

    handler = make_handler(consumer=refuse)
    make_logger(handler).info("x", extra=tag.track("Refused", distinct_id="u1"))
    assert handler.stats()["dropped"]["rejected_by_server"] == 1

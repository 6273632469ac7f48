"""Configuring ``MixpanelHandler``: dictConfig, environment fallbacks, sharing, lifecycle, and the
stdlib's other ways to reach a handler (``basicConfig``, ``LoggerAdapter``, ``QueueHandler`` and
``QueueListener``, the 3.12+ ``queue_handler`` dictConfig, a multiprocessing queue).

Everything is delivered for real to a loopback ``MixpanelServer``.
"""

from __future__ import annotations

import json
import logging
import logging.config
import logging.handlers
import multiprocessing
import queue
import sys
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import RecordCollector, wait_until

from mp_logbridge import ConfigurationError, MixpanelHandler, tag
from mp_logbridge.testing import MixpanelServer

TOKEN = "config-test-token"
#: Reached from a dictConfig through ``ext://`` (see test_dict_config_resolves_cfg_and_ext_values).
DEFAULT_USER = "user-from-ext"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def configure(request: pytest.FixtureRequest) -> Iterator[Callable[[dict[str, Any]], str]]:
    """Apply a dictConfig whose loggers live under a name private to the test.

    Returns that logger name. Leaves other loggers alone (``disable_existing_loggers`` off) and
    closes the handlers it configured after the test.
    """
    name = f"tests.config.dict.{request.node.name}"
    configured: list[str] = []

    def apply(config: dict[str, Any]) -> str:
        full = {"version": 1, "disable_existing_loggers": False, **config}
        full.setdefault("loggers", {name: {"handlers": list(config.get("handlers", {}))}})
        for logger_config in full["loggers"].values():
            logger_config.setdefault("level", "DEBUG")
            logger_config.setdefault("propagate", False)
        logging.config.dictConfig(full)
        configured.extend(full["loggers"])
        return name

    yield apply
    for logger_name in configured:
        logger = logging.getLogger(logger_name)
        for handler in logger.handlers[:]:
            logger.removeHandler(handler)
            listener = getattr(handler, "listener", None)
            if listener is not None:  # a 3.12+ dictConfig queue_handler: started by the test
                listener.stop()
                for inner in listener.handlers:
                    inner.close()
            handler.close()


def _handler_config(server: MixpanelServer, **options: Any) -> dict[str, Any]:
    return {
        "class": "mp_logbridge.MixpanelHandler",
        "token": TOKEN,
        "api_host": server.url,
        "flush_interval": 0.05,
        **options,
    }


# --------------------------------------------------------------------------- dictConfig


def test_dict_config_with_class(mixpanel_server: MixpanelServer, configure) -> None:
    name = configure(
        {
            "handlers": {
                "mixpanel": _handler_config(
                    mixpanel_server,
                    level="INFO",
                    super_properties={"service": "billing", "env": "test"},
                    record_properties=["name", "levelname"],
                    extra_properties=["request_id"],
                )
            }
        }
    )
    log = logging.getLogger(name)
    (handler,) = log.handlers
    assert isinstance(handler, MixpanelHandler)
    assert handler.level == logging.INFO
    log.debug("below the handler level", extra=tag.track("Debug", distinct_id="u1"))
    log.info("configured", extra={**tag.track("Configured", distinct_id="u1"), "request_id": "r-9"})
    assert handler.flush(10)
    (event,) = mixpanel_server.wait_for(1)
    props = event["properties"]
    assert event["event"] == "Configured"
    assert (props["service"], props["env"]) == ("billing", "test")
    assert (props["name"], props["levelname"]) == (name, "INFO")
    assert props["request_id"] == "r-9"


def test_dict_config_from_json_text_with_factory(
    mixpanel_server: MixpanelServer, configure
) -> None:
    text = json.dumps(
        {
            "handlers": {
                "mixpanel": {
                    "()": "mp_logbridge.MixpanelHandler",
                    "token": TOKEN,
                    "api_host": mixpanel_server.url,
                    "flush_interval": 0.05,
                    "record_properties": {"levelname": "severity", "funcName": "function"},
                    "extra_properties": ["order_id"],
                    "retry": {"max_attempts": 3},
                    "level": "INFO",
                }
            }
        }
    )
    name = configure(json.loads(text))  # lists and dicts, never tuples
    log = logging.getLogger(name)
    (handler,) = log.handlers
    log.info("paid", extra={**tag.track("Paid", distinct_id="u1"), "order_id": 17})
    assert handler.flush(10)
    (event,) = mixpanel_server.wait_for(1)
    props = event["properties"]
    assert props["severity"] == "INFO"
    assert props["function"] == "test_dict_config_from_json_text_with_factory"
    assert props["order_id"] == 17
    assert "levelname" not in props and "name" not in props


def test_dict_config_with_a_factory_callable_and_yaml(
    mixpanel_server: MixpanelServer, configure
) -> None:
    yaml = pytest.importorskip("yaml")
    text = f"""
    handlers:
      mixpanel:
        token: {TOKEN}
        api_host: {mixpanel_server.url}
        flush_interval: 0.05
        extra_properties: [plan, seats]
    """
    config = yaml.safe_load(text)
    config["handlers"]["mixpanel"]["()"] = MixpanelHandler
    name = configure(config)
    log = logging.getLogger(name)
    (handler,) = log.handlers
    log.info("x", extra={**tag.track("Yaml", distinct_id="u1"), "plan": "pro", "seats": 3})
    assert handler.flush(10)
    (event,) = mixpanel_server.wait_for(1)
    assert (event["properties"]["plan"], event["properties"]["seats"]) == ("pro", 3)


def test_dict_config_resolves_cfg_and_ext_values(
    mixpanel_server: MixpanelServer, configure
) -> None:
    name = configure(
        {
            "app": {"analytics": {"service": "billing", "region": "cfg-test"}},
            "handlers": {
                "mixpanel": _handler_config(
                    mixpanel_server,
                    super_properties="cfg://app.analytics",
                    default_distinct_id=f"ext://{__name__}.DEFAULT_USER",
                )
            },
        }
    )
    log = logging.getLogger(name)
    (handler,) = log.handlers
    log.info("anonymous", extra={"mixpanel": True})
    assert handler.flush(10)
    (event,) = mixpanel_server.wait_for(1)
    assert event["event"] == "anonymous"
    assert event["properties"]["distinct_id"] == DEFAULT_USER
    assert event["properties"]["service"] == "billing"
    assert event["properties"]["region"] == "cfg-test"


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        pytest.param({"region": "mars"}, "mars", id="unknown region"),
        pytest.param({"batch_sise": 10}, "batch_sise", id="unknown option"),
        pytest.param({"tag": "name"}, "tag", id="tag is a LogRecord attribute"),
        pytest.param({"tag": "message"}, "tag", id="tag is a formatter attribute"),
        pytest.param({"tag": "mix-panel"}, "tag", id="tag is not an identifier"),
        pytest.param({"batch_size": 0}, "batch_size", id="bad delivery value"),
        pytest.param({"record_properties": ["request_id"]}, "request_id", id="record attribute"),
        pytest.param({"extra_properties": ["levelname"]}, "levelname", id="extra attribute"),
        pytest.param({"super_properties": ["service"]}, "super_properties", id="super list"),
    ],
)
@pytest.mark.parametrize("token", [TOKEN, None], ids=["with token", "without token"])
def test_bad_options_fail_at_construction(
    options: dict[str, Any], problem: str, token: str | None, configure
) -> None:
    """Whether or not a token is set: a configuration that is wrong is wrong everywhere."""
    with pytest.raises(ConfigurationError, match=problem):
        MixpanelHandler(token, api_host="http://127.0.0.1:9", **options)
    config = {"class": "mp_logbridge.MixpanelHandler", "api_host": "http://127.0.0.1:9", **options}
    if token is not None:
        config["token"] = token
    with pytest.raises(ValueError, match="mixpanel"):
        configure({"handlers": {"mixpanel": config}})


def test_construction_starts_no_thread_and_does_no_io(
    mixpanel_server: MixpanelServer, make_handler, make_logger, configure
) -> None:
    before = set(threading.enumerate())
    # dictConfig first: it closes every existing handler, as the stdlib does.
    name = configure({"handlers": {"mixpanel": _handler_config(mixpanel_server, batch_size=7)}})
    handler = make_handler()
    assert set(threading.enumerate()) == before
    assert mixpanel_server.requests == []
    log = make_logger(handler)
    log.info("first", extra=tag.track("First", distinct_id="u1"))  # the sender starts now
    logging.getLogger(name).info("second", extra=tag.track("Second", distinct_id="u1"))
    assert len(set(threading.enumerate()) - before) == 2  # one sender per distinct consumer
    mixpanel_server.wait_for(2)


# --------------------------------------------------------------------------- environment


def test_token_from_the_environment(
    mixpanel_server: MixpanelServer, make_handler, make_logger, monkeypatch
) -> None:
    monkeypatch.setenv("MIXPANEL_TOKEN", "token-from-env")
    handler = make_handler(None)
    assert handler.enabled
    make_logger(handler).info("x", extra=tag.track("Env", distinct_id="u1"))
    assert handler.flush(10)
    (event,) = mixpanel_server.wait_for(1)
    assert event["properties"]["token"] == "token-from-env"


@pytest.mark.parametrize(
    ("region", "host"), [("eu", "api-eu.mixpanel.com"), ("IN", "api-in.mixpanel.com")]
)
def test_region_from_the_environment(region: str, host: str, monkeypatch) -> None:
    monkeypatch.delenv("MIXPANEL_API_HOST")
    monkeypatch.setenv("MIXPANEL_REGION", region)
    handler = MixpanelHandler(TOKEN)
    explicit = MixpanelHandler(TOKEN, region="us")
    try:
        endpoints = handler.consumer.endpoints
        assert endpoints.event == f"https://{host}/track"
        assert endpoints.profile_update == f"https://{host}/engage"
        assert endpoints.group_update == f"https://{host}/groups"
        assert explicit.consumer.endpoints.event == "https://api.mixpanel.com/track"
    finally:  # nothing was logged: no thread, no request
        handler.close()
        explicit.close()


def test_no_token_disables_the_handler_with_one_warning(
    make_handler, make_logger, library_warnings: RecordCollector
) -> None:
    handler = make_handler(None)
    assert not handler.enabled
    warnings = library_warnings.messages()
    assert len(warnings) == 1 and "MIXPANEL_TOKEN" in warnings[0], warnings
    log = make_logger(handler)
    for index in range(3):
        log.info("skipped %d", index, extra=tag.track("Skipped", distinct_id="u1"))
    log.info("untagged records are not even looked at")
    assert handler.stats()["skipped"] == 3
    assert handler.stats()["enabled"] is False
    assert handler.flush() is True
    handler.close()
    assert len(library_warnings.records) == 1  # not once per record


def test_blank_token_disables_the_handler(make_handler) -> None:
    assert not make_handler("  ").enabled


# --------------------------------------------------------------------------- sharing


def test_identical_delivery_settings_share_one_consumer(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    first = make_handler()
    same = make_handler("another-project", retry={"max_attempts": 3})
    same_again = make_handler(retry={"max_attempts": 3})
    other_batching = make_handler(batch_size=7)
    with MixpanelServer() as elsewhere:
        other_host = make_handler(api_host=elsewhere.url)
        assert other_host.consumer is not first.consumer
    assert make_handler(retry={"max_attempts": 3}).consumer is same.consumer
    assert same.consumer is same_again.consumer
    assert first.consumer is not same.consumer  # the retry policy differs
    assert other_batching.consumer is not first.consumer
    assert make_handler().consumer is first.consumer

    first.close()  # the other user of the consumer keeps working
    twin = make_handler()
    assert twin.consumer is first.consumer
    make_logger(twin).info("after", extra=tag.track("After Close", distinct_id="u1"))
    assert twin.flush(10)
    assert [e["event"] for e in mixpanel_server.wait_for(1)] == ["After Close"]


def test_a_consumer_is_closed_with_its_last_handler(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    one, two = make_handler(flush_interval=30.0), make_handler(flush_interval=30.0)
    make_logger(one).info("x", extra=tag.track("Queued", distinct_id="u1"))
    consumer = one.consumer
    one.close()  # not the last user: nothing is closed, nothing needs to be sent yet
    make_logger(two).info("x", extra=tag.track("Also Queued", distinct_id="u1"))
    two.close()  # the last one: delivers what is queued, then closes the consumer
    assert sorted(e["event"] for e in mixpanel_server.events) == ["Also Queued", "Queued"]
    assert consumer.stats()["queue_depth"] == 0
    assert make_handler().consumer is not consumer


# --------------------------------------------------------------------------- lifecycle


def test_flush_and_close_are_idempotent(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler(flush_interval=30.0)
    log = make_logger(handler)
    log.info("x", extra=tag.track("Once", distinct_id="u1"))
    assert handler.flush(10) is True
    assert handler.flush(10) is True
    handler.close()
    handler.close()
    logging.shutdown([weakref.ref(handler)])  # as at interpreter exit, after an explicit close
    assert handler.flush() is True
    assert [e["event"] for e in mixpanel_server.events] == ["Once"]
    assert handler.stats()["dropped_total"] == 0


def test_close_delivers_what_is_queued(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler(flush_interval=30.0)
    log = make_logger(handler)
    for index in range(25):
        log.info("x", extra=tag.track("Queued", distinct_id="u1", index=index))
    logging.shutdown([weakref.ref(handler)])
    assert sorted(e["properties"]["index"] for e in mixpanel_server.events) == list(range(25))


def test_reconfiguring_while_messages_are_in_flight_loses_nothing(
    mixpanel_server: MixpanelServer, configure
) -> None:
    config = {"handlers": {"mixpanel": _handler_config(mixpanel_server, batch_size=10)}}
    name = configure(config)
    log = logging.getLogger(name)
    (old,) = log.handlers
    mixpanel_server.delay_next(1, 1.5, endpoint="/track")
    for index in range(10):
        log.info("x", extra=tag.track("Before", distinct_id="u1", index=index))
    wait_until(lambda: old.stats()["in_flight"] == 10)  # the delayed request is under way
    for index in range(10):
        log.info("x", extra=tag.track("Queued", distinct_id="u1", index=index))

    configure(config)  # closes the old handler under logging's lock: it must not wait
    assert mixpanel_server.events == []  # dictConfig returned before the delayed answer
    (new,) = log.handlers
    assert new is not old and new.consumer is not old.consumer
    for index in range(10):
        log.info("x", extra=tag.track("After", distinct_id="u1", index=index))

    events = mixpanel_server.wait_for(30, timeout=20)
    assert Counter(e["event"] for e in events) == {"Before": 10, "Queued": 10, "After": 10}
    assert new.flush(10)
    wait_until(lambda: old.consumer.stats()["queue_depth"] == 0)
    assert old.consumer.stats()["dropped_total"] == 0


# --------------------------------------------------------------------------- other front doors


def test_basic_config_with_the_handler(mixpanel_server: MixpanelServer) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    handler = MixpanelHandler(TOKEN, api_host=mixpanel_server.url, flush_interval=0.05)
    try:
        logging.basicConfig(handlers=[handler], level=logging.INFO, force=True)
        assert root.handlers == [handler]
        logging.getLogger("tests.config.basic").info(
            "basic %s", "config", extra=tag.track(distinct_id="u1")
        )
        logging.getLogger("tests.config.basic").info("untagged")
        assert handler.flush(10)
    finally:
        root.removeHandler(handler)
        handler.close()
        for saved in saved_handlers:
            root.addHandler(saved)
        root.setLevel(saved_level)
    assert [e["event"] for e in mixpanel_server.events] == ["basic config"]


def test_logger_adapter(mixpanel_server: MixpanelServer, make_handler, make_logger) -> None:
    """An adapter's ``extra`` replaces the call's ``extra`` (merged with merge_extra on 3.13+)."""
    handler = make_handler(extra_properties=["request_id"])
    log = make_logger(handler)
    plain = logging.LoggerAdapter(log, {"request_id": "r-1"})
    plain.info("lost", extra=tag.track("Per Call", distinct_id="u1"))  # replaced by the adapter's
    tagged = logging.LoggerAdapter(log, tag.track("From Adapter", distinct_id="u1"))
    tagged.info("adapter %s", "extra")
    expected = ["From Adapter"]
    if sys.version_info >= (3, 13):
        merging = logging.LoggerAdapter(log, {"request_id": "r-2"}, merge_extra=True)
        merging.info("merged", extra=tag.track("Merged", distinct_id="u1"))
        expected.append("Merged")
    log.info("marker", extra=tag.track("Marker", distinct_id="u1"))
    assert handler.flush(10)
    events = mixpanel_server.wait_for(len(expected) + 1)
    assert [e["event"] for e in events] == [*expected, "Marker"]
    if sys.version_info >= (3, 13):
        assert events[1]["properties"]["request_id"] == "r-2"


def test_queue_handler_and_listener(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler()
    records: queue.Queue[logging.LogRecord] = queue.Queue()
    listener = logging.handlers.QueueListener(records, handler)
    log = make_logger(logging.handlers.QueueHandler(records))
    listener.start()
    try:
        log.info(
            "queued %s",
            "event",
            extra=tag.track(distinct_id="u1", n=1) + tag.people.set({"a": 1}, distinct_id="u1"),
        )
        log.info("untagged")
    finally:
        listener.stop()
    assert handler.flush(10)
    (event,) = mixpanel_server.wait_for(1)
    (update,) = mixpanel_server.wait_for(1, "profile_updates")
    assert event["event"] == "queued event"  # prepare() formatted the message; the tag survived
    assert event["properties"]["n"] == 1
    assert update["$set"] == {"a": 1}


@pytest.mark.skipif(sys.version_info < (3, 12), reason="dictConfig queue_handler is 3.12+")
def test_dict_config_queue_handler(mixpanel_server: MixpanelServer, configure) -> None:
    configure(
        {
            "handlers": {
                "mixpanel": _handler_config(mixpanel_server),
                "queued": {"class": "logging.handlers.QueueHandler", "handlers": ["mixpanel"]},
            },
            "loggers": {"tests.config.dict.queued": {"handlers": ["queued"]}},
        }
    )
    name = "tests.config.dict.queued"
    queued = logging.getHandlerByName("queued")
    mixpanel = logging.getHandlerByName("mixpanel")
    assert isinstance(mixpanel, MixpanelHandler)
    assert queued.listener.handlers == (mixpanel,)
    queued.listener.start()  # dictConfig does not start it (the stdlib docs say to)
    log = logging.getLogger(name)
    log.info("through %s", "the queue", extra=tag.track(distinct_id="u1"))
    assert [e["event"] for e in mixpanel_server.wait_for(1)] == ["through the queue"]


def _log_from_child(records: Any, count: int) -> None:
    """Runs in a child process: tagged records go to a multiprocessing queue."""
    log = logging.getLogger("tests.config.child")
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(logging.handlers.QueueHandler(records))
    for index in range(count):
        log.info("child %d", index, extra=tag.track(distinct_id=f"u{index}", index=index))
        log.info("untagged %d", index)


@pytest.mark.subprocess
def test_records_from_a_child_process_through_a_multiprocessing_queue(
    mixpanel_server: MixpanelServer, make_handler
) -> None:
    handler = make_handler()
    context = multiprocessing.get_context("spawn")
    records = context.Queue()
    listener = logging.handlers.QueueListener(records, handler)
    listener.start()
    try:
        child = context.Process(target=_log_from_child, args=(records, 5))
        child.start()
        child.join(60)
        assert child.exitcode == 0
    finally:
        listener.stop()
        records.close()
    assert handler.flush(10)
    events = mixpanel_server.wait_for(5)
    assert sorted(e["event"] for e in events) == [f"child {i}" for i in range(5)]
    assert {e["properties"]["distinct_id"] for e in events} == {f"u{i}" for i in range(5)}
    assert len({e["properties"]["$insert_id"] for e in events}) == 5


# --------------------------------------------------------------------------- delivery options


def test_retry_as_a_policy_object_and_on_error_are_delivery_options(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    from mp_logbridge.consumers import RetryPolicy

    failures: list[BaseException] = []
    policy = RetryPolicy(max_attempts=1)
    handler = make_handler(retry=policy, on_error=lambda exc, messages: failures.append(exc))
    assert handler.consumer.retry is policy
    same = make_handler(retry=RetryPolicy(max_attempts=1), on_error=handler.consumer.on_error)
    assert same.consumer is handler.consumer  # equal policies and the same callback: shared
    log = make_logger(handler)
    mixpanel_server.fail_next(1, 500, endpoint="/track")
    log.info("x", extra=tag.track("Failed Once", distinct_id="u1"))
    assert handler.flush(10) is False  # one attempt only: dropped and reported
    assert [type(exc).__name__ for exc in failures] == ["MixpanelServerError"]
    assert handler.stats()["dropped"]["retries_exhausted"] == 1


def test_consumer_and_delivery_options_together_are_an_error(
    mixpanel_server: MixpanelServer,
) -> None:
    from mp_logbridge import Consumer

    with pytest.raises(ConfigurationError, match="batch_size, region"):
        MixpanelHandler(
            "t", consumer=Consumer(api_host=mixpanel_server.url), region="eu", batch_size=10
        )


def test_a_share_given_back_late_does_not_close_its_successor(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    """A handler whose shared consumer was closed under it, and that is closed after a new
    handler with the same settings got a fresh consumer, leaves the new consumer alone."""
    first = make_handler()
    first.consumer.close()
    second = make_handler()
    assert second.consumer is not first.consumer
    first.close()
    assert not second.consumer.closed
    make_logger(second).info("x", extra=tag.track("Still Delivered", distinct_id="u1"))
    assert second.flush(10)
    assert [e["event"] for e in mixpanel_server.wait_for(1)] == ["Still Delivered"]

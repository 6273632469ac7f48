"""Correct on the wire and at first contact: credentials, ``$merge``, datetimes, tokens,
configuration errors, handler filters — checked against what the official package and the Ruby
SDK do, with the official client as a caller where it applies."""

from __future__ import annotations

import datetime
import json
import logging
import time
import warnings
from typing import Any

import mixpanel
import pytest

from mp_logbridge import (
    BackgroundConsumer,
    BufferedConsumer,
    ConfigurationError,
    Consumer,
    MixpanelHandler,
    ServiceAccount,
    Tracker,
    tag,
)
from mp_logbridge.testing import MixpanelServer

TOKEN = "first-contact-token"
ACCOUNT = ServiceAccount("sa-user", "sa-secret", 12345)


@pytest.fixture
def server() -> Any:
    with MixpanelServer(service_account=ACCOUNT, api_secret="project-secret") as running:
        yield running


def _old_event(key: str) -> dict[str, Any]:
    return {
        "event": "Old",
        "properties": {
            "token": TOKEN,
            "distinct_id": "u1",
            "time": int(time.time()) - 10 * 86400,
            "$insert_id": key,
        },
    }


# --------------------------------------------------------------------------- credentials


@pytest.mark.parametrize("make", [BackgroundConsumer, Consumer, BufferedConsumer])
def test_the_consumers_service_account_wins_over_a_per_call_secret(server, make) -> None:
    consumer = make(api_host=server.url, credentials=ACCOUNT)
    client = mixpanel.Mixpanel(TOKEN, consumer=consumer)
    with warnings.catch_warnings():  # the official package warns about api_key/api_secret
        warnings.simplefilter("ignore", DeprecationWarning)
        client.import_data("legacy-key", "u1", "Old", int(time.time()) - 86400, api_secret="other")
    consumer.flush()
    consumer.close()
    [request] = [r for r in server.requests if r.path == "/import"]
    assert request.header("Authorization") == ACCOUNT.authorization()
    assert request.query["project_id"] == "12345"
    assert [record["event"] for record in server.imports] == ["Old"]


def test_the_legacy_api_key_is_ignored_with_one_warning(server, library_warnings) -> None:
    with Consumer(api_host=server.url) as consumer:
        for n in range(3):
            consumer.send("imports", json.dumps(_old_event(f"k{n}")), ("key", "project-secret"))
    warned = [m for m in library_warnings.messages() if "api_key" in m]
    assert len(warned) <= 1  # once per process (it may have been said by an earlier test)
    assert len(server.imports) == 3


# --------------------------------------------------------------------------- $merge


def test_merge_goes_alone_in_the_shape_the_server_accepts(server) -> None:
    consumer = BackgroundConsumer(
        api_host=server.url, api_secret="project-secret", flush_interval=60
    )
    tracker = Tracker(TOKEN, consumer)
    for n in range(3):
        assert tracker.import_event("u1", "Old", _old_event(f"m{n}")["properties"])
    assert tracker.merge("anon-1", "u1")
    assert (
        mixpanel.Mixpanel(TOKEN, consumer=consumer).merge(
            None, "anon-2", "u2", api_secret="project-secret"
        )
        is None
    )
    assert consumer.flush(10)
    consumer.close()
    requests = [r for r in server.requests if r.path == "/import"]
    strict = [r for r in requests if r.query.get("strict") == "1"]
    merges = [r for r in requests if r.query.get("strict") == "0"]
    assert [len(r.records) for r in strict] == [3]  # no merge among strict imports
    assert all(record["event"] == "$merge" for r in merges for record in r.records)
    assert sum(len(r.records) for r in merges) == 2
    assert server.invalid == []
    assert consumer.stats()["dropped_total"] == 0


# --------------------------------------------------------------------------- datetimes


def test_naive_datetimes_are_local_time_sent_as_utc(server, run_python) -> None:
    """Under TZ=Asia/Kolkata (UTC+5:30) a naive local time is sent as UTC text, as the Ruby SDK
    sends it; an aware value is converted the same way, and an event ``time`` means the same
    instant."""
    instant = int(time.time()) - 3600
    result = run_python(
        f"""
        import datetime as dt, time
        from mp_logbridge import Consumer, Tracker
        assert time.strftime("%z") == "+0530"
        tracker = Tracker({TOKEN!r}, Consumer(api_host={server.url!r}))
        naive = dt.datetime.fromtimestamp({instant})  # local wall-clock time, no zone
        aware = naive.astimezone()  # the same instant, with +05:30
        tracker.people.set("u", {{"Sign-Up Date": naive, "Aware": aware}})
        tracker.track("u", "Dated", {{"when": naive, "time": naive}})
        """,
        env={"TZ": "Asia/Kolkata"},
        timeout=30,
    )
    assert result.returncode == 0, result
    utc = datetime.datetime.fromtimestamp(instant, datetime.timezone.utc)
    text = utc.strftime("%Y-%m-%dT%H:%M:%S")
    [update] = server.profile_updates
    assert update["$set"] == {"Sign-Up Date": text, "Aware": text}
    [event] = server.events
    assert event["properties"]["when"] == text
    assert event["properties"]["time"] == instant * 1000


# --------------------------------------------------------------------------- tokens and configuration


def test_a_token_with_whitespace_is_stripped_with_a_warning(server, library_warnings) -> None:
    tracker = Tracker(f"  {TOKEN}\n", Consumer(api_host=server.url))
    tracker.track("u", "Clean")
    assert server.events[0]["properties"]["token"] == TOKEN
    assert any("whitespace" in m for m in library_warnings.messages())


@pytest.mark.parametrize(
    "options",
    [{"region": "xx"}, {"batch_size": 5000}, {"flush_intervall": 1}, {"overflow": "nope"}],
)
def test_a_bad_option_is_one_clear_error_and_nothing_at_exit(run_python, options) -> None:
    """Uncaught, the error's traceback keeps the half-made handler alive until exit:
    ``logging.shutdown`` must not find it."""
    result = run_python(
        f"""
        from mp_logbridge import MixpanelHandler
        MixpanelHandler("t", **{options!r})
        """,
        timeout=30,
    )
    assert result.returncode == 1, result
    assert result.stderr.count("Traceback") == 1, result.stderr  # no second one at exit
    assert "ConfigurationError" in result.stderr
    assert "AttributeError" not in result.stderr


def test_a_bad_region_in_dictconfig_and_environment_is_clear(run_python) -> None:
    result = run_python(
        """
        import logging.config
        config = {"version": 1, "handlers": {"mp": {"class": "mp_logbridge.MixpanelHandler",
                                                    "token": "t"}},
                  "root": {"handlers": ["mp"]}}
        try:
            logging.config.dictConfig(config)
        except ValueError as error:
            print("refused:", "MIXPANEL_REGION: unknown region 'xx'" in str(error.__cause__))
        """,
        env={"MIXPANEL_REGION": "xx", "MIXPANEL_API_HOST": ""},
        timeout=30,
    )
    assert result.returncode == 0, result
    assert result.stdout.strip() == "refused: True"
    assert "Traceback" not in result.stderr


def test_a_filter_on_the_handler_may_add_the_tag(server, make_logger) -> None:
    handler = MixpanelHandler(TOKEN, api_host=server.url)

    def add_tag(record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("order"):
            record.mixpanel = {"event": "Order", "distinct_id": "u1"}  # type: ignore[attr-defined]
        return True

    handler.addFilter(add_tag)
    log = make_logger(handler)
    log.info("order placed")
    log.info("something else")
    assert handler.flush(10)
    handler.close()
    assert [e["event"] for e in server.events] == ["Order"]


def test_a_filter_that_refuses_stops_a_tagged_record(server, make_logger) -> None:
    handler = MixpanelHandler(TOKEN, api_host=server.url)
    handler.addFilter(lambda record: False)
    log = make_logger(handler)
    log.info("x", extra=tag.track("E", distinct_id="u1"))
    assert handler.flush(10)
    handler.close()
    assert server.events == []


def test_configuration_errors_are_the_librarys_own() -> None:
    with pytest.raises(ConfigurationError, match="unknown Mixpanel region 'xx'"):
        MixpanelHandler("t", region="xx")
    with pytest.raises(ConfigurationError, match="batch_size must be at most 2000"):
        Tracker("t", batch_size=5000)

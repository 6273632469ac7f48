"""Tagged log records become the Mixpanel messages a Tracker call would send.

Every call of the seed document (the Ruby SDK doc) is logged twice — once with the ``tag``
helpers, once as a hand-written plain dict in Mixpanel's record shape — and both must reach the
loopback ``MixpanelServer`` with the same meaning as the same call made through
``Tracker(token, Consumer(api_host=...))``; only the clock-dependent fields (``time``, ``$time``,
``$insert_id``) may differ. The rest covers the tag format itself: what the helpers produce,
defaults the handler fills in, and bad tags.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from support import JOHN_DOE, RecordCollector

from mp_logbridge import Consumer, MixpanelHandler, Tracker, bound, tag
from mp_logbridge.tags import TagBuilder, TagExtra
from mp_logbridge.testing import MixpanelServer

TOKEN = "tags-test-token"
SIGN_UP_DATE = dt.datetime(2024, 5, 17, 9, 30, 0)
JAN_2_2013 = dt.datetime(2013, 1, 2)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def tracker(mixpanel_server: MixpanelServer) -> Iterator[Tracker]:
    """The reference: a Tracker with a synchronous Consumer on the same server."""
    with Tracker(TOKEN, Consumer(api_host=mixpanel_server.url)) as reference:
        yield reference


# --------------------------------------------------------------------------- comparing records


def _meaning(record: dict[str, Any]) -> dict[str, Any]:
    """A record without the fields stamped from the clock (``time``, ``$time``, ``$insert_id``)."""
    record = copy.deepcopy(record)
    if "event" in record:
        record["properties"].pop("time")
        record["properties"].pop("$insert_id")
    else:
        record.pop("$time")
    return record


def _without_stamped_transaction_time(record: dict[str, Any]) -> dict[str, Any]:
    """Drop the ``$transactions.$time`` a handler stamps on charges (checked separately)."""
    record = copy.deepcopy(record)
    transaction = record["$append"]["$transactions"]
    assert isinstance(transaction.pop("$time"), str)
    return record


# --------------------------------------------------------------------------- the seed calls


@dataclass(frozen=True)
class SeedCall:
    """One call of the seed document, three ways: Tracker call, tag helper, plain tag."""

    name: str
    store: str
    call: Callable[[Tracker], object]
    helper: TagExtra
    plain: Any
    stamps_charge_time: bool = False


SEED_CALLS = [
    SeedCall(
        "people.set with ip=0 and $ignore_time",
        "profile_updates",
        lambda t: t.people.set("12345", dict(JOHN_DOE), 0, {"$ignore_time": "true"}),
        tag.people.set(
            dict(JOHN_DOE), distinct_id="12345", ip=0, optional_params={"$ignore_time": "true"}
        ),
        {"$distinct_id": "12345", "$set": dict(JOHN_DOE), "$ip": 0, "$ignore_time": "true"},
    ),
    SeedCall(
        "people.increment",
        "profile_updates",
        lambda t: t.people.increment("12345", {"Logins used": 1, "Logins remaining": -1}),
        tag.people.increment({"Logins used": 1, "Logins remaining": -1}, distinct_id="12345"),
        {"$distinct_id": "12345", "$add": {"Logins used": 1, "Logins remaining": -1}},
    ),
    SeedCall(
        "people.append",
        "profile_updates",
        lambda t: t.people.append("12345", {"Favorite Fruits": "Apples"}),
        tag.people.append({"Favorite Fruits": "Apples"}, distinct_id="12345"),
        {"$distinct_id": "12345", "$append": {"Favorite Fruits": "Apples"}},
    ),
    SeedCall(
        "track with one group id",
        "events",
        lambda t: t.track("user_id1", "App Open", {"GROUP KEY": 1234}),
        tag.track("App Open", distinct_id="user_id1", **{"GROUP KEY": 1234}),
        {"event": "App Open", "properties": {"distinct_id": "user_id1", "GROUP KEY": 1234}},
    ),
    SeedCall(
        "track with several group ids",
        "events",
        lambda t: t.track("user_id1", "App Open", {"GROUP KEY": [1000, 1234]}),
        tag.track("App Open", {"GROUP KEY": [1000, 1234]}, distinct_id="user_id1"),
        {"event": "App Open", "distinct_id": "user_id1", "GROUP KEY": [1000, 1234]},
    ),
    SeedCall(
        "people.set with a group membership",
        "profile_updates",
        lambda t: t.people.set("user_id1", {"$name": "Steph Curry", "Company": "Mixpanel"}),
        tag.people.set({"$name": "Steph Curry", "Company": "Mixpanel"}, distinct_id="user_id1"),
        {"$distinct_id": "user_id1", "$set": {"$name": "Steph Curry", "Company": "Mixpanel"}},
    ),
    SeedCall(
        "groups.set",
        "group_updates",
        lambda t: t.groups.set(
            "Company",
            "Acme",
            {"$name": "Acme, Inc.", "plan": "Premium", "Sign-Up Date": SIGN_UP_DATE},
        ),
        tag.groups.set(
            "Company",
            "Acme",
            {"$name": "Acme, Inc.", "plan": "Premium", "Sign-Up Date": SIGN_UP_DATE},
        ),
        {
            "$group_key": "Company",
            "$group_id": "Acme",
            "$set": {
                "$name": "Acme, Inc.",
                "plan": "Premium",
                "Sign-Up Date": "2024-05-17T09:30:00",
            },
        },
    ),
    SeedCall(
        "people.track_charge",
        "profile_updates",
        lambda t: t.people.track_charge("12345", 9.99),
        tag.people.track_charge(9.99, distinct_id="12345"),
        {"$distinct_id": "12345", "$append": {"$transactions": {"$amount": 9.99}}},
        stamps_charge_time=True,
    ),
    SeedCall(
        "people.track_charge with a $time",
        "profile_updates",
        lambda t: t.people.track_charge("12345", 30.50, {"$time": JAN_2_2013}),
        tag.charge(30.50, {"$time": JAN_2_2013}, distinct_id="12345"),
        {
            "$distinct_id": "12345",
            "$append": {"$transactions": {"$time": "2013-01-02T00:00:00", "$amount": 30.5}},
        },
    ),
    # "Other types of profile updates" of the seed doc: the rest of People and Groups.
    SeedCall(
        "people.set_once",
        "profile_updates",
        lambda t: t.people.set_once("12345", {"First Login": "2024-01-01"}),
        tag.people.set_once({"First Login": "2024-01-01"}, distinct_id="12345"),
        {"$distinct_id": "12345", "$set_once": {"First Login": "2024-01-01"}},
    ),
    SeedCall(
        "people.union",
        "profile_updates",
        lambda t: t.people.union("12345", {"Fruits": ["Apples", "Pears"]}),
        tag.people.union({"Fruits": ("Apples", "Pears")}, distinct_id="12345"),
        {"$distinct_id": "12345", "$union": {"Fruits": ["Apples", "Pears"]}},
    ),
    SeedCall(
        "people.remove",
        "profile_updates",
        lambda t: t.people.remove("12345", {"Favorite Fruits": "Apples"}),
        tag.people.remove({"Favorite Fruits": "Apples"}, distinct_id="12345"),
        {"$distinct_id": "12345", "$remove": {"Favorite Fruits": "Apples"}},
    ),
    SeedCall(
        "people.unset",
        "profile_updates",
        lambda t: t.people.unset("12345", ["$phone", "Favorite Color"]),
        tag.people.unset(["$phone", "Favorite Color"], distinct_id="12345"),
        {"$distinct_id": "12345", "$unset": ["$phone", "Favorite Color"]},
    ),
    SeedCall(
        "people.clear_charges",
        "profile_updates",
        lambda t: t.people.clear_charges("12345"),
        tag.people.clear_charges(distinct_id="12345"),
        {"$distinct_id": "12345", "$unset": ["$transactions"]},
    ),
    SeedCall(
        "people.delete_user",
        "profile_updates",
        lambda t: t.people.delete_user("12345", {"$ignore_alias": True}),
        tag.people.delete_user(distinct_id="12345", optional_params={"$ignore_alias": True}),
        {"$distinct_id": "12345", "$delete": "", "$ignore_alias": True},
    ),
    SeedCall(
        "groups.set_once",
        "group_updates",
        lambda t: t.groups.set_once("Company", "Acme", {"Founded": 1999}),
        tag.groups.set_once("Company", "Acme", {"Founded": 1999}),
        {"$group_key": "Company", "$group_id": "Acme", "$set_once": {"Founded": 1999}},
    ),
    SeedCall(
        "groups.union",
        "group_updates",
        lambda t: t.groups.union("Company", 13254, {"Products": ["A", "B"]}),
        tag.groups.union("Company", 13254, {"Products": ["A", "B"]}),
        {"$group_key": "Company", "$group_id": 13254, "$union": {"Products": ["A", "B"]}},
    ),
    SeedCall(
        "groups.remove",
        "group_updates",
        lambda t: t.groups.remove("Company", "Acme", {"Products": "A"}),
        tag.groups.remove("Company", "Acme", {"Products": "A"}),
        {"$group_key": "Company", "$group_id": "Acme", "$remove": {"Products": "A"}},
    ),
    SeedCall(
        "groups.unset",
        "group_updates",
        lambda t: t.groups.unset("Company", "Acme", "plan"),
        tag.groups.unset("Company", "Acme", "plan"),
        {"$group_key": "Company", "$group_id": "Acme", "$unset": ["plan"]},
    ),
    SeedCall(
        "groups.delete_group",
        "group_updates",
        lambda t: t.groups.delete_group("Company", "Acme"),
        tag.groups.delete_group("Company", "Acme"),
        {"$group_key": "Company", "$group_id": "Acme", "$delete": ""},
    ),
]


@pytest.mark.parametrize("seed", SEED_CALLS, ids=[seed.name for seed in SEED_CALLS])
def test_seed_call_as_tagged_record_means_what_the_tracker_call_means(
    seed: SeedCall,
    mixpanel_server: MixpanelServer,
    tracker: Tracker,
    make_handler: Callable[..., MixpanelHandler],
    make_logger: Callable[..., logging.Logger],
) -> None:
    assert seed.call(tracker) is True
    (expected,) = mixpanel_server.wait_for(1, seed.store)

    handler = make_handler()
    log = make_logger(handler)
    log.info("seed call (helper)", extra=seed.helper)
    log.info("seed call (plain)", extra={"mixpanel": seed.plain})
    assert handler.flush(10)

    _, from_helper, from_plain = mixpanel_server.wait_for(3, seed.store)
    assert mixpanel_server.invalid == []
    for received in (from_helper, from_plain):
        if seed.stamps_charge_time:
            received = _without_stamped_transaction_time(received)
        assert _meaning(received) == _meaning(expected)


def test_seed_consumer_block_form(mixpanel_server: MixpanelServer, make_logger) -> None:
    """The seed's EU example hands messages to a block that calls ``consumer.send!``."""
    consumer = Consumer(api_host=mixpanel_server.url)
    received: list[str] = []

    def block(kind: str, message: dict[str, Any]) -> None:
        received.append(kind)
        consumer.send(kind, message)

    handler = MixpanelHandler(TOKEN, consumer=block)
    try:
        log = make_logger(handler)
        log.info("opened", extra=tag.track("App Open", distinct_id="u1") + tag.charge(1.5))
    finally:
        handler.close()
        consumer.close()
    # The charge names no user and none is bound: it is not sent, the event is.
    assert received == ["event"]
    (event,) = mixpanel_server.events
    assert event["event"] == "App Open"
    assert event["properties"]["distinct_id"] == "u1"


# --------------------------------------------------------------------------- the tag format


def test_one_record_carries_an_event_and_a_charge(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler()
    log = make_logger(handler)
    log.info(
        "bought %s",
        "pro plan",
        extra=tag.track("Purchased", distinct_id="u7", plan="pro")
        + tag.charge(49.0, {"plan": "pro"}, distinct_id="u7"),
    )
    assert handler.flush(10)
    (event,) = mixpanel_server.wait_for(1, "events")
    (charge,) = mixpanel_server.wait_for(1, "profile_updates")
    assert event["event"] == "Purchased"
    assert event["properties"]["distinct_id"] == "u7"
    assert event["properties"]["plan"] == "pro"
    assert charge["$distinct_id"] == "u7"
    assert charge["$append"]["$transactions"]["$amount"] == 49.0
    assert charge["$append"]["$transactions"]["plan"] == "pro"
    assert charge["$time"] == event["properties"]["time"]


def test_true_and_string_tags_are_events_for_the_bound_user(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler()
    log = make_logger(handler)
    with bound(distinct_id="bound-user"):
        log.info("Report %s", "Exported", extra={"mixpanel": True})
        log.info("ignored message", extra={"mixpanel": "Named Event"})
    assert handler.flush(10)
    first, second = mixpanel_server.wait_for(2, "events")
    assert (first["event"], first["properties"]["distinct_id"]) == ("Report Exported", "bound-user")
    assert (second["event"], second["properties"]["distinct_id"]) == ("Named Event", "bound-user")


def test_event_name_defaults_to_the_formatted_log_message(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler()
    log = make_logger(handler)
    log.info("exported %s as %s", "report", "pdf", extra=tag.track(distinct_id="u1"))
    log.info("plain %d%%", 100, extra={"mixpanel": {"properties": {"distinct_id": "u1"}}})
    assert handler.flush(10)
    names = [event["event"] for event in mixpanel_server.wait_for(2, "events")]
    assert names == ["exported report as pdf", "plain 100%"]


def test_top_level_keys_of_an_event_tag_are_properties(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler()
    log = make_logger(handler)
    log.info(
        "x",
        extra={
            "mixpanel": {
                "event": "Signed Up",
                "distinct_id": "u1",
                "plan": "pro",
                "seats": 3,
                "properties": {"source": "ads", "plan": "free"},
            }
        },
    )
    assert handler.flush(10)
    (event,) = mixpanel_server.wait_for(1, "events")
    props = event["properties"]
    assert event["event"] == "Signed Up"
    assert props["distinct_id"] == "u1"
    assert (props["seats"], props["source"]) == (3, "ads")
    assert props["plan"] == "pro"  # a top-level key wins over the same key in "properties"
    assert "event" not in props and "properties" not in props


def test_profile_tag_with_several_operations_becomes_several_updates(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler()
    log = make_logger(handler)
    log.info(
        "profile",
        extra={
            "mixpanel": {
                "$distinct_id": "u1",
                "$set": {"plan": "pro"},
                "$add": {"logins": 1},
                "$union": {"tags": ["a"]},
                "$ip": 0,
            }
        },
    )
    log.info(
        "group",
        extra={
            "mixpanel": {
                "$group_key": "Company",
                "$group_id": "Acme",
                "$set": {"tier": 1},
                "$unset": ["old"],
            }
        },
    )
    assert handler.flush(10)
    updates = mixpanel_server.wait_for(3, "profile_updates")
    by_op = {next(key for key in u if key in ("$set", "$add", "$union")): u for u in updates}
    assert by_op["$set"]["$set"] == {"plan": "pro"}
    assert by_op["$add"]["$add"] == {"logins": 1}
    assert by_op["$union"]["$union"] == {"tags": ["a"]}
    for update in updates:
        assert update["$distinct_id"] == "u1"
        assert update["$ip"] == 0
        assert update["$token"] == TOKEN
    groups = mixpanel_server.wait_for(2, "group_updates")
    assert [g.get("$set") or g.get("$unset") for g in groups] == [{"tier": 1}, ["old"]]


def test_time_is_the_record_creation_time_and_charges_get_it_as_their_time(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler()
    log = make_logger(handler)
    record = log.makeRecord(
        log.name,
        logging.INFO,
        __file__,
        1,
        "bought",
        (),
        None,
        extra=tag.track("Purchased", distinct_id="u1")
        + tag.charge(5, distinct_id="u1")
        + tag.charge(6, {"$time": "2020-01-01T00:00:00"}, distinct_id="u1")
        + tag.groups.set("Company", "Acme", {"a": 1}),
    )
    created = int(time.time()) - 3600 + 0.25  # /track takes events of the last 5 days only
    record.created = created
    log.handle(record)
    assert handler.flush(10)

    expected_ms = int(created * 1000)
    (event,) = mixpanel_server.wait_for(1, "events")
    assert event["properties"]["time"] == expected_ms
    stamped, given = mixpanel_server.wait_for(2, "profile_updates")
    assert stamped["$time"] == given["$time"] == expected_ms
    as_text = dt.datetime.fromtimestamp(int(created), dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    assert stamped["$append"]["$transactions"]["$time"] == as_text
    assert given["$append"]["$transactions"]["$time"] == "2020-01-01T00:00:00"
    (group,) = mixpanel_server.wait_for(1, "group_updates")
    assert group["$time"] == expected_ms


def test_time_of_logged_records_falls_between_the_calls(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    handler = make_handler(flush_interval=5.0)
    log = make_logger(handler)
    before = int(time.time() * 1000)
    log.info("first", extra=tag.track("A", distinct_id="u1"))
    middle = int(time.time() * 1000) + 1
    log.info("second", extra=tag.track("B", distinct_id="u1"))
    after = int(time.time() * 1000) + 1
    assert handler.flush(10)  # sent long after: time is the record's, not the send's
    first, second = mixpanel_server.wait_for(2, "events")
    assert before <= first["properties"]["time"] <= middle
    assert first["properties"]["time"] <= second["properties"]["time"] <= after


# --------------------------------------------------------------------------- bad tags


BAD_TAGS = [
    pytest.param(5, id="not a mapping"),
    pytest.param({"$distinct_id": "u1", "$add": {"n": "one"}}, id="$add of a string"),
    pytest.param({"$distinct_id": "u1", "$union": {"n": "not-a-list"}}, id="$union of a string"),
    pytest.param({"$distinct_id": "u1", "$unset": [1, 2]}, id="$unset of numbers"),
    pytest.param({"$group_key": "Company", "$group_id": "Acme", "$add": {"n": 1}}, id="group $add"),
    pytest.param({"$distinct_id": "u1"}, id="profile without operation"),
    pytest.param({"event": "E", "distinct_id": "u1", "ratio": math.nan}, id="NaN property"),
    pytest.param({"event": "E", "distinct_id": "u1", "properties": [1]}, id="properties list"),
    pytest.param({"$distinct_id": "u1", "$set": {"n": math.inf}}, id="infinite $set value"),
    pytest.param({"event": "E", "distinct_id": {"a": 1}}, id="distinct_id a mapping"),
]


@pytest.mark.parametrize("bad", BAD_TAGS)
def test_bad_tag_is_counted_and_reported_while_the_rest_of_the_record_is_sent(
    bad: Any,
    mixpanel_server: MixpanelServer,
    make_handler,
    make_logger,
    library_warnings: RecordCollector,
) -> None:
    handler = make_handler()
    log = make_logger(handler)
    log.info(
        "mixed",
        extra={
            "mixpanel": [
                {"event": "Before", "distinct_id": "u1"},
                bad,
                {"$distinct_id": "u1", "$set": {"ok": True}},
            ]
        },
    )
    handler.flush(10)  # False: something was dropped
    (event,) = mixpanel_server.wait_for(1, "events")
    (update,) = mixpanel_server.wait_for(1, "profile_updates")
    assert event["event"] == "Before"
    assert update["$set"] == {"ok": True}
    assert handler.stats()["dropped"]["invalid"] == 1
    assert mixpanel_server.invalid == []  # nothing malformed reached the server
    handler.close()  # the loss report is forced out at close at the latest
    reports = [r.getMessage() for r in library_warnings.records if r.levelno == logging.WARNING]
    assert any("invalid: 1" in text for text in reports), reports


def test_event_without_any_user_is_invalid_with_a_clear_reason(
    mixpanel_server: MixpanelServer,
    make_handler,
    make_logger,
    library_warnings: RecordCollector,
) -> None:
    handler = make_handler()
    log = make_logger(handler)
    log.info("no user", extra=tag.track("Orphan") + tag.track("Owned", distinct_id="u2"))
    handler.flush(10)
    (event,) = mixpanel_server.wait_for(1, "events")
    assert event["event"] == "Owned"
    assert handler.stats()["dropped"]["invalid"] == 1
    handler.close()
    text = " ".join(library_warnings.messages())
    assert "no distinct_id" in text
    assert "enduser.id" in text and "default_distinct_id" in text


def test_bad_tag_with_a_synchronous_consumer_is_counted_and_the_rest_sent(
    mixpanel_server: MixpanelServer,
    make_logger,
    library_warnings: RecordCollector,
) -> None:
    """With ``consumer=`` a callable, records are built on the caller's thread: same contract."""
    consumer = Consumer(api_host=mixpanel_server.url)
    handler = MixpanelHandler(TOKEN, consumer=lambda kind, message: consumer.send(kind, message))
    try:
        log = make_logger(handler)
        log.info("mixed", extra={"mixpanel": [7, {"event": "After", "distinct_id": "u1"}]})
        assert handler.stats()["dropped"]["invalid"] == 1
    finally:
        handler.close()
        consumer.close()
    assert [e["event"] for e in mixpanel_server.events] == ["After"]
    assert any("invalid" in message for message in library_warnings.messages())


# --------------------------------------------------------------------------- the helpers


def test_track_helper_builds_the_documented_plain_format() -> None:
    assert tag.track("Signed Up", distinct_id="u1", plan="pro") == {
        "mixpanel": {"event": "Signed Up", "properties": {"distinct_id": "u1", "plan": "pro"}}
    }
    assert tag.track("E", {"a": 1}, b=2) == {
        "mixpanel": {"event": "E", "properties": {"a": 1, "b": 2}}
    }
    assert tag.track() == {"mixpanel": {}}
    assert tag.track(distinct_id=42) == {"mixpanel": {"properties": {"distinct_id": 42}}}


def test_people_helpers_build_the_documented_plain_format() -> None:
    people = tag.people
    assert people.set({"a": 1}, distinct_id="u1") == {
        "mixpanel": {"$distinct_id": "u1", "$set": {"a": 1}}
    }
    assert people.set({"a": 1}) == {"mixpanel": {"$set": {"a": 1}}}
    assert people.set({"a": 1}, distinct_id="u1", ip=0, optional_params={"$ignore_time": True}) == {
        "mixpanel": {"$distinct_id": "u1", "$set": {"a": 1}, "$ignore_time": True, "$ip": 0}
    }
    assert people.set_once({"a": 1}, distinct_id="u1") == {
        "mixpanel": {"$distinct_id": "u1", "$set_once": {"a": 1}}
    }
    assert people.increment({"n": 2}, distinct_id="u1") == {
        "mixpanel": {"$distinct_id": "u1", "$add": {"n": 2}}
    }
    assert people.append({"l": "x"}, distinct_id="u1") == {
        "mixpanel": {"$distinct_id": "u1", "$append": {"l": "x"}}
    }
    assert people.union({"l": ("x", "y")}, distinct_id="u1") == {
        "mixpanel": {"$distinct_id": "u1", "$union": {"l": ["x", "y"]}}
    }
    assert people.remove({"l": "x"}, distinct_id="u1") == {
        "mixpanel": {"$distinct_id": "u1", "$remove": {"l": "x"}}
    }
    assert people.unset("a", distinct_id="u1") == {
        "mixpanel": {"$distinct_id": "u1", "$unset": ["a"]}
    }
    assert people.unset(["a", "b"]) == {"mixpanel": {"$unset": ["a", "b"]}}
    assert people.track_charge(9.99, distinct_id="u1") == {
        "mixpanel": {"$distinct_id": "u1", "$append": {"$transactions": {"$amount": 9.99}}}
    }
    assert people.track_charge(30.5, {"$time": "2013-01-02T00:00:00"}) == {
        "mixpanel": {
            "$append": {"$transactions": {"$time": "2013-01-02T00:00:00", "$amount": 30.5}}
        }
    }
    assert tag.charge(1, {"sku": "x"}, distinct_id="u1") == people.track_charge(
        1, {"sku": "x"}, distinct_id="u1"
    )
    assert people.clear_charges(distinct_id="u1") == {
        "mixpanel": {"$distinct_id": "u1", "$unset": ["$transactions"]}
    }
    assert people.delete_user(distinct_id="u1") == {
        "mixpanel": {"$distinct_id": "u1", "$delete": ""}
    }


def test_group_helpers_build_the_documented_plain_format() -> None:
    groups = tag.groups
    key = {"$group_key": "Company", "$group_id": "Acme"}
    assert groups.set("Company", "Acme", {"a": 1}) == {"mixpanel": {**key, "$set": {"a": 1}}}
    assert groups.set("Company", "Acme", {"a": 1}, optional_params={"$ignore_time": True}) == {
        "mixpanel": {**key, "$set": {"a": 1}, "$ignore_time": True}
    }
    assert groups.set_once("Company", "Acme", {"a": 1}) == {
        "mixpanel": {**key, "$set_once": {"a": 1}}
    }
    assert groups.union("Company", "Acme", {"l": ("x",)}) == {
        "mixpanel": {**key, "$union": {"l": ["x"]}}
    }
    assert groups.remove("Company", "Acme", {"l": "x"}) == {
        "mixpanel": {**key, "$remove": {"l": "x"}}
    }
    assert groups.unset("Company", "Acme", "a") == {"mixpanel": {**key, "$unset": ["a"]}}
    assert groups.delete_group("Company", "Acme") == {"mixpanel": {**key, "$delete": ""}}


def test_helpers_produce_plain_json_data_that_helpers_do_not_share() -> None:
    properties = {"plan": "pro"}
    built = tag.people.set(properties, distinct_id="u1")
    properties["plan"] = "changed later"
    assert built["mixpanel"]["$set"] == {"plan": "pro"}  # a copy, not the caller's dict
    assert isinstance(built, dict)
    combined = tag.track("E", distinct_id="u1") + built
    assert json.loads(json.dumps(combined)) == combined


def test_plus_combines_messages_and_keeps_other_extra_fields() -> None:
    event = tag.track("E", distinct_id="u1")
    charge = tag.charge(2.5, distinct_id="u1")
    group = tag.groups.set("Company", "Acme", {"a": 1})
    combined = event + charge
    assert isinstance(combined, TagExtra)
    assert combined == {"mixpanel": [event["mixpanel"], charge["mixpanel"]]}
    assert event + charge + group == {
        "mixpanel": [event["mixpanel"], charge["mixpanel"], group["mixpanel"]]
    }
    assert tag.message(event["mixpanel"], charge["mixpanel"]) == combined
    assert event == {"mixpanel": {"event": "E", "properties": {"distinct_id": "u1"}}}  # unchanged
    with_extra = event + {"request_id": "r-1"}
    assert with_extra == {**event, "request_id": "r-1"}
    assert {"request_id": "r-1"} + event == with_extra
    plain_first = {"mixpanel": {"event": "Plain"}} + charge
    assert isinstance(plain_first, TagExtra)
    assert plain_first == {"mixpanel": [{"event": "Plain"}, charge["mixpanel"]]}  # left first


def test_tags_with_another_name_go_to_a_handler_configured_with_it(
    mixpanel_server: MixpanelServer, make_handler, make_logger
) -> None:
    analytics = TagBuilder("analytics")
    assert analytics.track("E", distinct_id="u1") == {
        "analytics": {"event": "E", "properties": {"distinct_id": "u1"}}
    }
    assert analytics.people.set({"a": 1}, distinct_id="u1") == {
        "analytics": {"$distinct_id": "u1", "$set": {"a": 1}}
    }
    other = make_handler(tag="analytics")
    default = make_handler(TOKEN + "-default")
    log = make_logger(other, default)
    log.info("one", extra=analytics.track("For Analytics", distinct_id="u1"))
    log.info("two", extra=tag.track("For Default", distinct_id="u1"))
    assert other.flush(10) and default.flush(10)
    events = mixpanel_server.wait_for(2, "events")
    tokens = {event["event"]: event["properties"]["token"] for event in events}
    assert tokens == {"For Analytics": TOKEN, "For Default": TOKEN + "-default"}

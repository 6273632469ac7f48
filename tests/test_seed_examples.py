"""Every example of the Mixpanel Ruby SDK documentation, in Python, checked at the server.

The examples go through a real :class:`~mp_logbridge.Consumer` (and once through the default
background consumer) to :class:`~mp_logbridge.testing.MixpanelServer`, and the records that
arrive are compared field by field with what the Ruby SDK documents.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from support import JOHN_DOE

from mp_logbridge import ConfigurationError, Consumer, ServiceAccount, Tracker, __version__
from mp_logbridge._messages import now_ms
from mp_logbridge.testing import MixpanelServer

YOUR_PROJECT_TOKEN = "seed-doc-token"
ACCOUNT = ("seed-robot", "seed-robot-secret", "31337")
TEN_MINUTES_MS = 600_000


@pytest.fixture
def server() -> Iterator[MixpanelServer]:
    with MixpanelServer(service_account=ACCOUNT) as srv:
        yield srv


@pytest.fixture
def tracker(server: MixpanelServer) -> Iterator[Tracker]:
    """``Mixpanel::Tracker.new(YOUR_PROJECT_TOKEN)``, sending synchronously to the server."""
    consumer = Consumer(api_host=server.url, credentials=ServiceAccount(*ACCOUNT))
    with Tracker(YOUR_PROJECT_TOKEN, consumer) as made:
        yield made


def only(records: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(records) == 1, records
    return dict(records[0])


def update_time(record: dict[str, Any]) -> int:
    """Pop ``$time`` and check it is integer milliseconds close to now."""
    value = record.pop("$time")
    assert type(value) is int
    assert abs(value - now_ms()) < TEN_MINUTES_MS
    return value


def profile(server: MixpanelServer) -> dict[str, Any]:
    record = only(server.profile_updates)
    update_time(record)
    return record


def group_record(server: MixpanelServer) -> dict[str, Any]:
    record = only(server.group_updates)
    update_time(record)
    return record


def event_properties(record: dict[str, Any]) -> dict[str, Any]:
    """The event's properties without the generated ones (checked here)."""
    props = dict(record["properties"])
    assert props.pop("token") == YOUR_PROJECT_TOKEN
    assert props.pop("mp_lib") == "mp_logbridge"
    assert props.pop("$lib_version") == __version__
    insert_id = props.pop("$insert_id")
    assert 0 < len(insert_id) <= 36
    if "time" in props and type(props["time"]) is int and props["time"] > 10**11:
        assert abs(props.pop("time") - now_ms()) < TEN_MINUTES_MS
    return props


# --------------------------------------------------------------------------- Storing User Profiles


def test_people_set_without_geolocation_or_last_seen(
    tracker: Tracker, server: MixpanelServer
) -> None:
    # tracker.people.set('12345', {...}, ip = 0, {'$ignore_time' => 'true'});
    assert tracker.people.set("12345", dict(JOHN_DOE), 0, {"$ignore_time": "true"})
    record = only(server.profile_updates)
    assert list(record) == [
        "$token",
        "$time",
        "$distinct_id",
        "$set",
        "$ignore_time",
        "$ip",
    ]
    update_time(record)
    assert record == {
        "$token": YOUR_PROJECT_TOKEN,
        "$distinct_id": "12345",
        "$set": JOHN_DOE,
        "$ignore_time": "true",
        "$ip": 0,
    }
    request = server.requests[0]
    assert request.path == "/engage"
    assert request.header("Authorization") is None


def test_people_increment(tracker: Tracker, server: MixpanelServer) -> None:
    assert tracker.people.increment("12345", {"Logins used": 1, "Logins remaining": -1})
    assert profile(server) == {
        "$token": YOUR_PROJECT_TOKEN,
        "$distinct_id": "12345",
        "$add": {"Logins used": 1, "Logins remaining": -1},
    }


def test_people_append(tracker: Tracker, server: MixpanelServer) -> None:
    assert tracker.people.append("12345", {"Favorite Fruits": "Apples"})
    assert profile(server) == {
        "$token": YOUR_PROJECT_TOKEN,
        "$distinct_id": "12345",
        "$append": {"Favorite Fruits": "Apples"},
    }


# --------------------------------------------------------------------------- Group Analytics


def test_track_with_a_group_key(tracker: Tracker, server: MixpanelServer) -> None:
    assert tracker.track("user_id1", "App Open", {"GROUP KEY": 1234})
    assert tracker.track("user_id1", "App Open", {"GROUP KEY": [1000, 1234]})
    first, second = server.events
    assert first["event"] == second["event"] == "App Open"
    assert event_properties(first) == {"distinct_id": "user_id1", "GROUP KEY": 1234}
    assert event_properties(second) == {"distinct_id": "user_id1", "GROUP KEY": [1000, 1234]}
    assert first["properties"]["$insert_id"] != second["properties"]["$insert_id"]


def test_people_set_with_a_group_membership(tracker: Tracker, server: MixpanelServer) -> None:
    assert tracker.people.set("user_id1", {"$name": "Steph Curry", "Company": "Mixpanel"})
    assert profile(server) == {
        "$token": YOUR_PROJECT_TOKEN,
        "$distinct_id": "user_id1",
        "$set": {"$name": "Steph Curry", "Company": "Mixpanel"},
    }


def test_groups_set_with_a_datetime(tracker: Tracker, server: MixpanelServer) -> None:
    signed_up = datetime.now().replace(microsecond=0)
    assert tracker.groups.set(
        "Company", "Acme", {"$name": "Acme, Inc.", "plan": "Premium", "Sign-Up Date": signed_up}
    )
    record = only(server.group_updates)
    assert list(record) == ["$token", "$time", "$group_key", "$group_id", "$set"]
    update_time(record)
    assert record == {
        "$token": YOUR_PROJECT_TOKEN,
        "$group_key": "Company",
        "$group_id": "Acme",
        "$set": {
            "$name": "Acme, Inc.",
            "plan": "Premium",
            "Sign-Up Date": signed_up.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    }
    assert server.requests[0].path == "/groups"


def test_groups_set_converts_aware_datetimes_to_utc(
    tracker: Tracker, server: MixpanelServer
) -> None:
    pacific = timezone(timedelta(hours=-8))
    assert tracker.groups.set(
        "Company", "Acme", {"Since": datetime(2013, 1, 1, 18, 4, 5, tzinfo=pacific)}
    )
    assert group_record(server)["$set"] == {"Since": "2013-01-02T02:04:05"}


# --------------------------------------------------------------------------- Tracking Revenue


def test_track_charge(tracker: Tracker, server: MixpanelServer) -> None:
    # tracker.people.track_charge('12345', 9.99)
    assert tracker.people.track_charge("12345", 9.99)
    assert profile(server) == {
        "$token": YOUR_PROJECT_TOKEN,
        "$distinct_id": "12345",
        "$append": {"$transactions": {"$amount": 9.99}},
    }


def test_track_charge_on_a_given_day(tracker: Tracker, server: MixpanelServer) -> None:
    # mixpanel.people.track_charge("12345", 30.50, {'$time' => DateTime.parse("Jan 2 2013")})
    properties = {"$time": datetime(2013, 1, 2)}
    assert tracker.people.track_charge("12345", 30.50, properties)
    assert properties == {"$time": datetime(2013, 1, 2)}  # the caller's dict is left alone
    record = profile(server)
    transaction = record["$append"]["$transactions"]
    assert list(transaction) == ["$time", "$amount"]
    assert record == {
        "$token": YOUR_PROJECT_TOKEN,
        "$distinct_id": "12345",
        "$append": {"$transactions": {"$time": "2013-01-02T00:00:00", "$amount": 30.5}},
    }


def test_clear_charges(tracker: Tracker, server: MixpanelServer) -> None:
    assert tracker.people.clear_charges("12345")
    assert profile(server) == {
        "$token": YOUR_PROJECT_TOKEN,
        "$distinct_id": "12345",
        "$unset": ["$transactions"],
    }


# --------------------------------------------------------------------------- EU Data Residency


def test_eu_consumer_example(server: MixpanelServer) -> None:
    base = server.url  # stands in for https://api-eu.mixpanel.com
    eu_consumer = Consumer(f"{base}/track", f"{base}/engage", f"{base}/groups")
    try:
        assert eu_consumer.endpoints.event == f"{base}/track"
        tracker = Tracker(YOUR_PROJECT_TOKEN, lambda kind, message: eu_consumer.send(kind, message))
        assert tracker.track("12345", "Signed Up", {"plan": "eu"})
        assert tracker.people.set("12345", {"plan": "eu"})
        assert tracker.groups.set("Company", "Acme", {"plan": "eu"})
    finally:
        eu_consumer.close()
    assert event_properties(only(server.events)) == {"distinct_id": "12345", "plan": "eu"}
    assert profile(server)["$set"] == {"plan": "eu"}
    assert group_record(server)["$set"] == {"plan": "eu"}
    assert [r.path for r in server.requests] == ["/track", "/engage", "/groups"]


def test_region_keyword_builds_the_same_eu_endpoints() -> None:
    with (
        Consumer(
            "https://api-eu.mixpanel.com/track",
            "https://api-eu.mixpanel.com/engage",
            "https://api-eu.mixpanel.com/groups",
        ) as positional,
        Consumer(region="eu") as by_region,
    ):
        assert positional.endpoints.event == by_region.endpoints.event
        assert positional.endpoints.profile_update == by_region.endpoints.profile_update
        assert positional.endpoints.group_update == by_region.endpoints.group_update


# --------------------------------------------------------------------------- the other methods


def test_other_people_updates(tracker: Tracker, server: MixpanelServer) -> None:
    assert tracker.people.set_once("12345", {"First Login": "2013-04-01T13:20:00"})
    assert tracker.people.plus_one("12345", "Logins used")
    assert tracker.people.union("12345", {"Albums": ["Diamond Dogs"]})
    assert tracker.people.remove("12345", {"Albums": "Diamond Dogs"})
    assert tracker.people.unset("12345", "Albums")
    assert tracker.people.unset("12345", ["Albums", "Singles"])
    assert tracker.people.set("12345", {"plan": "pro"}, "203.0.113.9")
    records = server.profile_updates
    for record in records:
        update_time(record)
        assert record.pop("$token") == YOUR_PROJECT_TOKEN
        assert record.pop("$distinct_id") == "12345"
    assert records == [
        {"$set_once": {"First Login": "2013-04-01T13:20:00"}},
        {"$add": {"Logins used": 1}},
        {"$union": {"Albums": ["Diamond Dogs"]}},
        {"$remove": {"Albums": "Diamond Dogs"}},
        {"$unset": ["Albums"]},
        {"$unset": ["Albums", "Singles"]},
        {"$set": {"plan": "pro"}, "$ip": "203.0.113.9"},
    ]


def test_delete_user(tracker: Tracker, server: MixpanelServer) -> None:
    assert tracker.people.delete_user("12345")
    assert tracker.people.delete_user("12345", {"$ignore_alias": True})
    plain, through_alias = server.profile_updates
    update_time(plain)
    update_time(through_alias)
    assert plain == {"$token": YOUR_PROJECT_TOKEN, "$distinct_id": "12345", "$delete": ""}
    assert through_alias == {**plain, "$ignore_alias": True}


def test_other_group_updates(tracker: Tracker, server: MixpanelServer) -> None:
    assert tracker.groups.set_once("Company", "Acme", {"Founded": "1999"})
    assert tracker.groups.union("Company", "Acme", {"Products": ["Rockets", "Anvils"]})
    assert tracker.groups.remove("Company", "Acme", {"Products": "Anvils"})
    assert tracker.groups.unset("Company", "Acme", "Founded")
    assert tracker.groups.unset("Company", "Acme", ["plan", "seats"])
    assert tracker.groups.delete_group("Company", "Acme")
    assert tracker.groups.delete_group("Company", 13254, {"$ignore_alias": True})
    records = server.group_updates
    for record in records:
        update_time(record)
        assert record.pop("$token") == YOUR_PROJECT_TOKEN
        assert record.pop("$group_key") == "Company"
    assert records == [
        {"$group_id": "Acme", "$set_once": {"Founded": "1999"}},
        {"$group_id": "Acme", "$union": {"Products": ["Rockets", "Anvils"]}},
        {"$group_id": "Acme", "$remove": {"Products": "Anvils"}},
        {"$group_id": "Acme", "$unset": ["Founded"]},
        {"$group_id": "Acme", "$unset": ["plan", "seats"]},
        {"$group_id": "Acme", "$delete": ""},
        {"$group_id": 13254, "$delete": "", "$ignore_alias": True},
    ]


def test_track_with_ip(tracker: Tracker, server: MixpanelServer) -> None:
    assert tracker.track("12345", "Logged In", {"source": "web"}, "203.0.113.9")
    assert tracker.track("12345", "Logged In", None, 0)
    with_ip, no_geo = server.events
    assert event_properties(with_ip) == {
        "distinct_id": "12345",
        "source": "web",
        "ip": "203.0.113.9",
    }
    assert event_properties(no_geo) == {"distinct_id": "12345", "ip": 0}


def test_alias(tracker: Tracker, server: MixpanelServer) -> None:
    assert tracker.alias("new-alias", "12345")
    record = only(server.events)
    assert record == {
        "event": "$create_alias",
        "properties": {"distinct_id": "12345", "alias": "new-alias", "token": YOUR_PROJECT_TOKEN},
    }
    assert server.requests[0].path == "/track"  # the configured host, not api.mixpanel.com


def test_import_event_and_merge(tracker: Tracker, server: MixpanelServer) -> None:
    assert tracker.import_event("12345", "Signed Up", {"time": 1_600_000_000, "plan": "pro"})
    assert tracker.import_event(
        "12345", "Upgraded", {"time": datetime(2021, 3, 4, tzinfo=timezone.utc)}
    )
    assert tracker.merge("12345", "anonymous-1")
    signed_up, upgraded, merged = server.imports
    assert signed_up["event"] == "Signed Up"
    assert event_properties(signed_up) == {
        "distinct_id": "12345",
        "time": 1_600_000_000,
        "plan": "pro",
    }
    assert upgraded["properties"]["time"] == 1_614_816_000_000
    assert merged == {
        "event": "$merge",
        "properties": {"$distinct_ids": ["12345", "anonymous-1"], "token": YOUR_PROJECT_TOKEN},
    }
    for request in server.requests:
        assert request.path == "/import"
        merge = request.records[0]["event"] == "$merge"
        # $merge goes on its own, not strict, as the official SDKs send it.
        mode = {"strict": "0", "verbose": "1"} if merge else {"strict": "1"}
        assert request.query == {**mode, "project_id": ACCOUNT[2]}
        expected = base64.b64encode(f"{ACCOUNT[0]}:{ACCOUNT[1]}".encode()).decode()
        assert request.header("Authorization") == f"Basic {expected}"


def test_import_without_credentials_is_a_clear_error(server: MixpanelServer) -> None:
    with (
        Tracker(YOUR_PROJECT_TOKEN, Consumer(api_host=server.url)) as tracker,
        pytest.raises(ConfigurationError, match="ServiceAccount"),
    ):
        tracker.import_event("12345", "Old", {"time": 1_600_000_000})
    assert server.requests == []


def test_generate_tracking_url(tracker: Tracker, server: MixpanelServer) -> None:
    url = tracker.generate_tracking_url("12345", "Opened Email", {"campaign": "spring"})
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == server.url
    assert parts.path == "/track"
    query = parse_qs(parts.query)
    assert query["ip"] == ["1"] and query["img"] == ["1"]
    sent = json.loads(base64.urlsafe_b64decode(query["data"][0]))
    assert sent["event"] == "Opened Email"

    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "image/gif"
    assert response.content.startswith(b"GIF8")
    record = only(server.events)
    assert record == sent
    assert event_properties(record) == {"distinct_id": "12345", "campaign": "spring"}
    assert server.requests[0].method == "GET"


def test_tracking_url_with_an_explicit_endpoint(tracker: Tracker) -> None:
    url = tracker.generate_tracking_url("u", "e", endpoint="https://api-eu.mixpanel.com/track")
    assert url.startswith("https://api-eu.mixpanel.com/track?data=")
    assert url.endswith("&ip=1&img=1")


# --------------------------------------------------------------------------- background delivery


def test_seed_examples_through_the_default_background_consumer(server: MixpanelServer) -> None:
    with Tracker(
        YOUR_PROJECT_TOKEN, api_host=server.url, credentials=ServiceAccount(*ACCOUNT)
    ) as tracker:
        assert tracker.people.set(
            "12345", {"$first_name": "John", "$last_name": "Doe"}, 0, {"$ignore_time": "true"}
        )
        assert tracker.people.increment("12345", {"Logins used": 1, "Logins remaining": -1})
        assert tracker.people.append("12345", {"Favorite Fruits": "Apples"})
        assert tracker.track("user_id1", "App Open", {"GROUP KEY": [1000, 1234]})
        assert tracker.groups.set("Company", "Acme", {"$name": "Acme, Inc.", "plan": "Premium"})
        assert tracker.people.track_charge("12345", 30.50, {"$time": datetime(2013, 1, 2)})
        assert tracker.import_event("12345", "Signed Up", {"time": 1_600_000_000})
        assert tracker.flush(10) is True
        stats = tracker.stats()
    assert stats["sent"] == 7
    assert stats["dropped_total"] == 0
    first, increment, append, charge = server.profile_updates
    assert (first["$ip"], first["$ignore_time"]) == (0, "true")
    assert increment["$add"] == {"Logins used": 1, "Logins remaining": -1}
    assert append["$append"] == {"Favorite Fruits": "Apples"}
    assert charge["$append"] == {"$transactions": {"$time": "2013-01-02T00:00:00", "$amount": 30.5}}
    assert event_properties(only(server.events))["GROUP KEY"] == [1000, 1234]
    assert group_record(server)["$set"] == {"$name": "Acme, Inc.", "plan": "Premium"}
    assert only(server.imports)["properties"]["time"] == 1_600_000_000

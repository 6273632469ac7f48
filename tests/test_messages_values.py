"""Record builders and value conversion: shapes, validation errors, and property-based checks.

Builders are pure, so most tests call them directly; the round-trip property sends through a
real :class:`~mp_logbridge.Consumer` to a :class:`~mp_logbridge.testing.MixpanelServer`.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import math
import uuid
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mp_logbridge import ConfigurationError, Consumer, InvalidMessageError, Tracker, __version__
from mp_logbridge import _messages as msg
from mp_logbridge._values import encode, to_json_value
from mp_logbridge.consumers import CallableSink
from mp_logbridge.testing import MixpanelServer

TOKEN = "test-token"
UTC = dt.timezone.utc
PACIFIC = dt.timezone(dt.timedelta(hours=-8))


class Color(enum.Enum):
    RED = "red"
    WHEN = 3


class _BrokenRepr:
    """A value whose ``repr`` fails: error messages must still be built."""

    def __repr__(self) -> str:
        raise RuntimeError("repr is broken")


@pytest.fixture(scope="module")
def server() -> Iterator[MixpanelServer]:
    with MixpanelServer() as srv:
        yield srv


@pytest.fixture
def captured() -> list[tuple[str, dict[str, Any]]]:
    return []


@pytest.fixture
def tracker(captured: list[tuple[str, dict[str, Any]]]) -> Tracker:
    """A Tracker whose sink records the JSON-ready messages it is given."""
    return Tracker(TOKEN, lambda kind, message: captured.append((kind, message)))


def field_of(call: Any, *args: Any, **kwargs: Any) -> str:
    """Call, expect InvalidMessageError, return the field it names."""
    with pytest.raises(InvalidMessageError) as info:
        call(*args, **kwargs)
    assert str(info.value).startswith(f"{info.value.field}: ")
    return info.value.field


# --------------------------------------------------------------------------- shapes


def test_event_shape_and_defaults() -> None:
    record = msg.event(TOKEN, "user-1", "Signed Up", {"plan": "pro"})
    props = record["properties"]
    assert record["event"] == "Signed Up"
    assert list(props) == [
        "token",
        "distinct_id",
        "time",
        "$insert_id",
        "mp_lib",
        "$lib_version",
        "plan",
    ]
    assert props["token"] == TOKEN
    assert props["distinct_id"] == "user-1"
    assert props["mp_lib"] == "mp_logbridge"
    assert props["$lib_version"] == __version__
    assert type(props["time"]) is int
    assert abs(props["time"] - msg.now_ms()) < 600_000  # milliseconds, not seconds
    assert props["plan"] == "pro"


def test_insert_ids_are_unique_and_well_formed() -> None:
    ids = {msg.event(TOKEN, 1, "e")["properties"]["$insert_id"] for _ in range(2000)}
    assert len(ids) == 2000
    for insert_id in ids:
        assert 1 <= len(insert_id) <= 36
        assert set(insert_id) <= set(
            "0123456789abcdefABCDEFGHIJKLMNOPQRSTUVWXYZghijklmnopqrstuvwxyz-"
        )


def test_ip_zero_is_kept_everywhere() -> None:
    assert msg.event(TOKEN, "u", "e", ip=0)["properties"]["ip"] == 0
    assert msg.profile_update(TOKEN, "u", "$set", {"a": 1}, ip=0)["$ip"] == 0
    assert msg.group_update(TOKEN, "Company", "Acme", "$set", {"a": 1}, ip=0)["$ip"] == 0
    assert "$ip" not in msg.profile_update(TOKEN, "u", "$set", {"a": 1})
    assert "ip" not in msg.event(TOKEN, "u", "e")["properties"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (dt.datetime(2020, 1, 1, tzinfo=UTC), 1_577_836_800_000),
        (dt.datetime(2020, 1, 1, 4, tzinfo=dt.timezone(dt.timedelta(hours=4))), 1_577_836_800_000),
        (1_600_000_000.5, 1_600_000_000_500),
        (1_600_000_000, 1_600_000_000),
        (1_600_000_000_123, 1_600_000_000_123),
        (Decimal("1600000000.25"), 1_600_000_000_250),
    ],
)
def test_user_time_override(given: Any, expected: int) -> None:
    record = msg.event(TOKEN, "u", "e", {"time": given})
    assert record["properties"]["time"] == expected
    assert type(record["properties"]["time"]) is int


def test_naive_datetime_time_is_local_time() -> None:
    naive = dt.datetime(2021, 6, 1, 12, 0, 0)
    assert msg.event(TOKEN, "u", "e", {"time": naive})["properties"]["time"] == int(
        naive.timestamp() * 1000
    )


def test_user_insert_id_override_is_kept() -> None:
    record = msg.event(TOKEN, "u", "e", {"$insert_id": "my-Own-id-42"})
    assert record["properties"]["$insert_id"] == "my-Own-id-42"
    assert msg.event(TOKEN, "u", "e", insert_id="fixed-1")["properties"]["$insert_id"] == "fixed-1"


def test_user_properties_override_defaults_in_place() -> None:
    props = msg.event(TOKEN, "u", "e", {"mp_lib": "custom", "distinct_id": 7})["properties"]
    assert props["mp_lib"] == "custom"
    assert props["distinct_id"] == 7
    assert list(props)[:2] == ["token", "distinct_id"]


def test_profile_and_group_shapes() -> None:
    profile = msg.profile_update(
        TOKEN, "u", "$set", {"a": 1}, ip="1.2.3.4", optional_params={"$ignore_time": True}
    )
    assert list(profile) == ["$token", "$time", "$distinct_id", "$set", "$ignore_time", "$ip"]
    group = msg.group_update(TOKEN, "Company", "Acme", "$union", {"tags": ("a", "b")})
    assert list(group) == ["$token", "$time", "$group_key", "$group_id", "$union"]
    assert to_json_value(group)["$union"] == {"tags": ["a", "b"]}


def test_optional_time_override_becomes_ms() -> None:
    record = msg.profile_update(
        TOKEN, "u", "$set", {"a": 1}, optional_params={"$time": dt.datetime(2020, 1, 1, tzinfo=UTC)}
    )
    assert record["$time"] == 1_577_836_800_000


def test_op_values_are_private_copies() -> None:
    given = {"a": 1}
    record = msg.profile_update(TOKEN, "u", "$set", given)
    given["b"] = 2
    assert record["$set"] == {"a": 1}


def test_unset_and_delete_values() -> None:
    assert msg.profile_update(TOKEN, "u", "$unset", "one")["$unset"] == ["one"]
    assert msg.profile_update(TOKEN, "u", "$unset", ("a", "b"))["$unset"] == ["a", "b"]
    assert msg.profile_update(TOKEN, "u", "$delete", None)["$delete"] == ""


def test_charge_transaction_does_not_mutate_and_puts_amount_last() -> None:
    given = {"$time": "2013-01-02T00:00:00", "SKU": "x"}
    transaction = msg.charge_transaction(30.5, given)
    assert given == {"$time": "2013-01-02T00:00:00", "SKU": "x"}
    assert list(transaction) == ["$time", "SKU", "$amount"]
    assert transaction["$amount"] == 30.5
    assert msg.charge_transaction(Decimal("9.99")) == {"$amount": Decimal("9.99")}


def test_alias_and_merge_shapes() -> None:
    assert msg.alias_event(TOKEN, "new", "old") == {
        "event": "$create_alias",
        "properties": {"distinct_id": "old", "alias": "new", "token": TOKEN},
    }
    assert msg.merge_event(TOKEN, "a", 2) == {
        "event": "$merge",
        "properties": {"$distinct_ids": ["a", 2], "token": TOKEN},
    }


def test_infer_kind() -> None:
    assert msg.infer_kind(msg.event(TOKEN, "u", "e")) == "event"
    assert msg.infer_kind(msg.profile_update(TOKEN, "u", "$set", {})) == "profile_update"
    assert msg.infer_kind(msg.group_update(TOKEN, "k", "i", "$set", {})) == "group_update"


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (dt.datetime(2020, 1, 2, 3, 4, 5, 678), "2020-01-02T03:04:05"),
        (dt.datetime(2013, 1, 1, 18, 4, 5, tzinfo=PACIFIC), "2013-01-02T02:04:05"),
        (dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC), "2020-01-02T03:04:05"),
        (dt.date(2020, 1, 2), "2020-01-02"),
        (Decimal("12"), 12),
        (Decimal("12.000"), 12),
        (Decimal("12.5"), 12.5),
        (uuid.UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234-5678-1234-567812345678"),
        (Color.RED, "red"),
        (Color.WHEN, 3),
        ((1, "a"), [1, "a"]),
        (frozenset({"x"}), ["x"]),
        ({"k"}, ["k"]),
        (MappingProxyType({"a": dt.date(2020, 1, 2)}), {"a": "2020-01-02"}),
        (
            {"a": [dt.datetime(2020, 1, 2, tzinfo=PACIFIC), {"b": (Decimal("1.5"), Color.RED)}]},
            {"a": ["2020-01-02T08:00:00", {"b": [1.5, "red"]}]},
        ),
        ("ünï €", "ünï €"),
        (None, None),
        (True, True),
    ],
)
def test_value_conversions(value: Any, expected: Any) -> None:
    converted = to_json_value({"v": value})["v"]
    assert converted == expected
    assert type(converted) is type(expected)


def test_encode_is_compact_utf8_json() -> None:
    assert encode({"a": "é", "b": [1, 2.5]}) == '{"a":"é","b":[1,2.5]}'.encode()


def test_conversions_reach_the_server_through_a_tracker(server: MixpanelServer) -> None:
    with Tracker(TOKEN, Consumer(api_host=server.url)) as tracker:
        assert tracker.people.set(
            "conv-user",
            {
                "when": dt.datetime(2013, 1, 1, 18, 4, 5, tzinfo=PACIFIC),
                "day": dt.date(2020, 1, 2),
                "price": Decimal("9.50"),
                "id": uuid.UUID(int=1),
                "tags": {"one"},
            },
        )
    record = next(r for r in server.profile_updates if r["$distinct_id"] == "conv-user")
    assert record["$set"] == {
        "when": "2013-01-02T02:04:05",
        "day": "2020-01-02",
        "price": 9.5,
        "id": "00000000-0000-0000-0000-000000000001",
        "tags": ["one"],
    }


# --------------------------------------------------------------------------- bad input


def test_every_error_is_a_value_error() -> None:
    assert issubclass(InvalidMessageError, ValueError)


@pytest.mark.parametrize(
    "bad", [_BrokenRepr(), 10**5000, b"x" * 10_000], ids=["broken-repr", "huge-int", "long"]
)
def test_error_messages_survive_unprintable_and_huge_values(bad: Any) -> None:
    for call in (
        lambda: msg.event(TOKEN, "u", bad),
        lambda: msg.profile_update(TOKEN, "u", "$union", {"n": bad}),
        lambda: msg.profile_update(TOKEN, "u", "$add", {"n": str(type(bad))}),
        lambda: msg.event(TOKEN, "u", "e", {bad: 1}),
    ):
        with pytest.raises(InvalidMessageError) as info:
            call()
        assert len(str(info.value)) < 300


@pytest.mark.parametrize("name", ["", "   ", 12, None, b"bytes"])
def test_bad_event_name(name: Any) -> None:
    assert field_of(msg.event, TOKEN, "u", name) == "event"


@pytest.mark.parametrize(
    "distinct_id", [None, 1.5, [], {}, True, False, b"u", "anon", "NULL", " none ", 0, -1, "0"]
)
def test_bad_distinct_id(distinct_id: Any) -> None:
    assert field_of(msg.event, TOKEN, distinct_id, "e") == "distinct_id"
    assert field_of(msg.profile_update, TOKEN, distinct_id, "$set", {}) == "distinct_id"


def test_an_empty_distinct_id_is_an_event_without_a_user_but_not_a_profile() -> None:
    """Mixpanel takes events with ``distinct_id: ""`` (it keeps them out of behavioural
    analysis); a profile needs an id."""
    assert msg.event(TOKEN, "", "e")["properties"]["distinct_id"] == ""
    assert field_of(msg.profile_update, TOKEN, "", "$set", {}) == "distinct_id"


@pytest.mark.parametrize("properties", [[("a", 1)], [], "", 0, "props", 5])
def test_properties_must_be_a_mapping(properties: Any) -> None:
    assert field_of(msg.event, TOKEN, "u", "e", properties) == "properties"


@pytest.mark.parametrize("key", [1, None, ("a",), b"k"])
def test_property_names_must_be_strings(key: Any) -> None:
    assert field_of(msg.event, TOKEN, "u", "e", {key: 1}) == "properties"
    assert field_of(msg.profile_update, TOKEN, "u", "$set", {key: 1}) == "$set"


def test_property_count_limit() -> None:
    defaults = 6  # token, distinct_id, time, $insert_id, mp_lib, $lib_version
    fits = {f"p{i}": i for i in range(msg.MAX_PROPERTIES - 1 - defaults)}
    assert len(msg.event(TOKEN, "u", "e", fits)["properties"]) == msg.MAX_PROPERTIES - 1
    too_many = {**fits, "one_more": 1}
    with pytest.raises(InvalidMessageError) as info:
        msg.event(TOKEN, "u", "e", too_many)
    assert info.value.field == "properties"
    assert "255" in info.value.reason


@pytest.mark.parametrize(
    "insert_id", ["x" * 37, "has_underscore", "has space", "", "ünï", 123, None, "a/b"]
)
def test_bad_insert_id(insert_id: Any) -> None:
    assert (
        field_of(msg.event, TOKEN, "u", "e", {"$insert_id": insert_id}) == "properties.$insert_id"
    )


def test_insert_id_limits_accept_36_chars() -> None:
    assert msg.event(TOKEN, "u", "e", {"$insert_id": "a-" * 18})["properties"]["$insert_id"]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_at_top_level(value: float) -> None:
    assert field_of(msg.event, TOKEN, "u", "e", {"score": value}) == "properties.score"
    assert field_of(msg.profile_update, TOKEN, "u", "$set", {"score": value}) == "$set.score"


@pytest.mark.parametrize(
    "value", [object(), b"raw", 1j, dt.time(12, 0), dt.timedelta(1), Fraction(1, 3), print]
)
def test_unknown_value_types_at_top_level(value: Any) -> None:
    with pytest.raises(InvalidMessageError) as info:
        msg.event(TOKEN, "u", "e", {"thing": value})
    assert info.value.field == "properties.thing"
    assert type(value).__name__ in info.value.reason


@pytest.mark.parametrize("value", ["1", None, True, [1], math.nan])
def test_add_needs_numbers(tracker: Tracker, value: Any) -> None:
    with pytest.raises(InvalidMessageError) as info:
        tracker.people.increment("u", {"Logins": value})
    assert info.value.field in ("$add.Logins", "$add")


@pytest.mark.parametrize("value", ["x", 1, None, {"a": 1}])
def test_union_needs_lists(tracker: Tracker, value: Any) -> None:
    assert field_of(tracker.people.union, "u", {"tags": value}) == "$union.tags"
    assert field_of(tracker.groups.union, "Company", "Acme", {"tags": value}) == "$union.tags"


@pytest.mark.parametrize("names", [[1], ["ok", None], [], {"a": 1}, 5, None])
def test_unset_needs_property_names(tracker: Tracker, names: Any) -> None:
    assert field_of(tracker.people.unset, "u", names) == "$unset"
    assert field_of(tracker.groups.unset, "Company", "Acme", names) == "$unset"


@pytest.mark.parametrize(
    "amount", ["9.99", None, True, math.nan, math.inf, Decimal("NaN"), Decimal("sNaN")]
)
def test_bad_amount(tracker: Tracker, amount: Any) -> None:
    assert field_of(tracker.people.track_charge, "u", amount) == "amount"


@pytest.mark.parametrize("token", ["", "  ", None, 5])
def test_missing_token(token: Any) -> None:
    assert field_of(msg.event, token, "u", "e") == "token"
    assert field_of(msg.profile_update, token, "u", "$set", {}) == "token"
    assert field_of(msg.group_update, token, "k", "i", "$set", {}) == "token"
    assert field_of(msg.alias_event, token, "a", "b") == "token"


def test_tracker_needs_a_token() -> None:
    with pytest.raises(ConfigurationError, match="token"):
        Tracker(None, lambda kind, message: None)
    with pytest.raises(ConfigurationError, match="token"):
        Tracker("  ", lambda kind, message: None)


@pytest.mark.parametrize(
    "time_value",
    ["yesterday", None, True, -1.5, math.nan, Decimal("sNaN"), dt.datetime.min, [1]],
)
def test_bad_time_override(time_value: Any) -> None:
    assert field_of(msg.event, TOKEN, "u", "e", {"time": time_value}) == "properties.time"


def test_other_named_fields(tracker: Tracker) -> None:
    assert field_of(tracker.track, "u", "e", ip=1.5) == "ip"
    assert field_of(tracker.people.set, "u", {"a": 1}, None, ["$ignore_time"]) == "optional_params"
    assert field_of(tracker.people.set, "u", {"a": 1}, None, {"$time": "now"}) == (
        "optional_params.$time"
    )
    assert field_of(tracker.people.set, "u", "not a mapping") == "$set"
    assert field_of(tracker.groups.set, "", "Acme", {"a": 1}) == "group_key"
    assert field_of(tracker.groups.set, "Company", None, {"a": 1}) == "group_id"
    assert field_of(tracker.alias, None, "real") == "alias_id"
    assert field_of(tracker.alias, "alias", 1.5) == "real_id"
    assert field_of(tracker.merge, "a", None) == "distinct_id2"
    assert field_of(msg.profile_update, TOKEN, "u", "$bogus", {}) == "$bogus"
    assert field_of(msg.group_update, TOKEN, "k", "i", "$add", {"a": 1}) == "$add"
    assert field_of(msg.group_update, TOKEN, "k", "i", "$append", {"a": 1}) == "$append"


def test_tracker_raises_at_the_call_and_sends_nothing(
    tracker: Tracker, captured: list[Any]
) -> None:
    with pytest.raises(InvalidMessageError):
        tracker.track("anon", "Signed Up")
    with pytest.raises(InvalidMessageError):
        tracker.track("u", "Signed Up", {"bad": object()})
    with pytest.raises(InvalidMessageError, match="5 days"):
        tracker.track("u", "Signed Up", {"time": 1_600_000_000})
    assert captured == []


@pytest.mark.parametrize(
    ("record", "path"),
    [
        ({"properties": {"a": {"b": [1, 2, object()]}}}, "message.properties.a.b[2]"),
        ({"properties": {"a": [{"x": math.nan}]}}, "message.properties.a[0].x"),
        ({"properties": {"a": {"b": Decimal("Infinity")}}}, "message.properties.a.b"),
        ({"properties": {"a": ["ok", "bad \ud800"]}}, "message.properties.a[1]"),
        ({"properties": {"a": {("t",): 1}}}, "message.properties.a"),
        ({"properties": {"a": (1, {"b": b"x"})}}, "message.properties.a[1].b"),
        ({"$set": {"n": [10**5000]}}, "message.$set.n[0]"),
        ({"$set": {"n": Color.WHEN, "m": {"deep": dt.time(1)}}}, "message.$set.m.deep"),
    ],
)
def test_encode_errors_name_the_nested_path(record: dict[str, Any], path: str) -> None:
    with pytest.raises(InvalidMessageError) as info:
        encode(record)
    assert info.value.field == path


def test_encode_refuses_cycles_and_excessive_nesting() -> None:
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    with pytest.raises(InvalidMessageError, match="nested deeper"):
        encode({"properties": cyclic})
    deep: Any = "leaf"
    for _ in range(100_000):  # deeper than any interpreter's JSON encoder goes
        deep = [deep]
    with pytest.raises(InvalidMessageError, match="nested deeper"):
        encode({"properties": {"deep": deep}})


def test_nested_error_through_a_consumer_names_the_path(server: MixpanelServer) -> None:
    with Tracker(TOKEN, Consumer(api_host=server.url)) as tracker:
        before = len(server.requests)
        with pytest.raises(InvalidMessageError) as info:
            tracker.track("u", "e", {"a": {"b": [1, 2, object()]}})
        assert info.value.field.endswith("properties.a.b[2]")
        assert len(server.requests) == before


def test_callable_sink_gets_the_nested_error_at_the_call() -> None:
    sink = CallableSink(lambda kind, message: None)
    record = {"event": "e", "properties": {"token": TOKEN, "a": [{"b": math.inf}]}}
    with pytest.raises(InvalidMessageError) as info:
        sink.send("event", record)
    assert info.value.field == "message.properties.a[0].b"


# --------------------------------------------------------------------------- properties

RESERVED = {"time", "$insert_id", "distinct_id", "token"}

json_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text
)


def object_depth(value: Any) -> int:
    """How deep objects nest in a value (lists do not count)."""
    if isinstance(value, dict):
        return 1 + max((object_depth(inner) for inner in value.values()), default=0)
    if isinstance(value, list):
        return max((object_depth(inner) for inner in value), default=0)
    return 0


json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(json_text, children, max_size=4)
    ),
    max_leaves=12,
).filter(lambda value: object_depth(value) <= 3)  # Mixpanel refuses deeper objects
property_dicts = st.dictionaries(
    json_text.filter(lambda key: key not in RESERVED), json_values, max_size=12
)


def canonical(value: Any) -> str:
    """JSON text that tells ``True`` from ``1`` and ``1.0`` from ``1``."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


@pytest.fixture(scope="module")
def round_trip_tracker(server: MixpanelServer) -> Iterator[Tracker]:
    with Tracker(TOKEN, Consumer(api_host=server.url)) as tracker:
        yield tracker


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(properties=property_dicts)
def test_json_properties_round_trip_through_the_server(
    server: MixpanelServer, round_trip_tracker: Tracker, properties: dict[str, Any]
) -> None:
    insert_id = msg.new_insert_id()
    sent = {**properties, "$insert_id": insert_id}
    assert round_trip_tracker.track("prop-user", "Round Trip", sent)
    arrived = next(
        event
        for event in reversed(server.events)
        if event["properties"].get("$insert_id") == insert_id
    )
    received = dict(arrived["properties"])
    for key in ("token", "distinct_id", "time", "$insert_id"):
        received.pop(key)
    expected = {"mp_lib": "mp_logbridge", "$lib_version": __version__, **properties}
    assert canonical(received) == canonical(expected)


class _Weird:
    def __repr__(self) -> str:
        return "<weird>"


WeirdEnum = enum.Enum("WeirdEnum", {"OBJ": _Weird(), "NUM": 1.5})

anything_scalar = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**4300, max_value=10**4302)
    | st.floats()
    | st.text()
    | st.binary(max_size=4)
    | st.complex_numbers()
    | st.decimals()
    | st.fractions()
    | st.datetimes()
    | st.datetimes(timezones=st.timezones())
    | st.dates()
    | st.times()
    | st.timedeltas()
    | st.uuids()
    | st.sampled_from(list(Color) + list(WeirdEnum))
    | st.builds(object)
    | st.builds(_Weird)
    | st.builds(_BrokenRepr)
    | st.just(print)
    | st.just(int)
    | st.just(Ellipsis)
)
anything = st.recursive(
    anything_scalar,
    lambda children: (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.frozensets(st.integers() | st.text(max_size=3), max_size=3)
        | st.dictionaries(st.text(max_size=5) | st.integers() | st.none(), children, max_size=3)
        | st.dictionaries(st.text(max_size=5), children, max_size=3).map(MappingProxyType)
    ),
    max_leaves=8,
)
ops = st.sampled_from([*msg.PROFILE_OPS, "$add", "$bogus", "", None])


@settings(max_examples=150, deadline=None)
@given(
    token=st.one_of(st.just(TOKEN), anything),
    distinct_id=anything,
    name=anything,
    properties=anything,
    ip=anything,
    op=ops,
    value=anything,
    optional=anything,
    amount=anything,
)
def test_builders_raise_only_invalid_message_error(
    token: Any,
    distinct_id: Any,
    name: Any,
    properties: Any,
    ip: Any,
    op: Any,
    value: Any,
    optional: Any,
    amount: Any,
) -> None:
    attempts = [
        lambda: msg.event(token, distinct_id, name, properties, ip=ip),
        lambda: msg.event(TOKEN, "u", "e", properties),
        lambda: msg.event(TOKEN, "u", "e", {"time": value, "x": value}),
        lambda: msg.profile_update(token, distinct_id, op, value, ip=ip, optional_params=optional),
        lambda: msg.group_update(token, name, distinct_id, op, value, optional_params=optional),
        lambda: {"t": msg.charge_transaction(amount, properties)},
        lambda: msg.alias_event(token, distinct_id, name),
        lambda: msg.merge_event(token, distinct_id, name),
        lambda: {"v": value, "p": properties},
    ]
    for attempt in attempts:
        try:
            record = attempt()
            encode(record)
            to_json_value(record)
        except InvalidMessageError:
            pass


@settings(max_examples=75, deadline=None)
@given(distinct_id=anything, name=anything, properties=anything, value=anything, amount=anything)
def test_tracker_methods_raise_only_invalid_message_error(
    distinct_id: Any, name: Any, properties: Any, value: Any, amount: Any
) -> None:
    received: list[Any] = []
    tracker = Tracker(TOKEN, lambda kind, message: received.append(message))
    calls = [
        lambda: tracker.track(distinct_id, name, properties),
        lambda: tracker.people.set(distinct_id, properties, value),
        lambda: tracker.people.increment(distinct_id, properties),
        lambda: tracker.people.union(distinct_id, properties),
        lambda: tracker.people.unset(distinct_id, value),
        lambda: tracker.people.track_charge(distinct_id, amount, properties),
        lambda: tracker.groups.set(name, distinct_id, properties),
        lambda: tracker.groups.remove(name, distinct_id, value),
    ]
    for call in calls:
        try:
            assert call() is True
        except InvalidMessageError:
            pass
    for message in received:
        json.dumps(message, allow_nan=False)

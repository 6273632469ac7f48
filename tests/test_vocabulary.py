"""One vocabulary: every profile and group operation gives the same record, with the same
signature and the same errors, through the Tracker and through the tag builders."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from mp_logbridge import InvalidMessageError, MixpanelHandler, Tracker, tag
from mp_logbridge._vocabulary import GROUPS, PEOPLE, Operation
from mp_logbridge.testing import Capture, capture_messages

TOKEN = "vocabulary-token"

SAMPLES: dict[str, Any] = {
    "properties": {"plan": "pro", "seats": 3, "tags": ["a", "b"]},
    "property_name": "logins",
    "amount": Decimal("9.99"),
}
# Operations whose ``properties`` have a shape of their own.
SHAPED = {"unset": ["plan", "seats"], "union": {"tags": ["c"]}, "increment": {"seats": 2}}


def _arguments(operation: Operation) -> tuple[Any, ...]:
    values = []
    for name in operation.arguments:
        if name == "properties" and operation.name in SHAPED:
            values.append(SHAPED[operation.name])
        elif name == "properties" and operation.name == "track_charge":
            values.append({"$time": "2026-01-02T03:04:05", "sku": "x1"})
        else:
            values.append(SAMPLES[name])
    return tuple(values)


def _without_time(record: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key != "$time"}


@pytest.fixture
def log() -> Any:
    handler = MixpanelHandler(TOKEN, consumer=lambda kind, message: None)
    logger = logging.getLogger("tests.vocabulary")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    yield logger
    logger.removeHandler(handler)
    handler.close()


def _through_tracker(call: Callable[[Tracker], Any]) -> Capture:
    tracker = Tracker(TOKEN)
    with capture_messages() as captured:
        call(tracker)
    return captured


def _through_tag(log: logging.Logger, extra: Any) -> Capture:
    handler = MixpanelHandler(TOKEN, flush_interval=60)
    log.addHandler(handler)
    try:
        with capture_messages() as captured:
            log.info("vocabulary", extra=extra)
            handler.flush(5)
    finally:
        log.removeHandler(handler)
        handler.close()
    return captured


@pytest.mark.parametrize("name", list(PEOPLE))
def test_every_people_operation_gives_the_same_record(name: str, log: logging.Logger) -> None:
    operation = PEOPLE[name]
    args = _arguments(operation)
    extra: dict[str, Any] = {"optional_params": {"$ignore_time": True}}
    if operation.takes_ip:
        extra["ip"] = 0
    tracked = _through_tracker(lambda t: getattr(t.people, name)("u1", *args, **extra))
    tagged = _through_tag(log, getattr(tag.people, name)(*args, distinct_id="u1", **extra))
    [(kind_a, record_a)] = [(m.kind, m.record) for m in tracked]
    [(kind_b, record_b)] = [(m.kind, m.record) for m in tagged]
    assert kind_a == kind_b == "profile_update"
    assert _without_time(record_a) == _without_time(record_b)
    assert list(record_a) == list(record_b)  # the same key order on the wire
    assert record_a[operation.operator] is not None


@pytest.mark.parametrize("name", list(GROUPS))
def test_every_group_operation_gives_the_same_record(name: str, log: logging.Logger) -> None:
    operation = GROUPS[name]
    args = _arguments(operation)
    extra: dict[str, Any] = {"optional_params": {"$ignore_time": True}}
    if operation.takes_ip:
        extra["ip"] = "203.0.113.9"
    tracked = _through_tracker(lambda t: getattr(t.groups, name)("Company", "Acme", *args, **extra))
    tagged = _through_tag(log, getattr(tag.groups, name)("Company", "Acme", *args, **extra))
    [record_a] = tracked.records("group_update")
    [record_b] = tagged.records("group_update")
    assert _without_time(record_a) == _without_time(record_b)
    assert list(record_a) == list(record_b)


def _own_parameters(method: Callable[..., Any], identity: int) -> list[tuple[str, Any]]:
    parameters = list(inspect.signature(method).parameters.values())[identity:]
    return [(p.name, p.default) for p in parameters if p.name != "distinct_id"]


@pytest.mark.parametrize(("scope", "table"), [("people", PEOPLE), ("groups", GROUPS)])
def test_signatures_follow_the_table(scope: str, table: dict[str, Operation]) -> None:
    tracker_side = getattr(Tracker(TOKEN, lambda kind, message: None), scope)
    tag_side = getattr(tag, scope)
    identity = 1 if scope == "people" else 2
    public = {n for n in dir(tracker_side) if not n.startswith("_")} - {"update"}
    assert public == set(table)
    assert {n for n in dir(tag_side) if not n.startswith("_")} == set(table)
    for name, operation in table.items():
        expected = [name_ for name_ in operation.arguments]
        if operation.takes_ip:
            expected.append("ip")
        expected.append("optional_params")
        tracker_params = _own_parameters(getattr(tracker_side, name), identity)
        tag_params = _own_parameters(getattr(tag_side, name), 0 if scope == "people" else 2)
        assert [p for p, _ in tracker_params] == expected, name
        assert [p for p, _ in tag_params] == expected, name
        defaults = dict(
            zip(reversed(operation.arguments), reversed(operation.defaults), strict=False)
        )
        for param, default in tracker_params + tag_params:
            if param in defaults:
                assert default == defaults[param], (name, param)


BAD_PEOPLE: list[tuple[str, tuple[Any, ...]]] = [
    ("set", ("x",)),
    ("set", ({"a": float("nan")},)),
    ("set", ({1: "a"},)),
    ("increment", ({"a": "1"},)),
    ("union", ({"a": "not a list"},)),
    ("unset", ([1],)),
    ("plus_one", (5,)),
    ("track_charge", ("abc",)),
    ("track_charge", (float("inf"),)),
    ("track_charge", (5, "not a mapping")),
]


@pytest.mark.parametrize(("name", "args"), BAD_PEOPLE)
def test_tags_refuse_what_the_tracker_refuses_with_the_same_words(
    name: str, args: tuple[Any, ...]
) -> None:
    tracker = Tracker(TOKEN, lambda kind, message: None)
    with pytest.raises(InvalidMessageError) as from_tracker:
        getattr(tracker.people, name)("u1", *args)
    with pytest.raises(InvalidMessageError) as from_tag:
        getattr(tag.people, name)(*args, distinct_id="u1")
    assert str(from_tag.value) == str(from_tracker.value)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: tag.charge("abc", distinct_id="u"), "amount"),
        (lambda: tag.people.set("x"), "$set"),
        (lambda: tag.track("E", properties=[1, 2]), "properties"),  # type: ignore[arg-type]
        (lambda: tag.track("", distinct_id="u"), "event"),
        (lambda: tag.track("E", distinct_id=1.5), "distinct_id"),  # type: ignore[arg-type]
        (lambda: tag.groups.set("", "Acme", {}), "group_key"),
        (lambda: tag.people.set({"a": 1}, ip=[1]), "ip"),  # type: ignore[arg-type]
        (lambda: tag.track("E", when=object()), "properties.when"),
    ],
)
def test_tag_builders_raise_the_librarys_error_at_the_call(
    call: Callable[[], Any], field: str
) -> None:
    with pytest.raises(InvalidMessageError) as info:
        call()
    assert info.value.field == field

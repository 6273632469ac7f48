"""Mixpanel records: the one module that knows their exact shapes.

Every front door (Tracker, log handler, structlog processor, decorator, importer) builds its
records with these functions, so an event looks the same whichever way it was produced:

* event: ``{"event": name, "properties": {"token", "distinct_id", "time", "$insert_id",
  "mp_lib", "$lib_version", ...}}`` with ``time`` in integer milliseconds;
* profile update: ``{"$token", "$time", "$distinct_id", "<op>": value, ...optional, "$ip"}``;
* group update: ``{"$token", "$time", "$group_key", "$group_id", "<op>": value, ...}``.

Building is pure apart from the clock and the ``$insert_id`` generator, does no I/O, and does
only cheap structural checks; values are converted and fully checked when the record is encoded
(:mod:`mp_logbridge._values`), on the sender thread.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import math
import os
import re
import time as _time
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Protocol

from ._diagnostics import warn
from ._errors import InvalidMessageError
from ._values import describe, snapshot_mapping
from ._version import __version__

__all__ = [
    "BLOCKED_DISTINCT_IDS",
    "GROUP_OPS",
    "KINDS",
    "LIB_NAME",
    "MAX_PROPERTIES",
    "MAX_RECORD_BYTES",
    "PROFILE_OPS",
    "SECONDS_LIMIT",
    "MessageSource",
    "alias_event",
    "as_seconds",
    "charge_transaction",
    "check_distinct_id",
    "check_id",
    "check_ip",
    "check_name",
    "check_track_time",
    "checked_event",
    "checked_mapping",
    "clean_token",
    "event",
    "event_time_ms",
    "group_update",
    "infer_kind",
    "merge_event",
    "new_insert_id",
    "now_ms",
    "operation_value",
    "profile_update",
]

#: Value of the ``mp_lib`` event property.
LIB_NAME = "mp_logbridge"
#: Mixpanel keeps fewer than this many properties per event.
MAX_PROPERTIES = 255
#: An encoded record must stay under this size (Mixpanel: "under 1 MB").
MAX_RECORD_BYTES = 1_000_000
#: The kinds of message a consumer accepts (the Ruby SDK's message types, plus ``merge``: a
#: ``$merge`` event, sent to ``/import`` on its own, without ``strict``, as the official SDKs do).
KINDS = ("event", "profile_update", "group_update", "import", "merge")
#: Profile update operations, in the order Mixpanel documents them.
PROFILE_OPS = ("$set", "$set_once", "$add", "$append", "$union", "$remove", "$unset", "$delete")
#: Group update operations (groups have no ``$add``/``$append``).
GROUP_OPS = ("$set", "$set_once", "$union", "$remove", "$unset", "$delete")

_PROFILE_OP_SET = frozenset(PROFILE_OPS)
_INSERT_ID = re.compile(r"[A-Za-z0-9-]{1,36}")
#: Below this a timestamp is in seconds, at or above it in milliseconds (the year 5138).
SECONDS_LIMIT = 100_000_000_000
#: ``/track`` keeps events of the last 5 days, and none more than an hour in the future.
TRACK_WINDOW = 5 * 86_400
FUTURE_SLACK = 3_600


class MessageSource(Protocol):
    """Something a consumer can turn into a Mixpanel record on its sender thread.

    Front doors that want the caller's thread to pay only for capture hand consumers an object
    with a ``build()`` method instead of a finished record; the consumer calls it where the
    encoding happens. ``build`` raises :class:`~mp_logbridge.InvalidMessageError` when the
    captured input cannot become a record.
    """

    def build(self) -> dict[str, Any]: ...


# --------------------------------------------------------------------------- clock and ids


def now_ms() -> int:
    """The current time in integer milliseconds since the epoch."""
    return _time.time_ns() // 1_000_000


class _InsertIds:
    """Cheap unique ``$insert_id`` values: a random per-process prefix plus a counter.

    The prefix is replaced in a forked child — by the fork hook, and by the background worker
    when it notices a child forked without hooks — so parent and child never share a series.
    """

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new series (a new random prefix)."""
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):x}"


#: Return a new ``$insert_id`` (at most 36 characters, hex digits only).
new_insert_id = _InsertIds()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=new_insert_id.reset)


def event_time_ms(value: Any, field: str = "properties.time") -> int:
    """Normalise an event time given by a caller.

    ``datetime`` → milliseconds (naive values are local time, as ``datetime.timestamp`` reads
    them); ``int`` → taken as given (Mixpanel accepts seconds or milliseconds); ``float`` seconds
    → integer milliseconds.
    """
    if isinstance(value, _dt.datetime):
        try:
            return int(value.timestamp() * 1000)
        except (OverflowError, ValueError, OSError):  # e.g. datetime.min in local time
            raise InvalidMessageError(field, f"{describe(value)} is not a valid time") from None
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise InvalidMessageError(
            field,
            f"must be a datetime or a number of seconds or milliseconds, got {describe(value)}",
        )
    if isinstance(value, int):
        return value
    number = float(value) if _is_finite(value) else math.nan
    if not math.isfinite(number) or number < 0:
        raise InvalidMessageError(field, f"{describe(value)} is not a valid time")
    return int(number * 1000) if number < SECONDS_LIMIT else int(number)


def as_seconds(value: float) -> float:
    """An event time in seconds, whether it was given in seconds or in milliseconds."""
    return value / 1000 if value >= SECONDS_LIMIT else float(value)


def check_track_time(time_value: int, field: str = "properties.time") -> None:
    """Refuse an event time ``/track`` would drop without a word: more than 5 days old (send it
    with ``import_event``) or more than an hour in the future."""
    age = _time.time() - as_seconds(time_value)
    if age > TRACK_WINDOW:
        raise InvalidMessageError(
            field,
            "is more than 5 days old: /track drops such events without a word; send it to "
            "/import (Tracker.import_event)",
        )
    if age < -FUTURE_SLACK:
        raise InvalidMessageError(field, "is more than an hour in the future")


# --------------------------------------------------------------------------- checks


def _is_finite(number: int | float | Decimal) -> bool:
    """Whether a number can be sent (``float()`` of a signalling-NaN ``Decimal`` would raise)."""
    if isinstance(number, Decimal):
        return number.is_finite()
    return isinstance(number, int) or math.isfinite(number)


def clean_token(token: str, owner: str) -> str:
    """``token`` without surrounding whitespace (a newline read from an env file, say): Mixpanel
    would refuse it as given. Stripping it is reported once, naming ``owner``."""
    stripped = token.strip()
    if stripped != token:
        warn(
            "%s: the Mixpanel token has surrounding whitespace (a newline from an env file?); "
            "it is used without it",
            owner,
        )
    return stripped


def check_token(token: Any) -> str:
    if not isinstance(token, str) or not token.strip():
        raise InvalidMessageError(
            "token", "a Mixpanel project token (non-empty string) is required"
        )
    return token


#: ``distinct_id`` values Mixpanel refuses as placeholders (compared case-insensitively).
BLOCKED_DISTINCT_IDS = frozenset(
    {
        "00000000-0000-0000-0000-000000000000",
        "anon",
        "anonymous",
        "nil",
        "none",
        "null",
        "n/a",
        "na",
        "undefined",
        "unknown",
        "<nil>",
        "0",
        "-1",
        "true",
        "false",
        "[]",
        "{}",
    }
)


def check_id(value: Any, field: str) -> Any:
    """``value`` when it can be an id (a group's): a non-empty string or an integer."""
    if type(value) is str and value:
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidMessageError(field, f"must be a string or an integer, got {describe(value)}")
    if isinstance(value, str):
        raise InvalidMessageError(field, "must not be empty")
    return value


def check_distinct_id(value: Any, field: str, *, allow_empty: bool = False) -> Any:
    """``value`` when it can be a user's id: a string or an integer, not one of the placeholders
    Mixpanel refuses (``"anon"``, ``"null"``, ``0``, ``-1``, ...), not empty (an event may say
    ``allow_empty``: Mixpanel keeps it out of behavioural analysis)."""
    if type(value) is str and value:
        if len(value) <= 36 and value.strip().lower() in BLOCKED_DISTINCT_IDS:
            raise InvalidMessageError(
                field, f"{value!r} is a placeholder Mixpanel refuses as a user's id"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidMessageError(field, f"must be a string or an integer, got {describe(value)}")
    if isinstance(value, str):
        if not value and not allow_empty:
            raise InvalidMessageError(field, "must not be empty")
        return value
    if value in (0, -1):
        raise InvalidMessageError(
            field, f"{value} is a placeholder Mixpanel refuses as a user's id"
        )
    return value


def check_name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidMessageError(field, f"must be a non-empty string, got {describe(value)}")
    return value


def check_insert_id(value: Any, field: str = "properties.$insert_id") -> None:
    if type(value) is str and len(value) <= 36 and value.isascii() and value.isalnum():
        return  # the common case (hex ids) without the regular expression
    if not isinstance(value, str) or _INSERT_ID.fullmatch(value) is None:
        raise InvalidMessageError(
            field, f"must be 1-36 characters of letters, digits or '-', got {describe(value)}"
        )


def checked_mapping(value: Any, field: str) -> dict[str, Any]:
    """A checked private copy of a mapping given by a caller (later changes to it are not sent)."""
    if type(value) is not dict and not isinstance(value, Mapping):
        raise InvalidMessageError(field, f"must be a mapping, got {type(value).__name__}")
    return snapshot_mapping(value, field)[0]


def check_ip(value: Any, field: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidMessageError(
            field, f"must be an IP address string or 0, got {describe(value)}"
        )
    return value


def check_count(record_properties: Mapping[str, Any], field: str) -> None:
    if len(record_properties) >= MAX_PROPERTIES:
        raise InvalidMessageError(
            field,
            f"has {len(record_properties)} properties; Mixpanel keeps fewer than {MAX_PROPERTIES}",
        )


def operation_value(op: str, value: Any, kind: str = "profile_update") -> Any:
    """Check the value of one profile (or, with ``kind="group_update"``, group) operation and
    return a private copy of it.

    Raises:
        InvalidMessageError: naming the operation (and the property) and why.
    """
    allowed = GROUP_OPS if kind == "group_update" else PROFILE_OPS
    if op not in allowed:
        raise InvalidMessageError(op, f"unknown operation; expected one of {', '.join(allowed)}")
    if op == "$delete":
        return ""
    if op == "$unset":
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, (list, tuple, set, frozenset)) or not names:
            raise InvalidMessageError(op, "must be a property name or a non-empty list of them")
        for name in names:
            if not isinstance(name, str):
                raise InvalidMessageError(
                    op, f"property names must be strings, got {describe(name)}"
                )
        return list(names)
    mapping = checked_mapping(value, op)
    if op == "$add":
        for key, number in mapping.items():
            if isinstance(number, bool) or not isinstance(number, (int, float, Decimal)):
                raise InvalidMessageError(
                    f"{op}.{key}", f"must be a number, got {describe(number)}"
                )
    elif op == "$union":
        for key, items in mapping.items():
            if not isinstance(items, list):  # the snapshot made every sequence a list
                raise InvalidMessageError(f"{op}.{key}", f"must be a list, got {describe(items)}")
    return mapping


def _apply_params(
    record: dict[str, Any], ip: Any, optional_params: Mapping[str, Any] | None
) -> dict[str, Any]:
    if optional_params is not None:
        params = checked_mapping(optional_params, "optional_params")
        record.update(params)
        if "$time" in params:
            record["$time"] = event_time_ms(params["$time"], "optional_params.$time")
    if ip is not None:
        record["$ip"] = check_ip(ip, "ip")
    return record


# --------------------------------------------------------------------------- builders


def event(
    token: str,
    distinct_id: str | int,
    name: str,
    properties: Mapping[str, Any] | None = None,
    *,
    ip: str | int | None = None,
    time_ms: int | None = None,
    insert_id: str | None = None,
    for_track: bool = False,
) -> dict[str, Any]:
    """Build an event record (for ``/track``, or ``/import`` with a historical ``time``;
    ``for_track`` refuses a ``time`` that ``/track`` would drop).

    ``properties`` may override every default, ``time`` (a datetime or seconds/milliseconds)
    and ``$insert_id`` included. ``ip`` becomes the ``ip`` property (``0`` means "do not
    geolocate" and is kept).
    """
    props: dict[str, Any] = {
        "token": check_token(token),
        "distinct_id": distinct_id,
        "time": now_ms() if time_ms is None else time_ms,
        "$insert_id": "",
        "mp_lib": LIB_NAME,
        "$lib_version": __version__,
    }
    check_name(name, "event")
    if properties is not None:
        given = checked_mapping(properties, "properties")
        props.update(given)
        if "time" in given:
            props["time"] = event_time_ms(given["time"])
            if for_track:
                check_track_time(props["time"])
        if "$insert_id" in given:
            check_insert_id(given["$insert_id"])
    if not props["$insert_id"]:
        if insert_id is None:
            props["$insert_id"] = new_insert_id()
        else:
            check_insert_id(insert_id, "$insert_id")
            props["$insert_id"] = insert_id
    check_distinct_id(props["distinct_id"], "distinct_id", allow_empty=True)
    if ip is not None:
        props["ip"] = check_ip(ip, "ip")
    check_count(props, "properties")
    return {"event": name, "properties": props}


def checked_event(
    token: str,
    distinct_id: Any,
    name: Any,
    properties: dict[str, Any],
    time_ms: int,
    insert_id: str,
) -> dict[str, Any]:
    """:func:`event` for properties already checked and copied (captured with
    :func:`~mp_logbridge._values.snapshot`): the library's own path, with nothing walked again.
    ``token`` and ``insert_id`` are the library's own (checked when made)."""
    if type(name) is not str or not name:
        check_name(name, "event")
    if type(distinct_id) is not str or not distinct_id or len(distinct_id) <= 36:
        check_distinct_id(distinct_id, "distinct_id", allow_empty=True)
    props: dict[str, Any] = {
        "token": token,
        "distinct_id": distinct_id,
        "time": time_ms,
        "$insert_id": insert_id,
        "mp_lib": LIB_NAME,
        "$lib_version": __version__,
    }
    if properties:
        props.update(properties)
        if "time" in properties:
            props["time"] = event_time_ms(properties["time"])
            check_track_time(props["time"])
        if "$insert_id" in properties:
            check_insert_id(properties["$insert_id"])
        if "distinct_id" in properties:
            check_distinct_id(props["distinct_id"], "distinct_id")
        if len(props) >= MAX_PROPERTIES:
            check_count(props, "properties")
    return {"event": name, "properties": props}


def profile_update(
    token: str,
    distinct_id: str | int,
    op: str,
    value: Any,
    *,
    ip: str | int | None = None,
    optional_params: Mapping[str, Any] | None = None,
    time_ms: int | None = None,
) -> dict[str, Any]:
    """Build a user-profile update record (for ``/engage``)."""
    record: dict[str, Any] = {
        "$token": check_token(token),
        "$time": now_ms() if time_ms is None else time_ms,
        "$distinct_id": check_distinct_id(distinct_id, "distinct_id"),
        op: operation_value(op, value, "profile_update"),
    }
    return _apply_params(record, ip, optional_params)


def group_update(
    token: str,
    group_key: str,
    group_id: str | int,
    op: str,
    value: Any,
    *,
    ip: str | int | None = None,
    optional_params: Mapping[str, Any] | None = None,
    time_ms: int | None = None,
) -> dict[str, Any]:
    """Build a group-profile update record (for ``/groups``)."""
    record: dict[str, Any] = {
        "$token": check_token(token),
        "$time": now_ms() if time_ms is None else time_ms,
        "$group_key": check_name(group_key, "group_key"),
        "$group_id": check_id(group_id, "group_id"),
        op: operation_value(op, value, "group_update"),
    }
    return _apply_params(record, ip, optional_params)


def charge_transaction(amount: Any, properties: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``$transactions`` entry of a revenue charge; never mutates ``properties``."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float, Decimal)):
        raise InvalidMessageError("amount", f"must be a number, got {describe(amount)}")
    if not _is_finite(amount):
        raise InvalidMessageError("amount", f"{describe(amount)} is not a valid amount")
    transaction = {} if properties is None else checked_mapping(properties, "properties")
    transaction["$amount"] = amount
    return transaction


def alias_event(token: str, alias_id: str | int, real_id: str | int) -> dict[str, Any]:
    """The ``$create_alias`` event, shaped as both official SDKs send it."""
    return {
        "event": "$create_alias",
        "properties": {
            "distinct_id": check_distinct_id(real_id, "real_id"),
            "alias": check_distinct_id(alias_id, "alias_id"),
            "token": check_token(token),
        },
    }


def merge_event(token: str, distinct_id1: str | int, distinct_id2: str | int) -> dict[str, Any]:
    """The ``$merge`` event (sent to ``/import``), shaped as the official Python SDK sends it."""
    return {
        "event": "$merge",
        "properties": {
            "$distinct_ids": [
                check_distinct_id(distinct_id1, "distinct_id1"),
                check_distinct_id(distinct_id2, "distinct_id2"),
            ],
            "token": check_token(token),
        },
    }


def infer_kind(record: Mapping[str, Any]) -> str:
    """Which kind of message a record is, from its keys (``"event"`` when unsure)."""
    if "$group_key" in record or "$group_id" in record:
        return "group_update"
    if "$distinct_id" in record or not _PROFILE_OP_SET.isdisjoint(record):
        return "profile_update"
    return "event"

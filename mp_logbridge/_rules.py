"""What Mixpanel's ingestion API accepts, record by record, as its documentation states it.

The receiver in :mod:`mp_logbridge.testing` applies these rules to what it is sent, and
``mp-logbridge import --dry-run`` applies them to files before anything is sent. They are the
server's view, written from the API's documentation (required fields per endpoint, ``$insert_id``
format, time window, size and property limits), independent of how this library builds records.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

__all__ = ["check_event", "check_record", "check_update"]

_PROFILE_OPS = ("$set", "$set_once", "$add", "$append", "$union", "$remove", "$unset", "$delete")
_GROUP_OPS = ("$set", "$set_once", "$union", "$remove", "$unset", "$delete")
_MAX_RECORD_BYTES = 1_000_000
_MAX_PROPERTIES = 255
_EARLIEST = 31_536_000  # 1971-01-01, in seconds
_INSERT_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(
        value
    )


def _id_ok(value: Any) -> bool:
    return (isinstance(value, str) and value != "") or _is_int(value)


def _insert_id_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not 0 < len(value) <= 36 or not set(value) <= _INSERT_ID_CHARS:
        return "'$insert_id' must be 1-36 characters, letters, digits or '-'"
    return None


def _time_problem(value: Any, now: float) -> str | None:
    if not _is_number(value):
        return "must be a number of seconds or milliseconds since epoch"
    seconds = value / 1000 if value > 100_000_000_000 else value
    if seconds < _EARLIEST:
        return "must be after 1971-01-01"
    if seconds > now + 3600:
        return "must not be more than 1 hour in the future"
    return None


def check_event(record: Any, strict_import: bool, now: float) -> tuple[str, str] | None:
    """``(field, message)`` for the first problem of an event record, or ``None``."""
    if not isinstance(record, dict):
        return ("", "each record must be a JSON object")
    if set(record) - {"event", "properties"}:
        return ("", f"unexpected top-level keys {sorted(set(record) - {'event', 'properties'})}")
    name = record.get("event")
    if not isinstance(name, str) or not name:
        return ("event", "'event' must be a non-empty string")
    props = record.get("properties")
    if not isinstance(props, dict):
        return ("properties", "'properties' must be an object")
    if len(props) >= _MAX_PROPERTIES:
        return ("properties", f"events must have fewer than {_MAX_PROPERTIES} properties")
    if len(json.dumps(record).encode()) >= _MAX_RECORD_BYTES:
        return ("", "event is larger than 1 MB")
    if "$insert_id" in props:
        problem = _insert_id_problem(props["$insert_id"])
        if problem:
            return ("properties.$insert_id", problem)
    if name == "$merge":
        ids = props.get("$distinct_ids")
        if not (isinstance(ids, list) and len(ids) == 2 and all(_id_ok(i) for i in ids)):
            return ("properties.$distinct_ids", "'$distinct_ids' must list two distinct ids")
        return None
    if name == "$create_alias":
        if not (_id_ok(props.get("alias")) and _id_ok(props.get("distinct_id"))):
            return ("properties", "'$create_alias' needs 'alias' and 'distinct_id'")
        return None
    if "time" in props:
        problem = _time_problem(props["time"], now)
        if problem:
            return ("properties.time", f"'properties.time' is invalid: {problem}")
    if "distinct_id" in props and not _id_ok(props["distinct_id"]):
        return ("properties.distinct_id", "'distinct_id' must be a non-empty string or integer")
    if strict_import:
        for key in ("time", "distinct_id", "$insert_id"):
            if key not in props:
                return (f"properties.{key}", f"'properties.{key}' is required")
    elif not isinstance(props.get("token"), str) or not props["token"]:
        return ("properties.token", "'token' is required")
    return None


def _op_problem(op: str, value: Any) -> str | None:
    if op == "$delete":
        return None
    if op == "$unset":
        if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            return "'$unset' must be a non-empty list of property names"
        return None
    if not isinstance(value, dict):
        return f"'{op}' must be an object"
    if op == "$add" and not all(_is_number(v) for v in value.values()):
        return "'$add' values must be numbers"
    if op == "$union" and not all(isinstance(v, list) for v in value.values()):
        return "'$union' values must be lists"
    return None


def check_update(record: Any, group: bool) -> str | None:
    if not isinstance(record, dict):
        return "each record must be a JSON object"
    if not isinstance(record.get("$token"), str) or not record["$token"]:
        return "'$token' is required"
    if group:
        if not isinstance(record.get("$group_key"), str) or not record["$group_key"]:
            return "'$group_key' must be a non-empty string"
        if not _id_ok(record.get("$group_id")):
            return "'$group_id' must be a non-empty string or integer"
        allowed: tuple[str, ...] = _GROUP_OPS
    else:
        if not _id_ok(record.get("$distinct_id")):
            return "'$distinct_id' must be a non-empty string or integer"
        allowed = _PROFILE_OPS
    ops = [key for key in record if key in _PROFILE_OPS]
    if len(ops) != 1:
        return f"exactly one operation of {', '.join(allowed)} is required, got {ops or 'none'}"
    if ops[0] not in allowed:
        return f"'{ops[0]}' is not a {'group' if group else 'profile'} operation"
    if "$time" in record and not _is_number(record["$time"]):
        return "'$time' must be a number"
    if "$ip" in record and not (isinstance(record["$ip"], str) or _is_int(record["$ip"])):
        return "'$ip' must be an IP address or 0"
    if len(json.dumps(record).encode()) >= _MAX_RECORD_BYTES:
        return "update is larger than 1 MB"
    return _op_problem(ops[0], record[ops[0]])


def check_record(endpoint: str, record: Any, *, now: float | None = None) -> tuple[str, str] | None:
    """Check one record as the receiver does for ``endpoint`` (``"/track"``, ``"/engage"``,
    ``"/groups"`` or ``"/import"``, strict); returns ``(field, problem)`` or ``None`` if valid."""
    when = time.time() if now is None else now
    if endpoint in ("/track", "/import"):
        return check_event(record, endpoint == "/import", when)
    if endpoint in ("/engage", "/groups"):
        problem = check_update(record, group=endpoint == "/groups")
        return None if problem is None else ("", problem)
    raise ValueError(f"unknown endpoint {endpoint!r}")

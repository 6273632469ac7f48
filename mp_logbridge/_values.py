"""Property values: which Python values can be sent, and how they look as JSON.

The one place that knows how a Python value becomes a Mixpanel property value:

* ``datetime`` → ``"%Y-%m-%dT%H:%M:%S"`` (timezone-aware values are converted to UTC first, as the
  Ruby SDK does for profile properties; naive values are taken as they are),
* ``date`` → ``"YYYY-MM-DD"``, ``Decimal`` → number, ``UUID`` → string, ``Enum`` → its value,
  ``set``/``frozenset``/``tuple`` → list, mappings and sequences converted recursively,
* ``NaN``/``Infinity``, non-string keys and values of any other type are bad input.

Two entry points with different costs:

* :func:`check_shallow` runs on the caller's thread: a type check of the top-level values only.
* :func:`encode` runs on the sender thread: one C-speed ``json.dumps`` pass that converts and
  validates everything; only when it fails is the slower :func:`find_invalid` walk used, to name
  the offending field in the error.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import json
import json.encoder
import math
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from ._errors import InvalidMessageError

__all__ = ["check_shallow", "describe", "encode", "find_invalid", "to_json_value"]

_DATETIME_FORMAT = "%Y-%m-%dT%H:%M:%S"
_MAX_DEPTH = 32
# Python refuses to write longer integers as text (``sys.get_int_max_str_digits``).
_MAX_INT_DIGITS = 4300

# Values whose JSON form needs no conversion and no check.
_PLAIN = frozenset({str, int, bool, type(None)})
# Containers and convertible types accepted by the shallow check (their content is checked later).
_ACCEPTED = (
    Mapping,
    list,
    tuple,
    set,
    frozenset,
    _dt.date,  # datetime is a subclass
    decimal.Decimal,
    uuid.UUID,
    enum.Enum,
)


def describe(value: Any, limit: int = 80) -> str:
    """A short ``repr`` of a bad value for an error message.

    Never raises: a value whose ``repr`` fails (a broken ``__repr__``, an integer too long to
    write as text) is described by its type, and long ones are cut at ``limit`` characters.
    """
    try:
        text = repr(value)
    except Exception:
        return f"<{type(value).__name__} object>"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def format_datetime(value: _dt.datetime) -> str:
    """Mixpanel's datetime form; aware values are converted to UTC first."""
    if value.tzinfo is not None and value.utcoffset() is not None:
        value = value.astimezone(_dt.timezone.utc)
    return value.strftime(_DATETIME_FORMAT)


def _convert(value: Any) -> Any:
    """``json.dumps`` ``default=`` hook: convert one non-JSON value or refuse it."""
    if isinstance(value, _dt.datetime):
        return format_datetime(value)
    if isinstance(value, _dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise ValueError("Decimal value is not finite")
        if value == value.to_integral_value() and value.adjusted() < _MAX_INT_DIGITS:
            return int(value)
        return float(value)  # a huge exponent becomes inf, refused below
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"values of type {type(value).__name__} cannot be sent")


_CONTAINERS = frozenset({dict, list, tuple})
_ACCEPTED_ANY = (*_ACCEPTED, int, float, str)


def check_shallow(properties: Mapping[str, Any], field: str) -> None:
    """Cheap caller-thread check of a property mapping: string keys, known top-level value types.

    Raises:
        InvalidMessageError: naming ``field.key`` for the first bad entry.
    """
    for key, value in properties.items():
        if type(key) is not str:
            raise InvalidMessageError(field, f"property names must be strings, got {describe(key)}")
        kind = type(value)
        if kind in _PLAIN:
            continue
        if kind is float:
            if value != value or value in (math.inf, -math.inf):
                raise InvalidMessageError(f"{field}.{key}", f"{value!r} is not a valid JSON number")
            continue
        if kind not in _CONTAINERS and not isinstance(value, _ACCEPTED_ANY):
            raise InvalidMessageError(
                f"{field}.{key}", f"values of type {kind.__name__} cannot be sent"
            )


def find_invalid(value: Any, field: str, depth: int = 0) -> InvalidMessageError | None:
    """Walk ``value`` and describe the first part that cannot be sent, or return ``None``."""
    if depth > _MAX_DEPTH:
        return InvalidMessageError(field, f"nested deeper than {_MAX_DEPTH} levels (or cyclic)")
    if isinstance(value, (str, bool, type(None))):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return InvalidMessageError(field, "string contains unpaired surrogates")
        return None
    if isinstance(value, int):
        try:
            str(value)
        except ValueError:
            return InvalidMessageError(field, "integer has too many digits to send")
        return None
    if isinstance(value, float):
        if math.isfinite(value):
            return None
        return InvalidMessageError(field, f"{value!r} is not a valid JSON number")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                return InvalidMessageError(
                    field, f"property names must be strings, got {describe(key)}"
                )
            problem = find_invalid(item, f"{field}.{key}", depth + 1)
            if problem is not None:
                return problem
        return None
    if isinstance(value, (list, tuple, set, frozenset)):
        for index, item in enumerate(value):
            problem = find_invalid(item, f"{field}[{index}]", depth + 1)
            if problem is not None:
                return problem
        return None
    try:
        converted = _convert(value)
    except (TypeError, ValueError) as exc:
        return InvalidMessageError(field, str(exc))
    return find_invalid(converted, field, depth + 1)


_encoder = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_convert
)
# The C encoder, made once: ``JSONEncoder.encode`` builds a new one on every call. Its arguments:
# (markers, default, encoder, indent, key_separator, item_separator, sort_keys, skipkeys,
# allow_nan) — no circular check (a cycle ends in RecursionError, reported like any other value
# that cannot be sent), compact separators, NaN refused.
_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_c_encode_basestring: Any = getattr(json.encoder, "c_encode_basestring", None)
_to_json: Callable[[Any], str] = _encoder.encode
if _c_make_encoder is not None and _c_encode_basestring is not None:
    _c_iterencode = _c_make_encoder(
        None, _convert, _c_encode_basestring, None, ":", ",", False, False, False
    )

    def _c_to_json(value: Any) -> str:
        return "".join(_c_iterencode(value, 0))

    _to_json = _c_to_json


def _dumps(value: Any, field: str) -> str:
    try:
        return _to_json(value)
    except (TypeError, ValueError, RecursionError) as exc:
        problem = find_invalid(value, field)
        if problem is None:  # pragma: no cover - json refused something the walk accepts
            problem = InvalidMessageError(field, f"cannot be encoded as JSON: {exc}")
        raise problem from None


def encode(record: Mapping[str, Any], field: str = "message") -> bytes:
    """Encode one Mixpanel record as compact UTF-8 JSON, converting values on the way.

    Raises:
        InvalidMessageError: naming the offending field when a value cannot be sent.
    """
    text = _dumps(record, field)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        problem = find_invalid(record, field) or InvalidMessageError(field, "not valid UTF-8")
        raise problem from None


def to_json_value(value: Any, field: str = "value") -> Any:
    """Return the JSON-ready form of ``value``: what :func:`encode` would put on the wire."""
    return json.loads(_dumps(value, field))

"""Property values: which Python values can be sent, and how they look as JSON.

The one place that knows how a Python value becomes a Mixpanel property value:

* ``datetime`` → ``"%Y-%m-%dT%H:%M:%S"`` in UTC: timezone-aware values are converted, and naive
  values are read as local time and converted too (the Ruby SDK's rule), so the same instant
  gives the same text whatever ``TZ`` the process runs under;
* ``date`` → ``"YYYY-MM-DD"``, ``Decimal`` → number, ``UUID`` → string, ``Enum`` → its value,
  ``set``/``frozenset``/``tuple`` → list, mappings and sequences converted recursively;
* ``NaN``/``Infinity``, strings with unpaired surrogates, values of any other type, nesting deeper
  than 32 levels (or cycles) and **property names that are not strings, at any depth**, are bad
  input (refused, never converted: ``{1: "a", "1": "b"}`` would otherwise send one key twice).

Entry points with different costs:

* :func:`snapshot` runs on the caller's thread: a private copy of the containers of a value as
  they are at the call (so that mutating them afterwards does not change what is sent), checked
  for the structural rules above, with its approximate encoded size.
* :func:`encode` runs where a record is encoded: one C-speed ``json.dumps`` pass that converts and
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

__all__ = [
    "MAX_LIST_ITEMS",
    "MAX_NESTED_KEYS",
    "MAX_NESTING",
    "describe",
    "encode",
    "find_invalid",
    "format_datetime",
    "snapshot",
    "snapshot_mapping",
    "to_json_value",
]

_DATETIME_FORMAT = "%Y-%m-%dT%H:%M:%S"
_MAX_DEPTH = 32
# Python refuses to write longer integers as text (``sys.get_int_max_str_digits``).
_MAX_INT_DIGITS = 4300


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
    """Mixpanel's datetime form, in UTC: naive values are read as local time."""
    try:
        value = value.astimezone(_dt.timezone.utc)
    except (OverflowError, ValueError, OSError):  # out of range in local time: taken as UTC
        pass
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


_IMMUTABLE = frozenset(
    {str, int, bool, type(None), _dt.datetime, _dt.date, decimal.Decimal, uuid.UUID}
)
_SEQUENCES = (list, tuple, set, frozenset)


#: Mixpanel's limits on a property value: objects nest at most 3 deep, a nested object has fewer
#: than 255 keys, a list fewer than 255 items (a record has fewer than 255 properties).
MAX_NESTING = 3
MAX_NESTED_KEYS = 255
MAX_LIST_ITEMS = 255


def snapshot_mapping(
    mapping: Mapping[Any, Any], field: str, depth: int = 0, nest: int | None = 0
) -> tuple[dict[str, Any], int]:
    """A private copy of a property mapping as it is now, and about how many bytes it encodes to.

    Containers are copied (at any depth), immutable values are shared. Checks the rules: string
    keys, finite floats, types that can be sent, and Mixpanel's limits on the values (objects
    nested at most 3 deep, fewer than 255 keys in a nested object and 255 items in a list).
    ``nest`` is how deep this mapping sits inside a property value (0: it holds properties);
    ``None`` walks a whole record, where the limits are not counted.

    Raises:
        InvalidMessageError: naming the offending ``field.key``.
    """
    if depth > _MAX_DEPTH:
        raise InvalidMessageError(field, f"nested deeper than {_MAX_DEPTH} levels (or cyclic)")
    if nest:
        if nest > MAX_NESTING:
            raise InvalidMessageError(
                field, f"nests objects more than {MAX_NESTING} deep (Mixpanel's limit)"
            )
        if len(mapping) >= MAX_NESTED_KEYS:
            raise InvalidMessageError(
                field,
                f"is an object of {len(mapping)} keys; Mixpanel keeps fewer than {MAX_NESTED_KEYS}",
            )
    inner = None if nest is None else nest + 1
    copy: dict[str, Any] = {}
    size = 2
    for key, value in mapping.items():
        if type(key) is not str:
            if not isinstance(key, str):
                raise InvalidMessageError(
                    field, f"property names must be strings, got {describe(key)}"
                )
            key = str(key)
        kind = type(value)
        if kind is str:
            size += len(key) + len(value) + 6
        elif kind in _IMMUTABLE:
            size += len(key) + 24
        elif kind is float:
            if value != value or value in (math.inf, -math.inf):
                raise InvalidMessageError(f"{field}.{key}", f"{value!r} is not a valid JSON number")
            size += len(key) + 24
        else:
            value, extra = _snapshot_value(value, f"{field}.{key}", depth + 1, inner)
            size += len(key) + 4 + extra
        copy[key] = value
    return copy, size


def _snapshot_value(value: Any, field: str, depth: int, nest: int | None) -> tuple[Any, int]:
    kind = type(value)
    if kind is str:
        return value, len(value) + 2
    if kind in _IMMUTABLE:
        return value, 24
    if kind is float:
        if value != value or value in (math.inf, -math.inf):
            raise InvalidMessageError(field, f"{value!r} is not a valid JSON number")
        return value, 24
    if isinstance(value, Mapping):
        return snapshot_mapping(value, field, depth, nest)
    if isinstance(value, _SEQUENCES):
        if depth > _MAX_DEPTH:
            raise InvalidMessageError(field, f"nested deeper than {_MAX_DEPTH} levels (or cyclic)")
        if nest is not None and len(value) >= MAX_LIST_ITEMS:
            raise InvalidMessageError(
                field,
                f"is a list of {len(value)} items; Mixpanel keeps fewer than {MAX_LIST_ITEMS}",
            )
        items = []
        size = 2
        for index, item in enumerate(value):
            # Items of a list sit at the list's own level (a list does not nest objects deeper).
            item, extra = _snapshot_value(item, f"{field}[{index}]", depth + 1, nest)
            items.append(item)
            size += extra + 1
        return items, size
    if isinstance(value, enum.Enum):
        return _snapshot_value(value.value, field, depth, nest)
    if isinstance(value, (str, int, float)):  # subclasses of the plain types
        return _snapshot_value(_plain_of(value), field, depth, nest)
    if isinstance(value, (_dt.date, decimal.Decimal, uuid.UUID)):
        return value, 24
    raise InvalidMessageError(field, f"values of type {kind.__name__} cannot be sent")


def _plain_of(value: Any) -> Any:
    for plain in (bool, int, float, str):
        if isinstance(value, plain):
            return plain(value)
    return value  # pragma: no cover


def snapshot(value: Any, field: str) -> tuple[Any, int]:
    """A private copy of one property value (mapping, sequence, scalar) and its approximate size.

    Raises:
        InvalidMessageError: naming ``field`` (or the part of it) that breaks a rule.
    """
    return _snapshot_value(value, field, 0, 1)


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


try:  # the optional fast encoder (``pip install mp_logbridge[fast]``)
    import orjson as _orjson

    _orjson_dumps: Callable[..., bytes] | None = _orjson.dumps
    # datetimes and dates take this module's form (UTC text), not orjson's RFC 3339.
    _ORJSON_OPTIONS = _orjson.OPT_PASSTHROUGH_DATETIME
except ImportError:  # pragma: no cover - depends on the installation
    _orjson_dumps = None
    _ORJSON_OPTIONS = 0

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


def encode(record: Mapping[str, Any], field: str = "message", *, checked: bool = False) -> bytes:
    """Encode one Mixpanel record as compact UTF-8 JSON, converting values on the way.

    ``checked``: the record's values were checked already (captured with :func:`snapshot`), so
    the optional ``orjson`` encoder may be used (``mp_logbridge[fast]``; it would write NaN as
    ``null`` instead of refusing it, hence only for checked records). Whatever it cannot encode
    goes through the standard encoder, which names the problem.

    Raises:
        InvalidMessageError: naming the offending field when a value cannot be sent.
    """
    if checked and _orjson_dumps is not None:
        try:
            payload: bytes = _orjson_dumps(record, default=_convert, option=_ORJSON_OPTIONS)
            # orjson's bytes keep the whole buffer it grew (4 KB at least, about ten times the
            # text beyond): copied to its size, or queued records would take many times the
            # bytes the queue's bound counts.
            return bytes(memoryview(payload))
        except (TypeError, ValueError):  # a huge integer, a surrogate, ...: the slow way says
            pass
    text = _dumps(record, field)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        problem = find_invalid(record, field) or InvalidMessageError(field, "not valid UTF-8")
        raise problem from None


def to_json_value(value: Any, field: str = "value") -> Any:
    """Return the JSON-ready form of ``value``: what :func:`encode` would put on the wire."""
    return json.loads(_dumps(value, field))

"""Encoded records: the forms a message can take on its way to a consumer, and request bodies.

A consumer's ``send(kind, message)`` accepts a record dict, JSON text (the official ``mixpanel``
package's form, or the Ruby SDK's ``{"data": record}`` envelope) or a deferred
:class:`~mp_logbridge._messages.MessageSource`. Whatever the form, what travels to the server is
one compact UTF-8 JSON document per record (``bytes``, encoded once, so every retry sends the
same bytes), cut into requests by count and size (:func:`take_batch`) and joined into a JSON array
body (:func:`join`).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable
from typing import Any

from ._errors import InvalidMessageError, MessageTooLargeError
from ._messages import KINDS, MAX_RECORD_BYTES
from ._values import encode, snapshot_mapping

__all__ = [
    "MAX_BATCH_RECORDS",
    "MAX_REQUEST_BYTES",
    "EncodedRecord",
    "JsonText",
    "decode_json_message",
    "decode_record",
    "encode_message",
    "encode_record",
    "join",
    "normalize_send_args",
    "route",
    "take_batch",
]

#: Mixpanel accepts at most this many records per request (also the default batch size).
MAX_BATCH_RECORDS = 2000
#: Default byte budget of one request body (uncompressed); the docs disagree between 2 and 10 MB.
MAX_REQUEST_BYTES = 1_000_000

# The official ``mixpanel`` package names its endpoints differently; accept both vocabularies.
_KIND_ALIASES = {
    "events": "event",
    "people": "profile_update",
    "groups": "group_update",
    "imports": "import",
}


def normalize_kind(kind: Any) -> str:
    """The canonical kind for this library's, the Ruby SDK's or the ``mixpanel`` package's name.

    Raises:
        InvalidMessageError: for an unknown kind.
    """
    name = (
        _KIND_ALIASES.get(kind, kind) if isinstance(kind, str) else str(getattr(kind, "name", kind))
    )
    if name not in KINDS:
        raise InvalidMessageError(
            "kind", f"unknown message kind {kind!r}; expected one of {', '.join(KINDS)}"
        )
    return name


def route(kind: str, message: Any) -> str:
    """The kind a message really goes as: a ``$merge`` event given as an ``import`` (as the
    official ``mixpanel`` package sends it) is a ``merge`` — sent to ``/import`` in requests of
    its own, without ``strict``, in the shape the official SDKs use, so it never fails a batch of
    strict imports."""
    if kind == "import":
        if type(message) is dict:
            if message.get("event") == "$merge":
                return "merge"
        elif isinstance(message, bytes) and message.startswith(_MERGE_PREFIX):
            return "merge"
    return kind


_MERGE_PREFIX = b'{"event":"$merge"'  # how an encoded $merge record starts


def normalize_send_args(kind: Any, message: Any) -> tuple[str, Any]:
    """Accept ``send(kind, message)`` in this library's, the Ruby SDK's and the ``mixpanel`` package's forms.

    * ``kind``: ``"event"``/``"profile_update"``/``"group_update"``/``"import"`` (or the
      ``mixpanel`` package's ``"events"``/``"people"``/``"groups"``/``"imports"``);
    * ``message``: a record dict, a :class:`~mp_logbridge.MessageSource`, or JSON text (a record,
      or the Ruby SDK's ``{"data": record}`` envelope).

    Raises:
        InvalidMessageError: for an unknown kind or a message of another type.
    """
    name = normalize_kind(kind)
    if type(message) is EncodedRecord:
        return name, message
    if isinstance(message, (str, bytes)):
        message = decode_json_message(message)
    elif not isinstance(message, dict) and not callable(getattr(message, "build", None)):
        raise InvalidMessageError(
            "message",
            f"must be a record dict, JSON text or a MessageSource, got {type(message).__name__}",
        )
    return name, message


def decode_json_message(text: str | bytes) -> dict[str, Any]:
    """A record given as JSON text (or in the Ruby SDK's ``{"data": record}`` envelope).

    Raises:
        InvalidMessageError: when the text is not JSON or does not hold one record.
    """
    try:
        decoded = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidMessageError("message", f"is not valid JSON: {exc}") from None
    if isinstance(decoded, dict) and set(decoded) <= {"data", "api_key"} and "data" in decoded:
        decoded = decoded["data"]
    if not isinstance(decoded, dict):
        raise InvalidMessageError("message", "JSON text must hold one record (an object)")
    return decoded


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


class JsonText:
    """A message given as JSON text, decoded and checked where it is encoded (on a background
    consumer's thread). Its ``weight`` is the text's length."""

    __slots__ = ("text", "weight")
    checked = True  # decoded JSON has string keys only

    def __init__(self, text: str | bytes) -> None:
        self.text = text
        self.weight = len(text)

    def build(self) -> dict[str, Any]:
        """The record the text holds."""
        return decode_json_message(self.text)


def encode_message(message: Any) -> bytes:
    """Build (if deferred), check and encode one message, enforcing the per-record size limit.

    A record dict, and what a deferred message builds, are checked at any depth (string keys,
    nesting) before encoding; deferred messages that say ``checked = True`` (the library's own,
    built from values captured with :func:`~mp_logbridge._values.snapshot`) are not walked again.

    Raises:
        InvalidMessageError: the message cannot be sent (``MessageTooLargeError`` when too big).
    """
    if type(message) is EncodedRecord:
        return message
    if isinstance(message, dict):
        record = snapshot_mapping(message, "message", nest=None)[0]
    else:
        record = message.build()
        if not isinstance(record, dict):
            raise InvalidMessageError(
                "message", f"build() must return a record dict, got {type(record).__name__}"
            )
        if not getattr(message, "checked", False):  # the library's own are built from snapshots
            record = snapshot_mapping(record, "message", nest=None)[0]
    return encode_record(record)


def encode_record(record: dict[str, Any]) -> bytes:
    """Encode a record whose values were already checked (built from snapshots, or walked by
    :func:`encode_message`).

    Raises:
        InvalidMessageError: a value cannot be encoded; ``MessageTooLargeError`` when the record
            is not under Mixpanel's per-record limit.
    """
    payload = encode(record, "message", checked=True)
    if len(payload) >= MAX_RECORD_BYTES:
        raise MessageTooLargeError(
            "message",
            f"encodes to {len(payload)} bytes; Mixpanel accepts records under {MAX_RECORD_BYTES}",
        )
    return payload


class EncodedRecord(bytes):
    """A record already encoded and checked (by a Tracker): the library's consumers take it as
    it is, where JSON text given by others is decoded and checked again."""

    __slots__ = ()


def decode_record(payload: bytes) -> Any:
    """An encoded record as a dict again (for error reports)."""
    return json.loads(payload)


def take_batch(pending: deque[bytes], max_records: int, max_bytes: int) -> list[bytes]:
    """Pop the next request's worth of encoded records from the front of ``pending``."""
    batch: list[bytes] = []
    size = 2  # the brackets
    while pending and len(batch) < max_records:
        extra = len(pending[0]) + 1
        if batch and size + extra > max_bytes:
            break
        batch.append(pending.popleft())
        size += extra
    return batch


def join(batch: Iterable[bytes]) -> bytes:
    """The JSON array body for a batch of encoded records."""
    return b"[" + b",".join(batch) + b"]"

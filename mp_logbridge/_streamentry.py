"""Stream entries: how one encoded record travels through a broker to the relay.

Broker-neutral (a Redis Stream entry's fields today; a Kafka message's headers could carry the
same). An entry holds the record exactly as it was encoded in the producing process (so its
``$insert_id`` is fixed) and what the relay needs to deliver it without guessing:

* ``k`` the kind of message (the endpoint: ``event``, ``profile_update``, ``group_update``,
  ``import``);
* ``d`` the destination: a region name (``us``, ``eu``, ``in``) or a label the relay maps to a host,
  never a host the relay would trust blindly;
* ``p`` for ``/import``: the name of the project whose credentials the relay uses (a project id).
  Secrets never enter the stream: the relay holds the credentials;
* ``r`` the record (compact UTF-8 JSON);
* ``v`` the format version.

Dead-lettered entries keep these fields and add ``reason`` (the server's words), ``drop`` (the
drop reason), ``status`` (the HTTP status, when there was one), ``entry`` (the original entry id)
and ``at`` (milliseconds since the epoch).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._messages import KINDS, MAX_RECORD_BYTES

__all__ = [
    "ENTRY_FORMAT",
    "FIELD_DESTINATION",
    "FIELD_KIND",
    "FIELD_PROJECT",
    "FIELD_RECORD",
    "FIELD_VERSION",
    "MalformedEntry",
    "StreamRecord",
    "entry_head",
    "parse_entry",
]

#: The entry format this version writes and reads.
ENTRY_FORMAT = b"1"
FIELD_VERSION = b"v"
FIELD_KIND = b"k"
FIELD_DESTINATION = b"d"
FIELD_PROJECT = b"p"
FIELD_RECORD = b"r"

_KIND_BYTES = {kind.encode(): kind for kind in KINDS}


class MalformedEntry(ValueError):
    """An entry the relay cannot deliver as it is (it goes to the dead-letter stream)."""


def entry_head(kind: str, destination: str, project: str | None) -> list[bytes]:
    """The fields of an entry before its record, flattened (``[name, value, ...]``); the
    record follows as ``FIELD_RECORD, record``."""
    fields = [
        FIELD_VERSION,
        ENTRY_FORMAT,
        FIELD_KIND,
        kind.encode(),
        FIELD_DESTINATION,
        destination.encode(),
    ]
    if project is not None:
        fields += [FIELD_PROJECT, project.encode()]
    return fields


class StreamRecord(bytes):
    """An encoded record read from a stream: the bytes sent to Mixpanel, plus the entry it came
    from (acknowledged once the server accepted it) and the project it counts against."""

    entry_id: bytes
    rate_key: str
    #: The entry's fields as read (kept for the dead-letter stream).
    source: Mapping[bytes, bytes]


@dataclass(frozen=True)
class ParsedEntry:
    """One entry, checked: what to send, where, with which credentials."""

    kind: str
    destination: str
    project: str | None
    record: StreamRecord


def _text(value: Any, name: str) -> str:
    if not isinstance(value, bytes) or not value:
        raise MalformedEntry(f"field {name!r} is missing or empty")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedEntry(f"field {name!r} is not UTF-8") from None


def parse_entry(entry_id: bytes, fields: Mapping[bytes, bytes] | None) -> ParsedEntry:
    """Check one entry as read from the broker.

    The record must be one JSON object under Mixpanel's per-record limit: a garbage entry must
    not make a whole request (and the good records in it) fail.

    Raises:
        MalformedEntry: saying what is wrong with it.
    """
    if not fields:
        raise MalformedEntry("the entry has no fields")
    version = fields.get(FIELD_VERSION)
    if version != ENTRY_FORMAT:
        raise MalformedEntry(
            f"unknown entry format {version!r} (this relay reads {ENTRY_FORMAT!r})"
        )
    kind = _KIND_BYTES.get(fields.get(FIELD_KIND, b""))
    if kind is None:
        raise MalformedEntry(f"unknown kind {fields.get(FIELD_KIND)!r}")
    destination = _text(fields.get(FIELD_DESTINATION), "d")
    project_value = fields.get(FIELD_PROJECT)
    project = None if project_value is None else _text(project_value, "p")
    payload = fields.get(FIELD_RECORD)
    if not isinstance(payload, bytes) or not payload:
        raise MalformedEntry("field 'r' (the record) is missing or empty")
    if len(payload) >= MAX_RECORD_BYTES:
        raise MalformedEntry(
            f"the record is {len(payload)} bytes; Mixpanel accepts under {MAX_RECORD_BYTES}"
        )
    try:
        record = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise MalformedEntry(f"the record is not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise MalformedEntry("the record is not a JSON object")
    properties = record.get("properties")
    token = properties.get("token") if isinstance(properties, dict) else record.get("$token")
    item = StreamRecord(payload)
    item.entry_id = entry_id
    item.rate_key = str(token) if token else (project or "")
    item.source = fields
    return ParsedEntry(kind, destination, project, item)

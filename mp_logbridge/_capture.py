"""In-memory capture of what the consumers are given (for :func:`mp_logbridge.testing.capture_messages`).

While a capture is active, every consumer of this library (background, synchronous, callable
sinks) hands the records it is given to the capture instead of delivering them: built, checked
and encoded exactly as they would be sent, then decoded again, so a test sees the wire form.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from ._errors import InvalidMessageError
from ._records import decode_record, encode_message

__all__ = ["Capture", "CapturedMessage", "active", "take"]


@dataclass(frozen=True)
class CapturedMessage:
    """One message as a consumer was given it: its ``kind`` and the ``record`` as it would be
    sent (JSON-ready: times in milliseconds, datetimes as text, ``$insert_id`` filled in)."""

    kind: str
    record: dict[str, Any]


@dataclass
class Capture:
    """What a ``capture_messages()`` block collected (a list of :class:`CapturedMessage`, plus
    the messages that could not be sent, as ``(kind, InvalidMessageError)`` in ``invalid``)."""

    messages: list[CapturedMessage] = field(default_factory=list)
    invalid: list[tuple[str, InvalidMessageError]] = field(default_factory=list)

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The records captured (of ``kind`` only, when given)."""
        return [m.record for m in self.messages if kind is None or m.kind == kind]

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The events captured (named ``name`` only, when given)."""
        return [
            record
            for record in self.records("event")
            if name is None or record.get("event") == name
        ]

    def __len__(self) -> int:
        return len(self.messages)

    def __iter__(self) -> Any:
        return iter(self.messages)

    def __getitem__(self, index: int) -> CapturedMessage:
        return self.messages[index]


#: The captures in force (innermost last); empty almost always, so checking it costs nothing.
active: list[Capture] = []
_lock = threading.Lock()


def take(kind: str, message: Any) -> bool:
    """Give ``message`` to the innermost capture instead of sending it. Record dicts that cannot
    be sent raise :class:`~mp_logbridge.InvalidMessageError` as they would at a real consumer;
    deferred messages that cannot be built are kept in ``invalid``."""
    try:
        payload = encode_message(message)
    except InvalidMessageError as error:
        if isinstance(message, dict):
            raise
        with _lock:
            if active:
                active[-1].invalid.append((kind, error))
        return True
    with _lock:
        if active:
            active[-1].messages.append(CapturedMessage(kind, decode_record(payload)))
    return True

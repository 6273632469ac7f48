"""What every consumer does with a batch: encode, cut, post once, and read the outcome.

Shared by the synchronous and the background consumers so that both treat a response the same
way: records are encoded one by one (a bad one is dropped alone), cut into requests by count and
bytes, and one POST yields an :class:`Outcome` that says what was delivered, what was refused for
good, and what may be retried — a 413 splits the batch in halves, a strict ``/import`` 400
refuses exactly its ``failed_records``. The retry schedule itself is :class:`RetryPolicy`.
"""

from __future__ import annotations

import json
import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import (
    ConfigurationError,
    DeliveryError,
    InvalidMessageError,
    MessageTooLargeError,
    PartialImportError,
    PayloadTooLargeError,
)
from ._messages import KINDS, MAX_RECORD_BYTES, MessageSource
from ._transport import Credentials, Transport
from ._values import encode

__all__ = [
    "MAX_BATCH_RECORDS",
    "MAX_REQUEST_BYTES",
    "JsonText",
    "Outcome",
    "Pending",
    "RetryPolicy",
    "decode_json_message",
    "encode_message",
    "normalize_send_args",
    "post_batch",
    "take_batch",
]

#: Mixpanel accepts at most this many records per request.
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


def normalize_send_args(kind: Any, message: Any) -> tuple[str, Any]:
    """Accept ``send(kind, message)`` in this library's, the Ruby SDK's and the ``mixpanel`` package's forms.

    * ``kind``: ``"event"``/``"profile_update"``/``"group_update"``/``"import"`` (or the
      ``mixpanel`` package's ``"events"``/``"people"``/``"groups"``/``"imports"``);
    * ``message``: a record dict, a :class:`~mp_logbridge.MessageSource`, or JSON text (a record,
      or the Ruby SDK's ``{"data": record}`` envelope).

    Raises:
        InvalidMessageError: for an unknown kind or a message of another type.
    """
    name = (
        _KIND_ALIASES.get(kind, kind) if isinstance(kind, str) else str(getattr(kind, "name", kind))
    )
    if name not in KINDS:
        raise InvalidMessageError(
            "kind", f"unknown message kind {kind!r}; expected one of {', '.join(KINDS)}"
        )
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
        decoded = json.loads(text)
    except ValueError as exc:
        raise InvalidMessageError("message", f"is not valid JSON: {exc}") from None
    if isinstance(decoded, dict) and set(decoded) <= {"data", "api_key"} and "data" in decoded:
        decoded = decoded["data"]
    if not isinstance(decoded, dict):
        raise InvalidMessageError("message", "JSON text must hold one record (an object)")
    return decoded


class JsonText:
    """A message given as JSON text, decoded when built (on a background consumer's thread)."""

    __slots__ = ("text",)

    def __init__(self, text: str | bytes) -> None:
        self.text = text

    def build(self) -> dict[str, Any]:
        """The record the text holds."""
        return decode_json_message(self.text)


def encode_message(message: dict[str, Any] | MessageSource) -> bytes:
    """Build (if deferred) and encode one message, enforcing the per-record size limit.

    Raises:
        InvalidMessageError: the message cannot be sent (``MessageTooLargeError`` when too big).
    """
    record = message if isinstance(message, dict) else message.build()
    payload = encode(record, "message")
    if len(payload) >= MAX_RECORD_BYTES:
        raise MessageTooLargeError(
            "message",
            f"encodes to {len(payload)} bytes; Mixpanel accepts records under {MAX_RECORD_BYTES}",
        )
    return payload


class Pending:
    """One encoded record waiting for delivery (its bytes never change, so retries are identical)."""

    __slots__ = ("payload", "seq")

    def __init__(self, payload: bytes, seq: int = 0) -> None:
        self.payload = payload
        self.seq = seq

    def record(self) -> dict[str, Any]:
        """The record as a dict again (for error reports)."""
        value: dict[str, Any] = json.loads(self.payload)
        return value


def take_batch(pending: deque[Pending], max_records: int, max_bytes: int) -> list[Pending]:
    """Pop the next request's worth of records from the front of ``pending``."""
    batch: list[Pending] = []
    size = 2  # the brackets
    while pending and len(batch) < max_records:
        extra = len(pending[0].payload) + 1
        if batch and size + extra > max_bytes:
            break
        batch.append(pending.popleft())
        size += extra
    return batch


def join(batch: Iterable[Pending]) -> bytes:
    """The JSON array body for a batch."""
    return b"[" + b",".join(item.payload for item in batch) + b"]"


@dataclass
class Outcome:
    """What one POST of a batch achieved.

    ``delivered`` records were accepted; ``dropped`` lists ``(reason, records, error)`` groups
    refused for good; ``retry`` holds the records to try again (with ``error`` saying why), and
    ``split`` the halves of a batch the server found too large.
    """

    delivered: list[Pending] = field(default_factory=list)
    dropped: list[tuple[str, list[Pending], DeliveryError]] = field(default_factory=list)
    retry: list[Pending] = field(default_factory=list)
    split: list[list[Pending]] = field(default_factory=list)
    error: DeliveryError | None = None


def post_batch(
    transport: Transport,
    kind: str,
    batch: list[Pending],
    credentials: Credentials | None = None,
    timeout: float | None = None,
) -> Outcome:
    """POST ``batch`` once and classify the result (never raises a :class:`DeliveryError`)."""
    outcome = Outcome()
    try:
        transport.send(kind, join(batch), credentials=credentials, timeout=timeout)
    except PartialImportError as exc:
        failed = exc.failed_indexes
        outcome.error = exc
        outcome.delivered = [item for index, item in enumerate(batch) if index not in failed]
        refused = [item for index, item in enumerate(batch) if index in failed]
        if refused:
            outcome.dropped.append(("rejected_by_server", refused, exc))
    except PayloadTooLargeError as exc:
        outcome.error = exc
        if len(batch) > 1:
            half = len(batch) // 2
            outcome.split = [batch[:half], batch[half:]]
        else:
            outcome.dropped.append(("too_large", batch, exc))
    except DeliveryError as exc:
        outcome.error = exc
        if exc.retryable:
            outcome.retry = batch
        else:
            outcome.dropped.append(("rejected_by_server", batch, exc))
    else:
        outcome.delivered = batch
    return outcome


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a failed request again.

    Follows Mixpanel's guidance: exponential backoff starting at ``initial_backoff`` seconds and
    doubling up to ``max_backoff``, plus a random jitter drawn from ``jitter``; a server's
    ``Retry-After`` is a lower bound, clamped to ``max_retry_after``. A batch is given up after
    ``max_attempts`` attempts or once ``max_elapsed`` seconds have passed since its first attempt.
    """

    initial_backoff: float = 2.0
    max_backoff: float = 60.0
    jitter: tuple[float, float] = (1.0, 5.0)
    max_attempts: int = 10
    max_elapsed: float = 600.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if len(self.jitter) != 2:
            raise ConfigurationError(f"jitter must be a (low, high) pair, got {self.jitter!r}")
        low, high = self.jitter
        if self.max_attempts < 1:
            raise ConfigurationError("max_attempts must be at least 1")
        if (
            min(
                self.initial_backoff,
                self.max_backoff,
                low,
                high,
                self.max_elapsed,
                self.max_retry_after,
            )
            < 0
            or low > high
        ):
            raise ConfigurationError(f"invalid retry policy {self!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | RetryPolicy | None) -> RetryPolicy:
        """Build a policy from a mapping of its fields (as ``dictConfig`` would give them)."""
        if options is None:
            return cls()
        if isinstance(options, RetryPolicy):
            return options
        values = {key: options[key] for key in options}
        if "jitter" in values:
            values["jitter"] = tuple(values["jitter"])
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigurationError(f"invalid retry options: {exc}") from None

    def delay(
        self,
        retry_number: int,
        retry_after: float | None = None,
        rng: Callable[[float, float], float] = random.uniform,
    ) -> float:
        """Seconds to wait before retry number ``retry_number`` (1 for the first retry)."""
        # The exponent is capped: 2.0 ** 1024 overflows (a product that does is just ``inf``).
        doubling = 2.0 ** min(max(0, retry_number - 1), 1000)
        backoff = min(self.max_backoff, self.initial_backoff * doubling)
        wait = backoff + float(rng(*self.jitter))
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_retry_after))
        return wait

    def gives_up(self, attempts: int, elapsed: float, next_delay: float) -> bool:
        """Whether to stop after ``attempts`` attempts, ``elapsed`` seconds since the first."""
        return attempts >= self.max_attempts or elapsed + next_delay > self.max_elapsed

"""Exporters: where a batch of encoded records goes, and what came of it.

The background worker is generic over an :class:`Exporter` (as OpenTelemetry's batch processor
is over its exporter): it hands over one :class:`Batch` at a time per lane, with a deadline, and
gets an :class:`Outcome` back — what was delivered, what was refused for good (with a drop reason),
what may be retried, and the halves of a batch the receiver found too large. It never raises.

:class:`HttpExporter` posts to Mixpanel through a :class:`~mp_logbridge._transport.Transport`;
the durable spool and a broker stream sit at the same seam.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ._errors import (
    DeliveryError,
    MixpanelConnectionError,
    PartialImportError,
    PayloadTooLargeError,
)
from ._records import decode_record, join
from ._transport import Credentials, Transport

__all__ = ["Batch", "Exporter", "HttpExporter", "Outcome", "classify"]


@dataclass(frozen=True)
class Batch:
    """Encoded records of one kind, for one destination, sent together."""

    kind: str
    records: list[bytes]
    credentials: Credentials | None = None


@dataclass
class Outcome:
    """What one export of a batch achieved.

    ``delivered`` records were accepted; ``dropped`` lists ``(reason, records, error)`` groups
    refused for good; ``retry`` holds the records to try again (with ``error`` saying why), and
    ``split`` the halves of a batch the receiver found too large. ``stored`` records were taken
    over by a durable store (the spool) that delivers and counts them itself: the worker lets
    go of them without counting them as sent.
    """

    delivered: list[bytes] = field(default_factory=list)
    dropped: list[tuple[str, list[bytes], DeliveryError]] = field(default_factory=list)
    retry: list[bytes] = field(default_factory=list)
    split: list[list[bytes]] = field(default_factory=list)
    error: DeliveryError | None = None
    stored: list[bytes] = field(default_factory=list)


@runtime_checkable
class Exporter(Protocol):
    """Sends batches somewhere; used by the background worker, one batch per lane at a time.

    ``timeout`` bounds one export in seconds; ``export`` must return by ``deadline`` (a
    ``time.monotonic()`` value) and must not raise: every failure is an :class:`Outcome`.
    """

    @property
    def timeout(self) -> float:
        """Seconds one export may take at most."""

    def export(self, batch: Batch, deadline: float) -> Outcome:
        """Send ``batch``; say what became of each record."""

    def shutdown(self) -> None:
        """Release resources (connections, files); the exporter may be used again after."""

    def reinit_after_fork(self) -> None:
        """In a forked child: forget what belongs to the parent (sockets, locks)."""


def classify(batch: list[bytes], error: DeliveryError | None) -> Outcome:
    """The outcome of one attempt that ended with ``error`` (``None``: all delivered)."""
    outcome = Outcome(error=error)
    if error is None:
        outcome.delivered = batch
    elif isinstance(error, PartialImportError):
        failed = _refused_positions(batch, error)
        outcome.delivered = [item for index, item in enumerate(batch) if index not in failed]
        refused = [item for index, item in enumerate(batch) if index in failed]
        if refused:
            outcome.dropped.append(("rejected_by_server", refused, error))
    elif isinstance(error, PayloadTooLargeError):
        if len(batch) > 1:
            half = len(batch) // 2
            outcome.split = [batch[:half], batch[half:]]
        else:
            outcome.dropped.append(("too_large", batch, error))
    elif error.retryable:
        outcome.retry = batch
    else:
        outcome.dropped.append((error.drop_reason, batch, error))
    return outcome


def _refused_positions(batch: list[bytes], error: PartialImportError) -> set[int]:
    """Which records of ``batch`` a strict ``/import`` refused: by ``index`` when the server
    gives one, else by ``$insert_id``; when it names none it can be matched with, all of them
    (none is counted as delivered on a guess)."""
    failed = {index for index in error.failed_indexes if 0 <= index < len(batch)}
    if failed or not error.failed_records:
        return failed
    named = {
        str(entry.get("insert_id") or entry.get("$insert_id"))
        for entry in error.failed_records
        if isinstance(entry, dict)
    }
    for index, payload in enumerate(batch):
        try:
            insert_id = decode_record(payload)["properties"]["$insert_id"]
        except (ValueError, KeyError, TypeError):
            continue
        if str(insert_id) in named:
            failed.add(index)
    return failed or set(range(len(batch)))


class HttpExporter:
    """Posts batches to Mixpanel's ingestion API (gzip where allowed, a total deadline)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    @property
    def timeout(self) -> float:
        """The transport's request deadline, in seconds."""
        return self.transport.timeout

    def export(self, batch: Batch, deadline: float) -> Outcome:
        """POST the batch once and classify the answer."""
        try:
            self.transport.send(
                batch.kind,
                join(batch.records),
                credentials=batch.credentials,
                timeout=deadline - time.monotonic(),
            )
        except DeliveryError as exc:
            return classify(batch.records, exc)
        except Exception as exc:  # a bug below must not lose the batch: retry it
            failure = MixpanelConnectionError(
                f"sending failed unexpectedly: {type(exc).__name__}: {exc}", endpoint=batch.kind
            )
            failure.__cause__ = exc
            return classify(batch.records, failure)
        return classify(batch.records, None)

    def shutdown(self) -> None:
        """Close pooled connections."""
        self.transport.close()

    def reinit_after_fork(self) -> None:
        """Forget the parent's HTTP session."""
        self.transport.reinit_after_fork()

    def __repr__(self) -> str:
        return f"HttpExporter({self.transport!r})"

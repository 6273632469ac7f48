"""Exceptions raised by mp_logbridge.

Two families, because callers handle them differently:

* :class:`InvalidMessageError` is bad input. It is raised at the call that received the input
  (a ``ValueError``), names the offending field, and is never retried.
* :class:`DeliveryError` and its subclasses describe what happened on the way to Mixpanel. Each
  one says whether retrying could help (``retryable``) and carries the server's ``Retry-After``
  when it sent one. Messages never contain credentials.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "ConfigurationError",
    "DeliveryError",
    "InvalidMessageError",
    "MessageTooLargeError",
    "MessagesDropped",
    "MixpanelConnectionError",
    "MixpanelError",
    "MixpanelServerError",
    "PartialImportError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "RejectedError",
    "TLSError",
]


class MixpanelError(Exception):
    """Base class of every exception this library raises."""


class ConfigurationError(MixpanelError, ValueError):
    """An option given to a consumer, handler or tracker cannot be used (unknown region, ...)."""


class InvalidMessageError(MixpanelError, ValueError):
    """A message cannot be sent as given.

    ``field`` is a dotted path to the offending part (``"properties.price"``, ``"event"``,
    ``"$set"``), ``reason`` says what is wrong with it.
    """

    #: The drop reason counted when such a message is dropped.
    drop_reason = "invalid"

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.field, self.reason))


class MessageTooLargeError(InvalidMessageError):
    """An encoded record is over Mixpanel's per-record size limit (1 MB)."""

    drop_reason = "too_large"


class DeliveryError(MixpanelError):
    """Sending to Mixpanel failed.

    Attributes:
        retryable: whether sending the same request again later may succeed.
        status_code: the HTTP status, when a response was received.
        retry_after: seconds the server asked to wait (``Retry-After``), if it said so.
        endpoint: the kind of message that was being sent (``"event"``, ``"import"``, ...).
    """

    retryable_default = False
    #: The drop reason counted when records are refused because of this error (a retryable
    #: error whose retries run out is counted as ``retries_exhausted`` instead).
    drop_reason = "rejected_by_server"

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
        endpoint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retryable = self.retryable_default if retryable is None else retryable
        self.retry_after = retry_after
        self.endpoint = endpoint


class MixpanelConnectionError(DeliveryError):
    """No usable response: connection refused or reset, DNS failure, timeout."""

    retryable_default = True


class TLSError(MixpanelConnectionError):
    """The TLS handshake failed (certificate verification, protocol): not retried.

    The message names the host and the verification error; records are counted as ``tls_error``.
    """

    retryable_default = False
    drop_reason = "tls_error"


class MixpanelServerError(DeliveryError):
    """The server answered with an HTTP error status (or a body that cannot be understood).

    Retryable for 408, 429 and 5xx (except 501 and 505).
    """


class RateLimitedError(MixpanelServerError):
    """HTTP 429: the project exceeded Mixpanel's rate limits. Retryable."""

    retryable_default = True


class PayloadTooLargeError(MixpanelServerError):
    """HTTP 413: the request body was too large. The batch must be split, not retried as is."""


class MessagesDropped(DeliveryError):
    """Messages were dropped before reaching the server; ``reason`` is the drop reason
    (``queue_full``, ``shutdown_timeout``, ``closed``, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.drop_reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, str(self)))


class RejectedError(DeliveryError):
    """The server understood the request and refused its content (``status: 0``, 400, 401, 403).

    Not retryable: the same request would be refused again.
    """


class PartialImportError(RejectedError):
    """A strict ``/import`` answered 400: some records were imported, ``failed_records`` were not.

    ``failed_records`` is the server's list of ``{"index", "insert_id", "field", "message"}``
    entries; ``index`` refers to the position in the request's batch.
    """

    def __init__(
        self,
        message: str,
        *,
        failed_records: Sequence[dict[str, Any]],
        num_records_imported: int,
        status_code: int | None = 400,
        endpoint: str | None = "import",
    ) -> None:
        super().__init__(message, status_code=status_code, endpoint=endpoint)
        self.failed_records = list(failed_records)
        self.num_records_imported = num_records_imported

    @property
    def failed_indexes(self) -> set[int]:
        """Positions (in the request batch) of the records the server refused."""
        out: set[int] = set()
        for item in self.failed_records:  # the server's words: anything may be in there
            index = item.get("index") if isinstance(item, dict) else None
            if isinstance(index, int) and not isinstance(index, bool):
                out.add(index)
            elif isinstance(index, float) and index.is_integer():  # not NaN nor infinite
                out.add(int(index))
        return out

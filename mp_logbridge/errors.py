"""Exceptions raised by mp_logbridge (the library's own; all derive from :class:`MixpanelError`).

* :class:`InvalidMessageError` (a ``ValueError``): bad input, raised at the call that received
  it, naming the field; :class:`MessageTooLargeError` for records over Mixpanel's 1 MB limit.
* :class:`ConfigurationError` (a ``ValueError``): an option that cannot be used.
* :class:`DeliveryError` and its subclasses: what happened on the way to Mixpanel, each saying
  whether retrying could help (``retryable``), carrying ``Retry-After`` when the server sent it,
  and the ``drop_reason`` its records are counted under when they are given up.
* :class:`MessagesDropped`: messages were dropped before reaching the server (``reason``).
"""

from __future__ import annotations

from ._errors import (
    ConfigurationError,
    DeliveryError,
    InvalidMessageError,
    MessagesDropped,
    MessageTooLargeError,
    MixpanelConnectionError,
    MixpanelError,
    MixpanelServerError,
    PartialImportError,
    PayloadTooLargeError,
    RateLimitedError,
    RejectedError,
    TLSError,
)

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

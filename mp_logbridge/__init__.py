"""mp_logbridge: Mixpanel analytics from Python logging and function calls.

Front doors — :class:`Tracker` (the Mixpanel Ruby SDK's vocabulary), :class:`MixpanelHandler`
(tagged log records), :class:`MixpanelProcessor` (structlog) and :func:`instrument` (function
calls) — build Mixpanel records; consumers deliver them: :class:`BackgroundConsumer` in the
background (the default), :class:`Consumer` and :class:`BufferedConsumer` synchronously.
"""

from __future__ import annotations

from ._background import BackgroundConsumer
from ._consumers import BufferedConsumer, CallableSink, Consumer, ConsumerProtocol
from ._context import BoundContext, bind, bound, current_context, unbind
from ._diagnostics import DROP_REASONS
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
from ._handler import DEFAULT_RECORD_PROPERTIES, RESERVED_RECORD_ATTRIBUTES, MixpanelHandler
from ._instrument import instrument, instrumentation_stats
from ._lifecycle import deliver_on_signal, flush_all
from ._messages import MessageSource
from ._patching import instrument_function, instrument_functions, uninstrument_function
from ._retry import RetryPolicy
from ._structlog import MixpanelProcessor
from ._tags import Tag, Tags, tag
from ._tracker import ErrorHandler, Groups, People, Tracker
from ._transport import REGIONS, Endpoints, ProjectSecret, ServiceAccount, resolve_endpoints
from ._version import __version__

#: The earlier name of :class:`BackgroundConsumer` (it is threads, not asyncio).
AsyncConsumer = BackgroundConsumer

__all__ = [
    "DEFAULT_RECORD_PROPERTIES",
    "DROP_REASONS",
    "REGIONS",
    "RESERVED_RECORD_ATTRIBUTES",
    "AsyncConsumer",
    "BackgroundConsumer",
    "BoundContext",
    "BufferedConsumer",
    "CallableSink",
    "ConfigurationError",
    "Consumer",
    "ConsumerProtocol",
    "DeliveryError",
    "Endpoints",
    "ErrorHandler",
    "Groups",
    "InvalidMessageError",
    "MessageSource",
    "MessageTooLargeError",
    "MessagesDropped",
    "MixpanelConnectionError",
    "MixpanelError",
    "MixpanelHandler",
    "MixpanelProcessor",
    "MixpanelServerError",
    "PartialImportError",
    "PayloadTooLargeError",
    "People",
    "ProjectSecret",
    "RateLimitedError",
    "RejectedError",
    "RetryPolicy",
    "ServiceAccount",
    "TLSError",
    "Tag",
    "Tags",
    "Tracker",
    "__version__",
    "bind",
    "bound",
    "current_context",
    "deliver_on_signal",
    "flush_all",
    "instrument",
    "instrument_function",
    "instrument_functions",
    "instrumentation_stats",
    "resolve_endpoints",
    "tag",
    "unbind",
    "uninstrument_function",
]

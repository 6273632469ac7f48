"""mp_logbridge: Mixpanel analytics from Python logging and function calls.

The front doors — :class:`MixpanelHandler` (tagged log records, built with :data:`tag`),
:class:`MixpanelProcessor` (structlog), :func:`instrument` (function calls) and
:class:`Tracker` (the Mixpanel Ruby SDK's vocabulary) — build Mixpanel records; consumers deliver
them: :class:`BackgroundConsumer` in the background (the default), :class:`Consumer` and
:class:`BufferedConsumer` synchronously. :func:`bound` says who the current work is for.

Everything else lives in public namespaces: :mod:`mp_logbridge.consumers`,
:mod:`mp_logbridge.errors`, :mod:`mp_logbridge.context`, :mod:`mp_logbridge.tags`,
:mod:`mp_logbridge.tracker`, :mod:`mp_logbridge.stdlib`, :mod:`mp_logbridge.instrumentation`,
:mod:`mp_logbridge.transport`, :mod:`mp_logbridge.testing`, :mod:`mp_logbridge.spool`,
:mod:`mp_logbridge.redis`, :mod:`mp_logbridge.relay` and :mod:`mp_logbridge.integrations`.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from ._background import BackgroundConsumer
from ._consumers import BufferedConsumer, Consumer
from ._context import bind, bound, unbind
from ._errors import ConfigurationError, DeliveryError, InvalidMessageError, MixpanelError
from ._handler import MixpanelHandler
from ._instrument import instrument
from ._lifecycle import deliver_on_signal, flush_all
from ._structlog import MixpanelProcessor
from ._tags import tag
from ._tracker import Tracker
from ._transport import ProjectSecret, ServiceAccount
from ._version import __version__

__all__ = [
    "BackgroundConsumer",
    "BufferedConsumer",
    "ConfigurationError",
    "Consumer",
    "DeliveryError",
    "InvalidMessageError",
    "MixpanelError",
    "MixpanelHandler",
    "MixpanelProcessor",
    "ProjectSecret",
    "ServiceAccount",
    "Tracker",
    "__version__",
    "bind",
    "bound",
    "deliver_on_signal",
    "flush_all",
    "instrument",
    "tag",
    "unbind",
]

# Names that used to be here, and where they live now (still reachable, with a warning).
_MOVED = {
    "AsyncConsumer": ("consumers", "BackgroundConsumer"),
    "CallableSink": ("consumers", "CallableSink"),
    "ConsumerProtocol": ("consumers", "ConsumerProtocol"),
    "RetryPolicy": ("consumers", "RetryPolicy"),
    "DROP_REASONS": ("consumers", "DROP_REASONS"),
    "MessageSource": ("consumers", "MessageSource"),
    "BoundContext": ("context", "BoundContext"),
    "current_context": ("context", "current_context"),
    "DEFAULT_RECORD_PROPERTIES": ("stdlib", "DEFAULT_RECORD_PROPERTIES"),
    "RESERVED_RECORD_ATTRIBUTES": ("stdlib", "RESERVED_RECORD_ATTRIBUTES"),
    "Tag": ("tags", "TagExtra"),
    "Tags": ("tags", "TagBuilder"),
    "ErrorHandler": ("tracker", "ErrorHandler"),
    "People": ("tracker", "People"),
    "Groups": ("tracker", "Groups"),
    "instrument_function": ("instrumentation", "instrument_function"),
    "instrument_functions": ("instrumentation", "instrument_functions"),
    "uninstrument_function": ("instrumentation", "uninstrument_function"),
    "instrumentation_stats": ("instrumentation", "instrumentation_stats"),
    "REGIONS": ("transport", "REGIONS"),
    "Endpoints": ("transport", "Endpoints"),
    "resolve_endpoints": ("transport", "resolve_endpoints"),
    **{
        name: ("errors", name)
        for name in (
            "MessageTooLargeError",
            "MessagesDropped",
            "MixpanelConnectionError",
            "MixpanelServerError",
            "PartialImportError",
            "PayloadTooLargeError",
            "RateLimitedError",
            "RejectedError",
            "TLSError",
        )
    },
}


def __getattr__(name: str) -> Any:
    moved = _MOVED.get(name)
    if moved is None:
        raise AttributeError(f"module 'mp_logbridge' has no attribute {name!r}")
    module, attribute = moved
    warnings.warn(
        f"mp_logbridge.{name} moved to mp_logbridge.{module}.{attribute}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(f"mp_logbridge.{module}"), attribute)


def __dir__() -> list[str]:
    return sorted(__all__)

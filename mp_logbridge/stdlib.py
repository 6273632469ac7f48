"""The standard library's logging: :class:`MixpanelHandler`, and the LogRecord attributes it can
copy into events (:data:`DEFAULT_RECORD_PROPERTIES`) or must not be used as ``extra=`` keys
(:data:`RESERVED_RECORD_ATTRIBUTES`)."""

from __future__ import annotations

from ._handler import DEFAULT_RECORD_PROPERTIES, RESERVED_RECORD_ATTRIBUTES, MixpanelHandler

__all__ = ["DEFAULT_RECORD_PROPERTIES", "RESERVED_RECORD_ATTRIBUTES", "MixpanelHandler"]

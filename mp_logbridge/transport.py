"""Where messages are sent and how: regions and endpoints, ``/import`` credentials, and the
HTTP :class:`Transport` (which a consumer takes as ``transport=``)."""

from __future__ import annotations

from ._transport import (
    MAX_RESPONSE_BYTES,
    REGIONS,
    Endpoints,
    ProjectSecret,
    ServiceAccount,
    Transport,
    resolve_endpoints,
)

__all__ = [
    "MAX_RESPONSE_BYTES",
    "REGIONS",
    "Endpoints",
    "ProjectSecret",
    "ServiceAccount",
    "Transport",
    "resolve_endpoints",
]

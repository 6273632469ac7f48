"""Consumers — where messages go — and the seams to plug your own delivery into.

* :class:`BackgroundConsumer`: batches and delivers from background threads (the default of
  every front door); :class:`Consumer` sends each message at once, :class:`BufferedConsumer` in
  batches, both on the caller's thread; :class:`CallableSink` lets ``callable(kind, message)``
  stand in for a consumer (the Ruby SDK's block form); :class:`DisabledConsumer` accepts
  everything and sends nothing (``disabled=True``). They share one contract,
  :class:`ConsumerProtocol`, so every front door works with every consumer; an object of yours
  with only ``send(kind, message)`` is seen through :class:`CountingConsumer`, which counts
  what it accepted and refused. :data:`ConsumerLike` is what ``consumer=`` takes.
* :class:`RetryPolicy`: when failed requests are tried again.
* :data:`DROP_REASONS`: the names under which lost messages are counted in ``stats()``.
* The exporter seam, for sending somewhere else than Mixpanel's HTTP API (a spool, a broker):
  an :class:`Exporter` receives one :class:`Batch` at a time and returns an :class:`Outcome`;
  pass it as ``BackgroundConsumer(exporter=...)``. :class:`HttpExporter` is the HTTP one.
* :class:`MessageSource`: a deferred message, built on the consumer's thread.
"""

from __future__ import annotations

from ._background import BackgroundConsumer
from ._consumers import (
    BufferedConsumer,
    CallableSink,
    Consumer,
    ConsumerLike,
    ConsumerProtocol,
    CountingConsumer,
    DisabledConsumer,
    ErrorCallback,
)
from ._diagnostics import DROP_REASONS
from ._export import Batch, Exporter, HttpExporter, Outcome
from ._messages import MessageSource
from ._retry import RetryPolicy

__all__ = [
    "DROP_REASONS",
    "BackgroundConsumer",
    "Batch",
    "BufferedConsumer",
    "CallableSink",
    "Consumer",
    "ConsumerLike",
    "ConsumerProtocol",
    "CountingConsumer",
    "DisabledConsumer",
    "ErrorCallback",
    "Exporter",
    "HttpExporter",
    "MessageSource",
    "Outcome",
    "RetryPolicy",
]

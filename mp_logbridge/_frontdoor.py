"""Plumbing shared by the logging front doors (the stdlib handler and the structlog processor).

* :class:`Delivery`: the consumer a front door sends through — given explicitly, or an
  :class:`~mp_logbridge.AsyncConsumer` made from delivery options and shared (reference counted)
  with every other front door configured with the same options, so ten handlers do not mean ten
  threads and ten connection pools.
* :func:`submit`: the caller-thread part of turning a tag into messages — split it by kind,
  capture the context once, queue one deferred :class:`~mp_logbridge._tags.TagMessage` per entry.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ._async import AsyncConsumer
from ._consumers import as_consumer
from ._context import BoundContext, baggage_distinct_id, span_ids
from ._errors import ConfigurationError
from ._tags import BridgeSpec, Capture, TagMessage, needs_user_lookup, split_tag
from ._transport import Credentials, as_credentials, normalize_region, resolve_endpoints

__all__ = ["DELIVERY_OPTIONS", "Delivery", "submit"]

#: Options a front door passes to the AsyncConsumer it makes (all of them decide sharing).
DELIVERY_OPTIONS = (
    "batch_size",
    "max_batch_bytes",
    "flush_interval",
    "max_queue_size",
    "max_queue_bytes",
    "overflow",
    "request_timeout",
    "verify",
    "flush_timeout",
    "exit_timeout",
)


class _SharedConsumers:
    """Consumers shared by front doors with identical delivery settings (reference counted)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[Any, list[Any]] = {}

    def acquire(self, key: Any, factory: Callable[[], AsyncConsumer]) -> AsyncConsumer:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0]._closed:
                entry = self._entries[key] = [factory(), 0]
            entry[1] += 1
            consumer: AsyncConsumer = entry[0]
            return consumer

    def release(self, key: Any) -> AsyncConsumer | None:
        """Drop one reference; returns the consumer when that was the last one."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            entry[1] -= 1
            if entry[1] > 0:
                return None
            del self._entries[key]
            consumer: AsyncConsumer = entry[0]
            return consumer

    def reinit_after_fork(self) -> None:
        self._lock = threading.Lock()


_shared = _SharedConsumers()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_shared.reinit_after_fork)


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


class Delivery:
    """The consumer behind one front door, and whether the front door owns a share of it."""

    __slots__ = ("_key", "consumer")

    def __init__(
        self,
        *,
        consumer: Any = None,
        region: str | None = None,
        api_host: str | None = None,
        credentials: Credentials | None = None,
        api_secret: str | None = None,
        retry: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        enabled: bool = True,
        owner: str = "front door",
    ) -> None:
        options = dict(options or {})
        unknown = sorted(set(options) - set(DELIVERY_OPTIONS))
        if unknown:
            raise ConfigurationError(f"{owner} got unknown option(s): {', '.join(unknown)}")
        self._key: Any = None
        if consumer is not None:
            self.consumer: Any = as_consumer(consumer)
            return
        if region is not None:
            normalize_region(region)  # checked even when api_host overrides it
        endpoints = resolve_endpoints(region=region, api_host=api_host)
        creds = as_credentials(credentials, api_secret)
        settings = {name: options[name] for name in options}
        if retry is not None:
            settings["retry"] = {key: retry[key] for key in retry}

        def make() -> AsyncConsumer:
            return AsyncConsumer(
                endpoints.event,
                endpoints.profile_update,
                endpoints.group_update,
                endpoints.import_,
                credentials=creds,
                **settings,
            )

        if not enabled:
            make().close()  # options are checked even when there is no token to send with
            self.consumer = None
            return
        self._key = (endpoints, creds, _freeze(settings))
        self.consumer = _shared.acquire(self._key, make)

    @property
    def shared(self) -> bool:
        """Whether the consumer was made here (and is shared by reference count)."""
        return self._key is not None

    def release(self) -> None:
        """Give back this front door's share; the last one closes the consumer. Idempotent."""
        key, self._key = self._key, None
        if key is not None:
            last = _shared.release(key)
            if last is not None:
                last.close()
        elif self.consumer is not None:
            self.flush()

    def flush(self, timeout: float | None = None) -> bool:
        """Flush the consumer (``True`` when everything was delivered)."""
        consumer = self.consumer
        return True if consumer is None else bool(consumer.flush(timeout))

    def stats(self) -> dict[str, Any]:
        """The consumer's counters (empty when it keeps none)."""
        stats = getattr(self.consumer, "stats", None)
        return dict(stats()) if callable(stats) else {}


def submit(
    spec: BridgeSpec,
    send: Callable[[str, Any], Any],
    value: Any,
    *,
    created: float,
    message: Callable[[], str | None],
    context: BoundContext,
    extra: Mapping[str, Any] | None = None,
    facts: tuple[Any, ...] | None = None,
) -> int:
    """Queue the messages of one tag; returns how many.

    Runs on the caller's thread, so it only reads what does not cross threads (the bound
    context, baggage, the active span) and defers everything else to ``TagMessage.build``.
    ``message`` is called only when an event takes its name from the log message.
    """
    parts = split_tag(value)
    text = None
    for kind, item, _op in parts:
        if kind == "event" and not (isinstance(item, Mapping) and item.get("event")):
            text = message()
            break
    baggage_id = None
    if (
        context.distinct_id is None
        and any(needs_user_lookup(kind, item) for kind, item, _op in parts)
    ):
        baggage_id = baggage_distinct_id()
    capture = Capture(
        spec,
        created,
        text,
        context,
        baggage_id=baggage_id,
        span=span_ids() if spec.include_trace else None,
        extra=extra,
        facts=facts,
    )
    for index, (kind, item, op) in enumerate(parts):
        send(kind, TagMessage(capture, kind, item, op, index))
    return len(parts)

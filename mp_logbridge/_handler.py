"""``MixpanelHandler``: a ``logging.Handler`` that turns tagged log records into Mixpanel messages.

Only records carrying the tag attribute (``extra={"mixpanel": ...}``, see
:mod:`mp_logbridge._tags`) are selected; every other record is rejected before the handler's
lock at the cost of one attribute lookup. For a tagged record the caller's thread only captures
what it must (the tag, the record time, the bound context, trace ids) and queues one message per
tag entry; building, checking and encoding happen on the consumer's sender thread.

Handlers with identical delivery settings share one consumer (one thread, one connection
pool), and a record that reaches two handlers of the same project is sent once.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from ._async import AsyncConsumer, is_sender_thread
from ._consumers import as_consumer
from ._context import baggage_distinct_id, current_context, span_ids
from ._diagnostics import DeliveryStats, warn
from ._errors import ConfigurationError, InvalidMessageError
from ._tags import (
    DEFAULT_TAG,
    BridgeSpec,
    Capture,
    TagMessage,
    exception_properties,
    needs_user_lookup,
    split_tag,
)
from ._transport import Credentials, as_credentials, normalize_region, resolve_endpoints

__all__ = ["DEFAULT_RECORD_PROPERTIES", "RESERVED_RECORD_ATTRIBUTES", "MixpanelHandler"]

#: ``record_properties=True`` copies these LogRecord attributes, under these property names.
DEFAULT_RECORD_PROPERTIES: Mapping[str, str] = {
    "name": "logger",
    "levelname": "level",
    "module": "module",
    "funcName": "function",
    "lineno": "line",
}

#: Attribute names of every ``LogRecord`` on this Python (``extra=`` must not use them).
RESERVED_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
}

_SENT_MARK = "_mp_logbridge_sent"
_OWN_LOGGER = "mp_logbridge"
_OWN_PREFIX_LEN = len(_OWN_LOGGER)

# Delivery options a handler passes to the consumer it makes (and that decide sharing).
_DELIVERY_OPTIONS = (
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
    """Consumers shared by handlers with identical delivery settings (reference counted)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[Any, list[Any]] = {}

    def acquire(self, key: Any, factory: Any) -> AsyncConsumer:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0]._closed:
                entry = self._entries[key] = [factory(), 0]
            entry[1] += 1
            consumer: AsyncConsumer = entry[0]
            return consumer

    def release(self, key: Any) -> AsyncConsumer | None:
        """Drop one reference; returns the consumer when it was the last one (to be closed)."""
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


def _record_mapping(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None or value is False:
        return ()
    if value is True:
        return tuple(DEFAULT_RECORD_PROPERTIES.items())
    if isinstance(value, Mapping):
        pairs = [(str(attr), str(prop)) for attr, prop in value.items()]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        pairs = [(str(attr), str(attr)) for attr in value]
    else:
        raise ConfigurationError(
            "record_properties must be True, a list of attribute names or a mapping"
        )
    for attr, _prop in pairs:
        if attr not in RESERVED_RECORD_ATTRIBUTES:
            raise ConfigurationError(
                f"record_properties: {attr!r} is not a LogRecord attribute; list extra= fields in extra_properties"
            )
    return tuple(pairs)


class MixpanelHandler(logging.Handler):
    """Send tagged log records to Mixpanel as events, profile, group and revenue updates.

    Every argument is keyword-only apart from ``token``, and each is a plain value, so the
    handler works from ``logging.config.dictConfig`` (``"class"`` or ``"()"``, JSON or YAML).

    Args:
        token: the project token (default: ``MIXPANEL_TOKEN``). With no token anywhere the
            handler is disabled: it warns once and counts what it skips.
        region, api_host: where to send (``"us"``/``"eu"``/``"in"``, or a host/URL; default:
            ``MIXPANEL_API_HOST``, ``MIXPANEL_REGION``, then the US).
        level: the handler's level.
        tag: the name of the tag attribute (default ``"mixpanel"``).
        super_properties: properties added to every event (``{"service": "billing"}``).
        default_distinct_id: the user for records that name none (none bound, no baggage).
        record_properties: LogRecord attributes to add to events — ``True`` for
            :data:`DEFAULT_RECORD_PROPERTIES`, a list of attribute names, or a mapping from
            attribute name to property name.
        extra_properties: names of other ``extra=`` fields to copy into events when present.
        include_exception: add ``exception_type``/``exception_message`` when the record has
            ``exc_info`` (default on).
        include_trace: add the active OpenTelemetry ``trace_id``/``span_id`` (default on).
        consumer: deliver through this consumer (or ``callable(kind, message)``) instead of an
            :class:`~mp_logbridge.AsyncConsumer` made from the delivery options below; the
            handler flushes it but does not close it.
        credentials, api_secret: ``/import`` credentials for the consumer made.
        batch_size, max_batch_bytes, flush_interval, max_queue_size, max_queue_bytes, overflow,
        request_timeout, verify, flush_timeout, exit_timeout, retry: passed to the
            :class:`~mp_logbridge.AsyncConsumer`; handlers whose options are all equal share one.
    """

    def __init__(
        self,
        token: str | None = None,
        *,
        level: int | str = logging.NOTSET,
        region: str | None = None,
        api_host: str | None = None,
        tag: str = DEFAULT_TAG,
        super_properties: Mapping[str, Any] | None = None,
        default_distinct_id: str | int | None = None,
        record_properties: bool | Sequence[str] | Mapping[str, str] | None = None,
        extra_properties: Sequence[str] | None = None,
        include_exception: bool = True,
        include_trace: bool = True,
        consumer: Any = None,
        credentials: Credentials | None = None,
        api_secret: str | None = None,
        retry: Mapping[str, Any] | None = None,
        **delivery: Any,
    ) -> None:
        super().__init__(level)
        unknown = sorted(set(delivery) - set(_DELIVERY_OPTIONS))
        if unknown:
            raise ConfigurationError(f"MixpanelHandler got unknown option(s): {', '.join(unknown)}")
        if not isinstance(tag, str) or not tag.isidentifier() or tag in RESERVED_RECORD_ATTRIBUTES:
            raise ConfigurationError(
                f"tag must be an identifier that is not a LogRecord attribute, got {tag!r}"
            )
        if super_properties is not None and not isinstance(super_properties, Mapping):
            raise ConfigurationError("super_properties must be a mapping")
        self.tag = tag
        self._record_props = _record_mapping(record_properties)
        self._extra_props = tuple(str(name) for name in (extra_properties or ()))
        for name in self._extra_props:
            if name in RESERVED_RECORD_ATTRIBUTES:
                raise ConfigurationError(
                    f"extra_properties: {name!r} is a LogRecord attribute; use record_properties"
                )
        self._include_exception = bool(include_exception)
        self._include_trace = bool(include_trace)
        self._skipped = 0
        self._invalid = DeliveryStats()
        self._closed_handler = False
        self._share_key: Any = None
        self._owns_consumer = False
        token = token if token is not None else os.environ.get("MIXPANEL_TOKEN")
        self.enabled = isinstance(token, str) and bool(token.strip())
        self.token = token if self.enabled else None
        self._spec = BridgeSpec(
            token or "",
            super_properties={k: super_properties[k] for k in super_properties}
            if super_properties
            else None,
            default_distinct_id=default_distinct_id,
            include_trace=self._include_trace,
            include_exception=self._include_exception,
        )
        if region is not None:  # checked even when api_host (or consumer=) makes it moot
            normalize_region(region)
        if consumer is not None:
            self.consumer: Any = as_consumer(consumer)
        else:
            endpoints = resolve_endpoints(region=region, api_host=api_host)
            creds = as_credentials(credentials, api_secret)
            options = {name: delivery[name] for name in delivery}
            if retry is not None:
                options["retry"] = {key: retry[key] for key in retry}
            self._share_key = (endpoints, creds, _freeze(options))

            def make_consumer() -> AsyncConsumer:
                return AsyncConsumer(
                    endpoints.event,
                    endpoints.profile_update,
                    endpoints.group_update,
                    endpoints.import_,
                    credentials=creds,
                    **options,
                )

            if self.enabled:
                self.consumer = _shared.acquire(self._share_key, make_consumer)
                self._owns_consumer = True
            else:
                # Disabled, but the options are checked all the same (no thread, no I/O), so a
                # configuration that fails in production fails on a machine without a token too.
                make_consumer().close()
                self.consumer = None
        if not self.enabled:
            warn(
                "MixpanelHandler has no Mixpanel token (pass token= or set MIXPANEL_TOKEN): "
                "it is disabled and will count the records it skips"
            )

    def __repr__(self) -> str:
        level = logging.getLevelName(self.level)
        state = "" if self.enabled else " disabled"
        return f"<MixpanelHandler ({level}){state} tag={self.tag!r} consumer={self.consumer!r}>"

    # ------------------------------------------------------------------ the hot path

    def handle(self, record: logging.LogRecord) -> Any:
        """Select tagged records; reject everything else before any lock is taken.

        Records of the library's own loggers and records logged on its sender threads are
        never handled (no feedback loops, no waiting on a lock ``logging.shutdown`` holds).
        ``emit`` only queues, so it does not need the handler lock either.
        """
        value = record.__dict__.get(self.tag)
        if value is None or value is False:
            return False
        name = record.name
        if is_sender_thread() or (
            name.startswith(_OWN_LOGGER) and (name == _OWN_LOGGER or name[_OWN_PREFIX_LEN] == ".")
        ):
            return False
        if self.filters:
            result = self.filter(record)
            if not result:
                return False
            if isinstance(result, logging.LogRecord):
                record = result
        self.emit(record)
        return record

    def emit(self, record: logging.LogRecord) -> None:
        """Capture the tagged record and queue its messages (never raises, never blocks)."""
        try:
            if not self.enabled:
                self._skipped += 1
                return
            spec = self._spec
            # Another handler of this project that reads the same tag has it already; one that
            # reads another tag has other messages to send.
            seen = (spec.token, self.tag)
            sent = record.__dict__.get(_SENT_MARK)
            if sent is not None and seen in sent:
                return
            record.__dict__[_SENT_MARK] = (*sent, seen) if sent else (seen,)
            parts = split_tag(record.__dict__[self.tag])
            message = None
            for kind, item, _op in parts:
                if kind == "event" and not (isinstance(item, Mapping) and item.get("event")):
                    message = record.getMessage()
                    break
            context = current_context()
            baggage_id = None
            # Baggage comes before the configured default, so it is read whenever no user is
            # bound and some message names none itself.
            if context.distinct_id is None and any(
                needs_user_lookup(kind, item) for kind, item, _op in parts
            ):
                baggage_id = baggage_distinct_id()
            capture = Capture(
                spec,
                record.created,
                message,
                context,
                baggage_id=baggage_id,
                span=span_ids() if self._include_trace else None,
                extra=self._extra(record)
                if (self._record_props or self._extra_props or record.exc_info)
                else None,
                facts=(record.created, record.process, record.thread, record.name, record.lineno),
            )
            send = self.consumer.send
            for index, (kind, item, op) in enumerate(parts):
                # A consumer that builds on this thread (``consumer=`` a callable or a
                # synchronous consumer) raises for a bad message: count it, send the others.
                try:
                    send(kind, TagMessage(capture, kind, item, op, index))
                except InvalidMessageError as error:
                    self._count_invalid(error)
                except RecursionError:  # pragma: no cover - as the stdlib handlers do
                    raise
                except Exception:
                    self.handleError(record)
        except RecursionError:  # pragma: no cover - as the stdlib handlers do
            raise
        except Exception:
            self.handleError(record)

    def _count_invalid(self, error: InvalidMessageError) -> None:
        """Count and report a message a synchronous consumer refused as invalid."""
        self._invalid.add_dropped("invalid", 1, f"{type(error).__name__}: {error}")
        self._invalid.report()

    def _extra(self, record: logging.LogRecord) -> dict[str, Any] | None:
        props: dict[str, Any] = {}
        values = record.__dict__
        for attr, prop in self._record_props:
            props[prop] = values.get(attr)
        for name in self._extra_props:
            if name in values:
                props[name] = values[name]
        if self._include_exception and record.exc_info and record.exc_info[1] is not None:
            props.update(exception_properties(record.exc_info[1]))
        return props or None

    # ------------------------------------------------------------------ lifecycle

    def flush(self, timeout: float | None = None) -> bool:  # type: ignore[override]
        """Deliver what is queued (bounded by the consumer's ``flush_timeout``).

        Returns ``True`` when everything was delivered.
        """
        consumer = self.consumer
        if consumer is None:
            return True
        try:
            return bool(consumer.flush(timeout))
        except Exception as exc:
            warn("MixpanelHandler flush failed: %s: %s", type(exc).__name__, exc)
            return False

    def close(self) -> None:
        """Flush and release the consumer (closed when no other handler shares it). Idempotent."""
        try:
            if not self._closed_handler:
                self._closed_handler = True
                if self._owns_consumer and self._share_key is not None:
                    last = _shared.release(self._share_key)
                    if last is not None:
                        last.close()
                elif self.consumer is not None:
                    self.flush()
        finally:
            super().close()

    def stats(self) -> dict[str, Any]:
        """The consumer's delivery counters, plus ``skipped`` (records a disabled handler skipped).

        With a consumer that keeps no counters (``consumer=`` a callable), ``dropped`` counts the
        messages it refused as invalid.
        """
        stats = getattr(self.consumer, "stats", None)
        result = dict(stats()) if callable(stats) else {}
        if not callable(stats):  # consumers with counters have counted their invalid messages
            local = self._invalid.snapshot()
            result["dropped"] = local["dropped"]
            result["dropped_total"] = local["dropped_total"]
        result["skipped"] = self._skipped
        result["enabled"] = self.enabled
        return result

"""``MixpanelHandler``: a ``logging.Handler`` that turns tagged log records into Mixpanel messages.

Only records carrying the tag attribute (``extra={"mixpanel": ...}``, see
:mod:`mp_logbridge._tags`) are selected; every other record is rejected before the handler's
lock at the cost of one attribute lookup. For a tagged record the caller's thread only captures
what it must (the tag, the record time, snapshots of the bound and OpenTelemetry contexts) and
queues one message per tag entry; building (span ids and baggage included), checking and
encoding happen on the consumer's sender thread.

Handlers with identical delivery settings share one consumer (one thread, one connection
pool), and a record that reaches two handlers of the same project is sent once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from threading import get_ident
from typing import Any

from . import _frontdoor
from ._aio import off_loop
from ._consumers import ConsumerLike
from ._context import bound_context_getter, current_context
from ._diagnostics import callback_thread_idents as _callback_idents
from ._errors import ConfigurationError
from ._frontdoor import SENT_MARK, Bridge
from ._tags import DEFAULT_TAG, BuiltTag, event_text, exception_properties
from ._transport import Credentials

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

_bound_get = bound_context_getter()
_OWN_LOGGER = "mp_logbridge"
_OWN_PREFIX_LEN = len(_OWN_LOGGER)


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
        region: the region to send to, ``"us"``, ``"eu"`` or ``"in"`` (default:
            ``MIXPANEL_REGION``, then the US).
        api_host: a host or base URL to send to instead (a proxy, the local receiver; default:
            ``MIXPANEL_API_HOST``, which wins over ``MIXPANEL_REGION``).
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
            :class:`~mp_logbridge.BackgroundConsumer` made from the delivery options; the
            handler flushes it but does not close it.
        credentials: ``/import`` credentials for the consumer made (a
            :class:`~mp_logbridge.ServiceAccount` or :class:`~mp_logbridge.ProjectSecret`).
        api_secret: a project's API secret, shorthand for ``credentials=ProjectSecret(...)``.
        retry: the retry policy of the consumer made (a
            :class:`~mp_logbridge.consumers.RetryPolicy` or a mapping of its fields).
        **delivery: the delivery options of the
            :class:`~mp_logbridge.BackgroundConsumer` made for the handler (``batch_size``,
            ``flush_interval``, ``max_queue_size``, ``exit_timeout``, ``spool``, ``debug``, ...),
            with its defaults; handlers whose options are all equal share one consumer. Also
            what may leave the process: ``before_send`` (a hook that changes or drops each
            record), ``sample_rate`` (sampling by user), ``redact``/``redact_mode``/
            ``redact_key`` (named properties at any depth); with any of them set, records are
            built at the call. ``disabled=True`` accepts everything and sends nothing (default:
            ``MIXPANEL_DISABLED``).
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
        consumer: ConsumerLike | None = None,
        credentials: Credentials | None = None,
        api_secret: str | None = None,
        retry: Mapping[str, Any] | None = None,
        **delivery: Any,
    ) -> None:
        # Everything is checked (and the bridge made) before ``Handler.__init__`` registers the
        # handler with logging: a handler refused here never reaches ``logging.shutdown``.
        if not isinstance(tag, str) or not tag.isidentifier() or tag in RESERVED_RECORD_ATTRIBUTES:
            raise ConfigurationError(
                f"tag must be an identifier that is not a LogRecord attribute, got {tag!r}"
            )
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
        self._bridge = Bridge(
            "MixpanelHandler",
            token,
            tag=tag,
            super_properties=super_properties,
            default_distinct_id=default_distinct_id,
            include_trace=self._include_trace,
            include_exception=self._include_exception,
            consumer=consumer,
            region=region,
            api_host=api_host,
            credentials=credentials,
            api_secret=api_secret,
            retry=retry,
            options=delivery,
        )
        try:
            logging.Handler.__init__(self, level)
        except BaseException:
            self._bridge.close()
            raise
        self.enabled = self._bridge.enabled
        self.token = self._bridge.spec.token if self.enabled else None
        # ``handle`` may skip ``emit`` for plain records unless a subclass changed ``emit``.
        self._direct = (
            type(self).emit is MixpanelHandler.emit
            and not self._record_props
            and not self._extra_props
        )
        self._mark = (self._bridge.mark,)

    @property
    def consumer(self) -> Any:
        """The consumer this handler sends through (``None`` when disabled)."""
        return self._bridge.consumer

    def __repr__(self) -> str:
        level = logging.getLevelName(self.level)
        state = "" if self.enabled else " disabled"
        return f"<MixpanelHandler ({level}){state} tag={self.tag!r} consumer={self.consumer!r}>"

    # ------------------------------------------------------------------ the hot path

    def handle(self, record: logging.LogRecord) -> Any:
        """Select tagged records; reject everything else before any lock is taken.

        The handler's filters run first, as the standard library runs them (a filter may add
        the tag); without filters an untagged record costs one attribute lookup. The tag is read
        from the record's attributes, or from ``record.msg`` when that is a dict carrying it
        (structlog's ``ProcessorFormatter.wrap_for_formatter``). Records of the library's own
        loggers are never sent, and tagged records logged from an ``on_error`` callback are
        counted as ``feedback_loop`` instead (no feedback loops). ``emit`` only queues, so it does not
        need the handler lock either.
        """
        if self.filters:
            result = self.filter(record)
            if not result:
                return False
            if isinstance(result, logging.LogRecord):
                record = result
        tag = self.tag
        holder = record.__dict__
        value = holder.get(tag)
        if value is None:
            msg = record.msg
            if type(msg) is not dict or msg.get(tag) is None:
                return False
        elif value is False:
            return False
        if record.name.startswith(_OWN_LOGGER):  # "mp_logbridge" and its children
            name = record.name
            if len(name) == _OWN_PREFIX_LEN or name[_OWN_PREFIX_LEN] == ".":
                return False
        if _callback_idents and get_ident() in _callback_idents:
            # Logged from an on_error callback: if it failed too, it would call it again.
            self._bridge.lose("feedback_loop", "a tagged record logged from an on_error callback")
            return False
        if (
            type(value) is BuiltTag
            and self._direct
            and not record.exc_info
            and SENT_MARK not in holder
            and not _frontdoor.copies_claimed
        ):
            # The common case, kept short: one message a tag builder made, nothing else to copy.
            fast = self._bridge.fast
            if fast is not None:
                holder[SENT_MARK] = self._mark
                try:
                    fast(value, record.created, record.getMessage, _bound_get())
                except RecursionError:  # pragma: no cover - as the stdlib handlers do
                    raise
                except Exception as exc:
                    self._bridge.lose("invalid", f"the record could not be captured: {exc!r}")
                    self.handleError(record)
                return record
        self.emit(record)
        return record

    def emit(self, record: logging.LogRecord) -> None:
        """Capture the tagged record and queue its messages (never raises, never blocks).

        A record that cannot be captured (its message cannot be formatted, its tag breaks while
        being read) is counted as ``invalid``, reported, and passed to :meth:`handleError`.
        """
        try:
            holder: dict[str, Any] = record.__dict__
            value = holder.get(self.tag)
            message: Any = record.getMessage
            if value is None:  # the tag is in structlog's event dict, in record.msg
                holder = record.msg  # type: ignore[assignment]
                value = holder.get(self.tag)
                message = lambda: event_text(holder)  # noqa: E731
            bridge = self._bridge
            if not bridge.enabled:
                bridge.skipped += 1
                return
            if not bridge.claim(holder):
                return  # another handler of this project sent it already
            extra = None
            if self._record_props or self._extra_props or record.exc_info:
                extra = self._extra(record)
            bridge.send(value, record.created, message, current_context(), extra)
        except RecursionError:  # pragma: no cover - as the stdlib handlers do
            raise
        except Exception as exc:
            self._bridge.lose("invalid", f"the record could not be captured: {_describe(exc)}")
            self.handleError(record)

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
        return self._bridge.flush(timeout)

    def close(self) -> None:
        """Flush and release the consumer (closed when no other front door shares it).

        Idempotent. A consumer given with ``consumer=`` is flushed, not closed.
        """
        try:
            self._bridge.close()
        finally:
            super().close()

    async def aflush(self, timeout: float | None = None) -> bool:
        """:meth:`flush` for asyncio code: waits in a thread, the event loop keeps running."""
        return await self._bridge.aflush(timeout)

    async def aclose(self) -> None:
        """:meth:`close` for asyncio code: waits in a thread, the event loop keeps running."""
        await off_loop(self.close)

    def stats(self) -> dict[str, Any]:
        """The consumer's delivery counters, plus losses counted by the handler itself (messages
        a ``consumer=`` callable refused, records after ``close()``), ``skipped`` (records a
        disabled handler skipped) and ``enabled``."""
        return self._bridge.stats()


def _describe(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:
        return type(exc).__name__

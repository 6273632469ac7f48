"""``MixpanelProcessor``: the same tags, from structlog event dicts.

A structlog processor (a callable class with ``__slots__``, configuration bound at construction)
that turns event dicts carrying the tag key into Mixpanel messages and returns the event dict so
the chain continues. The tag is the handler's: same key (``"mixpanel"``), same plain format, same
:data:`~mp_logbridge.tag` helpers.

structlog only — the processor sends, a renderer writes the line::

    structlog.configure(processors=[
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        MixpanelProcessor(distinct_id_key="user_id"),  # before format_exc_info
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(),
    ])
    structlog.contextvars.bind_contextvars(user_id="u1")
    log.info("signed up", **tag.track("Signed Up", plan="pro"))

structlog on top of stdlib — either let the processor send (it removes the tag, so a
:class:`~mp_logbridge.MixpanelHandler` on the stdlib side does not see it again), or leave the
processor out and let ``structlog.stdlib.render_to_log_kwargs`` forward the tag in ``extra=`` to
the handler. Each message is sent once either way; ``keep_tag=True`` leaves the tag in the event
dict, marked as sent, and handlers of the same project skip records carrying that mark. Keep the
processor in the structlog chain, not in ``ProcessorFormatter.processors``: a formatter runs once
per handler that uses it, on a copy of the event dict.

It never raises (structlog only swallows ``DropEvent``), never drops the log line and never
blocks. A tag it cannot use is counted as ``invalid`` in :meth:`MixpanelProcessor.stats` and
reported on the ``mp_logbridge`` logger. structlog itself is not imported here, so
``import mp_logbridge`` works without it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from ._async import AsyncConsumer
from ._context import BoundContext, baggage_distinct_id, current_context
from ._diagnostics import DeliveryStats, warn
from ._errors import ConfigurationError, InvalidMessageError, MixpanelError
from ._frontdoor import Delivery, submit
from ._tags import DEFAULT_TAG, BridgeSpec, exception_properties
from ._transport import Credentials, normalize_region

__all__ = ["MixpanelProcessor"]

#: Marks event dicts (and, through ``extra``, log records) whose tag was already sent: a tuple
#: of ``(token, tag key)`` entries, one per project and tag that sent it.
SENT_MARK = "_mp_logbridge_sent"


class MixpanelProcessor:
    """structlog processor sending tagged events to Mixpanel.

    Args:
        token, region, api_host, consumer, credentials, api_secret, retry, and the delivery
            options (``batch_size``, ``flush_interval``, ...): as for
            :class:`~mp_logbridge.MixpanelHandler` (same environment fallbacks, and a consumer
            shared with handlers configured the same way). ``tracker=`` uses a
            :class:`~mp_logbridge.Tracker`'s token and consumer.
        tag: the event-dict key holding the tag (default ``"mixpanel"``).
        distinct_id_key: event-dict key holding the user (e.g. bound with
            ``structlog.contextvars.bind_contextvars(user_id=...)``); consulted after the tag
            and before ``mp_logbridge.bound()``, baggage ``enduser.id`` and the default.
        copy_keys: event-dict keys copied into event properties when present (the tag's own
            properties win over them).
        super_properties, default_distinct_id, include_trace, include_exception: as for the
            handler (``include_exception`` reads the event dict's ``exc_info``, so place the
            processor before ``format_exc_info``).
        keep_tag: leave the tag in the event dict (it is then marked as sent, so a
            ``MixpanelHandler`` of the same project reading the same tag key skips it if
            structlog forwards it).
    """

    __slots__ = (
        "_closed",
        "_consumer_counts",
        "_copy_keys",
        "_delivery",
        "_keep_tag",
        "_local",
        "_seen",
        "_send",
        "_skipped",
        "_spec",
        "_tag",
        "_user_key",
        "enabled",
    )

    def __init__(
        self,
        token: str | None = None,
        *,
        region: str | None = None,
        api_host: str | None = None,
        consumer: Any = None,
        tracker: Any = None,
        tag: str = DEFAULT_TAG,
        distinct_id_key: str | None = None,
        copy_keys: Sequence[str] = (),
        super_properties: Mapping[str, Any] | None = None,
        default_distinct_id: str | int | None = None,
        include_trace: bool = True,
        include_exception: bool = True,
        keep_tag: bool = False,
        credentials: Credentials | None = None,
        api_secret: str | None = None,
        retry: Mapping[str, Any] | None = None,
        **delivery: Any,
    ) -> None:
        if tracker is not None:
            if token is not None or consumer is not None:
                raise ConfigurationError("give either tracker= or token=/consumer=, not both")
            token, consumer = tracker.token, tracker.consumer
        token = token if token is not None else os.environ.get("MIXPANEL_TOKEN")
        self.enabled = isinstance(token, str) and bool(token.strip())
        if not isinstance(tag, str) or not tag:
            raise ConfigurationError(f"tag must be a non-empty string, got {tag!r}")
        if isinstance(copy_keys, str):
            raise ConfigurationError("copy_keys must be a list of event-dict keys, not a string")
        if super_properties is not None and not isinstance(super_properties, Mapping):
            raise ConfigurationError("super_properties must be a mapping")
        if region is not None:  # checked even when api_host (or consumer=) makes it moot
            normalize_region(region)
        self._tag = tag
        self._user_key = distinct_id_key
        self._copy_keys = tuple(copy_keys)
        self._keep_tag = bool(keep_tag)
        # The mark's entry, as MixpanelHandler writes it: this project, this tag key.
        self._seen = (token if self.enabled else "", tag)
        self._skipped = 0
        self._closed = False
        # Losses that never reach a consumer able to count them (a bad tag failing on this
        # thread, a callable sink refusing a message, a log call after close()).
        self._local = DeliveryStats()
        self._spec = BridgeSpec(
            token if self.enabled else "",  # type: ignore[arg-type]
            super_properties=super_properties,
            default_distinct_id=default_distinct_id,
            include_trace=include_trace,
            include_exception=include_exception,
        )
        self._delivery = Delivery(
            consumer=consumer,
            region=region,
            api_host=api_host,
            credentials=credentials,
            api_secret=api_secret,
            retry=retry,
            options=delivery,
            enabled=self.enabled,
            owner="MixpanelProcessor",
        )
        consumer_ = self._delivery.consumer
        self._consumer_counts = callable(getattr(consumer_, "stats", None))
        if consumer_ is None or not self.enabled:
            self._send: Any = None
        elif isinstance(consumer_, AsyncConsumer):
            self._send = consumer_.send  # builds on its own thread: nothing raises here
        else:
            self._send = self._send_now
        if not self.enabled:
            warn(
                "MixpanelProcessor has no Mixpanel token (pass token= or set MIXPANEL_TOKEN): "
                "it is disabled and will count the events it skips"
            )

    def __repr__(self) -> str:
        state = "" if self.enabled else " disabled"
        return f"<MixpanelProcessor{state} tag={self._tag!r} consumer={self._delivery.consumer!r}>"

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """Send the event dict's tag (if any) and return the event dict."""
        if type(event_dict) is not dict and not isinstance(event_dict, Mapping):
            return event_dict  # placed after a renderer: nothing to read, nothing to send
        try:
            value = event_dict.get(self._tag)
            if value is None or value is False:
                return event_dict
            if self._keep_tag:
                seen = self._seen
                sent = event_dict.get(SENT_MARK) or ()
                if seen in sent:
                    return event_dict
                event_dict[SENT_MARK] = (*sent, seen)
            else:
                del event_dict[self._tag]
            if self._send is None:
                if self._closed:
                    self._lose("closed", "the MixpanelProcessor is closed")
                else:
                    self._skipped += 1
                return event_dict
            self._submit(value, event_dict)
        except Exception as exc:
            self._lose("invalid", f"{type(exc).__name__}: {exc}")
        return event_dict

    def _submit(self, value: Any, event_dict: Mapping[str, Any]) -> None:
        context = current_context()
        user_key = self._user_key
        if user_key is not None:
            user = event_dict.get(user_key)
            if user is not None and user != "":
                context = BoundContext(user, context.properties)
        if context.distinct_id is None and self._spec.default_distinct_id is not None:
            # Baggage comes before the configured default: read it here, where contextvars
            # are those of the log call, and let it stand in for the bound user.
            baggage_id = baggage_distinct_id()
            if baggage_id is not None:
                context = BoundContext(baggage_id, context.properties)
        extra: dict[str, Any] | None = None
        if self._copy_keys:
            extra = {key: event_dict[key] for key in self._copy_keys if key in event_dict}
        if self._spec.include_exception:
            error = _exception_of(event_dict.get("exc_info"))
            if error is not None:
                extra = {**(extra or {}), **exception_properties(error)}
        submit(
            self._spec,
            self._send,
            value,
            created=time.time(),
            message=lambda: _event_text(event_dict),
            context=context,
            extra=extra,
            facts=(time.time_ns(), os.getpid(), threading.get_ident(), id(event_dict)),
        )

    def _send_now(self, kind: str, message: Any) -> None:
        """Send through a consumer that builds on this thread; one bad message spares the rest."""
        consumer = self._delivery.consumer
        try:
            consumer.send(kind, message)
        except InvalidMessageError as error:
            if self._consumer_counts:  # it counted the loss itself
                warn("MixpanelProcessor: %s: %s", type(error).__name__, error)
            else:
                self._lose("invalid", f"{type(error).__name__}: {error}")
        except MixpanelError as error:  # a delivery error the consumer has counted
            warn("MixpanelProcessor could not deliver a message: %s", error)
        except Exception as error:
            warn(
                "MixpanelProcessor: the consumer %r failed: %s: %s",
                consumer,
                type(error).__name__,
                error,
            )

    def _lose(self, reason: str, detail: str) -> None:
        """Count a message lost before reaching a counting consumer, and report it."""
        self._local.add_dropped(reason, 1, detail)
        self._local.report()

    # ------------------------------------------------------------------ lifecycle

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver what is queued; ``True`` when everything was delivered."""
        try:
            return self._delivery.flush(timeout)
        except Exception as exc:
            warn("MixpanelProcessor flush failed: %s: %s", type(exc).__name__, exc)
            return False

    def close(self) -> None:
        """Release the consumer (closed when nothing else shares it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._send = None
        try:
            self._delivery.release()
        except Exception as exc:
            warn("MixpanelProcessor close failed: %s: %s", type(exc).__name__, exc)
        self._local.report(force=True)  # losses the rate limit held back

    def stats(self) -> dict[str, Any]:
        """The consumer's delivery counters plus what the processor counted itself: losses that
        never reached the consumer, and ``skipped`` (events a disabled processor skipped)."""
        try:
            result = self._delivery.stats()
        except Exception as exc:
            warn("MixpanelProcessor could not read stats: %s: %s", type(exc).__name__, exc)
            result = {}
        local = self._local.snapshot()
        dropped = dict(result.get("dropped") or {})
        for reason, count in local["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + count
        result["dropped"] = dropped
        result["dropped_total"] = sum(dropped.values())
        result["skipped"] = self._skipped
        result["enabled"] = self.enabled
        return result


def _event_text(event_dict: Mapping[str, Any]) -> str | None:
    event = event_dict.get("event")
    return None if event is None else str(event)


def _exception_of(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if (
        isinstance(exc_info, tuple)
        and len(exc_info) == 3
        and isinstance(exc_info[1], BaseException)
    ):
        return exc_info[1]
    if exc_info is True:
        return sys.exc_info()[1]
    return None

"""``MixpanelProcessor``: the same tags, from structlog event dicts.

A structlog processor (a callable class with ``__slots__``, configuration bound at construction)
that turns event dicts carrying the tag key into Mixpanel messages and returns the event dict so
the chain continues::

    structlog.configure(processors=[
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        MixpanelProcessor(distinct_id_key="user_id"),
        structlog.processors.JSONRenderer(),
    ])
    log.info("signed up", **tag.track("Signed Up", plan="pro"))

It never raises (structlog only swallows ``DropEvent``), never drops the log line and never
blocks. By default it removes the tag from the event dict, so when structlog forwards the event
to stdlib logging where a :class:`~mp_logbridge.MixpanelHandler` is also attached, the handler
does not see it again: each message is sent once. structlog itself is not imported here, so
``import mp_logbridge`` works without it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from ._context import BoundContext, current_context
from ._diagnostics import warn
from ._errors import ConfigurationError
from ._frontdoor import Delivery, submit
from ._tags import DEFAULT_TAG, BridgeSpec, exception_properties
from ._transport import Credentials

__all__ = ["MixpanelProcessor"]

#: Marks event dicts (and, through ``extra``, log records) whose tag was already sent.
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
        copy_keys: event-dict keys copied into event properties when present.
        super_properties, default_distinct_id, include_trace, include_exception: as for the
            handler (``include_exception`` reads the event dict's ``exc_info``).
        keep_tag: leave the tag in the event dict (it is then marked as sent, so a
            ``MixpanelHandler`` of the same project skips it if structlog forwards it).
    """

    __slots__ = (
        "_copy_keys",
        "_delivery",
        "_keep_tag",
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
        self._tag = tag
        self._user_key = distinct_id_key
        self._copy_keys = tuple(copy_keys)
        self._keep_tag = bool(keep_tag)
        self._skipped = 0
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
        self._send = consumer_.send if consumer_ is not None else None
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
        try:
            value = event_dict.get(self._tag)
            if value is None or value is False:
                return event_dict
            if self._keep_tag:
                token = self._spec.token
                sent = event_dict.get(SENT_MARK) or ()
                if token in sent:
                    return event_dict
                event_dict[SENT_MARK] = (*sent, token)
            else:
                del event_dict[self._tag]
            if self._send is None:
                self._skipped += 1
                return event_dict
            self._submit(value, event_dict)
        except Exception as exc:
            warn("MixpanelProcessor could not queue a message: %s: %s", type(exc).__name__, exc)
        return event_dict

    def _submit(self, value: Any, event_dict: Mapping[str, Any]) -> None:
        context = current_context()
        user_key = self._user_key
        if user_key is not None:
            user = event_dict.get(user_key)
            if user is not None and user != "":
                context = BoundContext(user, context.properties)
        extra: dict[str, Any] | None = None
        if self._copy_keys:
            extra = {key: event_dict[key] for key in self._copy_keys if key in event_dict}
        if self._spec.include_exception:
            error = _exception_of(event_dict.get("exc_info"))
            if error is not None:
                extra = {**(extra or {}), **exception_properties(error)}
        assert self._send is not None
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

    # ------------------------------------------------------------------ lifecycle

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver what is queued; ``True`` when everything was delivered."""
        return self._delivery.flush(timeout)

    def close(self) -> None:
        """Release the consumer (closed when nothing else shares it). Idempotent."""
        self._delivery.release()
        self._send = None

    def stats(self) -> dict[str, Any]:
        """The consumer's delivery counters plus ``skipped`` (events a disabled processor skipped)."""
        result = self._delivery.stats()
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

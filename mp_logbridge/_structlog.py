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

import sys
import time
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from ._aio import off_loop
from ._consumers import ConsumerLike
from ._context import BoundContext, current_context
from ._errors import ConfigurationError
from ._frontdoor import Bridge
from ._tags import DEFAULT_TAG, event_text, exception_properties
from ._transport import Credentials

__all__ = ["MixpanelProcessor"]


class MixpanelProcessor:
    """structlog processor sending tagged events to Mixpanel.

    The options shared with :class:`~mp_logbridge.MixpanelHandler` (``token``, ``region``,
    ``api_host``, ``consumer``, ``credentials``, ``api_secret``, ``retry``,
    ``super_properties``, ``default_distinct_id``, ``include_trace``, ``include_exception`` and
    the delivery options) mean the same here, with the same environment fallbacks, and a
    processor shares its consumer with handlers configured the same way.
    ``include_exception`` reads the event dict's ``exc_info``, so place the processor before
    ``format_exc_info``.

    Args:
        tracker: use this :class:`~mp_logbridge.Tracker`'s token and consumer (instead of
            ``token``/``consumer``).
        tag: the event-dict key holding the tag.
        distinct_id_key: event-dict key holding the user (e.g. bound with
            ``structlog.contextvars.bind_contextvars(user_id=...)``); consulted after the tag
            and before ``mp_logbridge.bound()``, baggage ``enduser.id`` and the default.
        copy_keys: event-dict keys copied into event properties when present (the tag's own
            properties win over them).
        keep_tag: leave the tag in the event dict (it is then marked as sent, so a
            ``MixpanelHandler`` of the same project reading the same tag key skips it if
            structlog forwards it).
        **delivery: ``before_send``, ``sample_rate``, ``redact``, ``redact_mode``,
            ``redact_key``, ``disabled``, ``debug`` and the delivery options, as for
            :class:`~mp_logbridge.MixpanelHandler`.
    """

    __slots__ = ("_bridge", "_copy_keys", "_keep_tag", "_tag", "_user_key", "enabled")

    def __init__(
        self,
        token: str | None = None,
        *,
        region: str | None = None,
        api_host: str | None = None,
        consumer: ConsumerLike | None = None,
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
        if not isinstance(tag, str) or not tag:
            raise ConfigurationError(f"tag must be a non-empty string, got {tag!r}")
        if isinstance(copy_keys, str):
            raise ConfigurationError("copy_keys must be a list of event-dict keys, not a string")
        self._tag = tag
        self._user_key = distinct_id_key
        self._copy_keys = tuple(copy_keys)
        self._keep_tag = bool(keep_tag)
        self._bridge = Bridge(
            "MixpanelProcessor",
            token,
            tag=tag,
            super_properties=super_properties,
            default_distinct_id=default_distinct_id,
            include_trace=include_trace,
            include_exception=include_exception,
            consumer=consumer,
            region=region,
            api_host=api_host,
            credentials=credentials,
            api_secret=api_secret,
            retry=retry,
            options=delivery,
        )
        self.enabled = self._bridge.enabled

    def __repr__(self) -> str:
        state = "" if self.enabled else " disabled"
        return f"<MixpanelProcessor{state} tag={self._tag!r} consumer={self._bridge.consumer!r}>"

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
            bridge = self._bridge
            if self._keep_tag:
                if not bridge.claim(event_dict):
                    return event_dict  # sent already, by another front door of this project
            else:
                del event_dict[self._tag]
            bridge.send(
                value,
                time.time(),
                lambda: event_text(event_dict),
                self._context(event_dict),
                self._extra(event_dict),
            )
        except Exception as exc:
            self._bridge.lose("invalid", f"{type(exc).__name__}: {exc}")
        return event_dict

    def _context(self, event_dict: Mapping[str, Any]) -> BoundContext:
        context = current_context()
        if self._user_key is not None:
            user = event_dict.get(self._user_key)
            if user is not None and user != "":
                return BoundContext(user, context.properties)
        return context

    def _extra(self, event_dict: Mapping[str, Any]) -> dict[str, Any] | None:
        extra: dict[str, Any] | None = None
        if self._copy_keys:
            extra = {key: event_dict[key] for key in self._copy_keys if key in event_dict}
        if self._bridge.spec.include_exception:
            error = _exception_of(event_dict.get("exc_info"))
            if error is not None:
                extra = {**(extra or {}), **exception_properties(error)}
        return extra

    # ------------------------------------------------------------------ lifecycle

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver what is queued; ``True`` when everything was delivered."""
        return self._bridge.flush(timeout)

    def close(self) -> None:
        """Release the consumer (closed when nothing else shares it). Idempotent."""
        self._bridge.close()

    async def aflush(self, timeout: float | None = None) -> bool:
        """:meth:`flush` for asyncio code: waits in a thread, the event loop keeps running."""
        return await self._bridge.aflush(timeout)

    async def aclose(self) -> None:
        """:meth:`close` for asyncio code: waits in a thread, the event loop keeps running."""
        await off_loop(self.close)

    def stats(self) -> dict[str, Any]:
        """The consumer's delivery counters plus what the processor counted itself: losses that
        never reached the consumer, and ``skipped`` (events a disabled processor skipped)."""
        return self._bridge.stats()


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

"""``Tracker``, ``People`` and ``Groups``: the Mixpanel Ruby SDK's vocabulary, in Python.

Method for method and argument for argument the Ruby SDK's ``Mixpanel::Tracker``,
``Mixpanel::People`` and ``Mixpanel::Groups``: ``track``, ``people.set``,
``people.track_charge``, ``groups.set`` and the rest mean on the wire what they mean in Ruby.
Differences: event and profile times are integer milliseconds everywhere, every event carries a
``$insert_id``, ``alias`` goes through the configured consumer (so to the configured region),
and by default messages are delivered in the background (:class:`~mp_logbridge.BackgroundConsumer`,
shared by every Tracker of the same destination and options).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from . import _messages as msg
from ._aio import off_loop
from ._consumers import ConsumerLike, ConsumerProtocol, DisabledConsumer, as_consumer
from ._diagnostics import mask_secret, warn
from ._errors import ConfigurationError, DeliveryError, InvalidMessageError
from ._frontdoor import ConsumerShare, disabled_by_environment, takes_encoded
from ._policy import LOST, Policy
from ._records import EncodedRecord, encode_message, encode_record
from ._transport import Credentials
from ._values import to_json_value
from ._vocabulary import GROUPS, PEOPLE

__all__ = ["ErrorHandler", "Groups", "People", "Tracker"]

Properties = Mapping[str, Any]

#: The token of a disabled Tracker made without one (its records never leave the process).
DISABLED_TOKEN = "mp-logbridge-disabled"


class ErrorHandler:
    """Receives delivery errors (the Ruby SDK's ``Mixpanel::ErrorHandler``).

    Subclass it and override :meth:`handle`, or pass any ``callable(error)`` as a Tracker's
    ``error_handler``. The default does nothing: losses are already counted in ``stats()`` and
    reported on the ``mp_logbridge`` logger.
    """

    def handle(self, error: BaseException) -> bool:
        """Called with each :class:`~mp_logbridge.DeliveryError`; the return value is ignored."""
        return False


class _ErrorRelay:
    """A background consumer's ``on_error`` that tells a Tracker's ``error_handler``; equal for
    equal handlers, so Trackers with the same handler share one consumer."""

    __slots__ = ("handler",)

    def __init__(self, handler: Callable[[BaseException], object]) -> None:
        self.handler = handler

    def __call__(self, error: BaseException, messages: list[Any]) -> None:
        try:
            self.handler(error)
        except Exception as exc:
            warn("mp_logbridge error_handler raised %s: %s", type(exc).__name__, exc)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ErrorRelay) and other.handler == self.handler

    def __hash__(self) -> int:
        return hash(self.handler)


def _resolve_handler(handler: Any) -> Callable[[BaseException], object] | None:
    if handler is None:
        return None
    method = getattr(handler, "handle", None)
    if callable(method):
        return method  # type: ignore[no-any-return]
    if callable(handler):
        return handler  # type: ignore[no-any-return]
    raise ConfigurationError("error_handler must be callable or have a handle(error) method")


class Tracker:
    """Sends events, profile updates, group updates and charges for one Mixpanel project.

    Args:
        token: the project token (default: the ``MIXPANEL_TOKEN`` environment variable).
        consumer: where messages go — by default a :class:`~mp_logbridge.BackgroundConsumer`
            made for you and shared with every Tracker configured the same way (so a Tracker
            made per request costs no thread and no connection); or a
            :class:`~mp_logbridge.Consumer`, :class:`~mp_logbridge.BufferedConsumer`, any object
            with ``send(kind, message)``, or a ``callable(kind, message)`` (the Ruby SDK's block
            form).
        error_handler: ``callable(error)`` or an :class:`ErrorHandler`, told about delivery
            errors. With the default background consumer they arrive later, from its thread.
        credentials: ``/import`` credentials for the consumer made for you
            (``ServiceAccount(username, secret, project_id)`` or ``ProjectSecret(secret)``).
        api_secret: a project's API secret, shorthand for ``credentials=ProjectSecret(...)``.
        region: where the consumer made for you sends: ``"us"``, ``"eu"`` or ``"in"``
            (default: ``MIXPANEL_REGION``, then the US).
        api_host: a host or base URL to send to instead, such as ``"http://127.0.0.1:8123"``
            (default: ``MIXPANEL_API_HOST``, which wins over ``MIXPANEL_REGION``).
        super_properties: properties added to every event (an event's own properties win).
        **delivery: the delivery options of the background consumer made for you
            (``batch_size``, ``flush_interval``, ``request_timeout``, ``retry``, ``spool``,
            ``debug``, ...; see :class:`~mp_logbridge.BackgroundConsumer`). ``spool=`` a
            directory keeps undelivered messages on disk (see :mod:`mp_logbridge.spool`). Also
            what may leave the process: ``before_send``, ``sample_rate``, ``redact``,
            ``redact_mode``, ``redact_key`` (applied at the call, after the record is built and
            checked); and ``disabled=True``: accept everything and send nothing, with no thread
            and no socket (default: ``MIXPANEL_DISABLED``); no token is needed then.

    Methods return ``True`` when the message was accepted (with the background consumer:
    accepted for delivery) and ``False`` when it was not, after telling ``error_handler``.
    Everything that can be checked without sending is checked at the call: invalid arguments
    raise :class:`~mp_logbridge.InvalidMessageError` naming the field and the reason (types,
    NaN or infinity at any depth, non-string keys, cycles, unpaired surrogates, records over
    Mixpanel's 1 MB or 255-property limits). What is sent is what the values were at the call.
    """

    def __init__(
        self,
        token: str | None = None,
        consumer: ConsumerLike | None = None,
        *,
        error_handler: Any = None,
        credentials: Credentials | None = None,
        api_secret: str | None = None,
        region: str | None = None,
        api_host: str | None = None,
        super_properties: Properties | None = None,
        **delivery: Any,
    ) -> None:
        delivery = dict(delivery)
        disabled = delivery.pop("disabled", None)
        self.disabled = disabled_by_environment() if disabled is None else bool(disabled)
        self._policy = Policy.from_options("Tracker", delivery)
        token = token if token is not None else os.environ.get("MIXPANEL_TOKEN")
        if not isinstance(token, str) or not token.strip():
            if not self.disabled:
                raise ConfigurationError(
                    "a Mixpanel project token is required: Tracker(token) or MIXPANEL_TOKEN"
                )
            token = DISABLED_TOKEN
        self.token = msg.clean_token(token, "Tracker")
        self._error_handler = _resolve_handler(error_handler)
        if self.disabled:
            ConsumerShare(  # the options are checked all the same
                consumer=consumer,
                region=region,
                api_host=api_host,
                credentials=credentials,
                api_secret=api_secret,
                retry=delivery.pop("retry", None),
                options=delivery,
                disabled=True,
                owner="Tracker",
            )
            self.consumer: ConsumerProtocol = DisabledConsumer()
        elif consumer is None:
            options = dict(delivery)
            retry = options.pop("retry", None)
            if self._error_handler is not None:
                options["on_error"] = _ErrorRelay(self._error_handler)
            share = ConsumerShare(
                region=region,
                api_host=api_host,
                credentials=credentials,
                api_secret=api_secret,
                retry=retry,
                options=options,
                pin=True,
                owner="Tracker",
            )
            self.consumer = share.consumer
        else:
            given = {"credentials": credentials, "api_secret": api_secret, "region": region}
            given.update(api_host=api_host, **delivery)
            extra = sorted(name for name, value in given.items() if value is not None)
            if extra:
                raise ConfigurationError(
                    f"{', '.join(extra)} configure the consumer this Tracker makes; with "
                    "consumer= given, pass them to that consumer instead"
                )
            self.consumer = as_consumer(consumer)
        if super_properties is not None and not isinstance(super_properties, Mapping):
            raise ConfigurationError("super_properties must be a mapping")
        self.super_properties = dict(super_properties or {})
        self._shared = consumer is None or self.disabled
        self._takes_encoded = takes_encoded(self.consumer)
        if self._policy is not None:  # chosen now: no per-call check without a policy
            self._send = self._send_filtered  # type: ignore[method-assign]
        self.people = People(self)
        self.groups = Groups(self)

    def __repr__(self) -> str:
        return f"Tracker(token={mask_secret(self.token)!r}, consumer={self.consumer!r})"

    # ------------------------------------------------------------------ plumbing

    def _handle_error(self, error: BaseException) -> None:
        handler = self._error_handler
        if handler is None:
            return
        try:
            handler(error)
        except Exception as exc:
            warn("mp_logbridge error_handler raised %s: %s", type(exc).__name__, exc)

    def _send(self, kind: str, record: dict[str, Any]) -> bool:
        # Encoded now: every check is made at the call, and the record is fixed as it is now.
        payload = EncodedRecord(encode_record(record))
        consumer = self.consumer
        try:
            result = consumer.send(kind, payload if self._takes_encoded else record)
        except DeliveryError as error:
            self._handle_error(error)
            return False
        return result is not False

    def _send_filtered(self, kind: str, record: dict[str, Any]) -> bool:
        """:meth:`_send` behind the policy (sampling, ``before_send``, redaction)."""
        policy = self._policy
        assert policy is not None
        kept = policy.apply(kind, record)
        if kept is None:
            return True  # left out on purpose (counted in stats())
        if kept is LOST:
            return False  # the hook cost it (counted as hook_error)
        try:
            payload = EncodedRecord(encode_message(kept))  # the hook may have put anything in
        except InvalidMessageError as error:
            policy.losses.add_dropped(error.drop_reason, 1, f"after before_send: {error}")
            policy.losses.report()
            return False
        try:
            result = self.consumer.send(kind, payload if self._takes_encoded else kept)
        except DeliveryError as error:
            self._handle_error(error)
            return False
        return result is not False

    def _event_properties(self, properties: Properties | None) -> Properties | None:
        if not self.super_properties:
            return properties
        if properties is not None and not isinstance(properties, Mapping):
            return properties  # let the builder name the problem
        return {**self.super_properties, **(properties or {})}

    # ------------------------------------------------------------------ events

    def track(
        self,
        distinct_id: str | int,
        event: str,
        properties: Properties | None = None,
        ip: str | int | None = None,
    ) -> bool:
        """Record that ``distinct_id`` did ``event`` (``/track``).

        ``properties`` may set ``time`` (datetime, seconds or milliseconds) and ``$insert_id``;
        ``ip`` is the user's IP address for geolocation, or ``0`` to skip geolocation.
        """
        record = msg.event(
            self.token,
            distinct_id,
            event,
            self._event_properties(properties),
            ip=ip,
            for_track=True,
        )
        return self._send("event", record)

    def import_event(
        self,
        distinct_id: str | int,
        event: str,
        properties: Properties | None = None,
        ip: str | int | None = None,
    ) -> bool:
        """Record a historical event through ``/import`` (needs the consumer's credentials).

        ``properties["time"]`` is the time it happened (datetime, or seconds or milliseconds
        since the epoch, taken as given); it defaults to now.
        """
        self._require_credentials("import_event")
        record = msg.event(
            self.token, distinct_id, event, self._event_properties(properties), ip=ip
        )
        return self._send("import", record)

    def alias(self, alias_id: str | int, real_id: str | int) -> bool:
        """Create an alias ``alias_id`` for ``real_id`` (a ``$create_alias`` event).

        Unlike the official SDKs, it goes through this Tracker's consumer, so to its region.
        """
        return self._send("event", msg.alias_event(self.token, alias_id, real_id))

    def merge(self, distinct_id1: str | int, distinct_id2: str | int) -> bool:
        """Merge two identities: a ``$merge`` event for ``/import`` (needs credentials), given to
        the consumer as an import as the official package does; this library's consumers send it
        in a request of its own, not strict (as the official SDKs do), so it never fails a batch
        of imported events."""
        self._require_credentials("merge")
        return self._send("import", msg.merge_event(self.token, distinct_id1, distinct_id2))

    def generate_tracking_url(
        self,
        distinct_id: str | int,
        event: str,
        properties: Properties | None = None,
        endpoint: str | None = None,
    ) -> str:
        """A pixel-tracking URL that records ``event`` when fetched (e.g. from an email).

        Same properties as :meth:`track`; the URL uses the consumer's ``/track`` endpoint unless
        ``endpoint`` is given.
        """
        record = msg.event(self.token, distinct_id, event, self._event_properties(properties))
        data = json.dumps(to_json_value(record), separators=(",", ":")).encode()
        encoded = base64.urlsafe_b64encode(data).decode("ascii")
        if endpoint is None:
            endpoints = getattr(self.consumer, "endpoints", None)
            endpoint = (
                endpoints.event if endpoints is not None else "https://api.mixpanel.com/track"
            )
        return f"{endpoint}?data={encoded}&ip=1&img=1"

    def _require_credentials(self, method: str) -> None:
        consumer = self.consumer
        if (
            hasattr(consumer, "credentials")
            and consumer.credentials is None
            # a stream consumer whose relay holds the project's credentials (mp_logbridge.redis)
            and not getattr(consumer, "credentials_elsewhere", False)
        ):
            raise ConfigurationError(
                f"{method} sends to /import, which needs credentials: give the Tracker (or its "
                "consumer) credentials=ServiceAccount(username, secret, project_id) or api_secret=..."
            )

    # ------------------------------------------------------------------ lifecycle

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver what the consumer holds; ``True`` when all of it was delivered."""
        try:
            return bool(self.consumer.flush(timeout))
        except DeliveryError as error:
            self._handle_error(error)
            return False

    def close(self, timeout: float | None = None) -> None:
        """Flush and close the consumer given with ``consumer=``; the background consumer made
        for you is shared with other Trackers, so it is flushed here and closed at exit."""
        try:
            if self._shared:
                self.consumer.flush(timeout)
            else:
                self.consumer.close(timeout)
        except DeliveryError as error:
            self._handle_error(error)

    def stats(self) -> dict[str, Any]:
        """The consumer's delivery counters (empty when it keeps none), plus, with a policy,
        ``sampled_out``, ``filtered``, ``redacted`` and its ``hook_error`` losses."""
        result = dict(self.consumer.stats())
        if self._policy is not None:
            self._policy.merge_stats(result)
        return result

    async def aflush(self, timeout: float | None = None) -> bool:
        """:meth:`flush` for asyncio code: waits in a thread, the event loop keeps running."""
        return await off_loop(self.flush, timeout)

    async def aclose(self, timeout: float | None = None) -> None:
        """:meth:`close` for asyncio code: waits in a thread, the event loop keeps running."""
        await off_loop(self.close, timeout)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class People:
    """Profile updates for one Tracker (``tracker.people``), as in the Ruby SDK.

    Every method takes the user's ``distinct_id`` first; ``ip`` is the ``$ip`` to geolocate
    with (``0``: do not geolocate) and ``optional_params`` adds top-level fields such as
    ``{"$ignore_time": True}`` or a ``$time`` override. The operations are those of
    ``mp_logbridge._vocabulary.PEOPLE``, shared with ``tag.people``.
    """

    def __init__(self, tracker: Tracker) -> None:
        self._tracker = tracker

    def _do(
        self,
        name: str,
        distinct_id: str | int,
        args: tuple[Any, ...],
        ip: str | int | None = None,
        optional_params: Properties | None = None,
    ) -> bool:
        tracker = self._tracker
        op, value = PEOPLE[name].apply(args, "people", check=False)
        record = msg.profile_update(
            tracker.token, distinct_id, op, value, ip=ip, optional_params=optional_params
        )
        return tracker._send("profile_update", record)

    def set(
        self,
        distinct_id: str | int,
        properties: Properties,
        ip: str | int | None = None,
        optional_params: Properties | None = None,
    ) -> bool:
        """Set profile properties, overwriting existing values (``$set``)."""
        return self._do("set", distinct_id, (properties,), ip, optional_params)

    def set_once(
        self,
        distinct_id: str | int,
        properties: Properties,
        ip: str | int | None = None,
        optional_params: Properties | None = None,
    ) -> bool:
        """Set profile properties that are not set yet (``$set_once``)."""
        return self._do("set_once", distinct_id, (properties,), ip, optional_params)

    def increment(
        self,
        distinct_id: str | int,
        properties: Mapping[str, float],
        ip: str | int | None = None,
        optional_params: Properties | None = None,
    ) -> bool:
        """Add to numeric properties; negative numbers subtract (``$add``)."""
        return self._do("increment", distinct_id, (properties,), ip, optional_params)

    def plus_one(
        self,
        distinct_id: str | int,
        property_name: str,
        ip: str | int | None = None,
        optional_params: Properties | None = None,
    ) -> bool:
        """Add 1 to one numeric property (``$add``)."""
        return self._do("plus_one", distinct_id, (property_name,), ip, optional_params)

    def append(
        self,
        distinct_id: str | int,
        properties: Properties,
        ip: str | int | None = None,
        optional_params: Properties | None = None,
    ) -> bool:
        """Append values to list properties, creating them if needed (``$append``)."""
        return self._do("append", distinct_id, (properties,), ip, optional_params)

    def union(
        self,
        distinct_id: str | int,
        properties: Mapping[str, Sequence[Any]],
        ip: str | int | None = None,
        optional_params: Properties | None = None,
    ) -> bool:
        """Merge lists into list properties, without duplicates (``$union``)."""
        return self._do("union", distinct_id, (properties,), ip, optional_params)

    def remove(
        self,
        distinct_id: str | int,
        properties: Properties,
        ip: str | int | None = None,
        optional_params: Properties | None = None,
    ) -> bool:
        """Remove values from list properties (``$remove``)."""
        return self._do("remove", distinct_id, (properties,), ip, optional_params)

    def unset(
        self,
        distinct_id: str | int,
        properties: str | Sequence[str],
        ip: str | int | None = None,
        optional_params: Properties | None = None,
    ) -> bool:
        """Remove properties from the profile; one name or a list of names (``$unset``)."""
        return self._do("unset", distinct_id, (properties,), ip, optional_params)

    def track_charge(
        self,
        distinct_id: str | int,
        amount: float,
        properties: Properties | None = None,
        ip: str | int | None = None,
        optional_params: Properties | None = None,
    ) -> bool:
        """Record a revenue charge: appends ``{...properties, "$amount": amount}`` to
        ``$transactions`` (``properties`` may hold a ``$time``; it is not modified)."""
        return self._do("track_charge", distinct_id, (amount, properties), ip, optional_params)

    def clear_charges(
        self,
        distinct_id: str | int,
        ip: str | int | None = None,
        optional_params: Properties | None = None,
    ) -> bool:
        """Remove all of the user's charges (``$unset`` of ``$transactions``)."""
        return self._do("clear_charges", distinct_id, (), ip, optional_params)

    def delete_user(
        self, distinct_id: str | int, optional_params: Properties | None = None
    ) -> bool:
        """Delete the profile (``$delete``); ``{"$ignore_alias": True}`` spares the original
        profile when deleting through an alias."""
        return self._do("delete_user", distinct_id, (), None, optional_params)

    def update(self, message: Properties) -> bool:
        """Send a profile update written by hand (``$token`` and ``$time`` are added)."""
        record = _raw_update(self._tracker.token, message, "profile_update")
        return self._tracker._send("profile_update", record)


class Groups:
    """Group-profile updates for one Tracker (``tracker.groups``), as in the Ruby SDK.

    A group is identified by ``group_key`` (the event property that links events to it, e.g.
    ``"Company"``) and ``group_id`` (e.g. ``"Acme"``). The operations are those of
    ``mp_logbridge._vocabulary.GROUPS``, shared with ``tag.groups``.
    """

    def __init__(self, tracker: Tracker) -> None:
        self._tracker = tracker

    def _do(
        self,
        name: str,
        group_key: str,
        group_id: str | int,
        args: tuple[Any, ...],
        ip: str | int | None = None,
        optional_params: Properties | None = None,
    ) -> bool:
        tracker = self._tracker
        op, value = GROUPS[name].apply(args, "groups", check=False)
        record = msg.group_update(
            tracker.token, group_key, group_id, op, value, ip=ip, optional_params=optional_params
        )
        return tracker._send("group_update", record)

    def set(
        self,
        group_key: str,
        group_id: str | int,
        properties: Properties,
        ip: str | int | None = None,
        optional_params: Properties | None = None,
    ) -> bool:
        """Set group properties, creating the group profile if needed (``$set``)."""
        return self._do("set", group_key, group_id, (properties,), ip, optional_params)

    def set_once(
        self,
        group_key: str,
        group_id: str | int,
        properties: Properties,
        ip: str | int | None = None,
        optional_params: Properties | None = None,
    ) -> bool:
        """Set group properties that are not set yet (``$set_once``)."""
        return self._do("set_once", group_key, group_id, (properties,), ip, optional_params)

    def remove(
        self,
        group_key: str,
        group_id: str | int,
        properties: Properties,
        ip: str | int | None = None,
        optional_params: Properties | None = None,
    ) -> bool:
        """Remove values from list properties (``$remove``)."""
        return self._do("remove", group_key, group_id, (properties,), ip, optional_params)

    def union(
        self,
        group_key: str,
        group_id: str | int,
        properties: Mapping[str, Sequence[Any]],
        ip: str | int | None = None,
        optional_params: Properties | None = None,
    ) -> bool:
        """Merge lists into list properties, without duplicates (``$union``)."""
        return self._do("union", group_key, group_id, (properties,), ip, optional_params)

    def unset(
        self,
        group_key: str,
        group_id: str | int,
        properties: str | Sequence[str],
        ip: str | int | None = None,
        optional_params: Properties | None = None,
    ) -> bool:
        """Remove properties from the group profile (``$unset``)."""
        return self._do("unset", group_key, group_id, (properties,), ip, optional_params)

    def delete_group(
        self, group_key: str, group_id: str | int, optional_params: Properties | None = None
    ) -> bool:
        """Delete the group profile (``$delete``)."""
        return self._do("delete_group", group_key, group_id, (), None, optional_params)

    def update(self, message: Properties) -> bool:
        """Send a group update written by hand (``$token`` and ``$time`` are added)."""
        record = _raw_update(self._tracker.token, message, "group_update")
        return self._tracker._send("group_update", record)


def _raw_update(token: str, message: Properties, kind: str) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise InvalidMessageError("message", f"must be a mapping, got {type(message).__name__}")
    if msg.infer_kind(message) != kind:
        raise InvalidMessageError(
            "message", f"is not a {kind.replace('_', ' ')} (see the operation and id keys)"
        )
    return {"$token": token, "$time": msg.now_ms(), **message}

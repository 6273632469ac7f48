"""The tag: how a log record (or structlog event) says "this is also a Mixpanel message".

A tag is plain JSON-compatible data under one attribute (``extra={"mixpanel": ...}`` by
default), so it survives ``QueueHandler``, pickling and JSON log files. Its value is one message
or a list of them, each written in Mixpanel's own record shape minus what the library fills in
(token, time, ``$insert_id``, library properties):

* event: ``{"event": "Signed Up", "properties": {"distinct_id": "u1", "plan": "pro"}}`` — any
  other top-level key is an event property too, ``"event"`` defaults to the log message, and
  ``True`` alone (or a string, the event name) is an event for the bound user;
* profile update: ``{"$distinct_id": "u1", "$set": {...}}`` with any of ``$set``,
  ``$set_once``, ``$add``, ``$append``, ``$union``, ``$remove``, ``$unset``, ``$delete`` plus
  optional ``$ip``, ``$ignore_time``, ... (several operations become several updates);
* group update: ``{"$group_key": "Company", "$group_id": "Acme", "$set": {...}}``;
* charge: ``{"$distinct_id": "u1", "$append": {"$transactions": {"$amount": 9.99}}}``.

:data:`tag` builds these in the Tracker's vocabulary (``tag.track``, ``tag.people.set``,
``tag.charge``, ``tag.groups.set``, ...), checking the arguments as the Tracker does; ``+``
puts several messages on one record.

This module also turns a tag into records: the caller's thread splits it by kind and captures
the context (:class:`Capture`), and each :class:`TagMessage` is built into a record on the
sender thread, where invalid input is counted and reported instead of raised.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from typing import Any

from . import _messages as msg
from ._context import BoundContext, format_span_ids, resolve_distinct_id, span_ids
from ._errors import ConfigurationError, InvalidMessageError
from ._messages import new_insert_id
from ._values import describe, format_datetime, snapshot_mapping
from ._version import __version__
from ._vocabulary import GROUPS, PEOPLE, Operation

__all__ = [
    "DEFAULT_TAG",
    "BridgeSpec",
    "BuiltTag",
    "Capture",
    "TagBuilder",
    "TagExtra",
    "TagMessage",
    "event_text",
    "exception_properties",
    "split_tag",
    "tag",
]

#: The default name of the tag attribute (``extra={"mixpanel": ...}``).
DEFAULT_TAG = "mixpanel"

_PROFILE_OPS = frozenset(msg.PROFILE_OPS)
_GROUP_OPS = frozenset(msg.GROUP_OPS)
_EVENT_KEYS = frozenset({"event", "properties"})


# --------------------------------------------------------------------------- helpers


class BuiltTag(dict[str, Any]):
    """One message made by a tag builder: its values were checked and copied when it was built,
    and it knows its kind, operation and size, so a front door takes it as it is."""

    __slots__ = ("kind", "named", "op", "size")
    kind: str
    op: str | None
    size: int
    named: bool  # an event whose name is in the tag (not taken from the log message)

    @classmethod
    def make(
        cls, record: dict[str, Any], kind: str, op: str | None, size: int, named: bool = True
    ) -> BuiltTag:
        """A built tag holding ``record``'s entries."""
        built = cls(record)
        built.kind = kind
        built.op = op
        built.size = size
        built.named = named
        return built

    def __reduce__(self) -> Any:  # pickled (SocketHandler, multiprocessing) as a plain dict
        return (dict, (dict(self),))


class TagExtra(dict[str, Any]):
    """The ``extra=`` mapping carrying Mixpanel messages (what ``tag.*`` returns); ``a + b``
    carries both."""

    def __add__(self, other: Mapping[str, Any]) -> TagExtra:
        if not isinstance(other, Mapping):
            return NotImplemented
        combined = TagExtra(self)
        for key, value in other.items():
            if key in combined:
                combined[key] = _as_list(combined[key]) + _as_list(value)
            else:
                combined[key] = value
        return combined

    def __radd__(self, other: Mapping[str, Any]) -> TagExtra:
        if not isinstance(other, Mapping):
            return NotImplemented
        return TagExtra(other) + self  # ``{...} + tag``: the left operand's messages come first


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _update_tag(
    record: dict[str, Any],
    operation: Operation,
    scope: str,
    args: tuple[Any, ...],
    ip: Any,
    optional_params: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """A profile or group update in the tag's form, checked as the Tracker checks it."""
    op, value = operation.apply(args, scope)
    if optional_params is not None:
        record.update(msg.checked_mapping(optional_params, "optional_params"))
    record[op] = value
    if ip is not None:
        record["$ip"] = msg.check_ip(ip, "ip")
    kind = "group_update" if scope == "groups" else "profile_update"
    return BuiltTag.make(record, kind, op, _size_of(record))


def _size_of(record: Mapping[str, Any]) -> int:
    """About how many bytes a checked record encodes to (its values were checked already)."""
    return snapshot_mapping(record, "tag", nest=None)[1]


class _PeopleTags:
    """Profile-update tags (``tag.people.set(...)``): the Tracker's ``people`` vocabulary
    (:data:`~mp_logbridge._vocabulary.PEOPLE`), with the user as an optional keyword
    ``distinct_id`` (the bound user when omitted). Arguments are checked at the call, as the
    Tracker checks them."""

    def __init__(self, tags: TagBuilder) -> None:
        self._tags = tags

    def _do(
        self,
        name: str,
        args: tuple[Any, ...],
        distinct_id: str | int | None,
        ip: Any = None,
        optional_params: Mapping[str, Any] | None = None,
    ) -> TagExtra:
        record: dict[str, Any] = {}
        if distinct_id is not None:
            record["$distinct_id"] = msg.check_distinct_id(distinct_id, "distinct_id")
        return self._tags.message(
            _update_tag(record, PEOPLE[name], "people", args, ip, optional_params)
        )

    def set(
        self,
        properties: Mapping[str, Any],
        *,
        distinct_id: str | int | None = None,
        ip: str | int | None = None,
        optional_params: Mapping[str, Any] | None = None,
    ) -> TagExtra:
        """``$set`` profile properties."""
        return self._do("set", (properties,), distinct_id, ip, optional_params)

    def set_once(
        self,
        properties: Mapping[str, Any],
        *,
        distinct_id: str | int | None = None,
        ip: str | int | None = None,
        optional_params: Mapping[str, Any] | None = None,
    ) -> TagExtra:
        """``$set_once`` profile properties."""
        return self._do("set_once", (properties,), distinct_id, ip, optional_params)

    def increment(
        self,
        properties: Mapping[str, float],
        *,
        distinct_id: str | int | None = None,
        ip: str | int | None = None,
        optional_params: Mapping[str, Any] | None = None,
    ) -> TagExtra:
        """``$add`` to numeric profile properties."""
        return self._do("increment", (properties,), distinct_id, ip, optional_params)

    def plus_one(
        self,
        property_name: str,
        *,
        distinct_id: str | int | None = None,
        ip: str | int | None = None,
        optional_params: Mapping[str, Any] | None = None,
    ) -> TagExtra:
        """``$add`` 1 to one numeric profile property."""
        return self._do("plus_one", (property_name,), distinct_id, ip, optional_params)

    def append(
        self,
        properties: Mapping[str, Any],
        *,
        distinct_id: str | int | None = None,
        ip: str | int | None = None,
        optional_params: Mapping[str, Any] | None = None,
    ) -> TagExtra:
        """``$append`` to list properties."""
        return self._do("append", (properties,), distinct_id, ip, optional_params)

    def union(
        self,
        properties: Mapping[str, Sequence[Any]],
        *,
        distinct_id: str | int | None = None,
        ip: str | int | None = None,
        optional_params: Mapping[str, Any] | None = None,
    ) -> TagExtra:
        """``$union`` into list properties."""
        return self._do("union", (properties,), distinct_id, ip, optional_params)

    def remove(
        self,
        properties: Mapping[str, Any],
        *,
        distinct_id: str | int | None = None,
        ip: str | int | None = None,
        optional_params: Mapping[str, Any] | None = None,
    ) -> TagExtra:
        """``$remove`` from list properties."""
        return self._do("remove", (properties,), distinct_id, ip, optional_params)

    def unset(
        self,
        properties: str | Sequence[str],
        *,
        distinct_id: str | int | None = None,
        ip: str | int | None = None,
        optional_params: Mapping[str, Any] | None = None,
    ) -> TagExtra:
        """``$unset`` profile properties (one name or a list)."""
        return self._do("unset", (properties,), distinct_id, ip, optional_params)

    def track_charge(
        self,
        amount: float,
        properties: Mapping[str, Any] | None = None,
        *,
        distinct_id: str | int | None = None,
        ip: str | int | None = None,
        optional_params: Mapping[str, Any] | None = None,
    ) -> TagExtra:
        """A revenue charge (``$append`` to ``$transactions``); its ``$time`` defaults to the
        time of the log record."""
        return self._do("track_charge", (amount, properties), distinct_id, ip, optional_params)

    def clear_charges(
        self,
        *,
        distinct_id: str | int | None = None,
        ip: str | int | None = None,
        optional_params: Mapping[str, Any] | None = None,
    ) -> TagExtra:
        """Remove all charges of the user."""
        return self._do("clear_charges", (), distinct_id, ip, optional_params)

    def delete_user(
        self,
        *,
        distinct_id: str | int | None = None,
        optional_params: Mapping[str, Any] | None = None,
    ) -> TagExtra:
        """Delete the user's profile."""
        return self._do("delete_user", (), distinct_id, None, optional_params)


class _GroupTags:
    """Group-update tags (``tag.groups.set("Company", "Acme", {...})``): the Tracker's
    ``groups`` vocabulary (:data:`~mp_logbridge._vocabulary.GROUPS`), same arguments."""

    def __init__(self, tags: TagBuilder) -> None:
        self._tags = tags

    def _do(
        self,
        name: str,
        group_key: str,
        group_id: str | int,
        args: tuple[Any, ...],
        ip: Any = None,
        optional_params: Mapping[str, Any] | None = None,
    ) -> TagExtra:
        record = {
            "$group_key": msg.check_name(group_key, "group_key"),
            "$group_id": msg.check_id(group_id, "group_id"),
        }
        return self._tags.message(
            _update_tag(record, GROUPS[name], "groups", args, ip, optional_params)
        )

    def set(
        self,
        group_key: str,
        group_id: str | int,
        properties: Mapping[str, Any],
        ip: str | int | None = None,
        optional_params: Mapping[str, Any] | None = None,
    ) -> TagExtra:
        """``$set`` group properties."""
        return self._do("set", group_key, group_id, (properties,), ip, optional_params)

    def set_once(
        self,
        group_key: str,
        group_id: str | int,
        properties: Mapping[str, Any],
        ip: str | int | None = None,
        optional_params: Mapping[str, Any] | None = None,
    ) -> TagExtra:
        """``$set_once`` group properties."""
        return self._do("set_once", group_key, group_id, (properties,), ip, optional_params)

    def remove(
        self,
        group_key: str,
        group_id: str | int,
        properties: Mapping[str, Any],
        ip: str | int | None = None,
        optional_params: Mapping[str, Any] | None = None,
    ) -> TagExtra:
        """``$remove`` from group list properties."""
        return self._do("remove", group_key, group_id, (properties,), ip, optional_params)

    def union(
        self,
        group_key: str,
        group_id: str | int,
        properties: Mapping[str, Sequence[Any]],
        ip: str | int | None = None,
        optional_params: Mapping[str, Any] | None = None,
    ) -> TagExtra:
        """``$union`` into group list properties."""
        return self._do("union", group_key, group_id, (properties,), ip, optional_params)

    def unset(
        self,
        group_key: str,
        group_id: str | int,
        properties: str | Sequence[str],
        ip: str | int | None = None,
        optional_params: Mapping[str, Any] | None = None,
    ) -> TagExtra:
        """``$unset`` group properties."""
        return self._do("unset", group_key, group_id, (properties,), ip, optional_params)

    def delete_group(
        self,
        group_key: str,
        group_id: str | int,
        optional_params: Mapping[str, Any] | None = None,
    ) -> TagExtra:
        """Delete the group profile."""
        return self._do("delete_group", group_key, group_id, (), None, optional_params)


class TagBuilder:
    """Builds tags for ``extra=`` (or structlog keyword arguments) under one attribute name.

    :data:`tag` uses the default name ``"mixpanel"``; make a ``TagBuilder("other")`` when the
    handler is configured with another ``tag=``. The builders check their arguments at the call
    as the :class:`~mp_logbridge.Tracker` does, and raise
    :class:`~mp_logbridge.InvalidMessageError` (with the same messages) for what it refuses.
    """

    def __init__(self, key: str = DEFAULT_TAG) -> None:
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigurationError(f"a tag name must be an identifier, got {key!r}")
        self.key = key
        self.people = _PeopleTags(self)
        self.groups = _GroupTags(self)

    def message(self, *messages: Any) -> TagExtra:
        """A tag carrying messages written in Mixpanel's record shape (checked when sent)."""
        if len(messages) == 1:
            return TagExtra({self.key: messages[0]})
        return TagExtra({self.key: list(messages)})

    def track(
        self,
        event: str | None = None,
        properties: Mapping[str, Any] | None = None,
        *,
        distinct_id: str | int | None = None,
        **more: Any,
    ) -> TagExtra:
        """An event; the name defaults to the log message, the user to the bound one.

        ``tag.track("Signed Up", distinct_id=uid, plan="pro")`` gives
        ``{"mixpanel": {"event": "Signed Up", "properties": {"distinct_id": uid, "plan": "pro"}}}``.
        """
        size = 0
        if properties is None:
            props: dict[str, Any] = {}
        else:
            if type(properties) is not dict and not isinstance(properties, Mapping):
                raise InvalidMessageError(
                    "properties", f"must be a mapping, got {type(properties).__name__}"
                )
            props, size = snapshot_mapping(properties, "properties")
        if distinct_id is not None:
            if type(distinct_id) is not str:
                msg.check_distinct_id(distinct_id, "distinct_id")
            props = {"distinct_id": distinct_id, **props}
            size += 40
        if more:
            checked, extra = snapshot_mapping(more, "properties")
            props.update(checked)
            size += extra
        built = BuiltTag()
        if event is None:
            built.named = False
        else:
            if type(event) is not str or not event.strip():
                msg.check_name(event, "event")
            built["event"] = event
            built.named = True
            size += len(event) + 12
        if props:
            built["properties"] = props
        built.kind = "event"
        built.op = None
        built.size = size
        return TagExtra({self.key: built})

    def charge(
        self,
        amount: float,
        properties: Mapping[str, Any] | None = None,
        *,
        distinct_id: str | int | None = None,
    ) -> TagExtra:
        """A revenue charge (same as ``tag.people.track_charge``)."""
        return self.people.track_charge(amount, properties, distinct_id=distinct_id)


#: Tag builder for the default attribute name ``"mixpanel"``.
tag = TagBuilder()


# --------------------------------------------------------------------------- from tag to records


def _is_mapping(value: Any) -> bool:
    return type(value) is dict or isinstance(value, Mapping)


#: Bytes a record carries beyond its tag's own values (token, time, ids, library properties).
RECORD_OVERHEAD = 200

Part = tuple[str, Any, "str | None", int]  # (kind, item, operation, approximate size)


def _split_item(item: Any, field: str) -> list[Part]:
    if type(item) is BuiltTag:  # made by a tag builder: checked and copied already
        return [(item.kind, item, item.op, item.size)]
    if not _is_mapping(item):
        if item is True:
            return [("event", {}, None, 0)]
        if isinstance(item, str):
            return [("event", {"event": item}, None, len(item))]
        raise InvalidMessageError(
            field, f"must be a mapping, a list of mappings, a string or True, got {describe(item)}"
        )
    copy, size = snapshot_mapping(item, field, nest=None)
    kind = msg.infer_kind(copy)
    if kind == "event":
        _check_property_limits(copy, field)
        return [("event", copy, None, size)]
    # Group items are split on every profile operation too, so that an operation groups do
    # not have (``$add``) is reported by name when the record is built.
    ops = [key for key in copy if key in _PROFILE_OPS]
    if not ops:
        return [(kind, copy, None, size)]
    for op in ops:
        if _is_mapping(copy[op]):
            snapshot_mapping(copy[op], f"{field}.{op}")  # Mixpanel's limits on the values
    return [(kind, copy, op, size) for op in ops]


def _check_property_limits(item: Mapping[str, Any], field: str) -> None:
    """Mixpanel's limits on the values of a hand-written event tag (its ``properties`` and its
    other keys), which were copied as a whole record."""
    own = item.get("properties")
    if isinstance(own, Mapping):
        snapshot_mapping(own, f"{field}.properties")
    others = {key: value for key, value in item.items() if key not in _EVENT_KEYS}
    if others:
        snapshot_mapping(others, field)


def event_text(event_dict: Mapping[str, Any]) -> str | None:
    """The log message of a structlog event dict (its ``event`` key), as text."""
    event = event_dict.get("event")
    return None if event is None else str(event)


def names_event(item: Any) -> bool:
    """Whether an event tag entry names its event (otherwise the log message does)."""
    return _is_mapping(item) and bool(item.get("event"))


def split_tag(value: Any) -> tuple[list[Part], list[InvalidMessageError]]:
    """Split a tag into ``(kind, item, operation, size)`` parts, each item a private copy taken
    now (on the caller's thread), and the problems of the entries that cannot be used (each
    such entry is left out; the others are kept)."""
    if not isinstance(value, (list, tuple)):
        try:
            return _split_item(value, "tag"), []
        except InvalidMessageError as problem:
            return [], [problem]
    parts: list[Part] = []
    problems: list[InvalidMessageError] = []
    for index, item in enumerate(value):
        try:
            parts.extend(_split_item(item, f"tag[{index}]"))
        except InvalidMessageError as problem:
            problems.append(problem)
    return parts, problems


def exception_properties(exc: BaseException) -> dict[str, str]:
    """``exception_type`` (qualified unless built in) and ``exception_message`` properties.

    An exception whose ``str()`` fails is described as ``<unprintable ...>`` instead: the event
    is still sent.
    """
    cls = type(exc)
    module = cls.__module__
    name = (
        cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"
    )
    try:
        text = str(exc)
    except Exception:
        text = f"<unprintable {cls.__name__}>"
    return {"exception_type": name, "exception_message": text}


class BridgeSpec:
    """What turns captured tags into records for one project (shared by handler and processor)."""

    __slots__ = (
        "default_distinct_id",
        "include_exception",
        "include_trace",
        "needs_otel",
        "super_properties",
        "token",
    )

    def __init__(
        self,
        token: str,
        *,
        super_properties: Mapping[str, Any] | None = None,
        default_distinct_id: str | int | None = None,
        include_trace: bool = True,
        include_exception: bool = True,
    ) -> None:
        self.token = token
        self.super_properties = snapshot_mapping(super_properties or {}, "super_properties")[0]
        self.default_distinct_id = default_distinct_id
        self.include_trace = include_trace
        self.include_exception = include_exception
        # The OpenTelemetry context is read for trace ids and for the baggage entry
        # ``enduser.id`` (the user of last resort).
        self.needs_otel = True


class Capture:
    """What the caller's thread saw when the record happened (read once, shared by its messages).

    ``context`` is the bound context and ``otel`` the OpenTelemetry context, both immutable
    snapshots: the span ids and baggage are read from ``otel`` on the sender thread. Each message
    gets a fresh ``$insert_id`` when it is built, unless ``seed`` is given: then message ``i``
    gets ``"<seed>-<i>"``, so whoever builds messages from the same seed (a re-import of the
    same line) gives them the same ids.
    """

    __slots__ = ("context", "created", "extra", "message", "otel", "seed", "spec")

    def __init__(
        self,
        spec: BridgeSpec,
        created: float,
        message: str | None,
        context: BoundContext,
        otel: Any = None,
        extra: Mapping[str, Any] | None = None,
        seed: str | None = None,
    ) -> None:
        self.spec = spec
        self.created = created
        self.message = message
        self.context = context
        self.otel = otel
        self.extra = extra
        self.seed = seed

    def message_for(
        self, kind: str, item: Any, op: str | None, index: int, weight: int = RECORD_OVERHEAD
    ) -> TagMessage:
        """Message ``index`` of this capture."""
        return TagMessage(
            self.spec,
            self.created,
            self.message,
            self.context,
            self.otel,
            self.extra,
            self.seed,
            kind,
            item,
            op,
            index,
            weight,
        )


class TagMessage:
    """One message of a tag, with what the caller's thread captured for it, built into a
    Mixpanel record on the sender thread.

    ``weight`` is its approximate encoded size, measured at the call (what it counts for
    against a consumer's byte budget until it is encoded).
    """

    __slots__ = (
        "context",
        "created",
        "extra",
        "index",
        "item",
        "kind",
        "message",
        "op",
        "otel",
        "seed",
        "spec",
        "weight",
    )
    checked = True  # built from snapshots: the consumer need not walk the record again

    def __init__(
        self,
        spec: BridgeSpec,
        created: float,
        message: str | None,
        context: BoundContext,
        otel: Any,
        extra: Mapping[str, Any] | None,
        seed: str | None,
        kind: str,
        item: Any,
        op: str | None,
        index: int = 0,
        weight: int = RECORD_OVERHEAD,
    ) -> None:
        self.spec = spec
        self.created = created
        self.message = message
        self.context = context
        self.otel = otel
        self.extra = extra
        self.seed = seed
        self.kind = kind
        self.item = item
        self.op = op
        self.index = index
        self.weight = weight

    def __repr__(self) -> str:
        return f"TagMessage({self.kind}, {self.item!r})"

    def distinct_id(self, given: Any, field: str) -> Any:
        """Resolve the user: the tag, the bound context, baggage ``enduser.id``, the default."""
        user = resolve_distinct_id(given, self.context, self.otel, self.spec.default_distinct_id)
        if user is None:
            raise InvalidMessageError(
                field,
                "no distinct_id: not in the tag, none bound with mp_logbridge.bound(), no "
                "OpenTelemetry baggage 'enduser.id', and no default_distinct_id",
            )
        return user

    def build(self) -> dict[str, Any]:
        """The Mixpanel record (raises :class:`~mp_logbridge.InvalidMessageError` if impossible)."""
        item = self.item
        if self.kind == "event":
            return self._event(item)
        return self._update(item)

    def _event(self, item: Mapping[str, Any]) -> dict[str, Any]:
        # The hot path of the sender thread: one dict, in the key order the SDKs send, from
        # values checked when they were captured (nothing is walked again).
        spec = self.spec
        seed = self.seed
        insert_id = new_insert_id() if seed is None else f"{seed}-{self.index:x}"
        props: dict[str, Any] = {
            "token": spec.token,
            "distinct_id": None,
            "time": int(self.created * 1000),
            "$insert_id": insert_id,
            "mp_lib": msg.LIB_NAME,
            "$lib_version": __version__,
        }
        if spec.super_properties:
            props.update(spec.super_properties)
        bound = self.context.properties
        if bound:
            props.update(bound)
        if self.extra:
            props.update(self.extra)
        otel = self.otel
        if otel and spec.include_trace:  # an empty context has no span
            ids = span_ids(otel)
            if ids is not None:
                props.update(format_span_ids(ids))
        own = item.get("properties")
        if own is not None:
            if type(own) is not dict and not isinstance(own, Mapping):
                raise InvalidMessageError(
                    "tag.properties", f"must be a mapping, got {type(own).__name__}"
                )
            props.update(own)
        if type(item) is not BuiltTag:  # a hand-written tag: other keys are properties too
            for key, value in item.items():
                if key not in _EVENT_KEYS:
                    props[key] = value
            if "time" in props and props["time"] is not None:
                props["time"] = msg.event_time_ms(props["time"])
        elif own is not None and "time" in own:
            props["time"] = msg.event_time_ms(own["time"])
        name = item.get("event") or self.message
        if type(name) is not str or not name:
            if not name:
                raise InvalidMessageError(
                    "tag.event", "no event name in the tag and the log message is empty"
                )
            msg.check_name(name, "event")
        user = props["distinct_id"]
        if user is None or user == "":
            props["distinct_id"] = self.distinct_id(None, "tag.distinct_id")
        elif type(user) is not str:
            msg.check_distinct_id(user, "tag.distinct_id")
        if props["$insert_id"] is not insert_id:  # the tag gave its own
            msg.check_insert_id(props["$insert_id"])
        if len(props) >= msg.MAX_PROPERTIES:
            msg.check_count(props, "properties")
        return {"event": name, "properties": props}

    def _update(self, item: Mapping[str, Any]) -> dict[str, Any]:
        capture, spec, op = self, self.spec, self.op
        if op is None:
            ops = ", ".join(msg.GROUP_OPS if self.kind == "group_update" else msg.PROFILE_OPS)
            raise InvalidMessageError("tag", f"a {self.kind.replace('_', ' ')} needs one of {ops}")
        value = item[op]
        if (
            op == "$append"
            and isinstance(value, Mapping)
            and isinstance(value.get("$transactions"), Mapping)
        ):
            transaction = value["$transactions"]
            if "$time" not in transaction:
                when = _dt.datetime.fromtimestamp(capture.created, _dt.timezone.utc)
                value = {**value, "$transactions": {**transaction, "$time": format_datetime(when)}}
        params = {
            key: val
            for key, val in item.items()
            if key not in _PROFILE_OPS
            and key not in ("$distinct_id", "$group_key", "$group_id", "$token")
        }
        time_ms = int(capture.created * 1000)
        if self.kind == "group_update":
            group_key: Any = item.get("$group_key")
            group_id: Any = item.get("$group_id")
            return msg.group_update(
                spec.token, group_key, group_id, op, value, optional_params=params, time_ms=time_ms
            )
        distinct_id = self.distinct_id(item.get("$distinct_id"), "tag.$distinct_id")
        return msg.profile_update(
            spec.token, distinct_id, op, value, optional_params=params, time_ms=time_ms
        )

"""Mixpanel events from the spans and log records an OpenTelemetry-instrumented app already emits.

Three pieces, all front doors in the library's sense (they capture on the app's thread and hand
deferred messages to the shared background consumer; building and sending happen there):

* :class:`MixpanelSpanProcessor` — a span processor: finished spans chosen by :class:`SpanRule`
  rules become events (``"Page Viewed"`` for HTTP server spans out of the box) with the duration,
  status, route, method, status code and other attributes named by :data:`ATTRIBUTE_PROPERTIES`.
* :class:`MixpanelSpanExporter` — the same as a span exporter, which is what
  ``opentelemetry-instrument`` loads by name: ``OTEL_TRACES_EXPORTER=mixpanel`` (with
  ``MIXPANEL_TOKEN``) sends events from an auto-instrumented app without touching its code.
* :class:`MixpanelLogProcessor` — a log record processor: log records carrying the library's tag
  (``extra={"mixpanel": ...}`` through OpenTelemetry's ``LoggingHandler``, or the ``mixpanel``
  attribute set directly) become the same messages a :class:`~mp_logbridge.MixpanelHandler`
  sends, once even when both see the record.

Who the user is: the span attribute ``enduser.id`` (or ``user.id``), then the user bound with
:func:`mp_logbridge.bound` on the span's thread when it ended, then the OpenTelemetry baggage
entry ``enduser.id``, then ``default_distinct_id``. A chosen span that names no user is not an
event; it is counted as ``no_user`` in ``stats()``.

Needs the OpenTelemetry SDK (``pip install 'mp_logbridge[otel]'``); ``import mp_logbridge`` does
not import this module.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from collections.abc import Set as AbstractSet
from types import MappingProxyType
from typing import Any

try:
    from opentelemetry import trace as _trace_api
    from opentelemetry.sdk._logs import LogRecordProcessor
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from opentelemetry.trace import SpanKind, StatusCode
except ImportError as _error:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "mp_logbridge.integrations.opentelemetry needs the OpenTelemetry SDK: "
        "pip install 'mp_logbridge[otel]'"
    ) from _error

from .. import _messages as msg
from .._context import (
    BoundContext,
    baggage_distinct_id,
    current_context,
    format_span_ids,
)
from .._diagnostics import warn
from .._errors import ConfigurationError
from .._frontdoor import SENT_MARK, Bridge
from .._tags import DEFAULT_TAG
from .._transport import Credentials

__all__ = [
    "ATTRIBUTE_PROPERTIES",
    "DEFAULT_RULES",
    "HTTP_METHOD_ATTRIBUTES",
    "MAX_STRING_LENGTH",
    "USER_ATTRIBUTES",
    "MixpanelLogProcessor",
    "MixpanelSpanExporter",
    "MixpanelSpanProcessor",
    "SpanRule",
    "is_http_span",
]

# --------------------------------------------------------------------------- the attribute table

#: How span and resource attributes (OpenTelemetry semantic conventions, old and new HTTP
#: conventions alike) are named as Mixpanel properties. When a span has both an old and a new
#: name (``OTEL_SEMCONV_STABILITY_OPT_IN=http/dup``), the new one is used. ``http.target`` holds
#: the path and the query string; only the path is kept. With ``raw_attribute_names=True`` every
#: property keeps its attribute name instead.
ATTRIBUTE_PROPERTIES: Mapping[str, str] = MappingProxyType(
    {
        # HTTP, new conventions first, then the old ones
        "http.route": "route",
        "http.request.method": "method",
        "http.method": "method",
        "http.response.status_code": "status_code",
        "http.status_code": "status_code",
        "url.path": "path",
        "http.target": "path",
        "url.query": "query",
        "url.full": "url",
        "http.url": "url",
        "url.scheme": "scheme",
        "http.scheme": "scheme",
        "server.address": "host",
        "http.host": "host",
        "net.host.name": "host",
        "server.port": "port",
        "net.host.port": "port",
        "client.address": "client_address",
        "http.client_ip": "client_address",
        "user_agent.original": "user_agent",
        "http.user_agent": "user_agent",
        "network.protocol.version": "http_version",
        "http.flavor": "http_version",
        "http.request.body.size": "request_size",
        "http.request_content_length": "request_size",
        "http.response.body.size": "response_size",
        "http.response_content_length": "response_size",
        # errors
        "error.type": "error_type",
        "exception.type": "exception_type",
        "exception.message": "exception_message",
        # RPC, databases, messaging, code
        "rpc.system": "rpc_system",
        "rpc.service": "rpc_service",
        "rpc.method": "rpc_method",
        "db.system.name": "db_system",
        "db.system": "db_system",
        "db.operation.name": "db_operation",
        "db.operation": "db_operation",
        "messaging.system": "messaging_system",
        "messaging.destination.name": "messaging_destination",
        "code.function.name": "function",
        "code.function": "function",
        # resource
        "service.name": "service",
        "service.version": "service_version",
        "deployment.environment.name": "environment",
        "deployment.environment": "environment",
    }
)

#: Span attributes naming the user, in order (``user.id`` is the newer convention's name).
USER_ATTRIBUTES = ("enduser.id", "user.id")

#: Strings taken from attributes are cut to this many characters (Mixpanel keeps no more).
MAX_STRING_LENGTH = 255

_EVENT_ATTRIBUTE = "mixpanel.event"
_PREFIX = "mixpanel."
# Properties an event record has besides those copied from attributes (token, distinct_id, time,
# $insert_id, mp_lib, $lib_version, trace_id, span_id): copying stops below Mixpanel's limit.
_ROOM = msg.MAX_PROPERTIES - 9
_MAX_ITEMS = 255  # elements of a list, keys of an object (Mixpanel's limits)
_MAX_DEPTH = 3  # nesting of objects (Mixpanel's limit)


# attribute -> (property, rank): of two attributes giving one property, the lower rank wins.
_Table = Mapping[str, tuple[str, int]]
_NAMED: _Table = {
    attribute: (prop, rank) for rank, (attribute, prop) in enumerate(ATTRIBUTE_PROPERTIES.items())
}
_RAW: _Table = {attribute: (attribute, 0) for attribute in ATTRIBUTE_PROPERTIES}


def _map_attributes(
    table: _Table, attributes: Mapping[str, Any], props: dict[str, Any]
) -> list[tuple[str, str]]:
    """Put the attributes the table names into ``props``; return the ``mixpanel.*`` others as
    ``(attribute, property)`` pairs."""
    ranks: dict[str, int] = {}
    prefixed: list[tuple[str, str]] = []
    for attribute, value in attributes.items():
        entry = table.get(attribute)
        if entry is None:
            if attribute.startswith(_PREFIX) and attribute != _EVENT_ATTRIBUTE:
                prefixed.append((attribute, attribute[len(_PREFIX) :]))
            continue
        prop, rank = entry
        if ranks.get(prop, rank + 1) <= rank:
            continue
        if prop == "path" and attribute == "http.target" and type(value) is str:
            value = value.split("?", 1)[0]  # the old convention's target includes the query
        kind = type(value)
        if not (kind is int or (kind is str and len(value) <= MAX_STRING_LENGTH)):
            value = _clean(value)  # the common values above need no cleaning
            if value is _SKIP:
                continue
        props[prop] = value
        ranks[prop] = rank
    return prefixed


def _clean(value: Any, depth: int = 0) -> Any:
    """An attribute value as a property value: long strings and lists cut to Mixpanel's limits,
    tuples as lists, nested objects kept to depth 3; ``_SKIP`` for what cannot be sent (bytes
    that are not UTF-8, NaN, infinities, other types)."""
    kind = type(value)
    if kind is str:
        return value if len(value) <= MAX_STRING_LENGTH else value[:MAX_STRING_LENGTH]
    if kind is bool or kind is int or value is None:
        return value
    if kind is float:
        return value if value == value and value not in (_INF, -_INF) else _SKIP
    if kind is bytes:
        try:
            return _clean(value[: MAX_STRING_LENGTH * 4].decode("utf-8"), depth)
        except UnicodeDecodeError:
            return _SKIP
    if depth >= _MAX_DEPTH:
        return _SKIP
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if len(out) >= _MAX_ITEMS:
                break
            cleaned = _clean(item, depth + 1)
            if type(key) is str and cleaned is not _SKIP:
                out[key] = cleaned
        return out
    if isinstance(value, (list, tuple)):
        items = [_clean(item, depth + 1) for item in value[:_MAX_ITEMS]]
        return [item for item in items if item is not _SKIP]
    return _SKIP


_SKIP: Any = object()
_INF = float("inf")


# --------------------------------------------------------------------------- rules


_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
_KINDS = {kind.name.lower(): kind for kind in SpanKind}
_KIND_NAMES = {kind: name for name, kind in _KINDS.items()}
_STATUS_NAMES = {code: code.name.lower() for code in StatusCode}


#: The attributes of which an HTTP span has one (the request method, new and old conventions).
HTTP_METHOD_ATTRIBUTES = ("http.request.method", "http.method")


def is_http_span(span: ReadableSpan) -> bool:
    """Whether a span describes an HTTP request (it has an HTTP method, old or new convention)."""
    attributes = span.attributes or _NO_ATTRIBUTES
    return any(name in attributes for name in HTTP_METHOD_ATTRIBUTES)


def _name_matcher(pattern: Any, what: str) -> Callable[[str], bool] | None:
    if pattern is None:
        return None
    if isinstance(pattern, re.Pattern):
        compiled = pattern
        return lambda text: compiled.fullmatch(text) is not None
    if not isinstance(pattern, str) or not pattern:
        raise ConfigurationError(
            f"SpanRule {what}= must be a name, a glob pattern or a compiled regular expression"
        )
    if not any(char in pattern for char in "*?["):
        return pattern.__eq__
    globbed = re.compile(fnmatch.translate(pattern))
    return lambda text: globbed.match(text) is not None


def _kinds(kind: Any) -> frozenset[SpanKind] | None:
    if kind is None:
        return None
    items = [kind] if isinstance(kind, (str, SpanKind)) else list(kind)
    kinds = set()
    for item in items:
        if isinstance(item, SpanKind):
            kinds.add(item)
        elif isinstance(item, str) and item.lower() in _KINDS:
            kinds.add(_KINDS[item.lower()])
        else:
            raise ConfigurationError(
                f"SpanRule kind= must be one of {', '.join(_KINDS)} (or SpanKind), got {item!r}"
            )
    return frozenset(kinds)


def _attribute_test(expected: Any) -> Callable[[Any], bool]:
    if expected is Ellipsis:
        return lambda _value: True
    if callable(expected):
        return lambda value: bool(expected(value))
    return lambda value: bool(value == expected)


class SpanRule:
    """Which finished spans become an event, the event's name, and which attributes it carries.

    Args:
        event: the event name: a fixed string (``"Page Viewed"``), a template naming span
            attributes in braces (``"{mixpanel.event}"``, ``"Viewed {http.route}"``; a span that
            lacks one of them does not match), or a callable ``(span) -> str | None`` (``None``:
            no match). Templates and callables run on the span's thread when it ends: keep
            callables cheap.
        name: the span name: exact, a glob (``"GET /api/*"``) or a compiled regular expression.
        kind: a span kind (``"server"``, ``"client"``, ``"internal"``, ``"producer"``,
            ``"consumer"`` or :class:`~opentelemetry.trace.SpanKind`) or a collection of them.
        scope: the instrumentation scope name (``"opentelemetry.instrumentation.flask"``), exact
            or a glob.
        attributes: conditions on span attributes: ``{"http.route": "/checkout"}`` (equal),
            ``{"app.plan": ...}`` (present), ``{"http.response.status_code": lambda c: c < 400}``.
        any_attributes: attribute names of which the span must have at least one
            (``["http.request.method", "http.method"]``: an HTTP span, either convention).
        when: any other condition, ``(span) -> bool``.
        properties: span attributes to add to the event besides the standard ones: a list of
            attribute names (properties named by :data:`ATTRIBUTE_PROPERTIES` when listed there,
            otherwise by the attribute name) or a mapping from attribute name to property name.
        all_attributes: add every span attribute (named as for ``properties``), up to
            Mixpanel's property limit; what does not fit is counted as ``attributes_dropped``.

    Every condition given must hold; the first rule of a processor that matches a span decides
    (one event per span at most).
    """

    __slots__ = (
        "_any",
        "_attributes",
        "_event",
        "_fields",
        "_kinds",
        "_name",
        "_scope",
        "_when",
        "all_attributes",
        "event",
        "properties",
    )

    def __init__(
        self,
        event: str | Callable[[ReadableSpan], str | None],
        *,
        name: str | re.Pattern[str] | None = None,
        kind: str | SpanKind | Collection[str | SpanKind] | None = None,
        scope: str | re.Pattern[str] | None = None,
        attributes: Mapping[str, Any] | None = None,
        any_attributes: Collection[str] = (),
        when: Callable[[ReadableSpan], bool] | None = None,
        properties: Sequence[str] | Mapping[str, str] = (),
        all_attributes: bool = False,
    ) -> None:
        if isinstance(event, str):
            if not event.strip():
                raise ConfigurationError("SpanRule event= must be a non-empty name")
            self._fields: tuple[str, ...] = tuple(_PLACEHOLDER.findall(event))
        elif callable(event):
            self._fields = ()
        else:
            raise ConfigurationError("SpanRule event= must be a name, a template or a callable")
        if when is not None and not callable(when):
            raise ConfigurationError("SpanRule when= must be a callable (span) -> bool")
        if isinstance(properties, str) or isinstance(any_attributes, str):
            raise ConfigurationError(
                "SpanRule properties= and any_attributes= must be lists of attribute names"
            )
        self._any = frozenset(str(name) for name in any_attributes)
        self.event = event
        self._event = event
        self._name = _name_matcher(name, "name")
        self._scope = _name_matcher(scope, "scope")
        self._kinds = _kinds(kind)
        self._attributes = tuple(
            (str(key), _attribute_test(value)) for key, value in (attributes or {}).items()
        )
        self._when = when
        self.properties: tuple[tuple[str, str | None], ...] = (
            tuple((str(attr), str(prop)) for attr, prop in properties.items())
            if isinstance(properties, Mapping)
            else tuple((str(attr), None) for attr in properties)
        )
        self.all_attributes = bool(all_attributes)

    def __repr__(self) -> str:
        return f"SpanRule({self.event!r})"

    def select(
        self,
        span: ReadableSpan,
        attributes: Mapping[str, Any] | None = None,
        present: AbstractSet[str] | None = None,
    ) -> str | None:
        """The event name when ``span`` matches this rule, else ``None`` (on the span's thread).

        ``attributes`` and ``present`` (the span's attributes and a set of their names) save
        reading them again when several rules look at one span.
        """
        if self._kinds is not None and span.kind not in self._kinds:
            return None
        if self._name is not None and not self._name(span.name):
            return None
        if self._scope is not None:
            scope = span.instrumentation_scope
            if scope is None or not self._scope(scope.name):
                return None
        if attributes is None:
            attributes = span.attributes or _NO_ATTRIBUTES
        if present is None:
            present = set(attributes)
        if self._any and present.isdisjoint(self._any):
            return None
        for key, test in self._attributes:
            if key not in present or not test(attributes[key]):
                return None
        if self._when is not None and not self._when(span):
            return None
        event = self._event
        if not isinstance(event, str):
            name = event(span)
            return name if isinstance(name, str) and name else None
        if not self._fields:
            return event
        for field in self._fields:
            if field not in present:
                return None
            value = attributes[field]
            if value is None or value == "":
                return None
        return _PLACEHOLDER.sub(lambda found: str(attributes[found.group(1)]), event)


_NO_ATTRIBUTES: Mapping[str, Any] = MappingProxyType({})

#: The rules used unless others are given: a span with a ``mixpanel.event`` attribute becomes
#: that event; an HTTP server span becomes ``"Page Viewed"``.
DEFAULT_RULES: tuple[SpanRule, ...] = (
    SpanRule("{mixpanel.event}"),
    SpanRule("Page Viewed", kind="server", any_attributes=HTTP_METHOD_ATTRIBUTES),
)


# --------------------------------------------------------------------------- spans to events


class _Counter:
    """A count shared by threads (re-entrant lock: a signal handler may count on the same
    thread while it is held)."""

    __slots__ = ("_lock", "value")

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.value = 0

    def add(self, amount: int = 1) -> None:
        with self._lock:
            self.value += amount


def _as_user(value: Any) -> Any:
    if (type(value) is str and value) or (type(value) is int):
        return value
    return None


def _bridge(owner: str, token: str | None, settings: Mapping[str, Any]) -> Bridge:
    """The library's front-door plumbing (token, consumer, sent marks, loss counting)."""
    return Bridge(owner, token, **settings)


class _SpanEvents:
    """What the span processor and the span exporter share: rules, the table, the bridge."""

    __slots__ = (
        "_resource",
        "attributes_dropped",
        "bridge",
        "default_distinct_id",
        "include_trace",
        "no_user",
        "raw",
        "rules",
        "super_properties",
        "table",
        "token",
    )

    def __init__(
        self,
        owner: str,
        token: str | None,
        rules: Sequence[SpanRule],
        super_properties: Mapping[str, Any] | None,
        default_distinct_id: str | int | None,
        include_trace: bool,
        raw_attribute_names: bool,
        delivery: Mapping[str, Any],
    ) -> None:
        rules = tuple(rules)
        for rule in rules:
            if not isinstance(rule, SpanRule):
                raise ConfigurationError(f"{owner}: rules must be SpanRule objects, got {rule!r}")
        if default_distinct_id is not None and _as_user(default_distinct_id) is None:
            raise ConfigurationError(f"{owner}: default_distinct_id must be a string or an int")
        self.rules = rules
        self.bridge = _bridge(
            owner,
            token,
            {
                "tag": DEFAULT_TAG,
                "super_properties": super_properties,
                "default_distinct_id": default_distinct_id,
                "include_trace": include_trace,
                "include_exception": True,
                **delivery,
            },
        )
        self.token = self.bridge.spec.token
        self.super_properties = dict(super_properties or {})
        self.default_distinct_id = default_distinct_id
        self.include_trace = bool(include_trace)
        self.raw = bool(raw_attribute_names)
        self.table = _RAW if raw_attribute_names else _NAMED
        self.no_user = _Counter()
        self.attributes_dropped = _Counter()
        self._resource: tuple[Any, dict[str, Any]] | None = None

    def capture(self, span: ReadableSpan, noted: tuple[BoundContext, Any] | None = None) -> None:
        """Choose, find the user, queue: lookups only, no building.

        ``noted`` is what the span's thread noted (the bound context, the baggage user) when
        this runs elsewhere; ``None`` means this is the span's thread: read them here.
        """
        # The SDK's attribute mapping raises and catches KeyError for every name it lacks: one
        # set of the names makes the checks below cheap whatever is missing.
        attributes = span.attributes or _NO_ATTRIBUTES
        present = set(attributes)
        for rule in self.rules:
            name = rule.select(span, attributes, present)
            if name is not None:
                break
        else:
            return
        user = None
        for key in USER_ATTRIBUTES:
            if key in present:
                user = _as_user(attributes[key])
                if user is not None:
                    break
        bound = current_context() if noted is None else noted[0]
        if user is None:
            user = bound.distinct_id
            if user is None:
                user = baggage_distinct_id() if noted is None else noted[1]
                if user is None:
                    user = self.default_distinct_id
                    if user is None:
                        self.no_user.add()
                        return
        weight = _BASE_WEIGHT + _ATTRIBUTE_WEIGHT * min(len(present), _ROOM)
        message = _SpanMessage(self, rule, name, span, user, bound, weight)
        self.bridge.send_message("event", message)

    def resource_properties(self, resource: Any) -> Mapping[str, Any]:
        """The properties the table takes from a span's resource (``service.name``, ...); one
        resource per provider, so the last one's are kept."""
        cached = self._resource
        if cached is not None and cached[0] is resource:
            return cached[1]
        props: dict[str, Any] = {}
        if resource is not None:
            _map_attributes(self.table, dict(resource.attributes), props)
        self._resource = (resource, props)
        return props

    def lose(self, error: BaseException) -> None:
        self.bridge.lose("invalid", f"a span could not be read: {type(error).__name__}: {error}")

    def stats(self) -> dict[str, Any]:
        result = self.bridge.stats()
        result["no_user"] = self.no_user.value
        result["attributes_dropped"] = self.attributes_dropped.value
        return result


# What a span's event is taken to weigh until it is encoded (the consumer's memory bound counts
# it): the record's own fields, plus a typical attribute (values are cut to 255 characters).
_BASE_WEIGHT = 400
_ATTRIBUTE_WEIGHT = 32


class _SpanMessage:
    """One chosen span, built into an event record on the sender thread; ``weight`` is its
    approximate encoded size until then."""

    __slots__ = ("bound", "events", "name", "rule", "span", "user", "weight")

    def __init__(
        self,
        events: _SpanEvents,
        rule: SpanRule,
        name: str,
        span: ReadableSpan,
        user: Any,
        bound: BoundContext,
        weight: int = _BASE_WEIGHT,
    ) -> None:
        self.weight = weight
        self.events = events
        self.rule = rule
        self.name = name
        self.span = span
        self.user = user
        self.bound = bound

    def __repr__(self) -> str:
        return f"SpanMessage({self.name!r}, span={self.span.name!r})"

    def build(self) -> dict[str, Any]:
        """The event record (raises :class:`~mp_logbridge.InvalidMessageError` if impossible)."""
        events, span, rule = self.events, self.span, self.rule
        # A plain copy: the SDK's mapping raises and catches KeyError for every missing name.
        attributes = dict(span.attributes or _NO_ATTRIBUTES)
        props: dict[str, Any] = dict(events.super_properties)
        props.update(self.bound.properties)
        start, end = span.start_time or 0, span.end_time or 0
        status = span.status.status_code
        props["duration_ms"] = round(max(end - start, 0) / 1e6, 3)
        props["status"] = _STATUS_NAMES[status]
        props["success"] = status is not StatusCode.ERROR
        props["span_name"] = span.name
        props["span_kind"] = _KIND_NAMES[span.kind]
        props.update(events.resource_properties(span.resource))
        prefixed = _map_attributes(events.table, attributes, props)
        raw = events.raw
        if "exception_type" not in props and "exception.type" not in props:
            self._exception(props, raw)
        dropped = 0
        copied: list[tuple[str, str | None]]
        if rule.all_attributes:
            copied = [(attribute, None) for attribute in attributes]
        else:
            copied = list(rule.properties)
        copied.extend(prefixed)
        for attribute, named in copied:
            if attribute not in attributes or attribute in USER_ATTRIBUTES:
                continue
            prop = named or (attribute if raw else ATTRIBUTE_PROPERTIES.get(attribute, attribute))
            if prop not in props and len(props) >= _ROOM:
                dropped += 1
                continue
            cleaned = _clean(attributes[attribute])
            if cleaned is _SKIP:
                dropped += 1
            else:
                props[prop] = cleaned
        if dropped:
            events.attributes_dropped.add(dropped)
        context = span.context
        insert_id = None
        if context is not None and context.is_valid:
            if events.include_trace:
                props.update(format_span_ids((context.trace_id, context.span_id)))
            # One span, one event: the same id whichever way (and however often) it is sent.
            insert_id = f"{context.span_id:016x}{context.trace_id & (1 << 80) - 1:020x}"
        return msg.event(
            events.token,
            self.user,
            self.name,
            props,
            time_ms=start // 1_000_000 if start else None,
            insert_id=insert_id,
        )

    def _exception(self, props: dict[str, Any], raw: bool) -> None:
        """``exception_type``/``exception_message`` of the span's last recorded exception."""
        for event in reversed(self.span.events):
            if event.name == "exception":
                found = event.attributes or _NO_ATTRIBUTES
                for attribute in ("exception.type", "exception.message"):
                    value = _clean(found.get(attribute))
                    if value is not None and value is not _SKIP:
                        props[attribute if raw else ATTRIBUTE_PROPERTIES[attribute]] = value
                return


_NOTHING_BOUND = BoundContext()
_NOTHING_NOTED: tuple[BoundContext, Any] = (_NOTHING_BOUND, None)


class MixpanelSpanProcessor(SpanProcessor):
    """A span processor turning chosen finished spans into Mixpanel events.

    Add it to the SDK's tracer provider beside the processors already there::

        provider.add_span_processor(MixpanelSpanProcessor())   # token from MIXPANEL_TOKEN

    When a span ends, on its thread, the processor only picks the rule, reads the user (span
    attribute ``enduser.id``/``user.id``, the user bound with :func:`mp_logbridge.bound` at that
    moment, baggage ``enduser.id``, ``default_distinct_id``) and queues a deferred message;
    the event is built and sent by the background consumer. It never raises into the app.

    Args:
        token: the project token (default: ``MIXPANEL_TOKEN``; without one the processor is
            disabled, warns once and counts what it skips).
        rules: the :class:`SpanRule` list; the first that matches a span decides (default
            :data:`DEFAULT_RULES`).
        super_properties: properties added to every event.
        default_distinct_id: the user of chosen spans that name none (otherwise such spans are
            counted as ``no_user`` and not sent).
        include_trace: add the span's ``trace_id``/``span_id`` (default on).
        raw_attribute_names: name properties by their attribute names (``http.route``) instead
            of :data:`ATTRIBUTE_PROPERTIES` (``route``).

    ``consumer``, ``region``, ``api_host``, ``credentials``, ``api_secret``, ``retry`` and the
    delivery options (``batch_size``, ``flush_interval``, ...) mean what they mean for
    :class:`~mp_logbridge.MixpanelHandler`; the background consumer is shared with front doors
    configured the same way.
    """

    def __init__(
        self,
        token: str | None = None,
        *,
        rules: Sequence[SpanRule] = DEFAULT_RULES,
        super_properties: Mapping[str, Any] | None = None,
        default_distinct_id: str | int | None = None,
        include_trace: bool = True,
        raw_attribute_names: bool = False,
        consumer: Any = None,
        region: str | None = None,
        api_host: str | None = None,
        credentials: Credentials | None = None,
        api_secret: str | None = None,
        retry: Mapping[str, Any] | None = None,
        **delivery: Any,
    ) -> None:
        self._events = _SpanEvents(
            type(self).__name__,
            token,
            rules,
            super_properties,
            default_distinct_id,
            include_trace,
            raw_attribute_names,
            _delivery(consumer, region, api_host, credentials, api_secret, retry, delivery),
        )

    @property
    def enabled(self) -> bool:
        """Whether the processor has a token (a disabled one counts what it skips)."""
        return self._events.bridge.enabled

    @property
    def consumer(self) -> Any:
        """The consumer events go to (``None`` when disabled)."""
        return self._events.bridge.consumer

    def __repr__(self) -> str:
        state = "" if self.enabled else " disabled"
        return f"<{type(self).__name__}{state} rules={len(self._events.rules)}>"

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        """Nothing to do when a span starts."""

    def on_end(self, span: ReadableSpan) -> None:
        """Queue an event for ``span`` when a rule chooses it (never raises)."""
        try:
            self._events.capture(span)
        except Exception as error:
            self._events.lose(error)

    def shutdown(self) -> None:
        """Deliver what is queued and release the consumer (idempotent)."""
        self._events.bridge.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Deliver what is queued; ``True`` when everything was delivered."""
        return self._events.bridge.flush(timeout_millis / 1000)

    def stats(self) -> dict[str, Any]:
        """The consumer's delivery counters, plus ``no_user`` (chosen spans without a user),
        ``attributes_dropped`` (attributes left out of events: over the property limit or not
        sendable), losses counted here and ``skipped`` (spans a disabled processor skipped)."""
        return self._events.stats()


def _delivery(
    consumer: Any,
    region: str | None,
    api_host: str | None,
    credentials: Credentials | None,
    api_secret: str | None,
    retry: Mapping[str, Any] | None,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "consumer": consumer,
        "region": region,
        "api_host": api_host,
        "credentials": credentials,
        "api_secret": api_secret,
        "retry": retry,
        "options": dict(options),
    }


class _ContextRecorder(SpanProcessor):
    """For the exporter: what only the span's thread knows (the bound user and properties,
    baggage ``enduser.id``), noted when a span ends and taken when the exporter sees it.

    Only spans ending with something bound or in baggage are noted; two generations of at most
    ``limit`` entries each bound the memory of notes whose span is never exported (not
    sampled, or dropped by a full export queue). No lock: a generation is swapped, not cleared.
    """

    def __init__(self, limit: int = 4096) -> None:
        self._limit = limit
        self._current: dict[tuple[int, int], tuple[BoundContext, Any]] = {}
        self._previous: dict[tuple[int, int], tuple[BoundContext, Any]] = {}

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        """Nothing to do when a span starts."""

    def on_end(self, span: ReadableSpan) -> None:
        try:
            bound = current_context()
            user = baggage_distinct_id()
            if user is None and bound.distinct_id is None and not bound.properties:
                return
            context = span.context
            if context is None:
                return
            current = self._current
            current[(context.trace_id, context.span_id)] = (bound, user)
            if len(current) > self._limit:
                self._previous, self._current = current, {}
        except Exception:  # never into the app; the exporter still sends without the note
            return

    def take(self, span: ReadableSpan) -> tuple[BoundContext, Any]:
        context = span.context
        if context is not None:
            key = (context.trace_id, context.span_id)
            noted = self._current.pop(key, None) or self._previous.pop(key, None)
            if noted is not None:
                return noted
        return _NOTHING_BOUND, None

    def shutdown(self) -> None:
        """Keep the notes: the provider shuts this down before the batch processor behind
        it exports its last spans."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class MixpanelSpanExporter(SpanExporter):
    """The span processor's rules as a span exporter: what ``opentelemetry-instrument`` loads.

    Zero-code, with the ``otel`` extra installed::

        MIXPANEL_TOKEN=... OTEL_TRACES_EXPORTER=mixpanel opentelemetry-instrument python app.py

    (``mixpanel,otlp`` keeps the OTLP exporter too). The SDK wraps it in a batch span processor,
    so events are made on that processor's thread from the finished spans, with the same rules,
    properties and ``$insert_id`` as :class:`MixpanelSpanProcessor`. What only the span's thread
    knows — the user bound with :func:`mp_logbridge.bound` and baggage ``enduser.id`` — is noted
    by a small companion processor that the exporter adds to the SDK tracer provider
    (``tracer_provider``, default the global one; ``record_context=False`` to go without).

    Made without arguments (as ``opentelemetry-instrument`` does), it is configured from the
    environment: ``MIXPANEL_TOKEN``, ``MIXPANEL_API_HOST``/``MIXPANEL_REGION``. Other arguments
    are those of :class:`MixpanelSpanProcessor`. Use one or the other, not both, for the same
    spans (they would give the same events twice; Mixpanel drops the second by ``$insert_id``).
    """

    def __init__(
        self,
        token: str | None = None,
        *,
        rules: Sequence[SpanRule] = DEFAULT_RULES,
        super_properties: Mapping[str, Any] | None = None,
        default_distinct_id: str | int | None = None,
        include_trace: bool = True,
        raw_attribute_names: bool = False,
        record_context: bool = True,
        tracer_provider: Any = None,
        consumer: Any = None,
        region: str | None = None,
        api_host: str | None = None,
        credentials: Credentials | None = None,
        api_secret: str | None = None,
        retry: Mapping[str, Any] | None = None,
        **delivery: Any,
    ) -> None:
        self._events = _SpanEvents(
            type(self).__name__,
            token,
            rules,
            super_properties,
            default_distinct_id,
            include_trace,
            raw_attribute_names,
            _delivery(consumer, region, api_host, credentials, api_secret, retry, delivery),
        )
        self._recorder: _ContextRecorder | None = None
        if record_context:
            provider = tracer_provider or _trace_api.get_tracer_provider()
            if isinstance(provider, TracerProvider):
                self._recorder = _ContextRecorder()
                provider.add_span_processor(self._recorder)

    @property
    def enabled(self) -> bool:
        """Whether the exporter has a token (a disabled one counts what it skips)."""
        return self._events.bridge.enabled

    @property
    def consumer(self) -> Any:
        """The consumer events go to (``None`` when disabled)."""
        return self._events.bridge.consumer

    def __repr__(self) -> str:
        state = "" if self.enabled else " disabled"
        return f"<{type(self).__name__}{state} rules={len(self._events.rules)}>"

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Queue events for the chosen spans; always ``SUCCESS`` (losses are counted here, the
        other exporters of the pipeline are never affected)."""
        recorder, events = self._recorder, self._events
        for span in spans:
            try:
                events.capture(span, recorder.take(span) if recorder else _NOTHING_NOTED)
            except Exception as error:
                events.lose(error)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Deliver what is queued and release the consumer (idempotent)."""
        self._events.bridge.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Deliver what is queued; ``True`` when everything was delivered."""
        return self._events.bridge.flush(timeout_millis / 1000)

    def stats(self) -> dict[str, Any]:
        """As :meth:`MixpanelSpanProcessor.stats`."""
        return self._events.stats()


# --------------------------------------------------------------------------- log records


def _sdk_keeps_mappings() -> bool:
    """Whether the installed SDK keeps mappings in log record attributes (1.33 and later)."""
    try:
        version = importlib.metadata.version("opentelemetry-sdk")
        major, minor = (int(part) for part in version.split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return True  # not installed as a distribution (a checkout): assume a current one
    return (major, minor) >= (1, 33)


class MixpanelLogProcessor(LogRecordProcessor):
    """A log record processor sending tagged OpenTelemetry log records to Mixpanel.

    A log record whose attributes carry the tag (default ``"mixpanel"``; it gets there from
    ``extra=tag.track(...)`` through OpenTelemetry's ``LoggingHandler``, or set directly on a log
    record emitted through the OpenTelemetry logs API) becomes exactly the messages
    :class:`~mp_logbridge.MixpanelHandler` makes of it: same tag format, same building, named by
    the log body when the tag names no event, timed by the record's timestamp. Add it to the SDK's
    logger provider::

        logger_provider.add_log_record_processor(MixpanelLogProcessor())

    Sent once, whichever runs first when a :class:`~mp_logbridge.MixpanelHandler` of the same
    project also handles the record: a handler that ran first marked the record, and the mark
    comes along in the attributes; when this processor runs first it notes the record on its
    thread, and the handler, which handles the same record right after on the same thread,
    skips it. This needs the processor to run synchronously within the logging call (the
    SDK's default); it is also where the bound user and the trace context are read.

    Values in the tag arrive as OpenTelemetry kept them (SDK 1.33 or later keeps mappings): lists
    become tuples (sent as lists) and other objects become their ``str()`` — a ``datetime`` then
    reaches Mixpanel as its ``str()``, not in Mixpanel's format as through the handler. The
    handler's ``record_properties``/``extra_properties`` have no counterpart here; with
    ``include_exception`` the OpenTelemetry attributes ``exception.type`` (unqualified) and
    ``exception.message`` give ``exception_type``/``exception_message``.

    Every option (``token``, ``tag``, ``super_properties``, ``default_distinct_id``,
    ``include_trace``, ``include_exception``, ``consumer``, ``region``, ``api_host``,
    ``credentials``, ``api_secret``, ``retry`` and the delivery options) means what it means for
    :class:`~mp_logbridge.MixpanelHandler`.
    """

    def __init__(
        self,
        token: str | None = None,
        *,
        tag: str = DEFAULT_TAG,
        super_properties: Mapping[str, Any] | None = None,
        default_distinct_id: str | int | None = None,
        include_trace: bool = True,
        include_exception: bool = True,
        consumer: Any = None,
        region: str | None = None,
        api_host: str | None = None,
        credentials: Credentials | None = None,
        api_secret: str | None = None,
        retry: Mapping[str, Any] | None = None,
        **delivery: Any,
    ) -> None:
        if not isinstance(tag, str) or not tag:
            raise ConfigurationError(f"tag must be a non-empty string, got {tag!r}")
        if not _sdk_keeps_mappings():
            warn(
                "MixpanelLogProcessor: this opentelemetry-sdk drops dict-valued log attributes, "
                "so only tags that are True or an event name reach it; install "
                "opentelemetry-sdk>=1.33 (pip install 'mp_logbridge[otel]')"
            )
        self._tag = tag
        self._include_exception = bool(include_exception)
        self._bridge = _bridge(
            type(self).__name__,
            token,
            {
                "tag": tag,
                "super_properties": super_properties,
                "default_distinct_id": default_distinct_id,
                "include_trace": include_trace,
                "include_exception": include_exception,
                **_delivery(consumer, region, api_host, credentials, api_secret, retry, delivery),
            },
        )

    @property
    def consumer(self) -> Any:
        """The consumer messages go to (``None`` when disabled)."""
        return self._bridge.consumer

    def __repr__(self) -> str:
        state = "" if self._bridge.enabled else " disabled"
        return f"<{type(self).__name__}{state} tag={self._tag!r}>"

    def on_emit(self, log_data: Any) -> None:
        """Queue the messages of a tagged log record (never raises, never blocks)."""
        try:
            record = log_data.log_record
            attributes = record.attributes
            if not attributes:
                return
            value = attributes.get(self._tag)
            if value is None or value is False:
                return
            bridge = self._bridge
            if not bridge.enabled:
                bridge.skipped += 1
                return
            created = record.timestamp or record.observed_timestamp or time.time_ns()
            scope = log_data.instrumentation_scope
            logger_name = scope.name if scope is not None else ""
            if not bridge.claim_copy(attributes.get(SENT_MARK), created, logger_name):
                return  # a handler or processor of this project sent it already
            extra = None
            if self._include_exception and "exception.type" in attributes:
                extra = {"exception_type": attributes["exception.type"]}
                if "exception.message" in attributes:
                    extra["exception_message"] = attributes["exception.message"]
            body = record.body
            bridge.send(
                value,
                created / 1e9,
                lambda: None if body is None or body == "" else str(body),
                current_context(),
                extra,
            )
        except Exception as error:
            self._bridge.lose("invalid", f"{type(error).__name__}: {error}")

    # ``emit`` is the older SDKs' name for ``on_emit``.
    emit = on_emit

    def shutdown(self) -> None:
        """Deliver what is queued and release the consumer (idempotent)."""
        self._bridge.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Deliver what is queued; ``True`` when everything was delivered."""
        return self._bridge.flush(timeout_millis / 1000)

    def stats(self) -> dict[str, Any]:
        """As :meth:`mp_logbridge.MixpanelHandler.stats`."""
        return self._bridge.stats()

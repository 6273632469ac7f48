"""Who the current work is for: a user and super-properties bound per request, task or thread.

Bound with :func:`bound` (a context manager) or :func:`bind`/:func:`unbind`, kept in a
``contextvars.ContextVar``, so each thread and each asyncio task sees its own binding and a
binding made in a request handler applies to every tagged log record and instrumented call made
while it runs::

    with mp_logbridge.bound(distinct_id=user.id, plan=user.plan):
        log.info("exported report", extra=tag.track("Report Exported"))

Also here: reading the OpenTelemetry baggage entry ``enduser.id`` and the current trace and span
ids. Context variables do not cross threads, so the caller's thread takes snapshots (the bound
context, the OpenTelemetry context — both immutable) when the log record or call happens, and
the sender thread reads ids and baggage from those snapshots.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

from opentelemetry import baggage as _baggage
from opentelemetry import trace as _trace
from opentelemetry.context import get_current as _otel_get_current

from ._messages import check_distinct_id
from ._values import snapshot_mapping

__all__ = [
    "BoundContext",
    "baggage_distinct_id",
    "bind",
    "bound",
    "current_context",
    "otel_context",
    "resolve_distinct_id",
    "span_ids",
    "unbind",
]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


class BoundContext:
    """An immutable snapshot of what is bound: ``distinct_id`` and super-``properties``."""

    __slots__ = ("distinct_id", "properties")

    def __init__(
        self, distinct_id: str | int | None = None, properties: Mapping[str, Any] = _EMPTY
    ) -> None:
        self.distinct_id = distinct_id
        self.properties = properties

    def __repr__(self) -> str:
        return (
            f"BoundContext(distinct_id={self.distinct_id!r}, properties={dict(self.properties)!r})"
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, BoundContext)
            and self.distinct_id == other.distinct_id
            and dict(self.properties) == dict(other.properties)
        )

    __hash__ = None  # type: ignore[assignment]


_NOTHING = BoundContext()
_bound: contextvars.ContextVar[BoundContext] = contextvars.ContextVar(
    "mp_logbridge_bound", default=_NOTHING
)


def current_context() -> BoundContext:
    """What is bound in the current context (an empty :class:`BoundContext` when nothing is)."""
    return _bound.get()


def bound_context_getter() -> Callable[[], BoundContext]:
    """:func:`current_context` without the function call (for hot paths)."""
    return _bound.get


def bind(
    distinct_id: str | int | None = None, **properties: Any
) -> contextvars.Token[BoundContext]:
    """Bind a user and/or super-properties on top of what is already bound.

    ``distinct_id=None`` keeps the outer binding's user; properties are merged over the outer
    ones (copied now: changing them later changes nothing). Returns a token for :func:`unbind`.

    Raises:
        InvalidMessageError: for a ``distinct_id`` that is not a string or an integer, or a
            property that cannot be sent.
    """
    outer = _bound.get()
    if distinct_id is not None:
        check_distinct_id(distinct_id, "distinct_id")
    merged: Mapping[str, Any]
    if properties:
        copied = snapshot_mapping(properties, "properties")[0]  # as they are now, checked
        merged = MappingProxyType({**outer.properties, **copied})
    else:
        merged = outer.properties
    user = outer.distinct_id if distinct_id is None else distinct_id
    return _bound.set(BoundContext(user, merged))


def unbind(token: contextvars.Token[BoundContext]) -> None:
    """Restore what was bound before the :func:`bind` call that returned ``token``."""
    _bound.reset(token)


@contextmanager
def bound(distinct_id: str | int | None = None, **properties: Any) -> Iterator[BoundContext]:
    """Bind a user and/or super-properties for the duration of a ``with`` block."""
    token = bind(distinct_id, **properties)
    try:
        yield _bound.get()
    finally:
        _bound.reset(token)


def _fastest_otel_getter() -> Any:
    """``opentelemetry.context.get_current``, or the context variable's own ``get`` when the
    default runtime context is in use (the same value, without two Python calls)."""
    try:
        from opentelemetry import context as _otel

        runtime = _otel._RUNTIME_CONTEXT
        variable = getattr(runtime, "_current_context", None)
        getter = getattr(variable, "get", None)
        if type(runtime).__name__ == "ContextVarsRuntimeContext" and getter is not None:
            return getter
    except Exception:  # pragma: no cover - another runtime context or a changed private API
        pass
    return _otel_get_current


#: The current OpenTelemetry context: an immutable snapshot, safe to read on another thread.
otel_context = _fastest_otel_getter()


def baggage_distinct_id(otel: Any = None) -> str | None:
    """The OpenTelemetry baggage entry ``enduser.id`` of ``otel`` (default: the current context)."""
    value = _baggage.get_baggage("enduser.id", otel)
    return value if isinstance(value, str) and value else None


def span_ids(otel: Any = None) -> tuple[int, int] | None:
    """The ``(trace_id, span_id)`` of the span active in ``otel`` (default: the current context),
    as integers, when it is valid."""
    context = _trace.get_current_span(otel).get_span_context()
    if context.is_valid:
        return context.trace_id, context.span_id
    return None


def resolve_distinct_id(
    given: Any, context: BoundContext, otel: Any = None, default: Any = None
) -> Any:
    """Who a message is for: ``given`` (the tag or call), the bound user, the OpenTelemetry
    baggage entry ``enduser.id`` of ``otel`` (default: the current context), ``default``;
    ``None`` when none names one. ``0`` is a user; ``None`` and ``""`` are not."""
    for candidate in (given, context.distinct_id):
        if candidate is not None and candidate != "":
            return candidate
    from_baggage = baggage_distinct_id(otel) if otel is None or otel else None
    if from_baggage is not None:
        return from_baggage
    return default if default is not None and default != "" else None


def format_span_ids(ids: tuple[int, int]) -> dict[str, str]:
    """Trace and span ids as Mixpanel properties (32 and 16 lowercase hex digits)."""
    return {"trace_id": format(ids[0], "032x"), "span_id": format(ids[1], "016x")}

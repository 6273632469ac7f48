"""Function calls as Mixpanel events: the ``@instrument`` decorator and dotted-path patching.

Each call of an instrumented function becomes an event with its duration, whether it
succeeded, the exception type and message when it did not (the exception itself propagates
unchanged), chosen arguments by name, optional values computed from the result, the function's
qualified name and the active OpenTelemetry trace and span ids. Optionally the call also gets its
own OpenTelemetry span, so one decorator yields a trace span and an event with the same ids.

By default the event travels as a tagged log record on the logger named after the function's
module, so logging configuration (levels, ``dictConfig``, a :class:`MixpanelHandler`) decides
whether and where it goes; when that logger is not enabled for the level the wrapper only checks
that and calls the function. Alternatively ``tracker=`` sends straight through a Tracker.

Built on ``wrapt``: names, docstrings, ``inspect.signature`` and ``iscoroutinefunction`` are
preserved, and it works on functions, methods, classmethods, staticmethods, async functions,
generators and async generators, stacked with other decorators.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import functools
import importlib
import inspect
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, overload

import wrapt
from opentelemetry import trace as _trace

from ._context import baggage_distinct_id, current_context, format_span_ids, span_ids
from ._diagnostics import DeliveryStats
from ._errors import ConfigurationError
from ._tags import DEFAULT_TAG, exception_properties

__all__ = [
    "instrument",
    "instrument_function",
    "instrument_functions",
    "instrumentation_stats",
    "uninstrument_function",
]

F = TypeVar("F", bound=Callable[..., Any])

_PLAIN = (str, int, float, bool, type(None), _dt.date, decimal.Decimal, uuid.UUID, enum.Enum)
_stats = DeliveryStats()
_tracer = _trace.get_tracer("mp_logbridge")


def instrumentation_stats() -> dict[str, Any]:
    """Counters of instrumentation failures (events that could not be produced), by reason."""
    return _stats.snapshot()


def _qualified_name(func: Any) -> str:
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', getattr(func, '__name__', '?'))}"


def _plain(value: Any) -> Any:
    """A captured argument or result as a property value: plain values as they are, else repr."""
    if isinstance(value, _PLAIN):
        return value
    if (
        isinstance(value, (list, tuple, set, frozenset))
        and len(value) <= 255
        and all(isinstance(v, _PLAIN) for v in value)
    ):
        return list(value)
    if (
        isinstance(value, Mapping)
        and len(value) <= 255
        and all(isinstance(k, str) and isinstance(v, _PLAIN) for k, v in value.items())
    ):
        return dict(value)
    text = repr(value)
    return text if len(text) <= 255 else text[:252] + "..."


class _Plan:
    """Everything decided at decoration time, so a call only executes the plan."""

    __slots__ = (
        "capture",
        "capture_result",
        "code",
        "distinct_id",
        "event",
        "function_name",
        "level",
        "logger",
        "needs_binding",
        "properties",
        "signature",
        "span",
        "tag",
        "tracker",
    )

    def __init__(
        self,
        func: Any,
        event: str | None,
        *,
        distinct_id: str | Callable[[Mapping[str, Any]], Any] | None,
        properties: Mapping[str, Any] | Callable[[Mapping[str, Any]], Mapping[str, Any]] | None,
        capture_args: Sequence[str] | Mapping[str, str],
        capture_result: str | Callable[[Any], Mapping[str, Any]] | None,
        logger: str | logging.Logger | None,
        level: int | str,
        tracker: Any,
        span: bool,
        tag: str,
    ) -> None:
        raw = getattr(func, "__func__", func)  # classmethod/staticmethod objects
        self.function_name = _qualified_name(raw)
        self.event = event or getattr(raw, "__qualname__", None) or self.function_name
        try:
            self.signature: inspect.Signature | None = inspect.signature(raw)
        except (TypeError, ValueError):
            self.signature = None
        names = set(self.signature.parameters) if self.signature is not None else set()
        if isinstance(capture_args, str):
            raise ConfigurationError(
                "capture_args must be a list of parameter names (or a mapping to property names)"
            )
        pairs = (
            list(capture_args.items())
            if isinstance(capture_args, Mapping)
            else [(n, n) for n in capture_args]
        )
        for name, _prop in pairs:
            if name not in names:
                raise ConfigurationError(
                    f"capture_args: {self.function_name} has no parameter {name!r}"
                )
        if isinstance(distinct_id, str) and distinct_id not in names:
            raise ConfigurationError(
                f"distinct_id: {self.function_name} has no parameter {distinct_id!r}"
            )
        if (
            distinct_id is not None
            and not isinstance(distinct_id, str)
            and not callable(distinct_id)
        ):
            raise ConfigurationError("distinct_id must be a parameter name or a callable")
        if (
            properties is not None
            and not isinstance(properties, Mapping)
            and not callable(properties)
        ):
            raise ConfigurationError("properties must be a mapping or a callable")
        if (
            capture_result is not None
            and not isinstance(capture_result, str)
            and not callable(capture_result)
        ):
            raise ConfigurationError("capture_result must be a property name or a callable")
        self.capture = tuple(pairs)
        self.distinct_id = distinct_id
        self.properties = properties
        self.capture_result = capture_result
        self.needs_binding = (
            bool(pairs)
            or callable(distinct_id)
            or isinstance(distinct_id, str)
            or callable(properties)
        )
        if self.needs_binding and self.signature is None:
            raise ConfigurationError(
                f"cannot read the signature of {self.function_name} to bind arguments"
            )
        self.level = _level(level)
        if isinstance(logger, logging.Logger):
            self.logger = logger
        else:
            self.logger = logging.getLogger(logger or getattr(raw, "__module__", None) or __name__)
        self.tracker = tracker
        self.span = bool(span)
        self.tag = tag
        code = getattr(raw, "__code__", None)
        self.code = (
            (code.co_filename, code.co_firstlineno, raw.__name__)
            if code is not None
            else ("?", 0, "?")
        )

    def enabled(self) -> bool:
        return self.tracker is not None or self.logger.isEnabledFor(self.level)

    def arguments(
        self, wrapped: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Mapping[str, Any]:
        assert self.signature is not None
        owner = getattr(wrapped, "__self__", None)
        if owner is not None and inspect.ismethod(wrapped):
            args = (owner, *args)
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.arguments

    def start(
        self, wrapped: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[dict[str, Any], Any]:
        """Properties known before the call, and the user (``None``: resolve from context)."""
        props: dict[str, Any] = {}
        user = None
        if self.needs_binding:
            arguments = self.arguments(wrapped, args, kwargs)
            for name, prop in self.capture:
                props[prop] = _plain(arguments.get(name))
            if isinstance(self.distinct_id, str):
                user = arguments.get(self.distinct_id)
            elif self.distinct_id is not None:
                user = self.distinct_id(arguments)
            if callable(self.properties):
                props.update(self.properties(arguments))
        if isinstance(self.properties, Mapping):
            props = {**self.properties, **props}
        return props, user

    def finish(
        self,
        props: dict[str, Any],
        user: Any,
        started: float,
        elapsed: float,
        result: Any,
        error: BaseException | None,
    ) -> None:
        props["duration_ms"] = round(elapsed * 1000, 3)
        props["success"] = error is None
        props["function"] = self.function_name
        props["time"] = int(started * 1000)
        if error is not None:
            props.update(exception_properties(error))
        elif self.capture_result is not None:
            if isinstance(self.capture_result, str):
                props[self.capture_result] = _plain(result)
            else:
                props.update(self.capture_result(result))
        if self.tracker is not None:
            self._send_to_tracker(props, user)
        else:
            self._log(props, user, elapsed, error)

    def _log(
        self, props: dict[str, Any], user: Any, elapsed: float, error: BaseException | None
    ) -> None:
        if user is not None:
            props["distinct_id"] = user
        item = {"event": self.event, "properties": props}
        filename, lineno, name = self.code
        args: tuple[Any, ...]
        if error is None:
            text, args = "%s (%.1f ms)", (self.event, elapsed * 1000)
        else:
            text, args = (
                "%s failed with %s (%.1f ms)",
                (self.event, type(error).__name__, elapsed * 1000),
            )
        record = self.logger.makeRecord(
            self.logger.name, self.level, filename, lineno, text, args, None, name, {self.tag: item}
        )
        self.logger.handle(record)

    def _send_to_tracker(self, props: dict[str, Any], user: Any) -> None:
        context = current_context()
        if user is None:
            user = context.distinct_id or baggage_distinct_id()
        if user is None:
            _stats.add_dropped(
                "invalid", 1, f"{self.event}: no distinct_id (not given, none bound, no baggage)"
            )
            _stats.report()
            return
        ids = span_ids()
        merged = {**context.properties, **(format_span_ids(ids) if ids else {}), **props}
        self.tracker.track(user, self.event, merged)


def _level(level: int | str) -> int:
    if isinstance(level, str):
        number = logging.getLevelName(level.upper())
        if not isinstance(number, int):
            raise ConfigurationError(f"unknown logging level {level!r}")
        return number
    return int(level)


def _report_failure(plan: _Plan, exc: BaseException) -> None:
    _stats.add_dropped(
        "invalid", 1, f"{plan.event}: instrumentation failed: {type(exc).__name__}: {exc}"
    )
    _stats.report()


class _Call:
    """One instrumented call in progress (shared by the sync, async and generator paths).

    With ``span=True`` the call gets its own OpenTelemetry span; for functions and coroutines it
    is the current span while the call runs (generators are suspended between items, so their
    span is never made current). The event carries the span's ids either way.
    """

    __slots__ = ("plan", "props", "scope", "span", "started", "t0", "user")

    def __init__(
        self,
        plan: _Plan,
        wrapped: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        current: bool = True,
    ) -> None:
        self.plan = plan
        self.props: dict[str, Any] | None = None
        self.user = None
        self.span: Any = None
        self.scope: Any = None
        try:
            if plan.span:
                self.span = _tracer.start_span(plan.event)
                if current:
                    self.scope = _trace.use_span(self.span, end_on_exit=False)
                    self.scope.__enter__()
            self.props, self.user = plan.start(wrapped, args, kwargs)
        except Exception as exc:
            _report_failure(plan, exc)
        self.started = time.time()
        self.t0 = time.perf_counter()

    def end(self, result: Any = None, error: BaseException | None = None) -> None:
        elapsed = time.perf_counter() - self.t0
        plan, props = self.plan, self.props
        try:
            if self.span is not None:
                self._end_span(error)
            if props is not None:
                plan.finish(props, self.user, self.started, elapsed, result, error)
        except Exception as exc:
            _report_failure(plan, exc)

    def _end_span(self, error: BaseException | None) -> None:
        span, scope = self.span, self.scope
        self.span = self.scope = None
        if scope is not None:
            scope.__exit__(None, None, None)
        if error is not None:
            span.record_exception(error)
            span.set_status(
                _trace.Status(_trace.StatusCode.ERROR, f"{type(error).__name__}: {error}")
            )
        context = span.get_span_context()
        if context.is_valid and self.props is not None:
            self.props.update(format_span_ids((context.trace_id, context.span_id)))
        span.end()


def _make_wrapper(plan: _Plan, func: Any) -> Any:
    raw = getattr(func, "__func__", func)
    if inspect.isasyncgenfunction(raw):

        def wrapper(
            wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> Any:
            if not plan.enabled():
                return wrapped(*args, **kwargs)
            return _async_generator(plan, wrapped, args, kwargs)

    elif inspect.iscoroutinefunction(raw):

        def wrapper(
            wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> Any:
            if not plan.enabled():
                return wrapped(*args, **kwargs)
            return _coroutine(plan, wrapped, args, kwargs)

    elif inspect.isgeneratorfunction(raw):

        def wrapper(
            wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> Any:
            if not plan.enabled():
                return wrapped(*args, **kwargs)
            return _generator(plan, wrapped, args, kwargs)

    else:

        def wrapper(
            wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> Any:
            if not plan.enabled():
                return wrapped(*args, **kwargs)
            call = _Call(plan, wrapped, args, kwargs)
            try:
                result = wrapped(*args, **kwargs)
            except BaseException as error:
                call.end(error=error)
                raise
            call.end(result)
            return result

    return wrapper


async def _coroutine(
    plan: _Plan, wrapped: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    call = _Call(plan, wrapped, args, kwargs)
    try:
        result = await wrapped(*args, **kwargs)
    except BaseException as error:
        call.end(error=error)
        raise
    call.end(result)
    return result


def _generator(plan: _Plan, wrapped: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    call = _Call(plan, wrapped, args, kwargs, current=False)
    try:
        result = yield from wrapped(*args, **kwargs)
    except GeneratorExit:
        call.end()  # closed early by its consumer: not a failure
        raise
    except BaseException as error:
        call.end(error=error)
        raise
    call.end(result)
    return result


async def _async_generator(
    plan: _Plan, wrapped: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    call = _Call(plan, wrapped, args, kwargs, current=False)
    agen = wrapped(*args, **kwargs)
    try:
        to_send: Any = None
        while True:
            try:
                item = await agen.asend(to_send)
            except StopAsyncIteration:
                break
            try:
                to_send = yield item
            except GeneratorExit:
                await agen.aclose()
                raise
            except BaseException as thrown:
                # Pass a thrown exception into the wrapped generator, as ``yield from`` would.
                try:
                    item = await agen.athrow(thrown)
                except StopAsyncIteration:
                    break
                to_send = yield item
    except GeneratorExit:
        call.end()
        raise
    except BaseException as error:
        call.end(error=error)
        raise
    call.end()


@overload
def instrument(func: F, /) -> F: ...


@overload
def instrument(
    event: str | None = None,
    /,
    *,
    distinct_id: str | Callable[[Mapping[str, Any]], Any] | None = None,
    properties: Mapping[str, Any] | Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    capture_args: Sequence[str] | Mapping[str, str] = (),
    capture_result: str | Callable[[Any], Mapping[str, Any]] | None = None,
    logger: str | logging.Logger | None = None,
    level: int | str = logging.INFO,
    tracker: Any = None,
    span: bool = False,
    tag: str = DEFAULT_TAG,
) -> Callable[[F], F]: ...


def instrument(
    event: Any = None,
    /,
    *,
    distinct_id: str | Callable[[Mapping[str, Any]], Any] | None = None,
    properties: Mapping[str, Any] | Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    capture_args: Sequence[str] | Mapping[str, str] = (),
    capture_result: str | Callable[[Any], Mapping[str, Any]] | None = None,
    logger: str | logging.Logger | None = None,
    level: int | str = logging.INFO,
    tracker: Any = None,
    span: bool = False,
    tag: str = DEFAULT_TAG,
) -> Any:
    """Turn each call of the decorated function into a Mixpanel event.

    Args:
        event: the event name (default: the function's qualified name). ``@instrument`` works
            without parentheses too.
        distinct_id: the name of a parameter holding the user id, or a callable receiving the
            bound arguments (a mapping, defaults applied) and returning it; when absent the bound
            context / baggage rules apply. An unknown parameter name is an error here.
        properties: extra event properties — a mapping, or a callable of the bound arguments.
        capture_args: parameter names whose values become properties (a mapping renames them);
            positional and keyword calls give the same properties. Values other than plain
            JSON-like ones are recorded as their ``repr``.
        capture_result: a property name for the return value, or a callable of the return value
            returning properties.
        logger, level: where the event travels as a tagged log record (default: the logger of
            the function's module, at INFO). The :class:`MixpanelHandler` sends it.
        tracker: send through this :class:`Tracker` instead of logging.
        span: also open an OpenTelemetry span around the call (a no-op unless an SDK is
            installed); the event then carries that span's ids.
        tag: the tag attribute name the handler is configured with.

    The event's properties: ``duration_ms``, ``success``, ``function``, ``exception_type`` and
    ``exception_message`` on failure, captured arguments and results, and ``trace_id``/``span_id``
    when a span is active. The function's behaviour never changes: a failure of the
    instrumentation is counted (:func:`instrumentation_stats`) and reported, the call's result or
    exception is untouched.
    """
    options = {
        "distinct_id": distinct_id,
        "properties": properties,
        "capture_args": capture_args,
        "capture_result": capture_result,
        "logger": logger,
        "level": level,
        "tracker": tracker,
        "span": span,
        "tag": tag,
    }
    if callable(event) and not isinstance(event, str):
        return _decorate(event, None, options)
    if event is not None and not isinstance(event, str):
        raise ConfigurationError(f"the event name must be a string, got {event!r}")
    return functools.partial(_decorate, event=event, options=options)


def _decorate(func: Any, event: str | None, options: Mapping[str, Any]) -> Any:
    plan = _Plan(func, event, **options)
    return wrapt.decorator(_make_wrapper(plan, func))(func)


# --------------------------------------------------------------------------- patching by path

_patched: dict[str, tuple[Any, str, Any]] = {}
_patch_lock = threading.Lock()


def _resolve(target: str) -> tuple[Any, str, Any]:
    """``"pkg.mod:Class.method"`` → ``(owner, attribute name, current attribute value)``."""
    module_name, sep, path = target.partition(":")
    if not sep or not module_name or not path:
        raise ConfigurationError(
            f"target must look like 'package.module:function' or 'package.module:Class.method', got {target!r}"
        )
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r} for {target!r}: {exc}") from None
    *parents, attribute = path.split(".")
    for name in parents:
        try:
            owner = getattr(owner, name)
        except AttributeError:
            raise ConfigurationError(f"{target!r}: {name!r} not found") from None
    if isinstance(owner, type):
        for klass in owner.__mro__:
            if attribute in vars(klass):
                return owner, attribute, vars(klass)[attribute]
        raise ConfigurationError(f"{target!r}: {attribute!r} not found")
    if not hasattr(owner, attribute):
        raise ConfigurationError(f"{target!r}: {attribute!r} not found")
    return owner, attribute, getattr(owner, attribute)


def instrument_function(target: str, event: str | None = None, **options: Any) -> None:
    """Instrument a function or method you do not own, in place, by dotted path.

    ``target`` is ``"package.module:function"`` or ``"package.module:Class.method"`` (methods,
    classmethods and staticmethods alike); ``event`` and ``options`` are :func:`instrument`'s.
    Idempotent: instrumenting a target again does nothing. Undo with
    :func:`uninstrument_function`.
    """
    with _patch_lock:
        if target in _patched:
            return
        owner, attribute, original = _resolve(target)
        if isinstance(original, (classmethod, staticmethod)):
            decorated: Any = type(original)(instrument(event, **options)(original.__func__))
        else:
            decorated = instrument(event, **options)(original)
        setattr(owner, attribute, decorated)
        _patched[target] = (owner, attribute, original)


def uninstrument_function(target: str) -> bool:
    """Undo :func:`instrument_function`; returns whether the target was instrumented."""
    with _patch_lock:
        entry = _patched.pop(target, None)
        if entry is None:
            return False
        owner, attribute, original = entry
        setattr(owner, attribute, original)
        return True


def instrument_functions(
    entries: Iterable[Mapping[str, Any]] | str | os.PathLike[str],
) -> list[str]:
    """Instrument several targets declared as data, e.g. next to the logging configuration.

    ``entries`` is a list of mappings ``{"target": "pkg.mod:Class.method", "event": "...",
    ...options}`` or the path of a JSON (``.json``) or YAML (``.yaml``/``.yml``, needs PyYAML)
    file holding such a list (or a mapping with an ``"instrument"`` key holding it). Returns the
    targets instrumented.
    """
    if isinstance(entries, (str, os.PathLike)):
        path = Path(entries)
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            loaded: Any = yaml.safe_load(text)
        else:
            loaded = json.loads(text)
        if isinstance(loaded, Mapping):
            loaded = loaded.get("instrument", [])
        entries = loaded
    targets = []
    for entry in entries:  # type: ignore[union-attr]
        if not isinstance(entry, Mapping) or "target" not in entry:
            raise ConfigurationError(f"each instrumentation entry needs a 'target', got {entry!r}")
        options = {key: entry[key] for key in entry if key not in ("target", "event")}
        instrument_function(str(entry["target"]), entry.get("event"), **options)
        targets.append(str(entry["target"]))
    return targets

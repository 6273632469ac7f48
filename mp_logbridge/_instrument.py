"""Function calls as Mixpanel events: the ``@instrument`` decorator.

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
generators and async generators, stacked with other decorators. Code you do not own is
instrumented by dotted path with :mod:`mp_logbridge._patching`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, overload

import wrapt
from opentelemetry import trace as _trace

from ._context import current_context, format_span_ids, resolve_distinct_id, span_ids
from ._diagnostics import DeliveryStats
from ._errors import ConfigurationError, InvalidMessageError
from ._tags import DEFAULT_TAG, TagBuilder, exception_properties
from ._values import describe, snapshot
from ._version import __version__

__all__ = ["instrument", "instrumentation_stats", "is_instrumented"]

F = TypeVar("F", bound=Callable[..., Any])

_SCALARS = frozenset({str, int, bool, type(None)})
_stats = DeliveryStats()
_tracer = _trace.get_tracer("mp_logbridge", __version__)


def instrumentation_stats() -> dict[str, Any]:
    """Counters of instrumentation failures (events that could not be produced), by reason."""
    return _stats.snapshot()


def _qualified_name(func: Any) -> str:
    name = getattr(func, "__qualname__", getattr(func, "__name__", "?"))
    return f"{getattr(func, '__module__', '?')}.{name}"


def _plain(value: Any) -> Any:
    """A captured argument or result as a property value: what the library can send, copied as
    it is now (the same rules as every property value); anything else as its ``repr``, cut at 255
    characters, so one odd argument does not make the whole event unsendable."""
    if type(value) in _SCALARS:
        return value
    try:
        copied, size = snapshot(value, "argument")
    except (InvalidMessageError, RecursionError):
        copied = None
    else:
        if size <= 4096:  # a huge argument is summarised, not sent whole
            return copied
    text = describe(value, 255)
    return text


def _code_location(raw: Any) -> tuple[str, int, str]:
    """File, first line and name of the function's own code (under any ``functools.wraps``),
    used as the log record's ``pathname``/``lineno``/``funcName``."""
    try:
        inner = inspect.unwrap(raw)
    except ValueError:  # a __wrapped__ cycle
        inner = raw
    code = getattr(inner, "__code__", None)
    if code is None:
        return ("?", 0, getattr(raw, "__name__", "?"))
    return (code.co_filename, code.co_firstlineno, getattr(raw, "__name__", code.co_name))


class _Binder:
    """A call's arguments by parameter name, defaults applied (``Signature.bind`` semantics).

    Signatures whose parameters are all "positional or keyword" or keyword-only are matched by
    zipping names with values, several times faster than ``Signature.bind``; other signatures,
    and calls that do not fit (so their errors read as Python's own), use ``Signature.bind``.
    """

    __slots__ = ("count", "defaults", "names", "positional", "signature", "simple")

    def __init__(self, signature: inspect.Signature) -> None:
        parameters = list(signature.parameters.values())
        self.signature = signature
        self.simple = all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in parameters)
        self.positional = tuple(p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD)
        self.names = frozenset(p.name for p in parameters)
        self.count = len(parameters)
        self.defaults = tuple((p.name, p.default) for p in parameters if p.default is not p.empty)

    def __call__(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        if self.simple and len(args) <= len(self.positional):
            arguments = dict(zip(self.positional, args, strict=False))
            names = self.names
            for name, value in kwargs.items():
                if name in arguments or name not in names:
                    break
                arguments[name] = value
            else:
                if len(arguments) < self.count:
                    for name, default in self.defaults:
                        if name not in arguments:
                            arguments[name] = default
                if len(arguments) == self.count:
                    return arguments
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)


class _Plan:
    """Everything decided at decoration time, so a call only executes the plan."""

    __slots__ = (
        "bind",
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
        "raw",
        "signature",
        "span",
        "tag",
        "tags",
        "tracer",
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
        tracer_provider: Any,
        tag: str,
    ) -> None:
        # The function the signature describes: a classmethod's or staticmethod's own function.
        raw = func.__func__ if isinstance(func, (classmethod, staticmethod)) else func
        if not callable(raw):
            raise ConfigurationError(f"cannot instrument {raw!r}: it is not callable")
        self.raw = raw
        self.function_name = _qualified_name(raw)
        self.event = event or getattr(raw, "__qualname__", None) or self.function_name
        try:
            self.signature: inspect.Signature | None = inspect.signature(raw)
        except (TypeError, ValueError):
            self.signature = None
        names = set(self.signature.parameters) if self.signature is not None else set()
        if isinstance(capture_args, (str, bytes)) or not isinstance(capture_args, Iterable):
            raise ConfigurationError(
                "capture_args must be a list of parameter names (or a mapping to property names)"
            )
        pairs = (
            [(str(n), str(p)) for n, p in capture_args.items()]
            if isinstance(capture_args, Mapping)
            else [(str(n), str(n)) for n in capture_args]
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
        self.bind = _Binder(self.signature) if self.signature is not None else None
        self.level = _level(level)
        if isinstance(logger, logging.Logger):
            self.logger = logger
        else:
            self.logger = logging.getLogger(logger or getattr(raw, "__module__", None) or __name__)
        self.tracker = tracker
        if tracker is not None and not callable(getattr(tracker, "track", None)):
            raise ConfigurationError(f"tracker must have a track() method, got {tracker!r}")
        self.span = bool(span)
        if tracer_provider is None:
            self.tracer: Any = _tracer
        elif callable(getattr(tracer_provider, "get_tracer", None)):
            self.tracer = tracer_provider.get_tracer("mp_logbridge", __version__)
        else:
            raise ConfigurationError(
                f"tracer_provider must be an OpenTelemetry TracerProvider, got {tracer_provider!r}"
            )
        self.tag = tag
        self.tags = TagBuilder(tag)
        self.code = _code_location(raw)

    def arguments(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Mapping[str, Any]:
        """The call's arguments by parameter name, defaults applied.

        wrapt hands a method its ``self``/``cls`` apart from ``args``: inside a bound method
        (``obj.method(...)``, a classmethod), or as ``instance`` beside a partial when a method is
        called through its class (``Class.method(obj, ...)``). Functions, staticmethods and
        functions called with ``cls`` already in ``args`` (a wrapper inside ``@classmethod`` on
        Python 3.13) get ``wrapped`` itself.
        """
        assert self.bind is not None
        if inspect.ismethod(wrapped):
            args = (wrapped.__self__, *args)
        elif instance is not None and wrapped is not self.raw:
            args = (instance, *args)
        return self.bind(args, kwargs)

    def start(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[dict[str, Any], Any]:
        """Properties known before the call, and the user (``None``: resolve from context)."""
        props: dict[str, Any] = {}
        user = None
        if self.needs_binding:
            arguments = self.arguments(wrapped, instance, args, kwargs)
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
        # Built as a tag at a log call is: values checked and copied now, so the handler takes
        # the event as it is (its single-message path) and an invalid value is reported here.
        extra = self.tags.track(self.event, props, distinct_id=user)
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
            self.logger.name, self.level, filename, lineno, text, args, None, name, extra
        )
        self.logger.handle(record)

    def _send_to_tracker(self, props: dict[str, Any], user: Any) -> None:
        context = current_context()
        user = resolve_distinct_id(user, context)
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
    if isinstance(level, bool) or not isinstance(level, int):
        raise ConfigurationError(f"level must be a logging level name or number, got {level!r}")
    return level


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
        instance: Any,
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
                self.span = plan.tracer.start_span(
                    plan.event, attributes={"code.function.name": plan.function_name}
                )
                if current:
                    self.scope = _trace.use_span(self.span, end_on_exit=False)
                    self.scope.__enter__()
            self.props, self.user = plan.start(wrapped, instance, args, kwargs)
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


class _InstrumentedFunction(wrapt.FunctionWrapper):  # type: ignore[type-arg]
    """The wrapt proxy ``@instrument`` returns; its type marks a function as instrumented."""


def _always(level: int) -> bool:
    return True


def _make_wrapper(plan: _Plan) -> Callable[..., Any]:
    """The wrapt wrapper for the plan's kind of function.

    Generators, coroutines and async generators are created by calling the function at once, as
    an undecorated call would (so a wrong argument raises at the call), and the call is then
    measured while they run: the event is sent when they finish.
    """
    raw = plan.raw
    if inspect.isasyncgenfunction(raw):
        wrap_result: Callable[..., Any] | None = _async_generator
    elif inspect.iscoroutinefunction(raw):
        wrap_result = _coroutine
    elif inspect.isgeneratorfunction(raw):
        wrap_result = _generator
    else:
        wrap_result = None

    # The disabled path is a single call: the logger's own (cached) level check.
    is_enabled: Callable[[int], bool] = (
        plan.logger.isEnabledFor if plan.tracker is None else _always
    )
    level = plan.level

    if wrap_result is not None:
        wrap = wrap_result

        def deferred(
            wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> Any:
            if not is_enabled(level):
                return wrapped(*args, **kwargs)
            inner = wrapped(*args, **kwargs)
            outer = wrap(plan, inner, wrapped, instance, args, kwargs)
            # Task reprs and "never awaited" warnings name the function, not this module.
            try:
                outer.__name__, outer.__qualname__ = inner.__name__, inner.__qualname__
            except (AttributeError, TypeError):  # an awaitable that is not a coroutine
                pass
            return outer

        return deferred

    def immediate(
        wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if not is_enabled(level):
            return wrapped(*args, **kwargs)
        call = _Call(plan, wrapped, instance, args, kwargs)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as error:
            call.end(error=error)
            raise
        call.end(result)
        return result

    return immediate


async def _coroutine(
    plan: _Plan,
    coroutine: Any,
    wrapped: Any,
    instance: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    call = _Call(plan, wrapped, instance, args, kwargs)
    try:
        result = await coroutine
    except BaseException as error:  # asyncio.CancelledError included: a cancelled call failed
        call.end(error=error)
        raise
    call.end(result)
    return result


def _generator(
    plan: _Plan,
    generator: Any,
    wrapped: Any,
    instance: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    call = _Call(plan, wrapped, instance, args, kwargs, current=False)
    try:
        result = yield from generator
    except GeneratorExit:
        call.end()  # closed early by its consumer: not a failure
        raise
    except BaseException as error:
        call.end(error=error)
        raise
    call.end(result)
    return result


async def _async_generator(
    plan: _Plan,
    agen: Any,
    wrapped: Any,
    instance: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``yield from`` for an async generator: items, ``asend``, ``athrow`` and ``aclose`` are
    passed through to the wrapped generator."""
    call = _Call(plan, wrapped, instance, args, kwargs, current=False)
    try:
        try:
            item = await agen.__anext__()
            while True:
                try:
                    sent = yield item
                except GeneratorExit:
                    await agen.aclose()
                    raise
                except BaseException as thrown:
                    item = await agen.athrow(thrown)
                else:
                    item = await agen.asend(sent)
        except StopAsyncIteration:
            pass
    except GeneratorExit:
        call.end()  # closed early by its consumer: not a failure
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
    tracer_provider: Any = None,
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
    tracer_provider: Any = None,
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
        logger: the logger (or its name) on which the event travels as a tagged log record
            (default: the logger of the function's module). The
            :class:`~mp_logbridge.MixpanelHandler` sends it, when logging lets the record
            through: the logger must be enabled for ``level``.
        level: the level of that log record.
        tracker: send through this :class:`Tracker` instead of logging.
        span: also open an OpenTelemetry span around the call (a no-op unless an SDK is
            installed); the event then carries that span's ids.
        tracer_provider: the OpenTelemetry ``TracerProvider`` for ``span=True`` (default: the
            global one).
        tag: the tag attribute name the handler is configured with.

    The event's properties: ``duration_ms``, ``success``, ``function``, ``time`` (when the call
    started), ``exception_type`` and ``exception_message`` on failure, captured arguments and
    results, and ``trace_id``/``span_id`` when a span is active. Coroutines, generators and async
    generators send their event when they finish (an early ``close()`` is not a failure; a
    cancelled coroutine is). The function's behaviour never changes: a failure of the
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
        "tracer_provider": tracer_provider,
        "tag": tag,
    }
    if callable(event) and not isinstance(event, str):
        return _decorate(event, None, options)
    if event is not None and not isinstance(event, str):
        raise ConfigurationError(f"the event name must be a string, got {event!r}")
    return functools.partial(_decorate, event=event, options=options)


def _decorate(func: Any, event: str | None, options: Mapping[str, Any]) -> Any:
    plan = _Plan(func, event, **options)
    return _InstrumentedFunction(func, _make_wrapper(plan))


def is_instrumented(value: Any) -> bool:
    """Whether ``value`` (a function, classmethod or staticmethod) is already instrumented."""
    if isinstance(value, (classmethod, staticmethod)):
        value = value.__func__
    return isinstance(value, _InstrumentedFunction)

"""AWS Lambda (and other serverless runtimes): deliver before the handler returns.

A runtime freezes the process between invocations (and may never thaw it), so what the
background consumers hold must be delivered before the handler returns — but never at the
cost of the invocation's own time budget. :func:`flush_before_return` wraps a handler: it binds
the invocation's request id, runs the handler, then flushes every background consumer of the
process, bounded by ``max_flush`` seconds and by the time the invocation has left
(``context.get_remaining_time_in_millis()``) minus ``margin_ms``::

    from mp_logbridge.integrations.aws_lambda import flush_before_return

    @flush_before_return
    def handler(event, context):
        ...

    @flush_before_return(max_flush=1.0, margin_ms=300)
    async def handler(event, context):   # coroutine handlers (Mangum and the like) too
        ...
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, overload

from .._aio import off_loop
from .._context import bind, unbind
from .._lifecycle import flush_all

__all__ = ["flush_before_return", "flush_budget"]

F = TypeVar("F", bound=Callable[..., Any])


def flush_budget(context: Any, max_flush: float, margin_ms: float) -> float:
    """Seconds the flush may take: ``max_flush``, less when the invocation has less time left
    than that plus ``margin_ms`` (never negative). Without a usable ``context``: ``max_flush``."""
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if not callable(remaining):
        return max_flush
    try:
        left = (float(remaining()) - margin_ms) / 1000
    except Exception:
        return max_flush
    return max(0.0, min(max_flush, left))


def _bind_invocation(context: Any) -> Any:
    request_id = getattr(context, "aws_request_id", None)
    function = getattr(context, "function_name", None)
    properties = {}
    if isinstance(request_id, str) and request_id:
        properties["request_id"] = request_id
    if isinstance(function, str) and function:
        properties["function"] = function
    return bind(**properties) if properties else None


@overload
def flush_before_return(handler: F, /) -> F: ...


@overload
def flush_before_return(
    *, max_flush: float = 2.0, margin_ms: float = 500.0
) -> Callable[[F], F]: ...


def flush_before_return(
    handler: Any = None, /, *, max_flush: float = 2.0, margin_ms: float = 500.0
) -> Any:
    """Wrap a handler ``(event, context)`` so that it delivers before returning (see the module).

    Args:
        max_flush: the most seconds a flush may take.
        margin_ms: milliseconds of the invocation's remaining time left untouched (for the
            handler's own return and the runtime).
    """
    if max_flush < 0 or margin_ms < 0:
        raise ValueError("max_flush and margin_ms must not be negative")

    def decorate(func: F) -> F:
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(event: Any, context: Any = None, *args: Any, **kw: Any) -> Any:
                token = _bind_invocation(context)
                try:
                    return await func(event, context, *args, **kw)
                finally:
                    if token is not None:
                        unbind(token)
                    await off_loop(flush_all, flush_budget(context, max_flush, margin_ms))

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(event: Any, context: Any = None, *args: Any, **kw: Any) -> Any:
            token = _bind_invocation(context)
            try:
                return func(event, context, *args, **kw)
            finally:
                if token is not None:
                    unbind(token)
                flush_all(flush_budget(context, max_flush, margin_ms))

        return wrapper  # type: ignore[return-value]

    if handler is not None:
        return decorate(handler)
    return decorate

"""asyncio without blocking the event loop: the library's blocking calls run in a thread.

``flush`` and ``close`` wait for the network (bounded by their timeouts); awaited from a
coroutine, they run in the event loop's default executor, so every other task keeps running
while they wait.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["off_loop"]

_T = TypeVar("_T")


async def off_loop(func: Callable[..., _T], *args: Any) -> _T:
    """``func(*args)`` in a worker thread of the running loop (with the caller's context)."""
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, func, *args)
    return await loop.run_in_executor(None, call)

"""Who the current work is for: a user and super-properties bound per request, task or thread.

``with bound(distinct_id=user.id, plan=user.plan): ...`` (or :func:`bind`/:func:`unbind`) binds
them in a context variable, so each thread and asyncio task sees its own, and every tagged log
record and instrumented call made meanwhile carries them. Values are copied when bound.
"""

from __future__ import annotations

from ._context import BoundContext, bind, bound, current_context, unbind

__all__ = ["BoundContext", "bind", "bound", "current_context", "unbind"]

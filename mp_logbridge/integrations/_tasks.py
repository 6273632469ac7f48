"""What the task-queue integrations (Celery, RQ) share: the outcome of a task as an event.

An outcome event is sent through a :class:`~mp_logbridge.Tracker` when one is given, else
logged with the tag on a logger of the application's (``mixpanel.tasks`` by default: it reaches
whatever :class:`~mp_logbridge.MixpanelHandler` the worker's logging configuration attaches),
so it goes where every other message of the worker goes. Its user is the one the task runs
for (bound from the task's headers or job meta), else ``default_distinct_id``.
"""

from __future__ import annotations

import logging
from typing import Any

from .._context import current_context
from .._diagnostics import warn
from .._tags import tag

__all__ = ["DEFAULT_EVENT", "USER_KEY", "TaskEvents"]

#: The header (Celery) or job meta key (RQ) carrying the user a task runs for.
USER_KEY = "mixpanel_distinct_id"
#: The name of the outcome event, unless another is given.
DEFAULT_EVENT = "Task Finished"


class TaskEvents:
    """Sends one outcome event per task (name, id, duration, success, state, retries, queue)."""

    __slots__ = ("default_distinct_id", "event", "logger", "tracker")

    def __init__(
        self,
        *,
        event: str = DEFAULT_EVENT,
        tracker: Any = None,
        logger: str | logging.Logger = "mixpanel.tasks",
        default_distinct_id: str | int | None = None,
    ) -> None:
        if not isinstance(event, str) or not event.strip():
            raise ValueError("event must be a non-empty event name")
        if tracker is not None and not callable(getattr(tracker, "track", None)):
            raise TypeError(f"tracker must have a track() method, got {tracker!r}")
        self.event = event
        self.tracker = tracker
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.default_distinct_id = default_distinct_id

    def send(self, properties: dict[str, Any], error: BaseException | None = None) -> None:
        """Send the outcome of one task (never raises)."""
        try:
            if error is not None:
                properties["exception_type"] = type(error).__name__
            user = current_context().distinct_id
            if user is None:
                user = self.default_distinct_id
            if self.tracker is not None:
                if user is None:
                    warn(
                        "mp_logbridge: task outcome not tracked: no user (set default_distinct_id)"
                    )
                    return
                self.tracker.track(user, self.event, properties)
                return
            extra = tag.track(self.event, properties, distinct_id=user)
            self.logger.info("%s: %s", self.event, properties.get("task"), extra=extra)
        except Exception as exc:
            warn("mp_logbridge: task outcome not tracked: %s: %s", type(exc).__name__, exc)

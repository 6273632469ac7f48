"""Celery: deliver from prefork children, bind each task's user, optionally track outcomes.

::

    from mp_logbridge.integrations.celery import setup_celery

    app = Celery("proj")
    setup_celery(app, track_tasks=True)

What it connects (Celery signals, once per process):

* ``before_task_publish``: the user bound where a task is sent (a web request) travels with it
  in the ``mixpanel_distinct_id`` header (one given explicitly is kept).
* ``task_prerun``/``task_postrun``: the task runs with that user, ``task`` (its name) and
  ``task_id`` bound; with ``track_tasks=True`` an outcome event (``"Task Finished"``: ``task``,
  ``task_id``, ``duration_ms``, ``success``, ``state``, ``retries``, ``queue``, and
  ``exception_type`` on failure) is sent when it ends; ``flush_after_task=`` flushes after each
  task, bounded.
* ``worker_process_init``: a prefork child makes every consumer copied from the parent start
  afresh (fork hooks do it too; this also covers pools that fork without them).
* ``worker_process_shutdown``: a prefork child delivers what it holds, within the consumers'
  ``exit_timeout``, before billiard ends it with ``os._exit`` — at a warm shutdown, at
  ``max_tasks_per_child`` or ``max_memory_per_child``, and when the pool shrinks.

What is still lost: a child killed by a hard time limit or SIGKILL runs no Python code (use a
``flush_after_task`` or the durable spool where that matters).
"""

from __future__ import annotations

import time
from typing import Any

from celery import signals

from .._context import bind, current_context, unbind
from .._lifecycle import flush_all, reinit_if_forked, shutdown_all
from ._tasks import DEFAULT_EVENT, USER_KEY, TaskEvents
from ._web import as_user

__all__ = ["USER_KEY", "setup_celery"]

_UID = "mp_logbridge.integrations.celery"


class _Running:
    """Per task id: the unbind token and the start time (tasks of the threads, gevent and
    eventlet pools run side by side in one process)."""

    def __init__(self) -> None:
        self.tasks: dict[str, tuple[Any, float]] = {}


class _CelerySetup:
    def __init__(
        self,
        track_tasks: bool,
        events: TaskEvents | None,
        flush_after_task: float | None,
        propagate_user: bool,
    ) -> None:
        self.track_tasks = track_tasks
        self.events = events
        self.flush_after_task = flush_after_task
        self.propagate_user = propagate_user
        self.running = _Running()

    def publish(self, sender: Any = None, headers: Any = None, **_: Any) -> None:
        if not self.propagate_user or not isinstance(headers, dict):
            return
        user = current_context().distinct_id
        if user is not None and headers.get(USER_KEY) is None:
            headers[USER_KEY] = user

    def prerun(self, task_id: Any = None, task: Any = None, **_: Any) -> None:
        request = getattr(task, "request", None)
        user = _header_of(request)
        try:
            token = bind(as_user(user), task=str(getattr(task, "name", "")), task_id=str(task_id))
        except Exception:  # pragma: no cover - a name that cannot be bound
            return
        self.running.tasks[str(task_id)] = (token, time.monotonic())

    def postrun(
        self,
        task_id: Any = None,
        task: Any = None,
        retval: Any = None,
        state: Any = None,
        **_: Any,
    ) -> None:
        entry = self.running.tasks.pop(str(task_id), None)
        try:
            if entry is not None and self.track_tasks and self.events is not None:
                request = getattr(task, "request", None)
                delivery = getattr(request, "delivery_info", None) or {}
                properties = {
                    "task": str(getattr(task, "name", "")),
                    "task_id": str(task_id),
                    "duration_ms": round((time.monotonic() - entry[1]) * 1000, 3),
                    "success": state == "SUCCESS",
                    "state": str(state),
                    "retries": int(getattr(request, "retries", 0) or 0),
                    "queue": str(delivery.get("routing_key") or ""),
                }
                error = retval if isinstance(retval, BaseException) else None
                self.events.send(properties, error)
        finally:
            if entry is not None:
                try:
                    unbind(entry[0])
                except ValueError:  # pragma: no cover - a pool running postrun elsewhere
                    pass
            if self.flush_after_task is not None:
                flush_all(self.flush_after_task)

    def process_init(self, **_: Any) -> None:
        reinit_if_forked()

    def process_shutdown(self, **_: Any) -> None:
        shutdown_all()


def _header_of(request: Any) -> Any:
    if request is None:
        return None
    value = getattr(request, USER_KEY, None)
    if value is None:
        headers = getattr(request, "headers", None)
        if isinstance(headers, dict):
            value = headers.get(USER_KEY)
    return value


_installed: _CelerySetup | None = None


def setup_celery(
    app: Any = None,
    *,
    track_tasks: bool = False,
    event: str = DEFAULT_EVENT,
    tracker: Any = None,
    logger: str = "mixpanel.tasks",
    default_distinct_id: str | int | None = None,
    flush_after_task: float | None = None,
    propagate_user: bool = True,
) -> None:
    """Connect the Celery signals (see the module's documentation). Calling it again replaces
    the previous settings.

    Args:
        app: the Celery app (signals are process-wide; it is accepted for symmetry and future
            per-app settings).
        track_tasks: send an outcome event per task.
        event: the outcome event's name.
        tracker: send outcome events through this :class:`~mp_logbridge.Tracker`; otherwise
            they are logged with the tag on ``logger``.
        default_distinct_id: the user of outcome events of tasks sent without one.
        flush_after_task: flush every background consumer after each task, bounded by this many
            seconds (costs the task that much at most; not needed for delivery at exit).
        propagate_user: put the user bound when a task is sent in its headers.
    """
    global _installed
    events = (
        TaskEvents(
            event=event, tracker=tracker, logger=logger, default_distinct_id=default_distinct_id
        )
        if track_tasks
        else None
    )
    installed = _CelerySetup(track_tasks, events, flush_after_task, propagate_user)
    _installed = installed
    signals.before_task_publish.connect(_publish, weak=False, dispatch_uid=f"{_UID}.publish")
    signals.task_prerun.connect(_prerun, weak=False, dispatch_uid=f"{_UID}.prerun")
    signals.task_postrun.connect(_postrun, weak=False, dispatch_uid=f"{_UID}.postrun")
    signals.worker_process_init.connect(_process_init, weak=False, dispatch_uid=f"{_UID}.init")
    signals.worker_process_shutdown.connect(
        _process_shutdown, weak=False, dispatch_uid=f"{_UID}.shutdown"
    )


def _publish(**kwargs: Any) -> None:
    if _installed is not None:
        _installed.publish(**kwargs)


def _prerun(**kwargs: Any) -> None:
    if _installed is not None:
        _installed.prerun(**kwargs)


def _postrun(**kwargs: Any) -> None:
    if _installed is not None:
        _installed.postrun(**kwargs)


def _process_init(**kwargs: Any) -> None:
    if _installed is not None:
        _installed.process_init(**kwargs)


def _process_shutdown(**kwargs: Any) -> None:
    if _installed is not None:
        _installed.process_shutdown(**kwargs)

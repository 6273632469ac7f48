"""RQ: the work horse delivers before its ``os._exit``; each job runs with its user bound.

RQ forks a work horse per job and ends it with ``os._exit``, which skips every exit hook: what
the horse's consumers hold would be lost. Run the worker class of this module::

    rq worker -w mp_logbridge.integrations.rq.MixpanelWorker

(or mix :class:`MixpanelWorkerMixin` into a worker class of yours). After each job the horse
delivers what it holds (within the consumers' ``exit_timeout``, or ``flush_timeout``) before it
exits; a worker that runs jobs in its own process (``SimpleWorker``) flushes instead. The job
runs with ``job`` (the function's name), ``job_id`` and its user bound; the user travels in the
job's meta, put there by :func:`job_meta` where the job is enqueued::

    queue.enqueue(send_report, report_id, meta=job_meta())

``track_jobs = True`` on the worker class sends an outcome event per job (``"Task Finished"``:
``task``, ``task_id``, ``duration_ms``, ``success``, ``queue``).

What is still lost: a horse killed by the worker (job timeout beyond the death penalty,
``rq`` cold shutdown) or by SIGKILL.
"""

from __future__ import annotations

import time
from typing import Any

from rq import Worker

from .._context import bind, current_context, unbind
from .._lifecycle import flush_all, shutdown_all
from ._tasks import DEFAULT_EVENT, USER_KEY, TaskEvents
from ._web import as_user

__all__ = ["USER_KEY", "MixpanelWorker", "MixpanelWorkerMixin", "job_meta"]


def job_meta(**meta: Any) -> dict[str, Any]:
    """Job meta carrying the user bound now (for ``queue.enqueue(..., meta=job_meta())``)."""
    user = current_context().distinct_id
    if user is not None and meta.get(USER_KEY) is None:
        meta[USER_KEY] = user
    return meta


class MixpanelWorkerMixin:
    """Binds each job's context and delivers before a work horse exits (see the module)."""

    #: Send an outcome event per job.
    track_jobs: bool = False
    #: The outcome event's name.
    job_event: str = DEFAULT_EVENT
    #: Seconds the horse's delivery may take (``None``: the consumers' ``exit_timeout``).
    flush_timeout: float | None = None

    def perform_job(self, job: Any, queue: Any, *args: Any, **kwargs: Any) -> Any:
        meta = getattr(job, "meta", None) or {}
        name = str(getattr(job, "func_name", "") or "")
        token = bind(as_user(meta.get(USER_KEY)), job=name, job_id=str(job.id))
        started = time.monotonic()
        result: Any = False
        try:
            result = super().perform_job(job, queue, *args, **kwargs)  # type: ignore[misc]
            return result
        finally:
            try:
                if self.track_jobs:
                    TaskEvents(event=self.job_event).send(
                        {
                            "task": name,
                            "task_id": str(job.id),
                            "duration_ms": round((time.monotonic() - started) * 1000, 3),
                            "success": bool(result),
                            "queue": str(getattr(queue, "name", "") or ""),
                        }
                    )
            finally:
                unbind(token)
                if getattr(self, "is_horse", False) or getattr(self, "_is_horse", False):
                    shutdown_all(self.flush_timeout)  # os._exit comes next
                else:
                    flush_all(self.flush_timeout)


class MixpanelWorker(MixpanelWorkerMixin, Worker):
    """RQ's forking ``Worker`` with :class:`MixpanelWorkerMixin`."""

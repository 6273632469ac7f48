"""A Celery app for the integration tests, configured from the environment.

``MP_TEST_BROKER`` is the broker (a Redis URL), ``MP_TEST_RECEIVER`` the receiver the worker's
``MixpanelHandler`` posts to; ``MP_TEST_NO_SETUP=1`` leaves ``setup_celery`` out (the control:
what a prefork child loses without it). The handler's flush interval is long on purpose:
whatever arrives was delivered by the integration's hooks, not by the interval.
"""

from __future__ import annotations

import logging
import os

from celery import Celery

from mp_logbridge import MixpanelHandler, tag
from mp_logbridge.integrations.celery import setup_celery

broker = os.environ.get("MP_TEST_BROKER", "memory://")
app = Celery("celeryapp", broker=broker, backend=broker.replace("memory://", "cache+memory://"))
app.conf.update(
    task_acks_late=False, worker_hijack_root_logger=False, broker_connection_retry_on_startup=True
)

log = logging.getLogger("celeryapp.tasks")
log.setLevel(logging.INFO)
log.propagate = False
if os.environ.get("MP_TEST_RECEIVER"):
    handler = MixpanelHandler(
        "celery-test-token", api_host=os.environ["MP_TEST_RECEIVER"], flush_interval=30
    )
    log.addHandler(handler)
    logging.getLogger("mixpanel.tasks").addHandler(handler)
    logging.getLogger("mixpanel.tasks").setLevel(logging.INFO)
    logging.getLogger("mixpanel.tasks").propagate = False

if os.environ.get("MP_TEST_NO_SETUP") != "1":
    setup_celery(app, track_tasks=True, default_distinct_id="celery-system")


@app.task
def add(x: int, y: int) -> int:
    log.info("added", extra=tag.track("Numbers Added", total=x + y, pid=os.getpid()))
    return x + y


@app.task
def fail() -> None:
    log.info("failing", extra=tag.track("Task Failing"))
    raise ValueError("task failed on purpose")


@app.task(bind=True, max_retries=1, default_retry_delay=0)
def flaky(self: object) -> str:
    if self.request.retries == 0:  # type: ignore[attr-defined]
        raise self.retry()  # type: ignore[attr-defined]
    return "ok"

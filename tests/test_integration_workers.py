"""Task workers and green threads, for real: a Celery prefork worker and an RQ worker (each
against a real redis-server on a Unix socket) whose child processes end in ``os._exit``, and
gevent/eventlet monkey-patched interpreters. Every worker runs in child processes with hard
timeouts; the receiver runs here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_support import RedisServer, require_redis
from support import ROOT, child_env

from mp_logbridge import bound
from mp_logbridge.testing import MixpanelServer

pytestmark = pytest.mark.subprocess
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(require_redis()).start()
    try:
        yield server
    finally:
        server.close()


def _env(**extra: str) -> dict[str, str]:
    env = child_env(**extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS)])
    return env


def _stop(process: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 30) -> str:
    """Stop a worker the way a deployment does; fails (after killing it) if it hangs."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as timed_out:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(
            f"the worker did not stop within {timeout} s:\n{output[-3000:]}"
        ) from timed_out
    return output


# --------------------------------------------------------------------------- Celery


def _celery_worker(broker: str, receiver: str, **env: str) -> subprocess.Popen[str]:
    pytest.importorskip("celery")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "celeryapp",
            "worker",
            "--pool=prefork",
            "--concurrency=2",
            "--max-tasks-per-child=1",  # every child ends (os._exit) after one task
            "--without-heartbeat",
            "--without-mingle",
            "--without-gossip",
            "--loglevel=WARNING",
        ],
        cwd=str(TESTS),
        env=_env(MP_TEST_BROKER=broker, MP_TEST_RECEIVER=receiver, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _celery_client(broker: str) -> Any:
    os.environ["MP_TEST_BROKER"] = broker
    sys.path.insert(0, str(TESTS))
    try:
        import importlib

        import celeryapp

        return importlib.reload(celeryapp)  # this test's broker
    finally:
        sys.path.remove(str(TESTS))
        del os.environ["MP_TEST_BROKER"]


def test_celery_prefork_children_deliver_before_os_exit(
    redis_server: RedisServer, mixpanel_server: MixpanelServer
) -> None:
    broker = f"redis+socket://{redis_server.socket}"
    worker = _celery_worker(broker, mixpanel_server.url)
    try:
        tasks = _celery_client(broker)
        with bound(distinct_id="web-user-7"):  # travels in the task headers
            results = [tasks.add.delay(n, n) for n in range(4)]
            failing = tasks.fail.delay()
        flaky = tasks.flaky.delay()  # no user bound: the default one
        assert [r.get(timeout=60) for r in results] == [0, 2, 4, 6]
        with pytest.raises(ValueError):
            failing.get(timeout=60, propagate=True)
        assert flaky.get(timeout=60) == "ok"
        # Each child ran one task and ended with os._exit; its events were delivered by the
        # worker_process_shutdown hook (the handler's flush interval is 30 s).
        mixpanel_server.wait_for(4 + 1 + 7, timeout=60)
    finally:
        output = _stop(worker)
    # the one traceback is Celery's report of the task failing on purpose
    assert output.count("Traceback") == output.count("raised unexpected: ValueError"), output
    added = [e for e in mixpanel_server.events if e["event"] == "Numbers Added"]
    assert sorted(e["properties"]["total"] for e in added) == [0, 2, 4, 6]
    assert len({e["properties"]["pid"] for e in added}) >= 2  # several children, each delivered
    for event in added:
        props = event["properties"]
        assert props["distinct_id"] == "web-user-7"
        assert props["task"] == "celeryapp.add"
        assert len(props["task_id"]) == 36
    outcomes = [e["properties"] for e in mixpanel_server.events if e["event"] == "Task Finished"]
    by_task: dict[str, list[dict[str, Any]]] = {}
    for props in outcomes:
        by_task.setdefault(props["task"], []).append(props)
    assert len(by_task["celeryapp.add"]) == 4
    assert all(p["success"] and p["state"] == "SUCCESS" for p in by_task["celeryapp.add"])
    assert all(p["duration_ms"] >= 0 for p in outcomes)
    [failed] = by_task["celeryapp.fail"]
    assert (failed["success"], failed["state"], failed["exception_type"]) == (
        False,
        "FAILURE",
        "ValueError",
    )
    assert failed["distinct_id"] == "web-user-7"
    flaky_runs = sorted((p["retries"], p["state"]) for p in by_task["celeryapp.flaky"])
    assert flaky_runs == [(0, "RETRY"), (1, "SUCCESS")]
    assert {p["distinct_id"] for p in by_task["celeryapp.flaky"]} == {"celery-system"}


def test_celery_without_the_setup_loses_what_children_hold(
    redis_server: RedisServer, mixpanel_server: MixpanelServer
) -> None:
    """The control: the same worker without ``setup_celery`` — children end in ``os._exit``
    with their events still queued (the flush interval is 30 s)."""
    broker = f"redis+socket://{redis_server.socket}"
    worker = _celery_worker(broker, mixpanel_server.url, MP_TEST_NO_SETUP="1")
    try:
        tasks = _celery_client(broker)
        assert [tasks.add.delay(n, 1).get(timeout=60) for n in range(2)] == [1, 2]
    finally:
        _stop(worker)
    added = [e for e in mixpanel_server.events if e["event"] == "Numbers Added"]
    assert len(added) < 2, added


# --------------------------------------------------------------------------- RQ

_RQ_WORKER = """
import logging, os, sys
from redis import Redis
from rq import Queue, Worker
from mp_logbridge import MixpanelHandler
from mp_logbridge.integrations.rq import MixpanelWorker

handler = MixpanelHandler("rq-test-token", api_host=os.environ["MP_TEST_RECEIVER"], flush_interval=30)
for name in ("rqjobs", "mixpanel.tasks"):
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
redis = Redis(unix_socket_path=os.environ["MP_TEST_REDIS"])
cls = Worker if os.environ.get("MP_TEST_PLAIN") == "1" else MixpanelWorker
cls.track_jobs = True
worker = cls([Queue("default", connection=redis)], connection=redis)
worker.work(burst=True)
print("worker done", flush=True)
"""


def _rq_burst(redis_server: RedisServer, receiver: str, **env: str) -> str:
    pytest.importorskip("rq")
    completed = subprocess.run(
        [sys.executable, "-c", _RQ_WORKER],
        cwd=str(TESTS),
        env=_env(MP_TEST_RECEIVER=receiver, MP_TEST_REDIS=str(redis_server.socket), **env),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert completed.returncode == 0, completed
    assert "worker done" in completed.stdout
    return completed.stdout + completed.stderr


def _enqueue(redis_server: RedisServer) -> None:
    import rqjobs  # noqa: F401  (importable by the horse from the same path)
    from rq import Queue

    from mp_logbridge.integrations.rq import job_meta

    queue = Queue("default", connection=redis_server.client())
    with bound(distinct_id="rq-user"):
        for n in range(3):
            queue.enqueue("rqjobs.record", n, meta=job_meta())
        queue.enqueue("rqjobs.broken", meta=job_meta(other="kept"))


def test_rq_work_horses_deliver_before_os_exit(
    redis_server: RedisServer, mixpanel_server: MixpanelServer
) -> None:
    sys.path.insert(0, str(TESTS))
    try:
        _enqueue(redis_server)
    finally:
        sys.path.remove(str(TESTS))
    _rq_burst(redis_server, mixpanel_server.url)
    ran = [e["properties"] for e in mixpanel_server.events if e["event"] == "Job Ran"]
    assert sorted(p["n"] for p in ran) == [0, 1, 2]
    assert len({p["pid"] for p in ran}) == 3  # one work horse per job, each delivered
    assert all(p["distinct_id"] == "rq-user" and p["job"] == "rqjobs.record" for p in ran)
    outcomes = {
        (e["properties"]["task"], e["properties"]["success"])
        for e in mixpanel_server.events
        if e["event"] == "Task Finished"
    }
    assert outcomes == {("rqjobs.record", True), ("rqjobs.broken", False)}
    assert any(e["event"] == "Job Breaking" for e in mixpanel_server.events)


def test_rq_plain_worker_loses_what_the_horse_holds(
    redis_server: RedisServer, mixpanel_server: MixpanelServer
) -> None:
    """The control: RQ's own Worker — each horse ends in os._exit with its event queued."""
    sys.path.insert(0, str(TESTS))
    try:
        _enqueue(redis_server)
    finally:
        sys.path.remove(str(TESTS))
    _rq_burst(redis_server, mixpanel_server.url, MP_TEST_PLAIN="1")
    assert [e for e in mixpanel_server.events if e["event"] == "Job Ran"] == []


# --------------------------------------------------------------------------- gevent, eventlet

_GREEN = """
import sys, time
{patch}
import logging
from mp_logbridge import tag, MixpanelHandler, Tracker
handler = MixpanelHandler("green-token", api_host=sys.argv[1], flush_interval=0.05)
log = logging.getLogger("green"); log.addHandler(handler); log.setLevel(logging.INFO)
for n in range(20):
    log.info("e", extra=tag.track("Green Event", distinct_id="u", n=n))
print("flushed", handler.flush(10), flush=True)
tracker = Tracker("green-token", api_host=sys.argv[1], flush_interval=60)
for n in range(5):
    tracker.track("u", "Left For Exit", {{"n": n}})
# nothing flushed: the exit hook delivers
"""

GREEN = {
    "gevent": "from gevent import monkey; monkey.patch_all()",
    "eventlet": "import eventlet; eventlet.monkey_patch()",
}


@pytest.mark.parametrize("library", sorted(GREEN))
def test_monkey_patched_interpreters_deliver_flush_and_exit(
    library: str, mixpanel_server: MixpanelServer
) -> None:
    pytest.importorskip(library)
    completed = subprocess.run(
        [sys.executable, "-c", _GREEN.format(patch=GREEN[library]), mixpanel_server.url],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed
    assert "flushed True" in completed.stdout, completed
    names = [e["event"] for e in mixpanel_server.events]
    assert names.count("Green Event") == 20
    assert names.count("Left For Exit") == 5, completed  # delivered at exit, no hang
    assert "Traceback" not in completed.stderr, completed.stderr

"""BackgroundConsumer across process life: exit, fork, logging shutdown/reconfiguration, atexit, threads.

Exit, fork and deadlock behaviour run in child interpreters (``run_python``, hard timeouts);
the Mixpanel server runs in this test process and the child gets its URL in ``SERVER_URL``.
Children print one JSON line of facts on stdout; the assertions are made here.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from support import event_record

from mp_logbridge.consumers import BackgroundConsumer
from mp_logbridge.testing import MixpanelServer

pytestmark = pytest.mark.subprocess

TOKEN = "test-token"

# Shared by the child scripts: an event with a given $insert_id.
EVENT_HELPER = """
import time

def ev(key, **props):
    properties = {"token": "test-token", "distinct_id": "user-1",
                  "time": int(time.time() * 1000), "$insert_id": key}
    properties.update(props)
    return {"event": "Lifecycle Test", "properties": properties}
"""


def facts(stdout: str) -> list[dict[str, Any]]:
    """The JSON lines a child printed."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def insert_ids(server: MixpanelServer) -> Counter[str]:
    return Counter(record["properties"]["$insert_id"] for record in server.events)


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A server that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


# --------------------------------------------------------------------------- exit


def test_exit_delivers_everything_queued(server, run_python):
    source = (
        """
import atexit, json, os
# Registered before the library is imported, so it runs after the library's exit hook.
atexit.register(lambda: print(json.dumps({"at_exit": consumer.stats()}), flush=True))
from mp_logbridge.consumers import BackgroundConsumer
"""
        + EVENT_HELPER
        + """
consumer = BackgroundConsumer(api_host=os.environ["SERVER_URL"], batch_size=2000, flush_interval=60)
for n in range(5000):
    consumer.send("event", ev(f"exit-{n}"))
print(json.dumps({"queued_at_end": consumer.stats()["queue_depth"]}), flush=True)
"""
    )
    result = run_python(source, timeout=60, env={"SERVER_URL": server.url})

    assert result.returncode == 0, result
    ended, at_exit = facts(result.stdout)
    # Two full batches may have gone; at least the last 1000 waited for the exit hook.
    assert ended["queued_at_end"] >= 1000
    assert at_exit["at_exit"]["sent"] == 5000
    assert at_exit["at_exit"]["dropped_total"] == 0
    assert insert_ids(server) == Counter(f"exit-{n}" for n in range(5000))


@pytest.mark.parametrize("target", ["down", "silent"])
def test_exit_with_server_unreachable_is_bounded_and_reported(
    run_python, down_url, silent_url, target
):
    url = down_url if target == "down" else silent_url
    source = (
        """
import atexit, json, os, time
atexit.register(lambda: print(json.dumps({
    "exit_seconds": time.monotonic() - ended, "stats": consumer.stats()}), flush=True))
from mp_logbridge.consumers import BackgroundConsumer
"""
        + EVENT_HELPER
        + """
consumer = BackgroundConsumer(api_host=os.environ["SERVER_URL"], exit_timeout=1, flush_interval=0.05)
for n in range(200):
    consumer.send("event", ev(f"lost-{n}"))
deadline = time.monotonic() + 10
while consumer.stats()["in_flight"] == 0 and consumer.stats()["retries"] == 0:
    assert time.monotonic() < deadline
    time.sleep(0.005)
ended = time.monotonic()
"""
    )
    started = time.monotonic()
    result = run_python(source, timeout=30, env={"SERVER_URL": url})
    elapsed = time.monotonic() - started

    assert result.returncode == 0, result
    assert elapsed < 15  # hang guard, far below the child's 30 s timeout
    [report] = facts(result.stdout)
    assert report["exit_seconds"] < 5  # hang guard: exit_timeout is 1 s
    stats = report["stats"]
    assert stats["sent"] == 0
    assert stats["dropped"]["shutdown_timeout"] == 200 == stats["dropped_total"]
    assert "shutdown_timeout" in result.stderr and "200" in result.stderr


# --------------------------------------------------------------------------- fork


FORK_SCRIPT = (
    """
import json, os, sys, threading, warnings
warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads running
from mp_logbridge.consumers import BackgroundConsumer
"""
    + EVENT_HELPER
    + """
consumer = BackgroundConsumer(api_host=os.environ["SERVER_URL"], flush_interval=60)
for n in range(10):
    consumer.send("event", ev(f"parent-before-{n}"))
assert consumer.stats()["queue_depth"] == 10  # still queued when the process forks

pid = os.fork()
if pid == 0:
    code = 1
    try:
        assert consumer.stats()["queue_depth"] == 0  # the parent's queue is not ours
        # An application thread in the child (often it reuses the ident of the parent's
        # sender thread, which does not exist here) sends and flushes.
        result = {}
        def work():
            for n in range(10):
                consumer.send("event", ev(f"child-{n}"))
            result["flushed"] = consumer.flush(10)
        worker = threading.Thread(target=work)
        worker.start()
        worker.join(20)
        stats = consumer.stats()
        print(json.dumps({"child": result, "child_sent": stats["sent"]}), flush=True)
        code = 0 if result.get("flushed") else 2
    finally:
        os._exit(code)

for n in range(10):
    consumer.send("event", ev(f"parent-after-{n}"))
flushed = consumer.flush(10)
_, status = os.waitpid(pid, 0)
print(json.dumps({"parent_flushed": flushed, "child_status": status,
                  "parent_sent": consumer.stats()["sent"]}), flush=True)
"""
)


def test_fork_child_and_parent_each_deliver_their_own(server, run_python):
    result = run_python(FORK_SCRIPT, timeout=60, env={"SERVER_URL": server.url})

    assert result.returncode == 0, result
    child, parent = sorted(facts(result.stdout), key=lambda fact: "parent_flushed" in fact)
    assert child == {"child": {"flushed": True}, "child_sent": 10}
    assert parent == {"parent_flushed": True, "child_status": 0, "parent_sent": 20}
    expected = [f"parent-before-{n}" for n in range(10)]
    expected += [f"parent-after-{n}" for n in range(10)]
    expected += [f"child-{n}" for n in range(10)]
    assert insert_ids(server) == Counter(expected)  # each exactly once
    for request in server.requests:  # the child never carried the parent's messages
        keys = {r["properties"]["$insert_id"].startswith("child") for r in request.records}
        assert len(keys) == 1


@pytest.mark.parametrize("parent_queued", [5, 300])
def test_fork_without_hooks_is_caught_by_the_pid_check(server, run_python, parent_queued):
    """uWSGI (without ``py-call-osafterfork``) forks with the C library's ``fork()``: no Python
    fork hook runs, the child starts with a copy of the parent's state. The next send notices
    the new PID, however long the parent's queue was; the child delivers each of its own
    messages and never its parent's."""
    source = (
        """
import ctypes, json, os
from mp_logbridge.consumers import BackgroundConsumer
"""
        + EVENT_HELPER
        + """
consumer = BackgroundConsumer(api_host=os.environ["SERVER_URL"], flush_interval=60)
for n in range(PARENT_QUEUED):
    consumer.send("event", ev(f"parent-{n}"))
queued = consumer.stats()["queue_depth"]
pid = ctypes.CDLL(None).fork()  # no Python fork hooks, as in a server that forks in C
if pid == 0:
    code = 1
    try:
        accepted = all([consumer.send("event", ev(f"child-{n}")) for n in range(20)])
        flushed = consumer.flush(10)
        stats = consumer.stats()
        print(json.dumps({
            "accepted": accepted,
            "flushed": flushed,
            "queued_at_fork": queued,
            "sent": stats["sent"],
            "queue_depth": stats["queue_depth"],
        }), flush=True)
        code = 0
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
print(json.dumps({"parent_flushed": consumer.flush(10), "child_status": status}), flush=True)
"""
    )
    source = source.replace("PARENT_QUEUED", str(parent_queued))
    result = run_python(source, timeout=60, env={"SERVER_URL": server.url})

    assert result.returncode == 0, result
    child, parent = sorted(facts(result.stdout), key=lambda fact: "parent_flushed" in fact)
    assert child == {
        "accepted": True,
        "flushed": True,
        "queued_at_fork": parent_queued,  # the parent's messages were there, and were not sent
        "sent": 20,
        "queue_depth": 0,
    }
    assert parent == {"parent_flushed": True, "child_status": 0}
    assert insert_ids(server) == Counter(
        [*(f"child-{n}" for n in range(20)), *(f"parent-{n}" for n in range(parent_queued))]
    )


# --------------------------------------------------------------------------- logging locks


LOGGING_PRELUDE = """
import json, logging, logging.config, os, sys, time
from mp_logbridge import MixpanelHandler

URL = os.environ["SERVER_URL"]
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)  # urllib3 DEBUG on the root
handler = MixpanelHandler(TOKEN, api_host=URL, flush_interval=0.05, default_distinct_id="svc")
logging.getLogger().addHandler(handler)
log = logging.getLogger("app")

def log_steps(phase, count=50):
    for n in range(count):
        log.info("%s %d", phase, n, extra={"mixpanel": {"event": "Step", "n": n, "phase": phase}})

def wait_in_flight():
    deadline = time.monotonic() + 10
    while handler.stats()["in_flight"] == 0:
        assert time.monotonic() < deadline, "no request went in flight"
        time.sleep(0.002)
""".replace("TOKEN", repr(TOKEN))


def steps(server: MixpanelServer) -> Counter[tuple[str, int]]:
    return Counter(
        (e["properties"]["phase"], e["properties"]["n"])
        for e in server.events
        if e["event"] == "Step"
    )


def test_dict_config_while_a_batch_is_in_flight(server, run_python):
    server.delay_next(1, 0.5, endpoint="/track")  # the first batch stays in flight a while
    source = (
        LOGGING_PRELUDE
        + """
log_steps("before")
wait_in_flight()
config = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {
        "console": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"},
        "mixpanel": {"class": "mp_logbridge.MixpanelHandler", "token": "test-token",
                     "api_host": URL, "flush_interval": 0.05, "default_distinct_id": "svc"},
    },
    "root": {"level": "DEBUG", "handlers": ["console", "mixpanel"]},
}
started = time.monotonic()
logging.config.dictConfig(config)  # closes the old handler under logging's lock
print(json.dumps({"reconfigure_seconds": time.monotonic() - started}), flush=True)
log_steps("after")
"""
    )
    result = run_python(source, timeout=60, env={"SERVER_URL": server.url})

    assert result.returncode == 0, result
    [fact] = facts(result.stdout)
    assert fact["reconfigure_seconds"] < 1.0  # hang guard (a deadlock would never return)
    assert "Starting new HTTP connection" in result.stderr  # urllib3 DEBUG was on
    assert "RecursionError" not in result.stderr and "Traceback" not in result.stderr
    expected = Counter((phase, n) for phase in ("before", "after") for n in range(50))
    assert steps(server) == expected  # nothing lost, nothing twice


def test_logging_shutdown_while_a_batch_is_in_flight(server, run_python):
    server.delay_next(1, 0.5, endpoint="/track")
    source = (
        LOGGING_PRELUDE
        + """
log_steps("before")
wait_in_flight()
started = time.monotonic()
logging.shutdown()  # flushes and closes every handler, each under its own lock
print(json.dumps({"shutdown_seconds": time.monotonic() - started,
                  "stats": handler.stats()}), flush=True)
"""
    )
    result = run_python(source, timeout=60, env={"SERVER_URL": server.url})

    assert result.returncode == 0, result
    [fact] = facts(result.stdout)
    assert fact["shutdown_seconds"] < 5  # hang guard: bounded by flush_timeout
    assert fact["stats"]["sent"] == 50 and fact["stats"]["dropped_total"] == 0
    assert "RecursionError" not in result.stderr and "Traceback" not in result.stderr
    assert steps(server) == Counter(("before", n) for n in range(50))


# --------------------------------------------------------------------------- atexit


def test_send_from_an_exit_hook_registered_after_start(server, run_python):
    source = (
        """
import atexit, json, os, threading
from mp_logbridge.consumers import BackgroundConsumer
"""
        + EVENT_HELPER
        + """
consumer = BackgroundConsumer(api_host=os.environ["SERVER_URL"], flush_interval=60)
consumer.send("event", ev("early"))
assert consumer.flush(10)

def late():
    before = {t.ident for t in threading.enumerate()}
    accepted = consumer.send("event", ev("from-exit-hook"))
    started = [t.name for t in threading.enumerate() if t.ident not in before]
    print(json.dumps({"accepted": accepted, "threads_started": started}), flush=True)

atexit.register(late)  # runs before the library's exit hook, which delivers what it sent
"""
    )
    result = run_python(source, timeout=60, env={"SERVER_URL": server.url})

    assert result.returncode == 0, result
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert facts(result.stdout) == [{"accepted": True, "threads_started": []}]
    assert insert_ids(server) == Counter(["early", "from-exit-hook"])


def test_send_at_exit_is_delivered_on_the_hooks_thread(server, run_python):
    """A hook that runs after the library's exit hook: no thread may start, nothing vanishes —
    what it sends is delivered on its own thread, within exit_timeout."""
    source = (
        """
import atexit, json, os, threading

def late():
    before = {t.ident for t in threading.enumerate()}
    results = {
        "running": running.send("event", ev("late-running")),
        "unused": unused.send("event", ev("late-unused")),
    }
    started = [t.name for t in threading.enumerate() if t.ident not in before]
    print(json.dumps({"accepted": results, "threads_started": started,
                      "running": running.stats()["sent"],
                      "unused": unused.stats()["sent"]}), flush=True)

atexit.register(late)  # registered before the import: runs after the library's exit hook
from mp_logbridge.consumers import BackgroundConsumer
"""
        + EVENT_HELPER
        + """
running = BackgroundConsumer(api_host=os.environ["SERVER_URL"], flush_interval=60)
unused = BackgroundConsumer(api_host=os.environ["SERVER_URL"], flush_interval=60)
running.send("event", ev("early"))
"""
    )
    result = run_python(source, timeout=60, env={"SERVER_URL": server.url})

    assert result.returncode == 0, result
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    [fact] = facts(result.stdout)
    assert fact["accepted"] == {"running": True, "unused": True}
    assert fact["threads_started"] == []
    assert fact["running"] == 2 and fact["unused"] == 1
    assert insert_ids(server) == Counter(["early", "late-running", "late-unused"])


# --------------------------------------------------------------------------- threads


def test_many_threads_sending_at_once(server):
    consumer = BackgroundConsumer(api_host=server.url)
    threads, per_thread = 16, 500
    barrier = threading.Barrier(threads)
    refused: list[str] = []
    flushed: list[bool] = []

    def work(worker: int) -> None:
        barrier.wait(10)
        for n in range(per_thread):
            key = f"t{worker}-{n}"
            if not consumer.send("event", _event(key)):
                refused.append(key)
        flushed.append(consumer.flush(30))

    workers = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert refused == []
        assert flushed == [True] * threads
        expected = Counter(f"t{w}-{n}" for w in range(threads) for n in range(per_thread))
        assert insert_ids(server) == expected  # nothing lost, nothing twice
        stats = consumer.stats()
        assert stats["sent"] == threads * per_thread and stats["dropped_total"] == 0
    finally:
        consumer.close(timeout=5)


def _event(key: str) -> dict[str, Any]:
    return event_record(key, "Concurrency Test", token=TOKEN)


# --------------------------------------------------------------------------- signals


def test_an_interrupt_during_send_never_breaks_the_consumer(server, run_python) -> None:
    """A signal handler raising (Ctrl-C) at any point of ``send`` must leave the consumer
    working: later sends, flush(), close() and the exit hook still work, and every message that
    was queued is delivered once."""
    result = run_python(
        """
        import json, os, signal, time
        from mp_logbridge import BackgroundConsumer

        consumer = BackgroundConsumer(api_host=os.environ["SERVER_URL"], exit_timeout=5, max_queue_size=50_000)
        def record(n):
            return {"event": "E", "properties": {"token": "t", "distinct_id": "u",
                    "time": int(time.time() * 1000), "$insert_id": f"i{n}"}}
        consumer.send("event", record(-1))  # the threads run
        armed = False
        def interrupt(signum, frame):
            global armed
            if armed:
                armed = False
                raise KeyboardInterrupt
        signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
        interrupted = returned = 0
        for n in range(20000):
            try:
                armed = True
                if consumer.send("event", record(n)):
                    returned += 1
                armed = False
            except KeyboardInterrupt:
                interrupted += 1
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        started = time.monotonic()
        flushed = consumer.flush(10)
        consumer.send("event", record(99999))
        consumer.close(10)
        stats = consumer.stats()
        print(json.dumps({"interrupted": interrupted, "returned": returned, "flushed": flushed,
                          "closed_in": time.monotonic() - started, "sent": stats["sent"],
                          "dropped": stats["dropped_total"]}))
        """,
        timeout=90,
        env={"SERVER_URL": server.url},
    )
    assert result.returncode == 0, result
    [outcome] = facts(result.stdout)
    assert outcome["interrupted"] > 0  # the signal did land during sends
    assert outcome["flushed"] is True
    assert outcome["closed_in"] < 15
    assert outcome["dropped"] == 0
    ids = insert_ids(server)
    assert max(ids.values()) == 1  # nothing twice
    # Everything that send() returned True for arrived; interrupted ones may or may not have
    # been queued, but the consumer's count and the server agree.
    assert outcome["sent"] == sum(ids.values()) >= outcome["returned"] + 2

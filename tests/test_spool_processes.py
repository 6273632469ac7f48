"""The durable spool against process death: ``kill -9`` mid-stream, ``with Pool()`` terminating
its workers, SIGTERM with the default action, ``os._exit``, forks, two processes sharing a spool
directory, and a profile batch accepted by the server just before its sender was killed.

Each case runs real child interpreters with hard timeouts; what arrived is checked at the
server per ``$insert_id`` (or per record for profile updates, which have none).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, child_env

from mp_logbridge.spool import drain_spool, inspect_spool
from mp_logbridge.testing import MixpanelServer

TOKEN = "spool-proc-token-0123456789"

pytestmark = pytest.mark.subprocess


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_script(tmp_path: Path, source: str, name: str = "child_script.py") -> Path:
    script = tmp_path / name
    script.write_text(textwrap.dedent(source).replace("TOKEN", TOKEN))
    return script


def start(script: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(**env),
        cwd=str(ROOT),
    )


def read_line(process: subprocess.Popen[str], timeout: float = 60) -> str:
    """The child's next line of output (a hard timeout, so a stuck child fails the test)."""
    result: list[str] = []
    reader = threading.Thread(
        target=lambda: result.append(process.stdout.readline() if process.stdout else "")
    )
    reader.start()
    reader.join(timeout)
    if reader.is_alive() or not result or not result[0]:
        process.kill()
        _, err = process.communicate(timeout=10)
        raise AssertionError(f"the child said nothing (rc={process.returncode}): {err[-3000:]}")
    return result[0].strip()


def run(script: Path, env: dict[str, str], *args: str, timeout: float = 90) -> Any:
    completed = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(**env),
        cwd=str(ROOT),
    )
    return completed


def insert_ids(records: list[dict[str, Any]], event: str | None = None) -> Counter[str]:
    return Counter(
        r["properties"]["$insert_id"] for r in records if event is None or r["event"] == event
    )


def numbers(records: list[dict[str, Any]], event: str) -> list[int]:
    return sorted(r["properties"]["n"] for r in records if r["event"] == event)


PRODUCER = """
import json, logging, os, sys, time
from mp_logbridge import tag, MixpanelHandler

count, interval, durability, after = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
handler = MixpanelHandler("TOKEN", api_host=os.environ["URL"], spool=os.environ["SPOOL"],
                          flush_interval=interval, durability=durability)
log = logging.getLogger("producer")
log.addHandler(handler)
log.setLevel(logging.INFO)
for n in range(count):
    log.info("step", extra=tag.track("Logged", distinct_id="u", n=n))
if after == "exit_now":
    os._exit(0)  # nothing waits: only durability="call" keeps everything
print(json.dumps({"pid": os.getpid(), "logged": count}), flush=True)
if after == "stream":
    n = 0
    while True:  # the process goes on producing until it is killed
        log.info("more", extra=tag.track("Streamed", distinct_id="u", n=n))
        n += 1
        if n % 50 == 0:
            time.sleep(0.001)  # a steady stream the spool keeps up with (a flood would queue)
time.sleep(0.3)  # a few commit windows pass
if after == "os_exit":
    os._exit(0)
if after == "sigterm":
    print("ready", flush=True)
    time.sleep(120)
"""


def recover(spool: Path, port: int, **server_options: Any) -> MixpanelServer:
    """Start the server where the dead process sent, and a new process that delivers the spool."""
    server = MixpanelServer(port=port, **server_options).start()
    result = drain_spool(spool, timeout=60)
    assert result.complete, result
    return server


# --------------------------------------------------------------------------- kill -9


def test_kill_9_mid_stream_loses_nothing_committed(tmp_path) -> None:
    """Nothing was sent before the kill (HTTP batches wait 60 s): every record logged before the
    last commit window arrives exactly once, from the next process."""
    port = free_port()
    spool = tmp_path / "spool"
    script = write_script(tmp_path, PRODUCER)
    env = {"URL": f"http://127.0.0.1:{port}", "SPOOL": str(spool)}
    producer = start(script, env, "3000", "60", "batch", "stream")
    assert json.loads(read_line(producer))["logged"] == 3000
    time.sleep(0.5)  # commit windows pass while it keeps streaming
    producer.send_signal(signal.SIGKILL)
    producer.communicate(timeout=30)
    assert producer.returncode == -signal.SIGKILL
    assert [f.state for f in inspect_spool(spool).files] == ["orphaned"]
    # A new process on the same spool, with the server up.
    server = MixpanelServer(port=port).start()
    try:
        result = run(
            write_script(
                tmp_path,
                """
                import json, os, time
                from mp_logbridge import BackgroundConsumer
                consumer = BackgroundConsumer(api_host=os.environ["URL"], spool=os.environ["SPOOL"])
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    stats = consumer.stats()
                    if stats["spool_adopted"] and stats["spooled"] == 0:
                        break
                    time.sleep(0.05)
                consumer.close()
                print(json.dumps(consumer.stats()))
                """,
                "restart.py",
            ),
            env,
        )
        assert result.returncode == 0, result.stderr
        stats = json.loads(result.stdout)
        assert stats["spooled"] == 0 and stats["dropped_total"] == 0
        logged = insert_ids(server.events, "Logged")
        assert len(logged) == 3000 and set(logged.values()) == {1}
        assert numbers(server.events, "Logged") == list(range(3000))
        assert set(insert_ids(server.events, "Streamed").values()) <= {1}
    finally:
        server.stop()


def test_kill_9_while_sending_resends_at_most_the_batch_in_flight(tmp_path) -> None:
    port = free_port()
    spool = tmp_path / "spool"
    server = MixpanelServer(port=port, latency=0.05).start()
    try:
        script = write_script(tmp_path, PRODUCER)
        env = {"URL": f"http://127.0.0.1:{port}", "SPOOL": str(spool)}
        producer = start(script, env, "5000", "0.05", "batch", "stream")
        read_line(producer)
        time.sleep(1.0)
        producer.send_signal(signal.SIGKILL)
        producer.communicate(timeout=30)
        before = len(server.events)
        result = drain_spool(spool, timeout=60)
        assert result.complete, result
        logged = insert_ids(server.events, "Logged")
        assert set(logged) == {
            ev["properties"]["$insert_id"] for ev in server.events if ev["event"] == "Logged"
        }
        assert numbers(server.events, "Logged")[-1] == 4999 and len(logged) == 5000
        duplicates = sum(n - 1 for n in insert_ids(server.events).values())
        assert duplicates <= 2000, (duplicates, before)  # one batch per lane at most
    finally:
        server.stop()


# --------------------------------------------------------------------------- exits without Python


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_with_pool_terminating_its_workers_loses_nothing(tmp_path, method: str) -> None:
    port = free_port()
    spool = tmp_path / "spool"
    script = write_script(
        tmp_path,
        """
        import json, logging, multiprocessing, os, sys, time
        from mp_logbridge import MixpanelHandler, tag

        handler = MixpanelHandler("TOKEN", api_host=os.environ["URL"], spool=os.environ["SPOOL"],
                                  flush_interval=60)
        log = logging.getLogger("work")
        log.addHandler(handler)
        log.setLevel(logging.INFO)

        def work(name):
            for n in range(400):
                log.info("step", extra=tag.track("Pooled", distinct_id=name, n=n))
            time.sleep(0.3)  # more work after logging: a few commit windows
            return os.getpid()

        if __name__ == "__main__":
            ctx = multiprocessing.get_context(sys.argv[1])
            with ctx.Pool(2) as pool:  # leaving the block terminates the workers
                pids = pool.map(work, [f"w{i}" for i in range(4)], chunksize=1)
            print(json.dumps({"pids": sorted(set(pids))}))
        """,
    )
    result = run(script, {"URL": f"http://127.0.0.1:{port}", "SPOOL": str(spool)}, method)
    assert result.returncode == 0, result.stderr
    report = inspect_spool(spool)
    assert report.orphaned_records == 1600
    server = recover(spool, port)
    try:
        for i in range(4):
            got = [
                e["properties"]["n"]
                for e in server.events
                if e["properties"]["distinct_id"] == f"w{i}"
            ]
            assert sorted(got) == list(range(400))
        assert set(insert_ids(server.events).values()) == {1}
    finally:
        server.stop()


@pytest.mark.parametrize("after", ["sigterm", "os_exit"])
def test_sigterm_and_os_exit_lose_nothing_committed(tmp_path, after: str) -> None:
    port = free_port()
    spool = tmp_path / "spool"
    script = write_script(tmp_path, PRODUCER)
    env = {"URL": f"http://127.0.0.1:{port}", "SPOOL": str(spool)}
    producer = start(script, env, "2000", "60", "batch", after)
    read_line(producer)
    if after == "sigterm":
        assert read_line(producer) == "ready"
        producer.send_signal(signal.SIGTERM)  # default action: the process just ends
    producer.communicate(timeout=30)
    expected = -signal.SIGTERM if after == "sigterm" else 0
    assert producer.returncode == expected
    server = recover(spool, port)
    try:
        assert numbers(server.events, "Logged") == list(range(2000))
        assert set(insert_ids(server.events).values()) == {1}
    finally:
        server.stop()


def test_durability_call_survives_an_immediate_os_exit(tmp_path) -> None:
    port = free_port()
    spool = tmp_path / "spool"
    script = write_script(tmp_path, PRODUCER)
    result = run(
        script,
        {"URL": f"http://127.0.0.1:{port}", "SPOOL": str(spool)},
        "500",
        "60",
        "call",
        "exit_now",
    )
    assert result.returncode == 0, result.stderr
    server = recover(spool, port)
    try:
        assert numbers(server.events, "Logged") == list(range(500))
    finally:
        server.stop()


def test_batch_durability_loses_only_the_last_window_on_an_immediate_exit(tmp_path) -> None:
    """The contrast that makes the commit window visible: with no time after the last call,
    the default mode may lose the records of the last window, never more."""
    port = free_port()
    spool = tmp_path / "spool"
    script = write_script(tmp_path, PRODUCER)
    result = run(
        script,
        {"URL": f"http://127.0.0.1:{port}", "SPOOL": str(spool)},
        "500",
        "60",
        "batch",
        "exit_now",
    )
    assert result.returncode == 0, result.stderr
    server = MixpanelServer(port=port).start()
    try:
        if spool.is_dir():  # not even made when the first window had not closed yet
            drain_spool(spool, timeout=30)
        got = numbers(server.events, "Logged")
        assert got == list(range(len(got)))  # what survived is a prefix: the oldest first
    finally:
        server.stop()


# --------------------------------------------------------------------------- forks


FORKER = """
import json, logging, os, sys, time
from mp_logbridge import tag, MixpanelHandler
import mp_logbridge._spool_drain as spool_impl
spool_impl.ADOPT_INTERVAL = 0.1  # the child looks for orphans often: it must not take ours

handler = MixpanelHandler("TOKEN", api_host=os.environ["URL"], spool=os.environ["SPOOL"],
                          flush_interval=float(sys.argv[1]))
log = logging.getLogger("forker")
log.addHandler(handler)
log.setLevel(logging.INFO)
for n in range(300):
    log.info("x", extra=tag.track("Parent Before", distinct_id="p", n=n))
time.sleep(0.2)
pid = os.fork()
if pid == 0:
    for n in range(200):
        log.info("x", extra=tag.track("Child", distinct_id="c", n=n))
    if sys.argv[2] == "flush":
        ok = handler.flush(20)
        print(json.dumps({"child_flushed": ok, "child": handler.stats()}), flush=True)
        sys.exit(0)
    time.sleep(0.5)
    os._exit(0)  # ends like a prefork worker killed: its records stay in its own file
os.waitpid(pid, 0)
for n in range(100):
    log.info("x", extra=tag.track("Parent After", distinct_id="p", n=n))
if sys.argv[2] == "flush":
    print(json.dumps({"parent_flushed": handler.flush(20), "parent": handler.stats()}), flush=True)
    sys.exit(0)
time.sleep(0.3)
print(json.dumps({"parent": os.getpid(), "child": pid}), flush=True)
os._exit(0)
"""


def test_a_forked_childs_records_are_its_own(tmp_path) -> None:
    """Server down for both: each process keeps its own records in its own file; the child
    never takes the parent's (live) file; a later drain delivers each record once."""
    port = free_port()
    spool = tmp_path / "spool"
    script = write_script(tmp_path, FORKER)
    result = run(script, {"URL": f"http://127.0.0.1:{port}", "SPOOL": str(spool)}, "60", "die")
    assert result.returncode == 0, result.stderr
    pids = json.loads(result.stdout.splitlines()[-1])
    report = inspect_spool(spool)
    by_pid = {item.pid: item.records for item in report.files}
    assert by_pid == {pids["parent"]: 400, pids["child"]: 200}
    server = recover(spool, port)
    try:
        assert numbers(server.events, "Parent Before") == list(range(300))
        assert numbers(server.events, "Parent After") == list(range(100))
        assert numbers(server.events, "Child") == list(range(200))
        assert set(insert_ids(server.events).values()) == {1}
    finally:
        server.stop()


def test_a_forked_child_with_the_server_up_sends_its_own_only(server, tmp_path) -> None:
    spool = tmp_path / "spool"
    script = write_script(tmp_path, FORKER)
    result = run(script, {"URL": server.url, "SPOOL": str(spool)}, "0.05", "flush")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["child_flushed"] is True and lines[1]["parent_flushed"] is True
    assert lines[0]["child"]["sent"] == 200
    assert numbers(server.events, "Parent Before") == list(range(300))
    assert numbers(server.events, "Child") == list(range(200))
    assert numbers(server.events, "Parent After") == list(range(100))
    assert set(insert_ids(server.events).values()) == {1}
    assert list(spool.glob("*.sqlite3")) == []


# --------------------------------------------------------------------------- two processes


def test_the_survivor_of_two_processes_delivers_the_dead_ones_rows(server, tmp_path) -> None:
    spool = tmp_path / "spool"
    env = {"URL": server.url, "SPOOL": str(spool)}
    survivor = start(
        write_script(
            tmp_path,
            """
            import json, os, sys
            import mp_logbridge._spool_drain as spool_impl
            spool_impl.ADOPT_INTERVAL = 0.2
            from mp_logbridge import Tracker
            tracker = Tracker("TOKEN", api_host=os.environ["URL"], spool=os.environ["SPOOL"])
            tracker.track("s", "Survivor")
            print("started", flush=True)
            sys.stdin.readline()
            tracker.track("s", "Survivor")
            print(json.dumps({"flushed": tracker.flush(20), "stats": tracker.stats()}), flush=True)
            """,
            "survivor.py",
        ),
        env,
    )
    try:
        assert read_line(survivor) == "started"
        victim = start(write_script(tmp_path, PRODUCER), env, "1500", "60", "batch", "sigterm")
        read_line(victim)
        assert read_line(victim) == "ready"
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=30)
        server.wait_for(1501, timeout=30)  # the dead one's, and the survivor's first
        assert survivor.stdin is not None
        survivor.stdin.write("stop\n")
        survivor.stdin.flush()
        facts = json.loads(read_line(survivor))
        survivor.communicate(timeout=30)
    finally:
        if survivor.poll() is None:
            survivor.kill()
    assert facts["flushed"] is True and facts["stats"]["spool_adopted"] == 1
    assert numbers(server.events, "Logged") == list(range(1500))
    assert set(insert_ids(server.events).values()) == {1}
    assert list(spool.glob("*.sqlite3")) == []


# --------------------------------------------------------------------------- at-least-once


def test_a_profile_batch_accepted_as_its_sender_dies_is_sent_again_once(
    tmp_path, library_warnings
) -> None:
    """The server applies a batch of ``$add`` updates, and the process dies before the answer:
    the next process sends that batch again (they apply twice, as documented) — only that batch,
    and it says so."""
    port = free_port()
    spool = tmp_path / "spool"
    victim_pid: list[int] = []
    killed = threading.Event()

    def kill_on_first_profile(kind: str, record: dict[str, Any]) -> None:
        if kind == "profile_updates" and victim_pid and not killed.is_set():
            killed.set()
            os.kill(victim_pid[0], signal.SIGKILL)

    script = write_script(
        tmp_path,
        """
        import json, os, time
        from mp_logbridge import Tracker
        tracker = Tracker("TOKEN", api_host=os.environ["URL"], spool=os.environ["SPOOL"],
                          flush_interval=60)
        for n in range(50):
            tracker.people.increment(f"user-{n}", {"logins": 1})
        time.sleep(0.3)
        print(json.dumps({"pid": os.getpid()}), flush=True)
        import sys
        sys.stdin.readline()
        tracker.flush(30)  # sends the batch; the server kills us once it applied it
        time.sleep(60)
        """,
    )
    server = MixpanelServer(port=port, on_record=kill_on_first_profile).start()
    try:
        victim = start(script, {"URL": f"http://127.0.0.1:{port}", "SPOOL": str(spool)})
        victim_pid.append(json.loads(read_line(victim))["pid"])
        assert victim.stdin is not None
        victim.stdin.write("go\n")
        victim.stdin.flush()
        victim.communicate(timeout=30)
        assert killed.is_set() and victim.returncode == -signal.SIGKILL
        assert len(server.profile_updates) == 50
        [item] = inspect_spool(spool).files
        assert item.lanes[0].taken == 50  # marked as taken before it was sent
        result = drain_spool(spool, timeout=30)
        assert result.complete
        counts = Counter(update["$distinct_id"] for update in server.profile_updates)
        assert counts == Counter({f"user-{n}": 2 for n in range(50)})
        library_warnings.wait_for("were being sent when it stopped and are sent again")
    finally:
        server.stop()


# --------------------------------------------------------------------------- a full disk


def test_a_full_disk_falls_back_to_memory_and_the_app_goes_on(server, tmp_path) -> None:
    """Files may not grow past 256 KB in this process (``RLIMIT_FSIZE``, with SIGXFSZ ignored,
    is how a full disk looks to it: writes fail). What the spool cannot take is delivered from
    memory, with one warning, counted."""
    spool = tmp_path / "spool"
    script = write_script(
        tmp_path,
        """
        import json, logging, os, resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
        from mp_logbridge import MixpanelHandler, tag
        handler = MixpanelHandler("TOKEN", api_host=os.environ["URL"], spool=os.environ["SPOOL"],
                                  flush_interval=0.05)
        log = logging.getLogger("full")
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        warnings = []
        class Keep(logging.Handler):
            def emit(self, record):
                warnings.append(record.getMessage())
        logging.getLogger("mp_logbridge").addHandler(Keep())
        import time
        for n in range(4000):
            log.info("x", extra=tag.track("Full", distinct_id="u", n=n, pad="z" * 200))
            if n % 200 == 199:
                time.sleep(0.08)  # commits of 200: the first ones fit, later ones do not
        flushed = handler.flush(10)  # the disk's retry is 30 s away: no waiting for it
        print(json.dumps({"flushed": flushed, "stats": handler.stats(), "warnings": warnings}))
        """,
    )
    result = run(script, {"URL": server.url, "SPOOL": str(spool)})
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout.splitlines()[-1])
    stats = facts["stats"]
    assert 0 < stats["spool_fallback"] < 4000 and stats["dropped_total"] == 0
    assert facts["flushed"] is True
    refusals = [w for w in facts["warnings"] if "cannot be written" in w]
    assert len(refusals) == 1, facts["warnings"]
    got = Counter(e["properties"]["n"] for e in server.events)
    assert set(got) == set(range(4000))  # every record arrived (from disk or from memory)


# --------------------------------------------------------------------------- a normal exit


@pytest.mark.parametrize("server_up", [True, False])
def test_a_normal_exit_delivers_or_keeps_and_never_waits_for_nothing(
    tmp_path, server_up: bool
) -> None:
    """With the server up, exit delivers everything; with it down for the whole run, exit gives
    up within ``exit_timeout`` and leaves every record for the next process. Neither waits for
    the deadline when there is nothing left to do (``exit_timeout`` is 30 s here; a hang guard,
    not a speed claim)."""
    port = free_port()
    spool = tmp_path / "spool"
    server = MixpanelServer(port=port).start() if server_up else None
    try:
        script = write_script(
            tmp_path,
            """
            import os
            from mp_logbridge import Tracker
            tracker = Tracker("TOKEN", api_host=os.environ["URL"], spool=os.environ["SPOOL"],
                              exit_timeout=30, retry={"initial_backoff": 20})
            for n in range(700):
                tracker.track("u", "Exit", {"n": n})
            """,
        )
        started = time.monotonic()
        result = run(script, {"URL": f"http://127.0.0.1:{port}", "SPOOL": str(spool)})
        took = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert took < 15, took
        if server is not None:
            assert numbers(server.events, "Exit") == list(range(700))
            assert list(spool.glob("*.sqlite3")) == []
        else:
            assert inspect_spool(spool).orphaned_records == 700
            later = recover(spool, port)
            try:
                assert numbers(later.events, "Exit") == list(range(700))
            finally:
                later.stop()
    finally:
        if server is not None:
            server.stop()


# --------------------------------------------------------------------------- re-entry


def test_a_signal_handler_sending_inside_a_durable_call_never_hangs(server, tmp_path) -> None:
    """With ``durability="call"`` the caller's thread writes to disk under a lock; a signal
    handler that sends while that thread is inside the write must not wait for itself (its
    message goes through memory instead) and nothing is lost."""
    spool = tmp_path / "spool"
    script = write_script(
        tmp_path,
        """
        import json, os, signal
        from mp_logbridge import Tracker
        tracker = Tracker("TOKEN", api_host=os.environ["URL"], spool=os.environ["SPOOL"],
                          durability="call", flush_interval=0.05, max_queue_size=100_000)
        fired = 0
        def on_alarm(signum, frame):
            global fired
            fired += 1
            tracker.track("u", "From Signal", {"n": fired})
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
        for n in range(5000):
            tracker.track("u", "From Main", {"n": n})
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        print(json.dumps({"fired": fired, "flushed": tracker.flush(30),
                          "stats": tracker.stats()}))
        """,
    )
    result = run(script, {"URL": server.url, "SPOOL": str(spool)}, timeout=120)
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout.splitlines()[-1])
    assert facts["fired"] > 20 and facts["flushed"] is True, facts
    assert numbers(server.events, "From Main") == list(range(5000))
    assert numbers(server.events, "From Signal") == list(range(1, facts["fired"] + 1))
    assert set(insert_ids(server.events).values()) == {1}

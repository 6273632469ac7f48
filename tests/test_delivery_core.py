"""The delivery core's promises, tried the way production breaks them.

Signals and finalizers that send while their thread is inside ``send``; every exit path of
``multiprocessing`` (fork, forkserver, spawn; ``Process`` and ``Pool``) and SIGTERM; servers
that stall, drip bytes or answer 512 MB; values mutated after the call; hostile input to the
Tracker; Trackers made per request; secrets in URLs; outages. Process-level cases run in child
interpreters with hard timeouts; every count is checked at the server, per ``$insert_id``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, child_env, event_record, wait_until

from mp_logbridge import (
    BackgroundConsumer,
    Consumer,
    InvalidMessageError,
    MixpanelHandler,
    Tracker,
    tag,
)
from mp_logbridge.testing import MixpanelServer

TOKEN = "core-test-token-0123456789"


def facts(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def by_event(server: MixpanelServer) -> Counter[str]:
    return Counter(record["event"] for record in server.events)


def insert_ids(records: list[dict[str, Any]]) -> Counter[str]:
    return Counter(record["properties"]["$insert_id"] for record in records)


def run_script(
    tmp_path: Path, source: str, *, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``source`` as a script file (``spawn`` and ``forkserver`` children import it)."""
    script = tmp_path / "child_script.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(**(env or {})),
        cwd=str(ROOT),
    )


# --------------------------------------------------------------------------- re-entry


@pytest.mark.subprocess
def test_a_1khz_signal_handler_sending_inside_send_never_hangs(server, tmp_path) -> None:
    result = run_script(
        tmp_path,
        """
        import json, os, signal
        from mp_logbridge import Tracker

        tracker = Tracker("TOKEN", api_host=os.environ["SERVER_URL"], flush_interval=0.05,
                          max_queue_size=200_000)
        fired = 0
        def on_alarm(signum, frame):
            global fired
            fired += 1
            tracker.track("u", "From Signal", {"n": fired})
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        for i in range(30000):
            tracker.track("u", "From Main", {"i": i, "items": [i, "x" * 20]})
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        flushed = tracker.flush(30)
        print(json.dumps({"fired": fired, "flushed": flushed, "stats": tracker.stats()}))
        """.replace("TOKEN", TOKEN),
        timeout=120,
        env={"SERVER_URL": server.url},
    )
    assert result.returncode == 0, result.stderr
    [fact] = facts(result.stdout)
    assert fact["fired"] > 50  # the handler did run while the main thread was sending
    assert fact["flushed"] is True
    counts = by_event(server)
    assert counts["From Main"] == 30000
    assert counts["From Signal"] == fact["fired"]
    assert max(insert_ids(server.events).values()) == 1


@pytest.mark.subprocess
def test_a_finalizer_sending_during_send_never_hangs(server, tmp_path) -> None:
    result = run_script(
        tmp_path,
        """
        import gc, json, logging, os
        from mp_logbridge import MixpanelHandler, tag

        handler = MixpanelHandler("TOKEN", api_host=os.environ["SERVER_URL"], flush_interval=0.05,
                                  max_queue_size=200_000)
        log = logging.getLogger("app")
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        finalized = 0

        class Noisy:
            def __init__(self):
                self.me = self  # a cycle: freed by the collector, at any allocation
            def __del__(self):
                global finalized
                finalized += 1
                log.info("gc", extra=tag.track("From Finalizer", distinct_id="u"))

        gc.set_threshold(20, 1, 1)  # the collector runs inside the library's own calls
        for i in range(20000):
            Noisy()
            log.info("main", extra=tag.track("From Main", distinct_id="u", i=i))
        gc.collect()
        flushed = handler.flush(30)
        print(json.dumps({"finalized": finalized, "flushed": flushed}))
        """.replace("TOKEN", TOKEN),
        timeout=120,
        env={"SERVER_URL": server.url},
    )
    assert result.returncode == 0, result.stderr
    [fact] = facts(result.stdout)
    assert fact["finalized"] >= 19000
    counts = by_event(server)
    assert counts["From Main"] == 20000
    assert counts["From Finalizer"] == fact["finalized"]
    assert fact["flushed"] is True


# --------------------------------------------------------------------------- exit paths

MP_SCRIPT = """
import json, logging, multiprocessing, os, sys
from mp_logbridge import tag, MixpanelHandler

# Module level: spawn and forkserver children import this file and configure logging again.
handler = MixpanelHandler("TOKEN", api_host=os.environ["SERVER_URL"], flush_interval=60)
log = logging.getLogger("work")
log.addHandler(handler)
log.setLevel(logging.INFO)

def work(name, count=COUNT):
    for n in range(count):
        log.info("step", extra=tag.track("Step", distinct_id=name, n=n))
    return count

if __name__ == "__main__":
    method, shape = sys.argv[1], sys.argv[2]
    ctx = multiprocessing.get_context(method)
    if shape == "process":
        children = [ctx.Process(target=work, args=(f"p{i}",)) for i in range(3)]
        for child in children:
            child.start()
        for child in children:
            child.join(60)
        codes = [child.exitcode for child in children]
    else:
        pool = ctx.Pool(2)
        done = pool.map(work, [f"p{i}" for i in range(3)])
        pool.close()
        pool.join()
        codes = done
    print(json.dumps({"codes": codes}), flush=True)
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
@pytest.mark.parametrize("shape", ["process", "pool"])
def test_multiprocessing_children_deliver_before_their_exit(
    server, tmp_path, method: str, shape: str
) -> None:
    """Children end in ``os._exit`` (fork, forkserver) without atexit: their messages still
    arrive, through multiprocessing's own finalizers."""
    count = 100
    script = tmp_path / "child_script.py"
    script.write_text(MP_SCRIPT.replace("TOKEN", TOKEN).replace("COUNT", str(count)))
    result = subprocess.run(
        [sys.executable, str(script), method, shape],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(SERVER_URL=server.url),
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    server.wait_for(3 * count, timeout=20)
    users = Counter(record["properties"]["distinct_id"] for record in server.events)
    assert users == {"p0": count, "p1": count, "p2": count}
    assert max(insert_ids(server.events).values()) == 1


SIGTERM_SCRIPT = """
import json, logging, os, signal, sys, time
import mp_logbridge
from mp_logbridge import tag, MixpanelHandler

handler = MixpanelHandler("TOKEN", api_host=os.environ["SERVER_URL"], flush_interval=60,
                          exit_timeout=10)
log = logging.getLogger("app")
log.addHandler(handler)
log.setLevel(logging.INFO)
mode = sys.argv[1]
if mode == "chained":
    def own(signum, frame):
        print(json.dumps({"own_handler": True}), flush=True)
        sys.exit(3)
    signal.signal(signal.SIGTERM, own)
if mode in ("opt-in", "chained"):
    mp_logbridge.deliver_on_signal(signal.SIGTERM)
for n in range(3000):
    log.info("step", extra=tag.track("Step", distinct_id="u", n=n))
print(json.dumps({"ready": True}), flush=True)
time.sleep(60)
"""


def _terminated(tmp_path: Path, server: MixpanelServer, mode: str) -> tuple[int, str, float]:
    script = tmp_path / "child_script.py"
    script.write_text(SIGTERM_SCRIPT.replace("TOKEN", TOKEN))
    child = subprocess.Popen(
        [sys.executable, str(script), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(SERVER_URL=server.url),
        cwd=str(ROOT),
    )
    try:
        assert child.stdout is not None
        assert json.loads(child.stdout.readline()) == {"ready": True}
        started = time.monotonic()
        child.send_signal(signal.SIGTERM)
        out, _err = child.communicate(timeout=30)
        return child.returncode, out, time.monotonic() - started
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.subprocess
def test_sigterm_with_the_default_action_loses_what_is_queued(server, tmp_path) -> None:
    """Without deliver_on_signal(), SIGTERM ends the process at once (as docs/guarantees.md says)."""
    code, _out, _elapsed = _terminated(tmp_path, server, "default")
    assert code == -signal.SIGTERM
    time.sleep(0.5)
    assert server.events == []


@pytest.mark.subprocess
def test_sigterm_delivers_when_the_application_opts_in(server, tmp_path) -> None:
    code, _out, elapsed = _terminated(tmp_path, server, "opt-in")
    assert code == -signal.SIGTERM  # still ended by the signal, as the default action does
    assert len(server.events) == 3000
    assert max(insert_ids(server.events).values()) == 1
    assert elapsed < 15  # hang guard: within exit_timeout plus start-up


@pytest.mark.subprocess
def test_sigterm_delivers_then_calls_the_handler_installed_before(server, tmp_path) -> None:
    code, out, _elapsed = _terminated(tmp_path, server, "chained")
    assert code == 3  # the application's own handler decided how to exit
    assert {"own_handler": True} in facts(out)
    assert len(server.events) == 3000


def _blocked_signals(native_id: int) -> set[int]:
    """The signals a thread of this process blocks, read from /proc (SigBlk is a hex bit mask)."""
    status = Path(f"/proc/self/task/{native_id}/status").read_text()
    mask = int(
        next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16
    )
    return {signum for signum in signal.valid_signals() if mask >> (signum - 1) & 1}


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread masks from /proc")
def test_process_signals_never_land_on_a_library_thread(server, make_logger) -> None:
    """The kernel gives a process-directed signal to any thread that does not block it, and
    Python runs handlers on the main thread only: SIGTERM landing on a sender thread would leave
    a main thread asleep in a semaphore (a Pool worker between tasks) asleep for good. Every
    library thread blocks the asynchronous signals; fault signals stay with the thread that
    faults, and the starting thread's own mask is left as it was."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    handler = MixpanelHandler(TOKEN, api_host=server.url, flush_interval=60)
    log = make_logger(handler)
    log.info("x", extra=tag.track("Signal Check", distinct_id="u1"))
    log.info("x", extra=tag.people.set({"plan": "pro"}, distinct_id="u1"))
    assert handler.flush(timeout=10)
    try:
        ours = {
            thread.name: _blocked_signals(thread.native_id)
            for thread in threading.enumerate()
            if thread.native_id is not None
            and thread.name.startswith(("mp_logbridge", "mixpanel-server"))
        }
        assert {
            "mp_logbridge-dispatcher",
            "mp_logbridge-event",
            "mp_logbridge-profile_update",
            "mp_logbridge-deadlines",
            "mixpanel-server",
        } <= set(ours)
        for name, blocked in ours.items():
            for signum in (
                signal.SIGTERM,
                signal.SIGINT,
                signal.SIGALRM,
                signal.SIGCHLD,
                signal.SIGHUP,
                signal.SIGUSR1,
            ):
                assert signum in blocked, (name, signal.Signals(signum).name)
            for signum in (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE):
                assert signum not in blocked, (name, signal.Signals(signum).name)
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
        assert _blocked_signals(threading.main_thread().native_id or 0) == set(before)
    finally:
        handler.close()


# --------------------------------------------------------------------------- memory bounds


def test_queue_bytes_count_real_sizes_while_the_server_is_stuck(server, make_logger) -> None:
    """1000 messages of 400 KB against a 16 MB bound and a stuck server: about 40 are held."""
    server.stall_next(100, seconds=30)
    bound = 16 * 1024 * 1024
    consumer = BackgroundConsumer(
        api_host=server.url, max_queue_bytes=bound, request_timeout=30, exit_timeout=0.5
    )
    handler = MixpanelHandler(
        TOKEN, api_host=server.url, max_queue_bytes=bound, request_timeout=30, exit_timeout=0.5
    )
    log = make_logger(handler)
    try:
        big = "x" * 400_000
        results = [
            consumer.send("event", event_record(f"big-{n}", blob=big + str(n)))  # encoded now
            for n in range(1000)
        ]
        for n in range(1000):  # measured at the call, encoded on the worker
            log.info("big", extra=tag.track("Big", distinct_id="u", blob=big + str(n)))
        for front_door in (consumer, handler):
            wait_until(lambda door=front_door: _settled(door, 1000))  # may still be admitting
            stats = front_door.stats()
            assert stats["queue_bytes"] <= bound
            held = stats["queue_depth"]
            assert 30 <= held <= 45  # 16 MB of 400 KB messages
            assert stats["dropped"]["queue_full"] == 1000 - held
        assert results.count(True) == consumer.stats()["queue_depth"]
    finally:
        consumer.close(timeout=0.2)
        handler.close()


def _settled(front_door: Any, total: int) -> bool:
    stats = front_door.stats()
    return bool(stats["queue_depth"] + stats["dropped_total"] == total)


def test_a_huge_answer_is_not_read(server) -> None:
    server.huge_next(1, size=512 * 1024 * 1024)
    with Consumer(api_host=server.url) as consumer, pytest.raises(Exception) as info:
        consumer.send("event", event_record("huge-1"))
    assert "longer than 65536 bytes" in str(info.value)
    wait_until(lambda: server.huge_bytes_written)
    assert server.huge_bytes_written[0] < 64 * 1024 * 1024  # the client stopped reading
    assert [record["properties"]["$insert_id"] for record in server.events] == ["huge-1"]


# --------------------------------------------------------------------------- deadlines


def test_a_dripping_server_is_cut_off_at_the_request_deadline(server) -> None:
    server.drip_next(1, interval=0.4)
    consumer = BackgroundConsumer(
        api_host=server.url,
        request_timeout=1.0,
        retry={"initial_backoff": 0.1, "jitter": (0, 0)},
    )
    try:
        started = time.monotonic()
        assert consumer.send("event", event_record("drip-1"))
        assert consumer.flush(20)
        assert time.monotonic() - started < 10  # hang guard: it was not held for minutes
        assert consumer.stats()["retries"] == 1
        assert insert_ids(server.events) == Counter({"drip-1": 1})
    finally:
        consumer.close(timeout=2)


def test_a_stuck_endpoint_does_not_hold_up_the_others(server) -> None:
    server.stall_next(1, seconds=20, endpoint="/track")
    consumer = BackgroundConsumer(api_host=server.url, request_timeout=30, flush_interval=0.05)
    try:
        assert consumer.send("event", event_record("stuck-1"))
        wait_until(lambda: consumer.stats()["in_flight"] == 1)
        consumer.send("profile_update", {"$token": TOKEN, "$distinct_id": "u", "$set": {"a": 1}})
        consumer.send(
            "group_update",
            {"$token": TOKEN, "$group_key": "co", "$group_id": "c1", "$set": {"a": 1}},
        )
        server.wait_for(1, "profile_updates", timeout=10)
        server.wait_for(1, "group_updates", timeout=10)
        assert server.events == []  # /track still stuck, the others went through
    finally:
        consumer.close(timeout=0.2)


# --------------------------------------------------------------------------- capture at the call


def test_values_are_captured_at_the_log_call(server, make_logger) -> None:
    handler = MixpanelHandler(TOKEN, api_host=server.url, flush_interval=60)
    log = make_logger(handler)
    cart = ["apple"]
    profile = {"plan": "free"}
    try:
        log.info("x", extra=tag.track("Checkout", distinct_id="u", cart=cart, profile=profile))
        cart.append("pear")
        profile["plan"] = "pro"
        assert handler.flush(10)
    finally:
        handler.close()
    [event] = server.events
    assert event["properties"]["cart"] == ["apple"]
    assert event["properties"]["profile"] == {"plan": "free"}


def test_values_are_captured_at_the_tracker_call(server) -> None:
    tracker = Tracker(TOKEN, api_host=server.url, flush_interval=60)
    cart = ["apple"]
    tracker.track("u", "Checkout", {"cart": cart})
    tracker.people.set("u", {"cart": cart})
    cart.append("pear")
    assert tracker.flush(10)
    assert server.events[0]["properties"]["cart"] == ["apple"]
    assert server.profile_updates[0]["$set"]["cart"] == ["apple"]


@pytest.mark.parametrize(
    "properties",
    [{1: "a", "1": "b"}, {"nested": {1: "a", "1": "b"}}, {"deep": [{"x": {(1, 2): 3}}]}],
)
def test_non_string_keys_are_refused_at_any_depth(server, make_logger, properties) -> None:
    tracker = Tracker(TOKEN, Consumer(api_host=server.url))
    with pytest.raises(InvalidMessageError, match="property names must be strings"):
        tracker.track("u", "Keys", properties)
    handler = MixpanelHandler(TOKEN, api_host=server.url)
    log = make_logger(handler)
    try:
        log.info("x", extra={"mixpanel": {"event": "Keys", "distinct_id": "u", **properties}})
        assert handler.flush(10) is False
        assert handler.stats()["dropped"]["invalid"] == 1
    finally:
        handler.close()
    assert server.events == []


# --------------------------------------------------------------------------- counted losses


def test_records_that_fail_inside_emit_are_counted(server, make_logger, capsys) -> None:
    class Exploding(dict):
        def items(self):  # type: ignore[override]
            raise RuntimeError("cannot read this tag")

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text")

    handler = MixpanelHandler(TOKEN, api_host=server.url)
    log = make_logger(handler)
    log.info("bad %d format", "x", extra={"mixpanel": True})  # no event name: message needed
    log.info("x", extra={"mixpanel": Exploding(event="E")})
    try:
        raise Unprintable()
    except Unprintable:
        log.exception("failed", extra=tag.track("Failed", distinct_id="u"))
    assert handler.flush(10) is False
    stats = handler.stats()
    assert stats["dropped"]["invalid"] == 2
    [event] = server.events
    assert event["properties"]["exception_message"] == "<unprintable Unprintable>"
    handler.close()
    assert capsys.readouterr().err.count("--- Logging error ---") == 2


@pytest.mark.subprocess
def test_losses_after_close_are_reported_with_their_true_count(server, run_python) -> None:
    result = run_python(
        f"""
        import logging
        from mp_logbridge import MixpanelHandler, tag
        handler = MixpanelHandler({TOKEN!r}, api_host={server.url!r})
        log = logging.getLogger("app")
        log.addHandler(handler)
        log.propagate = False
        log.warning("one", extra=tag.track("E", distinct_id="u"))
        handler.close()
        for n in range(10):
            log.warning("late", extra=tag.track("E", distinct_id="u"))
        """,
        timeout=30,
    )
    assert result.returncode == 0, result
    reported = [line for line in result.stderr.splitlines() if "closed:" in line]
    assert sum(int(line.split("closed: ")[1].split()[0]) for line in reported) == 10


def test_flush_is_false_after_any_drop(server) -> None:
    consumer = BackgroundConsumer(api_host=server.url, max_queue_size=10, flush_interval=60)
    try:
        results = [consumer.send("event", event_record(f"q-{n}")) for n in range(50)]
        assert results.count(False) > 0
        assert consumer.flush(10) is False
        assert consumer.flush(10) is True  # nothing new since
    finally:
        consumer.close(timeout=2)


# --------------------------------------------------------------------------- the Tracker at the call


def _cycle() -> dict[str, Any]:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    return loop


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels):
        value = {"next": value}
    return value


HOSTILE: list[Any] = [
    {"loop": _cycle()},
    {"list_loop": (lambda x: (x.append(x), x)[1])([])},
    {"big": "x" * 10_000_000},
    {"surrogate": "\ud800"},
    {"nested_surrogate": {"a": ["ok", "\udfff"]}},
    {"nan": float("nan")},
    {"inf": float("inf")},
    {"nested_nan": {"a": [1.0, float("nan")]}},
    {"nested_inf": [{"x": float("-inf")}]},
    {"huge_int": 10**5000},
    {"object": object()},
    {"bytes": b"raw"},
    {"complex": 1j},
    {"function": print},
    {"type": int},
    {"deep": _deep(40)},
    {1: "int key"},
    {"nested_key": {2: "x"}},
    {"tuple_key": {(1, 2): "x"}},
    {"none_key": {None: 1}},
    {f"p{n}": n for n in range(300)},
    {"set_of_objects": {object()}},
    {"generator": (n for n in range(3))},
    {"decimal_nan": __import__("decimal").Decimal("NaN")},
    {"decimal_snan": __import__("decimal").Decimal("sNaN")},
    {"time": float("nan")},
    {"time": -5.0},
    {"$insert_id": "has spaces"},
    {"$insert_id": "x" * 37},
    {"distinct_id": 1.5},
    {"many_big": ["y" * 300_000, "z" * 300_000, "w" * 500_000]},
]


@pytest.mark.parametrize("properties", HOSTILE, ids=range(len(HOSTILE)))
def test_the_tracker_refuses_at_the_call_what_it_could_not_send(server, properties) -> None:
    """Never ``True`` and then dropped later: what the Tracker accepts, arrives."""
    tracker = Tracker(TOKEN, api_host=server.url, flush_interval=60)
    try:
        accepted = tracker.track("u", "Hostile", properties)
    except InvalidMessageError as error:
        assert error.field and error.reason  # says which property and why
        accepted = None
    assert tracker.flush(10)
    if accepted:
        assert len(server.events) == 1
    else:
        assert server.events == []
    assert tracker.stats()["dropped_total"] == 0


def test_hostile_input_through_people_and_groups_is_refused_at_the_call(server) -> None:
    tracker = Tracker(TOKEN, api_host=server.url)
    for properties in ({"a": float("nan")}, {"a": {"b": "\ud800"}}, {"a": "x" * 2_000_000}):
        with pytest.raises(InvalidMessageError):
            tracker.people.set("u", properties)
        with pytest.raises(InvalidMessageError):
            tracker.groups.set("co", "c1", properties)
    assert tracker.flush(10)
    assert server.profile_updates == [] and server.group_updates == []


# --------------------------------------------------------------------------- sharing


def _library_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mp_logbridge-")]


def test_trackers_made_per_request_share_one_consumer(server) -> None:
    before = len(_library_threads())
    fds_before = len(os.listdir("/proc/self/fd"))
    for n in range(1000):
        tracker = Tracker(TOKEN, api_host=server.url, flush_interval=0.05)
        tracker.track("u", "Per Request", {"n": n})
    assert tracker.flush(10)
    assert len(server.events) == 1000
    assert len(_library_threads()) - before <= 3  # dispatcher, sender, deadline watchdog
    assert len(os.listdir("/proc/self/fd")) - fds_before <= 5


def test_a_consumer_nobody_refers_to_delivers_and_stops(server) -> None:
    before = set(threading.enumerate())
    consumer = BackgroundConsumer(api_host=server.url, flush_interval=60)
    for n in range(20):
        consumer.send("event", event_record(f"gc-{n}"))
    threads = [t for t in _library_threads() if t not in before and "deadlines" not in t.name]
    assert threads
    del consumer
    gc.collect()
    server.wait_for(20, timeout=10)
    wait_until(lambda: not any(t.is_alive() for t in threads), timeout=10)


# --------------------------------------------------------------------------- secrets


def test_no_secret_in_reprs_errors_or_stats(library_warnings) -> None:
    url = "http://alice:s3cr3t-pass@127.0.0.1:9"
    handler = MixpanelHandler(TOKEN, api_host=url, flush_interval=0.05)
    tracker = Tracker(TOKEN, api_host=url, retry={"max_attempts": 1})
    consumer = BackgroundConsumer(api_host=url, api_secret="api-s3cret")
    try:
        tracker.track("u", "E")
        tracker.flush(5)
        texts = [repr(handler), repr(tracker), repr(consumer), repr(handler.consumer)]
        texts += [json.dumps(tracker.stats()), json.dumps(handler.stats())]
        texts += [record.getMessage() for record in library_warnings.records]
        joined = "\n".join(texts)
        assert "s3cr3t-pass" not in joined and "alice" not in joined
        assert "api-s3cret" not in joined
        assert TOKEN not in joined
        assert TOKEN[:4] + "…" + TOKEN[-2:] in repr(tracker)
        assert any("connection refused" in t for t in texts)  # the failure is still explained
    finally:
        handler.close()
        consumer.close(timeout=1)


# --------------------------------------------------------------------------- faults


def test_an_outage_is_reported_at_once_and_its_end_too(server, library_warnings) -> None:
    server.drop_next(3)
    consumer = BackgroundConsumer(
        api_host=server.url, retry={"initial_backoff": 0.05, "jitter": (0, 0.01)}
    )
    try:
        consumer.send("event", event_record("outage-1"))
        assert consumer.flush(10)
        messages = [r.getMessage() for r in library_warnings.records]
        unreachable = [m for m in messages if "unreachable" in m]
        assert len(unreachable) == 1  # once, not per retry
        assert any("reachable again" in m for m in messages)
        assert consumer.stats()["retries"] == 3
    finally:
        consumer.close(timeout=2)


def test_an_unreachable_host_is_reported_before_any_deadline(down_url, library_warnings) -> None:
    consumer = BackgroundConsumer(api_host=down_url, flush_interval=0.01)
    try:
        consumer.send("event", event_record("down-1"))
        text = library_warnings.wait_for("unreachable", timeout=10)
        assert "connection refused" in text
    finally:
        consumer.close(timeout=0.2)


@pytest.fixture
def tls_url(tmp_path: Path) -> Any:
    """An HTTPS server with a certificate nobody trusts."""
    trustme = pytest.importorskip("trustme")
    import http.server
    import ssl

    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    certificate.configure_cert(context)

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            return

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_tls_failure_has_its_own_reason_and_names_the_host(tls_url, library_warnings) -> None:
    errors: list[BaseException] = []
    consumer = BackgroundConsumer(
        api_host=tls_url, on_error=lambda exc, records: errors.append(exc)
    )
    try:
        consumer.send("event", event_record("tls-1"))
        assert consumer.flush(10) is False
        stats = consumer.stats()
        assert stats["dropped"]["tls_error"] == 1
        assert stats["retries"] == 0
        [error] = errors
        assert tls_url.split("//")[1] in str(error)
        assert "certificate verify failed" in str(error)
    finally:
        consumer.close(timeout=1)


def test_closing_against_a_slow_server_never_counts_accepted_records_as_lost(server) -> None:
    server.latency = 1.0
    consumer = BackgroundConsumer(api_host=server.url, flush_interval=60)
    for n in range(500):
        consumer.send("event", event_record(f"slow-{n}"))
    consumer.close(timeout=0.3)
    server.wait_for(500, timeout=10)
    wait_until(lambda: consumer.stats()["sent"] == 500, timeout=10)
    assert consumer.stats()["dropped_total"] == 0


def test_logging_at_warning_during_exit_is_not_reentrant(run_python) -> None:
    """The library's own warnings go to the lastResort handler on stderr, never back into a
    Mixpanel handler (no feedback loop), even from the exit hook."""
    result = run_python(
        f"""
        import logging
        from mp_logbridge import MixpanelHandler, tag
        logging.basicConfig(level=logging.INFO)
        handler = MixpanelHandler({TOKEN!r}, api_host="http://127.0.0.1:9", exit_timeout=0.5)
        logging.getLogger().addHandler(handler)
        logging.getLogger("app").info("x", extra=tag.track("E", distinct_id="u"))
        """,
        timeout=30,
    )
    assert result.returncode == 0, result
    assert "connection refused" in result.stderr  # reported on stderr, counted
    assert result.stderr.count("mp_logbridge dropped") == 1  # and not fed back into logging
    assert logging.getLogger("mp_logbridge").propagate is False


def test_a_partial_import_without_indexes_is_matched_by_insert_id() -> None:
    from mp_logbridge._errors import PartialImportError
    from mp_logbridge._export import classify
    from mp_logbridge._records import encode_record

    batch = [encode_record(event_record(f"pi-{n}")) for n in range(4)]
    named = PartialImportError(
        "HTTP 400", failed_records=[{"insert_id": "pi-2", "field": "time"}], num_records_imported=3
    )
    outcome = classify(batch, named)
    assert [r for r in outcome.delivered] == [batch[0], batch[1], batch[3]]
    [(reason, refused, _error)] = outcome.dropped
    assert reason == "rejected_by_server" and refused == [batch[2]]
    # The server says records failed but names none we can match: none counts as delivered.
    vague = PartialImportError(
        "HTTP 400", failed_records=[{"message": "?"}], num_records_imported=2
    )
    outcome = classify(batch, vague)
    assert outcome.delivered == [] and outcome.dropped[0][1] == batch

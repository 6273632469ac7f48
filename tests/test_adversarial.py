"""Paths nobody designed for: answers cut off by the library's own deadlines, exits against
hostile servers, and the other corners found by attacking the delivery core.

Each test reproduces one defect that was found this way; process-level cases run in child
interpreters with hard timeouts, and every count is checked at the server, per ``$insert_id``.
"""

from __future__ import annotations

import gc
import inspect
import json
import math
import socket
import sys
import threading
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import Deferred, event_record, wait_until

from mp_logbridge import BackgroundConsumer, Consumer, Tracker
from mp_logbridge.errors import PartialImportError
from mp_logbridge.testing import MixpanelServer

TOKEN = "adversarial-token-0123456789"


def facts(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def insert_ids(records: list[dict[str, Any]]) -> Counter[str]:
    return Counter(record["properties"]["$insert_id"] for record in records)


# --------------------------------------------------------------------------- deadlines


def test_an_answer_cut_off_in_its_headers_by_the_deadline_is_retried(
    server: MixpanelServer,
) -> None:
    """The request deadline ends a dripping answer after its status line: what was read is not
    an answer (it would look like a 200 with an empty body), so the batch is retried, not
    dropped as refused by the server."""
    server.drip_next(1, interval=0.05)  # about 20 bytes by the deadline: inside the headers
    consumer = BackgroundConsumer(
        api_host=server.url,
        request_timeout=1.0,
        retry={"initial_backoff": 0.1, "jitter": (0, 0)},
    )
    try:
        assert consumer.send("event", event_record("cut-1"))
        assert consumer.flush(20)
        stats = consumer.stats()
        assert stats["dropped_total"] == 0, stats["dropped"]
        assert stats["retries"] == 1
        assert insert_ids(server.events) == Counter({"cut-1": 1})
    finally:
        consumer.close(timeout=2)


class _CutHeadersServer:
    """A loopback HTTP server that reads each request whole, then answers the first ``cut``
    with the start of a 200's headers and closes the connection; later ones get Mixpanel's
    ``1``."""

    def __init__(self, cut: int) -> None:
        self.cut = cut
        self.requests = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                reader = conn.makefile("rb")
                while True:
                    line = reader.readline()
                    if not line:
                        break
                    length = 0
                    while line not in (b"\r\n", b"\n", b""):
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                        line = reader.readline()
                    reader.read(length)
                    self.requests += 1
                    if self.requests <= self.cut:
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Ty")
                        conn.shutdown(socket.SHUT_RDWR)  # closed now, whoever holds the socket
                        break
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")

    def close(self) -> None:
        self.listener.close()


def test_an_answer_whose_server_closes_it_in_its_headers_is_retried() -> None:
    """The server (a proxy restarting, say) closes the connection in the middle of a 200's
    headers: they read as complete and the body as empty. That is not Mixpanel's answer, and
    whether the records were accepted is unknown: retried, not dropped as refused."""
    cutter = _CutHeadersServer(cut=1)
    consumer = BackgroundConsumer(
        api_host=cutter.url, retry={"initial_backoff": 0.1, "jitter": (0, 0)}
    )
    try:
        assert consumer.send("event", event_record("closed-1"))
        assert consumer.flush(20)
        stats = consumer.stats()
        assert stats["dropped_total"] == 0, stats["dropped"]
        assert (stats["sent"], stats["retries"], cutter.requests) == (1, 1, 2)
    finally:
        consumer.close(timeout=2)
        cutter.close()


def test_a_message_sent_after_the_exit_hook_waits_no_longer_than_exit_timeout(
    server: MixpanelServer, run_python: Callable[..., Any]
) -> None:
    """A hook running after the library's exit hook sends; the message is delivered on that
    thread, and a server that drips its answer holds the exit for ``exit_timeout``, not for the
    (much longer) ``request_timeout``. The loss is counted."""
    server.drip_next(10, interval=0.5)
    source = """
import atexit, json, os, time

def late():
    accepted = unused.send("event", {"event": "late", "properties": {
        "token": "t", "distinct_id": "u", "time": int(time.time() * 1000), "$insert_id": "late"}})
    print(json.dumps({"accepted": accepted, "dropped": unused.stats()["dropped"]}), flush=True)

atexit.register(late)  # registered before the import: runs after the library's exit hook
from mp_logbridge import BackgroundConsumer
# No request before the exit: the deadline thread is started when the consumer is made (Python
# 3.12 starts no thread in exit hooks).
unused = BackgroundConsumer(api_host=os.environ["SERVER_URL"], request_timeout=120,
                            exit_timeout=1)
"""
    # Hang guard: before, the exit waited for the whole request_timeout.
    result = run_python(source, timeout=30, env={"SERVER_URL": server.url})

    assert result.returncode == 0, result
    [fact] = facts(result.stdout)
    assert fact["accepted"] is True
    assert fact["dropped"]["shutdown_timeout"] == 1, fact


# --------------------------------------------------------------------------- re-entry


def test_a_finalizer_making_a_tracker_while_a_consumer_is_made_never_hangs(
    server: MixpanelServer, run_python: Callable[..., Any]
) -> None:
    """Making a front door's consumer allocates, so the garbage collector may run a finalizer
    in the middle of it; a finalizer that makes a Tracker (one per call, as documented) and
    tracks must neither wait for the lock its own thread holds nor lose the event."""
    source = """
import gc, json, os
from mp_logbridge import Tracker

URL = os.environ["SERVER_URL"]
ended = []

class Session:
    def __init__(self, n):
        self.n, self.me = n, self  # a cycle: only the collector frees it
    def __del__(self):
        Tracker("finalizer-token-0123456789", api_host=URL).track(
            "u", "Session Ended", {"$insert_id": f"s{self.n}"})
        ended.append(self.n)

# Collections at every point of making a consumer: one of them runs inside it.
for threshold in range(2, 160):
    gc.collect()
    Session(threshold)
    gc.set_threshold(threshold)
    Tracker("finalizer-token-0123456789", api_host=URL, flush_interval=threshold)
gc.collect()
print(json.dumps({"ended": len(ended)}), flush=True)
"""
    result = run_python(source, timeout=30, env={"SERVER_URL": server.url})  # hang guard

    assert result.returncode == 0, result
    assert facts(result.stdout) == [{"ended": 158}]
    assert insert_ids(server.events) == Counter(f"s{n}" for n in range(2, 160))


# --------------------------------------------------------------------------- memory


def test_queued_records_take_about_the_memory_the_queue_counts(server: MixpanelServer) -> None:
    """``max_queue_bytes`` bounds real memory only if a queued record takes about its encoded
    size. The fast encoder (orjson) returns bytes that keep the buffer it grew, 4 KB at least:
    small records then took 20 times what the queue counted."""
    consumer = BackgroundConsumer(api_host=server.url, flush_interval=60)
    count = 1500  # under batch_size and max_batch_bytes: they all wait in the lane
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(count):
            assert consumer.send("event", event_record(f"mem-{n}", payload="y" * 100))
        wait_until(lambda: consumer.stats()["queue_depth"] == count)
        held = tracemalloc.get_traced_memory()[0] - before
        counted = consumer.stats()["queue_bytes"]
        # Per record: the bytes object's header and the queue's slot on top of its size.
        assert held < 2 * counted + 64 * count, (held, counted)
    finally:
        tracemalloc.stop()
        consumer.close(timeout=5)
    assert len(server.events) == count


# --------------------------------------------------------------------------- signals


def test_sigterm_while_the_exit_hook_delivers_lets_it_finish(
    run_python: Callable[..., Any],
) -> None:
    """With ``deliver_on_signal``, a SIGTERM that arrives while the process is already exiting
    (the exit hook delivering to a slow server) waits for that delivery, within its deadline,
    then ends the process by the signal. Before, it ended it at once: what was still queued was
    lost, and not even counted."""
    with MixpanelServer(latency=0.2) as slow:
        source = """
import os, signal, threading, time
from mp_logbridge import BackgroundConsumer, deliver_on_signal

deliver_on_signal()
consumer = BackgroundConsumer(api_host=os.environ["SERVER_URL"], exit_timeout=20,
                              batch_size=5, max_in_flight=1, flush_interval=60)
for n in range(40):
    consumer.send("event", {"event": "e", "properties": {
        "token": "t", "distinct_id": "u", "time": int(time.time() * 1000), "$insert_id": f"x{n}"}})

def terminate():
    time.sleep(0.6)  # the exit hook is delivering by now: 8 requests of 0.2 s each
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=terminate, daemon=True).start()
"""
        result = run_python(source, timeout=30, env={"SERVER_URL": slow.url})

        assert result.returncode == -15, result  # still ended by the signal
        assert insert_ids(slow.events) == Counter(f"x{n}" for n in range(40))


# --------------------------------------------------------------------------- callbacks


def test_an_on_error_callback_calling_sys_exit_does_not_end_delivery(
    server: MixpanelServer,
) -> None:
    """``sys.exit()`` in an ``on_error`` callback (an application that wants to stop when data
    is lost) raised SystemExit on the dispatcher thread, which ended it silently: every later
    message was accepted and then neither delivered nor counted. On the library's threads the
    callback's exit is now reported like any other exception it raises."""
    told: list[BaseException] = []

    def give_up(error: BaseException, messages: list[Any]) -> None:
        told.append(error)
        sys.exit(f"giving up: {error}")

    consumer = BackgroundConsumer(api_host=server.url, flush_interval=0.05, on_error=give_up)
    try:
        assert consumer.send("event", Deferred(event_record("bad", bad=float("nan"))))
        wait_until(lambda: told)  # the dispatcher dropped it and ran the callback
        for n in range(10):
            assert consumer.send("event", event_record(f"ok-{n}"))
        assert consumer.flush(10) is False  # the bad one was dropped since the last flush
        stats = consumer.stats()
        assert stats["sent"] == 10 and stats["queue_depth"] == 0, stats
        assert insert_ids(server.events) == Counter(f"ok-{n}" for n in range(10))
    finally:
        consumer.close(timeout=2)


class _Quits:
    """A deferred message whose ``build()`` ends its thread (``sys.exit()``)."""

    weight = 100

    def build(self) -> dict[str, Any]:
        sys.exit("no record today")


def test_a_message_whose_build_calls_sys_exit_is_counted_and_the_rest_delivered(
    server: MixpanelServer,
) -> None:
    """A deferred message is built on the dispatcher; SystemExit from its ``build()`` ended that
    thread, and then every later message waited forever while ``flush()`` said ``True``."""
    consumer = BackgroundConsumer(api_host=server.url, flush_interval=0.05)
    try:
        assert consumer.send("event", _Quits())
        for n in range(5):
            assert consumer.send("event", event_record(f"after-{n}"))
        assert consumer.flush(10) is False  # one message was dropped
        stats = consumer.stats()
        assert stats["dropped"]["invalid"] == 1 and stats["sent"] == 5, stats
        assert stats["queue_depth"] == 0
        assert insert_ids(server.events) == Counter(f"after-{n}" for n in range(5))
    finally:
        consumer.close(timeout=2)


# --------------------------------------------------------------------------- fork


@pytest.mark.parametrize(
    "fork", ["os.fork()", "ctypes.CDLL(None).fork()"], ids=["hooks", "no-hooks"]
)
def test_a_child_forked_while_a_buffered_flush_is_under_way_neither_hangs_nor_resends(
    run_python: Callable[..., Any], fork: str
) -> None:
    """A thread of the parent is inside ``BufferedConsumer.flush()`` (waiting for a slow
    server, holding the consumer's lock) when another thread forks. The child's copy of that
    lock was held by a thread it does not have: its first ``send`` waited forever. It also
    held a copy of the parent's buffer, which the parent sends itself. The same when the fork
    runs no Python fork hook (a C ``fork()``, as uWSGI does): the child notices its new pid."""
    with MixpanelServer(latency=1.0) as slow:
        source = """
import ctypes, json, os, signal, threading, time
from mp_logbridge import BufferedConsumer

def ev(name):
    return {"event": name, "properties": {"token": "t", "distinct_id": "u",
            "time": int(time.time() * 1000), "$insert_id": name}}

consumer = BufferedConsumer(api_host=os.environ["SERVER_URL"], max_size=50)
consumer.send("event", ev("parent-early"))
consumer.send("profile_update", {"$token": "t", "$distinct_id": "u", "$add": {"Logins": 1}})
threading.Thread(target=consumer.flush).start()
time.sleep(0.3)  # that flush holds the consumer's lock: /track answers in 1 s, /engage waits
pid = FORK
if pid == 0:
    consumer.send("event", ev("child"))
    consumer.flush()
    os._exit(0)
ended = False
deadline = time.monotonic() + 15
while not ended and time.monotonic() < deadline:
    ended = os.waitpid(pid, os.WNOHANG) != (0, 0)
    time.sleep(0.05)
if not ended:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
consumer.send("event", ev("parent-late"))
consumer.flush()
print(json.dumps({"child_ended": ended}), flush=True)
"""
        source = source.replace("FORK", fork)
        result = run_python(source, timeout=60, env={"SERVER_URL": slow.url})

        assert result.returncode == 0, result
        assert facts(result.stdout) == [{"child_ended": True}]
        sent = Counter(record["event"] for record in slow.events)
        assert sent == Counter({"parent-early": 1, "child": 1, "parent-late": 1})
        assert len(slow.profile_updates) == 1  # the parent's, sent by the parent only


# --------------------------------------------------------------------------- timeouts


@pytest.mark.parametrize("timeout", [math.inf, 1e300])
@pytest.mark.parametrize("spooled", [False, True])
def test_flush_and_close_without_a_limit_wait_instead_of_raising(
    server: MixpanelServer, tmp_path: Path, timeout: float, spooled: bool
) -> None:
    """``flush(math.inf)`` (wait as long as it takes) raised OverflowError from the wait
    underneath, and so did ``close(math.inf)``, after closing."""
    spool = str(tmp_path / "spool") if spooled else None
    consumer = BackgroundConsumer(api_host=server.url, flush_interval=60, spool=spool)
    try:
        assert consumer.send("event", event_record("no-limit-1"))
        assert consumer.flush(timeout) is True
        assert consumer.send("event", event_record("no-limit-2"))
    finally:
        consumer.close(timeout)
    assert insert_ids(server.events) == Counter(["no-limit-1", "no-limit-2"])


# --------------------------------------------------------------------------- threads


def test_lanes_of_many_import_credentials_do_not_keep_a_thread_each(
    server: MixpanelServer,
) -> None:
    """Each set of per-call ``/import`` credentials (a service importing for many projects
    through one consumer) has a lane of its own, with its own sender thread; those threads
    stayed, idle, until the consumer was closed: a thread per project ever seen."""
    consumer = BackgroundConsumer(api_host=server.url, flush_interval=0.01)

    def import_senders() -> int:
        return sum(1 for t in threading.enumerate() if t.name == "mp_logbridge-import")

    try:
        before = import_senders()
        for n in range(60):
            record = event_record(f"imp-{n}")
            assert consumer.send("import", record, api_secret=f"project-secret-{n}")
        assert consumer.flush(30)
        wait_until(lambda: import_senders() - before <= 16, message="idle senders stayed")
        assert insert_ids(server.imports) == Counter(f"imp-{n}" for n in range(60))
    finally:
        consumer.close(timeout=5)


def _close_just_before_queueing(consumer: BackgroundConsumer) -> Any:
    """A trace function that closes ``consumer`` when ``BatchWorker.put`` is about to queue its
    message, past the check for a closed consumer: what a signal handler or a finalizer (or
    another thread) that closes it can do at that point."""
    from mp_logbridge._worker import BatchWorker

    lines, first = inspect.getsourcelines(BatchWorker.put)
    [target] = [
        first + n for n, line in enumerate(lines) if line.strip().startswith("incoming.append(")
    ]
    fired: list[bool] = []

    def trace(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is BatchWorker.put.__code__:
            if event == "line" and frame.f_lineno == target and not fired:
                fired.append(True)
                consumer.close(timeout=5)
            return trace
        return None

    return trace


def test_a_message_queued_while_a_close_completes_is_counted_not_stranded(
    server: MixpanelServer,
) -> None:
    """A close that completed between ``send``'s check for a closed consumer and the queueing
    of its message left the message queued behind a dispatcher that had finished: accepted,
    then neither delivered nor counted."""
    consumer = BackgroundConsumer(api_host=server.url, flush_interval=0.01)
    assert consumer.send("event", event_record("before"))
    assert consumer.flush(10)
    sys.settrace(_close_just_before_queueing(consumer))
    try:
        accepted = consumer.send("event", event_record("during"))
    finally:
        sys.settrace(None)
    stats = consumer.stats()
    assert consumer.closed
    assert accepted is False  # refused: the consumer was closed before it was queued
    assert stats["queue_depth"] == 0, stats
    assert stats["sent"] == 1 and stats["dropped"]["closed"] == 1, stats
    assert insert_ids(server.events) == Counter(["before"])


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize("body", [b"<html>proxy login</html>", b"[" * 60_000])
def test_an_answer_that_is_not_mixpanels_is_classified_whatever_its_nesting(
    server: MixpanelServer, body: bytes
) -> None:
    """A 200 whose body is not one of Mixpanel's answers is refused once, not retried; a body
    nested deeper than the JSON parser's recursion limit escaped the parser's error handling
    and was taken for a network failure (retried until the policy gave up)."""
    server.fail_next(1, 200, body=body)
    consumer = BackgroundConsumer(
        api_host=server.url,
        retry={"initial_backoff": 0.05, "jitter": (0, 0), "max_attempts": 3},
    )
    try:
        assert consumer.send("event", event_record("odd-answer"))
        assert consumer.flush(10) is False
        stats = consumer.stats()
        assert stats["retries"] == 0, stats
        assert stats["dropped"]["rejected_by_server"] == 1, stats["dropped"]
    finally:
        consumer.close(timeout=2)


@pytest.mark.parametrize(
    "failed_records",
    [["not an object"], [None], [{"index": 1e400}], [{"index": float("nan")}]],
    ids=["strings", "null", "infinite-index", "nan-index"],
)
def test_a_malformed_partial_import_answer_refuses_the_batch_and_raises_no_stray_error(
    server: MixpanelServer, failed_records: list[Any]
) -> None:
    """A strict ``/import`` 400 whose ``failed_records`` are not objects, or whose indexes are
    not numbers of a position, raised AttributeError/OverflowError/ValueError while it was read:
    out of a synchronous consumer's ``send``, and into a retry of the whole batch on the
    background consumer. None of the records can be matched, so all are refused (none is
    counted as delivered on a guess), as for any answer that names no record it can match."""
    answer = json.dumps(
        {
            "code": 400,
            "error": "some data points in the request failed validation",
            "status": "Bad Request",
            "num_records_imported": 1,
            "failed_records": failed_records,
        }
    ).replace("Infinity", "1e400")
    server.fail_next(1, 400, body=answer, endpoint="/import")
    with (
        Consumer(api_host=server.url, api_secret="import-secret") as consumer,
        pytest.raises(PartialImportError),
    ):
        consumer.send("import", event_record("sync-1"))

    server.fail_next(1, 400, body=answer, endpoint="/import")
    background = BackgroundConsumer(
        api_host=server.url,
        api_secret="import-secret",
        retry={"initial_backoff": 0.05, "jitter": (0, 0), "max_attempts": 3},
    )
    try:
        assert background.send("import", event_record("bg-1"))
        assert background.send("import", event_record("bg-2"))
        assert background.flush(10) is False
        stats = background.stats()
        assert stats["retries"] == 0 and stats["dropped"]["rejected_by_server"] == 2, stats
    finally:
        background.close(timeout=2)
    assert server.imports == []


def test_trackers_made_per_request_with_their_own_error_handler_do_not_pile_up_threads(
    server: MixpanelServer,
) -> None:
    """A Tracker pins its consumer for the life of the process, so Trackers made per request
    share one. With an error handler made per request (a closure), every Tracker's settings
    differ: each one pinned a consumer of its own, with its threads, for good."""

    def library_threads() -> int:
        return sum(1 for t in threading.enumerate() if t.name.startswith("mp_logbridge-"))

    before = library_threads()
    for n in range(100):
        tracker = Tracker(
            TOKEN, api_host=server.url, flush_interval=0.01, error_handler=lambda error: None
        )
        assert tracker.track("u", "Per Request", {"$insert_id": f"req-{n}"})
        assert tracker.flush(10)
        del tracker
    gc.collect()  # the Trackers are gone: consumers no longer pinned deliver and stop
    # The pinned ones keep theirs: a dispatcher and a sender each.
    wait_until(lambda: library_threads() - before <= 40, message="threads piled up")
    assert insert_ids(server.events) == Counter(f"req-{n}" for n in range(100))


def test_messages_sent_one_by_one_after_the_exit_hook_share_one_exit_deadline(
    run_python: Callable[..., Any],
) -> None:
    """Each message sent after the exit hook is delivered on the sending thread; each got a
    deadline of its own (``exit_timeout`` from its call), so a later hook sending one message
    at a time to a slow server (a queue of log records replayed at logging's shutdown) held the
    exit for ``exit_timeout`` per message. A consumer that had not started refused every late
    message after the first as ``closed``. They now share the exit's deadline; what misses it
    is counted as ``shutdown_timeout``."""
    with MixpanelServer(latency=0.5) as slow:
        source = """
import atexit, json, os, time

def ev(name):
    return {"event": name, "properties": {
        "token": "t", "distinct_id": "u", "time": int(time.time() * 1000), "$insert_id": name}}

def late():
    for n in range(40):  # one request each, half a second apiece
        running.send("event", ev(f"late-{n}"))
    for n in range(10):
        unused.send("event", ev(f"unused-{n}"))
    print(json.dumps({"running": running.stats(), "unused": unused.stats()}), flush=True)

atexit.register(late)  # registered before the import: runs after the library's exit hook
from mp_logbridge import BackgroundConsumer
url = os.environ["SERVER_URL"]
running = BackgroundConsumer(api_host=url, exit_timeout=2, flush_interval=60)
unused = BackgroundConsumer(api_host=url, exit_timeout=2, flush_interval=60)
running.send("event", ev("early"))
"""
        # Hang guard: before, the exit took 40 times half a second.
        result = run_python(source, timeout=12, env={"SERVER_URL": slow.url})

        assert result.returncode == 0, result
        [fact] = facts(result.stdout)
        running, unused = fact["running"], fact["unused"]
        assert running["sent"] + running["dropped"]["shutdown_timeout"] == 41, running
        assert running["dropped"]["shutdown_timeout"] > 0  # the exit's deadline cut them short
        assert unused["dropped"]["closed"] == 0, unused
        assert unused["sent"] + unused["dropped"]["shutdown_timeout"] == 10, unused
        # (A request cut off by the deadline may still have been accepted: counted as lost.)
        assert len(slow.events) >= running["sent"] + unused["sent"]

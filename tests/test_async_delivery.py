"""BackgroundConsumer delivery: kinds, batching, gzip, flush/close, stats, drops, bounds, front doors.

Everything goes over real HTTP to a loopback :class:`MixpanelServer`. Where a test needs the
sender thread to be busy (to fill the queue, or to keep a request in flight) the server is held
at a gate (its ``on_record`` hook blocks until the test opens it), so nothing depends on timing.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

import mixpanel
import pytest
from support import Deferred, Errors, event_record, wait_until

from mp_logbridge import InvalidMessageError, Tracker
from mp_logbridge._records import encode_message, normalize_send_args, take_batch
from mp_logbridge.consumers import BackgroundConsumer
from mp_logbridge.errors import MessagesDropped, MessageTooLargeError, RejectedError
from mp_logbridge.testing import MixpanelServer

TOKEN = "test-token"
SENDER = "mp_logbridge-dispatcher"


# --------------------------------------------------------------------------- helpers


def event(n: int, name: str = "Test Event", **props: Any) -> dict[str, Any]:
    """An event record with a predictable ``$insert_id``."""
    return event_record(f"ins-{n}", name, token=TOKEN, n=n, **props)


def profile(n: int) -> dict[str, Any]:
    return {"$token": TOKEN, "$distinct_id": f"user-{n}", "$set": {"n": n}}


def group(n: int) -> dict[str, Any]:
    return {"$token": TOKEN, "$group_key": "company", "$group_id": f"co-{n}", "$set": {"n": n}}


def ids(records: list[dict[str, Any]]) -> Counter[str]:
    return Counter(record["properties"]["$insert_id"] for record in records)


class Gate:
    """A server ``on_record`` hook that holds requests until the test opens it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self, kind: str, record: dict[str, Any]) -> None:
        self.entered.set()
        self.opened.wait(10)


@pytest.fixture
def server() -> Iterator[MixpanelServer]:
    with MixpanelServer(api_secret="import-secret") as running:
        yield running


@pytest.fixture
def gate() -> Iterator[Gate]:
    held = Gate()
    yield held
    held.opened.set()


@pytest.fixture
def gated_server(gate: Gate) -> Iterator[MixpanelServer]:
    with MixpanelServer(on_record=gate) as running:
        yield running


def sender_threads(exclude: set[threading.Thread]) -> list[threading.Thread]:
    return [
        t for t in threading.enumerate() if t.name.startswith("mp_logbridge-") and t not in exclude
    ]


def hold_sender(consumer: BackgroundConsumer, gate: Gate, record: dict[str, Any]) -> None:
    """Send one record and return once its request is held at the gate (sender busy)."""
    assert consumer.send("event", record)
    consumer.flush(0)  # due now, without waiting for flush_interval
    assert gate.entered.wait(10)


# --------------------------------------------------------------------------- basic delivery


def test_delivers_all_four_kinds(server, consumers):
    consumer = consumers(api_host=server.url, api_secret="import-secret")
    old = event(1, "Old Event", time=int(time.time()) - 10 * 86400)

    assert consumer.send("event", event(0))
    assert consumer.send("profile_update", profile(7))
    assert consumer.send("group_update", group(8))
    assert consumer.send("import", old)
    assert consumer.flush(10)

    assert [e["properties"]["$insert_id"] for e in server.events] == ["ins-0"]
    assert server.profile_updates == [profile(7)]
    assert server.group_updates == [group(8)]
    assert [e["properties"]["$insert_id"] for e in server.imports] == ["ins-1"]
    imports = [r for r in server.requests if r.path == "/import"]
    assert len(imports) == 1 and imports[0].query.get("strict") == "1"
    expected = "Basic " + base64.b64encode(b"import-secret:").decode()
    assert imports[0].header("Authorization") == expected
    assert all(r.header("Authorization") is None for r in server.requests if r.path != "/import")
    assert consumer.stats()["sent"] == 4


def test_batches_by_batch_size(server, consumers):
    consumer = consumers(api_host=server.url, batch_size=10, flush_interval=60)
    for n in range(35):
        consumer.send("event", event(n))

    server.wait_for(30)
    wait_until(lambda: consumer.stats()["sent"] == 30)
    # The remainder waits for flush_interval (a minute) or a flush.
    assert [len(r.records) for r in server.requests] == [10, 10, 10]
    assert consumer.stats()["queue_depth"] == 5

    assert consumer.flush(10)
    assert [len(r.records) for r in server.requests] == [10, 10, 10, 5]
    assert ids(server.events) == Counter(f"ins-{n}" for n in range(35))


def test_batches_by_bytes(server, consumers):
    limit = 4_000
    consumer = consumers(
        api_host=server.url, batch_size=500, max_batch_bytes=limit, flush_interval=60
    )
    for n in range(40):
        consumer.send("event", event(n, padding="p" * 300))
    assert consumer.flush(10)
    requests = server.requests
    assert len(requests) > 1
    assert all(len(r.body) <= limit for r in requests)
    assert ids(server.events) == Counter(f"ins-{n}" for n in range(40))


def test_flush_interval_sends_without_flush(server, consumers):
    consumer = consumers(api_host=server.url, batch_size=500, flush_interval=0.3)
    for n in range(3):
        consumer.send("event", event(n))

    server.wait_for(3)  # no flush() call
    assert [len(r.records) for r in server.requests] == [3]


def test_gzip_on_track_never_on_engage(server, consumers):
    consumer = consumers(api_host=server.url)
    for n in range(20):
        consumer.send("event", event(n, padding="p" * 100))
        consumer.send("profile_update", profile(n))
    assert consumer.flush(10)

    track = [r for r in server.requests if r.path == "/track"]
    engage = [r for r in server.requests if r.path == "/engage"]
    assert track and all(r.gzipped and r.header("Content-Encoding") == "gzip" for r in track)
    assert engage and not any(r.gzipped or r.header("Content-Encoding") for r in engage)
    assert sum(len(r.body) for r in engage) > 1024  # big enough that gzip would have applied
    assert len(server.events) == 20 and len(server.profile_updates) == 20


# --------------------------------------------------------------------------- flush / close


def test_flush_with_nothing_queued_is_true(server, consumers):
    consumer = consumers(api_host=server.url)
    assert consumer.flush(0.5)


def test_flush_false_on_timeout_then_true(gated_server, gate, consumers):
    consumer = consumers(api_host=gated_server.url, flush_interval=60)
    hold_sender(consumer, gate, event(0))
    assert consumer.flush(0.05) is False

    gate.opened.set()
    assert consumer.flush(10) is True
    assert ids(gated_server.events) == Counter({"ins-0": 1})


def test_flush_false_when_something_was_dropped(server, consumers):
    consumer = consumers(api_host=server.url, flush_interval=60)
    consumer.send("event", event(0))
    consumer.send("event", Deferred(event(1, bad=float("nan"))))
    assert consumer.flush(10) is False
    # A later flush covers only later messages.
    consumer.send("event", event(2))
    assert consumer.flush(10) is True
    assert ids(server.events) == Counter({"ins-0": 1, "ins-2": 1})


def test_flush_reports_a_drop_that_happened_before_the_call(server, consumers):
    consumer = consumers(api_host=server.url, flush_interval=60)
    consumer.send("event", Deferred(event(0, bad=float("nan"))))
    wait_until(lambda: consumer.stats()["dropped"]["invalid"] == 1)  # dropped, nothing pending
    assert consumer.flush(10) is False
    assert consumer.flush(10) is True  # reported once


def test_close_is_idempotent_and_bounded(gated_server, gate, consumers):
    consumer = consumers(api_host=gated_server.url, flush_interval=60)
    hold_sender(consumer, gate, event(0))

    started = time.monotonic()
    consumer.close(timeout=0.2)
    consumer.close(timeout=0.2)
    assert time.monotonic() - started < 5  # hang guard: the request is still held

    stats = consumer.stats()
    assert stats["dropped"]["shutdown_timeout"] == 1  # unconfirmed at the deadline
    gate.opened.set()
    # The server accepts it after all: it is counted as sent, and not also as lost.
    gated_server.wait_for(1)
    wait_until(lambda: consumer.stats()["sent"] == 1)
    final = consumer.stats()
    assert final["dropped_total"] == 0
    assert final["sent"] == 1


def test_close_delivers_what_is_queued(server, consumers):
    consumer = consumers(api_host=server.url, flush_interval=60)
    for n in range(25):
        consumer.send("event", event(n))
    consumer.close(timeout=10)
    assert ids(server.events) == Counter(f"ins-{n}" for n in range(25))
    assert consumer.stats()["sent"] == 25


def test_send_after_close_is_refused_and_counted(server, consumers):
    errors = Errors()
    consumer = consumers(api_host=server.url, on_error=errors)
    consumer.send("event", event(0))
    consumer.close(timeout=5)

    late = event(1)
    assert consumer.send("event", late) is False
    stats = consumer.stats()
    assert stats["dropped"]["closed"] == 1
    assert stats["sent"] == 1
    [(exc, records)] = errors.calls
    assert isinstance(exc, MessagesDropped) and exc.reason == "closed"
    assert records == [late]


# --------------------------------------------------------------------------- the thread


def test_sender_thread_starts_lazily_and_stops_on_close(server, consumers):
    before = set(threading.enumerate())
    consumer = consumers(api_host=server.url)
    consumer.flush(1)
    consumer.stats()
    assert sender_threads(before) == []

    consumer.send("event", event(0))
    wait_until(lambda: len(sender_threads(before)) == 2)
    started = sender_threads(before)
    assert all(thread.daemon for thread in started)  # the dispatcher and the /track sender
    assert sorted(thread.name for thread in started) == [SENDER, "mp_logbridge-event"]

    for n in range(1, 50):
        consumer.send("event", event(n))
    consumer.send("profile_update", profile(0))
    assert consumer.flush(10)
    # Threads for the other endpoint too, however many messages: at most max_in_flight each.
    names = Counter(thread.name for thread in sender_threads(before))
    assert names[SENDER] == 1
    assert 1 <= names["mp_logbridge-event"] <= consumer.max_in_flight
    assert 1 <= names["mp_logbridge-profile_update"] <= consumer.max_in_flight

    consumer.close(timeout=5)
    for thread in sender_threads(before):
        thread.join(5)
    assert sender_threads(before) == []


def test_closing_an_unused_consumer_starts_no_thread(server, consumers):
    before = set(threading.enumerate())
    consumer = consumers(api_host=server.url)
    consumer.close(timeout=1)
    assert sender_threads(before) == []
    assert consumer.send("event", event(0)) is False


def test_stats_fields(server, consumers):
    consumer = consumers(api_host=server.url, batch_size=10, flush_interval=60)
    for n in range(20):
        consumer.send("event", event(n))
    wait_until(lambda: consumer.stats()["sent"] == 20)  # two full batches, no flush
    for n in range(20, 25):
        consumer.send("event", event(n))
    assert consumer.flush(10)

    stats = consumer.stats()
    assert set(stats) >= {
        "sent",
        "batches",
        "retries",
        "dropped",
        "dropped_total",
        "queue_depth",
        "queue_bytes",
        "in_flight",
    }
    assert set(stats["dropped"]) >= {
        "queue_full",
        "invalid",
        "too_large",
        "rejected_by_server",
        "retries_exhausted",
        "shutdown_timeout",
        "closed",
    }
    assert (stats["sent"], stats["batches"], stats["retries"]) == (25, 3, 0)
    assert stats["dropped_total"] == 0 == sum(stats["dropped"].values())
    assert (stats["queue_depth"], stats["queue_bytes"], stats["in_flight"]) == (0, 0, 0)


def test_stats_count_what_waits(server, consumers):
    consumer = consumers(api_host=server.url, batch_size=500, flush_interval=60)
    for n in range(7):
        consumer.send("event", event(n))
    wait_until(lambda: consumer.stats()["queue_bytes"] > 0 and consumer.stats()["queue_depth"] == 7)
    assert consumer.flush(10)
    assert consumer.stats()["queue_bytes"] == 0


# --------------------------------------------------------------------------- errors and drops


def test_on_error_receives_records_refused_by_server(server, consumers):
    errors = Errors()
    consumer = consumers(api_host=server.url, on_error=errors, batch_size=3, flush_interval=60)
    server.fail_next(1, 400, endpoint="/track")
    sent = [event(n) for n in range(3)]
    for record in sent:
        consumer.send("event", record)
    wait_until(lambda: consumer.stats()["dropped_total"] == 3)  # one full batch, refused
    assert consumer.flush(10) is False

    [(exc, records)] = errors.calls
    assert isinstance(exc, RejectedError) and exc.status_code == 400
    assert records == sent
    assert consumer.stats()["dropped"]["rejected_by_server"] == 3
    assert server.events == []


def test_invalid_message_is_dropped_alone(server, consumers):
    errors = Errors()
    # The five good ones make one full batch: sent without a flush, which could cut it short.
    consumer = consumers(api_host=server.url, on_error=errors, batch_size=5, flush_interval=60)
    good = [event(n) for n in range(5)]
    nan_deep = Deferred(event(100, deep={"list": [1, {"x": float("nan")}]}))
    unknown_type = Deferred(event(101, deep={"items": [1, object()]}))
    too_large = Deferred(event(102, blob="x" * 1_000_001))

    consumer.send("event", good[0])
    consumer.send("event", nan_deep)
    consumer.send("event", good[1])
    consumer.send("event", unknown_type)
    consumer.send("event", good[2])
    consumer.send("event", too_large)
    consumer.send("event", good[3])
    consumer.send("event", good[4])
    wait_until(lambda: consumer.stats()["sent"] == 5)
    assert consumer.flush(10) is False  # some of what was queued was dropped

    assert ids(server.events) == Counter(f"ins-{n}" for n in range(5))
    assert [len(r.records) for r in server.requests] == [5]  # the rest of the batch, in one
    stats = consumer.stats()
    assert stats["dropped"]["invalid"] == 2
    assert stats["dropped"]["too_large"] == 1
    assert stats["sent"] == 5
    by_id = {records[0]["properties"]["$insert_id"]: exc for exc, records in errors.calls}
    assert set(by_id) == {"ins-100", "ins-101", "ins-102"}
    assert isinstance(by_id["ins-100"], InvalidMessageError)
    assert "deep" in by_id["ins-100"].field and "x" in by_id["ins-100"].field
    assert isinstance(by_id["ins-101"], InvalidMessageError)
    assert "object" in str(by_id["ins-101"])
    assert isinstance(by_id["ins-102"], MessageTooLargeError)


def test_send_rejects_unknown_kind_at_the_call(server, consumers):
    consumer = consumers(api_host=server.url)
    with pytest.raises(InvalidMessageError):
        consumer.send("pageview", event(0))
    with pytest.raises(InvalidMessageError):
        consumer.send("event", ["not", "a", "record"])


# --------------------------------------------------------------------------- queue bounds


def test_queue_full_drop_newest(gated_server, gate, consumers):
    errors = Errors()
    consumer = consumers(
        api_host=gated_server.url, max_queue_size=5, flush_interval=60, on_error=errors
    )
    hold_sender(consumer, gate, event(0))  # in flight: it counts, it is held in memory

    results = [consumer.send("event", event(n)) for n in range(1, 11)]
    assert results == [True] * 4 + [False] * 6
    assert consumer.stats()["dropped"]["queue_full"] == 6
    assert all(isinstance(exc, MessagesDropped) for exc, _ in errors.calls)
    assert ids(errors.records()) == Counter(f"ins-{n}" for n in range(5, 11))

    gate.opened.set()
    assert consumer.flush(10) is False  # some of what was queued before it was dropped
    assert ids(gated_server.events) == Counter(f"ins-{n}" for n in range(5))
    assert consumer.send("event", event(11))
    assert consumer.flush(10) is True


def test_queue_full_drop_oldest(gated_server, gate, consumers):
    errors = Errors()
    consumer = consumers(
        api_host=gated_server.url,
        max_queue_size=5,
        overflow="drop_oldest",
        flush_interval=60,
        on_error=errors,
    )
    hold_sender(consumer, gate, event(0))  # in flight: it cannot be taken back
    for n in range(1, 11):
        assert consumer.send("event", event(n))  # accepted; the oldest waiting one goes
    wait_until(lambda: consumer.stats()["dropped"]["queue_full"] == 6)
    assert consumer.stats()["queue_depth"] == 5

    assert ids(errors.records()) == Counter(f"ins-{n}" for n in range(1, 7))
    gate.opened.set()
    assert consumer.flush(10) is False  # evictions since the last flush
    assert ids(gated_server.events) == Counter(["ins-0", *(f"ins-{n}" for n in range(7, 11))])
    assert consumer.flush(10) is True


def test_queue_bytes_bounded_while_server_is_down(down_url, consumers):
    errors = Errors()
    limit = 20_000
    consumer = consumers(
        api_host=down_url,
        max_queue_bytes=limit,
        max_queue_size=50,
        batch_size=10,
        on_error=errors,
        retry={"initial_backoff": 60, "jitter": (0, 0)},
    )
    record_size = len(encode_message(event(0, padding="p" * 150)))
    total = 600
    for n in range(total):
        consumer.send("event", event(n, padding="p" * 150))
        if n % 20 == 0:
            assert consumer.stats()["queue_bytes"] <= limit
    wait_until(lambda: consumer.stats()["dropped"]["queue_full"] > 0)
    assert consumer.stats()["queue_bytes"] <= limit

    consumer.close(timeout=0.5)
    stats = consumer.stats()
    assert stats["sent"] == 0
    assert stats["dropped_total"] == total
    assert stats["dropped"]["queue_full"] > 0
    # What was still held at close fits the bounds: the byte budget, one batch, the queue.
    assert stats["dropped"]["shutdown_timeout"] <= limit // record_size + 10 + 50
    assert len(errors.records()) == total


def reported(library_warnings: Any, reason: str) -> int:
    """How many losses of ``reason`` the library's warnings added up to so far."""
    import re

    return sum(
        int(n)
        for record in library_warnings.records
        for n in re.findall(rf"{reason}: (\d+)", record.getMessage())
    )


def test_losses_are_reported_in_one_rate_limited_warning(
    gated_server, gate, consumers, library_warnings
):
    consumer = consumers(
        api_host=gated_server.url, max_queue_size=5, flush_interval=60, report_interval=60
    )
    hold_sender(consumer, gate, event(0))
    for n in range(1, 201):
        consumer.send("event", event(n))
    gate.opened.set()
    assert consumer.flush(10) is False
    assert consumer.stats()["dropped"]["queue_full"] == 196  # 1 in flight + 4 waiting were held

    # The first loss is reported at once; the rest inside the interval are summed...
    for n in range(300, 330, 5):  # in fives: the queue holds five
        for m in range(n, n + 5):
            assert consumer.send("event", Deferred(event(m, bad=float("inf"))))
        assert consumer.flush(10) is False
    assert consumer.stats()["dropped"]["invalid"] == 30
    assert len([r for r in library_warnings.records if r.levelno == logging.WARNING]) == 1
    # ...and reported, with the true counts per reason, when the consumer closes.
    consumer.close(timeout=5)
    warnings = [r for r in library_warnings.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert reported(library_warnings, "queue_full") == 196
    assert reported(library_warnings, "invalid") == 30
    assert "inf" in warnings[1].getMessage()  # the latest message of each reason is shown


def test_close_under_the_logging_lock_hands_over_and_still_reports(
    server, consumers, library_warnings
):
    """dictConfig closes handlers holding logging's lock: close must not wait, nor lose the report."""
    others = set(threading.enumerate())  # threads of consumers other tests left running
    consumer = consumers(api_host=server.url, flush_interval=60, report_interval=60)
    consumer.send("event", Deferred(event(0, bad=float("nan"))))
    assert consumer.flush(10) is False  # dropped and reported at once (the first report)
    consumer.send("event", Deferred(event(1, bad=float("nan"))))  # inside the report interval
    consumer.send("event", event(2))
    before = set(threading.enumerate()) - others  # this consumer's threads
    assert [t for t in before if t.name == SENDER]

    with logging._lock:  # what dictConfig holds while it closes the old handlers
        started = time.monotonic()
        consumer.close()
        assert time.monotonic() - started < 1.0  # hang guard: it does not wait

    server.wait_for(1)
    assert ids(server.events) == Counter({"ins-2": 1})  # delivered after the hand-over
    before -= others
    wait_until(lambda: not [t for t in threading.enumerate() if t.name == SENDER and t in before])
    assert reported(library_warnings, "invalid") == 2  # the last loss is reported too


# --------------------------------------------------------------------------- front doors


def test_official_mixpanel_package_uses_it_as_consumer(server, consumers):
    consumer = consumers(api_host=server.url)
    client = mixpanel.Mixpanel(TOKEN, consumer=consumer)
    long_ago = int(time.time()) - 30 * 86400

    client.track("user-1", "Signed Up", {"plan": "pro"})
    client.people_set("user-1", {"name": "Ada"})
    client.group_set("company", "acme", {"size": 3})
    client.import_data(None, "user-1", "Old Signup", long_ago, api_secret="import-secret")
    assert consumer.flush(10)

    assert [e["event"] for e in server.events] == ["Signed Up"]
    assert server.events[0]["properties"]["plan"] == "pro"
    assert server.profile_updates[0]["$set"] == {"name": "Ada"}
    assert server.group_updates[0]["$group_id"] == "acme"
    [imported] = server.imports
    assert imported["event"] == "Old Signup" and imported["properties"]["time"] == long_ago
    [request] = [r for r in server.requests if r.path == "/import"]
    assert (
        request.header("Authorization") == "Basic " + base64.b64encode(b"import-secret:").decode()
    )
    assert consumer.stats()["dropped_total"] == 0


def test_tracker_uses_it_by_default_and_reports_errors_later(server):
    errors: list[BaseException] = []
    tracker = Tracker(TOKEN, api_host=server.url, error_handler=errors.append)
    try:
        assert isinstance(tracker.consumer, BackgroundConsumer)
        server.fail_next(1, 400, endpoint="/track")
        assert tracker.track("user-1", "Refused Event") is True  # accepted for delivery
        assert tracker.flush(10) is False
        assert len(errors) == 1 and isinstance(errors[0], RejectedError)

        assert tracker.track("user-1", "Delivered Event") is True
        assert tracker.people.set("user-1", {"plan": "pro"}) is True
        assert tracker.flush(10) is True
        assert [e["event"] for e in server.events] == ["Delivered Event"]
        assert server.profile_updates[0]["$set"] == {"plan": "pro"}
        assert len(errors) == 1
    finally:
        tracker.close(timeout=2)


# --------------------------------------------------------------------------- shared helpers


def test_take_batch_cuts_by_count_and_bytes():
    pending = deque(b'{"n":%d}' % n for n in range(10))  # 7 bytes each
    seq = lambda batch: [int(p[5:-1]) for p in batch]  # noqa: E731
    assert seq(take_batch(pending, 4, 10_000)) == [0, 1, 2, 3]
    # 2 brackets + 3 x (7 + 1 comma) = 26 bytes fit in 26, not a fourth.
    assert seq(take_batch(pending, 100, 26)) == [4, 5, 6]
    assert seq(take_batch(pending, 100, 1)) == [7]  # one record always goes
    assert seq(take_batch(pending, 100, 10_000)) == [8, 9]
    assert take_batch(pending, 100, 10_000) == []


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("event", "event"),
        ("events", "event"),
        ("people", "profile_update"),
        ("groups", "group_update"),
        ("imports", "import"),
        ("profile_update", "profile_update"),
    ],
)
def test_normalize_send_args_accepts_both_vocabularies(kind, expected):
    assert normalize_send_args(kind, {"a": 1}) == (expected, {"a": 1})


def test_normalize_send_args_decodes_json_text_and_envelopes():
    assert normalize_send_args("events", '{"event": "E"}') == ("event", {"event": "E"})
    assert normalize_send_args("events", b'{"data": {"event": "E"}}') == ("event", {"event": "E"})
    for bad in ("[1, 2]", "not json", 42):
        with pytest.raises(InvalidMessageError):
            normalize_send_args("events", bad)
    with pytest.raises(InvalidMessageError):
        normalize_send_args("nope", {})


def test_encode_message_enforces_record_size():
    assert encode_message({"event": "E", "properties": {"a": "é"}}) == (
        '{"event":"E","properties":{"a":"é"}}'.encode()
    )
    with pytest.raises(MessageTooLargeError):
        encode_message({"event": "E", "properties": {"blob": "x" * 1_000_000}})

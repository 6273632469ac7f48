"""Synchronous consumers and custom sinks: Consumer, BufferedConsumer, CallableSink.

Delivery goes over real HTTP to :class:`~mp_logbridge.testing.MixpanelServer`; failures are
scripted on the server.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest

from mp_logbridge import (
    BufferedConsumer,
    ConfigurationError,
    Consumer,
    DeliveryError,
    InvalidMessageError,
    ServiceAccount,
    Tracker,
)
from mp_logbridge import _messages as msg
from mp_logbridge._values import encode
from mp_logbridge.consumers import BackgroundConsumer, CallableSink, ConsumerProtocol
from mp_logbridge.errors import MixpanelConnectionError, MixpanelServerError, RejectedError
from mp_logbridge.testing import MixpanelServer
from mp_logbridge.tracker import ErrorHandler

TOKEN = "sync-token"
ACCOUNT = ("robot", "robot-secret", "4242")
NO_WAIT = {"max_attempts": 3, "initial_backoff": 0, "jitter": (0, 0)}


def event(distinct_id: str = "u", **properties: Any) -> dict[str, Any]:
    return msg.event(TOKEN, distinct_id, "Sync Test", properties)


def profile(distinct_id: str = "u") -> dict[str, Any]:
    return msg.profile_update(TOKEN, distinct_id, "$set", {"n": 1})


def group(group_id: str = "Acme") -> dict[str, Any]:
    return msg.group_update(TOKEN, "Company", group_id, "$set", {"n": 1})


def old_event(distinct_id: str = "u") -> dict[str, Any]:
    return msg.event(TOKEN, distinct_id, "Old", {"time": 1_600_000_000})


def insert_ids(records: list[dict[str, Any]]) -> Counter[str]:
    return Counter(record["properties"]["$insert_id"] for record in records)


@pytest.fixture
def server() -> Iterator[MixpanelServer]:
    with MixpanelServer(service_account=ACCOUNT) as srv:
        yield srv


def credentials() -> ServiceAccount:
    return ServiceAccount(*ACCOUNT)


# --------------------------------------------------------------------------- Consumer


def test_consumer_raises_at_the_call(server: MixpanelServer) -> None:
    with Consumer(api_host=server.url) as consumer:
        assert consumer.send("event", event()) is True
        server.fail_next(1, 503)
        with pytest.raises(MixpanelServerError) as info:
            consumer.send("event", event())
        assert info.value.retryable is True
        assert consumer.stats()["dropped"]["retries_exhausted"] == 1
        assert consumer.stats()["sent"] == 1
    assert len(server.events) == 1


def test_consumer_retry_that_succeeds_is_a_success(server: MixpanelServer) -> None:
    server.fail_next(2, 503)
    with Consumer(api_host=server.url, retry=NO_WAIT) as consumer:
        assert consumer.send("event", event()) is True
        stats = consumer.stats()
    assert stats["retries"] == 2
    assert stats["dropped_total"] == 0
    assert len(server.requests) == 3
    assert len(server.events) == 1


def test_consumer_gives_up_after_max_attempts(server: MixpanelServer) -> None:
    server.fail_next(5, 500)
    with Consumer(api_host=server.url, retry=NO_WAIT) as consumer:
        with pytest.raises(MixpanelServerError):
            consumer.send("event", event())
        assert consumer.stats()["dropped"]["retries_exhausted"] == 1
    assert len(server.requests) == 3


def test_invalid_message_raises_before_any_request(server: MixpanelServer) -> None:
    with Consumer(api_host=server.url) as consumer:
        with pytest.raises(InvalidMessageError) as info:
            consumer.send("event", {"event": "x", "properties": {"bad": object()}})
        assert info.value.field == "message.properties.bad"
        with pytest.raises(InvalidMessageError, match="kind"):
            consumer.send("bogus", event())
        with pytest.raises(InvalidMessageError, match="message"):
            consumer.send("event", ["not", "a", "record"])
        with pytest.raises(InvalidMessageError, match="JSON"):
            consumer.send("event", "{not json")
        assert consumer.stats()["dropped"]["invalid"] == 1
    assert server.requests == []


def test_consumer_accepts_every_message_form(server: MixpanelServer) -> None:
    class Deferred:
        def __init__(self, record: dict[str, Any]) -> None:
            self.record = record

        def build(self) -> dict[str, Any]:
            return self.record

    records = [event(f"user-{i}") for i in range(5)]
    with Consumer(api_host=server.url) as consumer:
        consumer.send("event", records[0])
        consumer.send("events", json.dumps(records[1]))  # the mixpanel package's vocabulary
        consumer.send("event", json.dumps({"data": records[2]}))  # the Ruby SDK's envelope
        consumer.send("event", json.dumps(records[3]).encode())
        consumer.send("event", Deferred(records[4]))
        consumer.send("people", profile())
        consumer.send("groups", group())
    assert insert_ids(server.events) == insert_ids(records)
    assert len(server.profile_updates) == len(server.group_updates) == 1


def _failing_tracker(
    server: MixpanelServer, error_handler: Any
) -> tuple[Tracker, Callable[[], None]]:
    consumer = Consumer(api_host=server.url)
    return Tracker(TOKEN, consumer, error_handler=error_handler), consumer.close


def test_tracker_returns_false_and_calls_a_callable_error_handler(
    server: MixpanelServer,
) -> None:
    seen: list[BaseException] = []
    tracker, close = _failing_tracker(server, seen.append)
    try:
        assert tracker.track("u", "Works") is True
        server.fail_next(1, 500)
        assert tracker.track("u", "Fails") is False
        server.fail_next(1, 400, body={"status": 0, "error": "bad"})
        assert tracker.people.set("u", {"a": 1}) is False
        server.drop_next(1)
        assert tracker.groups.set("Company", "Acme", {"a": 1}) is False
    finally:
        close()
    assert [type(error) for error in seen] == [
        MixpanelServerError,
        RejectedError,
        MixpanelConnectionError,
    ]
    assert [e["event"] for e in server.events] == ["Works"]


def test_tracker_calls_an_error_handler_subclass(server: MixpanelServer) -> None:
    class Collecting(ErrorHandler):
        def __init__(self) -> None:
            self.errors: list[BaseException] = []

        def handle(self, error: BaseException) -> bool:
            self.errors.append(error)
            return True

    handler = Collecting()
    tracker, close = _failing_tracker(server, handler)
    try:
        server.fail_next(1, 429, retry_after=1)
        assert tracker.people.increment("u", {"n": 1}) is False
    finally:
        close()
    assert len(handler.errors) == 1
    assert handler.errors[0].retry_after == 1.0
    assert ErrorHandler().handle(RuntimeError("x")) is False


def test_a_failing_error_handler_does_not_escape(server: MixpanelServer) -> None:
    def explode(error: BaseException) -> None:
        raise RuntimeError("handler bug")

    tracker, close = _failing_tracker(server, explode)
    try:
        server.fail_next(1, 503)
        assert tracker.track("u", "e") is False
    finally:
        close()


def test_tracker_without_error_handler_returns_false(down_url: str) -> None:
    with Tracker(TOKEN, Consumer(api_host=down_url)) as tracker:
        assert tracker.track("u", "e") is False
        assert tracker.stats()["dropped"]["retries_exhausted"] == 1


def test_invalid_arguments_raise_even_with_an_error_handler(server: MixpanelServer) -> None:
    seen: list[BaseException] = []
    tracker, close = _failing_tracker(server, seen.append)
    try:
        with pytest.raises(InvalidMessageError):
            tracker.track(None, "e")  # type: ignore[arg-type]
    finally:
        close()
    assert seen == []


def test_bad_error_handler_and_consumer_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        Tracker(TOKEN, lambda kind, message: None, error_handler=42)
    with pytest.raises(ConfigurationError):
        Tracker(TOKEN, 42)
    with pytest.raises(ConfigurationError, match="api_host"):
        Tracker(TOKEN, lambda kind, message: None, api_host="http://127.0.0.1:9")


def test_import_needs_credentials_on_the_consumer(server: MixpanelServer) -> None:
    with Tracker(TOKEN, Consumer(api_host=server.url)) as tracker:
        with pytest.raises(ConfigurationError, match="credentials"):
            tracker.import_event("u", "Old", {"time": 1_600_000_000})
        with pytest.raises(ConfigurationError, match="credentials"):
            tracker.merge("a", "b")
    assert server.requests == []


# --------------------------------------------------------------------------- BufferedConsumer


def test_buffered_batches_every_endpoint(server: MixpanelServer) -> None:
    with BufferedConsumer(api_host=server.url, credentials=credentials(), max_size=3) as buffered:
        for index in range(2):
            buffered.send("event", event(f"user-{index}"))
            buffered.send("profile_update", profile(f"u{index}"))
            buffered.send("group_update", group(str(index)))
            buffered.send("import", old_event(f"user-{index}"))
        assert server.requests == []
        assert buffered.stats()["queue_depth"] == 8
        assert buffered.flush() is True
        assert sorted((r.path, len(r.records)) for r in server.requests) == [
            ("/engage", 2),
            ("/groups", 2),
            ("/import", 2),
            ("/track", 2),
        ]
        server.clear()
        for index in range(3):
            buffered.send("group_update", group(f"full-{index}"))
        assert [(r.path, len(r.records)) for r in server.requests] == [("/groups", 3)]
        assert buffered.stats()["queue_depth"] == 0


def test_buffered_cuts_batches_by_bytes(server: MixpanelServer) -> None:
    records = [event(f"user-{i:02d}", pad="p" * 300) for i in range(9)]
    sizes = {len(encode(record)) for record in records}
    assert len(sizes) == 1
    size = sizes.pop()
    two_per_request = 2 + 2 * (size + 1)
    with BufferedConsumer(
        api_host=server.url, max_size=50, max_batch_bytes=two_per_request
    ) as buffered:
        for record in records:
            buffered.send("event", record)
        assert buffered.flush() is True
    assert [len(r.records) for r in server.requests] == [2, 2, 2, 2, 1]
    assert insert_ids(server.events) == insert_ids(records)


@pytest.mark.parametrize(
    ("option", "value"),
    [("max_size", 0), ("max_size", 2001), ("max_batch_bytes", 0), ("max_buffer", -1)],
)
def test_buffered_options_are_validated(option: str, value: int) -> None:
    with pytest.raises(ConfigurationError, match=option):
        BufferedConsumer(api_host="http://127.0.0.1:9", **{option: value})


def test_buffered_accepts_the_documented_maximum() -> None:
    with BufferedConsumer(api_host="http://127.0.0.1:9", max_size=2000) as buffered:
        assert buffered.max_size == 2000


def test_buffered_is_thread_safe(server: MixpanelServer) -> None:
    threads_count, per_thread = 8, 150
    sent: list[list[str]] = [[] for _ in range(threads_count)]
    failures: list[BaseException] = []
    start = threading.Barrier(threads_count)

    with BufferedConsumer(api_host=server.url, max_size=25) as buffered:

        def work(slot: int) -> None:
            try:
                start.wait(10)
                for index in range(per_thread):
                    record = event(f"t{slot}-{index}")
                    sent[slot].append(record["properties"]["$insert_id"])
                    buffered.send("event", record)
                    if index % 50 == 0:
                        buffered.send("profile_update", profile(f"t{slot}"))
            except BaseException as exc:  # reported below
                failures.append(exc)

        workers = [threading.Thread(target=work, args=(slot,)) for slot in range(threads_count)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert buffered.flush() is True
        stats = buffered.stats()
    assert failures == []
    arrived = insert_ids(server.events)
    assert arrived == Counter(i for ids in sent for i in ids)
    assert set(arrived.values()) == {1}
    assert len(server.profile_updates) == threads_count * 3
    assert all(len(r.records) <= 25 for r in server.requests)
    assert stats["sent"] == threads_count * per_thread + threads_count * 3
    assert stats["queue_depth"] == 0


def test_buffered_never_resends_delivered_batches_after_a_failure() -> None:
    arrived = 0
    lock = threading.Lock()

    def fail_after_two_batches(kind: str, record: dict[str, Any]) -> None:
        nonlocal arrived
        with lock:
            arrived += 1
            if arrived == 4:  # the second batch is in: the third request will fail
                server.fail_next(1, 503, endpoint="/track")

    with MixpanelServer(on_record=fail_after_two_batches) as server:
        records = [event(f"user-{i}", pad="q" * 200) for i in range(10)]
        size = len(encode(records[0]))
        with BufferedConsumer(
            api_host=server.url, max_size=50, max_batch_bytes=2 + 2 * (size + 1)
        ) as buffered:
            for record in records:
                buffered.send("event", record)
            with pytest.raises(MixpanelServerError):
                buffered.flush()
            assert len(server.events) == 4
            assert buffered.stats()["queue_depth"] == 6
            assert buffered.flush() is True
            stats = buffered.stats()
        assert insert_ids(server.events) == insert_ids(records)  # each exactly once
        assert [r.status for r in server.requests] == [200, 200, 503, 200, 200, 200]
        assert stats["sent"] == 10
        assert stats["dropped_total"] == 0


def test_buffered_failure_on_one_endpoint_does_not_hold_the_others(
    server: MixpanelServer,
) -> None:
    events = [event(f"user-{i}") for i in range(3)]
    with BufferedConsumer(api_host=server.url, max_size=10) as buffered:
        for record in events:
            buffered.send("event", record)
        for index in range(3):
            buffered.send("profile_update", profile(f"u{index}"))
        server.drop_next(1, endpoint="/track")
        with pytest.raises(MixpanelConnectionError):
            buffered.flush()
        assert len(server.profile_updates) == 3
        assert server.events == []
        assert buffered.stats()["queue_depth"] == 3
    # leaving the ``with`` block flushed what was left
    assert insert_ids(server.events) == insert_ids(events)
    assert len(server.profile_updates) == 3


def test_buffered_drops_what_the_server_refuses_for_good(server: MixpanelServer) -> None:
    reported: list[tuple[BaseException, list[Any]]] = []
    records = [event(f"user-{i}") for i in range(3)]
    with BufferedConsumer(
        api_host=server.url, max_size=10, on_error=lambda exc, recs: reported.append((exc, recs))
    ) as buffered:
        for record in records:
            buffered.send("event", record)
        server.fail_next(1, 400, body={"status": 0, "error": "refused"})
        with pytest.raises(RejectedError):
            buffered.flush()
        assert buffered.flush() is True
        stats = buffered.stats()
    assert stats["dropped"]["rejected_by_server"] == 3
    assert stats["queue_depth"] == 0
    assert len(server.requests) == 1
    assert insert_ids(reported[0][1]) == insert_ids(records)


@pytest.mark.allow_spec_violations("record.")  # refused records on purpose
def test_buffered_partial_import_keeps_exact_counts(server: MixpanelServer) -> None:
    good = [old_event(f"good-{i}") for i in range(5)]
    bad = [msg.event(TOKEN, "bad", "Old", {"time": 5}) for _ in range(2)]
    with BufferedConsumer(api_host=server.url, credentials=credentials(), max_size=3) as buffered:
        for record in [good[0], bad[0], good[1], good[2], good[3], bad[1], good[4]]:
            try:
                buffered.send("import", record)
            except DeliveryError:
                pass
        try:
            buffered.flush()
        except DeliveryError:
            pass
        assert buffered.flush() is True
        stats = buffered.stats()
    assert insert_ids(server.imports) == insert_ids(good)
    assert stats["dropped"]["rejected_by_server"] == 2
    assert stats["sent"] == 5


def test_buffered_max_buffer_drops_the_oldest(server: MixpanelServer) -> None:
    reported: list[list[Any]] = []
    records = [event(f"user-{i}") for i in range(8)]
    with BufferedConsumer(
        api_host=server.url,
        max_size=100,
        max_buffer=5,
        on_error=lambda exc, recs: reported.append(recs),
    ) as buffered:
        for record in records:
            buffered.send("event", record)
        stats = buffered.stats()
        assert stats["dropped"]["queue_full"] == 3
        assert stats["queue_depth"] == 5
    assert insert_ids(server.events) == insert_ids(records[3:])
    assert insert_ids([r for recs in reported for r in recs]) == insert_ids(records[:3])


def test_buffered_service_account_wins_over_a_per_message_secret(server: MixpanelServer) -> None:
    """As in the official package: the consumer's service account takes precedence over the
    ``api_secret`` given with a message."""
    with BufferedConsumer(api_host=server.url, credentials=credentials()) as buffered:
        buffered.send("import", old_event("own"))
        buffered.send("imports", json.dumps(old_event("other")), None, "project-secret")
        buffered.flush()
    assert sorted(r["properties"]["distinct_id"] for r in server.imports) == ["other", "own"]
    auth = {r.header("Authorization") for r in server.requests if r.path == "/import"}
    assert auth == {credentials().authorization()}
    assert {r.query.get("project_id") for r in server.requests if r.path == "/import"} == {
        credentials().project_id
    }


def test_callable_sink_receives_json_ready_dicts() -> None:
    received: list[tuple[str, dict[str, Any]]] = []
    tracker = Tracker(TOKEN, lambda kind, message: received.append((kind, message)))
    assert isinstance(tracker.consumer, CallableSink)
    when = dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=-8)))
    assert tracker.track("u", "e", {"when": when, "price": Decimal("1.50"), "pair": (1, 2)})
    assert tracker.people.set("u", {"day": dt.date(2020, 1, 2)})
    assert tracker.groups.union("Company", "Acme", {"tags": {"x"}})
    assert tracker.people.track_charge("u", Decimal("9"), {"$time": dt.datetime(2013, 1, 2)})
    kinds = [kind for kind, _ in received]
    assert kinds == ["event", "profile_update", "group_update", "profile_update"]
    props = received[0][1]["properties"]
    assert (props["when"], props["price"], props["pair"]) == ("2020-01-02T11:04:05", 1.5, [1, 2])
    assert received[1][1]["$set"] == {"day": "2020-01-02"}
    assert received[2][1]["$union"] == {"tags": ["x"]}
    assert received[3][1]["$append"] == {
        "$transactions": {"$time": "2013-01-02T00:00:00", "$amount": 9}
    }
    for _, message in received:
        assert json.loads(json.dumps(message)) == message


def test_callable_sink_accepts_sources_and_text() -> None:
    received: list[tuple[str, dict[str, Any]]] = []
    sink = CallableSink(lambda kind, message: received.append((kind, message)))
    record = event()

    class Deferred:
        def build(self) -> dict[str, Any]:
            return record

    sink.send("event", Deferred())
    sink.send("people", json.dumps({"data": profile()}))
    assert received[0] == ("event", json.loads(json.dumps(record)))
    assert received[1][0] == "profile_update"
    with pytest.raises(ConfigurationError):
        CallableSink(42)  # type: ignore[arg-type]


def test_sink_errors_propagate_like_the_ruby_sdk() -> None:
    seen: list[BaseException] = []

    def delivery_fails(kind: str, message: dict[str, Any]) -> None:
        raise MixpanelConnectionError("queue unavailable")

    tracker = Tracker(TOKEN, delivery_fails, error_handler=seen.append)
    assert tracker.track("u", "e") is False
    assert isinstance(seen[0], MixpanelConnectionError)

    def bug(kind: str, message: dict[str, Any]) -> None:
        raise RuntimeError("sink bug")

    with pytest.raises(RuntimeError, match="sink bug"):
        Tracker(TOKEN, bug).track("u", "e")


def test_callable_sink_flush_and_close() -> None:
    class Forwarder:
        def __init__(self) -> None:
            self.flushed: list[float | None] = []

        def __call__(self, kind: str, message: dict[str, Any]) -> None:
            pass

        def flush(self, timeout: float | None = None) -> bool:
            self.flushed.append(timeout)
            return False

    forwarder = Forwarder()
    sink = CallableSink(forwarder)
    assert sink.flush(3.0) is False
    assert forwarder.flushed == [3.0]
    assert CallableSink(lambda kind, message: None).flush() is True
    sink.close()
    with Tracker(TOKEN, forwarder) as tracker:
        assert tracker.flush(1.0) is False
        assert tracker.stats()["sent"] == 0  # the sink counts what it handed over


def test_ruby_block_form_forwarding_to_a_consumer(server: MixpanelServer) -> None:
    with Consumer(api_host=server.url) as forward:
        tracker = Tracker(TOKEN, lambda kind, message: forward.send(kind, message))
        assert tracker.track("u", "Forwarded")
        assert tracker.people.plus_one("u", "visits")
        server.fail_next(1, 500)
        assert tracker.track("u", "Lost") is False
    assert [e["event"] for e in server.events] == ["Forwarded"]
    assert server.profile_updates[0]["$add"] == {"visits": 1}


# --------------------------------------------------------------------------- lifecycle


def test_every_consumer_satisfies_the_protocol(down_url: str) -> None:
    made = [
        Consumer(api_host=down_url),
        BufferedConsumer(api_host=down_url),
        BackgroundConsumer(api_host=down_url),
        CallableSink(lambda kind, message: None),
    ]
    for consumer in made:
        assert isinstance(consumer, ConsumerProtocol)
        consumer.close()


def test_consumer_flush_close_and_reuse(server: MixpanelServer) -> None:
    with Consumer(api_host=server.url) as consumer:
        assert consumer.flush() is True
        consumer.send("event", event("1"))
    consumer.close()  # closing twice is fine
    assert consumer.send("event", event("2")) is True  # a new session is made on use
    consumer.close()
    assert len(server.events) == 2


def test_buffered_context_manager_and_close_flush(server: MixpanelServer) -> None:
    with BufferedConsumer(api_host=server.url) as buffered:
        buffered.send("event", event("ctx"))
        assert server.events == []
    assert [e["properties"]["distinct_id"] for e in server.events] == ["ctx"]
    buffered = BufferedConsumer(api_host=server.url)
    buffered.send("profile_update", profile("closed"))
    buffered.close()
    assert server.profile_updates[0]["$distinct_id"] == "closed"


def test_buffered_close_raises_when_it_cannot_deliver(server: MixpanelServer) -> None:
    buffered = BufferedConsumer(api_host=server.url)
    buffered.send("event", event())
    server.fail_next(1, 503)
    with pytest.raises(MixpanelServerError):
        buffered.close()
    assert buffered.stats()["queue_depth"] == 1


def test_tracker_flush_and_close_delegate(server: MixpanelServer) -> None:
    seen: list[BaseException] = []
    with Tracker(
        TOKEN, BufferedConsumer(api_host=server.url, max_size=10), error_handler=seen.append
    ) as tracker:
        tracker.track("u", "one")
        server.fail_next(1, 503)
        assert tracker.flush() is False
        assert isinstance(seen[0], MixpanelServerError)
        assert tracker.flush() is True
        tracker.track("u", "two")
    assert [e["event"] for e in server.events] == ["one", "two"]


def test_tracker_close_reports_undelivered_to_the_error_handler(server: MixpanelServer) -> None:
    seen: list[BaseException] = []
    tracker = Tracker(TOKEN, BufferedConsumer(api_host=server.url), error_handler=seen.append)
    tracker.track("u", "e")
    server.fail_next(1, 502)
    tracker.close()
    assert len(seen) == 1
    assert seen[0].status_code == 502


def test_async_consumer_flush_close_and_context_manager(server: MixpanelServer) -> None:
    with BackgroundConsumer(api_host=server.url, credentials=credentials()) as background:
        for index in range(5):
            assert background.send("event", event(f"user-{index}"))
        background.send("import", old_event())
        assert background.flush(10) is True
        assert len(server.events) == 5
        background.send("group_update", group())
    assert len(server.group_updates) == 1
    assert len(server.imports) == 1


def test_a_sink_takes_the_official_packages_call_and_works_as_a_context_manager() -> None:
    received: list[tuple[str, dict[str, Any]]] = []
    with CallableSink(lambda kind, message: received.append((kind, message))) as sink:
        sink.send("imports", '{"event": "E", "properties": {"time": 1}}', ("key", "secret"))
    assert received == [("import", {"event": "E", "properties": {"time": 1}})]


def test_hand_written_updates_must_be_mappings() -> None:
    tracker = Tracker(TOKEN, lambda kind, message: None)
    with pytest.raises(InvalidMessageError, match="message: must be a mapping"):
        tracker.people.update(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidMessageError, match="message: must be a mapping"):
        tracker.groups.update([])  # type: ignore[arg-type]

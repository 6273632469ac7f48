"""BackgroundConsumer under server faults, over real HTTP (``MixpanelServer`` fault injection).

The invariant checked throughout: every message is delivered exactly once per ``$insert_id``
(profile and group updates, which have no ``$insert_id``, exactly once) or counted under its
drop reason and reported to ``on_error`` — ``sent + dropped == total``, nothing in both.
Backoff is shrunk to milliseconds so the suite stays fast; the schedule itself is checked with a
virtual clock in ``test_async_backoff.py``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import Errors, event_record, wait_until

from mp_logbridge.consumers import BackgroundConsumer
from mp_logbridge.errors import MixpanelServerError, PartialImportError, RejectedError
from mp_logbridge.testing import MixpanelServer

TOKEN = "test-token"
SECRET = "import-secret"
FAST_RETRY = {
    "initial_backoff": 0.01,
    "max_backoff": 0.05,
    "jitter": (0, 0.01),
    "max_retry_after": 0.05,
}


# --------------------------------------------------------------------------- helpers


def event(key: str, **props: Any) -> dict[str, Any]:
    return event_record(key, "Fault Test", token=TOKEN, **props)


def profile(key: str) -> dict[str, Any]:
    return {"$token": TOKEN, "$distinct_id": key, "$set": {"plan": "pro"}}


def group(key: str) -> dict[str, Any]:
    return {"$token": TOKEN, "$group_key": "company", "$group_id": key, "$set": {"size": 3}}


def key_of(record: dict[str, Any]) -> str:
    """What identifies a record: ``$insert_id`` for events, the profile or group id otherwise."""
    if "properties" in record:
        return str(record["properties"]["$insert_id"])
    return str(record.get("$distinct_id", record.get("$group_id")))


def mixed_messages(per_kind: int) -> list[tuple[str, dict[str, Any]]]:
    """Events, profile updates, group updates and imports, each with a unique key."""
    old = int(time.time()) - 10 * 86400
    messages: list[tuple[str, dict[str, Any]]] = []
    for n in range(per_kind):
        messages.append(("event", event(f"ev-{n}")))
        messages.append(("profile_update", profile(f"pr-{n}")))
        messages.append(("group_update", group(f"gr-{n}")))
        messages.append(("import", event(f"im-{n}", time=old)))
    return messages


def delivered(server: MixpanelServer) -> Counter[str]:
    records = server.events + server.profile_updates + server.group_updates + server.imports
    return Counter(key_of(record) for record in records)


def dropped_keys(errors: Errors) -> Counter[str]:
    """The keys of the records reported to ``on_error``, with how often each was reported."""
    return Counter(key_of(record) for record in errors.records())


def check_accounting(
    server: MixpanelServer,
    consumer: BackgroundConsumer,
    errors: Errors,
    messages: list[tuple[str, dict[str, Any]]],
    *,
    duplicates_possible: bool = False,
) -> None:
    """Every message delivered once or dropped (and reported) once; the counters agree."""
    everything = {key_of(record) for _kind, record in messages}
    arrived = delivered(server)
    dropped = dropped_keys(errors)
    assert set(arrived) | set(dropped) == everything
    assert not set(arrived) & set(dropped)
    assert all(count == 1 for count in dropped.values())
    if not duplicates_possible:
        assert all(count == 1 for count in arrived.values()), arrived.most_common(3)
    stats = consumer.stats()
    assert stats["sent"] + stats["dropped_total"] == len(messages)
    assert stats["dropped_total"] == len(dropped)
    assert stats["queue_depth"] == 0


@pytest.fixture
def server() -> Iterator[MixpanelServer]:
    with MixpanelServer(api_secret=SECRET) as running:
        yield running


@pytest.fixture
def consumer_defaults() -> dict[str, Any]:
    """``consumers`` retries fast here and holds the import secret."""
    return {"retry": FAST_RETRY, "api_secret": SECRET}


# --------------------------------------------------------------------------- the fault matrix


def _slow(server: MixpanelServer) -> None:
    server.delay_next(2, 1.0)


FAULTS: dict[str, Callable[[MixpanelServer], None]] = {
    "500": lambda s: s.fail_next(3, 500),
    "502": lambda s: s.fail_next(2, 502),
    "503": lambda s: s.fail_next(3, 503),
    "503 Retry-After seconds": lambda s: s.fail_next(2, 503, retry_after=30),
    "503 Retry-After date": lambda s: s.fail_next(
        2, 503, retry_after="Wed, 21 Oct 2015 07:28:00 GMT"
    ),
    "429": lambda s: s.fail_next(3, 429),
    "429 Retry-After": lambda s: s.fail_next(2, 429, retry_after=2),
    "408": lambda s: s.fail_next(2, 408),
    "dropped connections": lambda s: s.drop_next(3),
    "mixed": lambda s: (
        s.fail_next(1, 500),
        s.drop_next(1),
        s.fail_next(1, 429, retry_after=5),
        s.fail_next(1, 503),
    ),
    "slow server beyond request_timeout": _slow,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_matrix_delivers_everything_once(server, consumers, fault):
    errors = Errors()
    slow = FAULTS[fault] is _slow
    consumer = consumers(
        api_host=server.url,
        batch_size=5,
        on_error=errors,
        request_timeout=0.3 if slow else 10.0,
    )
    messages = mixed_messages(10)
    FAULTS[fault](server)
    for kind, record in messages:
        assert consumer.send(kind, record)
    assert consumer.flush(15)

    # A timed-out request may still be processed by the server: Mixpanel de-duplicates events on
    # $insert_id, so there only distinct ids count.
    check_accounting(server, consumer, errors, messages, duplicates_possible=slow)
    stats = consumer.stats()
    assert stats["dropped_total"] == 0
    assert stats["retries"] >= (2 if not slow else 1)
    failed_requests = [r for r in server.requests if r.status != 200]
    if not slow:
        assert len(failed_requests) == stats["retries"]


def test_failures_and_exhausted_retries_partition_the_messages(server, consumers):
    errors = Errors()
    consumer = consumers(
        api_host=server.url,
        batch_size=5,
        on_error=errors,
        retry={**FAST_RETRY, "max_attempts": 2},
        max_in_flight=1,  # one batch at a time: the two failures hit the same batch
    )
    messages = mixed_messages(10)
    server.fail_next(2, 503, endpoint="/groups")  # the first /groups batch is given up
    server.fail_next(1, 500, endpoint="/track")  # the first /track batch goes through
    for kind, record in messages:
        consumer.send(kind, record)
    assert consumer.flush(15) is False

    check_accounting(server, consumer, errors, messages)
    stats = consumer.stats()
    assert 0 < stats["dropped"]["retries_exhausted"] == stats["dropped_total"] <= 5
    assert all(key.startswith("gr-") for key in dropped_keys(errors))
    assert all(isinstance(exc, MixpanelServerError) for exc, _ in errors.calls)
    assert stats["retries"] == 2


# --------------------------------------------------------------------------- 413: split


def test_413_splits_batches_until_they_fit(consumers):
    limit = 3_000
    with MixpanelServer(max_request_bytes=limit, api_secret=SECRET) as small:
        errors = Errors()
        consumer = consumers(api_host=small.url, batch_size=100, on_error=errors)
        messages = [("event", event(f"ev-{n}", padding="p" * 100)) for n in range(40)]
        messages += [("profile_update", profile(f"pr-{n}-" + "q" * 80)) for n in range(40)]
        for kind, record in messages:
            consumer.send(kind, record)
        assert consumer.flush(15)

        check_accounting(small, consumer, errors, messages)
        requests = small.requests
        assert any(r.status == 413 for r in requests)
        assert all(len(r.body) <= limit for r in requests if r.status == 200)
        assert {r.path for r in requests if r.status == 413} == {"/track", "/engage"}
        assert consumer.stats()["retries"] == 0  # a split is not a retry


def test_413_on_a_single_record_drops_it_alone(consumers):
    with MixpanelServer(max_request_bytes=3_000) as small:
        errors = Errors()
        consumer = consumers(api_host=small.url, batch_size=100, on_error=errors)
        messages = [("event", event(f"ev-{n}")) for n in range(6)]
        messages.insert(3, ("event", event("huge", padding="p" * 4_000)))
        for kind, record in messages:
            consumer.send(kind, record)
        assert consumer.flush(15) is False

        check_accounting(small, consumer, errors, messages)
        assert consumer.stats()["dropped"]["too_large"] == 1
        assert set(dropped_keys(errors)) == {"huge"}


# --------------------------------------------------------------------------- strict /import


@pytest.mark.allow_spec_violations("record.")  # refused records on purpose
def test_strict_import_partial_failure_drops_exactly_the_failed_records(server, consumers):
    errors = Errors()
    consumer = consumers(api_host=server.url, batch_size=50, on_error=errors)
    old = int(time.time()) - 10 * 86400
    bad_keys = {"im-2", "im-5", "im-9"}
    messages = [
        ("import", event(f"im-{n}", time=1000 if f"im-{n}" in bad_keys else old)) for n in range(12)
    ]
    for kind, record in messages:
        consumer.send(kind, record)
    assert consumer.flush(15) is False

    check_accounting(server, consumer, errors, messages)
    assert set(dropped_keys(errors)) == bad_keys
    assert all(isinstance(exc, PartialImportError) for exc, _ in errors.calls)
    reported = {item["insert_id"] for exc, _ in errors.calls for item in exc.failed_records}
    assert reported == bad_keys
    assert consumer.stats()["dropped"]["rejected_by_server"] == 3
    # Nothing was re-sent: every record went out in exactly one request.
    posted = Counter(key_of(r) for q in server.requests if q.path == "/import" for r in q.records)
    assert posted == Counter(key_of(record) for _kind, record in messages)


@pytest.mark.allow_spec_violations("record.")  # refused records on purpose
def test_partial_import_then_retryable_failure_sends_nothing_twice(server, consumers):
    errors = Errors()
    consumer = consumers(api_host=server.url, batch_size=5, on_error=errors)
    old = int(time.time()) - 10 * 86400
    messages = [("import", event(f"im-{n}", time=1000 if n == 1 else old)) for n in range(10)]
    messages += [("profile_update", profile(f"pr-{n}")) for n in range(10)]
    server.fail_next(1, 503, endpoint="/engage")
    server.drop_next(1, endpoint="/import")
    for kind, record in messages:
        consumer.send(kind, record)
    assert consumer.flush(15) is False

    check_accounting(server, consumer, errors, messages)
    assert set(dropped_keys(errors)) == {"im-1"}


# --------------------------------------------------------------------------- what is not retried


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422, 501])
def test_other_client_errors_are_never_retried(server, consumers, status):
    errors = Errors()
    # One batch of three, sent when full (no flush: a flush could catch the lane at one or two).
    consumer = consumers(api_host=server.url, on_error=errors, batch_size=3, flush_interval=60)
    server.fail_next(1, status, endpoint="/track")
    messages = [("event", event(f"ev-{n}")) for n in range(3)]
    for kind, record in messages:
        consumer.send(kind, record)
    wait_until(lambda: consumer.stats()["dropped_total"] == 3)

    assert len(server.requests) == 1
    stats = consumer.stats()
    assert stats["retries"] == 0
    assert stats["dropped"]["rejected_by_server"] == 3
    [(exc, records)] = errors.calls
    assert exc.status_code == status and not exc.retryable
    assert [key_of(r) for r in records] == ["ev-0", "ev-1", "ev-2"]


def test_retries_exhausted_after_max_attempts(server, consumers):
    errors = Errors()
    consumer = consumers(
        api_host=server.url,
        on_error=errors,
        batch_size=2,
        flush_interval=60,
        retry={**FAST_RETRY, "max_attempts": 3},
    )
    server.fail_next(10, 503, endpoint="/track")
    consumer.send("event", event("ev-0"))
    consumer.send("event", event("ev-1"))
    wait_until(lambda: consumer.stats()["dropped_total"] == 2)
    assert consumer.flush(10) is False

    assert [r.status for r in server.requests] == [503, 503, 503]
    stats = consumer.stats()
    assert stats["dropped"]["retries_exhausted"] == 2
    assert stats["retries"] == 2
    [(exc, records)] = errors.calls
    assert isinstance(exc, MixpanelServerError) and exc.status_code == 503
    assert [key_of(r) for r in records] == ["ev-0", "ev-1"]


def test_retries_stop_after_max_elapsed(server, consumers):
    errors = Errors()
    retry = {**FAST_RETRY, "max_attempts": 10_000, "max_elapsed": 0.3}
    consumer = consumers(api_host=server.url, on_error=errors, retry=retry)
    server.fail_next(10_000, 503, endpoint="/track")
    consumer.send("event", event("ev-0"))
    assert consumer.flush(10) is False

    attempts = len(server.requests)
    assert 1 < attempts < 10_000
    stats = consumer.stats()
    assert stats["dropped"]["retries_exhausted"] == 1
    assert stats["retries"] == attempts - 1


def test_retryable_rejection_is_refused_by_a_non_retryable_status(server, consumers):
    """A 400 after a 503 ends the retries: the batch is refused for good, not retried again."""
    errors = Errors()
    consumer = consumers(api_host=server.url, on_error=errors)
    server.fail_next(1, 503, endpoint="/track")
    server.fail_next(1, 400, endpoint="/track")
    consumer.send("event", event("ev-0"))
    assert consumer.flush(10) is False
    assert [r.status for r in server.requests] == [503, 400]
    [(exc, _records)] = errors.calls
    assert isinstance(exc, RejectedError)


# --------------------------------------------------------------------------- isolation, interrupts


def test_other_endpoints_flow_while_one_backs_off(server, consumers):
    consumer = consumers(
        api_host=server.url,
        flush_interval=0.05,
        retry={"initial_backoff": 60, "jitter": (0, 0)},
    )
    server.fail_next(1, 503, endpoint="/engage")
    consumer.send("profile_update", profile("pr-0"))
    wait_until(lambda: consumer.stats()["retries"] == 1)  # /engage now waits a minute

    for n in range(10):
        assert consumer.send("event", event(f"ev-{n}"))
    server.wait_for(10)  # /track is not held up (no flush call)
    wait_until(lambda: consumer.stats()["sent"] == 10)
    assert server.profile_updates == []
    assert consumer.stats()["queue_depth"] == 1

    assert consumer.flush(10)  # interrupts the backoff
    assert [key_of(r) for r in server.profile_updates] == ["pr-0"]
    assert Counter(key_of(r) for r in server.events) == Counter(f"ev-{n}" for n in range(10))


def test_flush_interrupts_a_long_backoff(server, consumers):
    consumer = consumers(api_host=server.url, flush_interval=0.05, retry={"initial_backoff": 60})
    server.fail_next(2, 503, endpoint="/track")
    consumer.send("event", event("ev-0"))
    wait_until(lambda: consumer.stats()["retries"] == 1)

    assert consumer.flush(0.5) is False  # retried at once, failed again, backing off again
    assert consumer.flush(10) is True  # retried at once, delivered
    assert [r.status for r in server.requests] == [503, 503, 200]
    assert [key_of(r) for r in server.events] == ["ev-0"]


@pytest.mark.parametrize("down", [False, True], ids=["503", "server down"])
def test_close_interrupts_a_long_backoff(server, consumers, down_url, down):
    errors = Errors()
    host = down_url if down else server.url
    consumer = consumers(
        api_host=host, on_error=errors, flush_interval=0.05, retry={"initial_backoff": 60}
    )
    server.fail_next(100, 503)
    consumer.send("event", event("ev-0"))
    consumer.send("profile_update", profile("pr-0"))
    wait_until(lambda: consumer.stats()["retries"] == 2)

    started = time.monotonic()
    consumer.close(timeout=1)
    assert time.monotonic() - started < 5  # hang guard: a minute of backoff was pending

    stats = consumer.stats()
    assert stats["dropped"]["shutdown_timeout"] == 2
    assert stats["sent"] == 0 and stats["queue_depth"] == 0
    assert set(dropped_keys(errors)) == {"ev-0", "pr-0"}


def test_a_recovered_error_is_not_blamed_for_later_losses(server, consumers) -> None:
    """After a retry succeeds, messages lost at the close deadline are reported as not
    delivered in time, not with the error the lane has since recovered from."""
    reported: list[BaseException] = []
    consumer = consumers(
        api_host=server.url, on_error=lambda exc, messages: reported.append(exc), flush_interval=60
    )
    server.fail_next(1, 503, endpoint="/engage")
    consumer.send("profile_update", profile("p-1"))
    assert consumer.flush(10)  # retried (fast policy) and delivered
    consumer.send("profile_update", profile("p-2"))  # waits for its batch (flush_interval=60)
    consumer.close(timeout=0)  # the deadline has passed before anything is attempted
    assert [type(exc).__name__ for exc in reported] == ["MessagesDropped"]
    assert "close deadline" in str(reported[0])
    assert consumer.stats()["dropped"]["shutdown_timeout"] == 1

"""The retry schedule: BackgroundConsumer on a virtual clock, and RetryPolicy/parse_retry_after as pure code.

``VirtualClock`` stands in for the consumer's clock: ``monotonic()`` is virtual time and
``wait(condition, timeout)`` records the timeout, waits for real only a millisecond (so
notifications still get through) and then moves virtual time forward by the whole timeout. A
schedule of minutes therefore runs in milliseconds, and the recorded waits *are* the schedule.
The server is real; only time is not.
"""

from __future__ import annotations

import email.utils
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import event_record, wait_until

from mp_logbridge import ConfigurationError
from mp_logbridge._transport import parse_retry_after
from mp_logbridge.consumers import BackgroundConsumer, RetryPolicy
from mp_logbridge.testing import MixpanelServer

TOKEN = "test-token"
SEED = 20240229
#: Mixpanel's guidance, which RetryPolicy's defaults follow: 2 s doubling up to 60 s ...
DEFAULT_BACKOFFS = [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0, 60.0]
#: ... plus 1-5 s of jitter.
DEFAULT_JITTER = (1.0, 5.0)


class VirtualClock:
    """A clock for BackgroundConsumer whose waits take (almost) no real time.

    With ``manual=True`` a finite wait does not end until :meth:`step` is called (or, as a real
    wait would, early on a notification, with no virtual time passing), so a test can act while
    the sender is known to be asleep at a given virtual time.
    """

    def __init__(self, start: float = 1000.0, *, manual: bool = False) -> None:
        self.now = start
        self.manual = manual
        self.waits: list[float | None] = []
        self._steps = threading.Semaphore(0)

    def monotonic(self) -> float:
        return self.now

    def wait(self, wakeup: threading.Lock, timeout: float | None) -> None:
        self.waits.append(timeout)
        if timeout is None:  # idle until woken: a real wait
            wakeup.acquire(timeout=0.5)
            return
        if self.manual:
            while self.manual and not self._steps.acquire(blocking=False):
                if wakeup.acquire(timeout=0.002):
                    return  # woken (a flush, a close): early, no time passed
        else:
            wakeup.acquire(timeout=0.001)
        self.now += timeout

    def step(self) -> None:
        """Let one manual wait end."""
        self._steps.release()

    def delays(self) -> list[float]:
        """The finite waits (ignoring float round-off crumbs below a microsecond)."""
        return [w for w in self.waits if w is not None and w > 1e-6]


def event(n: int) -> dict[str, Any]:
    return event_record(f"ins-{n}", "Backoff Test", token=TOKEN)


def jitters(
    count: int, low: float = DEFAULT_JITTER[0], high: float = DEFAULT_JITTER[1]
) -> list[float]:
    """The jitter the consumer draws from ``random.Random(SEED)``, one per retry."""
    rng = random.Random(SEED)
    return [rng.uniform(low, high) for _ in range(count)]


@pytest.fixture
def make_consumer(
    consumers: Callable[..., BackgroundConsumer],
) -> Iterator[Callable[..., tuple[BackgroundConsumer, VirtualClock]]]:
    """AsyncConsumers on a virtual clock with seeded jitter (clocks let go after the test)."""
    clocks: list[VirtualClock] = []

    def make(
        clock: VirtualClock | None = None, **options: Any
    ) -> tuple[BackgroundConsumer, VirtualClock]:
        clock = clock or VirtualClock()
        options.setdefault("batch_size", 1)  # every message is due at once: only retries wait
        clocks.append(clock)
        return consumers(clock=clock, rng=random.Random(SEED), **options), clock

    yield make
    for clock in clocks:  # before ``consumers`` closes the consumers: no manual wait holds them
        clock.manual = False


def deliver_one(consumer: BackgroundConsumer, server: MixpanelServer) -> None:
    """Send one event and wait (for real, no flush: a flush would cut the backoff short)."""
    assert consumer.send("event", event(0))
    server.wait_for(1, timeout=20)
    wait_until(lambda: consumer.stats()["sent"] == 1)


# --------------------------------------------------------------------------- on a virtual clock


def test_backoff_schedule_follows_the_defaults(server, make_consumer):
    consumer, clock = make_consumer(api_host=server.url)
    server.fail_next(7, 503, endpoint="/track")
    deliver_one(consumer, server)

    expected = [base + j for base, j in zip(DEFAULT_BACKOFFS[:7], jitters(7), strict=True)]
    assert clock.delays() == pytest.approx(expected)
    assert [r.status for r in server.requests] == [503] * 7 + [200]
    assert consumer.stats()["retries"] == 7
    # 2 s doubling to 60 s with 1-5 s of jitter: about four minutes of virtual time.
    assert 2 + 4 + 8 + 16 + 32 + 60 + 60 + 7 <= sum(clock.delays()) <= 182 + 35


def test_retry_after_is_a_lower_bound_clamped_to_max_retry_after(server, make_consumer):
    consumer, clock = make_consumer(api_host=server.url)
    server.fail_next(1, 503, retry_after=30)  # above the backoff: waits 30 s
    server.fail_next(1, 503, retry_after=3600)  # above max_retry_after: clamped to 60 s
    server.fail_next(1, 429, retry_after=1)  # below the backoff: the backoff wins
    server.fail_next(1, 503)
    deliver_one(consumer, server)

    j = jitters(4)
    assert clock.delays() == pytest.approx([30.0, 60.0, 8.0 + j[2], 16.0 + j[3]])


def test_custom_policy_and_max_retry_after(server, make_consumer):
    policy = RetryPolicy(
        initial_backoff=0.5, max_backoff=3.0, jitter=(0.0, 0.25), max_retry_after=10
    )
    consumer, clock = make_consumer(api_host=server.url, retry=policy)
    server.fail_next(4, 503)
    server.fail_next(1, 503, retry_after=120)
    deliver_one(consumer, server)

    j = jitters(5, 0.0, 0.25)
    expected = [0.5 + j[0], 1.0 + j[1], 2.0 + j[2], 3.0 + j[3], 10.0]
    assert clock.delays() == pytest.approx(expected)


def test_gives_up_after_max_attempts(server, make_consumer):
    errors: list[BaseException] = []
    consumer, clock = make_consumer(
        api_host=server.url,
        retry={"max_attempts": 4},
        on_error=lambda exc, records: errors.append(exc),
    )
    server.fail_next(100, 503)
    consumer.send("event", event(0))
    wait_until(lambda: consumer.stats()["dropped_total"] == 1)

    expected = [base + j for base, j in zip(DEFAULT_BACKOFFS[:3], jitters(3), strict=True)]
    assert clock.delays() == pytest.approx(expected)
    assert len(server.requests) == 4
    assert consumer.stats()["dropped"]["retries_exhausted"] == 1
    assert len(errors) == 1 and errors[0].status_code == 503


def test_gives_up_when_the_next_wait_would_pass_max_elapsed(server, make_consumer):
    max_elapsed = 40.0
    consumer, clock = make_consumer(api_host=server.url, retry={"max_elapsed": max_elapsed})
    server.fail_next(100, 503)
    consumer.send("event", event(0))
    wait_until(lambda: consumer.stats()["dropped_total"] == 1)

    # Retry while the time since the first attempt plus the next wait stays within 40 s.
    expected: list[float] = []
    for base, j in zip(DEFAULT_BACKOFFS, jitters(len(DEFAULT_BACKOFFS)), strict=True):
        if sum(expected) + base + j > max_elapsed:
            break
        expected.append(base + j)
    assert clock.delays() == pytest.approx(expected)
    assert len(server.requests) == len(expected) + 1
    assert sum(clock.delays()) <= max_elapsed
    assert consumer.stats()["dropped"]["retries_exhausted"] == 1


def test_sender_sleeps_until_flush_interval_without_polling(server, make_consumer):
    consumer, clock = make_consumer(api_host=server.url, batch_size=500, flush_interval=7.5)
    consumer.send("event", event(0))
    server.wait_for(1, timeout=10)
    assert clock.delays() == pytest.approx([7.5])  # one wait for the deadline, no polling


def test_flush_interval_runs_from_when_a_message_was_queued(server, make_consumer):
    """A message queued while the sender sleeps is due flush_interval after it was queued."""
    clock = VirtualClock(manual=True)
    arrived: dict[str, float] = {}
    server.on_record = lambda kind, record: arrived.setdefault(kind, clock.monotonic())
    consumer, _ = make_consumer(clock, api_host=server.url, batch_size=500, flush_interval=5.0)

    queued = clock.monotonic()
    consumer.send("event", event(0))
    wait_until(lambda: 5.0 in clock.waits)  # the sender sleeps until queued + 5
    consumer.send("profile_update", {"$token": TOKEN, "$distinct_id": "u", "$set": {"a": 1}})
    clock.step()
    server.wait_for(2, kind="all", timeout=10)

    assert arrived == {"events": queued + 5.0, "profile_updates": queued + 5.0}


def test_a_full_batch_wakes_the_sender_before_the_deadline(server, make_consumer):
    """batch_size counts what a lane holds plus what is queued, not just the latter."""
    clock = VirtualClock(manual=True)
    consumer, _ = make_consumer(clock, api_host=server.url, batch_size=3, flush_interval=60.0)
    consumer.send("event", event(0))
    wait_until(lambda: 60.0 in clock.waits)  # one in the lane; asleep until the deadline
    started = clock.monotonic()
    consumer.send("event", event(1))
    consumer.send("event", event(2))

    server.wait_for(3, timeout=10)
    assert clock.monotonic() == started  # sent without waiting for flush_interval
    assert [len(r.records) for r in server.requests] == [3]


def test_flush_cuts_a_backoff_short(server, make_consumer):
    consumer, clock = make_consumer(clock=VirtualClock(manual=True), api_host=server.url)
    server.fail_next(1, 503)
    consumer.send("event", event(0))
    wait_until(lambda: clock.delays())  # backing off: about 3-7 s of virtual time
    started = clock.monotonic()

    assert consumer.flush(10)
    assert clock.monotonic() == started  # delivered without the backoff running out
    assert [r.status for r in server.requests] == [503, 200]


# --------------------------------------------------------------------------- RetryPolicy, pure


def low(a: float, b: float) -> float:
    return a


def high(a: float, b: float) -> float:
    return b


def test_delay_doubles_to_max_backoff_plus_jitter():
    policy = RetryPolicy()
    assert [policy.delay(n, rng=low) for n in range(1, 10)] == [b + 1.0 for b in DEFAULT_BACKOFFS]
    assert [policy.delay(n, rng=high) for n in range(1, 4)] == [7.0, 9.0, 13.0]
    assert policy.delay(0, rng=low) == 3.0  # never below the first step


def test_delay_draws_jitter_from_the_given_range():
    policy = RetryPolicy(initial_backoff=1, jitter=(0.5, 0.75))
    rng = random.Random(3)
    for n in range(1, 50):
        wait = policy.delay(1, rng=rng.uniform)
        assert 1.5 <= wait <= 1.75, n
    calls: list[tuple[float, float]] = []
    policy.delay(1, rng=lambda a, b: calls.append((a, b)) or a)
    assert calls == [(0.5, 0.75)]


def test_delay_survives_huge_retry_numbers():
    assert RetryPolicy().delay(5000, rng=low) == 61.0
    assert RetryPolicy(initial_backoff=0, jitter=(0, 0)).delay(3000) == 0.0


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        (None, 3.0),  # no header: the backoff
        (0.0, 3.0),  # a lower bound only
        (2.5, 3.0),
        (30.0, 30.0),
        (60.0, 60.0),
        (3600.0, 60.0),  # clamped to max_retry_after
    ],
)
def test_delay_honours_retry_after_as_clamped_lower_bound(retry_after, expected):
    assert RetryPolicy().delay(1, retry_after, rng=low) == expected


def test_retry_after_clamp_is_configurable():
    assert RetryPolicy(max_retry_after=5).delay(1, 3600, rng=low) == 5.0
    assert RetryPolicy(max_retry_after=0).delay(1, 3600, rng=low) == 3.0


def test_gives_up_on_attempts_or_elapsed_time():
    policy = RetryPolicy(max_attempts=3, max_elapsed=100)
    assert not policy.gives_up(1, 0, 3)
    assert not policy.gives_up(2, 50, 50)  # exactly at the limit still retries
    assert policy.gives_up(3, 0, 3)
    assert policy.gives_up(2, 50, 50.5)
    assert RetryPolicy(max_attempts=1).gives_up(1, 0, 0)


def test_default_policy_values():
    policy = RetryPolicy()
    assert (policy.initial_backoff, policy.max_backoff, policy.jitter) == (2.0, 60.0, (1.0, 5.0))
    assert (policy.max_attempts, policy.max_elapsed, policy.max_retry_after) == (10, 600.0, 60.0)


def test_from_options_accepts_mappings_lists_and_policies():
    policy = RetryPolicy.from_options({"initial_backoff": 1, "jitter": [0, 2]})
    assert policy == RetryPolicy(initial_backoff=1, jitter=(0, 2))
    assert RetryPolicy.from_options(None) == RetryPolicy()
    assert RetryPolicy.from_options(policy) is policy


@pytest.mark.parametrize(
    "options",
    [
        {"max_attempts": 0},
        {"initial_backoff": -1},
        {"jitter": (5, 1)},
        {"jitter": (1,)},
        {"max_elapsed": -0.5},
        {"max_retry_after": -1},
        {"no_such_option": 1},
    ],
)
def test_from_options_refuses_bad_values(options):
    with pytest.raises(ConfigurationError):
        RetryPolicy.from_options(options)


def test_consumer_refuses_a_bad_retry_option():
    with pytest.raises(ConfigurationError):
        BackgroundConsumer(api_host="http://127.0.0.1:9", retry={"max_attempts": 0})


# --------------------------------------------------------------------------- parse_retry_after


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("30", 30.0),
        (" 2.5 ", 2.5),
        ("0", 0.0),
        ("-5", 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
    ],
)
def test_parse_retry_after_seconds(header, expected):
    assert parse_retry_after(header) == expected


def test_parse_retry_after_http_date():
    now = 1_700_000_000.0
    later = email.utils.formatdate(now + 120, usegmt=True)
    earlier = email.utils.formatdate(now - 120, usegmt=True)
    assert parse_retry_after(later, now=now) == pytest.approx(120.0)
    assert parse_retry_after(earlier, now=now) == 0.0
    assert parse_retry_after("Sun, 99 Foo 2024 99:99:99 GMT", now=now) is None

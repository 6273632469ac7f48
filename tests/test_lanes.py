"""Per-endpoint scheduling without threads: the Lane is plain data driven by a clock value."""

from __future__ import annotations

import pytest

from mp_logbridge._errors import MixpanelServerError
from mp_logbridge._lanes import INF, Lane


def _due(lane: Lane, *, urgent: bool = False, gen: int = 0, size: int = 3) -> float:
    return lane.due(
        urgent=urgent,
        urgent_gen=gen,
        batch_size=size,
        max_batch_bytes=1_000_000,
        flush_interval=1.0,
    )


def _record(n: int) -> bytes:
    return b'{"n":%d}' % n


def test_a_lane_waits_for_the_interval_or_a_full_batch() -> None:
    lane = Lane("event")
    assert _due(lane) == INF  # nothing to send
    lane.add(_record(0), arrived=10.0)
    assert _due(lane) == 11.0  # oldest + flush_interval
    lane.add(_record(1), arrived=10.5)
    assert _due(lane) == 11.0  # still the oldest's
    lane.add(_record(2), arrived=10.6)
    assert _due(lane) == -INF  # a full batch goes now
    assert _due(Lane("event"), urgent=True) == INF  # urgent, but empty


def test_batches_go_in_order_with_their_positions() -> None:
    lane = Lane("event", max_in_flight=2)
    for n in range(7):
        lane.add(_record(n), arrived=0.0)
    first = lane.take(0.0, 3, 1_000_000)
    second = lane.take(0.0, 3, 1_000_000)
    assert (first.start, second.start) == (0, 3)
    assert [len(first.records), len(second.records)] == [3, 3]
    assert _due(lane, urgent=True) == INF  # max_in_flight reached
    assert lane.first_unresolved() == 0
    # The second finishes first: the first still holds the lane's front.
    lane.landed(second)
    lane.resolve(second.records)
    assert lane.first_unresolved() == 0
    lane.landed(first)
    lane.resolve(first.records)
    assert lane.first_unresolved() == 6  # the seventh is still queued
    third = lane.take(0.0, 3, 1_000_000)
    assert third.start == 6 and len(third.records) == 1


def test_a_retry_waits_its_backoff_and_blocks_new_batches() -> None:
    lane = Lane("event", max_in_flight=2)
    for n in range(6):
        lane.add(_record(n), arrived=0.0)
    flight = lane.take(0.0, 3, 1_000_000)
    lane.landed(flight)
    error = MixpanelServerError("503", retryable=True)
    lane.schedule_retry(flight, flight.records, at=5.0, error=error, gen=0)
    assert _due(lane) == 5.0  # the full batch behind it waits too
    assert _due(lane, gen=1) == -INF  # a flush since the backoff began cuts it short, once
    again = lane.take(1.0, 3, 1_000_000)
    assert again is flight and again.start == 0
    assert lane.first_unresolved() == 0


def test_retry_after_is_not_cut_short_by_a_flush() -> None:
    lane = Lane("event")
    lane.add(_record(0), arrived=0.0)
    flight = lane.take(0.0, 3, 1_000_000)
    lane.landed(flight)
    error = MixpanelServerError("429", retryable=True, retry_after=30.0)
    lane.schedule_retry(flight, flight.records, at=30.0, error=error, gen=0)
    assert _due(lane, gen=5, urgent=True) == 30.0


def test_a_split_keeps_positions_and_goes_first() -> None:
    lane = Lane("event")
    for n in range(5):
        lane.add(_record(n), arrived=0.0)
    flight = lane.take(0.0, 4, 1_000_000)
    lane.landed(flight)
    lane.split(flight, [flight.records[:2], flight.records[2:]])
    assert _due(lane) == -INF
    first = lane.take(0.0, 4, 1_000_000)
    assert (first.start, first.records) == (0, [_record(0), _record(1)])
    lane.landed(first)
    lane.resolve(first.records)
    assert lane.first_unresolved() == 2
    second = lane.take(0.0, 4, 1_000_000)
    assert (second.start, len(second.records)) == (2, 2)


def test_evicting_the_oldest_counts_them_resolved() -> None:
    lane = Lane("event")
    for n in range(4):
        lane.add(_record(n), arrived=0.0)
    evicted = lane.evict_oldest(needed=len(_record(0)) + 1)
    assert evicted == [_record(0), _record(1)]
    assert lane.first_unresolved() == 2


@pytest.mark.parametrize("max_in_flight", [1, 2, 4])
def test_everything_taken_is_under_way_and_take_all_returns_the_rest(max_in_flight: int) -> None:
    lane = Lane("event", max_in_flight=max_in_flight)
    for n in range(10):
        lane.add(_record(n), arrived=0.0)
    taken = []
    while _due(lane, urgent=True) == -INF:
        taken.append(lane.take(0.0, 2, 1_000_000))
    assert len(taken) == max_in_flight
    retrying, rest = lane.take_all()
    assert retrying == []
    assert len(rest) == 10 - 2 * max_in_flight
    assert lane.unresolved  # the flights are still under way


@pytest.mark.parametrize("kind", ["profile_update", "group_update"])
def test_updates_go_one_request_at_a_time_whatever_the_setting(kind: str) -> None:
    """``$set`` then ``$unset`` must not swap: updates are applied in the order they came."""
    lane = Lane(kind, max_in_flight=4)
    for n in range(6):
        lane.add(_record(n), arrived=0.0)
    lane.take(0.0, 2, 1_000_000)
    assert _due(lane, urgent=True) == INF
    assert Lane("event", max_in_flight=4).max_in_flight == 4

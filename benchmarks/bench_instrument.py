"""Per-call cost of ``@instrument``: logger disabled, logger enabled, against baselines.

Subjects, all wrapping the same small function ``work(a, b=2)``:

* ``plain``: the undecorated function (the loop's own cost is in every figure);
* ``wrapt no-op``: a ``@wrapt.decorator`` that only calls through — the floor for any wrapt-based
  decorator;
* ``instrument, disabled``: ``@instrument`` whose logger is not enabled for INFO (the fast path:
  one level check, then the call);
* ``instrument, enabled``: ``@instrument`` whose logger has a ``MixpanelHandler`` sending to the
  fast receiver running in a child process (the caller pays for timing, building the tagged
  record and queueing it; delivery happens on the sender thread);
* ``instrument, enabled + capture``: the same with ``distinct_id`` and ``capture_args`` read from
  the bound arguments;
* ``instrument, enabled, NullHandler``: the logger is enabled but only has a ``NullHandler`` — the
  decorator's own share of the enabled cost (timing, properties, the LogRecord);
* ``tagged log.info``: the hand-written equivalent, ``log.info(..., extra=tag.track(...))`` on the
  Mixpanel handler's logger — what the decorator adds over logging the event yourself.

Rounds are interleaved (every subject once per round, in a rotating order) and each subject's
fastest round is compared, which keeps the figures stable on a busy machine; the median round is
shown too. The handler is flushed between rounds, outside the timed loops, so its queue never
fills. Figures are ns per call and ratios between subjects of the same run.

Usage: ``python benchmarks/bench_instrument.py [--quick] [--rounds N] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
from collections.abc import Callable
from time import perf_counter_ns
from typing import Any

import wrapt
from _common import (
    ServerProcess,
    environment,
    print_environment,
    print_table,
    source_count,
    write_json,
)

from mp_logbridge import MixpanelHandler, instrument, tag

TOKEN = "bench-instrument"


def work(a: int, b: int = 2) -> int:
    return a + b


@wrapt.decorator
def noop(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    return wrapped(*args, **kwargs)


def user_work(user: str, a: int, b: int = 2) -> int:
    return a + b


def make_subjects(
    enabled: logging.Logger, disabled: logging.Logger, null: logging.Logger
) -> dict[str, tuple[Callable[[int], Any], bool]]:
    """name → (one call taking the loop index, whether it sends an event)."""
    plain = work
    wrapped = noop(work)
    off = instrument("Bench Call", logger=disabled)(work)

    def fixed_user(arguments: Any) -> str:
        return "bench-user"

    on = instrument("Bench Call", logger=enabled, distinct_id=fixed_user)(work)
    captured = instrument(
        "Bench Capture", logger=enabled, distinct_id="user", capture_args=["a", "b"]
    )(user_work)
    unsent = instrument("Bench Call", logger=null, distinct_id=fixed_user)(work)

    def tagged_log(i: int) -> int:
        enabled.info("Bench Call", extra=tag.track("Bench Call", distinct_id="bench-user"))
        return work(i)

    return {
        "plain": (plain, False),
        "wrapt no-op": (wrapped, False),
        "instrument, disabled": (off, False),
        "instrument, enabled, NullHandler": (unsent, False),
        "instrument, enabled": (on, True),
        "instrument, enabled + capture": (lambda i: captured("bench-user", i), True),
        "tagged log.info": (tagged_log, True),
    }


def timed_loop(call: Callable[[int], Any], count: int) -> int:
    """Nanoseconds for ``count`` calls ``call(i)``."""
    start = perf_counter_ns()
    for i in range(count):
        call(i)
    return perf_counter_ns() - start


def measure(
    subjects: dict[str, tuple[Callable[[int], Any], bool]],
    handler: MixpanelHandler,
    rounds: int,
    cheap_calls: int,
    sending_calls: int,
) -> tuple[dict[str, list[float]], int]:
    """ns/call of every subject in every round, and how many events were sent."""
    names = list(subjects)
    samples: dict[str, list[float]] = {name: [] for name in names}
    sent = 0
    for call, sends in subjects.values():  # warm up (and check every subject runs)
        call(0)
        sent += sends
    handler.flush(30)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            call, sends = subjects[name]
            count = sending_calls if sends else cheap_calls
            gc.collect()
            elapsed = timed_loop(call, count)
            samples[name].append(elapsed / count)
            if sends:
                sent += count
                handler.flush(30)
    return samples, sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls (~5 s)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 12, quick 5)")
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args(argv)
    rounds = options.rounds or (5 if options.quick else 12)
    cheap_calls = 20_000 if options.quick else 200_000
    # Well under the consumer's queue bound (10 000), so no round ever takes the drop path.
    sending_calls = 1_000 if options.quick else 4_000

    env = environment()
    print_environment(env)
    with ServerProcess() as server:
        handler = MixpanelHandler(TOKEN, api_host=server.url)
        enabled = logging.getLogger("bench.instrument.enabled")
        enabled.setLevel(logging.INFO)
        enabled.propagate = False
        enabled.addHandler(handler)
        disabled = logging.getLogger("bench.instrument.disabled")
        disabled.setLevel(logging.WARNING)
        disabled.propagate = False
        disabled.addHandler(handler)
        null = logging.getLogger("bench.instrument.null")
        null.setLevel(logging.INFO)
        null.propagate = False
        null.addHandler(logging.NullHandler())
        try:
            subjects = make_subjects(enabled, disabled, null)
            samples, sent = measure(subjects, handler, rounds, cheap_calls, sending_calls)
            delivered = handler.flush(30)
            arrived = source_count(server.wait(sent, 30, TOKEN), TOKEN)[0]
            stats = handler.stats()
        finally:
            enabled.removeHandler(handler)
            disabled.removeHandler(handler)
            handler.close()

    best = {name: min(values) for name, values in samples.items()}
    rows = []
    for name, values in samples.items():
        rows.append(
            {
                "subject": name,
                "fastest": best[name],
                "median": statistics.median(values),
                "overhead": best[name] - best["plain"],
                "vs_plain": best[name] / best["plain"],
                "vs_wrapt": best[name] / best["wrapt no-op"],
            }
        )
    print_table(
        f"ns per call, fastest of {rounds} interleaved rounds "
        f"({cheap_calls:,} calls per round, {sending_calls:,} for subjects that send)",
        [
            ("subject", "subject"),
            ("fastest", "fastest ns"),
            ("median", "median ns"),
            ("overhead", "over plain ns"),
            ("vs_plain", "x plain"),
            ("vs_wrapt", "x wrapt no-op"),
        ],
        rows,
    )
    disabled_extra = best["instrument, disabled"] - best["wrapt no-op"]
    enabled_extra = best["instrument, enabled"] - best["tagged log.info"]
    print(f"\ndisabled @instrument costs {disabled_extra:,.0f} ns/call more than a wrapt no-op")
    print(
        f"enabled @instrument costs {enabled_extra:,.0f} ns/call more than the tagged log.info "
        f"it replaces ({best['instrument, enabled'] / best['tagged log.info']:.2f}x)"
    )
    print(
        f"events sent {sent:,}, arrived {arrived:,}, flush complete: "
        f"{'yes' if delivered else 'no'}, dropped {stats.get('dropped_total', 0):,}"
    )
    write_json(
        options.json,
        {
            "environment": env,
            "rounds": rounds,
            "cheap_calls": cheap_calls,
            "sending_calls": sending_calls,
            "rows": rows,
            "samples_ns": samples,
            "events": {"sent": sent, "arrived": arrived, "stats": stats},
        },
    )
    return 0 if arrived >= sent else 1


if __name__ == "__main__":
    sys.exit(main())

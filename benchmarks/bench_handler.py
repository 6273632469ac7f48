"""What ``logger.info(...)`` costs the calling thread with ``MixpanelHandler`` attached.

The same call — untagged (``log.info("user signed up")``) and tagged (``extra=tag.track("Signed
Up", distinct_id="u1", plan="pro")``) — is timed on three loggers that differ only in their one
handler: a ``logging.NullHandler`` (the floor: what logging itself costs), a stdlib
``QueueHandler`` on a ``queue.SimpleQueue`` (the usual "do it in the background" answer), and a
``MixpanelHandler`` (as a user makes it: token and ``api_host``) delivering to the fast
receiver in a child process.

Rounds of the six cases are interleaved (A, B, C, ..., A, B, C, ...) so that drifts of the
machine hit every case alike, and each case is judged by its fastest round (the minimum of the
per-round means), the round least disturbed by the rest of the machine. Two clocks are read
around each round: wall time (what the application's thread experiences, including waiting for
the GIL while the handler's sender thread encodes and posts) and the calling thread's own CPU
time (``time.thread_time``: only what runs on the caller's thread). Between rounds (not timed)
the handler is flushed and the stdlib queue drained, so every round starts empty and the
records go through the real enqueue path, not the queue-full path. Rounds are 10 000 calls: in
a tight loop the caller enqueues tagged records faster than the sender builds and encodes them,
and 20 000 would overflow the default ``max_queue_size`` (10 000) within a round.

Then the tagged path is taken apart with a cProfile of the calling thread. ``--steps`` also
times each step of ``MixpanelHandler.handle`` on its own; that table, unlike everything else in
the benchmarks, reaches into the library's private helpers, and shows ``n/a`` for a step whose
helper moved.

``bench_consumers.py`` measures the same ratios for every client in one table; this script is
the handler's closer look.

Usage: ``python benchmarks/bench_handler.py [--quick] [--steps] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import logging.handlers
import pstats
import queue
import sys
import time
from collections.abc import Callable
from typing import Any

from _common import (
    TOKEN,
    ServerProcess,
    environment,
    min_median,
    print_environment,
    print_table,
    ratio,
    rotations,
    source_count,
    timed_loop,
    write_json,
)
from _subjects import MESSAGE, log_calls, make_logger

from mp_logbridge import MixpanelHandler, tag

ITEM = {"event": "Signed Up", "properties": {"distinct_id": "u1", "plan": "pro"}}


def tagged_extra() -> dict[str, Any]:
    return tag.track("Signed Up", distinct_id="u1", plan="pro")


# --------------------------------------------------------------------------- interleaved rounds


def keep_record(record: dict[str, Any]) -> dict[str, Any]:
    """The cheapest ``before_send``: what remains is the price of building at the call."""
    return record


def interleaved(server: ServerProcess, rounds: int, count: int) -> dict[str, Any]:
    handler = MixpanelHandler(token=TOKEN, api_host=server.url)
    hooked = MixpanelHandler(token=TOKEN, api_host=server.url, before_send=keep_record)
    simple_queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
    loggers = {
        "NullHandler": make_logger("bench.null", logging.NullHandler()),
        "QueueHandler": make_logger("bench.queue", logging.handlers.QueueHandler(simple_queue)),
        "MixpanelHandler": make_logger("bench.mixpanel", handler),
        # with a before_send hook: the record is built, checked and encoded at the call
        "MixpanelHandler+before_send": make_logger("bench.hooked", hooked),
    }
    cases: dict[tuple[str, str], Callable[[], None]] = {}
    for handler_name, logger in loggers.items():
        tagged, untagged = log_calls(logger)
        cases[handler_name, "untagged"] = untagged
        cases[handler_name, "tagged"] = tagged
    for call in cases.values():  # warm up: thread started, connection open, caches filled
        for _ in range(200):
            call()
    handler.flush(60)
    hooked.flush(60)
    server.clear()
    tagged_sent = 0
    walls: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
    cpus: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
    for _round, key in rotations(list(cases), rounds):
        wall_ns, cpu_ns = timed_loop(cases[key], count)
        walls[key].append(wall_ns / 1000)
        cpus[key].append(cpu_ns / 1000)
        if key == ("MixpanelHandler", "tagged"):
            tagged_sent += count
        handler.flush(60)
        hooked.flush(60)
        while not simple_queue.empty():
            simple_queue.get_nowait()
    delivered_ok = handler.flush(60) and hooked.flush(60)
    arrived = server.wait(tagged_sent * 2, 10, TOKEN)
    records, distinct = source_count(arrived, TOKEN)
    stats = handler.stats()
    hooked_dropped = hooked.stats()["dropped_total"]
    handler.close()
    hooked.close()
    rows = []
    for (handler_name, kind), values in walls.items():
        row: dict[str, Any] = {"handler": handler_name, "call": kind}
        row["best_wall_us"], row["median_wall_us"] = min_median(values)
        row["best_cpu_us"], row["median_cpu_us"] = min_median(cpus[handler_name, kind])
        rows.append(row)
    floor = {row["call"]: row for row in rows if row["handler"] == "NullHandler"}
    for row in rows:
        base = floor[row["call"]]
        row["wall_x_null"] = ratio(row["best_wall_us"], base["best_wall_us"])
        row["median_x_null"] = ratio(row["median_wall_us"], base["median_wall_us"])
        row["cpu_x_null"] = ratio(row["best_cpu_us"], base["best_cpu_us"])
        row["median_cpu_x_null"] = ratio(row["median_cpu_us"], base["median_cpu_us"])
    return {
        "rounds": rounds,
        "calls_per_round": count,
        "rows": rows,
        "tagged_sent": tagged_sent * 2,
        "delivered": records,
        "duplicates": records - distinct,
        "flush_ok": delivered_ok,
        "dropped": stats["dropped_total"] + hooked_dropped,
    }


def print_interleaved(result: dict[str, Any]) -> None:
    columns = [
        ("handler", "handler"),
        ("call", "call"),
        ("best_wall_us", "best wall µs"),
        ("wall_x_null", "xNullHandler"),
        ("median_wall_us", "median wall µs"),
        ("median_x_null", "median xNull"),
        ("best_cpu_us", "best caller CPU µs"),
        ("cpu_x_null", "CPU xNull"),
        ("median_cpu_x_null", "median CPU xNull"),
    ]
    print_table(
        f"logger.info cost, {result['rounds']} interleaved rounds of {result['calls_per_round']:,} "
        "calls per case (ratios against the same call with only a NullHandler)",
        columns,
        result["rows"],
    )
    print(
        f"MixpanelHandler (both): {result['tagged_sent']:,} tagged records timed, "
        f"{result['delivered']:,} arrived at the receiver ({result['duplicates']} duplicates, "
        f"dropped {result['dropped']}, final flush {'ok' if result['flush_ok'] else 'NOT ok'})"
    )


# --------------------------------------------------------------------------- where the time goes


def profile_tagged(server: ServerProcess, count: int) -> list[dict[str, Any]]:
    """cProfile of the calling thread during ``count`` tagged calls (top functions by own time)."""
    handler = MixpanelHandler(token=TOKEN, api_host=server.url)
    tagged, _untagged = log_calls(make_logger("bench.profile", handler))
    for _ in range(200):
        tagged()
    handler.flush(60)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(count):
        tagged()
    profiler.disable()
    handler.flush(60)
    handler.close()
    stats = pstats.Stats(profiler)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = filename.rsplit("/", 2)
        rows.append(
            {
                "function": f"{'/'.join(where[-2:])}:{line}({name})",
                "calls_per_record": ncalls / count,
                "own_us": tottime / count * 1e6,
                "own_share": tottime / total,
                "cumulative_us": cumtime / count * 1e6,
            }
        )
    rows.sort(key=lambda row: row["own_us"], reverse=True)
    return rows[:18]


def step_costs(server: ServerProcess, count: int, repeats: int) -> list[dict[str, Any]]:
    """Each step of the tagged path, timed alone (best of ``repeats``; caller-thread CPU).

    The steps use the library's private helpers as they are today; a step whose helper moved
    or changed shape is reported as n/a rather than stopping the benchmark.
    """
    handler = MixpanelHandler(token=TOKEN, api_host=server.url)
    logger = make_logger("bench.steps", handler)
    null_info = make_logger("bench.steps_null", logging.NullHandler()).info

    def fresh_records() -> list[logging.LogRecord]:
        return [
            logger.makeRecord(
                logger.name, logging.INFO, __file__, 1, MESSAGE, (), None, extra=tagged_extra()
            )
            for _ in range(count)
        ]

    def per_call(body: Callable[[], object]) -> float:
        best = float("inf")
        for _ in range(repeats):
            handler.flush(60)
            c0 = time.thread_time_ns()
            for _ in range(count):
                body()
            best = min(best, (time.thread_time_ns() - c0) / count)
        return best / 1000

    def per_item(items: Callable[[], list[Any]], body: Callable[[Any], object]) -> float:
        best = float("inf")
        for _ in range(repeats):
            batch = items()
            handler.flush(60)
            c0 = time.thread_time_ns()
            for item in batch:
                body(item)
            best = min(best, (time.thread_time_ns() - c0) / count)
        return best / 1000

    def spec() -> Any:
        return handler._bridge.spec  # type: ignore[attr-defined]

    def capture() -> Any:
        from mp_logbridge._context import current_context, otel_context
        from mp_logbridge._tags import Capture

        return Capture(spec(), time.time(), None, current_context(), otel_context())

    def messages() -> list[Any]:
        shared = capture()
        return [shared.message_for("event", ITEM, None, 0) for _ in range(count)]

    def split() -> float:
        from mp_logbridge._tags import split_tag

        return per_call(lambda: split_tag(ITEM))  # a hand-written tag: copied and checked

    def context() -> float:
        from mp_logbridge._context import current_context

        return per_call(current_context)

    def otel() -> float:
        from mp_logbridge._context import otel_context

        return per_call(otel_context)

    def make_capture() -> float:
        from mp_logbridge._context import current_context, otel_context
        from mp_logbridge._tags import Capture

        made, bound, snapshot = spec(), current_context(), otel_context()
        return per_call(lambda: Capture(made, 1.0, None, bound, snapshot))

    def make_message() -> float:
        shared = capture()
        return per_call(lambda: shared.message_for("event", ITEM, None, 0))

    def claim() -> float:
        bridge = handler._bridge  # type: ignore[attr-defined]
        return per_item(lambda: [{} for _ in range(count)], bridge.claim)

    def bridge_send() -> float:
        from mp_logbridge._context import current_context

        bridge, bound = handler._bridge, current_context()  # type: ignore[attr-defined]
        return per_call(lambda: bridge.send(ITEM, 1.0, str, bound))

    def send() -> float:
        consumer = handler.consumer
        return per_item(messages, lambda m: consumer.send("event", m))

    def build() -> float:
        return per_item(messages, lambda m: m.build())

    def encode() -> float:
        from mp_logbridge._records import encode_message

        return per_item(messages, encode_message)

    steps: list[tuple[str, Callable[[], float]]] = [
        (
            "logger.info(tagged), NullHandler only",
            lambda: per_call(lambda: null_info(MESSAGE, extra=tagged_extra())),
        ),
        ("  of which tag.track(...)", lambda: per_call(tagged_extra)),
        (
            "logger.info(tagged), MixpanelHandler",
            lambda: per_call(lambda: logger.info(MESSAGE, extra=tagged_extra())),
        ),
        ("MixpanelHandler.handle(record), whole", lambda: per_item(fresh_records, handler.handle)),
        ("  Bridge.claim(record dict) (sent mark)", claim),
        ("  current_context()", context),
        ("  Bridge.send(...) (split, capture, queue), whole", bridge_send),
        ("    split_tag(value)", split),
        ("    otel_context() (snapshot; span ids and baggage are read on the sender)", otel),
        ("    Capture(...)", make_capture),
        ("    TagMessage(...)", make_message),
        ("    BackgroundConsumer.send(kind, message)", send),
        ("sender thread, per record: TagMessage.build()", build),
        ("sender thread, per record: build + encode", encode),
    ]
    rows = []
    for name, measure in steps:
        try:
            cost: float | None = measure()
        except Exception:
            cost = None
        rows.append({"step": name, "cpu_us": cost})
    handler.flush(60)
    handler.close()
    return rows


def print_profile(rows: list[dict[str, Any]], steps: list[dict[str, Any]] | None) -> None:
    print_table(
        "cProfile of the calling thread, tagged logger.info with MixpanelHandler (per record; "
        "profiling inflates every figure, read the shares)",
        [
            ("function", "function"),
            ("calls_per_record", "calls/record"),
            ("own_us", "own µs"),
            ("own_share", "own share"),
            ("cumulative_us", "cumulative µs"),
        ],
        rows,
    )
    if steps is None:
        return
    print_table(
        "Steps of the tagged path timed alone (caller-thread CPU, best of repeats; private "
        "helpers)",
        [("step", "step"), ("cpu_us", "µs per call")],
        steps,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this file")
    parser.add_argument("--rounds", type=int, help="rounds per case (default 20, quick 4)")
    parser.add_argument("--calls", type=int, help="calls per round (default 10000, quick 3000)")
    parser.add_argument("--no-profile", action="store_true", help="skip the cost breakdown")
    parser.add_argument(
        "--steps", action="store_true", help="time each step alone (uses private helpers)"
    )
    args = parser.parse_args(argv)
    rounds = args.rounds or (4 if args.quick else 20)
    count = args.calls or (3000 if args.quick else 10_000)
    logging.getLogger("mp_logbridge").setLevel(logging.ERROR)
    env = environment()
    started = time.perf_counter()
    results: dict[str, Any] = {"environment": env, "quick": args.quick}
    with ServerProcess() as server:
        results["interleaved"] = interleaved(server, rounds, count)
        if not args.no_profile:
            results["profile"] = profile_tagged(server, 2000 if args.quick else 10_000)
        if args.steps:
            results["steps"] = step_costs(
                server, 2000 if args.quick else 10_000, 3 if args.quick else 5
            )
    results["seconds"] = time.perf_counter() - started
    print()
    print_environment(env)
    print_interleaved(results["interleaved"])
    if "profile" in results:
        print_profile(results["profile"], results.get("steps"))
    rows = {(r["handler"], r["call"]): r for r in results["interleaved"]["rows"]}
    targets = [
        {
            "target": "tagged / NullHandler (best wall)",
            "value": rows["MixpanelHandler", "tagged"]["wall_x_null"],
            "goal": "≤ 2 (aim 1.5)",
        },
        {
            "target": "tagged / NullHandler (best caller CPU)",
            "value": rows["MixpanelHandler", "tagged"]["cpu_x_null"],
            "goal": "≤ 2 (aim 1.5)",
        },
        {
            "target": "untagged / NullHandler (best wall)",
            "value": rows["MixpanelHandler", "untagged"]["wall_x_null"],
            "goal": "≤ 1.10",
        },
        {
            "target": "untagged / NullHandler (best caller CPU)",
            "value": rows["MixpanelHandler", "untagged"]["cpu_x_null"],
            "goal": "≤ 1.10",
        },
    ]
    results["targets"] = targets
    print_table("Targets", [("target", "target"), ("value", "measured"), ("goal", "goal")], targets)
    print(f"\nran in {results['seconds']:.0f} s")
    write_json(args.json, results)
    interleaved_result = results["interleaved"]
    return 0 if interleaved_result["delivered"] >= interleaved_result["tagged_sent"] else 1


if __name__ == "__main__":
    sys.exit(main())

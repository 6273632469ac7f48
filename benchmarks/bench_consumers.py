"""Consumers side by side: caller-thread cost, end-to-end throughput, memory, batch size.

Compares ``mp_logbridge.AsyncConsumer`` (through ``Tracker`` and through the official package's
``Mixpanel`` API) with the official ``mixpanel`` package's ``BufferedConsumer`` and
``Consumer``, PostHog's and Segment's clients, and bare ``queue.Queue.put`` /
``deque.append`` baselines — in one process, against one ``MixpanelServer`` running in a child
process (so its CPU is not counted as the client's), with 0 ms and 50 ms of server latency and
with the server down (a closed port).

Sections (``--sections``, default all):

* ``caller``: per-call cost on the caller's thread (mean, p50, p99, max);
* ``throughput``: messages delivered per second (send N, then flush) and process CPU seconds
  per 10 000 messages, for the client and, separately, the server;
* ``memory``: peak memory with the server down after 100 000 messages (each case in a fresh
  child process: peak RSS growth, and tracemalloc's peak in another child);
* ``sweep``: ``AsyncConsumer`` throughput and CPU for several ``batch_size`` values.

Usage: ``python benchmarks/bench_consumers.py [--quick] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from typing import Any

from _common import (
    HERE,
    ServerProcess,
    closed_port_url,
    environment,
    print_environment,
    print_table,
    ratio,
    reset_peak_rss,
    rss_kib,
    summarize_ns,
    time_each_call,
    write_json,
)
from _subjects import SUBJECTS, Subject

MODES = {"0 ms": 0.0, "50 ms": 0.05, "down": None}
LATENCIES = {"0 ms": 0.0, "50 ms": 0.05}
CALLER_ORDER = (
    "queue_put",
    "deque_append",
    "ours",
    "ours_official_api",
    "official_buffered",
    "official_consumer",
    "posthog",
    "segment",
)
THROUGHPUT_ORDER = (
    "ours",
    "ours_official_api",
    "official_buffered",
    "official_consumer",
    "posthog",
    "segment",
)
MEMORY_CASES = {
    "ours": ("mp_logbridge AsyncConsumer, default bounds", "ours", {}),
    "ours_1mb": (
        "mp_logbridge AsyncConsumer, max_queue_bytes=1 MB",
        "ours",
        {"max_queue_bytes": 1_000_000},
    ),
    "ours_1mb_1k": (
        "mp_logbridge AsyncConsumer, max_queue_bytes=1 MB, max_queue_size=1000",
        "ours",
        {"max_queue_bytes": 1_000_000, "max_queue_size": 1000},
    ),
    "official_buffered": ("mixpanel BufferedConsumer", "official_buffered", {}),
}
MEMORY_TOTAL = 100_000


@dataclass
class Plan:
    """How many messages each measurement sends (smaller for clients that block per request)."""

    quick: bool
    caller: dict[str, Any] = field(default_factory=dict)
    throughput: dict[str, Any] = field(default_factory=dict)
    memory_official: int = 1000
    sweep_sizes: tuple[int, ...] = (50, 100, 250, 500, 1000, 2000)
    sweep_messages: int = 10_000
    sweep_rounds: int = 2
    rounds: int = 2

    @classmethod
    def make(cls, quick: bool) -> Plan:
        scale = 10 if quick else 1
        caller = {
            key: {"0 ms": 10_000, "50 ms": 10_000, "down": 10_000}
            for key in ("queue_put", "deque_append", "ours", "ours_official_api")
        }
        caller["official_buffered"] = {"0 ms": 5000, "50 ms": 5000, "down": 2000}
        caller["official_consumer"] = {"0 ms": 500, "50 ms": 60, "down": 500}
        caller["posthog"] = caller["segment"] = {"0 ms": 5000, "50 ms": 5000, "down": 5000}
        throughput = {
            key: {"0 ms": 10_000, "50 ms": 10_000} for key in ("ours", "ours_official_api")
        }
        throughput["official_buffered"] = {"0 ms": 10_000, "50 ms": 1000}
        throughput["official_consumer"] = {"0 ms": 500, "50 ms": 40}
        throughput["posthog"] = throughput["segment"] = {"0 ms": 5000, "50 ms": 3000}
        for table in (caller, throughput):
            for key, counts in table.items():
                table[key] = {mode: max(10, n // scale) for mode, n in counts.items()}
        plan = cls(quick, caller, throughput)
        if quick:
            plan.memory_official = 500
            plan.sweep_sizes = (50, 500, 2000)
            plan.sweep_messages = 2000
            plan.sweep_rounds = 1
            plan.rounds = 1
        return plan


# --------------------------------------------------------------------------- caller cost


def warm_up(subject: Subject, server: ServerProcess | None, calls: int = 100) -> None:
    """Start threads and connections outside the measurement, then forget what arrived."""
    for i in range(calls):
        subject.call(i)
    if server is not None:
        subject.finish(60.0)
        server.clear()


def caller_cost(server: ServerProcess, plan: Plan) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {}
    for mode, latency in MODES.items():
        down = latency is None
        if not down:
            server.set_latency(latency)
        rows = []
        for key in CALLER_ORDER:
            began = time.perf_counter()
            count = plan.caller[key][mode]
            url = closed_port_url() if down else server.url
            subject = SUBJECTS[key](url, down)
            try:
                warm_up(subject, None if down else server, min(100, max(2, count // 10)))
                refused_before = subject.refused()
                gc.collect()
                samples = time_each_call(subject.call, count)
                row: dict[str, Any] = {"key": key, "client": subject.label, **summarize_ns(samples)}
                refused = subject.refused()
                if refused is not None and refused_before is not None:
                    row["refused"] = refused - refused_before
                if subject.delivers and not down:
                    subject.finish(120.0)
                    row["delivered"] = server.wait(count, 5.0)["total"]
            finally:
                subject.close()
            rows.append(row)
            spent = time.perf_counter() - began
            print(f"  caller {mode:>5} {subject.label}: {spent:.1f} s", file=sys.stderr)
        ours = next(r for r in rows if r["key"] == "ours")
        for row in rows:
            row["mean_x_ours"] = ratio(row["mean_us"], ours["mean_us"])
            row["p99_x_ours"] = ratio(row["p99_us"], ours["p99_us"])
        results[mode] = rows
    return results


def print_caller(results: dict[str, list[dict[str, Any]]]) -> None:
    columns = [
        ("client", "client"),
        ("n", "calls"),
        ("mean_us", "mean µs"),
        ("p50_us", "p50 µs"),
        ("p99_us", "p99 µs"),
        ("max_us", "max µs"),
        ("mean_x_ours", "mean xours"),
        ("p99_x_ours", "p99 xours"),
        ("delivered", "delivered"),
        ("refused", "refused/raised"),
    ]
    for mode, rows in results.items():
        title = f"Caller-thread cost per message, server {'down (closed port)' if mode == 'down' else 'latency ' + mode}"
        print_table(title, columns, rows)


# --------------------------------------------------------------------------- throughput


def deliver(
    server: ServerProcess, key: str, count: int, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Send ``count`` messages, flush, and measure rate and CPU (client and server)."""
    cls = SUBJECTS[key]
    subject = cls(server.url, False, **options) if options else cls(server.url, False)
    try:
        warm_up(subject, server, min(100, max(2, count // 10)))
        refused_before = subject.refused()
        gc.collect()
        before = server.stats()
        cpu0, t0 = time.process_time(), time.perf_counter()
        samples = time_each_call(subject.call, count)
        flushed = subject.finish(300.0)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        after = server.wait(before["total"] + count, 5.0)
        refused = subject.refused()
        if refused is not None and refused_before is not None:
            refused -= refused_before
    finally:
        subject.close()
    delivered = after["total"] - before["total"]
    return {
        "key": key,
        "client": subject.label,
        "sent": count,
        "delivered": delivered,
        "refused": refused,
        "flushed": flushed,
        "seconds": elapsed,
        "per_second": delivered / elapsed if elapsed > 0 else None,
        "requests": after["requests"] - before["requests"],
        "client_cpu_10k": cpu / count * 10_000,
        "caller_p99_us": summarize_ns(samples)["p99_us"],
        "server_cpu_10k": (after["cpu"] - before["cpu"]) / max(1, delivered) * 10_000,
    }


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of repeated runs, with the lowest CPU figures seen (each run is disturbed
    differently by the rest of the machine)."""
    best = dict(max(runs, key=lambda r: r["per_second"] or 0))
    for key in ("client_cpu_10k", "server_cpu_10k", "caller_p99_us"):
        best[key] = min(r[key] for r in runs)
    best["runs"] = len(runs)
    return best


def throughput(server: ServerProcess, plan: Plan) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {}
    for mode, latency in LATENCIES.items():
        server.set_latency(latency)
        rows = []
        for key in THROUGHPUT_ORDER:
            began = time.perf_counter()
            count = plan.throughput[key][mode]
            rows.append(best_of([deliver(server, key, count) for _ in range(plan.rounds)]))
            spent = time.perf_counter() - began
            print(f"  throughput {mode:>5} {rows[-1]['client']}: {spent:.1f} s", file=sys.stderr)
        official = next(r for r in rows if r["key"] == "official_buffered")
        ours = next(r for r in rows if r["key"] == "ours")
        for row in rows:
            row["x_official_buffered"] = ratio(row["per_second"], official["per_second"])
            row["cpu_x_ours"] = ratio(row["client_cpu_10k"], ours["client_cpu_10k"])
        results[mode] = rows
    return results


def print_throughput(results: dict[str, list[dict[str, Any]]]) -> None:
    columns = [
        ("client", "client"),
        ("sent", "sent"),
        ("delivered", "delivered"),
        ("requests", "requests"),
        ("seconds", "seconds"),
        ("per_second", "msgs/s"),
        ("x_official_buffered", "xBuffered"),
        ("client_cpu_10k", "client CPU s/10k"),
        ("cpu_x_ours", "CPU xours"),
        ("server_cpu_10k", "server CPU s/10k"),
    ]
    for mode, rows in results.items():
        print_table(
            f"End-to-end delivery (send N, then flush; best of {rows[0]['runs']}), "
            f"server latency {mode}",
            columns,
            rows,
        )


# --------------------------------------------------------------------------- memory


def _settle(consumer: Any) -> dict[str, Any]:
    """Wait until the sender has encoded every message it accepted; return its stats.

    Reads two private counters of ``AsyncConsumer`` when they exist (messages not yet taken by
    the sender, and being encoded: the public ``stats()`` counts them together with the encoded
    ones), and in any case waits until the encoded bytes stop changing.
    """
    deadline = time.monotonic() + 60
    stats: dict[str, Any] = consumer.stats()
    steady = 0
    while time.monotonic() < deadline:
        busy = bool(getattr(consumer, "_incoming", ())) or bool(getattr(consumer, "_admitting", 0))
        if not busy and steady >= 2:
            break
        time.sleep(0.02)
        previous, stats = stats, consumer.stats()
        same = stats["queue_bytes"] == previous["queue_bytes"]
        steady = steady + 1 if same and not busy else 0
    return stats


def memory_child(case: str, count: int, use_tracemalloc: bool) -> dict[str, Any]:
    """In a fresh process: send ``count`` messages to a closed port and measure peak memory."""
    _label, key, options = MEMORY_CASES[case]
    cls = SUBJECTS[key]
    subject = cls(closed_port_url(), True, **options) if options else cls(closed_port_url(), True)
    warm_up(subject, None)
    consumer = subject.consumer  # type: ignore[attr-defined]
    ours = hasattr(consumer, "stats")

    def held() -> int:
        if ours:
            return int(_settle(consumer)["queue_depth"])
        return sum(len(buffer) for buffer in consumer._buffers.values())

    held_before = held()
    refused_before = subject.refused() or 0
    gc.collect()
    if use_tracemalloc:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
    else:
        reset_peak_rss()
        base = rss_kib()[0] * 1024
    t0 = time.perf_counter()
    call = subject.call
    for i in range(count):
        call(i)
    send_seconds = time.perf_counter() - t0
    held_after = held()
    stats = consumer.stats() if ours else {}
    if use_tracemalloc:
        current, peak = tracemalloc.get_traced_memory()
        retained, peak = current - base, peak - base
        tracemalloc.stop()
    else:
        current_kib, peak_kib = rss_kib()
        retained, peak = current_kib * 1024 - base, peak_kib * 1024 - base
    result = {
        "case": case,
        "sent": count,
        "held": held_after - held_before,
        "refused": (subject.refused() or 0) - refused_before,
        "peak_bytes": peak,
        "retained_bytes": retained,
        "send_seconds": send_seconds,
        "queue_bytes": stats.get("queue_bytes"),
        "max_queue_bytes": getattr(consumer, "max_queue_bytes", None),
        "max_queue_size": getattr(consumer, "max_queue_size", None),
        "dropped": {k: v for k, v in stats.get("dropped", {}).items() if v},
    }
    subject.close()
    return result


def _memory_child_run(case: str, count: int, use_tracemalloc: bool) -> dict[str, Any]:
    command = [sys.executable, str(HERE / "bench_consumers.py"), "--memory-child", case]
    command += ["--count", str(count)] + (["--tracemalloc"] if use_tracemalloc else [])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory child {case} failed: {done.stderr[-2000:]}")
    child: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return child


def memory(plan: Plan) -> list[dict[str, Any]]:
    """Peak RSS growth of each case, each in a fresh child process.

    RSS is the measure (what the machine pays, allocator overhead included): tracemalloc slows
    the allocating sender thread far more than the caller, so under it ``AsyncConsumer`` fills
    its queue and drops messages it would not drop otherwise.

    The official ``BufferedConsumer`` tries a request on every call once its buffer is full,
    so with the server down it cannot send 100 000 messages in reasonable time: it sends fewer
    and its peak is extrapolated — measured RSS growth plus, for each further message, what one
    held message retains (tracemalloc, in another child: the buffer grows linearly, the memory
    of the one failing request in flight does not; the slope between two counts is used).
    """
    rows = []
    total = MEMORY_TOTAL // (10 if plan.quick else 1)
    for case, (label, key, _options) in MEMORY_CASES.items():
        began = time.perf_counter()
        count = plan.memory_official if key == "official_buffered" else total
        child = _memory_child_run(case, count, False)
        row: dict[str, Any] = {"client": label, **child}
        row["peak_mb"] = child["peak_bytes"] / 1e6
        row["retained_mb"] = child["retained_bytes"] / 1e6
        row["extrapolated"] = count != total
        per_held = child["retained_bytes"] / max(1, child["held"])
        if count != total:
            # Slope between two runs, so what is retained once (caches, the connection pool)
            # is not counted as growing with the messages.
            small = _memory_child_run(case, count // 2, True)
            large = _memory_child_run(case, count, True)
            grown = large["retained_bytes"] - small["retained_bytes"]
            per_held = grown / max(1, large["held"] - small["held"])
            if per_held <= 0:  # too few messages to see the slope: an upper bound instead
                per_held = large["retained_bytes"] / max(1, large["held"])
            row["peak_mb"] += per_held * (total - count) / 1e6
        row["bytes_per_held"] = per_held
        bound = row.get("max_queue_bytes")
        row["bound_mb"] = bound / 1e6 if bound else None
        row["peak_x_bound"] = ratio(row["peak_mb"], row["bound_mb"])
        rows.append(row)
        print(f"  memory {label}: {time.perf_counter() - began:.1f} s", file=sys.stderr)
    ours = rows[0]
    for row in rows:
        row["x_ours"] = ratio(row["peak_mb"], ours["peak_mb"])
    return rows


def print_memory(rows: list[dict[str, Any]], total: int) -> None:
    columns = [
        ("client", "client"),
        ("sent", "sent"),
        ("held", "held at end"),
        ("refused", "refused"),
        ("send_seconds", "send s"),
        ("peak_mb", "peak RSS growth MB"),
        ("x_ours", "xours"),
        ("bytes_per_held", "retained B/held msg"),
        ("bound_mb", "max_queue_bytes MB"),
        ("peak_x_bound", "peak xbound"),
        ("extrapolated", f"extrapolated to {total:,}"),
    ]
    print_table(
        f"Peak memory, server down, {total:,} messages sent in a tight loop "
        "(fresh process per row)",
        columns,
        rows,
    )


# --------------------------------------------------------------------------- batch size sweep


def sweep(server: ServerProcess, plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for mode, latency in LATENCIES.items():
        server.set_latency(latency)
        for size in plan.sweep_sizes:
            began = time.perf_counter()
            count = plan.sweep_messages if latency == 0 else min(plan.sweep_messages, 40 * size)
            runs = [
                deliver(server, "ours", count, {"batch_size": size})
                for _ in range(plan.sweep_rounds)
            ]
            rows.append({"latency": mode, "batch_size": size, **best_of(runs)})
            spent = time.perf_counter() - began
            print(f"  sweep {mode:>5} batch_size={size}: {spent:.1f} s", file=sys.stderr)
    return rows


def print_sweep(rows: list[dict[str, Any]]) -> None:
    columns = [
        ("latency", "latency"),
        ("batch_size", "batch_size"),
        ("sent", "sent"),
        ("delivered", "delivered"),
        ("requests", "requests"),
        ("per_second", "msgs/s"),
        ("client_cpu_10k", "client CPU s/10k"),
        ("server_cpu_10k", "server CPU s/10k"),
        ("caller_p99_us", "caller p99 µs"),
    ]
    print_table("AsyncConsumer batch_size sweep (best of rounds)", columns, rows)


# --------------------------------------------------------------------------- targets


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    caller = results.get("caller")
    if caller:
        base = next(r for r in caller["0 ms"] if r["key"] == "ours")
        for mode in ("50 ms", "down"):
            row = next(r for r in caller[mode] if r["key"] == "ours")
            rows.append(
                {
                    "target": f"caller p99 independent of the server: p99 at {mode} / p99 at 0 ms",
                    "value": ratio(row["p99_us"], base["p99_us"]),
                    "goal": "≈ 1",
                }
            )
    tput = results.get("throughput")
    if tput:
        row = next(r for r in tput["50 ms"] if r["key"] == "ours")
        official = next(r for r in tput["50 ms"] if r["key"] == "official_buffered")
        rows.append(
            {
                "target": "throughput at 50 ms vs official BufferedConsumer (default batch_size)",
                "value": row["x_official_buffered"],
                "goal": "≥ 10",
            }
        )
        for swept in results.get("sweep") or ():
            if swept["latency"] == "50 ms":
                rows.append(
                    {
                        "target": f"  same with batch_size={swept['batch_size']} (sweep)",
                        "value": ratio(swept["per_second"], official["per_second"]),
                        "goal": "≥ 10",
                    }
                )
    mem = results.get("memory")
    if mem:
        for row in mem:
            if row.get("bound_mb"):
                rows.append(
                    {
                        "target": f"peak RSS growth / max_queue_bytes: {row['client']}",
                        "value": row["peak_x_bound"],
                        "goal": "≤ 1 if max_queue_bytes bounded memory",
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~15 s smoke run (fewer messages)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this file")
    parser.add_argument(
        "--sections",
        default="caller,throughput,memory,sweep",
        help="comma-separated subset of caller,throughput,memory,sweep",
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=MEMORY_TOTAL, help=argparse.SUPPRESS)
    parser.add_argument("--tracemalloc", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.count, args.tracemalloc)))
        return
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    plan = Plan.make(args.quick)
    env = environment()
    results: dict[str, Any] = {"environment": env, "quick": args.quick}
    started = time.perf_counter()
    durations: dict[str, float] = {}
    with ServerProcess() as server:
        for name, run in (("caller", caller_cost), ("throughput", throughput), ("sweep", sweep)):
            if name in sections:
                t0 = time.perf_counter()
                results[name] = run(server, plan)
                durations[name] = time.perf_counter() - t0
    if "memory" in sections:
        t0 = time.perf_counter()
        results["memory"] = memory(plan)
        durations["memory"] = time.perf_counter() - t0
    results["section_seconds"] = durations
    results["seconds"] = time.perf_counter() - started
    print()
    print_environment(env)
    if "caller" in results:
        print_caller(results["caller"])
    if "throughput" in results:
        print_throughput(results["throughput"])
    if "memory" in results:
        print_memory(results["memory"], MEMORY_TOTAL // (10 if plan.quick else 1))
    if "sweep" in results:
        print_sweep(results["sweep"])
    results["targets"] = targets(results)
    if results["targets"]:
        print_table(
            "Targets",
            [("target", "target"), ("value", "measured"), ("goal", "goal")],
            results["targets"],
        )
    sections_run = ", ".join(f"{k} {v:.0f} s" for k, v in durations.items())
    print(f"\nran in {results['seconds']:.0f} s ({sections_run})")
    write_json(args.json, results)


if __name__ == "__main__":
    main()

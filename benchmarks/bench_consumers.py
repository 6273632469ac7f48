"""Clients side by side: caller cost, delivery throughput and sender CPU, batch size.

One run compares, against the fast receiver running in a child process (``_server.py``), with
0 ms and 50 ms of server latency and with the server down (a closed port):

* references: ``logging.NullHandler``, the stdlib ``QueueHandler``, structlog without processor;
* peers: OpenTelemetry's ``LoggingHandler`` + ``BatchLogRecordProcessor`` (posting to the
  receiver), PostHog, Segment, the official ``mixpanel`` package's ``Consumer`` and
  ``BufferedConsumer``;
* mp_logbridge: ``MixpanelHandler``, the structlog ``MixpanelProcessor``, ``@instrument``,
  ``Tracker``, and the official package's API on this library's background consumer.

Sections (``--sections``, default all):

* ``caller``: interleaved rounds; in each, every subject makes its untagged and tagged calls in
  a tight loop (wall time and caller-thread CPU per call) and its tagged calls once more timed
  one by one (p99). Figures are ratios to a ``NullHandler`` logging the same record, from the
  fastest round (min) and the median round. Between loops (not timed) every client delivers
  what it holds, or, with the server down, settles.
* ``throughput``: interleaved delivery runs (send N, then flush; counted at the receiver):
  records/s and its ratio to the official ``BufferedConsumer``, process CPU per 10 000 records,
  and sender CPU per record (process CPU minus the caller thread's, per record delivered).
* ``sweep``: the background consumer's throughput for several ``batch_size`` values.

Usage: ``python benchmarks/bench_consumers.py [--quick] [--json out.json] [--sections ...]``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from typing import Any

from _common import (
    ServerProcess,
    closed_port_url,
    environment,
    min_median,
    percentile,
    print_environment,
    print_table,
    ratio,
    rotations,
    source_count,
    time_each_call,
    timed_loop,
    write_json,
)
from _subjects import SUBJECTS, OursTracker, Subject

STATES = {"0 ms": 0.0, "50 ms": 0.05, "down": None}
LATENCIES = {"0 ms": 0.0, "50 ms": 0.05}
REFERENCE = "null"
BASELINE_THROUGHPUT = "official_buffered"


@dataclass
class Plan:
    """How many rounds, and how many calls per round (each subject's own counts, scaled)."""

    quick: bool
    caller_rounds: dict[str, int]
    throughput_rounds: int
    sweep_sizes: tuple[int, ...] = (50, 100, 250, 500, 1000, 2000)
    sweep_messages: int = 10_000
    sweep_rounds: int = 2

    @property
    def scale(self) -> int:
        return 10 if self.quick else 1

    def calls(self, subject: Subject, state: str) -> int:
        return max(10, subject.calls[state] // self.scale)

    def records(self, subject: Subject, latency: str) -> int:
        return max(10, subject.throughput[latency] // self.scale)

    @classmethod
    def make(cls, quick: bool, rounds: int | None) -> Plan:
        if quick:
            return cls(
                True,
                {state: 1 for state in STATES},
                1,
                sweep_sizes=(100, 2000),
                sweep_messages=2000,
                sweep_rounds=1,
            )
        caller = {"0 ms": 16, "50 ms": 8, "down": 8}
        if rounds:
            caller = {state: rounds for state in STATES}
        return cls(False, caller, 6)


def make_subjects(keys: list[str], url: str, down: bool) -> list[Subject]:
    return [SUBJECTS[key](url, down) for key in keys]


def warm_up(subjects: list[Subject], server: ServerProcess | None) -> None:
    """Start threads, open connections, fill caches; then forget what arrived."""
    for subject in subjects:
        for _ in range(subject.warm_up_calls):
            subject.tagged()
            if subject.untagged is not None:
                subject.untagged()
        subject.between()
    if server is not None:
        server.clear()


def close_all(subjects: list[Subject]) -> None:
    for subject in subjects:
        try:
            subject.close()
        except Exception as exc:  # a client that fails to close must not hide the figures
            print(f"  closing {subject.label} failed: {exc!r}", file=sys.stderr)


# --------------------------------------------------------------------------- caller cost


def caller_state(
    server: ServerProcess, state: str, subjects: list[Subject], plan: Plan
) -> list[dict[str, Any]]:
    """Interleaved rounds of every subject's loops in one server state."""
    down = STATES[state] is None
    cases: list[tuple[Subject, str]] = []
    for subject in subjects:
        if subject.untagged is not None:
            cases.append((subject, "untagged"))
        cases += [(subject, "tagged"), (subject, "p99")]
    walls: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    p99s: dict[str, list[float]] = {}
    sent = dict.fromkeys((s.key for s in subjects), 0)
    dropped_before = {s.key: s.dropped() for s in subjects}
    flush_failures = dict.fromkeys(sent, 0)
    began = time.perf_counter()
    for _round, (subject, kind) in rotations(cases, plan.caller_rounds[state]):
        count = plan.calls(subject, state)
        gc.collect()
        if kind == "p99":
            samples = sorted(time_each_call(subject.tagged, count))
            p99s.setdefault(subject.key, []).append(percentile(samples, 0.99) / 1000)
        else:
            call = subject.tagged if kind == "tagged" else subject.untagged
            assert call is not None
            wall_ns, cpu_ns = timed_loop(call, count)
            walls.setdefault((subject.key, kind), []).append(wall_ns / 1000)
            cpus.setdefault((subject.key, kind), []).append(cpu_ns / 1000)
        if kind != "untagged" or subject.untagged_delivers:
            sent[subject.key] += count
        if not subject.between() and not down:
            flush_failures[subject.key] += 1
    print(f"  caller {state:>5}: {time.perf_counter() - began:.1f} s", file=sys.stderr)
    rows = []
    for subject in subjects:
        row: dict[str, Any] = {"key": subject.key, "subject": subject.label, "group": subject.group}
        for kind in ("untagged", "tagged"):
            if (subject.key, kind) not in walls:
                continue
            row[f"{kind}_wall_us_min"], row[f"{kind}_wall_us_median"] = min_median(
                walls[subject.key, kind]
            )
            row[f"{kind}_cpu_us_min"], row[f"{kind}_cpu_us_median"] = min_median(
                cpus[subject.key, kind]
            )
        row["p99_us_min"], row["p99_us_median"] = min_median(p99s.get(subject.key, []))
        row["calls_per_round"] = plan.calls(subject, state)
        row["sent"] = sent[subject.key] if subject.source else None
        if subject.source and not down:
            arrived_now = server.wait(sent[subject.key], 5.0, subject.source)
            records, distinct = source_count(arrived_now, subject.source)
            row["delivered"] = records
            row["duplicates"] = records - distinct if subject.has_ids else None
        before, after = dropped_before[subject.key], subject.dropped()
        row["dropped"] = None if before is None or after is None else after - before
        row["flush_failures"] = flush_failures[subject.key] or None
        rows.append(row)
    reference = next(row for row in rows if row["key"] == REFERENCE)
    for row in rows:
        for kind in ("untagged", "tagged"):
            for clock in ("wall", "cpu"):
                for stat in ("min", "median"):
                    name = f"{kind}_{clock}_us_{stat}"
                    row[f"{kind}_{clock}_x_{stat}"] = ratio(row.get(name), reference.get(name))
    return rows


def print_caller(state: str, rows: list[dict[str, Any]], rounds: int) -> None:
    columns = [
        ("subject", "subject"),
        ("calls_per_round", "calls"),
        ("untagged_cpu_x_min", "untagged CPU x min"),
        ("untagged_cpu_x_median", "x med"),
        ("untagged_wall_x_min", "untagged wall x min"),
        ("tagged_cpu_us_min", "tagged CPU µs"),
        ("tagged_cpu_x_min", "tagged CPU x min"),
        ("tagged_cpu_x_median", "x med"),
        ("tagged_wall_x_min", "tagged wall x min"),
        ("tagged_wall_x_median", "x med"),
        ("p99_us_median", "tagged p99 µs"),
        ("sent", "sent"),
        ("delivered", "delivered"),
        ("duplicates", "dup"),
        ("dropped", "dropped/raised"),
    ]
    where = "down (closed port)" if state == "down" else f"latency {state}"
    print_table(
        f"Caller cost, server {where}: {rounds} interleaved rounds; x = ratio to NullHandler "
        "logging the same record (min: fastest rounds, med: median rounds)",
        columns,
        rows,
    )


# --------------------------------------------------------------------------- throughput


def deliver(server: ServerProcess, subject: Subject, count: int) -> dict[str, Any]:
    """Send ``count`` records, flush; rate and CPU (process, caller thread, receiver)."""
    before = server.stats()
    records_before, distinct_before = source_count(before, subject.source)
    dropped_before = subject.dropped()
    call = subject.tagged
    gc.collect()
    p0, c0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
    for _ in range(count):
        call()
    flushed = subject.between()
    elapsed = time.perf_counter() - t0
    process_cpu, caller_cpu = time.process_time() - p0, time.thread_time() - c0
    after = server.wait(records_before + count, 10.0, subject.source)
    records_after, distinct_after = source_count(after, subject.source)
    delivered = records_after - records_before
    duplicates = delivered - (distinct_after - distinct_before) if subject.has_ids else None
    dropped_after = subject.dropped()
    return {
        "sent": count,
        "delivered": delivered,
        "duplicates": duplicates,
        "flushed": flushed,
        "dropped": None
        if dropped_before is None or dropped_after is None
        else dropped_after - dropped_before,
        "seconds": elapsed,
        "per_second": delivered / elapsed if elapsed > 0 else None,
        "requests": after["requests"] - before["requests"],
        "process_cpu_10k": process_cpu / max(1, delivered) * 10_000,
        "caller_cpu_us": caller_cpu / count * 1e6,
        "sender_cpu_us": (process_cpu - caller_cpu) / max(1, delivered) * 1e6,
        "receiver_cpu_10k": (after["cpu"] - before["cpu"]) / max(1, delivered) * 10_000,
    }


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Fastest and median rate; lowest and median CPU (each run is disturbed differently)."""
    summary: dict[str, Any] = {"runs": len(runs)}
    rates = [r["per_second"] or 0.0 for r in runs]
    summary["per_second_max"] = max(rates)
    summary["per_second_median"] = min_median(rates)[1]
    for key in ("process_cpu_10k", "sender_cpu_us", "caller_cpu_us", "receiver_cpu_10k"):
        summary[f"{key}_min"], summary[f"{key}_median"] = min_median([r[key] for r in runs])
    for key in ("sent", "delivered", "duplicates", "requests", "dropped"):
        values = [r[key] for r in runs if r[key] is not None]
        summary[key] = sum(values) if values else None
    summary["flush_failures"] = sum(1 for r in runs if not r["flushed"]) or None
    return summary


def throughput_latency(
    server: ServerProcess, latency: str, subjects: list[Subject], plan: Plan
) -> list[dict[str, Any]]:
    delivering = [s for s in subjects if s.source]
    runs: dict[str, list[dict[str, Any]]] = {s.key: [] for s in delivering}
    began = time.perf_counter()
    for _round, subject in rotations(delivering, plan.throughput_rounds):
        runs[subject.key].append(deliver(server, subject, plan.records(subject, latency)))
    print(f"  throughput {latency:>5}: {time.perf_counter() - began:.1f} s", file=sys.stderr)
    rows = [
        {"key": s.key, "subject": s.label, "group": s.group, **summarize_runs(runs[s.key])}
        for s in delivering
    ]
    baseline = next(row for row in rows if row["key"] == BASELINE_THROUGHPUT)
    for row in rows:
        row["x_buffered_max"] = ratio(row["per_second_max"], baseline["per_second_max"])
        row["x_buffered_median"] = ratio(row["per_second_median"], baseline["per_second_median"])
    return rows


def print_throughput(latency: str, rows: list[dict[str, Any]]) -> None:
    columns = [
        ("subject", "subject"),
        ("sent", "sent"),
        ("delivered", "delivered"),
        ("duplicates", "dup"),
        ("dropped", "dropped"),
        ("requests", "requests"),
        ("per_second_max", "records/s max"),
        ("per_second_median", "median"),
        ("x_buffered_max", "xBuffered max"),
        ("x_buffered_median", "median"),
        ("process_cpu_10k_min", "process CPU s/10k min"),
        ("process_cpu_10k_median", "median"),
        ("sender_cpu_us_min", "sender CPU µs/rec min"),
        ("sender_cpu_us_median", "median"),
        ("receiver_cpu_10k_min", "receiver CPU s/10k"),
    ]
    print_table(
        f"Delivery, server latency {latency} (send N, then flush; {rows[0]['runs']} interleaved "
        "runs; counted at the receiver)",
        columns,
        rows,
    )


# --------------------------------------------------------------------------- batch size sweep


def sweep(server: ServerProcess, plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for latency, seconds in LATENCIES.items():
        server.set_latency(seconds)
        subjects = {
            size: OursTracker(server.url, False, batch_size=size) for size in plan.sweep_sizes
        }
        try:
            warm_up(list(subjects.values()), server)
            runs: dict[int, list[dict[str, Any]]] = {size: [] for size in subjects}
            began = time.perf_counter()
            for _round, size in rotations(list(subjects), plan.sweep_rounds):
                count = plan.sweep_messages if seconds == 0 else min(plan.sweep_messages, 40 * size)
                runs[size].append(deliver(server, subjects[size], count))
            print(f"  sweep {latency:>5}: {time.perf_counter() - began:.1f} s", file=sys.stderr)
        finally:
            close_all(list(subjects.values()))
        for size, size_runs in runs.items():
            rows.append({"latency": latency, "batch_size": size, **summarize_runs(size_runs)})
    return rows


def print_sweep(rows: list[dict[str, Any]]) -> None:
    columns = [
        ("latency", "latency"),
        ("batch_size", "batch_size"),
        ("sent", "sent"),
        ("delivered", "delivered"),
        ("requests", "requests"),
        ("per_second_max", "records/s max"),
        ("per_second_median", "median"),
        ("process_cpu_10k_min", "process CPU s/10k"),
        ("sender_cpu_us_min", "sender CPU µs/rec"),
    ]
    print_table("Background consumer batch_size sweep (Tracker)", columns, rows)


# --------------------------------------------------------------------------- main


def run(plan: Plan, sections: set[str], keys: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {"caller": {}, "throughput": {}}
    with ServerProcess() as server:
        for state, latency in STATES.items():
            if not sections & {"caller", "throughput"}:
                break
            if state == "down" and "caller" not in sections:
                continue
            down = latency is None
            if latency is not None:
                server.set_latency(latency)
            server.clear()
            subjects = make_subjects(keys, closed_port_url() if down else server.url, down)
            try:
                warm_up(subjects, None if down else server)
                if "caller" in sections:
                    results["caller"][state] = caller_state(server, state, subjects, plan)
                if "throughput" in sections and not down:
                    results["throughput"][state] = throughput_latency(server, state, subjects, plan)
            finally:
                close_all(subjects)
        if "sweep" in sections:
            results["sweep"] = sweep(server, plan)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round, 1/10 calls")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this file")
    parser.add_argument("--rounds", type=int, help="caller rounds per server state")
    parser.add_argument(
        "--sections",
        default="caller,throughput,sweep",
        help="comma-separated subset of caller,throughput,sweep",
    )
    parser.add_argument(
        "--subjects",
        default=",".join(SUBJECTS),
        help=f"comma-separated subset of {','.join(SUBJECTS)} (null and official_buffered "
        "are always included: they are the references)",
    )
    args = parser.parse_args(argv)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    wanted = {s.strip() for s in args.subjects.split(",") if s.strip()} | {
        REFERENCE,
        BASELINE_THROUGHPUT,
    }
    keys = [key for key in SUBJECTS if key in wanted]
    plan = Plan.make(args.quick, args.rounds)
    env = environment()
    started = time.perf_counter()
    results: dict[str, Any] = {"environment": env, "quick": args.quick, "plan": plan.__dict__}
    results.update(run(plan, sections, keys))
    results["seconds"] = time.perf_counter() - started
    print()
    print_environment(env)
    for state, rows in results["caller"].items():
        print_caller(state, rows, plan.caller_rounds[state])
    for latency, rows in results["throughput"].items():
        print_throughput(latency, rows)
    if results.get("sweep"):
        print_sweep(results["sweep"])
    missing = [
        f"{row['subject']} ({section} {state}: {row['delivered']:,} of {row['sent']:,})"
        for section in ("caller", "throughput")
        for state, rows in results[section].items()
        for row in rows
        if row.get("delivered") is not None and row["delivered"] < (row.get("sent") or 0)
    ]
    results["missing"] = missing
    print(f"\nran in {results['seconds']:.0f} s")
    if missing:
        print("records that did not arrive: " + "; ".join(missing))
    write_json(args.json, results)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())

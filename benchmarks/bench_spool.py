"""What the durable spool costs: the caller, sustained throughput, draining a backlog, disk.

Sections (each run against a ``MixpanelServer`` in a child process, so its CPU is not ours):

* ``caller`` — ``Tracker.track`` timed call by call (``perf_counter_ns``) with the spool off,
  on (``durability="batch"``, the default: the caller only queues; the worker commits every
  50 ms) and on with ``durability="call"`` (a SQLite commit inside every call). Rounds of the
  three cases are interleaved so drifts of the machine hit each alike; a case is judged by its
  fastest round (the round least disturbed by the rest of the machine). Between rounds (not
  timed) every client is flushed, so rounds start empty.
* ``throughput`` — send N events, then ``flush()`` until Mixpanel acknowledged them (with the
  spool: committed to disk, read back, posted, deleted). Best of two runs; the client's CPU
  seconds (``time.process_time``, every thread of this process) per 10 000 messages.
* ``drain`` — a spool of M records (1 000 000 by default) left by a process that is gone,
  delivered by ``drain_spool``: to the server over HTTP (bounded by the server's own parsing,
  reported), and to an exporter that only counts (the spool's own ceiling: read, mark, delete).
* ``disk`` — bytes on disk per record for that spool (database plus write-ahead log, after the
  last commit), next to the size of the encoded record itself.

Figures are ratios against the spool off in the same run; absolute numbers move with the
machine. Usage: ``python benchmarks/bench_spool.py [--quick] [--sections caller,throughput,
drain,disk] [--drain-records N] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    TOKEN,
    ServerProcess,
    environment,
    print_environment,
    print_table,
    ratio,
    summarize_ns,
    time_each_call,
    write_json,
)

from mp_logbridge import Tracker
from mp_logbridge import _messages as msg
from mp_logbridge._diagnostics import DeliveryStats
from mp_logbridge._export import Batch, Outcome
from mp_logbridge._records import MAX_BATCH_RECORDS, MAX_REQUEST_BYTES, encode_record
from mp_logbridge._retry import RetryPolicy
from mp_logbridge._spool_drain import Drainer, run_drain
from mp_logbridge._spool_store import StoreFile, endpoints_json
from mp_logbridge._transport import Endpoints, resolve_endpoints
from mp_logbridge.spool import drain_spool

PROPS = {"plan": "pro", "seats": 3}
CASES = {
    "spool off": {},
    "spool, durability=batch": {"spool": True},
    "spool, durability=call": {"spool": True, "durability": "call"},
}


def make_tracker(url: str, options: dict[str, Any], directory: Path, queue: int) -> Tracker:
    opts = dict(options)
    if opts.pop("spool", False):
        opts["spool"] = str(directory)
    return Tracker(TOKEN, api_host=url, flush_interval=0.05, max_queue_size=queue, **opts)


# --------------------------------------------------------------------------- caller


def bench_caller(
    server: ServerProcess, calls: int, rounds: int, work: Path
) -> list[dict[str, Any]]:
    trackers = {
        name: make_tracker(server.url, options, work / f"caller-{i}", calls * 2)
        for i, (name, options) in enumerate(CASES.items())
    }
    best: dict[str, dict[str, float]] = {}
    for tracker in trackers.values():  # warm up: threads started, connections open, files made
        for i in range(200):
            tracker.track("user-1", "Warm Up", {"i": i})
        tracker.flush(30)
    server.clear()
    for _ in range(rounds):
        for name, tracker in trackers.items():
            samples = time_each_call(
                lambda i, t=tracker: t.track("user-1", "Signed Up", {**PROPS, "i": i}), calls
            )
            summary = summarize_ns(samples)
            if name not in best or summary["mean_us"] < best[name]["mean_us"]:
                best[name] = summary
            tracker.flush(60)
    delivered = server.wait(len(trackers) * rounds * calls, 30)["events"]
    for tracker in trackers.values():
        tracker.close()
    base = best["spool off"]
    rows = []
    for name, summary in best.items():
        rows.append(
            {
                "case": name,
                **summary,
                "x_off": ratio(summary["mean_us"], base["mean_us"]),
                "x_off_p50": ratio(summary["p50_us"], base["p50_us"]),
            }
        )
    rows.append({"case": "(events delivered, all cases)", "n": delivered})
    return rows


# --------------------------------------------------------------------------- throughput


def bench_throughput(server: ServerProcess, count: int, work: Path) -> list[dict[str, Any]]:
    rows = []
    for name, options in list(CASES.items())[:2]:
        best: dict[str, Any] | None = None
        for attempt in range(2):
            server.clear()
            directory = work / f"throughput-{attempt}-{len(rows)}"
            tracker = make_tracker(server.url, options, directory, count + 1000)
            tracker.track("user-1", "Warm Up")
            tracker.flush(30)
            server.clear()
            cpu = time.process_time()
            started = time.perf_counter()
            for i in range(count):
                tracker.track("user-1", "Signed Up", {**PROPS, "i": i})
            flushed = tracker.flush(300)
            wall = time.perf_counter() - started
            cpu = time.process_time() - cpu
            arrived = server.wait(count, 60)
            stats = tracker.stats()
            tracker.close()
            shutil.rmtree(directory, ignore_errors=True)
            row = {
                "case": name,
                "msgs_per_s": arrived["events"] / wall,
                "client_cpu_per_10k": cpu / count * 10_000,
                "delivered": arrived["events"],
                "flushed": flushed,
                "dropped": stats["dropped_total"],
            }
            if best is None or row["msgs_per_s"] > best["msgs_per_s"]:
                best = row
        assert best is not None
        rows.append(best)
    base = rows[0]["msgs_per_s"]
    for row in rows:
        row["x_off"] = ratio(row["msgs_per_s"], base)
    return rows


# --------------------------------------------------------------------------- drain and disk


def write_spool(directory: Path, endpoints: Endpoints, count: int) -> int:
    """A spool file of ``count`` events left by a process that is gone, written in chunks of
    2000 as the worker commits them; returns the bytes of the encoded records."""
    store = StoreFile.create(directory)
    urls = [endpoints.event, endpoints.profile_update, endpoints.group_update, endpoints.import_]
    lane = store.lane_id("event", endpoints_json(urls), "")
    now = int(time.time() * 1000)
    body_bytes = 0
    chunk = 2000
    for start in range(0, count, chunk):
        bodies = [
            encode_record(msg.event(TOKEN, "user-1", "Signed Up", {**PROPS, "i": i}, time_ms=now))
            for i in range(start, min(count, start + chunk))
        ]
        body_bytes += sum(len(body) for body in bodies)
        store.append(lane, now, bodies, 1 << 40)
    store.close(delete_if_empty=False)  # the lock is released: an orphan, as after a crash
    return body_bytes


def disk_size(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir() if path.is_file())


class CountingExporter:
    """Accepts every batch at once: the drain's own cost, without HTTP or a server."""

    timeout = 10.0

    def __init__(self) -> None:
        self.records = 0

    def export(self, batch: Batch, deadline: float) -> Outcome:
        self.records += len(batch.records)
        return Outcome(delivered=batch.records)

    def shutdown(self) -> None:
        pass

    def reinit_after_fork(self) -> None:
        pass


def bench_drain(
    server: ServerProcess, count: int, work: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    endpoints = resolve_endpoints(api_host=server.url)
    rows = []
    disk: dict[str, Any] = {}

    # Over HTTP, to the server.
    directory = work / "drain-http"
    started = time.perf_counter()
    body_bytes = write_spool(directory, endpoints, count)
    write_s = time.perf_counter() - started
    on_disk = disk_size(directory)
    disk = {
        "records": count,
        "record_bytes": body_bytes / count,
        "disk_bytes_per_record": on_disk / count,
        "overhead": ratio(on_disk, body_bytes),
        "write_records_per_s": count / write_s,
    }
    server.clear()
    before = server.stats()["cpu"]
    started = time.perf_counter()
    result = drain_spool(directory)
    wall = time.perf_counter() - started
    stats = server.wait(count, 60)
    rows.append(
        {
            "case": "drain_spool over HTTP",
            "records": result.delivered,
            "seconds": wall,
            "records_per_s": result.delivered / wall,
            "server_cpu_s": stats["cpu"] - before,
            "left": result.left,
        }
    )

    # To an exporter that only counts: the spool's own ceiling.
    directory = work / "drain-local"
    write_spool(directory, endpoints, count)
    exporter = CountingExporter()
    drainer = Drainer(
        directory,
        own=None,
        endpoints=endpoints,
        exporter=exporter,
        credentials=[],
        timeout=10.0,
        verify=True,
        retry=RetryPolicy(),
        batch_size=MAX_BATCH_RECORDS,
        max_batch_bytes=MAX_REQUEST_BYTES,
        flush_interval=0.05,
        stats=DeliveryStats(),
        on_error=None,
        standalone=True,
    )
    started = time.perf_counter()
    run_drain(drainer, None)
    wall = time.perf_counter() - started
    rows.append(
        {
            "case": "drain to a counting exporter",
            "records": exporter.records,
            "seconds": wall,
            "records_per_s": exporter.records / wall,
            "left": sum(1 for _ in directory.glob("*.sqlite3")),
        }
    )
    return rows, disk


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test)")
    parser.add_argument("--sections", default="caller,throughput,drain,disk")
    parser.add_argument("--drain-records", type=int, default=None)
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    calls, rounds = (2000, 3) if args.quick else (10_000, 7)
    count = 20_000 if args.quick else 100_000
    drain_count = args.drain_records or (100_000 if args.quick else 1_000_000)
    env = environment()
    print_environment(env)
    figures: dict[str, Any] = {"environment": env}
    work = Path(tempfile.mkdtemp(prefix="bench-spool-"))
    try:
        with ServerProcess() as server:
            if "caller" in sections:
                rows = bench_caller(server, calls, rounds, work)
                figures["caller"] = rows
                print_table(
                    f"caller: Tracker.track, {calls:,} calls x {rounds} interleaved rounds "
                    "(fastest round)",
                    [
                        ("case", "case"),
                        ("mean_us", "mean us"),
                        ("p50_us", "p50 us"),
                        ("p99_us", "p99 us"),
                        ("x_off", "x off (mean)"),
                        ("x_off_p50", "x off (p50)"),
                        ("n", "n"),
                    ],
                    rows,
                )
            if "throughput" in sections:
                rows = bench_throughput(server, count, work)
                figures["throughput"] = rows
                print_table(
                    f"throughput: {count:,} events sent, then flush() until acknowledged "
                    "(best of 2)",
                    [
                        ("case", "case"),
                        ("msgs_per_s", "msgs/s"),
                        ("x_off", "x off"),
                        ("client_cpu_per_10k", "client CPU s/10k"),
                        ("delivered", "delivered"),
                        ("flushed", "flushed"),
                        ("dropped", "dropped"),
                    ],
                    rows,
                )
            if sections & {"drain", "disk"}:
                rows, disk = bench_drain(server, drain_count, work)
                figures["drain"] = rows
                figures["disk"] = disk
                print_table(
                    f"drain: a spool of {drain_count:,} records left by a process that is gone",
                    [
                        ("case", "case"),
                        ("records", "records"),
                        ("seconds", "s"),
                        ("records_per_s", "records/s"),
                        ("server_cpu_s", "server CPU s"),
                        ("left", "left"),
                    ],
                    rows,
                )
                print_table(
                    "disk: bytes per spooled record (database + WAL)",
                    [
                        ("records", "records"),
                        ("record_bytes", "encoded record B"),
                        ("disk_bytes_per_record", "disk B/record"),
                        ("overhead", "x record"),
                        ("write_records_per_s", "written/s (store API)"),
                    ],
                    [disk],
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(args.json, figures)


if __name__ == "__main__":
    main()

"""Bounds against hostile servers: memory held, and how long exit takes.

Every row runs in a fresh child interpreter, against the fast receiver (``_server.py``) put in
the mode the row needs, or a closed port:

* ``memory`` (peak RSS growth, ``VmHWM`` after resetting it through ``/proc/self/clear_refs``,
  and RSS still held once the sender settled):

  - *server down*: the background consumer (through ``Tracker``) with default bounds, 100 000
    small records to a closed port; the figure is RSS per queued encoded record (target
    ≤ 300 B). Also with ``max_queue_bytes=1 MB``, and the official ``BufferedConsumer``
    (which cannot send 100 000 with the server down in reasonable time: it sends 1000 and its
    figure is extrapolated, see ``memory_row``);
  - *stuck receiver, 1000 records of 400 KB*: ``max_queue_bytes=16 MiB``, the receiver reads
    the requests and never answers (promise: peak ≤ 2 x the bound);
  - *a 200 with a 512 MiB body*: the receiver answers the first request with a valid answer
    followed by 512 MiB of spaces, streamed (promise: peak growth < 64 MB).

* ``exit``: a child logs N tagged records through ``MixpanelHandler(exit_timeout=T)`` and
  returns from its main; the wall time from its last log call to the end of the process,
  against ``T`` (promise: within the deadline), with a normal receiver (for reference: what
  arrived), a stuck one, a dripping one (one byte every 2 s) and the server down. A child with
  only a ``NullHandler`` gives the interpreter's own exit time, which the deadline does not
  cover.

Usage: ``python benchmarks/bench_bounds.py [--quick] [--json out.json] [--sections memory,exit]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from _common import (
    HERE,
    ServerProcess,
    child_env,
    closed_port_url,
    environment,
    print_environment,
    print_table,
    ratio,
    reset_peak_rss,
    rss_kib,
    write_json,
)
from _subjects import (
    EVENT,
    MESSAGE,
    PLAN,
    USER,
    BackgroundConsumer,
    OfficialBufferedSubject,
    make_logger,
    settle,
)

from mp_logbridge import MixpanelHandler, Tracker, tag

MiB = 1024 * 1024
DOWN_RECORDS = 100_000
BIG_RECORDS = 1000
BIG_SIZE = 400_000
BIG_BOUND = 16 * MiB
HUGE_BODY = 512 * MiB
HUGE_PROMISE = 64_000_000
EXIT_MODES = ("no handler", "normal", "stuck", "drip", "down")


# --------------------------------------------------------------------------- memory children


def _measure(send: Callable[[], None], wait: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """RSS before, peak RSS growth during ``send`` + ``wait``, RSS held after."""
    gc.collect()
    reset = reset_peak_rss()
    base = rss_kib()[0] * 1024
    t0 = time.perf_counter()
    send()
    send_seconds = time.perf_counter() - t0
    stats = wait()
    current, peak = rss_kib()
    return {
        "peak_reset": reset,
        "base_bytes": base,
        "peak_bytes": peak * 1024 - base,
        "retained_bytes": current * 1024 - base,
        "send_seconds": send_seconds,
        "settle_seconds": time.perf_counter() - t0 - send_seconds,
        "stats": stats,
    }


def _tracker(url: str, **options: Any) -> tuple[Any, Any]:
    consumer = BackgroundConsumer(api_host=url, **options)
    tracker = Tracker("bench-memory", consumer)
    tracker.track(USER, "Warm Up", {"plan": PLAN})  # starts the sender thread
    return consumer, tracker


def child_down(url: str, count: int, options: dict[str, Any]) -> dict[str, Any]:
    consumer, tracker = _tracker(url, **options)
    before = settle(consumer)
    track = tracker.track

    def send() -> None:
        for i in range(count):
            track(USER, EVENT, {"plan": PLAN, "i": i})

    result = _measure(send, lambda: settle(consumer))
    held = int(result["stats"]["queue_depth"]) - int(before["queue_depth"])
    result.update(
        sent=count,
        held=held,
        dropped=int(result["stats"]["dropped_total"]) - int(before["dropped_total"]),
        bytes_per_held=result["retained_bytes"] / max(1, held),
        bound=getattr(consumer, "max_queue_bytes", options.get("max_queue_bytes")),
    )
    return result


def child_big(url: str, count: int, options: dict[str, Any]) -> dict[str, Any]:
    """``count`` records of ``BIG_SIZE`` bytes each, every one a new string, to ``url``."""
    consumer, tracker = _tracker(url, **options)
    track = tracker.track
    filler = "x" * BIG_SIZE

    def send() -> None:
        for i in range(count):
            blob = f"{i:08d}" + filler[8:]  # a new 400 KB string each time, as an app would make
            track(USER, "Big Record", {"blob": blob})
            del blob

    result = _measure(send, lambda: settle(consumer, timeout=30.0, quiet=0.5))
    stats = result["stats"]
    result.update(
        sent=count,
        held=int(stats["queue_depth"]),
        dropped=int(stats["dropped_total"]),
        dropped_by=({k: v for k, v in stats.get("dropped", {}).items() if v}),
        bound=options["max_queue_bytes"],
    )
    return result


def child_huge(url: str, count: int, timeout: float) -> dict[str, Any]:
    """``count`` small records to a receiver whose answer is huge; peak while flushing."""
    consumer, tracker = _tracker(url)
    track = tracker.track
    delivered: list[bool] = []

    def send() -> None:
        for i in range(count):
            track(USER, EVENT, {"plan": PLAN, "i": i})

    def wait() -> dict[str, Any]:
        delivered.append(bool(consumer.flush(timeout)))
        stats: dict[str, Any] = consumer.stats()
        return stats

    result = _measure(send, wait)
    result.update(sent=count, flushed=delivered[0], dropped=int(result["stats"]["dropped_total"]))
    return result


def child_official(count: int, use_tracemalloc: bool) -> dict[str, Any]:
    """The official ``BufferedConsumer`` with the server down: what its buffer holds."""
    subject = OfficialBufferedSubject(closed_port_url(), True)
    consumer = subject.consumer
    for _ in range(10):
        subject.tagged()

    def held() -> int:
        return sum(len(buffer) for buffer in consumer._buffers.values())

    held_before = held()
    gc.collect()
    if use_tracemalloc:  # what half the records retain, then all of them, in this process
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        points = []
        for part in (count // 2, count - count // 2):
            for _ in range(part):
                subject.tagged()
            gc.collect()  # failed requests leave cycles (exceptions and their frames) behind
            points.append((held() - held_before, tracemalloc.get_traced_memory()[0] - base))
        tracemalloc.stop()
        return {"points": points}
    call = subject.tagged

    def send() -> None:
        for _ in range(count):
            call()

    result = _measure(send, dict)
    result.update(sent=count, held=held() - held_before, dropped=subject.errors)
    return result


def _run_child(arguments: list[str], timeout: float = 300.0) -> dict[str, Any]:
    command = [sys.executable, str(HERE / "bench_bounds.py"), "--child", *arguments]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=child_env())
    if done.returncode != 0:
        raise RuntimeError(f"child {arguments} failed: {done.stderr[-2000:]}")
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def run_child(argv: list[str]) -> None:
    """Entry point of a child: ``KIND URL COUNT [JSON OPTIONS]``; prints one JSON line and
    leaves at once (a consumer facing a stuck server is not the subject of these rows)."""
    kind, url, count = argv[0], argv[1], int(argv[2])
    options = json.loads(argv[3]) if len(argv) > 3 else {}
    if kind == "down":
        result = child_down(url, count, options)
    elif kind == "big":
        result = child_big(url, count, options)
    elif kind == "huge":
        result = child_huge(url, count, float(options.get("timeout", 20.0)))
    elif kind == "official":
        result = child_official(count, bool(options.get("tracemalloc")))
    else:
        raise SystemExit(f"unknown child {kind}")
    print(json.dumps(result, default=str), flush=True)
    os._exit(0)


# --------------------------------------------------------------------------- memory rows


def memory(server: ServerProcess, quick: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    down_count = DOWN_RECORDS // (10 if quick else 1)
    big_count = BIG_RECORDS // (4 if quick else 1)
    huge_body = HUGE_BODY // (8 if quick else 1)

    def row(name: str, promise: str, result: dict[str, Any], **figures: Any) -> None:
        rows.append({"case": name, "promise": promise, **result, **figures})
        print(f"  memory {name}: done", file=sys.stderr)

    result = _run_child(["down", closed_port_url(), str(down_count)])
    row(
        f"server down, {down_count:,} small records, default bounds",
        "≤ 300 B per queued encoded record",
        result,
        figure=result["bytes_per_held"],
        unit="B/record",
        met=result["bytes_per_held"] <= 300,
    )
    options = {"max_queue_bytes": 1_000_000}
    result = _run_child(["down", closed_port_url(), str(down_count), json.dumps(options)])
    row(
        f"server down, {down_count:,} small records, max_queue_bytes=1 MB",
        "peak ≤ 2 x bound",
        result,
        figure=result["peak_bytes"] / 1_000_000,
        unit="x bound",
        met=result["peak_bytes"] <= 2 * 1_000_000,
    )
    row(*_official_row(down_count, 500 if quick else 1000))
    server.clear()
    server.set_mode("stuck")
    try:
        options = {"max_queue_bytes": BIG_BOUND}
        result = _run_child(["big", server.url, str(big_count), json.dumps(options)])
    finally:
        server.set_mode("normal")
    result["receiver"] = server.stats()
    row(
        f"stuck receiver, {big_count:,} records of {BIG_SIZE // 1000} KB, max_queue_bytes=16 MiB",
        "peak ≤ 2 x bound",
        result,
        figure=result["peak_bytes"] / BIG_BOUND,
        unit="x bound",
        met=result["peak_bytes"] <= 2 * BIG_BOUND,
    )
    server.clear()
    server.set_mode("huge", huge_body)
    try:
        result = _run_child(
            ["huge", server.url, "100", json.dumps({"timeout": 10 if quick else 20})]
        )
    finally:
        server.set_mode("normal")
    result["receiver"] = server.stats()
    result["body_bytes_sent"] = result["receiver"]["huge_bytes_sent"]
    row(
        f"receiver answers 200 with a {huge_body // MiB} MiB body",
        "peak growth < 64 MB",
        result,
        figure=result["peak_bytes"] / 1e6,
        unit="MB",
        met=result["peak_bytes"] < HUGE_PROMISE,
    )
    return rows


def _official_row(total: int, count: int) -> tuple[str, str, dict[str, Any]]:
    """The official ``BufferedConsumer``: ``count`` records measured, extrapolated to ``total``.

    Once its buffer is full it tries a request on every call, so with the server down it
    cannot take ``total`` records in reasonable time. Its figure is the measured RSS growth plus,
    for each further record, what one more held record retains: the tracemalloc slope between
    ``count // 2`` and ``count`` records sent in one process (so what is retained once, such as
    the connection pool, does not count as growing). tracemalloc sees Python allocations only.
    """
    result = _run_child(["official", "-", str(count)])
    traced = _run_child(["official", "-", str(count), json.dumps({"tracemalloc": True})])
    (held_half, bytes_half), (held_all, bytes_all) = traced["points"]
    per_held = (bytes_all - bytes_half) / max(1, held_all - held_half)
    if per_held <= 0:  # too few records to see the slope: an upper bound instead
        per_held = bytes_all / max(1, held_all)
    result["bytes_per_held"] = per_held
    result["extrapolated_peak_bytes"] = result["peak_bytes"] + per_held * (total - count)
    result["figure"] = per_held
    result["unit"] = "B/record"
    return (
        f"official BufferedConsumer, server down ({count:,} sent, extrapolated to {total:,})",
        "none (its buffer is unbounded; raises on every call)",
        result,
    )


def print_memory(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        row["peak_mb"] = (row.get("extrapolated_peak_bytes") or row["peak_bytes"]) / 1e6
        row["retained_mb"] = row.get("retained_bytes", 0) / 1e6
    print_table(
        "Memory (each row a fresh child process; RSS growth from just before the burst)",
        [
            ("case", "case"),
            ("sent", "sent"),
            ("held", "held"),
            ("dropped", "dropped/raised"),
            ("peak_mb", "peak MB"),
            ("retained_mb", "held MB"),
            ("figure", "figure"),
            ("unit", "unit"),
            ("promise", "promise"),
            ("met", "met"),
        ],
        rows,
    )


# --------------------------------------------------------------------------- exit


def exit_child(url: str, count: int, exit_timeout: float) -> None:
    """Log ``count`` tagged records, report when the last one was logged, exit normally.

    With ``url`` ``"-"`` the logger has a ``NullHandler``: the interpreter's own exit time.
    """
    if url == "-":
        handler: logging.Handler = logging.NullHandler()
    else:
        handler = MixpanelHandler("bench-exit", api_host=url, exit_timeout=exit_timeout)
    info = make_logger("bench.exit", handler).info
    track = tag.track
    for _ in range(count):
        info(MESSAGE, extra=track(EVENT, distinct_id=USER, plan=PLAN))
    stats = handler.stats() if isinstance(handler, MixpanelHandler) else {}
    print(json.dumps({"logged_at": time.monotonic(), "stats": stats}), flush=True)


def exit_row(
    server: ServerProcess, mode: str, count: int, exit_timeout: float, floor: float
) -> dict[str, Any]:
    url = {"down": closed_port_url(), "no handler": "-"}.get(mode, server.url)
    server.clear()
    if mode == "drip":
        server.set_mode("drip", 2.0)
    elif mode in ("normal", "stuck"):
        server.set_mode(mode)
    command = [sys.executable, str(HERE / "bench_bounds.py"), "--exit-child", url]
    command += [str(count), str(exit_timeout)]
    hard_limit = exit_timeout + 60
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env()
    )
    killer = threading.Timer(hard_limit, process.kill)
    killer.start()
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        code = process.wait()
        ended = time.monotonic()
        stderr = process.stderr.read() if process.stderr else ""
    finally:
        killer.cancel()
        process.stdout and process.stdout.close()
        process.stderr and process.stderr.close()
        server.set_mode("normal")
    report = json.loads(line) if line.strip() else {}
    seconds = ended - report["logged_at"] if report else None
    arrived = server.stats()
    return {
        "mode": {"drip": "drip (1 byte / 2 s)"}.get(mode, mode),
        "records": count,
        "exit_timeout": exit_timeout,
        "exit_seconds": seconds,
        "x_exit_timeout": ratio(seconds, exit_timeout),
        "beyond_interpreter": None if seconds is None or mode == "no handler" else seconds - floor,
        "met": None
        if mode == "no handler"
        else seconds is not None and seconds - floor <= exit_timeout,
        "killed": code == -signal.SIGKILL,
        "returncode": code,
        "arrived": arrived["sources"].get("bench-exit", {}).get("records", 0),
        "unanswered_records": arrived["unanswered_records"],
        "stderr_lines": len(stderr.splitlines()),
    }


def exit_rows(server: ServerProcess, quick: bool) -> list[dict[str, Any]]:
    count, exit_timeout = (1000, 1.0) if quick else (10_000, 5.0)
    rows: list[dict[str, Any]] = []
    for mode in EXIT_MODES:
        floor = rows[0]["exit_seconds"] if rows else 0.0
        rows.append(exit_row(server, mode, count, exit_timeout, floor))
        print(f"  exit {mode}: {rows[-1]['exit_seconds']:.2f} s", file=sys.stderr)
    return rows


def print_exit(rows: list[dict[str, Any]]) -> None:
    print_table(
        "Exit: a child logs N tagged records and returns from main; wall time from its last log "
        "call to the end of the process (within deadline: exit time beyond the no-handler "
        "child's ≤ exit_timeout)",
        [
            ("mode", "receiver"),
            ("records", "records"),
            ("exit_timeout", "exit_timeout s"),
            ("exit_seconds", "exit s"),
            ("x_exit_timeout", "x exit_timeout"),
            ("beyond_interpreter", "s beyond no-handler exit"),
            ("met", "within deadline"),
            ("arrived", "arrived"),
            ("unanswered_records", "sent, unanswered"),
            ("returncode", "exit code"),
            ("stderr_lines", "stderr lines"),
        ],
        rows,
    )


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (smaller counts)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this file")
    parser.add_argument("--sections", default="memory,exit", help="memory,exit or one of them")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--exit-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child)
        return 0
    if args.exit_child:
        url, count, exit_timeout = args.exit_child
        exit_child(url, int(count), float(exit_timeout))
        return 0
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    env = environment()
    started = time.perf_counter()
    results: dict[str, Any] = {"environment": env, "quick": args.quick}
    with ServerProcess() as server:
        if "memory" in sections:
            results["memory"] = memory(server, args.quick)
        if "exit" in sections:
            results["exit"] = exit_rows(server, args.quick)
    results["seconds"] = time.perf_counter() - started
    print()
    print_environment(env)
    if "memory" in results:
        print_memory(results["memory"])
    if "exit" in results:
        print_exit(results["exit"])
    print(f"\nran in {results['seconds']:.0f} s")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

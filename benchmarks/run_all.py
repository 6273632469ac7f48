"""Run every benchmark script and print one combined table (and, with ``--json``, one file).

Each script runs in its own interpreter, one after the other (``bench_consumers.py``,
``bench_bounds.py``, ``bench_handler.py``, ``bench_instrument.py``), each writing its own JSON;
this wrapper then puts the headline figures side by side:

* one row per client (the comparison from ``bench_consumers.py``): caller CPU and wall time per
  call as ratios to a ``NullHandler`` logging the same record (min / median of interleaved
  rounds), the tagged call's p99, records/s at 0 and 50 ms and their ratio to the official
  ``BufferedConsumer``, process CPU per 10 000 records and sender CPU per record;
* mp_logbridge's bounds (``bench_bounds.py``): memory rows and exit rows;
* the handler's and the decorator's closer looks (``bench_handler.py``, ``bench_instrument.py``).

``--quick`` passes ``--quick`` to every script: a smoke run (well under a minute) that exercises
every subject once; its figures are not meant to be compared.

Usage: ``python benchmarks/run_all.py [--quick] [--json all.json] [--logs DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import HERE, cell, child_env, environment, print_environment, print_table, write_json

SCRIPTS = ("bench_consumers", "bench_bounds", "bench_handler", "bench_instrument")


def run_script(name: str, quick: bool, folder: Path, logs: Path | None) -> dict[str, Any]:
    """Run one script; its JSON, exit code, duration and the load average around it."""
    out = folder / f"{name}.json"
    command = [sys.executable, str(HERE / f"{name}.py"), "--json", str(out)]
    if quick:
        command.append("--quick")
    load_before = os.getloadavg()
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=child_env())
    seconds = time.perf_counter() - began
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{name}.txt").write_text(done.stdout + done.stderr, encoding="utf-8")
    print(f"  {name}: {seconds:.0f} s, exit code {done.returncode}", file=sys.stderr)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
    data: dict[str, Any] = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
    return {
        "returncode": done.returncode,
        "seconds": seconds,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "data": data,
    }


def _pair(first: Any, second: Any) -> str:
    """``"a / b"`` (min / median, or two latencies) in one cell."""
    return f"{cell(first)} / {cell(second)}"


def client_rows(consumers: dict[str, Any]) -> list[dict[str, Any]]:
    caller = consumers.get("caller", {})
    throughput = consumers.get("throughput", {})
    by_key: dict[str, dict[str, Any]] = {}
    for state, rows in caller.items():
        for row in rows:
            entry = by_key.setdefault(row["key"], {"subject": row["subject"]})
            entry[state] = row
    for latency, rows in throughput.items():
        for row in rows:
            entry = by_key.setdefault(row["key"], {"subject": row["subject"]})
            entry[f"tp {latency}"] = row
    table = []
    for key, entry in by_key.items():
        zero, fifty, down = entry.get("0 ms", {}), entry.get("50 ms", {}), entry.get("down", {})
        tp0, tp50 = entry.get("tp 0 ms", {}), entry.get("tp 50 ms", {})
        table.append(
            {
                "key": key,
                "subject": entry["subject"],
                "untagged_cpu": _pair(
                    zero.get("untagged_cpu_x_min"), zero.get("untagged_cpu_x_median")
                ),
                "tagged_cpu": _pair(zero.get("tagged_cpu_x_min"), zero.get("tagged_cpu_x_median")),
                "tagged_wall": _pair(
                    zero.get("tagged_wall_x_min"), zero.get("tagged_wall_x_median")
                ),
                "tagged_cpu_50_down": _pair(
                    fifty.get("tagged_cpu_x_min"), down.get("tagged_cpu_x_min")
                ),
                "p99": " / ".join(
                    cell(state.get("p99_us_median")) for state in (zero, fifty, down)
                ),
                "rate_0": _pair(tp0.get("per_second_max"), tp0.get("per_second_median")),
                "x_buffered_0": tp0.get("x_buffered_median"),
                "rate_50": _pair(tp50.get("per_second_max"), tp50.get("per_second_median")),
                "x_buffered_50": tp50.get("x_buffered_median"),
                "process_cpu_10k": _pair(
                    tp0.get("process_cpu_10k_median"), tp50.get("process_cpu_10k_median")
                ),
                "sender_cpu_us": _pair(
                    tp0.get("sender_cpu_us_min"), tp0.get("sender_cpu_us_median")
                ),
                "delivered": _delivered(zero, fifty, tp0, tp50),
            }
        )
    return table


def _delivered(*rows: dict[str, Any]) -> str | None:
    """``delivered/sent`` over the runs that deliver, with duplicates if any."""
    sent = sum(row.get("sent") or 0 for row in rows)
    delivered = sum(row.get("delivered") or 0 for row in rows)
    duplicates = sum(row.get("duplicates") or 0 for row in rows)
    if not sent:
        return None
    return f"{delivered:,}/{sent:,}" + (f" ({duplicates:,} dup)" if duplicates else "")


CLIENT_COLUMNS = [
    ("subject", "client"),
    ("untagged_cpu", "untagged CPU xNull min/med"),
    ("tagged_cpu", "tagged CPU xNull min/med"),
    ("tagged_wall", "tagged wall xNull min/med"),
    ("tagged_cpu_50_down", "tagged CPU xNull 50ms/down"),
    ("p99", "tagged p99 µs 0/50/down"),
    ("rate_0", "rec/s 0 ms max/med"),
    ("x_buffered_0", "xBuffered"),
    ("rate_50", "rec/s 50 ms max/med"),
    ("x_buffered_50", "xBuffered"),
    ("process_cpu_10k", "proc CPU s/10k 0/50 ms"),
    ("sender_cpu_us", "sender CPU µs/rec min/med"),
    ("delivered", "delivered/sent"),
]


def bound_rows(bounds: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for row in bounds.get("memory", []):
        peak = row.get("extrapolated_peak_bytes") or row.get("peak_bytes") or 0
        rows.append(
            {
                "case": f"memory: {row['case']}",
                "figure": f"{cell(row.get('figure'))} {row.get('unit', '')}",
                "detail": f"peak {peak / 1e6:.1f} MB, held {row.get('held')}, "
                f"dropped {row.get('dropped')}"
                + (
                    f", receiver wrote {row['body_bytes_sent'] / 2**20:.0f} MiB of the body"
                    if row.get("body_bytes_sent") is not None
                    else ""
                ),
                "promise": row.get("promise"),
                "met": row.get("met"),
            }
        )
    for row in bounds.get("exit", []):
        rows.append(
            {
                "case": f"exit: {row['records']:,} records, receiver {row['mode']}",
                "figure": f"{cell(row.get('exit_seconds'))} s",
                "detail": f"exit_timeout {row['exit_timeout']} s, arrived {row['arrived']:,}, "
                f"exit code {row['returncode']}",
                "promise": None if row["mode"] == "no handler" else "≤ exit_timeout",
                "met": row.get("met"),
            }
        )
    return rows


def closer_rows(handler: dict[str, Any], instrument: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for row in handler.get("interleaved", {}).get("rows", []):
        if row["handler"] == "NullHandler":
            continue
        rows.append(
            {
                "figure": f"{row['handler']}, {row['call']}: caller CPU / wall xNullHandler "
                "(min; median)",
                "value": f"{cell(row['cpu_x_null'])} / {cell(row['wall_x_null'])}; "
                f"{cell(row['median_cpu_x_null'])} / {cell(row['median_x_null'])}",
            }
        )
    by_subject = {row["subject"]: row for row in instrument.get("rows", [])}
    if by_subject:
        rows.append(
            {
                "figure": "@instrument disabled / wrapt no-op (fastest rounds)",
                "value": cell(by_subject["instrument, disabled"]["vs_wrapt"]),
            }
        )
        enabled = by_subject["instrument, enabled"]["fastest"]
        by_hand = by_subject["tagged log.info"]["fastest"]
        rows.append(
            {
                "figure": "@instrument enabled / hand-written tagged log.info",
                "value": cell(enabled / by_hand),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run of every script")
    parser.add_argument("--json", metavar="PATH", help="write all figures to this file")
    parser.add_argument("--logs", metavar="DIR", help="keep each script's printed tables here")
    args = parser.parse_args(argv)
    env = environment()
    started = time.perf_counter()
    results: dict[str, Any] = {"environment": env, "quick": args.quick, "scripts": {}}
    with tempfile.TemporaryDirectory() as folder:
        for name in SCRIPTS:
            results["scripts"][name] = run_script(
                name, args.quick, Path(folder), Path(args.logs) if args.logs else None
            )
    results["seconds"] = time.perf_counter() - started
    data = {name: run["data"] for name, run in results["scripts"].items()}
    results["clients"] = client_rows(data["bench_consumers"])
    results["bounds"] = bound_rows(data["bench_bounds"])
    results["closer"] = closer_rows(data["bench_handler"], data["bench_instrument"])
    print()
    print_environment(env)
    loads = ", ".join(
        f"{name} {run['load_before'][0]:.2f}" for name, run in results["scripts"].items()
    )
    print(f"load average (1 min) before each script: {loads}")
    print_table(
        "Clients side by side (x = ratio to a NullHandler logging the same record; 0 ms unless "
        "stated; rates and CPU from interleaved send-then-flush runs)",
        CLIENT_COLUMNS,
        results["clients"],
    )
    print_table(
        "mp_logbridge bounds (each row a fresh child process)",
        [
            ("case", "case"),
            ("figure", "figure"),
            ("detail", "detail"),
            ("promise", "promise"),
            ("met", "met"),
        ],
        results["bounds"],
    )
    print_table("Closer looks", [("figure", "figure"), ("value", "value")], results["closer"])
    failed = [name for name, run in results["scripts"].items() if run["returncode"] != 0]
    print(
        f"\nran in {results['seconds']:.0f} s"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    write_json(args.json, results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

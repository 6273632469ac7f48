"""``mp-logbridge spool PATH [--drain]``: what a durable spool directory holds, and draining it.

Kept apart from the other commands; ``_cli`` adds the parser and calls :func:`run`. Problems
with the command line raise :class:`~mp_logbridge.ConfigurationError` (one line, exit 2).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, TextIO

from ._errors import ConfigurationError

__all__ = ["add_parser", "run"]

EXIT_OK, EXIT_INCOMPLETE = 0, 1


def add_parser(commands: Any) -> None:
    """Add the ``spool`` command to the ``mp-logbridge`` parser."""
    spool = commands.add_parser(
        "spool",
        help="show what a durable spool directory holds; --drain delivers it",
        description="Show the files of a spool directory (spool= / MIXPANEL_SPOOL): whose they "
        "are, how many records wait and for which destination. With --drain, deliver what "
        "processes that are gone left behind, each record to the destination it was written "
        "for, then exit (run it after the application exited: files of running processes are "
        "left to them). Exit codes: 0 done (nothing orphaned left), 1 records left (Mixpanel "
        "unreachable, no matching /import credentials), 2 usage error.",
    )
    spool.add_argument("path", metavar="PATH", help="the spool directory")
    spool.add_argument("--drain", action="store_true", help="deliver orphaned files, then exit")
    spool.add_argument(
        "--timeout",
        type=float,
        help="with --drain: stop after this many seconds (default: when everything is "
        "delivered or the retries for a destination run out)",
    )
    spool.add_argument(
        "--request-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for each response (default 10)",
    )
    spool.add_argument("--json", action="store_true", help="print the report as JSON")
    spool.add_argument(
        "--username",
        help="service-account username, for /import rows and events older than "
        "5 days (default: MIXPANEL_SERVICE_ACCOUNT_USERNAME)",
    )
    spool.add_argument(
        "--secret", help="service-account secret (default: MIXPANEL_SERVICE_ACCOUNT_SECRET)"
    )
    spool.add_argument("--project-id", help="project id (default: MIXPANEL_PROJECT_ID)")
    spool.add_argument(
        "--api-secret",
        help="project API secret instead of a service account (default: MIXPANEL_API_SECRET)",
    )


def _ago(ms: int | None) -> str:
    if ms is None:
        return "?"
    seconds = max(0.0, time.time() - ms / 1000.0)
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            value = seconds / size
            return f"{value:.1f} {unit}{'s' if unit == 'day' and value >= 2 else ''} ago"
    return f"{seconds:.0f} s ago"


def _size(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def run(args: argparse.Namespace, out: TextIO) -> int:
    """Run ``mp-logbridge spool``; returns the exit code."""
    from ._cli import _import_credentials
    from .spool import drain_spool, inspect_spool

    if args.timeout is not None and not args.timeout > 0:
        raise ConfigurationError("--timeout must be a positive number of seconds")
    if not args.request_timeout > 0:
        raise ConfigurationError("--request-timeout must be a positive number of seconds")
    if not Path(args.path).is_dir():
        raise ConfigurationError(f"not a directory: {args.path}")
    args.dry_run = False
    if args.drain:
        result = drain_spool(
            args.path,
            credentials=_import_credentials(args, required=False),
            timeout=args.timeout,
            request_timeout=args.request_timeout,
        )
        if args.json:
            out.write(
                json.dumps(
                    {
                        "delivered": result.delivered,
                        "dropped": result.dropped,
                        "left": result.left,
                        "files": result.files,
                        "live": [str(path) for path in result.live],
                        "elapsed": round(result.elapsed, 3),
                    }
                )
                + "\n"
            )
        else:
            dropped = ", ".join(f"{reason} {n:,}" for reason, n in result.dropped.items())
            out.write(
                f"delivered {result.delivered:,} record(s) from {result.files} file(s) in "
                f"{result.elapsed:.1f} s" + (f"; dropped: {dropped}" if dropped else "") + "\n"
            )
            if result.left:
                out.write(
                    f"{result.left:,} record(s) are still in the spool (see the warnings above); "
                    "run the command again later\n"
                )
            if result.live:
                out.write(
                    f"{len(result.live)} file(s) belong to running processes and were left to them\n"
                )
        return EXIT_OK if result.complete else EXIT_INCOMPLETE
    report = inspect_spool(args.path)
    if args.json:
        out.write(
            json.dumps(
                {
                    "directory": str(report.directory),
                    "records": report.records,
                    "file_bytes": report.file_bytes,
                    "files": [
                        {
                            "path": str(item.path),
                            "state": item.state,
                            "pid": item.pid,
                            "records": item.records,
                            "bytes": item.bytes,
                            "file_bytes": item.file_bytes,
                            "oldest_ms": item.oldest_ms,
                            "problem": item.problem,
                            "lanes": [vars(lane) for lane in item.lanes],
                        }
                        for item in report.files
                    ],
                    "set_aside": [str(path) for path in report.set_aside],
                }
            )
            + "\n"
        )
        return EXIT_OK
    out.write(
        f"{report.directory}: {len(report.files)} spool file(s), {report.records:,} record(s), "
        f"{_size(report.file_bytes)} on disk\n"
    )
    states = {
        "live": "owned by a running process",
        "orphaned": "orphaned: its process is gone",
        "corrupt": "corrupt: it will be set aside",
        "unreadable": "unreadable",
    }
    for item in report.files:
        who = f" (pid {item.pid})" if item.pid is not None else ""
        out.write(f"  {item.path.name}{who}: {states.get(item.state, item.state)}")
        if item.records:
            out.write(f", {item.records:,} record(s), oldest {_ago(item.oldest_ms)}")
        out.write("\n")
        if item.problem:
            out.write(f"      {item.problem}\n")
        for lane in item.lanes:
            notes = []
            if lane.taken:
                notes.append(f"{lane.taken:,} taken for sending")
            if lane.credentials:
                notes.append("needs its /import credentials")
            extra = f" ({'; '.join(notes)})" if notes else ""
            out.write(
                f"      {lane.kind:<15} {lane.url}  {lane.records:,} record(s), "
                f"{_size(lane.bytes)}{extra}\n"
            )
    for path in report.set_aside:
        out.write(f"  {path.name}: set aside (never read again; delete it when done with it)\n")
    if report.orphaned_records:
        out.write(
            "orphaned records are delivered by the next process using this spool, or now with: "
            f"mp-logbridge spool {args.path} --drain\n"
        )
    return EXIT_OK

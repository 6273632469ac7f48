"""The ``mp-logbridge`` command (also ``python -m mp_logbridge``).

* ``demo`` — the library end to end against an embedded local receiver; no account needed.
* ``serve`` — run the local receiver in the foreground, printing what arrives.
* ``import`` — bulk-import historical events from JSON-lines or JSON-array files into ``/import``.
* ``relay`` — deliver records a fleet wrote to a Redis Stream (``_relay_cli``).
* ``spool`` — show what a durable spool directory holds; ``--drain`` delivers it and exits.

Errors are one line naming what to fix (exit code 2), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ._errors import MixpanelError
from ._records import MAX_BATCH_RECORDS
from ._relay_cli import UsageError as _RelayUsageError
from ._relay_cli import add_parser as add_relay_parser
from ._retry import RetryPolicy
from ._spool_cli import add_parser as add_spool_parser
from ._transport import REGIONS, Credentials, ServiceAccount, as_credentials, resolve_endpoints
from ._version import __version__

__all__ = ["main"]

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _UsageError(Exception):
    """A problem with the command line or the environment, reported in one line."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mp-logbridge",
        description="Mixpanel analytics from Python logging: demo, local receiver, historical import.",
    )
    parser.add_argument("--version", action="version", version=f"mp_logbridge {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    commands.add_parser(
        "demo",
        help="run a small app that uses every front door against an embedded local receiver",
        description="Start a local Mixpanel receiver, send events, profile, group and revenue "
        "updates through logging, decorated functions, structlog and a Tracker, and print what arrived.",
    )

    serve = commands.add_parser(
        "serve",
        help="run a local Mixpanel receiver and print every record it accepts",
        description="Run a Mixpanel ingestion API on loopback (point applications at it with "
        "api_host=http://127.0.0.1:PORT or MIXPANEL_API_HOST). Ctrl-C stops it.",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=8123,
        help="port to listen on (default 8123; 0 picks a free one)",
    )
    serve.add_argument(
        "--jsonl", metavar="FILE", help="also append every accepted record to FILE as JSON lines"
    )
    serve.add_argument(
        "--service-account",
        metavar="USER:SECRET:PROJECT_ID",
        help="credentials /import requires (default: any Basic credentials)",
    )
    serve.add_argument(
        "--token",
        help="the project token: records carrying another one are refused, as Mixpanel refuses "
        "data for another project (default: any token)",
    )
    serve.add_argument(
        "--quiet", action="store_true", help="do not print records (only the summary at exit)"
    )

    imp = commands.add_parser(
        "import",
        help="import historical events from JSON-lines or JSON-array files into /import",
        description="Import events from files (one Mixpanel event, or one JSON log line carrying "
        "the tag, per line; or one JSON array of them; plain or gzipped; '-' reads standard "
        "input) with service-account credentials. What was imported is kept in a progress file: "
        "running the same command again sends only what was not (refused, undelivered, changed "
        "or new lines). Exit codes: 0 all imported, 1 some lines rejected or records not "
        "delivered, 2 usage or credentials error, 130 interrupted.",
    )
    imp.add_argument(
        "files", nargs="+", metavar="FILE", help="JSON-lines or JSON-array files, or - for stdin"
    )
    where = imp.add_mutually_exclusive_group()
    where.add_argument(
        "--region",
        choices=sorted(REGIONS),
        help="data-residency region (default: MIXPANEL_REGION or us)",
    )
    where.add_argument(
        "--api-host",
        metavar="URL",
        help="send to this host or URL instead (default: MIXPANEL_API_HOST)",
    )
    imp.add_argument(
        "--username", help="service-account username (default: MIXPANEL_SERVICE_ACCOUNT_USERNAME)"
    )
    imp.add_argument(
        "--secret", help="service-account secret (default: MIXPANEL_SERVICE_ACCOUNT_SECRET)"
    )
    imp.add_argument("--project-id", help="project id (default: MIXPANEL_PROJECT_ID)")
    imp.add_argument(
        "--api-secret",
        help="project API secret instead of a service account (default: MIXPANEL_API_SECRET)",
    )
    imp.add_argument(
        "--token", help="project token, needed for tagged log lines (default: MIXPANEL_TOKEN)"
    )
    imp.add_argument(
        "--tag", default="mixpanel", help="tag attribute of JSON log lines (default: mixpanel)"
    )
    imp.add_argument(
        "--batch-size",
        type=int,
        default=MAX_BATCH_RECORDS,
        help="records per request (at most 2000)",
    )
    imp.add_argument("--workers", type=int, default=4, help="parallel requests (1-20, default 4)")
    imp.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for each response (default 30)"
    )
    imp.add_argument(
        "--state",
        metavar="FILE",
        help="progress file (default: one per destination and set of files under "
        "$XDG_STATE_HOME/mp-logbridge/import, ~/.local/state by default)",
    )
    imp.add_argument(
        "--no-resume",
        "--restart",
        dest="no_resume",
        action="store_true",
        help="ignore the saved progress and send everything again (the progress is replaced)",
    )
    imp.add_argument(
        "--rejects",
        metavar="FILE",
        help="write every rejected line's file, line and reason to FILE (JSON lines)",
    )
    imp.add_argument(
        "--dry-run",
        action="store_true",
        help="check every record with the server's rules; send nothing, keep no progress",
    )
    add_relay_parser(commands)  # scale-out: kept in its own module

    add_spool_parser(commands)  # the durable spool: kept in its own module
    return parser


# --------------------------------------------------------------------------- serve


def _serve(args: argparse.Namespace, out: TextIO) -> int:
    from .testing import MixpanelServer, SpecViolation

    account = None
    if args.service_account:
        parts = args.service_account.split(":")
        if len(parts) != 3 or not all(parts):
            raise _UsageError("--service-account must look like USER:SECRET:PROJECT_ID")
        account = tuple(parts)
    if args.token is not None and not args.token.strip():
        raise _UsageError("--token must not be empty")
    sink = open(args.jsonl, "a", encoding="utf-8") if args.jsonl else None  # noqa: SIM115
    lock = threading.Lock()

    def write(line: str) -> None:
        with lock:
            out.write(line + "\n")
            out.flush()

    def show(kind: str, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        if not args.quiet:
            write(f"{kind:<16} {line}")
        if sink is not None:
            with lock:
                sink.write(json.dumps({"kind": kind, "record": record}, ensure_ascii=False) + "\n")
                sink.flush()

    def refused(path: str, record: Any, reason: str) -> None:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
        write(f"{'refused ' + path:<16} {reason}: {line[:2000]}")

    def violation(found: SpecViolation) -> None:
        if found.index is None:  # a refused record is shown by `refused`
            write(f"{'refused ' + found.path:<16} [{found.rule}] {found.message}")

    try:
        server = MixpanelServer(
            port=args.port,
            service_account=account,
            token=args.token,
            on_record=show,
            on_invalid=refused,
            on_violation=violation,
        ).start()
    except OSError as exc:
        raise _UsageError(
            f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc}"
        ) from None
    out.write(f"Mixpanel receiver listening at {server.url} (Ctrl-C to stop)\n")
    out.write(
        f"Point an application at it with api_host={server.url!r} or MIXPANEL_API_HOST={server.url}\n"
    )
    out.flush()
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop()
        if sink is not None:
            sink.close()
    counts = {
        name: len(getattr(server, name))
        for name in ("events", "profile_updates", "group_updates", "imports")
    }
    out.write(
        "\nstopped; received "
        + ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in counts.items())
        + f"; refused {len(server.invalid)} records"
        + f"; {len(server.spec_violations)} spec violations\n"
    )
    return EXIT_OK


# --------------------------------------------------------------------------- import


def _env_or(value: str | None, name: str) -> str | None:
    return value if value is not None else (os.environ.get(name) or None)


def _check_inputs(names: Sequence[str]) -> None:
    seen: set[str] = set()
    for name in names:
        key = name if name == "-" else os.path.realpath(name)
        if key in seen:
            raise _UsageError(f"{'standard input (-)' if name == '-' else name} is given twice")
        seen.add(key)
        if name != "-" and not Path(name).exists():
            raise _UsageError(f"no such file: {name}")
        if name != "-" and Path(name).is_dir():
            raise _UsageError(f"{name} is a directory")


def _import_credentials(args: argparse.Namespace, *, required: bool = True) -> Credentials | None:
    username = _env_or(args.username, "MIXPANEL_SERVICE_ACCOUNT_USERNAME")
    secret = _env_or(args.secret, "MIXPANEL_SERVICE_ACCOUNT_SECRET")
    project = _env_or(args.project_id, "MIXPANEL_PROJECT_ID")
    api_secret = _env_or(args.api_secret, "MIXPANEL_API_SECRET")
    credentials: Credentials | None = None
    if username or secret or project:
        missing = [
            flag
            for flag, value in (
                ("--username", username),
                ("--secret", secret),
                ("--project-id", project),
            )
            if not value
        ]
        if missing:
            raise _UsageError(
                f"a service account needs {', '.join(missing)} too (or the MIXPANEL_* variables)"
            )
        credentials = ServiceAccount(username, secret, project)  # type: ignore[arg-type]
    credentials = as_credentials(credentials, api_secret)
    if credentials is None and required and not args.dry_run:
        raise _UsageError(
            "importing needs credentials: --username/--secret/--project-id (a service account) or --api-secret"
        )
    return credentials


def _import(args: argparse.Namespace, out: TextIO) -> int:
    from ._importer import Importer, ImportOptions, Rejected

    _check_inputs(args.files)
    if not 1 <= args.batch_size <= MAX_BATCH_RECORDS:
        raise _UsageError(f"--batch-size must be between 1 and {MAX_BATCH_RECORDS}")
    if not 1 <= args.workers <= 20:
        raise _UsageError(
            "--workers must be between 1 and 20 (Mixpanel suggests at most 10-20 concurrent clients)"
        )
    if not args.timeout > 0:
        raise _UsageError("--timeout must be a positive number of seconds")
    credentials = _import_credentials(args)
    options = ImportOptions(
        files=list(args.files),
        endpoints=resolve_endpoints(region=args.region, api_host=args.api_host),
        credentials=credentials,
        request_timeout=args.timeout,
        retry=RetryPolicy(),  # the background consumer's rules
        batch_size=args.batch_size,
        workers=args.workers,
        dry_run=args.dry_run,
        state_path=args.state,
        resume=not args.no_resume,
        tag=args.tag,
        token=_env_or(args.token, "MIXPANEL_TOKEN"),
    )
    rejects = open(args.rejects, "w", encoding="utf-8") if args.rejects else None  # noqa: SIM115

    def write_reject(item: Rejected) -> None:
        if rejects is not None:
            record = {"file": item.path, "line": item.line, "reason": item.reason}
            rejects.write(json.dumps(record) + "\n")

    try:
        summary = Importer(options, on_reject=write_reject).run()
    finally:
        if rejects is not None:
            rejects.close()
    _print_import_summary(args, summary, out)
    if summary.fatal:
        sys.stderr.write(f"mp-logbridge: error: {summary.fatal}\n")
        return EXIT_USAGE
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if summary.ok else EXIT_INCOMPLETE


def _print_import_summary(args: argparse.Namespace, summary: Any, out: TextIO) -> None:
    if summary.rejected:
        out.write("rejected:\n")
        for item in summary.rejected[:20]:
            out.write(f"  {item}\n")
        if summary.rejected_count > 20:
            hint = (
                f" (all in {args.rejects})" if args.rejects else " (use --rejects FILE to list all)"
            )
            out.write(f"  ... and {summary.rejected_count - 20:,} more{hint}\n")
    verb = "valid" if args.dry_run else "imported"
    rate = summary.lines / summary.elapsed if summary.elapsed > 0 else 0.0
    parts = [
        f"{verb} {summary.imported:,} record(s) from {summary.lines:,} line(s) "
        f"in {summary.elapsed:.1f} s ({rate:,.0f} lines/s)"
    ]
    if summary.rejected_count:
        parts.append(f"{summary.rejected_count:,} rejected")
    if summary.undelivered:
        parts.append(f"{summary.undelivered:,} record(s) not delivered")
    if summary.skipped_lines:
        parts.append(f"{summary.skipped_lines:,} line(s) skipped, imported by an earlier run")
    out.write("; ".join(parts) + "\n")
    if not summary.lines and summary.skipped_lines and summary.ok:
        out.write(
            "nothing to import: every line was imported by an earlier run "
            "(--no-resume sends them again)\n"
        )
    if summary.undelivered and not summary.fatal and not summary.interrupted:
        why = f" ({summary.gave_up})" if summary.gave_up else ""
        out.write(
            f"not delivered after retrying{why}; run the same command again later to send them\n"
        )
    if summary.interrupted:
        out.write("interrupted; run the same command again to resume\n")
    if summary.progress_error:
        out.write(f"warning: {summary.progress_error}\n")
    elif summary.progress_path and not args.dry_run:
        out.write(f"progress saved in {summary.progress_path}\n")


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line; returns the exit code."""
    stream = out or sys.stdout
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from ._demo import run_demo

            return run_demo(stream)
        if args.command == "serve":
            return _serve(args, stream)
        if args.command == "relay":  # scale-out: kept in its own module
            from ._relay_cli import run as run_relay

            return run_relay(args, stream)
        if args.command == "spool":  # the durable spool: kept in its own module
            from ._spool_cli import run as run_spool

            return run_spool(args, stream)
        return _import(args, stream)
    except KeyboardInterrupt:
        sys.stderr.write("mp-logbridge: interrupted\n")
        return EXIT_INTERRUPTED
    except (_UsageError, _RelayUsageError, MixpanelError) as exc:
        sys.stderr.write(f"mp-logbridge: error: {exc}\n")
        return EXIT_USAGE
    except OSError as exc:
        sys.stderr.write(
            f"mp-logbridge: error: {exc.strerror or exc}: {exc.filename or ''}\n".replace(
                ": \n", "\n"
            )
        )
        return EXIT_USAGE


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())

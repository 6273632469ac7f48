"""``mp-logbridge relay``: run one relay worker, or replay the dead-letter stream.

Kept apart from the other commands; ``_cli`` adds the parser and calls :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from ._errors import ConfigurationError
from ._records import MAX_BATCH_RECORDS
from ._transport import Credentials, ProjectSecret, ServiceAccount

__all__ = ["add_parser", "run"]

_DESCRIPTION = """\
Deliver records that producers (RedisStreamConsumer, or front doors with MIXPANEL_REDIS_URL)
wrote to a Redis Stream. Run any number of workers with the same --group: each reads its share,
delivers it in batches, acknowledges an entry only after Mixpanel accepted its record, moves
records Mixpanel refused to STREAM:dead with the reason, and takes over entries left idle by a
worker that died. SIGTERM or Ctrl-C stops reading, finishes what is in flight (--stop-timeout)
and exits. Exit codes: 0 stopped with nothing left over, 1 stopped with records handed back to
the other workers, 2 usage error, 3 Redis unreachable at start, 70 unexpected error, 130 a
second interrupt."""


def add_parser(commands: Any) -> None:
    """Add the ``relay`` command to the ``mp-logbridge`` parser."""
    relay = commands.add_parser(
        "relay",
        help="deliver records from a Redis Stream (run several: one consumer group)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    relay.add_argument("--redis", metavar="URL", help="Redis URL (default: MIXPANEL_REDIS_URL)")
    relay.add_argument("--stream", help="stream key (default: MIXPANEL_STREAM, then 'mixpanel')")
    relay.add_argument(
        "--group", default="mp-logbridge", help="consumer group (default: mp-logbridge)"
    )
    relay.add_argument(
        "--consumer", help="this worker's name in the group (default: host-pid-random)"
    )
    relay.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="LABEL=URL",
        help="send entries whose destination is LABEL (or URL itself) to URL; the regions us, "
        "eu and in are known already (repeatable)",
    )
    relay.add_argument(
        "--credentials",
        metavar="FILE",
        help="JSON file of /import credentials by project: "
        '{"PROJECT_ID": {"username": ..., "secret": ...}} or {"NAME": {"api_secret": ...}}; '
        "MIXPANEL_SERVICE_ACCOUNT_USERNAME/_SECRET with MIXPANEL_PROJECT_ID add one",
    )
    relay.add_argument("--default-project", help="project for /import entries that name none")
    relay.add_argument(
        "--claim-idle",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="take over entries idle this long on another worker (default 60)",
    )
    relay.add_argument(
        "--max-rate",
        type=float,
        metavar="N",
        help="records per second per project, shared by all workers (kept in Redis)",
    )
    relay.add_argument(
        "--burst", type=float, metavar="N", help="records at once (default: max(N, batch size))"
    )
    relay.add_argument(
        "--batch-size",
        type=int,
        default=MAX_BATCH_RECORDS,
        help="records per request (at most 2000)",
    )
    relay.add_argument(
        "--timeout", type=float, default=10.0, help="seconds per request (default 10)"
    )
    relay.add_argument(
        "--max-in-flight",
        type=int,
        default=2,
        help="requests under way at once per destination and endpoint (default 2)",
    )
    relay.add_argument(
        "--max-held",
        type=int,
        default=20_000,
        help="records one worker holds at most (default 20000)",
    )
    relay.add_argument(
        "--stop-timeout",
        type=float,
        default=25.0,
        metavar="SECONDS",
        help="on SIGTERM, seconds to finish what is in flight (default 25)",
    )
    relay.add_argument(
        "--stats-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds between JSON progress lines on stdout (0: none; default 10)",
    )
    relay.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds to wait for Redis at start (default 30)",
    )
    relay.add_argument(
        "--keep-delivered",
        action="store_true",
        help="keep acknowledged entries in the stream (default: delete them; keep them when "
        "other consumer groups read the same stream)",
    )
    relay.add_argument(
        "--dead-maxlen", type=int, metavar="N", help="keep STREAM:dead to about N entries"
    )
    relay.add_argument(
        "--until-empty",
        action="store_true",
        help="exit 0 once the group has nothing left (no entry unread or pending)",
    )
    relay.add_argument(
        "--replay-dead",
        action="store_true",
        help="move the entries of STREAM:dead back to STREAM (after a fix) and exit; running "
        "workers deliver them",
    )
    relay.add_argument(
        "--limit", type=int, metavar="N", help="with --replay-dead: at most N entries"
    )


class UsageError(Exception):
    """A problem with the command line, reported in one line."""


def _routes(values: list[str]) -> dict[str, str]:
    routes = {}
    for value in values:
        label, sep, url = value.partition("=")
        if not sep or not label.strip() or not url.strip():
            raise UsageError(f"--route must look like LABEL=URL, got {value!r}")
        routes[label.strip()] = url.strip()
    return routes


def _credentials(path: str | None) -> dict[str, Credentials]:
    result: dict[str, Credentials] = {}
    if path:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read --credentials {path}: {exc}") from None
        if not isinstance(data, dict):
            raise UsageError("--credentials must hold a JSON object keyed by project")
        for project, entry in data.items():
            if not isinstance(entry, dict):
                raise UsageError(f"--credentials: project {project!r} needs an object")
            try:
                if "api_secret" in entry:
                    result[str(project)] = ProjectSecret(entry["api_secret"])
                else:
                    result[str(project)] = ServiceAccount(
                        entry.get("username"),  # type: ignore[arg-type]
                        entry.get("secret"),  # type: ignore[arg-type]
                        str(entry.get("project_id", project)),
                    )
            except ConfigurationError as exc:
                raise UsageError(f"--credentials: project {project!r}: {exc}") from None
    username = os.environ.get("MIXPANEL_SERVICE_ACCOUNT_USERNAME")
    secret = os.environ.get("MIXPANEL_SERVICE_ACCOUNT_SECRET")
    project_id = os.environ.get("MIXPANEL_PROJECT_ID")
    if username and secret and project_id:
        result.setdefault(project_id, ServiceAccount(username, secret, project_id))
    return result


def run(args: argparse.Namespace, out: TextIO) -> int:
    """Run ``mp-logbridge relay``; returns the exit code."""
    from ._redis_stream import DEFAULT_STREAM, RedisBroker, wait_for_redis
    from ._relay import EXIT_INTERRUPTED, EXIT_OK, EXIT_REDIS_UNREACHABLE, Relay

    url = args.redis or os.environ.get("MIXPANEL_REDIS_URL")
    if not url:
        raise UsageError("give --redis URL (or set MIXPANEL_REDIS_URL)")
    stream = args.stream or os.environ.get("MIXPANEL_STREAM") or DEFAULT_STREAM
    for name in ("claim_idle", "timeout", "stop_timeout", "connect_timeout"):
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if args.stats_interval < 0:
        raise UsageError("--stats-interval must be 0 or more")
    if not 1 <= args.batch_size <= MAX_BATCH_RECORDS:
        raise UsageError(f"--batch-size must be between 1 and {MAX_BATCH_RECORDS}")
    broker = RedisBroker(
        url,
        stream,
        args.group,
        args.consumer,
        dead_maxlen=args.dead_maxlen,
        delete_delivered=not args.keep_delivered,
    )
    if args.replay_dead:
        try:
            wait_for_redis(url, args.connect_timeout)
            moved = broker.replay_dead(args.limit)
        except Exception as exc:
            if not isinstance(exc, (OSError, broker.redis.exceptions.RedisError)):
                raise
            sys.stderr.write(f"mp-logbridge: error: {broker.describe(exc)}\n")
            return EXIT_REDIS_UNREACHABLE
        finally:
            broker.close()
        out.write(
            f"replayed {moved:,} entr{'y' if moved == 1 else 'ies'} from {broker.dead_stream} to {stream}\n"
        )
        return EXIT_OK

    def stats_line(stats: dict[str, Any]) -> None:
        out.write(json.dumps(stats, separators=(",", ":")) + "\n")
        out.flush()

    relay = Relay(
        broker,
        routes=_routes(args.route),
        credentials=_credentials(args.credentials),
        default_project=args.default_project,
        claim_idle=args.claim_idle,
        max_rate=args.max_rate,
        burst=args.burst,
        batch_size=args.batch_size,
        max_in_flight=args.max_in_flight,
        request_timeout=args.timeout,
        max_held=args.max_held,
        stop_timeout=args.stop_timeout,
        stats_interval=args.stats_interval,
        on_stats=stats_line,
        connect_timeout=args.connect_timeout,
    )
    interrupts = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:  # asked twice: stop now; what is unfinished stays pending
            os._exit(EXIT_INTERRUPTED)
        relay.stop()

    previous: dict[signal.Signals, Callable[..., Any] | int | None] = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, on_signal)
    try:
        return relay.run(until_empty=args.until_empty)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

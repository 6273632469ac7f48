"""The durable spool: what a spool directory holds, and delivering it by hand.

Turn the spool on with ``spool="path/to/dir"`` on a :class:`~mp_logbridge.MixpanelHandler`,
a :class:`~mp_logbridge.MixpanelProcessor`, a :class:`~mp_logbridge.Tracker`, a
``dictConfig`` handler entry or a :class:`~mp_logbridge.BackgroundConsumer` (or set
``MIXPANEL_SPOOL``). Captured records are then committed to a SQLite file in that directory
(WAL mode, ``synchronous=NORMAL``; one file per consumer and process) at most
:data:`COMMIT_INTERVAL` seconds after the call, sent from there, and deleted once Mixpanel
acknowledged them. A process that dies in any way — ``kill -9``, a terminated pool worker,
``os._exit``, SIGTERM without a handler, an out-of-memory kill — loses at most the records of
its last commit window; the next process that uses the directory (or :func:`drain_spool`,
``mp-logbridge spool PATH --drain``) delivers the rest. ``durability="call"`` commits every
record before the call returns (no window, at the cost of one SQLite commit per call).

Delivery is at least once: a batch that was being sent when its process died is sent again.
Mixpanel de-duplicates events by ``$insert_id`` (fixed before the first write); profile and
group updates are not de-duplicated, so an ``$add``, an ``$append`` or a ``track_charge`` of
that one batch may apply twice.

This module holds the tools for operators: :func:`inspect_spool` (what is there, whose, how
old) and :func:`drain_spool` (deliver what processes that are gone left behind, then return).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._consumers import ErrorCallback
from ._diagnostics import DeliveryStats
from ._errors import ConfigurationError
from ._messages import KINDS
from ._records import MAX_BATCH_RECORDS, MAX_REQUEST_BYTES
from ._retry import RetryPolicy
from ._spool import COMMIT_INTERVAL, DEFAULT_MAX_SPOOL_BYTES, DURABILITY_MODES
from ._spool_drain import Drainer, parse_endpoints, run_drain
from ._spool_store import (
    CORRUPT_SUFFIX,
    FileReport,
    LaneReport,
    inspect_file,
    list_files,
)
from ._transport import Credentials, as_credentials, safe_url

__all__ = [
    "COMMIT_INTERVAL",
    "DEFAULT_MAX_SPOOL_BYTES",
    "DURABILITY_MODES",
    "DrainResult",
    "FileReport",
    "LaneReport",
    "SpoolReport",
    "drain_spool",
    "inspect_spool",
]


@dataclass
class SpoolReport:
    """What a spool directory holds.

    ``files`` lists each spool file with its state: ``"live"`` (a running process owns it),
    ``"orphaned"`` (its process is gone: the next process using the directory, or
    :func:`drain_spool`, delivers it), ``"corrupt"`` or ``"unreadable"``. ``set_aside`` lists the
    ``*.corrupt`` files that were moved out of the way (never read again; delete them at will).
    """

    directory: Path
    files: list[FileReport] = field(default_factory=list)
    set_aside: list[Path] = field(default_factory=list)

    @property
    def records(self) -> int:
        """Records in all readable files."""
        return sum(item.records for item in self.files)

    @property
    def orphaned_records(self) -> int:
        """Records in files whose process is gone."""
        return sum(item.records for item in self.files if item.state == "orphaned")

    @property
    def file_bytes(self) -> int:
        """Bytes the spool files take on disk (databases and their write-ahead logs)."""
        return sum(item.file_bytes for item in self.files)


@dataclass
class DrainResult:
    """What :func:`drain_spool` did: records ``delivered``, ``dropped`` by reason, records
    ``left`` in files it could not finish (Mixpanel unreachable, no matching ``/import``
    credentials), and ``live`` files it left alone because a running process owns them."""

    delivered: int
    dropped: dict[str, int]
    left: int
    files: int
    live: list[Path]
    elapsed: float

    @property
    def complete(self) -> bool:
        """Whether nothing that could be delivered is left behind."""
        return self.left == 0


def _url_of(kind: str, endpoints: str) -> str:
    parsed = parse_endpoints(endpoints)
    if parsed is None:
        return "(unusable destination)"
    if kind not in KINDS:
        return "(unknown kind)"
    return safe_url(parsed.url(kind))


def inspect_spool(path: str | os.PathLike[str]) -> SpoolReport:
    """Describe a spool directory without changing anything in it.

    Raises:
        ConfigurationError: ``path`` is not a directory.
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ConfigurationError(f"{path} is not a directory")
    report = SpoolReport(directory)
    for file in list_files(directory):
        report.files.append(inspect_file(file, _url_of))
    report.set_aside = sorted(directory.glob("*" + CORRUPT_SUFFIX))
    return report


def drain_spool(
    path: str | os.PathLike[str],
    *,
    credentials: Credentials | None = None,
    api_secret: str | None = None,
    timeout: float | None = None,
    request_timeout: float = 10.0,
    verify: bool | str = True,
    retry: RetryPolicy | Mapping[str, Any] | None = None,
    on_error: ErrorCallback | None = None,
) -> DrainResult:
    """Deliver what processes that are gone left in a spool directory, then return.

    Each orphaned file is taken over (its lock), delivered oldest record first to the
    destination it was written for, and deleted once empty; files of running processes are
    left alone. ``credentials``/``api_secret`` send ``/import`` rows and events older than the
    5 days ``/track`` accepts (only rows written with the same credentials). A lane is given up
    for this run when ``retry`` (default :class:`~mp_logbridge.consumers.RetryPolicy`) gives up, leaving
    its rows on disk; ``timeout`` bounds the whole run. Meant for a container's entrypoint after
    the application exited, or a cron job.

    Raises:
        ConfigurationError: ``path`` is not a directory, or an option is invalid.
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ConfigurationError(f"{path} is not a directory")
    if timeout is not None and not timeout > 0:
        raise ConfigurationError(f"timeout must be a positive number of seconds, got {timeout!r}")
    creds = as_credentials(credentials, api_secret)
    stats = DeliveryStats()
    drainer = Drainer(
        directory,
        own=None,
        endpoints=None,
        exporter=None,
        credentials=[creds] if creds is not None else [],
        timeout=request_timeout,
        verify=verify,
        retry=RetryPolicy.from_options(retry),
        batch_size=MAX_BATCH_RECORDS,
        max_batch_bytes=MAX_REQUEST_BYTES,
        flush_interval=COMMIT_INTERVAL,
        stats=stats,
        on_error=on_error,
        standalone=True,
        name="mp_logbridge-spool-drain",
    )
    started = time.monotonic()
    run_drain(drainer, timeout)
    elapsed = time.monotonic() - started
    after = inspect_spool(directory)
    snapshot = stats.snapshot()
    return DrainResult(
        delivered=snapshot["sent"],
        dropped={reason: n for reason, n in snapshot["dropped"].items() if n},
        left=after.orphaned_records,
        files=drainer.adopted_files,
        live=[item.path for item in after.files if item.state == "live"],
        elapsed=elapsed,
    )

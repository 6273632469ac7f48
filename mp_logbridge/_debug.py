"""``debug=True``: one line per request on the ``mp_logbridge`` logger.

:class:`DebugExporter` wraps the exporter of a consumer made with ``debug=True`` and logs, at
INFO, the endpoint (credentials never shown), the answer (the HTTP status, or the error's name
when there was none), how many records were sent and delivered, and how long it took. The
``mp_logbridge`` logger does not propagate; when it has no handler of its own, ``debug=True``
gives it one writing to stderr, so the lines are seen without further configuration.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from ._diagnostics import info, logger
from ._export import Batch, Exporter, Outcome

__all__ = ["DebugExporter", "show_debug_output"]

_MARK = "_mp_logbridge_debug"


def show_debug_output() -> None:
    """Make the ``mp_logbridge`` logger's INFO lines visible: unless the application gave the
    logger handlers (or a level) of its own, add one writing to stderr."""
    if logger.handlers or logger.level not in (logging.NOTSET, logging.INFO):
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    setattr(handler, _MARK, True)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class DebugExporter:
    """An exporter that logs one summary line per request of the exporter it wraps."""

    __slots__ = ("_describe", "inner")

    def __init__(self, inner: Exporter, describe: Callable[[str], str]) -> None:
        self.inner = inner
        self._describe = describe

    @property
    def timeout(self) -> float:
        """The wrapped exporter's timeout."""
        return self.inner.timeout

    def export(self, batch: Batch, deadline: float) -> Outcome:
        """Export through the wrapped exporter, then log what came of it."""
        started = time.perf_counter()
        outcome = self.inner.export(batch, deadline)
        elapsed = (time.perf_counter() - started) * 1000
        error = outcome.error
        if error is None and not outcome.dropped:
            status = "200"
        else:
            problem = error or outcome.dropped[0][2]
            code = getattr(problem, "status_code", None)
            status = str(code) if code is not None else type(problem).__name__
        try:
            where = self._describe(batch.kind)
        except Exception:  # pragma: no cover - a description must never cost a batch
            where = batch.kind
        info(
            "mp_logbridge: POST %s -> %s (%d records, %d delivered, %.1f ms)",
            where,
            status,
            len(batch.records),
            len(outcome.delivered),
            elapsed,
        )
        return outcome

    def shutdown(self) -> None:
        """Shut the wrapped exporter down."""
        self.inner.shutdown()

    def reinit_after_fork(self) -> None:
        """Let the wrapped exporter forget its parent's connections."""
        self.inner.reinit_after_fork()

"""Job functions for the RQ integration tests (importable by the work horse)."""

from __future__ import annotations

import logging
import os

from mp_logbridge import tag

log = logging.getLogger("rqjobs")


def record(n: int) -> int:
    log.info("job", extra=tag.track("Job Ran", n=n, pid=os.getpid()))
    return n


def broken() -> None:
    log.info("job", extra=tag.track("Job Breaking"))
    raise RuntimeError("job failed on purpose")

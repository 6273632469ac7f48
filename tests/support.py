"""Plain helpers the test modules import: child environments, waiting, capturing log records,
records and ``on_error`` callbacks for consumers, and data of the seed document.

Fixtures live in ``conftest.py``; this module holds what a test calls or builds itself.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

#: The repository root (child interpreters run from it, with it on ``PYTHONPATH``).
ROOT = Path(__file__).resolve().parent.parent

#: The profile properties of the seed document's first ``people.set`` example (John Doe).
JOHN_DOE = {
    "$first_name": "John",
    "$last_name": "Doe",
    "$email": "john.doe@example.com",
    "$phone": "5555555555",
    "Favorite Color": "red",
}

_HandlerT = TypeVar("_HandlerT", bound=logging.Handler)


# --------------------------------------------------------------------------- child processes


def closed_port_url() -> str:
    """A loopback URL where nothing listens (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def child_env(**extra: str) -> dict[str, str]:
    """An environment for a child interpreter that cannot reach real Mixpanel.

    The parent's ``MIXPANEL_*`` variables are left out, anything without an explicit host goes to
    a closed loopback port, and the repository root is importable; ``extra`` is added last.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXPANEL_")}
    env["MIXPANEL_API_HOST"] = closed_port_url()
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


# --------------------------------------------------------------------------- waiting


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    message: str = "condition not reached in time",
) -> None:
    """Wait for a condition the code under test offers no way to wait on.

    A hang guard, not a timing assertion: fails with ``message`` only after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.002)


# --------------------------------------------------------------------------- log records


class RecordCollector(logging.Handler):
    """Keeps the records it is given; ``arrived`` is set at each one."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.arrived = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.arrived.set()

    def messages(self) -> list[str]:
        return [record.getMessage() for record in self.records]

    def wait_until(self, predicate: Callable[[list[str]], bool], timeout: float = 10.0) -> None:
        """Wait until the messages so far satisfy ``predicate`` (hang guard only)."""
        while True:
            self.arrived.clear()
            if predicate(self.messages()):
                return
            if not self.arrived.wait(timeout):
                raise TimeoutError(f"library warnings never matched: {self.messages()}")

    def wait_for(self, text: str, timeout: float = 10.0) -> str:
        """The first message containing ``text``, waiting for it (hang guard only)."""
        self.wait_until(lambda messages: any(text in message for message in messages), timeout)
        return next(message for message in self.messages() if text in message)

    def invalid_reported(self) -> int:
        """How many invalid messages the aggregated loss reports added up to so far."""
        return sum(int(n) for m in self.messages() for n in re.findall(r"invalid: (\d+)", m))


@contextmanager
def attached(logger: logging.Logger, handler: _HandlerT) -> Iterator[_HandlerT]:
    """``handler`` on ``logger`` for the block (removed afterwards, even on failure)."""
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


# --------------------------------------------------------------------------- consumer messages


def event_record(
    insert_id: str, name: str = "Test Event", *, token: str = "test-token", **props: Any
) -> dict[str, Any]:
    """An event record of user ``user-1``, stamped now, with the given ``$insert_id``."""
    properties = {
        "token": token,
        "distinct_id": "user-1",
        "time": int(time.time() * 1000),
        "$insert_id": insert_id,
    }
    properties.update(props)
    return {"event": name, "properties": properties}


class Errors:
    """An ``on_error`` callback that keeps what it is told."""

    def __init__(self) -> None:
        self.calls: list[tuple[BaseException, list[Any]]] = []
        self._lock = threading.Lock()

    def __call__(self, exc: BaseException, messages: list[Any]) -> None:
        with self._lock:
            self.calls.append((exc, list(messages)))

    def records(self) -> list[Any]:
        """Every message reported so far, in order."""
        with self._lock:
            return [record for _exc, records in self.calls for record in records]


class Deferred:
    """A message built where it is encoded (the consumer's sender thread), like the front doors'
    tag messages: values that cannot be sent are dropped and counted there, not raised at the
    call, as they are for a record dict."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def build(self) -> dict[str, Any]:
        return self.record

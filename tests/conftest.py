"""Shared fixtures: a safety net against real Mixpanel hosts and a child-process runner."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def closed_port_url() -> str:
    """A loopback URL where nothing listens (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def _no_real_mixpanel(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Anything built without an explicit host goes to a closed loopback port, never to Mixpanel."""
    for name in ("MIXPANEL_TOKEN", "MIXPANEL_REGION", "MIXPANEL_API_SECRET", "MIXPANEL_PROJECT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MIXPANEL_API_HOST", closed_port_url())
    yield


@pytest.fixture
def down_url() -> str:
    """A URL of a server that is down."""
    return closed_port_url()


class ChildResult:
    def __init__(self, completed: subprocess.CompletedProcess[str]) -> None:
        self.returncode = completed.returncode
        self.stdout = completed.stdout
        self.stderr = completed.stderr

    def __repr__(self) -> str:
        return f"ChildResult(rc={self.returncode}, stdout={self.stdout[-2000:]!r}, stderr={self.stderr[-2000:]!r})"


@pytest.fixture
def run_python():
    """Run Python source in a child interpreter with a hard timeout; returns stdout/stderr/rc."""

    def run(source: str, *, timeout: float = 30.0, env: dict[str, str] | None = None) -> ChildResult:
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("MIXPANEL_")}
        child_env["MIXPANEL_API_HOST"] = closed_port_url()
        child_env["PYTHONPATH"] = str(ROOT)
        child_env.update(env or {})
        completed = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(source)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env,
            cwd=str(ROOT),
        )
        return ChildResult(completed)

    return run

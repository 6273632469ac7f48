"""A real ``redis-server`` for the scale-out tests: started on a Unix socket in a private
directory, restartable (with its data when ``persistent``), killed at the end.

Where no ``redis-server`` binary (or ``redis`` package) is found the tests are skipped — unless
``MP_LOGBRIDGE_REQUIRE_REDIS=1`` (CI sets it), which turns that into a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

REQUIRED = os.environ.get("MP_LOGBRIDGE_REQUIRE_REDIS") == "1"


def redis_server_binary() -> str | None:
    """The ``redis-server`` to run (``MP_LOGBRIDGE_REDIS_SERVER`` names one), or ``None``."""
    named = os.environ.get("MP_LOGBRIDGE_REDIS_SERVER")
    if named:
        return named
    return shutil.which("redis-server")


def require_redis() -> str:
    """The binary, after checking the ``redis`` package is importable; skips (or fails, when
    Redis is required) otherwise."""
    binary = redis_server_binary()
    problem = None
    if binary is None:
        problem = "no redis-server on PATH (apt-get install redis-server)"
    else:
        try:
            import redis  # noqa: F401
        except ImportError:
            problem = "the redis package is not installed (pip install 'mp_logbridge[redis]')"
    if problem is not None:
        if REQUIRED:
            pytest.fail(f"MP_LOGBRIDGE_REQUIRE_REDIS=1 but {problem}")
        pytest.skip(problem)
    assert binary is not None
    return binary


class RedisServer:
    """One ``redis-server`` process on a Unix socket (``url``)."""

    def __init__(self, binary: str, *, persistent: bool = False) -> None:
        self.binary = binary
        self.persistent = persistent
        # Short path: Unix socket paths are limited to about 100 characters.
        self.directory = Path(tempfile.mkdtemp(prefix="mpr-"))
        self.socket = self.directory / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> RedisServer:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
            if self.persistent
            else ["--appendonly", "no", "--save", ""]
        )
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--dir",
                str(self.directory),
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                *persistence,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        import redis

        deadline = time.monotonic() + timeout
        while True:
            try:
                client = redis.Redis(unix_socket_path=str(self.socket))
                try:
                    if client.ping():
                        return
                finally:
                    client.close()
            except (redis.exceptions.RedisError, OSError):
                pass
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not start")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> Any:
        import redis

        return redis.Redis(unix_socket_path=str(self.socket))

    def close(self) -> None:
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.directory, ignore_errors=True)

"""Helpers shared by the benchmark scripts: the server child process, statistics, tables, JSON.

Figures are meant to be read as ratios between clients measured in the same run, on the same
machine, against the same server; absolute numbers move with the machine and its load.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from time import perf_counter_ns, thread_time_ns
from types import TracebackType
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
TOKEN = "bench-token"
T = TypeVar("T")


# --------------------------------------------------------------------------- the server


def closed_port_url() -> str:
    """A loopback URL where nothing listens: connections are refused at once (a server down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def child_env() -> dict[str, str]:
    """The environment for a child interpreter that imports the library from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")])
    )
    return env


class ServerProcess:
    """The fast receiver (``benchmarks/_server.py``) in a child process, so its CPU time is not
    the client's. Commands are answered in order over its stdin/stdout."""

    def __init__(self, latency: float = 0.0) -> None:
        self._process = subprocess.Popen(
            [sys.executable, str(HERE / "_server.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=child_env(),
        )
        self.url: str = self._read()["url"]
        if latency:
            self.set_latency(latency)

    def _read(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError("the benchmark receiver process exited")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _ask(self, command: str) -> dict[str, Any]:
        assert self._process.stdin is not None
        self._process.stdin.write(command + "\n")
        self._process.stdin.flush()
        return self._read()

    def stats(self) -> dict[str, Any]:
        """What arrived: ``total``, per ``endpoints`` and per ``sources`` (records and distinct
        ids), requests, the hostile modes' counters, and the receiver's CPU seconds."""
        return self._ask("stats")

    def wait(self, count: int, timeout: float = 5.0, source: str | None = None) -> dict[str, Any]:
        """``stats()`` once ``count`` records (of ``source``, or in all) arrived since the last
        ``clear``, or after ``timeout`` seconds."""
        return self._ask(f"wait {count} {timeout}" + (f" {source}" if source else ""))

    def clear(self) -> None:
        self._ask("clear")

    def set_latency(self, seconds: float) -> None:
        self._ask(f"latency {seconds}")

    def set_mode(self, mode: str, argument: float | int | None = None) -> None:
        """``normal``, ``stuck``, ``drip [seconds]`` or ``huge [bytes]`` (see ``_server.py``)."""
        answer = self._ask(f"mode {mode}" + ("" if argument is None else f" {argument}"))
        if not answer.get("ok"):
            raise ValueError(answer.get("error"))

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                assert self._process.stdin is not None
                self._process.stdin.write("quit\n")
                self._process.stdin.close()
                self._process.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait(5)
        if self._process.stdout is not None:
            self._process.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def source_count(stats: Mapping[str, Any], source: str | None) -> tuple[int, int]:
    """``(records, distinct ids)`` of one source in a receiver ``stats()`` answer."""
    entry = stats.get("sources", {}).get(source or "", {})
    return int(entry.get("records", 0)), int(entry.get("distinct_ids", 0))


# --------------------------------------------------------------------------- measuring


def time_each_call(call: Callable[[], object], count: int) -> list[int]:
    """Nanoseconds spent in each of ``count`` calls (``perf_counter_ns`` around each)."""
    clock = perf_counter_ns
    samples = [0] * count
    for i in range(count):
        start = clock()
        call()
        samples[i] = clock() - start
    return samples


def timed_loop(call: Callable[[], object], count: int) -> tuple[float, float]:
    """Mean wall and caller-thread CPU nanoseconds per call over ``count`` calls in a tight loop.

    Wall time is what the calling thread experiences, waits for the GIL included; CPU time
    (``time.thread_time``) is only what runs on the calling thread.
    """
    wall, cpu = perf_counter_ns, thread_time_ns
    w0, c0 = wall(), cpu()
    for _ in range(count):
        call()
    c1, w1 = cpu(), wall()
    return (w1 - w0) / count, (c1 - c0) / count


def rotations(items: Sequence[T], rounds: int) -> Iterable[tuple[int, T]]:
    """``(round, item)`` for ``rounds`` interleaved rounds, each round starting one item later,
    so drifts of the machine and the order within a round hit every item alike."""
    for index in range(rounds):
        shift = index % len(items) if items else 0
        for item in [*items[shift:], *items[:shift]]:
            yield index, item


def min_median(values: Sequence[float]) -> tuple[float | None, float | None]:
    """The smallest value (the least disturbed round) and the median, ``None`` when empty."""
    if not values:
        return None, None
    return float(min(values)), float(statistics.median(values))


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile of already sorted values (nearest rank)."""
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return float(ordered[index])


def summarize_ns(samples: Iterable[int]) -> dict[str, float]:
    """Mean, p50, p99 and max of per-call nanoseconds, in microseconds."""
    ordered = sorted(samples)
    count = len(ordered)
    return {
        "n": count,
        "mean_us": sum(ordered) / count / 1000 if count else float("nan"),
        "p50_us": percentile(ordered, 0.50) / 1000,
        "p99_us": percentile(ordered, 0.99) / 1000,
        "max_us": ordered[-1] / 1000 if count else float("nan"),
    }


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference`` when both are usable numbers."""
    if value is None or reference is None or reference <= 0 or value != value:
        return None
    return value / reference


def rss_kib() -> tuple[int, int]:
    """``(current, peak)`` resident set size of this process in KiB (Linux ``/proc``)."""
    current = peak = 0
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                current = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1])
    return current, peak


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (``VmHWM``); ``False`` if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- reporting


def cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "n/a"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    """First column left-aligned (names), the others right-aligned (numbers)."""
    parts = [cells[0].ljust(widths[0])]
    parts += [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
    return "  ".join(parts)


def print_table(
    title: str, columns: Sequence[tuple[str, str]], rows: Sequence[Mapping[str, Any]]
) -> None:
    """Print ``rows`` as an aligned table; ``columns`` are ``(key, header)`` pairs."""
    headers = [header for _, header in columns]
    cells = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in [headers, *cells]) for i in range(len(columns))]
    print(f"\n{title}")
    print(_line(headers, widths))
    print("  ".join("-" * width for width in widths))
    for line in cells:
        print(_line(line, widths))


def environment() -> dict[str, Any]:
    """Where and with what the figures were measured."""
    versions: dict[str, str | None] = {}
    for name in (
        "mp_logbridge",
        "mixpanel",
        "posthog",
        "segment-analytics-python",
        "opentelemetry-sdk",
        "structlog",
        "requests",
        "urllib3",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "source": _source_state(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": versions,
    }


def _source_state() -> str | None:
    """The library's commit, and whether its files differ from it (figures depend on both)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "mp_logbridge"],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{' + uncommitted changes in mp_logbridge/' if changed else ''}"


def print_environment(env: Mapping[str, Any]) -> None:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    load = " ".join(f"{value:.2f}" for value in env.get("load_average") or ())
    print(
        f"{env['date']} · {env['implementation']} {env['python']} · {env['cpus']} CPUs · "
        f"{env['platform']} · load average {load}"
    )
    print(f"{versions} · source {env.get('source') or 'unknown'}")
    print(f"$ {env['command']}")


def write_json(path: str | None, data: Mapping[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"\nwrote {path}")

"""The mp-logbridge command, run as a child process: help, usage errors, demo and serve.

The import command has its own module, ``test_import_cli.py``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from support import child_env

from mp_logbridge import Tracker
from mp_logbridge.testing import MixpanelServer


def cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the command in a scratch directory (which also holds any progress files)."""
    with tempfile.TemporaryDirectory(prefix="mp-cli-") as cwd:
        return subprocess.run(
            [sys.executable, "-m", "mp_logbridge", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env(**{"XDG_STATE_HOME": cwd, **env}),
            cwd=cwd,
        )


def start_cli(*args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mp_logbridge", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=cwd,
    )


# --------------------------------------------------------------------------- help and errors


@pytest.mark.parametrize("command", [[], ["demo"], ["serve"], ["import"]])
def test_help(command: list[str]) -> None:
    result = cli(*command, "--help")
    assert result.returncode == 0
    assert "usage: mp-logbridge" in result.stdout


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    missing = cli("import", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"mp-logbridge: error: no such file: {tmp_path / 'nope.jsonl'}"
    data = tmp_path / "e.jsonl"
    data.write_text('{"event": "E", "properties": {"distinct_id": "u", "time": 1700000000}}\n')
    no_credentials = cli("import", str(data))
    assert no_credentials.returncode == 2
    assert "needs credentials" in no_credentials.stderr
    assert "Traceback" not in no_credentials.stderr
    bad_region = cli("import", str(data), "--region", "mars")
    assert bad_region.returncode == 2
    partial = cli("import", str(data), "--username", "u")
    assert partial.returncode == 2
    assert "--secret, --project-id" in partial.stderr


# --------------------------------------------------------------------------- demo


def test_demo_runs_end_to_end_without_network() -> None:
    result = cli("demo", timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Everything arrived." in out
    for line in (
        "Signed Up",
        "Report Exported      x2",
        "Card Charged         x1 (1 failed)",
        "revenue: 49.00 in 1 charge(s)",
        "1 retried after a server error",
    ):
        assert line in out, (line, out)
    assert "group updates: 1 (Company/Acme)" in out


# --------------------------------------------------------------------------- serve


def test_serve_prints_records_appends_jsonl_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    sink = tmp_path / "received.jsonl"
    proc = start_cli("serve", "--port", "0", "--jsonl", str(sink))
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("Mixpanel receiver listening at http://127.0.0.1:")
        url = first.split(" at ")[1].split(" ")[0]
        with Tracker("TOKEN", api_host=url) as tracker:
            tracker.track("u1", "Signed Up", {"plan": "pro"})
            tracker.people.set("u1", {"plan": "pro"})
            assert tracker.flush(10)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    lines = out.splitlines()
    event_lines = [line for line in lines if line.startswith("events ")]
    assert len(event_lines) == 1 and '"event":"Signed Up"' in event_lines[0]
    assert len([line for line in lines if line.startswith("profile_updates ")]) == 1
    assert "stopped; received 1 events, 1 profile updates, 0 group updates, 0 imports" in out
    saved = [json.loads(line) for line in sink.read_text().splitlines()]
    by_kind = {item["kind"]: item["record"] for item in saved}
    assert len(saved) == 2
    assert by_kind["events"]["event"] == "Signed Up"
    assert by_kind["profile_updates"]["$set"] == {"plan": "pro"}


def test_serve_refuses_a_busy_port() -> None:
    with MixpanelServer() as server:
        port = server.port
        result = cli("serve", "--port", str(port), timeout=20)
    assert result.returncode == 2
    assert result.stderr.startswith(f"mp-logbridge: error: cannot listen on 127.0.0.1:{port}")

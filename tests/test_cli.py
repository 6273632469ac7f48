"""The mp-logbridge command, run as a child process: demo, serve and import."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support import child_env, wait_until

from mp_logbridge import Tracker
from mp_logbridge.testing import MixpanelServer

ACCOUNT = ("importer", "s3cret-value", "4242")


def cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the command in a scratch directory (where it keeps import progress files)."""
    with tempfile.TemporaryDirectory(prefix="mp-cli-") as cwd:
        return subprocess.run(
            [sys.executable, "-m", "mp_logbridge", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env(**env),
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


def credentials(server: MixpanelServer) -> list[str]:
    user, secret, project = ACCOUNT
    return [
        "--api-host",
        server.url,
        "--username",
        user,
        "--secret",
        secret,
        "--project-id",
        project,
    ]


def write_events(path: Path, count: int, *, start: int = 0) -> list[str]:
    """Historical events, each with its own $insert_id; returns the ids."""
    now = int(time.time())
    ids = []
    with path.open("a", encoding="utf-8") as handle:
        for n in range(start, start + count):
            insert_id = f"evt-{n}"
            ids.append(insert_id)
            record = {
                "event": "Old Order",
                "properties": {
                    "time": now - 86400 - n,
                    "distinct_id": f"u{n % 7}",
                    "$insert_id": insert_id,
                    "n": n,
                },
            }
            handle.write(json.dumps(record) + "\n")
    return ids


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
    write_events(data, 1)
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


# --------------------------------------------------------------------------- import


@pytest.fixture
def import_server():
    with MixpanelServer(service_account=ACCOUNT) as server:
        yield server


def test_import_delivers_everything_with_auth_gzip_and_batches(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    data = tmp_path / "orders.jsonl"
    ids = write_events(data, 4500)
    result = cli(
        "import", str(data), *credentials(import_server), "--batch-size", "2000", "--workers", "3"
    )
    assert result.returncode == 0, result.stderr
    assert "imported 4,500 record(s)" in result.stdout
    received = [event["properties"]["$insert_id"] for event in import_server.imports]
    assert sorted(received) == sorted(ids)
    requests = [r for r in import_server.requests if r.path == "/import"]
    assert len(requests) == 3 and all(r.gzipped for r in requests)
    assert all(
        r.query.get("project_id") == ACCOUNT[2] and r.query.get("strict") == "1" for r in requests
    )
    assert max(len(r.records) for r in requests) == 2000
    assert "processed" in result.stderr  # plain progress lines when not on a terminal


def test_import_tagged_log_lines_and_content_derived_ids(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    data = tmp_path / "app.log.jsonl"
    created = time.time() - 7200
    lines = [
        {
            "message": "signed up",
            "created": created,
            "levelname": "INFO",
            "mixpanel": {"event": "Signed Up", "distinct_id": "u1", "plan": "pro"},
        },
        {"event": "checkout", "timestamp": "2026-01-02T03:04:05Z", "mixpanel": True, "user": "x"},
        {"event": "No Id", "properties": {"time": int(created), "distinct_id": "u2"}},
    ]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["import", str(data), *credentials(import_server), "--token", "TOKEN"]
    result = cli(*args)
    assert result.returncode == 1  # the second line names no user
    assert f"{data}:2: tag.distinct_id: no distinct_id" in result.stdout
    events = {event["event"]: event for event in import_server.imports}
    assert set(events) == {"Signed Up", "No Id"}
    assert events["Signed Up"]["properties"]["time"] == int(created * 1000)
    assert events["Signed Up"]["properties"]["plan"] == "pro"
    assert events["Signed Up"]["properties"]["token"] == "TOKEN"
    first_ids = {event["properties"]["$insert_id"] for event in import_server.imports}
    again = cli(*args, "--restart")
    assert again.returncode == 1
    same_ids_again = {event["properties"]["$insert_id"] for event in import_server.imports}
    assert same_ids_again == first_ids


def test_dry_run_reports_invalid_lines_with_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "mixed.jsonl"
    write_events(data, 3)
    with data.open("a") as handle:
        handle.write("this is not json\n")
        handle.write(
            json.dumps(
                {
                    "event": "Too Old",
                    "properties": {"time": 10, "distinct_id": "u", "$insert_id": "a1"},
                }
            )
            + "\n"
        )
        handle.write(
            json.dumps(
                {"event": "No User", "properties": {"time": int(time.time()), "$insert_id": "a2"}}
            )
            + "\n"
        )
        handle.write(
            json.dumps(
                {
                    "event": "Bad Id",
                    "properties": {
                        "time": int(time.time()),
                        "distinct_id": "u",
                        "$insert_id": "has spaces!",
                    },
                }
            )
            + "\n"
        )
        handle.write("\n")
        handle.write(json.dumps({"unrelated": 1}) + "\n")
    rejects = tmp_path / "rejects.jsonl"
    with MixpanelServer() as server:
        result = cli(
            "import", str(data), "--dry-run", "--api-host", server.url, "--rejects", str(rejects)
        )
        assert server.requests == []  # nothing sent
    assert result.returncode == 1
    out = result.stdout
    assert "valid 3 record(s)" in out
    assert "rejected 5 record(s)" in out
    assert f"{data}:4: not valid JSON" in out
    assert f"{data}:5: properties.time:" in out
    assert f"{data}:6: properties.distinct_id:" in out
    assert f"{data}:7: properties.$insert_id:" in out
    assert f"{data}:9: line: neither a Mixpanel event nor a log line" in out
    listed = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [item["line"] for item in listed] == [4, 5, 6, 7, 9]


def test_server_side_rejections_are_listed_and_the_rest_imported(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    data = tmp_path / "e.jsonl"
    ids = write_events(data, 10)
    # Passes the local checks, refused by the server (too far in the future).
    with data.open("a") as handle:
        handle.write(
            json.dumps(
                {
                    "event": "Future",
                    "properties": {
                        "time": int(time.time()) + 10 * 86400,
                        "distinct_id": "u",
                        "$insert_id": "future-1",
                    },
                }
            )
            + "\n"
        )
    result = cli("import", str(data), *credentials(import_server))
    assert result.returncode == 1
    assert sorted(e["properties"]["$insert_id"] for e in import_server.imports) == sorted(ids)
    assert f"{data}:11:" in result.stdout


def test_bad_credentials_stop_the_import_with_one_line(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    data = tmp_path / "e.jsonl"
    write_events(data, 5000)
    result = cli(
        "import",
        str(data),
        "--api-host",
        import_server.url,
        "--username",
        "importer",
        "--secret",
        "wrong",
        "--project-id",
        "4242",
        "--batch-size",
        "500",
        "--workers",
        "1",
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("mp-logbridge: error: ")
        and "HTTP 401" in last
        and "Invalid credentials" in last
    )
    assert len([r for r in import_server.requests if r.path == "/import"]) <= 2  # stopped early
    assert import_server.imports == []


def test_interrupted_import_resumes_without_resending(tmp_path: Path) -> None:
    data = tmp_path / "big.jsonl"
    ids = write_events(data, 3000)
    state = tmp_path / "progress.json"
    with MixpanelServer(service_account=ACCOUNT, latency=0.15) as server:
        args = [
            "import",
            str(data),
            *credentials(server),
            "--batch-size",
            "100",
            "--workers",
            "1",
            "--state",
            str(state),
        ]
        proc = start_cli(*args)
        try:
            wait_until(lambda: len(server.imports) >= 500, 30, "the import did not make progress")
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 130, (out, err)
        assert "interrupted; run the same command again to resume" in out
        assert "Traceback" not in err
        assert state.exists()
        first_run = len(server.imports)
        assert 500 <= first_run < 3000
        server.latency = 0.0
        resumed = subprocess.run(
            [sys.executable, "-m", "mp_logbridge", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=child_env(),
        )
        assert resumed.returncode == 0, resumed.stderr
        assert "accepted by an earlier run" in resumed.stdout
        received = [event["properties"]["$insert_id"] for event in server.imports]
    assert len(received) == len(set(received)) == 3000  # exactly once
    assert set(received) == set(ids)
    assert not state.exists()  # finished: progress file removed


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_import_draws_a_progress_bar_on_a_terminal(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    import os
    import pty

    data = tmp_path / "e.jsonl"
    write_events(data, 3000)
    leader, follower = pty.openpty()
    try:
        with tempfile.TemporaryDirectory(prefix="mp-cli-") as cwd:
            completed = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "mp_logbridge",
                    "import",
                    str(data),
                    *credentials(import_server),
                    "--batch-size",
                    "500",
                    "--workers",
                    "1",
                ],
                stdout=subprocess.PIPE,
                stderr=follower,
                text=True,
                timeout=60,
                env=child_env(),
                cwd=cwd,
            )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal is closed once everything was read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        if follower != -1:
            os.close(follower)
        os.close(leader)
    drawn = b"".join(chunks).decode()
    assert completed.returncode == 0, drawn
    assert "\r[" in drawn and "] 3,000/3,000 records" in drawn and "ETA" in drawn
    assert "processed" not in drawn  # no plain lines on a terminal

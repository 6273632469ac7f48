"""``mp-logbridge import`` against the loopback receiver: inputs, progress kept between runs,
faults of the server, interrupts.

Most runs are in-process (``main(argv, out)``); standard input, signals and terminals need a
child process, run with hard timeouts. Progress files go to a per-test ``XDG_STATE_HOME``.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import child_env, closed_port_url, wait_until

from mp_logbridge import ServiceAccount
from mp_logbridge._cli import main
from mp_logbridge._import_state import Ranges
from mp_logbridge._importer import Importer, ImportOptions, send_import_batch
from mp_logbridge._transport import Transport
from mp_logbridge.consumers import RetryPolicy
from mp_logbridge.testing import MixpanelServer
from mp_logbridge.transport import Endpoints, resolve_endpoints

ACCOUNT = ("importer", "s3cret-value", "4242")


@pytest.fixture(autouse=True)
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Default progress files go under the test's directory (children inherit it too)."""
    home = tmp_path / "state-home"
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    return home


@pytest.fixture
def import_server() -> Iterator[MixpanelServer]:
    with MixpanelServer(service_account=ACCOUNT) as server:
        yield server


def credentials(server: MixpanelServer | str, project: str = ACCOUNT[2]) -> list[str]:
    user, secret, _ = ACCOUNT
    url = server if isinstance(server, str) else server.url
    return ["--api-host", url, "--username", user, "--secret", secret, "--project-id", project]


def event(n: int, *, seconds_ago: int = 86400, **extra: object) -> dict[str, object]:
    """A historical event with its own $insert_id (``evt-N``)."""
    properties = {
        "time": int(time.time()) - seconds_ago - n,
        "distinct_id": f"u{n % 7}",
        "$insert_id": f"evt-{n}",
        "n": n,
        **extra,
    }
    return {"event": "Old Order", "properties": properties}


def write_events(path: Path, count: int, *, start: int = 0) -> list[str]:
    """Append ``count`` events as JSON lines; returns their ids."""
    with path.open("a", encoding="utf-8") as handle:
        for n in range(start, start + count):
            handle.write(json.dumps(event(n)) + "\n")
    return [f"evt-{n}" for n in range(start, start + count)]


def ids(server: MixpanelServer) -> list[str]:
    return [record["properties"]["$insert_id"] for record in server.imports]


@dataclass
class Run:
    code: int
    out: str
    err: str


def run(*args: str) -> Run:
    """``mp-logbridge import ARGS`` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["import", *args], out)
    return Run(code, out.getvalue(), err.getvalue())


def run_child(*args: str, stdin: bytes | None = None, timeout: float = 60) -> Run:
    completed = subprocess.run(
        [sys.executable, "-m", "mp_logbridge", "import", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        env=child_env(),
    )
    return Run(completed.returncode, completed.stdout.decode(), completed.stderr.decode())


class Child:
    """The command in a child process, its standard error read line by line as it comes."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mp_logbridge", "import", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.out: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stderr, self.lines.put)),
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out.append)),
        ]
        for reader in self._readers:
            reader.daemon = True
            reader.start()

    @staticmethod
    def _read(stream: IO[str], keep: Callable[[str], None]) -> None:
        for line in stream:
            keep(line)

    def wait_for(self, text: str, timeout: float) -> str:
        """The first line of standard error containing ``text`` (hang guard: ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"never printed {text!r}; stderr: {self.seen}") from None
            self.seen.append(line)
            if text in line:
                return line

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """Wait for the exit; returns ``(code, stdout, all of stderr)``."""
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        for reader in self._readers:
            reader.join(5)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return self.proc.returncode, "".join(self.out), "".join(self.seen)


# --------------------------------------------------------------------------- delivery


def test_import_delivers_everything_with_auth_gzip_and_batches(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    data = tmp_path / "orders.jsonl"
    sent = write_events(data, 4500)
    result = run_child(
        str(data), *credentials(import_server), "--batch-size", "2000", "--workers", "3"
    )
    assert result.code == 0, result.err
    assert "imported 4,500 record(s) from 4,500 line(s)" in result.out
    assert sorted(ids(import_server)) == sorted(sent)
    requests = [r for r in import_server.requests if r.path == "/import"]
    assert len(requests) == 3 and all(r.gzipped for r in requests)
    assert all(
        r.query.get("project_id") == ACCOUNT[2] and r.query.get("strict") == "1" for r in requests
    )
    assert max(len(r.records) for r in requests) == 2000
    assert "processed" in result.err  # plain progress lines when not on a terminal


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
    args = [str(data), *credentials(import_server), "--token", "TOKEN"]
    result = run(*args)
    assert result.code == 1  # the second line names no user
    assert f"{data}:2: tag.distinct_id: no distinct_id" in result.out
    events = {record["event"]: record for record in import_server.imports}
    assert set(events) == {"Signed Up", "No Id"}
    assert events["Signed Up"]["properties"]["time"] == int(created * 1000)
    assert events["Signed Up"]["properties"]["plan"] == "pro"
    assert events["Signed Up"]["properties"]["token"] == "TOKEN"
    first_ids = set(ids(import_server))
    again = run(*args, "--no-resume")
    assert again.code == 1
    assert len(import_server.imports) == 4  # both sent again ...
    assert set(ids(import_server)) == first_ids  # ... with the same $insert_id


def test_dry_run_reports_invalid_lines_with_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "mixed.jsonl"
    write_events(data, 3)
    now = int(time.time())
    bad = [
        "this is not json",
        json.dumps({"event": "Too Old", "properties": {"time": 10, "distinct_id": "u"}}),
        json.dumps({"event": "No User", "properties": {"time": now, "$insert_id": "a2"}}),
        json.dumps(
            {
                "event": "Bad Id",
                "properties": {"time": now, "distinct_id": "u", "$insert_id": "has spaces!"},
            }
        ),
        "",
        json.dumps({"unrelated": 1}),
    ]
    with data.open("a") as handle:
        handle.write("\n".join(bad) + "\n")
    rejects = tmp_path / "rejects.jsonl"
    with MixpanelServer() as server:
        result = run(str(data), "--dry-run", "--api-host", server.url, "--rejects", str(rejects))
        assert server.requests == []  # nothing sent
    assert result.code == 1
    out = result.out
    assert "valid 3 record(s) from 8 line(s)" in out and "; 5 rejected" in out
    assert f"{data}:4: not valid JSON" in out
    assert f"{data}:5: properties.time:" in out
    assert f"{data}:6: properties.distinct_id:" in out
    assert f"{data}:7: properties.$insert_id:" in out
    assert f"{data}:9: line: neither a Mixpanel event nor a log line" in out
    listed = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [item["line"] for item in listed] == [4, 5, 6, 7, 9]
    assert not (tmp_path / "state-home").exists()  # a dry run keeps no progress


def test_server_side_rejections_are_listed_and_the_rest_imported(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    data = tmp_path / "e.jsonl"
    sent = write_events(data, 10)
    with data.open("a") as handle:  # passes the local checks, refused by the server
        handle.write(json.dumps(event(99, seconds_ago=-10 * 86400)) + "\n")
    result = run(str(data), *credentials(import_server))
    assert result.code == 1
    assert sorted(ids(import_server)) == sorted(sent)
    assert f"{data}:11: properties.time:" in result.out
    assert "imported 10 record(s) from 11 line(s)" in result.out and "; 1 rejected" in result.out


def test_bad_credentials_stop_the_import_with_one_line(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    data = tmp_path / "e.jsonl"
    write_events(data, 5000)
    wrong = ["--username", "importer", "--secret", "wrong", "--project-id", "4242"]
    result = run(
        str(data), "--api-host", import_server.url, *wrong, "--batch-size", "500", "--workers", "1"
    )
    assert result.code == 2
    last = result.err.strip().splitlines()[-1]
    assert last.startswith("mp-logbridge: error: ") and "HTTP 401" in last
    assert "Invalid credentials" in last and "wrong" not in last
    assert len([r for r in import_server.requests if r.path == "/import"]) == 1  # stopped at once
    assert import_server.imports == []


# --------------------------------------------------------------------------- inputs


def test_gzip_is_recognised_by_its_content_whatever_the_name(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    named = tmp_path / "export.jsonl.gz"
    unnamed = tmp_path / "export-2.log"  # gzipped too, without saying so
    plain = tmp_path / "plain.jsonl"
    expected = write_events(plain, 1200)
    lines = plain.read_bytes().splitlines(keepends=True)
    named.write_bytes(gzip.compress(b"".join(lines[:600])))
    unnamed.write_bytes(gzip.compress(b"".join(lines[600:])))
    result = run(str(named), str(unnamed), *credentials(import_server))
    assert result.code == 0, result.out + result.err
    assert sorted(ids(import_server)) == sorted(expected)
    assert "processed 1,200/1,200 lines" in result.err  # counted before sending: total known
    again = run(str(named), str(unnamed), *credentials(import_server))
    assert again.code == 0
    assert len(import_server.imports) == 1200  # nothing sent twice
    assert "nothing to import" in again.out


def test_truncated_gzip_reports_where_it_stops_and_imports_what_precedes(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    plain = tmp_path / "plain.jsonl"
    write_events(plain, 3000)
    data = tmp_path / "cut.jsonl.gz"
    whole = gzip.compress(plain.read_bytes())
    data.write_bytes(whole[: len(whole) // 2])
    result = run(str(data), *credentials(import_server))
    assert result.code == 1
    assert f"{data}:" in result.out and "the compressed data ends early" in result.out
    assert 0 < len(import_server.imports) < 3000
    assert len(set(ids(import_server))) == len(import_server.imports)


def test_standard_input_plain_and_gzipped(tmp_path: Path, import_server: MixpanelServer) -> None:
    data = tmp_path / "e.jsonl"
    expected = write_events(data, 50)
    first = run_child("-", *credentials(import_server), stdin=data.read_bytes())
    assert first.code == 0, first.err
    assert sorted(ids(import_server)) == sorted(expected)
    assert "processed 50 lines" in first.err  # no total: standard input is read once
    assert "progress saved" not in first.out  # nothing to resume standard input by
    gzipped = run_child("-", *credentials(import_server), stdin=gzip.compress(data.read_bytes()))
    assert gzipped.code == 0, gzipped.err
    assert len(import_server.imports) == 100  # sent again (same $insert_id: de-duplicated)
    assert set(ids(import_server)) == set(expected)


def test_a_json_array_file_pretty_printed_or_on_one_line(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    pretty = tmp_path / "export.json"
    pretty.write_text(json.dumps([event(n) for n in range(3)] + ["not an object"], indent=2))
    one_line = tmp_path / "export-2.json"
    one_line.write_bytes(gzip.compress(json.dumps([event(n) for n in range(3, 6)]).encode()))
    result = run(str(pretty), str(one_line), *credentials(import_server))
    assert result.code == 1
    assert sorted(ids(import_server)) == [f"evt-{n}" for n in range(6)]
    bad_line = pretty.read_text().splitlines().index('  "not an object"') + 1
    assert f"{pretty}:{bad_line}: line: must be a JSON object" in result.out
    again = run(str(pretty), str(one_line), *credentials(import_server))
    assert len(import_server.imports) == 6  # the elements imported are remembered
    assert "6 line(s) skipped" in again.out


def test_a_broken_json_array_imports_what_precedes_the_break(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    data = tmp_path / "broken.json"
    good = ",\n".join(json.dumps(event(n)) for n in range(4))
    data.write_text(f"[\n{good},\n{{oops}}, {json.dumps(event(9))}\n]\n")
    result = run(str(data), *credentials(import_server))
    assert result.code == 1
    assert sorted(ids(import_server)) == [f"evt-{n}" for n in range(4)]
    assert f"{data}:6: element 5: not valid JSON" in result.out


def test_bad_lines_are_reported_one_by_one_and_the_rest_imported(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    data = tmp_path / "mixed.jsonl"
    good = [json.dumps(event(n)).encode() for n in range(6)]
    too_big_record = json.dumps(event(50, blob="x" * 1_200_000)).encode()
    huge_line = b'{"event": "E", "properties": {"pad": "' + b"y" * (17 * 1024 * 1024) + b'"}}'
    lines = [
        b"\xef\xbb\xbf" + good[0],  # a byte-order mark on the first line is fine
        good[1] + b"\r",  # so is a CRLF line end
        b'{"event": "caf\xe9", "properties": {}}',  # Latin-1, not UTF-8
        b"{not json",
        b"[" * 100_000 + b"]" * 100_000,  # nested too deeply for any parser
        good[2],
        huge_line,
        b"   ",
        too_big_record,
        good[3],
        b"",
        good[4],
    ]
    data.write_bytes(b"\n".join(lines) + b"\n" + good[5])  # no newline at the very end
    rejects = tmp_path / "rejects.jsonl"
    result = run(str(data), *credentials(import_server), "--rejects", str(rejects))
    assert result.code == 1, result.err
    assert sorted(ids(import_server)) == [f"evt-{n}" for n in range(6)]
    out = result.out
    assert f"{data}:3: not UTF-8 text (byte 0xe9" in out
    assert f"{data}:4: not valid JSON" in out
    assert f"{data}:5: not valid JSON: nested too deeply" in out
    assert f"{data}:7: line of 17,825,8" in out and "over the 16,777,216-byte limit" in out
    assert f"{data}:9: message: encodes to" in out
    assert "imported 6 record(s) from 11 line(s)" in out and "; 5 rejected" in out
    assert [json.loads(line)["line"] for line in rejects.read_text().splitlines()] == [
        3,
        4,
        5,
        7,
        9,
    ]
    # The bad lines are never done: a second run reports them again and sends nothing else.
    again = run(str(data), *credentials(import_server))
    assert again.code == 1
    assert len(import_server.imports) == 6
    assert "5 rejected" in again.out and "6 line(s) skipped" in again.out


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"[]", b"  [ \n ]  \n"])
def test_empty_inputs_import_nothing_and_succeed(
    tmp_path: Path, import_server: MixpanelServer, content: bytes
) -> None:
    data = tmp_path / "empty"
    data.write_bytes(content)
    result = run(str(data), *credentials(import_server))
    assert result.code == 0, result.out + result.err
    assert "imported 0 record(s) from 0 line(s)" in result.out
    assert import_server.requests == []


def test_usage_errors_for_inputs(tmp_path: Path, import_server: MixpanelServer) -> None:
    data = tmp_path / "e.jsonl"
    write_events(data, 1)
    twice = run(str(data), str(tmp_path / "." / "e.jsonl"), *credentials(import_server))
    assert twice.code == 2 and "is given twice" in twice.err
    stdin_twice = run("-", "-", *credentials(import_server))
    assert stdin_twice.code == 2 and "standard input (-) is given twice" in stdin_twice.err
    folder = run(str(tmp_path), *credentials(import_server))
    assert folder.code == 2 and "is a directory" in folder.err
    assert import_server.requests == []


# --------------------------------------------------------------------------- progress kept


def test_a_rerun_of_a_finished_import_sends_nothing_and_says_so(
    tmp_path: Path, import_server: MixpanelServer, state_home: Path
) -> None:
    data = tmp_path / "e.jsonl"
    write_events(data, 30)
    first = run(str(data), *credentials(import_server))
    assert first.code == 0
    saved = [line for line in first.out.splitlines() if line.startswith("progress saved in ")]
    assert len(saved) == 1
    path = Path(saved[0].removeprefix("progress saved in "))
    assert path.is_file() and state_home in path.parents
    text = path.read_text()
    assert ACCOUNT[1] not in text  # the secret is not kept
    second = run(str(data), *credentials(import_server))
    assert second.code == 0
    assert f"resuming with the progress saved in {path}" in second.err
    assert "30 of 30 line(s) were imported by an earlier run and are skipped" in second.err
    assert "nothing to import" in second.out
    assert len(import_server.imports) == 30


def test_lines_appended_since_are_the_only_ones_sent(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    data = tmp_path / "app.jsonl"
    write_events(data, 20)
    assert run(str(data), *credentials(import_server)).code == 0
    added = write_events(data, 5, start=20)
    second = run(str(data), *credentials(import_server))
    assert second.code == 0
    assert ids(import_server)[20:] == added
    assert "was modified since the earlier run" in second.err
    assert "processed 5/5 lines" in second.err  # the total leaves out what was done


def test_a_file_replaced_at_the_same_path_is_read_again(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    data = tmp_path / "e.jsonl"
    write_events(data, 5)
    assert run(str(data), *credentials(import_server)).code == 0
    replacement = tmp_path / "new.jsonl"
    write_events(replacement, 5, start=100)
    os.replace(replacement, data)
    second = run(str(data), *credentials(import_server))
    assert second.code == 0
    assert "was replaced since the earlier run" in second.err
    assert ids(import_server)[5:] == [f"evt-{n}" for n in range(100, 105)]


def test_content_changed_under_the_same_size_and_time_is_noticed(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    data = tmp_path / "e.jsonl"
    write_events(data, 5)
    assert run(str(data), *credentials(import_server)).code == 0
    before = os.stat(data)
    text = data.read_text().replace('"evt-3"', '"evt-8"')  # same length, same place
    with open(data, "r+", encoding="utf-8") as handle:
        handle.write(text)
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(data)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    second = run(str(data), *credentials(import_server))
    assert second.code == 0
    assert "evt-8" in ids(import_server)
    assert "line(s) imported then are not the same now and are sent again" in second.err


def test_fixing_a_rejected_line_then_rerunning_sends_just_that_line(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    data = tmp_path / "e.jsonl"
    write_events(data, 10)
    with data.open("a") as handle:
        handle.write(json.dumps(event(10, seconds_ago=-10 * 86400)) + "\n")  # in the future
    first = run(str(data), *credentials(import_server))
    assert first.code == 1 and f"{data}:11:" in first.out
    assert len(import_server.imports) == 10
    unchanged = run(str(data), *credentials(import_server))  # not fixed yet: refused again
    assert unchanged.code == 1 and "10 line(s) skipped" in unchanged.out
    assert "accepted by an earlier run" not in unchanged.out
    lines = data.read_text().splitlines()
    lines[10] = json.dumps(event(10))
    data.write_text("\n".join(lines) + "\n")
    fixed = run(str(data), *credentials(import_server))
    assert fixed.code == 0, fixed.out
    assert ids(import_server)[10:] == ["evt-10"]  # only the fixed line went out
    assert "imported 1 record(s) from 1 line(s)" in fixed.out


def test_fixing_the_project_id_then_rerunning_imports_everything(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    data = tmp_path / "e.jsonl"
    expected = write_events(data, 40)
    wrong = run(str(data), *credentials(import_server, project="9999"))
    assert wrong.code == 2
    assert "project_id does not match" in wrong.err.strip().splitlines()[-1]
    assert import_server.imports == []
    right = run(str(data), *credentials(import_server))
    assert right.code == 0, right.out + right.err
    assert sorted(ids(import_server)) == sorted(expected)


def test_progress_belongs_to_its_destination_and_options(tmp_path: Path) -> None:
    data = tmp_path / "e.jsonl"
    expected = write_events(data, 10)
    other_account = (ACCOUNT[0], ACCOUNT[1], "5555")
    with MixpanelServer(service_account=other_account) as other:
        with MixpanelServer(service_account=ACCOUNT) as server:
            assert run(str(data), *credentials(server)).code == 0
            assert run(str(data), *credentials(server), "--tag", "analytics").code == 0
            assert run(str(data), *credentials(server), "--token", "T0KEN").code == 0
            assert len(server.imports) == 30  # another tag, another token: sent again
            assert run(str(data), *credentials(server)).code == 0
            assert len(server.imports) == 30  # the first destination's progress still holds
        elsewhere = run(str(data), *credentials(other, project="5555"))
        assert elsewhere.code == 0
        assert sorted(ids(other)) == sorted(expected)


def test_no_resume_sends_everything_again_and_replaces_the_progress(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    data = tmp_path / "e.jsonl"
    write_events(data, 12)
    assert run(str(data), *credentials(import_server)).code == 0
    again = run(str(data), *credentials(import_server), "--no-resume")
    assert again.code == 0
    assert "--no-resume: the progress in" in again.err
    assert len(import_server.imports) == 24
    third = run(str(data), *credentials(import_server))
    assert "nothing to import" in third.out and len(import_server.imports) == 24


def test_state_option_names_the_progress_file(
    tmp_path: Path, import_server: MixpanelServer, state_home: Path
) -> None:
    data = tmp_path / "e.jsonl"
    write_events(data, 8)
    state = tmp_path / "here" / "progress.json"
    first = run(str(data), *credentials(import_server), "--state", str(state))
    assert first.code == 0
    assert f"progress saved in {state}" in first.out
    saved = json.loads(state.read_text())
    assert list(saved["sources"]) == [str(data.resolve())]
    assert ACCOUNT[1] not in state.read_text()
    assert not state_home.exists()  # not the default place
    second = run(str(data), *credentials(import_server), "--state", str(state))
    assert f"resuming with the progress saved in {state}" in second.err
    assert len(import_server.imports) == 8
    # The same file for another destination: its progress is not used, and it says so.
    other = run(str(data), *credentials(import_server), "--state", str(state), "--token", "another")
    assert other.code == 0
    assert f"{state} holds the progress of an import to" in other.err
    assert len(import_server.imports) == 16


def test_a_progress_file_that_cannot_be_written_stops_before_sending(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    data = tmp_path / "e.jsonl"
    write_events(data, 3)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run(str(data), *credentials(import_server), "--state", str(blocker / "p.json"))
    assert result.code == 2
    assert "cannot write the progress file" in result.err
    assert import_server.requests == []


def test_a_corrupt_progress_file_is_not_trusted(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    data = tmp_path / "e.jsonl"
    write_events(data, 4)
    state = tmp_path / "p.json"
    state.write_text('{"version": 2, "destination": ')
    result = run(str(data), *credentials(import_server), "--state", str(state))
    assert result.code == 0
    assert "is not a progress file this version can read" in result.err
    assert len(import_server.imports) == 4
    assert json.loads(state.read_text())["version"] == 2  # replaced by a good one


# --------------------------------------------------------------------------- faults and signals


def test_an_unreachable_host_is_named_in_the_progress_line(tmp_path: Path) -> None:
    data = tmp_path / "e.jsonl"
    write_events(data, 20)
    child = Child(str(data), *credentials(closed_port_url()), "--workers", "1")
    line = child.wait_for("retrying:", 30)
    assert "retrying: connection refused (attempt 1, next in" in line
    child.proc.send_signal(signal.SIGINT)
    code, out, err = child.finish(30)
    assert code == 130, err
    assert "interrupted; run the same command again to resume" in out
    assert "20 record(s) not delivered" in out
    assert "Traceback" not in err


def test_server_errors_then_recovery(tmp_path: Path, import_server: MixpanelServer) -> None:
    data = tmp_path / "e.jsonl"
    expected = write_events(data, 300)
    import_server.fail_next(2, 500, endpoint="/import")
    result = run_child(str(data), *credentials(import_server), "--workers", "1", timeout=90)
    assert result.code == 0, result.err
    assert "retrying: HTTP 500 (attempt 1, next in" in result.err
    assert "retrying: HTTP 500 (attempt 2, next in" in result.err
    received = ids(import_server)
    assert len(received) == len(set(received)) == 300 and set(received) == set(expected)


def test_interrupted_import_resumes_without_resending(tmp_path: Path) -> None:
    data = tmp_path / "big.jsonl"
    expected = write_events(data, 3000)
    state = tmp_path / "progress.json"
    with MixpanelServer(service_account=ACCOUNT, latency=0.15) as server:
        args = [str(data), *credentials(server), "--batch-size", "100", "--workers", "1"]
        child = Child(*args, "--state", str(state))
        wait_until(lambda: len(server.imports) >= 500, 30, "the import did not make progress")
        child.proc.send_signal(signal.SIGINT)
        code, out, err = child.finish(30)
        assert code == 130, (out, err)
        assert "interrupted: " in err
        assert "interrupted; run the same command again to resume" in out
        assert f"progress saved in {state}" in out
        assert "Traceback" not in err
        first_run = len(server.imports)
        assert 500 <= first_run < 3000
        server.latency = 0.0
        resumed = run_child(*args, "--state", str(state))
        assert resumed.code == 0, resumed.err
        assert f"resuming with the progress saved in {state}" in resumed.err
        assert f"processed 0/{3000 - first_run:,} lines" in resumed.err  # the total is what is left
        assert f"{first_run:,} line(s) skipped, imported by an earlier run" in resumed.out
        received = ids(server)
    assert len(received) == len(set(received)) == 3000  # exactly once
    assert set(received) == set(expected)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_progress(tmp_path: Path) -> None:
    data = tmp_path / "e.jsonl"
    write_events(data, 1000)
    state = tmp_path / "progress.json"
    with MixpanelServer(service_account=ACCOUNT) as server:
        server.delay_next(1, 0.0, endpoint="/import")  # the first batch goes through ...
        server.delay_next(1, 60.0, endpoint="/import")  # ... the second one hangs
        args = [str(data), *credentials(server), "--batch-size", "100", "--workers", "1"]
        child = Child(*args, "--state", str(state))
        wait_until(lambda: len(server.imports) == 100, 30, "the first batch never arrived")
        time.sleep(0.3)  # the second request is on its way (and will hang)
        child.proc.send_signal(signal.SIGINT)
        child.wait_for("press Ctrl-C again to stop at once", 20)
        stopped = time.monotonic()
        child.proc.send_signal(signal.SIGINT)
        code, _out, err = child.finish(20)
        took = time.monotonic() - stopped
        assert code == 130, err
        assert took < 8  # well before the 10 s grace and the 60 s the server hangs
        assert "stopped; requests still in flight are sent again by the next run" in err
        assert "Traceback" not in err
        saved = json.loads(state.read_text())
        assert saved["sources"][str(data.resolve())]["done"] == [[1, 100]]
        server.clear()
        resumed = run(*args, "--state", str(state))
        assert resumed.code == 0, resumed.err
        assert sorted(ids(server)) == sorted(f"evt-{n}" for n in range(100, 1000))


def test_a_ctrl_c_in_the_middle_of_the_work_is_taken_between_steps(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    """Ctrl-C lands while the main thread is in the middle of its work (here: reporting a line
    it refuses, half way through the second batch). The run stops between two steps: what the
    server has is recorded, nothing is left half done, the SIGINT handler is given back, and the
    next run sends exactly the rest."""
    data = tmp_path / "e.jsonl"
    expected = write_events(data, 120)
    lines = data.read_text().splitlines()
    lines[70] = json.dumps(event(70, seconds_ago=-10 * 86400))  # refused: in the future
    data.write_text("\n".join(lines) + "\n")
    options = ImportOptions(
        files=[str(data)],
        endpoints=resolve_endpoints(api_host=import_server.url),
        credentials=ServiceAccount(*ACCOUNT),
        retry=fast_retries(),
        batch_size=50,
        workers=1,
        state_path=str(tmp_path / "p.json"),
    )
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    interrupted = Importer(
        options, progress=io.StringIO(), on_reject=lambda _: os.kill(os.getpid(), signal.SIGINT)
    ).run()
    assert interrupted.interrupted and not interrupted.stopped_at_once
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
    first = ids(import_server)
    assert first in ([], [f"evt-{n}" for n in range(50)])  # the first batch, or nothing
    assert interrupted.imported == len(first)
    resumed = Importer(options, progress=io.StringIO()).run()
    assert not resumed.interrupted and resumed.skipped_lines == len(first)
    received = ids(import_server)
    assert len(received) == len(set(received)) == 119  # exactly once; line 71 refused twice
    assert set(received) == set(expected) - {"evt-70"}


def test_a_file_changed_while_it_is_imported_is_left_for_the_next_run(tmp_path: Path) -> None:
    data = tmp_path / "e.jsonl"
    write_events(data, 3000)
    with MixpanelServer(service_account=ACCOUNT, latency=0.1) as server:
        args = [str(data), *credentials(server), "--batch-size", "100", "--workers", "1"]
        child = Child(*args)
        wait_until(lambda: len(server.imports) >= 100, 30, "the import did not start")
        text = data.read_text().replace('"evt-2999"', '"evt-7777"')  # the last line
        with open(data, "r+", encoding="utf-8") as handle:
            handle.write(text)
        code, out, err = child.finish(60)
        assert code == 1, err
        assert f"{data}:3000: the file changed while it was being imported" in out
        server.latency = 0.0
        again = run(*args)
        assert again.code == 0, again.out
        assert "evt-7777" in ids(server)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_import_draws_a_progress_bar_on_a_terminal(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    import pty

    data = tmp_path / "e.jsonl"
    write_events(data, 3000)
    leader, follower = pty.openpty()
    try:
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
    assert "\r[" in drawn and "] 3,000/3,000 lines" in drawn and "ETA" in drawn
    assert "processed" not in drawn  # no plain lines on a terminal


# --------------------------------------------------------------------------- the done set


@given(st.lists(st.tuples(st.integers(1, 300), st.integers(0, 20)), max_size=40))
def test_ranges_hold_exactly_the_positions_added(spans: list[tuple[int, int]]) -> None:
    ranges, expected = Ranges(), set()
    for first, length in spans:
        ranges.add(first, first + length)
        expected.update(range(first, first + length + 1))
    assert [p for p in range(330) if p in ranges] == sorted(expected)
    assert len(ranges) == len(expected)
    pairs = ranges.pairs()
    assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(pairs))  # merged
    below = ranges.below(150)
    assert [p for p in range(330) if p in below] == sorted(p for p in expected if p < 150)


# --------------------------------------------------------------------------- the sending seam


def fast_retries(attempts: int = 3) -> RetryPolicy:
    return RetryPolicy(
        initial_backoff=0.01, max_backoff=0.05, jitter=(0.0, 0.01), max_attempts=attempts
    )


def encoded(*records: dict[str, object]) -> list[bytes]:
    return [json.dumps(record).encode() for record in records]


@pytest.mark.allow_spec_violations("record.")  # refused records on purpose
def test_send_import_batch_says_what_became_of_each_record(import_server: MixpanelServer) -> None:
    transport = Transport(
        Endpoints.for_host(import_server.url), credentials=ServiceAccount(*ACCOUNT), timeout=5
    )
    stop = threading.Event()
    heard: list[str] = []
    try:
        import_server.fail_next(1, 503, endpoint="/import")
        batch = encoded(event(1), event(2, seconds_ago=-10 * 86400), event(3))
        result = send_import_batch(
            transport, batch, fast_retries(), stop=stop, on_retry=heard.append
        )
        assert sorted(result.accepted) == [0, 2]
        assert [index for index, _reason in result.refused] == [1]
        assert result.refused[0][1].startswith("properties.time:")
        assert result.undelivered == [] and result.fatal is None
        assert result.retry_cause == "HTTP 503"
        assert heard and heard[0].startswith("retrying: HTTP 503 (attempt 1, next in")
        # A request refused as such (here: another project) is fatal, not a per-record refusal.
        wrong = Transport(
            Endpoints.for_host(import_server.url),
            credentials=ServiceAccount(ACCOUNT[0], ACCOUNT[1], "1"),
            timeout=5,
        )
        refused = send_import_batch(wrong, encoded(event(4)), fast_retries(), stop=stop)
        wrong.close()
        assert refused.fatal and "project_id does not match" in refused.fatal
        assert refused.undelivered == [0] and refused.refused == []
    finally:
        transport.close()


def test_send_import_batch_gives_up_or_stops_when_told(down_url: str) -> None:
    transport = Transport(Endpoints.for_host(down_url), credentials=ServiceAccount(*ACCOUNT))
    try:
        stop = threading.Event()
        result = send_import_batch(
            transport, encoded(event(1), event(2)), fast_retries(), stop=stop
        )
        assert result.undelivered == [0, 1] and result.accepted == []
        assert result.retry_cause == "connection refused"
        slow = RetryPolicy(initial_backoff=30, jitter=(0.0, 0.0))
        threading.Timer(0.3, stop.set).start()
        started = time.monotonic()
        stopped = send_import_batch(transport, encoded(event(3)), slow, stop=stop)
        assert time.monotonic() - started < 10  # the 30 s wait was cut short
        assert stopped.undelivered == [0]
    finally:
        transport.close()


def test_a_batch_that_runs_out_of_retries_stops_the_run(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    data = tmp_path / "e.jsonl"
    write_events(data, 500)
    import_server.fail_next(100, 503, endpoint="/import")
    options = ImportOptions(
        files=[str(data)],
        endpoints=resolve_endpoints(api_host=import_server.url),
        credentials=ServiceAccount(*ACCOUNT),
        retry=fast_retries(3),
        batch_size=50,
        workers=1,
        state_path=str(tmp_path / "p.json"),
    )
    summary = Importer(options, progress=io.StringIO()).run()
    assert summary.gave_up == "HTTP 503"
    assert summary.undelivered == 50 and summary.imported == 0
    assert len(import_server.requests) == 3  # one batch, three attempts, then no more
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["sources"][str(data.resolve())]["done"] == []


def test_a_request_too_large_is_split(tmp_path: Path) -> None:
    data = tmp_path / "e.jsonl"
    expected = write_events(data, 400)
    with MixpanelServer(service_account=ACCOUNT, max_request_bytes=20_000) as server:
        result = run(str(data), *credentials(server), "--workers", "1")
        assert result.code == 0, result.out
        assert sorted(ids(server)) == sorted(expected)
        assert any(r.status == 413 for r in server.requests)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_named_pipe_is_read_once(tmp_path: Path, import_server: MixpanelServer) -> None:
    pipe = tmp_path / "events.pipe"
    os.mkfifo(pipe)
    source = tmp_path / "e.jsonl"
    expected = write_events(source, 30)

    def feed() -> None:
        with open(pipe, "wb") as handle:
            handle.write(gzip.compress(source.read_bytes()))

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    result = run(str(pipe), *credentials(import_server))
    writer.join(10)
    assert result.code == 0, result.out
    assert sorted(ids(import_server)) == sorted(expected)
    assert "progress saved" not in result.out


# --------------------------------------------------------------------------- many blocks


def test_an_edit_resends_only_the_block_it_falls_in(
    tmp_path: Path, import_server: MixpanelServer
) -> None:
    data = tmp_path / "big.jsonl"
    write_events(data, 25_000)
    assert run(str(data), *credentials(import_server)).code == 0
    assert len(import_server.imports) == 25_000
    lines = data.read_text().splitlines()
    lines[14_999] = json.dumps(event(99_999))  # line 15,000: in the second block of 10,000
    data.write_text("\n".join(lines) + "\n")
    import_server.clear()
    second = run(str(data), *credentials(import_server))
    assert second.code == 0
    assert "10,000 line(s) imported then are not the same now and are sent again" in second.err
    resent = ids(import_server)
    assert len(resent) == 10_000 and "evt-99999" in resent
    numbers = {int(i.removeprefix("evt-")) for i in resent}
    assert numbers == (set(range(10_000, 20_000)) - {14_999}) | {99_999}
    assert "15,000 line(s) skipped" in second.out


def test_an_interrupt_in_a_later_block_resumes_exactly_once(tmp_path: Path) -> None:
    data = tmp_path / "big.jsonl"
    expected = write_events(data, 25_000)
    state = tmp_path / "progress.json"
    with MixpanelServer(service_account=ACCOUNT, latency=0.3) as server:
        args = [str(data), *credentials(server), "--workers", "1", "--batch-size", "1500"]
        child = Child(*args, "--state", str(state))
        wait_until(lambda: len(server.imports) >= 12_000, 60, "the import did not get far")
        child.proc.send_signal(signal.SIGINT)
        code, _out, err = child.finish(30)
        assert code == 130, err
        first = len(server.imports)
        assert 12_000 <= first < 25_000
        server.latency = 0.0
        resumed = run(*args, "--state", str(state))
        assert resumed.code == 0, resumed.out
        assert f"{first:,} line(s) skipped" in resumed.out
        received = ids(server)
    assert len(received) == len(set(received)) == 25_000
    assert set(received) == set(expected)

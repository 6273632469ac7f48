"""The durable spool in one process: delivery through disk, outages, bounds, age, destinations,
corrupt and refused files, hostile values, big backlogs, and the ``spool`` command.

Process deaths (``kill -9``, pool termination, SIGTERM, ``os._exit``, forks, two processes on
one directory) are in ``test_spool_processes.py``. Every count is checked at the server, per
``$insert_id``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytest
from support import Errors, child_env, event_record, wait_until

from mp_logbridge import (
    BackgroundConsumer,
    ConfigurationError,
    MixpanelHandler,
    ServiceAccount,
    Tracker,
    tag,
)
from mp_logbridge.spool import drain_spool, inspect_spool
from mp_logbridge.testing import MixpanelServer

TOKEN = "spool-test-token-0123456789"
FAST = {"initial_backoff": 0.05, "max_backoff": 0.2, "jitter": (0.0, 0.05)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ids(records: list[dict[str, Any]]) -> Counter[str]:
    return Counter(record["properties"]["$insert_id"] for record in records)


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.sqlite3"))


def rows_in(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT coalesce(sum(count), 0) FROM records").fetchone()[0])
    finally:
        conn.close()


def write_orphan(directory: Path, url: str, records: list[dict[str, Any]], **options: Any) -> None:
    """Spool ``records`` for ``url`` (where nothing answers) and let the file go, as a process
    that ended during an outage does."""
    consumer = BackgroundConsumer(api_host=url, spool=directory, retry=FAST, **options)
    for record in records:
        assert consumer.send("event", record)
    consumer.close(timeout=1)
    assert consumer.stats()["spooled"] == len(records)


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def quiet(library_warnings: Any) -> Any:
    return library_warnings


# --------------------------------------------------------------------------- the basic promise


def test_records_go_through_disk_and_flush_means_acknowledged(server, spool_dir, quiet) -> None:
    consumer = BackgroundConsumer(api_host=server.url, spool=spool_dir)
    for i in range(500):
        consumer.send("event", event_record(f"id-{i}", n=i))
    assert consumer.flush(10) is True
    assert ids(server.events) == Counter({f"id-{i}": 1 for i in range(500)})
    stats = consumer.stats()
    assert stats["sent"] == 500 and stats["spooled"] == 0 and stats["dropped_total"] == 0
    assert len(spool_files(spool_dir)) == 1  # one file for this consumer, while it runs
    consumer.close()
    assert list(spool_dir.iterdir()) == []  # an empty spool leaves nothing behind


def test_the_server_down_for_a_whole_run_loses_nothing(spool_dir, quiet) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    consumer = BackgroundConsumer(api_host=url, spool=spool_dir, retry=FAST)
    for i in range(300):
        consumer.send("event", event_record(f"id-{i}"))
    assert consumer.flush(0.5) is False  # not acknowledged: it is not delivered
    stats = consumer.stats()
    assert stats["sent"] == 0 and stats["spooled"] == 300 and stats["dropped_total"] == 0
    consumer.close(timeout=0.5)
    assert consumer.stats()["dropped_total"] == 0  # close leaves them on disk, not dropped
    report = inspect_spool(spool_dir)
    assert [f.state for f in report.files] == ["orphaned"] and report.orphaned_records == 300
    with MixpanelServer(port=port) as server:
        later = BackgroundConsumer(api_host=url, spool=spool_dir)
        server.wait_for(300, timeout=15)
        wait_until(lambda: later.stats()["spooled"] == 0)
        assert ids(server.events) == Counter({f"id-{i}": 1 for i in range(300)})
        assert later.stats()["spool_adopted"] == 1 and later.stats()["sent"] == 300
        later.close()
    assert spool_files(spool_dir) == []


def test_an_outage_longer_than_the_retry_policy_drops_nothing(server, spool_dir, quiet) -> None:
    """In memory the batch would be dropped after one attempt; on disk it waits."""
    consumer = BackgroundConsumer(
        api_host=server.url,
        spool=spool_dir,
        retry={**FAST, "max_attempts": 1, "max_elapsed": 0.1},
    )
    server.fail_next(6, 503)
    for i in range(50):
        consumer.send("event", event_record(f"id-{i}"))
    assert consumer.flush(15) is True
    stats = consumer.stats()
    assert stats["dropped_total"] == 0 and stats["retries"] >= 6 and stats["sent"] == 50
    assert ids(server.events) == Counter({f"id-{i}": 1 for i in range(50)})
    quiet.wait_for("Mixpanel unreachable")
    quiet.wait_for("reachable again")
    consumer.close()


def test_every_kind_and_import_credentials_go_through_the_spool(spool_dir, quiet) -> None:
    account = ServiceAccount("svc-user", "svc-secret-value-0123", "4242")
    with MixpanelServer(service_account=account) as server:
        tracker = Tracker(TOKEN, api_host=server.url, credentials=account, spool=spool_dir)
        tracker.track("u1", "Signed Up", {"plan": "pro"})
        tracker.people.set("u1", {"$first_name": "Ada"})
        tracker.people.track_charge("u1", 9.5)
        tracker.groups.set("company", "acme", {"size": 3})
        tracker.import_event("u1", "Old Event", {"time": int(time.time()) - 86400, "a": 1})
        assert tracker.consumer.flush(10) is True
        assert [e["event"] for e in server.events] == ["Signed Up"]
        assert [e["event"] for e in server.imports] == ["Old Event"]
        assert len(server.profile_updates) == 2 and len(server.group_updates) == 1
        charge = server.profile_updates[1]["$append"]["$transactions"]
        assert charge["$amount"] == 9.5


def test_import_rows_carry_a_fingerprint_never_the_secret(spool_dir, quiet) -> None:
    secret = "very-secret-value-9f8e7d6c"
    account = ServiceAccount("svc-user", secret, "4242")
    url = f"http://127.0.0.1:{free_port()}"
    consumer = BackgroundConsumer(api_host=url, credentials=account, spool=spool_dir, retry=FAST)
    consumer.send("import", event_record("imp-1"))
    consumer.send("event", event_record("ev-1"))
    consumer.flush(0.3)
    on_disk = b"".join(p.read_bytes() for p in spool_dir.iterdir() if p.is_file())
    assert b"imp-1" in on_disk  # the records are there ...
    assert secret.encode() not in on_disk  # ... the secret is not, in any form below
    assert secret.encode().hex().encode() not in on_disk
    import base64

    assert base64.b64encode(f"svc-user:{secret}".encode()) not in on_disk
    consumer.close(timeout=0.3)


# --------------------------------------------------------------------------- bounds and age


def test_a_full_spool_drops_the_oldest_and_counts_them(spool_dir, quiet) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    errors = Errors()
    consumer = BackgroundConsumer(
        api_host=url, spool=spool_dir, max_spool_bytes=40_000, retry=FAST, on_error=errors
    )
    for i in range(600):
        consumer.send("event", event_record(f"id-{i}", n=i, pad="x" * 100))
        if i % 100 == 99:
            time.sleep(0.08)  # several commits, so the oldest rows are pushed out
    consumer.flush(0.5)
    stats = consumer.stats()
    full = stats["dropped"]["spool_full"]
    assert full > 0 and stats["spool_bytes"] <= 40_000
    assert stats["spooled"] + full == 600  # nothing unaccounted for
    reported = [record["properties"]["n"] for record in errors.records()]
    assert len(reported) == full
    quiet.wait_for("spool_full")
    with MixpanelServer(port=port) as server:
        server.wait_for(stats["spooled"], timeout=15)
        wait_until(lambda: consumer.stats()["spooled"] == 0)
        arrived = sorted(e["properties"]["n"] for e in server.events)
        # The newest records are the ones kept; the dropped ones are older than every survivor.
        assert arrived == list(range(600 - len(arrived), 600))
        assert max(reported) < min(arrived)
        consumer.close()


def test_one_batch_larger_than_the_bound_keeps_its_newest(spool_dir, quiet) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    consumer = BackgroundConsumer(api_host=url, spool=spool_dir, max_spool_bytes=5_000)
    for i in range(100):
        consumer.send("event", event_record(f"id-{i}", n=i))
    consumer.flush(0.3)
    stats = consumer.stats()
    assert 0 < stats["spooled"] < 100
    assert stats["dropped"]["spool_full"] == 100 - stats["spooled"]
    consumer.close(timeout=0.3)


def _age_rows(directory: Path, days: float) -> None:
    """Make every spooled row look ``days`` older (as if it had waited that long)."""
    for path in spool_files(directory):
        conn = sqlite3.connect(path)
        conn.execute("UPDATE records SET created_ms = created_ms - ?", (int(days * 86_400_000),))
        conn.commit()
        conn.close()


def _old_events(n: int, prefix: str) -> list[dict[str, Any]]:
    six_days_ago = int((time.time() - 6 * 86400) * 1000)
    records = []
    for i in range(n):
        record = event_record(f"{prefix}-{i}", n=i)
        record["properties"]["time"] = six_days_ago + i
        records.append(record)
    return records


def test_events_too_old_for_track_go_to_import_with_the_writers_credentials(
    spool_dir, quiet
) -> None:
    account = ServiceAccount("svc-user", "svc-secret-value-0123", "4242")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    fresh = [event_record(f"new-{i}") for i in range(5)]
    write_orphan(spool_dir, url, _old_events(20, "old") + fresh, credentials=account)
    # Only the old ones have waited: make the rows look spooled 6 days ago except the fresh.
    _age_rows(spool_dir, 6)
    with MixpanelServer(port=port, service_account=account) as server:
        result = drain_spool(spool_dir, credentials=account)
        assert result.complete and result.delivered == 25, result
        assert ids(server.imports) == Counter({f"old-{i}": 1 for i in range(20)})
        assert ids(server.events) == Counter({f"new-{i}": 1 for i in range(5)})
        assert all(r.headers.get("Authorization") for r in server.requests if r.path == "/import")


def test_old_events_without_credentials_are_dropped_as_expired(spool_dir, quiet) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    write_orphan(spool_dir, url, [*_old_events(10, "old"), event_record("new-0")])
    _age_rows(spool_dir, 6)
    with MixpanelServer(port=port) as server:
        errors = Errors()
        result = drain_spool(spool_dir, on_error=errors)
        assert result.dropped == {"expired": 10} and result.delivered == 1 and result.complete
        assert [e["properties"]["$insert_id"] for e in server.events] == ["new-0"]
        assert server.imports == []
        assert len(errors.records()) == 10


def test_old_events_of_other_credentials_wait_for_them(spool_dir, quiet) -> None:
    """Rows written with credentials this process does not hold are neither sent with the
    wrong ones nor dropped: they stay for a process that has them."""
    writer = ServiceAccount("svc-a", "secret-a-0123456789", "1")
    other = ServiceAccount("svc-b", "secret-b-0123456789", "2")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    write_orphan(spool_dir, url, _old_events(5, "old"), credentials=writer)
    _age_rows(spool_dir, 6)
    with MixpanelServer(port=port) as server:
        result = drain_spool(spool_dir, credentials=other)
        assert result.delivered == 0 and result.left == 5 and not result.dropped
        assert server.requests == []
        quiet.wait_for("no matching /import credentials")
        result = drain_spool(spool_dir, credentials=writer)
        assert result.complete and ids(server.imports) == Counter({f"old-{i}": 1 for i in range(5)})


# --------------------------------------------------------------------------- destinations


def test_rows_go_to_the_destination_they_were_written_for(spool_dir, quiet) -> None:
    """A spool written by a process of another project and region is delivered there, with
    that project's token, next to this process's own traffic."""
    port = free_port()
    eu_like = f"http://127.0.0.1:{port}"
    other = [event_record(f"other-{i}", token="other-project-token") for i in range(40)]
    write_orphan(spool_dir, eu_like, other)
    with MixpanelServer(port=port) as theirs, MixpanelServer() as ours:
        tracker = Tracker(TOKEN, api_host=ours.url, spool=spool_dir)
        for i in range(10):
            tracker.track("me", "Mine", {"i": i})
        assert tracker.consumer.flush(10)
        theirs.wait_for(40, timeout=15)
        assert ids(theirs.events) == Counter({f"other-{i}": 1 for i in range(40)})
        assert {e["properties"]["token"] for e in theirs.events} == {"other-project-token"}
        assert [e["event"] for e in ours.events] == ["Mine"] * 10


def test_a_half_drained_spool_is_finished_by_the_next_run(spool_dir, quiet) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    records = [event_record(f"id-{i}", n=i) for i in range(10_000)]
    write_orphan(spool_dir, url, records, max_queue_size=20_000)
    with MixpanelServer(port=port, latency=0.3) as server:
        first = drain_spool(spool_dir, timeout=0.8)
        assert 0 < first.delivered < 10_000 and first.left > 0
        server.latency = 0.0
        second = drain_spool(spool_dir)
        assert second.complete
        counts = ids(server.events)
        assert set(counts) == {f"id-{i}" for i in range(10_000)}
        # At-least-once: only the batch in flight when the first run stopped came twice.
        assert sum(counts.values()) - 10_000 <= 2000
        assert first.delivered + second.delivered == 10_000


def test_a_huge_backlog_drains_in_order(spool_dir, quiet) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    consumer = BackgroundConsumer(api_host=url, spool=spool_dir, max_queue_size=200_000)
    for i in range(100_000):
        consumer.send("event", event_record(f"id-{i}", n=i))
    consumer.close(timeout=20)
    assert consumer.stats()["spooled"] == 100_000
    with MixpanelServer(port=port) as server:
        started = time.monotonic()
        result = drain_spool(spool_dir)
        elapsed = time.monotonic() - started
        assert result.complete and result.delivered == 100_000
        assert [e["properties"]["n"] for e in server.events] == list(range(100_000))
        assert elapsed < 60  # a hang guard, not a speed claim (see benchmarks/bench_spool.py)


def test_hostile_values_come_back_byte_for_byte(spool_dir, quiet) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    values = [
        "plain",
        "ünïcödé ✓ 漢字 🚀",
        "nul\x00inside",
        'quote" backslash\\ newline\n tab\t',
        "'; DROP TABLE records; --",
        "x" * 400_000,
        {"nested": [1, 2.5, None, True, {"deep": ["a", {"b": "c"}]}]},
        -(2**63),
        2**63 - 1,
        1e-300,
    ]
    records = [event_record(f"id-{i}", value=value) for i, value in enumerate(values)]
    write_orphan(spool_dir, url, records)
    with MixpanelServer(port=port) as server:
        assert drain_spool(spool_dir).complete
        arrived = {e["properties"]["$insert_id"]: e for e in server.events}
        for record in records:
            got = arrived[record["properties"]["$insert_id"]]
            assert got["properties"]["value"] == record["properties"]["value"]


# --------------------------------------------------------------------------- damaged and refused


def _corrupt_real_spool(directory: Path, url: str) -> Path:
    source = directory / "source"
    write_orphan(source, url, [event_record(f"c-{i}", pad="y" * 300) for i in range(400)])
    [path] = spool_files(source)
    data = bytearray(path.read_bytes())
    rng = random.Random(7)
    for offset in range(4096 * 2, min(len(data), 4096 * 12)):
        data[offset] = rng.randrange(256)
    target = directory / path.name
    target.write_bytes(bytes(data))
    shutil.rmtree(source)
    return target


def test_corrupt_files_are_set_aside_once_and_the_app_goes_on(server, spool_dir, quiet) -> None:
    spool_dir.mkdir()
    (spool_dir / "0000000000001-1-aaaaaa.sqlite3").write_bytes(b"not a database" * 500)
    foreign = sqlite3.connect(spool_dir / "0000000000002-2-bbbbbb.sqlite3")
    foreign.execute("CREATE TABLE other (x)")
    foreign.commit()
    foreign.close()
    damaged = _corrupt_real_spool(spool_dir, f"http://127.0.0.1:{free_port()}")
    truncated = spool_dir / "0000000000003-3-cccccc.sqlite3"
    truncated.write_bytes(damaged.read_bytes()[:1000])

    consumer = BackgroundConsumer(api_host=server.url, spool=spool_dir)
    for i in range(20):
        consumer.send("event", event_record(f"mine-{i}"))
    assert consumer.flush(10) is True
    assert ids(server.events) == Counter({f"mine-{i}": 1 for i in range(20)})
    wait_until(lambda: consumer.stats()["spool_corrupt"] == 4)
    aside = sorted(p.name for p in spool_dir.glob("*.corrupt"))
    assert len(aside) == 4
    assert len([m for m in quiet.messages() if "is corrupt" in m]) == 4
    consumer.close()
    # A second start finds nothing to complain about: no crash loop, no second report.
    again = BackgroundConsumer(api_host=server.url, spool=spool_dir)
    again.send("event", event_record("again"))
    assert again.flush(10) is True
    again.close()
    assert len([m for m in quiet.messages() if "is corrupt" in m]) == 4
    assert inspect_spool(spool_dir).set_aside == sorted(spool_dir.glob("*.corrupt"))


def test_own_file_corrupted_under_it_is_replaced(server, spool_dir, quiet) -> None:
    consumer = BackgroundConsumer(api_host=server.url, spool=spool_dir)
    consumer.send("event", event_record("before"))
    assert consumer.flush(10)
    [path] = spool_files(spool_dir)
    store = consumer._spool.store
    with store.lock:  # overwrite the file while nothing uses it
        store.file.conn.close()
        path.write_bytes(b"garbage" * 1000)
        store.file.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for i in range(10):
        consumer.send("event", event_record(f"after-{i}"))
    assert consumer.flush(10) is True
    assert ids(server.events) == Counter(["before"] + [f"after-{i}" for i in range(10)])
    assert consumer.stats()["spool_corrupt"] == 1
    quiet.wait_for("is corrupt")
    consumer.close()


@contextmanager
def read_only_directory(path: Path) -> Iterator[Path]:
    """A directory nobody can create files in: mode 0555 for a normal user; for root (whom
    permissions do not stop) the immutable attribute, where the file system has it."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    if not shutil.which("chattr"):
        pytest.skip("running as root without chattr: no way to make a read-only directory")
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"chattr +i is not available here: {made.stderr!r}")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("where", ["read_only", "under_a_file"])
def test_a_disk_that_refuses_falls_back_to_memory_with_one_warning(
    server, tmp_path, quiet, where: str
) -> None:
    if where == "under_a_file":
        (tmp_path / "a-file").write_text("not a directory")
        directory = tmp_path / "a-file" / "spool"
        ctx: Any = nullcontext(directory)
    else:
        ctx = read_only_directory(tmp_path / "ro")
    with ctx as directory:
        handler = MixpanelHandler(TOKEN, api_host=server.url, spool=directory, flush_interval=0.05)
        log = logging.getLogger("tests.spool.refused")
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        try:
            for i in range(300):
                log.info("x", extra=tag.track("Refused", distinct_id="u", n=i))
            assert handler.flush(10) is True
            stats = handler.stats()
            assert stats["sent"] == 300 and stats["spool_fallback"] == 300
            assert stats["dropped_total"] == 0
            assert len(server.events) == 300
            assert len([m for m in quiet.messages() if "cannot be written" in m]) == 1
        finally:
            log.removeHandler(handler)
            handler.close()


# --------------------------------------------------------------------------- options


def test_options_are_checked_everywhere(spool_dir) -> None:
    with pytest.raises(ConfigurationError, match="spool must be"):
        BackgroundConsumer(spool=42)
    with pytest.raises(ConfigurationError, match="durability"):
        BackgroundConsumer(spool=spool_dir, durability="sometimes")
    with pytest.raises(ConfigurationError, match="durability"):
        BackgroundConsumer(durability="sometimes")  # even without a spool
    with pytest.raises(ConfigurationError, match="max_spool_bytes"):
        MixpanelHandler(TOKEN, spool=spool_dir, max_spool_bytes=0)
    with pytest.raises(ConfigurationError, match="max_spool_bytes"):
        Tracker(TOKEN, spool=spool_dir, max_spool_bytes=True)
    assert not spool_dir.exists()  # refused before anything was made


def test_dictconfig_and_the_environment_turn_it_on(server, tmp_path, run_python) -> None:
    directory = tmp_path / "from-env"
    result = run_python(
        """
        import json, logging.config, os
        from mp_logbridge import Tracker
        logging.config.dictConfig({
            "version": 1,
            "handlers": {"mp": {"class": "mp_logbridge.MixpanelHandler", "token": "T",
                                "api_host": os.environ["URL"], "spool": os.environ["DICT"],
                                "durability": "call", "max_spool_bytes": 1000000}},
            "loggers": {"app": {"handlers": ["mp"], "level": "INFO"}},
        })
        from mp_logbridge import tag
        logging.getLogger("app").info("x", extra=tag.track("From Config", distinct_id="u"))
        tracker = Tracker("T", api_host=os.environ["URL"])  # spool from MIXPANEL_SPOOL
        tracker.track("u", "From Env")
        handler = logging.getLogger("app").handlers[0]
        flushed = (handler.flush(10), tracker.flush(10))
        print(json.dumps({"handler": handler.stats(), "tracker": tracker.stats(),
                          "env": sorted(os.listdir(os.environ["MIXPANEL_SPOOL"])),
                          "dict": sorted(os.listdir(os.environ["DICT"]))}))
        print(*flushed)
        """,
        env={
            "URL": server.url,
            "DICT": str(tmp_path / "from-dict"),
            "MIXPANEL_SPOOL": str(directory),
        },
    )
    assert result.returncode == 0, result
    facts = json.loads(result.stdout.splitlines()[0])
    assert "spooled" in facts["handler"] and "spooled" in facts["tracker"]
    assert any(name.endswith(".sqlite3") for name in facts["env"])
    assert any(name.endswith(".sqlite3") for name in facts["dict"])
    assert result.stdout.splitlines()[1] == "True True"
    assert sorted(e["event"] for e in server.events) == ["From Config", "From Env"]


def test_spool_false_turns_the_environment_off(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MIXPANEL_SPOOL", str(tmp_path / "env"))
    consumer = BackgroundConsumer(spool=False)
    assert "spooled" not in consumer.stats()
    consumer.close()
    with_env = BackgroundConsumer()
    assert "spooled" in with_env.stats()
    with_env.close(timeout=0.2)


def test_durability_call_commits_before_send_returns(spool_dir, quiet) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    consumer = BackgroundConsumer(
        api_host=url, spool=spool_dir, durability="call", flush_interval=60
    )
    for i in range(5):
        consumer.send("event", event_record(f"id-{i}"))
        [path] = spool_files(spool_dir)
        assert rows_in(path) == i + 1  # on disk when send returned, nothing waits in memory
    assert consumer.stats()["queue_depth"] == 0
    consumer.close(timeout=0.3)


def test_stats_say_what_reached_mixpanel(spool_dir, quiet) -> None:
    port = free_port()
    consumer = BackgroundConsumer(api_host=f"http://127.0.0.1:{port}", spool=spool_dir, retry=FAST)
    for i in range(30):
        consumer.send("event", event_record(f"id-{i}"))
    wait_until(lambda: consumer.stats()["spooled"] == 30)
    assert consumer.stats()["sent"] == 0
    with MixpanelServer(port=port) as server:
        assert consumer.flush(10) is True
        assert consumer.stats()["sent"] == 30 == len(server.events)
        assert consumer.stats()["spooled"] == 0
    consumer.close()


def test_a_refused_record_is_counted_and_deleted(server, spool_dir, quiet) -> None:
    errors = Errors()
    consumer = BackgroundConsumer(api_host=server.url, spool=spool_dir, on_error=errors)
    server.fail_next(1, 400, endpoint="/engage")  # refused for good: not retried
    consumer.send("event", event_record("good"))
    consumer.send("profile_update", {"$token": TOKEN, "$distinct_id": "u", "$add": {"n": 1}})
    assert consumer.flush(10) is False  # something was dropped
    stats = consumer.stats()
    assert stats["dropped"]["rejected_by_server"] == 1 and stats["spooled"] == 0
    assert errors.records()[0]["$add"] == {"n": 1}
    assert [e["properties"]["$insert_id"] for e in server.events] == ["good"]
    consumer.close()


# --------------------------------------------------------------------------- the command


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mp_logbridge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
    )


def test_the_spool_command_shows_and_drains(spool_dir, quiet) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    write_orphan(spool_dir, url, [event_record(f"id-{i}") for i in range(25)])
    (spool_dir / "junk.sqlite3.corrupt").write_bytes(b"x")
    shown = cli("spool", str(spool_dir))
    assert shown.returncode == 0, shown.stderr
    assert "25 record(s)" in shown.stdout and "orphaned" in shown.stdout
    assert f"127.0.0.1:{port}/track" in shown.stdout and "junk.sqlite3.corrupt" in shown.stdout
    as_json = json.loads(cli("spool", str(spool_dir), "--json").stdout)
    assert as_json["records"] == 25 and as_json["files"][0]["state"] == "orphaned"
    down = cli("spool", str(spool_dir), "--drain", "--timeout", "2")
    assert down.returncode == 1 and "25 record(s) are still in the spool" in down.stdout
    with MixpanelServer(port=port) as server:
        drained = cli("spool", str(spool_dir), "--drain")
        assert drained.returncode == 0, drained.stderr
        assert "delivered 25 record(s) from 1 file(s)" in drained.stdout
        assert ids(server.events) == Counter({f"id-{i}": 1 for i in range(25)})
    assert spool_files(spool_dir) == []


def test_the_spool_command_leaves_live_files_alone(server, spool_dir, quiet) -> None:
    consumer = BackgroundConsumer(
        api_host=f"http://127.0.0.1:{free_port()}", spool=spool_dir, retry=FAST
    )
    consumer.send("event", event_record("live-1"))
    wait_until(lambda: consumer.stats()["spooled"] == 1)
    shown = cli("spool", str(spool_dir))
    assert "owned by a running process" in shown.stdout
    drained = cli("spool", str(spool_dir), "--drain")
    assert drained.returncode == 0 and "belong to running processes" in drained.stdout
    assert consumer.stats()["spooled"] == 1  # still ours
    consumer.close(timeout=0.2)


def test_the_spool_command_refuses_a_missing_directory(tmp_path) -> None:
    result = cli("spool", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"mp-logbridge: error: not a directory: {tmp_path / 'nope'}"

"""Scale-out through Redis Streams: producers, relay workers, and what goes wrong between them.

Everything here runs against a real ``redis-server`` (see ``redis_support.py``; CI sets
``MP_LOGBRIDGE_REQUIRE_REDIS=1`` so a missing server fails instead of skipping) and real HTTP
to :class:`~mp_logbridge.testing.MixpanelServer`. Producers and relay workers that must be
killed or signalled run in child interpreters with hard timeouts.
"""

from __future__ import annotations

import json
import logging
import logging.config
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_support import RedisServer, require_redis
from support import ROOT, child_env, closed_port_url, wait_until

from mp_logbridge import MixpanelHandler, ServiceAccount, Tracker
from mp_logbridge._streamentry import FIELD_RECORD, entry_head
from mp_logbridge.redis import RedisBroker, RedisStreamConsumer
from mp_logbridge.relay import EXIT_LEFT_PENDING, EXIT_OK, Relay
from mp_logbridge.testing import MixpanelServer

pytestmark = pytest.mark.subprocess

TOKEN = "relay-test-token"
FAST_RETRY = {"initial_backoff": 0.1, "max_backoff": 0.5, "jitter": [0.0, 0.1]}

# A relay worker in a child interpreter, configured by a JSON argument (the CLI's options plus
# a fast retry schedule); SIGTERM stops it as it stops the CLI.
RELAY_RUNNER = """
import json, signal, sys
from mp_logbridge.redis import RedisBroker
from mp_logbridge.relay import Relay
options = json.loads(sys.argv[1])
broker = RedisBroker(options.pop("url"), options.pop("stream"), options.pop("group", "relay"),
                     options.pop("consumer", None))
until_empty = options.pop("until_empty", False)
relay = Relay(broker, on_stats=lambda s: print(json.dumps(s), flush=True), **options)
signal.signal(signal.SIGTERM, lambda *_: relay.stop())
sys.exit(relay.run(until_empty=until_empty))
"""

# A producer process: a Tracker over a RedisStreamConsumer; one profile update every 50 records.
PRODUCER = """
import json, sys, time
from mp_logbridge import Tracker
from mp_logbridge.redis import RedisStreamConsumer
o = json.loads(sys.argv[1])
consumer = RedisStreamConsumer(o["url"], o["stream"], region=o.get("region", "us"),
                               max_queue_size=60000, flush_interval=0.05, retry=o.get("retry"))
tracker = Tracker(o["token"], consumer)
p = o["producer"]
for i in range(o["count"]):
    if i % 50 == 49:
        tracker.people.set(f"user-{p}-{i}", {"n": i})
    else:
        tracker.track(f"user-{p}-{i % 100}", "Fleet Event", {"$insert_id": f"p{p}-{i}", "i": i})
    if o.get("pause") and i % 1000 == 999:
        time.sleep(o["pause"])
flushed = consumer.flush(90)
consumer.close(30)
print(json.dumps({"flushed": flushed, **consumer.stats()}), flush=True)
"""


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def redis_binary() -> str:
    return require_redis()


@pytest.fixture(scope="module")
def redis_server(redis_binary: str) -> Iterator[RedisServer]:
    server = RedisServer(redis_binary).start()
    yield server
    server.close()


@pytest.fixture
def stream() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Child processes the test started; killed if still running at the end."""
    made: list[subprocess.Popen[str]] = []
    yield made
    for child in made:
        if child.poll() is None:
            child.kill()
            child.wait(10)


def _spawn(
    children: list[subprocess.Popen[str]], args: list[str], out: Path
) -> subprocess.Popen[str]:
    handle = out.open("w")
    child = subprocess.Popen(
        [sys.executable, *args],
        stdout=handle,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env(),
        cwd=str(ROOT),
    )
    handle.close()
    children.append(child)
    return child


def relay_child(
    children: list[subprocess.Popen[str]], out: Path, **options: Any
) -> subprocess.Popen[str]:
    options.setdefault("retry", FAST_RETRY)
    options.setdefault("stats_interval", 0.5)
    return _spawn(children, ["-c", RELAY_RUNNER, json.dumps(options)], out)


def relay_cli(
    children: list[subprocess.Popen[str]], out: Path, *args: str
) -> subprocess.Popen[str]:
    return _spawn(children, ["-m", "mp_logbridge", "relay", *args], out)


def stats_lines(out: Path) -> list[dict[str, Any]]:
    lines = []
    for line in out.read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def prewrite(
    server: RedisServer,
    stream: str,
    count: int,
    *,
    kind: str = "event",
    destination: str = "us",
    prefix: str = "pre",
    token: str = TOKEN,
) -> list[str]:
    """Write ``count`` event entries straight into the stream (as producers would have)."""
    client = server.client()
    ids = []
    head = entry_head(kind, destination, None)
    now = int(time.time() * 1000)
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        insert_id = f"{prefix}-{i}"
        ids.append(insert_id)
        record = {
            "event": "Backlog",
            "properties": {
                "token": token,
                "distinct_id": f"u{i % 97}",
                "time": now,
                "$insert_id": insert_id,
                "i": i,
            },
        }
        pipe.execute_command(
            "XADD", stream, "*", *head, FIELD_RECORD, json.dumps(record, separators=(",", ":"))
        )
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    client.close()
    return ids


def make_relay(server: RedisServer, stream: str, **options: Any) -> Relay:
    options.setdefault("retry", FAST_RETRY)
    options.setdefault("stats_interval", 0)
    options.setdefault("on_stats", None)
    return Relay(RedisBroker(server.url, stream, "relay"), **options)


def group_pending(server: RedisServer, stream: str, group: str = "relay") -> dict[str, int]:
    import redis

    client = server.client()
    try:
        summary = client.xpending(stream, group)
    except redis.exceptions.ResponseError as exc:  # no group yet: nothing pending
        assert "NOGROUP" in str(exc)
        return {}
    finally:
        client.close()
    return {c["name"].decode(): int(c["pending"]) for c in summary.get("consumers") or []}


def insert_ids(records: list[dict[str, Any]]) -> Counter[str]:
    return Counter(r["properties"]["$insert_id"] for r in records)


# --------------------------------------------------------------------------- producers


def test_entries_carry_kind_destination_project_and_no_secret(
    redis_server: RedisServer, stream: str
) -> None:
    account = ServiceAccount("importer", "S3CR3T-never-in-the-stream", 77)
    consumer = RedisStreamConsumer(redis_server.url, stream, region="eu", credentials=account)
    tracker = Tracker(TOKEN, consumer)
    assert tracker.track("u1", "Signed Up", {"plan": "pro"})
    assert tracker.import_event("u1", "Old Event", {"time": int(time.time()) - 3600})
    assert tracker.people.set("u1", {"$name": "Ann"})
    consumer.send("event", {"event": "Raw", "properties": {"token": TOKEN, "distinct_id": "u2"}})
    assert consumer.flush(10)
    consumer.close()
    client = redis_server.client()
    entries = client.xrange(stream)
    everything = b"".join(v for _id, fields in entries for pair in fields.items() for v in pair)
    client.close()
    assert b"S3CR3T" not in everything
    kinds = [(f[b"k"], f[b"d"], f.get(b"p")) for _id, f in entries]
    assert sorted(kinds) == sorted(
        [
            (b"event", b"eu", None),
            (b"import", b"eu", b"77"),
            (b"profile_update", b"eu", None),
            (b"event", b"eu", None),
        ]
    )
    records = [json.loads(f[b"r"]) for _id, f in entries]
    raw = next(r for r in records if r.get("event") == "Raw")
    assert raw["properties"]["$insert_id"]  # fixed before the record left the process
    assert all(f[b"v"] == b"1" for _id, f in entries)


def test_import_with_project_only_and_without(redis_server: RedisServer, stream: str) -> None:
    tracker = Tracker(TOKEN, RedisStreamConsumer(redis_server.url, stream, project="42"))
    assert tracker.import_event("u1", "Old", {"time": int(time.time()) - 60})
    tracker.close()
    bare = Tracker(TOKEN, RedisStreamConsumer(redis_server.url, stream))
    with pytest.raises(Exception, match="credentials"):
        bare.import_event("u1", "Old")
    bare.close()


def test_front_doors_select_the_stream_from_env_and_dict_config(
    redis_server: RedisServer, stream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIXPANEL_REDIS_URL", redis_server.url)
    monkeypatch.setenv("MIXPANEL_STREAM", stream)
    handler = MixpanelHandler(TOKEN, region="in", flush_interval=0.05)
    assert isinstance(handler.consumer, RedisStreamConsumer)
    logger = logging.getLogger(f"relay-env-{stream}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.warning("paid", extra={"mixpanel": {"event": "Paid", "distinct_id": "u9"}})
    assert handler.flush()
    logger.removeHandler(handler)
    handler.close()
    monkeypatch.delenv("MIXPANEL_REDIS_URL")
    monkeypatch.delenv("MIXPANEL_STREAM")
    name = f"relay-dict-{stream}"
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "handlers": {
                "mp": {
                    "class": "mp_logbridge.MixpanelHandler",
                    "token": TOKEN,
                    "region": "eu",
                    "redis_url": redis_server.url,
                    "stream": stream,
                    "flush_interval": 0.05,
                }
            },
            "loggers": {name: {"handlers": ["mp"], "level": "INFO", "propagate": False}},
        }
    )
    configured = logging.getLogger(name)
    mp_handler = configured.handlers[0]
    assert isinstance(mp_handler.consumer, RedisStreamConsumer)  # type: ignore[attr-defined]
    configured.info("signed up", extra={"mixpanel": {"event": "Signed Up", "distinct_id": "u8"}})
    assert mp_handler.flush()  # type: ignore[attr-defined]
    configured.removeHandler(mp_handler)
    mp_handler.close()
    client = redis_server.client()
    entries = client.xrange(stream)
    client.close()
    seen = {(json.loads(f[b"r"])["event"], f[b"d"]) for _id, f in entries}
    assert seen == {("Paid", b"in"), ("Signed Up", b"eu")}


def test_structlog_processor_writes_to_the_stream(redis_server: RedisServer, stream: str) -> None:
    structlog = pytest.importorskip("structlog")
    from mp_logbridge import MixpanelProcessor

    consumer = RedisStreamConsumer(redis_server.url, stream, flush_interval=0.05)
    processor = MixpanelProcessor(TOKEN, consumer=consumer)
    log = structlog.wrap_logger(structlog.testing.ReturnLogger(), processors=[processor])
    log.info("bought", mixpanel={"event": "Bought", "distinct_id": "u3"})
    assert consumer.flush(10)
    consumer.close()
    client = redis_server.client()
    assert [json.loads(f[b"r"])["event"] for _i, f in client.xrange(stream)] == ["Bought"]
    client.close()


def test_redis_outage_at_the_producer_is_retried_then_delivered(redis_binary: str) -> None:
    server = RedisServer(redis_binary)  # not started: Redis is down
    try:
        consumer = RedisStreamConsumer(
            server.url, "outage", retry=FAST_RETRY, flush_interval=0.05, redis_timeout=0.5
        )
        tracker = Tracker(TOKEN, consumer)
        for i in range(200):
            assert tracker.track(f"u{i}", "During Outage")  # the caller never waits on Redis
        wait_until(lambda: consumer.stats()["retries"] >= 2, 20, "no retry while Redis is down")
        assert consumer.stats()["sent"] == 0
        server.start()
        assert consumer.flush(20)
        stats = consumer.stats()
        assert stats["sent"] == 200 and stats["dropped_total"] == 0
        client = server.client()
        assert client.xlen("outage") == 200
        client.close()
        consumer.close()
    finally:
        server.close()


def test_stream_maxlen_bounds_the_stream(redis_server: RedisServer, stream: str) -> None:
    consumer = RedisStreamConsumer(
        redis_server.url, stream, stream_maxlen=100, max_queue_size=20_000
    )
    tracker = Tracker(TOKEN, consumer)
    for i in range(5000):
        tracker.track(f"u{i}", "Trimmed")
    assert consumer.flush(20)
    consumer.close()
    client = redis_server.client()
    length = client.xlen(stream)
    client.close()
    assert 100 <= length < 1000  # MAXLEN ~ trims whole nodes: about, never below, the bound


def test_import_mp_logbridge_does_not_import_redis(run_python: Any) -> None:
    result = run_python(
        """
        import sys, mp_logbridge
        print(sorted(m for m in ("redis", "mp_logbridge._relay", "mp_logbridge._redis_stream")
                     if m in sys.modules))
        """
    )
    assert result.returncode == 0, result
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- the fleet


def test_fleet_of_producers_and_workers_delivers_every_record_once(
    redis_server: RedisServer, stream: str, children: list[Any], tmp_path: Path
) -> None:
    """4 producer processes x 25 000 records, 3 relay workers (the CLI), one receiver."""
    with MixpanelServer() as server:
        producers = [
            _spawn(
                children,
                [
                    "-c",
                    PRODUCER,
                    json.dumps(
                        {
                            "url": redis_server.url,
                            "stream": stream,
                            "token": TOKEN,
                            "producer": p,
                            "count": 25_000,
                        }
                    ),
                ],
                tmp_path / f"producer-{p}.out",
            )
            for p in range(4)
        ]
        # Records written before any worker started are delivered too.
        wait_until(lambda: redis_server.client().xlen(stream) > 1000, 60, "producers wrote nothing")
        workers = [
            relay_cli(
                children,
                tmp_path / f"relay-{w}.out",
                "--redis",
                redis_server.url,
                "--stream",
                stream,
                "--group",
                "fleet",
                "--route",
                f"us={server.url}",
                "--stats-interval",
                "1",
                "--claim-idle",
                "30",
            )
            for w in range(3)
        ]
        for producer in producers:
            assert producer.wait(90) == 0, (tmp_path / "producer-0.out").read_text()
        for p in range(4):
            result = json.loads((tmp_path / f"producer-{p}.out").read_text().splitlines()[-1])
            assert result["flushed"] and result["sent"] == 25_000, result
            assert result["dropped_total"] == 0, result
        events = server.wait_for(4 * 24_500, "events", timeout=90)
        profiles = server.wait_for(4 * 500, "profile_updates", timeout=30)
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        codes = [worker.wait(30) for worker in workers]
        time.sleep(0.2)
        events, profiles = server.events, server.profile_updates
    counts = insert_ids(events)
    expected = {f"p{p}-{i}" for p in range(4) for i in range(25_000) if i % 50 != 49}
    assert set(counts) == expected
    assert max(counts.values()) == 1  # no failure, no re-delivery: each record exactly once
    profile_ids = Counter(r["$distinct_id"] for r in profiles)
    assert len(profile_ids) == 2000 and max(profile_ids.values()) == 1
    assert codes == [EXIT_OK] * 3
    delivered = [stats_lines(tmp_path / f"relay-{w}.out")[-1]["delivered"] for w in range(3)]
    assert sum(delivered) == 100_000
    assert all(n > 0 for n in delivered), delivered  # the group shared the work
    assert group_pending(redis_server, stream, "fleet") == {}


def test_killed_worker_entries_are_claimed_by_another(
    redis_server: RedisServer, stream: str, children: list[Any], tmp_path: Path
) -> None:
    ids = prewrite(redis_server, stream, 2000)
    with MixpanelServer() as server:
        server.delay_next(1, 4.0)  # the first request hangs: worker A dies holding everything
        a = relay_child(
            children,
            tmp_path / "a.out",
            url=redis_server.url,
            stream=stream,
            consumer="worker-a",
            routes={"us": server.url},
            batch_size=500,
            max_in_flight=1,  # the hanging request holds everything behind it
            claim_idle=1.5,
        )
        wait_until(
            lambda: group_pending(redis_server, stream).get("worker-a", 0) == 2000,
            30,
            "worker A did not take the entries",
        )
        time.sleep(0.3)
        a.kill()  # kill -9, mid-batch
        a.wait(10)
        assert group_pending(redis_server, stream) == {"worker-a": 2000}
        b = relay_child(
            children,
            tmp_path / "b.out",
            url=redis_server.url,
            stream=stream,
            consumer="worker-b",
            routes={"us": server.url},
            claim_idle=1.5,
            until_empty=True,
        )
        assert b.wait(60) == EXIT_OK, (tmp_path / "b.out").read_text()
        final = stats_lines(tmp_path / "b.out")[-1]
        time.sleep(0.1)
        arrived = insert_ids(server.events)
    assert final["claimed"] == 2000 and final["delivered"] == 2000
    assert set(arrived) == set(ids)  # at least once (A's hung request may also land)
    assert group_pending(redis_server, stream) == {}


def test_mixpanel_outage_backlog_waits_in_redis_and_drains(
    redis_server: RedisServer, stream: str
) -> None:
    port = int(closed_port_url().rsplit(":", 1)[1])
    relay = make_relay(redis_server, stream, routes={"us": f"http://127.0.0.1:{port}"})
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(relay.run()), daemon=True)
    runner.start()
    consumer = RedisStreamConsumer(redis_server.url, stream, region="us", flush_interval=0.05)
    tracker = Tracker(TOKEN, consumer)
    for i in range(3000):
        tracker.track(f"u{i % 50}", "While Down", {"$insert_id": f"down-{i}"})
    # The producers' side does not see the outage at all: written, never retried.
    assert consumer.flush(10)
    produced = consumer.stats()
    assert produced["sent"] == 3000 and produced["retries"] == 0 and produced["dropped_total"] == 0
    wait_until(lambda: relay.stats()["retries"] >= 3, 30, "the relay did not retry")
    backlog = RedisBroker(redis_server.url, stream, "relay").progress()
    assert relay.stats()["delivered"] == 0
    assert backlog["pending"] + (backlog["lag"] or 0) == 3000  # all of it waits in Redis
    server = MixpanelServer(port=port).start()
    try:
        server.wait_for(3000, timeout=30)
        wait_until(lambda: relay.stats()["held"] == 0, 10, "acknowledgements missing")
        relay.stop()
        runner.join(30)
        assert set(insert_ids(server.events)) == {f"down-{i}" for i in range(3000)}
    finally:
        server.stop()
        consumer.close()
    assert codes == [EXIT_OK]
    assert group_pending(redis_server, stream) == {}


# --------------------------------------------------------------------------- refusals


@pytest.mark.allow_spec_violations("record.")  # a record the server refuses, on purpose
def test_strict_import_partial_failure_acks_accepted_and_dead_letters_refused(
    redis_server: RedisServer, stream: str
) -> None:
    account = ServiceAccount("importer", "S3CR3T-relay-only", "42")
    with MixpanelServer(service_account=account) as server:
        consumer = RedisStreamConsumer(redis_server.url, stream, region="us", project="42")
        now = int(time.time())
        for i in range(3):
            consumer.send(
                "import",
                {
                    "event": "Old",
                    "properties": {
                        "token": TOKEN,
                        "distinct_id": "u1",
                        "time": now - 60,
                        "$insert_id": f"ok-{i}",
                    },
                },
            )
        consumer.send(
            "import",
            {
                "event": "Future",
                "properties": {
                    "token": TOKEN,
                    "distinct_id": "u1",
                    "time": now + 86_400,
                    "$insert_id": "bad-1",
                },
            },
        )
        assert consumer.flush(10)
        consumer.close()
        relay = make_relay(
            redis_server, stream, routes={"us": server.url}, credentials={"42": account}
        )
        assert relay.run(until_empty=True) == EXIT_OK
        imported = insert_ids(server.imports)
    assert set(imported) == {"ok-0", "ok-1", "ok-2"}
    broker = RedisBroker(redis_server.url, stream, "relay")
    dead = broker.dead_entries()
    assert len(dead) == 1
    fields = dead[0][1]
    assert json.loads(fields[b"r"])["properties"]["$insert_id"] == "bad-1"
    assert b"properties.time" in fields[b"reason"]
    assert fields[b"status"] == b"400" and fields[b"drop"] == b"rejected_by_server"
    assert fields[b"k"] == b"import" and fields[b"p"] == b"42"
    assert relay.stats()["dead_lettered"] == 1 and relay.stats()["delivered"] == 3
    assert group_pending(redis_server, stream) == {}
    client = redis_server.client()
    for key in (stream, f"{stream}:dead"):
        for _id, entry in client.xrange(key):
            assert not any(b"S3CR3T" in value for value in entry.values())
    client.close()


def test_rejected_records_replayed_after_a_fix_are_delivered(
    redis_server: RedisServer, stream: str, tmp_path: Path, children: list[Any]
) -> None:
    """The relay held a wrong secret: the server refused (401), the records went to the
    dead-letter stream with the reason; after the fix, ``--replay-dead`` brings them back."""
    with MixpanelServer(service_account=("importer", "right-secret", "42")) as server:
        consumer = RedisStreamConsumer(redis_server.url, stream, region="us", project="42")
        now = int(time.time())
        for i in range(2):
            consumer.send(
                "import",
                {
                    "event": "Old",
                    "properties": {
                        "token": TOKEN,
                        "distinct_id": "u1",
                        "time": now - 60,
                        "$insert_id": f"r-{i}",
                    },
                },
            )
        assert consumer.flush(10)
        consumer.close()
        wrong = tmp_path / "wrong.json"
        wrong.write_text(json.dumps({"42": {"username": "importer", "secret": "wrong-secret"}}))
        right = tmp_path / "right.json"
        right.write_text(json.dumps({"42": {"username": "importer", "secret": "right-secret"}}))
        common = [
            "--redis",
            redis_server.url,
            "--stream",
            stream,
            "--group",
            "relay",
            "--route",
            f"us={server.url}",
            "--until-empty",
            "--stats-interval",
            "0",
        ]
        first = relay_cli(children, tmp_path / "first.out", *common, "--credentials", str(wrong))
        assert first.wait(30) == EXIT_OK, (tmp_path / "first.out").read_text()
        assert server.imports == []
        dead = RedisBroker(redis_server.url, stream, "relay").dead_entries()
        assert len(dead) == 2
        assert all(
            f[b"status"] == b"401" and b"Invalid credentials" in f[b"reason"] for _i, f in dead
        )
        assert b"wrong-secret" not in (tmp_path / "first.out").read_bytes()
        replay = relay_cli(
            children,
            tmp_path / "replay.out",
            "--redis",
            redis_server.url,
            "--stream",
            stream,
            "--replay-dead",
        )
        assert replay.wait(30) == EXIT_OK
        assert "replayed 2 entries" in (tmp_path / "replay.out").read_text()
        second = relay_cli(children, tmp_path / "second.out", *common, "--credentials", str(right))
        assert second.wait(30) == EXIT_OK, (tmp_path / "second.out").read_text()
        assert set(insert_ids(server.imports)) == {"r-0", "r-1"}
    assert RedisBroker(redis_server.url, stream, "relay").dead_entries() == []


def test_two_tokens_two_regions_reach_the_right_project_and_host(
    redis_server: RedisServer, stream: str
) -> None:
    with MixpanelServer() as us, MixpanelServer() as eu:
        us_tracker = Tracker("token-us", RedisStreamConsumer(redis_server.url, stream, region="us"))
        eu_tracker = Tracker("token-eu", RedisStreamConsumer(redis_server.url, stream, region="eu"))
        lost = Tracker("token-x", RedisStreamConsumer(redis_server.url, stream, destination="mars"))
        for i in range(300):
            us_tracker.track(f"u{i}", "US Event", {"$insert_id": f"us-{i}"})
            eu_tracker.track(f"u{i}", "EU Event", {"$insert_id": f"eu-{i}"})
            eu_tracker.people.set(f"u{i}", {"n": i})
        lost.track("u1", "Nowhere")
        for tracker in (us_tracker, eu_tracker, lost):
            assert tracker.consumer.flush(10)
            tracker.consumer.close()
        relay = make_relay(redis_server, stream, routes={"us": us.url, "eu": eu.url})
        assert relay.run(until_empty=True) == EXIT_OK
        us_events, eu_events, eu_profiles = us.events, eu.events, eu.profile_updates
        assert us.profile_updates == []
    assert {e["properties"]["token"] for e in us_events} == {"token-us"}
    assert {e["properties"]["token"] for e in eu_events} == {"token-eu"}
    assert set(insert_ids(us_events)) == {f"us-{i}" for i in range(300)}
    assert set(insert_ids(eu_events)) == {f"eu-{i}" for i in range(300)}
    assert len(eu_profiles) == 300 and {p["$token"] for p in eu_profiles} == {"token-eu"}
    dead = RedisBroker(redis_server.url, stream, "relay").dead_entries()
    assert len(dead) == 1 and b"unknown destination 'mars'" in dead[0][1][b"reason"]


# --------------------------------------------------------------------------- adversarial


def test_garbage_entries_are_dead_lettered_and_spare_the_good_ones(
    redis_server: RedisServer, stream: str
) -> None:
    client = redis_server.client()
    good = prewrite(redis_server, stream, 5, prefix="good-a")
    garbage = [
        {b"x": b"y"},
        {b"v": b"1", b"k": b"event", b"d": b"us", b"r": b"not json at all"},
        {b"v": b"1", b"k": b"teleport", b"d": b"us", b"r": b"{}"},
        {b"v": b"9", b"k": b"event", b"d": b"us", b"r": b"{}"},
        {b"v": b"1", b"k": b"event", b"d": b"us", b"r": b"[1, 2, 3]"},
        {b"v": b"1", b"k": b"event", b"d": b"\xff\xfe", b"r": b"{}"},
        {b"v": b"1", b"k": b"event", b"d": b"us", b"r": b"{" + b" " * 1_100_000 + b"}"},
    ]
    for fields in garbage:
        client.xadd(stream, fields)
    good += prewrite(redis_server, stream, 5, prefix="good-b")
    client.close()
    with MixpanelServer() as server:
        relay = make_relay(redis_server, stream, routes={"us": server.url})
        assert relay.run(until_empty=True) == EXIT_OK
        arrived = insert_ids(server.events)
    assert set(arrived) == set(good)
    dead = RedisBroker(redis_server.url, stream, "relay").dead_entries()
    assert len(dead) == len(garbage)
    assert all(
        f[b"reason"].startswith(b"malformed entry:") and f[b"drop"] == b"invalid" for _i, f in dead
    )
    assert relay.stats()["malformed"] == len(garbage)


def test_sigterm_mid_batch_finishes_the_request_and_hands_back_the_rest(
    redis_server: RedisServer, stream: str, children: list[Any], tmp_path: Path
) -> None:
    ids = prewrite(redis_server, stream, 3000)
    with MixpanelServer(latency=0.8) as server:
        common = [
            "--redis",
            redis_server.url,
            "--stream",
            stream,
            "--group",
            "relay",
            "--batch-size",
            "1000",
            "--max-in-flight",
            "1",
            "--route",
            f"us={server.url}",
            "--claim-idle",
            "30",
            "--stats-interval",
            "0",
        ]
        worker = relay_cli(
            children, tmp_path / "w.out", *common, "--stop-timeout", "15", "--consumer", "w"
        )
        wait_until(lambda: group_pending(redis_server, stream).get("w", 0) == 3000, 30)
        time.sleep(0.2)  # the first request is under way
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == EXIT_OK, (tmp_path / "w.out").read_text()
        final = stats_lines(tmp_path / "w.out")[-1]
        delivered = insert_ids(server.events)
        # The request under way finished and was acknowledged; nothing was sent after the
        # signal, and what had not been sent went back to the group.
        assert final["stopped"] and final["delivered"] == len(delivered) == 1000
        assert group_pending(redis_server, stream) == {"w": 2000}
        # Handed back: another worker takes them at once, not after the 30 s claim time.
        second = relay_cli(
            children, tmp_path / "second.out", *common, "--until-empty", "--consumer", "second"
        )
        assert second.wait(40) == EXIT_OK, (tmp_path / "second.out").read_text()
        arrived = insert_ids(server.events)
    assert set(arrived) == set(ids) and max(arrived.values()) == 1
    assert group_pending(redis_server, stream) == {}


def test_sigterm_deadline_passed_mid_request_loses_nothing(
    redis_server: RedisServer, stream: str, children: list[Any], tmp_path: Path
) -> None:
    ids = prewrite(redis_server, stream, 2000)
    with MixpanelServer(latency=3.0) as server:  # far longer than the stop deadline
        common = [
            "--redis",
            redis_server.url,
            "--stream",
            stream,
            "--group",
            "relay",
            "--batch-size",
            "1000",
            "--route",
            f"us={server.url}",
            "--claim-idle",
            "30",
            "--stats-interval",
            "0",
        ]
        first = relay_cli(
            children,
            tmp_path / "first.out",
            *common,
            "--stop-timeout",
            "0.3",
            "--consumer",
            "first",
        )
        wait_until(lambda: group_pending(redis_server, stream).get("first", 0) == 2000, 30)
        time.sleep(0.2)
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == EXIT_LEFT_PENDING, (tmp_path / "first.out").read_text()
        assert group_pending(redis_server, stream) == {"first": 2000}  # nothing acknowledged
        second = relay_cli(
            children, tmp_path / "second.out", *common, "--until-empty", "--consumer", "second"
        )
        assert second.wait(40) == EXIT_OK, (tmp_path / "second.out").read_text()
        time.sleep(3.1)  # the first worker's request may still land: at least once
        arrived = insert_ids(server.events)
    assert set(arrived) == set(ids)
    assert group_pending(redis_server, stream) == {}


def test_redis_restart_mid_run_loses_nothing(
    redis_binary: str, children: list[Any], tmp_path: Path
) -> None:
    redis = RedisServer(redis_binary, persistent=True).start()
    try:
        with MixpanelServer() as server:
            producer = _spawn(
                children,
                [
                    "-c",
                    PRODUCER,
                    json.dumps(
                        {
                            "url": redis.url,
                            "stream": "restart",
                            "token": TOKEN,
                            "producer": 7,
                            "count": 20_000,
                            "pause": 0.1,
                            "retry": FAST_RETRY,
                        }
                    ),
                ],
                tmp_path / "producer.out",
            )
            worker = relay_child(
                children,
                tmp_path / "relay.out",
                url=redis.url,
                stream="restart",
                routes={"us": server.url},
                claim_idle=3,
            )
            wait_until(lambda: len(server.events) >= 2000, 60, "nothing delivered")
            redis.restart()  # mid-run: producer and relay both lose their connections
            assert producer.wait(90) == 0, (tmp_path / "producer.out").read_text()
            result = json.loads((tmp_path / "producer.out").read_text().splitlines()[-1])
            assert result["flushed"] and result["dropped_total"] == 0, result
            server.wait_for(19_600, timeout=60)
            wait_until(lambda: not group_pending(redis, "restart"), 30, "entries left pending")
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(30) == EXIT_OK, (tmp_path / "relay.out").read_text()
            arrived = insert_ids(server.events)
        assert set(arrived) == {f"p7-{i}" for i in range(20_000) if i % 50 != 49}
        assert stats_lines(tmp_path / "relay.out")[-1]["broker_errors"] >= 1
    finally:
        redis.close()


def test_huge_backlog_drains_with_bounded_memory(
    redis_server: RedisServer, stream: str, children: list[Any], tmp_path: Path
) -> None:
    ids = prewrite(redis_server, stream, 60_000)
    with MixpanelServer() as server:
        worker = relay_child(
            children,
            tmp_path / "w.out",
            url=redis_server.url,
            stream=stream,
            routes={"us": server.url},
            max_held=3000,
            stats_interval=0.2,
            until_empty=True,
        )
        assert worker.wait(90) == EXIT_OK, (tmp_path / "w.out").read_text()
        arrived = insert_ids(server.events)
    lines = stats_lines(tmp_path / "w.out")
    assert len(lines) >= 3
    assert max(line["held"] for line in lines) <= 3000  # it never held more than allowed
    assert lines[-1]["delivered"] == 60_000
    assert set(arrived) == set(ids)
    client = redis_server.client()
    assert client.xlen(stream) == 0  # delivered entries are deleted
    client.close()


# --------------------------------------------------------------------------- rate, CLI


def test_rate_limit_bucket_is_shared_by_workers(redis_server: RedisServer, stream: str) -> None:
    one = RedisBroker(redis_server.url, stream, "relay", "one")
    two = RedisBroker(redis_server.url, stream, "relay", "two")
    assert one.take_rate(["project-a"], [1000], 1000.0, 1000.0) == 0
    wait = two.take_rate(["project-a"], [500], 1000.0, 1000.0)  # the same bucket, now empty
    assert 0.3 < wait <= 0.5
    assert two.take_rate(["project-b"], [500], 1000.0, 1000.0) == 0  # another project's
    # A batch above the burst is granted on a full bucket and leaves a debt.
    assert one.take_rate(["project-c"], [3000], 1000.0, 1000.0) == 0
    assert 2.9 < two.take_rate(["project-c"], [1000], 1000.0, 1000.0) <= 3.0
    # All keys or none: project-a's shortage keeps project-d's tokens untouched.
    assert two.take_rate(["project-a", "project-d"], [1000, 1000], 1000.0, 1000.0) > 0
    assert two.take_rate(["project-d"], [1000], 1000.0, 1000.0) == 0


def test_relay_with_a_rate_limit_still_delivers_everything(
    redis_server: RedisServer, stream: str
) -> None:
    ids = prewrite(redis_server, stream, 3000)
    with MixpanelServer() as server:
        relay = make_relay(
            redis_server, stream, routes={"us": server.url}, max_rate=5000.0, batch_size=1000
        )
        assert relay.run(until_empty=True) == EXIT_OK
        assert set(insert_ids(server.events)) == set(ids)
        assert len(server.requests) >= 3


def test_cli_usage_and_unreachable_redis_exit_codes(
    redis_binary: str, children: list[Any], tmp_path: Path
) -> None:
    missing = relay_cli(children, tmp_path / "missing.out")
    assert missing.wait(30) == 2
    assert "--redis" in (tmp_path / "missing.out").read_text()
    gone = relay_cli(
        children,
        tmp_path / "gone.out",
        "--redis",
        f"unix://{tmp_path}/nothing.sock",
        "--connect-timeout",
        "0.5",
    )
    assert gone.wait(30) == 3
    assert "cannot reach the broker" in (tmp_path / "gone.out").read_text()

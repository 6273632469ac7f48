"""Scale-out through Redis Streams: relay throughput by number of workers, and what writing to
a stream instead of posting costs the caller.

* ``throughput``: records written to a stream beforehand, then 1, 2 and 4 relay workers
  (``mp-logbridge relay --until-empty``, each its own process) deliver them to a receiver that
  answers after ``--latency`` seconds (50 ms by default, like a distant API). Reported: records
  per second, and the ratio to one worker.
* ``caller``: microseconds per ``Tracker.track`` call with a ``RedisStreamConsumer`` and with the
  HTTP ``BackgroundConsumer`` (same receiver, no latency), interleaved rounds, medians; the ratio
  is what matters.

Needs ``redis-server`` on PATH and the ``redis`` package (``pip install 'mp_logbridge[redis]'``).

    python benchmarks/bench_relay.py            # both sections (~1-2 minutes)
    python benchmarks/bench_relay.py --quick    # smoke run
    python benchmarks/bench_relay.py --json relay.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mp_logbridge import BackgroundConsumer, Tracker  # noqa: E402
from mp_logbridge._streamentry import FIELD_RECORD, entry_head  # noqa: E402
from mp_logbridge.redis import RedisStreamConsumer  # noqa: E402

TOKEN = "bench-token"
RECEIVER = """
import sys
from mp_logbridge.testing import MixpanelServer
server = MixpanelServer(latency=float(sys.argv[1])).start()
print(server.url, flush=True)
sys.stdin.read()
server.stop()
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXPANEL_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


class Redis:
    """A private redis-server on a Unix socket."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not on PATH (apt-get install redis-server)")
        self.directory = Path(tempfile.mkdtemp(prefix="mpb-"))
        self.socket = self.directory / "redis.sock"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        self.client = redis.Redis(unix_socket_path=str(self.socket))
        for _ in range(500):
            try:
                self.client.ping()
                break
            except (redis.exceptions.RedisError, OSError):
                time.sleep(0.01)
        self.url = f"unix://{self.socket}"

    def close(self) -> None:
        self.client.close()
        self.process.kill()
        self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


class Receiver:
    """A MixpanelServer in its own process (its CPU time is not the relays')."""

    def __init__(self, latency: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", RECEIVER, str(latency)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(10)


def _prewrite(redis: Redis, stream: str, count: int) -> None:
    head = entry_head("event", "bench", None)
    now = int(time.time() * 1000)
    pipe = redis.client.pipeline(transaction=False)
    for i in range(count):
        record = {
            "event": "Bench",
            "properties": {
                "token": TOKEN,
                "distinct_id": f"u{i % 500}",
                "time": now,
                "$insert_id": f"b{i}",
                "plan": "pro",
                "amount": i * 0.5,
            },
        }
        pipe.execute_command(
            "XADD", stream, "*", *head, FIELD_RECORD, json.dumps(record, separators=(",", ":"))
        )
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()


def throughput(
    redis: Redis, records: int, latency: float, workers: list[int]
) -> list[dict[str, Any]]:
    results = []
    for count in workers:
        receiver = Receiver(latency)
        stream = f"bench-{count}"
        try:
            _prewrite(redis, stream, records)
            started = time.perf_counter()
            children = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "mp_logbridge",
                        "relay",
                        "--redis",
                        redis.url,
                        "--stream",
                        stream,
                        "--route",
                        f"bench={receiver.url}",
                        "--until-empty",
                        "--stats-interval",
                        "0",
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                    env=_env(),
                )
                for _ in range(count)
            ]
            delivered = 0
            for child in children:
                out, _ = child.communicate(timeout=600)
                delivered += json.loads(out.strip().splitlines()[-1])["delivered"]
            elapsed = time.perf_counter() - started
        finally:
            receiver.close()
        results.append(
            {
                "workers": count,
                "records": delivered,
                "seconds": round(elapsed, 2),
                "records_per_s": round(delivered / elapsed),
            }
        )
    base = results[0]["records_per_s"]
    for row in results:
        row["ratio_to_1"] = round(row["records_per_s"] / base, 2)
    return results


def caller(redis: Redis, calls: int, rounds: int) -> dict[str, Any]:
    receiver = Receiver(0.0)
    try:
        subjects = {
            "redis_stream": RedisStreamConsumer(
                redis.url, "caller", destination="bench", max_queue_size=calls * 2
            ),
            "http_background": BackgroundConsumer(api_host=receiver.url, max_queue_size=calls * 2),
        }
        trackers = {name: Tracker(TOKEN, consumer) for name, consumer in subjects.items()}
        samples: dict[str, list[float]] = {name: [] for name in subjects}
        properties = {"plan": "pro", "amount": 9.99}
        for _round in range(rounds):
            for name, tracker in trackers.items():
                track = tracker.track
                started = time.perf_counter_ns()
                for _i in range(calls):
                    track("user-1", "Bench", properties)
                samples[name].append((time.perf_counter_ns() - started) / calls / 1000)
                subjects[name].flush(60)
        for consumer in subjects.values():
            consumer.close(10)
    finally:
        receiver.close()
    medians = {name: round(statistics.median(values), 2) for name, values in samples.items()}
    return {
        "us_per_call": medians,
        "ratio_redis_to_http": round(medians["redis_stream"] / medians["http_background"], 2),
        "calls": calls,
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--sections", default="throughput,caller")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    records = 20_000 if args.quick else 60_000
    sections = set(args.sections.split(","))
    redis = Redis()
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "latency_s": args.latency,
    }
    try:
        if "throughput" in sections:
            rows = throughput(redis, records, args.latency, [1, 2, 4])
            report["throughput"] = rows
            print(
                f"relay throughput, {records:,} records, {args.latency * 1000:.0f} ms receiver latency"
            )
            print(f"{'workers':>8} {'seconds':>8} {'records/s':>10} {'x 1 worker':>10}")
            for row in rows:
                print(
                    f"{row['workers']:>8} {row['seconds']:>8} {row['records_per_s']:>10,} "
                    f"{row['ratio_to_1']:>10}"
                )
        if "caller" in sections:
            result = caller(redis, 5_000 if args.quick else 20_000, 3 if args.quick else 7)
            report["caller"] = result
            print("\ncaller cost of Tracker.track (median us per call)")
            for name, value in result["us_per_call"].items():
                print(f"  {name:<16} {value:>8}")
            print(f"  redis / http ratio: {result['ratio_redis_to_http']}")
    finally:
        redis.close()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

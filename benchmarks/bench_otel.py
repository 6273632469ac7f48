"""What ending a span costs the app's thread with the Mixpanel span processor or exporter attached.

Every subject is an OpenTelemetry SDK ``TracerProvider`` with a different pipeline; each round
starts ``--spans`` HTTP server spans (ten attributes, as an instrumented web framework sets them,
``enduser.id`` included) and times only their ``end()`` calls. Subjects:

* ``sdk alone``: a provider without processors — the SDK's own cost of ending a span;
* ``sdk + batch``: the SDK's ``BatchSpanProcessor`` with an exporter that discards — what a
  typical OTLP setup costs the app's thread (the peer to compare with);
* ``+ processor, not chosen``: ``MixpanelSpanProcessor`` on a span no rule chooses (an internal
  span): the price every other span of the app pays;
* ``+ processor, chosen``: ``MixpanelSpanProcessor`` on a chosen span (a page view): rule, user,
  one deferred message queued; building and sending happen on the consumer's thread;
* ``batch + processor, chosen``: both, as an app exporting OTLP and sending page views;
* ``batch(exporter), chosen``: the zero-code form, ``MixpanelSpanExporter`` inside a
  ``BatchSpanProcessor`` plus its context note-taker.

The Mixpanel receiver runs in a child process (so its CPU time is not the app's); queues are
emptied between rounds, outside the timed part. Rounds are interleaved in a rotating order and
each subject's fastest round is its figure (median shown too). Figures: ns per ``end()`` and the
ratio to ``sdk alone`` and to ``sdk + batch``, for wall time and for the ending thread's own CPU
time (``thread_time``). Wall time in this tight loop also carries the consumer thread's work
(building and encoding each event, ~15 µs) while it holds the GIL; the thread's CPU time is what
ending the span itself costs.

Usage: ``python benchmarks/bench_otel.py [--quick] [--rounds N] [--spans N] [--json out.json]``.

Measured on the 2-core development machine, shared with other work (load average 1.1-1.7),
Python 3.11.7, opentelemetry-sdk 1.45.1, 15 rounds x 5000 spans, two runs; fastest round, ns per
``end()``:

    subject                      wall           thread CPU     CPU vs sdk   CPU vs sdk + batch
    sdk alone                    1 790-1 810    1 790-1 810    1.00x        0.60-0.64x
    sdk + batch (the peer)       3 100-3 400    2 810-3 020    1.57-1.67x   1.00x
    + processor, not chosen      3 080-3 220    3 080-3 220    1.70-1.79x   1.02-1.14x
    + processor, chosen          8 710-9 110    4 630-5 020    2.58-2.77x   1.64-1.66x
    batch + processor, chosen    11 420-13 290  5 790-5 820    3.21-3.23x   1.93-2.06x
    batch(exporter), chosen      5 410-5 430    3 350-3 380    1.85-1.88x   1.11-1.20x

So: a span no rule chooses costs the ending thread about what the SDK's own batch processor
costs (1.02-1.14x of the SDK plus a batch processor); a page view about 1.65x of that, some
3 µs more than the SDK alone. Wall time for chosen spans is 2.7-2.8x the batch processor's in
this tight loop because the consumer thread builds and encodes each event (~15 µs) while holding
the GIL; spread among an app's real work that is CPU the process spends, not time a request
waits. The zero-code form chooses on the batch processor's thread: the ending thread pays
1.1-1.2x.

(Run it again for today's figures; they move with the machine's load, the ratios much less.)
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from importlib import metadata
from time import perf_counter_ns, thread_time_ns
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from mp_logbridge.integrations.opentelemetry import MixpanelSpanExporter, MixpanelSpanProcessor

TOKEN = "bench-otel"
HTTP_ATTRIBUTES = {
    "http.request.method": "GET",
    "http.route": "/products/<id>",
    "url.path": "/products/17",
    "url.scheme": "https",
    "server.address": "shop.example",
    "server.port": 443,
    "http.response.status_code": 200,
    "user_agent.original": "Mozilla/5.0 (X11; Linux x86_64)",
    "network.protocol.version": "1.1",
    "enduser.id": "u-42",
}

_SERVER = textwrap.dedent(
    """
    import sys
    from mp_logbridge.testing import MixpanelServer
    with MixpanelServer() as server:
        print(server.url, flush=True)
        sys.stdin.read()
    """
)


class Discard(SpanExporter):
    """An exporter that drops what it gets (the batch processor's own cost, no I/O)."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class Subject:
    def __init__(self, name: str, provider: TracerProvider, kind: SpanKind, attrs: dict[str, Any]):
        self.name = name
        self.provider = provider
        self.tracer = provider.get_tracer("bench")
        self.kind = kind
        self.attrs = attrs
        self.rounds: list[float] = []
        self.cpu: list[float] = []

    def run(self, spans: int) -> None:
        started = [
            self.tracer.start_span("GET /products/<id>", kind=self.kind, attributes=self.attrs)
            for _ in range(spans)
        ]
        gc.disable()
        begin, begin_cpu = perf_counter_ns(), thread_time_ns()
        for span in started:
            span.end()
        elapsed, cpu = perf_counter_ns() - begin, thread_time_ns() - begin_cpu
        gc.enable()
        self.rounds.append(elapsed / spans)
        self.cpu.append(cpu / spans)
        self.provider.force_flush(60_000)


def subjects(url: str, spans: int) -> list[Subject]:
    options: dict[str, Any] = {"api_host": url, "max_queue_size": spans * 4, "flush_interval": 0.2}

    def batch() -> BatchSpanProcessor:
        return BatchSpanProcessor(Discard(), max_queue_size=spans * 2)

    def provider(*processors: Callable[[TracerProvider], Any]) -> TracerProvider:
        made = TracerProvider(shutdown_on_exit=False)
        for add in processors:
            made.add_span_processor(add(made))
        return made

    server, internal = SpanKind.SERVER, SpanKind.INTERNAL
    plain = {k: v for k, v in HTTP_ATTRIBUTES.items() if not k.startswith("http.request")}
    return [
        Subject("sdk alone", provider(), server, HTTP_ATTRIBUTES),
        Subject("sdk + batch", provider(lambda p: batch()), server, HTTP_ATTRIBUTES),
        Subject(
            "+ processor, not chosen",
            provider(lambda p: MixpanelSpanProcessor(TOKEN, **options)),
            internal,
            plain,
        ),
        Subject(
            "+ processor, chosen",
            provider(lambda p: MixpanelSpanProcessor(TOKEN, **options)),
            server,
            HTTP_ATTRIBUTES,
        ),
        Subject(
            "batch + processor, chosen",
            provider(lambda p: batch(), lambda p: MixpanelSpanProcessor(TOKEN, **options)),
            server,
            HTTP_ATTRIBUTES,
        ),
        Subject(
            "batch(exporter), chosen",
            provider(
                lambda p: BatchSpanProcessor(
                    MixpanelSpanExporter(TOKEN, tracer_provider=p, **options),
                    max_queue_size=spans * 2,
                )
            ),
            server,
            HTTP_ATTRIBUTES,
        ),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--spans", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1000 spans")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    rounds, spans = (3, 1000) if args.quick else (args.rounds, args.spans)

    receiver = subprocess.Popen(
        [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert receiver.stdout is not None
        url = receiver.stdout.readline().strip()
        made = subjects(url, spans)
        for subject in made:  # warm up: first spans, first consumer thread, first connection
            subject.run(min(spans, 500))
            subject.rounds.clear()
            subject.cpu.clear()
        for index in range(rounds):
            shift = index % len(made)
            for subject in made[shift:] + made[:shift]:
                subject.run(spans)
        for subject in made:
            subject.provider.shutdown()
    finally:
        if receiver.stdin is not None:
            receiver.stdin.close()
        receiver.wait(timeout=30)

    base, peer = min(made[0].rounds), min(made[1].rounds)
    base_cpu, peer_cpu = min(made[0].cpu), min(made[1].cpu)
    print(f"span end() cost: {rounds} rounds x {spans} spans, Python {platform.python_version()}")
    print(
        f"{'subject':<28}{'wall ns':>9}{'median':>9}{'vs sdk':>8}{'vs batch':>10}"
        f"{'thread CPU ns':>15}{'vs sdk':>8}{'vs batch':>10}"
    )
    figures = []
    for subject in made:
        best, cpu = min(subject.rounds), min(subject.cpu)
        median = statistics.median(subject.rounds)
        print(
            f"{subject.name:<28}{best:>9.0f}{median:>9.0f}{best / base:>7.2f}x{best / peer:>9.2f}x"
            f"{cpu:>15.0f}{cpu / base_cpu:>7.2f}x{cpu / peer_cpu:>9.2f}x"
        )
        figures.append(
            {
                "subject": subject.name,
                "best_wall_ns": best,
                "median_wall_ns": median,
                "best_thread_cpu_ns": cpu,
                "wall_ratio_to_sdk": best / base,
                "wall_ratio_to_batch": best / peer,
                "cpu_ratio_to_sdk": cpu / base_cpu,
                "cpu_ratio_to_batch": cpu / peer_cpu,
            }
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(
                {
                    "python": platform.python_version(),
                    "opentelemetry-sdk": metadata.version("opentelemetry-sdk"),
                    "rounds": rounds,
                    "spans": spans,
                    "figures": figures,
                },
                out,
                indent=2,
            )


if __name__ == "__main__":
    main()

"""The clients the benchmarks compare, each behind the same small interface.

Every subject sends the same record — user ``u1`` did ``Signed Up`` with ``plan="pro"`` — through
its own public API, against the URL it is given (the receiver, or a closed port for "server
down"). The logging subjects log it as ``log.info("user signed up",
extra=tag.track("Signed Up", distinct_id="u1", plan="pro"))`` (the *tagged* call) and also log
``log.info("user signed up")`` (the *untagged* call); the other clients make their own "track"
call with the same event, user and property. Calls take no argument, so the timed loop is the
same for all.

Each mp_logbridge subject is given a consumer of its own (``consumer=``, public API), so front
doors measured one after another never share a queue; the library's background consumer is
looked up by name (``BackgroundConsumer``, else ``AsyncConsumer``). Each subject sends with its
own token (or is a peer with its own endpoint), and the receiver counts records per source, so
what arrived is known per subject even while several clients are alive.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import time
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

import mp_logbridge
from mp_logbridge import MixpanelHandler, MixpanelProcessor, Tracker, instrument, tag

#: The library's background consumer (it may be renamed; either name works).
BackgroundConsumer: Any = (
    getattr(mp_logbridge, "BackgroundConsumer", None) or mp_logbridge.AsyncConsumer
)

MESSAGE = "user signed up"
EVENT = "Signed Up"
USER = "u1"
PLAN = "pro"


def silence_client_logs() -> None:
    """Clients log every failed request (PostHog resets its level when a client is made); the
    benchmarks report failures as counts instead."""
    for name in ("mp_logbridge", "posthog", "segment", "urllib3", "backoff", "opentelemetry"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


silence_client_logs()


def make_logger(name: str, handler: logging.Handler) -> logging.Logger:
    """A logger at INFO with exactly one handler and no propagation."""
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def settle(consumer: Any, timeout: float = 60.0, quiet: float = 0.1) -> dict[str, Any]:
    """Wait until a background consumer's public counters stop moving; return its stats.

    With the server down nothing is delivered, so once the sender has encoded what it accepted
    (``queue_bytes`` stops growing) nothing changes any more.
    """
    deadline = time.monotonic() + timeout
    stats: dict[str, Any] = consumer.stats()
    mark = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        now = time.monotonic()
        current = (stats.get("queue_bytes"), stats.get("queue_depth"), stats.get("dropped_total"))
        if current != mark:
            mark, since = current, now
        elif now - since >= quiet:
            break
        time.sleep(0.01)
        stats = consumer.stats()
    return stats


class Subject:
    """One client under test.

    ``tagged`` makes the call that produces the record; ``untagged`` (logging subjects only) a
    log call without a tag. ``calls`` is how many calls one timed round makes per server state
    (fewer for clients that wait on the network in the caller's thread); ``throughput`` how
    many records one delivery run sends per latency.
    """

    key = ""
    label = ""
    group = "peer"  # "reference", "peer" or "mp_logbridge"
    #: the receiver's name for this subject's records (``None``: nothing is delivered)
    source: str | None = None
    calls: dict[str, int] = {"0 ms": 5000, "50 ms": 5000, "down": 5000}
    throughput: dict[str, int] = {"0 ms": 10_000, "50 ms": 10_000}
    #: whether untagged calls deliver a record too (a plain log exporter sends every record)
    untagged_delivers = False
    #: whether the records carry an id the receiver counts (so duplicates show)
    has_ids = True
    #: calls made before measuring (threads started, connections open)
    warm_up_calls = 100

    def __init__(self, url: str, down: bool) -> None:
        self.url = url
        self.down = down
        self.tagged: Callable[[], object] = lambda: None
        self.untagged: Callable[[], object] | None = None

    def between(self) -> bool:
        """After a timed loop (not timed): deliver what the client holds, or, with the server
        down, let its background work settle. ``True`` when the client says it delivered all."""
        return True

    def close(self) -> None:
        """Release the client (bounded when the server is down)."""

    def dropped(self) -> int | None:
        """Records dropped or raised on so far (``None`` when the client does not tell)."""
        return None


# --------------------------------------------------------------------------- stdlib logging


class NullHandlerSubject(Subject):
    key = "null"
    label = "logging.NullHandler (reference)"
    group = "reference"

    def __init__(self, url: str, down: bool) -> None:
        super().__init__(url, down)
        logger = make_logger(f"bench.{self.key}", logging.NullHandler())
        self.tagged, self.untagged = log_calls(logger)


class QueueHandlerSubject(Subject):
    """``QueueHandler`` on a ``SimpleQueue``, drained between rounds (no listener thread)."""

    key = "queue"
    label = "logging QueueHandler(SimpleQueue)"
    group = "reference"

    def __init__(self, url: str, down: bool) -> None:
        super().__init__(url, down)
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        logger = make_logger(f"bench.{self.key}", logging.handlers.QueueHandler(self.queue))
        self.tagged, self.untagged = log_calls(logger)

    def between(self) -> bool:
        while not self.queue.empty():
            self.queue.get_nowait()
        return True


def log_calls(logger: logging.Logger) -> tuple[Callable[[], None], Callable[[], None]]:
    """The tagged and the untagged call on ``logger``."""
    info, track = logger.info, tag.track

    def tagged() -> None:
        info(MESSAGE, extra=track(EVENT, distinct_id=USER, plan=PLAN))

    def untagged() -> None:
        info(MESSAGE)

    return tagged, untagged


# --------------------------------------------------------------------------- OpenTelemetry


class _PostingExporter:
    """Posts each batch to the receiver's ``/v1/logs`` as one JSON array of the SDK's own
    ``ReadableLogRecord.to_json()`` (written for the benchmarks: an OTLP exporter is not part of
    the ``bench`` extra), through one ``requests.Session``."""

    def __init__(self, url: str) -> None:
        import requests

        self.url = f"{url}/v1/logs"
        self.session = requests.Session()

    def export(self, batch: Sequence[Any]) -> Any:
        from opentelemetry.sdk._logs.export import LogRecordExportResult

        body = "[" + ",".join(record.to_json(indent=None) for record in batch) + "]"
        try:
            response = self.session.post(
                self.url,
                data=body.encode("utf-8"),
                headers={"Content-Type": "application/json"},
                timeout=10,
            )
        except OSError:
            return LogRecordExportResult.FAILURE
        ok = response.status_code == 200
        return LogRecordExportResult.SUCCESS if ok else LogRecordExportResult.FAILURE

    def shutdown(self) -> None:
        self.session.close()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


class OTelSubject(Subject):
    """OpenTelemetry SDK ``LoggingHandler`` + ``BatchLogRecordProcessor`` posting to the
    receiver (``max_queue_size=16384`` so a round of calls fits; other settings default)."""

    key = "otel"
    label = "OpenTelemetry LoggingHandler+BatchLogRecordProcessor"
    source = "otel"
    untagged_delivers = True
    has_ids = False
    calls = {"0 ms": 5000, "50 ms": 2500, "down": 5000}
    throughput = {"0 ms": 10_000, "50 ms": 5000}

    def __init__(self, url: str, down: bool) -> None:
        super().__init__(url, down)
        from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

        self.provider = LoggerProvider()
        exporter: Any = _PostingExporter(url)
        self.provider.add_log_record_processor(
            BatchLogRecordProcessor(exporter, max_queue_size=16_384)
        )
        handler = LoggingHandler(level=logging.INFO, logger_provider=self.provider)
        self.tagged, self.untagged = log_calls(make_logger(f"bench.{self.key}", handler))
        silence_client_logs()

    def between(self) -> bool:
        return bool(self.provider.force_flush(60_000))

    def close(self) -> None:
        self.provider.shutdown()


# --------------------------------------------------------------------------- other analytics clients


class PostHogSubject(Subject):
    """PostHog's client (background thread, batches of 100) posting to ``/batch``. With the
    server down it is built with ``max_retries=0`` so its thread does not keep retrying after
    the measurement; the caller's path is the same either way."""

    key = "posthog"
    label = "PostHog Posthog.capture"
    source = "posthog"
    calls = {"0 ms": 2500, "50 ms": 1000, "down": 2500}
    throughput = {"0 ms": 5000, "50 ms": 3000}

    def __init__(self, url: str, down: bool) -> None:
        super().__init__(url, down)
        from posthog import Posthog

        self.client = Posthog(
            "phc_bench",
            host=url,
            max_retries=0 if down else 3,
            enable_exception_autocapture=False,
        )
        silence_client_logs()
        capture = self.client.capture
        properties = {"plan": PLAN}

        def tagged() -> None:
            capture(EVENT, distinct_id=USER, properties=properties)

        self.tagged = tagged

    def between(self) -> bool:
        self.client.flush()
        return True

    def close(self) -> None:
        self.client.shutdown()


class SegmentSubject(Subject):
    """Segment's client (background thread, batches of 100) posting to ``/v1/batch``; with the
    server down, ``max_retries=0`` (its ``flush`` waits for the queue to drain)."""

    key = "segment"
    label = "Segment Client.track"
    source = "segment"
    calls = {"0 ms": 2500, "50 ms": 1000, "down": 2500}
    throughput = {"0 ms": 5000, "50 ms": 3000}

    def __init__(self, url: str, down: bool) -> None:
        super().__init__(url, down)
        from segment.analytics import Client

        self.client = Client("bench-write-key", host=url, max_retries=0 if down else 10)
        silence_client_logs()
        track = self.client.track
        properties = {"plan": PLAN}

        def tagged() -> None:
            track(user_id=USER, event=EVENT, properties=properties)

        self.tagged = tagged

    def between(self) -> bool:
        self.client.flush()
        return True

    def close(self) -> None:
        self.client.shutdown()


class _Official(Subject):
    """The official ``mixpanel`` package (5.4.1) with one of its own consumers.

    Its consumers are given explicit per-endpoint URLs (``api_host`` would build ``https://``).
    Its retry adapter is mounted on ``https://`` only, so on this plain-http loopback a request
    is not retried: with the server down each call fails after about a millisecond (its best
    case; over https it would sleep through urllib3's retries).
    """

    def __init__(self, url: str, down: bool) -> None:
        super().__init__(url, down)
        from mixpanel import Mixpanel, MixpanelException

        self.errors = 0
        self.exception = MixpanelException
        self.consumer = self._consumer(
            events_url=f"{url}/track",
            people_url=f"{url}/engage",
            groups_url=f"{url}/groups",
            import_url=f"{url}/import",
        )
        track = Mixpanel(self.source, consumer=self.consumer).track
        properties = {"plan": PLAN}

        def tagged() -> None:
            try:
                track(USER, EVENT, properties)
            except MixpanelException:
                self.errors += 1

        self.tagged = tagged

    def _consumer(self, **urls: str) -> Any:
        raise NotImplementedError

    def dropped(self) -> int | None:
        return self.errors


class OfficialBufferedSubject(_Official):
    key = "official_buffered"
    label = "mixpanel BufferedConsumer (official)"
    source = "bench-official-buffered"
    calls = {"0 ms": 1000, "50 ms": 250, "down": 100}
    throughput = {"0 ms": 10_000, "50 ms": 1000}

    def _consumer(self, **urls: str) -> Any:
        from mixpanel import BufferedConsumer

        return BufferedConsumer(**urls)

    def between(self) -> bool:
        try:
            self.consumer.flush()
        except self.exception:
            return False
        return True


class OfficialConsumerSubject(_Official):
    key = "official_consumer"
    label = "mixpanel Consumer (official, a request per call)"
    source = "bench-official-consumer"
    warm_up_calls = 3
    calls = {"0 ms": 100, "50 ms": 10, "down": 100}
    throughput = {"0 ms": 500, "50 ms": 40}

    def _consumer(self, **urls: str) -> Any:
        from mixpanel import Consumer

        return Consumer(**urls)


# --------------------------------------------------------------------------- mp_logbridge


class _Ours(Subject):
    """An mp_logbridge front door with a background consumer of its own."""

    group = "mp_logbridge"

    def __init__(self, url: str, down: bool, **options: Any) -> None:
        super().__init__(url, down)
        self.consumer = BackgroundConsumer(api_host=url, **options)
        self.handler: MixpanelHandler | None = None
        self.processor: MixpanelProcessor | None = None

    def _handler_logger(self) -> logging.Logger:
        self.handler = MixpanelHandler(self.source, consumer=self.consumer)
        return make_logger(f"bench.{self.key}", self.handler)

    def between(self) -> bool:
        if self.down:
            settle(self.consumer)
            return False
        return bool(self.consumer.flush(120.0))

    def close(self) -> None:
        self.consumer.close(0.2 if self.down else 30.0)
        if self.handler is not None:
            self.handler.close()
        if self.processor is not None:
            self.processor.close()

    def dropped(self) -> int | None:
        return int(self.consumer.stats()["dropped_total"])

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.consumer.stats()
        return stats


class OursHandler(_Ours):
    key = "ours_handler"
    label = "mp_logbridge MixpanelHandler"
    source = "bench-handler"

    def __init__(self, url: str, down: bool, **options: Any) -> None:
        super().__init__(url, down, **options)
        self.tagged, self.untagged = log_calls(self._handler_logger())


class OursInstrument(_Ours):
    """``@instrument("Signed Up", distinct_id="user", capture_args=["plan"])`` on a function
    whose logger has a ``MixpanelHandler``."""

    key = "ours_instrument"
    label = "mp_logbridge @instrument"
    source = "bench-instrument"

    def __init__(self, url: str, down: bool, **options: Any) -> None:
        super().__init__(url, down, **options)
        logger = self._handler_logger()

        @instrument(EVENT, logger=logger, distinct_id="user", capture_args=["plan"])
        def signed_up(user: str, plan: str) -> None:
            return None

        def tagged() -> None:
            signed_up(USER, PLAN)

        self.tagged = tagged


def _structlog_logger(processors: list[Any]) -> Any:
    """A structlog logger with ``processors`` and a final step returning the event text to a
    ``ReturnLogger`` (no formatting, no I/O: structlog's own floor)."""
    import structlog

    def to_text(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> str:
        return str(event_dict.get("event", ""))

    return structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[*processors, to_text],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    ).bind()


def structlog_calls(logger: Any) -> tuple[Callable[[], None], Callable[[], None]]:
    """The tagged and the untagged call on a structlog ``logger``."""
    info, track = logger.info, tag.track

    def tagged() -> None:
        info(MESSAGE, **track(EVENT, distinct_id=USER, plan=PLAN))

    def untagged() -> None:
        info(MESSAGE)

    return tagged, untagged


class StructlogSubject(Subject):
    key = "structlog"
    label = "structlog, no processor (reference)"
    group = "reference"

    def __init__(self, url: str, down: bool) -> None:
        super().__init__(url, down)
        self.tagged, self.untagged = structlog_calls(_structlog_logger([]))


class OursStructlog(_Ours):
    key = "ours_structlog"
    label = "mp_logbridge MixpanelProcessor (structlog)"
    source = "bench-structlog"

    def __init__(self, url: str, down: bool, **options: Any) -> None:
        super().__init__(url, down, **options)
        self.processor = MixpanelProcessor(self.source, consumer=self.consumer)
        self.tagged, self.untagged = structlog_calls(_structlog_logger([self.processor]))


class OursTracker(_Ours):
    key = "ours_tracker"
    label = "mp_logbridge Tracker"
    source = "bench-tracker"

    def __init__(self, url: str, down: bool, **options: Any) -> None:
        super().__init__(url, down, **options)
        track = Tracker(self.source, self.consumer).track
        properties = {"plan": PLAN}

        def tagged() -> None:
            track(USER, EVENT, properties)

        self.tagged = tagged


class OursUnderOfficial(_Ours):
    """The official package's ``Mixpanel`` API with this library's background consumer."""

    key = "ours_official_api"
    label = "mixpanel.Mixpanel + mp_logbridge consumer"
    source = "bench-official-api"

    def __init__(self, url: str, down: bool, **options: Any) -> None:
        super().__init__(url, down, **options)
        from mixpanel import Mixpanel

        track = Mixpanel(self.source, consumer=self.consumer).track
        properties = {"plan": PLAN}

        def tagged() -> None:
            track(USER, EVENT, properties)

        self.tagged = tagged


SUBJECTS: dict[str, type[Subject]] = {
    cls.key: cls
    for cls in (
        NullHandlerSubject,
        QueueHandlerSubject,
        StructlogSubject,
        OTelSubject,
        PostHogSubject,
        SegmentSubject,
        OfficialBufferedSubject,
        OfficialConsumerSubject,
        OursHandler,
        OursStructlog,
        OursInstrument,
        OursTracker,
        OursUnderOfficial,
    )
}

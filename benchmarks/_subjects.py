"""The clients the consumer benchmark compares, each behind the same small interface.

Every subject sends the same message — user ``user-1`` did ``Signed Up`` with three properties —
through its own public API, against the URL it is given (the benchmark server, or a closed port
for "server down"). ``call(i)`` is what is timed on the caller's thread; ``finish`` delivers what
the client still holds (not timed per call); ``refused`` says how many messages the client
dropped or raised on.
"""

from __future__ import annotations

import collections
import logging
import queue
from collections.abc import Callable
from typing import Any

from _common import TOKEN

from mp_logbridge import AsyncConsumer, Tracker


def silence_client_logs() -> None:
    """Peers log every failed request (PostHog resets its level when a client is made); the
    benchmark reports failures as counts instead."""
    for name in ("mp_logbridge", "posthog", "segment", "urllib3", "backoff"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


silence_client_logs()


class Subject:
    """One client under test."""

    label = ""
    #: whether messages reach the server (baselines only queue them)
    delivers = True

    def __init__(self, url: str, down: bool) -> None:
        self.url = url
        self.down = down
        self.call: Callable[[int], object] = lambda i: None

    def finish(self, timeout: float) -> bool:
        """Deliver what the client holds; ``True`` when it says everything was delivered."""
        return True

    def close(self) -> None:
        """Release the client (bounded when the server is down)."""

    def refused(self) -> int | None:
        """Messages dropped or raised on so far (``None`` when the client does not tell)."""
        return None


class QueuePut(Subject):
    label = "baseline: queue.Queue().put"
    delivers = False

    def __init__(self, url: str, down: bool) -> None:
        super().__init__(url, down)
        self.queue: queue.Queue[Any] = queue.Queue()
        put = self.queue.put

        def call(i: int) -> None:
            put(("user-1", "Signed Up", {"plan": "pro", "seats": 3, "i": i}))

        self.call = call


class DequeAppend(Subject):
    label = "baseline: deque.append"
    delivers = False

    def __init__(self, url: str, down: bool) -> None:
        super().__init__(url, down)
        self.deque: collections.deque[Any] = collections.deque()
        append = self.deque.append

        def call(i: int) -> None:
            append(("user-1", "Signed Up", {"plan": "pro", "seats": 3, "i": i}))

        self.call = call


class OursTracker(Subject):
    """``mp_logbridge.Tracker`` with an ``AsyncConsumer`` (options passed to the consumer)."""

    label = "mp_logbridge Tracker+AsyncConsumer"

    def __init__(self, url: str, down: bool, **options: Any) -> None:
        super().__init__(url, down)
        self.consumer = AsyncConsumer(api_host=url, **options)
        self.tracker = Tracker(TOKEN, self.consumer)
        track = self.tracker.track

        def call(i: int) -> None:
            track("user-1", "Signed Up", {"plan": "pro", "seats": 3, "i": i})

        self.call = call

    def finish(self, timeout: float) -> bool:
        return self.consumer.flush(timeout)

    def close(self) -> None:
        self.consumer.close(0.2 if self.down else 30.0)

    def refused(self) -> int | None:
        return int(self.consumer.stats()["dropped_total"])


class OursUnderOfficial(OursTracker):
    """The official package's ``Mixpanel`` API with ``mp_logbridge.AsyncConsumer`` as consumer."""

    label = "mixpanel.Mixpanel+mp_logbridge AsyncConsumer"

    def __init__(self, url: str, down: bool, **options: Any) -> None:
        super().__init__(url, down, **options)
        from mixpanel import Mixpanel

        track = Mixpanel(TOKEN, consumer=self.consumer).track

        def call(i: int) -> None:
            track("user-1", "Signed Up", {"plan": "pro", "seats": 3, "i": i})

        self.call = call


class _Official(Subject):
    """The official ``mixpanel`` package (5.4.1) with one of its own consumers."""

    def __init__(self, url: str, down: bool) -> None:
        super().__init__(url, down)
        from mixpanel import Mixpanel, MixpanelException

        self.errors = 0
        self.consumer = self._consumer(
            events_url=f"{url}/track",
            people_url=f"{url}/engage",
            groups_url=f"{url}/groups",
            import_url=f"{url}/import",
        )
        track = Mixpanel(TOKEN, consumer=self.consumer).track

        def call(i: int) -> None:
            try:
                track("user-1", "Signed Up", {"plan": "pro", "seats": 3, "i": i})
            except MixpanelException:
                self.errors += 1

        self.call = call

    def _consumer(self, **urls: str) -> Any:
        raise NotImplementedError

    def refused(self) -> int | None:
        return self.errors


class OfficialBuffered(_Official):
    label = "mixpanel BufferedConsumer"

    def _consumer(self, **urls: str) -> Any:
        from mixpanel import BufferedConsumer

        return BufferedConsumer(**urls)

    def finish(self, timeout: float) -> bool:
        from mixpanel import MixpanelException

        try:
            self.consumer.flush()
        except MixpanelException:
            return False
        return True


class OfficialConsumer(_Official):
    label = "mixpanel Consumer (one request per message)"

    def _consumer(self, **urls: str) -> Any:
        from mixpanel import Consumer

        return Consumer(**urls)


class PostHogClient(Subject):
    """PostHog's client (background thread, batches of 100) posting to the server's ``/batch``.

    With the server down it is built with ``max_retries=0`` so its thread does not keep
    retrying after the measurement; the caller's path is the same either way.
    """

    label = "posthog Posthog.capture"

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

        def call(i: int) -> None:
            capture(
                "Signed Up", distinct_id="user-1", properties={"plan": "pro", "seats": 3, "i": i}
            )

        self.call = call

    def finish(self, timeout: float) -> bool:
        self.client.flush(timeout_seconds=timeout)
        return True

    def close(self) -> None:
        self.client.shutdown()


class SegmentClient(Subject):
    """Segment's client (background thread, batches of 100) posting to the server's ``/v1/batch``.

    With the server down it is built with ``max_retries=0`` (its ``flush`` waits for the queue to
    drain, through up to 10 retries otherwise).
    """

    label = "segment Client.track"

    def __init__(self, url: str, down: bool) -> None:
        super().__init__(url, down)
        from segment.analytics import Client

        self.client = Client("bench-write-key", host=url, max_retries=0 if down else 10)
        silence_client_logs()
        track = self.client.track

        def call(i: int) -> None:
            track(
                user_id="user-1", event="Signed Up", properties={"plan": "pro", "seats": 3, "i": i}
            )

        self.call = call

    def finish(self, timeout: float) -> bool:
        self.client.flush()
        return True

    def close(self) -> None:
        self.client.shutdown()


SUBJECTS: dict[str, type[Subject]] = {
    "queue_put": QueuePut,
    "deque_append": DequeAppend,
    "ours": OursTracker,
    "ours_official_api": OursUnderOfficial,
    "official_buffered": OfficialBuffered,
    "official_consumer": OfficialConsumer,
    "posthog": PostHogClient,
    "segment": SegmentClient,
}

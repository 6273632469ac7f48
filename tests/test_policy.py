"""before_send, sampling, redaction, disabled, debug and asyncio flushing, on every front door.

One implementation (``mp_logbridge._policy.Policy``) behind the handler, the structlog processor,
the OpenTelemetry processors, dictConfig and the Tracker; each is driven here against the real
receiver (or ``capture_messages``) and its counters are read back.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import logging.config
import threading
import time
from typing import Any

import pytest
from support import RecordCollector, attached

from mp_logbridge import MixpanelHandler, MixpanelProcessor, Tracker, flush_all, tag
from mp_logbridge._policy import user_fraction
from mp_logbridge.consumers import BackgroundConsumer, DisabledConsumer
from mp_logbridge.errors import ConfigurationError
from mp_logbridge.testing import MixpanelServer, capture_messages

TOKEN = "policy-test-token"


def scrub_email(record: dict[str, Any]) -> dict[str, Any] | None:
    """A hook importable by dotted path (dictConfig, settings files)."""
    props = record.get("properties")
    if props is not None:
        props.pop("email", None)
        props["scrubbed"] = True
    return record


# --------------------------------------------------------------------------- before_send


def test_before_send_changes_and_drops_through_the_handler(
    make_handler: Any, make_logger: Any, mixpanel_server: MixpanelServer
) -> None:
    seen: list[dict[str, Any]] = []

    def hook(record: dict[str, Any]) -> dict[str, Any] | None:
        seen.append(record)
        if record.get("event") == "Secret":
            return None
        if "properties" in record:
            record["properties"]["plan"] = "redacted-by-hook"
        return record

    handler = make_handler(before_send=hook)
    log = make_logger(handler)
    log.info("a", extra=tag.track("Signed Up", distinct_id="u1", plan="pro"))
    log.info("b", extra=tag.track("Secret", distinct_id="u1"))
    log.info("c", extra=tag.people.set({"plan": "pro"}, distinct_id="u1"))
    assert handler.flush(5)
    [event] = mixpanel_server.events
    assert event["event"] == "Signed Up"
    assert event["properties"]["plan"] == "redacted-by-hook"
    assert len(mixpanel_server.profile_updates) == 1
    assert [r.get("event", "update") for r in seen] == ["Signed Up", "Secret", "update"]
    stats = handler.stats()
    assert stats["filtered"] == 1
    assert stats["dropped_total"] == 0
    assert stats["sent"] == 2


def test_before_send_cannot_change_the_librarys_own_fields(
    make_handler: Any, make_logger: Any, mixpanel_server: MixpanelServer
) -> None:
    ids: list[str] = []

    def hook(record: dict[str, Any]) -> dict[str, Any]:
        props = record["properties"]
        ids.append(props["$insert_id"])
        props.update(token="someone-elses", time=0, **{"$insert_id": "forged"})
        return record

    log = make_logger(make_handler(before_send=hook))
    log.info("x", extra=tag.track("Clicked", distinct_id="u1"))
    [event] = mixpanel_server.wait_for(1)
    props = event["properties"]
    assert props["token"] == TOKEN
    assert props["$insert_id"] == ids[0] != "forged"
    assert props["time"] > 1_600_000_000_000


def test_a_hook_that_raises_costs_its_message_only(
    make_handler: Any, make_logger: Any, mixpanel_server: MixpanelServer, library_warnings: Any
) -> None:
    def hook(record: dict[str, Any]) -> Any:
        name = record.get("event")
        if name == "Boom":
            raise RuntimeError("hook bug")
        if name == "Weird":
            return ["not", "a", "record"]
        return record

    handler = make_handler(before_send=hook)
    log = make_logger(handler)
    log.info("1", extra=tag.track("Boom", distinct_id="u1"))  # no exception reaches the app
    log.info("2", extra=tag.track("Weird", distinct_id="u1"))
    log.info("3", extra=tag.track("Fine", distinct_id="u1"))
    assert not handler.flush(5)  # something was lost since the last flush
    assert [e["event"] for e in mixpanel_server.events] == ["Fine"]
    stats = handler.stats()
    assert stats["dropped"]["hook_error"] == 2
    assert stats["dropped_total"] == 2
    library_warnings.wait_for("hook_error")


def test_a_hook_that_puts_unsendable_values_in_is_counted_invalid(
    make_handler: Any, make_logger: Any, mixpanel_server: MixpanelServer
) -> None:
    def hook(record: dict[str, Any]) -> dict[str, Any]:
        record["properties"]["bad"] = float("nan")
        return record

    handler = make_handler(before_send=hook)
    make_logger(handler).info("x", extra=tag.track("E", distinct_id="u1"))
    handler.flush(5)
    assert mixpanel_server.events == []
    assert handler.stats()["dropped"]["invalid"] == 1


def test_the_hook_never_changes_the_applications_values(
    mixpanel_server: MixpanelServer,
) -> None:
    def hook(record: dict[str, Any]) -> dict[str, Any]:
        record["properties"]["cart"]["items"].append("injected")
        record["properties"]["cart"]["owner"] = "hook"
        return record

    cart = {"items": ["book"]}
    with Tracker(TOKEN, api_host=mixpanel_server.url, before_send=hook) as tracker:
        assert tracker.track("u1", "Checkout", {"cart": cart})
        tracker.flush(5)
    assert cart == {"items": ["book"]}
    [event] = mixpanel_server.events
    assert event["properties"]["cart"] == {"items": ["book", "injected"], "owner": "hook"}


def test_tracker_before_send_and_errors(mixpanel_server: MixpanelServer) -> None:
    calls = []

    def hook(record: dict[str, Any]) -> dict[str, Any] | None:
        calls.append(record)
        if "$set" in record:
            record["$set"].pop("$email", None)
        if record.get("event") == "Crash":
            raise ValueError("nope")
        return record

    tracker = Tracker(TOKEN, api_host=mixpanel_server.url, before_send=hook, flush_interval=0.05)
    assert tracker.track("u1", "Crash") is False  # counted, never raised
    tracker.people.set("u1", {"$email": "a@b.c", "$name": "A"})
    tracker.flush(5)
    [update] = mixpanel_server.profile_updates
    assert update["$set"] == {"$name": "A"}
    stats = tracker.stats()
    assert stats["dropped"]["hook_error"] == 1
    assert len(calls) == 2


def test_the_hook_is_resolved_from_a_dotted_path_in_dictconfig(
    mixpanel_server: MixpanelServer,
) -> None:
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "handlers": {
                "mixpanel": {
                    "class": "mp_logbridge.MixpanelHandler",
                    "token": TOKEN,
                    "api_host": mixpanel_server.url,
                    "before_send": "test_policy.scrub_email",
                    "redact": ["phone"],
                    "sample_rate": {"Noise": 0.0},
                }
            },
            "loggers": {"policy.dictconfig": {"handlers": ["mixpanel"], "level": "INFO"}},
        }
    )
    log = logging.getLogger("policy.dictconfig")
    handler = log.handlers[0]
    try:
        log.info("x", extra=tag.track("Signed Up", distinct_id="u1", email="a@b.c", phone="1"))
        log.info("y", extra=tag.track("Noise", distinct_id="u1"))
        assert handler.flush(5)  # type: ignore[attr-defined]
        [event] = mixpanel_server.events
        assert "email" not in event["properties"] and "phone" not in event["properties"]
        assert event["properties"]["scrubbed"] is True
        assert handler.stats()["sampled_out"] == 1  # type: ignore[attr-defined]
    finally:
        log.removeHandler(handler)
        handler.close()


def test_before_send_must_be_callable() -> None:
    with pytest.raises(ConfigurationError, match="before_send"):
        MixpanelHandler(TOKEN, before_send=42)
    with pytest.raises(ConfigurationError, match="cannot import"):
        MixpanelHandler(TOKEN, before_send="no_such_module.hook")


# --------------------------------------------------------------------------- sampling


def test_sampling_is_by_user_and_keeps_every_event_of_a_kept_user(
    make_handler: Any, make_logger: Any, mixpanel_server: MixpanelServer
) -> None:
    handler = make_handler(sample_rate={"Page Viewed": 0.3, "*": 1.0})
    log = make_logger(handler)
    users = [f"user-{n}" for n in range(120)]
    for _round in range(3):
        for user in users:
            log.info("p", extra=tag.track("Page Viewed", distinct_id=user))
    for user in users:
        log.info("s", extra=tag.track("Signed Up", distinct_id=user))
    assert handler.flush(10)
    kept = {user for user in users if user_fraction(user) < 0.3}
    assert 0 < len(kept) < len(users)  # the hash spreads users
    viewed = [
        e["properties"]["distinct_id"]
        for e in mixpanel_server.events
        if e["event"] == "Page Viewed"
    ]
    assert sorted(viewed) == sorted(list(kept) * 3)  # all three views of each kept user
    signed = [e for e in mixpanel_server.events if e["event"] == "Signed Up"]
    assert len(signed) == len(users)  # "*" is 1.0
    stats = handler.stats()
    assert stats["sampled_out"] == 3 * (len(users) - len(kept))
    assert stats["dropped_total"] == 0


def test_sampling_never_touches_updates_or_identity_events(mixpanel_server: MixpanelServer) -> None:
    tracker = Tracker(TOKEN, api_host=mixpanel_server.url, sample_rate=0.0, flush_interval=0.05)
    assert tracker.track("u1", "Anything") is True  # accepted, sampled out
    tracker.people.set("u1", {"a": 1})
    tracker.groups.set("Company", "Acme", {"b": 2})
    tracker.alias("new-id", "u1")
    tracker.flush(5)
    assert [e["event"] for e in mixpanel_server.events] == ["$create_alias"]
    assert len(mixpanel_server.profile_updates) == 1
    assert len(mixpanel_server.group_updates) == 1
    assert tracker.stats()["sampled_out"] == 1


def test_sampling_is_the_same_in_every_process(run_python: Any) -> None:
    source = """
        from mp_logbridge._policy import user_fraction
        print(",".join(f"{user_fraction(f'u{n}'):.12f}" for n in range(20)))
    """
    first, second = run_python(source), run_python(source, env={"PYTHONHASHSEED": "123"})
    assert first.returncode == 0 and first.stdout == second.stdout
    assert first.stdout.strip() == ",".join(f"{user_fraction(f'u{n}'):.12f}" for n in range(20))


@pytest.mark.parametrize("bad", [1.5, -0.1, "half", True, {"A": 2}, {"": 0.5}])
def test_bad_sample_rates_are_refused(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="sample_rate"):
        Tracker(TOKEN, sample_rate=bad, disabled=True)


# --------------------------------------------------------------------------- redaction


def test_redaction_drops_named_properties_at_any_depth(
    make_handler: Any, make_logger: Any, mixpanel_server: MixpanelServer
) -> None:
    supers = {"team": {"$email": "team@x.y", "name": "core"}}
    handler = make_handler(redact=["$email", "ssn"], super_properties=supers)
    log = make_logger(handler)
    nested = {"$email": "a@b.c", "ok": 1, "rows": [{"ssn": "1", "v": 2}, "plain"]}
    log.info("x", extra=tag.track("Form Sent", distinct_id="u1", form=nested, ssn="9"))
    log.info("y", extra=tag.people.set({"$email": "a@b.c", "$name": "A"}, distinct_id="u1"))
    assert handler.flush(5)
    [event] = mixpanel_server.events
    props = event["properties"]
    assert props["form"] == {"ok": 1, "rows": [{"v": 2}, "plain"]}
    assert "ssn" not in props
    assert props["team"] == {"name": "core"}
    [update] = mixpanel_server.profile_updates
    assert update["$set"] == {"$name": "A"}
    assert handler.stats()["redacted"] == 5
    # nothing of the application's (or the handler's super-properties) was changed
    assert nested == {"$email": "a@b.c", "ok": 1, "rows": [{"ssn": "1", "v": 2}, "plain"]}
    assert supers["team"]["$email"] == "team@x.y"
    log.info("z", extra=tag.track("Again", distinct_id="u1"))
    handler.flush(5)
    assert mixpanel_server.events[-1]["properties"]["team"] == {"name": "core"}


def test_redaction_by_keyed_hash(mixpanel_server: MixpanelServer) -> None:
    key = b"app-secret"
    tracker = Tracker(
        TOKEN,
        api_host=mixpanel_server.url,
        redact=["$email", "distinct_id"],
        redact_mode="hash",
        redact_key=key,
    )
    tracker.track("u1", "Signed Up", {"$email": "a@b.c", "n": 1})
    tracker.flush(5)
    [event] = mixpanel_server.events
    expected = hmac.new(key, b"a@b.c", hashlib.sha256).hexdigest()
    assert event["properties"]["$email"] == expected
    assert event["properties"]["distinct_id"] == hmac.new(key, b"u1", hashlib.sha256).hexdigest()
    assert event["properties"]["token"] == TOKEN


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"redact": ["$email"], "redact_mode": "hash"}, "redact_key"),
        ({"redact": ["token"]}, "library's own"),
        ({"redact": ["$insert_id"]}, "library's own"),
        ({"redact": ["distinct_id"]}, "redact_mode='hash'"),
        ({"redact": "$email"}, "list"),
        ({"redact": ["a"], "redact_mode": "scramble"}, "redact_mode"),
        ({"redact_key": "k"}, "need redact"),
    ],
)
def test_redaction_options_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        MixpanelHandler(TOKEN, **options)


# --------------------------------------------------------------------------- other front doors


def test_structlog_processor_and_span_processor_share_the_policy(
    mixpanel_server: MixpanelServer,
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanKind

    from mp_logbridge.integrations.opentelemetry import MixpanelSpanProcessor

    def hook(record: dict[str, Any]) -> dict[str, Any]:
        record["properties"]["hooked"] = True
        return record

    common = {"api_host": mixpanel_server.url, "flush_interval": 0.05, "before_send": hook}
    processor = MixpanelProcessor(TOKEN, redact=["secret"], **common)
    processor(
        None,
        "info",
        {"event": "x", "mixpanel": tag.track("Log", distinct_id="u1", secret=1)["mixpanel"]},
    )
    spans = MixpanelSpanProcessor(TOKEN, default_distinct_id="svc", **common)
    provider = TracerProvider()
    provider.add_span_processor(spans)
    with provider.get_tracer("t").start_as_current_span(
        "GET /x", kind=SpanKind.SERVER, attributes={"http.request.method": "GET"}
    ):
        pass
    assert processor.flush(5) and spans.force_flush(5000)
    events = {e["event"]: e["properties"] for e in mixpanel_server.wait_for(2)}
    assert events["Log"]["hooked"] is True and "secret" not in events["Log"]
    assert events["Page Viewed"]["hooked"] is True
    assert processor.stats()["redacted"] == 1
    processor.close()
    spans.shutdown()
    provider.shutdown()


def test_without_a_policy_the_hot_path_is_the_direct_one() -> None:
    handler = MixpanelHandler(TOKEN, api_host="http://127.0.0.1:9")
    hooked = MixpanelHandler(TOKEN, api_host="http://127.0.0.1:9", sample_rate=0.5)
    try:
        assert handler._bridge.policy is None
        assert handler._bridge.fast is not None and handler._bridge.fast.__name__ == "fast"
        assert hooked._bridge.fast is not None and hooked._bridge.fast.__name__ == "send_fast"
    finally:
        handler.close()
        hooked.close()


# --------------------------------------------------------------------------- disabled


def test_disabled_accepts_everything_and_starts_nothing(run_python: Any) -> None:
    result = run_python(
        """
        import logging, socket, threading
        opened = []
        real_connect = socket.socket.connect
        def connect(self, *args):
            opened.append(args)
            return real_connect(self, *args)
        socket.socket.connect = connect
        from mp_logbridge import MixpanelHandler, MixpanelProcessor, Tracker, tag
        handler = MixpanelHandler()                       # no token: disabled needs none
        log = logging.getLogger("app"); log.addHandler(handler); log.setLevel(logging.INFO)
        log.info("x", extra=tag.track("Signed Up", distinct_id="u1"))
        tracker = Tracker()
        print(tracker.track("u1", "E"), tracker.people.set("u1", {"a": 1}))
        processor = MixpanelProcessor()
        processor(None, "info", {"event": "e", "mixpanel": True})
        try:
            tracker.track("u1", "")
        except Exception as exc:
            print("still checked:", type(exc).__name__)
        print(handler.flush(), handler.stats()["accepted"], tracker.stats()["disabled"])
        print("threads", sorted(t.name for t in threading.enumerate() if t.name.startswith("mp_logbridge")))
        print("sockets", len(opened))
        """,
        env={"MIXPANEL_DISABLED": "1"},
        timeout=30,
    )
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[0] == "True True"
    assert lines[1] == "still checked: InvalidMessageError"
    assert lines[2] == "True 1 True"
    assert lines[3] == "threads []"
    assert lines[4] == "sockets 0"
    assert "no Mixpanel token" not in result.stderr


def test_disabled_explicitly_overrides_the_environment(
    monkeypatch: pytest.MonkeyPatch, mixpanel_server: MixpanelServer
) -> None:
    monkeypatch.setenv("MIXPANEL_DISABLED", "1")
    tracker = Tracker(TOKEN, api_host=mixpanel_server.url, disabled=False, flush_interval=0.05)
    tracker.track("u1", "Real")
    tracker.flush(5)
    assert [e["event"] for e in mixpanel_server.events] == ["Real"]
    assert isinstance(Tracker(TOKEN).consumer, DisabledConsumer)


def test_disabled_still_captures_for_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIXPANEL_DISABLED", "true")
    handler = MixpanelHandler(redact=["email"])
    log = logging.getLogger("policy.capture")
    log.setLevel(logging.INFO)
    try:
        with attached(log, handler), capture_messages() as captured:
            log.info("x", extra=tag.track("Signed Up", distinct_id="u1", email="a@b.c"))
            Tracker().track("u2", "Other")
        assert [e["event"] for e in captured.events()] == ["Signed Up", "Other"]
        assert "email" not in captured.events()[0]["properties"]
    finally:
        handler.close()


def test_disabled_options_are_still_checked() -> None:
    with pytest.raises(ConfigurationError):
        MixpanelHandler(disabled=True, batch_size=-1)
    with pytest.raises(ConfigurationError):
        Tracker(disabled=True, batch_size=0)


# --------------------------------------------------------------------------- debug


def test_debug_logs_one_line_per_request(mixpanel_server: MixpanelServer) -> None:
    own = logging.getLogger("mp_logbridge")
    level = own.level
    try:
        with attached(own, RecordCollector()) as lines:
            consumer = BackgroundConsumer(api_host=mixpanel_server.url, debug=True)
            for n in range(3):
                consumer.send("event", _event(n))
            consumer.flush(5)
            mixpanel_server.fail_next(1, 503)
            consumer.send(
                "profile_update", {"$token": TOKEN, "$distinct_id": "u", "$set": {"a": 1}}
            )
            consumer.flush(10)
            consumer.close()
        requests = [m for m in lines.messages() if "POST" in m]
        assert any("/track" in m and "-> 200 (3 records, 3 delivered" in m for m in requests)
        assert any("/engage" in m and "-> 503 (1 records, 0 delivered" in m for m in requests)
        assert any("/engage" in m and "-> 200 (1 records, 1 delivered" in m for m in requests)
        assert all(m.rstrip().endswith("ms)") for m in requests)
        assert all(r.levelno == logging.INFO for r in lines.records if "POST" in r.getMessage())
    finally:
        own.setLevel(level)


def test_debug_shows_its_lines_without_configuration(run_python: Any) -> None:
    with MixpanelServer() as server:
        result = run_python(
            f"""
            from mp_logbridge import Tracker
            tracker = Tracker("{TOKEN}", api_host="{server.url}", debug=True)
            tracker.track("u1", "E")
            tracker.flush(5)
            """
        )
    assert result.returncode == 0, result
    assert "mp_logbridge INFO mp_logbridge: POST http://127.0.0.1:" in result.stderr
    assert "/track?" not in result.stderr or "secret" not in result.stderr


def _event(n: int) -> dict[str, Any]:
    props = {"token": TOKEN, "distinct_id": f"u{n}", "time": int(time.time() * 1000)}
    return {"event": "E", "properties": {**props, "$insert_id": f"id{n}"}}


# --------------------------------------------------------------------------- asyncio


async def _ticking_while(work: Any) -> tuple[Any, float, int]:
    """Run ``work`` while a ticker task ticks every 10 ms; the longest gap between ticks and
    the number of ticks tell whether the event loop kept running."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    try:
        result = await work
    finally:
        stop.set()
        await task
    return result, max(gaps), len(gaps)


def test_aflush_keeps_the_event_loop_running(mixpanel_server: MixpanelServer) -> None:
    handler = MixpanelHandler(TOKEN, api_host=mixpanel_server.url, flush_interval=60)
    tracker = Tracker(TOKEN, api_host=mixpanel_server.url, flush_interval=60, max_in_flight=1)
    log = logging.getLogger("policy.async")
    log.setLevel(logging.INFO)

    async def main() -> None:
        mixpanel_server.delay_next(2, 1.0)  # each flush waits for a slow answer
        with attached(log, handler):
            log.info("x", extra=tag.track("From Log", distinct_id="u1"))
            ok, gap, ticks = await _ticking_while(handler.aflush(10))
        assert ok and ticks >= 20 and gap < 0.5, (ok, gap, ticks)
        tracker.track("u1", "From Tracker")
        ok, gap, ticks = await _ticking_while(tracker.aflush(10))
        assert ok and ticks >= 20 and gap < 0.5, (ok, gap, ticks)
        await tracker.aclose()
        await handler.aclose()
        consumer = BackgroundConsumer(api_host=mixpanel_server.url)
        consumer.send("event", _event(1))
        await consumer.aclose(5)
        assert consumer.closed

    asyncio.run(main())
    assert {e["event"] for e in mixpanel_server.events} >= {"From Log", "From Tracker", "E"}


def test_aflush_on_the_processor(mixpanel_server: MixpanelServer) -> None:
    processor = MixpanelProcessor(TOKEN, api_host=mixpanel_server.url, flush_interval=60)

    async def main() -> bool:
        processor(
            None, "info", {"event": "e", "mixpanel": tag.track("P", distinct_id="u")["mixpanel"]}
        )
        ok = await processor.aflush(5)
        await processor.aclose()
        return ok

    assert asyncio.run(main())
    assert [e["event"] for e in mixpanel_server.events] == ["P"]


# --------------------------------------------------------------------------- flush_all


def test_flush_all_timeout_bounds_the_whole_call(mixpanel_server: MixpanelServer) -> None:
    consumers = [
        BackgroundConsumer(api_host=mixpanel_server.url, flush_interval=60) for _ in range(3)
    ]
    try:
        mixpanel_server.latency = 2.0
        for consumer in consumers:
            consumer.send("event", _event(1))
        started = time.monotonic()
        assert flush_all(0.5) is False
        took = time.monotonic() - started
        # a hang guard, not a timing measurement: three flushes of 0.5 s each would take 1.5 s
        assert took < 1.4, took
    finally:
        mixpanel_server.latency = 0.0
        for consumer in consumers:
            consumer.close(5)


def test_counters_are_shared_safely_by_threads(mixpanel_server: MixpanelServer) -> None:
    tracker = Tracker(TOKEN, api_host=mixpanel_server.url, sample_rate=0.0)

    def work() -> None:
        for _ in range(500):
            tracker.track("u1", "E")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert tracker.stats()["sampled_out"] == 2000

"""Regions and endpoints, request encoding, authentication, secrets and response handling.

Every request goes over real HTTP to :class:`~mp_logbridge.testing.MixpanelServer`; faults are
scripted on the server (``fail_next``, ``delay_next``, ``drop_next``), never by patching the
transport.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import io
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from support import attached

from mp_logbridge import (
    BufferedConsumer,
    ConfigurationError,
    Consumer,
    DeliveryError,
    ProjectSecret,
    ServiceAccount,
    Tracker,
    __version__,
)
from mp_logbridge import _messages as msg
from mp_logbridge._transport import parse_retry_after
from mp_logbridge._values import encode
from mp_logbridge.consumers import BackgroundConsumer
from mp_logbridge.errors import (
    MixpanelConnectionError,
    MixpanelServerError,
    PartialImportError,
    PayloadTooLargeError,
    RateLimitedError,
    RejectedError,
)
from mp_logbridge.testing import MixpanelServer
from mp_logbridge.transport import REGIONS, resolve_endpoints

TOKEN = "transport-token"
SA_USER = "sa-user.robot"
SA_SECRET = "Sa-S3cr3t-Value-0123456789"
PROJECT_ID = "987654"
API_SECRET = "Api-S3cr3t-Value-9876543210"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def event(distinct_id: str = "u", **properties: Any) -> dict[str, Any]:
    return msg.event(TOKEN, distinct_id, "Transport Test", properties)


def profile(distinct_id: str = "u", **properties: Any) -> dict[str, Any]:
    return msg.profile_update(TOKEN, distinct_id, "$set", properties or {"a": 1})


def group(**properties: Any) -> dict[str, Any]:
    return msg.group_update(TOKEN, "Company", "Acme", "$set", properties or {"a": 1})


@pytest.fixture
def server() -> Iterator[MixpanelServer]:
    """A server per test: faults scripted by one test never reach another."""
    with MixpanelServer(
        service_account=(SA_USER, SA_SECRET, PROJECT_ID), api_secret=API_SECRET
    ) as srv:
        yield srv


@pytest.fixture
def consumer(server: MixpanelServer) -> Iterator[Consumer]:
    with Consumer(
        api_host=server.url, credentials=ServiceAccount(SA_USER, SA_SECRET, PROJECT_ID)
    ) as made:
        yield made


# --------------------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    ("region", "host"),
    [("us", "api.mixpanel.com"), ("eu", "api-eu.mixpanel.com"), ("in", "api-in.mixpanel.com")],
)
def test_regions(region: str, host: str) -> None:
    endpoints = resolve_endpoints(region=region, environ={})
    assert endpoints.event == f"https://{host}/track"
    assert endpoints.profile_update == f"https://{host}/engage"
    assert endpoints.group_update == f"https://{host}/groups"
    assert endpoints.import_ == f"https://{host}/import"
    assert resolve_endpoints(region=f" {region.upper()} ", environ={}) == endpoints
    assert REGIONS[region] == host


def test_default_is_the_us_region() -> None:
    assert resolve_endpoints(environ={}).event == "https://api.mixpanel.com/track"


@pytest.mark.parametrize(
    ("api_host", "track_url"),
    [
        ("http://127.0.0.1:8123", "http://127.0.0.1:8123/track"),
        ("http://127.0.0.1:8123/", "http://127.0.0.1:8123/track"),
        ("api-eu.mixpanel.com", "https://api-eu.mixpanel.com/track"),
        ("127.0.0.1:8123", "https://127.0.0.1:8123/track"),
        ("https://proxy.example.com/mixpanel", "https://proxy.example.com/mixpanel/track"),
    ],
)
def test_api_host_with_and_without_scheme(api_host: str, track_url: str) -> None:
    endpoints = resolve_endpoints(api_host=api_host, region="in", environ={})
    assert endpoints.event == track_url
    assert endpoints.import_ == track_url.replace("/track", "/import")


def test_per_endpoint_urls_override_host_and_region() -> None:
    endpoints = resolve_endpoints(
        region="eu",
        api_host="http://127.0.0.1:9",
        events_url="http://events.example/e",
        groups_url="http://groups.example/g",
        environ={},
    )
    assert endpoints.event == "http://events.example/e"
    assert endpoints.profile_update == "http://127.0.0.1:9/engage"
    assert endpoints.group_update == "http://groups.example/g"
    assert endpoints.import_ == "http://127.0.0.1:9/import"


def track_url(*urls: str, **options: Any) -> str:
    """The ``/track`` URL a Consumer built with these arguments posts to."""
    with Consumer(*urls, **options) as consumer:
        return consumer.endpoints.event


def test_positional_urls_in_ruby_order() -> None:
    with Consumer(
        "https://api-eu.mixpanel.com/track",
        "https://api-eu.mixpanel.com/engage",
        "https://api-eu.mixpanel.com/groups",
        "https://api-eu.mixpanel.com/import",
    ) as consumer:
        assert consumer.endpoints == resolve_endpoints(region="eu", environ={})


def test_environment_fallbacks_and_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MIXPANEL_API_HOST")
    monkeypatch.setenv("MIXPANEL_REGION", "eu")
    assert track_url() == "https://api-eu.mixpanel.com/track"
    assert track_url(region="in") == "https://api-in.mixpanel.com/track"
    monkeypatch.setenv("MIXPANEL_API_HOST", "http://127.0.0.1:8123")
    assert track_url() == "http://127.0.0.1:8123/track"
    assert track_url(region="us") == "https://api.mixpanel.com/track"
    assert track_url(api_host="api-in.mixpanel.com") == "https://api-in.mixpanel.com/track"
    assert track_url("http://127.0.0.1:7/t") == "http://127.0.0.1:7/t"
    with Tracker(TOKEN, region="eu") as tracker:
        assert tracker.consumer.endpoints.event == "https://api-eu.mixpanel.com/track"


def test_environment_region_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MIXPANEL_API_HOST")
    monkeypatch.setenv("MIXPANEL_REGION", "mars")
    with pytest.raises(ConfigurationError, match="mars"):
        Consumer()


def test_unknown_region_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        Consumer(region="asia")
    text = str(info.value)
    assert "'asia'" in text
    for name, host in REGIONS.items():
        assert repr(name) in text
        assert host in text
    with pytest.raises(ConfigurationError, match="asia"):
        Tracker(TOKEN, region="asia")


@pytest.mark.parametrize("bad", ["", "   ", "http://", "ftp://files.example.com", "://nohost"])
def test_malformed_hosts_are_refused(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        resolve_endpoints(api_host=bad, environ={})
    with pytest.raises(ConfigurationError):
        resolve_endpoints(events_url=bad or "mailto:x", environ={})


def test_bad_timeout_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="request_timeout"):
        Consumer(api_host="http://127.0.0.1:9", request_timeout=0)


# --------------------------------------------------------------------------- request encoding


def test_query_params_content_type_and_user_agent(
    server: MixpanelServer, consumer: Consumer
) -> None:
    consumer.send("event", event())
    consumer.send("profile_update", profile())
    consumer.send("group_update", group())
    consumer.send("import", event(time=1_600_000_000))
    by_path = {request.path: request for request in server.requests}
    for path in ("/track", "/engage", "/groups"):
        assert by_path[path].query == {"verbose": "1", "ip": "0"}
    assert by_path["/import"].query == {"strict": "1", "project_id": PROJECT_ID}
    for request in by_path.values():
        assert request.method == "POST"
        assert request.header("Content-Type") == "application/json"
        assert f"mp_logbridge/{__version__}" in (request.header("User-Agent") or "")
        assert request.status == 200
    assert len(server.events) == len(server.imports) == 1


def test_gzip_only_on_track_and_import(server: MixpanelServer, consumer: Consumer) -> None:
    big = "x" * 5000
    consumer.send("event", event(blob=big))
    consumer.send("event", event(small=1))
    consumer.send("import", event(blob=big, time=1_600_000_000))
    consumer.send("profile_update", profile(blob=big))
    consumer.send("group_update", group(blob=big))
    requests = server.requests
    assert [(r.path, r.gzipped) for r in requests] == [
        ("/track", True),
        ("/track", False),
        ("/import", True),
        ("/engage", False),
        ("/groups", False),
    ]
    for request in requests:
        assert request.status == 200
        encoding = request.header("Content-Encoding")
        assert (encoding == "gzip") is request.gzipped
        assert len(request.body) > (5000 if request is not requests[1] else 0)
    assert server.profile_updates[0]["$set"]["blob"] == big
    assert server.group_updates[0]["$set"]["blob"] == big


def test_big_buffered_batches_are_never_gzipped_on_engage_and_groups(
    server: MixpanelServer,
) -> None:
    with BufferedConsumer(api_host=server.url, max_size=20) as buffered:
        for index in range(20):
            buffered.send("profile_update", profile(f"user-{index}", blob="y" * 500))
            buffered.send("group_update", group(blob="z" * 500, n=index))
    updates = [r for r in server.requests if r.path in ("/engage", "/groups")]
    assert len(updates) == 2
    assert all(not r.gzipped and len(r.body) > 10_000 and r.status == 200 for r in updates)
    assert len(server.profile_updates) == len(server.group_updates) == 20


# --------------------------------------------------------------------------- authentication


def test_service_account_auth_only_on_import(server: MixpanelServer, consumer: Consumer) -> None:
    consumer.send("event", event())
    consumer.send("profile_update", profile())
    consumer.send("group_update", group())
    consumer.send("import", event(time=1_600_000_000))
    for request in server.requests:
        if request.path == "/import":
            assert request.header("Authorization") == basic(SA_USER, SA_SECRET)
        else:
            assert request.header("Authorization") is None
            assert "project_id" not in request.query


def test_api_secret_auth_only_on_import() -> None:
    with MixpanelServer(api_secret=API_SECRET) as server:
        with Consumer(api_host=server.url, api_secret=API_SECRET) as consumer:
            consumer.send("event", event())
            consumer.send("import", event(time=1_600_000_000))
        track, imported = server.requests
        assert track.header("Authorization") is None
        assert imported.header("Authorization") == basic(API_SECRET, "")
        assert imported.query == {"strict": "1"}
        assert len(server.imports) == 1


def test_service_account_wins_over_api_secret(server: MixpanelServer) -> None:
    with Consumer(
        api_host=server.url,
        credentials=ServiceAccount(SA_USER, SA_SECRET, PROJECT_ID),
        api_secret="ignored-secret",
    ) as consumer:
        consumer.send("import", event(time=1_600_000_000))
    assert server.requests[0].header("Authorization") == basic(SA_USER, SA_SECRET)


def test_import_without_credentials_is_refused_before_sending(server: MixpanelServer) -> None:
    with (
        Consumer(api_host=server.url) as consumer,
        pytest.raises(RejectedError, match="credentials"),
    ):
        consumer.send("import", event(time=1_600_000_000))
    assert server.requests == []


def test_buffered_consumer_does_not_leak_import_auth(server: MixpanelServer) -> None:
    with BufferedConsumer(api_host=server.url, max_size=10) as buffered:
        buffered.send("import", event(time=1_600_000_000), None, API_SECRET)
        buffered.send("event", event())
        buffered.send("profile_update", profile())
        assert server.requests == []
    auth = {r.path: r.header("Authorization") for r in server.requests}
    assert auth == {"/import": basic(API_SECRET, ""), "/track": None, "/engage": None}


# --------------------------------------------------------------------------- secrets


def test_credentials_reprs_hide_secrets() -> None:
    account = ServiceAccount(f" {SA_USER} ", SA_SECRET, int(PROJECT_ID))
    assert account.username == SA_USER
    assert account.project_id == PROJECT_ID
    assert account.secret == SA_SECRET
    secret = ProjectSecret(API_SECRET)
    for text in (repr(account), str(account), repr(secret), str(secret), repr([account, secret])):
        assert SA_SECRET not in text
        assert API_SECRET not in text
    assert "***" in repr(account)
    assert account == ServiceAccount(SA_USER, SA_SECRET, PROJECT_ID)
    assert account != ServiceAccount(SA_USER, "other", PROJECT_ID)


@pytest.mark.parametrize(
    "args", [("", "s", "1"), ("u", "", "1"), ("u", "s", ""), ("u", None, "1"), ("u", "s", None)]
)
def test_service_account_needs_every_part(args: tuple[Any, ...]) -> None:
    with pytest.raises(ConfigurationError, match="service account"):
        ServiceAccount(*args)


def test_consumer_and_tracker_reprs_hide_secrets(down_url: str) -> None:
    account = ServiceAccount(SA_USER, SA_SECRET, PROJECT_ID)
    made = [
        Consumer(api_host=down_url, credentials=account),
        BufferedConsumer(api_host=down_url, api_secret=API_SECRET),
        BackgroundConsumer(api_host=down_url, credentials=account),
    ]
    trackers = [Tracker(TOKEN, made[0]), Tracker(TOKEN, api_secret=API_SECRET)]
    try:
        for thing in [*made, *trackers, made[0].transport]:
            for text in (repr(thing), str(thing)):
                assert SA_SECRET not in text
                assert API_SECRET not in text
    finally:
        for item in [*made, *trackers]:
            item.close()


@pytest.fixture
def library_log() -> Iterator[io.StringIO]:
    """Everything the library's logger emits, formatted, while the test runs."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    with attached(logging.getLogger("mp_logbridge"), handler):
        yield stream


def _secret_free(*texts: str) -> None:
    for text in texts:
        for secret in (SA_SECRET, API_SECRET, base64.b64encode(SA_SECRET.encode()).decode()):
            assert secret not in text


def _all_text(error: BaseException) -> str:
    parts = [str(error), repr(error), repr(error.args), repr(vars(error))]
    context = error.__cause__ or error.__context__
    if context is not None:
        parts += [str(context), repr(context)]
    return "\n".join(parts)


@pytest.mark.allow_spec_violations("record.")  # refused records on purpose
def test_no_secret_in_exceptions_logs_or_stderr(
    server: MixpanelServer,
    library_log: io.StringIO,
    capfd: pytest.CaptureFixture[str],
    down_url: str,
) -> None:
    errors: list[BaseException] = []
    wrong = ServiceAccount(SA_USER, "Wrong-" + SA_SECRET, PROJECT_ID)
    with (
        Consumer(api_host=server.url, credentials=wrong) as consumer,
        pytest.raises(RejectedError) as unauthorized,
    ):
        consumer.send("import", event(time=1_600_000_000))
    assert unauthorized.value.status_code == 401
    errors.append(unauthorized.value)

    server.fail_next(1, 500)
    with Consumer(api_host=server.url, api_secret=API_SECRET) as consumer:
        with pytest.raises(MixpanelServerError) as failed:
            consumer.send("import", event(time=1_600_000_000))
        errors.append(failed.value)
        with pytest.raises(PartialImportError) as partial:
            consumer.send("import", event(time=1000))
        errors.append(partial.value)

    with Consumer(
        api_host=down_url, credentials=ServiceAccount(SA_USER, SA_SECRET, PROJECT_ID)
    ) as down:
        with pytest.raises(MixpanelConnectionError) as unreachable:
            down.send("import", event(time=1_600_000_000))
        errors.append(unreachable.value)

    handled: list[BaseException] = []
    with Tracker(
        TOKEN, api_host=server.url, credentials=wrong, error_handler=handled.append
    ) as tracker:
        assert tracker.import_event("u", "Old", {"time": 1_600_000_000})
        assert tracker.flush(10) is False
    assert handled and all(isinstance(e, DeliveryError) for e in handled)
    errors.extend(handled)

    for error in errors:
        _secret_free(_all_text(error))
    logged = library_log.getvalue()
    assert "rejected_by_server" in logged  # losses were reported...
    assert "retries_exhausted" in logged
    captured = capfd.readouterr()
    _secret_free(logged, captured.out, captured.err)  # ...without a secret


def test_loss_report_reaches_stderr_without_secret(run_python: Any) -> None:
    """Outside pytest's log capture the loss report goes to stderr (logging's last resort)."""
    child = run_python(
        f"""
        from mp_logbridge import Consumer, ServiceAccount
        from mp_logbridge.errors import RejectedError
        from mp_logbridge import _messages as msg
        from mp_logbridge.testing import MixpanelServer

        with MixpanelServer(service_account=("u", "right", "1")) as server:
            account = ServiceAccount("u", {SA_SECRET!r}, "1")
            with Consumer(api_host=server.url, credentials=account) as consumer:
                try:
                    consumer.send("import", msg.event("t", "u", "e", {{"time": 1600000000}}))
                except RejectedError as exc:
                    print("raised", exc.status_code, repr(exc), exc)
                print(repr(consumer))
        """
    )
    assert child.returncode == 0, child
    assert "raised 401" in child.stdout
    assert "rejected_by_server" in child.stderr
    _secret_free(child.stdout, child.stderr)


# --------------------------------------------------------------------------- responses


def test_verbose_success_and_rejection(server: MixpanelServer, consumer: Consumer) -> None:
    assert consumer.send("event", event()) is True
    server.fail_next(1, 200, body={"status": 0, "error": "bad data"})
    with pytest.raises(RejectedError) as info:
        consumer.send("event", event())
    assert "bad data" in str(info.value)
    assert info.value.status_code == 200
    assert info.value.retryable is False
    assert info.value.endpoint == "event"


@pytest.mark.allow_spec_violations("record.")  # refused records on purpose
def test_server_side_validation_failure_is_a_rejection(
    server: MixpanelServer, consumer: Consumer
) -> None:
    with pytest.raises(RejectedError, match="token"):
        consumer.send("event", {"event": "No Token", "properties": {"distinct_id": "u"}})
    assert server.events == []
    assert server.invalid[0][0] == "/track"


def test_strict_import_success_reports_the_count(
    server: MixpanelServer, consumer: Consumer
) -> None:
    records = [event(f"user-{i}", time=1_600_000_000) for i in range(3)]
    payload = b"[" + b",".join(encode(record) for record in records) + b"]"
    assert consumer.transport.send("import", payload) == 3
    assert len(server.imports) == 3


@pytest.mark.allow_spec_violations("record.")  # refused records on purpose
def test_partial_import_drops_exactly_the_failed_records(server: MixpanelServer) -> None:
    good = [event(f"good-{i}", time=1_600_000_000 + i) for i in range(4)]
    bad = [event(f"bad-{i}", time=1000 + i) for i in range(2)]  # before 1971: refused
    order = [good[0], bad[0], good[1], good[2], bad[1], good[3]]
    reported: list[tuple[BaseException, list[Any]]] = []
    with BufferedConsumer(
        api_host=server.url,
        credentials=ServiceAccount(SA_USER, SA_SECRET, PROJECT_ID),
        on_error=lambda exc, records: reported.append((exc, records)),
    ) as buffered:
        for record in order:
            buffered.send("import", record)
        with pytest.raises(PartialImportError) as info:
            buffered.flush()
        assert buffered.flush() is True  # nothing left, nothing re-sent
        stats = buffered.stats()
    error = info.value
    assert error.failed_indexes == {1, 4}
    assert error.num_records_imported == 4
    assert {item["insert_id"] for item in error.failed_records} == {
        r["properties"]["$insert_id"] for r in bad
    }
    assert [r["properties"]["distinct_id"] for r in server.imports] == [
        "good-0",
        "good-1",
        "good-2",
        "good-3",
    ]
    assert len([r for r in server.requests if r.path == "/import"]) == 1
    assert stats["sent"] == 4
    assert stats["dropped"]["rejected_by_server"] == 2
    assert stats["queue_depth"] == 0
    assert len(reported) == 1
    assert [r["properties"]["distinct_id"] for r in reported[0][1]] == ["bad-0", "bad-1"]


@pytest.mark.allow_spec_violations("record.")  # refused records on purpose
def test_partial_import_of_a_single_record(server: MixpanelServer, consumer: Consumer) -> None:
    with pytest.raises(PartialImportError) as info:
        consumer.send("import", event(time=1000))
    assert info.value.status_code == 400
    assert info.value.retryable is False
    assert info.value.failed_indexes == {0}
    assert consumer.stats()["dropped"]["rejected_by_server"] == 1


def test_unauthorized_import(server: MixpanelServer) -> None:
    with (
        Consumer(
            api_host=server.url, credentials=ServiceAccount(SA_USER, "wrong", PROJECT_ID)
        ) as consumer,
        pytest.raises(RejectedError) as info,
    ):
        consumer.send("import", event(time=1_600_000_000))
    assert info.value.status_code == 401
    assert info.value.retryable is False
    assert server.imports == []


def test_413_splits_the_batch_until_it_fits() -> None:
    with MixpanelServer(max_request_bytes=3000) as server:
        records = [event(f"user-{i}", pad="p" * 400) for i in range(16)]
        with BufferedConsumer(api_host=server.url, max_size=50) as buffered:
            for record in records:
                buffered.send("event", record)
            assert buffered.flush() is True
            stats = buffered.stats()
        statuses = [r.status for r in server.requests]
        assert 413 in statuses
        arrived = [e["properties"]["$insert_id"] for e in server.events]
        assert sorted(arrived) == sorted(r["properties"]["$insert_id"] for r in records)
        assert len(arrived) == len(set(arrived))
        assert stats["dropped_total"] == 0
        assert all(len(r.body) <= 3000 for r in server.requests if r.status == 200)


def test_413_on_a_single_record_drops_it_as_too_large() -> None:
    with MixpanelServer(max_request_bytes=500) as server:
        with Consumer(api_host=server.url) as consumer:
            with pytest.raises(PayloadTooLargeError) as info:
                consumer.send("event", event(pad="p" * 1000))
            assert consumer.stats()["dropped"]["too_large"] == 1
        assert info.value.status_code == 413
        assert info.value.retryable is False
        assert server.events == []


def test_429_with_retry_after_seconds(server: MixpanelServer, consumer: Consumer) -> None:
    server.fail_next(1, 429, retry_after=7)
    with pytest.raises(RateLimitedError) as info:
        consumer.send("event", event())
    assert info.value.retryable is True
    assert info.value.status_code == 429
    assert info.value.retry_after == 7.0


def test_429_with_retry_after_http_date(server: MixpanelServer, consumer: Consumer) -> None:
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=120)
    server.fail_next(1, 429, retry_after=email.utils.format_datetime(when, usegmt=True))
    with pytest.raises(RateLimitedError) as info:
        consumer.send("event", event())
    assert info.value.retry_after is not None
    assert 60 < info.value.retry_after <= 121


def test_429_without_retry_after(server: MixpanelServer, consumer: Consumer) -> None:
    server.fail_next(1, 429)
    with pytest.raises(RateLimitedError) as info:
        consumer.send("event", event())
    assert info.value.retry_after is None
    assert info.value.retryable is True


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(" 2.5 ") == 2.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(date, now=now) == 30.0
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    assert parse_retry_after("") is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(500, True), (502, True), (503, True), (504, True), (408, True), (501, False), (505, False)],
)
def test_server_errors_are_classified(
    server: MixpanelServer, consumer: Consumer, status: int, retryable: bool
) -> None:
    server.fail_next(1, status, retry_after="3")
    with pytest.raises(MixpanelServerError) as info:
        consumer.send("profile_update", profile())
    assert info.value.status_code == status
    assert info.value.retryable is retryable
    assert info.value.retry_after == 3.0
    assert info.value.endpoint == "profile_update"
    assert server.profile_updates == []


@pytest.mark.parametrize("status", [400, 403, 404])
def test_other_client_errors_are_rejections(
    server: MixpanelServer, consumer: Consumer, status: int
) -> None:
    server.fail_next(1, status, body="nope, not JSON")
    with pytest.raises(RejectedError) as info:
        consumer.send("group_update", group())
    assert info.value.status_code == status
    assert info.value.retryable is False
    assert "nope, not JSON" in str(info.value)


@pytest.mark.parametrize("body", ["<html>gateway says hi</html>", "", "[1, 2]", '{"weird": 1}'])
def test_non_json_or_unexpected_200_bodies(
    server: MixpanelServer, consumer: Consumer, body: str
) -> None:
    server.fail_next(1, 200, body=body)
    with pytest.raises(MixpanelServerError) as info:
        consumer.send("event", event())
    assert info.value.status_code == 200
    assert "cannot interpret" in str(info.value)
    assert consumer.send("event", event()) is True  # the consumer is still usable


def test_non_json_5xx_body_is_quoted(server: MixpanelServer, consumer: Consumer) -> None:
    server.fail_next(1, 500, body="Internal server error")
    with pytest.raises(MixpanelServerError, match="Internal server error") as info:
        consumer.send("event", event())
    assert info.value.retryable is True


def test_plain_one_and_zero_bodies(server: MixpanelServer, consumer: Consumer) -> None:
    server.fail_next(1, 200, body="1")
    assert consumer.send("event", event()) is True
    server.fail_next(1, 200, body="0")
    with pytest.raises(RejectedError) as info:
        consumer.send("event", event())
    assert info.value.retryable is False


@pytest.mark.allow_spec_violations("record.")  # refused records on purpose
def test_non_verbose_server_answers_one_and_zero(server: MixpanelServer) -> None:
    """The receiver itself answers ``1``/``0`` without ``verbose``; the transport reads both."""
    good = requests.post(f"{server.url}/track", json=[event()], timeout=5)
    bad = requests.post(f"{server.url}/track", json=[{"event": "x"}], timeout=5)
    assert (good.text, bad.text) == ("1", "0")


def test_connection_drop_is_a_retryable_connection_error(
    server: MixpanelServer, consumer: Consumer
) -> None:
    server.drop_next(1)
    with pytest.raises(MixpanelConnectionError) as info:
        consumer.send("event", event())
    assert info.value.retryable is True
    assert info.value.status_code is None
    assert info.value.endpoint == "event"
    assert consumer.send("event", event()) is True


def test_read_timeout_is_a_retryable_connection_error(server: MixpanelServer) -> None:
    server.delay_next(1, 1.5)
    with (
        Consumer(api_host=server.url, request_timeout=0.2) as consumer,
        pytest.raises(MixpanelConnectionError) as info,
    ):
        consumer.send("event", event())
    assert info.value.retryable is True
    assert "no complete answer" in str(info.value) and "within 0.2 s" in str(info.value)


def test_unreachable_host(down_url: str) -> None:
    with Consumer(api_host=down_url) as consumer, pytest.raises(MixpanelConnectionError) as info:
        consumer.send("event", event())
    assert info.value.retryable is True
    assert down_url.split("//")[1] in str(info.value)


def test_exception_hierarchy() -> None:
    assert issubclass(RateLimitedError, MixpanelServerError)
    assert issubclass(PayloadTooLargeError, MixpanelServerError)
    assert issubclass(PartialImportError, RejectedError)
    for kind in (MixpanelConnectionError, MixpanelServerError, RejectedError):
        assert issubclass(kind, DeliveryError)
    assert MixpanelConnectionError("x").retryable is True
    assert RateLimitedError("x").retryable is True
    assert RejectedError("x").retryable is False
    assert MixpanelServerError("x", retryable=True).retryable is True

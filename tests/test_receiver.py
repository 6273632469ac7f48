"""The loopback receiver itself, ``mp_logbridge.testing.MixpanelServer``, over real HTTP.

It answers in the shapes the ingestion API documents, decodes every body form, records each
breach of the spec, misbehaves exactly as told, survives hostile clients, and is safe under
concurrent requests; the pytest fixtures and ``mp-logbridge serve --token`` are tested here too.
The rules it applies are tested one by one in ``test_rules.py``.
"""

from __future__ import annotations

import base64
import gzip
import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import mixpanel
import pytest
import requests
from support import child_env, wait_until

from mp_logbridge import Consumer, Tracker
from mp_logbridge.errors import MixpanelConnectionError, RejectedError
from mp_logbridge.testing import (
    MixpanelServer,
    ReceivedRequest,
    SpecViolation,
    collect_spec_violations,
)

TOKEN = "receiver-token"
SA = ("robot", "robot-secret", "4242")
SECRET = "project-secret"


STAMP = int(time.time() * 1000)  # one moment for every record of this module (equal records)


def event(name: str = "Signed Up", distinct_id: str = "u1", **props: Any) -> dict[str, Any]:
    properties = {
        "token": TOKEN,
        "distinct_id": distinct_id,
        "time": STAMP,
        "$insert_id": f"id-{distinct_id}-{name.replace(' ', '-')}",
    }
    return {"event": name, "properties": {**properties, **props}}


def profile(op: str = "$set", value: Any = None, **extra: Any) -> dict[str, Any]:
    return {
        "$token": TOKEN,
        "$distinct_id": "u1",
        op: {"a": 1} if value is None else value,
        **extra,
    }


def basic(user: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


@pytest.fixture
def server() -> Iterator[MixpanelServer]:
    with MixpanelServer(service_account=SA, api_secret=SECRET, read_timeout=2) as srv:
        yield srv


def post(
    server: MixpanelServer,
    path: str,
    body: Any = None,
    *,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    data: bytes | str | None = None,
    timeout: float = 10,
) -> requests.Response:
    """POST a JSON body (``body``) or raw bytes (``data``) with no library in between."""
    sent_headers = {"Content-Type": "application/json", **(headers or {})}
    payload = data if data is not None else json.dumps(body).encode()
    return requests.post(
        f"{server.url}{path}", params=params, data=payload, headers=sent_headers, timeout=timeout
    )


def raw_exchange(server: MixpanelServer, request: bytes, *, half_close: bool = True) -> bytes:
    """Send bytes as they are on a new connection; return all the server answered."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> Any:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


# --------------------------------------------------------------------------- documented answers


def test_track_answers_1_or_0_as_text_and_verbose_as_json(server: MixpanelServer) -> None:
    plain = post(server, "/track", [event()])
    assert (plain.status_code, plain.text) == (200, "1")
    assert plain.headers["Content-Type"] == "text/plain"
    verbose = post(server, "/track", [event("Second")], params={"verbose": "1", "ip": "0"})
    assert verbose.json() == {"status": 1, "error": None}
    assert [e["event"] for e in server.events] == ["Signed Up", "Second"]
    assert server.spec_violations == []


@pytest.mark.allow_spec_violations("record.")
def test_track_answers_0_when_no_record_is_well_formed(server: MixpanelServer) -> None:
    bad = {"event": "No Token", "properties": {"distinct_id": "u1"}}
    assert post(server, "/track", [bad]).text == "0"
    verbose = post(server, "/track", [bad], params={"verbose": "1"})
    assert verbose.status_code == 200
    assert verbose.json() == {"status": 0, "error": "'token' is required"}
    mixed = post(server, "/track", [bad, event()], params={"verbose": "1"})
    assert mixed.json() == {"status": 1, "error": None}  # "one or more objects are valid"
    assert server.events == [event()]
    assert [(path, reason) for path, _, reason in server.invalid] == [
        ("/track", "'token' is required")
    ] * 3


def test_track_serves_a_pixel_and_a_jsonp_callback(server: MixpanelServer) -> None:
    data = base64.urlsafe_b64encode(json.dumps(event()).encode()).decode()
    pixel = requests.get(
        f"{server.url}/track/", params={"data": data, "ip": "1", "img": "1"}, timeout=10
    )
    assert pixel.headers["Content-Type"] == "image/gif" and pixel.content.startswith(b"GIF89a")
    callback = post(server, "/track", [event("Other")], params={"callback": "done", "verbose": "1"})
    assert callback.headers["Content-Type"] == "text/javascript"
    assert callback.text == 'done({"status": 1, "error": null})'
    assert len(server.events) == 2 and server.spec_violations == []


def test_import_answers_the_strict_shapes(server: MixpanelServer) -> None:
    auth = {"Authorization": basic(*SA[:2])}
    params = {"strict": "1", "project_id": SA[2]}
    ok = post(server, "/import", [event(time=1_600_000_000)], params=params, headers=auth)
    assert ok.status_code == 200
    assert ok.json() == {"code": 200, "num_records_imported": 1, "status": "OK"}


@pytest.mark.allow_spec_violations("record.properties.time")
def test_a_strict_import_with_failures_is_a_400_listing_them(server: MixpanelServer) -> None:
    auth = {"Authorization": basic(SECRET, "")}
    good, bad = event(time=1_600_000_000), event("Bad", time=1000)
    answer = post(server, "/import", [good, bad, good], params={"strict": "1"}, headers=auth)
    assert answer.status_code == 400
    assert answer.json() == {
        "code": 400,
        "error": "some data points in the request failed validation",
        "status": "Bad Request",
        "num_records_imported": 2,
        "failed_records": [
            {
                "index": 1,
                "insert_id": "id-u1-Bad",
                "field": "properties.time",
                "message": "'properties.time' is invalid: must be after 1971-01-01",
            }
        ],
    }
    assert server.imports == [good, good]  # a 400 is a partial success
    [violation] = server.spec_violations
    assert (violation.rule, violation.index, violation.path) == (
        "record.properties.time",
        1,
        "/import",
    )


@pytest.mark.allow_spec_violations("record.properties.time")
def test_a_non_strict_import_answers_1_or_0(server: MixpanelServer) -> None:
    auth = {"Authorization": basic(SECRET, "")}
    assert (
        post(server, "/import", [event(time=1000)], params={"strict": "0"}, headers=auth).text
        == "0"
    )
    ok = post(server, "/import", [event(time=1_600_000_000)], params={"strict": "0"}, headers=auth)
    assert ok.text == "1"
    assert len(server.imports) == 1
    # the spec requires the fields whatever `strict` says: breaking them is a violation
    assert [v.rule for v in server.spec_violations] == ["record.properties.time"]


@pytest.mark.parametrize(
    ("headers", "params", "message", "violation"),
    [
        ({}, {}, "Invalid credentials (a Basic or Bearer Authorization header is required)", True),
        (
            {"Authorization": basic("robot", "wrong")},
            {"project_id": "4242"},
            "Invalid credentials",
            False,
        ),
        (
            {"Authorization": basic(*SA[:2])},
            {"project_id": "1"},
            "Invalid credentials: project_id does not match the service account",
            False,
        ),
        (
            {"Authorization": basic(*SA[:2])},
            {},
            "project_id is required with service account credentials",
            True,
        ),
    ],
)
def test_import_without_good_credentials_is_a_401(
    server: MixpanelServer,
    headers: dict[str, str],
    params: dict[str, str],
    message: str,
    violation: bool,
    request: pytest.FixtureRequest,
) -> None:
    if violation:
        request.applymarker(pytest.mark.allow_spec_violations("auth", "query.project_id"))
    answer = post(server, "/import", [event(time=1_600_000_000)], params=params, headers=headers)
    assert answer.status_code == 401
    assert answer.json() == {"code": 401, "error": message, "status": "Unauthorized"}
    assert server.imports == []
    assert bool(server.spec_violations) is violation


def test_the_official_python_sdks_import_gets_the_answer_it_reads(server: MixpanelServer) -> None:
    """No `strict`, `verbose=1` in the form, Basic `secret:` and `api_key`: what
    ``mixpanel.Consumer`` sends for ``import_data``; it reads ``status`` and ``error``."""
    form = urlencode(
        {"data": json.dumps(event(time=1_600_000_000)), "verbose": "1", "ip": "0", "api_key": "k"}
    )
    answer = post(
        server,
        "/import",
        data=form,
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Authorization": basic(SECRET, ""),
        },
    )
    assert answer.json() == {"status": 1, "error": None}
    assert len(server.imports) == 1 and server.spec_violations == []


@pytest.mark.allow_spec_violations("size")
def test_too_large_is_a_413_in_the_documented_shape() -> None:
    with MixpanelServer(max_request_bytes=1000) as small:
        answer = post(small, "/track", [event(pad="p" * 2000)])
        assert answer.status_code == 413
        assert answer.json() == {
            "code": 413,
            "error": "request exceeds max limit of 1000 bytes",
            "status": "Request Entity Too Large",
        }
        assert small.events == []
        assert small.spec_violations == []  # under the documented 2 MB: the receiver's own limit
    with MixpanelServer() as default:
        big = post(default, "/track", [event(pad="p" * 3_000_000)])
        assert big.status_code == 413
        assert [v.rule for v in default.spec_violations] == ["size"]


@pytest.mark.allow_spec_violations("path", "method")
def test_unknown_paths_are_404_and_other_methods_405(server: MixpanelServer) -> None:
    assert post(server, "/decide", [event()]).status_code == 404
    wrong = requests.get(f"{server.url}/import", timeout=10)
    assert wrong.status_code == 405
    assert wrong.headers["Allow"] == "POST"
    put = requests.put(f"{server.url}/track", data=b"[]", timeout=10)
    assert put.status_code == 405 and put.headers["Allow"] == "GET, POST"
    assert [v.rule for v in server.spec_violations] == ["path", "method", "method"]


@pytest.mark.allow_spec_violations("record.")
def test_strict_engage_lists_the_failed_records(server: MixpanelServer) -> None:
    answer = post(
        server, "/engage", [profile(), profile("$add", {"n": "one"})], params={"strict": "1"}
    )
    assert answer.status_code == 400
    payload = answer.json()
    assert payload["num_records_imported"] == 1
    assert payload["failed_records"] == [
        {"index": 1, "field": "$add", "message": "'$add' values must be numbers"}
    ]
    assert len(server.profile_updates) == 1


@pytest.mark.allow_spec_violations("content-encoding", "auth", "query.")
def test_request_refusals_have_the_endpoints_error_shape(server: MixpanelServer) -> None:
    engage = post(
        server,
        "/engage",
        data=gzip.compress(json.dumps([profile()]).encode()),
        headers={"Content-Encoding": "gzip"},
    )
    assert engage.status_code == 400
    assert engage.json() == {"error": "/engage does not support gzip encoding", "status": 0}
    leak = post(server, "/track", [event()], headers={"Authorization": basic(SECRET, "")})
    assert leak.status_code == 400
    assert leak.json() == {"error": "credentials must not be sent to /track", "status": 0}
    unknown = post(
        server,
        "/import",
        [event()],
        params={"verbose": "yes"},
        headers={"Authorization": basic(SECRET, "")},
    )
    assert unknown.json()["code"] == 400 and unknown.json()["status"] == "Bad Request"
    assert server.events == [] and server.profile_updates == [] and server.imports == []


# --------------------------------------------------------------------------- bodies


def test_gzip_ndjson_and_every_form_are_decoded(server: MixpanelServer) -> None:
    auth = {"Authorization": basic(SECRET, "")}
    post(
        server,
        "/track",
        data=gzip.compress(json.dumps([event("Gz")]).encode()),
        headers={"Content-Encoding": "gzip"},
    )
    ndjson = "\n".join(json.dumps(event(f"Nd{i}", time=1_600_000_000)) for i in range(3))
    post(server, "/import", data=ndjson, headers={"Content-Type": "application/x-ndjson", **auth})
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    plain = urlencode({"data": json.dumps(event("Form")), "verbose": "1", "ip": "0"})
    post(server, "/track", data=plain, headers=form)
    ruby = urlencode({"data": base64.b64encode(json.dumps([profile()]).encode()), "verbose": "1"})
    post(server, "/engage", data=ruby, headers=form)
    assert [e["event"] for e in server.events] == ["Gz", "Form"]
    assert [e["event"] for e in server.imports] == ["Nd0", "Nd1", "Nd2"]
    assert server.profile_updates == [profile()]
    first = server.requests[0]
    assert first.gzipped and json.loads(first.body) == [event("Gz")]  # kept decompressed
    assert server.spec_violations == []


def test_a_chunked_body_is_read(server: MixpanelServer) -> None:
    def pieces() -> Iterator[bytes]:
        text = json.dumps([event("Chunked")]).encode()
        yield text[:10]
        yield text[10:]

    answer = requests.post(
        f"{server.url}/track",
        data=pieces(),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert answer.text == "1"
    assert server.requests[0].header("Transfer-Encoding") == "chunked"
    assert [e["event"] for e in server.events] == ["Chunked"]


def test_the_official_sdk_conforms_on_every_endpoint(server: MixpanelServer) -> None:
    """The official package's requests (form bodies, float seconds, integer ids, legacy import
    with a project secret) break no rule: the places where the spec is stricter than Mixpanel
    follow Mixpanel."""
    urls = {
        f"{kind}_url": f"{server.url}/{path}"
        for kind, path in (
            ("events", "track"),
            ("people", "engage"),
            ("groups", "groups"),
            ("import", "import"),
        )
    }
    mp = mixpanel.Mixpanel(TOKEN, consumer=mixpanel.Consumer(**urls))
    mp.track("u1", "Official", {"n": 1})
    mp.people_set("u1", {"a": 1}, meta={"$ip": 0, "$ignore_time": True})
    mp.people_union("u1", {"l": ["x"]})
    mp.people_delete("u1", meta={"$ignore_alias": True})
    mp.people_track_charge("u1", 9.5)
    mp.group_set("Company", 42, {"a": 1})
    mp.group_union("Company", "Acme", {"l": ["x"]})
    mp.group_delete("Company", "Acme")
    mp.import_data("key", "u1", "Old", 1_600_000_000, {"$insert_id": "old-1"}, api_secret=SECRET)
    mp.merge("key", "u1", "u2", api_secret=SECRET)
    buffered = mixpanel.BufferedConsumer(max_size=3, **urls)
    for index in range(4):
        mixpanel.Mixpanel(TOKEN, consumer=buffered).track(f"u{index + 1}", "Buffered")
    buffered.flush()
    assert server.spec_violations == []
    assert (len(server.events), len(server.profile_updates), len(server.group_updates)) == (5, 4, 3)
    assert [e["event"] for e in server.imports] == ["Old", "$merge"]
    assert all(
        r.header("Content-Type") == "application/x-www-form-urlencoded" for r in server.requests
    )


# --------------------------------------------------------------------------- violations


@pytest.mark.allow_spec_violations
def test_violations_are_kept_per_request_per_server_and_collected_across_servers(
    server: MixpanelServer,
) -> None:
    with MixpanelServer() as other, collect_spec_violations() as collected:
        post(server, "/track", [event()], params={"verbose": "yes"})
        post(other, "/engage", [profile("$union", {"l": []})])
        post(other, "/track", [event()])
    assert [v.rule for v in server.spec_violations] == ["query.verbose"]
    assert [v.rule for v in other.spec_violations] == ["record.$union"]
    assert collected == server.spec_violations + other.spec_violations
    union = other.spec_violations[0]
    assert union == SpecViolation("POST", "/engage", "record.$union", union.message, 0)
    assert str(union).startswith("POST /engage record 0: [record.$union] '$union' value of 'l'")
    [request] = [r for r in server.requests]
    assert isinstance(request, ReceivedRequest) and request.violations == server.spec_violations
    other.clear()
    assert other.spec_violations == [] and other.requests == []


@pytest.mark.allow_spec_violations("record.$union", "query.verbose")
def test_requests_the_server_fails_on_command_are_still_checked(server: MixpanelServer) -> None:
    server.fail_next(1, 503)
    empty_union = profile("$union", {"tags": []})
    answer = post(server, "/engage", [empty_union])
    assert answer.status_code == 503
    server.drop_next(1)
    with pytest.raises(requests.exceptions.ConnectionError):
        post(server, "/track", [event()], params={"verbose": "true"})
    assert [v.rule for v in server.spec_violations] == ["record.$union", "query.verbose"]
    assert [(r.status, r.records) for r in server.requests] == [(503, [empty_union]), (0, [])]
    assert server.profile_updates == [] and server.invalid == []  # nothing kept from them


def test_wrong_credentials_and_a_lower_size_limit_are_no_violations() -> None:
    with MixpanelServer(service_account=SA, max_request_bytes=500) as srv:
        post(
            srv,
            "/import",
            [event()],
            params={"project_id": "4242"},
            headers={"Authorization": basic("robot", "nope")},
        )
        post(srv, "/track", [event(pad="x" * 1000)])
        assert [r.status for r in srv.requests] == [401, 413]
        assert srv.spec_violations == []


# --------------------------------------------------------------------------- a hostile client


@pytest.mark.allow_spec_violations("content-encoding")
def test_malformed_gzip_is_a_400(server: MixpanelServer) -> None:
    answer = post(
        server, "/track", data=b"\x1f\x8b\x08\x00garbage", headers={"Content-Encoding": "gzip"}
    )
    assert answer.status_code == 400
    assert answer.json()["error"].startswith("body is not valid gzip")
    assert answer.json()["status"] == 0


@pytest.mark.allow_spec_violations("body.json", "body.encoding")
def test_garbage_and_non_utf8_bodies_are_400s(server: MixpanelServer) -> None:
    for data in (b"{{{{", b"\xff\xfe[]", b"[" * 50_000 + b"]" * 50_000, b'[{"x": NaN}]'):
        answer = post(server, "/track", data=data)
        assert answer.status_code == 400
        assert answer.json()["status"] == 0
    assert [v.rule for v in server.spec_violations] == [
        "body.json",
        "body.encoding",
        "body.json",
        "body.json",
    ]
    assert server.events == []


@pytest.mark.allow_spec_violations("size")
def test_a_body_over_the_limit_is_read_and_answered_413_not_reset() -> None:
    with MixpanelServer(max_request_bytes=100_000) as small:
        answer = post(small, "/track", data=b"[" + b" " * 10_000_000 + b"]")
        assert answer.status_code == 413
        post(small, "/track", [event()])  # still serving
        assert len(small.events) == 1


@pytest.mark.allow_spec_violations("record.")
def test_a_10_mb_record_is_refused_as_over_1_mb() -> None:
    with MixpanelServer(max_request_bytes=20_000_000) as roomy:
        answer = post(roomy, "/track", [event(pad="p" * 10_000_000)], params={"verbose": "1"})
        assert answer.json() == {"status": 0, "error": "event is larger than 1 MB"}
        assert roomy.events == []


@pytest.mark.allow_spec_violations("content-length", "body.json")
def test_a_lying_content_length_is_answered_and_the_connection_closed(
    server: MixpanelServer,
) -> None:
    text = json.dumps([event()]).encode()
    head = b"POST /track HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    shorter = raw_exchange(server, head + b"Content-Length: %d\r\n\r\n" % (len(text) + 50) + text)
    assert status_of(shorter) == 400
    assert "shorter" in body_of(shorter)["error"]
    assert b"Connection: close" in shorter
    # Declared shorter than sent: the body is cut, and the rest is not a request.
    cut = raw_exchange(server, head + b"Content-Length: 10\r\n\r\n" + text)
    assert status_of(cut) == 400
    assert server.events == []
    invalid = raw_exchange(server, head + b"Content-Length: lots\r\n\r\n" + text)
    assert status_of(invalid) == 400 and "Content-Length" in body_of(invalid)["error"]


@pytest.mark.allow_spec_violations("content-length")
def test_a_client_that_never_sends_its_body_gets_408_after_the_read_timeout() -> None:
    with MixpanelServer(read_timeout=0.3) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(b"POST /track HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n[")
            answer = sock.recv(65536)  # the connection stays open on our side
        assert status_of(answer) == 408
        assert srv.requests[0].status == 408


@pytest.mark.allow_spec_violations("size", "content-length")
def test_a_huge_declared_length_does_not_make_the_server_read_it() -> None:
    with MixpanelServer(read_timeout=0.3) as srv:
        answer = raw_exchange(
            srv, b"POST /track HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n[]"
        )
        assert status_of(answer) in (408, 413)
        assert post(srv, "/track", [event()]).text == "1"


@pytest.mark.allow_spec_violations("content-length")
def test_a_stalled_client_does_not_hold_up_the_others() -> None:
    with MixpanelServer(read_timeout=30) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as stalled:
            stalled.sendall(b"POST /track HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            assert post(srv, "/track", [event()], timeout=5).text == "1"
        assert len(srv.events) == 1


def test_a_request_line_of_garbage_gets_400_and_the_server_goes_on(server: MixpanelServer) -> None:
    for garbage in (b"\x00\x01\x02 garbage\r\n\r\n", b"POST /track HTTP/one\r\n\r\n"):
        answer = raw_exchange(server, garbage)
        assert b"Error code: 400" in answer  # http.server's own answer to what is not HTTP
    assert post(server, "/track", [event()]).text == "1"


# --------------------------------------------------------------------------- faults


def test_fail_next_answers_the_status_and_accepts_nothing(server: MixpanelServer) -> None:
    server.fail_next(2, 429, retry_after=7, endpoint="/track")
    for _ in range(2):
        limited = post(server, "/track", [event()])
        assert limited.status_code == 429 and limited.headers["Retry-After"] == "7"
        assert limited.json() == {
            "code": 429,
            "error": "Project exceeded rate limits. Please retry the request with exponential backoff.",
            "status": "Too Many Requests",
        }
    assert post(server, "/engage", [profile()]).text == "1"  # another endpoint: untouched
    server.fail_next(1, 200, body={"status": 0, "error": "bad data"})
    assert post(server, "/track", [event()]).json() == {"status": 0, "error": "bad data"}
    server.fail_next(1, 200)  # a failure however it is answered
    assert post(server, "/track", [event()]).json() == {
        "status": 0,
        "error": "injected failure 200",
    }
    server.fail_next(1, 502)
    assert post(server, "/track", [event()]).json() == {
        "code": 502,
        "error": "injected failure 502",
        "status": "Bad Gateway",
    }
    server.fail_next(1, 500, body="oops")
    assert post(server, "/track", [event()]).text == "oops"
    assert post(server, "/track", [event()]).text == "1"
    assert len(server.events) == 1
    assert [r.status for r in server.requests] == [429, 429, 200, 200, 200, 502, 500, 200]


def test_delay_next_delays_then_handles(server: MixpanelServer) -> None:
    server.delay_next(1, 1)
    with pytest.raises(requests.exceptions.ReadTimeout):
        post(server, "/track", [event("Late")], timeout=0.2)
    wait_until(lambda: len(server.events) == 1, message="the delayed request was not handled")
    assert post(server, "/track", [event("Prompt")], timeout=5).text == "1"  # one request only


def test_drop_next_closes_without_answering(server: MixpanelServer) -> None:
    server.drop_next(1)
    with pytest.raises(requests.exceptions.ConnectionError):
        post(server, "/track", [event()])
    assert server.events == [] and [r.status for r in server.requests] == [0]
    assert post(server, "/track", [event()]).text == "1"


def test_stall_next_never_answers_until_the_server_stops() -> None:
    with MixpanelServer() as srv:
        srv.stall_next(1)
        with pytest.raises(requests.exceptions.ReadTimeout):
            post(srv, "/track", [event()], timeout=0.3)
        assert post(srv, "/track", [event()], timeout=5).text == "1"
        assert [r.status for r in srv.requests] == [0, 200]
    # stop() released the stalled handler (the test would hang at teardown otherwise)


def test_drip_next_dribbles_bytes_past_any_socket_timeout() -> None:
    with MixpanelServer() as srv:
        srv.drip_next(1, interval=0.05)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            body = json.dumps([event()]).encode()
            sock.sendall(
                b"POST /track HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            first = sock.recv(100)
            assert 0 < len(first) < 10  # a byte at a time, not the whole answer
        assert srv.events == []


def test_huge_next_accepts_then_answers_a_body_of_the_given_size(server: MixpanelServer) -> None:
    server.huge_next(1, size=3_000_000)
    answer = post(server, "/track", [event()])
    assert answer.status_code == 200 and len(answer.content) > 3_000_000
    assert len(server.events) == 1
    wait_until(lambda: server.huge_bytes_written == [3_000_000])


def test_huge_next_stops_writing_when_the_client_stops_reading(server: MixpanelServer) -> None:
    server.huge_next(1)  # 512 MB
    with requests.post(f"{server.url}/track", json=[event()], stream=True, timeout=10) as answer:
        next(answer.iter_content(65536))
    wait_until(lambda: len(server.huge_bytes_written) == 1, message="the writer never stopped")
    assert server.huge_bytes_written[0] < 512 * 1024 * 1024


def test_latency_applies_to_every_request() -> None:
    with MixpanelServer(latency=2) as slow:
        for path, body in (("/track", [event()]), ("/engage", [profile()])):
            with pytest.raises(requests.exceptions.ReadTimeout):
                post(slow, path, body, timeout=0.2)
        slow.latency = 0
        assert post(slow, "/track", [event("Fast")], timeout=5).text == "1"


# --------------------------------------------------------------------------- waiting and threads


@pytest.mark.allow_spec_violations("record.")
def test_wait_for_returns_or_says_what_arrived_and_what_was_refused(server: MixpanelServer) -> None:
    post(server, "/track", [event(), {"event": "No Token", "properties": {}}])
    assert len(server.wait_for(1)) == 1
    assert len(server.wait_for(1, "all")) == 1
    with pytest.raises(TimeoutError) as info:
        server.wait_for(3, "events", timeout=0.2)
    assert str(info.value) == (
        "only 1 of 3 events arrived within 0.2 s (1 requests received, 1 records refused: "
        "/track: 'token' is required)"
    )
    with pytest.raises(ValueError, match="kind must be one of"):
        server.wait_for(1, "event")


def test_wait_for_wakes_up_when_records_arrive(server: MixpanelServer) -> None:
    timer = threading.Timer(
        0.2,
        lambda: post(
            server,
            "/groups",
            [{"$token": TOKEN, "$group_key": "Company", "$group_id": "Acme", "$set": {"a": 1}}],
        ),
    )
    timer.start()
    try:
        assert len(server.wait_for(1, "group_updates", timeout=10)) == 1
    finally:
        timer.join()


def test_concurrent_requests_lose_and_mix_up_nothing(server: MixpanelServer) -> None:
    threads, per_thread, per_request = 8, 20, 5
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def send(worker: int) -> None:
        try:
            with requests.Session() as session:
                barrier.wait()
                for n in range(per_thread):
                    batch = [
                        event(f"E{worker}-{n}-{k}", distinct_id=f"w{worker}")
                        for k in range(per_request)
                    ]
                    answer = session.post(f"{server.url}/track", json=batch, timeout=10)
                    assert answer.text == "1"
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=send, args=(w,)) for w in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert errors == []
    events = server.events
    assert (
        len(events)
        == len({e["properties"]["$insert_id"] for e in events})
        == threads * per_thread * per_request
    )
    assert len(server.requests) == threads * per_thread
    for request in server.requests:  # each request's records stayed together
        assert len({r["properties"]["distinct_id"] for r in request.records}) == 1


# --------------------------------------------------------------------------- the library against it


def test_the_library_delivers_every_kind_without_a_violation(server: MixpanelServer) -> None:
    with Tracker(TOKEN, api_host=server.url, credentials=None, api_secret=SECRET) as tracker:
        tracker.track("u1", "Signed Up", {"big": "x" * 5000})  # gzipped
        tracker.people.set("u1", {"a": 1}, 0)
        tracker.people.union("u1", {"l": ["x"]})
        tracker.people.delete_user("u1", {"$ignore_alias": True})
        tracker.groups.union("Company", "Acme", {"l": ["x"]})
        tracker.groups.delete_group("Company", "Acme")
        tracker.import_event("u1", "Old", {"time": 1_600_000_000})
        tracker.merge("u1", "u2")
        assert tracker.flush(10)
    assert server.spec_violations == []
    assert [
        len(server.events),
        len(server.profile_updates),
        len(server.group_updates),
        len(server.imports),
    ] == [1, 3, 2, 2]
    assert any(r.gzipped for r in server.requests if r.path == "/track")


@pytest.mark.allow_spec_violations("record.properties.token")
def test_a_refused_record_reaches_the_library_as_a_rejection(server: MixpanelServer) -> None:
    with Consumer(api_host=server.url) as consumer, pytest.raises(RejectedError, match="token"):
        consumer.send("event", {"event": "E", "properties": {"distinct_id": "u"}})


# --------------------------------------------------------------------------- a project's token


def test_a_server_with_a_token_refuses_other_projects_records() -> None:
    with MixpanelServer(token=TOKEN) as srv:
        other = event(token="other-token")
        assert post(srv, "/track", [event(), other], params={"verbose": "1"}).json() == {
            "status": 1,
            "error": None,
        }
        refused = post(srv, "/track", [other], params={"verbose": "1"})
        assert refused.status_code == 401
        assert refused.json() == {
            "error": "the project token is not this project's",
            "status": "error",
        }
        assert post(srv, "/engage", [{**profile(), "$token": "other-token"}]).status_code == 401
        assert srv.events == [event()]
        assert [reason for _, _, reason in srv.invalid] == [
            "token 'other-token' is not this project's token"
        ] * 3
        assert srv.spec_violations == []  # another project's data breaks no rule
        # /import names its project by credentials; the token also authenticates it
        ok = post(
            srv, "/import", [event(time=1_600_000_000)], headers={"Authorization": basic(TOKEN, "")}
        )
        assert ok.status_code == 200


def test_the_library_sees_a_wrong_token_as_a_rejection() -> None:
    with MixpanelServer(token=TOKEN) as srv, Consumer(api_host=srv.url) as consumer:
        with pytest.raises(RejectedError) as info:
            consumer.send("event", event(token="typo-token"))
        assert info.value.status_code == 401
        assert consumer.stats()["dropped"]["rejected_by_server"] == 1


def start_serve(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mp_logbridge", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("Mixpanel receiver listening at http://127.0.0.1:"), first
    return proc, first.split(" at ")[1].split(" ")[0]


def stop_serve(proc: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    return out, err


@pytest.mark.subprocess
def test_serve_with_a_token_refuses_and_shows_records_of_another_project() -> None:
    proc, url = start_serve("--token", TOKEN)
    try:
        with Tracker(TOKEN, api_host=url) as right:
            right.track("u1", "Right Project")
            assert right.flush(10)
        with Tracker("typo-token", api_host=url) as wrong:
            wrong.track("u1", "Wrong Project")
            wrong.people.set("u1", {"a": 1})
            assert wrong.flush(10) is False
            stats = wrong.stats()
    finally:
        out, err = stop_serve(proc)
    assert stats["dropped"]["rejected_by_server"] == 2
    lines = out.splitlines()
    assert [line for line in lines if line.startswith("events ")] == [
        line for line in lines if "Right Project" in line
    ]
    # the two endpoints are delivered independently: either may come first
    engage, track = sorted(line for line in lines if line.startswith("refused "))
    assert track.startswith("refused /track   token 'typo-token' is not this project's token: ")
    assert '"event":"Wrong Project"' in track
    assert engage.startswith("refused /engage  token 'typo-token' is not this project's token: ")
    assert (
        "received 1 events, 0 profile updates, 0 group updates, 0 imports; refused 2 records; 0 spec violations"
        in out
    )
    assert "Traceback" not in err


@pytest.mark.subprocess
def test_serve_shows_requests_that_break_the_spec() -> None:
    proc, url = start_serve()
    try:
        answer = requests.post(
            f"{url}/engage", params={"verbose": "yes"}, json=[profile()], timeout=10
        )
        assert answer.status_code == 400
    finally:
        out, _err = stop_serve(proc)
    assert "refused /engage  [query.verbose] 'verbose' must be one of 0, 1, got 'yes'" in out
    assert "; 1 spec violations" in out


@pytest.mark.subprocess
def test_serve_refuses_an_empty_token() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mp_logbridge", "serve", "--port", "0", "--token", " "],
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(),
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "mp-logbridge: error: --token must not be empty"


# --------------------------------------------------------------------------- the pytest fixtures and the suite's guard


def run_inner_pytest(tmp_path: Path, source: str, *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(source))
    env = child_env()
    env["PYTHONPATH"] = f"{Path(__file__).parent}:{env['PYTHONPATH']}"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            "/dev/null",
            "--rootdir",
            str(tmp_path),
            *extra,
            str(tmp_path / "test_inner.py"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )


@pytest.mark.subprocess
def test_the_fixtures_installed_with_the_package(tmp_path: Path) -> None:
    result = run_inner_pytest(
        tmp_path,
        """
        import requests
        from mp_logbridge import Tracker, Consumer

        seen = []

        def test_server(mixpanel_server):
            seen.append(mixpanel_server.url)
            with Tracker("T", Consumer(api_host=mixpanel_server.url)) as tracker:
                tracker.track("u1", "Served")
            assert [e["event"] for e in mixpanel_server.events] == ["Served"]

        def test_the_server_was_stopped_after_its_test():
            try:
                requests.get(seen[0] + "/track", timeout=2)
            except requests.ConnectionError:
                return
            raise AssertionError("still listening")

        def test_messages(mixpanel_messages, mixpanel_server):
            with Tracker("T", Consumer(api_host=mixpanel_server.url)) as tracker:
                tracker.track("u1", "Captured")
                tracker.people.set("u1", {"a": 1})
            assert [m.kind for m in mixpanel_messages] == ["event", "profile_update"]
            assert mixpanel_messages.events("Captured")[0]["properties"]["distinct_id"] == "u1"
            assert mixpanel_server.requests == []  # captured, never sent
        """,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


@pytest.mark.subprocess
def test_the_suites_guard_fails_a_test_whose_requests_break_the_spec(tmp_path: Path) -> None:
    result = run_inner_pytest(
        tmp_path,
        """
        import pytest, requests
        from mp_logbridge.testing import MixpanelServer

        def bad(server):
            requests.post(server.url + "/track", params={"verbose": "yes"}, json=[{"event": "E", "properties": {"token": "t"}}], timeout=5)

        def test_unmarked():
            with MixpanelServer() as server:
                bad(server)

        @pytest.mark.allow_spec_violations
        def test_marked():
            with MixpanelServer() as server:
                bad(server)

        @pytest.mark.allow_spec_violations("query.verbose")
        def test_marked_for_that_rule():
            with MixpanelServer() as server:
                bad(server)

        @pytest.mark.allow_spec_violations("record.")
        def test_marked_for_another_rule():
            with MixpanelServer() as server:
                bad(server)

        def test_clean(mixpanel_server):
            requests.post(mixpanel_server.url + "/track", json=[{"event": "E", "properties": {"token": "t"}}], timeout=5)
        """,
        "-p",
        "conftest",
    )
    assert "5 passed, 2 errors" in result.stdout, result.stdout + result.stderr
    assert "ERROR at teardown of test_unmarked" in result.stdout
    assert "ERROR at teardown of test_marked_for_another_rule" in result.stdout
    assert "POST /track: [query.verbose] 'verbose' must be one of 0, 1, got 'yes'" in result.stdout


def test_a_failed_delivery_to_a_stopped_server_is_a_connection_error() -> None:
    with MixpanelServer() as srv:
        url = srv.url
    with Consumer(api_host=url) as consumer, pytest.raises(MixpanelConnectionError):
        consumer.send("event", event())

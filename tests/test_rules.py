"""The ingestion API's rules in ``mp_logbridge._rules``, one by one, without HTTP.

Each rule accepts what the spec (or, where it is wrong, Mixpanel's documentation and the
official SDKs) accepts and refuses what it refuses. The receiver's HTTP behaviour is in
``test_receiver.py``.
"""

from __future__ import annotations

import base64
import gzip
import json
import time
import zlib
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mp_logbridge import _rules as rules
from mp_logbridge._rules import (
    ENDPOINTS,
    MAX_REQUEST_BYTES,
    Access,
    Refusal,
    check_access,
    check_event,
    check_params,
    check_record,
    check_update,
    decode_records,
    endpoint_for,
    is_silent_drop,
    too_large,
)

NOW = time.time()
NOW_MS = int(NOW * 1000)
TOKEN = "rules-token"
TRACK, ENGAGE, GROUPS, IMPORT = (ENDPOINTS[p] for p in ("/track", "/engage", "/groups", "/import"))


def refusal(call: Any, *args: Any, **kwargs: Any) -> Refusal:
    with pytest.raises(Refusal) as info:
        call(*args, **kwargs)
    return info.value


def event(**props: Any) -> dict[str, Any]:
    base = {"token": TOKEN, "distinct_id": "u1", "time": NOW_MS, "$insert_id": "abc-123"}
    return {"event": "Signed Up", "properties": {**base, **props}}


def without(record: dict[str, Any], key: str) -> dict[str, Any]:
    props = dict(record["properties"])
    del props[key]
    return {**record, "properties": props}


# --------------------------------------------------------------------------- paths and methods


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/track", "/track"),
        ("GET", "/track", "/track"),  # the pixel / redirect form
        ("POST", "/track/", "/track"),  # the Ruby SDK's pixel URL has the slash
        ("POST", "/engage", "/engage"),
        ("GET", "/engage", "/engage"),
        ("POST", "/groups", "/groups"),
        ("POST", "/import", "/import"),
    ],
)
def test_endpoints_take_their_methods(method: str, path: str, expected: str) -> None:
    assert endpoint_for(method, path).path == expected


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/import", 405),  # the spec has POST only
        ("PUT", "/track", 405),
        ("DELETE", "/engage", 405),
        ("POST", "/decide", 404),
        ("POST", "/", 404),
        ("POST", "/track/extra", 404),
        ("POST", "/TRACK", 404),
    ],
)
def test_other_methods_and_paths_are_refused(method: str, path: str, status: int) -> None:
    found = refusal(endpoint_for, method, path)
    assert found.status == status
    assert found.violation


# --------------------------------------------------------------------------- query parameters

ACCEPTED_PARAMS = [
    (TRACK, {"verbose": "1", "ip": "0"}),  # what this library sends
    (TRACK, {"verbose": "0", "ip": "1", "img": "1", "callback": "cb"}),
    (TRACK, {}),
    (ENGAGE, {"verbose": "1", "ip": "0", "strict": "1", "callback": "f"}),
    (GROUPS, {"verbose": "1", "ip": "0", "strict": "0"}),
    (IMPORT, {"strict": "1", "project_id": "12345"}),
    (IMPORT, {"strict": "0"}),
    (IMPORT, {}),  # spec: `strict` is "required", but it has a default and no SDK sends it
    # spec: none of these is listed for /import; the official SDKs send them
    (IMPORT, {"verbose": "1", "ip": "0", "api_key": "legacy-key"}),
]


@pytest.mark.parametrize(("endpoint", "params"), ACCEPTED_PARAMS)
def test_parameters_the_spec_or_the_sdks_use_are_accepted(
    endpoint: rules.Endpoint, params: dict[str, str]
) -> None:
    check_params(endpoint, params)


REFUSED_PARAMS = [
    (TRACK, {"verbose": "true"}, "query.verbose"),
    (TRACK, {"verbose": "2"}, "query.verbose"),
    (TRACK, {"ip": ""}, "query.ip"),
    (TRACK, {"ip": " 0"}, "query.ip"),
    (TRACK, {"strict": "1"}, "query.strict"),  # /track has no strict mode
    (TRACK, {"project_id": "1"}, "query.project_id"),
    (TRACK, {"callback": ""}, "query.callback"),
    (ENGAGE, {"img": "1"}, "query.img"),
    (GROUPS, {"callback": "cb"}, "query.callback"),  # not listed for any group operation
    (IMPORT, {"strict": "yes"}, "query.strict"),
    (IMPORT, {"project_id": ""}, "query.project_id"),
    (IMPORT, {"img": "1"}, "query.img"),
    (IMPORT, {"callback": "f"}, "query.callback"),
]


@pytest.mark.parametrize(("endpoint", "params", "rule"), REFUSED_PARAMS)
def test_other_parameters_and_values_are_refused(
    endpoint: rules.Endpoint, params: dict[str, str], rule: str
) -> None:
    found = refusal(check_params, endpoint, params)
    assert (found.status, found.rule, found.violation) == (400, rule, True)


@given(st.text(max_size=8))
def test_binary_parameters_take_exactly_0_or_1(value: str) -> None:
    if value in ("0", "1"):
        check_params(TRACK, {"verbose": value})
    else:
        assert refusal(check_params, TRACK, {"verbose": value}).rule == "query.verbose"


# --------------------------------------------------------------------------- bodies


def decode(
    endpoint: rules.Endpoint,
    body: bytes,
    content_type: str | None = "application/json",
    *,
    method: str = "POST",
    query: dict[str, str] | None = None,
    encoding: str | None = None,
    limit: int = MAX_REQUEST_BYTES,
) -> rules.Decoded:
    headers = {} if content_type is None else {"Content-Type": content_type}
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    return decode_records(endpoint, method, query or {}, headers, body, max_request_bytes=limit)


def test_a_json_array_body_is_read() -> None:
    records = [event(), event(distinct_id="u2")]
    decoded = decode(TRACK, json.dumps(records).encode())
    assert decoded.records == records
    assert not decoded.gzipped


def test_a_missing_content_type_is_the_specs_default_json() -> None:
    assert decode(IMPORT, json.dumps([event()]).encode(), None).records == [event()]


def test_charset_utf8_is_fine_and_any_other_charset_is_refused() -> None:
    body = json.dumps([event()]).encode()
    assert decode(TRACK, body, "application/json; charset=UTF-8").records == [event()]
    found = refusal(decode, TRACK, body, "application/json; charset=latin-1")
    assert (found.status, found.rule) == (415, "content-type")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"event": "E", "properties": {}}', "must be a JSON array"),  # spec: type array
        (b"[]", "array is empty"),  # spec: minItems 1
        (b"[{]", "invalid JSON"),
        (b"", "invalid JSON"),
        (b'[{"event": "E", "properties": {"x": NaN}}]', "NaN is not valid JSON"),
        (b'[{"event": "E", "properties": {"x": Infinity}}]', "Infinity is not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),  # deeper than any parser's stack
    ],
)
def test_json_bodies_that_are_not_arrays_of_records_are_refused(body: bytes, why: str) -> None:
    found = refusal(decode, TRACK, body)
    assert (found.status, found.rule) == (400, "body.json")
    assert why in found.message


def test_ndjson_is_for_import_only() -> None:
    lines = b"\n".join(json.dumps(event(distinct_id=f"u{i}")).encode() for i in range(3)) + b"\n\n"
    assert len(decode(IMPORT, lines, "application/x-ndjson").records) == 3
    for endpoint in (TRACK, ENGAGE, GROUPS):
        found = refusal(decode, endpoint, lines, "application/x-ndjson")
        assert (found.status, found.rule) == (415, "content-type")
    assert refusal(decode, IMPORT, b'{"a":1}\n{oops}\n', "application/x-ndjson").status == 400
    assert "no records" in refusal(decode, IMPORT, b"\n\n", "application/x-ndjson").message


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "multipart/form-data"])
def test_other_content_types_are_refused(content_type: str) -> None:
    found = refusal(decode, IMPORT, b"[]", content_type)
    assert (found.status, found.rule) == (415, "content-type")


FORM = "application/x-www-form-urlencoded"


@pytest.mark.parametrize("endpoint", [TRACK, ENGAGE, GROUPS, IMPORT])
def test_the_legacy_form_of_the_official_sdks_is_read_on_every_endpoint(
    endpoint: rules.Endpoint,
) -> None:
    record = {"event": "E", "properties": {"token": TOKEN, "ünï": "€"}}
    plain = urlencode({"data": json.dumps(record), "verbose": "1", "ip": "0"})  # Python SDK
    ruby = urlencode({"data": base64.b64encode(json.dumps([record]).encode()), "verbose": 1})
    decoded = decode(endpoint, plain.encode(), FORM)
    assert decoded.records == [record]  # a single object is one record in the form
    assert decoded.params == {"data": json.dumps(record), "verbose": "1", "ip": "0"}
    assert decode(endpoint, ruby.encode(), FORM).records == [record]


def test_base64_data_in_every_alphabet_and_unencoded_is_read() -> None:
    record = [{"event": "E?>", "properties": {"token": "~~~~", "k": ">>>?"}}]
    raw = json.dumps(record).encode()
    standard = base64.b64encode(raw).decode()
    assert "+" in standard or "/" in standard
    for data in (standard, base64.urlsafe_b64encode(raw).decode(), standard.rstrip("=")):
        assert decode(TRACK, urlencode({"data": data}).encode(), FORM).records == record
    # The Node SDK posts `data=<base64>` without URL-encoding: `+` arrives as a space.
    assert decode(TRACK, f"data={standard}".encode(), FORM).records == record


def test_a_get_carries_its_records_in_the_query() -> None:
    data = base64.urlsafe_b64encode(json.dumps(event()).encode()).decode()
    decoded = decode(TRACK, b"", None, method="GET", query={"data": data, "ip": "1", "img": "1"})
    assert decoded.records == [event()]
    found = refusal(decode, TRACK, b"[]", None, method="GET", query={"data": data})
    assert found.rule == "body"
    assert refusal(decode, TRACK, b"", None, method="GET").rule == "body.data"


@pytest.mark.parametrize(
    ("body", "rule"),
    [
        (b"verbose=1", "body.data"),
        (b"data=", "body.data"),
        (b"data=not-json-nor-base64!", "body.data"),
        (b"data=%5B%5D", "body.data"),  # an empty array
        (b"data=%ff%fe", "body.encoding"),  # percent-encoded bytes that are not UTF-8
    ],
)
def test_forms_without_usable_data_are_refused(body: bytes, rule: str) -> None:
    found = refusal(decode, TRACK, body, FORM)
    assert (found.status, found.rule) == (400, rule)


def test_data_belongs_to_the_form_and_a_field_may_not_contradict_the_query() -> None:
    body = json.dumps([event()]).encode()
    assert refusal(decode, TRACK, body, query={"data": "[]"}).rule == "query.data"
    form = urlencode({"data": json.dumps(event()), "verbose": "0"}).encode()
    assert refusal(decode, TRACK, form, FORM, query={"verbose": "1"}).rule == "query.verbose"
    same = decode(TRACK, form, FORM, query={"verbose": "0"})
    assert same.params["verbose"] == "0"


def test_gzip_is_read_where_the_api_allows_it_and_refused_elsewhere() -> None:
    body = json.dumps([event()]).encode()
    for endpoint in (TRACK, IMPORT):
        decoded = decode(endpoint, gzip.compress(body), encoding="gzip")
        assert decoded.gzipped and decoded.records == [event()] and decoded.body == body
    for endpoint in (ENGAGE, GROUPS):
        found = refusal(decode, endpoint, gzip.compress(body), encoding="gzip")
        assert (found.status, found.rule) == (400, "content-encoding")
    found = refusal(decode, TRACK, zlib.compress(body), encoding="deflate")
    assert (found.status, found.rule) == (415, "content-encoding")
    assert decode(TRACK, body, encoding="identity").records == [event()]


def test_gzip_members_are_joined_and_broken_gzip_is_refused() -> None:
    first, second = b'[{"event": "E", ', b'"properties": {}}]'
    joined = gzip.compress(first) + gzip.compress(second)
    assert decode(IMPORT, joined, encoding="gzip").body == first + second
    whole = gzip.compress(json.dumps([event()]).encode())
    bad_checksum = whole[:-8] + bytes(8)
    trailing_garbage = whole + b"garbage"
    for broken in (b"not gzip at all", whole[: len(whole) // 2], bad_checksum, trailing_garbage):
        found = refusal(decode, IMPORT, broken, encoding="gzip")
        assert (found.status, found.rule) == (400, "content-encoding")


def test_a_gzip_bomb_is_refused_without_being_inflated() -> None:
    bomb = gzip.compress(b"[" + b" " * (64 * 1024 * 1024) + b"]")
    assert len(bomb) < 100_000
    found = refusal(decode, IMPORT, bomb, encoding="gzip", limit=1_000_000)
    assert (found.status, found.rule) == (413, "size")


def test_size_over_the_documented_limit_is_a_violation_and_under_it_only_a_refusal() -> None:
    body = json.dumps([event(pad="p" * 5000)]).encode()
    small = refusal(decode, TRACK, body, limit=1000)
    assert (small.status, small.violation) == (413, False)  # the receiver's own lower limit
    assert small.message == "request exceeds max limit of 1000 bytes"
    assert too_large(1000, MAX_REQUEST_BYTES + 1).violation
    assert not too_large(1000, MAX_REQUEST_BYTES).violation
    assert too_large(MAX_REQUEST_BYTES).violation


def test_bodies_that_are_not_utf8_are_refused() -> None:
    found = refusal(decode, TRACK, '[{"event": "é"}]'.encode("latin-1"))
    assert (found.status, found.rule) == (400, "body.encoding")


def test_at_most_2000_records_a_request() -> None:
    record = json.dumps(event())
    assert len(decode(IMPORT, f"[{','.join([record] * 2000)}]".encode()).records) == 2000
    found = refusal(decode, IMPORT, f"[{','.join([record] * 2001)}]".encode())
    assert (found.status, found.rule) == (400, "records")


# --------------------------------------------------------------------------- credentials


def basic(user: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


SA = ("robot", "s3cret", "4242")
CONFIGURED = Access(service_account=SA, api_secret="project-secret", token=TOKEN)


@pytest.mark.parametrize(
    ("header", "params"),
    [
        (basic("robot", "s3cret"), {"project_id": "4242"}),
        (basic("project-secret", ""), {}),
        # spec: `project_id` is marked required, but it is checked against a service
        # account only; a project secret names its project itself.
        (basic("project-secret", ""), {"project_id": "4242"}),
        (basic(TOKEN, ""), {}),  # the docs let the project token authenticate
    ],
)
def test_import_takes_a_service_account_a_project_secret_or_the_token(
    header: str, params: dict[str, str]
) -> None:
    check_access(IMPORT, header, params, CONFIGURED)


@pytest.mark.parametrize(
    ("header", "params", "violation"),
    [
        (None, {}, True),
        ("", {}, True),
        ("Token abc", {}, True),
        ("Basic !!!not-base64!!!", {}, True),
        ("Basic " + base64.b64encode(b"no-colon").decode(), {}, True),
        (basic("robot", "s3cret"), {}, True),  # a service account needs project_id
        (basic("robot", "wrong"), {"project_id": "4242"}, False),
        (basic("robot", "s3cret"), {"project_id": "1"}, False),  # another project's
        (basic("project-secret", "x"), {}, False),
        (basic("other-secret", ""), {}, False),
        ("Bearer oauth-token", {}, False),  # OAuth is not what this receiver was given
        (basic("röbot", "s3crét"), {"project_id": "4242"}, False),  # not ASCII: still compared
    ],
)
def test_import_refuses_missing_malformed_and_wrong_credentials_with_401(
    header: str | None, params: dict[str, str], violation: bool
) -> None:
    found = refusal(check_access, IMPORT, header, params, CONFIGURED)
    assert found.status == 401
    assert found.violation is violation  # wrong credentials break no rule of the spec
    assert "s3cret" not in found.message and "project-secret" not in found.message


def test_a_receiver_given_no_credentials_takes_any_basic_or_bearer() -> None:
    open_access = Access()
    check_access(IMPORT, basic("anyone", "anything"), {}, open_access)
    check_access(IMPORT, "Bearer t", {}, open_access)
    assert refusal(check_access, IMPORT, None, {}, open_access).violation


@pytest.mark.parametrize("endpoint", [TRACK, ENGAGE, GROUPS])
def test_credentials_never_go_to_the_token_endpoints(endpoint: rules.Endpoint) -> None:
    check_access(endpoint, None, {}, CONFIGURED)
    found = refusal(check_access, endpoint, basic("project-secret", ""), {}, CONFIGURED)
    assert (found.status, found.rule, found.violation) == (400, "auth", True)


# --------------------------------------------------------------------------- events

ACCEPTED_EVENTS = [
    ("/track", event()),
    ("/track", event(time=int(NOW))),  # seconds
    ("/track", event(time=NOW)),  # spec: integer; the Python SDK sends float seconds
    ("/track", event(distinct_id=12345)),  # spec: string; the SDKs send integer ids as is
    ("/track", event(distinct_id="")),  # the docs' advice for events without a user
    ("/track", without(event(), "time")),  # the server stamps it
    ("/track", without(without(event(), "$insert_id"), "distinct_id")),
    ("/track", event(time=NOW_MS + 3_000_000)),  # within the hour: overwritten, not refused
    ("/track", event(nested={"a": {"b": {"c": 1}}}, items=list(range(254)))),
    ("/track", event(**{f"p{i}": i for i in range(250)})),  # 254 properties
    ("/track", event(**{"$insert_id": "0" * 36})),
    (
        "/track",
        {
            "event": "$create_alias",
            "properties": {"distinct_id": "a", "alias": "b", "token": TOKEN},
        },
    ),
    ("/import", event(time=1_600_000_000)),
    ("/import", event(time=31_536_001)),  # 1971-01-01 and a second
    ("/import", without(event(), "token")),  # /import authenticates by credentials
    ("/import", {"event": "$merge", "properties": {"$distinct_ids": ["a", 2]}}),
]


@pytest.mark.parametrize(("endpoint", "record"), ACCEPTED_EVENTS)
def test_events_the_api_takes(endpoint: str, record: dict[str, Any]) -> None:
    assert check_event(record, endpoint, now=NOW) is None
    assert check_record(endpoint, record, now=NOW) is None


REFUSED_EVENTS = [
    ("/track", [event()], ""),
    ("/track", {**event(), "ip": 0}, ""),  # spec: additionalProperties false
    ("/track", {"properties": {"token": TOKEN}}, "event"),
    ("/track", {**event(), "event": ""}, "event"),
    ("/track", {**event(), "event": 7}, "event"),
    ("/track", {"event": "E"}, "properties"),
    ("/track", {"event": "E", "properties": []}, "properties"),
    ("/track", without(event(), "token"), "properties.token"),
    ("/track", event(token=""), "properties.token"),
    ("/track", event(token=5), "properties.token"),
    ("/track", event(time="2024-01-01"), "properties.time"),
    ("/track", event(time=True), "properties.time"),
    ("/track", event(time=NOW_MS + 4_000_000), "properties.time"),  # over 1 hour ahead
    ("/track", event(time=NOW - 6 * 86_400), "properties.time"),  # /track: 5 days back only
    ("/track", event(distinct_id=1.5), "properties.distinct_id"),
    ("/track", event(distinct_id=None), "properties.distinct_id"),
    ("/track", event(distinct_id=True), "properties.distinct_id"),
    ("/track", event(distinct_id="Anonymous"), "properties.distinct_id"),
    ("/track", event(distinct_id="00000000-0000-0000-0000-000000000000"), "properties.distinct_id"),
    ("/track", event(distinct_id=0), "properties.distinct_id"),
    ("/track", event(distinct_id=-1), "properties.distinct_id"),
    ("/track", event(**{"$insert_id": ""}), "properties.$insert_id"),
    ("/track", event(**{"$insert_id": "a" * 37}), "properties.$insert_id"),
    ("/track", event(**{"$insert_id": "has space"}), "properties.$insert_id"),
    ("/track", event(**{"$insert_id": "undefined"}), "properties.$insert_id"),
    ("/track", event(**{"$insert_id": 123}), "properties.$insert_id"),
    ("/track", event(**{f"p{i}": i for i in range(251)}), "properties"),  # 255 properties
    ("/track", event(deep={"a": {"b": {"c": {"d": 1}}}}), "properties.deep"),
    ("/track", event(wide={f"k{i}": i for i in range(255)}), "properties.wide"),
    ("/track", event(long=list(range(255))), "properties.long"),
    ("/track", event(deep_in_list=[{"a": {"b": {"c": {}}}}]), "properties.deep_in_list"),
    ("/track", event(pad="p" * 1_000_000), ""),
    (
        "/track",
        {"event": "$create_alias", "properties": {"distinct_id": "a", "token": TOKEN}},
        "properties.alias",
    ),
    # $merge belongs to /import: on /track it is an event like any other, and needs a token
    (
        "/track",
        {"event": "$merge", "properties": {"$distinct_ids": ["a", "b"]}},
        "properties.token",
    ),
    ("/import", without(event(), "time"), "properties.time"),
    ("/import", without(event(), "distinct_id"), "properties.distinct_id"),
    ("/import", without(event(), "$insert_id"), "properties.$insert_id"),
    ("/import", event(time=1000), "properties.time"),  # before 1971
    ("/import", event(time=NOW_MS + 4_000_000), "properties.time"),
    (
        "/import",
        {"event": "$merge", "properties": {"$distinct_ids": ["a"]}},
        "properties.$distinct_ids",
    ),
    (
        "/import",
        {"event": "$merge", "properties": {"$distinct_ids": ["a", ""]}},
        "properties.$distinct_ids",
    ),
]


@pytest.mark.parametrize(("endpoint", "record", "field"), REFUSED_EVENTS)
def test_events_the_api_refuses(endpoint: str, record: Any, field: str) -> None:
    problem = check_event(record, endpoint, now=NOW)
    assert problem is not None
    assert problem[0] == field
    assert check_record(endpoint, record, now=NOW) == problem


def test_only_track_drops_old_events_silently() -> None:
    old = event(time=NOW - 6 * 86_400)
    problem = check_event(old, "/track", now=NOW)
    assert is_silent_drop(problem)
    assert check_event(old, "/import", now=NOW) is None  # /import takes any time after 1971
    assert not is_silent_drop(check_event(event(time=1000), "/import", now=NOW))
    assert not is_silent_drop(None)


#: The placeholder ids Mixpanel refuses, as its import docs list them.
PLACEHOLDERS = [
    "00000000-0000-0000-0000-000000000000",
    "anon",
    "anonymous",
    "nil",
    "none",
    "null",
    "n/a",
    "na",
    "undefined",
    "unknown",
    "<nil>",
    "0",
    "-1",
    "true",
    "false",
    "[]",
    "{}",
]


names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)
ids = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"),
    min_size=4,
    max_size=36,
).filter(lambda value: value.lower() not in PLACEHOLDERS)
scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | names
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(names, inner, max_size=5),
    max_leaves=10,
)


def object_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(object_depth, value.values()), default=0)
    if isinstance(value, list):
        return max(map(object_depth, value), default=0)
    return 0


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    props = draw(
        st.dictionaries(
            names.filter(lambda k: k not in ("time", "token", "distinct_id", "$insert_id")),
            values.filter(lambda v: object_depth(v) <= 3),
            max_size=10,
        )
    )
    props.update(
        token=TOKEN,
        distinct_id=draw(ids),
        time=draw(st.integers(int(NOW) - 86_400, int(NOW))) * draw(st.sampled_from([1, 1000])),
        **{"$insert_id": draw(ids)},
    )
    return {"event": draw(names), "properties": props}


@settings(max_examples=150)
@given(record=valid_events(), endpoint=st.sampled_from(["/track", "/import"]))
def test_every_well_formed_event_is_accepted(record: dict[str, Any], endpoint: str) -> None:
    assert check_event(record, endpoint, now=NOW) is None


@settings(max_examples=150)
@given(
    record=valid_events(),
    missing=st.sampled_from(["time", "distinct_id", "$insert_id"]),
)
def test_import_refuses_any_event_missing_a_required_property(
    record: dict[str, Any], missing: str
) -> None:
    problem = check_event(without(record, missing), "/import", now=NOW)
    assert problem == (f"properties.{missing}", f"'properties.{missing}' is required")


@given(st.text(max_size=40) | st.sampled_from(PLACEHOLDERS) | st.sampled_from(["NULL", "Anon"]))
def test_insert_ids_are_1_to_36_letters_digits_or_dashes_and_not_placeholders(value: str) -> None:
    allowed = (
        0 < len(value) <= 36
        and all(c.isascii() and (c.isalnum() or c == "-") for c in value)
        and value.lower() not in PLACEHOLDERS
    )
    problem = check_event(event(**{"$insert_id": value}), "/track", now=NOW)
    assert (problem is None) is allowed


@given(record=valid_events(), key=st.sampled_from(["ip", "$insert_id", "distinct_id", "data"]))
def test_events_take_only_event_and_properties_at_the_top(record: dict[str, Any], key: str) -> None:
    assert check_event({**record, key: 0}, "/track", now=NOW) is not None


# --------------------------------------------------------------------------- profile and group updates


def profile(op: str, value: Any, **extra: Any) -> dict[str, Any]:
    return {"$token": TOKEN, "$distinct_id": "u1", "$time": NOW_MS, op: value, **extra}


def group_update(op: str, value: Any, **extra: Any) -> dict[str, Any]:
    return {"$token": TOKEN, "$group_key": "Company", "$group_id": "Acme", op: value, **extra}


PROFILE_ACCEPTED = [
    profile("$set", {"plan": "pro", "nested": {"a": [1, 2]}}),
    profile("$set", {}),
    profile("$set_once", {"first": "yes"}),
    profile("$add", {"logins": 1, "balance": -2.5}),
    profile("$append", {"$transactions": {"$amount": 9.99, "$time": "2024-01-01T00:00:00"}}),
    profile("$union", {"tags": ["a", 1, 2.5]}),
    profile("$remove", {"tags": "a"}),
    profile("$unset", ["a", "b"]),
    profile("$delete", ""),  # what both SDKs send
    profile("$delete", None),  # the spec's nullable string
    profile("$delete", "", **{"$ignore_alias": True}),
    profile("$set", {"a": 1}, **{"$ip": 0, "$ignore_time": True}),
    profile("$set", {"a": 1}, **{"$ip": "1.2.3.4", "$time": NOW}),  # float seconds (Python SDK)
    {**profile("$set", {"a": 1}), "$distinct_id": 42},
]


@pytest.mark.parametrize("record", PROFILE_ACCEPTED)
def test_profile_updates_the_api_takes(record: dict[str, Any]) -> None:
    assert check_update(record, group=False) is None
    assert check_record("/engage", record) is None


PROFILE_REFUSED = [
    ({**profile("$set", {}), "$token": ""}, "$token"),
    ({k: v for k, v in profile("$set", {}).items() if k != "$token"}, "$token"),
    ({k: v for k, v in profile("$set", {}).items() if k != "$distinct_id"}, "$distinct_id"),
    ({**profile("$set", {}), "$distinct_id": ""}, "$distinct_id"),
    ({**profile("$set", {}), "$distinct_id": 1.5}, "$distinct_id"),
    ({"$token": TOKEN, "$distinct_id": "u1"}, ""),  # no operation
    ({**profile("$set", {}), "$add": {"a": 1}}, ""),  # two operations
    (profile("$set", ["a"]), "$set"),
    (profile("$set_once", "x"), "$set_once"),
    (profile("$add", {"a": "1"}), "$add"),
    (profile("$add", {"a": True}), "$add"),
    (profile("$append", []), "$append"),
    (profile("$union", {}), "$union"),  # spec: minProperties 1
    (profile("$union", {"tags": []}), "$union"),  # spec: minItems 1
    (profile("$union", {"tags": "a"}), "$union"),
    (profile("$union", {"tags": [True]}), "$union"),  # items: number or string
    (profile("$union", {"tags": [{"a": 1}]}), "$union"),
    (profile("$remove", ["a"]), "$remove"),
    (profile("$unset", []), "$unset"),
    (profile("$unset", "a"), "$unset"),
    (profile("$unset", ["a", 1]), "$unset"),
    (profile("$delete", True), "$delete"),
    (profile("$delete", "", **{"$ignore_alias": "yes"}), "$ignore_alias"),
    (profile("$set", {}, **{"$time": "now"}), "$time"),
    (profile("$set", {}, **{"$ip": 1.5}), "$ip"),
    (profile("$set", {"pad": "p" * 1_000_000}), ""),
    ([profile("$set", {})], ""),
]


@pytest.mark.parametrize(("record", "field"), PROFILE_REFUSED)
def test_profile_updates_the_api_refuses(record: Any, field: str) -> None:
    problem = check_update(record, group=False)
    assert problem is not None and problem[0] == field


GROUP_ACCEPTED = [
    group_update("$set", {"plan": "pro"}),
    group_update("$set_once", {"first": "yes"}),
    group_update("$remove", {"tags": "a"}),
    group_update("$unset", ["a"]),
    # spec: group-union's `required` names $unset, not $union; the SDKs send $union alone
    group_update("$union", {"tags": ["a"]}),
    # spec: delete-group's `required` names $set, not $delete; the SDKs send $delete alone
    group_update("$delete", ""),
    {**group_update("$set", {}), "$group_id": 42},
]


@pytest.mark.parametrize("record", GROUP_ACCEPTED)
def test_group_updates_the_api_takes(record: dict[str, Any]) -> None:
    assert check_update(record, group=True) is None
    assert check_record("/groups", record) is None


GROUP_REFUSED = [
    (group_update("$add", {"n": 1}), "$add"),  # no group $add, whatever the batch text says
    (group_update("$append", {"n": 1}), "$append"),
    ({**group_update("$set", {}), "$group_key": ""}, "$group_key"),
    ({**group_update("$set", {}), "$group_key": 5}, "$group_key"),
    ({k: v for k, v in group_update("$set", {}).items() if k != "$group_id"}, "$group_id"),
    ({**group_update("$set", {}), "$group_id": ""}, "$group_id"),
    (group_update("$union", {"tags": []}), "$union"),
    (group_update("$unset", []), "$unset"),
]


@pytest.mark.parametrize(("record", "field"), GROUP_REFUSED)
def test_group_updates_the_api_refuses(record: Any, field: str) -> None:
    problem = check_update(record, group=True)
    assert problem is not None and problem[0] == field


def test_a_profile_update_is_not_a_group_update_and_back() -> None:
    assert check_update(profile("$set", {}), group=True) is not None
    assert check_update(group_update("$set", {}), group=False) is not None


def test_check_record_names_its_endpoints() -> None:
    with pytest.raises(ValueError, match="unknown endpoint"):
        check_record("/decide", event())


# --------------------------------------------------------------------------- the library's records


def test_what_the_library_builds_passes_the_rules() -> None:
    """Every record shape the Tracker builds is one the API takes (the receiver tests show the
    same over HTTP; this is the rule-level view, with no server in between)."""
    from mp_logbridge import Tracker
    from mp_logbridge.testing import capture_messages

    with capture_messages() as captured:
        tracker = Tracker(TOKEN, lambda kind, message: None)
        tracker.track("u1", "Signed Up", {"plan": "pro", "nested": {"a": {"b": 1}}})
        tracker.alias("new", "old")
        for call in (
            lambda p: p.set("u1", {"a": 1}, 0, {"$ignore_time": True}),
            lambda p: p.set_once("u1", {"a": 1}),
            lambda p: p.increment("u1", {"n": 1}),
            lambda p: p.append("u1", {"l": "x"}),
            lambda p: p.union("u1", {"l": ["x"]}),
            lambda p: p.remove("u1", {"l": "x"}),
            lambda p: p.unset("u1", ["a"]),
            lambda p: p.delete_user("u1"),
            lambda p: p.track_charge("u1", 9.5),
            lambda p: p.clear_charges("u1"),
        ):
            call(tracker.people)
        for call in (
            lambda g: g.set("Company", "Acme", {"a": 1}),
            lambda g: g.set_once("Company", "Acme", {"a": 1}),
            lambda g: g.union("Company", "Acme", {"l": ["x"]}),
            lambda g: g.remove("Company", "Acme", {"l": "x"}),
            lambda g: g.unset("Company", "Acme", ["a"]),
            lambda g: g.delete_group("Company", "Acme"),
        ):
            call(tracker.groups)
    paths = {"event": "/track", "profile_update": "/engage", "group_update": "/groups"}
    assert len(captured.messages) == 18
    for message in captured.messages:
        assert check_record(paths[message.kind], message.record) is None, message

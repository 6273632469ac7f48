"""What Mixpanel's ingestion API accepts, request by request and record by record.

The rules of the published ingestion spec (methods, query parameters and their values, content
types and encodings, authentication, record fields and types per endpoint and operation) and
of Mixpanel's documentation (limits, time windows, the legacy ``data=`` form the official SDKs
send), written as Python. Where the spec contradicts the documentation or what the official
SDKs send, the documented behaviour wins; each such place is marked ``# spec:`` below and listed
in docs/wire.md ("Where the published spec is wrong").

The receiver in :mod:`mp_logbridge.testing` applies these rules to every request, and
``mp-logbridge import --dry-run`` applies the record rules to files before anything is sent.
They are the server's view, independent of how this library builds records.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl

from ._messages import BLOCKED_DISTINCT_IDS, as_seconds

__all__ = [
    "ENDPOINTS",
    "MAX_RECORDS_PER_REQUEST",
    "MAX_REQUEST_BYTES",
    "Access",
    "Decoded",
    "Endpoint",
    "Refusal",
    "SpecViolation",
    "check_access",
    "check_event",
    "check_params",
    "check_record",
    "check_update",
    "decode_records",
    "endpoint_for",
    "is_silent_drop",
    "too_large",
]

# --------------------------------------------------------------------------- limits (documented)

MAX_RECORDS_PER_REQUEST = 2000
#: The request size the spec's 413 answer names (the docs also say 10 MB for /import; the
#: smaller figure is the one a client can rely on).
MAX_REQUEST_BYTES = 2_097_152
_MAX_RECORD_BYTES = 1_000_000  # each event and each update is under 1 MB of JSON
_MAX_PROPERTIES = 255  # an event has fewer than 255 properties
_MAX_NESTED_KEYS = 255  # a nested object has fewer than 255 keys
_MAX_LIST_ITEMS = 255  # a list property has fewer than 255 items
_MAX_NESTING = 3  # objects nest at most 3 deep inside a property
_EARLIEST = 31_536_000  # 1971-01-01, in seconds: /import takes any time after it
_TRACK_WINDOW = 5 * 86_400  # /track takes the last 5 days only
_FUTURE_SLACK = 3_600  # no event more than 1 hour in the future
_INSERT_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
#: ``distinct_id`` values Mixpanel refuses (compared case-insensitively).
_BLOCKED_IDS = BLOCKED_DISTINCT_IDS
_PROFILE_OPS = ("$set", "$set_once", "$add", "$append", "$union", "$remove", "$unset", "$delete")
# spec: the group batch text also names $add, but no group operation, no official SDK and no
# group page offers it; the operations with a page of their own are these.
_GROUP_OPS = ("$set", "$set_once", "$union", "$remove", "$unset", "$delete")


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class SpecViolation:
    """One way a request broke the ingestion API's rules.

    ``rule`` names the rule (``"query.verbose"``, ``"content-encoding"``, ``"auth"``,
    ``"record.$union"``, ...); ``index`` is the record's position in the request for record
    rules, ``None`` for rules about the request itself.
    """

    method: str
    path: str
    rule: str
    message: str
    index: int | None = None

    def __str__(self) -> str:
        where = f" record {self.index}" if self.index is not None else ""
        return f"{self.method} {self.path}{where}: [{self.rule}] {self.message}"


class Refusal(Exception):
    """A request refused as a whole: the HTTP status Mixpanel answers, and the broken rule.

    ``violation`` is false when the request is well formed but not for this project (wrong
    credentials): refused, yet no breach of the spec.
    """

    def __init__(self, status: int, rule: str, message: str, *, violation: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.rule = rule
        self.message = message
        self.violation = violation


# --------------------------------------------------------------------------- endpoints

_BINARY = frozenset({"0", "1"})  # the spec's `integer, minimum 0, maximum 1`
_ANY = None  # any non-empty text


@dataclass(frozen=True)
class Endpoint:
    """What one ingestion path accepts.

    ``params`` maps each parameter allowed in the query string (or, for the legacy form, in
    the form body) to its allowed values (``None``: any text). The spec writes one operation
    per profile/group operator under one URL; a URL cannot tell them apart, so an endpoint
    allows the parameters of any of its operations.
    """

    path: str
    methods: frozenset[str]
    params: Mapping[str, frozenset[str] | None]
    content_types: frozenset[str]
    gzip: bool
    kind: str  # "event", "profile_update", "group_update" or "import"

    @property
    def authenticated(self) -> bool:
        """Whether requests carry credentials (only ``/import``)."""
        return self.kind == "import"


_JSON, _NDJSON, _FORM = (
    "application/json",
    "application/x-ndjson",
    "application/x-www-form-urlencoded",
)

ENDPOINTS: Mapping[str, Endpoint] = MappingProxyType(
    {
        "/track": Endpoint(
            "/track",
            # GET carries `data=` in the query: the documented pixel/redirect form.
            frozenset({"POST", "GET"}),
            MappingProxyType(
                {"ip": _BINARY, "verbose": _BINARY, "img": _BINARY, "callback": _ANY, "data": _ANY}
            ),
            # spec: only a JSON body; the docs and every official SDK send the `data=` form.
            frozenset({_JSON, _FORM}),
            # spec: no Content-Encoding on /track; the /track docs say "Gzip allowed".
            True,
            "event",
        ),
        "/engage": Endpoint(
            "/engage",
            frozenset({"POST", "GET"}),
            MappingProxyType(
                {
                    "ip": _BINARY,
                    "strict": _BINARY,
                    "verbose": _BINARY,
                    "callback": _ANY,
                    "data": _ANY,
                }
            ),
            frozenset({_JSON, _FORM}),
            False,  # "This API does not support gzip encoding."
            "profile_update",
        ),
        "/groups": Endpoint(
            "/groups",
            frozenset({"POST", "GET"}),
            MappingProxyType({"ip": _BINARY, "strict": _BINARY, "verbose": _BINARY, "data": _ANY}),
            # spec: group-batch-update says "application/x-www-form-urlencoded" in its text.
            frozenset({_JSON, _FORM}),
            False,  # documented for /engage; nothing says /groups differs
            "group_update",
        ),
        "/import": Endpoint(
            "/import",
            frozenset({"POST"}),
            MappingProxyType(
                {
                    "strict": _BINARY,
                    "project_id": _ANY,
                    # spec: not listed for /import, but the official Python SDK sends `verbose=1`
                    # and `ip=0` and, with a project secret, `api_key` (Ruby: `verbose`,
                    # `api_key`); the Go SDK sends `verbose=1`.
                    "verbose": _BINARY,
                    "ip": _BINARY,
                    "api_key": _ANY,
                    "data": _ANY,
                }
            ),
            # spec: JSON or NDJSON only; the official Python and Ruby SDKs import with the form.
            frozenset({_JSON, _NDJSON, _FORM}),
            True,
            "import",
        ),
    }
)


def endpoint_for(method: str, path: str) -> Endpoint:
    """The endpoint of a request path (a trailing ``/`` is allowed, as the Ruby SDK's pixel URL
    has one); raises :class:`Refusal` 404 or 405."""
    endpoint = ENDPOINTS.get(path.rstrip("/") or "/")
    if endpoint is None:
        raise Refusal(404, "path", f"unknown endpoint {path!r}")
    if method not in endpoint.methods:
        allowed = ", ".join(sorted(endpoint.methods))
        raise Refusal(
            405, "method", f"{method} is not allowed on {endpoint.path} (allowed: {allowed})"
        )
    return endpoint


def check_params(endpoint: Endpoint, params: Mapping[str, str]) -> None:
    """Refuse (400) a parameter the endpoint does not take or a value it does not allow."""
    for name, value in params.items():
        if name not in endpoint.params:
            allowed = ", ".join(sorted(endpoint.params))
            raise Refusal(
                400,
                f"query.{name}",
                f"{endpoint.path} takes no parameter {name!r} (it takes {allowed})",
            )
        values = endpoint.params[name]
        if values is None:
            if value == "":
                raise Refusal(400, f"query.{name}", f"{name!r} must not be empty")
        elif value not in values:
            raise Refusal(
                400,
                f"query.{name}",
                f"{name!r} must be one of {', '.join(sorted(values))}, got {value!r}",
            )


# --------------------------------------------------------------------------- bodies


def _strict_json(text: str | bytes) -> Any:
    """JSON as RFC 8259 has it: ``NaN`` and ``Infinity`` are not JSON."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    return json.loads(text, parse_constant=refuse)


def too_large(limit: int, size: int | None = None) -> Refusal:
    """The 413 for a body over ``limit`` bytes: a breach of the spec only when the body (of
    ``size`` bytes, when known) is over the documented limit too, not just a receiver's lower
    one."""
    over = limit >= MAX_REQUEST_BYTES if size is None else size > MAX_REQUEST_BYTES
    return Refusal(413, "size", f"request exceeds max limit of {limit} bytes", violation=over)


def _gunzip(raw: bytes, limit: int) -> bytes:
    """Decompress every gzip member of ``raw``; refuses (413) past ``limit`` bytes, so a small
    body cannot expand into a huge one here."""
    out: list[bytes] = []
    size = 0
    data = raw
    try:
        while True:
            inflater = zlib.decompressobj(wbits=31)
            chunk = inflater.decompress(data, limit + 1 - size)
            size += len(chunk)
            out.append(chunk)
            if size > limit or inflater.unconsumed_tail:
                raise too_large(limit)
            if not inflater.eof:
                raise Refusal(400, "content-encoding", "body is not valid gzip (truncated)")
            data = inflater.unused_data
            if not data:
                return b"".join(out)
    except zlib.error:
        raise Refusal(400, "content-encoding", "body is not valid gzip") from None


def _media_type(content_type: str) -> str:
    """The media type of a ``Content-Type``; refuses (415) a charset other than UTF-8."""
    media, _, rest = content_type.partition(";")
    for parameter in rest.split(";"):
        key, _, value = parameter.strip().partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            raise Refusal(415, "content-type", f"charset {value.strip()!r} is not UTF-8")
    return media.strip().lower()


def _decode_data(data: str) -> Any:
    """The ``data`` field of the legacy form: JSON, or base64 of JSON (the Ruby SDK and the
    pixel URL; standard or URL-safe alphabet)."""
    try:
        return _strict_json(data)
    except ValueError:
        pass
    try:
        # A `+` of standard base64 sent without URL-encoding arrives as a space.
        text = data.strip().replace(" ", "+")
        padded = text + "=" * (-len(text) % 4)
        raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
        return _strict_json(raw.decode("utf-8"))
    except (ValueError, binascii.Error):
        raise Refusal(400, "body.data", "'data' is neither JSON nor base64 JSON") from None


@dataclass
class Decoded:
    """A request body made into records: ``params`` (query and form fields), the ``records``,
    the decompressed ``body``, and whether it was gzipped."""

    params: dict[str, str]
    records: list[Any] = field(default_factory=list)
    body: bytes = b""
    gzipped: bool = False


def decode_records(
    endpoint: Endpoint,
    method: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    raw: bytes,
    *,
    max_request_bytes: int,
) -> Decoded:
    """Read a request's records as the API does, refusing what the spec does not allow: a
    content type or encoding the endpoint does not take, bad gzip, a body over the size limit,
    text that is not UTF-8 or not JSON, a JSON body that is not a non-empty array, more than
    2000 records."""
    lower = {key.lower(): value for key, value in headers.items()}
    decoded = Decoded(dict(query))
    body = raw
    encoding = lower.get("content-encoding", "").strip().lower()
    if encoding == "gzip":
        if not endpoint.gzip:
            raise Refusal(
                400, "content-encoding", f"{endpoint.path} does not support gzip encoding"
            )
        body = _gunzip(raw, max_request_bytes)
        decoded.gzipped = True
    elif encoding not in ("", "identity"):
        raise Refusal(
            415, "content-encoding", f"Content-Encoding {encoding!r} is not supported (only gzip)"
        )
    decoded.body = body
    if len(body) > max_request_bytes:
        raise too_large(max_request_bytes, len(body))
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refusal(
            400, "body.encoding", f"body is not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    media = _media_type(lower.get("content-type", ""))
    if method == "GET":
        if body:
            raise Refusal(400, "body", "a GET request carries its records in the 'data' parameter")
        payload: Any = _from_data(decoded.params)
    elif media == _FORM and _FORM in endpoint.content_types:
        try:
            fields = parse_qsl(text, keep_blank_values=True, errors="strict")
        except UnicodeDecodeError:
            raise Refusal(400, "body.encoding", "form fields are not UTF-8") from None
        for key, value in fields:
            if key in decoded.params and decoded.params[key] != value:
                raise Refusal(400, f"query.{key}", f"{key!r} is given twice with different values")
            decoded.params[key] = value
        payload = _from_data(decoded.params)
    elif media == _NDJSON and _NDJSON in endpoint.content_types:
        if "data" in decoded.params:
            raise Refusal(400, "query.data", "'data' goes with the form body, not with NDJSON")
        try:
            payload = [_strict_json(line) for line in text.splitlines() if line.strip()]
        except (ValueError, RecursionError) as exc:
            raise Refusal(400, "body.json", f"invalid NDJSON: {exc}") from None
        if not payload:
            raise Refusal(400, "body.json", "the body holds no records")
    elif media in ("", _JSON) and (_JSON in endpoint.content_types):
        # A missing Content-Type is the spec's default, application/json.
        if "data" in decoded.params:
            raise Refusal(400, "query.data", "'data' goes with the form body, not with a JSON body")
        try:
            payload = _strict_json(text)
        except (ValueError, RecursionError) as exc:
            raise Refusal(400, "body.json", f"invalid JSON: {exc}") from None
        if not isinstance(payload, list):
            raise Refusal(
                400,
                "body.json",
                f"the body must be a JSON array of records, got {type(payload).__name__}",
            )
        if not payload:
            raise Refusal(400, "body.json", "the body holds no records (the array is empty)")
    else:
        accepted = ", ".join(sorted(endpoint.content_types))
        raise Refusal(
            415,
            "content-type",
            f"{endpoint.path} takes {accepted}, not {media or 'no content type'!r}",
        )
    decoded.records = payload if isinstance(payload, list) else [payload]
    if len(decoded.records) > MAX_RECORDS_PER_REQUEST:
        raise Refusal(
            400,
            "records",
            f"a request may carry at most {MAX_RECORDS_PER_REQUEST} records, got {len(decoded.records)}",
        )
    return decoded


def _from_data(params: Mapping[str, str]) -> Any:
    data = params.get("data")
    if data is None or not data.strip():
        raise Refusal(400, "body.data", "no 'data' field in the request")
    records = _decode_data(data)
    if isinstance(records, list) and not records:
        raise Refusal(400, "body.data", "'data' holds no records (the array is empty)")
    return records


# --------------------------------------------------------------------------- authentication


@dataclass(frozen=True)
class Access:
    """The credentials a receiver accepts on ``/import``.

    With none configured, any Basic (or Bearer) credentials are accepted, as long as there are
    some. ``service_account`` is ``(username, secret, project_id)``; ``api_secret`` is a
    project secret (Basic ``secret:``); ``token`` also accepts the project token as Basic
    ``token:``, which the docs allow.
    """

    service_account: tuple[str, str, str] | None = None
    api_secret: str | None = None
    token: str | None = None

    @property
    def configured(self) -> bool:
        return self.service_account is not None or self.api_secret is not None


def _same(given: str, known: str) -> bool:
    """Compare a credential in constant time (any text: ``compare_digest`` takes ASCII only)."""
    return hmac.compare_digest(given.encode(), known.encode())


def check_access(
    endpoint: Endpoint, authorization: str | None, params: Mapping[str, str], access: Access
) -> None:
    """Refuse a request whose credentials the endpoint does not take: 401 on ``/import``
    without valid credentials; 400 for credentials sent anywhere else."""
    if not endpoint.authenticated:
        if authorization:
            # The spec asks for no credentials there; sending the import secret along with
            # every event is how it leaks, so this receiver refuses it.
            raise Refusal(400, "auth", f"credentials must not be sent to {endpoint.path}")
        return
    unauthorized = Refusal(401, "auth", "Invalid credentials", violation=False)
    malformed = Refusal(
        401, "auth", "Invalid credentials (a Basic or Bearer Authorization header is required)"
    )
    if not authorization:
        raise malformed
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        if not access.configured:
            return
        raise unauthorized
    if scheme.lower() != "basic":
        raise malformed
    try:
        user, colon, secret = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise malformed from None
    if not colon or not user:
        raise malformed
    project_id = params.get("project_id")
    if not access.configured:
        return
    if access.service_account is not None:
        name, key, project = access.service_account
        if _same(user, name) and _same(secret, key):
            if project_id is None:
                raise Refusal(
                    401,
                    "query.project_id",
                    "project_id is required with service account credentials",
                )
            if project_id != project:
                raise Refusal(
                    401,
                    "auth",
                    "Invalid credentials: project_id does not match the service account",
                    violation=False,
                )
            return
    # spec: project_id is marked required for every way to authenticate, but it is what a
    # service account is checked against; a project secret (or token) names its project
    # itself, and the official SDKs send no project_id with it.
    if secret == "":
        for known in (access.api_secret, access.token):
            if known is not None and _same(user, known):
                return
    raise unauthorized


# --------------------------------------------------------------------------- records


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(
        value
    )


def _id_ok(value: Any) -> bool:
    # spec: ids are `type: string`; both official SDKs send an integer id as a JSON number.
    return isinstance(value, str) or _is_int(value)


def _insert_id_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not 0 < len(value) <= 36 or not set(value) <= _INSERT_ID_CHARS:
        return "'$insert_id' must be 1-36 characters, letters, digits or '-'"
    if value.lower() in _BLOCKED_IDS:
        return f"'$insert_id' {value!r} is a value Mixpanel refuses"
    return None


def _time_problem(value: Any, now: float, endpoint: str) -> str | None:
    # spec: `time` is `type: integer`; the docs take seconds or milliseconds and the official
    # Python SDK sends float seconds.
    if not _is_number(value):
        return "must be a number of seconds or milliseconds since epoch"
    seconds = as_seconds(value)
    if seconds < _EARLIEST:
        return "must be after 1971-01-01"
    # spec: "set in the future, it will be overwritten with the current time"; the import
    # docs refuse events more than 1 hour in the future.
    if seconds > now + _FUTURE_SLACK:
        return "must not be more than 1 hour in the future"
    if endpoint == "/track" and seconds < now - _TRACK_WINDOW:
        return _TOO_OLD_FOR_TRACK
    return None


_TOO_OLD_FOR_TRACK = "is more than 5 days old; /track drops it silently (use /import)"


def is_silent_drop(problem: tuple[str, str] | None) -> bool:
    """Whether ``/track`` answers a record with this problem as well formed, and then drops it
    (an event more than 5 days old)."""
    return problem is not None and problem[1].endswith(_TOO_OLD_FOR_TRACK)


def _shape_problem(name: str, value: Any, depth: int = 0) -> str | None:
    """Nested objects: fewer than 255 keys, at most 3 deep; lists: fewer than 255 items."""
    if isinstance(value, dict):
        if depth >= _MAX_NESTING:
            return f"property {name!r} nests objects more than {_MAX_NESTING} deep"
        if len(value) >= _MAX_NESTED_KEYS:
            return f"property {name!r} is an object of {len(value)} keys (fewer than {_MAX_NESTED_KEYS})"
        for inner in value.values():
            problem = _shape_problem(name, inner, depth + 1)
            if problem:
                return problem
    elif isinstance(value, list):
        if len(value) >= _MAX_LIST_ITEMS:
            return (
                f"property {name!r} is a list of {len(value)} items (fewer than {_MAX_LIST_ITEMS})"
            )
        for inner in value:
            problem = _shape_problem(name, inner, depth)
            if problem:
                return problem
    return None


def _size(record: Any) -> int:
    return len(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode())


def check_event(
    record: Any, endpoint: str = "/track", *, now: float | None = None
) -> tuple[str, str] | None:
    """``(field, message)`` for the first problem of an event record sent to ``endpoint``
    (``"/track"`` or ``"/import"``), or ``None``.

    ``/track`` needs the project ``token``; ``/import`` needs ``time``, ``distinct_id`` and
    ``$insert_id`` (the spec requires them whatever the request's ``strict`` says, which only decides
    whether the answer reports them). ``$create_alias`` (``/track``) and ``$merge``
    (``/import``) carry their own properties.
    """
    when = time.time() if now is None else now
    if not isinstance(record, dict):
        return ("", "each record must be a JSON object")
    extra = set(record) - {"event", "properties"}
    if extra:
        return ("", f"unexpected top-level keys {sorted(extra)} (only 'event' and 'properties')")
    name = record.get("event")
    if not isinstance(name, str) or not name:
        return ("event", "'event' must be a non-empty string")
    props = record.get("properties")
    if not isinstance(props, dict):
        return ("properties", "'properties' must be an object")
    if len(props) >= _MAX_PROPERTIES:
        return ("properties", f"events must have fewer than {_MAX_PROPERTIES} properties")
    if _size(record) >= _MAX_RECORD_BYTES:
        return ("", "event is larger than 1 MB")
    for key, value in props.items():
        problem = _shape_problem(key, value)
        if problem:
            return (f"properties.{key}", problem)
    if "$insert_id" in props:
        problem = _insert_id_problem(props["$insert_id"])
        if problem:
            return ("properties.$insert_id", problem)
    if "token" in props and not isinstance(props["token"], str):
        return ("properties.token", "'token' must be a string")
    if endpoint == "/track" and (not isinstance(props.get("token"), str) or not props["token"]):
        return ("properties.token", "'token' is required")
    if name == "$merge" and endpoint == "/import":
        ids = props.get("$distinct_ids")
        if not (
            isinstance(ids, list) and len(ids) == 2 and all(_id_ok(i) and i != "" for i in ids)
        ):
            return ("properties.$distinct_ids", "'$distinct_ids' must list two distinct ids")
        return None
    if name == "$create_alias" and endpoint == "/track":
        for key in ("alias", "distinct_id"):
            if not (_id_ok(props.get(key)) and props.get(key) != ""):
                return (f"properties.{key}", "'$create_alias' needs 'alias' and 'distinct_id'")
        return None
    if "time" in props:
        problem = _time_problem(props["time"], when, endpoint)
        if problem:
            return ("properties.time", f"'properties.time' is invalid: {problem}")
    if "distinct_id" in props:
        value = props["distinct_id"]
        if not _id_ok(value):
            return ("properties.distinct_id", "'distinct_id' must be a string or an integer")
        if str(value).strip().lower() in _BLOCKED_IDS:
            return (
                "properties.distinct_id",
                f"'distinct_id' {value!r} is a value Mixpanel refuses",
            )
    if endpoint == "/import":
        for key in ("time", "distinct_id", "$insert_id"):
            if key not in props:
                return (f"properties.{key}", f"'properties.{key}' is required")
    return None


def _list_of(value: Any, allowed: Callable[[Any], bool]) -> bool:
    return isinstance(value, list) and bool(value) and all(allowed(item) for item in value)


def _op_problem(op: str, value: Any) -> str | None:
    """The spec's type of each operation's value."""
    if op == "$delete":
        # The value is ignored; the spec has a nullable string, the SDKs send "".
        return (
            None
            if value is None or isinstance(value, str)
            else "'$delete' must be a string or null"
        )
    if op == "$unset":
        if not _list_of(value, lambda item: isinstance(item, str)):
            return "'$unset' must be a non-empty list of property names"
        return None
    if not isinstance(value, dict):
        return f"'{op}' must be an object"
    if op == "$add" and not all(_is_number(v) for v in value.values()):
        return "'$add' values must be numbers"
    if op == "$union":
        if not value:
            return "'$union' must name at least one list property"
        item_ok = lambda item: _is_number(item) or isinstance(item, str)  # noqa: E731
        for name, items in value.items():
            if not _list_of(items, item_ok):
                return f"'$union' value of {name!r} must be a non-empty list of strings or numbers"
    return None


def check_update(record: Any, group: bool) -> tuple[str, str] | None:
    """``(field, message)`` for the first problem of a profile (or, with ``group``, group)
    update record, or ``None``."""
    if not isinstance(record, dict):
        return ("", "each record must be a JSON object")
    if not isinstance(record.get("$token"), str) or not record["$token"]:
        return ("$token", "'$token' is required")
    if group:
        if not isinstance(record.get("$group_key"), str) or not record["$group_key"]:
            return ("$group_key", "'$group_key' must be a non-empty string")
        if not (_id_ok(record.get("$group_id")) and record.get("$group_id") != ""):
            return ("$group_id", "'$group_id' must be a non-empty string or integer")
        allowed: tuple[str, ...] = _GROUP_OPS
    else:
        if not (_id_ok(record.get("$distinct_id")) and record.get("$distinct_id") != ""):
            return ("$distinct_id", "'$distinct_id' must be a non-empty string or integer")
        allowed = _PROFILE_OPS
    # spec: group-union lists `$unset` and group-delete `$set` in `required`; the operation
    # itself ($union, $delete) is what the text, the batch form and the SDKs require.
    ops = [key for key in record if key in _PROFILE_OPS]
    if len(ops) != 1:
        return (
            "",
            f"exactly one operation of {', '.join(allowed)} is required, got {ops or 'none'}",
        )
    op = ops[0]
    if op not in allowed:
        return (op, f"'{op}' is not a {'group' if group else 'profile'} operation")
    if "$time" in record and not _is_number(record["$time"]):
        return ("$time", "'$time' must be a number")
    if "$ip" in record and not (isinstance(record["$ip"], str) or _is_int(record["$ip"])):
        return ("$ip", "'$ip' must be an IP address or 0")
    if "$ignore_alias" in record and not isinstance(record["$ignore_alias"], bool):
        return ("$ignore_alias", "'$ignore_alias' must be true or false")
    if _size(record) >= _MAX_RECORD_BYTES:
        return ("", "update is larger than 1 MB")
    problem = _op_problem(op, record[op])
    return None if problem is None else (op, problem)


def check_record(endpoint: str, record: Any, *, now: float | None = None) -> tuple[str, str] | None:
    """Check one record as the receiver does for ``endpoint`` (``"/track"``, ``"/engage"``,
    ``"/groups"`` or ``"/import"``); returns ``(field, problem)`` or ``None`` if valid."""
    if endpoint in ("/track", "/import"):
        return check_event(record, endpoint, now=now)
    if endpoint in ("/engage", "/groups"):
        return check_update(record, group=endpoint == "/groups")
    raise ValueError(f"unknown endpoint {endpoint!r}")

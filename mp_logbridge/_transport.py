"""HTTP transport to Mixpanel's ingestion API: the only module that knows about HTTP.

Endpoints per region, request encoding (JSON array bodies, gzip where the API allows it, query
parameters per endpoint), authentication for ``/import``, response parsing and error
classification (retryable or not). Everything above this module deals in records and outcomes.
"""

from __future__ import annotations

import base64
import contextvars
import email.utils
import gzip
import heapq
import hmac
import json
import os
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
import requests.adapters
import urllib3
import urllib3.connection

from ._errors import (
    ConfigurationError,
    MixpanelConnectionError,
    MixpanelServerError,
    PartialImportError,
    PayloadTooLargeError,
    RateLimitedError,
    RejectedError,
    TLSError,
)
from ._lifecycle import start_thread
from ._version import __version__

try:  # the OpenTelemetry API's flag that tells instrumentations to stay quiet
    from opentelemetry import context as _otel_context
    from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
except ImportError:  # pragma: no cover - opentelemetry-api is a dependency
    _otel_context = None  # type: ignore[assignment]
    _SUPPRESS_INSTRUMENTATION_KEY = None  # type: ignore[assignment]

__all__ = [
    "MAX_RESPONSE_BYTES",
    "REGIONS",
    "Credentials",
    "Endpoints",
    "ProjectSecret",
    "ServiceAccount",
    "Transport",
    "as_credentials",
    "parse_retry_after",
    "resolve_endpoints",
    "safe_url",
]

#: Ingestion hosts per data-residency region.
REGIONS: Mapping[str, str] = {
    "us": "api.mixpanel.com",
    "eu": "api-eu.mixpanel.com",
    "in": "api-in.mixpanel.com",
}
_PATHS = {
    "event": "/track",
    "profile_update": "/engage",
    "group_update": "/groups",
    "import": "/import",
    "merge": "/import",
}
_GZIP_KINDS = frozenset(
    {"event", "import", "merge"}
)  # the API documents no gzip for /engage, /groups
_VERBOSE_PARAMS = {"verbose": "1", "ip": "0"}
_RETRYABLE_STATUS = frozenset({408, 429}) | (frozenset(range(500, 600)) - {501, 505})


# --------------------------------------------------------------------------- endpoints


def _base_url(host: str, what: str) -> str:
    problem = ConfigurationError(f"{what} {host!r} is not a host name or an http(s) URL")
    if not isinstance(host, str):
        raise problem
    text = host.strip()
    if "://" not in text:
        text = f"https://{text}"
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise problem from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise problem
    return text.rstrip("/")


@dataclass(frozen=True)
class Endpoints:
    """The four ingestion URLs a consumer posts to."""

    event: str
    profile_update: str
    group_update: str
    import_: str

    def url(self, kind: str) -> str:
        """The URL for a kind of message (``"event"``, ``"profile_update"``, ...)."""
        return self.import_ if kind in ("import", "merge") else str(getattr(self, kind))

    @classmethod
    def for_host(cls, host: str) -> Endpoints:
        """All four endpoints under one host or base URL."""
        base = _base_url(host, "api_host")
        return cls(
            *(
                f"{base}{_PATHS[kind]}"
                for kind in ("event", "profile_update", "group_update", "import")
            )
        )


def resolve_endpoints(
    *,
    region: str | None = None,
    api_host: str | None = None,
    events_url: str | None = None,
    people_url: str | None = None,
    groups_url: str | None = None,
    import_url: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Endpoints:
    """Work out the ingestion URLs.

    Precedence: a per-endpoint URL, then ``api_host``, then ``region``, then the environment
    (``MIXPANEL_API_HOST``, then ``MIXPANEL_REGION``), then the US region.

    Raises:
        ConfigurationError: for an unknown region or a malformed host/URL.
    """
    env = os.environ if environ is None else environ
    source = "region"
    if api_host is None and region is None:
        api_host = env.get("MIXPANEL_API_HOST") or None
        region = env.get("MIXPANEL_REGION") or None
        source = "MIXPANEL_REGION"
    if api_host is not None:
        base = Endpoints.for_host(api_host)
    else:
        base = Endpoints.for_host(REGIONS[normalize_region(region or "us", source)])
    overrides = {
        "event": events_url,
        "profile_update": people_url,
        "group_update": groups_url,
        "import_": import_url,
    }
    for name, url in overrides.items():
        if url is not None:
            _base_url(url, f"{name.rstrip('_')} URL")
    return Endpoints(
        event=events_url or base.event,
        profile_update=people_url or base.profile_update,
        group_update=groups_url or base.group_update,
        import_=import_url or base.import_,
    )


def normalize_region(region: str, source: str = "region") -> str:
    """Return the canonical region name, or raise naming where it came from and the valid ones."""
    key = str(region).strip().lower()
    if key not in REGIONS:
        valid = ", ".join(f"{name!r} ({host})" for name, host in REGIONS.items())
        given = "unknown Mixpanel region" if source == "region" else f"{source}: unknown region"
        raise ConfigurationError(f"{given} {region!r}; valid regions are {valid}")
    return key


# --------------------------------------------------------------------------- credentials


def _required_text(value: Any, what: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"service account {what} must be a non-empty string")
    return value.strip()


class ServiceAccount:
    """Service-account credentials for ``/import`` (Basic auth plus ``project_id``).

    The secret never appears in ``repr``, logs or exception messages.
    """

    __slots__ = ("_secret", "project_id", "username")

    def __init__(self, username: str, secret: str, project_id: str | int) -> None:
        self.username = _required_text(username, "username")
        self._secret = _required_text(secret, "secret")
        self.project_id = _required_text(project_id, "project_id")

    @property
    def secret(self) -> str:
        """The service account's secret."""
        return self._secret

    def authorization(self) -> str:
        """The ``Authorization`` header value."""
        raw = f"{self.username}:{self._secret}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def query(self) -> dict[str, str]:
        """Query parameters that go with these credentials."""
        return {"project_id": self.project_id}

    def __repr__(self) -> str:
        return f"ServiceAccount(username={self.username!r}, secret='***', project_id={self.project_id!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ServiceAccount)
            and (self.username, self.project_id) == (other.username, other.project_id)
            and hmac.compare_digest(self._secret, other._secret)
        )

    def __hash__(self) -> int:
        return hash((self.username, self.project_id, self._secret))


class ProjectSecret:
    """A project's API secret, the older way to authenticate ``/import`` (Basic ``secret:``)."""

    __slots__ = ("_secret",)

    def __init__(self, secret: str) -> None:
        if not isinstance(secret, str) or not secret.strip():
            raise ConfigurationError("api_secret must be a non-empty string")
        self._secret = secret.strip()

    def authorization(self) -> str:
        """The ``Authorization`` header value."""
        return "Basic " + base64.b64encode(f"{self._secret}:".encode()).decode("ascii")

    def query(self) -> dict[str, str]:
        """Query parameters that go with these credentials (none)."""
        return {}

    def __repr__(self) -> str:
        return "ProjectSecret('***')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProjectSecret) and hmac.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(("secret", self._secret))


Credentials = ServiceAccount | ProjectSecret


def as_credentials(
    credentials: Credentials | None = None, api_secret: str | None = None
) -> Credentials | None:
    """Combine the two ways of giving ``/import`` credentials (a service account wins)."""
    if credentials is not None:
        if not isinstance(credentials, (ServiceAccount, ProjectSecret)):
            raise ConfigurationError(
                "credentials must be a ServiceAccount(username, secret, project_id) "
                f"or a ProjectSecret, got {type(credentials).__name__}"
            )
        return credentials
    if api_secret is not None:
        return ProjectSecret(api_secret)
    return None


# --------------------------------------------------------------------------- responses


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def _server_words(parsed: Any, text: str) -> str:
    if isinstance(parsed, dict) and parsed.get("error"):
        return str(parsed["error"])[:300]
    return text.strip()[:300] or "(empty body)"


def _interpret(kind: str, status: int, headers: Mapping[str, str], body: bytes) -> int | None:
    """Turn a response into a number of imported records (``None`` when not reported) or raise."""
    text = body.decode("utf-8", "replace")
    try:
        parsed: Any = json.loads(text) if text.strip() else None
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's limit
        parsed = None
    if 200 <= status < 300:
        if isinstance(parsed, dict):
            if parsed.get("status") in (1, "1", "OK") or parsed.get("code") == 200:
                imported = parsed.get("num_records_imported")
                return imported if isinstance(imported, int) else None
            if parsed.get("status") in (0, "0"):
                raise RejectedError(
                    f"Mixpanel refused the records sent to {_PATHS[kind]}: {_server_words(parsed, text)}",
                    status_code=status,
                    endpoint=kind,
                )
        elif parsed == 1:
            return None
        elif parsed == 0:
            raise RejectedError(
                f"Mixpanel refused the records sent to {_PATHS[kind]} (no valid records)",
                status_code=status,
                endpoint=kind,
            )
        raise MixpanelServerError(
            f"cannot interpret Mixpanel's answer on {_PATHS[kind]}: HTTP {status} {text[:200]!r}",
            status_code=status,
            endpoint=kind,
        )
    words = _server_words(parsed, text)
    message = f"Mixpanel answered HTTP {status} on {_PATHS[kind]}: {words}"
    retry_after = parse_retry_after(headers.get("Retry-After"))
    if (
        status == 400
        and isinstance(parsed, dict)
        and isinstance(parsed.get("failed_records"), list)
    ):
        imported = parsed.get("num_records_imported")
        raise PartialImportError(
            message,
            failed_records=parsed["failed_records"],
            num_records_imported=imported if isinstance(imported, int) else 0,
            status_code=status,
            endpoint=kind,
        )
    if status == 413:
        raise PayloadTooLargeError(message, status_code=status, endpoint=kind)
    if status == 429:
        raise RateLimitedError(message, status_code=status, retry_after=retry_after, endpoint=kind)
    if status in _RETRYABLE_STATUS:
        raise MixpanelServerError(
            message, status_code=status, retryable=True, retry_after=retry_after, endpoint=kind
        )
    if 400 <= status < 500:
        raise RejectedError(message, status_code=status, retry_after=retry_after, endpoint=kind)
    raise MixpanelServerError(message, status_code=status, retry_after=retry_after, endpoint=kind)


# --------------------------------------------------------------------------- deadlines


def safe_url(url: str) -> str:
    """``url`` fit to show: scheme, host, port and path, without credentials or query."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid URL>"
    return f"{parts.scheme}://{host}{port}{parts.path}"


class _Watch:
    """One request's deadline, and the socket to shut down if it is still running then."""

    __slots__ = ("deadline", "done", "expired", "sock")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.sock: socket.socket | None = None
        self.done = False
        self.expired = False

    def expire(self) -> None:
        self.expired = True
        sock = self.sock
        if sock is not None and not self.done:
            try:  # the base class's shutdown: an SSLSocket's own would drop its TLS state first
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass


_current = threading.local()  # the _Watch of the request this thread is making


def _attach(sock: Any) -> None:
    watch: _Watch | None = getattr(_current, "watch", None)
    if watch is not None and isinstance(sock, socket.socket):
        watch.sock = sock
        if watch.expired:  # the deadline passed while connecting
            watch.expire()


class _Watchdog:
    """Ends requests that outlive their deadline (one daemon thread per process, made lazily).

    A server can keep a request alive forever by sending one byte now and then: socket timeouts
    count from the last byte, so they never fire. Registering a request costs an append and a
    non-blocking release (no lock the requesting thread could be waiting on); at the deadline the
    watchdog shuts the request's socket down, and the blocked read returns at once.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._new: deque[_Watch] = deque()
        self._wake = threading.Lock()
        self._wake.acquire()
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()
        self._pid = os.getpid()

    def watch(self, deadline: float) -> _Watch:
        """Start watching a request that must be over by ``deadline`` (``time.monotonic()``)."""
        if self._pid != os.getpid():
            self._reset()
        watch = _Watch(deadline)
        self._new.append(watch)
        self.start()
        try:
            self._wake.release()
        except RuntimeError:  # already awake
            pass
        return watch

    def start(self) -> None:
        """Start the thread, if it is not running in this process. A transport calls this when
        it is made: Python 3.12 starts no thread in exit hooks, and a process whose first
        request is made at exit must still have its deadline kept."""
        if self._pid != os.getpid():
            self._reset()
        if self._thread is None and self._starting.acquire(blocking=False):
            thread = threading.Thread(target=self._run, name="mp_logbridge-deadlines", daemon=True)
            try:
                start_thread(thread)
                self._thread = thread
            except RuntimeError:  # at interpreter shutdown: socket timeouts still apply
                pass
            finally:
                self._starting.release()

    def _run(self) -> None:
        heap: list[tuple[float, int, _Watch]] = []
        counter = 0
        new, wake = self._new, self._wake
        while True:
            while new:
                item = new.popleft()
                counter += 1
                heapq.heappush(heap, (item.deadline, counter, item))
            now = time.monotonic()
            while heap and (heap[0][2].done or heap[0][0] <= now):
                _deadline, _n, item = heapq.heappop(heap)
                if not item.done:
                    item.expire()
            timeout = heap[0][0] - now if heap else -1
            wake.acquire(timeout=timeout)


_watchdog = _Watchdog()

#: False while a consumer is made only to check its options (a disabled front door): such a
#: transport never sends, so it starts no thread.
will_send: contextvars.ContextVar[bool] = contextvars.ContextVar("will_send", default=True)


class _Watched:
    """Connection mixin: tells the watchdog the socket of the request being made."""

    sock: Any

    def _new_conn(self) -> Any:
        sock = super()._new_conn()  # type: ignore[misc]
        _attach(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self.sock)  # a reused connection
        super().request(*args, **kwargs)  # type: ignore[misc]


class _WatchedHTTPConnection(_Watched, urllib3.connection.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    pass


class _WatchedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class _WatchedAdapter(requests.adapters.HTTPAdapter):
    """An adapter whose connections tell the watchdog their socket."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager


# --------------------------------------------------------------------------- transport

#: Response bodies are read up to this many bytes; the connection is dropped beyond it.
MAX_RESPONSE_BYTES = 64 * 1024


def _tls_problem(exc: BaseException) -> str:
    """The verification error inside a requests ``SSLError`` (``"certificate verify failed:
    self-signed certificate"``), found along its chain of causes."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            message = current.verify_message or current.reason or str(current)
            return f"certificate verify failed: {message}"
        if isinstance(current, ssl.SSLError):
            return str(current.reason or current)
        todo.extend(getattr(current, "args", ()))
        todo.extend((getattr(current, "reason", None), current.__cause__, current.__context__))
    return _short(exc)


class Transport:
    """Posts encoded batches to Mixpanel and classifies the answer.

    One ``requests.Session`` per process (a forked child makes its own), TLS verification on by
    default, no automatic retries (the consumers decide), and ``timeout`` as a **total** deadline
    per request: connecting, sending and reading the whole answer (a server that drips bytes is
    cut off). Answers are read up to :data:`MAX_RESPONSE_BYTES`; a longer body is not read and
    its connection is closed.
    """

    def __init__(
        self,
        endpoints: Endpoints,
        *,
        credentials: Credentials | None = None,
        timeout: float = 10.0,
        verify: bool | str = True,
        gzip_level: int = 1,
        gzip_min_bytes: int = 1024,
    ) -> None:
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not 0 < timeout < float("inf")
        ):
            raise ConfigurationError(f"request_timeout must be a positive number, got {timeout!r}")
        if not isinstance(verify, (bool, str)):
            raise ConfigurationError(
                f"verify must be True, False or a CA bundle path, got {verify!r}"
            )
        self.endpoints = endpoints
        self.credentials = credentials
        self.timeout = float(timeout)
        self.verify = verify
        self.gzip_level = gzip_level
        self.gzip_min_bytes = gzip_min_bytes
        self._session: requests.Session | None = None
        self._session_pid = 0
        self._session_lock = threading.Lock()
        if will_send.get():
            _watchdog.start()  # now: in an exit hook it could not be started (Python 3.12)

    def __repr__(self) -> str:
        return (
            f"Transport(track={safe_url(self.endpoints.event)!r}, credentials={self.credentials!r})"
        )

    def session(self) -> requests.Session:
        """This process's session (created on first use, again after a fork)."""
        pid = os.getpid()
        session = self._session
        if session is None or self._session_pid != pid:
            with self._session_lock:
                if self._session is None or self._session_pid != pid:
                    session = requests.Session()
                    adapter = _WatchedAdapter(pool_connections=4, pool_maxsize=16, max_retries=0)
                    session.mount("http://", adapter)
                    session.mount("https://", adapter)
                    default_agent = str(session.headers.get("User-Agent", "python-requests"))
                    session.headers["User-Agent"] = f"mp_logbridge/{__version__} {default_agent}"
                    # A session inherited from the parent shares its sockets; drop it unclosed.
                    self._session, self._session_pid = session, pid
                session = self._session
        assert session is not None
        return session

    def reinit_after_fork(self) -> None:
        """Forget the parent's session and lock (called in a forked child)."""
        self._session_lock = threading.Lock()
        self._session = None

    def close(self) -> None:
        """Release pooled connections (a new session is made if the transport is used again)."""
        with self._session_lock:
            session, self._session = self._session, None
            if session is not None and self._session_pid == os.getpid():
                session.close()

    def send(
        self,
        kind: str,
        body: bytes,
        *,
        credentials: Credentials | None = None,
        timeout: float | None = None,
    ) -> int | None:
        """POST one JSON-array ``body`` of ``kind`` records.

        ``credentials`` overrides the transport's own for this request (``/import`` only);
        ``timeout`` lowers the request's total deadline (used near a close deadline).

        Returns:
            the number of records the server says it imported, when it says (``/import``).

        Raises:
            DeliveryError: a subclass saying what went wrong and whether to retry.
        """
        url = self.endpoints.url(kind)
        headers = {"Content-Type": "application/json"}
        if kind in ("import", "merge"):
            creds = credentials or self.credentials
            if creds is None:
                raise RejectedError(
                    "importing events needs credentials: pass credentials=ServiceAccount(...) or "
                    "api_secret=... to the consumer",
                    endpoint=kind,
                )
            # ``$merge`` events go as the official SDKs send them: not strict (strict mode
            # requires time, distinct_id and $insert_id, which a merge has no use for).
            strict = {"strict": "1"} if kind == "import" else {"strict": "0", "verbose": "1"}
            params: dict[str, str] = {**strict, **creds.query()}
            headers["Authorization"] = creds.authorization()
        else:
            params = _VERBOSE_PARAMS
        if kind in _GZIP_KINDS and len(body) >= self.gzip_min_bytes:
            body = gzip.compress(body, compresslevel=self.gzip_level, mtime=0)
            headers["Content-Encoding"] = "gzip"
        limit = self.timeout if timeout is None else max(0.05, min(self.timeout, timeout))
        watch = _watchdog.watch(time.monotonic() + limit)
        _current.watch = watch
        token = None
        if _otel_context is not None:
            token = _otel_context.attach(
                _otel_context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True)
            )
        try:
            response = self.session().post(
                url,
                params=params,
                data=body,
                headers=headers,
                timeout=(limit, limit),
                verify=self.verify,
                allow_redirects=False,
                stream=True,
            )
            try:
                content, complete = _read_capped(response)
            finally:
                response.close()
            if watch.expired:
                # The deadline shut the socket while the answer was arriving: what was read is
                # not the answer (headers cut short read as a 200 with an empty body).
                raise _too_late(url, limit, kind)
            if not content and _ended_early(response):
                raise MixpanelConnectionError(
                    f"the answer from {safe_url(url)} ended before its body (the connection "
                    "closed)",
                    endpoint=kind,
                )
        except requests.exceptions.SSLError as exc:
            raise TLSError(
                f"TLS error talking to {safe_url(url)}: {_tls_problem(exc)}", endpoint=kind
            ) from exc
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as exc:
            raise MixpanelConnectionError(
                f"invalid URL {safe_url(url)}: {_short(exc)}", retryable=False, endpoint=kind
            ) from exc
        except (requests.exceptions.RequestException, OSError) as exc:
            if watch.expired:
                raise _too_late(url, limit, kind) from exc
            raise MixpanelConnectionError(
                f"could not deliver to {safe_url(url)}: {_describe_network_error(exc)}",
                endpoint=kind,
            ) from exc
        finally:
            watch.done = True
            _current.watch = None
            if token is not None:
                _otel_context.detach(token)
        if not complete:
            raise MixpanelServerError(
                f"Mixpanel's answer on {_PATHS[kind]} (HTTP {response.status_code}) is longer than "
                f"{MAX_RESPONSE_BYTES} bytes; it was not read, so whether the records were accepted "
                "is unknown",
                status_code=response.status_code,
                endpoint=kind,
            )
        return _interpret(kind, response.status_code, response.headers, content)


def _ended_early(response: requests.Response) -> bool:
    """An empty answer that said nothing of its length: the server closed the connection in its
    headers (they then read as complete, and the body as empty). Mixpanel always answers with a
    body, so whether the records were accepted is unknown: the request is retried."""
    headers = response.headers
    return (
        "Content-Length" not in headers
        and "chunked" not in headers.get("Transfer-Encoding", "").lower()
        and response.status_code not in (204, 304)
    )


def _too_late(url: str, limit: float, kind: str) -> MixpanelConnectionError:
    """The request deadline passed before the whole answer arrived (retryable)."""
    return MixpanelConnectionError(
        f"no complete answer from {safe_url(url)} within {limit:.3g} s", endpoint=kind
    )


def _read_capped(response: requests.Response) -> tuple[bytes, bool]:
    """The body and whether it was read whole: at most :data:`MAX_RESPONSE_BYTES` are read (the
    connection is then closed, not reused)."""
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
        return b"", False
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(chunk_size=16 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            return b"", False
    return b"".join(chunks), True


def _describe_network_error(exc: BaseException) -> str:
    """A short cause for a network failure: ``connection refused``, ``name resolution failed``..."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen or not isinstance(current, BaseException):
            continue
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError):
            return "connection refused"
        if isinstance(current, socket.gaierror):
            return f"name resolution failed ({current.strerror or current})"
        if isinstance(current, ConnectionResetError):
            return "connection reset by the server"
        if isinstance(current, (socket.timeout, TimeoutError)):
            return "timed out"
        todo.extend(arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException))
        todo.extend((getattr(current, "reason", None), current.__cause__, current.__context__))
    return f"{type(exc).__name__}: {_short(exc)}"


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 240 else text[:237] + "..."

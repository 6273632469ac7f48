"""Redis Streams: the producer side (an exporter and a consumer) and the relay's broker.

* :class:`RedisStreamExporter` sits at the exporter seam: a background worker hands it batches
  of encoded records, and it writes each batch to a stream in one ``MULTI``/``EXEC`` pipeline of
  ``XADD`` commands (all of the batch or none of it). A Redis outage is an outcome like a Mixpanel
  outage: retried by the worker's one retry decision, bounded, counted.
* :class:`RedisStreamConsumer` is a :class:`~mp_logbridge.BackgroundConsumer` whose exporter is
  the one above: usable as the ``consumer=`` of every front door; ``send`` costs what it costs
  with HTTP.
* :class:`RedisBroker` is what the relay reads through: a consumer group created at id 0 (records
  written before any relay started are delivered too), ``XREADGROUP``, ``XAUTOCLAIM`` of entries
  idle on a dead worker, ``XACK`` after the server accepted, a dead-letter stream, and a token
  bucket per project kept in Redis (a Lua script), shared by every worker.

The ``redis`` package is imported when one of these is first used (``pip install
'mp_logbridge[redis]'``), never by ``import mp_logbridge``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._background import BackgroundConsumer
from ._errors import ConfigurationError, MixpanelConnectionError, RejectedError
from ._export import Batch, Outcome, classify
from ._messages import new_insert_id
from ._records import EncodedRecord, JsonText
from ._streamentry import FIELD_RECORD, entry_head
from ._tags import TagMessage
from ._transport import (
    REGIONS,
    Credentials,
    ProjectSecret,
    ServiceAccount,
    normalize_region,
    resolve_endpoints,
    safe_url,
)

__all__ = [
    "DEFAULT_STREAM",
    "BrokerUnavailableError",
    "RedisBroker",
    "RedisStreamConsumer",
    "RedisStreamExporter",
    "connect",
    "destination_label",
]

#: The stream producers write to and relays read from, unless told otherwise.
DEFAULT_STREAM = "mixpanel"
_ID_KINDS = frozenset({"event", "import", "events", "imports"})


class BrokerUnavailableError(MixpanelConnectionError):
    """The broker (Redis) could not be reached or refused the command for now: retried."""


def _redis() -> Any:
    try:
        import redis
    except ImportError:  # pragma: no cover - depends on the installation
        raise ConfigurationError(
            "Redis Streams need the redis package: pip install 'mp_logbridge[redis]'"
        ) from None
    return redis


def connect(url: str, *, timeout: float = 5.0, block: float = 0.0) -> Any:
    """A ``redis.Redis`` client for ``url`` (``redis://``, ``rediss://`` or ``unix://``) that
    returns bytes; ``timeout`` bounds each command, plus ``block`` seconds for blocking reads."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError("a Redis URL is required (redis://host:6379/0 or unix:///path)")
    redis = _redis()
    try:
        return redis.Redis.from_url(
            url.strip(),
            socket_timeout=timeout + block,
            socket_connect_timeout=timeout,
            decode_responses=False,
            health_check_interval=30,
        )
    except ValueError as exc:
        raise ConfigurationError(f"invalid Redis URL {safe_url(url)}: {exc}") from None


def describe_redis_error(url: str, exc: BaseException) -> str:
    """One line for a Redis failure, without the URL's password."""
    text = str(exc).strip() or type(exc).__name__
    return f"Redis at {safe_url(url)}: {type(exc).__name__}: {text[:200]}"


def destination_label(
    destination: str | None = None, region: str | None = None, api_host: str | None = None
) -> str:
    """The destination written into each entry: ``destination`` as given, else the host of
    ``api_host``, else the ``region`` (then ``MIXPANEL_API_HOST``, ``MIXPANEL_REGION``, ``us``,
    the order :func:`~mp_logbridge.resolve_endpoints` uses)."""
    if destination is not None:
        if not isinstance(destination, str) or not destination.strip():
            raise ConfigurationError("destination must be a non-empty string")
        return destination.strip()
    if api_host is None and region is None:
        api_host = os.environ.get("MIXPANEL_API_HOST") or None
        region = os.environ.get("MIXPANEL_REGION") or None
    if api_host is not None:
        endpoints = resolve_endpoints(api_host=api_host)
        return endpoints.event[: -len("/track")]
    return normalize_region(region or "us")


# --------------------------------------------------------------------------- producer side


class RedisStreamExporter:
    """Writes batches to a Redis Stream (one ``MULTI``/``EXEC`` of ``XADD`` per batch).

    Args:
        url: the Redis URL.
        stream: the stream's key.
        destination: written into each entry (a region name, or a label the relay routes).
        project: for ``/import`` records, the project whose credentials the relay uses.
        maxlen: trim the stream to about this many entries (``XADD MAXLEN ~``); the oldest
            entries go first, delivered or not.
        timeout: seconds one batch may take.
    """

    def __init__(
        self,
        url: str,
        stream: str = DEFAULT_STREAM,
        *,
        destination: str = "us",
        project: str | None = None,
        maxlen: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        if not isinstance(stream, str) or not stream:
            raise ConfigurationError("stream must be a non-empty string")
        if maxlen is not None and (
            isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1
        ):
            raise ConfigurationError(f"stream_maxlen must be a positive integer, got {maxlen!r}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise ConfigurationError(f"timeout must be a positive number, got {timeout!r}")
        self.url = url
        self.stream = stream
        self.destination = destination
        self.project = project
        self.maxlen = maxlen
        self._timeout = float(timeout)
        self._client: Any = None
        self._lock = threading.Lock()
        self._head = (
            (b"XADD", stream.encode())
            + ((b"MAXLEN", b"~", str(maxlen).encode()) if maxlen else ())
            + (b"*",)
        )
        connect(url, timeout=self._timeout)  # the URL and the package are checked now

    @property
    def timeout(self) -> float:
        """Seconds one batch may take (connecting included)."""
        return 2 * self._timeout

    def client(self) -> Any:
        """This process's client (made on first use)."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = connect(self.url, timeout=self._timeout)
                client = self._client
        return client

    def _project_for(self, credentials: Credentials | None) -> str | None:
        if isinstance(credentials, ServiceAccount):
            return credentials.project_id
        return self.project

    def export(self, batch: Batch, deadline: float) -> Outcome:
        """Append the batch's records to the stream; never raises."""
        redis = _redis()
        project = self._project_for(batch.credentials) if batch.kind == "import" else None
        if batch.kind == "import" and project is None:
            refused = RejectedError(
                "an /import record needs the project whose credentials the relay uses: give "
                "the consumer project= (or credentials=ServiceAccount(...))",
                endpoint=batch.kind,
            )
            return classify(batch.records, refused)
        fields = [*entry_head(batch.kind, self.destination, project), FIELD_RECORD]
        head = self._head
        try:
            pipe = self.client().pipeline(transaction=True)
            for record in batch.records:
                pipe.execute_command(*head, *fields, record)
            pipe.execute()
        except redis.exceptions.ResponseError as exc:
            words = str(exc)
            permanent = "WRONGTYPE" in words or "NOPERM" in words
            error = (RejectedError if permanent else BrokerUnavailableError)(
                describe_redis_error(self.url, exc), endpoint=batch.kind
            )
            error.__cause__ = exc
            return classify(batch.records, error)
        except (redis.exceptions.RedisError, OSError) as exc:
            failure = BrokerUnavailableError(
                describe_redis_error(self.url, exc), endpoint=batch.kind
            )
            failure.__cause__ = exc
            return classify(batch.records, failure)
        except Exception as exc:  # a bug below must not lose the batch: retry it
            failure = BrokerUnavailableError(
                f"writing to Redis failed unexpectedly: {type(exc).__name__}: {exc}",
                endpoint=batch.kind,
            )
            failure.__cause__ = exc
            return classify(batch.records, failure)
        return classify(batch.records, None)

    def shutdown(self) -> None:
        """Close pooled connections (a new client is made if used again)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # pragma: no cover - closing must not raise
                pass

    def reinit_after_fork(self) -> None:
        """Forget the parent's connections (never close them: they are the parent's)."""
        self._lock = threading.Lock()
        self._client = None

    def __repr__(self) -> str:
        return (
            f"RedisStreamExporter({safe_url(self.url)!r}, stream={self.stream!r}, "
            f"destination={self.destination!r})"
        )


class _WithInsertId:
    """A deferred message whose event gets an ``$insert_id`` when it is built without one, so
    that every copy written to the stream (and every re-delivery) carries the same id."""

    __slots__ = ("checked", "message", "weight")

    def __init__(self, message: Any) -> None:
        self.message = message
        self.weight = getattr(message, "weight", None)
        self.checked = getattr(message, "checked", False)

    def build(self) -> Any:
        return _add_insert_id(self.message.build())


def _add_insert_id(record: Any) -> Any:
    """``record`` with an ``$insert_id`` in its properties (a copy, when one is added)."""
    if isinstance(record, dict):
        properties = record.get("properties")
        if isinstance(properties, dict) and "$insert_id" not in properties:
            return {**record, "properties": {**properties, "$insert_id": new_insert_id()}}
    return record


class RedisStreamConsumer(BackgroundConsumer):
    """A background consumer that writes to a Redis Stream instead of posting to Mixpanel.

    Relay workers (``mp-logbridge relay``, :class:`~mp_logbridge.relay.Relay`) read the stream
    and deliver. ``send`` is the background consumer's: it never waits on Redis; a worker thread
    writes batches in one pipeline each, and a Redis outage is retried like a Mixpanel outage
    (bounded by the queue options and ``retry``, every loss counted in :meth:`stats`).

    Args:
        url: the Redis URL (default: ``MIXPANEL_REDIS_URL``).
        stream: the stream's key (default: ``MIXPANEL_STREAM``, then ``"mixpanel"``).
        destination: where the relay sends these records: a region name, or a label the relay
            maps to a host (``--route``). By default the ``region`` (or ``api_host``, which the
            relay must then be configured for); the environment as for other consumers.
        project: for ``/import``: the project whose credentials the relay holds (its project
            id). Defaults to ``MIXPANEL_PROJECT_ID``, then the ``project_id`` of
            ``credentials``; secrets are never written.
        stream_maxlen: keep the stream to about this many entries (oldest trimmed first,
            delivered or not): a bound on Redis memory while no relay is running.
        redis_timeout: seconds one write may take.

    Every other keyword is a :class:`~mp_logbridge.BackgroundConsumer` option (``batch_size``,
    ``flush_interval``, ``max_queue_size``, ``retry``, ``on_error``, ...).

    Events get their ``$insert_id`` before they leave the process (the front doors fix it when
    they build; a record dict without one gets one here), so a relay that delivers an entry twice
    sends the same id, which Mixpanel de-duplicates.
    """

    def __init__(
        self,
        url: str | None = None,
        stream: str | None = None,
        *,
        destination: str | None = None,
        project: str | int | None = None,
        stream_maxlen: int | None = None,
        redis_timeout: float = 5.0,
        region: str | None = None,
        api_host: str | None = None,
        credentials: Credentials | None = None,
        api_secret: str | None = None,
        **options: Any,
    ) -> None:
        url = url or os.environ.get("MIXPANEL_REDIS_URL")
        if not url:
            raise ConfigurationError(
                "RedisStreamConsumer needs a Redis URL: url= or MIXPANEL_REDIS_URL"
            )
        stream = stream or os.environ.get("MIXPANEL_STREAM") or DEFAULT_STREAM
        if region is not None:
            normalize_region(region)
        label = destination_label(destination, region, api_host)
        if project is None:
            project = os.environ.get("MIXPANEL_PROJECT_ID") or None
        if project is not None:
            project = str(project).strip() or None
        if project is None and isinstance(credentials, ServiceAccount):
            project = credentials.project_id
        if project is None and (api_secret is not None or isinstance(credentials, ProjectSecret)):
            raise ConfigurationError(
                "the relay holds /import credentials, keyed by project: give project= the name "
                "the relay knows this project's secret by"
            )
        exporter = RedisStreamExporter(
            url,
            stream,
            destination=label,
            project=project,
            maxlen=stream_maxlen,
            timeout=redis_timeout,
        )
        super().__init__(
            credentials=credentials, api_secret=api_secret, exporter=exporter, **options
        )
        self.stream_exporter = exporter
        #: The project the relay's ``/import`` credentials are looked up by (``None``: none).
        self.project = project

    @property
    def credentials_elsewhere(self) -> bool:
        """Whether ``/import`` records can be sent: the relay holds this project's credentials."""
        return self.project is not None

    def send(self, kind: str, message: Any, api_key: Any = None, api_secret: Any = None) -> bool:
        """Queue one message for the stream (see :meth:`BackgroundConsumer.send`); an event
        without an ``$insert_id`` gets one first."""
        if kind in _ID_KINDS:
            kind_of = type(message)
            if kind_of is dict:
                message = _add_insert_id(message)
            elif kind_of is not EncodedRecord and kind_of is not TagMessage:
                if isinstance(message, (str, bytes)):
                    message = JsonText(message)
                if callable(getattr(message, "build", None)):
                    message = _WithInsertId(message)
        return super().send(kind, message, api_key, api_secret)

    def __repr__(self) -> str:
        exporter = self.stream_exporter
        return (
            f"RedisStreamConsumer({safe_url(exporter.url)!r}, stream={exporter.stream!r}, "
            f"destination={exporter.destination!r})"
        )


# --------------------------------------------------------------------------- relay side

# A token bucket per key, refilled at ARGV[1] tokens a second up to ARGV[2]; ARGV[3..] are the
# tokens each key needs. All keys are taken at once or none: returns 0 when taken, else the
# milliseconds to wait. A need above the bucket's size is granted on a full bucket and leaves a
# debt, so the average rate holds for batches larger than the burst.
_TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local wait = 0
local levels = {}
for i, key in ipairs(KEYS) do
  local need = tonumber(ARGV[2 + i])
  local state = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(state[1])
  local ts = tonumber(state[2])
  if tokens == nil or ts == nil then tokens = burst; ts = now end
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
  local floor = math.min(need, burst)
  if tokens < floor then wait = math.max(wait, (floor - tokens) / rate) end
  levels[i] = tokens - need
end
if wait > 0 then return math.ceil(wait * 1000) end
local ttl = math.ceil((burst / rate + 60) * 1000)
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, 'tokens', tostring(levels[i]), 'ts', tostring(now))
  redis.call('PEXPIRE', key, ttl)
end
return 0
"""


class RedisBroker:
    """The relay's view of one stream and consumer group.

    Every method may raise ``redis`` errors; the relay decides what to do about them.
    """

    def __init__(
        self,
        url: str,
        stream: str = DEFAULT_STREAM,
        group: str = "mp-logbridge",
        consumer: str | None = None,
        *,
        timeout: float = 5.0,
        block: float = 1.0,
        dead_maxlen: int | None = None,
        delete_delivered: bool = True,
    ) -> None:
        if not stream or not group:
            raise ConfigurationError("stream and group must be non-empty strings")
        self.url = url
        self.stream = stream
        self.dead_stream = f"{stream}:dead"
        self.group = group
        self.consumer = consumer or f"{_hostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self.block = block
        self.dead_maxlen = dead_maxlen
        self.delete_delivered = delete_delivered
        self.redis = _redis()
        self.client = connect(url, timeout=timeout, block=block)
        self._bucket = self.client.register_script(_TOKEN_BUCKET)

    def __repr__(self) -> str:
        return (
            f"RedisBroker({safe_url(self.url)!r}, stream={self.stream!r}, group={self.group!r}, "
            f"consumer={self.consumer!r})"
        )

    def describe(self, exc: BaseException) -> str:
        """A Redis failure in one line, without the URL's password."""
        return describe_redis_error(self.url, exc)

    def is_missing_group(self, exc: BaseException) -> bool:
        """Whether ``exc`` says the stream or group is gone (Redis restarted without its data)."""
        return isinstance(exc, self.redis.exceptions.ResponseError) and "NOGROUP" in str(exc)

    def ensure_group(self) -> None:
        """Create the group at the stream's beginning (id 0, the stream too if missing)."""
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except self.redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, count: int, block: float | None = None) -> list[tuple[bytes, Any]]:
        """New entries for this consumer (waits up to ``block`` seconds for some)."""
        wait = self.block if block is None else block
        reply = self.client.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: ">"},
            count=count,
            block=max(1, int(wait * 1000)) if wait > 0 else None,
        )
        if not reply:
            return []
        entries: list[tuple[bytes, Any]] = reply[0][1]
        return entries

    def claim(
        self, min_idle: float, count: int, cursor: bytes = b"0-0"
    ) -> tuple[bytes, list[tuple[bytes, Any]]]:
        """Take over entries idle for ``min_idle`` seconds on any consumer (a dead worker's).

        Returns the cursor to continue from (``b"0-0"``: the whole list was scanned) and the
        entries; entries deleted from the stream meanwhile are dropped from the list by Redis.
        """
        reply = self.client.xautoclaim(
            self.stream, self.group, self.consumer, int(min_idle * 1000), cursor, count=count
        )
        next_cursor, entries = reply[0], reply[1]
        return next_cursor, [entry for entry in entries if entry[1] is not None]

    def keep(self, ids: Sequence[bytes]) -> None:
        """Reset the idle time of entries this worker still works on, so nobody claims them."""
        for chunk in _chunks(ids, 1000):
            self.client.xclaim(self.stream, self.group, self.consumer, 0, list(chunk), justid=True)

    def release(self, ids: Sequence[bytes], idle: float) -> None:
        """Give entries back: mark them idle for ``idle`` seconds so other workers claim them
        at once (used when stopping with work unfinished)."""
        for chunk in _chunks(ids, 1000):
            self.client.xclaim(
                self.stream,
                self.group,
                self.consumer,
                0,
                list(chunk),
                idle=int(idle * 1000),
                justid=True,
            )

    def ack(self, ids: Sequence[bytes]) -> None:
        """Acknowledge delivered entries (and delete them from the stream, unless kept)."""
        pipe = self.client.pipeline(transaction=True)
        for chunk in _chunks(ids, 2000):
            pipe.xack(self.stream, self.group, *chunk)
            if self.delete_delivered:
                pipe.xdel(self.stream, *chunk)
        pipe.execute()

    def dead_letter(self, items: Iterable[tuple[bytes, Mapping[bytes, bytes]]]) -> None:
        """Move entries to the dead-letter stream (``fields`` include the reason) and
        acknowledge them, in one transaction."""
        pipe = self.client.pipeline(transaction=True)
        ids = []
        for entry_id, fields in items:
            pipe.xadd(
                self.dead_stream,
                dict(fields),
                maxlen=self.dead_maxlen,
                approximate=True,
            )
            ids.append(entry_id)
        if not ids:
            return
        pipe.xack(self.stream, self.group, *ids)
        pipe.xdel(self.stream, *ids)
        pipe.execute()

    def fields(self, entry_id: bytes) -> dict[bytes, bytes] | None:
        """An entry's fields (``None`` once it was deleted)."""
        entries = self.client.xrange(self.stream, entry_id, entry_id, count=1)
        return dict(entries[0][1]) if entries else None

    def take_rate(
        self, keys: Sequence[str], counts: Sequence[int], rate: float, burst: float
    ) -> float:
        """Take tokens from the buckets of ``keys`` (all or none); seconds to wait first (0:
        taken)."""
        names = [f"{self.stream}:rate:{key}" for key in keys]
        wait_ms = self._bucket(keys=names, args=[repr(rate), repr(burst), *counts])
        return float(wait_ms) / 1000.0

    def progress(self) -> dict[str, Any]:
        """The group's lag (entries not read yet; ``None`` when Redis cannot tell), entries
        pending acknowledgement, the stream's and the dead-letter stream's lengths."""
        pipe = self.client.pipeline(transaction=False)
        pipe.xinfo_groups(self.stream)
        pipe.xlen(self.stream)
        pipe.xlen(self.dead_stream)
        groups, length, dead = pipe.execute()
        mine = next((g for g in groups if g.get("name") in (self.group, self.group.encode())), None)
        return {
            "lag": None if mine is None else mine.get("lag"),
            "pending": 0 if mine is None else int(mine.get("pending") or 0),
            "stream_length": int(length),
            "dead_length": int(dead),
        }

    def forget_consumer(self) -> bool:
        """Remove this worker from the group if it holds no pending entry (only then: a
        consumer's pending entries would go with it)."""
        consumers = self.client.xinfo_consumers(self.stream, self.group)
        for entry in consumers:
            name = entry.get("name")
            if name in (self.consumer, self.consumer.encode()):
                if int(entry.get("pending") or 0) == 0:
                    self.client.xgroup_delconsumer(self.stream, self.group, self.consumer)
                    return True
                return False
        return True

    def forget_idle_consumers(self, idle: float) -> int:
        """Remove consumers that hold nothing and have not read for ``idle`` seconds (workers
        that died or were stopped), so the group's list stays short."""
        removed = 0
        for entry in self.client.xinfo_consumers(self.stream, self.group):
            name = entry.get("name")
            if (
                int(entry.get("pending") or 0) == 0
                and int(entry.get("idle") or 0) >= idle * 1000
                and name not in (self.consumer, self.consumer.encode())
            ):
                self.client.xgroup_delconsumer(self.stream, self.group, name)
                removed += 1
        return removed

    def replay_dead(self, limit: int | None = None) -> int:
        """Move dead-lettered entries back to the stream (their original fields), oldest first.

        Each chunk is moved in one transaction (added to the stream, deleted from the
        dead-letter stream). Returns how many were moved.
        """
        moved = 0
        start = "-"
        keep = (b"v", b"k", b"d", b"p", b"r")
        while limit is None or moved < limit:
            count = 500 if limit is None else min(500, limit - moved)
            entries = self.client.xrange(self.dead_stream, start, "+", count=count)
            if not entries:
                break
            pipe = self.client.pipeline(transaction=True)
            for _entry_id, fields in entries:
                original = {name: value for name, value in fields.items() if name in keep}
                pipe.xadd(self.stream, original or {b"v": b"?"})
            pipe.xdel(self.dead_stream, *(entry_id for entry_id, _ in entries))
            pipe.execute()
            moved += len(entries)
            start = "(" + entries[-1][0].decode()
        return moved

    def dead_entries(self, count: int = 100) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """The oldest dead-lettered entries (for inspection)."""
        return [
            (i, dict(f)) for i, f in self.client.xrange(self.dead_stream, "-", "+", count=count)
        ]

    def close(self) -> None:
        """Close the connections."""
        try:
            self.client.close()
        except Exception:  # pragma: no cover
            pass


def _hostname() -> str:
    try:
        return os.uname().nodename or "host"
    except AttributeError:  # pragma: no cover - not POSIX
        return "host"


def _chunks(items: Sequence[bytes], size: int) -> Iterable[Sequence[bytes]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def default_routes() -> dict[str, str]:
    """Destination labels the relay knows without configuration: the regions."""
    return {name: f"https://{host}" for name, host in REGIONS.items()}


def wait_for_redis(url: str, timeout: float) -> None:
    """Wait until Redis answers ``PING``, at most ``timeout`` seconds (then raise)."""
    client = connect(url, timeout=min(5.0, max(0.5, timeout)))
    redis = _redis()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except (redis.exceptions.RedisError, OSError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
    finally:
        client.close()

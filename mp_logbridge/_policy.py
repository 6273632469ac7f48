"""What may leave the process: ``before_send``, sampling and redaction, for every front door.

One :class:`Policy` per front door (handler, structlog processor, OpenTelemetry processors,
Tracker), made from its options by :meth:`Policy.from_options`; ``None`` when none is given,
so a front door without a policy keeps its hot path exactly as it was. With a policy the
record is built on the caller's thread at the call (the hook sees the finished record, and
raises nothing into the application), then, in this order:

1. **sampling** (``sample_rate``): events only — profile and group updates, imports and the
   identity events ``$create_alias``/``$identify``/``$merge`` are never sampled. Sampling is
   **by user**: a user's ``distinct_id`` is hashed (BLAKE2b, unkeyed: the same user is kept or
   left out in every process and every run) to a number in [0, 1); the event is kept when that
   number is below the rate of its name (or of ``"*"``). A kept user keeps all their events of
   that name, so funnels stay whole, and a user kept at rate 0.1 is kept at every higher rate.
   Counted as ``sampled_out`` (not a drop).
2. **before_send(record) -> record | None**: the Mixpanel record as it would be sent (a fresh
   dict the hook may change in place or replace); ``None`` leaves the message out (counted as
   ``filtered``, not a drop). The library's own fields are put back as they were (``token``,
   ``$insert_id`` and ``time`` of events; ``$token`` and ``$time`` of updates). A hook that raises,
   or returns something that is not a record, costs that message, counted as ``hook_error``;
   the application never sees the exception.
3. **redaction** (``redact=[names]``): every property of those names, at any depth, is dropped
   (``redact_mode="drop"``, the default) or replaced by its HMAC-SHA256 keyed with
   ``redact_key`` (``redact_mode="hash"``; 64 hex digits; the key is required, since an unkeyed
   hash of an e-mail address is undone by hashing a list of addresses). Redaction runs last, so
   it also covers what the hook added. Counted as ``redacted`` (values removed or hashed).

The record is then checked and encoded again (the hook may have put anything in it), at the call.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import json
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ._diagnostics import DeliveryStats
from ._errors import ConfigurationError
from ._values import snapshot_mapping

__all__ = ["LOST", "POLICY_OPTIONS", "REDACT_MODES", "Policy", "resolve_callable"]

#: What :meth:`Policy.apply` returns for a message the hook cost (counted as ``hook_error``).
LOST: Any = type("Lost", (), {"__repr__": lambda self: "LOST", "__slots__": ()})()

#: The options a front door takes for its policy (taken out before the delivery options).
POLICY_OPTIONS = ("before_send", "sample_rate", "redact", "redact_mode", "redact_key")
#: What ``redact_mode`` accepts.
REDACT_MODES = ("drop", "hash")

# Never sampled: without them identities would not be joined for the users kept.
_IDENTITY_EVENTS = frozenset({"$create_alias", "$identify", "$merge"})
# The library's own fields: neither the hook nor redaction may change them.
_EVENT_PROTECTED = ("token", "$insert_id", "time")
_UPDATE_PROTECTED = ("$token", "$time")
# Fields that identify whom a record is for: dropping them makes the record unsendable.
_IDENTITY_FIELDS = frozenset({"distinct_id", "$distinct_id", "$group_key", "$group_id"})
_PROTECTED_NAMES = frozenset(_EVENT_PROTECTED + _UPDATE_PROTECTED)
_HASH_SPACE = float(1 << 64)


def resolve_callable(value: Any, what: str) -> Callable[..., Any]:
    """``value`` when callable, or the callable a ``"package.module:name"`` (or
    ``"package.module.name"``) string names (settings files and ``dictConfig`` give strings)."""
    if callable(value):
        return value  # type: ignore[no-any-return]
    if isinstance(value, str) and value.strip():
        path = value.strip()
        if path.startswith("ext://"):
            path = path[len("ext://") :]
        module_name, sep, attribute = path.partition(":")
        if not sep:
            module_name, _, attribute = path.rpartition(".")
        try:
            found = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigurationError(f"{what}: cannot import {value!r}: {exc}") from exc
        if callable(found):
            return found  # type: ignore[no-any-return]
    raise ConfigurationError(f"{what} must be a callable or the dotted path of one, got {value!r}")


def _rate(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigurationError(f"{what} must be a number from 0 to 1, got {value!r}")
    return float(value)


def user_fraction(distinct_id: Any) -> float:
    """Where a user falls in [0, 1) for sampling: the same in every process, run and version."""
    digest = hashlib.blake2b(str(distinct_id).encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "big") / _HASH_SPACE


class _Counts:
    """Counters of what a policy kept out (not losses: the application asked for it)."""

    __slots__ = ("__weakref__", "filtered", "lock", "redacted", "sampled_out")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.sampled_out = 0
        self.filtered = 0
        self.redacted = 0
        _all_counts.add(self)


_all_counts: weakref.WeakSet[_Counts] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for counts in list(_all_counts):  # a lock held at fork would stay held in the child
        counts.lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Policy:
    """``before_send``, sampling and redaction of one front door (see the module's docs)."""

    __slots__ = ("_counts", "_default_rate", "_key", "_rates", "_redact", "before_send", "losses")

    def __init__(
        self,
        owner: str,
        *,
        before_send: Any = None,
        sample_rate: float | Mapping[str, float] | None = None,
        redact: Iterable[str] | None = None,
        redact_mode: str = "drop",
        redact_key: str | bytes | None = None,
    ) -> None:
        self.before_send: Callable[[dict[str, Any]], Any] | None = (
            None if before_send is None else resolve_callable(before_send, f"{owner}: before_send")
        )
        self._rates: dict[str, float] = {}
        self._default_rate = 1.0
        if sample_rate is not None:
            if isinstance(sample_rate, Mapping):
                for name, rate in sample_rate.items():
                    if not isinstance(name, str) or not name:
                        raise ConfigurationError(f"{owner}: sample_rate keys must be event names")
                    self._rates[name] = _rate(rate, f"{owner}: sample_rate[{name!r}]")
                self._default_rate = self._rates.pop("*", 1.0)
            else:
                self._default_rate = _rate(sample_rate, f"{owner}: sample_rate")
        if redact is not None and (
            isinstance(redact, (str, bytes)) or not isinstance(redact, Iterable)
        ):
            raise ConfigurationError(f"{owner}: redact must be a list of property names")
        names = frozenset(str(name) for name in (redact or ()))
        if redact_mode not in REDACT_MODES:
            raise ConfigurationError(
                f"{owner}: redact_mode must be one of {', '.join(REDACT_MODES)}, got {redact_mode!r}"
            )
        own = sorted(names & _PROTECTED_NAMES)
        if own:
            raise ConfigurationError(
                f"{owner}: redact cannot name the library's own fields ({', '.join(own)})"
            )
        if redact_mode == "drop" and names & _IDENTITY_FIELDS:
            raise ConfigurationError(
                f"{owner}: redact_mode='drop' cannot remove "
                f"{', '.join(sorted(names & _IDENTITY_FIELDS))} (records need them); "
                "use redact_mode='hash' to pseudonymise them"
            )
        self._key: bytes | None = None
        if redact_mode == "hash":
            if isinstance(redact_key, str):
                redact_key = redact_key.encode()
            if not isinstance(redact_key, bytes) or not redact_key:
                raise ConfigurationError(
                    f"{owner}: redact_mode='hash' needs redact_key= (a secret of yours): an "
                    "unkeyed hash of an e-mail address is reversed by hashing a list of them"
                )
            self._key = redact_key
        elif redact_key is not None:
            raise ConfigurationError(f"{owner}: redact_key is only used with redact_mode='hash'")
        self._redact = names
        self._counts = _Counts()
        #: Messages this policy lost (``hook_error``); merged into its front door's ``stats()``.
        self.losses = DeliveryStats()

    @classmethod
    def from_options(cls, owner: str, options: dict[str, Any]) -> Policy | None:
        """Take the policy options out of ``options``; ``None`` when none is set."""
        given = {name: options.pop(name) for name in POLICY_OPTIONS if name in options}
        if not any(
            given.get(name) is not None for name in ("before_send", "sample_rate", "redact")
        ):
            if given.get("redact_key") is not None or given.get("redact_mode", "drop") != "drop":
                raise ConfigurationError(f"{owner}: redact_mode and redact_key need redact=")
            return None
        return cls(owner, **given)

    # ------------------------------------------------------------------ the decision

    def apply(self, kind: str, record: dict[str, Any]) -> Any:
        """The record to send; ``None`` when it is left out on purpose (sampled out, filtered
        by the hook) and :data:`LOST` when the hook cost it — both counted.

        Raises:
            InvalidMessageError: ``record`` holds a value that cannot be sent (the hook never
                sees it); what the hook itself raises is counted, never raised.
        """
        if (
            kind == "event"
            and (self._rates or self._default_rate < 1.0)
            and not self._keeps(record)
        ):
            with self._counts.lock:
                self._counts.sampled_out += 1
            return None
        hook = self.before_send
        if hook is not None:
            result = self._run_hook(hook, kind, record)
            if result is None or result is LOST:
                return result
            record = result
        if self._redact:
            removed = self._redact_record(kind, record)
            if removed:
                with self._counts.lock:
                    self._counts.redacted += removed
        return record

    def _keeps(self, record: dict[str, Any]) -> bool:
        name = record.get("event")
        if name in _IDENTITY_EVENTS:
            return True
        rate = self._default_rate
        if self._rates and isinstance(name, str):
            rate = self._rates.get(name, rate)
        if rate >= 1.0:
            return True
        if rate <= 0.0:
            return False
        props = record.get("properties")
        user = props.get("distinct_id") if isinstance(props, Mapping) else None
        return user_fraction(user) < rate

    def _run_hook(
        self, hook: Callable[[dict[str, Any]], Any], kind: str, record: dict[str, Any]
    ) -> Any:
        is_event = "properties" in record and "event" in record
        if is_event:
            props = record["properties"]
            own = {name: props[name] for name in _EVENT_PROTECTED if name in props}
        else:
            own = {name: record[name] for name in _UPDATE_PROTECTED if name in record}
        # A private copy at any depth: whatever the hook changes in place, the values the record
        # shares with the application (and the tag, the super-properties) stay as they were.
        record = snapshot_mapping(record, "message")[0]
        try:
            result = hook(record)
        except Exception as exc:
            self._lose(f"before_send raised {type(exc).__name__}: {_text(exc)}")
            return LOST
        if result is None:
            with self._counts.lock:
                self._counts.filtered += 1
            return None
        if not isinstance(result, Mapping):
            self._lose(f"before_send returned {type(result).__name__}, not a record or None")
            return LOST
        result = dict(result)
        if is_event:
            props = result.get("properties")
            if not isinstance(props, Mapping) or not isinstance(result.get("event"), str):
                self._lose("before_send returned an event without a name or properties")
                return LOST
            result["properties"] = {**props, **own}
        else:
            result.update(own)
        return result

    def _lose(self, detail: str) -> None:
        self.losses.add_dropped("hook_error", 1, detail)
        self.losses.report()

    def _redact_record(self, kind: str, record: dict[str, Any]) -> int:
        """Redact ``record`` (a dict of this call's own) without changing any value it shares
        with the application, the tag or the super-properties: containers holding a redacted
        name are copied, the others are left as they are."""
        scrubbed, removed = self._scrub(record, 0)
        if removed:
            record.clear()
            record.update(scrubbed)
        return removed

    def _scrub(self, value: Any, depth: int) -> tuple[Any, int]:
        if depth > 64:
            return value, 0
        removed = 0
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for name, item in value.items():
                if name in self._redact:
                    removed += 1
                    if self._key is not None:
                        out[name] = self._hash(item)
                    continue
                if isinstance(item, (dict, list)):
                    item, count = self._scrub(item, depth + 1)
                    removed += count
                out[name] = item
            return (out, removed) if removed else (value, 0)
        if isinstance(value, list):
            items = []
            for item in value:
                if isinstance(item, (dict, list)):
                    item, count = self._scrub(item, depth + 1)
                    removed += count
                items.append(item)
            return (items, removed) if removed else (value, 0)
        return value, 0

    def _hash(self, value: Any) -> str:
        assert self._key is not None
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        return hmac.new(
            self._key, text.encode("utf-8", "surrogatepass"), hashlib.sha256
        ).hexdigest()

    # ------------------------------------------------------------------ counters

    def merge_stats(self, result: dict[str, Any]) -> dict[str, Any]:
        """Add this policy's counters (and its losses, under ``dropped``) to ``result``."""
        counts = self._counts
        with counts.lock:
            result["sampled_out"] = counts.sampled_out
            result["filtered"] = counts.filtered
            result["redacted"] = counts.redacted
        lost = self.losses.snapshot()["dropped"]
        if any(lost.values()):
            dropped = dict(result.get("dropped") or {})
            for reason, count in lost.items():
                if count:
                    dropped[reason] = dropped.get(reason, 0) + count
            result["dropped"] = dropped
            result["dropped_total"] = sum(dropped.values())
        return result


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return "<unprintable>"

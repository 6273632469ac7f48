"""Instrumenting code you do not own: patch functions and methods in place by dotted path.

``instrument_function("package.module:Class.method", "Event", ...)`` wraps the target with
:func:`~mp_logbridge.instrument` (methods, classmethods and staticmethods alike),
``uninstrument_function`` puts the original back, and ``instrument_functions`` applies a list of
such entries declared as data (a list of dicts, or a JSON/YAML file), so an application can
declare its instrumentation next to its logging configuration.
"""

from __future__ import annotations

import importlib
import json
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ._errors import ConfigurationError
from ._instrument import instrument, is_instrumented

__all__ = ["instrument_function", "instrument_functions", "uninstrument_function"]

#: target → (owner, attribute, original value, whether the owner held it itself, patched value)
_patched: dict[str, tuple[Any, str, Any, bool, Any]] = {}
_patch_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _patch_lock
    _patch_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

#: What an entry of :func:`instrument_functions` may hold besides ``target``.
_ENTRY_KEYS = frozenset(
    {
        "event",
        "distinct_id",
        "properties",
        "capture_args",
        "capture_result",
        "logger",
        "level",
        "tracker",
        "span",
        "tracer_provider",
        "tag",
    }
)


def _resolve(target: str) -> tuple[Any, str, Any, bool]:
    """``"pkg.mod:Class.method"`` → ``(owner, attribute, current value, owner holds it)``.

    On a class the value is read from the class dictionaries (so a classmethod or staticmethod
    is seen as such); one found on a base class is patched on the named class only.
    """
    module_name, sep, path = target.partition(":")
    if not sep or not module_name or not path:
        raise ConfigurationError(
            "target must look like 'package.module:function' or "
            f"'package.module:Class.method', got {target!r}"
        )
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r} for {target!r}: {exc}") from None
    *parents, attribute = path.split(".")
    for name in parents:
        try:
            owner = getattr(owner, name)
        except AttributeError:
            raise ConfigurationError(f"{target!r}: {name!r} not found") from None
    if isinstance(owner, type):
        for klass in owner.__mro__:
            if attribute in vars(klass):
                value = vars(klass)[attribute]
                break
        else:
            raise ConfigurationError(f"{target!r}: {attribute!r} not found")
        own = attribute in vars(owner)
    else:
        if not hasattr(owner, attribute):
            raise ConfigurationError(f"{target!r}: {attribute!r} not found")
        value = getattr(owner, attribute)
        own = True
    function = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
    if not callable(function) or isinstance(function, type):
        raise ConfigurationError(
            f"{target!r} is a {type(value).__name__}, not a function or method"
        )
    return owner, attribute, value, own


def instrument_function(target: str, event: str | None = None, **options: Any) -> None:
    """Instrument a function or method you do not own, in place, by dotted path.

    ``target`` is ``"package.module:function"`` or ``"package.module:Class.method"`` (methods,
    classmethods and staticmethods alike); ``event`` and ``options`` are :func:`instrument`'s.
    Idempotent: instrumenting a target again, or one already decorated with :func:`instrument`,
    does nothing. Undo with :func:`uninstrument_function`.
    """
    if not isinstance(target, str):
        raise ConfigurationError(f"target must be a string, got {target!r}")
    with _patch_lock:
        if target in _patched:
            return
        owner, attribute, original, own = _resolve(target)
        if is_instrumented(original):
            return
        if isinstance(original, (classmethod, staticmethod)):
            decorated: Any = type(original)(instrument(event, **options)(original.__func__))
        else:
            decorated = instrument(event, **options)(original)
        setattr(owner, attribute, decorated)
        _patched[target] = (owner, attribute, original, own, decorated)


def uninstrument_function(target: str) -> bool:
    """Undo :func:`instrument_function`: put the original object back.

    Returns whether the target was instrumented. When something else replaced the attribute
    since, that replacement is left in place (and ``False`` returned).
    """
    with _patch_lock:
        entry = _patched.pop(target, None)
        if entry is None:
            return False
        owner, attribute, original, own, decorated = entry
        current = (
            vars(owner).get(attribute)
            if isinstance(owner, type)
            else getattr(owner, attribute, None)
        )
        if current is not decorated:
            return False
        if own:
            setattr(owner, attribute, original)
        else:
            delattr(owner, attribute)  # it came from a base class: uncover it again
        return True


def _load_entries(source: str | os.PathLike[str]) -> Any:
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot read instrumentation file {str(path)!r}: {exc}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigurationError(
                f"reading {str(path)!r} needs PyYAML (pip install 'mp_logbridge[yaml]')"
            ) from None
        try:
            loaded: Any = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"{str(path)!r} is not valid YAML: {exc}") from None
    else:
        try:
            loaded = json.loads(text)
        except ValueError as exc:
            raise ConfigurationError(f"{str(path)!r} is not valid JSON: {exc}") from None
    if isinstance(loaded, Mapping):
        loaded = loaded.get("instrument", [])
    return loaded


def instrument_functions(
    entries: Iterable[Mapping[str, Any]] | str | os.PathLike[str],
) -> list[str]:
    """Instrument several targets declared as data, e.g. next to the logging configuration.

    ``entries`` is a list of mappings ``{"target": "pkg.mod:Class.method", "event": "...",
    ...options}`` or the path of a JSON (``.json``) or YAML (``.yaml``/``.yml``, needs PyYAML)
    file holding such a list (or a mapping with an ``"instrument"`` key holding it). Returns the
    targets. All or nothing: when an entry is wrong, the ones before it are undone and a
    :class:`~mp_logbridge.ConfigurationError` names the problem.
    """
    if isinstance(entries, (str, os.PathLike)):
        entries = _load_entries(entries)
    if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Iterable):
        raise ConfigurationError(
            f"instrumentation entries must be a list of mappings, got {type(entries).__name__}"
        )
    done: list[str] = []
    targets: list[str] = []
    try:
        for entry in entries:
            if not isinstance(entry, Mapping) or "target" not in entry:
                raise ConfigurationError(
                    f"each instrumentation entry needs a 'target', got {entry!r}"
                )
            unknown = sorted(
                str(key) for key in entry if key != "target" and key not in _ENTRY_KEYS
            )
            if unknown:
                raise ConfigurationError(
                    f"instrumentation entry for {entry['target']!r}: unknown option(s) "
                    f"{', '.join(unknown)} (known: {', '.join(sorted(_ENTRY_KEYS))})"
                )
            target = entry["target"]
            options = {key: entry[key] for key in entry if key not in ("target", "event")}
            newly = target not in _patched
            instrument_function(target, entry.get("event"), **options)
            if newly and target in _patched:
                done.append(target)
            targets.append(target)
    except BaseException:
        for target in reversed(done):
            uninstrument_function(target)
        raise
    return targets

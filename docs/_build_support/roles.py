"""Griffe extension for the reference pages: the library's docstrings use Sphinx roles
(:class:`X`, :func:`~mp_logbridge.Y`) and reST literal markers (``::``); Markdown shows them as
cross-references and code.

A role naming a public object by its full path (``mp_logbridge.Tracker``) becomes a
cross-reference as written, so a wrong one fails the strict build. A short or private name
(:meth:`flush`, :class:`Tracker`, ``mp_logbridge._retry.next_attempt``) is looked up from where
the docstring is; it becomes a cross-reference when the object it names is shown in the
reference (``docs/reference/*.md``), and code otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")
_LITERAL = re.compile(r"(\S)::(\n\n[ \t]+\S)")
_REFERENCE = Path(__file__).resolve().parent.parent / "reference"


def _public(path: str) -> bool:
    parts = path.split(".")
    return parts[0] == "mp_logbridge" and not any(part.startswith("_") for part in parts)


def _final_path(obj: Any) -> str | None:
    try:
        return str(obj.final_target.path) if isinstance(obj, griffe.Alias) else str(obj.path)
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _lookup(package: griffe.Module, path: str) -> Any:
    if path == package.path:
        return package
    if not path.startswith(package.path + "."):
        return None
    try:
        return package[path[len(package.path) + 1 :]]
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _shown(package: griffe.Module) -> dict[str, str]:
    """Canonical path of each object the reference pages show -> the identifier shown."""
    shown: dict[str, str] = {}
    for page in sorted(_REFERENCE.glob("*.md")):
        for identifier in re.findall(r"^::: ([\w.]+)$", page.read_text(encoding="utf-8"), re.M):
            obj = _lookup(package, identifier)
            canonical = _final_path(obj) if obj is not None else None
            if canonical is None:
                continue
            shown.setdefault(canonical, identifier)
            target = obj.final_target if isinstance(obj, griffe.Alias) else obj
            if isinstance(target, griffe.Class):
                for name in target.all_members:
                    if not name.startswith("_"):
                        shown.setdefault(f"{canonical}.{name}", f"{identifier}.{name}")
    return shown


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles and ``::`` markers in every docstring of the loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.path != "mp_logbridge":
            return
        shown = _shown(pkg)
        for obj in self._objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = self._convert(obj, obj.docstring.value, pkg, shown)

    def _objects(self, obj: griffe.Object) -> Any:
        yield obj
        for member in obj.members.values():
            if not isinstance(member, griffe.Alias):
                yield from self._objects(member)

    def _resolve(self, obj: griffe.Object, target: str, pkg: griffe.Module) -> str | None:
        scopes = []
        if isinstance(obj, griffe.Class):
            scopes.append(obj)
        if obj.parent is not None and isinstance(obj.parent, griffe.Class):
            scopes.append(obj.parent)
        scopes.append(obj.module)
        first = target.split(".", 1)[0]
        for scope in scopes:
            if first in scope.all_members:
                found = _lookup(pkg, f"{scope.path}.{target}")
                if found is not None:
                    return _final_path(found)
        found = _lookup(pkg, target)
        return _final_path(found) if found is not None else None

    def _convert(
        self, obj: griffe.Object, text: str, pkg: griffe.Module, shown: dict[str, str]
    ) -> str:
        def role(match: re.Match[str]) -> str:
            short, target = match.group(1) == "~", match.group(2).lstrip(".")
            label = target.rsplit(".", 1)[-1] if short else target
            if _public(target):
                return f"[`{label}`][{target}]"
            canonical = self._resolve(obj, target, pkg)
            if canonical is not None and canonical in shown:
                return f"[`{label}`][{shown[canonical]}]"
            return f"`{label}`"

        return _LITERAL.sub(r"\1:\2", _ROLE.sub(role, text))

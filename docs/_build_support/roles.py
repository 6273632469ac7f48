"""Griffe extension for the reference pages: the library's docstrings use Sphinx roles
(:class:`X`, :func:`~mp_logbridge.Y`); Markdown shows them as cross-references when they name a
public object by its full path (a broken one then fails the strict build), as code otherwise."""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")


def _public(path: str) -> bool:
    parts = path.split(".")
    return parts[0] == "mp_logbridge" and not any(part.startswith("_") for part in parts)


def _convert(match: re.Match[str]) -> str:
    short, target = match.group(1) == "~", match.group(2)
    shown = target.rsplit(".", 1)[-1] if short else target
    if _public(target):
        return f"[`{shown}`][{target}]"
    return f"`{shown}`"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring when the package is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_convert, obj.docstring.value)

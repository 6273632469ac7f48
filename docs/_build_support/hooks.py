"""MkDocs hook: links from a page to files of the repository outside ``docs/`` (examples,
benchmarks) work on GitHub as they are; on the site they become links to the repository when
``repo_url`` is set, else the path as code. A link to a file that does not exist fails the
strict build."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.plugins.repo_links")

_LINK = re.compile(r"\[([^\]]+)\]\((\.\./[^)\s#]+)(#[^)\s]*)?\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    docs_dir = Path(config["docs_dir"])
    root = docs_dir.parent
    page_dir = (docs_dir / page.file.src_uri).parent
    repo_url = (config.get("repo_url") or "").rstrip("/")

    def replace(match: re.Match[str]) -> str:
        text, target, anchor = match.group(1), match.group(2), match.group(3) or ""
        path = (page_dir / target).resolve()
        try:
            relative = path.relative_to(root.resolve())
        except ValueError:
            log.warning("%s links to %s, outside the repository", page.file.src_uri, target)
            return match.group(0)
        if relative.parts and relative.parts[0] == docs_dir.name:
            return match.group(0)  # a page of the site: MkDocs checks it
        if not path.exists():
            log.warning("%s links to %s, which does not exist", page.file.src_uri, target)
            return match.group(0)
        if repo_url:
            kind = "tree" if path.is_dir() else "blob"
            return f"[{text}]({repo_url}/{kind}/main/{relative.as_posix()}{anchor})"
        path_text = relative.as_posix()
        if text.strip("`") == path_text:
            return f"`{path_text}`"
        return f"{text} (`{path_text}`)"

    return _LINK.sub(replace, markdown)

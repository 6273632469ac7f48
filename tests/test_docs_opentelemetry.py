"""``docs/opentelemetry.md``: every Python block runs as written and prints what it says.

Each block runs in its own child interpreter (hard timeout) against the local receiver it starts
itself; the lines marked ``# -> text`` in a block must appear, in order, in its output. The
attribute table of the page must be the one the code uses.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from support import ROOT, child_env

from mp_logbridge.integrations.opentelemetry import ATTRIBUTE_PROPERTIES

PAGE = ROOT / "docs" / "opentelemetry.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.DOTALL)


def test_the_page_has_examples() -> None:
    assert len(BLOCKS) >= 7


@pytest.mark.subprocess
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_block_runs_as_written(index: int) -> None:
    source = BLOCKS[index]
    expected = [line.strip() for line in re.findall(r"# -> (.*)", source)]
    assert expected, "every example says what it prints"
    done = subprocess.run(
        [sys.executable, "-c", source],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        cwd=str(ROOT),
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = iter(line.strip() for line in done.stdout.splitlines())
    for text in expected:
        assert any(line == text for line in lines), (text, done.stdout)


def test_the_attribute_table_is_the_code_table() -> None:
    text = PAGE.read_text(encoding="utf-8").split("<!-- attribute-table -->", 1)[1]
    documented: dict[str, str] = {}
    for prop, attributes in re.findall(r"^\| `([a-z_]+)` \| (`.*?) \|$", text, re.MULTILINE):
        for attribute in re.findall(r"`([^`]+)`", attributes):
            documented[attribute] = prop
    assert list(documented.items()) == list(ATTRIBUTE_PROPERTIES.items())

"""The documentation runs: every ```python block of ``README.md`` and ``docs/**/*.md`` runs as
written and does what its comments promise; the tables that restate code are the code's.

How a block runs: in a child interpreter of its own (hard timeout), in an empty temporary
directory, with the repository importable, ``MIXPANEL_TOKEN`` set and ``MIXPANEL_API_HOST``
pointing at a ``MixpanelServer`` this test started for that block alone. Anything a block sends
without naming a host therefore reaches that server; blocks that start a receiver of their own
(``with MixpanelServer() as receiver``) talk to theirs.

Placeholders are the only text changed before a block runs, and only these:

* ``YOUR_PROJECT_TOKEN`` becomes the test's token (the one in ``MIXPANEL_TOKEN``);
* ``YOUR_API_SECRET`` becomes a test secret (the test's receiver takes any ``/import``
  credentials);
* ``/var/spool/myapp`` becomes a fresh temporary directory;
* ``redis://localhost:6379/0`` becomes the URL of a ``redis-server`` this test starts (the block
  is skipped where there is none, and fails instead under ``MP_LOGBRIDGE_REQUIRE_REDIS=1``).

What the comments of a block promise, and what is checked:

* ``# -> text``: a line of standard output equal to ``text`` (stripped); several such comments
  must be met in order.
* ``# stderr -> text``: a line of standard error containing ``text``. Any other line on standard
  error fails the block (a loss report of the library, a warning, a traceback).
* ``# Mixpanel receives: 2 events ("Signed Up", "Purchase"), 1 profile update, 1 group
  update, 1 import`` (kinds not named: none): after the block exited, the test's server holds
  exactly that many records of each kind, the events named as listed (in any order) when names
  are given, every record for the test's token, none refused and none breaking the spec. A block
  without this comment must send nothing to the test's server.
* A block whose first line is ``# test_<name>.py`` is a pytest module: it is written under that
  name and run with pytest, and every ``test_`` function in it must pass.

Every block promises something (one of the above), exits with status 0, and is written in a
fence the runner knows: ```python for code, ```sh/```console/```text/... for anything that is
not meant to run here.
"""

from __future__ import annotations

import ast
import collections
import importlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, child_env, closed_port_url

from mp_logbridge.testing import MixpanelServer

TOKEN = "docs-example-token"
TIMEOUT = 60.0
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```([\w+-]*)[^\n]*$")
RUNNABLE = "python"
# Other fences allowed in the pages (none of them is run).
NOT_RUN = {"sh", "console", "text", "ini", "yaml", "json", "toml", "dockerfile", ""}
SPOOL_PLACEHOLDER = "/var/spool/myapp"
REDIS_PLACEHOLDER = "redis://localhost:6379/0"
KINDS = {
    "event": "events",
    "profile update": "profile_updates",
    "group update": "group_updates",
    "import": "imports",
}
RECEIVES = re.compile(r"^\s*# Mixpanel receives: (.*)$", re.MULTILINE)
COUNT = re.compile(r"(\d+) (event|profile update|group update|import)s?(?: \(([^)]*)\))?")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    source: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _fences(page: Path) -> Iterator[tuple[str, int, str]]:
    """(language, line of the opening fence, body) of each fenced block of a page."""
    lines = page.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if match is None:
            index += 1
            continue
        start, body = index, []
        index += 1
        while index < len(lines) and not lines[index].startswith("```"):
            body.append(lines[index])
            index += 1
        assert index < len(lines), f"{page}:{start + 1}: unclosed fence"
        yield match.group(1), start + 1, "\n".join(body) + "\n"
        index += 1


BLOCKS = [
    Block(page, line, body)
    for page in PAGES
    for language, line, body in _fences(page)
    if language == RUNNABLE
]


# --------------------------------------------------------------------------- the pages


def test_every_page_has_examples_and_only_known_fences() -> None:
    assert len(BLOCKS) >= 40
    unknown = [
        f"{page.relative_to(ROOT)}:{line}: ```{language}"
        for page in PAGES
        for language, line, _body in _fences(page)
        if language != RUNNABLE and language not in NOT_RUN
    ]
    assert not unknown, "fences the runner does not know (use python to run, text otherwise)"


# --------------------------------------------------------------------------- the blocks


@dataclass
class Promise:
    stdout: list[str]
    stderr: list[str]
    receives: dict[str, int] | None
    event_names: list[str] | None
    test_module: str | None


def _promise(source: str) -> Promise:
    stdout = [text.strip() for text in re.findall(r"(?<!stderr )# -> (.*)", source)]
    stderr = [text.strip() for text in re.findall(r"# stderr -> (.*)", source)]
    first = source.split("\n", 1)[0].strip()
    module = first[2:] if re.fullmatch(r"# test_\w+\.py", first) else None
    found = RECEIVES.findall(source)
    assert len(found) <= 1, "one 'Mixpanel receives' comment per block"
    receives: dict[str, int] | None = None
    names: list[str] | None = None
    if found:
        receives = dict.fromkeys(KINDS.values(), 0)
        text = found[0]
        parts = COUNT.findall(text)
        assert parts, f"cannot read {text!r}"
        for count, kind, listed in parts:
            receives[KINDS[kind]] = int(count)
            if kind == "event" and listed:
                names = re.findall(r'"([^"]*)"', listed)
                assert len(names) == int(count), f"{text!r}: {count} events, {len(names)} names"
    assert stdout or receives is not None or module, (
        "the block promises nothing: add '# -> output', '# Mixpanel receives: ...' "
        "or make it a '# test_<name>.py' module"
    )
    return Promise(stdout, stderr, receives, names, module)


def _substitute(source: str, directory: Path, redis_url: str | None) -> str:
    source = source.replace("YOUR_PROJECT_TOKEN", TOKEN)
    source = source.replace("YOUR_API_SECRET", "docs-example-secret")
    source = source.replace(SPOOL_PLACEHOLDER, str(directory / "spool"))
    if redis_url is not None:
        source = source.replace(REDIS_PLACEHOLDER, redis_url)
    return source


def _run(block: Block, server: MixpanelServer, directory: Path, redis_url: str | None) -> Any:
    promise = _promise(block.source)
    source = _substitute(block.source, directory, redis_url)
    # A block that names a real Mixpanel host (region="eu") goes through a proxy that is down.
    nowhere = closed_port_url()
    env = child_env(
        MIXPANEL_API_HOST=server.url,
        MIXPANEL_TOKEN=TOKEN,
        HTTP_PROXY=nowhere,
        HTTPS_PROXY=nowhere,
        NO_PROXY="127.0.0.1,localhost",
    )
    if promise.test_module is not None:
        (directory / promise.test_module).write_text(source, encoding="utf-8")
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        command.append(promise.test_module)
    else:
        command = [sys.executable, "-c", source]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        cwd=str(directory),
    )
    return promise, done


def _records_of(server: MixpanelServer) -> dict[str, list[dict[str, Any]]]:
    return {kind: list(getattr(server, kind)) for kind in KINDS.values()}


def _token_of(kind: str, record: dict[str, Any]) -> Any:
    if kind in ("events", "imports"):
        return record.get("properties", {}).get("token")
    return record.get("$token")


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    block: Block = request.node.callspec.params["block"]
    if REDIS_PLACEHOLDER not in block.source:
        yield None
        return
    from redis_support import RedisServer, require_redis

    server = RedisServer(require_redis())
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def _check(block: Block, promise: Promise, done: Any, server: MixpanelServer) -> None:
    """Raise ``AssertionError`` unless the finished block kept every promise."""
    output = f"\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.returncode == 0, f"{block.name} exited with {done.returncode}{output}"

    if promise.test_module is not None:
        tests = len(re.findall(r"^def test_\w+", block.source, re.MULTILINE))
        assert tests and f"{tests} passed" in done.stdout, output
        assert " failed" not in done.stdout and " error" not in done.stdout, output
    else:
        lines = iter(line.strip() for line in done.stdout.splitlines())
        for text in promise.stdout:
            assert any(line == text for line in lines), f"{block.name}: no {text!r}{output}"

    unexplained = [
        line
        for line in done.stderr.splitlines()
        if line.strip() and not any(text in line for text in promise.stderr)
    ]
    assert not unexplained, f"{block.name}: unexpected standard error{output}"
    for text in promise.stderr:
        assert text in done.stderr, f"{block.name}: no {text!r} on standard error{output}"

    records = _records_of(server)
    received = {kind: len(items) for kind, items in records.items()}
    expected = promise.receives or dict.fromkeys(KINDS.values(), 0)
    assert received == expected, f"{block.name}: the server received {received}{output}"
    if promise.event_names is not None:
        names = [event["event"] for event in records["events"]]
        assert collections.Counter(names) == collections.Counter(promise.event_names), names
    assert server.invalid == [], server.invalid
    for kind, items in records.items():
        for record in items:
            assert _token_of(kind, record) == TOKEN, (kind, record)


@pytest.mark.subprocess
@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_block_does_what_it_says(
    block: Block, mixpanel_server: MixpanelServer, redis_url: str | None
) -> None:
    with tempfile.TemporaryDirectory(prefix="mp-docs-") as temp:
        promise, done = _run(block, mixpanel_server, Path(temp), redis_url)
    _check(block, promise, done, mixpanel_server)


def test_the_harness_reads_promises() -> None:
    promise = _promise(
        'print("a")  # -> a\n'
        "# stderr -> careful\n"
        '# Mixpanel receives: 2 events ("A", "B"), 1 profile update, 3 group updates\n'
    )
    assert promise.stdout == ["a"]
    assert promise.stderr == ["careful"]
    assert promise.receives == {
        "events": 2,
        "profile_updates": 1,
        "group_updates": 3,
        "imports": 0,
    }
    assert promise.event_names == ["A", "B"]
    with pytest.raises(AssertionError, match="promises nothing"):
        _promise("x = 1\n")
    with pytest.raises(AssertionError, match="names"):
        _promise('# Mixpanel receives: 2 events ("A")\n')


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "source",
    [
        # The root logger stays at WARNING: the INFO record never reaches the handler.
        "import logging\n"
        "from mp_logbridge import MixpanelHandler, tag\n"
        "logging.getLogger().addHandler(MixpanelHandler())\n"
        'logging.getLogger("shop").info("x", extra=tag.track("Signed Up", distinct_id="u1"))\n'
        "# Mixpanel receives: 1 event\n",
        # No user: the message is dropped as invalid, and the loss is reported at exit.
        "import logging\n"
        "from mp_logbridge import MixpanelHandler, tag\n"
        "logging.basicConfig(level=logging.INFO, handlers=[MixpanelHandler()])\n"
        'logging.getLogger("shop").info("x", extra=tag.track("Paid"))\n'
        "# Mixpanel receives: 1 event\n",
        # Prints something else than it says.
        'print("two")  # -> one\n',
        # Sends what it does not say.
        "from mp_logbridge import Tracker\n"
        'Tracker().track("u1", "Signed Up")\n'
        "print('ok')  # -> ok\n",
    ],
    ids=["level", "no-user", "output", "unannounced"],
)
def test_a_block_that_breaks_its_promise_fails(
    source: str, mixpanel_server: MixpanelServer
) -> None:
    """The runner is not a formality: each of these blocks breaks what it says."""
    block = Block(ROOT / "README.md", 0, source)
    with tempfile.TemporaryDirectory(prefix="mp-docs-") as temp:
        promise, done = _run(block, mixpanel_server, Path(temp), None)
    with pytest.raises(AssertionError):
        _check(block, promise, done, mixpanel_server)


# --------------------------------------------------------------------------- tables and reference


def _table_rows(text: str, marker: str) -> list[list[str]]:
    """The rows of the first Markdown table after ``marker`` (header and rule left out)."""
    after = text.split(marker, 1)[1].lstrip("\n")
    rows = []
    for line in after.splitlines():
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[2:]


def test_the_opentelemetry_attribute_table_is_the_code_table() -> None:
    from mp_logbridge.integrations.opentelemetry import ATTRIBUTE_PROPERTIES

    text = (ROOT / "docs" / "opentelemetry.md").read_text(encoding="utf-8")
    documented: dict[str, str] = {}
    for prop, attributes in _table_rows(text, "<!-- attribute-table -->"):
        for attribute in re.findall(r"`([^`]+)`", attributes):
            documented[attribute] = prop.strip("`")
    assert list(documented.items()) == list(ATTRIBUTE_PROPERTIES.items())


def test_the_tracker_operations_table_is_the_vocabulary() -> None:
    from mp_logbridge._vocabulary import GROUPS, PEOPLE

    text = (ROOT / "docs" / "tracker.md").read_text(encoding="utf-8")
    rows = _table_rows(text, "<!-- operations-table -->")
    expected = []
    for scope, table in (("people", PEOPLE), ("groups", GROUPS)):
        lead = "distinct_id" if scope == "people" else "group_key, group_id"
        for operation in table.values():
            arguments = [lead, *operation.arguments]
            if operation.takes_ip:
                arguments.append("ip")
            if operation.takes_optional_params:
                arguments.append("optional_params")
            expected.append(
                [
                    f"`{scope}.{operation.name}`",
                    f"`{operation.operator}`",
                    f"`{', '.join(arguments)}`",
                ]
            )
    assert rows == expected


def test_the_drop_reasons_table_is_the_code_list() -> None:
    from mp_logbridge.consumers import DROP_REASONS

    text = (ROOT / "docs" / "guarantees.md").read_text(encoding="utf-8")
    rows = _table_rows(text, "<!-- drop-reasons -->")
    assert [row[0].strip("`") for row in rows] == list(DROP_REASONS)


def _reference_identifiers() -> list[str]:
    found = []
    for page in sorted((ROOT / "docs" / "reference").glob("*.md")):
        found += re.findall(r"^::: ([\w.]+)$", page.read_text(encoding="utf-8"), re.MULTILINE)
    return found


def _resolve(identifier: str) -> tuple[Any, str]:
    """The object an identifier names, and a key telling objects apart (constants by name)."""
    try:
        return importlib.import_module(identifier), identifier
    except ImportError:
        module, _, name = identifier.rpartition(".")
        value = getattr(importlib.import_module(module), name)
        if isinstance(value, type) or callable(value):
            return value, f"{value.__module__}.{getattr(value, '__qualname__', name)}"
        return value, identifier


PUBLIC_MODULES = [
    "mp_logbridge",
    "mp_logbridge.consumers",
    "mp_logbridge.errors",
    "mp_logbridge.context",
    "mp_logbridge.tags",
    "mp_logbridge.tracker",
    "mp_logbridge.stdlib",
    "mp_logbridge.instrumentation",
    "mp_logbridge.transport",
    "mp_logbridge.testing",
    "mp_logbridge.spool",
    "mp_logbridge.redis",
    "mp_logbridge.relay",
    "mp_logbridge.integrations.opentelemetry",
]


def test_the_reference_documents_every_public_name_once() -> None:
    rendered = collections.Counter(_resolve(ident)[1] for ident in _reference_identifiers())
    twice = [key for key, count in rendered.items() if count > 1]
    assert not twice, f"documented more than once: {twice}"
    missing = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        if module_name not in rendered:
            missing.append(module_name)
        for name in module.__all__:
            if name == "__version__":
                continue
            top = (
                module_name != "mp_logbridge"
                and name in importlib.import_module("mp_logbridge").__all__
            )
            identifier = f"mp_logbridge.{name}" if top else f"{module_name}.{name}"
            key = _resolve(identifier)[1]
            if key not in rendered and _resolve(f"{module_name}.{name}")[1] not in rendered:
                missing.append(f"{module_name}.{name}")
    assert not missing, f"public names missing from docs/reference: {missing}"


def test_the_readme_links_to_pages_that_exist() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((docs/[^)#\s]+)", text)
    assert len(links) >= 10
    for link in links:
        assert (ROOT / link).is_file(), link


def test_every_block_parses() -> None:
    """Cheap first line of defence, before the child interpreters run."""
    for block in BLOCKS:
        ast.parse(block.source, filename=block.name)

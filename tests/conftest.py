"""Shared fixtures: a safety net against real Mixpanel hosts, a check that every request the
library sent in a test conformed to the ingestion spec, a child-process runner, and the
handlers, loggers, library-log capture and consumers that several test modules build.

Importable helpers (plain functions and classes) are in ``support.py``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import ROOT, RecordCollector, attached, child_env, closed_port_url

from mp_logbridge import MixpanelHandler
from mp_logbridge.consumers import BackgroundConsumer
from mp_logbridge.testing import MixpanelServer, SpecViolation, collect_spec_violations


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "allow_spec_violations(*rules): the test sends requests that break the ingestion spec "
        "on purpose (only violations of the given rules, e.g. 'record.properties.token' or "
        "'auth', when rules are given; any otherwise)",
    )


@pytest.fixture(autouse=True)
def _no_real_mixpanel(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Anything built without an explicit host goes to a closed loopback port, never to Mixpanel."""
    for name in (
        "MIXPANEL_TOKEN",
        "MIXPANEL_REGION",
        "MIXPANEL_API_SECRET",
        "MIXPANEL_PROJECT_ID",
        "MIXPANEL_REDIS_URL",
        "MIXPANEL_STREAM",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MIXPANEL_API_HOST", closed_port_url())
    yield


@pytest.fixture(autouse=True)
def _spec_conformance(request: pytest.FixtureRequest) -> Iterator[list[SpecViolation]]:
    """Fail the test if a request any ``MixpanelServer`` of this process received during it
    broke the ingestion spec, unless the test is marked ``allow_spec_violations``.

    Requests sent to receivers in child processes are not seen here.
    """
    with collect_spec_violations() as found:
        yield found
    marker = request.node.get_closest_marker("allow_spec_violations")  # applymarker() included
    if marker is None:
        unexpected = list(found)
    elif marker.args:
        unexpected = [v for v in found if not v.rule.startswith(tuple(marker.args))]
    else:
        unexpected = []
    if unexpected:
        listed = "\n  ".join(str(violation) for violation in unexpected[:10])
        more = f"\n  ... and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""
        pytest.fail(
            f"{len(unexpected)} request(s) broke the ingestion spec:\n  {listed}{more}\n"
            "(mark the test allow_spec_violations if it sends them on purpose)",
            pytrace=False,
        )


@pytest.fixture
def down_url() -> str:
    """A URL of a server that is down."""
    return closed_port_url()


# --------------------------------------------------------------------------- child processes


class ChildResult:
    def __init__(self, completed: subprocess.CompletedProcess[str]) -> None:
        self.returncode = completed.returncode
        self.stdout = completed.stdout
        self.stderr = completed.stderr

    def __repr__(self) -> str:
        return (
            f"ChildResult(rc={self.returncode}, stdout={self.stdout[-2000:]!r}, "
            f"stderr={self.stderr[-2000:]!r})"
        )


@pytest.fixture
def run_python() -> Callable[..., ChildResult]:
    """Run Python source in a child interpreter with a hard timeout; returns stdout/stderr/rc."""

    def run(
        source: str, *, timeout: float = 30.0, env: dict[str, str] | None = None
    ) -> ChildResult:
        completed = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(source)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env(**(env or {})),
            cwd=str(ROOT),
        )
        return ChildResult(completed)

    return run


@pytest.fixture
def server(mixpanel_server: MixpanelServer) -> MixpanelServer:
    """The test's plain ``MixpanelServer``; a module that needs other options overrides this."""
    return mixpanel_server


# --------------------------------------------------------------------------- handlers and loggers


@pytest.fixture
def handler_class() -> type[MixpanelHandler]:
    """The class ``make_handler`` builds; a module overrides this fixture to use a subclass."""
    return MixpanelHandler


@pytest.fixture
def make_handler(
    mixpanel_server: MixpanelServer,
    handler_class: type[MixpanelHandler],
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., MixpanelHandler]]:
    """Handlers sending to the test's server every 50 ms (closed after the test).

    The token defaults to the test module's ``TOKEN``.
    """
    made: list[MixpanelHandler] = []

    def make(token: str | None = request.module.TOKEN, **options: Any) -> MixpanelHandler:
        if "consumer" not in options:  # a given consumer is configured on its own
            options.setdefault("api_host", mixpanel_server.url)
            options.setdefault("flush_interval", 0.05)
        handler = handler_class(token, **options)
        made.append(handler)
        return handler

    yield make
    for handler in made:
        handler.close()


@pytest.fixture
def make_logger(request: pytest.FixtureRequest) -> Iterator[Callable[..., logging.Logger]]:
    """Loggers at DEBUG with the given handlers attached (removed after the test).

    Without ``name`` each call gives a new logger private to the test; ``propagate`` is off
    unless asked for.
    """
    attached_handlers: list[tuple[logging.Logger, logging.Handler]] = []
    made = 0

    def make(
        *handlers: logging.Handler, name: str | None = None, propagate: bool = False
    ) -> logging.Logger:
        nonlocal made
        if name is None:
            name = f"tests.{request.node.nodeid}.{made}"
        made += 1
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        logger.propagate = propagate
        for handler in handlers:
            logger.addHandler(handler)
            attached_handlers.append((logger, handler))
        return logger

    yield make
    for logger, handler in attached_handlers:
        logger.removeHandler(handler)


@pytest.fixture
def library_warnings() -> Iterator[RecordCollector]:
    """Records logged on the library's own (non-propagating) ``mp_logbridge`` logger."""
    with attached(logging.getLogger("mp_logbridge"), RecordCollector()) as collector:
        yield collector


# --------------------------------------------------------------------------- consumers


@pytest.fixture
def consumer_defaults() -> dict[str, Any]:
    """Options ``consumers`` uses unless given; a module overrides this fixture to set its own."""
    return {}


@pytest.fixture
def consumers(consumer_defaults: dict[str, Any]) -> Iterator[Callable[..., BackgroundConsumer]]:
    """Make AsyncConsumers that are closed (bounded) after the test."""
    made: list[BackgroundConsumer] = []

    def make(**options: Any) -> BackgroundConsumer:
        consumer = BackgroundConsumer(**{**consumer_defaults, **options})
        made.append(consumer)
        return consumer

    yield make
    for consumer in made:
        consumer.close(timeout=2)

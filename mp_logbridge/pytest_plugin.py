"""pytest plugin (registered on install): the ``mixpanel_server`` fixture.

``mixpanel_server`` is a started :class:`mp_logbridge.testing.MixpanelServer`, stopped after the
test; point code under test at it with ``api_host=mixpanel_server.url``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .testing import MixpanelServer

__all__ = ["mixpanel_server"]


@pytest.fixture
def mixpanel_server() -> Iterator[MixpanelServer]:
    """A Mixpanel ingestion API on loopback for one test."""
    with MixpanelServer() as server:
        yield server

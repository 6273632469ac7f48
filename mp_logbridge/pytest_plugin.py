"""pytest plugin (registered on install): the ``mixpanel_server`` and ``mixpanel_messages`` fixtures.

``mixpanel_server`` is a started :class:`mp_logbridge.testing.MixpanelServer`, stopped after the
test; point code under test at it with ``api_host=mixpanel_server.url``.

``mixpanel_messages`` collects every message the library's consumers are given during the test,
without sending anything (:func:`mp_logbridge.testing.capture_messages`)::

    def test_signup(mixpanel_messages):
        signup("u1")
        assert mixpanel_messages.events("Signed Up")[0]["properties"]["distinct_id"] == "u1"
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .testing import Capture, MixpanelServer, capture_messages

__all__ = ["mixpanel_messages", "mixpanel_server"]


@pytest.fixture
def mixpanel_server() -> Iterator[MixpanelServer]:
    """A Mixpanel ingestion API on loopback for one test."""
    with MixpanelServer() as server:
        yield server


@pytest.fixture
def mixpanel_messages() -> Iterator[Capture]:
    """The messages the code under test produced (captured, never sent)."""
    with capture_messages() as captured:
        yield captured

"""The Django middleware, in a real Django project (``djangoapp``) driven by Django's test
clients: sync views through the WSGI handler, async views through the ASGI handler, the user
from ``django.contrib.auth`` (a real database), configuration from ``settings.LOGGING`` and
``settings.MIXPANEL``, and the OpenTelemetry Django instrumentation reading the user after the
request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("django")

from mp_logbridge.testing import MixpanelServer

TOKEN = "django-test-token"


@pytest.fixture(scope="module")
def receiver() -> Iterator[MixpanelServer]:
    with MixpanelServer() as server:
        yield server


@pytest.fixture(scope="module")
def project(receiver: MixpanelServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import djangoapp
    from django.conf import settings

    if settings.configured:  # pragma: no cover - configured by an earlier module
        pytest.skip("Django was configured elsewhere in this process")
    database = tmp_path_factory.mktemp("django") / "db.sqlite3"
    djangoapp.configure(receiver.url, str(database), token=TOKEN)
    from django.contrib.auth.models import User
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    User.objects.create_user("alice", password="pw")
    yield djangoapp
    handler = logging.getLogger("djangoapp").handlers[0]
    handler.close()


@pytest.fixture
def server(receiver: MixpanelServer, project: Any) -> MixpanelServer:
    receiver.clear()
    return receiver


def _flush() -> None:
    handler = logging.getLogger("djangoapp").handlers[0]
    assert handler.flush(5)  # type: ignore[attr-defined]


def _alice() -> Any:
    from django.contrib.auth.models import User

    return User.objects.get(username="alice")


def test_sync_view_gets_the_authenticated_user_route_and_request_id(server: MixpanelServer) -> None:
    from django.test import Client

    client = Client()
    client.force_login(_alice())
    response = client.get("/articles/2024/", HTTP_X_CORRELATION_ID="corr-1")
    assert response.status_code == 200
    Client().get("/articles/1999/")  # anonymous: the handler's default user
    _flush()
    first, second = server.events
    assert first["properties"]["distinct_id"] == _alice().pk
    assert first["properties"]["route"] == "articles/<int:year>/"
    assert first["properties"]["request_id"] == "corr-1"
    assert first["properties"]["year"] == 2024
    assert second["properties"]["distinct_id"] == "guest-visitor"
    assert len(second["properties"]["request_id"]) == 32  # made up when none was sent


def test_async_view_reads_the_user_without_blocking(server: MixpanelServer) -> None:
    from asgiref.sync import sync_to_async
    from django.test import AsyncClient

    async def main() -> None:
        client = AsyncClient()
        await client.aforce_login(await sync_to_async(_alice)())
        responses = await asyncio.gather(
            client.get("/async/first/"), AsyncClient().get("/async/second/")
        )
        assert [r.status_code for r in responses] == [200, 200]

    asyncio.run(main())
    _flush()
    by_name = {e["properties"]["name"]: e["properties"] for e in server.events}
    assert by_name["first"]["distinct_id"] == _alice().pk
    assert (
        by_name["second"]["distinct_id"] == "guest-visitor"
    )  # requests do not leak into each other
    assert by_name["first"]["route"] == "async/<slug:name>/"


def test_identify_names_the_user_later_and_nothing_leaks_after(server: MixpanelServer) -> None:
    from django.test import Client

    from mp_logbridge.context import current_context

    Client().get("/login/")
    _flush()
    users = {e["event"]: e["properties"]["distinct_id"] for e in server.events}
    assert users == {"Before Login": "guest-visitor", "After Login": "late-user"}
    assert current_context().distinct_id is None  # unbound when the request ended


def test_a_failing_view_still_unbinds(server: MixpanelServer) -> None:
    from django.test import Client

    from mp_logbridge.context import current_context

    client = Client(raise_request_exception=False)
    client.force_login(_alice())
    assert client.get("/broken/").status_code == 500
    _flush()
    [event] = server.events
    assert event["properties"]["distinct_id"] == _alice().pk
    assert current_context().distinct_id is None


def test_the_distinct_id_setting_takes_a_dotted_path(server: MixpanelServer) -> None:
    from django.test import Client, override_settings

    from mp_logbridge.integrations.django import MixpanelMiddleware

    with override_settings(MIXPANEL={"DISTINCT_ID": "djangoapp.user_from_header"}):
        Client().get("/articles/1/", HTTP_X_API_USER="api-7")
    _flush()
    assert server.events[0]["properties"]["distinct_id"] == "api-7"
    with override_settings(MIXPANEL={"DISTINCT_ID_TYPO": 1}):
        from django.core.exceptions import ImproperlyConfigured

        with pytest.raises(ImproperlyConfigured, match="DISTINCT_ID_TYPO"):
            MixpanelMiddleware(lambda request: None)


def test_opentelemetry_server_span_knows_the_user(server: MixpanelServer) -> None:
    """With the Django instrumentation the server span ends after the middleware unbound the
    user: the span attribute ``enduser.id`` the middleware set is what names the user."""
    from django.test import Client
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.sdk.trace import TracerProvider

    from mp_logbridge.integrations.opentelemetry import MixpanelSpanProcessor

    provider = TracerProvider()
    spans = MixpanelSpanProcessor(TOKEN, api_host=server.url, flush_interval=0.05)
    provider.add_span_processor(spans)
    DjangoInstrumentor().instrument(tracer_provider=provider)
    try:
        from django.conf import settings
        from django.test.utils import override_settings

        # The instrumentor adds its middleware to settings.MIDDLEWARE; a new handler picks it up.
        with override_settings(MIDDLEWARE=list(settings.MIDDLEWARE)):
            client = Client()
            client.force_login(_alice())
            client.get("/articles/7/")
            Client().get("/articles/8/")
        assert spans.force_flush(5000)
        _flush()
        pages = [e for e in server.events if e["event"] == "Page Viewed"]
        assert len(pages) == 1, server.events  # the anonymous request named nobody
        assert pages[0]["properties"]["distinct_id"] == str(_alice().pk)
        assert pages[0]["properties"]["route"] == "articles/<int:year>/"
        assert spans.stats()["no_user"] == 1
    finally:
        DjangoInstrumentor().uninstrument()
        spans.shutdown()
        provider.shutdown()

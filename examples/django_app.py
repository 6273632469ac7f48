"""A Django project in one file, whose requests know their user: ``MixpanelMiddleware``.

The handler is configured in ``settings.LOGGING`` (dictConfig), the middleware sits after
Django's ``AuthenticationMiddleware``, and every tagged log record made during a request gets
the signed-in user, the URL pattern as ``route`` and a ``request_id`` — in sync views and in
async views alike. Run it: ``python examples/django_app.py`` — it drives the project with
Django's test clients against a local receiver (no server, a throwaway SQLite database).
"""

import asyncio
import logging
import sys
import tempfile
from pathlib import Path

import django
from django.conf import settings
from django.http import JsonResponse
from django.urls import path

from mp_logbridge import tag
from mp_logbridge.testing import MixpanelServer

log = logging.getLogger("shop")


def product(request, product_id: int) -> JsonResponse:
    log.info("product viewed", extra=tag.track("Product Viewed", product_id=product_id))
    return JsonResponse({"id": product_id})


async def checkout(request) -> JsonResponse:
    log.info("checkout", extra=tag.track("Checkout Started"))
    return JsonResponse({"ok": True})


urlpatterns = [path("products/<int:product_id>/", product), path("checkout/", checkout)]


def configure(receiver_url: str, database: str) -> None:
    settings.configure(
        SECRET_KEY="example-only",
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["testserver"],
        INSTALLED_APPS=[
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.sessions",
        ],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": database}},
        MIDDLEWARE=[
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "mp_logbridge.integrations.django.MixpanelMiddleware",
        ],
        MIXPANEL={"REQUEST_ID_HEADER": "X-Request-ID"},
        LOGGING={
            "version": 1,
            "disable_existing_loggers": False,
            "handlers": {
                "mixpanel": {
                    "class": "mp_logbridge.MixpanelHandler",
                    "token": "YOUR_PROJECT_TOKEN",
                    "api_host": receiver_url,
                    "default_distinct_id": "visitor",
                }
            },
            "loggers": {"shop": {"handlers": ["mixpanel"], "level": "INFO"}},
        },
    )
    django.setup()


def main() -> None:
    sys.modules.setdefault("django_app", sys.modules[__name__])
    with MixpanelServer() as receiver, tempfile.TemporaryDirectory() as tmp:
        configure(receiver.url, str(Path(tmp) / "db.sqlite3"))
        from asgiref.sync import sync_to_async
        from django.contrib.auth.models import User
        from django.core.management import call_command
        from django.test import AsyncClient, Client

        call_command("migrate", verbosity=0)
        alice = User.objects.create_user("alice", password="example")

        client = Client()
        client.force_login(alice)
        client.get("/products/42/", HTTP_X_REQUEST_ID="req-1")  # a sync view
        Client().get("/products/7/")  # nobody signed in

        async def shop_async() -> None:
            async_client = AsyncClient()
            await async_client.aforce_login(await sync_to_async(User.objects.get)(username="alice"))
            await async_client.get("/checkout/")  # an async view

        asyncio.run(shop_async())
        logging.getLogger("shop").handlers[0].flush()
        for event in receiver.events:
            p = event["properties"]
            print(event["event"], p["distinct_id"], p["route"], p["request_id"][:5])


if __name__ == "__main__":
    main()

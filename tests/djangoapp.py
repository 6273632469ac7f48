"""A small Django project for the integration tests: settings, URLs and views in one module.

``configure(receiver_url, database)`` sets it up (Django allows that once per process): the
handler comes from ``settings.LOGGING`` (dictConfig), the middleware from ``MIDDLEWARE`` and
its options from ``MIXPANEL``.
"""

from __future__ import annotations

import logging
from typing import Any

from django.http import HttpRequest, JsonResponse
from django.urls import path

from mp_logbridge import tag
from mp_logbridge.integrations.django import identify

log = logging.getLogger("djangoapp")


def article(request: HttpRequest, year: int) -> JsonResponse:
    log.info("article", extra=tag.track("Article Viewed", year=year))
    return JsonResponse({"year": year})


async def async_article(request: HttpRequest, name: str) -> JsonResponse:
    log.info("async article", extra=tag.track("Async Viewed", name=name))
    return JsonResponse({"name": name})


def late_login(request: HttpRequest) -> JsonResponse:
    log.info("before", extra=tag.track("Before Login"))
    identify("late-user")
    log.info("after", extra=tag.track("After Login"))
    return JsonResponse({})


def broken(request: HttpRequest) -> JsonResponse:
    log.info("about to fail", extra=tag.track("Broken Viewed"))
    raise RuntimeError("view failed")


urlpatterns = [
    path("articles/<int:year>/", article),
    path("async/<slug:name>/", async_article),
    path("login/", late_login),
    path("broken/", broken),
]


def user_from_header(request: HttpRequest) -> Any:
    """A ``MIXPANEL['DISTINCT_ID']`` callable."""
    return request.headers.get("X-Api-User")


def configure(receiver_url: str, database: str, *, token: str, otel: bool = False) -> None:
    import django
    from django.conf import settings

    middleware = [
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "mp_logbridge.integrations.django.MixpanelMiddleware",
    ]
    settings.configure(
        DEBUG=False,
        SECRET_KEY="test-only",
        ALLOWED_HOSTS=["testserver", "127.0.0.1"],
        ROOT_URLCONF="djangoapp",
        INSTALLED_APPS=[
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.sessions",
        ],
        MIDDLEWARE=middleware,
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": database}},
        USE_TZ=True,
        MIXPANEL={"REQUEST_ID_HEADER": "X-Correlation-ID"},
        LOGGING={
            "version": 1,
            "disable_existing_loggers": False,
            "handlers": {
                "mixpanel": {
                    "class": "mp_logbridge.MixpanelHandler",
                    "token": token,
                    "api_host": receiver_url,
                    "flush_interval": 0.05,
                    "default_distinct_id": "guest-visitor",
                    "redact": ["secret"],
                }
            },
            "loggers": {"djangoapp": {"handlers": ["mixpanel"], "level": "INFO"}},
        },
    )
    django.setup()

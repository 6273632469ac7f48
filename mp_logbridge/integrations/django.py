"""Django: a middleware that binds the request's user, route and request id.

``settings.py``::

    MIDDLEWARE = [
        ...,
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "mp_logbridge.integrations.django.MixpanelMiddleware",   # after authentication
    ]
    LOGGING = {   # the handler is configured the usual way
        "version": 1,
        "handlers": {"mixpanel": {"class": "mp_logbridge.MixpanelHandler", "token": "..."}},
        "root": {"handlers": ["mixpanel"], "level": "INFO"},
    }
    MIXPANEL = {"DISTINCT_ID": "myapp.analytics.user_id"}   # optional

Every tagged log record and instrumented call made while a request runs belongs to its user
(``request.user.pk`` when authenticated, or what ``MIXPANEL["DISTINCT_ID"]`` returns) and
carries ``route`` (the URL pattern, ``"articles/<int:year>/"``) and ``request_id``. Works with sync
and async views (Django runs the middleware in the mode of the stack around it); in async mode
the user is read with ``request.auser()``, so no database call blocks the event loop.

``MIXPANEL`` settings (all optional):

* ``DISTINCT_ID``: ``callable(request) -> id | None`` or its dotted path; in async mode a
  coroutine function is awaited and a plain function runs in a thread.
* ``REQUEST_ID_HEADER``: the header with the request id (default ``"X-Request-ID"``; a new id
  is made when it is absent).
* ``FLUSH_TIMEOUT``: flush every background consumer after each response, bounded by this many
  seconds (serverless deployments).
* ``SET_SPAN_USER``: set ``enduser.id`` on the current OpenTelemetry span (default ``True``).

To turn delivery off (tests, local development), set ``MIXPANEL_DISABLED=1`` in the environment
or ``"disabled": True`` in the handler's ``LOGGING`` entry: the handlers exist before any
middleware is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings

from .._aio import off_loop
from .._context import bind, unbind
from .._diagnostics import warn
from .._lifecycle import flush_all
from .._policy import resolve_callable
from ._web import bind_request, identify, name_user_on_span, request_id_from

__all__ = ["MixpanelMiddleware", "identify"]

_SETTINGS = ("DISTINCT_ID", "REQUEST_ID_HEADER", "FLUSH_TIMEOUT", "SET_SPAN_USER")


def _user_pk(request: Any) -> Any:
    user = getattr(request, "user", None)
    if user is not None and getattr(user, "is_authenticated", False):
        return user.pk
    return None


class MixpanelMiddleware:
    """Binds ``distinct_id``, ``route`` and ``request_id`` for the duration of each request
    (see the module's documentation for the ``MIXPANEL`` settings)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)
        config = dict(getattr(settings, "MIXPANEL", None) or {})
        unknown = sorted(set(config) - set(_SETTINGS))
        if unknown:
            from django.core.exceptions import ImproperlyConfigured

            raise ImproperlyConfigured(
                f"MIXPANEL has unknown setting(s) {', '.join(unknown)}; known: {', '.join(_SETTINGS)}"
            )
        given = config.get("DISTINCT_ID")
        self._custom_user = given is not None
        self._user_of: Callable[[Any], Any] = (
            resolve_callable(given, "MIXPANEL['DISTINCT_ID']") if given is not None else _user_pk
        )
        header = str(config.get("REQUEST_ID_HEADER") or "X-Request-ID")
        self._meta_key = "HTTP_" + header.upper().replace("-", "_")
        self._flush_timeout = config.get("FLUSH_TIMEOUT")
        self._set_span_user = bool(config.get("SET_SPAN_USER", True))

    # ------------------------------------------------------------------ sync

    def __call__(self, request: Any) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        try:
            user = self._user_of(request)
        except Exception as exc:
            _report(exc)
            user = None
        token = bind_request(user, self._properties(request), set_span_user=self._set_span_user)
        try:
            response = self.get_response(request)
            if self._set_span_user:
                name_user_on_span()
            return response
        finally:
            unbind(token)
            if self._flush_timeout is not None:
                flush_all(float(self._flush_timeout))

    # ------------------------------------------------------------------ async

    async def __acall__(self, request: Any) -> Any:
        user = await self._auser(request)
        token = bind_request(user, self._properties(request), set_span_user=self._set_span_user)
        try:
            response = await self.get_response(request)
            if self._set_span_user:
                name_user_on_span()
            return response
        finally:
            unbind(token)
            if self._flush_timeout is not None:
                await off_loop(flush_all, float(self._flush_timeout))

    async def _auser(self, request: Any) -> Any:
        try:
            if self._custom_user:
                if iscoroutinefunction(self._user_of):
                    return await self._user_of(request)
                return await sync_to_async(self._user_of)(request)
            auser = getattr(request, "auser", None)
            if auser is None:  # no AuthenticationMiddleware before this one
                return None
            user = await auser()
            return user.pk if getattr(user, "is_authenticated", False) else None
        except Exception as exc:
            _report(exc)
            return None

    # ------------------------------------------------------------------ both

    def process_view(self, request: Any, view_func: Any, view_args: Any, view_kwargs: Any) -> None:
        """The URL is resolved now: bind the route pattern (reset with the rest at the end)."""
        match = getattr(request, "resolver_match", None)
        route = getattr(match, "route", None)
        if route:
            bind(route=str(route))

    def _properties(self, request: Any) -> dict[str, Any]:
        return {
            "route": request.path,  # the pattern replaces it once the URL is resolved
            "request_id": request_id_from(request.META.get(self._meta_key)),
        }


def _report(exc: Exception) -> None:
    warn("mp_logbridge: MIXPANEL['DISTINCT_ID'] raised %s: %s", type(exc).__name__, exc)

"""ASGI middleware (Starlette, FastAPI, Quart, Django's ASGI app, any ASGI app): binds the
request's user, route and request id for every message logged while the request runs.

::

    from mp_logbridge.integrations.asgi import MixpanelMiddleware

    def user_of(scope):  # from a header here; scope["user"] after an authentication middleware
        return dict(scope["headers"]).get(b"x-user-id", b"").decode() or None

    app.add_middleware(MixpanelMiddleware, distinct_id=user_of)
    # or, around any ASGI app:
    app = MixpanelMiddleware(app, distinct_id=user_of)

A pure ASGI middleware: nothing it does blocks the event loop (binding is a context variable;
``flush_timeout=`` flushes in a thread after each request, for serverless deployments). HTTP and
WebSocket scopes are bound; lifespan events pass through untouched.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .._aio import off_loop
from .._context import unbind
from .._diagnostics import warn
from .._lifecycle import flush_all
from ._web import bind_request, identify, name_user_on_span, request_id_from

__all__ = ["MixpanelMiddleware", "identify"]

Scope = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]
]


class MixpanelMiddleware:
    """Binds ``distinct_id``, ``route`` and ``request_id`` around each HTTP/WebSocket request.

    Args:
        app: the ASGI application to wrap.
        distinct_id: ``callable(scope) -> id | None`` (or a coroutine function): who the request
            is for, e.g. from ``scope["user"]`` (Starlette's ``AuthenticationMiddleware``, placed
            before this one), a header or a session. Errors it raises are reported, never
            raised into the request.
        route: bind the matched route template (``/users/{user_id}``) when the wrapped app has
            Starlette-style routes; otherwise the path (default on).
        request_id_header: the header carrying the request id (a new id is made when absent).
        flush_timeout: when set, flush every background consumer after each request, bounded by
            this many seconds, without blocking the event loop (serverless deployments).
        set_span_user: set ``enduser.id`` on the current OpenTelemetry span, so the span
            processor knows the user after the request (default on).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        distinct_id: Callable[[Scope], Any] | None = None,
        route: bool = True,
        request_id_header: str = "x-request-id",
        flush_timeout: float | None = None,
        set_span_user: bool = True,
    ) -> None:
        if distinct_id is not None and not callable(distinct_id):
            raise TypeError("distinct_id must be a callable taking the ASGI scope")
        self.app = app
        self._user_of = distinct_id
        self._route = bool(route)
        self._header = request_id_header.lower().encode("latin-1")
        self._flush_timeout = flush_timeout
        self._set_span_user = bool(set_span_user)
        self._routes: list[Any] | None = None

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        user = await self._user(scope)
        properties = {
            "route": self._route_of(scope),
            "request_id": request_id_from(_header(scope, self._header)),
        }
        token = bind_request(user, properties, set_span_user=self._set_span_user)
        try:
            await self.app(scope, receive, send)
        finally:
            if self._set_span_user:
                name_user_on_span()  # the user as it is at the end (identify() included)
            try:
                unbind(token)
            except ValueError:  # pragma: no cover - unbound in another context by the app
                pass
            if self._flush_timeout is not None:
                await off_loop(flush_all, self._flush_timeout)

    async def _user(self, scope: Scope) -> Any:
        if self._user_of is None:
            return None
        try:
            user = self._user_of(scope)
            if inspect.isawaitable(user):
                user = await user
            return user
        except Exception as exc:
            warn("mp_logbridge: distinct_id callable raised %s: %s", type(exc).__name__, exc)
            return None

    def _route_of(self, scope: Scope) -> str:
        path = str(scope.get("path") or "")
        if not self._route:
            return path
        given = scope.get("route")
        if isinstance(given, str):  # frameworks that set it themselves
            return given
        routes = self._routes
        if routes is None:
            routes = self._routes = _find_routes(self.app)
        try:
            return _match(routes, scope, "") or path
        except Exception:  # a route class of another shape
            return path


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return bytes(value)
    return None


def _find_routes(app: Any, depth: int = 0) -> list[Any]:
    """The routes of the first Starlette-style router in the chain of wrapped apps."""
    while app is not None and depth < 32:
        routes = getattr(app, "routes", None)
        if isinstance(routes, list):
            return routes
        router = getattr(app, "router", None)
        if router is not None and isinstance(getattr(router, "routes", None), list):
            return list(router.routes)
        app = getattr(app, "app", None)
        depth += 1
    return []


def _match(routes: list[Any], scope: Scope, prefix: str) -> str | None:
    for route in routes:
        candidates = getattr(route, "effective_candidates", None)
        if callable(candidates):  # FastAPI's included routers: their routes' full paths
            found = _match_paths(candidates(), str(scope.get("path") or ""))
            if found is not None:
                return found
            continue
        matches = getattr(route, "matches", None)
        if matches is None:
            continue
        found_match, child = matches(scope)
        if getattr(found_match, "name", "") != "FULL":
            continue
        path = str(getattr(route, "path", "") or "")
        inner = getattr(route, "routes", None)
        if inner and isinstance(child, dict) and "root_path" in child:  # a Mount
            below = _match(list(inner), {**scope, **child}, prefix + path)
            return below if below is not None else prefix + path
        return prefix + path
    return None


_compiled: dict[str, Any] = {}


def _match_paths(candidates: Any, path: str) -> str | None:
    """The first candidate whose (full) route path matches ``path``."""
    from starlette.routing import compile_path

    for candidate in candidates:
        nested = getattr(candidate, "effective_candidates", None)
        if callable(nested):
            found = _match_paths(nested(), path)
            if found is not None:
                return found
            continue
        template = getattr(candidate, "path", None)
        if not isinstance(template, str) or not template:
            continue
        regex = _compiled.get(template)
        if regex is None:
            regex = _compiled[template] = compile_path(template)[0]
        if regex.match(path):
            return template
    return None

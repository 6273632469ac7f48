"""Flask: an extension binding each request's user, route and request id.

::

    from mp_logbridge.integrations.flask import MixpanelFlask

    mixpanel = MixpanelFlask(app, distinct_id=lambda request: session.get("user_id"))
    # or, with an application factory:
    mixpanel = MixpanelFlask(distinct_id=...)
    mixpanel.init_app(app)

Every tagged log record and instrumented call made during a request belongs to its user and
carries ``route`` (the URL rule, ``/users/<int:user_id>``) and ``request_id``. With
``flush_timeout=`` every background consumer is flushed when the request is torn down
(serverless deployments), bounded by that many seconds. Without ``distinct_id=`` the user is
Flask-Login's ``current_user`` when that package is in use. :func:`identify` names the user
later in the request (a login view).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, g, request

from .._context import unbind
from .._diagnostics import warn
from .._lifecycle import flush_all
from ._web import bind_request, identify, name_user_on_span, request_id_from

__all__ = ["MixpanelFlask", "identify"]

_TOKEN = "_mp_logbridge_token"


def _flask_login_user(_request: Any) -> Any:
    module = sys.modules.get("flask_login")
    if module is None:
        return None
    user = module.current_user
    if getattr(user, "is_authenticated", False):
        return user.get_id()
    return None


class MixpanelFlask:
    """The Flask extension (see the module's documentation).

    Args:
        app: the application (or call :meth:`init_app` later).
        distinct_id: ``callable(request) -> id | None``: who the request is for. Errors it
            raises are reported on the ``mp_logbridge`` logger, never raised into the request.
        request_id_header: the header carrying the request id (a new id is made when absent).
        flush_timeout: flush every background consumer at teardown, bounded by this many seconds.
        set_span_user: set ``enduser.id`` on the current OpenTelemetry span (default on), at
            the start of the request and again after the response is made.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        distinct_id: Callable[[Any], Any] | None = None,
        request_id_header: str = "X-Request-ID",
        flush_timeout: float | None = None,
        set_span_user: bool = True,
    ) -> None:
        if distinct_id is not None and not callable(distinct_id):
            raise TypeError("distinct_id must be a callable taking the request")
        self._user_of = distinct_id or _flask_login_user
        self._header = request_id_header
        self._flush_timeout = flush_timeout
        self._set_span_user = bool(set_span_user)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register the request hooks on ``app``."""
        app.before_request(self._before)
        app.after_request(self._after)
        app.teardown_request(self._teardown)
        app.extensions["mp_logbridge"] = self

    def _before(self) -> None:
        try:
            user = self._user_of(request)
        except Exception as exc:
            warn("mp_logbridge: distinct_id callable raised %s: %s", type(exc).__name__, exc)
            user = None
        rule = request.url_rule
        properties = {
            "route": rule.rule if rule is not None else request.path,
            "request_id": request_id_from(request.headers.get(self._header)),
        }
        setattr(g, _TOKEN, bind_request(user, properties, set_span_user=self._set_span_user))

    def _after(self, response: Response) -> Response:
        if self._set_span_user:
            name_user_on_span()  # the server span is still open here, whatever the hook order
        return response

    def _teardown(self, _error: BaseException | None) -> None:
        token = g.pop(_TOKEN, None)
        if token is not None:
            try:
                unbind(token)
            except ValueError:  # pragma: no cover - torn down in another context
                pass
        if self._flush_timeout is not None:
            flush_all(self._flush_timeout)

"""What the web integrations (Django, ASGI, Flask) share: who the request is for, what to bind
for it, and naming the user on the OpenTelemetry server span.

Binding lives in a context variable (:func:`mp_logbridge.bind`), so it is gone once the request
is over. With OpenTelemetry instrumentation the server span ends *after* the application
returned, when nothing is bound any more; so the integrations also set the span attribute
``enduser.id`` (OpenTelemetry's convention), which the span processor and exporter of
:mod:`mp_logbridge.integrations.opentelemetry` read first — at the start of the request and
again at its end (a user named during the request with :func:`identify` included).
"""

from __future__ import annotations

import uuid
from contextvars import Token
from typing import Any

from opentelemetry import trace as _trace

from .._context import BoundContext, bind, current_context
from .._diagnostics import warn

__all__ = ["ENDUSER_ATTRIBUTE", "as_user", "bind_request", "identify", "name_user_on_span"]

#: The span attribute naming the user (OpenTelemetry's semantic conventions).
ENDUSER_ATTRIBUTE = "enduser.id"


def as_user(value: Any) -> str | int | None:
    """A ``distinct_id`` from what an application's user callable returned: strings and
    integers as they are, ``None``/``""``/booleans as nobody, anything else (a UUID) as text."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (str, int)):
        return value if value != "" else None
    try:
        text = str(value)
    except Exception:
        return None
    return text or None


def request_id_from(value: Any) -> str:
    """The request id a client or proxy sent (cut to 128 characters), or a new one."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str) and value.strip():
        return value.strip()[:128]
    return uuid.uuid4().hex


def bind_request(
    distinct_id: Any, properties: dict[str, Any], *, set_span_user: bool = True
) -> Token[BoundContext]:
    """Bind the request's user and properties; returns the token to unbind at its end.

    Never raises: a property that cannot be bound is left out (and reported).
    """
    user = as_user(distinct_id)
    try:
        token = bind(user, **properties)
    except Exception as exc:  # a property value that cannot be sent
        warn("mp_logbridge: request properties not bound: %s", exc)
        token = bind(user)
    if set_span_user and user is not None:
        name_user_on_span(user)
    return token


def name_user_on_span(user: Any = None) -> None:
    """Set ``enduser.id`` on the current OpenTelemetry span, when one is recording (``user``
    defaults to the one bound now). Never raises."""
    try:
        if user is None:
            user = current_context().distinct_id
            if user is None:
                return
        span = _trace.get_current_span()
        if span.is_recording():
            span.set_attribute(ENDUSER_ATTRIBUTE, str(user))
    except Exception:  # never into the application
        return


def identify(distinct_id: str | int) -> Token[BoundContext]:
    """Name the user of the current request once it is known (a login view, a token checked
    by the view itself): binds it for the rest of the request and names it on the current
    OpenTelemetry span. The integration restores what was bound before the request when the
    request ends; outside a request, unbind the token returned yourself."""
    token = bind(distinct_id)
    name_user_on_span(distinct_id)
    return token

"""Integrations: front doors for the frameworks and telemetry pipelines an application already runs.

Each integration is a module of its own, imported only when used, so ``import mp_logbridge``
never imports the framework it adapts:

* :mod:`mp_logbridge.integrations.django` — ``MixpanelMiddleware`` (sync and async);
* :mod:`mp_logbridge.integrations.asgi` — ``MixpanelMiddleware`` for any ASGI app (FastAPI,
  Starlette, ...);
* :mod:`mp_logbridge.integrations.flask` — the ``MixpanelFlask`` extension;
* :mod:`mp_logbridge.integrations.celery` — ``setup_celery`` (prefork children deliver before
  ``os._exit``, task users and outcomes);
* :mod:`mp_logbridge.integrations.rq` — ``MixpanelWorker`` (work horses deliver before
  ``os._exit``);
* :mod:`mp_logbridge.integrations.aws_lambda` — ``flush_before_return`` for serverless handlers;
* :mod:`mp_logbridge.integrations.opentelemetry` — spans and log records as Mixpanel messages
  (needs the ``otel`` extra: ``pip install 'mp_logbridge[otel]'``).

The web integrations bind the request's user, route and request id with
:func:`mp_logbridge.bind`, and name the user on the OpenTelemetry server span (``enduser.id``),
where the OpenTelemetry bridge finds it after the request.
"""

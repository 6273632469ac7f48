"""Integrations: front doors for the frameworks and telemetry pipelines an application already runs.

Each integration is a module of its own, imported only when used, so ``import mp_logbridge``
never imports the framework it adapts (``mp_logbridge.integrations.opentelemetry`` needs the
``otel`` extra: ``pip install 'mp_logbridge[otel]'``).
"""

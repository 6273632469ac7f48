"""Function calls as events, with OpenTelemetry trace context.

``@instrument`` turns each call into an event (duration, success, exception, chosen arguments).
With ``span=True`` it also opens an OpenTelemetry span, and the event carries the span's
``trace_id``/``span_id`` — so a slow or failing call in Mixpanel leads straight to its trace.
Run it: ``python examples/otel_decorator.py`` (with ``--console`` the OpenTelemetry SDK's console
exporter prints the spans; the SDK is optional: without it spans are no-ops).
"""

import logging
import sys

from mp_logbridge import MixpanelHandler, bound, instrument
from mp_logbridge.testing import MixpanelServer


@instrument("Report Exported", distinct_id="user_id", capture_args=["fmt"], span=True)
def export_report(user_id: str, fmt: str = "csv") -> bytes:
    return b"..."


@instrument("Payment Attempted", capture_args=["amount"], span=True)
def pay(amount: float) -> None:
    if amount > 100:
        raise ValueError("declined")


def setup_tracing(console: bool) -> None:
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
    except ImportError:
        print("(opentelemetry-sdk not installed: spans are no-ops, events carry no trace ids)")
        return
    provider = TracerProvider()
    if console:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)


def main(console: bool = False) -> None:
    setup_tracing(console)
    with MixpanelServer() as receiver:
        handler = MixpanelHandler("YOUR_PROJECT_TOKEN", api_host=receiver.url)
        logging.basicConfig(level=logging.INFO, handlers=[handler])
        export_report("u-7", fmt="pdf")
        with bound(distinct_id="u-7"):
            try:
                pay(250.0)
            except ValueError:
                pass
        handler.flush()
        for event in receiver.events:
            props = event["properties"]
            print(
                event["event"],
                "success" if props["success"] else props["exception_type"],
                f"{props['duration_ms']} ms",
                "trace",
                props.get("trace_id"),
            )


if __name__ == "__main__":
    main("--console" in sys.argv)

"""Every example in examples/ runs against the local receiver and does what it says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from redis_support import require_redis
from support import child_env

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# example file -> lines its output must contain
EXPECTED = {
    "quickstart.py": [
        "events: ['Signed Up', 'Purchase', 'Viewed Pricing']",
        "delivery: 5 sent, 0 dropped",
    ],
    "dictconfig_dict.py": [
        "Invoice Paid {'service': 'billing', 'env': 'dev', 'logger': 'billing.invoices'"
    ],
    "dictconfig_file.py": ["logging.json -> API Call api req-1"],
    "eu_region.py": [
        "region='eu' sends events to https://api-eu.mixpanel.com/track",
        "received: ['Signed Up', 'Signed Up'] 1 profile update(s)",
    ],
    "ruby_sdk_examples.py": [
        "12345 $append {'$transactions': {'$time': '2013-01-02T00:00:00', '$amount': 30.5}} {}",
        "user_id1 App Open [1000, 1234]",
        "12345 $set {'$first_name': 'John'",
        "{'$ip': 0, '$ignore_time': 'true'}",
    ],
    "otel_decorator.py": ["Report Exported success", "Payment Attempted ValueError"],
    "flask_app.py": [
        "Signed Up u-100 /signup {'plan': 'pro'}",
        "Search u-200 /search {'query': 'red', 'results': 1}",
    ],
    "prefork_workers.py": [
        "15 'Job Done' events from 3 workers, 1 'Server Started' (sent once, by the parent)"
    ],
    "serverless_handler.py": [
        "after invocation: 1 event(s) delivered",
        "after invocation: 3 event(s) delivered",
        "request ids: ['req-0', 'req-1', 'req-2']",
    ],
    "django_app.py": [
        "Product Viewed 1 products/<int:product_id>/ req-1",
        "Product Viewed visitor products/<int:product_id>/",
        "Checkout Started 1 checkout/",
    ],
    "fastapi_app.py": [
        "Report Viewed u-1 /reports/{report_id} 1",
        "Report Viewed u-2 /reports/{report_id} 2",
    ],
    "privacy_hooks.py": [
        "page views kept: 57 of 200 (sampled out: 143)",
        "urls: ['/home']",
        "order properties: {'distinct_id': 'user-1', 'payment': {}} False",
        "filtered by before_send: 1, redacted values: 2",
        "disabled tracker: True captured: ['Signed Up']",
    ],
    "celery_worker.py": [
        "invoices: [1, 2, 3] for {'customer-42'}",
        "task outcomes: 3 all successful: True",
    ],
    "rq_worker.py": ["resized: [1, 2, 3]", "users: {'photographer-5'} horses: 3"],
}


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),  # anything not pointed at the receiver goes nowhere
        cwd=str(EXAMPLES.parent),
    )


def test_every_example_is_covered() -> None:
    scripts = {path.name for path in EXAMPLES.glob("*.py")}
    assert scripts - {"structlog_app.py"} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str) -> None:
    if name in ("prefork_workers.py", "celery_worker.py", "rq_worker.py") and not hasattr(
        os, "fork"
    ):
        pytest.skip("needs os.fork")
    if name == "rq_worker.py":
        require_redis()
    result = run_example(name)
    assert result.returncode == 0, result.stderr
    for line in EXPECTED[name]:
        assert line in result.stdout, (line, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr


def test_otel_example_events_carry_trace_ids() -> None:
    result = run_example("otel_decorator.py")
    assert result.returncode == 0, result.stderr
    traces = [
        line.rsplit("trace ", 1)[1] for line in result.stdout.splitlines() if " trace " in line
    ]
    assert len(traces) == 2
    assert all(len(t) == 32 and int(t, 16) for t in traces)


def test_yaml_logging_file() -> None:
    result = run_example("dictconfig_file.py", "logging.yaml")
    assert result.returncode == 0, result.stderr
    assert "logging.yaml -> API Call api req-1" in result.stdout

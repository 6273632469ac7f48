"""Every example in examples/ runs against the local receiver and does what it says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
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
    ],
}


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),  # anything not pointed at the receiver goes nowhere
        cwd=str(EXAMPLES.parent),
    )


def test_every_example_is_covered() -> None:
    scripts = {path.name for path in EXAMPLES.glob("*.py")}
    assert scripts - {"structlog_app.py"} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str) -> None:
    if name == "prefork_workers.py" and not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
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

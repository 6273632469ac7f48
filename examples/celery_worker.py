"""A Celery app whose prefork children deliver before they exit, with task outcomes tracked.

``setup_celery(app, track_tasks=True)`` binds each task's user (sent along from where the task
was queued), delivers what a pool child holds before billiard ends it with ``os._exit`` (here:
after every task, ``--max-tasks-per-child=1``) and sends a "Task Finished" event per task.
Run it: ``python examples/celery_worker.py`` — it starts a real worker (prefork pool, a
filesystem broker in a temporary folder, no server needed), queues tasks and stops the worker.
"""

import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from celery import Celery

from mp_logbridge import MixpanelHandler, bound, tag
from mp_logbridge.integrations.celery import setup_celery
from mp_logbridge.testing import MixpanelServer

folder = os.environ.setdefault("EXAMPLE_BROKER_DIR", tempfile.mkdtemp(prefix="celery-example-"))
app = Celery("celery_worker", broker="filesystem://")
app.conf.broker_transport_options = {
    "data_folder_in": folder,
    "data_folder_out": folder,
    "control_folder": folder,
    "polling_interval": 0.1,
}
app.conf.worker_hijack_root_logger = False
setup_celery(app, track_tasks=True)

if os.environ.get("EXAMPLE_RECEIVER"):  # in the worker: where the handler sends
    handler = MixpanelHandler(
        "YOUR_PROJECT_TOKEN", api_host=os.environ["EXAMPLE_RECEIVER"], flush_interval=30
    )
    for name in ("tasks", "mixpanel.tasks"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).propagate = False

log = logging.getLogger("tasks")


@app.task
def send_invoice(invoice_id: int) -> int:
    log.info("invoice sent", extra=tag.track("Invoice Sent", invoice_id=invoice_id))
    return invoice_id


def main() -> None:
    with MixpanelServer() as receiver:
        env = {
            **os.environ,
            "EXAMPLE_RECEIVER": receiver.url,
            "PYTHONPATH": str(Path(__file__).parent),
        }
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "--quiet",
                "-A",
                "celery_worker",
                "worker",
                "--pool=prefork",
                "--concurrency=2",
                "--max-tasks-per-child=1",
                "--without-heartbeat",
                "--without-mingle",
                "--without-gossip",
                "--loglevel=ERROR",
            ],
            env=env,
            cwd=str(Path(__file__).parent),
        )
        try:
            with bound(distinct_id="customer-42"):  # the user travels with the task
                for invoice_id in (1, 2, 3):
                    send_invoice.delay(invoice_id)
            deadline = time.monotonic() + 60
            while len(receiver.events) < 6 and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            worker.terminate()  # a warm shutdown
            worker.wait(60)
        sent = sorted(
            e["properties"]["invoice_id"] for e in receiver.events if e["event"] == "Invoice Sent"
        )
        finished = [e["properties"] for e in receiver.events if e["event"] == "Task Finished"]
        print("invoices:", sent, "for", {e["properties"]["distinct_id"] for e in receiver.events})
        print(
            "task outcomes:", len(finished), "all successful:", all(p["success"] for p in finished)
        )


if __name__ == "__main__":
    main()

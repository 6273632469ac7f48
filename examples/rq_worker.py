"""RQ jobs whose work horses deliver before ``os._exit``: ``MixpanelWorker``.

RQ forks a work horse per job and ends it with ``os._exit``, skipping every exit hook; with
``MixpanelWorker`` (``rq worker -w mp_logbridge.integrations.rq.MixpanelWorker``) each horse
delivers what it holds first, and each job runs with the user it was queued for
(``meta=job_meta()``). Run it: ``python examples/rq_worker.py`` — it starts a private
``redis-server`` (from your PATH) on a Unix socket, queues three jobs and works them.
"""

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from redis import Redis
from rq import Queue

from mp_logbridge import MixpanelHandler, bound, tag
from mp_logbridge.integrations.rq import MixpanelWorker, job_meta
from mp_logbridge.testing import MixpanelServer

log = logging.getLogger("jobs")


def resize_image(image_id: int) -> int:
    log.info("resized", extra=tag.track("Image Resized", image_id=image_id, horse=os.getpid()))
    return image_id


def start_redis(folder: str) -> tuple[subprocess.Popen, Redis]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("this example needs redis-server on the PATH (apt-get install redis-server)")
    sock = str(Path(folder) / "redis.sock")
    server = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    redis = Redis(unix_socket_path=sock)
    for _ in range(200):
        try:
            redis.ping()
            return server, redis
        except Exception:
            time.sleep(0.02)
    sys.exit("redis-server did not start")


def main() -> None:
    folder = tempfile.mkdtemp(prefix="rq-example-")
    server, redis = start_redis(folder)
    try:
        with MixpanelServer() as receiver:
            handler = MixpanelHandler(
                "YOUR_PROJECT_TOKEN", api_host=receiver.url, flush_interval=30
            )
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            queue = Queue("images", connection=redis)
            with bound(distinct_id="photographer-5"):
                for image_id in (1, 2, 3):
                    # by name: RQ refuses functions of __main__ (the horse imports this file)
                    queue.enqueue("rq_worker.resize_image", image_id, meta=job_meta())
            MixpanelWorker([queue], connection=redis).work(burst=True, logging_level="ERROR")
            events = receiver.events
            print("resized:", sorted(e["properties"]["image_id"] for e in events))
            print(
                "users:",
                {e["properties"]["distinct_id"] for e in events},
                "horses:",
                len({e["properties"]["horse"] for e in events}),
            )
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Pre-fork servers (gunicorn ``--preload``, Celery prefork, uWSGI): one handler, many workers.

The handler can be created in the parent before forking. Each forked worker gets a fresh,
empty queue, lock, sender thread and HTTP session on its first message (also under uWSGI, which
forks without running Python's fork hooks), never re-sends what the parent had queued, and
delivers its own messages. Flush when a worker stops, so nothing is left queued:

* gunicorn (``gunicorn.conf.py``)::

      def worker_exit(server, worker):
          import logging
          for handler in logging.getLogger().handlers:
              handler.flush()

* Celery (workers may exit with ``os._exit``, which skips exit hooks)::

      from celery.signals import worker_process_shutdown, task_postrun

      @worker_process_shutdown.connect
      def flush_mixpanel(**_):
          mp_handler.flush(timeout=5)

      # or, for short-lived tasks, after each task:
      @task_postrun.connect
      def flush_after_task(**_):
          mp_handler.flush(timeout=2)

Run it: ``python examples/prefork_workers.py`` (POSIX only): the parent forks three workers that
each log events and flush before ``os._exit``, as a pre-fork worker does.
"""

import logging
import os

from mp_logbridge import MixpanelHandler, tag
from mp_logbridge.testing import MixpanelServer

log = logging.getLogger("worker")


def work(worker: int, handler: MixpanelHandler) -> None:
    for job in range(5):
        log.info(
            "job done",
            extra=tag.track("Job Done", distinct_id=f"w{worker}", job=job, pid=os.getpid()),
        )
    handler.flush(timeout=5)  # what worker_exit / worker_process_shutdown hooks do


def main() -> None:
    with MixpanelServer() as receiver:
        handler = MixpanelHandler("YOUR_PROJECT_TOKEN", api_host=receiver.url)  # made before fork
        logging.basicConfig(level=logging.INFO, handlers=[handler])
        log.info("parent started", extra=tag.track("Server Started", distinct_id="server"))
        children = []
        for worker in range(3):
            pid = os.fork()
            if pid == 0:
                try:
                    work(worker, handler)
                finally:
                    os._exit(0)
            children.append(pid)
        for pid in children:
            os.waitpid(pid, 0)
        handler.flush()
        names = [e["event"] for e in receiver.events]
        print(
            f"{names.count('Job Done')} 'Job Done' events from {len({e['properties']['pid'] for e in receiver.events if 'pid' in e['properties']})} workers, {names.count('Server Started')} 'Server Started' (sent once, by the parent)"
        )


if __name__ == "__main__":
    main()

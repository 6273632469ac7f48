"""``python -m mp_logbridge``: the ``mp-logbridge`` command."""

from ._cli import run

run()

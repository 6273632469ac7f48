"""Relay workers: deliver what a fleet wrote to a Redis Stream, from any number of processes.

The command line is ``mp-logbridge relay`` (see ``mp-logbridge relay --help``); to embed a
worker::

    from mp_logbridge.redis import RedisBroker
    from mp_logbridge.relay import Relay

    relay = Relay(RedisBroker("redis://queue:6379/0", "mixpanel", "mp-logbridge"))
    exit_code = relay.run()      # until relay.stop() (safe from a signal handler)

Delivery is at least once: an entry is acknowledged only after Mixpanel accepted its record,
so a worker that dies before acknowledging leaves it to the others (after ``claim_idle``), and
the record may arrive twice. Events carry their ``$insert_id``, so Mixpanel keeps one; profile
and group updates have none (a ``$set`` applied twice is harmless, an ``$add`` is not).
"""

from __future__ import annotations

from ._relay import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_LEFT_PENDING,
    EXIT_OK,
    EXIT_REDIS_UNREACHABLE,
    EXIT_USAGE,
    Broker,
    Relay,
    RelayStats,
)

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_LEFT_PENDING",
    "EXIT_OK",
    "EXIT_REDIS_UNREACHABLE",
    "EXIT_USAGE",
    "Broker",
    "Relay",
    "RelayStats",
]

"""Redis Streams between an application fleet and Mixpanel (``pip install 'mp_logbridge[redis]'``).

Producers write captured records to a stream instead of posting them::

    from mp_logbridge import MixpanelHandler
    from mp_logbridge.redis import RedisStreamConsumer

    handler = MixpanelHandler("TOKEN", consumer=RedisStreamConsumer("redis://queue:6379/0"))

(or set ``MIXPANEL_REDIS_URL``: front doors that make their own consumer then write to the
stream), and relay workers (``mp-logbridge relay``, :mod:`mp_logbridge.relay`) deliver.
The ``redis`` package is imported when a class here is first used.
"""

from __future__ import annotations

from ._redis_stream import (
    DEFAULT_STREAM,
    BrokerUnavailableError,
    RedisBroker,
    RedisStreamConsumer,
    RedisStreamExporter,
)

__all__ = [
    "DEFAULT_STREAM",
    "BrokerUnavailableError",
    "RedisBroker",
    "RedisStreamConsumer",
    "RedisStreamExporter",
]

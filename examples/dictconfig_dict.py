"""Configure the handler with ``logging.config.dictConfig`` from a Python dict.

Every handler option is a plain keyword argument, so ``"class"`` (or ``"()"``) works, and the
token/region can come from ``MIXPANEL_TOKEN``/``MIXPANEL_REGION`` instead of the config.
Run it: ``python examples/dictconfig_dict.py``.
"""

import logging
import logging.config

from mp_logbridge import tag
from mp_logbridge.testing import MixpanelServer


def logging_config(api_host: str) -> dict:
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": "plain"},
            "mixpanel": {
                "class": "mp_logbridge.MixpanelHandler",
                "token": "YOUR_PROJECT_TOKEN",  # or leave it out and set MIXPANEL_TOKEN
                "api_host": api_host,  # in production: "region": "eu" (or nothing for the US)
                "level": "INFO",
                "super_properties": {"service": "billing", "env": "dev"},
                "record_properties": {"name": "logger", "levelname": "level"},
                "batch_size": 500,
                "flush_interval": 1.0,
            },
        },
        "root": {"level": "INFO", "handlers": ["console", "mixpanel"]},
    }


def main() -> None:
    with MixpanelServer() as receiver:
        logging.config.dictConfig(logging_config(receiver.url))
        log = logging.getLogger("billing.invoices")
        log.info("invoice paid", extra=tag.track("Invoice Paid", distinct_id="acct-7", amount=120))
        logging.shutdown()  # flushes the handler, as interpreter exit would
        event = receiver.events[0]
        print(
            event["event"],
            {k: event["properties"][k] for k in ("service", "env", "logger", "level", "amount")},
        )


if __name__ == "__main__":
    main()

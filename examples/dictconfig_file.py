"""Configure the handler from a JSON or YAML logging file (``examples/logging.json``/``.yaml``).

The files hold no token or host: those come from the environment (``MIXPANEL_TOKEN``,
``MIXPANEL_REGION`` or ``MIXPANEL_API_HOST``), which keeps secrets and per-environment settings
out of the file. Run it: ``python examples/dictconfig_file.py [logging.yaml]``.
"""

import json
import logging
import logging.config
import os
import sys
from pathlib import Path

from mp_logbridge import tag
from mp_logbridge.testing import MixpanelServer

HERE = Path(__file__).resolve().parent


def load(path: Path) -> dict:
    if path.suffix in (".yaml", ".yml"):
        import yaml  # pip install pyyaml

        return yaml.safe_load(path.read_text())
    return json.loads(path.read_text())


def main(name: str = "logging.json") -> None:
    with MixpanelServer() as receiver:
        os.environ["MIXPANEL_TOKEN"] = "YOUR_PROJECT_TOKEN"
        os.environ["MIXPANEL_API_HOST"] = receiver.url  # in production: MIXPANEL_REGION=eu
        logging.config.dictConfig(load(HERE / name))
        log = logging.getLogger("api")
        log.info(
            "request served",
            extra={
                "request_id": "req-1",
                **tag.track("API Call", distinct_id="u-1", route="/orders"),
            },
        )
        logging.shutdown()
        event = receiver.events[0]
        print(
            name,
            "->",
            event["event"],
            event["properties"]["service"],
            event["properties"]["request_id"],
        )


if __name__ == "__main__":
    main(*sys.argv[1:])

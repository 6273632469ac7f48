"""Quickstart: tagged stdlib log records become Mixpanel events, profile and revenue updates.

Run it: ``python examples/quickstart.py``. It starts a local Mixpanel receiver, so no account or
network is needed; in production drop the receiver and the ``api_host`` argument and set
``MIXPANEL_TOKEN`` (and ``MIXPANEL_REGION=eu`` or ``in`` if your project lives there).
"""

import logging

from mp_logbridge import MixpanelHandler, bound, tag
from mp_logbridge.testing import MixpanelServer

log = logging.getLogger("shop")


def main() -> None:
    with MixpanelServer() as receiver:
        handler = MixpanelHandler(token="YOUR_PROJECT_TOKEN", api_host=receiver.url)
        logging.basicConfig(level=logging.INFO, handlers=[handler, logging.StreamHandler()])

        # An ordinary log call that is also a Mixpanel event.
        log.info("user signed up", extra=tag.track("Signed Up", distinct_id="u-42", plan="pro"))

        # Bind the user once per request; every tagged record inside uses it.
        with bound(distinct_id="u-42"):
            log.info("profile saved", extra=tag.people.set({"$email": "ada@example.com"}))
            log.info("checkout", extra=tag.track("Purchase", total=30.5) + tag.charge(30.5))
            log.info("Viewed Pricing", extra={"mixpanel": True})  # event named by the message

        handler.flush()  # optional: delivery happens in the background anyway
        print("events:", [event["event"] for event in receiver.events])
        print(
            "profile updates:",
            [
                sorted(
                    k
                    for k in u
                    if k.startswith("$") and k not in ("$token", "$time", "$distinct_id")
                )
                for u in receiver.profile_updates
            ],
        )
        print(
            "delivery:",
            handler.stats()["sent"],
            "sent,",
            handler.stats()["dropped_total"],
            "dropped",
        )


if __name__ == "__main__":
    main()

"""Send to the EU (or India) data-residency region.

Projects enrolled in EU Data Residency must send to ``api-eu.mixpanel.com`` (India:
``api-in.mixpanel.com``); data sent to the wrong host is not ingested. Three ways to say so:

1. ``region="eu"`` on a Tracker, handler, processor or consumer (or ``MIXPANEL_REGION=eu``);
2. the Ruby SDK's way: a consumer built from the three endpoint URLs, used by the Tracker;
3. ``api_host=`` for a proxy or, as here, a local receiver.

Run it: ``python examples/eu_region.py`` (it resolves the real EU endpoints but sends to a
local receiver standing in for them).
"""

from mp_logbridge import Consumer, Tracker
from mp_logbridge.consumers import BackgroundConsumer
from mp_logbridge.testing import MixpanelServer
from mp_logbridge.transport import resolve_endpoints


def main() -> None:
    # 1. A region name: every endpoint moves to the region's host.
    endpoints = resolve_endpoints(region="eu")
    print(
        "region='eu' sends events to", endpoints.event, "and profiles to", endpoints.profile_update
    )
    production = BackgroundConsumer(region="eu")  # what you would use in production (not used here)
    production.close()

    with MixpanelServer() as receiver:
        base = receiver.url  # stands in for "https://api-eu.mixpanel.com"

        # 2. The Ruby SDK documentation's EU consumer, in Python: three URLs, positionally.
        eu_consumer = Consumer(f"{base}/track", f"{base}/engage", f"{base}/groups")
        tracker = Tracker(
            "YOUR_PROJECT_TOKEN", lambda kind, message: eu_consumer.send(kind, message)
        )
        tracker.track("u-1", "Signed Up", {"plan": "pro"})
        tracker.people.set("u-1", {"$name": "Ada"})

        # 3. api_host for everything (here with the background consumer).
        with Tracker("YOUR_PROJECT_TOKEN", api_host=base) as background:
            background.track("u-2", "Signed Up")

        print(
            "received:",
            [e["event"] for e in receiver.events],
            len(receiver.profile_updates),
            "profile update(s)",
        )


if __name__ == "__main__":
    main()

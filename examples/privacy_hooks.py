"""What may leave the process: ``before_send``, sampling by user, redaction, and ``disabled``.

* ``before_send`` sees each record as it would be sent and returns it (changed) or ``None``;
* ``sample_rate`` keeps a share of the *users* per event name (all of a kept user's events);
* ``redact`` drops named properties at any depth (or replaces them with a keyed hash);
* ``disabled=True`` (or ``MIXPANEL_DISABLED=1``) accepts everything and sends nothing —
  ``capture_messages()`` still shows what would have been sent.

Run it: ``python examples/privacy_hooks.py``.
"""

import logging

from mp_logbridge import MixpanelHandler, Tracker, tag
from mp_logbridge.testing import MixpanelServer, capture_messages

log = logging.getLogger("privacy")


def drop_internal_users(record: dict) -> dict | None:
    """Leave out events of staff accounts; strip query strings from URLs."""
    props = record.get("properties", {})
    if str(props.get("distinct_id", "")).startswith("staff-"):
        return None
    if "url" in props:
        props["url"] = props["url"].split("?", 1)[0]
    return record


def main() -> None:
    with MixpanelServer() as receiver:
        handler = MixpanelHandler(
            "YOUR_PROJECT_TOKEN",
            api_host=receiver.url,
            before_send=drop_internal_users,
            sample_rate={"Page Viewed": 0.25, "*": 1.0},
            redact=["email", "card_number"],
        )
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        for n in range(200):
            log.info(
                "page",
                extra=tag.track("Page Viewed", distinct_id=f"user-{n}", url="/home?ref=mail"),
            )
        log.info(
            "order",
            extra=tag.track(
                "Order Placed", distinct_id="user-1", email="a@b.c", payment={"card_number": "4111"}
            ),
        )
        log.info("staff", extra=tag.track("Order Placed", distinct_id="staff-7"))
        handler.flush()
        stats = handler.stats()
        order = next(e for e in receiver.events if e["event"] == "Order Placed")["properties"]
        pages = [e for e in receiver.events if e["event"] == "Page Viewed"]
        print(f"page views kept: {len(pages)} of 200 (sampled out: {stats['sampled_out']})")
        print("urls:", sorted({e["properties"]["url"] for e in pages}))
        print(
            "order properties:",
            {k: order[k] for k in ("distinct_id", "payment") if k in order},
            "email" in order,
        )
        print(f"filtered by before_send: {stats['filtered']}, redacted values: {stats['redacted']}")

    tracker = Tracker(disabled=True)  # no token, no thread, no socket
    with capture_messages() as captured:
        tracker.track("u1", "Signed Up")
    print(
        "disabled tracker:",
        tracker.stats()["disabled"],
        "captured:",
        [e["event"] for e in captured.events()],
    )


if __name__ == "__main__":
    main()

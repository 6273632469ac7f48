"""The Mixpanel Ruby SDK documentation's examples, in Python, line for line.

Same methods, same argument order, same meaning on the wire. Run it:
``python examples/ruby_sdk_examples.py`` (a local receiver stands in for Mixpanel).
"""

from datetime import datetime

from mp_logbridge import Consumer, Tracker
from mp_logbridge.testing import MixpanelServer

YOUR_PROJECT_TOKEN = "YOUR_PROJECT_TOKEN"


def main() -> None:
    with MixpanelServer() as receiver:
        # Ruby: tracker = Mixpanel::Tracker.new(YOUR_PROJECT_TOKEN)
        # (here with a synchronous consumer pointed at the local receiver)
        tracker = Tracker(YOUR_PROJECT_TOKEN, Consumer(api_host=receiver.url))

        # create or update a profile with First Name, Last Name, E-Mail Address, Phone Number,
        # and Favorite Color without updating geolocation data or $last_seen
        tracker.people.set(
            "12345",
            {
                "$first_name": "John",
                "$last_name": "Doe",
                "$email": "john.doe@example.com",
                "$phone": "5555555555",
                "Favorite Color": "red",
            },
            0,  # ip = 0
            {"$ignore_time": "true"},
        )

        tracker.people.increment(
            "12345",
            {
                "Logins used": 1,
                # use a negative number to subtract
                "Logins remaining": -1,
            },
        )

        tracker.people.append("12345", {"Favorite Fruits": "Apples"})

        # Sending group identifiers with events
        tracker.track("user_id1", "App Open", {"GROUP KEY": 1234})
        # event will be attributed to multiple groups with IDs 1000, 1234
        tracker.track("user_id1", "App Open", {"GROUP KEY": [1000, 1234]})

        # Adding group identifiers to individual users
        tracker.people.set("user_id1", {"$name": "Steph Curry", "Company": "Mixpanel"})

        # Sets properties on group profile with group_key "Company", group_id "Acme"
        tracker.groups.set(
            "Company",
            "Acme",
            {"$name": "Acme, Inc.", "plan": "Premium", "Sign-Up Date": datetime.now()},
        )

        # Records a charge of $9.99 from user '12345'
        tracker.people.track_charge("12345", 9.99)
        # records a charge of $30.50 on the 2nd of January
        tracker.people.track_charge("12345", 30.50, {"$time": datetime(2013, 1, 2)})

        for update in receiver.profile_updates:
            op = next(k for k in update if k in ("$set", "$add", "$append"))
            print(
                update["$distinct_id"],
                op,
                update[op],
                {k: update[k] for k in ("$ip", "$ignore_time") if k in update},
            )
        for event in receiver.events:
            print(
                event["properties"]["distinct_id"], event["event"], event["properties"]["GROUP KEY"]
            )
        for group in receiver.group_updates:
            print(group["$group_key"], group["$group_id"], group["$set"])


if __name__ == "__main__":
    main()

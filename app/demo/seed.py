"""Demo data, written through the gateway's own write path at every demo start.

Consumers 101-103 are fresh; 104's live features are two hours old (EXPIRED under a 1h ttl); 105 has
history only; anything else is MISSING.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.serving.gateway import Gateway
from app.serving.request import WriteRequest
from app.serving.write import write
from app.streams.ingest import ingest, parse_events


def _rows(now: datetime) -> dict[str, list[dict[str, object]]]:
    stamp = now.isoformat().replace("+00:00", "Z")
    old = (now - timedelta(minutes=90)).isoformat().replace("+00:00", "Z")
    live = [
        {
            "consumer_id": 101,
            "event_timestamp": stamp,
            "orders_7d": 3,
            "avg_basket": 23.5,
            "is_active": True,
            "embedding": [0.25, -0.5, 0.75, 1.0],
        },
        {
            "consumer_id": 102,
            "event_timestamp": stamp,
            "orders_7d": 11,
            "avg_basket": 41.0,
            "is_active": True,
            "embedding": [0.5, 0.5, -0.25, 0.0],
        },
        {
            "consumer_id": 103,
            "event_timestamp": stamp,
            "orders_7d": 0,
            "avg_basket": 0.0,
            "is_active": False,
            "embedding": None,
        },
        {
            "consumer_id": 104,
            "event_timestamp": old,
            "orders_7d": 7,
            "avg_basket": 18.25,
            "is_active": True,
            "embedding": [1.0, 0.0, 0.0, 0.0],
        },
    ]
    history = [
        {
            "consumer_id": 101,
            "event_timestamp": stamp,
            "lifetime_orders": 17,
            "lifetime_value": 402.5,
            "favourite_cuisine": "thai",
        },
        {
            "consumer_id": 102,
            "event_timestamp": stamp,
            "lifetime_orders": 230,
            "lifetime_value": 5120.75,
            "favourite_cuisine": "pizza",
        },
        {
            "consumer_id": 104,
            "event_timestamp": stamp,
            "lifetime_orders": 52,
            "lifetime_value": 990.0,
            "favourite_cuisine": "sushi",
        },
        {
            "consumer_id": 105,
            "event_timestamp": stamp,
            "lifetime_orders": 1,
            "lifetime_value": 12.0,
            "favourite_cuisine": None,
        },
    ]
    stores = [
        {"store_id": "s-1", "event_timestamp": stamp, "prep_time_p50": 12.5, "open_orders": 4},
        {"store_id": "s-2", "event_timestamp": stamp, "prep_time_p50": 21.0, "open_orders": 9},
    ]
    return {"consumer_live": live, "consumer_history": history, "store_stats": stores}


def _orders(now: datetime) -> list[dict[str, object]]:
    """101 ordered three times in the last hour (one of them 20 minutes ago), 102 once two days ago. Event ids
    are fixed, so a restart on the same folder counts nothing twice."""
    placed = [(101, 5, 23.5, "thai"), (101, 20, 41.0, "sushi"), (101, 50, 18.25, "thai"), (102, 2880, 30.0, "pizza")]
    return [
        {
            "event_id": f"demo-{consumer}-{minutes}",
            "consumer_id": consumer,
            "ts": (now - timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z"),
            "order_value": value,
            "cuisine": cuisine,
        }
        for consumer, minutes, value, cuisine in placed
    ]


async def seed_demo(gateway: Gateway) -> None:
    now = datetime.now(UTC)
    for group, rows in _rows(now).items():
        await write(gateway, WriteRequest(group=group, rows=rows), via="demo seed")
    orders = gateway.registry.streams["orders"]
    # Two days old is far past the 5 minute lateness: the demo's history goes in as if it had arrived on time
    await ingest(gateway, orders, parse_events(orders, _orders(now), gateway.limits), now_us=0)

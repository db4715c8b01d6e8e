"""Demo data, written through the gateway's own write path at every demo start.

Consumers 101-103 are fresh; 104's live features are two hours old (EXPIRED under a 1h ttl); 105 has
history only; anything else is MISSING.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.serving.gateway import Gateway
from app.serving.request import WriteRequest
from app.serving.write import write


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


async def seed_demo(gateway: Gateway) -> None:
    for group, rows in _rows(datetime.now(UTC)).items():
        await write(gateway, WriteRequest(group=group, rows=rows))

"""What API keys add to a request, measured in-process (no network, no HTTP client in the timing).

    .venv/bin/python bench/auth_overhead.py [--requests 5000]

1. `KeyRing.check` alone (parse the header, SHA-256, compare with every configured hash), by number of keys.
2. Whole requests through the ASGI app, called directly, on one app whose key ring is swapped between rounds
   (so the arms share backends, caches and warm-up), in blocks of 20 in a shuffled order per round:
   authentication off, an unlimited key, a group-limited key, and off again as a control for noise.
   Medians per request, for a fetch (SQLite backend) and for GET /v1/registry (no backend I/O).
   On a tree without app/auth.py (main before API keys) only the `off` arm runs: compare its medians with
   this branch's `off` arm for what the (disabled) dependency costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections.abc import MutableMapping
from typing import Any

from fastapi import FastAPI

from app.main import create_app
from app.registry.load import parse_registry
from app.settings import Settings

try:
    from app.auth import KeyRing, key_entry, new_token, parse_keys

    HAVE_AUTH = True
except ImportError:  # measuring a tree without API keys
    HAVE_AUTH = False

REGISTRY = """
backends:
  hot: {{type: sqlite, path: "{dir}/hot.sqlite"}}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
groups:
  live:
    entity: consumer
    backend: hot
    features:
      orders_7d: {{dtype: int64, default: 0}}
      avg_basket: {{dtype: float64, default: 0.0}}
      active: {{dtype: bool, default: false}}
  other:
    entity: consumer
    backend: hot
    features:
      score: {{dtype: float64, default: 0.0}}
"""
FETCH = json.dumps({"entities": {"consumer_id": list(range(1, 11))}, "features": ["live:*"]}).encode()
WRITE = json.dumps(
    {
        "group": "live",
        "rows": [{"consumer_id": i, "orders_7d": i, "avg_basket": 1.5, "active": True} for i in range(1, 11)],
    }
).encode()


def bench_check(n_keys: int, loops: int) -> float:
    """Microseconds per `KeyRing.check` of the last configured key (best of 5)."""
    tokens = [new_token() for _ in range(n_keys)]
    ring = KeyRing(parse_keys([key_entry(f"k{i}", t, ["read"]) for i, t in enumerate(tokens)], "bench", None))
    header = f"Bearer {tokens[-1]}"
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(loops):
            ring.check(header, "read")
        best = min(best, (time.perf_counter() - started) / loops)
    return best * 1e6


async def call(app: FastAPI, method: str, path: str, token: str | None, body: bytes = b"") -> int:
    """One request straight into the ASGI app; returns the status."""
    headers = [
        (b"host", b"bench"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def bench_requests(requests: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as folder:
        registry = parse_registry(REGISTRY.format(dir=folder), "bench", env={})
        arms: dict[str, tuple[Any, str | None]] = {}
        if HAVE_AUTH:
            tokens = {"key": new_token(), "limited key": new_token()}
            entries = [key_entry(f"filler{i}", new_token(), ["read"]) for i in range(8)]
            entries += [key_entry("key", tokens["key"], ["read", "write"])]
            entries += [key_entry("limited", tokens["limited key"], ["read"], ["live"])]
            app = create_app(Settings(api_keys=json.dumps(entries)), registry=registry)
            ring = app.state.keyring
            arms = {
                "off": (KeyRing(), None),
                "key": (ring, tokens["key"]),
                "limited key": (ring, tokens["limited key"]),
                "off (control)": (KeyRing(), None),  # a second off arm: the difference to `off` is noise
            }
        else:
            app = create_app(Settings(), registry=registry)
            arms = {"off": (None, None)}
        endpoints = {"fetch": ("POST", "/v1/features/fetch", FETCH), "registry": ("GET", "/v1/registry", b"")}
        samples = {(e, a): [] for e in endpoints for a in arms}  # type: dict[tuple[str, str], list[float]]
        async with app.router.lifespan_context(app):
            if HAVE_AUTH:
                app.state.keyring = ring
            assert await call(app, "POST", "/v1/features/write", arms["key"][1] if HAVE_AUTH else None, WRITE) == 200
            block = 20
            order = list(arms)
            for round_ in range(requests // block + 10):  # the first 10 rounds warm up and are dropped
                random.shuffle(order)
                for arm in order:
                    keyring, token = arms[arm]
                    if keyring is not None:
                        app.state.keyring = keyring
                    for endpoint, (method, path, body) in endpoints.items():
                        for _ in range(block):
                            started = time.perf_counter()
                            status = await call(app, method, path, token, body)
                            elapsed = time.perf_counter() - started
                            assert status == 200, (arm, endpoint, status)
                            if round_ >= 10:
                                samples[(endpoint, arm)].append(elapsed)
    return {e: {a: statistics.median(samples[(e, a)]) * 1e6 for a in arms} for e in endpoints}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000, help="requests per arm and endpoint")
    args = parser.parse_args()
    if HAVE_AUTH:
        print("KeyRing.check, us per call (the matching key is the last one):")
        for n in (1, 10, 100, 1000):
            print(f"  {n:>5} keys  {bench_check(n, loops=2_000 if n == 1000 else 20_000):7.2f}")
    medians = asyncio.run(bench_requests(args.requests))
    print(f"median us per request through the ASGI app ({args.requests} per arm, interleaved; 10 keys configured):")
    for endpoint, arms in medians.items():
        for arm, us in arms.items():
            print(f"  {endpoint:<9} {arm:<14} {us:8.1f}  ({us - arms['off']:+.1f} vs off)")


if __name__ == "__main__":
    main()

"""`python -m bench.overload`: goodput when more requests arrive than one worker can serve.

  1. the bench's own redis-server, PostgreSQL schema, registry and data (`bench/main.py`), one gateway worker;
  2. saturation: a closed loop of `--connections` clients asking 1 entity x 100 features (50 Redis + 50
     PostgreSQL) with `deadline_ms`: its goodput is S, what the box can serve;
  3. overload: an open loop at `--factor` x S (requests sent on a schedule, whatever the answers do, so a slow
     server gets no relief), latency counted from each request's scheduled time, not from when a connection
     was free (no coordinated omission);
  4. per phase: goodput (200, not degraded, answered within the deadline), p50/p99 of answers, of 503
     refusals, degraded and other answers, and whether any circuit opened.

`--admission both` runs the overload phase twice, with admission control off then on, for a before/after in
one session. The client is asyncio over raw HTTP/1.1 keep-alive connections (a few tens of microseconds a
request), so it can offer twice what the worker serves from the box's other core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvloop

from app.registry.load import load_registry
from bench.data import entity_ids, generate, write_rows
from bench.main import DEFAULT_PG_DSN, FETCHED, REGISTRY, drop_schema, reset_schema
from bench.measure import percentile
from bench.procs import GatewayProcess, RedisServer, log

PATH = "/v1/features/fetch"
MAX_CONNECTIONS = 2048  # open-loop: a request due with every connection busy opens another, up to this
KEEP_ALIVE_S = 4.0  # reuse a connection idle for less than this (uvicorn closes one idle for 5 s)


@dataclass
class Phase:
    name: str
    seconds: float
    offered_rps: float | None  # None: closed loop
    deadline_ms: float
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"good": [], "degraded": [], "503": []})
    kinds: Counter[str] = field(default_factory=Counter)  # good, degraded, late, 503, other, error
    circuits_opened: int = 0
    limit_after: int = 0
    client_cpu_share: float = 0.0
    gateway_cpu_share: float = 0.0
    means_ms: dict[str, float] = field(default_factory=dict)  # backend read, loop lag: mean over the phase

    def summary(self, saturation: float | None) -> dict[str, Any]:
        sent = sum(n for k, n in self.kinds.items() if k not in ("connections_opened", "503_by_limiter"))
        good = self.kinds["good"]
        out: dict[str, Any] = {
            "phase": self.name,
            "offered_rps": None if self.offered_rps is None else round(self.offered_rps),
            "sent": sent,
            "goodput_rps": round(good / self.seconds, 1),
            "kinds": dict(self.kinds),
            "circuits_opened": self.circuits_opened,
            "admission_limit_after": self.limit_after,
            "client_cpu_share": round(self.client_cpu_share, 2),
            "gateway_cpu_share": round(self.gateway_cpu_share, 2),
            "means_ms": self.means_ms,
        }
        if saturation:
            out["goodput_of_saturation"] = round(good / self.seconds / saturation, 3)
        for kind, values in self.latencies.items():
            values.sort()
            if values:
                out[f"{kind}_p50_ms"] = round(percentile(values, 50), 2)
                out[f"{kind}_p99_ms"] = round(percentile(values, 99), 2)
        return out


class Client:
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def request_bytes(features: list[str], entity: int, deadline_ms: float) -> bytes:
    body = json.dumps(
        {"entities": {"consumer_id": [entity]}, "features": features, "deadline_ms": deadline_ms}
    ).encode()
    head = f"POST {PATH} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


def classify(phase: Phase, status: int, body: bytes, ms: float) -> None:
    if status == 200:
        kind = "degraded" if b'"degraded":true' in body else ("good" if ms <= phase.deadline_ms else "late")
        phase.latencies["degraded" if kind == "degraded" else "good"].append(ms)
    elif status == 503 and b"/overload" in body:
        kind = "503"
        phase.latencies["503"].append(ms)
    else:
        kind = "other"
    phase.kinds[kind] += 1


async def closed_loop(port: int, requests: list[bytes], phase: Phase, connections: int) -> None:
    stop = time.perf_counter() + phase.seconds

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        client = await Client.open(port)
        try:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                status, body = await client.post(rng.choice(requests))
                classify(phase, status, body, (time.perf_counter() - started) * 1000)
        finally:
            client.close()

    await asyncio.gather(*(worker(i) for i in range(connections)))


async def open_loop(port: int, requests: list[bytes], phase: Phase, seed: int) -> None:
    assert phase.offered_rps
    rng = random.Random(seed)
    idle: list[tuple[Client, float]] = []  # and when each was last used
    opened = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(request: bytes, due: float) -> None:
        nonlocal opened
        client = None
        while idle and client is None:
            client, used = idle.pop()
            if time.perf_counter() - used > KEEP_ALIVE_S:  # the server may have closed it meanwhile
                client.close()
                opened -= 1
                client = None
        if client is None:
            if opened >= MAX_CONNECTIONS:
                phase.kinds["client_saturated"] += 1
                return
            opened += 1
            phase.kinds["connections_opened"] += 1
            try:
                client = await Client.open(port)
            except OSError:
                phase.kinds["error"] += 1
                opened -= 1
                return
        try:
            status, body = await client.post(request)
        except (OSError, asyncio.IncompleteReadError):
            phase.kinds["error"] += 1
            client.close()
            opened -= 1
            return
        classify(phase, status, body, (time.perf_counter() - due) * 1000)
        idle.append((client, time.perf_counter()))

    start = time.perf_counter()
    interval = 1 / phase.offered_rps
    n = int(phase.seconds * phase.offered_rps)
    for i in range(n):
        due = start + i * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(rng.choice(requests), due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    for client, _ in idle:
        client.close()


async def scrape(url: str) -> dict[str, float]:
    """From /metrics: reads skipped by an open circuit so far, the admission limit now."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        text = (await client.get("/metrics")).text
    open_reads = limit = 0.0
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(
            (
                "feature_gateway_backend_read_duration_seconds_sum",
                "feature_gateway_backend_read_duration_seconds_count",
                "feature_gateway_event_loop_lag_seconds_sum",
                "feature_gateway_event_loop_lag_seconds_count",
            )
        ):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
        if line.startswith("feature_gateway_backend_reads_total") and 'outcome="open"' in line:
            open_reads += float(line.rsplit(" ", 1)[1])
        elif line.startswith("feature_gateway_admission_limit "):
            limit = float(line.rsplit(" ", 1)[1])
        elif line.startswith("feature_gateway_requests_shed_total"):
            found["shed"] = found.get("shed", 0.0) + float(line.rsplit(" ", 1)[1])
    return {"open_reads": open_reads, "limit": limit, **found}


async def measured(gateway: GatewayProcess, phase: Phase, load: Any) -> None:
    """Run `load`, noting circuits opened meanwhile, the limit after it, and this client's CPU use."""
    before = await scrape(gateway.url)
    cpu = time.process_time()
    gateway_cpu = gateway.cpu_seconds()
    await load
    phase.client_cpu_share = (time.process_time() - cpu) / phase.seconds
    phase.gateway_cpu_share = (gateway.cpu_seconds() - gateway_cpu) / phase.seconds
    await asyncio.sleep(0.5)
    after = await scrape(gateway.url)
    phase.circuits_opened = int(after["open_reads"] - before["open_reads"])
    phase.limit_after = int(after["limit"])
    # 503s refused by the limiter (most at the door, before the body is read); the rest waited past what their
    # deadline allowed and were refused after decoding
    phase.kinds["503_by_limiter"] = int(after.get("shed", 0) - before.get("shed", 0))
    for key in after:
        if key.endswith("_sum") or "_sum{" in key:
            count_key = key.replace("_sum", "_count")
            n = after[count_key] - before.get(count_key, 0)
            if n:
                phase.means_ms[key.replace("feature_gateway_", "").replace("_seconds_sum", "")] = round(
                    (after[key] - before.get(key, 0)) / n * 1000, 3
                )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    schema = f"fg_overload_{os.getpid()}"
    await reset_schema(args.pg_dsn, schema)
    redis_server = RedisServer()
    results: dict[str, Any] = {"deadline_ms": args.deadline_ms, "factor": args.factor, "phases": []}
    log_dir = Path(tempfile.mkdtemp(prefix="fg-overload-"))
    try:
        redis_server.spawn()
        await redis_server.wait_ready()
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OTEL_"))}
        base_env |= {"BENCH_REDIS_URL": redis_server.url, "BENCH_PG_DSN": args.pg_dsn, "BENCH_PG_SCHEMA": schema}
        registry = load_registry(REGISTRY, env=base_env)
        features = [f.ref for name in FETCHED for f in registry.groups[name].features]
        rng = random.Random(args.seed)
        ids = list(entity_ids(args.entities))
        requests = [request_bytes(features, rng.choice(ids), args.deadline_ms) for _ in range(1000)]
        modes = {"both": [False, True], "on": [True], "off": [False]}[args.admission]
        saturation: float | None = None
        for admission in modes:
            env = base_env | {"GATEWAY_ADMISSION": "true" if admission else "false"}
            label = f"admission {'on' if admission else 'off'}"
            gateway = GatewayProcess(REGISTRY, 1, env, log_dir / f"gateway-{label.replace(' ', '-')}.log")
            gateway.spawn()
            try:
                await gateway.wait_ready()
                if saturation is None:
                    async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as client:
                        for name in FETCHED:
                            group = registry.groups[name]
                            await write_rows(client, group, ids, generate(group, args.entities, args.seed), 1000)
                    warm = Phase("warm-up", 3, None, args.deadline_ms)
                    await closed_loop(gateway.port, requests, warm, args.connections)
                    phase = Phase(
                        f"saturation, {args.connections} connections, {label}", args.seconds, None, args.deadline_ms
                    )
                    await measured(gateway, phase, closed_loop(gateway.port, requests, phase, args.connections))
                    saturation = phase.kinds["good"] / phase.seconds
                    results["saturation_rps"] = round(saturation, 1)
                    results["phases"].append(phase.summary(saturation))
                    log(json.dumps(results["phases"][-1]))
                rate = saturation * args.factor
                phase = Phase(f"{args.factor:g}x saturation, open loop, {label}", args.seconds, rate, args.deadline_ms)
                await measured(gateway, phase, open_loop(gateway.port, requests, phase, args.seed))
                results["phases"].append(phase.summary(saturation))
                log(json.dumps(results["phases"][-1]))
                gateway.check_alive()
            finally:
                gateway.stop()
    finally:
        redis_server.stop()
        with contextlib.suppress(Exception):
            await drop_schema(args.pg_dsn, schema)
    return results


def table(results: dict[str, Any]) -> str:
    rows = [
        "| phase | offered/s | goodput/s | of S | good p99 ms | 503s | 503 p99 ms | degraded | late | other "
        "| reads skipped by open circuits |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for p in results["phases"]:
        k = p["kinds"]
        rows.append(
            f"| {p['phase']} | {p['offered_rps'] or ''} | {p['goodput_rps']} | {p.get('goodput_of_saturation', '')} "
            f"| {p.get('good_p99_ms', '')} | {k.get('503', 0)} | {p.get('503_p99_ms', '')} | {k.get('degraded', 0)} "
            f"| {k.get('late', 0)} | {k.get('other', 0) + k.get('error', 0)} | {p['circuits_opened']} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each measured phase")
    parser.add_argument("--factor", type=float, default=2.0, help="overload as a multiple of saturation")
    parser.add_argument("--deadline-ms", type=float, default=30.0)
    parser.add_argument("--connections", type=int, default=16, help="closed-loop clients for saturation")
    parser.add_argument("--entities", type=int, default=10_000)
    parser.add_argument("--admission", choices=["both", "on", "off"], default="both")
    parser.add_argument("--pg-dsn", default=DEFAULT_PG_DSN)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    results = uvloop.run(run(args))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

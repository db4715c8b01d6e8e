"""Faults under a steady load, all real processes: the gateway server, its own redis-server and its own
PostgreSQL. Redis is SIGKILLed and restarted; PostgreSQL is frozen (SIGSTOP), crashed and restarted, and
has its connections terminated. Throughout: no 5xx (but for at most 1% of 503 overload refusals of requests a
loaded box stalled), no answer later than its deadline + 250 ms (measured
by the client, whose own process a loaded box may keep waiting; on a quiet box the slowest is about
110 ms), the failed backend's values UNAVAILABLE while the other's stay PRESENT, and every value PRESENT
again within 2 s of the backend's recovery, without restarting the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from tests.support.gateways import GatewayProcess
from tests.support.servers import PostgresProcess, RedisProcess

RATE = 50  # fetches per second, sent on a fixed schedule whatever the answers take (an open loop)
DEADLINE_MS = 100
# An answer may come this much after its deadline, measured by the client: margin for the client's own
# scheduling on a loaded 2-core box (under stress-ng --cpu 2, load average 6.9, the slowest was 232 ms).
SLACK_S = 0.250
RECOVERY_S = 2.0
WARM_UP_S = 1.0
FAULT_S = 1.5  # how long each fault lasts
SETTLE_S = 2.5  # observation after each recovery (> RECOVERY_S, so the test sees the end of it)
IDS = list(range(1, 11))
LIVE = 3  # live:* has three features (Redis), then history:* two (PostgreSQL)

REGISTRY = """
backends:
  hot: {{type: redis, url: "{redis_url}"}}
  bulk: {{type: cockroach, dsn: "{pg_dsn}", dialect: postgres}}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
groups:
  live:
    entity: consumer
    backend: hot
    ttl: 1h
    features:
      orders: {{dtype: int64, default: 0}}
      basket: {{dtype: float64, default: 0.0}}
      name: {{dtype: string}}
  history:
    entity: consumer
    backend: bulk
    features:
      lifetime: {{dtype: int64, default: -1}}
      value: {{dtype: float64}}
"""
LIVE_ROWS = [{"consumer_id": i, "orders": i, "basket": i * 1.5, "name": f"c{i}"} for i in IDS]
HISTORY_ROWS = [{"consumer_id": i, "lifetime": 10 * i, "value": i / 4} for i in IDS]
BODY = {"entities": {"consumer_id": IDS}, "features": ["live:*", "history:*"], "deadline_ms": DEADLINE_MS}


@dataclass
class Sample:
    sent: float  # time.monotonic() when sent
    latency: float
    status: int
    hot: set[str] = field(default_factory=set)  # the statuses of the Redis values
    bulk: set[str] = field(default_factory=set)  # the statuses of the PostgreSQL values
    values_ok: bool = False  # every PRESENT value is the one written
    overload: str | None = None  # the detail of a 503 overload: refused because it waited (a stalled box)
    errors: dict[str, str] = field(default_factory=dict)  # backend -> its error, as the answer reports it

    @property
    def done(self) -> float:
        return self.sent + self.latency

    @property
    def whole(self) -> bool:
        return self.status == 200 and self.hot == self.bulk == {"PRESENT"} and self.values_ok


def expected_row(i: int) -> list[Any]:
    return [i, i * 1.5, f"c{i}", 10 * i, i / 4]


class Load:
    """Sends BODY at RATE per second, each on its own task, and records every answer."""

    def __init__(self, client: httpx.AsyncClient):
        self.client = client
        self.samples: list[Sample] = []
        self.failures: list[str] = []  # transport errors: the gateway did not answer at all
        self._stop = asyncio.Event()

    async def run(self) -> None:
        tasks: set[asyncio.Task[None]] = set()
        interval = 1 / RATE
        next_at = time.monotonic()
        while not self._stop.is_set():
            task = asyncio.create_task(self._one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*tasks)

    def stop(self) -> None:
        self._stop.set()

    async def _one(self) -> None:
        sent = time.monotonic()
        try:
            response = await self.client.post("/v1/features/fetch", json=BODY)
        except httpx.HTTPError as exc:
            self.failures.append(f"{time.monotonic() - sent:.3f}s {type(exc).__name__}: {exc}")
            return
        sample = Sample(sent, time.monotonic() - sent, response.status_code)
        if response.status_code == 503 and response.json().get("type", "").endswith("/overload"):
            sample.overload = response.json()["detail"]
        if response.status_code == 200:
            ok = True
            answer = response.json()
            for i, row in zip(IDS, answer["rows"], strict=True):
                sample.hot.update(row["statuses"][:LIVE])
                sample.bulk.update(row["statuses"][LIVE:])
                ok &= all(
                    value == want
                    for value, want, status in zip(row["values"], expected_row(i), row["statuses"], strict=True)
                    if status == "PRESENT"
                )
            sample.values_ok = ok
            sample.errors = {
                n: f"{b['status']}: {b.get('error')}" for n, b in answer["backends"].items() if b["status"] != "ok"
            }
        self.samples.append(sample)


@dataclass
class Fault:
    name: str
    backend: str  # "hot" or "bulk": which values fail
    issued: float  # the blow was struck: answers of the previous fault's recovery end here
    started: float  # it took effect (the process is gone or stopped): answers sent from here must fail
    restoring: float  # the restart or thaw was issued: from here on the backend may answer again
    recovered: float  # it answers again for sure (listening, thawed...): recovery is measured from here
    instant: bool = False  # a blow, not an outage: nothing to expect "during" it, only the recovery

    def during(self, samples: list[Sample]) -> list[Sample]:
        """Answers sent after the fault began that came back before the backend was being restored."""
        if self.instant:
            return []
        return [s for s in samples if s.sent >= self.started and s.done <= self.restoring]

    def sent_in(self, samples: list[Sample]) -> list[Sample]:
        return [s for s in samples if self.started <= s.sent < self.restoring]

    def recovery_s(self, samples: list[Sample], until: float) -> float | None:
        """From recovery to the first answer after which every answer (that came back before `until`, when
        the next fault began) is whole; None: never."""
        first_of_run = None
        for sample in sorted((s for s in samples if self.recovered <= s.sent and s.done < until), key=lambda s: s.sent):
            if sample.overload is not None:  # refused for its wait on a stalled box: says nothing of the backend
                continue
            if not sample.whole:
                first_of_run = None
            elif first_of_run is None:
                first_of_run = sample
        return None if first_of_run is None else max(0.0, first_of_run.sent - self.recovered)


def timeline(samples: list[Sample], faults: list[Fault], step: float = 0.25) -> str:
    """Per `step` seconds: answers, slowest, (Redis, PostgreSQL) statuses and the commonest backend error."""
    t0 = samples[0].sent
    marks = {int((f.started - t0) / step): f"<- {f.name} begins" for f in faults}
    marks.update({int((f.recovered - t0) / step): f"<- {f.name} recovered" for f in faults})
    buckets: dict[int, list[Sample]] = {}
    for sample in samples:
        buckets.setdefault(int((sample.sent - t0) / step), []).append(sample)
    lines = ["timeline (s: answers, slowest ms, statuses as (Redis, PostgreSQL): count, commonest error)"]
    for key in sorted(buckets):
        group = buckets[key]
        statuses = Counter(("/".join(sorted(s.hot)), "/".join(sorted(s.bulk))) for s in group)
        errors = Counter(e[:70] for s in group for e in s.errors.values()).most_common(1)
        lines.append(
            f"  {key * step:5.2f}: {len(group):3d} {max(s.latency for s in group) * 1000:7.1f} "
            f"{dict(statuses)} {errors[0] if errors else ''} {marks.get(key, '')}"
        )
    return "\n".join(lines)


async def retry_until_ok(call: Callable[[], Awaitable[httpx.Response]], within: float) -> tuple[int, float]:
    """Retry a write until it is answered 200; returns (attempts, seconds)."""
    started = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        response = await call()
        if response.status_code == 200:
            return attempts, time.monotonic() - started
        assert response.status_code == 503, response.text
        assert time.monotonic() - started < within, f"write still failing after {within} s: {response.text}"
        await asyncio.sleep(0.02)


async def terminate_gateway_connections(dsn: str) -> int:
    admin = await asyncpg.connect(dsn)
    try:
        rows = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'feature-gateway:bulk'"
        )
    finally:
        await admin.close()
    return len(rows)


async def test_faults_under_load(tmp_path: Path) -> None:
    store = RedisProcess()
    postgres = PostgresProcess()
    registry = tmp_path / "registry.yaml"
    registry.write_text(REGISTRY.format(redis_url=store.url, pg_dsn=postgres.dsn))
    server = GatewayProcess(registry, tmp_path / "gateway.log")
    faults: list[Fault] = []
    notes: list[str] = []
    with contextlib.ExitStack() as processes:  # each is stopped however the test ends
        for process in (store, postgres, server):
            processes.callback(process.stop)
        store.start()
        postgres.start()
        server.start()
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=5, limits=limits) as client:

            async def write(group: str, rows: list[dict[str, Any]]) -> httpx.Response:
                return await client.post("/v1/features/write", json={"group": group, "rows": rows})

            assert (await write("live", LIVE_ROWS)).status_code == 200
            assert (await write("history", HISTORY_ROWS)).status_code == 200
            load = Load(client)
            driver = asyncio.create_task(load.run())
            try:
                # Warm-up: the pools open their connections as concurrency rises (cold-start costs, reported
                # apart and not held to the deadline), then a healthy baseline.
                await asyncio.sleep(WARM_UP_S)
                warm_up, load.samples = load.samples, []
                await asyncio.sleep(1.0)

                # 1. Redis dies (SIGKILL) and comes back empty on the same port; the data is written again.
                issued = time.monotonic()
                await asyncio.to_thread(store.stop)  # returns once the process is gone
                started = time.monotonic()  # requests sent earlier may still have been answered by it
                await asyncio.sleep(FAULT_S)
                restoring = time.monotonic()
                await asyncio.to_thread(RedisProcess.start, store)
                faults.append(Fault("redis SIGKILL + restart", "hot", issued, started, restoring, time.monotonic()))
                attempts, took = await retry_until_ok(lambda: write("live", LIVE_ROWS), within=RECOVERY_S)
                notes.append(f"rewrite after the Redis restart: {attempts} attempt(s), {took * 1000:.0f} ms")
                await asyncio.sleep(SETTLE_S)

                # 2. PostgreSQL hangs (SIGSTOP on the postmaster and every backend), then resumes.
                issued = time.monotonic()
                await asyncio.to_thread(postgres.freeze)  # returns once every process is stopped
                started = time.monotonic()
                await asyncio.sleep(FAULT_S)
                restoring = time.monotonic()
                postgres.thaw()
                faults.append(Fault("postgres SIGSTOP/SIGCONT", "bulk", issued, started, restoring, time.monotonic()))
                await asyncio.sleep(SETTLE_S)

                # 3. PostgreSQL crashes (SIGKILL, every pooled connection dies) and restarts on the same data.
                issued = time.monotonic()
                await asyncio.to_thread(postgres.crash)  # returns once every process is gone
                started = time.monotonic()
                await asyncio.sleep(FAULT_S)
                restoring = time.monotonic()
                await asyncio.to_thread(postgres.restart)
                faults.append(Fault("postgres SIGKILL + restart", "bulk", issued, started, restoring, time.monotonic()))
                await asyncio.sleep(SETTLE_S)

                # 4. An operator terminates the gateway's PostgreSQL sessions (pg_terminate_backend).
                started = time.monotonic()
                terminated = await terminate_gateway_connections(postgres.dsn)
                done = time.monotonic()
                faults.append(
                    Fault(f"pg_terminate_backend x{terminated}", "bulk", started, started, done, done, instant=True)
                )
                await asyncio.sleep(SETTLE_S)

            finally:
                load.stop()
                await driver
            ready = await client.get("/readyz")
        log = server.log()

    samples = sorted(load.samples, key=lambda s: s.sent)
    ends = [f.issued for f in faults[1:]] + [max(s.done for s in samples) + 1]
    lines = [f"fault load: {len(samples)} fetches at {RATE}/s, deadline {DEADLINE_MS} ms, {len(faults)} faults"]
    failed: list[str] = []
    for fault, end in zip(faults, ends, strict=True):
        other = "bulk" if fault.backend == "hot" else "hot"
        during = [s for s in fault.during(samples) if s.overload is None]  # a refusal has no values (counted below)
        wrong = [s for s in during if getattr(s, fault.backend) != {"UNAVAILABLE"} or getattr(s, other) != {"PRESENT"}]
        recovery = fault.recovery_s(samples, end)
        again = "never" if recovery is None else f"{recovery * 1000:.0f} ms"
        if fault.instant:
            lines.append(f"  {fault.name}: every value PRESENT again {again} after it")
        else:
            lines.append(
                f"  {fault.name}: {len(fault.sent_in(samples))} sent during the fault, {len(during)} answered in it "
                f"({len(wrong)} not {fault.backend}=UNAVAILABLE/{other}=PRESENT), every value PRESENT again "
                f"{again} after recovery"
            )
        if wrong:
            failed.append(f"{fault.name}: {len(wrong)} answers during the fault were not as expected: {wrong[:3]}")
        if recovery is None or recovery > RECOVERY_S:
            after = [s for s in samples if fault.recovered <= s.sent and s.done < end and not s.whole]
            errors = Counter(e for s in after for e in s.errors.values())
            failed.append(f"{fault.name}: not whole within {RECOVERY_S} s of recovery; errors: {errors.most_common(5)}")
    # At 50 fetches a second nothing is overloaded, but a box loaded by others can stall the gateway for most of
    # a deadline (the slack below is for the same stalls); a request that waited that long is refused at once
    # (503 overload, naming its wait) instead of answered late. That is the admission rule, not a fault: a few
    # are allowed, counted apart.
    refused = [s for s in samples if s.overload is not None]
    server_errors = [s for s in samples if s.status >= 500 and s.overload is None]
    not_ok = [s for s in samples if s.status != 200 and s.overload is None]
    late = [s for s in samples if s.latency > DEADLINE_MS / 1000 + SLACK_S]
    slowest = max(samples, key=lambda s: s.latency)
    wrong_values = [s for s in samples if s.status == 200 and not s.values_ok]
    lines.append(
        f"  5xx: {len(server_errors)}, other non-200: {len(not_ok) - len(server_errors)}, "
        f"no answer: {len(load.failures)}, wrong values: {len(wrong_values)}, "
        f"later than deadline + {SLACK_S * 1000:.0f} ms: {len(late)}, slowest: {slowest.latency * 1000:.1f} ms"
    )
    lines.append(f"  503 overload (waited on a stalled box): {len(refused)} {[s.overload for s in refused[:2]]}")
    lines += [f"  {note}" for note in notes]
    warm_slowest = max(s.latency for s in warm_up)
    warm_late = sum(s.latency > DEADLINE_MS / 1000 + SLACK_S for s in warm_up)
    lines.append(
        f"  warm-up (first {WARM_UP_S:g} s, not held to the deadline): {len(warm_up)} fetches, "
        f"{sum(s.status >= 500 for s in warm_up)} 5xx, {warm_late} late, slowest {warm_slowest * 1000:.1f} ms"
    )
    problems = [
        line for line in log.splitlines() if "Traceback" in line or "ERROR" in line or "never retrieved" in line
    ]
    lines.append(f"  gateway log: {len(problems)} errors or tracebacks")
    summary = "\n".join(lines)
    print("\n" + summary)
    summary += "\n" + timeline(samples, faults)  # on failure: what happened when

    assert not load.failures, f"{summary}\n{load.failures[:5]}"
    assert all(s.status < 500 for s in warm_up), summary
    assert not problems, f"{summary}\n{log}"
    assert not not_ok, f"{summary}\n{not_ok[:5]}"
    assert len(refused) <= len(samples) // 100, summary
    assert not wrong_values, summary
    assert not late, f"{summary}\n{sorted(late, key=lambda s: -s.latency)[:5]}"
    assert not failed, summary + "\n" + "\n".join(failed)
    for fault in faults[:3]:  # each real outage was seen under load (the terminate one is instantaneous)
        assert len(fault.during(samples)) >= FAULT_S * RATE / 2, summary
    assert ready.status_code == 200, ready.text

"""Admission control: the limiter's rule on a hand-moved clock, the 503 it answers through the app, the deadline
counted from receipt, and which deadline misses count against a backend (Gateway.blames).

The overload itself, on a real server: test_overload.py."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from app.errors import Overloaded
from app.resilience.admission import AdmissionPolicy, Limiter, Work
from app.resilience.loop_lag import LoopLag
from app.serving.fetch import serve
from app.serving.request import FetchRequest
from tests.support.clients import live_row, write
from tests.support.clock import ManualClock
from tests.support.gateways import GatewayFactory
from tests.support.registries import Names

POLICY = AdmissionPolicy(initial_limit=10, min_limit=2, max_limit=40, tolerance=1.5, queue=2.0, window_samples=4)


def run_window(
    limiter: Limiter, clock: ManualClock, concurrent: int, latency_s: float, deadline_s: float | None = None
) -> None:
    """One window: `concurrent` fetches in flight at once, each taking `latency_s`; the last to end closes it."""
    for _ in range(concurrent):
        assert limiter.acquire(Work.READ)
    for _ in range(concurrent - 1):
        limiter.release(Work.READ, latency_s, deadline_s)
    clock.advance(POLICY.window_s)
    limiter.release(Work.READ, latency_s, deadline_s)


def test_admits_up_to_the_limit_and_counts_what_it_refuses() -> None:
    limiter = Limiter(POLICY, clock=ManualClock())
    assert all(limiter.acquire(Work.READ) for _ in range(10))
    assert not limiter.admits(Work.READ)
    assert not limiter.acquire(Work.READ)
    limiter.refused(Work.WRITE)  # refused at the door, before acquire
    assert limiter.shed == {Work.READ: 1, Work.WRITE: 1}
    limiter.release(Work.READ, None)
    assert limiter.acquire(Work.READ)
    assert limiter.inflight == 10


def test_writes_hold_at_most_their_share() -> None:
    limiter = Limiter(POLICY, clock=ManualClock())
    assert all(limiter.acquire(Work.WRITE) for _ in range(5))  # half of 10
    assert not limiter.acquire(Work.WRITE)
    assert all(limiter.acquire(Work.READ) for _ in range(5))  # reads still get the rest
    assert not limiter.acquire(Work.READ)
    limiter.release(Work.WRITE, 9.0)  # a write's latency is no sample: it would not move the limit
    assert limiter.writes == 4
    assert limiter._samples == []


def test_the_limit_grows_while_latency_holds_and_shrinks_when_it_rises() -> None:
    clock = ManualClock()
    limiter = Limiter(POLICY, clock=clock)
    for _ in range(5):  # busy (all 10 in flight) at a steady 2 ms: no congestion, the limit explores upward
        run_window(limiter, clock, int(limiter.limit), 0.002)
    grown = limiter.limit
    assert grown == 20.0  # 10 + 5 windows x queue 2
    run_window(limiter, clock, int(limiter.limit), 0.012)  # 6x the floor: 1.5 x 2 / 12 = 0.25, clamped at 0.5
    assert limiter.limit == grown * 0.5 + POLICY.queue
    run_window(limiter, clock, int(limiter.limit), 0.004)  # 2x the floor: gradient 0.75
    assert limiter.limit == pytest.approx((grown * 0.5 + 2) * 0.75 + 2)
    for _ in range(50):  # sustained congestion halves it each window: it settles where L = L / 2 + queue
        run_window(limiter, clock, int(limiter.limit), 0.05)
    assert limiter.limit == pytest.approx(2 * POLICY.queue)


def test_a_worker_using_less_than_half_its_limit_learns_nothing_of_it() -> None:
    clock = ManualClock()
    limiter = Limiter(POLICY, clock=clock)
    run_window(limiter, clock, 4, 0.002)
    run_window(limiter, clock, 4, 0.05)  # slow, but 4 of 10 in flight: the limit is not what made it slow
    assert limiter.limit == 10.0


def test_the_floor_is_relearnt_when_old_windows_age_out() -> None:
    clock = ManualClock()
    limiter = Limiter(POLICY, clock=clock)
    run_window(limiter, clock, 10, 0.002)
    clock.advance(POLICY.floor_s + 1)  # the 2 ms window is forgotten: 10 ms is the new normal (a slower backend)
    for _ in range(3):
        before = limiter.limit
        run_window(limiter, clock, int(limiter.limit), 0.010)
        assert limiter.limit > before  # within tolerance of the new floor: not congestion, it keeps growing
    run_window(limiter, clock, int(limiter.limit), 0.040)  # and is measured against the new floor
    assert limiter.limit < before


async def test_a_full_worker_answers_503_overload_at_once_and_never_sheds_health_or_metrics(
    gateway: GatewayFactory, names: Names
) -> None:
    async with gateway(names.registry(names.backend("redis")), admission=True) as client:
        gw = client.app.state.gateway  # type: ignore[attr-defined]
        limiter = gw.admission
        await write(client, "live", [live_row(1, 3)])
        for _ in range(int(limiter.limit)):  # the worker is full: every slot held by a request in flight
            assert limiter.acquire(Work.READ)
        refused = await client.post(
            "/v1/features/fetch", json={"entities": {"consumer_id": [1]}, "features": ["live:orders_7d"]}
        )
        refused_write = await client.post("/v1/features/write", json={"group": "live", "rows": [live_row(2, 1)]})
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
        metrics = await client.get("/metrics")
        for _ in range(int(limiter.limit)):
            limiter.release(Work.READ, None)
        served = await client.post(
            "/v1/features/fetch", json={"entities": {"consumer_id": [1]}, "features": ["live:orders_7d"]}
        )
    assert refused.status_code == 503
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["retry-after"] == "1"
    problem = refused.json()
    assert problem["type"].endswith("/overload")
    assert problem["work"] == "read"
    assert refused_write.status_code == 503
    assert refused_write.json()["work"] == "write"
    assert (health.status_code, ready.status_code, metrics.status_code) == (200, 200, 200)
    assert 'feature_gateway_requests_shed_total{work="read"} 1' in metrics.text.splitlines()
    assert served.status_code == 200
    assert served.json()["rows"][0]["values"] == [3]


async def test_the_deadline_counts_from_receipt(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("redis"))) as client:
        gw = client.app.state.gateway  # type: ignore[attr-defined]
        await write(client, "live", [live_row(1, 3)])
        request = FetchRequest(entities={"consumer_id": [1]}, features=["live:orders_7d"], deadline_ms=50)
        with pytest.raises(Overloaded) as waited:  # received 80 ms ago: its 50 ms were spent in a queue
            await serve(gw, request, received=time.perf_counter() - 0.080)
        fresh = await serve(gw, request, received=time.perf_counter())
    assert waited.value.field == "deadline_ms"
    assert "waited 8" in waited.value.detail  # 80 ms, or a little more on a busy box
    assert fresh.columns[0][0].values == (3,)
    assert not fresh.degraded


async def test_only_a_backend_that_was_itself_slow_is_blamed(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("redis"), names.backend("sqlite"))) as client:
        gw = client.app.state.gateway  # type: ignore[attr-defined]
        slow_s = gw.breaker_policy.slow_ms / 1000
        long_ago = time.perf_counter() - slow_s * 4
        await asyncio.sleep(0.1)  # the loop-lag probe runs a few times on a loop with nothing to do
        assert gw.blames("hot", "read", long_ago)  # nothing answered since, the loop was on time: the backend
        assert not gw.blames("bulk", "read", long_ago)  # in-process (SQLite): a late read is the CPU's
        assert not gw.blames("hot", "read", time.perf_counter())  # waited less than slow_ms
        gw.answered("hot", "write")
        assert gw.blames("hot", "read", long_ago)  # a write answered says nothing of reads
        gw.loop_lag.note(slow_s * 8)  # the loop was late by more than the whole wait: the reply sat unread
        assert not gw.blames("hot", "read", long_ago)
        await asyncio.sleep(slow_s * 8)
        since_then = time.perf_counter() - slow_s * 4  # a read sent after that late turn
        assert gw.blames("hot", "read", since_then)
        gw.answered("hot", "read")
        assert not gw.blames("hot", "read", since_then)  # it answered another read meanwhile: it is up


def test_latency_well_within_the_deadlines_asked_is_not_congestion() -> None:
    clock = ManualClock()
    limiter = Limiter(POLICY, clock=clock)
    run_window(limiter, clock, 10, 0.002)
    for _ in range(3):  # 20x the floor, but under half the 100 ms the clients asked for: keep growing
        before = limiter.limit
        run_window(limiter, clock, int(limiter.limit), 0.040, deadline_s=0.1)
        assert limiter.limit == before + POLICY.queue
    run_window(limiter, clock, int(limiter.limit), 0.080, deadline_s=0.1)  # past half of it: shrink
    assert limiter.limit == pytest.approx((before + POLICY.queue) * 50 / 80 + POLICY.queue)
    assert limiter.typical_s == 0.080


async def test_a_request_left_less_than_a_fetch_takes_is_refused_but_a_short_deadline_is_served_as_asked(
    gateway: GatewayFactory, names: Names
) -> None:
    async with gateway(names.registry(names.backend("redis")), admission=True) as client:
        gw = client.app.state.gateway  # type: ignore[attr-defined]
        await write(client, "live", [live_row(1, 3)])
        request = FetchRequest(entities={"consumer_id": [1]}, features=["live:orders_7d"], deadline_ms=30)
        gw.admission.typical_s = 0.010  # a fetch takes 10 ms now
        with pytest.raises(Overloaded):  # waited 25 ms of its 30: 5 ms left is not enough
            await serve(gw, request, received=time.perf_counter() - 0.025)
        served = await serve(gw, request, received=time.perf_counter() - 0.005)
        # A fetch takes 40 ms now, more than the whole 30 ms deadline: served as asked, never refused for it
        # (refusing would refuse every such request, and nothing would measure the fetch time again).
        gw.admission.typical_s = 0.040
        short = await serve(gw, request, received=time.perf_counter() - 0.005)
    assert served.columns[0][0].values == (3,)
    assert short.columns[0][0].values == (3,)


async def test_loop_lag_counts_an_overdue_probe_only_while_it_runs() -> None:
    clock = ManualClock()
    lag = LoopLag(interval_s=0.02, clock=clock)
    clock.advance(5.0)  # never started (a gateway used for a bulk load): no lag, not five seconds of it
    assert lag.worst_since(clock() - 10) == 0.0
    probe = asyncio.get_running_loop().create_task(lag.run())
    await asyncio.sleep(0)  # it starts, and sleeps its interval
    clock.advance(0.5)  # the loop has not woken it for half a second: overdue now
    assert lag.worst_since(clock() - 1) == pytest.approx(0.48)
    lag.note(0.1)
    assert lag.worst_since(clock() - 1) == pytest.approx(0.48)
    probe.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await probe
    assert lag.worst_since(clock() - 1) == pytest.approx(0.1)  # stopped: only what it measured

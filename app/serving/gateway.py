"""The running gateway: registry, open backends, circuits, limits, tracer and the per-registry plan cache.

Owned by the app's lifespan (or a materialize run); `fetch.py` and `write.py` do the work against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from app.errors import describe_error
from app.metrics import Metrics
from app.registry.model import Registry, Service
from app.resilience.admission import AdmissionPolicy, Limiter, Work
from app.resilience.breaker import BreakerPolicy, Circuits
from app.resilience.loop_lag import LoopLag
from app.serving.limits import Limits
from app.serving.plan import Plan, make_plan
from app.streams.freshness import FreshnessMonitor
from app.tiering.cache import CacheTier
from app.tracing.spans import SPAN_COUNTS, Tracing
from backends.base import FeatureBackend

log = logging.getLogger(__name__)

_PLAN_CACHE_SIZE = 4096
_PLAN_CACHE_FEATURES = 200_000  # about 30 MB of plans at most
LOOP_TURNS_PER_REPLY = 2  # see Gateway.blames
_NO_SPAN: AbstractContextManager[trace.Span] = nullcontext(trace.INVALID_SPAN)


@dataclass(frozen=True, slots=True)
class Lifecycle:
    migrate_on_start: bool = True  # create tables at start-up (and when a backend that was down answers)
    migrate_retry_s: float = 1.0  # how often to retry a backend that was down at start
    ready_timeout_s: float = 1.0  # how long readiness waits for each backend


class Gateway:
    """What serving needs, wired by the composition root: the registry, open backends, their circuits, the
    limits and policies, metrics and tracer; and the cached plans and background tasks it owns."""

    def __init__(
        self,
        registry: Registry,
        backends: dict[str, FeatureBackend],
        *,
        limits: Limits | None = None,
        breaker_policy: BreakerPolicy | None = None,
        lifecycle: Lifecycle | None = None,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
        admission: AdmissionPolicy | None = None,
    ):
        self.registry = registry
        self.backends = backends
        self.limits = limits or Limits()
        self.breaker_policy = breaker_policy or BreakerPolicy()
        self.lifecycle = lifecycle or Lifecycle()
        self.tracing = tracing
        self.metrics = metrics or Metrics()
        self.migrated: dict[str, bool] = dict.fromkeys(backends, False)
        self.breakers = {name: Circuits.make(self.breaker_policy) for name in backends}
        self.read_timeout_s = {name: registry.backends[name].options["timeout_ms"] / 1000 for name in backends}
        self._plans: dict[tuple[str, ...], Plan] = {}
        self._plan_size = 0
        self._service_plans: dict[str, Plan] = {}  # bounded by the registry's services
        self.metrics.live_plans = lambda: (
            gp for plans in (self._plans, self._service_plans) for plan in plans.values() for gp in plan.groups
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        # None: every request is admitted (in-process callers such as materialize, tests that want no shedding)
        self.admission = Limiter(admission) if admission is not None and admission.enabled else None
        self.loop_lag = LoopLag(observe=self.metrics.loop_lag.observe)
        self.metrics.load = self.load
        # (backend, "read" or "write") -> when it last completed one: proof it was up at that moment
        self._answered: dict[tuple[str, str], float] = {}
        self.freshness = FreshnessMonitor(registry)  # consumers' lag per stream, for max_lag and the metrics
        self.cache = CacheTier(self)  # the groups' hot tiers: promotions and dirty keys of this worker

    def span(self, name: str) -> AbstractContextManager[trace.Span]:
        """The span of a backend call under the current request's; with tracing off, or under a request the
        sampler did not record, a shared no-op: nothing is built (see app/tracing/spans.py)."""
        if self.tracing is None:
            return _NO_SPAN
        return self.tracing.backend_span(name) or _NO_SPAN

    def server_span(self, name: str, headers: Mapping[str, str]) -> AbstractContextManager[trace.Span]:
        """The span of a request, a child of the caller's span when its headers carry one. Whether it is
        recorded is the sampler's call: parent-based, so a caller's decision holds (see app/telemetry.py)."""
        if self.tracing is None:
            return _NO_SPAN
        return self.tracing.server_span(name, headers)

    def service_plan(self, service: Service) -> Plan:
        """A service's plan, made at its first fetch: its order, its defaults and max_age."""
        plan = self._service_plans.get(service.name)
        if plan is None:
            # Declared by the operator, so not held to a client's feature limit
            plan = make_plan(self.registry, service.features, len(service.refs), service)
            self._service_plans[service.name] = plan
        return plan

    def plan(self, features: Sequence[str]) -> Plan:
        """The cached plan of a feature list. The cache is bounded by plans and by their total size, since
        clients choose the lists; an evicted plan's usage counts are folded into the metrics first."""
        key = tuple(features)
        plan = self._plans.get(key)
        if plan is None:
            plan = make_plan(self.registry, key, self.limits.max_features)
            self._plans[key] = plan
            self._plan_size += len(plan.features)
            while len(self._plans) > _PLAN_CACHE_SIZE or self._plan_size > _PLAN_CACHE_FEATURES:
                evicted = self._plans.pop(next(iter(self._plans)))
                self._plan_size -= len(evicted.features)
                self.metrics.fold(evicted.groups)
        return plan

    def spawn(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> asyncio.Task[None]:
        """A task the gateway keeps a reference to until it ends (asyncio holds only weak ones)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def answered(self, backend: str, direction: str) -> None:
        """A read or write of `backend` just completed."""
        self._answered[(backend, direction)] = time.perf_counter()

    def blames(self, backend: str, direction: str, started: float) -> bool:
        """Does a call sent at `started` and cut off now (deadline or timeout) count against the backend?

        Only when the backend itself was slow. Not when it is in-process (then the lateness is the CPU's), not
        when it completed another call of the same direction meanwhile (it is up; the queue was ours), and not
        when what is left of the wait after the event loop's lag meanwhile is under `slow_ms`: a reply the loop was
        too busy to read is not the backend's delay. A reply can sit for two turns of a late loop: one that
        arrives while a long turn runs is read only after the next turn's timers, which include the deadline.
        """
        if self.backends[backend].in_process:
            return False
        if self._answered.get((backend, direction), 0.0) > started:
            return False
        lag_s = self.loop_lag.worst_since(started)
        waited_s = time.perf_counter() - started - LOOP_TURNS_PER_REPLY * lag_s
        return waited_s * 1000 >= self.breaker_policy.slow_ms

    def load(self) -> dict[str, float]:
        """This worker's load, for metrics and the status page."""
        limiter = self.admission
        return {
            "lag_ms": self.loop_lag.recent_s() * 1000,
            "limit": 0 if limiter is None else int(limiter.limit),
            "inflight": 0 if limiter is None else limiter.inflight,
            "shed_reads": 0 if limiter is None else limiter.shed[Work.READ],
            "shed_writes": 0 if limiter is None else limiter.shed[Work.WRITE],
            **{f"spans_{k}": v for k, v in (self.tracing.counts() if self.tracing else SPAN_COUNTS).items()},
        }

    async def start(self) -> None:
        """Migrate every backend; one that is down is retried in the background, never fatal."""
        self.spawn(self.loop_lag.run(), name="loop-lag")
        if self.metrics.directory is not None:
            self.spawn(self._dump_metrics(), name="metrics")
        if self.freshness:
            self.spawn(self.freshness.run(), name="freshness")
        self.spawn(self.cache.run(), name="cache-promotions")
        self.spawn(self.cache.evict_dirty(), name="cache-evictions")
        if not self.lifecycle.migrate_on_start:
            self.migrated = dict.fromkeys(self.backends, True)
            return
        await asyncio.gather(*(self._migrate(name, retry=False) for name in self.backends))
        for name, done in self.migrated.items():
            if not done:
                self.spawn(self._migrate(name, retry=True), name=f"migrate:{name}")

    async def _dump_metrics(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.metrics.dump()
            except OSError as exc:
                log.warning("could not write the metrics snapshot: %s", exc)

    async def _migrate(self, name: str, *, retry: bool) -> None:
        timeout = max(self.lifecycle.ready_timeout_s, 1.0)
        while True:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that lands as the
                # inner call fails, and this loop would then never end (it hung shutdown once).
                async with asyncio.timeout(timeout):
                    await self.backends[name].migrate()
                self.migrated[name] = True
                log.info("backend %s ready", name)
                return
            except Exception as exc:
                if not retry:
                    log.warning(
                        "backend %s is not answering (%s: %s); serving its features as UNAVAILABLE and retrying",
                        name,
                        type(exc).__name__,
                        exc,
                    )
                    return
            await asyncio.sleep(self.lifecycle.migrate_retry_s)

    async def readiness(self) -> dict[str, str | None]:
        """Per backend: None when it answers, else why not."""
        timeout = self.lifecycle.ready_timeout_s

        async def check(name: str) -> str | None:
            if not self.migrated[name]:
                try:
                    async with asyncio.timeout(timeout):
                        await self.backends[name].migrate()
                    self.migrated[name] = True
                except Exception as exc:
                    return describe_error(exc)
            try:
                async with asyncio.timeout(timeout):
                    await self.backends[name].ping()
            except Exception as exc:
                return describe_error(exc)
            return None

        names = list(self.backends)
        answers = await asyncio.gather(*(check(n) for n in names))
        return dict(zip(names, answers, strict=True))

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:  # let them end before the pools they use close, but never wait on one that ignores it
            await asyncio.wait(tasks, timeout=1.0)
        with contextlib.suppress(OSError):
            self.metrics.dump()
        await self.freshness.aclose()
        for name in reversed(list(self.backends)):
            try:
                await self.backends[name].aclose()
            except Exception as exc:
                log.warning("backend %s did not close cleanly: %s", name, exc)

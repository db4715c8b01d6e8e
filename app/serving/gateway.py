"""The running gateway: registry, open backends, circuits, limits, tracer and the per-registry plan cache.

Owned by the app's lifespan (or a materialize run); `fetch.py` and `write.py` do the work against it. `reload`
swaps in another registry between requests (app/serving/generations.py says how in-flight requests are kept on
theirs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

from opentelemetry import trace

from app.errors import describe_error
from app.metrics import Metrics
from app.registry.model import BackendSpec, Registry, Service
from app.resilience.admission import AdmissionPolicy, Limiter, Work
from app.resilience.breaker import BreakerPolicy, Circuits
from app.resilience.loop_lag import LoopLag
from app.serving.generations import Changes, Generation, InFlight, Pinned, Reloaded, Retired
from app.serving.limits import Limits
from app.serving.local_cache import LocalCache
from app.serving.plan import Plan, make_plan
from app.streams.freshness import FreshnessMonitor, watched_streams
from app.tiering.cache import CacheTier
from app.tracing.spans import SPAN_COUNTS, Tracing
from backends.base import FeatureBackend

log = logging.getLogger(__name__)
T = TypeVar("T")

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
        local_cache: LocalCache | None = None,
    ):
        self.limits = limits or Limits()
        self.breaker_policy = breaker_policy or BreakerPolicy()
        self.lifecycle = lifecycle or Lifecycle()
        self.tracing = tracing
        self.metrics = metrics or Metrics()
        breakers = {name: Circuits.make(self.breaker_policy) for name in backends}
        self.current = Generation(1, registry, backends, breakers, _read_timeouts(registry, backends))
        self.migrated: dict[str, bool] = dict.fromkeys(backends, False)  # replaced whole by a reload
        self.in_flight = InFlight()
        self._plans: dict[tuple[str, ...], Plan] = {}
        self._plan_size = 0
        self._service_plans: dict[str, Plan] = {}  # bounded by the registry's services
        self.metrics.live_plans = self._live_plans
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing: set[asyncio.Task[None]] = set()  # retired backends being closed (awaited, never cancelled)
        self._freshness_task: asyncio.Task[None] | None = None
        self._reloading = asyncio.Lock()
        # None: every request is admitted (in-process callers such as materialize, tests that want no shedding)
        self.admission = Limiter(admission) if admission is not None and admission.enabled else None
        self.loop_lag = LoopLag(observe=self.metrics.loop_lag.observe)
        self.metrics.load = self.load
        # (backend, "read" or "write") -> when it last completed one: proof it was up at that moment
        self._answered: dict[tuple[str, str], float] = {}
        self.freshness = FreshnessMonitor(registry)  # consumers' lag per stream, for max_lag and the metrics
        self.cache = CacheTier(self)  # the groups' hot tiers: promotions and dirty keys of this worker
        # Groups' local_cache_ms: this worker's copies, invalidated by writes through any worker of the gateway
        self.local_cache = local_cache or LocalCache()
        self.metrics.local_cache = self.local_cache.counts
        self.metrics.local_cache_size = self.local_cache.size

    # The current generation's parts, as every reader before reloads knew them. A request that awaits must take
    # them from the generation it pinned instead (see generations.py).
    @property
    def registry(self) -> Registry:
        return self.current.registry

    @property
    def backends(self) -> dict[str, FeatureBackend]:
        return self.current.backends

    @property
    def breakers(self) -> dict[str, Circuits]:
        return self.current.breakers

    @property
    def read_timeout_s(self) -> dict[str, float]:
        return self.current.read_timeout_s

    def pinned(self, generation: Generation | None = None) -> Pinned:
        """`with gateway.pinned() as generation:` the current generation (or `generation`), whose backends stay
        open until the block ends. Take it in the same step (no await between) as anything else read off the
        gateway for the request, so that all of it is of one registry."""
        return Pinned(self, generation or self.current)

    def unpin(self, number: int) -> None:
        users = self.in_flight.users
        left = users[number] - 1
        if left:
            users[number] = left
            return
        del users[number]
        if self.in_flight.retired:
            self._release(self.in_flight.drained(self.current.number))

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

    def _live_plans(self) -> Iterator[Any]:
        """The plans still counting: the caches, and those of retired generations not yet folded (requests
        pinned to them still count on them)."""
        for plans in (self._plans.values(), self._service_plans.values()):
            for plan in plans:
                yield from plan.groups
        for retired in self.in_flight.retired:
            for plan in retired.plans:
                yield from plan.groups

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
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
        current = self.backends.get(backend)
        # A backend the registry no longer has: its circuits are gone with it, what is counted does not matter
        if current is None or current.in_process:
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
            self._freshness_task = self.spawn(self.freshness.run(), name="freshness")
        self.spawn(self.cache.run(), name="cache-promotions")
        self.spawn(self.cache.retry_dirty(), name="cache-retries")
        ready = await self._migrate_once(self.backends)
        self.migrated = ready
        self._retry_migrations(ready)

    async def _migrate_once(self, backends: Mapping[str, FeatureBackend]) -> dict[str, bool]:
        """Migrate each of `backends` once, concurrently: per name, whether it answered."""
        if not self.lifecycle.migrate_on_start:
            return dict.fromkeys(backends, True)
        names = list(backends)
        answers = await asyncio.gather(*(self._migrate(name, backends[name], retry=False) for name in names))
        return dict(zip(names, answers, strict=True))

    def _retry_migrations(self, ready: Mapping[str, bool]) -> None:
        for name, done in ready.items():
            if not done:
                self.spawn(self._migrate(name, self.backends[name], retry=True), name=f"migrate:{name}")

    async def _dump_metrics(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.metrics.dump()
            except OSError as exc:
                log.warning("could not write the metrics snapshot: %s", exc)

    def _mark_migrated(self, name: str, backend: FeatureBackend) -> None:
        # Only the client the gateway serves with now: a retired one's tables say nothing of its successor's
        if self.backends.get(name) is backend:
            self.migrated[name] = True

    async def _migrate(self, name: str, backend: FeatureBackend, *, retry: bool) -> bool:
        """Whether `backend` answered (and has its tables); with `retry`, until it does or a reload retires it."""
        timeout = max(self.lifecycle.ready_timeout_s, 1.0)
        while True:
            if retry and self.backends.get(name) is not backend:
                return False  # a reload retired it
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that lands as the
                # inner call fails, and this loop would then never end (it hung shutdown once).
                async with asyncio.timeout(timeout):
                    await backend.migrate()
                if retry:
                    self._mark_migrated(name, backend)
                log.info("backend %s ready", name)
                return True
            except Exception as exc:
                if not retry:
                    log.warning(
                        "backend %s is not answering (%s: %s); serving its features as UNAVAILABLE and retrying",
                        name,
                        type(exc).__name__,
                        exc,
                    )
                    return False
            await asyncio.sleep(self.lifecycle.migrate_retry_s)

    async def readiness(self) -> dict[str, str | None]:
        """Per backend: None when it answers, else why not."""
        timeout = self.lifecycle.ready_timeout_s
        migrated = self.migrated

        async def check(name: str, backend: FeatureBackend) -> str | None:
            if not migrated.get(name):
                try:
                    async with asyncio.timeout(timeout):
                        await backend.migrate()
                    self._mark_migrated(name, backend)
                except Exception as exc:
                    return describe_error(exc)
            try:
                async with asyncio.timeout(timeout):
                    await backend.ping()
            except Exception as exc:
                return describe_error(exc)
            return None

        with self.pinned() as generation:
            names = list(generation.backends)
            answers = await asyncio.gather(*(check(n, generation.backends[n]) for n in names))
        return dict(zip(names, answers, strict=True))

    async def reload(
        self,
        registry: Registry,
        open_backend: Callable[[BackendSpec, Registry], FeatureBackend],
        *,
        on_swap: Callable[[], None] | None = None,
    ) -> Reloaded:
        """Serve `registry` from the next request on; requests already in flight finish on theirs.

        A backend whose spec is unchanged is kept: the same client, connections, circuits and migrated state. A new
        or changed spec gets a client from `open_backend` (the composition root's: this core knows no backend
        type) and fresh circuits; it is migrated once before the swap, so that the first request of a group on it
        finds its tables, and if it does not answer it is retried in the background as at start-up. Then, in one
        step with no await (so no request sees half of it), the registry, backends, circuits, read timeouts, plan
        caches and stream monitor are swapped, and `on_swap` runs (the composition root swaps the key ring there).
        Removed and replaced backends are closed once the requests pinned to an older generation have ended; the
        plans dropped from the caches are folded into the usage totals then too (those requests still count on
        them).
        """
        async with self._reloading:  # one at a time: each builds on the generation before it
            old = self.current
            kept: dict[str, FeatureBackend] = {}
            opened: dict[str, FeatureBackend] = {}
            for name, spec in registry.backends.items():
                if name in old.backends and old.registry.backends.get(name) == spec:
                    kept[name] = old.backends[name]
                else:
                    opened[name] = open_backend(spec, registry)
            try:
                ready = await self._migrate_once(opened)
            except BaseException:  # cancelled (shutdown): nothing was swapped, nothing of this reload stays open
                await self._close_backends(list(opened.items()), "an abandoned reload")
                raise
            # -- the swap: not one await from here on --
            backends = {name: kept[name] if name in kept else opened[name] for name in registry.backends}
            breakers = {
                name: old.breakers[name] if name in kept else Circuits.make(self.breaker_policy) for name in backends
            }
            new = Generation(old.number + 1, registry, backends, breakers, _read_timeouts(registry, backends))
            retired = [(name, backend) for name, backend in old.backends.items() if kept.get(name) is not backend]
            plans = [*self._plans.values(), *self._service_plans.values()]
            self._plans, self._plan_size, self._service_plans = {}, 0, {}
            self.migrated = {name: self.migrated.get(name, False) if name in kept else ready[name] for name in backends}
            for name, _ in retired:  # a replaced backend's name: what the old server did proves nothing of the new
                self._answered.pop((name, "read"), None)
                self._answered.pop((name, "write"), None)
            restarted = self._swap_freshness(registry)
            self.current = new
            self.local_cache.clear()  # what it held was read for groups as the old registry declared them
            if on_swap is not None:
                on_swap()
            self.in_flight.retired.append(Retired(old.number, retired, plans))
            self._release(self.in_flight.drained(new.number))
            self._retry_migrations(ready)
            return Reloaded(
                generation=new.number,
                groups=Changes.between(old.registry.groups, registry.groups),
                services=Changes.between(old.registry.services, registry.services),
                on_demand=Changes.between(old.registry.on_demand, registry.on_demand),
                streams=Changes.between(old.registry.streams, registry.streams),
                opened=tuple(opened),
                retired=tuple(name for name, _ in retired),
                kept=tuple(kept),
                freshness_restarted=restarted,
            )

    def _swap_freshness(self, registry: Registry) -> bool:
        """A new stream monitor when the streams it watches changed (the old one is closed in the background)."""
        if watched_streams(registry) == watched_streams(self.current.registry):
            return False
        old, task = self.freshness, self._freshness_task
        self.freshness = FreshnessMonitor(registry)
        self._freshness_task = self.spawn(self.freshness.run(), name="freshness") if self.freshness else None
        if task is not None:
            task.cancel()
        self._background_close(self._close_monitor(old, task), "freshness")
        return True

    async def _close_monitor(self, monitor: FreshnessMonitor, task: asyncio.Task[None] | None) -> None:
        if task is not None:
            await asyncio.wait([task], timeout=1.0)  # its probe ends before its sources close
        await monitor.aclose()

    def _release(self, drained: list[Retired]) -> None:
        """What retired generations leave once no request can use it: usage folded, backends closed."""
        for retired in drained:
            self.metrics.fold(gp for plan in retired.plans for gp in plan.groups)
            if retired.backends:
                what = f"registry generation {retired.generation}"
                self._background_close(self._close_backends(retired.backends, what), f"close:{retired.generation}")

    def _background_close(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        # Not a `spawn`ed task: shutdown awaits these rather than cancelling them halfway through a close
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_backends(self, backends: list[tuple[str, FeatureBackend]], of: str) -> None:
        for name, backend in reversed(backends):
            try:
                await backend.aclose()
                log.info("closed backend %s of %s", name, of)
            except Exception as exc:
                log.warning("backend %s of %s did not close cleanly: %s", name, of, exc)

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:  # let them end before the pools they use close, but never wait on one that ignores it
            await asyncio.wait(tasks, timeout=1.0)
        with contextlib.suppress(OSError):
            self.metrics.dump()
        await self.freshness.aclose()
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=5.0)
        # Retired backends whose requests never ended (the server drained what it could before this)
        for retired in self.in_flight.retired:
            await self._close_backends(retired.backends, f"registry generation {retired.generation}")
        self.in_flight.retired.clear()
        for name in reversed(list(self.backends)):
            try:
                await self.backends[name].aclose()
            except Exception as exc:
                log.warning("backend %s did not close cleanly: %s", name, exc)


def _read_timeouts(registry: Registry, backends: Mapping[str, FeatureBackend]) -> dict[str, float]:
    return {name: registry.backends[name].options["timeout_ms"] / 1000 for name in backends}

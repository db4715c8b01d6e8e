"""The circuit breaker's state machine, on a clock the test advances by hand (no servers, no sleeps):

closed --N consecutive failures--> open --reset_s passes--> half-open (one probe) --success--> closed
                                     ^                                                |
                                     +--------------failure, or probe abandoned-------+

(What the gateway counts as a failure, on real servers: test_circuits.py.)"""

from __future__ import annotations

import time

import pytest

from app.resilience.breaker import CLOSED, HALF_OPEN, OPEN, BreakerPolicy, CircuitBreaker, Circuits
from app.settings import Settings
from tests.support.clock import ManualClock

RESET_S = 1.5  # the clock moves in steps that binary floats hold exactly, so boundaries are exact


def opened(clock: ManualClock, failures: int = 3) -> CircuitBreaker:
    """A breaker of `failures` threshold that `failures` consecutive failures have just opened."""
    breaker = CircuitBreaker(failures, RESET_S, clock)
    for _ in range(failures):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == OPEN
    return breaker


def half_open(clock: ManualClock) -> CircuitBreaker:
    """An opened breaker whose reset time has passed and whose one probe is under way."""
    breaker = opened(clock)
    clock.advance(RESET_S)
    assert breaker.allow()
    assert breaker.state == HALF_OPEN
    return breaker


def test_a_new_breaker_is_closed_and_lets_calls_through() -> None:
    breaker = CircuitBreaker(3, RESET_S, ManualClock())
    assert breaker.state == CLOSED
    assert breaker.failures == 0
    assert all(breaker.allow() for _ in range(10))
    assert breaker.state == CLOSED


def test_the_defaults_are_five_failures_one_second_and_the_monotonic_clock() -> None:
    breaker = CircuitBreaker()
    assert (breaker.threshold, breaker.reset_s, breaker.clock) == (5, 1.0, time.monotonic)


@pytest.mark.parametrize("threshold", [1, 2, 5])
def test_fewer_than_n_consecutive_failures_keep_it_closed(threshold: int) -> None:
    breaker = CircuitBreaker(threshold, RESET_S, ManualClock())
    for count in range(1, threshold):
        breaker.failure()
        assert breaker.state == CLOSED
        assert breaker.failures == count
        assert breaker.allow()


@pytest.mark.parametrize("threshold", [1, 2, 5])
def test_n_consecutive_failures_open_it_at_the_time_of_the_last(threshold: int) -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(threshold, RESET_S, clock)
    for _ in range(threshold - 1):
        breaker.failure()
        clock.advance(0.25)  # consecutive, not within a window: time between them does not matter
    breaker.failure()
    assert breaker.state == OPEN
    assert breaker.opened_at == clock.now
    assert not breaker.allow()


def test_a_success_resets_the_count_of_consecutive_failures() -> None:
    breaker = CircuitBreaker(3, RESET_S, ManualClock())
    breaker.failure()
    breaker.failure()
    breaker.success()
    assert breaker.failures == 0
    breaker.failure()
    breaker.failure()
    assert breaker.state == CLOSED  # 2 + 2 failures, but never 3 in a row
    breaker.failure()
    assert breaker.state == OPEN


def test_an_open_circuit_refuses_every_call_until_reset_s_has_passed() -> None:
    clock = ManualClock()
    breaker = opened(clock)
    for step in (0.5, 0.5, 0.25, 0.125):  # 1.375 s in all: short of RESET_S
        clock.advance(step)
        assert not breaker.allow()
        assert breaker.state == OPEN
    clock.advance(0.125)
    assert breaker.allow()  # reset_s has passed: this call is the probe


def test_after_reset_s_exactly_one_probe_is_let_through() -> None:
    clock = ManualClock()
    breaker = opened(clock)
    clock.advance(RESET_S)  # exactly: reset_s is a lower bound, inclusive
    assert breaker.allow()
    assert breaker.state == HALF_OPEN
    assert not breaker.allow()  # the probe is still out: nobody else
    clock.advance(10 * RESET_S)
    assert not breaker.allow()  # however long it takes
    assert breaker.state == HALF_OPEN


def test_a_successful_probe_closes_the_circuit_and_forgets_the_failures() -> None:
    clock = ManualClock()
    breaker = half_open(clock)
    breaker.success()
    assert breaker.state == CLOSED
    assert breaker.failures == 0
    assert all(breaker.allow() for _ in range(5))
    breaker.failure()
    breaker.failure()
    assert breaker.state == CLOSED  # it takes N fresh failures to open again
    breaker.failure()
    assert breaker.state == OPEN


def test_a_failed_probe_reopens_it_for_a_fresh_reset_s() -> None:
    clock = ManualClock()
    breaker = half_open(clock)
    first_opened_at = breaker.opened_at
    clock.advance(0.5)  # the probe took a while to fail
    breaker.failure()
    assert breaker.state == OPEN
    assert breaker.opened_at == clock.now > first_opened_at
    clock.advance(RESET_S - 0.125)
    assert not breaker.allow()  # counted from the failed probe, not from the first opening
    clock.advance(0.125)
    assert breaker.allow()
    assert breaker.state == HALF_OPEN


def test_an_abandoned_probe_reopens_it_for_a_fresh_reset_s() -> None:
    """A probe cancelled by the request's deadline did not prove the backend healthy: open again rather
    than stay half-open with no probe left to close it."""
    clock = ManualClock()
    breaker = half_open(clock)
    clock.advance(0.25)
    breaker.abandoned()
    assert breaker.state == OPEN
    assert breaker.opened_at == clock.now
    assert not breaker.allow()
    clock.advance(RESET_S - 0.125)
    assert not breaker.allow()
    clock.advance(0.125)
    assert breaker.allow()
    assert breaker.state == HALF_OPEN


def test_an_abandoned_call_on_a_closed_circuit_changes_nothing() -> None:
    """Cancelled by a tight deadline, the call says nothing about the backend: no failure, no success."""
    breaker = CircuitBreaker(3, RESET_S, ManualClock())
    breaker.failure()
    breaker.failure()
    breaker.abandoned()
    assert breaker.state == CLOSED
    assert breaker.failures == 2  # neither counted nor reset
    breaker.failure()
    assert breaker.state == OPEN


def test_an_abandoned_call_on_an_open_circuit_does_not_restart_its_wait() -> None:
    clock = ManualClock()
    breaker = opened(clock)
    opened_at = breaker.opened_at
    clock.advance(1.0)
    breaker.abandoned()  # a call from before the circuit opened, cancelled now
    assert breaker.state == OPEN
    assert breaker.opened_at == opened_at
    clock.advance(RESET_S - 1.0)
    assert breaker.allow()


def test_time_alone_changes_no_state() -> None:
    """The circuit turns half-open when a call asks after reset_s, not by itself: `state` stays OPEN meanwhile
    (what /readyz and the metrics report)."""
    clock = ManualClock()
    breaker = opened(clock)
    clock.advance(100 * RESET_S)
    assert breaker.state == OPEN


def test_circuits_are_a_read_and_a_write_breaker_of_the_policy_that_open_apart() -> None:
    policy = BreakerPolicy(failures=2, reset_s=0.75, slow_ms=20.0)
    circuits = Circuits.make(policy)
    read, write = circuits
    assert (circuits.read, circuits.write) == (read, write)
    assert read is not write
    for breaker in circuits:
        assert (breaker.threshold, breaker.reset_s, breaker.clock) == (2, 0.75, time.monotonic)
        assert breaker.state == CLOSED
    write.failure()
    write.failure()
    assert write.state == OPEN
    assert read.state == CLOSED  # a backend refusing writes still serves reads
    assert read.allow()


def test_each_backend_gets_circuits_of_its_own() -> None:
    policy = BreakerPolicy()
    hot, bulk = Circuits.make(policy), Circuits.make(policy)
    for _ in range(policy.failures):
        hot.read.failure()
    assert hot.read.state == OPEN
    assert bulk.read.state == CLOSED


def test_the_settings_give_the_policy_in_seconds() -> None:
    settings = Settings(breaker_failures=3, breaker_reset_ms=1500, breaker_slow_ms=80)
    assert settings.breaker_policy() == BreakerPolicy(failures=3, reset_s=1.5, slow_ms=80.0)

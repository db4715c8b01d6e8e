"""A locust plugin for `bench/soak`: every `--soak-interval` seconds, one JSON line about that interval alone.

Loaded next to the repo's locustfile (`locust -f locustfile.py,bench/soak_probe.py ...`); it has no users of
its own and changes nothing in the mix. It listens to every request locust completes and, at each tick
(counted from the start of the test, so ticks do not drift), appends to `--soak-out` one line with that
interval's requests, successes, failures by kind, requests per name and the exact latency percentiles of its
successful requests (from every response time, not locust's rounded histogram or its 10-second window).

Failure kinds, from the messages the locustfile gives (`HTTP 503: ...`, `degraded: ...`, ...):
  503         a 503 answer: the gateway refusing work (overload, an open write circuit); expected under overload
  degraded    a 200 whose backend failed or missed the deadline (values served as defaults)
  http        any other non-200 answer
  connection  no answer at all (refused, reset, timed out: locust reports status 0)
  answer      a 200 whose body is wrong (rows, statuses, counts)
  error       an exception in the user code

This file runs inside locust (gevent monkey-patches the process), never in the soak's own process.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import gevent
from locust import events
from locust.env import Environment
from locust.exception import CatchResponseError


def classify(exception: BaseException) -> str:
    """The failure kind of a request's exception (see the module docstring)."""
    if not isinstance(exception, CatchResponseError):
        return "connection" if isinstance(exception, OSError) else "error"
    message = str(exception)
    if message.startswith("HTTP 503"):
        return "503"
    if message.startswith("HTTP 0:") or message.startswith("HTTP 0 "):
        return "connection"
    if message.startswith("HTTP "):
        return "http"
    if message.startswith("degraded"):
        return "degraded"
    return "answer"


def percentile(sorted_values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile (as bench.measure's), None when there is no value."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), -(-len(sorted_values) * pct // 100)))
    return sorted_values[int(rank) - 1]


class Window:
    """What happened during one interval."""

    def __init__(self) -> None:
        self.times: list[float] = []  # ms, successful requests only
        self.requests = 0
        self.by_name: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.examples: dict[str, str] = {}  # kind -> the first message of that kind in this interval

    def record(self, name: str, response_time: float, exception: BaseException | None) -> None:
        self.requests += 1
        self.by_name[name] += 1
        if exception is None:
            self.times.append(response_time)
            return
        kind = classify(exception)
        self.failures[kind] += 1
        self.examples.setdefault(kind, f"{name}: {exception}"[:300])

    def summary(self, index: int, t_s: float, duration_s: float, users: int) -> dict[str, Any]:
        times = sorted(self.times)

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        return {
            "index": index,
            "t_s": round(t_s, 3),
            "duration_s": round(duration_s, 3),
            "users": users,
            "requests": self.requests,
            "ok": len(times),
            "failures": dict(self.failures),
            "examples": self.examples,
            "by_name": dict(self.by_name),
            "p50_ms": ms(percentile(times, 50)),
            "p90_ms": ms(percentile(times, 90)),
            "p99_ms": ms(percentile(times, 99)),
            "max_ms": ms(times[-1] if times else None),
            "mean_ms": ms(sum(times) / len(times) if times else None),
        }


_window = Window()
_ticker: gevent.Greenlet | None = None


def _options(parser: Any, **_kwargs: Any) -> None:
    parser.add_argument("--soak-out", default="", help="bench/soak: append one JSON line per interval here")
    parser.add_argument("--soak-interval", type=float, default=60.0, help="bench/soak: seconds per interval")


def _on_request(
    request_type: str, name: str, response_time: float, exception: BaseException | None = None, **_kwargs: Any
) -> None:
    _window.record(name, response_time, exception)


def _tick(environment: Environment, path: str, interval: float) -> None:
    global _window
    start = previous = time.monotonic()
    index = 0
    with open(path, "a", encoding="utf-8") as out:
        while True:
            index += 1
            gevent.sleep(max(0.0, start + index * interval - time.monotonic()))
            now = time.monotonic()
            window, _window = _window, Window()
            users = environment.runner.user_count if environment.runner is not None else 0
            out.write(json.dumps(window.summary(index, now - start, now - previous, users)) + "\n")
            out.flush()
            previous = now


def _start(environment: Environment, **_kwargs: Any) -> None:
    global _ticker, _window
    options = environment.parsed_options
    path = getattr(options, "soak_out", "") if options is not None else ""
    if options is None or not path or _ticker is not None:
        return
    _window = Window()  # the first interval starts now
    _ticker = gevent.spawn(_tick, environment, path, float(options.soak_interval))


_hooks: Any = events  # locust's EventHook.add_listener is untyped
_hooks.init_command_line_parser.add_listener(_options)
_hooks.request.add_listener(_on_request)
_hooks.test_start.add_listener(_start)

"""Registry scale: how long `check`, start-up and a reload take for a big registry (bench/big_registry.py).

    .venv/bin/python -m bench.registry [--groups 400] [--features 50] [--repeat 5] [--servers] [--smoke]

Rows, each the median (and the worst) of `--repeat` runs:
- **check**: `feature-gateway check FILE`, a process of its own, from spawn to exit (interpreter start and
  imports included: what a deploy's check step waits for).
- **start-up**: `feature-gateway serve --registry FILE --workers 1` from spawn until GET /readyz answers 200
  (polled every 5 ms); the backends are SQLite files in a fresh temporary folder, so migrations are part of it
  and no server is needed (`--servers`: Redis and PostgreSQL on this machine instead).
- **parse (reload)**: `parse_registry(text)` in this process once the modules are imported: what reading a
  changed registry costs a running process. The first run (cold caches) is shown apart.

`--smoke` (CI): 100 groups, one run of each; it fails only when a command fails, never on a number.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from app.registry.load import parse_registry
from bench.big_registry import FEATURES, GROUPS, write_big_registry
from bench.procs import BenchError, free_port, gateway_command, log, tail


def _env(folder: Path) -> dict[str, str]:
    """The caller's environment less GATEWAY_* and OTEL_* (runs stay comparable); SQLite files in `folder`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OTEL_"))}
    env["BENCH_REGISTRY_DIR"] = str(folder)
    return env


def time_check(registry: Path, folder: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [*gateway_command(), "check", str(registry)], env=_env(folder), capture_output=True, text=True, check=False
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"feature-gateway check failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return elapsed


def time_startup(registry: Path, folder: Path, within: float = 120) -> float:
    """Seconds from spawning `serve` until /readyz answers 200; the server is stopped after."""
    run = Path(tempfile.mkdtemp(prefix="run-", dir=folder))  # fresh SQLite files: migrations happen every time
    port = free_port()
    log_path = run / "gateway.log"
    command = [*gateway_command(), "serve", "--registry", str(registry), "--port", str(port), "--workers", "1"]
    with log_path.open("wb") as out, httpx.Client(timeout=1) as client:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_env(run))
        try:
            while True:
                if proc.poll() is not None:
                    raise BenchError(f"the gateway exited at start; the end of its log:\n{tail(log_path)}")
                try:
                    if client.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                        return time.perf_counter() - started
                except httpx.TransportError:
                    pass
                if time.perf_counter() - started > within:
                    raise BenchError(f"the gateway was not ready in {within:.0f} s; see {log_path}")
                time.sleep(0.005)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def time_parse(text: str, source: str, folder: Path) -> float:
    started = time.perf_counter()
    registry = parse_registry(text, source, env=_env(folder))
    elapsed = time.perf_counter() - started
    if not registry.groups:
        raise BenchError("the registry parsed to no groups")
    return elapsed


def _runs(name: str, repeat: int, measure: Callable[[], float]) -> list[float]:
    times = []
    for i in range(repeat):
        times.append(measure())
        log(f"{name} run {i + 1}/{repeat}: {times[-1]:.3f} s")
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=GROUPS)
    parser.add_argument("--features", type=int, default=FEATURES, help="per group")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--servers", action="store_true", help="Redis and PostgreSQL backends instead of SQLite")
    parser.add_argument("--registry", type=Path, help="time this registry file instead of a generated one")
    parser.add_argument(
        "--smoke", action="store_true", help="100 groups, one run of each (CI: it runs, nothing judged)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.groups, args.repeat = 100, 1
    with tempfile.TemporaryDirectory(prefix="fg-bench-registry-") as scratch:
        folder = Path(scratch)
        registry = args.registry or write_big_registry(
            folder / "registry.yaml", args.groups, args.features, servers=args.servers
        )
        text = registry.read_text(encoding="utf-8")
        lines = text.count("\n")
        described = f"{registry}" if args.registry else f"{args.groups} groups x {args.features} features"
        log(f"registry: {described}, {lines:,} lines")
        try:
            check = _runs("check", args.repeat, lambda: time_check(registry, folder))
            startup = _runs("start-up", args.repeat, lambda: time_startup(registry, folder))
            first = time_parse(text, str(registry), folder)
            parse = _runs("parse", args.repeat, lambda: time_parse(text, str(registry), folder))
        except BenchError as exc:
            print(f"bench.registry: {exc}", file=sys.stderr)
            return 1
    print(f"registry: {described}, {lines:,} lines; median (worst) of {args.repeat} runs, seconds")
    print("| what | median s | worst s |")
    print("|---|--:|--:|")
    for name, times in (("check", check), ("start-up (spawn to /readyz 200)", startup), ("parse (reload)", parse)):
        print(f"| {name} | {statistics.median(times):.3f} | {max(times):.3f} |")
    print(f"| parse, first in the process | {first:.3f} | |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

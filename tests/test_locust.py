"""The locustfile, run headless as a user runs it, against a demo gateway this test starts.

locust monkey-patches the standard library with gevent when imported, so it only ever runs in a subprocess:
this process never imports it.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "GATEWAY_DEMO_DIR": str(tmp_path_factory.mktemp("demo"))}
    server = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, "the gateway exited"
            assert time.monotonic() < deadline, "the gateway did not become ready"
            time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(15)


Stats = dict[str, dict[str, str]]  # locust's --csv stats: name -> column -> value


def run_locust(host: str, tmp_path: Path, seconds: int, **env: str) -> tuple[subprocess.CompletedProcess[str], Stats]:
    command = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "locustfile.py"), "--headless",
        "-u", "4", "-r", "4", "-t", f"{seconds}s", "--host", host,
        "--csv", str(tmp_path / "run"), "--exit-code-on-error", "1", "--only-summary", "--stop-timeout", "5",
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 60, env={**os.environ, **env}, cwd=tmp_path
    )
    with open(tmp_path / "run_stats.csv", newline="") as f:
        stats = {row["Name"]: row for row in csv.DictReader(f)}
    return result, stats


def test_the_mix_runs_against_the_demo_without_a_failure(demo_gateway: str, tmp_path: Path) -> None:
    # A generous deadline: this checks the locustfile and the gateway's answers, not this busy machine's latency.
    result, stats = run_locust(demo_gateway, tmp_path, 4, FG_LOAD_DEADLINE_MS="5000")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = {name: int(stats[name]["Request Count"]) for name in ("fetch 1", "fetch 10", "fetch 100", "write")}
    failures = {name: int(row["Failure Count"]) for name, row in stats.items()}
    assert all(counts.values()), counts
    assert counts["fetch 1"] > counts["fetch 10"] > counts["fetch 100"], counts  # mostly one-entity fetches
    assert set(failures.values()) == {0}, failures
    assert int(stats["Aggregated"]["Request Count"]) == sum(counts.values()) + int(stats["registry"]["Request Count"])


def test_degraded_answers_count_as_failures(demo_gateway: str, tmp_path: Path) -> None:
    # A deadline no backend can meet: every fetch is a 200 with UNAVAILABLE defaults, which the checks refuse.
    result, stats = run_locust(demo_gateway, tmp_path, 2, FG_LOAD_DEADLINE_MS="0.001", FG_LOAD_WRITE_GROUP="none")
    assert result.returncode == 1
    assert int(stats["fetch 1"]["Failure Count"]) == int(stats["fetch 1"]["Request Count"]) > 0
    assert "write" not in stats  # FG_LOAD_WRITE_GROUP=none: a read-only test
    assert "degraded: bulk, hot failed or missed the deadline" in result.stdout + result.stderr

    ok, ok_stats = run_locust(
        demo_gateway, tmp_path, 2, FG_LOAD_DEADLINE_MS="0.001", FG_LOAD_WRITE_GROUP="none", FG_LOAD_DEGRADED_OK="1"
    )
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert int(ok_stats["Aggregated"]["Failure Count"]) == 0


def test_a_setting_that_does_not_fit_the_registry_fails_the_run(demo_gateway: str, tmp_path: Path) -> None:
    result, _ = run_locust(demo_gateway, tmp_path, 2, FG_LOAD_FEATURES="consumer_live:*,store_stats:*")
    assert result.returncode != 0
    assert "FG_LOAD_FEATURES: features of one entity please" in result.stdout + result.stderr

"""bench/soak: a few seconds of the real thing (gateway, locust, /proc, the plot), and its verdict's rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.soak import ProcessSample, Sample, judge, parse_args, report

ROOT = Path(__file__).resolve().parent.parent


def test_a_short_soak_samples_the_gateway_and_draws_the_curves(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "bench.soak", "--minutes", "0.2", "--interval", "3", "--users", "5", "--spawn-rate", "5",
        # Generous: this checks the tool, not the gateway's latency on a busy test machine.
        "--deadline-ms", "5000", "--latency-factor", "1000", "--rss-slack-mb", "1000", "--count-slack", "1000",
        "--json", str(tmp_path / "soak.json"), "--png", str(tmp_path / "soak.png"), "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("FG_LOAD_")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=50, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    document = json.loads((tmp_path / "soak.json").read_text())
    samples = document["samples"]
    assert len(samples) == 4
    assert [round(s["t_s"]) for s in samples] == [3, 6, 9, 12]
    for s in samples:
        assert s["rss_mb"] > 10
        assert s["fds"] > 3
        assert 1 <= s["tcp"] <= 5 + 5  # the users' keep-alive connections (and no backend: SQLite)
        assert s["threads"] >= 1
        assert s["requests"] > 0
        assert s["p50_ms"] > 0
        assert s["p99_ms"] >= s["p50_ms"]
        assert s["real_failures"] == 0, s["examples"]
        assert {"fetch 1", "fetch 10", "fetch 100"} <= set(s["by_name"]) or s is samples[0]
    verdict = document["verdict"]
    assert verdict["ok"] is True
    assert verdict["summary"] == "no unbounded growth"
    assert verdict["phases"] == {"warm_up": 1, "middle": 2, "last": 1}  # by each interval's middle: 1.5, 4.5, ...
    assert [c["name"] for c in verdict["checks"]] == ["RSS", "fds", "tcp conns", "threads", "p50", "p99", "failures"]
    assert (tmp_path / "soak.png").read_bytes().startswith(b"\x89PNG")
    assert "verdict: no unbounded growth" in done.stdout
    assert done.stdout.splitlines()[0].split()[:3] == ["min", "RSS", "MB"]
    for pid in {p["pid"] for s in samples for p in s["processes"]}:  # the soak stopped the gateway
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def sample(t_s: float, rss_mb: float = 100.0, fds: int = 40, p50: float = 2.0, **extra: int) -> Sample:
    failures = {k: v for k, v in extra.items() if k in ("degraded", "overload")}
    failures = {"503" if k == "overload" else k: v for k, v in failures.items()}
    return Sample(
        t_s=t_s, duration_s=60, rss_mb=rss_mb, fds=fds, sockets=20, tcp=extra.get("tcp", 10), threads=5,
        processes=[ProcessSample(1, rss_mb, fds, 20, 10, 5)], users=50, requests=60_000, rps=1000.0,
        ok=60_000 - sum(failures.values()), failures=failures,
        real_failures=sum(v for k, v in failures.items() if k != "503"), overload=failures.get("503", 0),
        examples={}, by_name={}, p50_ms=p50, p90_ms=p50 * 2, p99_ms=p50 * 5, max_ms=p50 * 10, load1=1.0,
    )  # fmt: skip


RULES = parse_args(["--minutes", "30"])  # the defaults
MINUTES = range(1, 31)


def failed(samples: list[Sample]) -> list[str]:
    verdict = judge(samples, 1800, RULES)
    assert verdict.phases == {"warm_up": 10, "middle": 10, "last": 10}
    return [c.name for c in verdict.checks if not c.ok]


def test_a_flat_run_with_a_warm_up_passes() -> None:
    # RSS and fds grow during the warm-up third, then stay; one spike late in the run is not growth.
    samples = [sample(m * 60, rss_mb=60 + 4 * min(m, 10) + (9 if m == 27 else 0), fds=30 + min(m, 10)) for m in MINUTES]
    assert failed(samples) == []


def test_rss_still_rising_at_the_end_fails() -> None:
    leaking = [sample(m * 60, rss_mb=100 + 0.5 * m) for m in MINUTES]  # 30 MB/h
    assert failed(leaking) == ["RSS"]
    slow = [sample(m * 60, rss_mb=100 + 0.1 * m) for m in MINUTES]  # 6 MB/h: under the default limit
    assert failed(slow) == []


def test_a_new_high_of_descriptors_or_connections_fails() -> None:
    assert failed([sample(m * 60, fds=40 + 2 * m) for m in MINUTES]) == ["fds"]
    assert failed([sample(m * 60, tcp=10 + (20 if m > 25 else 0)) for m in MINUTES]) == ["tcp conns"]


def test_latency_growing_fails() -> None:
    assert failed([sample(m * 60, p50=3.0 if m > 20 else 2.0) for m in MINUTES]) == []  # within x1.5 + 2 ms
    assert failed([sample(m * 60, p50=6.0 if m > 20 else 2.0) for m in MINUTES]) == ["p50", "p99"]


def test_503_answers_are_counted_apart_from_failures() -> None:
    shed = [sample(m * 60, overload=3000 if m > 20 else 0) for m in MINUTES]
    assert failed(shed) == []
    degraded = [sample(m * 60, degraded=3000 if m > 20 else 0) for m in MINUTES]
    assert failed(degraded) == ["failures"]
    text = report(degraded, judge(degraded, 1800, RULES))
    assert "failures by kind: degraded 30,000" in text
    assert "verdict: GROWTH: failures" in text

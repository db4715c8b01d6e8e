"""The status page in a real headless Chromium: it loads, shows the demo registry, and charts fetches."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.gateways import demo_gateway

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def demo_server(tmp_path: Path) -> Iterator[str]:
    server = demo_gateway(tmp_path, "--log-level", "warning")
    server.start()
    yield server.url
    server.stop()


def chromium_dom(url: str) -> str:
    assert CHROMIUM, "chromium is not installed (scripts/test installs Debian's chromium package)"
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_status_page_shows_registry_and_charts_fetches(demo_server: str) -> None:
    body = {"entities": {"consumer_id": [101, 104, 106]}, "features": ["consumer_live:*", "consumer_history:*"]}
    for _ in range(10):
        assert httpx.post(f"{demo_server}/v1/features/fetch", json=body, timeout=5).status_code == 200
    dom = chromium_dom(f"{demo_server}/")
    assert 'data-loaded="true"' in dom, "the page never rendered /v1/status"
    for name in ("consumer_live:orders_7d", "consumer_history:favourite_cuisine", "store_stats:open_orders"):
        assert name in dom
    assert re.search(r'<tr data-backend="hot">.*?closed', dom, re.S)
    points = [int(n) for n in re.findall(r'data-points="(\d+)"', dom)]
    assert len(points) == 2  # both backends have a chart...
    assert min(points) >= 1, points  # ...with latency data
    assert "<polyline" in dom
    assert "<circle" in dom
    # 101 fresh, 104 live expired, 106 missing: consumer_live served 2 of 3 rows as defaults.
    assert re.search(r'<tr data-group="consumer_live">.*?66\.7%', dom, re.S)

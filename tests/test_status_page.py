"""The status page in a real headless Chromium: it loads, shows the demo registry, and charts fetches."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
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
    model = {
        "entities": {"consumer_id": [101, 106]},
        "service": "eta_model_v3",
        "context": {"basket_value": [1.0, 2.0]},
    }
    for _ in range(4):
        assert httpx.post(f"{demo_server}/v1/features/fetch", json=model, timeout=5).status_code == 200
    event = {"event_id": "status-page", "consumer_id": 101, "ts": int(time.time() * 1000), "order_value": 12.5}
    assert httpx.post(f"{demo_server}/v1/events/orders", json={"events": [event]}, timeout=5).status_code == 200
    dom = chromium_dom(f"{demo_server}/")
    assert 'data-loaded="true"' in dom, "the page never rendered /v1/status"
    # The demo's stream comes over HTTP: no lag to show, the POST's latency as event to servable
    assert re.search(r'<tr data-stream="orders">.*?HTTP.*?http: .*? ms.*?consumer_orders', dom, re.S)
    for name in ("consumer_live:orders_7d", "consumer_history:favourite_cuisine", "store_stats:open_orders"):
        assert name in dom
    assert re.search(r'<tr data-backend="hot">.*?closed', dom, re.S)
    points = [int(n) for n in re.findall(r'data-points="(\d+)"', dom)]
    assert len(points) == 2  # both backends have a chart...
    assert min(points) >= 1, points  # ...with latency data
    assert "<polyline" in dom
    assert "<circle" in dom
    # 101 fresh, 104 live expired, 106 missing: consumer_live served 2 of 3 rows as defaults.
    # consumer_live: the lists serve 4 features x 3 rows, 1 row PRESENT (101; 104 expired, 106 missing); the
    # service serves 1 of its features (orders_7d; avg_basket is only read, for basket_ratio) x 2 rows, 1 PRESENT
    assert re.search(r'<tr data-group="consumer_live">.*?65\.6%', dom, re.S)  # 84 defaults of 128 values
    # eta_model_v3: 101 fresh (5 values PRESENT), 106 missing (5 defaults): half its values are defaults
    assert re.search(r'<tr data-service="eta_model_v3">.*?>4<.*?50\.0%', dom, re.S)
    assert "basket_ratio:basket_ratio" in dom  # the on-demand feature in the registry card
    # The cost card: what each group holds where (the demo's SQLite files have no price), and the facts
    assert 'data-cost-loaded="true"' in dom, "the page never rendered /v1/cost"
    assert re.search(r'<tr data-cost="consumer_history/bulk">.*?record.*?>4<', dom, re.S)  # 101, 102, 104, 105
    assert re.search(r'<tr data-cost-backend="hot">.*?sqlite', dom, re.S)
    assert re.search(r"<li>store_stats: no feature requested since .*?candidate to drop</li>", dom)


def test_status_page_layout_fits_its_cards(demo_server: str, tmp_path: Path) -> None:
    """At 1400 pixels, no table is wider than its card (they spilled over the borders before issue 12)."""
    assert CHROMIUM
    probe = tmp_path / "probe.html"
    # The page itself, with a script that records every table that overflows its section once it has rendered
    spills = (
        "[...document.querySelectorAll('section')]"
        ".filter(s => [...s.querySelectorAll('table')]"
        ".some(t => t.getBoundingClientRect().right > s.getBoundingClientRect().right + 1))"
        ".map(s => s.querySelector('h2').textContent).join(',') || 'none'"
    )
    page = httpx.get(f"{demo_server}/", timeout=5).text.replace(
        'document.body.dataset.loaded = "true";',
        f'document.body.dataset.loaded = "true"; document.body.dataset.spills = {spills};',
    )
    page = page.replace('fetch("/v1/status"', f'fetch("{demo_server}/v1/status"')
    probe.write_text(page.replace('fetch("/v1/cost"', f'fetch("{demo_server}/v1/cost"'))
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                CHROMIUM,
                *FLAGS,
                f"--user-data-dir={profile}",
                "--window-size=1400,900",
                "--virtual-time-budget=5000",
                "--disable-web-security",
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert 'data-loaded="true"' in result.stdout, result.stderr[-2000:]
    assert 'data-spills="none"' in result.stdout

"""The CLI as a user runs it: check, migrate, and serve (the demo, with no servers)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx

from tests.support.clients import parse_metrics
from tests.support.gateways import GatewayProcess, demo_gateway
from tests.support.registries import GOOD_REGISTRY, PG_DSN
from tests.support.servers import child_pids, free_port
from tests.support.waiting import wait_until

CLI = [sys.executable, "-m", "app"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env=env)


def test_check_accepts_a_good_registry(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(GOOD_REGISTRY)
    result = run("check", str(path))
    assert result.returncode == 0, result.stderr
    assert "ok: 2 backends, 1 entities, 2 groups, 3 features" in result.stdout


def test_check_names_the_bad_field(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(GOOD_REGISTRY.replace("ttl: 1h", "ttl: soon"))
    result = run("check", str(path))
    assert result.returncode == 2
    assert f"{path}: groups.live.ttl: 'soon' is not a duration" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_a_missing_file(tmp_path: Path) -> None:
    result = run("check", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr


def test_migrate_creates_tables_and_reports_a_dead_backend(tmp_path: Path) -> None:
    schema = f"t_cli_{os.getpid()}_{free_port()}"  # its own, like every test's
    path = tmp_path / "registry.yaml"
    path.write_text(
        GOOD_REGISTRY.replace("${REDIS_URL:-redis://127.0.0.1:6379/0}", f"redis://127.0.0.1:{free_port()}/0").replace(
            "dialect: cockroach", f"dialect: auto, schema: {schema}"
        )
    )
    result = run("migrate", "--registry", str(path))
    assert result.returncode == 1
    assert "bulk (cockroach): ready" in result.stdout
    assert "hot (redis): failed" in result.stderr
    asyncio.run(_drop_schema(schema))


async def _drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def test_serve_without_registry_runs_the_demo_and_its_curl_line_works(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "GATEWAY_DEMO_DIR": str(tmp_path / "demo")}
    server = subprocess.Popen(
        [*CLI, "serve", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        assert server.stdout is not None
        curl_line = ""
        while not curl_line:
            line = server.stdout.readline()
            assert line, "serve exited before printing its curl line"
            if line.strip().startswith("curl "):
                curl_line = line.strip()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        args = shlex.split(curl_line)
        url = next(a for a in args if a.startswith("http://"))
        body = args[args.index("-d") + 1]
        assert re.search(rf"127\.0\.0\.1:{port}/v1/features/fetch$", url)
        answer = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=5).json()
    finally:
        server.terminate()
        server.wait(15)
        if server.stdout is not None:
            server.stdout.close()
    statuses = [row["statuses"] for row in answer["rows"]]
    assert statuses[0] == ["PRESENT"] * 4  # 101: fresh everywhere
    assert statuses[1][0] == "EXPIRED"  # 104: live features two hours old under a 1h ttl
    assert statuses[2] == ["MISSING"] * 4  # 106: never written
    assert answer["rows"][0]["values"][:2] == [3, 17]


def metrics_folder(server: GatewayProcess) -> Path:
    """The folder `serve --workers` made for its workers' snapshots (GATEWAY_METRICS_DIR, in their environment)."""
    assert server.proc is not None
    for pid in child_pids(server.proc.pid):
        with contextlib.suppress(OSError):  # a child that ended meanwhile
            for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                if entry.startswith(b"GATEWAY_METRICS_DIR="):
                    return Path(os.fsdecode(entry.split(b"=", 1)[1]))
    raise AssertionError("no worker has GATEWAY_METRICS_DIR in its environment")


def snapshots_written_after(folder: Path, workers: int, moment_ns: int) -> bool:
    """Has each of the `workers` written its snapshot into `folder` after `moment_ns` (time.time_ns())?"""
    try:
        written = [path.stat().st_mtime_ns for path in folder.glob("*.json")]
    except FileNotFoundError:  # replaced meanwhile: look again
        return False
    return len(written) == workers and all(mtime > moment_ns for mtime in written)


def test_two_workers_report_one_set_of_metrics(tmp_path: Path) -> None:
    server = demo_gateway(tmp_path, "--workers", "2", "--log-level", "warning")
    server.start(ready_within=30)
    base = server.url
    body = {"entities": {"consumer_id": [101]}, "features": ["consumer_live:orders_7d"]}
    try:
        for _ in range(20):  # a new connection each time, so both workers serve some
            assert httpx.post(f"{base}/v1/features/fetch", json=body, timeout=5).status_code == 200
        answered = time.time_ns()
        # Each worker writes its snapshot every second, and a scrape merges them: once both have written one
        # since the last answer, a scrape sees all 20 (a worker counts a request in the same step as it sends
        # the answer, so before any later snapshot).
        folder = metrics_folder(server)
        wait_until(lambda: snapshots_written_after(folder, 2, answered), what="both workers' snapshots")
        line = 'feature_gateway_http_requests_total{route="/v1/features/fetch",method="POST",status="200"} 20'
        assert line in httpx.get(f"{base}/metrics", timeout=5).text
        server.signal(signal.SIGTERM)  # a clean stop: `serve` removes the snapshot folder it made
        server.wait(30)
        assert not folder.exists()
    finally:
        server.stop()


def test_a_client_hanging_up_mid_body_is_not_logged_as_an_error(tmp_path: Path) -> None:
    import socket

    server = demo_gateway(tmp_path)
    server.start()
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(
                    b"POST /v1/features/fetch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b'Content-Length: 1000\r\n\r\n{"entities":'
                )
                time.sleep(0.05)

        def handled() -> bool:
            """Has the gateway finished with the three requests (it counts one when it is done with it, in the
            same step as any error it would log about it)?"""
            samples = parse_metrics(httpx.get(f"{server.url}/metrics", timeout=5).text)
            fetches = [
                count
                for (name, labels), count in samples.items()
                if name == "feature_gateway_http_requests_total" and ("route", "/v1/features/fetch") in labels
            ]
            return sum(fetches) == 3

        wait_until(handled, what="the gateway done with the three hung-up requests")
        assert httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200
    finally:
        server.stop()
    text = server.log()
    assert "unhandled error" not in text
    assert "Traceback" not in text


def test_serve_honours_gateway_registry(tmp_path: Path) -> None:
    env = {**os.environ, "GATEWAY_REGISTRY": str(tmp_path / "nope.yaml")}
    result = subprocess.run(
        [*CLI, "serve", "--port", str(free_port())], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr
    assert "cannot read" in result.stderr

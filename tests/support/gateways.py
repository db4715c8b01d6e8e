"""The gateway under test: in this process (an app and an httpx client to it, what most tests use), or as a
real server process, `python -m app serve`, as a user runs it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any

import httpx

from app.main import create_app
from app.registry.load import parse_registry
from app.settings import Settings
from tests.support.servers import child_pids, free_port

GatewayFactory = Callable[..., Any]
"""The `gateway` fixture's type: `async with gateway(registry_yaml, **settings) as client:`."""


@contextlib.asynccontextmanager
async def in_process_gateway(
    registry_yaml: str, *, exporter: Any = None, **settings: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """A running app (lifespan and all) and an httpx client to it; `client.app` is the app."""
    registry = parse_registry(registry_yaml, "test-registry", env={})
    # Tests about deadlines set them; the rest must not turn UNAVAILABLE because a loaded CI box was slow.
    settings.setdefault("default_deadline_ms", 2000)
    # Tests about overload turn admission on; for the rest a refused request would be noise.
    settings.setdefault("admission", False)
    settings.setdefault("freeze_heap", False)  # the test process starts hundreds of apps; none lives long
    app = create_app(Settings(**settings), registry=registry, span_exporter=exporter)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@contextlib.asynccontextmanager
async def file_gateway(registry: Path, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """As `in_process_gateway`, but the app loads `registry` (a file) itself, as `serve` does: what a reload
    (SIGHUP, POST /v1/admin/reload) rereads."""
    settings.setdefault("default_deadline_ms", 2000)
    settings.setdefault("admission", False)
    settings.setdefault("freeze_heap", False)
    app = create_app(Settings(registry=registry, **settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


def worker_pids(supervisor: int) -> list[int]:
    """The worker processes of a `serve --workers N` supervisor (not multiprocessing's resource tracker)."""
    workers = []
    for pid in child_pids(supervisor):
        with contextlib.suppress(OSError):  # it ended meanwhile
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers.append(pid)
    return sorted(workers)


class GatewayProcess:
    """`python -m app serve [--registry FILE] --port PORT`, its output kept in a file (a pipe could fill up).

    Without a registry it serves the demo (set GATEWAY_DEMO_DIR in `env` to keep its SQLite files apart)."""

    def __init__(self, registry: Path | None, log: Path, *args: str, env: dict[str, str] | None = None):
        self.registry = registry
        self.log_path = log
        self.port = free_port()
        self.args = args
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_within: float = 20.0) -> None:
        self._log = self.log_path.open("wb")
        command = [sys.executable, "-m", "app", "serve", "--port", str(self.port)]
        if self.registry is not None:
            command += ["--registry", str(self.registry)]
        self.proc = subprocess.Popen(
            [*command, *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env or dict(os.environ),
            start_new_session=True,  # its own process group, which `stop()` kills whole (workers and all)
        )
        deadline = time.monotonic() + ready_within
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the gateway exited at start:\n{self.log()}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"the gateway was not ready within {ready_within} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None:
            # The group, not just the process: with --workers, killing only the supervisor left its workers
            # running, still listening on the port.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


def demo_gateway(tmp_path: Path, *args: str) -> GatewayProcess:
    """The demo gateway (embedded SQLite in `tmp_path`), not yet started."""
    env = {**os.environ, "GATEWAY_DEMO_DIR": str(tmp_path / "demo")}
    env.pop("GATEWAY_METRICS_DIR", None)
    return GatewayProcess(None, tmp_path / "gateway.log", *args, env=env)

"""The processes the bench owns: its own redis-server, the gateway under test, and wrk (installed if missing).

Each is started by the bench and stopped by it, by its own process id (the gateway's workers by its
process group, which the bench created for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import httpx
import redis.asyncio as aioredis


class BenchError(RuntimeError):
    """The bench cannot produce a trustworthy number; the message says why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries only the table."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def ensure_wrk() -> str:
    """The wrk binary; installed with apt-get (Debian package `wrk`) when missing and we are root."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BenchError("wrk is not installed: install the Debian/Ubuntu package `wrk` (apt-get install wrk)")
    log("wrk is missing: installing it with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    found = shutil.which("wrk")
    if not found:
        raise BenchError("apt-get installed wrk but it is not on PATH")
    return found


def _stop(proc: subprocess.Popen[bytes], sig: int, grace: float, group: bool) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        proc.wait(10)


class RedisServer:
    """A redis-server of the bench's own on a free port, nothing on disk, so `used_memory` deltas are clean."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def spawn(self) -> None:
        binary = shutil.which("redis-server")
        if not binary:
            raise BenchError("redis-server is not installed (Debian package redis-server)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def wait_ready(self) -> None:
        assert self.proc is not None, "spawn() first"
        client = aioredis.Redis.from_url(self.url)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    await client.ping()
                    return
                except (OSError, aioredis.ConnectionError):
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise BenchError(f"redis-server did not start on port {self.port}") from None
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, signal.SIGTERM, 10, group=False)
            self.proc = None


class OtlpSink:
    """bench/otlp_sink.py as a subprocess on a free port: takes OTLP/HTTP exports at once and counts them."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.otlp_sink", str(self.port)],
                cwd=Path(__file__).resolve().parent.parent,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )

    async def stats(self) -> dict[str, int]:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
            answer = await client.get("/stats")
            answer.raise_for_status()
            stats: dict[str, int] = answer.json()
        if stats["undecodable"]:
            raise BenchError(f"the OTLP sink could not decode {stats['undecodable']} exports")
        return stats

    async def wait_ready(self) -> None:
        assert self.proc is not None, "spawn() first"
        deadline = time.monotonic() + 20
        while True:
            try:
                await self.stats()
                return
            except httpx.TransportError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"the OTLP sink did not start (log: {self.log_path})") from None
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, signal.SIGTERM, 10, group=False)
            self.proc = None


def group_processes(pgid: int) -> Iterator[tuple[int, list[str]]]:
    """(pid, stat fields from field 3 on) of every live process in a process group."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces
        if int(fields[2]) == pgid:  # field 5: process group
            yield int(entry.name), fields


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU time of every live process in a process group (the gateway and its workers)."""
    # fields 14 and 15 (here 11 and 12): utime, stime in clock ticks
    ticks = sum(int(fields[11]) + int(fields[12]) for _, fields in group_processes(pgid))
    return ticks / os.sysconf("SC_CLK_TCK")


def gateway_command() -> list[str]:
    script = Path(sys.executable).with_name("feature-gateway")
    return [str(script)] if script.exists() else [sys.executable, "-m", "app"]


class GatewayProcess:
    """`feature-gateway serve --registry ... --port ... --workers N` as a subprocess in its own process group.

    With `registry=None` it serves the demo registry on embedded SQLite, as `scripts/serve` does (set
    GATEWAY_DEMO_DIR in `env` to keep its files apart).
    """

    def __init__(self, registry: Path | None, workers: int, env: Mapping[str, str], log_path: Path):
        self.registry = registry
        self.workers = workers
        self.env = dict(env)
        self.log_path = log_path
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_start = 0  # this run's part of a log file that --log-dir may have kept from earlier runs

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def started_workers(self) -> int:
        """How many worker processes finished start-up (uvicorn logs it once per worker)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_start)
                return f.read().count(b"Application startup complete")
        except OSError:
            return 0

    def cpu_seconds(self) -> float:
        """CPU time used so far by the gateway's processes (it leads its own process group)."""
        return group_cpu_seconds(self.proc.pid) if self.proc is not None else 0.0

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError(f"the gateway exited; the end of {self.log_path}:\n{tail(self.log_path)}")
        if self.started_workers() > self.workers:
            raise BenchError(f"a gateway worker died and was restarted; see {self.log_path}:\n{tail(self.log_path)}")

    def spawn(self) -> None:
        command: Sequence[str] = [
            *gateway_command(),
            "serve",
            *(("--registry", str(self.registry)) if self.registry is not None else ()),
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--log-level",
            "info",
        ]
        self._log = self.log_path.open("ab")
        self._log_start = self._log.tell()
        self.proc = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    async def wait_ready(self, within: float = 60) -> None:
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as client:
            while True:
                self.check_alive()
                ready = False
                with contextlib.suppress(httpx.TransportError):
                    ready = (await client.get("/readyz")).status_code == 200
                # Every worker must be up, or the first seconds of a multi-worker run measure only some.
                if ready and self.started_workers() >= self.workers:
                    return
                if time.monotonic() > deadline:
                    raise BenchError(f"the gateway was not ready in {within:.0f} s; see {self.log_path}")
                await asyncio.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, signal.SIGTERM, 20, group=True)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

"""Real server processes a test owns: the gateway as `python -m app serve`, and a PostgreSQL of its own
(initdb into a temporary folder, on a free port) that can be frozen with SIGSTOP and thawed with SIGCONT."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import httpx

from tests.support import free_port


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


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
            [*command, *self.args], stdout=self._log, stderr=subprocess.STDOUT, env=self.env or dict(os.environ)
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
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError("no PostgreSQL server binaries (postgres, initdb) under /usr/lib/postgresql/*/bin or on PATH")


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (PostgreSQL backends each lead their own process group, so
    signalling the postmaster's group does not reach them)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # it ended meanwhile
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _state(pid: int) -> str | None:
    """The process state letter from /proc (R, S, T, Z, ...); None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _wait_for(pids: list[int], ok: Callable[[str | None], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not all(ok(_state(pid)) for pid in pids):
        assert time.monotonic() < deadline, {pid: _state(pid) for pid in pids}
        time.sleep(0.005)


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.kill(pid, signum)


class PostgresProcess:
    """A PostgreSQL server of the test's own: trust auth, user root, database `test`, fsync off.

    PostgreSQL refuses to run as root; as root it runs as the `postgres` system user. `freeze()` stops the
    postmaster and every backend, like a hung machine; `crash()` kills them all.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.bin = _postgres_bin()
        self.user = "postgres" if os.geteuid() == 0 else None
        self.dir = Path(tempfile.mkdtemp(prefix="fg-pg-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://root@127.0.0.1:{self.port}/test"

    def _run(self, *command: str) -> None:
        result = subprocess.run(command, capture_output=True, timeout=60, user=self.user)
        if result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {result.stdout.decode()}{result.stderr.decode()}")

    def start(self) -> None:
        if self.user is not None:
            owner = pwd.getpwnam(self.user)
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        data = self.dir / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-U", "root", "--auth=trust", "-E", "UTF8", "--no-sync")
        self._log = (self.dir / "server.log").open("wb")
        self._launch()
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "root", "test")

    def _launch(self) -> None:
        data = self.dir / "data"
        self.proc = subprocess.Popen(
            [
                str(self.bin / "postgres"),
                "-D",
                str(data),
                "-p",
                str(self.port),
                "-k",
                str(self.dir),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "synchronous_commit=off",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            user=self.user,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while not listening(self.port):
            assert self.proc.poll() is None, (self.dir / "server.log").read_text()
            assert time.monotonic() < deadline, "PostgreSQL did not start"
            time.sleep(0.05)

    def crash(self) -> None:
        """SIGKILL the postmaster and every backend, as a machine or container dying would."""
        assert self.proc is not None
        children = _children(self.proc.pid)
        os.kill(self.proc.pid, signal.SIGKILL)
        _signal_all(children, signal.SIGKILL)
        self.proc.wait(10)
        _wait_for(children, lambda state: state in (None, "Z"))  # gone, or a zombie: its sockets are closed

    def restart(self) -> None:
        """Start again on the same port and data (after `crash()`: crash recovery, then it accepts)."""
        self._launch()

    def freeze(self) -> None:
        """SIGSTOP the postmaster (no new sessions) and then every backend (open sessions hang too)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        children = _children(self.proc.pid)
        _signal_all(children, signal.SIGSTOP)
        # A signal is delivered asynchronously: until each process shows state T it may still answer.
        _wait_for([self.proc.pid, *children], lambda state: state in (None, "T", "Z"))

    def thaw(self) -> None:
        assert self.proc is not None
        _signal_all(_children(self.proc.pid), signal.SIGCONT)
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.thaw()
                self.proc.send_signal(signal.SIGINT)  # fast shutdown: it removes its shared memory
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.crash()
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.dir, ignore_errors=True)


def demo_gateway(tmp_path: Path, *args: str) -> GatewayProcess:
    """The demo gateway (embedded SQLite in `tmp_path`), not yet started."""
    env = {**os.environ, "GATEWAY_DEMO_DIR": str(tmp_path / "demo")}
    env.pop("GATEWAY_METRICS_DIR", None)
    return GatewayProcess(None, tmp_path / "gateway.log", *args, env=env)

"""Real-service helpers for the tests: free ports, a TCP proxy we can switch on, a redis-server process."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from redis import Redis as SyncRedis
from redis.exceptions import RedisError


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_random = random.Random()


def free_port() -> int:
    """A port nothing listens on (bound then released: connecting to it is refused).

    Chosen below the kernel's ephemeral range: a port from that range can meanwhile become the local end of
    some outgoing connection, or even connect to itself (TCP simultaneous open) when a test keeps dialling a
    port that is down, so a server the test starts there later would be taken or impersonated."""
    ceiling = min(_ephemeral_floor(), 65535) - 1
    for _ in range(500):
        port = _random.randint(10000, ceiling)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


class TcpProxy:
    """Forwards 127.0.0.1:port to a real server; not listening until `start()` (a backend that is down)."""

    def __init__(self, target_port: int, port: int | None = None):
        self.target_port = target_port
        self.port = port or free_port()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        for task in (asyncio.create_task(pipe(reader, up_writer)), asyncio.create_task(pipe(up_reader, writer))):
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._pipes):
            task.cancel()
        await asyncio.sleep(0)


class RedisProcess:
    """A redis-server of the test's own on a free port, keeping nothing on disk."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


async def eventually(check: object, within: float = 5.0, interval: float = 0.05) -> None:
    """Await `check()` until it returns truthy or `within` seconds pass (then assert on its last answer)."""
    deadline = time.monotonic() + within
    while True:
        result = await check()  # type: ignore[operator]
        if result or time.monotonic() > deadline:
            assert result, "condition not met in time"
            return
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def running(proxy: TcpProxy) -> AsyncIterator[TcpProxy]:
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000, the default of every Redis version) is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 < min(_ephemeral_floor(), 65536):  # the bus port too stays out of the ephemeral range
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterProcesses:
    """A Redis Cluster of `size` masters (no replicas), each a redis-server of the test's own on free ports.

    Every node keeps its cluster state (`nodes.conf`) in its own folder under `workdir` and nothing else on
    disk, so a node restarted on its port comes back with its id and slots but no keys.
    """

    def __init__(self, workdir: Path, size: int = 3):
        self.workdir = workdir
        self.ports = [free_cluster_port() for _ in range(size)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """A seed URL naming every node (the gateway's multi-host form)."""
        return "redis://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start_node(self, port: int) -> None:
        folder = self.workdir / str(port)
        folder.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        plain = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "", "--appendonly", "no"]
        cluster = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"]
        self.procs[port] = subprocess.Popen(
            [binary, *plain, *cluster],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.procs[port].poll() is not None:
                raise RuntimeError(f"redis-server on {port} exited")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on {port} did not start")

    def start(self) -> None:
        try:
            for port in self.ports:
                self.start_node(port)
            cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
            nodes = [f"127.0.0.1:{port}" for port in self.ports]
            subprocess.run(
                [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    def command(self, port: int, *args: str | int) -> Any:
        """One command to one node, on a connection of its own."""
        client = SyncRedis(host="127.0.0.1", port=port, socket_timeout=5, decode_responses=True)
        try:
            return client.execute_command(*args)  # type: ignore[no-untyped-call]
        finally:
            client.close()

    def info(self, port: int, *command: str) -> str:
        return str(self.command(port, *command))

    def wait_ok(self, within: float = 30.0) -> None:
        """Until every node says `cluster_state:ok` and knows every other node."""
        deadline = time.monotonic() + within
        while True:
            states = []
            for port in self.ports:
                with contextlib.suppress(OSError, RedisError):
                    states.append(self.info(port, "CLUSTER", "INFO"))
            ok = len(states) == len(self.ports) and all(
                "cluster_state:ok" in s and f"cluster_known_nodes:{len(self.ports)}" in s for s in states
            )
            if ok:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster did not come up: {states}")
            time.sleep(0.1)

    def stop_node(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(10)

    def owner(self, slot: int) -> int:
        """The port of the master serving `slot`, as the first node sees it."""
        for start, end, master, *_ in self.command(self.ports[0], "CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        raise LookupError(f"slot {slot} is not served")

    def move_slot(self, slot: int, source: int, target: int) -> None:
        """Reshard one slot with its keys from the master on `source` to the one on `target`, as
        `redis-cli --cluster reshard` does: IMPORTING/MIGRATING, MIGRATE the keys, then SETSLOT NODE everywhere."""
        ids = {port: self.info(port, "CLUSTER", "MYID") for port in self.ports}
        self.info(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", ids[source])
        self.info(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", ids[target])
        while keys := self.command(source, "CLUSTER", "GETKEYSINSLOT", slot, 100):
            self.command(source, "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        for port in (target, source, *self.ports):
            self.info(port, "CLUSTER", "SETSLOT", str(slot), "NODE", ids[target])
        deadline = time.monotonic() + 10
        while self.owner(slot) != target:
            if time.monotonic() > deadline:
                raise RuntimeError(f"slot {slot} did not move")
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()
        for proc in self.procs.values():
            proc.wait(10)
        self.procs.clear()


JSON = {"content-type": "application/json"}  # for requests that send raw bytes (httpx's json= sets it itself)

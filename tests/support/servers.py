"""Real servers a test owns or reaches: free ports, a TCP proxy it can switch on and off, a redis-server, a
Redis Cluster, and a PostgreSQL of its own (initdb into a temporary folder, on a free port) that can be frozen
with SIGSTOP and thawed with SIGCONT."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any, NamedTuple

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

    def freeze(self) -> None:
        """SIGSTOP the server, like a hung machine: connections stay open and queue up, nothing is answered."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        # A signal is delivered asynchronously: until the process shows state T it may still answer.
        _wait_for([self.proc.pid], lambda state: state in (None, "T", "Z"))

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def calls(self, command: str) -> int:
        """How many `command`s the server has run (INFO commandstats), asked on a connection of its own."""
        client = SyncRedis(port=self.port, socket_timeout=5, decode_responses=True)
        try:
            stats = client.info("commandstats").get(f"cmdstat_{command.lower()}", {})
        finally:
            client.close()
        return int(stats.get("calls", 0))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


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
    """A Redis Cluster of `size` masters with `replicas` replicas each, every node a redis-server of the test's
    own on free ports.

    Every node keeps its cluster state (`nodes.conf`) in its own folder under `workdir` and nothing else on
    disk, so a node restarted on its port comes back with its id and slots but no keys. `node_timeout_ms` is
    `cluster-node-timeout`: how long a node may be unreachable before the others mark it failed (and, with
    replicas, promote one of its replicas). With `full_coverage` False (`cluster-require-full-coverage no`) the
    masters left keep serving their own slots while a master is down; with it True (Redis' default) every
    node answers CLUSTERDOWN once a master is marked failed, until a replica takes its place.
    """

    def __init__(
        self,
        workdir: Path,
        size: int = 3,
        *,
        replicas: int = 0,
        node_timeout_ms: int = 5000,
        full_coverage: bool = True,
    ):
        self.workdir = workdir
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.full_coverage = full_coverage
        self.ports: list[int] = []
        while len(self.ports) < size * (1 + replicas):
            # Each free when picked, but not yet bound: a later pick may repeat one, or land on another node's
            # bus port (port + 10000), and the cluster then comes up a node short.
            port = free_cluster_port()
            taken = {*self.ports, *(p + 10000 for p in self.ports)}
            if port not in taken and port + 10000 not in taken:
                self.ports.append(port)
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
        cluster = [
            *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
            *("--cluster-node-timeout", str(self.node_timeout_ms)),
            *("--cluster-require-full-coverage", "yes" if self.full_coverage else "no"),
            # A replica's first sync starts at once (Redis 7 waits 5 s for more replicas to share it).
            *("--repl-diskless-sync-delay", "0"),
        ]
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
                [cli, "--cluster", "create", *nodes, "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self.wait_ok()
            self.wait_replicated()
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
        """SIGKILL the node, as a machine or container dying would: it closes no connection cleanly and tells no
        other node; its sockets are gone once it is reaped (connections to its port are then refused)."""
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(10)

    def nodes(self, port: int) -> list[ClusterNodeLine]:
        """The cluster as the node on `port` sees it (CLUSTER NODES), one line per node."""
        return ClusterNodeLine.parse(self.info(port, "CLUSTER", "NODES"))

    def masters(self, port: int | None = None) -> dict[int, list[int]]:
        """Per master that is not marked failed, the ports of its replicas, as the node on `port` (default: the
        first node that answers) sees it."""
        lines = self.nodes(port) if port is not None else self._first_answer(self.nodes)
        ids = {line.node_id: line.port for line in lines}
        found: dict[int, list[int]] = {}
        for line in lines:
            if "master" in line.flags and "fail" not in line.flags:
                found.setdefault(line.port, [])
        for line in lines:
            if "slave" in line.flags and ids.get(line.master_id) in found:
                found[ids[line.master_id]].append(line.port)
        return found

    def keys_on(self, port: int, pattern: str) -> list[str]:
        """The keys matching `pattern` that the node on `port` holds."""
        client = SyncRedis(host="127.0.0.1", port=port, socket_timeout=5, decode_responses=True)
        try:
            return list(client.scan_iter(match=pattern, count=1000))
        finally:
            client.close()

    def is_master(self, port: int) -> bool:
        """Does the node on `port` say it is a master (its own line of CLUSTER NODES: `myself,master`)?"""
        return ClusterNodeLine.says_master(self.info(port, "CLUSTER", "NODES"))

    def _first_answer(self, ask: Callable[[int], Any]) -> Any:
        for port in self.ports:
            if port in self.procs:
                with contextlib.suppress(OSError, RedisError):
                    return ask(port)
        raise RuntimeError("no node of the cluster answers")

    def wait_replicated(self, within: float = 30.0) -> None:
        """Until every replica is linked to its master and has everything the master was sent (its replication
        offset has reached the master's): a replica promoted after this has every key written before it."""
        deadline = time.monotonic() + within
        while True:
            masters = self.masters()
            behind: list[int | str] = [] if len(masters) * (1 + self.replicas) == len(self.ports) else ["masters"]
            for master, replicas in masters.items():
                if len(replicas) < self.replicas:
                    behind.append(master)
                offset = int(self.command(master, "INFO", "REPLICATION")["master_repl_offset"])
                for replica in replicas:
                    info = self.command(replica, "INFO", "REPLICATION")
                    if info.get("master_link_status") != "up" or int(info.get("slave_repl_offset", -1)) < offset:
                        behind.append(replica)
            if not behind:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas {behind} did not catch up with their masters")
            time.sleep(0.05)

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


class ClusterNodeLine(NamedTuple):
    """One line of CLUSTER NODES: a node's id, port, flags (`myself`, `master`, `slave`, `fail?`, `fail`) and
    the id of its master (`-` for a master)."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str

    @classmethod
    def parse(cls, text: str) -> list[ClusterNodeLine]:
        lines = []
        for line in text.splitlines():
            node_id, address, flags, master_id, *_ = line.split()
            port = int(address.split("@")[0].rsplit(":", 1)[1])
            lines.append(cls(node_id, port, frozenset(flags.split(",")), master_id))
        return lines

    @classmethod
    def says_master(cls, text: str) -> bool:
        """Does this CLUSTER NODES answer come from a master (its own line says `myself,master`)?"""
        return any("myself" in line.flags and "master" in line.flags for line in cls.parse(text))


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


def unread_bytes(port: int) -> list[int]:
    """Per connection a server on 127.0.0.1:`port` has accepted or could accept, the bytes it was sent and has not
    read yet (the kernel's receive queue, from /proc/net/tcp): all zeros once it has read every request."""
    local = f"0100007F:{port:04X}"
    queues = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "01":  # ESTABLISHED, whether accepted yet or not
            queues.append(int(fields[4].split(":")[1], 16))
    return queues


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError("no PostgreSQL server binaries (postgres, initdb) under /usr/lib/postgresql/*/bin or on PATH")


def child_pids(pid: int) -> list[int]:
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
        children = child_pids(self.proc.pid)
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
        children = child_pids(self.proc.pid)
        _signal_all(children, signal.SIGSTOP)
        # A signal is delivered asynchronously: until each process shows state T it may still answer.
        _wait_for([self.proc.pid, *children], lambda state: state in (None, "T", "Z"))

    def thaw(self) -> None:
        assert self.proc is not None
        _signal_all(child_pids(self.proc.pid), signal.SIGCONT)
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

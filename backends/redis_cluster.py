"""Redis Cluster: the blobs of `backends/redis.py`, keyed so one group's batch touches a few slots, not one per key.

Key: `{key_prefix}{{group}:{label}}:{entity key}`, e.g. `fg:{live:0060}:101`: the entity's bucket is
crc32(entity key) mod `BUCKETS` and `label` is that bucket's 4-digit name (`bucket_labels`). Redis hashes
only the `{live:0060}` tag, so every key of one (group, bucket) shares a slot, each group spreads over
`BUCKETS` slots (hence over the masters), and a batch of any size touches at most `BUCKETS` slots per group.

A read is one pipeline: one MGET per (group, bucket) present in the batch, sent to the master owning that
slot; the per-node pipelines go out concurrently, so a read costs one round trip per master, not per key
or per slot. A write runs the compare-event-time script of `backends.redis_common.py` once per bucket, in one
pipeline the same way.

A master that fails costs only its own keys. Each master's commands go out as a pipeline of their own, so a
read whose batch touches a dead master answers every other master's keys and raises `PartialRead` naming the
dead master's (served UNAVAILABLE); nothing waits for a retry or closes the other masters' connections. A
connection that breaks is retried once on a new one (a restarted node, a connection dropped on the way); a
node that still fails is suspect, and while any node is, the backend asks a live node for the slot map every
`FOLLOW_S` and takes redis-py's full refresh when its masters changed: a replica promoted in a failover
serves its slots about `FOLLOW_S` after the cluster promoted it, with no gateway restart. A write that meets
a node that does not answer refreshes the slot map at once and sends that node's buckets again if their slot
has a new master. A dead process's port refuses at once; a node that hangs, or a host gone without a reset,
is waited for up to `timeout_ms` / `connect_timeout_ms`, and a request deadline shorter than that cuts the
whole read off (every key UNAVAILABLE), as on any backend.

Atomicity is per slot, not per batch: a script sees only keys of its own slot, and Redis Cluster has no
transaction across slots. Each bucket's rows are compared and written by one script that nothing interleaves
with, and never replace newer data; but a batch that fails half way (a master dies) may leave some buckets
written. The write then fails and may be sent again as is: a row already stored (same event time) is just
written again.

Why 16 buckets (`bench/redis_cluster_buckets.py`: 3 local masters, 100-key batch reads of one group; one
reader for latency, 16 at once for throughput, which shows the gateway's CPU per read):

    buckets             1      4      8     16     32     64    128   single node (backends/redis.py)
    p50 ms           0.35   0.42   0.43   0.60   0.74   1.00   1.13   0.16
    reads/s          4924   2921   2035   1681   1202    921    678   17467
    fullest master   100%    50%    38%    38%    34%    34%    34%   (even: 33%)

Every bucket costs an MGET, and redis-py spends ~15 us of gateway CPU on each (measured with its cluster
pipeline; the per-master pipelines that replaced it measure the same. The single-node backend reads through
its own pipelined connection, backends/resp.py, which has no cluster routing; a cluster-aware version of it
would close much of the gap). Past 16, a group's spread gains little (with the labels of `bucket_labels`,
16 buckets keep every group within 1.12x of an even share on 3 or 6 masters and 1.5x on 12; plain bucket
numbers: up to 1.9x and 3.75x) while reads/s keep falling. A group uses at most 16 masters; different groups
land on different ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.cluster import PRIMARY, get_node_name
from redis.crc import key_slot
from redis.exceptions import AskError, MaxConnectionsError, NoScriptError, RedisError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.registry.model import BackendSpec, Group
from backends import redis_footprint
from backends.base import Footprint, PartialRead, WriteResult, WriteRow
from backends.options import url_hosts
from backends.redis_common import WRITE_IF_NEWER, script_args, server_answered
from backends.redis_footprint import SCAN_COUNT

log = logging.getLogger(__name__)

# Changing this moves every key (existing data reads as MISSING until rewritten): it is part of the layout.
BUCKETS = 16

# While a node fails to answer, how often the slot map is checked (one CLUSTER SLOTS to a live node): how long
# after a replica's promotion its slots may still go to the dead master.
FOLLOW_S = 0.2

# A node that does not answer: it may be dead, and its replica promoted. (MaxConnectionsError, a ConnectionError
# too, is this process's pool running out, not the node failing; `_turn` keeps it from happening.)
UNREACHABLE = (RedisConnectionError, RedisTimeoutError)
# Answers that name another node for the slot (MOVED is an AskError); redis-py's own routing follows them.
REDIRECTS = (AskError, TryAgainError)


def bucket_of(entity_key: str, buckets: int = BUCKETS) -> int:
    """A stable bucket for an entity key (crc32: the same in every process and version, unlike hash())."""
    return zlib.crc32(entity_key.encode()) % buckets


@functools.cache
def bucket_labels(buckets: int = BUCKETS) -> tuple[str, ...]:
    """The tag label of each bucket: 4 digits chosen so that one group's buckets fall evenly over the slots.

    Redis' slot is CRC16 (XMODEM) of the tag, which is linear: for tags `group:label` whose labels have the
    same length, slot(group, label) = c(group) XOR crc16(label) (mod 16384). With plain bucket numbers
    (`0`..`31`) the crc16s repeat their top bits, so every group piles onto the masters in the same
    lopsided way (`bench/redis_cluster_buckets.py`: up to 1.9x the even share on 3 masters with 16
    buckets). Labels whose crc16 has distinct top log2(buckets) bits put exactly one bucket of every group
    in each 1/buckets of the slot range, whatever the group's name: on masters owning equal contiguous
    ranges (as `redis-cli --cluster create` assigns them) no master holds more than its share plus one
    bucket.
    """
    if buckets < 1 or buckets & (buckets - 1) or buckets > 1024:
        raise ValueError("buckets must be a power of two up to 1024")
    shift = 14 - (buckets.bit_length() - 1)
    found: dict[int, str] = {}
    for i in range(10_000):
        label = f"{i:04d}"
        found.setdefault(key_slot(label.encode()) >> shift, label)
        if len(found) == buckets:
            return tuple(found[top] for top in range(buckets))
    raise AssertionError("no label set found")  # not reached for powers of two up to 1024


def cluster_client(spec: BackendSpec) -> RedisCluster:
    """A cluster client seeded with every host of the URL, with the gateway's timeouts and retry policy."""
    options = spec.options
    url = options["url"]
    parts = urlsplit(url)
    hosts = url_hosts(url)
    # redis-py parses one host per URL: take credentials, TLS and query options from the first host's form.
    userinfo = parts.netloc.rpartition("@")[0]
    first = parts.netloc.rpartition("@")[2].split(",")[0]
    from_url: dict[str, Any] = dict(parse_url(urlunsplit(parts._replace(netloc=f"{userinfo}@{first}".lstrip("@")))))
    for key in ("host", "port", "db"):
        from_url.pop(key, None)
    if from_url.pop("connection_class", None) is not None:  # rediss://: SSLConnection
        from_url["ssl"] = True
    options_kwargs: dict[str, Any] = {
        # Per node. Operations are limited to pool_size at a time (RedisClusterBackend._turn), each holding at
        # most one connection per node; the margin covers a topology refresh running beside them. The
        # cluster client does not wait for a free connection: it raises MaxConnectionsError, a
        # ConnectionError that its pipeline treats as a dead cluster (closing every connection).
        "max_connections": options["pool_size"] + 2,
        "socket_timeout": options["timeout_ms"] / 1000,
        "socket_connect_timeout": options["connect_timeout_ms"] / 1000,
        # Reads and writes send their pipelines to the nodes themselves (RedisClusterBackend._execute) and
        # handle failures per node; the client's retry serves only what redis-py routes itself (a redirected
        # command). It uses only the retry's count (no backoff) and its own list of retryable errors
        # (ConnectionError, TimeoutError, ClusterDownError, SlotNotCoveredError): one retry, after it has
        # refreshed the slot map; redis-py's default (3 retries) would multiply every timeout.
        # `cluster_error_retry_attempts` is deprecated and ignored when `retry` is given, so it is not set.
        # The per-node connections never retry (redis-py sets 0).
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        "client_name": f"feature-gateway:{spec.name}",
    }
    # As redis-py's from_url: what the URL's query says wins (`?socket_timeout=0.5`).
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port or 6379) for host, port in hosts], **{**options_kwargs, **from_url}
    )


class RedisClusterBackend:
    type = "redis"
    in_process = False

    def __init__(self, spec: BackendSpec, groups: Sequence[Group]):
        options = spec.options
        self.name = spec.name
        self.prefix: str = options["key_prefix"]
        self.buckets = BUCKETS
        self.client = cluster_client(spec)
        # Bounds concurrent operations so that the per-node connections never run out (see max_connections);
        # an operation waits for its turn at most connect_timeout_ms, as the single-node pool does.
        self._turns = asyncio.Semaphore(options["pool_size"])
        self._wait_s = options["connect_timeout_ms"] / 1000
        self._script = WRITE_IF_NEWER
        self._sha = hashlib.sha1(self._script.encode(), usedforsecurity=False).hexdigest()  # what EVALSHA names
        self._tags: dict[str, tuple[str, ...]] = {}
        # Nodes that failed to answer, by name; while there are any, `_follow` checks the slot map.
        self._suspects: dict[str, ClusterNode] = {}
        self._follower: asyncio.Task[None] | None = None

    def tags(self, group: Group) -> tuple[str, ...]:
        """Per bucket, the start of its keys: `fg:{live:0063}:` (bucket 0)."""
        tags = self._tags.get(group.name)
        if tags is None or len(tags) != self.buckets:
            labels = bucket_labels(self.buckets)
            tags = self._tags[group.name] = tuple(f"{self.prefix}{{{group.name}:{label}}}:" for label in labels)
        return tags

    def key(self, group: Group, entity_key: str) -> str:
        return self.tags(group)[bucket_of(entity_key, self.buckets)] + entity_key

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._wait_s):
                await self._turns.acquire()
        except TimeoutError:
            raise RedisConnectionError(f"all {self.name} connections stayed busy for {self._wait_s:g}s") from None
        try:
            yield
        finally:
            self._turns.release()

    def _by_bucket(self, group: Group, keys: Sequence[str]) -> dict[int, list[int]]:
        """Positions of the keys per bucket, in the order first seen."""
        buckets: dict[int, list[int]] = {}
        n = self.buckets
        for i, key in enumerate(keys):
            buckets.setdefault(zlib.crc32(key.encode()) % n, []).append(i)
        return buckets

    async def migrate(self) -> None:
        await self.ping()  # nothing to create; proves the cluster answers

    async def read(self, reads: Sequence[tuple[Group, Sequence[str]]]) -> list[list[bytes | None]]:
        out: list[list[bytes | None]] = [[None] * len(keys) for _, keys in reads]
        places: list[tuple[int, list[int]]] = []  # per MGET: which group of the read, which positions
        batches: dict[str, tuple[ClusterNode, list[PipelineCommand]]] = {}
        async with self._turn():
            client = self.client
            await client.initialize()  # a no-op unless the slot map is unknown (first use, after a failure)
            for g, (group, keys) in enumerate(reads):
                tags = self.tags(group)
                for bucket, positions in self._by_bucket(group, keys).items():
                    tag = tags[bucket]
                    # The tag's slot names the master (every key of the bucket shares it: none is hashed); a
                    # stale slot map ends in a MOVED redirect, which _on_node follows.
                    command = PipelineCommand(len(places), "MGET", *[tag + keys[i] for i in positions])
                    self._add(batches, self._owner(tag), command)
                    places.append((g, positions))
            if places:
                await self._execute(batches)
        failed: list[set[int]] = [set() for _ in reads]
        errors: dict[str, BaseException] = {}
        for node, commands in batches.values():
            for command in commands:
                g, positions = places[command.position]
                blobs = command.result
                if isinstance(blobs, BaseException):
                    failed[g].update(positions)
                    errors.setdefault(node.name, blobs)
                    continue
                found = out[g]
                for i, blob in zip(positions, blobs, strict=True):
                    found[i] = blob
        if errors:
            cause = next(iter(errors.values()))
            lost, asked = sum(map(len, failed)), sum(len(keys) for _, keys in reads)
            if lost == asked:  # nothing answered: the backend's failure, not a partial read
                raise cause
            nodes = ", ".join(f"{name}: {type(e).__name__}: {e}" for name, e in errors.items())
            raise PartialRead(f"{lost} of {asked} keys unread ({nodes})", out, failed) from cause
        return out

    async def write(self, group: Group, rows: Sequence[WriteRow]) -> WriteResult:
        if not rows:
            return WriteResult(0, 0)
        commands: list[PipelineCommand] = []
        tags = self.tags(group)
        for bucket, positions in self._by_bucket(group, [r.key for r in rows]).items():
            tag = tags[bucket]
            bucket_rows = [rows[i] for i in positions]
            keys = [tag + row.key for row in bucket_rows]
            args = script_args(group, bucket_rows)
            commands.append(PipelineCommand(len(commands), "EVALSHA", self._sha, len(keys), *keys, *args))
        async with self._turn():
            await self.client.initialize()
            await self._run_script(commands)
        written = 0
        for command in commands:
            reply = command.result
            if isinstance(reply, BaseException):
                raise reply
            written += int(reply)
        return WriteResult(written, len(rows) - written)

    async def _run_script(self, commands: list[PipelineCommand]) -> None:
        """The write script once per bucket, in one pipeline per master (one round trip per master), until each
        command has its answer: a master lacking the script (first write, a restarted node, a promoted replica)
        gets EVAL, which runs it and caches it there; a bucket whose master did not answer goes again to the
        slot's new master if the slot map, asked again at once, names one (a failover)."""
        pending = commands
        for _ in range(3):  # at most: EVALSHA, then a new master after a failover, then EVAL there
            batches: dict[str, tuple[ClusterNode, list[PipelineCommand]]] = {}
            for command in pending:
                self._add(batches, self._owner(command.args[3]), command)
            await self._execute(batches)
            again = []
            for command in pending:
                if isinstance(command.result, NoScriptError):
                    # Rows of this bucket were not touched: the script did not run. Its other buckets stand.
                    command.args = ("EVAL", self._script, *command.args[2:])
                    again.append(command)
            lost = [(c, node) for node, cs in batches.values() for c in cs if isinstance(c.result, UNREACHABLE)]
            if lost:
                await self._refresh()
                again += [c for c, node in lost if self._owner(c.args[3]) is not node]
            if not again:
                return
            pending = again

    def _owner(self, key: str) -> ClusterNode:
        """The master serving the key's slot, as the slot map says."""
        client = self.client
        return client.nodes_manager.get_node_from_slot(client.keyslot(key))

    @staticmethod
    def _add(
        batches: dict[str, tuple[ClusterNode, list[PipelineCommand]]], node: ClusterNode, command: PipelineCommand
    ) -> None:
        batch = batches.get(node.name)
        if batch is None:
            batches[node.name] = (node, [command])
        else:
            batch[1].append(command)

    async def _execute(self, batches: dict[str, tuple[ClusterNode, list[PipelineCommand]]]) -> None:
        """Every node's commands as one pipeline on one of its connections, all nodes at once; each command's
        `result` is its reply or its error. A node that fails fails only its own commands: redis-py's cluster
        pipeline would instead raise for all of them, close every node's connections and sleep 0.25 s before
        trying the whole batch again, so one dead master stalled the keys of every other."""
        if len(batches) == 1:
            await self._on_node(*next(iter(batches.values())))
        else:
            await asyncio.gather(*(self._on_node(node, commands) for node, commands in batches.values()))

    async def _on_node(self, node: ClusterNode, commands: list[PipelineCommand]) -> None:
        retried = node.name in self._suspects  # a node known to fail gets one try, not two
        sent = commands
        while True:
            try:
                await node.execute_pipeline(sent)  # replies, and errors read from the server, per command
            except Exception as exc:  # it could not send: every command of it failed
                for command in sent:
                    command.result = exc
            broken = [c for c in sent if isinstance(c.result, UNREACHABLE)]
            if not broken:
                self._suspects.pop(node.name, None)
                break
            failure = broken[0].result
            if isinstance(failure, MaxConnectionsError):
                break
            # As redis-py does: connections opened before the failure may be just as broken (a restarted node).
            node.update_active_connections_for_reconnect()
            await node.disconnect_free_connections()
            if retried or isinstance(failure, RedisTimeoutError):  # a timeout again would double the wait
                self._suspect(node)
                break
            retried = True
            sent = broken  # once more, on a new connection
        for command in commands:
            if isinstance(command.result, REDIRECTS):  # MOVED, ASK, TRYAGAIN: redis-py follows them
                try:
                    command.result = await self.client.execute_command(*command.args)
                except Exception as exc:
                    command.result = exc
            if isinstance(command.result, BaseException):
                # Its traceback holds the frames that hold the commands that hold it: a cycle only the garbage
                # collector frees. While a master is down every read would leave some 50 objects to it, and
                # its full passes (50 to 200 ms on a 2-core box) stall every request. Only the error's type
                # and message are reported.
                command.result.__traceback__ = None

    def _suspect(self, node: ClusterNode) -> None:
        if node.name not in self._suspects:
            log.warning(
                "%s: node %s does not answer; following the slot map until it does or loses its slots",
                self.name,
                node.name,
            )
        self._suspects[node.name] = node
        if self._follower is None or self._follower.done():
            self._follower = asyncio.get_running_loop().create_task(self._follow(), name=f"{self.name} slot map")

    async def _follow(self) -> None:
        """While some node fails to answer: check the slot map every FOLLOW_S, and stop once every suspect
        answers again (a restarted node) or serves no slot any more (its replica was promoted)."""
        while self._suspects:
            try:
                await self._refresh()
            except Exception as exc:  # no node answered, or they disagree: ask again next time
                log.debug("%s: slot map refresh failed: %r", self.name, exc)
            nodes = self.client.nodes_manager.nodes_cache
            for name, node in list(self._suspects.items()):
                known = nodes.get(name)
                if known is None or known.server_type != PRIMARY:
                    log.warning("%s: node %s serves no slots any more (a replica took its place)", self.name, name)
                    self._suspects.pop(name, None)
                    continue
                try:
                    async with asyncio.timeout(FOLLOW_S):
                        await node.execute_command("PING")
                except (RedisError, OSError, TimeoutError):
                    continue
                self._suspects.pop(name, None)
            if self._suspects:
                await asyncio.sleep(FOLLOW_S)

    async def _refresh(self) -> None:
        """Ask a node that answers (suspects last) for the slot map, and take redis-py's full refresh when its
        masters differ from ours. Comparing first spares the refresh (which sends every connection of every
        node to reconnect) while the map has not changed, e.g. while a dead master waits for its replica."""
        manager = self.client.nodes_manager
        asked = sorted(manager.nodes_cache.values(), key=lambda node: node.name in self._suspects)
        for node in asked:
            try:
                ranges = await node.execute_command("CLUSTER SLOTS")
            except (RedisError, OSError):
                continue
            break
        else:
            return
        slots = manager.slots_cache
        for start, end, master, *_ in ranges:
            host = master[0].decode() if isinstance(master[0], bytes) else master[0]
            name = get_node_name(*manager.remap_host_port(host or node.host, int(master[1])))
            for slot in (int(start), int(end)):
                owners = slots.get(slot)
                if not owners or owners[0].name != name:
                    log.info("%s: slot %d is served by %s now: refreshing the slot map", self.name, slot, name)
                    await manager.initialize()
                    return

    async def ping(self) -> None:
        """Every master answers (redis-py's own ping asks one node: a dead master would go unnoticed)."""
        client = self.client
        await client.initialize()
        await client.execute_command("PING", target_nodes=client.get_primaries())

    def server_answered(self, exc: BaseException) -> bool:
        return server_answered(exc)

    async def aclose(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        await self.client.aclose()

    async def footprints(self, groups: Sequence[Group], budget_s: float) -> dict[str, Footprint]:
        """Measured (backends/base.py): every master walked at once, as on a single node
        (backends/redis_footprint.py says what is measured); replicas hold the same again and are not counted."""
        names = [g.name for g in groups]
        pattern = redis_footprint.match_pattern(self.prefix)
        deadline = time.monotonic() + budget_s

        async def sizes(keys: Sequence[bytes]) -> list[Any]:
            batches: dict[str, tuple[ClusterNode, list[PipelineCommand]]] = {}
            commands = [PipelineCommand(i, "MEMORY", "USAGE", key, "SAMPLES", 0) for i, key in enumerate(keys)]
            manager = self.client.nodes_manager
            for key, command in zip(keys, commands, strict=True):
                self._add(batches, manager.get_node_from_slot(key_slot(key)), command)
            await self._execute(batches)
            return [None if isinstance(c.result, BaseException) else c.result for c in commands]

        async def on(node: ClusterNode) -> dict[str, Footprint]:
            return await redis_footprint.measure_node(
                self.prefix,
                names,
                cluster=True,
                scan=lambda cursor: node.execute_command("SCAN", cursor, "MATCH", pattern, "COUNT", SCAN_COUNT),
                sizes=sizes,
                dbsize=lambda: node.execute_command("DBSIZE"),
                deadline=deadline,
            )

        async with self._turn():
            await self.client.initialize()
            parts = await asyncio.gather(*(on(node) for node in self.client.get_primaries()))
        return redis_footprint.combine(names, parts)

"""Redis Cluster: the blobs of `backends/redis.py`, keyed so one group's batch touches a few slots, not one per key.

Key: `{key_prefix}{{group}:{label}}:{entity key}`, e.g. `fg:{live:0060}:101`: the entity's bucket is
crc32(entity key) mod `BUCKETS` and `label` is that bucket's 4-digit name (`bucket_labels`). Redis hashes
only the `{live:0060}` tag, so every key of one (group, bucket) shares a slot, each group spreads over
`BUCKETS` slots (hence over the masters), and a batch of any size touches at most `BUCKETS` slots per group.

A read is one pipeline: one MGET per (group, bucket) present in the batch, sent to the master owning that
slot; the per-node pipelines go out concurrently, so a read costs one round trip per master, not per key
or per slot. A write runs the compare-event-time script of `backends.redis_common.py` once per bucket, in one
pipeline the same way.

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

Every bucket costs an MGET, and redis-py's cluster pipeline spends ~15 us of gateway CPU on each (the
single-node backend reads through its own pipelined connection, backends/resp.py, which has no cluster
routing; a cluster-aware version of it would close much of the gap). Past 16, a group's
spread gains little (with the labels of `bucket_labels`, 16 buckets keep every group within 1.12x of an even
share on 3 or 6 masters and 1.5x on 12; plain bucket numbers: up to 1.9x and 3.75x) while reads/s keep
falling. A group uses at most 16 masters; different groups land on different ones.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from app.registry.model import BackendSpec, Group
from backends.base import WriteResult, WriteRow
from backends.options import url_hosts
from backends.redis_common import WRITE_IF_NEWER, script_args, server_answered

# Changing this moves every key (existing data reads as MISSING until rewritten): it is part of the layout.
BUCKETS = 16


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
        # The cluster client uses only the retry's count (no backoff) and its own list of retryable errors
        # (ConnectionError, TimeoutError, ClusterDownError, SlotNotCoveredError): one retry, after it has
        # refreshed the slot map, rides out a failover or a node restart; redis-py's default (3 retries)
        # would multiply every timeout. `cluster_error_retry_attempts` is deprecated and ignored when
        # `retry` is given, so it is not set. The per-node connections never retry (redis-py sets 0).
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
        places: list[tuple[list[bytes | None], list[int]]] = []
        async with self._turn():
            client = self.client
            await client.initialize()  # a no-op unless the slot map is unknown (first use, after a failure)
            pipe = client.pipeline(transaction=False)
            for (group, keys), found in zip(reads, out, strict=True):
                tags = self.tags(group)
                for bucket, positions in self._by_bucket(group, keys).items():
                    tag = tags[bucket]
                    # Naming the node spares redis-py hashing every key to check they share a slot (a third
                    # of the read's time at 64 buckets); a stale slot map still ends in a MOVED redirect.
                    node = client.get_node_from_key(tag)
                    pipe.execute_command("MGET", *[tag + keys[i] for i in positions], target_nodes=node)
                    places.append((found, positions))
            replies = await pipe.execute() if places else []
        for (found, positions), blobs in zip(places, replies, strict=True):
            for i, blob in zip(positions, blobs, strict=True):
                found[i] = blob
        return out

    async def write(self, group: Group, rows: Sequence[WriteRow]) -> WriteResult:
        if not rows:
            return WriteResult(0, 0)
        calls: list[tuple[list[str], list[bytes | str]]] = []
        tags = self.tags(group)
        for bucket, positions in self._by_bucket(group, [r.key for r in rows]).items():
            tag = tags[bucket]
            bucket_rows = [rows[i] for i in positions]
            calls.append(([tag + row.key for row in bucket_rows], script_args(group, bucket_rows)))
        async with self._turn():
            written = await self._run_script(calls)
        return WriteResult(written, len(rows) - written)

    async def _run_script(self, calls: list[tuple[list[str], list[bytes | str]]]) -> int:
        """The write script once per bucket, in one pipeline (one round trip per master)."""
        try:
            return await self._pipeline_script(("EVALSHA", self._sha), calls)
        except NoScriptError:
            # A master lacks the script (first write, a restarted node, a promoted replica): EVAL runs it and
            # caches it there. Buckets the first pass wrote are written again with the same rows, which
            # changes neither the data nor the counts (an equal event time is written, not skipped).
            return await self._pipeline_script(("EVAL", self._script), calls)

    async def _pipeline_script(self, command: tuple[str, str], calls: list[tuple[list[str], list[bytes | str]]]) -> int:
        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command(*command, len(keys), *keys, *args)
        return sum(int(reply) for reply in await pipe.execute())

    async def ping(self) -> None:
        """Every master answers (redis-py's own ping asks one node: a dead master would go unnoticed)."""
        client = self.client
        await client.initialize()
        await client.execute_command("PING", target_nodes=client.get_primaries())

    def server_answered(self, exc: BaseException) -> bool:
        return server_answered(exc)

    async def aclose(self) -> None:
        await self.client.aclose()

"""Redis: one string key per (group, entity) holding the packed blob; a batch read is one MGET, sent on a
pipelined connection (backends/resp.py); writes, scripts and pings go through redis-py.

Key: `{key_prefix}{group}:{entity key}`. A key expires at its reclaim time (event time + ttl + grace,
backends/base.py) so Redis frees the memory exactly when the read path starts calling the value MISSING; a
row written already past it is gone at once.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from app.registry.model import BackendSpec, Group
from app.storage.layout import blob_event_us
from backends import options as check
from backends import redis_footprint
from backends.base import (
    BackendKind,
    FeatureBackend,
    Fold,
    Footprint,
    Option,
    Scanned,
    TileRef,
    WriteResult,
    WriteRow,
)
from backends.redis_common import COPY_IF_NEWER, WRITE_IF_NEWER, script_args, server_answered
from backends.redis_tiles import TILES_SCRIPT, RedisTiles
from backends.resp import PipelinedReader

_GLOB = re.compile(r"[*?\[\]\\]")  # special in a SCAN MATCH pattern


class RedisBackend:
    type = "redis"
    in_process = False

    def __init__(self, spec: BackendSpec, groups: Sequence[Group]):
        options = spec.options
        self.name = spec.name
        self.prefix = options["key_prefix"]
        # One immediate retry on a broken connection only (a pooled socket that died with a Redis restart);
        # redis-py's default of several retries with backoff would blow every deadline.
        pool = BlockingConnectionPool.from_url(
            options["url"],
            max_connections=options["pool_size"],
            timeout=options["connect_timeout_ms"] / 1000,
            socket_timeout=options["timeout_ms"] / 1000,
            socket_connect_timeout=options["connect_timeout_ms"] / 1000,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            retry_on_error=[RedisConnectionError],
            client_name=f"feature-gateway:{spec.name}",
        )
        self.client = Redis(connection_pool=pool)
        self._write_script = self.client.register_script(WRITE_IF_NEWER)
        self._copy_script = self.client.register_script(COPY_IF_NEWER)
        # Aggregation groups' tiles (backends/redis_tiles.py), on the pipelined connection
        tiles_sha = self.client.register_script(TILES_SCRIPT).sha
        self.reader = PipelinedReader(
            options["url"],
            timeout_s=options["timeout_ms"] / 1000,
            connect_timeout_s=options["connect_timeout_ms"] / 1000,
            client_name=f"feature-gateway:{spec.name}:read",
        )
        self.tiles = RedisTiles(self.prefix, self.reader, tiles_sha)

    def key(self, group: Group, entity_key: str) -> str:
        return f"{self.prefix}{group.name}:{entity_key}"

    async def migrate(self) -> None:
        await self.client.ping()  # nothing to create; proves the server answers

    async def read(self, reads: Sequence[tuple[Group, Sequence[str]]]) -> list[list[bytes | None]]:
        keys = [f"{self.prefix}{group.name}:{k}" for group, entity_keys in reads for k in entity_keys]
        blobs = await self.reader.mget(keys)
        out, start = [], 0
        for _, entity_keys in reads:
            out.append(blobs[start : start + len(entity_keys)])
            start += len(entity_keys)
        return out

    async def write(self, group: Group, rows: Sequence[WriteRow]) -> WriteResult:
        if not rows:
            return WriteResult(0, 0)
        written = int(
            await self._write_script(keys=[self.key(group, r.key) for r in rows], args=script_args(group, rows))
        )
        return WriteResult(written, len(rows) - written)

    async def scan(self, group: Group, cursor: str | None, limit: int) -> Scanned:
        prefix = f"{self.prefix}{group.name}:"
        pattern = _GLOB.sub(r"\\\g<0>", prefix) + "*"
        next_cursor, found = await self.client.scan(int(cursor or 0), match=pattern, count=limit)
        keys = [k.decode() if isinstance(k, bytes) else k for k in found]
        blobs = await self.reader.mget(keys) if keys else []
        rows = [
            WriteRow(key[len(prefix) :], blob_event_us(blob), blob)
            for key, blob in zip(keys, blobs, strict=True)
            if blob is not None  # expired or deleted since SCAN saw it
        ]
        return Scanned(rows, None if int(next_cursor) == 0 else str(next_cursor))

    async def delete(self, group: Group, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), 1000):
            await self.client.delete(*(self.key(group, k) for k in keys[start : start + 1000]))

    async def put(self, group: Group, rows: Sequence[WriteRow], ttl_s: float, *, copy: bool = False) -> WriteResult:
        """As a group's cache (app/tiering/cache.py): `write`, or `copy`'s rule with `copy`; each row kept
        `ttl_s` at most."""
        if not rows:
            return WriteResult(0, 0)
        expire_by_ms = time.time_ns() // 1_000_000 + int(ttl_s * 1000)
        keys = [self.key(group, r.key) for r in rows]
        script = self._copy_script if copy else self._write_script
        written = int(await script(keys=keys, args=script_args(group, rows, expire_by_ms)))
        return WriteResult(written, len(rows) - written)

    async def copy(self, group: Group, rows: Sequence[WriteRow]) -> WriteResult:
        if not rows:
            return WriteResult(0, 0)
        keys = [self.key(group, r.key) for r in rows]
        written = int(await self._copy_script(keys=keys, args=script_args(group, rows)))
        return WriteResult(written, len(rows) - written)

    async def apply(
        self,
        group: str,
        events: Mapping[str, str],
        tiles: Sequence[TileRef],
        fold: Fold,
        keep_us: int,
        tile_keep_us: Mapping[int, int],
    ) -> int:
        return await self.tiles.apply(group, events, tiles, fold, keep_us, tile_keep_us)

    async def read_tiles(
        self, group: str, entities: Sequence[str], needed: Sequence[tuple[int, int]]
    ) -> list[bytes | None]:
        return await self.tiles.read(group, entities, needed)

    async def ping(self) -> None:
        await self.client.ping()

    def server_answered(self, exc: BaseException) -> bool:
        return server_answered(exc)

    async def aclose(self) -> None:
        await self.reader.aclose()
        await self.client.aclose()
        await self.client.connection_pool.disconnect()

    async def footprints(self, groups: Sequence[Group], budget_s: float) -> dict[str, Footprint]:
        """Measured (backends/base.py): MEMORY USAGE of a sample times the key count, counted by one SCAN walk;
        backends/redis_footprint.py says exactly what is measured."""
        client = self.client

        async def sizes(keys: Sequence[bytes]) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.memory_usage(key, samples=0)  # 0: every field of a hash, not 5 of them
                return list(await pipe.execute())

        names = [g.name for g in groups]
        part = await redis_footprint.measure_node(
            self.prefix,
            names,
            cluster=False,
            scan=lambda cursor: client.scan(
                cursor, match=redis_footprint.match_pattern(self.prefix), count=redis_footprint.SCAN_COUNT
            ),
            sizes=sizes,
            dbsize=client.dbsize,
            deadline=time.monotonic() + budget_s,
        )
        return redis_footprint.combine(names, [part])


def _rules(options: Mapping[str, Any]) -> tuple[str, str] | None:
    """What a redis backend's options must agree on; (option, reason) for the first that does not."""
    url = urlsplit(options["url"])
    several = url.scheme != "unix" and len(check.url_hosts(options["url"])) > 1
    if not options["cluster"]:
        if several:
            return "url", "lists several hosts, which is a Redis Cluster's seed list: add cluster: true"
        return None
    if url.scheme == "unix":
        return "url", "a Redis Cluster is reached over TCP (redis:// or rediss://), not a unix socket"
    db = parse_qs(url.query).get("db", [url.path.strip("/")])[0]
    if db not in ("", "0"):
        return "url", f"a Redis Cluster has only database 0, not {db}"
    if "{" in options["key_prefix"] or "}" in options["key_prefix"]:
        return "key_prefix", "must not contain { or }: on a cluster the key's first {...} is the gateway's hash tag"
    return None


def _open(spec: BackendSpec, groups: Sequence[Group]) -> FeatureBackend:
    if spec.options["cluster"]:
        from backends.redis_cluster import RedisClusterBackend  # its own module: redis-py's cluster client

        return RedisClusterBackend(spec, groups)
    return RedisBackend(spec, groups)


KIND = BackendKind(
    type="redis",
    options={
        "url": Option(check.url("redis", "rediss", "unix"), identity=True),
        "cluster": Option(check.flag, False),
        "key_prefix": Option(check.text, "fg:", identity=True),
        "timeout_ms": Option(check.positive(float), 1000.0),
        "connect_timeout_ms": Option(check.positive(float), 1000.0),
        "pool_size": Option(check.positive(int), 64),
    },
    open=_open,
    rules=_rules,
)

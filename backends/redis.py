"""Redis: one string key per (group, entity) holding the packed blob; a batch read is one MGET, sent on a
pipelined connection (backends/resp.py); writes, scripts and pings go through redis-py.

Key: `{key_prefix}{group}:{entity key}`. A key expires at its reclaim time (event time + ttl + grace,
backends/base.py) so Redis frees the memory exactly when the read path starts calling the value MISSING; a
row written already past it is gone at once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from app.registry.model import BackendSpec, Group
from backends import options as check
from backends.base import BackendKind, FeatureBackend, Fold, Option, TileRef, WriteResult, WriteRow
from backends.redis_common import WRITE_IF_NEWER, script_args, server_answered
from backends.resp import PipelinedReader

# Writes a tile batch if nothing it read has changed since: no entity's version moved (every tile write bumps
# its entity's) and none of its new event ids appeared. KEYS: the entities' version keys (ARGV[1] of them), the new
# event ids' keys (ARGV[2] of them), then the tiles'. ARGV: [3] how long ids and versions are kept (ms), then the
# versions as read, then per tile its ttl (ms) and blob. Answers -1 when the batch must be read again.
_WRITE_TILES = """
local versions, ids, keep = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
for i = 1, versions do
  if (redis.call('GET', KEYS[i]) or '0') ~= ARGV[3 + i] then return -1 end
end
for i = versions + 1, versions + ids do
  if redis.call('EXISTS', KEYS[i]) == 1 then return -1 end
end
for i = 1, versions do redis.call('SET', KEYS[i], tonumber(ARGV[3 + i]) + 1, 'PX', keep) end
for i = versions + 1, versions + ids do redis.call('SET', KEYS[i], '1', 'PX', keep) end
local a = 4 + versions
for i = versions + ids + 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[a + 1], 'PX', ARGV[a])
  a = a + 2
end
return ids
"""

# Optimistic transactions per tile batch before giving up (each one lost means another batch got through)
_APPLY_ATTEMPTS = 20


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
        self._tiles_script = self.client.register_script(_WRITE_TILES)
        self.reader = PipelinedReader(
            options["url"],
            timeout_s=options["timeout_ms"] / 1000,
            connect_timeout_s=options["connect_timeout_ms"] / 1000,
            client_name=f"feature-gateway:{spec.name}:read",
        )

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

    def tile_key(self, group: str, tile: TileRef) -> str:
        entity, size, start = tile
        # `~` cannot start a group name: no stored group's key can reach these
        return f"{self.prefix}~tile:{group}:{entity}:{size}:{start}"

    async def apply(
        self, group: str, event_ids: Sequence[str], tiles: Sequence[TileRef], fold: Fold, keep_us: int
    ) -> int:
        """TileStore.apply as an optimistic transaction without WATCH: one MGET reads the batch's event ids, its
        tiles and a version per entity it touches; the fold runs here; one script writes the new ids and tiles
        only if no version moved and no new id appeared meanwhile (else the batch is read again). Each tile is a
        key of its own expiring with its tile; each event id a key expiring after `keep_us`.

        Not WATCH: Redis (7.0) checks each watched key against every key the client already watches, so watching
        a batch's ~5,000 keys took 112 ms of the server's time per batch, 20 times the rest of the batch."""
        ids = list(dict.fromkeys(event_ids))
        refs = list(dict.fromkeys(tiles))
        entities = list(dict.fromkeys(ref[0] for ref in refs))
        version_keys = [f"{self.prefix}~ver:{group}:{entity}" for entity in entities]
        id_keys = [f"{self.prefix}~evt:{group}:{i}" for i in ids]
        tile_keys = {ref: self.tile_key(group, ref) for ref in refs}
        keep_ms = max(1, keep_us // 1000)
        nv, ni = len(version_keys), len(id_keys)
        for _ in range(_APPLY_ATTEMPTS):
            found = await self.reader.mget([*version_keys, *id_keys, *tile_keys.values()])
            versions = [b"0" if v is None else v for v in found[:nv]]
            new = {i for i, hit in zip(ids, found[nv : nv + ni], strict=True) if hit is None}
            if not new:
                return 0
            old = {ref: blob for ref, blob in zip(refs, found[nv + ni :], strict=True) if blob is not None}
            written = fold(new, old)
            now_us = time.time_ns() // 1000
            keys = [*version_keys, *(f"{self.prefix}~evt:{group}:{event_id}" for event_id in new)]
            args: list[Any] = [nv, len(new), keep_ms, *versions]
            for ref, blob in written.items():
                keys.append(tile_keys[ref])
                args += (max(1, (ref[2] + ref[1] * 1_000_000 + keep_us - now_us) // 1000), blob)
            if await self._write_tiles(keys, args) >= 0:
                return len(new)
            # another batch changed one of its entities' tiles, or sent one of its events: read again
        raise RuntimeError(f"tile batch of {group} lost {_APPLY_ATTEMPTS} optimistic transactions in a row")

    async def _write_tiles(self, keys: list[str], args: list[Any]) -> int:
        try:
            return int(await self.reader.call("EVALSHA", self._tiles_script.sha, len(keys), *keys, *args))
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.reader.call("SCRIPT", "LOAD", _WRITE_TILES)  # a restarted Redis forgot it
        return int(await self.reader.call("EVALSHA", self._tiles_script.sha, len(keys), *keys, *args))

    async def read_tiles(self, group: str, tiles: Sequence[TileRef]) -> list[bytes | None]:
        return await self.reader.mget([self.tile_key(group, t) for t in tiles])

    async def ping(self) -> None:
        await self.client.ping()

    def server_answered(self, exc: BaseException) -> bool:
        return server_answered(exc)

    async def aclose(self) -> None:
        await self.reader.aclose()
        await self.client.aclose()
        await self.client.connection_pool.disconnect()


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

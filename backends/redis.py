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

# Writes a tile batch entity by entity, each only if nothing of it changed since it was read: its version did not
# move (every tile write bumps its entity's) and none of its new event ids appeared. KEYS, per entity: its version
# key, its new event ids' keys, its tiles' keys. ARGV: [1] how long ids and versions are kept (ms), [2] entities,
# then per entity: the version read, its number of ids, of tiles, and per tile its ttl (ms) and blob. Answers the
# events written and the entities (1-based) to read again.
_WRITE_TILES = """
local keep, k, a = ARGV[1], 1, 3
local written, again = 0, {}
for e = 1, tonumber(ARGV[2]) do
  local version, ids, tiles = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local ok = (redis.call('GET', KEYS[k]) or '0') == version
  if ok then
    for i = k + 1, k + ids do
      if redis.call('EXISTS', KEYS[i]) == 1 then ok = false break end
    end
  end
  if ok then
    redis.call('SET', KEYS[k], tonumber(version) + 1, 'PX', keep)
    for i = k + 1, k + ids do redis.call('SET', KEYS[i], '1', 'PX', keep) end
    for i = k + ids + 1, k + ids + tiles do
      redis.call('SET', KEYS[i], ARGV[a + 1], 'PX', ARGV[a])
      a = a + 2
    end
    written = written + ids
  else
    again[#again + 1] = e
    a = a + 2 * tiles
  end
  k = k + 1 + ids + tiles
end
return {written, again}
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
        self, group: str, events: Mapping[str, str], tiles: Sequence[TileRef], fold: Fold, keep_us: int
    ) -> int:
        """TileStore.apply as optimistic transactions per entity, without WATCH: one MGET reads the batch's event
        ids, its tiles and a version per entity; the fold runs here; one script writes each entity's new ids and
        tiles if neither its version moved nor one of its new ids appeared meanwhile. The entities another batch
        got to first are read and folded again, alone: concurrent batches over the same entities (HTTP clients,
        consumers) redo only what they share. Each tile is a key of its own expiring with its tile; each event id
        a key expiring after `keep_us`.

        Not WATCH: Redis (7.0) checks each watched key against every key the client already watches, so watching
        a batch's ~5,000 keys took 112 ms of the server's time per batch, 20 times the rest of the batch."""
        by_entity: dict[str, list[str]] = {}
        for event_id, entity in events.items():
            by_entity.setdefault(entity, []).append(event_id)
        tiles_of: dict[str, list[TileRef]] = {}
        for ref in dict.fromkeys(tiles):
            tiles_of.setdefault(ref[0], []).append(ref)
        keep_ms = max(1, keep_us // 1000)
        # Every key once (as bytes: what the connection sends), for the read and the write and any retry
        prefix = self.prefix.encode()
        versions_base, ids_base = prefix + b"~ver:%s:" % group.encode(), prefix + b"~evt:%s:" % group.encode()
        version_key = {entity: versions_base + entity.encode() for entity in by_entity}
        id_key = {event_id: ids_base + event_id.encode() for event_id in events}
        tile_key = {ref: self.tile_key(group, ref).encode() for refs in tiles_of.values() for ref in refs}
        pending, written_events = list(by_entity), 0
        for _ in range(_APPLY_ATTEMPTS):
            keys: list[bytes] = []
            for entity in pending:
                keys.append(version_key[entity])
                keys += [id_key[i] for i in by_entity[entity]]
                keys += [tile_key[ref] for ref in tiles_of.get(entity, ())]
            found = await self.reader.mget(keys)
            read: list[tuple[str, bytes, list[str]]] = []  # entity, version, new ids
            old: dict[TileRef, bytes] = {}
            at = 0
            for entity in pending:
                ids, refs = by_entity[entity], tiles_of.get(entity, ())
                version = found[at] or b"0"
                new = [i for i, hit in zip(ids, found[at + 1 : at + 1 + len(ids)], strict=True) if hit is None]
                at += 1 + len(ids)
                for ref, blob in zip(refs, found[at : at + len(refs)], strict=True):
                    if blob is not None:
                        old[ref] = blob
                at += len(refs)
                if new:
                    read.append((entity, version, new))
            if not read:
                return written_events
            written = fold({i for _, _, new in read for i in new}, old)
            out: dict[str, list[tuple[TileRef, bytes]]] = {}
            for ref, blob in written.items():
                out.setdefault(ref[0], []).append((ref, blob))
            now_us = time.time_ns() // 1000
            script_keys: list[bytes] = []
            args: list[Any] = [keep_ms, len(read)]
            for entity, version, new in read:
                mine = out.get(entity, [])
                script_keys.append(version_key[entity])
                script_keys += [id_key[i] for i in new]
                script_keys += [tile_key[ref] for ref, _ in mine]
                args += (version, len(new), len(mine))
                for ref, blob in mine:
                    args += (max(1, (ref[2] + ref[1] * 1_000_000 + keep_us - now_us) // 1000), blob)
            count, again = await self._write_tiles(script_keys, args)
            written_events += count
            if not again:
                return written_events
            pending = [read[i - 1][0] for i in again]  # another batch got to these first: read them again
        raise RuntimeError(f"tile batch of {group} lost {_APPLY_ATTEMPTS} optimistic transactions in a row")

    async def _write_tiles(self, keys: list[bytes], args: list[Any]) -> tuple[int, list[int]]:
        command = ("EVALSHA", self._tiles_script.sha, len(keys), *keys, *args)
        try:
            answer = await self.reader.call(*command)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            await self.reader.call("SCRIPT", "LOAD", _WRITE_TILES)  # a restarted Redis forgot it
            answer = await self.reader.call(*command)
        return int(answer[0]), [int(e) for e in answer[1]]

    async def read_tiles(self, group: str, tiles: Sequence[TileRef]) -> list[bytes | None]:
        # A read asks the same ~200 tiles of each entity: the keys' shared part encoded once per entity
        bases: dict[str, bytes] = {}
        keys = []
        for entity, size, start in tiles:
            base = bases.get(entity)
            if base is None:
                base = bases[entity] = f"{self.prefix}~tile:{group}:{entity}:".encode()
            keys.append(b"%s%d:%d" % (base, size, start))
        return await self.reader.mget(keys)

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

"""Redis as the tile store of aggregation groups (backends/base.py TileStore).

Layout: one hash per (group, entity), `{prefix}~tiles:{group}:{entity}`, with a field `size:start` per tile
holding its partials and a field `v`, the entity's version, which every write bumps; and one key per event id,
`{prefix}~evt:{group}:{id}`, expiring when an event of that id could no longer count. (`~` cannot start a group
name: no stored group's key can reach these.)

Why a hash per entity (the first layout had a key per tile): a read asks the same ~200 tiles of every entity, so
one HMGET per entity whose field list is encoded once serves it (MGET of 224 keys cost a fifth of an aggregate
fetch in packing alone); a write is one HSET per entity; and a tile costs a hash field, not a key with its own
expiry entry. Redis 7.0 expires keys, not fields: the hash lives as long as its longest-kept tile, and a write
that finds more fields in it than its windows can read removes the ones past their keep first.

A batch is written without WATCH (Redis 7.0 checks each watched key against every key the client already
watches: watching a batch's ~5,000 keys took 112 ms of the server per batch): the versions and tiles are read,
the fold runs here, and one script stores each entity whose version has not moved and none of whose new event ids
has appeared meanwhile; the entities another batch got to first are read and folded again, alone.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from redis.exceptions import ResponseError

from backends.base import Fold, TileRef
from backends.resp import PipelinedReader, pack

# KEYS, per entity: its hash, then its new event ids' keys. ARGV: [1] now (us), [2] how long event ids are kept
# (ms), [3] the number of tile sizes, then each size (s) and how long its tiles are kept after their end (us),
# then the entities; per entity: the version read, its number of ids, of tiles, the hash's ttl (ms), the field
# count past which it is pruned, then per tile its field and blob. Answers the events written and the entities
# (1-based) to read again.
TILES_SCRIPT = """
local now, ids_ms, sizes = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local keep = {}
for i = 0, sizes - 1 do keep[ARGV[4 + 2 * i]] = tonumber(ARGV[5 + 2 * i]) end
local a = 4 + 2 * sizes
local entities, k = tonumber(ARGV[a]), 1
a = a + 1
local written, again = 0, {}
for e = 1, entities do
  local version, ids, tiles, ttl, prune = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3],
    tonumber(ARGV[a + 4])
  a = a + 5
  local key = KEYS[k]
  local ok = (redis.call('HGET', key, 'v') or '0') == version
  if ok then
    for i = k + 1, k + ids do
      if redis.call('EXISTS', KEYS[i]) == 1 then ok = false break end
    end
  end
  if ok then
    for i = k + 1, k + ids do redis.call('SET', KEYS[i], '1', 'PX', ids_ms) end
    -- in slices: Lua's unpack stops at a few thousand values (an entity's backfill can touch more tiles)
    for from = a, a + 2 * tiles - 1, 1000 do
      redis.call('HSET', key, unpack(ARGV, from, math.min(from + 999, a + 2 * tiles - 1)))
    end
    redis.call('HSET', key, 'v', tonumber(version) + 1)
    if redis.call('PTTL', key) < tonumber(ttl) then redis.call('PEXPIRE', key, ttl) end
    if redis.call('HLEN', key) > prune then
      for _, field in ipairs(redis.call('HKEYS', key)) do
        local size, start = string.match(field, '^(%d+):(%d+)$')
        if size and keep[size] and tonumber(start) + tonumber(size) * 1000000 + keep[size] < now then
          redis.call('HDEL', key, field)
        end
      end
    end
    written = written + ids
  else
    again[#again + 1] = e
  end
  a = a + 2 * tiles
  k = k + 1 + ids
end
return {written, again}
"""

_APPLY_ATTEMPTS = 20  # rounds before giving up (each lost one means another batch got through)


class RedisTiles:
    def __init__(self, prefix: str, reader: PipelinedReader, sha: str) -> None:
        self.prefix = prefix
        self.reader = reader
        self.sha = sha  # of TILES_SCRIPT (redis-py's Script computes it)
        self._fields: dict[int, tuple[Sequence[tuple[int, int]], bytes]] = {}  # see read

    def hash_key(self, group: str, entity: str) -> bytes:
        return f"{self.prefix}~tiles:{group}:{entity}".encode()

    async def read(self, group: str, entities: Sequence[str], needed: Sequence[tuple[int, int]]) -> list[bytes | None]:
        """An HMGET per entity, pipelined on one connection. Every entity's field list is the same, encoded once
        per read layout (the same sequence until a tile size rolls over)."""
        memo = self._fields.get(id(needed))
        if memo is None or memo[0] is not needed:
            if len(self._fields) >= 64:  # a layout per group and moment: the old moments go
                self._fields.clear()
            encoded = b"".join(pack(b"%d:%d" % tile)[4:] for tile in needed)  # each as a RESP bulk string
            memo = self._fields[id(needed)] = (needed, encoded)
        fields = memo[1]
        head = b"*%d\r\n$5\r\nHMGET\r\n" % (len(needed) + 2)
        replies = await self.reader.send_many(
            [head + pack(self.hash_key(group, entity))[4:] + fields for entity in entities]
        )
        return [blob for reply in replies for blob in reply]

    async def apply(
        self,
        group: str,
        events: Mapping[str, str],
        tiles: Sequence[TileRef],
        fold: Fold,
        keep_us: int,
        tile_keep_us: Mapping[int, int],
    ) -> int:
        by_entity: dict[str, list[str]] = {}
        for event_id, entity in events.items():
            by_entity.setdefault(entity, []).append(event_id)
        tiles_of: dict[str, list[TileRef]] = {}
        for ref in dict.fromkeys(tiles):
            tiles_of.setdefault(ref[0], []).append(ref)
        ids_base = f"{self.prefix}~evt:{group}:".encode()
        id_key = {event_id: ids_base + event_id.encode() for event_id in events}
        field = {ref: b"%d:%d" % (ref[1], ref[2]) for refs in tiles_of.values() for ref in refs}
        # A hash holds at most this many live fields: its windows' tiles within their keep
        live = sum((keep + size * 1_000_000) // (size * 1_000_000) + 1 for size, keep in tile_keep_us.items())
        pending, written_events = list(by_entity), 0
        for _ in range(_APPLY_ATTEMPTS):
            found = await self._read_for_write(group, pending, by_entity, tiles_of, id_key, field)
            read: list[tuple[str, bytes, list[str]]] = []  # entity, version, new ids
            old: dict[TileRef, bytes] = {}
            for entity, (version, seen, blobs) in zip(pending, found, strict=True):
                for ref, blob in zip(tiles_of.get(entity, ()), blobs, strict=True):
                    if blob is not None:
                        old[ref] = blob
                new = [i for i, hit in zip(by_entity[entity], seen, strict=True) if hit is None]
                if new:
                    read.append((entity, version, new))
            if not read:
                return written_events
            written = fold({i for _, _, new in read for i in new}, old)
            out: dict[str, list[tuple[TileRef, bytes]]] = {}
            for ref, blob in written.items():
                out.setdefault(ref[0], []).append((ref, blob))
            now_us = time.time_ns() // 1000
            keys: list[bytes] = []
            args: list[Any] = [now_us, max(1, keep_us // 1000), len(tile_keep_us)]
            for size, keep in tile_keep_us.items():
                args += (size, keep)
            args.append(len(read))
            for entity, version, new in read:
                mine = out.get(entity, [])
                keys.append(self.hash_key(group, entity))
                keys += [id_key[i] for i in new]
                # The hash lives as long as its longest-kept tile
                ends = [ref[2] + ref[1] * 1_000_000 + tile_keep_us[ref[1]] for ref, _ in mine]
                ttl_ms = max(1, (max(ends) - now_us) // 1000) if ends else 1
                args += (version, len(new), len(mine), ttl_ms, 2 * live)
                for ref, blob in mine:
                    args += (field[ref], blob)
            count, again = await self._write(keys, args)
            written_events += count
            if not again:
                return written_events
            pending = [read[i - 1][0] for i in again]  # another batch got to these first: read them again
        raise RuntimeError(f"tile batch of {group} lost {_APPLY_ATTEMPTS} optimistic rounds in a row")

    async def _read_for_write(
        self,
        group: str,
        entities: list[str],
        by_entity: Mapping[str, list[str]],
        tiles_of: Mapping[str, list[TileRef]],
        id_key: Mapping[str, bytes],
        field: Mapping[TileRef, bytes],
    ) -> list[tuple[bytes, list[Any], list[bytes | None]]]:
        """Per entity: its version, whether each of its event ids was seen, its stored blobs of the batch's tiles.
        One MGET of the ids and an HMGET per entity, pipelined."""
        ids = [id_key[i] for entity in entities for i in by_entity[entity]]
        commands = [pack("MGET", *ids)] if ids else []
        commands += [
            pack("HMGET", self.hash_key(group, entity), b"v", *(field[ref] for ref in tiles_of.get(entity, ())))
            for entity in entities
        ]
        replies = await self.reader.send_many(commands)
        seen = replies[0] if ids else []
        out, at = [], 0
        for entity, reply in zip(entities, replies[1 if ids else 0 :], strict=True):
            count = len(by_entity[entity])
            out.append((reply[0] or b"0", seen[at : at + count], reply[1:]))
            at += count
        return out

    async def _write(self, keys: list[bytes], args: list[Any]) -> tuple[int, list[int]]:
        command = ("EVALSHA", self.sha, len(keys), *keys, *args)
        try:
            answer = await self.reader.call(*command)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            await self.reader.call("SCRIPT", "LOAD", TILES_SCRIPT)  # a restarted Redis forgot it
            answer = await self.reader.call(*command)
        return int(answer[0]), [int(e) for e in answer[1]]

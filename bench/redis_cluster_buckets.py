"""How many hash-tag buckets per group on Redis Cluster: batch read latency against spread over the masters.

Starts its own 3-master cluster (and a single redis-server for reference) on free local ports, writes
ENTITIES entities of one group through the gateway's backend for each bucket count, then reads random
100-key batches through `backend.read` (what a fetch does): one at a time for latency (ms), 16 at once for
throughput (reads/s, where the gateway's CPU per read shows); then counts the keys each master holds. First
it prints how evenly plain bucket numbers and the chosen labels spread a group's buckets (computed).

    .venv/bin/python -m bench.redis_cluster_buckets [--entities 20000] [--reads 3000] [--batch 100]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import string
import tempfile
import time
from collections import Counter
from pathlib import Path

import uvloop
from redis import Redis as SyncRedis
from redis.crc import key_slot

from app.registry.load import parse_registry
from app.registry.model import Group
from backends.base import WriteRow
from backends.redis import RedisBackend
from backends.redis_cluster import RedisClusterBackend, bucket_labels
from tests.support import RedisClusterProcesses, RedisProcess

REGISTRY = """
backends:
  hot: {{type: redis, url: "{url}", cluster: {cluster}, key_prefix: "{prefix}"}}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
groups:
  live:
    entity: consumer
    backend: hot
    features:
      orders_7d: {{dtype: int64, default: 0}}
      avg_basket: {{dtype: float64, default: 0.0}}
      embedding: {{dtype: "float32[16]"}}
"""


Backend = RedisBackend | RedisClusterBackend


async def measure(backend: Backend, group: Group, entities: int, reads: int, batch: int) -> list[float]:
    now = time.time_ns() // 1000
    blob = group.codec.encode(
        now, [f.dtype.check(v) for f, v in zip(group.features, [3, 1.5, [0.0] * 16], strict=True)]
    )
    rows = [WriteRow(str(i), now, blob) for i in range(entities)]
    for start in range(0, entities, 1000):
        await backend.write(group, rows[start : start + 1000])
    rng = random.Random(7)
    for _ in range(200):  # warm up connections and the slot map
        await backend.read([(group, [str(rng.randrange(entities)) for _ in range(batch)])])
    samples = []
    for _ in range(reads):
        keys = [str(rng.randrange(entities)) for _ in range(batch)]
        started = time.perf_counter()
        found = await backend.read([(group, keys)])
        samples.append((time.perf_counter() - started) * 1000)
        assert all(b is not None for b in found[0])
    return samples


async def throughput(backend: Backend, group: Group, entities: int, reads: int, batch: int) -> float:
    """Batch reads per second with CONCURRENCY readers at once (the gateway's CPU per read shows here)."""
    rng = random.Random(11)
    batches = [[str(rng.randrange(entities)) for _ in range(batch)] for _ in range(reads)]

    async def reader(mine: list[list[str]]) -> None:
        for keys in mine:
            await backend.read([(group, keys)])

    started = time.perf_counter()
    await asyncio.gather(*(reader(batches[i::CONCURRENCY]) for i in range(CONCURRENCY)))
    return reads / (time.perf_counter() - started)


CONCURRENCY = 16


def open_backend(url: str, cluster: bool, prefix: str) -> tuple[Backend, Group]:
    registry = parse_registry(REGISTRY.format(url=url, cluster=str(cluster).lower(), prefix=prefix))
    spec = registry.backends["hot"]
    groups = registry.groups_on("hot")
    backend = RedisClusterBackend(spec, groups) if cluster else RedisBackend(spec, groups)
    return backend, groups[0]


def per_master(cluster: RedisClusterProcesses, prefix: str) -> list[int]:
    counts = []
    for port in cluster.ports:
        client = SyncRedis(port=port)
        counts.append(sum(1 for _ in client.scan_iter(match=f"{prefix}*", count=1000)))
        client.close()
    return counts


def row(label: str, samples: list[float], rate: float, counts: list[int] | None) -> str:
    q = statistics.quantiles(samples, n=100)
    spread = ""
    if counts:
        spread = f"{max(counts) / sum(counts):6.1%}  " + "/".join(f"{c / sum(counts):.0%}" for c in counts)
    return f"{label:>20} {statistics.fmean(samples):6.3f} {q[49]:6.3f} {q[98]:6.3f} {rate:8.0f}   {spread}"


def label_spread(buckets: list[int], masters: tuple[int, ...] = (3, 6, 12), groups: int = 1000) -> None:
    """How evenly one group's buckets fall on masters owning equal contiguous slot ranges, computed with the
    real CRC16 for `groups` random group names: plain bucket numbers against the gateway's chosen labels."""
    rng = random.Random(1)
    names = [
        "".join(rng.choice(string.ascii_lowercase + "_") for _ in range(rng.randrange(3, 20))) for _ in range(groups)
    ]
    print(f"\nfullest master / even share over {groups} group names (mean, max); masters own equal slot ranges")
    print(f"{'buckets':>8} " + " ".join(f"{f'{m} masters plain':>18} {f'{m} masters chosen':>18}" for m in masters))
    for n in buckets:
        cells = []
        for m in masters:
            for labels in ([str(b) for b in range(n)], list(bucket_labels(n))):
                worst = []
                for name in names:
                    per = Counter(min(key_slot(f"{name}:{label}".encode()) * m // 16384, m - 1) for label in labels)
                    worst.append(max(per.values()) / n * m)
                cells.append(f"{statistics.fmean(worst):10.2f} {max(worst):7.2f}")
        print(f"{n:>8} " + " ".join(cells))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entities", type=int, default=20000)
    parser.add_argument("--reads", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--buckets", default="1,4,16,64,256,1024")
    args = parser.parse_args()
    label_spread([int(b) for b in args.buckets.split(",") if int(b) > 1])
    print()
    single = RedisProcess()
    single.start()
    cluster = RedisClusterProcesses(Path(tempfile.mkdtemp(prefix="fg-bench-")))
    cluster.start()
    try:
        print(f"{args.batch}-key batch reads of one group, {args.entities} entities, {args.reads} reads each")
        print(f"{'layout':>20} {'mean':>6} {'p50':>6} {'p99':>6} {'reads/s':>8}   fullest master, share per master")
        plain, group = open_backend(single.url, False, "bench:")
        samples = await measure(plain, group, args.entities, args.reads, args.batch)
        rate = await throughput(plain, group, args.entities, args.reads, args.batch)
        print(row("single node MGET", samples, rate, None))
        await plain.aclose()
        for n in [int(b) for b in args.buckets.split(",")]:
            prefix = f"bench{n}:"
            backend, group = open_backend(cluster.url, True, prefix)
            assert isinstance(backend, RedisClusterBackend)
            backend.buckets = n
            samples = await measure(backend, group, args.entities, args.reads, args.batch)
            rate = await throughput(backend, group, args.entities, args.reads, args.batch)
            await backend.aclose()
            print(row(f"cluster, {n} buckets", samples, rate, per_master(cluster, prefix)))
    finally:
        cluster.stop()
        single.stop()


if __name__ == "__main__":
    uvloop.run(main())

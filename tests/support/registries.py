"""Where the test servers are, per-test isolation on them (`Names`), and the registries tests serve."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_DSN = os.environ.get("TEST_PG_DSN", "postgresql://root@127.0.0.1:5432/test")
KINDS = ["redis", "redis_cluster", "cockroach", "sqlite"]
"""Every backend kind the serving contract is held to (the `kind` fixture's parameters)."""

FEATURES = """
      orders_7d: {dtype: int64, default: 0}
      avg_basket: {dtype: float64, default: 0.5}
      active: {dtype: bool, default: false}
      name: {dtype: string, default: none}
      raw: {dtype: bytes}
      embedding: {dtype: "float32[3]"}
      ids: {dtype: "int64[2]", default: [0, 0]}
"""
"""The `live` group's features, one of each dtype (YAML, indented to sit under `features:`)."""


class Names:
    """Per-test isolation: a Redis key prefix, a PostgreSQL schema and a folder for SQLite."""

    def __init__(self, tmp_path: Path):
        uid = uuid.uuid4().hex[:12]
        self.prefix = f"test:{uid}:"
        self.schema = f"t_{uid}"
        self.dir = tmp_path
        self.cluster_url: str | None = None  # set by the `redis_cluster` fixture

    def backend(self, kind: str, *, url: str | None = None, dsn: str | None = None, file: str = "db") -> str:
        if kind == "redis":
            return f'{{type: redis, url: "{url or REDIS_URL}", key_prefix: "{self.prefix}", timeout_ms: 2000}}'
        if kind == "redis_cluster":
            url = url or self.cluster_url
            assert url, "request the redis_cluster fixture (it starts the cluster) before a redis_cluster backend"
            return f'{{type: redis, cluster: true, url: "{url}", key_prefix: "{self.prefix}", timeout_ms: 2000}}'
        if kind == "cockroach":
            return f'{{type: cockroach, dsn: "{dsn or PG_DSN}", schema: {self.schema}, dialect: postgres}}'
        return f'{{type: sqlite, path: "{self.dir / (file + ".sqlite")}"}}'

    def registry(self, hot: str, bulk: str | None = None) -> str:
        """`live` and `stores` on hot; `history` on bulk (hot again when not given)."""
        return f"""
backends:
  hot: {hot}
  bulk: {bulk or hot}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
  store: {{join_key: store_id, dtype: string}}
groups:
  live:
    entity: consumer
    backend: hot
    ttl: 1h
    features:{FEATURES}
  history:
    entity: consumer
    backend: bulk
    ttl: 30d
    features:
      lifetime_orders: {{dtype: int64, default: -1}}
      lifetime_value: {{dtype: float64}}
  stores:
    entity: store
    backend: hot
    features:
      open_orders: {{dtype: int64, default: 0}}
"""


GOOD_REGISTRY = """
backends:
  hot: {type: redis, url: "${REDIS_URL:-redis://127.0.0.1:6379/0}"}
  bulk: {type: cockroach, dsn: "postgresql://root@127.0.0.1:5432/test", dialect: cockroach}
entities:
  consumer: {join_key: consumer_id, dtype: int64}
groups:
  live:
    entity: consumer
    backend: hot
    ttl: 1h
    features:
      orders_7d: {dtype: int64, default: 0}
      embedding: {dtype: "float32[4]"}
  history:
    entity: consumer
    backend: bulk
    ttl: 30d
    features:
      lifetime_orders: {dtype: int64, default: 0}
"""
"""A valid registry file as a user writes one (an env variable with a default, a cockroach dialect)."""

"""A bad registry stops start-up with the file, the path of the bad field and the reason."""

from __future__ import annotations

import pytest

from app.errors import RegistryError
from app.registry.load import parse_registry
from backends.options import url_hosts
from tests.support.registries import GOOD_REGISTRY


def test_good_registry_loads_into_frozen_objects() -> None:
    registry = parse_registry(GOOD_REGISTRY, "r.yaml", env={"REDIS_URL": "redis://cache:6380/1"})
    assert registry.backends["hot"].options["url"] == "redis://cache:6380/1"
    assert registry.backends["hot"].options["timeout_ms"] == 1000.0
    assert registry.backends["bulk"].options["dialect"] == "cockroach"
    live = registry.groups["live"]
    assert live.ttl_s == 3600
    assert [f.ref for f in live.features] == ["live:orders_7d", "live:embedding"]
    assert live.features[1].default is None
    assert registry.groups["history"].ttl_s == 30 * 86400
    assert registry.join_keys["consumer_id"].name == "consumer"
    with pytest.raises(AttributeError):
        live.ttl_s = 5  # type: ignore[misc]


def test_env_default_fills_an_unset_variable() -> None:
    registry = parse_registry(GOOD_REGISTRY, "r.yaml", env={})
    assert registry.backends["hot"].options["url"] == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("old", "new", "path", "reason"),
    [
        ("backend: hot", "backend: warm", "groups.live.backend", "unknown backend 'warm'"),
        (
            "entity: consumer\n    backend: bulk",
            "entity: driver\n    backend: bulk",
            "groups.history.entity",
            "unknown entity",
        ),
        (
            "{dtype: int64, default: 0}\n      embedding",
            "{dtype: int65, default: 0}\n      embedding",
            "groups.live.features.orders_7d.dtype",
            "unknown dtype",
        ),
        (
            "orders_7d: {dtype: int64, default: 0}",
            "orders_7d: {dtype: int64, default: zero}",
            "groups.live.features.orders_7d.default",
            "default does not fit int64",
        ),
        (
            'embedding: {dtype: "float32[4]"}',
            'embedding: {dtype: "float32[4]", default: [1, 2]}',
            "groups.live.features.embedding.default",
            "expected 4 items",
        ),
        ("ttl: 1h", "ttl: 1 hour", "groups.live.ttl", "not a duration"),
        ("ttl: 30d", "ttl: -5", "groups.history.ttl", "positive"),
        (
            'url: "${REDIS_URL:-redis://127.0.0.1:6379/0}"',
            'url: "http://127.0.0.1:6379"',
            "backends.hot.url",
            "scheme must be",
        ),
        ('dsn: "postgresql://root@127.0.0.1:5432/test"', 'dsn: "postgresql://"', "backends.bulk.dsn", "no host"),
        ("dialect: cockroach", "dialect: mysql", "backends.bulk.dialect", "expected one of"),
        ("type: redis", "type: memcached", "backends.hot.type", "unknown backend type"),
        ("type: redis,", "type: redis, colour: red,", "backends.hot.colour", "unknown field"),
        ("      embedding:", "      orders_7d: {dtype: int64}\n      embedding:", "line ", "duplicate key 'orders_7d'"),
        (
            'url: "${REDIS_URL:-redis://127.0.0.1:6379/0}"',
            'url: "${REDIS_URL}"',
            "backends.hot.url",
            "REDIS_URL is not set",
        ),
    ],
)
def test_bad_registry_names_file_path_and_reason(old: str, new: str, path: str, reason: str) -> None:
    assert old in GOOD_REGISTRY
    with pytest.raises(RegistryError) as caught:
        parse_registry(GOOD_REGISTRY.replace(old, new, 1), "registry.yaml", env={})
    message = str(caught.value)
    assert message.startswith("registry.yaml: ")
    assert path in message
    assert reason in message


def test_the_same_join_key_for_two_entities_is_refused() -> None:
    text = GOOD_REGISTRY.replace("entities:\n", "entities:\n  other: {join_key: consumer_id, dtype: string}\n")
    with pytest.raises(RegistryError, match="entities.consumer.join_key"):
        parse_registry(text, "r.yaml", env={})


@pytest.mark.parametrize(
    ("hot", "path", "reason"),
    [
        ('{type: redis, url: "redis://a:7000,b:7001"}', "backends.hot.url", "add cluster: true"),
        ('{type: redis, cluster: "true", url: "redis://a:7000"}', "backends.hot.cluster", "expected true or false"),
        ('{type: redis, cluster: true, url: "unix:///run/redis.sock"}', "backends.hot.url", "not a unix socket"),
        ('{type: redis, cluster: true, url: "redis://a:7000/2"}', "backends.hot.url", "only database 0, not 2"),
        ('{type: redis, cluster: true, url: "redis://a:7000?db=1"}', "backends.hot.url", "only database 0, not 1"),
        ('{type: redis, cluster: true, url: "redis://a:7000,b:x"}', "backends.hot.url", "'b:x' is not a host or"),
        ('{type: redis, cluster: true, url: "redis://a:7000,"}', "backends.hot.url", "'' is not a host or"),
        ('{type: redis, url: "redis://a:99999"}', "backends.hot.url", "'a:99999' is not a host or"),
        (
            '{type: redis, cluster: true, url: "redis://a:7000", key_prefix: "fg:{x}:"}',
            "backends.hot.key_prefix",
            "hash tag",
        ),
    ],
)
def test_bad_redis_cluster_options_are_named(hot: str, path: str, reason: str) -> None:
    text = GOOD_REGISTRY.replace('{type: redis, url: "${REDIS_URL:-redis://127.0.0.1:6379/0}"}', hot, 1)
    with pytest.raises(RegistryError) as caught:
        parse_registry(text, "registry.yaml", env={})
    assert f"registry.yaml: {path}: " in str(caught.value)
    assert reason in str(caught.value)


def test_cluster_seed_lists_and_multi_host_dsns_load() -> None:
    text = GOOD_REGISTRY.replace(
        '{type: redis, url: "${REDIS_URL:-redis://127.0.0.1:6379/0}"}',
        '{type: redis, cluster: true, url: "rediss://gw:s3cret@r1:7000,r2:7001,[::1]:7002/0"}',
    ).replace(
        '"postgresql://root@127.0.0.1:5432/test"', '"postgresql://root@crdb1:26257,crdb2,10.0.0.3:26257/defaultdb"'
    )
    registry = parse_registry(text, "r.yaml", env={})
    assert registry.backends["hot"].options["cluster"] is True
    assert url_hosts(registry.backends["hot"].options["url"]) == [("r1", 7000), ("r2", 7001), ("::1", 7002)]
    assert url_hosts(registry.backends["bulk"].options["dsn"]) == [
        ("crdb1", 26257),
        ("crdb2", None),
        ("10.0.0.3", 26257),
    ]
    described = registry.describe()["backends"]["hot"]
    assert described["url"] == "rediss://gw:***@r1:7000,r2:7001,[::1]:7002/0"
    assert described["cluster"] is True
    plain = parse_registry(GOOD_REGISTRY, "r.yaml", env={})
    assert plain.backends["hot"].options["cluster"] is False

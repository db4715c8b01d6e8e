"""Reloading the registry and API keys without a restart (issue 14 part 2): SIGHUP and POST /v1/admin/reload, on
real gateway processes and in-process apps over the machine's Redis and redis-servers of the test's own."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis as SyncRedis

from app.auth import key_entry, new_token
from tests.support.clients import fetch
from tests.support.gateways import GatewayFactory, GatewayProcess, file_gateway, worker_pids
from tests.support.registries import Names
from tests.support.servers import RedisProcess, unread_bytes
from tests.support.waiting import eventually, wait_until


def registry_yaml(backends: dict[str, str], groups: dict[str, str]) -> str:
    """Groups (name -> backend) of one int64 feature, `orders` (default -1), of the `consumer` entity."""
    lines = ["backends:", *(f"  {name}: {spec}" for name, spec in backends.items())]
    lines += ["entities:", "  consumer: {join_key: consumer_id, dtype: int64}", "groups:"]
    for name, backend in groups.items():
        lines += [f"  {name}:", "    entity: consumer", f"    backend: {backend}", "    features:"]
        lines += ["      orders: {dtype: int64, default: -1}"]
    return "\n".join(lines) + "\n"


def redis_spec(names: Names, url: str, timeout_ms: int = 2000) -> str:
    return f'{{type: redis, url: "{url}", key_prefix: "{names.prefix}", timeout_ms: {timeout_ms}}}'


def row(consumer: int, orders: int) -> dict[str, Any]:
    return {"consumer_id": consumer, "orders": orders}


def statuses(answer: dict[str, Any]) -> list[tuple[Any, str]]:
    return [(r["values"][0], r["statuses"][0]) for r in answer["rows"]]


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    server = RedisProcess()
    server.start()
    try:
        yield server
    finally:
        server.thaw()  # a test that failed while it was frozen
        server.stop()


def gateway_process(registry: Path, tmp_path: Path, *args: str) -> GatewayProcess:
    env = dict(os.environ)
    env.pop("GATEWAY_METRICS_DIR", None)
    return GatewayProcess(registry, tmp_path / "gateway.log", *args, env=env)


def fetch_over_new_connections(url: str, features: list[str], times: int) -> list[int]:
    """`times` fetches, each on a connection of its own (so the kernel hands them to any worker); the statuses."""
    codes = []
    for consumer in range(times):
        body = {"entities": {"consumer_id": [consumer]}, "features": features}
        with httpx.Client(base_url=url, timeout=30) as client:
            codes.append(client.post("/v1/features/fetch", json=body).status_code)
    return codes


# -- every worker, in place ------------------------------------------------------------------------------------


def test_sighup_and_post_reload_every_worker_in_place(names: Names, tmp_path: Path) -> None:
    """SIGHUP to a `--workers 2` supervisor has each worker (the same processes) serve the new group; a POST on one
    worker has the supervisor tell the other."""
    path = tmp_path / "registry.yaml"
    hot = names.backend("redis")
    path.write_text(registry_yaml({"hot": hot}, {"live": "hot"}))
    gateway = gateway_process(path, tmp_path, "--workers", "2")
    gateway.start(ready_within=60)
    try:
        assert gateway.proc is not None
        supervisor = gateway.proc.pid
        wait_until(lambda: len(worker_pids(supervisor)) == 2, what="two workers")
        # Both have read the first registry before it changes: the kernel may hand every fetch below to one of them,
        # and a worker still starting would read the second one as its first (and find nothing to reload)
        started = "Application startup complete."
        wait_until(lambda: gateway.log().count(started) == 2, within=60, what="both workers started")
        workers = worker_pids(supervisor)
        assert fetch_over_new_connections(gateway.url, ["extra:orders"], 4) == [422] * 4  # not yet a group

        path.write_text(registry_yaml({"hot": hot}, {"live": "hot", "extra": "hot"}))
        gateway.signal(signal.SIGHUP)
        for pid in workers:  # each worker says so itself
            line = rf"SIGHUP: worker {pid}: registry \S+ reloaded as generation 2 .*groups added extra"
            wait_until(lambda line=line: re.search(line, gateway.log()), within=30, what=f"worker reload: {line}")
        assert fetch_over_new_connections(gateway.url, ["extra:orders"], 20) == [200] * 20
        assert worker_pids(supervisor) == workers, "a worker was restarted"
        assert gateway.running()

        path.write_text(registry_yaml({"hot": hot}, {"live": "hot", "extra": "hot", "more": "hot"}))
        answer = httpx.post(f"{gateway.url}/v1/admin/reload", timeout=30)
        assert answer.status_code == 200, answer.text
        report = answer.json()
        assert report["groups"]["added"] == ["more"]
        assert report["backends"] == {"opened": [], "retired": [], "kept": ["hot"]}
        assert report["other_workers"]["told"] is True, report
        assert report["worker"] in workers
        for pid in workers:  # the one that answered by the POST, the other by the forwarded SIGHUP
            line = rf"worker {pid}: registry \S+ reloaded as generation 3 .*groups added more"
            wait_until(lambda line=line: re.search(line, gateway.log()), within=30, what=f"worker reload: {line}")
        assert fetch_over_new_connections(gateway.url, ["more:orders"], 20) == [200] * 20
        assert worker_pids(supervisor) == workers, "a worker was restarted"
    finally:
        gateway.stop()


def test_a_single_worker_reloads_on_sighup_rather_than_dying(names: Names, tmp_path: Path) -> None:
    """uvicorn alone handles only SIGINT and SIGTERM: SIGHUP's default action would end the process."""
    path = tmp_path / "registry.yaml"
    hot = names.backend("redis")
    path.write_text(registry_yaml({"hot": hot}, {"live": "hot"}))
    gateway = gateway_process(path, tmp_path)
    gateway.start(ready_within=60)
    try:
        path.write_text(registry_yaml({"hot": hot}, {"live": "hot", "extra": "hot"}))
        gateway.signal(signal.SIGHUP)
        wait_until(lambda: "reloaded as generation 2" in gateway.log(), within=30, what="the reload")
        assert gateway.running()
        assert fetch_over_new_connections(gateway.url, ["extra:orders"], 3) == [200] * 3

        path.write_text("groups: [")  # invalid: logged, and the process serves on
        gateway.signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in gateway.log(), within=30, what="the refusal")
        assert str(path) in gateway.log().split("reload refused", 1)[1]
        assert fetch_over_new_connections(gateway.url, ["extra:orders"], 3) == [200] * 3
    finally:
        gateway.stop()


# -- invalid files, keys, scopes -------------------------------------------------------------------------------


async def test_an_invalid_registry_changes_nothing_and_is_named(
    names: Names, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app")
    path = tmp_path / "registry.yaml"
    hot = names.backend("redis")
    path.write_text(registry_yaml({"hot": hot}, {"live": "hot"}))
    async with file_gateway(path) as client:
        await client.post("/v1/features/write", json={"group": "live", "rows": [row(1, 5)]})
        path.write_text(registry_yaml({"hot": hot}, {"live": "hot", "extra": "nowhere"}))

        answer = await client.post("/v1/admin/reload")
        assert answer.status_code == 422
        assert answer.headers["content-type"] == "application/problem+json"
        problem = answer.json()
        assert problem["type"].endswith("/invalid-registry")
        assert problem["file"] == str(path)
        assert problem["field"] == "groups.extra.backend"
        assert problem["generation"] == 1
        assert str(path) in problem["detail"]
        assert "nowhere" in problem["detail"]
        refusals = [r.getMessage() for r in caplog.records if "reload refused" in r.getMessage()]
        assert len(refusals) == 1
        assert str(path) in refusals[0]
        assert "groups.extra.backend" in refusals[0]

        # The old registry serves on
        assert statuses(await fetch(client, entities={"consumer_id": [1]}, features=["live:orders"])) == [
            (5, "PRESENT")
        ]
        unknown = await client.post(
            "/v1/features/fetch", json={"entities": {"consumer_id": [1]}, "features": ["extra:orders"]}
        )
        assert unknown.status_code == 422


async def test_keys_are_reloaded_with_the_registry(names: Names, tmp_path: Path) -> None:
    """An added key works after the reload, a removed one is refused, a read key may not reload, and an invalid
    key file is an invalid reload: nothing changes."""
    tokens = {name: new_token() for name in ("admin", "reader", "newcomer")}
    entries = {
        "admin": key_entry("admin", tokens["admin"], ["admin"]),
        "reader": key_entry("reader", tokens["reader"], ["read"]),
        "newcomer": key_entry("newcomer", tokens["newcomer"], ["read"]),
    }
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([entries["admin"], entries["reader"]]))
    path = tmp_path / "registry.yaml"
    path.write_text(registry_yaml({"hot": names.backend("redis")}, {"live": "hot"}))
    body = {"entities": {"consumer_id": [1]}, "features": ["live:orders"]}

    def as_(name: str) -> dict[str, str]:
        return {"authorization": f"Bearer {tokens[name]}"}

    async with file_gateway(path, api_keys_file=keys) as client:
        assert (await client.post("/v1/features/fetch", json=body, headers=as_("reader"))).status_code == 200
        assert (await client.post("/v1/features/fetch", json=body, headers=as_("newcomer"))).status_code == 401
        refused = await client.post("/v1/admin/reload", headers=as_("reader"))
        assert refused.status_code == 403
        assert refused.headers["content-type"] == "application/problem+json"

        keys.write_text(json.dumps([entries["admin"], entries["newcomer"]]))
        answer = await client.post("/v1/admin/reload", headers=as_("admin"))
        assert answer.status_code == 200, answer.text
        assert answer.json()["keys"] == 2
        assert answer.json()["changed"] is False  # the registry is as it was; only the keys moved
        assert (await client.post("/v1/features/fetch", json=body, headers=as_("newcomer"))).status_code == 200
        assert (await client.post("/v1/features/fetch", json=body, headers=as_("reader"))).status_code == 401

        broken = {**entries["reader"], "sha256": tokens["reader"]}  # the token pasted where its hash belongs
        keys.write_text(json.dumps([entries["admin"], entries["newcomer"], broken]))
        invalid = await client.post("/v1/admin/reload", headers=as_("admin"))
        assert invalid.status_code == 422
        problem = invalid.json()
        assert problem["type"].endswith("/invalid-key-config")
        assert problem["file"] == str(keys)
        assert problem["field"] == "[2].sha256"
        assert tokens["reader"] not in invalid.text  # never quoted back
        assert (await client.post("/v1/features/fetch", json=body, headers=as_("newcomer"))).status_code == 200
        assert (await client.post("/v1/features/fetch", json=body, headers=as_("reader"))).status_code == 401


def test_reload_is_in_the_openapi_spec_for_admin_keys() -> None:
    from app.main import create_app
    from app.settings import Settings

    spec = create_app(Settings(admission=False, freeze_heap=False)).openapi()
    operation = spec["paths"]["/v1/admin/reload"]["post"]
    assert operation["security"] == [{"bearerAuth": ["admin"]}]
    assert {"200", "401", "403", "422"} <= set(operation["responses"])


# -- in-flight requests and backends ---------------------------------------------------------------------------


async def test_a_fetch_in_flight_finishes_on_its_registry_and_its_backend_closes_after(
    names: Names, tmp_path: Path, own_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """A fetch waiting on a frozen backend when a reload moves its group to another backend and removes that one:
    it answers the old registry's value once the backend thaws, while new fetches are served by the new registry;
    the removed backend's connections are closed only after that fetch has finished."""
    caplog.set_level(logging.INFO, logger="app")
    path = tmp_path / "registry.yaml"
    hot = names.backend("redis")
    slow = redis_spec(names, own_redis.url, timeout_ms=60_000)  # the fetch's deadline decides, not the client's
    path.write_text(registry_yaml({"hot": hot, "slow": slow}, {"live": "slow", "other": "hot"}))
    async with file_gateway(path, max_deadline_ms=60_000) as client:
        await client.post("/v1/features/write", json={"group": "live", "rows": [row(7, 42)]})
        body = {"entities": {"consumer_id": [7]}, "features": ["live:orders"], "deadline_ms": 50_000}
        assert statuses(await fetch(client, **body)) == [(42, "PRESENT")]  # and the read connection is open
        connections = len(unread_bytes(own_redis.port))
        assert connections > 0

        own_redis.freeze()
        in_flight = asyncio.create_task(client.post("/v1/features/fetch", json=body))

        async def waiting_at_redis() -> bool:  # its MGET sits unread in the frozen server's socket
            return any(unread_bytes(own_redis.port))

        await eventually(waiting_at_redis, within=20)

        path.write_text(registry_yaml({"hot": hot}, {"live": "hot", "other": "hot"}))
        answer = await client.post("/v1/admin/reload")
        assert answer.status_code == 200, answer.text
        report = answer.json()
        assert report["groups"]["changed"] == ["live"]
        assert report["backends"] == {"opened": [], "retired": ["slow"], "kept": ["hot"]}

        # New fetches are on the new registry: live is on hot now, where consumer 7 has nothing
        assert statuses(await fetch(client, **body)) == [(-1, "MISSING")]
        assert not in_flight.done()
        assert len(unread_bytes(own_redis.port)) == connections, "a connection of the retired backend was closed"
        assert not any("closed backend slow" in r.getMessage() for r in caplog.records)

        own_redis.thaw()
        done = await asyncio.wait_for(in_flight, timeout=40)  # well inside its 50 s deadline
        assert done.status_code == 200, done.text
        assert statuses(done.json()) == [(42, "PRESENT")]
        assert done.json()["backends"]["slow"]["status"] == "ok"

        async def closed() -> bool:
            return any("closed backend slow of registry generation 1" in r.getMessage() for r in caplog.records)

        await eventually(closed, within=20)

        async def disconnected() -> bool:
            return not unread_bytes(own_redis.port)

        await eventually(disconnected, within=20)


async def test_unchanged_backends_keep_their_client_and_connections(
    names: Names, tmp_path: Path, own_redis: RedisProcess
) -> None:
    path = tmp_path / "registry.yaml"
    own = redis_spec(names, own_redis.url)
    path.write_text(registry_yaml({"own": own, "gone": names.backend("sqlite")}, {"live": "own", "other": "gone"}))
    observer = SyncRedis(port=own_redis.port, socket_timeout=5, decode_responses=True)
    try:
        async with file_gateway(path) as client:
            gateway = client.app.state.gateway  # type: ignore[attr-defined]
            await client.post("/v1/features/write", json={"group": "live", "rows": [row(3, 9)]})
            assert statuses(await fetch(client, entities={"consumer_id": [3]}, features=["live:orders"])) == [
                (9, "PRESENT")
            ]
            client_before, circuits_before = gateway.backends["own"], gateway.breakers["own"]
            gone_before = gateway.backends["gone"]
            accepted = int(observer.info("stats")["total_connections_received"])

            fresh = names.backend("sqlite", file="fresh")
            path.write_text(
                registry_yaml({"own": own, "fresh": fresh}, {"live": "own", "extra": "own", "other": "fresh"})
            )
            answer = await client.post("/v1/admin/reload")
            assert answer.status_code == 200, answer.text
            assert answer.json()["backends"] == {"opened": ["fresh"], "retired": ["gone"], "kept": ["own"]}
            assert answer.json()["groups"] == {"added": ["extra"], "removed": [], "changed": ["other"]}

            answer = await fetch(client, entities={"consumer_id": [3]}, features=["live:orders", "extra:orders"])
            assert [r["statuses"] for r in answer["rows"]] == [["PRESENT", "MISSING"]]
            await client.post("/v1/features/write", json={"group": "extra", "rows": [row(3, 1)]})
            assert gateway.backends["own"] is client_before
            assert gateway.breakers["own"] is circuits_before
            assert gateway.backends["fresh"] is not gone_before
            assert gateway.migrated["fresh"] is True  # migrated before the swap: its first request found its table
            assert int(observer.info("stats")["total_connections_received"]) == accepted, "reconnected"

            # Usage per feature goes on across the reload, for the groups it kept and the one it added
            usage = (await client.get("/v1/usage")).json()["groups"]
            assert usage["live"]["features"]["orders"]["requests"] == 2
            assert usage["extra"]["features"]["orders"]["requests"] == 1

            # The new backend serves its group from the first request on
            await client.post("/v1/features/write", json={"group": "other", "rows": [row(3, 2)]})
            assert statuses(await fetch(client, entities={"consumer_id": [3]}, features=["other:orders"])) == [
                (2, "PRESENT")
            ]
    finally:
        observer.close()


async def test_a_registry_handed_to_the_app_is_not_replaced_by_a_file(gateway: GatewayFactory, names: Names) -> None:
    """An app made with a registry object (tests, embedding) has no file to reread: a reload refuses, and never
    falls back on the demo registry."""
    async with gateway(registry_yaml({"hot": names.backend("redis")}, {"live": "hot"})) as client:
        answer = await client.post("/v1/admin/reload")
        assert answer.status_code == 422
        assert answer.json()["field"] == "(file)"
        registry = (await client.get("/v1/registry")).json()
        assert list(registry["groups"]) == ["live"]

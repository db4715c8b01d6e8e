"""Moving a group between backends (issue 14): the registry edits, the steps, resuming, and the move under load
against a real gateway process that fetches and writes throughout."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from app.errors import RegistryError
from app.registry.edit import set_group_fields
from app.registry.load import load_registry
from app.serving.gateway import Gateway
from app.serving.write import encode_rows, store
from app.tiering.move import Move, MoveError
from backends import open_backend
from tests.support.registries import REDIS_URL, Names

REGISTRY = """\
# the demo of a move
backends:
  old: {old}
  new: {new}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
groups:
  history:            # moved around
    entity: consumer
    backend: old      # where it lives now
    ttl: 30d
    features:
      orders: {{dtype: int64, default: -1}}
      basket: {{dtype: float64, default: 0.0}}

  other:
    entity: consumer
    backend: old
    features:
      x: {{dtype: int64}}
"""


def test_editing_a_group_keeps_the_rest_of_the_file() -> None:
    text = REGISTRY.format(old="{type: sqlite, path: a}", new="{type: sqlite, path: b}")
    edited = set_group_fields(text, "history", {"moving_to": "new"})
    assert edited.replace("    moving_to: new\n", "", 1) == text
    assert "    backend: old      # where it lives now\n    moving_to: new\n" in edited
    cut = set_group_fields(edited, "history", {"backend": "new", "moving_to": None, "moving_from": "old"})
    assert "    backend: new\n    moving_from: old\n    ttl: 30d\n" in cut
    assert "moving_to" not in cut
    assert "  other:\n    entity: consumer\n    backend: old\n" in cut  # the other group untouched
    with pytest.raises(RegistryError, match="flow style"):
        set_group_fields("groups:\n  history: {entity: consumer, backend: old}\n", "history", {"backend": "x"})
    with pytest.raises(RegistryError, match="not found"):
        set_group_fields(text, "nope", {"backend": "x"})


def rows(ids: range, orders: int, at: str) -> list[dict[str, Any]]:
    return [{"consumer_id": i, "event_timestamp": at, "orders": orders + i, "basket": 0.5} for i in ids]


async def write_rows(path: Path, body: list[dict[str, Any]], group: str = "history") -> None:
    registry = load_registry(path, {})
    opened = {name: open_backend(spec, registry) for name, spec in registry.backends.items()}
    gw = Gateway(registry, opened)
    try:
        await gw.start()
        encoded, _ = encode_rows(registry.groups[group], body, gw.limits)
        await store(gw, registry.groups[group], encoded)
    finally:
        await gw.aclose()


async def read_all(path: Path, backend: str, ids: list[str]) -> list[bytes | None]:
    registry = load_registry(path, {})
    opened = open_backend(registry.backends[backend], registry)
    try:
        [blobs] = await opened.read([(registry.groups["history"], ids)])
    finally:
        await opened.aclose()
    return blobs


@pytest.mark.parametrize(("old", "new"), [("sqlite", "redis"), ("redis", "cockroach"), ("cockroach", "sqlite")])
async def test_an_offline_move_copies_verifies_cuts_over_and_deletes(
    tmp_path: Path, names: Names, old: str, new: str
) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(REGISTRY.format(old=names.backend(old, file="old"), new=names.backend(new, file="new")))
    await write_rows(path, rows(range(1, 2501), 100, "2026-11-30T10:00:00Z"))
    reloads: list[str] = []

    async def reload() -> None:
        reloads.append(path.read_text())

    move = Move(path, "history", "new", env={}, reload=reload, settle_s=0, delete_old=True, batch=300)
    state = await move.run()
    assert (state.copied, state.checked, state.repaired, state.deleted) == (2500, 2500, 0, 2500)
    assert len(reloads) == 3
    assert "moving_to: new" in reloads[0]
    assert "backend: new\n    moving_from: old" in reloads[1]
    registry = load_registry(path, {})
    history = registry.groups["history"]
    assert (history.backend, history.moving_to, history.moving_from) == ("new", None, None)
    assert registry.groups["other"].backend == "old"
    ids = [str(i) for i in range(1, 2501)]
    assert all(b is not None for b in await read_all(path, "new", ids))
    assert all(b is None for b in await read_all(path, "old", ids))
    assert not move.state_path.exists()


async def test_a_move_that_stopped_resumes_where_it_was(tmp_path: Path, names: Names) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(REGISTRY.format(old=names.backend("sqlite", file="old"), new=names.backend("redis")))
    await write_rows(path, rows(range(1, 1001), 100, "2026-11-30T10:00:00Z"))
    calls = 0

    async def failing_second_reload() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise MoveError("gateway unreachable")

    move = Move(path, "history", "new", env={}, reload=failing_second_reload, settle_s=0, batch=200)
    with pytest.raises(MoveError, match="unreachable"):
        await move.run()
    saved = json.loads(move.state_path.read_text())
    assert saved["phase"] == "cutover"
    assert saved["copied"] == 1000
    # Cut over in the file already (the reload failed after it was written): running again finishes it
    state = await Move(path, "history", "new", env={}, reload=failing_second_reload, settle_s=0).run()
    assert state.phase == "done"
    assert state.copied == 1000  # not copied twice
    assert load_registry(path, {}).groups["history"].backend == "new"
    assert load_registry(path, {}).groups["history"].moving_from is None


async def test_verify_copies_again_what_the_new_copy_lacks(tmp_path: Path, names: Names) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(REGISTRY.format(old=names.backend("sqlite", file="old"), new=names.backend("redis")))
    await write_rows(path, rows(range(1, 501), 100, "2026-11-30T10:00:00Z"))
    move = Move(path, "history", "new", env={}, reload=_nothing, settle_s=0, batch=100)
    backfill = move._backfill

    async def backfill_then_lose_rows(state: Any) -> None:
        await backfill(state)
        registry = load_registry(path, {})
        # A row of the old copy written after its page was copied, and one lost on the new side
        await write_rows(path, rows(range(7, 8), 900, "2026-11-30T11:00:00Z"))
        new = open_backend(registry.backends["new"], registry)
        try:
            await new.delete(registry.groups["history"], ["42"])  # type: ignore[attr-defined]
        finally:
            await new.aclose()

    move._backfill = backfill_then_lose_rows  # type: ignore[method-assign]
    state = await move.run()
    assert state.repaired == 1  # 42; 7 reached both copies (the registry was moving_to by then)
    blobs = await read_all(path, "new", ["7", "42"])
    assert all(b is not None for b in blobs)


async def _nothing() -> None:
    await asyncio.sleep(0)


def test_a_cluster_or_aggregation_group_is_refused(tmp_path: Path, names: Names) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(REGISTRY.format(old=names.backend("sqlite"), new=names.backend("redis", url=REDIS_URL)))
    with pytest.raises(MoveError, match="unknown backend"):
        asyncio.run(Move(path, "history", "nope", env={}, reload=_nothing, settle_s=0).run())
    with pytest.raises(MoveError, match="already lives"):
        asyncio.run(Move(path, "history", "old", env={}, reload=_nothing, settle_s=0).run())


async def test_a_move_under_load_loses_nothing_and_serves_nothing_older(tmp_path: Path, names: Names) -> None:
    """A real gateway (2 workers) serves a client that fetches and writes throughout a move from Redis to
    PostgreSQL: no error, no MISSING for a key that exists, no value older than one already confirmed."""
    import os
    import random
    import sys
    import time

    import httpx

    from tests.support.gateways import GatewayProcess

    path = tmp_path / "registry.yaml"
    path.write_text(REGISTRY.format(old=names.backend("redis"), new=names.backend("cockroach")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    gateway = GatewayProcess(path, tmp_path / "gateway.log", "--workers", "2", env=env)
    gateway.start()
    keys = 3000
    confirmed: dict[int, int] = {}  # key -> the highest `orders` a confirmed write gave it
    counts = {"writes": 0, "fetches": 0, "values": 0, "errors": 0, "missing": 0, "older": 0}
    problems: list[str] = []
    stop = asyncio.Event()
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            for start in range(1, keys + 1, 500):
                batch = rows(range(start, start + 500), 0, "2026-11-30T10:00:00Z")
                assert (await client.post("/v1/features/write", json={"group": "history", "rows": batch})).is_success
            confirmed.update({i: i for i in range(1, keys + 1)})
            sequence = iter(range(10**6, 10**9))

            async def writer(parity: int) -> None:
                # Each key written by one writer, one write at a time: a later write has a later event time
                while not stop.is_set():
                    key = random.randrange(1 + parity, keys + 1, 2)
                    orders = next(sequence)
                    row = {"consumer_id": key, "orders": orders, "basket": 1.0}  # event time: now
                    response = await client.post("/v1/features/write", json={"group": "history", "rows": [row]})
                    counts["writes"] += 1
                    if response.status_code != 200:
                        counts["errors"] += 1
                        problems.append(f"write {response.status_code}: {response.text[:200]}")
                        continue
                    confirmed[key] = max(confirmed[key], orders)

            async def reader() -> None:
                while not stop.is_set():
                    ids = random.sample(range(1, keys + 1), 20)
                    expected = {i: confirmed[i] for i in ids}  # confirmed before this fetch was sent
                    response = await client.post(
                        "/v1/features/fetch", json={"entities": {"consumer_id": ids}, "features": ["history:orders"]}
                    )
                    counts["fetches"] += 1
                    if response.status_code != 200:
                        counts["errors"] += 1
                        problems.append(f"fetch {response.status_code}: {response.text[:200]}")
                        continue
                    for key, row in zip(ids, response.json()["rows"], strict=True):
                        counts["values"] += 1
                        if row["statuses"][0] != "PRESENT":
                            counts["missing"] += 1
                            problems.append(f"{key}: {row['statuses'][0]}")
                        elif row["values"][0] < expected[key]:
                            counts["older"] += 1
                            problems.append(f"{key}: {row['values'][0]} < {expected[key]}")

            load = [asyncio.create_task(writer(0)), asyncio.create_task(writer(1))]
            load += [asyncio.create_task(reader()), asyncio.create_task(reader())]
            started = time.monotonic()
            move = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "app", "move", "history", "--to", "new", "--registry", str(path),
                "--gateway", gateway.url, "--settle", "1", "--delete-old", "--batch", "500", "--no-progress",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
            )  # fmt: skip
            output, _ = await asyncio.wait_for(move.communicate(), timeout=180)
            moved_s = time.monotonic() - started
            await asyncio.sleep(1)  # and on, after the move
            stop.set()
            await asyncio.gather(*load)
        print(f"move of {keys} rows under load: {moved_s:.1f}s, {counts}")
        assert move.returncode == 0, output.decode()
        assert counts["errors"] == counts["missing"] == counts["older"] == 0, problems[:10]
        assert counts["writes"] > 50
        assert counts["fetches"] > 50
        history = load_registry(path, {}).groups["history"]
        assert (history.backend, history.moving_to, history.moving_from) == ("new", None, None)
        assert all(b is None for b in await read_all(path, "old", [str(i) for i in range(1, keys + 1)]))
        assert b"moved history from old to new" in output
    finally:
        gateway.stop()

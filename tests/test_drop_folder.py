"""The drop folder: a real `feature-gateway materialize --watch` process on a local folder, loading into the real
PostgreSQL; files dropped complete, one still being written, a SIGKILL mid-file and the restart after it."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.loading.watch import manifest_path
from tests.support.frames import BAD_EMBEDDING, fetch_all, live_value, served
from tests.support.gateways import GatewayFactory
from tests.support.registries import Names

pytestmark = pytest.mark.timeout(180)


def jsonl(rows: range) -> bytes:
    out = []
    for i in rows:
        row = live_value(i)
        row["event_timestamp"] = row["event_timestamp"].isoformat().replace("+00:00", "Z")
        row["raw"] = base64.b64encode(row["raw"]).decode()
        out.append(msgspec.json.encode(row) + b"\n")
    return b"".join(out)


def parquet_bytes(rows: range, tmp: Path) -> bytes:
    table = pa.Table.from_pylist([live_value(i) for i in rows])
    pq.write_table(table, tmp, row_group_size=100)
    return tmp.read_bytes()


class WatchProcess:
    def __init__(self, names: Names, folder: Path, *args: str, metrics_dir: Path | None = None):
        self.registry = names.dir / "registry.yaml"
        self.registry.write_text(names.registry(names.backend("cockroach")))
        self.folder = folder
        self.log_path = names.dir / f"watch-{time.monotonic_ns()}.log"
        self.log: IO[bytes] = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "materialize", "--watch", str(folder), "--group", "live"]
            + ["--registry", str(self.registry), "--poll", "0.2", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GATEWAY_METRICS_DIR": str(metrics_dir)} if metrics_dir else None,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def manifest(self) -> dict[str, Any]:
        try:
            files = msgspec.json.decode(manifest_path(self.folder, "live").read_bytes())["files"]
        except FileNotFoundError:
            return {}
        return {f["name"]: f for f in files}

    def wait_for(self, names: set[str], within: float = 90.0) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            manifest = self.manifest()
            if names <= set(manifest):
                return manifest
            time.sleep(0.05)
        raise AssertionError(f"{names - set(self.manifest())} not loaded within {within} s:\n{self.output()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self.log.close()
        return code


@pytest.fixture
def folder(names: Names) -> Path:
    path = names.dir / "drop"
    path.mkdir()
    return path


def read_back(
    gateway: GatewayFactory, registry: Path, count: int, **settings: Any
) -> tuple[list[list[Any]], dict[str, Any]]:
    """Every value of consumers 1..count as the gateway serves them, and its /v1/usage after that."""

    text = registry.read_text()

    async def read() -> tuple[list[list[Any]], dict[str, Any]]:
        async with gateway(text, **settings) as client:
            got = await fetch_all(client, list(range(1, count + 1)), ["live:*"])
            usage = (await client.get("/v1/usage")).json()
        return [r["values"] for r in got], usage

    return asyncio.run(read())


def test_three_files_load_once_and_a_half_written_one_waits_until_complete(
    gateway: GatewayFactory, names: Names, folder: Path
) -> None:
    (folder / "a.jsonl").write_bytes(jsonl(range(0, 300)))
    (folder / "b.parquet").write_bytes(parquet_bytes(range(300, 700), names.dir / "b.tmp"))
    (folder / "c.jsonl").write_bytes(jsonl(range(700, 1000)))
    whole = parquet_bytes(range(1000, 1500), names.dir / "d.tmp")
    (folder / "d.parquet").write_bytes(whole[: len(whole) // 2])  # its writer is not done: no footer yet
    (folder / "_e.jsonl").write_bytes(jsonl(range(1500, 1600)))  # the rename convention: not yet
    (folder / "f").mkdir()  # a Spark job's output folder: not until its _SUCCESS
    for part, rows in enumerate((range(1600, 1700), range(1700, 1800))):
        (folder / "f" / f"part-{part}.parquet").write_bytes(parquet_bytes(rows, names.dir / "f.tmp"))
    shared = names.dir / "metrics"  # the gateway's GATEWAY_METRICS_DIR, where the watcher leaves its counts too
    shared.mkdir()
    watcher = WatchProcess(names, folder, "--batch-size", "64", metrics_dir=shared)
    try:
        manifest = watcher.wait_for({"a.jsonl", "b.parquet", "c.jsonl"})
        assert [(m["rows"], m["written"], m["rejected"]) for m in manifest.values()] == [
            (300, 300, 0),
            (400, 400, 0),
            (300, 300, 0),
        ]
        time.sleep(1.0)  # five more polls: d is still incomplete, so still not loaded
        assert set(watcher.manifest()) == {"a.jsonl", "b.parquet", "c.jsonl"}
        assert "d.parquet" not in watcher.output()  # waited for, not tried and failed
        with open(folder / "d.parquet", "ab") as f:
            f.write(whole[len(whole) // 2 :])
        (folder / "_e.jsonl").rename(folder / "e.jsonl")
        (folder / "f" / "_SUCCESS").touch()
        manifest = watcher.wait_for({"d.parquet", "e.jsonl", "f"})
        assert (manifest["d.parquet"]["rows"], manifest["d.parquet"]["written"]) == (500, 500)
        assert (manifest["e.jsonl"]["rows"], manifest["e.jsonl"]["written"]) == (100, 100)
        assert (manifest["f"]["rows"], manifest["f"]["written"]) == (200, 200)
        loaded_at = {name: m["loaded_at"] for name, m in manifest.items()}
        os.utime(folder / "a.jsonl")  # touched, same bytes: not loaded again
        time.sleep(1.0)
        assert {name: m["loaded_at"] for name, m in watcher.manifest().items()} == loaded_at
    finally:
        assert watcher.stop() == 0, watcher.output()
    assert watcher.output().count(" -> live: ") == 6  # one report per file
    values, usage = read_back(gateway, watcher.registry, 1800, metrics_dir=str(shared))
    assert values == [served(i) for i in range(1800)]
    # The loaded group's use, as the gateway counts it: 1,800 rows of it served, all stored (a null is MISSING)
    orders = usage["groups"]["live"]["features"]["orders_7d"]
    assert (orders["requests"], orders["statuses"]["PRESENT"]) == (2, 1800)
    # and what was loaded into it, from the watcher's counts in the shared folder
    writes = usage["groups"]["live"]["writes"]
    assert (writes["rows"], writes["skipped_stale"], writes["rejected"]) == (1800, 0, 0), writes
    assert list(writes["via"]) == ["watch"]
    assert writes["last_at"] is not None


def test_a_watcher_killed_mid_file_resumes_it_and_loads_nothing_twice(
    gateway: GatewayFactory, names: Names, folder: Path
) -> None:
    total = 20_000
    (folder / "a-small.jsonl").write_bytes(jsonl(range(0, 100)))
    (folder / "b-big.jsonl").write_bytes(jsonl(range(100, 100 + total)))
    watcher = WatchProcess(names, folder, "--batch-size", "20")
    checkpoint = folder / "_feature-gateway.live.b-big.jsonl.checkpoint.json"
    try:
        watcher.wait_for({"a-small.jsonl"})
        deadline = time.monotonic() + 60
        done = 0
        while done < 500 and time.monotonic() < deadline:
            try:
                done = msgspec.json.decode(checkpoint.read_bytes())["rows_done"]
            except (FileNotFoundError, msgspec.DecodeError):
                pass
            time.sleep(0.002)
        watcher.proc.send_signal(signal.SIGKILL)
    finally:
        code = watcher.stop()
    assert code == -signal.SIGKILL
    assert "b-big.jsonl" not in watcher.manifest(), "the big file finished before it could be killed"
    first = watcher.manifest()["a-small.jsonl"]
    again = WatchProcess(names, folder, "--batch-size", "500")
    try:
        manifest = again.wait_for({"b-big.jsonl"})
    finally:
        assert again.stop() == 0
    assert "b-big.jsonl: resuming after row" in again.output()
    big = manifest["b-big.jsonl"]
    # written again after the kill or not, every row is counted once; one has a two-number embedding
    assert (big["rows"], big["written"] + big["skipped_stale"], big["rejected"]) == (total, total - 1, 1)
    assert manifest["a-small.jsonl"] == first  # not loaded again
    assert not checkpoint.exists()
    values, _ = read_back(gateway, again.registry, 100 + total)
    assert [v for i, v in enumerate(values) if i != BAD_EMBEDDING] == [
        served(i) for i in range(100 + total) if i != BAD_EMBEDDING
    ]


def test_bad_arguments_at_scale_are_named_and_exit_2(names: Names, folder: Path) -> None:
    registry = names.dir / "registry.yaml"
    registry.write_text(names.registry(names.backend("sqlite")))
    base = [sys.executable, "-m", "app", "materialize", "--group", "live", "--registry", str(registry)]
    cases = [
        # s3:// goes through fsspec, which needs s3fs for it (not installed here)
        (["--watch", "s3://bucket/drop/", "--state", str(names.dir / "state")], "--watch s3://bucket/drop/: "),
        (["--watch", "memory://nothing/"], "not a folder"),
        (["--watch", str(folder / "nope")], "not a folder"),
        (["--watch", str(folder), str(folder / "x.parquet")], "--watch DIR takes no FILE"),
        ([str(folder / "rows.csv"), "--engine", "spark"], "--engine spark reads Parquet"),
        ([], "give the FILE or directory to load"),
    ]
    for args, message in cases:
        done = subprocess.run([*base, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr


async def test_a_crash_after_a_load_before_its_manifest_entry_does_not_load_the_file_again(
    names: Names, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window between the last stored batch and the manifest: the checkpoint outlives it, so the next run
    finds the load done (no row stored again) and records it."""
    from app.loading import watch
    from app.registry.load import parse_registry
    from app.serving.limits import Limits

    registry = parse_registry(names.registry(names.backend("cockroach")), "test-registry", env={})
    (folder / "a.jsonl").write_bytes(jsonl(range(0, 250)))

    def crash(path: Path, manifest: watch.Manifest) -> None:
        raise OSError("the machine died here")

    first = watch.Watcher(str(folder), registry, "live", limits=Limits(), batch_size=100)
    first.poll()
    assert first.poll() == ["a.jsonl"]
    with monkeypatch.context() as patched:
        patched.setattr(watch, "save_manifest", crash)
        with pytest.raises(OSError, match="the machine died here"):
            await first.load("a.jsonl")
    second = watch.Watcher(str(folder), registry, "live", limits=Limits(), batch_size=100)
    second.poll()
    assert second.poll() == ["a.jsonl"]
    report = await second.load("a.jsonl")
    assert report is not None
    assert (report.rows, report.written, report.rows_this_run, report.resumed_from) == (250, 250, 0, 250)
    assert [(f.name, f.rows, f.written) for f in second.manifest.files] == [("a.jsonl", 250, 250)]
    assert not second.checkpoint_path("a.jsonl").exists()
    second.poll()
    assert second.poll() == []  # recorded: never again

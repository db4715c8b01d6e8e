"""The drop folder: `feature-gateway materialize --watch DIR --group G` loads each new complete file once.

What "new" is: a manifest (JSON, replaced atomically after each load) records every file loaded, by name, size
and sha256 of its bytes, with its counts. A file whose name, size and checksum are in it is never loaded again;
a file dropped again under the same name with other bytes is new, and loaded.

What "complete" is: a file whose size and modification time did not change between two polls, and, for
Parquet, whose footer reads (a Parquet file being written has none yet, however long its writer pauses). The
reliable convention is the one Spark and Hadoop follow: write under a name starting with `_` or `.` (or in a
`_temporary/` folder) and rename when done; such names are never looked at. A sub-folder is a dataset (a Spark
job's output): it is complete when its `_SUCCESS` marker is there, and is loaded whole.

A crash (even SIGKILL mid-file) loses nothing: the file being loaded keeps its load checkpoint
(`app/loading/checkpoint.py`) in the state folder, and the next run continues it after its last stored batch; a
batch stored but not yet checkpointed is replayed, which the never-older rule makes harmless. The load's
checkpoint is removed only after the manifest records the file, so no crash makes a file load twice.

Paths go through fsspec: a local folder, or `s3://bucket/prefix` (with s3fs installed and the usual AWS
credentials), `gs://`, ... A remote file is copied into the state folder (which must then be local, and is
given with --state) and loaded from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from app.errors import BackendFailed
from app.loading.checkpoint import save_json
from app.loading.errors import MaterializeError
from app.loading.load import Report, open_load, run_load
from app.loading.sources import FORMATS, detect_format
from app.metrics import Metrics
from app.registry.model import Registry
from app.serving.limits import Limits
from app.serving.request import format_event_time

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"


class Loaded(msgspec.Struct, kw_only=True):
    """One file (or dataset folder) loaded, and what its load did."""

    name: str
    size: int
    sha256: str  # of the bytes; a folder's: of its files' names, sizes and first and last MiB
    mtime: str  # as the file system reported it (to skip rehashing an unchanged file)
    rows: int
    written: int
    skipped_stale: int
    rejected: int
    reasons: list[str] = msgspec.field(default_factory=list)
    loaded_at: str


class Manifest(msgspec.Struct, kw_only=True):
    version: int = 1
    folder: str
    group: str
    files: list[Loaded] = msgspec.field(default_factory=list)


@dataclass
class Seen:
    """A name as the last poll saw it."""

    size: int
    mtime: str
    is_dir: bool
    polls: int = 1  # consecutive polls it has looked the same


def manifest_path(state: Path, group: str) -> Path:
    return state / f"_feature-gateway.{group}.manifest.json"


def read_manifest(path: Path, folder: str, group: str) -> Manifest:
    try:
        return msgspec.json.decode(path.read_bytes(), type=Manifest)
    except FileNotFoundError:
        return Manifest(folder=folder, group=group)
    except (OSError, msgspec.DecodeError) as exc:
        raise MaterializeError(
            f"manifest {path} cannot be read ({exc}); move it away to load everything again"
        ) from None


def save_manifest(path: Path, manifest: Manifest) -> None:
    save_json(path, manifest)  # atomically: a crash leaves the old manifest or the new one


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _mtime(info: dict[str, Any]) -> str:
    for key in ("mtime", "LastModified", "last_modified", "updated", "ETag"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def _parquet_footer_reads(path: Path) -> bool:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            if f.read(4) != b"PAR1":
                return False
        pq.read_metadata(path)
    except (OSError, pa.ArrowException):
        return False
    return True


class Watcher:
    """Polls `folder` every `poll_s` and loads what is new and complete into `group`, one at a time."""

    def __init__(
        self,
        folder: str,
        registry: Registry,
        group: str,
        *,
        limits: Limits,
        state: Path | None = None,
        poll_s: float = 2.0,
        batch_size: int = 1000,
        retries: int = 3,
        report: Callable[[Report], None] = lambda report: None,
        metrics: Metrics | None = None,
    ):
        import fsspec.core
        from fsspec.implementations.local import LocalFileSystem

        if group not in registry.groups:
            raise MaterializeError(f"unknown group {group!r}; groups: {', '.join(registry.groups)}")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(folder)
        except (ImportError, ValueError) as exc:  # s3:// without s3fs, an unknown protocol
            raise MaterializeError(f"--watch {folder}: {exc}") from None
        self.local = isinstance(self.fs, LocalFileSystem)
        if not self.fs.isdir(self.root):
            raise MaterializeError(f"--watch {folder}: not a folder")
        if state is None:
            if not self.local:
                raise MaterializeError(f"--watch {folder} is not local: give --state DIR, a local folder")
            state = Path(self.root)
        state.mkdir(parents=True, exist_ok=True)
        self.folder, self.registry, self.group = folder, registry, group
        self.limits, self.state, self.poll_s = limits, state, poll_s
        self.batch_size, self.retries, self.report = batch_size, retries, report
        self.metrics = metrics or Metrics(worker=False)  # every file's rows, counted across its loads
        self.manifest_path = manifest_path(state, group)
        self.manifest = read_manifest(self.manifest_path, folder, group)
        for entry in self.manifest.files:  # a crash after recording a load, before removing its checkpoint
            self.checkpoint_path(entry.name).unlink(missing_ok=True)
        self.seen: dict[str, Seen] = {}
        self.told: set[str] = set()  # names logged once as not loadable
        self.failed: dict[str, tuple[int, str]] = {}  # name -> (size, mtime) whose load could not start: left

    def checkpoint_path(self, name: str) -> Path:
        return self.state / f"_feature-gateway.{self.group}.{name}.checkpoint.json"

    def loaded(self, name: str, size: int, mtime: str) -> bool:
        return any(f.name == name and f.size == size and f.mtime == mtime for f in self.manifest.files)

    def poll(self) -> list[str]:
        """The names that are complete and not in the manifest, oldest first (by name within a poll)."""
        self.fs.invalidate_cache(self.root)  # (s3fs and others cache listings)
        listing = self.fs.ls(self.root, detail=True)
        now: dict[str, Seen] = {}
        for info in listing:
            name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(("_", ".")):
                continue
            is_dir = info.get("type") == "directory"
            mtime = _mtime(info)
            size = int(info.get("size") or 0)
            if is_dir:  # a dataset: complete when its job wrote _SUCCESS; its identity is its marker's time
                marker = f"{self.root.rstrip('/')}/{name}/{SUCCESS}"
                if not self.fs.exists(marker):
                    continue
                mtime = _mtime(self.fs.info(marker))
            before = self.seen.get(name)
            seen = Seen(size, mtime, is_dir)
            if before is not None and (before.size, before.mtime, before.is_dir) == (size, mtime, is_dir):
                seen.polls = before.polls + 1
            now[name] = seen
        self.seen = now
        ready = []
        for name, seen in sorted(now.items()):
            if self.loaded(name, seen.size, seen.mtime) or self.failed.get(name) == (seen.size, seen.mtime):
                continue
            if not seen.is_dir:
                try:
                    detect_format(Path(name))
                except MaterializeError:
                    if name not in self.told:
                        self.told.add(name)
                        log.warning("%s: not a %s file by its name; left alone", name, "/".join(FORMATS))
                    continue
                if seen.polls < 2:
                    continue  # seen changing (or seen once): may still be written
            ready.append(name)
        return ready

    def _local_copy(self, name: str) -> tuple[Path, bool]:
        """The file's local path (a remote one is copied into the state folder first), and whether it is a copy."""
        remote = f"{self.root.rstrip('/')}/{name}"
        if self.local:
            return Path(remote), False
        copy = self.state / "_incoming" / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if copy.exists():
            shutil.rmtree(copy) if copy.is_dir() else copy.unlink()
        self.fs.get(remote, str(copy), recursive=self.seen[name].is_dir)
        return copy, True

    async def load(self, name: str) -> Report | None:
        """Load one ready name; None when it turned out not complete after all (a Parquet file without footer)."""
        seen = self.seen[name]
        path, copied = await asyncio.to_thread(self._local_copy, name)
        try:
            if not seen.is_dir and detect_format(path) == "parquet":
                if not await asyncio.to_thread(_parquet_footer_reads, path):
                    return None  # being written: a Parquet file ends with its footer
            if seen.is_dir:
                from app.loading.checkpoint import file_digest

                checksum = (await asyncio.to_thread(file_digest, path)).digest
            else:
                checksum = await asyncio.to_thread(sha256_of, path)
            for entry in self.manifest.files:
                if (entry.name, entry.size, entry.sha256) == (name, seen.size, checksum):
                    entry.mtime = seen.mtime  # the same bytes touched again: not new
                    save_manifest(self.manifest_path, self.manifest)
                    return None
            checkpoint = self.checkpoint_path(name)
            load = open_load(
                self.registry,
                self.group,
                path,
                limits=self.limits,
                batch_size=self.batch_size,
                checkpoint_path=checkpoint,
            )
            if load.checkpoint.rows_done:
                log.warning("%s: resuming after row %d", name, load.checkpoint.rows_done)
            report = await run_load(load, retries=self.retries, keep_checkpoint=True, metrics=self.metrics, via="watch")
        finally:
            if copied:
                with contextlib.suppress(OSError):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.manifest.files = [f for f in self.manifest.files if f.name != name]
        self.manifest.files.append(
            Loaded(
                name=name,
                size=seen.size,
                sha256=checksum,
                mtime=seen.mtime,
                rows=report.rows,
                written=report.written,
                skipped_stale=report.skipped_stale,
                rejected=report.rejected,
                reasons=report.reasons,
                loaded_at=format_event_time(time.time_ns() // 1000),
            )
        )
        save_manifest(self.manifest_path, self.manifest)
        load.finish()  # only now: a crash before the manifest has it resumes the load (at its end), not redoes it
        self.report(report)
        return report

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set; a load under way is cancelled then (its checkpoint keeps what was stored)."""
        while not stop.is_set():
            for name in await asyncio.to_thread(self.poll):
                if stop.is_set():
                    return
                task = asyncio.ensure_future(self.load(name))
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    return
                try:
                    task.result()
                except MaterializeError as exc:  # its columns do not fit, it is not Parquet...: left until replaced
                    seen = self.seen[name]
                    self.failed[name] = (seen.size, seen.mtime)
                    log.error("%s: not loaded: %s (left alone until it changes)", name, exc)
                except BackendFailed as exc:  # tried again at the next poll, after its last stored batch
                    log.error("%s: %s; trying again at the next poll", name, exc.detail)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_s)

"""How far a load got, so that a rerun of the same command continues there.

After each stored batch, and only then, a checkpoint file records how many source rows are done
(with the running totals). A rerun of the same command skips those rows and goes on. A crash between storing
a batch and recording it replays that batch, which is harmless: a row never replaces a newer one, and a
replayed row carries the same event time and values as the stored one, so it rewrites the same bytes
(rows without `event_timestamp` get the time the load started, kept in the checkpoint, for the same reason).
The totals stay exact: the lost batch's counts were never recorded, and its replay counts it once.
The checkpoint is removed when the load finishes.

A checkpoint resumes only the load it was made for: the same file (its size and a digest of its first and
last MiB; for a dataset directory, those of each of its files), format, group and backend identity.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from app.loading.errors import MaterializeError
from app.registry.model import Group, Registry
from app.serving.request import format_event_time

_DIGEST_SPAN = 1 << 20


class Checkpoint(msgspec.Struct, kw_only=True):
    """What a rerun needs to continue: which file into where, how far, and the totals so far."""

    version: int = 1
    file: str
    size: int
    digest: str  # sha256 of the file's first and last MiB: a changed file is not resumed
    format: str
    group: str
    backend: dict[str, Any]  # the backend's identity (type and location, passwords redacted)
    default_event_time: str  # given to rows without event_timestamp, the same in every run
    rows_done: int = 0
    written: int = 0
    skipped_stale: int = 0
    rejected: int = 0
    reasons: list[str] = msgspec.field(default_factory=list)
    started_at: str
    updated_at: str


def default_checkpoint(path: Path, group: str) -> Path:
    return path.with_name(f"{path.name}.{group}.checkpoint.json")


class FileDigest(NamedTuple):
    """What tells a file changed since its checkpoint, without reading all of it."""

    size: int
    digest: str  # sha256 of the size, the first MiB and the last MiB


def file_digest(path: Path) -> FileDigest:
    """A directory (a Parquet dataset): its files' names, sizes and digests, in load order."""
    if path.is_dir():
        from app.loading.sources import dataset_files

        total = 0
        digest = hashlib.sha256()
        for file in dataset_files(path):
            part = file_digest(file)
            total += part.size
            digest.update(f"{file.relative_to(path)}\0{part.digest}\0".encode())
        return FileDigest(total, digest.hexdigest())
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(_DIGEST_SPAN))
        if size > _DIGEST_SPAN:
            f.seek(max(size - _DIGEST_SPAN, _DIGEST_SPAN))
            digest.update(f.read())
    return FileDigest(size, digest.hexdigest())


def save_json(path: Path, document: Any) -> None:
    """Atomically (fsynced, then renamed over the old file): a crash leaves the old file or the new one, never
    half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(document)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    checkpoint.updated_at = format_event_time(time.time_ns() // 1000)
    save_json(path, checkpoint)


def load_checkpoint(path: Path) -> Checkpoint | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MaterializeError(f"checkpoint {path}: cannot read: {exc.strerror or exc}") from None
    try:
        return msgspec.json.decode(data, type=Checkpoint)
    except msgspec.DecodeError as exc:
        raise MaterializeError(
            f"checkpoint {path} is not a checkpoint ({exc}); pass --restart to load from the start"
        ) from None


# What identifies a backend's data (not its tuning): a checkpoint is only valid against the same place.
def backend_identity(registry: Registry, group: Group) -> dict[str, Any]:
    """Where the group's data lives (the options its backend type marks as identity), passwords redacted."""
    from backends import KINDS

    described = registry.describe()["backends"][group.backend]
    kind = described["type"]
    return {"name": group.backend, "type": kind, **{k: described[k] for k in KINDS[kind].identity}}

"""Run a load: the rows of any `Source`, validated, stored in batches with retries, checkpointed after each.

Every row goes through `app.serving.write.encode_row`, the validation of POST /v1/features/write, but one at a time:
a bad row is counted and reported (its row number, field and reason) and the good rows of its batch are
still stored, through `app.serving.write.store` (the same backend call, timeout and errors as the endpoint).
Why a rerun may resume after the last checkpointed batch, and replaying a batch is harmless: `checkpoint`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from app.errors import BackendFailed, ValidationFailed
from app.loading.checkpoint import (
    Checkpoint,
    backend_identity,
    default_checkpoint,
    file_digest,
    load_checkpoint,
    save_checkpoint,
)
from app.loading.errors import MaterializeError
from app.loading.sources import Source, SourceRow, detect_format, open_source
from app.metrics import Metrics
from app.registry.model import Group, Registry
from app.serving.gateway import Gateway
from app.serving.limits import Limits
from app.serving.request import format_event_time, parse_event_time
from app.serving.write import encode_row, keep_newest, latest_event_us, store
from backends.base import WriteResult, WriteRow

MAX_REASONS = 10  # rejected rows whose reasons are kept and reported; the rest are counted

log = logging.getLogger(__name__)


class Progress(Protocol):
    """Told how a load advances. The CLI draws it (`app.cli.ProgressBar`); other callers may pass none."""

    def begin(self, rows_done: int) -> None:
        """The load starts here: `rows_done` rows were done by earlier runs."""

    def update(self, checkpoint: Checkpoint, fraction: float | None, *, final: bool = False) -> None:
        """After each checkpointed batch, and once more (`final`) at the end: the totals, how far through the source."""

    def close(self) -> None:
        """The load ended, finished or not."""


@dataclass
class Report:
    group: str
    file: Path
    rows: int
    written: int
    skipped_stale: int
    rejected: int
    reasons: list[str]
    resumed_from: int
    checkpoint: Path
    seconds: float
    rows_this_run: int = 0
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"{self.file} -> {self.group}: {self.rows:,} rows: {self.written:,} written, "
            f"{self.skipped_stale:,} skipped as stale, {self.rejected:,} rejected"
        ]
        if self.resumed_from:
            out.append(f"resumed after row {self.resumed_from:,}; totals include the earlier runs")
        if self.seconds > 0 and self.rows_this_run:
            out.append(
                f"{self.rows_this_run:,} rows in {self.seconds:.1f}s ({self.rows_this_run / self.seconds:,.0f} rows/s)"
            )
        if self.rejected:
            shown = len(self.reasons)
            out.append(f"first {shown} rejected:" if shown < self.rejected else "rejected:")
            out += [f"  {reason}" for reason in self.reasons]
        out += self.notes
        return out


def _reason(row: SourceRow, exc: ValidationFailed, where: str = "") -> str:
    """`[where, ]row N[ (line L)]: field: why`, as the write path's problem details name them."""
    at = f"{where}, " if where else ""
    at += f"row {row.number}" + (f" (line {row.line})" if row.line is not None else "")
    name = (exc.field or "(row)").removeprefix("row.")
    return f"{at}: {name}: {exc.detail}"


async def store_with_retries(gw: Gateway, group: Group, rows: list[WriteRow], retries: int) -> WriteResult:
    """Store with a few spaced retries: a batch may be replayed, so retrying a failed write is always safe."""
    for attempt in range(retries + 1):
        try:
            return await store(gw, group, rows)
        except BackendFailed:
            if attempt == retries:
                raise
            await asyncio.sleep(min(0.5 * 2**attempt, 8.0))
    raise AssertionError("unreachable")


@dataclass
class Prepared:
    """One batch, read and validated off the event loop: what to store and what was rejected."""

    last_row: int
    rows: list[WriteRow]
    dropped: int  # older duplicates of an entity within the batch
    reasons: list[str]


def prepare(group: Group, batch: list[SourceRow], limits: Limits, default_us: int, where: str = "") -> Prepared:
    """Validate and encode a batch by the write path's own `encode_row`, one row at a time: a bad row becomes a
    reason (`where`: what to name the rows by besides their number, e.g. a Spark partition), the rest are kept,
    one per entity (the newest). Every loader goes through here: files, datasets, pandas and Spark."""
    latest_us = latest_event_us(limits, time.time_ns() // 1000)  # the clock now, not the load's start
    encoded: list[WriteRow] = []
    reasons: list[str] = []
    for row in batch:
        problem = row.problem
        if row.values is not None:
            try:
                encoded.append(encode_row(group, row.values, limits, default_us, "row", latest_us))
                continue
            except ValidationFailed as exc:
                problem = exc
        reasons.append(_reason(row, problem or ValidationFailed("unreadable", field="(row)"), where))
    rows, dropped = keep_newest(encoded)
    return Prepared(batch[-1].number if batch else 0, rows, dropped, reasons)


@dataclass
class Load:
    """A load checked and ready to run: group, source, checkpoint (resumed or new). `open_load` builds it."""

    registry: Registry
    group: Group
    path: Path
    source: Source
    checkpoint: Checkpoint
    checkpoint_path: Path
    limits: Limits
    batch_size: int

    def prepared(self) -> Iterator[Prepared]:
        """The batches after the checkpoint, each row validated by the write path's own `encode_row`."""
        default_us = parse_event_time(self.checkpoint.default_event_time, "default_event_time")
        for batch in self.source.batches(self.checkpoint.rows_done, self.batch_size):
            yield prepare(self.group, batch, self.limits, default_us)

    def record(self, batch: Prepared, result: WriteResult) -> None:
        """Count a stored batch and save the checkpoint (only ever after the batch is stored)."""
        checkpoint = self.checkpoint
        checkpoint.rows_done = batch.last_row
        checkpoint.written += result.written
        checkpoint.skipped_stale += result.skipped_stale + batch.dropped
        checkpoint.rejected += len(batch.reasons)
        checkpoint.reasons += batch.reasons[: max(MAX_REASONS - len(checkpoint.reasons), 0)]
        save_checkpoint(self.checkpoint_path, checkpoint)

    def finish(self) -> None:
        self.checkpoint_path.unlink(missing_ok=True)


def open_load(
    registry: Registry,
    group_name: str,
    path: Path,
    *,
    limits: Limits,
    fmt: str | None = None,
    batch_size: int = 1000,
    checkpoint_path: Path | None = None,
    restart: bool = False,
) -> Load:
    """Check everything that can be checked before writing: group, format, columns, checkpoint."""
    group = registry.groups.get(group_name)
    if group is None:
        raise MaterializeError(f"unknown group {group_name!r}; groups: {', '.join(registry.groups)}")
    if group.streaming is not None:
        raise MaterializeError(
            f"{group.name} aggregates stream {group.streaming.stream}: load its events with POST "
            f"/v1/events/{group.streaming.stream} or a stream consumer, not rows"
        )
    if batch_size < 1:
        raise MaterializeError("--batch-size must be at least 1")
    fmt = fmt or detect_format(path)
    checkpoint_path = checkpoint_path or default_checkpoint(path, group.name)
    try:
        size, digest = file_digest(path)
    except OSError as exc:
        raise MaterializeError(f"{path}: cannot read: {exc.strerror or exc}") from None
    identity = backend_identity(registry, group)
    checkpoint = None if restart else load_checkpoint(checkpoint_path)
    if checkpoint is not None:
        theirs = (checkpoint.size, checkpoint.digest, checkpoint.group, checkpoint.backend, checkpoint.format)
        if theirs != (size, digest, group.name, identity, fmt):
            raise MaterializeError(
                f"checkpoint {checkpoint_path} is for another load (file {checkpoint.file} into {checkpoint.group} "
                f"on backend {checkpoint.backend.get('name')}), or the file changed since; pass --restart to load "
                "this file from the start, or --checkpoint to keep both"
            )
    else:
        now = format_event_time(time.time_ns() // 1000)
        checkpoint = Checkpoint(
            file=str(path.resolve()),
            size=size,
            digest=digest,
            format=fmt,
            group=group.name,
            backend=identity,
            default_event_time=now,
            started_at=now,
            updated_at=now,
        )
    source = open_source(path, fmt, group)
    try:
        save_checkpoint(checkpoint_path, checkpoint)  # now, not after the first batch: can it be written?
    except OSError as exc:
        source.close()
        raise MaterializeError(
            f"cannot write the checkpoint {checkpoint_path}: {exc.strerror or exc}; pass --checkpoint PATH"
        ) from None
    return Load(registry, group, path, source, checkpoint, checkpoint_path, limits, batch_size)


async def _next_batch(pending: asyncio.Future[Prepared | None], checkpoint: Checkpoint) -> Prepared | None:
    try:
        return await pending
    except MaterializeError as exc:  # the file turned out unreadable partway (bad CSV quoting, a cut .gz)
        if not checkpoint.rows_done:
            raise
        raise MaterializeError(
            f"{exc}; the load stopped after row {checkpoint.rows_done:,} (stored); once the file is fixed, "
            "load it again with --restart (rewriting the rows stored already is harmless)"
        ) from None


async def run_load(
    load: Load,
    *,
    retries: int = 3,
    progress: Progress | None = None,
    keep_checkpoint: bool = False,
    metrics: Metrics | None = None,
    via: str = "materialize",
) -> Report:
    """Store the batches, reading and validating the next one in a thread while the current one is written.

    The checkpoint is removed at the end, unless `keep_checkpoint` (the caller first records the load elsewhere,
    then calls `load.finish()`: the drop folder's manifest).

    `metrics` (a loader's: `worker=False`): where the group's written, stale and rejected rows are counted as
    written `via` this loader; with a directory (a gateway's GATEWAY_METRICS_DIR), they are shared there each
    second, and the gateway's /v1/usage and /metrics show them.

    Raises BackendFailed when a batch cannot be stored after `retries`; the checkpoint then holds every
    batch stored before it, so a rerun continues there.
    """
    from backends import open_backend

    group, checkpoint = load.group, load.checkpoint
    resumed_from = checkpoint.rows_done
    # Its cache and the backend it is moving to are written too (app/serving/write.py store)
    opened = {name: open_backend(load.registry.backends[name], load.registry) for name in group.backends}
    backend = opened[group.backend]
    gw = Gateway(load.registry, opened, limits=load.limits, metrics=metrics or Metrics(worker=False))
    batches = load.prepared()
    pending: asyncio.Future[Prepared | None] | None = None
    started = time.monotonic()
    try:
        try:
            async with asyncio.timeout(max(load.limits.write_timeout_ms / 1000, 5.0)):
                await backend.migrate()
        except Exception as exc:
            raise BackendFailed(
                f"backend {group.backend} ({backend.type}) does not answer: {type(exc).__name__}: {exc}"[:400],
                field="group",
            ) from None
        if progress is not None:
            progress.begin(checkpoint.rows_done)
        pending = asyncio.ensure_future(asyncio.to_thread(next, batches, None))
        while (batch := await _next_batch(pending, checkpoint)) is not None:
            pending = asyncio.ensure_future(asyncio.to_thread(next, batches, None))  # read ahead while storing
            result = await store_with_retries(gw, group, batch.rows, retries) if batch.rows else WriteResult(0, 0)
            await asyncio.to_thread(load.record, batch, result)
            gw.metrics.written(
                group.name, via, result.written, result.skipped_stale + batch.dropped, len(batch.reasons)
            )
            try:
                gw.metrics.dump(every_s=1.0)
            except OSError as exc:
                log.warning("could not share the load's counts: %s", exc)
            if progress is not None:
                progress.update(checkpoint, load.source.fraction(checkpoint.rows_done))
        pending = None
        if progress is not None:
            progress.update(checkpoint, 1.0, final=True)
    finally:
        if pending is not None:  # a read-ahead still running in its thread must end before its file closes
            await asyncio.gather(pending, return_exceptions=True)
        if progress is not None:
            progress.close()
        load.source.close()
        if gw.cache.dirty:
            log.warning(
                "the cache of %s did not take %d row(s); reads may serve its older copies for up to its ttl",
                group.name,
                len(gw.cache.dirty),
            )
        await gw.aclose()
    if not keep_checkpoint:
        load.finish()
    return Report(
        group=group.name,
        file=load.path,
        rows=checkpoint.rows_done,
        written=checkpoint.written,
        skipped_stale=checkpoint.skipped_stale,
        rejected=checkpoint.rejected,
        reasons=checkpoint.reasons,
        resumed_from=resumed_from,
        checkpoint=load.checkpoint_path,
        seconds=time.monotonic() - started,
        rows_this_run=checkpoint.rows_done - resumed_from,
    )

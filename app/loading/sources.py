"""Bulk materialize: load a Parquet, CSV or JSON Lines file into one feature group, resumably.

Every row goes through `app.serving.write.encode_row`, the validation of POST /v1/features/write, but one at a time:
a bad row is counted and reported (its row number, field and reason) and the good rows of its batch are
still stored, through `app.serving.write.store` (the same backend call, timeout and errors as the endpoint).

CSV is text: cells are typed by the group's dtypes in `from_text` (the one place that does it).
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import msgspec

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
from app.registry.model import Group, Registry
from app.serving.gateway import Gateway
from app.serving.limits import Limits
from app.serving.request import format_event_time, parse_event_time
from app.serving.write import EVENT_TIMESTAMP, encode_row, keep_newest, latest_event_us, store
from app.storage.codec import CodecError, DType
from backends.base import WriteResult, WriteRow

FORMATS = ("parquet", "csv", "jsonl")
_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
MAX_REASONS = 10  # rejected rows whose reasons are kept and reported; the rest are counted
_PANDAS_INDEX = re.compile(r"^__index_level_\d+__$")  # pandas' stored index: never a feature
_INT = re.compile(r"^\s*[+-]?\d+\s*$")
_TRUE = frozenset({"true", "t", "1", "yes", "y"})
_FALSE = frozenset({"false", "f", "0", "no", "n"})


def _guarded(path: Path, batches: Iterator[Any]) -> Iterator[Any]:
    """Parquet batches, a file damaged partway reported as a MaterializeError (the rows so far are kept)."""
    import pyarrow as pa

    try:
        yield from batches
    except (OSError, pa.ArrowException) as exc:
        raise MaterializeError(f"{path}: cannot read further: {exc}") from None


# -- typing CSV text -----------------------------------------------------------------------------------


def _quote(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:37] + "...")


def from_text(dtype: DType, text: str) -> Any:
    """One CSV cell -> the JSON value the write path validates, by dtype. An empty cell is null.

    Only parses: the dtype's own checks (ranges, finite numbers, array lengths, base64) stay in the write path.
    int64 `3`, float64 `2.5` / `1e-3`, bool `true/false/1/0/yes/no` (any case), string and bytes (base64)
    as they are, arrays as JSON text `[0.5, 1.0]`.
    """
    if text == "":
        return None
    kind = dtype.kind
    if kind == "int64":
        if not _INT.match(text):
            raise CodecError(f"expected an integer (int64), got {_quote(text)}")
        return int(text)
    if kind == "float64":
        try:
            if "_" in text:  # Python's float() takes 1_000; a CSV writer never means it
                raise ValueError
            return float(text)
        except ValueError:
            raise CodecError(f"expected a number (float64), got {_quote(text)}") from None
    if kind == "bool":
        word = text.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise CodecError(f"expected true or false, got {_quote(text)}")
    if kind in ("string", "bytes"):
        return text
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        raise CodecError(f"expected a JSON array such as [0.5, 1.0] ({dtype.name}), got {_quote(text)}") from None


class CsvTyping:
    """Types the cells of one CSV header's rows: join key by the entity dtype, features by theirs."""

    def __init__(self, group: Group, header: Sequence[str]):
        self.header = list(header)
        self.dtypes: list[DType | None] = []
        for name in header:
            if name == group.entity.join_key:
                self.dtypes.append(group.entity.dtype)
            elif name == EVENT_TIMESTAMP:
                self.dtypes.append(None)  # RFC 3339 text, checked by the write path
            else:
                self.dtypes.append(group.by_name[name].dtype)

    def row(self, cells: Sequence[str]) -> dict[str, Any]:
        """Raises ValidationFailed naming the column of the first cell that is not of its dtype."""
        if len(cells) != len(self.header):
            raise ValidationFailed(f"has {len(cells)} cells; the header has {len(self.header)}", field="(row)")
        values: dict[str, Any] = {}
        for name, dtype, text in zip(self.header, self.dtypes, cells, strict=True):
            if dtype is None:
                values[name] = text or None
                continue
            try:
                values[name] = from_text(dtype, text)
            except CodecError as exc:
                raise ValidationFailed(str(exc), field=name) from None
        return values


# -- sources -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class SourceRow:
    number: int  # 1-based position among the file's rows (a CSV header and blank lines are not rows)
    values: dict[str, Any] | None
    problem: ValidationFailed | None = None  # why the row could not even be read
    line: int | None = None  # in text files, the line where the row ends


class Source(Protocol):
    def batches(self, skip: int, size: int) -> Iterator[list[SourceRow]]:
        """The rows after the first `skip`, `size` at a time."""

    def fraction(self, rows_done: int) -> float | None:
        """How far through the file the reader is (0..1), when it can tell."""

    def close(self) -> None: ...


def detect_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    found = _SUFFIXES.get(suffixes[-1]) if suffixes else None
    if found is None:
        raise MaterializeError(
            f"{path}: cannot tell the format from the name; pass --format {' | '.join(FORMATS)} "
            f"(known extensions: {', '.join(_SUFFIXES)}, .gz for csv and jsonl)"
        )
    return found


def check_columns(group: Group, columns: Sequence[str], source: str) -> None:
    """A columnar file must name the join key and every feature, and nothing else (event_timestamp optional)."""
    join_key = group.entity.join_key
    seen: set[str] = set()
    for name in columns:
        if name in seen:
            raise MaterializeError(f"{source}: column {name!r} appears twice")
        seen.add(name)
    unknown = [c for c in columns if c != join_key and c != EVENT_TIMESTAMP and c not in group.by_name]
    if unknown:
        raise MaterializeError(
            f"{source}: column{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} not in group "
            f"{group.name}, which takes {join_key}, {EVENT_TIMESTAMP} (optional) and {', '.join(group.by_name)}"
        )
    if join_key not in seen:
        raise MaterializeError(f"{source}: no column {join_key!r}, the join key of group {group.name}")
    missing = [f.name for f in group.features if f.name not in seen]
    if missing:
        raise MaterializeError(
            f"{source}: no column for {', '.join(map(repr, missing))}; a group's row is written whole "
            "(an empty cell or null is how a row says 'no value')"
        )


class _TextFile:
    """A text-format file (optionally gzipped) read as bytes, with how far through it the reader is."""

    def __init__(self, path: Path):
        self.size = path.stat().st_size
        self.raw = open(path, "rb")  # closed by close()
        self.stream: io.BufferedIOBase = gzip.GzipFile(fileobj=self.raw) if path.suffix.lower() == ".gz" else self.raw

    def fraction(self) -> float | None:
        return min(self.raw.tell() / self.size, 1.0) if self.size else None

    def close(self) -> None:
        if self.stream is not self.raw:
            self.stream.close()
        self.raw.close()


class CsvSource:
    def __init__(self, path: Path, group: Group):
        self.path = path
        self.file = _TextFile(path)
        try:
            # typeshed wants a _WrappedBuffer; BufferedReader and GzipFile both are one at run time
            self.text = io.TextIOWrapper(self.file.stream, encoding="utf-8-sig", newline="")  # type: ignore[type-var]
            self.reader = csv.reader(self.text, strict=True)
            header = self._next()
            if header is None:
                raise MaterializeError(f"{path}: empty file (a CSV file starts with a header naming its columns)")
            header = [h.strip() for h in header]
            check_columns(group, header, str(path))
            self.typing = CsvTyping(group, header)
        except BaseException:
            self.file.close()
            raise

    def _next(self) -> list[str] | None:
        try:
            return next(self.reader, None)
        except csv.Error as exc:
            raise MaterializeError(f"{self.path}: line {self.reader.line_num}: not valid CSV: {exc}") from None
        except UnicodeDecodeError as exc:
            raise MaterializeError(f"{self.path}: not UTF-8 text near line {self.reader.line_num}: {exc}") from None
        except (OSError, EOFError) as exc:  # a cut or corrupt .gz
            raise MaterializeError(f"{self.path}: cannot read past line {self.reader.line_num}: {exc}") from None

    def batches(self, skip: int, size: int) -> Iterator[list[SourceRow]]:
        number = 0
        batch: list[SourceRow] = []
        while (cells := self._next()) is not None:
            if not cells:
                continue  # a blank line
            number += 1
            if number <= skip:
                continue
            row = SourceRow(number, None, line=self.reader.line_num)
            try:
                row.values = self.typing.row(cells)
            except ValidationFailed as exc:
                row.problem = exc
            batch.append(row)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    def fraction(self, rows_done: int) -> float | None:
        return self.file.fraction()

    def close(self) -> None:
        self.file.close()


class JsonlSource:
    def __init__(self, path: Path, group: Group):
        self.path = path
        self.file = _TextFile(path)

    def batches(self, skip: int, size: int) -> Iterator[list[SourceRow]]:
        number = 0
        batch: list[SourceRow] = []
        try:
            for line_no, line in enumerate(self.file.stream, start=1):
                if line_no == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")
                if not line.strip():
                    continue
                number += 1
                if number <= skip:
                    continue
                row = SourceRow(number, None, line=line_no)
                try:
                    values = msgspec.json.decode(line)
                except msgspec.DecodeError as exc:
                    row.problem = ValidationFailed(f"not valid JSON: {exc}", field="(row)")
                else:
                    if type(values) is dict:
                        row.values = values
                    else:
                        row.problem = ValidationFailed("a line must be one JSON object", field="(row)")
                batch.append(row)
                if len(batch) == size:
                    yield batch
                    batch = []
        except (OSError, EOFError) as exc:  # a truncated or corrupt .gz
            raise MaterializeError(f"{self.path}: cannot read past row {number}: {exc}") from None
        if batch:
            yield batch

    def fraction(self, rows_done: int) -> float | None:
        return self.file.fraction()

    def close(self) -> None:
        self.file.close()


def _rfc3339(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # as the write path reads a time without offset
    return moment.isoformat().replace("+00:00", "Z")


class ParquetSource:
    """Read one record batch at a time (never the whole file); resuming skips whole row groups."""

    def __init__(self, path: Path, group: Group):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = path
        try:
            self.file = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as exc:
            raise MaterializeError(f"{path}: not a readable Parquet file: {exc}") from None
        self.columns = [n for n in self.file.schema_arrow.names if not _PANDAS_INDEX.match(n)]
        check_columns(group, self.columns, str(path))
        self.total_rows: int = self.file.metadata.num_rows

    def batches(self, skip: int, size: int) -> Iterator[list[SourceRow]]:
        metadata = self.file.metadata
        row_groups: list[int] = []
        start = 0
        drop = 0  # rows of the first kept row group that were done already
        for i in range(metadata.num_row_groups):
            rows = metadata.row_group(i).num_rows
            if start + rows <= skip:
                start += rows
                continue
            if not row_groups:
                drop = skip - start
            row_groups.append(i)
            start += rows
        if not row_groups:
            return
        number = skip
        batch: list[SourceRow] = []
        for record_batch in _guarded(
            self.path, self.file.iter_batches(batch_size=size, row_groups=row_groups, columns=self.columns)
        ):
            if drop:
                if drop >= record_batch.num_rows:
                    drop -= record_batch.num_rows
                    continue
                record_batch = record_batch.slice(drop)
                drop = 0
            for values in record_batch.to_pylist():
                number += 1
                moment = values.get(EVENT_TIMESTAMP)
                if isinstance(moment, datetime):
                    values[EVENT_TIMESTAMP] = _rfc3339(moment)
                batch.append(SourceRow(number, values))
                if len(batch) == size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def fraction(self, rows_done: int) -> float | None:
        return rows_done / self.total_rows if self.total_rows else None

    def close(self) -> None:
        self.file.close()


def open_source(path: Path, fmt: str, group: Group) -> Source:
    if fmt == "parquet" and path.suffix.lower() == ".gz":
        raise MaterializeError(f"{path}: a Parquet file compresses itself; give it ungzipped")
    try:
        if fmt == "parquet":
            return ParquetSource(path, group)
        if fmt == "csv":
            return CsvSource(path, group)
        if fmt == "jsonl":
            return JsonlSource(path, group)
    except OSError as exc:
        raise MaterializeError(f"{path}: cannot read: {exc.strerror or exc}") from None
    raise MaterializeError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


# -- progress ------------------------------------------------------------------------------------------


class Progress(Protocol):
    """Told how a load advances. The CLI draws it (`app.cli.ProgressBar`); other callers may pass none."""

    def begin(self, rows_done: int) -> None:
        """The load starts here: `rows_done` rows were done by earlier runs."""

    def update(self, checkpoint: Checkpoint, fraction: float | None, *, final: bool = False) -> None:
        """After each checkpointed batch, and once more (`final`) at the end: the totals, how far through the source."""

    def close(self) -> None:
        """The load ended, finished or not."""


# -- the load ------------------------------------------------------------------------------------------


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


def _reason(row: SourceRow, exc: ValidationFailed) -> str:
    where = f"row {row.number}" + (f" (line {row.line})" if row.line is not None else "")
    name = (exc.field or "(row)").removeprefix("row.")
    return f"{where}: {name}: {exc.detail}"


async def _store(gw: Gateway, group: Group, rows: list[WriteRow], retries: int) -> WriteResult:
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
        group, limits = self.group, self.limits
        default_us = parse_event_time(self.checkpoint.default_event_time, "default_event_time")
        for batch in self.source.batches(self.checkpoint.rows_done, self.batch_size):
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
                reasons.append(_reason(row, problem or ValidationFailed("unreadable", field="(row)")))
            rows, dropped = keep_newest(encoded)
            yield Prepared(batch[-1].number, rows, dropped, reasons)

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


async def run_load(load: Load, *, retries: int = 3, progress: Progress | None = None) -> Report:
    """Store the batches, reading and validating the next one in a thread while the current one is written.

    Raises BackendFailed when a batch cannot be stored after `retries`; the checkpoint then holds every
    batch stored before it, so a rerun continues there.
    """
    from backends import open_backend

    group, checkpoint = load.group, load.checkpoint
    resumed_from = checkpoint.rows_done
    backend = open_backend(load.registry.backends[group.backend], load.registry)
    gw = Gateway(load.registry, {group.backend: backend}, limits=load.limits)
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
            result = await _store(gw, group, batch.rows, retries) if batch.rows else WriteResult(0, 0)
            await asyncio.to_thread(load.record, batch, result)
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
        await gw.aclose()
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

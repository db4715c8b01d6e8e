"""Where a load's rows come from: a Parquet, CSV or JSON Lines file (the text formats also gzipped).

A `Source` yields its rows numbered from 1, a batch at a time, after the rows a resumed load has done; a row
that cannot even be read carries the reason instead of values, so it is counted as rejected and the load goes on.
CSV and Parquet columns are checked against the group when the file is opened, before anything is written.

CSV is text: `csv_typing` types its cells.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgspec

from app.errors import ValidationFailed
from app.loading.csv_typing import CsvTyping
from app.loading.errors import MaterializeError
from app.registry.model import Group
from app.serving.write import EVENT_TIMESTAMP

FORMATS = ("parquet", "csv", "jsonl")
_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_PANDAS_INDEX = re.compile(r"^__index_level_\d+__$")  # pandas' stored index: never a feature


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
    if path.is_dir():
        return "parquet"  # a dataset: a directory of Parquet files
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


def arrow_rows(record_batch: Any, after: int) -> list[SourceRow]:
    """An Arrow record batch as rows numbered from `after + 1`, as the write path takes them (a timestamp column
    `event_timestamp` as RFC 3339 text, in UTC; one without a zone is read as UTC, as the write path reads a time
    without offset). Every columnar source goes through here: Parquet files and datasets, and the pandas and Spark
    DataFrames of `app.loading.frames`. The times are formatted by Arrow, a column at a time: a Python datetime
    per row cost 14 us of the 46 a 50-feature row takes to check and encode."""
    import pyarrow as pa
    import pyarrow.compute as pc

    index = record_batch.schema.get_field_index(EVENT_TIMESTAMP)
    if index >= 0 and pa.types.is_timestamp(record_batch.schema.field(index).type):
        column = record_batch.column(index)
        utc = column.cast(pa.timestamp(column.type.unit, tz="UTC"))  # (a zoneless time's value is already UTC)
        # nanoseconds print 9 digits, refused by the write path unless the last 3 are zeros, as over HTTP
        text = pc.strftime(utc, format="%Y-%m-%dT%H:%M:%SZ")
        arrays = list(record_batch.columns)
        arrays[index] = text
        record_batch = pa.RecordBatch.from_arrays(arrays, names=record_batch.schema.names)
    return [SourceRow(number, values) for number, values in enumerate(record_batch.to_pylist(), start=after + 1)]


def _guarded(path: Path, batches: Iterator[Any]) -> Iterator[Any]:
    """Parquet batches, a file damaged partway reported as a MaterializeError (the rows so far are kept)."""
    import pyarrow as pa

    try:
        yield from batches
    except (OSError, pa.ArrowException) as exc:
        raise MaterializeError(f"{path}: cannot read further: {exc}") from None


def _skipping(batches: Iterator[Any], drop: int) -> Iterator[Any]:
    """`batches` less their first `drop` rows (a resumed load skips what its checkpoint says is done)."""
    for record_batch in batches:
        if drop:
            if drop >= record_batch.num_rows:
                drop -= record_batch.num_rows
                continue
            record_batch = record_batch.slice(drop)
            drop = 0
        yield record_batch


def _rebatched(record_batches: Iterator[Any], skip: int, size: int) -> Iterator[list[SourceRow]]:
    """Arrow record batches of the rows after the first `skip`, as numbered rows, `size` at a time."""
    number = skip
    batch: list[SourceRow] = []
    for record_batch in record_batches:
        batch += arrow_rows(record_batch, number)
        number += record_batch.num_rows
        while len(batch) >= size:
            yield batch[:size]
            batch = batch[size:]
    if batch:
        yield batch


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

    def record_batches(self, skip: int, size: int) -> Iterator[Any]:
        """The file's record batches after the first `skip` rows."""
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
        yield from _skipping(
            _guarded(self.path, self.file.iter_batches(batch_size=size, row_groups=row_groups, columns=self.columns)),
            drop,
        )

    def batches(self, skip: int, size: int) -> Iterator[list[SourceRow]]:
        return _rebatched(self.record_batches(skip, size), skip, size)

    def fraction(self, rows_done: int) -> float | None:
        return rows_done / self.total_rows if self.total_rows else None

    def close(self) -> None:
        self.file.close()


def dataset_files(path: Path) -> list[Path]:
    """The Parquet files of a dataset directory, in the order they are loaded (by path). Names starting with `_`
    or `.` are not data (Spark's and Hadoop's `_SUCCESS`, `_temporary/`, `.crc` files, a checkpoint)."""
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
        found += [Path(root, f) for f in files if not f.startswith(("_", "."))]
    return sorted(found)


class DatasetSource:
    """A directory of Parquet files, Hive-style partitioned (`dt=2026-11-30/part-0.parquet`) or not, read file by
    file in path order; resuming skips whole files by their row counts (read from their footers).

    A partition column that is one of the group's columns is loaded like any other; one that is not (a date
    the files were written under) is left out, since it names where the rows were put, not a feature.
    """

    def __init__(self, path: Path, group: Group):
        import pyarrow as pa
        import pyarrow.dataset as ds

        self.path = path
        files = dataset_files(path)
        if not files:
            raise MaterializeError(f"{path}: no Parquet files in this directory (names starting _ or . are skipped)")
        try:
            self.dataset = ds.dataset(
                [str(f) for f in files], format="parquet", partitioning="hive", partition_base_dir=str(path)
            )
            self.fragments = sorted(self.dataset.get_fragments(), key=lambda f: f.path)
            self.counts = [f.count_rows() for f in self.fragments]
        except (OSError, pa.ArrowException) as exc:
            raise MaterializeError(f"{path}: not a readable Parquet dataset: {exc}") from None
        names = [n for n in self.dataset.schema.names if not _PANDAS_INDEX.match(n)]
        partitioned = set(_partition_columns(path, files))
        wanted = {group.entity.join_key, EVENT_TIMESTAMP, *group.by_name}
        self.columns = [n for n in names if n in wanted or n not in partitioned]
        check_columns(group, self.columns, str(path))
        self.total_rows = sum(self.counts)

    def batches(self, skip: int, size: int) -> Iterator[list[SourceRow]]:
        return _rebatched(self._record_batches(skip, size), skip, size)

    def _record_batches(self, skip: int, size: int) -> Iterator[Any]:
        import pyarrow.dataset as ds

        start = 0
        for fragment, count in zip(self.fragments, self.counts, strict=True):
            if start + count <= skip:
                start += count
                continue
            drop = max(skip - start, 0)
            start += count
            scanner = ds.Scanner.from_fragment(
                fragment, schema=self.dataset.schema, columns=self.columns, batch_size=size, use_threads=False
            )
            for record_batch in _skipping(_guarded(Path(fragment.path), scanner.to_batches()), drop):
                if record_batch.num_rows:
                    yield record_batch

    def fraction(self, rows_done: int) -> float | None:
        return rows_done / self.total_rows if self.total_rows else None

    def close(self) -> None:
        pass


def _partition_columns(base: Path, files: list[Path]) -> list[str]:
    """The `name` of every `name=value` directory between `base` and a file."""
    names: dict[str, None] = {}
    for file in files:
        for part in file.relative_to(base).parts[:-1]:
            name, eq, _ = part.partition("=")
            if eq:
                names[name] = None
    return list(names)


def open_source(path: Path, fmt: str, group: Group) -> Source:
    if fmt == "parquet" and path.suffix.lower() == ".gz":
        raise MaterializeError(f"{path}: a Parquet file compresses itself; give it ungzipped")
    try:
        if fmt == "parquet" and path.is_dir():
            return DatasetSource(path, group)
        if fmt == "parquet":
            return ParquetSource(path, group)
        if fmt == "csv":
            return CsvSource(path, group)
        if fmt == "jsonl":
            return JsonlSource(path, group)
    except OSError as exc:
        raise MaterializeError(f"{path}: cannot read: {exc.strerror or exc}") from None
    raise MaterializeError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")

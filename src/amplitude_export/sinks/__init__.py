"""Destinations for events, one module each behind the small `Sink` protocol below.

`open_sink("duckdb:PATH" | "parquet:DIR" | "iceberg:DIR" | "postgresql://...")` picks the module by the URL's
scheme. Every sink keeps the ledger (see `ledger.py`) inside the destination and commits a window's rows and its
ledger rows together, so the destination is the only record of progress.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa

from ..errors import AmplitudeExportError, DestinationError, UsageError
from ..ledger import DeletionRecord, HourRecord
from ..windows import Window

if TYPE_CHECKING:
    from .maintenance import Maintenance


class WindowRead(Protocol):
    """One window's events as the read layer gives them to `Sink.write_window` (`reader.Reading`)."""

    @property
    def batches(self) -> Iterable[pa.RecordBatch]:
        """The window's batches, in member order then line order."""
        ...

    def hour_records(self) -> list[HourRecord]:
        """One ledger record per hour, with its attempts and split_from; valid once `batches` is consumed."""
        ...


class Sink(Protocol):
    """What the pipeline needs from a destination."""

    description: str  # where the data goes, for messages (never a password)

    def ledger(self, project: str) -> dict[datetime, HourRecord]:
        """Every hour the destination has a ledger row for, for this project."""
        ...

    def projects(self) -> list[str]:
        """The projects the ledger holds hours for, sorted."""
        ...

    def write_window(self, project: str, window: Window, read: WindowRead) -> list[HourRecord]:
        """Replace the window's hours with `read.batches`, exactly once per uuid, and record them, atomically.

        In one transaction: drop the project's rows of the window's upload hours (a reload replaces them;
        other projects' rows stay), insert the new rows keeping the first row of each uuid (by member order,
        then line) and skipping uuids already stored under other hours, then take `read.hour_records()`, the
        per-hour records the reader built while the batches were consumed, fill in `events_loaded` and
        `duplicates` per hour, store them in the ledger and commit.
        Returns the stored records.
        """
        ...

    def record_hours(self, project: str, records: list[HourRecord]) -> None:
        """Store ledger rows for hours that have no events (empty, failed, too large), without touching rows."""
        ...

    def read_arrow(
        self, start: datetime | None = None, end: datetime | None = None, project: str | None = None
    ) -> pa.Table:
        """The stored events (of one project, or all), optionally those with `server_upload_time` in
        [start, end], as an Arrow table."""
        ...

    def count_by_hour(self, project: str) -> dict[datetime, int]:
        """How many rows of `project` `events` holds per `_upload_hour` (for `verify`)."""
        ...

    def deletion_records(self, project: str) -> list[DeletionRecord]:
        """The deletion jobs applied to `project` (`_amplitude_deletions`), by day."""
        ...

    def delete_users(self, project: str, amplitude_ids: list[int], record: DeletionRecord) -> DeletionRecord:
        """In one transaction: delete every row of `project` whose amplitude_id is in `amplitude_ids` from `events`
        (lowering its hours' `events_loaded`) and from `cohort_members` where it exists, and store `record` with
        `rows_deleted` and `cohort_rows_deleted` raised by what was deleted. Returns the stored record."""
        ...

    def read_batches(self, columns: Sequence[str] | None = None, *, project: str | None = None) -> pa.RecordBatchReader:
        """The stored events (of one project, or all), only `columns` (every column by default), as a stream of
        Arrow batches typed as `schema.arrow_schema(columns)`, in no particular order; memory stays bounded
        however many events there are (what the report reads)."""
        ...

    def close(self) -> None:
        """Release connections and locks."""
        ...


class Maintainable(Protocol):
    """What `amplitude-export maintain` needs from a table format's sink (an optional part of a Sink;
    `maintenance.maintain` is the library's entry)."""

    def maintain(self, *, compact: bool = True, older_than: timedelta | None = None) -> Maintenance:
        """Compact small files (when `compact`), then delete what no snapshot or version younger than
        `older_than` needs (None: the format's default); say what was done."""
        ...


def with_project(batches: Iterable[pa.RecordBatch], project: str) -> Iterator[pa.RecordBatch]:
    """The batches with `_project` set to `project`: the column a window's reload deletes by must hold the
    project the window is written for, whoever built the batches."""
    for batch in batches:
        index = batch.schema.get_field_index("_project")
        column = pa.repeat(pa.scalar(project, pa.string()), batch.num_rows)
        arrays = batch.columns
        arrays[index] = column
        yield pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


try:  # built with the reader's compiled parser (setup.py); without a compiler the Python set below does the job
    from .._fastparse import StringSet as _StringSet
except ImportError:  # pragma: no cover - exercised by the tests through compiled=False
    _StringSet = None

# uuids a window deduplicates in memory before SQL has to remove the rest (slowly: +5 s for a window of 1 M
# events past the limit, measured): ~77 bytes each compiled, so 2 M keep a DuckDB run near 900 MB RSS (902 MiB
# for a 1.9 M-event window, measured); ~120 bytes each as Python strings
SEEN_LIMIT = 2_000_000 if _StringSet is not None else 1_000_000


def _strings(column: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    """The column's chunks as plain `string` arrays (DuckDB may answer with large or view strings)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    return [chunk if chunk.type == pa.string() else chunk.cast(pa.string()) for chunk in chunks]


class _CompiledSet:
    """`_fastparse.StringSet` over Arrow arrays: no Python string per row."""

    def __init__(self) -> None:
        self._set = _StringSet()

    def __len__(self) -> int:
        return len(self._set)

    def add(self, column: pa.Array, *, taken: bool = False) -> pa.Array | None:
        validity, offsets, data = column.buffers()
        mask = self._set.add(offsets, data, validity, column.offset, len(column), taken)
        return None if mask is None else pa.Array.from_buffers(pa.bool_(), len(column), [None, pa.py_buffer(mask)])

    def own(self) -> pa.Array:
        count, offsets, data = self._set.own()
        return pa.Array.from_buffers(pa.large_string(), count, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


class _PythonSet:
    """The same over Python sets, where the compiled module was not built."""

    def __init__(self) -> None:
        self._own: set[str] = set()
        self._taken: set[str] = set()

    def __len__(self) -> int:
        return len(self._own)

    def add(self, column: pa.Array, *, taken: bool = False) -> pa.Array | None:
        values = column.to_pylist()
        own, other = self._own, self._taken
        target = other if taken else own
        distinct = set(values)
        distinct.discard(None)
        if len(distinct) == len(values) - column.null_count and own.isdisjoint(distinct) and other.isdisjoint(distinct):
            target |= distinct  # the common case, at C speed: no repeat
            return None
        keep = np.ones(len(values), dtype=bool)
        for row, value in enumerate(values):
            if value is None:
                continue
            if value in own or value in other:
                keep[row] = False
            else:
                target.add(value)
        return pa.array(keep)

    def own(self) -> pa.Array:
        return pa.array(list(self._own), pa.large_string())


class FirstCopies:
    """Finds each row whose uuid an earlier row of the same window had, so the first copy in arrival order
    (member order, then line) is the one kept; rows without a uuid are always kept.

    Sinks drop repeats before the rows reach the database because removing them afterwards costs far more
    (DuckDB rewrites freshly inserted row groups at commit; PostgreSQL sorts the whole window). `taken` uuids
    (held by other hours) are dropped too, without counting as the window's. The set costs ~70 bytes per uuid
    (compiled; ~120 as Python strings), so it stops growing at `limit`: from then on (`overflowed`) rows pass
    unfiltered and the sink removes the remaining repeats in SQL.
    """

    def __init__(
        self, limit: int = SEEN_LIMIT, taken: pa.Array | pa.ChunkedArray | None = None, *, compiled: bool | None = None
    ) -> None:
        if compiled is None:
            compiled = _StringSet is not None
        self.limit = limit
        self.overflowed = False
        self._set: _CompiledSet | _PythonSet = _CompiledSet() if compiled else _PythonSet()
        for chunk in _strings(taken) if taken is not None else []:
            self._set.add(chunk, taken=True)

    @property
    def uuids(self) -> pa.Array:
        """The window's uuids kept so far (all of them, unless `overflowed`), in no particular order."""
        return self._set.own()

    def keep(self, batch: pa.RecordBatch) -> pa.Array | None:
        """A boolean mask of the batch's rows to keep, or None to keep them all."""
        if len(self._set) >= self.limit:
            self.overflowed = True
            return None
        (column,) = _strings(batch.column("uuid"))
        return self._set.add(column)

    def filter(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The batch without repeated uuids: the batch itself when it has none, else one filtered copy (one copy
        costs the sinks less than zero-copy slices around each repeat: they pay per batch, docs/PARSE_DESIGN.md)."""
        keep = self.keep(batch)
        return batch if keep is None else batch.filter(keep)


def _client_error(exc: Exception) -> bool:
    """Whether `exc` is botocore's own (no endpoint, no credentials): s3fs turns the server's answers into
    OSError, but not these."""
    exceptions = sys.modules.get("botocore.exceptions")
    return exceptions is not None and isinstance(exc, exceptions.BotoCoreError)


def open_sink(dest: str, *, storage_options: dict[str, Any] | None = None, **options: object) -> Sink:
    """Open the destination that `dest` names: `duckdb:PATH`, `parquet:DIR`, `iceberg:DIR` (or another
    `iceberg:` URL, see `iceberg_catalog`), `delta:PATH_OR_URL` or `postgresql://...`.

    `storage_options` go to the filesystem of a `parquet:` or `delta:` URL on object storage (`s3://`, `gs://`,
    ...), or to an `iceberg:` destination's catalog and FileIO; an error's message never shows their values."""
    scheme, sep, rest = dest.partition(":")
    if not sep:
        raise UsageError(
            f"cannot read destination {dest!r}: use duckdb:PATH, parquet:DIR, iceberg:DIR, delta:PATH or "
            "postgresql://...")
    scheme = scheme.lower()
    if storage_options and scheme != "iceberg" and (
        scheme not in ("parquet", "delta") or "://" not in rest or rest.lower().startswith(("file://", "local://"))
    ):
        raise UsageError("storage options apply to parquet: and delta: URLs on object storage (s3://, gs://, ...) "
                         "and to iceberg: destinations")
    if scheme == "duckdb":
        from .duckdb import DuckDBSink

        return DuckDBSink(Path(rest), **options)  # type: ignore[arg-type]
    if scheme == "parquet":
        from ..storage import redact
        from .parquet import ParquetSink

        try:
            return ParquetSink(rest, storage_options=storage_options, **options)  # type: ignore[arg-type]
        except AmplitudeExportError as exc:
            exc.args = (redact(str(exc), storage_options),)
            raise
        except Exception as exc:
            detail = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                            storage_options)
            if storage_options and isinstance(exc, TypeError | AttributeError | ValueError):
                # the filesystem's constructor or session refused an option (unknown name, wrong type)
                raise UsageError(f"parquet:{rest}: the storage options do not suit its filesystem: "
                                 f"{type(exc).__name__}: {detail}") from None
            if not _client_error(exc):
                raise
            raise DestinationError(f"cannot open Parquet dataset {rest}: {detail}") from None
    if scheme == "iceberg":
        from ..storage import redact
        from .iceberg_catalog import require_pyiceberg

        require_pyiceberg()
        from .iceberg import IcebergSink

        try:
            return IcebergSink(rest, storage_options=storage_options, **options)  # type: ignore[arg-type]
        except AmplitudeExportError as exc:
            exc.args = (redact(str(exc), storage_options),)
            raise
    if scheme == "delta":
        try:
            from .delta import DeltaSink
        except ModuleNotFoundError as exc:
            if (exc.name or "").partition(".")[0] != "deltalake":
                raise
            raise UsageError("Delta Lake destinations need deltalake: pip install 'amplitude-export[delta]'") from None
        from ..storage import redact

        try:
            return DeltaSink(rest, storage_options=storage_options, **options)  # type: ignore[arg-type]
        except AmplitudeExportError as exc:
            exc.args = (redact(str(exc), storage_options),)
            raise
    if scheme in ("postgresql", "postgres"):
        try:
            from .postgres import PostgresSink
        except ModuleNotFoundError as exc:
            if exc.name != "psycopg" and not (exc.name or "").startswith("psycopg"):
                raise
            raise UsageError(
                "PostgreSQL destinations need psycopg: pip install 'amplitude-export[postgres]'"
            ) from None

        return PostgresSink(dest, **options)  # type: ignore[arg-type]
    raise UsageError(
        f"unknown destination scheme {scheme!r} in {dest!r}: use duckdb:, parquet:, iceberg:, delta: or "
        "postgresql://")

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
from typing import Any, Protocol

import pyarrow as pa

from ..errors import AmplitudeExportError, DestinationError, UsageError
from ..ledger import DeletionRecord, HourRecord
from ..windows import Window
from .maintenance import Maintenance, lost_file_hint
from .staging import SEEN_LIMIT, FirstCopies

__all__ = ["SEEN_LIMIT", "FirstCopies", "Maintainable", "Sink", "lost_file_hint", "open_sink", "with_project"]


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
    """What the pipeline needs from a destination.

    Optional: `parse_threads` (the most parse threads worth running for it) and `shares_cores` (its server runs on
    this machine, so the load's parse threads give way to it); the loader reads them with `getattr`.
    """

    description: str  # where the data goes, for messages (never a password)

    def ledger(self, project: str) -> dict[datetime, HourRecord]:
        """Every hour the destination has a ledger row for, for this project."""
        ...

    def projects(self) -> list[str]:
        """The projects the ledger holds hours for, or that have stream tables, sorted."""
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

    def drop_missing_files(self) -> list[str]:
        """Remove from the table the data files it names that are gone from storage; their paths."""
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

"""Destinations for events, one module each behind the small `Sink` protocol below.

`open_sink("duckdb:PATH" | "parquet:DIR" | "postgresql://...")` picks the module by the URL's scheme. Every sink
keeps the ledger (see `ledger.py`) inside the destination and commits a window's rows and its ledger rows
together, so the destination is the only record of progress.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Protocol

import pyarrow as pa

from ..errors import UsageError
from ..ledger import HourRecord
from ..windows import Window


class Sink(Protocol):
    """What the pipeline needs from a destination."""

    description: str  # where the data goes, for messages (never a password)

    def ledger(self, project: str) -> dict[datetime, HourRecord]:
        """Every hour the destination has a ledger row for, for this project."""
        ...

    def projects(self) -> list[str]:
        """The projects the ledger holds hours for, sorted."""
        ...

    def write_window(
        self,
        project: str,
        window: Window,
        batches: Iterable[pa.RecordBatch],
        finish: Callable[[], list[HourRecord]],
    ) -> list[HourRecord]:
        """Replace the window's hours with `batches`, exactly once per uuid, and record them, atomically.

        In one transaction: drop the project's rows of the window's upload hours (a reload replaces them;
        other projects' rows stay), insert the new rows keeping the first row of each uuid (by member order,
        then line) and skipping uuids already stored under other hours, then call `finish()` for the per-hour
        records the reader built while the batches were consumed, fill in `events_loaded` and `duplicates` per
        hour, store them in the ledger and commit.
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

    def close(self) -> None:
        """Release connections and locks."""
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


SEEN_LIMIT = 1_000_000  # uuids a window deduplicates in memory (~120 bytes each) before SQL has to


class FirstCopies:
    """Drops each row whose uuid an earlier row of the same window had, so the first copy in arrival order
    (member order, then line) is the one kept; rows without a uuid are always kept.

    Sinks drop repeats before the rows reach the database because removing them afterwards costs far more
    (DuckDB rewrites freshly inserted row groups at commit; PostgreSQL sorts the whole window). The set of seen
    uuids costs ~120 bytes each, so it stops growing at `limit`: from then on (`overflowed`) rows pass
    unfiltered and the sink removes the remaining repeats in SQL.
    """

    def __init__(self, limit: int = SEEN_LIMIT, taken: set[str] | None = None) -> None:
        self.limit = limit
        self.overflowed = False
        self._seen: set[str] = set()
        self._taken = taken or set()  # uuids other hours already hold: dropped too, but not the window's own

    @property
    def seen(self) -> set[str]:
        """The uuids kept so far (all of the window's, unless `overflowed`)."""
        return self._seen

    def filter(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        """The batch without repeated uuids, as zero-copy slices around them (a `filter` would copy it all)."""
        seen = self._seen
        if len(seen) >= self.limit:
            self.overflowed = True
            return [batch]
        column = batch.column("uuid")
        uuids = column.to_pylist()
        distinct = set(uuids)
        distinct.discard(None)
        taken = self._taken
        if (len(distinct) == len(uuids) - column.null_count and seen.isdisjoint(distinct)
                and taken.isdisjoint(distinct)):
            seen |= distinct  # the common case, at C speed: nothing to drop
            return [batch]
        slices = []
        start = 0
        for row, uuid in enumerate(uuids):
            if uuid is None:
                continue
            if uuid in seen or uuid in taken:
                if row > start:
                    slices.append(batch.slice(start, row - start))
                start = row + 1
            else:
                seen.add(uuid)
        if start < len(uuids):
            slices.append(batch.slice(start))
        return slices


def open_sink(dest: str, **options: object) -> Sink:
    """Open the destination that `dest` names: `duckdb:PATH`, `parquet:DIR` or `postgresql://...`."""
    scheme, sep, rest = dest.partition(":")
    if not sep:
        raise UsageError(f"cannot read destination {dest!r}: use duckdb:PATH, parquet:DIR or postgresql://...")
    scheme = scheme.lower()
    if scheme == "duckdb":
        from .duckdb import DuckDBSink

        return DuckDBSink(Path(rest), **options)  # type: ignore[arg-type]
    if scheme == "parquet":
        from .parquet import ParquetSink

        return ParquetSink(rest, **options)  # type: ignore[arg-type]
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
    raise UsageError(f"unknown destination scheme {scheme!r} in {dest!r}: use duckdb:, parquet: or postgresql://")

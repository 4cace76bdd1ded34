"""The write algorithm every sink shares, whatever the engine: count, deduplicate, fill the ledger records.

A window's batches pass `StagedCounts` (rows per upload hour, and a refusal of any row outside the window: it
would survive the window's next reload) and `FirstCopies` (the first row of each uuid, in member then line
order, is the one kept). After the insert, `fill_counts` turns what was staged and what was loaded per hour into
the ledger records' `events_loaded` and `duplicates`. Before a file-based sink makes a new destination,
`foreign_entries` and `foreign_message` refuse a directory holding anything but its own and `ignorable` entries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..ledger import HourRecord
from ..schema import ARROW_SCHEMA, COLUMN_NAMES
from ..windows import Window

try:  # built with the reader's compiled parser (setup.py); without a compiler the Python set below does the job
    from .._fastparse import StringSet as _StringSet
except ImportError:  # pragma: no cover - exercised by the tests through compiled=False
    _StringSet = None

# uuids a window deduplicates in memory before SQL has to remove the rest (slowly, per event past the limit):
# ~77 bytes each compiled, which keeps a DuckDB run under 1 GB RSS; ~120 bytes each as Python strings
SEEN_LIMIT = 2_000_000 if _StringSet is not None else 1_000_000


def check_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch with exactly ARROW_SCHEMA (cast if the reader's types differ only in detail)."""
    if batch.schema.equals(ARROW_SCHEMA):
        return batch
    try:
        return batch.select(list(COLUMN_NAMES)).cast(ARROW_SCHEMA)
    except (KeyError, ValueError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"batch does not match schema.ARROW_SCHEMA: {exc}") from exc


class StagedCounts:
    """Rows per upload hour of a window's batches, before duplicates are dropped; a row whose `_upload_hour` is
    missing or outside the window is refused (ValueError), as the window's next reload would not replace it."""

    def __init__(self, window: Window) -> None:
        self.window = window
        self.staged: dict[datetime, int] = {}

    def add(self, batch: pa.RecordBatch) -> None:
        """Count the batch's rows by hour, or raise ValueError for a row outside the window."""
        hours = batch.column("_upload_hour")
        if batch.num_rows == 0:
            return
        bounds = pc.min_max(hours)
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        if hours.null_count or low < self.window.start or high > self.window.end:
            raise ValueError(f"{self.window}: rows have an _upload_hour outside the window")
        counts = pc.value_counts(hours)
        for hour, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True):
            hour = hour.astimezone(UTC)
            self.staged[hour] = self.staged.get(hour, 0) + n


def count_hours(batch: pa.RecordBatch, into: dict[datetime, int]) -> None:
    """Add the batch's rows per `_upload_hour` to `into` (no checks: for rows already counted by StagedCounts)."""
    counts = pc.value_counts(batch.column("_upload_hour"))
    for hour, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True):
        hour = hour.astimezone(UTC)
        into[hour] = into.get(hour, 0) + n


def check_records(window: Window, staged: dict[datetime, int], records: list[HourRecord]) -> None:
    """Refuse to commit rows of an hour the reader built no ledger record for."""
    missing = set(staged) - {record.hour for record in records}
    if missing:
        raise ValueError(f"window {window}: no ledger record for hours {sorted(missing)[:3]}")


def fill_counts(
    records: list[HourRecord], staged: dict[datetime, int], loaded: dict[datetime, int], now: datetime
) -> list[HourRecord]:
    """Copies of `records` with `events_loaded`, `duplicates` and `updated_at` set from what the sink did."""
    out = []
    for record in records:
        hour = record.hour.astimezone(UTC)
        n_loaded = loaded.get(hour, 0)
        out.append(
            dataclasses.replace(
                record, events_loaded=n_loaded, duplicates=staged.get(hour, 0) - n_loaded, updated_at=now
            )
        )
    return out


def loaded_meanwhile(stored: HourRecord | None, seen: HourRecord | None, read: HourRecord) -> bool:
    """Whether another run stored the ledger row `stored` since this one found `seen`, from the same data as
    `read` (same status and content hash: what `recheck` calls unchanged)."""
    return (stored is not None and stored != seen and stored.run_id != read.run_id
            and stored.status == read.status and stored.content_hash == read.content_hash)


def first_line(exc: BaseException) -> str:
    """The first line of an engine's error, for a DestinationError's message."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


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


def ignorable(name: str) -> bool:
    """Whether a directory entry counts as empty space where a new destination is made: a hidden file
    (`.DS_Store`, `.gitkeep`) or a volume's `lost+found`."""
    return name.startswith(".") or name == "lost+found"


def foreign_entries(names: Iterable[str], ours: Collection[str] = (), *, prefixes: tuple[str, ...] = ()) -> list[str]:
    """The entries among `names` (a directory's, where a new destination is to be made) that are not the
    destination's own (named in `ours` or starting with one of `prefixes`) nor `ignorable`, sorted."""
    return sorted(name for name in names if name not in ours and not name.startswith(prefixes) and not ignorable(name))


def foreign_message(where: str, others: list[str], lacking: str, advice: str) -> str:
    """The one-line refusal of a new destination at `where`, which holds `others` (from `foreign_entries`) but
    not the `lacking` part of an existing one."""
    return f"{where} holds files ({others[0]!r}) but no {lacking}: {advice}"

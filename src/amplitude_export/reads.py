"""Reading a destination back: its events as a stream of Arrow batches, an Arrow table or a pandas DataFrame;
the tables of `run --streams`; what `status` and `verify` show.

`start` and `end` name whole UTC upload hours (`server_upload_time`), both inclusive: the CLI's forms
(`2024-03-01`, `20240301T05`), ISO 8601 times (`2024-03-01T05:00:00Z`), dates (a whole day) or aware datetimes,
each naming the hour that holds it; an end before the start is refused. `project` keeps to one project's events
(all projects when None); `columns` to those columns (a string: that one column); `schema` names a PostgreSQL
destination's schema, as `--schema` does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .api import DATA_DIR, Hour, destination, hour_text, open_for_reading, resolve_project
from .errors import UsageError

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from .verify import Verification

TIME_COLUMN = "server_upload_time"
PANDAS_MISSING = "read_events needs pandas: pip install 'amplitude-export[pandas]'"


def _bounds(start: str | date | None, end: str | date | None) -> tuple[datetime | None, datetime | None]:
    """The first and last moments of start..end (UTC hours, both inclusive); an end before the start is refused."""
    from .windows import HOUR, as_hour, label_hour

    first, last = as_hour(start, is_end=False), as_hour(end, is_end=True)
    if first is not None and last is not None and last < first:
        raise UsageError(f"end {label_hour(last)} is before start {label_hour(first)}")
    # the end hour is inclusive: every microsecond of it
    return first, last + HOUR - timedelta(microseconds=1) if last is not None else None


def _columns(columns: str | Sequence[str] | None) -> Sequence[str] | None:
    return [columns] if isinstance(columns, str) else columns  # one name, not its letters


def read_batches(
    dest: str,
    columns: Sequence[str] | None = None,
    *,
    start: str | datetime | None = None,
    end: str | datetime | None = None,
    project: str | None = None,
    storage_options: dict[str, Any] | None = None,
    schema: str | None = None,
) -> pa.RecordBatchReader:
    """The loaded events of `dest` as a stream of Arrow batches (a `pyarrow.RecordBatchReader`), only `columns`
    (all by default), in no particular order; memory stays bounded however many events there are. The
    destination stays open until the reader is exhausted or closed (`with read_batches(...) as reader:`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from .schema import arrow_schema
    from .sinks import open_sink

    first, last = _bounds(start, end)
    wanted = arrow_schema(_columns(columns))
    read = list(wanted.names)
    if (first is not None or last is not None) and TIME_COLUMN not in read:
        read.append(TIME_COLUMN)  # to filter on; left out of the batches handed back
    bounds = [
        (compare, bound) for compare, bound in ((pc.greater_equal, first), (pc.less_equal, last)) if bound is not None
    ]
    sink = open_sink(destination(dest, schema=schema), read_only=True, storage_options=storage_options)
    try:
        stream = sink.read_batches(read, project=project)
    except BaseException:
        sink.close()
        raise

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            for batch in stream:
                for compare, bound in bounds:  # a null time is left out, as SQL's WHERE leaves it out
                    times = batch.column(TIME_COLUMN)
                    batch = batch.filter(compare(times, pa.scalar(bound, times.type)))
                if batch.num_rows:
                    yield batch.select(wanted.names)
        finally:
            stream.close()
            sink.close()

    return pa.RecordBatchReader.from_batches(wanted, batches())


def read_arrow(
    dest: str,
    start: str | datetime | None = None,
    end: str | datetime | None = None,
    *,
    project: str | None = None,
    columns: Sequence[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    schema: str | None = None,
) -> pa.Table:
    """The loaded events of `dest` (`duckdb:PATH`, `parquet:DIR`, `postgresql://...`, ...) as an Arrow table, in
    load order; with `columns`, only those (read as a stream, in no particular order).

    `storage_options` go to the filesystem of a `parquet:` URL on object storage (fsspec's keyword arguments,
    e.g. `{"endpoint_url": ..., "key": ..., "secret": ...}` for S3); without them its usual environment
    variables and credential chain apply."""
    from .sinks import open_sink

    if columns is not None:
        reader = read_batches(dest, columns, start=start, end=end, project=project, storage_options=storage_options,
                              schema=schema)
        with reader:
            return reader.read_all()
    first, last = _bounds(start, end)
    sink = open_sink(destination(dest, schema=schema), read_only=True, storage_options=storage_options)
    try:
        return sink.read_arrow(first, last, project)
    finally:
        sink.close()


def read_events(
    dest: str,
    start: str | datetime | None = None,
    end: str | datetime | None = None,
    *,
    project: str | None = None,
    columns: Sequence[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    schema: str | None = None,
) -> pd.DataFrame:
    """Like `read_arrow`, as a pandas DataFrame whose columns keep their Arrow types (`pd.ArrowDtype`): a BIGINT
    column with nulls stays integers, timestamps stay UTC-aware, JSON columns are text.

    pandas is an extra (`pip install 'amplitude-export[pandas]'`); without it this raises a UsageError naming it,
    before reading anything."""
    try:
        import pandas as pd
    except ImportError:
        raise UsageError(PANDAS_MISSING) from None
    table = read_arrow(dest, start, end, project=project, columns=columns, storage_options=storage_options,
                       schema=schema)
    return table.to_pandas(types_mapper=pd.ArrowDtype)


def read_table(
    dest: str, name: str, *, project: str | None = None, storage_options: dict[str, Any] | None = None
) -> pa.Table:
    """The rows of a table `run --streams` loaded (`cohorts`, `cohort_members`, `annotations`, `events_list`,
    `event_types`, `event_properties`, `user_properties`, `active_users`, `average_session_length`) as an Arrow
    table with `_project` first, of `project` or of all projects; empty if no run loaded it yet."""
    from .sinks import open_sink
    from .stream_tables import TABLES

    if name not in TABLES:
        raise UsageError(f"unknown table {name!r}: choose from {', '.join(TABLES)}")
    sink = open_sink(dest, read_only=True, storage_options=storage_options)
    try:
        return sink.read_table(name, TABLES[name].schema, project)  # type: ignore[attr-defined]
    finally:
        sink.close()


def status(
    dest: str | None = None,
    *,
    project: str | None = None,
    api_key: str | None = None,
    data_dir: str | Path = DATA_DIR,
    start: Hour | None = None,
    end: Hour | None = None,
    schema: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the destination holds, as plain data (`amplitude-export status --json`): its spans of hours, every
    ledger row, and where the next run starts; `start`/`end` limit what is shown."""
    from .status import hour_range, status_data

    first, last = hour_range(hour_text(start), hour_text(end, is_end=True))
    sink = open_for_reading(destination(dest, Path(data_dir), schema=schema), storage_options=storage_options)
    try:
        return status_data(sink, resolve_project(project, api_key, sink), start=first, end=last)
    finally:
        sink.close()


def verify(
    dest: str | None = None,
    *,
    project: str | None = None,
    api_key: str | None = None,
    data_dir: str | Path = DATA_DIR,
    deep: bool = False,
    schema: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Verification:
    """Check that the destination is complete: every hour from the first to the last loaded is present and whole
    (`amplitude-export verify`); with `deep`, the archives kept under DATA_DIR/raw are hashed again."""
    from .verify import verify as verify_sink

    sink = open_for_reading(destination(dest, Path(data_dir), schema=schema), storage_options=storage_options)
    try:
        name = resolve_project(project, api_key, sink)
        result = verify_sink(sink, name, deep=deep, raw_dir=Path(data_dir) / "raw")
        result.destination, result.project = sink.description, name
        return result
    finally:
        sink.close()

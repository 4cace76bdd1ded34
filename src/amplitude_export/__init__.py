"""amplitude-export: move raw events out of Amplitude's Export API into DuckDB, Parquet, PostgreSQL and pandas.

The library is what the CLI calls: `pipeline.run` / `pipeline.extract` / `pipeline.load` do the work, and
`read_events` / `read_arrow` give the loaded events back; `read_table` the tables of `run --streams`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

__all__ = ["__version__", "read_arrow", "read_events", "read_table"]


def _hour(value: str | datetime | None, *, is_end: bool) -> datetime | None:
    from .windows import HOUR, as_hour

    hour = as_hour(value, is_end=is_end)
    if hour is not None and is_end:
        return hour + HOUR - timedelta(microseconds=1)  # the end hour is inclusive: every microsecond of it
    return hour


def read_arrow(
    dest: str,
    start: str | datetime | None = None,
    end: str | datetime | None = None,
    *,
    project: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> pa.Table:
    """The loaded events of `dest` (`duckdb:PATH`, `parquet:DIR`, `postgresql://...`) as an Arrow table,
    optionally only those whose `server_upload_time` falls in the UTC hours start..end (inclusive), and only
    those of `project` (the `--project` they were loaded under; all projects when None). `start` and `end` take
    the CLI's forms (`2024-03-01`, `20240301T05`, ...) or aware datetimes, which name the hour that holds them.

    `storage_options` go to the filesystem of a `parquet:` URL on object storage (fsspec's keyword arguments,
    e.g. `{"endpoint_url": ..., "key": ..., "secret": ...}` for S3); without them its usual environment
    variables and credential chain apply."""
    from .sinks import open_sink

    first, last = _hour(start, is_end=False), _hour(end, is_end=True)
    sink = open_sink(dest, read_only=True, storage_options=storage_options)
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
    storage_options: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Like `read_arrow`, as a pandas DataFrame (timestamps UTC-aware, JSON columns as text).

    pandas is an extra (`pip install 'amplitude-export[pandas]'`); without it this raises a UsageError naming it,
    before reading anything."""
    try:
        import pandas  # noqa: F401 - only to fail before the read, naming the extra
    except ImportError:
        from .errors import UsageError

        raise UsageError("read_events needs pandas: pip install 'amplitude-export[pandas]'") from None
    return read_arrow(dest, start, end, project=project, storage_options=storage_options).to_pandas()


def read_table(
    dest: str, name: str, *, project: str | None = None, storage_options: dict[str, Any] | None = None
) -> pa.Table:
    """The rows of a table `run --streams` loaded (`cohorts`, `cohort_members`, `annotations`, `events_list`,
    `event_types`, `event_properties`, `user_properties`, `active_users`, `average_session_length`) as an Arrow
    table with `_project` first, of `project` or of all projects; empty if no run loaded it yet."""
    from .errors import UsageError
    from .sinks import open_sink
    from .stream_tables import TABLES

    if name not in TABLES:
        raise UsageError(f"unknown table {name!r}: choose from {', '.join(TABLES)}")
    sink = open_sink(dest, read_only=True, storage_options=storage_options)
    try:
        return sink.read_table(name, TABLES[name].schema, project)  # type: ignore[attr-defined]
    finally:
        sink.close()

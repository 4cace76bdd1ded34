"""`amplitude-export report`: one self-contained HTML page about what a destination holds.

Figures are gathered by SQL over a DuckDB connection on which the destination appears as two views,
`all_events` (the events table) and `ledger` (the per-hour ledger with a `project` column), so adding a
destination means adding the two views, nothing else; `gather` narrows `all_events` to one project's `events`.
For PostgreSQL the columns the figures need are streamed by COPY into a DuckDB file in a temporary directory
(bounded memory), since DuckDB's postgres extension would need a download. Only aggregates leave the database:
the page's size grows with the number of days and hours in the range, not with the number of events.

The page embeds its figures once, as JSON (`<script type="application/json" id="report-data">`), and draws them
with Vega-Lite specs (`chart_specs`); the Vega, Vega-Lite and vega-embed JavaScript ships with the package
(`report_assets/`, refreshed by tools/vendor_vega.sh) and is inlined, so the page opens offline. See docs/REPORT.md.
"""

from __future__ import annotations

import html
import json
import math
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, cast

import duckdb
import pyarrow as pa

from .errors import DestinationBusyError, DestinationError, UsageError
from .ledger import EMPTY, FAILED, LOADED, TOO_LARGE, HourRecord
from .schema import KNOWN_SOURCES
from .sinks.duckdb import configure
from .windows import HOUR, floor_hour, label_hour

TOP = 15  # rows kept for event types and countries; the rest is one "(other)" row
HOURLY_DAYS = 92  # the hourly chart covers at most the range's last 92 days (about 2,200 bars)
MISSING = "not loaded"  # an hour in range with no ledger row: no run has asked for it
DONE = (LOADED, EMPTY)
DAY = timedelta(days=1)
DESTINATIONS = "use duckdb:PATH, parquet:DIR, delta:PATH or postgresql://..."

# Lateness buckets: (label, upper bound in seconds); an event lands in the first bucket whose bound exceeds it.
LATENESS_BUCKETS: tuple[tuple[str, float], ...] = (
    ("< 1 min", 60),
    ("1-5 min", 300),
    ("5-15 min", 900),
    ("15-60 min", 3_600),
    ("1-6 h", 6 * 3_600),
    ("6-24 h", 86_400),
    ("1-3 days", 3 * 86_400),
    ("3-7 days", 7 * 86_400),
    ("> 7 days", math.inf),
)


def write_report(
    dest: str,
    out: Path,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    project: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Path:
    """Write the HTML report of destination `dest` to `out`; return `out`.

    `dest` is any destination `run` writes: `duckdb:PATH`, `parquet:DIR` (or an fsspec URL such as
    `parquet:s3://bucket/prefix`), `delta:PATH_OR_URL` or `postgresql://...`.

    `start` and `end` are UTC upload hours, both inclusive (default: everything the destination holds). `project`
    picks the ledger to read; by default the only one there (a destination holding several needs it named).
    `storage_options` go to the filesystem of a `parquet:` or `delta:` URL on object storage, as for
    `read_arrow`.
    """
    with open_views(dest, storage_options) as con:
        data = gather(con, start=start, end=end, project=project)
    data["meta"]["destination"] = dest
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(data), encoding="utf-8")
    return out


# -- the views ----------------------------------------------------------------------------------------------


@contextmanager
def open_views(dest: str, storage_options: dict[str, Any] | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB connection on which `dest` appears as views `all_events` and `ledger`, read-only."""
    scheme, sep, rest = dest.partition(":")
    if not sep or not rest:
        raise UsageError(f"cannot read destination {dest!r}: {DESTINATIONS}")
    if storage_options and scheme.lower() not in ("parquet", "delta"):
        raise UsageError("storage options apply to parquet: and delta: URLs on object storage (s3://, gs://, ...)")
    if scheme.lower() in ("postgresql", "postgres"):
        with tempfile.TemporaryDirectory(prefix="amplitude-report-") as scratch:
            con = duckdb.connect(str(Path(scratch) / "copy.duckdb"), config={"threads": 2, "memory_limit": "1GB"})
            try:
                configure(con)
                _postgres_views(con, dest, Path(scratch))
                yield con
            finally:
                con.close()
        return
    con = duckdb.connect(":memory:", config={"threads": 2, "memory_limit": "1GB"})
    try:
        configure(con)  # TIMESTAMPTZ shown and cast as UTC whatever the machine's zone; no progress bar
        scheme = scheme.lower()
        if scheme == "duckdb":
            _duckdb_views(con, Path(rest).expanduser())
        elif scheme == "parquet":
            _parquet_views(con, rest, storage_options)
        elif scheme == "delta":
            _delta_views(con, rest, storage_options)
        else:
            raise UsageError(f"cannot read destination {dest!r}: {DESTINATIONS}")
        yield con
    finally:
        con.close()


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _duckdb_views(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    from .sinks.duckdb import EVENTS, LEDGER

    if not path.is_file():
        raise DestinationError(f"no DuckDB database at {path}")
    try:
        con.execute(f"ATTACH {_literal(str(path))} AS src (READ_ONLY)")
    except duckdb.Error as exc:
        if "lock" in str(exc).lower():
            raise DestinationBusyError(
                f"DuckDB database {path} is in use by a run (it allows no readers then); report after it ends"
            ) from None
        raise DestinationError(f"cannot open DuckDB database {path}: {_first_line(exc)}") from None
    try:
        con.execute(f"CREATE VIEW all_events AS SELECT * FROM src.{EVENTS}")
        con.execute(f"CREATE VIEW ledger AS SELECT * FROM src.{LEDGER}")
    except duckdb.CatalogException:
        raise DestinationError(f"{path} holds no amplitude-export tables (events, {LEDGER})") from None


# the columns the figures read, and all a PostgreSQL destination has to copy out
REPORT_COLUMNS = (
    "_project", "_upload_hour", "_extra", "amplitude_id", "event_time", "server_upload_time", "event_type",
    "platform", "country",
)


def _postgres_views(con: duckdb.DuckDBPyConnection, url: str, scratch: Path) -> None:
    """Copy the report's columns out of PostgreSQL (CSV by COPY, to a file) and its ledger into `con`."""
    import psycopg
    from psycopg import sql

    from .schema import ALL_COLUMNS, DUCKDB_TYPES
    from .sinks.duckdb import records_table
    from .sinks.postgres import PostgresSink

    with PostgresSink(url, read_only=True) as sink:
        projects = [row[0] for row in sink.conn.execute(
            sql.SQL("SELECT DISTINCT project FROM {}").format(sink._ledger)
        ).fetchall()]
        ledger = pa.concat_tables([records_table("", [])] + [
            records_table(project, list(sink.ledger(project).values())) for project in projects
        ])
        csv_path = scratch / "events.csv"
        query = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT (FORMAT csv)").format(
            sql.SQL(", ").join(map(sql.Identifier, REPORT_COLUMNS)), sink._events
        )
        try:
            with csv_path.open("wb") as out, sink.conn.cursor().copy(query) as copy:
                for chunk in copy:
                    out.write(chunk)
        except psycopg.Error as exc:
            raise DestinationError(f"{sink.description}: cannot read events: {_first_line(exc)}") from None
    kinds = {column.name: DUCKDB_TYPES[column.kind] for column in ALL_COLUMNS}
    columns = ", ".join(f"{_literal(name)}: {_literal(kinds[name])}" for name in REPORT_COLUMNS)
    con.execute(
        f"CREATE TABLE all_events AS SELECT * FROM read_csv({_literal(str(csv_path))}, header = false, "
        f"columns = {{{columns}}}, quote = '\"', escape = '\"', nullstr = '', allow_quoted_nulls = false)"
    )
    csv_path.unlink()
    con.register("_ledger_arrow", ledger)
    con.execute("CREATE TABLE ledger AS SELECT * FROM _ledger_arrow")
    con.unregister("_ledger_arrow")


def _parquet_views(con: duckdb.DuckDBPyConnection, root: str, storage_options: dict[str, Any] | None) -> None:
    """Events from the files the state names (not a glob: a crashed run's orphans are not data), ledger from JSON.

    `root` is anything the Parquet sink opens: a directory, `file://`, or any fsspec URL (`s3://`, `memory://`).
    """
    from .sinks import open_sink
    from .sinks.duckdb import events_ddl, records_table
    from .sinks.parquet import LocalDirectory, ParquetSink

    with cast(ParquetSink, open_sink(f"parquet:{root}", read_only=True, storage_options=storage_options)) as sink:
        files = sorted(sink.files)
        ledgers = sink.state_ledger
        store = sink.store
    if not files:
        con.execute(events_ddl("all_events"))
    elif isinstance(store, LocalDirectory):
        paths = ", ".join(_literal(store.abs(rel)) for rel in files)
        con.execute(
            f"CREATE VIEW all_events AS SELECT * FROM read_parquet([{paths}], hive_partitioning = true, "
            "union_by_name = true)"
        )
    else:  # read through fsspec, as the sink reads: DuckDB never needs the store's credentials
        con.execute(f"CREATE VIEW all_events AS SELECT * FROM {store.scan(con, files)}")
    tables = [
        records_table(name, [HourRecord.from_dict(d) for d in hours.values()])
        for name, hours in ledgers.items()
    ]
    ledger = pa.concat_tables(tables) if tables else records_table("", [])
    con.register("_ledger_arrow", ledger)
    con.execute("CREATE VIEW ledger AS SELECT * FROM _ledger_arrow")


def _delta_views(con: duckdb.DuckDBPyConnection, uri: str, storage_options: dict[str, Any] | None) -> None:
    """Events from the table's current snapshot (read through delta-rs), the ledger as the sink reads it."""
    from .sinks import open_sink
    from .sinks.delta import DeltaSink
    from .sinks.duckdb import records_table

    with cast(DeltaSink, open_sink(f"delta:{uri}", read_only=True, storage_options=storage_options)) as sink:
        con.register("_delta_events", sink.dataset())
        tables = [records_table(name, list(sink.ledger(name).values())) for name in sink.projects()]
    con.execute("CREATE VIEW all_events AS SELECT * FROM _delta_events")
    con.register("_ledger_arrow", pa.concat_tables(tables) if tables else records_table("", []))
    con.execute("CREATE VIEW ledger AS SELECT * FROM _ledger_arrow")


# -- gathering ----------------------------------------------------------------------------------------------


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    cursor = con.execute(sql, params or [])
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _iso_hour(column: str) -> str:
    """SQL for an hour as a string JavaScript parses as UTC (timestamps never leave DuckDB as objects)."""
    return f"strftime({column}, '%Y-%m-%dT%H:00:00Z')"


def _resolve_project(con: duckdb.DuckDBPyConnection, project: str | None) -> str | None:
    projects = [row[0] for row in con.execute("SELECT DISTINCT project FROM ledger ORDER BY 1").fetchall()]
    if project is not None:
        if projects and project not in projects:
            raise UsageError(f"the ledger knows no project {project!r}; it has {', '.join(projects)}")
        return project
    if len(projects) > 1:
        raise UsageError(f"the destination holds several projects ({', '.join(projects)}): name one")
    return projects[0] if projects else None


def _resolve_range(
    con: duckdb.DuckDBPyConnection, project: str | None, start: datetime | None, end: datetime | None
) -> tuple[datetime, datetime] | None:
    """First and last upload hour of the report (inclusive), defaulting to what the destination holds."""
    if start is None or end is None:
        row = con.execute(
            f"SELECT {_iso_hour('min(h)')}, {_iso_hour('max(h)')} FROM ("
            "SELECT hour AS h FROM ledger WHERE project IS NOT DISTINCT FROM ? "
            "UNION ALL SELECT min(_upload_hour) FROM events UNION ALL SELECT max(_upload_hour) FROM events)",
            [project],
        ).fetchall()[0]
        if row[0] is None:
            if start is None or end is None:
                return None
        else:
            start = start or datetime.fromisoformat(row[0])
            end = end or datetime.fromisoformat(row[1])
    assert start is not None and end is not None
    first, last = floor_hour(start), floor_hour(end)
    if last < first:
        raise UsageError(f"end {label_hour(last)} is before start {label_hour(first)}")
    return first, last


def gather(
    con: duckdb.DuckDBPyConnection,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    project: str | None = None,
) -> dict[str, Any]:
    """Every figure of the report, as JSON-ready data, from views `events` and `ledger` on `con`.

    Upload-time figures (hourly, lateness, health, windows) cover events whose upload hour is in the range;
    event-time figures (daily, users, types, platforms, countries) cover events whose `event_time` is in it.
    """
    project = _resolve_project(con, project)
    # the figures read `events`: the rows of this project only (one destination may hold several)
    where = "" if project is None else f" WHERE _project = {_literal(project)}"
    con.execute(f"CREATE OR REPLACE TEMP VIEW events AS SELECT * FROM all_events{where}")
    meta: dict[str, Any] = {
        "project": project,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "hourly_days": HOURLY_DAYS,
    }
    resolved = _resolve_range(con, project, start, end)
    if resolved is None:
        meta.update(start=None, end=None)
        return {"meta": meta, **_empty_figures()}
    first, last = resolved
    stop = last + HOUR  # exclusive
    meta.update(start=label_hour(first), end=label_hour(last))
    upload = "_upload_hour >= ? AND _upload_hour < ?"
    occurred = "event_time >= ? AND event_time < ?"
    span = [first, stop]

    ledger = _ledger_records(con, project, first, stop)
    stored = _stored_per_hour(con, upload, span)
    hourly = _hourly(ledger, stored, first, last)
    complete_through = _complete_until(ledger, first, last)
    lateness = _lateness(con, upload, span)
    p99 = lateness["quantiles"].get("p99")
    daily = _daily(con, occurred, span, first, last, complete_through, p99)
    totals = _rows(
        con,
        f"SELECT count(*) AS events, count(DISTINCT amplitude_id) AS users FROM events WHERE {upload}",
        span,
    )[0]
    by_status: dict[str, int] = {}
    for record in ledger.values():
        by_status[record.status] = by_status.get(record.status, 0) + 1
    hours_total = int((stop - first) / HOUR)
    totals.update(
        hours=hours_total,
        hours_by_status={**by_status, MISSING: hours_total - len(ledger)}
        if hours_total > len(ledger)
        else by_status,
        duplicates=sum(r.duplicates for r in ledger.values()),
        rejects=sum(r.rejects for r in ledger.values()),
        lines_read=sum(r.lines_read for r in ledger.values()),
        bytes=sum(r.bytes for r in ledger.values()),
        # the last hour of the unbroken run of loaded or empty hours the range starts with
        complete_through=label_hour(complete_through - HOUR) if complete_through else None,
    )
    meta["hourly_from"] = hourly[0]["hour"] if hourly else None
    return {
        "meta": meta,
        "totals": totals,
        "hourly": hourly,
        "daily": daily,
        "event_types": _top(con, "event_type", occurred, span),
        "platforms": _top(con, "platform", occurred, span),
        "countries": _top(con, "country", occurred, span),
        "lateness": lateness,
        "health": _health(con, ledger, stored, upload, span),
        "windows": _spans(ledger),
    }


def _empty_figures() -> dict[str, Any]:
    return {
        "totals": {"events": 0, "users": 0, "hours": 0, "hours_by_status": {}, "duplicates": 0, "rejects": 0,
                   "lines_read": 0, "bytes": 0, "complete_through": None},
        "hourly": [], "daily": [], "event_types": [], "platforms": [], "countries": [],
        "lateness": {"buckets": [{"bucket": label, "order": i, "events": 0}
                                 for i, (label, _) in enumerate(LATENESS_BUCKETS)],
                     "quantiles": {}, "negative": 0, "unknown": 0},
        "health": {"duplicates": 0, "rejects": 0, "retried_hours": [], "split_windows": [], "failed": [],
                   "unknown_fields": [], "ledger_mismatches": []},
        "windows": [],
    }  # fmt: skip


def _ledger_records(
    con: duckdb.DuckDBPyConnection, project: str | None, first: datetime, stop: datetime
) -> dict[datetime, HourRecord]:
    from .sinks.duckdb import record_from_row

    table = con.sql(
        "SELECT * FROM ledger WHERE project IS NOT DISTINCT FROM ? AND hour >= ? AND hour < ? ORDER BY hour",
        params=[project, first, stop],
    ).to_arrow_table()  # through Arrow: fetchall() on TIMESTAMPTZ needs pytz
    records = [record_from_row(row) for row in table.to_pylist()]
    return {record.hour: record for record in records}


def _complete_until(ledger: dict[datetime, HourRecord], first: datetime, last: datetime) -> datetime | None:
    """The end (exclusive) of the unbroken run of loaded or empty hours the range starts with; None if none."""
    hour = first
    while hour <= last and hour in ledger and ledger[hour].status in DONE:
        hour += HOUR
    return hour if hour > first else None


def _stored_per_hour(con: duckdb.DuckDBPyConnection, upload: str, span: list[datetime]) -> dict[str, int]:
    """Events stored per upload hour, keyed by `label_hour` (grouped first, formatted after: 10 M rows stay fast)."""
    rows = _rows(
        con,
        "SELECT strftime(hour, '%Y-%m-%dT%H') AS hour, n FROM ("
        f"SELECT _upload_hour AS hour, count(*) AS n FROM events WHERE {upload} GROUP BY 1)",
        span,
    )
    return {row["hour"]: row["n"] for row in rows}


def _hourly(
    ledger: dict[datetime, HourRecord], stored: dict[str, int], first: datetime, last: datetime
) -> list[dict[str, Any]]:
    """One row per upload hour of the range's last HOURLY_DAYS days: events stored and the ledger's status."""
    rows = []
    hour = max(first, last + HOUR - HOURLY_DAYS * DAY)
    while hour <= last:
        label = label_hour(hour)
        record = ledger.get(hour)
        row: dict[str, Any] = {
            "hour": f"{label}:00:00Z",
            "events": stored.get(label, 0),
            "status": record.status if record else MISSING,
        }
        if record and record.reason:
            row["reason"] = record.reason
        if record and record.attempts > 1:
            row["attempts"] = record.attempts
        if record and record.split_from:
            row["split_from"] = record.split_from
        rows.append(row)
        hour += HOUR
    return rows


def _daily(
    con: duckdb.DuckDBPyConnection,
    occurred: str,
    span: list[datetime],
    first: datetime,
    last: datetime,
    complete_through: datetime | None,
    p99: float | None,
) -> list[dict[str, Any]]:
    """Per UTC day of `event_time`: events, distinct users, new users; `final` once late events have had time."""
    per_day = {
        row["day"]: row
        for row in _rows(
            con,
            "SELECT strftime(day, '%Y-%m-%d') AS day, events, users FROM (SELECT "
            "CAST(timezone('UTC', event_time) AS DATE) AS day, count(*) AS events, "
            f"count(DISTINCT amplitude_id) AS users FROM events WHERE {occurred} GROUP BY 1)",
            span,
        )
    }
    # first seen anywhere in the destination, not just in the range: a user back after a month is not new
    new = {
        row["day"]: row["n"]
        for row in _rows(
            con,
            "SELECT strftime(timezone('UTC', first_seen), '%Y-%m-%d') AS day, count(*) AS n FROM ("
            "SELECT min(event_time) AS first_seen FROM events WHERE amplitude_id IS NOT NULL "
            "GROUP BY amplitude_id) WHERE first_seen >= ? AND first_seen < ? GROUP BY 1",
            span,
        )
    }
    settle = timedelta(seconds=p99 or 0)
    rows = []
    day = first.date()
    while day <= last.date():
        key = day.isoformat()
        found = per_day.get(key, {})
        day_end = datetime(day.year, day.month, day.day, tzinfo=UTC) + DAY
        final = complete_through is not None and complete_through >= day_end + settle
        rows.append(
            {
                "day": key,
                "events": found.get("events", 0),
                "users": found.get("users", 0),
                "new_users": new.get(key, 0),
                "final": final,
            }
        )
        day += DAY
    return rows


def _top(
    con: duckdb.DuckDBPyConnection, column: str, occurred: str, span: list[datetime]
) -> list[dict[str, Any]]:
    """The TOP most frequent values of `column` (NULL as "(none)"), with one "(other)" row for the rest.

    Users per value are HyperLogLog estimates (within a few percent): exact distinct counts per value cost 20
    times as long on 10 M events, and the daily active users, which are exact, are the figure to quote.
    """
    rows = _rows(
        con,
        f"SELECT coalesce(CAST({column} AS VARCHAR), '(none)') AS value, count(*) AS events, "
        f"approx_count_distinct(amplitude_id) AS users FROM events WHERE {occurred} GROUP BY 1 "
        "ORDER BY events DESC, value",
        span,
    )
    total = sum(row["events"] for row in rows) or 1
    kept, rest = rows[:TOP], rows[TOP:]
    if rest:
        kept.append(
            {
                "value": f"(other: {len(rest)})",
                "events": sum(r["events"] for r in rest),
                "users": None,
                "other": len(rest),
            }
        )  # kept in the figures, left out of the chart: it would dwarf the rest
    for row in kept:
        row["share"] = round(row["events"] / total, 4)
    return kept


def _lateness(con: duckdb.DuckDBPyConnection, upload: str, span: list[datetime]) -> dict[str, Any]:
    """How long after `event_time` events reached Amplitude (`server_upload_time`), as buckets and quantiles."""
    seconds = "(epoch_ms(server_upload_time) - epoch_ms(event_time)) / 1000.0"
    cases = " ".join(
        f"WHEN s < {bound} THEN {i}" for i, (_, bound) in enumerate(LATENESS_BUCKETS) if math.isfinite(bound)
    )
    counts = {
        row["b"]: row["n"]
        for row in _rows(
            con,
            f"SELECT CASE {cases} ELSE {len(LATENESS_BUCKETS) - 1} END AS b, count(*) AS n "
            f"FROM (SELECT {seconds} AS s FROM events WHERE {upload} AND event_time IS NOT NULL "
            "AND server_upload_time IS NOT NULL) GROUP BY 1",
            span,
        )
    }
    stats = _rows(
        con,
        f"SELECT quantile_cont({seconds}, [0.5, 0.9, 0.99, 0.999]) AS q, max({seconds}) AS max, "
        f"count(*) FILTER (WHERE {seconds} < 0) AS negative, "
        "count(*) FILTER (WHERE event_time IS NULL OR server_upload_time IS NULL) AS unknown "
        f"FROM events WHERE {upload}",
        span,
    )[0]
    quantiles: dict[str, float] = {}
    if stats["q"] is not None:
        quantiles = {
            name: round(max(value, 0.0), 3)
            for name, value in zip(("p50", "p90", "p99", "p999"), stats["q"], strict=True)
        }
        quantiles["max"] = round(stats["max"], 3)
    return {
        "buckets": [{"bucket": label, "order": i, "events": counts.get(i, 0)}
                    for i, (label, _) in enumerate(LATENESS_BUCKETS)],
        "quantiles": quantiles,
        "negative": stats["negative"],  # uploaded "before" it happened: a device clock ahead of the server's
        "unknown": stats["unknown"],
    }  # fmt: skip


def _health(
    con: duckdb.DuckDBPyConnection,
    ledger: dict[datetime, HourRecord],
    stored: dict[str, int],
    upload: str,
    span: list[datetime],
) -> dict[str, Any]:
    retried: list[dict[str, Any]] = []  # runs of consecutive hours with the same attempts and status
    for hour, record in sorted(ledger.items()):
        if record.attempts <= 1:
            continue
        last = retried[-1] if retried else None
        if (
            last
            and last["_next"] == hour
            and (last["attempts"], last["status"]) == (record.attempts, record.status)
        ):
            last.update(end=label_hour(hour), hours=last["hours"] + 1, _next=hour + HOUR)
        else:
            retried.append(
                {
                    "start": label_hour(hour),
                    "end": label_hour(hour),
                    "hours": 1,
                    "attempts": record.attempts,
                    "status": record.status,
                    "_next": hour + HOUR,
                }
            )
    for run in retried:
        del run["_next"]
    split: dict[str, dict[str, Any]] = {}  # by the planned window that 400s or 504s made the run fetch in parts
    for _, record in sorted(ledger.items()):
        if not record.split_from:
            continue
        row = split.setdefault(record.split_from, {"window": record.split_from, "hours": 0, "attempts": 0,
                                                   "_statuses": {}})  # fmt: skip
        row["hours"] += 1
        row["attempts"] = max(row["attempts"], record.attempts)
        row["_statuses"][record.status] = row["_statuses"].get(record.status, 0) + 1
    for row in split.values():
        row["statuses"] = ", ".join(f"{n} {status}" for status, n in sorted(row.pop("_statuses").items()))
    unknown = _rows(
        con,
        "SELECT key, count(*) AS events, strftime(min(_upload_hour), '%Y-%m-%dT%H') AS first_hour FROM ("
        "SELECT unnest(json_keys(CAST(_extra AS JSON))) AS key, _upload_hour FROM events "
        f"WHERE _extra IS NOT NULL AND {upload}) GROUP BY key ORDER BY events DESC, key LIMIT 100",
        span,
    )
    for row in unknown:
        # a known key in _extra means a value that did not fit its column's type, not a new field
        row["kind"] = "value did not fit its type" if row["key"] in KNOWN_SOURCES else "unknown field"
    mismatches = []
    for hour, record in sorted(ledger.items()):
        label = label_hour(hour)
        if record.status == LOADED and stored.get(label, 0) != record.events_loaded:
            mismatches.append({"hour": label, "ledger": record.events_loaded, "stored": stored.get(label, 0)})
    for label in sorted(set(stored) - {label_hour(h) for h in ledger}):
        mismatches.append({"hour": label, "ledger": None, "stored": stored[label]})
    return {
        "duplicates": sum(r.duplicates for r in ledger.values()),
        "rejects": sum(r.rejects for r in ledger.values()),
        "retried_hours": retried,
        "split_windows": list(split.values()),
        "failed": [s for s in _spans(ledger) if s["status"] in (FAILED, TOO_LARGE)],
        "unknown_fields": unknown,
        "ledger_mismatches": mismatches,
    }


def _spans(ledger: dict[datetime, HourRecord]) -> list[dict[str, Any]]:
    from .status import spans

    return spans(ledger)


# -- rendering ----------------------------------------------------------------------------------------------

STATUS_COLORS = {
    LOADED: "#4c78a8",
    EMPTY: "#bab0ac",
    FAILED: "#e45756",
    TOO_LARGE: "#9d2a2a",
    MISSING: "#f2a93b",
}
ASSETS = resources.files("amplitude_export") / "report_assets"
VEGA_FILES = ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js")  # in load order: embed needs the other two


def vega_versions() -> dict[str, str]:
    """The versions of the Vega, Vega-Lite and vega-embed builds the report inlines (tools/vendor_vega.sh)."""
    return json.loads((ASSETS / "versions.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def _field(name: str, kind: str, **more: Any) -> dict[str, Any]:
    return {"field": name, "type": kind, **more}


def chart_specs() -> dict[str, dict[str, Any]]:
    """The Vega-Lite spec of each chart, by the id of its container; data comes from named datasets at render."""
    schema = f"https://vega.github.io/schema/vega-lite/v{vega_versions()['vega-lite'].split('.')[0]}.json"
    hour = _field("hour", "temporal", scale={"type": "utc"})
    hour_label = _field("label", "nominal", title="hour")
    hourly = {
        "data": {"name": "hourly"},
        "transform": [
            {"calculate": "time(toDate(datum.hour)) + 3600000", "as": "hour_end"},
            {"calculate": "utcFormat(toDate(datum.hour), '%Y-%m-%d %H:00 UTC')", "as": "label"},
        ],
        "layer": [
            # every hour, shaded unless loaded: filtering instead would leave an empty layer, which Vega warns about
            {
                "mark": "rect",
                "encoding": {
                    "x": hour,
                    "x2": {"field": "hour_end"},
                    "color": _field("status", "nominal"),  # the layers share the colour scale set below
                    "opacity": {"condition": {"test": "datum.status == 'loaded'", "value": 0}, "value": 0.45},
                    "tooltip": [hour_label, _field("status", "nominal"), _field("reason", "nominal")],
                },
            },
            # rects from hour to hour + 1 and from 0 up: a bar mark with x and x2 would be drawn horizontally
            {
                "mark": "rect",
                "encoding": {
                    "x": {**hour, "title": "upload hour (UTC)"},
                    "x2": {"field": "hour_end"},
                    "y": _field("events", "quantitative", title="events"),
                    "y2": {"datum": 0},
                    "color": _field(
                        "status", "nominal", title="ledger", legend={"symbolOpacity": 1},
                        scale={"domain": list(STATUS_COLORS), "range": list(STATUS_COLORS.values())},
                    ),
                    "tooltip": [hour_label, _field("events", "quantitative"), _field("status", "nominal"),
                                _field("attempts", "quantitative"),
                                _field("split_from", "nominal", title="split from")],
                },
            },
        ],
        "width": "container",
        "height": 220,
    }  # fmt: skip
    day = _field("day", "temporal", timeUnit="utcyearmonthdate", title="event day (UTC)")
    day_tip = _field("day", "nominal", title="day")
    daily = {
        "data": {"name": "daily"},
        "transform": [{"calculate": "datum.final ? 'final' : 'still filling in'", "as": "state"}],
        "mark": "bar",
        "encoding": {
            "x": day,
            "y": _field("events", "quantitative", title="events"),
            "color": _field("state", "nominal", title="day",
                            scale={"domain": ["final", "still filling in"], "range": ["#4c78a8", "#a0c4e8"]}),
            "tooltip": [day_tip, *(_field(n, "quantitative") for n in ("events", "users", "new_users")),
                        _field("state", "nominal")],
        },
        "width": "container",
        "height": 200,
    }  # fmt: skip
    users = {
        "data": {"name": "daily"},
        "transform": [
            {"fold": ["users", "new_users"], "as": ["measure", "count"]},
            {"calculate": "datum.measure == 'users' ? 'active users' : 'new users'", "as": "measure"},
        ],
        "mark": {"type": "line", "point": True},
        "encoding": {
            "x": day,
            "y": _field("count", "quantitative", title="distinct amplitude_id"),
            "color": _field("measure", "nominal", title=None),
            "strokeDash": _field("final", "nominal", legend=None,
                                 scale={"domain": [True, False], "range": [[1, 0], [4, 3]]}),
            "tooltip": [day_tip, _field("measure", "nominal"), _field("count", "quantitative")],
        },
        "width": "container",
        "height": 200,
    }  # fmt: skip

    def ranked(name: str, title: str) -> dict[str, Any]:
        return {
            "data": {"name": name},
            "transform": [{"filter": "!datum.other"}],
            "mark": "bar",
            "encoding": {
                "y": _field("value", "nominal", sort=None, title=title),
                "x": _field("events", "quantitative", title="events", axis={"format": "~s"}),
                "tooltip": [_field("value", "nominal", title=title), _field("events", "quantitative"),
                            _field("users", "quantitative", title="users (approx.)"),
                            _field("share", "quantitative", format=".1%")],
            },
            "width": 270,  # fixed: "container" width with a discrete height makes Vega-Lite warn
        }  # fmt: skip

    lateness = {
        "data": {"name": "lateness"},
        "mark": "bar",
        "encoding": {
            "x": _field("bucket", "nominal", sort={"field": "order"}, title="server_upload_time - event_time"),
            "y": _field("events", "quantitative", title="events", scale={"type": "sqrt"}),  # the long tail shows
            "tooltip": [_field("bucket", "nominal"), _field("events", "quantitative")],
        },
        "width": "container",
        "height": 200,
    }
    charts = {
        "chart-hourly": hourly,
        "chart-daily": daily,
        "chart-users": users,
        "chart-types": ranked("event_types", "event_type"),
        "chart-platforms": ranked("platforms", "platform"),
        "chart-countries": ranked("countries", "country"),
        "chart-lateness": lateness,
    }
    return {key: {"$schema": schema, **spec} for key, spec in charts.items()}


def _script_safe(text: str) -> str:
    """JSON that cannot end its <script> element early (JSON reads `<\\/` as `</`)."""
    return text.replace("</", "<\\/")


def _vega_credit() -> str:
    return ", ".join(f"{name} {version}" for name, version in vega_versions().items())


def _javascript() -> str:
    """Vega, Vega-Lite and vega-embed, shipped as package data (no network), as one script."""
    notice = f"/*! {_vega_credit()}: BSD-3-Clause; licences in amplitude_export/report_assets/LICENSES.txt */\n"
    bundle = notice + "\n".join((ASSETS / name).read_text(encoding="utf-8") for name in VEGA_FILES)
    # only `</script` could end the element early; replacing every `</` would break regex literals like /</g
    return re.sub(r"</(script)", r"<\\/\1", bundle, flags=re.IGNORECASE)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(rows: list[dict[str, Any]], columns: list[str], *, empty: str, classes: str = "") -> str:
    if not rows:
        return f'<p class="none">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        status = row.get("status")
        attr = f' class="st-{html.escape(str(status))}"' if status else ""
        cells = "".join(
            f"<td{' class=num' if isinstance(row.get(c), int | float) else ''}>"
            f"{html.escape(_fmt(row.get(c)))}</td>"
            for c in columns
        )
        body.append(f"<tr{attr}>{cells}</tr>")
    return f'<table class="{classes}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7_200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3_600:.1f} h"
    return f"{seconds / 86_400:.1f} days"


def _others(rows: list[dict[str, Any]]) -> str:
    """A sentence on the values left out of a top chart (hover a bar for approximate users)."""
    other = next((row for row in rows if row.get("other")), None)
    if other is None:
        return "Hover a bar for its users (approximate)."
    return html.escape(f"Not drawn: {other['other']:,} more values, {other['share']:.1%} of events.")


def _tile(label: str, value: str, note: str = "") -> str:
    extra = f"<small>{html.escape(note)}</small>" if note else ""
    return f'<div class="tile"><span>{html.escape(label)}</span><b>{html.escape(value)}</b>{extra}</div>'


def render_html(data: dict[str, Any]) -> str:
    """The whole page: figures as a JSON island, chart specs, the inlined JavaScript, tables for the rest."""
    meta, totals, health, lateness = data["meta"], data["totals"], data["health"], data["lateness"]
    by_status = totals["hours_by_status"]
    quantiles = lateness["quantiles"]
    title = f"Amplitude export report: {meta.get('destination', '')}"
    range_text = (
        f"{meta['start']} .. {meta['end']} UTC (upload hours)" if meta["start"] else "empty destination"
    )
    failed_hours = by_status.get(FAILED, 0) + by_status.get(TOO_LARGE, 0)
    tiles = "".join([
        _tile("events", f"{totals['events']:,}", "uploaded in the range"),
        _tile("distinct users", f"{totals['users']:,}", "amplitude_id"),
        _tile("hours loaded", f"{by_status.get(LOADED, 0):,}", f"of {totals['hours']:,}"),
        _tile("hours empty", f"{by_status.get(EMPTY, 0):,}", "no data (404)"),
        _tile("hours failed", f"{failed_hours:,}", "retried by the next run"),
        _tile("hours not loaded", f"{by_status.get(MISSING, 0):,}", "never asked for"),
        _tile("duplicates dropped", f"{totals['duplicates']:,}", "same uuid again"),
        _tile("lines rejected", f"{totals['rejects']:,}", "not a JSON event"),
        _tile("complete through", totals["complete_through"] or "n/a", "this hour and all before it done"),
    ])  # fmt: skip
    p99 = quantiles.get("p99")
    lateness_rows = [{"quantile": name, "lateness": _duration(quantiles.get(name))}
                     for name in ("p50", "p90", "p99", "p999", "max") if name in quantiles]  # fmt: skip
    failed = health["failed"]
    unknown = health["unknown_fields"]
    retried = health["retried_hours"]
    split = health["split_windows"]
    hourly_note = ""
    if meta.get("hourly_from") and meta["start"] and meta["hourly_from"][:13] != meta["start"]:
        hourly_note = f" (the last {meta['hourly_days']} days of the range)"
    island = _script_safe(json.dumps(data, separators=(",", ":"), default=str, allow_nan=False))
    specs = _script_safe(json.dumps(chart_specs(), separators=(",", ":")))

    def section(chart_id: str, heading: str, text: str) -> str:
        return (
            f'<section><h2>{html.escape(heading)}</h2><p class="note">{text}</p>'
            f'<div class="chart" id="{chart_id}"></div></section>'
        )

    body = f"""
<header><h1>Amplitude export report</h1>
<p>{html.escape(meta.get("destination", ""))} &middot; project {html.escape(str(meta["project"]))} &middot;
{html.escape(range_text)} &middot; generated {html.escape(meta["generated_at"])}</p></header>
<div class="tiles">{tiles}</div>
{
        section(
            "chart-hourly",
            "Events per upload hour" + hourly_note,
            "Bars: events stored per UTC upload hour. Shaded: hours the ledger holds as empty (grey), failed "
            "(red) or too large (dark red), and hours no run has asked for yet (orange). Hover for the reason.",
        )
    }
{
        section(
            "chart-daily",
            "Events per day",
            "By UTC day of <code>event_time</code>. A day stays pale until the destination is complete through "
            "the day's end plus the 99th percentile of lateness"
            + (f" ({html.escape(_duration(p99))})" if p99 is not None else "")
            + ": until then late events keep "
            "arriving for it.",
        )
    }
{
        section(
            "chart-users",
            "Daily active users and new users",
            "Distinct <code>amplitude_id</code> per event day; new users are those whose first event anywhere in "
            "the destination falls on that day. Dashed: days still filling in.",
        )
    }
<div class="grid">
{section("chart-types", "Top event types", "By events in the range. " + _others(data["event_types"]))}
{
        section(
            "chart-platforms",
            "Platforms",
            "<code>platform</code> as the SDK reports it. " + _others(data["platforms"]),
        )
    }
{section("chart-countries", "Countries", "From Amplitude's IP geolocation. " + _others(data["countries"]))}
</div>
<section><h2>Lateness</h2>
<p class="note">Amplitude exports events by the hour they were <em>uploaded</em> (<code>server_upload_time</code>),
and devices that were offline upload days after the event happened: so the events of a day keep arriving in later
upload hours, and a day's counts are final only once a run has loaded the upload hours up to the day's end plus the
longest lateness you care about (here the 99th percentile is {html.escape(_duration(p99))}), on top of the
two hours Amplitude needs before an upload hour can be exported at all.</p>
<div class="grid2"><div class="chart" id="chart-lateness"></div>
{_table(lateness_rows, ["quantile", "lateness"], empty="no events")}</div>
<p class="note">{
        lateness["negative"]:,} events were uploaded before their <code>event_time</code> (a device clock
ahead of Amplitude's; counted as &lt; 1 min); {lateness["unknown"]:,} lack one of the two times.</p></section>
<section><h2>Data health</h2>
{
        _table(
            [
                {"check": "duplicate lines dropped (uuid seen before)", "value": health["duplicates"]},
                {"check": "lines rejected (not a JSON event with a uuid)", "value": health["rejects"]},
                {"check": "fields kept in _extra (distinct keys)", "value": len(unknown)},
                {"check": "hours retried (attempts > 1)", "value": sum(r["hours"] for r in retried)},
                {"check": "windows split (fetched in parts after a 400 or 504)", "value": len(split)},
                {"check": "hours fetched in a split window's parts", "value": sum(r["hours"] for r in split)},
                {"check": "hours failed or too large", "value": failed_hours},
                {
                    "check": "hours whose stored events differ from the ledger",
                    "value": len(health["ledger_mismatches"]),
                },
            ],
            ["check", "value"],
            empty="",
        )
    }
<h3>Failed windows</h3>
{_table(failed, ["start", "end", "status", "hours", "reason"], empty="No failed hours.")}
<h3>Fields seen in <code>_extra</code></h3>
{_table(unknown, ["key", "kind", "events", "first_hour"], empty="No unknown fields or mistyped values.")}
<h3>Hours retried</h3>
{
        _table(
            retried[:200],
            ["start", "end", "hours", "attempts", "status"],
            empty="No hour needed a second attempt.",
        )
    }
<h3>Windows split</h3>
<p class="note">Planned windows the Export API refused whole (a 400 "too large", or 504 after every retry), so the run
fetched them in halves, down to single hours if need be; attempts: the most requests any of its hours took,
those of the windows it was split from included.</p>
{
        _table(
            split[:200],
            ["window", "hours", "attempts", "statuses"],
            empty="No window had to be split.",
        )
    }
<h3>Ledger against table</h3>
{
        _table(
            health["ledger_mismatches"][:200],
            ["hour", "ledger", "stored"],
            empty="Every loaded hour holds exactly the events its ledger row counts.",
        )
    }
</section>
<section><h2>Windows</h2><p class="note">The ledger as <code>amplitude-export status</code> shows it: runs of
consecutive hours of one day with the same status.</p>
<details{" open" if len(data["windows"]) <= 40 else ""}><summary>{len(data["windows"]):,} windows</summary>
{
        _table(
            data["windows"],
            ["start", "end", "status", "hours", "events", "duplicates", "rejects", "bytes", "reason"],
            empty="The ledger is empty.",
            classes="windows",
        )
    }
</details></section>
<footer>Charts: {html.escape(_vega_credit())}, inlined (BSD-3-Clause); the figures are in the
<code>report-data</code> JSON block of this file.</footer>
"""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
<script>{_javascript()}</script>
</head><body>
{body}
<script type="application/json" id="report-data">{island}</script>
<script type="application/json" id="report-specs">{specs}</script>
<script>{_RENDER_JS}</script>
</body></html>
"""


# Draw every chart from the embedded specs and figures; body[data-rendered] tells a test when all are done.
_RENDER_JS = """
(function () {
  const data = JSON.parse(document.getElementById('report-data').textContent);
  const datasets = {hourly: data.hourly, daily: data.daily, event_types: data.event_types,
                    platforms: data.platforms, countries: data.countries, lateness: data.lateness.buckets};
  const specs = JSON.parse(document.getElementById('report-specs').textContent);
  const jobs = Object.entries(specs).map(([id, spec]) => {
    spec.datasets = datasets;
    return vegaEmbed('#' + id, spec, {renderer: 'svg', actions: false}).catch((error) => {
      document.getElementById(id).textContent = 'chart failed: ' + error;
      console.error(error);
      throw error;
    });
  });
  Promise.allSettled(jobs).then((results) => {
    const drawn = results.filter((r) => r.status === 'fulfilled').length;
    document.body.dataset.rendered = drawn + '/' + jobs.length;
  });
})();
"""

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0 auto;max-width:1180px;
padding:16px 24px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:17px;margin:24px 0 4px}h3{font-size:14px;margin:14px 0 4px}
header p,.note,footer{color:#555;margin:2px 0 8px}footer{margin-top:28px;font-size:12px}
code{font-size:12px;background:#f3f3f3;padding:0 3px;border-radius:3px}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(118px,1fr));gap:8px;margin:12px 0}
.tile{border:1px solid #ddd;border-radius:6px;padding:6px 10px;display:flex;flex-direction:column}
.tile span{font-size:12px;color:#555}.tile b{font-size:18px}.tile small{font-size:11px;color:#777}
.chart{width:100%;min-height:40px}.grid{display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:16px}
.grid2{display:grid;grid-template-columns:minmax(0,2fr) minmax(0,1fr);gap:16px;align-items:start}
table{border-collapse:collapse;font-size:12px;margin:4px 0 8px}th,td{border-bottom:1px solid #e5e5e5;
padding:3px 8px;text-align:left;white-space:nowrap}td:last-child{white-space:normal}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.st-failed,tr.st-too_large{background:#fdecec}tr.st-empty{color:#888}.none{color:#777;font-style:italic}
summary{cursor:pointer;color:#555;margin:4px 0}
@media (max-width:900px){.grid,.grid2{grid-template-columns:1fr}}
"""


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


__all__ = ["chart_specs", "gather", "open_views", "render_html", "write_report"]

"""The DuckDB sink, the default destination: `events` and the ledger `_amplitude_ledger` in one file.

A window is one transaction: its hours' old rows are deleted; its batches are streamed into `events` by a single
INSERT (DuckDB pulls them from an Arrow stream, so a window never has to fit in memory and no per-statement cost
is paid per batch), with later copies of a uuid dropped on the way (`Intake`); the window's rows whose uuid
another hour already holds are deleted (usually none); the window's ledger rows are upserted last. A crash at
any point leaves the file as it was before the window. `events` has no primary key on purpose: an index over
every uuid would cost memory on every open and slow inserts.

The staging helpers here are shared with the Parquet sink, which runs the same SQL on an in-memory DuckDB.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import DestinationBusyError, DestinationError
from ..ledger import DeletionRecord, HourRecord, MemberInfo
from ..schema import ALL_COLUMNS, ARROW_SCHEMA, COLUMN_NAMES, DUCKDB_TYPES, JSON, JSON_COLUMNS, RETYPED, quote
from ..table_ledger import (
    STATE_COLUMNS,
    STATE_TABLE,
    TableState,
    TableWrite,
    sql_type,
    state_from_row,
    state_values,
    with_project_column,
)
from ..threads import prefetched
from ..windows import Window
from . import SEEN_LIMIT, FirstCopies, WindowRead, with_project
from .filelock import FileLock

EVENTS = "events"
LEDGER = "_amplitude_ledger"
STAGE = "_amplitude_stage"
SEQ = "_seq"  # arrival order of a staged row: the lowest wins among rows sharing a uuid

COLUMNS_SQL = ", ".join(quote(name) for name in COLUMN_NAMES)

# The file is attached under this name (not opened as the default database) so that its inserts can use smaller
# row groups: DuckDB holds each inserting thread's open row group uncompressed, ~200 MB at its default 122,880
# rows of these wide events, and every fresh page costs a fault. 61,440 rows: ~60 MB less RSS and ~0.1 s less
# per day, for a 4 % larger file (73 against 70 MB for 504 k events; docs/PARSE_DESIGN.md). Per attach, not stored.
ALIAS = "amplitude"
ROW_GROUP_SIZE = 61_440

# The ledger's columns, one per HourRecord field, in the dataclass's order.
LEDGER_COLUMNS: dict[str, str] = {
    "project": "VARCHAR NOT NULL",
    "hour": "TIMESTAMPTZ NOT NULL",
    "status": "VARCHAR NOT NULL",
    "reason": "VARCHAR",
    "members": "JSON",
    "content_hash": "VARCHAR",
    "lines_read": "BIGINT",
    "events_loaded": "BIGINT",
    "duplicates": "BIGINT",
    "rejects": "BIGINT",
    "bytes": "BIGINT",
    "min_server_upload_time": "TIMESTAMPTZ",
    "max_server_upload_time": "TIMESTAMPTZ",
    "min_event_time": "TIMESTAMPTZ",
    "max_event_time": "TIMESTAMPTZ",
    "attempts": "INTEGER",
    "split_from": "VARCHAR",
    "run_id": "VARCHAR",
    "updated_at": "TIMESTAMPTZ",
}
# Columns added after the first release: a ledger created before them gets them (NULL in old rows) on open.
ADDED_LEDGER_COLUMNS = ("split_from",)
LEDGER_NAMES_SQL = ", ".join(LEDGER_COLUMNS)  # by name: an added column sits last in an older file's table

_LEDGER_ARROW: pa.Schema = pa.schema(
    [
        pa.field(
            name,
            pa.timestamp("us", tz="UTC")
            if sql.startswith("TIMESTAMPTZ")
            else pa.int64()
            if sql.startswith(("BIGINT", "INTEGER"))
            else pa.string(),
        )
        for name, sql in LEDGER_COLUMNS.items()
    ]
)


_KINDS = {c.name: c.kind for c in ALL_COLUMNS}


def events_ddl(table: str, *, json_type: str = "JSON", temp: bool = False, seq: bool = False) -> str:
    """CREATE TABLE for the events columns; the stage keeps JSON as VARCHAR (validated once, on insert)."""
    columns = [
        f"{quote(c.name)} {json_type if c.kind == JSON else DUCKDB_TYPES[c.kind]}" for c in ALL_COLUMNS
    ]
    if seq:
        columns.append(f"{SEQ} BIGINT")
    kind = "OR REPLACE TEMP TABLE" if temp else "TABLE IF NOT EXISTS"
    return f"CREATE {kind} {table} ({', '.join(columns)})"


def configure(con: duckdb.DuckDBPyConnection) -> None:
    """Make TIMESTAMPTZ come back as UTC whatever the machine's zone (needs the built-in ICU extension), and keep
    DuckDB's own progress bar off: under `python -c` or in a notebook it drew one on stdout for every statement
    over 2 s (a window's insert), beside ours."""
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")


def check_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch with exactly ARROW_SCHEMA (cast if the reader's types differ only in detail)."""
    if batch.schema.equals(ARROW_SCHEMA):
        return batch
    try:
        return batch.select(list(COLUMN_NAMES)).cast(ARROW_SCHEMA)
    except (KeyError, ValueError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"batch does not match schema.ARROW_SCHEMA: {exc}") from exc


NEARBY = timedelta(hours=6)  # the hours each side of a window whose uuids are dropped on the way in
# the rows of `events AS o` that are not the window's: other hours, or other projects
_OTHERS = "NOT (o._project = $project AND o._upload_hour BETWEEN $start AND $end)"


def _json_labelled(schema: pa.Schema) -> pa.Schema:
    """The schema with JSON columns typed `arrow.json`, so DuckDB takes them as JSON without parsing each text.

    The reader only emits JSON texts that a parser has accepted (the compiled one, or msgspec), so DuckDB's own
    parse on the VARCHAR -> JSON cast is a second check at ~1 µs per event (measured, docs/PARSE_DESIGN.md). With a
    pyarrow that has no `json_` type, the columns stay strings and DuckDB checks them as before.
    """
    json_type = getattr(pa, "json_", None)
    if json_type is None:  # pragma: no cover - pyarrow < 19
        return schema
    return pa.schema(
        [pa.field(f.name, json_type(pa.string())) if f.name in JSON_COLUMNS else f for f in schema]
    )


STREAM_SCHEMA = _json_labelled(ARROW_SCHEMA)
_JSON_LABELS = [(i, f.type) for i, f in enumerate(STREAM_SCHEMA) if isinstance(f.type, pa.BaseExtensionType)]
KEEP = "_keep"  # the stream's row mask when repeats are dropped on the way in (not a column of `events`)


def _trues(rows: int) -> pa.Array:
    # from a bitmap, not from numpy: pyarrow's numpy conversion imports pandas (0.35 s)
    return pa.Array.from_buffers(pa.bool_(), rows, [None, pa.py_buffer(b"\xff" * ((rows + 7) // 8))])


_TRUES = _trues(1 << 16)


def _all_true(rows: int) -> pa.Array:
    """A mask keeping every row: a zero-copy slice of one array for the usual batch sizes."""
    return _TRUES.slice(0, rows) if rows <= len(_TRUES) else _trues(rows)


class Intake:
    """The window's batches on their way into DuckDB: checked, counted per hour, and optionally deduplicated.

    `insert_into` hands them to DuckDB as one Arrow stream in one INSERT: each INSERT statement costs ~10-25 ms
    whatever its size, and a stream keeps only the batch at hand in memory. DuckDB pulls the batches on its own
    thread; an exception raised while producing one (a broken member, Ctrl-C) is kept and raised again here
    after the statement, so it keeps its type instead of becoming a DuckDB error.

    With `first_copies`, repeated uuids are dropped on the way (`FirstCopies`): deleting rows that a transaction
    has just bulk-inserted makes DuckDB rewrite them at commit (measured: ~2 µs per event of the window,
    docs/PARSE_DESIGN.md). Each batch then carries a `_keep` mask that the INSERT filters on: DuckDB applies it in
    its own threads without copying, where a filtered copy or slices made here would stall its scan. Past its
    limit (`overflowed`) the sink removes the remaining repeats in SQL after the insert, ordered by member
    arrival (`ranks`) then line.
    """

    def __init__(
        self,
        window: Window,
        batches: Iterable[pa.RecordBatch],
        *,
        seq: bool = False,
        first_copies: bool = False,
        seen_limit: int = SEEN_LIMIT,
        taken: set[str] | None = None,
    ) -> None:
        self.window = window
        self.staged: dict[datetime, int] = {}  # rows received per upload hour, before duplicates are dropped
        self.ranks: dict[str, int] = {}  # member name -> arrival rank (batches come in member order)
        self._batches = batches
        self._seq = seq  # append an arrival number per row (for a stage that keeps the first of each uuid)
        self._first = FirstCopies(seen_limit, taken) if first_copies else None
        self._rows = 0
        self._error: BaseException | None = None
        self._schema = STREAM_SCHEMA
        if seq:
            self._schema = self._schema.append(pa.field(SEQ, pa.int64()))
        if first_copies:
            self._schema = self._schema.append(pa.field(KEEP, pa.bool_()))

    def _prepared(self) -> Iterator[pa.RecordBatch]:
        for batch in self._batches:
            batch = check_batch(batch)
            if batch.num_rows == 0:
                continue
            self._count(batch)
            columns = batch.columns
            for index, json_type in _JSON_LABELS:  # zero-copy; from_arrays would cast (a copy)
                columns[index] = pa.ExtensionArray.from_storage(json_type, columns[index])
            if self._seq:
                columns.append(pa.array(range(self._rows, self._rows + batch.num_rows), pa.int64()))
            if self._first is not None:
                keep = self._first.keep(batch)
                columns.append(_all_true(batch.num_rows) if keep is None else keep)
            self._rows += batch.num_rows
            yield pa.RecordBatch.from_arrays(columns, schema=self._schema)

    def _stream(self) -> Iterator[pa.RecordBatch]:
        try:
            # batches are checked, counted and deduplicated one thread ahead: DuckDB pulls them holding its
            # scan's lock, which would keep its other thread waiting through that work
            yield from prefetched(self._prepared(), depth=2, name="amplitude-export-intake")
        except GeneratorExit:  # DuckDB stopped reading (its own error, raised by insert_into)
            raise
        except BaseException as exc:  # noqa: BLE001 - re-raised by insert_into, on the caller's thread
            self._error = exc

    @property
    def overflowed(self) -> bool:
        """More uuids than the in-memory limit: some repeats are left for SQL to remove."""
        return self._first is not None and self._first.overflowed

    @property
    def uuids(self) -> pa.Array | None:
        """Every uuid of the window, when the in-memory filter saw them all; else None."""
        return None if self._first is None or self._first.overflowed else self._first.uuids

    def _count(self, batch: pa.RecordBatch) -> None:
        hours = batch.column("_upload_hour")
        bounds = pc.min_max(hours)
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        if hours.null_count or low < self.window.start or high > self.window.end:
            raise ValueError(f"{self.window}: rows have an _upload_hour outside the window")
        counts = pc.value_counts(hours)
        for hour, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True):
            hour = hour.astimezone(UTC)
            self.staged[hour] = self.staged.get(hour, 0) + n
        if self._first is not None:  # only the SQL fallback of the dedup orders copies by member rank
            for name in pc.unique(batch.column("_member")).to_pylist():
                self.ranks.setdefault(name, len(self.ranks))

    def insert_into(self, con: duckdb.DuckDBPyConnection, table: str) -> None:
        """INSERT every batch into `table` in one statement; raise what producing the batches raised."""
        names = [*COLUMN_NAMES, SEQ] if self._seq else list(COLUMN_NAMES)
        batches = self._stream()
        stream = pa.RecordBatchReader.from_batches(self._schema, batches)
        con.register("_amplitude_stream", stream)
        try:
            where = f" WHERE {KEEP}" if self._first is not None else ""
            con.execute(f"INSERT INTO {table} SELECT {', '.join(map(quote, names))} FROM _amplitude_stream{where}")
        except duckdb.Error:
            if self._error is None:
                raise
        finally:
            con.unregister("_amplitude_stream")
            batches.close()  # stops and joins the prefetching thread, should DuckDB have stopped reading early
        if self._error is not None:
            raise self._error


def ranks_table(ranks: dict[str, int]) -> pa.Table:
    """Member names and their arrival ranks, for SQL that orders a uuid's copies."""
    return pa.table({"name": pa.array(list(ranks), pa.string()), "rank": pa.array(list(ranks.values()), pa.int64())})


def stage_batches(
    con: duckdb.DuckDBPyConnection, window: Window, batches: Iterable[pa.RecordBatch]
) -> dict[datetime, int]:
    """Stage every batch in TEMP table `_amplitude_stage`, numbered in arrival order; rows staged per hour."""
    con.execute(events_ddl(STAGE, json_type="VARCHAR", temp=True, seq=True))
    intake = Intake(window, batches, seq=True)
    intake.insert_into(con, STAGE)
    return intake.staged


def winners_sql(taken: str | None) -> str:
    """A WHERE clause over the stage: the first row of each uuid, minus the uuids of relation `taken`."""
    # a row without a uuid cannot be a duplicate of anything: every one is kept
    first = f"(uuid IS NULL OR {SEQ} IN (SELECT min({SEQ}) FROM {STAGE} WHERE uuid IS NOT NULL GROUP BY uuid))"
    if taken is None:
        return first
    # NOT EXISTS rather than NOT IN: one NULL uuid in `taken` would make NOT IN reject every row
    return f"{first} AND NOT EXISTS (SELECT 1 FROM {taken} AS t WHERE t.uuid = {STAGE}.uuid)"


def hour_counts(
    con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | dict[str, Any] | None = None
) -> dict[datetime, int]:
    """{hour: n} from a query yielding (hour, n); via Arrow, as fetchall() on TIMESTAMPTZ needs pytz."""
    table = con.sql(sql, params=params).to_arrow_table()
    return {row["hour"].astimezone(UTC): row["n"] for row in table.to_pylist()}


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


def records_table(project: str, records: list[HourRecord]) -> pa.Table:
    """The ledger rows as an Arrow table (members as JSON text); the last record of an hour wins."""
    by_hour = {record.hour.astimezone(UTC): record for record in records}
    rows = []
    for record in by_hour.values():
        row = dataclasses.asdict(record)
        row["members"] = json.dumps(row["members"])
        rows.append({"project": project, **row})
    return pa.Table.from_pylist(rows, schema=_LEDGER_ARROW)


def record_from_row(row: dict[str, Any]) -> HourRecord:
    """A ledger row (from Arrow) back as an HourRecord, datetimes in `datetime.UTC`."""
    values: dict[str, Any] = {
        k: v.astimezone(UTC) if isinstance(v, datetime) else v for k, v in row.items() if k != "project"
    }
    values["members"] = [MemberInfo(**m) for m in json.loads(values["members"] or "[]")]
    return HourRecord(**values)


DELETIONS = "_amplitude_deletions"
DELETIONS_DDL = (
    f"CREATE TABLE IF NOT EXISTS {DELETIONS} (project VARCHAR NOT NULL, day DATE NOT NULL, status VARCHAR NOT NULL, "
    "amplitude_ids BIGINT[] NOT NULL, rows_deleted BIGINT NOT NULL, cohort_rows_deleted BIGINT NOT NULL, "
    "applied_at TIMESTAMPTZ, run_id VARCHAR, PRIMARY KEY (project, day))"
)
DELETED = "_amplitude_deleted"  # the relation of amplitude ids being deleted, registered for `DELETED_ROWS`
# a deleted user's row: by amplitude_id, or by the one `_extra` kept (as text) when it did not fit the column
DELETED_ROWS = (
    f"coalesce(amplitude_id IN (SELECT amplitude_id FROM {DELETED}) OR (amplitude_id IS NULL AND "
    f"TRY_CAST(json_extract_string(_extra, '$.amplitude_id') AS BIGINT) IN (SELECT amplitude_id FROM {DELETED})), "
    "false)"
)
COHORT_MEMBERS = "cohort_members"


def deleted_table(amplitude_ids: list[int]) -> pa.Table:
    """The ids to delete, as the relation `DELETED_ROWS` reads."""
    return pa.table({"amplitude_id": pa.array(sorted(set(amplitude_ids)), pa.int64())})


def deletion_row(project: str, record: DeletionRecord) -> pa.Table:
    """One `_amplitude_deletions` row."""
    return pa.table({
        "project": [project], "day": pa.array([record.day], pa.date32()), "status": [record.status],
        "amplitude_ids": pa.array([record.amplitude_ids], pa.list_(pa.int64())),
        "rows_deleted": pa.array([record.rows_deleted], pa.int64()),
        "cohort_rows_deleted": pa.array([record.cohort_rows_deleted], pa.int64()),
        "applied_at": pa.array([record.applied_at], pa.timestamp("us", tz="UTC")), "run_id": [record.run_id],
    })


def lock_path(path: Path) -> Path:
    """The run's lock file beside the database: `events.duckdb` -> `events.duckdb.lock` (kept, never deleted)."""
    return path.with_name(path.name + ".lock")


def _attach(path: Path, *, read_only: bool, config: dict[str, Any]) -> duckdb.DuckDBPyConnection:
    """A connection whose default database is the file at `path` (see ALIAS); cursors need `cursor_on`."""
    con = duckdb.connect(":memory:", config=config)
    try:
        literal = str(path).replace("'", "''")
        mode = "READ_ONLY, " if read_only else ""
        con.execute(f"ATTACH '{literal}' AS {ALIAS} ({mode}ROW_GROUP_SIZE {ROW_GROUP_SIZE})")
        con.execute(f"USE {ALIAS}")
    except BaseException:
        con.close()
        raise
    return con


def cursor_on(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """A cursor of `con` that sees the attached file as its default database (a cursor starts on `memory`)."""
    cursor = con.cursor()
    cursor.execute(f"USE {ALIAS}")
    return cursor


class DuckDBSink:
    """Events and their ledger in one DuckDB file; see the module docstring for how a window is written."""

    def __init__(
        self,
        path: Path,
        *,
        memory_limit: str = "512MB",
        threads: int = 2,
        temp_directory: Path | None = None,
        read_only: bool = False,
        seen_limit: int = SEEN_LIMIT,
    ) -> None:
        self.path = Path(path).expanduser()
        self.description = f"duckdb:{self.path}"
        self.threads = threads
        self.seen_limit = seen_limit  # uuids a window dedups in memory (~70 B each) before SQL takes over
        temp = temp_directory or self.path.with_name(self.path.name + ".tmp")
        config: dict[str, Any] = {
            "memory_limit": memory_limit,
            "threads": threads,
            "temp_directory": str(temp),
            "preserve_insertion_order": False,  # lets inserts and sorts stream instead of buffering
        }
        # a run's lock on the file, independent of DuckDB's own (see `filelock`); readers rely on DuckDB's
        self._lock: FileLock | None = None
        try:
            if not read_only:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._lock = FileLock(lock_path(self.path))
                if not self._lock.acquire():
                    self._lock = None
                    raise DestinationBusyError(
                        f"DuckDB database {self.path} is in use by another run ({lock_path(self.path).name})")
            self.connection = _attach(self.path, read_only=read_only, config=config)
        except duckdb.IOException as exc:
            self._release()
            if "lock" in str(exc).lower():
                raise DestinationBusyError(
                    f"DuckDB database {self.path} is in use by another process (it allows one writer)"
                ) from None
            raise DestinationError(f"cannot open DuckDB database {self.path}: {_first_line(exc)}") from None
        except duckdb.ResourceInUseException:
            self._release()
            raise DestinationBusyError(f"DuckDB database {self.path} is open in this process already") from None
        except (duckdb.Error, OSError) as exc:
            self._release()
            raise DestinationError(f"cannot open DuckDB database {self.path}: {_first_line(exc)}") from None
        except BaseException:
            self._release()
            raise
        configure(self.connection)
        if not read_only:
            # DuckDB's vacuum merges the partial row group each window leaves into full ones at every checkpoint,
            # rewriting them (~1 s per 4 windows of 126 k events, measured); our loads leave that to a later
            # session (a user's `CHECKPOINT` or `VACUUM`), which is also when rows deleted by reloads are reclaimed
            self.connection.execute("SET max_vacuum_tasks = 0")
            self._create_tables()

    def _create_tables(self) -> None:
        columns = ", ".join(f"{name} {sql}" for name, sql in LEDGER_COLUMNS.items())
        self.connection.execute(events_ddl(EVENTS))
        self.connection.execute(
            f"CREATE TABLE IF NOT EXISTS {LEDGER} ({columns}, PRIMARY KEY (project, hour))"
        )
        present = {row[0] for row in self.connection.execute(
            "SELECT column_name FROM duckdb_columns() WHERE database_name = current_database() "
            "AND schema_name = current_schema() AND table_name = ?", [LEDGER]
        ).fetchall()}
        for name in ADDED_LEDGER_COLUMNS:
            if name not in present:
                self.connection.execute(f"ALTER TABLE {LEDGER} ADD COLUMN IF NOT EXISTS {name} {LEDGER_COLUMNS[name]}")
        types = dict(self.connection.execute(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = current_database() "
            "AND schema_name = current_schema() AND table_name = ?", [EVENTS]
        ).fetchall())
        for name, old in RETYPED.items():
            if types.get(name) == DUCKDB_TYPES[old]:
                self._retype(name)

    def _retype(self, name: str) -> None:
        """Migrate a column of an older version's `events` to its kind now (schema.RETYPED), in one transaction."""
        new, column, key = DUCKDB_TYPES[_KINDS[name]], quote(name), f"$.{name}"
        con = self.connection
        con.begin()
        try:
            con.execute(f"UPDATE {EVENTS} SET _extra = json_merge_patch(coalesce(_extra, '{{}}'), "
                        f"json_object(?, {column})) WHERE {column} IS NOT NULL", [name])
            con.execute(f"ALTER TABLE {EVENTS} ALTER {column} SET DATA TYPE {new} USING NULL")
            con.execute(f"UPDATE {EVENTS} SET {column} = CAST(_extra->>? AS {new}), "
                        "_extra = NULLIF(json_merge_patch(_extra, json_object(?, NULL)), '{}') "
                        "WHERE json_type(_extra, ?) = ?", [key, name, key, new])
            con.commit()
        except BaseException:
            con.rollback()
            raise

    def projects(self) -> list[str]:
        """The projects the ledger holds hours for, sorted."""
        try:
            rows = self.connection.execute(f"SELECT DISTINCT project FROM {LEDGER} ORDER BY 1").fetchall()
        except duckdb.CatalogException:
            return []  # a read-only open of a database no run has written to
        return [row[0] for row in rows]

    def ledger(self, project: str) -> dict[datetime, HourRecord]:
        """Every ledger row of `project`, by hour."""
        try:
            table = self.connection.sql(
                f"SELECT * FROM {LEDGER} WHERE project = ? ORDER BY hour", params=[project]
            ).to_arrow_table()
        except duckdb.CatalogException:  # a read-only open of a file never written
            return {}
        records = [record_from_row(row) for row in table.to_pylist()]
        return {record.hour: record for record in records}

    def write_window(
        self,
        project: str,
        window: Window,
        read: WindowRead,
    ) -> list[HourRecord]:
        """Replace the window's hours with `batches`, once per uuid, and upsert the ledger, atomically."""
        con = self.connection
        mine = "_project = $project AND _upload_hour BETWEEN $start AND $end"  # the window's rows
        params = {"project": project, "start": window.start, "end": window.end}
        con.begin()
        try:
            con.execute(f"DELETE FROM {EVENTS} WHERE {mine}", params)
            intake = Intake(window, with_project(read.batches, project), first_copies=True, seen_limit=self.seen_limit,
                            taken=self._nearby_uuids(params))
            # all `threads` insert: with vacuum off (see __init__) the partial row groups two threads leave are
            # no longer rewritten at close, and with the reader's threads in this process the second DuckDB
            # thread finds a free core: 5.8-6.3 s instead of 7.1-7.7 s per 504 k events (docs/PARSE_DESIGN.md)
            intake.insert_into(con, EVENTS)
            if intake.overflowed:
                self._drop_repeats(mine, params, intake.ranks)
            self._drop_taken(mine, params, None if intake.overflowed else lambda: intake.uuids)
            # the window's hours were emptied above, so what they hold now is exactly what was kept
            loaded = hour_counts(
                con, f"SELECT _upload_hour AS hour, count(*) AS n FROM {EVENTS} WHERE {mine} GROUP BY 1", params
            )
            records = fill_counts(read.hour_records(), intake.staged, loaded, datetime.now(UTC))
            self._upsert(project, records)
            con.commit()
        except BaseException as exc:
            _rollback(con)
            if isinstance(exc, duckdb.Error):
                raise DestinationError(f"cannot write {window} to {self.path}: {_first_line(exc)}") from exc
            raise
        return records

    def _drop_repeats(self, mine: str, params: dict[str, Any], ranks: dict[str, int]) -> None:
        """Delete all but the first copy (member arrival, then line) of each uuid the window holds twice: only
        for a window with more uuids than `seen_limit`, which costs DuckDB a rewrite at commit (see `Intake`)."""
        con = self.connection
        con.register("_amplitude_ranks", ranks_table(ranks))
        try:
            con.execute(
                f"""DELETE FROM {EVENTS} WHERE rowid IN (
                    SELECT id FROM (
                        SELECT e.rowid AS id,
                               row_number() OVER (PARTITION BY e.uuid ORDER BY r.rank, e._line, e.rowid) AS copy
                        FROM {EVENTS} AS e JOIN _amplitude_ranks AS r ON e._member = r.name
                        WHERE {mine} AND e.uuid IN (
                            SELECT uuid FROM {EVENTS} WHERE {mine} AND uuid IS NOT NULL
                            GROUP BY uuid HAVING count(*) > 1))
                    WHERE copy > 1)""",
                params,
            )
        finally:
            con.unregister("_amplitude_ranks")

    def _nearby_uuids(self, params: dict[str, Any]) -> pa.ChunkedArray:
        """The uuids of the hours around the window (`NEARBY` on each side, any project), from committed rows.

        An event that Amplitude received again lands in a later upload hour, usually a near one. Dropping those
        copies on the way in, with the window's own repeats, spares a delete among the rows just inserted: that
        makes DuckDB re-append the whole window at commit (measured: +3.4 s for the second day of a two-day
        run, 0.05 s without). `_drop_taken` still checks every other hour after the insert.
        """
        cursor = cursor_on(self.connection)
        try:
            table = cursor.sql(
                f"SELECT o.uuid FROM {EVENTS} AS o WHERE o.uuid IS NOT NULL"
                f" AND (o._upload_hour BETWEEN $start - $nearby AND $end + $nearby) AND {_OTHERS}",
                params={**params, "nearby": NEARBY},
            ).to_arrow_table()
        finally:
            cursor.close()
        return table.column("uuid")

    def _drop_taken(
        self, mine: str, params: dict[str, Any], uuids: Callable[[], pa.Array | None] | None
    ) -> None:
        """Delete the window's rows whose uuid another hour (or project) already holds: that copy came first.

        Usually there are none, and then nothing is deleted, because a delete among rows just inserted costs a
        rewrite of the window at commit (see `Intake`). With the window's `uuids` known, the check runs on a
        second cursor, which sees only committed rows: a query over the rows this transaction just inserted
        costs ~0.4 s more at commit per 126 k events (measured), even when it finds nothing. `uuids` gives them
        only when other rows exist: listing 500 k of them costs ~0.03 s.
        """
        con = self.connection
        if uuids is not None:
            cursor = cursor_on(con)
            try:
                # a first load into an empty table (or one holding only this window) has nothing to check
                if not cursor.execute(f"SELECT EXISTS (SELECT 1 FROM {EVENTS} AS o WHERE {_OTHERS})",
                                      params).fetchall()[0][0]:
                    return
                cursor.register("_amplitude_window_uuids", pa.table({"uuid": uuids()}))
                found = cursor.sql(
                    f"SELECT DISTINCT o.uuid FROM {EVENTS} AS o WHERE {_OTHERS} "
                    "AND o.uuid IN (SELECT uuid FROM _amplitude_window_uuids)",
                    params=params,
                ).to_arrow_table()
            finally:
                cursor.close()
            if found.num_rows:
                con.register("_amplitude_taken", found)
                try:
                    con.execute(f"DELETE FROM {EVENTS} WHERE {mine} AND uuid IN (SELECT uuid FROM _amplitude_taken)",
                                params)
                finally:
                    con.unregister("_amplitude_taken")
            return
        taken = f"""SELECT o.uuid FROM {EVENTS} AS o WHERE {_OTHERS}
                      AND o.uuid IN (SELECT uuid FROM {EVENTS} WHERE {mine} AND uuid IS NOT NULL)"""
        if con.execute(f"SELECT EXISTS ({taken})", params).fetchall()[0][0]:
            con.execute(f"DELETE FROM {EVENTS} WHERE {mine} AND uuid IN ({taken})", params)

    def record_hours(self, project: str, records: list[HourRecord]) -> None:
        """Upsert ledger rows for hours without events (empty, failed, too large); `events` is not touched."""
        now = datetime.now(UTC)
        stamped = [r if r.updated_at else dataclasses.replace(r, updated_at=now) for r in records]
        try:
            self._upsert(project, stamped)
        except duckdb.Error as exc:
            raise DestinationError(f"cannot write the ledger of {self.path}: {_first_line(exc)}") from exc

    def _upsert(self, project: str, records: list[HourRecord]) -> None:
        if not records:
            return
        self.connection.register("_amplitude_records", records_table(project, records))
        try:
            self.connection.execute(
                f"INSERT OR REPLACE INTO {LEDGER} ({LEDGER_NAMES_SQL}) "
                f"SELECT {LEDGER_NAMES_SQL} FROM _amplitude_records"
            )
        finally:
            self.connection.unregister("_amplitude_records")

    def read_arrow(
        self, start: datetime | None = None, end: datetime | None = None, project: str | None = None
    ) -> pa.Table:
        """Events with `server_upload_time` in [start, end] (either end open when None), in load order."""
        where, params = time_filter(start, end, project)
        table = self.connection.sql(
            f"SELECT {COLUMNS_SQL} FROM {EVENTS}{where} ORDER BY _upload_hour, _member, _line", params=params
        ).to_arrow_table()
        return table.cast(ARROW_SCHEMA)

    def count_by_hour(self, project: str) -> dict[datetime, int]:
        """Rows of `project` stored per `_upload_hour` (what `verify` compares with the ledger)."""
        return hour_counts(
            self.connection,
            f"SELECT _upload_hour AS hour, count(*) AS n FROM {EVENTS} WHERE _project = ? GROUP BY 1",
            [project],
        )

    def deletion_records(self, project: str) -> list[DeletionRecord]:
        """The deletion jobs applied to `project`, by day (`_amplitude_deletions`)."""
        try:
            table = self.connection.sql(f"SELECT * FROM {DELETIONS} WHERE project = ? ORDER BY day",
                                        params=[project]).to_arrow_table()
        except duckdb.CatalogException:  # no deletion applied yet
            return []
        return [DeletionRecord.from_dict(row) for row in table.to_pylist()]

    def delete_users(self, project: str, amplitude_ids: list[int], record: DeletionRecord) -> DeletionRecord:
        """Delete every row of `amplitude_ids` of `project` from `events` (their hours' ledger counts follow) and
        from `cohort_members` where that table exists, and store `record` with the rows counted, atomically."""
        con = self.connection
        params = {"project": project}
        con.begin()
        try:
            con.execute(DELETIONS_DDL)
            con.register(DELETED, deleted_table(amplitude_ids))
            gone = hour_counts(con, f"SELECT _upload_hour AS hour, count(*) AS n FROM {EVENTS} "
                                    f"WHERE _project = $project AND {DELETED_ROWS} GROUP BY 1", params)
            if gone:
                con.execute(f"DELETE FROM {EVENTS} WHERE _project = $project AND {DELETED_ROWS}", params)
                con.register("_amplitude_gone", pa.table({"hour": list(gone), "n": list(gone.values())}))
                con.execute(f"UPDATE {LEDGER} SET events_loaded = events_loaded - g.n FROM _amplitude_gone AS g "
                            f"WHERE {LEDGER}.project = $project AND {LEDGER}.hour = g.hour", params)
                con.unregister("_amplitude_gone")
            members = self._delete_members(project)
            con.unregister(DELETED)
            stored = dataclasses.replace(record, rows_deleted=record.rows_deleted + sum(gone.values()),
                                         cohort_rows_deleted=record.cohort_rows_deleted + members)
            con.register("_amplitude_deletion", deletion_row(project, stored))
            con.execute(f"INSERT OR REPLACE INTO {DELETIONS} SELECT * FROM _amplitude_deletion")
            con.unregister("_amplitude_deletion")
            con.commit()
        except BaseException as exc:
            _rollback(con)
            if isinstance(exc, duckdb.Error):
                raise DestinationError(f"cannot apply deletion job {record.day} to {self.path}: "
                                       f"{_first_line(exc)}") from exc
            raise
        return stored

    def _delete_members(self, project: str) -> int:
        """Delete the deleted users' rows of `cohort_members`, if the table exists; how many."""
        columns = {row[0] for row in self.connection.execute(
            "SELECT column_name FROM duckdb_columns() WHERE database_name = current_database() "
            "AND schema_name = current_schema() AND table_name = ?", [COHORT_MEMBERS]).fetchall()}
        if "amplitude_id" not in columns:
            return 0
        where = (f"TRY_CAST(amplitude_id AS BIGINT) IN (SELECT amplitude_id FROM {DELETED})"
                 + (" AND _project = $project" if "_project" in columns else ""))
        params = {"project": project} if "_project" in columns else {}
        count = self.connection.execute(f"SELECT count(*) FROM {COHORT_MEMBERS} WHERE {where}", params).fetchall()[0][0]
        if count:
            self.connection.execute(f"DELETE FROM {COHORT_MEMBERS} WHERE {where}", params)
            if self._has_table(STATE_TABLE):  # the table's state counts its rows
                self.connection.execute(f"UPDATE {STATE_TABLE} SET rows = rows - ? WHERE project = ? "
                                        "AND table_name = ?", [count, project, COHORT_MEMBERS])
        return int(count)

    def read_batches(self, columns: Sequence[str] | None = None, *, project: str | None = None) -> pa.RecordBatchReader:
        """The stored events (of one project, or all), only `columns`, streamed as Arrow batches in no particular
        order. Read on a cursor of its own, so the sink stays usable meanwhile."""
        from ..schema import arrow_schema

        schema = arrow_schema(columns)
        where, params = time_filter(None, None, project)
        cursor = cursor_on(self.connection)
        try:
            stream = cursor.sql(
                f"SELECT {', '.join(map(quote, schema.names))} FROM {EVENTS}{where}", params=params
            ).to_arrow_reader(ROW_GROUP_SIZE)
        except duckdb.CatalogException:  # a read-only open of a file no run wrote: not ours, most likely
            cursor.close()
            raise DestinationError(f"{self.path} holds no amplitude-export tables ({EVENTS}, {LEDGER})") from None

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                for batch in stream:
                    yield batch.cast(schema)
            finally:
                cursor.close()

        return pa.RecordBatchReader.from_batches(schema, batches())

    def write_table(self, project: str, write: TableWrite) -> TableState:
        """Replace the project's rows of a stream's table in scope and store its state, in one transaction."""
        con = self.connection
        table = quote(write.table)
        now = datetime.now(UTC)
        con.begin()
        try:
            con.execute(f"CREATE TABLE IF NOT EXISTS {STATE_TABLE} ("
                        + ", ".join(f"{name} {kinds[0]}" for name, kinds in STATE_COLUMNS.items())
                        + ", PRIMARY KEY (project, table_name))")
            if write.batches is not None:
                stored = with_project_column(write.schema)
                con.execute(f"CREATE TABLE IF NOT EXISTS {table} ("
                            + ", ".join(f"{quote(c.name)} {sql_type(c, 0)}" for c in stored) + ")")
                if write.scope_column is None:
                    con.execute(f"DELETE FROM {table} WHERE _project = ?", [project])
                else:
                    con.register("_amplitude_scope", pa.table({"v": write.scope_values}))
                    con.execute(f"DELETE FROM {table} WHERE _project = ? AND {quote(write.scope_column)} IN "
                                "(SELECT v FROM _amplitude_scope)", [project])
                    con.unregister("_amplitude_scope")
                failed: list[BaseException] = []

                def rows(batches: Iterable[pa.RecordBatch] = write.batches) -> Iterator[pa.RecordBatch]:
                    try:
                        yield from batches
                    except BaseException as exc:  # noqa: BLE001 - raised again below, keeping its type
                        failed.append(exc)
                        raise

                con.register("_amplitude_rows", pa.RecordBatchReader.from_batches(write.schema, rows()))
                try:
                    con.execute(f"INSERT INTO {table} BY NAME SELECT ? AS _project, * FROM _amplitude_rows",
                                [project])
                except duckdb.Error:
                    if failed:
                        raise failed[0] from None
                    raise
                con.unregister("_amplitude_rows")
            rows = con.execute(f"SELECT count(*) FROM {table} WHERE _project = ?", [project]).fetchall()[0][0] \
                if self._has_table(write.table) else 0
            state = dataclasses.replace(write.state, rows=rows, loaded_at=now)
            con.execute(f"INSERT OR REPLACE INTO {STATE_TABLE} ({', '.join(STATE_COLUMNS)}) VALUES "
                        f"({', '.join('?' * len(STATE_COLUMNS))})", state_values(project, state))
            con.commit()
        except BaseException as exc:
            _rollback(con)
            if isinstance(exc, duckdb.Error):
                raise DestinationError(f"cannot write {write.table} to {self.path}: {_first_line(exc)}") from exc
            raise
        return state

    def table_states(self, project: str) -> dict[str, TableState]:
        """The state of each stream table of `project`, by table name."""
        if not self._has_table(STATE_TABLE):
            return {}
        table = self.connection.sql(f"SELECT * FROM {STATE_TABLE} WHERE project = ? ORDER BY table_name",
                                    params=[project]).to_arrow_table()
        states = [state_from_row(row) for row in table.to_pylist()]
        return {state.table: state for state in states}

    def read_table(self, name: str, schema: pa.Schema, project: str | None = None) -> pa.Table:
        """A stream table's rows (of one project, or all) as `schema` with `_project` first."""
        where, params = (" WHERE _project = ?", [project]) if project is not None else ("", [])
        stored = with_project_column(schema)
        if not self._has_table(name):
            return stored.empty_table()
        table = self.connection.sql(f"SELECT {', '.join(quote(c.name) for c in stored)} FROM {quote(name)}"
                                    f"{where}", params=params).to_arrow_table()
        return table.cast(stored)

    def _has_table(self, name: str) -> bool:
        # asked, not caught: for a missing table DuckDB looks for a Python variable of that name in the caller
        return bool(self.connection.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
            "AND schema_name = current_schema() AND table_name = ?", [name]).fetchall()[0][0])

    def close(self) -> None:
        """Close the connection, which releases DuckDB's file lock, then the run's lock."""
        try:
            self.connection.close()
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> DuckDBSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def time_filter(
    start: datetime | None, end: datetime | None, project: str | None = None
) -> tuple[str, list[Any]]:
    """A WHERE clause (with its parameters) on `server_upload_time`, both ends inclusive, and `_project`."""
    clauses: list[str] = []
    params: list[Any] = []
    if project is not None:
        clauses.append("_project = ?")
        params.append(project)
    if start is not None:
        clauses.append("server_upload_time >= ?")
        params.append(start)
    if end is not None:
        clauses.append("server_upload_time <= ?")
        params.append(end)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.rollback()
    except duckdb.Error:
        pass  # the transaction is already gone (the connection failed); the original error matters


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__

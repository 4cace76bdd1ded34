"""The DuckDB sink, the default destination: `events` and the ledger `_amplitude_ledger` in one file.

A window is one transaction: its hours' old rows are deleted; its batches are streamed into `events` by a single
INSERT (DuckDB pulls them from an Arrow stream, so a window never has to fit in memory and no per-statement cost
is paid per batch), with later copies of a uuid dropped on the way (`Intake`); the window's rows whose uuid
another hour already holds are deleted (usually none); the window's ledger rows are upserted last. A crash at
any point leaves the file as it was before the window. `events` has no primary key on purpose: an index over
every uuid would cost memory on every open and slow inserts.

How the batches are checked, counted and deduplicated on their way in is `duckdb_stage.Intake`; the ledger's
columns are `ledger_table`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from .. import clock
from ..errors import DestinationBusyError, DestinationError, os_reason
from ..ledger import DeletionRecord, HourRecord
from ..schema import ALL_COLUMNS, ARROW_SCHEMA, DUCKDB_TYPES, RETYPED, quote
from ..table_ledger import (
    TableState,
    TableWrite,
)
from ..windows import Window
from . import WindowRead, with_project
from .duckdb_deletions import delete_users, deletion_records
from .duckdb_stage import (
    COLUMNS_SQL,
    Intake,
    configure,
    events_ddl,
    hour_counts,
    ranks_table,
    rollback,
    time_filter,
)
from .duckdb_tables import read_table, state_projects, table_states, write_table
from .filelock import FileLock
from .ledger_table import (
    LEDGER,
    LEDGER_NAMES,
    column_type,
    ledger_columns,
    missing_columns,
    record_from_row,
    records_table,
)
from .staging import SEEN_LIMIT, fill_counts, first_line

EVENTS = "events"
LEDGER_NAMES_SQL = ", ".join(LEDGER_NAMES)  # by name: an added column sits last in an older file's table

# The file is attached under this name (not opened as the default database) so that its inserts can use smaller
# row groups: DuckDB holds each inserting thread's open row group uncompressed, ~200 MB at its default 122,880
# rows of these wide events, and every fresh page costs a fault. 61,440 rows: ~60 MB less RSS and ~0.1 s less
# per day, for a 4 % larger file (73 against 70 MB for 504 k events; docs/PARSE_DESIGN.md). Per attach, not stored.
ALIAS = "amplitude"
ROW_GROUP_SIZE = 61_440

_KINDS = {c.name: c.kind for c in ALL_COLUMNS}


NEARBY = timedelta(hours=6)  # the hours each side of a window whose uuids are dropped on the way in
# the rows of `events AS o` that are not the window's: other hours, or other projects
_OTHERS = "NOT (o._project = $project AND o._upload_hour BETWEEN $start AND $end)"


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
        if read_only and not self.path.exists():
            raise DestinationError(f"no DuckDB database at {self.path}: nothing loaded there yet, run a load first")
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
            raise DestinationError(f"cannot open DuckDB database {self.path}: {first_line(exc)}") from None
        except duckdb.ResourceInUseException:
            self._release()
            raise DestinationBusyError(f"DuckDB database {self.path} is open in this process already") from None
        except (duckdb.Error, OSError) as exc:
            self._release()
            reason = os_reason(exc) if isinstance(exc, OSError) else first_line(exc)
            raise DestinationError(f"cannot open DuckDB database {self.path}: {reason}") from None
        except BaseException:
            self._release()
            raise
        configure(self.connection)
        self._refuse_foreign_events()
        if not read_only:
            # DuckDB's vacuum merges the partial row group each window leaves into full ones at every checkpoint,
            # rewriting them (~1 s per 4 windows of 126 k events, measured); our loads leave that to a later
            # session (a user's `CHECKPOINT` or `VACUUM`), which is also when rows deleted by reloads are reclaimed
            self.connection.execute("SET max_vacuum_tasks = 0")
            self._create_tables()

    def _create_tables(self) -> None:
        columns = ", ".join(f"{name} {kind}" for name, kind in ledger_columns("duckdb"))
        self.connection.execute(events_ddl(EVENTS))
        self.connection.execute(f"CREATE TABLE IF NOT EXISTS {LEDGER} ({columns}, PRIMARY KEY (project, hour))")
        present = [row[0] for row in self.connection.execute(
            "SELECT column_name FROM duckdb_columns() WHERE database_name = current_database() "
            "AND schema_name = current_schema() AND table_name = ?", [LEDGER]
        ).fetchall()]
        for name in missing_columns(present):
            kind = column_type(name, "duckdb")
            self.connection.execute(f"ALTER TABLE {LEDGER} ADD COLUMN IF NOT EXISTS {name} {kind}")
        types = dict(self.connection.execute(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = current_database() "
            "AND schema_name = current_schema() AND table_name = ?", [EVENTS]
        ).fetchall())
        for name, old in RETYPED.items():
            if types.get(name) == DUCKDB_TYPES[old]:
                self._retype(name)

    def _refuse_foreign_events(self) -> None:
        """Refuse, before anything is written, a file whose `events` table this tool did not make."""
        present = {row[0] for row in self.connection.execute(
            "SELECT column_name FROM duckdb_columns() WHERE database_name = current_database() "
            "AND schema_name = current_schema() AND table_name = ?", [EVENTS]
        ).fetchall()}
        lacking = [name for name in ("uuid", "_project", "_upload_hour") if present and name not in present]
        if lacking:
            self.close()
            raise DestinationError(f"{self.path} holds an events table that amplitude-export did not make (it has "
                                   f"no {', '.join(lacking)}): name another file")

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
        """The projects the ledger holds hours for, or that have stream tables, sorted."""
        try:
            rows = self.connection.execute(f"SELECT DISTINCT project FROM {LEDGER}").fetchall()
        except duckdb.CatalogException:
            return []  # a read-only open of a database no run has written to
        return sorted({row[0] for row in rows} | state_projects(self.connection))

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
            records = fill_counts(read.hour_records(), intake.staged, loaded, clock.now())
            self._upsert(project, records)
            con.commit()
        except BaseException as exc:
            rollback(con)
            if isinstance(exc, duckdb.Error):
                raise DestinationError(f"cannot write {window} to {self.path}: {first_line(exc)}") from exc
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
        now = clock.now()
        stamped = [r if r.updated_at else dataclasses.replace(r, updated_at=now) for r in records]
        try:
            self._upsert(project, stamped)
        except duckdb.Error as exc:
            raise DestinationError(f"cannot write the ledger of {self.path}: {first_line(exc)}") from exc

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
        return deletion_records(self.connection, project)

    def delete_users(self, project: str, amplitude_ids: list[int], record: DeletionRecord) -> DeletionRecord:
        """Delete every row of `amplitude_ids` of `project` from `events` (their hours' ledger counts follow) and
        from `cohort_members` where that table exists, and store `record` with the rows counted, atomically."""
        return delete_users(self.connection, project, amplitude_ids, record, str(self.path))

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
        return write_table(self.connection, project, write, str(self.path))

    def table_states(self, project: str) -> dict[str, TableState]:
        """The state of each stream table of `project`, by table name."""
        return table_states(self.connection, project)

    def read_table(self, name: str, schema: pa.Schema, project: str | None = None) -> pa.Table:
        """A stream table's rows (of one project, or all) as `schema` with `_project` first."""
        return read_table(self.connection, name, schema, project)

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

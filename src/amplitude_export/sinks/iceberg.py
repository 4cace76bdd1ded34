"""The Iceberg sink: table `events` (hidden partitioning by day of `server_upload_time`) in any catalog pyiceberg
loads, the ledger in the table's own properties (`iceberg_ledger`).

A window is one catalog commit holding one snapshot: the files holding rows of the window's hours are replaced
(their other rows copied into new files), the window's files added, and the ledger properties of the months it
touches set; the catalog swaps the table's metadata once, so a reader sees the window whole or not at all.

Exactly once: the window is staged in an in-memory DuckDB (spilling to a local temp directory), the first row of
each uuid kept, then the uuids the table holds in other hours (or other projects) are found by a scan of the
`uuid` column, and those rows are left out. Every commit asserts the snapshot it was computed against; when
another writer committed first, the catalog refuses it and the window is computed again against the new
snapshot, from the stage (pyiceberg's own retry would re-apply the replaced files, the new ones and the ledger
months on the newer snapshot without looking at its uuids or its ledger, so it is turned off). A window that
another run loaded from the same data since this one opened the table (same content hashes in the ledger of the
snapshot it would commit on) is left as it is: of two runs of one range, the one behind skips what the one ahead
loaded rather than lose commit after commit to it. Data files of a
refused or failed attempt are deleted; a killed run leaves unreferenced files that no reader sees and
`maintain` removes.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from .. import clock
from ..errors import CommitConflictError, DestinationError
from ..ledger import DeletionRecord, HourRecord
from ..schema import ARROW_SCHEMA
from ..table_ledger import TableState, TableWrite, with_project_column
from ..windows import Window
from . import WindowRead, with_project
from . import iceberg_catalog as catalogs
from . import iceberg_ledger as ledgers
from .duckdb_stage import (
    COLUMNS_SQL,
    DELETED,
    DELETED_ROWS,
    STAGE,
    deleted_table,
    hour_counts,
    stage_batches,
    stage_connection,
    winners_sql,
)
from .iceberg_files import file_batches, predicate, register_file, row_filter, window_filter, write_data_files
from .iceberg_tables import IcebergTables
from .staging import fill_counts, loaded_meanwhile

if TYPE_CHECKING:
    from pyiceberg.expressions import BooleanExpression
    from pyiceberg.manifest import DataFile
    from pyiceberg.table import Table, Transaction

    from .maintenance import Maintenance

log = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 8  # commits lost to other writers in a row before a window gives up (exit 5)
SUMMARY = "amplitude-export."  # prefix of the snapshot summary properties a window's commit sets
FOUND = "_amplitude_found"  # the window's uuids that other hours hold (per attempt)


class IcebergSink:
    """Events in an Iceberg table, the ledger in its properties; see the module."""

    def __init__(
        self,
        rest: str,
        *,
        read_only: bool = False,
        storage_options: dict[str, Any] | None = None,
        memory_limit: str = "256MB",
        threads: int = 2,
        row_group_size: int = 16_384,
        commit_attempts: int = COMMIT_ATTEMPTS,
    ) -> None:
        """Open (creating the catalog, namespace and table unless `read_only`) the destination `iceberg:REST`."""
        self.location = catalogs.parse(rest, storage_options)
        self.description = self.location.label
        self.read_only = read_only
        self.memory_limit, self.threads, self.row_group_size = memory_limit, threads, row_group_size
        self.commit_attempts = commit_attempts
        self._spill: str | None = None
        self._committing = False  # a commit was sent: until the catalog answers, its files may be referenced
        with self._errors("cannot open"):
            self.catalog, self.table = catalogs.open_events(self.location, create=not read_only)
        self._opened = dict(self.table.properties)  # the ledger as this run found it (and planned from)
        self.tables = IcebergTables(self.catalog, self.location.namespace)

    # -- reading --

    def projects(self) -> list[str]:
        """The projects the ledger holds hours for, or that have stream tables, sorted."""
        with self._errors("cannot read the tables beside"):
            return sorted(set(ledgers.read(self.table.properties)) | self.tables.projects())

    def ledger(self, project: str) -> dict[datetime, HourRecord]:
        """Every ledger row of `project`, by hour."""
        return ledgers.read(self.table.properties).get(project, {})

    def read_arrow(
        self, start: datetime | None = None, end: datetime | None = None, project: str | None = None
    ) -> pa.Table:
        """Events with `server_upload_time` in [start, end] (either end open when None), in load order."""
        with self._errors("cannot read"):
            table = self.table.scan(row_filter=row_filter(start, end, project)).to_arrow()
        table = table.sort_by([("_upload_hour", "ascending"), ("_member", "ascending"), ("_line", "ascending")])
        return table.select(ARROW_SCHEMA.names).cast(ARROW_SCHEMA)

    def read_batches(self, columns: Sequence[str] | None = None, *, project: str | None = None) -> pa.RecordBatchReader:
        """The events (of one project, or all), only `columns`, streamed as Arrow batches in no particular order."""
        schema = pa.schema([ARROW_SCHEMA.field(name) for name in columns or ARROW_SCHEMA.names])
        with self._errors("cannot read"):
            scan = self.table.scan(row_filter=row_filter(None, None, project), selected_fields=tuple(schema.names))
            reader = scan.to_arrow_batch_reader()
        return pa.RecordBatchReader.from_batches(schema, (batch.select(schema.names).cast(schema) for batch in reader))

    def count_by_hour(self, project: str) -> dict[datetime, int]:
        """Rows of `project` stored per `_upload_hour` (what `verify` compares with the ledger)."""
        counts: dict[datetime, int] = {}
        with self._errors("cannot read"):
            for batch in self.read_batches(["_upload_hour"], project=project):
                values = pc.value_counts(batch.column(0))
                for hour, n in zip(values.field("values").to_pylist(), values.field("counts").to_pylist(),
                                   strict=True):
                    counts[hour.astimezone(UTC)] = counts.get(hour.astimezone(UTC), 0) + n
        return dict(sorted(counts.items()))

    # -- writing --

    def write_window(
        self,
        project: str,
        window: Window,
        read: WindowRead,
    ) -> list[HourRecord]:
        """Replace the window's hours with `batches`, once per uuid, with the ledger, in one catalog commit."""
        self._check_writable()
        con = self._connect()
        try:
            with self._errors(f"cannot write {window} to"):
                con.begin()  # one transaction: committing each staged batch on its own costs more CPU
                staged = stage_batches(con, window, with_project(read.batches, project))
                con.execute(f"DELETE FROM {STAGE} WHERE NOT ({winners_sql(None)})")  # first copy of each uuid
                records = read.hour_records()
                return self._commit(lambda table, written: self._window_commit(
                    con, table, project, window, staged, records, written))
        finally:
            con.close()

    def record_hours(self, project: str, records: list[HourRecord]) -> None:
        """Store ledger rows for hours without events (empty, failed, too large); the rows stay as they are."""
        self._check_writable()
        now = clock.now()
        stamped = [r if r.updated_at else _stamped(r, now) for r in records]

        def commit(table: Table, written: list[str]) -> list[HourRecord]:
            tx = catalogs.without_retries(table).transaction()
            # an empty snapshot, so the commit asserts the snapshot it read the ledger months from
            with tx.update_snapshot(snapshot_properties=_summary(project, None, stamped)).fast_append():
                pass
            tx.set_properties(ledgers.updates(table.properties, project, stamped))
            self.send(tx)
            return stamped

        with self._errors("cannot write the ledger of"):
            self._commit(commit)

    def _commit(self, attempt: Callable[[Table, list[str]], Any]) -> Any:
        """Run `attempt` (which commits) against the latest snapshot until the catalog takes its commit."""
        from pyiceberg.exceptions import CommitFailedException, ValidationException

        for n in range(1, self.commit_attempts + 1):
            table = self.table.refresh()  # the latest snapshot: another run may have committed since this one did
            written: list[str] = []
            self._committing = False
            try:
                return attempt(table, written)
            except (CommitFailedException, ValidationException) as exc:
                self._delete(written)  # the catalog refused the commit: nothing references them
                if n == self.commit_attempts:
                    raise CommitConflictError(
                        f"{self.description}: {n} commits in a row lost to other writers ({_first_line(exc)}); "
                        "nothing of this window was committed: run again") from None
                log.info("%s: another writer committed first; computing the commit again (%d)", self.description, n)
                time.sleep(random.uniform(0.05, 0.2) * n)
            except BaseException:
                if not self._committing:  # else the commit may have landed and reference them
                    self._delete(written)
                raise
        raise AssertionError("unreachable")

    def send(self, tx: Transaction) -> None:
        """Commit `tx` to the catalog; the table as committed becomes `self.table`."""
        self._committing = True
        self.table = tx.commit_transaction()

    def _window_commit(
        self,
        con: duckdb.DuckDBPyConnection,
        table: Table,
        project: str,
        window: Window,
        staged: dict[datetime, int],
        records: list[HourRecord],
        written: list[str],
    ) -> list[HourRecord]:

        hours = [r.hour for r in records]
        stored = ledgers.hours(table.properties, project, hours)
        seen = ledgers.hours(self._opened, project, hours)
        if records and all(loaded_meanwhile(stored.get(r.hour), seen.get(r.hour), r) for r in records):
            # another run committed the window from the same bytes since this one opened the table: this commit
            # would replace its rows with the same rows, so none is made (as if it came first, then the other's)
            log.info("%s: %s was loaded from the same data by run %s meanwhile; left as it is", self.description,
                     window, ", ".join(sorted({str(stored[r.hour].run_id) for r in records})))
            return [stored[r.hour] for r in records]
        mine = window_filter(project, window)
        keep = self._skip_taken(con, table, mine)
        loaded = hour_counts(con, f"SELECT _upload_hour AS hour, count(*) AS n FROM {STAGE} WHERE {keep} GROUP BY 1")
        filled = fill_counts(records, staged, loaded, clock.now())
        # files holding rows of the window's hours: dropped, their other rows copied into new files of the same day
        replaced, added = self._rewrite_without(table, mine, written)
        added += self._write_files(con, table, keep, written)
        self._send_files(table, replaced, added, _summary(project, window, filled),
                         ledgers.updates(table.properties, project, filled))
        return filled

    def _rewrite_without(self, table: Table, rows: BooleanExpression, written: list[str]) -> tuple[
            list[DataFile], list[DataFile]]:
        """(files holding any of `rows`, new files with their other rows), read and written one file at a time."""
        from pyiceberg.expressions import Not

        replaced, added = [], []
        for task in table.scan(row_filter=rows).plan_files() if table.current_snapshot() is not None else []:
            copies = write_data_files(table, task.file.partition[0], file_batches(table, task, Not(rows)), written)
            if not task.delete_files and sum(f.record_count for f in copies) == task.file.record_count:
                self._delete([f.file_path for f in copies])  # its metrics only looked as if it held some
                continue
            replaced.append(task.file)
            added += copies
        return replaced, added

    def _send_files(self, table: Table, replaced: list[DataFile], added: list[DataFile], summary: dict[str, str],
                    properties: dict[str, str]) -> None:
        """Commit one snapshot removing `replaced` and adding `added`, with `properties` set, against `table`."""
        tx = catalogs.without_retries(table).transaction()
        update = tx.update_snapshot(snapshot_properties=summary)
        with update.overwrite() if replaced else update.fast_append() as snapshot:
            for data_file in replaced:
                snapshot.delete_data_file(data_file)
            for data_file in added:
                snapshot.append_data_file(data_file)
        tx.set_properties(properties)
        self.send(tx)

    # -- deletions (User Privacy API jobs) --

    def deletion_records(self, project: str) -> list[DeletionRecord]:
        """The deletion jobs applied to `project`, by day (kept in the table's properties, like the ledger)."""
        return ledgers.read_deletions(self.table.properties, project)

    def delete_users(self, project: str, amplitude_ids: list[int], record: DeletionRecord) -> DeletionRecord:
        """In one commit: rewrite the files holding rows of `project` whose amplitude_id (or the one `_extra`
        kept as text) is in `amplitude_ids` without them, lower their hours' `events_loaded`, and store `record`
        with `rows_deleted` raised. A file is read twice (count, then copy), one file at a time."""
        from pyiceberg.expressions import And, Or

        self._check_writable()
        maybe = And(predicate("EqualTo", "_project", project),
                    Or(predicate("In", "amplitude_id", set(amplitude_ids)), predicate("IsNull", "amplitude_id")))
        gone_rows = f"_project = $project AND {DELETED_ROWS}"

        with self._errors(f"cannot apply deletion job {record.day} to the cohort_members beside"):
            members = self.tables.delete_members(project, amplitude_ids, record.day)

        def commit(table: Table, written: list[str]) -> DeletionRecord:
            gone: dict[datetime, int] = {}
            replaced: list[DataFile] = []
            added: list[DataFile] = []
            con = self._connect()
            try:
                con.register(DELETED, deleted_table(amplitude_ids))
                tasks = table.scan(row_filter=maybe).plan_files() if amplitude_ids and table.current_snapshot() else []
                for task in tasks:
                    register_file(con, table, task)
                    counts = hour_counts(con, "SELECT _upload_hour AS hour, count(*) AS n FROM _amplitude_file "
                                              f"WHERE {gone_rows} GROUP BY 1", {"project": project})
                    if not counts:
                        continue
                    for hour, n in counts.items():
                        gone[hour] = gone.get(hour, 0) + n
                    register_file(con, table, task)
                    kept = con.sql(f"SELECT {COLUMNS_SQL} FROM _amplitude_file WHERE NOT ({gone_rows})",
                                   params={"project": project}).to_arrow_reader(self.row_group_size)
                    added += write_data_files(table, task.file.partition[0], kept, written)
                    replaced.append(task.file)
            finally:
                con.close()
            ledger = ledgers.read(table.properties).get(project, {})
            lowered = [dataclasses.replace(ledger[h], events_loaded=ledger[h].events_loaded - n)
                       for h, n in gone.items() if h in ledger]
            stored = dataclasses.replace(record, rows_deleted=record.rows_deleted + sum(gone.values()),
                                         cohort_rows_deleted=max(record.cohort_rows_deleted, members))
            properties = {**ledgers.updates(table.properties, project, lowered),
                          **ledgers.deletion_updates(table.properties, project, stored)}
            summary = {f"{SUMMARY}project-tag": ledgers.project_tag(project),
                       f"{SUMMARY}deletion-job": stored.day.isoformat()}
            self._send_files(table, replaced, added, summary, properties)
            return stored

        with self._errors(f"cannot apply deletion job {record.day} to"):
            return self._commit(commit)

    def _skip_taken(self, con: duckdb.DuckDBPyConnection, table: Table, mine: BooleanExpression) -> str:
        """A WHERE clause over the stage leaving out the uuids the table holds outside the window."""
        from pyiceberg.expressions import Not

        con.execute(f"DROP TABLE IF EXISTS {FOUND}")
        if table.current_snapshot() is None:
            return "TRUE"
        reader = table.scan(row_filter=Not(mine), selected_fields=("uuid",)).to_arrow_batch_reader()
        con.register("_amplitude_others", reader)
        try:
            # the others are streamed once past a hash of the window's uuids, not the other way round
            con.execute(f"CREATE TEMP TABLE {FOUND} AS SELECT DISTINCT uuid FROM _amplitude_others "
                        f"WHERE uuid IN (SELECT uuid FROM {STAGE} WHERE uuid IS NOT NULL)")
        finally:
            con.unregister("_amplitude_others")
        if not con.execute(f"SELECT count(*) FROM {FOUND}").fetchall()[0][0]:
            return "TRUE"
        return f"(uuid IS NULL OR uuid NOT IN (SELECT uuid FROM {FOUND}))"

    def _write_files(self, con: duckdb.DuckDBPyConnection, table: Table, keep: str, written: list[str]) -> list[
            DataFile]:
        """One data file per partition (upload day) of the stage's kept rows, streamed batch by batch."""
        days = con.execute(f"SELECT DISTINCT datediff('day', DATE '1970-01-01', CAST(server_upload_time AS DATE)) "
                           f"FROM {STAGE} WHERE {keep}").fetchall()
        files = []
        for (day,) in sorted(days, key=lambda d: (d[0] is None, d[0] or 0)):
            if day is None:
                where = "server_upload_time IS NULL"
            else:
                first = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(days=day)
                where = (f"server_upload_time >= TIMESTAMPTZ '{first.isoformat()}' "
                         f"AND server_upload_time < TIMESTAMPTZ '{(first + timedelta(days=1)).isoformat()}'")
            reader = con.sql(f"SELECT {COLUMNS_SQL} FROM {STAGE} WHERE {where} AND {keep}").to_arrow_reader(
                self.row_group_size)
            files += write_data_files(table, day, reader, written)
        return files

    # -- the tables of the other streams (`iceberg_tables`) --

    def write_table(self, project: str, write: TableWrite) -> TableState:
        """Replace the project's rows of a stream's table in scope and store its state, in one catalog commit."""
        self._check_writable()
        with self._errors(f"cannot write {write.table} beside"):
            return self.tables.write(project, write)

    def table_states(self, project: str) -> dict[str, TableState]:
        """The state of each stream table of `project`, by table name."""
        with self._errors("cannot read the tables beside"):
            return self.tables.states(project)

    def read_table(self, name: str, schema: pa.Schema, project: str | None = None) -> pa.Table:
        """A stream table's rows (of one project, or all) as `schema` with `_project` first."""
        with self._errors(f"cannot read {name} beside"):
            return self.tables.read(name, project).cast(with_project_column(schema))

    # -- housekeeping --

    def maintain(self, *, compact: bool = True, older_than: timedelta | None = None) -> Maintenance:
        """Compact small files, expire snapshots older than `older_than` (None: 7 days) and delete unreferenced
        files as old (see `iceberg_maintain`)."""
        from .iceberg_maintain import maintain

        self._check_writable()
        with self._errors("cannot maintain"):
            return maintain(self, compact=compact, older_than=older_than)

    def drop_missing_files(self) -> list[str]:
        """Remove the data files the current snapshot names but storage no longer holds, in one commit (an
        overwrite that adds nothing); their paths. The ledger is left to `maintenance.mark_lost_hours`."""
        self._check_writable()

        def commit(table: Table, written: list[str]) -> list[str]:
            tasks = table.scan().plan_files() if table.current_snapshot() is not None else []
            missing = [task.file for task in tasks if not table.io.new_input(task.file.file_path).exists()]
            if missing:
                self._send_files(table, missing, [], {}, {})
            return [data_file.file_path for data_file in missing]

        with self._errors("cannot repair"):
            return self._commit(commit)

    def close(self) -> None:
        """Release the catalog's connections and this sink's spill directory."""
        engine = getattr(getattr(self, "catalog", None), "engine", None)
        if engine is not None:
            engine.dispose()
        if self._spill is not None:
            import shutil

            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None

    def __enter__(self) -> IcebergSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers --

    def _check_writable(self) -> None:
        if self.read_only:
            raise DestinationError(f"{self.description} was opened read-only")

    def _connect(self) -> duckdb.DuckDBPyConnection:
        """A private in-memory DuckDB spilling to a local temp directory; insertion order kept."""
        if self._spill is None:
            self._spill = tempfile.mkdtemp(prefix="amplitude-export-spill-")
        return stage_connection(self.memory_limit, self.threads, self._spill)

    def _delete(self, paths: list[str]) -> None:
        for path in paths:
            try:
                self.table.io.delete(path)
            except Exception:  # noqa: BLE001 - an orphan at worst, which `maintain` removes
                log.warning("%s: could not delete %s", self.description, path)

    def _errors(self, doing: str) -> catalogs.Errors:
        return catalogs.Errors(self.description, doing)


def _summary(project: str, window: Window | None, records: list[HourRecord]) -> dict[str, str]:
    """What a window's snapshots say about it, for anyone reading the table's history."""
    summary = {f"{SUMMARY}project-tag": ledgers.project_tag(project), f"{SUMMARY}hours": str(len(records))}
    if window is not None:
        summary[f"{SUMMARY}window"] = str(window)
    run_ids = sorted({r.run_id for r in records if r.run_id})
    if run_ids:
        summary[f"{SUMMARY}run-id"] = ",".join(run_ids)
    return summary


def _stamped(record: HourRecord, now: datetime) -> HourRecord:
    return dataclasses.replace(record, updated_at=now)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__

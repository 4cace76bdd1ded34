"""The Delta Lake sink (`delta:PATH` or `delta:s3://bucket/prefix`): events in a Delta table written with
deltalake (delta-rs), partitioned by `_upload_day`, the UTC date of `_upload_hour` (`delta_events`).
docs/DELTA.md says why.

One window is one commit: a replace-where on the project and the window's hours whose commit info carries the
window's ledger rows (key `amplitude_export`); hours without events are a commit without files. The log is the
record of the ledger, cached in `_amplitude_ledger/` (`delta_ledger`); the streams' tables are `delta_tables`.

There is no lock: a window is deduplicated against the snapshot its commit is made on, with no automatic retry,
so the commit fails if another came in between (put-if-absent of the next log entry); it is then checked against
the new snapshot and committed again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pyarrow as pa
from deltalake import DeltaTable, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError

from .. import clock
from ..errors import CommitConflictError, DestinationError, UsageError
from ..ledger import DeletionRecord, HourRecord
from ..schema import ARROW_SCHEMA
from ..table_ledger import TableState, TableWrite, with_project_column
from ..windows import Window
from . import WindowRead, with_project
from .delta_events import DAY, DELTA_SCHEMA, delta_options, doomed_predicate, open_events, replace_where, table_uri
from .delta_ledger import LEDGER_DIR, DeltaLedger, commit_properties
from .delta_tables import COMMIT_ATTEMPTS, META, DeltaTables, carried
from .duckdb_stage import (
    COLUMNS_SQL,
    DELETED,
    DELETED_ROWS,
    STAGE,
    deleted_table,
    hour_counts,
    stage_batches,
    stage_connection,
    time_filter,
    winners_sql,
)
from .maintenance import Maintenance, lost_file_hint
from .staging import fill_counts, first_line, loaded_meanwhile

__all__ = ["LEDGER_DIR", "META", "DeltaSink", "delta_options"]  # LEDGER_DIR: delta_ledger's, META: delta_tables's

log = logging.getLogger(__name__)

BATCH_ROWS = 16_384  # rows per batch DuckDB hands delta-rs; each side holds a few, so larger ones cost memory
WRITER = WriterProperties(compression="ZSTD")
_TAKEN = "_amplitude_taken"
_KEPT = "_amplitude_kept"  # the staged rows that are committed: first copies whose uuid no other hour holds


class DeltaSink:
    """Events in a Delta table at `uri`, their ledger in its commits (and folded in `_amplitude_ledger/`)."""

    def __init__(
        self,
        uri: str,
        *,
        read_only: bool = False,
        storage_options: dict[str, Any] | None = None,
        memory_limit: str = "256MB",
        threads: int = 2,
    ) -> None:
        """Open the table (creating it unless `read_only`) and read its ledger.

        `uri` is a local path, `file://` URL or any URL delta-rs reaches (`s3://`, `gs://`, `az://`, ...);
        `storage_options` go to delta-rs (its object store's keys, e.g. `endpoint_url`, `aws_access_key_id`);
        by default it reads the store's environment variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...).
        """
        if not uri.strip():
            raise UsageError("delta: name a table directory or URL: delta:PATH, delta:s3://bucket/prefix")
        self.uri = table_uri(uri)
        self.description = f"delta:{self.uri}"
        self.read_only = read_only
        self.options = delta_options(storage_options)
        self.memory_limit = memory_limit
        self.threads = threads
        self._spill: str | None = None
        self._ledger = DeltaLedger(self.uri, self.options)
        self.tables = DeltaTables(self.uri, self.options)
        try:
            cache = self._ledger.read_cache()  # before the events table: the cache never runs ahead of the snapshot
            self.table = open_events(self.uri, self.options, read_only=read_only)
            self._ledger.load(cache, self.table)
        except (DeltaError, OSError) as exc:
            if str(exc).startswith("Unknown scheme"):
                scheme = self.uri.partition("://")[0]
                raise UsageError(f"--dest delta:{self.uri}: delta-rs reaches no store {scheme}:// (use a path, "
                                 "s3://, gs://, az:// or abfss://)") from None
            raise DestinationError(f"cannot open Delta table {self.uri}: {first_line(exc)}") from None

    # -- the ledger (`delta_ledger`) --

    def projects(self) -> list[str]:
        """The projects the ledger holds hours for, or that have stream tables, sorted."""
        try:
            return sorted(set(self._ledger.projects()) | self.tables.projects())
        except (DeltaError, OSError) as exc:
            raise self._failed("cannot read the tables beside", exc) from None

    def ledger(self, project: str) -> dict[datetime, HourRecord]:
        """Every ledger row of `project`, by hour."""
        return self._ledger.hours(project)

    # -- writing --

    def write_window(
        self,
        project: str,
        window: Window,
        read: WindowRead,
    ) -> list[HourRecord]:
        """Replace the window's hours with `batches`, once per uuid, in one commit that carries the ledger rows."""
        self._check_writable()
        con = self._connect()
        try:
            staged = stage_batches(con, window, with_project(read.batches, project))
            con.execute(f"DELETE FROM {STAGE} WHERE NOT ({winners_sql(None)})")  # later copies within the window
            con.execute(f"CREATE TEMP TABLE {_TAKEN} (uuid VARCHAR)")
            con.execute(f"CREATE TEMP VIEW {_KEPT} AS SELECT * FROM {STAGE} "
                        f"WHERE NOT EXISTS (SELECT 1 FROM {_TAKEN} AS t WHERE t.uuid = {STAGE}.uuid)")
            records_read = read.hour_records()
            hours = [r.hour for r in records_read]
            seen = self._ledger.hours(project, hours)
            for attempt in range(1, COMMIT_ATTEMPTS + 1):
                stored = self._ledger.hours(project, hours) if attempt > 1 else seen  # new rows come with a loss
                if records_read and all(loaded_meanwhile(stored.get(r.hour), seen.get(r.hour), r)
                                        for r in records_read):
                    # another run committed the window from the same bytes meanwhile: committing it again would
                    # only replace its rows with the same rows (as if this run came first, then the other)
                    log.info("%s: %s was loaded from the same data by run %s meanwhile; left as it is", self.uri,
                             window, ", ".join(sorted({str(stored[r.hour].run_id) for r in records_read})))
                    return [stored[r.hour] for r in records_read]
                self._find_taken(con, project, window)
                loaded = hour_counts(con, f"SELECT _upload_hour AS hour, count(*) AS n FROM {_KEPT} GROUP BY 1")
                records = fill_counts(records_read, staged, loaded, clock.now())
                try:
                    self._commit_window(con, project, window, records)
                    break
                except CommitFailedError:  # another commit came first: check against its snapshot, then again
                    log.info("%s: another writer committed first; %s is checked again", self.uri, window)
                    self.table.update_incremental()
                    self._ledger.fold(self.table)
                    time.sleep(random.uniform(0.05, 0.2) * attempt)  # noqa: S311 - spreads the racers, not a secret
            else:
                raise CommitConflictError(f"{self.description}: other writers committed before each of "
                                           f"{COMMIT_ATTEMPTS} attempts to commit {window}; run again")
            self._ledger.fold(self.table, project, records)
        except (duckdb.Error, DeltaError, OSError) as exc:
            raise self._failed(f"cannot write {window} to", exc) from exc
        finally:
            con.close()
        self._ledger.save()
        return records

    def _find_taken(self, con: duckdb.DuckDBPyConnection, project: str, window: Window) -> None:
        """Fill `_amplitude_taken` with the staged uuids that rows of other hours (or projects) hold."""
        con.execute(f"DELETE FROM {_TAKEN}")
        if not self.table.file_uris():
            return
        con.register("_amplitude_events", self.table.to_pyarrow_dataset())
        try:
            con.execute(
                f"INSERT INTO {_TAKEN} SELECT DISTINCT o.uuid FROM _amplitude_events AS o "
                f"WHERE o.uuid IN (SELECT uuid FROM {STAGE}) "
                "AND NOT (o._project = $project AND o._upload_hour BETWEEN $start AND $end)",
                {"project": project, "start": window.start, "end": window.end},
            )
        finally:
            con.unregister("_amplitude_events")

    def _commit_window(
        self, con: duckdb.DuckDBPyConnection, project: str, window: Window, records: list[HourRecord]
    ) -> None:
        """One commit on the snapshot `table` holds: the window's hours replaced by `_amplitude_kept`, with the
        ledger rows in its commit info. No automatic retry: a conflict raises CommitFailedError."""
        batches = con.sql(f"SELECT {COLUMNS_SQL}, _upload_hour::DATE AS {DAY} FROM {_KEPT}").to_arrow_reader(BATCH_ROWS)
        stream = pa.RecordBatchReader.from_batches(DELTA_SCHEMA, (batch.cast(DELTA_SCHEMA) for batch in batches))
        write_deltalake(self.table, stream, mode="overwrite", predicate=replace_where(project, window),
                        partition_by=[DAY], writer_properties=WRITER,
                        commit_properties=commit_properties(project, records, retries=0))

    def record_hours(self, project: str, records: list[HourRecord]) -> None:
        """Store ledger rows for hours without events (empty, failed, too large) in a commit that adds no file."""
        self._check_writable()
        if not records:
            return
        now = clock.now()
        stamped = [r if r.updated_at else dataclasses.replace(r, updated_at=now) for r in records]
        try:
            write_deltalake(self.table, DELTA_SCHEMA.empty_table(), mode="append",
                            commit_properties=commit_properties(project, stamped))
            self._ledger.fold(self.table, project, stamped)
        except (DeltaError, OSError) as exc:
            raise DestinationError(f"cannot write the ledger of {self.uri}: {first_line(exc)}") from exc
        self._ledger.save()

    # -- deletions (User Privacy API jobs) --

    def deletion_records(self, project: str) -> list[DeletionRecord]:
        """The deletion jobs applied to `project`, by day (in the commits' info, folded like the ledger)."""
        return self._ledger.deletions(project)

    def delete_users(self, project: str, amplitude_ids: list[int], record: DeletionRecord) -> DeletionRecord:
        """Delete the users' rows of `project` from `cohort_members` (its own commit, see `delta_tables`), then
        from `events` in one commit (delta-rs rewrites the files holding them) whose info carries the hours'
        lowered ledger rows and `record`, with the rows counted."""
        self._check_writable()
        try:
            members = self.tables.delete_members(project, amplitude_ids, record.day)
            for _ in range(COMMIT_ATTEMPTS):
                gone, uuids = self._doomed(project, amplitude_ids)
                ledger = self.ledger(project)
                lowered = [dataclasses.replace(ledger[h], events_loaded=ledger[h].events_loaded - n)
                           for h, n in gone.items() if h in ledger]
                stored = dataclasses.replace(record, rows_deleted=record.rows_deleted + sum(gone.values()),
                                             cohort_rows_deleted=max(record.cohort_rows_deleted, members))
                properties = commit_properties(project, lowered, retries=0, deletion=stored)
                try:
                    if gone:
                        self.table.delete(doomed_predicate(project, amplitude_ids, uuids, gone),
                                          commit_properties=properties)
                    else:
                        write_deltalake(self.table, DELTA_SCHEMA.empty_table(), mode="append",
                                        commit_properties=properties)
                    break
                except CommitFailedError:
                    log.info("%s: another writer committed first; deletion job %s is checked again", self.uri,
                             record.day)
                    self.table.update_incremental()
                    self._ledger.fold(self.table)  # the ledger rows it lowers are those of the new snapshot
            else:
                raise CommitConflictError(f"{self.description}: other writers committed before each of "
                                           f"{COMMIT_ATTEMPTS} attempts to apply deletion job {record.day}; run again")
            self._ledger.fold(self.table)
        except (duckdb.Error, DeltaError, OSError) as exc:
            raise self._failed(f"cannot apply deletion job {record.day} to", exc) from exc
        self._ledger.save()
        return stored

    def _doomed(self, project: str, amplitude_ids: list[int]) -> tuple[dict[datetime, int], list[str]]:
        """(rows of the users per hour, the uuids of those found only by the `_extra` copy of their id)."""
        if not amplitude_ids or not self.table.file_uris():
            return {}, []
        con = self._connect()
        try:
            con.register("_amplitude_events", self.dataset())
            con.register(DELETED, deleted_table(amplitude_ids))
            where = f"_project = $project AND {DELETED_ROWS}"
            gone = hour_counts(con, f"SELECT _upload_hour AS hour, count(*) AS n FROM _amplitude_events WHERE {where} "
                                    "GROUP BY 1", {"project": project})
            uuids = [row[0] for row in con.execute(f"SELECT uuid FROM _amplitude_events WHERE {where} "
                                                   "AND amplitude_id IS NULL", {"project": project}).fetchall()]
            return gone, uuids
        finally:
            con.close()

    # -- the tables of the other streams (`delta_tables`) --

    def write_table(self, project: str, write: TableWrite) -> TableState:
        """Replace the project's rows of a stream's table in scope and store its state, in one commit."""
        self._check_writable()
        try:
            return self.tables.write(project, write)
        except (DeltaError, OSError) as exc:
            raise DestinationError(f"cannot write {write.table} to {self.uri}: {first_line(exc)}") from exc

    def table_states(self, project: str) -> dict[str, TableState]:
        """The state of each stream table of `project`, by table name."""
        try:
            return self.tables.states(project)
        except (DeltaError, OSError) as exc:
            raise DestinationError(f"cannot read the tables beside {self.uri}: {first_line(exc)}") from exc

    def read_table(self, name: str, schema: pa.Schema, project: str | None = None) -> pa.Table:
        """A stream table's rows (of one project, or all) as `schema` with `_project` first."""
        try:
            return self.tables.read(name, project).cast(with_project_column(schema))
        except (DeltaError, OSError) as exc:
            raise DestinationError(f"cannot read {name} beside {self.uri}: {first_line(exc)}") from exc

    # -- reading --

    def read_arrow(
        self, start: datetime | None = None, end: datetime | None = None, project: str | None = None
    ) -> pa.Table:
        """Events with `server_upload_time` in [start, end] (either end open when None), in load order."""
        where, params = time_filter(start, end, project)
        return self._query(f"SELECT {COLUMNS_SQL} FROM _amplitude_events{where} "
                           "ORDER BY _upload_hour, _member, _line", params).cast(ARROW_SCHEMA)

    def count_by_hour(self, project: str) -> dict[datetime, int]:
        """Rows of `project` stored per `_upload_hour` (what `verify` compares with the ledger)."""
        table = self._query("SELECT _upload_hour AS hour, count(*) AS n FROM _amplitude_events "
                            "WHERE _project = ? GROUP BY 1", [project])
        return {row["hour"].astimezone(UTC): row["n"] for row in table.to_pylist()}

    def read_batches(self, columns: Sequence[str] | None = None, *, project: str | None = None) -> pa.RecordBatchReader:
        """The stored events (of one project, or all), only `columns`, streamed as Arrow batches in no particular
        order, from the table version this sink holds."""
        import pyarrow.dataset as pads

        names = list(columns or ARROW_SCHEMA.names)
        where = pads.field("_project") == project if project is not None else None
        try:
            reader = self.dataset().scanner(columns=names, filter=where).to_reader()
        except (DeltaError, OSError) as exc:
            raise self._failed("cannot read", exc) from None
        schema = pa.schema([ARROW_SCHEMA.field(name) for name in names])
        return pa.RecordBatchReader.from_batches(schema, (batch.cast(schema) for batch in reader))

    def dataset(self) -> Any:
        """The events of the snapshot this sink holds, as a pyarrow dataset (with `_upload_day`)."""
        return self.table.to_pyarrow_dataset()

    def _query(self, sql: str, params: list[Any]) -> pa.Table:
        con = self._connect()
        try:
            con.register("_amplitude_events", self.dataset())
            return con.sql(sql, params=params).to_arrow_table()
        except (duckdb.Error, DeltaError, OSError) as exc:
            raise self._failed("cannot read", exc) from None
        finally:
            con.close()

    # -- housekeeping --

    def maintain(self, *, compact: bool = True, older_than: timedelta | None = None) -> Maintenance:
        """Compact small files (when `compact`), write a checkpoint, then delete the files no version younger than
        `older_than` needs (default: the table's `delta.deletedFileRetentionDuration`, a week unless set), in the
        events table and the tables beside it."""
        self._check_writable()
        enforce = older_than is None  # a shorter retention than the table's, asked for explicitly, is allowed
        hours = None if older_than is None else math.ceil(older_than.total_seconds() / 3600)
        done = Maintenance(self.description)
        try:
            if compact:
                compacted = self.table.optimize.compact(writer_properties=WRITER)
                done.files_compacted, done.files_written = compacted["numFilesRemoved"], compacted["numFilesAdded"]
            self.table.create_checkpoint()
            # full: also the files no commit ever named (a window interrupted, or beaten, before its commit)
            removed = self.table.vacuum(hours, dry_run=False, enforce_retention_duration=enforce, full=True)
            self._ledger.save(every=1, strict=True)
            for uri in [self._ledger.cache_uri, *self._side_tables()]:
                side = DeltaTable(uri, storage_options=self.options)
                if compact and uri != self._ledger.cache_uri:  # its commit carries the newest states forward
                    side.optimize.compact(writer_properties=WRITER, commit_properties=carried(side))
                removed += side.vacuum(hours, dry_run=False, enforce_retention_duration=enforce, full=True,
                                       commit_properties=carried(side))
        except CommitFailedError:
            raise CommitConflictError(f"{self.description}: a run committed while maintain compacted; "
                                       "run maintain again") from None
        except (DeltaError, OSError) as exc:
            raise self._failed("cannot maintain", exc) from None
        done.files_deleted = len(removed)
        return done

    def drop_missing_files(self) -> list[str]:
        """Remove the data files the events table's log names but storage no longer holds, in one commit
        (delta-rs's file system check); their paths. The ledger is left to `maintenance.mark_lost_hours`."""
        self._check_writable()
        try:
            removed = self.table.repair(dry_run=False)["files_removed"]
        except CommitFailedError:
            raise CommitConflictError(f"{self.description}: a run committed during the repair; "
                                      "run maintain --repair again") from None
        except (DeltaError, OSError) as exc:
            raise DestinationError(f"cannot repair {self.uri}: {first_line(exc)}") from None
        return [str(path) for path in removed]

    # -- helpers --

    def _side_tables(self) -> list[str]:
        """The URIs of the stream tables beside `events` that exist."""
        return self.tables.existing()

    def _failed(self, doing: str, exc: BaseException) -> DestinationError:
        """One line: what failed, on which table, why, and how to repair the table if one of its files is gone."""
        return DestinationError(f"{doing} {self.uri}: {lost_file_hint(first_line(exc), self.description)}")

    def _check_writable(self) -> None:
        if self.read_only:
            raise DestinationError(f"{self.description} was opened read-only")

    def _connect(self) -> duckdb.DuckDBPyConnection:
        """A private in-memory DuckDB that spills to a local temporary directory of this sink."""
        if self._spill is None:
            self._spill = tempfile.mkdtemp(prefix="amplitude-export-spill-")
        return stage_connection(self.memory_limit, self.threads, self._spill)

    def close(self) -> None:
        """Bring `_amplitude_ledger` up to date and remove the spill directory; there is no lock to release."""
        if not self.read_only:
            self._ledger.save(every=1)
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None

    def __enter__(self) -> DeltaSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


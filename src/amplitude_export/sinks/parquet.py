"""The Parquet sink: a Hive-partitioned dataset `DIR/upload_date=YYYY-MM-DD/<hours>-<project tag>.parquet` plus
`DIR/_state/`.

Partitioned by upload date, not event date: late events would scatter one window over many event dates, while
a window covers one upload date (two if it crosses midnight, then one file per date). Each file is named for
the upload hours it covers and its project (`20240301T00_20240301T23-1a2b3c4d.parquet`, the tag a hash of the
project name), so replacing a window means replacing its files.

Crash safety rests on one rule: `_state/ledger.json` names every live data file and is rewritten atomically
(temp file, fsync, `os.replace`) only after the new data files are complete and renamed into place. A
`.parquet` file the state does not name is an orphan of a crash and is deleted on open, as are temp files
(`.tmp-*`, never ending in `.parquet`, so readers' globs never see them). A kill at any point therefore leaves
either the old window or the new one, and the same run again finishes the job.

A data file the state names but the directory lacks (deleted by hand) is forgotten on open, by readers too: its
loaded hours read as failed (`LOST`), so `verify` names them and a run over them loads them again; the next
commit writes that down.

Exactly once across windows: a window's rows are deduplicated by an in-memory DuckDB against the `uuid` column
of the files holding other hours. The files are the only copy of the data; the state is small and holds the
ledger.

All file access goes through a store (`parquet_store`: a local directory or any fsspec URL, where the same
rules hold without atomic renames or flock).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import uuid as uuid_module
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from .. import clock
from ..errors import DestinationBusyError, DestinationError
from ..ledger import FAILED, LOADED, DeletionRecord, HourRecord
from ..outcome import plural
from ..schema import ARROW_SCHEMA
from ..table_ledger import TableState, TableWrite
from ..windows import Window
from . import WindowRead, with_project
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
from .parquet_state import STATE_FILE, DataFile, by_date, parse_state, state_text
from .parquet_store import (
    LOCK_FILE,
    LOCK_STALE_AFTER,
    STATE_DIR,
    TEMP_PREFIX,
    FsspecDirectory,
    LocalDirectory,
    open_store,
    project_tag,
)
from .parquet_tables import ParquetTables
from .staging import fill_counts, first_line, foreign_entries, foreign_message

log = logging.getLogger(__name__)

# the ledger's reason for a loaded hour whose data file is gone
LOST = "its data file is missing, deleted after it was loaded: a run over these hours loads them again"


class ParquetSink:
    """Events as Parquet files under `root`, the ledger in `root/_state/ledger.json`; see the module."""

    def __init__(
        self,
        root: str,
        *,
        memory_limit: str = "256MB",
        threads: int = 2,
        row_group_size: int = 16_384,
        read_only: bool = False,
        storage_options: dict[str, Any] | None = None,
        lock_stale_after: float = LOCK_STALE_AFTER.total_seconds(),
    ) -> None:
        """Open (creating it unless `read_only`) and lock the dataset, then delete what a crash left behind.

        `root` is a local directory or an fsspec URL (`s3://bucket/prefix`, `memory://x`); `storage_options`
        go to fsspec (credentials, endpoint). `lock_stale_after` (seconds) is when an object store's lock left
        by a dead run may be taken over. A read-only open takes no lock and cleans nothing: it reads only the
        files the state names, so a run writing meanwhile does not disturb it.
        """
        self.store = open_store(root, storage_options, timedelta(seconds=lock_stale_after))
        self.root: Path | str = self.store.root if isinstance(self.store, LocalDirectory) else self.store.label
        self.description = f"parquet:{self.root}"
        self.memory_limit = memory_limit
        self.threads = threads
        self.row_group_size = row_group_size
        self.read_only = read_only
        self._reader_spill: str | None = None  # a read-only open's own spill directory (see `_connect`)
        self.tables = ParquetTables(self.store, self.root, row_group_size)
        if read_only:
            self._read_state()
            return
        try:
            if not self.store.exists(STATE_FILE):
                self._check_ours()  # before `_state` is made: a refused directory is left as it was
            self.store.prepare()
            locked = self.store.lock()
        except OSError as exc:
            raise DestinationError(
                f"cannot open Parquet directory {self.root}: {exc.strerror or first_line(exc)}"
            ) from None
        if not locked:
            if isinstance(self.store, FsspecDirectory):
                raise DestinationBusyError(
                    f"Parquet dataset {self.root} is in use by another run ({LOCK_FILE}: "
                    f"{self.store.lock_holder()}); if no run is active, delete {self.root}/{LOCK_FILE}"
                )
            raise DestinationBusyError(
                f"Parquet directory {self.root} is in use by another run ({LOCK_FILE})"
            )
        try:
            self.files, self.state_ledger = self._load_state(self.store.read_text(STATE_FILE))
            self._remove_orphans()
        except BaseException:
            self.store.unlock()
            raise

    # -- state --

    def _check_ours(self) -> None:
        """Refuse a directory without our state that holds anything but `_state`: files of anything else (another
        tool's, a Delta table's) would sit among ours and be read as ours."""
        if others := foreign_entries(self.store.names(), {STATE_DIR}):
            raise DestinationError(foreign_message(
                str(self.root), others, STATE_FILE,
                "not written by amplitude-export, or its state was lost; use an empty directory"))

    def _read_state(self) -> None:
        """A read-only open: load the state, and forget the files it names that are gone.

        A run deletes the files it replaced only after committing the state that no longer names them, so a file
        gone while the state still reads the same was deleted by someone else; when the state changed meanwhile,
        the new one is read instead."""
        for attempt in range(10):
            if attempt:
                time.sleep(0.2)  # a run is committing a window: read after it
            try:
                text = self.store.read_text(STATE_FILE)
                if text is None:
                    raise DestinationError(f"{self.root} is not a Parquet dataset written by amplitude-export")
                self.files, self.state_ledger = self._load_state(text)
                missing = sorted(set(self.files) - set(self.store.data_files()))
                if not missing or self.store.read_text(STATE_FILE) == text:
                    self._forget(missing)
                    return
            except OSError as exc:
                raise DestinationError(f"cannot open Parquet dataset {self.root}: {first_line(exc)}") from None
        raise DestinationBusyError(f"Parquet dataset {self.root} changed while it was being opened: read again")

    def _forget(self, missing: list[str]) -> None:
        """Drop the data files in `missing` from the state in memory and mark their loaded hours failed (`LOST`),
        so reads skip them, `verify` names the hours and a run loads them again; the next commit keeps it so."""
        missing = [rel for rel in missing if not self.store.exists(rel)]  # a listing that missed a file is no proof
        if not missing:
            return
        log.warning("%s: %s named in %s not found (%s): their hours count as failed until a run loads them again",
                    self.root, plural(len(missing), "data file"), STATE_FILE, ", ".join(missing[:3]))
        ledger = {project: dict(hours) for project, hours in self.state_ledger.items()}
        for rel in missing:
            lost = self.files.pop(rel)
            for key, record in ledger.get(lost.project, {}).items():
                if record["status"] == LOADED and record.get("events_loaded") \
                        and lost.start <= datetime.fromisoformat(key) <= lost.end:
                    ledger[lost.project][key] = {**record, "status": FAILED, "reason": LOST, "events_loaded": 0}
        self.state_ledger = ledger

    def _load_state(self, text: str | None) -> tuple[dict[str, DataFile], dict[str, dict[str, dict[str, Any]]]]:
        """The files and ledger of the state file's `text` (None: there is none yet, so create it)."""
        self.state_deletions: dict[str, dict[str, dict[str, Any]]] = {}  # project -> job day -> DeletionRecord
        if text is None:
            self._check_ours()
            try:
                self._save_state({}, {})
            except OSError as exc:  # a full disk
                raise DestinationError(f"cannot write {self.root}/{STATE_FILE}: {first_line(exc)}") from None
            return {}, {}
        try:
            files, ledger, self.state_deletions = parse_state(text)
            return files, ledger
        except (ValueError, KeyError, TypeError) as exc:
            raise DestinationError(f"cannot read {self.root}/{STATE_FILE}: {exc}") from None

    def _save_state(self, files: dict[str, DataFile], ledger: dict[str, dict[str, dict[str, Any]]],
                    deletions: dict[str, dict[str, dict[str, Any]]] | None = None) -> None:
        """Commit point: after this returns, `files`, `ledger` and `deletions` (default: as they are) are what the
        directory holds."""
        deletions = self.state_deletions if deletions is None else deletions
        self.store.write_text_atomic(STATE_FILE, state_text(files, ledger, deletions))

    def _remove_orphans(self) -> None:
        """Delete what a crash left behind: temp files, Parquet files the state does not name, spill files."""
        on_disk = set()
        for rel in self.store.data_files():
            name = rel.rsplit("/", 1)[1]
            if name.startswith(TEMP_PREFIX) or (name.endswith(".parquet") and rel not in self.files):
                self.store.delete(rel)
            else:
                on_disk.add(rel)
        for rel in self.store.state_temp_files():
            self.store.delete(rel)
        self.store.clear_spill()
        self.tables.remove_orphans()
        self._forget(sorted(set(self.files) - on_disk))

    # -- the Sink protocol --

    def projects(self) -> list[str]:
        """The projects the ledger holds hours for, or that have stream tables, sorted."""
        return sorted({project for project, hours in self.state_ledger.items() if hours} | self.tables.projects())

    def ledger(self, project: str) -> dict[datetime, HourRecord]:
        """Every ledger row of `project`, by hour."""
        records = [HourRecord.from_dict(d) for d in self.state_ledger.get(project, {}).values()]
        return {record.hour: record for record in sorted(records, key=lambda r: r.hour)}

    def write_window(
        self,
        project: str,
        window: Window,
        read: WindowRead,
    ) -> list[HourRecord]:
        """Replace the window's files with `batches`, once per uuid, then commit the state and its ledger."""
        self._check_writable()
        self.store.refresh_lock()
        # temp and renamed files of this attempt, removed if it fails before the commit
        written: list[str] = []
        committing = False
        con = self._connect()
        try:
            con.begin()  # one transaction: committing each staged batch on its own costs 4x the CPU
            staged = stage_batches(con, window, with_project(read.batches, project))
            overlapping = {rel: f for rel, f in self.files.items() if f.overlaps(window, project)}
            # every other file's uuids count as taken: uuids are unique across projects too
            others = [rel for rel, f in self.files.items() if rel not in overlapping or not f.inside(window)]
            taken = None
            if others:
                # rows of other hours, including those of partly replaced files outside the window
                taken = (
                    f"(SELECT uuid FROM {self.store.scan(con, others)} "
                    f"WHERE _project <> {_literal(project)} "
                    f"OR _upload_hour < {_ts(window.start)} OR _upload_hour > {_ts(window.end)})"
                )
            con.execute(f"DELETE FROM {STAGE} WHERE NOT ({winners_sql(taken)})")
            loaded = hour_counts(con, f"SELECT _upload_hour AS hour, count(*) AS n FROM {STAGE} GROUP BY 1")
            records = fill_counts(read.hour_records(), staged, loaded, clock.now())

            new_files: dict[str, DataFile] = {}
            for part in by_date(window):
                source = f"SELECT {COLUMNS_SQL} FROM {STAGE} WHERE {_between(part)}"
                self._copy(con, source, part, project, new_files, written)
            for old in overlapping.values():  # keep the hours of a replaced file that lie outside the window
                for part in old.outside(window):
                    scan = self.store.scan(con, [old.path])
                    source = f"SELECT {COLUMNS_SQL} FROM {scan} WHERE {_between(part)}"
                    self._copy(con, source, part, project, new_files, written)
            con.close()

            files = {rel: f for rel, f in self.files.items() if rel not in overlapping} | new_files
            ledger = {**self.state_ledger, project: dict(self.state_ledger.get(project, {}))}
            for record in records:
                ledger[project][record.hour.astimezone(UTC).isoformat()] = record.to_dict()
            self.store.refresh_lock()  # on an object store: still ours? (a run may have found it stale)
            committing = True
            self._save_state(files, ledger)
        except BaseException as exc:
            con.close()
            if not committing:  # otherwise the state may name them; the next open sorts out which are orphans
                for rel in written:
                    self.store.delete(rel)
            if isinstance(exc, (duckdb.Error, OSError)):
                raise DestinationError(f"cannot write {window} to {self.root}: {first_line(exc)}") from exc
            if isinstance(exc, pa.ArrowException):  # pyarrow reading through fsspec
                raise DestinationError(f"cannot write {window} to {self.root}: {first_line(exc)}") from exc
            raise
        self.files, self.state_ledger = files, ledger
        for rel in overlapping:
            self.store.delete(rel)
        return records

    def record_hours(self, project: str, records: list[HourRecord]) -> None:
        """Store ledger rows for hours without events (empty, failed, too large); data files stay."""
        self._check_writable()
        now = clock.now()
        ledger = {**self.state_ledger, project: dict(self.state_ledger.get(project, {}))}
        for record in records:
            data = record.to_dict()
            data["updated_at"] = data["updated_at"] or now.isoformat()
            ledger[project][record.hour.astimezone(UTC).isoformat()] = data
        try:
            self.store.refresh_lock()
            self._save_state(self.files, ledger)
        except OSError as exc:
            raise DestinationError(f"cannot write {self.root}/{STATE_FILE}: {exc}") from exc
        self.state_ledger = ledger

    def read_arrow(
        self, start: datetime | None = None, end: datetime | None = None, project: str | None = None
    ) -> pa.Table:
        """Events with `server_upload_time` in [start, end] (either end open when None), in load order."""
        if not self.files:
            return ARROW_SCHEMA.empty_table()
        where, params = time_filter(start, end, project)
        con = self._connect()
        try:
            table = con.sql(
                f"SELECT {COLUMNS_SQL} FROM {self.store.scan(con, sorted(self.files))}{where} "
                "ORDER BY _upload_hour, _member, _line",
                params=params,
            ).to_arrow_table()
        except (duckdb.Error, OSError, pa.ArrowException) as exc:  # a file a run replaced after this open
            raise DestinationError(f"cannot read {self.root}: {first_line(exc)}") from None
        finally:
            con.close()
        return table.cast(ARROW_SCHEMA)

    def count_by_hour(self, project: str) -> dict[datetime, int]:
        """Rows of `project` stored per `_upload_hour` (what `verify` compares with the ledger)."""
        files = sorted(rel for rel, f in self.files.items() if f.project == project)
        if not files:
            return {}
        con = self._connect()
        try:
            scan = self.store.scan(con, files)
            return hour_counts(
                con,
                f"SELECT _upload_hour AS hour, count(*) AS n FROM {scan} WHERE _project = ? GROUP BY 1",
                [project],
            )
        except (duckdb.Error, OSError, pa.ArrowException) as exc:  # a file a run replaced after this open
            raise DestinationError(f"cannot read {self.root}: {first_line(exc)}") from None
        finally:
            con.close()

    def deletion_records(self, project: str) -> list[DeletionRecord]:
        """The deletion jobs applied to `project`, by day (the state's `deletions`)."""
        jobs = self.state_deletions.get(project, {})
        return [DeletionRecord.from_dict(jobs[day]) for day in sorted(jobs)]

    def delete_users(self, project: str, amplitude_ids: list[int], record: DeletionRecord) -> DeletionRecord:
        """Rewrite the files of `project` that hold rows of `amplitude_ids` without them, then commit the state
        with those files, the hours' ledger counts lowered and `record` stored (rows counted), in one write."""
        self._check_writable()
        # committed first, on its own: a crash before the state below leaves the job unrecorded, and its re-run
        # (finding no members left) completes it
        members = self.tables.delete_members(project, amplitude_ids)
        self.store.refresh_lock()
        written: list[str] = []
        committing = False
        touched: dict[str, DataFile] = {}
        gone: dict[datetime, int] = {}
        con = self._connect()
        try:
            con.register(DELETED, deleted_table(amplitude_ids))
            for rel, f in sorted(self.files.items()) if amplitude_ids else []:
                if f.project != project:
                    continue
                counts = hour_counts(con, f"SELECT _upload_hour AS hour, count(*) AS n FROM "
                                          f"{self.store.scan(con, [rel])} WHERE {DELETED_ROWS} GROUP BY 1")
                if counts:
                    touched[rel] = f
                    for hour, n in counts.items():
                        gone[hour] = gone.get(hour, 0) + n
            new_files: dict[str, DataFile] = {}
            for rel, f in touched.items():
                source = f"SELECT {COLUMNS_SQL} FROM {self.store.scan(con, [rel])} WHERE NOT {DELETED_ROWS}"
                self._copy(con, source, Window(f.start, f.end), project, new_files, written)
            con.close()
            files = {rel: f for rel, f in self.files.items() if rel not in touched} | new_files
            ledger = {**self.state_ledger, project: dict(self.state_ledger.get(project, {}))}
            for hour, n in gone.items():
                key = hour.astimezone(UTC).isoformat()
                if key in ledger[project]:
                    ledger[project][key] = {**ledger[project][key],
                                            "events_loaded": ledger[project][key]["events_loaded"] - n}
            stored = replace(record, rows_deleted=record.rows_deleted + sum(gone.values()),
                             cohort_rows_deleted=record.cohort_rows_deleted + members)
            deletions = {**self.state_deletions, project: {**self.state_deletions.get(project, {}),
                                                           record.day.isoformat(): stored.to_dict()}}
            self.store.refresh_lock()
            committing = True
            self._save_state(files, ledger, deletions)
        except BaseException as exc:
            con.close()
            if not committing:
                for rel in written:
                    self.store.delete(rel)
            if isinstance(exc, duckdb.Error | OSError | pa.ArrowException):
                raise DestinationError(f"cannot apply deletion job {record.day} to {self.root}: "
                                       f"{first_line(exc)}") from exc
            raise
        self.files, self.state_ledger, self.state_deletions = files, ledger, deletions
        for rel in touched:
            self.store.delete(rel)
        return stored

    def read_batches(self, columns: Sequence[str] | None = None, *, project: str | None = None) -> pa.RecordBatchReader:
        """The events in the files the state names (of one project, or all), only `columns`, streamed as Arrow
        batches by a pyarrow dataset scan (through fsspec for an object store), in no particular order."""
        import pyarrow.dataset as ds

        from ..schema import arrow_schema

        schema = arrow_schema(columns)
        files = sorted(rel for rel, f in self.files.items() if project is None or f.project == project)
        try:
            if isinstance(self.store, FsspecDirectory):
                dataset = self.store.dataset(files)
            else:
                dataset = ds.dataset([self.store.abs(rel) for rel in files], schema=ARROW_SCHEMA, format="parquet")
        except (OSError, pa.ArrowException) as exc:  # a file a run replaced after this open
            raise DestinationError(f"cannot read {self.root}: {first_line(exc)}") from None
        where = None if project is None else ds.field("_project") == project
        return dataset.scanner(columns=list(schema.names), filter=where).to_reader()

    # -- stream tables (`parquet_tables`) --

    def write_table(self, project: str, write: TableWrite) -> TableState:
        """Write the project's new file of a stream's table, then commit the state file naming it."""
        self._check_writable()
        return self.tables.write(project, write)

    def table_states(self, project: str) -> dict[str, TableState]:
        """The state of each stream table of `project`, by table name."""
        return self.tables.states(project)

    def read_table(self, name: str, schema: pa.Schema, project: str | None = None) -> pa.Table:
        """A stream table's rows (of one project, or all) as `schema` with `_project` first."""
        return self.tables.read(name, schema, project)

    def close(self) -> None:
        """Release the directory's lock (and any local spill directory of this sink)."""
        self.store.unlock()
        if self._reader_spill is not None:
            shutil.rmtree(self._reader_spill, ignore_errors=True)
            self._reader_spill = None

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers --

    def _check_writable(self) -> None:
        if self.read_only:
            raise DestinationError(f"{self.description} was opened read-only")

    def _connect(self) -> duckdb.DuckDBPyConnection:
        """A private in-memory DuckDB spilling to `_state/spill` (a local temp dir for fsspec); insertion order
        is kept, for files.

        A read-only open spills into a temporary directory of its own and never creates `_state/spill`: it holds
        no lock, so that directory belongs to whichever run writes meanwhile, which clears it when it opens."""
        if self.read_only:
            if self._reader_spill is None:
                self._reader_spill = tempfile.mkdtemp(prefix="amplitude-export-spill-")
            spill = self._reader_spill
        else:
            spill = self.store.spill_dir()
        return stage_connection(self.memory_limit, self.threads, spill)

    def _copy(
        self,
        con: duckdb.DuckDBPyConnection,
        source: str,
        part: Window,
        project: str,
        new_files: dict[str, DataFile],
        written: list[str],
    ) -> None:
        """Write `source`'s rows for `part` (one date) to a temp file, fsync it, rename it to its final name.

        Written by pyarrow rather than DuckDB's COPY so every file has exactly ARROW_SCHEMA (COPY marks
        columns without nulls as required, so files of one dataset would disagree).
        """
        partition = f"upload_date={part.start:%Y-%m-%d}"
        reader = con.sql(source).to_arrow_reader(self.row_group_size)
        rows = 0
        writer: pq.ParquetWriter | None = None
        temp = f"{partition}/{TEMP_PREFIX}{uuid_module.uuid4().hex}"
        with ExitStack() as stack:
            for batch in reader:
                if batch.num_rows == 0:
                    continue
                if writer is None:
                    self.store.makedirs(partition)
                    written.append(temp)
                    handle = stack.enter_context(self.store.open_write(temp))
                    writer = stack.enter_context(pq.ParquetWriter(handle, ARROW_SCHEMA, compression="zstd"))
                writer.write_batch(batch.cast(ARROW_SCHEMA))
                rows += batch.num_rows
        if not rows:
            return
        final = self._free_name(partition, part, project)
        written.append(final)  # before the move: an object store's mv can fail after the copy
        self.store.rename(temp, final)
        new_files[final] = DataFile(final, part.start, part.end, rows, project)

    def _free_name(self, partition: str, part: Window, project: str) -> str:
        """`<hours>-<project tag>.parquet`, or `....N.parquet` while a live file has that name (being replaced).

        The tag is a hash of the project name, so names stay short and never show an API key."""
        stem = f"{partition}/{part.name}-{project_tag(project)}"
        name, n = f"{stem}.parquet", 0
        while name in self.files or self.store.exists(name):
            n += 1
            name = f"{stem}.{n}.parquet"
        return name


def _between(part: Window) -> str:
    return f"_upload_hour BETWEEN {_ts(part.start)} AND {_ts(part.end)}"


def _ts(moment: datetime) -> str:
    """A TIMESTAMPTZ literal; COPY cannot take prepared parameters."""
    return f"TIMESTAMPTZ '{moment.astimezone(UTC).isoformat()}'"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"

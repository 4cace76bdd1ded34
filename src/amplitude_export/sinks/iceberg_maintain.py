"""Housekeeping of an Iceberg destination (`amplitude-export maintain`): compaction, snapshot expiry, and deleting
the files no snapshot references any more.

Hourly incremental runs leave one small file per hour and project; each reload leaves the replaced files behind,
still referenced by older snapshots (time travel); a killed run leaves files no snapshot ever referenced.

1. **Compaction**: the small live files of each upload day, when there are at least `min_files` of them, are
   read (with any delete files other engines attached) and written again as few files as the target file size
   allows, in one commit that removes the old files and adds the new ones. The rows and the ledger do not change.
   pyiceberg has no `replace` operation, so the snapshot is an `overwrite`: a reader that follows the table's
   changes (a streaming read) sees the rows removed and added again.
2. **Expiry**: pyiceberg's `expire_snapshots` removes snapshots older than `older_than` from the metadata (never
   the current one, nor a branch's or tag's head). It deletes no file.
3. **Unreferenced files**: every file under the table's `data/` and `metadata/` that the remaining metadata does
   not reach (metadata files in its log, manifest lists, manifests, live data and delete files, statistics files)
   and that is older than `older_than` is deleted. The age keeps the files of a run writing meanwhile, which the
   catalog does not know of yet.

The tables of the other streams (`iceberg_tables`) get 2. and 3., not compaction: they are small, and rewritten
whole or by cohort on every run anyway.

Every commit here is computed against the latest snapshot and asserts it, like a window's, so a run writing at
the same time makes it start again rather than lose a window.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ..ledger import HourRecord
from .maintenance import Maintenance

if TYPE_CHECKING:
    from pyiceberg.table import FileScanTask, Table, Transaction

    from .iceberg import IcebergSink

DEFAULT_AGE = timedelta(days=7)
MIN_FILES = 4


def maintain(sink: IcebergSink, *, compact: bool = True, min_files: int = MIN_FILES,
             older_than: timedelta | None = None, now: datetime | None = None) -> Maintenance:
    """Compact (unless not `compact`), expire snapshots older than `older_than` (None: `DEFAULT_AGE`), delete
    unreferenced files as old."""
    done = Maintenance(sink.description, snapshots_expired=0, bytes_deleted=0)
    now = now or datetime.now(UTC)
    older_than = DEFAULT_AGE if older_than is None else older_than
    if compact:
        sink._commit(lambda table, written: _compact(sink, table, min_files, written, done))  # noqa: SLF001
    sink._commit(lambda table, written: _expire(sink, table, now - older_than, done))  # noqa: SLF001
    _delete_unreferenced(sink.table, now - older_than, done)
    for name in sink.tables.names():  # the streams' tables: small, so expiry and unreferenced files only
        expired = sink.tables.retry(name, lambda table: _expire_table(table, now - older_than))
        done.snapshots_expired = (done.snapshots_expired or 0) + expired
        table = sink.tables.open(name)
        if table is not None:
            _delete_unreferenced(table, now - older_than, done)
    return done


def _compact(sink: IcebergSink, table: Table, min_files: int, written: list[str], done: Maintenance) -> list[
        HourRecord]:
    from pyiceberg.expressions import AlwaysTrue

    from .iceberg_catalog import without_retries
    from .iceberg_files import TARGET_BYTES, file_batches, write_data_files

    groups: dict[Any, list[FileScanTask]] = {}
    for task in table.scan().plan_files() if table.current_snapshot() is not None else []:
        if task.file.file_size_in_bytes < TARGET_BYTES // 20:  # small: well under what a full file takes on disk
            groups.setdefault(task.file.partition[0], []).append(task)
    done.files_compacted = done.files_written = 0
    tx = without_retries(table).transaction()
    with tx.update_snapshot(snapshot_properties={"amplitude-export.maintain": "compact"}).overwrite() as rewrite:
        for day, tasks in sorted(groups.items(), key=lambda item: (item[0] is None, item[0] or 0)):
            if len(tasks) < min_files:
                continue
            rows = (batch for task in tasks for batch in file_batches(table, task, AlwaysTrue()))
            new = write_data_files(table, day, rows, written)
            for task in tasks:
                rewrite.delete_data_file(task.file)
            for data_file in new:
                rewrite.append_data_file(data_file)
            done.files_compacted += len(tasks)
            done.files_written += len(new)
    if done.files_compacted:
        sink.send(tx)
    return []


def _expire(sink: IcebergSink, table: Table, before: datetime, done: Maintenance) -> list[HourRecord]:
    tx, done.snapshots_expired = _expiry(table, before)
    if tx is not None:
        sink.send(tx)
    return []


def _expire_table(table: Table, before: datetime) -> int:
    """Expire the snapshots of a stream's table older than `before` (never its current one); how many."""
    tx, expired = _expiry(table, before)
    if tx is not None:
        tx.commit_transaction()
    return expired


def _expiry(table: Table, before: datetime) -> tuple[Transaction | None, int]:
    """A transaction expiring the snapshots older than `before` but the current one (None if there are none), and
    how many it expires."""
    from pyiceberg.table.update.snapshot import ExpireSnapshots

    from .iceberg_catalog import without_retries

    current = table.current_snapshot()
    old = [s.snapshot_id for s in table.snapshots()
           if s.timestamp_ms < before.timestamp() * 1000 and (current is None or s.snapshot_id != current.snapshot_id)]
    if not old:
        return None, 0
    tx = without_retries(table).transaction()
    ExpireSnapshots(tx).by_ids(old).commit()
    return tx, len(old)


def _reachable(table: Table) -> set[str]:
    """Every file the table's metadata reaches."""
    metadata = table.metadata
    paths = {table.metadata_location, *(entry.metadata_file for entry in metadata.metadata_log)}
    paths |= {s.statistics_path for s in metadata.statistics}
    paths |= {s.statistics_path for s in getattr(metadata, "partition_statistics", [])}
    for snapshot in metadata.snapshots:
        paths.add(snapshot.manifest_list)
        for manifest in snapshot.manifests(table.io):
            paths.add(manifest.manifest_path)
            paths |= {entry.data_file.file_path for entry in manifest.fetch_manifest_entry(table.io)}
    return paths


def _delete_unreferenced(table: Table, before: datetime, done: Maintenance) -> None:
    from pyarrow.fs import FileSelector, FileType
    from pyiceberg.io.pyarrow import PyArrowFileIO

    if not isinstance(table.io, PyArrowFileIO):
        done.note = f"unreferenced files not looked for: {type(table.io).__name__} cannot list files"
        return
    reachable = {_path_of(path) for path in _reachable(table.refresh())}
    scheme, netloc, root = PyArrowFileIO.parse_location(table.metadata.location)
    fs = table.io.fs_by_scheme(scheme, netloc)
    for part in ("data", "metadata"):
        try:
            infos = fs.get_file_info(FileSelector(f"{root.rstrip('/')}/{part}", recursive=True, allow_not_found=True))
        except FileNotFoundError:
            continue
        for info in infos:
            if info.type != FileType.File or info.path in reachable:
                continue
            if info.mtime is not None and info.mtime.astimezone(UTC) >= before:
                continue
            fs.delete_file(info.path)
            done.files_deleted += 1
            done.bytes_deleted = (done.bytes_deleted or 0) + (info.size or 0)


def _path_of(location: str) -> str:
    """A location as the filesystem lists it (no scheme; for S3 `bucket/key`)."""
    from pyiceberg.io.pyarrow import PyArrowFileIO

    scheme, netloc, path = PyArrowFileIO.parse_location(location)
    return path

"""A Parquet dataset's stream tables: `DIR/<table>/<project tag>-<id>.parquet`, one file per project and table,
named with the table's state by `_state/tables.json` (`table_ledger.py`), which a write rewrites last."""

from __future__ import annotations

import dataclasses
import json
import re
import uuid as uuid_module
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import clock
from ..errors import DestinationError
from ..table_ledger import PROJECT_COLUMN, TableState, TableWrite, with_project_column
from .parquet_store import PARTITION, STATE_DIR, TEMP_PREFIX, FsspecDirectory, LocalDirectory, project_tag
from .staging import first_line

TABLES_FILE = "_state/tables.json"
TABLES_FORMAT = 1
MEMBERS = "cohort_members"  # the stream table deletions also apply to
_TABLE_FILE = re.compile(r"^(\.tmp-[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{8}\.parquet)$")


class ParquetTables:
    """The stream tables of the dataset in `store` (whose lock the caller holds for writes)."""

    def __init__(self, store: LocalDirectory | FsspecDirectory, root: object, row_group_size: int) -> None:
        self.store = store
        self.root = root
        self.row_group_size = row_group_size

    def write(self, project: str, write: TableWrite) -> TableState:
        """Write the project's new file of a stream's table (its rows out of scope kept), then commit the state
        file naming it with the table's state, then delete the old file."""
        self.store.refresh_lock()
        tables = self._tables()
        entry = tables.get(project, {}).get(write.table, {})
        old: str | None = entry.get("file")
        new, rows = old, int(entry.get("state", {}).get("rows", 0))
        written: list[str] = []
        committing = False
        try:
            if write.batches is not None:
                new, rows = self._write_table_file(project, write, old, written)
            state = dataclasses.replace(write.state, rows=rows, loaded_at=clock.now())
            tables[project] = {**tables.get(project, {}), write.table: {"file": new, "state": state.to_dict()}}
            self.store.refresh_lock()
            committing = True
            self.store.write_text_atomic(
                TABLES_FILE, json.dumps({"format": TABLES_FORMAT, "projects": tables}, indent=1, sort_keys=True)
            )
        except BaseException as exc:
            if not committing:
                for rel in written:
                    self.store.delete(rel)
            if isinstance(exc, OSError | pa.ArrowException):
                raise DestinationError(f"cannot write {write.table} to {self.root}: {first_line(exc)}") from exc
            raise
        if old is not None and old != new:
            self.store.delete(old)
        return state

    def projects(self) -> set[str]:
        """The projects that have a stream table's state."""
        return {project for project, tables in self._tables().items() if tables}

    def states(self, project: str) -> dict[str, TableState]:
        """The state of each stream table of `project`, by table name."""
        tables = self._tables().get(project, {})
        return {name: TableState.from_dict(entry["state"]) for name, entry in sorted(tables.items())}

    def read(self, name: str, schema: pa.Schema, project: str | None = None) -> pa.Table:
        """A stream table's rows (of one project, or all) as `schema` with `_project` first."""
        stored = with_project_column(schema)
        parts = [stored.empty_table()]
        for owner, tables in sorted(self._tables().items()):
            rel = tables.get(name, {}).get("file")
            if rel and (project is None or owner == project):
                with self.store.open_read(rel) as handle:
                    parts.append(pq.read_table(handle).select(stored.names).cast(stored))
        return pa.concat_tables(parts)

    def delete_members(self, project: str, amplitude_ids: list[int]) -> int:
        """Rewrite the project's `cohort_members` file without the rows of `amplitude_ids`; how many went."""
        entry = self._tables().get(project, {}).get(MEMBERS, {})
        if not entry.get("file") or not amplitude_ids:
            return 0
        with self.store.open_read(entry["file"]) as handle:
            schema = pq.ParquetFile(handle).schema_arrow
        schema = schema.remove(schema.get_field_index(PROJECT_COLUMN))
        before = TableState.from_dict(entry["state"])
        after = self.write(
            project,
            TableWrite(MEMBERS, schema, [], before, scope_column="amplitude_id", scope_values=list(amplitude_ids)),
        )
        return before.rows - after.rows

    def _tables(self) -> dict[str, dict[str, dict[str, Any]]]:
        """project -> table -> {"file": its live file or None, "state": TableState.to_dict()}."""
        text = self.store.read_text(TABLES_FILE)
        if text is None:
            return {}
        try:
            return dict(json.loads(text)["projects"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DestinationError(f"cannot read {self.root}/{TABLES_FILE}: {exc}") from None

    def _write_table_file(
        self, project: str, write: TableWrite, old: str | None, written: list[str]
    ) -> tuple[str | None, int]:
        stored = with_project_column(write.schema)
        temp = f"{write.table}/{TEMP_PREFIX}{uuid_module.uuid4().hex}"
        self.store.makedirs(write.table)
        written.append(temp)
        rows = 0
        with self.store.open_write(temp) as handle, pq.ParquetWriter(handle, stored, compression="zstd") as writer:
            if old is not None and write.scope_column is not None:
                with self.store.open_read(old) as source:
                    for batch in pq.ParquetFile(source).iter_batches(self.row_group_size):
                        column = batch.column(write.scope_column)
                        dropped = pc.is_in(column, value_set=pa.array(write.scope_values, column.type))
                        kept = batch.filter(pc.invert(pc.fill_null(dropped, False)))
                        writer.write_batch(pa.RecordBatch.from_arrays(kept.select(stored.names).columns, schema=stored))
                        rows += kept.num_rows
            for batch in write.batches or ():
                tag = pa.repeat(pa.scalar(project, pa.string()), batch.num_rows)
                columns = [tag, *batch.select(write.schema.names).cast(write.schema).columns]
                writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=stored))
                rows += batch.num_rows
        if not rows:
            self.store.delete(temp)
            return None, 0
        final = f"{write.table}/{project_tag(project)}-{uuid_module.uuid4().hex[:8]}.parquet"
        written.append(final)
        self.store.rename(temp, final)
        return final, rows

    def remove_orphans(self) -> None:
        """Delete the table files a crashed write left: temp files and files of ours the state does not name."""
        named = {entry["file"] for tables in self._tables().values() for entry in tables.values() if entry["file"]}
        if isinstance(self.store, LocalDirectory):
            found = [f"{d.name}/{f.name}" for d in self.store.root.iterdir() if d.is_dir() for f in d.iterdir()]
        else:
            prefix = self.store.root + "/"
            found = [p.removeprefix(prefix) for p in self.store.fs.find(self.store.root, maxdepth=2)]
        for rel in found:
            folder, _, name = rel.partition("/")
            if PARTITION.match(folder) or folder == STATE_DIR or "/" in name or rel in named:
                continue
            if _TABLE_FILE.match(name):
                self.store.delete(rel)

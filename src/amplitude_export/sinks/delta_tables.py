"""The tables of `run --streams` in a Delta destination (`cohorts`, `cohort_members`, `annotations`, ...): one Delta
table each, under the events table's directory, `_amplitude_tables/<name>/` (engines reading the events table and
Delta's vacuum of it leave `_` directories alone).

A Delta commit changes one table, so a table's state (`table_ledger.TableState`) rides in the commit info of the
commit that writes its rows (key `amplitude_export`: `{"format": 1, "states": {project: state}, "deleted":
{project: {job day: cohort rows deleted}}}`). Each commit carries every project's state forward, so the newest
commit that has the key says everything, however old the others are (Delta deletes old commit files).
A write is made on the snapshot its states were read from, with no automatic retry: a commit that lost a race
raises CommitFailedError and is computed again on the new snapshot.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from .. import clock
from ..errors import CommitConflictError
from ..stream_tables import TABLES
from ..table_ledger import TableState, TableWrite, project_rows, with_project_column

TABLES_DIR = "_amplitude_tables"
META = "amplitude_export"  # the commit info key holding a commit's ledger rows (and a stream table's state)
FORMAT = 1
COMMIT_ATTEMPTS = 8  # a commit re-checked and tried again this many times before the run gives up (exit 5)
HISTORY = 20  # commits looked at for the newest payload before the whole history is read
MEMBERS = "cohort_members"


def sql_literal(value: Any) -> str:
    """A value in a delta-rs (DataFusion) predicate."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, datetime):
        return f"'{value.astimezone(UTC):%Y-%m-%dT%H:%M:%S.%fZ}'"
    if isinstance(value, date):
        return f"'{value.isoformat()}'"
    return "'" + str(value).replace("'", "''") + "'"


class DeltaTables:
    """The stream tables of the Delta destination at `root` (the events table's URI)."""

    def __init__(self, root: str, options: dict[str, str]) -> None:
        self.root = root.rstrip("/")
        self.options = options

    def uri(self, name: str) -> str:
        return f"{self.root}/{TABLES_DIR}/{name}"

    def open(self, name: str) -> DeltaTable | None:
        """The table `name`, or None where no run wrote it."""
        try:
            return DeltaTable(self.uri(name), storage_options=self.options)
        except TableNotFoundError:
            return None

    def existing(self) -> list[str]:
        """The URIs of the tables that exist."""
        return [self.uri(name) for name in TABLES if self.open(name) is not None]

    def _create(self, name: str) -> DeltaTable:
        uri = self.uri(name)
        if "://" not in uri:
            Path(uri).mkdir(parents=True, exist_ok=True)
        return DeltaTable.create(uri, with_project_column(TABLES[name].schema), mode="ignore", name=name,
                                 storage_options=self.options)

    @staticmethod
    def payload(table: DeltaTable) -> dict[str, Any]:
        """The newest commit info's `amplitude_export` (empty before any)."""
        for limit in (HISTORY, None):
            for info in table.history(limit):
                if isinstance(info.get(META), dict):
                    return dict(info[META])
        return {}

    def projects(self) -> set[str]:
        """The projects that have a table's state."""
        found: set[str] = set()
        for name in TABLES:
            table = self.open(name)
            if table is not None:
                found |= set(self.payload(table).get("states", {}))
        return found

    def states(self, project: str) -> dict[str, TableState]:
        """The state of each table of `project`, by table name."""
        found = {}
        for name in TABLES:
            table = self.open(name)
            state = self.payload(table).get("states", {}).get(project) if table is not None else None
            if state is not None:
                found[name] = TableState.from_dict(state)
        return found

    def read(self, name: str, project: str | None = None) -> pa.Table:
        """The table's rows (of one project, or all), `_project` first; empty where no run wrote it."""
        schema = with_project_column(TABLES[name].schema)
        table = self.open(name)
        if table is None:
            return schema.empty_table()
        where = pads.field("_project") == project if project is not None else None
        rows = table.to_pyarrow_dataset().to_table(columns=schema.names, filter=where)
        return rows.cast(schema)

    def write(self, project: str, write: TableWrite) -> TableState:
        """Replace the project's rows in scope with `write.batches` and store the state, in one commit."""
        schema = with_project_column(write.schema)
        rows = None
        if write.batches is not None:
            rows = pa.Table.from_batches([project_rows(b, project, schema) for b in write.batches], schema)
        where = f"_project = {sql_literal(project)}"
        if write.scope_column is not None:
            if write.scope_values:
                values = ", ".join(sql_literal(v) for v in write.scope_values)
                where += f" AND {write.scope_column} IN ({values})"
            else:
                where = "false"
        for _ in range(COMMIT_ATTEMPTS):
            try:
                # a first run creating the table at the same moment as another can lose that commit too
                table = self.open(write.table) or self._create(write.table)
                payload = self.payload(table)
                if rows is not None and where != "false":
                    kept = _count(table, project) - _count(table, project, where)
                    state = dataclasses.replace(write.state, rows=kept + rows.num_rows, loaded_at=clock.now())
                    write_deltalake(table, rows, mode="overwrite", predicate=where,
                                    commit_properties=_properties(payload, project, state))
                else:
                    rows_now = _count(table, project) + (rows.num_rows if rows is not None else 0)
                    state = dataclasses.replace(write.state, rows=rows_now, loaded_at=clock.now())
                    write_deltalake(table, rows if rows is not None else schema.empty_table(), mode="append",
                                    commit_properties=_properties(payload, project, state))
                return state
            except CommitFailedError:
                continue
        raise CommitConflictError(f"{self.uri(write.table)}: other writers committed before each of "
                                   f"{COMMIT_ATTEMPTS} attempts; run again")

    def delete_members(self, project: str, amplitude_ids: list[int], day: date) -> int:
        """Delete the users' rows of `project` from `cohort_members` (where it exists), lowering its state's row
        count and raising the job's count kept in the same commit; the job's count after it (0 without the table)."""
        for _ in range(COMMIT_ATTEMPTS):
            table = self.open(MEMBERS)
            if table is None:
                return 0
            payload = self.payload(table)
            done = payload.get("deleted", {}).get(project, {})
            where = f"_project = {sql_literal(project)} AND amplitude_id IN ({', '.join(map(str, amplitude_ids))})"
            gone = _count(table, project, where) if amplitude_ids else 0
            total = int(done.get(day.isoformat(), 0)) + gone
            if not gone:
                return total
            old = payload.get("states", {}).get(project)
            state = TableState.from_dict(old) if old else None
            if state is not None:
                state = dataclasses.replace(state, rows=max(0, state.rows - gone))
            deleted = {**payload.get("deleted", {}), project: {**done, day.isoformat(): total}}
            try:
                table.delete(where, commit_properties=_properties({**payload, "deleted": deleted}, project, state))
                return total
            except CommitFailedError:
                continue
        raise CommitConflictError(f"{self.uri(MEMBERS)}: other writers committed before each of "
                                   f"{COMMIT_ATTEMPTS} attempts; run again")


def carried(table: DeltaTable) -> CommitProperties:
    """Commit properties that carry the table's newest `amplitude_export` forward (for commits of `maintain`), so
    the newest commit still says everything once Delta deletes older commit files; no automatic retry, since a
    commit landing meanwhile would make the carried value stale."""
    payload = DeltaTables.payload(table)
    return CommitProperties(custom_metadata={META: payload} if payload else None, max_commit_retries=0)


def _count(table: DeltaTable, project: str, where: str | None = None) -> int:
    """The project's rows (matching `where`, the SQL predicate the writes use), counted by delta-rs's own engine:
    a file its deletes rewrote holds string_view columns, on which a filter that DuckDB pushes into the pyarrow
    dataset fails."""
    from deltalake import QueryBuilder

    condition = where or f"_project = {sql_literal(project)}"
    result = QueryBuilder().register("t", table).execute(f"SELECT count(*) FROM t WHERE {condition}").read_all()
    return int(result.column(0)[0].as_py())


def _properties(payload: dict[str, Any], project: str, state: TableState | None) -> CommitProperties:
    states = dict(payload.get("states", {}))
    if state is not None:
        states[project] = state.to_dict()
    body = {"format": FORMAT, "states": states, "deleted": payload.get("deleted", {})}
    return CommitProperties(custom_metadata={META: body}, max_commit_retries=0)


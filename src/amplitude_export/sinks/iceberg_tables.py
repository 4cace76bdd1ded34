"""The tables of `run --streams` in an Iceberg destination (`cohorts`, `cohort_members`, `annotations`, ...): one
Iceberg table each, in the events table's namespace, unpartitioned.

An Iceberg commit changes one table, so a table's state (`table_ledger.TableState`) lives in that table's own
properties, one per project (`amplitude-export.state.<project tag>`: `{"project": name, "state": {...}}`), set by
the same catalog commit that replaces its rows (a delete and an append in one transaction). `cohort_members`
also keeps, per project, the rows each deletion job removed (`amplitude-export.deleted.<project tag>`), so the
job's `_amplitude_deletions` row can count them though it commits with `events`. Commits assert the snapshot they
were computed on (pyiceberg's retries off); one refused is computed again on the new snapshot.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import date
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from .. import clock
from ..errors import CommitConflictError
from ..stream_tables import TABLES
from ..table_ledger import TableState, TableWrite, project_rows, with_project_column
from . import iceberg_catalog as catalogs
from .iceberg_files import predicate
from .iceberg_ledger import project_tag

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.expressions import BooleanExpression
    from pyiceberg.table import Table

STATE = "amplitude-export.state."
DELETED = "amplitude-export.deleted."
MEMBERS = "cohort_members"
COMMIT_ATTEMPTS = 8


class IcebergTables:
    """The stream tables beside the events table `events` names, in its catalog and namespace."""

    def __init__(self, catalog: Catalog, namespace: str) -> None:
        self.catalog, self.namespace = catalog, namespace

    def open(self, name: str) -> Table | None:
        """The table `name`, or None where no run wrote it."""
        from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

        try:
            return self.catalog.load_table((self.namespace, name))
        except (NoSuchTableError, NoSuchNamespaceError):
            return None

    def names(self) -> list[str]:
        """The stream tables that exist."""
        return [name for name in TABLES if self.open(name) is not None]

    def _create(self, name: str) -> Table:
        self.catalog.create_namespace_if_not_exists(self.namespace)
        return self.catalog.create_table_if_not_exists((self.namespace, name),
                                                       schema=with_project_column(TABLES[name].schema))

    def projects(self) -> set[str]:
        """The projects that have a table's state."""
        found: set[str] = set()
        for name in TABLES:
            table = self.open(name)
            properties = table.properties if table is not None else {}
            found |= {json.loads(text)["project"] for key, text in properties.items() if key.startswith(STATE)}
        return found

    def states(self, project: str) -> dict[str, TableState]:
        """The state of each table of `project`, by table name."""
        found = {}
        for name in TABLES:
            table = self.open(name)
            text = table.properties.get(STATE + project_tag(project)) if table is not None else None
            if text:
                found[name] = TableState.from_dict(json.loads(text)["state"])
        return found

    def read(self, name: str, project: str | None = None) -> pa.Table:
        """The table's rows (of one project, or all), `_project` first; empty where no run wrote it."""
        schema = with_project_column(TABLES[name].schema)
        table = self.open(name)
        if table is None or table.current_snapshot() is None:
            return schema.empty_table()
        scan = table.scan(row_filter=_of(project)) if project is not None else table.scan()
        return scan.to_arrow().select(schema.names).cast(schema)

    def write(self, project: str, write: TableWrite) -> TableState:
        """Replace the project's rows in scope with `write.batches` and store the state, in one catalog commit."""
        from pyiceberg.expressions import AlwaysFalse, And

        schema = with_project_column(write.schema)
        rows = None
        if write.batches is not None:
            rows = pa.Table.from_batches([project_rows(b, project, schema) for b in write.batches], schema)
        scope: BooleanExpression = _of(project)
        if write.scope_column is not None:
            values = {v.isoformat() if isinstance(v, date) else v for v in write.scope_values}
            scope = And(scope, predicate("In", write.scope_column, values)) if values else AlwaysFalse()

        def attempt(table: Table) -> TableState:
            replaced = _count(table, scope) if rows is not None else 0
            state = dataclasses.replace(write.state, loaded_at=clock.now(),
                                        rows=_count(table, _of(project)) - replaced + (rows.num_rows if rows else 0))
            tx = catalogs.without_retries(table).transaction()
            if rows is not None:
                if replaced:
                    tx.delete(scope)
                if rows.num_rows:
                    tx.append(rows)
            tx.set_properties({STATE + project_tag(project): _state_text(project, state)})
            tx.commit_transaction()
            return state

        return self.retry(write.table, attempt, create=True)

    def delete_members(self, project: str, amplitude_ids: list[int], day: date) -> int:
        """Delete the users' rows of `project` from `cohort_members` (where it exists), lowering its state's row
        count and raising the job's count kept in the same commit; the job's count after it (0 without the table)."""
        from pyiceberg.expressions import And

        def attempt(table: Table) -> int:
            key = DELETED + project_tag(project)
            done = json.loads(table.properties.get(key) or "{}")
            doomed = And(_of(project), predicate("In", "amplitude_id", set(amplitude_ids)))
            gone = _count(table, doomed) if amplitude_ids else 0
            total = int(done.get(day.isoformat(), 0)) + gone
            if not gone:
                return total
            properties = {key: json.dumps({**done, day.isoformat(): total}, sort_keys=True)}
            old = table.properties.get(STATE + project_tag(project))
            if old:
                state = TableState.from_dict(json.loads(old)["state"])
                properties[STATE + project_tag(project)] = _state_text(
                    project, dataclasses.replace(state, rows=max(0, state.rows - gone)))
            tx = catalogs.without_retries(table).transaction()
            tx.delete(doomed)
            tx.set_properties(properties)
            tx.commit_transaction()
            return total

        if self.open(MEMBERS) is None:
            return 0
        result: int = self.retry(MEMBERS, attempt, create=False)
        return result

    def retry(self, name: str, attempt: Any, *, create: bool = False) -> Any:
        """`attempt(table)` (which commits) on the table's latest snapshot until the catalog takes its commit
        (created first when `create`; 0 without the table otherwise)."""
        from pyiceberg.exceptions import CommitFailedException

        for _ in range(COMMIT_ATTEMPTS):
            table = self.open(name) or (self._create(name) if create else None)
            if table is None:
                return 0
            try:
                return attempt(table)
            except CommitFailedException:
                continue
        raise CommitConflictError(f"{self.namespace}.{name}: other writers committed before each of "
                                   f"{COMMIT_ATTEMPTS} attempts; run again")


def _of(project: str | None) -> BooleanExpression:
    return predicate("EqualTo", "_project", project)


def _count(table: Table, where: BooleanExpression) -> int:
    if table.current_snapshot() is None:
        return 0
    return int(table.scan(row_filter=where, selected_fields=("_project",)).to_arrow().num_rows)


def _state_text(project: str, state: TableState) -> str:
    return json.dumps({"project": project, "state": state.to_dict()}, sort_keys=True)


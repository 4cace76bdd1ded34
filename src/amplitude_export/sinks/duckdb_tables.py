"""A DuckDB destination's stream tables (`run --streams`): each table's rows per project and its state row
(`table_ledger.py`), committed together."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import duckdb
import pyarrow as pa

from .. import clock
from ..errors import DestinationError
from ..schema import quote
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
from .duckdb_stage import rollback
from .staging import first_line


def write_table(con: duckdb.DuckDBPyConnection, project: str, write: TableWrite, label: str) -> TableState:
    """Replace the project's rows of a stream's table in scope and store its state, in one transaction."""
    table = quote(write.table)
    now = clock.now()
    con.begin()
    try:
        con.execute(
            f"CREATE TABLE IF NOT EXISTS {STATE_TABLE} ("
            + ", ".join(f"{name} {kinds[0]}" for name, kinds in STATE_COLUMNS.items())
            + ", PRIMARY KEY (project, table_name))"
        )
        if write.batches is not None:
            stored = with_project_column(write.schema)
            con.execute(
                f"CREATE TABLE IF NOT EXISTS {table} ("
                + ", ".join(f"{quote(c.name)} {sql_type(c, 0)}" for c in stored)
                + ")"
            )
            if write.scope_column is None:
                con.execute(f"DELETE FROM {table} WHERE _project = ?", [project])
            else:
                con.register("_amplitude_scope", pa.table({"v": write.scope_values}))
                con.execute(
                    f"DELETE FROM {table} WHERE _project = ? AND {quote(write.scope_column)} IN "
                    "(SELECT v FROM _amplitude_scope)",
                    [project],
                )
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
                con.execute(f"INSERT INTO {table} BY NAME SELECT ? AS _project, * FROM _amplitude_rows", [project])
            except duckdb.Error:
                if failed:
                    raise failed[0] from None
                raise
            con.unregister("_amplitude_rows")
        count = (
            con.execute(f"SELECT count(*) FROM {table} WHERE _project = ?", [project]).fetchall()[0][0]
            if has_table(con, write.table)
            else 0
        )
        state = dataclasses.replace(write.state, rows=count, loaded_at=now)
        con.execute(
            f"INSERT OR REPLACE INTO {STATE_TABLE} ({', '.join(STATE_COLUMNS)}) VALUES "
            f"({', '.join('?' * len(STATE_COLUMNS))})",
            state_values(project, state),
        )
        con.commit()
    except BaseException as exc:
        rollback(con)
        if isinstance(exc, duckdb.Error):
            raise DestinationError(f"cannot write {write.table} to {label}: {first_line(exc)}") from exc
        raise
    return state


def state_projects(con: duckdb.DuckDBPyConnection) -> set[str]:
    """The projects that have a stream table's state."""
    if not has_table(con, STATE_TABLE):
        return set()
    return {row[0] for row in con.execute(f"SELECT DISTINCT project FROM {STATE_TABLE}").fetchall()}


def table_states(con: duckdb.DuckDBPyConnection, project: str) -> dict[str, TableState]:
    """The state of each stream table of `project`, by table name."""
    if not has_table(con, STATE_TABLE):
        return {}
    table = con.sql(
        f"SELECT * FROM {STATE_TABLE} WHERE project = ? ORDER BY table_name", params=[project]
    ).to_arrow_table()
    states = [state_from_row(row) for row in table.to_pylist()]
    return {state.table: state for state in states}


def read_table(con: duckdb.DuckDBPyConnection, name: str, schema: pa.Schema, project: str | None = None) -> pa.Table:
    """A stream table's rows (of one project, or all) as `schema` with `_project` first."""
    where, params = (" WHERE _project = ?", [project]) if project is not None else ("", [])
    stored = with_project_column(schema)
    if not has_table(con, name):
        return stored.empty_table()
    table = con.sql(
        f"SELECT {', '.join(quote(c.name) for c in stored)} FROM {quote(name)}{where}", params=params
    ).to_arrow_table()
    return table.cast(stored)


def has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    """Whether the default schema has table `name`."""
    # asked, not caught: for a missing table DuckDB looks for a Python variable of that name in the caller
    return bool(
        con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
            "AND schema_name = current_schema() AND table_name = ?",
            [name],
        ).fetchall()[0][0]
    )

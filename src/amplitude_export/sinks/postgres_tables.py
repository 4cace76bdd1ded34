"""A PostgreSQL destination's stream tables (`run --streams`): each table's rows per project and its state row
(`table_ledger.py`), committed together."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime
from typing import Any

import psycopg
import pyarrow as pa
from psycopg import sql
from psycopg.rows import dict_row

from ..schema import quote
from ..table_ledger import (
    STATE_COLUMNS,
    STATE_TABLE,
    TableState,
    TableWrite,
    is_json,
    sql_type,
    state_from_row,
    state_values,
    with_project_column,
)


def relation_exists(conn: psycopg.Connection[Any], schema: str, name: str) -> bool:
    """Whether `schema`.`name` is a table (or view) of the database."""
    found = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [f"{quote(schema)}.{quote(name)}"]).fetchone()
    return bool(found and found[0])


def write_table(
    conn: psycopg.Connection[Any], schema: str, project: str, write: TableWrite, now: datetime
) -> TableState:
    """Replace the project's rows of a stream's table in scope and store its state, inside the caller's
    transaction."""
    table = sql.Identifier(schema, write.table)
    states = sql.Identifier(schema, STATE_TABLE)
    stored = with_project_column(write.schema)
    conn.execute(
        sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY (project, table_name))").format(
            states,
            sql.SQL(", ").join(
                sql.SQL(f"{{}} {kinds[1]}").format(sql.Identifier(name)) for name, kinds in STATE_COLUMNS.items()
            ),
        )
    )
    if write.batches is not None:
        conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
                table,
                sql.SQL(", ").join(sql.SQL(f"{{}} {sql_type(c, 1)}").format(sql.Identifier(c.name)) for c in stored),
            )
        )
        if write.scope_column is None:
            conn.execute(sql.SQL("DELETE FROM {} WHERE _project = %s").format(table), [project])
        else:
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE _project = %s AND {}::text = ANY(%s)").format(
                    table, sql.Identifier(write.scope_column)
                ),
                [project, [str(value) for value in write.scope_values]],
            )
        names = sql.SQL(", ").join(sql.Identifier(c.name) for c in stored)
        with conn.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN").format(table, names)) as copy:
            for batch in write.batches:
                for row in batch.to_pylist():
                    copy.write_row([project, *(row[c.name] for c in write.schema)])
    rows = 0
    if relation_exists(conn, schema, write.table):
        counted = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE _project = %s").format(table), [project])
        rows = int(counted.fetchall()[0][0])
    state = replace(write.state, rows=rows, loaded_at=now)
    conn.execute(
        sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (project, table_name) DO UPDATE SET {}").format(
            states,
            sql.SQL(", ").join(map(sql.Identifier, STATE_COLUMNS)),
            sql.SQL(", ").join(sql.Placeholder() * len(STATE_COLUMNS)),
            sql.SQL(", ").join(
                sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(name)) for name in list(STATE_COLUMNS)[2:]
            ),
        ),
        state_values(project, state),
    )
    return state


def state_projects(conn: psycopg.Connection[Any], schema: str) -> set[str]:
    """The projects that have a stream table's state."""
    if not relation_exists(conn, schema, STATE_TABLE):
        return set()
    query = sql.SQL("SELECT DISTINCT project FROM {}").format(sql.Identifier(schema, STATE_TABLE))
    return {row[0] for row in conn.execute(query).fetchall()}


def table_states(conn: psycopg.Connection[Any], schema: str, project: str) -> dict[str, TableState]:
    """The state of each stream table of `project`, by table name."""
    states = sql.Identifier(schema, STATE_TABLE)
    if not relation_exists(conn, schema, STATE_TABLE):
        return {}
    with conn.cursor(row_factory=dict_row) as cursor:
        rows = cursor.execute(
            sql.SQL("SELECT * FROM {} WHERE project = %s ORDER BY table_name").format(states), [project]
        ).fetchall()
    return {row["table_name"]: state_from_row(row) for row in rows}


def read_table(
    conn: psycopg.Connection[Any], db_schema: str, name: str, schema: pa.Schema, project: str | None = None
) -> pa.Table:
    """A stream table's rows (of one project, or all) as `schema` with `_project` first."""
    stored = with_project_column(schema)
    if not relation_exists(conn, db_schema, name):
        return stored.empty_table()
    query = sql.SQL("SELECT {} FROM {} WHERE %s::text IS NULL OR _project = %s").format(
        sql.SQL(", ").join(sql.Identifier(c.name) for c in stored), sql.Identifier(db_schema, name)
    )
    rows = conn.execute(query, [project, project]).fetchall()
    json_columns = [i for i, c in enumerate(stored) if is_json(c)]
    columns = [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in stored]
    for index in json_columns:
        columns[index] = [None if v is None else json.dumps(v) for v in columns[index]]
    return pa.table(columns, schema=stored)

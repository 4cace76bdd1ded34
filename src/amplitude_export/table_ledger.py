"""The ledger of the tables beside `events` (cohorts, annotations, taxonomy, ...): one `TableState` per
(project, table), and `TableWrite`, what a stream hands a sink.

A sink stores the state row in the destination in the same transaction as the table's rows (Parquet: in the
same atomic state file that names the table's file), so a table's state never claims rows that are not there.
The state's `cursor` is the stream's own memory (which cohort versions are loaded, the last day of a series).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa

SNAPSHOT = "snapshot"  # every run replaces the project's rows with what the API answers now
INCREMENTAL = "incremental"  # a run replaces only the rows in its scope (some cohorts, some days)
STATE_TABLE = "_amplitude_streams"
PROJECT_COLUMN = "_project"  # every table's first column, added by the sink
_JSON = {b"kind": b"json"}

# Arrow type -> (DuckDB, PostgreSQL)
SQL_TYPES: dict[pa.DataType, tuple[str, str]] = {
    pa.string(): ("VARCHAR", "text"),
    pa.int64(): ("BIGINT", "bigint"),
    pa.float64(): ("DOUBLE", "double precision"),
    pa.bool_(): ("BOOLEAN", "boolean"),
    pa.date32(): ("DATE", "date"),
    pa.timestamp("us", tz="UTC"): ("TIMESTAMPTZ", "timestamptz"),
}


def json_field(name: str) -> pa.Field:
    """A column of JSON text: a string in Arrow and Parquet, `JSON` in DuckDB, `jsonb` in PostgreSQL."""
    return pa.field(name, pa.string(), metadata=_JSON)


def is_json(column: pa.Field) -> bool:
    """Whether `column` holds JSON text (see `json_field`)."""
    return bool(column.metadata) and column.metadata.get(b"kind") == b"json"


def sql_type(column: pa.Field, dialect: int) -> str:
    """The column's SQL type: `dialect` 0 is DuckDB, 1 PostgreSQL."""
    if is_json(column):
        return ("JSON", "jsonb")[dialect]
    return SQL_TYPES[column.type][dialect]


def with_project_column(schema: pa.Schema) -> pa.Schema:
    """The stored schema: `_project` first, then the stream's columns."""
    return schema.insert(0, pa.field(PROJECT_COLUMN, pa.string()))


def project_rows(batch: pa.RecordBatch, project: str, schema: pa.Schema) -> pa.RecordBatch:
    """A stream's batch as stored: `_project` (set to `project`) first, then the columns of `schema` after it."""
    column = pa.repeat(pa.scalar(project, pa.string()), batch.num_rows)
    return pa.RecordBatch.from_arrays([column, *batch.select(schema.names[1:]).columns], schema=schema)


@dataclass
class TableState:
    """What the destination knows of one table of one project."""

    table: str
    stream: str
    refresh: str  # SNAPSHOT or INCREMENTAL
    rows: int = 0  # the project's rows in the table after the write (set by the sink)
    cursor: dict[str, Any] = field(default_factory=dict)
    note: str | None = None  # why the table was not loaded this time (no plan, quota spent), or None
    run_id: str | None = None
    loaded_at: datetime | None = None  # when the state was stored (set by the sink)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (the time as ISO text)."""
        out = asdict(self)
        out["loaded_at"] = self.loaded_at.isoformat() if self.loaded_at else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TableState:
        """The inverse of `to_dict` (also takes a `cursor` still as JSON text, as SQL hands it back)."""
        values = dict(data)
        if isinstance(values.get("loaded_at"), str):
            values["loaded_at"] = datetime.fromisoformat(values["loaded_at"])
        if isinstance(values.get("cursor"), str):
            values["cursor"] = json.loads(values["cursor"])
        values["cursor"] = values.get("cursor") or {}
        return cls(**values)


@dataclass
class TableWrite:
    """Rows for one table of one project, and the state to store with them, in one transaction.

    With `batches` None only the state is stored. Otherwise the project's rows in scope are replaced by
    `batches`: all of them when `scope_column` is None, else those whose `scope_column` is one of
    `scope_values` (the batches must hold only such rows).
    """

    table: str
    schema: pa.Schema  # the stream's columns, without `_project`
    batches: Iterable[pa.RecordBatch] | None
    state: TableState
    scope_column: str | None = None
    scope_values: list[Any] = field(default_factory=list)


def quota_words(cursor: dict[str, Any]) -> str:
    """`3 this run; 497 of 500 left this month (resets ...)`, from the cursor of `cohort_members`."""
    text = f"{cursor.get('downloads_this_run', 0)} this run"
    if cursor.get("downloads_left") is None:
        return text + "; downloads left unknown (the usage endpoint did not answer)"
    text += f"; {cursor['downloads_left']} of {cursor.get('quota_limit')} left this month"
    return text + (f" (resets {cursor['quota_resets_at']})" if cursor.get("quota_resets_at") else "")


def describe(state: TableState) -> str:
    """A few words on a table's state for `status`: its note, the cohort quota, or the last day of a series."""
    if state.note:
        return state.note
    if "downloads_this_run" in state.cursor:
        return "cohort downloads: " + quota_words(state.cursor)
    if state.cursor.get("last_day"):
        return f"through {state.cursor['last_day']}"
    return ""


STATE_COLUMNS: dict[str, tuple[str, str]] = {  # name -> (DuckDB, PostgreSQL)
    "project": ("VARCHAR NOT NULL", "text NOT NULL"),
    "table_name": ("VARCHAR NOT NULL", "text NOT NULL"),
    "stream": ("VARCHAR", "text"),
    "refresh": ("VARCHAR", "text"),
    "rows": ("BIGINT", "bigint"),
    "cursor": ("JSON", "jsonb"),
    "note": ("VARCHAR", "text"),
    "run_id": ("VARCHAR", "text"),
    "loaded_at": ("TIMESTAMPTZ", "timestamptz"),
}


def state_values(project: str, state: TableState) -> list[Any]:
    """The state as a row of `STATE_COLUMNS` (the cursor as JSON text)."""
    return [project, state.table, state.stream, state.refresh, state.rows, json.dumps(state.cursor, sort_keys=True),
            state.note, state.run_id, state.loaded_at]


def state_from_row(row: dict[str, Any]) -> TableState:
    """A row of `STATE_COLUMNS` back as a TableState."""
    values = {("table" if key == "table_name" else key): value for key, value in row.items() if key != "project"}
    if isinstance(values.get("cursor"), dict):
        values["cursor"] = dict(values["cursor"])
    return TableState.from_dict(values)

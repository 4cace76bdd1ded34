"""The ledger as a SQL table (`_amplitude_ledger`): its columns in each dialect, their migration, and rows.

One column per `HourRecord` field, in the dataclass's order, keyed by (project, hour). Every SQL sink creates
the table from `ledger_columns`, adds what an older table lacks with `missing_columns`, and moves rows through
`records_table` / `record_from_row` (Arrow, DuckDB) or `record_values` / `record_from_values` (PostgreSQL).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Literal

import pyarrow as pa

from ..ledger import HourRecord, MemberInfo

LEDGER = "_amplitude_ledger"
Dialect = Literal["duckdb", "postgres"]

# name: (DuckDB type, PostgreSQL type)
_COLUMNS: dict[str, tuple[str, str]] = {
    "project": ("VARCHAR NOT NULL", "text NOT NULL"),
    "hour": ("TIMESTAMPTZ NOT NULL", "timestamptz NOT NULL"),
    "status": ("VARCHAR NOT NULL", "text NOT NULL"),
    "reason": ("VARCHAR", "text"),
    "members": ("JSON", "jsonb NOT NULL DEFAULT '[]'"),
    "content_hash": ("VARCHAR", "text"),
    "lines_read": ("BIGINT", "bigint NOT NULL DEFAULT 0"),
    "events_loaded": ("BIGINT", "bigint NOT NULL DEFAULT 0"),
    "duplicates": ("BIGINT", "bigint NOT NULL DEFAULT 0"),
    "rejects": ("BIGINT", "bigint NOT NULL DEFAULT 0"),
    "bytes": ("BIGINT", "bigint NOT NULL DEFAULT 0"),
    "min_server_upload_time": ("TIMESTAMPTZ", "timestamptz"),
    "max_server_upload_time": ("TIMESTAMPTZ", "timestamptz"),
    "min_event_time": ("TIMESTAMPTZ", "timestamptz"),
    "max_event_time": ("TIMESTAMPTZ", "timestamptz"),
    "attempts": ("INTEGER", "integer NOT NULL DEFAULT 1"),
    "split_from": ("VARCHAR", "text"),
    "run_id": ("VARCHAR", "text"),
    "updated_at": ("TIMESTAMPTZ", "timestamptz"),
}
LEDGER_NAMES: tuple[str, ...] = tuple(_COLUMNS)
# Columns added after the first release: a ledger created before them gets them (NULL in old rows) on open.
ADDED_COLUMNS = ("split_from",)

LEDGER_ARROW: pa.Schema = pa.schema([
    pa.field(name, pa.timestamp("us", tz="UTC") if duck.startswith("TIMESTAMPTZ")
             else pa.int64() if duck.startswith(("BIGINT", "INTEGER")) else pa.string())
    for name, (duck, _) in _COLUMNS.items()
])  # fmt: skip


def column_type(name: str, dialect: Dialect) -> str:
    """The SQL type (with constraints and default) of ledger column `name`."""
    duck, postgres = _COLUMNS[name]
    return duck if dialect == "duckdb" else postgres


def ledger_columns(dialect: Dialect) -> list[tuple[str, str]]:
    """Every column with its SQL type, in order: the body of CREATE TABLE (with `PRIMARY KEY (project, hour)`)."""
    return [(name, column_type(name, dialect)) for name in LEDGER_NAMES]


def missing_columns(present: Iterable[str]) -> list[str]:
    """The columns added since the first release that a table with columns `present` lacks: the migration."""
    have = set(present)
    return [name for name in ADDED_COLUMNS if name not in have]


def records_table(project: str, records: list[HourRecord]) -> pa.Table:
    """The ledger rows as an Arrow table (members as JSON text); the last record of an hour wins."""
    by_hour = {record.hour.astimezone(UTC): record for record in records}
    rows = []
    for record in by_hour.values():
        row = dataclasses.asdict(record)
        row["members"] = json.dumps(row["members"])
        rows.append({"project": project, **row})
    return pa.Table.from_pylist(rows, schema=LEDGER_ARROW)


def record_from_row(row: dict[str, Any]) -> HourRecord:
    """A ledger row (from Arrow, members as JSON text) back as an HourRecord, datetimes in `datetime.UTC`."""
    values: dict[str, Any] = {
        k: v.astimezone(UTC) if isinstance(v, datetime) else v for k, v in row.items() if k != "project"
    }
    values["members"] = [MemberInfo(**m) for m in json.loads(values["members"] or "[]")]
    return HourRecord(**values)


def record_values(project: str, record: HourRecord, members: Any = None) -> list[Any]:
    """One ledger row's values in `LEDGER_NAMES` order; `members` wraps the members' list (e.g. as jsonb)."""
    values = dataclasses.asdict(record)
    if members is not None:
        values["members"] = members(values["members"])
    return [project, *(values[name] for name in LEDGER_NAMES[1:])]


def record_from_values(names: Iterable[str], row: Iterable[Any]) -> HourRecord:
    """An HourRecord from a row of the columns `names` (no `project`), members already decoded from JSON."""
    values = dict(zip(names, row, strict=True))
    values["members"] = [MemberInfo(**m) for m in values["members"] or []]
    return HourRecord(**values)

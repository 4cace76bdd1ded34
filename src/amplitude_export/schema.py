"""The `events` table: one column per top-level field of the export, typed, plus provenance columns.

Names are the export's, with a leading `$` dropped (`$insert_id` -> `insert_id`). Timestamps are UTC, ids are
64-bit integers, nested objects stay JSON text. A top-level field this schema does not know, and a value that
does not fit its column's type, are kept in `_extra` (a JSON object) so nothing is lost. Every row also says
where it came from: its upload hour, archive member, line number and the run that loaded it.
See docs/SCHEMA.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from .errors import UsageError

# Logical kinds; each destination maps them to its own types.
STRING = "string"
INTEGER = "integer"
FLOAT = "float"
BOOLEAN = "boolean"
TIMESTAMP = "timestamp"
JSON = "json"


@dataclass(frozen=True)
class Column:
    """One column of `events`: its name in the table, its name in the export, and its logical kind."""

    name: str
    source: str
    kind: str


def _col(source: str, kind: str) -> Column:
    return Column(source.lstrip("$"), source, kind)


# The 55 top-level keys of a real export line, in the export's (alphabetical) order.
EXPORT_COLUMNS: tuple[Column, ...] = (
    _col("$insert_id", STRING),
    _col("$insert_key", STRING),
    _col("$schema", INTEGER),
    _col("adid", STRING),
    _col("amplitude_attribution_ids", JSON),  # an array in real exports, though documented as a string
    _col("amplitude_event_type", STRING),
    _col("amplitude_id", INTEGER),
    _col("app", INTEGER),
    _col("city", STRING),
    _col("client_event_time", TIMESTAMP),
    _col("client_upload_time", TIMESTAMP),
    _col("country", STRING),
    _col("data", JSON),
    _col("data_type", STRING),
    _col("device_brand", STRING),
    _col("device_carrier", STRING),
    _col("device_family", STRING),
    _col("device_id", STRING),
    _col("device_manufacturer", STRING),
    _col("device_model", STRING),
    _col("device_type", STRING),
    _col("dma", STRING),
    _col("event_id", INTEGER),
    _col("event_properties", JSON),
    _col("event_time", TIMESTAMP),
    _col("event_type", STRING),
    _col("global_user_properties", JSON),
    _col("group_properties", JSON),
    _col("groups", JSON),
    _col("idfa", STRING),
    _col("ip_address", STRING),
    _col("is_attribution_event", BOOLEAN),
    _col("language", STRING),
    _col("library", STRING),
    _col("location_lat", FLOAT),
    _col("location_lng", FLOAT),
    _col("os_name", STRING),
    _col("os_version", STRING),
    _col("partner_id", STRING),
    _col("paying", BOOLEAN),  # documented a boolean; until 0.x a text column (sinks migrate it, docs/SCHEMA.md)
    _col("plan", JSON),
    _col("platform", STRING),
    _col("processed_time", TIMESTAMP),
    _col("region", STRING),
    _col("sample_rate", FLOAT),
    _col("server_received_time", TIMESTAMP),
    _col("server_upload_time", TIMESTAMP),
    _col("session_id", INTEGER),
    _col("source_id", STRING),
    _col("start_version", STRING),
    _col("user_creation_time", TIMESTAMP),
    _col("user_id", STRING),
    _col("user_properties", JSON),
    _col("uuid", STRING),
    _col("version_name", STRING),
)

# Provenance and overflow, filled by the reader rather than read from the line.
EXTRA = Column("_extra", "", JSON)  # unknown top-level fields and values that did not fit their type
UPLOAD_HOUR = Column("_upload_hour", "", TIMESTAMP)  # the UTC upload hour the archive member is named for
MEMBER = Column("_member", "", STRING)  # archive member the line came from
LINE = Column("_line", "", INTEGER)  # 1-based line number inside that member
RUN_ID = Column("_run_id", "", STRING)  # the run that loaded the row
PROJECT = Column("_project", "", STRING)  # the project (ledger key) the row belongs to: keeps projects apart

PROVENANCE_COLUMNS: tuple[Column, ...] = (EXTRA, UPLOAD_HOUR, MEMBER, LINE, RUN_ID, PROJECT)
ALL_COLUMNS: tuple[Column, ...] = EXPORT_COLUMNS + PROVENANCE_COLUMNS
COLUMN_NAMES: tuple[str, ...] = tuple(column.name for column in ALL_COLUMNS)
KNOWN_SOURCES: frozenset[str] = frozenset(column.source for column in EXPORT_COLUMNS)

# Columns whose kind changed since the first release, with their old kind. A destination made before keeps the
# old type until its sink opens it for writing and migrates it (docs/SCHEMA.md): each old value that does not
# fit the new kind goes to `_extra`, and each value `_extra` kept because it did not fit the old kind but fits the
# new one comes back into the column, so the rows are what a load by this version gives.
RETYPED: dict[str, str] = {"paying": STRING}

ARROW_TYPES: dict[str, pa.DataType] = {
    STRING: pa.string(),
    INTEGER: pa.int64(),
    FLOAT: pa.float64(),
    BOOLEAN: pa.bool_(),
    TIMESTAMP: pa.timestamp("us", tz="UTC"),
    JSON: pa.string(),  # JSON text; sinks store it as JSON / jsonb
}

# One-letter codes the compiled helpers (`_fastparse.c`) take for the kinds, in the parser and the COPY encoder.
COMPILED_KINDS: dict[str, str] = {
    STRING: "s",
    INTEGER: "i",
    FLOAT: "f",
    BOOLEAN: "b",
    TIMESTAMP: "t",
    JSON: "j",
}

DUCKDB_TYPES: dict[str, str] = {
    STRING: "VARCHAR",
    INTEGER: "BIGINT",
    FLOAT: "DOUBLE",
    BOOLEAN: "BOOLEAN",
    TIMESTAMP: "TIMESTAMPTZ",
    JSON: "JSON",
}

POSTGRES_TYPES: dict[str, str] = {
    STRING: "text",
    INTEGER: "bigint",
    FLOAT: "double precision",
    BOOLEAN: "boolean",
    TIMESTAMP: "timestamptz",
    JSON: "json",
}

ARROW_SCHEMA: pa.Schema = pa.schema(
    [pa.field(column.name, ARROW_TYPES[column.kind]) for column in ALL_COLUMNS]
)

TIMESTAMP_COLUMNS: tuple[str, ...] = tuple(c.name for c in EXPORT_COLUMNS if c.kind == TIMESTAMP)
JSON_COLUMNS: tuple[str, ...] = tuple(c.name for c in ALL_COLUMNS if c.kind == JSON)


def quote(name: str) -> str:
    """Quote an identifier for SQL (DuckDB and PostgreSQL agree on double quotes)."""
    return '"' + name.replace('"', '""') + '"'


def arrow_schema(columns: Sequence[str] | None = None) -> pa.Schema:
    """`ARROW_SCHEMA`, or the part of it `columns` names, in that order; a name it lacks is a UsageError."""
    if columns is None:
        return ARROW_SCHEMA
    unknown = [name for name in columns if name not in COLUMN_NAMES]
    if unknown:
        raise UsageError(f"events have no column {unknown[0]!r}")
    return pa.schema([ARROW_SCHEMA.field(name) for name in columns])

"""The tables of the streams beside `events`: each one's columns, key, refresh rule, and how an API answer
becomes its rows. docs/SCHEMA.md describes them for readers; `tests/test_streams.py` checks it names them all.

Columns are snake_case; the fields a table does not type are kept whole in `_extra` (JSON), so nothing an
answer holds is lost. `_taken_at` is when the run asked. Amplitude's epoch timestamps come in seconds in its docs'
samples and in milliseconds elsewhere: a value over 10^11 is read as milliseconds (10^11 s is the year 5138).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv

from .table_ledger import INCREMENTAL, SNAPSHOT, json_field

TIME = pa.timestamp("us", tz="UTC")
TAKEN_AT = pa.field("_taken_at", TIME)
EXTRA = json_field("_extra")
MEMBERS_BATCH = 65_536  # CSV bytes per block: ~2,000 members


@dataclass(frozen=True)
class TableSpec:
    """One table: where its rows come from and how a run refreshes them."""

    name: str
    stream: str  # the `--streams` name that loads it
    refresh: str  # SNAPSHOT: the project's rows are replaced; INCREMENTAL: rows in the run's scope are
    key: tuple[str, ...]  # what identifies a row of one project (`_project` is part of every key)
    schema: pa.Schema
    scope: str | None = None  # INCREMENTAL tables: the column whose values a run replaces
    row: Callable[[dict[str, Any], datetime], dict[str, Any]] | None = None  # an API item -> a row


def epoch(value: Any) -> datetime | None:
    """An epoch timestamp of Amplitude's, in seconds or milliseconds (see the module), as a UTC datetime."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    return datetime.fromtimestamp(value / 1000 if value > 1e11 else value, UTC)


def _iso(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    moment = datetime.fromisoformat(value)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, sort_keys=True)


def _text(value: Any) -> str | None:
    return value if value is None or isinstance(value, str) else _json(value)


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _extra(item: dict[str, Any], used: set[str]) -> str | None:
    rest = {key: value for key, value in item.items() if key not in used}
    return _json(rest) if rest else None


def _typed(fields: dict[str, tuple[pa.DataType, str]], item: dict[str, Any]) -> dict[str, Any]:
    """The `fields` (column -> (type, the item's key)) converted to their column's type."""
    convert = {pa.string(): _text, pa.int64(): _int, pa.bool_(): _bool}
    return {column: convert[kind](item.get(key)) for column, (kind, key) in fields.items()}


def _schema(fields: dict[str, tuple[pa.DataType, str]], *more: pa.Field) -> pa.Schema:
    return pa.schema([pa.field(name, kind) for name, (kind, _) in fields.items()] + list(more))


# -- cohorts ---------------------------------------------------------------------------------------------------

_COHORT = {"id": (pa.string(), "id"), "name": (pa.string(), "name"), "description": (pa.string(), "description"),
           "type": (pa.string(), "type"), "size": (pa.int64(), "size"), "archived": (pa.bool_(), "archived"),
           "published": (pa.bool_(), "published"), "finished": (pa.bool_(), "finished"),
           "hidden": (pa.bool_(), "hidden"), "is_predictive": (pa.bool_(), "is_predictive"),
           "is_official_content": (pa.bool_(), "is_official_content"), "app_id": (pa.int64(), "appId")}
_COHORT_TIMES = {"created_at": "createdAt", "last_mod": "lastMod", "last_computed": "lastComputed"}
_COHORT_JSON = {"owners": "owners", "viewers": "viewers", "definition": "definition",
                "sync_metadata": "syncMetadata"}


def _cohort(item: dict[str, Any], taken_at: datetime) -> dict[str, Any]:
    row = _typed(_COHORT, item)
    row.update({column: epoch(item.get(key)) for column, key in _COHORT_TIMES.items()})
    row.update({column: _json(item.get(key)) for column, key in _COHORT_JSON.items()})
    used = {key for _, key in _COHORT.values()} | set(_COHORT_TIMES.values()) | set(_COHORT_JSON.values())
    return {**row, "_extra": _extra(item, used), "_taken_at": taken_at}


COHORTS = TableSpec(
    "cohorts", "cohorts", SNAPSHOT, ("id",),
    _schema(_COHORT, *(pa.field(c, TIME) for c in _COHORT_TIMES), *(json_field(c) for c in _COHORT_JSON),
            EXTRA, TAKEN_AT),
    row=_cohort,
)

COHORT_MEMBERS = TableSpec(
    "cohort_members", "cohort_members", INCREMENTAL, ("cohort_id", "amplitude_id"),
    pa.schema([pa.field("cohort_id", pa.string()), pa.field("amplitude_id", pa.int64()),
               pa.field("user_id", pa.string()), json_field("properties"), pa.field("_last_computed", TIME),
               pa.field("_downloaded_at", TIME)]),
    scope="cohort_id",
)


def member_batches(path: Path, cohort_id: str, last_computed: datetime | None,
                   downloaded_at: datetime) -> Iterator[pa.RecordBatch]:
    """A downloaded cohort file's members as COHORT_MEMBERS batches, a block at a time: `amplitude_id` and
    `user_id` typed, any other column (requested user properties, a group cohort's `group_value`) in
    `properties`; an empty `user_id` is NULL."""
    with open(path, newline="", encoding="utf-8") as handle:
        header = next(csv.reader([handle.readline()]), [])
    if not header:
        return
    others = [name for name in header if name not in ("amplitude_id", "user_id")]
    reader = pacsv.open_csv(
        path, read_options=pacsv.ReadOptions(block_size=MEMBERS_BATCH),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.int64() if name == "amplitude_id" else pa.string() for name in header},
            null_values=[""], strings_can_be_null=True),
    )
    for batch in reader:
        rows = batch.num_rows
        if not rows:
            continue
        names = batch.schema.names
        props: pa.Array = pa.nulls(rows, pa.string())
        if others:
            values = {name: batch.column(name).to_pylist() for name in others}
            props = pa.array([_json({name: values[name][i] for name in others}) for i in range(rows)], pa.string())
        yield pa.RecordBatch.from_arrays([
            pa.repeat(pa.scalar(cohort_id), rows),
            batch.column("amplitude_id") if "amplitude_id" in names else pa.nulls(rows, pa.int64()),
            batch.column("user_id") if "user_id" in names else pa.nulls(rows, pa.string()),
            props,
            pa.repeat(pa.scalar(last_computed, TIME), rows),
            pa.repeat(pa.scalar(downloaded_at, TIME), rows),
        ], schema=COHORT_MEMBERS.schema)


# -- annotations and the events list ---------------------------------------------------------------------------


def _mapping(value: Any) -> dict[str, Any]:
    """A nested object, or an empty one where the API sent something else."""
    return value if isinstance(value, dict) else {}


def _annotation(item: dict[str, Any], taken_at: datetime) -> dict[str, Any]:
    category = _mapping(item.get("category"))
    return {"id": _int(item.get("id")), "starts_at": _iso(item.get("start")), "ends_at": _iso(item.get("end")),
            "label": _text(item.get("label")), "details": _text(item.get("details")),
            "category_id": _int(category.get("id")), "category": _text(category.get("name", category.get("category"))),
            "chart_id": _text(item.get("chart_id")),
            "_extra": _extra(item, {"id", "start", "end", "label", "details", "category", "chart_id"}),
            "_taken_at": taken_at}


ANNOTATIONS = TableSpec(
    "annotations", "annotations", SNAPSHOT, ("id",),
    pa.schema([pa.field("id", pa.int64()), pa.field("starts_at", TIME), pa.field("ends_at", TIME),
               pa.field("label", pa.string()), pa.field("details", pa.string()), pa.field("category_id", pa.int64()),
               pa.field("category", pa.string()), pa.field("chart_id", pa.string()), EXTRA, TAKEN_AT]),
    row=_annotation,
)

_EVENT_LIST = {"event_type": (pa.string(), "value"), "display": (pa.string(), "display"),
               "totals": (pa.int64(), "totals"), "non_active": (pa.bool_(), "non_active"),
               "deleted": (pa.bool_(), "deleted"), "hidden": (pa.bool_(), "hidden"),
               "flow_hidden": (pa.bool_(), "flow_hidden"), "id": (pa.int64(), "id")}


def _listed(fields: dict[str, tuple[pa.DataType, str]]) -> Callable[[dict[str, Any], datetime], dict[str, Any]]:
    def row(item: dict[str, Any], taken_at: datetime) -> dict[str, Any]:
        used = {key for _, key in fields.values()}
        return {**_typed(fields, item), "_extra": _extra(item, used), "_taken_at": taken_at}
    return row


EVENTS_LIST = TableSpec("events_list", "events_list", SNAPSHOT, ("event_type",),
                        _schema(_EVENT_LIST, EXTRA, TAKEN_AT), row=_listed(_EVENT_LIST))

# -- taxonomy ---------------------------------------------------------------------------------------------------

_EVENT_TYPE = {"event_type": (pa.string(), "event_type"), "display_name": (pa.string(), "display_name"),
               "description": (pa.string(), "description"), "owner": (pa.string(), "owner"),
               "is_active": (pa.bool_(), "is_active"),
               **{f"is_hidden_from_{part}": (pa.bool_(), f"is_hidden_from_{part}")
                  for part in ("dropdowns", "persona_results", "pathfinder", "timeline")}}


def _event_type(item: dict[str, Any], taken_at: datetime) -> dict[str, Any]:
    category = _mapping(item.get("category"))
    return {**_typed(_EVENT_TYPE, item), "category": _text(category.get("name")), "tags": _json(item.get("tags")),
            "_extra": _extra(item, {key for _, key in _EVENT_TYPE.values()} | {"category", "tags"}),
            "_taken_at": taken_at}


EVENT_TYPES = TableSpec("event_types", "taxonomy", SNAPSHOT, ("event_type",),
                        _schema(_EVENT_TYPE, pa.field("category", pa.string()), json_field("tags"), EXTRA, TAKEN_AT),
                        row=_event_type)

_PROPERTY = {"description": (pa.string(), "description"), "type": (pa.string(), "type"),
             "regex": (pa.string(), "regex"), "enum_values": (pa.string(), "enum_values"),
             "is_array_type": (pa.bool_(), "is_array_type"), "is_hidden": (pa.bool_(), "is_hidden")}


def _property(fields: dict[str, tuple[pa.DataType, str]]) -> Callable[[dict[str, Any], datetime], dict[str, Any]]:
    def row(item: dict[str, Any], taken_at: datetime) -> dict[str, Any]:
        used = {key for _, key in fields.values()} | {"classifications"}
        return {**_typed(fields, item), "classifications": _json(item.get("classifications")),
                "_extra": _extra(item, used), "_taken_at": taken_at}
    return row


_EVENT_PROPERTY = {"event_type": (pa.string(), "event_type"), "event_property": (pa.string(), "event_property"),
                   **_PROPERTY, "is_required": (pa.bool_(), "is_required")}
EVENT_PROPERTIES = TableSpec(
    "event_properties", "taxonomy", SNAPSHOT, ("event_type", "event_property"),
    _schema(_EVENT_PROPERTY, json_field("classifications"), EXTRA, TAKEN_AT), row=_property(_EVENT_PROPERTY))
_USER_PROPERTY = {"user_property": (pa.string(), "user_property"), **_PROPERTY, "deleted": (pa.bool_(), "deleted")}
USER_PROPERTIES = TableSpec(
    "user_properties", "taxonomy", SNAPSHOT, ("user_property",),
    _schema(_USER_PROPERTY, json_field("classifications"), EXTRA, TAKEN_AT), row=_property(_USER_PROPERTY))

# -- day series -------------------------------------------------------------------------------------------------

ACTIVE_USERS = TableSpec(
    "active_users", "active_users", INCREMENTAL, ("date",),
    pa.schema([pa.field("date", pa.date32()), pa.field("active_users", pa.int64()), TAKEN_AT]), scope="date")
AVERAGE_SESSION_LENGTH = TableSpec(
    "average_session_length", "average_session_length", INCREMENTAL, ("date",),
    pa.schema([pa.field("date", pa.date32()), pa.field("average_seconds", pa.float64()), TAKEN_AT]), scope="date")
SERIES = {"active_users": ("/api/2/users", {"m": "active", "i": "1"}, "active_users"),
          "average_session_length": ("/api/2/sessions/average", {}, "average_seconds")}


def series_rows(spec: TableSpec, data: dict[str, Any], taken_at: datetime) -> list[dict[str, Any]]:
    """A series answer's first segment as one row per day of `xValues`."""
    days = data.get("xValues") or []
    series = (data.get("series") or [[]])[0] or []
    value = SERIES[spec.name][2]
    return [{"date": date.fromisoformat(str(day)[:10]), value: series[i] if i < len(series) else None,
             "_taken_at": taken_at} for i, day in enumerate(days)]


TABLES = {spec.name: spec for spec in (COHORTS, COHORT_MEMBERS, ANNOTATIONS, EVENTS_LIST, EVENT_TYPES,
                                       EVENT_PROPERTIES, USER_PROPERTIES, ACTIVE_USERS, AVERAGE_SESSION_LENGTH)}


def rows_table(spec: TableSpec, items: list[dict[str, Any]], taken_at: datetime) -> pa.Table:
    """API items as the table's rows, one per key (a later item with the same key wins)."""
    assert spec.row is not None
    rows = {tuple(row[k] for k in spec.key): row for row in (spec.row(item, taken_at) for item in items)}
    return pa.Table.from_pylist(list(rows.values()), schema=spec.schema)

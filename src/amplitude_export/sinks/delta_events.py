"""The events table of a Delta destination: where it is and how delta-rs reaches it (`table_uri`, `delta_options`),
its schema, partitioned by `_upload_day` (the UTC date of `_upload_hour`), opening or creating it, and the
predicates its commits select rows by.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from ..errors import DestinationError, UsageError
from ..schema import ARROW_SCHEMA
from ..windows import Window
from .delta_tables import sql_literal
from .staging import foreign_entries, foreign_message

DAY = "_upload_day"  # the partition column: the UTC date of `_upload_hour`
DELTA_SCHEMA = ARROW_SCHEMA.append(pa.field(DAY, pa.date32()))


def table_uri(uri: str) -> str:
    """An absolute local path (from a path or `file://` URL), or the URL as given."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return str(Path(uri).expanduser().absolute())
    if scheme.lower() in ("file", "local"):
        return str(Path(rest).expanduser().absolute())
    return uri


def delta_options(options: dict[str, Any] | None) -> dict[str, str]:
    """Storage options as delta-rs takes them (strings); an `http://` endpoint turns on `allow_http`, which
    delta-rs otherwise refuses (a MinIO or a loopback test server)."""
    result: dict[str, str] = {}
    for key, value in (options or {}).items():
        if isinstance(value, dict | list):
            raise UsageError(f"storage option {key}: delta-rs takes text, not JSON (the value is not shown)")
        result[key] = str(value).lower() if isinstance(value, bool) else str(value)
    endpoint = next((result[key] for key in ("endpoint_url", "aws_endpoint_url", "endpoint", "aws_endpoint")
                     if key in result), os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    if endpoint and endpoint.startswith("http://") and not any(k.lower().endswith("allow_http") for k in result):
        result["allow_http"] = "true"
    return result


def open_events(uri: str, options: dict[str, str], *, read_only: bool) -> DeltaTable:
    """The events table at `uri`, created unless `read_only`; a table amplitude-export did not write is refused."""
    try:
        table = DeltaTable(uri, storage_options=options)
    except TableNotFoundError:
        if read_only:
            raise DestinationError(f"{uri} is not a Delta table (no _delta_log): nothing loaded yet") from None
        if "://" not in uri:
            _check_empty(Path(uri))
            Path(uri).mkdir(parents=True, exist_ok=True)
        try:
            table = DeltaTable.create(uri, DELTA_SCHEMA, mode="ignore", partition_by=[DAY], name="events",
                                      description="Amplitude events, written by amplitude-export",
                                      storage_options=options)
        except CommitFailedError:
            # another first run committed version 0 between the check above and this commit: open its table
            table = DeltaTable(uri, storage_options=options)
    names = {field.name for field in table.schema().fields}
    missing = [name for name in DELTA_SCHEMA.names if name not in names]
    if missing or table.metadata().partition_columns != [DAY]:
        raise DestinationError(f"{uri} is a Delta table not written by amplitude-export "
                               f"(no column {missing[0] if missing else DAY} to partition by)")
    return table


def _check_empty(path: Path) -> None:
    """Refuse to make a table where other files are: the table's `maintain` (vacuum) would delete them all."""
    ours = ("_delta_log", "_amplitude_")  # another first run may be making the same table at this moment
    if path.is_dir() and (others := foreign_entries((p.name for p in path.iterdir()), prefixes=ours)):
        raise DestinationError(foreign_message(str(path), others, "Delta table (_delta_log)",
                                               "a new table needs an empty or new directory"))
    if path.exists() and not path.is_dir():
        raise DestinationError(f"{path} is a file, not a directory")


def replace_where(project: str, window: Window) -> str:
    """The predicate that selects the project's rows of the window's hours (the partition column too, so
    delta-rs looks only at the window's days)."""
    start, end = window.start.astimezone(UTC), window.end.astimezone(UTC)
    quoted = "'" + project.replace("'", "''") + "'"
    return (f"_project = {quoted} AND _upload_hour >= '{start:%Y-%m-%dT%H:%M:%SZ}' "
            f"AND _upload_hour <= '{end:%Y-%m-%dT%H:%M:%SZ}' "
            f"AND {DAY} >= '{start:%Y-%m-%d}' AND {DAY} <= '{end:%Y-%m-%d}'")


def doomed_predicate(project: str, amplitude_ids: list[int], uuids: list[str], hours: dict[datetime, int]) -> str:
    """The rows of a deletion: the users' (by amplitude_id, or by uuid where only `_extra` kept the id), in the
    upload days that hold them (so delta-rs looks only at those)."""
    who = f"amplitude_id IN ({', '.join(str(int(i)) for i in sorted(set(amplitude_ids)))})"
    if uuids:
        who = f"({who} OR uuid IN ({', '.join(sql_literal(u) for u in uuids)}))"
    days = sorted({hour.astimezone(UTC).date() for hour in hours})
    return (f"_project = {sql_literal(project)} AND {who} "
            f"AND {DAY} IN ({', '.join(sql_literal(day) for day in days)})")

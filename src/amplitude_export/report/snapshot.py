"""What the report reads of a destination: the ledger of one project, and the few event columns the figures need
copied into a DuckDB database of the report's own.

Both come through the public reads every sink offers (`projects`, `ledger`, `read_batches`; for the tables of
`run --streams`, `table_states` and `read_table` where a sink has them), so any destination
`run` writes can be reported on and the report knows nothing of how a sink stores its rows. The copy streams, so
memory stays bounded however many events there are (DuckDB spills to a temporary directory past 1 GB); the
destination is closed again before any figure is computed, so a run need not wait for the report.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import duckdb

from ..errors import AmplitudeExportError, DestinationError, UsageError
from ..ledger import HourRecord
from ..sinks import lost_file_hint, open_sink
from ..storage import mask_urls
from ..stream_tables import TABLES

# the columns the figures read: all the report copies out of a destination
REPORT_COLUMNS = (
    "_upload_hour", "_extra", "amplitude_id", "event_time", "server_upload_time", "event_type", "platform", "country",
)


@dataclass
class Snapshot:
    """One project of a destination as the report reads it."""

    project: str | None  # None: the ledger names no project (a destination never loaded)
    ledger: dict[datetime, HourRecord]
    con: duckdb.DuckDBPyConnection  # table `events`: REPORT_COLUMNS of the project's events
    streams: dict[str, Any] = field(default_factory=dict)  # `read_streams`: states, cohorts, annotations


@contextmanager
def take_snapshot(
    dest: str, project: str | None = None, storage_options: dict[str, Any] | None = None
) -> Iterator[Snapshot]:
    """The snapshot of `dest` (any destination `run` writes) for `project`, by default its only project;
    `storage_options` go to the filesystem of a `parquet:` URL on object storage."""
    with tempfile.TemporaryDirectory(prefix="amplitude-report-") as scratch:
        # in memory, spilling to the directory past the limit: a database file would cost half as much again in
        # writing; the table's row order is of no use to any figure
        config: dict[str, Any] = {"threads": 2, "memory_limit": "1GB", "temp_directory": scratch,
                                  "preserve_insertion_order": False}
        con = duckdb.connect(":memory:", config=config)
        try:
            # TIMESTAMPTZ shown and cast as UTC whatever the machine's zone; no progress bar drawn on stdout
            con.execute("SET TimeZone = 'UTC'")
            con.execute("SET enable_progress_bar = false")
            sink = open_sink(dest, read_only=True, storage_options=storage_options)
            try:
                project = pick_project(sink.projects(), project)
                ledger = sink.ledger(project) if project is not None else {}
                try:
                    con.register("_stream", sink.read_batches(REPORT_COLUMNS, project=project))
                    con.execute("CREATE TABLE events AS SELECT * FROM _stream")
                except AmplitudeExportError:
                    raise
                except Exception as exc:  # a data file gone (deleted by hand, or by a reload since the open)
                    what = getattr(sink, "description", None) or mask_urls(dest)
                    text = str(exc).strip()
                    reason = text.splitlines()[0] if text else type(exc).__name__
                    reason = reason.split(" Detail: Python exception")[0]  # not the traceback DuckDB appends
                    raise DestinationError(f"cannot read {what}: {lost_file_hint(reason, what)}") from None
                con.unregister("_stream")
                streams = read_streams(sink, project) if project is not None else {}
            finally:
                sink.close()
            yield Snapshot(project, ledger, con, streams)
        finally:
            con.close()


def read_streams(sink: Any, project: str) -> dict[str, Any]:
    """What the report shows of `run --streams`: `states` (each table's state, by name) and the rows of the
    small tables it draws (`cohorts`, `annotations`) where they were loaded; empty for a sink without such tables.
    `cohort_members`, which can be large, is not read: the cohorts' own `size` says how many members each has."""
    states_of = getattr(sink, "table_states", None)
    states = states_of(project) if states_of is not None else {}
    found: dict[str, Any] = {"states": states} if states else {}
    for name in ("cohorts", "annotations"):
        if name in states and states[name].note is None:
            found[name] = sink.read_table(name, TABLES[name].schema, project).to_pylist()
    return found


def pick_project(projects: list[str], project: str | None) -> str | None:
    """`project` if the ledger knows it (or knows none); else the ledger's only project."""
    if project is not None:
        if projects and project not in projects:
            raise UsageError(f"the ledger knows no project {project!r}; it has {', '.join(projects)}")
        return project
    if len(projects) > 1:
        raise UsageError(f"the destination holds several projects ({', '.join(projects)}): name one with --project")
    return projects[0] if projects else None


def query_rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    """The rows `sql` returns, as dicts by column name."""
    cursor = con.execute(sql, params or [])
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

"""Deletion jobs applied to a DuckDB destination: the users' rows go from `events` (their hours' ledger counts
follow) and from `cohort_members`, and the job's `_amplitude_deletions` row records what went, in one
transaction."""

from __future__ import annotations

import dataclasses

import duckdb
import pyarrow as pa

from ..errors import DestinationError
from ..ledger import DeletionRecord
from ..table_ledger import STATE_TABLE
from .duckdb_stage import (
    COHORT_MEMBERS,
    DELETED,
    DELETED_ROWS,
    DELETIONS,
    DELETIONS_DDL,
    deleted_table,
    deletion_row,
    hour_counts,
    rollback,
)
from .duckdb_tables import has_table
from .ledger_table import LEDGER
from .staging import first_line

EVENTS = "events"


def deletion_records(con: duckdb.DuckDBPyConnection, project: str) -> list[DeletionRecord]:
    """The deletion jobs applied to `project`, by day (`_amplitude_deletions`)."""
    try:
        table = con.sql(f"SELECT * FROM {DELETIONS} WHERE project = ? ORDER BY day", params=[project]).to_arrow_table()
    except duckdb.CatalogException:  # no deletion applied yet
        return []
    return [DeletionRecord.from_dict(row) for row in table.to_pylist()]


def delete_users(
    con: duckdb.DuckDBPyConnection, project: str, amplitude_ids: list[int], record: DeletionRecord, label: str
) -> DeletionRecord:
    """Delete every row of `amplitude_ids` of `project` and store `record` with the rows counted, atomically."""
    params = {"project": project}
    con.begin()
    try:
        con.execute(DELETIONS_DDL)
        con.register(DELETED, deleted_table(amplitude_ids))
        gone = hour_counts(
            con,
            f"SELECT _upload_hour AS hour, count(*) AS n FROM {EVENTS} "
            f"WHERE _project = $project AND {DELETED_ROWS} GROUP BY 1",
            params,
        )
        if gone:
            con.execute(f"DELETE FROM {EVENTS} WHERE _project = $project AND {DELETED_ROWS}", params)
            con.register("_amplitude_gone", pa.table({"hour": list(gone), "n": list(gone.values())}))
            con.execute(
                f"UPDATE {LEDGER} SET events_loaded = events_loaded - g.n FROM _amplitude_gone AS g "
                f"WHERE {LEDGER}.project = $project AND {LEDGER}.hour = g.hour",
                params,
            )
            con.unregister("_amplitude_gone")
        members = _delete_members(con, project)
        con.unregister(DELETED)
        stored = dataclasses.replace(
            record,
            rows_deleted=record.rows_deleted + sum(gone.values()),
            cohort_rows_deleted=record.cohort_rows_deleted + members,
        )
        con.register("_amplitude_deletion", deletion_row(project, stored))
        con.execute(f"INSERT OR REPLACE INTO {DELETIONS} SELECT * FROM _amplitude_deletion")
        con.unregister("_amplitude_deletion")
        con.commit()
    except BaseException as exc:
        rollback(con)
        if isinstance(exc, duckdb.Error):
            raise DestinationError(f"cannot apply deletion job {record.day} to {label}: {first_line(exc)}") from exc
        raise
    return stored


def _delete_members(con: duckdb.DuckDBPyConnection, project: str) -> int:
    """Delete the deleted users' rows of `cohort_members`, if the table exists; how many."""
    columns = {
        row[0]
        for row in con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE database_name = current_database() "
            "AND schema_name = current_schema() AND table_name = ?",
            [COHORT_MEMBERS],
        ).fetchall()
    }
    if "amplitude_id" not in columns:
        return 0
    where = f"TRY_CAST(amplitude_id AS BIGINT) IN (SELECT amplitude_id FROM {DELETED})" + (
        " AND _project = $project" if "_project" in columns else ""
    )
    params = {"project": project} if "_project" in columns else {}
    count = con.execute(f"SELECT count(*) FROM {COHORT_MEMBERS} WHERE {where}", params).fetchall()[0][0]
    if count:
        con.execute(f"DELETE FROM {COHORT_MEMBERS} WHERE {where}", params)
        if has_table(con, STATE_TABLE):  # the table's state counts its rows
            con.execute(
                f"UPDATE {STATE_TABLE} SET rows = rows - ? WHERE project = ? AND table_name = ?",
                [count, project, COHORT_MEMBERS],
            )
    return int(count)

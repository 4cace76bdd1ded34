"""Deletion jobs applied to a PostgreSQL destination: the users' rows go from `events` (their hours' ledger counts
follow) and from `cohort_members`, and the job's `_amplitude_deletions` row records what went, in the caller's
transaction."""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import psycopg
import psycopg.rows
from psycopg import sql

from ..ledger import DeletionRecord
from ..table_ledger import STATE_TABLE
from .ledger_table import LEDGER
from .postgres_tables import relation_exists

DELETIONS_TABLE = "_amplitude_deletions"
COHORT_MEMBERS = "cohort_members"
_DELETIONS_COLUMNS = (
    "project text NOT NULL, day date NOT NULL, status text NOT NULL, amplitude_ids bigint[] NOT NULL, "
    "rows_deleted bigint NOT NULL, cohort_rows_deleted bigint NOT NULL, applied_at timestamptz, run_id text, "
    "PRIMARY KEY (project, day)"
)
# a deleted user's row: by amplitude_id, or by the one `_extra` kept (as text) when it did not fit the column
# (CASE, not AND: PostgreSQL may evaluate the cast before the pattern test; braces doubled for sql.SQL.format)
_DELETED_ROWS = (
    "coalesce(amplitude_id, CASE WHEN _extra->>'amplitude_id' ~ '^\\s*-?[0-9]{{1,18}}\\s*$' "
    "THEN (_extra->>'amplitude_id')::bigint END) = ANY(%(ids)s::bigint[])"
)
_RECORD_FIELDS = ("day", "status", "amplitude_ids", "rows_deleted", "cohort_rows_deleted", "applied_at", "run_id")


def deletion_records(conn: psycopg.Connection[Any], schema: str, project: str) -> list[DeletionRecord]:
    """The deletion jobs applied to `project`, by day."""
    if not relation_exists(conn, schema, DELETIONS_TABLE):
        return []
    cursor = conn.cursor(row_factory=psycopg.rows.dict_row)
    rows = cursor.execute(
        sql.SQL("SELECT * FROM {} WHERE project = %s ORDER BY day").format(sql.Identifier(schema, DELETIONS_TABLE)),
        [project],
    ).fetchall()
    return [DeletionRecord.from_dict(row) for row in rows]


def delete_users(
    conn: psycopg.Connection[Any], schema: str, project: str, amplitude_ids: list[int], record: DeletionRecord
) -> DeletionRecord:
    """Delete every row of `amplitude_ids` of `project` and store `record` with the rows counted; returns it."""
    table = sql.Identifier(schema, DELETIONS_TABLE)
    params = {"project": project, "ids": sorted(set(amplitude_ids))}
    conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (" + _DELETIONS_COLUMNS + ")").format(table))
    deleted = 0
    if amplitude_ids:
        counted = conn.execute(
            sql.SQL(
                "WITH gone AS (DELETE FROM {events} WHERE _project = %(project)s AND "
                + _DELETED_ROWS
                + " RETURNING _upload_hour), counts AS (SELECT _upload_hour AS hour, count(*) AS n FROM gone "
                "GROUP BY 1), fixed AS (UPDATE {ledger} AS l SET events_loaded = l.events_loaded - counts.n "
                "FROM counts WHERE l.project = %(project)s AND l.hour = counts.hour RETURNING 1) "
                "SELECT coalesce(sum(n), 0) FROM counts"
            ).format(events=sql.Identifier(schema, "events"), ledger=sql.Identifier(schema, LEDGER)),
            params,
        )
        deleted = int(counted.fetchall()[0][0])
    members = _delete_members(conn, schema, params) if amplitude_ids else 0
    stored = replace(
        record, rows_deleted=record.rows_deleted + deleted, cohort_rows_deleted=record.cohort_rows_deleted + members
    )
    values = asdict(stored)
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (project, day, status, amplitude_ids, rows_deleted, cohort_rows_deleted, "
            "applied_at, run_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (project, day) DO UPDATE "
            "SET status = EXCLUDED.status, amplitude_ids = EXCLUDED.amplitude_ids, "
            "rows_deleted = EXCLUDED.rows_deleted, cohort_rows_deleted = EXCLUDED.cohort_rows_deleted, "
            "applied_at = EXCLUDED.applied_at, run_id = EXCLUDED.run_id"
        ).format(table),
        [project, *(values[name] for name in _RECORD_FIELDS)],
    )
    return stored


def _delete_members(conn: psycopg.Connection[Any], schema: str, params: dict[str, Any]) -> int:
    """Delete the deleted users' rows of `cohort_members`, if the table exists; how many."""
    columns = {
        row[0]
        for row in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
            [schema, COHORT_MEMBERS],
        ).fetchall()
    }
    if "amplitude_id" not in columns:
        return 0
    where = "amplitude_id::text = ANY(%(texts)s)" + (" AND _project = %(project)s" if "_project" in columns else "")
    gone = conn.execute(
        sql.SQL("WITH gone AS (DELETE FROM {} WHERE " + where + " RETURNING 1) SELECT count(*) FROM gone").format(
            sql.Identifier(schema, COHORT_MEMBERS)
        ),
        {**params, "texts": [str(i) for i in params["ids"]]},
    )
    count = int(gone.fetchall()[0][0])
    if count and relation_exists(conn, schema, STATE_TABLE):  # the table's state counts its rows
        conn.execute(
            sql.SQL("UPDATE {} SET rows = rows - %s WHERE project = %s AND table_name = %s").format(
                sql.Identifier(schema, STATE_TABLE)
            ),
            [count, params["project"], COHORT_MEMBERS],
        )
    return count

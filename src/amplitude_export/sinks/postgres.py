"""PostgreSQL destination: `events` and `_amplitude_ledger` in one schema, one transaction per window.

A sink holds a session-level advisory lock on its destination (database + schema) for its whole life, so two
runs never interleave windows; each write also takes the transaction-scoped lock, so any writer that does not
hold the session lock still cannot commit between our delete and our insert. How a window's rows reach `events`
is `postgres_load` (binary COPY, `postgres_copy`); the URL and its password, `postgres_url`. See docs/POSTGRES.md.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Self

import psycopg
import psycopg.rows
import pyarrow as pa
from psycopg import sql
from psycopg.types.json import Jsonb

from .. import clock
from ..errors import DestinationBusyError, DestinationError, UsageError
from ..ledger import DeletionRecord, HourRecord
from ..logs import FATAL
from ..schema import ALL_COLUMNS, ARROW_SCHEMA, COLUMN_NAMES, JSON_COLUMNS, POSTGRES_TYPES, RETYPED, quote
from ..table_ledger import (
    TableState,
    TableWrite,
)
from ..windows import Window
from . import WindowRead, with_project
from .ledger_table import (
    LEDGER,
    LEDGER_NAMES,
    column_type,
    ledger_columns,
    missing_columns,
    record_from_values,
    record_values,
)
from .postgres_copy import escape_json_text
from .postgres_deletions import delete_users, deletion_records
from .postgres_load import CHUNK_BYTES, MAX_CONFLICTS, WindowLoad
from .postgres_read import copy_to_stream, copy_to_table
from .postgres_tables import read_table, state_projects, table_states, write_table
from .postgres_url import check_url, one_line, redact, secrets, split_schema
from .staging import SEEN_LIMIT, FirstCopies, check_records, fill_counts

DEFAULT_SCHEMA = "amplitude"
LEDGER_TABLE = LEDGER
# byte order: uuids and project names need no locale, and the key, the hour index and sorts get faster
_COLLATE = {"uuid": ' COLLATE "C"', "_project": ' COLLATE "C"'}
# An event Amplitude received again lands in a later upload hour, usually a near one: the uuids the project holds
# this many hours either side of a window are dropped on the way in, so such a repeat makes no chunk conflict.
NEARBY = timedelta(hours=6)


def on_this_machine(host: str, hostaddr: str) -> bool:
    """Whether a connection to `host` (resolved to `hostaddr`) reaches a server on this machine: a Unix-domain
    socket or a loopback address."""
    if not host or host.startswith(("/", "@")):
        return True
    try:
        return ipaddress.ip_address(hostaddr or host).is_loopback
    except ValueError:
        return host == "localhost"


class PostgresSink:
    """Events and the ledger in a PostgreSQL schema; see the module docstring for locking and loading."""

    # The server's backend sets the pace of a load (docs/POSTGRES.md, "Speed"): one parse thread keeps ahead of it,
    # and when the server runs on this machine (`shares_cores`), the load's own threads give way to it.
    parse_threads = 1

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        wait: bool = False,
        connect_timeout: int = 10,
        work_mem: str = "256MB",
        now: Callable[[], datetime] | None = None,
        read_only: bool = False,
        seen_limit: int = SEEN_LIMIT,
        **options: object,
    ) -> None:
        if options:
            raise UsageError(f"unknown PostgreSQL destination option(s): {', '.join(sorted(options))}")
        url, url_schema = split_schema(url)
        check_url(url)
        schema = schema or url_schema or DEFAULT_SCHEMA
        self.schema = schema
        self.description = f"{redact(url)} (schema {schema})"
        self._secrets = secrets(url)
        self._work_mem = work_mem
        self._seen_limit = seen_limit  # uuids a window dedups in memory before the merge has to sort
        self._now = now or (clock.now)
        self._conn: psycopg.Connection[Any] | None = None
        self._events = sql.Identifier(schema, "events")
        self._ledger = sql.Identifier(schema, LEDGER_TABLE)
        self._ledger_missing: set[str] = set()  # added columns an older ledger lacks (read-only opens only)
        self._jsonb: frozenset[str] = frozenset()  # JSON columns an older `events` (or a user's) types `jsonb`
        self.chunk_bytes = CHUNK_BYTES
        self.route: Counter[str] = Counter()  # the last window's rows by way in (`_WindowLoad.route`)
        self._locked = False  # this connection holds the destination's session lock
        self.shares_cores = False
        try:
            self._conn = psycopg.connect(
                url, autocommit=True, connect_timeout=connect_timeout, application_name="amplitude-export"
            )
        except psycopg.Error as exc:
            raise self._fatal(f"cannot open {self.description}: {self._message(exc)}") from None
        try:
            hostaddr = self._conn.info.hostaddr
        except psycopg.NotSupportedError:  # a libpq before 12
            hostaddr = ""
        self.shares_cores = on_this_machine(self._conn.info.host, hostaddr)
        try:
            self._conn.execute("SET TIME ZONE 'UTC'")
            self._lock_key = self._conn.execute(
                "SELECT hashtextextended(%s, 0)", [f"amplitude-export:{schema}"]
            ).fetchone()[0]  # type: ignore[index]
            if read_only:
                # readers (status, verify, read_events) see committed windows through MVCC: no lock, no DDL
                self.conn.read_only = True
            else:
                self._lock_session(wait)
            self._create_tables(create=not read_only)
        except psycopg.Error as exc:
            self.close()
            raise self._fatal(f"cannot open {self.description}: {self._message(exc)}") from None
        except BaseException:
            self.close()
            raise

    def _message(self, exc: BaseException) -> str:
        """One line from a driver or server error, with the password scrubbed out."""
        return one_line(exc, self._secrets)

    def _fatal(self, message: str) -> DestinationError:
        """The error that ends a run, its line also put in the run's log file (the CLI prints it on stderr)."""
        FATAL.error("%s", message)
        return DestinationError(message)

    @property
    def conn(self) -> psycopg.Connection[Any]:
        """The open connection (for tests and tools that want to query the destination directly)."""
        if self._conn is None:
            raise DestinationError(f"{self.description} is closed")
        return self._conn

    def _lock_session(self, wait: bool) -> None:
        if wait:
            self.conn.execute("SELECT pg_advisory_lock(%s)", [self._lock_key])
            self._locked = True
            return
        got = self.conn.execute("SELECT pg_try_advisory_lock(%s)", [self._lock_key]).fetchone()
        if not (got and got[0]):
            raise DestinationBusyError(f"{self.description} is busy: another run holds its lock")
        self._locked = True

    def _create_tables(self, create: bool = True) -> None:
        exists = self.conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL AND to_regclass(%s) IS NOT NULL",
            [f"{quote(self.schema)}.events", f"{quote(self.schema)}.{LEDGER_TABLE}"],
        ).fetchone()
        if exists and exists[0]:
            self._add_ledger_columns(alter=create)  # already there: needs no CREATE privilege on the database
        elif not create:
            raise DestinationError(f"{self.description} holds no amplitude-export tables yet: run a load first")
        else:
            self._make_tables()
        # an `events` made before, or by a user before the first load, may type columns otherwise
        types = self._event_types()
        if create:
            self._retype_columns(types)
        self._jsonb = frozenset(name for name in JSON_COLUMNS if types.get(name) == "jsonb")

    def _make_tables(self) -> None:
        """Create what is missing of the schema, `events` and the ledger (an existing `events` is kept as it is)."""
        event_columns = sql.SQL(", ").join(
            sql.SQL("{} {}").format(
                sql.Identifier(c.name), sql.SQL(POSTGRES_TYPES[c.kind] + _COLLATE.get(c.name, ""))
            )
            for c in ALL_COLUMNS
        )
        ledger = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind)) for name, kind in ledger_columns("postgres")
        )
        with self.conn.transaction():
            # only when missing: CREATE SCHEMA, even IF NOT EXISTS, needs CREATE on the database, and a role with
            # USAGE and CREATE on an existing schema must be able to make the tables
            if not self.conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", [self.schema]).fetchone():
                self.conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            self.conn.execute(
                # UNIQUE rather than PRIMARY KEY: a primary key forbids NULL, and real exports have events
                # without a uuid (kept, not dropped; see docs/SCHEMA.md). ON CONFLICT (uuid) works the same.
                sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, UNIQUE (uuid))").format(
                    self._events, event_columns
                )
            )
            # a window's reload deletes by upload hour
            self.conn.execute(
                sql.SQL("CREATE INDEX IF NOT EXISTS events_upload_hour ON {} (_project, _upload_hour)").format(
                    self._events
                )
            )
            self.conn.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY (project, hour))").format(
                    self._ledger, ledger
                )
            )

    def _add_ledger_columns(self, *, alter: bool) -> None:
        """Add the columns a ledger made by an older version lacks; a read-only open reads them as NULL."""
        present = [row[0] for row in self.conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
            [self.schema, LEDGER_TABLE],
        ).fetchall()]
        missing = missing_columns(present)
        if not alter:
            self._ledger_missing = set(missing)
            return
        for name in missing:  # only when missing: ALTER TABLE needs to own the table
            self.conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                self._ledger, sql.Identifier(name), sql.SQL(column_type(name, "postgres"))))

    def _event_types(self) -> dict[str, str]:
        """`events`' column types by name, as information_schema spells them (`jsonb`, `text`, ...)."""
        return dict(self.conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = 'events'", [self.schema]).fetchall())

    def _retype_columns(self, types: dict[str, str]) -> None:
        """Migrate the columns of an older version's `events` whose kind changed (schema.RETYPED), each in one
        transaction: old values that do not fit go to `_extra`, and values `_extra` kept that fit come back.
        `_extra` is worked on as jsonb and stored back as its own type (`json` or `jsonb`)."""
        extra = sql.SQL("json" if types.get("_extra") == "json" else "jsonb")
        for name, old in RETYPED.items():
            if types.get(name) != POSTGRES_TYPES[old]:
                continue
            new = POSTGRES_TYPES[next(c.kind for c in ALL_COLUMNS if c.name == name)]
            column = sql.Identifier(name)
            with self.conn.transaction():
                self.conn.execute(sql.SQL(
                    "UPDATE {} SET _extra = (coalesce(_extra::jsonb, '{{}}') || jsonb_build_object({}, {}))::{} "
                    "WHERE {} IS NOT NULL").format(self._events, sql.Literal(name), column, extra, column))
                self.conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {} USING NULL").format(
                    self._events, column, sql.SQL(new)))
                self.conn.execute(sql.SQL(
                    "UPDATE {} SET {} = (_extra->>{})::{}, _extra = NULLIF(_extra::jsonb - {}, '{{}}')::{} "
                    "WHERE jsonb_typeof(_extra::jsonb->{}) = {}").format(
                    self._events, column, sql.Literal(name), sql.SQL(new), sql.Literal(name), extra,
                    sql.Literal(name), sql.Literal(new)))

    def projects(self) -> list[str]:
        """The projects the ledger holds hours for, or that have stream tables, sorted."""
        query = sql.SQL("SELECT DISTINCT project FROM {}").format(self._ledger)
        try:
            hours = {row[0] for row in self.conn.execute(query).fetchall()}
            return sorted(hours | state_projects(self.conn, self.schema))
        except psycopg.Error as exc:
            raise DestinationError(f"{self.description}: cannot read the ledger: {self._message(exc)}") from None

    def ledger(self, project: str) -> dict[datetime, HourRecord]:
        """Every hour the destination has a ledger row for, for this project."""
        query = sql.SQL("SELECT {} FROM {} WHERE project = %s ORDER BY hour").format(
            sql.SQL(", ").join(
                sql.SQL("NULL") if name in self._ledger_missing else sql.Identifier(name) for name in LEDGER_NAMES[1:]
            ),
            self._ledger,
        )
        try:
            rows = self.conn.execute(query, [project]).fetchall()
        except psycopg.Error as exc:
            raise DestinationError(
                f"{self.description}: cannot read the ledger: {self._message(exc)}"
            ) from None
        records = [record_from_values(LEDGER_NAMES[1:], row) for row in rows]
        return {record.hour: record for record in records}

    def write_window(
        self,
        project: str,
        window: Window,
        read: WindowRead,
    ) -> list[HourRecord]:
        """Replace the window's hours with `batches`, first row per uuid, and record them, in one transaction."""
        conn = self.conn
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [self._lock_key])
                conn.execute(sql.SQL("SET LOCAL work_mem = {}").format(sql.Literal(self._work_mem)))
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE _project = %s AND _upload_hour BETWEEN %s AND %s").format(
                        self._events
                    ),
                    [project, window.start, window.end],
                )
                first = FirstCopies(self._seen_limit, self._nearby_uuids(conn, project, window))
                load = WindowLoad(conn, self._events, window, first, self.chunk_bytes, self._jsonb)
                load.send(with_project(read.batches, project))
                self.route = load.route
                load.merge()
                records = read.hour_records()
                check_records(window, load.staged, records)
                records = fill_counts(records, load.staged, load.inserted, self._now())
                self._upsert(conn, project, records)
        except psycopg.Error as exc:
            raise self._fatal(
                f"{self.description}: cannot write window {window}: {self._message(exc)}"
            ) from None
        return records

    def _nearby_uuids(self, conn: psycopg.Connection[Any], project: str, window: Window) -> pa.Array:
        """The project's uuids `NEARBY` hours either side of the window (its own hours were just emptied), which
        the index on (_project, _upload_hour) finds without reading other hours."""
        query = sql.SQL(
            "SELECT uuid FROM {} WHERE _project = %s AND _upload_hour BETWEEN %s AND %s AND uuid IS NOT NULL"
        ).format(self._events)
        rows = conn.execute(query, [project, window.start - NEARBY, window.end + NEARBY]).fetchall()
        return pa.array([row[0] for row in rows], pa.string())

    def _upsert(self, conn: psycopg.Connection[Any], project: str, records: list[HourRecord]) -> None:
        updates = sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(name)) for name in LEDGER_NAMES[2:]
        )
        statement = sql.SQL(
            "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (project, hour) DO UPDATE SET {}"
        ).format(
            self._ledger,
            sql.SQL(", ").join(map(sql.Identifier, LEDGER_NAMES)),
            sql.SQL(", ").join(sql.Placeholder() * len(LEDGER_NAMES)),
            updates,
        )
        rows = [record_values(project, record, Jsonb) for record in records]
        with conn.cursor() as cursor:
            cursor.executemany(statement, rows)

    def record_hours(self, project: str, records: list[HourRecord]) -> None:
        """Store ledger rows for hours without events (empty, failed, too large); `events` is not touched."""
        now = self._now()
        records = [record if record.updated_at else replace(record, updated_at=now) for record in records]
        try:
            with self.conn.transaction():
                self.conn.execute("SELECT pg_advisory_xact_lock(%s)", [self._lock_key])
                self._upsert(self.conn, project, records)
        except psycopg.Error as exc:
            raise self._fatal(f"{self.description}: cannot record hours: {self._message(exc)}") from None

    def read_arrow(
        self, start: datetime | None = None, end: datetime | None = None, project: str | None = None
    ) -> pa.Table:
        """Stored events with `server_upload_time` in [start, end], typed as ARROW_SCHEMA, in load order."""
        where = sql.SQL(
            "WHERE ({start}::timestamptz IS NULL OR server_upload_time >= {start})"
            " AND ({end}::timestamptz IS NULL OR server_upload_time <= {end})"
            " AND ({project}::text IS NULL OR _project = {project})"
        ).format(start=sql.Literal(start), end=sql.Literal(end), project=sql.Literal(project))
        query = sql.SQL(
            "COPY (SELECT {} FROM {} {} ORDER BY _upload_hour, _member, _line, uuid) TO STDOUT (FORMAT csv)"
        ).format(sql.SQL(", ").join(map(sql.Identifier, COLUMN_NAMES)), self._events, where)
        try:
            return copy_to_table(self.conn, query, ARROW_SCHEMA)
        except psycopg.Error as exc:
            raise DestinationError(f"{self.description}: cannot read events: {self._message(exc)}") from None

    def count_by_hour(self, project: str) -> dict[datetime, int]:
        """Rows of `project` stored per `_upload_hour` (what `verify` compares with the ledger)."""
        query = sql.SQL("SELECT _upload_hour, count(*) FROM {} WHERE _project = %s GROUP BY 1").format(
            self._events
        )
        try:
            return {hour: n for hour, n in self.conn.execute(query, [project]).fetchall()}
        except psycopg.Error as exc:
            raise DestinationError(f"{self.description}: cannot count events: {self._message(exc)}") from None

    def deletion_records(self, project: str) -> list[DeletionRecord]:
        """The deletion jobs applied to `project`, by day (`_amplitude_deletions`)."""
        try:
            return deletion_records(self.conn, self.schema, project)
        except psycopg.Error as exc:
            raise DestinationError(f"{self.description}: cannot read the deletions: {self._message(exc)}") from None

    def delete_users(self, project: str, amplitude_ids: list[int], record: DeletionRecord) -> DeletionRecord:
        """Delete every row of `amplitude_ids` of `project` from `events` (their hours' ledger counts follow) and
        from `cohort_members` where that table exists, and store `record` with the rows counted, atomically."""
        try:
            with self.conn.transaction():
                self.conn.execute("SELECT pg_advisory_xact_lock(%s)", [self._lock_key])
                return delete_users(self.conn, self.schema, project, amplitude_ids, record)
        except psycopg.Error as exc:
            raise self._fatal(f"{self.description}: cannot apply deletion job {record.day}: "
                              f"{self._message(exc)}") from None

    def write_table(self, project: str, write: TableWrite) -> TableState:
        """Replace the project's rows of a stream's table in scope and store its state, in one transaction."""
        try:
            with self.conn.transaction():
                self.conn.execute("SELECT pg_advisory_xact_lock(%s)", [self._lock_key])
                return write_table(self.conn, self.schema, project, write, self._now())
        except psycopg.Error as exc:
            raise self._fatal(f"{self.description}: cannot write {write.table}: {self._message(exc)}") from None

    def table_states(self, project: str) -> dict[str, TableState]:
        """The state of each stream table of `project`, by table name."""
        return table_states(self.conn, self.schema, project)

    def read_table(self, name: str, schema: pa.Schema, project: str | None = None) -> pa.Table:
        """A stream table's rows (of one project, or all) as `schema` with `_project` first."""
        return read_table(self.conn, self.schema, name, schema, project)

    def read_batches(self, columns: Sequence[str] | None = None, *, project: str | None = None) -> pa.RecordBatchReader:
        """The stored events (of one project, or all), only `columns`, in no particular order, streamed through a
        temporary file (`postgres_read.copy_to_stream`)."""
        from ..schema import arrow_schema

        schema = arrow_schema(columns)
        query = sql.SQL("COPY (SELECT {} FROM {} WHERE {project}::text IS NULL OR _project = {project}) "
                        "TO STDOUT (FORMAT csv)").format(
            sql.SQL(", ").join(map(sql.Identifier, schema.names)), self._events, project=sql.Literal(project))
        try:
            return copy_to_stream(self.conn, query, schema)
        except psycopg.Error as exc:
            raise DestinationError(f"{self.description}: cannot read events: {self._message(exc)}") from None

    def close(self) -> None:
        """Release the session lock and close the connection; safe to call twice.

        The lock is released by name first: the server would release it only once its backend notices the closed
        connection and exits, so a run started right after this one could still find it held (exit 5)."""
        if self._conn is not None:
            try:
                # not inside a window's transaction: its rollback must end before another run can lock
                idle = self._conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                if self._locked and not self._conn.closed and idle:
                    self._conn.execute("SELECT pg_advisory_unlock(%s)", [self._lock_key])
            except psycopg.Error:
                pass  # a broken connection: the server releases the lock as its backend ends
            finally:
                self._locked = False
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["MAX_CONFLICTS", "NEARBY", "PostgresSink", "escape_json_text", "redact"]

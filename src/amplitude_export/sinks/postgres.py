"""PostgreSQL destination: `events` and `_amplitude_ledger` in one schema, one transaction per window.

A sink holds a session-level advisory lock on its destination (database + schema) for its whole life, so two
runs never interleave windows; each write also takes the transaction-scoped lock, so any writer that does not
hold the session lock still cannot commit between our delete and our insert. Batches reach the server by binary
COPY (see `encode_binary`) straight into `events`, a chunk at a time under a savepoint; a chunk that meets a uuid
stored under another hour goes to a temporary staging table instead, merged with `ON CONFLICT (uuid) DO NOTHING`
(`_WindowLoad`). See docs/POSTGRES.md.

jsonb refuses `\\u0000` and lone UTF-16 surrogate escapes, and text refuses the NUL character. Rather than lose
such a row, the sink stores the offending escape or character as literal text (`\\u0000`), which is documented.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Self
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import numpy as np
import psycopg
import psycopg.rows
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.copy import QueuedLibpqWriter
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from ..errors import DestinationBusyError, DestinationError, UsageError
from ..ledger import DeletionRecord, HourRecord, MemberInfo
from ..logs import FATAL
from ..schema import (
    ALL_COLUMNS,
    ARROW_SCHEMA,
    COLUMN_NAMES,
    COMPILED_KINDS,
    JSON_COLUMNS,
    POSTGRES_TYPES,
    RETYPED,
    quote,
)
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
from ..windows import Window
from . import SEEN_LIMIT, FirstCopies, WindowRead, with_project

try:  # the compiled helpers (built by `pip install` where a C compiler is at hand); optional
    from .. import _fastparse
except ImportError:  # pragma: no cover - depends on the environment
    _fastparse = None  # type: ignore[assignment]

DEFAULT_SCHEMA = "amplitude"
LEDGER_TABLE = "_amplitude_ledger"
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
_STAGE = "_amplitude_stage"
_LEDGER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("project", "text NOT NULL"),
    ("hour", "timestamptz NOT NULL"),
    ("status", "text NOT NULL"),
    ("reason", "text"),
    ("members", "jsonb NOT NULL DEFAULT '[]'"),
    ("content_hash", "text"),
    ("lines_read", "bigint NOT NULL DEFAULT 0"),
    ("events_loaded", "bigint NOT NULL DEFAULT 0"),
    ("duplicates", "bigint NOT NULL DEFAULT 0"),
    ("rejects", "bigint NOT NULL DEFAULT 0"),
    ("bytes", "bigint NOT NULL DEFAULT 0"),
    ("min_server_upload_time", "timestamptz"),
    ("max_server_upload_time", "timestamptz"),
    ("min_event_time", "timestamptz"),
    ("max_event_time", "timestamptz"),
    ("attempts", "integer NOT NULL DEFAULT 1"),
    ("split_from", "text"),
    ("run_id", "text"),
    ("updated_at", "timestamptz"),
)
_LEDGER_NAMES = tuple(name for name, _ in _LEDGER_COLUMNS)
# Columns added after the first release: a ledger created before them gets them (NULL in old rows) on open.
_ADDED_LEDGER_COLUMNS = ("split_from",)

# An escape jsonb refuses (\u0000, a lone surrogate), a valid surrogate pair (kept), and the run of backslashes
# before it: only an odd run makes it an escape rather than literal text.
_JSON_ESCAPE = re.compile(
    r"(\\+)(u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|u0000|u[dD][89a-fA-F][0-9a-fA-F]{2})"
)
_JSON_SUSPECT = r"\\u(0000|[dD][89a-fA-F])"
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^@/?#]*)@")
_PASSWORD_PARAM = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)
_SUSPECT_BYTES = re.compile(rb"\\u(0000|[dD][89a-fA-F])")
COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # binary COPY header: signature, no flags, no extension
_PG_EPOCH_US = 946_684_800_000_000  # PostgreSQL counts timestamps from 2000-01-01 UTC
_EMPTY = pa.scalar(b"", pa.binary())
_JSONB_VERSION = pa.scalar(b"\x01", pa.binary())
# byte order: uuids and project names need no locale, and the key, the hour index and sorts get faster
_COLLATE = {"uuid": ' COLLATE "C"', "_project": ' COLLATE "C"'}
_ZONED = pa.timestamp("us", tz="UTC")
_COPY_KINDS = [COMPILED_KINDS[column.kind] for column in ALL_COLUMNS]  # the compiled encoder's codes
# A window's rows go straight into `events`, a chunk at a time, each chunk under a savepoint: a chunk that meets a
# uuid stored under another hour is rolled back and re-sent to the stage, so the chunk size bounds what a conflict
# wastes and the rows held for re-sending. Past 64 subtransactions other sessions' snapshots get slower, so a
# window opens fewer; after a few conflicts the rest of the window goes to the stage directly.
CHUNK_BYTES = 64 << 20
MAX_SAVEPOINTS = 48
MAX_CONFLICTS = 2
# An event Amplitude received again lands in a later upload hour, usually a near one: the uuids the project holds
# this many hours either side of a window are dropped on the way in, so such a repeat makes no chunk conflict.
NEARBY = timedelta(hours=6)


def split_schema(url: str) -> tuple[str, str | None]:
    """`url` without our own `schema=` query parameter (libpq would refuse it), and that parameter's value."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url, None  # libpq says what is wrong with it
    params = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for key, value in params if key == "schema"]
    if not schemas:
        return url, None
    if not schemas[-1]:
        raise UsageError("the destination's schema= parameter is empty")
    query = urlencode([(key, value) for key, value in params if key != "schema"])
    return urlunsplit(parts._replace(query=query)), schemas[-1]


def check_url(url: str) -> None:
    """Refuse, as bad input (exit 2), a URL libpq cannot parse or whose port is not a port number.

    libpq only checks the port when it connects, where its complaint would look like an unreachable server.
    """
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise UsageError(f"cannot read the PostgreSQL URL {redact(url)}: {_one_line(exc, _secrets(url))}") from None
    for port in str(params.get("port") or "").split(","):  # one port per host, empty for the default
        port = port.strip()
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise UsageError(f"the PostgreSQL URL {redact(url)} has port {port!r}: use a number from 1 to 65535")


def _one_line(exc: BaseException, secrets: list[str]) -> str:
    """`exc`'s text on one line, with the `secrets` (see `_secrets`) scrubbed out."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def redact(url: str) -> str:
    """`url` without its password (in the user info or a `password=` parameter), safe for any message."""
    url = _USERINFO.sub(lambda m: f"{m.group(1)}{m.group(2).split(':', 1)[0]}@", url, count=1)
    return _PASSWORD_PARAM.sub(r"\1***", url)


def _secrets(url: str) -> list[str]:
    """Every spelling of the password in `url`, to scrub from server and driver messages."""
    found: list[str] = []
    match = _USERINFO.match(url)
    if match and ":" in match.group(2):
        found.append(match.group(2).split(":", 1)[1])
    found += [m.group(0).split("=", 1)[1] for m in _PASSWORD_PARAM.finditer(url)]
    found += [unquote(s) for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)


def escape_json_text(text: str) -> str:
    """`text` with every escape jsonb refuses turned into literal text (`\\u0000` -> `\\\\u0000`)."""

    def fix(match: re.Match[str]) -> str:
        slashes, escape = match.groups()
        if len(slashes) % 2 == 0 or len(escape) > 5:  # literal backslashes, or a valid surrogate pair
            return match.group(0)
        return "\\" + match.group(0)

    return _JSON_ESCAPE.sub(fix, text.replace("\x00", "\\\\u0000"))


def _clean_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch with the NULs and escapes PostgreSQL refuses made literal text."""
    columns = batch.columns
    for index, field in enumerate(batch.schema):
        if field.type != pa.string():
            continue
        column = columns[index]
        if field.name in JSON_COLUMNS:
            if pc.any(pc.match_substring_regex(column, _JSON_SUSPECT + r"|\x00")).as_py():
                columns[index] = pa.array(
                    [escape_json_text(v) if v else v for v in column.to_pylist()], pa.string()
                )
        elif pc.any(pc.match_substring(column, "\x00")).as_py():
            columns[index] = pc.replace_substring(column, "\x00", "\\u0000")
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema)


def _needs_cleaning(batch: pa.RecordBatch) -> bool:
    """Whether any string holds a NUL or a JSON escape jsonb refuses: a scan of raw bytes, cheap when none do."""
    for field, column in zip(batch.schema, batch.columns, strict=True):
        data = column.buffers()[2] if field.type == pa.string() else None
        if data is None:
            continue
        raw = data.to_pybytes()
        if b"\x00" in raw or (field.name in JSON_COLUMNS and b"\\u" in raw and _SUSPECT_BYTES.search(raw)):
            return True
    return False


def _fixed_size(values: np.ndarray, width: int) -> pa.Array:
    """Big-endian `values` as Arrow binary strings of `width` bytes each."""
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(values), [None, pa.py_buffer(values)])
    return fixed.cast(pa.binary())


def _field(column: pa.Array, values: np.ndarray, width: int) -> list[pa.Array]:
    """A fixed-width column's COPY fields: length then value, or the length -1 alone for NULL."""
    valid = column.is_valid()
    lengths = np.where(valid.to_numpy(zero_copy_only=False), width, -1).astype(">i4")
    return [_fixed_size(lengths, 4), pc.if_else(valid, _fixed_size(values, width), _EMPTY)]


def encode_binary(batch: pa.RecordBatch, first_seq: int | None) -> pa.Buffer:
    """One batch as binary COPY rows (no file header) in ARROW_SCHEMA's order, numbered from `first_seq` in a
    last bigint field (no such field when `first_seq` is None).

    Each column becomes Arrow binary arrays of per-row fields, and one element-wise join in Arrow's C++ lays
    them out row by row, so no Python loop touches a row. Binary COPY saves the server about half of CSV's
    parsing; jsonb's binary form is a version byte and the JSON text.
    """
    if not batch.schema.equals(ARROW_SCHEMA):
        batch = batch.select(list(COLUMN_NAMES)).cast(ARROW_SCHEMA)
    if _needs_cleaning(batch):
        batch = _clean_batch(batch)
    if _fastparse is not None:  # the same bytes, written in one pass by compiled code (tests compare the two)
        columns = []
        for code, column in zip(_COPY_KINDS, batch.columns, strict=True):
            buffers = column.buffers()
            columns.append((code, buffers[0], buffers[1], buffers[2] if len(buffers) > 2 else None, column.offset))
        return pa.py_buffer(_fastparse.encode_copy(columns, batch.num_rows, -1 if first_seq is None else first_seq))
    return _encode_with_arrow(batch, first_seq)


def _encode_with_arrow(batch: pa.RecordBatch, first_seq: int | None) -> pa.Buffer:
    """`encode_binary` without the compiled encoder: each column as Arrow binary arrays of per-row fields."""
    n = batch.num_rows
    fields = len(COLUMN_NAMES) + (first_seq is not None)
    parts: list[pa.Array] = [_fixed_size(np.full(n, fields, ">i2"), 2)]
    for field, column in zip(ARROW_SCHEMA, batch.columns, strict=True):
        kind = field.type
        if kind == pa.string():
            is_json = field.name in JSON_COLUMNS
            lengths = pc.binary_length(column)
            lengths = pc.add(lengths, 1) if is_json else lengths
            parts.append(_fixed_size(lengths.fill_null(-1).to_numpy(zero_copy_only=False).astype(">i4"), 4))
            if is_json:
                parts.append(pc.if_else(column.is_valid(), _JSONB_VERSION, _EMPTY))
            parts.append(column.cast(pa.binary()).fill_null(b""))
        elif kind == _ZONED:
            micros = column.cast(pa.int64()).fill_null(0).to_numpy() - _PG_EPOCH_US
            parts += _field(column, micros.astype(">i8"), 8)
        elif kind == pa.int64():
            parts += _field(column, column.fill_null(0).to_numpy().astype(">i8"), 8)
        elif kind == pa.float64():
            parts += _field(column, column.fill_null(0).to_numpy().astype(">f8"), 8)
        elif kind == pa.bool_():
            parts += _field(column, column.fill_null(False).to_numpy(zero_copy_only=False).astype("u1"), 1)
        else:
            raise TypeError(f"no binary COPY encoding for {field}")
    if first_seq is not None:
        parts += [
            _fixed_size(np.full(n, 8, ">i4"), 4),
            _fixed_size(np.arange(first_seq, first_seq + n, dtype=">i8"), 8),
        ]
    rows = pc.binary_join_element_wise(*parts, _EMPTY)
    offsets = np.frombuffer(rows.buffers()[1], np.int32)
    return rows.buffers()[2][offsets[rows.offset] : offsets[rows.offset + n]]


class _WindowLoad:
    """Sends one window's rows to the server inside the window's transaction (the caller deletes its hours first).

    Rows go by binary COPY straight into `events`, `chunk_bytes` of encoded rows at a time, each chunk under a
    savepoint, so the rows need no second pass through a stage. That is safe because `first` drops the window's
    repeated uuids before they are sent, and the rows the window's reload deleted no longer conflict. A uuid
    stored under another hour or project still makes the COPY fail (UNIQUE): the chunk is rolled back to its
    savepoint and its rows (held until the chunk commits) are sent to the stage, which `_insert` merges with
    `ON CONFLICT (uuid) DO NOTHING`, so the stored row wins as before. Once `first` overflows, rows pass with
    their repeats: from then on all go to the stage, where the merge keeps the first copy of each uuid by `_seq`
    (every earlier row, in `events` already, wins over a later one by the conflict).
    """

    def __init__(self, conn: psycopg.Connection[Any], events: sql.Identifier, first: FirstCopies, chunk_bytes: int):
        self.conn = conn
        self.events = events
        self.first = first
        self.chunk_bytes = chunk_bytes
        self.staged: Counter[datetime] = Counter()  # rows per upload hour the batches held
        self.inserted: Counter[datetime] = Counter()  # rows per upload hour committed straight into `events`
        self.route: Counter[str] = Counter()  # rows sent "direct" and to the "stage"; chunks that "conflicted"
        self.stage_rows = 0
        self._savepoints = 0
        self._stage_made = False

    def send(self, batches: Iterable[pa.RecordBatch]) -> None:
        parts = self._parts(batches)
        pending = next(parts, None)
        while pending is not None:
            direct = self.route["conflicted"] < MAX_CONFLICTS and self._savepoints < MAX_SAVEPOINTS
            if not direct or self.first.overflowed:
                self._to_stage(itertools.chain([pending], parts))
                return
            pending = self._chunk(pending, parts)

    def _parts(self, batches: Iterable[pa.RecordBatch]) -> Iterator[tuple[pa.RecordBatch, int]]:
        """Each batch without the repeats `first` drops, and the `_seq` of its first row (arrival order)."""
        seq = 0
        for batch in batches:
            if batch.num_rows == 0:
                continue
            for item in pc.value_counts(batch.column("_upload_hour")).to_pylist():
                self.staged[item["values"]] += item["counts"]
            part = self.first.filter(batch)
            if part.num_rows:
                yield part, seq
                seq += part.num_rows

    def _copy(self, table: sql.Composable, numbered: bool) -> Any:
        columns = (*COLUMN_NAMES, "_seq") if numbered else COLUMN_NAMES
        statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(
            table, sql.SQL(", ").join(map(sql.Identifier, columns))
        )
        cursor = self.conn.cursor()
        # a queue and a thread send to the server while the next batch is encoded: the two overlap on two cores
        return cursor.copy(statement, writer=QueuedLibpqWriter(cursor))

    def _chunk(
        self, first_part: tuple[pa.RecordBatch, int], parts: Iterator[tuple[pa.RecordBatch, int]]
    ) -> tuple[pa.RecordBatch, int] | None:
        """COPY parts into `events` under a savepoint until `chunk_bytes`; the part that starts the next chunk."""
        held = [first_part]  # re-sent to the stage if the chunk conflicts
        following = None
        self._savepoints += 1
        try:
            with self.conn.transaction(), self._copy(self.events, numbered=False) as copy:
                copy.write(COPY_SIGNATURE)
                size = 0
                for index, (part, seq) in enumerate(itertools.chain([first_part], parts)):
                    if index and (self.first.overflowed or size >= self.chunk_bytes):
                        following = (part, seq)
                        break
                    if index:
                        held.append((part, seq))
                    data = encode_binary(part, None)
                    copy.write(data)
                    size += data.size
        except psycopg.errors.UniqueViolation:
            self.route["conflicted"] += 1
            self._to_stage(held)
            return following
        for part, _ in held:
            self.route["direct"] += part.num_rows
            for item in pc.value_counts(part.column("_upload_hour")).to_pylist():
                self.inserted[item["values"]] += item["counts"]
        return following

    def _to_stage(self, parts: Iterable[tuple[pa.RecordBatch, int]]) -> None:
        stage = sql.Identifier(_STAGE)
        if not self._stage_made:
            self.conn.execute(
                sql.SQL("CREATE TEMP TABLE {} (LIKE {}, _seq bigint) ON COMMIT DROP").format(stage, self.events)
            )
            self._stage_made = True
        with self._copy(stage, numbered=True) as copy:
            copy.write(COPY_SIGNATURE)
            for part, seq in parts:
                copy.write(encode_binary(part, seq))
                self.route["stage"] += part.num_rows
                self.stage_rows += part.num_rows


class PostgresSink:
    """Events and the ledger in a PostgreSQL schema; see the module docstring for locking and loading."""

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
        self._secrets = _secrets(url)
        self._work_mem = work_mem
        self._seen_limit = seen_limit  # uuids a window dedups in memory before the merge has to sort
        self._now = now or (lambda: datetime.now(UTC))
        self._conn: psycopg.Connection[Any] | None = None
        self._events = sql.Identifier(schema, "events")
        self._ledger = sql.Identifier(schema, LEDGER_TABLE)
        self._ledger_missing: set[str] = set()  # added columns an older ledger lacks (read-only opens only)
        self.chunk_bytes = CHUNK_BYTES
        self.route: Counter[str] = Counter()  # the last window's rows by way in (`_WindowLoad.route`)
        try:
            self._conn = psycopg.connect(
                url, autocommit=True, connect_timeout=connect_timeout, application_name="amplitude-export"
            )
        except psycopg.Error as exc:
            raise self._fatal(f"cannot open {self.description}: {self._message(exc)}") from None
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
        return _one_line(exc, self._secrets)

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
            return
        got = self.conn.execute("SELECT pg_try_advisory_lock(%s)", [self._lock_key]).fetchone()
        if not (got and got[0]):
            raise DestinationBusyError(f"{self.description} is busy: another run holds its lock")

    def _create_tables(self, create: bool = True) -> None:
        exists = self.conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL AND to_regclass(%s) IS NOT NULL",
            [f"{quote(self.schema)}.events", f"{quote(self.schema)}.{LEDGER_TABLE}"],
        ).fetchone()
        if exists and exists[0]:
            self._add_ledger_columns(alter=create)
            if create:
                self._retype_columns()
            return  # already there: needs no CREATE privilege on the database
        if not create:
            raise DestinationError(f"{self.description} holds no amplitude-export tables yet: run a load first")
        event_columns = sql.SQL(", ").join(
            sql.SQL("{} {}").format(
                sql.Identifier(c.name), sql.SQL(POSTGRES_TYPES[c.kind] + _COLLATE.get(c.name, ""))
            )
            for c in ALL_COLUMNS
        )
        ledger_columns = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind)) for name, kind in _LEDGER_COLUMNS
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
                    self._ledger, ledger_columns
                )
            )

    def _add_ledger_columns(self, *, alter: bool) -> None:
        """Add the columns a ledger made by an older version lacks; a read-only open reads them as NULL."""
        present = {row[0] for row in self.conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
            [self.schema, LEDGER_TABLE],
        ).fetchall()}
        missing = [name for name in _ADDED_LEDGER_COLUMNS if name not in present]
        if not alter:
            self._ledger_missing = set(missing)
            return
        kinds = dict(_LEDGER_COLUMNS)
        for name in missing:  # only when missing: ALTER TABLE needs to own the table
            self.conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                self._ledger, sql.Identifier(name), sql.SQL(kinds[name])))

    def _retype_columns(self) -> None:
        """Migrate the columns of an older version's `events` whose kind changed (schema.RETYPED), each in one
        transaction: old values that do not fit go to `_extra`, and values `_extra` kept that fit come back."""
        types = dict(self.conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = 'events'", [self.schema]).fetchall())
        for name, old in RETYPED.items():
            if types.get(name) != POSTGRES_TYPES[old]:
                continue
            new = POSTGRES_TYPES[next(c.kind for c in ALL_COLUMNS if c.name == name)]
            column = sql.Identifier(name)
            with self.conn.transaction():
                self.conn.execute(sql.SQL(
                    "UPDATE {} SET _extra = coalesce(_extra, '{{}}'::jsonb) || jsonb_build_object({}, {}) "
                    "WHERE {} IS NOT NULL").format(self._events, sql.Literal(name), column, column))
                self.conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {} USING NULL").format(
                    self._events, column, sql.SQL(new)))
                self.conn.execute(sql.SQL(
                    "UPDATE {} SET {} = (_extra->>{})::{}, _extra = NULLIF(_extra - {}, '{{}}'::jsonb) "
                    "WHERE jsonb_typeof(_extra->{}) = {}").format(
                    self._events, column, sql.Literal(name), sql.SQL(new), sql.Literal(name), sql.Literal(name),
                    sql.Literal(new)))

    def projects(self) -> list[str]:
        """The projects the ledger holds hours for, sorted."""
        query = sql.SQL("SELECT DISTINCT project FROM {} ORDER BY 1").format(self._ledger)
        try:
            return [row[0] for row in self.conn.execute(query).fetchall()]
        except psycopg.Error as exc:
            raise DestinationError(f"{self.description}: cannot read the ledger: {self._message(exc)}") from None

    def ledger(self, project: str) -> dict[datetime, HourRecord]:
        """Every hour the destination has a ledger row for, for this project."""
        query = sql.SQL("SELECT {} FROM {} WHERE project = %s ORDER BY hour").format(
            sql.SQL(", ").join(
                sql.SQL("NULL") if name in self._ledger_missing else sql.Identifier(name) for name in _LEDGER_NAMES[1:]
            ),
            self._ledger,
        )
        try:
            rows = self.conn.execute(query, [project]).fetchall()
        except psycopg.Error as exc:
            raise DestinationError(
                f"{self.description}: cannot read the ledger: {self._message(exc)}"
            ) from None
        records = {}
        for row in rows:
            values = dict(zip(_LEDGER_NAMES[1:], row, strict=True))
            values["members"] = [MemberInfo(**m) for m in values["members"] or []]
            record = HourRecord(**values)
            records[record.hour] = record
        return records

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
                load = _WindowLoad(conn, self._events, first, self.chunk_bytes)
                load.send(with_project(read.batches, project))
                self.route = load.route
                staged = load.staged
                inserted = load.inserted
                if load.stage_rows:
                    inserted.update(self._insert(conn, sort=load.first.overflowed))
                records = read.hour_records()
                self._check_hours(window, staged, records)
                now = self._now()
                records = [
                    replace(
                        record,
                        events_loaded=inserted.get(record.hour, 0),
                        duplicates=staged.get(record.hour, 0) - inserted.get(record.hour, 0),
                        updated_at=now,
                    )
                    for record in records
                ]
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

    def _insert(self, conn: psycopg.Connection[Any], *, sort: bool) -> dict[datetime, int]:
        """Move the staged rows whose uuid `events` lacks into `events`; rows per upload hour actually inserted.

        The stage holds each uuid once unless the window had more uuids than `FirstCopies` keeps (`sort`): only
        then is the stage sorted to pick the first copies (a sort of the whole window: ~1 s per 500 k events).
        """
        columns = sql.SQL(", ").join(map(sql.Identifier, COLUMN_NAMES))
        # NULL uuids are one group to DISTINCT ON: give each its own, as each is an event
        first_copies = sql.SQL(
            " DISTINCT ON (uuid, CASE WHEN uuid IS NULL THEN _seq END) {columns} FROM {stage}"
            " ORDER BY uuid, CASE WHEN uuid IS NULL THEN _seq END, _seq"
        )
        source = (first_copies if sort else sql.SQL(" {columns} FROM {stage}")).format(
            columns=columns, stage=sql.Identifier(_STAGE)
        )
        statement = sql.SQL(
            "WITH inserted AS ("
            " INSERT INTO {events} ({columns}) SELECT{source}"
            " ON CONFLICT (uuid) DO NOTHING RETURNING _upload_hour)"
            " SELECT _upload_hour, count(*) FROM inserted GROUP BY _upload_hour"
        ).format(events=self._events, columns=columns, source=source)
        return {hour: count for hour, count in conn.execute(statement).fetchall()}

    @staticmethod
    def _check_hours(window: Window, staged: Counter[datetime], records: list[HourRecord]) -> None:
        # rows outside the window would survive its next reload, so refuse them before commit
        outside = [hour for hour in staged if hour is None or not window.start <= hour <= window.end]
        if outside:
            raise ValueError(f"window {window}: rows with _upload_hour outside the window: {outside[:3]}")
        missing = set(staged) - {record.hour for record in records}
        if missing:
            raise ValueError(f"window {window}: no ledger record for hours {sorted(missing)[:3]}")

    def _upsert(self, conn: psycopg.Connection[Any], project: str, records: list[HourRecord]) -> None:
        updates = sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(name)) for name in _LEDGER_NAMES[2:]
        )
        statement = sql.SQL(
            "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (project, hour) DO UPDATE SET {}"
        ).format(
            self._ledger,
            sql.SQL(", ").join(map(sql.Identifier, _LEDGER_NAMES)),
            sql.SQL(", ").join(sql.Placeholder() * len(_LEDGER_NAMES)),
            updates,
        )
        rows = []
        for record in records:
            values = asdict(record)
            values["members"] = Jsonb(values["members"])
            rows.append([project, *(values[name] for name in _LEDGER_NAMES[1:])])
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
        buffer = io.BytesIO()
        try:
            with self.conn.cursor().copy(query) as copy:
                for chunk in copy:
                    buffer.write(chunk)
        except psycopg.Error as exc:
            raise DestinationError(f"{self.description}: cannot read events: {self._message(exc)}") from None
        if buffer.tell() == 0:
            return ARROW_SCHEMA.empty_table()
        buffer.seek(0)
        return pacsv.read_csv(buffer, **_csv_options(ARROW_SCHEMA)).cast(ARROW_SCHEMA)

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
        table = sql.Identifier(self.schema, DELETIONS_TABLE)
        try:
            if not self.conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                                     [f"{quote(self.schema)}.{DELETIONS_TABLE}"]).fetchone()[0]:  # type: ignore[index]
                return []
            cursor = self.conn.cursor(row_factory=psycopg.rows.dict_row)
            rows = cursor.execute(sql.SQL("SELECT * FROM {} WHERE project = %s ORDER BY day").format(table),
                                  [project]).fetchall()
        except psycopg.Error as exc:
            raise DestinationError(f"{self.description}: cannot read the deletions: {self._message(exc)}") from None
        return [DeletionRecord.from_dict(row) for row in rows]

    def delete_users(self, project: str, amplitude_ids: list[int], record: DeletionRecord) -> DeletionRecord:
        """Delete every row of `amplitude_ids` of `project` from `events` (their hours' ledger counts follow) and
        from `cohort_members` where that table exists, and store `record` with the rows counted, atomically."""
        table = sql.Identifier(self.schema, DELETIONS_TABLE)
        params = {"project": project, "ids": sorted(set(amplitude_ids))}
        conn = self.conn
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [self._lock_key])
                conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (" + _DELETIONS_COLUMNS + ")").format(table))
                deleted = 0 if not amplitude_ids else conn.execute(sql.SQL(
                    "WITH gone AS (DELETE FROM {events} WHERE _project = %(project)s AND " + _DELETED_ROWS +
                    " RETURNING _upload_hour), counts AS (SELECT _upload_hour AS hour, count(*) AS n FROM gone "
                    "GROUP BY 1), fixed AS (UPDATE {ledger} AS l SET events_loaded = l.events_loaded - counts.n "
                    "FROM counts WHERE l.project = %(project)s AND l.hour = counts.hour RETURNING 1) "
                    "SELECT coalesce(sum(n), 0) FROM counts").format(events=self._events, ledger=self._ledger),
                    params).fetchone()[0]  # type: ignore[index]
                members = self._delete_members(params) if amplitude_ids else 0
                stored = replace(record, rows_deleted=record.rows_deleted + int(deleted),
                                 cohort_rows_deleted=record.cohort_rows_deleted + members)
                values = asdict(stored)
                conn.execute(sql.SQL(
                    "INSERT INTO {} (project, day, status, amplitude_ids, rows_deleted, cohort_rows_deleted, "
                    "applied_at, run_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (project, day) DO UPDATE "
                    "SET status = EXCLUDED.status, amplitude_ids = EXCLUDED.amplitude_ids, "
                    "rows_deleted = EXCLUDED.rows_deleted, cohort_rows_deleted = EXCLUDED.cohort_rows_deleted, "
                    "applied_at = EXCLUDED.applied_at, run_id = EXCLUDED.run_id").format(table),
                    [project, *(values[name] for name in ("day", "status", "amplitude_ids", "rows_deleted",
                                                           "cohort_rows_deleted", "applied_at", "run_id"))])
        except psycopg.Error as exc:
            raise self._fatal(f"{self.description}: cannot apply deletion job {record.day}: "
                              f"{self._message(exc)}") from None
        return stored

    def _delete_members(self, params: dict[str, Any]) -> int:
        """Delete the deleted users' rows of `cohort_members`, if the table exists; how many."""
        columns = {row[0] for row in self.conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
            [self.schema, COHORT_MEMBERS]).fetchall()}
        if "amplitude_id" not in columns:
            return 0
        where = "amplitude_id::text = ANY(%(texts)s)" + (" AND _project = %(project)s" if "_project" in columns else "")
        gone = self.conn.execute(sql.SQL("WITH gone AS (DELETE FROM {} WHERE " + where + " RETURNING 1) "
                                         "SELECT count(*) FROM gone").format(
            sql.Identifier(self.schema, COHORT_MEMBERS)), {**params, "texts": [str(i) for i in params["ids"]]})
        count = int(gone.fetchone()[0])  # type: ignore[index]
        states = self.conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                                   [f"{quote(self.schema)}.{STATE_TABLE}"]).fetchone()
        if count and states and states[0] and "project" in params:  # the table's state counts its rows
            self.conn.execute(sql.SQL("UPDATE {} SET rows = rows - %s WHERE project = %s AND table_name = %s").format(
                sql.Identifier(self.schema, STATE_TABLE)), [count, params["project"], COHORT_MEMBERS])
        return count

    def write_table(self, project: str, write: TableWrite) -> TableState:
        """Replace the project's rows of a stream's table in scope and store its state, in one transaction."""
        conn = self.conn
        table = sql.Identifier(self.schema, write.table)
        states = sql.Identifier(self.schema, STATE_TABLE)
        stored = with_project_column(write.schema)
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [self._lock_key])
                conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY (project, table_name))").format(
                    states, sql.SQL(", ").join(sql.SQL(f"{{}} {kinds[1]}").format(sql.Identifier(name))
                                               for name, kinds in STATE_COLUMNS.items())))
                if write.batches is not None:
                    conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(table, sql.SQL(", ").join(
                        sql.SQL(f"{{}} {sql_type(c, 1)}").format(sql.Identifier(c.name)) for c in stored)))
                    if write.scope_column is None:
                        conn.execute(sql.SQL("DELETE FROM {} WHERE _project = %s").format(table), [project])
                    else:
                        conn.execute(sql.SQL("DELETE FROM {} WHERE _project = %s AND {}::text = ANY(%s)").format(
                            table, sql.Identifier(write.scope_column)),
                            [project, [str(value) for value in write.scope_values]])
                    names = sql.SQL(", ").join(sql.Identifier(c.name) for c in stored)
                    with conn.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN").format(table, names)) as copy:
                        for batch in write.batches:
                            for row in batch.to_pylist():
                                copy.write_row([project, *(row[c.name] for c in write.schema)])
                exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                                      [f"{quote(self.schema)}.{quote(write.table)}"]).fetchone()
                rows = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE _project = %s").format(table),
                                    [project]).fetchone()[0] if exists and exists[0] else 0  # type: ignore[index]
                state = replace(write.state, rows=rows, loaded_at=self._now())
                conn.execute(sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (project, table_name) DO UPDATE "
                                     "SET {}").format(
                    states, sql.SQL(", ").join(map(sql.Identifier, STATE_COLUMNS)),
                    sql.SQL(", ").join(sql.Placeholder() * len(STATE_COLUMNS)),
                    sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(name))
                                       for name in list(STATE_COLUMNS)[2:])),
                    state_values(project, state))
        except psycopg.Error as exc:
            raise self._fatal(f"{self.description}: cannot write {write.table}: {self._message(exc)}") from None
        return state

    def table_states(self, project: str) -> dict[str, TableState]:
        """The state of each stream table of `project`, by table name."""
        states = sql.Identifier(self.schema, STATE_TABLE)
        exists = self.conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                                   [f"{quote(self.schema)}.{STATE_TABLE}"]).fetchone()
        if not (exists and exists[0]):
            return {}
        with self.conn.cursor(row_factory=dict_row) as cursor:
            rows = cursor.execute(sql.SQL("SELECT * FROM {} WHERE project = %s ORDER BY table_name").format(states),
                                  [project]).fetchall()
        return {row["table_name"]: state_from_row(row) for row in rows}

    def read_table(self, name: str, schema: pa.Schema, project: str | None = None) -> pa.Table:
        """A stream table's rows (of one project, or all) as `schema` with `_project` first."""
        stored = with_project_column(schema)
        exists = self.conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                                   [f"{quote(self.schema)}.{quote(name)}"]).fetchone()
        if not (exists and exists[0]):
            return stored.empty_table()
        query = sql.SQL("SELECT {} FROM {} WHERE %s::text IS NULL OR _project = %s").format(
            sql.SQL(", ").join(sql.Identifier(c.name) for c in stored), sql.Identifier(self.schema, name))
        rows = self.conn.execute(query, [project, project]).fetchall()
        json_columns = [i for i, c in enumerate(stored) if is_json(c)]
        columns = [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in stored]
        for index in json_columns:
            columns[index] = [None if v is None else json.dumps(v) for v in columns[index]]
        return pa.table(columns, schema=stored)

    def read_batches(self, columns: Sequence[str] | None = None, *, project: str | None = None) -> pa.RecordBatchReader:
        """The stored events (of one project, or all), only `columns`, in no particular order: copied out as CSV
        into an anonymous temporary file (COPY runs at the server's pace, the file bounds memory), then read back
        in Arrow batches; the file goes when the stream ends."""
        import tempfile

        from ..schema import arrow_schema

        schema = arrow_schema(columns)
        query = sql.SQL("COPY (SELECT {} FROM {} WHERE {project}::text IS NULL OR _project = {project}) "
                        "TO STDOUT (FORMAT csv)").format(
            sql.SQL(", ").join(map(sql.Identifier, schema.names)), self._events, project=sql.Literal(project))
        spool = tempfile.TemporaryFile(prefix="amplitude-export-")
        try:
            with self.conn.cursor().copy(query) as copy:
                for chunk in copy:
                    spool.write(chunk)
            if spool.tell() == 0:
                spool.close()
                return schema.empty_table().to_reader()
            spool.seek(0)
            stream = pacsv.open_csv(spool, **_csv_options(schema))
        except psycopg.Error as exc:
            spool.close()
            raise DestinationError(f"{self.description}: cannot read events: {self._message(exc)}") from None
        except BaseException:
            spool.close()
            raise

        def batches() -> Iterator[pa.RecordBatch]:
            with spool:
                for batch in stream:
                    yield batch.cast(schema)

        return pa.RecordBatchReader.from_batches(schema, batches())

    def close(self) -> None:
        """Close the connection, which releases the session lock; safe to call twice."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _csv_options(schema: pa.Schema) -> dict[str, Any]:
    """How pyarrow reads the CSV that `COPY ... (FORMAT csv)` writes of `schema`'s columns, typed as `schema`."""
    return {
        "read_options": pacsv.ReadOptions(column_names=schema.names),
        "convert_options": pacsv.ConvertOptions(
            column_types={field.name: field.type for field in schema},
            true_values=["t"],
            false_values=["f"],
            # only an unquoted empty field is NULL: "" is text, and "NA" or "null" are values, not Arrow's defaults
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    }


__all__ = ["PostgresSink", "escape_json_text", "redact"]

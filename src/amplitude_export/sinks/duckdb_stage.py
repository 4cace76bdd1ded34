"""The DuckDB staging toolkit: a window's batches into DuckDB, and the SQL the DuckDB-run sinks share.

The DuckDB sink inserts through `Intake` into its file; the Parquet, Iceberg and Delta sinks stage a window in an
in-memory DuckDB (`stage_batches`) and keep the first row of each uuid minus the uuids other hours hold
(`winners_sql`). The engine-neutral parts (counts per hour, first copies, the ledger's counts) are `staging`.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from ..ledger import DeletionRecord
from ..schema import ALL_COLUMNS, ARROW_SCHEMA, COLUMN_NAMES, DUCKDB_TYPES, JSON, JSON_COLUMNS, quote
from ..threads import prefetched
from ..windows import Window
from .staging import SEEN_LIMIT, FirstCopies, StagedCounts, check_batch

STAGE = "_amplitude_stage"
SEQ = "_seq"  # arrival order of a staged row: the lowest wins among rows sharing a uuid
COLUMNS_SQL = ", ".join(quote(name) for name in COLUMN_NAMES)


def events_ddl(table: str, *, json_type: str = "JSON", temp: bool = False, seq: bool = False) -> str:
    """CREATE TABLE for the events columns; the stage keeps JSON as VARCHAR (validated once, on insert)."""
    columns = [f"{quote(c.name)} {json_type if c.kind == JSON else DUCKDB_TYPES[c.kind]}" for c in ALL_COLUMNS]
    if seq:
        columns.append(f"{SEQ} BIGINT")
    kind = "OR REPLACE TEMP TABLE" if temp else "TABLE IF NOT EXISTS"
    return f"CREATE {kind} {table} ({', '.join(columns)})"


def configure(con: duckdb.DuckDBPyConnection) -> None:
    """Make TIMESTAMPTZ come back as UTC whatever the machine's zone (needs the built-in ICU extension), and keep
    DuckDB's own progress bar off: under `python -c` or in a notebook it drew one on stdout for every statement
    over 2 s (a window's insert), beside ours."""
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")


def stage_connection(memory_limit: str, threads: int, spill_dir: str) -> duckdb.DuckDBPyConnection:
    """A private in-memory DuckDB for staging a window, spilling to `spill_dir`, configured as above."""
    con = duckdb.connect(":memory:", config={"memory_limit": memory_limit, "threads": threads,
                                             "temp_directory": spill_dir})
    configure(con)
    return con


def _json_labelled(schema: pa.Schema) -> pa.Schema:
    """The schema with JSON columns typed `arrow.json`, so DuckDB takes them as JSON without parsing each text.

    The reader only emits JSON texts that a parser has accepted (the compiled one, or msgspec), so DuckDB's own
    parse on the VARCHAR -> JSON cast is a second check at ~1 µs per event (measured, docs/PARSE_DESIGN.md). With a
    pyarrow that has no `json_` type, the columns stay strings and DuckDB checks them as before.
    """
    json_type = getattr(pa, "json_", None)
    if json_type is None:  # pragma: no cover - pyarrow < 19
        return schema
    return pa.schema([pa.field(f.name, json_type(pa.string())) if f.name in JSON_COLUMNS else f for f in schema])


STREAM_SCHEMA = _json_labelled(ARROW_SCHEMA)
_JSON_LABELS = [(i, f.type) for i, f in enumerate(STREAM_SCHEMA) if isinstance(f.type, pa.BaseExtensionType)]
KEEP = "_keep"  # the stream's row mask when repeats are dropped on the way in (not a column of `events`)


def _trues(rows: int) -> pa.Array:
    # from a bitmap, not from numpy: pyarrow's numpy conversion imports pandas (0.35 s)
    return pa.Array.from_buffers(pa.bool_(), rows, [None, pa.py_buffer(b"\xff" * ((rows + 7) // 8))])


_TRUES = _trues(1 << 16)


def _all_true(rows: int) -> pa.Array:
    """A mask keeping every row: a zero-copy slice of one array for the usual batch sizes."""
    return _TRUES.slice(0, rows) if rows <= len(_TRUES) else _trues(rows)


class Intake:
    """The window's batches on their way into DuckDB: checked, counted per hour, and optionally deduplicated.

    `insert_into` hands them to DuckDB as one Arrow stream in one INSERT: each INSERT statement costs ~10-25 ms
    whatever its size, and a stream keeps only the batch at hand in memory. DuckDB pulls the batches on its own
    thread; an exception raised while producing one (a broken member, Ctrl-C) is kept and raised again here
    after the statement, so it keeps its type instead of becoming a DuckDB error.

    With `first_copies`, repeated uuids are dropped on the way (`FirstCopies`): deleting rows that a transaction
    has just bulk-inserted makes DuckDB rewrite them at commit (measured: ~2 µs per event of the window,
    docs/PARSE_DESIGN.md). Each batch then carries a `_keep` mask that the INSERT filters on: DuckDB applies it in
    its own threads without copying, where a filtered copy or slices made here would stall its scan. Past its
    limit (`overflowed`) the sink removes the remaining repeats in SQL after the insert, ordered by member
    arrival (`ranks`) then line.
    """

    def __init__(
        self,
        window: Window,
        batches: Iterable[pa.RecordBatch],
        *,
        seq: bool = False,
        first_copies: bool = False,
        seen_limit: int = SEEN_LIMIT,
        taken: pa.Array | pa.ChunkedArray | None = None,
    ) -> None:
        self.window = window
        self.counts = StagedCounts(window)
        self.ranks: dict[str, int] = {}  # member name -> arrival rank (batches come in member order)
        self._batches = batches
        self._seq = seq  # append an arrival number per row (for a stage that keeps the first of each uuid)
        self._first = FirstCopies(seen_limit, taken) if first_copies else None
        self._rows = 0
        self._error: BaseException | None = None
        self._schema = STREAM_SCHEMA
        if seq:
            self._schema = self._schema.append(pa.field(SEQ, pa.int64()))
        if first_copies:
            self._schema = self._schema.append(pa.field(KEEP, pa.bool_()))

    def _prepared(self) -> Iterator[pa.RecordBatch]:
        for batch in self._batches:
            batch = check_batch(batch)
            if batch.num_rows == 0:
                continue
            self.counts.add(batch)
            if self._first is not None:  # only the SQL fallback of the dedup orders copies by member rank
                for name in pc.unique(batch.column("_member")).to_pylist():
                    self.ranks.setdefault(name, len(self.ranks))
            columns = batch.columns
            for index, json_type in _JSON_LABELS:  # zero-copy; from_arrays would cast (a copy)
                columns[index] = pa.ExtensionArray.from_storage(json_type, columns[index])
            if self._seq:
                columns.append(pa.array(range(self._rows, self._rows + batch.num_rows), pa.int64()))
            if self._first is not None:
                keep = self._first.keep(batch)
                columns.append(_all_true(batch.num_rows) if keep is None else keep)
            self._rows += batch.num_rows
            yield pa.RecordBatch.from_arrays(columns, schema=self._schema)

    def _stream(self) -> Generator[pa.RecordBatch, None, None]:
        try:
            # batches are checked, counted and deduplicated one thread ahead: DuckDB pulls them holding its
            # scan's lock, which would keep its other thread waiting through that work
            yield from prefetched(self._prepared(), depth=2, name="amplitude-export-intake")
        except GeneratorExit:  # DuckDB stopped reading (its own error, raised by insert_into)
            raise
        except BaseException as exc:  # noqa: BLE001 - re-raised by insert_into, on the caller's thread
            self._error = exc

    @property
    def overflowed(self) -> bool:
        """More uuids than the in-memory limit: some repeats are left for SQL to remove."""
        return self._first is not None and self._first.overflowed

    @property
    def uuids(self) -> pa.Array | None:
        """Every uuid of the window, when the in-memory filter saw them all; else None."""
        return None if self._first is None or self._first.overflowed else self._first.uuids

    @property
    def staged(self) -> dict[datetime, int]:
        """Rows received per upload hour, before duplicates are dropped."""
        return self.counts.staged

    def insert_into(self, con: duckdb.DuckDBPyConnection, table: str) -> None:
        """INSERT every batch into `table` in one statement; raise what producing the batches raised."""
        names = [*COLUMN_NAMES, SEQ] if self._seq else list(COLUMN_NAMES)
        batches = self._stream()
        stream = pa.RecordBatchReader.from_batches(self._schema, batches)
        con.register("_amplitude_stream", stream)
        try:
            where = f" WHERE {KEEP}" if self._first is not None else ""
            con.execute(f"INSERT INTO {table} SELECT {', '.join(map(quote, names))} FROM _amplitude_stream{where}")
        except duckdb.Error:
            if self._error is None:
                raise
        finally:
            con.unregister("_amplitude_stream")
            batches.close()  # stops and joins the prefetching thread, should DuckDB have stopped reading early
        if self._error is not None:
            raise self._error


def ranks_table(ranks: dict[str, int]) -> pa.Table:
    """Member names and their arrival ranks, for SQL that orders a uuid's copies."""
    return pa.table({"name": pa.array(list(ranks), pa.string()), "rank": pa.array(list(ranks.values()), pa.int64())})


def stage_batches(
    con: duckdb.DuckDBPyConnection, window: Window, batches: Iterable[pa.RecordBatch]
) -> dict[datetime, int]:
    """Stage every batch in TEMP table `_amplitude_stage`, numbered in arrival order; rows staged per hour."""
    con.execute(events_ddl(STAGE, json_type="VARCHAR", temp=True, seq=True))
    intake = Intake(window, batches, seq=True)
    intake.insert_into(con, STAGE)
    return intake.staged


def winners_sql(taken: str | None) -> str:
    """A WHERE clause over the stage: the first row of each uuid, minus the uuids of relation `taken`."""
    # a row without a uuid cannot be a duplicate of anything: every one is kept
    first = f"(uuid IS NULL OR {SEQ} IN (SELECT min({SEQ}) FROM {STAGE} WHERE uuid IS NOT NULL GROUP BY uuid))"
    if taken is None:
        return first
    # NOT EXISTS rather than NOT IN: one NULL uuid in `taken` would make NOT IN reject every row
    return f"{first} AND NOT EXISTS (SELECT 1 FROM {taken} AS t WHERE t.uuid = {STAGE}.uuid)"


def hour_counts(
    con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | dict[str, Any] | None = None
) -> dict[datetime, int]:
    """{hour: n} from a query yielding (hour, n); via Arrow, as fetchall() on TIMESTAMPTZ needs pytz."""
    table = con.sql(sql, params=params).to_arrow_table()
    return {row["hour"].astimezone(UTC): row["n"] for row in table.to_pylist()}


DELETIONS = "_amplitude_deletions"
DELETIONS_DDL = (
    f"CREATE TABLE IF NOT EXISTS {DELETIONS} (project VARCHAR NOT NULL, day DATE NOT NULL, status VARCHAR NOT NULL, "
    "amplitude_ids BIGINT[] NOT NULL, rows_deleted BIGINT NOT NULL, cohort_rows_deleted BIGINT NOT NULL, "
    "applied_at TIMESTAMPTZ, run_id VARCHAR, PRIMARY KEY (project, day))"
)
DELETED = "_amplitude_deleted"  # the relation of amplitude ids being deleted, registered for `DELETED_ROWS`
# a deleted user's row: by amplitude_id, or by the one `_extra` kept (as text) when it did not fit the column
DELETED_ROWS = (
    f"coalesce(amplitude_id IN (SELECT amplitude_id FROM {DELETED}) OR (amplitude_id IS NULL AND "
    f"TRY_CAST(json_extract_string(_extra, '$.amplitude_id') AS BIGINT) IN (SELECT amplitude_id FROM {DELETED})), "
    "false)"
)
COHORT_MEMBERS = "cohort_members"


def deleted_table(amplitude_ids: list[int]) -> pa.Table:
    """The ids to delete, as the relation `DELETED_ROWS` reads."""
    return pa.table({"amplitude_id": pa.array(sorted(set(amplitude_ids)), pa.int64())})


def deletion_row(project: str, record: DeletionRecord) -> pa.Table:
    """One `_amplitude_deletions` row."""
    return pa.table(
        {
            "project": [project],
            "day": pa.array([record.day], pa.date32()),
            "status": [record.status],
            "amplitude_ids": pa.array([record.amplitude_ids], pa.list_(pa.int64())),
            "rows_deleted": pa.array([record.rows_deleted], pa.int64()),
            "cohort_rows_deleted": pa.array([record.cohort_rows_deleted], pa.int64()),
            "applied_at": pa.array([record.applied_at], pa.timestamp("us", tz="UTC")),
            "run_id": [record.run_id],
        }
    )


def time_filter(start: datetime | None, end: datetime | None, project: str | None = None) -> tuple[str, list[Any]]:
    """A WHERE clause (with its parameters) on `server_upload_time`, both ends inclusive, and `_project`."""
    clauses: list[str] = []
    params: list[Any] = []
    if project is not None:
        clauses.append("_project = ?")
        params.append(project)
    if start is not None:
        clauses.append("server_upload_time >= ?")
        params.append(start)
    if end is not None:
        clauses.append("server_upload_time <= ?")
        params.append(end)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def rollback(con: duckdb.DuckDBPyConnection) -> None:
    """Roll back the open transaction, if the connection still has one."""
    try:
        con.rollback()
    except duckdb.Error:
        pass  # the transaction is already gone (the connection failed); the original error matters

"""The destination as two views on a DuckDB connection: `all_events` (the events table) and `ledger` (the
per-hour ledger with a `project` column), read-only.

For PostgreSQL the columns the figures need are streamed by COPY into a DuckDB file in a temporary directory
(bounded memory), since DuckDB's postgres extension would need a download.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import duckdb
import pyarrow as pa

from ..errors import DestinationBusyError, DestinationError, UsageError
from ..ledger import HourRecord
from ..sinks.duckdb import configure


@contextmanager
def open_views(dest: str, storage_options: dict[str, Any] | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB connection on which `dest` appears as views `all_events` and `ledger`, read-only."""
    scheme, sep, rest = dest.partition(":")
    if not sep or not rest:
        raise UsageError(f"cannot read destination {dest!r}: use duckdb:PATH, parquet:DIR or postgresql://...")
    if storage_options and scheme.lower() != "parquet":
        raise UsageError("storage options apply to parquet: URLs on object storage (s3://, gs://, az://, ...)")
    if scheme.lower() in ("postgresql", "postgres"):
        with tempfile.TemporaryDirectory(prefix="amplitude-report-") as scratch:
            con = duckdb.connect(str(Path(scratch) / "copy.duckdb"), config={"threads": 2, "memory_limit": "1GB"})
            try:
                configure(con)
                _postgres_views(con, dest, Path(scratch))
                yield con
            finally:
                con.close()
        return
    con = duckdb.connect(":memory:", config={"threads": 2, "memory_limit": "1GB"})
    try:
        configure(con)  # TIMESTAMPTZ shown and cast as UTC whatever the machine's zone; no progress bar
        scheme = scheme.lower()
        if scheme == "duckdb":
            _duckdb_views(con, Path(rest).expanduser())
        elif scheme == "parquet":
            _parquet_views(con, rest, storage_options)
        else:
            raise UsageError(f"cannot read destination {dest!r}: use duckdb:PATH, parquet:DIR or postgresql://...")
        yield con
    finally:
        con.close()


def literal(text: str) -> str:
    """`text` as an SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _duckdb_views(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    from ..sinks.duckdb import EVENTS, LEDGER

    if not path.is_file():
        raise DestinationError(f"no DuckDB database at {path}")
    try:
        con.execute(f"ATTACH {literal(str(path))} AS src (READ_ONLY)")
    except duckdb.Error as exc:
        if "lock" in str(exc).lower():
            raise DestinationBusyError(
                f"DuckDB database {path} is in use by a run (it allows no readers then); report after it ends"
            ) from None
        raise DestinationError(f"cannot open DuckDB database {path}: {_first_line(exc)}") from None
    try:
        con.execute(f"CREATE VIEW all_events AS SELECT * FROM src.{EVENTS}")
        con.execute(f"CREATE VIEW ledger AS SELECT * FROM src.{LEDGER}")
    except duckdb.CatalogException:
        raise DestinationError(f"{path} holds no amplitude-export tables (events, {LEDGER})") from None


# the columns the figures read, and all a PostgreSQL destination has to copy out
REPORT_COLUMNS = (
    "_project", "_upload_hour", "_extra", "amplitude_id", "event_time", "server_upload_time", "event_type",
    "platform", "country",
)


def _postgres_views(con: duckdb.DuckDBPyConnection, url: str, scratch: Path) -> None:
    """Copy the report's columns out of PostgreSQL (CSV by COPY, to a file) and its ledger into `con`."""
    import psycopg
    from psycopg import sql

    from ..schema import ALL_COLUMNS, DUCKDB_TYPES
    from ..sinks.duckdb import records_table
    from ..sinks.postgres import PostgresSink

    with PostgresSink(url, read_only=True) as sink:
        projects = [row[0] for row in sink.conn.execute(
            sql.SQL("SELECT DISTINCT project FROM {}").format(sink._ledger)
        ).fetchall()]
        ledger = pa.concat_tables([records_table("", [])] + [
            records_table(project, list(sink.ledger(project).values())) for project in projects
        ])
        csv_path = scratch / "events.csv"
        query = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT (FORMAT csv)").format(
            sql.SQL(", ").join(map(sql.Identifier, REPORT_COLUMNS)), sink._events
        )
        try:
            with csv_path.open("wb") as out, sink.conn.cursor().copy(query) as copy:
                for chunk in copy:
                    out.write(chunk)
        except psycopg.Error as exc:
            raise DestinationError(f"{sink.description}: cannot read events: {_first_line(exc)}") from None
    kinds = {column.name: DUCKDB_TYPES[column.kind] for column in ALL_COLUMNS}
    columns = ", ".join(f"{literal(name)}: {literal(kinds[name])}" for name in REPORT_COLUMNS)
    con.execute(
        f"CREATE TABLE all_events AS SELECT * FROM read_csv({literal(str(csv_path))}, header = false, "
        f"columns = {{{columns}}}, quote = '\"', escape = '\"', nullstr = '', allow_quoted_nulls = false)"
    )
    csv_path.unlink()
    con.register("_ledger_arrow", ledger)
    con.execute("CREATE TABLE ledger AS SELECT * FROM _ledger_arrow")
    con.unregister("_ledger_arrow")


def _parquet_views(con: duckdb.DuckDBPyConnection, root: str, storage_options: dict[str, Any] | None) -> None:
    """Events from the files the state names (not a glob: a crashed run's orphans are not data), ledger from JSON.

    `root` is anything the Parquet sink opens: a directory, `file://`, or any fsspec URL (`s3://`, `memory://`).
    """
    from ..sinks import open_sink
    from ..sinks.duckdb import events_ddl, records_table
    from ..sinks.parquet import LocalDirectory, ParquetSink

    with cast(ParquetSink, open_sink(f"parquet:{root}", read_only=True, storage_options=storage_options)) as sink:
        files = sorted(sink.files)
        ledgers = sink.state_ledger
        store = sink.store
    if not files:
        con.execute(events_ddl("all_events"))
    elif isinstance(store, LocalDirectory):
        paths = ", ".join(literal(store.abs(rel)) for rel in files)
        con.execute(
            f"CREATE VIEW all_events AS SELECT * FROM read_parquet([{paths}], hive_partitioning = true, "
            "union_by_name = true)"
        )
    else:  # read through fsspec, as the sink reads: DuckDB never needs the store's credentials
        con.execute(f"CREATE VIEW all_events AS SELECT * FROM {store.scan(con, files)}")
    tables = [
        records_table(name, [HourRecord.from_dict(d) for d in hours.values()])
        for name, hours in ledgers.items()
    ]
    ledger = pa.concat_tables(tables) if tables else records_table("", [])
    con.register("_ledger_arrow", ledger)
    con.execute("CREATE VIEW ledger AS SELECT * FROM _ledger_arrow")



def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def query_rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    """The rows `sql` returns, as dicts by column name."""
    cursor = con.execute(sql, params or [])
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

"""Reading a PostgreSQL destination's events back: `COPY ... TO STDOUT (FORMAT csv)` parsed by pyarrow's CSV
reader into Arrow typed as the schema says, whole (`copy_to_table`) or streamed from a spool file
(`copy_to_stream`)."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
from psycopg import sql


def copy_to_table(conn: psycopg.Connection[Any], query: sql.Composed, schema: pa.Schema) -> pa.Table:
    """The rows `query` (a `COPY ... TO STDOUT (FORMAT csv)` of `schema`'s columns) writes, as one table."""
    buffer = io.BytesIO()
    with conn.cursor().copy(query) as copy:
        for chunk in copy:
            buffer.write(chunk)
    if buffer.tell() == 0:
        return schema.empty_table()
    buffer.seek(0)
    return pacsv.read_csv(buffer, **_csv_options(schema)).cast(schema)


def copy_to_stream(conn: psycopg.Connection[Any], query: sql.Composed, schema: pa.Schema) -> pa.RecordBatchReader:
    """The same as a stream: copied into an anonymous temporary file (COPY runs at the server's pace, the file
    bounds memory), then read back in Arrow batches; the file goes when the stream ends."""
    spool = tempfile.TemporaryFile(prefix="amplitude-export-")
    try:
        with conn.cursor().copy(query) as copy:
            for chunk in copy:
                spool.write(chunk)
        if spool.tell() == 0:
            spool.close()
            return schema.empty_table().to_reader()
        spool.seek(0)
        stream = pacsv.open_csv(spool, **_csv_options(schema))
    except BaseException:
        spool.close()
        raise

    def batches() -> Iterator[pa.RecordBatch]:
        with spool:
            for batch in stream:
                yield batch.cast(schema)

    return pa.RecordBatchReader.from_batches(schema, batches())


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

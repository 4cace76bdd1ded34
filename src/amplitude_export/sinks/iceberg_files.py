"""Data files of the Iceberg table: written from Arrow batches with pyiceberg's own Parquet writer (field ids,
column statistics for pruning), and read back one file at a time, both streaming so memory stays bounded.

A file holds the rows of one partition (upload day) and is closed once it holds `TARGET_BYTES` of Arrow data, so
no reader (pyiceberg's scan holds a whole file in memory at a time) needs more than that for one file.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from ..schema import ARROW_SCHEMA
from ..windows import Window

if TYPE_CHECKING:
    from pyiceberg.expressions import BooleanExpression
    from pyiceberg.manifest import DataFile
    from pyiceberg.table import FileScanTask, Table

TARGET_BYTES = 256 << 20  # Arrow bytes per data file (about a tenth of that on disk, compressed)
BATCH_ROWS = 16_384


def file_schema(table: Table) -> pa.Schema:
    """ARROW_SCHEMA with each field's Iceberg field id, as the table's Parquet files carry them."""
    ids = {f.name: f.field_id for f in table.schema().fields}
    return pa.schema([f.with_metadata({b"PARQUET:field_id": str(ids[f.name]).encode()}) for f in ARROW_SCHEMA])


def write_data_files(table: Table, day: int | None, batches: Iterable[pa.RecordBatch], written: list[str], *,
                     target_bytes: int = TARGET_BYTES) -> list[DataFile]:
    """Write `batches` (rows of one upload day, days since 1970-01-01; None for rows without
    `server_upload_time`) as data files of `table`, one row group per batch, a new file past `target_bytes`; no
    file for no rows. Each path goes into `written` before its file is created, so a failed attempt can delete
    it."""
    schema = file_schema(table)
    files: list[DataFile] = []
    current: _File | None = None
    for batch in batches:
        if not batch.num_rows:
            continue
        if current is None:
            current = _File(table, day, written)
        current.write(batch.cast(schema))  # zero-copy where the types already match
        if current.size >= target_bytes:
            files.append(current.close())
            current = None
    if current is not None:
        files.append(current.close())
    return files


class _File:
    """One data file being written with pyiceberg's Parquet writer."""

    def __init__(self, table: Table, day: int | None, written: list[str]) -> None:
        from pyiceberg.io.fileformat import FileFormatFactory
        from pyiceberg.manifest import FileFormat
        from pyiceberg.partitioning import PartitionFieldValue, PartitionKey
        from pyiceberg.table.locations import load_location_provider

        self.metadata = metadata = table.metadata
        spec, schema = metadata.spec(), metadata.schema()
        self.key = PartitionKey([PartitionFieldValue(spec.fields[0], day)], partition_spec=spec, schema=schema)
        provider = load_location_provider(table_location=metadata.location, table_properties=metadata.properties)
        self.path = provider.new_data_location(data_file_name=f"00000-0-{uuid.uuid4()}.parquet",
                                               partition_key=self.key)
        written.append(self.path)
        self.output = table.io.new_output(self.path)
        self.writer = FileFormatFactory.get(FileFormat.PARQUET).create_writer(self.output, schema,
                                                                             metadata.properties)
        self.size = 0

    def write(self, batch: pa.RecordBatch) -> None:
        self.writer.write(pa.Table.from_batches([batch]))
        self.size += batch.nbytes

    def close(self) -> DataFile:
        from pyiceberg.manifest import DataFile, DataFileContent, FileFormat

        statistics = self.writer.close()
        return DataFile.from_args(
            content=DataFileContent.DATA, file_path=self.path, file_format=FileFormat.PARQUET,
            partition=self.key.partition, file_size_in_bytes=len(self.output), sort_order_id=None,
            spec_id=self.metadata.default_spec_id, equality_ids=None, key_metadata=None,
            **statistics.to_serialized_dict(),
        )


def file_batches(table: Table, task: FileScanTask, row_filter: BooleanExpression) -> Iterator[pa.RecordBatch]:
    """The rows of one data file that match `row_filter`, as batches of ARROW_SCHEMA.

    Files without delete files are streamed by a pyarrow dataset scan (row groups pruned by their statistics);
    a file other engines attached delete files to is read by pyiceberg's scan, which applies them (and holds the
    file in memory meanwhile)."""
    from pyiceberg.expressions.visitors import bind
    from pyiceberg.io.pyarrow import ArrowScan, PyArrowFileIO, expression_to_pyarrow

    if task.delete_files or not isinstance(table.io, PyArrowFileIO):
        scan = ArrowScan(table.metadata, table.io, table.schema(), row_filter)
        batches: Iterable[pa.RecordBatch] = scan.to_record_batches([task])
    else:
        import pyarrow.dataset as ds

        scheme, netloc, path = PyArrowFileIO.parse_location(task.file.file_path)
        dataset = ds.dataset(path, format="parquet", filesystem=table.io.fs_by_scheme(scheme, netloc))
        where: Any = expression_to_pyarrow(bind(table.schema(), row_filter, case_sensitive=True))
        batches = dataset.scanner(columns=list(ARROW_SCHEMA.names), filter=where, batch_size=BATCH_ROWS).to_batches()
    for batch in batches:
        if batch.num_rows:
            yield batch.select(ARROW_SCHEMA.names).cast(ARROW_SCHEMA)


def register_file(con: duckdb.DuckDBPyConnection, table: Table, task: FileScanTask) -> None:
    """The rows of one data file as the relation `_amplitude_file` of `con`, streamed (readable once)."""
    from pyiceberg.expressions import AlwaysTrue

    con.register("_amplitude_file", pa.RecordBatchReader.from_batches(ARROW_SCHEMA,
                                                                      file_batches(table, task, AlwaysTrue())))


def predicate(kind: str, *args: Any) -> BooleanExpression:
    """`pyiceberg.expressions.<kind>(*args)` (`EqualTo("_project", "p")`): its predicates are pydantic models,
    whose synthesised keyword-only __init__ is all mypy sees of them, not pyiceberg's own positional one."""
    import pyiceberg.expressions as expressions

    built: BooleanExpression = getattr(expressions, kind)(*args)
    return built


def window_filter(project: str, window: Window) -> BooleanExpression:
    from pyiceberg.expressions import And

    return And(predicate("EqualTo", "_project", project),
               predicate("GreaterThanOrEqual", "_upload_hour", window.start.isoformat()),
               predicate("LessThanOrEqual", "_upload_hour", window.end.isoformat()))


def row_filter(start: datetime | None, end: datetime | None, project: str | None) -> BooleanExpression:
    from pyiceberg.expressions import AlwaysTrue, And

    expression: BooleanExpression = AlwaysTrue()
    if project is not None:
        expression = And(expression, predicate("EqualTo", "_project", project))
    if start is not None:
        expression = And(expression, predicate("GreaterThanOrEqual", "server_upload_time",
                                               start.astimezone(UTC).isoformat()))
    if end is not None:
        expression = And(expression, predicate("LessThanOrEqual", "server_upload_time",
                                               end.astimezone(UTC).isoformat()))
    return expression

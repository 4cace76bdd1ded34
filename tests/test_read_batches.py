"""`read_batches`: the streaming read every sink offers (what the report copies from), against `read_arrow`.

DuckDB, Parquet (a directory and an fsspec URL) and the real PostgreSQL, each loaded by `run` from the fake
Export API for two projects (with malformed lines and unknown fields, so `_extra` holds values).
"""

from __future__ import annotations

import uuid as uuid_module
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
import stamina
from conftest import POSTGRES_URL

from amplitude_export.client import ExportClient
from amplitude_export.config import Credentials, Secret
from amplitude_export.errors import UsageError
from amplitude_export.fake_server import FakeExportServer
from amplitude_export.pipeline import run
from amplitude_export.schema import ARROW_SCHEMA, arrow_schema
from amplitude_export.sinks import open_sink

COLUMNS = ["uuid", "_upload_hour", "_extra", "amplitude_id", "event_time", "event_properties", "_project"]


@pytest.fixture(params=["duckdb", "parquet", "parquet-fsspec", "postgres"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "duckdb":
        yield f"duckdb:{tmp_path / 'a.duckdb'}"
    elif request.param == "parquet":
        yield f"parquet:{tmp_path / 'dataset'}"
    elif request.param == "parquet-fsspec":
        import fsspec

        bucket = f"test_read_batches_{uuid_module.uuid4().hex[:8]}"
        yield f"parquet:memory://{bucket}/events"
        fsspec.filesystem("memory").rm(bucket, recursive=True)
    else:
        yield f"{POSTGRES_URL}?schema={request.getfixturevalue('pg_schema')}"


def load(dest: str, tmp_path: Path) -> None:
    """Six hours of project `p` and three of project `q` (other seeds: other uuids)."""
    for project, seed, end in (("p", 3, "2024-03-01T05"), ("q", 4, "2024-03-01T02")):
        with stamina.set_testing(True), FakeExportServer(seed=seed, malformed_lines=True, variation=0.3) as server:
            credentials = Credentials(server.api_key, Secret("demo-secret"), "us", server.url)
            with ExportClient(credentials) as client, open_sink(dest) as sink:
                result = run(client, sink, project=project, start="2024-03-01", end=end,
                             data_dir=tmp_path / project, workers=1, now=datetime(2024, 4, 1, tzinfo=UTC))  # fmt: skip
            assert result.exit_code == 0, result.summary()


def by_uuid(table: pa.Table) -> list[dict[str, object]]:
    return sorted(table.to_pylist(), key=lambda row: str(row["uuid"]))


def test_every_sink_streams_what_read_arrow_returns(dest: str, tmp_path: Path) -> None:
    load(dest, tmp_path)
    with open_sink(dest, read_only=True) as sink:
        everything = sink.read_arrow()
        some = sink.read_batches(COLUMNS, project="p")
        assert isinstance(some, pa.RecordBatchReader) and some.schema == arrow_schema(COLUMNS)
        some_table = some.read_all()
        whole = sink.read_batches().read_all()
    assert everything.num_rows > 100 and set(everything["_project"].to_pylist()) == {"p", "q"}
    assert any(everything["_extra"].to_pylist())  # varied lines: values kept in `_extra` come back too
    wanted = everything.filter(pa.compute.equal(everything["_project"], "p")).select(COLUMNS)
    assert by_uuid(some_table) == by_uuid(wanted) and some_table.schema == arrow_schema(COLUMNS)
    assert by_uuid(whole) == by_uuid(everything) and whole.schema == ARROW_SCHEMA


def test_an_unknown_column_and_a_destination_without_events(dest: str) -> None:
    with open_sink(dest) as sink:
        with pytest.raises(UsageError, match="events have no column 'nope'"):
            sink.read_batches(["uuid", "nope"])
        empty = sink.read_batches(["uuid", "event_time"], project="p").read_all()
    assert empty.num_rows == 0 and empty.schema == arrow_schema(["uuid", "event_time"])

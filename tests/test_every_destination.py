"""What every destination must do alike: load the real export lines without loss, and keep projects apart.

Runs against DuckDB, Parquet and the real PostgreSQL (which must be reachable: these fail, never skip).
"""

from __future__ import annotations

import gzip
import json
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import POSTGRES_URL, REAL_EVENTS
from sink_helpers import batch, finisher, hour, hour_events, window

from amplitude_export.reader import WindowReader
from amplitude_export.schema import EXPORT_COLUMNS, JSON, KNOWN_SOURCES, TIMESTAMP
from amplitude_export.sinks import Sink, open_sink
from amplitude_export.verify import verify
from amplitude_export.windows import Window


@pytest.fixture(params=["duckdb", "parquet", "postgres"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "duckdb":
        return f"duckdb:{tmp_path / 'a.duckdb'}"
    if request.param == "parquet":
        return f"parquet:{tmp_path / 'dataset'}"
    return f"{POSTGRES_URL}?schema={request.getfixturevalue('pg_schema')}"


def real_archives(tmp_path: Path) -> list[tuple[Window, Path]]:
    """The real export lines, each in a member named for its upload hour, one archive per hour."""
    by_hour: dict[datetime, list[bytes]] = {}
    for line in REAL_EVENTS.read_bytes().splitlines():
        uploaded = datetime.fromisoformat(json.loads(line)["server_upload_time"]).replace(tzinfo=UTC)
        by_hour.setdefault(uploaded.replace(minute=0, second=0, microsecond=0), []).append(line)
    archives = []
    for upload_hour, lines in sorted(by_hour.items()):
        path = tmp_path / f"{upload_hour:%Y%m%dT%H}.zip"
        with zipfile.ZipFile(path, "w") as archive:
            name = f"1/1_{upload_hour:%Y-%m-%d}_{upload_hour.hour}#0.json.gz"
            archive.writestr(name, gzip.compress(b"\n".join(lines) + b"\n", mtime=0))
        archives.append((Window(upload_hour, upload_hour), path))
    return archives


def load_real(sink: Sink, tmp_path: Path) -> None:
    for win, path in real_archives(tmp_path):
        reader = WindowReader(path, win, run_id="run-1", rejects_dir=tmp_path / "rejects", workers=1)
        sink.write_window("real", win, reader.batches(), reader.hour_records)


def test_every_real_export_line_loads_without_loss(dest: str, tmp_path: Path) -> None:
    lines = [json.loads(line) for line in REAL_EVENTS.read_bytes().splitlines()]
    sink = open_sink(dest)
    try:
        load_real(sink, tmp_path)
        load_real(sink, tmp_path)  # loading the same hours again replaces, never adds
        rows = sink.read_arrow().to_pylist()
    finally:
        sink.close()
    assert len(rows) == len(lines) == 7
    assert sorted(map(str, (r["uuid"] for r in rows))) == sorted(map(str, (e.get("uuid") for e in lines)))
    for line in lines:
        (row,) = [r for r in rows if r["uuid"] == line.get("uuid")]  # line 7 has no uuid: NULL, kept
        assert row["_project"] == "real" and row["_run_id"] == "run-1"
        extra = json.loads(row["_extra"]) if row["_extra"] else {}
        for column in EXPORT_COLUMNS:  # every field of the line, by its value in the table
            value = line.get(column.source)
            stored = row[column.name]
            if value is not None and stored is None:
                assert extra[column.source] == value, column.source  # kept verbatim beside the typed columns
            elif column.kind == TIMESTAMP and value is not None:
                assert stored == datetime.fromisoformat(value).replace(tzinfo=UTC), column.source
            elif column.kind == JSON and value is not None:
                assert json.loads(stored) == value, column.source
            else:
                assert stored == value, column.source
        assert set(extra) <= set(line)
        for key in set(line) - KNOWN_SOURCES:  # fields the schema does not know: kept, with their values
            assert extra[key] == line[key], key


def test_projects_in_one_destination_are_kept_apart(dest: str) -> None:
    """Project b loading the same hours as project a neither deletes nor hides a's rows; each verifies alone."""
    w = window(0, 1)
    rows_a = hour_events(hour(0), [f"a{n}" for n in range(5)]) + hour_events(hour(1), ["a5"])
    rows_b = hour_events(hour(0), [f"b{n}" for n in range(3)])
    sink = open_sink(dest)
    try:
        sink.write_window("a", w, [batch(rows_a)], finisher(w, rows_a))
        sink.write_window("b", w, [batch(rows_b)], finisher(w, rows_b))
        sink.write_window("b", w, [batch(rows_b[:1])], finisher(w, rows_b[:1]))  # b reloads: only b changes
        assert sink.count_by_hour("a") == {hour(0): 5, hour(1): 1}
        assert sink.count_by_hour("b") == {hour(0): 1}
        assert set(sink.ledger("a")) == set(sink.ledger("b")) == {hour(0), hour(1)}
        assert {r["uuid"] for r in sink.read_arrow(project="b").to_pylist()} == {"b0"}
        assert len(sink.read_arrow().to_pylist()) == 7
    finally:
        sink.close()
    sink = open_sink(dest, read_only=True)
    try:
        assert verify(sink, "a").complete and verify(sink, "b").complete
    finally:
        sink.close()

"""The DuckDB sink on real files in tmp_path: types, exactly once, atomic windows, locking, kill -9."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sink_helpers import (
    EXPECTED_UUIDS,
    Crash,
    batch,
    crashing,
    event,
    finisher,
    hour,
    hour_events,
    read_of,
    synthetic_batches,
    two_windows,
    uuids,
    window,
)

from amplitude_export.errors import DestinationBusyError, DestinationError
from amplitude_export.ledger import EMPTY, FAILED, HourRecord
from amplitude_export.schema import ALL_COLUMNS, ARROW_SCHEMA, DUCKDB_TYPES
from amplitude_export.sinks import open_sink
from amplitude_export.sinks.duckdb import ROW_GROUP_SIZE, DuckDBSink

TESTS = Path(__file__).parent


@pytest.fixture
def sink(tmp_path: Path) -> DuckDBSink:
    with DuckDBSink(tmp_path / "sub" / "events.duckdb") as s:
        yield s  # type: ignore[misc]


def count(s: DuckDBSink) -> int:
    return s.connection.sql("SELECT count(*) FROM events").fetchall()[0][0]


def test_write_window_types_rows_and_ledger(sink: DuckDBSink) -> None:
    w = window(0, 1)
    rows = hour_events(hour(0), ["a", "b"]) + hour_events(hour(1), ["c"])
    finish = finisher(w, rows)

    records = sink.write_window("p", w, read_of([batch(rows)], finish))

    described = {name: kind for name, kind, *_ in sink.connection.sql("DESCRIBE events").fetchall()}
    expected = {
        c.name: DUCKDB_TYPES[c.kind].replace("TIMESTAMPTZ", "TIMESTAMP WITH TIME ZONE") for c in ALL_COLUMNS
    }
    assert described == expected
    table = sink.read_arrow()
    assert table.schema.equals(ARROW_SCHEMA)
    assert uuids(table) == ["a", "b", "c"]
    first = table.to_pylist()[0]
    assert first["amplitude_id"] == rows[0]["amplitude_id"] > 2**32
    assert first["event_time"] == rows[0]["event_time"]
    assert sink.connection.sql(
        "SELECT event_properties->>'page' FROM events WHERE uuid = 'a'"
    ).fetchall() == [("/p/1",)]

    assert [(r.events_loaded, r.duplicates, r.lines_read) for r in records] == [(2, 0, 2), (1, 0, 1)]
    assert all(r.updated_at is not None for r in records)
    assert sink.ledger("p") == {r.hour: r for r in records}
    assert sink.ledger("other") == {}
    assert finish.calls == [1]  # type: ignore[attr-defined]
    ledger_columns = {row[0] for row in sink.connection.sql("DESCRIBE _amplitude_ledger").fetchall()}
    assert ledger_columns == {"project"} | {f.name for f in dataclasses.fields(HourRecord)}


def test_duplicates_within_and_across_windows_are_loaded_once_and_counted(sink: DuckDBSink) -> None:
    (w1, rows1), (w2, rows2) = two_windows()

    r1 = sink.write_window("p", w1, read_of([batch(rows1[:2]), batch(rows1[2:])], finisher(w1, rows1)))
    r2 = sink.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))

    assert uuids(sink.read_arrow()) == EXPECTED_UUIDS
    assert [(r.events_loaded, r.duplicates) for r in r1 + r2] == [(3, 1), (2, 1), (2, 1), (2, 2)]
    # the first row of a uuid wins: u1 stays at hour 0 line 1, not line 3 nor hour 2
    assert sink.connection.sql(
        "SELECT _upload_hour, _line FROM events WHERE uuid = 'u1'"
    ).to_arrow_table().to_pylist() == [{"_upload_hour": hour(0), "_line": 1}]


@pytest.mark.parametrize("gap", [1, 30])  # within NEARBY (dropped on the way in) and beyond (deleted after)
def test_a_uuid_another_hour_holds_keeps_its_first_copy_near_or_far(sink: DuckDBSink, gap: int) -> None:
    first, later = window(0, 0), window(gap, gap)
    rows1 = hour_events(hour(0), ["a", "b"])
    rows2 = hour_events(hour(gap), ["b", "c", "a", "d"])
    sink.write_window("p", first, read_of([batch(rows1)], finisher(first, rows1)))
    records = sink.write_window("p", later, read_of([batch(rows2)], finisher(later, rows2)))
    assert [(r.events_loaded, r.duplicates) for r in records] == [(2, 2)]
    assert sink.connection.sql(
        "SELECT uuid, _upload_hour FROM events ORDER BY uuid"
    ).to_arrow_table().to_pylist() == [
        {"uuid": "a", "_upload_hour": hour(0)}, {"uuid": "b", "_upload_hour": hour(0)},
        {"uuid": "c", "_upload_hour": hour(gap)}, {"uuid": "d", "_upload_hour": hour(gap)},
    ]


def test_a_window_with_more_uuids_than_the_memory_limit_is_deduplicated_the_same(tmp_path: Path) -> None:
    """Past `seen_limit` uuids the repeats are removed in SQL after the insert: the same rows and counts."""
    results = []
    for limit in (1_000_000, 2):  # 2: the set is full after the first batch of two rows
        with DuckDBSink(tmp_path / f"limit{limit}.duckdb", seen_limit=limit) as sink:
            records = []
            for w, rows in two_windows():
                parts = [batch(rows[i : i + 2]) for i in range(0, len(rows), 2)]
                records += sink.write_window("p", w, read_of(parts, finisher(w, rows)))
            table = sink.connection.sql("SELECT uuid, _upload_hour, _line FROM events ORDER BY uuid").to_arrow_table()
            results.append((table.to_pylist(), [(r.events_loaded, r.duplicates) for r in records]))
    assert results[0] == results[1]
    assert [row["uuid"] for row in results[0][0]] == EXPECTED_UUIDS


def test_rewriting_a_window_replaces_its_rows(sink: DuckDBSink) -> None:
    (w1, rows1), (w2, rows2) = two_windows()
    sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
    sink.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))

    changed = [dict(r, event_type="changed") for r in rows1 if r["uuid"] != "u3"]
    records = sink.write_window("p", w1, read_of([batch(changed)], finisher(w1, changed)))

    table = sink.read_arrow()
    assert uuids(table) == [u for u in EXPECTED_UUIDS if u != "u3"]
    by_uuid = {r["uuid"]: r for r in table.to_pylist()}
    assert by_uuid["u1"]["event_type"] == "changed" and by_uuid["u6"]["event_type"] == "page_view"
    assert [(r.events_loaded, r.duplicates) for r in records] == [(2, 1), (2, 1)]
    assert sink.ledger("p")[hour(0)].events_loaded == 2


def test_a_crash_inside_the_batches_leaves_nothing_of_the_window(sink: DuckDBSink) -> None:
    (w1, rows1), (w2, rows2) = two_windows()
    sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
    finish = finisher(w2, rows2)

    with pytest.raises(Crash):
        sink.write_window("p", w2, read_of(crashing([batch(rows2[:2]), batch(rows2[2:])], after=1), finish))

    assert finish.calls == []  # type: ignore[attr-defined]
    assert uuids(sink.read_arrow()) == ["u1", "u2", "u3", "u4", "u5"]
    assert sorted(sink.ledger("p")) == [hour(0), hour(1)]
    # the connection is usable again and the same window then loads normally
    sink.write_window("p", w2, read_of([batch(rows2)], finish))
    assert uuids(sink.read_arrow()) == EXPECTED_UUIDS


def test_a_failure_in_finish_or_a_bad_batch_rolls_back(sink: DuckDBSink) -> None:
    (w1, rows1), _ = two_windows()

    def broken_finish() -> list[HourRecord]:
        raise Crash("reader could not total the hours")

    with pytest.raises(Crash):
        sink.write_window("p", w1, read_of([batch(rows1)], broken_finish))
    stray = [event("x", hour(5))]
    with pytest.raises(ValueError, match="outside the window"):
        sink.write_window("p", w1, read_of([batch(stray)], finisher(w1)))
    assert count(sink) == 0
    assert sink.ledger("p") == {}


def test_record_hours_upserts_the_ledger_without_touching_events(sink: DuckDBSink) -> None:
    (w1, rows1), _ = two_windows()
    sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))

    sink.record_hours(
        "p", [HourRecord(hour=hour(5), status=EMPTY), HourRecord(hour=hour(6), status=FAILED, reason="x")]
    )
    sink.record_hours("p", [HourRecord(hour=hour(6), status=FAILED, reason="still 503", attempts=2)])

    ledger = sink.ledger("p")
    assert sorted(ledger) == [hour(0), hour(1), hour(5), hour(6)]
    assert ledger[hour(5)].status == EMPTY and ledger[hour(5)].updated_at is not None
    assert (ledger[hour(6)].reason, ledger[hour(6)].attempts) == ("still 503", 2)
    assert count(sink) == 5


def test_read_arrow_filters_on_server_upload_time(sink: DuckDBSink) -> None:
    (w1, rows1), (w2, rows2) = two_windows()
    sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
    sink.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))

    assert uuids(sink.read_arrow(hour(1), hour(2))) == ["u4", "u5"]  # hour 2's events are after 02:00
    assert uuids(sink.read_arrow(start=hour(3))) == ["u8", "u9"]
    assert sink.read_arrow(end=hour(0)).num_rows == 0


def test_a_wide_window_loads_under_a_small_memory_limit(tmp_path: Path) -> None:
    with DuckDBSink(tmp_path / "big.duckdb", memory_limit="64MB", threads=1) as s:
        w = window(0, 1)
        records = s.write_window("p", w, read_of(synthetic_batches(w, 5_000, batch_rows=2048), finisher(w)))
        assert sum(r.events_loaded for r in records) == count(s) == 9_980
        assert sum(r.duplicates for r in records) == 20


def test_inserts_write_row_groups_of_the_sinks_size_into_any_path(tmp_path: Path) -> None:
    # the file is attached with ROW_GROUP_SIZE (DuckDB's default, 122,880 rows, would give one row group here),
    # under a path that needs quoting in SQL
    path = tmp_path / "it's here" / "events.duckdb"
    with DuckDBSink(path, threads=1) as s:
        w = window(0, 1)
        s.write_window("p", w, read_of(synthetic_batches(w, 36_000, duplicate_every=0), finisher(w)))
        sizes = s.connection.sql(
            "SELECT sum(count) FROM pragma_storage_info('events') WHERE column_name = 'uuid'"
            " AND segment_type = 'VARCHAR' GROUP BY row_group_id ORDER BY row_group_id"
        ).fetchall()
    assert [row[0] for row in sizes] == [ROW_GROUP_SIZE, 72_000 - ROW_GROUP_SIZE]
    with DuckDBSink(path, read_only=True) as again:
        assert count(again) == 72_000


def test_open_sink_and_open_errors_name_the_path(tmp_path: Path) -> None:
    s = open_sink(f"duckdb:{tmp_path / 'a' / 'b.duckdb'}")
    assert s.description == f"duckdb:{tmp_path / 'a' / 'b.duckdb'}"
    s.close()
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "garbage.duckdb").write_text("not a database" * 1000)
    for bad in (tmp_path / "file" / "x.duckdb", tmp_path, tmp_path / "garbage.duckdb"):
        with pytest.raises(DestinationError) as info:
            DuckDBSink(bad)
        assert str(bad) in str(info.value) and "\n" not in str(info.value)
        assert type(info.value) is DestinationError


def _spawn(code: str, marker: Path, *args: str) -> subprocess.Popen[bytes]:
    """`code` in a child process (the tests' helpers importable), once it has written `marker`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env)
    _wait_for(proc, marker)
    return proc


def test_a_second_process_holding_the_file_makes_it_busy(tmp_path: Path) -> None:
    path, marker = tmp_path / "events.duckdb", tmp_path / "ready"
    code = (
        "import sys, time, pathlib\nfrom amplitude_export.sinks.duckdb import DuckDBSink\n"
        f"s = DuckDBSink(pathlib.Path({str(path)!r}))\n"
        f"pathlib.Path({str(marker)!r}).write_text('x')\ntime.sleep(60)\n"
    )
    proc = _spawn(code, marker)
    try:
        with pytest.raises(DestinationBusyError, match=str(path)):
            DuckDBSink(path)
    finally:
        proc.kill()
        proc.wait()
    DuckDBSink(path).close()  # the lock dies with its process


HOLD_BETWEEN_WINDOWS = """
import os, pathlib, sys, time
from sink_helpers import batch, finisher, read_of, two_windows
from amplitude_export.sinks.duckdb import DuckDBSink
path, ready, closed, go_on = (pathlib.Path(arg) for arg in sys.argv[1:5])
sink = DuckDBSink(path)
win, rows = two_windows()[0]
sink.write_window("p", win, read_of([batch(rows)], finisher(win, rows)))
ready.write_text("x")  # between windows, as a run is while it downloads the next one
while not go_on.exists():
    time.sleep(0.01)
os.close(os.open(path, os.O_RDONLY))  # any close of any descriptor of the file drops DuckDB's own lock
closed.write_text("x")
time.sleep(60)
"""


def test_between_windows_no_other_process_gets_the_file(tmp_path: Path) -> None:
    """A writer that has committed a window and waits for the next one keeps the file to itself: no second
    writer, and (DuckDB's own lock intact) no reader; and the run's lock does not hang on DuckDB's, which any
    close of a descriptor of the file in the writer's process drops."""
    path, ready, closed, go_on = (tmp_path / name for name in ("events.duckdb", "ready", "closed", "go-on"))
    proc = _spawn(HOLD_BETWEEN_WINDOWS, ready, *map(str, (path, ready, closed, go_on)))
    try:
        with pytest.raises(DestinationBusyError, match=str(path)):
            DuckDBSink(path)
        with pytest.raises(DestinationBusyError, match=str(path)):
            DuckDBSink(path, read_only=True)
        go_on.write_text("x")
        _wait_for(proc, closed)
        with pytest.raises(DestinationBusyError, match=str(path)):
            DuckDBSink(path)
    finally:
        proc.kill()
        proc.wait()
    with DuckDBSink(path) as sink:  # both locks die with their process
        assert sink.connection.execute("SELECT count(*) FROM events").fetchone() == (5,)


def test_one_process_cannot_open_the_file_twice(tmp_path: Path) -> None:
    path = tmp_path / "events.duckdb"
    with DuckDBSink(path):
        with pytest.raises(DestinationBusyError, match=str(path)):
            DuckDBSink(path)
        with pytest.raises(DestinationBusyError, match=str(path)):
            DuckDBSink(path, read_only=True)
    DuckDBSink(path).close()
    assert (tmp_path / "events.duckdb.lock").exists()  # kept: see sinks/filelock.py


def _wait_for(proc: subprocess.Popen[bytes], marker: Path) -> None:
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert proc.poll() is None, "the writer process died early"
        assert time.monotonic() < deadline, "the writer process never got ready"
        time.sleep(0.02)


@pytest.mark.parametrize("point", ["batches", "finish"])
def test_kill_9_mid_window_then_the_same_run_leaves_exact_rows(tmp_path: Path, point: str) -> None:
    dest, marker = f"duckdb:{tmp_path / 'events.duckdb'}", tmp_path / "stalled"
    code = f"from sink_helpers import kill_writer\nkill_writer({dest!r}, {point!r}, {str(marker)!r})\n"
    proc = _spawn(code, marker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    (w1, rows1), (w2, rows2) = two_windows()
    with DuckDBSink(tmp_path / "events.duckdb") as s:
        assert uuids(s.read_arrow()) == ["u1", "u2", "u3", "u4", "u5"]
        assert sorted(s.ledger("p")) == [hour(0), hour(1)]
        s.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
        s.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))
        assert uuids(s.read_arrow()) == EXPECTED_UUIDS
        assert sorted(s.ledger("p")) == [hour(0), hour(1), hour(2), hour(3)]


def test_docs_schema_names_every_column() -> None:
    doc = (TESTS.parent / "docs" / "SCHEMA.md").read_text()
    for name in [c.name for c in ALL_COLUMNS] + [f.name for f in dataclasses.fields(HourRecord)]:
        assert f"`{name}`" in doc, f"docs/SCHEMA.md does not mention `{name}`"


def test_a_read_only_open_reads_rows_and_ledger(tmp_path: Path) -> None:
    (w1, rows1), _ = two_windows()
    with DuckDBSink(tmp_path / "e.duckdb") as s:
        s.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
    with open_sink(f"duckdb:{tmp_path / 'e.duckdb'}", read_only=True) as s:  # type: ignore[attr-defined]
        assert uuids(s.read_arrow()) == ["u1", "u2", "u3", "u4", "u5"]
        assert sorted(s.ledger("p")) == [hour(0), hour(1)]
    with pytest.raises(DestinationError, match="missing.duckdb"):
        DuckDBSink(tmp_path / "missing.duckdb", read_only=True)

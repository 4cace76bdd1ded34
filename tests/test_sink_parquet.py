"""The Parquet sink against real directories: layout, types, exactly once, replacement, crashes, locking."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from sink_helpers import (
    EXPECTED_UUIDS,
    Crash,
    batch,
    crashing,
    finisher,
    hour,
    hour_events,
    read_of,
    two_windows,
    uuids,
    window,
)

import amplitude_export
from amplitude_export.errors import DestinationBusyError, DestinationError
from amplitude_export.fake_server import FakeExportServer
from amplitude_export.ledger import EMPTY, FAILED, LOADED, HourRecord
from amplitude_export.schema import ARROW_SCHEMA, COLUMN_NAMES
from amplitude_export.sinks import open_sink
from amplitude_export.sinks.duckdb import DuckDBSink
from amplitude_export.sinks.parquet import LOST, ParquetSink, project_tag

TESTS = Path(__file__).parent
TAG = project_tag("p")  # the tests write as project "p"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "lake"


@pytest.fixture
def sink(root: Path) -> ParquetSink:
    with ParquetSink(str(root)) as s:
        yield s  # type: ignore[misc]


def data_files(root: Path) -> list[str]:
    """Every file under the partitions, temp files included, relative to root."""
    return sorted(str(p.relative_to(root)) for p in root.glob("upload_date=*/*"))


def hive(root: Path) -> list[dict[str, object]]:
    """What a reader of the dataset sees, via DuckDB's Hive partitioning."""
    glob = str(root / "**" / "*.parquet")
    return (
        duckdb.sql(f"SELECT * FROM read_parquet('{glob}', hive_partitioning = true) ORDER BY uuid")
        .to_arrow_table()
        .to_pylist()
    )


def test_layout_types_and_ledger(sink: ParquetSink, root: Path) -> None:
    w = window(22, 25)  # crosses midnight: one file per upload date
    rows = hour_events(hour(22), ["a", "b"]) + hour_events(hour(25), ["c"])

    records = sink.write_window("p", w, read_of([batch(rows)], finisher(w, rows)))

    assert data_files(root) == [
        f"upload_date=2024-03-01/20240301T22_20240301T23-{TAG}.parquet",
        f"upload_date=2024-03-02/20240302T00_20240302T01-{TAG}.parquet",
    ]
    for path in root.glob("upload_date=*/*.parquet"):
        assert pq.read_schema(path).remove_metadata().equals(ARROW_SCHEMA)
    seen = hive(root)
    assert [(r["uuid"], str(r["upload_date"])) for r in seen] == [
        ("a", "2024-03-01"),
        ("b", "2024-03-01"),
        ("c", "2024-03-02"),
    ]
    assert seen[0]["event_time"] == rows[0]["event_time"] and seen[0]["amplitude_id"] > 2**32
    assert sink.read_arrow().schema.equals(ARROW_SCHEMA)
    assert [(r.events_loaded, r.duplicates) for r in records] == [(2, 0), (0, 0), (0, 0), (1, 0)]
    assert sink.ledger("p") == {r.hour: r for r in records}
    assert not any(p.name.endswith(".parquet") for p in (root / "_state").iterdir())


def test_ledger_survives_reopen(root: Path) -> None:
    (w1, rows1), _ = two_windows()
    with ParquetSink(str(root)) as s:
        records = s.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
        s.record_hours("p", [HourRecord(hour=hour(9), status=EMPTY)])
    with ParquetSink(str(root)) as s:
        ledger = s.ledger("p")
        assert [ledger[r.hour] for r in records] == records
        assert ledger[hour(9)].status == EMPTY and ledger[hour(9)].updated_at is not None
        assert uuids(s.read_arrow()) == ["u1", "u2", "u3", "u4", "u5"]


def test_duplicates_within_and_across_windows_are_written_once_and_counted(
    sink: ParquetSink, root: Path
) -> None:
    (w1, rows1), (w2, rows2) = two_windows()

    r1 = sink.write_window("p", w1, read_of([batch(rows1[:2]), batch(rows1[2:])], finisher(w1, rows1)))
    r2 = sink.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))

    assert [r["uuid"] for r in hive(root)] == EXPECTED_UUIDS
    assert [(r.events_loaded, r.duplicates) for r in r1 + r2] == [(3, 1), (2, 1), (2, 1), (2, 2)]


def test_rewriting_a_window_replaces_its_files(sink: ParquetSink, root: Path) -> None:
    (w1, rows1), (w2, rows2) = two_windows()
    sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
    sink.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))
    before = data_files(root)

    changed = [dict(r, event_type="changed") for r in rows1 if r["uuid"] != "u3"]
    sink.write_window("p", w1, read_of([batch(changed)], finisher(w1, changed)))

    assert len(data_files(root)) == len(before) == 2 and data_files(root) != before
    seen = hive(root)
    assert [r["uuid"] for r in seen] == [u for u in EXPECTED_UUIDS if u != "u3"]
    assert {r["uuid"]: r["event_type"] for r in seen}["u1"] == "changed"


def test_a_window_inside_an_older_file_keeps_that_files_other_hours(sink: ParquetSink, root: Path) -> None:
    w = window(0, 3)
    rows = [r for _, part in two_windows() for r in part]
    sink.write_window("p", w, read_of([batch(rows)], finisher(w, rows)))

    one = window(1, 1)
    new = hour_events(hour(1), ["u4", "n1", "u8"])  # u8 lives in hour 3, outside the new window: skipped
    records = sink.write_window("p", one, read_of([batch(new)], finisher(one, new)))

    assert [(r.events_loaded, r.duplicates) for r in records] == [(2, 1)]
    assert data_files(root) == [
        f"upload_date=2024-03-01/20240301T00_20240301T00-{TAG}.parquet",
        f"upload_date=2024-03-01/20240301T01_20240301T01-{TAG}.parquet",
        f"upload_date=2024-03-01/20240301T02_20240301T03-{TAG}.parquet",
    ]
    assert [r["uuid"] for r in hive(root)] == sorted(["u1", "u2", "u3", "u4", "n1", "u6", "u7", "u8", "u9"])


def test_a_crash_inside_the_batches_leaves_nothing_of_the_window(sink: ParquetSink, root: Path) -> None:
    (w1, rows1), (w2, rows2) = two_windows()
    sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
    before = data_files(root)

    with pytest.raises(Crash):
        sink.write_window(
            "p", w2, read_of(crashing([batch(rows2[:2]), batch(rows2[2:])], after=1), finisher(w2, rows2)))

    assert data_files(root) == before
    assert sorted(sink.ledger("p")) == [hour(0), hour(1)]
    sink.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))
    assert [r["uuid"] for r in hive(root)] == EXPECTED_UUIDS


def test_orphans_of_a_crash_are_removed_on_open(root: Path) -> None:
    (w1, rows1), (w2, rows2) = two_windows()
    with ParquetSink(str(root)) as s:
        s.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
        s.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))
    # a crash after a data file was renamed into place but before the state named it, plus a half-written temp
    live = root / "upload_date=2024-03-01" / f"20240301T00_20240301T01-{TAG}.parquet"
    shutil.copy(live, live.with_name(f"20240301T00_20240301T01-{TAG}.1.parquet"))
    (live.parent / ".tmp-0123abcd").write_bytes(b"PAR1 half")
    (root / "upload_date=2024-03-05").mkdir()
    shutil.copy(live, root / "upload_date=2024-03-05" / f"20240305T00_20240305T00-{TAG}.parquet")
    (root / "_state" / ".tmp-ledger.json-deadbeef").write_text("{")
    assert len(hive(root)) > len(EXPECTED_UUIDS)

    with ParquetSink(str(root)) as s:
        assert [r["uuid"] for r in hive(root)] == EXPECTED_UUIDS
        assert data_files(root) == [
            f"upload_date=2024-03-01/20240301T00_20240301T01-{TAG}.parquet",
            f"upload_date=2024-03-01/20240301T02_20240301T03-{TAG}.parquet",
        ]
        assert not (root / "upload_date=2024-03-05").exists()
        assert [p.name for p in (root / "_state").glob(".tmp-*")] == []
        assert sorted(s.ledger("p")) == [hour(0), hour(1), hour(2), hour(3)]


def test_a_second_sink_on_the_directory_is_busy(sink: ParquetSink, root: Path) -> None:
    with pytest.raises(DestinationBusyError, match=str(root)):
        ParquetSink(str(root))
    sink.close()
    ParquetSink(str(root)).close()


def test_open_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(DestinationError, match="cannot open Parquet directory"):
        ParquetSink(str(tmp_path / "file" / "lake"))
    foreign = tmp_path / "foreign" / "upload_date=2024-01-01"
    foreign.mkdir(parents=True)
    pq.write_table(ARROW_SCHEMA.empty_table(), foreign / "x.parquet")
    with pytest.raises(DestinationError, match="no _state/ledger.json"):
        ParquetSink(str(tmp_path / "foreign"))
    assert (foreign / "x.parquet").exists()  # never deleted: it is not ours


def test_state_names_every_file_and_no_temp_is_left(sink: ParquetSink, root: Path) -> None:
    for w, rows in two_windows():
        sink.write_window("p", w, read_of([batch(rows)], finisher(w, rows)))
    state = json.loads((root / "_state" / "ledger.json").read_text())
    assert sorted(state["files"]) == data_files(root)
    assert sum(f["rows"] for f in state["files"].values()) == len(EXPECTED_UUIDS)


def test_parquet_and_duckdb_hold_the_same_rows(tmp_path: Path, root: Path) -> None:
    (w1, rows1), (w2, rows2) = two_windows()
    tables = []
    for dest in (f"duckdb:{tmp_path / 'x.duckdb'}", f"parquet:{root}"):
        s = open_sink(dest)
        s.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
        s.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))
        # reload in another arrival order: u2 now arrives first in hour 1, so hour 1 keeps it
        s.write_window("p", w1, read_of([batch(rows1[::-1])], finisher(w1, rows1)))
        tables.append(s.read_arrow())
        assert [(r.events_loaded, r.duplicates) for r in s.ledger("p").values()] == [
            (2, 2),
            (3, 0),
            (2, 1),
            (2, 2),
        ]
        s.close()
    assert tables[0].equals(tables[1])
    with DuckDBSink(tmp_path / "x.duckdb") as s:
        in_duckdb = s.connection.sql("SELECT * FROM events ORDER BY uuid").to_arrow_table().to_pylist()
    in_lake = [{k: v for k, v in r.items() if k != "upload_date"} for r in hive(root)]
    assert list(in_lake[0]) == list(COLUMN_NAMES)
    assert [{**r, **_json(r)} for r in in_lake] == [{**r, **_json(r)} for r in in_duckdb]


def _json(row: dict[str, object]) -> dict[str, object]:
    return {k: json.loads(v) for k, v in row.items() if k.endswith("properties") and isinstance(v, str)}


@pytest.mark.parametrize("point", ["batches", "commit"])
def test_kill_9_mid_window_then_the_same_run_leaves_exact_rows(
    root: Path, tmp_path: Path, point: str
) -> None:
    marker = tmp_path / "stalled"
    dest = f"parquet:{root}"
    code = f"from sink_helpers import kill_writer\nkill_writer({dest!r}, {point!r}, {str(marker)!r})\n"
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(TESTS)))
    deadline = time.monotonic() + 20
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the writer never stalled"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if point == "commit":  # the new files were renamed into place, the state does not name them yet
        assert len(list(root.glob("upload_date=*/*.parquet"))) == 2

    (w1, rows1), (w2, rows2) = two_windows()
    with ParquetSink(str(root)) as s:
        assert [r["uuid"] for r in hive(root)] == ["u1", "u2", "u3", "u4", "u5"]
        assert sorted(s.ledger("p")) == [hour(0), hour(1)]
        s.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
        s.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))
        assert [r["uuid"] for r in hive(root)] == EXPECTED_UUIDS
        assert sorted(s.ledger("p")) == [hour(0), hour(1), hour(2), hour(3)]


def test_a_read_only_open_neither_locks_nor_writes(sink: ParquetSink, root: Path) -> None:
    (w1, rows1), _ = two_windows()
    sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
    (root / "upload_date=2024-03-01" / ".tmp-in-progress").write_bytes(b"another run's temp file")
    shutil.rmtree(root / "_state" / "spill", ignore_errors=True)

    reader = open_sink(f"parquet:{root}", read_only=True)  # while the writer holds the lock
    assert uuids(reader.read_arrow()) == ["u1", "u2", "u3", "u4", "u5"]
    assert reader.count_by_hour("p") == {hour(0): 3, hour(1): 2}
    assert not (root / "_state" / "spill").exists()  # the writer's: it clears it whenever it opens
    assert sorted(reader.ledger("p")) == [hour(0), hour(1)]
    with pytest.raises(DestinationError, match="read-only"):
        reader.record_hours("p", [HourRecord(hour=hour(9), status=EMPTY)])
    reader.close()
    assert (root / "upload_date=2024-03-01" / ".tmp-in-progress").exists()
    with pytest.raises(DestinationError, match="not a Parquet dataset"):
        ParquetSink(str(root / "missing"), read_only=True)


# -- a data file deleted by hand --


def test_a_deleted_data_file_is_forgotten_on_open_and_its_window_reloads_once(root: Path) -> None:
    (w1, rows1), (w2, rows2) = two_windows()
    with ParquetSink(str(root)) as s:
        s.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
        s.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))
    # u1 is stored in the lost file only: window 2's copy of it was dropped as a duplicate
    (root / "upload_date=2024-03-01" / f"20240301T00_20240301T01-{TAG}.parquet").unlink()

    with open_sink(f"parquet:{root}", read_only=True) as reader:
        ledger = reader.ledger("p")
        assert [(r.status, r.events_loaded) for r in ledger.values()] == [
            (FAILED, 0), (FAILED, 0), (LOADED, 2), (LOADED, 2)]
        assert ledger[hour(0)].reason == LOST and ledger[hour(1)].reason == LOST
        assert uuids(reader.read_arrow()) == ["u6", "u7", "u8", "u9"]
        assert reader.count_by_hour("p") == {hour(2): 2, hour(3): 2}
        assert sorted(reader.read_batches(["uuid"]).read_all().column("uuid").to_pylist()) == ["u6", "u7", "u8", "u9"]

    with ParquetSink(str(root)) as s:  # a run can open it, and sees the same
        assert [r.status for r in s.ledger("p").values()] == [FAILED, FAILED, LOADED, LOADED]
        s.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
    assert [r["uuid"] for r in hive(root)] == EXPECTED_UUIDS
    with ParquetSink(str(root)) as s:
        assert [(r.status, r.events_loaded) for r in s.ledger("p").values()] == [
            (LOADED, 3), (LOADED, 2), (LOADED, 2), (LOADED, 2)]
    state = json.loads((root / "_state" / "ledger.json").read_text())
    assert sorted(state["files"]) == data_files(root)


def test_reloading_part_of_a_lost_file_commits_the_rest_as_failed(root: Path) -> None:
    (w1, rows1), (w2, rows2) = two_windows()
    with ParquetSink(str(root)) as s:
        s.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
        s.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))
    lost = f"upload_date=2024-03-01/20240301T02_20240301T03-{TAG}.parquet"
    (root / lost).unlink()

    hour_2 = [r for r in rows2 if r["_upload_hour"] == hour(2)]
    with ParquetSink(str(root)) as s:
        s.write_window("p", window(2, 2), read_of([batch(hour_2)], finisher(window(2, 2), hour_2)))
    state = json.loads((root / "_state" / "ledger.json").read_text())
    assert lost not in state["files"] and sorted(state["files"]) == data_files(root)
    assert state["ledger"]["p"][hour(3).isoformat()]["status"] == FAILED  # written down with the commit
    assert [r["uuid"] for r in hive(root)] == ["u1", "u2", "u3", "u4", "u5", "u6", "u7"]

    hour_3 = [r for r in rows2 if r["_upload_hour"] == hour(3)]
    with ParquetSink(str(root)) as s:
        assert [r.status for r in s.ledger("p").values()] == [LOADED, LOADED, LOADED, FAILED]
        s.write_window("p", window(3, 3), read_of([batch(hour_3)], finisher(window(3, 3), hour_3)))
        assert [r.status for r in s.ledger("p").values()] == [LOADED] * 4
    assert [r["uuid"] for r in hive(root)] == EXPECTED_UUIDS


def test_a_file_replaced_after_a_reader_opened_is_one_clear_error(sink: ParquetSink, root: Path) -> None:
    (w1, rows1), _ = two_windows()
    sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
    reader = open_sink(f"parquet:{root}", read_only=True)
    sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))  # deletes the file the reader knows
    for read in (lambda: reader.count_by_hour("p"), reader.read_arrow, lambda: reader.read_batches(["uuid"])):
        with pytest.raises(DestinationError, match=f"cannot read {root}"):
            read()
    reader.close()
    with open_sink(f"parquet:{root}", read_only=True) as again:  # reading again sees the new file
        assert [r.status for r in again.ledger("p").values()] == [LOADED, LOADED]
        assert again.count_by_hour("p") == {hour(0): 3, hour(1): 2}


def cli(*args: str, cwd: Path, server: FakeExportServer) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AMP_API_KEY": server.api_key, "AMP_SECRET_KEY": "demo-secret", "AMP_BASE_URL": server.url}
    return subprocess.run([sys.executable, "-c", "from amplitude_export.cli import main; main()", *args],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("repair", [["--refresh"], []], ids=["refresh", "plain-run"])
def test_verify_names_the_hours_of_a_deleted_file_and_a_run_over_them_repairs_it(
    tmp_path: Path, repair: list[str]
) -> None:
    dest = "parquet:lake"
    day = hour(0)
    with FakeExportServer(events_per_hour=20, data_start=day, data_end=hour(47)) as server:
        first = cli("run", "--start", "2024-03-01", "--end", "2024-03-02", "--dest", dest, "--no-progress",
                    cwd=tmp_path, server=server)
        assert first.returncode == 0, first.stderr
        lake = tmp_path / "lake"
        kept = {p: p.read_bytes() for p in lake.glob("upload_date=2024-03-01/*.parquet")}
        assert len(kept) == 1
        for path in lake.glob("upload_date=2024-03-02/*.parquet"):
            path.unlink()

        bad = cli("verify", "--dest", dest, cwd=tmp_path, server=server)
        assert bad.returncode == 1, bad.stderr
        assert "Traceback" not in bad.stderr and "upload_date=2024-03-02/20240302T00_20240302T23" in bad.stderr
        assert bad.stdout.splitlines()[:2] == [
            "24 problems in 1 run of hours:",
            f"  2024-03-02T00..2024-03-02T23: 24 hours failed ({LOST})",
        ]
        report = cli("report", "--dest", dest, "--out", "report.html", cwd=tmp_path, server=server)
        assert report.returncode == 0, report.stderr
        assert LOST in (tmp_path / "report.html").read_text()

        fixed = cli("run", *repair, "--start", "2024-03-02", "--end", "2024-03-02", "--dest", dest, "--no-progress",
                    cwd=tmp_path, server=server)
        assert fixed.returncode == 0 and "1 window (1 loaded)" in fixed.stdout, fixed.stderr
        good = cli("verify", "--dest", dest, cwd=tmp_path, server=server)
        assert good.returncode == 0 and "48 loaded" in good.stdout and "complete" in good.stdout, good.stdout
        expected = server.expected_uuids(day, hour(47))
    stored = amplitude_export.read_arrow(f"parquet:{lake}").column("uuid").to_pylist()
    assert len(stored) == len(set(stored)) and set(stored) == expected
    assert {p: p.read_bytes() for p in lake.glob("upload_date=2024-03-01/*.parquet")} == kept

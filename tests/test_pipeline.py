"""`run` end to end: the fake Export API -> the reader -> DuckDB / Parquet, exactly once, incremental."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest
import stamina

from amplitude_export import read_arrow, read_events
from amplitude_export.client import ExportClient
from amplitude_export.config import Credentials, Secret
from amplitude_export.fake_server import FakeExportServer
from amplitude_export.pipeline import run
from amplitude_export.sinks import open_sink

START = datetime(2024, 3, 1, tzinfo=UTC)
NOW = datetime(2024, 4, 1, tzinfo=UTC)


@pytest.fixture(autouse=True)
def no_backoff_sleeps() -> Iterator[None]:
    with stamina.set_testing(True, attempts=100, cap=True):
        yield


def client_for(server: FakeExportServer) -> ExportClient:
    return ExportClient(Credentials(server.api_key, Secret("demo-secret"), "us", server.url))


def run_into(server: FakeExportServer, dest: str, data_dir: Path, **options: object):  # type: ignore[no-untyped-def]
    sink = open_sink(dest)
    try:
        with client_for(server) as client:
            return run(client, sink, project="p", data_dir=data_dir, now=options.pop("now", NOW),  # type: ignore[arg-type]
                       **options)  # type: ignore[arg-type]
    finally:
        sink.close()


def uuids_in(database: Path) -> list[str]:
    with duckdb.connect(str(database), read_only=True) as con:
        return [row[0] for row in con.execute("SELECT uuid FROM events").fetchall()]


def test_exactly_the_distinct_uuids_with_faults_duplicates_and_a_malformed_line(tmp_path: Path) -> None:
    database = tmp_path / "a.duckdb"
    with FakeExportServer(events_per_hour=30, members_per_hour=2, malformed_lines=True, fault_rate=0.3,
                          seed=5) as server:
        report = run_into(server, f"duckdb:{database}", tmp_path, start="2024-03-01", end="2024-03-02")
        expected = server.expected_uuids(START, START + timedelta(hours=47))
        rejects = server.expected_rejects(START, START + timedelta(hours=47))
        lines = server.expected_events(START, START + timedelta(hours=47))
    assert report.exit_code == 0, report.summary()
    stored = uuids_in(database)
    assert len(stored) == len(set(stored)) and set(stored) == expected
    assert report.rejects == rejects > 0
    assert lines > len(expected)  # the server did serve duplicates
    rejects_files = list((tmp_path / "rejects").glob("*.jsonl"))
    assert rejects_files and sum(len(f.read_text().splitlines()) for f in rejects_files) == rejects
    with duckdb.connect(str(database), read_only=True) as con:
        types = dict(con.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'events'").fetchall())
        assert types["event_time"] == "TIMESTAMP WITH TIME ZONE" and types["event_id"] == "BIGINT"
        assert types["event_properties"] == "JSON" and types["insert_id"] == "VARCHAR"
        total, loaded = con.execute(
            "SELECT (SELECT count(*) FROM events), sum(events_loaded) FROM _amplitude_ledger").fetchone()
        assert total == loaded
        dup = con.execute("SELECT sum(duplicates) FROM _amplitude_ledger").fetchone()[0]
        assert dup == lines - len(expected)

    # a second identical run changes nothing (and asks for nothing)
    with FakeExportServer(events_per_hour=30, members_per_hour=2, malformed_lines=True, seed=5) as server:
        again = run_into(server, f"duckdb:{database}", tmp_path, start="2024-03-01", end="2024-03-02")
        assert server.requests == []
    assert again.outcomes == [] and sorted(uuids_in(database)) == sorted(stored)


def test_refresh_replaces_rows_and_parquet_matches_duckdb(tmp_path: Path) -> None:
    with FakeExportServer(events_per_hour=25, seed=9) as server:
        run_into(server, f"duckdb:{tmp_path / 'a.duckdb'}", tmp_path / "d1", start="2024-03-01", end="2024-03-01")
        run_into(server, f"duckdb:{tmp_path / 'a.duckdb'}", tmp_path / "d1", start="2024-03-01", end="2024-03-01",
                 refresh=True)
        run_into(server, f"parquet:{tmp_path / 'pq'}", tmp_path / "d2", start="2024-03-01", end="2024-03-01")
        expected = server.expected_uuids(START, START + timedelta(hours=23))
    from_duckdb = read_arrow(f"duckdb:{tmp_path / 'a.duckdb'}").sort_by("uuid")
    from_parquet = read_arrow(f"parquet:{tmp_path / 'pq'}").sort_by("uuid")
    assert set(from_duckdb.column("uuid").to_pylist()) == expected and from_duckdb.num_rows == len(expected)
    exported = [c for c in from_duckdb.column_names if c != "_run_id"]
    assert from_duckdb.select(exported).equals(from_parquet.select(exported))
    with duckdb.connect() as con:
        rows = con.execute(
            f"SELECT count(*), count(DISTINCT uuid) FROM read_parquet('{tmp_path / 'pq'}/**/*.parquet', "
            "hive_partitioning=true)").fetchone()
    assert rows == (len(expected), len(expected))
    frame = read_events(f"duckdb:{tmp_path / 'a.duckdb'}", start="2024-03-01T05", end="2024-03-01T06")
    assert len(frame) > 0 and frame["server_upload_time"].dt.hour.isin([5, 6]).all()


def test_incremental_runs_continue_from_the_last_loaded_hour(tmp_path: Path) -> None:
    database = tmp_path / "a.duckdb"
    with FakeExportServer(events_per_hour=5) as server:
        # the first run ever takes yesterday
        first = run_into(server, f"duckdb:{database}", tmp_path, now=datetime(2024, 3, 2, 10, 30, tzinfo=UTC),
                         lookback_hours=0)
        assert [str(o.window) for o in first.outcomes] == ["2024-03-01T00..2024-03-01T23"]
        # later the same day: continue from 2024-03-02T00 up to the last ready hour (07 at 10:30 with lag 2)
        second = run_into(server, f"duckdb:{database}", tmp_path, now=datetime(2024, 3, 2, 10, 30, tzinfo=UTC),
                          lookback_hours=0)
        assert [str(o.window) for o in second.outcomes] == ["2024-03-02T00..2024-03-02T07"]
        third = run_into(server, f"duckdb:{database}", tmp_path, now=datetime(2024, 3, 3, 2, 30, tzinfo=UTC),
                         lookback_hours=0)
        assert [str(o.window) for o in third.outcomes] == ["2024-03-02T08..2024-03-02T23"]
        expected = server.expected_uuids(START, START + timedelta(hours=47))
    assert sorted(uuids_in(database)) == sorted(expected)


def test_empty_windows_are_recorded_and_not_asked_again(tmp_path: Path) -> None:
    database = tmp_path / "a.duckdb"
    with FakeExportServer(data_start=START + timedelta(days=1)) as server:
        report = run_into(server, f"duckdb:{database}", tmp_path, start="2024-03-01", end="2024-03-01")
        assert [o.status for o in report.outcomes] == ["empty"]
        run_into(server, f"duckdb:{database}", tmp_path, start="2024-03-01", end="2024-03-01")
        assert len(server.requests) == 1
    with duckdb.connect(str(database), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM _amplitude_ledger WHERE status = 'empty'").fetchone()[0] == 24


def test_sigkill_during_a_multi_window_run_then_rerun_gives_exact_rows(tmp_path: Path) -> None:
    database = tmp_path / "a.duckdb"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
    env.update(AMP_API_KEY="demo-key", AMP_SECRET_KEY="demo-secret")
    with FakeExportServer(events_per_hour=400, members_per_hour=3) as server:
        command = [sys.executable, "-c", "from amplitude_export.cli import main; main()", "run",
                   "--base-url", server.url, "--start", "2024-03-01", "--end", "2024-03-06", "--window-hours", "12",
                   "--dest", f"duckdb:{database}", "--data-dir", str(tmp_path / "data"), "--no-progress",
                   "--log-dir", str(tmp_path / "logs")]
        process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # kill it once a few windows are in (or after a few seconds), in the middle of its work
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if database.exists() and len(list((tmp_path / "data" / "raw").glob("*.zip"))) >= 4:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        expected = server.expected_uuids(START, START + timedelta(days=6) - timedelta(hours=1))
    stored = uuids_in(database)
    assert len(stored) == len(set(stored)) and set(stored) == expected

"""`amplitude_export.dlt.amplitude_source` in a real dlt pipeline into dlt's DuckDB, against the fake Export API."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dlt  # in the test extra: a missing dlt fails here rather than skipping
import duckdb
import pytest
import stamina

from amplitude_export.dlt import amplitude_source
from amplitude_export.errors import UsageError
from amplitude_export.fake_server import FakeExportServer

DAY = datetime(2024, 3, 1, tzinfo=UTC)


@pytest.fixture(autouse=True)
def quiet_dlt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """dlt's home, working dirs and config all in tmp_path; no telemetry; retries that never sleep."""
    monkeypatch.setenv("RUNTIME__DLTHUB_TELEMETRY", "false")
    monkeypatch.setenv("DLT_DATA_DIR", str(tmp_path / "dlt-home"))
    monkeypatch.chdir(tmp_path)  # no stray .dlt/ or .env is read
    with stamina.set_testing(True, attempts=100, cap=True):
        yield


def make_pipeline(tmp_path: Path) -> Any:
    return dlt.pipeline(
        pipeline_name="amplitude_test",
        pipelines_dir=str(tmp_path / "pipelines"),
        destination=dlt.destinations.duckdb(str(tmp_path / "dlt.duckdb")),
        dataset_name="amplitude",
    )


def source(server: FakeExportServer, **options: Any) -> Any:
    return amplitude_source("demo-key", "demo-secret", base_url=server.url, **options)


def loaded_uuids(tmp_path: Path) -> list[str]:
    with duckdb.connect(str(tmp_path / "dlt.duckdb"), read_only=True) as con:
        return [row[0] for row in con.execute("SELECT uuid FROM amplitude.events").fetchall()]


def test_incremental_runs_load_each_uuid_once(tmp_path: Path) -> None:
    with FakeExportServer(events_per_hour=25, members_per_hour=2, malformed_lines=True, fault_rate=0.3, seed=7,
                          data_start=DAY, data_end=DAY + timedelta(hours=71)) as server:
        pipeline = make_pipeline(tmp_path)
        two_days_later = DAY + timedelta(days=2, hours=3)  # the last ready hour is day 3, 00:00

        info = pipeline.run(source(server, start="2024-03-01", now=two_days_later))
        assert not info.has_failed_jobs
        stored = loaded_uuids(tmp_path)
        assert len(stored) == len(set(stored))
        assert set(stored) == server.expected_uuids(DAY, DAY + timedelta(hours=48))
        assert server.expected_events(DAY, DAY + timedelta(hours=48)) > len(stored)  # duplicates were served

        # same clock: the cursor says day 3 00:00 is loaded, so nothing is asked for and nothing is added
        asked = len(server.requests)
        pipeline.run(source(server, now=two_days_later))
        assert len(server.requests) == asked
        assert sorted(loaded_uuids(tmp_path)) == sorted(stored)

        # a day later: only the new hours are asked for
        pipeline.run(source(server, now=two_days_later + timedelta(days=1)))
        windows = {(start, end) for start, end, _ in server.requests[asked:]}
        assert windows == {("20240303T01", "20240303T23"), ("20240304T00", "20240304T00")}  # the last is a 404
        stored = loaded_uuids(tmp_path)
        assert len(stored) == len(set(stored))
        assert set(stored) == server.expected_uuids(DAY, DAY + timedelta(hours=71))

    with duckdb.connect(str(tmp_path / "dlt.duckdb"), read_only=True) as con:
        types = dict(con.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'amplitude' AND table_name = 'events'").fetchall())
    assert types["server_upload_time"] == "TIMESTAMP WITH TIME ZONE" and types["amplitude_id"] == "BIGINT"


def test_a_backfill_leaves_the_cursor_alone(tmp_path: Path) -> None:
    with FakeExportServer(events_per_hour=10, data_start=DAY, data_end=DAY + timedelta(hours=47)) as server:
        pipeline = make_pipeline(tmp_path)
        now = DAY + timedelta(days=30)
        pipeline.run(source(server, start="2024-03-02", end="2024-03-02", now=now))
        assert set(loaded_uuids(tmp_path)) == server.expected_uuids(DAY + timedelta(days=1),
                                                                     DAY + timedelta(hours=47))
        pipeline.run(source(server, start="2024-03-01", end="2024-03-01", now=now))  # an earlier day still loads
        stored = loaded_uuids(tmp_path)
        assert len(stored) == len(set(stored)) and set(stored) == server.expected_uuids(DAY, DAY + timedelta(hours=47))


def test_a_window_that_keeps_failing_loads_nothing_and_the_next_run_gets_it(tmp_path: Path) -> None:
    with FakeExportServer(events_per_hour=10, data_start=DAY, data_end=DAY + timedelta(hours=23),
                          faults=["503"] * 3) as server:
        pipeline = make_pipeline(tmp_path)
        now = DAY + timedelta(days=1, hours=3)
        with pytest.raises(Exception, match="nothing of this run is loaded"):
            pipeline.run(source(server, start="2024-03-01", max_attempts=2, now=now))
        assert not (tmp_path / "dlt.duckdb").exists() or not loaded_uuids_or_none(tmp_path)
        # each window has up to three scripted 503s left: the first run stops at the first window that gives
        # up, sometimes before another window's first or second attempt, so four attempts cover every case
        pipeline.run(source(server, max_attempts=4, now=now))
        stored = loaded_uuids(tmp_path)
        assert len(stored) == len(set(stored)) and set(stored) == server.expected_uuids(DAY, DAY + timedelta(hours=23))


def loaded_uuids_or_none(tmp_path: Path) -> list[str] | None:
    try:
        return loaded_uuids(tmp_path)
    except duckdb.CatalogException:
        return None


def test_without_dlt_the_error_names_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dlt", None)
    with pytest.raises(UsageError, match=r"pip install 'amplitude-export\[dlt\]'"):
        amplitude_source("k", "s")


def test_the_other_streams_are_resources_and_cohorts_download_once(tmp_path: Path) -> None:
    from test_streams import COMPARED, expected

    others = ["cohorts", "cohort_members", "annotations", "events_list", "taxonomy", "active_users",
              "average_session_length"]
    with FakeExportServer(events_per_hour=20, data_start=DAY, data_end=DAY.replace(day=2, hour=23),
                          apis={"cohort_polls": 0}) as server:
        pipeline = make_pipeline(tmp_path)
        for _ in range(2):
            info = pipeline.run(source(server, streams=others, start="2024-03-01", end="2024-03-02"))
            assert not info.has_failed_jobs
        assert server.apis.cohort_downloads == 4  # the second run found every cohort unchanged
        want = expected(server.apis.project, [DAY.date(), DAY.date() + timedelta(days=1)])
    with duckdb.connect(str(tmp_path / "dlt.duckdb"), read_only=True) as con:
        for table, columns in COMPARED.items():
            rows = con.execute(f"SELECT {', '.join(columns)} FROM amplitude.{table}").fetchall()
            if table == "cohorts":
                rows = [(*row[:5], tuple(json.loads(row[5]))) for row in rows]
            assert len(rows) == len(set(rows)) and set(rows) == want[table], table
        assert not con.execute("SELECT count(*) FROM amplitude.events_list WHERE _taken_at IS NULL").fetchone()[0]

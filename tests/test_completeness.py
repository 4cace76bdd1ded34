"""Completeness: the per-hour ledger, `verify`, lookback with change detection, the size planner."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest
import stamina
from click.testing import CliRunner

from amplitude_export.cli import cli
from amplitude_export.client import ExportClient
from amplitude_export.config import Credentials, Secret
from amplitude_export.fake_server import FakeExportServer
from amplitude_export.ledger import LOADED, HourRecord
from amplitude_export.pipeline import fit_budget, hour_size_estimator, run
from amplitude_export.sinks import open_sink
from amplitude_export.verify import verify
from amplitude_export.windows import Window

DAY = datetime(2024, 3, 1, tzinfo=UTC)


@pytest.fixture(autouse=True)
def no_backoff_sleeps() -> Iterator[None]:
    with stamina.set_testing(True, attempts=100, cap=True):
        yield


def run_into(server: FakeExportServer, database: Path, data_dir: Path, **options: object):  # type: ignore[no-untyped-def]
    sink = open_sink(f"duckdb:{database}")
    try:
        with ExportClient(Credentials("demo-key", Secret("demo-secret"), "us", server.url)) as client:
            return run(client, sink, project="p", data_dir=data_dir, **options)  # type: ignore[arg-type]
    finally:
        sink.close()


def test_lookback_reloads_only_the_hours_amplitude_changed(tmp_path: Path) -> None:
    database = tmp_path / "a.duckdb"
    now = datetime(2024, 3, 3, 2, 30, tzinfo=UTC)  # ready through 2024-03-02T23
    with FakeExportServer(events_per_hour=20, data_start=DAY, data_end=DAY + timedelta(days=2, hours=-1)) as server:
        first = run_into(server, database, tmp_path, start="2024-03-01", end="2024-03-02", now=now)
        assert first.exit_code == 0
        with duckdb.connect(str(database), read_only=True) as con:
            before = dict(con.execute("SELECT hour::VARCHAR, run_id FROM _amplitude_ledger").fetchall())
        # Amplitude re-exports two hours after its integrity check
        server.set_hour_version(DAY + timedelta(hours=30), 1)
        server.set_hour_version(DAY + timedelta(hours=31), 1)
        second = run_into(server, database, tmp_path, now=now, lookback_hours=24)
        expected = server.expected_uuids(DAY, DAY + timedelta(hours=47))
    assert [h.strftime("%Y-%m-%dT%H") for h in second.changed_hours] == ["2024-03-02T06", "2024-03-02T07"]
    assert any(note.startswith("2 hours changed since last run: 2024-03-02T06, 2024-03-02T07") for note in second.notes)
    with duckdb.connect(str(database), read_only=True) as con:
        after = dict(con.execute("SELECT hour::VARCHAR, run_id FROM _amplitude_ledger").fetchall())
        uuids = [r[0] for r in con.execute("SELECT uuid FROM events").fetchall()]
    reloaded = {hour for hour in after if after[hour] != before[hour]}
    assert len(reloaded) == 2  # the other 22 re-checked hours cost a download and a hash, never a reload
    assert len(uuids) == len(set(uuids)) and set(uuids) == expected


def test_verify_deep_is_clean_after_a_lookback_reload_beside_the_older_archive(tmp_path: Path) -> None:
    database = tmp_path / "a.duckdb"
    now = datetime(2024, 3, 3, 2, 30, tzinfo=UTC)  # ready through 2024-03-02T23
    changed = DAY + timedelta(hours=20)
    with FakeExportServer(events_per_hour=20, data_start=DAY, data_end=DAY + timedelta(days=2, hours=-1)) as server:
        assert run_into(server, database, tmp_path, start="2024-03-01", end="2024-03-02", now=now).exit_code == 0
        server.set_hour_version(changed, 1)
        # 30 hours back from 2024-03-02T23 starts at 2024-03-01T18: the re-check lands 20240301T18_20240301T23.zip
        # beside the day's archive, which still holds the hour as it was first loaded
        second = run_into(server, database, tmp_path, now=now, lookback_hours=30)
    assert second.changed_hours == [changed]
    assert "1 hour changed since last run: 2024-03-01T20 (reloaded)" in second.notes
    raw = tmp_path / "raw"
    assert (raw / "20240301T00_20240301T23.zip").exists() and (raw / "20240301T18_20240301T23.zip").exists()
    sink = open_sink(f"duckdb:{database}")
    try:
        result = verify(sink, "p", deep=True, raw_dir=raw)
    finally:
        sink.close()
    assert result.problems == [] and result.complete
    assert result.archives_hashed == 48  # each loaded hour once, from the archive it was loaded from


def test_verify_is_complete_then_names_the_hour_whose_rows_were_deleted(tmp_path: Path) -> None:
    database = tmp_path / "a.duckdb"
    with FakeExportServer(events_per_hour=15) as server:
        run_into(server, database, tmp_path, start="2024-03-01", end="2024-03-01", now=DAY + timedelta(days=5))
    sink = open_sink(f"duckdb:{database}")
    try:
        result = verify(sink, "p", deep=True, raw_dir=tmp_path / "raw")
    finally:
        sink.close()
    assert result.complete and result.hours_checked == 24 and result.archives_hashed == 24
    runner = CliRunner()
    ok = runner.invoke(cli, ["verify", "--dest", f"duckdb:{database}", "--project", "p", "--deep",
                             "--data-dir", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    with duckdb.connect(str(database)) as con:
        con.execute("DELETE FROM events WHERE _upload_hour = TIMESTAMPTZ '2024-03-01 05:00:00+00'")
    bad = runner.invoke(cli, ["verify", "--dest", f"duckdb:{database}", "--project", "p"])
    assert bad.exit_code == 1
    assert "2024-03-01T05" in bad.output and "2024-03-01T06" not in bad.output


def test_verify_deep_notices_a_changed_archive(tmp_path: Path) -> None:
    database = tmp_path / "a.duckdb"
    with FakeExportServer(events_per_hour=15) as server:
        run_into(server, database, tmp_path, start="2024-03-01", end="2024-03-01", now=DAY + timedelta(days=5))
    with FakeExportServer(events_per_hour=15, seed=1) as other:  # other content, same hours
        with ExportClient(Credentials("demo-key", Secret("demo-secret"), "us", other.url)) as client:
            client.fetch(Window(DAY, DAY + timedelta(hours=23)), tmp_path / "raw", fresh=True)
    sink = open_sink(f"duckdb:{database}")
    try:
        result = verify(sink, "p", deep=True, raw_dir=tmp_path / "raw")
    finally:
        sink.close()
    assert not result.complete and {p.kind for p in result.problems} == {"hash"} and len(result.problems) == 24


def test_planner_learns_hour_sizes_and_stays_under_the_budget() -> None:
    ledger = {DAY + timedelta(hours=h): HourRecord(DAY + timedelta(hours=h), LOADED, bytes=100 if h != 5 else 900)
              for h in range(24)}
    estimate = hour_size_estimator(ledger)
    windows = fit_budget([Window(DAY, DAY + timedelta(hours=23))], estimate, 1000)
    assert [h for w in windows for h in w.each_hour()] == list(Window(DAY, DAY + timedelta(hours=23)).each_hour())
    assert all(sum(estimate(h) for h in w.each_hour()) <= 1000 or w.hours == 1 for w in windows)
    # unseen hours are guessed from the recent ones, so the next day is planned in pieces from the start
    tomorrow = Window(DAY + timedelta(days=1), DAY + timedelta(days=1, hours=23))
    assert len(fit_budget([tomorrow], estimate, 500)) > 1


def test_windows_stay_within_the_uuids_a_sink_dedups_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past SEEN_LIMIT uuids a window's repeats go to the slow SQL path, so the planner cuts windows to the
    lines the ledger saw per hour (9/10 of the limit); the rows stay exactly the distinct uuids served."""
    import amplitude_export.sinks

    database = tmp_path / "a.duckdb"
    with FakeExportServer(events_per_hour=15) as server:
        first = run_into(server, database, tmp_path, start="2024-03-01", end="2024-03-01", now=DAY + timedelta(days=5))
        assert first.exit_code == 0 and len(first.outcomes) == 1
        monkeypatch.setattr(amplitude_export.sinks, "SEEN_LIMIT", 100)  # 90 lines a window: 6 hours of 15
        server.requests.clear()
        second = run_into(server, database, tmp_path, start="2024-03-02", end="2024-03-02",
                          now=DAY + timedelta(days=5))
        assert second.exit_code == 0
        lines = server.hour_events(DAY)  # lines an hour holds (repeats included)
        assert len(second.outcomes) > 1 and all(o.window.hours * lines <= 90 for o in second.outcomes)
        assert sum(o.window.hours for o in second.outcomes) == 24
        expected = len(server.expected_uuids(DAY, DAY + timedelta(days=2, hours=-1)))
    with duckdb.connect(str(database), read_only=True) as con:
        assert con.execute("SELECT count(*), count(DISTINCT uuid) FROM events").fetchone() == (expected, expected)


def test_learned_sizes_avoid_the_400(tmp_path: Path) -> None:
    database = tmp_path / "a.duckdb"
    with FakeExportServer(events_per_hour=40, max_archive_bytes=120_000) as server:
        first = run_into(server, database, tmp_path, start="2024-03-01", end="2024-03-01", now=DAY + timedelta(days=5))
        assert first.exit_code == 0
        asked_first = [status for *_, status in server.requests]
        assert 400 in asked_first  # the first run had to learn by splitting
        server.requests.clear()
        second = run_into(server, database, tmp_path, start="2024-03-02", end="2024-03-02",
                          now=DAY + timedelta(days=5), size_budget=100_000)
        assert second.exit_code == 0
        assert 400 not in [status for *_, status in server.requests]

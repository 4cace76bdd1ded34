"""`amplitude-export status` shows the ledger: spans, every hour with `--hours`, every field with `--json`."""

from __future__ import annotations

import json
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path

import pytest
import stamina
from click.testing import CliRunner

from amplitude_export.cli import cli
from amplitude_export.client import ExportClient
from amplitude_export.config import Credentials, Secret
from amplitude_export.fake_server import FakeExportServer
from amplitude_export.ledger import FAILED, LOADED, HourRecord, spans
from amplitude_export.pipeline import run
from amplitude_export.sinks import open_sink
from amplitude_export.windows import HOUR

EMPTY_HOUR = datetime(2024, 3, 1, 4, tzinfo=UTC)


@pytest.fixture(params=["duckdb", "parquet"])
def loaded(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[datetime, HourRecord]]:
    """A destination holding 2024-03-01 of project `web` (two members an hour, duplicates, rejects, one empty
    hour), and its ledger as the sink reads it."""
    dest = f"duckdb:{tmp_path / 'a.duckdb'}" if request.param == "duckdb" else f"parquet:{tmp_path / 'events'}"
    with stamina.set_testing(True), FakeExportServer(events_per_hour=30, members_per_hour=2, malformed_lines=True,
                                                     empty_hours=[EMPTY_HOUR]) as server:
        credentials = Credentials(server.api_key, Secret("demo-secret"), "us", server.url)
        with ExportClient(credentials) as client, open_sink(dest) as sink:
            report = run(client, sink, project="web", start="2024-03-01", end="2024-03-01",
                         data_dir=tmp_path / "data")
    assert report.exit_code == 0
    with open_sink(dest, read_only=True) as sink:
        ledger = sink.ledger("web")
    assert len(ledger) == 24 and ledger[EMPTY_HOUR].status == "empty"
    return dest, ledger


def status(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["status", *args])
    return result.exit_code, result.stdout, result.stderr


def hour_rows(output: str) -> dict[str, list[str]]:
    """The table's rows by hour label, each as its stripped cells."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if cells and cells[0].startswith("2024-"):
            rows[cells[0]] = cells
    return rows


def test_json_carries_every_ledger_field_of_every_hour(loaded: tuple[str, dict[datetime, HourRecord]]) -> None:
    dest, ledger = loaded
    for extra in ([], ["--hours"]):
        code, out, err = status("--dest", dest, "--json", *extra)
        assert code == 0, err
        data = json.loads(out)
        assert [row["hour"] for row in data["ledger"]] == [hour.isoformat() for hour in sorted(ledger)]
        for row in data["ledger"]:
            assert set(row) == {field.name for field in fields(HourRecord)}
            assert HourRecord.from_dict(row) == ledger[datetime.fromisoformat(row["hour"])]
        members = data["ledger"][5]["members"]
        assert len(members) == 2 and all(set(member) == {"name", "size", "crc"} for member in members)
        assert members[0]["name"] == "187520/187520_2024-03-01_5#0.json.gz"


def test_hours_prints_one_line_per_ledger_hour_in_the_range(loaded: tuple[str, dict[datetime, HourRecord]]) -> None:
    dest, ledger = loaded
    code, out, err = status("--dest", dest, "--hours", "--start", "2024-03-01T03", "--end", "2024-03-01T05")
    assert code == 0, err
    rows = hour_rows(out)
    assert list(rows) == ["2024-03-01T03", "2024-03-01T04", "2024-03-01T05"]
    header = next(line for line in out.splitlines() if "server_upload_time" in line)
    names = [cell.strip() for cell in header.strip().strip("┃").split("┃")]
    for label, cells in rows.items():
        record = ledger[datetime.strptime(label, "%Y-%m-%dT%H").replace(tzinfo=UTC)]
        row = dict(zip(names, cells, strict=True))
        assert row["status"] == record.status
        assert row["events"] == f"{record.events_loaded:,}" and row["dups"] == f"{record.duplicates:,}"
        assert row["rejects"] == f"{record.rejects:,}" and row["lines"] == f"{record.lines_read:,}"
        assert row["bytes"] == f"{record.bytes:,}" and row["tries"] == str(record.attempts)
        assert row["members"] == str(len(record.members)) and row["split from"] == (record.split_from or "")
        assert row["hash"] == (record.content_hash or "")[:12]
        if record.status == "loaded":
            assert record.lines_read > 0 and record.rejects == 2 and len(record.members) == 2
            assert record.min_server_upload_time and record.max_server_upload_time
            assert row["server_upload_time"] == (f"{record.min_server_upload_time:%H:%M:%S}.."
                                                 f"{record.max_server_upload_time:%H:%M:%S}")
            low, high = row["event_time"].split("..")
            assert record.min_event_time and record.max_event_time and high == f"{record.max_event_time:%H:%M:%S}"
            assert low in (f"{record.min_event_time:%H:%M:%S}", f"{record.min_event_time:%Y-%m-%d %H:%M:%S}")
        else:
            assert row["server_upload_time"] == row["event_time"] == row["hash"] == ""
    loaded_events = sum(ledger[hour].events_loaded for hour in sorted(ledger)[3:6])
    assert f"{loaded_events:,} events in 3 hours from 2024-03-01T03 to 2024-03-01T05" in out

    code, out, err = status("--dest", dest, "--hours")
    assert code == 0 and len(hour_rows(out)) == 24, err


def test_the_range_limits_spans_and_ledger_and_bad_ranges_exit_2(
    loaded: tuple[str, dict[datetime, HourRecord]],
) -> None:
    dest, _ = loaded
    code, out, err = status("--dest", dest, "--json", "--start", "20240301T06", "--end", "2024-03-01")
    data = json.loads(out)
    assert code == 0 and data["hours"] == len(data["ledger"]) == 18, err
    assert [(span["start"], span["end"]) for span in data["windows"]] == [("2024-03-01T06", "2024-03-01T23")]
    assert data["next_run_starts"] == "2024-03-02T00"
    for args in (["--start", "2024-03-02", "--end", "2024-03-01"], ["--start", "noon"]):
        code, out, err = status("--dest", dest, "--hours", *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err


def test_spans_cut_at_midnight_unless_asked_not_to() -> None:
    """`--json` (and the report) cut spans at midnight; the table joins them across it."""
    hours = [datetime(2024, 3, 1, 22, tzinfo=UTC) + n * HOUR for n in range(5)]  # 22, 23, 00, 01, 02
    ledger = {hour: HourRecord(hour=hour, status=LOADED, events_loaded=10, bytes=100, run_id=f"r{n}")
              for n, hour in enumerate(hours)}  # fmt: skip
    ledger[hours[4]] = HourRecord(hour=hours[4], status=FAILED, reason="504", run_id="r4")
    assert [(s["start"], s["end"], s["hours"], s["events"], s["run_id"]) for s in spans(ledger)] == [
        ("2024-03-01T22", "2024-03-01T23", 2, 20, "r1"),
        ("2024-03-02T00", "2024-03-02T01", 2, 20, "r3"),
        ("2024-03-02T02", "2024-03-02T02", 1, 0, "r4"),
    ]
    joined = spans(ledger, by_day=False)
    assert [(s["start"], s["end"], s["status"], s["reason"], s["bytes"]) for s in joined] == [
        ("2024-03-01T22", "2024-03-02T01", LOADED, None, 400),
        ("2024-03-02T02", "2024-03-02T02", FAILED, "504", 0),
    ]


def test_hours_missing_between_the_first_and_the_last_are_named(tmp_path: Path) -> None:
    # two explicit ranges leave a gap that a run without --start never asks for: status says so
    dest = f"duckdb:{tmp_path / 'a.duckdb'}"
    with stamina.set_testing(True), FakeExportServer(events_per_hour=5) as server:
        credentials = Credentials(server.api_key, Secret("demo-secret"), "us", server.url)
        for start, end in (("2024-03-01T00", "2024-03-01T02"), ("2024-03-01T06", "2024-03-01T07")):
            with ExportClient(credentials) as client, open_sink(dest) as sink:
                assert run(client, sink, project="web", start=start, end=end, data_dir=tmp_path / "data").exit_code == 0
    code, out, err = status("--dest", dest, "--json")
    assert code == 0 and json.loads(out)["missing_hours"] == ["2024-03-01T03", "2024-03-01T04", "2024-03-01T05"]
    code, out, err = status("--dest", dest)
    assert "3 hours between the first and the last are missing (2024-03-01T03..2024-03-01T05)" in " ".join(out.split())

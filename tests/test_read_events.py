"""`read_events` / `read_arrow`: start and end name whole UTC upload hours, both inclusive, as strings or datetimes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from amplitude_export import read_arrow, read_events
from amplitude_export.errors import UsageError
from amplitude_export.fake_server import FakeExportServer

DAY = datetime(2024, 3, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeExportServer, list[str]]]:
    """One day of the fake server's events loaded by the CLI into DuckDB and into Parquet."""
    root = tmp_path_factory.mktemp("read-events")
    dests = [f"duckdb:{root / 'events.duckdb'}", f"parquet:{root / 'events'}"]
    with FakeExportServer(events_per_hour=30, seed=3, data_start=DAY, data_end=DAY.replace(hour=23)) as server:
        for dest in dests:
            subprocess.run(
                [str(Path(sys.executable).with_name("amplitude-export")), "run", "--base-url", server.url,
                 "--start", "2024-03-01", "--end", "2024-03-01", "--dest", dest, "--no-progress"],
                cwd=root, env={"PATH": "/usr/bin:/bin", "AMP_API_KEY": "demo-key", "AMP_SECRET_KEY": "demo-secret"},
                check=True, capture_output=True, timeout=300,
            )
        yield server, dests


def uuids(table: object) -> set[str]:
    return set(table.column("uuid").to_pylist())  # type: ignore[attr-defined]


@pytest.mark.parametrize("which", [0, 1], ids=["duckdb", "parquet"])
def test_a_datetime_end_includes_its_whole_hour(loaded: tuple[FakeExportServer, list[str]], which: int) -> None:
    server, dests = loaded
    expected = server.expected_uuids(DAY + timedelta(hours=5), DAY + timedelta(hours=6))
    by_text = read_arrow(dests[which], start="2024-03-01T05", end="2024-03-01T06")
    by_datetime = read_arrow(dests[which], start=DAY + timedelta(hours=5), end=DAY + timedelta(hours=6))
    # a moment inside an hour names that hour, at either end
    by_moments = read_arrow(dests[which], start=DAY + timedelta(hours=5, minutes=59),
                            end=DAY + timedelta(hours=6, minutes=1))
    assert expected and uuids(by_text) == uuids(by_datetime) == uuids(by_moments) == expected
    frame = read_events(dests[which], end=DAY + timedelta(hours=6))
    assert set(frame["uuid"]) == server.expected_uuids(DAY, DAY + timedelta(hours=6))
    assert frame["server_upload_time"].max() >= DAY + timedelta(hours=6, minutes=30)  # not cut at 06:00


def test_a_naive_datetime_is_refused_in_one_line(loaded: tuple[FakeExportServer, list[str]]) -> None:
    _, dests = loaded
    with pytest.raises(UsageError, match="no time zone"):
        read_events(dests[0], end=datetime(2024, 3, 1, 6))

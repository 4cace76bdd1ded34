"""The Python API: `amplitude_export.run`, `extract`, `load`, `status`, `verify` and the streaming reads, against
the fake Export API on loopback and a real DuckDB file; ISO dates through the CLI; the clock; retries bounded by
time."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

import amplitude_export
from amplitude_export import clock
from amplitude_export.client import ExportClient
from amplitude_export.config import Credentials, Secret
from amplitude_export.errors import TransientError, UsageError
from amplitude_export.fake_server import FakeExportServer
from amplitude_export.windows import Window

DAY = datetime(2024, 3, 1, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeExportServer]:
    # variation: some lines omit keys, so BIGINT columns hold nulls
    with FakeExportServer(events_per_hour=40, seed=5, variation=0.5, data_start=DAY,
                          data_end=DAY.replace(hour=23)) as fake:  # fmt: skip
        yield fake


@pytest.fixture(scope="module")
def loaded(server: FakeExportServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """Six hours loaded by `amplitude_export.run` into a DuckDB file, with ISO 8601 start and end."""
    root = tmp_path_factory.mktemp("api")
    dest = f"duckdb:{root / 'events.duckdb'}"
    result = amplitude_export.run(dest, start="2024-03-01T00:00:00Z", end="2024-03-01T05:30:00+00:00",
                                  api_key="demo-key", secret_key="demo-secret", base_url=server.url,
                                  data_dir=root / "data", workers=1)  # fmt: skip
    assert result.exit_code == 0 and result.ok, result.summary()
    assert result.events is not None and result.streams is None and result.deletions is None
    assert result.events.events == len(server.expected_uuids(DAY, DAY.replace(hour=5)))
    assert "events loaded" in result.summary()
    return dest, root / "data"


def test_status_and_verify_return_what_the_commands_print(loaded: tuple[str, Path]) -> None:
    dest, data_dir = loaded
    data = amplitude_export.status(dest, start="2024-03-01T01", end=DAY.replace(hour=2, minute=15))
    assert (data["hours"], data["hours_loaded"], data["project"]) == (2, 2, "demo-key")
    assert amplitude_export.status(dest)["hours"] == 6
    verdict = amplitude_export.verify(dest, deep=True, data_dir=data_dir)
    assert verdict.complete and verdict.hours_loaded == 6 and verdict.archives_hashed == 6
    assert verdict.project == "demo-key" and verdict.destination and "events.duckdb" in verdict.destination
    with pytest.raises(UsageError, match="invalid date '2024-03-01T25': hour must be in 0..23"):
        amplitude_export.status(dest, start="2024-03-01T25")


def test_read_batches_streams_only_the_columns_asked_for(loaded: tuple[str, Path], server: FakeExportServer) -> None:
    dest, _ = loaded
    reader = amplitude_export.read_batches(dest, ["uuid", "amplitude_id"], start="2024-03-01T02",
                                           end="2024-03-01T03:59:59Z", project="demo-key")  # fmt: skip
    assert isinstance(reader, pa.RecordBatchReader)
    assert reader.schema.names == ["uuid", "amplitude_id"]
    with reader:
        table = reader.read_all()
    assert set(table.column("uuid").to_pylist()) == server.expected_uuids(DAY.replace(hour=2), DAY.replace(hour=3))
    everything = amplitude_export.read_batches(dest).read_all()
    assert everything.num_rows == len(server.expected_uuids(DAY, DAY.replace(hour=5)))
    assert amplitude_export.read_batches(dest, ["uuid"], project="nobody").read_all().num_rows == 0
    by_arrow = amplitude_export.read_arrow(dest, "2024-03-01T02", "2024-03-01T03", columns=["uuid"])
    assert by_arrow.column_names == ["uuid"] and by_arrow.num_rows == table.num_rows
    with pytest.raises(UsageError, match="no column 'nope'"):
        amplitude_export.read_batches(dest, ["uuid", "nope"])


def test_read_events_keeps_integer_columns_with_nulls_integers(loaded: tuple[str, Path]) -> None:
    dest, _ = loaded
    table = amplitude_export.read_arrow(dest)
    with_nulls = [f.name for f in table.schema if f.type == pa.int64() and 0 < table.column(f.name).null_count]
    assert with_nulls, "the fake server's variation should leave some BIGINT values out"
    frame = amplitude_export.read_events(dest, columns=["uuid", "server_upload_time", *with_nulls])
    assert list(frame.columns) == ["uuid", "server_upload_time", *with_nulls] and len(frame) == table.num_rows
    for name in with_nulls:
        assert frame[name].dtype == pd.ArrowDtype(pa.int64()), name
        assert frame[name].isna().sum() == table.column(name).null_count
    assert frame["server_upload_time"].dtype == pd.ArrowDtype(pa.timestamp("us", tz="UTC"))
    assert frame["server_upload_time"].min() >= DAY


def test_extract_then_load_with_a_datetime_range(server: FakeExportServer, tmp_path: Path) -> None:
    landed = amplitude_export.extract(start=DAY, end=DAY + timedelta(hours=1, minutes=59), api_key="demo-key",
                                      secret_key="demo-secret", base_url=server.url, data_dir=tmp_path,
                                      window_hours=1)  # fmt: skip
    assert [str(o.window) for o in landed.outcomes] == ["2024-03-01T00", "2024-03-01T01"], landed.summary()
    dest = f"duckdb:{tmp_path / 'x.duckdb'}"
    report = amplitude_export.load(dest, project="p", data_dir=tmp_path, workers=1)
    assert report.exit_code == 0 and report.events == len(server.expected_uuids(DAY, DAY.replace(hour=1)))
    with pytest.raises(UsageError, match="no time zone"):
        amplitude_export.extract(start=datetime(2024, 3, 1), api_key="k", secret_key="s", base_url=server.url)


def test_the_api_functions_stay_functions_beside_submodules_of_the_same_name() -> None:
    import amplitude_export.status
    import amplitude_export.verify  # noqa: F401

    assert callable(amplitude_export.verify) and amplitude_export.verify.__module__ == "amplitude_export.reads"
    assert amplitude_export.status.__module__ == "amplitude_export.reads"
    from amplitude_export.verify import Verification

    assert Verification.__module__ == "amplitude_export.verify"


def test_the_clock_is_one_function_the_planner_asks(server: FakeExportServer, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # no dates: the range is yesterday by the clock, here 2024-03-01
    monkeypatch.setattr(clock, "now", lambda: datetime(2024, 3, 2, 10, 30, tzinfo=UTC))
    report = amplitude_export.extract(api_key="demo-key", secret_key="demo-secret", base_url=server.url,
                                      data_dir=tmp_path)  # fmt: skip
    assert [str(o.window) for o in report.outcomes] == ["2024-03-01T00..2024-03-01T23"]
    assert report.run_id.startswith("20240302T103000Z-")


def test_datetime_now_appears_only_in_the_clock() -> None:
    package = ROOT / "src" / "amplitude_export"
    calling = {path.relative_to(package).as_posix() for path in package.rglob("*.py")
               if "datetime.now(" in path.read_text(encoding="utf-8")}  # fmt: skip
    assert calling == {"clock.py"}


def test_retries_stop_when_their_time_is_spent(tmp_path: Path) -> None:
    with FakeExportServer(faults=["500"] * 40) as fake:
        credentials = Credentials(fake.api_key, Secret("demo-secret"), "us", fake.url)
        started = time.monotonic()
        with ExportClient(credentials, max_attempts=40, wait_initial=0.2, wait_max=0.2, retry_timeout=1.0) as client:
            with pytest.raises(TransientError) as caught:
                client.fetch(Window(DAY, DAY), tmp_path)
        seconds = time.monotonic() - started
    # at ~0.2-0.4 s a wait, 1 s allows a handful of attempts: far from the 40 the attempts bound allows
    assert 2 <= caught.value.attempts < 10 and seconds < 5, (caught.value.attempts, seconds)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from amplitude_export.cli import main; main()", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "AMP_API_KEY": "demo-key", "AMP_SECRET_KEY": "demo-secret"},
    )


def test_the_cli_takes_iso_dates_and_refuses_a_bad_one_in_one_line(server: FakeExportServer, tmp_path: Path) -> None:
    done = cli(
        "run",
        "--base-url",
        server.url,
        "--start",
        "2024-03-01T00:00:00Z",
        "--end",
        "2024-03-01T02:00+00:00",
        "--no-progress",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    shown = cli("status", "--hours", "--start", "2024-03-01T01:30:00Z", "--end", "2024-03-01T02", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "2024-03-01T01" in shown.stdout and "2024-03-01T02" in shown.stdout
    assert "2024-03-01T00" not in shown.stdout.replace("2024-03-01T00..", "")
    for command in ("run", "extract"):
        refused = cli(command, "--base-url", server.url, "--start", "2024-03-01T5:00Z", "--data-dir",
                      str(tmp_path / "new"), "--log-dir", str(tmp_path / "new-logs"), cwd=tmp_path)  # fmt: skip
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("error: cannot read '2024-03-01T5:00Z'")
        assert not (tmp_path / "new").exists() and not (tmp_path / "new-logs").exists()


def test_the_cli_bounds_retries_by_time(tmp_path: Path) -> None:
    with FakeExportServer(faults=["503"] * 45, data_start=DAY, data_end=DAY) as fake:
        started = time.monotonic()
        done = cli("extract", "--base-url", fake.url, "--start", "2024-03-01T00", "--end", "2024-03-01T00",
                   "--max-attempts", "45", "--retry-wait", "0.2", "--retry-timeout", "1", "--no-progress",
                   cwd=tmp_path)  # fmt: skip
        seconds = time.monotonic() - started
    assert done.returncode == 1 and "FAILED 2024-03-01T00" in done.stdout, done.stdout + done.stderr
    assert seconds < 30, seconds


def test_reads_take_dates_one_column_name_and_refuse_an_end_before_the_start(loaded: tuple[str, Path]) -> None:
    import datetime as dt

    dest, _ = loaded
    whole = amplitude_export.read_arrow(dest)
    assert amplitude_export.read_arrow(dest, start=dt.date(2024, 3, 1), end=dt.date(2024, 3, 1)).num_rows == (
        whole.num_rows)
    assert amplitude_export.read_arrow(dest, columns="uuid").column_names == ["uuid"]
    with pytest.raises(UsageError, match="end 2024-03-01T05 is before start 2024-03-01T06"):
        amplitude_export.read_arrow(dest, start="2024-03-01T06", end="2024-03-01T05")


def test_reads_name_a_postgresql_schema_as_status_does(server: FakeExportServer, tmp_path: Path,
                                                       pg_schema: str) -> None:
    from conftest import POSTGRES_URL

    result = amplitude_export.run(POSTGRES_URL, schema=pg_schema, start="2024-03-01T00", end="2024-03-01T01",
                                  api_key="demo-key", secret_key="demo-secret", base_url=server.url,
                                  data_dir=tmp_path / "data")  # fmt: skip
    assert result.ok
    rows = amplitude_export.read_arrow(POSTGRES_URL, schema=pg_schema).num_rows
    assert rows == result.events.events == len(amplitude_export.read_events(POSTGRES_URL, schema=pg_schema,
                                                                            columns="uuid"))


@pytest.mark.parametrize(("option", "value"), [("max_attempts", 0), ("lag_hours", -50), ("read_timeout", 0),
                                               ("retry_timeout", -1), ("window_hours", 0), ("workers", 99)])
def test_run_refuses_the_numbers_the_cli_refuses(option: str, value: float, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=f"^{option} must be "):
        amplitude_export.run(f"duckdb:{tmp_path / 'x.duckdb'}", api_key="k", secret_key="s",
                             base_url="http://127.0.0.1:9", data_dir=tmp_path / "data", **{option: value})
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_run_and_load_take_lists_where_the_cli_takes_comma_separated_names(server: FakeExportServer,
                                                                            tmp_path: Path) -> None:
    keys = {"api_key": "demo-key", "secret_key": "demo-secret", "base_url": server.url}
    dest = f"duckdb:{tmp_path / 'lists.duckdb'}"
    result = amplitude_export.run(dest, start="2024-03-01T00", end="2024-03-01T01", streams=["events", "annotations"],
                                  exclude_columns=["ip_address", "city"], keep_raw=True, data_dir=tmp_path / "data",
                                  workers=1, **keys)  # fmt: skip
    assert result.ok and result.events is not None and result.streams is not None, result.summary()
    assert amplitude_export.read_table(dest, "annotations").num_rows > 0
    again = f"duckdb:{tmp_path / 'again.duckdb'}"
    amplitude_export.load(again, exclude_columns=("ip_address", "city"), data_dir=tmp_path / "data", workers=1,
                          api_key="demo-key")
    for loaded in (dest, again):
        events = amplitude_export.read_arrow(loaded, columns=["ip_address", "city"])
        assert events.num_rows == result.events.events > 0
        assert events["ip_address"].null_count == events["city"].null_count == events.num_rows
    with pytest.raises(UsageError, match="unknown stream cohort:"):
        amplitude_export.run(dest, streams=("events", "cohort"), **keys)

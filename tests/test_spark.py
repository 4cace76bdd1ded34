"""The Spark data source in a real local Spark session (`local[2]`) against the fake Export API on loopback.

One session serves the whole module (starting one takes seconds). Spark's Python workers are other processes, so
stamina's test mode does not reach them: the reads pass `retry_wait` and the fake server `retry_after=0` instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import stamina
from pyspark.sql import DataFrame, SparkSession  # in the test extra: a missing pyspark fails here
from pyspark.sql.pandas.types import to_arrow_schema

from amplitude_export.fake_server import FakeExportServer
from amplitude_export.schema import ARROW_SCHEMA
from amplitude_export.spark import SPARK_SCHEMA, first_copies, lanes, register
from amplitude_export.windows import Window

DAY = datetime(2024, 3, 1, tzinfo=UTC)
FAST = {"retry_wait": "0.01", "max_attempts": "4"}  # no real back-off inside Spark's workers


@pytest.fixture(scope="module")
def spark() -> Iterator[SparkSession]:
    """A local Spark session with two cores whose Python workers run this interpreter (and so this package)."""
    if shutil.which("java") is None:
        pytest.fail("Spark needs Java 17: apt-get install openjdk-17-jre-headless (.ci/run does)")
    previous = os.environ.get("PYSPARK_PYTHON")
    os.environ["PYSPARK_PYTHON"] = sys.executable
    session = (SparkSession.builder.master("local[2]").appName("amplitude-export-tests")
               .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.shuffle.partitions", "2").config("spark.sql.session.timeZone", "UTC")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    register(session)
    yield session
    session.stop()
    if previous is None:
        os.environ.pop("PYSPARK_PYTHON", None)
    else:
        os.environ["PYSPARK_PYTHON"] = previous


def amplitude(spark: SparkSession, server: FakeExportServer, **options: str) -> Any:
    reader = spark.read.format("amplitude")
    for key, value in {"api_key": "demo-key", "secret_key": "demo-secret", "base_url": server.url, **FAST,
                       **options}.items():
        reader = reader.option(key, value)
    return reader


def arrow(df: DataFrame) -> pa.Table:
    return df.toArrow()


def test_the_spark_schema_is_the_arrow_schema_of_every_destination() -> None:
    try:
        arrow_schema = to_arrow_schema(SPARK_SCHEMA, timezone="UTC")  # what recent Spark checks batches against
    except TypeError:  # Spark 4.0 names every timestamp UTC itself
        arrow_schema = to_arrow_schema(SPARK_SCHEMA)
    assert arrow_schema.equals(ARROW_SCHEMA)


def test_lanes_keep_window_order_and_never_outnumber_the_concurrency() -> None:
    windows = [Window(DAY + timedelta(days=n), DAY + timedelta(days=n, hours=23)) for n in range(7)]
    dealt = lanes(windows, 2, "run")
    assert len(dealt) == 2
    assert [w for lane in dealt for w in lane.windows] == windows
    assert abs(len(dealt[0].windows) - len(dealt[1].windows)) <= 1
    assert len(lanes(windows[:1], 5, "run")) == 1 and lanes([], 2, "run") == []


@pytest.mark.slow
def test_two_days_equal_the_duckdb_destination(spark: SparkSession, tmp_path: Path) -> None:
    from amplitude_export import read_arrow
    from amplitude_export.client import ExportClient
    from amplitude_export.config import Credentials, Secret
    from amplitude_export.pipeline import run
    from amplitude_export.sinks import open_sink

    last = DAY + timedelta(hours=47)
    with FakeExportServer(data_start=DAY, data_end=last, members_per_hour=2, malformed_lines=True) as server:
        df = amplitude(spark, server, start="2024-03-01", end="2024-03-02", project="p").load()
        assert df.rdd.getNumPartitions() == 2  # the default concurrency
        table = arrow(df)
        kept = arrow(first_copies(df))
        sink = open_sink(f"duckdb:{tmp_path / 'a.duckdb'}")
        with ExportClient(Credentials("demo-key", Secret("demo-secret"), "us", server.url)) as client, \
                stamina.set_testing(True, attempts=100, cap=True):
            report = run(client, sink, project="p", start="2024-03-01", end="2024-03-02", data_dir=tmp_path,
                         now=DAY + timedelta(days=30))
        sink.close()
        assert report.exit_code == 0, report.summary()
        expected = server.expected_uuids(DAY, last)
    duckdb_rows = read_arrow(f"duckdb:{tmp_path / 'a.duckdb'}")
    assert table.schema.equals(ARROW_SCHEMA)
    # each window (a day) drops its own repeats; a uuid sent again in the next day's first hour stays twice
    uuids = table.column("uuid").to_pylist()
    hours = table.column("_upload_hour").to_pylist()
    windows_of: dict[str, set[Any]] = {}
    for uuid, hour in zip(uuids, hours, strict=True):
        windows_of.setdefault(uuid, set()).add(hour.date())
    assert all(len(days) == uuids.count(u) for u, days in windows_of.items() if uuids.count(u) > 1)
    assert set(uuids) == expected and len(kept) == len(duckdb_rows) == len(expected)
    columns = [name for name in ARROW_SCHEMA.names if name != "_run_id"]
    ours = kept.select(columns).sort_by("uuid")
    theirs = duckdb_rows.select(columns).sort_by("uuid")
    assert ours.equals(theirs)
    for name in ("event_time", "event_properties", "amplitude_id"):  # a checksum as another engine would
        assert pc.sum(pc.utf8_length(pc.cast(ours.column(name), pa.string()))).as_py() == \
            pc.sum(pc.utf8_length(pc.cast(theirs.column(name), pa.string()))).as_py()


@pytest.mark.slow
def test_a_fault_storm_still_gives_exact_rows(spark: SparkSession) -> None:
    last = DAY + timedelta(hours=47)
    # every window's first five requests fail; the days then answer 504 until split into halves
    with FakeExportServer(data_start=DAY, data_end=last, faults=["503", "429", "truncate", "corrupt", "500"],
                          seed=3, timeout_over_hours=12, retry_after=0, members_per_hour=2) as server:
        df = amplitude(spark, server, start="2024-03-01", end="2024-03-02", max_attempts="7",
                       concurrency="3").load()
        table = arrow(first_copies(df))
        expected = server.expected_uuids(DAY, last)
        statuses = {status for _, _, status in server.requests}
        asked = {(start, end) for start, end, _ in server.requests}
    assert sorted(table.column("uuid").to_pylist()) == sorted(expected)
    assert {500, 503, 429, 504, 200} <= statuses
    assert ("20240301T00", "20240301T11") in asked  # the 504 split the day


@pytest.mark.slow
@pytest.mark.parametrize("concurrency", [1, 2])
def test_requests_at_once_reach_and_never_exceed_the_concurrency(spark: SparkSession, concurrency: int) -> None:
    # paced bodies keep each request open a while, so two tasks reading at once overlap: the session has two
    # task slots, so 1 shows the limit holds, and 2 that the windows are read in parallel (not in the driver or
    # in one task)
    pace = 400_000 if concurrency == 1 else 200_000  # slower for 2: the tasks overlap even if one starts late
    with FakeExportServer(data_start=DAY, data_end=DAY + timedelta(hours=47), bytes_per_second=pace) as server:
        df = amplitude(spark, server, start="2024-03-01", end="2024-03-02", window_hours="8",
                       concurrency=str(concurrency)).load()
        assert df.rdd.getNumPartitions() == concurrency
        uuids = arrow(df.select("uuid")).column("uuid").to_pylist()
        assert server.max_in_flight == concurrency and len(server.requests) == 6
        assert set(uuids) == server.expected_uuids(DAY, DAY + timedelta(hours=47))


def test_pii_controls_apply_in_the_task(spark: SparkSession) -> None:
    with FakeExportServer(data_start=DAY, data_end=DAY + timedelta(hours=1)) as server:
        table = arrow(amplitude(spark, server, start="2024-03-01T00", end="2024-03-01T01",
                                exclude_columns="ip_address").load())
    assert table.num_rows and table.column("ip_address").null_count == table.num_rows


def test_an_hour_that_cannot_be_fetched_fails_the_job_naming_it(spark: SparkSession) -> None:
    big = DAY + timedelta(hours=5)
    with FakeExportServer(data_start=DAY, data_end=DAY + timedelta(hours=11),
                          events_per_hour=lambda hour: 600 if hour == big else 10) as server:
        server.start()
        server.max_archive_bytes = _archive_estimate(server, big, big) // 2
        with pytest.raises(Exception, match=r"window 2024-03-01T05 \(part of 2024-03-01T00..2024-03-01T11\)"):
            amplitude(spark, server, start="2024-03-01T00", end="2024-03-01T11").load().count()


@pytest.mark.parametrize(("options", "message"), [
    ({"window_hour": "3"}, "unknown option 'window_hour'"),
    ({"concurrency": "6"}, "option concurrency must be a whole number from 1 to 5, got '6'"),
    ({"start": "2024-13-01"}, "invalid date '2024-13-01'"),
    ({"lookback_hours": "3"}, "option 'lookback_hours' is for spark.readStream only"),
])
def test_a_bad_option_is_one_clear_line_at_load(spark: SparkSession, options: dict[str, str],
                                               message: str) -> None:
    with FakeExportServer() as server, pytest.raises(Exception, match=message):
        amplitude(spark, server, **options).load().count()


def test_without_pyspark_the_import_names_the_extra() -> None:
    code = ("import sys; sys.modules['pyspark'] = None\n"
            "try:\n    import amplitude_export.spark\nexcept Exception as exc:\n    print(exc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "the Spark data source needs pyspark 4: pip install 'amplitude-export[spark]'"


def _archive_estimate(server: FakeExportServer, start: datetime, end: datetime) -> int:
    """What the fake server compares with `max_archive_bytes` for a window."""
    return sum(path.stat().st_size + 2 * len(name) + 150 for name, path in server.window_members(start, end))


@pytest.mark.slow
def test_a_stream_stopped_restarted_and_extended_gives_each_event_once(spark: SparkSession, tmp_path: Path) -> None:
    big = DAY + timedelta(days=1, hours=10)
    last = DAY + timedelta(hours=71)
    table, checkpoint = tmp_path / "events", tmp_path / "checkpoint"

    def stream(server: FakeExportServer, now: datetime) -> None:
        source = spark.readStream.format("amplitude")
        for key, value in {"api_key": "demo-key", "secret_key": "demo-secret", "base_url": server.url, **FAST,
                           "start": "2024-03-01", "window_hours": "6", "lookback_hours": "6",
                           "max_hours_per_trigger": "24", "now": now.isoformat()}.items():
            source = source.option(key, value)
        query = (first_copies(source.load(), lookback_hours=6).writeStream.format("parquet")
                 .option("checkpointLocation", str(checkpoint)).trigger(availableNow=True).start(str(table)))
        query.awaitTermination()

    def stored() -> list[str]:
        return [row.uuid for row in spark.read.parquet(str(table)).select("uuid").collect()]

    with FakeExportServer(data_start=DAY, data_end=last, members_per_hour=2, seed=11,
                          events_per_hour=lambda hour: 400 if hour == big else 15) as server:
        server.start()
        server.max_archive_bytes = _archive_estimate(server, big, big) // 2
        assert _archive_estimate(server, DAY, DAY + timedelta(hours=5)) < server.max_archive_bytes
        # the first run reads day 1, then stops on day 2's hour that cannot be fetched
        with pytest.raises(Exception, match="window 2024-03-02T10"):
            stream(server, DAY + timedelta(days=2, hours=2))
        first_day = stored()
        assert sorted(first_day) == sorted(server.expected_uuids(DAY, DAY + timedelta(hours=23)))
        # restarted on its checkpoint once the hour can be fetched: day 2 once, day 1's lookback not again
        server.max_archive_bytes = None
        stream(server, DAY + timedelta(days=2, hours=2))
        two_days = stored()
        assert sorted(two_days) == sorted(server.expected_uuids(DAY, DAY + timedelta(hours=47)))
        asked = {(start, end) for start, end, _ in server.requests}
        assert ("20240301T18", "20240301T23") in asked  # the lookback re-read day 1's last six hours
        # a later run: day 3, once Amplitude can export it
        stream(server, DAY + timedelta(days=3, hours=2))
        every = stored()
        assert sorted(every) == sorted(server.expected_uuids(DAY, last))


KEYS = {"api_key": "demo-key", "secret_key": "demo-secret"}


def test_an_hour_size_estimate_cuts_windows_to_the_size_budget() -> None:
    from amplitude_export.spark import settings

    plain = settings({**KEYS}).plan(DAY, DAY + timedelta(hours=23))
    cut = settings({**KEYS, "hour_mb": "100", "size_budget_mb": "1000"}).plan(DAY, DAY + timedelta(hours=23))
    assert plain == [Window(DAY, DAY + timedelta(hours=23))]
    assert [w.hours for w in cut] == [10, 10, 4] and cut[0].start == DAY


def test_missing_keys_name_the_options_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from amplitude_export.errors import UsageError
    from amplitude_export.spark import settings

    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.delenv("AMP_API_KEY", raising=False)
    monkeypatch.delenv("AMP_SECRET_KEY", raising=False)
    with pytest.raises(UsageError, match=r"^missing AMP_API_KEY and AMP_SECRET_KEY: set the api_key and secret_key "):
        settings({})


def test_hashing_needs_the_key_on_the_driver(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from amplitude_export.errors import UsageError
    from amplitude_export.spark import settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AMP_HASH_KEY", raising=False)
    with pytest.raises(UsageError, match="AMP_HASH_KEY"):
        settings({**KEYS, "hash_columns": "user_id"})
    monkeypatch.setenv("AMP_HASH_KEY", "a key long enough to be hard to guess, 32+ bytes")
    chosen = settings({**KEYS, "hash_columns": "user_id"})
    assert chosen.privacy is not None and "hard to guess" not in repr(chosen)


def test_stream_offsets_are_ready_upload_hours_with_a_lookback() -> None:
    from amplitude_export.spark import settings
    from amplitude_export.spark_stream import AmplitudeStreamReader

    def reader(**options: str) -> AmplitudeStreamReader:
        return AmplitudeStreamReader(settings({**KEYS, "start": "2024-03-01", "window_hours": "6",
                                               "now": "2024-03-03T05:30+00:00", **options}, streaming=True))

    first = reader().initialOffset()
    assert first == {"next_hour": "2024-03-01T00", "first_hour": "2024-03-01T00"}
    # ready: the hour that closed lag_hours (2) before now, 2024-03-03T02, so the offset is the hour after it
    assert reader().latestOffset(first, None) == {"next_hour": "2024-03-03T03", "first_hour": "2024-03-01T00"}
    capped = reader(max_hours_per_trigger="24")
    assert capped.latestOffset(first, capped.getDefaultReadLimit())["next_hour"] == "2024-03-02T00"
    assert reader(end="2024-03-01T09").latestOffset(first, None)["next_hour"] == "2024-03-01T10"
    later = {"next_hour": "2024-03-02T00", "first_hour": "2024-03-01T00"}
    lanes_ = reader(lookback_hours="12", concurrency="1").partitions(later, {**later, "next_hour": "2024-03-02T12"})
    assert [str(w) for w in lanes_[0].windows] == ["2024-03-01T12..2024-03-01T17", "2024-03-01T18..2024-03-01T23",
                                                   "2024-03-02T00..2024-03-02T05", "2024-03-02T06..2024-03-02T11"]
    # the lookback never reaches before the query's first hour, and an empty range plans nothing
    early = reader(lookback_hours="72", concurrency="1").partitions(first, later)
    assert early[0].windows[0].start == DAY
    assert reader().partitions(later, later) == []
    # an availableNow run stops at the hour ready when it began, however long it runs
    run = reader()
    run.prepareForTriggerAvailableNow()
    run.options = settings({**KEYS, "start": "2024-03-01", "now": "2024-03-09T00:00+00:00"}, streaming=True)
    assert run.latestOffset(first, None)["next_hour"] == "2024-03-03T03"

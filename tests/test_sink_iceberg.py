"""The Iceberg sink against real catalogs (SQLite, PostgreSQL) and a local warehouse: the table every engine reads,
exactly once, replacement, one commit per window, concurrent writers, crashes, and the ledger in the properties.
The loopback S3 warehouse and the CLI are in test_iceberg_cli.py."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from conftest import POSTGRES_URL
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

from amplitude_export.errors import DestinationBusyError, DestinationError, UsageError
from amplitude_export.ledger import EMPTY, HourRecord
from amplitude_export.schema import ARROW_SCHEMA
from amplitude_export.sinks import open_sink
from amplitude_export.sinks.iceberg import IcebergSink
from amplitude_export.sinks.iceberg_ledger import PREFIX, project_tag

TESTS = Path(__file__).parent


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "warehouse"


@pytest.fixture
def sink(root: Path) -> IcebergSink:
    with IcebergSink(str(root)) as s:
        yield s  # type: ignore[misc]


def data_files(root: Path) -> list[Path]:
    """Every Parquet file under the table's data directory, referenced or not."""
    return sorted((root / "amplitude" / "events" / "data").rglob("*.parquet"))


def live_files(sink: IcebergSink) -> list[str]:
    """The data files the current snapshot references."""
    return sorted(sink.table.refresh().inspect.files().column("file_path").to_pylist())


def in_duckdb(sink: IcebergSink) -> list[dict[str, object]]:
    """What DuckDB reads from the Parquet files the table's metadata lists (a second reader, not pyiceberg)."""
    paths = [p.removeprefix("file://") for p in live_files(sink)]
    if not paths:
        return []
    listed = ", ".join(f"'{p}'" for p in paths)
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        return con.sql(f"SELECT * FROM read_parquet([{listed}]) ORDER BY uuid").to_arrow_table().to_pylist()


def test_the_table_is_partitioned_by_upload_day_and_typed_as_everywhere(sink: IcebergSink, root: Path) -> None:
    w = window(22, 25)  # crosses midnight: one file per upload day
    rows = hour_events(hour(22), ["a", "b"]) + hour_events(hour(25), ["c"])

    records = sink.write_window("p", w, read_of([batch(rows)], finisher(w, rows)))

    assert [p.parent.name for p in data_files(root)] == ["server_upload_day=2024-03-01", "server_upload_day=2024-03-02"]
    assert str(sink.table.spec().fields[0].transform) == "day"
    assert sink.read_arrow().schema.equals(ARROW_SCHEMA)
    seen = in_duckdb(sink)
    assert [r["uuid"] for r in seen] == ["a", "b", "c"]
    assert seen[0]["event_time"] == rows[0]["event_time"] and seen[0]["amplitude_id"] > 2**32
    assert [(r.events_loaded, r.duplicates) for r in records] == [(2, 0), (0, 0), (0, 0), (1, 0)]
    assert sink.ledger("p") == {r.hour: r for r in records}
    polars = pytest.importorskip("polars")
    os.environ.setdefault("POLARS_ICEBERG_PLANNER", "pyiceberg")
    frame = polars.scan_iceberg(sink.table).sort("uuid").collect()
    assert frame["uuid"].to_list() == ["a", "b", "c"]
    assert str(frame.schema["event_time"]) == "Datetime(time_unit='us', time_zone='UTC')"


def test_one_commit_per_window_carries_its_ledger(sink: IcebergSink) -> None:
    (w1, rows1), (w2, rows2) = two_windows()
    sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
    commits, snapshots = len(sink.table.metadata.metadata_log), len(sink.table.snapshots())
    sink.write_window("p", w1, read_of([batch(rows1[::-1])], finisher(w1, rows1)))  # a reload: files replaced
    table = sink.table.refresh()
    assert len(table.metadata.metadata_log) == commits + 1  # one new metadata file: one catalog commit
    assert len(table.snapshots()) == snapshots + 1  # holding one snapshot
    last = table.current_snapshot()
    assert last is not None and last.summary["amplitude-export.window"] == str(w1)
    assert last.summary["amplitude-export.project-tag"] == project_tag("p")
    names = [name for name in table.properties if name.startswith(PREFIX)]
    assert names == [f"{PREFIX}{project_tag('p')}.2024-03"]
    sink.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))
    assert sorted(sink.ledger("p")) == [hour(0), hour(1), hour(2), hour(3)]


def test_duplicates_within_and_across_windows_are_written_once_and_counted(sink: IcebergSink) -> None:
    (w1, rows1), (w2, rows2) = two_windows()
    r1 = sink.write_window("p", w1, read_of([batch(rows1[:2]), batch(rows1[2:])], finisher(w1, rows1)))
    r2 = sink.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))
    assert [r["uuid"] for r in in_duckdb(sink)] == EXPECTED_UUIDS
    assert [(r.events_loaded, r.duplicates) for r in r1 + r2] == [(3, 1), (2, 1), (2, 1), (2, 2)]


def test_iceberg_and_duckdb_destinations_hold_the_same_rows(tmp_path: Path, root: Path) -> None:
    (w1, rows1), (w2, rows2) = two_windows()
    tables = []
    for dest in (f"duckdb:{tmp_path / 'x.duckdb'}", f"iceberg:{root}"):
        with open_sink(dest) as s:
            s.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
            s.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))
            # reload in another arrival order: u2 now arrives first in hour 1, so hour 1 keeps it
            s.write_window("p", w1, read_of([batch(rows1[::-1])], finisher(w1, rows1)))
            tables.append(s.read_arrow())
            assert [(r.events_loaded, r.duplicates) for r in s.ledger("p").values()] == [
                (2, 2), (3, 0), (2, 1), (2, 2)]
    assert tables[0].equals(tables[1])


def test_a_window_inside_an_older_window_keeps_its_other_hours(sink: IcebergSink) -> None:
    w = window(0, 3)
    rows = [r for _, part in two_windows() for r in part]
    sink.write_window("p", w, read_of([batch(rows)], finisher(w, rows)))
    one = window(1, 1)
    new = hour_events(hour(1), ["u4", "n1", "u8"])  # u8 lives in hour 3, outside the new window: skipped
    records = sink.write_window("p", one, read_of([batch(new)], finisher(one, new)))
    assert [(r.events_loaded, r.duplicates) for r in records] == [(2, 1)]
    assert [r["uuid"] for r in in_duckdb(sink)] == sorted(["u1", "u2", "u3", "u4", "n1", "u6", "u7", "u8", "u9"])
    assert sink.count_by_hour("p") == {hour(0): 3, hour(1): 2, hour(2): 2, hour(3): 2}


def test_projects_reloads_and_the_ledger_survive_reopening(root: Path) -> None:
    (w1, rows1), _ = two_windows()
    with IcebergSink(str(root)) as s:
        records = s.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
        other = [dict(r, uuid=f"q-{r['uuid']}") for r in rows1]
        s.write_window("q", w1, read_of([batch(other)], finisher(w1, other)))
        s.record_hours("p", [HourRecord(hour=hour(9), status=EMPTY)])
    with IcebergSink(str(root), read_only=True) as s:
        ledger = s.ledger("p")
        assert [ledger[r.hour] for r in records] == records
        assert ledger[hour(9)].status == EMPTY and ledger[hour(9)].updated_at is not None
        assert s.projects() == ["p", "q"]
        assert uuids(s.read_arrow(project="p")) == ["u1", "u2", "u3", "u4", "u5"]
        assert len(s.read_arrow()) == 10 and s.count_by_hour("q") == {hour(0): 3, hour(1): 2}
        assert uuids(s.read_arrow(hour(1), None, "p")) == ["u4", "u5"]  # u2 came first in hour 0
        with pytest.raises(DestinationError, match="read-only"):
            s.record_hours("p", [HourRecord(hour=hour(9), status=EMPTY)])


def test_a_crash_inside_the_batches_leaves_nothing_of_the_window(sink: IcebergSink, root: Path) -> None:
    (w1, rows1), (w2, rows2) = two_windows()
    sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
    before = (live_files(sink), data_files(root), sink.table.metadata_location)
    with pytest.raises(Crash):
        sink.write_window("p", w2, read_of(crashing([batch(rows2[:2]), batch(rows2[2:])], after=1),
                                           finisher(w2, rows2)))
    assert (live_files(sink), data_files(root), sink.table.refresh().metadata_location) == before
    sink.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))
    assert uuids(sink.read_arrow()) == EXPECTED_UUIDS


def test_a_commit_refused_for_another_writers_is_computed_again(root: Path) -> None:
    """Writer A stages its window; writer B commits a window holding one of A's uuids in another hour; A's commit
    is refused by the catalog (its base snapshot moved), so A computes it again and leaves that uuid to B."""
    a, b = IcebergSink(str(root)), IcebergSink(str(root))
    try:
        w_a, w_b = window(0, 0), window(5, 5)
        rows_a = hour_events(hour(0), ["x1", "x2", "shared"])
        rows_b = hour_events(hour(5), ["shared", "y1"])
        finish_a = finisher(w_a, rows_a)

        def b_commits_first() -> list[HourRecord]:
            b.write_window("p", w_b, read_of([batch(rows_b)], finisher(w_b, rows_b)))
            return finish_a()

        records = a.write_window("p", w_a, read_of([batch(rows_a)], b_commits_first))
        assert [(r.events_loaded, r.duplicates) for r in records] == [(2, 1)]
        assert uuids(a.read_arrow()) == ["shared", "x1", "x2", "y1"]
        assert sorted(a.ledger("p")) == [hour(0), hour(5)]  # B's ledger month was merged, not overwritten
        assert len(live_files(a)) == 2 and len(data_files(root)) == 2  # the refused attempt's file is gone
    finally:
        a.close()
        b.close()


def test_a_window_another_run_loaded_meanwhile_from_the_same_data_is_left_as_it_is(root: Path) -> None:
    """Two runs of one range: B commits the window from the same archive (same content hashes) after A opened the
    table; A commits nothing for it (that could only replace the rows with the same rows) and returns B's rows.
    A run that finds those rows when it opens (a --refresh after them) replaces them as asked."""
    w = window(0, 1)
    rows = hour_events(hour(0), ["x1", "x2"]) + hour_events(hour(1), ["y1"])

    def records(run_id: str) -> Callable[[], list[HourRecord]]:
        return lambda: [dataclasses.replace(r, run_id=run_id) for r in finisher(w, rows)()]

    with IcebergSink(str(root)) as a, IcebergSink(str(root)) as b:
        b.write_window("p", w, read_of([batch(rows)], records("run-b")))
        snapshots = len(a.table.refresh().snapshots())
        stored = a.write_window("p", w, read_of([batch(rows)], records("run-a")))
        assert [r.run_id for r in stored] == ["run-b", "run-b"]
        assert len(a.table.refresh().snapshots()) == snapshots and uuids(a.read_arrow()) == ["x1", "x2", "y1"]
        changed = hour_events(hour(0), ["x1"]) + hour_events(hour(1), ["y1"])
        finish = records("run-a")
        a.write_window("p", w, read_of([batch(changed)], lambda: [
            dataclasses.replace(r, content_hash="sha256:" + "1" * 64) for r in finish()]))  # other data: loaded
        assert uuids(a.read_arrow()) == ["x1", "y1"]
    with IcebergSink(str(root)) as c:
        c.write_window("p", w, read_of([batch(rows)], records("run-c")))
        assert [r.run_id for r in c.ledger("p").values()] == ["run-c", "run-c"]
        assert uuids(c.read_arrow()) == ["x1", "x2", "y1"]


def test_writers_that_keep_losing_give_up_without_committing(root: Path) -> None:
    w = window(0, 0)
    rows = hour_events(hour(0), ["x1"])
    with IcebergSink(str(root), commit_attempts=2) as a, IcebergSink(str(root)) as b:
        finish = finisher(w, rows)
        a.table.refresh()
        n = iter(range(10))

        def others_commit(*_: object) -> None:
            b.record_hours("p", [HourRecord(hour=hour(10 + next(n)), status=EMPTY)])

        original = a._skip_taken

        def racing(*args: object) -> str:
            others_commit()
            return original(*args)  # type: ignore[arg-type]

        a._skip_taken = racing  # type: ignore[method-assign]
        with pytest.raises(DestinationBusyError, match="2 commits in a row lost to other writers"):
            a.write_window("p", w, read_of([batch(rows)], finish))
        assert a.table.refresh().scan().to_arrow().num_rows == 0 and data_files(root) == []
        assert hour(0) not in a.ledger("p")


@pytest.mark.parametrize("step", ["catalog tables", "namespace"])
def test_a_first_run_that_loses_the_race_to_create_opens_what_the_other_made(
    root: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Two first runs at once on one warehouse: the other run creates the catalog's tables, or the namespace,
    between this run's check and its insert. The interleaving is forced by running the other's create inside
    this run's check (real sqlite); this run must open what the other made."""
    from pyiceberg.catalog.sql import SqlCatalog, SqlCatalogBaseTable

    raced: list[str] = []

    def create_tables(self: SqlCatalog) -> None:
        if not raced:
            raced.append("catalog tables")
            SqlCatalogBaseTable.metadata.create_all(self.engine)  # the other run, first
        SqlCatalogBaseTable.metadata.create_all(self.engine, checkfirst=False)  # this one, after its check

    original = SqlCatalog.namespace_exists

    def namespace_exists(self: SqlCatalog, namespace: str) -> bool:
        if raced:
            return original(self, namespace)
        raced.append("namespace")
        other = SqlCatalog(self.name, **{k: v for k, v in self.properties.items() if k != "name"})
        assert not original(other, namespace)
        other.create_namespace(namespace)  # the other run, first
        return False  # what this run's check saw a moment before

    if step == "catalog tables":
        monkeypatch.setattr(SqlCatalog, "create_tables", create_tables)
    else:
        root.mkdir(parents=True)
        SqlCatalog("amplitude_export", uri=f"sqlite:///{root / 'catalog.db'}", warehouse=f"file://{root}")
        monkeypatch.setattr(SqlCatalog, "namespace_exists", namespace_exists)
    with IcebergSink(str(root)) as s:
        assert s.ledger("p") == {}
    assert raced == [step]
    with IcebergSink(str(root), read_only=True) as s:
        assert s.read_arrow().num_rows == 0


def test_concurrent_writers_in_threads_keep_every_uuid_once(root: Path) -> None:
    IcebergSink(str(root)).close()
    errors: list[BaseException] = []
    # each writer's windows share uuids with the other's: whoever commits second must skip them
    plans = {n: [(window(h, h), hour_events(hour(h), [f"w{n}-{h}", f"shared-{h // 2}"])) for h in range(n, 8, 2)]
             for n in (0, 1)}

    def write(n: int) -> None:
        try:
            with IcebergSink(str(root)) as s:
                for w, rows in plans[n]:
                    s.write_window("p", w, read_of([batch(rows)], finisher(w, rows)))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with IcebergSink(str(root), read_only=True) as s:
        stored = uuids(s.read_arrow())
        own = {f"w{n}-{h}" for n in (0, 1) for h in range(n, 8, 2)}
        assert stored == sorted(own | {f"shared-{h}" for h in range(4)})
        assert sorted(s.ledger("p")) == [hour(h) for h in range(8)]
        assert sum(r.events_loaded for r in s.ledger("p").values()) == len(stored)


@pytest.mark.parametrize("point", ["batches", "finish"])
def test_kill_9_mid_window_then_the_same_writes_leave_exact_rows(root: Path, tmp_path: Path, point: str) -> None:
    marker = tmp_path / "stalled"
    dest = f"iceberg:{root}"
    code = f"from sink_helpers import kill_writer\nkill_writer({dest!r}, {point!r}, {str(marker)!r})\n"
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(TESTS)))
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the writer never stalled"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (w1, rows1), (w2, rows2) = two_windows()
    with IcebergSink(str(root)) as s:
        assert uuids(s.read_arrow()) == ["u1", "u2", "u3", "u4", "u5"]
        assert sorted(s.ledger("p")) == [hour(0), hour(1)]
        s.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
        s.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))
        assert uuids(s.read_arrow()) == EXPECTED_UUIDS
        assert sorted(s.ledger("p")) == [hour(0), hour(1), hour(2), hour(3)]


def test_a_sql_catalog_in_postgresql(root: Path) -> None:
    namespace = f"amp_test_{uuid.uuid4().hex[:12]}"
    dest = f"iceberg:{root}?catalog={POSTGRES_URL}&namespace={namespace}"
    (w1, rows1), (w2, rows2) = two_windows()
    sink = open_sink(dest)
    try:
        sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
        sink.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))
        with open_sink(dest, read_only=True) as reader:
            assert uuids(reader.read_arrow()) == EXPECTED_UUIDS and len(reader.ledger("p")) == 4
        assert not (root / "catalog.db").exists()
    finally:
        sink.catalog.drop_table((namespace, "events"))  # type: ignore[attr-defined]
        sink.catalog.drop_namespace(namespace)  # type: ignore[attr-defined]
        sink.close()


def test_destination_urls_and_their_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="needs a catalog"):
        open_sink("iceberg:s3://bucket/warehouse")
    with pytest.raises(UsageError, match="unknown option 'tabel'"):
        open_sink(f"iceberg:{tmp_path}?tabel=x")
    with pytest.raises(UsageError, match="namespace= is empty"):
        open_sink(f"iceberg:{tmp_path / 'empty'}?namespace=")
    with pytest.raises(UsageError, match="table='web.events' holds a '.'"):
        open_sink(f"iceberg:{tmp_path / 'dotted'}?table=web.events")
    assert not (tmp_path / "empty").exists() and not (tmp_path / "dotted").exists()
    with pytest.raises(UsageError, match=r"catalog=mysql://me:\*\*\*@host/db is not"):
        open_sink(f"iceberg:{tmp_path}?catalog=mysql://me:hunter2@host/db")
    with pytest.raises(DestinationError, match="no Iceberg catalog at"):
        open_sink(f"iceberg:{tmp_path / 'none'}", read_only=True)
    with IcebergSink(str(tmp_path / "wh"), storage_options={"endpoint_url": "http://x", "key": "k"}) as s:
        assert s.location.properties["s3.endpoint"] == "http://x" and s.location.properties["s3.access-key-id"] == "k"
    with IcebergSink(f"{tmp_path / 'wh'}?table=other", read_only=False) as s:
        assert s.table.name() == ("amplitude", "other")
    catalog = IcebergSink(str(tmp_path / "wh")).catalog
    catalog.create_table(("amplitude", "foreign"), schema=pa.schema([("id", pa.int64())]))
    with pytest.raises(DestinationError, match="not an amplitude-export events table"):
        open_sink(f"iceberg:{tmp_path / 'wh'}?table=foreign")


def test_a_missing_extra_names_the_install_line(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['pyiceberg'] = None\n"
            "from amplitude_export.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code, "status", "--dest", f"iceberg:{tmp_path}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: Iceberg destinations need pyiceberg: pip install 'amplitude-export[iceberg]'"]


def test_maintain_compacts_expires_and_deletes_what_nothing_references(sink: IcebergSink, root: Path) -> None:
    from datetime import timedelta

    for h in range(6):  # hourly runs: one small file an hour
        w, rows = window(h, h), hour_events(hour(h), [f"a{h}", f"b{h}"])
        sink.write_window("p", w, read_of([batch(rows)], finisher(w, rows)))
    w, rows = window(0, 0), hour_events(hour(0), ["a0", "c0"])
    sink.write_window("p", w, read_of([batch(rows)], finisher(w, rows)))  # a reload: the replaced file stays on disk
    orphan = root / "amplitude" / "events" / "data" / "server_upload_day=2024-03-01" / "00000-0-killed.parquet"
    orphan.write_bytes(b"a killed run's file")
    before, ledger = uuids(sink.read_arrow()), sink.ledger("p")
    assert len(data_files(root)) == 8 and len(live_files(sink)) == 6

    kept = sink.maintain(older_than=timedelta(hours=1))  # everything is younger: compaction only
    assert (kept.files_compacted, kept.files_written, kept.snapshots_expired, kept.files_deleted) == (6, 1, 0, 0)
    done = sink.maintain(older_than=timedelta(0))
    assert (done.files_compacted, done.snapshots_expired) == (0, 7)  # 7 windows and the compaction: 8 snapshots
    assert len(sink.table.snapshots()) == 1
    assert data_files(root) == [Path(p.removeprefix("file://")) for p in live_files(sink)]
    assert not orphan.exists() and done.files_deleted >= 8
    assert uuids(sink.read_arrow()) == before and sink.ledger("p") == ledger


def test_maintain_is_for_table_destinations(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from amplitude_export.cli import cli

    result = CliRunner().invoke(cli, ["maintain", "--dest", f"duckdb:{tmp_path / 'x.duckdb'}"])
    assert result.exit_code == 2 and "maintain applies to iceberg: and delta: tables" in result.output
    assert not (tmp_path / "x.duckdb").exists()

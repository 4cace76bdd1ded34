"""The Delta Lake sink on a local path and on the loopback S3 server (tests/s3.py, in a child process): the rows
and ledger the DuckDB sink holds for the same windows, one commit per window carrying its ledger rows, read back
by deltalake itself and by DuckDB over the Parquet files the log names, the ledger rebuilt from the log, commits
that lose a race, a reader polling during reloads, and `maintain`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from s3 import LoopbackS3
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

from amplitude_export.errors import DestinationError, UsageError
from amplitude_export.ledger import EMPTY, FAILED, HourRecord
from amplitude_export.schema import ARROW_SCHEMA
from amplitude_export.sinks import open_sink
from amplitude_export.sinks.delta import LEDGER_DIR, META, DeltaSink, delta_options
from amplitude_export.sinks.delta_ledger import DeltaLedger
from amplitude_export.sinks.duckdb import DuckDBSink
from amplitude_export.verify import verify


@dataclass(frozen=True)
class Table:
    uri: str  # what DeltaSink and deltalake take
    options: dict[str, str]

    @property
    def dest(self) -> str:
        return f"delta:{self.uri}"

    def sink(self, **options: Any) -> DeltaSink:
        return DeltaSink(self.uri, storage_options=self.options or None, **options)

    def delta(self) -> DeltaTable:
        return DeltaTable(self.uri, storage_options=delta_options(self.options))


@pytest.fixture(params=["local", "s3"])
def table(request: pytest.FixtureRequest, tmp_path: Path) -> Table:
    if request.param == "local":
        return Table(str(tmp_path / "events"), {})
    s3: LoopbackS3 = request.getfixturevalue("s3_process")  # delta-rs's file reads hold the GIL: see tests/s3.py
    return Table(f"s3://{s3.new_bucket()}/events", {"endpoint_url": s3.endpoint})


@pytest.fixture
def local(tmp_path: Path) -> Table:
    return Table(str(tmp_path / "events"), {})


def scenario(sink: DeltaSink | DuckDBSink) -> None:
    """Duplicates within and across windows, a reload in another order, a window across midnight, a uuid kept
    by an hour outside the window, an empty hour."""
    (w1, rows1), (w2, rows2) = two_windows()
    sink.write_window("p", w1, read_of([batch(rows1[:3]), batch(rows1[3:])], finisher(w1, rows1)))
    sink.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))
    sink.write_window("p", w1, read_of([batch(rows1[::-1])], finisher(w1, rows1)))
    late = window(22, 25)
    rows = hour_events(hour(22), ["n1", "u4"]) + hour_events(hour(25), ["n2"])
    sink.write_window("p", late, read_of([batch(rows)], finisher(late, rows)))
    one = window(23, 23)
    rows = hour_events(hour(23), ["n3", "n1"])
    sink.write_window("p", one, read_of([batch(rows)], finisher(one, rows)))
    sink.record_hours("p", [HourRecord(hour=hour(9), status=EMPTY)])


def comparable(ledger: dict[datetime, HourRecord]) -> list[dict[str, object]]:
    return [{**r.to_dict(), "updated_at": None} for r in ledger.values()]


def in_order(table: pa.Table) -> list[dict[str, Any]]:
    return sorted(table.to_pylist(), key=lambda r: (r["_upload_hour"], r["_member"], r["_line"]))


def test_rows_and_ledger_are_the_duckdb_sinks_and_each_window_is_one_commit(table: Table, tmp_path: Path) -> None:
    with DuckDBSink(tmp_path / "same.duckdb") as reference:
        scenario(reference)
        expected_rows, expected_ledger = in_order(reference.read_arrow()), comparable(reference.ledger("p"))
        expected_problems = verify(reference, "p").problems  # hours never loaded (4..8, ...): as here
    with table.sink() as sink:
        scenario(sink)
        stored = sink.read_arrow()
        assert stored.schema.equals(ARROW_SCHEMA)
        assert in_order(stored) == expected_rows and comparable(sink.ledger("p")) == expected_ledger
    with table.sink(read_only=True) as reader:
        assert comparable(reader.ledger("p")) == expected_ledger
        assert verify(reader, "p").problems == expected_problems != []
    history = table.delta().history()  # newest first: version 0 created the table
    ours = [entry[META] for entry in reversed(history) if META in entry]
    assert len(history) == 7 and len(ours) == 6  # five windows and one empty hour, each its own commit
    assert [[r["hour"][11:13] for r in payload["ledger"]] for payload in ours] == [
        ["00", "01"], ["02", "03"], ["00", "01"], ["22", "23", "00", "01"], ["23"], ["09"]]
    assert ours[0]["ledger"][0]["events_loaded"] == 3 and ours[0]["project"] == "p"


def test_deltalake_and_duckdb_over_the_logged_files_read_the_same_typed_rows(table: Table) -> None:
    with table.sink() as sink:
        scenario(sink)
        expected = in_order(sink.read_arrow())
    delta = table.delta()
    assert delta.metadata().partition_columns == ["_upload_day"] and delta.protocol().min_reader_version == 1
    own = delta.to_pyarrow_table()
    assert own.schema.field("server_upload_time").type == pa.timestamp("us", tz="UTC")
    assert own.schema.field("event_properties").type in (pa.string(), pa.large_string(), pa.string_view())
    assert sorted(set(own.column("_upload_day").to_pylist())) == [date(2024, 3, 1), date(2024, 3, 2)]
    assert in_order(own.drop_columns(["_upload_day"]).cast(ARROW_SCHEMA)) == expected
    # DuckDB reads the Parquet files the current version names (and only those: replaced ones are still there)
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        con.register("logged", logged_files(table, delta))
        rows = con.sql("SELECT * FROM logged").to_arrow_table()  # partition values live in the log, not the files
    assert in_order(rows.cast(ARROW_SCHEMA)) == expected
    assert sorted(r["uuid"] for r in expected) == sorted([*EXPECTED_UUIDS, "n1", "n2", "n3"])


def logged_files(table: Table, delta: DeltaTable) -> Any:
    """A pyarrow dataset of the files the log names, opened by pyarrow itself (S3 through its own client)."""
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    files = delta.file_uris()
    if not table.options:
        return ds.dataset([uri.removeprefix("file://") for uri in files], format="parquet")
    endpoint = table.options["endpoint_url"]
    fs = pafs.S3FileSystem(endpoint_override=endpoint.removeprefix("http://"), scheme="http", region="us-east-1")
    return ds.dataset([uri.removeprefix("s3://") for uri in files], format="parquet", filesystem=fs)


def test_a_crash_inside_the_batches_commits_nothing(table: Table) -> None:
    (w1, rows1), (w2, rows2) = two_windows()
    with table.sink() as sink:
        sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
        version = table.delta().version()
        with pytest.raises(Crash):
            sink.write_window("p", w2, read_of(crashing([batch(rows2[:3]), batch(rows2[3:])], 1), finisher(w2, rows2)))
        assert table.delta().version() == version and set(sink.ledger("p")) == {hour(0), hour(1)}
    with table.sink(read_only=True) as reader:
        assert uuids(reader.read_arrow()) == ["u1", "u2", "u3", "u4", "u5"] and verify(reader, "p").complete


def test_the_ledger_table_is_a_cache_rebuilt_from_the_log(local: Table, monkeypatch: pytest.MonkeyPatch) -> None:
    with local.sink() as sink:
        scenario(sink)
        expected = comparable(sink.ledger("p"))
    shutil.rmtree(Path(local.uri) / LEDGER_DIR)
    with local.sink(read_only=True) as reader:  # a reader folds every commit in memory, writes nothing
        assert comparable(reader.ledger("p")) == expected
    assert not (Path(local.uri) / LEDGER_DIR).exists()
    with local.sink():  # a writer folds and saves it
        pass
    cached = DeltaTable(str(Path(local.uri) / LEDGER_DIR)).to_pyarrow_table()
    assert cached.num_rows == len(expected) and max(cached.column("events_version").to_pylist()) == 6
    # a writer killed between its commit and the cache's rewrite: the commit's ledger rows are still found
    monkeypatch.setattr(DeltaLedger, "save", lambda self, **_: None)
    with local.sink() as sink:
        sink.record_hours("p", [HourRecord(hour=hour(40), status=FAILED, reason="504")])
    monkeypatch.undo()
    with local.sink(read_only=True) as reader:
        assert reader.ledger("p")[hour(40)].reason == "504"


@pytest.mark.parametrize("made", ["events", "stream table"])
def test_a_first_run_that_loses_the_race_to_create_opens_the_winners_table(
    local: Table, monkeypatch: pytest.MonkeyPatch, made: str
) -> None:
    """Two first runs at once: both find no table and commit version 0; the slower commit fails (delta-rs:
    "Protocol changed since last commit") and that run must open the winner's table. Forced here: the other
    run's create runs first, then this run's commit fails as delta-rs's does."""
    from deltalake.exceptions import CommitFailedError

    from amplitude_export.stream_tables import TABLES
    from amplitude_export.table_ledger import TableState, TableWrite

    original = DeltaTable.create.__func__  # type: ignore[attr-defined]
    raced: list[str] = []

    def create(cls: type[DeltaTable], uri: str, *args: Any, **kwargs: Any) -> DeltaTable:
        if raced or (made == "stream table") != ("_amplitude_tables" in uri):
            return original(cls, uri, *args, **kwargs)
        raced.append(uri)
        original(cls, uri, *args, **kwargs)  # the other run's commit of version 0
        raise CommitFailedError("Failed to commit transaction: Protocol changed since last commit: protocol changed")

    monkeypatch.setattr(DeltaTable, "create", classmethod(create))
    spec = TABLES["annotations"]
    with local.sink() as sink:
        w = window(0, 0)
        rows = hour_events(hour(0), ["a", "b"])
        sink.write_window("p", w, read_of([batch(rows)], finisher(w, rows)))
        row = {"id": 1, "label": "launch", "_taken_at": hour(0)}
        rows_batch = pa.RecordBatch.from_pylist([row], spec.schema)
        state = sink.write_table("p", TableWrite(spec.name, spec.schema, [rows_batch],
                                                 TableState(spec.name, spec.stream, spec.refresh)))
        assert state.rows == 1
    assert len(raced) == 1
    with local.sink(read_only=True) as reader:
        assert uuids(reader.read_arrow()) == ["a", "b"] and verify(reader, "p").complete
        assert reader.read_table("annotations", spec.schema).num_rows == 1


def test_a_commit_that_lost_a_race_is_checked_against_the_winner_and_committed_again(table: Table) -> None:
    first, second = table.sink(), table.sink()  # two writers on one snapshot
    try:
        late = window(1, 1)
        rows = hour_events(hour(1), ["x", "z"])
        second.write_window("p", late, read_of([batch(rows)], finisher(late, rows)))
        early = window(0, 0)
        rows = hour_events(hour(0), ["x", "y"])
        records = first.write_window("p", early, read_of([batch(rows)], finisher(early, rows)))  # its snapshot has no x
        assert [(r.events_loaded, r.duplicates) for r in records] == [(1, 1)]
        assert set(first.ledger("p")) == {hour(0), hour(1)}  # it folded the winner's commit too
    finally:
        first.close()
        second.close()
    with table.sink(read_only=True) as reader:
        assert uuids(reader.read_arrow()) == ["x", "y", "z"] and verify(reader, "p").complete


def test_a_deletion_that_lost_a_race_lowers_the_winners_ledger_rows_too(table: Table) -> None:
    from amplitude_export.ledger import DeletionRecord

    with table.sink() as sink:
        rows = hour_events(hour(0), ["a", "b"])
        sink.write_window("p", window(0, 0), read_of([batch(rows)], finisher(window(0, 0), rows)))
    first, second = table.sink(), table.sink()  # two writers on one snapshot
    try:
        rows = hour_events(hour(1), ["c", "d"])
        second.write_window("p", window(1, 1), read_of([batch(rows)], finisher(window(1, 1), rows)))
        doomed = rows[0]["amplitude_id"]  # line 1 of each hour: "a", and "c" which first's snapshot lacks
        stored = first.delete_users("p", [doomed], DeletionRecord(date(2024, 3, 9), "done", [doomed]))
        assert stored.rows_deleted == 2
        assert {h: r.events_loaded for h, r in first.ledger("p").items()} == {hour(0): 1, hour(1): 1}
    finally:
        first.close()
        second.close()
    with table.sink(read_only=True) as reader:
        assert uuids(reader.read_arrow()) == ["b", "d"] and verify(reader, "p").complete
        assert [(r.day, r.rows_deleted) for r in reader.deletion_records("p")] == [(date(2024, 3, 9), 2)]


def test_a_reader_polling_during_reloads_sees_each_window_whole(local: Table) -> None:
    day = window(0, 23)
    versions = [[row for h in day.each_hour() for row in hour_events(h, [f"{h:%H}-{n}-{v}" for n in range(5)])]
                for v in range(2)]  # two versions of the day: every uuid differs
    stop = threading.Event()

    def reload() -> None:
        with local.sink() as sink:
            n = 0
            while not stop.is_set() or n < 4:
                rows = versions[n % 2]
                sink.write_window("p", day, read_of([batch(rows[:50]), batch(rows[50:])], finisher(day, rows)))
                n += 1

    with local.sink() as sink:
        sink.write_window("p", day, read_of([batch(versions[0])], finisher(day, versions[0])))
    writer = threading.Thread(target=reload)
    writer.start()
    try:
        for _ in range(8):
            with local.sink(read_only=True) as reader:
                names = uuids(reader.read_arrow())
                assert verify(reader, "p").complete  # the ledger read with the rows agrees with them
            assert len(names) == 120 and len({name.rsplit("-", 1)[1] for name in names}) == 1
    finally:
        stop.set()
        writer.join()
    assert local.delta().version() >= 5


def test_maintain_compacts_and_deletes_unreferenced_files(table: Table) -> None:
    with table.sink() as sink:
        for h in range(3):
            rows = hour_events(hour(h), [f"e{h}-{n}" for n in range(3)])
            sink.write_window("p", window(h, h), read_of([batch(rows)], finisher(window(h, h), rows)))
        again = hour_events(hour(2), ["e2-0", "e2-9"])
        sink.write_window("p", window(2, 2), read_of([batch(again)], finisher(window(2, 2), again)))
        before, ledger = uuids(sink.read_arrow()), comparable(sink.ledger("p"))
        assert len(table.delta().file_uris()) == 3
        if not table.options:  # what a window killed before its commit leaves: a file no commit names
            (live, *_) = Path(table.uri).glob("_upload_day=*/*.parquet")
            shutil.copy(live, live.with_name("part-00000-orphan.parquet"))
        done = sink.maintain(older_than=timedelta(0))
        assert "compacted 3 files into 1" in done.summary() and done.files_deleted >= 4
        assert uuids(sink.read_arrow()) == before and comparable(sink.ledger("p")) == ledger
    assert len(table.delta().file_uris()) == 1
    if not table.options:  # on disk: only the compacted file is left in the partition
        assert len(list(Path(table.uri).glob("_upload_day=*/*.parquet"))) == 1
        assert (Path(table.uri) / LEDGER_DIR / "_delta_log").is_dir()
    with table.sink(read_only=True) as reader:
        assert verify(reader, "p").complete


def test_open_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DestinationError, match="is not a Delta table"):
        open_sink(f"delta:{tmp_path / 'none'}", read_only=True)
    write_deltalake(str(tmp_path / "other"), pa.table({"a": [1]}))
    with pytest.raises(DestinationError, match="not written by amplitude-export"):
        open_sink(f"delta:{tmp_path / 'other'}")
    with pytest.raises(UsageError, match="takes text"):
        open_sink("delta:s3://bucket/t", storage_options={"client_kwargs": {"a": "b"}})
    open_sink(f"delta:{tmp_path / 'mine'}").close()
    with pytest.raises(DestinationError, match="opened read-only"):
        open_sink(f"delta:{tmp_path / 'mine'}", read_only=True).record_hours("p", [])


BLOCK_DELTALAKE = """
import importlib.abc, sys
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "deltalake":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NotInstalled())
from amplitude_export.cli import main
main()
"""


@pytest.mark.parametrize("command", ["status", "maintain"])
def test_without_deltalake_the_error_names_the_extra(command: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
    result = subprocess.run([sys.executable, "-c", BLOCK_DELTALAKE, command, "--dest", f"delta:{tmp_path / 't'}"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: Delta Lake destinations need deltalake: pip install 'amplitude-export[delta]'"]


def test_commit_info_is_plain_json(local: Table) -> None:
    with local.sink() as sink:
        scenario(sink)
    log = sorted((Path(local.uri) / "_delta_log").glob("*.json"))
    infos = [json.loads(line)["commitInfo"] for path in log for line in path.read_text().splitlines()
             if line.startswith('{"commitInfo"')]
    assert sum(1 for info in infos if META in info) == 6
    assert all(isinstance(datetime.fromisoformat(r["hour"]).astimezone(UTC), datetime)
               for info in infos if META in info for r in info[META]["ledger"])


def test_a_window_another_run_loaded_meanwhile_from_the_same_data_is_left_as_it_is(local: Table) -> None:
    """Two runs of one range: B commits the window from the same archive (same content hashes) after A opened the
    table; A's commit loses to it, and A then leaves the window as B loaded it (another commit could only replace
    the rows with the same rows) instead of trying again until it gives up. Other data is loaded as usual, and a
    run that finds those rows when it opens (a --refresh after them) replaces them as asked."""
    w = window(0, 1)
    rows = hour_events(hour(0), ["x1", "x2"]) + hour_events(hour(1), ["y1"])

    def records(run_id: str) -> Callable[[], list[HourRecord]]:
        return lambda: [dataclasses.replace(r, run_id=run_id) for r in finisher(w, rows)()]

    a, b = local.sink(), local.sink()
    try:
        b.write_window("p", w, read_of([batch(rows)], records("run-b")))
        version = local.delta().version()
        stored = a.write_window("p", w, read_of([batch(rows)], records("run-a")))
        assert [r.run_id for r in stored] == ["run-b", "run-b"]
        assert local.delta().version() == version and uuids(a.read_arrow()) == ["x1", "x2", "y1"]
        changed = hour_events(hour(0), ["x1"]) + hour_events(hour(1), ["y1"])
        finish = records("run-a")
        a.write_window("p", w, read_of([batch(changed)], lambda: [
            dataclasses.replace(r, content_hash="sha256:" + "1" * 64) for r in finish()]))  # other data: loaded
        assert uuids(local.sink(read_only=True).read_arrow()) == ["x1", "y1"]
    finally:
        a.close()
        b.close()
    c = local.sink()
    try:
        c.write_window("p", w, read_of([batch(rows)], records("run-c")))
        assert [r.run_id for r in c.ledger("p").values()] == ["run-c", "run-c"]
        assert uuids(c.read_arrow()) == ["x1", "x2", "y1"]
    finally:
        c.close()

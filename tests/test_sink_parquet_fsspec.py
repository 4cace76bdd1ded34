"""The Parquet sink through fsspec URLs: `s3://` on the loopback S3 server (moto, tests/s3.py), which has what
real object stores have (no rename, no flock, conditional PUT for the lock); `memory://` only where a filesystem
must lack something S3 has. `gs://` and `az://` take the same path through fsspec.

The same windows written through a URL and to a local directory must give the same files and rows, and the
crash and lock rules must hold without an atomic rename or a flock.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid as uuid_module
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import stamina
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

import amplitude_export
from amplitude_export.client import ExportClient
from amplitude_export.config import Credentials, Secret
from amplitude_export.errors import DestinationBusyError, DestinationError, UsageError
from amplitude_export.fake_server import FakeExportServer
from amplitude_export.ledger import EMPTY, FAILED, LOADED, HourRecord
from amplitude_export.pipeline import run
from amplitude_export.schema import ARROW_SCHEMA
from amplitude_export.sinks import open_sink
from amplitude_export.sinks.parquet import FsspecDirectory, LocalDirectory, ParquetSink, project_tag

MEMORY = fsspec.filesystem("memory")


@dataclass(frozen=True)
class Lake:
    """A dataset URL on an fsspec filesystem, and that filesystem to look behind the sink's back."""

    url: str
    fs: Any
    options: dict[str, Any]

    @property
    def root(self) -> str:
        return self.url.split("://", 1)[1]

    def sink(self, **kwargs: Any) -> ParquetSink:
        return ParquetSink(self.url, storage_options=self.options, **kwargs)

    def files(self) -> list[str]:
        """Every file under the partitions, temp files included, relative to the root."""
        self.fs.invalidate_cache()
        return sorted(p.removeprefix(self.root + "/") for p in self.fs.find(self.root) if "/upload_date=" in p)

    def state(self) -> dict[str, Any]:
        return json.loads(self.fs.cat_file(f"{self.root}/_state/ledger.json"))  # type: ignore[no-any-return]

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"


@pytest.fixture
def lake(s3: LoopbackS3, s3_bucket: str) -> Lake:
    """A dataset URL in a fresh bucket on the loopback S3 server."""
    return Lake(f"s3://{s3_bucket}/lake", s3.filesystem(), s3.options)


@pytest.fixture
def memory_lake() -> Iterator[Lake]:
    """A fresh `memory://` dataset (the memory filesystem is global to the process), removed afterwards."""
    name = f"/test-{uuid_module.uuid4().hex[:12]}"
    yield Lake(f"memory://{name}/lake", MEMORY, {})
    if MEMORY.exists(name):
        MEMORY.rm(name, recursive=True)


def local_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.glob("upload_date=*/*"))


def write_scenario(sink: ParquetSink) -> None:
    """Two windows with duplicates, a reload in another order, and a window inside an older file."""
    (w1, rows1), (w2, rows2) = two_windows()
    sink.write_window("p", w1, read_of([batch(rows1[:3]), batch(rows1[3:])], finisher(w1, rows1)))
    sink.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))
    sink.write_window("p", w1, read_of([batch(rows1[::-1])], finisher(w1, rows1)))
    late = window(22, 25)  # crosses midnight
    rows = hour_events(hour(22), ["n1", "u4"]) + hour_events(hour(25), ["n2"])
    sink.write_window("p", late, read_of([batch(rows)], finisher(late, rows)))
    one = window(23, 23)
    rows = hour_events(hour(23), ["n3", "n1"])  # n1 lives in hour 22, outside: skipped
    sink.write_window("p", one, read_of([batch(rows)], finisher(one, rows)))
    sink.record_hours("p", [HourRecord(hour=hour(9), status=EMPTY)])


def comparable(ledger: dict[datetime, HourRecord]) -> list[dict[str, object]]:
    return [{**r.to_dict(), "updated_at": None} for r in ledger.values()]


def test_a_url_holds_the_same_files_rows_and_ledger_as_a_local_directory(lake: Lake, tmp_path: Path) -> None:
    with lake.sink() as remote, ParquetSink(str(tmp_path / "lake")) as local:
        assert isinstance(remote.store, FsspecDirectory) and remote.description == f"parquet:{lake.url}"
        write_scenario(remote)
        write_scenario(local)
        assert remote.read_arrow().equals(local.read_arrow())
        assert comparable(remote.ledger("p")) == comparable(local.ledger("p"))
        assert remote.count_by_hour("p") == local.count_by_hour("p")
    assert lake.files() == local_files(tmp_path / "lake")
    assert lake.state()["files"] == json.loads((tmp_path / "lake" / "_state" / "ledger.json").read_text())["files"]
    assert not lake.fs.exists(lake.root + "/_state/lock")  # released on close

    # what an outside reader sees: hive partitions, `_state` skipped (pyarrow ignores `_` and `.` prefixes)
    outside = ds.dataset(lake.root, filesystem=lake.fs, format="parquet", partitioning="hive")
    assert outside.schema.remove_metadata().equals(ARROW_SCHEMA.append(outside.schema.field("upload_date")))
    table = outside.to_table()
    assert sorted(table.column("uuid").to_pylist()) == sorted(EXPECTED_UUIDS + ["n1", "n2", "n3"])
    for path in lake.fs.find(lake.root):
        if path.endswith(".parquet"):
            with lake.fs.open(path) as handle:
                assert pq.read_schema(handle).remove_metadata().equals(ARROW_SCHEMA)


def test_read_arrow_and_read_events_take_the_url(lake: Lake) -> None:
    with lake.sink() as sink:
        for w, rows in two_windows():
            sink.write_window("p", w, read_of([batch(rows)], finisher(w, rows)))
    dest = f"parquet:{lake.url}"
    options = lake.options
    assert uuids(amplitude_export.read_arrow(dest, storage_options=options)) == EXPECTED_UUIDS
    assert uuids(amplitude_export.read_arrow(dest, start="2024-03-01T02", end="2024-03-01T03",
                                             storage_options=options)) == ["u6", "u7", "u8", "u9"]
    assert len(amplitude_export.read_events(dest, storage_options=options)) == len(EXPECTED_UUIDS)
    with pytest.raises(DestinationError, match="not a Parquet dataset"):
        amplitude_export.read_arrow(f"parquet:{lake.url}-missing", storage_options=options)


def test_a_crash_inside_the_batches_leaves_nothing_of_the_window(lake: Lake) -> None:
    (w1, rows1), (w2, rows2) = two_windows()
    with lake.sink() as sink:
        sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
        before = lake.files()
        with pytest.raises(Crash):
            sink.write_window("p", w2, read_of(crashing([batch(rows2[:2]), batch(rows2[2:])], after=1),
                                               finisher(w2, rows2)))
        assert lake.files() == before
        assert sorted(sink.ledger("p")) == [hour(0), hour(1)]
        sink.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))
        assert uuids(sink.read_arrow()) == EXPECTED_UUIDS


def test_files_moved_but_never_committed_are_orphans_removed_on_open(
    lake: Lake, monkeypatch: pytest.MonkeyPatch
) -> None:
    (w1, rows1), (w2, rows2) = two_windows()
    with lake.sink() as sink:
        sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
        committed = lake.files()

        def die(*args: object) -> None:
            raise Crash("killed between the moves and the state write")

        monkeypatch.setattr(sink, "_save_state", die)
        with pytest.raises(Crash):  # replaces w1 and adds w2's hours: every new file is moved into place first
            sink.write_window("p", window(0, 3), read_of([batch(rows1 + rows2)], finisher(window(0, 3), rows1 + rows2)))
    assert len(lake.files()) > len(committed)
    # and a move that died half way: an object store's mv is a copy then a delete
    root = lake.root
    live = f"{root}/{committed[0]}"
    lake.fs.copy(live, f"{root}/upload_date=2024-03-01/.tmp-half-moved")
    lake.fs.copy(live, f"{root}/upload_date=2024-03-01/20240301T00_20240301T01.1.parquet")
    lake.fs.copy(live, f"{root}/upload_date=2024-03-07/20240307T00_20240307T00.parquet")

    with lake.sink() as sink:
        assert lake.files() == committed
        assert uuids(sink.read_arrow()) == ["u1", "u2", "u3", "u4", "u5"]
        assert sorted(sink.ledger("p")) == [hour(0), hour(1)]
        sink.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))
        assert uuids(sink.read_arrow()) == EXPECTED_UUIDS


def test_a_failed_move_is_cleaned_at_once(lake: Lake, monkeypatch: pytest.MonkeyPatch) -> None:
    (w1, rows1), _ = two_windows()
    with lake.sink() as sink:
        store = sink.store
        assert isinstance(store, FsspecDirectory)

        def copy_then_fail(src: str, dst: str) -> None:
            store.fs.copy(store.abs(src), store.abs(dst))
            raise OSError("connection reset during the delete")

        monkeypatch.setattr(store, "rename", copy_then_fail)
        with pytest.raises(DestinationError, match="connection reset"):
            sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
        monkeypatch.undo()
        assert lake.files() == []
    with lake.sink() as sink:
        assert lake.files() == [] and sink.ledger("p") == {}


def test_one_writer_at_a_time_with_a_lock_object(lake: Lake) -> None:
    lock = lake.root + "/_state/lock"
    sink = lake.sink()
    holder = json.loads(lake.fs.cat_file(lock))
    assert holder["pid"] == os.getpid() and holder["token"]
    with pytest.raises(DestinationBusyError, match="in use by another run"):
        lake.sink()
    reader = open_sink(f"parquet:{lake.url}", read_only=True, storage_options=lake.options)  # readers take no lock
    reader.close()
    sink.close()
    assert not lake.fs.exists(lock)
    lake.sink().close()


def lock_body(**fields: object) -> bytes:
    body = {"token": "someone", "host": "another-host", "pid": 1,
            "acquired": datetime.now(UTC).isoformat(), "refreshed": datetime.now(UTC).isoformat()}
    return json.dumps({**body, **fields}).encode()


def test_a_stale_lock_is_taken_over(lake: Lake) -> None:
    lock = lake.root + "/_state/lock"
    lake.sink().close()
    lake.fs.pipe_file(lock, lock_body())
    with pytest.raises(DestinationBusyError, match="another-host"):
        lake.sink()
    old = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    lake.fs.pipe_file(lock, lock_body(refreshed=old))  # a run on another machine died two hours ago
    lake.sink().close()
    import socket

    dead = 2**22 + 12345  # above the default pid_max: never a live process
    lake.fs.pipe_file(lock, lock_body(host=socket.gethostname(), pid=dead))  # a run on this machine was killed
    lake.sink().close()
    lake.fs.pipe_file(lock, b"{half")
    lake.sink().close()


def test_a_live_run_keeps_its_lock_fresh_between_windows(lake: Lake) -> None:
    """A run that spends longer than `lock_stale_after` between commits (a long download) keeps its lock."""
    (w1, rows1), (w2, rows2) = two_windows()
    with lake.sink(lock_stale_after=0.4) as sink:
        sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
        time.sleep(1.2)
        with pytest.raises(DestinationBusyError, match="in use by another run"):
            lake.sink(lock_stale_after=0.4)
        sink.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))
    assert not lake.fs.exists(lake.root + "/_state/lock")


def test_a_run_whose_lock_was_taken_over_stops_before_committing(lake: Lake) -> None:
    (w1, rows1), (w2, rows2) = two_windows()
    lock = lake.root + "/_state/lock"
    with lake.sink() as sink:
        sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
        before = lake.files()
        lake.fs.pipe_file(lock, lock_body())  # another run found our lock stale and took it

        def finish() -> list[HourRecord]:
            return finisher(w2, rows2)()

        with pytest.raises(DestinationBusyError, match="took over"):
            sink.write_window("p", w2, read_of([batch(rows2)], finish))
        assert lake.files() == before and sorted(sink.ledger("p")) == [hour(0), hour(1)]
    assert json.loads(lake.fs.cat_file(lock))["token"] == "someone"  # not ours to delete


def test_missing_fsspec_or_protocol_names_the_install_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(UsageError, match=r"pip install 'amplitude-export\[s3\]'"):
            open_sink("parquet:s3://bucket/events")
    with pytest.raises(UsageError, match="Protocol not known"):
        ParquetSink("nosuchproto://x/y")
    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if fsspec were not installed
    with pytest.raises(UsageError, match=r"needs fsspec: pip install 'amplitude-export\[gcs\]'"):
        ParquetSink("gs://bucket/events")
    with pytest.raises(UsageError, match="needs fsspec: pip install fsspec"):
        ParquetSink("memory://x")
    # a file:// URL is a local directory (atomic renames, flock), fsspec or not
    with ParquetSink(f"file://{tmp_path / 'lake'}") as sink:
        assert isinstance(sink.store, LocalDirectory)


def test_run_end_to_end_into_a_url(lake: Lake, fake_server: FakeExportServer, tmp_path: Path) -> None:
    day = datetime(2024, 3, 1, tzinfo=UTC)
    credentials = Credentials(fake_server.api_key, Secret("demo-secret"), "us", fake_server.url)
    with stamina.set_testing(True, attempts=100, cap=True):
        for _ in range(2):  # the second run finds every hour done
            sink = open_sink(f"parquet:{lake.url}", storage_options=lake.options)
            try:
                with ExportClient(credentials) as client:
                    report = run(client, sink, project="p", start="2024-03-01", end="2024-03-01",
                                 data_dir=tmp_path, workers=1, now=day + timedelta(days=30))
            finally:
                sink.close()
            assert report.exit_code == 0, report.summary()
    stored = uuids(amplitude_export.read_arrow(f"parquet:{lake.url}", storage_options=lake.options))
    assert len(stored) == len(set(stored)) and set(stored) == fake_server.expected_uuids(day, day.replace(hour=23))


def test_a_filesystem_without_exclusive_create_still_gets_one_lock(
    memory_lake: Lake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On memory://: S3 (and moto) have conditional PUTs, so only a stand-in can lack exclusive create."""
    real_open = MEMORY.open

    def no_x(path: str, mode: str = "rb", **kwargs: object) -> object:
        if "x" in mode:
            raise NotImplementedError("File mode not supported")
        return real_open(path, mode, **kwargs)

    monkeypatch.setattr(MEMORY, "open", no_x)
    with memory_lake.sink() as sink:
        with pytest.raises(DestinationBusyError):
            memory_lake.sink()
        (w1, rows1), _ = two_windows()
        sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
    memory_lake.sink().close()


def test_warehouses_doc_declares_every_column_in_order() -> None:
    from amplitude_export.schema import ALL_COLUMNS

    hive = {"string": "string", "integer": "bigint", "float": "double", "boolean": "boolean",
            "timestamp": "timestamp", "json": "string"}
    text = (Path(__file__).parent.parent / "docs" / "WAREHOUSES.md").read_text()
    ddl = text.split("CREATE EXTERNAL TABLE amplitude_events (\n", 1)[1].split("\n)", 1)[0]
    declared = [line.strip().rstrip(",") for line in ddl.splitlines()]
    assert declared == [f"`{c.name}` {hive[c.kind]}" for c in ALL_COLUMNS]
    for column in ALL_COLUMNS:
        assert f"`{column.name}`" in text.split("| kind |", 1)[1].split("### DuckDB", 1)[0]


def test_a_data_file_deleted_from_the_bucket_reads_as_failed_hours_until_reloaded(lake: Lake) -> None:
    (w1, rows1), (w2, rows2) = two_windows()
    with lake.sink() as s:
        s.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
        s.write_window("p", w2, read_of([batch(rows2)], finisher(w2, rows2)))
    with lake.sink(read_only=True) as reader:  # lists the bucket once: a later listing must not be this one
        assert [r.status for r in reader.ledger("p").values()] == [LOADED] * 4
    lake.fs.rm_file(lake.path(f"upload_date=2024-03-01/20240301T00_20240301T01-{project_tag('p')}.parquet"))

    with lake.sink(read_only=True) as reader:
        assert [r.status for r in reader.ledger("p").values()] == [FAILED, FAILED, LOADED, LOADED]
        assert uuids(reader.read_arrow()) == ["u6", "u7", "u8", "u9"]
    with lake.sink() as s:
        s.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
        assert [r.status for r in s.ledger("p").values()] == [LOADED] * 4
        assert sorted(uuids(s.read_arrow())) == EXPECTED_UUIDS
    assert sorted(lake.state()["files"]) == [f for f in lake.files() if f.endswith(".parquet")]

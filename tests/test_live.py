"""Loading a window while it downloads (`live.py`): the same rows as loading it once landed, and every way the
stream can go wrong ends in the usual load, exactly once."""

from __future__ import annotations

import io
import json
import logging
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest
import stamina

from amplitude_export.client import ExportClient
from amplitude_export.config import Credentials, Secret
from amplitude_export.fake_server import FakeExportServer
from amplitude_export.live import LiveFile, LiveMembers, StreamAbandoned
from amplitude_export.pipeline import run
from amplitude_export.reader import WindowReader
from amplitude_export.sinks import open_sink
from amplitude_export.windows import Window

DAY = datetime(2024, 3, 1, tzinfo=UTC)
NOW = datetime(2024, 4, 1, tzinfo=UTC)
STREAMED = "loaded while it downloaded"
GAVE_UP = "stopped loading while downloading"


@pytest.fixture(autouse=True)
def no_backoff_sleeps() -> Iterator[None]:
    with stamina.set_testing(True, attempts=100, cap=True):
        yield


def serve(**options: object) -> FakeExportServer:
    # paced, so that the loader finds the download running and streams it
    settings: dict[str, object] = {"events_per_hour": 40, "members_per_hour": 2, "seed": 3,
                                   "bytes_per_second": 400_000}
    settings.update(options)
    return FakeExportServer(**settings)  # type: ignore[arg-type]


def run_day(server: FakeExportServer, tmp_path: Path, name: str, **options: object):  # type: ignore[no-untyped-def]
    sink = open_sink(f"duckdb:{tmp_path / name}.duckdb")
    try:
        with ExportClient(Credentials(server.api_key, Secret("demo-secret"), "us", server.url)) as client:
            return run(client, sink, project="p", start="2024-03-01", end="2024-03-01", data_dir=tmp_path / name,
                       now=NOW, **options)  # type: ignore[arg-type]
    finally:
        sink.close()


def rows(tmp_path: Path, name: str) -> list[tuple[object, ...]]:
    with duckdb.connect(str(tmp_path / f"{name}.duckdb"), read_only=True) as con:
        columns = [c for (c,) in con.execute("SELECT column_name FROM information_schema.columns "
                                             "WHERE table_name = 'events' AND column_name <> '_run_id'").fetchall()]
        return con.execute(f"SELECT {', '.join(map(repr, columns))} FROM events ORDER BY uuid").fetchall()


def ledger(tmp_path: Path, name: str) -> list[tuple[object, ...]]:
    with duckdb.connect(str(tmp_path / f"{name}.duckdb"), read_only=True) as con:
        return con.execute("SELECT hour, status, events_loaded, duplicates, lines_read, rejects, content_hash, "
                           "attempts FROM _amplitude_ledger ORDER BY hour").fetchall()


def test_a_streamed_load_gives_the_rows_and_ledger_of_a_landed_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with serve(malformed_lines=True) as server:
        streamed = run_day(server, tmp_path, "streamed")
        assert STREAMED in caplog.text and GAVE_UP not in caplog.text
        caplog.clear()
        landed = run_day(server, tmp_path, "landed", stream=False)
        assert STREAMED not in caplog.text
        expected = server.expected_uuids(DAY, DAY + timedelta(hours=23))
    assert streamed.exit_code == landed.exit_code == 0
    assert streamed.events == landed.events == len(expected) and streamed.rejects == landed.rejects > 0
    assert rows(tmp_path, "streamed") == rows(tmp_path, "landed")
    assert ledger(tmp_path, "streamed") == ledger(tmp_path, "landed")
    assert (tmp_path / "streamed" / "raw" / "20240301T00_20240301T23.zip").exists()
    assert _rejects(tmp_path / "streamed") == _rejects(tmp_path / "landed")


def _rejects(data_dir: Path) -> list[dict[str, object]]:
    lines = [json.loads(line) for f in (data_dir / "rejects").glob("*.jsonl") for line in f.read_text().splitlines()]
    return sorted(({k: v for k, v in r.items() if k != "run_id"} for r in lines), key=json.dumps)


@pytest.mark.parametrize("fault", ["truncate", "corrupt"])
def test_a_download_that_breaks_while_streaming_is_loaded_once_from_its_retry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    caplog.set_level(logging.INFO)
    with serve(faults=[fault]) as server:
        report = run_day(server, tmp_path, "db")
        expected = server.expected_uuids(DAY, DAY + timedelta(hours=23))
    assert report.exit_code == 0, report.summary()
    assert GAVE_UP in caplog.text and STREAMED not in caplog.text
    stored = [row[0] for row in duckdb.connect(str(tmp_path / "db.duckdb"), read_only=True)
              .execute("SELECT uuid FROM events").fetchall()]
    assert len(stored) == len(set(stored)) and set(stored) == expected
    assert [r[-1] for r in ledger(tmp_path, "db")] == [2] * 24  # the second attempt's archive was loaded


def test_without_keep_raw_a_streamed_archive_is_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with serve() as server:
        report = run_day(server, tmp_path, "db", keep_raw=False)
    assert report.exit_code == 0 and STREAMED in caplog.text
    assert list((tmp_path / "db" / "raw").iterdir()) == []


def _landed(path: Path, members: list[tuple[str, bytes]], *, seekable: bool = True) -> LiveFile:
    """A LiveFile over an archive already written whole (as if downloaded)."""
    if seekable:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, data in members:
                archive.writestr(name, data)
    else:  # zipfile writes data descriptors to a stream it cannot seek back in
        class Unseekable(io.RawIOBase):
            def __init__(self) -> None:
                self.out = bytearray()

            def writable(self) -> bool:
                return True

            def write(self, data: bytes) -> int:  # type: ignore[override]
                self.out += data
                return len(data)

        sink = Unseekable()
        with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, data in members:
                with archive.open(name, "w") as member:
                    member.write(data)
        path.write_bytes(bytes(sink.out))
    live = LiveFile(path, 1)
    live.grew(path.stat().st_size)
    live.finished(path)
    return live


def _gz(lines: list[str]) -> bytes:
    import gzip

    return gzip.compress("".join(line + "\n" for line in lines).encode())


def _member(hour: int, n: int, uuid: str) -> tuple[str, bytes]:
    line = f'{{"uuid":"{uuid}","event_type":"e","server_upload_time":"2024-03-01 {hour:02d}:10:00.000000"}}'
    return f"1/1_2024-03-01_{hour}#{n}.json.gz", _gz([line])


def _read(live: LiveFile, window: Window) -> list[str]:
    reader = WindowReader(live.path, window, run_id="r", rejects_dir=None, live=live)
    return [u for batch in reader.batches() for u in batch.column("uuid").to_pylist()]


def test_the_reader_streams_members_in_order_and_checks_the_directory(tmp_path: Path) -> None:
    live = _landed(tmp_path / "a.zip", [_member(0, 0, "a"), _member(0, 1, "b"), _member(1, 0, "c")])
    assert _read(live, Window(DAY, DAY + timedelta(hours=1))) == ["a", "b", "c"]


@pytest.mark.parametrize("case", ["out of order", "outside the window", "data descriptors", "not a zip"])
def test_archives_the_stream_cannot_take_are_given_back(tmp_path: Path, case: str) -> None:
    window = Window(DAY, DAY + timedelta(hours=1))
    members = [_member(0, 0, "a"), _member(1, 0, "b")]
    path = tmp_path / "a.zip"
    if case == "out of order":
        live = _landed(path, members[::-1])
    elif case == "outside the window":
        live = _landed(path, [*members, _member(5, 0, "c")])
    elif case == "data descriptors":
        live = _landed(path, members, seekable=False)
    else:
        path.write_bytes(b"<html>not a zip</html>")
        live = LiveFile(path, 1)
        live.grew(path.stat().st_size)
        live.finished(path)
    with pytest.raises(StreamAbandoned):
        _read(live, window)


def test_a_read_waits_for_its_bytes_and_a_failed_download_wakes_it(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "a.zip.part"
    path.write_bytes(b"")
    live = LiveFile(path, 1)
    members = LiveMembers(live)
    errors: list[BaseException] = []

    def wait_for_first() -> None:
        try:
            members.get(0)
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    waiting = threading.Thread(target=wait_for_first)
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive()  # nothing has arrived: it waits
    live.abandoned()
    waiting.join(5)
    assert not waiting.is_alive() and isinstance(errors[0], StreamAbandoned)
    with pytest.raises(StreamAbandoned):
        live.wait_finished()


def test_a_live_file_whose_attempt_failed_before_loading_began_gives_the_window_back(tmp_path: Path) -> None:
    from amplitude_export.load import Loader

    part = tmp_path / "raw" / "20240301T00_20240301T23.zip.part"
    part.parent.mkdir()
    part.write_bytes(b"PK\x03\x04 half a header")
    live = LiveFile(part, 1)
    live.abandoned()
    part.unlink()  # as the client does when an attempt fails
    sink = open_sink(f"duckdb:{tmp_path / 'db.duckdb'}")
    try:
        with pytest.raises(StreamAbandoned):
            Loader(sink, "p", run_id="r", data_dir=tmp_path).load(Window(DAY, DAY + timedelta(hours=23)), part,
                                                                   live=live)
        assert sink.ledger("p") == {}
    finally:
        sink.close()


def test_the_fake_servers_pace_must_be_positive() -> None:
    with pytest.raises(ValueError, match="bytes_per_second must be a positive number"):
        FakeExportServer(bytes_per_second=0)

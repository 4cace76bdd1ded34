"""WindowReader on archives built in the test: fidelity on the real lines, `_extra`, rejects, errors, ledger."""

from __future__ import annotations

import gzip
import json
import logging
import os
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from conftest import REAL_EVENTS

from amplitude_export import archive as archive_module
from amplitude_export import parse, schema
from amplitude_export.archive import content_hash, list_members
from amplitude_export.errors import ArchiveError
from amplitude_export.ledger import EMPTY, LOADED
from amplitude_export.reader import WindowReader
from amplitude_export.windows import Window

HOUR = datetime(2025, 7, 1, 17, tzinfo=UTC)
WINDOW = Window(HOUR, HOUR)


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, body in members.items():
            archive.writestr(name, gzip.compress(body, mtime=0))
    return path


def member(hour: int, n: int = 0, day: str = "2025-07-01") -> str:
    return f"7/7_{day}_{hour}#{n}.json.gz"


def read(path: Path, window: Window = WINDOW, **options: Any) -> tuple[WindowReader, pa.Table]:
    options.setdefault("workers", 1)
    options.setdefault("rejects_dir", path.parent / "rejects")
    reader = WindowReader(path, window, run_id="run-1", **options)
    batches = list(reader.batches())
    for batch in batches:
        assert batch.schema == schema.ARROW_SCHEMA
    return reader, pa.Table.from_batches(batches, schema=schema.ARROW_SCHEMA)


def event(uuid: str, **fields: Any) -> bytes:
    base = {"uuid": uuid, "event_type": "x", "event_time": "2025-07-01 17:00:00.000001",
            "server_upload_time": "2025-07-01 17:30:00.123456"}
    return json.dumps({**base, **fields}).encode()


def expected_time(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_the_real_lines_load_with_every_value_exact(tmp_path: Path) -> None:
    lines = REAL_EVENTS.read_bytes().splitlines()
    path = make_zip(tmp_path / "a.zip", {member(17): b"\n".join(lines) + b"\n"})
    reader, table = read(path)
    rows = table.to_pylist()
    assert len(rows) == len(lines) == 7 and reader.rejects_total == 0 and reader.lines_total == 7
    for number, (line, row) in enumerate(zip(lines, rows, strict=True), 1):
        source = json.loads(line)
        for column in schema.EXPORT_COLUMNS:
            got, want = row[column.name], source.get(column.source)
            if want is None:
                assert got is None, column.name
            elif column.kind == schema.JSON:
                assert json.loads(got) == want, column.name
            elif column.kind == schema.TIMESTAMP:
                assert got == expected_time(want), column.name
            else:
                assert got == want and type(got) is type(want), column.name
        assert set(source) <= schema.KNOWN_SOURCES
        assert row["_extra"] is None
        assert (row["_member"], row["_line"], row["_run_id"]) == (member(17), number, "run-1")
        assert row["_upload_hour"] == HOUR
    assert rows[0]["insert_id"] == "523095E5-3F1F-424F-BDFF-514DF8CBC53E"  # `$insert_id` renamed
    assert rows[6]["uuid"] is None and rows[6]["city"] is None  # the trimmed 7th line still loads


def test_unicode_and_microseconds_survive(tmp_path: Path) -> None:
    line = event("u1", city="東京 Zürich 🎵", event_time="2025-07-01 17:00:00.999999",
                 client_event_time="2025-07-01 17:00:00", user_properties={"名前": "Łódź", "n": [1, 2.5, None]})
    path = make_zip(tmp_path / "a.zip", {member(17): line + b"\n"})
    row = read(path)[1].to_pylist()[0]
    assert row["city"] == "東京 Zürich 🎵"
    assert row["event_time"] == datetime(2025, 7, 1, 17, 0, 0, 999999, tzinfo=UTC)
    assert row["client_event_time"] == datetime(2025, 7, 1, 17, tzinfo=UTC)
    assert json.loads(row["user_properties"]) == {"名前": "Łódź", "n": [1, 2.5, None]}


def test_unknown_keys_and_mistyped_values_land_in_extra(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = [
        event("a", event_id="abc", key_only_this_test_sends={"x": 1}),
        event("b", event_id=12.0, session_id=1.5, location_lat=3, is_attribution_event="yes"),
        event("c", event_time="2025-13-45 99:00:00", processed_time="yesterday", key_only_this_test_sends=2),
        event("d", amplitude_id=2**70, paying=5),
    ]
    path = make_zip(tmp_path / "a.zip", {member(17): b"\n".join(lines)})
    with caplog.at_level(logging.INFO, logger="amplitude_export.reader"):
        reader, table = read(path)
    rows = table.to_pylist()
    assert [json.loads(r["_extra"]) if r["_extra"] else None for r in rows] == [
        {"event_id": "abc", "key_only_this_test_sends": {"x": 1}},
        {"session_id": 1.5, "is_attribution_event": "yes"},
        {"event_time": "2025-13-45 99:00:00", "processed_time": "yesterday", "key_only_this_test_sends": 2},
        {"amplitude_id": 2**70, "paying": 5},
    ]
    assert rows[0]["event_id"] is None and rows[1]["event_id"] == 12  # an integral float fits an int column
    assert rows[1]["session_id"] is None and rows[1]["location_lat"] == 3.0
    assert rows[2]["event_time"] is None and rows[2]["server_upload_time"] is not None
    assert rows[3]["amplitude_id"] is None and rows[3]["paying"] is None
    assert reader.unknown_fields == {"key_only_this_test_sends"}
    logged = [r for r in caplog.records if "key_only_this_test_sends" in r.getMessage()]
    assert len(logged) == 1


def test_rejects_are_written_with_member_and_line(tmp_path: Path) -> None:
    body = b"\n".join([event("a"), b"not json {", b"", b"[1, 2]", b"\xff\xfe garbage", event("b"), b"", b"",
                       b'{"uuid": "c", "data": {"k": "\xff"}}'])
    path = make_zip(tmp_path / "a.zip", {member(17, 0): event("z"), member(17, 1): body})
    reader, table = read(path)
    assert table.column("uuid").to_pylist() == ["z", "a", "b"]
    assert table.column("_line").to_pylist() == [1, 1, 6]
    assert reader.rejects_total == 4 and reader.lines_total == 7
    rejects = [json.loads(line) for line in (tmp_path / "rejects" / f"{WINDOW.name}.jsonl").read_text().splitlines()]
    assert [(r["member"], r["line"]) for r in rejects] == [(member(17, 1), n) for n in (2, 4, 5, 9)]
    assert rejects[0]["text"] == "not json {" and "invalid JSON" in rejects[0]["error"]
    assert rejects[1]["error"] == "not a JSON object"
    assert rejects[2]["text"].endswith(" garbage")
    assert rejects[3]["error"] == "invalid UTF-8"  # a nested value no text column can hold
    record = reader.hour_records()[0]
    assert (record.lines_read, record.rejects) == (7, 4)


def test_no_rejects_file_without_rejects_and_require_uuid(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "a.zip", {member(17): REAL_EVENTS.read_bytes()})
    stale = tmp_path / "rejects" / f"{WINDOW.name}.jsonl"
    stale.parent.mkdir()
    stale.write_text("from an earlier run\n")
    read(path)
    assert not stale.exists()
    reader, table = read(path, require_uuid=True)
    assert table.num_rows == 6 and reader.rejects_total == 1
    assert json.loads(stale.read_text())["error"] == "no string uuid"


def test_a_broken_crc_names_the_member(tmp_path: Path) -> None:
    body = b"\n".join(event(str(i)) for i in range(3000))
    path = make_zip(tmp_path / "a.zip", {member(17, 0): body, member(17, 1): body})
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member(17, 1))
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError) as caught:
        read(path)
    assert caught.value.member == member(17, 1)


@pytest.mark.parametrize("workers", [1, 2])
def test_members_the_zip_deflated_as_well_read_the_same(tmp_path: Path, workers: int) -> None:
    """Stored members are read straight from the file; anything else goes through zipfile, to the same rows."""
    bodies = {member(17, n): b"\n".join(event(f"{n}-{i}") for i in range(400)) for n in range(3)}
    stored = make_zip(tmp_path / "stored.zip", bodies)
    deflated = tmp_path / "deflated.zip"
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, body in bodies.items():
            archive.writestr(name, gzip.compress(body, mtime=0))
    _, expected = read(stored, workers=workers)
    _, got = read(deflated, workers=workers)
    assert got.drop(["_run_id"]).equals(expected.drop(["_run_id"])) and got.num_rows == 1200


@pytest.mark.parametrize("inflater", ["isal", "stdlib"])
@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_a_truncated_gzip_names_the_member(
    tmp_path: Path, cut: float, inflater: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if inflater == "stdlib":  # where ISA-L is missing
        monkeypatch.setattr(archive_module, "_GzipFile", gzip.GzipFile)
    body = gzip.compress(b"\n".join(event(str(i)) for i in range(500)))
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member(17, 0), gzip.compress(event("ok")))
        archive.writestr(member(17, 1), body[: int(len(body) * cut)])  # the zip CRC is right, the gzip is short
    with pytest.raises(ArchiveError) as caught:
        read(path, workers=1)
    assert caught.value.member == member(17, 1)
    assert "truncated" in str(caught.value)


@pytest.mark.parametrize("inflater", ["isal", "stdlib"])
def test_members_of_several_gzip_streams_and_blocks_inflate_whole(
    tmp_path: Path, inflater: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if inflater == "stdlib":
        monkeypatch.setattr(archive_module, "_GzipFile", gzip.GzipFile)
    monkeypatch.setattr(archive_module, "BLOCK_BYTES", 4096)  # many blocks per member, lines cut across them
    lines = [event(str(i)) for i in range(600)]
    body = gzip.compress(b"\n".join(lines[:250]) + b"\n") + gzip.compress(b"\n".join(lines[250:]))
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member(17, 0), body)
    table = read(path, workers=1)[1]
    assert table.column("uuid").to_pylist() == [str(i) for i in range(600)]


def test_rows_follow_member_order(tmp_path: Path) -> None:
    window = Window(datetime(2025, 7, 1, 2, tzinfo=UTC), datetime(2025, 7, 1, 10, tzinfo=UTC))
    members = {member(10, 0): event("h10"), member(2, 1): event("h2n1"), member(2, 0): event("h2n0"),
               "elsewhere.json.gz": event("odd", server_upload_time="2025-07-01 05:59:59.999999")}
    path = make_zip(tmp_path / "a.zip", members)
    table = read(path, window)[1]
    assert table.column("uuid").to_pylist() == ["h2n0", "h2n1", "h10", "odd"]
    # a member whose name does not parse takes its rows' hour from server_upload_time
    assert table.column("_upload_hour").to_pylist()[3] == datetime(2025, 7, 1, 5, tzinfo=UTC)


def test_hour_records_cover_every_hour_of_the_window(tmp_path: Path) -> None:
    window = Window(datetime(2025, 7, 1, 0, tzinfo=UTC), datetime(2025, 7, 1, 3, tzinfo=UTC))
    path = make_zip(tmp_path / "a.zip", {
        member(1, 0): b"\n".join([
            event("a", event_time="2025-06-30 01:00:00", server_upload_time="2025-07-01 01:10:00"), b"oops"
        ]) + b"\n",
        member(1, 1): event("b", event_time="2025-07-01 01:05:00", server_upload_time="2025-07-01 01:50:00.5"),
        member(3, 0): event("c"),
    })
    reader, table = read(path, window)
    records = reader.hour_records()
    assert [r.hour.hour for r in records] == [0, 1, 2, 3]
    assert [r.status for r in records] == [EMPTY, LOADED, EMPTY, LOADED]
    one = records[1]
    assert [m.name for m in one.members] == [member(1, 0), member(1, 1)]
    assert (one.lines_read, one.rejects, one.events_loaded, one.run_id) == (3, 1, 0, "run-1")
    assert one.bytes == sum(m.size for m in one.members) > 0
    assert one.min_event_time == datetime(2025, 6, 30, 1, tzinfo=UTC)
    assert one.max_event_time == datetime(2025, 7, 1, 1, 5, tzinfo=UTC)
    assert one.min_server_upload_time == datetime(2025, 7, 1, 1, 10, tzinfo=UTC)
    assert one.max_server_upload_time == datetime(2025, 7, 1, 1, 50, 0, 500000, tzinfo=UTC)
    assert one.content_hash and one.content_hash != records[3].content_hash
    # hashed on a thread while the window parsed: the same as hashing the hour's members afterwards
    assert one.content_hash == content_hash(path, [m for m in list_members(path) if m.upload_hour.hour == 1])
    assert records[0].content_hash is None and records[0].members == []


@pytest.mark.parametrize("transport", ["threads", "processes"])
def test_parallel_readers_give_the_same_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transport: str) -> None:
    if transport == "processes":  # the reader picks worker processes when the compiled parser is missing
        monkeypatch.setattr(parse, "FAST_PARSER", None)
    members = {}
    for hour in range(3):
        for n in range(2):
            lines = [event(f"{hour}-{n}-{i}", event_id=i, event_properties={"i": i}) for i in range(300)]
            lines.insert(7, b"not json")
            members[member(hour, n)] = b"\n".join(lines)
    path = make_zip(tmp_path / "a.zip", members)
    window = Window(datetime(2025, 7, 1, 0, tzinfo=UTC), datetime(2025, 7, 1, 2, tzinfo=UTC))
    one, single = read(path, window, workers=1, batch_rows=128, rejects_dir=tmp_path / "r1")
    two, multi = read(path, window, workers=2, batch_rows=128, rejects_dir=tmp_path / "r2")
    assert single.num_rows == 1800 and multi.equals(single)
    assert [r.to_dict() for r in one.hour_records()] == [r.to_dict() for r in two.hour_records()]
    name = f"{window.name}.jsonl"
    assert (tmp_path / "r1" / name).read_text() == (tmp_path / "r2" / name).read_text()


def test_a_worker_reports_a_broken_member(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member(17, 0), gzip.compress(event("ok")))
        archive.writestr(member(17, 1), gzip.compress(event("x"))[:-6])
    with pytest.raises(ArchiveError) as caught:
        read(path, workers=2)
    assert caught.value.member == member(17, 1)


def test_a_worker_process_that_dies_is_an_error_not_a_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # members are dealt round-robin and read back in order: a dead worker must end the wait for its member
    import multiprocessing
    import signal

    monkeypatch.setattr(parse, "FAST_PARSER", None)  # without the compiled parser the reader starts processes
    members = {member(17, n): b"\n".join(event(f"u{n}-{i}") for i in range(200)) for n in range(4)}
    path = make_zip(tmp_path / "a.zip", members)
    reader = WindowReader(path, WINDOW, run_id="run-1", rejects_dir=None, workers=2, batch_rows=5)
    others = set(multiprocessing.active_children())
    batches = reader.batches()
    next(batches)  # both workers now wait on their full queues, members still to parse
    workers = set(multiprocessing.active_children()) - others
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="reader worker died"):
        for _ in batches:
            pass


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize(("block", "batch_rows"), [(64, 1), (1000, 3), (1 << 22, 4096)])
def test_every_line_keeps_its_number_however_blocks_and_batches_fall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compiled: bool, block: int, batch_rows: int
) -> None:
    monkeypatch.setattr(archive_module, "BLOCK_BYTES", block)  # 64 bytes: every line spans several blocks
    if not compiled:
        monkeypatch.setattr(parse, "FAST_PARSER", None)
    lines = [event(f"u{i}", event_id=i) for i in range(60)]
    lines[5], lines[6], lines[20], lines[30] = b"", b"  \r", b"not json", event("x", brand_new_key=1)
    text = b"\n".join(lines)  # no newline after the last line
    path = make_zip(tmp_path / "a.zip", {member(17): text, member(17, 1): text + b"\n\n", member(17, 2): b""})
    reader, table = read(path, batch_rows=batch_rows)
    expected = [
        (name, number, json.loads(line)["uuid"])
        for name in (member(17), member(17, 1))
        for number, line in enumerate(lines, 1)
        if line.strip() and line != b"not json"
    ]
    assert list(zip(table["_member"].to_pylist(), table["_line"].to_pylist(), table["uuid"].to_pylist(),
                    strict=True)) == expected
    assert reader.rejects_total == 2 and reader.lines_total == 2 * 58


def test_a_lone_surrogate_escape_rejects_the_line_with_its_text(tmp_path: Path) -> None:
    bad = b'{"uuid":"s","event_properties":{"x":"\\ud800"}}'
    path = make_zip(tmp_path / "a.zip", {member(17): b"\n".join([event("ok"), bad])})
    reader, table = read(path)
    assert table.column("uuid").to_pylist() == ["ok"] and reader.rejects_total == 1
    reject = json.loads(reader.rejects_path.read_text())
    assert (reject["line"], reject["text"].encode()) == (2, bad)


def test_the_reader_counts_the_lines_the_compiled_parser_did_not_take(tmp_path: Path) -> None:
    from amplitude_export import synthetic

    events = synthetic.generate_hour(HOUR, project_id=7, seed=2, events=3000, variation=0.05)
    lines = synthetic.encode_lines(events)
    lines[100:100] = [b"not json", b'{"uuid":"dup","uuid":"dup2"}']  # one reject, one kept by the msgspec path
    path = make_zip(tmp_path / "a.zip", {member(17): b"\n".join(lines) + b"\n"})
    reader, table = read(path)
    assert reader.lines_total == 3002 and reader.rejects_total == 1 and table.num_rows == 3001
    assert reader.slow_lines == 2  # the other 3000 lines, varied ones included, went the compiled way
    assert table.column("_line").to_pylist() == [n for n in range(1, 3003) if n != 101]
    assert table.column("uuid")[100].as_py() == "dup2"

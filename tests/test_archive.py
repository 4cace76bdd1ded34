"""Archive listing, ordering, CRC verification and per-hour content hashes, on zips built in the test."""

from __future__ import annotations

import gzip
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from amplitude_export.archive import content_hash, list_members, parse_member_name, verify_archive
from amplitude_export.errors import ArchiveError


def make_zip(path: Path, members: dict[str, bytes], *, gz: bool = True) -> Path:
    """A zip shaped like an export: each value gzipped (unless gz=False) and stored under its name."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, body in members.items():
            archive.writestr(name, gzip.compress(body, mtime=0) if gz else body)
    return path


def test_member_names_parse_to_upload_hour_and_index() -> None:
    assert parse_member_name("123/123_2024-03-01_5#2.json.gz") == (datetime(2024, 3, 1, 5, tzinfo=UTC), 2)
    assert parse_member_name("123/123_2024-03-01_17#0.json.gz") == (datetime(2024, 3, 1, 17, tzinfo=UTC), 0)
    assert parse_member_name("odd.json.gz") == (None, 0)
    assert parse_member_name("123/123_2024-02-30_1#0.json.gz") == (None, 0)


def test_members_sort_by_date_hour_index_and_unparsed_last(tmp_path: Path) -> None:
    names = [
        "1/1_2024-03-01_10#0.json.gz",
        "zzz.json.gz",
        "1/1_2024-03-01_2#1.json.gz",
        "1/1_2024-03-01_2#0.json.gz",
        "1/1_2024-02-29_23#0.json.gz",
        "aaa.json.gz",
        "1/1_2024-03-01_2#10.json.gz",
    ]
    path = make_zip(tmp_path / "a.zip", {name: b"{}\n" for name in names})
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("1/", b"")  # a directory entry
        archive.writestr("1/readme.txt", b"not a member")
    got = [m.name for m in list_members(path)]
    assert got == [
        "1/1_2024-02-29_23#0.json.gz",
        "1/1_2024-03-01_2#0.json.gz",
        "1/1_2024-03-01_2#1.json.gz",
        "1/1_2024-03-01_2#10.json.gz",
        "1/1_2024-03-01_10#0.json.gz",
        "aaa.json.gz",
        "zzz.json.gz",
    ]
    first = list_members(path)[0]
    assert first.upload_hour == datetime(2024, 2, 29, 23, tzinfo=UTC) and first.index == 0
    assert first.size > 0 and first.crc == zipfile.ZipFile(path).getinfo(first.name).CRC


def test_not_a_zip_is_an_archive_error(tmp_path: Path) -> None:
    path = tmp_path / "x.zip"
    path.write_bytes(b"<html>rate limited</html>")
    with pytest.raises(ArchiveError):
        list_members(path)
    with pytest.raises(ArchiveError):
        verify_archive(path)


def corrupt_member(path: Path, name: str) -> None:
    """Flip a byte in the middle of a member's stored data (the central directory stays intact)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_archive_names_the_member_with_a_bad_crc(tmp_path: Path) -> None:
    good, bad = "1/1_2024-03-01_0#0.json.gz", "1/1_2024-03-01_1#0.json.gz"
    body = b"".join(b'{"uuid":"%d","event_type":"x"}\n' % i for i in range(2000))
    path = make_zip(tmp_path / "a.zip", {good: body, bad: body})
    assert [m.name for m in verify_archive(path)] == [good, bad]
    corrupt_member(path, bad)
    with pytest.raises(ArchiveError) as caught:
        verify_archive(path)
    assert caught.value.member == bad
    assert bad in str(caught.value)


def test_verify_archive_checks_deflated_members_too(tmp_path: Path) -> None:
    """Stored members are checked on their raw bytes; a member zip-deflated as well goes through zipfile."""
    name = "1/1_2024-03-01_0#0.json.gz"
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, gzip.compress(b"".join(b'{"uuid":"%d"}\n' % i for i in range(5000)), mtime=0))
    assert [m.name for m in verify_archive(path)] == [name]
    corrupt_member(path, name)
    with pytest.raises(ArchiveError) as caught:
        verify_archive(path)
    assert caught.value.member == name


def test_verify_archive_refuses_a_local_header_naming_another_file(tmp_path: Path) -> None:
    first, second = "1/1_2024-03-01_0#0.json.gz", "1/1_2024-03-01_1#0.json.gz"
    path = make_zip(tmp_path / "a.zip", {first: b"{}\n", second: b"{}\n"})
    data = path.read_bytes()
    at = data.index(second.encode())  # the second member's local header name (the directory's copy comes later)
    path.write_bytes(data[:at] + first.encode() + data[at + len(second):])
    with pytest.raises(ArchiveError) as caught:
        verify_archive(path)
    assert caught.value.member == second and "names another file" in str(caught.value)


def test_content_hash_follows_names_and_bytes(tmp_path: Path) -> None:
    a = make_zip(tmp_path / "a.zip", {"1/1_2024-03-01_0#0.json.gz": b"x\n", "1/1_2024-03-01_1#0.json.gz": b"y\n"})
    members = list_members(a)
    first, second = content_hash(a, members[:1]), content_hash(a, members[1:])
    assert first != second and len(first) == 64
    assert content_hash(a, members[:1]) == first  # deterministic
    # the same hour with changed content (a re-export) hashes differently; other hours do not move
    b = make_zip(tmp_path / "b.zip", {"1/1_2024-03-01_0#0.json.gz": b"x2\n", "1/1_2024-03-01_1#0.json.gz": b"y\n"})
    members_b = list_members(b)
    assert content_hash(b, members_b[:1]) != first
    assert content_hash(b, members_b[1:]) == second

"""The fake Export API's zip archives, made from members cached on disk.

An archive holds the project's folder entry, then the window's members, stored (ZIP_STORED: they are gzip
already), all stamped with the window's first hour so the same request gives the same bytes. `stream_zip` makes
those bytes on the fly as they are sent, so a response starts at once and never sits in memory; past 4 GB (or
65 535 entries) it declines and `write_zip` has zipfile write the ZIP64 archive to a file.
"""

from __future__ import annotations

import shutil
import struct
import threading
import zipfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from .archive import LOCAL_HEADER, crc32

CHUNK = 1 << 20  # bytes per read of a member and per write of a response
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # central directory entry, then the name
_END = struct.Struct("<4sHHHHIIH")  # end of central directory record


class MemberSums:
    """Cached members' sizes and CRC-32s, each computed once (members never change under one name)."""

    def __init__(self) -> None:
        self._known: dict[Path, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def size_and_crc(self, path: Path) -> tuple[int, int]:
        with self._lock:
            known = self._known.get(path)
        if known is None:
            crc = 0
            for chunk in file_chunks(path):
                crc = crc32(chunk, crc)
            known = (path.stat().st_size, crc)
            with self._lock:
                self._known[path] = known
        return known


def write_zip(target: Path, project_id: int, start: datetime, members: list[tuple[str, Path]]) -> int:
    """Write the zip of `members` (name in the zip, cached file) to `target`; return an offset inside the first
    member's data (where the `corrupt` fault flips bytes)."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        directory = zipfile.ZipInfo(f"{project_id}/", date_time=_zip_time(start))
        directory.external_attr = 0o40755 << 16 | 0x10
        archive.writestr(directory, b"")  # Amplitude's zips carry the folder entry: readers must skip it
        for name, path in members:
            info = zipfile.ZipInfo(name, date_time=_zip_time(start))
            info.compress_type = zipfile.ZIP_STORED
            info.file_size = path.stat().st_size
            with path.open("rb") as source, archive.open(info, "w") as sink:
                shutil.copyfileobj(source, sink, CHUNK)
    with zipfile.ZipFile(target) as archive:
        infos = [info for info in archive.infolist() if not info.is_dir()]
    if not infos:
        return 0
    with target.open("rb") as handle:
        handle.seek(infos[0].header_offset)
        header = handle.read(30)
    name_length, extra_length = (int(value) for value in struct.unpack("<HH", header[26:30]))
    return infos[0].header_offset + 30 + name_length + extra_length + infos[0].compress_size // 2


def stream_zip(
    project_id: int, start: datetime, members: list[tuple[str, Path, int, int]]
) -> tuple[int, int, Iterator[bytes]] | None:
    """The bytes `write_zip` writes for `members` (name, cached file, size, CRC-32), as (size, an offset inside
    the first member's data, the bytes in chunks); None when the archive needs ZIP64."""
    stamp = _dos_time(_zip_time(start))
    entries: list[tuple[str, Path | None, int, int]] = [(f"{project_id}/", None, 0, 0), *members]
    headers: list[bytes] = []
    central: list[bytes] = []
    offset = corrupt_at = 0
    for name, path, size, crc in entries:
        raw = name.encode()
        flags = 0 if raw.isascii() else 0x800
        headers.append(LOCAL_HEADER.pack(b"PK\x03\x04", 20, flags, 0, *stamp, crc, size, size, len(raw), 0) + raw)
        attributes = 0o40755 << 16 | 0x10 if path is None else 0o600 << 16  # as zipfile writes them
        central.append(_CENTRAL.pack(b"PK\x01\x02", 3 << 8 | 20, 20, flags, 0, *stamp, crc, size, size,
                                     len(raw), 0, 0, 0, 0, attributes, offset) + raw)
        if path is not None and not corrupt_at:
            corrupt_at = offset + len(headers[-1]) + size // 2
        offset += len(headers[-1]) + size
    directory = b"".join(central)
    total = offset + len(directory) + _END.size
    if total >= 0xFFFFFFFF or len(entries) >= 0xFFFF:
        return None
    end_record = _END.pack(b"PK\x05\x06", 0, 0, len(entries), len(entries), len(directory), offset, 0)

    def chunks() -> Iterator[bytes]:
        for header, (_, path, _, _) in zip(headers, entries, strict=True):
            yield header
            if path is not None:
                yield from file_chunks(path)
        yield directory + end_record

    return total, corrupt_at if len(entries) > 1 else 0, chunks()


def file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as source:
        while chunk := source.read(CHUNK):
            yield chunk


def _dos_time(when: tuple[int, int, int, int, int, int]) -> tuple[int, int]:
    """(time, date) as a zip header holds them."""
    year, month, day, hour, minute, second = when
    return hour << 11 | minute << 5 | second // 2, (year - 1980) << 9 | month << 5 | day


def _zip_time(hour: datetime) -> tuple[int, int, int, int, int, int]:
    # a fixed timestamp per window makes the same request give the same bytes
    return (max(hour.year, 1980), hour.month, hour.day, hour.hour, 0, 0)

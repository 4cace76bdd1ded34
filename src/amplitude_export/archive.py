"""The landed export archive: a zip of gzipped NDJSON members, one or more per upload hour.

Members are named `<project_id>/<project_id>_<YYYY-MM-DD>_<H>#<n>.json.gz` (H not zero-padded, n from 0). The
naming is not formally documented, so any `*.json.gz` member is accepted; names that do not parse sort last.
Everything here streams: no member is ever held whole in memory, whatever the archive's size. `member_chunks`
inflates a member in bounded blocks and cuts it into chunks of whole lines for the parser.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

from .errors import ArchiveError

try:  # ISA-L: the same bytes as zlib, inflated and checked several times faster; optional
    from isal.igzip import IGzipFile as _GzipFile
    from isal.isal_zlib import crc32
    from isal.isal_zlib import error as _isal_error

    _INFLATE_ERROR = cast(type[Exception], _isal_error)  # isal's stub declares the class as an instance
except ImportError:  # pragma: no cover - depends on the environment
    _INFLATE_ERROR = zlib.error
    _GzipFile = gzip.GzipFile  # type: ignore[assignment,misc]
    crc32 = zlib.crc32

CHUNK = 1 << 20
BLOCK_BYTES = 1 << 22  # decompressed bytes per inflate call: bounds memory even for a zip bomb
_NAME = re.compile(r"_(\d{4})-(\d{2})-(\d{2})_(\d{1,2})#(\d+)\.json\.gz$")
LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip local file header, before its name and extra field


@dataclass(frozen=True)
class ArchiveMember:
    """One gzipped NDJSON member: its name, the upload hour and index parsed from it, compressed size, CRC-32."""

    name: str
    upload_hour: datetime | None
    index: int
    size: int
    crc: int

    def sort_key(self) -> tuple[int, float, int, str]:
        """(date, hour, n) for names that parse; the rest after them, by name."""
        if self.upload_hour is None:
            return (1, 0.0, 0, self.name)
        return (0, self.upload_hour.timestamp(), self.index, self.name)


def parse_member_name(name: str) -> tuple[datetime | None, int]:
    """The upload hour and index `n` a member's name stands for, or (None, 0) if it does not follow the pattern."""
    match = _NAME.search(name)
    if not match:
        return None, 0
    year, month, day, hour, index = (int(part) for part in match.groups())
    try:
        return datetime(year, month, day, hour, tzinfo=UTC), index
    except ValueError:
        return None, 0


def open_zip(path: Path | str) -> zipfile.ZipFile:
    """The archive, opened by zipfile (its central directory read); an unreadable one is an ArchiveError."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ArchiveError(f"not a readable zip archive: {exc}", path=str(path)) from None


def list_members(path: Path | str) -> list[ArchiveMember]:
    """The archive's `*.json.gz` members in (date, hour, n) order, read from the central directory only."""
    with open_zip(path) as archive:
        infos = archive.infolist()
    members = []
    for info in infos:
        if info.is_dir() or not info.filename.endswith(".json.gz"):
            continue
        hour, index = parse_member_name(info.filename)
        members.append(ArchiveMember(info.filename, hour, index, info.compress_size, info.CRC))
    return sorted(members, key=ArchiveMember.sort_key)


def verify_archive(path: Path | str) -> list[ArchiveMember]:
    """Check the central directory and every member's CRC-32 (streamed); return the members in order.

    Stored members (what exports hold: the gzip inside is the compression) are checked on their raw bytes with
    the fast CRC; any other method goes through zipfile, which inflates them.
    """
    path = Path(path)
    members = list_members(path)
    with landed_members(path) as opener:
        for member in members:
            try:
                with opener(0, member) as stream:
                    while stream.read(CHUNK):
                        pass
            except ArchiveError as exc:
                raise ArchiveError(f"member is broken: {exc.reason}", path=str(path), member=member.name) from None
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
                raise ArchiveError(f"member is broken: {exc}", path=str(path), member=member.name) from None
    return members


def _data_start(fd: int, info: zipfile.ZipInfo) -> int:
    """Where a member's stored bytes begin, after its local header (which must name the same file)."""
    header = os.pread(fd, LOCAL_HEADER.size, info.header_offset)
    if len(header) != LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise ArchiveError("bad local file header", member=info.filename)
    fields = LOCAL_HEADER.unpack(header)
    name = os.pread(fd, fields[9], info.header_offset + LOCAL_HEADER.size)
    if name != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
        raise ArchiveError("the local header names another file", member=info.filename)
    return info.header_offset + LOCAL_HEADER.size + fields[9] + fields[10]


def _raw_chunks(fd: int, info: zipfile.ZipInfo) -> Iterator[bytes]:
    """A member's stored (compressed) bytes, straight from the file: what Amplitude sent, not what it means."""
    at, left = _data_start(fd, info), info.compress_size
    while left > 0:
        chunk = os.pread(fd, min(CHUNK, left), at)
        if not chunk:
            raise ArchiveError("member ends early", member=info.filename)
        at += len(chunk)
        left -= len(chunk)
        yield chunk


class MemberStream:
    """A stored member's bytes read at offsets (`read_at(offset, size)`: a landed file, or one still arriving),
    its CRC-32 checked at the end as zipfile checks it, with the fast CRC and no shared file position."""

    def __init__(self, read_at: Callable[[int, int], bytes], start: int, size: int, crc: int, name: str) -> None:
        self._read_at, self._at, self._end, self._want, self._name = read_at, start, start + size, crc, name
        self._crc = 0

    def read(self, size: int = CHUNK) -> bytes:
        size = min(size, self._end - self._at)
        if size <= 0:
            if self._crc != self._want:
                raise zipfile.BadZipFile(f"Bad CRC-32 for file {self._name!r}")
            return b""
        data = self._read_at(self._at, size)
        if len(data) < size:
            raise EOFError("the archive ends inside this member")
        self._at += size
        self._crc = crc32(data, self._crc)
        return data

    def readinto(self, buffer: Any) -> int:
        """`read` into `buffer`, as a gzip reader asks for its input."""
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def __enter__(self) -> MemberStream:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def open_member(archive: zipfile.ZipFile, fd: int, name: str) -> MemberStream | IO[bytes]:
    """A member's stream: stored members (what exports hold) read straight from `fd`, the archive's file; any
    other method through zipfile, which inflates it."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1 or info.file_size != info.compress_size:
        return archive.open(info)
    return MemberStream(lambda at, size: os.pread(fd, size, at), _data_start(fd, info), info.compress_size,
                        info.CRC, info.filename)


def content_hash(path: Path | str, members: list[ArchiveMember]) -> str:
    """sha256 over the members' names and stored bytes, in the given order (pass one hour's members).

    Amplitude re-exports past hours after integrity checks; comparing this hash with the ledger's tells whether
    an hour's content changed without decompressing anything.
    """
    digest = hashlib.sha256()
    path = Path(path)
    with open_zip(path) as archive, open(path, "rb") as handle:
        for member in members:
            name = member.name.encode()
            digest.update(len(name).to_bytes(4, "big") + name + member.size.to_bytes(8, "big"))
            try:
                info = archive.getinfo(member.name)
            except KeyError:
                raise ArchiveError("member not in archive", path=str(path), member=member.name) from None
            for chunk in _raw_chunks(handle.fileno(), info):
                digest.update(chunk)
    return digest.hexdigest()


Opener = Callable[[int, ArchiveMember], Any]  # (index, member) -> a context manager giving the member's stream


@contextlib.contextmanager
def landed_members(path: Path | str) -> Iterator[Opener]:
    """An opener of a landed archive's members, for as long as the context lasts; stored members are read
    straight from the file, at offsets, so threads can read several members at once."""
    with open_zip(path) as archive, open(path, "rb") as handle:
        yield lambda _, member: open_member(archive, handle.fileno(), member.name)


def _inflated(stream: Any) -> Iterator[bytes]:
    """Decompressed blocks of a gzip stream (several gzip members back to back are allowed), bounded in size.

    Each block is inflated straight into one buffer of `BLOCK_BYTES` (the gzip file's `read`), not grown by
    doubling as `decompressobj` grows its output, which copies each block again onto fresh pages.
    """
    try:
        with _GzipFile(fileobj=stream, mode="rb") as gzip_file:
            while text := gzip_file.read(BLOCK_BYTES):
                yield text
    except EOFError:
        raise ArchiveError("gzip stream is truncated") from None


def member_chunks(opener: Opener, index: int, member: ArchiveMember, chunk_bytes: int) -> Iterator[list[Any]]:
    """The lines of one member, streamed, as chunks of about `chunk_bytes`; zip CRC and gzip are checked.

    A chunk is a list of segments (bytes, or memoryviews into a decompressed block: no copy), each holding whole
    lines separated by newlines. Only a line that spans two blocks is copied, to join its pieces.
    """
    try:
        with opener(index, member) as stream:
            segments: list[Any] = []
            size = 0
            rest = b""  # the unfinished last line of the blocks so far
            for text in _inflated(stream):
                first_newline = text.find(b"\n")
                if first_newline < 0:  # no line ends in this block
                    rest += text
                    continue
                segments.append(rest + text[:first_newline])
                size += len(segments[-1])
                last_newline = text.rfind(b"\n")
                view = memoryview(text)
                at = first_newline + 1
                while at <= last_newline:  # text[at:last_newline] is whole lines (b"" is one blank line)
                    cut = last_newline
                    if size + (last_newline - at) > chunk_bytes:
                        cut = text.find(b"\n", at + max(chunk_bytes - size, 0), last_newline)
                        cut = last_newline if cut < 0 else cut
                    if size >= chunk_bytes:
                        yield segments
                        segments, size = [], 0
                    segments.append(view[at:cut])
                    size += cut - at
                    at = cut + 1
                if size >= chunk_bytes:
                    yield segments
                    segments, size = [], 0
                rest = text[last_newline + 1:]
            if rest:
                segments.append(rest)
            if segments:
                yield segments
    except ArchiveError as exc:
        raise ArchiveError(exc.reason, member=member.name) from None
    except (zipfile.BadZipFile, zlib.error, _INFLATE_ERROR, EOFError, OSError) as exc:
        raise ArchiveError(f"member is broken: {exc}", member=member.name) from None

"""Loading a window while its archive downloads, so that a run's first window does not wait for its whole zip.

The client writes the archive to `<name>.zip.<pid>.part` and tells a `LiveFile` of every chunk; `LiveMembers` walks the
zip's local headers as they arrive, and the reader parses each member once its bytes are there, checking its
CRC-32 as zipfile would. Nothing is committed before the download has finished and the archive has passed the
same checks as any other: the sink's transaction stays open until the reader has compared the members it read
with the central directory (same members, same order). Anything else — a member written with a data descriptor
or compressed by the zip, ZIP64 sizes, a member outside the window, a failed download (then retried), a broken
member — raises `StreamAbandoned`: the sink rolls back, and the window is loaded from the landed archive as usual.
"""

from __future__ import annotations

import os
import threading
import zipfile
from pathlib import Path

from .archive import LOCAL_HEADER, ArchiveMember, MemberStream, parse_member_name

_END_OF_MEMBERS = (b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06")  # central directory, end records


class StreamAbandoned(Exception):
    """The streamed load gave up; the window is to be loaded from the landed archive instead."""


class LiveFile:
    """A download being written: reads wait for bytes that have not arrived yet.

    The client calls `grew` after each chunk it has written (unbuffered, so the bytes are in the page cache), then
    `finished` once the archive is verified and renamed, or `abandoned` if this attempt failed. Reads go through a
    descriptor opened at the start, so they see this attempt's file whatever happens to its name.
    """

    def __init__(self, path: Path, attempt: int) -> None:
        self.path = path
        self.attempt = attempt
        self._fd = os.open(path, os.O_RDONLY)
        self._written = 0
        self._final: Path | None = None
        self._failed = False
        self._changed = threading.Condition()

    def grew(self, size: int) -> None:
        with self._changed:
            self._written += size
            self._changed.notify_all()

    def finished(self, final: Path) -> None:
        with self._changed:
            self._final = final
            self._changed.notify_all()

    def abandoned(self) -> None:
        with self._changed:
            self._failed = True
            self._changed.notify_all()

    def read(self, offset: int, size: int) -> bytes:
        """`size` bytes at `offset`, once written (fewer only at the end of a finished download)."""
        with self._changed:
            while self._written < offset + size and self._final is None and not self._failed:
                self._changed.wait()
            if self._failed:
                raise StreamAbandoned("the download failed")
        return os.pread(self._fd, size, offset)

    def wait_finished(self) -> Path:
        """The landed archive's path, once the download has finished and passed its checks."""
        with self._changed:
            while self._final is None and not self._failed:
                self._changed.wait()
            if self._failed or self._final is None:
                raise StreamAbandoned("the download failed")
            return self._final

    def close(self) -> None:
        os.close(self._fd)


class LiveMembers:
    """The archive's `*.json.gz` members in the order they arrive, found by walking the local headers.

    `get(i)` waits until member `i` (or the central directory) has arrived; any thread may call it.
    """

    def __init__(self, live: LiveFile) -> None:
        self.live = live
        self._members: list[ArchiveMember] = []
        self._starts: list[int] = []  # where each member's data begins
        self._next = 0  # the next local header's offset
        self._done = False
        self._lock = threading.Lock()

    def get(self, index: int) -> ArchiveMember | None:
        """Member `index`, or None if the archive has fewer."""
        with self._lock:
            while len(self._members) <= index and not self._done:
                self._scan_one()
            return self._members[index] if index < len(self._members) else None

    def open(self, index: int, member: ArchiveMember) -> MemberStream:
        return MemberStream(self.live.read, self._starts[index], member.size, member.crc, member.name)

    def _scan_one(self) -> None:
        header = self.live.read(self._next, LOCAL_HEADER.size)
        if header[:4] in _END_OF_MEMBERS:
            self._done = True
            return
        if len(header) < LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise StreamAbandoned(f"no zip entry at byte {self._next}")
        _, _, flags, method, _, _, crc, size, full_size, name_length, extra_length = LOCAL_HEADER.unpack(header)
        if flags & 0x09 or 0xFFFFFFFF in (size, full_size):
            raise StreamAbandoned("entries with data descriptors, encryption or ZIP64 sizes are read once landed")
        raw_name = self.live.read(self._next + LOCAL_HEADER.size, name_length)
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
        start = self._next + LOCAL_HEADER.size + name_length + extra_length
        self._next = start + size
        if name.endswith("/") or not name.endswith(".json.gz"):
            return  # skipped, as list_members skips them
        if method != zipfile.ZIP_STORED:
            raise StreamAbandoned("members compressed by the zip are read once landed")
        hour, index = parse_member_name(name)
        self._members.append(ArchiveMember(name, hour, index, size, crc))
        self._starts.append(start)

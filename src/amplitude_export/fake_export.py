"""What the fake Export API serves: each upload hour's lines, their members cached on disk, and the archives.

Events come from `synthetic.generate_hour`, so the fake knows exactly which events it serves (`expected_uuids`,
`expected_events`) and exactly-once tests can compare a destination with it. Given a `lines_file` instead, it
serves that file's lines as they are, each in the hour of its `server_upload_time`. Re-exported hours
(`set_hour_version`) and the project's scrubbed deletion jobs (`fake_project.FakeProject`) change what an hour
serves.

Each hour's members are built once and cached on disk (a temporary directory unless `cache_dir` is given); a
window's zip is made from them (`fake_archive`). `fake_server.py` answers HTTP with all this.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .fake_archive import MemberSums, stream_zip, write_zip
from .fake_project import FakeProject
from .synthetic import HOUR, encode_lines, generate_hour, hour_uuids, utc_hour

MALFORMED_LINES = (b"{this is not json", b'["an", "array", "not", "an", "event"]')

_PARAM = re.compile(r"^(\d{4})(\d{2})(\d{2})(?:T(\d{2}))?$")


def default_events_per_hour(hour: datetime) -> int:
    """A day shaped like a real project's: about 40 events an hour at night, 200 at the afternoon peak.

    About 2,900 events (5 MB of JSON, under 1 MB zipped) a day, varying a little from day to day.
    """
    shape = (1 - math.cos(2 * math.pi * ((hour.hour - 3) % 24) / 24)) / 2  # 0 at 03:00, 1 at 15:00
    wobble = int(hashlib.blake2b(hour.strftime("%Y%m%d%H").encode(), digest_size=2).hexdigest(), 16) % 21
    return 40 + int(160 * shape) + wobble


def parse_param(text: str, *, is_end: bool) -> datetime:
    """An Export API `start`/`end` value as a UTC hour: `YYYYMMDDTHH`, or `YYYYMMDD` (hour 00; 23 for end)."""
    match = _PARAM.match(text)
    if not match:
        raise ValueError(f"{text!r} is not YYYYMMDDTHH or YYYYMMDD")
    year, month, day, hour = match.groups()
    hour_value = int(hour) if hour is not None else (23 if is_end else 0)
    return datetime(int(year), int(month), int(day), hour_value, tzinfo=UTC)


def member_name(project_id: int, hour: datetime, index: int) -> str:
    """A member's name as Amplitude writes it: `187520/187520_2024-03-01_5#0.json.gz` (hour not padded)."""
    return f"{project_id}/{project_id}_{hour:%Y-%m-%d}_{hour.hour}#{index}.json.gz"


class FakeExport:
    """The fake project's exported data: hours, their lines and members, and the windows' archives.

    `FakeExportServer` takes the same options (and documents them) and serves this over HTTP.
    """

    def __init__(
        self,
        *,
        project_id: int,
        seed: int,
        events_per_hour: int | Callable[[datetime], int],
        lines_file: str | os.PathLike[str] | None,
        data_start: datetime | None,
        data_end: datetime | None,
        empty_hours: Iterable[datetime],
        members_per_hour: int,
        max_events_per_member: int | None,
        max_archive_bytes: int | None,
        malformed_lines: bool,
        cache_dir: str | os.PathLike[str] | None,
        compresslevel: int,
        variation: float,
    ) -> None:
        if not 0 <= variation <= 1:
            raise ValueError(f"variation must be a share between 0 and 1, not {variation!r}")
        self.project_id = project_id
        self.seed = seed
        self.events_per_hour = events_per_hour
        self._corpus = _CorpusFile(Path(lines_file)) if lines_file is not None else None
        self.data_start = utc_hour(data_start) if data_start else None
        self.data_end = utc_hour(data_end) if data_end else None
        self.empty_hours = {utc_hour(hour) for hour in empty_hours}
        self.members_per_hour = max(1, members_per_hour)
        self.max_events_per_member = max_events_per_member
        self.max_archive_bytes = max_archive_bytes
        self.malformed_lines = malformed_lines
        self.compresslevel = compresslevel
        self.variation = variation
        self._versions: dict[datetime, int] = {}
        self._sums = MemberSums()
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._own_cache = cache_dir is None
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._thinned: dict[tuple[datetime, int, str], tuple[int, set[str]]] = {}  # (lines, uuids) of hours
        # deletions thinned, so counting and checking them does not generate them again
        self.project = FakeProject(project_id=project_id, seed=seed, data_start=self.data_start,
                                   data_end=self.data_end, generated=self.generated_lines, lines=self.hour_lines)

    # -- the member cache ------------------------------------------------------------------------------------

    def open_cache(self) -> None:
        """Make the directory members are cached in (a temporary one unless `cache_dir` was given)."""
        if self._cache_dir is None:
            self._cache_dir = Path(tempfile.mkdtemp(prefix="amplitude-fake-"))
        self._cache_dir.mkdir(parents=True, exist_ok=True)

    def close_cache(self) -> None:
        """Remove the cache directory if `open_cache` made it."""
        if self._own_cache and self._cache_dir is not None:
            shutil.rmtree(self._cache_dir, ignore_errors=True)
            self._cache_dir = None

    # -- data ------------------------------------------------------------------------------------------------

    def set_hour_version(self, hour: datetime, version: int) -> None:
        """Simulate Amplitude re-exporting `hour`: from the next request its content differs.

        Version v > 0 changes every event's content and adds v * 2% more events (at least v), keeping the
        earlier events' uuids.
        """
        if self._corpus is not None:
            raise ValueError("a lines_file is served as it is: it has no other versions")
        with self._lock:
            self._versions[utc_hour(hour)] = version

    def hour_version(self, hour: datetime) -> int:
        """The current version of `hour` (0 unless `set_hour_version` changed it)."""
        return self._versions.get(utc_hour(hour), 0)

    def _base_events(self, hour: datetime) -> int:
        """The hour's line count before any re-export."""
        if hour in self.empty_hours:
            return 0
        if (self.data_start and hour < self.data_start) or (self.data_end and hour > self.data_end):
            return 0
        if self._corpus is not None:
            return self._corpus.count(hour)
        base = self.events_per_hour(hour) if callable(self.events_per_hour) else self.events_per_hour
        return max(0, base)

    def _generated_events(self, hour: datetime) -> int:
        """The hour's line count before deletions."""
        base = self._base_events(hour)
        return base + self.hour_version(hour) * max(1, base // 50) if base else 0

    def hour_events(self, hour: datetime) -> int:
        """How many event lines (duplicates included, malformed lines not) the server serves for `hour`."""
        hour = utc_hour(hour)
        count = self._generated_events(hour)
        if not count or not self.project.deleted_in(hour):
            return count
        return self._thinned_hour(hour)[0]

    def _thinned_hour(self, hour: datetime) -> tuple[int, set[str]]:
        key = (hour, self.hour_version(hour), self.project.deletions_key())
        with self._lock:
            known = self._thinned.get(key)
        if known is None:
            lines = self.hour_lines(hour)
            known = (len(lines), {event["uuid"] for event in lines})
            with self._lock:
                self._thinned[key] = known
        return known

    def generated_lines(self, hour: datetime) -> list[dict[str, Any]]:
        """The events generated for `hour`, before deletion jobs removed any."""
        hour = utc_hour(hour)
        if self._corpus is not None:
            import msgspec

            return [msgspec.json.decode(line) for line in self._corpus_lines(hour)]
        return generate_hour(
            hour,
            project_id=self.project_id,
            seed=self.seed,
            events=self._generated_events(hour),
            version=self.hour_version(hour),
            # the version-0 count: a re-export of the previous hour keeps those uuids, so this hour stays
            previous_events=self._base_events(hour - HOUR),
            variation=self.variation,
        )

    def hour_lines(self, hour: datetime) -> list[dict[str, Any]]:
        """The events served for `hour`, in member order (without malformed lines): a scrubbed deletion job's
        users' events are gone from the hours up to the end of the job's day."""
        lines = self.generated_lines(hour)
        deleted = self.project.deleted_in(utc_hour(hour))
        # varied lines carry amplitude_id as a string
        return [event for event in lines if int(event["amplitude_id"]) not in deleted] if deleted else lines

    def forget_counts(self) -> None:
        """Deletions changed: line counts of thinned hours are recomputed on demand."""
        with self._lock:
            self._thinned.clear()

    def has_data(self, start: datetime, end: datetime) -> bool:
        """Whether any upload hour of start..end (inclusive) has events (else the answer is 404)."""
        return any(self.hour_events(hour) for hour in _hours(start, end))

    def expected_uuids(self, start: datetime | str, end: datetime | str) -> set[str]:
        """The distinct uuids served for upload hours start..end (inclusive), as they stand now."""
        uuids: set[str] = set()
        for hour in _hours(start, end):
            if self._corpus is not None:
                uuids |= {event["uuid"] for event in self.hour_lines(hour) if event.get("uuid")}
                continue
            if self.project.deleted_in(hour):
                uuids |= self._thinned_hour(hour)[1]
                continue
            uuids |= hour_uuids(
                hour,
                project_id=self.project_id,
                seed=self.seed,
                events=self.hour_events(hour),
                previous_events=self._base_events(hour - HOUR),
            )
        return uuids

    def expected_events(self, start: datetime | str, end: datetime | str) -> int:
        """How many event lines (duplicates included, malformed lines not) are served for start..end."""
        return sum(self.hour_events(hour) for hour in _hours(start, end))

    def expected_rejects(self, start: datetime | str, end: datetime | str) -> int:
        """How many malformed lines are served for start..end (2 an hour with data, if `malformed_lines`)."""
        if not self.malformed_lines:
            return 0
        return len(MALFORMED_LINES) * sum(1 for hour in _hours(start, end) if self.hour_events(hour))

    # -- members ---------------------------------------------------------------------------------------------

    def _member_counts(self, events: int) -> list[int]:
        members = self.members_per_hour
        if self.max_events_per_member:
            members = max(members, math.ceil(events / self.max_events_per_member))
        members = max(1, min(members, events))
        size, extra = divmod(events, members)
        return [size + (1 if index < extra else 0) for index in range(members)]

    def hour_members(self, hour: datetime) -> list[tuple[str, Path]]:
        """The hour's members as (name in the zip, cached gzip file), built on first use."""
        hour = utc_hour(hour)
        events = self.hour_events(hour)
        if not events:
            return []
        counts = self._member_counts(events)
        key = (
            f"{self.project_id}_{self.seed}_{hour:%Y%m%dT%H}_v{self.hour_version(hour)}_n{events}"
            f"_p{self._base_events(hour - HOUR)}_m{len(counts)}"
            f"_x{int(self.malformed_lines)}_z{self.compresslevel}_r{self.variation:g}"
        )
        if self.project.deleted_in(hour):
            key += f"_d{self.project.deletions_key()}"
        assert self._cache_dir is not None, "the server is not started"
        if self._corpus is not None:
            key += self._corpus.key
        paths = [self._cache_dir / f"{key}#{index}.json.gz" for index in range(len(counts))]
        names = [member_name(self.project_id, hour, index) for index in range(len(counts))]
        with self._build_lock:
            if not all(path.exists() for path in paths):
                self._build_hour(hour, counts, paths)
        return list(zip(names, paths, strict=True))

    def _build_hour(self, hour: datetime, counts: list[int], paths: list[Path]) -> None:
        lines = self._hour_lines_bytes(hour)
        position = 0
        for index, (count, path) in enumerate(zip(counts, paths, strict=True)):
            chunk = lines[position : position + count]
            position += count
            if self.malformed_lines and index == 0:
                chunk.insert(min(1, len(chunk)), MALFORMED_LINES[0])
                chunk.append(MALFORMED_LINES[1])
            body = gzip.compress(b"\n".join(chunk) + b"\n", compresslevel=self.compresslevel, mtime=0)
            partial = path.with_suffix(".tmp")
            partial.write_bytes(body)
            os.replace(partial, path)

    def _hour_lines_bytes(self, hour: datetime) -> list[bytes]:
        """The hour's lines as they are sent, without their line ends."""
        if self._corpus is None:
            return encode_lines(self.hour_lines(hour))
        lines = self._corpus_lines(hour)
        deleted = self.project.deleted_in(hour)
        if deleted:  # the kept lines' own bytes
            import msgspec

            lines = [line for line in lines if int(msgspec.json.decode(line)["amplitude_id"]) not in deleted]
        return lines

    def _corpus_lines(self, hour: datetime) -> list[bytes]:
        """The lines file's lines for `hour`, before deletion jobs removed any."""
        assert self._corpus is not None
        return self._corpus.lines(hour) if self._base_events(hour) else []

    def window_members(self, start: datetime, end: datetime) -> list[tuple[str, Path]]:
        """Every member of the window start..end (inclusive hours), in (hour, n) order."""
        return [member for hour in _hours(start, end) for member in self.hour_members(hour)]

    # -- archives --------------------------------------------------------------------------------------------

    def too_large(self, start: datetime, end: datetime) -> bool:
        """Whether the window's archive would exceed `max_archive_bytes` (Amplitude's 4 GB limit)."""
        if self.max_archive_bytes is None:
            return False
        members = self.window_members(start, end)
        estimate = sum(path.stat().st_size + 2 * len(name) + 150 for name, path in members)
        return estimate > self.max_archive_bytes

    def build_archive(self, start: datetime, end: datetime, target: Path) -> int:
        """Write the window's zip to `target`; return an offset inside the first member's data (`corrupt`)."""
        return write_zip(target, self.project_id, start, self.window_members(start, end))

    def temporary_archive(self, start: datetime, end: datetime) -> tuple[Path, int]:
        """`build_archive` into a new file of the cache directory, which the caller removes: (path, offset)."""
        assert self._cache_dir is not None, "the server is not started"
        handle, name = tempfile.mkstemp(suffix=".zip", dir=self._cache_dir)
        os.close(handle)
        target = Path(name)
        try:
            return target, self.build_archive(start, end, target)
        except BaseException:
            target.unlink(missing_ok=True)
            raise

    def stream_archive(self, start: datetime, end: datetime) -> tuple[int, int, Iterator[bytes]] | None:
        """The window's zip as it is sent: (size, an offset inside the first member's data, the bytes in chunks).

        The bytes are those `build_archive` writes (the folder entry, then the members, stored), made on the fly
        from the cached members and their CRCs, so the answer starts at once instead of after a copy of the
        whole archive. None when the archive needs ZIP64: `build_archive` then.
        """
        members = [(name, path, *self._sums.size_and_crc(path)) for name, path in self.window_members(start, end)]
        return stream_zip(self.project_id, start, members)


def _hours(start: datetime | str, end: datetime | str) -> list[datetime]:
    first = parse_param(start, is_end=False) if isinstance(start, str) else utc_hour(start)
    last = parse_param(end, is_end=True) if isinstance(end, str) else utc_hour(end)
    return [first + HOUR * index for index in range(int((last - first) / HOUR) + 1)]


class _CorpusFile:
    """An NDJSON file's lines by the upload hour of their `server_upload_time` (offsets only: the file may be large)."""

    _UPLOAD_HOUR = re.compile(rb'"server_upload_time"\s*:\s*"(\d{4})-(\d{2})-(\d{2})[ T](\d{2})')

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offsets: dict[datetime, list[int]] = {}
        offset = 0
        with path.open("rb") as source:
            for number, line in enumerate(source, 1):
                if line.strip():
                    match = self._UPLOAD_HOUR.search(line)
                    if match is None:
                        raise ValueError(f"{path}, line {number}: no server_upload_time to place it in an hour")
                    year, month, day, hour = (int(part) for part in match.groups())
                    self._offsets.setdefault(datetime(year, month, day, hour, tzinfo=UTC), []).append(offset)
                offset += len(line)
        stat = path.stat()
        # cached members are named by this: an edited file gets new ones
        self.key = "_c" + hashlib.blake2b(
            f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=6
        ).hexdigest()

    def count(self, hour: datetime) -> int:
        return len(self._offsets.get(hour, ()))

    def lines(self, hour: datetime) -> list[bytes]:
        with self.path.open("rb") as source:
            found = []
            for offset in self._offsets.get(hour, ()):
                source.seek(offset)
                found.append(source.readline().rstrip(b"\r\n"))
            return found

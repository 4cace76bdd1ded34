"""Read one window's archive into typed Arrow batches of exactly `schema.ARROW_SCHEMA`, and its ledger records.

`WindowReader` lists the window's members (or, while the archive downloads, takes them as they arrive), has them
parsed (`workers`: in this thread, on parse threads or in worker processes; `parse`: line to row), and passes the
batches on in member order then line order. Along the way it writes rejected lines to the window's rejects file
and counts what each upload hour held, so that once the batches are exhausted it can give one ledger record per
hour (carrying the requests the window took and the planned window it was split from, as it was told at
construction). `WindowReader.read()` hands a sink both as one `Reading`: the sink consumes the batches, then takes
the records. docs/PARSE_DESIGN.md describes the path and the reasons for each shortcut.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from . import parse
from .archive import ArchiveMember, content_hash, list_members
from .errors import ArchiveError, StorageError
from .ledger import EMPTY, LOADED, HourRecord, MemberInfo
from .live import LiveFile, LiveMembers, StreamAbandoned
from .parse import DEFAULT_BATCH_ROWS, Context, Part
from .threads import in_daemon_thread
from .windows import Window
from .workers import parts_here, parts_in_processes, parts_on_threads

log = logging.getLogger("amplitude_export.reader")

_ENCODE = msgspec.json.encode
_LOGGED_UNKNOWN: set[str] = set()  # unknown keys are logged once per process, not once per line


@dataclass
class _HourStats:
    members: list[ArchiveMember] = field(default_factory=list)
    lines: int = 0
    rejects: int = 0
    min_upload: datetime | None = None
    max_upload: datetime | None = None
    min_event: datetime | None = None
    max_event: datetime | None = None


def _widen(low: datetime | None, high: datetime | None, column: pa.Array) -> tuple[datetime | None, datetime | None]:
    bounds = pc.min_max(column)
    new_low, new_high = bounds["min"].as_py(), bounds["max"].as_py()
    if new_low is not None:
        low = new_low if low is None else min(low, new_low)
        high = new_high if high is None else max(high, new_high)
    return low, high


_Hashes = dict[tuple[ArchiveMember, ...], str]  # an hour's members -> their content_hash


def _hour_hashes(path: Path, members: list[ArchiveMember]) -> _Hashes:
    """Each named hour's `content_hash`. Computed on a thread while the window parses (sha256 releases the GIL),
    so that it does not come after the last batch. Hours whose members turn out otherwise (names that give no
    hour) are hashed when their record is made."""
    by_hour: dict[datetime, list[ArchiveMember]] = {}
    for member in members:
        if member.upload_hour is not None:
            by_hour.setdefault(member.upload_hour, []).append(member)
    return {tuple(group): content_hash(path, group) for group in by_hour.values()}


class WindowReader:
    """Reads one window's archive into `schema.ARROW_SCHEMA` batches and per-hour ledger records.

    `workers > 1` parses members on that many threads (or, without the compiled parser, worker processes);
    `workers <= 1` parses in the thread that reads the batches. `batch_rows` bounds both a batch and the memory
    each worker holds. `live`: read the archive while it downloads (live.py); `path` is then its `.part` file.
    `attempts` (HTTP requests the archive took, with those of the windows it was split from) and `split_from`
    (the planned window it is a part of) go into every hour's record.
    """

    def __init__(
        self,
        path: Path,
        window: Window,
        *,
        run_id: str,
        rejects_dir: Path | None,
        workers: int = 2,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        require_uuid: bool = False,
        project: str = "default",
        live: LiveFile | None = None,
        redact_reject: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
        attempts: int = 1,
        split_from: Window | None = None,
        background: bool = False,
    ) -> None:
        """`redact_reject` rewrites each rejected line's record before it is written, or drops it (None).
        `background`: parse and hash on threads at a lower CPU priority, for a destination whose server shares
        this machine's cores (`threads.lower_priority`)."""
        self.background = background
        self.path = Path(path)
        self.attempts = max(1, attempts)
        self.split_from = str(split_from) if split_from is not None else None
        self.redact_reject = redact_reject
        self.live = live
        self.window = window
        self.run_id = run_id
        self.project = project
        self.rejects_dir = Path(rejects_dir) if rejects_dir is not None else None
        self.workers = workers
        self.batch_rows = max(1, batch_rows)
        self.require_uuid = require_uuid
        self.rejects_total = 0
        self.lines_total = 0
        self.slow_lines = 0  # lines the msgspec path parsed; lines_total - slow_lines: the compiled parser
        self.unknown_fields: set[str] = set()
        self._members: list[ArchiveMember] = []
        self._member_hour: list[datetime] = []
        self._hours: dict[datetime, _HourStats] = {}
        self._finished = False
        self._read_all = False  # every part read: the rejects file is whole
        self._records: list[HourRecord] | None = None
        self._hashes: concurrent.futures.Future[_Hashes] | None = None
        # streamed: the landed archive, its members (central directory) and their hashes, once it has landed
        self._landing: concurrent.futures.Future[tuple[Path, list[ArchiveMember], _Hashes]] | None = None

    def read(
        self, through: Callable[[Iterator[pa.RecordBatch]], Iterable[pa.RecordBatch]] | None = None
    ) -> Reading:
        """The window for a sink: its batches (passed `through` a transformation, e.g. `Privacy.apply`), then
        its records."""
        return Reading(self.batches() if through is None else through(self.batches()), self)

    @property
    def rejects_path(self) -> Path | None:
        """Where this window's rejected lines go (one JSON object per line), if anywhere."""
        return self.rejects_dir / f"{self.window.name}.jsonl" if self.rejects_dir is not None else None

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Typed batches in member order then line order; per-hour stats are complete once this is exhausted."""
        self._hours = {hour: _HourStats() for hour in self.window.each_hour()}
        seen: set[int] = set()
        ctx = Context(
            str(self.path), self.run_id, self.project, self.window.start, self.batch_rows, self.require_uuid
        )
        if self.live is not None:
            self._members, self._member_hour = [], []
            self._landing = in_daemon_thread(self._landed, name="amplitude-export-hash", background=self.background)
            feed = LiveMembers(self.live)
            parts = parts_on_threads(ctx, self._arriving(feed), self.workers, feed, self.background)
        else:
            # an archive may cover more hours than this window (a lookback reloads only the hours that changed)
            self._members = self._in_window(list_members(self.path))
            self._member_hour = [m.upload_hour or self.window.start for m in self._members]
            members, path = self._members, self.path
            self._hashes = in_daemon_thread(lambda: _hour_hashes(path, members), name="amplitude-export-hash",
                                            background=self.background)
            numbered = list(enumerate(self._members))
            if self.workers > 1 and len(numbered) > 1 and parse.FAST_PARSER is not None:
                parts = parts_on_threads(ctx, numbered, self.workers, background=self.background)
            elif self.workers > 1 and len(numbered) > 1:
                parts = parts_in_processes(ctx, numbered, self.workers)
            else:
                parts = parts_here(ctx, numbered)
        rejects_path = self.rejects_path
        if rejects_path is not None:
            rejects_path.unlink(missing_ok=True)  # a rerun replaces the window's rejects
        rejects_file = None
        try:
            for part in parts:
                member = self._members[part.member]
                if part.member not in seen:
                    seen.add(part.member)
                    if member.upload_hour is None and part.batch is not None and part.batch.num_rows:
                        self._member_hour[part.member] = part.batch.column("_upload_hour")[0].as_py()
                    self._stats(part.member).members.append(member)
                self._count(part)
                rejects = part.rejects
                if rejects and self.redact_reject is not None:
                    rejects = [r for r in map(self.redact_reject, rejects) if r is not None]
                if rejects and rejects_path is not None:
                    try:
                        if rejects_file is None:
                            rejects_path.parent.mkdir(parents=True, exist_ok=True)
                            rejects_file = open(rejects_path, "wb")
                        rejects_file.writelines(_ENCODE(reject) + b"\n" for reject in rejects)
                    except OSError as exc:  # a full disk, a file where the directory should be: stop the run
                        raise StorageError.from_os_error(exc, rejects_path) from None
                if part.batch is not None and part.batch.num_rows:
                    yield part.batch
            if self.live is not None:
                self._check_landed()
            self._read_all = True
        except ArchiveError as exc:
            if self.live is None:
                raise
            raise StreamAbandoned(f"a member read while downloading is broken: {exc.reason}") from None
        finally:
            parts.close()  # stops worker processes at once if the consumer gave up early
            if rejects_file is not None:
                self._close_rejects(rejects_file, rejects_path, keep=self._read_all)
        self._finished = True

    @staticmethod
    def _close_rejects(file: Any, path: Path | None, *, keep: bool) -> None:
        """Close the window's rejects file; unless every line was read, remove it: the window's rows roll back,
        and so do its rejects."""
        try:
            file.close()
        except OSError as exc:
            if keep:
                raise StorageError.from_os_error(exc, path) from None
        if not keep and path is not None:
            path.unlink(missing_ok=True)

    def _arriving(self, live: LiveMembers) -> Iterator[tuple[int, ArchiveMember]]:
        """The live archive's members as they arrive, added to the reader's list before their parts are read."""
        index = 0
        while (member := live.get(index)) is not None:
            if not self._covers(member):
                raise StreamAbandoned(f"{member.name} lies outside {self.window}")
            self._members.append(member)
            self._member_hour.append(member.upload_hour or self.window.start)
            yield index, member
            index += 1

    def _covers(self, member: ArchiveMember) -> bool:
        """A member of this window's hours (a lookback's archive may cover more), or one naming no hour."""
        return member.upload_hour is None or self.window.start <= member.upload_hour <= self.window.end

    def _in_window(self, members: list[ArchiveMember]) -> list[ArchiveMember]:
        return [m for m in members if self._covers(m)]

    def _landed(self) -> tuple[Path, list[ArchiveMember], _Hashes]:
        """Once the streamed download has landed: its path, its members as listed, and their hours' hashes."""
        assert self.live is not None
        final = self.live.wait_finished()
        listed = self._in_window(list_members(final))
        return final, listed, _hour_hashes(final, listed)

    def _check_landed(self) -> None:
        """Once streamed: the download landed, and its central directory lists exactly the members read, in
        that order; from here on the reader stands for the landed archive."""
        assert self._landing is not None
        final, listed, hashes = self._landing.result()
        if listed != self._members:
            raise StreamAbandoned("the landed archive lists other members, or in another order, than arrived")
        self.path = final
        self._hashes = concurrent.futures.Future()
        self._hashes.set_result(hashes)

    def _stats(self, member: int) -> _HourStats:
        return self._hours.setdefault(self._member_hour[member], _HourStats())

    def _count(self, part: Part) -> None:
        stats = self._stats(part.member)
        stats.lines += part.lines
        stats.rejects += len(part.rejects)
        self.lines_total += part.lines
        self.slow_lines += part.slow
        self.rejects_total += len(part.rejects)
        for key in sorted(part.unknown - _LOGGED_UNKNOWN):
            _LOGGED_UNKNOWN.add(key)
            log.warning("unknown top-level field %r kept in _extra (first seen in %s)", key,
                        self._members[part.member].name)
        self.unknown_fields |= part.unknown
        if part.batch is not None and part.batch.num_rows:
            stats.min_upload, stats.max_upload = _widen(
                stats.min_upload, stats.max_upload, part.batch.column("server_upload_time"))
            stats.min_event, stats.max_event = _widen(stats.min_event, stats.max_event,
                                                      part.batch.column("event_time"))

    def hour_records(self) -> list[HourRecord]:
        """One ledger record per hour of the window (and any other hour a member named), once batches are read."""
        if not self._finished:
            raise RuntimeError("hour_records() is only valid after batches() is exhausted")
        if self._records is None:
            self._records = [self._record(hour, stats) for hour, stats in sorted(self._hours.items())]
        return self._records

    def _content_hash(self, members: list[ArchiveMember]) -> str:
        ahead = self._hashes.result() if self._hashes is not None else {}
        known = ahead.get(tuple(members))
        return known if known is not None else content_hash(self.path, members)

    def _record(self, hour: datetime, stats: _HourStats) -> HourRecord:
        if not stats.members:
            return HourRecord(hour=hour, status=EMPTY, run_id=self.run_id, attempts=self.attempts,
                              split_from=self.split_from)
        return HourRecord(
            hour=hour,
            status=LOADED,
            members=[MemberInfo(m.name, m.size, m.crc) for m in stats.members],
            content_hash=self._content_hash(stats.members),
            lines_read=stats.lines,
            rejects=stats.rejects,
            bytes=sum(m.size for m in stats.members),
            min_server_upload_time=stats.min_upload,
            max_server_upload_time=stats.max_upload,
            min_event_time=stats.min_event,
            max_event_time=stats.max_event,
            run_id=self.run_id,
            attempts=self.attempts,
            split_from=self.split_from,
        )


@dataclass(frozen=True)
class Reading:
    """One window as the read layer hands it to a sink (`sinks.WindowRead`): its batches, then, once they are
    consumed, one ledger record per hour."""

    batches: Iterable[pa.RecordBatch]
    reader: WindowReader

    def hour_records(self) -> list[HourRecord]:
        """The reader's records; valid once `batches` is exhausted."""
        return self.reader.hour_records()

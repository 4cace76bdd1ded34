"""Stream an export archive into typed Arrow batches of exactly `schema.ARROW_SCHEMA`, losing nothing.

The parse path was chosen by measurement (docs/PARSE_PATH.md). Members are inflated in blocks and cut into
chunks of whole lines without copying them. A chunk goes first to the compiled parser (`_fastparse.c`, built by
`pip install` where a C compiler is at hand), which writes Arrow buffers directly and declines any chunk with a
line that is not the common case. A declined chunk (or every chunk, without the compiled parser) is decoded by
msgspec into a struct typed like the schema, with nested values kept as their raw JSON text; a line that does
not fit that struct (a mistyped value, an unknown key, no uuid, not JSON) takes a slow path that keeps every
original value in `_extra` or rejects the line with its member and line number. With `workers > 1`, members are
dealt round-robin to parse threads (compiled parser: it and ISA-L release the GIL) or else to worker processes
that send Arrow IPC buffers back; either way through small bounded queues, so rows still come out in member
order then line order and memory stays bounded whatever the archive's size.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import gc
import gzip
import importlib.abc
import logging
import multiprocessing
import queue as queue_module
import sys
import threading
import zipfile
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from . import parse, schema
from .archive import ArchiveMember, content_hash, list_members, open_member
from .errors import ArchiveError, StorageError
from .ledger import EMPTY, LOADED, HourRecord, MemberInfo
from .live import LiveFile, LiveMembers, StreamAbandoned
from .parse import DEFAULT_BATCH_ROWS, LINE_BYTES, Context, Part, parse_chunk
from .windows import Window

try:  # ISA-L inflates about 1.5x faster than zlib; optional
    from isal import isal_zlib as _inflate
    from isal.igzip import IGzipFile as _GzipFile
except ImportError:  # pragma: no cover - depends on the environment
    _inflate = zlib  # type: ignore[assignment]
    _GzipFile = gzip.GzipFile  # type: ignore[assignment,misc]

log = logging.getLogger("amplitude_export.reader")

_MAX_OUT = 1 << 22  # decompressed bytes per inflate call: bounds memory even for a zip bomb
_QUEUE_PARTS = 2  # batches a worker may have waiting; bounds memory across processes
_ENCODE = msgspec.json.encode
_LOGGED_UNKNOWN: set[str] = set()  # unknown keys are logged once per process, not once per line


# ---------------------------------------------------------------------------------------------------- members


def _inflated(stream: Any) -> Iterator[bytes]:
    """Decompressed blocks of a gzip stream (several gzip members back to back are allowed), bounded in size.

    Each block is inflated straight into one buffer of `_MAX_OUT` bytes (the gzip file's `read`), not grown from
    16 KB by doubling as `decompressobj` grows its output: that copied each block ~1-2 times over, on fresh pages
    (measured: the reader alone 1.70 -> 1.65 CPU s per day, docs/PARSE_PATH.md).
    """
    try:
        with _GzipFile(fileobj=stream, mode="rb") as gzip_file:
            while text := gzip_file.read(_MAX_OUT):
                yield text
    except EOFError:
        raise ArchiveError("gzip stream is truncated") from None


_Opener = Callable[[int, ArchiveMember], Any]  # (index, member) -> a context manager giving the member's stream


def _member_chunks(opener: _Opener, index: int, member: ArchiveMember, chunk_bytes: int) -> Iterator[list[Any]]:
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
    except (zipfile.BadZipFile, zlib.error, _inflate.error, EOFError, OSError) as exc:
        raise ArchiveError(f"member is broken: {exc}", member=member.name) from None




def _opener(archive: zipfile.ZipFile, handle: Any) -> _Opener:
    """Members of a landed archive (`handle`: its file): stored ones read straight from the file, at offsets."""
    return lambda _, member: open_member(archive, handle.fileno(), member.name)


def _open_archive(path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"not a readable zip archive: {exc}", path=path) from None


def _member_parts(opener: _Opener, ctx: Context, index: int, member: ArchiveMember) -> Iterator[Part]:
    """Parts of one member, at least one (so an empty member is still accounted for)."""
    produced = False
    number = 1
    for segments in _member_chunks(opener, index, member, ctx.batch_rows * LINE_BYTES):
        produced = True
        part, lines = parse_chunk(segments, number, member, index, ctx)
        number += lines
        yield part
    if not produced:
        yield Part(index, None, 0, [], set())


def _read_members(ctx: Context, members: list[tuple[int, ArchiveMember]]) -> Generator[Part, None, None]:
    """Parts of the given members, in order, parsed in this process."""
    with _open_archive(ctx.path) as archive, open(ctx.path, "rb") as handle:
        for index, member in members:
            yield from _member_parts(_opener(archive, handle), ctx, index, member)


class _Stopped(Exception):
    """The consumer gave up: a parse thread stops where it is."""


def _produce(
    ctx: Context, members: Iterable[tuple[int, ArchiveMember]], send: Any, live: LiveMembers | None = None
) -> None:
    """Parse the members dealt to one worker, handing `send` each ("part", part) and then ("end", index).

    Members come from the landed archive, or from `live` as they download. A broken member ends the worker with
    ("error", reason, member), a streamed load given up with ("abandoned", reason, None), anything else with
    ("crash", text, None), so the reader never waits for a worker that has died.
    """
    try:
        with contextlib.ExitStack() as stack:
            opener = live.open if live is not None else _opener(
                stack.enter_context(_open_archive(ctx.path)), stack.enter_context(open(ctx.path, "rb")))
            for index, member in members:
                for part in _member_parts(opener, ctx, index, member):
                    send(("part", part))
                send(("end", index))
    except ArchiveError as exc:
        send(("error", exc.reason, exc.member))
    except StreamAbandoned as exc:
        send(("abandoned", str(exc), None))
    except _Stopped:
        raise
    except BaseException as exc:  # report anything else rather than leave the reader waiting
        send(("crash", f"{type(exc).__name__}: {exc}", None))


def tune_for_bulk_loading() -> None:
    """Process-wide settings that make loading faster; the CLI and the worker processes call this at start.

    - A batch allocates ~100k tracked objects (tuples, lists) and no cycles: default GC passes cost ~3-7% CPU.
    - glibc gives freed blocks over 128 KB-32 MB back to the OS and faults them in again on the next batch:
      ~0.2 page faults per line, each ~4 µs on these VMs (measured: inflating a member 3.7 -> 2.6 µs per line).
      Blocks up to 32 MB now come from the heap, which keeps up to 256 MB freed for reuse.
    - pyarrow's first `pa.array` or `pa.scalar` imports pandas (0.2-0.4 s), only to ask whether the value is a
      pandas object: see `_answer_pyarrows_pandas_probe`.
    """
    gc.set_threshold(100_000, 50, 50)
    _answer_pyarrows_pandas_probe()
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


class _NoPandasYet(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("pandas is imported when a conversion needs it")


def _answer_pyarrows_pandas_probe() -> None:
    """Let pyarrow's first look for pandas find none, where pandas is not imported yet: the loader never hands
    pyarrow a pandas object. pyarrow looks again, and imports pandas, when a conversion to pandas needs it
    (`to_pandas`, so `read_events`); until then it takes a pandas object handed to `pa.array` as a sequence."""
    if "pandas" in sys.modules:
        return
    finder = _NoPandasYet()
    sys.meta_path.insert(0, finder)
    try:
        pa.scalar(0)
    finally:
        sys.meta_path.remove(finder)


def _worker(ctx: Context, members: list[tuple[int, ArchiveMember]], out: Any) -> None:
    """Worker process body: `_produce`, with each part's batch sent as Arrow IPC bytes."""
    tune_for_bulk_loading()

    def send(message: tuple[Any, ...]) -> None:
        if message[0] == "part":
            part = message[1]
            payload = part.batch.serialize().to_pybytes() if part.batch is not None else None
            message = ("part", part.member, payload, part.lines, part.rejects, part.unknown, part.slow)
        out.put(message)

    _produce(ctx, members, send)


def _thread_worker(
    ctx: Context, members: Iterable[tuple[int, ArchiveMember]], out: Any, stop: Any, live: LiveMembers | None
) -> None:
    """Parse thread body: `_produce`, parts handed over as they are; stops when the reader sets `stop`."""

    def send(message: tuple[Any, ...]) -> None:
        while not stop.is_set():
            try:
                out.put(message, timeout=0.2)
                return
            except queue_module.Full:
                pass
        raise _Stopped

    try:
        _produce(ctx, members, send, live)
    except _Stopped:
        pass


def _dealt(live: LiveMembers, first: int, step: int) -> Iterator[tuple[int, ArchiveMember]]:
    """Members first, first + step, ... of a live archive, each once it has arrived."""
    index = first
    while (member := live.get(index)) is not None:
        yield index, member
        index += step


def _receive(source: Any, process: Any, member: ArchiveMember) -> tuple[Any, ...]:
    """The next message from a worker; a worker that died without a word is an error, not a hang."""
    while True:
        try:
            return source.get(timeout=1.0)  # type: ignore[no-any-return]
        except queue_module.Empty:
            if not process.is_alive():
                try:  # it may have sent its last words just before exiting
                    return source.get(timeout=0.5)  # type: ignore[no-any-return]
                except queue_module.Empty:
                    pass
                raise RuntimeError(f"reader worker died (exit code {process.exitcode}) on {member.name}") from None


def _start_method() -> str:
    """forkserver: safe when the parent holds threads (DuckDB's pool) and cheap per worker once preloaded."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


# ---------------------------------------------------------------------------------------------------- reader


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
_T = TypeVar("_T")


def _on_a_thread(work: Callable[[], _T], name: str) -> concurrent.futures.Future[_T]:
    """`work()` on a daemon thread; its result, or what it raised, in the future."""
    future: concurrent.futures.Future[_T] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as exc:  # noqa: BLE001 - raised again where the result is needed
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _hour_hashes(path: Path, members: list[ArchiveMember]) -> _Hashes:
    """Each named hour's `content_hash`. Computed on a thread while the window parses (sha256 releases the GIL):
    ~0.12 s per day that would otherwise come after the last batch. Hours whose members turn out otherwise (names
    that give no hour) are hashed when their record is made."""
    by_hour: dict[datetime, list[ArchiveMember]] = {}
    for member in members:
        if member.upload_hour is not None:
            by_hour.setdefault(member.upload_hour, []).append(member)
    return {tuple(group): content_hash(path, group) for group in by_hour.values()}


class WindowReader:
    """Reads one window's landed archive into `schema.ARROW_SCHEMA` batches and per-hour ledger records.

    `workers > 1` parses members in that many processes (forkserver start method); `workers <= 1` parses in
    this process. `batch_rows` bounds both a batch and the memory each worker holds.
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
    ) -> None:
        self.path = Path(path)
        self.live = live  # read the archive while it downloads (live.py); `path` is then its `.part` file
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
            self._landing = _on_a_thread(self._landed, "amplitude-export-hash")
            feed = LiveMembers(self.live)
            parts = self._threaded(ctx, self._arriving(feed), feed)
        else:
            # an archive may cover more hours than this window (a lookback reloads only the hours that changed)
            self._members = self._in_window(list_members(self.path))
            self._member_hour = [m.upload_hour or self.window.start for m in self._members]
            members, path = self._members, self.path
            self._hashes = _on_a_thread(lambda: _hour_hashes(path, members), "amplitude-export-hash")
            numbered = list(enumerate(self._members))
            if self.workers > 1 and len(numbered) > 1 and parse.FAST_PARSER is not None:
                parts = self._threaded(ctx, numbered)
            elif self.workers > 1 and len(numbered) > 1:
                parts = self._parallel(ctx, numbered)
            else:
                parts = _read_members(ctx, numbered)
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
                if part.rejects and rejects_path is not None:
                    try:
                        if rejects_file is None:
                            rejects_path.parent.mkdir(parents=True, exist_ok=True)
                            rejects_file = open(rejects_path, "wb")
                        rejects_file.writelines(_ENCODE(reject) + b"\n" for reject in part.rejects)
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

    def _in_member_order(
        self,
        numbered: Iterable[tuple[int, ArchiveMember]],
        count: int,
        receive: Callable[[int, ArchiveMember], tuple[Any, ...]],
        unpack: Callable[[tuple[Any, ...]], Part],
    ) -> Iterator[Part]:
        """The parts of every member, in member order: member i comes from worker i % count (`receive(k, member)`
        gives worker k's next message), until its "end"; a worker's "error" or "crash" is raised here."""
        for index, member in numbered:
            while True:
                message = receive(index % count, member)
                if message[0] == "end":
                    break
                if message[0] == "error":
                    raise ArchiveError(message[1], path=str(self.path), member=message[2])
                if message[0] == "crash":
                    raise RuntimeError(f"reader worker failed on {member.name}: {message[1]}")
                if message[0] == "abandoned":
                    raise StreamAbandoned(message[1])
                yield unpack(message)

    def _threaded(
        self, ctx: Context, numbered: Iterable[tuple[int, ArchiveMember]], live: LiveMembers | None = None
    ) -> Generator[Part, None, None]:
        """Deal members round-robin to parse threads and read their parts back in member order.

        Threads, not processes, when the compiled parser is at hand: it and ISA-L's inflate release the GIL, so
        the threads parse on the other core while DuckDB inserts, and no batch is copied through a pipe. A
        `live` archive's members are dealt as they arrive.
        """
        if live is not None:
            count = max(1, self.workers)
            dealt: list[Iterable[tuple[int, ArchiveMember]]] = [_dealt(live, k, count) for k in range(count)]
        else:
            listed = list(numbered)
            count = min(self.workers, len(listed))
            dealt = [listed[k::count] for k in range(count)]
        queues: list[queue_module.Queue[tuple[Any, ...]]] = [
            queue_module.Queue(maxsize=_QUEUE_PARTS) for _ in range(count)
        ]
        stop = threading.Event()
        threads = [
            threading.Thread(target=_thread_worker, args=(ctx, dealt[k], queues[k], stop, live),
                             name=f"amplitude-export-parse-{k}", daemon=True)
            for k in range(count)
        ]
        for thread in threads:
            thread.start()
        try:
            yield from self._in_member_order(numbered, count, lambda k, _: queues[k].get(), lambda message: message[1])
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=5)

    def _parallel(
        self, ctx: Context, numbered: list[tuple[int, ArchiveMember]]
    ) -> Generator[Part, None, None]:
        """Deal members round-robin to worker processes and read their parts back in member order."""
        mp = multiprocessing.get_context(_start_method())
        if mp.get_start_method() == "forkserver":
            mp.set_forkserver_preload(["amplitude_export.reader"])
        count = min(self.workers, len(numbered))
        queues = [mp.Queue(maxsize=_QUEUE_PARTS) for _ in range(count)]
        processes = [
            mp.Process(target=_worker, args=(ctx, numbered[k::count], queues[k]), daemon=True)
            for k in range(count)
        ]
        for process in processes:
            process.start()
        def unpack(message: tuple[Any, ...]) -> Part:
            _, index, payload, lines, rejects, unknown, slow = message
            batch = None
            if payload is not None:
                batch = pa.ipc.read_record_batch(pa.py_buffer(payload), schema.ARROW_SCHEMA)
            return Part(index, batch, lines, rejects, unknown, slow)

        try:
            yield from self._in_member_order(
                numbered, count, lambda k, member: _receive(queues[k], processes[k], member), unpack
            )
        finally:
            for process in processes:
                if process.is_alive():
                    process.terminate()
            for process in processes:
                process.join(timeout=5)
            for q in queues:
                q.close()
                q.cancel_join_thread()

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
            return HourRecord(hour=hour, status=EMPTY, run_id=self.run_id)
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
        )

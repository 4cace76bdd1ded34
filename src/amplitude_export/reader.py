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
import re
import sys
import threading
import zipfile
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import schema
from .archive import ArchiveMember, content_hash, list_members, open_member
from .errors import ArchiveError, StorageError
from .ledger import EMPTY, LOADED, HourRecord, MemberInfo
from .live import LiveFile, LiveMembers, StreamAbandoned
from .windows import Window

try:  # ISA-L inflates about 1.5x faster than zlib; optional
    from isal import isal_zlib as _inflate
    from isal.igzip import IGzipFile as _GzipFile
except ImportError:  # pragma: no cover - depends on the environment
    _inflate = zlib  # type: ignore[assignment]
    _GzipFile = gzip.GzipFile  # type: ignore[assignment,misc]

try:  # the compiled fast path, built by `pip install` where a C compiler is at hand (setup.py); optional
    from . import _fastparse
except ImportError:  # pragma: no cover - depends on the environment
    _fastparse = None  # type: ignore[assignment]

log = logging.getLogger("amplitude_export.reader")

DEFAULT_BATCH_ROWS = 4096  # ~7 MB of NDJSON: per-batch overheads are amortised, worker RSS stays ~180 MB
_LINE_BYTES = 1_700  # a typical export line: batches are cut by bytes, at about batch_rows such lines
REJECT_TEXT_LIMIT = 10_000
_MAX_OUT = 1 << 22  # decompressed bytes per inflate call: bounds memory even for a zip bomb
_QUEUE_PARTS = 2  # batches a worker may have waiting; bounds memory across processes
_INT64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
_EXACT = Annotated[int, msgspec.Meta(ge=-(2**53), le=2**53)]  # integers a double holds exactly
_TS_TYPE = pa.timestamp("us", tz="UTC")
_NAIVE_TS = pa.timestamp("us")
_FAST_TYPES: dict[str, Any] = {
    schema.STRING: str | None,
    schema.INTEGER: _INT64 | None,
    schema.FLOAT: _EXACT | float | None,
    schema.BOOLEAN: bool | None,
    schema.TIMESTAMP: str | None,  # checked column-wise (_timestamps_misfit), cast by Arrow
    schema.JSON: msgspec.Raw,  # the original text, untouched; JSON null arrives as Raw(b"null")
}
_COLUMNS = schema.EXPORT_COLUMNS
_BY_SOURCE = {column.source: column for column in _COLUMNS}
# The fast path: a line decodes straight into this struct or falls to the slow path (unknown keys included).
_Event = msgspec.defstruct(
    "_Event",
    [(c.name, _FAST_TYPES[c.kind], msgspec.field(default=None, name=c.source)) for c in _COLUMNS],
    forbid_unknown_fields=True,
    gc=False,
)
_FIELD_ORDER = _Event.__struct_fields__
_FAST = msgspec.json.Decoder(_Event)
_RAW = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ENCODE = msgspec.json.encode
_LOGGED_UNKNOWN: set[str] = set()  # unknown keys are logged once per process, not once per line
# Decodes a chunk of lines straight into Arrow buffers, `_extra` included, giving back only the lines it cannot
# decode as a whole for the msgspec path. Tests set it to None to check the msgspec path alone.
FAST_PARSER = (
    _fastparse.Parser(
        tuple(c.source.encode() for c in _COLUMNS), "".join(schema.COMPILED_KINDS[c.kind] for c in _COLUMNS)
    )
    if _fastparse is not None else None
)


@dataclass
class _Part:
    """What parsing some lines of one member gives: a batch (None if every line was blank or rejected) and counts."""

    member: int  # index into the reader's member list
    batch: pa.RecordBatch | None
    lines: int  # non-blank lines
    rejects: list[dict[str, Any]]
    unknown: set[str]
    slow: int = 0  # of those lines, how many the msgspec path parsed (the rest: the compiled parser)


@dataclass(frozen=True)
class _Context:
    """What a parser needs besides the lines; small and picklable so worker processes get their own copy."""

    path: str
    run_id: str
    project: str
    window_start: datetime
    batch_rows: int
    require_uuid: bool


# ---------------------------------------------------------------------------------------------------- values


# A timestamp column holds `YYYY-MM-DD HH:MM:SS[.f]` (or with `T`), up to 6 digits of fraction, years 1-9999, a
# real date and time; any other text goes to `_extra`. The compiled parser's parse_time applies the same rule.
_TIMESTAMP = r"[0-9]{4}-[0-9]{2}-[0-9]{2}[ T][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?"
_TIMESTAMP_MATCH = re.compile(_TIMESTAMP).fullmatch
_FIRST_DAY_US = -62135596800 * 10**6  # 0001-01-01 00:00:00 in microseconds since the epoch


def _is_timestamp(text: str) -> bool:
    if not _TIMESTAMP_MATCH(text):
        return False
    try:
        datetime(int(text[:4]), int(text[5:7]), int(text[8:10]), int(text[11:13]), int(text[14:16]),
                 int(text[17:19]))
    except ValueError:
        return False
    return True


def _fit(kind: str, value: Any) -> tuple[bool, Any]:
    """Whether a decoded value fits a column kind, and the value to store (integral floats become ints).

    A float column takes any finite number, but an integer only if a double holds it exactly (|i| <= 2**53);
    an integer column takes an integer in int64, or a float whose value is one (1.0, 1e3).
    """
    if value is None:
        return True, None
    if kind == schema.STRING:
        return isinstance(value, str), value
    if kind == schema.TIMESTAMP:
        return isinstance(value, str) and _is_timestamp(value), value
    if kind == schema.INTEGER:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
        return ok, value
    if kind == schema.FLOAT:
        ok = isinstance(value, float) or (
            isinstance(value, int) and not isinstance(value, bool) and abs(value) <= 2**53)
        return ok, float(value) if ok else value
    if kind == schema.BOOLEAN:
        return isinstance(value, bool), value
    return True, value


class _Undecodable:
    """A value msgspec will not turn into a Python value (1e400, a lone surrogate): it fits no column."""


def _value(raw: msgspec.Raw) -> Any:
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return _Undecodable()


def _slow(line: bytes, unknown: set[str], require_uuid: bool) -> tuple[Any, dict[str, Any] | None] | str:
    """Decode a line that did not fit the fast struct: the event and its `_extra`, or the reason to reject it."""
    try:
        raw = _RAW.decode(line)
    except msgspec.ValidationError:
        return "not a JSON object"
    except msgspec.DecodeError as exc:
        return f"invalid JSON: {exc}"
    except RecursionError:
        return "JSON nested too deeply"
    if require_uuid and not isinstance(_value(raw.get("uuid", msgspec.Raw(b"null"))), str):
        return "no string uuid"
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in raw.items():
        column = _BY_SOURCE.get(key)
        if column is None:
            extra[key] = value
            unknown.add(key)
        elif column.kind == schema.JSON:
            values[column.name] = value
        else:
            ok, converted = _fit(column.kind, _value(value))
            if ok:
                values[column.name] = converted
            else:
                extra[key] = value
    return _Event(**values), extra or None


def _json_column(values: Sequence[Any]) -> pa.Array:
    """Raw JSON texts as a string column; JSON null and absent keys are NULL.

    The texts are joined into one buffer and wrapped as Arrow string data without a copy per value or a UTF-8
    check: `_parse` only keeps lines that are valid UTF-8, and a Raw is a slice of its line that starts and ends
    on an ASCII JSON token, so it is valid UTF-8 too. Offsets and nulls are computed with numpy: a valid JSON
    text of 4 bytes that starts with `n` can only be `null`.
    """
    texts = [b"" if raw is None else raw for raw in values]  # a Raw is never empty: b"" marks an absent key
    data = b"".join(texts)
    if len(data) >= 2**31:  # int32 offsets would overflow: take the slow road
        out = [None if raw is None or (text := bytes(raw)) == b"null" else text for raw in values]
        return pa.array(out, pa.binary()).cast(pa.string())
    lengths = np.fromiter(map(len, texts), np.int32, count=len(texts))
    offsets = np.zeros(len(texts) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    first = np.frombuffer(data, np.uint8)[np.minimum(offsets[:-1], max(len(data) - 1, 0))] if data else lengths
    missing = (lengths == 0) | ((lengths == 4) & (first == ord("n")))
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    if missing.any():
        buffers[0] = pa.py_buffer(np.packbits(~missing, bitorder="little"))
    return pa.Array.from_buffers(pa.string(), len(texts), buffers)


def _timestamps_misfit(events: list[Any]) -> set[int]:
    """The events with a timestamp text that is not one (`_is_timestamp`), found column by column with Arrow."""
    misfit: set[int] = set()
    for column in _COLUMNS:
        if column.kind != schema.TIMESTAMP:
            continue
        texts = pa.array([getattr(event, column.name) for event in events], pa.string())
        good = pc.match_substring_regex(texts, "^" + _TIMESTAMP + "$")
        if pc.all(good).as_py() is not False:
            try:  # the calendar (no 31 April, no 24:00) and years 1-9999
                cast = texts.cast(_NAIVE_TS)
                if pc.all(pc.greater_equal(cast.cast(pa.int64()), _FIRST_DAY_US)).as_py() is not False:
                    continue
            except pa.ArrowInvalid:
                pass
        misfit.update(row for row, text in enumerate(texts.to_pylist()) if text is not None and not _is_timestamp(text))
    return misfit


def _timestamp_column(values: list[Any]) -> pa.Array:
    """`YYYY-MM-DD HH:MM:SS[.ffffff]` texts (UTC, already checked) as timestamps."""
    # the export's times are UTC without a zone: label them, do not shift them
    return pa.array(values, pa.string()).cast(_NAIVE_TS).cast(_TS_TYPE)


def _is_utf8(data: bytes) -> bool:
    """Whether `data` is valid UTF-8: one vectorised Arrow check, without copying the bytes."""
    if not data:
        return True
    offsets = pa.array([0, len(data)], pa.int64()).buffers()[1]
    try:  # validate() checks in place at ~8 GB/s; a cast to string would copy, at ~0.5 GB/s
        pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(data)]).validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _line_is_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _invalid_utf8(lines: list[bytes]) -> set[int]:
    """Lines that are not UTF-8: msgspec lets them through inside nested values, a text column cannot hold them."""
    return {index for index, line in enumerate(lines) if not _line_is_utf8(line)}


def _parse(
    lines: list[bytes],
    first: int,
    member: ArchiveMember,
    index: int,
    ctx: _Context,
    utf8: bool = False,
    numbers: Sequence[int] | None = None,
) -> _Part:
    """Turn some lines of one member (line `first` onwards, or lines `numbers`) into a typed batch, rejects and
    counts.

    `utf8` says the lines are known to be valid UTF-8 (checked as decompressed blocks); else each is checked.
    A line decodes straight into the typed struct, or else (an unknown key, a value of another type, not JSON)
    through `_slow`; a struct whose timestamp texts are not all timestamps is decoded again through `_slow`.
    """
    if numbers is None:
        numbers = range(first, first + len(lines))
    events: list[Any] = []
    kept: list[int] = []  # the line (index into `lines`) of each event
    extras: dict[int, dict[str, Any]] = {}
    rejects: list[dict[str, Any]] = []
    unknown: set[str] = set()
    decode = _FAST.decode
    require_uuid = ctx.require_uuid
    fitted = False  # every line decoded straight into the struct
    if utf8:  # the common case: every line fits the struct, decoded without a Python loop of our own
        try:
            events = list(map(decode, lines))
            fitted = not (require_uuid and any(event.uuid is None for event in events))
        except (msgspec.DecodeError, RecursionError):
            pass
        if not fitted:
            events = []
    if fitted:
        kept = list(range(len(lines)))
    else:
        invalid = set() if utf8 else _invalid_utf8(lines)
        for at, line in enumerate(lines):
            if invalid and at in invalid:
                text = line[:REJECT_TEXT_LIMIT].decode("utf-8", errors="replace")
                rejects.append({"member": member.name, "line": numbers[at], "error": "invalid UTF-8", "text": text})
                continue
            try:
                event = decode(line)
                if require_uuid and event.uuid is None:
                    raise msgspec.ValidationError("no uuid")
                events.append(event)
            except (msgspec.DecodeError, RecursionError):
                if not line.strip():
                    continue
                result = _slow(line, unknown, require_uuid)
                if isinstance(result, str):
                    text = line[:REJECT_TEXT_LIMIT].decode("utf-8", errors="replace")
                    rejects.append({"member": member.name, "line": numbers[at], "error": result, "text": text})
                    continue
                event, extra = result
                if extra:
                    extras[len(events)] = extra
                events.append(event)
            kept.append(at)
    if events:
        for row in _timestamps_misfit(events):  # only struct-decoded rows: `_slow` checked its own
            result = _slow(lines[kept[row]], unknown, require_uuid)
            assert not isinstance(result, str)  # it decoded into the struct
            events[row], extra = result
            if extra:
                extras[row] = extra
    rows_numbers = numbers if fitted else [numbers[at] for at in kept]
    part = _columns(events, rows_numbers, extras, rejects, unknown, member, index, ctx)
    part.slow = part.lines
    return part


def _columns(
    events: list[Any],
    numbers: Sequence[int],
    extras: dict[int, dict[str, Any]],
    rejects: list[dict[str, Any]],
    unknown: set[str],
    member: ArchiveMember,
    index: int,
    ctx: _Context,
) -> _Part:
    """The part for decoded `events` (from lines `numbers` of `member`): their columns as one typed batch."""
    nonblank = len(numbers) + len(rejects)
    if not events:
        return _Part(index, None, nonblank, rejects, unknown)
    columns = dict(zip(_FIELD_ORDER, zip(*map(msgspec.structs.astuple, events), strict=True), strict=True))
    arrays: list[pa.Array] = []
    for column in _COLUMNS:
        values = list(columns[column.name])
        if column.kind == schema.JSON:
            arrays.append(_json_column(values))
        elif column.kind == schema.TIMESTAMP:
            arrays.append(_timestamp_column(values))
        else:
            arrays.append(pa.array(values, schema.ARROW_TYPES[column.kind]))
    extra_texts = [None] * len(events)
    for row, extra in extras.items():
        extra_texts[row] = _ENCODE(extra).decode()
    batch = _batch(arrays, pa.array(extra_texts, pa.string()), pa.array(numbers, pa.int64()), member, ctx)
    return _Part(index, batch, nonblank, rejects, unknown)


def _buffer_part(
    buffers: tuple[tuple[int, bytes | None, bytes, bytes | None], ...],
    first: int,
    rows: int,
    lines: Any,
    member: ArchiveMember,
    index: int,
    ctx: _Context,
) -> _Part:
    """The part for lines the compiled parser decoded: its buffers wrapped as Arrow arrays, without a copy.

    `lines`: each row's line index in the chunk (a buffer of int64), or None when row i is line i.
    """
    arrays = []
    for kind, (nulls, validity, values, data) in zip(_COMPILED_KINDS, buffers, strict=True):
        wrapped = [None if validity is None else pa.py_buffer(validity), pa.py_buffer(values)]
        if data is not None:
            wrapped.append(pa.py_buffer(data))
        arrays.append(pa.Array.from_buffers(schema.ARROW_TYPES[kind], rows, wrapped, null_count=nulls))
    if lines is None:
        line_numbers = np.arange(first, first + rows, dtype=np.int64)
    else:
        line_numbers = np.frombuffer(lines, np.int64, count=rows) + first
    numbers = pa.Array.from_buffers(pa.int64(), rows, [None, pa.py_buffer(line_numbers)])
    extra = arrays.pop()
    unknown: set[str] = set()
    if extra.null_count < rows:  # the keys of `_extra` the schema does not know (the rest are misfit values)
        for text in extra.drop_null().to_pylist():
            unknown.update(key for key in _RAW.decode(text) if key not in schema.KNOWN_SOURCES)
    batch = _batch(arrays, extra, numbers, member, ctx) if rows else None
    return _Part(index, batch, rows, [], unknown)


_COMPILED_KINDS = [column.kind for column in _COLUMNS] + [schema.JSON]  # the compiled parser's columns, `_extra`


def _batch(
    arrays: list[pa.Array], extra: pa.Array, numbers: pa.Array, member: ArchiveMember, ctx: _Context
) -> pa.RecordBatch:
    """The export's columns plus `_extra`, the line numbers and the other provenance columns, as one batch."""
    rows = len(numbers)
    if member.upload_hour is not None:
        hours = pa.repeat(pa.scalar(member.upload_hour, _TS_TYPE), rows)
    else:
        uploaded = arrays[_SERVER_UPLOAD]
        hours = pc.floor_temporal(uploaded, unit="hour").fill_null(pa.scalar(ctx.window_start, _TS_TYPE))
    arrays = arrays + [
        extra,
        hours,
        pa.repeat(pa.scalar(member.name, pa.string()), rows),
        numbers,
        pa.repeat(pa.scalar(ctx.run_id, pa.string()), rows),
        pa.repeat(pa.scalar(ctx.project, pa.string()), rows),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=schema.ARROW_SCHEMA)


_SERVER_UPLOAD = [c.name for c in _COLUMNS].index("server_upload_time")


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


def _parse_chunk(
    segments: list[Any], first: int, member: ArchiveMember, index: int, ctx: _Context
) -> tuple[_Part, int]:
    """The part for one chunk (line `first` onwards) and its number of lines, blank ones included.

    The compiled parser takes every line it can decode as a whole; the few it gives back (not JSON, say) are
    parsed by the msgspec path, and their rows (if any) put back in line order.
    """
    if FAST_PARSER is not None:
        buffers, rows, row_lines, count, slow = FAST_PARSER.parse(segments, ctx.require_uuid)
        part = _buffer_part(buffers, first, rows, row_lines, member, index, ctx)
        if slow:
            other = _parse([line for _, line in slow], first, member, index, ctx,
                           numbers=[first + at for at, _ in slow])
            part = _merged(part, other)
        return part, count
    data = b"\n".join(segments)  # segments end at line ends
    lines = data.split(b"\n")
    return _parse(lines, first, member, index, ctx, _is_utf8(data)), len(lines)


def _merged(fast: _Part, slow: _Part) -> _Part:
    """One part of the compiled parser's rows and the msgspec path's, in line order."""
    batch = fast.batch if slow.batch is None else slow.batch
    if fast.batch is not None and slow.batch is not None:
        table = pa.Table.from_batches([fast.batch, slow.batch])
        order = np.argsort(table.column("_line").to_numpy(), kind="stable")
        batch = table.take(order).combine_chunks().to_batches()[0]
    return _Part(fast.member, batch, fast.lines + slow.lines, slow.rejects, fast.unknown | slow.unknown, slow.lines)


def _opener(archive: zipfile.ZipFile, handle: Any) -> _Opener:
    """Members of a landed archive (`handle`: its file): stored ones read straight from the file, at offsets."""
    return lambda _, member: open_member(archive, handle.fileno(), member.name)


def _open_archive(path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"not a readable zip archive: {exc}", path=path) from None


def _member_parts(opener: _Opener, ctx: _Context, index: int, member: ArchiveMember) -> Iterator[_Part]:
    """Parts of one member, at least one (so an empty member is still accounted for)."""
    produced = False
    number = 1
    for segments in _member_chunks(opener, index, member, ctx.batch_rows * _LINE_BYTES):
        produced = True
        part, lines = _parse_chunk(segments, number, member, index, ctx)
        number += lines
        yield part
    if not produced:
        yield _Part(index, None, 0, [], set())


def _read_members(ctx: _Context, members: list[tuple[int, ArchiveMember]]) -> Generator[_Part, None, None]:
    """Parts of the given members, in order, parsed in this process."""
    with _open_archive(ctx.path) as archive, open(ctx.path, "rb") as handle:
        for index, member in members:
            yield from _member_parts(_opener(archive, handle), ctx, index, member)


class _Stopped(Exception):
    """The consumer gave up: a parse thread stops where it is."""


def _produce(
    ctx: _Context, members: Iterable[tuple[int, ArchiveMember]], send: Any, live: LiveMembers | None = None
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


def _worker(ctx: _Context, members: list[tuple[int, ArchiveMember]], out: Any) -> None:
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
    ctx: _Context, members: Iterable[tuple[int, ArchiveMember]], out: Any, stop: Any, live: LiveMembers | None
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
        ctx = _Context(
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
            if self.workers > 1 and len(numbered) > 1 and FAST_PARSER is not None:
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

    def _count(self, part: _Part) -> None:
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
        unpack: Callable[[tuple[Any, ...]], _Part],
    ) -> Iterator[_Part]:
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
        self, ctx: _Context, numbered: Iterable[tuple[int, ArchiveMember]], live: LiveMembers | None = None
    ) -> Generator[_Part, None, None]:
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
        self, ctx: _Context, numbered: list[tuple[int, ArchiveMember]]
    ) -> Generator[_Part, None, None]:
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
        def unpack(message: tuple[Any, ...]) -> _Part:
            _, index, payload, lines, rejects, unknown, slow = message
            batch = None
            if payload is not None:
                batch = pa.ipc.read_record_batch(pa.py_buffer(payload), schema.ARROW_SCHEMA)
            return _Part(index, batch, lines, rejects, unknown, slow)

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

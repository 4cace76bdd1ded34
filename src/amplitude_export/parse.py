"""Parse export lines into typed Arrow batches of exactly `schema.ARROW_SCHEMA`, losing nothing.

`parse_chunk` is the seam: a chunk of whole lines of one member becomes one `Part` (a batch, its rejects and
counts). The compiled parser (`_fastparse.c`, built by `pip install` where a C compiler is at hand) takes the
chunk first and writes Arrow buffers directly; a value that does not fit its column, and a key the schema does
not know, go verbatim to `_extra`. It hands back only the lines it cannot take as a whole (invalid UTF-8 or JSON,
say). Those lines, or every line without the compiled parser, are decoded by msgspec into a struct typed like
the schema, nested values kept as their raw JSON text; a line that does not fit that struct takes a slow path
that keeps every original value (`_extra` again) or rejects the line with its member and line number. Both
paths give the same rows (tests/test_fastparse.py). docs/PARSE_DESIGN.md gives the reasons, and the safety
argument of each shortcut.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import schema
from .archive import ArchiveMember

try:  # the compiled fast path, built by `pip install` where a C compiler is at hand (setup.py); optional
    from . import _fastparse
except ImportError:  # pragma: no cover - depends on the environment
    _fastparse = None

DEFAULT_BATCH_ROWS = 4096  # per-batch overheads are amortised while each worker's memory stays small
LINE_BYTES = 1_700  # a typical export line: batches are cut by bytes, at about batch_rows such lines
REJECT_TEXT_LIMIT = 10_000
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
COLUMNS = schema.EXPORT_COLUMNS
_BY_SOURCE = {column.source: column for column in COLUMNS}
# The fast path: a line decodes straight into this struct or falls to the slow path (unknown keys included).
_Event = msgspec.defstruct(
    "_Event",
    [(c.name, _FAST_TYPES[c.kind], msgspec.field(default=None, name=c.source)) for c in COLUMNS],
    forbid_unknown_fields=True,
    gc=False,
)
_FIELD_ORDER = _Event.__struct_fields__
EVENT_DECODER = msgspec.json.Decoder(_Event)  # a line into the typed struct; the benchmarks time it
_RAW = msgspec.json.Decoder(dict[str, msgspec.Raw])
# Decodes a chunk of lines straight into Arrow buffers, `_extra` included, giving back only the lines it cannot
# decode as a whole for the msgspec path. None where it was not built; tests set it to None to read as there.
FAST_PARSER = (
    _fastparse.Parser(
        tuple(c.source.encode() for c in COLUMNS), "".join(schema.COMPILED_KINDS[c.kind] for c in COLUMNS)
    )
    if _fastparse is not None else None
)


@dataclass
class Part:
    """What parsing some lines of one member gives: a batch (None if every line was blank or rejected) and counts."""

    member: int  # index into the reader's member list
    batch: pa.RecordBatch | None
    lines: int  # non-blank lines
    rejects: list[dict[str, Any]]
    unknown: set[str]
    slow: int = 0  # of those lines, how many the msgspec path parsed (the rest: the compiled parser)


@dataclass(frozen=True)
class Context:
    """What a parser needs besides the lines; small and picklable so worker processes get their own copy."""

    path: str
    run_id: str
    project: str
    window_start: datetime
    batch_rows: int
    require_uuid: bool


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
    for column in COLUMNS:
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
    try:  # validate() checks in place; a cast to string would copy the bytes first
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
    ctx: Context,
    utf8: bool = False,
    numbers: Sequence[int] | None = None,
) -> Part:
    """Turn some lines of one member (line `first` onwards, or lines `numbers`) into a typed batch, rejects and
    counts.

    `utf8` says the lines are known to be valid UTF-8 (checked as one joined chunk); else each is checked.
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
    decode: Callable[[bytes], Any] = EVENT_DECODER.decode  # the struct's fields are made at run time
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
    ctx: Context,
) -> Part:
    """The part for decoded `events` (from lines `numbers` of `member`): their columns as one typed batch."""
    nonblank = len(numbers) + len(rejects)
    if not events:
        return Part(index, None, nonblank, rejects, unknown)
    columns = dict(zip(_FIELD_ORDER, zip(*map(msgspec.structs.astuple, events), strict=True), strict=True))
    arrays: list[pa.Array] = []
    for column in COLUMNS:
        values = list(columns[column.name])
        if column.kind == schema.JSON:
            arrays.append(_json_column(values))
        elif column.kind == schema.TIMESTAMP:
            arrays.append(_timestamp_column(values))
        else:
            arrays.append(pa.array(values, schema.ARROW_TYPES[column.kind]))
    extra_texts: list[str | None] = [None] * len(events)
    for row, extra in extras.items():
        extra_texts[row] = msgspec.json.encode(extra).decode()
    batch = _batch(arrays, pa.array(extra_texts, pa.string()), pa.array(numbers, pa.int64()), member, ctx)
    return Part(index, batch, nonblank, rejects, unknown)


def _buffer_part(
    buffers: tuple[tuple[int, bytes | None, bytes, bytes | None], ...],
    first: int,
    rows: int,
    lines: Any,
    member: ArchiveMember,
    index: int,
    ctx: Context,
) -> Part:
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
    return Part(index, batch, rows, [], unknown)


_COMPILED_KINDS = [column.kind for column in COLUMNS] + [schema.JSON]  # the compiled parser's columns, `_extra`


def _batch(
    arrays: list[pa.Array], extra: pa.Array, numbers: pa.Array, member: ArchiveMember, ctx: Context
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


_SERVER_UPLOAD = [c.name for c in COLUMNS].index("server_upload_time")


def parse_chunk(
    segments: Sequence[Any], first: int, member: ArchiveMember, index: int, ctx: Context, *, compiled: bool = True
) -> tuple[Part, int]:
    """The part for one chunk of `member` (member `index` of the reader's list) and its number of lines, blank
    ones included.

    `segments`: bytes or memoryviews, each whole lines separated by newlines, together the chunk's lines in order;
    the first is line number `first`. The compiled parser takes every line it can decode as a whole; the few it
    gives back (not JSON, say) are parsed by the msgspec path, and their rows (if any) put back in line order.
    `compiled=False` parses with the msgspec path alone, as where the compiled parser was not built.
    """
    if compiled and FAST_PARSER is not None:
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


def _merged(fast: Part, slow: Part) -> Part:
    """One part of the compiled parser's rows and the msgspec path's, in line order."""
    batch = fast.batch if slow.batch is None else slow.batch
    if fast.batch is not None and slow.batch is not None:
        table = pa.Table.from_batches([fast.batch, slow.batch])
        order = np.argsort(table.column("_line").to_numpy(), kind="stable")
        batch = table.take(order).combine_chunks().to_batches()[0]
    return Part(fast.member, batch, fast.lines + slow.lines, slow.rejects, fast.unknown | slow.unknown, slow.lines)

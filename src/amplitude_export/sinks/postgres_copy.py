"""Rows as PostgreSQL's binary COPY format: what the PostgreSQL sink sends for a window.

JSON columns are `json` in tables this version makes and `jsonb` in older ones (or one a user made): each has its
own binary form, so the encoder is told which columns are `jsonb`. jsonb refuses `\\u0000` and lone UTF-16
surrogate escapes, `->>` on a `json` value refuses them too, and text refuses the NUL character. Rather than lose
such a row, the encoder stores the offending escape or character as literal text (`\\u0000`), which is documented.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..schema import ALL_COLUMNS, ARROW_SCHEMA, COLUMN_NAMES, COMPILED_KINDS, JSON, JSON_COLUMNS, STRING

try:  # the compiled helpers (built by `pip install` where a C compiler is at hand); optional
    from .. import _fastparse
except ImportError:  # pragma: no cover - depends on the environment
    _fastparse = None

# An escape jsonb refuses (\u0000, a lone surrogate), a valid surrogate pair (kept), and the run of backslashes
# before it: only an odd run makes it an escape rather than literal text.
_JSON_ESCAPE = re.compile(
    r"(\\+)(u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|u0000|u[dD][89a-fA-F][0-9a-fA-F]{2})"
)
_JSON_SUSPECT = r"\\u(0000|[dD][89a-fA-F])"
_SUSPECT_BYTES = re.compile(rb"\\u(0000|[dD][89a-fA-F])")
COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # binary COPY header: signature, no flags, no extension
_PG_EPOCH_US = 946_684_800_000_000  # PostgreSQL counts timestamps from 2000-01-01 UTC
_EMPTY = pa.scalar(b"", pa.binary())
_JSONB_VERSION = pa.scalar(b"\x01", pa.binary())
_ZONED = pa.timestamp("us", tz="UTC")


@functools.cache
def _copy_kinds(jsonb: frozenset[str]) -> list[str]:
    """The compiled encoder's code per column: `json` is sent as text, `jsonb` as its version byte and text."""
    return [
        COMPILED_KINDS[column.kind] if column.kind != JSON or column.name in jsonb else COMPILED_KINDS[STRING]
        for column in ALL_COLUMNS
    ]


def escape_json_text(text: str) -> str:
    """`text` with every escape jsonb refuses turned into literal text (`\\u0000` -> `\\\\u0000`)."""

    def fix(match: re.Match[str]) -> str:
        slashes, escape = match.groups()
        if len(slashes) % 2 == 0 or len(escape) > 5:  # literal backslashes, or a valid surrogate pair
            return match.group(0)
        return "\\" + match.group(0)

    return _JSON_ESCAPE.sub(fix, text.replace("\x00", "\\\\u0000"))


def _clean_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch with the NULs and escapes PostgreSQL refuses made literal text."""
    columns = batch.columns
    for index, field in enumerate(batch.schema):
        if field.type != pa.string():
            continue
        column = columns[index]
        if field.name in JSON_COLUMNS:
            if pc.any(pc.match_substring_regex(column, _JSON_SUSPECT + r"|\x00")).as_py():
                columns[index] = pa.array([escape_json_text(v) if v else v for v in column.to_pylist()], pa.string())
        elif pc.any(pc.match_substring(column, "\x00")).as_py():
            columns[index] = pc.replace_substring(column, "\x00", "\\u0000")
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema)


def _needs_cleaning(batch: pa.RecordBatch) -> bool:
    """Whether any string holds a NUL or a JSON escape jsonb refuses: a scan of raw bytes, cheap when none do."""
    for field, column in zip(batch.schema, batch.columns, strict=True):
        data = column.buffers()[2] if field.type == pa.string() else None
        if data is None:
            continue
        raw = data.to_pybytes()
        if b"\x00" in raw or (field.name in JSON_COLUMNS and b"\\u" in raw and _SUSPECT_BYTES.search(raw)):
            return True
    return False


def _fixed_size(values: np.ndarray, width: int) -> pa.Array:
    """Big-endian `values` as Arrow binary strings of `width` bytes each."""
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(values), [None, pa.py_buffer(values)])
    return fixed.cast(pa.binary())


def _field(column: pa.Array, values: np.ndarray, width: int) -> list[pa.Array]:
    """A fixed-width column's COPY fields: length then value, or the length -1 alone for NULL."""
    valid = column.is_valid()
    lengths = np.where(valid.to_numpy(zero_copy_only=False), width, -1).astype(">i4")
    return [_fixed_size(lengths, 4), pc.if_else(valid, _fixed_size(values, width), _EMPTY)]


def encode_binary(batch: pa.RecordBatch, first_seq: int | None, jsonb: frozenset[str] = frozenset()) -> pa.Buffer:
    """One batch as binary COPY rows (no file header) in ARROW_SCHEMA's order, numbered from `first_seq` in a
    last bigint field (no such field when `first_seq` is None); the JSON columns named in `jsonb` are typed
    `jsonb` in the table, the others `json`.

    Binary COPY saves the server about half of CSV's parsing. `json`'s binary form is the JSON text,
    `jsonb`'s a version byte and the text.
    """
    if not batch.schema.equals(ARROW_SCHEMA):
        batch = batch.select(list(COLUMN_NAMES)).cast(ARROW_SCHEMA)
    if _needs_cleaning(batch):
        batch = _clean_batch(batch)
    if _fastparse is not None:  # the same bytes, written in one pass by compiled code (tests compare the two)
        columns = []
        for code, column in zip(_copy_kinds(jsonb), batch.columns, strict=True):
            buffers = column.buffers()
            columns.append((code, buffers[0], buffers[1], buffers[2] if len(buffers) > 2 else None, column.offset))
        return pa.py_buffer(_fastparse.encode_copy(columns, batch.num_rows, -1 if first_seq is None else first_seq))
    return _encode_with_arrow(batch, first_seq, jsonb)


def _encode_with_arrow(batch: pa.RecordBatch, first_seq: int | None, jsonb: frozenset[str]) -> pa.Buffer:
    """`encode_binary` without the compiled encoder: each column as Arrow binary arrays of per-row fields, and
    one element-wise join in Arrow's C++ lays them out row by row, so no Python loop touches a row."""
    n = batch.num_rows
    fields = len(COLUMN_NAMES) + (first_seq is not None)
    parts: list[pa.Array] = [_fixed_size(np.full(n, fields, ">i2"), 2)]
    for field, column in zip(ARROW_SCHEMA, batch.columns, strict=True):
        kind = field.type
        if kind == pa.string():
            is_json = field.name in jsonb
            lengths = pc.binary_length(column)
            lengths = pc.add(lengths, 1) if is_json else lengths
            parts.append(_fixed_size(lengths.fill_null(-1).to_numpy(zero_copy_only=False).astype(">i4"), 4))
            if is_json:  # jsonb's version byte
                parts.append(pc.if_else(column.is_valid(), _JSONB_VERSION, _EMPTY))
            parts.append(column.cast(pa.binary()).fill_null(b""))
        elif kind == _ZONED:
            micros = column.cast(pa.int64()).fill_null(0).to_numpy() - _PG_EPOCH_US
            parts += _field(column, micros.astype(">i8"), 8)
        elif kind == pa.int64():
            parts += _field(column, column.fill_null(0).to_numpy().astype(">i8"), 8)
        elif kind == pa.float64():
            parts += _field(column, column.fill_null(0).to_numpy().astype(">f8"), 8)
        elif kind == pa.bool_():
            parts += _field(column, column.fill_null(False).to_numpy(zero_copy_only=False).astype("u1"), 1)
        else:
            raise TypeError(f"no binary COPY encoding for {field}")
    if first_seq is not None:
        parts += [
            _fixed_size(np.full(n, 8, ">i4"), 4),
            _fixed_size(np.arange(first_seq, first_seq + n, dtype=">i8"), 8),
        ]
    rows = pc.binary_join_element_wise(*parts, _EMPTY)
    offsets = np.frombuffer(rows.buffers()[1], np.int32)
    return rows.buffers()[2][offsets[rows.offset] : offsets[rows.offset + n]]

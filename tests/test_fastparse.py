"""The compiled fast path (`_fastparse`) against the msgspec path, which is the reference.

The fast path may decline any batch (it returns None and the msgspec path parses it); what it accepts it must turn
into exactly the batch the msgspec path makes, with no reject. Checked on real lines, a synthetic hour, every
awkward value in every column kind, and thousands of mutated lines.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

import msgspec
import pytest
from conftest import REAL_EVENTS

from amplitude_export import reader, synthetic
from amplitude_export.archive import ArchiveMember

HOUR = datetime(2025, 7, 1, 10, tzinfo=UTC)
MEMBER = ArchiveMember("123_2025-07-01_10#1.json.gz", HOUR, 1, 0, 0)
CTX = reader._Context("x.zip", "run", "default", HOUR, 4096, False)
STRICT = reader._Context("x.zip", "run", "default", HOUR, 4096, True)
KEYS = [column.source for column in reader._COLUMNS]
TOKENS = [
    b"null", b"1", b"-0", b"1.0", b"1e2", b"1E+2", b"1.5", b"-1.25e-3", b"0.1", b"01", b".5", b"-", b"4.9e-324",
    b"9223372036854775807", b"9223372036854775808", b"-9223372036854775808", b"-9223372036854775809",
    b"123456789012345678", b"12345678901234567890", b"1e400", b"1.7976931348623157e308", b"2.2250738585072014e-308",
    b"true", b"false", b"tru", b"nul", b'"x"', b'""', b'"\\u00e9"', b'"\\ud83d\\ude00"', b'"\\ud800"', b'"\\udc00"',
    b'"\\ud800\\u0041"', b'"a\\nb\\/c\\"d\\\\"', b'"\\u0000"', b'"\\x"', b'"\t"', b'"\xc3\xa9"', b" 5 ",
    b'"2025-07-01 10:00:00"', b'"2025-07-01 10:00:00.5"', b'"2025-07-01 10:00:00.000000"', b'"2025-07-01 10:00:00."',
    b'"2025-07-01 10:00:00.1234567"', b'"2025-07-01T10:00:00"', b'"2025-07-01 10:00:00Z"', b'"2025-07-01 10:00"',
    b'"2025-07-01"', b'"2024-02-29 00:00:00"', b'"2025-02-29 00:00:00"', b'"1900-02-29 00:00:00"',
    b'"2000-02-29 00:00:00"', b'"0000-01-01 00:00:00"', b'"0001-01-01 00:00:00"', b'"9999-12-31 23:59:59.999999"',
    b'"1969-12-31 23:59:59.5"', b'"2025-07-01 24:00:00"', b'"2025-07-01 10:60:00"', b'"2025-07-01 10:00:60"',
    b'"2025-13-01 10:00:00"', b'"2025-04-31 10:00:00"', b"{}", b"[]", b'[1,2,{"a":[null]}]', b'{"a":1,"a":2}',
    b'{"a" : 1 }', b"[1,]", b"{,}", b'{"a":}', b"[" * 70 + b"]" * 70, b"[" * 20 + b"]" * 20,
]


def _lines(path=REAL_EVENTS) -> list[bytes]:
    return [line for line in path.read_bytes().splitlines() if line.strip()]


def both(lines: list[bytes], ctx: reader._Context = CTX) -> tuple[reader._Part | None, reader._Part]:
    """(the part from the fast path, or None if it declined; the part from the msgspec path alone)."""
    utf8 = all(reader._line_is_utf8(line) for line in lines)
    saved = reader.FAST_PARSER
    reader.FAST_PARSER = None
    try:
        slow = reader._parse(lines, 1, MEMBER, 0, ctx, utf8)
    finally:
        reader.FAST_PARSER = saved
    if not utf8 or saved.parse(lines, ctx.require_uuid) is None:
        return None, slow
    return reader._parse_chunk(list(lines), 1, MEMBER, 0, ctx)[0], slow


def assert_same(fast: reader._Part, slow: reader._Part, what: object) -> None:
    assert not slow.rejects, (what, slow.rejects)
    assert slow.batch is not None and fast.batch is not None, what
    for name in fast.batch.schema.names:
        assert fast.batch.column(name).equals(slow.batch.column(name)), (what, name)
    assert fast.lines == slow.lines and not fast.rejects and not fast.unknown and not slow.unknown, what


def test_the_compiled_parser_is_built() -> None:
    # setup.py builds it wherever a C compiler is at hand (this machine and CI have gcc): its absence is a defect
    assert reader.FAST_PARSER is not None


def test_real_export_lines_take_the_fast_path_and_match() -> None:
    fast, slow = both(_lines())
    assert fast is not None
    assert_same(fast, slow, "real lines")


def test_a_synthetic_hour_takes_the_fast_path_and_matches() -> None:
    events = synthetic.generate_hour(HOUR, project_id=7, seed=3, events=2000)
    lines = [json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode() for event in events]
    fast, slow = both(lines, STRICT)
    assert fast is not None
    assert_same(fast, slow, "synthetic hour")
    assert fast.batch.num_rows == 2000


@pytest.mark.parametrize("kind", sorted({column.kind for column in reader._COLUMNS}))
def test_every_awkward_value_in_every_kind(kind: str) -> None:
    column = next(c for c in reader._COLUMNS if c.kind == kind)
    taken = 0
    for token in TOKENS:
        line = b'{"uuid":"u","' + column.source.encode() + b'":' + token + b"}"
        fast, slow = both([line])
        if fast is not None:
            taken += 1
            assert_same(fast, slow, (kind, token))
    assert taken >= 2  # at least null and one real value of the kind go the fast way


@pytest.mark.parametrize(
    "line",
    [
        b'{"uuid":"a","uuid":"b"}',  # a repeated key: which one wins is the msgspec path's business
        b'{"uuid":"a","brand_new_field":1}',  # an unknown key goes to _extra
        b'{"\\u0075uid":"a"}',  # an escaped key
        b'{"uuid":"a","event_id":1.0}',  # an integral float for an integer column
        b'{"uuid":"a","event_id":"12"}',  # a mistyped value goes to _extra
        b'{"uuid":"a","event_time":"2025-07-01T10:00:00"}',  # a timestamp written another way
        b'{"uuid":"a","city":"\\ud800"}',  # a lone surrogate
        b'{"uuid":"a","data":{"x":"\\udc00"}}',
        b"",  # a blank line
        b"[1]",  # not an object
        b'{"uuid":"a"} x',  # trailing garbage
        b'{"uuid":"a",}',
    ],
)
def test_the_fast_path_declines_what_the_msgspec_path_must_decide(line: bytes) -> None:
    assert reader.FAST_PARSER.parse([line]) is None
    assert reader.FAST_PARSER.parse([b'{"uuid":"ok"}', line]) is None  # one such line gives the batch away


def test_a_missing_uuid_is_declined_only_when_uuids_are_required() -> None:
    assert reader.FAST_PARSER.parse([b'{"event_id":1}'], True) is None
    assert reader.FAST_PARSER.parse([b'{"event_id":1}'], False) is not None


def _mutate(rng: random.Random, line: bytes) -> bytes:
    roll = rng.random()
    if roll < 0.5:  # another value for one key
        key = rng.choice(KEYS)
        try:
            raw = reader._RAW.decode(line)[key]
        except (msgspec.DecodeError, KeyError):
            return line
        at = line.find(b'"' + key.encode() + b'":')
        if at < 0:
            return line
        start = at + len(key) + 3
        return line[:start] + rng.choice(TOKENS) + line[start + len(bytes(raw)):]
    if roll < 0.6:
        return line.replace(b"{", b'{"unknown_field":1,', 1)
    if roll < 0.7:
        return line.replace(b"{", b'{"' + rng.choice(KEYS).encode() + b'":null,', 1)
    at = rng.randrange(len(line))  # a byte removed, added or replaced
    byte = bytes([rng.choice(b' \t\r{}[]:,"\\0123456789.eE+-ntfalsu')])
    roll = rng.random()
    if roll < 0.33:
        return line[:at] + line[at + 1:]
    if roll < 0.66:
        return line[:at] + byte + line[at:]
    return line[:at] + byte + line[at + 1:]


def test_mutated_lines_give_the_same_rows_or_are_declined() -> None:
    rng = random.Random(20261202)
    events = synthetic.generate_hour(HOUR, project_id=7, seed=4, events=100)
    pool = _lines() + [json.dumps(e, separators=(",", ":"), ensure_ascii=False).encode() for e in events]
    taken = 0
    for attempt in range(4000):
        line = rng.choice(pool)
        for _ in range(rng.choice((1, 1, 2, 3))):
            line = _mutate(rng, line)
        fast, slow = both([line])
        if fast is not None:
            taken += 1
            assert_same(fast, slow, (attempt, line))
    assert taken > 400  # the mutations leave many lines the fast path takes


def test_a_number_out_of_range_for_a_text_column_is_kept_in_extra() -> None:
    # msgspec cannot turn 1e400 into a Python value: the line is kept, the value verbatim in _extra
    part = reader._parse_chunk([b'{"uuid":"a","city":1e400}'], 1, MEMBER, 0, CTX)[0]
    assert not part.rejects
    assert part.batch.column("city").to_pylist() == [None]
    assert json.loads(part.batch.column("_extra")[0].as_py()) == {"city": float("inf")}
    assert b"1e400" in part.batch.column("_extra")[0].as_py().encode()

"""The compiled fast path (`_fastparse`) against the msgspec path, which is the reference.

The compiled parser takes every line it can decode as a whole, with its misfit values and unknown keys in `_extra`,
and hands back only the lines it cannot (invalid JSON or UTF-8, not an object, an escaped or repeated key, deep
nesting, no uuid when one is required), one by one, for the msgspec path. A chunk parsed that way must give
exactly the part the msgspec path alone gives: the same rows in the same order, the same `_extra` text, rejects,
counts and unknown keys. Checked on real lines, a varied synthetic hour, every awkward value in every column kind,
the kinds of variation real exports have, and thousands of mutated lines.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

import msgspec
import pytest
from conftest import REAL_EVENTS

from amplitude_export import parse, synthetic
from amplitude_export.archive import ArchiveMember

HOUR = datetime(2025, 7, 1, 10, tzinfo=UTC)
MEMBER = ArchiveMember("123_2025-07-01_10#1.json.gz", HOUR, 1, 0, 0)
CTX = parse.Context("x.zip", "run", "default", HOUR, 4096, False)
STRICT = parse.Context("x.zip", "run", "default", HOUR, 4096, True)
KEYS = [column.source for column in parse.COLUMNS]
TOKENS = [
    b"null", b"1", b"-0", b"1.0", b"1e2", b"1E+2", b"1.5", b"-1.25e-3", b"0.1", b"01", b".5", b"-", b"4.9e-324",
    b"9223372036854775807", b"9223372036854775808", b"-9223372036854775808", b"-9223372036854775809",
    b"123456789012345678", b"12345678901234567890", b"1e400", b"-1e400", b"1e-400", b"-1e-400",
    b"1.7976931348623157e308", b"1.7976931348623159e308", b"2.2250738585072014e-308", b"9007199254740992",
    b"9007199254740993", b"-9007199254740993", b"9007199254740993.0", b"9.2233720368547758e18",
    b"-9.2233720368547758e18", b"9223372036854775807.0", b"-0.0", b"1e18", b"123456789012345678901234567890",
    b"0." + b"0" * 300 + b"1", b"1" + b"0" * 400, b"1.5e300", b"-1e20", b"3.0e0",
    b"true", b"false", b"tru", b"nul", b"nulll", b'"x"', b'""', b'"\\u00e9"', b'"\\ud83d\\ude00"', b'"\\ud800"',
    b'"\\udc00"', b'"\\ud800\\u0041"', b'"a\\nb\\/c\\"d\\\\"', b'"\\u0000"', b'"\\x"', b'"\t"', b'"\xc3\xa9"', b" 5 ",
    b'"12"', b'"1.5"', b'"true"', b'"null"', b'"\\u0031\\u0032"',
    b'"2025-07-01 10:00:00"', b'"2025-07-01 10:00:00.5"', b'"2025-07-01 10:00:00.000000"', b'"2025-07-01 10:00:00."',
    b'"2025-07-01 10:00:00.1234567"', b'"2025-07-01T10:00:00"', b'"2025-07-01 10:00:00Z"', b'"2025-07-01 10:00"',
    b'"2025-07-01"', b'"2024-02-29 00:00:00"', b'"2025-02-29 00:00:00"', b'"1900-02-29 00:00:00"',
    b'"2000-02-29 00:00:00"', b'"0000-01-01 00:00:00"', b'"0001-01-01 00:00:00"', b'"9999-12-31 23:59:59.999999"',
    b'"1969-12-31 23:59:59.5"', b'"2025-07-01 24:00:00"', b'"2025-07-01 10:60:00"', b'"2025-07-01 10:00:60"',
    b'"2025-13-01 10:00:00"', b'"2025-04-31 10:00:00"', b'"2025\\u002d07-01 10:00:00"', b'"2025-07-01\\t10:00:00"',
    b'"\\u0032025-07-01 10:00:00.25"', b'"2025-07-01 10:00:00 "', b'" 2025-07-01 10:00:00"', b"20250701",
    b"{}", b"[]", b'[1,2,{"a":[null]}]', b'{"a":1,"a":2}', b'{"a" : 1 }', b"[1,]", b"{,}", b'{"a":}',
    b'["c37ee2320953c639c7240c033f12d2c6"]', b'{"x":{"y":{"z":[1,{"w":"\\u00e9"}]}}}', b'[ ]', b'{ }',
    b"[" * 70 + b"]" * 70, b"[" * 64 + b"]" * 64, b"[" * 20 + b"]" * 20, b"[" * 2000 + b"]" * 2000,
]


def _lines(path=REAL_EVENTS) -> list[bytes]:
    return [line for line in path.read_bytes().splitlines() if line.strip()]


def both(lines: list[bytes], ctx: parse.Context = CTX) -> tuple[parse.Part, parse.Part]:
    """(the part of a chunk of `lines` through the compiled parser, the part through the msgspec path alone)."""
    fast, count = parse.parse_chunk(list(lines), 1, MEMBER, 0, ctx)
    assert count == len(lines)
    slow, count = parse.parse_chunk(list(lines), 1, MEMBER, 0, ctx, compiled=False)
    assert count == len(lines)
    return fast, slow


def assert_same(fast: parse.Part, slow: parse.Part, what: object) -> None:
    assert (fast.batch is None) == (slow.batch is None), what
    if fast.batch is not None:
        assert fast.batch.schema == slow.batch.schema, what
        for name in fast.batch.schema.names:
            assert fast.batch.column(name).equals(slow.batch.column(name)), (
                what, name, fast.batch.column(name).to_pylist()[:3], slow.batch.column(name).to_pylist()[:3])
    assert fast.rejects == slow.rejects, what
    assert (fast.lines, fast.unknown) == (slow.lines, slow.unknown), what
    assert slow.slow == slow.lines, what  # the msgspec path alone parses every line


def taken(part: parse.Part) -> bool:
    """Whether the compiled parser took every line of the part."""
    return part.slow == 0


def test_the_compiled_parser_is_built() -> None:
    # setup.py builds it wherever a C compiler is at hand (this machine and CI have gcc): its absence is a defect
    assert parse.FAST_PARSER is not None


def test_real_export_lines_take_the_fast_path_and_match() -> None:
    fast, slow = both(_lines())
    assert taken(fast) and fast.batch.num_rows == 7
    assert_same(fast, slow, "real lines")


@pytest.mark.parametrize("variation", [0.0, synthetic.DEFAULT_VARIATION, 0.5])
def test_a_synthetic_hour_takes_the_fast_path_and_matches(variation: float) -> None:
    events = synthetic.generate_hour(HOUR, project_id=7, seed=3, events=2000, variation=variation)
    lines = synthetic.encode_lines(events)
    fast, slow = both(lines, STRICT)
    assert taken(fast)
    assert_same(fast, slow, "synthetic hour")
    assert fast.batch.num_rows == 2000
    extras = fast.batch.column("_extra").drop_null()
    assert (len(extras) > 0) == (variation > 0)  # varied lines keep their misfit values and new keys in _extra


@pytest.mark.parametrize("kind", sorted({column.kind for column in parse.COLUMNS}))
def test_every_awkward_value_in_every_kind(kind: str) -> None:
    chunk = []
    for column in (c for c in parse.COLUMNS if c.kind == kind):
        base = b"{" if column.source == "uuid" else b'{"uuid":"u",'
        chunk += [base + b'"' + column.source.encode() + b'":' + token + b"}" for token in TOKENS]
    fast, slow = both(chunk)
    assert_same(fast, slow, kind)  # row for row, each column of each line
    # every line the msgspec path keeps, the compiled parser takes, but for nesting past 65 levels
    handed_back = sum(b"[" * 66 in line and b"[" * 2000 not in line for line in chunk)
    assert handed_back and fast.slow == len(slow.rejects) + handed_back


def test_an_unknown_key_with_every_awkward_value() -> None:
    for token in TOKENS:
        line = b'{"uuid":"u","brand_new":' + token + b',"event_id":5}'
        fast, slow = both([line])
        assert_same(fast, slow, token)
        assert taken(fast) or slow.rejects or token.startswith(b"[" * 66), token
        if not slow.rejects:
            assert fast.unknown == {"brand_new"}


VARIED = [
    # booleans where strings are expected, and strings where booleans are
    b'{"uuid":"a","city":true,"is_attribution_event":"false","paying":"true"}',
    # numbers as strings, strings as numbers
    b'{"uuid":"a","event_id":"12","session_id":"1751254640623","app":"636686","location_lat":"37.77"}',
    b'{"uuid":"a","version_name":1.2,"os_version":18,"user_id":12345,"device_id":-1}',
    # integral floats where integers are expected; integers where floats are
    b'{"uuid":"a","event_id":241.0,"session_id":1.751254640623e12,"amplitude_id":1e3,"location_lat":37}',
    # unknown keys, several, in odd places, with odd values
    b'{"brand_new":{"x":[1,2]},"uuid":"a","$new":null,"zz":"\\u00e9","event_id":1,"\xc3\xa9t\xc3\xa9":[]}',
    # missing keys, no keys at all, only null
    b'{"uuid":"a"}', b"{}", b'{"uuid":null}', b'{"event_time":null,"data":null,"paying":null}',
    # timestamps without microseconds, with fewer digits, with a T, and broken ones
    b'{"uuid":"a","event_time":"2025-07-01 10:00:00","server_upload_time":"2025-07-01 10:00:00.5"}',
    b'{"uuid":"a","client_event_time":"2025-07-01T10:00:00.25","processed_time":"2025-07-01"}',
    b'{"uuid":"a","server_upload_time":"bad","event_time":"2025-02-30 00:00:00","user_creation_time":1751254640}',
    # arrays where a string is documented, objects where scalars are
    b'{"uuid":"a","amplitude_attribution_ids":["c37e","d48f"],"city":["x"],"event_id":{"v":1},"paying":[true]}',
    b'{"uuid":"a","amplitude_attribution_ids":"c37ee2320953c639c7240c033f12d2c6","groups":"company"}',
    # unicode escapes, raw UTF-8, escaped slashes, emoji as surrogate pairs
    b'{"uuid":"\\u0061","city":"S\\u00e3o Paulo","region":"M\xc3\xbcnchen","dma":"a\\/b","os_name":"\\ud83d\\ude00"}',
    # huge numbers everywhere
    b'{"uuid":"a","event_id":123456789012345678901234567890,"location_lng":1e400,"sample_rate":-1e400,"x":1e999}',
    # whitespace JSON allows
    b' { "uuid" : "a" , "event_id" : 1 , "data" : { "a" : [ 1 , 2 ] } } ',
    b'\t{"uuid":"a"}\r',
]


def test_varied_lines_are_taken_and_match_line_for_line() -> None:
    fast, slow = both(VARIED)
    assert taken(fast)
    assert_same(fast, slow, "varied")
    assert fast.unknown == {"brand_new", "$new", "zz", "\u00e9t\u00e9", "x"}
    rows = fast.batch.to_pylist()
    assert json.loads(rows[0]["_extra"]) == {"city": True, "is_attribution_event": "false", "paying": "true"}
    assert rows[3]["event_id"] == 241 and rows[3]["session_id"] == 1751254640623 and rows[3]["location_lat"] == 37.0
    assert rows[11]["_extra"] == '{"server_upload_time":"bad","event_time":"2025-02-30 00:00:00",' \
                                 '"user_creation_time":1751254640}'
    assert rows[13]["amplitude_attribution_ids"] == '"c37ee2320953c639c7240c033f12d2c6"'


@pytest.mark.parametrize(
    "line, why",
    [
        (b'{"uuid":"a","uuid":"b"}', "a repeated key"),
        (b'{"uuid":"a","x":1,"x":2}', "a repeated unknown key"),
        (b'{"\\u0075uid":"a"}', "an escaped key"),
        (b'{"uuid":"a","city":"\\ud800"}', "a lone surrogate"),
        (b'{"uuid":"a","data":{"x":"\\udc00"}}', "a lone surrogate, nested"),
        (b'{"uuid":"a","data":' + b"[" * 100 + b"]" * 100 + b"}", "nesting past 65 levels"),
        (b'{"uuid":"a","data":' + b"[" * 3000 + b"]" * 3000 + b"}", "nesting msgspec refuses"),
        (b"[1]", "not an object"),
        (b'"x"', "not an object"),
        (b'{"uuid":"a"} x', "trailing garbage"),
        (b'{"uuid":"a",}', "a trailing comma"),
        (b'{"uuid":"a","event_id":01}', "a number JSON does not allow"),
        (b'{"uuid":"a"', "truncated"),
        (b'{"uuid":"\xff"}', "invalid UTF-8"),
        (b'{"uuid":"a","city":"\xed\xa0\x80"}', "an encoded surrogate"),
        (b'{"uuid":"a","x":' + b",".join([b"1"] * 3) + b"}", "invalid JSON in an unknown key's value"),
        (b"{" + b",".join(b'"k%d":1' % i for i in range(17)) + b"}", "more unknown keys than the parser tracks"),
    ],
)
def test_a_line_the_compiled_parser_cannot_take_goes_alone_to_the_msgspec_path(line: bytes, why: str) -> None:
    good = [b'{"uuid":"ok1","event_id":1}', b'{"uuid":"ok2","paying":"x"}']
    chunk = [good[0], line, good[1], line, b"", good[0]]
    fast, slow = both(chunk)
    assert_same(fast, slow, why)
    assert fast.slow == 2, why  # only the two copies of the line, not the chunk
    assert fast.lines == 5  # the blank line is not counted
    numbers = fast.batch.column("_line").to_pylist()
    assert numbers == sorted(numbers) and {1, 3, 6} <= set(numbers)  # member order, then line order


def test_a_missing_uuid_goes_to_the_msgspec_path_only_when_uuids_are_required() -> None:
    for line in (b'{"event_id":1}', b'{"uuid":null}', b'{"uuid":5}'):
        fast, slow = both([line, b'{"uuid":"a"}'], STRICT)
        assert_same(fast, slow, line)
        assert fast.slow == 1 and len(fast.rejects) == 1
        fast, slow = both([line, b'{"uuid":"a"}'], CTX)
        assert_same(fast, slow, line)
        assert taken(fast)


def _mutate(rng: random.Random, line: bytes) -> bytes:
    roll = rng.random()
    if roll < 0.5:  # another value for one key
        key = rng.choice(KEYS)
        try:
            raw = msgspec.json.decode(line, type=dict[str, msgspec.Raw])[key]
        except (msgspec.DecodeError, KeyError, RecursionError):
            return line
        at = line.find(b'"' + key.encode() + b'":')
        if at < 0:
            return line
        start = at + len(key) + 3
        return line[:start] + rng.choice(TOKENS) + line[start + len(bytes(raw)):]
    if roll < 0.6:
        return line.replace(b"{", b'{"unknown_field":' + rng.choice(TOKENS) + b",", 1)
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


def test_mutated_lines_give_the_same_rows() -> None:
    rng = random.Random(20261202)
    events = synthetic.generate_hour(HOUR, project_id=7, seed=4, events=100)
    pool = _lines() + synthetic.encode_lines(events)
    compiled = 0
    for attempt in range(300):
        chunk = []
        for _ in range(20):
            line = rng.choice(pool)
            for _ in range(rng.choice((1, 1, 2, 3))):
                line = _mutate(rng, line)
            chunk.append(line)
        fast, slow = both(chunk)
        assert_same(fast, slow, (attempt, chunk))
        compiled += fast.lines - fast.slow
        # a line the msgspec path kept went there only for a repeated or escaped key, or deep nesting
        assert fast.slow - len(fast.rejects) <= sum(map(_is_handed_back, chunk)), chunk
    assert compiled > 6000 / 2


def _is_handed_back(line: bytes) -> bool:
    """Whether a line repeats a key, escapes one (as written it is not `"key"`) or nests past 65 levels."""

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        keys = [key for key, _ in items]
        if len(set(keys)) < len(keys) or any(b'"' + key.encode() + b'"' not in line for key in keys):
            raise KeyError("repeated or escaped")
        return dict(items)

    try:
        json.loads(line, object_pairs_hook=pairs)
    except KeyError:
        return True
    except (ValueError, RecursionError):
        pass
    return b"[" * 66 in line


def test_a_number_out_of_range_for_a_text_column_is_kept_in_extra() -> None:
    # msgspec cannot turn 1e400 into a Python value: the line is kept, the value verbatim in _extra
    part = parse.parse_chunk([b'{"uuid":"a","city":1e400}'], 1, MEMBER, 0, CTX)[0]
    assert not part.rejects and taken(part)
    assert part.batch.column("city").to_pylist() == [None]
    assert part.batch.column("_extra")[0].as_py() == '{"city":1e400}'



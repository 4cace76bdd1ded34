"""The compiled binary COPY encoder writes exactly the bytes of the Arrow one (the reference), batch for batch."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pyarrow as pa
import pytest
from conftest import REAL_EVENTS

from amplitude_export import parse, synthetic
from amplitude_export.archive import ArchiveMember
from amplitude_export.schema import JSON_COLUMNS
from amplitude_export.sinks import postgres_copy as postgres

HOUR = datetime(2025, 7, 1, 10, tzinfo=UTC)
MEMBER = ArchiveMember("123_2025-07-01_10#1.json.gz", HOUR, 1, 0, 0)
CTX = parse.Context("x.zip", "run", "default", HOUR, 4096, False)


def _batch() -> pa.RecordBatch:
    events = synthetic.generate_hour(HOUR, project_id=7, seed=5, events=300)
    lines = [json.dumps(e, separators=(",", ":"), ensure_ascii=False).encode() for e in events]
    lines += [line for line in REAL_EVENTS.read_bytes().splitlines() if line.strip()]
    lines += [  # odd values: every kind NULL or absent, a bool both ways, empty and unicode text, an unknown key
        b'{"uuid":"o1","is_attribution_event":true,"city":"","event_id":-9223372036854775808}',
        b'{"uuid":"o2","is_attribution_event":false,"city":"\\u00e9\xc3\xa9","location_lat":-0.0,"new_key":1}',
        b'{"uuid":"o3","event_time":"1970-01-01 00:00:00","data":"text","event_properties":[1,{"a":null}]}',
        b"{}",
    ]
    part = parse.parse_chunk(lines, 1, MEMBER, 0, CTX)[0]
    assert not part.rejects
    return part.batch


@pytest.mark.parametrize("jsonb", [frozenset(), frozenset(JSON_COLUMNS), frozenset({"_extra"})])
def test_the_compiled_encoder_writes_the_arrow_encoders_bytes(jsonb: frozenset[str]) -> None:
    assert postgres._fastparse is not None
    batch = _batch()
    for piece in (batch, batch.slice(0, 1), batch.slice(17, 150), batch.slice(batch.num_rows - 5)):
        for first_seq in (41, None):  # numbered for the stage, unnumbered for `events` itself
            expected = postgres._encode_with_arrow(piece, first_seq, jsonb).to_pybytes()
            assert postgres.encode_binary(piece, first_seq, jsonb).to_pybytes() == expected
    numbered = postgres.encode_binary(batch, 0, jsonb).to_pybytes()
    plain = postgres.encode_binary(batch, None, jsonb).to_pybytes()
    assert len(numbered) - len(plain) == 12 * batch.num_rows  # one bigint field (length and value) a row
    as_json = postgres.encode_binary(batch, None).to_pybytes()
    version_bytes = sum(batch.column(name).null_count < batch.num_rows for name in jsonb)
    assert len(plain) - len(as_json) >= version_bytes  # a jsonb value carries one more byte than its json text


def test_rows_that_need_cleaning_are_cleaned_first() -> None:
    batch = _batch().slice(0, 3)
    columns = batch.columns
    index = batch.schema.get_field_index("event_properties")
    columns[index] = pa.array(['{"a":"\\u0000"}', None, '{"b":"x\\ud800"}'], pa.string())
    dirty = pa.RecordBatch.from_arrays(columns, schema=batch.schema)
    encoded = postgres.encode_binary(dirty, 0).to_pybytes()
    assert encoded == postgres._encode_with_arrow(postgres._clean_batch(dirty), 0, frozenset()).to_pybytes()
    assert b'\\\\u0000' in encoded

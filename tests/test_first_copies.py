"""`sinks.FirstCopies`: the compiled uuid set (`_fastparse.StringSet`) against the Python one and a plain reference."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from amplitude_export import _fastparse
from amplitude_export.sinks import FirstCopies


def _batch(values: list[str | None]) -> pa.RecordBatch:
    return pa.record_batch({"uuid": pa.array(values, pa.string()), "row": pa.array(range(len(values)), pa.int64())})


def _reference(batches: list[list[str | None]], taken: set[str]) -> tuple[list[list[bool]], set[str]]:
    """Keep a row when its uuid is null, or neither taken nor seen in an earlier row."""
    seen: set[str] = set()
    masks = []
    for values in batches:
        mask = []
        for value in values:
            keep = value is None or (value not in seen and value not in taken)
            if value is not None and keep:
                seen.add(value)
            mask.append(keep)
        masks.append(mask)
    return masks, seen


def _masks(first: FirstCopies, batches: list[list[str | None]]) -> list[list[bool]]:
    masks = []
    for values in batches:
        keep = first.keep(_batch(values))
        masks.append([True] * len(values) if keep is None else keep.to_pylist())
    return masks


def test_the_compiled_set_is_built() -> None:
    assert _fastparse is not None and hasattr(_fastparse, "StringSet")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_repeats_are_found_as_the_reference_finds_them(seed: int, compiled: bool) -> None:
    rng = random.Random(seed)
    pool = [f"{rng.getrandbits(128):032x}" for _ in range(300)] + ["", "é", "a\x00b", "ünï", "x" * 40]
    batches = [
        [None if rng.random() < 0.1 else rng.choice(pool) for _ in range(rng.randrange(0, 120))] for _ in range(30)
    ]
    taken = set(rng.sample(pool, 20))
    first = FirstCopies(taken=pa.chunked_array([pa.array(sorted(taken)[:10]), pa.array(sorted(taken)[10:])]),
                        compiled=compiled)
    expected_masks, expected_seen = _reference(batches, taken)
    assert _masks(first, batches) == expected_masks
    assert sorted(first.uuids.to_pylist()) == sorted(expected_seen)
    assert not first.overflowed


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_sliced_arrays_and_other_string_types_are_read_at_their_offset(compiled: bool) -> None:
    first = FirstCopies(compiled=compiled)
    whole = _batch(["a", "b", None, "c", "a", "d"])
    assert first.keep(whole.slice(3)) is None  # c, a, d: all new
    keep = first.keep(whole.slice(0, 3))  # a again
    assert keep is not None and keep.to_pylist() == [False, True, True]
    large = pa.record_batch({"uuid": pa.array(["d", "e"], pa.large_string())})
    assert first.keep(large).to_pylist() == [False, True]
    assert sorted(first.uuids.to_pylist()) == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_past_the_limit_rows_pass_and_the_filter_says_it_overflowed(compiled: bool) -> None:
    first = FirstCopies(limit=3, compiled=compiled)
    assert first.keep(_batch(["a", "b", "c"])) is None
    assert not first.overflowed
    assert first.keep(_batch(["a", "d"])) is None  # not checked any more
    assert first.overflowed


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_filter_returns_the_batch_itself_or_one_filtered_copy(compiled: bool) -> None:
    first = FirstCopies(compiled=compiled)
    batch = _batch(["a", "b"])
    assert first.filter(batch) is batch
    again = first.filter(_batch(["b", "c", "a", None]))
    assert again.column("uuid").to_pylist() == ["c", None]
    assert again.column("row").to_pylist() == [1, 3]


def test_the_compiled_set_refuses_buffers_that_are_not_a_string_array() -> None:
    values = pa.array(["abc", "de"])
    validity, offsets, data = values.buffers()
    strings = _fastparse.StringSet()
    with pytest.raises(ValueError, match="Arrow string array"):
        strings.add(offsets, data, validity, 0, 5)  # more rows than the offsets hold
    with pytest.raises(ValueError, match="Arrow string array"):
        strings.add(pa.py_buffer(b"\x00\x00\x00\x00\x09\x00\x00\x00"), data, None, 0, 1)  # past the data
    with pytest.raises(ValueError, match="negative"):
        strings.add(offsets, data, validity, -1, 1)
    assert len(strings) == 0
    assert strings.add(offsets, data, validity, 0, 2) is None
    assert len(strings) == 2


def test_many_uuids_survive_the_table_growing() -> None:
    first = FirstCopies()
    values = [f"{n:036d}" for n in range(200_000)]
    for start in range(0, len(values), 10_000):
        assert first.keep(_batch(values[start:start + 10_000])) is None
    keep = first.keep(_batch(values[::1000] + ["new"]))
    assert keep.to_pylist() == [False] * 200 + [True]
    assert len(first.uuids) == 200_001

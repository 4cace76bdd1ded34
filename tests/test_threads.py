"""`threads.prefetched`: the intake's batches made one thread ahead of DuckDB's scan, in order, bounded, with
their errors, and never left running (docs/PARSE_DESIGN.md, the speed-trick table)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sink_helpers import Crash, batch, crashing, finisher, read_of, synthetic_batches, two_windows, uuids, window

from amplitude_export.sinks.duckdb import DuckDBSink
from amplitude_export.threads import prefetched


def _alive(name: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == name]


def test_items_come_in_their_order_and_the_producer_stays_at_most_depth_ahead() -> None:
    made: list[int] = []

    def items() -> Iterator[int]:
        for n in range(500):
            made.append(n)
            yield n

    got = []
    for n in prefetched(items(), depth=2, name="test-prefetch"):
        # queued (depth), plus the one being put, plus the one the consumer holds
        assert len(made) - len(got) <= 2 + 2
        got.append(n)
    assert got == list(range(500))
    assert _alive("test-prefetch") == []


def test_what_the_items_raise_comes_after_the_items_before_it() -> None:
    got = []
    with pytest.raises(Crash, match="reader died"):
        for n in prefetched(crashing([1, 2, 3], after=2), depth=2, name="test-prefetch"):  # type: ignore[list-item]
            got.append(n)
    assert got == [1, 2]
    assert _alive("test-prefetch") == []


def test_leaving_early_stops_the_producer_before_returning() -> None:
    made: list[int] = []

    def endless() -> Iterator[int]:
        n = 0
        while True:
            made.append(n)
            yield n
            n += 1

    stream = prefetched(endless(), depth=2, name="test-prefetch")
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert _alive("test-prefetch") == []
    settled = len(made)
    assert settled <= 3 + 2 + 1  # nothing ran far ahead
    assert len(made) == settled  # and nothing runs any more


def test_a_window_whose_batches_fail_midway_leaves_no_rows_and_no_thread(tmp_path: Path) -> None:
    sink = DuckDBSink(tmp_path / "e.duckdb")
    try:
        (w1, rows1), (w2, rows2) = two_windows()
        sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))
        with pytest.raises(Crash):  # the reader's own error, not a DuckDB one
            sink.write_window("p", w2, read_of(crashing([batch(rows2[:2]), batch(rows2[2:])], after=1), finisher(w2)))
        assert _alive("amplitude-export-intake") == []
        assert uuids(sink.read_arrow()) == ["u1", "u2", "u3", "u4", "u5"]
        # many small batches through the prefetching thread: every row once, repeats dropped, in the ledger
        win = window(4, 5)
        records = sink.write_window(
            "p", win, read_of(synthetic_batches(win, 1000, batch_rows=64, duplicate_every=10), finisher(win)))
        assert sum(record.events_loaded for record in records) == 2 * 900
        assert sum(record.duplicates for record in records) == 2 * 100
        assert _alive("amplitude-export-intake") == []
    finally:
        sink.close()

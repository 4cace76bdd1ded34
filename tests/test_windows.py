"""Windows: parsing, UTC alignment, readiness, splitting."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from amplitude_export.errors import UsageError
from amplitude_export.windows import (
    Window,
    hour_runs,
    last_ready_hour,
    parse_hour,
    plan_windows,
    resolve_range,
)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "is_end", "expected"),
    [
        ("20240301T05", False, utc(2024, 3, 1, 5)),
        ("2024-03-01T05", False, utc(2024, 3, 1, 5)),
        ("20240301", False, utc(2024, 3, 1, 0)),
        ("2024-03-01", True, utc(2024, 3, 1, 23)),
        ("20240301", True, utc(2024, 3, 1, 23)),
    ],
)
def test_parse_hour_formats(text: str, is_end: bool, expected: datetime) -> None:
    assert parse_hour(text, is_end=is_end) == expected


@pytest.mark.parametrize("text", ["yesterday", "2024-13-01", "2024-02-30", "20240301T24", "2024/03/01", ""])
def test_parse_hour_rejects_bad_input(text: str) -> None:
    with pytest.raises(UsageError):
        parse_hour(text)


def test_end_before_start_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="before start"):
        resolve_range("2024-03-02", "2024-03-01", now=utc(2024, 4, 1))


def test_an_empty_date_is_bad_input_and_an_end_before_yesterday_names_the_default_start() -> None:
    for start, end in (("", None), (None, ""), ("2024-03-01", "")):
        with pytest.raises(UsageError, match="cannot read ''"):
            resolve_range(start, end, now=utc(2024, 4, 1))
    with pytest.raises(UsageError, match=r"before the default start 2024-03-31T00 \(yesterday, UTC\): give --start"):
        resolve_range(None, "2020-01-01", now=utc(2024, 4, 1, 12))


def test_default_range_is_yesterday_utc() -> None:
    first, last, ready = resolve_range(None, None, now=utc(2024, 3, 2, 10, 30))
    assert (first, last, ready) == (utc(2024, 3, 1, 0), utc(2024, 3, 1, 23), utc(2024, 3, 1, 23))


def test_hours_not_ready_are_cut() -> None:
    # at 10:30, hour 07 closed at 08:00 and is ready at 10:00; hour 08 is ready only at 11:00
    assert last_ready_hour(utc(2024, 3, 2, 10, 30), 2) == utc(2024, 3, 2, 7)
    assert last_ready_hour(utc(2024, 3, 2, 10, 0), 2) == utc(2024, 3, 2, 7)
    assert last_ready_hour(utc(2024, 3, 2, 9, 59), 2) == utc(2024, 3, 2, 6)
    _, last, ready = resolve_range("2024-03-02", "2024-03-02", now=utc(2024, 3, 2, 10, 30))
    assert last == utc(2024, 3, 2, 23) and ready == utc(2024, 3, 2, 7)


def test_plan_daily_windows_align_to_midnight() -> None:
    windows = plan_windows(utc(2024, 3, 1, 5), utc(2024, 3, 3, 2), 24)
    assert windows == [
        Window(utc(2024, 3, 1, 5), utc(2024, 3, 1, 23)),
        Window(utc(2024, 3, 2, 0), utc(2024, 3, 2, 23)),
        Window(utc(2024, 3, 3, 0), utc(2024, 3, 3, 2)),
    ]


def test_plan_covers_every_hour_once() -> None:
    for size in (1, 5, 6, 24, 48, 24 * 400):
        windows = plan_windows(utc(2024, 1, 1, 3), utc(2025, 3, 1, 7), size)
        hours = [h for w in windows for h in w.each_hour()]
        assert hours == sorted(set(hours))
        assert hours[0] == utc(2024, 1, 1, 3) and hours[-1] == utc(2025, 3, 1, 7)
        assert all(w.hours <= min(size, 365 * 24) for w in windows)


def test_split_halves_partition_the_window() -> None:
    window = Window(utc(2024, 3, 1, 0), utc(2024, 3, 1, 23))
    left, right = window.split()
    assert left == Window(utc(2024, 3, 1, 0), utc(2024, 3, 1, 11))
    assert right == Window(utc(2024, 3, 1, 12), utc(2024, 3, 1, 23))
    odd = Window(utc(2024, 3, 1, 0), utc(2024, 3, 1, 2))
    assert [h for half in odd.split() for h in half.each_hour()] == list(odd.each_hour())
    with pytest.raises(ValueError):
        Window(utc(2024, 3, 1, 0), utc(2024, 3, 1, 0)).split()


def test_window_names_round_trip() -> None:
    window = Window(utc(2024, 3, 1, 0), utc(2024, 3, 1, 23))
    assert window.name == "20240301T00_20240301T23"
    assert window.params() == {"start": "20240301T00", "end": "20240301T23"}
    assert Window.from_name(window.name) == window


def test_hour_runs_join_consecutive_hours_of_one_key() -> None:
    keyed = [(utc(2024, 3, 1, h), key) for h, key in
             [(0, "a"), (1, "a"), (2, "b"), (3, "a"), (5, "a"), (6, "a"), (7, "b"), (8, "b")]]  # fmt: skip
    assert hour_runs(keyed) == [
        (Window(utc(2024, 3, 1, 0), utc(2024, 3, 1, 1)), "a"),
        (Window(utc(2024, 3, 1, 2), utc(2024, 3, 1, 2)), "b"),
        (Window(utc(2024, 3, 1, 3), utc(2024, 3, 1, 3)), "a"),  # "b" came between: a run of its own
        (Window(utc(2024, 3, 1, 5), utc(2024, 3, 1, 6)), "a"),  # hour 4 missing: a gap ends a run
        (Window(utc(2024, 3, 1, 7), utc(2024, 3, 1, 8)), "b"),
    ]
    # two kinds of problem in the same hours: each key keeps its own run going
    both = [(utc(2024, 3, 1, h), key) for h in (0, 1, 2) for key in ("x", "y")]
    assert hour_runs(both) == [(Window(utc(2024, 3, 1, 0), utc(2024, 3, 1, 2)), key) for key in ("x", "y")]
    assert hour_runs([]) == []

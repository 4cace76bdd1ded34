"""`plan_run`: which windows a run asks for, and what it tells the user first."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from amplitude_export.ledger import LOADED, HourRecord
from amplitude_export.plan import plan_run
from amplitude_export.windows import Window

LAST_LOADED = datetime(2024, 3, 1, 23, tzinfo=UTC)


def plan_after(gap: timedelta, *, start: str | None = None, end: str | None = None):  # type: ignore[no-untyped-def]
    ledger = {LAST_LOADED: HourRecord(LAST_LOADED, LOADED)}
    # an hour is ready `lag_hours` after it closes, so the last ready hour is LAST_LOADED + gap
    now = LAST_LOADED + gap + timedelta(hours=3, minutes=30)
    return plan_run(ledger, start=start, end=end, now=now, lag_hours=2, window_hours=24, lookback_hours=0,
                    size_budget=1 << 30, line_budget=10**9, refresh=False, landed=set())


def test_a_run_catching_up_more_than_a_week_says_so_first(caplog: pytest.LogCaptureFixture) -> None:
    plan = plan_after(timedelta(days=30))
    note = ("catching up 720 hours since the last hour recorded (2024-03-02T00..2024-03-31T23 UTC); "
            "pass --end to stop earlier")
    assert plan.notes == [note]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [note]
    assert plan.windows[0].start == LAST_LOADED + timedelta(hours=1) and len(plan.windows) == 30


def test_a_week_or_less_and_an_explicit_start_catch_up_without_a_word(caplog: pytest.LogCaptureFixture) -> None:
    assert plan_after(timedelta(days=7)).notes == []
    assert len(plan_after(timedelta(days=7)).windows) == 7
    explicit = plan_after(timedelta(days=30), start="2024-03-02")
    assert explicit.notes == [] and not caplog.records
    assert plan_after(timedelta(days=30), end="2024-03-31").notes == []


def test_a_backfill_that_failed_whole_is_asked_again_in_windows_and_the_next_run_leaves_no_gap() -> None:
    from amplitude_export.ledger import FAILED
    from amplitude_export.windows import HOUR

    first = datetime(2024, 3, 1, tzinfo=UTC)
    failed = [first + HOUR * n for n in range(48)]  # 03-01 and 03-02, every request failed
    ledger = {hour: HourRecord(hour, FAILED, reason="timed out") for hour in failed}
    now = datetime(2024, 3, 5, 12, tzinfo=UTC)
    plan = plan_run(ledger, start=None, end=None, now=now, lag_hours=2, window_hours=24, lookback_hours=0,
                    size_budget=1 << 30, line_budget=10**9, refresh=False, landed=set())
    asked = sorted(hour for window in plan.windows for hour in window.each_hour())
    ready = datetime(2024, 3, 5, 9, tzinfo=UTC)
    assert asked == [first + HOUR * n for n in range(int((ready - first) / HOUR) + 1)]  # 03-03 included
    assert [w for w in plan.windows if w.end < datetime(2024, 3, 3, tzinfo=UTC)] == [
        Window(first, first + HOUR * 23), Window(first + HOUR * 24, first + HOUR * 47)]

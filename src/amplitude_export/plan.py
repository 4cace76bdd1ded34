"""Which windows a run asks for: from the user's range or the ledger, to windows sized from what the ledger saw.

Pure functions of their arguments (a ledger is a dict of `HourRecord`s; the clock is `now`): no network, no sink.
`plan_run` is what `pipeline.run` asks for; `plan_range` is what `pipeline.extract` asks for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .errors import AmplitudeExportError
from .ledger import DONE, FAILED, LOADED, TOO_LARGE, HourRecord, incremental_start
from .outcome import plural
from .windows import HOUR, Window, hour_runs, label_hour, last_ready_hour, parse_hour, plan_windows, resolve_range

log = logging.getLogger(__name__)

SKIPPED = (*DONE, TOO_LARGE)  # statuses not asked again unless --refresh
DEFAULT_SIZE_BUDGET = 1 << 30  # plan windows under 1 GiB of archive: far from the Export API's 4 GB limit
# A run without --start catches up every hour since the last one loaded: past a week of them, say so before it
# starts, since a scheduled run that paused for months can otherwise work for hours without a word.
CATCH_UP_WARNING_HOURS = 7 * 24


@dataclass
class Plan:
    """A run's windows: those to load, those to fetch again and compare (`recheck`), and what to tell the user."""

    windows: list[Window] = field(default_factory=list)
    recheck: list[Window] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def consecutive(hours: Iterable[datetime]) -> list[Window]:
    """Hours joined into windows of consecutive hours."""
    return [window for window, _ in hour_runs((hour, None) for hour in sorted(hours))]


def plan_run(
    ledger: dict[datetime, HourRecord],
    *,
    start: str | None,
    end: str | None,
    now: datetime,
    lag_hours: float,
    window_hours: int,
    lookback_hours: int,
    size_budget: int,
    line_budget: int,
    refresh: bool,
    landed: set[Window],
) -> Plan:
    """The windows of a run, fitted to `size_budget` bytes of archive and `line_budget` lines, and replaced by the
    `landed` archives inside them.

    With no `start`, continue from the hour after the last one recorded (the first run takes yesterday, or the day
    of `end` if that is earlier), up to the last ready hour (or `end`); hours failed by earlier runs are asked
    again, and the loaded and empty hours among the `lookback_hours` before the end are to be fetched again and
    compared (`recheck`). Hours the ledger holds as done (or too large) are asked again only with `refresh`.
    """
    plan = Plan()
    first, last = _run_range(ledger, start, end, now, lag_hours)
    ready = min(last, last_ready_hour(now, lag_hours))
    if ready < last:
        plan.notes.append(_not_ready_note(ready, lag_hours))
    if ready >= first:
        plan.windows = pending_windows(ledger, first, ready, window_hours, refresh=refresh)
        if start is None and end is None and incremental_start(ledger) == first:
            _warn_long_catch_up(plan, first, ready)
    elif start is None:
        plan.notes.append(f"the destination is up to date (loaded through {label_hour(first - HOUR)})")
    if start is None:  # hours failed by earlier runs, before this run's range, are asked again
        retry = [h for h, r in ledger.items() if r.status == FAILED and h < first
                 and not any(w.start <= h <= w.end for w in plan.windows)]  # fmt: skip
        plan.windows += [w for run in consecutive(retry) for w in plan_windows(run.start, run.end, window_hours)]
        if lookback_hours > 0:
            plan.recheck = lookback_windows(ledger, ready, lookback_hours, window_hours, exclude=plan.windows)
    too_large = sorted(h for h, r in ledger.items() if r.status == TOO_LARGE and first <= h <= ready)
    if too_large and not refresh:
        plan.notes.append(
            f"{plural(len(too_large), 'hour')} the Export API refused with 400 even alone (`status` quotes its "
            "answer; Amplitude's S3 export has them): " + ", ".join(label_hour(h) for h in too_large[:10])
        )
    plan.windows = plan_around_landed(fit(sorted(plan.windows), ledger, size_budget, line_budget), landed)
    plan.recheck = fit(plan.recheck, ledger, size_budget, line_budget)
    return plan


def _run_range(
    ledger: dict[datetime, HourRecord], start: str | None, end: str | None, now: datetime, lag_hours: float
) -> tuple[datetime, datetime]:
    if start is None:
        return incremental_range(ledger, end, now, lag_hours)
    first, last, _ = resolve_range(start, end, now=now, lag_hours=lag_hours)
    return first, last


def _warn_long_catch_up(plan: Plan, first: datetime, ready: datetime) -> None:
    hours = Window(first, ready).hours
    if hours > CATCH_UP_WARNING_HOURS:
        note = (
            f"catching up {plural(hours, 'hour')} since the last hour recorded ({label_hour(first)}.."
            f"{label_hour(ready)} UTC); pass --end to stop earlier"
        )
        log.warning(note)
        plan.notes.append(note)


def _not_ready_note(ready: datetime, lag_hours: float) -> str:
    note = (
        f"hours after {label_hour(ready)} UTC are not exportable yet (Amplitude needs about "
        f"{lag_hours:g} h after an hour closes); stopping at {label_hour(ready)}"
    )
    log.warning(note)
    return note


def plan_range(
    start: str | None, end: str | None, now: datetime, lag_hours: float, window_hours: int
) -> tuple[list[Window], list[str]]:
    """The windows of start..end that can be exported at `now`, and what to tell the user about the rest."""
    first, last, ready = resolve_range(start, end, now=now, lag_hours=lag_hours)
    notes = []
    if ready < first:
        note = (
            f"nothing in {label_hour(first)}..{label_hour(last)} is exportable yet: try after "
            f"{label_hour(first + HOUR * (1 + lag_hours))} UTC"
        )
        log.warning(note)
        notes.append(note)
    elif ready < last:
        notes.append(_not_ready_note(ready, lag_hours))
    return (plan_windows(first, ready, window_hours) if ready >= first else []), notes


def incremental_range(
    ledger: dict[datetime, HourRecord], end: str | None, now: datetime, lag_hours: float
) -> tuple[datetime, datetime]:
    """Where a run without --start begins and ends: after the last done hour.

    The first run takes yesterday, or the day of `end` when that is earlier (a first `run --end` always loads).
    """
    resume = incremental_start(ledger)
    if resume is None:
        first, last, _ = resolve_range(None, None, now=now, lag_hours=lag_hours)
    else:
        first, last = resume, last_ready_hour(now, lag_hours)
    if end is not None:
        last = parse_hour(end, is_end=True)
        if resume is None:
            first = min(first, last.replace(hour=0))
    return first, last


def pending_windows(
    ledger: dict[datetime, HourRecord], first: datetime, last: datetime, window_hours: int, *, refresh: bool = False
) -> list[Window]:
    """Windows over the hours of first..last that the ledger does not hold as loaded or empty.

    Hours already done are cut out, so a re-run asks only for what is missing; `refresh` asks for everything.
    """
    wanted = [
        h for h in Window(first, last).each_hour() if refresh or h not in ledger or ledger[h].status not in SKIPPED
    ]
    return [w for run in consecutive(wanted) for w in plan_windows(run.start, run.end, window_hours)]


def lookback_windows(
    ledger: dict[datetime, HourRecord],
    end: datetime,
    lookback_hours: int,
    window_hours: int,
    *,
    exclude: list[Window],
) -> list[Window]:
    """Windows over the loaded and empty hours among the `lookback_hours` up to `end` that this run does not load
    anyway: Amplitude re-exports loaded hours, and has answered 404 for hours that later had data."""
    if lookback_hours < 1:
        return []
    span = Window(end - HOUR * (lookback_hours - 1), end)
    wanted = [
        h
        for h in span.each_hour()
        if (record := ledger.get(h)) is not None
        and record.status in DONE
        and not any(w.start <= h <= w.end for w in exclude)
    ]
    return [w for run in consecutive(wanted) for w in plan_windows(run.start, run.end, window_hours)]


def landed_windows(raw_dir: Path, suffix: str = ".zip") -> set[Window]:
    """The windows named by the `<start>_<end><suffix>` files in `raw_dir`.

    `.zip` is a complete archive (a download lands as `.zip.<pid>.part` and is renamed only once verified); `.empty`
    marks a window `extract` found empty.
    """
    windows: set[Window] = set()
    for path in raw_dir.glob(f"*{suffix}") if raw_dir.is_dir() else []:
        try:
            windows.add(Window.from_name(path.name.removesuffix(suffix)))
        except AmplitudeExportError:
            continue  # not one of ours
    return windows


def plan_around_landed(windows: Iterable[Window], landed: set[Window]) -> list[Window]:
    """Each window replaced by the landed windows inside it, plus windows over the hours they leave uncovered.

    After 504s split a day into halves, a resumed run reuses the halves instead of fetching the whole day again,
    so no event is kept in two archives. Landed windows that overlap each other are used once.
    """
    planned: list[Window] = []
    for window in windows:
        covered: set[datetime] = set()
        inside = [w for w in landed if window.start <= w.start and w.end <= window.end]
        for candidate in sorted(inside, key=lambda w: (w.start, -w.hours)):
            hours = set(candidate.each_hour())
            if not hours & covered:
                planned.append(candidate)
                covered |= hours
        planned.extend(consecutive(hour for hour in window.each_hour() if hour not in covered))
    return sorted(planned)


def hour_size_estimator(ledger: dict[datetime, HourRecord], measure: str = "bytes") -> Callable[[datetime], int]:
    """Each hour's archive bytes (or another HourRecord count, e.g. `lines_read`) as last seen; an hour never
    seen is guessed from the recent loaded hours."""
    known = {h: getattr(r, measure) for h, r in ledger.items() if r.status == LOADED and getattr(r, measure)}
    recent = [known[h] for h in sorted(known)[-48:]]
    guess = int(sum(recent) / len(recent)) if recent else 0
    return lambda hour: known.get(hour, guess)


def fit(windows: list[Window], ledger: dict[datetime, HourRecord], size_budget: int, line_budget: int) -> list[Window]:
    """Windows cut to `size_budget` bytes of archive and to `line_budget` lines, from what the ledger saw of each
    hour: a sink deduplicates a window's uuids in memory up to a limit, and past it in SQL, about twice as slow."""
    windows = fit_budget(windows, hour_size_estimator(ledger), size_budget)
    return fit_budget(windows, hour_size_estimator(ledger, "lines_read"), line_budget)


def fit_budget(windows: list[Window], estimate: Callable[[datetime], int], budget: int) -> list[Window]:
    """Cut windows whose estimated total (archive bytes, lines) would exceed `budget`, so large days never hit a
    400 first."""
    out: list[Window] = []
    for window in windows:
        start = window.start
        total = 0
        for hour in window.each_hour():
            size = estimate(hour)
            if hour > start and total + size > budget:
                out.append(Window(start, hour - HOUR))
                start, total = hour, 0
            total += size
        out.append(Window(start, window.end))
    return out

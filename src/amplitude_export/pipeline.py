"""The job itself: plan windows (`plan.py`) -> fetch archives (`fetch.py`) -> load them into a sink and record
their hours (`load.py`) -> report (`outcome.py`).

`extract` lands archives only. `run` fetches and loads, pipelined: while one window loads, the next ones download
in background threads. `load` loads archives already on disk. Each returns a `RunReport`, whose `exit_code` the
CLI passes on.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from . import clock, sinks
from .client import CACHED, ExportClient
from .errors import AmplitudeExportError
from .fetch import MAX_SAFE_CONCURRENCY, Fetch, check_concurrency, fetch_windows
from .ledger import DONE
from .load import Loader, privacy_controls
from .outcome import RunReport, WindowOutcome, lookback_note, new_run_id, plural
from .plan import (
    DEFAULT_SIZE_BUDGET,
    fit_budget,
    hour_size_estimator,
    landed_windows,
    plan_around_landed,
    plan_range,
    plan_run,
)
from .privacy import Privacy
from .progress import Reporter
from .sinks import Sink
from .windows import Window

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SIZE_BUDGET",
    "MAX_SAFE_CONCURRENCY",
    "RunReport",
    "WindowOutcome",
    "extract",
    "fit_budget",
    "hour_size_estimator",
    "load",
    "new_run_id",
    "plural",
    "run",
]


def run(
    client: ExportClient,
    sink: Sink,
    *,
    project: str,
    start: str | None = None,
    end: str | None = None,
    data_dir: Path = Path("data"),
    window_hours: int = 24,
    lag_hours: float = 2,
    lookback_hours: int = 72,
    size_budget: int = DEFAULT_SIZE_BUDGET,
    concurrency: int = 2,
    workers: int = 2,
    keep_raw: bool | None = None,
    refresh: bool = False,
    now: datetime | None = None,
    reporter: Reporter | None = None,
    run_id: str | None = None,
    stream: bool = True,
    privacy: Privacy | None = None,
) -> RunReport:
    """Extract and load start..end into `sink`, downloading the next windows while one loads.

    Without `start`, continue after the last hour recorded and re-check the `lookback_hours` before the end
    (`plan.plan_run` gives the rules). With `stream`, a window is loaded while it downloads when the loader
    would otherwise wait (`live.py`). `privacy` applies to every batch and reject, and the users of the deletion
    jobs the destination applied are always left out; with PII controls `keep_raw` defaults to False.
    """
    reporter = reporter or Reporter()
    moment = now or clock.now()
    report = RunReport(run_id or new_run_id(moment))
    check_concurrency(concurrency)
    privacy, keep_raw = privacy_controls(sink, project, privacy, keep_raw, report, data_dir)
    ledger = sink.ledger(project)
    raw_dir = data_dir / "raw"
    # a window's lines stay under the uuids a sink deduplicates in memory (read here: tests lower it)
    plan = plan_run(ledger, start=start, end=end, now=moment, lag_hours=lag_hours, window_hours=window_hours,
                    lookback_hours=lookback_hours, size_budget=size_budget, line_budget=sinks.SEEN_LIMIT * 9 // 10,
                    refresh=refresh, landed=set() if refresh else landed_windows(raw_dir))  # fmt: skip
    report.notes += plan.notes
    reporter.add_windows(len(plan.windows) + len(plan.recheck))
    loader = Loader(sink, project, report.run_id, data_dir, ledger, workers=workers, keep_raw=keep_raw,
                    privacy=privacy)  # fmt: skip
    for fetched in fetch_windows(client, sorted(plan.windows + plan.recheck), raw_dir, concurrency=concurrency,
                                 reporter=reporter, fresh=plan.recheck, live=stream, refetch=refresh):  # fmt: skip
        if (outcome := loader.take(fetched)) is not None:
            report.outcomes.append(outcome)
            reporter.window_done(outcome.describe())
    report.notes += loader.notes
    if plan.recheck:
        report.changed_hours = sorted(loader.changed)
        unsure = [o.window for o in report.outcomes if o.status in ("kept", "recheck_failed")]
        report.notes.append(lookback_note(plan.recheck, loader.changed, unsure))
        log.info(report.notes[-1])
    report.outcomes.sort(key=lambda o: o.window)
    return report


def extract(
    client: ExportClient,
    *,
    start: str | None = None,
    end: str | None = None,
    data_dir: Path = Path("data"),
    window_hours: int = 24,
    lag_hours: float = 2,
    concurrency: int = 2,
    now: datetime | None = None,
    reporter: Reporter | None = None,
    run_id: str | None = None,
) -> RunReport:
    """Land the archives of start..end under `data_dir/raw/` (download only; no destination)."""
    reporter = reporter or Reporter()
    report = RunReport(run_id or new_run_id(now))
    check_concurrency(concurrency)
    raw_dir = data_dir / "raw"
    empty = landed_windows(raw_dir, ".empty")
    planned, notes = plan_range(start, end, now or clock.now(), lag_hours, window_hours)
    report.notes += notes
    windows = plan_around_landed(planned, landed_windows(raw_dir) | empty)
    pending = [w for w in windows if w not in empty]
    for skipped in set(windows) - set(pending):
        report.outcomes.append(WindowOutcome(skipped, "empty", reason="recorded empty by an earlier run"))
    reporter.add_windows(len(windows))
    if len(pending) < len(windows):
        reporter.window_done("skipped windows recorded empty earlier", count=len(windows) - len(pending))
    for fetched in fetch_windows(client, pending, raw_dir, concurrency=concurrency, reporter=reporter):
        outcome = _landed(fetched)
        if fetched.empty:
            raw_dir.mkdir(parents=True, exist_ok=True)
            (raw_dir / f"{fetched.window.name}.empty").touch()
        report.outcomes.append(outcome)
        reporter.window_done(outcome.describe())
    report.outcomes.sort(key=lambda o: o.window)
    return report


def _landed(fetched: Fetch) -> WindowOutcome:
    window, attempts = fetched.window, fetched.attempts
    if fetched.failed:
        return WindowOutcome(window, fetched.status, reason=fetched.reason, attempts=attempts)
    if fetched.empty:
        return WindowOutcome(window, "empty", reason="no data (404)", attempts=attempts)
    status = "cached" if fetched.status == CACHED else "landed"
    return WindowOutcome(window, status, bytes=fetched.bytes, attempts=attempts)


def load(
    sink: Sink,
    *,
    project: str,
    data_dir: Path = Path("data"),
    workers: int = 2,
    keep_raw: bool | None = None,
    refresh: bool = False,
    reporter: Reporter | None = None,
    run_id: str | None = None,
    privacy: Privacy | None = None,
) -> RunReport:
    """Load the archives already under `data_dir/raw/` whose hours the destination does not hold yet (`privacy`
    and `keep_raw` as for `run`).

    A lookback lands a newer archive beside older ones holding some of its hours, so an hour is loaded from the
    newest archive (by modification time) that holds it: an archive whose hours newer ones all hold is skipped, the
    rest load oldest first, and a newer archive sharing hours with one this load wrote is loaded after it."""
    reporter = reporter or Reporter()
    report = RunReport(run_id or new_run_id())
    privacy, keep_raw = privacy_controls(sink, project, privacy, keep_raw, report, data_dir)
    ledger = sink.ledger(project)
    raw_dir = data_dir / "raw"
    found: list[tuple[int, str, Window, Path]] = []
    for path in raw_dir.glob("*.zip") if raw_dir.is_dir() else []:
        try:
            window = Window.from_name(path.name.removesuffix(".zip"))
        except AmplitudeExportError:
            log.warning("skipping %s: its name is not <start>_<end>.zip", path.name)
            continue
        found.append((path.stat().st_mtime_ns, path.name, window, path))
    newer: set[datetime] = set()  # hours an archive newer than the one at hand holds
    current: list[tuple[Window, Path, set[datetime]]] = []
    for _, _, window, path in sorted(found, reverse=True):
        hours = set(window.each_hour())
        if hours <= newer:
            log.info("skipping %s: newer archives hold all its hours", path.name)
        else:
            current.append((window, path, hours))
        newer |= hours
    archives: list[tuple[Window, Path]] = []
    rewritten: set[datetime] = set()  # hours this load replaces
    for window, path, hours in reversed(current):
        done = all(h in ledger and ledger[h].status in DONE for h in hours)
        if refresh or not done or hours & rewritten:
            archives.append((window, path))
            rewritten |= hours
    reporter.add_windows(len(archives))
    loader = Loader(sink, project, report.run_id, data_dir, ledger, workers=workers, keep_raw=keep_raw,
                    privacy=privacy)  # fmt: skip
    for window, path in archives:
        outcome = loader.load(window, path)
        report.outcomes.append(outcome)
        reporter.window_done(outcome.describe())
    if not archives and found:
        report.notes.append(f"nothing to load: the hours of the {plural(len(found), 'archive')} under {raw_dir} are "
                            "loaded already (--refresh loads them again)")
    elif not archives:
        report.notes.append(f"no archives to load under {raw_dir}")
    return report

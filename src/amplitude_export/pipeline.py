"""The job itself: plan windows -> fetch archives -> read events -> write to a sink -> mark hours done.

`extract` lands archives only (what the old scripts did). `run` fetches and loads, pipelined: while one window
loads, the next ones download in background threads. `load` loads archives already on disk. Each returns a
`RunReport`, whose `exit_code` the CLI passes on.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .client import CACHED, EMPTY, Download, ExportClient
from .errors import (
    EXIT_INCOMPLETE,
    EXIT_OK,
    AmplitudeExportError,
    ArchiveError,
    TransientError,
    UsageError,
    WindowTooLargeError,
)
from .ledger import EMPTY as LEDGER_EMPTY
from .ledger import FAILED, LOADED, TOO_LARGE, HourRecord
from .live import LiveFile, StreamAbandoned
from .privacy import Privacy
from .progress import Reporter
from .sinks import Sink
from .windows import HOUR, Window, label_hour, last_ready_hour, parse_hour, plan_windows, resolve_range

log = logging.getLogger(__name__)

MAX_SAFE_CONCURRENCY = 5  # Amplitude allows 5 concurrent REST requests per project
DONE_STATUSES = (LOADED, LEDGER_EMPTY)
SKIPPED_STATUSES = (LOADED, LEDGER_EMPTY, TOO_LARGE)  # not asked again unless --refresh
DEFAULT_SIZE_BUDGET = 1 << 30  # plan windows under 1 GiB of archive: far from the Export API's 4 GB limit


def plural(count: int, noun: str) -> str:
    """`1 hour`, `2 hours`: a count with its noun, for the lines a run prints."""
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def new_run_id(now: datetime | None = None) -> str:
    """A sortable, unique run id: `20240302T031500Z-1a2b3c`."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{moment:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@dataclass
class WindowOutcome:
    """What happened to one window in this run."""

    window: Window
    status: str  # landed, cached, loaded, empty, failed, too_large
    reason: str | None = None
    events: int = 0
    rejects: int = 0
    duplicates: int = 0
    bytes: int = 0
    attempts: int = 0
    deleted: int = 0  # rows of deleted users left out (privacy.py)

    def describe(self) -> str:
        """One line for the log and the console."""
        text = f"{self.window}: {self.status}"
        if self.status in ("loaded", "landed", "cached"):
            text += f" ({self.bytes:,} bytes"
            if self.status == "loaded":
                text += f", {self.events:,} events, {self.duplicates:,} duplicates, {self.rejects:,} rejected"
                if self.deleted:
                    text += f", {self.deleted:,} of deleted users left out"
            text += ")"
        if self.reason:
            text += f": {self.reason}"
        return text


@dataclass
class RunReport:
    """The outcome of a whole run."""

    run_id: str
    outcomes: list[WindowOutcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    log_path: Path | None = None
    changed_hours: list[datetime] = field(default_factory=list)

    @property
    def failed(self) -> list[WindowOutcome]:
        """Windows that did not complete (they are retried by the next run)."""
        return [o for o in self.outcomes if o.status in (FAILED, TOO_LARGE)]

    @property
    def events(self) -> int:
        return sum(o.events for o in self.outcomes)

    @property
    def rejects(self) -> int:
        return sum(o.rejects for o in self.outcomes)

    @property
    def exit_code(self) -> int:
        return EXIT_INCOMPLETE if self.failed else EXIT_OK

    def summary(self) -> str:
        """A few lines for the end of a run."""
        counts: dict[str, int] = {}
        for outcome in self.outcomes:
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
        parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing to do"
        lines = [f"run {self.run_id}: {plural(len(self.outcomes), 'window')} ({parts})"]
        if any(o.status == "loaded" for o in self.outcomes):
            lines.append(
                f"events loaded: {self.events:,}; duplicates dropped: {sum(o.duplicates for o in self.outcomes):,}; "
                f"lines rejected: {self.rejects:,}"
            )
        if any(o.deleted for o in self.outcomes):
            lines.append(f"events of deleted users left out: {sum(o.deleted for o in self.outcomes):,}")
        lines.extend(self.notes)
        lines.extend(f"FAILED {o.window}: {o.reason}" for o in self.failed)
        return "\n".join(lines)


@dataclass(frozen=True)
class Failure:
    """A window (down to one hour) that could not be fetched."""

    status: str  # failed or too_large
    reason: str
    attempts: int = 0  # HTTP requests spent on it, counting those of the windows it was split from
    split_from: Window | None = None  # the planned window it is a part of, when splits produced it


def _in_daemon_thread(function: Callable[..., Download], *args: Any, **kwargs: Any) -> Future[Download]:
    """Run one download in a daemon thread and return its future.

    Not a ThreadPoolExecutor: its threads are joined when the interpreter exits, so a Ctrl-C during a stalled
    request (or a retry loop's back-off) would wait for it. A daemon download that is cut off leaves only its
    `.part` file, which is never trusted and is fetched again by the next run.
    """
    future: Future[Download] = Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(function(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer through the future
            future.set_exception(exc)

    threading.Thread(target=target, name="fetch", daemon=True).start()
    return future


def fetch_windows(
    client: ExportClient,
    windows: Iterable[Window],
    raw_dir: Path,
    *,
    concurrency: int = 2,
    reporter: Reporter | None = None,
    fresh: set[Window] | None = None,
    live: bool = False,
) -> Iterator[tuple[Window, Download | Failure | LiveFile]]:
    """Fetch windows a few at a time and yield each result as it completes.

    A window that is too large (400, or a 504 that persisted) is replaced by its halves, down to one hour; an
    hour that still fails is yielded as a `Failure`. An AuthError stops everything at once. The generator only
    starts new downloads when its consumer asks for the next result, so a slow loader bounds the disk used.
    Windows in `fresh` (and their halves, which are added to it) are downloaded even if a copy is on disk.

    With `live`, while no download has completed, the first attempt of a running one is yielded as a `LiveFile`
    as soon as its body starts, so the consumer can load it while it downloads; its result is yielded later
    all the same (a consumer that loaded it skips it).

    A result's `attempts` counts every request its data took: its own, plus those of each window it was split
    from; its `split_from` is the window as planned (None when that window was fetched whole).
    """
    fresh = fresh if fresh is not None else set()
    reporter = reporter or Reporter()
    lineage: dict[Window, tuple[Window, int]] = {}  # a part -> (the planned window, requests spent above it)
    queue = list(windows)
    queue.reverse()  # pop() from the end keeps the planned order
    running: dict[Future[Download], Window] = {}
    offers: dict[Window, LiveFile] = {}  # first attempts that have started to arrive, not yet yielded

    def offer(window: Window) -> Callable[[LiveFile], None]:
        def take(file: LiveFile) -> None:
            if file.attempt == 1:
                offers[window] = file  # popped when yielded, or closed when its download completes unread
            else:
                file.close()
        return take

    try:
        while queue or running:
            while queue and len(running) < concurrency:
                window = queue.pop()
                running[_in_daemon_thread(client.fetch, window, raw_dir, on_bytes=reporter.add_bytes,
                                          fresh=window in fresh, on_live=offer(window) if live else None)] = window
            while not (done := wait(running, timeout=_LIVE_POLL if live else None, return_when=FIRST_COMPLETED)[0]):
                first = min(list(offers), default=None)  # a copy: a fetch thread may add to it meanwhile
                if first is not None:
                    file = offers.pop(first)
                    planned, spent = lineage.get(first, (None, 0))
                    file.attempts, file.split_from = file.attempt + spent, planned
                    yield first, file
            for future in sorted(done, key=lambda f: running[f]):
                window = running.pop(future)
                if (unread := offers.pop(window, None)) is not None:
                    unread.close()
                planned, spent = lineage.pop(window, (None, 0))
                try:
                    download = future.result()
                except WindowTooLargeError as exc:
                    if window.hours > 1:
                        halves = window.split()
                        log.warning("%s: %s; splitting into %s and %s", window, exc.reason, *halves)
                        reporter.add_windows(2)
                        reporter.window_done(f"{window}: split ({exc.reason})")
                        if window in fresh:
                            fresh.update(halves)
                        for half in halves:
                            lineage[half] = (planned or window, spent + exc.attempts)
                        queue.extend(reversed(halves))
                    elif exc.status == 400:
                        yield window, Failure(TOO_LARGE, f"{exc.reason} (for this hour alone: Amplitude's S3 "
                                                         "export has hours too large for the Export API)",
                                              spent + exc.attempts, planned)
                    else:
                        yield window, Failure(FAILED, exc.reason, spent + exc.attempts, planned)
                except TransientError as exc:
                    yield window, Failure(FAILED, f"gave up after {exc.attempts} attempts: {exc.reason}",
                                          spent + exc.attempts, planned)
                else:
                    if planned is not None:
                        download = replace(download, attempts=download.attempts + spent, split_from=planned)
                    yield window, download
    finally:
        for future in running:
            future.cancel()


_LIVE_POLL = 0.01  # seconds between looks for a download that has started, while none has completed


def landed_windows(raw_dir: Path, suffix: str = ".zip") -> set[Window]:
    """The windows named by the `<start>_<end><suffix>` files in `raw_dir`.

    `.zip` is a complete archive (a download lands as `.zip.part` and is renamed only once verified); `.empty`
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
        planned.extend(_runs([hour for hour in window.each_hour() if hour not in covered]))
    return sorted(planned)


def _warn_concurrency(concurrency: int) -> None:
    if concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    if concurrency > MAX_SAFE_CONCURRENCY:
        log.warning(
            "--concurrency %d is above Amplitude's limit of %d concurrent requests per project: expect 429s",
            concurrency,
            MAX_SAFE_CONCURRENCY,
        )


def _plan(start: str | None, end: str | None, now: datetime, lag_hours: float, window_hours: int,
          report: RunReport) -> list[Window]:
    first, last, ready = resolve_range(start, end, now=now, lag_hours=lag_hours)
    if ready < last:
        note = (
            f"hours after {label_hour(ready)} UTC are not exportable yet (Amplitude needs about "
            f"{lag_hours:g} h after an hour closes); stopping at {label_hour(ready)}"
        )
        if ready < first:
            note = f"nothing in {label_hour(first)}..{label_hour(last)} is exportable yet: try after " \
                   f"{label_hour(first + HOUR * (1 + lag_hours))} UTC"
        log.warning(note)
        report.notes.append(note)
    if ready < first:
        return []
    return plan_windows(first, ready, window_hours)


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
    _warn_concurrency(concurrency)
    raw_dir = data_dir / "raw"
    empty = landed_windows(raw_dir, ".empty")
    windows = plan_around_landed(_plan(start, end, now or datetime.now(UTC), lag_hours, window_hours, report),
                                 landed_windows(raw_dir) | empty)
    pending = [w for w in windows if w not in empty]
    for skipped in set(windows) - set(pending):
        report.outcomes.append(WindowOutcome(skipped, "empty", reason="recorded empty by an earlier run"))
    reporter.add_windows(len(windows))
    if len(pending) < len(windows):
        reporter.window_done("skipped windows recorded empty earlier", count=len(windows) - len(pending))
    for window, result in fetch_windows(client, pending, raw_dir, concurrency=concurrency, reporter=reporter):
        outcome = _fetch_outcome(window, result)
        if outcome.status == "empty":
            raw_dir.mkdir(parents=True, exist_ok=True)
            (raw_dir / f"{window.name}.empty").touch()
        report.outcomes.append(outcome)
        reporter.window_done(outcome.describe())
    report.outcomes.sort(key=lambda o: o.window)
    return report


def _fetch_outcome(window: Window, result: Download | Failure) -> WindowOutcome:
    if isinstance(result, Failure):
        return WindowOutcome(window, result.status, reason=result.reason, attempts=result.attempts)
    if result.status == EMPTY:
        return WindowOutcome(window, "empty", reason="no data (404)", attempts=result.attempts)
    return WindowOutcome(window, "cached" if result.status == CACHED else "landed", bytes=result.bytes,
                         attempts=result.attempts)


def pending_windows(
    ledger: dict[datetime, HourRecord], first: datetime, last: datetime, window_hours: int, *, refresh: bool = False
) -> list[Window]:
    """Windows over the hours of first..last that the ledger does not hold as loaded or empty.

    Hours already done are cut out, so a re-run asks only for what is missing; `refresh` asks for everything.
    """
    windows: list[Window] = []
    run_start: datetime | None = None
    hour = first
    while hour <= last + HOUR:
        done = hour > last or (not refresh and hour in ledger and ledger[hour].status in SKIPPED_STATUSES)
        if not done and run_start is None:
            run_start = hour
        if done and run_start is not None:
            windows.extend(plan_windows(run_start, hour - HOUR, window_hours))
            run_start = None
        hour += HOUR
    return windows


def load_window(
    sink: Sink,
    project: str,
    window: Window,
    archive: Path,
    *,
    run_id: str,
    data_dir: Path,
    workers: int = 2,
    keep_raw: bool = True,
    attempts: int = 1,
    split_from: Window | None = None,
    live: LiveFile | None = None,
    privacy: Privacy | None = None,
    drop_if_deleted: bool = True,
) -> WindowOutcome:
    """Read one landed archive and write it to the sink in one transaction.

    `attempts` (requests the archive took) and `split_from` (the planned window it is a part of) go into the
    hours' ledger rows. A broken archive is deleted (so the next run downloads it again) and its hours are
    marked failed. With `live`, the archive (its `.part` file) is read while it downloads (`live.py`) and the
    rows are committed once it has landed and passed its checks; if that gives up, the transaction is rolled
    back and StreamAbandoned raised, for the landed archive (or the download's failure) to go the usual way.
    With `privacy`, every batch and reject goes through it first; an archive that held rows of deleted users is
    then not kept, unless `drop_if_deleted` is False (the caller still reads it).
    """
    from .reader import WindowReader

    size = archive.stat().st_size if live is None else 0  # a `.part` may be gone already: its attempt failed
    reader = WindowReader(
        archive, window, run_id=run_id, rejects_dir=data_dir / "rejects", workers=workers, project=project,
        live=live, redact_reject=privacy.reject if privacy is not None else None,
    )
    batches = reader.batches() if privacy is None else privacy.apply(reader.batches())

    def finish() -> list[HourRecord]:
        records = reader.hour_records()
        for record in records:
            record.attempts = max(record.attempts, attempts)
            record.split_from = str(split_from) if split_from else None
        return records

    try:
        records = sink.write_window(project, window, batches, finish)
    except ArchiveError as exc:
        archive.unlink(missing_ok=True)
        reason = f"archive broken, will download again: {exc}"
        _record(sink, project, window, FAILED, run_id, reason=reason, attempts=attempts, split_from=split_from)
        return WindowOutcome(window, FAILED, reason=reason, bytes=size)
    finally:
        if live is not None:
            live.close()
    if live is not None:
        log.info("%s: loaded while it downloaded", window)
        size = reader.path.stat().st_size  # the landed archive
    if reader.rejects_total:
        log.warning("%s: %d lines rejected, see %s", window, reader.rejects_total, data_dir / "rejects")
    # the compiled parser's share: lines it gave to the msgspec path (invalid JSON, say) are read ~10x slower
    log.info("%s: %d of %d lines parsed by the compiled parser", window,
             reader.lines_total - reader.slow_lines, reader.lines_total)
    deleted = getattr(batches, "deleted_rows", 0)
    if deleted:
        log.info("%s: %d events of deleted users left out%s", window, deleted,
                 "; the archive is not kept" if keep_raw and drop_if_deleted else "")
    if not keep_raw or (deleted and drop_if_deleted):
        reader.path.unlink(missing_ok=True)
    return WindowOutcome(
        window,
        "loaded",
        events=sum(r.events_loaded for r in records),
        rejects=sum(r.rejects for r in records),
        duplicates=sum(r.duplicates for r in records),
        bytes=size,
        attempts=attempts,
        deleted=deleted,
    )


def _record(sink: Sink, project: str, window: Window, status: str, run_id: str, *, reason: str | None = None,
            attempts: int = 1, split_from: Window | None = None) -> None:
    """Ledger rows for every hour of a window that loaded nothing (failed, too large, empty)."""
    now = datetime.now(UTC)
    sink.record_hours(project, [
        HourRecord(hour=h, status=status, reason=reason, attempts=max(1, attempts),
                   split_from=str(split_from) if split_from else None, run_id=run_id, updated_at=now)
        for h in window.each_hour()
    ])


def incremental_start(ledger: dict[datetime, HourRecord]) -> datetime | None:
    """The hour after the last hour the ledger holds as done, or None for a destination never loaded."""
    done = [hour for hour, record in ledger.items() if record.status in DONE_STATUSES]
    return max(done) + HOUR if done else None


def _incremental_range(
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

    With `stream`, a window is loaded while it downloads when the loader would otherwise wait (`live.py`).

    With no `start`, continue from the hour after the last one loaded (the first run takes yesterday, or the day
    of `end` if that is earlier), up to the last ready hour (or `end`); hours failed by earlier runs are tried
    again, and the loaded and empty hours among the `lookback_hours` before the run's end are fetched again and
    reloaded only if Amplitude changed them (a 404 never removes loaded rows: see `_answered_404`). Archives
    already on disk are reused, not fetched again.

    `privacy` (PII controls) applies to every batch and reject; the users of the deletion jobs the destination
    applied are always left out. With PII controls, `keep_raw` defaults to False (archives hold the originals).
    """
    reporter = reporter or Reporter()
    moment = now or datetime.now(UTC)
    report = RunReport(run_id or new_run_id(moment))
    _warn_concurrency(concurrency)
    privacy, keep_raw = _privacy(sink, project, privacy, keep_raw, report, data_dir)
    ledger = sink.ledger(project)
    retry_hours: list[datetime] = []
    if start is None:
        first, last = _incremental_range(ledger, end, moment, lag_hours)
        retry_hours = sorted(h for h, r in ledger.items() if r.status == FAILED and h < first)
    else:
        first, last, _ = resolve_range(start, end, now=moment, lag_hours=lag_hours)
    ready = min(last, last_ready_hour(moment, lag_hours))
    windows: list[Window] = []
    if ready < last:
        note = (f"hours after {label_hour(ready)} UTC are not exportable yet (Amplitude needs about "
                f"{lag_hours:g} h after an hour closes); stopping at {label_hour(ready)}")
        log.warning(note)
        report.notes.append(note)
    if ready >= first:
        windows = pending_windows(ledger, first, ready, window_hours, refresh=refresh)
    elif start is None:
        report.notes.append(f"the destination is up to date (loaded through {label_hour(first - HOUR)})")
    windows += [Window(h, h) for h in retry_hours if not any(w.start <= h <= w.end for w in windows)]
    recheck: list[Window] = []
    if start is None and lookback_hours > 0:
        recheck = lookback_windows(ledger, min(ready, last), lookback_hours, window_hours, exclude=windows)
    too_large = sorted(h for h, r in ledger.items() if r.status == TOO_LARGE and first <= h <= ready)
    if too_large and not refresh:
        report.notes.append(
            f"{plural(len(too_large), 'hour')} the Export API refused with 400 even alone (`status` quotes its "
            "answer; Amplitude's S3 export has them): " + ", ".join(label_hour(h) for h in too_large[:10]))
    raw_dir = data_dir / "raw"
    windows = plan_around_landed(_fit(sorted(windows), ledger, size_budget), landed_windows(raw_dir))
    recheck = _fit(recheck, ledger, size_budget)
    reporter.add_windows(len(windows) + len(recheck))
    fresh = set(recheck)
    changed: list[datetime] = []
    streamed: set[Window] = set()
    for window, result in fetch_windows(client, sorted(windows + recheck), raw_dir, concurrency=concurrency,
                                        reporter=reporter, fresh=fresh, live=stream):
        if isinstance(result, LiveFile):
            if window in fresh:  # a re-check compares hashes of the landed archive first
                result.close()
                continue
            try:
                outcome = load_window(sink, project, window, result.path, run_id=report.run_id, data_dir=data_dir,
                                      workers=workers, keep_raw=keep_raw, attempts=result.attempts,
                                      split_from=result.split_from, live=result, privacy=privacy)
            except StreamAbandoned as exc:
                log.info("%s: stopped loading while downloading (%s); loading it once landed", window, exc)
                continue
            streamed.add(window)
        elif window in streamed:
            continue  # loaded while it downloaded
        elif isinstance(result, Failure):
            if window in fresh:  # a failed re-check leaves the loaded rows as they are
                outcome = WindowOutcome(window, "recheck_failed", reason=result.reason)
            else:
                _record(sink, project, window, result.status, report.run_id, reason=result.reason,
                        attempts=result.attempts, split_from=result.split_from)
                outcome = WindowOutcome(window, result.status, reason=result.reason, attempts=result.attempts)
        elif result.status == EMPTY:
            outcome = _answered_404(sink, project, ledger, window, result, report, recheck=window in fresh)
        elif window in fresh:
            assert result.path is not None
            outcome, hours = _recheck_window(sink, project, ledger, window, result.path, run_id=report.run_id,
                                             data_dir=data_dir, workers=workers, keep_raw=keep_raw,
                                             attempts=max(1, result.attempts), split_from=result.split_from,
                                             privacy=privacy)
            changed += hours
        else:
            assert result.path is not None
            outcome = load_window(sink, project, window, result.path, run_id=report.run_id, data_dir=data_dir,
                                  workers=workers, keep_raw=keep_raw, attempts=max(1, result.attempts),
                                  split_from=result.split_from, privacy=privacy)
        report.outcomes.append(outcome)
        reporter.window_done(outcome.describe())
    if recheck:
        report.changed_hours = sorted(changed)
        if changed:
            note = (f"{plural(len(changed), 'hour')} changed since last run: "
                    + ", ".join(label_hour(h) for h in sorted(changed)) + " (reloaded)")
        else:
            rechecked = sum(w.hours for w in recheck)
            note = (f"lookback: the {plural(rechecked, 'hour')} re-checked (loaded or empty) "
                    f"{'is' if rechecked == 1 else 'are'} unchanged")
        log.info(note)
        report.notes.append(note)
    report.outcomes.sort(key=lambda o: o.window)
    return report


NOT_FOUND = "the Export API answered 404 (no data)"


def _answered_404(sink: Sink, project: str, ledger: dict[datetime, HourRecord], window: Window, result: Download,
                  report: RunReport, *, recheck: bool) -> WindowOutcome:
    """Record a window that answered 404: its hours are empty, except those the ledger holds as loaded.

    A 404 is weak evidence: Amplitude has answered 404 for hours that later had data, and a wrong host answers
    404 for everything. So loaded hours keep their rows and ledger rows, and if they held events the run warns
    loudly (log, stderr and its summary); the lookback asks empty hours again.
    """
    held = [hour for hour in window.each_hour() if (r := ledger.get(hour)) is not None and r.status == LOADED]
    events = sum(ledger[hour].events_loaded for hour in held)
    for part in _runs([hour for hour in window.each_hour() if hour not in held]):
        _record(sink, project, part, LEDGER_EMPTY, report.run_id, reason=NOT_FOUND, attempts=result.attempts,
                split_from=result.split_from)
    if events:
        note = (f"{window}: the Export API answered 404 (no data) for hours the ledger holds {events:,} events "
                "of: their rows are kept; if this persists, check --base-url and the project's keys")
        log.warning(note)
        report.notes.append(f"WARNING {note}")
        return WindowOutcome(window, "kept", reason="404 for hours loaded with events; rows kept",
                             attempts=result.attempts)
    if recheck:
        return WindowOutcome(window, "unchanged", reason="404 on re-check", attempts=result.attempts)
    return WindowOutcome(window, "empty", reason="no data (404)", attempts=result.attempts)


def lookback_windows(
    ledger: dict[datetime, HourRecord], end: datetime, lookback_hours: int, window_hours: int,
    *, exclude: list[Window],
) -> list[Window]:
    """Windows over the loaded and empty hours among the `lookback_hours` up to `end` that this run does not load
    anyway: Amplitude re-exports loaded hours, and has answered 404 for hours that later had data."""
    windows: list[Window] = []
    run_start: datetime | None = None
    hour = end - HOUR * (lookback_hours - 1)
    while hour <= end + HOUR:
        record = ledger.get(hour)
        wanted = (hour <= end and record is not None and record.status in DONE_STATUSES
                  and not any(w.start <= hour <= w.end for w in exclude))
        if wanted and run_start is None:
            run_start = hour
        if not wanted and run_start is not None:
            windows.extend(plan_windows(run_start, hour - HOUR, window_hours))
            run_start = None
        hour += HOUR
    return windows


def _recheck_window(
    sink: Sink, project: str, ledger: dict[datetime, HourRecord], window: Window, archive: Path, *,
    run_id: str, data_dir: Path, workers: int, keep_raw: bool, attempts: int = 1, split_from: Window | None = None,
    privacy: Privacy | None = None,
) -> tuple[WindowOutcome, list[datetime]]:
    """Compare each hour's content hash with the ledger; reload only the runs of hours that changed (an hour the
    ledger holds as empty changed if it has members now)."""
    from .archive import content_hash, list_members

    members = list_members(archive)
    changed = []
    for hour in window.each_hour():
        record = ledger.get(hour)
        own = [m for m in members if m.upload_hour == hour]
        if record is not None and record.status == LEDGER_EMPTY and not own:
            continue
        if record is None or record.content_hash != content_hash(archive, own):
            changed.append(hour)
    outcome = WindowOutcome(window, "unchanged", bytes=archive.stat().st_size)
    for run_window in _runs(changed):
        loaded = load_window(sink, project, run_window, archive, run_id=run_id, data_dir=data_dir,
                             workers=workers, keep_raw=True, attempts=attempts, split_from=split_from,
                             privacy=privacy, drop_if_deleted=False)
        outcome.events += loaded.events
        outcome.deleted += loaded.deleted
        outcome.duplicates += loaded.duplicates
        outcome.rejects += loaded.rejects
        if loaded.status != "loaded":
            outcome.status, outcome.reason = loaded.status, loaded.reason
    if changed and outcome.status == "unchanged":
        outcome.status = "reloaded"
        outcome.reason = f"{plural(len(changed), 'hour')} changed: " + ", ".join(label_hour(h) for h in changed)
    if not keep_raw or outcome.deleted or (privacy is not None and privacy.deleted and _holds(archive, privacy)):
        archive.unlink(missing_ok=True)  # a kept archive never holds deleted users' events, reloaded or not
    return outcome, changed


def _holds(archive: Path, privacy: Privacy) -> bool:
    from .deletions import names_any

    return names_any(archive, privacy.deleted)


def _runs(hours: list[datetime]) -> list[Window]:
    """Consecutive hours as windows."""
    windows: list[Window] = []
    for hour in sorted(hours):
        if windows and windows[-1].end + HOUR == hour:
            windows[-1] = Window(windows[-1].start, hour)
        else:
            windows.append(Window(hour, hour))
    return windows


def hour_size_estimator(ledger: dict[datetime, HourRecord], measure: str = "bytes") -> Callable[[datetime], int]:
    """Each hour's archive bytes (or another HourRecord count, e.g. `lines_read`) as last seen; an hour never
    seen is guessed from the recent loaded hours."""
    known = {h: getattr(r, measure) for h, r in ledger.items() if r.status == LOADED and getattr(r, measure)}
    recent = [known[h] for h in sorted(known)[-48:]]
    guess = int(sum(recent) / len(recent)) if recent else 0
    return lambda hour: known.get(hour, guess)


def _fit(windows: list[Window], ledger: dict[datetime, HourRecord], size_budget: int) -> list[Window]:
    """Windows cut to `size_budget` bytes of archive and to the lines a sink deduplicates in memory: past
    `SEEN_LIMIT` uuids a window's repeats are removed in SQL, about twice as slow (measured: 28 s against 13.5 s
    for a 1.9 M-event window into DuckDB). Both from what the ledger saw of each hour."""
    from .sinks import SEEN_LIMIT

    windows = fit_budget(windows, hour_size_estimator(ledger), size_budget)
    return fit_budget(windows, hour_size_estimator(ledger, "lines_read"), SEEN_LIMIT * 9 // 10)


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
    and `keep_raw` as for `run`)."""
    reporter = reporter or Reporter()
    report = RunReport(run_id or new_run_id())
    privacy, keep_raw = _privacy(sink, project, privacy, keep_raw, report, data_dir)
    ledger = sink.ledger(project)
    raw_dir = data_dir / "raw"
    archives: list[tuple[Window, Path]] = []
    for path in sorted(raw_dir.glob("*.zip")) if raw_dir.is_dir() else []:
        try:
            window = Window.from_name(path.name.removesuffix(".zip"))
        except AmplitudeExportError:
            log.warning("skipping %s: its name is not <start>_<end>.zip", path.name)
            continue
        done = all(h in ledger and ledger[h].status in DONE_STATUSES for h in window.each_hour())
        if refresh or not done:
            archives.append((window, path))
    reporter.add_windows(len(archives))
    for window, path in archives:
        outcome = load_window(sink, project, window, path, run_id=report.run_id, data_dir=data_dir,
                              workers=workers, keep_raw=keep_raw, privacy=privacy)
        report.outcomes.append(outcome)
        reporter.window_done(outcome.describe())
    if not archives:
        report.notes.append(f"no archives to load under {raw_dir}")
    return report


def _privacy(sink: Sink, project: str, privacy: Privacy | None, keep_raw: bool | None, report: RunReport,
             data_dir: Path) -> tuple[Privacy | None, bool]:
    """The controls a load applies (`privacy` plus the users the destination's deletion jobs removed) and whether
    archives are kept: by default not with PII controls, and if so with a warning."""
    from .deletions import deleted_users

    pii = privacy is not None and privacy.pii
    if keep_raw is None:
        keep_raw = not pii
    elif keep_raw and pii:
        note = (f"WARNING raw archives under {data_dir / 'raw'} are kept (--keep-raw): they hold the original values "
                "of the excluded and hashed columns")
        log.warning(note.removeprefix("WARNING "))
        report.notes.append(note)
    deleted = deleted_users(sink, project)
    if deleted:
        privacy = (privacy or Privacy()).with_deleted(deleted)
    if privacy is not None and privacy.active:
        log.info("privacy: %s", privacy.describe())
        return privacy, keep_raw
    return None, keep_raw

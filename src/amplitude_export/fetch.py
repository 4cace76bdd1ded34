"""The fetch scheduler: planned windows in, one `Fetch` per window out, a few downloads at a time.

A window too large for one request is replaced by its halves, down to one hour; each `Fetch` says what its window
cost in requests (with those of the windows it was split from) and which planned window it is a part of. With
`live`, a download that has started while none has completed is handed over as it arrives (`live.py`), so that
the loader need not wait for a whole archive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path

from .client import EMPTY, Download, ExportClient
from .errors import TransientError, UsageError, WindowTooLargeError
from .ledger import FAILED, TOO_LARGE
from .live import LiveFile
from .progress import Reporter
from .threads import in_daemon_thread
from .windows import Window

log = logging.getLogger(__name__)

MAX_SAFE_CONCURRENCY = 5  # Amplitude allows 5 concurrent REST requests per project
STREAMING = "streaming"  # the download is under way: `Fetch.live` reads it as it arrives
_LIVE_POLL = 0.01  # seconds between looks for a download that has started, while none has completed


@dataclass(frozen=True)
class Fetch:
    """What fetching one window gave.

    `status` is the client's (`ok`: landed now, `cached`: landed by an earlier run, `empty`: 404), the ledger's
    `failed` or `too_large` (with `reason`), or `streaming` (`live` is the running download). `attempts` counts
    every request its data took, those of the windows it was split from included; `split_from` is the window as
    planned (None when that window was fetched whole); `fresh` says it was fetched again although landed before.
    """

    window: Window
    status: str
    path: Path | None = None
    bytes: int = 0
    attempts: int = 0
    split_from: Window | None = None
    reason: str | None = None
    fresh: bool = False
    live: LiveFile | None = None

    @property
    def failed(self) -> bool:
        """Retries and splits did not get the window: `reason` says why."""
        return self.status in (FAILED, TOO_LARGE)

    @property
    def empty(self) -> bool:
        """The Export API answered 404: no data in the window (or a wrong host)."""
        return self.status == EMPTY


def check_concurrency(concurrency: int) -> None:
    """Refuse a concurrency below 1; warn above what Amplitude allows per project."""
    if concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    if concurrency > MAX_SAFE_CONCURRENCY:
        log.warning(
            "--concurrency %d is above Amplitude's limit of %d concurrent requests per project: expect 429s",
            concurrency,
            MAX_SAFE_CONCURRENCY,
        )


def fetch_windows(
    client: ExportClient,
    windows: Iterable[Window],
    raw_dir: Path,
    *,
    concurrency: int = 2,
    reporter: Reporter | None = None,
    fresh: Iterable[Window] = (),
    live: bool = False,
    refetch: bool = False,
) -> Iterator[Fetch]:
    """Fetch windows a few at a time and yield each one's `Fetch` as it completes.

    A window that is too large (400, or a 504 that persisted) is replaced by its halves, down to one hour; an
    hour that still fails is yielded as `failed` or `too_large`. An AuthError stops everything at once. New
    downloads start only when the consumer asks for the next result, so a slow loader bounds the disk used.
    Windows in `fresh` (and their halves) are downloaded even if a copy is on disk, to be compared with what was
    loaded (a re-check); with `refetch`, every window is.

    With `live`, while no download has completed, the first attempt of a running one is yielded as `streaming`
    as soon as its body starts; its window is yielded again once fetched (a consumer that loaded it skips it).
    """
    fresh = set(fresh)
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

    def start(window: Window) -> Future[Download]:
        on_live = offer(window) if live else None
        return in_daemon_thread(
            lambda: client.fetch(window, raw_dir, on_bytes=reporter.add_bytes, fresh=refetch or window in fresh,
                                 on_live=on_live),
            name="fetch",
        )

    try:
        while queue or running:
            while queue and len(running) < concurrency:
                window = queue.pop()
                running[start(window)] = window
            while not (done := wait(running, timeout=_LIVE_POLL if live else None, return_when=FIRST_COMPLETED)[0]):
                first = min(list(offers), default=None)  # a copy: a fetch thread may add to it meanwhile
                if first is not None:
                    file = offers.pop(first)
                    planned, spent = lineage.get(first, (None, 0))
                    attempts = file.attempt + spent
                    yield Fetch(first, STREAMING, file.path, 0, attempts, planned, fresh=first in fresh, live=file)
            for future in sorted(done, key=lambda f: running[f]):
                window = running.pop(future)
                if (unread := offers.pop(window, None)) is not None:
                    unread.close()
                planned, spent = lineage.pop(window, (None, 0))
                try:
                    fetched = _settled(window, future, planned, spent, fresh=window in fresh)
                except WindowTooLargeError as exc:
                    halves = window.split()
                    log.warning("%s: %s; splitting into %s and %s", window, exc.reason, *halves)
                    reporter.add_windows(2)
                    reporter.window_done(f"{window}: split ({exc.reason})")
                    if window in fresh:
                        fresh.update(halves)
                    for half in halves:
                        lineage[half] = (planned or window, spent + exc.attempts)
                    queue.extend(reversed(halves))
                else:
                    yield fetched
    finally:
        for future in running:
            future.cancel()


def _settled(window: Window, future: Future[Download], planned: Window | None, spent: int, *, fresh: bool) -> Fetch:
    """The `Fetch` of a completed download; raises WindowTooLargeError for a window of more than one hour, which
    is to be split."""
    try:
        download = future.result()
    except WindowTooLargeError as exc:
        if window.hours > 1:
            raise
        reason = exc.reason
        if exc.status == 400:
            reason += " (for this hour alone: Amplitude's S3 export has hours too large for the Export API)"
        status = TOO_LARGE if exc.status == 400 else FAILED
        return Fetch(window, status, attempts=spent + exc.attempts, split_from=planned, reason=reason, fresh=fresh)
    except TransientError as exc:
        reason = f"gave up after {exc.attempts} attempts: {exc.reason}"
        return Fetch(window, FAILED, attempts=spent + exc.attempts, split_from=planned, reason=reason, fresh=fresh)
    attempts = download.attempts + spent if planned is not None else download.attempts
    return Fetch(window, download.status, download.path, download.bytes, attempts, planned, fresh=fresh)

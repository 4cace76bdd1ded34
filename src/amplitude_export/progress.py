"""Progress display: rich bars (windows and bytes) on a terminal, plain log lines everywhere else."""

from __future__ import annotations

import logging
import sys
import threading
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported by the bars only: a run without them (cron, CI) does not pay its import
    from rich.console import Console
    from rich.progress import TaskID

log = logging.getLogger(__name__)


class Reporter:
    """Counts windows and bytes. The base class only logs; `RichReporter` also draws bars."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.windows_total = 0
        self.windows_done = 0
        self.bytes_done = 0

    def __enter__(self) -> Reporter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def add_windows(self, count: int) -> None:
        """More windows to do (the plan, or the halves of a split)."""
        with self._lock:
            self.windows_total += count

    def add_bytes(self, count: int) -> None:
        """Bytes downloaded; called from download threads."""
        with self._lock:
            self.bytes_done += count

    def window_done(self, message: str, *, count: int = 1) -> None:
        """A window finished (landed, loaded, empty, failed, or replaced by its halves)."""
        with self._lock:
            self.windows_done += count
            done, total = self.windows_done, self.windows_total
        log.info("[%d/%d] %s", done, total, message)


class RichReporter(Reporter):
    """Bars for a person at a terminal; messages still go to the log file."""

    def __init__(self, console: Console | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        super().__init__()
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._windows: TaskID | None = None
        self._bytes: TaskID | None = None

    def __enter__(self) -> RichReporter:
        self._progress.start()
        self._windows = self._progress.add_task("windows", total=0)
        self._bytes = self._progress.add_task("download", total=None)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    def add_windows(self, count: int) -> None:
        super().add_windows(count)
        if self._windows is not None:
            self._progress.update(self._windows, total=self.windows_total)

    def add_bytes(self, count: int) -> None:
        super().add_bytes(count)
        if self._bytes is not None:
            self._progress.update(
                self._bytes, completed=self.bytes_done, description=f"download {self.bytes_done / 1e6:,.1f} MB"
            )

    def window_done(self, message: str, *, count: int = 1) -> None:
        super().window_done(message, count=count)
        if self._windows is not None:
            self._progress.update(self._windows, completed=self.windows_done)


def make_reporter(show_progress: bool | None = None) -> Reporter:
    """Rich bars when stderr is a terminal (or when asked), log lines otherwise."""
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    return RichReporter() if show_progress else Reporter()

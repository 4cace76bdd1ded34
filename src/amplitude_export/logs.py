"""Logging: a file per run in the log directory, and the console (rich on a terminal, plain otherwise)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import stamina.instrumentation

from .progress import Reporter, RichReporter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The error that ends a run: the CLI prints it on stderr itself, so this logger writes to the run's log file only
# (and, before `setup_logging` or outside the CLI, nowhere).
FATAL = logging.getLogger("amplitude_export.fatal")
FATAL.propagate = False
FATAL.addHandler(logging.NullHandler())


class _AsDebug(logging.Handler):
    """Hands a library's records to `target` as DEBUG, or drops them when there is no target.

    psycopg warns on stderr about errors it ignores while the real one propagates ("error ignored terminating
    <psycopg.Pipeline ...>"); that one becomes our single `error:` line, and these are detail for --verbose.
    """

    def __init__(self, target: logging.Handler | None) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        if self.target is not None and record.levelno >= self.target.level:
            self.target.handle(record)


def setup_logging(
    log_dir: Path | None, run_id: str, *, reporter: Reporter | None = None, verbose: bool = False
) -> Path | None:
    """Send the package's log to `log_dir/<run_id>.log` (INFO and up) and to stderr; return the file's path.

    On a terminal with progress bars the console shows warnings only (the bars say the rest); otherwise each
    window's line is printed, so cron mail and CI logs read like the bars would. The driver's own warnings
    (psycopg) go to the file as DEBUG only; the error that ends a run (`FATAL`) goes to the file only.
    """
    # stamina would also log a bare "stamina.retry_scheduled"; our own warning names the window and reason
    stamina.instrumentation.set_on_retry_hooks([])
    logger = logging.getLogger("amplitude_export")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    driver = logging.getLogger("psycopg")
    driver.propagate = False
    _remove_handlers(logger)
    _remove_handlers(FATAL, logging.FileHandler)
    _remove_handlers(driver, _AsDebug)
    logger.propagate = False
    console_level = logging.DEBUG if verbose else logging.INFO
    if isinstance(reporter, RichReporter):
        from rich.logging import RichHandler

        console: logging.Handler = RichHandler(console=reporter.console, show_path=False, markup=False)
        console.setLevel(logging.WARNING if not verbose else logging.DEBUG)
    else:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        console.setLevel(console_level)
    logger.addHandler(console)
    if log_dir is None:
        driver.addHandler(_AsDebug(None))
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{run_id}.log"
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(FORMAT))
    file_handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.addHandler(file_handler)
    FATAL.addHandler(file_handler)
    driver.addHandler(_AsDebug(file_handler))
    return path


def _remove_handlers(owner: logging.Logger, kind: type[logging.Handler] = logging.Handler) -> None:
    """Detach and close `owner`'s handlers of type `kind` (those an earlier `setup_logging` added)."""
    for handler in list(owner.handlers):
        if isinstance(handler, kind):
            owner.removeHandler(handler)
            handler.close()

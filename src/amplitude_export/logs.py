"""Logging: a file per run in the log directory, and the console (rich on a terminal, plain otherwise)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import stamina.instrumentation

from .errors import StorageError
from .progress import Reporter, RichReporter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The error that ends a run: the CLI prints it on stderr itself, so this logger writes to the run's log file only
# (and, before `setup_logging` or outside the CLI, nowhere).
FATAL = logging.getLogger("amplitude_export.fatal")
FATAL.propagate = False
FATAL.addHandler(logging.NullHandler())


class _Once(logging.Filter):
    """Lets a message through once in a row: a sink may log the error that ends a run before the CLI does."""

    def __init__(self) -> None:
        super().__init__()
        self.last: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        fresh, self.last = message != self.last, message
        return fresh


_ONCE = _Once()
FATAL.addFilter(_ONCE)


class RunLogHandler(logging.FileHandler):
    """The run's log file. A write that fails (a full disk) does not print logging's traceback: the handler
    keeps the error (`failure`), stops writing, and the CLI ends the run with it (exit 4)."""

    failure: StorageError | None = None

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handleError(record)
            return
        if self.failure is None:
            self.failure = StorageError.from_os_error(exc, self.baseFilename)
        stream, self.stream = self.stream, None
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass

    def emit(self, record: logging.LogRecord) -> None:
        if self.failure is None:
            super().emit(record)


def log_failure() -> StorageError | None:
    """The error that stopped the run's log file from being written, if one did."""
    for handler in logging.getLogger("amplitude_export").handlers:
        if isinstance(handler, RunLogHandler) and handler.failure is not None:
            return handler.failure
    return None


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
    _ONCE.last = None  # a new run's log starts afresh
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
    path = log_dir / f"{run_id}.log"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        file_handler = RunLogHandler(path, encoding="utf-8")
    except OSError as exc:
        raise StorageError.from_os_error(exc, path) from None
    file_handler.setFormatter(logging.Formatter(FORMAT))
    file_handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.addHandler(file_handler)
    FATAL.addHandler(file_handler)
    driver.addHandler(_AsDebug(file_handler))
    return path


def discard_run_log(path: Path | None) -> None:
    """Close the run's log file and delete it: for a command refused as bad input, which leaves nothing behind."""
    for name in ("amplitude_export", FATAL.name, "psycopg"):
        _remove_handlers(logging.getLogger(name), RunLogHandler)
        _remove_handlers(logging.getLogger(name), _AsDebug)
    if path is not None:
        path.unlink(missing_ok=True)


def _remove_handlers(owner: logging.Logger, kind: type[logging.Handler] = logging.Handler) -> None:
    """Detach and close `owner`'s handlers of type `kind` (those an earlier `setup_logging` added)."""
    for handler in list(owner.handlers):
        if isinstance(handler, kind):
            owner.removeHandler(handler)
            handler.close()

"""Logging: a file per run in the log directory, and the console (rich on a terminal, plain otherwise)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import stamina.instrumentation
from rich.logging import RichHandler

from .progress import Reporter, RichReporter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(
    log_dir: Path | None, run_id: str, *, reporter: Reporter | None = None, verbose: bool = False
) -> Path | None:
    """Send the package's log to `log_dir/<run_id>.log` (INFO and up) and to stderr; return the file's path.

    On a terminal with progress bars the console shows warnings only (the bars say the rest); otherwise each
    window's line is printed, so cron mail and CI logs read like the bars would.
    """
    # stamina would also log a bare "stamina.retry_scheduled"; our own warning names the window and reason
    stamina.instrumentation.set_on_retry_hooks([])
    logger = logging.getLogger("amplitude_export")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    console_level = logging.DEBUG if verbose else logging.INFO
    if isinstance(reporter, RichReporter):
        console: logging.Handler = RichHandler(console=reporter.console, show_path=False, markup=False)
        console.setLevel(logging.WARNING if not verbose else logging.DEBUG)
    else:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        console.setLevel(console_level)
    logger.addHandler(console)
    if log_dir is None:
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{run_id}.log"
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(FORMAT))
    file_handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.addHandler(file_handler)
    return path

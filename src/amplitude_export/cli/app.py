"""The command group, the mapping of our errors to one line and an exit code, and the process's way out."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import click

from .. import __version__
from ..errors import EXIT_INTERRUPTED, AmplitudeExportError, DestinationBusyError, StorageError
from .interrupts import INTERRUPTED, interrupted
from .options import F, redact

EXIT_CODES = """\b
Exit codes:
  0  done
  1  some windows failed (the rest completed; the next run retries them)
  2  bad input: dates, flags, paths, ports, base or destination URL (nothing is created)
  3  Amplitude refused the credentials (check the keys, and the region)
  4  the data dir, log dir or destination cannot be written (e.g. no space left)
  5  another run holds the destination (--wait queues instead); on iceberg: and delta:,
     other runs' commits won every attempt of one window (run again)
  130 interrupted"""
LOGS = "amplitude_export.logs"


def _fail(message: str, code: int) -> None:
    logs = sys.modules.get(LOGS)
    if logs is not None:  # the run's log file, once a command has opened one
        logs.FATAL.error("%s", message)
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _message(exc: AmplitudeExportError) -> str:
    """The error's line; a busy destination says how to queue, where the command can."""
    message = str(exc)
    context = click.get_current_context(silent=True)
    can_wait = context is not None and any(param.name == "wait" for param in context.command.params)
    if isinstance(exc, DestinationBusyError) and exc.queues and can_wait and "--wait" not in message:
        message += "; pass --wait to queue behind it"
    return message


def _check_log(code: int | str | None) -> None:
    """End with exit 4 if the run's log file could not be written (the run itself went on without it)."""
    logs = sys.modules.get(LOGS)
    failure = logs.log_failure() if logs is not None else None
    if failure is not None and code in (0, 1, None):
        _fail(str(failure), failure.exit_code)


def reports_errors(func: F) -> F:
    """Turn our errors into one line on stderr (and in the run's log) and their exit code, never a traceback for
    expected errors. An OSError that reaches here (a file that cannot be written) is exit 4, like a full disk."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = func(*args, **kwargs)
        except SystemExit as exc:
            _check_log(exc.code)
            raise
        except BaseException as exc:
            # after a Ctrl-C, whatever ends the command says so: a library that noticed it may raise its own
            # error in the KeyboardInterrupt's place (DuckDB's "Query interrupted" from inside a commit)
            if isinstance(exc, KeyboardInterrupt) or interrupted.is_set():
                _stop_interrupts()
                _fail(INTERRUPTED, EXIT_INTERRUPTED)
            if isinstance(exc, AmplitudeExportError):
                _fail(redact(_message(exc)), exc.exit_code)
            if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):  # `| head`: nowhere to say it
                error = StorageError.from_os_error(exc)
                _fail(redact(str(error)), error.exit_code)
            raise
        _check_log(0)
        return result

    return wrapper  # type: ignore[return-value]


class _OneLineError(click.ClickException):
    """A bad flag value, shown as one `error:` line with exit code 2 like every other bad input."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


@contextlib.contextmanager
def _in_one_line() -> Iterator[None]:
    """Turn click's usage errors (a bad flag, an unknown command) into our one `error:` line with exit 2."""
    try:
        yield
    except click.UsageError as exc:
        raise _OneLineError(exc.format_message()) from None


@contextlib.contextmanager
def _as_interrupted() -> Iterator[None]:
    """A Ctrl-C outside the command's own function (as click parses the flags): our line and exit 130, where
    click would print "Aborted!" and exit 1."""
    try:
        yield
    except KeyboardInterrupt:
        _stop_interrupts()
        _fail(INTERRUPTED, EXIT_INTERRUPTED)


class _OneLineErrors(click.Command):
    """A command whose flags that do not parse get one line and exit 2, not click's usage block."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with _in_one_line():
            return super().parse_args(ctx, args)


class _OneLineGroup(click.Group):
    """The command group: an unknown command, and every subcommand's bad flags, are one line and exit 2; a
    Ctrl-C while they are parsed is one line and exit 130."""

    command_class = _OneLineErrors

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with _in_one_line():
            return super().parse_args(ctx, args)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        with _in_one_line():
            return super().resolve_command(ctx, args)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _as_interrupted():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:  # the subcommand's context is made in here
        with _as_interrupted():
            return super().invoke(ctx)


@click.group(cls=_OneLineGroup, epilog=EXIT_CODES)
@click.version_option(__version__, prog_name="amplitude-export")
def cli() -> None:
    """Move raw events out of Amplitude's Export API into DuckDB, Parquet, Iceberg, Delta Lake or PostgreSQL,
    exactly once.

    \b
    Example:
      export AMP_API_KEY=... AMP_SECRET_KEY=...
      amplitude-export run --start 2024-03-01 --end 2024-03-07
      amplitude-export demo
    """


def main() -> None:
    """Run the command line, once `cli.main` has installed the Ctrl-C handler and imported the commands."""
    try:
        from ..tuning import tune_for_bulk_loading

        tune_for_bulk_loading()  # imports pyarrow: Ctrl-C here waits for the import, then ends the process below
        cli(prog_name="amplitude-export")
    except KeyboardInterrupt:
        _stop_interrupts()
        click.echo(f"error: {INTERRUPTED}", err=True)
        _exit_without_teardown(SystemExit(EXIT_INTERRUPTED))
    except SystemExit as exc:
        _exit_without_teardown(exc)


def _stop_interrupts(handler: Any = signal.SIG_IGN) -> None:
    """After the command has ended, a second Ctrl-C (or the handler's own re-sent signal) must not turn the
    words that say how it ended into a traceback: ignore it, or run `handler`."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)


def _exit_without_teardown(exc: SystemExit) -> None:
    """End the process once the command has returned, skipping the interpreter's teardown: freeing the modules
    and a loaded window's objects one by one took ~50 ms of a 3 s run (measured, docs/PARSE_DESIGN.md). By then
    the command has committed and closed its destination; what is left to do is done here: join any non-daemon
    thread, close the log files, flush stdout and stderr. Worker processes still alive take the usual way out.
    """
    _stop_interrupts(lambda *_: os._exit(EXIT_INTERRUPTED))  # what is left may wait on threads: let Ctrl-C end it
    code = exc.code
    multiprocessing = sys.modules.get("multiprocessing")
    if (multiprocessing is not None and multiprocessing.active_children()) or not isinstance(code, int | None):
        raise exc
    pools = sys.modules.get("concurrent.futures.thread")
    if pools is not None:  # a library's thread pool (pyiceberg's): its idle workers wait for this word to leave
        pools._python_exit()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`): nothing more can be said there
            pass
    os._exit(code or 0)

"""The command line: a thin skin over the library. Each command parses options, calls one function, and maps
errors to exit codes.

Exit codes: 0 done; 1 some windows failed (or `verify` found problems): the rest completed and the next run
retries them; 2 bad input (dates, flags, a directory that cannot be created, a busy port, destination URL),
refused before anything is created; 3 Amplitude refused the credentials; 4 the data dir, log dir or destination
cannot be opened or written (a full disk); 5 another run holds the destination; 130 interrupted.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import click

from . import __version__
from .config import REGION_HOSTS, load_credentials
from .errors import EXIT_INTERRUPTED, AmplitudeExportError, DestinationBusyError, StorageError, UsageError

if TYPE_CHECKING:
    from datetime import date, datetime

    from .config import Credentials
    from .sinks import Sink

log = logging.getLogger("amplitude_export")

F = TypeVar("F", bound=Callable[..., Any])
WAIT_POLL_SECONDS = 1.0  # how often --wait tries the destination's lock again

EXIT_CODES = """\b
Exit codes:
  0  done
  1  some windows failed (the rest completed; the next run retries them)
  2  bad input: dates, flags, paths, ports, base or destination URL (nothing is created)
  3  Amplitude refused the credentials (check the keys, and the region)
  4  the data dir, log dir or destination cannot be written (e.g. no space left)
  5  another run holds the destination (--wait queues instead)
  130 interrupted"""


def _fail(message: str, code: int) -> None:
    logs = sys.modules.get(f"{__package__}.logs")
    if logs is not None:  # the run's log file, once a command has opened one
        logs.FATAL.error("%s", message)
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _message(exc: AmplitudeExportError) -> str:
    """The error's line; a busy destination says how to queue, where the command can."""
    message = str(exc)
    context = click.get_current_context(silent=True)
    can_wait = context is not None and any(param.name == "wait" for param in context.command.params)
    if isinstance(exc, DestinationBusyError) and can_wait and "--wait" not in message:
        message += "; pass --wait to queue behind it"
    return message


def _check_log(code: int | str | None) -> None:
    """End with exit 4 if the run's log file could not be written (the run itself went on without it)."""
    logs = sys.modules.get(f"{__package__}.logs")
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
        except AmplitudeExportError as exc:
            _fail(_redact(_message(exc)), exc.exit_code)
        except OSError as exc:
            if isinstance(exc, BrokenPipeError):  # stdout closed (`| head`): nothing to say, nowhere to say it
                raise
            error = StorageError.from_os_error(exc)
            _fail(_redact(str(error)), error.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; a re-run picks up where this one stopped", EXIT_INTERRUPTED)
        except SystemExit as exc:
            _check_log(exc.code)
            raise
        _check_log(0)
        return result

    return wrapper  # type: ignore[return-value]


def credential_options(func: F) -> F:
    """--api-key, --secret-key, --region, --base-url: flags win over AMP_* variables and .env."""
    func = click.option("--base-url", help="Override the host (a proxy, the fake server). Env: AMP_BASE_URL.")(func)
    func = click.option(
        "--region", type=click.Choice(sorted(REGION_HOSTS)), default=None,
        help="us = amplitude.com (default), eu = analytics.eu.amplitude.com. Env: AMP_REGION.",
    )(func)
    func = click.option("--secret-key", help="Secret key. Env: AMP_SECRET_KEY (or .env).", show_default=False)(func)
    func = click.option("--api-key", help="API key. Env: AMP_API_KEY (or .env).")(func)
    return func


def range_options(func: F) -> F:
    """--start/--end and the knobs of fetching."""
    options = [
        click.option("--start", help="First UTC upload hour: YYYYMMDDTHH, YYYYMMDD, YYYY-MM-DD or YYYY-MM-DDTHH."),
        click.option("--end", help="Last UTC upload hour, inclusive (a bare date means its hour 23)."),
        click.option("--window-hours", type=click.IntRange(min=1), default=24, show_default=True,
                     help="Hours per request (windows of 24+ hours start at midnight)."),
        click.option("--lag-hours", type=click.FloatRange(min=0), default=2, show_default=True,
                     help="Hours Amplitude needs after an hour closes before it can be exported."),
        click.option("--max-attempts", type=click.IntRange(1, 50), default=6, show_default=True,
                     help="Attempts per window for 5xx, 429, timeouts and broken bodies."),
        click.option("--retry-wait", type=click.FloatRange(0, 600), default=2.0, show_default=True,
                     help="First backoff in seconds; it doubles (with jitter) up to 120 s."),
        click.option("--read-timeout", type=click.FloatRange(0, min_open=True), default=60, show_default=True,
                     metavar="SECONDS", help="Seconds without a byte of an answer's body before the attempt is "
                     "retried (an answer may take up to 5 minutes to start)."),
        click.option("--concurrency", type=click.IntRange(1, 32), default=2, show_default=True,
                     help="Windows downloaded at once (Amplitude allows 5 per project)."),
        click.option("--data-dir", type=click.Path(path_type=Path), default=Path("data"), show_default=True,
                     help="Archives land in DATA_DIR/raw, rejected lines in DATA_DIR/rejects."),
        click.option("--log-dir", type=click.Path(path_type=Path), default=Path("logs"), show_default=True,
                     help="A log file per run."),
        click.option("--progress/--no-progress", default=None, help="Progress bars (default: on a terminal)."),
        click.option("-v", "--verbose", is_flag=True, help="Debug logging."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


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


class _OneLineErrors(click.Command):
    """A command whose flags that do not parse get one line and exit 2, not click's usage block."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with _in_one_line():
            return super().parse_args(ctx, args)


class _OneLineGroup(click.Group):
    """The command group: an unknown command, and every subcommand's bad flags, are one line and exit 2."""

    command_class = _OneLineErrors

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with _in_one_line():
            return super().parse_args(ctx, args)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        with _in_one_line():
            return super().resolve_command(ctx, args)


@click.group(cls=_OneLineGroup, epilog=EXIT_CODES)
@click.version_option(__version__, prog_name="amplitude-export")
def cli() -> None:
    """Move raw events out of Amplitude's Export API into DuckDB, Parquet or PostgreSQL, exactly once.

    \b
    Example:
      export AMP_API_KEY=... AMP_SECRET_KEY=...
      amplitude-export run --start 2024-03-01 --end 2024-03-07
      amplitude-export demo
    """


def _client(credentials: Credentials, max_attempts: int, **client_options: Any) -> Any:
    from .client import ExportClient

    return ExportClient(credentials, max_attempts=max_attempts, **client_options)


def _check_range(start: str | None, end: str | None, lag_hours: float, *, incremental: bool) -> None:
    """Refuse dates that do not parse (or an end before the start) before anything is created."""
    from datetime import UTC
    from datetime import datetime as moment

    from .windows import parse_hour, resolve_range

    if incremental and start is None:  # `run` continues after the ledger's last hour: only an end to check
        if end is not None:
            parse_hour(end, is_end=True)
        return
    resolve_range(start, end, now=moment.now(UTC), lag_hours=lag_hours)


def _make_dirs(**dirs: Path) -> list[Path]:
    """Create the command's directories up front: one that cannot be created is bad input (exit 2), named by its
    option, not a traceback halfway through the run. Returns the directories it created (the outermost of each
    path), for `_unless_refused`."""
    created = []
    for option, path in dirs.items():
        missing = [p for p in (path, *path.parents) if not p.exists()]
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            flag = "--" + option.replace("_", "-")
            raise UsageError(f"{flag} {path}: cannot create it ({exc.strerror or exc})") from None
        created += missing[-1:]
    return created


@contextlib.contextmanager
def _unless_refused(created: list[Path], log_path: Path | None) -> Iterator[None]:
    """Input refused (exit 2) once the directories and the log exist, e.g. a destination URL: remove them again,
    so a refused command leaves nothing behind. Only directories left empty are removed."""
    try:
        yield
    except UsageError:
        from .logs import discard_run_log

        discard_run_log(log_path)
        for top in created:
            for path in sorted((top, *top.rglob("*")), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    path.rmdir()
        raise


def _start_logging(log_dir: Path, run_id: str, progress: bool | None, verbose: bool) -> Any:
    from .logs import setup_logging
    from .progress import make_reporter

    reporter = make_reporter(progress)
    log_path = setup_logging(log_dir, run_id, reporter=reporter, verbose=verbose)
    options = _storage_options()
    if options:
        from .logs import FATAL
        from .storage import Redactor

        for handler in {*logging.getLogger("amplitude_export").handlers, *FATAL.handlers}:
            handler.addFilter(Redactor(options))
    return reporter, log_path


@cli.command(epilog=EXIT_CODES)
@credential_options
@range_options
@reports_errors
def extract(api_key: str | None, secret_key: str | None, region: str | None, base_url: str | None,
            start: str | None, end: str | None, window_hours: int, lag_hours: float, max_attempts: int,
            retry_wait: float, read_timeout: float, concurrency: int, data_dir: Path, log_dir: Path,
            progress: bool | None, verbose: bool) -> None:
    """Download archives only: each window lands as DATA_DIR/raw/<start>_<end>.zip, verified.

    With neither --start nor --end, the range is yesterday (UTC). Complete archives are not fetched again.

    \b
    Example:
      amplitude-export extract --start 2024-03-01 --end 2024-03-02
      amplitude-export extract --base-url http://127.0.0.1:8080 --start 20240301T00 --end 20240301T05
    """
    from .pipeline import extract as do_extract
    from .pipeline import new_run_id

    credentials = load_credentials(api_key=api_key, secret_key=secret_key, region=region, base_url=base_url)
    _check_range(start, end, lag_hours, incremental=False)
    _make_dirs(data_dir=data_dir, log_dir=log_dir)
    run_id = new_run_id()
    reporter, log_path = _start_logging(log_dir, run_id, progress, verbose)
    with _client(credentials, max_attempts, wait_initial=retry_wait, read_timeout=read_timeout) as client, reporter:
        report = do_extract(client, start=start, end=end, data_dir=data_dir, window_hours=window_hours,
                            lag_hours=lag_hours, concurrency=concurrency, reporter=reporter, run_id=run_id)
    click.echo(report.summary())
    if log_path:
        click.echo(f"log: {log_path}")
    sys.exit(report.exit_code)


def _keep_schema(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    ctx.meta["amplitude_export.schema"] = value


def _keep_storage_options(ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> None:
    ctx.meta["amplitude_export.storage_options"] = value


def _storage_options() -> dict[str, Any]:
    """--storage-option KEY=VALUE pairs as fsspec's keyword arguments (a bad pair: UsageError, exit 2)."""
    from .storage import parse_options

    context = click.get_current_context(silent=True)
    return parse_options(context.meta.get("amplitude_export.storage_options") or () if context else ())


def _sink_options() -> dict[str, Any]:
    """open_sink's storage_options, when any were given."""
    options = _storage_options()
    return {"storage_options": options} if options else {}


def _redact(text: str) -> str:
    """`text` without the values of --storage-option (they may be secrets)."""
    from .storage import redact

    try:
        return redact(text, _storage_options())
    except UsageError:  # the options did not parse, so nothing reached a message
        return text


def privacy_options(func: F) -> F:
    """--exclude-columns and --hash-columns (docs/PRIVACY.md)."""
    func = click.option(
        "--hash-columns", metavar="COLUMNS",
        help="Store HMAC-SHA256 hashes instead of these text columns or JSON keys, keyed by AMP_HASH_KEY "
        "(e.g. user_id,device_id,user_properties.email): the same value always hashes the same, so joins work.",
    )(func)
    func = click.option(
        "--exclude-columns", metavar="COLUMNS",
        help="Leave these columns or JSON keys out of the destination, rejects and report (they are NULL), e.g. "
        "ip_address,location_lat,location_lng,user_properties.email. With either option raw archives are deleted "
        "once loaded unless --keep-raw.",
    )(func)
    return func


def _privacy(exclude_columns: str | None, hash_columns: str | None) -> Any:
    """The PII controls the flags ask for, or None; bad names or a missing key are UsageError (exit 2)."""
    from .privacy import Privacy

    privacy = Privacy.from_options(exclude_columns, hash_columns)
    return privacy if privacy.pii else None


def dest_options(func: F) -> F:
    """--dest, --schema, --storage-option and --project."""
    func = click.option(
        "--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE", expose_value=False,
        callback=_keep_storage_options,
        help="Passed to a parquet: URL's filesystem (fsspec), e.g. endpoint_url=http://127.0.0.1:9000, key=..., "
        "secret=...; or to an iceberg: destination's catalog (pyiceberg properties such as s3.endpoint, credential; "
        "the S3 names above are translated), or to a delta: URL's store (delta-rs: endpoint_url, "
        "aws_access_key_id, ...); repeatable. true/false are booleans, a value starting with { or [ "
        "is JSON. Values are never printed. Default: the store's environment variables (AWS_ENDPOINT_URL, "
        "AWS_ACCESS_KEY_ID, ...).",
    )(func)
    func = click.option(
        "--schema", envvar="AMP_PG_SCHEMA", expose_value=False, callback=_keep_schema,
        help="PostgreSQL schema for the tables (default amplitude; also ?schema=NAME in the URL). Env: AMP_PG_SCHEMA.",
    )(func)
    func = click.option(
        "--project", help="Name that keeps several Amplitude projects apart in one destination "
        "(default: the API key)."
    )(func)
    func = click.option(
        "--dest", help="duckdb:PATH (default DATA_DIR/amplitude.duckdb), parquet:DIR, iceberg:DIR (or an iceberg: "
        "catalog URL, docs/ICEBERG.md), delta:PATH_OR_URL or postgresql://user@host/db."
    )(func)
    return func


def _dest(dest: str | None, data_dir: Path) -> str:
    """The destination URL, with --schema carried as its `schema` parameter (PostgreSQL only)."""
    url = dest or f"duckdb:{data_dir / 'amplitude.duckdb'}"
    schema = click.get_current_context().meta.get("amplitude_export.schema")
    if schema:
        if not url.lower().startswith(("postgresql:", "postgres:")):
            raise UsageError("--schema applies to postgresql:// destinations only")
        url += ("&" if "?" in url else "?") + "schema=" + quote(schema, safe="")
    return url


def _open_for_writing(url: str, wait: bool) -> Sink:
    """Open the destination for a run; with `wait`, poll while another run holds it (orchestrators queue runs)."""
    from .errors import DestinationBusyError
    from .sinks import open_sink

    announced = False
    while True:
        try:
            return open_sink(url, **_sink_options())
        except DestinationBusyError as exc:
            if not wait:
                raise
            if not announced:
                log.warning("%s; waiting for it (--wait)", exc)
                announced = True
            time.sleep(WAIT_POLL_SECONDS)


def _project(project: str | None, api_key: str | None, sink: Sink, *, reading: bool = True) -> str:
    """--project; else the API key (the default project name of `run`), when writing or when the destination
    knows it; else, for reading, the destination's only project."""
    if project:
        return project
    try:
        key: str | None = load_credentials(api_key=api_key, secret_key="unused").api_key
    except UsageError:
        key = None
    known = sink.projects()
    if key and (not reading or key in known or not known):
        return key
    if len(known) == 1:
        return known[0]
    if known:
        raise UsageError(f"{sink.description} holds several projects ({', '.join(known)}): pass --project")
    return "default"


@cli.command(epilog=EXIT_CODES)
@credential_options
@range_options
@dest_options
@privacy_options
@click.option("--keep-raw/--no-keep-raw", default=None,
              help="Keep archives after loading (default: yes, but not with --exclude-columns or --hash-columns).")
@click.option("--sync-deletions", is_flag=True,
              help="First apply the User Privacy API's deletion jobs, as the `deletions` command does.")
@click.option("--refresh", is_flag=True, help="Load windows again even if loaded (their rows are replaced).")
@click.option("--lookback-hours", type=click.IntRange(0, 24 * 60), default=72, show_default=True,
              help="Incremental runs re-check this many hours before the end (loaded ones, and empty ones: "
                   "a 404 may precede data) and reload those that changed.")
@click.option("--size-budget-mb", type=click.IntRange(1, 4000), default=1024, show_default=True,
              help="Plan windows whose archives (as learned from earlier runs) stay under this size; "
                   "windows are also kept under the ~1.8 M lines a window deduplicates in memory.")
@click.option("--workers", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Threads (processes without the compiled parser) that parse events.")
@click.option("--wait", is_flag=True, help="If another run holds the destination, wait for it (else exit 5).")
@click.option("--streams", "streams_text", default="events", show_default=True, metavar="LIST",
              help="What to load, comma-separated: events, cohorts, cohort_members, annotations, events_list, "
                   "taxonomy, active_users, average_session_length (docs/SCHEMA.md).")
@click.option("--api-concurrency", type=click.IntRange(1, 5), default=3, show_default=True,
              help="Requests in flight at once to Amplitude's Dashboard REST, cohort and taxonomy APIs (Amplitude "
                   "allows 5 per project, shared with its other users).")
@reports_errors
def run(api_key: str | None, secret_key: str | None, region: str | None, base_url: str | None,
        start: str | None, end: str | None, window_hours: int, lag_hours: float, max_attempts: int,
        retry_wait: float, read_timeout: float, concurrency: int, data_dir: Path, log_dir: Path,
        progress: bool | None, verbose: bool, dest: str | None, project: str | None, exclude_columns: str | None,
        hash_columns: str | None, keep_raw: bool | None, sync_deletions: bool, refresh: bool,
        lookback_hours: int, size_budget_mb: int, workers: int, wait: bool, streams_text: str,
        api_concurrency: int) -> None:
    """Extract and load: download windows and load them into the destination, exactly once per event.

    With no --start, continue after the last loaded hour up to the last ready hour or --end (the first run takes
    yesterday, or the day of an earlier --end), so a daily cron entry needs no dates.

    \b
    Example:
      amplitude-export run                                   # incremental, into data/amplitude.duckdb
      amplitude-export run --start 2024-03-01 --end 2024-03-07 --dest parquet:events/
      amplitude-export run --dest postgresql://me@localhost/analytics
      amplitude-export run --sync-deletions --hash-columns user_id --exclude-columns ip_address
      amplitude-export run --streams events,cohorts,cohort_members,annotations
    """
    from .pipeline import new_run_id
    from .pipeline import run as do_run
    from .streams import EVENTS, check_sink, parse_streams, run_streams

    streams = parse_streams(streams_text)
    credentials = load_credentials(api_key=api_key, secret_key=secret_key, region=region, base_url=base_url)
    _check_range(start, end, lag_hours, incremental=True)
    privacy = _privacy(exclude_columns, hash_columns)
    if sync_deletions and privacy is not None and any(str(t) == "amplitude_id" for t in privacy.exclude):
        raise UsageError("--sync-deletions finds a deleted user's rows by amplitude_id: do not exclude it")
    url = _dest(dest, data_dir)
    created = _make_dirs(data_dir=data_dir, log_dir=log_dir)
    run_id = new_run_id()
    reporter, log_path = _start_logging(log_dir, run_id, progress, verbose)
    with _client(credentials, max_attempts, wait_initial=retry_wait, read_timeout=read_timeout) as client:
        with _unless_refused(created, log_path):
            sink = _open_for_writing(url, wait)
        try:
            check_sink(sink, streams)
            if sync_deletions:
                _sync_deletions(credentials, sink, project or client.credentials.api_key, data_dir, run_id,
                                max_attempts=max_attempts, retry_wait=retry_wait)
            report = others = None
            with reporter:
                if EVENTS in streams:
                    report = do_run(client, sink, project=project or client.credentials.api_key, start=start,
                                    end=end, data_dir=data_dir, window_hours=window_hours, lag_hours=lag_hours,
                                    concurrency=concurrency, workers=workers, keep_raw=keep_raw, refresh=refresh,
                                    lookback_hours=lookback_hours, size_budget=size_budget_mb << 20,
                                    reporter=reporter, run_id=run_id, privacy=privacy)
            if streams != [EVENTS]:
                others = run_streams(credentials, sink, project=project or credentials.api_key, streams=streams,
                                     run_id=run_id, data_dir=data_dir, start=start, end=end, lag_hours=lag_hours,
                                     lookback_hours=lookback_hours, concurrency=api_concurrency,
                                     max_attempts=max_attempts, retry_wait=retry_wait, privacy=privacy)
        finally:
            sink.close()
    for part in (report, others):
        if part is not None:
            click.echo(part.summary())
    if log_path:
        click.echo(f"log: {log_path}")
    sys.exit(max(part.exit_code for part in (report, others) if part is not None))


@cli.command(epilog=EXIT_CODES)
@dest_options
@privacy_options
@click.option("--api-key", help="Only to name the project (default project name). Env: AMP_API_KEY.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("data"), show_default=True)
@click.option("--log-dir", type=click.Path(path_type=Path), default=Path("logs"), show_default=True)
@click.option("--keep-raw/--no-keep-raw", default=None,
              help="Keep archives after loading (default: yes, but not with --exclude-columns or --hash-columns).")
@click.option("--refresh", is_flag=True, help="Load archives again even if their hours are loaded.")
@click.option("--workers", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Threads (processes without the compiled parser) that parse events.")
@click.option("--progress/--no-progress", default=None)
@click.option("-v", "--verbose", is_flag=True)
@click.option("--wait", is_flag=True, help="If another run holds the destination, wait for it (else exit 5).")
@reports_errors
def load(dest: str | None, project: str | None, exclude_columns: str | None, hash_columns: str | None,
         api_key: str | None, data_dir: Path, log_dir: Path, keep_raw: bool | None, refresh: bool, workers: int,
         progress: bool | None, verbose: bool, wait: bool) -> None:
    """Load archives already under DATA_DIR/raw (from `extract`) into the destination.

    \b
    Example:
      amplitude-export extract --start 2024-03-01 --end 2024-03-02
      amplitude-export load --dest parquet:events/
    """
    from .pipeline import load as do_load
    from .pipeline import new_run_id

    privacy = _privacy(exclude_columns, hash_columns)
    url = _dest(dest, data_dir)
    created = _make_dirs(data_dir=data_dir, log_dir=log_dir)
    run_id = new_run_id()
    reporter, log_path = _start_logging(log_dir, run_id, progress, verbose)
    with _unless_refused(created, log_path):
        sink = _open_for_writing(url, wait)
    try:
        with reporter:
            report = do_load(sink, project=_project(project, api_key, sink, reading=False), data_dir=data_dir,
                             workers=workers, keep_raw=keep_raw, refresh=refresh, reporter=reporter, run_id=run_id,
                             privacy=privacy)
    finally:
        sink.close()
    click.echo(report.summary())
    sys.exit(report.exit_code)


def _sync_deletions(credentials: Credentials, sink: Sink, project: str, data_dir: Path, run_id: str, *,
                    start_day: date | None = None, end_day: date | None = None, max_attempts: int = 6,
                    retry_wait: float = 2.0) -> None:
    """Apply the deletion jobs (`deletions.sync`) and print what was found and done."""
    from .deletions import DeletionsClient, sync

    with DeletionsClient(credentials, max_attempts=max_attempts, wait_initial=retry_wait) as client:
        report = sync(client, sink, project, data_dir=data_dir, start_day=start_day, end_day=end_day, run_id=run_id)
    for line in report.lines():
        click.echo(line)


@cli.command(epilog=EXIT_CODES)
@credential_options
@dest_options
@click.option("--start-day", help="First job day to list: YYYY-MM-DD (default: since the last check).")
@click.option("--end-day", help="Last job day to list, inclusive (default: 30 days ahead).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("data"), show_default=True,
              help="Kept archives under DATA_DIR/raw holding a deleted user are dropped; rejects are cleaned.")
@click.option("--log-dir", type=click.Path(path_type=Path), default=Path("logs"), show_default=True)
@click.option("--max-attempts", type=click.IntRange(1, 50), default=6, show_default=True,
              help="Attempts per request for 5xx, 429 and timeouts.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("--wait", is_flag=True, help="If another run holds the destination, wait for it (else exit 5).")
@reports_errors
def deletions(api_key: str | None, secret_key: str | None, region: str | None, base_url: str | None,
              dest: str | None, project: str | None, start_day: str | None, end_day: str | None, data_dir: Path,
              log_dir: Path, max_attempts: int, verbose: bool, wait: bool) -> None:
    """Apply Amplitude's deletion jobs: delete their users' rows from the destination, once per job.

    Reads the User Privacy API's jobs since the last check; for each job Amplitude has locked (submitted or
    done), deletes every row of its users from `events` (and `cohort_members`) with a row in
    `_amplitude_deletions`, in one transaction, and drops kept raw archives that hold them. A re-run changes
    nothing; `status` shows what was applied. See docs/PRIVACY.md.

    \b
    Example:
      amplitude-export deletions
      amplitude-export deletions --start-day 2024-01-01 --end-day 2024-06-30 --dest parquet:events/
    """
    from .deletions import parse_day
    from .pipeline import new_run_id

    credentials = load_credentials(api_key=api_key, secret_key=secret_key, region=region, base_url=base_url)
    first = parse_day(start_day, "--start-day") if start_day else None
    last = parse_day(end_day, "--end-day") if end_day else None
    if first and last and last < first:
        raise UsageError(f"--end-day {end_day} is before --start-day {start_day}")
    url = _dest(dest, data_dir)
    created = _make_dirs(data_dir=data_dir, log_dir=log_dir)
    run_id = new_run_id()
    _reporter, log_path = _start_logging(log_dir, run_id, False, verbose)
    with _unless_refused(created, log_path):
        sink = _open_for_writing(url, wait)
    try:
        _sync_deletions(credentials, sink, project or credentials.api_key, data_dir, run_id, start_day=first,
                        end_day=last, max_attempts=max_attempts)
    finally:
        sink.close()
    if log_path:
        click.echo(f"log: {log_path}")


@cli.command(epilog=EXIT_CODES)
@dest_options
@click.option("--api-key", help="Only to name the project (default project name). Env: AMP_API_KEY.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("data"), show_default=True)
@click.option("--hours", "by_hour", is_flag=True,
              help="One line per ledger hour: counts, attempts, min/max times, content hash, members.")
@click.option("--start", help="First UTC upload hour to show: YYYYMMDDTHH, YYYYMMDD, YYYY-MM-DD or YYYY-MM-DDTHH.")
@click.option("--end", help="Last UTC upload hour to show, inclusive (a bare date means its hour 23).")
@click.option("--json", "as_json", is_flag=True, help="Print the spans and every ledger field of every hour as JSON.")
@reports_errors
def status(dest: str | None, project: str | None, api_key: str | None, data_dir: Path, by_hour: bool,
           start: str | None, end: str | None, as_json: bool) -> None:
    """Show every window the destination knows (loaded, empty, failed with reason) and where the next run starts.

    With --hours, the ledger itself: one line per upload hour. --start/--end limit what is shown.

    \b
    Example:
      amplitude-export status
      amplitude-export status --hours --start 2024-03-01 --end 2024-03-01
      amplitude-export status --dest parquet:events/ --json
    """
    from .sinks import open_sink
    from .status import hour_range, render_status, status_data

    first, last = hour_range(start, end)
    sink = open_sink(_dest(dest, data_dir), read_only=True, **_sink_options())
    try:
        data = status_data(sink, _project(project, api_key, sink), start=first, end=last)
    finally:
        sink.close()
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        render_status(data, hours=by_hour)


@cli.command(epilog=EXIT_CODES)
@dest_options
@click.option("--api-key", help="Only to name the project (default project name). Env: AMP_API_KEY.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("data"), show_default=True,
              help="With --deep, the archives kept under DATA_DIR/raw are hashed again.")
@click.option("--deep", is_flag=True, help="Also re-read the kept archives and compare their hashes.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts and every problem, hour by hour, as JSON.")
@reports_errors
def verify(dest: str | None, project: str | None, api_key: str | None, data_dir: Path, deep: bool,
           as_json: bool) -> None:
    """Prove the destination is complete: every hour from the first to the last loaded is present and whole.

    Compares the ledger with the rows of `events` per upload hour; exit 0 when complete, 1 naming the bad hours
    (a line per run of consecutive hours with the same problem; --json lists every hour). Counts the hours loaded
    and those empty (the Export API had no data for them).

    \b
    Example:
      amplitude-export verify
      amplitude-export verify --dest parquet:events/ --deep
      amplitude-export verify --json
    """
    from .pipeline import plural
    from .sinks import open_sink
    from .verify import verify as do_verify

    sink = open_sink(_dest(dest, data_dir), read_only=True, **_sink_options())
    try:
        name = _project(project, api_key, sink)
        result = do_verify(sink, name, deep=deep, raw_dir=data_dir / "raw")
        where = sink.description
    finally:
        sink.close()
    if as_json:
        click.echo(json.dumps({"destination": where, "project": name, **result.to_dict()}, indent=2))
        sys.exit(0 if result.complete else 1)
    if result.problems:
        runs = result.runs
        click.echo(f"{plural(len(result.problems), 'problem')}"
                   + (f" in {plural(len(runs), 'run')} of hours:" if len(runs) < len(result.problems) else ":"))
        for run_of_hours in runs:
            click.echo(f"  {run_of_hours.describe()}")
    span = f"{result.first:%Y-%m-%dT%H}..{result.last:%Y-%m-%dT%H}" if result.first and result.last else "nothing"
    verdict = "complete" if result.complete else "NOT complete"
    click.echo(f"{span}: {result.hours_checked:,} hours checked ({result.hours_loaded:,} loaded, "
               f"{result.hours_empty:,} empty), {result.archives_hashed:,} archive hours hashed: {verdict}")
    sys.exit(0 if result.complete else 1)


@cli.command(epilog=EXIT_CODES)
@dest_options
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("data"), show_default=True)
@click.option("--start", help="First UTC upload hour (default: the first the destination holds).")
@click.option("--end", help="Last UTC upload hour, inclusive (default: the last).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("report.html"), show_default=True)
@reports_errors
def report(dest: str | None, project: str | None, data_dir: Path, start: str | None, end: str | None,
           out: Path) -> None:
    """Write one self-contained HTML report (charts, data health, windows) that opens offline.

    \b
    Example:
      amplitude-export report --out report.html
      amplitude-export report --dest parquet:events/ --start 2024-03-01 --end 2024-03-07
    """
    from .report import write_report
    from .windows import parse_hour

    path = write_report(_dest(dest, data_dir), out, start=parse_hour(start) if start is not None else None,
                        end=parse_hour(end, is_end=True) if end is not None else None, project=project,
                        **_sink_options())
    click.echo(f"report written to {path}")


@cli.command(epilog=EXIT_CODES)
@dest_options
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("data"), show_default=True)
@click.option("--older-than", "older_than", default=None, metavar="AGE",
              help="Delete what no snapshot or version younger than this needs: 7d, 24h, 90m, or 0 (only while no "
                   "run writes: a run's files are unreferenced until it commits). Default: iceberg: 7d; delta: the "
                   "table's delta.deletedFileRetentionDuration (7 days unless set).")
@click.option("--compact/--no-compact", default=True, show_default=True,
              help="First rewrite small files into few large ones.")
@reports_errors
def maintain(dest: str | None, project: str | None, data_dir: Path, older_than: str | None, compact: bool) -> None:
    """Housekeeping of a table destination (iceberg:, delta:): compact small files, drop what no recent
    snapshot or version needs.

    Hourly runs make one small file per hour and reloads leave replaced files behind; this keeps the table
    fast to read and its storage bounded. Rows and ledger are unchanged. See docs/ICEBERG.md and docs/DELTA.md.

    \b
    Example:
      amplitude-export maintain --dest iceberg:warehouse/
      amplitude-export maintain --dest iceberg:warehouse/ --older-than 24h --no-compact
      amplitude-export maintain --dest delta:s3://bucket/amplitude --older-than 7d
    """
    from .sinks.maintenance import maintain as maintain_table
    from .sinks.maintenance import parse_age

    if dest is None:
        raise UsageError("maintain needs --dest (an iceberg: or delta: table)")
    age = parse_age(older_than) if older_than is not None else None
    click.echo(maintain_table(_dest(dest, data_dir), compact=compact, older_than=age, **_sink_options()).summary())


def _hour_list(option: str, text: str | None) -> list[datetime]:
    """A comma-separated list of hours (any --start format), for a flag named `option`."""
    from .windows import parse_hour

    try:
        return [parse_hour(item) for item in (text or "").split(",") if item.strip()]
    except UsageError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _fault_list(text: str | None) -> list[str]:
    from .fake_server import FAULTS

    faults = [item.strip().lower() for item in (text or "").split(",") if item.strip()]
    unknown = [fault for fault in faults if fault not in FAULTS]
    if unknown:
        raise UsageError(f"--faults: unknown {', '.join(map(repr, unknown))}; choose from {','.join(FAULTS)}")
    return faults


@cli.command("fake-server", epilog=EXIT_CODES)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="0 picks a free port (the URL is printed on stderr).")
@click.option("--api-key", default="demo-key", show_default=True, help="The key the server accepts.")
@click.option("--secret-key", default="demo-secret", help="The secret the server accepts (default demo-secret).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same events.")
@click.option("--project-id", type=click.IntRange(min=1), default=187520, show_default=True,
              help="The project id in member names and events.")
@click.option("--events-per-hour", type=click.IntRange(min=0), default=None,
              help="Event lines per hour (default: a realistic day, about 40 at night to 200 at the peak).")
@click.option("--members-per-hour", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Archive members each hour is split into (#0, #1, ...).")
@click.option("--data-start", help="No data before this UTC hour (404 for windows wholly before it).")
@click.option("--data-end", help="No data after this UTC hour (a bare date means its hour 23).")
@click.option("--empty-hours", metavar="HOURS", help="Comma-separated hours without data, e.g. 2024-03-01T05.")
@click.option("--malformed-lines", is_flag=True,
              help="Put one non-JSON line and one JSON array into each hour's first member.")
@click.option("--variation", type=click.FloatRange(0, 1), default=None,
              help="Share of lines that vary as real exports do (documented types, omitted and new keys, "
              "numbers as strings, ...; default 0.02); 0 for uniform lines.")
@click.option("--faults", metavar="LIST",
              help="Comma-separated faults for the first requests of every window, in order; from: "
              "500, 502, 503, 504, 429, truncate, corrupt, notzip, slow, stall, reset.")
@click.option("--fault-rate", type=click.FloatRange(0, 0.9), default=0.0, show_default=True,
              help="Share of requests after --faults answered with a random transient fault "
              "(500, 503, 429, truncated body).")
@click.option("--retry-after", type=click.FloatRange(min=0), default=1, show_default=True,
              help="Seconds in the Retry-After header of a 429.")
@click.option("--slow-seconds", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="How long a `slow` fault waits before answering, and a `stall` half-way through the body.")
@click.option("--timeout-over-hours", type=click.IntRange(min=0), default=None,
              help="Answer 504 for windows longer than this many hours, as large exports do.")
@click.option("--max-archive-bytes", type=click.IntRange(min=1), default=None,
              help="Answer 400 (too large) for windows whose zip would be bigger, as Amplitude does over 4 GB.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Keep the built members here between runs (default: a temporary directory).")
@click.option("--cohort-polls", type=click.IntRange(min=0), default=2, show_default=True,
              help="Status polls a cohort download answers JOB INPROGRESS before JOB COMPLETED.")
@click.option("--cohort-quota", type=click.IntRange(min=0), default=500, show_default=True,
              help="Cohort downloads left this month; then 429 QuotaExceeded.")
@click.option("--cohort-redirect-over", type=click.IntRange(min=0), default=100, show_default=True,
              help="Cohorts with more members send their file behind a 302 to a pre-signed link.")
@click.option("--taxonomy-forbidden", is_flag=True, help="Taxonomy answers 403, as for a project without the plan.")
@click.option("--delete-users", metavar="IDS",
              help="Comma-separated amplitude ids (or user ids) in a finished deletion job: gone from exports.")
@click.option("--api-latency", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds each answer of the other APIs takes (lets concurrent clients overlap).")
@reports_errors
def fake_server(host: str, port: int, api_key: str, secret_key: str, seed: int, project_id: int,
                events_per_hour: int | None, members_per_hour: int, data_start: str | None, data_end: str | None,
                empty_hours: str | None, malformed_lines: bool, variation: float | None, faults: str | None,
                fault_rate: float,
                retry_after: float, slow_seconds: float, timeout_over_hours: int | None,
                max_archive_bytes: int | None, cache_dir: Path | None, cohort_polls: int, cohort_quota: int,
                cohort_redirect_over: int, taxonomy_forbidden: bool, delete_users: str | None,
                api_latency: float) -> None:
    """Serve a faithful fake Amplitude Export API (for demos, tests and your own pipelines).

    Faults in --faults hit the first requests of each window, in order, then it answers normally (and
    --fault-rate adds random transient ones). The same port serves cohorts, annotations, the events list,
    active users, session lengths, taxonomy and deletion jobs (README). Bad flag values: one line, exit 2.

    \b
    Example:
      amplitude-export fake-server --port 8080 --fault-rate 0.2 &
      AMP_API_KEY=demo-key AMP_SECRET_KEY=demo-secret \\
        amplitude-export run --base-url http://127.0.0.1:8080 --start 2024-03-01 --end 2024-03-02
      amplitude-export fake-server --faults 429,503,truncate --retry-after 3 --timeout-over-hours 12
      amplitude-export fake-server --events-per-hour 50 --data-start 2024-03-01 --max-archive-bytes 200000
    """
    from .fake_server import serve
    from .windows import parse_hour

    first = parse_hour(data_start) if data_start is not None else None
    last = parse_hour(data_end, is_end=True) if data_end is not None else None
    if first and last and last < first:
        raise UsageError(f"--data-end {data_end} is before --data-start {data_start}")
    options: dict[str, Any] = {"events_per_hour": events_per_hour} if events_per_hour is not None else {}

    def announce(url: str) -> None:
        click.echo(f"fake Export API on {url} (pass it as --base-url; it serves /api/2/export with api key "
                   f"{api_key!r}); Ctrl-C stops", err=True)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    serve(host, port, ready=announce, api_key=api_key, secret_key=secret_key, seed=seed, project_id=project_id,
          members_per_hour=members_per_hour, data_start=first, data_end=last,
          empty_hours=_hour_list("--empty-hours", empty_hours), malformed_lines=malformed_lines,
          **({} if variation is None else {"variation": variation}),
          faults=_fault_list(faults), fault_rate=fault_rate, retry_after=retry_after, slow_seconds=slow_seconds,
          timeout_over_hours=timeout_over_hours, max_archive_bytes=max_archive_bytes, cache_dir=cache_dir,
          apis={"cohort_polls": cohort_polls, "cohort_quota": cohort_quota,
                "cohort_redirect_over": cohort_redirect_over, "taxonomy_forbidden": taxonomy_forbidden,
                "latency": api_latency,
                "delete_users": [item.strip() for item in (delete_users or "").split(",") if item.strip()]},
          **options)


@cli.command(epilog=EXIT_CODES)
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("demo-data"), show_default=True,
              help="Where the demo's archives, DuckDB file and logs go.")
@click.option("--days", type=click.IntRange(1, 60), default=7, show_default=True)
@click.option("--progress/--no-progress", default=None)
@reports_errors
def demo(data_dir: Path, days: int, progress: bool | None) -> None:
    """Run the whole job on a bundled fake Amplitude: a week of realistic events into DuckDB, then a summary.

    \b
    Example:
      amplitude-export demo
      amplitude-export verify --dest duckdb:demo-data/amplitude.duckdb
      python -c "import duckdb; duckdb.connect('demo-data/amplitude.duckdb').sql('FROM events').show()"

    The `python` there is the one amplitude-export is installed in (`.venv/bin/python` after the README's
    install).
    """
    from .demo import run_demo

    _make_dirs(data_dir=data_dir)
    sys.exit(run_demo(data_dir, days=days, progress=progress))


def main() -> None:
    """Console-script entry point."""
    from .tuning import tune_for_bulk_loading

    tune_for_bulk_loading()
    try:
        cli(prog_name="amplitude-export")
    except SystemExit as exc:
        _exit_without_teardown(exc)


def _exit_without_teardown(exc: SystemExit) -> None:
    """End the process once the command has returned, skipping the interpreter's teardown: freeing the modules
    and a loaded window's objects one by one took ~50 ms of a 3 s run (measured, docs/PARSE_DESIGN.md). By then
    the command has committed and closed its destination; what is left to do is done here: join any non-daemon
    thread, close the log files, flush stdout and stderr. Worker processes still alive take the usual way out.
    """
    code = exc.code
    multiprocessing = sys.modules.get("multiprocessing")
    if (multiprocessing is not None and multiprocessing.active_children()) or not isinstance(code, int | None):
        raise exc
    pools = sys.modules.get("concurrent.futures.thread")
    if pools is not None:  # a library's thread pool (pyiceberg's): its idle workers wait for this word to leave
        pools._python_exit()  # type: ignore[attr-defined]
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

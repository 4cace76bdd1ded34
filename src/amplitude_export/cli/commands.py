"""The commands that move and check data: each parses its flags, calls the library's function (`api.py`) and
prints its result (`render.py`); errors become exit codes in `app.reports_errors`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import api, clock
from ..errors import UsageError
from .app import EXIT_CODES, cli, reports_errors
from .options import (
    credential_options,
    dest_options,
    destination,
    limited,
    make_dirs,
    privacy_options,
    range_options,
    start_logging,
    storage_options,
    unless_refused,
)
from .render import print_run


@cli.command(epilog=EXIT_CODES)
@credential_options
@range_options
@reports_errors
def extract(
    api_key: str | None,
    secret_key: str | None,
    region: str | None,
    base_url: str | None,
    start: str | None,
    end: str | None,
    window_hours: int,
    lag_hours: float,
    max_attempts: int,
    retry_wait: float,
    retry_timeout: float,
    read_timeout: float,
    concurrency: int,
    data_dir: Path,
    log_dir: Path,
    progress: bool | None,
    verbose: bool,
) -> None:
    """Download archives only: each window lands as DATA_DIR/raw/<start>_<end>.zip, verified.

    With neither --start nor --end, the range is yesterday (UTC). Complete archives are not fetched again.

    \b
    Example:
      amplitude-export extract --start 2024-03-01 --end 2024-03-02
      amplitude-export extract --base-url http://127.0.0.1:8080 --start 20240301T00 --end 20240301T05
    """
    from ..config import load_credentials
    from ..pipeline import new_run_id

    load_credentials(api_key=api_key, secret_key=secret_key, region=region, base_url=base_url)
    api.check_range(start, end, lag_hours, incremental=False)
    make_dirs(data_dir=data_dir, log_dir=log_dir)
    run_id = new_run_id(clock.now())
    reporter, log_path = start_logging(log_dir, run_id, progress, verbose)
    report = api.extract(
        start=start,
        end=end,
        api_key=api_key,
        secret_key=secret_key,
        region=region,
        base_url=base_url,
        data_dir=data_dir,
        window_hours=window_hours,
        lag_hours=lag_hours,
        max_attempts=max_attempts,
        retry_wait=retry_wait,
        retry_timeout=retry_timeout,
        read_timeout=read_timeout,
        concurrency=concurrency,
        reporter=reporter,
        run_id=run_id,
    )
    print_run(report.summary(), log_path)
    sys.exit(report.exit_code)


@cli.command(epilog=EXIT_CODES)
@credential_options
@range_options
@dest_options
@privacy_options
@click.option(
    "--keep-raw/--no-keep-raw",
    default=None,
    help="Keep archives after loading (default: yes, but not with --exclude-columns or --hash-columns).",
)
@click.option(
    "--sync-deletions",
    is_flag=True,
    help="First apply the User Privacy API's deletion jobs, as the `deletions` command does.",
)
@click.option("--refresh", is_flag=True,
              help="Download and load windows again even if loaded (their rows are replaced; archives kept on "
              "disk are not reused).")
@click.option(
    "--lookback-hours",
    type=limited("lookback_hours", int),
    default=72,
    show_default=True,
    help="Incremental runs re-check this many hours before the end (loaded ones, and empty ones: "
    "a 404 may precede data) and reload those that changed.",
)
@click.option(
    "--size-budget-mb",
    type=limited("size_budget_mb", int),
    default=1024,
    show_default=True,
    help="Plan windows whose archives (as learned from earlier runs) stay under this size; "
    "windows are also kept under the ~1.8 M lines a window deduplicates in memory.",
)
@click.option(
    "--workers",
    type=limited("workers", int),
    default=2,
    show_default=True,
    help="Threads (processes without the compiled parser) that parse events; one into PostgreSQL.",
)
@click.option("--wait", is_flag=True, help="If another run holds the destination, wait for it (else exit 5).")
@click.option(
    "--streams",
    "streams_text",
    default="events",
    show_default=True,
    metavar="LIST",
    help="What to load, comma-separated: events, cohorts, cohort_members, annotations, events_list, "
    "taxonomy, active_users, average_session_length (docs/SCHEMA.md).",
)
@click.option(
    "--api-concurrency",
    type=click.IntRange(1, 5),
    default=3,
    show_default=True,
    help="Requests in flight at once to Amplitude's Dashboard REST, cohort and taxonomy APIs (Amplitude "
    "allows 5 per project, shared with its other users).",
)
@reports_errors
def run(
    api_key: str | None,
    secret_key: str | None,
    region: str | None,
    base_url: str | None,
    start: str | None,
    end: str | None,
    window_hours: int,
    lag_hours: float,
    max_attempts: int,
    retry_wait: float,
    retry_timeout: float,
    read_timeout: float,
    concurrency: int,
    data_dir: Path,
    log_dir: Path,
    progress: bool | None,
    verbose: bool,
    dest: str | None,
    project: str | None,
    exclude_columns: str | None,
    hash_columns: str | None,
    keep_raw: bool | None,
    sync_deletions: bool,
    refresh: bool,
    lookback_hours: int,
    size_budget_mb: int,
    workers: int,
    wait: bool,
    streams_text: str,
    api_concurrency: int,
) -> None:
    """Extract and load: download windows and load them into the destination, exactly once per event.

    With no --start, continue after the last hour recorded (failed hours are asked again) up to the last ready
    hour or --end (the first run takes yesterday, or the day of an earlier --end), so a daily cron entry needs no
    dates.

    \b
    Example:
      amplitude-export run                                   # incremental, into data/amplitude.duckdb
      amplitude-export run --start 2024-03-01 --end 2024-03-07 --dest parquet:events/
      amplitude-export run --dest postgresql://me@localhost/analytics
      amplitude-export run --sync-deletions --hash-columns user_id --exclude-columns ip_address
      amplitude-export run --streams events,cohorts,cohort_members,annotations
    """
    from ..config import load_credentials
    from ..pipeline import new_run_id
    from ..streams import parse_streams

    parse_streams(streams_text)  # what `api.run` checks too, here before anything is created
    load_credentials(api_key=api_key, secret_key=secret_key, region=region, base_url=base_url)
    api.check_range(start, end, lag_hours, incremental=True)
    api.privacy_controls(exclude_columns, hash_columns, sync_deletions=sync_deletions, warn=False)
    url = destination(dest, data_dir)
    created = make_dirs(data_dir=data_dir, log_dir=log_dir)
    run_id = new_run_id(clock.now())
    reporter, log_path = start_logging(log_dir, run_id, progress, verbose)
    with unless_refused(created, log_path):
        sink = api.open_for_writing(url, wait=wait, storage_options=storage_options())
    try:
        result = api.run(
            url,
            start=start,
            end=end,
            project=project,
            api_key=api_key,
            secret_key=secret_key,
            region=region,
            base_url=base_url,
            data_dir=data_dir,
            window_hours=window_hours,
            lag_hours=lag_hours,
            lookback_hours=lookback_hours,
            size_budget_mb=size_budget_mb,
            max_attempts=max_attempts,
            retry_wait=retry_wait,
            retry_timeout=retry_timeout,
            read_timeout=read_timeout,
            concurrency=concurrency,
            workers=workers,
            keep_raw=keep_raw,
            refresh=refresh,
            exclude_columns=exclude_columns,
            hash_columns=hash_columns,
            sync_deletions=sync_deletions,
            streams=streams_text,
            api_concurrency=api_concurrency,
            sink=sink,
            reporter=reporter,
            run_id=run_id,
        )
    finally:
        sink.close()
    print_run(result.summary(), log_path)
    sys.exit(result.exit_code)


@cli.command(epilog=EXIT_CODES)
@dest_options
@privacy_options
@click.option("--api-key", help="Only to name the project (default project name). Env: AMP_API_KEY.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("data"), show_default=True)
@click.option("--log-dir", type=click.Path(path_type=Path), default=Path("logs"), show_default=True)
@click.option(
    "--keep-raw/--no-keep-raw",
    default=None,
    help="Keep archives after loading (default: yes, but not with --exclude-columns or --hash-columns).",
)
@click.option("--refresh", is_flag=True, help="Load archives again even if their hours are loaded.")
@click.option(
    "--workers",
    type=limited("workers", int),
    default=2,
    show_default=True,
    help="Threads (processes without the compiled parser) that parse events; one into PostgreSQL.",
)
@click.option("--progress/--no-progress", default=None)
@click.option("-v", "--verbose", is_flag=True)
@click.option("--wait", is_flag=True, help="If another run holds the destination, wait for it (else exit 5).")
@reports_errors
def load(
    dest: str | None,
    project: str | None,
    exclude_columns: str | None,
    hash_columns: str | None,
    api_key: str | None,
    data_dir: Path,
    log_dir: Path,
    keep_raw: bool | None,
    refresh: bool,
    workers: int,
    progress: bool | None,
    verbose: bool,
    wait: bool,
) -> None:
    """Load archives already under DATA_DIR/raw (from `extract`) into the destination.

    Where archives share hours (a lookback lands a newer one beside older ones), each hour comes from the newest.

    \b
    Example:
      amplitude-export extract --start 2024-03-01 --end 2024-03-02
      amplitude-export load --dest parquet:events/
    """
    from ..pipeline import new_run_id

    api.privacy_controls(exclude_columns, hash_columns, warn=False)
    url = destination(dest, data_dir)
    if not (data_dir / "raw").is_dir():
        raise UsageError(f"--data-dir {data_dir}: it holds no archives ({data_dir / 'raw'} does not exist); name "
                         "the data dir `extract` landed them in")
    created = make_dirs(data_dir=data_dir, log_dir=log_dir)
    run_id = new_run_id(clock.now())
    reporter, log_path = start_logging(log_dir, run_id, progress, verbose)
    with unless_refused(created, log_path):
        sink = api.open_for_writing(url, wait=wait, storage_options=storage_options())
    try:
        report = api.load(
            url,
            project=project,
            api_key=api_key,
            data_dir=data_dir,
            workers=workers,
            keep_raw=keep_raw,
            refresh=refresh,
            exclude_columns=exclude_columns,
            hash_columns=hash_columns,
            sink=sink,
            reporter=reporter,
            run_id=run_id,
        )
    finally:
        sink.close()
    print_run(report.summary(), log_path)
    sys.exit(report.exit_code)


@cli.command(epilog=EXIT_CODES)
@credential_options
@dest_options
@click.option("--start-day", help="First job day to list: YYYY-MM-DD (default: since the last check).")
@click.option("--end-day", help="Last job day to list, inclusive (default: 30 days ahead).")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=Path("data"),
    show_default=True,
    help="Kept archives under DATA_DIR/raw holding a deleted user are dropped; rejects are cleaned.",
)
@click.option("--log-dir", type=click.Path(path_type=Path), default=Path("logs"), show_default=True)
@click.option(
    "--max-attempts",
    type=limited("max_attempts", int),
    default=6,
    show_default=True,
    help="Attempts per request for 5xx, 429 and timeouts.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("--wait", is_flag=True, help="If another run holds the destination, wait for it (else exit 5).")
@reports_errors
def deletions(
    api_key: str | None,
    secret_key: str | None,
    region: str | None,
    base_url: str | None,
    dest: str | None,
    project: str | None,
    start_day: str | None,
    end_day: str | None,
    data_dir: Path,
    log_dir: Path,
    max_attempts: int,
    verbose: bool,
    wait: bool,
) -> None:
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
    from ..config import load_credentials
    from ..deletions import parse_day
    from ..pipeline import new_run_id

    load_credentials(api_key=api_key, secret_key=secret_key, region=region, base_url=base_url)
    first = parse_day(start_day, "--start-day") if start_day else None
    last = parse_day(end_day, "--end-day") if end_day else None
    if first and last and last < first:
        raise UsageError(f"--end-day {end_day} is before --start-day {start_day}")
    url = destination(dest, data_dir)
    created = make_dirs(data_dir=data_dir, log_dir=log_dir)
    run_id = new_run_id(clock.now())
    _reporter, log_path = start_logging(log_dir, run_id, False, verbose)
    with unless_refused(created, log_path):
        sink = api.open_existing_for_writing(url, wait=wait, storage_options=storage_options())
    try:
        report = api.sync_deletions(
            url,
            project=project,
            api_key=api_key,
            secret_key=secret_key,
            region=region,
            base_url=base_url,
            start_day=start_day,
            end_day=end_day,
            data_dir=data_dir,
            max_attempts=max_attempts,
            sink=sink,
            run_id=run_id,
        )
    finally:
        sink.close()
    print_run("\n".join(report.lines()), log_path)

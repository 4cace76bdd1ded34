"""What each command that moves data does, as a function: the command's options are keyword arguments, and the
result is an object (a `RunResult`, a `RunReport`, ...) instead of an exit code. The CLI parses flags and calls
these; `import amplitude_export` offers them at the top level (and `status`, `verify` and the reads of
`reads.py`). Also the steps the commands share: the destination URL, opening it, naming the project.

Every function raises the errors of `errors.py` (a `UsageError` for bad input, before anything is created).
Credentials come from the arguments, else the `AMP_*` variables, else `.env`, as for the CLI.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from . import clock
from .errors import EXIT_OK, DestinationBusyError, EnvFileError, UsageError

if TYPE_CHECKING:
    from .client import ExportClient
    from .config import Credentials
    from .deletions import SyncReport
    from .pipeline import RunReport
    from .privacy import Privacy
    from .progress import Reporter
    from .sinks import Sink
    from .streams import StreamsReport, TableSink

log = logging.getLogger("amplitude_export")

WAIT_POLL_SECONDS = 1.0  # how often `wait=True` tries the destination's lock again
DATA_DIR = Path("data")
# A --start/--end: the CLI's forms (`2024-03-01`, `20240301T05`), an ISO 8601 time, or an aware datetime.
Hour = str | datetime


@dataclass
class RunResult:
    """What `run` did: the events' report, the other streams', and the deletion jobs applied first (each None
    when the run did not do that part)."""

    events: RunReport | None = None
    streams: StreamsReport | None = None
    deletions: SyncReport | None = None

    @property
    def exit_code(self) -> int:
        """0 when every part completed, 1 when some windows or tables failed (the next run retries them)."""
        return max((part.exit_code for part in (self.events, self.streams) if part is not None), default=EXIT_OK)

    @property
    def ok(self) -> bool:
        """Whether every part completed."""
        return self.exit_code == EXIT_OK

    def summary(self) -> str:
        """The lines the CLI prints at the end of a run."""
        lines = self.deletions.lines() if self.deletions is not None else []
        lines += [part.summary() for part in (self.events, self.streams) if part is not None]
        return "\n".join(lines)


_PATH_SCHEMES = ("duckdb", "parquet", "delta", "iceberg")
# `s3:/bucket` is a URL missing a slash, not the local directory `s3:` it would otherwise be written to; one
# letter before the colon stays a path (a Windows drive)
_URL_MISSING_SLASH = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")


def destination(dest: str | None, data_dir: Path = DATA_DIR, *, schema: str | None = None) -> str:
    """The destination URL: `dest`, else `duckdb:DATA_DIR/amplitude.duckdb`; `schema` (PostgreSQL only) is carried
    as the URL's `schema` parameter."""
    from urllib.parse import quote

    url = dest or f"duckdb:{Path(data_dir) / 'amplitude.duckdb'}"
    scheme, _, rest = url.partition(":")
    if scheme.lower() in _PATH_SCHEMES and not rest.strip():
        raise UsageError(f"--dest {url!r} names no path: give {scheme}:PATH")
    typo = _URL_MISSING_SLASH.match(rest) if scheme.lower() in _PATH_SCHEMES else None
    if typo:
        name, path = typo.group(1), rest[typo.end() - 1:]
        meant = path if name.lower() == "file" else f"{name}:/{path}"
        raise UsageError(f"--dest {url!r} names a local directory '{name}:' (a URL has ://): write {scheme}:{meant}"
                         f", or {scheme}:./{rest} for that directory")
    if schema is not None and not schema.strip():
        raise UsageError("--schema is empty: name a schema, or leave it out for 'amplitude'")
    if schema:
        if not url.lower().startswith(("postgresql:", "postgres:")):
            raise UsageError("--schema applies to postgresql:// destinations only")
        url += ("&" if "?" in url else "?") + "schema=" + quote(schema, safe="")
    return url


def open_for_writing(url: str, *, wait: bool = False, storage_options: dict[str, Any] | None = None) -> Sink:
    """Open the destination for a run; with `wait`, poll while another run holds it (orchestrators queue runs)."""
    from .sinks import open_sink

    options = {"storage_options": storage_options} if storage_options else {}
    announced = False
    while True:
        try:
            return open_sink(url, **options)
        except DestinationBusyError as exc:
            if not wait:
                raise
            if not announced:
                log.warning("%s; waiting for it (--wait)", exc)
                announced = True
            time.sleep(WAIT_POLL_SECONDS)


def open_for_reading(url: str, *, storage_options: dict[str, Any] | None = None) -> Sink:
    """Open the destination read-only (status, verify, reads)."""
    from .sinks import open_sink

    return open_sink(url, read_only=True, **({"storage_options": storage_options} if storage_options else {}))


def open_existing_for_writing(url: str, *, wait: bool = False, storage_options: dict[str, Any] | None = None) -> Sink:
    """Open for writing a destination that must exist already (`deletions`): a misspelt path is refused as the
    read commands refuse it, not created empty for the jobs to be recorded in while the real one keeps the rows."""
    try:
        open_for_reading(url, storage_options=storage_options).close()
    except DestinationBusyError:
        pass  # a run holds it, so it exists: wait for that run below, or exit 5
    return open_for_writing(url, wait=wait, storage_options=storage_options)


def resolve_project(project: str | None, api_key: str | None, sink: Sink, *, reading: bool = True) -> str:
    """`project`; else the API key (the default project name of `run`), when writing or when the destination
    knows it; else, for reading, the destination's only project."""
    from .config import load_credentials

    if project:
        known = sink.projects() if reading else []
        if known and project not in known:
            raise UsageError(f"{sink.description} knows no project {project!r}; it has {', '.join(known)}")
        return project
    try:
        key: str | None = load_credentials(api_key=api_key, secret_key="unused").api_key
    except EnvFileError:
        raise
    except UsageError:
        key = None
    if key and not reading:
        return key
    known = sink.projects()
    if key and (key in known or not known):
        return key
    if len(known) == 1:
        return known[0]
    if known:
        raise UsageError(f"{sink.description} holds several projects ({', '.join(known)}): pass --project")
    return "default"


def hour_text(value: Hour | None, *, is_end: bool = False) -> str | None:
    """A start or end as the pipeline takes it (a string of the CLI's forms), checked: a bad one is a
    UsageError. Strings pass unchanged (a bare end date keeps meaning its last hour); a datetime names the hour
    that holds it."""
    from .windows import as_hour, label_hour, parse_hour

    if value is None or isinstance(value, str):
        if value is not None:
            parse_hour(value, is_end=is_end)
        return value
    hour = as_hour(value, is_end=is_end)
    return label_hour(hour) if hour is not None else None


# the numbers `run` takes, as (least, most, whether the least itself is refused): the CLI's option types are made
# from these (`cli.options.limited`), so the library and the CLI refuse the same
LIMITS: dict[str, tuple[float, float | None, bool]] = {
    "window_hours": (1, None, False), "lag_hours": (0, None, False), "lookback_hours": (0, 24 * 60, False),
    "size_budget_mb": (1, 4000, False), "max_attempts": (1, 50, False), "retry_wait": (0, 600, False),
    "retry_timeout": (0, None, True), "read_timeout": (0, None, True), "workers": (1, 16, False),
}


def check_limits(**values: float | None) -> None:
    """Refuse a number outside what the matching CLI option allows (None: not given), as a UsageError."""
    for name, value in values.items():
        least, most, open_below = LIMITS[name]
        if value is None:
            continue
        if value < least or (open_below and value == least) or (most is not None and value > most):
            allowed = (f"more than {least:g}" if open_below else f"at least {least:g}" if most is None
                       else f"from {least:g} to {most:g}")
            raise UsageError(f"{name} must be {allowed}, got {value!r}")


def check_range(start: str | None, end: str | None, lag_hours: float, *, incremental: bool) -> None:
    """Refuse dates that do not parse (or an end before the start) before anything is created."""
    from .windows import parse_hour, resolve_range

    if incremental and start is None:  # `run` continues after the ledger's last hour: only an end to check
        if end is not None:
            parse_hour(end, is_end=True)
        return
    resolve_range(start, end, now=clock.now(), lag_hours=lag_hours)


def _comma_text(value: str | Iterable[str] | None) -> str | None:
    """An option the CLI takes comma-separated (`--streams`, `--exclude-columns`), given from Python as a list."""
    return value if value is None or isinstance(value, str) else ",".join(value)


def privacy_controls(
    exclude_columns: str | None, hash_columns: str | None, *, sync_deletions: bool = False, warn: bool = True
) -> Privacy | None:
    """The PII controls asked for, or None; bad names, a missing AMP_HASH_KEY, or amplitude_id excluded where
    deletion jobs need it are a UsageError. `warn` of a short key (a check ahead of the run need not)."""
    from .privacy import Privacy

    privacy = Privacy.from_options(exclude_columns, hash_columns, warn=warn)
    if sync_deletions and any(str(t) == "amplitude_id" for t in privacy.exclude):
        raise UsageError("--sync-deletions finds a deleted user's rows by amplitude_id: do not exclude it")
    return privacy if privacy.pii else None


def export_client(
    credentials: Credentials,
    *,
    max_attempts: int = 6,
    retry_wait: float = 2.0,
    retry_timeout: float | None = None,
    read_timeout: float | None = None,
) -> ExportClient:
    """The Export API client with the run's retry options (the client's defaults where None)."""
    from .client import ExportClient

    options: dict[str, Any] = {"max_attempts": max_attempts, "wait_initial": retry_wait}
    if retry_timeout is not None:
        options["retry_timeout"] = retry_timeout
    if read_timeout is not None:
        options["read_timeout"] = read_timeout
    return ExportClient(credentials, **options)


def _credentials(api_key: str | None, secret_key: str | None, region: str | None, base_url: str | None) -> Credentials:
    from .config import load_credentials

    return load_credentials(api_key=api_key, secret_key=secret_key, region=region, base_url=base_url)


def extract(
    *,
    start: Hour | None = None,
    end: Hour | None = None,
    api_key: str | None = None,
    secret_key: str | None = None,
    region: str | None = None,
    base_url: str | None = None,
    data_dir: str | Path = DATA_DIR,
    window_hours: int = 24,
    lag_hours: float = 2,
    max_attempts: int = 6,
    retry_wait: float = 2.0,
    retry_timeout: float | None = None,
    read_timeout: float | None = None,
    concurrency: int = 2,
    reporter: Reporter | None = None,
    run_id: str | None = None,
) -> RunReport:
    """Download archives only: each window of start..end lands as DATA_DIR/raw/<start>_<end>.zip, verified
    (`amplitude-export extract`). With neither start nor end, the range is yesterday (UTC)."""
    from .pipeline import extract as extract_windows
    from .progress import Reporter

    credentials = _credentials(api_key, secret_key, region, base_url)
    first, last = hour_text(start), hour_text(end, is_end=True)
    check_range(first, last, lag_hours, incremental=False)
    reporter = reporter or Reporter()
    with (
        export_client(
            credentials,
            max_attempts=max_attempts,
            retry_wait=retry_wait,
            retry_timeout=retry_timeout,
            read_timeout=read_timeout,
        ) as client,
        reporter,
    ):
        return extract_windows(
            client,
            start=first,
            end=last,
            data_dir=Path(data_dir),
            window_hours=window_hours,
            lag_hours=lag_hours,
            concurrency=concurrency,
            now=clock.now(),
            reporter=reporter,
            run_id=run_id,
        )


def run(
    dest: str | None = None,
    *,
    start: Hour | None = None,
    end: Hour | None = None,
    project: str | None = None,
    api_key: str | None = None,
    secret_key: str | None = None,
    region: str | None = None,
    base_url: str | None = None,
    data_dir: str | Path = DATA_DIR,
    window_hours: int = 24,
    lag_hours: float = 2,
    lookback_hours: int = 72,
    size_budget_mb: int = 1024,
    max_attempts: int = 6,
    retry_wait: float = 2.0,
    retry_timeout: float | None = None,
    read_timeout: float | None = None,
    concurrency: int = 2,
    workers: int = 2,
    keep_raw: bool | None = None,
    refresh: bool = False,
    exclude_columns: str | Iterable[str] | None = None,
    hash_columns: str | Iterable[str] | None = None,
    sync_deletions: bool = False,
    streams: str | Iterable[str] = "events",
    api_concurrency: int = 3,
    wait: bool = False,
    schema: str | None = None,
    storage_options: dict[str, Any] | None = None,
    sink: Sink | None = None,
    reporter: Reporter | None = None,
    run_id: str | None = None,
) -> RunResult:
    """Extract and load start..end into `dest`, exactly once per event (`amplitude-export run`); with no start,
    continue after the last hour recorded. `sink`, an open destination, is used instead of opening `dest` (and
    left open)."""
    from .pipeline import new_run_id
    from .pipeline import run as run_windows
    from .progress import Reporter
    from .streams import EVENTS, check_sink, parse_streams, run_streams

    names = parse_streams(_comma_text(streams) or "")
    check_limits(window_hours=window_hours, lag_hours=lag_hours, lookback_hours=lookback_hours,
                 size_budget_mb=size_budget_mb, max_attempts=max_attempts, retry_wait=retry_wait,
                 retry_timeout=retry_timeout, read_timeout=read_timeout, workers=workers)  # fmt: skip
    credentials = _credentials(api_key, secret_key, region, base_url)
    first, last = hour_text(start), hour_text(end, is_end=True)
    check_range(first, last, lag_hours, incremental=True)
    privacy = privacy_controls(_comma_text(exclude_columns), _comma_text(hash_columns), sync_deletions=sync_deletions)
    url = destination(dest, Path(data_dir), schema=schema)
    run_id = run_id or new_run_id(clock.now())
    reporter = reporter or Reporter()
    name = project or credentials.api_key
    result = RunResult()
    with export_client(
        credentials,
        max_attempts=max_attempts,
        retry_wait=retry_wait,
        retry_timeout=retry_timeout,
        read_timeout=read_timeout,
    ) as client:
        target = sink if sink is not None else open_for_writing(url, wait=wait, storage_options=storage_options)
        try:
            check_sink(target, names)
            if sync_deletions:
                result.deletions = _sync(
                    credentials, target, name, Path(data_dir), run_id, max_attempts=max_attempts, retry_wait=retry_wait
                )
            if EVENTS in names:
                with reporter:
                    result.events = run_windows(
                        client,
                        target,
                        project=name,
                        start=first,
                        end=last,
                        data_dir=Path(data_dir),
                        window_hours=window_hours,
                        lag_hours=lag_hours,
                        concurrency=concurrency,
                        workers=workers,
                        keep_raw=keep_raw,
                        refresh=refresh,
                        lookback_hours=lookback_hours,
                        size_budget=size_budget_mb << 20,
                        now=clock.now(),
                        reporter=reporter,
                        run_id=run_id,
                        privacy=privacy,
                    )
            if names != [EVENTS]:
                result.streams = run_streams(
                    credentials,
                    cast("TableSink", target),  # check_sink refused a destination without tables
                    project=name,
                    streams=names,
                    run_id=run_id,
                    data_dir=Path(data_dir),
                    start=first,
                    end=last,
                    lag_hours=lag_hours,
                    lookback_hours=lookback_hours,
                    concurrency=api_concurrency,
                    max_attempts=max_attempts,
                    retry_wait=retry_wait,
                    privacy=privacy,
                    now=clock.now(),
                )
        finally:
            if sink is None:
                target.close()
    return result


def load(
    dest: str | None = None,
    *,
    project: str | None = None,
    api_key: str | None = None,
    data_dir: str | Path = DATA_DIR,
    workers: int = 2,
    keep_raw: bool | None = None,
    refresh: bool = False,
    exclude_columns: str | Iterable[str] | None = None,
    hash_columns: str | Iterable[str] | None = None,
    wait: bool = False,
    schema: str | None = None,
    storage_options: dict[str, Any] | None = None,
    sink: Sink | None = None,
    reporter: Reporter | None = None,
    run_id: str | None = None,
) -> RunReport:
    """Load the archives already under DATA_DIR/raw (from `extract`) into `dest` (`amplitude-export load`)."""
    from .pipeline import load as load_archives
    from .progress import Reporter

    privacy = privacy_controls(_comma_text(exclude_columns), _comma_text(hash_columns))
    url = destination(dest, Path(data_dir), schema=schema)
    reporter = reporter or Reporter()
    target = sink if sink is not None else open_for_writing(url, wait=wait, storage_options=storage_options)
    try:
        with reporter:
            return load_archives(
                target,
                project=resolve_project(project, api_key, target, reading=False),
                data_dir=Path(data_dir),
                workers=workers,
                keep_raw=keep_raw,
                refresh=refresh,
                reporter=reporter,
                run_id=run_id,
                privacy=privacy,
            )
    finally:
        if sink is None:
            target.close()


def sync_deletions(
    dest: str | None = None,
    *,
    project: str | None = None,
    api_key: str | None = None,
    secret_key: str | None = None,
    region: str | None = None,
    base_url: str | None = None,
    start_day: str | None = None,
    end_day: str | None = None,
    data_dir: str | Path = DATA_DIR,
    max_attempts: int = 6,
    wait: bool = False,
    schema: str | None = None,
    storage_options: dict[str, Any] | None = None,
    sink: Sink | None = None,
    run_id: str | None = None,
) -> SyncReport:
    """Apply Amplitude's deletion jobs of start_day..end_day (`YYYY-MM-DD`; default: since the last check) to
    `dest` (`amplitude-export deletions`)."""
    from .deletions import parse_day
    from .pipeline import new_run_id

    credentials = _credentials(api_key, secret_key, region, base_url)
    first = parse_day(start_day, "--start-day") if start_day else None
    last = parse_day(end_day, "--end-day") if end_day else None
    if first and last and last < first:
        raise UsageError(f"--end-day {end_day} is before --start-day {start_day}")
    url = destination(dest, Path(data_dir), schema=schema)
    target = sink if sink is not None else open_existing_for_writing(url, wait=wait, storage_options=storage_options)
    try:
        return _sync(
            credentials,
            target,
            project or _default_deletions_project(credentials.api_key, target),
            Path(data_dir),
            run_id or new_run_id(clock.now()),
            start_day=first,
            end_day=last,
            max_attempts=max_attempts,
        )
    finally:
        if sink is None:
            target.close()


def _default_deletions_project(api_key: str, sink: Sink) -> str:
    """The API key, the default project name, unless the destination holds only other projects: their rows
    would stay while the job was recorded as applied to a project with none."""
    known = sink.projects()
    if known and api_key not in known:
        raise UsageError(f"{sink.description} holds no project named after the API key (the default), only "
                         f"{', '.join(known)}: pass --project with the name its runs used")
    return api_key


def _sync(
    credentials: Credentials,
    sink: Sink,
    project: str,
    data_dir: Path,
    run_id: str,
    *,
    start_day: Any = None,
    end_day: Any = None,
    max_attempts: int = 6,
    retry_wait: float = 2.0,
) -> SyncReport:
    from .deletions import DeletionsClient, sync

    with DeletionsClient(credentials, max_attempts=max_attempts, wait_initial=retry_wait) as client:
        return sync(client, sink, project, data_dir=data_dir, start_day=start_day, end_day=end_day, run_id=run_id)

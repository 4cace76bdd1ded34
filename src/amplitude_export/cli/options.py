"""The options commands share (credentials, range and retries, destination, privacy) and what turns them into
the library's arguments: the destination URL, storage options, the directories and the run's log."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from ..api import LIMITS
from ..config import REGION_HOSTS, RETRY_TIMEOUT
from ..errors import UsageError, os_reason

F = TypeVar("F", bound=Callable[..., Any])
SCHEMA = "amplitude_export.schema"
STORAGE_OPTIONS = "amplitude_export.storage_options"


def limited(name: str, kind: type[int] | type[float]) -> click.ParamType:
    """The option type for `run`'s number `name`, from its bounds in `api.LIMITS`."""
    least, most, open_below = LIMITS[name]
    if kind is int:
        return click.IntRange(int(least), None if most is None else int(most), min_open=open_below)
    return click.FloatRange(least, most, min_open=open_below)


def credential_options(func: F) -> F:
    """--api-key, --secret-key, --region, --base-url: flags win over AMP_* variables and .env."""
    func = click.option("--base-url", help="Override the host (a proxy, the fake server). Env: AMP_BASE_URL.")(func)
    func = click.option(
        "--region",
        type=click.Choice(sorted(REGION_HOSTS)),
        default=None,
        help="us = amplitude.com (default), eu = analytics.eu.amplitude.com. Env: AMP_REGION.",
    )(func)
    func = click.option("--secret-key", help="Secret key. Env: AMP_SECRET_KEY (or .env).", show_default=False)(func)
    func = click.option("--api-key", help="API key. Env: AMP_API_KEY (or .env).")(func)
    return func


HOUR_FORMS = "YYYY-MM-DD, YYYY-MM-DDTHH, YYYYMMDD, YYYYMMDDTHH or ISO 8601 (2024-03-01T05:00:00Z)"


def range_options(func: F) -> F:
    """--start/--end and the knobs of fetching."""
    options = [
        click.option("--start", help=f"First UTC upload hour: {HOUR_FORMS}."),
        click.option("--end", help="Last UTC upload hour, inclusive (a bare date means its hour 23)."),
        click.option(
            "--window-hours",
            type=limited("window_hours", int),
            default=24,
            show_default=True,
            help="Hours per request (windows of 24+ hours start at midnight).",
        ),
        click.option(
            "--lag-hours",
            type=limited("lag_hours", float),
            default=2,
            show_default=True,
            help="Hours Amplitude needs after an hour closes before it can be exported.",
        ),
        click.option(
            "--max-attempts",
            type=limited("max_attempts", int),
            default=6,
            show_default=True,
            help="Attempts per window for 5xx, 429, timeouts and broken bodies.",
        ),
        click.option(
            "--retry-wait",
            type=limited("retry_wait", float),
            default=2.0,
            show_default=True,
            help="First backoff in seconds; it doubles (with jitter) up to 120 s.",
        ),
        click.option(
            "--retry-timeout",
            type=limited("retry_timeout", float),
            default=RETRY_TIMEOUT,
            show_default=True,
            metavar="SECONDS",
            help="No new attempt of a window starts once this many seconds have passed since its first.",
        ),
        click.option(
            "--read-timeout",
            type=limited("read_timeout", float),
            default=60,
            show_default=True,
            metavar="SECONDS",
            help="Seconds without a byte of an answer's body before the attempt is "
            "retried (an answer may take up to 5 minutes to start).",
        ),
        click.option(
            "--concurrency",
            type=click.IntRange(1, 32),
            default=2,
            show_default=True,
            help="Windows downloaded at once (Amplitude allows 5 per project).",
        ),
        click.option(
            "--data-dir",
            type=click.Path(path_type=Path),
            default=Path("data"),
            show_default=True,
            help="Archives land in DATA_DIR/raw, rejected lines in DATA_DIR/rejects.",
        ),
        click.option(
            "--log-dir",
            type=click.Path(path_type=Path),
            default=Path("logs"),
            show_default=True,
            help="A log file per run.",
        ),
        click.option("--progress/--no-progress", default=None, help="Progress bars (default: on a terminal)."),
        click.option("-v", "--verbose", is_flag=True, help="Debug logging."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def privacy_options(func: F) -> F:
    """--exclude-columns and --hash-columns (docs/PRIVACY.md)."""
    func = click.option(
        "--hash-columns",
        metavar="COLUMNS",
        help="Store HMAC-SHA256 hashes instead of these text columns or JSON keys, keyed by AMP_HASH_KEY "
        "(e.g. user_id,device_id,user_properties.email): the same value always hashes the same, so joins work.",
    )(func)
    func = click.option(
        "--exclude-columns",
        metavar="COLUMNS",
        help="Leave these columns or JSON keys out of the destination, rejects and report (they are NULL), e.g. "
        "ip_address,location_lat,location_lng,user_properties.email. With either option raw archives are deleted "
        "once loaded unless --keep-raw.",
    )(func)
    return func


def _keep_schema(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    ctx.meta[SCHEMA] = value


def _keep_storage_options(ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> None:
    ctx.meta[STORAGE_OPTIONS] = value


def dest_options(func: F) -> F:
    """--dest, --schema, --storage-option and --project."""
    func = click.option(
        "--storage-option",
        "storage_option",
        multiple=True,
        metavar="KEY=VALUE",
        expose_value=False,
        callback=_keep_storage_options,
        help="Passed to a parquet: URL's filesystem (fsspec), e.g. endpoint_url=http://127.0.0.1:9000, key=..., "
        "secret=...; or to an iceberg: destination's catalog (pyiceberg properties such as s3.endpoint, credential; "
        "the S3 names above are translated), or to a delta: URL's store (delta-rs: endpoint_url, "
        "aws_access_key_id, ...); repeatable. true/false are booleans, a value starting with { or [ "
        "is JSON. Values are never printed. Default: the store's environment variables (AWS_ENDPOINT_URL, "
        "AWS_ACCESS_KEY_ID, ...).",
    )(func)
    func = click.option(
        "--schema",
        envvar="AMP_PG_SCHEMA",
        expose_value=False,
        callback=_keep_schema,
        help="PostgreSQL schema for the tables (default amplitude; also ?schema=NAME in the URL). Env: AMP_PG_SCHEMA.",
    )(func)
    func = click.option(
        "--project", help="Name that keeps several Amplitude projects apart in one destination (default: the API key)."
    )(func)
    func = click.option(
        "--dest",
        help="duckdb:PATH (default DATA_DIR/amplitude.duckdb), parquet:DIR, iceberg:DIR (or an iceberg: "
        "catalog URL, docs/ICEBERG.md), delta:PATH_OR_URL or postgresql://user@host/db.",
    )(func)
    return func


def schema() -> str | None:
    """--schema (or AMP_PG_SCHEMA) of the running command."""
    context = click.get_current_context(silent=True)
    return context.meta.get(SCHEMA) if context is not None else None


def storage_options() -> dict[str, Any]:
    """--storage-option KEY=VALUE pairs as fsspec's keyword arguments (a bad pair: UsageError, exit 2)."""
    from ..storage import parse_options

    context = click.get_current_context(silent=True)
    return parse_options(context.meta.get(STORAGE_OPTIONS) or () if context else ())


def sink_options() -> dict[str, Any]:
    """open_sink's storage_options, when any were given."""
    options = storage_options()
    return {"storage_options": options} if options else {}


def redact(text: str) -> str:
    """`text` without the values of --storage-option (they may be secrets)."""
    from ..storage import redact as mask

    try:
        return mask(text, storage_options())
    except UsageError:  # the options did not parse, so nothing reached a message
        return text


def destination(dest: str | None, data_dir: Path) -> str:
    """The destination URL, with --schema carried as its `schema` parameter (PostgreSQL only); bad
    --storage-option pairs are refused here too, before a command creates anything."""
    from ..api import destination as url_of

    storage_options()
    return url_of(dest, data_dir, schema=schema())


def make_dirs(**dirs: Path) -> list[Path]:
    """Create the command's directories up front: one that cannot be created is bad input (exit 2), named by its
    option, not a traceback halfway through the run. Returns the directories it created (the outermost of each
    path), for `unless_refused`."""
    created: list[Path] = []
    for option, path in dirs.items():
        missing = [p for p in (path, *path.parents) if not p.exists()]
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _remove_empty(created)  # the directories made for the options before this one
            flag = "--" + option.replace("_", "-")
            raise UsageError(f"{flag} {path}: cannot create it ({os_reason(exc)})") from None
        created += missing[-1:]
    return created


def _remove_empty(created: list[Path]) -> None:
    """Remove the directories `make_dirs` created (the outermost of each), where nothing was put in them."""
    for top in created:
        for path in sorted((top, *top.rglob("*")), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                path.rmdir()


@contextlib.contextmanager
def unless_refused(created: list[Path], log_path: Path | None) -> Iterator[None]:
    """Input refused (exit 2) once the directories and the log exist, e.g. a destination URL: remove them again,
    so a refused command leaves nothing behind. Only directories left empty are removed."""
    try:
        yield
    except UsageError:
        from ..logs import discard_run_log

        discard_run_log(log_path)
        _remove_empty(created)
        raise


def start_logging(log_dir: Path, run_id: str, progress: bool | None, verbose: bool) -> Any:
    """The run's progress reporter and log file (whose handlers mask the --storage-option values)."""
    from ..logs import setup_logging
    from ..progress import make_reporter

    reporter = make_reporter(progress)
    log_path = setup_logging(log_dir, run_id, reporter=reporter, verbose=verbose)
    options = storage_options()
    if options:
        from ..logs import FATAL
        from ..storage import Redactor

        for handler in {*logging.getLogger("amplitude_export").handlers, *FATAL.handlers}:
            handler.addFilter(Redactor(options))
    return reporter, log_path

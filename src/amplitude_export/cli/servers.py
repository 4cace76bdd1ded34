"""The commands that serve rather than move data: the fake Export API, and the demo that runs against it."""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from ..errors import UsageError
from .app import EXIT_CODES, cli, reports_errors
from .options import make_dirs


def _hour_list(option: str, text: str | None) -> list[datetime]:
    """A comma-separated list of hours (any --start format), for a flag named `option`."""
    from ..windows import parse_hour

    try:
        return [parse_hour(item) for item in (text or "").split(",") if item.strip()]
    except UsageError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _fault_list(text: str | None) -> list[str]:
    from ..fake_server import FAULTS

    faults = [item.strip().lower() for item in (text or "").split(",") if item.strip()]
    unknown = [fault for fault in faults if fault not in FAULTS]
    if unknown:
        raise UsageError(f"--faults: unknown {', '.join(map(repr, unknown))}; choose from {','.join(FAULTS)}")
    return faults


@cli.command("fake-server", epilog=EXIT_CODES)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="0 picks a free port (the URL is printed on stderr).",
)
@click.option("--api-key", default="demo-key", show_default=True, help="The key the server accepts.")
@click.option("--secret-key", default="demo-secret", help="The secret the server accepts (default demo-secret).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same events.")
@click.option(
    "--project-id",
    type=click.IntRange(min=1),
    default=187520,
    show_default=True,
    help="The project id in member names and events.",
)
@click.option(
    "--events-per-hour",
    type=click.IntRange(min=0),
    default=None,
    help="Event lines per hour (default: a realistic day, about 40 at night to 200 at the peak).",
)
@click.option(
    "--members-per-hour",
    type=click.IntRange(1, 1000),
    default=1,
    show_default=True,
    help="Archive members each hour is split into (#0, #1, ...).",
)
@click.option("--data-start", help="No data before this UTC hour (404 for windows wholly before it).")
@click.option("--data-end", help="No data after this UTC hour (a bare date means its hour 23).")
@click.option("--empty-hours", metavar="HOURS", help="Comma-separated hours without data, e.g. 2024-03-01T05.")
@click.option(
    "--malformed-lines", is_flag=True, help="Put one non-JSON line and one JSON array into each hour's first member."
)
@click.option(
    "--variation",
    type=click.FloatRange(0, 1),
    default=None,
    help="Share of lines that vary as real exports do (documented types, omitted and new keys, "
    "numbers as strings, ...; default 0.02); 0 for uniform lines.",
)
@click.option(
    "--faults",
    metavar="LIST",
    help="Comma-separated faults for the first requests of every window, in order; from: "
    "500, 502, 503, 504, 429, truncate, corrupt, notzip, slow, stall, reset.",
)
@click.option(
    "--fault-rate",
    type=click.FloatRange(0, 0.9),
    default=0.0,
    show_default=True,
    help="Share of requests after --faults answered with a random transient fault (500, 503, 429, truncated body).",
)
@click.option(
    "--retry-after",
    type=click.FloatRange(min=0),
    default=1,
    show_default=True,
    help="Seconds in the Retry-After header of a 429.",
)
@click.option(
    "--slow-seconds",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="How long a `slow` fault waits before answering, and a `stall` half-way through the body.",
)
@click.option(
    "--timeout-over-hours",
    type=click.IntRange(min=0),
    default=None,
    help="Answer 504 for windows longer than this many hours, as large exports do.",
)
@click.option(
    "--max-archive-bytes",
    type=click.IntRange(min=1),
    default=None,
    help="Answer 400 (too large) for windows whose zip would be bigger, as Amplitude does over 4 GB.",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Keep the built members here between runs (default: a temporary directory).",
)
@click.option(
    "--cohort-polls",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Status polls a cohort download answers JOB INPROGRESS before JOB COMPLETED.",
)
@click.option(
    "--cohort-quota",
    type=click.IntRange(min=0),
    default=500,
    show_default=True,
    help="Cohort downloads left this month; then 429 QuotaExceeded.",
)
@click.option(
    "--cohort-redirect-over",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Cohorts with more members send their file behind a 302 to a pre-signed link.",
)
@click.option("--taxonomy-forbidden", is_flag=True, help="Taxonomy answers 403, as for a project without the plan.")
@click.option(
    "--delete-users",
    metavar="IDS",
    help="Comma-separated amplitude ids (or user ids) in a finished deletion job: gone from exports.",
)
@click.option(
    "--api-latency",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds each answer of the other APIs takes (lets concurrent clients overlap).",
)
@reports_errors
def fake_server(
    host: str,
    port: int,
    api_key: str,
    secret_key: str,
    seed: int,
    project_id: int,
    events_per_hour: int | None,
    members_per_hour: int,
    data_start: str | None,
    data_end: str | None,
    empty_hours: str | None,
    malformed_lines: bool,
    variation: float | None,
    faults: str | None,
    fault_rate: float,
    retry_after: float,
    slow_seconds: float,
    timeout_over_hours: int | None,
    max_archive_bytes: int | None,
    cache_dir: Path | None,
    cohort_polls: int,
    cohort_quota: int,
    cohort_redirect_over: int,
    taxonomy_forbidden: bool,
    delete_users: str | None,
    api_latency: float,
) -> None:
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
    from ..fake_server import serve
    from ..windows import parse_hour

    first = parse_hour(data_start) if data_start is not None else None
    last = parse_hour(data_end, is_end=True) if data_end is not None else None
    if first and last and last < first:
        raise UsageError(f"--data-end {data_end} is before --data-start {data_start}")
    options: dict[str, Any] = {"events_per_hour": events_per_hour} if events_per_hour is not None else {}

    def announce(url: str) -> None:
        click.echo(
            f"fake Export API on {url} (pass it as --base-url; it serves /api/2/export with api key "
            f"{api_key!r}); Ctrl-C stops",
            err=True,
        )

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    serve(
        host,
        port,
        ready=announce,
        api_key=api_key,
        secret_key=secret_key,
        seed=seed,
        project_id=project_id,
        members_per_hour=members_per_hour,
        data_start=first,
        data_end=last,
        empty_hours=_hour_list("--empty-hours", empty_hours),
        malformed_lines=malformed_lines,
        **({} if variation is None else {"variation": variation}),
        faults=_fault_list(faults),
        fault_rate=fault_rate,
        retry_after=retry_after,
        slow_seconds=slow_seconds,
        timeout_over_hours=timeout_over_hours,
        max_archive_bytes=max_archive_bytes,
        cache_dir=cache_dir,
        apis={
            "cohort_polls": cohort_polls,
            "cohort_quota": cohort_quota,
            "cohort_redirect_over": cohort_redirect_over,
            "taxonomy_forbidden": taxonomy_forbidden,
            "latency": api_latency,
            "delete_users": [item.strip() for item in (delete_users or "").split(",") if item.strip()],
        },
        **options,
    )


@cli.command(epilog=EXIT_CODES)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=Path("demo-data"),
    show_default=True,
    help="Where the demo's archives, DuckDB file and logs go.",
)
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
    from ..demo import run_demo

    make_dirs(data_dir=data_dir)
    sys.exit(run_demo(data_dir, days=days, progress=progress))

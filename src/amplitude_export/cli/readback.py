"""The commands that read a destination back: `status`, `verify` and `report`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import reads
from .app import EXIT_CODES, cli, reports_errors
from .options import HOUR_FORMS, dest_options, destination, schema, sink_options, storage_options
from .render import print_verification


@cli.command(epilog=EXIT_CODES)
@dest_options
@click.option("--api-key", help="Only to name the project (default project name). Env: AMP_API_KEY.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("data"), show_default=True)
@click.option(
    "--hours",
    "by_hour",
    is_flag=True,
    help="One line per ledger hour: counts, attempts, min/max times, content hash, members.",
)
@click.option("--start", help=f"First UTC upload hour to show: {HOUR_FORMS}.")
@click.option("--end", help="Last UTC upload hour to show, inclusive (a bare date means its hour 23).")
@click.option("--json", "as_json", is_flag=True, help="Print the spans and every ledger field of every hour as JSON.")
@reports_errors
def status(
    dest: str | None,
    project: str | None,
    api_key: str | None,
    data_dir: Path,
    by_hour: bool,
    start: str | None,
    end: str | None,
    as_json: bool,
) -> None:
    """Show every window the destination knows (loaded, empty, failed with reason) and where the next run starts.

    With --hours, the ledger itself: one line per upload hour. --start/--end limit what is shown.

    \b
    Example:
      amplitude-export status
      amplitude-export status --hours --start 2024-03-01 --end 2024-03-01
      amplitude-export status --dest parquet:events/ --json
    """
    import json

    from ..status import render_status

    data = reads.status(
        dest,
        project=project,
        api_key=api_key,
        data_dir=data_dir,
        start=start,
        end=end,
        schema=schema(),
        storage_options=storage_options(),
    )
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        render_status(data, hours=by_hour)


@cli.command(epilog=EXIT_CODES)
@dest_options
@click.option("--api-key", help="Only to name the project (default project name). Env: AMP_API_KEY.")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=Path("data"),
    show_default=True,
    help="With --deep, the archives kept under DATA_DIR/raw are hashed again.",
)
@click.option("--deep", is_flag=True, help="Also re-read the kept archives and compare their hashes.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts and every problem, hour by hour, as JSON.")
@reports_errors
def verify(
    dest: str | None, project: str | None, api_key: str | None, data_dir: Path, deep: bool, as_json: bool
) -> None:
    """Prove the destination is complete: every hour from the first to the last loaded is present and whole.

    Compares the ledger with the rows of `events` per upload hour; exit 0 when complete, 1 naming the bad hours
    (a line per run of consecutive hours with the same problem; --json lists every hour). Counts the hours loaded
    and those empty (the Export API had no data for them). A project with no events hours but the tables of
    `run --streams` has nothing to check: it says so and exits 0; a project with nothing loaded exits 1.

    \b
    Example:
      amplitude-export verify
      amplitude-export verify --dest parquet:events/ --deep
      amplitude-export verify --json
    """
    result = reads.verify(
        dest,
        project=project,
        api_key=api_key,
        data_dir=data_dir,
        deep=deep,
        schema=schema(),
        storage_options=storage_options(),
    )
    print_verification(result, as_json=as_json)
    sys.exit(0 if result.complete else 1)


@cli.command(epilog=EXIT_CODES)
@dest_options
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("data"), show_default=True)
@click.option("--start", help="First UTC upload hour (default: the first the destination holds).")
@click.option("--end", help="Last UTC upload hour, inclusive (default: the last).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("report.html"), show_default=True)
@reports_errors
def report(
    dest: str | None, project: str | None, data_dir: Path, start: str | None, end: str | None, out: Path
) -> None:
    """Write one self-contained HTML report (charts, data health, windows) that opens offline.

    \b
    Example:
      amplitude-export report --out report.html
      amplitude-export report --dest parquet:events/ --start 2024-03-01 --end 2024-03-07
    """
    from ..report import write_report
    from ..windows import parse_hour

    path = write_report(
        destination(dest, data_dir),
        out,
        start=parse_hour(start) if start is not None else None,
        end=parse_hour(end, is_end=True) if end is not None else None,
        project=project,
        **sink_options(),
    )
    click.echo(f"report written to {path}")

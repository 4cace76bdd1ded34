"""`maintain`: housekeeping of the table formats (iceberg:, delta:)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UsageError
from .app import EXIT_CODES, cli, reports_errors
from .options import dest_options
from .options import destination as _dest
from .options import sink_options as _sink_options


@cli.command(epilog=EXIT_CODES)
@dest_options
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("data"), show_default=True)
@click.option("--older-than", "older_than", type=click.IntRange(0, None), default=168, show_default=True,
              metavar="HOURS", help="iceberg: expire snapshots, and delete unreferenced files, older than this. 0 only "
              "while no run writes: a run's files are unreferenced until it commits.")
@click.option("--compact/--no-compact", default=True, show_default=True,
              help="iceberg: rewrite each upload day's small files into few large ones first (delta: always).")
@click.option("--retain-hours", type=click.IntRange(min=1), default=None,
              help="delta: keep the files that versions of the last N hours need (readers of older snapshots, "
                   "time travel); default: the table's own setting (delta.deletedFileRetentionDuration, "
                   "7 days unless set).")
@reports_errors
def maintain(dest: str | None, project: str | None, data_dir: Path, older_than: int, compact: bool,
             retain_hours: int | None) -> None:
    """Housekeeping of a table destination (iceberg:, delta:): compact small files, drop what no recent
    snapshot or version needs.

    Hourly runs make one small file per hour and reloads leave replaced files behind; this keeps the table
    fast to read and its storage bounded. Rows and ledger are unchanged. See docs/ICEBERG.md and docs/DELTA.md.

    \b
    Example:
      amplitude-export maintain --dest iceberg:warehouse/
      amplitude-export maintain --dest iceberg:warehouse/ --older-than 24 --no-compact
      amplitude-export maintain --dest delta:events/
      amplitude-export maintain --dest delta:s3://bucket/amplitude --retain-hours 24
    """
    from datetime import timedelta

    from ..sinks import open_sink

    if dest is None:
        raise UsageError("maintain needs --dest (an iceberg: or delta: table)")
    url = _dest(dest, data_dir)
    sink = open_sink(url, **_sink_options())
    try:
        housekeeping = getattr(sink, "maintain", None)
        if housekeeping is None:
            raise UsageError(f"{sink.description}: maintain applies to iceberg: and delta: tables "
                             "(the other destinations need none)")
        if url.lower().startswith("delta:"):
            click.echo(housekeeping(retain_hours=retain_hours))
        else:
            done = housekeeping(compact=compact, older_than=timedelta(hours=older_than))
            click.echo(f"{sink.description}: {done.summary()}")
    finally:
        sink.close()

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
@click.option("--older-than", "older_than", default=None, metavar="AGE",
              help="Delete what no snapshot or version younger than this needs: 7d, 24h, 90m, or 0 (only while no "
                   "run writes: a run's files are unreferenced until it commits). Default: iceberg: 7d; delta: the "
                   "table's delta.deletedFileRetentionDuration (7 days unless set).")
@click.option("--compact/--no-compact", default=True, show_default=True,
              help="First rewrite small files into few large ones.")
@click.option("--repair", is_flag=True,
              help="First drop the data files the table names that storage no longer holds (deleted outside "
                   "amplitude-export), and mark every loaded hour whose rows no longer match the ledger failed: "
                   "the next run loads those hours again.")
@reports_errors
def maintain(dest: str | None, project: str | None, data_dir: Path, older_than: str | None, compact: bool,
             repair: bool) -> None:
    """Housekeeping of a table destination (iceberg:, delta:): compact small files, drop what no recent
    snapshot or version needs.

    Hourly runs make one small file per hour and reloads leave replaced files behind; this keeps the table
    fast to read and its storage bounded. Rows and ledger are unchanged, except by --repair. See docs/ICEBERG.md
    and docs/DELTA.md.

    \b
    Example:
      amplitude-export maintain --dest iceberg:warehouse/
      amplitude-export maintain --dest iceberg:warehouse/ --older-than 24h --no-compact
      amplitude-export maintain --dest delta:s3://bucket/amplitude --older-than 7d
      amplitude-export maintain --dest delta:events/ --repair    # after a data file was deleted by hand
    """
    from ..sinks.maintenance import maintain as maintain_table

    if dest is None:
        raise UsageError("maintain needs --dest (an iceberg: or delta: table)")
    click.echo(maintain_table(_dest(dest, data_dir), compact=compact, older_than=older_than, repair=repair,
                              **_sink_options()).summary())

"""What the commands print: a run's summary lines and the verdict of `verify`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from ..verify import Verification


def print_run(summary: str, log_path: Path | None) -> None:
    """A run's summary lines, then where its log is."""
    if summary:
        click.echo(summary)
    if log_path:
        click.echo(f"log: {log_path}")


def print_verification(result: Verification, *, as_json: bool = False) -> None:
    """`verify`: the problems as runs of consecutive hours, what it did not check (the tables of `run --streams`
    when there are no events hours, the destination's other projects), then one line with the counts and the
    verdict; or, `as_json`, everything hour by hour."""
    from ..pipeline import plural
    from ..status import also_holds

    if as_json:
        click.echo(
            json.dumps({"destination": result.destination, "project": result.project, **result.to_dict()}, indent=2)
        )
        return
    if result.problems:
        runs = result.runs
        click.echo(
            f"{plural(len(result.problems), 'problem')}"
            + (f" in {plural(len(runs), 'run')} of hours:" if len(runs) < len(result.problems) else ":")
        )
        for run_of_hours in runs:
            click.echo(f"  {run_of_hours.describe()}")
    if result.first is None and result.tables:
        click.echo(f"no events hours are recorded for project {result.project}; it holds only the tables of "
                   f"run --streams ({', '.join(result.tables)}), whose rows verify does not check")
    if result.other_projects:
        click.echo(also_holds(result.other_projects, "verify"))
    span = (f"{result.first:%Y-%m-%dT%H}..{result.last:%Y-%m-%dT%H}" if result.first and result.last
            else "no events hours")
    verdict = "complete" if result.complete else "NOT complete"
    click.echo(
        f"{span}: {result.hours_checked:,} hours checked ({result.hours_loaded:,} loaded, "
        f"{result.hours_empty:,} empty), {result.archives_hashed:,} archive hours hashed: {verdict}"
    )

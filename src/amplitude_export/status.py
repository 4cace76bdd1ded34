"""What the destination holds: the ledger grouped into spans of hours, and where the next run starts."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from .ledger import HourRecord
from .pipeline import incremental_start
from .sinks import Sink
from .windows import HOUR, label_hour


def spans(ledger: dict[datetime, HourRecord]) -> list[dict[str, Any]]:
    """Consecutive hours with the same status (and reason) as one span each, with their totals."""
    out: list[dict[str, Any]] = []
    for hour in sorted(ledger):
        record = ledger[hour]
        last = out[-1] if out else None
        same_day = last is not None and last["_last"].date() == hour.date()
        if last and same_day and last["_last"] + HOUR == hour and last["status"] == record.status \
                and last["reason"] == record.reason:
            span = last
        else:
            span = {"start": label_hour(hour), "end": label_hour(hour), "status": record.status,
                    "reason": record.reason, "hours": 0, "events": 0, "duplicates": 0, "rejects": 0, "bytes": 0,
                    "run_id": record.run_id, "_last": hour}
            out.append(span)
        span["end"] = label_hour(hour)
        span["_last"] = hour
        span["hours"] += 1
        span["events"] += record.events_loaded
        span["duplicates"] += record.duplicates
        span["rejects"] += record.rejects
        span["bytes"] += record.bytes
        span["run_id"] = record.run_id
    for span in out:
        del span["_last"]
    return out


def status_data(sink: Sink, project: str) -> dict[str, Any]:
    """Everything `status` shows, as plain data (the `--json` form)."""
    ledger = sink.ledger(project)
    resume = incremental_start(ledger)
    return {
        "destination": sink.description,
        "project": project,
        "next_run_starts": label_hour(resume) if resume else None,
        "hours": len(ledger),
        "events": sum(r.events_loaded for r in ledger.values()),
        "failed_hours": [label_hour(h) for h, r in sorted(ledger.items()) if r.status in ("failed", "too_large")],
        "windows": spans(ledger),
    }


def render_status(data: dict[str, Any], console: Console | None = None) -> None:
    """Print `status_data` as a table."""
    # off a terminal (a pipe, a log) rich assumes 80 columns: give it room rather than cut hours short
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"{data['destination']} (project {data['project']})")
    for name in ("start", "end", "status", "events", "duplicates", "rejects", "bytes", "reason"):
        numeric = name in ("events", "duplicates", "rejects", "bytes")
        table.add_column(name, justify="right" if numeric else "left", no_wrap=name != "reason")
    for span in data["windows"]:
        style = {"failed": "red", "too_large": "red", "empty": "dim"}.get(span["status"])
        table.add_row(span["start"], span["end"], span["status"], f"{span['events']:,}", f"{span['duplicates']:,}",
                      f"{span['rejects']:,}", f"{span['bytes']:,}", span["reason"] or "", style=style)
    console.print(table)
    if not data["windows"]:
        console.print("nothing loaded yet: the first `run` without --start takes yesterday")
    else:
        console.print(f"{data['events']:,} events in {data['hours']} hours; next run starts at "
                      f"{data['next_run_starts']} UTC")
    if data["failed_hours"]:
        console.print(f"[red]{len(data['failed_hours'])} hours failed; the next run retries them[/red]")

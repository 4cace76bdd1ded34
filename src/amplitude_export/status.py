"""What the destination holds: the ledger grouped into spans of hours, or hour by hour, and where the next run
starts.

`spans` cuts at midnight in the `--json` form (the report shows the same); the table does not, so a month
loaded is one line.
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from .ledger import EMPTY, FAILED, LOADED, TOO_LARGE, HourRecord, incremental_start, spans
from .sinks import Sink
from .table_ledger import TableState, describe
from .windows import Window, hour_runs, label_hour, parse_hour

HASH_CHARS = 12  # enough of a sha256 to tell two versions of an hour apart by eye
_STYLES = {FAILED: "red", TOO_LARGE: "red", EMPTY: "dim"}


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def hour_range(start: str | None, end: str | None) -> tuple[datetime | None, datetime | None]:
    """`--start`/`--end` as UTC hours (either may be open; a bare end date means its hour 23)."""
    first = parse_hour(start) if start is not None else None
    last = parse_hour(end, is_end=True) if end is not None else None
    if first is not None and last is not None:
        Window(first, last)  # refuses an end before the start
    return first, last


def status_data(
    sink: Sink, project: str, *, start: datetime | None = None, end: datetime | None = None
) -> dict[str, Any]:
    """Everything `status` shows, as plain data (the `--json` form).

    `windows` groups the hours into spans (cut at midnight); `ledger` is every ledger row in full, one per hour
    (`HourRecord.to_dict`, members with name, size and CRC). `start`/`end` limit both, and the totals, to those
    hours; `next_run_starts` always comes from the whole ledger.
    """
    full = sink.ledger(project)
    ledger = {hour: record for hour, record in full.items()
              if (start is None or hour >= start) and (end is None or hour <= end)}
    resume = incremental_start(full)
    return {
        "destination": sink.description,
        "project": project,
        "start": label_hour(start) if start else None,
        "end": label_hour(end) if end else None,
        "next_run_starts": label_hour(resume) if resume else None,
        "other_projects": [name for name in sink.projects() if name != project],
        "hours": len(ledger),
        "hours_loaded": sum(r.status == LOADED for r in ledger.values()),
        "hours_empty": sum(r.status == EMPTY for r in ledger.values()),
        "events": sum(r.events_loaded for r in ledger.values()),
        "failed_hours": [label_hour(h) for h, r in sorted(ledger.items()) if r.status in (FAILED, TOO_LARGE)],
        # hours between the first and the last the ledger records that it does not: runs of explicit ranges left
        # them, and a run without --start never asks for them
        "missing_hours": [label_hour(h) for h in Window(min(ledger), max(ledger)).each_hour() if h not in ledger]
        if ledger else [],
        "windows": spans(ledger),
        "ledger": [ledger[hour].to_dict() for hour in sorted(ledger)],
        # deletion jobs applied (docs/PRIVACY.md); a sink without a deletions ledger has none
        "deletions": [r.to_dict() for r in getattr(sink, "deletion_records", lambda _project: [])(project)],
        # the tables of `run --streams` (a destination without them answers none)
        "tables": [state.to_dict() for state in getattr(sink, "table_states", lambda _: {})(project).values()],
    }


def also_holds(projects: list[str], verb: str) -> str:
    """The line `status` and `verify` print when the destination holds projects besides the one they read."""
    return (f"the destination also holds project{'s' if len(projects) > 1 else ''} {', '.join(projects)}: "
            f"--project names which one to {verb}")


def _moment(value: datetime | None, hour: datetime) -> str:
    """A time in the hour's row: the time alone on the hour's own day, else with its date."""
    if value is None:
        return ""
    return f"{value:%H:%M:%S}" if value.date() == hour.date() else f"{value:%Y-%m-%d %H:%M:%S}"


def _between(low: datetime | None, high: datetime | None, hour: datetime) -> str:
    return f"{_moment(low, hour)}..{_moment(high, hour)}" if low or high else ""


def _range_words(start: str | None, end: str | None) -> str:
    if start and end:
        return f" from {start} to {end}"
    return f" from {start} on" if start else f" up to {end}" if end else ""


def _spans_table(data: dict[str, Any]) -> Table:
    table = Table(title=f"{data['destination']} (project {data['project']})")
    for name in ("start", "end", "status", "events", "duplicates", "rejects", "bytes", "reason"):
        numeric = name in ("events", "duplicates", "rejects", "bytes")
        table.add_column(name, justify="right" if numeric else "left", no_wrap=name != "reason")
    records = {record.hour: record for record in map(HourRecord.from_dict, data["ledger"])}
    for span in spans(records, by_day=False):
        table.add_row(span["start"], span["end"], span["status"], f"{span['events']:,}", f"{span['duplicates']:,}",
                      f"{span['rejects']:,}", f"{span['bytes']:,}", span["reason"] or "",
                      style=_STYLES.get(span["status"]))
    return table


def _hours_table(data: dict[str, Any]) -> Table:
    table = Table(title=f"{data['destination']} (project {data['project']}), hour by hour",
                  caption="times UTC; a time without a date is on the hour's own day")
    columns = ("hour", "status", "events", "dups", "rejects", "lines", "bytes", "tries", "split from",
               "server_upload_time", "event_time", "hash", "members", "reason")
    for name in columns:
        numeric = name in ("events", "dups", "rejects", "lines", "bytes", "tries", "members")
        table.add_column(name, justify="right" if numeric else "left", no_wrap=name != "reason")
    for row in data["ledger"]:
        record = HourRecord.from_dict(row)
        hour = record.hour
        table.add_row(
            label_hour(hour), record.status, f"{record.events_loaded:,}", f"{record.duplicates:,}",
            f"{record.rejects:,}", f"{record.lines_read:,}", f"{record.bytes:,}", str(record.attempts),
            record.split_from or "",
            _between(record.min_server_upload_time, record.max_server_upload_time, hour),
            _between(record.min_event_time, record.max_event_time, hour),
            (record.content_hash or "")[:HASH_CHARS], str(len(record.members)), record.reason or "",
            style=_STYLES.get(record.status),
        )
    return table


def render_status(data: dict[str, Any], console: Console | None = None, *, hours: bool = False) -> None:
    """Print `status_data` as a table: one row per span of hours, or with `hours` one row per ledger hour."""
    # off a terminal (a pipe, a log) rich assumes 80 columns: give it room rather than cut hours short
    console = console or Console(width=None if sys.stdout.isatty() else (220 if hours else 160))
    console.print(_hours_table(data) if hours else _spans_table(data))
    limited = _range_words(data["start"], data["end"])
    if not data["windows"]:
        console.print(f"no ledger hours{limited}" if limited else
                      "no events loaded yet: the first `run` without --start takes yesterday")
    else:
        resume = data["next_run_starts"]
        nxt = f"next run starts at {resume} UTC" if resume else "the next run without --start takes yesterday"
        empty = data["hours_empty"]
        console.print(f"{data['events']:,} events in {_plural(data['hours'], 'hour')}{limited} "
                      f"({data['hours_loaded']:,} loaded, {empty:,} empty"
                      f"{': the Export API had no data for them' if empty else ''}); {nxt}")
    if data.get("other_projects"):
        console.print(also_holds(data["other_projects"], "show"), highlight=False)
    if data["failed_hours"]:
        console.print(f"[red]{_plural(len(data['failed_hours']), 'hour')} failed; the next run retries them[/red]")
    if data.get("missing_hours"):
        gaps = [window for window, _ in hour_runs((parse_hour(h), None) for h in data["missing_hours"])]
        shown = ", ".join(f"{label_hour(w.start)}..{label_hour(w.end)}" for w in gaps[:5])
        console.print(f"[yellow]{_plural(len(data['missing_hours']), 'hour')} between the first and the last are "
                      f"missing ({shown}{', ...' if len(gaps) > 5 else ''}): a run with --start and --end over "
                      "them loads them[/yellow]", highlight=False)
    for job in data.get("deletions", []):
        console.print(f"deletion job {job['day']} ({job['status']}): {_plural(len(job['amplitude_ids']), 'user')}, "
                      f"{job['rows_deleted']:,} events rows and {job['cohort_rows_deleted']:,} cohort_members rows "
                      f"deleted, applied {job['applied_at']}", highlight=False)
    if data.get("tables"):
        console.print(_tables_table(data))


def _tables_table(data: dict[str, Any]) -> Table:
    table = Table(title="other streams (run --streams)")
    for name in ("table", "refresh", "rows", "loaded at (UTC)", "run", "state"):
        table.add_column(name, justify="right" if name == "rows" else "left", no_wrap=name != "state")
    for row in data["tables"]:
        state = TableState.from_dict(row)
        loaded = f"{state.loaded_at:%Y-%m-%d %H:%M:%S}" if state.loaded_at else ""
        table.add_row(state.table, state.refresh, f"{state.rows:,}", loaded, state.run_id or "", describe(state),
                      style="yellow" if state.note else None)
    return table

"""The report's figures: every number on the page, from a snapshot's ledger and SQL over its `events` table.

Only aggregates leave DuckDB, so the figures grow with the number of days and hours in the range, not with the
number of events.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb

from ..ledger import DONE, HourRecord, spans
from ..windows import HOUR, Window, floor_hour, label_hour
from .health import health
from .snapshot import Snapshot, query_rows

TOP = 15  # rows kept for event types and countries; the rest is one "(other)" row
HOURLY_DAYS = 92  # the hourly chart covers at most the range's last 92 days (about 2,200 bars)
MISSING = "not loaded"  # an hour in range with no ledger row: no run has asked for it
DAY = timedelta(days=1)

# Lateness buckets: (label, upper bound in seconds); an event lands in the first bucket whose bound exceeds it.
LATENESS_BUCKETS: tuple[tuple[str, float], ...] = (
    ("< 1 min", 60),
    ("1-5 min", 300),
    ("5-15 min", 900),
    ("15-60 min", 3_600),
    ("1-6 h", 6 * 3_600),
    ("6-24 h", 86_400),
    ("1-3 days", 3 * 86_400),
    ("3-7 days", 7 * 86_400),
    ("> 7 days", math.inf),
)


def _iso_hour(column: str) -> str:
    """SQL for an hour as a string JavaScript parses as UTC (timestamps never leave DuckDB as objects)."""
    return f"strftime({column}, '%Y-%m-%dT%H:00:00Z')"


def _resolve_range(
    snapshot: Snapshot, start: datetime | None, end: datetime | None
) -> tuple[datetime, datetime] | None:
    """First and last upload hour of the report (inclusive), defaulting to what the destination holds."""
    if start is None or end is None:
        stored = snapshot.con.execute(
            f"SELECT {_iso_hour('min(_upload_hour)')}, {_iso_hour('max(_upload_hour)')} FROM events"
        ).fetchall()[0]
        hours = [*snapshot.ledger, *(datetime.fromisoformat(h) for h in stored if h is not None)]
        if not hours:
            return None
        start = start or min(hours)
        end = end or max(hours)
    first, last = floor_hour(start), floor_hour(end)
    Window(first, last)  # refuses an end before the start
    return first, last


def gather(snapshot: Snapshot, *, start: datetime | None = None, end: datetime | None = None) -> dict[str, Any]:
    """Every figure of the report, as JSON-ready data, from a snapshot of the destination.

    Upload-time figures (hourly, lateness, health, windows) cover events whose upload hour is in the range;
    event-time figures (daily, users, types, platforms, countries) cover events whose `event_time` is in it.
    """
    con = snapshot.con
    meta: dict[str, Any] = {
        "project": snapshot.project,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "hourly_days": HOURLY_DAYS,
    }
    resolved = _resolve_range(snapshot, start, end)
    if resolved is None:
        meta.update(start=None, end=None)
        return {"meta": meta, **_empty_figures()}
    first, last = resolved
    stop = last + HOUR  # exclusive
    meta.update(start=label_hour(first), end=label_hour(last))
    upload = "_upload_hour >= ? AND _upload_hour < ?"
    occurred = "event_time >= ? AND event_time < ?"
    span = [first, stop]

    ledger = {hour: record for hour, record in sorted(snapshot.ledger.items()) if first <= hour < stop}
    stored = _stored_per_hour(con, upload, span)
    hourly = _hourly(ledger, stored, first, last)
    complete_through = _complete_until(ledger, first, last)
    lateness = _lateness(con, upload, span)
    p99 = lateness["quantiles"].get("p99")
    daily = _daily(con, occurred, span, first, last, complete_through, p99)
    totals = query_rows(
        con,
        f"SELECT count(*) AS events, count(DISTINCT amplitude_id) AS users FROM events WHERE {upload}",
        span,
    )[0]
    by_status: dict[str, int] = {}
    for record in ledger.values():
        by_status[record.status] = by_status.get(record.status, 0) + 1
    hours_total = int((stop - first) / HOUR)
    totals.update(
        hours=hours_total,
        hours_by_status={**by_status, MISSING: hours_total - len(ledger)}
        if hours_total > len(ledger)
        else by_status,
        duplicates=sum(r.duplicates for r in ledger.values()),
        rejects=sum(r.rejects for r in ledger.values()),
        lines_read=sum(r.lines_read for r in ledger.values()),
        bytes=sum(r.bytes for r in ledger.values()),
        # the last hour of the unbroken run of loaded or empty hours the range starts with
        complete_through=label_hour(complete_through - HOUR) if complete_through else None,
    )
    meta["hourly_from"] = hourly[0]["hour"] if hourly else None
    return {
        "meta": meta,
        "totals": totals,
        "hourly": hourly,
        "daily": daily,
        "event_types": _top(con, "event_type", occurred, span),
        "platforms": _top(con, "platform", occurred, span),
        "countries": _top(con, "country", occurred, span),
        "lateness": lateness,
        "health": health(con, ledger, stored, upload, span),
        "windows": spans(ledger),
        "streams": _streams(snapshot.streams, first, stop),
    }


def _streams(streams: dict[str, Any], first: datetime, stop: datetime) -> dict[str, Any]:
    """The "Other streams" figures: each table's rows and when it was loaded, the cohorts by size (archived ones
    left out), and the annotations whose start falls on an event day of the range (drawn on the daily chart)."""
    states = streams.get("states") or {}
    if not states:
        return {}
    tables = [{"table": name, "rows": state.rows, "note": state.note or "",
               "loaded_at": state.loaded_at.astimezone(UTC).isoformat(timespec="seconds") if state.loaded_at else ""}
              for name, state in sorted(states.items())]
    cohorts = [{"cohort": row["name"], "id": row["id"], "size": row["size"],
                "last_computed": row["last_computed"].astimezone(UTC).isoformat(timespec="minutes")
                if row.get("last_computed") else ""}
               for row in streams.get("cohorts", []) if not row.get("archived")]
    cohorts.sort(key=lambda row: (-(row["size"] or 0), str(row["cohort"])))
    days = (first.date(), (stop - HOUR).date())
    annotations = [{"day": row["starts_at"].astimezone(UTC).date().isoformat(), "label": row["label"] or "",
                    "category": row["category"] or ""}
                   for row in streams.get("annotations", [])
                   if row.get("starts_at") and days[0] <= row["starts_at"].astimezone(UTC).date() <= days[1]]
    annotations.sort(key=lambda row: (row["day"], row["label"]))
    return {"tables": tables, "cohorts": cohorts, "annotations": annotations}


def _empty_figures() -> dict[str, Any]:
    return {
        "totals": {"events": 0, "users": 0, "hours": 0, "hours_by_status": {}, "duplicates": 0, "rejects": 0,
                   "lines_read": 0, "bytes": 0, "complete_through": None},
        "hourly": [], "daily": [], "event_types": [], "platforms": [], "countries": [],
        "lateness": {"buckets": [{"bucket": label, "order": i, "events": 0}
                                 for i, (label, _) in enumerate(LATENESS_BUCKETS)],
                     "quantiles": {}, "negative": 0, "unknown": 0},
        "health": {"duplicates": 0, "rejects": 0, "retried_hours": [], "split_windows": [], "failed": [],
                   "unknown_fields": [], "ledger_mismatches": []},
        "windows": [], "streams": {},
    }  # fmt: skip


def _complete_until(ledger: dict[datetime, HourRecord], first: datetime, last: datetime) -> datetime | None:
    """The end (exclusive) of the unbroken run of loaded or empty hours the range starts with; None if none."""
    hour = first
    while hour <= last and hour in ledger and ledger[hour].status in DONE:
        hour += HOUR
    return hour if hour > first else None


def _stored_per_hour(con: duckdb.DuckDBPyConnection, upload: str, span: list[datetime]) -> dict[str, int]:
    """Events stored per upload hour, keyed by `label_hour` (grouped first, formatted after: 10 M rows stay fast)."""
    rows = query_rows(
        con,
        "SELECT strftime(hour, '%Y-%m-%dT%H') AS hour, n FROM ("
        f"SELECT _upload_hour AS hour, count(*) AS n FROM events WHERE {upload} GROUP BY 1)",
        span,
    )
    return {row["hour"]: row["n"] for row in rows}


def _hourly(
    ledger: dict[datetime, HourRecord], stored: dict[str, int], first: datetime, last: datetime
) -> list[dict[str, Any]]:
    """One row per upload hour of the range's last HOURLY_DAYS days: events stored and the ledger's status."""
    rows = []
    hour = max(first, last + HOUR - HOURLY_DAYS * DAY)
    while hour <= last:
        label = label_hour(hour)
        record = ledger.get(hour)
        row: dict[str, Any] = {
            "hour": f"{label}:00:00Z",
            "events": stored.get(label, 0),
            "status": record.status if record else MISSING,
        }
        if record and record.reason:
            row["reason"] = record.reason
        if record and record.attempts > 1:
            row["attempts"] = record.attempts
        if record and record.split_from:
            row["split_from"] = record.split_from
        rows.append(row)
        hour += HOUR
    return rows


def _daily(
    con: duckdb.DuckDBPyConnection,
    occurred: str,
    span: list[datetime],
    first: datetime,
    last: datetime,
    complete_through: datetime | None,
    p99: float | None,
) -> list[dict[str, Any]]:
    """Per UTC day of `event_time`: events, distinct users, new users; `final` once late events have had time."""
    per_day = {
        row["day"]: row
        for row in query_rows(
            con,
            "SELECT strftime(day, '%Y-%m-%d') AS day, events, users FROM (SELECT "
            "CAST(timezone('UTC', event_time) AS DATE) AS day, count(*) AS events, "
            f"count(DISTINCT amplitude_id) AS users FROM events WHERE {occurred} GROUP BY 1)",
            span,
        )
    }
    # first seen anywhere in the destination, not just in the range: a user back after a month is not new
    new = {
        row["day"]: row["n"]
        for row in query_rows(
            con,
            "SELECT strftime(timezone('UTC', first_seen), '%Y-%m-%d') AS day, count(*) AS n FROM ("
            "SELECT min(event_time) AS first_seen FROM events WHERE amplitude_id IS NOT NULL "
            "GROUP BY amplitude_id) WHERE first_seen >= ? AND first_seen < ? GROUP BY 1",
            span,
        )
    }
    settle = timedelta(seconds=p99 or 0)
    rows = []
    day = first.date()
    while day <= last.date():
        key = day.isoformat()
        found = per_day.get(key, {})
        day_end = datetime(day.year, day.month, day.day, tzinfo=UTC) + DAY
        final = complete_through is not None and complete_through >= day_end + settle
        rows.append(
            {
                "day": key,
                "events": found.get("events", 0),
                "users": found.get("users", 0),
                "new_users": new.get(key, 0),
                "final": final,
            }
        )
        day += DAY
    return rows


def _top(
    con: duckdb.DuckDBPyConnection, column: str, occurred: str, span: list[datetime]
) -> list[dict[str, Any]]:
    """The TOP most frequent values of `column` (NULL as "(none)"), with one "(other)" row for the rest.

    Users per value are HyperLogLog estimates (within a few percent): exact distinct counts per value cost 20
    times as long on 10 M events, and the daily active users, which are exact, are the figure to quote.
    """
    rows = query_rows(
        con,
        f"SELECT coalesce(CAST({column} AS VARCHAR), '(none)') AS value, count(*) AS events, "
        f"approx_count_distinct(amplitude_id) AS users FROM events WHERE {occurred} GROUP BY 1 "
        "ORDER BY events DESC, value",
        span,
    )
    total = sum(row["events"] for row in rows) or 1
    kept, rest = rows[:TOP], rows[TOP:]
    if rest:
        kept.append(
            {
                "value": f"(other: {len(rest)})",
                "events": sum(r["events"] for r in rest),
                "users": None,
                "other": len(rest),
            }
        )  # kept in the figures, left out of the chart: it would dwarf the rest
    for row in kept:
        row["share"] = round(row["events"] / total, 4)
    return kept


def _lateness(con: duckdb.DuckDBPyConnection, upload: str, span: list[datetime]) -> dict[str, Any]:
    """How long after `event_time` events reached Amplitude (`server_upload_time`), as buckets and quantiles."""
    seconds = "(epoch_ms(server_upload_time) - epoch_ms(event_time)) / 1000.0"
    cases = " ".join(
        f"WHEN s < {bound} THEN {i}" for i, (_, bound) in enumerate(LATENESS_BUCKETS) if math.isfinite(bound)
    )
    counts = {
        row["b"]: row["n"]
        for row in query_rows(
            con,
            f"SELECT CASE {cases} ELSE {len(LATENESS_BUCKETS) - 1} END AS b, count(*) AS n "
            f"FROM (SELECT {seconds} AS s FROM events WHERE {upload} AND event_time IS NOT NULL "
            "AND server_upload_time IS NOT NULL) GROUP BY 1",
            span,
        )
    }
    stats = query_rows(
        con,
        f"SELECT quantile_cont({seconds}, [0.5, 0.9, 0.99, 0.999]) AS q, max({seconds}) AS max, "
        f"count(*) FILTER (WHERE {seconds} < 0) AS negative, "
        "count(*) FILTER (WHERE event_time IS NULL OR server_upload_time IS NULL) AS unknown "
        f"FROM events WHERE {upload}",
        span,
    )[0]
    quantiles: dict[str, float] = {}
    if stats["q"] is not None:
        quantiles = {
            name: round(max(value, 0.0), 3)
            for name, value in zip(("p50", "p90", "p99", "p999"), stats["q"], strict=True)
        }
        quantiles["max"] = round(stats["max"], 3)
    return {
        "buckets": [{"bucket": label, "order": i, "events": counts.get(i, 0)}
                    for i, (label, _) in enumerate(LATENESS_BUCKETS)],
        "quantiles": quantiles,
        "negative": stats["negative"],  # uploaded "before" it happened: a device clock ahead of the server's
        "unknown": stats["unknown"],
    }  # fmt: skip

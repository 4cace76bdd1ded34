"""The report's data-health figures: retried hours, split windows, failed spans, `_extra` keys, mismatches."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import duckdb

from ..ledger import FAILED, LOADED, TOO_LARGE, HourRecord, spans
from ..schema import KNOWN_SOURCES
from ..windows import hour_runs, label_hour
from .snapshot import query_rows


def health(
    con: duckdb.DuckDBPyConnection,
    ledger: dict[datetime, HourRecord],
    stored: dict[str, int],
    upload: str,
    span: list[datetime],
) -> dict[str, Any]:
    """The data-health figures of the ledger's hours in range and of the events uploaded in them (`upload`, with
    `span` for its parameters); `stored` is events per upload hour, by `label_hour`."""
    # runs of consecutive hours with the same attempts and status
    retried_hours = ((hour, (record.attempts, record.status)) for hour, record in ledger.items() if record.attempts > 1)
    retried = [
        {"start": label_hour(window.start), "end": label_hour(window.end), "hours": window.hours,
         "attempts": attempts, "status": status}
        for window, (attempts, status) in hour_runs(sorted(retried_hours))
    ]  # fmt: skip
    split: dict[str, dict[str, Any]] = {}  # by the planned window that 400s or 504s made the run fetch in parts
    for _, record in sorted(ledger.items()):
        if not record.split_from:
            continue
        row = split.setdefault(record.split_from, {"window": record.split_from, "hours": 0, "attempts": 0,
                                                   "_statuses": {}})  # fmt: skip
        row["hours"] += 1
        row["attempts"] = max(row["attempts"], record.attempts)
        row["_statuses"][record.status] = row["_statuses"].get(record.status, 0) + 1
    for row in split.values():
        row["statuses"] = ", ".join(f"{n} {status}" for status, n in sorted(row.pop("_statuses").items()))
    unknown = query_rows(
        con,
        "SELECT key, count(*) AS events, strftime(min(_upload_hour), '%Y-%m-%dT%H') AS first_hour FROM ("
        "SELECT unnest(json_keys(CAST(_extra AS JSON))) AS key, _upload_hour FROM events "
        f"WHERE _extra IS NOT NULL AND {upload}) GROUP BY key ORDER BY events DESC, key LIMIT 100",
        span,
    )
    for row in unknown:
        # a known key in _extra means a value that did not fit its column's type, not a new field
        row["kind"] = "value did not fit its type" if row["key"] in KNOWN_SOURCES else "unknown field"
    mismatches = []
    for hour, record in sorted(ledger.items()):
        label = label_hour(hour)
        if record.status == LOADED and stored.get(label, 0) != record.events_loaded:
            mismatches.append({"hour": label, "ledger": record.events_loaded, "stored": stored.get(label, 0)})
    for label in sorted(set(stored) - {label_hour(h) for h in ledger}):
        mismatches.append({"hour": label, "ledger": None, "stored": stored[label]})
    return {
        "duplicates": sum(r.duplicates for r in ledger.values()),
        "rejects": sum(r.rejects for r in ledger.values()),
        "retried_hours": retried,
        "split_windows": list(split.values()),
        "failed": [s for s in spans(ledger) if s["status"] in (FAILED, TOO_LARGE)],
        "unknown_fields": unknown,
        "ledger_mismatches": mismatches,
    }

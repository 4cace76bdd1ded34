"""The per-hour ledger: what the destination knows about every UTC upload hour it has seen.

One `HourRecord` per (project, upload hour). Sinks store these rows in the destination itself, in the same
transaction as the hour's events, so the ledger can never claim rows that are not there (or miss rows that are).
Beside it, one `DeletionRecord` per deletion job applied, stored in the transaction that deleted its users' rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from typing import Any, cast

from .windows import HOUR, hour_runs, label_hour

LOADED = "loaded"  # the hour's events are in the destination
EMPTY = "empty"  # the Export API answered 404: no data in that hour
FAILED = "failed"  # retries and splits did not get the hour; `reason` says why
TOO_LARGE = "too_large"  # 400 (too large) even for one hour alone; `reason` quotes the answer: S3 export

STATUSES = (LOADED, EMPTY, FAILED, TOO_LARGE)
DONE = (LOADED, EMPTY)  # no run needs to fetch the hour again (unless a lookback finds it changed)


@dataclass(frozen=True)
class MemberInfo:
    """One gzipped member of an archive: its name, compressed size and zip CRC-32."""

    name: str
    size: int
    crc: int


@dataclass
class HourRecord:
    """Everything the ledger says of one upload hour."""

    hour: datetime
    status: str
    reason: str | None = None
    members: list[MemberInfo] = field(default_factory=list)
    content_hash: str | None = None  # sha256 over the hour's member names and bytes, in order
    lines_read: int = 0
    events_loaded: int = 0
    duplicates: int = 0  # lines whose uuid was already loaded (in this window or an earlier one)
    rejects: int = 0  # lines that were not a JSON object with a uuid
    bytes: int = 0  # compressed bytes of the hour's members
    min_server_upload_time: datetime | None = None
    max_server_upload_time: datetime | None = None
    min_event_time: datetime | None = None
    max_event_time: datetime | None = None
    attempts: int = 1  # HTTP requests the hour's data took, counting those of the windows it was split from
    split_from: str | None = None  # the planned window (`2024-03-01T00..2024-03-01T23`) a split fetched it from
    run_id: str | None = None
    updated_at: datetime | None = None

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly dict (datetimes as ISO strings), for `status --json` and file-based state."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, datetime):
                out[key] = value.isoformat()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> HourRecord:
        """The inverse of `to_dict`."""
        values = dict(data)
        for key in ("hour", "min_server_upload_time", "max_server_upload_time", "min_event_time",
                    "max_event_time", "updated_at"):
            if isinstance(values.get(key), str):
                values[key] = datetime.fromisoformat(values[key])  # type: ignore[arg-type]
        members = cast("list[dict[str, Any]]", values.get("members") or [])
        values["members"] = [MemberInfo(**m) for m in members]
        return cls(**values)  # type: ignore[arg-type]


@dataclass
class DeletionRecord:
    """One User Privacy API deletion job as a destination applied it (its `_amplitude_deletions` row).

    Keyed by (project, `day`), the day Amplitude runs the job; `amplitude_ids` are every user of the job whose
    rows the destination deleted, `rows_deleted` and `cohort_rows_deleted` how many rows that removed from
    `events` and `cohort_members`, summed over every time the job was applied.
    """

    day: date
    status: str
    amplitude_ids: list[int] = field(default_factory=list)
    rows_deleted: int = 0
    cohort_rows_deleted: int = 0
    applied_at: datetime | None = None
    run_id: str | None = None

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly dict (dates as ISO strings)."""
        out = asdict(self)
        out["day"] = self.day.isoformat()
        out["applied_at"] = self.applied_at.isoformat() if self.applied_at else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeletionRecord:
        """The inverse of `to_dict`; also takes a row as sinks read it (dates and datetimes already typed)."""
        values = dict(data)
        values.pop("project", None)
        if isinstance(values.get("day"), str):
            values["day"] = date.fromisoformat(values["day"])
        if isinstance(values.get("applied_at"), str):
            values["applied_at"] = datetime.fromisoformat(values["applied_at"])
        values["amplitude_ids"] = sorted(int(i) for i in values.get("amplitude_ids") or [])
        return cls(**values)


def incremental_start(ledger: dict[datetime, HourRecord]) -> datetime | None:
    """The hour after the last hour the ledger holds (loaded, empty, failed or too large), or None for a
    destination never written: where a run without --start begins. Failed hours before it are asked again apart
    (`plan.plan_run`), so a backfill that failed whole leaves no gap after it."""
    return max(ledger) + HOUR if ledger else None


def spans(ledger: dict[datetime, HourRecord], *, by_day: bool = True) -> list[dict[str, Any]]:
    """Consecutive hours with the same status and reason as one span each, with their totals and the run id of
    the span's last hour; cut at midnight unless `by_day` is False."""
    keyed = ((hour, (record.status, record.reason, hour.date() if by_day else None))
             for hour, record in sorted(ledger.items()))  # fmt: skip
    out: list[dict[str, Any]] = []
    for window, (status, reason, _) in hour_runs(keyed):
        records = [ledger[hour] for hour in window.each_hour()]
        out.append({
            "start": label_hour(window.start), "end": label_hour(window.end), "status": status, "reason": reason,
            "hours": window.hours, "events": sum(r.events_loaded for r in records),
            "duplicates": sum(r.duplicates for r in records), "rejects": sum(r.rejects for r in records),
            "bytes": sum(r.bytes for r in records), "run_id": records[-1].run_id,
        })  # fmt: skip
    return out

"""The ledger of an Iceberg destination, kept in the events table's own properties.

Iceberg commits one table at a time, so a ledger table beside `events` could not commit with a window's rows.
Table properties can: a window's commit (delete, append) sets them in the same catalog commit, and every engine's
maintenance keeps them (expiring snapshots, compaction and orphan-file removal never touch properties).

The deletion jobs applied (User Privacy API, `deletions.py`) are kept the same way, one property per project,
`amplitude-export.deletions.<project tag>`, `{"project": name, "hours": {day: record}}`.

One property per project and upload month, `amplitude-export.ledger.<project tag>.<YYYY-MM>`, holds that month's
hour records as gzipped JSON in base64 (`{"project": name, "hours": {iso hour: record}}`): a commit rewrites only
the months it touches, and a year of hourly records stays near a megabyte of table metadata. See docs/ICEBERG.md.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from ..errors import DestinationError
from ..ledger import DeletionRecord, HourRecord

PREFIX = "amplitude-export.ledger."
DELETIONS = "amplitude-export.deletions."  # + project tag: the deletion jobs applied, by day


def project_tag(project: str) -> str:
    """The short hash of a project name its ledger properties carry (names may be long, or an API key)."""
    return hashlib.sha256(project.encode()).hexdigest()[:16]


def key(project: str, hour: datetime) -> str:
    """The property that holds `hour` of `project`."""
    return f"{PREFIX}{project_tag(project)}.{hour.astimezone(UTC):%Y-%m}"


def decode(name: str, value: str) -> tuple[str, dict[str, dict[str, object]]]:
    """(project, {iso hour: record dict}) from one ledger property."""
    try:
        data = json.loads(gzip.decompress(base64.b64decode(value)))
        return data["project"], data["hours"]
    except (ValueError, KeyError, TypeError, OSError, EOFError) as exc:
        raise DestinationError(f"cannot read the ledger property {name}: {exc}") from None


def encode(project: str, hours: Mapping[str, dict[str, object]]) -> str:
    """One ledger property's value; hours in order, so an unchanged month encodes the same."""
    text = json.dumps({"project": project, "hours": dict(sorted(hours.items()))}, separators=(",", ":"))
    return base64.b64encode(gzip.compress(text.encode(), mtime=0)).decode()


def read(properties: Mapping[str, str]) -> dict[str, dict[datetime, HourRecord]]:
    """Every project's ledger, by hour."""
    ledgers: dict[str, dict[datetime, HourRecord]] = {}
    for name, value in properties.items():
        if name.startswith(PREFIX):
            project, hours = decode(name, value)
            for record in (HourRecord.from_dict(d) for d in hours.values()):
                ledgers.setdefault(project, {})[record.hour.astimezone(UTC)] = record
    return {p: dict(sorted(hours.items())) for p, hours in ledgers.items()}


def hours(properties: Mapping[str, str], project: str, wanted: Iterable[datetime]) -> dict[datetime, HourRecord]:
    """The ledger rows of `project` for the hours `wanted`, decoding only their months' properties."""
    want = {hour.astimezone(UTC) for hour in wanted}
    found: dict[datetime, HourRecord] = {}
    for name in {key(project, hour) for hour in want}:
        if name in properties:
            for data in decode(name, properties[name])[1].values():
                record = HourRecord.from_dict(data)
                if record.hour.astimezone(UTC) in want:
                    found[record.hour.astimezone(UTC)] = record
    return found


def updates(properties: Mapping[str, str], project: str, records: Iterable[HourRecord]) -> dict[str, str]:
    """The properties to set so that the ledger holds `records` (replacing those of the same hours)."""
    months: dict[str, dict[str, dict[str, object]]] = {}
    for record in records:
        name = key(project, record.hour)
        if name not in months:
            known = properties.get(name)
            months[name] = decode(name, known)[1] if known else {}
        data = record.to_dict()
        data["hour"] = record.hour.astimezone(UTC).isoformat()
        months[name][data["hour"]] = data  # type: ignore[index]
    return {name: encode(project, hours) for name, hours in months.items()}


def read_deletions(properties: Mapping[str, str], project: str) -> list[DeletionRecord]:
    """The deletion jobs applied to `project`, by day."""
    name = f"{DELETIONS}{project_tag(project)}"
    days = decode(name, properties[name])[1] if name in properties else {}
    return [DeletionRecord.from_dict(days[day]) for day in sorted(days)]


def deletion_updates(properties: Mapping[str, str], project: str, record: DeletionRecord) -> dict[str, str]:
    """The property to set so that the deletions ledger holds `record` (replacing that of its day)."""
    name = f"{DELETIONS}{project_tag(project)}"
    days = decode(name, properties[name])[1] if name in properties else {}
    return {name: encode(project, {**days, record.day.isoformat(): record.to_dict()})}

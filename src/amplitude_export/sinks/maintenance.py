"""`amplitude-export maintain`: housekeeping of the table formats (iceberg:, delta:), one interface for both.

`maintain(dest, compact=..., older_than=...)` opens the table and calls its sink's `maintain` (`Maintainable`):
compact small files, then forget what no recent snapshot or version needs (Iceberg: expire snapshots, delete
unreferenced files; Delta: vacuum). The other destinations need none, and are refused before anything is opened.

With `repair`, first the data files the table names but storage lost (deleted by hand, a bucket's lifecycle rule)
are dropped from the table, and every loaded hour whose rows no longer match its ledger row is marked failed, so
that the next `run` loads it again. Both steps are idempotent: a repair cut short is finished by the next one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..ledger import FAILED, LOADED, HourRecord

if TYPE_CHECKING:
    from . import Sink

TABLE_SCHEMES = ("iceberg", "delta")
# how object stores and file systems say a file is not there (delta-rs, pyarrow, S3)
_GONE = re.compile(r"not found|no such file|nosuchkey", re.IGNORECASE)
_AGE = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$")
_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}


@dataclass
class Maintenance:
    """What `maintain` did to one table."""

    description: str = ""  # the table, for messages
    files_compacted: int = 0  # live data files rewritten ...
    files_written: int = 0  # ... into these
    snapshots_expired: int | None = None  # Iceberg; None where the format keeps its versions (Delta's log)
    files_deleted: int = 0
    bytes_deleted: int | None = None  # None where the store does not say (Delta's vacuum)
    files_missing: list[str] | None = None  # with repair: the lost data files dropped from the table
    hours_failed: int = 0  # with repair: loaded hours whose rows no longer matched the ledger, now failed
    note: str | None = None  # what could not be done, and why

    def summary(self) -> str:
        """One line for the CLI."""
        parts = []
        if self.files_missing is not None:
            lost = len(self.files_missing)
            parts.append(f"dropped {lost} missing data file{'' if lost == 1 else 's'}")
            hours = f"{self.hours_failed} hour{'' if self.hours_failed == 1 else 's'}"
            parts.append(f"marked {hours} failed, for the next run to load again" if self.hours_failed
                         else "no loaded hour's rows differ from the ledger")
        parts.append(f"compacted {self.files_compacted} files into {self.files_written}")
        if self.snapshots_expired is not None:
            parts.append(f"expired {self.snapshots_expired} snapshots")
        deleted = f"deleted {self.files_deleted} unreferenced files"
        if self.bytes_deleted is not None:
            deleted += f" ({self.bytes_deleted / 1e6:.1f} MB)"
        parts.append(deleted)
        if self.note:
            parts.append(self.note)
        line = "; ".join(parts)
        return f"{self.description}: {line}" if self.description else line


def parse_age(text: str) -> timedelta:
    """`7d`, `24h`, `90m`, `2w` or `0` as a timedelta; anything else is a UsageError."""
    if text.strip() == "0":
        return timedelta(0)
    match = _AGE.match(text.lower())
    if match is None:
        raise UsageError(f"--older-than {text!r}: use a number and a unit, e.g. 7d, 24h, 90m (or 0)")
    return int(match.group(1)) * _UNITS[match.group(2)]


def is_table(dest: str) -> bool:
    """Whether `dest` names a table format's destination (the ones `maintain` applies to)."""
    scheme, sep, _ = dest.partition(":")
    return bool(sep) and scheme.lower() in TABLE_SCHEMES


def maintain(dest: str, *, compact: bool = True, older_than: timedelta | str | None = None, repair: bool = False,
             storage_options: dict[str, Any] | None = None) -> Maintenance:
    """Housekeeping of the table at `dest` (see the module): with `repair`, first drop lost data files and mark
    the hours they held failed; compact its small files unless not `compact`, and delete what no snapshot or
    version younger than `older_than` (a timedelta, or `--older-than`'s `7d`, `24h`) needs (None: the format's
    default, 7 days). Any other destination is a UsageError, raised before anything is opened or created."""
    if isinstance(older_than, str):
        older_than = parse_age(older_than)
    if not is_table(dest):
        scheme = dest.partition(":")[0].lower() if ":" in dest else dest
        raise UsageError(f"maintain applies to iceberg: and delta: tables, not to {scheme}: destinations "
                         "(they need none)")
    if older_than is not None and older_than < timedelta(0):
        raise UsageError("--older-than must not be negative")
    from . import Maintainable, open_sink

    # a table that is not there is refused, never created: maintain deletes what the table does not reference,
    # which in a directory that holds no table of ours is everything
    open_sink(dest, storage_options=storage_options, read_only=True).close()
    sink = open_sink(dest, storage_options=storage_options)
    try:
        table: Maintainable = sink  # type: ignore[assignment]  # both table formats' sinks are
        missing = table.drop_missing_files() if repair else None
        failed = mark_lost_hours(sink) if repair else 0
        done = table.maintain(compact=compact, older_than=older_than)
        done.files_missing, done.hours_failed = missing, failed
        return done
    finally:
        sink.close()


LOST = "its rows no longer match the ledger (maintain --repair): the next run loads it again"


def mark_lost_hours(sink: Sink) -> int:
    """Mark failed every loaded hour whose rows in the table differ from its ledger row (what `verify` calls a
    count problem), in every project; how many. A plain `run` retries failed hours, so it loads them again."""
    marked = 0
    for project in sink.projects():
        counts = sink.count_by_hour(project)
        lost = [HourRecord(hour, FAILED, reason=LOST) for hour, record in sorted(sink.ledger(project).items())
                if record.status == LOADED and counts.get(hour, 0) != record.events_loaded]
        if lost:
            sink.record_hours(project, lost)
            marked += len(lost)
    return marked


def lost_file_hint(message: str, description: str) -> str:
    """`message`, followed by the way out when it says a file of the table (iceberg:, delta:) is not there."""
    if not _GONE.search(message) or not is_table(description):
        return message
    return (f"{message} (if a data file was deleted: amplitude-export maintain --dest {description} --repair "
            "drops it and marks its hours for the next run)")

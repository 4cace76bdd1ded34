"""A Parquet dataset's state, `_state/ledger.json`: the live data files with the upload hours each covers, the
ledger and the deletion jobs applied. The sink rewrites it whole, atomically, as its commit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..windows import HOUR, Window

STATE_FILE = "_state/ledger.json"
STATE_FORMAT = 1
Ledger = dict[str, dict[str, dict[str, Any]]]  # project -> hour (ISO) -> HourRecord.to_dict()
Deletions = dict[str, dict[str, dict[str, Any]]]  # project -> job day (ISO) -> DeletionRecord.to_dict()


@dataclass(frozen=True)
class DataFile:
    """One live data file: its path under the root and the upload hours it covers (inclusive)."""

    path: str
    start: datetime
    end: datetime
    rows: int
    project: str = "default"  # whose rows: a window of one project never replaces another's files

    def overlaps(self, window: Window, project: str) -> bool:
        """Whether the file holds rows of `project` in any hour of `window`."""
        return self.project == project and self.start <= window.end and self.end >= window.start

    def inside(self, window: Window) -> bool:
        """Whether every hour of the file lies in `window`."""
        return window.start <= self.start and self.end <= window.end

    def outside(self, window: Window) -> Iterator[Window]:
        """The runs of the file's hours that `window` does not cover."""
        if self.start < window.start:
            yield Window(self.start, min(self.end, window.start - HOUR))
        if self.end > window.end:
            yield Window(max(self.start, window.end + HOUR), self.end)


def parse_state(text: str) -> tuple[dict[str, DataFile], Ledger, Deletions]:
    """The files, ledger and deletions a state file holds; ValueError, KeyError or TypeError when malformed."""
    state = json.loads(text)
    files = {
        rel: DataFile(
            rel,
            datetime.fromisoformat(f["start"]),
            datetime.fromisoformat(f["end"]),
            f["rows"],
            f.get("project", "default"),
        )
        for rel, f in state["files"].items()
    }
    return files, state["ledger"], state.get("deletions", {})


def state_text(files: dict[str, DataFile], ledger: Ledger, deletions: Deletions) -> str:
    """The state file's text for `files`, `ledger` and `deletions`."""
    state = {
        "format": STATE_FORMAT,
        "files": {
            rel: {"start": f.start.isoformat(), "end": f.end.isoformat(), "rows": f.rows, "project": f.project}
            for rel, f in sorted(files.items())
        },
        "ledger": ledger,
        **({"deletions": deletions} if deletions else {}),
    }
    return json.dumps(state, indent=1, sort_keys=True)


def by_date(window: Window) -> Iterator[Window]:
    """The window cut at UTC midnights: one piece per upload date."""
    start = window.start
    while start <= window.end:
        day_end = start.replace(hour=23)
        yield Window(start, min(day_end, window.end))
        start = day_end + HOUR

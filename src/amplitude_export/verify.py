"""`verify`: prove that the destination is complete, from its own ledger and rows.

Checks, for every hour between the first and the last hour the ledger knows: the hour has a ledger row, it is
not failed, and the number of rows in `events` for that upload hour equals the ledger's `events_loaded`. With
`deep`, the archives still on disk are hashed again and compared with the ledger's content hashes, which
proves the rows came from the archive that is there now (per hour, the archive the ledger's members name: a
lookback reload leaves the older archive beside the newer one).

Problems are reported per hour (`problems`, the `--json` list) and as runs of consecutive hours with the same
kind (`runs`, what the CLI prints: a month's gap is one line, not 744).

A project with no events hours but the tables of `run --streams` (loaded without the `events` stream) has no
hour that could be missing: it is complete, and `tables` names them (their rows are not checked here). A
project with neither has nothing loaded, which is a problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .archive import ArchiveMember, content_hash, list_members
from .errors import AmplitudeExportError
from .ledger import EMPTY, FAILED, LOADED, TOO_LARGE, HourRecord
from .sinks import Sink
from .windows import HOUR, Window, label_hour


@dataclass(frozen=True)
class Problem:
    """One reason the destination is not provably complete."""

    hour: datetime | None
    kind: str  # missing, failed, too_large, count, orphan_rows, hash, unreadable
    detail: str

    @property
    def label(self) -> str:
        return label_hour(self.hour) if self.hour else "-"


# what a run of problems of each kind is, in a sentence: "72 hours missing"
KIND_WORDS = {
    "missing": "missing", "failed": "failed", "too_large": "too large",
    "count": "with rows that differ from the ledger", "orphan_rows": "with rows but no ledger row",
    "hash": "whose kept archive differs", "unreadable": "unreadable",
}


@dataclass(frozen=True)
class ProblemRun:
    """Consecutive hours with problems of one kind (and one detail, for failed hours), or one problem."""

    start: datetime | None
    end: datetime | None
    kind: str
    hours: int
    detail: str  # the first hour's

    @property
    def label(self) -> str:
        if self.start is None or self.end is None:
            return "-"
        return label_hour(self.start) if self.start == self.end else f"{label_hour(self.start)}..{label_hour(self.end)}"

    def describe(self) -> str:
        """One line: `2024-03-02T00..2024-03-04T23: 72 hours missing (no ledger row: ...)`."""
        if self.start is None:
            return f"{KIND_WORDS.get(self.kind, self.kind)}: {self.detail}"
        count = "1 hour" if self.hours == 1 else f"{self.hours:,} hours"
        return f"{self.label}: {count} {KIND_WORDS.get(self.kind, self.kind)} ({self.detail})"

    def to_dict(self) -> dict[str, Any]:
        return {"start": label_hour(self.start) if self.start else None,
                "end": label_hour(self.end) if self.end else None,
                "hours": self.hours, "kind": self.kind, "detail": self.detail}


@dataclass
class Verification:
    """The outcome of `verify`: the hours checked (how many loaded, how many empty) and the problems found."""

    first: datetime | None
    last: datetime | None
    hours_checked: int
    archives_hashed: int
    problems: list[Problem]
    hours_loaded: int = 0
    hours_empty: int = 0  # the Export API had no data for them (404, or no member in the archive)
    destination: str | None = None  # what was checked, as `api.verify` names it
    project: str | None = None
    other_projects: list[str] = field(default_factory=list)  # the destination's other projects, not checked
    tables: list[str] = field(default_factory=list)  # the project's tables of `run --streams`, not checked

    @property
    def complete(self) -> bool:
        return (self.first is not None or bool(self.tables)) and not self.problems

    @property
    def runs(self) -> list[ProblemRun]:
        """The problems as runs of consecutive hours of one kind (failed hours: of one reason too)."""
        runs: list[ProblemRun] = []
        open_runs: dict[tuple[str, str | None], int] = {}  # (kind, reason for failed) -> index in `runs`
        for problem in self.problems:
            key = (problem.kind, problem.detail if problem.kind in (FAILED, TOO_LARGE) else None)
            index = open_runs.get(key, -1)
            last = runs[index] if index >= 0 else None
            if problem.hour is not None and last is not None and last.end is not None \
                    and last.end + HOUR == problem.hour:
                runs[index] = ProblemRun(last.start, problem.hour, last.kind, last.hours + 1, last.detail)
            else:
                open_runs[key] = len(runs)
                runs.append(ProblemRun(problem.hour, problem.hour, problem.kind, 1, problem.detail))
        return sorted(runs, key=lambda run: (run.start is None, run.start or datetime.min, run.kind))

    def to_dict(self) -> dict[str, Any]:
        """Everything `verify --json` prints: the counts, every problem hour by hour, and their runs."""
        return {
            "first": label_hour(self.first) if self.first else None,
            "last": label_hour(self.last) if self.last else None,
            "complete": self.complete,
            "hours_checked": self.hours_checked,
            "hours_loaded": self.hours_loaded,
            "hours_empty": self.hours_empty,
            "archives_hashed": self.archives_hashed,
            "other_projects": self.other_projects,
            "stream_tables": self.tables,
            "problems": [{"hour": label_hour(p.hour) if p.hour else None, "kind": p.kind, "detail": p.detail}
                         for p in self.problems],
            "summary": [run.to_dict() for run in self.runs],
        }


def verify(sink: Sink, project: str, *, deep: bool = False, raw_dir: Path | None = None) -> Verification:
    """Check the ledger against the events table (and, with `deep`, against the archives in `raw_dir`)."""
    ledger = sink.ledger(project)
    counts = sink.count_by_hour(project)
    problems: list[Problem] = []
    others = [name for name in sink.projects() if name != project]
    tables = sorted(getattr(sink, "table_states", lambda _: {})(project))  # a sink without tables has none
    if not ledger:
        _orphans(counts, None, None, problems)
        if not tables and not counts:
            problems.append(Problem(None, "missing", f"nothing loaded for project {project!r} yet"))
        return Verification(None, None, 0, 0, problems, other_projects=others, tables=tables)
    first, last = min(ledger), max(ledger)
    hour = first
    checked = loaded = empty = 0
    while hour <= last:
        checked += 1
        record = ledger.get(hour)
        rows = counts.get(hour, 0)
        loaded += record is not None and record.status == LOADED
        empty += record is not None and record.status == EMPTY
        if record is None:
            problems.append(Problem(hour, "missing", "no ledger row: this hour was never loaded"))
        elif record.status in (FAILED, TOO_LARGE):
            problems.append(Problem(hour, record.status, record.reason or record.status))
        expected = record.events_loaded if record is not None and record.status == LOADED else 0
        if rows != expected:
            problems.append(Problem(hour, "count", f"{rows:,} rows in events, the ledger says {expected:,}"))
        hour += HOUR
    _orphans(counts, first, last, problems)
    hashed = _deep_check(ledger, raw_dir, problems) if deep else 0
    return Verification(first, last, checked, hashed, problems, hours_loaded=loaded, hours_empty=empty,
                        other_projects=others, tables=tables)


def _orphans(counts: dict[datetime, int], first: datetime | None, last: datetime | None,
             problems: list[Problem]) -> None:
    """The hours with rows in `events` outside the ledger's first..last (every hour, without a ledger)."""
    for hour, rows in sorted(counts.items()):
        if first is None or last is None or not first <= hour <= last:
            problems.append(Problem(hour, "orphan_rows", f"{rows:,} rows in events for an hour the ledger lacks"))


def _deep_check(ledger: dict[datetime, HourRecord], raw_dir: Path | None, problems: list[Problem]) -> int:
    """Hash, per loaded hour, the kept archive it was loaded from and compare with the ledger; returns the hours
    hashed.

    A lookback reload lands a newer archive beside the older one that still covers the hour, so several archives
    may hold an hour: the one whose members (names, sizes, CRCs) the ledger lists is the one that was loaded;
    when none is, the newest is compared, and differs.
    """
    covering: dict[datetime, list[tuple[Path, list[ArchiveMember]]]] = {}
    paths = sorted(raw_dir.glob("*.zip"), key=lambda p: (p.stat().st_mtime_ns, p.name)) if raw_dir else []
    for path in paths:  # oldest first
        try:
            window = Window.from_name(path.name.removesuffix(".zip"))
            members = list_members(path)
        except AmplitudeExportError as exc:
            problems.append(Problem(None, "unreadable", f"{path.name}: {exc}"))
            continue
        for hour in window.each_hour():
            covering.setdefault(hour, []).append((path, [m for m in members if m.upload_hour == hour]))
    hashed = 0
    for hour, candidates in sorted(covering.items()):
        record = ledger.get(hour)
        if record is None or record.status != LOADED or not record.content_hash:
            continue
        loaded = sorted((m.name, m.size, m.crc) for m in record.members)
        path, members = next((c for c in candidates if sorted((m.name, m.size, m.crc) for m in c[1]) == loaded),
                             candidates[-1])
        hashed += 1
        if content_hash(path, members) != record.content_hash:
            problems.append(Problem(hour, "hash", f"{path.name} differs from what was loaded"))
    return hashed

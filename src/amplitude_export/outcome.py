"""What a run did: one `WindowOutcome` per window and the `RunReport` over them, whose `exit_code` the CLI passes on."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from . import clock
from .errors import EXIT_INCOMPLETE, EXIT_OK
from .ledger import FAILED, TOO_LARGE
from .windows import Window, label_hour


def plural(count: int, noun: str) -> str:
    """`1 hour`, `2 hours`: a count with its noun, for the lines a run prints."""
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def new_run_id(now: datetime | None = None) -> str:
    """A sortable, unique run id: `20240302T031500Z-1a2b3c`."""
    moment = (now or clock.now()).astimezone(UTC)
    return f"{moment:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@dataclass
class WindowOutcome:
    """What happened to one window in this run."""

    window: Window
    status: str  # landed, cached, loaded, empty, failed, too_large, unchanged, reloaded, kept, recheck_failed
    reason: str | None = None
    events: int = 0
    rejects: int = 0
    duplicates: int = 0
    bytes: int = 0
    attempts: int = 0
    deleted: int = 0  # rows of deleted users left out (privacy.py)

    def describe(self) -> str:
        """One line for the log and the console."""
        text = f"{self.window}: {self.status}"
        if self.status in ("loaded", "landed", "cached"):
            text += f" ({self.bytes:,} bytes"
            if self.status == "loaded":
                text += f", {self.events:,} events, {self.duplicates:,} duplicates, {self.rejects:,} rejected"
                if self.deleted:
                    text += f", {self.deleted:,} of deleted users left out"
            text += ")"
        if self.reason:
            text += f": {self.reason}"
        return text


@dataclass
class RunReport:
    """The outcome of a whole run."""

    run_id: str
    outcomes: list[WindowOutcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    log_path: Path | None = None
    changed_hours: list[datetime] = field(default_factory=list)

    @property
    def failed(self) -> list[WindowOutcome]:
        """Windows that did not complete (they are retried by the next run)."""
        return [o for o in self.outcomes if o.status in (FAILED, TOO_LARGE)]

    @property
    def events(self) -> int:
        """Events loaded by the whole run."""
        return sum(o.events for o in self.outcomes)

    @property
    def rejects(self) -> int:
        """Lines rejected by the whole run."""
        return sum(o.rejects for o in self.outcomes)

    @property
    def exit_code(self) -> int:
        """0 when every window completed, else 1 (the next run asks again)."""
        return EXIT_INCOMPLETE if self.failed else EXIT_OK

    def summary(self) -> str:
        """A few lines for the end of a run."""
        counts: dict[str, int] = {}
        for outcome in self.outcomes:
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
        parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing to do"
        lines = [f"run {self.run_id}: {plural(len(self.outcomes), 'window')} ({parts})"]
        if any(o.status == "loaded" for o in self.outcomes):
            lines.append(
                f"events loaded: {self.events:,}; duplicates dropped: {sum(o.duplicates for o in self.outcomes):,}; "
                f"lines rejected: {self.rejects:,}"
            )
        if any(o.deleted for o in self.outcomes):
            lines.append(f"events of deleted users left out: {sum(o.deleted for o in self.outcomes):,}")
        lines.extend(self.notes)
        lines.extend(f"FAILED {o.window}: {o.reason}" for o in self.failed)
        return "\n".join(lines)


def lookback_note(recheck: list[Window], changed: list[datetime], unsure: Iterable[Window] = ()) -> str:
    """The line a run with a lookback ends with: the hours Amplitude changed, or that the re-checked are unchanged;
    hours of `unsure` windows (a re-check that failed, or a 404 for loaded hours) are not called unchanged."""
    if changed:
        return (
            f"{plural(len(changed), 'hour')} changed since last run: "
            + ", ".join(label_hour(h) for h in sorted(changed))
            + " (reloaded)"
        )
    hours = {h for w in recheck for h in w.each_hour()}
    uncompared = hours & {h for w in unsure for h in w.each_hour()}
    compared = len(hours) - len(uncompared)
    verb = "is" if compared == 1 else "are"
    notes = [f"the {plural(compared, 'hour')} re-checked (loaded or empty) {verb} unchanged"] if compared else []
    if uncompared:
        notes.append(f"{plural(len(uncompared), 'hour')} re-checked could not be compared (above)")
    return "lookback: " + "; ".join(notes)

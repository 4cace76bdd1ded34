"""Loading: what each fetched window means for the destination, written with its ledger rows in one transaction.

`Loader.take(fetch)` reads a landed archive (or a running download: `live.py`) into the sink (`load`), compares a
re-checked archive with the ledger hour by hour and reloads only the hours that changed (`recheck`), records the
empty hours of a 404 (`answered_404`) and the failed hours of a window that could not be fetched (`record`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from . import clock
from .errors import ArchiveError
from .fetch import Fetch
from .ledger import EMPTY, FAILED, LOADED, HourRecord
from .live import LiveFile, StreamAbandoned
from .outcome import RunReport, WindowOutcome, plural
from .plan import consecutive
from .privacy import Privacy
from .sinks import Sink
from .windows import Window, label_hour

log = logging.getLogger(__name__)

NOT_FOUND = "the Export API answered 404 (no data)"


@dataclass
class Loader:
    """Loads one project's fetched windows into `sink`; `ledger` is the destination's as the run began.

    `privacy` applies to every batch and reject; archives are removed once loaded unless `keep_raw`. `notes`
    collects warnings for the run's summary, `changed` the hours a re-check found changed.
    """

    sink: Sink
    project: str
    run_id: str
    data_dir: Path
    ledger: dict[datetime, HourRecord] = field(default_factory=dict)
    workers: int = 2
    keep_raw: bool = True
    privacy: Privacy | None = None
    notes: list[str] = field(default_factory=list)
    changed: list[datetime] = field(default_factory=list)
    streamed: set[Window] = field(default_factory=set)  # loaded while they downloaded

    def take(self, fetched: Fetch) -> WindowOutcome | None:
        """What one fetched window came to; None when there is nothing to report for it (yet): a download whose
        streamed load gave up arrives again once landed, and a window loaded while it downloaded arrives again."""
        if fetched.live is not None:
            return self._stream(fetched, fetched.live)
        if fetched.window in self.streamed:
            return None
        if fetched.failed:
            return self._failed(fetched)
        if fetched.empty:
            return self.answered_404(fetched)
        assert fetched.path is not None
        attempts = max(1, fetched.attempts)
        if fetched.fresh:
            return self.recheck(fetched.window, fetched.path, attempts=attempts, split_from=fetched.split_from)
        return self.load(fetched.window, fetched.path, attempts=attempts, split_from=fetched.split_from)

    def _stream(self, fetched: Fetch, live: LiveFile) -> WindowOutcome | None:
        if fetched.fresh:  # a re-check compares hashes of the landed archive first
            live.close()
            return None
        try:
            outcome = self.load(fetched.window, live.path, attempts=fetched.attempts, split_from=fetched.split_from,
                                live=live)  # fmt: skip
        except StreamAbandoned as exc:
            log.info("%s: stopped loading while downloading (%s); loading it once landed", fetched.window, exc)
            return None
        self.streamed.add(fetched.window)
        return outcome

    def _failed(self, fetched: Fetch) -> WindowOutcome:
        if fetched.fresh:  # a failed re-check leaves the loaded rows as they are
            return WindowOutcome(fetched.window, "recheck_failed", reason=fetched.reason)
        self.record(fetched.window, fetched.status, reason=fetched.reason, attempts=fetched.attempts,
                    split_from=fetched.split_from)  # fmt: skip
        return WindowOutcome(fetched.window, fetched.status, reason=fetched.reason, attempts=fetched.attempts)

    def load(
        self,
        window: Window,
        archive: Path,
        *,
        attempts: int = 1,
        split_from: Window | None = None,
        live: LiveFile | None = None,
        drop_if_deleted: bool = True,
    ) -> WindowOutcome:
        """Read one archive and write it to the sink in one transaction.

        `attempts` (requests the archive took) and `split_from` (the planned window it is a part of) go into the
        hours' ledger rows. A broken archive is deleted (so the next run downloads it again) and its hours are
        marked failed. With `live`, the archive (its `.part` file) is read while it downloads and the rows are
        committed once it has landed and passed its checks; if that gives up, the transaction is rolled back and
        StreamAbandoned raised, for the landed archive (or the download's failure) to go the usual way. An
        archive that held rows of deleted users is not kept, unless `drop_if_deleted` is False (the caller still
        reads it).
        """
        from .reader import WindowReader

        privacy = self.privacy
        size = archive.stat().st_size if live is None else 0  # a `.part` may be gone already: its attempt failed
        # a destination whose server sets the pace needs fewer parse threads, and when that server runs on this
        # machine, the threads give way to it (docs/PARSE_DESIGN.md, speed tricks)
        workers = min(self.workers, getattr(self.sink, "parse_threads", self.workers))
        reader = WindowReader(
            archive, window, run_id=self.run_id, rejects_dir=self.data_dir / "rejects", workers=workers,
            project=self.project, live=live, redact_reject=privacy.reject if privacy is not None else None,
            attempts=attempts, split_from=split_from, background=getattr(self.sink, "shares_cores", False),
        )  # fmt: skip
        read = reader.read(privacy.apply if privacy is not None else None)
        try:
            records = self.sink.write_window(self.project, window, read)
        except ArchiveError as exc:
            archive.unlink(missing_ok=True)
            reason = f"archive broken, will download again: {exc}"
            self.record(window, FAILED, reason=reason, attempts=attempts, split_from=split_from)
            return WindowOutcome(window, FAILED, reason=reason, bytes=size)
        finally:
            if live is not None:
                live.close()
        if live is not None:
            log.info("%s: loaded while it downloaded", window)
            size = reader.path.stat().st_size  # the landed archive
        if reader.rejects_total:
            log.warning("%s: %d lines rejected, see %s", window, reader.rejects_total, self.data_dir / "rejects")
        # the compiled parser's share: lines it gave to the msgspec path (invalid JSON, say) are read far slower
        log.info("%s: %d of %d lines parsed by the compiled parser", window,
                 reader.lines_total - reader.slow_lines, reader.lines_total)  # fmt: skip
        deleted = getattr(read.batches, "deleted_rows", 0)
        if deleted:
            log.info("%s: %d events of deleted users left out%s", window, deleted,
                     "; the archive is not kept" if self.keep_raw and drop_if_deleted else "")  # fmt: skip
        if not self.keep_raw or (deleted and drop_if_deleted):
            reader.path.unlink(missing_ok=True)
        return WindowOutcome(
            window,
            LOADED,
            events=sum(r.events_loaded for r in records),
            rejects=sum(r.rejects for r in records),
            duplicates=sum(r.duplicates for r in records),
            bytes=size,
            attempts=attempts,
            deleted=deleted,
        )

    def recheck(
        self, window: Window, archive: Path, *, attempts: int = 1, split_from: Window | None = None
    ) -> WindowOutcome:
        """Compare each hour's content hash with the ledger; reload only the runs of hours that changed (an hour
        the ledger holds as empty changed if it has members now)."""
        from .archive import content_hash, list_members

        members = list_members(archive)
        changed = []
        for hour in window.each_hour():
            record = self.ledger.get(hour)
            own = [m for m in members if m.upload_hour == hour]
            if record is not None and record.status == EMPTY and not own:
                continue
            if record is None or record.content_hash != content_hash(archive, own):
                changed.append(hour)
        outcome = WindowOutcome(window, "unchanged", bytes=archive.stat().st_size)
        for part in consecutive(changed):
            loaded = self.load(part, archive, attempts=attempts, split_from=split_from, drop_if_deleted=False)
            outcome.events += loaded.events
            outcome.deleted += loaded.deleted
            outcome.duplicates += loaded.duplicates
            outcome.rejects += loaded.rejects
            if loaded.status != LOADED:
                outcome.status, outcome.reason = loaded.status, loaded.reason
        if changed and outcome.status == "unchanged":
            outcome.status = "reloaded"
            outcome.reason = f"{plural(len(changed), 'hour')} changed: " + ", ".join(label_hour(h) for h in changed)
        privacy = self.privacy
        if (
            not self.keep_raw
            or outcome.deleted
            or (privacy is not None and privacy.deleted and _names(archive, privacy))
        ):
            archive.unlink(missing_ok=True)  # a kept archive never holds deleted users' events, reloaded or not
        self.changed += changed
        return outcome

    def answered_404(self, fetched: Fetch) -> WindowOutcome:
        """Record a window that answered 404: its hours are empty, except those the ledger holds as loaded.

        A 404 is weak evidence: Amplitude has answered 404 for hours that later had data, and a wrong host answers
        404 for everything. So loaded hours keep their rows and ledger rows, and if they held events the run warns
        loudly (log, stderr and its summary); the lookback asks empty hours again.
        """
        window, attempts = fetched.window, fetched.attempts
        held = [h for h in window.each_hour() if (r := self.ledger.get(h)) is not None and r.status == LOADED]
        events = sum(self.ledger[hour].events_loaded for hour in held)
        for part in consecutive(hour for hour in window.each_hour() if hour not in held):
            self.record(part, EMPTY, reason=NOT_FOUND, attempts=attempts, split_from=fetched.split_from)
        if events:
            note = (
                f"{window}: the Export API answered 404 (no data) for hours the ledger holds {events:,} events "
                "of: their rows are kept; if this persists, check --base-url and the project's keys"
            )
            log.warning(note)
            self.notes.append(f"WARNING {note}")
            return WindowOutcome(
                window, "kept", reason="404 for hours loaded with events; rows kept", attempts=attempts
            )
        if fetched.fresh:
            return WindowOutcome(window, "unchanged", reason="404 on re-check", attempts=attempts)
        return WindowOutcome(window, EMPTY, reason="no data (404)", attempts=attempts)

    def record(
        self, window: Window, status: str, *, reason: str | None = None, attempts: int = 1,
        split_from: Window | None = None,
    ) -> None:  # fmt: skip
        """Ledger rows for every hour of a window that loaded nothing (failed, too large, empty)."""
        now = clock.now()
        self.sink.record_hours(self.project, [
            HourRecord(hour=h, status=status, reason=reason, attempts=max(1, attempts),
                       split_from=str(split_from) if split_from else None, run_id=self.run_id, updated_at=now)
            for h in window.each_hour()
        ])  # fmt: skip


def _names(archive: Path, privacy: Privacy) -> bool:
    from .deletions import names_any

    return names_any(archive, privacy.deleted)


def privacy_controls(
    sink: Sink, project: str, privacy: Privacy | None, keep_raw: bool | None, report: RunReport, data_dir: Path
) -> tuple[Privacy | None, bool]:
    """The controls a load applies (`privacy` plus the users the destination's deletion jobs removed) and whether
    archives are kept: by default not with PII controls, and if so with a warning."""
    from .deletions import deleted_users

    pii = privacy is not None and privacy.pii
    if keep_raw is None:
        keep_raw = not pii
    elif keep_raw and pii:
        note = (
            f"WARNING raw archives under {data_dir / 'raw'} are kept (--keep-raw): they hold the original values "
            "of the excluded and hashed columns"
        )
        log.warning(note.removeprefix("WARNING "))
        report.notes.append(note)
    deleted = deleted_users(sink, project)
    if deleted:
        privacy = (privacy or Privacy()).with_deleted(deleted)
    if privacy is not None and privacy.active:
        log.info("privacy: %s", privacy.describe())
        return privacy, keep_raw
    return None, keep_raw

"""Deletions follow Amplitude's: read the User Privacy API's deletion jobs and delete their users everywhere.

`sync` lists the jobs (`GET /api/2/deletions/users?start_day=&end_day=`) since the last check, and for every job
Amplitude has locked (`submitted` or `done`: a `staging` job can still be revoked, so it is only reported) it

1. drops the kept raw archives (`DATA_DIR/raw/*.zip`) in which any of the job's new users appears, and removes
   their lines from the rejects files: an archive is dropped, not rewritten, because a rewritten one would no
   longer match the content hash the ledger holds for its hours, and Amplitude serves the scrubbed hours again
   if they are ever needed;
2. has the sink delete every row of those `amplitude_id`s from `events` (and `cohort_members` where it exists)
   and store the job's `_amplitude_deletions` row, in one transaction (`Sink.delete_users`).

Archives go first, so a crash in between leaves the job unapplied and the next sync does both again. A job
already applied with the same users changes nothing; one that gained users (or changed status) is applied for
the difference. Loads then leave the deleted users' rows out (`privacy.Privacy.with_deleted`), so an hour
reloaded later never brings them back.

"Since the last check": from `MARGIN` days before the latest job applied, or on a first check from `MARGIN` days
before the destination's earliest load (jobs that ran before then had already scrubbed what it loaded), to
`MARGIN` days ahead (staged jobs are scheduled ahead). Amplitude lists at most six months per request, so a longer
range is asked in parts, a second apart (the API allows one request per second).
"""

from __future__ import annotations

import logging
import re
import time
import zipfile
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import stamina
from isal import igzip

from . import __version__, clock
from .config import RETRY_TIMEOUT, Credentials
from .errors import AmplitudeExportError, AuthError, StorageError, TransientError, UsageError
from .ledger import DeletionRecord, HourRecord

log = logging.getLogger(__name__)

DELETIONS_PATH = "/api/2/deletions/users"
LOCKED = ("submitted", "done")  # statuses whose users Amplitude will delete for certain
MARGIN = timedelta(days=30)
MAX_RANGE = timedelta(days=183)  # "at most six months" per listing
MIN_INTERVAL = 1.0  # seconds between requests: the API allows one a second
_DAY = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")


@dataclass(frozen=True)
class Job:
    """A deletion job as the User Privacy API lists it."""

    day: date
    status: str  # lowercase: staging, submitted, done
    amplitude_ids: tuple[int, ...]

    @property
    def locked(self) -> bool:
        """Amplitude will run it: its users can no longer be taken out of it."""
        return self.status in LOCKED


@dataclass
class SyncReport:
    """What a sync found and did."""

    start_day: date
    end_day: date
    jobs: list[Job] = field(default_factory=list)
    applied: list[DeletionRecord] = field(default_factory=list)  # stored by this sync
    unchanged: list[DeletionRecord] = field(default_factory=list)  # applied earlier, nothing new
    pending: list[Job] = field(default_factory=list)  # staging: not applied yet
    archives_dropped: list[Path] = field(default_factory=list)
    rejects_removed: int = 0

    def lines(self) -> list[str]:
        """What the `deletions` command prints: one line per job, then the totals."""
        out = [f"deletion jobs {self.start_day}..{self.end_day}: {len(self.jobs)} listed"]
        for record in self.applied:
            out.append(f"  {record.day} {record.status}: applied, {_users(record.amplitude_ids)}, "
                       f"{record.rows_deleted:,} events rows and {record.cohort_rows_deleted:,} cohort_members rows "
                       "deleted in all")
        for record in self.unchanged:
            out.append(f"  {record.day} {record.status}: already applied ({_users(record.amplitude_ids)})")
        for job in self.pending:
            out.append(f"  {job.day} {job.status}: {_users(job.amplitude_ids)}, not applied until Amplitude "
                       "locks the job (it can still be revoked)")
        if self.archives_dropped:
            out.append(f"raw archives dropped (they held deleted users' events): {len(self.archives_dropped):,}")
        if self.rejects_removed:
            out.append(f"rejected lines of deleted users removed: {self.rejects_removed:,}")
        return out


def parse_day(text: str, option: str) -> date:
    """`YYYY-MM-DD` or `YYYYMMDD` (the deletion docs use both); anything else is a UsageError naming `option`."""
    match = _DAY.match(text.strip())
    try:
        if match is None:
            raise ValueError
        return date(*(int(part) for part in match.groups()))
    except ValueError:
        raise UsageError(f"{option} {text!r}: use YYYY-MM-DD") from None


class DeletionsClient:
    """Lists deletion jobs from one project's User Privacy API, retrying 429, 5xx and timeouts (stamina)."""

    def __init__(self, credentials: Credentials, *, max_attempts: int = 6, wait_initial: float = 2.0,
                 min_interval: float = MIN_INTERVAL, retry_timeout: float | None = RETRY_TIMEOUT,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.credentials = credentials
        self.max_attempts = max_attempts
        self.retry_timeout = retry_timeout  # seconds after a call's first attempt with no new attempt
        self.wait_initial = wait_initial
        self.min_interval = min_interval
        self._last: float | None = None
        self._http = httpx.Client(
            base_url=credentials.base_url,
            auth=httpx.BasicAuth(credentials.api_key, credentials.secret_key.reveal()),
            timeout=httpx.Timeout(60.0, connect=30.0),
            transport=transport,
            headers={"User-Agent": f"amplitude-export/{__version__}"},
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> DeletionsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def jobs(self, start_day: date, end_day: date) -> list[Job]:
        """Every job whose day is in start_day..end_day, asked in parts of at most six months."""
        found: dict[date, Job] = {}
        first = start_day
        while first <= end_day:
            last = min(end_day, first + MAX_RANGE)
            for job in self._list(first, last):
                earlier = found.get(job.day)  # two jobs on one day (one per batch) are one to the ledger
                if earlier is not None:
                    ids = tuple(sorted(set(earlier.amplitude_ids) | set(job.amplitude_ids)))
                    status = earlier.status if earlier.status not in LOCKED else job.status
                    job = Job(job.day, status, ids)
                found[job.day] = job
            first = last + timedelta(days=1)
        return [found[day] for day in sorted(found)]

    def _list(self, first: date, last: date) -> list[Job]:
        params = {"start_day": first.isoformat(), "end_day": last.isoformat()}

        def retriable(exc: Exception) -> bool | float:
            if not isinstance(exc, TransientError):
                return False
            log.warning("User Privacy API: %s; retrying", exc.reason)
            return exc.retry_after if exc.retry_after is not None else True

        for attempt in stamina.retry_context(on=retriable, attempts=self.max_attempts, timeout=self.retry_timeout,
                                             wait_initial=self.wait_initial, wait_jitter=self.wait_initial):
            with attempt:
                self._pace()
                try:
                    response = self._http.get(DELETIONS_PATH, params=params)
                except httpx.TransportError as exc:
                    raise TransientError(f"{type(exc).__name__}: {exc}") from None
                return _jobs(self._checked(response))
        raise AssertionError("unreachable: stamina either returns or raises")

    def _pace(self) -> None:
        if self._last is not None:
            time.sleep(max(0.0, self._last + self.min_interval - time.monotonic()))
        self._last = time.monotonic()

    def _checked(self, response: httpx.Response) -> Any:
        status = response.status_code
        if status in (401, 403):
            raise AuthError(f"the User Privacy API refused the credentials ({status}) for API key "
                            f"{self.credentials.api_key!r} on {self.credentials.base_url}: check AMP_API_KEY and "
                            "AMP_SECRET_KEY, and --region", status=status)
        if status == 429 or status >= 500:
            retry = response.headers.get("retry-after")
            raise TransientError(f"{status} from the User Privacy API",
                                 retry_after=float(retry) if retry and retry.replace(".", "", 1).isdigit() else None)
        if status != 200:
            text = " ".join(response.text.split())[:300]
            raise AmplitudeExportError(f"the User Privacy API answered {status}: {text or '(no explanation)'}")
        try:
            return response.json()
        except ValueError:
            raise AmplitudeExportError("the User Privacy API answered 200 with a body that is not JSON") from None


def _jobs(body: Any) -> list[Job]:
    """The jobs of a listing: a JSON array of `{day, status, amplitude_ids: [{amplitude_id, ...}]}`."""
    if not isinstance(body, list):
        raise AmplitudeExportError("the User Privacy API's job list is not a JSON array")
    jobs = []
    for item in body:
        try:
            day = parse_day(str(item["day"]), "day")
            ids = tuple(sorted({int(entry["amplitude_id"]) for entry in item.get("amplitude_ids") or []}))
            jobs.append(Job(day, str(item.get("status", "")).lower(), ids))
        except (KeyError, TypeError, ValueError, UsageError):
            raise AmplitudeExportError(f"the User Privacy API listed a job that does not read: {item!r:.200}") from None
    return jobs


def default_range(records: list[DeletionRecord], ledger: dict[datetime, HourRecord], today: date) -> tuple[date, date]:
    """The days a sync asks for when not told: see the module."""
    if records:
        first = max(record.day for record in records) - MARGIN
    else:
        loads = [record.updated_at for record in ledger.values() if record.updated_at is not None]
        first = (min(loads).astimezone(UTC).date() if loads else today) - MARGIN
    return min(first, today), today + MARGIN


def plan(jobs: Iterable[Job], records: list[DeletionRecord]) -> tuple[list[tuple[Job, list[int]]], list[Job]]:
    """(locked jobs to apply with the users not deleted yet for them, staging jobs left pending); a locked job
    whose users and status the ledger already has is left out."""
    known = {record.day: record for record in records}
    steps: list[tuple[Job, list[int]]] = []
    pending: list[Job] = []
    for job in jobs:
        if not job.locked:
            pending.append(job)
            continue
        record = known.get(job.day)
        new = sorted(set(job.amplitude_ids) - set(record.amplitude_ids if record else ()))
        if record is None or new or record.status != job.status:
            steps.append((job, new))
    return steps, pending


def deleted_users(sink: Any, project: str) -> set[int]:
    """Every `amplitude_id` the destination's deletions ledger holds for `project` (none for a sink that keeps
    no such ledger)."""
    reader: Callable[[str], list[DeletionRecord]] | None = getattr(sink, "deletion_records", None)
    return {i for record in (reader(project) if reader else []) for i in record.amplitude_ids}


def sync(
    client: DeletionsClient,
    sink: Any,
    project: str,
    *,
    data_dir: Path = Path("data"),
    start_day: date | None = None,
    end_day: date | None = None,
    run_id: str | None = None,
    now: datetime | None = None,
) -> SyncReport:
    """Apply the deletion jobs of start_day..end_day (default: since the last check) to `sink` and the kept
    files under `data_dir`; see the module."""
    if not hasattr(sink, "delete_users"):
        raise UsageError(f"{sink.description}: this destination cannot apply deletions yet")
    moment = now or clock.now()
    records = sink.deletion_records(project)
    if start_day is None or end_day is None:
        first, last = default_range(records, sink.ledger(project), moment.date())
        start_day = start_day or min(first, end_day or first)
        end_day = end_day or max(last, start_day)
    if end_day < start_day:
        raise UsageError(f"--end-day {end_day} is before --start-day {start_day}")
    report = SyncReport(start_day, end_day)
    report.jobs = client.jobs(start_day, end_day)
    steps, report.pending = plan(report.jobs, records)
    known = {record.day: record for record in records}
    report.unchanged = [known[job.day] for job in report.jobs
                        if job.locked and job.day in known and job not in [step[0] for step in steps]]
    new_ids = {i for _, new in steps for i in new}
    if new_ids:
        report.archives_dropped = drop_archives(data_dir / "raw", new_ids)
        report.rejects_removed = scrub_rejects(data_dir / "rejects", new_ids)
    for job, new in steps:
        earlier = known.get(job.day)
        record = replace(earlier, status=job.status, amplitude_ids=sorted(set(earlier.amplitude_ids) | set(new)),
                         applied_at=moment, run_id=run_id) if earlier else \
            DeletionRecord(job.day, job.status, list(job.amplitude_ids), applied_at=moment, run_id=run_id)
        stored = sink.delete_users(project, new, record)
        log.info("deletion job %s (%s): %s applied, %d events rows and %d cohort_members rows deleted", job.day,
                 job.status, _users(new), stored.rows_deleted - (earlier.rows_deleted if earlier else 0),
                 stored.cohort_rows_deleted - (earlier.cohort_rows_deleted if earlier else 0))
        report.applied.append(stored)
    return report


def _id_pattern(amplitude_ids: set[int]) -> re.Pattern[bytes]:
    """An export line's `"amplitude_id":123` (or `"123"`, as some lines carry it) for any of `amplitude_ids`."""
    alternatives = b"|".join(str(i).encode() for i in sorted(amplitude_ids))
    return re.compile(rb'"amplitude_id"\s*:\s*"?(?:' + alternatives + rb')(?![0-9])')


def drop_archives(raw_dir: Path, amplitude_ids: set[int]) -> list[Path]:
    """Delete the archives under `raw_dir` whose lines name any of `amplitude_ids`; the paths deleted."""
    if not raw_dir.is_dir() or not amplitude_ids:
        return []
    pattern = _id_pattern(amplitude_ids)
    dropped = [path for path in sorted(raw_dir.glob("*.zip")) if names_any(path, pattern)]
    for path in dropped:
        try:
            path.unlink()
        except OSError as exc:
            raise StorageError.from_os_error(exc, path) from None
        log.info("dropped raw archive %s: it held events of deleted users", path.name)
    return dropped


def names_any(path: Path, pattern: re.Pattern[bytes] | set[int] | frozenset[int]) -> bool:
    """Whether a line of the archive at `path` matches `pattern` (or names one of a set of amplitude ids), its
    members inflated a block at a time."""
    if not isinstance(pattern, re.Pattern):
        pattern = _id_pattern(set(pattern))
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            with archive.open(info) as stored, igzip.IGzipFile(fileobj=stored) as stream:
                tail = b""
                while block := stream.read(1 << 22):
                    if pattern.search(tail + block):
                        return True
                    tail = block[-64:]  # a match cut between two blocks
    return False


def scrub_rejects(rejects_dir: Path, amplitude_ids: set[int]) -> int:
    """Remove the lines naming any of `amplitude_ids` from the rejects files under `rejects_dir`; lines removed."""
    if not rejects_dir.is_dir() or not amplitude_ids:
        return 0
    pattern = _id_pattern(amplitude_ids)
    removed = 0
    for path in sorted(rejects_dir.glob("*.jsonl")):
        lines = path.read_bytes().splitlines(keepends=True)
        # a reject keeps its line as JSON text, so its quotes are escaped: unescape before matching
        kept = [line for line in lines if not pattern.search(line.replace(b'\\"', b'"'))]
        if len(kept) < len(lines):
            removed += len(lines) - len(kept)
            temp = path.with_name(path.name + ".tmp")
            try:
                temp.write_bytes(b"".join(kept))
                temp.replace(path)
            except OSError as exc:
                raise StorageError.from_os_error(exc, path) from None
    return removed


def _users(ids: Sized) -> str:
    return f"{len(ids):,} user" + "s" * (len(ids) != 1)

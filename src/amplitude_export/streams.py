"""The streams beside `events` (`run --streams`): fetch each from Amplitude's REST APIs and write its tables,
each table's rows together with its state row (`table_ledger.py`).

Snapshot tables (cohorts, annotations, the events list, taxonomy) are replaced whole on every run. `cohort_members`
downloads a cohort only when its `lastComputed` differs from the one its loaded members came from (Amplitude
allows 500 downloads a month), and each cohort's members commit on their own, so a run stopped halfway keeps
what it paid for. The day series (active users, average session length) replace the days a run asks for: from
`lookback_days` before the last day loaded (Amplitude's recent days still change) up to yesterday, or the
run's `--start`..`--end`.

Fetching runs in a few threads (the client keeps every request within Amplitude's concurrency limit); writing
happens here, one table at a time, in the order the answers arrive.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Protocol, cast

import pyarrow as pa

from . import clock
from .config import Credentials
from .dashboard import DEFAULT_CONCURRENCY, DashboardClient
from .deletions import deleted_users
from .errors import EXIT_INCOMPLETE, EXIT_OK, NotOnPlanError, QuotaExceededError, TransientError, UsageError
from .ledger import HourRecord
from .privacy import Privacy
from .schema import ARROW_SCHEMA
from .stream_tables import (
    ACTIVE_USERS,
    ANNOTATIONS,
    AVERAGE_SESSION_LENGTH,
    COHORT_MEMBERS,
    COHORTS,
    EVENT_PROPERTIES,
    EVENT_TYPES,
    EVENTS_LIST,
    SERIES,
    TABLES,
    USER_PROPERTIES,
    TableSpec,
    epoch,
    member_batches,
    rows_table,
    series_rows,
)
from .table_ledger import TableState, TableWrite, quota_words
from .windows import parse_hour, resolve_range

log = logging.getLogger(__name__)

EVENTS = "events"
STREAMS = (EVENTS, "cohorts", "cohort_members", "annotations", "events_list", "taxonomy", "active_users",
           "average_session_length")
COHORT_PARALLEL = 4  # Amplitude: "4 parallel [cohort requests] per minute per app"
SERIES_DAYS = 31  # days per series request (the API takes up to a year; a month keeps each one cheap)


class TableSink(Protocol):
    """What the streams need from a destination."""

    def write_table(self, project: str, write: TableWrite) -> TableState: ...

    def table_states(self, project: str) -> dict[str, TableState]: ...

    def ledger(self, project: str) -> dict[datetime, HourRecord]: ...


def parse_streams(text: str) -> list[str]:
    """`--streams events,cohorts,...` as a list in the documented order; an unknown name is a UsageError."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STREAMS]
    if unknown or not names:
        tables = [f"{name} is a table of stream {TABLES[name].stream}" for name in unknown
                  if name in TABLES and TABLES[name].stream != name]
        raise UsageError(f"--streams: unknown stream {', '.join(unknown) or '(none given)'}: choose from "
                         f"{','.join(STREAMS)}" + "".join(f" ({hint})" for hint in tables))
    return [name for name in STREAMS if name in names]


def check_sink(sink: object, streams: Iterable[str]) -> None:
    """Refuse, before anything is fetched, a destination that cannot hold the streams' tables."""
    if set(streams) - {EVENTS} and not all(hasattr(sink, name) for name in ("write_table", "table_states")):
        raise UsageError(f"--streams: {getattr(sink, 'description', 'this destination')} holds only events; "
                         "the other streams need a destination with tables (write_table, table_states)")


def tables_of(streams: Iterable[str]) -> list[TableSpec]:
    """The tables the streams load."""
    chosen = set(streams)
    return [spec for spec in TABLES.values() if spec.stream in chosen]


@dataclass
class StreamsReport:
    """What the streams did in one run."""

    states: dict[str, TableState] = field(default_factory=dict)  # as stored this run, by table
    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_INCOMPLETE if self.failed else EXIT_OK

    def summary(self) -> str:
        """Lines for the end of a run."""
        loaded = ", ".join(f"{name} {self.states[name].rows:,}" for name in TABLES
                           if name in self.states and self.states[name].note is None)
        lines = [f"streams: rows now held: {loaded}"] if loaded else []
        members = self.states.get(COHORT_MEMBERS.name)
        if members is not None:
            lines.append("cohort downloads: " + quota_words(members.cursor))
        lines.extend(self.notes)
        lines.extend(f"FAILED {line}" for line in self.failed)
        return "\n".join(lines)


def run_streams(
    credentials: Credentials,
    sink: object,
    *,
    project: str,
    streams: Iterable[str],
    run_id: str | None = None,
    data_dir: Path = Path("data"),
    start: str | None = None,
    end: str | None = None,
    lag_hours: float = 2,
    lookback_hours: int = 72,
    concurrency: int = DEFAULT_CONCURRENCY,
    max_attempts: int = 6,
    retry_wait: float = 2.0,
    privacy: Privacy | None = None,
    now: datetime | None = None,
) -> StreamsReport:
    """`load_streams` with the run's options: `start`/`end` in the CLI's forms name the days of the series
    (either open: incremental), `lookback_hours` rounds up to whole days; `privacy` (the run's PII controls)
    also leaves out the users the destination's deletion jobs removed. `sink` is any destination: one without
    tables is a UsageError (`check_sink`)."""
    streams = list(streams)
    check_sink(sink, streams)
    tables = cast(TableSink, sink)
    moment = now or clock.now()
    start_day = end_day = None
    if start is not None:
        start_day = resolve_range(start, end, now=moment, lag_hours=lag_hours)[0].date()
    if end is not None:  # without it, up to yesterday: today's numbers are not final
        end_day = parse_hour(end, is_end=True).date()
    with DashboardClient(credentials, max_concurrency=concurrency, max_attempts=max_attempts,
                         wait_initial=retry_wait) as client:
        deleted = deleted_users(tables, project)
        if deleted:
            privacy = (privacy or Privacy()).with_deleted(deleted)
        return load_streams(client, tables, project=project, streams=streams, run_id=run_id, data_dir=data_dir,
                            start_day=start_day, end_day=end_day, lookback_days=-(-lookback_hours // 24),
                            privacy=privacy, now=moment)


def load_streams(
    client: DashboardClient,
    sink: TableSink,
    *,
    project: str,
    streams: Iterable[str],
    run_id: str | None = None,
    data_dir: Path = Path("data"),
    start_day: date | None = None,
    end_day: date | None = None,
    lookback_days: int = 3,
    privacy: Privacy | None = None,
    now: datetime | None = None,
) -> StreamsReport:
    """Fetch `streams` (other than `events`) and write their tables to `sink`; see the module docstring.

    `privacy` applies to `cohort_members` what it applies to `events`: a deleted user's rows are left out, and
    `user_id` and `amplitude_id` are hashed or left out as its targets say (so joins with `events` still work).

    AuthError and destination errors stop the run; a stream that still fails after retries is reported in
    `failed` (exit 1) while the others load; a taxonomy the plan lacks and a spent cohort quota are notes.
    """
    moment = now or clock.now()
    chosen = [name for name in streams if name != EVENTS]
    report = StreamsReport()
    states = sink.table_states(project)
    job = _Job(client, sink, project, report, states, run_id, moment, data_dir)
    job.privacy = privacy if privacy is not None and privacy.active else None
    last_day = end_day or (moment.date() - timedelta(days=1))
    first_day = start_day or _first_loaded_day(sink, project, last_day)
    pool = DaemonPool(client.max_concurrency, "streams")
    job.pool = pool
    try:
        if {"cohorts", "cohort_members"} & set(chosen):
            job.submit("cohorts", client.cohorts, lambda cohorts: job.cohorts(cohorts, chosen))
        for spec, fetch in ((ANNOTATIONS, client.annotations), (EVENTS_LIST, client.events_list)):
            if spec.stream in chosen:
                job.submit(spec.name, fetch, partial(job.snapshot, spec))
        if "taxonomy" in chosen:
            job.submit("taxonomy", lambda: fetch_taxonomy(client), job.taxonomy)
        for spec in (ACTIVE_USERS, AVERAGE_SESSION_LENGTH):
            if spec.name in chosen:
                old = states.get(spec.name)
                begin = series_start(old.cursor.get("last_day") if old else None, start_day, first_day, lookback_days)
                if begin > last_day:
                    report.notes.append(f"{spec.name}: up to date (through {last_day})")
                    continue
                job.submit(spec.name, partial(fetch_series, client, spec, begin, last_day, moment),
                           partial(job.series, spec, begin=begin, end=last_day))
        job.drain()
    except BaseException:
        client.close()  # stops any poll, so the threads end soon
        raise
    finally:
        pool.close()
    return report


class _Job:
    """One run's streams: futures of fetches, and what to write when each completes (on the caller's thread)."""

    def __init__(self, client: DashboardClient, sink: TableSink, project: str, report: StreamsReport,
                 states: dict[str, TableState], run_id: str | None, moment: datetime, data_dir: Path) -> None:
        self.client, self.sink, self.project, self.report = client, sink, project, report
        self.states, self.run_id, self.moment, self.data_dir = states, run_id, moment, data_dir
        self.pool: DaemonPool
        self.pending: dict[Future[Any], tuple[str, Callable[[Any], None]]] = {}
        self.after: list[Callable[[], None]] = []
        self.cohort_slots = threading.BoundedSemaphore(min(COHORT_PARALLEL, client.max_concurrency))
        self.quota_spent = False
        self.computed: dict[str, Any] = {}
        self.downloads = self.unchanged = 0
        self.privacy: Privacy | None = None

    def submit(self, what: str, fetch: Callable[[], Any], then: Callable[[Any], None]) -> None:
        self.pending[self.pool.submit(fetch)] = (what, then)

    def drain(self) -> None:
        """Write each fetch's tables as it completes; then run what waits for all of them (`after`)."""
        while self.pending or self.after:
            while self.pending:
                done, _ = wait(list(self.pending), return_when=FIRST_COMPLETED)
                for future in done:
                    what, then = self.pending.pop(future)
                    try:
                        result = future.result()
                    except TransientError as exc:
                        self.report.failed.append(f"{what}: {exc}")
                        continue
                    then(result)
            if self.after:
                self.after.pop(0)()

    def write(self, spec: TableSpec, write: TableWrite) -> None:
        state = self.sink.write_table(self.project, write)
        self.states[spec.name] = state
        self.report.states[spec.name] = state
        log.info("%s: %d rows held after this run's write", spec.name, state.rows)

    def state(self, spec: TableSpec, **values: Any) -> TableState:
        return TableState(spec.name, spec.stream, spec.refresh, run_id=self.run_id, **values)

    def snapshot(self, spec: TableSpec, items: list[dict[str, Any]]) -> None:
        table = rows_table(spec, items, self.moment)
        self.write(spec, TableWrite(spec.name, spec.schema, table.to_batches(), self.state(spec)))

    def taxonomy(self, answer: dict[str, list[dict[str, Any]]] | NotOnPlanError) -> None:
        for spec in (EVENT_TYPES, EVENT_PROPERTIES, USER_PROPERTIES):
            if isinstance(answer, NotOnPlanError):
                old = self.states.get(spec.name)
                self.write(spec, TableWrite(spec.name, spec.schema, None, self.state(
                    spec, cursor=old.cursor if old else {}, note=str(answer))))
            else:
                self.snapshot(spec, answer[spec.name])
        if isinstance(answer, NotOnPlanError):
            self.report.notes.append(f"taxonomy: not loaded: {answer} (tables left as they were)")

    def series(self, spec: TableSpec, rows: list[dict[str, Any]], begin: date, end: date) -> None:
        days = [begin + timedelta(days=n) for n in range((end - begin).days + 1)]
        rows = [row for row in rows if begin <= row["date"] <= end]
        old = self.states.get(spec.name)
        last = max(end.isoformat(), (old.cursor.get("last_day") or "") if old else "")
        table = pa.Table.from_pylist(rows, schema=spec.schema)
        self.write(spec, TableWrite(spec.name, spec.schema, table.to_batches(), self.state(
            spec, cursor={"last_day": last}), scope_column="date", scope_values=days))

    # -- cohorts --

    def cohorts(self, cohorts: list[dict[str, Any]], chosen: list[str]) -> None:
        if "cohorts" in chosen:
            self.snapshot(COHORTS, cohorts)
        if "cohort_members" not in chosen:
            return
        old = self.states.get(COHORT_MEMBERS.name)
        self.computed = dict(old.cursor.get("computed", {})) if old else {}
        wanted = {str(c["id"]): c for c in cohorts if not c.get("archived")}
        todo = [c for cid, c in sorted(wanted.items()) if self.computed.get(cid) != c.get("lastComputed")]
        gone = sorted(set(self.computed) - set(wanted))
        usage = self.client.cohort_usage()
        if usage is not None and todo and _left(usage) == 0:
            self.quota_spent = True
            todo = []
        self.unchanged = len(wanted) - len(todo) if not self.quota_spent else 0
        if gone:  # archived or deleted since: their members leave
            for cid in gone:
                self.computed.pop(cid, None)
            self.write_members(gone, [], None)
        for cohort in todo:
            self.submit(f"cohort {cohort['id']}", partial(self.download, cohort), self.members_landed)
        self.after.append(self.members_done)

    def download(self, cohort: dict[str, Any]) -> tuple[dict[str, Any], Path | QuotaExceededError]:
        target = self.data_dir / "cohorts" / f"{cohort['id']}.csv"
        with self.cohort_slots:
            if self.quota_spent:
                return cohort, QuotaExceededError("the month's quota of cohort downloads is spent")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.client.download_cohort(str(cohort["id"]), target)
            except QuotaExceededError as exc:
                self.quota_spent = True
                return cohort, exc
        return cohort, target

    def members_landed(self, result: tuple[dict[str, Any], Path | QuotaExceededError]) -> None:
        cohort, path = result
        if isinstance(path, QuotaExceededError):
            return
        self.downloads += 1
        cid, computed = str(cohort["id"]), cohort.get("lastComputed")
        try:
            self.computed[cid] = computed
            batches = member_batches(path, cid, epoch(computed), self.moment)
            if self.privacy is not None:
                batches = protect_members(self.privacy, batches)
            self.write_members([cid], batches, None)
        finally:
            path.unlink(missing_ok=True)

    def write_members(self, scope: list[str], batches: Any, usage: dict[str, Any] | None) -> None:
        cursor = {"computed": dict(sorted(self.computed.items())), "downloads_this_run": self.downloads}
        old = self.states.get(COHORT_MEMBERS.name)
        for key in ("downloads_left", "quota_limit", "quota_resets_at"):
            cursor[key] = old.cursor.get(key) if old else None
        if usage is not None:
            cursor.update(downloads_left=_left(usage), quota_limit=usage.get("limit"),
                          quota_resets_at=usage.get("resets_at"))
        write = TableWrite(COHORT_MEMBERS.name, COHORT_MEMBERS.schema, batches,
                           self.state(COHORT_MEMBERS, cursor=cursor), scope_column="cohort_id", scope_values=scope)
        self.write(COHORT_MEMBERS, write)

    def members_done(self) -> None:
        """After every download: the quota left, into the state."""
        self.write_members([], None, self.client.cohort_usage())
        if self.quota_spent:
            self.report.notes.append(
                "WARNING cohort_members: the month's quota of cohort downloads is spent: changed cohorts were not "
                "downloaded (their old members stay); the next run after the quota resets downloads them")
        else:
            self.report.notes.append(f"cohort_members: {self.downloads} cohorts downloaded, {self.unchanged} "
                                     "unchanged since their last download")


def protect_members(privacy: Privacy, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Members through the events' own privacy transform: each batch is put in the shape of `events`
    (`amplitude_id` and `user_id` in their columns, the row number in `_line`, which it never changes), and the
    rows it keeps come back with those two columns as it left them."""
    for batch in batches:
        rows = batch.num_rows
        given = {"amplitude_id": batch.column("amplitude_id"), "user_id": batch.column("user_id"),
                 "_line": pa.array(range(rows), pa.int64())}
        shaped = pa.RecordBatch.from_arrays([given.get(f.name, pa.nulls(rows, f.type)) for f in ARROW_SCHEMA],
                                            schema=ARROW_SCHEMA)
        out, _ = privacy.transform(shaped)
        kept = batch.take(out.column("_line"))
        columns = kept.columns
        for name in ("amplitude_id", "user_id"):
            columns[kept.schema.get_field_index(name)] = out.column(name)
        yield pa.RecordBatch.from_arrays(columns, schema=batch.schema)


class DaemonPool:
    """A few daemon threads running submitted calls. Not a ThreadPoolExecutor: its threads are joined when the
    interpreter exits, so a Ctrl-C during a cohort poll or a retry's back-off would wait for it."""

    def __init__(self, workers: int, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=name, daemon=True) for _ in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, call: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put((future, call))
        return future

    def close(self) -> None:
        """Let the threads end once the calls queued so far are done (or cancelled)."""
        for _ in self._threads:
            self._queue.put(None)

    def _work(self) -> None:
        while (task := self._queue.get()) is not None:
            future, call = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(exc)


def _left(usage: dict[str, Any]) -> int | None:
    limit, used = usage.get("limit"), usage.get("usage")
    if isinstance(limit, int) and isinstance(used, int):
        return max(0, limit - used)
    return None


def fetch_taxonomy(client: DashboardClient) -> dict[str, Any] | NotOnPlanError:
    """The three taxonomy tables' items, or the NotOnPlanError that says the plan lacks the API."""
    try:
        events = client.taxonomy("event")
        users = client.taxonomy("user-property")
        shared = client.taxonomy("event-property")
    except NotOnPlanError as exc:
        return exc
    properties = [dict(item, event_type="") for item in shared]  # "": shared by event types (docs/SCHEMA.md)
    names = [str(event.get("event_type")) for event in events]
    # one request per event type; a pool of its own, as this runs on one of the streams' threads
    own = DaemonPool(client.max_concurrency, "taxonomy")
    try:
        futures = [own.submit(partial(client.taxonomy, "event-property", form={"event_type": name}))
                   for name in names]
        for name, future in zip(names, futures, strict=True):
            properties += [dict(item, event_type=item.get("event_type", name)) for item in future.result()]
    finally:
        own.close()
    return {EVENT_TYPES.name: events, EVENT_PROPERTIES.name: properties, USER_PROPERTIES.name: users}


def fetch_series(client: DashboardClient, spec: TableSpec, begin: date, end: date,
                 taken_at: datetime) -> list[dict[str, Any]]:
    """A day series' rows for `begin`..`end`, a month per request."""
    path, params, _ = SERIES[spec.name]
    rows: list[dict[str, Any]] = []
    first = begin
    while first <= end:
        last = min(end, first + timedelta(days=SERIES_DAYS - 1))
        data = client.series(path, f"{first:%Y%m%d}", f"{last:%Y%m%d}", **params)
        rows += series_rows(spec, data, taken_at)
        first = last + timedelta(days=1)
    return rows


def series_start(last_day: str | None, start_day: date | None, first_day: date, lookback_days: int) -> date:
    """The first day a series asks for: `start_day`, else `lookback_days` before the day after the last one
    loaded, else (a first run) `first_day`."""
    if start_day is not None:
        return start_day
    if not last_day:
        return first_day
    return date.fromisoformat(last_day) + timedelta(days=1 - max(0, lookback_days))


def _first_loaded_day(sink: TableSink, project: str, last_day: date) -> date:
    """The day a series starts on its first run: the first day of events the destination holds, else `last_day`."""
    hours = sink.ledger(project)
    return min(min(hours).date(), last_day) if hours else last_day

"""A dlt source: Amplitude's raw events as Arrow batches, for any dlt destination (`amplitude-export[dlt]`).

    import dlt
    from amplitude_export.dlt import amplitude_source

    pipeline = dlt.pipeline("amplitude_export", destination="duckdb", dataset_name="amplitude")
    pipeline.run(amplitude_source(start="2024-03-01"))   # then, from cron: pipeline.run(amplitude_source())

The windows, retries, splitting and parsing are the package's own (`windows`, `client`, `pipeline.fetch_windows`,
`reader.WindowReader`); the resource yields `schema.ARROW_SCHEMA` record batches, never row dicts. dlt keeps the
state: the resource merges on `uuid` (one row per uuid, a later load replacing an earlier one) and its
incremental cursor on `server_upload_time` makes the next run start at the hour after the last one loaded.
Pass `start` and `end` together for a backfill: dlt then neither reads nor moves the cursor.

`streams` adds the other streams of `run --streams` as resources, one per table (docs/SCHEMA.md): snapshot
tables replace theirs; `cohort_members` merges with `cohort_id` as merge key (a downloaded cohort's rows replace
its old ones; a cohort is downloaded only when its `lastComputed` differs from the one in dlt's resource state);
the day series merge on `date`, continuing from the resource state's last day less `lookback_days`.

A window that cannot be fetched stops the run with an error, so dlt loads nothing of it and its cursor never
moves past a gap; the next run asks again. dlt is imported only when `amplitude_source` is called.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pyarrow as pa

from .config import load_credentials
from .errors import AmplitudeExportError, UsageError
from .schema import ARROW_SCHEMA
from .windows import HOUR, Window, as_hour, floor_hour, last_ready_hour, plan_windows, resolve_range

if TYPE_CHECKING:
    from dlt.extract.source import DltSource

log = logging.getLogger(__name__)

INSTALL = "pip install 'amplitude-export[dlt]'"
# ARROW_SCHEMA with `uuid` NOT NULL, as dlt's primary key is (the reader runs with require_uuid, so it holds);
# otherwise dlt warns on every batch that the hints differ
_UUID = ARROW_SCHEMA.get_field_index("uuid")
EVENTS_SCHEMA = ARROW_SCHEMA.set(_UUID, ARROW_SCHEMA.field(_UUID).with_nullable(False))


def amplitude_source(
    api_key: str | None = None,
    secret_key: str | None = None,
    *,
    start: str | datetime | None = None,
    end: str | datetime | None = None,
    region: str = "us",
    base_url: str | None = None,
    window_hours: int = 24,
    lag_hours: float = 2,
    data_dir: str | Path | None = None,
    concurrency: int = 2,
    workers: int = 1,
    max_attempts: int = 6,
    table_name: str = "events",
    now: datetime | None = None,
    transport: httpx.BaseTransport | None = None,
    streams: Iterable[str] = ("events",),
    api_concurrency: int = 3,
    lookback_days: int = 3,
) -> DltSource:
    """A dlt source with one resource, `events` (merge on `uuid`, incremental on `server_upload_time`).

    Credentials come from the arguments, else `AMP_API_KEY` / `AMP_SECRET_KEY` (environment or `.env`).
    `start` / `end` take the CLI's forms (`2024-03-01`, `20240301T05`, ...) or datetimes, UTC, end inclusive.
    The first run without `start` takes yesterday; later runs continue after the last loaded upload hour, up
    to the last hour Amplitude can export (`lag_hours` after it closes). Archives are landed under
    `data_dir/raw` (a temporary directory when None) and deleted once read; rejected lines go to
    `data_dir/rejects` when `data_dir` is given. `workers > 1` parses members in that many processes.

    Example:
        pipeline.run(amplitude_source(start="2024-03-01", end="2024-03-07"))  # a backfill
    """
    try:
        import dlt
    except ImportError:
        raise UsageError(f"amplitude_source needs dlt: {INSTALL}") from None
    from .streams import EVENTS, parse_streams

    chosen = parse_streams(streams if isinstance(streams, str) else ",".join(streams))
    credentials = load_credentials(api_key=api_key, secret_key=secret_key, region=region, base_url=base_url)
    first = as_hour(start, is_end=False)
    last = as_hour(end, is_end=True)
    if first is not None and last is not None and last < first:
        raise UsageError(f"end {last:%Y-%m-%dT%H} is before start {first:%Y-%m-%dT%H}")
    # a backfill (start and end) filters on [start, end + 1 h) and leaves dlt's cursor alone
    cursor = dlt.sources.incremental(
        "server_upload_time",
        initial_value=first,
        end_value=last + HOUR if first is not None and last is not None else None,
        on_cursor_value_missing="include",  # a malformed time is NULL here (kept in `_extra`): keep the row
    )

    @dlt.resource(name=table_name, primary_key="uuid", write_disposition="merge")
    def events(server_upload_time: Any = cursor) -> Iterator[pa.RecordBatch]:
        moment = now or datetime.now(UTC)
        begin, stop = _plan_range(server_upload_time, first, last, moment, lag_hours)
        if stop < begin:
            log.info("nothing to export: up to date through %s", begin - HOUR)
            return
        windows = plan_windows(begin, stop, window_hours)
        yield from _window_batches(credentials, windows, data_dir, concurrency=concurrency, workers=workers,
                                   max_attempts=max_attempts, transport=transport)

    resources = [events] if EVENTS in chosen else []
    resources += _stream_resources(dlt, credentials, chosen, start=first, end=last, now=now,
                                   concurrency=api_concurrency, max_attempts=max_attempts,
                                   lookback_days=lookback_days, transport=transport)

    @dlt.source(name="amplitude")
    def amplitude() -> Any:
        return resources

    return amplitude()


def _stream_resources(dlt: Any, credentials: Any, chosen: list[str], *, start: datetime | None,
                      end: datetime | None, now: datetime | None, concurrency: int, max_attempts: int,
                      lookback_days: int, transport: httpx.BaseTransport | None) -> list[Any]:
    """One dlt resource per table of the chosen streams other than `events`."""
    from .dashboard import DashboardClient
    from .errors import NotOnPlanError, QuotaExceededError
    from .stream_tables import COHORT_MEMBERS, SERIES, epoch, member_batches, rows_table
    from .streams import fetch_series, fetch_taxonomy, series_start, tables_of
    from .table_ledger import SNAPSHOT

    def client() -> DashboardClient:
        return DashboardClient(credentials, max_concurrency=concurrency, max_attempts=max_attempts,
                               transport=transport)

    moment = now or datetime.now(UTC)
    taxonomy: dict[str, Any] = {}  # the three taxonomy tables come from one set of requests

    def snapshot(name: str) -> Iterator[pa.Table]:
        with client() as api:
            if name in ("event_types", "event_properties", "user_properties"):
                if not taxonomy:
                    taxonomy.update(answer=fetch_taxonomy(api))
                items = taxonomy["answer"]
                if isinstance(items, NotOnPlanError):
                    log.warning("%s: not loaded: %s", name, items)
                    return
                items = items[name]
            else:
                items = {"cohorts": api.cohorts, "annotations": api.annotations,
                         "events_list": api.events_list}[name]()
        spec = next(spec for spec in tables_of(chosen) if spec.name == name)
        yield _keyed(spec, rows_table(spec, items, moment))

    def members() -> Iterator[pa.RecordBatch]:
        computed = dlt.current.resource_state().setdefault("computed", {})
        scratch = Path(tempfile.mkdtemp(prefix="amplitude-dlt-cohorts-"))
        try:
            with client() as api:
                for cohort in sorted(api.cohorts(), key=lambda c: str(c["id"])):
                    cid, last_computed = str(cohort["id"]), cohort.get("lastComputed")
                    if cohort.get("archived") or computed.get(cid) == last_computed:
                        continue
                    try:
                        api.download_cohort(cid, scratch / "members.csv")
                    except QuotaExceededError as exc:
                        log.warning("cohort_members: %s; the next run downloads the rest", exc)
                        return
                    for batch in member_batches(scratch / "members.csv", cid, epoch(last_computed), moment):
                        yield _keyed(COHORT_MEMBERS, batch)
                    computed[cid] = last_computed
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def series(name: str) -> Iterator[pa.Table]:
        state = dlt.current.resource_state()
        spec = next(spec for spec in tables_of(chosen) if spec.name == name)
        last_day = (end or moment - timedelta(days=1)).date()
        begin = series_start(state.get("last_day"), start.date() if start else None, last_day, lookback_days)
        if begin > last_day:
            return
        with client() as api:
            rows = fetch_series(api, spec, begin, last_day, moment)
        yield _keyed(spec, pa.Table.from_pylist(rows, schema=spec.schema))
        state["last_day"] = max(last_day.isoformat(), state.get("last_day") or "")

    resources = []
    for spec in tables_of(chosen):
        function: Callable[..., Iterator[Any]]
        if spec.refresh == SNAPSHOT:
            function, disposition, merge_key = (lambda name=spec.name: snapshot(name)), "replace", None
        elif spec is COHORT_MEMBERS:
            function, disposition, merge_key = members, "merge", "cohort_id"
        else:
            assert spec.name in SERIES
            function, disposition, merge_key = (lambda name=spec.name: series(name)), "merge", None
        resources.append(dlt.resource(function, name=spec.name, primary_key=list(spec.key),
                                      write_disposition=disposition, merge_key=merge_key))
    return resources


def _keyed(spec: Any, data: Any) -> Any:
    """A table's rows with its key columns NOT NULL, as dlt's primary key hints are (else it warns per batch)."""
    schema = spec.schema
    for name in spec.key:
        index = schema.get_field_index(name)
        schema = schema.set(index, schema.field(index).with_nullable(False))
    kind = pa.RecordBatch if isinstance(data, pa.RecordBatch) else pa.Table
    return kind.from_arrays(data.columns, schema=schema)


def _plan_range(
    cursor: Any, first: datetime | None, last: datetime | None, now: datetime, lag_hours: float
) -> tuple[datetime, datetime]:
    """The hours to ask for: from `start`, or after the cursor's last loaded hour; to `end` or the last ready hour."""
    last_value = cursor.last_value
    if first is not None and (cursor.end_value is not None or last_value is None or _utc(last_value) <= first):
        begin = first  # a backfill, or a first run from `start`
    elif last_value is not None:
        begin = floor_hour(_utc(last_value)) + HOUR
    else:
        begin, yesterday_end, _ = resolve_range(None, None, now=now, lag_hours=lag_hours)  # first run: yesterday
        last = last if last is not None else yesterday_end
    ready = last_ready_hour(now, lag_hours)
    stop = ready if last is None else min(last, ready)
    return begin, stop


def _utc(value: Any) -> datetime:
    """dlt hands back pendulum datetimes (or strings from old state): a stdlib UTC datetime."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return datetime.fromtimestamp(value.timestamp(), UTC)


def _window_batches(
    credentials: Any,
    windows: list[Window],
    data_dir: str | Path | None,
    *,
    concurrency: int,
    workers: int,
    max_attempts: int,
    transport: httpx.BaseTransport | None,
) -> Iterator[pa.RecordBatch]:
    """Fetch the windows a few at a time and yield each one's batches; any failed window stops the run."""
    from .client import EMPTY, ExportClient
    from .live import LiveFile
    from .pipeline import Failure, fetch_windows, new_run_id
    from .reader import WindowReader

    run_id = new_run_id()
    scratch = Path(tempfile.mkdtemp(prefix="amplitude-dlt-")) if data_dir is None else None
    raw_dir = (scratch or Path(data_dir or ".")) / "raw"
    rejects_dir = Path(data_dir) / "rejects" if data_dir is not None else None
    try:
        with ExportClient(credentials, max_attempts=max_attempts, transport=transport) as client:
            for window, result in fetch_windows(client, windows, raw_dir, concurrency=concurrency):
                if isinstance(result, Failure):
                    raise AmplitudeExportError(
                        f"{window}: {result.status}: {result.reason}; nothing of this run is loaded, the next run "
                        "asks again"
                    )
                assert not isinstance(result, LiveFile)  # fetch_windows offers live files only when asked (live=True)
                if result.status == EMPTY or result.path is None:
                    log.info("%s: no data (404)", window)
                    continue
                reader = WindowReader(result.path, window, run_id=run_id, rejects_dir=rejects_dir,
                                      workers=workers, require_uuid=True)
                for batch in reader.batches():
                    yield pa.RecordBatch.from_arrays(batch.columns, schema=EVENTS_SCHEMA)
                if reader.rejects_total:
                    where = reader.rejects_path or "nowhere: pass data_dir to keep them"
                    log.warning("%s: %d lines rejected (kept in %s)", window, reader.rejects_total, where)
                result.path.unlink(missing_ok=True)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


__all__ = ["amplitude_source"]

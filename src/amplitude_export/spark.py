"""A Spark data source: Amplitude's raw events as a DataFrame (`pip install 'amplitude-export[spark]'`).

    from amplitude_export.spark import register
    register(spark)
    df = spark.read.format("amplitude").option("start", "2024-03-01").option("end", "2024-03-31").load()

The driver plans the range into windows as the CLI does (`windows.resolve_range`, `windows.plan_windows`,
`pipeline.fit_budget`: readiness lag, window hours, size budget) and deals them, in order, to at most
`concurrency` lanes. A lane is one Spark partition: its task downloads its windows one request at a time with the
package's client (retries, 400/504 splits down to one hour, CRC checks) into executor-local scratch space, reads
each archive with the package's reader and yields its Arrow batches (`schema.ARROW_SCHEMA`, which the Spark schema
is derived from), the repeats of a uuid inside a window dropped. As one task makes one request at a time and the
source plans at most `concurrency` tasks, no more than `concurrency` requests reach Amplitude at once, whatever
the cluster's size. A window that still fails after retries and splits fails its task, naming the window.
`spark.readStream.format("amplitude")` is in `spark_stream.py`. See docs/SPARK.md.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from .config import Credentials, load_credentials
from .errors import AmplitudeExportError, UsageError
from .pipeline import DEFAULT_SIZE_BUDGET, MAX_SAFE_CONCURRENCY, fit_budget, new_run_id
from .privacy import Privacy
from .schema import ARROW_SCHEMA
from .windows import HOUR, Window, label_hour, plan_windows, resolve_range

INSTALL = "pip install 'amplitude-export[spark]'"

try:
    from pyspark.sql.datasource import DataSource, DataSourceReader, InputPartition
    from pyspark.sql.pandas.types import from_arrow_schema
except ImportError:
    raise UsageError(f"the Spark data source needs pyspark 4: {INSTALL}") from None

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession
    from pyspark.sql.datasource import DataSourceStreamReader
    from pyspark.sql.types import StructType

log = logging.getLogger(__name__)

FORMAT = "amplitude"
SPARK_SCHEMA: StructType = from_arrow_schema(ARROW_SCHEMA)

# option -> (parse, smallest, largest); every value arrives as text
_NUMBERS: dict[str, tuple[type, float, float]] = {
    "window_hours": (int, 1, float("inf")),
    "lag_hours": (float, 0, float("inf")),
    "size_budget_mb": (int, 1, 4000),
    "hour_mb": (float, 0, float("inf")),
    "concurrency": (int, 1, MAX_SAFE_CONCURRENCY),
    "max_attempts": (int, 1, 50),
    "retry_wait": (float, 0, 600),
    "read_timeout": (float, 0.001, float("inf")),
    "workers": (int, 1, 16),
    "lookback_hours": (int, 0, 24 * 60),
    "max_hours_per_trigger": (int, 1, float("inf")),
}
_TEXTS = ("api_key", "secret_key", "region", "base_url", "start", "end", "project", "rejects_dir", "scratch_dir",
          "now", "exclude_columns", "hash_columns")
_STREAM_ONLY = ("lookback_hours", "max_hours_per_trigger")


@dataclass(frozen=True)
class Settings:
    """A read's options, checked on the driver; shipped to the executors with the reader."""

    credentials: Credentials
    start: str | None = None
    end: str | None = None
    window_hours: int = 24
    lag_hours: float = 2
    size_budget: int = DEFAULT_SIZE_BUDGET
    hour_bytes: int | None = None  # an estimate of one upload hour's archive: with it, windows fit size_budget
    concurrency: int = 2
    max_attempts: int = 6
    retry_wait: float = 2.0
    read_timeout: float = 60.0
    workers: int = 2
    project: str = "default"
    rejects_dir: str | None = None
    scratch_dir: str | None = None
    now: datetime | None = None  # the clock the readiness lag counts from; None: the driver's clock
    lookback_hours: int = 72
    max_hours_per_trigger: int | None = None
    privacy: Privacy | None = None  # exclude_columns / hash_columns, the key read on the driver (never printed)

    def plan(self, first: datetime, last: datetime) -> list[Window]:
        """first..last (inclusive hours) as the CLI plans them: `window_hours`, then cut to the size budget."""
        windows = plan_windows(first, last, self.window_hours)
        if self.hour_bytes:
            windows = fit_budget(windows, lambda _hour: self.hour_bytes or 0, self.size_budget)
        return windows

    def clock(self) -> datetime:
        return self.now or datetime.now(UTC)


def settings(options: Mapping[str, str], *, streaming: bool = False) -> Settings:
    """Check a read's options (one clear UsageError for anything wrong) and resolve the credentials: options, else
    `AMP_API_KEY`/`AMP_SECRET_KEY` (and `AMP_REGION`, `AMP_BASE_URL`) in the driver's environment or `.env`."""
    given = {key.lower(): value for key, value in options.items()}
    known = set(_NUMBERS) | set(_TEXTS)
    unknown = sorted(set(given) - known)
    if "path" in given:
        raise UsageError("the amplitude source takes no path: give start and end as options")
    if unknown:
        raise UsageError(f"unknown option {unknown[0]!r} for format {FORMAT!r}; known: {', '.join(sorted(known))}")
    if not streaming and (stream_only := [key for key in _STREAM_ONLY if key in given]):
        raise UsageError(f"option {stream_only[0]!r} is for spark.readStream only")
    values: dict[str, Any] = {}
    for key, (kind, low, high) in _NUMBERS.items():
        if key not in given:
            continue
        try:
            number = kind(given[key])
        except ValueError:
            number = None
        if number is None or not low <= number <= high or not math.isfinite(number):
            what = "a whole number" if kind is int else "a number"
            bounds = f"from {low:g} to {high:g}" if high != float("inf") else f"of at least {low:g}"
            raise UsageError(f"option {key} must be {what} {bounds}, got {given[key]!r}")
        values[key] = number
    if "size_budget_mb" in values:
        values["size_budget"] = values.pop("size_budget_mb") << 20
    if "hour_mb" in values:
        values["hour_bytes"] = int(values.pop("hour_mb") * (1 << 20))
    if "now" in given:
        values["now"] = _moment(given["now"])
    try:
        credentials = load_credentials(api_key=given.get("api_key"), secret_key=given.get("secret_key"),
                                       region=given.get("region"), base_url=given.get("base_url"))
    except UsageError as exc:
        missing, _, _ = str(exc).partition(":")
        if not missing.startswith("missing "):
            raise
        raise UsageError(f"{missing}: set the api_key and secret_key options, or AMP_API_KEY and AMP_SECRET_KEY "
                         "in the driver's environment or .env") from None
    named = ("start", "end", "project", "rejects_dir", "scratch_dir")
    texts: dict[str, Any] = {key: given[key] for key in named if key in given}
    if given.get("exclude_columns") or given.get("hash_columns"):
        values["privacy"] = Privacy.from_options(given.get("exclude_columns"), given.get("hash_columns"))
    result = Settings(credentials, **texts, **values)
    if result.start is not None or result.end is not None:
        resolve_range(result.start, result.end, now=result.clock(), lag_hours=result.lag_hours)  # checks them
    return result


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"option now must be an ISO date and time such as 2024-03-02T05:00Z, got {text!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Lane(InputPartition):
    """One Spark partition: windows fetched one after another, one request at a time."""

    windows: tuple[Window, ...]
    run_id: str


def lanes(windows: Sequence[Window], count: int, run_id: str) -> list[Lane]:
    """`windows` dealt, in order, to at most `count` lanes of about as many hours each."""
    if not windows:
        return []
    count = min(count, len(windows))
    total = sum(w.hours for w in windows)
    dealt: list[list[Window]] = [[] for _ in range(count)]
    before = 0
    for window in windows:
        dealt[min(count - 1, before * count // total)].append(window)
        before += window.hours
    return [Lane(tuple(group), run_id) for group in dealt if group]


def read_lane(options: Settings, lane: Lane) -> Iterator[pa.RecordBatch]:
    """Fetch and read a lane's windows on an executor; each window's batches without its repeated uuids."""
    from .client import EMPTY, ExportClient
    from .live import LiveFile
    from .pipeline import Failure, fetch_windows
    from .reader import WindowReader
    from .sinks import FirstCopies

    scratch = Path(tempfile.mkdtemp(prefix="amplitude-spark-", dir=options.scratch_dir))
    client = ExportClient(options.credentials, max_attempts=options.max_attempts, wait_initial=options.retry_wait,
                          read_timeout=options.read_timeout)
    try:
        for window, result in fetch_windows(client, lane.windows, scratch / "raw", concurrency=1):
            if isinstance(result, Failure):
                planned = f" (part of {result.split_from})" if result.split_from else ""
                raise AmplitudeExportError(f"amplitude: window {window}{planned} could not be fetched: "
                                           f"{result.status}: {result.reason}")
            assert not isinstance(result, LiveFile)  # fetch_windows offers live files only when asked (live=True)
            if result.status == EMPTY or result.path is None:
                continue
            privacy = options.privacy
            reader = WindowReader(result.path, window, run_id=lane.run_id, project=options.project,
                                  workers=options.workers,
                                  rejects_dir=Path(options.rejects_dir) if options.rejects_dir else None,
                                  redact_reject=privacy.reject if privacy is not None else None)
            first = FirstCopies(limit=1 << 62)  # exact: a window's uuids are what window_hours bounds
            for batch in reader.batches() if privacy is None else privacy.apply(reader.batches()):
                kept = first.filter(batch)
                if kept.num_rows:
                    yield kept
            if reader.rejects_total:
                where = reader.rejects_path or "nowhere: set the rejects_dir option to keep them"
                log.warning("%s: %d lines rejected (kept in %s)", window, reader.rejects_total, where)
            result.path.unlink(missing_ok=True)
    finally:
        client.close()
        shutil.rmtree(scratch, ignore_errors=True)


class AmplitudeReader(DataSourceReader):
    """The batch reader: plans on the driver (`partitions`), reads on the executors (`read`)."""

    def __init__(self, options: Settings) -> None:
        self.options = options
        self.run_id = new_run_id()

    def partitions(self) -> list[Lane]:
        options = self.options
        first, last, ready = resolve_range(options.start, options.end, now=options.clock(),
                                           lag_hours=options.lag_hours)
        if ready < last:
            log.warning("hours after %s UTC are not exportable yet (lag_hours=%g): not read",
                        label_hour(max(ready, first - HOUR)), options.lag_hours)
        if ready < first:
            return []
        return lanes(options.plan(first, ready), options.concurrency, self.run_id)

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        assert isinstance(partition, Lane)  # partitions() plans lanes only
        return read_lane(self.options, partition)


class AmplitudeDataSource(DataSource):
    """`format("amplitude")`: Amplitude's raw events, batch and streaming."""

    @classmethod
    def name(cls) -> str:
        return FORMAT

    def schema(self) -> StructType:
        settings(self.options, streaming=True)  # fail at load(), before any job, on a bad option
        return SPARK_SCHEMA

    def reader(self, schema: StructType) -> AmplitudeReader:
        return AmplitudeReader(settings(self.options))

    def streamReader(self, schema: StructType) -> DataSourceStreamReader:
        from .spark_stream import AmplitudeStreamReader

        return AmplitudeStreamReader(settings(self.options, streaming=True))


def register(spark: SparkSession) -> None:
    """Make `spark.read.format("amplitude")` and `spark.readStream.format("amplitude")` available."""
    spark.dataSource.register(AmplitudeDataSource)


def event_key() -> Column:
    """The column that names an event once: its uuid, else (a line without one) its member and line."""
    from pyspark.sql import functions as F

    return F.coalesce(F.col("uuid"), F.concat_ws(":", F.col("_member"), F.col("_line").cast("string")))


def first_copies(df: DataFrame, *, lookback_hours: int = 72) -> DataFrame:
    """`df` with one row per uuid, as every destination keeps them.

    A batch read keeps the first copy by upload hour, member and line (the copy the CLI keeps); a stream keeps the
    first copy to arrive, remembering uuids for `lookback_hours + 1` upload hours, which must be at least the
    stream's own `lookback_hours` (`dropDuplicatesWithinWatermark` on `_upload_hour`).
    """
    from pyspark.sql import Window as SparkWindow
    from pyspark.sql import functions as F

    keyed = df.withColumn("_key", event_key())
    if df.isStreaming:
        watermarked = keyed.withWatermark("_upload_hour", f"{lookback_hours + 1} hours")
        return watermarked.dropDuplicatesWithinWatermark(["_key"]).drop("_key")
    member_number = F.regexp_extract(F.col("_member"), r"#(\d+)", 1).cast("long")
    order = SparkWindow.partitionBy("_key").orderBy("_upload_hour", member_number, "_member", "_line")
    return keyed.withColumn("_copy", F.row_number().over(order)).where("_copy = 1").drop("_key", "_copy")


__all__ = ["FORMAT", "SPARK_SCHEMA", "AmplitudeDataSource", "event_key", "first_copies", "register"]

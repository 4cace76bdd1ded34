"""`spark.readStream.format("amplitude")`: incremental loads whose offsets are UTC upload hours.

An offset is `{"next_hour": "2024-03-02T00", "first_hour": "2024-03-01T00"}`: every upload hour before `next_hour`
has been read (`first_hour` is where the query began). A micro-batch reads the hours from its start offset to its
end offset, planned and read as a batch read plans and reads them (`spark.py`), plus the `lookback_hours` before
its start (never before `first_hour`), because Amplitude re-exports hours it has already served. The latest
offset never passes the last hour Amplitude can export (`lag_hours` after it closes), nor `end` when one is given.
Spark's checkpoint keeps the offsets, so a query restarted on its checkpoint re-reads exactly the batch it had
not committed and then continues. The same event can arrive again through the lookback: `spark.first_copies` (or a
MERGE on `uuid`) keeps one row per event; docs/SPARK.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pyarrow as pa

from .errors import UsageError
from .spark import INSTALL, Lane, Settings, lanes, read_lane
from .windows import HOUR, floor_hour, label_hour, last_ready_hour, parse_hour, resolve_range

try:
    from pyspark.sql.datasource import DataSourceStreamReader, InputPartition
except ImportError:  # pragma: no cover - spark.py has already refused
    raise ImportError(INSTALL) from None

try:  # Spark 4.2+: availableNow runs stop at the hour that was ready when they began
    from pyspark.sql.streaming.datasource import ReadAllAvailable, ReadMaxFiles, SupportsTriggerAvailableNow
except ImportError:  # pragma: no cover - Spark 4.0 and 4.1 wrap the source for availableNow themselves
    ReadAllAvailable = ReadMaxFiles = None  # type: ignore[assignment,misc]  # absent before Spark 4.2
    SupportsTriggerAvailableNow = object  # type: ignore[assignment,misc]  # absent before Spark 4.2


def offset(next_hour: datetime, first_hour: datetime) -> dict[str, str]:
    """The offset that says every upload hour before `next_hour` has been read."""
    return {"next_hour": label_hour(next_hour), "first_hour": label_hour(first_hour)}


def _hours(position: dict[str, str]) -> tuple[datetime, datetime]:
    return parse_hour(position["next_hour"]), parse_hour(position["first_hour"])


class AmplitudeStreamReader(DataSourceStreamReader, SupportsTriggerAvailableNow):
    """Offsets are upload hours; each micro-batch is a batch read of its hours and the lookback before them."""

    def __init__(self, options: Settings) -> None:
        if options.max_hours_per_trigger and ReadMaxFiles is None:
            raise UsageError("option max_hours_per_trigger needs Spark 4.2 or later (read limits of Python sources)")
        self.options = options
        self._target: datetime | None = None  # an availableNow run's last offset, fixed when it begins

    def initialOffset(self) -> dict[str, str]:
        """The first hour to read: `start`; else yesterday 00 UTC, or 00 of `end`'s day when that is earlier
        (as the CLI's first `run`)."""
        options = self.options
        if options.start is not None:
            first = parse_hour(options.start)
        else:
            first = resolve_range(None, None, now=options.clock(), lag_hours=options.lag_hours)[0]
            if options.end is not None:
                first = min(first, parse_hour(options.end, is_end=True).replace(hour=0))
        return offset(first, first)

    def _ready(self) -> datetime:
        """The offset past the last hour that can be read now: ready, and not after `end`."""
        options = self.options
        ready = last_ready_hour(options.clock(), options.lag_hours) + HOUR
        if options.end is not None:
            ready = min(ready, parse_hour(options.end, is_end=True) + HOUR)
        return floor_hour(ready)

    def prepareForTriggerAvailableNow(self) -> None:
        self._target = self._ready()

    def getDefaultReadLimit(self) -> Any:
        """`max_hours_per_trigger` as Spark's file limit: one upload hour counts as one file."""
        if self.options.max_hours_per_trigger and ReadMaxFiles is not None:
            return ReadMaxFiles(self.options.max_hours_per_trigger)
        return ReadAllAvailable() if ReadAllAvailable is not None else None

    def latestOffset(self, start: dict[str, str] | None = None, limit: Any = None) -> dict[str, str]:
        """Spark 4.2+ passes the batch's start and read limit; Spark 4.0/4.1 call it with neither."""
        latest = self._target or self._ready()
        if start is None:
            first = _hours(self.initialOffset())[1]
            return offset(latest, first)
        begin, first = _hours(start)
        if self.options.max_hours_per_trigger and (limit is None or not isinstance(limit, ReadAllAvailable)):
            hours = getattr(limit, "max_files", None) or self.options.max_hours_per_trigger
            latest = min(latest, begin + HOUR * hours)
        return offset(max(begin, latest), first)

    def partitions(self, start: dict[str, str], end: dict[str, str]) -> list[Lane]:
        begin, first = _hours(start)
        stop = _hours(end)[0]
        if stop <= begin:
            return []
        options = self.options
        windows = options.plan(begin, stop - HOUR)
        look_from = max(first, begin - HOUR * options.lookback_hours)
        if look_from < begin:
            windows = options.plan(look_from, begin - HOUR) + windows
        from .pipeline import new_run_id

        return lanes(windows, options.concurrency, new_run_id())

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        assert isinstance(partition, Lane)  # partitions() plans lanes only
        return read_lane(self.options, partition)

    def commit(self, end: dict[str, str]) -> None:
        """Nothing to release: each task cleans its own scratch space."""

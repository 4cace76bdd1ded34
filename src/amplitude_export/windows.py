"""Time windows: UTC hours of `server_upload_time`, both ends inclusive, as the Export API counts them.

A `Window` is a run of whole UTC hours. The range a user asks for is cut into windows aligned to UTC hours;
hours that Amplitude cannot export yet (it needs about two hours after an hour closes) are never planned.
Always UTC: the local clock never enters.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TypeVar

from .errors import UsageError

HOUR = timedelta(hours=1)
MAX_WINDOW_HOURS = 365 * 24  # the Export API answers at most 365 days per request

_FORMATS = [
    (re.compile(r"^(\d{4})(\d{2})(\d{2})T(\d{2})$"), True),  # 20240301T05
    (re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2})$"), True),  # 2024-03-01T05
    (re.compile(r"^(\d{4})(\d{2})(\d{2})$"), False),  # 20240301
    (re.compile(r"^(\d{4})-(\d{2})-(\d{2})$"), False),  # 2024-03-01
]


# Amplitude began in 2012: a year outside these is a typo, and past them Python's dates overflow
YEARS = (2000, 2999)


def _hour_in_range(moment: datetime, shown: str) -> datetime:
    """The UTC hour that contains `moment`, refused outside YEARS (checked before converting too: a zone's offset
    may overflow year 1 or 9999)."""
    if YEARS[0] <= moment.year <= YEARS[1]:
        moment = floor_hour(moment)
    if not YEARS[0] <= moment.year <= YEARS[1]:
        raise UsageError(f"{shown}: out of range: give a year from {YEARS[0]} to {YEARS[1]}")
    return moment


def parse_hour(text: str, *, is_end: bool = False) -> datetime:
    """Parse a user's start or end into a UTC hour; a bare end date means its hour 23 (the end is inclusive).

    An ISO 8601 time names the hour that holds it (`2024-03-01T05:30:00+02:00` is 03 UTC), read as UTC when it
    names no zone. A year outside YEARS is refused."""
    value = text.strip()
    for pattern, has_hour in _FORMATS:
        match = pattern.match(value)
        if not match:
            continue
        year, month, day = (int(part) for part in match.groups()[:3])
        hour = int(match.group(4)) if has_hour else (23 if is_end else 0)
        try:
            return _hour_in_range(datetime(year, month, day, hour, tzinfo=UTC), repr(text))
        except ValueError as exc:
            raise UsageError(f"invalid date {text!r}: {exc}") from None
    moment = _iso_moment(value)
    if moment is not None:
        return _hour_in_range(moment, repr(text))
    raise UsageError(
        f"cannot read {text!r} as a date: use YYYY-MM-DD, YYYY-MM-DDTHH, YYYYMMDD, YYYYMMDDTHH (UTC) or an ISO "
        "8601 time such as 2024-03-01T05:00:00Z"
    )


def _iso_moment(value: str) -> datetime | None:
    """An ISO 8601 date and time (`2024-03-01T05:30:00Z`, `2024-03-01 05:00+02:00`), in UTC when it names no
    zone; None when `value` is not one. Only forms with a time: a bare date is handled above (an end date means
    its last hour)."""
    if not re.match(r"^\d{4}-?\d{2}-?\d{2}[T ]\d{2}", value):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def as_hour(value: str | date | datetime | None, *, is_end: bool) -> datetime | None:
    """The UTC hour a library caller's start or end names: a string as `parse_hour` reads it, a date as its first
    hour (start) or last (end), an aware datetime as the hour that contains it (a naive one is refused: its zone
    is unknown)."""
    if value is None:
        return None
    if isinstance(value, date) and not isinstance(value, datetime):
        return parse_hour(value.isoformat(), is_end=is_end)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise UsageError(f"{value!r} has no time zone: pass an aware datetime (UTC)")
        return _hour_in_range(value, repr(value))
    return parse_hour(value, is_end=is_end)


def floor_hour(moment: datetime) -> datetime:
    """The UTC hour that contains `moment`."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def last_ready_hour(now: datetime, lag_hours: float = 2) -> datetime:
    """The latest hour H that can be exported at `now`: H is ready once now >= H + 1 h + lag."""
    return floor_hour(now - HOUR - timedelta(hours=lag_hours))


def format_hour(hour: datetime) -> str:
    """The Export API's `YYYYMMDDTHH` form of an hour."""
    return hour.astimezone(UTC).strftime("%Y%m%dT%H")


def label_hour(hour: datetime) -> str:
    """A reader's form of an hour, as reports and `verify` name it: `2024-03-01T05`."""
    return hour.astimezone(UTC).strftime("%Y-%m-%dT%H")


@dataclass(frozen=True, order=True)
class Window:
    """A run of whole UTC upload hours, `start` to `end` inclusive."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise UsageError(f"end {label_hour(self.end)} is before start {label_hour(self.start)}")

    @property
    def hours(self) -> int:
        """How many hours the window spans."""
        return int((self.end - self.start) / HOUR) + 1

    @property
    def name(self) -> str:
        """A file-safe name, used for the landed archive: `20240301T00_20240301T23`."""
        return f"{format_hour(self.start)}_{format_hour(self.end)}"

    def __str__(self) -> str:
        if self.start == self.end:
            return label_hour(self.start)
        return f"{label_hour(self.start)}..{label_hour(self.end)}"

    def params(self) -> dict[str, str]:
        """The Export API's query parameters for this window."""
        return {"start": format_hour(self.start), "end": format_hour(self.end)}

    def each_hour(self) -> Iterator[datetime]:
        """Every hour in the window, in order."""
        hour = self.start
        while hour <= self.end:
            yield hour
            hour += HOUR

    def split(self) -> tuple[Window, Window]:
        """Two halves that together hold exactly this window's hours (no hour in both)."""
        if self.hours < 2:
            raise ValueError(f"cannot split the one-hour window {self}")
        middle = self.start + HOUR * (self.hours // 2)
        return Window(self.start, middle - HOUR), Window(middle, self.end)

    @classmethod
    def from_name(cls, name: str) -> Window:
        """The window a landed archive's name stands for (the inverse of `name`)."""
        start, _, end = name.partition("_")
        return cls(parse_hour(start), parse_hour(end, is_end=True))


K = TypeVar("K", bound=Hashable)


def hour_runs(keyed: Iterable[tuple[datetime, K]]) -> list[tuple[Window, K]]:
    """Hours joined into runs of consecutive hours with equal keys, in the order the runs start.

    `keyed` gives (hour, key) pairs in ascending hour order; a pair extends the latest run of its key when that
    run ends the hour before, else it starts a new run. Runs of different keys may interleave.
    """
    runs: list[tuple[Window, K]] = []
    latest: dict[K, int] = {}  # key -> index in `runs` of its latest run
    for hour, key in keyed:
        index = latest.get(key)
        if index is not None and runs[index][0].end + HOUR == hour:
            runs[index] = (Window(runs[index][0].start, hour), key)
        else:
            latest[key] = len(runs)
            runs.append((Window(hour, hour), key))
    return runs


def plan_windows(start: datetime, end: datetime, window_hours: int = 24) -> list[Window]:
    """Cut start..end (inclusive hours) into windows aligned to UTC hours.

    Windows of 24 hours or more start at midnight, so a day is one window and one archive; no window is longer
    than 365 days, the Export API's limit.
    """
    if window_hours < 1:
        raise UsageError("--window-hours must be at least 1")
    Window(start, end)  # refuses an end before the start
    size = min(window_hours, MAX_WINDOW_HOURS)
    windows: list[Window] = []
    cursor = floor_hour(start)
    last = floor_hour(end)
    while cursor <= last:
        if size % 24 == 0:
            # align to midnight so days map to windows one to one
            boundary = cursor.replace(hour=0) + HOUR * size
        else:
            epoch_hours = int(cursor.timestamp() // 3600)
            boundary = cursor + HOUR * (size - epoch_hours % size)
        window_end = min(boundary - HOUR, last)
        windows.append(Window(cursor, window_end))
        cursor = window_end + HOUR
    return windows


def resolve_range(
    start: str | None,
    end: str | None,
    *,
    now: datetime,
    lag_hours: float = 2,
) -> tuple[datetime, datetime, datetime]:
    """Turn the user's --start/--end into (start, end, ready_end).

    With neither, the range is yesterday 00-23 UTC; with a start alone, it runs to the last ready hour.
    `ready_end` is `end` clipped to the last ready hour; it is before `start` when nothing in the range can be
    exported yet.
    """
    today = floor_hour(now).replace(hour=0)
    # an empty string is a date that does not parse, not a missing one
    first = parse_hour(start) if start is not None else today - timedelta(days=1)
    ready_hour = last_ready_hour(now, lag_hours)
    if end is not None:
        last = parse_hour(end, is_end=True)
    else:
        last = max(ready_hour, first) if start is not None else today - HOUR
    if last < first and start is None:
        raise UsageError(f"end {label_hour(last)} is before the default start {label_hour(first)} (yesterday, UTC): "
                         "give --start too")
    Window(first, last)  # refuses an end before the start
    return first, last, min(last, ready_hour)

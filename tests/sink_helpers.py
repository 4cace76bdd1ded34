"""Synthetic batches and HourRecords for sink tests: exactly `schema.ARROW_SCHEMA`, built in the test.

Shared read-only by every sink's tests (DuckDB, Parquet, PostgreSQL) so they all check the same behaviour.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from amplitude_export.ledger import LOADED, HourRecord, MemberInfo
from amplitude_export.schema import ARROW_SCHEMA, COLUMN_NAMES
from amplitude_export.windows import HOUR, Window

DAY = datetime(2024, 3, 1, tzinfo=UTC)


def hour(n: int) -> datetime:
    """The n-th hour after 2024-03-01T00 UTC."""
    return DAY + HOUR * n


def window(first: int, last: int) -> Window:
    """The window of hours `first`..`last` after 2024-03-01T00."""
    return Window(hour(first), hour(last))


def member_name(upload_hour: datetime, part: int = 0) -> str:
    """An archive member name the way Amplitude names them."""
    return f"123_{upload_hour:%Y-%m-%d_%-H}#{part}.json.gz"


def event(uuid: str, upload_hour: datetime, line: int = 1, *, part: int = 0, **fields: Any) -> dict[str, Any]:
    """One event row: every column present, typed values for the interesting ones, `fields` override."""
    upload = upload_hour + timedelta(minutes=line % 60, seconds=line % 7)
    row: dict[str, Any] = dict.fromkeys(COLUMN_NAMES)
    row.update(
        uuid=uuid,
        insert_id=f"ins-{uuid}",
        event_id=line,
        amplitude_id=10_000_000_000 + line,  # beyond 32 bits on purpose
        app=123,
        event_type="page_view",
        user_id=f"user-{line % 5}",
        device_id=f"dev-{line % 3}",
        event_time=upload - timedelta(hours=3),
        server_upload_time=upload,
        client_event_time=upload - timedelta(hours=3),
        event_properties=json.dumps({"page": f"/p/{line}", "n": line}),
        user_properties=json.dumps({"plan": "pro"}),
        is_attribution_event=False,
        location_lat=52.5,
        sample_rate=None,
        _upload_hour=upload_hour,
        _member=member_name(upload_hour, part),
        _line=line,
        _run_id="run-1",
        _project="p",  # what the sink tests write as
    )
    row.update(fields)
    return row


def batch(rows: list[dict[str, Any]]) -> pa.RecordBatch:
    """A RecordBatch of `rows` with exactly ARROW_SCHEMA."""
    return pa.RecordBatch.from_pylist(rows, schema=ARROW_SCHEMA)


def hour_events(upload_hour: datetime, uuids: list[str], *, part: int = 0) -> list[dict[str, Any]]:
    """Events for `uuids`, in one member of `upload_hour`, lines 1..n."""
    return [event(uuid, upload_hour, line, part=part) for line, uuid in enumerate(uuids, start=1)]


@dataclass(frozen=True)
class Read:
    """A `sinks.WindowRead` built in the test: `batches`, then the records `records()` gives."""

    batches: Iterable[pa.RecordBatch]
    records: Callable[[], list[HourRecord]]

    def hour_records(self) -> list[HourRecord]:
        return self.records()


def read_of(batches: Iterable[pa.RecordBatch], records: Callable[[], list[HourRecord]]) -> Read:
    """What a sink's `write_window` takes, as the reader would give it: `batches`, then `records()`."""
    return Read(batches, records)


def finisher(
    win: Window, rows: list[dict[str, Any]] | None = None, **fields: Any
) -> Callable[[], list[HourRecord]]:
    """A `finish` callable: one loaded HourRecord per hour of `win`, lines_read counted from `rows`."""
    calls: list[int] = []

    def finish() -> list[HourRecord]:
        calls.append(1)
        records = []
        for h in win.each_hour():
            lines = sum(1 for r in rows or [] if r["_upload_hour"] == h)
            records.append(
                HourRecord(
                    hour=h,
                    status=LOADED,
                    members=[MemberInfo(member_name(h), 1000 + lines, 0xDEADBEEF)],
                    content_hash="sha256:" + "0" * 64,
                    lines_read=lines,
                    bytes=1000 + lines,
                    min_server_upload_time=h,
                    max_server_upload_time=h + HOUR - timedelta(microseconds=1),
                    run_id="run-1",
                    **fields,
                )
            )
        return records

    finish.calls = calls  # type: ignore[attr-defined]
    return finish


class Crash(RuntimeError):
    """Raised from inside a batches iterator to simulate a reader dying mid-window."""


def crashing(batches: list[pa.RecordBatch], after: int) -> Iterator[pa.RecordBatch]:
    """Yield `after` batches, then raise Crash."""
    yield from batches[:after]
    raise Crash("reader died")


_PAYLOAD = json.dumps({f"prop_{i}": "x" * 20 for i in range(40)})  # ~1.2 KB of event_properties


def synthetic_batches(
    win: Window, per_hour: int, *, batch_rows: int = 8192, duplicate_every: int = 500
) -> Iterator[pa.RecordBatch]:
    """Realistically wide rows (~1.7 KB each), fast to build, for volume tests and benchmarks.

    Every `duplicate_every`-th line repeats the uuid of the line before it, so dedupe has work to do.
    """
    rows: list[dict[str, Any]] = []
    for h in win.each_hour():
        for line in range(1, per_hour + 1):
            n = line - 1 if duplicate_every and line % duplicate_every == 0 else line
            uuid = f"{h:%Y%m%d%H}-{n:09d}-0000-0000-000000000000"
            rows.append(event(uuid, h, line, event_properties=_PAYLOAD, city="Berlin", country="Germany"))
            if len(rows) == batch_rows:
                yield batch(rows)
                rows = []
    if rows:
        yield batch(rows)


def uuids(table: pa.Table) -> list[str]:
    """The uuid column as a sorted list."""
    return sorted(table.column("uuid").to_pylist())


def two_windows() -> list[tuple[Window, list[dict[str, Any]]]]:
    """Two windows of a few events with duplicates inside an hour, across hours and across the windows."""
    first = window(0, 1)
    rows1 = hour_events(hour(0), ["u1", "u2", "u1", "u3"]) + hour_events(hour(1), ["u4", "u2", "u5"])
    second = window(2, 3)
    rows2 = hour_events(hour(2), ["u6", "u1", "u7"]) + hour_events(hour(3), ["u8", "u6", "u9", "u9"])
    return [(first, rows1), (second, rows2)]


EXPECTED_UUIDS = [f"u{i}" for i in range(1, 10)]  # what `two_windows` leaves, each exactly once


def kill_writer(dest: str, point: str, marker: str) -> None:
    """Subprocess body for kill -9 tests: commit the first window, then stall inside the second one.

    `point` says where: "batches" (mid-iterator), "finish" (rows staged and inserted, not committed) or
    "commit" (Parquet: files renamed into place, state not yet written). The marker file appears when stalled.
    """
    import time
    from pathlib import Path

    from amplitude_export.sinks import open_sink

    sink = open_sink(dest)
    (w1, rows1), (w2, rows2) = two_windows()
    sink.write_window("p", w1, read_of([batch(rows1)], finisher(w1, rows1)))

    def stall() -> None:
        Path(marker).write_text(point)
        time.sleep(60)

    def stalling_batches() -> Iterator[pa.RecordBatch]:
        yield batch(rows2[:3])
        stall()
        yield batch(rows2[3:])

    finish = finisher(w2, rows2)
    batches: Iterable[pa.RecordBatch] = [batch(rows2[:3]), batch(rows2[3:])]
    if point == "batches":
        batches = stalling_batches()
    elif point == "finish":

        def finish_then_stall() -> list[HourRecord]:
            stall()
            return finish()

        finish = finish_then_stall  # type: ignore[assignment]
    elif point == "commit":
        sink._save_state = lambda *args: stall()  # type: ignore[attr-defined]
    sink.write_window("p", w2, read_of(batches, finish))
    Path(marker).write_text("finished without stalling")


if __name__ == "__main__":
    import sys

    kill_writer(*sys.argv[1:4])

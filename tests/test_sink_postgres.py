"""The PostgreSQL sink against a real server: types, exactly-once per uuid, atomic windows, locks, crashes.

These tests fail (never skip) when the server is unreachable, so a CI job without PostgreSQL is caught. The
server is `AMP_TEST_POSTGRES_URL`, by default the local trust-auth one; each test works in its own schema.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import uuid as uuid_module
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from conftest import POSTGRES_URL as URL
from conftest import url_for
from sink_helpers import read_of

from amplitude_export.errors import DestinationBusyError, DestinationError, UsageError
from amplitude_export.ledger import LOADED, HourRecord, MemberInfo
from amplitude_export.schema import ARROW_SCHEMA, COLUMN_NAMES, EXPORT_COLUMNS, JSON, JSON_COLUMNS, TIMESTAMP
from amplitude_export.sinks import open_sink
from amplitude_export.sinks.postgres import PostgresSink, escape_json_text, redact
from amplitude_export.synthetic import generate_hour
from amplitude_export.windows import HOUR, Window

H0 = datetime(2024, 3, 1, 0, tzinfo=UTC)


def event_rows(
    hour: datetime, events: int, *, seed: int = 1, member: str | None = None
) -> list[dict[str, Any]]:
    """Synthetic export lines of one upload hour as rows of ARROW_SCHEMA (what the archive reader yields)."""
    rows = []
    # uniform lines: each value fits its column, so the rows are the events' values as they are
    for line, event in enumerate(generate_hour(hour, project_id=1, seed=seed, events=events, variation=0), start=1):
        row: dict[str, Any] = {}
        for column in EXPORT_COLUMNS:
            value = event.get(column.source)
            if value is not None and column.kind == JSON:
                value = json.dumps(value, ensure_ascii=False)
            elif value is not None and column.kind == TIMESTAMP:
                value = datetime.fromisoformat(value).replace(tzinfo=UTC)
            row[column.name] = value
        row.update(
            _extra=None,
            _upload_hour=hour,
            _member=member or f"1_{hour:%Y-%m-%d_%H}#0.json.gz",
            _line=line,
            _run_id="run-1",
            _project="p1",  # what `write` loads them as
        )
        rows.append(row)
    return rows


def batches_of(rows: list[dict[str, Any]], size: int = 1000) -> Iterator[pa.RecordBatch]:
    for at in range(0, len(rows), size):
        yield pa.RecordBatch.from_pylist(rows[at : at + size], schema=ARROW_SCHEMA)


def finisher(window: Window, rows: list[dict[str, Any]]) -> Callable[[], list[HourRecord]]:
    """The reader's `finish`: one LOADED record per hour of the window, lines counted."""

    def finish() -> list[HourRecord]:
        return [
            HourRecord(
                hour=hour,
                status=LOADED,
                lines_read=sum(r["_upload_hour"] == hour for r in rows),
                members=[MemberInfo(f"{hour:%H}.json.gz", 10, 42)],
                run_id="run-1",
            )
            for hour in window.each_hour()
        ]

    return finish


def write(sink: PostgresSink, window: Window, rows: list[dict[str, Any]]) -> list[HourRecord]:
    return sink.write_window("p1", window, read_of(batches_of(rows), finisher(window, rows)))


def stored(sink: PostgresSink) -> dict[str, dict[str, Any]]:
    """Every stored row by uuid, as ARROW_SCHEMA Python values."""
    return {row["uuid"]: row for row in sink.read_arrow().to_pylist()}


@pytest.fixture()
def schema(pg_schema: str) -> str:
    return pg_schema


@pytest.fixture()
def sink(schema: str) -> Iterator[PostgresSink]:
    with PostgresSink(URL, schema=schema) as opened:
        yield opened


def test_tables_are_created_with_postgres_types(sink: PostgresSink, schema: str) -> None:
    types = dict(
        sink.conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s"
            " AND table_name = 'events'",
            [schema],
        ).fetchall()
    )
    assert set(types) == set(COLUMN_NAMES)
    assert types["event_time"] == "timestamp with time zone"
    assert types["amplitude_id"] == types["_line"] == "bigint"
    assert types["event_properties"] == types["_extra"] == "json"  # the export's text as it came, validated
    assert types["location_lat"] == "double precision" and types["is_attribution_event"] == "boolean"
    key = sink.conn.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
        " WHERE i.indrelid = %s::regclass AND i.indisunique",
        [f'"{schema}".events'],
    ).fetchall()
    assert key == [("uuid",)]  # unique, not primary: events without a uuid are kept
    ledger = dict(
        sink.conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s"
            " AND table_name = '_amplitude_ledger'",
            [schema],
        ).fetchall()
    )
    assert ledger["members"] == "jsonb" and ledger["hour"] == "timestamp with time zone"
    assert set(ledger) == {"project", *HourRecord.__dataclass_fields__}


def test_window_rows_are_typed_and_exact(sink: PostgresSink) -> None:
    rows = event_rows(H0, 60)
    rows[0].update(
        event_time=datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC),
        location_lat=0.1 + 0.2,
        event_properties=json.dumps({"a": [1, 2.5, None, {"ü": "東京 🎉"}], "big": 2**53 + 1}),
        user_id="",
        city='line\nbreak \\. "quoted", comma',
    )
    rows[1].update(
        event_properties=None, user_properties="{}", is_attribution_event=False, amplitude_id=-(2**63)
    )
    window = Window(H0, H0)
    records = write(sink, window, rows)
    assert [(r.hour, r.events_loaded, r.duplicates, r.lines_read) for r in records] == [
        (H0, 60 - dup(rows), dup(rows), 60)
    ]
    assert records[0].updated_at is not None and records[0].members == [MemberInfo("00.json.gz", 10, 42)]
    got = stored(sink)
    for row in first_per_uuid(rows).values():
        back = got[row["uuid"]]
        for name in COLUMN_NAMES:
            if name in (
                "event_properties",
                "user_properties",
                "data",
                "groups",
                "plan",
                "group_properties",
                "global_user_properties",
                "amplitude_attribution_ids",
                "_extra",
            ):
                assert (json.loads(back[name]) if back[name] is not None else None) == (
                    json.loads(row[name]) if row[name] is not None else None
                ), name
            else:
                assert back[name] == row[name], name
    assert sink.read_arrow().schema.equals(ARROW_SCHEMA)
    typed = sink.conn.execute(
        f'SELECT event_time, event_properties, user_id FROM "{sink.schema}".events WHERE uuid = %s',
        [rows[0]["uuid"]],
    ).fetchone()
    assert typed == (rows[0]["event_time"], json.loads(rows[0]["event_properties"]), "")
    assert sink.ledger("p1")[H0].events_loaded == 60 - dup(rows)
    assert sink.ledger("other") == {}


def dup(rows: list[dict[str, Any]]) -> int:
    return len(rows) - len({r["uuid"] for r in rows})


def first_per_uuid(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        first.setdefault(row["uuid"], row)
    return first


def test_duplicates_within_and_across_windows(sink: PostgresSink) -> None:
    h1 = H0 + HOUR
    a = event_rows(H0, 20)
    b = event_rows(h1, 20)
    a.append({**a[3], "_line": 21, "city": "later copy"})  # same hour, later line: the first one wins
    b[5:5] = [{**a[0], "_upload_hour": h1, "_line": 99, "city": "other hour"}]  # stored under H0: H0 wins
    a_uuids = {r["uuid"] for r in a}
    b_new = {r["uuid"] for r in b} - a_uuids
    records = write(sink, Window(H0, H0), a)
    assert (records[0].events_loaded, records[0].duplicates) == (len(a_uuids), len(a) - len(a_uuids))
    records = write(sink, Window(h1, h1), b)
    assert (records[0].events_loaded, records[0].duplicates) == (len(b_new), len(b) - len(b_new))
    got = stored(sink)
    assert set(got) == a_uuids | b_new
    assert got[a[3]["uuid"]]["city"] == a[3]["city"] and got[a[0]["uuid"]]["_upload_hour"] == H0


def test_rewriting_a_window_replaces_its_rows(sink: PostgresSink) -> None:
    window = Window(H0, H0 + HOUR)
    old = event_rows(H0, 30) + event_rows(H0 + HOUR, 30)
    write(sink, window, old)
    new = event_rows(H0, 10, seed=2)  # the second hour is empty now
    records = write(sink, window, new)
    assert [(r.events_loaded, r.duplicates) for r in records] == [(10, 0), (0, 0)]
    assert set(stored(sink)) == {r["uuid"] for r in new}
    assert len(sink.ledger("p1")) == 2


def test_an_error_inside_the_batches_leaves_nothing(sink: PostgresSink) -> None:
    window = Window(H0, H0)
    before = event_rows(H0, 15)
    write(sink, window, before)
    ledger_before = sink.ledger("p1")

    def broken() -> Iterator[pa.RecordBatch]:
        yield from batches_of(event_rows(H0, 40, seed=3), 10)
        raise RuntimeError("archive broke")

    with pytest.raises(RuntimeError, match="archive broke"):
        sink.write_window("p1", window, read_of(broken(), finisher(window, [])))
    assert set(stored(sink)) == {r["uuid"] for r in before}
    assert sink.ledger("p1") == ledger_before
    write(sink, window, event_rows(H0, 5, seed=4))  # the sink is still usable
    assert len(stored(sink)) == 5


def test_binary_copy_edge_values_round_trip(sink: PostgresSink) -> None:
    rows = event_rows(H0, 6)
    rows[0].update(
        event_time=datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC),
        location_lat=float("inf"),
        location_lng=-0.0,
        sample_rate=float("nan"),
        session_id=-1,
        is_attribution_event=True,
        user_id="NA",
        city="NULL",
        country="nan",
    )
    rows[1].update(
        event_time=datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        location_lat=float("-inf"),
        user_properties="[]",
        event_properties='"just a string"',
        groups="null",
    )
    rows[2].update(**{name: None for name in COLUMN_NAMES if name not in ("uuid", "_upload_hour", "_project")})
    table = pa.Table.from_pylist(rows, schema=ARROW_SCHEMA)
    sliced = table.slice(1).to_batches()  # arrays with a non-zero offset
    window = Window(H0, H0)
    sink.write_window("p1", window, read_of([table.slice(0, 1).to_batches()[0], *sliced], finisher(window, rows)))
    got = stored(sink)
    first = got[rows[0]["uuid"]]
    assert first["event_time"] == rows[0]["event_time"] and first["location_lat"] == float("inf")
    assert str(first["location_lng"]) == "-0.0" and math.isnan(first["sample_rate"])
    assert (first["session_id"], first["is_attribution_event"]) == (-1, True)
    assert (first["user_id"], first["city"], first["country"]) == ("NA", "NULL", "nan")
    second = got[rows[1]["uuid"]]
    assert second["event_time"] == rows[1]["event_time"] and second["location_lat"] == float("-inf")
    assert (second["user_properties"], second["event_properties"], second["groups"]) == (
        "[]",
        '"just a string"',
        "null",
    )
    empty = got[rows[2]["uuid"]]
    assert all(empty[name] is None for name in COLUMN_NAMES if name not in ("uuid", "_upload_hour", "_project"))


def test_json_columns_keep_the_exports_text(sink: PostgresSink) -> None:
    rows = event_rows(H0, 2)
    rows[0].update(event_properties='{"b": 1, "a": [2, {"z": null, "y": 1.50}]}', user_properties='{"k":1,"k":2}')
    write(sink, Window(H0, H0), rows)
    back = stored(sink)[rows[0]["uuid"]]
    assert (back["event_properties"], back["user_properties"]) == (rows[0]["event_properties"], '{"k":1,"k":2}')


def to_jsonb(schema: str, columns: Iterable[str] = JSON_COLUMNS) -> None:
    """Type `columns` of the schema's `events` `jsonb`, as versions before `json` made them."""
    with psycopg.connect(URL, autocommit=True) as conn:
        for name in columns:
            conn.execute(f'ALTER TABLE "{schema}".events ALTER COLUMN "{name}" TYPE jsonb USING "{name}"::jsonb')


@pytest.mark.parametrize("made_by", ["older version", "user before the first load"])
def test_an_events_table_with_jsonb_columns_still_loads(sink: PostgresSink, schema: str, made_by: str) -> None:
    # tables made by versions before `json`, or by a user who wants jsonb's operators, type them `jsonb`, whose
    # binary COPY form differs: the sink reads the types when it opens
    sink.close()
    columns = JSON_COLUMNS if made_by == "older version" else ("event_properties", "_extra")
    to_jsonb(schema, columns)
    if made_by != "older version":  # only `events` is there: the sink makes its ledger
        with psycopg.connect(URL, autocommit=True) as conn:
            conn.execute(f'DROP TABLE "{schema}"._amplitude_ledger')
    rows = event_rows(H0, 40)
    rows[0].update(event_properties=r'{"b": 1, "a": "x\u0000y", "d": "\udc00"}', user_properties="[]")
    with PostgresSink(URL, schema=schema) as reopened:
        write(reopened, Window(H0, H0), rows)
        got = stored(reopened)
    assert json.loads(got[rows[0]["uuid"]]["event_properties"]) == {"b": 1, "a": "x\\u0000y", "d": "\\udc00"}
    for row in first_per_uuid(rows).values():
        assert json.loads(got[row["uuid"]]["user_properties"]) == json.loads(row["user_properties"])


def test_rows_outside_the_window_are_refused(sink: PostgresSink) -> None:
    with pytest.raises(ValueError, match="outside"):
        write(sink, Window(H0, H0), event_rows(H0 + HOUR, 3))
    assert stored(sink) == {}


def test_nul_and_bad_escapes_are_kept_as_literal_text(sink: PostgresSink) -> None:
    rows = event_rows(H0, 3)
    rows[0].update(
        event_properties=r'{"a": "x\u0000y", "b": "\\u0000", "c": "\ud83d\ude00", "d": "\udc00"}',
        user_id="nul\x00here",
    )
    rows[1].update(data='{"k": "raw\x00nul"}')
    write(sink, Window(H0, H0), rows)
    got = stored(sink)
    assert json.loads(got[rows[0]["uuid"]]["event_properties"]) == {
        "a": "x\\u0000y",
        "b": "\\u0000",
        "c": "😀",
        "d": "\\udc00",
    }
    assert got[rows[0]["uuid"]]["user_id"] == "nul\\u0000here"
    assert json.loads(got[rows[1]["uuid"]]["data"]) == {"k": "raw\\u0000nul"}
    assert escape_json_text(r'"\\\u0000"') == r'"\\\\u0000"'


def test_record_hours_and_ledger_round_trip(sink: PostgresSink) -> None:
    record = HourRecord(
        hour=H0,
        status="failed",
        reason="timeout",
        attempts=3,
        min_event_time=datetime(2024, 2, 1, 1, 2, 3, 4, tzinfo=UTC),
    )
    sink.record_hours("p1", [record])
    back = sink.ledger("p1")[H0]
    assert back.updated_at is not None
    assert back == HourRecord(**{**record.__dict__, "updated_at": back.updated_at})


def test_second_sink_with_wait_false_is_busy(schema: str) -> None:
    with PostgresSink(URL, schema=schema), pytest.raises(DestinationBusyError, match=schema):
        PostgresSink(URL, schema=schema, wait=False)
    PostgresSink(URL, schema=schema, wait=False).close()  # released on close


def test_the_lock_is_released_before_the_connection_closes(schema: str) -> None:
    """A server releases a closed connection's locks only once its backend notices and exits, which under load
    takes long enough for a run started right after to find the destination busy (seen in CI): `close` releases
    the lock first. Checked from another session at the moment the connection is about to close."""
    sink = PostgresSink(URL, schema=schema)
    held_at_close: list[bool] = []
    with psycopg.connect(URL, autocommit=True) as other:
        def held() -> bool:
            row = other.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s",
                                [sink.conn.info.backend_pid]).fetchone()
            return bool(row and row[0])

        assert held()
        close = sink.conn.close

        def checked_close() -> None:
            held_at_close.append(held())
            close()

        sink.conn.close = checked_close  # type: ignore[method-assign]
        sink.close()
    assert held_at_close == [False]
    PostgresSink(URL, schema=schema, wait=False).close()


def test_concurrent_writers_with_wait_end_exact(schema: str) -> None:
    rows = {hour: event_rows(hour, 40, seed=hour.hour) for hour in (H0, H0 + HOUR, H0 + 2 * HOUR)}
    windows = [Window(H0, H0 + HOUR), Window(H0 + HOUR, H0 + 2 * HOUR)]
    errors: list[BaseException] = []

    def run(window: Window) -> None:
        try:
            with PostgresSink(URL, schema=schema, wait=True) as sink:
                for _ in range(2):
                    write(sink, window, [r for hour in window.each_hour() for r in rows[hour]])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in windows]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    with PostgresSink(URL, schema=schema) as sink:
        assert set(stored(sink)) == {r["uuid"] for hour_rows in rows.values() for r in hour_rows}
        assert sum(r.events_loaded for r in sink.ledger("p1").values()) == len(stored(sink))


@pytest.mark.parametrize(
    "url, error, expected",
    [
        # the server is unusable: a destination error (exit 4)
        ("postgresql://postgres:s3cret-pw@127.0.0.1:1/test", DestinationError, "127.0.0.1"),  # nothing on port 1
        ("postgresql://postgres:s3cret-pw@127.0.0.1:5432/amp_no_such_db", DestinationError, "amp_no_such_db"),
        ("postgresql://postgres@127.0.0.1:5432/test?password=s3cret-pw&sslmode=bogus", DestinationError, "sslmode"),
        # the URL itself is malformed: bad input (exit 2)
        ("postgresql://postgres:s3cret-pw@127.0.0.1:notaport/test", UsageError, "port 'notaport'"),
        ("postgresql://postgres:s3cret-pw@127.0.0.1:5432/test?port=70000", UsageError, "port '70000'"),
        ("postgresql://postgres:s3cret-pw@[bad/test", UsageError, "IPv6"),
        ("postgresql://postgres@[::1", UsageError, "IPv6"),
        ("postgresql://postgres:s3cret-pw@127.0.0.1/test?nosuchoption=1", UsageError, "nosuchoption"),
    ],
)
def test_bad_destinations_fail_in_one_line_without_the_password(
    url: str, error: type[Exception], expected: str
) -> None:
    with pytest.raises(error) as caught:
        PostgresSink(url, schema="amp_never_created", connect_timeout=3)
    message = str(caught.value)
    assert "s3cret" not in message and "\n" not in message and expected in message


def test_a_role_with_only_schema_privileges_creates_the_tables(pg_role: tuple[str, str]) -> None:
    role, schema = pg_role
    with psycopg.connect(URL, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        admin.execute(f'GRANT USAGE, CREATE ON SCHEMA "{schema}" TO "{role}"')
        may_create = admin.execute(
            "SELECT has_database_privilege(%s, current_database(), 'CREATE')", [role]
        ).fetchone()
    assert may_create == (False,)
    rows = event_rows(H0, 30)
    with PostgresSink(url_for(role), schema=schema) as sink:
        write(sink, Window(H0, H0), rows)
        assert set(stored(sink)) == {r["uuid"] for r in rows}
    with psycopg.connect(URL, autocommit=True) as admin:
        owners = admin.execute(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = %s", [schema]
        ).fetchall()
    assert owners == [(role,)]


def test_missing_privilege_is_a_destination_error(schema: str) -> None:
    role = f"amp_noprivs_{uuid_module.uuid4().hex[:8]}"
    with psycopg.connect(URL, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        try:
            user_url = URL.replace("postgres@", f"{role}@", 1) if "postgres@" in URL else None
            if user_url is None:
                pytest.fail("AMP_TEST_POSTGRES_URL must name user postgres for this test")
            with pytest.raises(DestinationError, match="permission denied"):
                PostgresSink(user_url, schema=schema)
        finally:
            admin.execute(f'DROP ROLE "{role}"')


def test_redact_and_description() -> None:
    assert redact("postgresql://u:p%40ss@h:5432/db?sslmode=require&password=x") == (
        "postgresql://u@h:5432/db?sslmode=require&password=***"
    )
    sink = open_sink(URL, schema="public", wait=True)
    try:
        assert isinstance(sink, PostgresSink) and "public" in sink.description
    finally:
        sink.close()


# Runs in a subprocess: writes a window and stalls either inside the batches (mid-COPY) or in `finish` (rows
# already inserted into `events`, not committed), printing "stalled" for the parent to kill it there.
CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from test_sink_postgres import *
sink = PostgresSink(URL, schema={schema!r})
rows = event_rows(H0, 400, seed=7)
window = Window(H0, H0)
def stall():
    print("stalled", flush=True)
    time.sleep(60)
def batches():
    for i, batch in enumerate(batches_of(rows, 50)):
        yield batch
        if i == 3 and {point!r} == "batches":
            stall()
finish = finisher(window, rows)
def finish_then_stall():
    if {point!r} == "finish":
        stall()
    return finish()
sink.write_window("p1", window, read_of(batches(), finish_then_stall))
"""


def kill_9_when_stalled(code: str) -> None:
    """Run `code` in a Python subprocess and SIGKILL it once it prints "stalled"."""
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "stalled"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(10)


@pytest.mark.parametrize("point", ["batches", "finish"])
def test_kill_9_mid_write_then_rewrite_is_exact(schema: str, point: str) -> None:
    with PostgresSink(URL, schema=schema) as sink:
        first = event_rows(H0, 20, seed=8)
        write(sink, Window(H0, H0), first)
        ledger_before = sink.ledger("p1")
    kill_9_when_stalled(CHILD.format(tests=str(Path(__file__).parent), schema=schema, point=point))
    # wait=True: the server may take a moment to notice the dead client and release its lock
    with PostgresSink(URL, schema=schema, wait=True) as sink:
        assert set(stored(sink)) == {r["uuid"] for r in first}
        assert sink.ledger("p1") == ledger_before
        rows = event_rows(H0, 400, seed=7)
        records = write(sink, Window(H0, H0), rows)
        assert set(stored(sink)) == {r["uuid"] for r in rows}
        assert records[0].events_loaded == len(first_per_uuid(rows))


def test_server_must_be_reachable() -> None:
    """Fails rather than skips without a server, so CI cannot silently lose this suite."""
    psycopg.connect(URL, connect_timeout=5).close()

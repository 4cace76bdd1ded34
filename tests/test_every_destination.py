"""What every destination must do alike: load the real export lines without loss, and keep projects apart.

Runs against DuckDB, Parquet, Delta Lake and the real PostgreSQL (which must be reachable: these fail, never
skip).
Each also keeps in its ledger what retries and splits an hour took, and opens ledgers made before `split_from`.
"""

from __future__ import annotations

import base64
import gzip
import json
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import psycopg
import pytest
import stamina
from conftest import DAY, POSTGRES_URL, REAL_EVENTS
from deltalake import DeltaTable
from sink_helpers import batch, finisher, hour, hour_events, read_of, window

from amplitude_export.client import ExportClient
from amplitude_export.config import Credentials, Secret
from amplitude_export.fake_server import FakeExportServer
from amplitude_export.ledger import EMPTY, FAILED, LOADED, HourRecord
from amplitude_export.pipeline import run
from amplitude_export.reader import WindowReader
from amplitude_export.schema import EXPORT_COLUMNS, JSON, JSON_COLUMNS, KNOWN_SOURCES, TIMESTAMP
from amplitude_export.sinks import Sink, open_sink
from amplitude_export.verify import verify
from amplitude_export.windows import HOUR, Window


@pytest.fixture(params=["duckdb", "parquet", "delta", "postgres", "iceberg"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "duckdb":
        return f"duckdb:{tmp_path / 'a.duckdb'}"
    if request.param == "parquet":
        return f"parquet:{tmp_path / 'dataset'}"
    if request.param == "iceberg":
        return f"iceberg:{tmp_path / 'warehouse'}"
    if request.param == "delta":
        return f"delta:{tmp_path / 'table'}"
    return f"{POSTGRES_URL}?schema={request.getfixturevalue('pg_schema')}"


def real_archives(tmp_path: Path) -> list[tuple[Window, Path]]:
    """The real export lines, each in a member named for its upload hour, one archive per hour."""
    by_hour: dict[datetime, list[bytes]] = {}
    for line in REAL_EVENTS.read_bytes().splitlines():
        uploaded = datetime.fromisoformat(json.loads(line)["server_upload_time"]).replace(tzinfo=UTC)
        by_hour.setdefault(uploaded.replace(minute=0, second=0, microsecond=0), []).append(line)
    archives = []
    for upload_hour, lines in sorted(by_hour.items()):
        path = tmp_path / f"{upload_hour:%Y%m%dT%H}.zip"
        with zipfile.ZipFile(path, "w") as archive:
            name = f"1/1_{upload_hour:%Y-%m-%d}_{upload_hour.hour}#0.json.gz"
            archive.writestr(name, gzip.compress(b"\n".join(lines) + b"\n", mtime=0))
        archives.append((Window(upload_hour, upload_hour), path))
    return archives


def load_real(sink: Sink, tmp_path: Path) -> None:
    for win, path in real_archives(tmp_path):
        reader = WindowReader(path, win, run_id="run-1", rejects_dir=tmp_path / "rejects", workers=1)
        sink.write_window("real", win, reader.read())


def test_every_real_export_line_loads_without_loss(dest: str, tmp_path: Path) -> None:
    lines = [json.loads(line) for line in REAL_EVENTS.read_bytes().splitlines()]
    sink = open_sink(dest)
    try:
        load_real(sink, tmp_path)
        load_real(sink, tmp_path)  # loading the same hours again replaces, never adds
        rows = sink.read_arrow().to_pylist()
    finally:
        sink.close()
    assert len(rows) == len(lines) == 7
    assert sorted(map(str, (r["uuid"] for r in rows))) == sorted(map(str, (e.get("uuid") for e in lines)))
    for line in lines:
        (row,) = [r for r in rows if r["uuid"] == line.get("uuid")]  # line 7 has no uuid: NULL, kept
        assert row["_project"] == "real" and row["_run_id"] == "run-1"
        extra = json.loads(row["_extra"]) if row["_extra"] else {}
        for column in EXPORT_COLUMNS:  # every field of the line, by its value in the table
            value = line.get(column.source)
            stored = row[column.name]
            if value is not None and stored is None:
                assert extra[column.source] == value, column.source  # kept verbatim beside the typed columns
            elif column.kind == TIMESTAMP and value is not None:
                assert stored == datetime.fromisoformat(value).replace(tzinfo=UTC), column.source
            elif column.kind == JSON and value is not None:
                assert json.loads(stored) == value, column.source
            else:
                assert stored == value, column.source
        assert set(extra) <= set(line)
        for key in set(line) - KNOWN_SOURCES:  # fields the schema does not know: kept, with their values
            assert extra[key] == line[key], key


def test_projects_in_one_destination_are_kept_apart(dest: str) -> None:
    """Project b loading the same hours as project a neither deletes nor hides a's rows; each verifies alone."""
    w = window(0, 1)
    rows_a = hour_events(hour(0), [f"a{n}" for n in range(5)]) + hour_events(hour(1), ["a5"])
    rows_b = hour_events(hour(0), [f"b{n}" for n in range(3)])
    sink = open_sink(dest)
    try:
        sink.write_window("a", w, read_of([batch(rows_a)], finisher(w, rows_a)))
        sink.write_window("b", w, read_of([batch(rows_b)], finisher(w, rows_b)))
        sink.write_window("b", w, read_of([batch(rows_b[:1])], finisher(w, rows_b[:1])))  # b reloads: only b changes
        assert sink.count_by_hour("a") == {hour(0): 5, hour(1): 1}
        assert sink.count_by_hour("b") == {hour(0): 1}
        assert set(sink.ledger("a")) == set(sink.ledger("b")) == {hour(0), hour(1)}
        assert {r["uuid"] for r in sink.read_arrow(project="b").to_pylist()} == {"b0"}
        assert len(sink.read_arrow().to_pylist()) == 7
    finally:
        sink.close()
    sink = open_sink(dest, read_only=True)
    try:
        assert verify(sink, "a").complete and verify(sink, "b").complete
    finally:
        sink.close()


def stored_ledger(dest: str, project: str) -> dict[datetime, tuple[str, int, str | None]]:
    """(status, attempts, split_from) per hour, read from the destination's own storage, not through the sink."""
    if dest.startswith("duckdb:"):
        with duckdb.connect(dest.removeprefix("duckdb:"), read_only=True) as con:
            con.execute("SET TimeZone = 'UTC'")
            rows = con.execute("SELECT strftime(hour, '%Y-%m-%dT%H'), status, attempts, split_from "
                               "FROM _amplitude_ledger WHERE project = ?", [project]).fetchall()  # fmt: skip
        return {datetime.strptime(h, "%Y-%m-%dT%H").replace(tzinfo=UTC): (s, a, f) for h, s, a, f in rows}
    if dest.startswith("parquet:"):
        state = json.loads((Path(dest.removeprefix("parquet:")) / "_state" / "ledger.json").read_text())
        return {datetime.fromisoformat(h): (r["status"], r["attempts"], r.get("split_from"))
                for h, r in state["ledger"][project].items()}  # fmt: skip
    if dest.startswith("iceberg:"):  # the table's properties, decoded by hand: gzipped JSON in base64
        hours: dict[str, dict[str, object]] = {}
        for value in iceberg_ledger_properties(dest).values():
            data = json.loads(gzip.decompress(base64.b64decode(value)))
            hours |= data["hours"] if data["project"] == project else {}
        return {datetime.fromisoformat(h): (r["status"], r["attempts"], r.get("split_from"))  # type: ignore[misc]
                for h, r in hours.items()}  # fmt: skip
    if dest.startswith("delta:"):  # the ledger table a writer leaves when it closes (the commits hold the same)
        rows = DeltaTable(str(Path(dest.removeprefix("delta:")) / "_amplitude_ledger")).to_pyarrow_table().to_pylist()
        return {r["hour"]: (r["status"], r["attempts"], r["split_from"]) for r in rows if r["project"] == project}
    url, _, schema = dest.partition("?schema=")
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(f'SELECT hour, status, attempts, split_from FROM "{schema}"._amplitude_ledger '
                            "WHERE project = %s", [project]).fetchall()  # fmt: skip
    return {h.astimezone(UTC): (s, a, f) for h, s, a, f in rows}


def test_retries_and_splits_are_in_the_ledger(dest: str, tmp_path: Path) -> None:
    """Every window's first request fails (503) and windows over 6 hours answer 504: with 2 attempts a window,
    the planned day is split into halves (503, 504), the halves into quarters (503, 504), and each quarter
    loads at its second request; so each hour's data took 2 + 2 + 2 requests and came from the planned day.
    The next planned window (6 hours, no data) is neither split nor loaded: 503 then 404."""
    with (
        stamina.set_testing(True, attempts=100, cap=True),
        FakeExportServer(events_per_hour=20, data_start=DAY, data_end=DAY + 23 * HOUR, faults=["503"],
                         timeout_over_hours=6) as server,
    ):  # fmt: skip
        credentials = Credentials(server.api_key, Secret("demo-secret"), "us", server.url)
        with ExportClient(credentials, max_attempts=2) as client, open_sink(dest) as sink:
            report = run(client, sink, project="p", start="2024-03-01", end="2024-03-02T05", data_dir=tmp_path,
                         workers=1, now=datetime(2024, 4, 1, tzinfo=UTC))  # fmt: skip
        statuses = [status for _, _, status in server.requests]
        expected_events = len(server.expected_uuids(DAY, DAY + 23 * HOUR))
    assert report.exit_code == 0 and report.events == expected_events > 0
    assert statuses.count(504) == 3 and statuses.count(503) == 8  # 504: the day, its halves; 503: every window
    expected = {DAY + HOUR * n: (LOADED, 6, "2024-03-01T00..2024-03-01T23") for n in range(24)}
    expected |= {DAY + HOUR * n: (EMPTY, 2, None) for n in range(24, 30)}
    assert stored_ledger(dest, "p") == expected
    with open_sink(dest, read_only=True) as sink:  # what status, verify and the report read
        ledger = sink.ledger("p")
    assert {h: (r.status, r.attempts, r.split_from) for h, r in ledger.items()} == expected


def iceberg_catalog(dest: str) -> tuple[object, tuple[str, str]]:
    """The SQLite catalog of an `iceberg:DIR` destination, through pyiceberg rather than the sink."""
    from pyiceberg.catalog.sql import SqlCatalog

    root = Path(dest.removeprefix("iceberg:"))
    return SqlCatalog("amplitude_export", uri=f"sqlite:///{root / 'catalog.db'}", warehouse=root.as_uri()), (
        "amplitude", "events")


def iceberg_ledger_properties(dest: str) -> dict[str, str]:
    catalog, name = iceberg_catalog(dest)
    table = catalog.load_table(name)  # type: ignore[attr-defined]
    return {k: v for k, v in table.properties.items() if k.startswith("amplitude-export.ledger.")}


def drop_split_from(dest: str) -> None:
    """Make the destination's ledger look as the version before `split_from` left it."""
    if dest.startswith("duckdb:"):
        with duckdb.connect(dest.removeprefix("duckdb:")) as con:
            con.execute("ALTER TABLE _amplitude_ledger DROP COLUMN split_from")
    elif dest.startswith("parquet:"):
        path = Path(dest.removeprefix("parquet:")) / "_state" / "ledger.json"
        state = json.loads(path.read_text())
        for hours in state["ledger"].values():
            for record in hours.values():
                del record["split_from"]
        path.write_text(json.dumps(state))
    elif dest.startswith("iceberg:"):
        catalog, name = iceberg_catalog(dest)
        properties = {}
        for key, value in iceberg_ledger_properties(dest).items():
            data = json.loads(gzip.decompress(base64.b64decode(value)))
            for record in data["hours"].values():
                del record["split_from"]
            properties[key] = base64.b64encode(gzip.compress(json.dumps(data).encode())).decode()
        with catalog.load_table(name).transaction() as tx:  # type: ignore[attr-defined]
            tx.set_properties(properties)
    else:
        url, _, schema = dest.partition("?schema=")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'ALTER TABLE "{schema}"._amplitude_ledger DROP COLUMN split_from')


@pytest.mark.parametrize("dest", ["duckdb", "parquet", "postgres"], indirect=True)  # no Delta table predates it
def test_a_ledger_made_without_split_from_opens_and_gains_it(dest: str) -> None:
    w = window(0, 1)
    rows = hour_events(hour(0), ["a0", "a1"]) + hour_events(hour(1), ["a2"])
    with open_sink(dest) as sink:
        sink.write_window("p", w, read_of([batch(rows)], finisher(w, rows, attempts=3)))
    drop_split_from(dest)

    with open_sink(dest, read_only=True) as sink:  # status/verify/report on a destination no newer run has opened
        old = sink.ledger("p")
        assert verify(sink, "p").complete
    assert {h: (r.attempts, r.split_from) for h, r in old.items()} == {hour(0): (3, None), hour(1): (3, None)}

    with open_sink(dest) as sink:  # a run of this version adds the column and writes it
        sink.record_hours("p", [HourRecord(hour=hour(2), status=FAILED, reason="504", attempts=4,
                                           split_from="2024-03-01T00..2024-03-01T23")])  # fmt: skip
        w2 = window(3, 3)
        more = hour_events(hour(3), ["b0"])
        sink.write_window("p", w2, read_of([batch(more)],
                                           finisher(w2, more, attempts=2, split_from="2024-03-01T00..2024-03-01T05")))
        assert sink.count_by_hour("p") == {hour(0): 2, hour(1): 1, hour(3): 1}
    assert stored_ledger(dest, "p") == {
        hour(0): (LOADED, 3, None),
        hour(1): (LOADED, 3, None),
        hour(2): (FAILED, 4, "2024-03-01T00..2024-03-01T23"),
        hour(3): (LOADED, 2, "2024-03-01T00..2024-03-01T05"),
    }
    with open_sink(dest) as sink:  # and opening it again changes nothing
        assert sink.ledger("p")[hour(3)].split_from == "2024-03-01T00..2024-03-01T05"


@pytest.mark.parametrize("kind", ["duckdb", "postgres"])
def test_windows_past_the_in_memory_uuid_limit_keep_the_same_first_copies(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Past `seen_limit` uuids a window's repeats are removed in SQL instead: the same rows and counts."""
    from sink_helpers import EXPECTED_UUIDS, two_windows

    results = []
    for limit in (1_000_000, 2):  # 2: full after the first batch of two rows
        if kind == "duckdb":
            dest = f"duckdb:{tmp_path / f'limit{limit}.duckdb'}"
        else:
            dest = f"{POSTGRES_URL}?schema={request.getfixturevalue('pg_schema')}_{limit}"
        sink = open_sink(dest, seen_limit=limit)
        try:
            records = []
            for w, rows in two_windows():
                parts = [batch(rows[i : i + 2]) for i in range(0, len(rows), 2)]
                records += sink.write_window("p", w, read_of(parts, finisher(w, rows)))
            kept = sorted((r["uuid"], r["_upload_hour"], r["_line"]) for r in sink.read_arrow().to_pylist())
            results.append((kept, [(r.events_loaded, r.duplicates) for r in records]))
        finally:
            sink.close()
            if kind == "postgres":
                with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{request.getfixturevalue("pg_schema")}_{limit}" CASCADE')
    assert results[0] == results[1]
    assert [uuid for uuid, _, _ in results[0][0]] == EXPECTED_UUIDS


def make_paying_text(dest: str, sets: list[str], json_type: str | None = None) -> None:
    """Make `events.paying` the text column versions before 0.x had, then run `sets` (old values) on it; on
    PostgreSQL, with the JSON columns typed `json_type` (`jsonb` in the versions that had `paying` as text)."""
    statements = []
    if dest.startswith("duckdb:"):
        statements = ["ALTER TABLE events ALTER paying SET DATA TYPE VARCHAR USING NULL", *sets]
        with duckdb.connect(dest.removeprefix("duckdb:")) as con:
            for statement in statements:
                con.execute(statement)
        return
    url, _, schema = dest.partition("?schema=")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{schema}"')
        retype = [f'ALTER TABLE events ALTER COLUMN "{name}" TYPE {json_type} USING "{name}"::{json_type}'
                  for name in JSON_COLUMNS if json_type]  # fmt: skip
        for statement in [*retype, "ALTER TABLE events ALTER COLUMN paying TYPE text USING NULL", *sets]:
            conn.execute(statement.replace("::JSON", "::jsonb"))


@pytest.mark.parametrize("dest, json_type", [("duckdb", None), ("postgres", "jsonb"), ("postgres", "json")],
                         indirect=["dest"], ids=["duckdb", "postgres", "postgres-json"])  # fmt: skip
def test_a_destination_with_paying_as_text_is_migrated_and_still_loads(dest: str, json_type: str | None) -> None:
    # versions before 0.x typed `paying` as text, so its documented booleans went to _extra: a writable open
    # migrates the column, moving each value to where a load by this version puts it
    w = window(0, 0)
    rows = hour_events(hour(0), ["a0", "a1", "a2", "a3"])
    with open_sink(dest) as sink:
        sink.write_window("p", w, read_of([batch(rows)], finisher(w, rows)))
    make_paying_text(dest, [
        "UPDATE events SET paying = 'yes' WHERE uuid = 'a0'",  # text: stays, in _extra now
        """UPDATE events SET _extra = '{"paying":true,"x":1}'::JSON WHERE uuid = 'a1'""",  # a boolean kept aside
        """UPDATE events SET _extra = '{"paying":false}'::JSON WHERE uuid = 'a2'""",
        """UPDATE events SET _extra = '{"paying":"t"}'::JSON WHERE uuid = 'a3'""",  # text kept aside: stays there
    ], json_type)
    with open_sink(dest) as sink:
        got = {r["uuid"]: (r["paying"], json.loads(r["_extra"]) if r["_extra"] else None)
               for r in sink.read_arrow().to_pylist()}
        assert got == {"a0": (None, {"paying": "yes"}), "a1": (True, {"x": 1}), "a2": (False, None),
                       "a3": (None, {"paying": "t"})}
        w2 = window(1, 1)
        more = [dict(r, paying=True) for r in hour_events(hour(1), ["b0"])]
        sink.write_window("p", w2, read_of([batch(more)], finisher(w2, more)))  # a load of this version
        assert sink.count_by_hour("p") == {hour(0): 4, hour(1): 1}
    with open_sink(dest) as sink:  # opening it again changes nothing
        again = {r["uuid"]: (r["paying"], json.loads(r["_extra"]) if r["_extra"] else None)
                 for r in sink.read_arrow().to_pylist()}
        assert again == {**got, "b0": (True, None)}


def test_parquet_files_with_paying_as_text_still_read_and_load(tmp_path: Path) -> None:
    # Parquet files are not rewritten on open: one written before keeps `paying` as a text column (NULL in
    # practice) until its window is loaded again; reads and a reload of part of its hours still work
    import pyarrow as pa
    import pyarrow.parquet as pq

    dest = f"parquet:{tmp_path / 'dataset'}"
    w = window(0, 1)
    rows = hour_events(hour(0), ["a0"]) + hour_events(hour(1), ["a1"])
    with open_sink(dest) as sink:
        sink.write_window("p", w, read_of([batch(rows)], finisher(w, rows)))
    (path,) = (tmp_path / "dataset").rglob("*.parquet")
    table = pq.read_table(path)
    at = table.schema.get_field_index("paying")
    pq.write_table(table.set_column(at, pa.field("paying", pa.string()), pa.nulls(len(table), pa.string())), path)
    with open_sink(dest) as sink:
        assert sorted(r["uuid"] for r in sink.read_arrow().to_pylist()) == ["a0", "a1"]
        w0 = window(0, 0)  # hour 1 of the old file is copied into a new one
        more = [dict(r, paying=True) for r in hour_events(hour(0), ["b0"])]
        sink.write_window("p", w0, read_of([batch(more)], finisher(w0, more)))
        assert sorted((r["uuid"], r["paying"]) for r in sink.read_arrow().to_pylist()) == [("a1", None), ("b0", True)]
    files = list((tmp_path / "dataset").rglob("*.parquet"))
    assert files and all(pq.read_schema(f).field("paying").type == pa.bool_() for f in files)

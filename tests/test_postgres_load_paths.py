"""The ways a window's rows reach `events` in PostgreSQL: straight in by COPY, a chunk per savepoint, or through
the staging table when a chunk meets a uuid stored under another hour or project. Every way must end with the
same rows and ledger counts as one merge would: the first copy of each uuid, the stored row winning over a new
one, and nothing of a window whose client died before commit."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import POSTGRES_URL as URL
from sink_helpers import read_of
from test_sink_postgres import (
    H0,
    batches_of,
    event_rows,
    finisher,
    first_per_uuid,
    kill_9_when_stalled,
    stored,
    to_jsonb,
)

from amplitude_export.sinks.postgres import MAX_CONFLICTS, NEARBY, PostgresSink
from amplitude_export.windows import HOUR, Window

H1 = H0 + HOUR
FAR = H1 + 12 * HOUR  # beyond NEARBY of H0 and H1: its uuids are not dropped on the way in


def fresh(hour: datetime, events: int, seed: int = 1) -> list[dict[str, Any]]:
    """`events` synthetic rows of `hour` without the repeats the generator puts in, so each test places its own."""
    return list(first_per_uuid(event_rows(hour, events + 5, seed=seed)).values())[:events]


def write(sink: PostgresSink, window: Window, rows: list[dict[str, Any]], project: str = "p1") -> list[Any]:
    """`rows` written as batches of 100 rows: with `chunk_bytes` 1, a chunk (and a savepoint) each."""
    return sink.write_window(project, window, read_of(batches_of(rows, 100), finisher(window, rows)))


def uuids(rows: list[dict[str, Any]]) -> set[str]:
    return {row["uuid"] for row in rows}


def cities(sink: PostgresSink) -> dict[str, tuple[str, Any]]:
    """Each stored uuid's project and city: which copy of it was kept."""
    return {uuid: (row["_project"], row["city"]) for uuid, row in stored(sink).items()}


@pytest.fixture(params=["json", "jsonb"])
def sink(pg_schema: str, request: pytest.FixtureRequest) -> Any:
    if request.param == "jsonb":  # JSON columns as versions before `json` typed them: their own COPY form
        PostgresSink(URL, schema=pg_schema).close()
        to_jsonb(pg_schema)
    with PostgresSink(URL, schema=pg_schema) as opened:
        opened.chunk_bytes = 1  # a chunk per batch: many savepoints, released one after another
        yield opened


def test_the_indexed_text_columns_compare_bytes(sink: PostgresSink) -> None:
    """Every row's COPY updates the uuid key and the (_project, _upload_hour) index: byte order keeps the
    comparisons off the locale's collation."""
    collations = dict(sink.conn.execute(
        "SELECT column_name, collation_name FROM information_schema.columns WHERE table_schema = %s"
        " AND table_name = 'events' AND column_name IN ('uuid', '_project')", [sink.schema]).fetchall())
    assert collations == {"uuid": "C", "_project": "C"}


def test_first_load_and_reload_go_straight_into_events(sink: PostgresSink) -> None:
    window = Window(H0, H1)
    rows = fresh(H0, 300) + fresh(H1, 300, seed=2)
    rows.append({**rows[5], "_line": 999, "city": "later copy"})  # a repeat inside the window: dropped on the way
    kept = first_per_uuid(rows)
    for round_ in range(2):  # the second time over the window's own rows, which its transaction deletes first
        records = write(sink, window, rows)
        assert sink.route == {"direct": len(kept)}, round_  # no chunk met a uuid: the deleted rows do not count
        assert [(r.events_loaded, r.duplicates) for r in records] == [(300, 1), (300, 0)]
        assert cities(sink) == {u: ("p1", row["city"]) for u, row in kept.items()}
    changed = fresh(H0, 50, seed=3) + rows[:20]  # a reload with other rows: the old ones go
    write(sink, window, changed)
    assert sink.route == {"direct": 70}
    assert set(stored(sink)) == uuids(changed)


@pytest.mark.parametrize("stored_at, conflicts", [(FAR, 1), (H0, 0), (H1 + NEARBY, 0)], ids=["far", "near", "edge"])
def test_a_uuid_stored_under_another_hour_wins(sink: PostgresSink, stored_at: datetime, conflicts: int) -> None:
    """Far away it makes its chunk go through the stage; near the window it is dropped before it is sent."""
    a = fresh(stored_at, 100)
    write(sink, Window(stored_at, stored_at), a)
    b = fresh(H1, 400, seed=3)
    b[250] = {**a[7], "_upload_hour": H1, "_line": b[250]["_line"], "city": "copy under H1"}  # in the third batch
    records = write(sink, Window(H1, H1), b)
    assert sink.route == ({"direct": 300, "conflicted": 1, "stage": 100} if conflicts else {"direct": 399})
    assert (records[0].events_loaded, records[0].duplicates) == (399, 1)
    got = stored(sink)
    assert set(got) == uuids(a) | uuids(b)
    assert (got[a[7]["uuid"]]["_upload_hour"], got[a[7]["uuid"]]["city"]) == (stored_at, a[7]["city"])
    assert sink.count_by_hour("p1") == {stored_at: 100, H1: 399}
    assert sink.ledger("p1")[H1].events_loaded == 399


def test_after_a_few_conflicts_the_rest_of_the_window_goes_to_the_stage(sink: PostgresSink) -> None:
    a = fresh(H0, 100)
    write(sink, Window(H0, H0), a)
    # another project, same hour: each batch repeats one uuid project p1 holds (uuids are unique across projects)
    b = fresh(H0, 500, seed=4)
    for batch in range(5):
        b[batch * 100 + 50] = {**a[batch], "_line": batch * 100 + 51, "city": "p2's copy"}
    records = write(sink, Window(H0, H0), b, "p2")
    assert sink.route == {"conflicted": MAX_CONFLICTS, "stage": 500}
    assert (records[0].events_loaded, records[0].duplicates) == (495, 5)
    kept = cities(sink)
    assert all(kept[row["uuid"]] == ("p1", row["city"]) for row in a)
    assert sink.count_by_hour("p1") == {H0: 100} and sink.count_by_hour("p2") == {H0: 495}


def test_past_the_seen_limit_the_first_copy_still_wins(pg_schema: str) -> None:
    with PostgresSink(URL, schema=pg_schema) as sink:
        taken = fresh(FAR, 10, seed=9)
        write(sink, Window(FAR, FAR), taken)
    with PostgresSink(URL, schema=pg_schema, seen_limit=150) as sink:
        sink.chunk_bytes = 1
        rows = fresh(H0, 400)
        rows[120] = {**taken[0], "_upload_hour": H0, "_line": 121, "city": "H0's copy"}  # batch 2 conflicts
        # past the limit (from batch 3 on) repeats pass the client: of a row committed straight in (rows[10]), of a
        # row of the conflicting chunk (rows[150], staged before the limit), of a row staged after it (rows[300])
        late = [{**rows[i], "_line": 1000 + i, "city": "late copy"} for i in (10, 150, 300)]
        rows += late + [{**taken[1], "_upload_hour": H0, "_line": 2000, "city": "H0's copy"}]
        records = write(sink, Window(H0, H0), rows)
        assert sink.route == {"direct": 100, "conflicted": 1, "stage": 100 + 200 + len(late) + 1}
        kept = first_per_uuid([*taken, *rows])  # the stored hour first, then arrival order
        assert cities(sink) == {u: ("p1", row["city"]) for u, row in kept.items()}
        own = len(uuids(rows) - uuids(taken))
        assert (records[0].events_loaded, records[0].duplicates) == (own, len(rows) - own)


# Runs in a subprocess: writes a window in chunks of one batch and stalls inside the batches after `at` of them,
# printing "stalled" for the parent to kill it there, with savepoints released, a chunk conflicted, or the rest
# of the window streaming into the stage (`conflicts` batches repeat a uuid stored under FAR).
CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from test_postgres_load_paths import *
sink = PostgresSink(URL, schema={schema!r})
sink.chunk_bytes = 1
a, rows = kill_rows({conflicts})
def batches():
    for i, batch in enumerate(batches_of(rows, 50)):
        yield batch
        if i == {at}:
            print("stalled", flush=True)
            time.sleep(60)
sink.write_window("p1", Window(H1, H1), read_of(batches(), finisher(Window(H1, H1), rows)))
"""


def kill_rows(conflicts: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A window of FAR stored first, and the rows of H1 whose first `conflicts` batches repeat one of its uuids."""
    a = fresh(FAR, 60)
    rows = fresh(H1, 400, seed=5)
    for batch in range(conflicts):
        rows[batch * 50 + 10] = {**a[batch], "_upload_hour": H1, "_line": batch * 50 + 11}
    return a, rows


@pytest.mark.parametrize(
    "at, conflicts",
    [(0, 0), (4, 0), (4, 1), (6, MAX_CONFLICTS)],
    ids=["first chunk", "after released savepoints", "after a conflicted chunk", "streaming into the stage"],
)
def test_kill_9_on_any_path_then_rerun_is_exact(pg_schema: str, at: int, conflicts: int) -> None:
    a, rows = kill_rows(conflicts)
    with PostgresSink(URL, schema=pg_schema) as sink:
        write(sink, Window(FAR, FAR), a)
        write(sink, Window(H1, H1), rows[-30:])  # a window already stored, which the killed reload must not lose
        before, ledger_before = cities(sink), sink.ledger("p1")
    kill_9_when_stalled(CHILD.format(tests=str(Path(__file__).parent), schema=pg_schema, conflicts=conflicts, at=at))
    # wait=True: the server may take a moment to notice the dead client and release its lock
    with PostgresSink(URL, schema=pg_schema, wait=True) as sink:
        assert cities(sink) == before and sink.ledger("p1") == ledger_before
        sink.chunk_bytes = 1
        records = sink.write_window("p1", Window(H1, H1), read_of(batches_of(rows, 50), finisher(Window(H1, H1), rows)))
        assert sink.route["conflicted"] == conflicts
        assert set(stored(sink)) == uuids(a) | uuids(rows)
        assert (records[0].events_loaded, records[0].duplicates) == (400 - conflicts, conflicts)

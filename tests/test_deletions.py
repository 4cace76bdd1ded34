"""Deletions follow Amplitude's: the User Privacy API client against the fake server, the plan, the kept files,
each sink's `delete_users`, and end to end through the CLI (`deletions`, `run --sync-deletions`) on DuckDB,
Parquet, PostgreSQL, Iceberg and Delta: the users' rows go, from `events` and `cohort_members`, the ledger says
so, a re-run changes nothing, and neither a lookback reload of their hours nor a recomputed cohort brings them
back."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import pyarrow as pa
import pytest
from conftest import API_KEY, SECRET_KEY, destination_url
from sink_helpers import batch, event, finisher, hour, read_of, window

from amplitude_export import read_arrow, read_table
from amplitude_export.config import load_credentials
from amplitude_export.deletions import DeletionsClient, Job, drop_archives, plan, scrub_rejects
from amplitude_export.errors import AuthError, DestinationError
from amplitude_export.fake_server import FakeExportServer
from amplitude_export.ledger import DeletionRecord
from amplitude_export.sinks import Sink, open_sink

DAY = datetime(2024, 3, 1, tzinfo=UTC)
DAY2 = datetime(2024, 3, 2, 23, tzinfo=UTC)


@pytest.fixture
def server() -> Iterator[FakeExportServer]:
    """Two days, 20 events an hour, a fifth of the lines varied (a few carry amplitude_id as a string)."""
    with FakeExportServer(events_per_hour=20, data_start=DAY, data_end=DAY2, variation=0.2) as fake:
        yield fake


def client_for(server: FakeExportServer, secret: str = SECRET_KEY) -> DeletionsClient:
    credentials = load_credentials(api_key=API_KEY, secret_key=secret, base_url=server.url, env_file=None)
    return DeletionsClient(credentials, min_interval=0, max_attempts=2, wait_initial=0.01)


def doomed_users(server: FakeExportServer) -> list[int]:
    """Three users: the busiest, one with a line that carries its amplitude_id as a string, and one more."""
    events = [e for h in range(48) for e in server.hour_lines(DAY + timedelta(hours=h))]
    counts: dict[int, int] = {}
    for e in events:
        counts[int(e["amplitude_id"])] = counts.get(int(e["amplitude_id"]), 0) + 1
    as_text = next(int(e["amplitude_id"]) for e in events if isinstance(e["amplitude_id"], str))
    busiest = sorted(counts, key=lambda a: (-counts[a], a))
    return sorted({as_text, *[a for a in busiest if a != as_text][:2]})


# -- the client and the plan ---------------------------------------------------------------------------------


def test_the_client_lists_a_long_range_in_parts_of_six_months(server: FakeExportServer) -> None:
    job = server.apis.delete_users([int(server.hour_lines(DAY)[0]["amplitude_id"])], day=date(2024, 3, 5))
    with client_for(server) as client:
        jobs = client.jobs(date(2022, 1, 1), date(2025, 12, 31))  # the fake refuses over six months at once
    assert jobs == [Job(date(2024, 3, 5), "done", tuple(u["amplitude_id"] for u in job.users))]
    listings = [status for _, path, status in server.apis.requests if path.startswith("/api/2/deletions")]
    assert len(listings) == 8 and set(listings) == {200}  # 4 years, 184 days at a time


def test_refused_credentials_are_an_auth_error(server: FakeExportServer) -> None:
    with client_for(server, secret="wrong") as client, pytest.raises(AuthError, match="User Privacy API refused"):
        client.jobs(date(2024, 1, 1), date(2024, 2, 1))


def test_the_plan_applies_locked_jobs_for_their_new_users_only() -> None:
    applied = DeletionRecord(date(2024, 3, 1), "submitted", [1, 2], rows_deleted=5)
    jobs = [Job(date(2024, 3, 1), "submitted", (1, 2)), Job(date(2024, 3, 8), "done", (3,)),
            Job(date(2024, 3, 15), "staging", (4,))]
    steps, pending = plan(jobs, [applied])
    assert steps == [(jobs[1], [3])] and pending == [jobs[2]]
    grown = [Job(date(2024, 3, 1), "done", (1, 2, 5))]
    assert plan(grown, [applied]) == ([(grown[0], [5])], [])
    moved = [Job(date(2024, 3, 1), "done", (1, 2))]
    assert plan(moved, [applied]) == ([(moved[0], [])], [])  # the status is recorded, nothing deleted


def archive_with(path: Path, lines: list[bytes]) -> None:
    body = io.BytesIO()
    with zipfile.ZipFile(body, "w") as archive:
        archive.writestr("187520/187520_2024-03-01_0#0.json.gz", gzip.compress(b"\n".join(lines)))
    path.write_bytes(body.getvalue())


def test_archives_naming_a_deleted_user_are_dropped_and_rejects_cleaned(tmp_path: Path) -> None:
    raw, rejects = tmp_path / "raw", tmp_path / "rejects"
    raw.mkdir()
    rejects.mkdir()
    archive_with(raw / "a.zip", [b'{"amplitude_id":1234,"uuid":"x"}'])  # 1234 is not 123
    archive_with(raw / "b.zip", [b'{"amplitude_id": "123","uuid":"y"}'])  # as a string
    archive_with(raw / "c.zip", [b'{"uuid":"z","amplitude_id":123}'])
    assert [p.name for p in drop_archives(raw, {123})] == ["b.zip", "c.zip"]
    assert [p.name for p in raw.iterdir()] == ["a.zip"]
    lines = [{"line": 1, "text": '{"amplitude_id": 123, "u'}, {"line": 2, "text": '{"amplitude_id": 1234'}]
    (rejects / "w.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert scrub_rejects(rejects, {123}) == 1
    assert [json.loads(line)["line"] for line in (rejects / "w.jsonl").read_text().splitlines()] == [2]


# -- each sink -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["duckdb", "parquet", "postgres", "iceberg", "delta"])
def test_a_sink_deletes_users_and_their_ledger_counts_in_one_go(kind: str, tmp_path: Path, pg_schema: str) -> None:
    rows = [event(f"u{n}", hour(n % 3), n) for n in range(1, 10)]
    rows[4].update(amplitude_id=None, _extra=json.dumps({"amplitude_id": str(rows[0]["amplitude_id"])}))
    sink: Sink = open_sink(destination_url(kind, tmp_path, pg_schema))
    try:
        sink.write_window("p", window(0, 2), read_of([batch(rows)], finisher(window(0, 2), rows)))
        doomed = [rows[0]["amplitude_id"], rows[7]["amplitude_id"]]
        record = DeletionRecord(date(2024, 3, 9), "submitted", sorted(doomed),
                                applied_at=datetime(2024, 3, 6, tzinfo=UTC), run_id="r")
        stored = sink.delete_users("p", doomed, record)
        assert stored.rows_deleted == 3 and stored.cohort_rows_deleted == 0
        assert sink.deletion_records("p") == [stored] and sink.deletion_records("other") == []
        left = sink.read_arrow(project="p").column("uuid").to_pylist()
        assert sorted(left) == sorted(r["uuid"] for r in rows if r["_line"] not in (1, 5, 8))
        assert {h: r.events_loaded for h, r in sink.ledger("p").items()} == sink.count_by_hour("p")
        done = sink.delete_users("p", [], DeletionRecord(stored.day, "done", stored.amplitude_ids,
                                                        stored.rows_deleted, 0, stored.applied_at, "r"))
        assert sink.deletion_records("p") == [done] and done.status == "done" and done.rows_deleted == 3
    finally:
        sink.close()


@pytest.mark.parametrize("kind", ["duckdb", "postgres"])
def test_cohort_members_rows_go_too_where_the_table_exists(kind: str, tmp_path: Path, pg_schema: str) -> None:
    sink: Sink = open_sink(destination_url(kind, tmp_path, pg_schema))
    try:
        members = "cohort_members (cohort_id text, amplitude_id bigint, _project text)"
        if kind == "duckdb":
            con = sink.connection  # type: ignore[attr-defined]
            con.execute(f"CREATE TABLE {members}")
            con.execute("INSERT INTO cohort_members VALUES ('c1', 7, 'p'), ('c2', 7, 'p'), ('c1', 8, 'p'), "
                        "('c1', 7, 'other')")
        else:
            conn = sink.conn  # type: ignore[attr-defined]
            conn.execute(f'CREATE TABLE "{pg_schema}".{members}')
            conn.execute(f"""INSERT INTO "{pg_schema}".cohort_members VALUES ('c1', 7, 'p'), ('c2', 7, 'p'),
                             ('c1', 8, 'p'), ('c1', 7, 'other')""")
        stored = sink.delete_users("p", [7], DeletionRecord(date(2024, 3, 9), "done", [7]))
        assert stored.cohort_rows_deleted == 2 and stored.rows_deleted == 0
    finally:
        sink.close()


# -- end to end ----------------------------------------------------------------------------------------------


def cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from amplitude_export.cli import main; main()", *args, "--dest",
                           env["DEST"]], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def environment(server: FakeExportServer, dest: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
    return {**env, "AMP_API_KEY": API_KEY, "AMP_SECRET_KEY": SECRET_KEY, "AMP_BASE_URL": server.url, "DEST": dest}


def stored(dest: str) -> tuple[pa.Table, list[DeletionRecord]]:
    sink = open_sink(dest, read_only=True)
    try:
        return sink.read_arrow(), sink.deletion_records(API_KEY)
    finally:
        sink.close()


def rows_of(table: pa.Table, users: list[int]) -> int:
    """Rows whose amplitude_id, or the one `_extra` kept as text, is one of `users`."""
    count = 0
    for row in table.select(["amplitude_id", "_extra"]).to_pylist():
        kept = json.loads(row["_extra"]).get("amplitude_id") if row["_extra"] else None
        count += row["amplitude_id"] in users or (kept is not None and int(kept) in users)
    return count


def archives_naming(raw: Path, users: list[int]) -> list[str]:
    found = []
    for path in raw.glob("*.zip"):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                for line in gzip.decompress(archive.read(info)).splitlines():
                    if int(json.loads(line)["amplitude_id"]) in users:
                        found.append(path.name)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["duckdb", "parquet", "postgres", "iceberg", "delta"])
def test_deletions_remove_users_once_and_a_lookback_reload_keeps_them_out(
    kind: str, server: FakeExportServer, tmp_path: Path, pg_schema: str
) -> None:
    env = environment(server, destination_url(kind, tmp_path, pg_schema))
    doomed = doomed_users(server)
    # two hours of theirs answer without data at first, and have it later: the lookback loads them then
    late = sorted({DAY + timedelta(hours=h) for h in range(48) for e in server.hour_lines(DAY + timedelta(hours=h))
                   if int(e["amplitude_id"]) == doomed[0]})[:2]
    server.empty_hours = set(late)
    ok(cli(["run", "--start", "2024-03-01", "--end", "2024-03-02", "--no-progress"], env, tmp_path))
    before, _ = stored(env["DEST"])
    count = rows_of(before, doomed)
    assert count > 3 and archives_naming(tmp_path / "data" / "raw", doomed)
    # requested, then locked by Amplitude (submitted): the export still serves them until the job runs
    with httpx.Client(base_url=server.url, auth=(API_KEY, SECRET_KEY)) as api:
        assert api.post("/api/2/deletions/users", json={"amplitude_ids": doomed, "requester": "dpo@example.com"}
                        ).status_code == 200
    out = ok(cli(["deletions"], env, tmp_path))
    assert "staging" in out and "not applied" in out
    assert stored(env["DEST"])[1] == []
    server.apis.advance_deletions()

    out = ok(cli(["deletions"], env, tmp_path))
    assert "submitted: applied, 3 users" in out
    after, records = stored(env["DEST"])
    assert rows_of(after, doomed) == 0 and after.num_rows == before.num_rows - count
    assert [(r.status, r.amplitude_ids, r.rows_deleted) for r in records] == [("submitted", doomed, count)]
    assert not archives_naming(tmp_path / "data" / "raw", doomed)
    ok(cli(["verify"], env, tmp_path))
    status = json.loads(ok(cli(["status", "--json"], env, tmp_path)))
    assert [job["amplitude_ids"] for job in status["deletions"]] == [doomed]

    again = ok(cli(["deletions"], env, tmp_path))
    assert "already applied (3 users)" in again and stored(env["DEST"])[1] == records

    server.empty_hours = set()  # the late hours arrive, with the doomed users' events: the job has not run yet
    out = ok(cli(["run", "--end", "2024-03-02T23", "--lookback-hours", "48", "--no-progress"], env, tmp_path))
    assert "changed since last run" in out and "events of deleted users left out" in out
    reloaded, _ = stored(env["DEST"])
    assert rows_of(reloaded, doomed) == 0 and reloaded.num_rows > after.num_rows  # the hours' other users came
    assert not archives_naming(tmp_path / "data" / "raw", doomed)
    ok(cli(["verify"], env, tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["duckdb", "parquet", "postgres", "iceberg", "delta"])
def test_run_sync_deletions_applies_jobs_before_loading(
    kind: str, server: FakeExportServer, tmp_path: Path, pg_schema: str
) -> None:
    env = environment(server, destination_url(kind, tmp_path, pg_schema))
    ok(cli(["run", "--start", "2024-03-01", "--end", "2024-03-02", "--no-progress"], env, tmp_path))
    doomed = doomed_users(server)
    count = rows_of(stored(env["DEST"])[0], doomed)
    server.apis.delete_users(doomed)  # a job already done: scrubbed from every later export
    out = ok(cli(["run", "--sync-deletions", "--end", "2024-03-02T23", "--no-progress"], env, tmp_path))
    assert "done: applied, 3 users" in out
    table, records = stored(env["DEST"])
    assert rows_of(table, doomed) == 0 and [(r.amplitude_ids, r.rows_deleted) for r in records] == [(doomed, count)]
    out = ok(cli(["run", "--sync-deletions", "--end", "2024-03-02T23", "--no-progress"], env, tmp_path))
    assert "already applied" in out and stored(env["DEST"])[1] == records


@pytest.mark.parametrize("kind", ["duckdb", "parquet"])
def test_deletions_without_project_refuse_a_destination_of_other_projects(
    kind: str, server: FakeExportServer, tmp_path: Path, pg_schema: str
) -> None:
    env = environment(server, destination_url(kind, tmp_path, pg_schema))
    ok(cli(["run", "--project", "web", "--start", "2024-03-01", "--end", "2024-03-02", "--no-progress"], env,
           tmp_path))
    doomed = doomed_users(server)
    count = rows_of(read_arrow(env["DEST"], project="web"), doomed)
    server.apis.delete_users(doomed)

    done = cli(["deletions"], env, tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("INFO")]
    assert done.returncode == 2 and len(lines) == 1 and "only web: pass --project" in lines[0], done.stderr
    assert rows_of(read_arrow(env["DEST"], project="web"), doomed) == count > 0
    assert stored(env["DEST"])[1] == []  # nothing recorded for the API key's project either

    assert "done: applied, 3 users" in ok(cli(["deletions", "--project", "web"], env, tmp_path))
    assert rows_of(read_arrow(env["DEST"], project="web"), doomed) == 0


def members_of(dest: str) -> set[tuple[str, int]]:
    return {(row["cohort_id"], row["amplitude_id"])
            for row in read_table(dest, "cohort_members", project=API_KEY).to_pylist()}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["duckdb", "parquet", "postgres", "iceberg", "delta"])
def test_deletions_take_users_out_of_cohort_members_and_a_recomputed_cohort_keeps_them_out(
    kind: str, tmp_path: Path, pg_schema: str
) -> None:
    streams = ["--streams", "events,cohort_members", "--no-progress"]
    with FakeExportServer(events_per_hour=20, data_start=DAY, data_end=DAY2, apis={"cohort_polls": 0}) as server:
        env = environment(server, destination_url(kind, tmp_path, pg_schema))
        project = server.apis.project
        ok(cli(["run", "--start", "2024-03-01", "--end", "2024-03-02", *streams], env, tmp_path))
        before = members_of(env["DEST"])
        cohort = max({c for c, _ in before}, key=lambda c: sum(c == other for other, _ in before))
        project.recompute(cohort)  # Amplitude recomputes it: a new lastComputed, a download again
        # three users the recomputed cohort still holds: deleted, they must not come back with it
        doomed = sorted(set(project.members(cohort)) & {a for c, a in before if c == cohort})[:3]
        events_before, _ = stored(env["DEST"])
        held = sum(a in doomed for _, a in before)
        assert len(doomed) == 3 and rows_of(events_before, doomed) > 0 and held > len(doomed)
        with httpx.Client(base_url=server.url, auth=(API_KEY, SECRET_KEY)) as api:
            assert api.post("/api/2/deletions/users", json={"amplitude_ids": doomed, "requester": "dpo@example.com"}
                            ).status_code == 200
        server.apis.advance_deletions()  # submitted: locked, but the export and the cohort still serve them

        out = ok(cli(["deletions"], env, tmp_path))
        assert "submitted: applied, 3 users" in out
        events_after, records = stored(env["DEST"])
        assert [(r.amplitude_ids, r.cohort_rows_deleted) for r in records] == [(doomed, held)]
        assert rows_of(events_after, doomed) == 0 and members_of(env["DEST"]) == {
            (c, a) for c, a in before if a not in doomed}

        downloads = server.apis.cohort_downloads
        late = min(DAY + timedelta(hours=h) for h in range(48) for e in server.hour_lines(DAY + timedelta(hours=h))
                   if int(e["amplitude_id"]) == doomed[0])
        server.set_hour_version(late, 1)  # and an hour of theirs re-exported, for the lookback to reload
        out = ok(cli(["run", "--end", "2024-03-02T23", "--lookback-hours", "48", *streams], env, tmp_path))
        assert server.apis.cohort_downloads == downloads + 1 and "changed since last run" in out
        assert set(project.members(cohort)) & set(doomed)  # the fake served them again
        members = members_of(env["DEST"])
        assert not {a for _, a in members} & set(doomed)
        assert {a for c, a in members if c == cohort} == set(project.members(cohort)) - set(doomed)
        events_last, records_last = stored(env["DEST"])
        assert rows_of(events_last, doomed) == 0 and records_last == records
        ok(cli(["verify"], env, tmp_path))


@pytest.mark.parametrize("kind", ["duckdb", "parquet", "postgres", "iceberg", "delta"])
def test_deletions_refuse_a_destination_that_does_not_exist(kind: str, server: FakeExportServer, tmp_path: Path,
                                                            pg_schema: str) -> None:
    env = environment(server, destination_url(kind, tmp_path / "misspelt", pg_schema))
    server.apis.delete_users(doomed_users(server))
    done = cli(["deletions"], env, tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 4 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert not (tmp_path / "misspelt").exists()
    with pytest.raises(DestinationError):
        open_sink(env["DEST"], read_only=True)


def test_the_log_counts_the_cohort_members_rows_a_job_deletes(tmp_path: Path) -> None:
    with FakeExportServer(events_per_hour=20, data_start=DAY, data_end=DAY2, apis={"cohort_polls": 0}) as server:
        env = environment(server, f"duckdb:{tmp_path / 'members.duckdb'}")
        ok(cli(["run", "--streams", "cohort_members", "--no-progress"], env, tmp_path))
        members = sorted(members_of(env["DEST"]))
        user = members[0][1]
        held = sum(a == user for _, a in members)
        server.apis.delete_users([user])
        done = cli(["deletions"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    said = f"1 user applied, 0 events rows and {held} cohort_members rows deleted"
    assert said in done.stderr and said in "".join(log.read_text() for log in (tmp_path / "logs").glob("*.log"))


@pytest.mark.parametrize(("args", "needle"), [
    (["--start-day", "2024-13-01"], "--start-day '2024-13-01': use YYYY-MM-DD"),
    (["--start-day", "2024-03-02", "--end-day", "2024-03-01"], "is before --start-day"),
])
def test_bad_days_are_one_line_and_exit_2(tmp_path: Path, server: FakeExportServer, args: list[str],
                                          needle: str) -> None:
    done = cli(["deletions", *args], environment(server, f"duckdb:{tmp_path / 'x.duckdb'}"), tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and needle in lines[0], done.stderr
    assert not (tmp_path / "data").exists()

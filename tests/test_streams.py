"""`run --streams`: every stream into every destination against the fake server on loopback, compared with what
the fake project holds (its own Python view, not our client's reading of it); cohorts downloaded once per
`lastComputed`; the concurrency limit; the quota and plan notes; the status-code table of the client."""

from __future__ import annotations

import contextlib
import gzip
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pyarrow as pa
import pytest
import stamina
from conftest import destination_url
from scripted_http import ScriptedServer
from test_cli import run_cli

from amplitude_export import read_table
from amplitude_export.config import load_credentials
from amplitude_export.dashboard import DashboardClient
from amplitude_export.errors import AuthError, NotOnPlanError, QuotaExceededError, TransientError
from amplitude_export.fake_project import FakeProject
from amplitude_export.fake_server import FakeExportServer
from amplitude_export.sinks import open_sink
from amplitude_export.stream_tables import TABLES
from amplitude_export.streams import STREAMS, load_streams, parse_streams

DAY = datetime(2024, 3, 1, tzinfo=UTC)
LAST = DAY.replace(day=2, hour=23)
OTHERS = ",".join(name for name in STREAMS if name != "events")
KEY, SECRET = "demo-key", "demo-secret"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeExportServer]:
    """Two days of data; cohort jobs complete on the second poll; answers held 50 ms so requests overlap."""
    with FakeExportServer(events_per_hour=20, data_start=DAY, data_end=LAST,
                          apis={"cohort_polls": 1, "latency": 0.05}) as fake:
        yield fake


def fake_server_for(**apis: Any) -> FakeExportServer:
    return FakeExportServer(events_per_hour=20, data_start=DAY, data_end=LAST, apis={"cohort_polls": 0, **apis})


def cli(server: FakeExportServer, cwd: Path, *args: str) -> Any:
    return run_cli("run", "--base-url", server.url, "--api-key", KEY, "--secret-key", SECRET, "--no-progress",
                   *args, cwd=cwd)


def client_for(server: FakeExportServer, **options: Any) -> DashboardClient:
    credentials = load_credentials(api_key=KEY, secret_key=SECRET, base_url=server.url, env_file=None)
    return DashboardClient(credentials, poll_initial=0.01, **options)


# -- what the fake project holds, read from its Python side ------------------------------------------------


def expected(project: FakeProject, days: list[date]) -> dict[str, set[tuple[Any, ...]]]:
    """Each table's rows as tuples of the columns compared."""
    cohorts = [project.cohort(cid) for cid in project.cohort_ids()]
    types = project.event_types()
    totals = project.event_totals()
    return {
        "cohorts": {(c["id"], c["name"], c["size"], c["archived"], datetime.fromtimestamp(c["lastComputed"], UTC),
                     tuple(c["owners"])) for c in cohorts},
        "cohort_members": {(c["id"], member, project.user_id(member)) for c in cohorts if not c["archived"]
                           for member in project.members(c["id"])},
        "annotations": {(a["id"], datetime.fromisoformat(a["start"]),
                         datetime.fromisoformat(a["end"]) if a["end"] else None, a["label"], a["details"],
                         (a["category"] or {}).get("name"), a["chart_id"]) for a in project.annotations},
        "events_list": {(name, totals[name]) for name in types},
        "event_types": {(name, project.taxonomy_event(name)["display_name"]) for name in types},
        "event_properties": {(name, p["event_property"], p["type"]) for name in types
                             for p in project.taxonomy_event_properties(name)}
        | {("", p["event_property"], p["type"]) for p in project.taxonomy_event_properties(None)},
        "user_properties": {(p["user_property"], p["type"]) for p in project.taxonomy_user_properties(False)},
        "active_users": {(day, len(project.day_events(day))) for day in days},
        "average_session_length": {(day, project.session_seconds(day)) for day in days},
    }


COMPARED = {
    "cohorts": ("id", "name", "size", "archived", "last_computed", "owners"),
    "cohort_members": ("cohort_id", "amplitude_id", "user_id"),
    "annotations": ("id", "starts_at", "ends_at", "label", "details", "category", "chart_id"),
    "events_list": ("event_type", "totals"),
    "event_types": ("event_type", "display_name"),
    "event_properties": ("event_type", "event_property", "type"),
    "user_properties": ("user_property", "type"),
    "active_users": ("date", "active_users"),
    "average_session_length": ("date", "average_seconds"),
}


def loaded(dest: str, project: str = KEY) -> dict[str, set[tuple[Any, ...]]]:
    """Each table's rows in the destination, as `expected` has them; every key at most once."""
    out = {}
    for name, columns in COMPARED.items():
        rows = read_table(dest, name, project=project).to_pylist()
        keys = [tuple(row[k] for k in TABLES[name].key) for row in rows]
        assert len(keys) == len(set(keys)), f"{name}: a key twice"
        if name == "cohorts":
            for row in rows:
                row["owners"] = tuple(json.loads(row["owners"]))
        out[name] = {tuple(row[c] for c in columns) for row in rows}
    return out


# -- every stream, every destination -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["duckdb", "parquet", "postgres", "iceberg", "delta"])
def test_every_stream_lands_in_every_destination_and_cohorts_download_once(
    server: FakeExportServer, tmp_path: Path, pg_schema: str, kind: str
) -> None:
    dest = destination_url(kind, tmp_path, pg_schema)
    downloads = server.apis.cohort_downloads
    first = cli(server, tmp_path, "--dest", dest, "--streams", OTHERS, "--start", "2024-03-01", "--end",
                "2024-03-02", "--api-concurrency", "5")
    assert first.returncode == 0, first.stderr
    assert loaded(dest) == expected(server.apis.project, [DAY.date(), LAST.date()])
    assert server.apis.cohort_downloads - downloads == 4  # the archived cohort's members are not asked for
    assert any(path.startswith("/fake-s3/") and code == 200 for _, path, code in server.apis.requests)  # iOS: 101
    assert "cohort downloads: 4 this run" in first.stdout

    again = cli(server, tmp_path, "--dest", dest, "--streams", OTHERS, "--end", "2024-03-02", "--api-concurrency", "5")
    assert again.returncode == 0, again.stderr
    assert server.apis.cohort_downloads - downloads == 4  # unchanged cohorts: not downloaded again
    assert "0 cohorts downloaded, 4 unchanged" in again.stdout
    status = run_cli("status", "--dest", dest, "--project", KEY, "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    tables = {row["table"]: row for row in json.loads(status.stdout)["tables"]}
    assert set(tables) == set(TABLES)
    members = tables["cohort_members"]["cursor"]
    assert members["downloads_this_run"] == 0 and members["quota_limit"] == 500
    assert members["downloads_left"] == server.apis.cohort_quota
    assert tables["cohort_members"]["rows"] == len(expected(server.apis.project, [])["cohort_members"])
    # the Dashboard REST calls and cohort downloads overlapped, and never more than 5 at once
    assert 2 <= server.apis.max_in_flight <= 5
    assert not [r for r in server.apis.requests if r[2] == 429]
    # no events hour is recorded, yet the destination names the project its tables belong to (status, verify
    # and report pick it, and name it among the other projects)
    elsewhere = run_cli("status", "--dest", dest, "--project", "other", cwd=tmp_path)
    assert elsewhere.returncode == 2 and elsewhere.stderr.strip().endswith(f"it has {KEY}"), elsewhere.stderr
    with contextlib.closing(open_sink(dest, read_only=True)) as sink:
        assert sink.projects() == [KEY]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["duckdb", "parquet", "postgres", "iceberg", "delta"])
def test_a_stream_that_keeps_failing_costs_only_itself(
    server: FakeExportServer, tmp_path: Path, pg_schema: str, kind: str
) -> None:
    """Annotations answer 500 past every retry: the run exits 1 naming them, and the events and the other streams
    it fetched are committed as if nothing had happened."""
    from amplitude_export import read_arrow

    dest = destination_url(kind, tmp_path, pg_schema)
    server.apis.failing = {"/api/3/annotations", "/api/2/annotations"}
    try:
        done = cli(server, tmp_path, "--dest", dest, "--streams", "events,cohorts,annotations,events_list",
                   "--start", "2024-03-01T00", "--end", "2024-03-01T05", "--max-attempts", "2", "--retry-wait", "0")
    finally:
        server.apis.failing = set()
    assert done.returncode == 1, done.stdout + done.stderr
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and failed[0].startswith("FAILED annotations: "), done.stdout
    got, want = loaded(dest), expected(server.apis.project, [])
    assert got["cohorts"] == want["cohorts"] and got["events_list"] == want["events_list"]
    assert got["annotations"] == set()
    uuids = read_arrow(dest).column("uuid").to_pylist()
    assert set(uuids) == server.expected_uuids(DAY, DAY.replace(hour=5)) and len(uuids) == len(set(uuids))
    with open_sink(dest, read_only=True) as sink:
        assert set(sink.table_states(KEY)) == {"cohorts", "events_list"}  # type: ignore[attr-defined]


def test_the_default_run_asks_no_other_api_and_creates_no_tables(tmp_path: Path) -> None:
    with fake_server_for() as fake:
        done = cli(fake, tmp_path, "--start", "2024-03-01T00", "--end", "2024-03-01T01")
        assert done.returncode == 0, done.stderr
        assert fake.apis.requests == []
    with duckdb.connect(str(tmp_path / "data" / "amplitude.duckdb"), read_only=True) as con:
        tables = {name for (name,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert tables == {"events", "_amplitude_ledger"}


def test_an_unknown_stream_is_refused_in_one_line(tmp_path: Path) -> None:
    done = run_cli("run", "--streams", "events,cohort", "--api-key", KEY, "--secret-key", SECRET, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: --streams: unknown stream cohort: choose from {','.join(STREAMS)}"]
    assert not (tmp_path / "data").exists()
    assert parse_streams("taxonomy, events") == ["events", "taxonomy"]


def test_a_table_named_as_a_stream_is_refused_with_the_stream_that_loads_it(tmp_path: Path) -> None:
    done = run_cli("run", "--streams", "events,event_types", "--api-key", KEY, "--secret-key", SECRET, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: --streams: unknown stream event_types: choose from {','.join(STREAMS)} (event_types is a table of "
        "stream taxonomy)"]
    assert not (tmp_path / "data").exists()


# -- cohorts: quota, recomputes -------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_spent_quota_is_a_note_and_the_next_month_downloads_the_rest(tmp_path: Path) -> None:
    with fake_server_for(cohort_quota=2) as fake:
        done = cli(fake, tmp_path, "--streams", "cohort_members")
        assert done.returncode == 0, done.stderr
        assert fake.apis.cohort_downloads == 2
        warning = [line for line in done.stdout.splitlines() if "quota" in line and "WARNING" in line]
        assert len(warning) == 1 and "spent" in warning[0]
        assert "cohort downloads: 2 this run; 0 of 500 left this month" in done.stdout
        assert len({row["cohort_id"] for row in read_table(f"duckdb:{tmp_path}/data/amplitude.duckdb",
                                                           "cohort_members").to_pylist()}) == 2

        fake.apis.cohort_quota = 500  # a new month
        again = cli(fake, tmp_path, "--streams", "cohort_members")
        assert again.returncode == 0, again.stderr
        assert fake.apis.cohort_downloads == 4 and "WARNING" not in again.stdout
        assert loaded(f"duckdb:{tmp_path}/data/amplitude.duckdb")["cohort_members"] == expected(
            fake.apis.project, [])["cohort_members"]


def test_a_recomputed_cohort_is_downloaded_again_and_its_leavers_leave(tmp_path: Path) -> None:
    dest = f"duckdb:{tmp_path / 'x.duckdb'}"
    with fake_server_for() as fake, client_for(fake) as client:
        project = fake.apis.project
        for _ in range(2):
            with open_sink(dest) as sink:
                load_streams(client, sink, project=KEY, streams=["cohort_members"], data_dir=tmp_path)
        assert fake.apis.cohort_downloads == 4
        power = project.cohort_ids()[2]
        before = set(project.members(power))
        project.recompute(power)
        assert set(project.members(power)) < before
        with open_sink(dest) as sink:
            report = load_streams(client, sink, project=KEY, streams=["cohort_members"], data_dir=tmp_path)
        assert fake.apis.cohort_downloads == 5
        assert report.states["cohort_members"].cursor["computed"][power] == project.cohort(power)["lastComputed"]
        assert loaded(dest)["cohort_members"] == expected(project, [])["cohort_members"]
        assert not list((tmp_path / "cohorts").glob("*"))  # downloaded files are deleted once loaded


# -- taxonomy without the plan ---------------------------------------------------------------------------------


def test_a_project_without_taxonomy_gets_one_note_and_the_rest_loads(tmp_path: Path) -> None:
    with fake_server_for(taxonomy_forbidden=True) as fake:
        done = cli(fake, tmp_path, "--streams", "taxonomy,events_list")
        assert done.returncode == 0, done.stderr
        said = [line for line in (done.stdout + done.stderr).splitlines() if "taxonomy" in line.lower()]
        assert len(said) == 1 and said[0].startswith("taxonomy: not loaded") and "plan" in said[0]
        dest = f"duckdb:{tmp_path}/data/amplitude.duckdb"
        assert read_table(dest, "events_list").num_rows == len(fake.apis.project.event_types())
        status = json.loads(run_cli("status", "--json", "--api-key", KEY, cwd=tmp_path).stdout)
        notes = {row["table"]: row["note"] for row in status["tables"]}
        assert notes["events_list"] is None
        assert all("plan" in notes[name] for name in ("event_types", "event_properties", "user_properties"))


def test_verify_of_a_project_with_tables_but_no_events_names_them_and_exits_0(tmp_path: Path) -> None:
    """Loaded without the `events` stream, a project has no hour that could be missing: verify says which tables
    it holds (it does not check their rows) and exits 0; a project the destination does not have is exit 2."""
    with fake_server_for() as fake:
        assert cli(fake, tmp_path, "--streams", "cohorts,annotations").returncode == 0
    done = run_cli("verify", "--project", KEY, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        f"no events hours are recorded for project {KEY}; it holds only the tables of run --streams "
        "(annotations, cohorts), whose rows verify does not check",
        "no events hours: 0 hours checked (0 loaded, 0 empty), 0 archive hours hashed: complete"]
    data = json.loads(run_cli("verify", "--project", KEY, "--json", cwd=tmp_path).stdout)
    assert data["complete"] and data["problems"] == [] and data["stream_tables"] == ["annotations", "cohorts"]
    other = run_cli("verify", "--project", "other", cwd=tmp_path)  # the destination names the project it has
    assert other.returncode == 2 and other.stderr.strip().endswith(f"it has {KEY}"), other.stderr


# -- day series ------------------------------------------------------------------------------------------------


def test_series_continue_from_the_last_day_less_the_lookback(tmp_path: Path) -> None:
    dest = f"duckdb:{tmp_path / 'x.duckdb'}"
    later = datetime(2024, 3, 12, 6, tzinfo=UTC)
    with fake_server_for() as fake, client_for(fake) as client:
        with open_sink(dest) as sink:
            load_streams(client, sink, project=KEY, streams=["active_users"], start_day=date(2024, 3, 1),
                         end_day=date(2024, 3, 5), now=DAY)
            load_streams(client, sink, project=KEY, streams=["active_users"], lookback_days=3, now=later)
        rows = read_table(dest, "active_users").to_pylist()
        days = [date(2024, 3, 1) + timedelta(days=n) for n in range(11)]  # to the day before `later`
        assert sorted(row["date"] for row in rows) == days
        refetched = {row["date"] for row in rows if row["_taken_at"] == later}
        assert refetched == set(days[2:])  # 3..5 again, then 6..11
        assert {(row["date"], row["active_users"]) for row in rows} == expected(fake.apis.project, days)[
            "active_users"]


# -- the client: the limit, 429, and what each refusal means ----------------------------------------------------


def test_one_client_keeps_within_its_limit_and_two_back_off_on_429() -> None:
    with FakeExportServer(events_per_hour=5, retry_after=0.05, apis={"latency": 0.1}) as fake:
        one = client_for(fake, max_concurrency=5)
        threads = [threading.Thread(target=one.events_list) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert fake.apis.max_in_flight == 5 and not [r for r in fake.apis.requests if r[2] == 429]

        other = client_for(fake, max_concurrency=5, wait_initial=0.05)
        answers: list[Any] = []
        threads = [threading.Thread(target=lambda c=c: answers.append(c.annotations())) for c in (one, other) * 6]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(answers) == 12 and all(len(a) == 5 for a in answers)  # every call succeeded in the end
        assert [r for r in fake.apis.requests if r[2] == 429]  # the two together went over; retried after 429
        one.close()
        other.close()


@contextlib.contextmanager
def scripted(routes: dict[str, list[httpx.Response]]) -> Iterator[DashboardClient]:
    """A client of a loopback server answering each path with its next scripted response; every answer is used,
    and every request carried the credentials."""
    with ScriptedServer(routes) as server:
        credentials = load_credentials(api_key=KEY, secret_key=SECRET, base_url=server.url, env_file=None)
        with DashboardClient(credentials, poll_initial=0.0, max_attempts=3) as client:
            yield client
        assert not server.errors and not any(routes.values()), (server.errors, routes)
        assert all("authorization" in request.headers for request in server.seen)  # every call to the API


def test_each_refusal_means_what_the_caller_does() -> None:
    error = {"error": {"http_code": 429, "type": "QuotaExceeded", "message": "the monthly limit is reached"}}
    with stamina.set_testing(True, attempts=3):
        with scripted({"/api/5/cohorts/request/c1": [httpx.Response(429, json=error)]}) as client, \
                pytest.raises(QuotaExceededError):
            client.download_cohort("c1", Path("unused"))
        plan = {"success": False, "errors": [{"message": "not available on this plan"}]}
        with scripted({"/api/2/taxonomy/event": [httpx.Response(403, json=plan)]}) as client, \
                pytest.raises(NotOnPlanError):
            client.taxonomy("event")
        keys = {"error": {"http_code": 403, "metadata": {"details": "Invalid API Key"}}}
        with scripted({"/api/2/taxonomy/event": [httpx.Response(403, json=keys)]}) as client, \
                pytest.raises(AuthError, match="refused the credentials"):
            client.taxonomy("event")
        with scripted({"/api/2/events/list": [httpx.Response(401)]}) as client, pytest.raises(AuthError):
            client.events_list()
        busy = [httpx.Response(429, headers={"Retry-After": "0"}), httpx.Response(503)]
        with scripted({"/api/2/events/list": [*busy, httpx.Response(200, json={"data": [{"value": "a"}]})]}) as client:
            assert client.events_list() == [{"value": "a"}]
        with scripted({"/api/2/events/list": [httpx.Response(503)] * 3}) as client, pytest.raises(TransientError):
            client.events_list()
        v2 = {"data": [{"id": 7, "date": "2024-03-01", "label": "Launch", "details": ""}]}
        old = {"/api/3/annotations": [httpx.Response(404)], "/api/2/annotations": [httpx.Response(200, json=v2)]}
        with scripted(old) as client:
            assert client.annotations() == [{"id": 7, "start": "2024-03-01", "end": None, "label": "Launch",
                                             "details": None, "category": None, "chart_id": None}]


def test_the_file_behind_an_expired_link_is_asked_for_again(tmp_path: Path) -> None:
    body = b'"amplitude_id","user_id"\n"1","a"\n'
    # expired, then a stored .csv.gz sent without Content-Encoding
    with ScriptedServer({"/bucket/file.csv": [httpx.Response(403, content=b"<Error>Request has expired</Error>"),
                                              httpx.Response(200, content=gzip.compress(body))]}) as s3:
        link = f"{s3.url}/bucket/file.csv?X-Amz-Signature=x"
        routes = {
            "/api/5/cohorts/request/c1": [httpx.Response(202, json={"request_id": "r1", "cohort_id": "c1"})],
            "/api/5/cohorts/request-status/r1": [
                httpx.Response(202, json={"async_status": "JOB INPROGRESS"}),
                httpx.Response(200, json={"async_status": "JOB COMPLETED"})],
            "/api/5/cohorts/request/r1/file": [httpx.Response(302, headers={"Location": link})] * 2,
        }
        with stamina.set_testing(True, attempts=3), scripted(routes) as client:
            client.download_cohort("c1", tmp_path / "c1.csv")
        assert not s3.errors and len(s3.seen) == 2
        assert not any("authorization" in request.headers for request in s3.seen)  # the link carries its own
    assert (tmp_path / "c1.csv").read_bytes() == body


# -- Parquet: what a crash leaves ---------------------------------------------------------------------------


def test_parquet_removes_what_a_crashed_table_write_left(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    with fake_server_for() as fake, client_for(fake) as client:
        with open_sink(f"parquet:{lake}") as sink:
            load_streams(client, sink, project=KEY, streams=["annotations"])
    (live,) = (lake / "annotations").glob("*.parquet")
    leftovers = [lake / "annotations" / f".tmp-{'0' * 32}", lake / "annotations" / "0123abcd-89abcdef.parquet"]
    for path in leftovers:
        path.write_bytes(b"half")
    (lake / "annotations" / "notes.txt").write_text("the user's own file")
    open_sink(f"parquet:{lake}").close()
    assert sorted(p.name for p in (lake / "annotations").iterdir()) == sorted([live.name, "notes.txt"])
    assert read_table(f"parquet:{lake}", "annotations").num_rows == 5


@pytest.mark.parametrize("kind", ["duckdb", "parquet", "postgres", "iceberg", "delta"])
def test_a_table_write_that_fails_halfway_changes_nothing(tmp_path: Path, pg_schema: str, kind: str) -> None:
    """The rows and the state row commit together: a write whose rows stop with an error leaves both as before,
    and a scoped write replaces only its scope."""
    from amplitude_export.table_ledger import TableState, TableWrite

    spec = TABLES["cohort_members"]
    dest = destination_url(kind, tmp_path, pg_schema)

    def batch(cohort: str, ids: range) -> Any:
        rows = [{"cohort_id": cohort, "amplitude_id": i, "user_id": f"u{i}", "properties": None,
                 "_last_computed": DAY, "_downloaded_at": DAY} for i in ids]
        return pa.RecordBatch.from_pylist(rows, schema=spec.schema)

    def write(cohort: str, batches: Any, note: str) -> TableWrite:
        state = TableState(spec.name, spec.stream, spec.refresh, cursor={"note": note})
        return TableWrite(spec.name, spec.schema, batches, state, scope_column="cohort_id", scope_values=[cohort])

    def broken() -> Iterator[Any]:
        yield batch("a", range(100, 110))
        raise RuntimeError("the download broke")

    with open_sink(dest) as sink:
        sink.write_table(KEY, write("a", [batch("a", range(3))], "first"))
        sink.write_table(KEY, write("b", [batch("b", range(5))], "second"))
        with pytest.raises(RuntimeError, match="the download broke"):
            sink.write_table(KEY, write("a", broken(), "broken"))
        assert sink.table_states(KEY)["cohort_members"].cursor == {"note": "second"}
        assert sink.table_states(KEY)["cohort_members"].rows == 8
        sink.write_table(KEY, write("a", [batch("a", range(7, 9))], "third"))
        assert sink.table_states("another project") == {}
    pairs = {(row["cohort_id"], row["amplitude_id"]) for row in read_table(dest, spec.name).to_pylist()}
    assert pairs == {("a", 7), ("a", 8)} | {("b", i) for i in range(5)}


@pytest.mark.parametrize("kind", ["iceberg", "delta"])
def test_maintain_keeps_the_streams_tables_and_forgets_their_old_versions(tmp_path: Path, kind: str) -> None:
    from amplitude_export.sinks.maintenance import maintain
    from amplitude_export.table_ledger import TableState, TableWrite

    spec, dest = TABLES["annotations"], destination_url(kind, tmp_path, "")
    with open_sink(dest) as sink:
        for n in range(1, 4):  # three runs: three versions of the table, each replacing the rows
            rows = [{"id": i, "label": f"run {n}", "_taken_at": DAY} for i in range(n)]
            sink.write_table(KEY, TableWrite(spec.name, spec.schema, [pa.RecordBatch.from_pylist(rows, spec.schema)],
                                             TableState(spec.name, spec.stream, spec.refresh)))
    done = maintain(dest, older_than="0")  # --older-than's text, as DELTA.md shows it
    assert done.files_deleted >= 2  # the replaced files of the first two runs
    assert {(r["id"], r["label"]) for r in read_table(dest, "annotations").to_pylist()} == {
        (0, "run 3"), (1, "run 3"), (2, "run 3")}
    with open_sink(dest, read_only=True) as sink:
        assert sink.table_states(KEY)["annotations"].rows == 3  # type: ignore[attr-defined]
        if kind == "iceberg":
            assert len(sink.tables.open("annotations").snapshots()) == 1  # type: ignore[attr-defined]


def test_schema_md_names_every_table_its_key_and_columns() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "SCHEMA.md").read_text()
    section = text[text.index("## The other streams"):]
    rows = {line.split("|")[1].strip().strip("`"): line for line in section.splitlines() if line.startswith("| `")}
    for name, spec in TABLES.items():
        key = ", ".join(f"`{column}`" for column in spec.key)
        assert any(f"| `{name}` | {key} | {spec.refresh}" in line for line in section.splitlines()), name
        assert f"`{spec.stream}`" in section
        for column in spec.schema.names:
            assert f"`{column}`" in rows[name], f"{name}.{column} is not in docs/SCHEMA.md"


def test_a_cohort_job_that_never_completes_is_reported_and_the_rest_loads(tmp_path: Path) -> None:
    dest = f"duckdb:{tmp_path / 'x.duckdb'}"
    with fake_server_for(cohort_polls=10_000) as fake, client_for(fake, poll_timeout=0.2) as client:
        with open_sink(dest) as sink:
            report = load_streams(client, sink, project=KEY, streams=["cohorts", "cohort_members"],
                                  data_dir=tmp_path)
        assert report.exit_code == 1 and len(report.failed) == 4
        assert all("did not complete within 0.2 s" in line for line in report.failed)
        assert read_table(dest, "cohorts").num_rows == 5
        assert read_table(dest, "cohort_members").num_rows == 0
        assert report.states["cohort_members"].cursor["computed"] == {}  # so the next run asks again


def test_a_destination_without_tables_is_refused_before_anything_is_fetched() -> None:
    from amplitude_export.errors import UsageError
    from amplitude_export.streams import check_sink

    class EventsOnly:
        description = "custom:events-only"

    check_sink(EventsOnly(), ["events"])
    with pytest.raises(UsageError, match="custom:events-only holds only events"):
        check_sink(EventsOnly(), ["events", "cohorts"])


def test_members_get_the_events_privacy_deleted_users_out_and_user_id_hashed(tmp_path: Path) -> None:
    from amplitude_export.privacy import Privacy, Target, hash_text

    key = b"k" * 32
    dest = f"duckdb:{tmp_path / 'x.duckdb'}"
    with fake_server_for() as fake, client_for(fake) as client:
        project = fake.apis.project
        want = expected(project, [])["cohort_members"]
        victim = sorted(want)[0][1]
        privacy = Privacy(hash=[Target("user_id")], key=key, deleted=[victim])
        with open_sink(dest) as sink:
            load_streams(client, sink, project=KEY, streams=["cohort_members"], data_dir=tmp_path, privacy=privacy)
    got = {(row["cohort_id"], row["amplitude_id"], row["user_id"]) for row in
           read_table(dest, "cohort_members").to_pylist()}
    assert got == {(c, a, hash_text(key, u) if u is not None else None) for c, a, u in want if a != victim}


def test_run_hashes_member_user_ids_like_events(tmp_path: Path) -> None:
    from amplitude_export.privacy import hash_text

    key = "a-key-of-thirty-two-bytes-length"
    with fake_server_for() as fake:
        done = run_cli("run", "--base-url", fake.url, "--api-key", KEY, "--secret-key", SECRET, "--no-progress",
                       "--start", "2024-03-01T00", "--end", "2024-03-01T05", "--streams", "events,cohort_members",
                       "--hash-columns", "user_id", cwd=tmp_path, env={"AMP_HASH_KEY": key})
        assert done.returncode == 0, done.stderr
        originals = {row[2] for row in expected(fake.apis.project, [])["cohort_members"]} - {None}
    dest = f"duckdb:{tmp_path}/data/amplitude.duckdb"
    members = {row["user_id"] for row in read_table(dest, "cohort_members").to_pylist()} - {None}
    assert members == {hash_text(key.encode(), user) for user in originals}
    with duckdb.connect(str(tmp_path / "data" / "amplitude.duckdb"), read_only=True) as con:
        joined = con.execute("SELECT count(*) FROM events JOIN cohort_members USING (user_id)").fetchone()[0]
    assert joined > 0  # the hashed ids still join


@pytest.mark.parametrize("kind", ["duckdb", "parquet", "postgres", "iceberg", "delta"])
def test_a_deletion_job_takes_a_users_members_out_of_every_destination(
    tmp_path: Path, pg_schema: str, kind: str
) -> None:
    from amplitude_export.ledger import DeletionRecord

    dest = destination_url(kind, tmp_path, pg_schema)
    with fake_server_for() as fake, client_for(fake) as client, open_sink(dest) as sink:
        load_streams(client, sink, project=KEY, streams=["cohort_members"], data_dir=tmp_path)
        schema = TABLES["cohort_members"].schema
        rows = sink.read_table("cohort_members", schema).to_pylist()  # type: ignore[attr-defined]
        victim = max({r["amplitude_id"] for r in rows}, key=lambda a: sum(r["amplitude_id"] == a for r in rows))
        held = sum(r["amplitude_id"] == victim for r in rows)
        job = DeletionRecord(date(2024, 3, 9), "done", [victim])
        stored = sink.delete_users(KEY, [victim], job)  # type: ignore[attr-defined]
        assert stored.cohort_rows_deleted == held >= 1
        assert sink.delete_users(KEY, [victim], stored).cohort_rows_deleted == held  # again: nothing more
        state = sink.table_states(KEY)["cohort_members"]  # type: ignore[attr-defined]
        assert state.rows == len(rows) - held and state.cursor["computed"]  # the rest of the state is kept
        left = sink.read_table("cohort_members", schema).to_pylist()  # type: ignore[attr-defined]
    assert len(left) == len(rows) - held and victim not in {r["amplitude_id"] for r in left}


def test_dashboard_retries_stop_when_their_time_is_spent() -> None:
    """Retries are bounded by time as well as by attempts: a call that keeps answering 500 stops after about
    `retry_timeout` seconds, long before the attempts allowed run out."""
    with fake_server_for() as fake:
        fake.apis.failing = {"/api/3/annotations", "/api/2/annotations"}
        with client_for(fake, max_attempts=100, wait_initial=0.2, wait_max=0.2, retry_timeout=1.0) as client:
            started = time.monotonic()
            with pytest.raises(TransientError):
                client.annotations()
            seconds = time.monotonic() - started
        asked = sum("annotations" in path for _, path, _ in fake.apis.requests)
    assert seconds < 5 and 2 <= asked < 15, (seconds, asked)

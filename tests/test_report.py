"""`report`: figures checked against SQL over the same destination, and the page drawn by a real headless Chromium.

The destination is built the way users build theirs: the fake Export API (with transient faults, malformed lines,
empty hours and one hour too large to export) through `pipeline.run` into DuckDB and Parquet; then one more hour
is written with fields the schema does not know, as a newer SDK would send them. The DuckDB file also holds two
tables of `run --streams` (cohorts, annotations), for the report's "Other streams" section.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import uuid as uuid_module
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pytest
import stamina
from click.testing import CliRunner
from sink_helpers import batch, event, finisher, two_windows

import amplitude_export.report
from amplitude_export.cli import cli
from amplitude_export.client import ExportClient
from amplitude_export.config import Credentials, Secret
from amplitude_export.errors import DestinationError, UsageError
from amplitude_export.fake_server import FakeExportServer
from amplitude_export.ledger import TOO_LARGE
from amplitude_export.pipeline import run
from amplitude_export.report import TOP, vega_versions, write_report
from amplitude_export.sinks import open_sink
from amplitude_export.sinks.duckdb import DuckDBSink
from amplitude_export.windows import HOUR, Window

START = datetime(2024, 3, 1, tzinfo=UTC)
LAST = START + timedelta(days=3) - HOUR  # three days of upload hours
BIG_HOUR = START + timedelta(hours=40)  # over the archive limit on its own: too_large
EXTRA_HOUR = LAST + HOUR  # written by hand with fields the schema does not know
PROJECT = "demo"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def events_per_hour(hour: datetime) -> int:
    return 3_000 if hour == BIG_HOUR else 25 + (hour.hour * 7) % 40


@pytest.fixture(scope="module")
def destinations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """`duckdb:` and `parquet:` destinations loaded from the same archives, plus the hand-written hour."""
    root = tmp_path_factory.mktemp("report")
    dests = {"duckdb": f"duckdb:{root / 'amplitude.duckdb'}", "parquet": f"parquet:{root / 'parquet'}"}
    with stamina.set_testing(True, attempts=3, cap=True), FakeExportServer(
        seed=11, events_per_hour=events_per_hour, data_start=START, fault_rate=0.3, malformed_lines=True,
        variation=0,  # uniform lines: `_extra` holds only the hand-written rows' keys, counted exactly below
        empty_hours=[START + timedelta(hours=h) for h in range(26, 29)], max_archive_bytes=600_000,
    ) as server:  # fmt: skip
        for dest in dests.values():
            sink = open_sink(dest)
            try:
                credentials = Credentials(server.api_key, Secret("demo-secret"), "us", server.url)
                with ExportClient(credentials) as client:
                    run(
                        client,
                        sink,
                        project=PROJECT,
                        start="2024-03-01",
                        end="2024-03-03",
                        window_hours=12,
                        data_dir=root / "data",
                        workers=1,
                        now=datetime(2024, 4, 1, tzinfo=UTC),
                    )
                rows = [event(f"extra-{n}", EXTRA_HOUR, n, amplitude_id=77 + n, event_type="sdk_event",
                              _extra=json.dumps({"new_sdk_field": n, **({"event_id": "abc"} if n == 1 else {})}))
                        for n in (1, 2, 3)]  # fmt: skip
                sink.write_window(
                    PROJECT,
                    Window(EXTRA_HOUR, EXTRA_HOUR),
                    [batch(rows)],
                    finisher(Window(EXTRA_HOUR, EXTRA_HOUR), rows),
                )
                if dest.startswith("duckdb:"):
                    write_streams(sink)
            finally:
                sink.close()
    return dests


COHORTS = [  # as the Behavioral Cohorts API lists them
    {"id": "c-big", "name": "Power users", "size": 1_200, "archived": False, "lastComputed": 1709251200000},
    {"id": "c-small", "name": "Churn risk <b>", "size": 35, "archived": False, "lastComputed": 1709337600000},
    {"id": "c-old", "name": "Old campaign", "size": 9_999, "archived": True, "lastComputed": 1704067200000},
]
ANNOTATIONS = [  # two inside the report's range, one after it
    {"id": 1, "start": "2024-03-02T10:00:00", "end": None, "label": "Release 2.0", "category": {"name": "release"}},
    {"id": 2, "start": "2024-03-01T00:00:00", "end": None, "label": "Spring campaign", "category": None},
    {"id": 3, "start": "2024-05-01T00:00:00", "end": None, "label": "Later", "category": None},
]


def write_streams(sink: Any) -> None:
    """`cohorts` and `annotations` as `run --streams` writes them: rows with their state, through `write_table`."""
    from amplitude_export.stream_tables import ANNOTATIONS as ANNOTATIONS_TABLE
    from amplitude_export.stream_tables import COHORTS as COHORTS_TABLE
    from amplitude_export.stream_tables import rows_table
    from amplitude_export.table_ledger import TableState, TableWrite

    for spec, items in ((COHORTS_TABLE, COHORTS), (ANNOTATIONS_TABLE, ANNOTATIONS)):
        rows = rows_table(spec, items, datetime(2024, 4, 1, tzinfo=UTC))
        sink.write_table(PROJECT, TableWrite(spec.name, spec.schema, rows.to_batches(),
                                             TableState(spec.name, spec.stream, spec.refresh)))


@pytest.fixture(scope="module")
def report(destinations: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(destinations["duckdb"], tmp_path_factory.mktemp("html") / "report.html")


def island(page: Path) -> dict[str, Any]:
    """The figures the page embeds (and draws its charts from)."""
    found = re.search(
        r'<script type="application/json" id="report-data">(.*?)</script>', page.read_text(), re.DOTALL
    )
    assert found, "no report-data block"
    return json.loads(found.group(1))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def con(destinations: dict[str, str]) -> Iterator[duckdb.DuckDBPyConnection]:
    with duckdb.connect(destinations["duckdb"].removeprefix("duckdb:"), read_only=True) as connection:
        connection.execute("SET TimeZone = 'UTC'")
        yield connection


def sql(con: duckdb.DuckDBPyConnection, query: str) -> list[tuple[Any, ...]]:
    return con.execute(query).fetchall()


def test_figures_match_sql_over_the_same_file(report: Path, con: duckdb.DuckDBPyConnection) -> None:
    data = island(report)
    events, users = sql(con, "SELECT count(*), count(DISTINCT amplitude_id) FROM events")[0]
    assert data["totals"]["events"] == events > 2_000 and data["totals"]["users"] == users
    assert sum(h["events"] for h in data["hourly"]) == events

    ledger = dict(sql(con, "SELECT strftime(hour, '%Y-%m-%dT%H:00:00Z'), status FROM _amplitude_ledger"))
    assert {h["hour"]: h["status"] for h in data["hourly"]} == ledger
    assert {h["status"] for h in data["hourly"]} >= {"loaded", "empty", TOO_LARGE}

    day = "strftime(timezone('UTC', event_time), '%Y-%m-%d')"
    per_day = {d: (n, u) for d, n, u in sql(
        con, f"SELECT {day}, count(*), count(DISTINCT amplitude_id) FROM events "
             "WHERE event_time >= '2024-03-01' AND event_time < '2024-03-04 01:00:00+00' GROUP BY 1")}  # fmt: skip
    assert {d["day"]: (d["events"], d["users"]) for d in data["daily"]} == {
        d: per_day.get(d, (0, 0)) for d in ("2024-03-01", "2024-03-02", "2024-03-03", "2024-03-04")
    }
    new = dict(sql(con, f"SELECT {day}, count(*) FROM (SELECT min(event_time) AS event_time FROM events "
                        "WHERE amplitude_id IS NOT NULL GROUP BY amplitude_id) "
                        "WHERE event_time >= '2024-03-01' GROUP BY 1"))  # fmt: skip
    assert {d["day"]: d["new_users"] for d in data["daily"] if d["new_users"]} == new

    top = sql(con, "SELECT event_type, count(*) FROM events WHERE event_time >= '2024-03-01' "
                   "GROUP BY 1 ORDER BY 2 DESC, 1")  # fmt: skip
    assert [(t["value"], t["events"]) for t in data["event_types"][:TOP]] == top[:TOP]
    assert sum(t["events"] for t in data["event_types"]) == sum(n for _, n in top)
    platforms = dict(sql(con, "SELECT coalesce(platform, '(none)'), count(*) FROM events "
                              "WHERE event_time >= '2024-03-01' GROUP BY 1"))  # fmt: skip
    assert {p["value"]: p["events"] for p in data["platforms"]} == platforms


def test_other_streams_are_a_section_and_annotations_mark_the_daily_chart(report: Path,
                                                                         destinations: dict[str, str],
                                                                         tmp_path: Path) -> None:
    data = island(report)["streams"]
    assert [(t["table"], t["rows"]) for t in data["tables"]] == [("annotations", 3), ("cohorts", 3)]
    assert [(c["cohort"], c["size"]) for c in data["cohorts"]] == [("Power users", 1_200), ("Churn risk <b>", 35)]
    assert data["annotations"] == [{"day": "2024-03-01", "label": "Spring campaign", "category": ""},
                                   {"day": "2024-03-02", "label": "Release 2.0", "category": "release"}]
    page = report.read_text()
    assert '<section id="other-streams">' in page and "Churn risk &lt;b&gt;" in page
    assert '"annotations"' in page.split('id="report-specs">')[1]  # the daily chart draws them
    # a range without annotations, and a destination without streams: no layer, no section
    quiet = write_report(destinations["duckdb"], tmp_path / "quiet.html", start=datetime(2024, 3, 3, tzinfo=UTC))
    assert island(quiet)["streams"]["annotations"] == []
    assert '"annotations"' not in quiet.read_text().split('id="report-specs">')[1]
    plain = write_report(destinations["parquet"], tmp_path / "plain.html")
    assert island(plain)["streams"] == {} and 'id="other-streams"' not in plain.read_text()


def test_health_lateness_and_windows_match_the_ledger(
    report: Path, con: duckdb.DuckDBPyConnection, destinations: dict[str, str]
) -> None:
    data = island(report)
    health = data["health"]
    duplicates, rejects, retried, failed = sql(
        con, "SELECT sum(duplicates), sum(rejects), count(*) FILTER (WHERE attempts > 1), "
             "count(*) FILTER (WHERE status IN ('failed', 'too_large')) FROM _amplitude_ledger")[0]  # fmt: skip
    assert (
        (health["duplicates"], health["rejects"]) == (duplicates, rejects) and duplicates > 0 and rejects > 0
    )
    assert sum(r["hours"] for r in health["retried_hours"]) == retried > 0
    # the 12-hour window holding the hour over the archive limit was split (400s) down to that hour
    split = sql(con, "SELECT split_from, count(*), max(attempts) FROM _amplitude_ledger "
                     "WHERE split_from IS NOT NULL GROUP BY 1 ORDER BY 1")  # fmt: skip
    assert [(w["window"], w["hours"], w["attempts"]) for w in health["split_windows"]] == split
    assert split[0][:2] == ("2024-03-02T12..2024-03-02T23", 12) and split[0][2] > 1
    assert "1 too_large" in health["split_windows"][0]["statuses"]
    page = report.read_text()
    for check, value in [("hours retried (attempts &gt; 1)", retried),
                         ("windows split (fetched in parts after a 400 or 504)", len(split)),
                         ("hours fetched in a split window&#x27;s parts", sum(n for _, n, _ in split))]:  # fmt: skip
        assert f"<td>{check}</td><td class=num>{value:,}</td>" in page, check
    assert "<td>2024-03-02T12..2024-03-02T23</td>" in page and "No window had to be split." not in page
    assert sum(f["hours"] for f in health["failed"]) == failed == 1
    assert health["failed"][0]["status"] == TOO_LARGE and health["failed"][0]["start"] == "2024-03-02T16"
    keys = dict(
        sql(con, "SELECT k, count(*) FROM (SELECT unnest(json_keys(_extra)) AS k FROM events) GROUP BY 1")
    )
    assert (
        {f["key"]: f["events"] for f in health["unknown_fields"]}
        == keys
        == {"new_sdk_field": 3, "event_id": 1}
    )
    assert {f["key"]: f["kind"] for f in health["unknown_fields"]}["event_id"] == "value did not fit its type"
    assert health["ledger_mismatches"] == []

    lateness = data["lateness"]
    timed, p50 = sql(con, "SELECT count(*), quantile_cont(epoch_ms(server_upload_time) - epoch_ms(event_time), "
                          "0.5) / 1000 FROM events WHERE event_time IS NOT NULL")[0]  # fmt: skip
    assert sum(b["events"] for b in lateness["buckets"]) == timed
    assert lateness["quantiles"]["p50"] == pytest.approx(p50, abs=0.01)

    status = subprocess.run(  # another process: DuckDB lets several read a file at once
        [str(Path(sys.executable).with_name("amplitude-export")), "status", "--json", "--dest", destinations["duckdb"]],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert data["windows"] == json.loads(status.stdout)["windows"] and len(data["windows"]) > 3


def test_a_range_and_a_parquet_destination(destinations: dict[str, str], tmp_path: Path) -> None:
    day = write_report(destinations["duckdb"], tmp_path / "day.html", start=START + timedelta(days=1),
                       end=START + timedelta(days=1, hours=23), project=PROJECT)  # fmt: skip
    data = island(day)
    with duckdb.connect(destinations["duckdb"].removeprefix("duckdb:"), read_only=True) as con:
        uploaded = sql(con, "SELECT count(*) FROM events WHERE _upload_hour >= '2024-03-02 00:00:00+00' "
                            "AND _upload_hour < '2024-03-03 00:00:00+00'")[0][0]  # fmt: skip
    assert (data["meta"]["start"], data["meta"]["end"]) == ("2024-03-02T00", "2024-03-02T23")
    assert data["totals"]["events"] == uploaded and len(data["hourly"]) == 24 and len(data["daily"]) == 1

    # Parquet: the same ledger (attempts aside: its run found the archives landed), events checked by SQL over
    # its own files, since which copy of a uuid repeated across hours wins depends on the order windows loaded
    from_duckdb = island(write_report(destinations["duckdb"], tmp_path / "d.html"))
    from_parquet = island(write_report(destinations["parquet"], tmp_path / "p.html"))
    assert [(h["hour"], h["status"]) for h in from_parquet["hourly"]] == [
        (h["hour"], h["status"]) for h in from_duckdb["hourly"]
    ]
    root = destinations["parquet"].removeprefix("parquet:")
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        files = f"read_parquet('{root}/**/*.parquet', hive_partitioning = true)"
        events, users = sql(con, f"SELECT count(*), count(DISTINCT amplitude_id) FROM {files}")[0]
        types = sql(con, f"SELECT event_type, count(*) FROM {files} WHERE event_time >= '2024-03-01' "
                         "GROUP BY 1 ORDER BY 2 DESC, 1")  # fmt: skip
    assert (from_parquet["totals"]["events"], from_parquet["totals"]["users"]) == (events, users)
    assert [(t["value"], t["events"]) for t in from_parquet["event_types"][:TOP]] == types[:TOP]
    assert from_parquet["health"]["unknown_fields"] == from_duckdb["health"]["unknown_fields"]


def test_parquet_through_a_file_or_fsspec_url_reports_like_the_directory(tmp_path: Path) -> None:
    """`report` opens a Parquet destination the way `run` and `status` do: a path, `file://`, or fsspec."""
    import fsspec

    bucket = f"memory://test_report_{uuid_module.uuid4().hex[:8]}"
    dests = [f"parquet:{tmp_path / 'dir'}", f"parquet:{(tmp_path / 'url').as_uri()}", f"parquet:{bucket}/events"]
    written: set[str] = set()
    try:
        for dest in dests:
            with open_sink(dest) as sink:
                for win, rows in two_windows():
                    sink.write_window(PROJECT, win, [batch(rows)], finisher(win, rows))
                    written |= {row["uuid"] for row in rows}
        figures = []
        for n, dest in enumerate(dests):
            out = tmp_path / f"{n}.html"
            result = CliRunner().invoke(cli, ["report", "--dest", dest, "--out", str(out)])
            assert result.exit_code == 0, result.output
            data = island(out)
            assert data.pop("meta").pop("destination") == dest
            figures.append(data)
    finally:
        fsspec.filesystem("memory").rm(bucket.removeprefix("memory://"), recursive=True)
    assert figures[0]["totals"]["events"] == len(written) and [h["status"] for h in figures[0]["hourly"]] == [
        "loaded"
    ] * 4
    assert figures[1] == figures[0] and figures[2] == figures[0]


def test_empty_destination_and_unknown_project(tmp_path: Path, destinations: dict[str, str]) -> None:
    DuckDBSink(tmp_path / "empty.duckdb").close()
    data = island(write_report(f"duckdb:{tmp_path / 'empty.duckdb'}", tmp_path / "empty.html"))
    assert data["totals"]["events"] == 0 and data["hourly"] == [] and data["meta"]["start"] is None
    with pytest.raises(UsageError, match="no project 'nope'"):
        write_report(destinations["duckdb"], tmp_path / "x.html", project="nope")
    with duckdb.connect(str(tmp_path / "other.duckdb")) as other:
        other.execute("CREATE TABLE t (a INTEGER)")
    with pytest.raises(DestinationError, match="holds no amplitude-export tables"):
        write_report(f"duckdb:{tmp_path / 'other.duckdb'}", tmp_path / "y.html")


def test_the_report_imports_nothing_above_the_sinks(destinations: dict[str, str], tmp_path: Path) -> None:
    """The report reads a destination through the sinks' public functions: no pipeline, status or CLI imported."""
    code = (
        "import sys\nfrom pathlib import Path\nfrom amplitude_export.report import write_report\n"
        f"write_report({destinations['parquet']!r}, Path({str(tmp_path / 'r.html')!r}))\n"
        f"write_report({destinations['duckdb']!r}, Path({str(tmp_path / 'r.html')!r}))\n"
        "print(sorted(m for m in sys.modules if m.startswith('amplitude_export.')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(result.stdout.strip().replace("'", '"')))
    assert "amplitude_export.report.figures" in loaded
    assert not loaded & {"amplitude_export.pipeline", "amplitude_export.status", "amplitude_export.cli"}, loaded


@pytest.mark.slow
def test_a_wheel_ships_the_page_files_and_its_report_draws_from_them(
    destinations: dict[str, str], tmp_path: Path
) -> None:
    """A non-editable install: the template, CSS, script and Vega files are package data, not files of the repo."""
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(repo)], check=True, capture_output=True)  # fmt: skip
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)  # fmt: skip
    code = (
        "import sys\nfrom pathlib import Path\nimport amplitude_export.report as r\n"
        f"r.write_report({destinations['duckdb']!r}, Path({str(tmp_path / 'r.html')!r}))\nprint(r.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_relative_to(tmp_path / "site")
    here = write_report(destinations["duckdb"], tmp_path / "here.html")

    def undated(page: Path) -> str:
        text = re.sub(r"generated [^<]*", "", page.read_text())
        return re.sub(r'"generated_at":"[^"]*"', "", text)

    assert undated(tmp_path / "r.html") == undated(here) and 'id="chart-hourly"' in undated(here)


def test_the_report_reads_sinks_only_through_their_public_functions() -> None:
    """No module of the report imports a sink's module or reads an underscored attribute of anything."""
    package = Path(amplitude_export.report.__file__).parent
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                assert not module.startswith(("..sinks.", "amplitude_export.sinks.")), (path.name, module)
                assert module.lstrip(".").split(".")[0] not in ("pipeline", "status", "cli"), (path.name, module)
            if isinstance(node, ast.Attribute):
                private = node.attr.startswith("_") and not node.attr.endswith("__")
                assert not private, f"{path.name}:{node.lineno} reads .{node.attr}"


def test_chromium_draws_every_chart_offline(report: Path, tmp_path: Path) -> None:
    """CI installs Debian's chromium: a missing browser fails here rather than skipping."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    problems: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(report.as_uri())
            page.wait_for_function("document.body.dataset.rendered !== undefined", timeout=20_000)
            charts = page.evaluate(
                "[...document.querySelectorAll('.chart')].map(c => [c.id, c.querySelectorAll('svg .mark-rect, "
                "svg .mark-line, svg path, svg rect').length])"
            )
            rendered = page.evaluate("document.body.dataset.rendered")
            marks = dict(page.evaluate(
                "[...document.querySelectorAll('.chart')].map(c => [c.id, [...c.querySelectorAll('svg g.role-mark')]"
                ".map(g => g.getAttribute('class').split(' ')[0] + ' ' + g.children.length).sort()])"
            ))  # fmt: skip
            versions = page.evaluate("({vega: vega.version, 'vega-lite': vegaLite.version, "
                                     "'vega-embed': vegaEmbed.version})")  # fmt: skip
            page.locator("#chart-types svg g.mark-rect path").first.hover()  # vega-embed's tooltip handler
            page.wait_for_selector("#vg-tooltip-element.visible", timeout=5_000)
            tooltip = page.inner_text("#vg-tooltip-element")
            labels = page.evaluate("[...document.querySelectorAll('#chart-daily svg g.role-mark.mark-text text')]"
                                   ".map(t => t.textContent)")
            section = page.inner_text("#other-streams")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert len(charts) == 7 and rendered == "7/7", charts
    assert all(count > 0 for _, count in charts), charts
    # one mark per row of each chart's data: the charts draw the figures the page embeds
    data = island(report)
    drawn = [len([row for row in data[name] if not row.get("other")]) for name in ("event_types", "platforms",
                                                                                  "countries")]  # fmt: skip
    assert marks == {
        "chart-hourly": [f"mark-rect {len(data['hourly'])}"] * 2,  # the ledger's shading and the bars
        # the days' bars, and a dashed rule and a label per annotation in the range
        "chart-daily": sorted([f"mark-rect {len(data['daily'])}", f"mark-rule {len(data['streams']['annotations'])}",
                               f"mark-text {len(data['streams']['annotations'])}"]),
        "chart-users": ["mark-line 1", "mark-line 1", f"mark-symbol {2 * len(data['daily'])}"],
        "chart-types": [f"mark-rect {drawn[0]}"],
        "chart-platforms": [f"mark-rect {drawn[1]}"],
        "chart-countries": [f"mark-rect {drawn[2]}"],
        "chart-lateness": [f"mark-rect {len(data['lateness']['buckets'])}"],
    }
    assert versions == vega_versions()  # the scripts inlined are the ones package data names
    assert sorted(labels) == sorted(a["label"] for a in data["streams"]["annotations"]) != []
    assert "Other streams" in section and "Power users" in section and "1,200" in section
    top = data["event_types"][0]
    assert " ".join(tooltip.replace(",", "").split()) == (
        f"event_type {top['value']} events {top['events']} users (approx.) {top['users']} share {top['share']:.1%}"
    )
    assert problems == []
    assert requests == [report.as_uri()]  # nothing but the file itself: no CDN, no fonts
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_a_postgresql_destination(tmp_path: Path) -> None:
    """The report over PostgreSQL: figures checked by SQL in PostgreSQL itself."""
    url = os.environ.get("AMP_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
    schema = f"amp_test_{uuid_module.uuid4().hex[:12]}"
    dest = f"{url}?schema={schema}"
    try:
        with stamina.set_testing(True, attempts=3, cap=True), FakeExportServer(seed=5, data_start=START) as server:
            credentials = Credentials(server.api_key, Secret("demo-secret"), "us", server.url)
            with ExportClient(credentials) as client, open_sink(dest) as sink:
                run(client, sink, project=PROJECT, start="2024-03-01", end="2024-03-01", data_dir=tmp_path / "d",
                    workers=1, now=datetime(2024, 4, 1, tzinfo=UTC))  # fmt: skip
        data = island(write_report(dest, tmp_path / "pg.html"))
        with psycopg.connect(url, autocommit=True) as conn:
            table = f'"{schema}".events'
            row = conn.execute(f"SELECT count(*), count(DISTINCT amplitude_id) FROM {table}").fetchone()
            assert row is not None
            events, users = row
            types = conn.execute(
                f"SELECT event_type, count(*) FROM {table} WHERE event_time >= '2024-03-01 00:00+00' "
                "AND event_time < '2024-03-02 00:00+00' GROUP BY 1 ORDER BY 2 DESC, event_type COLLATE \"C\""
            ).fetchall()
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    assert events > 1_000 and (data["totals"]["events"], data["totals"]["users"]) == (events, users)
    assert [h["status"] for h in data["hourly"]] == ["loaded"] * 24
    assert [(t["value"], t["events"]) for t in data["event_types"][:TOP]] == types[:TOP]

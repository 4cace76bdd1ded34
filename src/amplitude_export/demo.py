"""`amplitude-export demo`: the whole job against a bundled fake Amplitude, then a short summary."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
from rich.console import Console
from rich.table import Table

from .client import ExportClient
from .config import Credentials, Secret
from .fake_server import FakeExportServer
from .logs import setup_logging
from .pipeline import new_run_id, run
from .progress import make_reporter
from .report import write_report
from .sinks import open_sink

DEMO_START = datetime(2024, 3, 1, tzinfo=UTC)


def demo_server() -> FakeExportServer:
    """The demo's fake Amplitude (not started): what a real export has, transient faults, two malformed lines
    an hour and a night with no data at all (three empty hours on the third day)."""
    outage = [DEMO_START + timedelta(days=2, hours=hour) for hour in (3, 4, 5)]
    return FakeExportServer(api_key="demo-key", secret_key="demo-secret", seed=7, fault_rate=0.25,
                            malformed_lines=True, empty_hours=outage)


def run_demo(data_dir: Path, *, days: int = 7, progress: bool | None = None) -> int:
    """Serve `days` of events from an in-process fake server (with a few transient faults), load them into
    DuckDB under `data_dir`, print a summary; return the run's exit code."""
    console = Console(soft_wrap=True)  # paths and messages stay whole lines when piped to a file
    end = DEMO_START + timedelta(days=days) - timedelta(hours=1)
    run_id = new_run_id()
    reporter = make_reporter(progress)
    log_path = setup_logging(data_dir / "logs", run_id, reporter=reporter)
    database = data_dir / "amplitude.duckdb"
    logging.getLogger("amplitude_export.fake_server").setLevel(logging.WARNING)  # its request log is noise here
    with demo_server() as server:
        credentials = Credentials("demo-key", Secret("demo-secret"), "us", server.url)
        console.print(f"fake Amplitude Export API at {server.url} "
                      "(25% transient faults, 2 malformed lines an hour, 3 hours without data)")
        with ExportClient(credentials, wait_initial=0.2, wait_max=1.0) as client:
            sink = open_sink(f"duckdb:{database}")
            try:
                with reporter:
                    report = run(client, sink, project="demo", start=DEMO_START.strftime("%Y%m%dT%H"),
                                 end=end.strftime("%Y%m%dT%H"), data_dir=data_dir, reporter=reporter,
                                 run_id=run_id)
            finally:
                sink.close()
    console.print(report.summary())
    print_summary(database, console)
    report_path = write_report(f"duckdb:{database}", data_dir / "report.html")
    console.print(f"database: {database}\nlog: {log_path}\nreport: {report_path}")
    return report.exit_code


def print_summary(database: Path, console: Console) -> None:
    """Events per day, top event types and distinct users, straight from the DuckDB file."""
    with duckdb.connect(str(database), read_only=True) as con:
        per_day = con.execute(
            "SELECT CAST(timezone('UTC', server_upload_time) AS DATE) AS day, count(*), "
            "count(DISTINCT amplitude_id) FROM events GROUP BY 1 ORDER BY 1"
        ).fetchall()
        top = con.execute(
            "SELECT event_type, count(*) FROM events GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 8"
        ).fetchall()
        total, users = con.execute("SELECT count(*), count(DISTINCT amplitude_id) FROM events").fetchone() or (0, 0)
    days = Table(title="events per upload day (UTC)")
    for name in ("day", "events", "users"):
        days.add_column(name, justify="right")
    for day, events, day_users in per_day:
        days.add_row(str(day), f"{events:,}", f"{day_users:,}")
    types = Table(title="top event types")
    types.add_column("event_type")
    types.add_column("events", justify="right")
    for name, events in top:
        types.add_row(str(name), f"{events:,}")
    console.print(days)
    console.print(types)
    console.print(f"{total:,} events from {users:,} distinct users")

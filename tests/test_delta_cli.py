"""`--dest delta:...` as a user runs it: the CLI as a subprocess, into a local path and into a bucket on the
loopback S3 server (tests/s3.py, in a child process), against the fake Export API. Exactly once across re-runs,
status, verify, verify --deep, report and maintain; kill -9 mid-run then the same run; two runs at once; a
lookback reload of the hours Amplitude changed, local and on S3.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
import stamina
from s3 import LoopbackS3

import amplitude_export
from amplitude_export.client import ExportClient
from amplitude_export.config import Credentials, Secret
from amplitude_export.fake_server import FakeExportServer
from amplitude_export.pipeline import run
from amplitude_export.sinks import open_sink
from amplitude_export.sinks.delta import DeltaSink, delta_options
from amplitude_export.verify import verify

DAY = datetime(2024, 3, 1, tzinfo=UTC)
SECRET = "loopback-secret-never-printed-7c1e"


def cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from amplitude_export.cli import main; main()", *args],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def run_args(server: FakeExportServer, dest: str, start: str, end: str, *extra: str) -> list[str]:
    return ["run", "--base-url", server.url, "--api-key", server.api_key, "--secret-key", "demo-secret",
            "--start", start, "--end", end, "--dest", dest, "--data-dir", "data", "--log-dir", "logs",
            "--no-progress", *extra]


def said(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


class Place:
    """A table's URL, the options that reach it, and the environment a subprocess needs for it."""

    def __init__(self, uri: str, options: dict[str, str], env: dict[str, str]) -> None:
        self.uri, self.options, self.env = uri, options, env
        self.dest = f"delta:{uri}"
        self.flags = [arg for key, value in options.items() for arg in ("--storage-option", f"{key}={value}")]

    def uuids(self) -> list[str]:
        return amplitude_export.read_arrow(self.dest, storage_options=self.options or None).column("uuid").to_pylist()

    def version(self) -> int:
        from deltalake import DeltaTable

        try:
            return DeltaTable(self.uri, storage_options=delta_options(self.options)).version()
        except Exception:  # noqa: BLE001 - not created yet
            return -1


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Place:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
    if request.param == "local":
        return Place(str(tmp_path / "lake" / "events"), {}, env)
    s3: LoopbackS3 = request.getfixturevalue("s3_process")
    # the environment's endpoint is a closed port: only the options reach the server
    options = {"endpoint_url": s3.endpoint, "aws_secret_access_key": SECRET}
    return Place(f"s3://{s3.new_bucket()}/events", options, s3.env())


def test_run_rerun_status_verify_report_and_maintain(place: Place, fake_server: FakeExportServer,
                                                     tmp_path: Path) -> None:
    env, flags = place.env, place.flags
    first = cli(*run_args(fake_server, place.dest, "2024-03-01", "2024-03-01", *flags), env=env, cwd=tmp_path)
    assert first.returncode == 0, said(first)
    expected = fake_server.expected_uuids(DAY, DAY.replace(hour=23))
    stored = place.uuids()
    assert len(stored) == len(set(stored)) and set(stored) == expected
    version = place.version()
    assert version == 1  # created, then the day's one window

    again = cli(*run_args(fake_server, place.dest, "2024-03-01", "2024-03-01", *flags), env=env, cwd=tmp_path)
    assert again.returncode == 0, said(again)
    assert place.version() == version and sorted(place.uuids()) == sorted(stored)

    status = cli("status", "--dest", place.dest, *flags, "--json", env=env, cwd=tmp_path)
    assert status.returncode == 0 and str(len(expected)) in status.stdout, said(status)
    verify = cli("verify", "--dest", place.dest, *flags, env=env, cwd=tmp_path)
    assert verify.returncode == 0 and "24 hours checked" in verify.stdout, said(verify)
    deep = cli("verify", "--deep", "--dest", place.dest, *flags, env=env, cwd=tmp_path)
    assert deep.returncode == 0 and "24 archive hours hashed: complete" in deep.stdout, said(deep)
    report = cli("report", "--dest", place.dest, *flags, "--out", "report.html", env=env, cwd=tmp_path)
    assert report.returncode == 0, said(report)
    assert f"{len(expected):,}" in (tmp_path / "report.html").read_text()
    maintain = cli("maintain", "--dest", place.dest, *flags, "--older-than", "0", env=env, cwd=tmp_path)
    assert maintain.returncode == 0, said(maintain)
    assert maintain.stdout.startswith(f"{place.dest}: compacted ") and "deleted " in maintain.stdout, said(maintain)
    assert sorted(place.uuids()) == sorted(stored)

    printed = [said(r) for r in (first, again, status, verify, deep, report, maintain)]
    logs = [path.read_text() for path in (tmp_path / "logs").glob("*.log")]
    assert not any(SECRET in text for text in printed + logs)


def test_maintain_is_for_table_formats(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
    duckdb_dest = ["--dest", f"duckdb:{tmp_path / 'a.duckdb'}"]
    parquet_dest = ["--dest", f"parquet:{tmp_path / 'p'}"]
    for args, message in ((duckdb_dest, "maintain applies to iceberg: and delta: tables, not to duckdb:"),
                          (parquet_dest, "maintain applies to iceberg: and delta: tables, not to parquet:"),
                          (["--dest", "postgresql://me:hunter2@127.0.0.1:1/x"], "not to postgresql:"),
                          ([], "maintain needs --dest"),
                          (["--dest", f"delta:{tmp_path / 'd'}", "--older-than", "7"], "use a number and a unit")):
        result = cli("maintain", *args, env=env, cwd=tmp_path, timeout=60)
        assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, said(result)
        assert message in result.stderr and "hunter2" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # refused before anything was opened or created


def commits(place: Place) -> int:
    """Commits so far (0 before the table exists; the first creates it)."""
    return place.version() + 1


@pytest.mark.slow
def test_kill_9_mid_run_then_the_same_run_gives_exact_rows(place: Place, tmp_path: Path) -> None:
    with FakeExportServer(events_per_hour=300, members_per_hour=3, seed=5) as server:
        args = [sys.executable, "-c", "from amplitude_export.cli import main; main()",
                *run_args(server, place.dest, "2024-03-01", "2024-03-04", "--window-hours", "12", *place.flags)]
        process = subprocess.Popen(args, env=place.env, cwd=tmp_path, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None and commits(place) < 3:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert 3 <= commits(place) < 9
        result = subprocess.run(args, env=place.env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, said(result)
        expected = server.expected_uuids(DAY, DAY + timedelta(days=4) - timedelta(hours=1))
    stored = place.uuids()
    assert len(stored) == len(set(stored)) and set(stored) == expected
    verify = cli("verify", "--dest", place.dest, *place.flags, env=place.env, cwd=tmp_path)
    assert verify.returncode == 0 and "96 hours checked" in verify.stdout, said(verify)


@pytest.mark.slow
def test_two_runs_at_once_both_finish_and_each_event_is_stored_once(tmp_path: Path) -> None:
    """No lock: the runs' window commits are serialised by Delta, each re-checked when another came first."""
    dest = f"delta:{tmp_path / 'events'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
    with FakeExportServer(events_per_hour=40, data_start=DAY, data_end=DAY + timedelta(days=3, hours=-1)) as server:
        runs = [subprocess.Popen([sys.executable, "-c", "from amplitude_export.cli import main; main()",
                                  *run_args(server, dest, start, end, "--window-hours", "6", "--log-dir", f"logs-{n}",
                                            "--data-dir", f"data-{n}")],
                                 env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for n, (start, end) in enumerate([("2024-03-01", "2024-03-02"), ("2024-03-02", "2024-03-03")])]
        outputs = [process.communicate(timeout=600)[0] for process in runs]
        assert [process.returncode for process in runs] == [0, 0], outputs
        expected = server.expected_uuids(DAY, DAY + timedelta(days=3, hours=-1))
    stored = amplitude_export.read_arrow(dest).column("uuid").to_pylist()
    assert len(stored) == len(set(stored)) and set(stored) == expected
    verify = cli("verify", "--dest", dest, env=env, cwd=tmp_path)
    assert verify.returncode == 0 and "72 hours checked" in verify.stdout, said(verify)


def assert_hours_as_served(table: pa.Table, server: FakeExportServer, hours: list[datetime]) -> None:
    """The rows stored for `hours` are the server's current version of them: its session ids, not older ones."""
    rows = [row for row in table.select(["uuid", "session_id", "_upload_hour"]).to_pylist()
            if row["_upload_hour"] in hours]
    served = {(h, e["uuid"]): e["session_id"] for h in hours for e in reversed(server.hour_lines(h))}
    assert rows and all(served[row["_upload_hour"], row["uuid"]] == row["session_id"] for row in rows)


def test_lookback_reloads_only_the_hours_amplitude_changed(place: Place, tmp_path: Path) -> None:
    now = datetime(2024, 3, 2, 2, 30, tzinfo=UTC)  # ready through 2024-03-01T23
    options = place.options or None

    def run_into(server: FakeExportServer, **kwargs: object) -> None:
        with (stamina.set_testing(True, attempts=100, cap=True),
              ExportClient(Credentials("demo-key", Secret("demo-secret"), "us", server.url)) as client,
              open_sink(place.dest, storage_options=options) as sink):
            assert run(client, sink, project="p", data_dir=tmp_path, now=now, **kwargs).exit_code == 0  # type: ignore[arg-type]

    changed_hours = [DAY.replace(hour=20), DAY.replace(hour=21)]
    with FakeExportServer(events_per_hour=20, data_start=DAY, data_end=DAY.replace(hour=23)) as server:
        run_into(server, start="2024-03-01", end="2024-03-01")
        with DeltaSink(place.uri, read_only=True, storage_options=options) as sink:
            before, version = sink.ledger("p"), sink.table.version()
        for changed in changed_hours:
            server.set_hour_version(changed, 1)
        run_into(server, lookback_hours=12)
        expected = server.expected_uuids(DAY, DAY.replace(hour=23))
        with DeltaSink(place.uri, read_only=True, storage_options=options) as sink:
            after, table = sink.ledger("p"), sink.read_arrow()
            assert sink.table.version() == version + 1  # the two changed hours: one window, one commit
            assert verify(sink, "p").complete
        assert_hours_as_served(table, server, changed_hours)
    stored = table.column("uuid").to_pylist()
    changed = sorted(h.hour for h in after if after[h].run_id != before[h].run_id)
    assert changed == [20, 21] and len(stored) == len(set(stored)) and set(stored) == expected

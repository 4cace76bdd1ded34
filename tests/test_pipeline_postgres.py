"""`amplitude-export run` into the real PostgreSQL, as a subprocess: exact rows with faults and duplicates, a
repeated run changes nothing, SIGKILL then the same run is exact, two concurrent runs on overlapping ranges; a
failed write is one line on stderr and in the log; a malformed URL exits 2, an unreachable server or a missing
privilege 4.

PostgreSQL must be reachable (these fail, never skip); each test works in its own schema.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import POSTGRES_URL as URL
from conftest import url_for

from amplitude_export.fake_server import FakeExportServer
from amplitude_export.sinks.postgres import PostgresSink

START = datetime(2024, 3, 1, tzinfo=UTC)


@pytest.fixture()
def schema(pg_schema: str) -> str:
    return pg_schema


def command(server: FakeExportServer, schema: str, work: Path, start: str, end: str, *more: str,
            dest: str = URL, window_hours: int = 12) -> list[str]:
    return [sys.executable, "-c", "from amplitude_export.cli import main; main()", "run",
            "--base-url", server.url, "--start", start, "--end", end, "--window-hours", str(window_hours),
            "--dest", dest, "--schema", schema, "--data-dir", str(work / "data"), "--log-dir", str(work / "logs"),
            "--no-progress", "--retry-wait", "0.01", "--workers", "1", *more]  # fmt: skip


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
    env.update(AMP_API_KEY="demo-key", AMP_SECRET_KEY="demo-secret")
    return env


def stored(schema: str) -> list[str]:
    with psycopg.connect(URL, autocommit=True) as conn:
        return [row[0] for row in conn.execute(f'SELECT uuid FROM "{schema}".events').fetchall()]


def fingerprint(schema: str) -> list[tuple[object, ...]]:
    """Every row's uuid, run and provenance, and the ledger: what a run that changes nothing leaves alone."""
    with psycopg.connect(URL, autocommit=True) as conn:
        rows = conn.execute(f'SELECT uuid, _run_id, _member, _line FROM "{schema}".events ORDER BY 1').fetchall()
        ledger = conn.execute(
            f'SELECT hour, status, content_hash, events_loaded, run_id FROM "{schema}"._amplitude_ledger ORDER BY 1'
        ).fetchall()
    return rows + ledger


def test_faults_and_duplicates_give_exact_rows_and_a_repeated_run_changes_nothing(
    schema: str, tmp_path: Path
) -> None:
    with FakeExportServer(events_per_hour=40, members_per_hour=2, fault_rate=0.3, seed=3) as server:
        cmd = command(server, schema, tmp_path, "2024-03-01", "2024-03-02")
        first = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stdout + first.stderr
        expected = server.expected_uuids(START, START + timedelta(hours=47))
        assert server.expected_events(START, START + timedelta(hours=47)) > len(expected)  # duplicates served
        rows = stored(schema)
        assert len(rows) == len(set(rows)) and set(rows) == expected
        before = fingerprint(schema)
        again = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "0 windows" in again.stdout or "nothing to do" in again.stdout.lower(), again.stdout
    assert fingerprint(schema) == before


def test_sigkill_during_a_run_then_the_same_run_gives_exact_rows(schema: str, tmp_path: Path) -> None:
    with FakeExportServer(events_per_hour=400, members_per_hour=3) as server:
        cmd = command(server, schema, tmp_path, "2024-03-01", "2024-03-04")
        process = subprocess.Popen(cmd, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if len(list((tmp_path / "data" / "raw").glob("*.zip"))) >= 3:
                break  # a few windows landed: loads are under way
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        result = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        expected = server.expected_uuids(START, START + timedelta(days=4) - timedelta(hours=1))
    rows = stored(schema)
    assert len(rows) == len(set(rows)) and set(rows) == expected


def test_two_concurrent_runs_on_overlapping_ranges_end_with_exact_rows(schema: str, tmp_path: Path) -> None:
    """Each run has its own data dir; `--wait` queues the second behind the first's lock instead of exit 5."""
    with FakeExportServer(events_per_hour=60, members_per_hour=2, fault_rate=0.2, seed=9) as server:
        runs = [
            subprocess.Popen(
                command(server, schema, tmp_path / name, start, end, "--wait"),
                env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for name, start, end in (("a", "2024-03-01", "2024-03-02"), ("b", "2024-03-02", "2024-03-03"))
        ]  # fmt: skip
        outputs = [process.communicate(timeout=300)[0] for process in runs]
        for process, output in zip(runs, outputs, strict=True):
            assert process.returncode == 0, output
        expected = server.expected_uuids(START, START + timedelta(days=3) - timedelta(hours=1))
    rows = stored(schema)
    assert len(rows) == len(set(rows)) and set(rows) == expected
    verify = subprocess.run(
        [sys.executable, "-c", "from amplitude_export.cli import main; main()", "verify", "--dest", URL,
         "--schema", schema, "--api-key", "demo-key"],
        env=environment(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_second_run_without_wait_exits_5_and_names_the_lock(schema: str, tmp_path: Path) -> None:
    with psycopg.connect(URL, autocommit=True) as holder:
        key = holder.execute("SELECT hashtextextended(%s, 0)", [f"amplitude-export:{schema}"]).fetchone()[0]  # type: ignore[index]
        holder.execute("SELECT pg_advisory_lock(%s)", [key])
        with FakeExportServer(events_per_hour=5) as server:
            result = subprocess.run(command(server, schema, tmp_path, "2024-03-01", "2024-03-01"),
                                    env=environment(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 5, result.stdout + result.stderr
    assert "busy" in result.stderr and "another run" in result.stderr


def test_a_failed_write_is_one_error_line_on_stderr_and_in_the_log(pg_role: tuple[str, str], tmp_path: Path) -> None:
    """INSERT on the ledger revoked: the window's transaction fails at its end. psycopg would also warn on stderr
    about the pipeline it could not close (48 ledger rows are enough for executemany to hit that)."""
    role, schema = pg_role
    PostgresSink(URL, schema=schema).close()  # the tables, made by their owner
    with psycopg.connect(URL, autocommit=True) as admin:
        admin.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        admin.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"')
        admin.execute(f'REVOKE INSERT ON "{schema}"._amplitude_ledger FROM "{role}"')
    with FakeExportServer(events_per_hour=5) as server:
        cmd = command(server, schema, tmp_path, "2024-03-01", "2024-03-02", dest=url_for(role), window_hours=48)
        result = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 4, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    assert "permission denied for table _amplitude_ledger" in errors[0]
    logs = list((tmp_path / "logs").glob("*.log"))
    assert len(logs) == 1
    logged = [line for line in logs[0].read_text().splitlines() if " ERROR " in line]
    assert len(logged) == 1 and logged[0].endswith(errors[0].removeprefix("error: ")), logged
    assert stored(schema) == []


@pytest.mark.parametrize(
    "dest, code",
    [
        ("postgresql://u@h:notaport/test", 2),
        ("postgresql://postgres@[::1", 2),
        ("postgresql://postgres@127.0.0.1:1/test", 4),  # nothing listens on port 1
        ("role", 4),  # a role without CREATE on the database, for a schema that does not exist
    ],
)
def test_a_malformed_url_exits_2_and_an_unusable_server_4(
    dest: str, code: int, pg_role: tuple[str, str], tmp_path: Path
) -> None:
    role, schema = pg_role
    dest = url_for(role) if dest == "role" else dest
    (tmp_path / "d" / "raw").mkdir(parents=True)  # archives to load: only the destination is wrong
    # a subprocess: `load` sets up logging for the whole process
    result = subprocess.run(
        [sys.executable, "-c", "from amplitude_export.cli import main; main()", "load", "--dest", dest,
         "--schema", schema, "--data-dir", str(tmp_path / "d"), "--log-dir", str(tmp_path / "logs"), "--no-progress"],
        env=environment(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == code, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1, result.stderr
    if dest.startswith(url_for(role)):
        assert "permission denied" in result.stderr

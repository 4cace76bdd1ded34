"""Ctrl-C in the middle of a load, into every destination: one line, exit 130, and a re-run that completes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import destination_url

from amplitude_export import read_arrow
from amplitude_export.fake_server import FakeExportServer

DAY = datetime(2024, 3, 1, tzinfo=UTC)
# as a terminal starts it: Ctrl-C not ignored, even where the suite itself runs in the background
CLI = [sys.executable, "-c", "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
       "from amplitude_export.cli import main; main()"]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeExportServer]:
    """One server for the module's runs (they only read from it): its members are built once."""
    with FakeExportServer(events_per_hour=2000, members_per_hour=2, data_start=DAY,
                          data_end=DAY.replace(hour=23)) as srv:
        srv.window_members(DAY, DAY.replace(hour=23))
        yield srv


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["duckdb", "parquet", "postgres", "delta", "iceberg"])
def test_ctrl_c_while_windows_load_exits_130_and_the_rerun_completes(kind: str, tmp_path: Path, pg_schema: str,
                                                                     server: FakeExportServer) -> None:
    if kind in ("delta", "iceberg"):
        pytest.importorskip({"delta": "deltalake", "iceberg": "pyiceberg"}[kind])
    dest = destination_url(kind, tmp_path, pg_schema)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
    env.update(AMP_API_KEY="demo-key", AMP_SECRET_KEY="demo-secret")
    args = ["run", "--base-url", server.url, "--start", "2024-03-01", "--end", "2024-03-01", "--window-hours", "4",
            "--no-progress", "--dest", dest, "--log-dir", str(tmp_path / "logs")]
    process = subprocess.Popen([*CLI, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # once the first window is in, the next ones are downloading and loading
    while time.monotonic() < deadline and process.poll() is None and not any(
            "[1/6]" in log.read_text() for log in (tmp_path / "logs").glob("*.log")):
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert [line for line in err.splitlines() if line.startswith(("error:", "Traceback"))] == [
        "error: interrupted; a re-run picks up where this one stopped"], err
    again = subprocess.run([*CLI, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    expected = server.expected_uuids(DAY, DAY.replace(hour=23))
    verify = subprocess.run([*CLI, "verify", "--deep", "--dest", dest], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.strip().splitlines()[-1].endswith("complete"), verify.stdout
    uuids = read_arrow(dest, columns=["uuid"], project="demo-key").column("uuid").to_pylist()
    assert len(uuids) == len(expected) and set(uuids) == expected

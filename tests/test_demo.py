"""The README's first command: `amplitude-export demo` runs the whole job and leaves what it says it does."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import duckdb

from amplitude_export.demo import DEMO_START, demo_server


def test_demo_loads_every_served_event_once_and_writes_the_report(tmp_path: Path) -> None:
    data = tmp_path / "demo-data"
    result = subprocess.run(
        [str(Path(sys.executable).with_name("amplitude-export")), "demo", "--days", "3", "--data-dir", str(data),
         "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    end = DEMO_START + timedelta(days=3) - timedelta(hours=1)
    served = demo_server()
    expected = served.expected_uuids(DEMO_START, end)
    with duckdb.connect(str(data / "amplitude.duckdb"), read_only=True) as con:
        rows, distinct = con.execute("SELECT count(*), count(DISTINCT uuid) FROM events").fetchone()
        stored = {uuid for (uuid,) in con.execute("SELECT uuid FROM events").fetchall()}
        empty = con.execute("SELECT count(*) FROM _amplitude_ledger WHERE status = 'empty'").fetchone()[0]
        rejects = con.execute("SELECT sum(rejects) FROM _amplitude_ledger").fetchone()[0]
        retried = con.execute("SELECT count(*) FROM _amplitude_ledger WHERE attempts > 1").fetchone()[0]
    assert rows == distinct == len(expected) and stored == expected
    assert empty == 3  # the demo's night without data, recorded as empty hours
    assert rejects == served.expected_rejects(DEMO_START, end) > 0
    assert retried > 0  # the demo's transient faults were retried, and the ledger says so
    assert f"{len(expected):,} events from" in result.stdout
    report = data / "report.html"
    assert f"report: {report}" in result.stdout and report.stat().st_size > 100_000
    assert "demo-secret" not in result.stdout + result.stderr
    for line in help_examples("demo"):  # what `demo --help` suggests next runs here, on what the demo left
        if line != "amplitude-export demo":
            ran = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                                 env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
            assert ran.returncode == 0, f"{line}\n{ran.stdout}{ran.stderr}"


def help_examples(command: str) -> list[str]:
    """The lines under "Example:" in `amplitude-export COMMAND --help`."""
    shown = subprocess.run([str(Path(sys.executable).with_name("amplitude-export")), command, "--help"],
                           capture_output=True, text=True, check=True).stdout
    block = shown.split("Example:\n", 1)[1].split("\n\n", 1)[0]
    return [line.strip() for line in block.splitlines()]

"""A table's data file deleted by hand: `verify` and `report` say so in one line (exit 4), never a traceback, and
name the way out, `maintain --repair`, after which the next run loads the lost hours again. (Parquet needs no
repair: its hours read as failed and a run loads them again, tests/test_sink_parquet.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import API_KEY, SECRET_KEY

from amplitude_export.fake_server import FakeExportServer


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
    env.update(AMP_API_KEY=API_KEY, AMP_SECRET_KEY=SECRET_KEY)
    return subprocess.run([sys.executable, "-c", "from amplitude_export.cli import main; main()", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind", ["delta", "iceberg"])
def test_a_deleted_data_file_is_one_line_for_verify_and_report(kind: str, tmp_path: Path,
                                                               fake_server: FakeExportServer) -> None:
    pytest.importorskip({"delta": "deltalake", "iceberg": "pyiceberg"}[kind])
    dest = f"{kind}:{tmp_path / 'table'}"
    loaded = cli("run", "--base-url", fake_server.url, "--start", "2024-03-01", "--end", "2024-03-01",
                 "--no-progress", "--dest", dest, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    data = [p for p in (tmp_path / "table").rglob("*.parquet")
            if "_amplitude" not in str(p) and "metadata" not in p.parts]
    assert data
    data[0].unlink()
    for args in (["verify"], ["report", "--out", str(tmp_path / "r.html")]):
        result = cli(*args, "--dest", dest, cwd=tmp_path)
        assert result.returncode == 4, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: cannot read "), result.stderr
        assert data[0].name in lines[0]
        assert f"amplitude-export maintain --dest {kind}:" in lines[0] and "--repair" in lines[0]


@pytest.mark.parametrize("kind", ["delta", "iceberg"])
def test_maintain_repair_drops_a_lost_file_and_the_next_run_loads_its_hours_again(
        kind: str, tmp_path: Path, fake_server: FakeExportServer) -> None:
    pytest.importorskip({"delta": "deltalake", "iceberg": "pyiceberg"}[kind])
    dest = f"{kind}:{tmp_path / 'table'}"
    loaded = cli("run", "--base-url", fake_server.url, "--start", "2024-03-01", "--end", "2024-03-01",
                 "--no-progress", "--dest", dest, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    before = json.loads(cli("status", "--json", "--dest", dest, cwd=tmp_path).stdout)
    lost = [p for p in (tmp_path / "table").rglob("*.parquet")
            if "_amplitude" not in str(p) and "metadata" not in p.parts]
    assert len(lost) == 1
    lost[0].unlink()

    repaired = cli("maintain", "--repair", "--no-compact", "--dest", dest, cwd=tmp_path)
    assert repaired.returncode == 0, repaired.stderr
    assert "dropped 1 missing data file; marked 24 hours failed, for the next run to load again" in repaired.stdout
    verified = cli("verify", "--json", "--dest", dest, cwd=tmp_path)
    assert verified.returncode == 1, verified.stderr
    problems = json.loads(verified.stdout)["summary"]
    assert [(p["start"], p["end"], p["kind"]) for p in problems] == [("2024-03-01T00", "2024-03-01T23", "failed")]
    again = cli("maintain", "--repair", "--no-compact", "--dest", dest, cwd=tmp_path)
    assert "dropped 0 missing data files; no loaded hour's rows differ from the ledger" in again.stdout, again.stderr

    rerun = cli("run", "--base-url", fake_server.url, "--end", "2024-03-01", "--no-progress", "--dest", dest,
                cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert cli("verify", "--dest", dest, cwd=tmp_path).returncode == 0
    after = json.loads(cli("status", "--json", "--dest", dest, cwd=tmp_path).stdout)
    assert after["events"] == before["events"] > 0

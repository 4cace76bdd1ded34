"""A table's data file deleted by hand: `verify` and `report` say so in one line (exit 4), never a traceback, and
name the way out, `maintain --repair`, after which the next run loads the lost hours again. (Parquet needs no
repair: its hours read as failed and a run loads them again, tests/test_sink_parquet.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import API_KEY, SECRET_KEY
from s3 import LoopbackS3

from amplitude_export.fake_server import FakeExportServer


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in (env or os.environ).items() if not k.startswith("AMP_")}
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


class Table:
    """A table destination as the CLI names it, the flags and environment that reach it, and its data files."""

    def __init__(self, dest: str, flags: list[str], env: dict[str, str], files: Callable[[], list[str]],
                 remove: Callable[[str], None]) -> None:
        self.dest, self.flags, self.env, self.files, self.remove = dest, flags, env, files, remove


def local_table(kind: str, tmp_path: Path) -> Table:
    root = tmp_path / "table"

    def files() -> list[str]:
        return [str(p) for p in root.rglob("*.parquet") if "_amplitude" not in str(p) and "metadata" not in p.parts]

    return Table(f"{kind}:{root}", [], dict(os.environ), files, lambda path: Path(path).unlink())


def s3_table(kind: str, s3: LoopbackS3, tmp_path: Path) -> Table:
    bucket = s3.new_bucket()
    fs = s3.filesystem()
    dest = f"delta:s3://{bucket}/events" if kind == "delta" else \
        f"iceberg:s3://{bucket}/warehouse?catalog=sqlite:///{tmp_path / 'catalog.db'}"
    options = {"endpoint_url": s3.endpoint}

    def files() -> list[str]:
        fs.invalidate_cache()
        return [p for p in fs.find(bucket)
                if p.endswith(".parquet") and "_amplitude" not in p and "/metadata/" not in p]

    flags = [arg for key, value in options.items() for arg in ("--storage-option", f"{key}={value}")]
    return Table(dest, flags, s3.env(), files, fs.rm)


@pytest.mark.parametrize("place", ["local", pytest.param("s3", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["delta", "iceberg"])
def test_maintain_repair_drops_a_lost_file_and_the_next_run_loads_its_hours_again(
        kind: str, place: str, tmp_path: Path, fake_server: FakeExportServer, request: pytest.FixtureRequest) -> None:
    pytest.importorskip({"delta": "deltalake", "iceberg": "pyiceberg"}[kind])
    table = local_table(kind, tmp_path) if place == "local" else s3_table(
        kind, request.getfixturevalue("s3_process" if kind == "delta" else "s3"), tmp_path)

    def cli_on(*args: str) -> subprocess.CompletedProcess[str]:
        return cli(*args, "--dest", table.dest, *table.flags, cwd=tmp_path, env=table.env)

    loaded = cli_on("run", "--base-url", fake_server.url, "--start", "2024-03-01", "--end", "2024-03-01",
                    "--no-progress")
    assert loaded.returncode == 0, loaded.stderr
    before = json.loads(cli_on("status", "--json").stdout)
    lost = table.files()
    assert len(lost) == 1
    table.remove(lost[0])
    unreadable = cli_on("verify")
    assert unreadable.returncode == 4 and "--repair" in unreadable.stderr, unreadable.stderr

    repaired = cli_on("maintain", "--repair", "--no-compact")
    assert repaired.returncode == 0, repaired.stderr
    assert "dropped 1 missing data file; marked 24 hours failed, for the next run to load again" in repaired.stdout
    verified = cli_on("verify", "--json")
    assert verified.returncode == 1, verified.stderr
    problems = json.loads(verified.stdout)["summary"]
    assert [(p["start"], p["end"], p["kind"]) for p in problems] == [("2024-03-01T00", "2024-03-01T23", "failed")]
    again = cli_on("maintain", "--repair", "--no-compact")
    assert "dropped 0 missing data files; no loaded hour's rows differ from the ledger" in again.stdout, again.stderr

    rerun = cli_on("run", "--base-url", fake_server.url, "--end", "2024-03-01", "--no-progress")
    assert rerun.returncode == 0, rerun.stderr
    assert cli_on("verify").returncode == 0
    after = json.loads(cli_on("status", "--json").stdout)
    assert after["events"] == before["events"] > 0

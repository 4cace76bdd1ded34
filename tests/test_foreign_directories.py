"""A destination is made only where nothing else is, and `maintain` touches only a table of ours: a directory
holding other files (a user's, or another kind of destination) is refused in one line and left as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import API_KEY, SECRET_KEY

from amplitude_export.fake_server import FakeExportServer

KINDS = ["parquet", "delta", "iceberg"]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
    env.update(AMP_API_KEY=API_KEY, AMP_SECRET_KEY=SECRET_KEY)
    return subprocess.run([sys.executable, "-c", "from amplitude_export.cli import main; main()", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def load(server: FakeExportServer, dest: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return cli("run", "--base-url", server.url, "--start", "2024-03-01", "--end", "2024-03-01", "--no-progress",
               "--dest", dest, cwd=cwd)


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def needs(kind: str) -> None:
    if kind in ("delta", "iceberg"):
        pytest.importorskip({"delta": "deltalake", "iceberg": "pyiceberg"}[kind])


@pytest.mark.parametrize("kind", ["delta", "iceberg"])
def test_maintain_refuses_a_directory_without_a_table_and_deletes_nothing(kind: str, tmp_path: Path) -> None:
    needs(kind)
    mine = tmp_path / "mine"
    (mine / "docs").mkdir(parents=True)
    (mine / "docs" / "report.txt").write_text("important")
    (mine / "old.csv").write_text("x")
    os.utime(mine / "old.csv", (0, 0))  # old enough for any retention
    before = tree(mine)
    for dest in (f"{kind}:{mine}", f"{kind}:{tmp_path / 'missing'}"):
        result = cli("maintain", "--dest", dest, "--older-than", "0", cwd=tmp_path)
        assert result.returncode == 4, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert "no Iceberg catalog" in lines[0] or "is not a Delta table" in lines[0], result.stderr
    assert tree(mine) == before and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("other", KINDS)
def test_a_new_destination_is_refused_where_another_kind_already_is(other: str, tmp_path: Path,
                                                                    fake_server: FakeExportServer) -> None:
    # one load of `other`, then a new destination of each other kind tried on it: every ordered pair is covered
    needs(other)
    place = tmp_path / other
    first = load(fake_server, f"{other}:{place}", tmp_path)
    assert first.returncode == 0, first.stderr
    before = tree(place)
    for kind in KINDS:
        if kind == other:
            continue
        needs(kind)
        second = load(fake_server, f"{kind}:{place}", tmp_path)
        assert second.returncode == 4, (kind, second.stderr)
        error = [line for line in second.stderr.splitlines() if line.startswith(("error:", "Traceback"))]
        assert len(error) == 1 and "holds files" in error[0] and "empty" in error[0], (kind, second.stderr)
        assert tree(place) == before, kind
    again = cli("verify", "--dest", f"{other}:{place}", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr


def test_a_delta_destination_must_name_a_path(tmp_path: Path) -> None:
    needs("delta")
    result = cli("run", "--start", "2024-03-01", "--end", "2024-03-01", "--base-url", "http://127.0.0.1:9",
                 "--dest", "delta:", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "error: --dest 'delta:' names no path: give delta:PATH"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_delta_url_of_a_store_delta_rs_does_not_know_is_bad_input(tmp_path: Path) -> None:
    needs("delta")
    result = cli("run", "--start", "2024-03-01", "--end", "2024-03-01", "--base-url", "http://127.0.0.1:9",
                 "--dest", "delta:s4://bucket/events", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("error: --dest delta:s4://bucket/events: delta-rs reaches no store s4:// (use a "
                                     "path, s3://, gs://, az:// or abfss://)")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", KINDS)
def test_hidden_files_and_lost_found_count_as_empty(kind: str, tmp_path: Path, fake_server: FakeExportServer) -> None:
    needs(kind)
    place = tmp_path / "volume"
    (place / "lost+found").mkdir(parents=True)
    (place / ".DS_Store").write_text("")
    done = load(fake_server, f"{kind}:{place}", tmp_path)
    assert done.returncode == 0, done.stderr


def test_a_duckdb_file_whose_events_table_is_not_ours_is_refused_and_left_as_it_was(
    tmp_path: Path, fake_server: FakeExportServer
) -> None:
    import duckdb

    path = tmp_path / "theirs.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE events (a INTEGER)")
        con.execute("INSERT INTO events VALUES (1)")
    for args in (["run", "--base-url", fake_server.url, "--start", "2024-03-01T00", "--end", "2024-03-01T01",
                  "--no-progress"], ["status"], ["verify"], ["report"]):  # fmt: skip
        result = cli(*args, "--dest", f"duckdb:{path}", cwd=tmp_path)
        assert result.returncode == 4, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"error: {path} holds an events table that amplitude-export did not make (it has no uuid, _project, "
            "_upload_hour): name another file"]
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.execute("SHOW TABLES").fetchall() == [("events",)]
        assert con.execute("SELECT * FROM events").fetchall() == [(1,)]

"""A core install (no extras) runs every command: pandas is an extra that only `read_events` needs, and it says so.

The commands run as subprocesses in which pandas, and the packages the core no longer depends on, cannot be
imported (a meta-path finder installed by a `sitecustomize` on PYTHONPATH, so the worker processes a run spawns
are covered too), as in an environment where they are not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

NOT_INSTALLED = ("pandas", "altair", "vl_convert", "orjson")

SITECUSTOMIZE = f"""
import importlib.abc
import sys


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {NOT_INSTALLED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)


sys.meta_path.insert(0, NotInstalled())
"""


@pytest.fixture
def core_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env


def python(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_the_blocker_blocks(core_env: dict[str, str], tmp_path: Path) -> None:
    done = python("import pandas", core_env, tmp_path)
    assert done.returncode == 1 and "No module named 'pandas'" in done.stderr


def test_every_command_runs_without_pandas(core_env: dict[str, str], tmp_path: Path) -> None:
    """The README's first command (run into DuckDB, then the report), then status, verify and read_arrow."""
    cli = [sys.executable, "-c", "from amplitude_export.cli import main; main()"]
    data = tmp_path / "demo-data"
    dest = f"duckdb:{data / 'amplitude.duckdb'}"
    for args in (["demo", "--days", "2", "--data-dir", str(data), "--no-progress"],
                 ["status", "--dest", dest, "--project", "demo"],
                 ["verify", "--dest", dest, "--project", "demo"]):  # fmt: skip
        done = subprocess.run([*cli, *args], env=core_env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, (args, done.stdout + done.stderr)
    assert (data / "report.html").stat().st_size > 100_000
    done = python(f"import amplitude_export as ae; print(ae.read_arrow({dest!r}).num_rows)", core_env, tmp_path)
    assert done.returncode == 0 and int(done.stdout) > 1_000, done.stderr


def test_read_events_names_the_extra_when_pandas_is_missing(core_env: dict[str, str], tmp_path: Path) -> None:
    from amplitude_export.sinks.duckdb import DuckDBSink

    DuckDBSink(tmp_path / "x.duckdb").close()
    code = f"""
import amplitude_export
from amplitude_export.errors import UsageError
try:
    amplitude_export.read_events("duckdb:{tmp_path / 'x.duckdb'}")
except UsageError as exc:
    print(exc)
"""
    done = python(code, core_env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "read_events needs pandas: pip install 'amplitude-export[pandas]'"
    # with pandas installed, the same call gives a DataFrame
    code = f"""
import amplitude_export, pandas
print(isinstance(amplitude_export.read_events("duckdb:{tmp_path / 'x.duckdb'}"), pandas.DataFrame))
"""
    done = python(code, os.environ.copy(), tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr


def test_the_core_dependencies_are_those_the_architecture_lists() -> None:
    """A dependency added to (or dropped from) the core install is a decision docs/ARCHITECTURE.md states."""
    import re
    import tomllib

    root = Path(__file__).resolve().parents[1]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower() for requirement in declared}
    section = (root / "docs" / "ARCHITECTURE.md").read_text().partition("\n## Dependencies\n")[2]
    core = section.partition("Core: ")[2].partition("A fresh virtualenv")[0]
    listed = set(re.findall(r"`([a-z][a-z0-9-]*)` \(", core))
    assert listed == names
    assert not names & {"pandas", "orjson", "vl-convert-python", "altair"}

"""Shortcuts of the load path that only a whole run can show safe (the table in docs/PARSE_DESIGN.md names the
tests of the others): the CLI as a subprocess, on archives built here, into real DuckDB files."""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import subprocess
import sys
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import duckdb
from conftest import REAL_EVENTS
from test_fastparse import KEYS, TOKENS, _mutate

from amplitude_export import schema, synthetic
from amplitude_export.windows import Window

HOUR = datetime(2025, 7, 1, 10, tzinfo=UTC)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
    return subprocess.run([sys.executable, "-c", "from amplitude_export.cli import main; main()", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def land(data_dir: Path, lines: list[bytes]) -> None:
    """`lines` as one member of the hour's archive, landed as `extract` leaves it."""
    raw = data_dir / "raw"
    raw.mkdir(parents=True)
    with zipfile.ZipFile(raw / f"{Window(HOUR, HOUR).name}.zip", "w") as archive:
        archive.writestr(f"7/7_{HOUR:%Y-%m-%d_%-H}#0.json.gz", gzip.compress(b"\n".join(lines) + b"\n"))


def awkward_lines() -> list[bytes]:
    """Real lines, a varied synthetic hour, every awkward token in every JSON column and as an unknown key's
    value, and mutated lines: what the parsers must turn into valid JSON texts or reject."""
    rng = random.Random(20261204)
    pool = REAL_EVENTS.read_bytes().splitlines()
    pool += synthetic.encode_lines(synthetic.generate_hour(HOUR, project_id=7, seed=9, events=300, variation=0.3))
    lines = list(pool)
    for n, token in enumerate(TOKENS):
        for column in schema.JSON_COLUMNS:
            lines.append(b'{"uuid":"j%d-%s","%s":%s}' % (n, column.encode(), column.encode(), token))
        lines.append(b'{"uuid":"k%d","new_key":%s,"%s":%s}' % (n, token, rng.choice(KEYS).encode(), token))
    for n in range(2000):
        lines.append(_mutate(rng, rng.choice(pool)).replace(b'"uuid":"', b'"uuid":"m%d-' % n, 1))
    return lines


def test_every_json_text_duckdb_takes_unparsed_is_valid_json(tmp_path: Path) -> None:
    # JSON columns reach DuckDB labelled `arrow.json`, which it stores without parsing (a label on an invalid
    # text stores it as it is): only the parsers vouch for these texts, so every stored one must parse
    land(tmp_path / "data", awkward_lines())
    done = cli("load", "--data-dir", "data", "--dest", "duckdb:events.duckdb", "--api-key", "k", "--no-progress",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with duckdb.connect(str(tmp_path / "events.duckdb"), read_only=True) as con:
        for column in (*schema.JSON_COLUMNS, "_extra"):
            stored, invalid = con.execute(
                f'SELECT count("{column}"), count(*) FILTER (WHERE NOT json_valid("{column}")) FROM events'
            ).fetchone()
            assert stored > 0 and invalid == 0, (column, stored, invalid)
        assert con.execute("SELECT count(*) FROM events WHERE uuid LIKE 'j%'").fetchone()[0] > 0


def test_the_cli_ends_without_teardown_and_still_delivers_every_line(tmp_path: Path) -> None:
    # the CLI ends with os._exit once the command has returned: what it printed and logged must all be out,
    # and what it committed must be in the file
    land(tmp_path / "data", REAL_EVENTS.read_bytes().splitlines())
    dest = "duckdb:events.duckdb"
    done = cli("load", "--data-dir", "data", "--log-dir", "logs", "--dest", dest, "--api-key", "k",
               "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    status = cli("status", "--dest", dest, "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    hours = json.loads(status.stdout)  # the whole document, flushed before the process ended
    assert hours, status.stdout
    (log,) = (tmp_path / "logs").glob("*.log")
    assert log.read_text().endswith("\n") and "loaded" in log.read_text().splitlines()[-1], log.read_text()
    with duckdb.connect(str(tmp_path / "events.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM events").fetchone()[0] == len(REAL_EVENTS.read_bytes().splitlines())


def test_reloads_with_vacuum_off_reuse_the_space_of_the_rows_they_replace(tmp_path: Path) -> None:
    # the loading connection never vacuums (it would rewrite row groups at every checkpoint): the rows a reload
    # deletes must still leave space that later loads reuse, or every reload would grow the file by a window
    land(tmp_path / "data", synthetic.encode_lines(synthetic.generate_hour(HOUR, project_id=7, seed=3, events=5000)))
    sizes = []
    for again in ([], ["--refresh"], ["--refresh"], ["--refresh"]):
        done = cli("load", "--data-dir", "data", "--dest", "duckdb:events.duckdb", "--api-key", "k",
                   "--no-progress", *again, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        sizes.append((tmp_path / "events.duckdb").stat().st_size)
    assert sizes[-1] <= 2.5 * sizes[0], sizes  # three reloads: at most one replaced copy's space on top


def test_every_test_the_speed_table_names_exists() -> None:
    # docs/PARSE_DESIGN.md answers "what shows this shortcut safe" with test names: they must not rot
    table = (Path(__file__).parents[1] / "docs" / "PARSE_DESIGN.md").read_text()
    named = set(re.findall(r"(test_\w+\.py)::(test_\w+)", table))
    assert len(named) >= 20
    for file, test in named:
        source = (Path(__file__).parent / file).read_text()
        assert re.search(rf"^def {test}\(", source, re.M), f"{file}::{test} is named in PARSE_DESIGN.md"

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
import threading
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest
from conftest import API_KEY, DAY, REAL_EVENTS, SECRET_KEY, destination_url
from test_fastparse import KEYS, TOKENS, _mutate

from amplitude_export import schema, synthetic
from amplitude_export.fake_server import FakeExportServer
from amplitude_export.sinks.postgres import on_this_machine
from amplitude_export.threads import BACKGROUND_NICE
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


def _watch_parse_threads(stop: threading.Event, seen: dict[str, set[int]]) -> None:
    """Every parse thread alive until `stop`, by name, with each nice value it was seen at (Linux: per thread)."""
    while not stop.is_set():
        for thread in threading.enumerate():
            if thread.name.startswith("amplitude-export-parse") and thread.native_id is not None:
                try:
                    stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
                except OSError:
                    continue  # it ended
                seen.setdefault(thread.name, set()).add(int(stat.rsplit(")", 1)[1].split()[16]))
        time.sleep(0.002)


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value is Linux's")
@pytest.mark.parametrize("kind", ["postgres", "duckdb"])
def test_only_a_load_into_a_server_on_this_machine_parses_on_one_thread_that_gives_way(
    kind: str, tmp_path: Path, pg_schema: str
) -> None:
    # the local PostgreSQL server's backend sets the pace: the load parses on one thread at a lower priority,
    # and the caller's own thread keeps its priority; DuckDB works in this process, so its parse threads don't
    import amplitude_export

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    stop, seen = threading.Event(), {}
    watcher = threading.Thread(target=_watch_parse_threads, args=(stop, seen))
    watcher.start()
    try:
        with FakeExportServer(api_key=API_KEY, secret_key=SECRET_KEY, events_per_hour=2000, data_start=DAY,
                              data_end=DAY.replace(hour=5), members_per_hour=2) as server:  # fmt: skip
            result = amplitude_export.run(
                destination_url(kind, tmp_path, pg_schema), start=DAY, end=DAY.replace(hour=5), window_hours=6,
                base_url=server.url, api_key=API_KEY, secret_key=SECRET_KEY, data_dir=tmp_path / "data", lag_hours=0,
            )  # fmt: skip
    finally:
        stop.set()
        watcher.join()
    assert result.exit_code == 0 and result.events is not None and result.events.events > 11_000
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
    lowered = min(mine + BACKGROUND_NICE, 19)  # the kernel's lowest priority caps it
    if kind == "postgres":
        assert set(seen) == {"amplitude-export-parse-0"} and seen["amplitude-export-parse-0"] <= {
            mine, lowered} and lowered in seen["amplitude-export-parse-0"]
    else:
        assert len(seen) == 2 and all(nice == {mine} for nice in seen.values()), seen


@pytest.mark.parametrize(("host", "hostaddr", "here"), [
    ("127.0.0.1", "127.0.0.1", True), ("localhost", "::1", True), ("/var/run/postgresql", "", True),
    ("db.internal", "10.0.4.7", False), ("203.0.113.9", "203.0.113.9", False), ("db.internal", "", False),
])
def test_a_server_counts_as_on_this_machine_only_over_a_socket_or_loopback(host: str, hostaddr: str,
                                                                          here: bool) -> None:
    assert on_this_machine(host, hostaddr) is here

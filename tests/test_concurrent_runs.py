"""Two real `run` processes on one destination: one writer at a time, whenever the second one starts.

The first run loads 2024-03-01..02, the second 2024-03-02..03 (they overlap on the 2nd), both in 6-hour windows
from a fake server paced like a network, into the same destination and data directory. The second starts at
stepped moments of the first one's life: together with it, and after each of its windows (so between windows
too). Each run must either complete (exit 0) or be refused (exit 5, naming --wait); with --wait it must queue and
complete. Afterwards the destination holds exactly the fake server's events of the ranges that completed, each
once, and `verify` finds it complete. Runs on DuckDB, Parquet and the real PostgreSQL, whose runs take turns
(a lock held for the whole run), and on Iceberg and Delta, whose runs may both write, one commit at a time (the
format refuses a commit made on an older version, and the window is computed again): their commits may
interleave, but no committed window is lost and no event is stored twice.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import POSTGRES_URL

from amplitude_export import read_arrow
from amplitude_export.fake_server import FakeExportServer
from amplitude_export.ledger import LOADED
from amplitude_export.sinks import open_sink
from amplitude_export.verify import verify
from amplitude_export.windows import HOUR

FIRST = ("2024-03-01", "2024-03-02")
SECOND = ("2024-03-02", "2024-03-03")
# small windows, so the second run can start between windows; windows of over 61,440 events (DuckDB's row
# group here: e.g. AMP_CONCURRENCY_EVENTS=5500 AMP_CONCURRENCY_WINDOW_HOURS=12) make interleaved DuckDB writers
# corrupt the file rather than only interleave, but take minutes
WINDOW_HOURS = int(os.environ.get("AMP_CONCURRENCY_WINDOW_HOURS", 6))
EVENTS_PER_HOUR = int(os.environ.get("AMP_CONCURRENCY_EVENTS", 40))
WINDOWS = 48 // WINDOW_HOURS  # per run: two days
WINDOW_DONE = re.compile(r"\[(\d+)/\d+\]")  # the progress line the log gets for each window
ENV = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}


def _day(text: str, hour: int = 0) -> datetime:
    return datetime.fromisoformat(text).replace(hour=hour, tzinfo=UTC)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeExportServer]:
    """Three days of 40 events an hour; an archive of 6 hours (~100 KB) takes ~0.2 s to arrive."""
    with FakeExportServer(events_per_hour=EVENTS_PER_HOUR, data_start=_day(FIRST[0]), data_end=_day(SECOND[1], 23),
                          bytes_per_second=500_000) as srv:
        srv.window_members(_day(FIRST[0]), _day(SECOND[1], 23))  # build the members once, before any timing
        yield srv


# the CLI, imported and waiting for a line on stdin: a run starts within milliseconds of its cue, not after the
# second or so an interpreter takes to import everything, so the offsets below are offsets of the runs themselves
READY_RUN = """import sys
from amplitude_export.cli import cli, main  # `cli`: the group with every command, imported now
import amplitude_export.pipeline, amplitude_export.reader, amplitude_export.sinks.{module}
sys.stdin.readline()
main()
"""
TABLE_FORMATS = ("iceberg", "delta")  # no run-long lock: their commits serialise the writers
RETRIED = "another writer committed first"  # what their log says when a commit lost the race


def ready_run(server: FakeExportServer, dest: str, cwd: Path, days: tuple[str, str], name: str,
              *, wait: bool = False, window_hours: int = WINDOW_HOURS) -> subprocess.Popen[str]:
    """A `run` process that starts when `go` cues it."""
    args = ["run", "--base-url", server.url, "--api-key", server.api_key, "--secret-key", "demo-secret",
            "--start", days[0], "--end", days[1], "--window-hours", str(window_hours), "--dest", dest,
            "--no-progress", "--log-dir", f"logs-{name}", *(["--wait"] if wait else [])]
    module = "postgres" if dest.startswith("postgresql:") else dest.split(":", 1)[0]
    return subprocess.Popen([sys.executable, "-c", READY_RUN.format(module=module), *args], cwd=cwd, env=ENV,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def go(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.write("go\n")
    process.stdin.flush()


def windows_done(log_dir: Path) -> int:
    """How many windows the run logging into `log_dir` has finished (0 before its log exists)."""
    done = 0
    for log in log_dir.glob("*.log"):
        for found in WINDOW_DONE.findall(log.read_text(errors="replace")):
            done = max(done, int(found))
    return done


def wait_for_windows(first: subprocess.Popen[str], log_dir: Path, count: int, timeout: float = 60) -> None:
    """Return once the run has finished `count` windows (or has exited)."""
    deadline = time.monotonic() + timeout
    while windows_done(log_dir) < count and first.poll() is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"the first run did not finish {count} windows in {timeout} s")
        time.sleep(0.005)


def hours_of(days: tuple[str, str]) -> list[datetime]:
    hour, last, hours = _day(days[0]), _day(days[1], 23), []
    while hour <= last:
        hours.append(hour)
        hour += HOUR
    return hours


def trial(server: FakeExportServer, dest: str, cwd: Path, after: int, delay: float, wait: bool) -> str:
    """One trial; returns what happened, e.g. `after 3 windows +0.05 s --wait: exits [0, 0]`."""
    first = ready_run(server, dest, cwd, FIRST, "first")
    second = ready_run(server, dest, cwd, SECOND, "second", wait=wait)
    go(first)
    wait_for_windows(first, cwd / "logs-first", after)
    time.sleep(delay)
    go(second)
    summary = f"after {after} windows +{delay:.2f} s{' --wait' if wait else ''}"
    outcomes, errors = [], []
    for process in (first, second):
        out, err = process.communicate(timeout=120)
        outcomes.append(process.returncode)
        errors.append(" | ".join(line for line in err.splitlines() if line.startswith(("error:", "Traceback"))
                                 or "Error" in line)[-300:])
    summary += f": exits {outcomes}"

    table_format = dest.startswith(TABLE_FORMATS)
    sink = open_sink(dest, read_only=True)
    try:
        ledger = sink.ledger(server.api_key)
        checked = verify(sink, server.api_key)  # what `verify` runs (its exit code is tested in test_cli)
    finally:
        sink.close()
    completed = [days for days, code in zip((FIRST, SECOND), outcomes, strict=True) if code == 0]
    hours = sorted({hour for days in completed for hour in hours_of(days)})
    if table_format:  # a run that lost its commits too often stops, keeping the windows it committed before
        hours = sorted({*hours, *(hour for hour, record in ledger.items() if record.status == LOADED)})
    expected = {uuid for hour in hours for uuid in server.expected_uuids(hour, hour)}
    table = read_arrow(dest, project=server.api_key)
    uuids = table.column("uuid").to_pylist()
    assert len(uuids) == len(set(uuids)), f"{summary}: {len(uuids) - len(set(uuids))} duplicated rows"
    assert set(uuids) == expected, (
        f"{summary}: {len(expected - set(uuids))} events lost, {len(set(uuids) - expected)} unexpected")
    assert checked.complete, f"{summary}: verify finds {[problem.detail for problem in checked.problems][:3]}"
    missing = [hour for hour in hours if hour not in ledger or ledger[hour].status != LOADED]
    assert not missing, f"{summary}: {len(missing)} hours missing from the ledger, from {missing[0]:%Y-%m-%dT%H}"
    spans: dict[str, list[datetime]] = {}  # each run's first and last commit, from the ledger rows it left
    for record in ledger.values():
        assert record.run_id is not None and record.updated_at is not None
        span = spans.setdefault(record.run_id, [record.updated_at, record.updated_at])
        span[0], span[1] = min(span[0], record.updated_at), max(span[1], record.updated_at)
    ordered = sorted(spans.values())
    assert table_format or all(one[1] < other[0] for one, other in itertools.pairwise(ordered)), (
        f"{summary}: the two runs committed windows in turns, so both wrote at once")
    if any(RETRIED in log.read_text(errors="replace") for log in cwd.glob("logs-*/*.log")):
        summary += ", a commit refused and made again"
    for code, error in zip(outcomes, errors, strict=True):
        assert code in (0, 5), f"{summary}: {error}"
        if code == 5:
            needle = "run again" if table_format else "--wait"
            assert needle in error, f"{summary}: the refusal does not name {needle}: {error}"
    assert table_format or not (wait and outcomes[1] == 5), f"{summary}: --wait must queue, not refuse"
    if after and not table_format:  # there, either run may lose 8 commits in a row to the other and stop
        assert outcomes[0] == 0, f"{summary}: the first run had the destination alone and must complete"

    return summary


@pytest.fixture
def schemas() -> Iterator[list[str]]:
    """PostgreSQL schemas the test names (one per trial), dropped afterwards."""
    import psycopg

    names: list[str] = []
    yield names
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def dest_for(kind: str, cwd: Path, schemas: list[str]) -> str:
    """The --dest of a trial in `cwd` (a PostgreSQL schema is named in `schemas`, to be dropped)."""
    if kind == "postgres":
        schemas.append(f"amp_test_{uuid.uuid4().hex[:12]}")
        return f"{POSTGRES_URL}?schema={schemas[-1]}"
    return {"duckdb": f"duckdb:{cwd / 'events.duckdb'}", "parquet": f"parquet:{cwd / 'dataset'}",
            "iceberg": f"iceberg:{cwd / 'warehouse'}", "delta": f"delta:{cwd / 'lake' / 'events'}"}[kind]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["duckdb", "parquet", "postgres", *TABLE_FORMATS])
def test_two_runs_on_one_destination_never_lose_or_duplicate_a_row(
    kind: str, server: FakeExportServer, tmp_path: Path, schemas: list[str]
) -> None:
    rng = random.Random(os.environ.get("AMP_CONCURRENCY_SEED", kind))
    trials = []
    for number, after in enumerate(range(WINDOWS)):  # 0: together; k: once the first run finished k windows
        cwd = tmp_path / f"trial-{number}"
        cwd.mkdir()
        trials.append((dest_for(kind, cwd, schemas), cwd, after, rng.uniform(0, 0.2), number % 2 == 1))

    def attempt(number: int) -> str:
        try:
            return f"trial {number}: ok, " + trial(server, *trials[number])
        except Exception as exc:  # noqa: BLE001 - every trial runs; the failures are listed together
            return f"trial {number}: FAILED, {type(exc).__name__}: {str(exc).splitlines()[0]}"

    # a few trials at a time, each on its own destination: the runs mostly wait for the paced server
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(attempt, range(len(trials))))
    print("\n".join(results))
    failures = [result for result in results if ": FAILED, " in result]
    assert not failures, f"{len(failures)} of {len(trials)} trials went wrong:\n" + "\n".join(failures)
    if kind in TABLE_FORMATS:  # the runs did write at once, or nothing above tested the format's commit check
        assert any(result.endswith("made again") for result in results)


SAME = ("2024-03-01", "2024-03-03")


@pytest.mark.slow
@pytest.mark.parametrize("kind", TABLE_FORMATS)
def test_the_same_run_twice_at_once_on_one_table_both_complete(kind: str, tmp_path: Path) -> None:
    """Two schedules that overlap: the same range into the same table, started together, each with its own data
    dir, once both with --wait and once without (a table format has no lock: --wait changes nothing). Both must
    exit 0, and the table hold each of the server's uuids once. Before Iceberg left alone a window that the other
    run had loaded from the same data meanwhile, the run that fell behind lost 8 commits in a row to the one ahead
    and exited 5 (in the first pair here, and in 5 of 5 trials of 5 days)."""
    with FakeExportServer(events_per_hour=200, data_start=_day(SAME[0]), data_end=_day(SAME[1], 23)) as server:

        def pair(wait: bool) -> str:
            """The two runs on a new table: their exits and error lines, then what the table holds."""
            cwd = tmp_path / ("wait" if wait else "no-wait")
            dest = dest_for(kind, cwd, [])
            runs = []
            for name in ("a", "b"):
                (cwd / name).mkdir(parents=True)
                runs.append(ready_run(server, dest, cwd / name, SAME, name, wait=wait, window_hours=4))
            for run in runs:
                go(run)
            with ThreadPoolExecutor(max_workers=2) as pool:  # both pipes drained at once: neither run stalls
                ends = list(pool.map(lambda run: run.communicate(timeout=300), runs))
            said = [" | ".join(line for line in err.splitlines() if line.startswith("error:")) for _, err in ends]
            uuids = read_arrow(dest, project=server.api_key).column("uuid").to_pylist()
            with open_sink(dest, read_only=True) as sink:
                complete = verify(sink, server.api_key).complete
            exact = len(uuids) == len(set(uuids)) and set(uuids) == server.expected_uuids(_day(SAME[0]),
                                                                                           _day(SAME[1], 23))
            return f"exits {[run.returncode for run in runs]} {said}, rows exact: {exact}, verified: {complete}"

        for wait in (True, False):
            assert pair(wait) == "exits [0, 0] ['', ''], rows exact: True, verified: True", f"--wait: {wait}"

"""Faults an operator meets, through the CLI as a subprocess against the fake server on loopback: a full disk and
other files that cannot be written (exit 4), a wrong base URL and 404s that must not be trusted blindly, a stalled
download, bad input that must leave nothing behind, and messages that tell the truth."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest
from test_cli import SECRET, run_cli

from amplitude_export.fake_server import FakeExportServer

DAY = datetime(2024, 3, 1, tzinfo=UTC)
KEYS = ["--api-key", "demo-key", "--secret-key", "demo-secret"]


def _mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tmpfs of `size` on `path`; the reason it cannot be done, or None."""
    if os.geteuid() != 0:
        return "mounting a small tmpfs needs root"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else f"mount -t tmpfs failed: {done.stderr.strip()}"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MB filesystem (tmpfs), unmounted afterwards; skipped, saying why, where it cannot be mounted."""
    path = tmp_path / "small"
    reason = _mount_tmpfs(path, "2m")
    if reason:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> None:
    """Write a file until the filesystem is full."""
    with open(disk / "filler", "wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 65536)
            out.flush()


def one_day_of(events_per_hour: int) -> list[str]:
    """The uuids the fake server serves for 2024-03-01 (a few lines repeat a uuid, as Amplitude's do)."""
    return sorted(FakeExportServer(events_per_hour=events_per_hour).expected_uuids(DAY, DAY.replace(hour=23)))


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def only_log(log_dir: Path) -> str:
    (path,) = log_dir.glob("*.log")
    return path.read_text()


def uuids(database: Path) -> list[str]:
    with duckdb.connect(str(database), read_only=True) as con:
        return [row[0] for row in con.execute("SELECT uuid FROM events").fetchall()]


# -- item 2: a full disk, and any other file that cannot be written: one line, in the log, exit 4 ----------------


@pytest.mark.parametrize("command", ["run", "extract"])
def test_a_full_disk_while_downloading_is_one_line_in_the_log_exit_4_and_no_part_file(
    tmp_path: Path, small_disk: Path, command: str
) -> None:
    with FakeExportServer(events_per_hour=1000) as server:  # a day's zip is ~8.7 MB: the 2 MB disk fills
        args = [command, "--base-url", server.url, *KEYS, "--start", "2024-03-01", "--end", "2024-03-01",
                "--data-dir", str(small_disk), "--log-dir", str(tmp_path / "logs"), "--no-progress"]
        if command == "run":
            args += ["--dest", f"duckdb:{tmp_path / 'x.duckdb'}"]
        result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 4, result.stderr
    (line,) = error_lines(result)
    assert "no space left" in line and str(small_disk / "raw" / "20240301T00_20240301T23.zip.") in line, line
    assert ".part" in line, line
    assert "Traceback" not in result.stderr
    assert not list(small_disk.rglob("*.part")) and not list(small_disk.rglob("*.zip"))
    assert line.removeprefix("error: ") in only_log(tmp_path / "logs")


def test_a_log_that_cannot_be_written_exits_4_and_the_data_is_still_whole(tmp_path: Path, small_disk: Path) -> None:
    fill(small_disk)
    database = tmp_path / "x.duckdb"
    with FakeExportServer(events_per_hour=20) as server:
        result = run_cli("run", "--base-url", server.url, *KEYS, "--start", "2024-03-01", "--end", "2024-03-01",
                         "--data-dir", str(tmp_path / "data"), "--log-dir", str(small_disk), "--no-progress",
                         "--dest", f"duckdb:{database}", cwd=tmp_path)
        expected = server.expected_uuids(DAY, DAY.replace(hour=23))
    assert result.returncode == 4, result.stderr
    (line,) = error_lines(result)
    assert "no space left" in line and str(small_disk) in line and ".log" in line, line
    assert "Traceback" not in result.stderr and "Logging error" not in result.stderr
    assert sorted(uuids(database)) == sorted(expected)


@pytest.mark.parametrize("scheme", ["duckdb", "parquet"])
def test_a_full_destination_is_one_line_in_the_log_and_exit_4(tmp_path: Path, small_disk: Path,
                                                                scheme: str) -> None:
    dest = f"{scheme}:{small_disk / 'dest'}"
    with FakeExportServer(events_per_hour=1000) as server:
        result = run_cli("run", "--base-url", server.url, *KEYS, "--start", "2024-03-01", "--end", "2024-03-01",
                         "--data-dir", str(tmp_path / "data"), "--log-dir", str(tmp_path / "logs"),
                         "--no-progress", "--dest", dest, cwd=tmp_path)
    assert result.returncode == 4, result.stderr
    (line,) = error_lines(result)
    assert "no space left" in line.lower() and str(small_disk / "dest") in line, line
    assert "Traceback" not in result.stderr
    assert line.removeprefix("error: ") in only_log(tmp_path / "logs")


def test_a_reject_file_that_cannot_be_written_exits_4_naming_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "rejects").write_text("a file where the rejects directory should be\n")
    database = tmp_path / "x.duckdb"
    with FakeExportServer(events_per_hour=20, malformed_lines=True) as server:
        result = run_cli("run", "--base-url", server.url, *KEYS, "--start", "2024-03-01", "--end", "2024-03-01",
                         "--data-dir", str(data), "--no-progress", "--dest", f"duckdb:{database}", cwd=tmp_path)
    assert result.returncode == 4, result.stderr
    (line,) = error_lines(result)
    assert str(data / "rejects" / "20240301T00_20240301T23.jsonl") in line, line
    assert "Traceback" not in result.stderr
    assert line.removeprefix("error: ") in only_log(tmp_path / "logs")
    assert uuids(database) == []  # the window's transaction was rolled back


# -- item 3: a base URL with a path is refused; a 404 is recorded, re-asked, counted and never trusted over rows ---


@pytest.mark.parametrize("where", ["flag", "env"])
def test_a_base_url_with_the_export_path_is_refused_with_one_line(tmp_path: Path, where: str) -> None:
    url = "http://127.0.0.1:9/api/2/export"
    args = ["--base-url", url] if where == "flag" else []
    env = {"AMP_BASE_URL": url} if where == "env" else {}
    result = run_cli("run", *KEYS, *args, "--start", "2024-03-01", "--end", "2024-03-01", cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    (line,) = error_lines(result)
    assert ("--base-url" if where == "flag" else "AMP_BASE_URL") in line and "http://127.0.0.1:9" in line, line
    assert "/api/2/export" in line


def test_a_base_url_with_credentials_is_refused_without_printing_them(tmp_path: Path) -> None:
    result = run_cli("run", *KEYS, "--base-url", f"http://me:{SECRET}@127.0.0.1:9", "--start", "2024-03-01",
                     cwd=tmp_path)
    assert result.returncode == 2 and SECRET not in result.stderr + result.stdout, result.stderr
    assert error_lines(result) == ["error: --base-url must not carry credentials: give http://127.0.0.1:9 and set "
                                   "AMP_API_KEY and AMP_SECRET_KEY"]


def test_the_url_the_fake_server_prints_is_the_one_the_tool_takes(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
    server = subprocess.Popen(
        [sys.executable, "-c", "from amplitude_export.cli import main; main()", "fake-server", "--port", "0",
         "--events-per-hour", "5"], cwd=tmp_path, env=base, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        url = next(match.group(1) for line in server.stderr
                   if (match := re.search(r"fake Export API on (\S+)", line)))
        result = run_cli("run", "--base-url", url, *KEYS, "--start", "2024-03-01", "--end", "2024-03-01",
                         "--no-progress", cwd=tmp_path)
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert result.returncode == 0, result.stderr
    assert sorted(uuids(tmp_path / "data" / "amplitude.duckdb")) == one_day_of(5)


def test_a_trailing_slash_is_accepted(tmp_path: Path) -> None:
    with FakeExportServer(events_per_hour=5) as server:
        result = run_cli("run", "--base-url", server.url + "/", *KEYS, "--start", "2024-03-01", "--end",
                         "2024-03-01", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(uuids(tmp_path / "data" / "amplitude.duckdb")) == one_day_of(5)


def test_hours_that_answered_404_are_counted_and_asked_again_within_the_lookback(tmp_path: Path) -> None:
    with FakeExportServer(events_per_hour=5, data_start=datetime(2024, 3, 2, tzinfo=UTC)) as server:
        first = run_cli("run", "--base-url", server.url, *KEYS, "--start", "2024-03-01", "--end", "2024-03-01",
                        "--no-progress", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    status = run_cli("status", cwd=tmp_path)
    assert status.returncode == 0 and "24 empty" in status.stdout, status.stdout
    verify = run_cli("verify", cwd=tmp_path)
    assert verify.returncode == 0 and "0 loaded, 24 empty" in verify.stdout, verify.stdout
    verify_json = json.loads(run_cli("verify", "--json", cwd=tmp_path).stdout)
    assert verify_json["hours_empty"] == 24 and verify_json["hours_loaded"] == 0 and verify_json["complete"]
    # Amplitude later has data for those hours: an incremental run re-asks the empty hours in its lookback
    with FakeExportServer(events_per_hour=5) as server:
        again = run_cli("run", "--base-url", server.url, *KEYS, "--end", "2024-03-01", "--no-progress", cwd=tmp_path)
        expected = server.expected_uuids(DAY, DAY.replace(hour=23))
    assert again.returncode == 0, again.stderr
    assert sorted(uuids(tmp_path / "data" / "amplitude.duckdb")) == sorted(expected)
    verify = run_cli("verify", cwd=tmp_path)
    assert verify.returncode == 0 and "24 loaded, 0 empty" in verify.stdout, verify.stdout


def test_a_404_for_hours_loaded_with_events_warns_loudly_and_keeps_the_rows(tmp_path: Path) -> None:
    database = tmp_path / "data" / "amplitude.duckdb"
    with FakeExportServer(events_per_hour=5) as server:
        loaded = run_cli("run", "--base-url", server.url, *KEYS, "--start", "2024-03-01", "--end", "2024-03-01",
                         "--no-keep-raw", "--no-progress", cwd=tmp_path)  # so that --refresh asks the server
    assert loaded.returncode == 0, loaded.stderr
    before = sorted(uuids(database))
    assert before == one_day_of(5)
    with FakeExportServer(events_per_hour=5, data_start=datetime(2024, 3, 2, tzinfo=UTC)) as server:
        for extra in (["--end", "2024-03-01"],  # the lookback re-checks the day
                      ["--start", "2024-03-01", "--end", "2024-03-01", "--refresh"]):
            for log in (tmp_path / "logs").glob("*.log"):
                log.unlink()
            result = run_cli("run", "--base-url", server.url, *KEYS, *extra, "--no-progress", cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING") and "404" in line]
            assert warnings, result.stderr
            assert "2024-03-01T00..2024-03-01T23" in warnings[0] and f"{len(before)} events" in warnings[0]
            assert "404" in result.stdout  # and in the run's summary
            if "--refresh" not in extra:  # the lookback does not call the hours it could not compare unchanged
                assert "lookback: 24 hours re-checked could not be compared (above)" in result.stdout, result.stdout
            assert "2024-03-01T00..2024-03-01T23" in only_log(tmp_path / "logs")
            assert sorted(uuids(database)) == before
            verify = run_cli("verify", cwd=tmp_path)
            assert verify.returncode == 0 and "24 loaded, 0 empty" in verify.stdout, verify.stdout


# -- item 4: a stalled body is given up after the idle-read timeout and retried --------------------------------


def test_a_stalled_download_times_out_and_is_retried(tmp_path: Path) -> None:
    with FakeExportServer(events_per_hour=200, faults=["stall"], slow_seconds=600) as server:
        result = run_cli("run", "--base-url", server.url, *KEYS, "--start", "2024-03-01", "--end", "2024-03-01",
                         "--read-timeout", "1", "--retry-wait", "0.01", "--no-progress", cwd=tmp_path, timeout=120)
        expected = server.expected_uuids(DAY, DAY.replace(hour=23))
        statuses = [status for _, _, status in server.requests]
    assert result.returncode == 0, result.stderr
    assert statuses == [200, 200]  # the stalled answer, then the retry
    assert "no data for 1 s" in only_log(tmp_path / "logs")
    assert sorted(uuids(tmp_path / "data" / "amplitude.duckdb")) == sorted(expected)


def test_the_library_takes_the_read_timeout_too(tmp_path: Path) -> None:
    import stamina

    from amplitude_export.client import OK, ExportClient
    from amplitude_export.config import Credentials, Secret
    from amplitude_export.windows import Window

    with pytest.raises(ValueError, match="read_timeout"):
        ExportClient(Credentials("k", Secret("s"), "us", "http://127.0.0.1:9"), read_timeout=0)
    with stamina.set_testing(True, attempts=3), FakeExportServer(events_per_hour=200, faults=["stall"],
                                                                  slow_seconds=600) as server:
        credentials = Credentials(server.api_key, Secret("demo-secret"), "us", server.url)
        with ExportClient(credentials, read_timeout=0.5) as client:
            download = client.fetch(Window(DAY, DAY.replace(hour=23)), tmp_path)
    assert download.status == OK and download.attempts == 2
    assert not list(tmp_path.glob("*.part"))


def test_the_read_timeout_defaults_to_a_minute() -> None:
    from click.testing import CliRunner

    from amplitude_export.cli import cli

    for command in ("run", "extract"):
        out = CliRunner().invoke(cli, [command, "--help"], terminal_width=200).output
        assert re.search(r"--read-timeout\s+SECONDS\s.*\[default: 60", out), out


# -- item 6: input refused with exit 2 leaves nothing behind ----------------------------------------------------


BAD_INPUT = {
    "bad date": ["run", *KEYS, "--base-url", "http://127.0.0.1:9", "--start", "2024-13-01"],
    "end before start": ["run", *KEYS, "--base-url", "http://127.0.0.1:9", "--start", "2024-03-02", "--end",
                         "2024-03-01"],
    "bad end alone": ["run", *KEYS, "--base-url", "http://127.0.0.1:9", "--end", "soon"],
    "missing credentials": ["run", "--start", "2024-03-01"],
    "bad base url": ["run", *KEYS, "--base-url", "http://127.0.0.1:9/api/2/export", "--start", "2024-03-01"],
    "bad destination": ["run", *KEYS, "--base-url", "http://127.0.0.1:9", "--start", "2024-03-01", "--end",
                        "2024-03-01", "--dest", "mysql://x/y"],
    "schema on duckdb": ["run", *KEYS, "--base-url", "http://127.0.0.1:9", "--start", "2024-03-01", "--schema",
                         "s"],
    "no window hours": ["run", *KEYS, "--base-url", "http://127.0.0.1:9", "--start", "2024-03-01",
                        "--window-hours", "0"],
    "extract bad date": ["extract", *KEYS, "--base-url", "http://127.0.0.1:9", "--start", "yesterday"],
    "extract no credentials": ["extract", "--start", "2024-03-01"],
    "load bad destination": ["load", "--dest", "mysql://x/y"],
}


@pytest.mark.parametrize("args", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_input_refused_with_exit_2_creates_nothing(tmp_path: Path, args: list[str]) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = run_cli(*args, cwd=cwd)
    assert result.returncode == 2, result.stderr
    assert len(error_lines(result)) == 1 and "Traceback" not in result.stderr
    assert sorted(p.name for p in cwd.rglob("*")) == []


# -- item 7: messages that tell the truth -----------------------------------------------------------------------


def test_a_400_quotes_the_server(tmp_path: Path) -> None:
    with FakeExportServer(events_per_hour=50, max_archive_bytes=2000) as server:  # every hour is "too large"
        result = run_cli("run", "--base-url", server.url, *KEYS, "--start", "2024-03-01T00", "--end",
                         "2024-03-01T01", "--no-progress", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2 and all("The file size of the exported data is too large" in f for f in failed), \
        result.stdout
    assert "over 4 GB" not in result.stdout + result.stderr


def test_an_auth_error_on_a_custom_host_does_not_call_it_the_us_host(tmp_path: Path) -> None:
    with FakeExportServer(secret_key="the-right-one") as server:
        url = server.url
        result = run_cli("run", "--base-url", url, "--api-key", server.api_key, "--secret-key", SECRET,
                         "--start", "2024-03-01", "--end", "2024-03-01", "--no-progress", cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    (line,) = error_lines(result)
    assert "US host" not in line and url in line and "region" not in line, line
    assert SECRET not in result.stderr + result.stdout + only_log(tmp_path / "logs")


def test_a_busy_destination_says_wait(tmp_path: Path) -> None:
    with FakeExportServer(events_per_hour=5, faults=["slow"] * 20, slow_seconds=60) as server:
        args = ["run", "--base-url", server.url, *KEYS, "--start", "2024-03-01", "--end", "2024-03-01",
                "--no-progress"]
        base = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
        first = subprocess.Popen([sys.executable, "-c", "from amplitude_export.cli import main; main()", *args],
                                 cwd=tmp_path, env=base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not list(tmp_path.glob("logs/*.log")) and time.monotonic() < deadline:  # it has started
                time.sleep(0.05)
            while time.monotonic() < deadline:
                second = run_cli(*args, cwd=tmp_path)
                if second.returncode == 5:
                    break
                time.sleep(0.2)
        finally:
            first.kill()
            first.wait(timeout=10)
    assert second.returncode == 5, second.stderr
    (line,) = error_lines(second)
    assert "--wait" in line, line


def test_a_table_format_that_keeps_losing_commits_does_not_say_wait() -> None:
    """Iceberg and Delta take no lock, so --wait would queue behind nothing: their lost commit races (exit 5) say
    `run again` alone, while a held lock still names --wait."""
    import click

    from amplitude_export.cli.app import _message
    from amplitude_export.cli.commands import run
    from amplitude_export.errors import CommitConflictError, DestinationBusyError

    with click.Context(run):
        assert _message(CommitConflictError("iceberg:wh: 8 commits in a row lost; run again")).endswith("run again")
        assert _message(DestinationBusyError("x is busy")).endswith("; pass --wait to queue behind it")


def _gap(tmp_path: Path) -> None:
    """Load 2024-03-01 and 2024-03-05 only: 72 hours missing between them."""
    with FakeExportServer(events_per_hour=5) as server:
        for day in ("2024-03-01", "2024-03-05"):
            result = run_cli("run", "--base-url", server.url, *KEYS, "--start", day, "--end", day, "--no-progress",
                             cwd=tmp_path)
            assert result.returncode == 0, result.stderr


def test_verify_summarises_runs_of_missing_hours_and_lists_them_in_json(tmp_path: Path) -> None:
    _gap(tmp_path)
    result = run_cli("verify", cwd=tmp_path)
    assert result.returncode == 1
    missing = [line for line in result.stdout.splitlines() if "missing" in line]
    assert len(missing) == 1 and "2024-03-02T00..2024-03-04T23" in missing[0] and "72 hours" in missing[0], \
        result.stdout
    data = json.loads(run_cli("verify", "--json", cwd=tmp_path).stdout)
    assert not data["complete"] and data["hours_checked"] == 5 * 24
    assert [p["hour"] for p in data["problems"]] == [f"2024-03-0{d}T{h:02d}" for d in (2, 3, 4) for h in range(24)]
    assert {p["kind"] for p in data["problems"]} == {"missing"}
    assert data["summary"] == [{"start": "2024-03-02T00", "end": "2024-03-04T23", "hours": 72, "kind": "missing",
                                "detail": data["problems"][0]["detail"]}]


def test_status_summarises_runs_of_days(tmp_path: Path) -> None:
    with FakeExportServer(events_per_hour=5) as server:
        result = run_cli("run", "--base-url", server.url, *KEYS, "--start", "2024-03-01", "--end", "2024-03-03",
                         "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    status = run_cli("status", cwd=tmp_path)
    rows = [line for line in status.stdout.splitlines() if line.startswith("│") and "loaded" in line]
    assert len(rows) == 1 and "2024-03-01T00" in rows[0] and "2024-03-03T23" in rows[0], status.stdout
    assert "72 loaded" in status.stdout
    data = json.loads(run_cli("status", "--json", cwd=tmp_path).stdout)
    assert len(data["ledger"]) == 72 and data["hours_loaded"] == 72 and data["hours_empty"] == 0

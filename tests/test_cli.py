"""The command line, as a user runs it: exit codes, one-line errors, no secret ever printed."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from amplitude_export.cli import cli
from amplitude_export.fake_server import FakeExportServer

SECRET = "top-secret-value-123"


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the installed console script's module as a subprocess, with a clean AMP_* environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", "from amplitude_export.cli import main; main()", *args],
        cwd=cwd, env=base, capture_output=True, text=True, timeout=timeout,
    )


def test_every_command_has_help_with_an_example() -> None:
    runner = CliRunner()
    for name in cli.commands:
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Example" in result.output, f"{name} --help has no example"
        assert "Exit codes" in result.output, name
        assert SECRET not in result.output


@pytest.mark.parametrize(
    "dates",
    [["--start", "2024-13-01"], ["--start", "yesterday"], ["--start", "2024-03-02", "--end", "2024-03-01"],
     ["--start", ""], ["--end", ""], ["--start", "2024-03-01", "--end", ""],
     ["--start", "0001-01-01T00:00:00+01:00", "--end", "0001-01-01T05"], ["--end", "9999-12-31T23:59:59-01:00"],
     ["--start", "0001-01-01", "--end", "0001-01-01T01"]],
)
def test_bad_dates_exit_2_with_one_line(tmp_path: Path, dates: list[str]) -> None:
    result = run_cli("extract", "--api-key", "k", "--secret-key", SECRET, "--base-url", "http://127.0.0.1:9",
                     *dates, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert SECRET not in result.stderr + result.stdout
    assert not (tmp_path / "data" / "raw").exists()


@pytest.mark.parametrize(
    "args",
    [["nosuch"], ["run", "--nosuch"], ["run", "--concurrency", "0"], ["extract", "--window-hours", "x"],
     ["load", "--workers", "99"], ["status", "--bogus"], ["verify", "--deep", "extra"], ["report", "--out"],
     ["demo", "--days", "0"], ["fake-server", "--port", "-1"]],
)
def test_every_bad_flag_is_one_error_line_and_exit_2(tmp_path: Path, args: list[str]) -> None:
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("command", ["extract", "run"])
def test_a_negative_lag_is_refused(tmp_path: Path, command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--api-key", "k", "--secret-key", SECRET, "--base-url",
                                      "http://127.0.0.1:9", "--start", "2024-03-01", "--end", "2024-03-01",
                                      "--max-attempts", "1", "--no-progress", "--data-dir", str(tmp_path / "data"),
                                      "--log-dir", str(tmp_path / "logs"), "--lag-hours", "-1"])
    assert result.exit_code == 2 and "--lag-hours" in result.output and "x>=0" in result.output


def test_an_end_before_the_default_start_says_so(tmp_path: Path) -> None:
    result = run_cli("extract", "--api-key", "k", "--secret-key", SECRET, "--base-url", "http://127.0.0.1:9",
                     "--end", "2020-01-01", cwd=tmp_path)
    assert result.returncode == 2
    assert "before the default start" in result.stderr and "yesterday" in result.stderr
    assert "--start" in result.stderr


@pytest.mark.parametrize(("option", "path", "reason"), [
    ("--data-dir", "/proc/nope", "No such file or directory"),
    ("--log-dir", "/proc/nolog", "No such file or directory"),  # after the data directory was made: removed again
    ("--data-dir", "afile/data", "afile is a file, not a directory"),
])
@pytest.mark.parametrize("command", ["extract", "run"])
def test_a_directory_that_cannot_be_created_exits_2_with_one_line_and_leaves_nothing(
    tmp_path: Path, command: str, option: str, path: str, reason: str
) -> None:
    (tmp_path / "afile").write_text("a file where a directory is asked for")
    result = run_cli(command, "--api-key", "k", "--secret-key", SECRET, "--base-url", "http://127.0.0.1:9",
                     "--start", "2024-03-01", "--end", "2024-03-01", option, path, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {option} {path}: cannot create it ({reason})"], result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_a_file_in_the_destinations_path_and_a_missing_database_are_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    result = run_cli("run", "--api-key", "k", "--secret-key", SECRET, "--base-url", "http://127.0.0.1:9",
                     "--start", "2024-03-01", "--end", "2024-03-01", "--dest", "duckdb:afile/events.duckdb",
                     cwd=tmp_path)
    assert result.returncode == 4, result.stderr
    assert "error: cannot open DuckDB database afile/events.duckdb: afile is a file, not a directory" in result.stderr
    for command in ("status", "verify", "report"):
        result = run_cli(command, "--dest", "duckdb:none.duckdb", cwd=tmp_path)
        assert result.returncode == 4, result.stderr
        assert result.stderr.strip().splitlines()[-1] == (
            "error: no DuckDB database at none.duckdb: nothing loaded there yet, run a load first"), result.stderr
    assert not (tmp_path / "none.duckdb").exists()


def test_fake_server_on_a_busy_port_exits_2_with_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("fake-server", "--port", str(port), cwd=tmp_path, timeout=30)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot listen on 127.0.0.1:{port}:"), result.stderr


def test_run_with_only_an_end_on_an_empty_destination_loads_that_day(tmp_path: Path) -> None:
    import duckdb

    with FakeExportServer(events_per_hour=5) as server:
        result = run_cli("run", "--base-url", server.url, "--end", "2024-03-02", "--no-progress", cwd=tmp_path,
                         env={"AMP_API_KEY": server.api_key, "AMP_SECRET_KEY": "demo-secret"})
        expected = server.expected_uuids(datetime(2024, 3, 2, tzinfo=UTC), datetime(2024, 3, 2, 23, tzinfo=UTC))
    assert result.returncode == 0, result.stderr
    assert "1 window (1 loaded)" in result.stdout and "up to date" not in result.stdout
    with duckdb.connect(str(tmp_path / "data" / "amplitude.duckdb"), read_only=True) as con:
        assert {row[0] for row in con.execute("SELECT uuid FROM events").fetchall()} == expected


def test_missing_credentials_exit_2(tmp_path: Path) -> None:
    result = run_cli("extract", "--start", "2024-03-01", cwd=tmp_path)
    assert result.returncode == 2 and "AMP_API_KEY" in result.stderr


def test_wrong_secret_exits_3_without_printing_it(tmp_path: Path) -> None:
    with FakeExportServer(secret_key="the-right-one") as server:
        result = run_cli("extract", "--start", "2024-03-01", "--end", "2024-03-01", "--no-progress",
                         cwd=tmp_path, env={"AMP_API_KEY": server.api_key, "AMP_SECRET_KEY": SECRET,
                                            "AMP_BASE_URL": server.url})
    assert result.returncode == 3, result.stderr
    assert "AMP_SECRET_KEY" in result.stderr and "credentials" in result.stderr
    assert SECRET not in result.stderr + result.stdout
    for log_file in (tmp_path / "logs").glob("*.log"):
        assert SECRET not in log_file.read_text()


def test_extract_with_transient_faults_leaves_valid_archives(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("AMP_API_KEY=demo-key\nAMP_SECRET_KEY=demo-secret\n")
    with FakeExportServer(fault_rate=0.3, seed=11) as server:
        result = run_cli("extract", "--base-url", server.url, "--start", "2024-03-01", "--end", "2024-03-02",
                         "--max-attempts", "6", "--retry-wait", "0.01", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    archives = sorted(p.name for p in (tmp_path / "data" / "raw").glob("*.zip"))
    assert archives == ["20240301T00_20240301T23.zip", "20240302T00_20240302T23.zip"]
    logs = list((tmp_path / "logs").glob("*.log"))
    assert len(logs) == 1 and "landed" in logs[0].read_text()
    assert "demo-secret" not in logs[0].read_text() + result.stderr + result.stdout


def test_range_not_ready_yet_says_so(tmp_path: Path) -> None:
    with FakeExportServer() as server:
        result = run_cli("extract", "--base-url", server.url, "--api-key", "demo-key", "--secret-key", "demo-secret",
                         "--start", "2999-01-01", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "exportable yet" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["status", "--dest", "duckdb:x.duckdb", "--schema", "s"], 2, "postgresql:// destinations only"),
        (["status", "--dest", "bogus"], 2, "cannot read destination"),
        (["status", "--dest", "mysql://x/y"], 2, "unknown destination scheme"),
        (["status", "--dest", "postgresql://postgres:pw-123@127.0.0.1:9/test"], 4, "cannot open"),
        (["status", "--dest", "parquet:nowhere"], 4, "not a Parquet dataset"),
        (["status", "--dest", "duckdb:"], 2, "names no path"),
        (["status", "--dest", "parquet: "], 2, "names no path"),
        (["status", "--dest", "postgresql://postgres@127.0.0.1:9/test", "--schema", ""], 2, "--schema is empty"),
    ],
)
def test_bad_destinations_exit_with_one_line(tmp_path: Path, args: list[str], code: int, words: str) -> None:
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.stderr
    assert "pw-123" not in result.stderr + result.stdout


@pytest.mark.parametrize("command", ["extract", "status"])
def test_a_env_file_that_does_not_parse_is_one_line_naming_its_line(tmp_path: Path, command: str) -> None:
    """Not python-dotenv's warnings then a complaint about a missing key: our one line, exit 2, even where the file
    would only name the project (status), and never the line itself (it may hold the secret)."""
    from amplitude_export.sinks import open_sink

    dest = tmp_path / "a.duckdb"
    with open_sink(f"duckdb:{dest}"):
        pass
    (tmp_path / ".env").write_text(f"AMP_API_KEY=k\nAMP_SECRET_KEY {SECRET}\n\nAMP_REGION=us\n")
    args = {"extract": ["--base-url", "http://127.0.0.1:9", "--start", "2024-03-01", "--end", "2024-03-01"],
            "status": ["--dest", f"duckdb:{dest}"]}[command]
    result = run_cli(command, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ["error: .env: line 2 does not parse as KEY=VALUE"]
    assert SECRET not in result.stdout + result.stderr


def test_status_and_verify_find_the_only_project_or_ask_for_one(tmp_path: Path) -> None:
    import json

    import stamina

    from amplitude_export.client import ExportClient
    from amplitude_export.config import Credentials, Secret
    from amplitude_export.pipeline import run
    from amplitude_export.sinks import open_sink

    database = tmp_path / "a.duckdb"
    dest = f"duckdb:{database}"
    with stamina.set_testing(True), FakeExportServer(events_per_hour=5) as server:
        credentials = Credentials(server.api_key, Secret("demo-secret"), "us", server.url)
        for project in ("web", "ios"):
            with ExportClient(credentials) as client, open_sink(dest) as sink:
                run(client, sink, project=project, start="2024-03-01", end="2024-03-01", data_dir=tmp_path / project)
            if project == "web":  # one project: found without --project or credentials
                status = run_cli("status", "--dest", dest, "--json", cwd=tmp_path)
                assert status.returncode == 0 and json.loads(status.stdout)["project"] == "web", status.stderr
                assert run_cli("verify", "--dest", dest, cwd=tmp_path).returncode == 0
    both = run_cli("verify", "--dest", dest, cwd=tmp_path)
    assert both.returncode == 2 and "several projects (ios, web): pass --project" in both.stderr
    for command, verb in (("status", "show"), ("verify", "verify")):  # each names the project it leaves out
        shown = run_cli(command, "--dest", dest, "--project", "ios", cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        assert f"the destination also holds project web: --project names which one to {verb}" in shown.stdout
        assert json.loads(run_cli(command, "--dest", dest, "--project", "web", "--json",
                                  cwd=tmp_path).stdout)["other_projects"] == ["ios"]  # fmt: skip
    assert run_cli("verify", "--dest", dest, "--project", "ios", cwd=tmp_path).stdout.splitlines()[-1].endswith(
        ": complete")
    report = run_cli("report", "--dest", dest, "--out", str(tmp_path / "r.html"), cwd=tmp_path)
    assert report.returncode == 2 and "several projects (ios, web): name one with --project" in report.stderr
    for command in ("status", "verify", "report"):  # a project the destination does not know is a typo
        typo = run_cli(command, "--dest", dest, "--project", "andriod", cwd=tmp_path)
        assert typo.returncode == 2 and "no project 'andriod'; it has ios, web" in typo.stderr, typo.stderr


_INTERRUPTIBLE = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "


def test_ctrl_c_during_an_import_waits_for_the_import_to_end(tmp_path: Path) -> None:
    """A compiled module interrupted while it initialises can abort the process (duckdb's did, exit -6 and a core
    dump, when Ctrl-C came as a run opened its destination): the CLI's handler lets the import finish first."""
    (tmp_path / "slow_module.py").write_text(
        "import os, signal\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "total = sum(sum(range(1000)) for _ in range(3000))  # Python work, where a pending signal is handled\n"
    )
    script = _INTERRUPTIBLE + (
        "import sys, time\n"
        "from amplitude_export.cli import interrupts\n"
        "signal.signal(signal.SIGINT, interrupts.interrupt)\n"
        "try:\n"
        "    import slow_module\n"
        "    deadline = time.monotonic() + 10\n"
        "    while time.monotonic() < deadline:\n"
        "        time.sleep(0.01)\n"
        "    print('never interrupted')\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted, module imported:', 'slow_module' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.stdout.strip() == "interrupted, module imported: True", result.stdout + result.stderr


@pytest.mark.parametrize("module", ["amplitude_export.api", "click", "pyarrow"])
def test_ctrl_c_while_the_commands_are_imported_is_one_line_and_exit_130(tmp_path: Path, module: str) -> None:
    """The console script as pip writes it from pyproject.toml, with Ctrl-C coming as one of the modules the
    package, the commands and the command need is imported: the CLI's one line and exit 130, not Python's
    traceback."""
    import tomllib

    entry = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    entry_module, function = entry["amplitude-export"].split(":")
    script = _INTERRUPTIBLE + (
        "import os, sys\n"
        "class CtrlC:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == {module!r}:\n"
        "            sys.meta_path.remove(self)\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.meta_path.insert(0, CtrlC())\n"
        f"from {entry_module} import {function}\n"
        f"sys.exit({function}())\n"
    )
    result = subprocess.run([sys.executable, "-c", script, "status"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 130, result.stderr
    assert result.stderr == "error: interrupted; a re-run picks up where this one stopped\n", result.stderr
    assert result.stdout == ""


def test_ctrl_c_while_click_parses_the_flags_is_one_line_and_exit_130(tmp_path: Path) -> None:
    """Not click's own "Aborted!" and exit 1: the signal is sent as click starts parsing the command's flags."""
    script = _INTERRUPTIBLE + (
        "import os, sys\n"
        "def ctrl_c(frame, event, arg):\n"
        "    if event == 'call' and frame.f_code.co_name == 'parse_args' and 'click' in frame.f_code.co_filename:\n"
        "        sys.setprofile(None)\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "from amplitude_export.cli import cli, main\n"
        "sys.setprofile(ctrl_c)\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", script, "status"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 130, result.stderr
    assert result.stderr == "error: interrupted; a re-run picks up where this one stopped\n", result.stderr


def test_ctrl_c_that_a_library_turns_into_its_own_error_still_exits_130_in_one_line(tmp_path: Path) -> None:
    """DuckDB pulling a window's batches turns the KeyboardInterrupt raised in them into its own error (and in a
    commit into "Query interrupted"): after a Ctrl-C the command still ends as interrupted, not in a traceback."""
    script = _INTERRUPTIBLE + (
        "import os, time\n"
        "import duckdb, pyarrow as pa\n"
        "from amplitude_export.cli import app, interrupts\n"
        "signal.signal(signal.SIGINT, interrupts.interrupt)\n"
        "schema = pa.schema([('i', pa.int64())])\n"
        "def batches():\n"
        "    for n in range(10_000):\n"
        "        if n == 3:\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(0.001)\n"
        "        yield pa.record_batch([pa.array(range(100))], schema=schema)\n"
        "@app.reports_errors\n"
        "def load():\n"
        "    con = duckdb.connect()\n"
        "    con.execute('CREATE TABLE t (i BIGINT)')\n"
        "    reader = pa.RecordBatchReader.from_batches(schema, batches())\n"
        "    con.execute('INSERT INTO t SELECT * FROM reader')\n"
        "load()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == "error: interrupted; a re-run picks up where this one stopped", result.stderr


def test_ctrl_c_exits_130_in_one_line_and_the_rerun_is_exact(tmp_path: Path) -> None:
    """SIGINT while a window downloads (the server stalls on it): exit 130, one line, nothing half-written."""
    import signal
    import time

    import duckdb

    day = datetime(2024, 3, 1, tzinfo=UTC)
    with FakeExportServer(events_per_hour=30, data_start=day, data_end=day.replace(hour=23),
                          faults=["slow"], slow_seconds=120) as server:
        args = ["run", "--base-url", server.url, "--api-key", server.api_key, "--secret-key", "demo-secret",
                "--start", "2024-03-01", "--end", "2024-03-01", "--no-progress"]
        base = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
        # as a terminal starts it: Ctrl-C not ignored, even where the suite itself runs in the background
        command = [sys.executable, "-c", _INTERRUPTIBLE + "from amplitude_export.cli import main; main()", *args]
        process = subprocess.Popen(command, cwd=tmp_path, env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        deadline = time.monotonic() + 60
        while not server.in_flight and time.monotonic() < deadline:  # the server stalls on the first request
            time.sleep(0.05)
        time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)  # ends long before the 120 s stall would: it does not wait
        assert process.returncode == 130, err
        assert [line for line in err.splitlines() if line.startswith("error:")] == [
            "error: interrupted; a re-run picks up where this one stopped"]
        assert "Traceback" not in err
        assert not list((tmp_path / "data" / "raw").glob("*.zip"))  # the stalled download never landed
        again = run_cli(*args, cwd=tmp_path)  # the stall was the window's first request only
        assert again.returncode == 0, again.stderr
        expected = server.expected_uuids(day, day.replace(hour=23))
    with duckdb.connect(str(tmp_path / "data" / "amplitude.duckdb"), read_only=True) as con:
        assert {u for (u,) in con.execute("SELECT uuid FROM events").fetchall()} == expected
        assert con.execute("SELECT count(*) FROM events").fetchone()[0] == len(expected)


@pytest.mark.parametrize(("args", "words"), [
    (["--base-url", "http://[::1"], "must look like https://host[:port]"),
    (["--base-url", "http://u:pw-123@[::1"], "must look like https://host[:port]"),
    (["--base-url", "http://127.0.0.1:9#frag"], "has a fragment"),
    (["--dest", "duckdb:"], "names no path"),
    (["--dest", "delta:s3:/bucket/events"], "names a local directory 's3:' (a URL has ://): write delta:s3://bucket/"),
    (["--dest", "parquet:gs:/bucket/events"], "write parquet:gs://bucket/events, or parquet:./gs:/bucket/events"),
    (["--dest", "iceberg:file:/tmp/wh"], "write iceberg:/tmp/wh"),
    (["--dest", "postgresql://postgres@127.0.0.1:9/test", "--schema", ""], "--schema is empty"),
    (["--dest", "parquet:x", "--storage-option", "pw-123"], "expected KEY=VALUE"),
])
def test_a_run_refused_for_its_base_url_or_destination_creates_nothing(tmp_path: Path, args: list[str],
                                                                        words: str) -> None:
    result = run_cli("run", "--api-key", "k", "--secret-key", SECRET, "--base-url", "http://127.0.0.1:9",
                     "--start", "2024-03-01", "--end", "2024-03-01", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert words in result.stderr and "pw-123" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_report_that_cannot_be_written_whole_leaves_no_part_of_itself(tmp_path: Path) -> None:
    import resource
    import signal

    with FakeExportServer(api_key="k", secret_key=SECRET, events_per_hour=20, data_start=datetime(2024, 3, 1,
                          tzinfo=UTC), data_end=datetime(2024, 3, 1, 23, tzinfo=UTC)) as server:  # fmt: skip
        loaded = run_cli("run", "--api-key", "k", "--secret-key", SECRET, "--base-url", server.url, "--start",
                         "2024-03-01", "--end", "2024-03-01", "--no-progress", cwd=tmp_path)  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr
    (tmp_path / "out").mkdir()

    def small_files() -> None:  # a write past 64 KB fails as on a full disk (EFBIG instead of ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    env = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
    result = subprocess.run([sys.executable, "-c", "from amplitude_export.cli import main; main()", "report",
                             "--out", "out/r.html"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120, preexec_fn=small_files)  # fmt: skip
    assert result.returncode == 4, result.stderr
    assert result.stderr.startswith("error: cannot write out/r.html: "), result.stderr
    assert list((tmp_path / "out").iterdir()) == []


def _uuids_by_hour(archive: Path) -> dict[int, set[str]]:
    """The uuids of each upload hour's lines in an Export API archive (the hour from each member's name)."""
    import gzip
    import json
    import zipfile

    found: dict[int, set[str]] = {}
    with zipfile.ZipFile(archive) as zipped:
        for name in zipped.namelist():
            if name.endswith("/"):
                continue
            hour = int(name.rsplit("_", 1)[1].split("#")[0])
            lines = gzip.decompress(zipped.read(name)).splitlines()
            found.setdefault(hour, set()).update(json.loads(line)["uuid"] for line in lines if line.strip())
    return found


def test_load_takes_each_hour_from_the_newest_archive_that_holds_it(tmp_path: Path) -> None:
    # a lookback lands a newer archive beside older ones that hold some of its hours: `load` must not let the
    # older data win, neither into a new destination nor into one that holds the newer archive's hours already
    import duckdb

    day = datetime(2024, 3, 1, tzinfo=UTC)
    raw = tmp_path / "data" / "raw"
    with (FakeExportServer(api_key="k", secret_key=SECRET, events_per_hour=20, data_start=day,
                           data_end=day.replace(hour=12), seed=0) as first,
          FakeExportServer(api_key="k", secret_key=SECRET, events_per_hour=25, data_start=day,
                           data_end=day.replace(hour=12), seed=1) as again):  # fmt: skip
        for server, start, end, data in ((first, "T01", "T02", "data"), (first, "T03", "T12", "data"),
                                         (again, "T00", "T10", "later")):  # fmt: skip
            result = run_cli("extract", "--api-key", "k", "--secret-key", SECRET, "--base-url", server.url,
                             "--start", f"2024-03-01{start}", "--end", f"2024-03-01{end}", "--data-dir", data,
                             cwd=tmp_path)  # fmt: skip
            assert result.returncode == 0, result.stderr
    os.rename(tmp_path / "later" / "raw" / "20240301T00_20240301T10.zip", raw / "20240301T00_20240301T10.zip")
    names = {"old": "20240301T01_20240301T02.zip", "older": "20240301T03_20240301T12.zip",
             "new": "20240301T00_20240301T10.zip"}  # fmt: skip
    for age, (_, name) in enumerate(sorted(names.items())):  # mtimes: new > old > older, not name order
        os.utime(raw / name, ns=(10**18 - age * 10**12,) * 2)
    newest = _uuids_by_hour(raw / names["new"])
    expected = {hour: newest[hour] if hour <= 10 else _uuids_by_hour(raw / names["older"])[hour]
                for hour in range(13)}  # fmt: skip

    def exact(got: dict[int, set[str]]) -> bool:
        # every uuid of the newest archive is stored, each under its first hour (the fake sends some again in a
        # later hour); the older archive's hours 11 and 12 may miss a repeat whose first copy its hours 3-10 held
        return all(got.get(hour, set()) <= uuids for hour, uuids in expected.items()) and set().union(
            *got.values()) >= set().union(*newest.values())

    def stored(dest: str) -> dict[int, set[str]]:
        with duckdb.connect(dest, read_only=True) as con:
            rows = con.execute("SELECT hour(_upload_hour), uuid FROM events").fetchall()
        got: dict[int, set[str]] = {}
        for hour, uuid in rows:
            got.setdefault(hour, set()).add(uuid)
        return got

    result = run_cli("load", "--dest", "duckdb:fresh.duckdb", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert exact(stored(str(tmp_path / "fresh.duckdb")))

    # a destination already holding the newest archive's hours gets the older one's other hours, and its
    # shared hours stay the newest's
    aside = tmp_path / "aside"
    aside.mkdir()
    for key in ("old", "older"):
        os.rename(raw / names[key], aside / names[key])
    assert run_cli("load", "--dest", "duckdb:held.duckdb", cwd=tmp_path).returncode == 0
    for key in ("old", "older"):
        os.rename(aside / names[key], raw / names[key])
    result = run_cli("load", "--dest", "duckdb:held.duckdb", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert exact(stored(str(tmp_path / "held.duckdb")))


def test_run_refresh_downloads_again_instead_of_reusing_a_kept_archive(tmp_path: Path) -> None:
    import duckdb

    day = datetime(2024, 3, 1, tzinfo=UTC)
    with (FakeExportServer(api_key="k", secret_key=SECRET, events_per_hour=20, data_start=day,
                           data_end=day.replace(hour=10), seed=0) as first,
          FakeExportServer(api_key="k", secret_key=SECRET, events_per_hour=25, data_start=day,
                           data_end=day.replace(hour=10), seed=1) as changed):  # fmt: skip
        for server, start, more in ((first, "2024-03-01T01", []), (changed, "2024-03-01T00", ["--refresh"])):
            result = run_cli("run", "--api-key", "k", "--secret-key", SECRET, "--base-url", server.url, "--start",
                             start, "--end", "2024-03-01T10" if more else "2024-03-01T02", "--no-progress", *more,
                             cwd=tmp_path)  # fmt: skip
            assert result.returncode == 0, result.stderr
    fresh = set().union(*_uuids_by_hour(tmp_path / "data" / "raw" / "20240301T00_20240301T10.zip").values())
    with duckdb.connect(str(tmp_path / "data" / "amplitude.duckdb"), read_only=True) as con:
        stored = {uuid for (uuid,) in con.execute("SELECT uuid FROM events").fetchall()}
    assert stored == fresh


def test_load_from_a_data_dir_without_archives_is_refused_and_a_second_load_says_why_it_does_nothing(
    tmp_path: Path,
) -> None:
    result = run_cli("load", "--data-dir", "nonexist", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: --data-dir nonexist: it holds no archives")
    assert list(tmp_path.iterdir()) == []
    day = datetime(2024, 3, 1, tzinfo=UTC)
    with FakeExportServer(api_key="k", secret_key=SECRET, events_per_hour=20, data_start=day,
                          data_end=day.replace(hour=1)) as server:  # fmt: skip
        assert run_cli("extract", "--api-key", "k", "--secret-key", SECRET, "--base-url", server.url, "--start",
                       "2024-03-01T00", "--end", "2024-03-01T01", cwd=tmp_path).returncode == 0  # fmt: skip
    first = run_cli("load", "--project", "p", cwd=tmp_path)
    again = run_cli("load", "--project", "p", cwd=tmp_path)
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert "log: logs/" in first.stdout
    assert ("nothing to load: the hours of the 1 archive under data/raw are loaded already (--refresh loads them "
            "again)") in again.stdout

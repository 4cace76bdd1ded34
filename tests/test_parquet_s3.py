"""`--dest parquet:s3://...` as a user runs it: the CLI as a subprocess against a real S3-compatible server on
loopback (moto's server mode, tests/s3.py), the endpoint and keys given by `--storage-option` or by the usual
AWS environment variables. Exactly once across re-runs, kill -9 then re-run, status, verify, report, read_arrow,
the lock object, and storage option values never printed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from s3 import LoopbackS3

import amplitude_export
from amplitude_export.errors import DestinationError, UsageError
from amplitude_export.fake_server import FakeExportServer
from amplitude_export.sinks.parquet import ParquetSink
from amplitude_export.storage import fsspec_options, parse_options

DAY = datetime(2024, 3, 1, tzinfo=UTC)
KEY_ID = "AKIALOOPBACKKEYID0001"
SECRET = "loopback-secret-never-printed-9f3a"


def cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from amplitude_export.cli import main; main()", *args],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def run_args(server: FakeExportServer, dest: str, start: str, end: str, *extra: str) -> list[str]:
    return ["run", "--base-url", server.url, "--api-key", server.api_key, "--secret-key", "demo-secret",
            "--start", start, "--end", end, "--dest", dest, "--data-dir", "data", "--log-dir", "logs",
            "--no-progress", *extra]


def said(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def stored_uuids(dest: str, s3: LoopbackS3) -> list[str]:
    return amplitude_export.read_arrow(dest, storage_options=s3.options).column("uuid").to_pylist()


def objects(s3: LoopbackS3, bucket: str) -> dict[str, Any]:
    """Every object under the bucket with its ETag (a content hash): what a re-run must leave alone."""
    fs = s3.filesystem()
    fs.invalidate_cache()
    return {path: info["ETag"] for path, info in fs.find(bucket, detail=True).items()}


def test_run_with_the_endpoint_as_a_storage_option_is_exact_readable_and_idempotent(
    s3: LoopbackS3, s3_bucket: str, fake_server: FakeExportServer, tmp_path: Path
) -> None:
    dest = f"parquet:s3://{s3_bucket}/amplitude"
    # the environment's endpoint is a closed port: only the option reaches the server
    options = ["--storage-option", f"endpoint_url={s3.endpoint}", "--storage-option", f"key={KEY_ID}",
               "--storage-option", f"secret={SECRET}"]
    env = s3.env()
    first = cli(*run_args(fake_server, dest, "2024-03-01", "2024-03-01", *options), env=env, cwd=tmp_path)
    assert first.returncode == 0, said(first)
    expected = fake_server.expected_uuids(DAY, DAY.replace(hour=23))
    stored = stored_uuids(dest, s3)
    assert len(stored) == len(set(stored)) and set(stored) == expected
    before = objects(s3, s3_bucket)
    assert f"{s3_bucket}/amplitude/_state/ledger.json" in before
    assert not any(path.endswith("_state/lock") for path in before)  # released at the end

    again = cli(*run_args(fake_server, dest, "2024-03-01", "2024-03-01", *options), env=env, cwd=tmp_path)
    assert again.returncode == 0, said(again)
    assert objects(s3, s3_bucket) == before and sorted(stored_uuids(dest, s3)) == sorted(stored)

    status = cli("status", "--dest", dest, *options, "--json", env=env, cwd=tmp_path)
    assert status.returncode == 0, said(status)
    assert str(len(expected)) in status.stdout and "2024-03-02T00" in status.stdout
    verify = cli("verify", "--dest", dest, *options, env=env, cwd=tmp_path)
    assert verify.returncode == 0 and "24 hours checked" in verify.stdout, said(verify)
    assert "0 archive hours hashed: complete" in verify.stdout, said(verify)
    deep = cli("verify", "--deep", "--dest", dest, *options, env=env, cwd=tmp_path)
    assert deep.returncode == 0 and "24 archive hours hashed: complete" in deep.stdout, said(deep)
    report = cli("report", "--dest", dest, *options, "--out", "report.html", env=env, cwd=tmp_path)
    assert report.returncode == 0, said(report)
    assert (tmp_path / "report.html").stat().st_size > 10_000
    assert f"{len(expected):,}" in (tmp_path / "report.html").read_text()

    printed = [said(r) for r in (first, again, status, verify, deep, report)]
    logs = [path.read_text() for path in (tmp_path / "logs").glob("*.log")]
    assert logs and not any(SECRET in text or KEY_ID in text for text in printed + logs)

    without = cli("status", "--dest", dest, env=env, cwd=tmp_path)  # no option: the closed port, one line, exit 4
    assert without.returncode == 4 and "Traceback" not in without.stderr, said(without)
    assert without.stderr.count("error:") == 1


@pytest.mark.parametrize("how", ["client_kwargs", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
def test_the_endpoint_from_client_kwargs_or_the_environment(
    how: str, s3: LoopbackS3, s3_bucket: str, fake_server: FakeExportServer, tmp_path: Path
) -> None:
    dest = f"parquet:s3://{s3_bucket}/events"
    if how == "client_kwargs":
        env = s3.env()
        options = ["--storage-option", "client_kwargs=" + json.dumps({"endpoint_url": s3.endpoint})]
    else:
        env = {k: v for k, v in s3.env().items() if k != "AWS_ENDPOINT_URL"}
        env[how] = s3.endpoint
        options = []
    result = cli(*run_args(fake_server, dest, "2024-03-01T00", "2024-03-01T05", *options), env=env, cwd=tmp_path)
    assert result.returncode == 0, said(result)
    status = cli("status", "--dest", dest, *options, env=env, cwd=tmp_path)
    assert status.returncode == 0 and "next run starts at 2024-03-01T06" in status.stdout, said(status)
    stored = stored_uuids(dest, s3)
    assert len(stored) == len(set(stored)) and set(stored) == fake_server.expected_uuids(DAY, DAY.replace(hour=5))


def committed_files(s3: LoopbackS3, bucket: str) -> int:
    fs = s3.filesystem()
    fs.invalidate_cache()
    try:
        return len(json.loads(fs.cat_file(f"{bucket}/lake/_state/ledger.json"))["files"])
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.slow
def test_kill_9_mid_run_then_the_same_run_gives_exact_rows(s3: LoopbackS3, s3_bucket: str, tmp_path: Path) -> None:
    dest = f"parquet:s3://{s3_bucket}/lake"
    env = s3.env(endpoint=True)
    with FakeExportServer(events_per_hour=300, members_per_hour=3, seed=5) as server:
        args = [sys.executable, "-c", "from amplitude_export.cli import main; main()",
                *run_args(server, dest, "2024-03-01", "2024-03-04", "--window-hours", "12")]
        process = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None and committed_files(s3, s3_bucket) < 2:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert 2 <= committed_files(s3, s3_bucket) < 8
        lock = f"{s3_bucket}/lake/_state/lock"
        assert s3.filesystem().exists(lock)  # left by the dead run; its pid on this host is gone, so it is stale
        result = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, said(result)
        expected = server.expected_uuids(DAY, DAY + timedelta(days=4) - timedelta(hours=1))
    stored = stored_uuids(dest, s3)
    assert len(stored) == len(set(stored)) and set(stored) == expected
    verify = cli("verify", "--dest", dest, env=env, cwd=tmp_path)
    assert verify.returncode == 0 and "96 hours checked" in verify.stdout, said(verify)


def test_a_second_writer_is_refused_with_exit_5(
    s3: LoopbackS3, s3_bucket: str, fake_server: FakeExportServer, tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/lake"
    env = s3.env(endpoint=True)
    with ParquetSink(url, storage_options=s3.options):  # a writer in this (live) process holds _state/lock
        result = cli(*run_args(fake_server, f"parquet:{url}", "2024-03-01", "2024-03-01"), env=env, cwd=tmp_path)
        assert result.returncode == 5, said(result)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "in use by another run" in errors[0] and "_state/lock" in errors[0]
        assert fake_server.requests == []  # refused before asking Amplitude for anything
        reader = cli("status", "--dest", f"parquet:{url}", env=env, cwd=tmp_path)  # readers take no lock
        assert reader.returncode == 0, said(reader)
    result = cli(*run_args(fake_server, f"parquet:{url}", "2024-03-01", "2024-03-01"), env=env, cwd=tmp_path)
    assert result.returncode == 0, said(result)


NO_EQUALS = "--storage-option #1: expected KEY=VALUE"
NOT_HERE = "storage options apply to parquet: and delta: URLs on object storage"


@pytest.mark.parametrize(
    ("command", "option", "dest", "message"),
    [
        *[(command, SECRET, "parquet:s3://bucket/lake", NO_EQUALS)
          for command in ("run", "load", "status", "verify", "report")],
        ("status", f"={SECRET}", "parquet:s3://bucket/lake", NO_EQUALS),
        ("run", 'client_kwargs={"endpoint_url": "' + SECRET, "parquet:s3://bucket/lake", "must be JSON"),
        ("run", f"secret={SECRET}", "duckdb:x.duckdb", NOT_HERE),
        ("report", f"secret={SECRET}", "duckdb:x.duckdb", NOT_HERE),
        ("verify", f"secret={SECRET}", "parquet:lake", NOT_HERE),
        ("status", f"secret={SECRET}", "delta:lake", NOT_HERE),
        ("status", 'client_kwargs={"region": "' + SECRET + '"}', "delta:s3://bucket/lake", "delta-rs takes text"),
        ("status", f"bogus={SECRET}", "parquet:s3://bucket/lake", "the storage options do not suit its filesystem"),
        ("status", f"anon={SECRET}", "parquet:s3://bucket/lake", "storage option anon takes true or false"),
    ],
)
def test_a_bad_storage_option_is_one_line_exit_2_without_its_value(
    command: str, option: str, dest: str, message: str, s3: LoopbackS3, tmp_path: Path
) -> None:
    credentials = ["--api-key", "k", "--secret-key", "s", "--base-url", "http://127.0.0.1:9"]
    credentials = credentials if command == "run" else []
    result = cli(command, *credentials, "--dest", dest, "--storage-option", option, "--data-dir", "data",
                 env=s3.env(), cwd=tmp_path, timeout=60)
    assert result.returncode == 2, said(result)
    assert result.stderr.count("error:") == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert SECRET not in said(result)
    assert not (tmp_path / "x.duckdb").exists() and not (tmp_path / "lake").exists()


def test_values_are_masked_in_errors_and_logs(s3: LoopbackS3, s3_bucket: str, fake_server: FakeExportServer,
                                             tmp_path: Path) -> None:
    # an endpoint nobody answers, with a secret in its path: botocore's error quotes the URL
    dead = f"{s3.dead_endpoint}/{SECRET}"
    retries = {"retries": {"max_attempts": 1}}  # botocore's backoff on a refused connection adds nothing here
    result = cli(*run_args(fake_server, f"parquet:s3://{s3_bucket}/lake", "2024-03-01", "2024-03-01",
                           "--storage-option", f"endpoint_url={dead}",
                           "--storage-option", f"config_kwargs={json.dumps(retries)}"), env=s3.env(), cwd=tmp_path)
    assert result.returncode == 4, said(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Could not connect to the endpoint URL" in errors[0] and "***" in errors[0]
    logs = "".join(path.read_text() for path in (tmp_path / "logs").glob("*.log"))
    assert SECRET not in said(result) + logs and "Traceback" not in result.stderr
    with pytest.raises(DestinationError) as caught:
        amplitude_export.read_arrow(f"parquet:s3://{s3_bucket}/lake",
                                    storage_options={"endpoint_url": dead, "config_kwargs": retries})
    assert SECRET not in str(caught.value) and "***" in str(caught.value)


def test_read_arrow_and_read_events_take_storage_options(
    s3: LoopbackS3, s3_bucket: str, fake_server: FakeExportServer, tmp_path: Path
) -> None:
    dest = f"parquet:s3://{s3_bucket}/lake"
    result = cli(*run_args(fake_server, dest, "2024-03-01T00", "2024-03-01T03"), env=s3.env(endpoint=True),
                 cwd=tmp_path)
    assert result.returncode == 0, said(result)
    frame = amplitude_export.read_events(dest, storage_options=s3.options)
    assert len(frame) == frame["uuid"].nunique() and set(frame["uuid"]) == fake_server.expected_uuids(
        DAY, DAY.replace(hour=3))
    table = amplitude_export.read_arrow(dest, "2024-03-01T01", "2024-03-01T02", storage_options=s3.options)
    hours = frame["server_upload_time"].dt.floor("h")
    inside = frame[(hours >= DAY.replace(hour=1)) & (hours <= DAY.replace(hour=2))]
    assert 0 < len(inside) < len(frame) and sorted(table.column("uuid").to_pylist()) == sorted(inside["uuid"])
    with pytest.raises(UsageError, match="storage options apply to parquet: and delta: URLs"):
        amplitude_export.read_arrow(f"duckdb:{tmp_path / 'x.duckdb'}", storage_options=s3.options)


def test_aws_region_is_used_when_nothing_else_names_a_region(
    s3: LoopbackS3, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{s3_bucket}/lake"

    def region(options: dict[str, Any]) -> str:
        with ParquetSink(url, storage_options=options) as sink:
            return str(sink.store.fs.s3.meta.region_name)  # type: ignore[union-attr]

    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    assert region({**s3.options}) == "eu-west-3"
    assert region({**s3.options, "client_kwargs": {"region_name": "ap-south-1"}}) == "ap-south-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")  # botocore's own variable wins
    assert region({**s3.options, "max_concurrency": 2}) == "us-west-2"


def test_options_typed_for_the_filesystem() -> None:
    assert fsspec_options("s3", parse_options(["max_concurrency=4", "anon=true", "key=123", "endpoint_url=u"])) == {
        "max_concurrency": 4, "anon": True, "key": "123", "endpoint_url": "u"}
    with pytest.raises(UsageError, match="use_ssl takes true or false"):
        fsspec_options("s3", {"use_ssl": "no"})


def test_parse_options_types() -> None:
    assert parse_options(["endpoint_url=http://h:9/?a=b", "anon=False", "use_ssl=true", "n=12",
                          'client_kwargs={"region_name": "eu-west-1", "verify": false}', "empty="]) == {
        "endpoint_url": "http://h:9/?a=b", "anon": False, "use_ssl": True, "n": "12",
        "client_kwargs": {"region_name": "eu-west-1", "verify": False}, "empty": ""}

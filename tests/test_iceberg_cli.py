"""`--dest iceberg:...` as a user runs it: the CLI as a subprocess into a local warehouse and into a warehouse on a
real S3-compatible server on loopback (moto, tests/s3.py): exactly once across re-runs, status, verify, verify
--deep, report, maintain, kill -9 then re-run, a lookback reload, and a reader polling during reloads."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import stamina
from s3 import LoopbackS3
from sink_helpers import finisher, synthetic_batches, window
from test_parquet_s3 import cli, run_args, said

import amplitude_export
from amplitude_export.client import ExportClient
from amplitude_export.config import Credentials, Secret
from amplitude_export.fake_server import FakeExportServer
from amplitude_export.pipeline import run
from amplitude_export.sinks.iceberg import IcebergSink

DAY = datetime(2024, 3, 1, tzinfo=UTC)
SECRET = "loopback-secret-never-printed-7c1e"


def check_day(dest: str, server: FakeExportServer, tmp_path: Path, env: dict[str, str], options: list[str],
              storage: dict[str, str] | None = None) -> None:
    """run, re-run, status, verify, verify --deep, report, maintain, verify: what every iceberg: URL must pass."""
    first = cli(*run_args(server, dest, "2024-03-01", "2024-03-01", *options), env=env, cwd=tmp_path)
    assert first.returncode == 0, said(first)
    expected = server.expected_uuids(DAY, DAY.replace(hour=23))
    stored = amplitude_export.read_arrow(dest, storage_options=storage).column("uuid").to_pylist()
    assert len(stored) == len(set(stored)) and set(stored) == expected
    with IcebergSink(dest.removeprefix("iceberg:"), read_only=True, storage_options=storage) as sink:
        before = sink.table.metadata_location
    again = cli(*run_args(server, dest, "2024-03-01", "2024-03-01", *options), env=env, cwd=tmp_path)
    assert again.returncode == 0, said(again)
    with IcebergSink(dest.removeprefix("iceberg:"), read_only=True, storage_options=storage) as sink:
        assert sink.table.metadata_location == before  # nothing to load: no commit at all
    status = cli("status", "--dest", dest, *options, "--json", env=env, cwd=tmp_path)
    assert status.returncode == 0 and str(len(expected)) in status.stdout, said(status)
    deep = cli("verify", "--deep", "--dest", dest, *options, env=env, cwd=tmp_path)
    assert deep.returncode == 0 and "24 hours checked" in deep.stdout, said(deep)
    assert "24 archive hours hashed: complete" in deep.stdout, said(deep)
    report = cli("report", "--dest", dest, *options, "--out", "report.html", env=env, cwd=tmp_path)
    assert report.returncode == 0, said(report)
    assert f"{len(expected):,}" in (tmp_path / "report.html").read_text()
    kept = cli("maintain", "--dest", dest, *options, "--older-than", "0", "--compact", env=env, cwd=tmp_path)
    assert kept.returncode == 0 and "expired" in kept.stdout, said(kept)
    after = cli("verify", "--dest", dest, *options, env=env, cwd=tmp_path)
    assert after.returncode == 0, said(after)
    printed = [said(r) for r in (first, again, status, deep, report, kept, after)]
    logs = [path.read_text() for path in (tmp_path / "logs").glob("*.log")]
    assert not any(SECRET in text for text in printed + logs)


@pytest.mark.slow
def test_a_local_warehouse_through_the_cli(fake_server: FakeExportServer, tmp_path: Path) -> None:
    dest = f"iceberg:{tmp_path / 'warehouse'}"
    check_day(dest, fake_server, tmp_path, s3_free_env(), [])
    assert (tmp_path / "warehouse" / "catalog.db").is_file()


def s3_free_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("AMP_", "AWS_"))}


@pytest.mark.slow
def test_a_warehouse_on_the_loopback_s3_server(s3: LoopbackS3, s3_bucket: str, fake_server: FakeExportServer,
                                                tmp_path: Path) -> None:
    dest = f"iceberg:s3://{s3_bucket}/warehouse?catalog=sqlite:///{tmp_path / 'catalog.db'}"
    # the environment's endpoint is a closed port: only the option reaches the server
    options = ["--storage-option", f"endpoint_url={s3.endpoint}", "--storage-option", "key=loopback-key-id",
               "--storage-option", f"secret={SECRET}"]
    env = s3.env()
    check_day(dest, fake_server, tmp_path, env, options, {"endpoint_url": s3.endpoint})
    files = s3.filesystem().find(f"{s3_bucket}/warehouse/amplitude/events/data")
    assert files and all(path.endswith(".parquet") for path in files)
    without = cli("status", "--dest", dest, env=env, cwd=tmp_path)  # no option: the closed port, one line, exit 4
    assert without.returncode == 4 and "Traceback" not in without.stderr, said(without)
    assert without.stderr.count("error:") == 1


def ledger_hours(dest: str, storage: dict[str, str]) -> int:
    try:
        with IcebergSink(dest.removeprefix("iceberg:"), read_only=True, storage_options=storage) as sink:
            return len(sink.ledger("p"))
    except Exception:  # noqa: BLE001 - the catalog is not there yet
        return 0


@pytest.mark.slow
def test_kill_9_mid_run_then_the_same_run_gives_exact_rows(s3: LoopbackS3, s3_bucket: str, tmp_path: Path) -> None:
    dest = f"iceberg:s3://{s3_bucket}/wh?catalog=sqlite:///{tmp_path / 'catalog.db'}"
    env = s3.env(endpoint=True)
    with FakeExportServer(events_per_hour=300, members_per_hour=3, seed=5) as server:
        args = [sys.executable, "-c", "from amplitude_export.cli import main; main()",
                *run_args(server, dest, "2024-03-01", "2024-03-03", "--window-hours", "12", "--project", "p")]
        process = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None and ledger_hours(dest, s3.options) < 24:
            time.sleep(0.1)
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert 24 <= ledger_hours(dest, s3.options) < 72
        result = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, said(result)
        expected = server.expected_uuids(DAY, DAY + timedelta(days=3) - timedelta(hours=1))
    stored = amplitude_export.read_arrow(dest, storage_options=s3.options).column("uuid").to_pylist()
    assert len(stored) == len(set(stored)) and set(stored) == expected
    verify = cli("verify", "--dest", dest, "--project", "p", env=env, cwd=tmp_path)
    assert verify.returncode == 0 and "72 hours checked" in verify.stdout, said(verify)


def test_lookback_reloads_only_the_hours_amplitude_changed(tmp_path: Path) -> None:
    dest = str(tmp_path / "warehouse")
    now = datetime(2024, 3, 3, 2, 30, tzinfo=UTC)  # ready through 2024-03-02T23
    with (stamina.set_testing(True, attempts=100, cap=True),
          FakeExportServer(events_per_hour=20, data_start=DAY, data_end=DAY + timedelta(days=2, hours=-1)) as server):
        credentials = Credentials("demo-key", Secret("demo-secret"), "us", server.url)
        with ExportClient(credentials) as client, IcebergSink(dest) as sink:
            assert run(client, sink, project="p", start="2024-03-01", end="2024-03-02", data_dir=tmp_path,
                       now=now).exit_code == 0
            before = {h: r.run_id for h, r in sink.ledger("p").items()}
            server.set_hour_version(DAY + timedelta(hours=30), 1)  # Amplitude re-exports two hours
            server.set_hour_version(DAY + timedelta(hours=31), 1)
            second = run(client, sink, project="p", data_dir=tmp_path, now=now, lookback_hours=24)
            after = {h: r.run_id for h, r in sink.ledger("p").items()}
            stored = sink.read_arrow().column("uuid").to_pylist()
        expected = server.expected_uuids(DAY, DAY + timedelta(hours=47))
    assert [h.strftime("%Y-%m-%dT%H") for h in second.changed_hours] == ["2024-03-02T06", "2024-03-02T07"]
    assert len({h for h in after if after[h] != before[h]}) == 2
    assert len(stored) == len(set(stored)) and set(stored) == expected


def test_a_reader_polling_during_reloads_never_sees_a_window_twice_or_half(tmp_path: Path) -> None:
    root = str(tmp_path / "warehouse")
    w = window(0, 3)
    with IcebergSink(root) as writer:
        writer.write_window("p", w, synthetic_batches(w, 200, batch_rows=100), finisher(w))
        whole = writer.count_by_hour("p")
        seen: list[dict[datetime, int]] = []
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                with IcebergSink(root, read_only=True) as reader:
                    seen.append(reader.count_by_hour("p"))

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            for _ in range(4):  # each reload: many batches, several files, one commit
                writer.write_window("p", w, synthetic_batches(w, 200, batch_rows=100), finisher(w))
        finally:
            stop.set()
            poller.join()
    assert whole == {h: 200 for h in w.each_hour()}
    assert seen and all(counts == whole for counts in seen)

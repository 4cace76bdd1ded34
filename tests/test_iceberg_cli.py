"""`--dest iceberg:...` as a user runs it: the CLI as a subprocess into a local warehouse and into a warehouse on a
real S3-compatible server on loopback (moto, tests/s3.py): exactly once across re-runs, status, verify, verify
--deep, report, maintain, kill -9 then re-run; a lookback reload, and a reader polling during reloads of a window
between two versions, each on a local path and on S3."""

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
from sink_helpers import batch, finisher, hour_events, read_of, window
from test_delta_cli import assert_hours_as_served
from test_parquet_s3 import cli, run_args, said

import amplitude_export
from amplitude_export.client import ExportClient
from amplitude_export.config import Credentials, Secret
from amplitude_export.fake_server import FakeExportServer
from amplitude_export.pipeline import run
from amplitude_export.sinks.iceberg import IcebergSink
from amplitude_export.verify import verify

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
    dest = f"iceberg:{tmp_path / 'my warehouse'}"  # a space, which a file URI would percent-encode
    check_day(dest, fake_server, tmp_path, s3_free_env(), [])
    assert (tmp_path / "my warehouse" / "catalog.db").is_file()
    assert list((tmp_path / "my warehouse" / "amplitude" / "events" / "data").rglob("*.parquet"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "logs", "my warehouse", "report.html"]


def test_a_warehouse_directory_with_a_hash_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    result = cli("run", "--api-key", "k", "--secret-key", SECRET, "--base-url", "http://127.0.0.1:9", "--start",
                 "2024-03-01", "--end", "2024-03-01", "--dest", f"iceberg:{tmp_path / 'wh#1'}", env=s3_free_env(),
                 cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, said(result)
    assert result.stderr.strip().endswith("choose a directory without '#'"), said(result)
    assert list(tmp_path.iterdir()) == []


def test_a_catalog_that_cannot_be_reached_leaves_no_warehouse_directory(tmp_path: Path) -> None:
    catalog = "postgresql://postgres@127.0.0.1:5432/amplitude_export_no_such_database"
    result = cli("run", "--api-key", "k", "--secret-key", SECRET, "--base-url", "http://127.0.0.1:9", "--start",
                 "2024-03-01", "--end", "2024-03-01", "--dest", f"iceberg:{tmp_path / 'lake' / 'wh'}?catalog={catalog}",
                 env=s3_free_env(), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 4, said(result)
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr, said(result)
    assert not (tmp_path / "lake").exists()


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


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def warehouse(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, str] | None]:
    """What IcebergSink takes for a warehouse on a local path or on the loopback S3 server, and its options."""
    if request.param == "local":
        return str(tmp_path / "warehouse"), None
    s3: LoopbackS3 = request.getfixturevalue("s3")
    return f"s3://{s3.new_bucket()}/wh?catalog=sqlite:///{tmp_path / 'catalog.db'}", s3.options


def test_lookback_reloads_only_the_hours_amplitude_changed(warehouse: tuple[str, dict[str, str] | None],
                                                          tmp_path: Path) -> None:
    dest, storage = warehouse
    now = datetime(2024, 3, 3, 2, 30, tzinfo=UTC)  # ready through 2024-03-02T23
    with (stamina.set_testing(True, attempts=100, cap=True),
          FakeExportServer(events_per_hour=20, data_start=DAY, data_end=DAY + timedelta(days=2, hours=-1)) as server):
        credentials = Credentials("demo-key", Secret("demo-secret"), "us", server.url)
        with ExportClient(credentials) as client, IcebergSink(dest, storage_options=storage) as sink:
            assert run(client, sink, project="p", start="2024-03-01", end="2024-03-02", data_dir=tmp_path,
                       now=now).exit_code == 0
            before = {h: r.run_id for h, r in sink.ledger("p").items()}
            server.set_hour_version(DAY + timedelta(hours=30), 1)  # Amplitude re-exports two hours
            server.set_hour_version(DAY + timedelta(hours=31), 1)
            second = run(client, sink, project="p", data_dir=tmp_path, now=now, lookback_hours=24)
        expected = server.expected_uuids(DAY, DAY + timedelta(hours=47))
    with IcebergSink(dest, read_only=True, storage_options=storage) as reader:  # what another process sees
        after = {h: r.run_id for h, r in reader.ledger("p").items()}
        stored = reader.read_arrow().column("uuid").to_pylist()
        assert verify(reader, "p").complete
    assert [h.strftime("%Y-%m-%dT%H") for h in second.changed_hours] == ["2024-03-02T06", "2024-03-02T07"]
    assert len({h for h in after if after[h] != before[h]}) == 2
    assert len(stored) == len(set(stored)) and set(stored) == expected
    with IcebergSink(dest, read_only=True, storage_options=storage) as reader:
        assert_hours_as_served(reader.read_arrow(), server, [DAY + timedelta(hours=30), DAY + timedelta(hours=31)])


@pytest.mark.parametrize("place", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_a_reader_polling_during_reloads_never_sees_a_window_twice_or_half(place: str,
                                                                           request: pytest.FixtureRequest,
                                                                           tmp_path: Path) -> None:
    root, storage = str(tmp_path / "warehouse"), None
    if place == "s3":
        s3: LoopbackS3 = request.getfixturevalue("s3")
        root, storage = f"s3://{s3.new_bucket()}/wh?catalog=sqlite:///{tmp_path / 'catalog.db'}", s3.options
    w = window(0, 3)
    versions = [[row for h in w.each_hour() for row in hour_events(h, [f"{h:%H}-{n}-{v}" for n in range(150)])]
                for v in range(2)]  # two versions of the window: every uuid differs
    stop = threading.Event()
    reloads: list[int] = []

    def reload() -> None:
        with IcebergSink(root, storage_options=storage) as writer:
            n = 1
            while not stop.is_set():  # each reload: several batches, one commit
                rows = versions[n % 2]
                writer.write_window("p", w, read_of([batch(rows[i:i + 100]) for i in range(0, len(rows), 100)],
                                                     finisher(w, rows)))
                reloads.append(n)
                n += 1

    with IcebergSink(root, storage_options=storage) as first:
        first.write_window("p", w, read_of([batch(versions[0])], finisher(w, versions[0])))
    writer = threading.Thread(target=reload)
    writer.start()
    seen: set[str] = set()
    reads = 0
    try:
        while reads < 8 or (len(reloads) < 4 and writer.is_alive()):
            reads += 1
            with IcebergSink(root, read_only=True, storage_options=storage) as reader:
                names = reader.read_arrow().column("uuid").to_pylist()
                assert verify(reader, "p").complete  # the ledger read with the rows agrees with them
            found = {name.rsplit("-", 1)[1] for name in names}
            assert len(names) == 600 and len(set(names)) == 600 and len(found) == 1, (len(names), found)
            seen |= found
    finally:
        stop.set()
        writer.join()
    assert len(reloads) >= 4 and seen == {"0", "1"}  # the reader saw the window change while it polled

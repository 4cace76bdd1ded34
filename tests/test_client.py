"""The Export API client and the extract pipeline, over real loopback HTTP against the fake server."""

from __future__ import annotations

import gzip
import json
import time
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import stamina

from amplitude_export.client import CACHED, EMPTY, OK, ExportClient, classify
from amplitude_export.config import Credentials, Secret
from amplitude_export.errors import AuthError, TransientError, WindowTooLargeError
from amplitude_export.fake_server import FakeExportServer
from amplitude_export.pipeline import extract
from amplitude_export.windows import Window

DAY = Window(datetime(2024, 3, 1, 0, tzinfo=UTC), datetime(2024, 3, 1, 23, tzinfo=UTC))
NOW = datetime(2024, 4, 1, tzinfo=UTC)


@pytest.fixture(autouse=True)
def no_backoff_sleeps() -> Iterator[None]:
    """Retries happen, but without sleeping (stamina's test mode keeps our attempt count)."""
    with stamina.set_testing(True, attempts=100, cap=True):
        yield


def client_for(server: FakeExportServer, **options: object) -> ExportClient:
    credentials = Credentials(server.api_key, Secret("demo-secret"), "us", server.url)
    return ExportClient(credentials, **options)  # type: ignore[arg-type]


def assert_valid_zip(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        assert any(name.endswith(".json.gz") for name in archive.namelist())


def test_plain_download_lands_a_verified_archive(tmp_path: Path) -> None:
    with FakeExportServer() as server, client_for(server) as client:
        result = client.fetch(DAY, tmp_path)
    assert result.status == OK and result.attempts == 1
    assert result.path == tmp_path / "20240301T00_20240301T23.zip"
    assert_valid_zip(result.path)
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("faults", [["500"], ["502", "503"], ["truncate"], ["corrupt"], ["notzip"], ["reset"]])
def test_transient_faults_are_retried_then_succeed(tmp_path: Path, faults: list[str],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with FakeExportServer(faults=faults) as server, client_for(server) as client:
        result = client.fetch(DAY, tmp_path)
        requests = list(server.requests)
    assert result.status == OK and result.attempts == len(faults) + 1
    assert len(requests) == len(faults) + 1
    assert_valid_zip(result.path)  # type: ignore[arg-type]
    assert not list(tmp_path.glob("*.part"))
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and r.name == "amplitude_export.client"]
    assert len(warnings) == len(faults) and all("2024-03-01T00" in r.getMessage() for r in warnings)


def test_retries_are_bounded(tmp_path: Path) -> None:
    with FakeExportServer(faults=["500"] * 10) as server, client_for(server, max_attempts=3) as client:
        with pytest.raises(TransientError, match="500"):
            client.fetch(DAY, tmp_path)
        assert len(server.requests) == 3
    assert not list(tmp_path.iterdir())


def test_429_honours_retry_after(tmp_path: Path) -> None:
    with stamina.set_testing(False):
        with FakeExportServer(faults=["429"], retry_after=1) as server, \
                client_for(server, wait_initial=0.01, wait_max=0.05) as client:
            began = time.monotonic()
            result = client.fetch(DAY, tmp_path)
            elapsed = time.monotonic() - began
    assert result.status == OK and result.attempts == 2
    assert 1.0 <= elapsed < 10


def test_404_is_an_empty_window(tmp_path: Path) -> None:
    quiet = Window(datetime(2024, 3, 1, 0, tzinfo=UTC), datetime(2024, 3, 1, 1, tzinfo=UTC))
    hours = set(quiet.each_hour())
    with FakeExportServer(empty_hours=hours) as server, client_for(server) as client:
        result = client.fetch(quiet, tmp_path)
    assert result.status == EMPTY and result.path is None


def test_401_stops_at_once_naming_credentials_and_region(tmp_path: Path) -> None:
    with FakeExportServer(secret_key="right") as server:
        credentials = Credentials(server.api_key, Secret("wrong-secret-xyz"), "us", server.url)
        # the fake server stands in for the US host; the EU host is not there, so the probe finds nothing
        with ExportClient(credentials, region_hosts={"us": server.url, "eu": "http://127.0.0.1:9"}) as client, \
                pytest.raises(AuthError) as info:
            client.fetch(DAY, tmp_path)
        assert len(server.requests) == 1
    message = str(info.value)
    assert "401" in message and "US host" in message and "--region" in message
    assert "wrong-secret-xyz" not in message and "wrong-secret-xyz" not in repr(client)


def test_401_from_a_custom_host_blames_no_region(tmp_path: Path) -> None:
    with FakeExportServer(secret_key="right") as server:
        credentials = Credentials(server.api_key, Secret("wrong-secret-xyz"), "us", server.url)
        with ExportClient(credentials) as client, pytest.raises(AuthError) as info:
            client.fetch(DAY, tmp_path)
        url = server.url
    message = str(info.value)
    assert "401" in message and f"host {url} (--base-url)" in message and "--base-url is the" in message
    assert "region" not in message and "US host" not in message


def test_400_is_too_large_and_504_after_retries_is_too_large(tmp_path: Path) -> None:
    with FakeExportServer(max_archive_bytes=1) as server, client_for(server) as client:
        with pytest.raises(WindowTooLargeError) as info:
            client.fetch(DAY, tmp_path)
        assert info.value.status == 400 and len(server.requests) == 1
    with FakeExportServer(timeout_over_hours=6) as server, client_for(server, max_attempts=2) as client:
        with pytest.raises(WindowTooLargeError) as info:
            client.fetch(DAY, tmp_path)
        assert info.value.status == 504 and len(server.requests) == 2


def test_504s_then_a_503_on_the_last_attempt_still_split_the_window(tmp_path: Path) -> None:
    """Persistent 504s mean the window is too large to prepare, whatever the last answer was."""
    faults = ["504", "504", "503"]  # every window's first three requests
    with FakeExportServer(faults=faults) as server, client_for(server, max_attempts=3) as client:
        with pytest.raises(WindowTooLargeError) as info:
            client.fetch(DAY, tmp_path)
        assert info.value.status == 504 and info.value.attempts == 3
        assert [status for _, _, status in server.requests] == [504, 504, 503]
    with FakeExportServer(faults=faults) as server, client_for(server, max_attempts=3) as client:
        report = extract(client, start="2024-03-01T00", end="2024-03-01T01", data_dir=tmp_path, now=NOW)
        asked = [(start, end) for start, end, _ in server.requests]
    assert asked[:3] == [("20240301T00", "20240301T01")] * 3  # then its halves, at once
    assert sorted(asked[3:]) == [("20240301T00", "20240301T00")] * 3 + [("20240301T01", "20240301T01")] * 3
    assert [(o.window.hours, o.status, o.attempts) for o in report.outcomes] == [(1, "failed", 6), (1, "failed", 6)]
    assert all(o.reason is not None and o.reason.startswith("504") for o in report.outcomes)


def test_extract_splits_windows_until_they_fit(tmp_path: Path) -> None:
    with FakeExportServer(timeout_over_hours=6) as server, client_for(server, max_attempts=2) as client:
        report = extract(client, start="2024-03-01", end="2024-03-01", data_dir=tmp_path, now=NOW)
        served = server.expected_uuids(DAY.start, DAY.end)
    assert report.exit_code == 0
    archives = sorted((tmp_path / "raw").glob("*.zip"))
    windows = [Window.from_name(p.name.removesuffix(".zip")) for p in archives]
    hours = [h for w in windows for h in w.each_hour()]
    assert hours == list(DAY.each_hour())  # every hour exactly once, in halves of at most 6 hours
    assert all(w.hours <= 6 for w in windows)
    uuids = set()
    for path in archives:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                for line in gzip.decompress(archive.read(name)).splitlines():
                    try:
                        uuids.add(json.loads(line)["uuid"])
                    except (ValueError, KeyError, TypeError):
                        pass
    assert uuids == served


def test_one_hour_still_too_large_is_reported_and_others_complete(tmp_path: Path) -> None:
    big = datetime(2024, 3, 1, 5, tzinfo=UTC)
    with FakeExportServer(events_per_hour=lambda h: 5_000 if h == big else 20,
                          max_archive_bytes=200_000) as server, client_for(server) as client:
        report = extract(client, start="20240301T00", end="20240301T11", window_hours=12, data_dir=tmp_path, now=NOW)
    assert report.exit_code == 1
    assert [str(o.window) for o in report.failed] == ["2024-03-01T05"]
    assert report.failed[0].status == "too_large"
    landed = [Window.from_name(p.name.removesuffix(".zip")) for p in (tmp_path / "raw").glob("*.zip")]
    assert sorted(h for w in landed for h in w.each_hour()) == [h for h in Window(
        datetime(2024, 3, 1, 0, tzinfo=UTC), datetime(2024, 3, 1, 11, tzinfo=UTC)).each_hour() if h != big]


def test_resume_skips_complete_archives(tmp_path: Path) -> None:
    with FakeExportServer() as server, client_for(server) as client:
        first = extract(client, start="2024-03-01", end="2024-03-02", data_dir=tmp_path, now=NOW)
        asked = len(server.requests)
        second = extract(client, start="2024-03-01", end="2024-03-02", data_dir=tmp_path, now=NOW)
        assert len(server.requests) == asked == 2
    assert [o.status for o in first.outcomes] == ["landed", "landed"]
    assert [o.status for o in second.outcomes] == [CACHED, CACHED]


def test_concurrent_downloads_with_random_faults_all_land(tmp_path: Path) -> None:
    with FakeExportServer(fault_rate=0.4, seed=3) as server, client_for(server) as client:
        report = extract(client, start="2024-03-01", end="2024-03-04", data_dir=tmp_path, concurrency=3, now=NOW)
        assert len(server.requests) > 4  # some faults happened
    assert report.exit_code == 0 and len(report.outcomes) == 4
    for path in (tmp_path / "raw").glob("*.zip"):
        assert_valid_zip(path)


@pytest.mark.parametrize(
    ("status", "error"),
    [(400, WindowTooLargeError), (401, AuthError), (403, AuthError), (429, TransientError),
     (500, TransientError), (503, TransientError), (504, TransientError)],
)
def test_status_table(status: int, error: type[Exception]) -> None:
    credentials = Credentials("key", Secret("s3cret"), "eu", "https://analytics.eu.amplitude.com")
    response = httpx.Response(status, headers={"Retry-After": "7"})
    with pytest.raises(error) as info:
        classify(response, DAY, credentials)
    if status == 429:
        assert info.value.retry_after == 7  # type: ignore[attr-defined]
    if error is TransientError:  # what the client decides on (a persistent 504 splits the window) is the status
        assert info.value.status == status  # type: ignore[attr-defined]
    assert "s3cret" not in str(info.value)
    for ok in (200, 404):
        classify(httpx.Response(ok), DAY, credentials)


def test_401_probes_the_other_region_and_names_it(tmp_path: Path) -> None:
    with FakeExportServer(secret_key="other") as us, FakeExportServer() as eu:
        credentials = Credentials("demo-key", Secret("demo-secret"), "us", us.url)
        with ExportClient(credentials, region_hosts={"us": us.url, "eu": eu.url}) as client:
            with pytest.raises(AuthError) as info:
                client.fetch(DAY, tmp_path)
        assert len(eu.requests) == 1 and eu.requests[0][2] != 401
    assert "use --region eu" in str(info.value) and "EU project" in str(info.value)
    assert info.value.region_hint == "eu" and info.value.exit_code == 3


def test_401_everywhere_keeps_the_plain_message(tmp_path: Path) -> None:
    with FakeExportServer(secret_key="x") as us, FakeExportServer(secret_key="y") as eu:
        credentials = Credentials("demo-key", Secret("demo-secret"), "eu", eu.url)
        with ExportClient(credentials, region_hosts={"us": us.url, "eu": eu.url}) as client:
            with pytest.raises(AuthError) as info:
                client.fetch(DAY, tmp_path)
        assert len(us.requests) == 1
    assert info.value.region_hint is None and "check AMP_API_KEY" in str(info.value)


def test_a_resumed_extract_fetches_only_the_hours_no_archive_holds(tmp_path: Path) -> None:
    # 504s split the day into four 6-hour archives
    with FakeExportServer(timeout_over_hours=6) as server, client_for(server, max_attempts=2) as client:
        extract(client, start="2024-03-01", end="2024-03-01", data_dir=tmp_path, now=NOW)
    raw = tmp_path / "raw"
    quarters = sorted(p.name for p in raw.glob("*.zip"))
    assert len(quarters) == 4
    # the 504s are gone: the same day again asks for nothing and lands no 24-hour archive beside the quarters
    with FakeExportServer() as server, client_for(server) as client:
        again = extract(client, start="2024-03-01", end="2024-03-01", data_dir=tmp_path, now=NOW)
        assert server.requests == []
        assert [o.status for o in again.outcomes] == [CACHED] * 4
        assert sorted(p.name for p in raw.glob("*.zip")) == quarters
        # with one quarter lost, only its six hours are asked for
        (raw / "20240301T06_20240301T11.zip").unlink()
        extract(client, start="2024-03-01", end="2024-03-01", data_dir=tmp_path, now=NOW)
        assert server.requests == [("20240301T06", "20240301T11", 200)]
    assert sorted(p.name for p in raw.glob("*.zip")) == quarters

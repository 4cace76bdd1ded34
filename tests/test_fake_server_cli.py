"""`amplitude-export fake-server` as a user starts it: its flags reach the server, over real loopback HTTP."""

from __future__ import annotations

import gzip
import io
import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from amplitude_export.cli import cli
from amplitude_export.fake_server import NOT_ZIP_HTML, TIMEOUT_TEXT, TOO_LARGE_TEXT

AUTH = ("demo-key", "demo-secret")


@contextmanager
def fake_server_cli(cache: Path, *flags: str) -> Iterator[str]:
    """Run `amplitude-export fake-server --port 0 --cache-dir CACHE FLAGS` as a subprocess; yield its export URL
    (from stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
    process = subprocess.Popen(
        [sys.executable, "-c", "from amplitude_export.cli import main; main()", "fake-server", "--port", "0",
         "--cache-dir", str(cache), *flags],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stderr is not None
        seen = []
        for line in process.stderr:  # the log line, then the announcement
            seen.append(line)
            match = re.search(r"fake Export API on (http://\S+) \(pass it as --base-url", line)
            if match:
                break
        else:
            pytest.fail(f"fake-server exited {process.wait()} without serving: {''.join(seen)}")
        yield match.group(1) + "/api/2/export"
    finally:
        process.terminate()  # the members it built stay in CACHE, under tmp_path
        process.wait(timeout=10)


def export(client: httpx.Client, url: str, start: str, end: str) -> httpx.Response:
    return client.get(url, params={"start": start, "end": end}, auth=AUTH)


def test_scripted_faults_retry_after_and_too_large_windows_reach_the_server(tmp_path: Path) -> None:
    flags = ("--faults", "429,503", "--retry-after", "7", "--events-per-hour", "20", "--project-id", "4242",
             "--members-per-hour", "2", "--max-archive-bytes", "40000")
    with fake_server_cli(tmp_path, *flags) as url, httpx.Client(timeout=10) as client:
        throttled = export(client, url, "20240301T05", "20240301T05")
        assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "7"
        assert export(client, url, "20240301T05", "20240301T05").status_code == 503
        served = export(client, url, "20240301T05", "20240301T05")
        assert served.status_code == 200, served.text
        with zipfile.ZipFile(io.BytesIO(served.content)) as archive:
            members = [info.filename for info in archive.infolist() if not info.is_dir()]
            lines = sum(len(gzip.decompress(archive.read(name)).splitlines()) for name in members)
        assert members == ["4242/4242_2024-03-01_5#0.json.gz", "4242/4242_2024-03-01_5#1.json.gz"]
        assert lines == 20
        # a day of the same events is over --max-archive-bytes: after its own scripted faults, 400 as over 4 GB
        day = [export(client, url, "20240301T00", "20240301T23") for _ in range(3)]
        assert [response.status_code for response in day] == [429, 503, 400]
        assert day[2].text == TOO_LARGE_TEXT
    assert sorted(path.name for path in tmp_path.glob("4242_*_20240301T05_*"))[-1].endswith("#1.json.gz")


def statuses(client: httpx.Client, url: str, start: str, end: str, count: int) -> list[int]:
    """The status of `count` requests of one window in a row; 0 for a connection that broke."""
    out = []
    for _ in range(count):
        try:
            out.append(export(client, url, start, end).status_code)
        except httpx.TransportError:
            out.append(0)
    return out


def test_timeouts_on_long_windows_not_a_zip_reset_slow_and_the_data_range_reach_the_server(tmp_path: Path) -> None:
    flags = ("--faults", "notzip,reset,slow", "--slow-seconds", "0.5", "--timeout-over-hours", "6",
             "--events-per-hour", "5", "--data-start", "2024-03-01", "--data-end", "2024-03-01")
    with fake_server_cli(tmp_path, *flags) as url, httpx.Client(timeout=10) as client:
        html = export(client, url, "20240301T00", "20240301T05")
        assert html.status_code == 200 and html.content == NOT_ZIP_HTML
        with pytest.raises(httpx.TransportError):
            export(client, url, "20240301T00", "20240301T05")
        began = time.monotonic()
        slow = export(client, url, "20240301T00", "20240301T05")
        assert slow.status_code == 200 and time.monotonic() - began >= 0.5
        with zipfile.ZipFile(io.BytesIO(slow.content)) as archive:
            assert archive.testzip() is None and len(archive.infolist()) == 1 + 6  # the folder entry, 6 hours
        # 7 hours is over --timeout-over-hours: once its scripted faults are spent, 504 every time
        assert statuses(client, url, "20240301T00", "20240301T06", 4) == [200, 0, 504, 504]
        assert export(client, url, "20240301T00", "20240301T06").text == TIMEOUT_TEXT
        # after --data-end there is nothing: 404
        assert statuses(client, url, "20240302T00", "20240302T00", 4) == [200, 0, 404, 404]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--faults", "429,bogus"], "--faults: unknown 'bogus'"),
        (["--retry-after", "-1"], "--retry-after"),
        (["--events-per-hour", "many"], "--events-per-hour"),
        (["--max-archive-bytes", "0"], "--max-archive-bytes"),
        (["--slow-seconds", "soon"], "--slow-seconds"),
        (["--port", "70000"], "--port"),
        (["--data-start", "2024-13-01"], "invalid date '2024-13-01'"),
        (["--data-start", "2024-03-02", "--data-end", "2024-03-01"], "--data-end 2024-03-01 is before"),
        (["--empty-hours", "2024-03-01T05,noon"], "--empty-hours: cannot read 'noon'"),
        (["--variation", "1.5"], "--variation"),
    ],
)
def test_bad_values_exit_2_with_one_line(flags: list[str], words: str) -> None:
    result = CliRunner().invoke(cli, ["fake-server", "--port", "0", *flags])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.stderr
    assert result.stdout == ""


def test_variation_reaches_the_server(tmp_path: Path) -> None:
    # the same events either way; with the default, about 2 % of the lines vary (new keys, numbers as strings...)
    served: dict[str, list[bytes]] = {}
    for flags in (["--variation", "0"], []):
        day = ("--data-start", "2024-03-01", "--data-end", "2024-03-01")
        with fake_server_cli(tmp_path / f"cache{len(flags)}", "--events-per-hour", "1000", *day, *flags) as url, \
                httpx.Client(auth=AUTH) as client:
            response = export(client, url, "20240301T05", "20240301T05")
        with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
            body = b"".join(gzip.decompress(archive.read(n)) for n in archive.namelist() if n.endswith(".gz"))
        served[" ".join(flags)] = body.splitlines()
    uniform, varied = served["--variation 0"], served[""]
    assert len(uniform) == len(varied) == 1000
    assert [re.search(rb'"uuid":"[^"]*"', a).group() for a in uniform] == [  # type: ignore[union-attr]
        re.search(rb'"uuid":"[^"]*"', b).group() for b in varied]  # type: ignore[union-attr]
    assert 5 < sum(a != b for a, b in zip(uniform, varied, strict=True)) < 40

"""The fake Export API over real loopback HTTP: statuses, faults, member naming, content, and the contract."""

from __future__ import annotations

import base64
import gzip
import io
import logging
import re
import time
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import schemathesis
from conftest import REAL_EVENTS
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from amplitude_export.fake_server import FakeExportServer, member_name, parse_param
from amplitude_export.synthetic import EXPORT_KEYS, NEW_KEYS, OPTIONAL_KEYS, generate_hour, hour_uuids

API_KEY, SECRET_KEY = "demo-key", "demo-secret"  # as the `fake_server` fixture in conftest.py
DAY = datetime(2024, 3, 1, tzinfo=UTC)  # the `fake_server` fixture's one day of data
AUTH = (API_KEY, SECRET_KEY)
REFERENCE = Path(__file__).resolve().parents[1] / "src/amplitude_export/contract"
CONTRACT = REFERENCE / "amplitude-export-openapi.yml"
MEMBER = re.compile(r"^(\d+)/\1_(\d{4}-\d{2}-\d{2})_(\d{1,2})#(\d+)\.json\.gz$")
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d{6})?$")


HTTP = httpx.Client(timeout=10)  # one client for the module: a new one per request costs ~50 ms


@pytest.fixture(scope="module", autouse=True)
def _close_http() -> Iterator[None]:
    yield
    HTTP.close()


def get(server: FakeExportServer, start: str | None, end: str | None, **kwargs: Any) -> httpx.Response:
    params = {name: value for name, value in (("start", start), ("end", end)) if value is not None}
    kwargs.setdefault("auth", AUTH)
    return HTTP.get(f"{server.url}/api/2/export", params=params, **kwargs)


def read_members(body: bytes) -> dict[str, list[bytes]]:
    """Member name -> its NDJSON lines, skipping directory entries; fails on any CRC or gzip error."""
    members: dict[str, list[bytes]] = {}
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None
        for info in archive.infolist():
            if info.is_dir():
                continue
            members[info.filename] = gzip.decompress(archive.read(info)).splitlines()
    return members


def events_of(body: bytes) -> list[dict[str, Any]]:
    return [msgspec.json.decode(line) for lines in read_members(body).values() for line in lines]


# -- the generator -------------------------------------------------------------------------------------------


def test_export_keys_match_a_real_export_line() -> None:
    real = msgspec.json.decode(REAL_EVENTS.read_text().splitlines()[0])
    assert tuple(real) == EXPORT_KEYS
    assert len(EXPORT_KEYS) == 55


def test_generated_events_look_like_real_exports() -> None:
    hour = datetime(2024, 3, 1, 5, tzinfo=UTC)
    events = generate_hour(hour, project_id=187520, seed=0, events=5000, variation=0)
    assert len(events) == 5000
    full = [event for event in events if len(event) == 55]
    assert all(tuple(event) == EXPORT_KEYS for event in full)
    partial = [event for event in events if len(event) != 55]
    assert 0 < len(partial) < 100  # a few lack keys, as the 7th real line does
    for event in partial:
        assert set(EXPORT_KEYS) - set(event) == set(OPTIONAL_KEYS)
        assert [key for key in EXPORT_KEYS if key in event] == list(event)  # still in export order

    for event in events:
        upload = event["server_upload_time"]
        assert TIMESTAMP.match(upload) and TIMESTAMP.match(event["event_time"])
        assert upload.startswith("2024-03-01 05:")
        assert event["app"] == 187520 and event["uuid"]
    assert any(len(event["server_upload_time"]) == 19 for event in events)  # no fraction, now and then
    late = [event for event in events if event["event_time"] < "2024-02-29"]
    assert 0 < len(late) < len(events) * 0.1
    nulls = sum(event["user_id"] is None for event in events)
    assert 0.03 * len(events) < nulls < 0.3 * len(events)
    assert {type(event.get("amplitude_attribution_ids")) for event in events} >= {list, type(None)}

    drift: dict[str, set[type]] = {}
    for event in events:
        for key, value in event["event_properties"].items():
            drift.setdefault(key, set()).add(type(value))
    assert any({int, str} <= kinds or {float, str} <= kinds for kinds in drift.values())
    text = msgspec.json.encode(events).decode()
    for sample in ("東京", "ü", "🎉", "서울"):
        assert sample in text

    uuids = [event["uuid"] for event in events]
    assert 0 < len(uuids) - len(set(uuids)) < 50  # a few exact repeats inside the hour
    size = sum(len(msgspec.json.encode(event)) for event in events) / len(events)
    assert 1400 < size < 2000  # the benchmark assumes about 1.7 KB per event


def test_a_varied_hour_varies_a_few_lines_as_real_exports_do() -> None:
    hour = datetime(2024, 3, 1, 5, tzinfo=UTC)
    uniform = generate_hour(hour, project_id=187520, seed=0, events=5000, variation=0)
    varied = generate_hour(hour, project_id=187520, seed=0, events=5000)
    assert [e["uuid"] for e in varied] == [e["uuid"] for e in uniform]  # the same events, some of them varied
    changed = [(a, b) for a, b in zip(uniform, varied, strict=True) if a != b]
    assert 0.01 * 5000 < len(changed) < 0.03 * 5000  # DEFAULT_VARIATION: 2 %
    seen = set()
    for before, after in changed:
        assert after["uuid"] == before["uuid"]
        for key in set(before) | set(after):
            old, new = before.get(key, "absent"), after.get(key, "absent")
            if old == new and type(old) is type(new):
                continue
            if new == "absent":
                seen.add("omitted key")
            elif old == "absent":
                seen.add("new key")
            elif key == "paying":
                assert isinstance(new, bool)
                seen.add("paying boolean")
            elif key == "is_attribution_event":
                assert new == "false"
                seen.add("string for a boolean")
            elif isinstance(new, str) and isinstance(old, (int, float)):
                assert new in (str(old), str(float(old)))  # after an integral float, perhaps
                seen.add("number as string")
            elif isinstance(new, float) and isinstance(old, int):
                assert new == old
                seen.add("integral float")
            elif key.endswith("_time"):
                assert new == old[:19]
                seen.add("no microseconds")
            elif isinstance(new, list) and isinstance(old, str) or key == "amplitude_attribution_ids":
                seen.add("array or string")
    assert seen >= {"omitted key", "new key", "paying boolean", "number as string", "integral float",
                    "no microseconds", "array or string", "string for a boolean"}


def test_generator_is_deterministic_and_versions_change_content() -> None:
    hour = datetime(2024, 3, 1, 5, tzinfo=UTC)
    first = generate_hour(hour, project_id=1, seed=7, events=300)
    assert first == generate_hour(hour, project_id=1, seed=7, events=300)
    assert first == generate_hour(hour.replace(tzinfo=None), project_id=1, seed=7, events=300)
    assert first != generate_hour(hour, project_id=1, seed=8, events=300)
    revised = generate_hour(hour, project_id=1, seed=7, events=300, version=1)
    assert revised != first
    assert {event["uuid"] for event in revised} == {event["uuid"] for event in first}


def test_some_uuids_come_back_in_the_next_hour() -> None:
    hour = datetime(2024, 3, 1, 5, tzinfo=UTC)
    before = {event["uuid"] for event in generate_hour(hour, project_id=1, seed=0, events=5000)}
    after = generate_hour(hour + timedelta(hours=1), project_id=1, seed=0, events=5000, previous_events=5000)
    assert 1 <= len(before & {event["uuid"] for event in after}) <= 5
    revised = generate_hour(
        hour + timedelta(hours=1), project_id=1, seed=0, events=5100, previous_events=5000, version=1
    )
    assert before & {event["uuid"] for event in after} == before & {event["uuid"] for event in revised}
    assert hour_uuids(hour + timedelta(hours=1), project_id=1, seed=0, events=5100, previous_events=5000) == {
        event["uuid"] for event in revised
    }


# -- answers -------------------------------------------------------------------------------------------------


def test_archive_members_are_named_and_filled_as_amplitude_does(fake_server: FakeExportServer) -> None:
    response = get(fake_server, "20240301T04", "20240301T06")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    assert int(response.headers["content-length"]) == len(response.content)
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        names = archive.namelist()
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
    assert names[0] == "187520/"  # the folder entry Amplitude's zips carry
    assert names[1:] == [member_name(187520, DAY.replace(hour=hour), 0) for hour in (4, 5, 6)]
    assert names[1] == "187520/187520_2024-03-01_4#0.json.gz"
    for name in names[1:]:
        assert MEMBER.match(name)

    members = read_members(response.content)
    for name, lines in members.items():
        hour = int(MEMBER.match(name).group(3))  # type: ignore[union-attr]
        for line in lines:
            event = msgspec.json.decode(line)
            known = [key for key in event if key in EXPORT_KEYS]  # in export order, some omitted
            assert known == [key for key in EXPORT_KEYS if key in event]
            assert set(event) - set(EXPORT_KEYS) <= NEW_KEYS
            assert event["server_upload_time"].startswith(f"2024-03-01 {hour:02d}:")
    events = events_of(response.content)
    assert len(events) == fake_server.expected_events("20240301T04", "20240301T06") == 60
    assert {event["uuid"] for event in events} == fake_server.expected_uuids(
        DAY.replace(hour=4), DAY.replace(hour=6)
    )
    assert fake_server.requests == [("20240301T04", "20240301T06", 200)]


def test_bare_dates_mean_the_whole_day(fake_server: FakeExportServer) -> None:
    response = get(fake_server, "20240301", "20240301")
    assert response.status_code == 200
    names = read_members(response.content)
    hours = {int(MEMBER.match(name).group(3)) for name in names}  # type: ignore[union-attr]
    assert hours == set(range(24))
    assert parse_param("20240301", is_end=True) == DAY.replace(hour=23)


def test_members_split_by_count_and_by_size() -> None:
    with FakeExportServer(events_per_hour=25, members_per_hour=3, data_start=DAY, data_end=DAY) as server:
        members = read_members(get(server, "20240301T00", "20240301T00").content)
        assert [len(lines) for lines in members.values()] == [9, 8, 8]
        assert list(members) == [f"187520/187520_2024-03-01_0#{index}.json.gz" for index in range(3)]
    with FakeExportServer(
        events_per_hour=25, max_events_per_member=10, data_start=DAY, data_end=DAY
    ) as server:
        members = read_members(get(server, "20240301T00", "20240301T00").content)
        assert [len(lines) for lines in members.values()] == [9, 8, 8]


@pytest.mark.parametrize(
    "auth",
    [None, ("demo-key", "wrong"), ("other-key", SECRET_KEY)],
    ids=["missing", "wrong-secret", "wrong-key"],
)
def test_bad_credentials_answer_401(fake_server: FakeExportServer, auth: tuple[str, str] | None) -> None:
    response = get(fake_server, "20240301T00", "20240301T01", auth=auth)
    assert response.status_code == 401
    assert fake_server.requests == [("20240301T00", "20240301T01", 401)]


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (None, "20240301T01"),
        ("20240301T00", None),
        ("2024-03-01", "20240301T01"),
        ("20240301T24", "20240301T01"),
        ("20240230T00", "20240301T01"),
        ("20240301T05", "20240301T04"),
        ("20230101T00", "20240101T01"),
    ],
    ids=["no-start", "no-end", "dashes", "hour-24", "feb-30", "end-before-start", "over-365-days"],
)
def test_bad_windows_answer_400(fake_server: FakeExportServer, start: str | None, end: str | None) -> None:
    assert get(fake_server, start, end).status_code == 400


def test_365_days_is_allowed(fake_server: FakeExportServer) -> None:
    assert get(fake_server, "20230303T00", "20240301T23").status_code == 200


def test_windows_without_data_answer_404() -> None:
    with FakeExportServer(events_per_hour=5, empty_hours={DAY.replace(hour=3)}) as server:
        assert get(server, "20240301T03", "20240301T03").status_code == 404
        assert get(server, "20240301T03", "20240301T04").status_code == 200
        assert server.expected_events("20240301T03", "20240301T04") == 5
    with FakeExportServer(events_per_hour=5, data_start=DAY, data_end=DAY) as server:
        assert get(server, "20240229T00", "20240229T23").status_code == 404
        assert get(server, "20240229T00", "20240301T00").status_code == 200


def test_archives_over_the_limit_answer_400(fake_server: FakeExportServer) -> None:
    fake_server.max_archive_bytes = 20_000
    response = get(fake_server, "20240301T00", "20240301T23")
    assert response.status_code == 400
    assert "4GB" in response.text
    assert get(fake_server, "20240301T00", "20240301T00").status_code == 200


def test_same_request_gives_same_bytes_until_the_hour_is_reexported(fake_server: FakeExportServer) -> None:
    first = get(fake_server, "20240301T00", "20240301T01").content
    assert get(fake_server, "20240301T00", "20240301T01").content == first
    before = fake_server.expected_uuids("20240301T01", "20240301T01")

    fake_server.set_hour_version(DAY.replace(hour=1), 1)
    revised = get(fake_server, "20240301T00", "20240301T01").content
    assert revised != first
    old, new = read_members(first), read_members(revised)
    hour0, hour1 = member_name(187520, DAY, 0), member_name(187520, DAY.replace(hour=1), 0)
    assert old[hour0] == new[hour0]
    assert old[hour1] != new[hour1]
    after = fake_server.expected_uuids("20240301T01", "20240301T01")
    assert before < after  # the re-export keeps the old events and adds some
    assert {msgspec.json.decode(line)["uuid"] for line in new[hour1]} == after


# -- faults --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["500", "502", "503", "504", "429"])
def test_status_faults_come_first_then_the_answer(status: str) -> None:
    with FakeExportServer(events_per_hour=5, faults=[status], retry_after=3) as server:
        response = get(server, "20240301T00", "20240301T01")
        assert response.status_code == int(status)
        if status == "429":
            assert response.headers["retry-after"] == "3"
        assert get(server, "20240301T00", "20240301T01").status_code == 200
        # faults count per window: another window starts with its own first fault
        assert get(server, "20240302T00", "20240302T01").status_code == int(status)
        assert [entry[2] for entry in server.requests] == [int(status), 200, int(status)]


def test_truncate_closes_the_connection_mid_body() -> None:
    with FakeExportServer(events_per_hour=50, faults=["truncate"]) as server:
        with pytest.raises(httpx.RemoteProtocolError):
            get(server, "20240301T00", "20240301T03")
        assert get(server, "20240301T00", "20240301T03").status_code == 200
        assert server.requests[0][2] == 200


def test_the_streamed_archive_is_the_zip_zipfile_writes(tmp_path: Path) -> None:
    """The answer is made on the fly from the cached members; it must be byte for byte what zipfile writes
    (the folder entry, stored members, their CRCs), including where the `corrupt` fault flips bytes."""
    start, end = datetime(2024, 3, 1, tzinfo=UTC), datetime(2024, 3, 1, 5, tzinfo=UTC)
    for options in ({"members_per_hour": 3}, {"malformed_lines": True}, {"empty_hours": [start]}):
        with FakeExportServer(events_per_hour=40, **options) as server:  # type: ignore[arg-type]
            written = tmp_path / "written.zip"
            corrupt_at = server.build_archive(start, end, written)
            streamed = server.stream_archive(start, end)
            assert streamed is not None
            size, streamed_corrupt_at, chunks = streamed
            data = b"".join(chunks)
            assert data == written.read_bytes() and size == len(data) and streamed_corrupt_at == corrupt_at
            assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None


def test_an_archive_that_needs_zip64_is_written_by_zipfile_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past 4 GB (or 65 535 entries) `stream_archive` declines and the answer is the zip zipfile wrote."""
    with FakeExportServer(events_per_hour=20) as server:
        streamed = server.stream_archive(datetime(2024, 3, 1, tzinfo=UTC), datetime(2024, 3, 1, 2, tzinfo=UTC))
        assert streamed is not None
        expected = b"".join(streamed[2])
        monkeypatch.setattr(server, "stream_archive", lambda start, end: None)
        answer = get(server, "20240301T00", "20240301T02")
        assert answer.status_code == 200 and answer.content == expected
        # the handler removes its temporary zip after the last byte is sent, so the client may see the body first
        deadline = time.monotonic() + 30
        while list(server._cache_dir.glob("*.zip")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not list(server._cache_dir.glob("*.zip"))  # the temporary zip is gone


def test_corrupt_body_fails_the_zip_crc() -> None:
    with FakeExportServer(events_per_hour=50, faults=["corrupt"]) as server:
        bad = get(server, "20240301T00", "20240301T01")
        good = get(server, "20240301T00", "20240301T01")
    assert bad.status_code == good.status_code == 200
    assert len(bad.content) == len(good.content) == int(bad.headers["content-length"])
    assert bad.content != good.content
    with zipfile.ZipFile(io.BytesIO(bad.content)) as archive:
        assert archive.testzip() is not None  # the first bad member's name
    read_members(good.content)


def test_notzip_answers_200_with_html() -> None:
    with FakeExportServer(events_per_hour=5, faults=["notzip"]) as server:
        response = get(server, "20240301T00", "20240301T01")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert not zipfile.is_zipfile(io.BytesIO(response.content))


def test_slow_answers_late_but_answers() -> None:
    with FakeExportServer(events_per_hour=5, faults=["slow"], slow_seconds=0.5) as server:
        began = time.monotonic()
        assert get(server, "20240301T00", "20240301T00").status_code == 200
        assert time.monotonic() - began >= 0.5
        with pytest.raises(httpx.ReadTimeout):
            HTTP.get(
                f"{server.url}/api/2/export",
                params={"start": "20240302T00", "end": "20240302T00"},
                auth=AUTH,
                timeout=0.1,
            )


def test_reset_drops_the_connection() -> None:
    with FakeExportServer(events_per_hour=5, faults=["reset"]) as server:
        with pytest.raises(httpx.TransportError):
            get(server, "20240301T00", "20240301T00")
        assert get(server, "20240301T00", "20240301T00").status_code == 200
        assert [entry[2] for entry in server.requests] == [0, 200]


def test_long_windows_time_out_with_504() -> None:
    with FakeExportServer(events_per_hour=5, timeout_over_hours=2) as server:
        assert get(server, "20240301T00", "20240301T02").status_code == 504
        assert get(server, "20240301T00", "20240301T02").status_code == 504
        assert get(server, "20240301T00", "20240301T01").status_code == 200


def test_random_faults_are_deterministic_and_never_three_in_a_row() -> None:
    def statuses(server: FakeExportServer) -> list[list[int]]:
        runs = []
        for day in range(1, 7):
            codes = []
            for _ in range(6):  # a client with 6 attempts
                try:
                    codes.append(get(server, f"202403{day:02d}T00", f"202403{day:02d}T00").status_code)
                except httpx.TransportError:
                    codes.append(-1)  # truncated
            runs.append(codes)
        return runs

    with FakeExportServer(events_per_hour=5, fault_rate=0.7, seed=3, retry_after=0) as server:
        first = statuses(server)
        truncations = sum(1 for entry in server.requests if entry[2] == 200) - sum(
            codes.count(200) for codes in first
        )
    with FakeExportServer(events_per_hour=5, fault_rate=0.7, seed=3, retry_after=0) as server:
        assert statuses(server) == first
    assert truncations >= 0
    for codes in first:
        assert 200 in codes[:3]  # at most two faults before a good answer
        faulted = [code != 200 for code in codes]
        assert not any(all(faulted[index : index + 3]) for index in range(len(faulted) - 2))
    assert sum(code != 200 for codes in first for code in codes) >= 6


def test_malformed_lines_are_served_and_counted() -> None:
    with FakeExportServer(events_per_hour=10, malformed_lines=True, members_per_hour=2) as server:
        members = read_members(get(server, "20240301T00", "20240301T01").content)
        assert server.expected_rejects("20240301T00", "20240301T01") == 4
    bad = 0
    for name, lines in members.items():
        for line in lines:
            try:
                value = msgspec.json.decode(line)
            except msgspec.DecodeError:
                bad += 1
                assert name.endswith("#0.json.gz")
                continue
            if not isinstance(value, dict):
                bad += 1
    assert bad == 4
    assert sum(len(lines) for lines in members.values()) == 20 + 4


def test_a_lines_file_is_served_as_it_is_in_the_hours_of_its_upload_times(tmp_path: Path) -> None:
    real = REAL_EVENTS.read_bytes().splitlines()  # five uploaded 2025-07-01 17:xx, one in 2023, one in 2021
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b"\n".join(real) + b"\n\n")  # a blank line is skipped
    with FakeExportServer(lines_file=corpus, members_per_hour=2) as server:
        assert server.expected_events("20250701T00", "20250701T23") == 5
        assert server.expected_uuids("20230101T00", "20230101T23") == {msgspec.json.decode(real[5])["uuid"]}
        members = read_members(get(server, "20250701T17", "20250701T17").content)
        assert list(members) == [member_name(187520, datetime(2025, 7, 1, 17, tzinfo=UTC), n) for n in (0, 1)]
        # byte for byte, in the file's order, split over the hour's members
        assert [line for lines in members.values() for line in lines] == real[:5]
        assert get(server, "20250701T16", "20250701T16").status_code == 404
        assert read_members(get(server, "20230101T19", "20230101T19").content) == {
            member_name(187520, datetime(2023, 1, 1, 19, tzinfo=UTC), 0): [real[5]]
        }
        with pytest.raises(ValueError, match="as it is"):
            server.set_hour_version(datetime(2025, 7, 1, 17, tzinfo=UTC), 1)
    corpus.write_bytes(real[0] + b"\n" + b'{"uuid": "no upload time"}\n')
    with pytest.raises(ValueError, match="line 2: no server_upload_time"):
        FakeExportServer(lines_file=corpus)


def test_a_lines_file_with_a_deletion_job_serves_the_kept_lines_as_they_are(tmp_path: Path) -> None:
    """A scrubbed job removes its users' lines from a lines file's hours too (the other lines byte for byte), and
    the other APIs answer for a lines file's users, who are none of the fake project's own."""
    real = REAL_EVENTS.read_bytes().splitlines()[:5]  # uploaded 2025-07-01 17:xx
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b"\n".join(real) + b"\n")
    with FakeExportServer(lines_file=corpus) as probe:
        doomed = next(iter(probe.apis.project.pool))  # a user of the project, to give one line
    event = msgspec.json.decode(real[2])
    event["amplitude_id"] = doomed
    lines = [*real[:2], msgspec.json.encode(event), *real[3:]]
    corpus.write_bytes(b"\n".join(lines) + b"\n")
    with FakeExportServer(lines_file=corpus) as server:
        server.apis.delete_users([doomed], day=datetime(2025, 7, 1, tzinfo=UTC).date())
        assert server.expected_events("20250701T00", "20250701T23") == 4
        members = read_members(get(server, "20250701T17", "20250701T17").content)
        assert [line for kept in members.values() for line in kept] == real[:2] + real[3:]
        cohorts = HTTP.get(f"{server.url}/api/3/cohorts", auth=AUTH)
        assert cohorts.status_code == 200 and cohorts.json()["cohorts"], cohorts.text


def test_logs_never_hold_the_secret(fake_server: FakeExportServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    get(fake_server, "20240301T00", "20240301T00")
    get(fake_server, "20240301T00", "20240301T00", auth=("demo-key", "not-it"))
    token = base64.b64encode(f"{API_KEY}:{SECRET_KEY}".encode()).decode()
    assert caplog.records, "the server logs its requests"
    assert SECRET_KEY not in caplog.text and token not in caplog.text


# -- the contract --------------------------------------------------------------------------------------------


def call_and_validate(case: Any, base_url: str, auth: tuple[str, str] | None) -> int:
    """Send a schemathesis case to the fake server and run the contract checks on the answer; its status."""
    response = case.call(base_url=base_url, auth=auth)
    case.validate_response(
        response,
        # the contract's pattern admits impossible dates (month 13, hour 99), which the API rejects with 400
        excluded_checks=[positive_data_acceptance],
        # marks the credentials as ours, so `ignored_auth` probes the server without them and with wrong ones
        transport_kwargs={"auth": auth} if auth else None,
    )
    assert response.status_code in {200, 400, 401, 404}, response.status_code
    return response.status_code


def test_answers_conform_to_the_openapi_contract() -> None:
    """Property-based: every answer (faults off) is a status and content type the contract declares."""
    schema = schemathesis.openapi.from_path(str(CONTRACT))
    operation = schema["/api/2/export"]["GET"]
    seen: set[int] = set()
    with FakeExportServer(events_per_hour=3, data_start=DAY, data_end=DAY + timedelta(days=2)) as server:

        @settings(
            max_examples=60,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            seen.add(call_and_validate(case, server.url, AUTH))

        check()

        @settings(max_examples=25, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
        def check_negative(case: Any) -> None:
            # parameters the contract forbids (missing, wrong pattern) must be refused with a 4xx
            assert call_and_validate(case, server.url, AUTH) in {400, 401, 404}

        check_negative()
        # and the statuses the generator is unlikely to reach, checked the same way
        for params, auth in [
            ({"start": "20240301T00", "end": "20240301T05"}, AUTH),
            ({"start": "20240310T00", "end": "20240310T05"}, AUTH),
            ({"start": "20240301T00", "end": "20240301T05"}, None),
            ({"start": "20240301T00", "end": "20240301T05"}, (API_KEY, "nope")),
        ]:
            seen.add(call_and_validate(operation.Case(query=params), server.url, auth))
    assert seen == {200, 400, 401, 404}

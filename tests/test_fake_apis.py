"""The fake server's other APIs over real loopback HTTP: each endpoint's shape as shared/reference/other-apis.md
describes it, its faults, the shared concurrency limit, and deletions that thin later exports."""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
import subprocess
import sys
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from click.testing import CliRunner

from amplitude_export.cli import cli
from amplitude_export.fake_server import FakeExportServer

AUTH = ("demo-key", "demo-secret")
DAY = datetime(2024, 3, 1, tzinfo=UTC)
DAY2 = datetime(2024, 3, 2, 23, tzinfo=UTC)
COHORT_KEYS = {"appId", "id", "name", "description", "type", "size", "archived", "finished", "published", "hidden",
               "is_predictive", "is_official_content", "definition", "owners", "viewers", "shortcut_ids", "lastMod",
               "createdAt", "lastComputed", "metadata", "view_count", "popularity", "last_viewed", "chart_id",
               "edit_id", "location_id"}  # fmt: skip
ANNOTATION_KEYS = {"id", "start", "end", "label", "details", "category", "chart_id"}


@pytest.fixture
def server() -> Iterator[FakeExportServer]:
    """Two days of data (2024-03-01..02, 20 events an hour); cohort jobs ready on the second poll."""
    with FakeExportServer(events_per_hour=20, data_start=DAY, data_end=DAY2, apis={"cohort_polls": 1}) as fake:
        yield fake


@pytest.fixture
def api(server: FakeExportServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, auth=AUTH, timeout=10) as client:
        yield client


def exported(client: httpx.Client, start: str, end: str) -> list[dict[str, Any]]:
    """The window's events, amplitude_id as an int (varied lines carry it as a string)."""
    response = client.get("/api/2/export", params={"start": start, "end": end})
    assert response.status_code == 200, response.text
    events = []
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        for info in archive.infolist():
            if not info.is_dir():
                events += [msgspec.json.decode(line) for line in gzip.decompress(archive.read(info)).splitlines()]
    for event in events:
        event["amplitude_id"] = int(event["amplitude_id"])
    return events


def download(client: httpx.Client, cohort_id: str, polls: int, **params: Any) -> httpx.Response:
    """The three steps: request, poll `polls` times (the last must complete), fetch the file (redirects followed)."""
    requested = client.get(f"/api/5/cohorts/request/{cohort_id}", params=params)
    assert requested.status_code == 202, requested.text
    assert requested.json() == {"request_id": requested.json()["request_id"], "cohort_id": cohort_id}
    request_id = requested.json()["request_id"]
    for poll in range(polls):
        status = client.get(f"/api/5/cohorts/request-status/{request_id}")
        done = poll == polls - 1
        assert status.status_code == (200 if done else 202)
        assert status.json() == {"request_id": request_id, "cohort_id": cohort_id,
                                 "async_status": "JOB COMPLETED" if done else "JOB INPROGRESS"}
    return client.get(f"/api/5/cohorts/request/{request_id}/file", follow_redirects=True)


def csv_rows(response: httpx.Response) -> list[list[str]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-encoding"] == "gzip" and response.headers["content-type"].startswith("text/csv")
    assert response.text.startswith('"amplitude_id","user_id"')  # quoted, as Pipedream saw it
    return list(csv.reader(io.StringIO(response.text)))


# -- cohorts -------------------------------------------------------------------------------------------------


def test_cohorts_list_their_members_who_are_users_the_export_serves(server: FakeExportServer,
                                                                    api: httpx.Client) -> None:
    cohorts = api.get("/api/3/cohorts").json()["cohorts"]
    assert len(cohorts) == 5 and len({cohort["id"] for cohort in cohorts}) == 5
    users = {event["amplitude_id"]: event["user_id"] for event in exported(api, "20240301T00", "20240301T23")}
    for cohort in cohorts:
        assert set(cohort) == COHORT_KEYS
        assert cohort["appId"] == 187520 and isinstance(cohort["lastComputed"], int)
        assert cohort["lastComputed"] > DAY2.timestamp()  # epoch seconds, after the data
        rows = csv_rows(download(api, cohort["id"], polls=2))
        assert rows[0] == ["amplitude_id", "user_id"] and len(rows) - 1 == cohort["size"] > 5
        for amplitude_id, user_id in rows[1:]:
            assert users[int(amplitude_id)] == (user_id or None)
    assert [cohort["archived"] for cohort in cohorts].count(True) == 1
    assert server.apis.cohort_downloads == 5
    with FakeExportServer(events_per_hour=20, data_start=DAY, data_end=DAY2) as again, \
            httpx.Client(base_url=again.url, auth=AUTH) as client:
        assert client.get("/api/3/cohorts").json()["cohorts"] == cohorts  # deterministic


def test_user_properties_come_as_extra_columns(api: httpx.Client) -> None:
    cohort = api.get("/api/3/cohorts").json()["cohorts"][1]
    chosen = csv_rows(download(api, cohort["id"], polls=2, props=1, propKeys=["plan", "age"]))
    assert chosen[0] == ["amplitude_id", "user_id", "plan", "age"]
    assert {row[2] for row in chosen[1:]} <= {"free", "pro", "enterprise", "3"}
    every = csv_rows(download(api, cohort["id"], polls=2, props=1))
    assert every[0][:2] == ["amplitude_id", "user_id"] and "gp:plan" not in every[0] and len(every[0]) == 9
    plain = csv_rows(download(api, cohort["id"], polls=2, propKeys=["plan"]))  # without props=1: no columns
    assert plain[0] == ["amplitude_id", "user_id"] and len(plain) == len(every)


def test_jobs_take_polls_and_the_file_waits_for_them() -> None:
    apis = {"cohort_polls": 3}
    with FakeExportServer(events_per_hour=20, data_start=DAY, data_end=DAY.replace(hour=23), apis=apis) as server, \
            httpx.Client(base_url=server.url, auth=AUTH) as api:
        cohort_id = api.get("/api/3/cohorts").json()["cohorts"][0]["id"]
        request_id = api.get(f"/api/5/cohorts/request/{cohort_id}").json()["request_id"]
        early = api.get(f"/api/5/cohorts/request/{request_id}/file")
        assert early.status_code == 400 and early.json()["error"]["type"] == "JobNotCompleted"
        codes = [api.get(f"/api/5/cohorts/request-status/{request_id}").status_code for _ in range(5)]
        assert codes == [202, 202, 202, 200, 200]
        assert api.get(f"/api/5/cohorts/request/{request_id}/file").status_code == 200
        for path in (f"/api/5/cohorts/request/nope{cohort_id}", "/api/5/cohorts/request-status/nope",
                     "/api/5/cohorts/request/nope/file"):
            missing = api.get(path)
            assert missing.status_code == 404 and missing.json()["error"]["http_code"] == 404


def test_large_cohorts_send_the_file_behind_a_redirect_that_expires() -> None:
    apis = {"cohort_polls": 0, "cohort_redirect_over": 50}
    with FakeExportServer(events_per_hour=20, data_start=DAY, data_end=DAY.replace(hour=23), apis=apis) as server, \
            httpx.Client(base_url=server.url, auth=AUTH) as api:
        cohorts = api.get("/api/3/cohorts").json()["cohorts"]
        big = next(cohort for cohort in cohorts if cohort["size"] > 50)
        request_id = api.get(f"/api/5/cohorts/request/{big['id']}").json()["request_id"]
        api.get(f"/api/5/cohorts/request-status/{request_id}")
        first = api.get(f"/api/5/cohorts/request/{request_id}/file")
        assert first.status_code == 302 and "/fake-s3/" in first.headers["location"]
        signed = httpx.get(first.headers["location"])  # pre-signed: no Basic auth
        assert len(csv_rows(signed)) - 1 == big["size"]
        second = api.get(f"/api/5/cohorts/request/{request_id}/file")  # each call hands out a fresh link
        assert second.headers["location"] != first.headers["location"]
        server.apis.s3_link_seconds = -1
        stale = api.get(f"/api/5/cohorts/request/{request_id}/file", follow_redirects=True)
        assert stale.status_code == 403 and b"<Code>AccessDenied</Code>" in stale.content
        small = next(cohort for cohort in cohorts if cohort["size"] <= 50)
        assert len(csv_rows(download(api, small["id"], polls=1))) - 1 == small["size"]  # answered inline


def test_recomputing_moves_last_computed_and_changes_members(server: FakeExportServer, api: httpx.Client) -> None:
    before = api.get("/api/3/cohorts").json()["cohorts"]
    members = csv_rows(download(api, before[2]["id"], polls=2))
    server.apis.project.recompute(before[2]["id"])
    after = api.get("/api/3/cohorts").json()["cohorts"]
    assert after[2]["lastComputed"] > before[2]["lastComputed"]
    assert [c["lastComputed"] for c in after[:2]] == [c["lastComputed"] for c in before[:2]]
    again = csv_rows(download(api, before[2]["id"], polls=2))
    assert set(map(tuple, again[1:])) < set(map(tuple, members[1:])) and after[2]["size"] == len(again) - 1


def test_the_monthly_quota_runs_out_and_usage_says_so() -> None:
    with FakeExportServer(events_per_hour=5, apis={"cohort_quota": 2}) as server, \
            httpx.Client(base_url=server.url, auth=AUTH) as api:
        assert api.get("/api/3/cohorts/usage").json()["rest_download"]["usage"] == 498
        cohort_id = api.get("/api/3/cohorts").json()["cohorts"][0]["id"]
        codes = [api.get(f"/api/5/cohorts/request/{cohort_id}").status_code for _ in range(3)]
        assert codes == [202, 202, 429]
        spent = api.get(f"/api/5/cohorts/request/{cohort_id}")
        assert spent.json()["error"]["type"] == "QuotaExceeded" and "retry-after" not in spent.headers
        usage = api.get("/api/3/cohorts/usage").json()["rest_download"]
        assert usage["limit"] == 500 and usage["usage"] == 500
        assert re.fullmatch(r"\d{4}-\d{2}-01T00:00:00Z", usage["resets_at"])


# -- annotations, events list, active users, sessions --------------------------------------------------------


def test_annotations_in_both_versions_fall_inside_the_data(api: httpx.Client) -> None:
    current = api.get("/api/3/annotations").json()["data"]
    assert len(current) == 5
    for annotation in current:
        assert set(annotation) == ANNOTATION_KEYS
        assert DAY <= datetime.fromisoformat(annotation["start"]) <= DAY2
    old = api.get("/api/2/annotations").json()["data"]
    assert [(a["id"], a["date"], a["label"]) for a in old] == [(a["id"], a["start"][:10], a["label"]) for a in current]
    assert api.get("/api/2/annotations", params={"id": old[1]["id"]}).json()["data"] == [old[1]]
    releases = api.get("/api/3/annotations", params={"category": "Releases"}).json()["data"]
    assert len(releases) == 2 and all(a["category"]["name"] == "Releases" for a in releases)
    charted = api.get("/api/3/annotations", params={"chart_id": "abc123"}).json()["data"]
    assert [a["label"] for a in charted] == ["Pricing page test"]
    assert api.get("/api/3/annotations", params={"category": "Releases", "chart_id": "x"}).status_code == 400
    day_one = api.get("/api/3/annotations", params={"start": "2024-03-01", "end": "2024-03-02"}).json()["data"]
    assert day_one and all(a["start"].startswith("2024-03-01") for a in day_one)
    assert api.get(f"/api/3/annotations/{current[0]['id']}").json() == {"data": current[0]}
    assert api.get("/api/3/annotations/1").status_code == 404
    categories = api.get("/api/3/annotation-categories").json()["data"]
    assert {c["name"] for c in categories} == {a["category"]["name"] for a in current if a["category"]}


def test_the_events_list_counts_the_first_days_events(api: httpx.Client) -> None:
    listed = api.get("/api/2/events/list").json()["data"]
    served = Counter(event["event_type"] for event in exported(api, "20240301T00", "20240301T23"))
    assert {item["value"]: item["totals"] for item in listed} == {k: v for k, v in served.items() if k != "$identify"}
    documented = {"non_active", "value", "totals", "deleted", "flow_hidden", "hidden", "display"}
    assert all(documented | {"id", "name"} <= set(item) for item in listed)


def test_active_users_count_the_users_served_each_day(api: httpx.Client) -> None:
    days = {day: exported(api, f"{day:%Y%m%d}T00", f"{day:%Y%m%d}T23") for day in (DAY, DAY2)}
    answer = api.get("/api/2/users", params={"start": "20240229", "end": "20240302"}).json()["data"]
    assert set(answer) == {"series", "seriesMeta", "seriesLabels", "seriesCollapsed", "xValues"}
    assert answer["xValues"] == ["2024-02-29", "2024-03-01", "2024-03-02"]
    active = [len({event["amplitude_id"] for event in events}) for events in days.values()]
    assert answer["series"] == [[0, *active]]
    by_country = api.get("/api/2/users", params={"start": "20240301", "end": "20240301", "g": "country"}).json()
    assert sum(row[0] for row in by_country["data"]["series"]) == active[0]
    assert "Germany" in by_country["data"]["seriesMeta"] and "(none)" in by_country["data"]["seriesMeta"]
    new = api.get("/api/2/users", params={"start": "20240301", "end": "20240302", "m": "new"}).json()["data"]
    first = {event["amplitude_id"] for event in days[DAY]}
    assert new["series"] == [[active[0], len({e["amplitude_id"] for e in days[DAY2]} - first)]]
    weekly = api.get("/api/2/users", params={"start": "20240301", "end": "20240302", "i": "7"}).json()["data"]
    assert weekly["xValues"] == ["2024-02-26"] and weekly["series"][0][0] <= sum(active)
    for params in ({"start": "20240301"}, {"start": "2024-03-01", "end": "20240302"},
                   {"start": "20240301", "end": "20240302", "m": "paying"}):
        assert api.get("/api/2/users", params=params).status_code == 400


def test_average_session_length_per_day(api: httpx.Client) -> None:
    data = api.get("/api/2/sessions/average", params={"start": "20240301", "end": "20240303"}).json()["data"]
    assert data["xValues"] == ["2024-03-01", "2024-03-02", "2024-03-03"]
    lengths = data["series"][0]
    assert all(isinstance(value, float) for value in lengths) and lengths[2] == 0.0
    assert 60 < lengths[0] < 2100  # sessions last up to ~35 minutes


# -- taxonomy ------------------------------------------------------------------------------------------------


def test_taxonomy_answers_in_its_envelope(api: httpx.Client) -> None:
    categories = api.get("/api/2/taxonomy/category").json()
    assert categories["success"] is True and {"id", "name"} == set(categories["data"][0])
    events = api.get("/api/2/taxonomy/event").json()["data"]
    assert {event["event_type"] for event in events} == {item["value"] for item in
                                                         api.get("/api/2/events/list").json()["data"]}
    assert set(events[0]) >= {"event_type", "category", "description", "display_name", "is_active", "tags", "owner"}
    one = api.get("/api/2/taxonomy/event/Add to Cart").json()
    assert one["data"]["event_type"] == "Add to Cart"
    assert api.get("/api/2/taxonomy/event/Nope").json() == {"success": False, "errors": [{"message": "Not found"}]}
    # event_type travels as a form body on a GET, as the docs say
    cart = api.request("GET", "/api/2/taxonomy/event-property", data={"event_type": "Add to Cart"}).json()["data"]
    assert {prop["event_property"] for prop in cart} >= {"sku", "price", "quantity", "currency"}
    assert all(prop["event_type"] == "Add to Cart" for prop in cart)
    assert {p["event_property"]: p["type"] for p in cart}["quantity"] == "any"  # ints and strings drift
    shared = api.get("/api/2/taxonomy/event-property").json()["data"]
    assert "Drop Id" in {prop["event_property"] for prop in shared} and "sku" not in str(shared)
    users = api.get("/api/2/taxonomy/user-property").json()["data"]
    assert all(prop["user_property"].startswith("gp:") and not prop["deleted"] for prop in users)
    with_deleted = api.get("/api/2/taxonomy/user-property", params={"showDeleted": "true"}).json()["data"]
    assert len(with_deleted) == len(users) + 1 and with_deleted[-1]["deleted"] is True


def test_a_project_without_the_plan_gets_403_from_taxonomy_only() -> None:
    with FakeExportServer(events_per_hour=5, apis={"taxonomy_forbidden": True}) as server, \
            httpx.Client(base_url=server.url, auth=AUTH) as api:
        for path in ("category", "event", "event-property", "user-property"):
            refused = api.get(f"/api/2/taxonomy/{path}")
            assert refused.status_code == 403 and refused.json()["success"] is False
        assert api.get("/api/2/events/list").status_code == 200


# -- auth and the concurrency limit --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/3/cohorts", "/api/2/events/list", "/api/2/taxonomy/event",
                                  "/api/2/deletions/users?start_day=2024-01-01&end_day=2024-02-01"])
def test_auth_answers_401_without_credentials_and_403_with_wrong_ones(server: FakeExportServer, path: str) -> None:
    assert httpx.get(server.url + path).status_code == 401
    wrong = httpx.get(server.url + path, auth=("demo-key", "nope"))
    assert wrong.status_code == 403 and wrong.json()["error"]["metadata"] == {"details": "Invalid API Key"}
    assert "demo-secret" not in wrong.text


def test_more_than_five_in_flight_get_429_and_the_maximum_is_recorded() -> None:
    with FakeExportServer(events_per_hour=5, retry_after=2, apis={"latency": 1.0}) as server:
        # cohort downloads and Dashboard REST calls share the limit; taxonomy has its own, of 4
        paths = ["/api/2/events/list", "/api/3/cohorts", "/api/3/annotations", "/api/3/cohorts/usage"] * 2
        paths += ["/api/2/taxonomy/event", "/api/2/taxonomy/category", "/api/2/taxonomy/user-property",
                  "/api/2/taxonomy/event-property", "/api/2/taxonomy/event/Search"]
        answers: list[httpx.Response] = []
        barrier = threading.Barrier(len(paths))

        def call(path: str) -> None:
            with httpx.Client(base_url=server.url, auth=AUTH, timeout=30) as client:
                barrier.wait()
                answers.append(client.get(path))

        threads = [threading.Thread(target=call, args=(path,)) for path in paths]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        codes = Counter(answer.status_code for answer in answers)
        assert codes == {200: 5 + 4, 429: 3 + 1}
        refused = [answer for answer in answers if answer.status_code == 429]
        assert all(answer.headers["retry-after"] == "2" for answer in refused)
        assert sorted(answer.json()["error"]["metadata"]["limit"] for answer in refused) == [4, 5, 5, 5]
        # a refusal is instant, so refused requests overlap each other only by chance: at least 6 were seen
        assert 5 < server.apis.max_in_flight <= 8 and server.apis.in_flight["dashboard"] == 0
        assert 4 < server.apis.max_in_flight_by_group["taxonomy"] <= 5

    with FakeExportServer(events_per_hour=5) as server, httpx.Client(base_url=server.url, auth=AUTH) as api:
        for path in ("/api/2/events/list", "/api/3/cohorts", "/api/2/taxonomy/event"):
            assert api.get(path).status_code == 200
        assert server.apis.max_in_flight == 1  # one at a time: never over the limit


# -- deletions -----------------------------------------------------------------------------------------------


def test_deletion_jobs_are_requested_listed_and_unstaged(server: FakeExportServer, api: httpx.Client) -> None:
    users = sorted({event["amplitude_id"] for event in exported(api, "20240301T00", "20240301T02")})
    assert api.get("/api/2/deletions/users", params={"start_day": "2020-01-01", "end_day": "2020-06-01"}).json() == []
    made = api.post("/api/2/deletions/users", json={"amplitude_ids": users[:2], "requester": "dpo@example.com",
                                                     "include_mapped_user_ids": True})
    assert made.status_code == 200, made.text
    job = made.json()
    today = datetime.now(UTC).date()
    assert job["status"] == "staging" and date.fromisoformat(job["day"]) > today
    assert [entry["amplitude_id"] for entry in job["amplitude_ids"]] == users[:2]
    assert set(job["amplitude_ids"][0]) == {"amplitude_id", "requester", "requested_on_day", "user_id"}
    listed = api.get("/api/2/deletions/users", params={"start_day": f"{today:%Y%m%d}", "end_day": job["day"]})
    assert listed.json() == [{key: value for key, value in job.items()} | {
        "amplitude_ids": [{k: v for k, v in entry.items() if k != "user_id"} for entry in job["amplitude_ids"]]}]
    unknown = api.post("/api/2/deletions/users", json={"amplitude_ids": [1], "requester": "x"})
    assert unknown.status_code == 400
    ignored = api.post("/api/2/deletions/users", json={"amplitude_ids": [1, users[2]], "requester": "x",
                                                        "ignore_invalid_ids": "true"})
    assert ignored.json()["invalid_ids"] == [1] and len(ignored.json()["amplitude_ids"]) == 3  # same batch
    assert api.post("/api/2/deletions/users", json={"amplitude_ids": list(range(101))}).status_code == 400
    removed = api.delete(f"/api/2/deletions/users/{users[2]}/{job['day']}")
    assert removed.status_code == 200 and removed.json()["amplitude_id"] == users[2]
    for params in ({"start_day": "2024-01-01"}, {"start_day": "2024-01-01", "end_day": "2024-12-01"}):
        assert api.get("/api/2/deletions/users", params=params).status_code == 400


def test_scrubbed_users_vanish_from_later_exports_and_cohorts(server: FakeExportServer, api: httpx.Client) -> None:
    before = exported(api, "20240301T00", "20240302T23")
    counts = Counter(event["amplitude_id"] for event in before)
    doomed = [amplitude_id for amplitude_id, count in counts.most_common(3)]
    cohorts_before = {c["id"]: c["size"] for c in api.get("/api/3/cohorts").json()["cohorts"]}
    api.post("/api/2/deletions/users", json={"amplitude_ids": doomed, "requester": "dpo@example.com"})
    server.apis.advance_deletions()  # submitted: data still there
    assert len(exported(api, "20240301T00", "20240302T23")) == len(before)
    server.apis.advance_deletions()  # scrubbed: no longer accessible
    after = exported(api, "20240301T00", "20240302T23")
    assert len(after) == len(before) - sum(counts[amplitude_id] for amplitude_id in doomed)
    assert not {event["amplitude_id"] for event in after} & set(doomed)
    assert server.expected_events("20240301T00", "20240302T23") == len(after)
    assert server.expected_uuids("20240301T00", "20240302T23") == {event["uuid"] for event in after}
    cohorts_after = {c["id"]: c["size"] for c in api.get("/api/3/cohorts").json()["cohorts"]}
    assert sum(cohorts_after.values()) < sum(cohorts_before.values())
    for cohort_id in cohorts_after:
        assert not {int(row[0]) for row in csv_rows(download(api, cohort_id, polls=2))[1:]} & set(doomed)
    active = api.get("/api/2/users", params={"start": "20240301", "end": "20240301"}).json()["data"]["series"][0][0]
    assert active == len({event["amplitude_id"] for event in after if event["server_upload_time"] < "2024-03-02"})
    server.apis.advance_deletions()
    today = datetime.now(UTC).date()
    window = {"start_day": today.isoformat(), "end_day": f"{today + timedelta(days=30):%Y%m%d}"}
    listed = api.get("/api/2/deletions/users", params=window).json()
    assert [job["status"] for job in listed] == ["done"] and "active_scrub_done_date" in listed[0]


def test_a_job_only_removes_events_uploaded_up_to_its_day(server: FakeExportServer, api: httpx.Client) -> None:
    both = exported(api, "20240301T00", "20240302T23")
    user = Counter(e["amplitude_id"] for e in both if e["server_upload_time"] >= "2024-03-02").most_common(1)[0][0]
    server.apis.delete_users([user], day=date(2024, 3, 1))
    after = exported(api, "20240301T00", "20240302T23")
    assert user not in {e["amplitude_id"] for e in after if e["server_upload_time"] < "2024-03-02"}
    assert [e for e in after if e["amplitude_id"] == user] == [
        e for e in both if e["amplitude_id"] == user and e["server_upload_time"] >= "2024-03-02"]  # came back


# -- the command ---------------------------------------------------------------------------------------------


def test_fake_server_command_turns_the_faults_on(tmp_path: Path) -> None:
    with FakeExportServer(events_per_hour=20, data_start=DAY, data_end=DAY.replace(hour=23)) as twin:
        victim = int(twin.hour_lines(DAY.replace(hour=5))[0]["amplitude_id"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
    process = subprocess.Popen(
        [sys.executable, "-c", "from amplitude_export.cli import main; main()", "fake-server", "--port", "0",
         "--cache-dir", str(tmp_path), "--events-per-hour", "20", "--data-start", "2024-03-01", "--data-end",
         "2024-03-01T23", "--taxonomy-forbidden", "--cohort-quota", "0", "--delete-users", str(victim)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            match = re.search(r"fake Export API on (http://\S+) \(pass it as --base-url", line)
            if match:
                break
        else:
            pytest.fail(f"fake-server exited {process.wait()}")
        with httpx.Client(base_url=match.group(1), auth=AUTH, timeout=10) as api:
            assert api.get("/api/2/taxonomy/event").status_code == 403
            cohort_id = api.get("/api/3/cohorts").json()["cohorts"][0]["id"]
            assert api.get(f"/api/5/cohorts/request/{cohort_id}").status_code == 429
            events = exported(api, "20240301T05", "20240301T05")
            assert events and victim not in {event["amplitude_id"] for event in events}
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_unknown_users_to_delete_exit_2_with_one_line() -> None:
    result = CliRunner().invoke(cli, ["fake-server", "--port", "0", "--delete-users", "12,someone"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--delete-users" in lines[0] and "12, someone" in lines[0]

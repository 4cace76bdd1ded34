"""Amplitude's other REST APIs on the fake server's port: cohorts (list, usage, the three-step download),
annotations (v2 and v3), the events list, active users, average session length, taxonomy and the User Privacy
API's deletion jobs, as `shared/reference/other-apis.md` describes them, with faults on demand.

Where Amplitude's docs are silent the fake decides, and says so here:
- Auth: no credentials 401, wrong ones 403 `{"error":{...,"metadata":{"details":"Invalid API Key"}}}`.
- Errors: `{"error":{http_code,type,message,metadata}}`; taxonomy's `{"success":false,"errors":[{message}]}`.
- An unknown cohort or request id, or a file asked for before its job completed: 404 / 400 error objects.
- The monthly cohort-download quota spent: step 1 answers 429 with type `QuotaExceeded` and no Retry-After
  (the concurrency 429 carries one); `GET /api/3/cohorts/usage` answers `{"rest_download":{limit,usage,resets_at}}`.
- The cohort file is quoted CSV (`"amplitude_id","user_id"`, then requested user properties), sent with
  `Content-Encoding: gzip`; cohorts over `cohort_redirect_over` members answer 302 to a pre-signed link on the
  same port, valid `s3_link_seconds` (403 with S3's XML after).

Limits: requests in flight at once are counted per limit group (the Dashboard REST calls and cohort downloads
share 5, taxonomy 4, deletions 8); one over the limit answers 429 with Retry-After. `max_in_flight` records the
most requests the shared group ever had in flight, the refused ones included, so a test can assert a client
kept under 5. `latency` holds each answer that long, so concurrent clients really overlap.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import threading
import time
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, parse_qs, unquote

import msgspec

from . import clock
from .errors import UsageError
from .fake_project import DAY, DeletionJob, parse_day

if TYPE_CHECKING:
    from .fake_server import FakeExportServer, _Handler

MONTHLY_COHORT_DOWNLOADS = 500
LIMITS = {"dashboard": 5, "taxonomy": 4, "privacy": 8}  # concurrent requests per project
MAX_DELETION_IDS = 100
MAX_DELETION_RANGE = timedelta(days=184)  # "at most six months"
S3_PATH = "/fake-s3/cohort-files/"


class ApiError(Exception):
    """An answer other than success: status, body (JSON-encodable or bytes) and extra headers."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


def error(status: int, kind: str, message: str, **metadata: Any) -> ApiError:
    """The documented error object."""
    return ApiError(status, {"error": {"http_code": status, "type": kind, "message": message,
                                       "metadata": metadata or None}})


class FakeApis:
    """The non-export endpoints of one `FakeExportServer`; reach it as `server.apis`."""

    def __init__(self, server: FakeExportServer, *, cohort_polls: int = 2, cohort_quota: int = MONTHLY_COHORT_DOWNLOADS,
                 cohort_redirect_over: int = 100, s3_link_seconds: float = 60, taxonomy_forbidden: bool = False,
                 delete_users: Iterable[int | str] = (), latency: float = 0.0) -> None:
        """`cohort_polls`: status polls answered `JOB INPROGRESS` before `JOB COMPLETED`. `cohort_quota`: downloads
        left this month. `taxonomy_forbidden`: taxonomy answers 403 (a project without the plan).
        `delete_users`: amplitude ids (or user ids) in a deletion job that is already done."""
        self.server = server
        self.cohort_polls = cohort_polls
        self.cohort_quota = cohort_quota
        self.cohort_redirect_over = cohort_redirect_over
        self.s3_link_seconds = s3_link_seconds
        self.taxonomy_forbidden = taxonomy_forbidden
        self.latency = latency
        self.failing: set[str] = set()  # paths answered 500 every time (a stream's server error that lasts)
        self.project = server.project
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.in_flight = dict.fromkeys(LIMITS, 0)
        self.max_in_flight_by_group = dict.fromkeys(LIMITS, 0)
        self.cohort_requests: dict[str, dict[str, Any]] = {}
        self._links: dict[str, tuple[str, float]] = {}  # token -> (request id, expiry on the monotonic clock)
        self._lock = threading.Lock()
        ids = list(delete_users)
        if ids:
            self.delete_users([int(i) for i in ids if str(i).isdigit()], [str(i) for i in ids if not str(i).isdigit()])

    @property
    def max_in_flight(self) -> int:
        """The most Dashboard REST and cohort requests ever in flight at once (refused ones included)."""
        return self.max_in_flight_by_group["dashboard"]

    @property
    def cohort_downloads(self) -> int:
        """Cohort downloads (step 1 calls) accepted so far."""
        return len(self.cohort_requests)

    # -- deletions from Python -------------------------------------------------------------------------------

    def delete_users(self, amplitude_ids: Iterable[int] = (), user_ids: Iterable[str] = (), *, done: bool = True,
                     day: date | None = None, requester: str = "privacy@example.com") -> DeletionJob:
        """Put users into a deletion job of its own; `done` (the default) means already scrubbed and finished, so
        their events uploaded up to the end of `day` (default today, UTC) leave every later export. Ids that are
        no user of the project raise UsageError."""
        known, invalid = self.project.resolve(amplitude_ids, user_ids)
        if invalid:
            raise UsageError(f"--delete-users: not users of the fake project: {', '.join(map(str, invalid))}")
        today = clock.now().date()
        job = DeletionJob(day=day or today, status="done" if done else "staging")
        job.users = [{"amplitude_id": amplitude_id, "requester": requester,
                      "requested_on_day": (job.day - 14 * DAY).isoformat()} for amplitude_id in known]
        if done:
            job.active_scrub_done_date = job.day
        with self._lock:
            self.project.jobs.append(job)
        self._deletions_changed()
        return job

    def advance_deletions(self) -> None:
        """Move every unfinished job one step: staging -> submitted -> scrubbed (`active_scrub_done_date`, its
        users' data no longer served) -> done (five days later, at Amplitude)."""
        with self._lock:
            for job in self.project.jobs:
                if job.status == "staging":
                    job.status = "submitted"
                elif job.status == "submitted" and job.active_scrub_done_date is None:
                    job.active_scrub_done_date = job.day
                elif job.status == "submitted":
                    job.status = "done"
        self._deletions_changed()

    def _deletions_changed(self) -> None:
        self.project.forget_days()
        self.server.forget_counts()

    # -- dispatch --------------------------------------------------------------------------------------------

    def serve(self, handler: _Handler, method: str, url: SplitResult) -> None:
        """Answer one request that is not the Export API's."""
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        path = unquote(url.path).rstrip("/") or "/"
        query = {key: values for key, values in parse_qs(url.query).items()}
        if path.startswith(S3_PATH):
            self._finish(handler, method, path, self._s3_file(path))
            return
        group = _group(path)
        if group is None:
            self._finish(handler, method, path, error(404, "NotFound", f"no such endpoint: {method} {path}"))
            return
        if not self.server.check_auth(handler.headers.get("Authorization")):
            status = 401 if not handler.headers.get("Authorization") else 403
            self._finish(handler, method, path, error(status, "Unauthorized" if status == 401 else "Forbidden",
                                                      "Invalid API Key", details="Invalid API Key"))
            return
        with self._lock:
            self.in_flight[group] += 1
            now = self.in_flight[group]
            self.max_in_flight_by_group[group] = max(self.max_in_flight_by_group[group], now)
        try:
            if now > LIMITS[group]:
                answer: Any = error(429, "TooManyRequests",
                                    f"Too many concurrent requests: the limit is {LIMITS[group]}",
                                    limit=LIMITS[group])
                answer.headers["Retry-After"] = f"{self.server.retry_after:g}"
            elif path in self.failing:
                answer = error(500, "InternalServerError", "an error that lasts (FakeApis.failing)")
            else:
                if self.latency:
                    time.sleep(self.latency)
                try:
                    answer = self._route(method, path, query, body, handler)
                except ApiError as exc:
                    answer = exc
        finally:
            with self._lock:
                self.in_flight[group] -= 1
        self._finish(handler, method, path, answer)

    def _finish(self, handler: _Handler, method: str, path: str, answer: Any) -> None:
        status, headers, payload = 200, {}, answer
        if isinstance(answer, ApiError):
            status, headers, payload = answer.status, answer.headers, answer.body
        elif isinstance(answer, tuple):
            status, payload = answer
        content_type = headers.pop("Content-Type", "application/json")
        if not isinstance(payload, bytes):
            payload = msgspec.json.encode(payload)
        with self._lock:
            self.requests.append((method, path, status))
        handler.answer(status, payload, headers, content_type=content_type)

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes, handler: _Handler) -> Any:
        parts = path.strip("/").split("/")[1:]  # after "api"
        one = {key: values[0] for key, values in query.items()}
        if method == "GET":
            if parts == ["3", "cohorts"]:
                return {"cohorts": [self.project.cohort(cid) for cid in self.project.cohort_ids()]}
            if parts == ["3", "cohorts", "usage"]:
                return self._usage()
            if parts[:3] == ["5", "cohorts", "request"] and len(parts) == 4:
                return self._request_cohort(parts[3], query)
            if parts[:3] == ["5", "cohorts", "request-status"] and len(parts) == 4:
                return self._cohort_status(parts[3])
            if parts[:3] == ["5", "cohorts", "request"] and len(parts) == 5 and parts[4] == "file":
                return self._cohort_file(parts[3], handler)
            if parts == ["2", "annotations"]:
                return {"data": [_v2(a) for a in self.project.annotations
                                 if "id" not in one or str(a["id"]) == one["id"]]}
            if parts == ["3", "annotations"]:
                return {"data": self._annotations(one)}
            if parts[:2] == ["3", "annotations"] and len(parts) == 3:
                found = [a for a in self.project.annotations if str(a["id"]) == parts[2]]
                if not found:
                    raise error(404, "NotFound", f"annotation {parts[2]} not found")
                return {"data": found[0]}
            if parts == ["3", "annotation-categories"]:
                return {"data": self.project.categories()}
            if parts == ["2", "events", "list"]:
                return {"data": self._events_list()}
            if parts == ["2", "users"]:
                return {"data": self._active_users(one)}
            if parts == ["2", "sessions", "average"]:
                return {"data": self._sessions(one)}
            if parts[:2] == ["2", "taxonomy"]:
                return self._taxonomy(parts[2:], one, body)
            if parts == ["2", "deletions", "users"]:
                return self._list_deletions(one)
        if method == "POST" and parts == ["2", "deletions", "users"]:
            return self._request_deletion(body, handler.headers.get("Content-Type", ""))
        if method == "DELETE" and parts[:3] == ["2", "deletions", "users"] and len(parts) == 5:
            return self._unstage(parts[3], parts[4])
        raise error(404, "NotFound", f"no such endpoint: {method} {path}")

    # -- cohorts ---------------------------------------------------------------------------------------------

    def _usage(self) -> dict[str, Any]:
        today = clock.now()
        resets = datetime(today.year + today.month // 12, today.month % 12 + 1, 1, tzinfo=UTC)
        return {"rest_download": {"limit": MONTHLY_COHORT_DOWNLOADS,
                                  "usage": MONTHLY_COHORT_DOWNLOADS - max(0, self.cohort_quota),
                                  "resets_at": resets.isoformat().replace("+00:00", "Z")}}

    def _request_cohort(self, cohort_id: str, query: dict[str, list[str]]) -> Any:
        if cohort_id not in self.project.cohort_ids():
            raise error(404, "NotFound", f"cohort {cohort_id} not found")
        with self._lock:
            if self.cohort_quota <= 0:
                raise error(429, "QuotaExceeded", f"the monthly limit of {MONTHLY_COHORT_DOWNLOADS} cohort "
                            "downloads is reached", limit=MONTHLY_COHORT_DOWNLOADS)
            self.cohort_quota -= 1
            request_id = short_id_for(cohort_id, len(self.cohort_requests))
            props = query.get("props", ["0"])[0] in ("1", "true")
            self.cohort_requests[request_id] = {"cohort_id": cohort_id, "polls": 0, "props": props,
                                                "keys": query.get("propKeys", [])}
        return 202, {"request_id": request_id, "cohort_id": cohort_id}

    def _job(self, request_id: str) -> dict[str, Any]:
        job = self.cohort_requests.get(request_id)
        if job is None:
            raise error(404, "NotFound", f"cohort request {request_id} not found")
        return job

    def _cohort_status(self, request_id: str) -> Any:
        with self._lock:
            job = self._job(request_id)
            job["polls"] += 1
            done = job["polls"] > self.cohort_polls
        status = "JOB COMPLETED" if done else "JOB INPROGRESS"
        answer = {"request_id": request_id, "cohort_id": job["cohort_id"], "async_status": status}
        return answer if done else (202, answer)

    def _cohort_file(self, request_id: str, handler: _Handler) -> Any:
        with self._lock:
            job = self._job(request_id)
            if job["polls"] <= self.cohort_polls:
                raise error(400, "JobNotCompleted", f"cohort request {request_id} has not completed")
        members = self.project.members(job["cohort_id"])
        if len(members) > self.cohort_redirect_over:
            token = hashlib.blake2b(f"{request_id}:{time.monotonic_ns()}".encode(), digest_size=12).hexdigest()
            with self._lock:
                self._links[token] = (request_id, time.monotonic() + self.s3_link_seconds)
            location = (f"{self.server.url}{S3_PATH}{request_id}/{token}.csv"
                        f"?X-Amz-Expires={self.s3_link_seconds:g}&X-Amz-Signature={token}")
            raise ApiError(302, b"", {"Location": location, "Content-Type": "text/plain"})
        return self._csv_answer(job)

    def _csv_answer(self, job: dict[str, Any]) -> ApiError:
        members = self.project.members(job["cohort_id"])
        keys = job["keys"] or (sorted(self.project.user_props(members[0])) if job["props"] and members else [])
        if not job["props"]:
            keys = []
        text = io.StringIO()
        writer = csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerow(["amplitude_id", "user_id", *keys])
        for amplitude_id in members:
            props = self.project.user_props(amplitude_id)
            writer.writerow([amplitude_id, self.project.user_id(amplitude_id) or "",
                             *(props.get(key, "") for key in keys)])
        body = gzip.compress(text.getvalue().encode(), mtime=0)
        return ApiError(200, body, {"Content-Type": "text/csv; charset=utf-8", "Content-Encoding": "gzip"})

    def _s3_file(self, path: str) -> ApiError:
        request_id, _, name = path[len(S3_PATH):].partition("/")
        link = self._links.get(name.removesuffix(".csv"))
        if link is None or link[0] != request_id or time.monotonic() > link[1]:
            return ApiError(403, b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                            b"<Message>Request has expired</Message></Error>", {"Content-Type": "application/xml"})
        return self._csv_answer(self.cohort_requests[request_id])

    # -- annotations, events list, active users, sessions ----------------------------------------------------

    def _annotations(self, one: dict[str, str]) -> list[dict[str, Any]]:
        if "category" in one and "chart_id" in one:
            raise error(400, "BadRequest", "category and chart_id cannot be combined")
        out = []
        for annotation in self.project.annotations:
            if "category" in one and (annotation["category"] or {}).get("name") != one["category"]:
                continue
            if "chart_id" in one and annotation["chart_id"] != one["chart_id"]:
                continue
            try:
                if "start" in one and annotation["start"] < _iso(one["start"]):
                    continue
                if "end" in one and (annotation["end"] or annotation["start"]) >= _iso(one["end"]):
                    continue
            except ValueError:
                raise error(400, "BadRequest", "start and end are ISO 8601 times") from None
            out.append(annotation)
        return out

    def _events_list(self) -> list[dict[str, Any]]:
        totals = self.project.event_totals()
        return [{"id": 1000 + index, "name": name, "value": name, "display": name, "totals": totals[name],
                 "totals_delta": 0, "non_active": False, "deleted": False, "hidden": False, "flow_hidden": False,
                 "autohidden": False, "clusters_hidden": False, "in_waitroom": False, "timeline_hidden": False,
                 "waitroom_approved": True} for index, name in enumerate(self.project.event_types())]

    def _days(self, one: dict[str, str]) -> list[date]:
        try:
            first, last = (datetime.strptime(one[key], "%Y%m%d").date() for key in ("start", "end"))
        except (KeyError, ValueError):
            raise error(400, "BadRequest", "start and end are required, as YYYYMMDD") from None
        if last < first or (last - first).days > 365:
            raise error(400, "BadRequest", "end must be after start, at most a year apart")
        return [first + DAY * offset for offset in range((last - first).days + 1)]

    def _active_users(self, one: dict[str, str]) -> dict[str, Any]:
        days = self._days(one)
        metric, interval, group = one.get("m", "active"), one.get("i", "1"), one.get("g")
        if metric not in ("active", "new") or interval not in ("1", "7", "30"):
            raise error(400, "BadRequest", "m is active or new; i is 1, 7 or 30")
        buckets: dict[date, set[int]] = {}
        first_days = self.project.first_days(days[-1]) if metric == "new" else {}
        for day in days:
            start = day - timedelta(days=day.weekday()) if interval == "7" else day.replace(day=1)
            bucket = buckets.setdefault(day if interval == "1" else start, set())
            seen = self.project.day_events(day)
            bucket.update(key for key in seen if metric == "active" or first_days.get(key) == day)
        labels: list[str] = []
        rows: dict[str, dict[date, int]] = {}
        for when, members in buckets.items():
            for amplitude_id in members:
                user = self.project.pool.get(amplitude_id)  # None for a lines file's user
                value = (user.template.get(group) if user is not None else None) if group else "All"
                label = "(none)" if value is None else str(value)
                rows.setdefault(label, dict.fromkeys(buckets, 0))[when] += 1
        labels = sorted(rows) if rows else ["All"]
        series = [[rows.get(label, {}).get(when, 0) for when in buckets] for label in labels]
        meta: list[Any] = labels if group else [{"segmentIndex": 0}]
        return {"series": series, "seriesMeta": meta, "seriesLabels": labels if group else [0],
                "seriesCollapsed": [[{"setId": "", "value": sum(row)}] for row in series],
                "xValues": [when.isoformat() for when in buckets]}

    def _sessions(self, one: dict[str, str]) -> dict[str, Any]:
        days = self._days(one)
        return {"series": [[self.project.session_seconds(day) for day in days]], "seriesMeta": ["All Users"],
                "xValues": [day.isoformat() for day in days]}

    # -- taxonomy --------------------------------------------------------------------------------------------

    def _taxonomy(self, parts: list[str], one: dict[str, str], body: bytes) -> Any:
        if self.taxonomy_forbidden:
            raise ApiError(403, {"success": False, "errors": [{"message": "The Taxonomy API is not available on "
                                                               "this project's plan (Enterprise)"}]})
        show_deleted = one.get("showDeleted") == "true"
        if parts == ["category"]:
            data: Any = self.project.taxonomy_categories()
        elif parts == ["event"]:
            data = [self.project.taxonomy_event(name) for name in self.project.event_types()]
        elif parts[:1] == ["event"] and len(parts) == 2:
            if parts[1] not in self.project.event_types():
                raise ApiError(400, {"success": False, "errors": [{"message": "Not found"}]})
            data = self.project.taxonomy_event(parts[1])
        elif parts == ["event-property"]:
            form = {key: values[0] for key, values in parse_qs(body.decode("utf-8", "replace")).items()}
            event_type = form.get("event_type", one.get("event_type"))
            if event_type is not None and event_type not in self.project.event_types():
                raise ApiError(400, {"success": False, "errors": [{"message": "Not found"}]})
            data = self.project.taxonomy_event_properties(event_type)
        elif parts == ["user-property"]:
            data = self.project.taxonomy_user_properties(show_deleted)
        else:
            raise ApiError(404, {"success": False, "errors": [{"message": "Not found"}]})
        return {"success": True, "data": data}

    # -- deletions -------------------------------------------------------------------------------------------

    def _list_deletions(self, one: dict[str, str]) -> list[dict[str, Any]]:
        try:
            first, last = parse_day(one["start_day"]), parse_day(one["end_day"])
        except (KeyError, ValueError):
            raise error(400, "BadRequest", "start_day and end_day are required, as YYYY-MM-DD") from None
        if last < first or last - first > MAX_DELETION_RANGE:
            raise error(400, "BadRequest", "end_day must follow start_day, at most six months later")
        with self._lock:
            return [job.as_json() for job in self.project.jobs if first <= job.day <= last]

    def _request_deletion(self, body: bytes, content_type: str) -> Any:
        try:
            if "json" in content_type:
                request = msgspec.json.decode(body or b"{}")
            else:  # the early spec's form body, keys repeated
                request = {key: values if key.endswith("ids") else values[0]
                           for key, values in parse_qs(body.decode()).items()}
            amplitude_ids = [int(value) for value in request.get("amplitude_ids", [])]
            user_ids = [str(value) for value in request.get("user_ids", [])]
        except (msgspec.DecodeError, ValueError, AttributeError, TypeError):
            raise error(400, "BadRequest", "the body is not a deletion request") from None
        if not amplitude_ids and not user_ids or len(amplitude_ids) + len(user_ids) > MAX_DELETION_IDS:
            raise error(400, "BadRequest", f"give 1 to {MAX_DELETION_IDS} amplitude_ids and user_ids")
        ignore = str(request.get("ignore_invalid_ids", request.get("ignore_invalid_id", False))).lower() == "true"
        known, invalid = self.project.resolve(amplitude_ids, user_ids)
        if invalid and not ignore:
            raise error(400, "BadRequest", "invalid ids", invalid_ids=invalid)
        with self._lock:
            job = self.project.schedule(known, str(request.get("requester", "")), clock.now().date())
            mapped = ({key: self.project.user_id(key) for key in known}
                      if str(request.get("include_mapped_user_ids", "")).lower() == "true" else None)
            answer = job.as_json(include_user_ids=mapped)
        if invalid:
            answer["invalid_ids"] = invalid
        return answer

    def _unstage(self, amplitude_id: str, day: str) -> Any:
        with self._lock:
            for job in self.project.jobs:
                if job.status == "staging" and job.day.isoformat() == day:
                    for user in job.users:
                        if str(user["amplitude_id"]) == amplitude_id:
                            job.users.remove(user)
                            return user
        raise error(400, "BadRequest", f"no staged deletion of {amplitude_id} on {day}")


def short_id_for(cohort_id: str, index: int) -> str:
    return hashlib.blake2b(f"{cohort_id}:{index}".encode(), digest_size=8).hexdigest()


def _group(path: str) -> str | None:
    """The limit a path counts against; None for paths the fake does not serve."""
    if path.startswith(("/api/2/taxonomy/", "/api/2/taxonomy")):
        return "taxonomy"
    if path.startswith("/api/2/deletions/users"):
        return "privacy"
    if path.startswith(("/api/3/cohorts", "/api/5/cohorts", "/api/2/annotations", "/api/3/annotation",
                        "/api/2/events/list", "/api/2/users", "/api/2/sessions/average")):
        return "dashboard"
    return None


def _v2(annotation: dict[str, Any]) -> dict[str, Any]:
    return {"id": annotation["id"], "date": annotation["start"][:10], "label": annotation["label"],
            "details": annotation["details"] or ""}


def _iso(text: str) -> str:
    """A start/end filter as the ISO text annotations carry (a bare date means its midnight, UTC)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC).isoformat()

"""The client for Amplitude's other REST APIs: Dashboard REST (events list, active users, sessions), chart
annotations, behavioral cohorts (list, usage, the three-step download) and taxonomy.

Amplitude allows a project 5 concurrent requests across the Dashboard REST API and cohort downloads, so every
request of one `DashboardClient` takes a slot of one semaphore (`max_concurrency`, at most 5); taxonomy has its
own limit of 4 on top. Transient trouble (429, 5xx, timeouts, broken connections) is retried with exponential
backoff and jitter (stamina), honouring `Retry-After`, as the Export client does. What is not retried:
401/403 (AuthError), a taxonomy 403 whose answer is not about the keys (NotOnPlanError: the plan lacks it), and a
cohort download refused because the month's quota is spent (QuotaExceededError).

A cohort download is three steps: request it (this spends one of the month's downloads), poll its job until it
completes (waits double from `poll_initial` up to `poll_max` seconds, for at most `poll_timeout`), then fetch the
file, which is either the answer itself or a 302 to a pre-signed link that is valid for a minute: the link is
fetched without our credentials, and asked for afresh when it has expired. The body is CSV, gzip-encoded.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import stamina

from . import __version__
from .client import quote_answer, retry_after
from .config import RETRY_TIMEOUT, Credentials
from .errors import AmplitudeExportError, AuthError, NotOnPlanError, QuotaExceededError, TransientError, UsageError

log = logging.getLogger(__name__)

MAX_CONCURRENCY = 5  # Amplitude's limit per project, Dashboard REST and cohort downloads together
TAXONOMY_CONCURRENCY = 4  # the Taxonomy API's "concurrent cost" per key
DEFAULT_CONCURRENCY = 3  # leaves room for the project's other users of the same limit
CHUNK = 1 << 20
COMPLETED = "JOB COMPLETED"


class DashboardClient:
    """Calls one project's Dashboard REST, annotation, cohort and taxonomy APIs; thread-safe."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        max_concurrency: int = DEFAULT_CONCURRENCY,
        max_attempts: int = 6,
        wait_initial: float = 2.0,
        wait_max: float = 120.0,
        poll_initial: float = 1.0,
        poll_max: float = 15.0,
        poll_timeout: float = 3600.0,
        timeout: float = 120.0,
        retry_timeout: float | None = RETRY_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not 1 <= max_concurrency <= MAX_CONCURRENCY:
            raise UsageError(f"--api-concurrency must be 1 to {MAX_CONCURRENCY} (Amplitude's limit per project), "
                             f"not {max_concurrency}")
        self.credentials = credentials
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        self.retry_timeout = retry_timeout  # seconds after a call's first attempt with no new attempt
        self.wait_initial = wait_initial
        self.wait_max = wait_max
        self.poll_initial = poll_initial
        self.poll_max = poll_max
        self.poll_timeout = poll_timeout
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._taxonomy_slots = threading.BoundedSemaphore(min(max_concurrency, TAXONOMY_CONCURRENCY))
        self._stop = threading.Event()
        headers = {"User-Agent": f"amplitude-export/{__version__}"}
        self._http = httpx.Client(
            base_url=credentials.base_url, auth=httpx.BasicAuth(credentials.api_key, credentials.secret_key.reveal()),
            timeout=httpx.Timeout(timeout, connect=30.0), transport=transport, headers=headers,
        )
        # pre-signed links must not carry our Authorization header (S3 refuses two kinds of auth)
        self._plain = httpx.Client(timeout=httpx.Timeout(timeout, connect=30.0), transport=transport, headers=headers)

    def __repr__(self) -> str:
        return f"DashboardClient({self.credentials.base_url!r}, api_key={self.credentials.api_key!r})"

    def close(self) -> None:
        """Stop any poll in progress and close the connections."""
        self._stop.set()
        self._http.close()
        self._plain.close()

    def __enter__(self) -> DashboardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the endpoints --------------------------------------------------------------------------------------

    def cohorts(self) -> list[dict[str, Any]]:
        """`GET /api/3/cohorts`: every cohort of the project."""
        return list(self.get_json("/api/3/cohorts")["cohorts"])

    def cohort_usage(self) -> dict[str, Any] | None:
        """`GET /api/3/cohorts/usage`'s `rest_download` ({limit, usage, resets_at}), or None where it does not
        answer (it is not in every copy of the docs)."""
        try:
            answer = self.get_json("/api/3/cohorts/usage")
        except AmplitudeExportError as exc:
            log.info("the cohort usage endpoint did not answer: %s", exc)
            return None
        usage = answer.get("rest_download") if isinstance(answer, dict) else None
        return usage if isinstance(usage, dict) else None

    def annotations(self) -> list[dict[str, Any]]:
        """Every chart annotation: `GET /api/3/annotations`, or the older `/api/2/annotations` where v3 answers
        404 (its `date` becomes `start`)."""
        try:
            return list(self.get_json("/api/3/annotations")["data"])
        except _NotFound:
            old = self.get_json("/api/2/annotations")["data"]
            return [{"id": a.get("id"), "start": a.get("date"), "end": None, "label": a.get("label"),
                     "details": a.get("details") or None, "category": None, "chart_id": a.get("chart_id")}
                    for a in old]

    def events_list(self) -> list[dict[str, Any]]:
        """`GET /api/2/events/list`: the visible event types with this week's totals."""
        return list(self.get_json("/api/2/events/list")["data"])

    def series(self, path: str, start: str, end: str, **params: str) -> dict[str, Any]:
        """A Dashboard REST series (`/api/2/users`, `/api/2/sessions/average`) for days `start`..`end`
        (YYYYMMDD): {series, seriesMeta, xValues, ...}."""
        return dict(self.get_json(path, params={"start": start, "end": end, **params})["data"])

    def taxonomy(self, kind: str, form: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """`GET /api/2/taxonomy/<kind>` (`event`, `event-property`, `user-property`); `form` travels as a
        form-encoded body on the GET, as the docs say for `event_type`."""
        return list(self.get_json(f"/api/2/taxonomy/{kind}", form=form)["data"])

    def download_cohort(self, cohort_id: str, target: Path) -> int:
        """Download one cohort's members to `target` as plain CSV; its size in bytes.

        Spends one of the month's downloads (QuotaExceededError once they are gone)."""
        requested = self.get_json(f"/api/5/cohorts/request/{cohort_id}", cohort=True)
        request_id = requested["request_id"]
        wait, deadline = self.poll_initial, time.monotonic() + self.poll_timeout
        while True:
            job = self.get_json(f"/api/5/cohorts/request-status/{request_id}")
            status = str(job.get("async_status", ""))
            if status == COMPLETED:
                break
            if "FAIL" in status.upper() or "ERROR" in status.upper():  # the docs name no failure: a guess
                raise TransientError(f"cohort {cohort_id}: Amplitude's download job ended {status!r}")
            if time.monotonic() + wait > deadline:
                raise TransientError(f"cohort {cohort_id}: the download job did not complete within "
                                     f"{self.poll_timeout:g} s (last status {status!r})")
            if self._stop.wait(wait):
                raise AmplitudeExportError("stopped while polling a cohort download")
            wait = min(wait * 2, self.poll_max)
        return self._retrying(lambda: self._fetch_file(request_id, target), f"cohort {cohort_id} file")

    # -- requests ------------------------------------------------------------------------------------------

    def get_json(self, path: str, *, params: dict[str, str] | None = None, form: dict[str, str] | None = None,
                 cohort: bool = False) -> Any:
        """GET `path` and decode its JSON answer, retrying what is transient."""
        return self._retrying(lambda: self._get_once(path, params, form, cohort), path)

    def _retrying(self, call: Any, what: str) -> Any:
        attempt_no = 0

        def retriable(exc: Exception) -> bool | float:
            if not isinstance(exc, TransientError):
                return False
            if attempt_no < self.max_attempts:
                log.warning("%s: %s (attempt %d of %d); retrying", what, exc.reason, attempt_no, self.max_attempts)
            return exc.retry_after if exc.retry_after is not None else True

        try:
            for attempt in stamina.retry_context(on=retriable, attempts=self.max_attempts, timeout=self.retry_timeout,
                                                 wait_initial=self.wait_initial, wait_max=self.wait_max,
                                                 wait_jitter=self.wait_initial):
                with attempt:
                    attempt_no = attempt.num
                    return call()
        except TransientError as exc:
            exc.attempts = attempt_no
            raise
        raise AssertionError("unreachable: stamina either returns or raises")

    @contextmanager
    def _slot(self, path: str) -> Iterator[None]:
        taxonomy = path.startswith("/api/2/taxonomy")
        if taxonomy:
            self._taxonomy_slots.acquire()
        try:
            with self._slots:
                yield
        finally:
            if taxonomy:
                self._taxonomy_slots.release()

    def _get_once(self, path: str, params: dict[str, str] | None, form: dict[str, str] | None,
                  cohort: bool) -> Any:
        try:
            with self._slot(path):
                if form:
                    answer = self._http.request("GET", path, params=params, data=form)
                else:
                    answer = self._http.get(path, params=params)
        except httpx.TimeoutException as exc:
            raise TransientError(f"timed out ({type(exc).__name__})", window=path) from exc
        except httpx.TransportError as exc:
            raise TransientError(f"connection failed: {type(exc).__name__}: {exc}", window=path) from exc
        self._classify(answer, path, cohort=cohort)
        try:
            return msgspec.json.decode(answer.content)
        except msgspec.DecodeError:
            raise TransientError(f"{answer.status_code} answer is not JSON: {quote_answer(answer)}",
                                 window=path) from None

    def _classify(self, answer: httpx.Response, path: str, *, cohort: bool = False) -> None:
        """Raise what a refusal means; return for 200 and 202."""
        status = answer.status_code
        if status in (200, 202):
            return
        text = quote_answer(answer)
        if status == 404:
            raise _NotFound(f"{path}: 404 {text}")
        if status == 429 and cohort and ("quota" in text.lower() or "monthly" in text.lower()):
            raise QuotaExceededError(f"Amplitude refused a cohort download: the month's quota of cohort downloads "
                                     f"is spent ({text})")
        if status == 429 or status >= 500:
            raise TransientError(f"{status} {text}", window=path, retry_after=retry_after(answer))
        if status == 403 and path.startswith("/api/2/taxonomy") and "invalid api key" not in text.lower():
            raise NotOnPlanError(f"the Taxonomy API refused this project (403: {text}); Amplitude offers it on "
                                 "Enterprise plans")
        if status in (401, 403):
            raise AuthError(f"Amplitude refused the credentials ({status}) for API key "
                            f"{self.credentials.api_key!r} on {path} at {self.credentials.base_url}: check "
                            "AMP_API_KEY and AMP_SECRET_KEY, and --region", status=status)
        raise AmplitudeExportError(f"{path}: unexpected answer {status}: {text}")

    def _fetch_file(self, request_id: str, target: Path) -> int:
        """Step 3, once: the file or its pre-signed link, to `target.part`, decoded, then renamed."""
        path = f"/api/5/cohorts/request/{request_id}/file"
        part = target.with_name(target.name + ".part")
        try:
            with self._slot(path):
                with self._http.stream("GET", path) as answer:
                    if answer.status_code in (301, 302, 303, 307, 308) and "location" in answer.headers:
                        location = answer.headers["location"]
                        with self._plain.stream("GET", location) as linked:
                            if linked.status_code != 200:  # an expired link: ask for the file again
                                raise TransientError(f"the pre-signed link answered {linked.status_code}: "
                                                     f"{quote_answer(linked)}", window=path)
                            size = _save(linked, part)
                    else:
                        self._classify(answer, path)
                        size = _save(answer, part)
        except httpx.TimeoutException as exc:
            part.unlink(missing_ok=True)
            raise TransientError(f"timed out ({type(exc).__name__})", window=path) from exc
        except httpx.TransportError as exc:  # a body cut short lands here too
            part.unlink(missing_ok=True)
            raise TransientError(f"connection failed: {type(exc).__name__}: {exc}", window=path) from exc
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        _gunzip_if_needed(part)
        os.replace(part, target)
        return size


class _NotFound(AmplitudeExportError):
    """A 404 from an endpoint this client can do without (annotations v3 falls back to v2)."""


def _save(answer: httpx.Response, part: Path) -> int:
    """The answer's body, decoded (httpx undoes `Content-Encoding: gzip`), to `part`."""
    size = 0
    with open(part, "wb") as out:
        for chunk in answer.iter_bytes(CHUNK):
            out.write(chunk)
            size += len(chunk)
    return size


def _gunzip_if_needed(part: Path) -> None:
    """A file that is still gzip after the transfer encoding was undone (a stored `.csv.gz` sent without
    `Content-Encoding`): decompressed in place."""
    with open(part, "rb") as handle:
        if handle.read(2) != b"\x1f\x8b":
            return
    plain = part.with_name(part.name + ".csv")
    with gzip.open(part, "rb") as source, open(plain, "wb") as out:
        shutil.copyfileobj(source, out, CHUNK)
    os.replace(plain, part)

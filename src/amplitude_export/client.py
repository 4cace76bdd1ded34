"""The Export API client: one window in, one verified archive on disk out.

It streams the answer to `<name>.zip.<pid>.part`, checks the zip (central directory and every member's CRC) and only
then renames it to `<name>.zip`, so a `.zip` on disk is always whole. Transient trouble (5xx, 429, timeouts,
short or broken bodies, a body that stops arriving for `read_timeout` seconds) is retried with exponential
backoff and jitter (stamina), honouring `Retry-After`. A `.part` that cannot be written (a full disk) is removed
and ends the run with StorageError. `classify()` is the one place that maps a status code to what happens next.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
import stamina

from . import __version__, clock
from .config import REGION_HOSTS, RETRY_TIMEOUT, Credentials, other_region
from .errors import (
    AmplitudeExportError,
    ArchiveError,
    AuthError,
    StorageError,
    TransientError,
    WindowTooLargeError,
)
from .live import LiveFile
from .windows import Window, floor_hour

log = logging.getLogger(__name__)

EXPORT_PATH = "/api/2/export"
CHUNK = 1 << 20
# Seconds without a byte of an answer's body before the attempt is given up and retried: once an export starts
# it streams steadily, so a long silence is a stalled connection, not a large export.
READ_TIMEOUT = 60.0
# Seconds for an answer to start: the Export API may prepare a large export before its first byte.
FIRST_BYTE_TIMEOUT = 300.0
ANSWER_QUOTE = 300  # characters of a refusal's body quoted in messages

OK = "ok"  # a fresh archive was landed
EMPTY = "empty"  # 404: no data in the window
CACHED = "cached"  # a complete archive from an earlier run was already on disk
GATEWAY_TIMEOUT = 504  # after its retries, a window that answered it is split (too large to prepare in time)


@dataclass(frozen=True)
class Download:
    """The outcome of fetching one window."""

    window: Window
    status: str
    path: Path | None
    bytes: int
    attempts: int  # HTTP requests made for this window (`fetch.Fetch` adds those of the windows it was split from)


def classify(response: httpx.Response, window: Window, credentials: Credentials,
             region_hosts: dict[str, str] | None = None) -> None:
    """Raise the error that a non-200, non-404 answer means; return for 200 and 404."""
    status = response.status_code
    if status in (200, 404):
        return
    if status in (401, 403):
        if credentials.base_url in (region_hosts or REGION_HOSTS).values():
            where = credentials.host_label
            advice = ("check AMP_API_KEY and AMP_SECRET_KEY, and --region (credentials of an EU project are "
                      "refused by the US host, and the other way round)")
        else:  # a proxy or the fake server: no region to blame
            where = f"host {credentials.base_url} (--base-url)"
            advice = "check AMP_API_KEY and AMP_SECRET_KEY, and that --base-url is the Export API's host"
        raise AuthError(
            f"Amplitude refused the credentials ({status}) for API key {credentials.api_key!r} on the "
            f"{where}: {advice}",
            status=status,
        )
    if status == 400:
        raise WindowTooLargeError(f"400: {quote_answer(response)}", window=str(window), status=400)
    if status == 429:
        raise TransientError("429 rate limited", window=str(window), retry_after=retry_after(response), status=429)
    if status >= 500:
        raise TransientError(
            f"{status} server error", window=str(window), retry_after=retry_after(response), status=status
        )
    raise AmplitudeExportError(f"{window}: unexpected answer {status} from the Export API")


def quote_answer(response: httpx.Response) -> str:
    """The first words of an answer's body, on one line, for a message (the server says why it refused)."""
    body = b""
    try:
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > ANSWER_QUOTE * 4:
                break
    except httpx.HTTPError:
        pass
    text = " ".join(body.decode("utf-8", "replace").split())
    if not text:
        return "(no explanation in the answer)"
    return text if len(text) <= ANSWER_QUOTE else text[: ANSWER_QUOTE - 3] + "..."


def retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait from a `Retry-After` header (seconds or an HTTP date), if there is one."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - clock.now()).total_seconds())
    except (TypeError, ValueError):
        return None


class ExportClient:
    """Fetches windows from one project's Export API; thread-safe, so several windows can download at once."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        max_attempts: int = 6,
        wait_initial: float = 2.0,
        wait_max: float = 120.0,
        read_timeout: float = READ_TIMEOUT,
        first_byte_timeout: float = FIRST_BYTE_TIMEOUT,
        retry_timeout: float | None = RETRY_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        region_hosts: dict[str, str] | None = None,
    ) -> None:
        """`read_timeout`: seconds without a byte of a body, `first_byte_timeout`: seconds for an answer to start;
        past either the attempt is a transient failure and is retried, up to `max_attempts` attempts and while
        fewer than `retry_timeout` seconds have passed since the window's first attempt (None: no time bound)."""
        for name, value in (("read_timeout", read_timeout), ("first_byte_timeout", first_byte_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        self.credentials = credentials
        self.read_timeout = read_timeout
        self.first_byte_timeout = first_byte_timeout
        self._parts: set[Path] = set()  # `.part` files being written, removed by close() if left behind
        self._parts_lock = threading.Lock()
        self.region_hosts = dict(region_hosts or REGION_HOSTS)
        self._transport = transport
        self._region_hint: str | None | bool = False  # False: not probed yet
        self.max_attempts = max_attempts
        self.wait_initial = wait_initial
        self.wait_max = wait_max
        self.retry_timeout = retry_timeout
        self._http = httpx.Client(
            base_url=credentials.base_url,
            auth=httpx.BasicAuth(credentials.api_key, credentials.secret_key.reveal()),
            timeout=httpx.Timeout(first_byte_timeout, connect=30.0),
            transport=transport,
            follow_redirects=True,
            headers={"User-Agent": f"amplitude-export/{__version__}"},
        )

    def __repr__(self) -> str:
        return f"ExportClient({self.credentials.base_url!r}, api_key={self.credentials.api_key!r})"

    def close(self) -> None:
        """Close the connection pool, and remove the `.part` files of downloads cut off by an error elsewhere
        (a daemon download thread may still hold one when a run stops)."""
        self._http.close()
        with self._parts_lock:
            left, self._parts = self._parts, set()
        for part in left:
            part.unlink(missing_ok=True)

    def __enter__(self) -> ExportClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fetch(
        self,
        window: Window,
        raw_dir: Path,
        *,
        on_bytes: Callable[[int], None] | None = None,
        fresh: bool = False,
        on_live: Callable[[LiveFile], None] | None = None,
    ) -> Download:
        """Land `window` as `raw_dir/<name>.zip`, retrying transient failures; `fresh` ignores a landed copy.

        `on_live` is handed a `LiveFile` for each attempt whose answer is a 200, as its body starts to arrive, so
        that a loader can read the archive while it downloads (`live.py`).

        Raises AuthError (stop), WindowTooLargeError (400 at once, or attempts spent with 504 among their
        answers: split the window), or TransientError once the attempts are spent.
        """
        final = raw_dir / f"{window.name}.zip"
        if final.exists() and not fresh:
            return Download(window, CACHED, final, final.stat().st_size, 0)
        try:
            raw_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError.from_os_error(exc, raw_dir) from None
        try:
            return self._fetch_with_retries(window, final, on_bytes, on_live)
        except AuthError as exc:
            raise self._diagnose(exc) from None

    def _fetch_with_retries(
        self, window: Window, final: Path, on_bytes: Callable[[int], None] | None,
        on_live: Callable[[LiveFile], None] | None = None,
    ) -> Download:
        attempt_no = 0
        timed_out = 0  # attempts answered 504: the Export API's gateway gave up preparing the export

        def retriable(exc: Exception) -> bool | float:
            nonlocal timed_out
            if not isinstance(exc, TransientError):
                return False
            if exc.status == GATEWAY_TIMEOUT:
                timed_out += 1
            if attempt_no < self.max_attempts:
                log.warning("%s: %s (attempt %d of %d); retrying", window, exc.reason, attempt_no, self.max_attempts)
            return exc.retry_after if exc.retry_after is not None else True

        try:
            for attempt in stamina.retry_context(
                on=retriable,
                attempts=self.max_attempts,
                timeout=self.retry_timeout,
                wait_initial=self.wait_initial,
                wait_max=self.wait_max,
                wait_jitter=self.wait_initial,
            ):
                with attempt:
                    attempt_no = attempt.num
                    return self._fetch_once(window, final, on_bytes, attempt_no, on_live)
        except TransientError as exc:
            # a 504 that persists means the window takes too long to prepare, whatever the last answer was
            if timed_out:
                raise WindowTooLargeError(
                    f"504 gateway timeout after {attempt_no} attempt{'s' * (attempt_no != 1)}", window=str(window),
                    status=GATEWAY_TIMEOUT, attempts=attempt_no,
                ) from exc
            exc.attempts = attempt_no
            raise
        except WindowTooLargeError as exc:  # a 400, possibly after transient failures
            exc.attempts = attempt_no
            raise
        raise AssertionError("unreachable: stamina either returns or raises")

    def _fetch_once(
        self, window: Window, final: Path, on_bytes: Callable[[int], None] | None, attempt_no: int,
        on_live: Callable[[LiveFile], None] | None = None,
    ) -> Download:
        # the process id keeps two runs that share a data dir (table formats take no lock for the whole run)
        # off each other's partial file; each lands the same archive by an atomic rename
        part = final.with_name(f"{final.name}.{os.getpid()}.part")
        live: LiveFile | None = None
        landed = answered = False
        with self._parts_lock:
            self._parts.add(part)
        try:
            with self._http.stream("GET", EXPORT_PATH, params=window.params()) as response:
                # the body's reads wait `read_timeout`: httpcore takes the read timeout from the request's
                # extensions when the body starts (tested with a body that stalls)
                response.request.extensions["timeout"]["read"] = self.read_timeout
                answered = True
                classify(response, window, self.credentials, self.region_hosts)
                if response.status_code == 404:
                    return Download(window, EMPTY, None, 0, attempt_no)
                expected = response.headers.get("content-length")
                received = 0
                with open(part, "wb", buffering=0) as out:  # unbuffered: a live reader sees each chunk at once
                    if on_live is not None:
                        live = LiveFile(part, attempt_no)
                        on_live(live)
                    for chunk in response.iter_raw(CHUNK):
                        view = memoryview(chunk)
                        while view:  # an unbuffered write may take only part of a chunk
                            view = view[out.write(view):]
                        received += len(chunk)
                        if live is not None:
                            live.grew(len(chunk))
                        if on_bytes:
                            on_bytes(len(chunk))
                    os.fsync(out.fileno())
            if expected is not None and received != int(expected):
                part.unlink(missing_ok=True)
                raise TransientError(f"body arrived short: {received} of {expected} bytes", window=str(window))
            self._verify(part, window)
            os.replace(part, final)
            landed = True
        except httpx.ReadTimeout as exc:
            part.unlink(missing_ok=True)
            reason = (f"no data for {self.read_timeout:g} s (read timeout)" if answered
                      else f"no answer within {self.first_byte_timeout:g} s")
            raise TransientError(reason, window=str(window)) from exc
        except httpx.TimeoutException as exc:
            part.unlink(missing_ok=True)
            raise TransientError(f"timed out ({type(exc).__name__})", window=str(window)) from exc
        except httpx.TransportError as exc:
            # a connection closed before Content-Length bytes arrived lands here (RemoteProtocolError)
            part.unlink(missing_ok=True)
            raise TransientError(f"connection failed: {type(exc).__name__}: {exc}", window=str(window)) from exc
        except OSError as exc:  # the archive cannot be written (a full disk): no retry helps, stop the run
            part.unlink(missing_ok=True)
            raise StorageError.from_os_error(exc, part) from None
        finally:
            with self._parts_lock:
                self._parts.discard(part)
            if live is not None:
                if landed:
                    live.finished(final)
                else:
                    live.abandoned()
        log.info("%s: landed %s (%d bytes, attempt %d)", window, final.name, received, attempt_no)
        return Download(window, OK, final, received, attempt_no)

    def probe_region(self) -> str | None:
        """After a 401/403, ask the other region's host once with the same credentials.

        Returns that region if it accepts them (any answer but 401/403), else None. A wrong region is the usual
        cause of a 401: EU projects live on analytics.eu.amplitude.com and the US host refuses their keys.
        """
        if self.credentials.base_url not in self.region_hosts.values():
            return None  # a custom host (proxy, fake server): there is no "other region" to ask
        other = other_region(self.credentials.region)
        host = self.region_hosts.get(other)
        if not host or host == self.credentials.base_url:
            return None
        yesterday = floor_hour(clock.now()) - timedelta(days=1)
        try:
            with httpx.Client(
                auth=httpx.BasicAuth(self.credentials.api_key, self.credentials.secret_key.reveal()),
                timeout=httpx.Timeout(30.0), transport=self._transport, follow_redirects=True,
            ) as http, http.stream("GET", host + EXPORT_PATH, params=Window(yesterday, yesterday).params()) as answer:
                status = answer.status_code
        except httpx.HTTPError as exc:
            log.info("region probe of %s failed: %s", host, exc)
            return None
        log.info("region probe: %s answered %d", host, status)
        return other if status not in (401, 403) else None

    def _diagnose(self, exc: AuthError) -> AuthError:
        """The AuthError, with the region that accepts these credentials when the probe finds one (probed once)."""
        if self._region_hint is False:
            self._region_hint = self.probe_region()
        hint = self._region_hint
        if not hint or not isinstance(hint, str):
            return exc
        return AuthError(
            f"Amplitude refused the credentials ({exc.status}) on the {self.credentials.host_label}, but the "
            f"{hint.upper()} host accepts them: these credentials belong to an {hint.upper()} project: "
            f"use --region {hint}",
            status=exc.status,
            region_hint=hint,
        )

    @staticmethod
    def _verify(part: Path, window: Window) -> None:
        from .archive import verify_archive

        try:
            verify_archive(part)
        except ArchiveError as exc:
            part.unlink(missing_ok=True)
            raise TransientError(f"body does not open as a valid zip: {exc.reason}", window=str(window)) from exc

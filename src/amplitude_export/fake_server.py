"""A fake Amplitude Export API on loopback, for tests, demos and benchmarks.

It speaks the contract in `contract/amplitude-export-openapi.yml`: `GET /api/2/export?start=&end=` with HTTP
Basic auth answers 200 (a zip of gzipped NDJSON members named as Amplitude names them), 400, 401 or 404. On
top of the contract it can misbehave on purpose, deterministically, the ways the real API does: 5xx, 429 with
Retry-After, 504 for long windows, bodies cut short, corrupt or not a zip, slow answers, bodies that stall
half-way, reset connections, re-exported hours.

The server is a `fake_export.FakeExport`: what it serves (synthetic events or a `lines_file`'s lines, members
cached on disk, each response's zip made from them as it is sent by `fake_archive`, so a day of a million events
never sits in memory) and what it knows it serves (`expected_uuids`, `expected_events`). This module adds the
HTTP side: the socket, auth, the faults and the answers.

    with FakeExportServer(api_key="demo-key", secret_key="demo-secret", faults=["503", "truncate"]) as srv:
        httpx.get(f"{srv.url}/api/2/export", params={...}, auth=("demo-key", "demo-secret"))
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from .errors import UsageError
from .fake_apis import FakeApis
from .fake_archive import CHUNK, file_chunks
from .fake_export import MALFORMED_LINES, FakeExport, default_events_per_hour, member_name, parse_param
from .synthetic import DEFAULT_VARIATION, HOUR

log = logging.getLogger(__name__)

EXPORT_PATH = "/api/2/export"
MAX_WINDOW_HOURS = 365 * 24  # the Export API answers at most 365 days per request
_PACED_CHUNK = 1 << 14  # bytes sent at a time when `bytes_per_second` paces a body
FAULTS = ("500", "502", "503", "504", "429", "truncate", "corrupt", "notzip", "slow", "stall", "reset")
RANDOM_FAULTS = ("500", "503", "429", "truncate")  # the transient faults `fault_rate` draws from

# Amplitude's own words for its answers (from its Export API documentation)
TOO_LARGE_TEXT = (
    "The file size of the exported data is too large. Shorten the time ranges and try again. "
    "The limit size is 4GB."
)
NO_DATA_TEXT = "No data available for the time range requested."
TIMEOUT_TEXT = (
    "The amount of data is large causing a timeout. For large amounts of data, use the Amazon S3 export."
)
NOT_ZIP_HTML = (
    b"<!DOCTYPE html><html><head><title>Amplitude</title></head>"
    b"<body>Service temporarily unavailable</body></html>"
)


class FakeExportServer(FakeExport):
    """The fake Export API: a context manager serving on `host:port` (port 0: a free one) in a daemon thread.

    Every option is keyword-only; see the module docstring for what it answers and `__init__` for the options.
    """

    def __init__(
        self,
        *,
        api_key: str = "demo-key",
        secret_key: str = "demo-secret",
        host: str = "127.0.0.1",
        port: int = 0,
        project_id: int = 187520,
        seed: int = 0,
        events_per_hour: int | Callable[[datetime], int] = default_events_per_hour,
        lines_file: str | os.PathLike[str] | None = None,
        data_start: datetime | None = None,
        data_end: datetime | None = None,
        empty_hours: Iterable[datetime] = (),
        members_per_hour: int = 1,
        max_events_per_member: int | None = None,
        max_archive_bytes: int | None = None,
        faults: Iterable[str] = (),
        retry_after: float = 1,
        slow_seconds: float = 5.0,
        timeout_over_hours: int | None = None,
        fault_rate: float = 0.0,
        malformed_lines: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        compresslevel: int = 1,
        bytes_per_second: float | None = None,
        variation: float = DEFAULT_VARIATION,
        apis: Mapping[str, Any] | None = None,
    ) -> None:
        """Configure the server; nothing listens until `start()` or `with`.

        `lines_file` (NDJSON) replaces the generated events and `events_per_hour`: each of its lines is served
        byte for byte, in file order, in the upload hour of its `server_upload_time`.

        `events_per_hour` is a count or a function of the hour. Hours before `data_start`, after `data_end` or
        in `empty_hours` have no data. An hour is split into `members_per_hour` members, more if a member
        would hold over `max_events_per_member` lines. Windows whose archive would exceed `max_archive_bytes`
        answer 400, as Amplitude does over 4 GB. `faults` are applied in order to the first requests of each
        distinct window; `fault_rate` then adds random transient faults (never three in a row for one window).
        `timeout_over_hours` makes longer windows always answer 504. `malformed_lines` puts one non-JSON line
        and one JSON array into member #0 of every hour. `compresslevel` is the members' gzip level (1: fast).
        `bytes_per_second` paces archive bodies as a real network would (loopback is far faster).
        `variation` is the share of lines that vary as real exports do (synthetic.VARIATIONS; 0: uniform).
        `apis` are the options of the other APIs served on the same port (`fake_apis.FakeApis`: cohorts, annotations,
        taxonomy, deletions, ...), reached as `self.apis`.
        """
        unknown = [fault for fault in faults if fault not in FAULTS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; choose from {FAULTS}")
        if bytes_per_second is not None and not bytes_per_second > 0:
            raise ValueError(f"bytes_per_second must be a positive number, not {bytes_per_second!r}")
        super().__init__(
            project_id=project_id, seed=seed, events_per_hour=events_per_hour, lines_file=lines_file,
            data_start=data_start, data_end=data_end, empty_hours=empty_hours, members_per_hour=members_per_hour,
            max_events_per_member=max_events_per_member, max_archive_bytes=max_archive_bytes,
            malformed_lines=malformed_lines, cache_dir=cache_dir, compresslevel=compresslevel, variation=variation,
        )  # fmt: skip
        self.api_key = api_key
        self._secret_key = secret_key
        self.host = host
        self.port = port
        self.faults = list(faults)
        self.retry_after = retry_after
        self.slow_seconds = slow_seconds
        self.timeout_over_hours = timeout_over_hours
        self.fault_rate = fault_rate
        self.bytes_per_second = bytes_per_second
        self.requests: list[tuple[str | None, str | None, int]] = []  # (start, end, status); 0 = reset
        self.in_flight = 0  # requests (to any of its APIs) being answered now
        self.max_in_flight = 0  # the most requests answered at once: what a client's concurrency bound allowed
        self._attempts: dict[tuple[datetime, datetime], list[bool]] = {}  # per window: was each attempt faulted
        self._requests_lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.apis = FakeApis(self, **(apis or {}))

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL to give a client, e.g. `http://127.0.0.1:54321` (the path is `/api/2/export`)."""
        if self._httpd is None:
            raise RuntimeError("the fake server is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def _bind(self) -> ThreadingHTTPServer:
        try:
            httpd = _HTTPServer((self.host, self.port), _Handler)
        except OSError as exc:  # a busy port, or a host that is not ours
            raise UsageError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.open_cache()
        httpd.fake = self
        self._httpd = httpd
        log.info("fake Export API listening on %s (project %s)", self.url, self.project_id)
        return httpd

    def start(self) -> Self:
        """Start serving in a daemon thread; returns self."""
        httpd = self._bind()
        # a short poll interval lets `stop()` return in milliseconds (tests start many servers)
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-export-api", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self, ready: Callable[[str], None] | None = None) -> None:
        """Serve in the calling thread until interrupted (what `serve` and the CLI use); `ready(url)` is called
        once the port is bound."""
        httpd = self._bind()
        if ready is not None:
            ready(self.url)
        try:
            httpd.serve_forever()
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop serving and remove the cache directory if the server made it."""
        if self._httpd is not None:
            if self._thread is not None:
                self._httpd.shutdown()
                self._thread.join(timeout=5)
            self._httpd.server_close()
            self._httpd = None
            self._thread = None
        self.close_cache()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- requests --------------------------------------------------------------------------------------------

    def next_fault(self, window: tuple[datetime, datetime]) -> str | None:
        """The fault for this request of `window`: scripted ones first, then `fault_rate`'s random ones."""
        with self._requests_lock:
            history = self._attempts.setdefault(window, [])
            attempt = len(history)
            fault: str | None = None
            if attempt < len(self.faults):
                fault = self.faults[attempt]
            elif self.fault_rate > 0 and not (len(history) >= 2 and history[-1] and history[-2]):
                digest = hashlib.blake2b(
                    f"{self.seed}:{window[0]:%Y%m%dT%H}:{window[1]:%Y%m%dT%H}:{attempt}".encode(),
                    digest_size=8,
                ).digest()
                draw = int.from_bytes(digest[:4], "big") / 2**32
                if draw < self.fault_rate:
                    fault = RANDOM_FAULTS[digest[4] % len(RANDOM_FAULTS)]
            history.append(fault is not None and fault != "slow")
            return fault

    def check_auth(self, header: str | None) -> bool:
        """Whether an Authorization header holds this server's key and secret (HTTP Basic)."""
        if not header or not header.startswith("Basic "):
            return False
        try:
            decoded = base64.b64decode(header[6:], validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return False
        key, _, secret = decoded.partition(":")
        return hmac.compare_digest(key.encode(), self.api_key.encode()) and hmac.compare_digest(
            secret.encode(), self._secret_key.encode()
        )

    def record(self, start: str | None, end: str | None, status: int) -> None:
        """Note an Export API answer in `requests` (status 0: the connection was reset)."""
        with self._requests_lock:
            self.requests.append((start, end, status))

    @contextmanager
    def answering(self) -> Iterator[None]:
        """Count a request as in flight while it is answered (`in_flight`, `max_in_flight`)."""
        with self._requests_lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self._requests_lock:
                self.in_flight -= 1


def serve(
    host: str = "127.0.0.1", port: int = 8080, *, ready: Callable[[str], None] | None = None, **options: Any
) -> None:
    """Run the fake Export API in the foreground until interrupted (the `fake-server` command runs it).

    A port that cannot be bound (busy) raises UsageError.
    """
    FakeExportServer(host=host, port=port, **options).serve_forever(ready)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64  # socketserver's 5 drops concurrent clients' connections, which then retry a second later
    fake: FakeExportServer


class _Handler(BaseHTTPRequestHandler):
    """One request: auth, parameters, scripted faults, then the window's archive."""

    server: _HTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive, like the real API; every answer carries Content-Length

    def log_message(self, format: str, *args: Any) -> None:
        # the request line holds only the path and query: never the Authorization header
        log.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        fake = self.server.fake
        with fake.answering():
            self._get(fake)

    def _get(self, fake: FakeExportServer) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        start_text = query.get("start", [None])[0]
        end_text = query.get("end", [None])[0]
        if url.path != EXPORT_PATH:
            fake.apis.serve(self, "GET", url)
            return
        if not fake.check_auth(self.headers.get("Authorization")):
            fake.record(start_text, end_text, 401)
            self.answer(
                401, b"Invalid API key or secret key", {"WWW-Authenticate": 'Basic realm="Amplitude"'}
            )
            return
        try:
            if start_text is None or end_text is None:
                raise ValueError("start and end are required")
            start = parse_param(start_text, is_end=False)
            end = parse_param(end_text, is_end=True)
            if end < start:
                raise ValueError("end is before start")
            if (end - start) // HOUR + 1 > MAX_WINDOW_HOURS:
                raise ValueError("the time range is over 365 days")
        except ValueError as exc:
            fake.record(start_text, end_text, 400)
            self.answer(400, f"Invalid request: {exc}".encode())
            return

        fault = fake.next_fault((start, end))
        if fault == "slow":
            time.sleep(fake.slow_seconds)
        elif fault == "reset":
            fake.record(start_text, end_text, 0)
            self._reset()
            return
        elif fault in ("500", "502", "503", "504"):
            fake.record(start_text, end_text, int(fault))
            self.answer(
                int(fault), TIMEOUT_TEXT.encode() if fault == "504" else b"Internal error, try again"
            )
            return
        elif fault == "429":
            fake.record(start_text, end_text, 429)
            self.answer(429, b"Too many concurrent requests", {"Retry-After": f"{fake.retry_after:g}"})
            return
        elif fault == "notzip":
            fake.record(start_text, end_text, 200)
            self.answer(200, NOT_ZIP_HTML, content_type="text/html; charset=utf-8")
            return

        hours = (end - start) // HOUR + 1
        if fake.timeout_over_hours is not None and hours > fake.timeout_over_hours:
            fake.record(start_text, end_text, 504)
            self.answer(504, TIMEOUT_TEXT.encode())
            return
        if not fake.has_data(start, end):
            fake.record(start_text, end_text, 404)
            self.answer(404, NO_DATA_TEXT.encode())
            return
        if fake.too_large(start, end):
            fake.record(start_text, end_text, 400)
            self.answer(400, TOO_LARGE_TEXT.encode())
            return

        streamed = fake.stream_archive(start, end)
        target: Path | None = None
        try:
            if streamed is not None:
                size, corrupt_at, chunks = streamed
            else:  # ZIP64: zipfile writes it to a file first
                target, corrupt_at = fake.temporary_archive(start, end)
                size = target.stat().st_size
                chunks = file_chunks(target)
            fake.record(start_text, end_text, 200)
            self.send_response(200)
            self.send_header("Content-Type", "application/zip")
            self.send_header("Content-Length", str(size))
            self.send_header("Content-Disposition", f'attachment; filename="{start_text}-{end_text}.zip"')
            self.end_headers()
            limit = size // 2 if fault == "truncate" else size
            self._stream(chunks, limit, corrupt_at if fault == "corrupt" else None,
                         stall_at=size // 2 if fault == "stall" else None)
            if fault == "truncate":
                self._close_now()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away: nothing to answer
        finally:
            if target is not None:
                target.unlink(missing_ok=True)

    def do_POST(self) -> None:
        self.server.fake.apis.serve(self, "POST", urlsplit(self.path))

    def do_DELETE(self) -> None:
        self.server.fake.apis.serve(self, "DELETE", urlsplit(self.path))

    def answer(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        content_type: str = "text/plain; charset=utf-8",
    ) -> None:
        """Send a whole answer with its Content-Length (`fake_apis` answers through this too)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, chunks: Iterator[bytes], limit: int, corrupt_at: int | None, *,
                stall_at: int | None = None) -> None:
        """Send the first `limit` bytes of `chunks` in bounded pieces, flipping a few bytes at `corrupt_at` if
        given, at `bytes_per_second` if set, pausing `slow_seconds` once `stall_at` bytes are sent."""
        sent = 0
        pace = self.server.fake.bytes_per_second
        piece = _PACED_CHUNK if pace else CHUNK
        began = time.monotonic()
        for chunk in chunks:
            at = 0
            while at < len(chunk) and sent < limit:
                end = limit if stall_at is None or sent >= stall_at else min(limit, stall_at)
                data = chunk[at : at + min(piece, end - sent)]
                at += len(data)
                if pace:
                    time.sleep(max(0.0, began + sent / pace - time.monotonic()))
                if corrupt_at is not None and sent <= corrupt_at < sent + len(data):
                    flipped = bytearray(data)
                    for offset in range(corrupt_at - sent, min(corrupt_at - sent + 4, len(data))):
                        flipped[offset] ^= 0xFF
                    data = bytes(flipped)
                self.wfile.write(data)
                sent += len(data)
                if sent == stall_at:
                    self.wfile.flush()
                    time.sleep(self.server.fake.slow_seconds)
        self.wfile.flush()

    def _close_now(self) -> None:
        """End the connection mid-body: the client has a Content-Length it will never get."""
        self.close_connection = True
        self.wfile.flush()
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _reset(self) -> None:
        """Drop the connection without a word, with a TCP reset rather than a clean close."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


__all__ = [
    "EXPORT_PATH", "FAULTS", "HOUR", "MALFORMED_LINES", "MAX_WINDOW_HOURS", "NO_DATA_TEXT", "NOT_ZIP_HTML",
    "RANDOM_FAULTS", "TIMEOUT_TEXT", "TOO_LARGE_TEXT", "FakeExportServer", "default_events_per_hour",
    "member_name", "parse_param", "serve",
]

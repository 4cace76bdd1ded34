"""A fake Amplitude Export API on loopback, for tests, demos and benchmarks.

It speaks the contract in `contract/amplitude-export-openapi.yml`: `GET /api/2/export?start=&end=` with HTTP
Basic auth answers 200 (a zip of gzipped NDJSON members named as Amplitude names them), 400, 401 or 404. On
top of the contract it can misbehave on purpose, deterministically, the ways the real API does: 5xx, 429 with
Retry-After, 504 for long windows, bodies cut short, corrupt or not a zip, slow answers, bodies that stall
half-way, reset connections, re-exported hours.

Events come from `synthetic.generate_hour`, so the server knows exactly which events it serves
(`expected_uuids`, `expected_events`) and exactly-once tests can compare a destination with it. Given a
`lines_file` instead, it serves that file's lines as they are, each in the hour of its `server_upload_time`.

Each hour's members are built once and cached on disk (a temporary directory unless `cache_dir` is given); a
response's zip is made from them on the fly as it is sent (`stream_archive`; into a temporary file only when it
needs ZIP64), so a day of a million events never sits in memory. The zip stores its members (ZIP_STORED): they
are gzip already.

    with FakeExportServer(api_key="demo-key", secret_key="demo-secret", faults=["503", "truncate"]) as srv:
        httpx.get(f"{srv.url}/api/2/export", params={...}, auth=("demo-key", "demo-secret"))
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import logging
import math
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from .archive import LOCAL_HEADER, crc32
from .errors import UsageError
from .fake_apis import FakeApis
from .synthetic import DEFAULT_VARIATION, encode_lines, generate_hour, hour_uuids, utc_hour

log = logging.getLogger(__name__)

EXPORT_PATH = "/api/2/export"
HOUR = timedelta(hours=1)
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
MALFORMED_LINES = (b"{this is not json", b'["an", "array", "not", "an", "event"]')

_PARAM = re.compile(r"^(\d{4})(\d{2})(\d{2})(?:T(\d{2}))?$")
_CHUNK = 1 << 20  # bytes per write when streaming a response


def default_events_per_hour(hour: datetime) -> int:
    """A day shaped like a real project's: about 40 events an hour at night, 200 at the afternoon peak.

    About 2,900 events (5 MB of JSON, under 1 MB zipped) a day, varying a little from day to day.
    """
    shape = (1 - math.cos(2 * math.pi * ((hour.hour - 3) % 24) / 24)) / 2  # 0 at 03:00, 1 at 15:00
    wobble = int(hashlib.blake2b(hour.strftime("%Y%m%d%H").encode(), digest_size=2).hexdigest(), 16) % 21
    return 40 + int(160 * shape) + wobble


def parse_param(text: str, *, is_end: bool) -> datetime:
    """An Export API `start`/`end` value as a UTC hour: `YYYYMMDDTHH`, or `YYYYMMDD` (hour 00; 23 for end)."""
    match = _PARAM.match(text)
    if not match:
        raise ValueError(f"{text!r} is not YYYYMMDDTHH or YYYYMMDD")
    year, month, day, hour = match.groups()
    hour_value = int(hour) if hour is not None else (23 if is_end else 0)
    return datetime(int(year), int(month), int(day), hour_value, tzinfo=UTC)


def member_name(project_id: int, hour: datetime, index: int) -> str:
    """A member's name as Amplitude writes it: `187520/187520_2024-03-01_5#0.json.gz` (hour not padded)."""
    return f"{project_id}/{project_id}_{hour:%Y-%m-%d}_{hour.hour}#{index}.json.gz"


class FakeExportServer:
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
        if not 0 <= variation <= 1:
            raise ValueError(f"variation must be a share between 0 and 1, not {variation!r}")
        self.api_key = api_key
        self._secret_key = secret_key
        self.host = host
        self.port = port
        self.project_id = project_id
        self.seed = seed
        self.events_per_hour = events_per_hour
        self._corpus = _CorpusFile(Path(lines_file)) if lines_file is not None else None
        self.data_start = utc_hour(data_start) if data_start else None
        self.data_end = utc_hour(data_end) if data_end else None
        self.empty_hours = {utc_hour(hour) for hour in empty_hours}
        self.members_per_hour = max(1, members_per_hour)
        self.max_events_per_member = max_events_per_member
        self.max_archive_bytes = max_archive_bytes
        self.faults = list(faults)
        self.retry_after = retry_after
        self.slow_seconds = slow_seconds
        self.timeout_over_hours = timeout_over_hours
        self.fault_rate = fault_rate
        self.malformed_lines = malformed_lines
        self.compresslevel = compresslevel
        self.bytes_per_second = bytes_per_second
        self.variation = variation
        self.requests: list[tuple[str | None, str | None, int]] = []  # (start, end, status); 0 = reset
        self.in_flight = 0  # requests (to any of its APIs) being answered now
        self.max_in_flight = 0  # the most requests answered at once: what a client's concurrency bound allowed
        self._versions: dict[datetime, int] = {}
        self._crcs: dict[Path, tuple[int, int]] = {}  # member file -> (size, CRC-32)
        self._attempts: dict[
            tuple[datetime, datetime], list[bool]
        ] = {}  # per window: was each attempt faulted
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._own_cache = cache_dir is None
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._thinned: dict[tuple[datetime, int, str], tuple[int, set[str]]] = {}  # (lines, uuids) of hours
        # deletions thinned, so counting and checking them does not generate them again
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
        if self._cache_dir is None:
            self._cache_dir = Path(tempfile.mkdtemp(prefix="amplitude-fake-"))
        self._cache_dir.mkdir(parents=True, exist_ok=True)
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
        if self._own_cache and self._cache_dir is not None:
            shutil.rmtree(self._cache_dir, ignore_errors=True)
            self._cache_dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- data ------------------------------------------------------------------------------------------------

    def set_hour_version(self, hour: datetime, version: int) -> None:
        """Simulate Amplitude re-exporting `hour`: from the next request its content differs.

        Version v > 0 changes every event's content and adds v * 2% more events (at least v), keeping the
        earlier events' uuids.
        """
        if self._corpus is not None:
            raise ValueError("a lines_file is served as it is: it has no other versions")
        with self._lock:
            self._versions[utc_hour(hour)] = version

    def hour_version(self, hour: datetime) -> int:
        """The current version of `hour` (0 unless `set_hour_version` changed it)."""
        return self._versions.get(utc_hour(hour), 0)

    def _base_events(self, hour: datetime) -> int:
        """The hour's line count before any re-export."""
        if hour in self.empty_hours:
            return 0
        if (self.data_start and hour < self.data_start) or (self.data_end and hour > self.data_end):
            return 0
        if self._corpus is not None:
            return self._corpus.count(hour)
        base = self.events_per_hour(hour) if callable(self.events_per_hour) else self.events_per_hour
        return max(0, base)

    def _generated_events(self, hour: datetime) -> int:
        """The hour's line count before deletions."""
        base = self._base_events(hour)
        return base + self.hour_version(hour) * max(1, base // 50) if base else 0

    def hour_events(self, hour: datetime) -> int:
        """How many event lines (duplicates included, malformed lines not) the server serves for `hour`."""
        hour = utc_hour(hour)
        count = self._generated_events(hour)
        if not count or not self._deleted_in(hour):
            return count
        return self._thinned_hour(hour)[0]

    def _thinned_hour(self, hour: datetime) -> tuple[int, set[str]]:
        key = (hour, self.hour_version(hour), self.apis.deletions_key())
        with self._lock:
            known = self._thinned.get(key)
        if known is None:
            lines = self.hour_lines(hour)
            known = (len(lines), {event["uuid"] for event in lines})
            with self._lock:
                self._thinned[key] = known
        return known

    def generated_lines(self, hour: datetime) -> list[dict[str, Any]]:
        """The events generated for `hour`, before deletion jobs removed any."""
        hour = utc_hour(hour)
        if self._corpus is not None:
            import msgspec

            return [msgspec.json.decode(line) for line in self._hour_lines_bytes(hour)]
        return generate_hour(
            hour,
            project_id=self.project_id,
            seed=self.seed,
            events=self._generated_events(hour),
            version=self.hour_version(hour),
            # the version-0 count: a re-export of the previous hour keeps those uuids, so this hour stays
            previous_events=self._base_events(hour - HOUR),
            variation=self.variation,
        )

    def hour_lines(self, hour: datetime) -> list[dict[str, Any]]:
        """The events served for `hour`, in member order (without malformed lines): a scrubbed deletion job's
        users' events are gone from the hours up to the end of the job's day."""
        lines = self.generated_lines(hour)
        deleted = self._deleted_in(utc_hour(hour))
        # varied lines carry amplitude_id as a string
        return [event for event in lines if int(event["amplitude_id"]) not in deleted] if deleted else lines

    def _deleted_in(self, hour: datetime) -> set[int]:
        """The amplitude ids whose events of upload hour `hour` a scrubbed deletion job removed."""
        return {key for key, day in self.apis.project.scrubbed().items()
                if hour < datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)}

    def forget_counts(self) -> None:
        """Deletions changed: line counts of thinned hours are recomputed on demand."""
        with self._lock:
            self._thinned.clear()

    def expected_uuids(self, start: datetime | str, end: datetime | str) -> set[str]:
        """The distinct uuids served for upload hours start..end (inclusive), as they stand now."""
        uuids: set[str] = set()
        for hour in _hours(start, end):
            if self._corpus is not None:
                uuids |= {event["uuid"] for event in self.hour_lines(hour) if event.get("uuid")}
                continue
            if self._deleted_in(hour):
                uuids |= self._thinned_hour(hour)[1]
                continue
            uuids |= hour_uuids(
                hour,
                project_id=self.project_id,
                seed=self.seed,
                events=self.hour_events(hour),
                previous_events=self._base_events(hour - HOUR),
            )
        return uuids

    def expected_events(self, start: datetime | str, end: datetime | str) -> int:
        """How many event lines (duplicates included, malformed lines not) are served for start..end."""
        return sum(self.hour_events(hour) for hour in _hours(start, end))

    def expected_rejects(self, start: datetime | str, end: datetime | str) -> int:
        """How many malformed lines are served for start..end (2 an hour with data, if `malformed_lines`)."""
        if not self.malformed_lines:
            return 0
        return len(MALFORMED_LINES) * sum(1 for hour in _hours(start, end) if self.hour_events(hour))

    # -- archives --------------------------------------------------------------------------------------------

    def _member_counts(self, events: int) -> list[int]:
        members = self.members_per_hour
        if self.max_events_per_member:
            members = max(members, math.ceil(events / self.max_events_per_member))
        members = max(1, min(members, events))
        size, extra = divmod(events, members)
        return [size + (1 if index < extra else 0) for index in range(members)]

    def hour_members(self, hour: datetime) -> list[tuple[str, Path]]:
        """The hour's members as (name in the zip, cached gzip file), built on first use."""
        hour = utc_hour(hour)
        events = self.hour_events(hour)
        if not events:
            return []
        counts = self._member_counts(events)
        key = (
            f"{self.project_id}_{self.seed}_{hour:%Y%m%dT%H}_v{self.hour_version(hour)}_n{events}"
            f"_p{self._base_events(hour - HOUR)}_m{len(counts)}"
            f"_x{int(self.malformed_lines)}_z{self.compresslevel}_r{self.variation:g}"
        )
        if self._deleted_in(hour):
            key += f"_d{self.apis.deletions_key()}"
        assert self._cache_dir is not None, "the server is not started"
        if self._corpus is not None:
            key += self._corpus.key
        paths = [self._cache_dir / f"{key}#{index}.json.gz" for index in range(len(counts))]
        names = [member_name(self.project_id, hour, index) for index in range(len(counts))]
        with self._build_lock:
            if not all(path.exists() for path in paths):
                self._build_hour(hour, counts, paths)
        return list(zip(names, paths, strict=True))

    def _build_hour(self, hour: datetime, counts: list[int], paths: list[Path]) -> None:
        lines = self._hour_lines_bytes(hour)
        position = 0
        for index, (count, path) in enumerate(zip(counts, paths, strict=True)):
            chunk = lines[position : position + count]
            position += count
            if self.malformed_lines and index == 0:
                chunk.insert(min(1, len(chunk)), MALFORMED_LINES[0])
                chunk.append(MALFORMED_LINES[1])
            body = gzip.compress(b"\n".join(chunk) + b"\n", compresslevel=self.compresslevel, mtime=0)
            partial = path.with_suffix(".tmp")
            partial.write_bytes(body)
            os.replace(partial, path)

    def _hour_lines_bytes(self, hour: datetime) -> list[bytes]:
        """The hour's lines as they are sent, without their line ends."""
        if self._corpus is not None:
            return self._corpus.lines(hour) if self.hour_events(hour) else []
        return encode_lines(self.hour_lines(hour))

    def window_members(self, start: datetime, end: datetime) -> list[tuple[str, Path]]:
        """Every member of the window start..end (inclusive hours), in (hour, n) order."""
        return [member for hour in _hours(start, end) for member in self.hour_members(hour)]

    def build_archive(self, start: datetime, end: datetime, target: Path) -> int:
        """Write the window's zip to `target`; return an offset inside the first member's data (`corrupt`)."""
        members = self.window_members(start, end)
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            directory = zipfile.ZipInfo(f"{self.project_id}/", date_time=_zip_time(start))
            directory.external_attr = 0o40755 << 16 | 0x10
            archive.writestr(directory, b"")  # Amplitude's zips carry the folder entry: readers must skip it
            for name, path in members:
                info = zipfile.ZipInfo(name, date_time=_zip_time(start))
                info.compress_type = zipfile.ZIP_STORED
                info.file_size = path.stat().st_size
                with path.open("rb") as source, archive.open(info, "w") as sink:
                    shutil.copyfileobj(source, sink, _CHUNK)
        with zipfile.ZipFile(target) as archive:
            infos = [info for info in archive.infolist() if not info.is_dir()]
        if not infos:
            return 0
        with target.open("rb") as handle:
            handle.seek(infos[0].header_offset)
            header = handle.read(30)
        name_length, extra_length = (int(value) for value in struct.unpack("<HH", header[26:30]))
        return infos[0].header_offset + 30 + name_length + extra_length + infos[0].compress_size // 2

    def stream_archive(self, start: datetime, end: datetime) -> tuple[int, int, Iterator[bytes]] | None:
        """The window's zip as it is sent: (size, an offset inside the first member's data, the bytes in chunks).

        The bytes are those `build_archive` writes (the folder entry, then the members, stored), made on the fly
        from the cached members and their CRCs, so the answer starts at once instead of after a copy of the
        whole archive. None when the archive needs ZIP64: `build_archive` then.
        """
        stamp = _dos_time(_zip_time(start))
        entries: list[tuple[str, Path | None, int, int]] = [(f"{self.project_id}/", None, 0, 0)]
        entries += [(name, path, *self._size_and_crc(path)) for name, path in self.window_members(start, end)]
        headers: list[bytes] = []
        central: list[bytes] = []
        offset = corrupt_at = 0
        for name, path, size, crc in entries:
            raw = name.encode()
            flags = 0 if raw.isascii() else 0x800
            headers.append(LOCAL_HEADER.pack(b"PK\x03\x04", 20, flags, 0, *stamp, crc, size, size, len(raw), 0) + raw)
            attributes = 0o40755 << 16 | 0x10 if path is None else 0o600 << 16  # as zipfile writes them
            central.append(_CENTRAL.pack(b"PK\x01\x02", 3 << 8 | 20, 20, flags, 0, *stamp, crc, size, size,
                                         len(raw), 0, 0, 0, 0, attributes, offset) + raw)
            if path is not None and not corrupt_at:
                corrupt_at = offset + len(headers[-1]) + size // 2
            offset += len(headers[-1]) + size
        directory = b"".join(central)
        total = offset + len(directory) + _END.size
        if total >= 0xFFFFFFFF or len(entries) >= 0xFFFF:
            return None
        end_record = _END.pack(b"PK\x05\x06", 0, 0, len(entries), len(entries), len(directory), offset, 0)

        def chunks() -> Iterator[bytes]:
            for header, (_, path, _, _) in zip(headers, entries, strict=True):
                yield header
                if path is not None:
                    yield from _file_chunks(path)
            yield directory + end_record

        return total, corrupt_at if len(entries) > 1 else 0, chunks()

    def _size_and_crc(self, path: Path) -> tuple[int, int]:
        """A cached member's size and CRC-32, computed once (members never change under one name)."""
        with self._lock:
            known = self._crcs.get(path)
        if known is None:
            crc = 0
            for chunk in _file_chunks(path):
                crc = crc32(chunk, crc)
            known = (path.stat().st_size, crc)
            with self._lock:
                self._crcs[path] = known
        return known

    # -- faults ----------------------------------------------------------------------------------------------

    def _next_fault(self, window: tuple[datetime, datetime]) -> str | None:
        """The fault for this request of `window`: scripted ones first, then `fault_rate`'s random ones."""
        with self._lock:
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

    def _check_auth(self, header: str | None) -> bool:
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

    def _record(self, start: str | None, end: str | None, status: int) -> None:
        with self._lock:
            self.requests.append((start, end, status))


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
        with fake._lock:
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            self._get(fake)
        finally:
            with fake._lock:
                fake.in_flight -= 1

    def _get(self, fake: FakeExportServer) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        start_text = query.get("start", [None])[0]
        end_text = query.get("end", [None])[0]
        if url.path != EXPORT_PATH:
            fake.apis.serve(self, "GET", url)
            return
        if not fake._check_auth(self.headers.get("Authorization")):
            fake._record(start_text, end_text, 401)
            self._answer(
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
            fake._record(start_text, end_text, 400)
            self._answer(400, f"Invalid request: {exc}".encode())
            return

        fault = fake._next_fault((start, end))
        if fault == "slow":
            time.sleep(fake.slow_seconds)
        elif fault == "reset":
            fake._record(start_text, end_text, 0)
            self._reset()
            return
        elif fault in ("500", "502", "503", "504"):
            fake._record(start_text, end_text, int(fault))
            self._answer(
                int(fault), TIMEOUT_TEXT.encode() if fault == "504" else b"Internal error, try again"
            )
            return
        elif fault == "429":
            fake._record(start_text, end_text, 429)
            self._answer(429, b"Too many concurrent requests", {"Retry-After": f"{fake.retry_after:g}"})
            return
        elif fault == "notzip":
            fake._record(start_text, end_text, 200)
            self._answer(200, NOT_ZIP_HTML, content_type="text/html; charset=utf-8")
            return

        hours = (end - start) // HOUR + 1
        if fake.timeout_over_hours is not None and hours > fake.timeout_over_hours:
            fake._record(start_text, end_text, 504)
            self._answer(504, TIMEOUT_TEXT.encode())
            return
        if not any(fake.hour_events(hour) for hour in _hours(start, end)):
            fake._record(start_text, end_text, 404)
            self._answer(404, NO_DATA_TEXT.encode())
            return
        if fake.max_archive_bytes is not None:
            members = fake.window_members(start, end)
            estimate = sum(path.stat().st_size + 2 * len(name) + 150 for name, path in members)
            if estimate > fake.max_archive_bytes:
                fake._record(start_text, end_text, 400)
                self._answer(400, TOO_LARGE_TEXT.encode())
                return

        streamed = fake.stream_archive(start, end)
        target: Path | None = None
        try:
            if streamed is not None:
                size, corrupt_at, chunks = streamed
            else:  # ZIP64: zipfile writes it to a file first
                assert fake._cache_dir is not None
                handle, name = tempfile.mkstemp(suffix=".zip", dir=fake._cache_dir)
                os.close(handle)
                target = Path(name)
                corrupt_at = fake.build_archive(start, end, target)
                size = target.stat().st_size
                chunks = _file_chunks(target)
            fake._record(start_text, end_text, 200)
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

    def _answer(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        content_type: str = "text/plain; charset=utf-8",
    ) -> None:
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
        piece = _PACED_CHUNK if pace else _CHUNK
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


def _hours(start: datetime | str, end: datetime | str) -> list[datetime]:
    first = parse_param(start, is_end=False) if isinstance(start, str) else utc_hour(start)
    last = parse_param(end, is_end=True) if isinstance(end, str) else utc_hour(end)
    return [first + HOUR * index for index in range(int((last - first) / HOUR) + 1)]


class _CorpusFile:
    """An NDJSON file's lines by the upload hour of their `server_upload_time` (offsets only: the file may be large)."""

    _UPLOAD_HOUR = re.compile(rb'"server_upload_time"\s*:\s*"(\d{4})-(\d{2})-(\d{2})[ T](\d{2})')

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offsets: dict[datetime, list[int]] = {}
        offset = 0
        with path.open("rb") as source:
            for number, line in enumerate(source, 1):
                if line.strip():
                    match = self._UPLOAD_HOUR.search(line)
                    if match is None:
                        raise ValueError(f"{path}, line {number}: no server_upload_time to place it in an hour")
                    year, month, day, hour = (int(part) for part in match.groups())
                    self._offsets.setdefault(datetime(year, month, day, hour, tzinfo=UTC), []).append(offset)
                offset += len(line)
        stat = path.stat()
        # cached members are named by this: an edited file gets new ones
        self.key = "_c" + hashlib.blake2b(
            f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=6
        ).hexdigest()

    def count(self, hour: datetime) -> int:
        return len(self._offsets.get(hour, ()))

    def lines(self, hour: datetime) -> list[bytes]:
        with self.path.open("rb") as source:
            found = []
            for offset in self._offsets.get(hour, ()):
                source.seek(offset)
                found.append(source.readline().rstrip(b"\r\n"))
            return found


_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # central directory entry, then the name
_END = struct.Struct("<4sHHHHIIH")  # end of central directory record


def _dos_time(when: tuple[int, int, int, int, int, int]) -> tuple[int, int]:
    """(time, date) as a zip header holds them."""
    year, month, day, hour, minute, second = when
    return hour << 11 | minute << 5 | second // 2, (year - 1980) << 9 | month << 5 | day


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as source:
        while chunk := source.read(_CHUNK):
            yield chunk


def _zip_time(hour: datetime) -> tuple[int, int, int, int, int, int]:
    # a fixed timestamp per window makes the same request give the same bytes
    return (max(hour.year, 1980), hour.month, hour.day, hour.hour, 0, 0)

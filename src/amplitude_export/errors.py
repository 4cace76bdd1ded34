"""Every error amplitude-export raises, as one tree split by what the caller should do.

    AmplitudeExportError            root; exit code 1 unless a subclass says otherwise
    ├── UsageError                  bad input (dates, flags, URLs): fix the command        -> exit 2
    │   └── EnvFileError            a `.env` line that does not parse                      -> exit 2
    ├── AuthError                   401/403: wrong credentials or wrong region: stop       -> exit 3
    ├── DestinationError            the destination cannot be opened or written            -> exit 4
    │   ├── StorageError            a file in the data dir, log dir or destination cannot be
    │   │                           written (full disk, read-only, a file in the way)      -> exit 4
    │   └── DestinationBusyError    another run holds the destination's lock               -> exit 5
    ├── TransientError              5xx, 429, timeouts, short or broken bodies: retry
    ├── WindowTooLargeError         400 (too large), or retries spent with 504s among them: split the window
    ├── ArchiveError                a landed archive fails its zip/gzip checks: fetch it again
    ├── WindowFailedError           one hour still failed after retries and splits: report, go on
    ├── QuotaExceededError          the month's cohort downloads are spent: note it, download no more
    └── NotOnPlanError              an API the project's plan lacks (taxonomy's 403): note it, go on

Each error carries the fields that build its message (window, status, member, line) and never the secret key.
"""

from __future__ import annotations

import errno
from pathlib import Path

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_DESTINATION = 4
EXIT_BUSY = 5
EXIT_INTERRUPTED = 130


class AmplitudeExportError(Exception):
    """Root of every error this package raises on purpose."""

    exit_code = EXIT_INCOMPLETE


class UsageError(AmplitudeExportError):
    """The user's input is wrong (an unparseable date, end before start, a bad destination URL)."""

    exit_code = EXIT_USAGE


class EnvFileError(UsageError):
    """A `.env` file that does not parse: bad input even where only the project's name would be read from it."""


class AuthError(AmplitudeExportError):
    """The Export API refused the credentials (401/403). A wrong region is the usual cause."""

    exit_code = EXIT_AUTH

    def __init__(self, message: str, *, status: int | None = None, region_hint: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.region_hint = region_hint


class DestinationError(AmplitudeExportError):
    """The destination cannot be opened, created or written (bad path, unreachable server, no privilege)."""

    exit_code = EXIT_DESTINATION


class StorageError(DestinationError):
    """A file under the data dir or log dir, or of the destination, cannot be written: a full disk, a read-only
    filesystem, a file where a directory should be. The message names the path and the OS's reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot write {path}: {reason}")
        self.path = str(path)
        self.reason = reason

    @classmethod
    def from_os_error(cls, exc: OSError, path: str | Path | None = None) -> StorageError:
        """The error for `exc`, naming the file it names, else `path` (a failed `write` names none)."""
        where = exc.filename if exc.filename is not None else path
        if path is not None and exc.errno in (errno.EEXIST, errno.ENOTDIR):
            where = path  # the file to write; the reason names the file in its way
        return cls(where if where is not None else "a file", os_reason(exc))


def os_reason(exc: OSError) -> str:
    """The OS's reason for `exc` in a few words; where a directory cannot be made because a file stands in its
    path (mkdir's "File exists", "Not a directory"), that file is named."""
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno in (errno.EEXIST, errno.ENOTDIR) and isinstance(exc.filename, str | Path):
        path = Path(exc.filename)
        in_the_way = next((p for p in reversed((path, *path.parents)) if p.exists() and not p.is_dir()), None)
        if in_the_way is not None:
            return f"{in_the_way} is a file, not a directory"
    return exc.strerror or str(exc)


class DestinationBusyError(DestinationError):
    """Another run holds the destination's lock, so this run would interleave windows with it."""

    exit_code = EXIT_BUSY
    queues = True  # `--wait` queues behind the holder (the CLI says so)


class CommitConflictError(DestinationBusyError):
    """A table format without a lock (Iceberg, Delta): other writers' commits won every attempt of this one.
    There is no lock to queue behind, so `--wait` would change nothing."""

    queues = False


class TransientError(AmplitudeExportError):
    """A failure worth retrying: 5xx, 429, a timeout, a body that arrived short or does not open as a zip."""

    def __init__(
        self,
        reason: str,
        *,
        window: str | None = None,
        retry_after: float | None = None,
        attempts: int = 1,
        status: int | None = None,
    ) -> None:
        super().__init__(f"{window}: {reason}" if window else reason)
        self.reason = reason
        self.window = window
        self.retry_after = retry_after
        self.attempts = attempts  # HTTP requests made for the window, once the client has given up
        self.status = status  # the HTTP status that answered, when one did (not for timeouts or broken bodies)


class WindowTooLargeError(AmplitudeExportError):
    """The window is too large for one request (a 400, or a 504 that persisted): split it."""

    def __init__(self, reason: str, *, window: str, status: int, attempts: int = 1) -> None:
        super().__init__(f"{window}: {reason}")
        self.reason = reason
        self.window = window
        self.status = status
        self.attempts = attempts  # HTTP requests the window cost before it was given up as too large


class ArchiveError(AmplitudeExportError):
    """A landed archive is broken (bad central directory, CRC, or gzip stream); it must be fetched again."""

    def __init__(self, reason: str, *, path: str | None = None, member: str | None = None) -> None:
        where = " ".join(part for part in (path, member) if part)
        super().__init__(f"{where}: {reason}" if where else reason)
        self.reason = reason
        self.path = path
        self.member = member


class WindowFailedError(AmplitudeExportError):
    """A window (down to one hour) still failed after every retry and split."""

    def __init__(self, reason: str, *, window: str) -> None:
        super().__init__(f"{window}: {reason}")
        self.reason = reason
        self.window = window


class QuotaExceededError(AmplitudeExportError):
    """Amplitude refused a cohort download because the project's monthly quota of downloads is spent."""


class NotOnPlanError(AmplitudeExportError):
    """An API answered 403 for a reason other than the keys: the project's plan does not include it."""

"""The writer's lock on a local destination: an exclusive `flock` on a lock file, held for the whole run.

`flock(2)`, not `fcntl`/`lockf` record locks. A record lock belongs to the process, and closing any descriptor
of the file, anywhere in the process, drops it: DuckDB's own lock on its database file is one, and a second
descriptor of that file, once closed, let a second run open the file and write into it at the same time. A
flock belongs to the open file description: only closing this lock's own descriptor, or the process ending
(`kill -9` included), releases it, and two descriptions conflict even inside one process. The descriptor is not
inherited by the parse workers: Python opens files non-inheritable, and the workers start by forkserver or spawn.

The lock file is created once and never deleted: a run waiting for the lock of a file that another run then
deleted and created again would hold a lock that no one else sees.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class FileLock:
    """An exclusive, non-blocking flock on `path` (created if missing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock; False when another holder has it. Raises OSError when the file cannot be opened."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        """Release the lock (closing its descriptor drops the flock); safe to call twice."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

"""Where a Parquet dataset's files live: `LocalDirectory` for a path (or a `file://` URL), `FsspecDirectory` for
any other fsspec URL (`s3://`, `gs://`, `az://`, `memory://`, ...), both with the same small set of file
operations the Parquet sink needs (paths relative to the root), and `open_store` to pick one.

A local directory has atomic renames and flock. Object stores have neither, so there the rules are: a data file
is complete before the state names it (a half-moved file is an orphan like any other), the state is one object
written with a single PUT (which object stores apply whole or not at all), and the lock is a best-effort object
`_state/lock` (`object_lock`). See docs/WAREHOUSES.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid as uuid_module
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import duckdb

from ..errors import UsageError
from ..schema import ARROW_SCHEMA
from ..storage import fsspec_options
from .filelock import FileLock
from .object_lock import ObjectLock

if TYPE_CHECKING:
    import pyarrow.dataset as pa_dataset
    from fsspec import AbstractFileSystem

STATE_DIR = "_state"
LOCK_FILE = "_state/lock"
SPILL_DIR = "_state/spill"  # DuckDB's temp_directory while staging a window
TEMP_PREFIX = ".tmp-"
PARTITION = re.compile(r"^upload_date=\d{4}-\d{2}-\d{2}$")
LOCK_STALE_AFTER = timedelta(hours=1)  # an object-store lock not refreshed for this long belongs to a dead run
# which extra provides an fsspec protocol's implementation
EXTRAS = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
    "adl": "azure",
}


class LocalDirectory:
    """The file operations the sink needs, on a local directory. Paths are relative to the root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.label = str(root)
        self._lock = FileLock(root / LOCK_FILE)

    def abs(self, rel: str) -> str:
        """The absolute path DuckDB and pyarrow open."""
        return str(self.root / rel)

    def scan(self, con: duckdb.DuckDBPyConnection, rels: list[str]) -> str:
        """A SQL table expression over the data files `rels` (DuckDB reads local files itself)."""
        return f"read_parquet({sql_list([self.abs(rel) for rel in rels])})"

    def spill_dir(self) -> str:
        """Where DuckDB spills while a window is staged: `_state/spill`."""
        self.makedirs(SPILL_DIR)
        return self.abs(SPILL_DIR)

    def clear_spill(self) -> None:
        """Remove what a crashed run spilled."""
        self.clear_dir(SPILL_DIR)

    def refresh_lock(self) -> None:
        """Nothing to do: a flock lasts as long as the descriptor."""

    def names(self) -> list[str]:
        """The names directly under the root."""
        return sorted(child.name for child in self.root.iterdir()) if self.root.is_dir() else []

    def prepare(self) -> None:
        """Create the root and `_state` (and parents)."""
        (self.root / STATE_DIR).mkdir(parents=True, exist_ok=True)

    def lock(self) -> bool:
        """Take the exclusive lock (a flock on `_state/lock`, see `filelock`); False when another run has it."""
        return self._lock.acquire()

    def unlock(self) -> None:
        """Release the lock."""
        self._lock.release()

    def state_temp_files(self) -> Iterator[str]:
        """Temp files an interrupted state write left in `_state`."""
        for child in (self.root / STATE_DIR).glob(f"{TEMP_PREFIX}*"):
            yield f"{STATE_DIR}/{child.name}"

    def data_files(self) -> Iterator[str]:
        """Every file inside a partition directory (`upload_date=YYYY-MM-DD/`), temp files included."""
        for part in sorted(self.root.iterdir()):
            if part.is_dir() and PARTITION.match(part.name):
                for child in sorted(part.iterdir()):
                    if child.is_file():
                        yield f"{part.name}/{child.name}"

    def exists(self, rel: str) -> bool:
        """Whether `rel` exists."""
        return (self.root / rel).exists()

    def makedirs(self, rel: str) -> None:
        """Create directory `rel`."""
        (self.root / rel).mkdir(parents=True, exist_ok=True)

    def delete(self, rel: str) -> None:
        """Delete file `rel` if present, and its partition directory once empty."""
        path = self.root / rel
        path.unlink(missing_ok=True)
        if path.parent != self.root and path.parent.name != STATE_DIR:
            try:
                path.parent.rmdir()
            except OSError:
                pass  # not empty

    def clear_dir(self, rel: str) -> None:
        """Remove directory `rel` and everything in it."""
        shutil.rmtree(self.root / rel, ignore_errors=True)

    @contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        """A new file for writing, fsynced on a clean exit so a later rename never exposes unwritten bytes."""
        with open(self.root / rel, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())

    def rename(self, src: str, dst: str) -> None:
        """Rename within a directory, then fsync the directory so the rename survives a power cut."""
        os.replace(self.root / src, self.root / dst)
        self._sync_dir(str(Path(dst).parent))

    def open_read(self, rel: str) -> IO[bytes]:
        """File `rel`, open for reading."""
        return open(self.root / rel, "rb")

    def read_text(self, rel: str) -> str | None:
        """The text of `rel`, or None if it does not exist."""
        try:
            return (self.root / rel).read_text()
        except FileNotFoundError:
            return None

    def write_text_atomic(self, rel: str, text: str) -> None:
        """Replace `rel` with `text` atomically: temp file, fsync, os.replace, fsync the directory."""
        target = self.root / rel
        temp = target.with_name(f"{TEMP_PREFIX}{target.name}-{uuid_module.uuid4().hex[:8]}")
        with open(temp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
        self._sync_dir(str(Path(rel).parent))

    def _sync_dir(self, rel: str) -> None:
        fd = os.open(self.root / rel, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class FsspecDirectory:
    """The same operations on any fsspec filesystem (`s3://`, `gs://`, `az://`, `memory://`, ...).

    What differs from a local directory, and why it stays correct:

    - `rename` is `fs.mv`: a copy then a delete on object stores, not atomic. It happens before the state names
      the file, so a crash mid-move leaves at most an orphan (temp or final name) that the next open deletes.
    - The state is written with one `pipe_file` (a single PUT): object stores make an object visible whole or not
      at all, so there is no temp file and no rename to trust.
    - There is no flock. The lock is an object `_state/lock` (`object_lock.ObjectLock`), refreshed for as long as
      the sink is open (between windows too) and checked again just before each commit; it is best effort.
    - Reads go through pyarrow datasets over the fsspec filesystem, registered in DuckDB; DuckDB's own httpfs
      never sees the URL (so it never needs credentials of its own). Spill files stay on local disk.
    """

    def __init__(self, fs: AbstractFileSystem, root: str, url: str, *, stale_after: timedelta) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.label = url
        self._lock = ObjectLock(fs, self.abs(LOCK_FILE), label=url, name=LOCK_FILE, stale_after=stale_after)
        self._spill: str | None = None
        self._scans = 0
        self._arrow_fs: Any = None

    def abs(self, rel: str) -> str:
        """The path of `rel` on the filesystem (without the protocol)."""
        return f"{self.root}/{rel}"

    def dataset(self, rels: list[str]) -> pa_dataset.Dataset:
        """A pyarrow dataset over the data files `rels`, read through fsspec."""
        import pyarrow.dataset as ds
        import pyarrow.fs as pafs

        if self._arrow_fs is None:
            self._arrow_fs = pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))
        return ds.dataset(
            [self.abs(rel) for rel in rels], schema=ARROW_SCHEMA, format="parquet", filesystem=self._arrow_fs
        )

    def scan(self, con: duckdb.DuckDBPyConnection, rels: list[str]) -> str:
        """Register a dataset over `rels` in `con` and return its name (DuckDB pushes columns and filters down)."""
        self._scans += 1
        name = f"_amplitude_files_{self._scans}"
        con.register(name, self.dataset(rels))
        return name

    def spill_dir(self) -> str:
        """A local temporary directory: spilling to an object store would be slow and is never needed."""
        if self._spill is None:
            self._spill = tempfile.mkdtemp(prefix="amplitude-export-spill-")
        return self._spill

    def clear_spill(self) -> None:
        """Nothing is ever spilled to the filesystem itself."""

    def prepare(self) -> None:
        """Create the root and `_state` where the filesystem has directories (a no-op on object stores)."""
        self.fs.invalidate_cache()  # listings cached by an earlier sink in this process may be stale
        self.fs.makedirs(self.abs(STATE_DIR), exist_ok=True)

    # -- the lock (see `object_lock`) --

    def lock(self) -> bool:
        """Create `_state/lock` unless a fresh one exists; a stale one (dead run) is taken over."""
        return self._lock.acquire()

    def lock_holder(self) -> str:
        """Who holds the lock, for the busy message."""
        return self._lock.holder()

    def refresh_lock(self) -> None:
        """Check the lock is still ours (a run that found it stale may have taken it) and renew its time."""
        self._lock.refresh()

    def unlock(self) -> None:
        """Stop refreshing the lock and delete it if it is still ours; clean the local spill directory."""
        self._lock.release()
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None

    # -- files --

    def state_temp_files(self) -> Iterator[str]:
        """Temp files in `_state` (only an older version or another tool leaves them: the state is one PUT)."""
        for path in self._find(self.abs(STATE_DIR), maxdepth=1):
            name = path.rsplit("/", 1)[-1]
            if name.startswith(TEMP_PREFIX):
                yield f"{STATE_DIR}/{name}"

    def data_files(self) -> Iterator[str]:
        """Every file inside a partition (`upload_date=YYYY-MM-DD/`), temp files included, in one fresh listing."""
        self.fs.invalidate_cache()  # a listing cached in this process may be stale: a missing file is forgotten
        prefix = self.root + "/"
        rels = []
        for path in self._find(self.root, maxdepth=2):
            rel = path.removeprefix(prefix)
            parts = rel.split("/")
            if len(parts) == 2 and PARTITION.match(parts[0]):
                rels.append(rel)
        yield from sorted(rels)

    def names(self) -> list[str]:
        """The names directly under the root."""
        try:
            return sorted(path.rstrip("/").rsplit("/", 1)[-1] for path in self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return []

    def _find(self, path: str, maxdepth: int) -> list[str]:
        try:
            return [p.rstrip("/") for p in self.fs.find(path, maxdepth=maxdepth, withdirs=False)]
        except FileNotFoundError:
            return []

    def exists(self, rel: str) -> bool:
        """Whether `rel` exists."""
        return bool(self.fs.exists(self.abs(rel)))

    def makedirs(self, rel: str) -> None:
        """Create directory `rel` where the filesystem has directories."""
        self.fs.makedirs(self.abs(rel), exist_ok=True)

    def delete(self, rel: str) -> None:
        """Delete file `rel` if present, and its partition directory once empty (where directories exist)."""
        self._delete_quietly(self.abs(rel))
        parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
        if parent and parent != STATE_DIR:
            try:
                if not self.fs.ls(self.abs(parent)):
                    self.fs.rmdir(self.abs(parent))
            except OSError:
                pass  # not empty, or an object store's prefix that vanished with its last object

    def _delete_quietly(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def clear_dir(self, rel: str) -> None:
        """Remove directory `rel` and everything in it."""
        try:
            self.fs.rm(self.abs(rel), recursive=True)
        except FileNotFoundError:
            pass

    @contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        """A new file for writing; a failed write is discarded (an aborted multipart upload) where supported."""
        handle = self.fs.open(self.abs(rel), "wb")
        try:
            yield handle
        except BaseException:
            discard = getattr(handle, "discard", None)
            if discard is not None:
                discard()
            else:
                handle.close()
            raise
        handle.close()

    def rename(self, src: str, dst: str) -> None:
        """Move `src` to `dst`: a copy and a delete on object stores, which is why the state commits, not this."""
        self.fs.mv(self.abs(src), self.abs(dst))

    def open_read(self, rel: str) -> IO[bytes]:
        """File `rel`, open for reading."""
        return self.fs.open(self.abs(rel), "rb")

    def read_text(self, rel: str) -> str | None:
        """The text of `rel`, or None if it does not exist."""
        try:
            return bytes(self.fs.cat_file(self.abs(rel))).decode()
        except FileNotFoundError:
            return None

    def write_text_atomic(self, rel: str, text: str) -> None:
        """Replace `rel` with one PUT, which an object store applies whole or not at all."""
        self.fs.pipe_file(self.abs(rel), text.encode())


def open_store(
    root: str, storage_options: dict[str, Any] | None = None, stale_after: timedelta = LOCK_STALE_AFTER
) -> LocalDirectory | FsspecDirectory:
    """The store for `root`: a local path or `file://` URL, else an fsspec URL (`s3://bucket/prefix`, ...).

    A missing fsspec, or a protocol whose implementation is not installed, is a UsageError naming the
    `pip install` line that fixes it.
    """
    protocol, sep, rest = root.partition("://")
    if not sep:
        return LocalDirectory(Path(root).expanduser())
    protocol = protocol.lower()
    if protocol in ("file", "local"):
        return LocalDirectory(Path(rest).expanduser())
    extra = EXTRAS.get(protocol.split("::")[-1])
    install = f"pip install 'amplitude-export[{extra}]'" if extra else "pip install fsspec"
    try:
        import fsspec
    except ImportError:
        raise UsageError(f"parquet:{root} needs fsspec: {install}") from None
    try:
        fs, path = fsspec.core.url_to_fs(root, **fsspec_options(protocol.split("::")[-1], storage_options))
    except ImportError as exc:
        hint = install if extra else f"{exc} (pip install the package it names)"
        raise UsageError(f"parquet:{root}: the {protocol}:// filesystem is not installed: {hint}") from None
    except ValueError as exc:
        raise UsageError(f"parquet:{root}: {exc}") from None
    return FsspecDirectory(fs, path, root, stale_after=stale_after)


def sql_list(paths: list[str]) -> str:
    """A DuckDB list literal of `paths`."""
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def project_tag(project: str) -> str:
    """The short hash of a project name that its data files carry (`<hours>-<tag>.parquet`)."""
    return hashlib.sha256(project.encode()).hexdigest()[:8]

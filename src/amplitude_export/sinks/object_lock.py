"""A best-effort exclusive lock for stores without flock: one object (owner token, host, pid, times).

Created with mode `xb` where the filesystem supports exclusive create, refused while fresh, taken over once
stale (not refreshed for `stale_after`, or its process on this host gone), refreshed by a thread four times per
`stale_after` for as long as it is held, and checked again before each commit (`refresh`). Two runs starting in
the same instant on a filesystem without exclusive create can both get it: one writer at a time is the user's job.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid as uuid_module
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .. import clock
from ..errors import DestinationBusyError

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem


class ObjectLock:
    """The lock object at `path` on `fs`; `name` is how messages call it (`_state/lock`)."""

    def __init__(self, fs: AbstractFileSystem, path: str, *, label: str, name: str, stale_after: timedelta) -> None:
        self.fs = fs
        self.path = path
        self.label = label
        self.name = name
        self.stale_after = stale_after
        self._token: str | None = None
        self._lost = False  # another run took the lock over: no commit of ours may follow
        self._guard = threading.Lock()  # the heartbeat and the writer refresh the lock object in turn
        self._stop_beat: threading.Event | None = None
        self._beat: threading.Thread | None = None

    def acquire(self) -> bool:
        """Create the lock unless a fresh one exists; a stale one (dead run) is taken over."""
        for _ in range(2):
            if self._create():
                self._start_heartbeat()
                return True
            holder = self._read()
            if holder is not None and not self._stale(holder):
                return False
            self._delete_quietly()
        return False

    def holder(self) -> str:
        """Who holds the lock, for the busy message."""
        holder = self._read() or {}
        return f"pid {holder.get('pid')} on {holder.get('host')}, refreshed {holder.get('refreshed')}"

    def refresh(self) -> None:
        """Check the lock is still ours (a run that found it stale may have taken it) and renew its time."""
        with self._guard:
            if self._token is not None:
                holder = self._read()
                if holder is not None and holder.get("token") == self._token:
                    self.fs.pipe_file(self.path, self._body(holder.get("acquired")))
                    return
                self._token, self._lost = None, True
            if self._lost:
                raise DestinationBusyError(
                    f"{self.label}: another run took over {self.name} (it looked stale); this run stops before "
                    "committing, so nothing of it is kept"
                )

    def release(self) -> None:
        """Stop refreshing the lock and delete it if it is still ours."""
        if self._stop_beat is not None and self._beat is not None:
            self._stop_beat.set()
            self._beat.join()
            self._stop_beat = self._beat = None
        if self._token is None:
            return
        holder = self._read()
        if holder is not None and holder.get("token") == self._token:
            self._delete_quietly()
        self._token = None

    def _start_heartbeat(self) -> None:
        self._stop_beat = threading.Event()
        self._beat = threading.Thread(
            target=self._heartbeat, args=(self._stop_beat,), daemon=True, name="amplitude-export-lock"
        )
        self._beat.start()

    def _heartbeat(self, stop: threading.Event) -> None:
        """Refresh the lock four times per `stale_after` while the run lives, so that it never looks stale
        between windows (a long download) nor within one; a refresh that fails is tried again at the next beat,
        and the check before each commit still decides."""
        while not stop.wait(max(self.stale_after.total_seconds() / 4, 0.05)):
            try:
                self.refresh()
            except DestinationBusyError:
                return
            except Exception:  # noqa: BLE001 - a store's hiccup; the next beat or the commit's check decides
                continue

    def _body(self, acquired: str | None = None) -> bytes:
        now = clock.now().isoformat()
        body = {
            "token": self._token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "acquired": acquired or now,
            "refreshed": now,
        }
        return json.dumps(body).encode()

    def _create(self) -> bool:
        """Create the lock object; True if it now holds our token.

        Exclusive create (`xb`) where the filesystem has it; where it is not implemented, or an implementation
        ignores the `x`, the existence check before and the read back after still catch all but a true race.
        """
        if self.fs.exists(self.path):
            return False
        previous, self._token = self._token, uuid_module.uuid4().hex
        body = self._body()
        try:
            with self.fs.open(self.path, "xb") as handle:
                handle.write(body)
        except FileExistsError:
            self._token = previous
            return False
        except (NotImplementedError, ValueError):
            self.fs.pipe_file(self.path, body)
        holder = self._read()
        if holder is None or holder.get("token") != self._token:
            self._token = previous
            return False
        return True

    def _read(self) -> dict[str, Any] | None:
        try:
            text = bytes(self.fs.cat_file(self.path)).decode()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            return {}  # half-written or foreign: stale unless its age says otherwise (it has none)
        return holder if isinstance(holder, dict) else {}

    def _stale(self, holder: dict[str, Any]) -> bool:
        """A lock is stale when not refreshed for `stale_after`, or its process on this host is gone."""
        try:
            refreshed = datetime.fromisoformat(holder["refreshed"])
        except (KeyError, TypeError, ValueError):
            return True
        if clock.now() - refreshed > self.stale_after:
            return True
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return not _pid_alive(holder["pid"])
        return False

    def _delete_quietly(self) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True

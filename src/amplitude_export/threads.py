"""Work on a daemon thread, with its outcome in a future."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

_T = TypeVar("_T")


def in_daemon_thread(work: Callable[[], _T], *, name: str) -> Future[_T]:
    """Start `work()` on a daemon thread; its result, or what it raised, arrives in the returned future.

    Not a ThreadPoolExecutor: its threads are joined when the interpreter exits, so a Ctrl-C during a stalled
    request or a long hash would wait for them. A daemon thread cut off at exit leaves nothing that is trusted
    later: a download's `.part` file is fetched again, a hash is computed again.
    """
    future: Future[_T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(work())
        except BaseException as exc:  # noqa: BLE001 - raised again where the result is needed
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future

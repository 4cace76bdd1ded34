"""Ctrl-C: the handler the console script installs before it imports anything heavy, and the words it ends with.

It imports only the standard library's `signal` and `threading`, so that `cli.main` can install it first: a
Ctrl-C while the commands' modules are still being imported then ends the process like one anywhere else.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

INTERRUPTED = "interrupted; a re-run picks up where this one stopped"
interrupted = threading.Event()  # set by the handler: whatever ends the command afterwards ends it as interrupted


def interrupt(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C: KeyboardInterrupt, except while a module is being imported, where it waits for the import to end:
    a compiled module interrupted as it initialises can abort the whole process (duckdb's does, with a core dump)
    instead of raising. The signal is sent again shortly, until it arrives outside any import."""
    interrupted.set()
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            main = threading.main_thread().ident
            timer = threading.Timer(0.02, signal.pthread_kill, (main, signal.SIGINT))
            timer.daemon = True
            timer.start()
            return
        frame = frame.f_back
    raise KeyboardInterrupt

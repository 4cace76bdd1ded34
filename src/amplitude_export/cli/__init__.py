"""The command line: a thin skin over the library (`api.py`). Each command parses options, calls one function,
and maps errors to exit codes.

Exit codes: 0 done; 1 some windows failed (or `verify` found problems): the rest completed and the next run
retries them; 2 bad input (dates, flags, a directory that cannot be created, a busy port, destination URL),
refused before anything is created; 3 Amplitude refused the credentials; 4 the data dir, log dir or destination
cannot be opened or written (a full disk); 5 another run holds the destination; 130 interrupted.

`app.py` holds the group and the error mapping, `options.py` the shared options, `commands.py` the commands
that move data, `readback.py` those that read a destination back (`status`, `verify`, `report`), `render.py`
what they print, `maintain.py` and `servers.py` the rest, `interrupts.py` the Ctrl-C handler. This module
imports only that handler: `main` installs it before the commands' modules are imported, and `cli` (the click
group with every command) is imported when first asked for.
"""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING, Any

from .interrupts import INTERRUPTED, interrupt, interrupted

if TYPE_CHECKING:
    from .app import cli

__all__ = ["cli", "main"]


def main() -> None:
    """Console-script entry point: Ctrl-C handling first, so that one that comes while the commands are being
    imported ends the process as it does anywhere else (one line, exit 130); then the command."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started with Ctrl-C ignored
        signal.signal(signal.SIGINT, interrupt)
    try:
        _commands()
        from .app import main as run_command

        if interrupted.is_set():  # during the imports: the handler's signal sent again may come after a short command
            raise KeyboardInterrupt
        run_command()
    except KeyboardInterrupt:  # one that came before `run_command` took Ctrl-C over
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        from ..errors import EXIT_INTERRUPTED

        print(f"error: {INTERRUPTED}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def _commands() -> Any:
    """The click group, once every module that registers commands on it has been imported."""
    from . import commands, maintain, readback, servers  # noqa: F401 - each registers its commands on `cli`
    from .app import cli

    return cli


if not TYPE_CHECKING:  # mypy: an unknown name here stays an error

    def __getattr__(name: str) -> Any:
        if name == "cli":
            return _commands()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

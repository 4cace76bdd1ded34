"""The command line: a thin skin over the library (`api.py`). Each command parses options, calls one function,
and maps errors to exit codes.

Exit codes: 0 done; 1 some windows failed (or `verify` found problems): the rest completed and the next run
retries them; 2 bad input (dates, flags, a directory that cannot be created, a busy port, destination URL),
refused before anything is created; 3 Amplitude refused the credentials; 4 the data dir, log dir or destination
cannot be opened or written (a full disk); 5 another run holds the destination; 130 interrupted.

`app.py` holds the group and the error mapping, `options.py` the shared options, `commands.py` the commands
that move data, `readback.py` those that read a destination back (`status`, `verify`, `report`), `render.py`
what they print, `maintain.py` and `servers.py` the rest.
"""

from . import commands, maintain, readback, servers  # noqa: F401 - each registers its commands on `cli`
from .app import cli, main

__all__ = ["cli", "main"]

"""amplitude-export: move raw events out of Amplitude's Export API into DuckDB, Parquet, PostgreSQL and pandas.

The library is what the CLI calls. Each command is a function with the command's options as keyword arguments:
`run`, `extract`, `load`, `sync_deletions` (`api.py`), `status`, `verify` (`reads.py`). The loaded events come
back as a stream of Arrow batches (`read_batches`), an Arrow table (`read_arrow`) or a pandas DataFrame
(`read_events`, the `pandas` extra); `read_table` gives the tables of `run --streams` (`reads.py`).

They are imported when first used: the console script imports this package before it can handle Ctrl-C
(`cli.main`), so this module itself imports next to nothing.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import RunResult, extract, load, run, sync_deletions
    from .reads import read_arrow, read_batches, read_events, read_table, status, verify

_API = {
    "RunResult": "api", "extract": "api", "load": "api", "run": "api", "sync_deletions": "api",
    "read_arrow": "reads", "read_batches": "reads", "read_events": "reads", "read_table": "reads",
    "status": "reads", "verify": "reads",
}  # fmt: skip
__all__ = [
    "RunResult",
    "__version__",
    "extract",
    "load",
    "read_arrow",
    "read_batches",
    "read_events",
    "read_table",
    "run",
    "status",
    "sync_deletions",
    "verify",
]

if not TYPE_CHECKING:  # mypy: an unknown name here stays an error

    def __getattr__(name: str) -> object:
        module = _API.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value


class _Package(types.ModuleType):
    """This package, keeping its API functions when a submodule of the same name (`verify.py`, `status.py`) is
    first imported: the import system would otherwise set the package's attribute to the module. The module
    itself stays importable (`from amplitude_export.verify import ...`)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

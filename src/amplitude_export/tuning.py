"""Process-wide settings for bulk loading, all in one place.

The CLI calls `tune_for_bulk_loading` once at start, and each parse worker process does too; a library caller's
process is left as it is. Each setting, what it saves and why it is safe, is a row of the table in
docs/PARSE_DESIGN.md.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.abc
import os
import sys
from typing import Any


def tune_for_bulk_loading() -> None:
    """Apply every setting below; call it before numpy, pyarrow and httpx are imported."""
    # numpy's OpenBLAS starts a spinning thread per core at import; the loader never multiplies matrices
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # httpx's own command-line client (httpx._main) imports rich and pygments at `import httpx`; when that import
    # fails httpx defines a stub `httpx.main` instead, and nothing here calls either
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    # a batch allocates many tracked objects (tuples, lists) and no cycles: collect less often, never stop
    gc.set_threshold(100_000, 50, 50)
    _keep_freed_blocks()
    _answer_pyarrows_pandas_probe()


def _keep_freed_blocks() -> None:
    """glibc gives freed blocks over 128 KB back to the OS and faults them in again on the next batch; blocks up
    to 32 MB (an inflated block, a column buffer) now come from the heap, which keeps up to 256 MB for reuse."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


class _NoPandasYet(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("pandas is imported when a conversion needs it")


def _answer_pyarrows_pandas_probe() -> None:
    """pyarrow's first `pa.array` or `pa.scalar` imports pandas, only to ask whether the value is a pandas object.
    Let that first look find none, where pandas is not imported yet: the loader never hands pyarrow a pandas
    object. pyarrow looks again, and imports pandas, when a conversion to pandas needs it (`to_pandas`, so
    `read_events`); until then it takes a pandas object handed to `pa.array` as a sequence."""
    if "pandas" in sys.modules:
        return
    import pyarrow as pa

    finder = _NoPandasYet()
    sys.meta_path.insert(0, finder)
    try:
        pa.scalar(0)
    finally:
        sys.meta_path.remove(finder)

"""The process-wide settings the CLI and parse worker processes apply (tuning.py): each keeps what it trades on.

Each test runs in a fresh interpreter, as the settings are process-wide.
"""

from __future__ import annotations

import os
import subprocess
import sys


def run_python(script: str, **env: str) -> str:
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_bulk_loading_settings_spare_the_pandas_import_until_a_conversion_needs_it() -> None:
    script = """
import sys
from amplitude_export.tuning import tune_for_bulk_loading
tune_for_bulk_loading()
import pyarrow as pa
pa.array([1, 2]); pa.scalar("x")
assert "pandas" not in sys.modules, "pyarrow imported pandas"
frame = pa.table({"a": [1, 2]}).to_pandas()
import pandas as pd
assert isinstance(frame, pd.DataFrame) and frame["a"].tolist() == [1, 2]
assert pa.array(pd.Series([3, 4])).to_pylist() == [3, 4]
print("ok")
"""
    assert run_python(script) == "ok"


def test_the_collector_still_frees_cycles_and_a_users_thread_setting_stands() -> None:
    # a higher threshold only makes collections rarer: cyclic garbage must still go without an explicit collect
    script = """
import gc, os, weakref
from amplitude_export.tuning import tune_for_bulk_loading
tune_for_bulk_loading()
assert gc.isenabled()
class Node:
    pass
first = Node(); first.me = first
gone = weakref.ref(first)
del first
keep = [[i] for i in range(300_000)]  # allocations enough for the raised threshold to trigger collections
assert gone() is None, "a cycle outlived the collections its allocations trigger"
print(os.environ["OPENBLAS_NUM_THREADS"])
"""
    assert run_python(script, OPENBLAS_NUM_THREADS="3") == "3"


def test_freed_blocks_go_back_to_the_system_past_the_trim_threshold() -> None:
    # blocks up to 32 MB now come from the heap and freed memory is kept up to the trim threshold (256 MB) for
    # the next batch: the process must not keep more than that once a larger peak is freed
    script = """
import os
from amplitude_export.tuning import tune_for_bulk_loading
tune_for_bulk_loading()
def rss_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
before = rss_mb()
blocks = [b"\\x01" * (4 << 20) for _ in range(160)]  # 640 MB of inflate-sized blocks, every page written
peak = rss_mb()
del blocks
print(round(peak - before), round(rss_mb() - before))
"""
    peak, kept = map(int, run_python(script).split())
    assert peak >= 600, peak  # the blocks were really resident
    assert kept <= 256 + 32, kept

"""The figures of docs/DECISIONS.md, as ratios of medians of candidates run in turn (machine noise hits them alike).

    .venv/bin/python benchmarks/decisions.py --rounds 5
    .venv/bin/python benchmarks/decisions.py --tiny      # 400 lines, 1 round, 20,000 uuids: the test runs this

- JSON decode: msgspec into the reader's typed struct against the standard library's `json` to a dict, per line;
- inflate and CRC-32: ISA-L against zlib, on one gzip member;
- the reader (`WindowReader`, one worker, inflate included) with the compiled parser against the msgspec path;
- memory per uuid (RSS growth, each in a fresh process): a Python set of str against `_fastparse.StringSet`.

The lines are `amplitude_export.synthetic` events (~1.7 KB each, shaped like an export), none varied.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import isal.isal_zlib as isal_zlib
import msgspec

from amplitude_export import parse, reader, synthetic
from amplitude_export.windows import Window

HOUR = datetime(2024, 3, 1, 14, tzinfo=UTC)
MEMORY = """
import sys, uuid
import pyarrow as pa
from amplitude_export._fastparse import StringSet
ids = pa.array([str(uuid.uuid4()) for _ in range(int(sys.argv[2]))], pa.string())
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
if sys.argv[1] == "set":
    kept = set(ids.to_pylist())
else:
    kept = StringSet()
    validity, offsets, data = ids.buffers()
    kept.add(offsets, data, validity, ids.offset, len(ids))
print((rss() - before) / len(ids))
"""


def medians(candidates: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, candidate in candidates.items():
            gc.collect()
            started = time.perf_counter()
            candidate()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def read_window(path: Path, window: Window, parser: object) -> int:
    parse.FAST_PARSER = parser
    return sum(batch.num_rows for batch in
               reader.WindowReader(path, window, run_id="bench", rejects_dir=None, workers=1).batches())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--uuids", type=int, default=1_000_000, help="uuids held by each set whose memory is measured")
    parser.add_argument("--tiny", action="store_true", help="400 lines, one round, 20,000 uuids")
    args = parser.parse_args()
    if args.tiny:
        args.events, args.rounds, args.uuids = 400, 1, 20_000

    # no line varied: the decoders are compared on lines that fit the struct, not on their fallbacks
    events = synthetic.generate_hour(HOUR, project_id=1, seed=1, events=args.events, variation=0)
    lines = [msgspec.json.encode(event) for event in events]
    text = b"\n".join(lines) + b"\n"
    member = gzip.compress(text, 6)
    with tempfile.TemporaryDirectory() as scratch:
        archive = Path(scratch) / "window.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zipped:
            zipped.writestr(f"1/1_{HOUR:%Y-%m-%d_%-H}#0.json.gz", member)
        window = Window(HOUR, HOUR)
        compiled = parse.FAST_PARSER
        assert compiled is not None, "the compiled parser is not built: pip install -e . with a C compiler"
        read = read_window(archive, window, compiled)
        assert read == read_window(archive, window, None) > len(lines) * 0.99, read  # both read the archive
        got = medians({
            "json": lambda: [json.loads(line) for line in lines],
            "msgspec": lambda: [parse.EVENT_DECODER.decode(line) for line in lines],
            "zlib inflate": lambda: gzip.zlib.decompress(member, 31),
            "isal inflate": lambda: isal_zlib.decompress(member, 31),
            "zlib crc": lambda: gzip.zlib.crc32(text),
            "isal crc": lambda: isal_zlib.crc32(text),
            "reader, compiled": lambda: read_window(archive, window, compiled),
            "reader, msgspec": lambda: read_window(archive, window, None),
        }, args.rounds)
        parse.FAST_PARSER = compiled
    memory = {kind: float(subprocess.run([sys.executable, "-c", MEMORY, kind, str(args.uuids)], capture_output=True,
                                         text=True, check=True).stdout) for kind in ("set", "stringset")}
    print(f"{len(lines):,} lines of {len(text) / len(lines):,.0f} B, {args.rounds} rounds (medians, seconds): "
          + ", ".join(f"{name} {value:.3f}" for name, value in got.items()))
    print(f"decode: msgspec {got['json'] / got['msgspec']:.1f}x json's lines/s")
    print(f"ISA-L: inflate {got['zlib inflate'] / got['isal inflate']:.1f}x zlib, "
          f"CRC-32 {got['zlib crc'] / got['isal crc']:.1f}x")
    print(f"reader: compiled parser {got['reader, msgspec'] / got['reader, compiled']:.1f}x the msgspec path")
    print(f"uuids: Python set {memory['set']:.0f} B each, StringSet {memory['stringset']:.0f} B")


if __name__ == "__main__":
    main()

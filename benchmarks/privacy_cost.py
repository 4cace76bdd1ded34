"""What the PII controls cost a load: CPU seconds of `amplitude-export load` into DuckDB with and without
`--hash-columns`/`--exclude-columns`, interleaved on one day's archive.

    .venv/bin/python benchmarks/privacy_cost.py --events 100000 --rounds 3
    .venv/bin/python benchmarks/privacy_cost.py --controls "--hash-columns user_id --exclude-columns ip_address"
    .venv/bin/python benchmarks/privacy_cost.py --tiny      # 2,400 events, 1 round: the test runs this

The archive is a day of the fake server's events (`FakeExportServer`, 2 % of lines varied), landed once by
`extract`. Each round loads a fresh copy into a fresh DuckDB file, once plain and once with the controls, in its
own process (benchmarks/measure.py), so machine noise hits both alike. Prints each round and the medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from measure import measure

from amplitude_export.fake_server import FakeExportServer

DAY = datetime(2025, 7, 1, tzinfo=UTC)
CONTROLS = ["--hash-columns", "user_id,device_id,user_properties.name",
            "--exclude-columns", "ip_address,location_lat,location_lng,city"]
CLI = [sys.executable, "-c", "from amplitude_export.cli import main; main()"]


def land(workdir: Path, events: int) -> Path:
    """The day's archive, extracted once from a fake server (cached in `workdir`)."""
    raw = workdir / f"day-{events}" / "raw"
    if not list(raw.glob("*.zip")):
        with FakeExportServer(events_per_hour=max(1, events // 24), data_start=DAY,
                              data_end=DAY.replace(hour=23)) as server:
            env = {**os.environ, "AMP_API_KEY": server.api_key, "AMP_SECRET_KEY": "demo-secret",
                   "AMP_BASE_URL": server.url}
            subprocess.run([*CLI, "extract", "--start", f"{DAY:%Y-%m-%d}", "--end", f"{DAY:%Y-%m-%d}",
                            "--data-dir", str(raw.parent), "--log-dir", str(workdir / "logs")],
                           env=env, check=True, capture_output=True)
    (archive,) = raw.glob("*.zip")
    return archive


def load_once(archive: Path, workdir: Path, controls: list[str]) -> float:
    run = Path(tempfile.mkdtemp(dir=workdir))
    (run / "raw").mkdir()
    shutil.copy(archive, run / "raw" / archive.name)
    env = {**os.environ, "AMP_HASH_KEY": "benchmark key, 32 bytes or more....", "OPENBLAS_NUM_THREADS": "1"}
    done = measure([*CLI, "load", "--data-dir", str(run), "--log-dir", str(run / "logs"), "--no-progress",
                    "--keep-raw", "--dest", f"duckdb:{run / 'events.duckdb'}", *controls], env=env)
    shutil.rmtree(run)
    if done.returncode != 0:
        raise SystemExit(done.output[-3000:])
    return done.cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "amplitude-privacy-bench")
    parser.add_argument("--controls", default=" ".join(CONTROLS), help="the options measured against none")
    parser.add_argument("--tiny", action="store_true", help="2,400 events, one round, a fresh workdir")
    args = parser.parse_args()
    controls = args.controls.split()
    if args.tiny:
        args.events, args.rounds, args.workdir = 2_400, 1, Path(tempfile.mkdtemp())
    args.workdir.mkdir(parents=True, exist_ok=True)
    archive = land(args.workdir, args.events)
    times: dict[str, list[float]] = {"plain": [], "controls": []}
    for round_no in range(1, args.rounds + 1):
        for name, options in (("plain", []), ("controls", controls)):
            times[name].append(load_once(archive, args.workdir, options))
            print(f"round {round_no} {name}: {times[name][-1]:.2f} CPU s", flush=True)
    plain, private = statistics.median(times["plain"]), statistics.median(times["controls"])
    print(f"events {args.events:,}; controls: {' '.join(controls)}")
    print(f"median CPU s: plain {plain:.2f}, with controls {private:.2f} (x{private / plain:.2f}, "
          f"+{private - plain:.2f} s)")


if __name__ == "__main__":
    main()

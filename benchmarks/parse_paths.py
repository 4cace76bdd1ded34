"""Measure the candidate parse paths side by side, interleaved, with `gzip -dc` as the floor.

    .venv/bin/python benchmarks/parse_paths.py --events 480000 --rounds 3
    .venv/bin/python benchmarks/parse_paths.py --tiny      # 480 events, 1 round, a fresh workdir: the test runs this

Builds (once, cached under --workdir) a synthetic day archive shaped like an export (several gzipped NDJSON members
per upload hour, ~1.7 KB per event, from `amplitude_export.synthetic`), then runs every candidate in its own
subprocess, round-robin, so machine noise hits them alike. Reports events/s, CPU seconds and peak RSS of the
candidate's process tree (benchmarks/measure.py).

Candidates
    gzip        `gzip -dc` over the extracted members to /dev/null: the floor to beat
    inflate     isal inflate + line split in Python, no parsing: the cost of reading alone
    reader1     WindowReader(workers=1) -> DuckDB table (the compiled parser where built, else msgspec)
    reader2     WindowReader(workers=2) -> DuckDB table (the same on 2 parse threads; worker processes where the
                compiled parser is not built)
    duckdb      DuckDB read_json over the extracted members, typed columns, nested as JSON, memory_limit set,
                ignore_errors (it stops at the first drifted type otherwise): no line numbers, no _extra, no
                rejects, and it drops lines; a speed reference, not a candidate for fidelity
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import sys
import tempfile
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
from measure import measure

DAY = datetime(2025, 7, 1, tzinfo=UTC)
CANDIDATES = ("gzip", "inflate", "reader1", "reader2", "duckdb")


def build_archive(workdir: Path, events: int, members_per_hour: int) -> tuple[Path, list[Path]]:
    """A day's archive (24 hours x members_per_hour members) and the same members extracted as .json.gz files."""
    from amplitude_export.synthetic import generate_hour

    archive = workdir / f"day_{events}_{members_per_hour}.zip"
    extracted = workdir / f"day_{events}_{members_per_hour}"
    if not archive.exists():
        extracted.mkdir(parents=True, exist_ok=True)
        per_hour = events // 24
        tmp = archive.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as out:
            for h in range(24):
                hour = DAY + timedelta(hours=h)
                lines = generate_hour(hour, project_id=123, seed=1, events=per_hour)
                size = -(-len(lines) // members_per_hour)
                for n in range(members_per_hour):
                    part = lines[n * size : (n + 1) * size]
                    body = b"".join(msgspec.json.encode(e) + b"\n" for e in part)
                    name = f"123/123_{hour:%Y-%m-%d}_{hour.hour}#{n}.json.gz"
                    data = gzip.compress(body, compresslevel=6)
                    out.writestr(name, data)
                    (extracted / name.replace("/", "_")).write_bytes(data)
        tmp.rename(archive)
    return archive, sorted(extracted.glob("*.json.gz"))


# ------------------------------------------------------------------------------------------- candidates (child)


def _duckdb_connection(path: Path):  # type: ignore[no-untyped-def]
    import duckdb

    from amplitude_export import schema

    path.unlink(missing_ok=True)
    con = duckdb.connect(str(path))
    con.execute("SET memory_limit='500MB'")
    con.execute("SET preserve_insertion_order=false")
    columns = ", ".join(f"{schema.quote(c.name)} {schema.DUCKDB_TYPES[c.kind]}" for c in schema.ALL_COLUMNS)
    con.execute(f"CREATE TABLE events ({columns})")
    return con


def run_reader(archive: Path, workdir: Path, workers: int) -> int:
    from amplitude_export.reader import WindowReader
    from amplitude_export.windows import Window

    con = _duckdb_connection(workdir / f"bench_reader{workers}.duckdb")
    window = Window(DAY, DAY + timedelta(hours=23))
    reader = WindowReader(archive, window, run_id="bench", rejects_dir=workdir / "rejects", workers=workers)
    rows = 0
    for batch in reader.batches():
        con.execute("INSERT INTO events BY NAME SELECT * FROM batch")
        rows += batch.num_rows
    reader.hour_records()
    con.close()
    return rows


def run_duckdb(files: list[Path], workdir: Path) -> int:
    from amplitude_export import schema

    con = _duckdb_connection(workdir / "bench_duckdb.duckdb")
    types = {**schema.DUCKDB_TYPES, schema.TIMESTAMP: "TIMESTAMP"}
    spec = "{" + ", ".join(f"'{c.source}': '{types[c.kind]}'" for c in schema.EXPORT_COLUMNS) + "}"
    names = ", ".join(f"'{f}'" for f in files)
    select = ", ".join(
        schema.quote(c.source) + ("::TIMESTAMPTZ" if c.kind == schema.TIMESTAMP else "") + " AS " + schema.quote(c.name)
        for c in schema.EXPORT_COLUMNS
    )
    con.execute("SET TimeZone='UTC'")
    con.execute(
        f"INSERT INTO events BY NAME SELECT {select}, filename AS _member, 'bench' AS _run_id "
        f"FROM read_json([{names}], "
        f"format='newline_delimited', columns={spec}, filename=true, ignore_errors=true, "
        "timestampformat='%Y-%m-%d %H:%M:%S.%f')"
    )
    rows = con.execute("SELECT count(*) FROM events").fetchone()[0]
    con.close()
    return int(rows)


def run_inflate(files: list[Path]) -> int:
    from amplitude_export.archive import _inflated

    lines = 0
    for file in files:
        with open(file, "rb") as stream:
            for text in _inflated(stream):
                lines += text.count(b"\n")
    return lines


def child(name: str, archive: Path, files: list[Path], workdir: Path) -> None:
    if name == "inflate":
        rows = run_inflate(files)
    elif name == "reader1":
        rows = run_reader(archive, workdir, 1)
    elif name == "reader2":
        rows = run_reader(archive, workdir, 2)
    elif name == "duckdb":
        rows = run_duckdb(files, workdir)
    else:
        raise SystemExit(f"unknown candidate {name}")
    print(rows)


# ------------------------------------------------------------------------------------------------ harness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=480_000)
    parser.add_argument("--members-per-hour", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/amplitude_export_bench"))
    parser.add_argument("--only", default=",".join(CANDIDATES))
    parser.add_argument("--tiny", action="store_true", help="480 events, 1 round, in a fresh workdir")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.events, args.rounds = 480, 1
        args.workdir = Path(tempfile.mkdtemp(prefix="amplitude-parse-paths-"))
        try:
            measure_all(args)
        finally:
            shutil.rmtree(args.workdir, ignore_errors=True)
        return
    measure_all(args)


def measure_all(args: argparse.Namespace) -> None:
    args.workdir.mkdir(parents=True, exist_ok=True)
    archive, files = build_archive(args.workdir, args.events, args.members_per_hour)
    if args.child:
        child(args.child, archive, files, args.workdir)
        return

    names = args.only.split(",")
    raw = sum(len(gzip.decompress(f.read_bytes())) for f in files[:3]) / 3 * len(files)
    print(f"machine: nproc={os.cpu_count()} date={datetime.now(UTC):%Y-%m-%d %H:%M} UTC "
          f"python={sys.version.split()[0]}")
    print(f"archive: {archive.stat().st_size / 1e6:.1f} MB compressed, ~{raw / 1e6:.0f} MB of NDJSON, "
          f"{len(files)} members, {args.events} events (~{raw / args.events:.0f} B each)")
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names:
            if name == "gzip":
                command = ["sh", "-c", "gzip -dc " + " ".join(str(f) for f in files) + " > /dev/null"]
            else:
                command = [sys.executable, __file__, "--events", str(args.events), "--members-per-hour",
                           str(args.members_per_hour), "--workdir", str(args.workdir), "--child", name]
            result = measure(command)
            if result.returncode:
                raise SystemExit(f"{name} failed ({result.returncode}):\n{result.output[-3000:]}")
            wall, cpu, peak, out = result.wall, result.cpu, result.rss, result.output.strip()[-40:]
            results[name].append((wall, cpu, peak))
            print(f"round {round_ + 1} {name:8s} {wall:6.2f} s  cpu {cpu:6.2f} s  peak {peak / 2**20:6.0f} MiB  "
                  f"{out.strip()}", flush=True)
    floor = statistics.median(w for w, _, _ in results["gzip"]) if "gzip" in results else None
    print(f"\n{'candidate':10s} {'events/s':>10s} {'x gzip':>7s} {'cpu s':>7s} {'peak MiB':>9s}   (medians)")
    for name, runs in results.items():
        wall = statistics.median(w for w, _, _ in runs)
        cpu = statistics.median(c for _, c, _ in runs)
        peak = max(p for _, _, p in runs)
        ratio = f"{floor / wall:7.2f}" if floor else "      -"
        print(f"{name:10s} {args.events / wall:10,.0f} {ratio} {cpu:7.2f} {peak / 2**20:9.0f}")


if __name__ == "__main__":
    main()

"""End-to-end benchmark: the real `amplitude-export run` against the fake Export API, with `gzip -dc` as the floor.

    .venv/bin/python benchmarks/run_benchmark.py --rounds 3
    .venv/bin/python benchmarks/run_benchmark.py --rounds 1 --only gzip,duckdb --write-docs
    .venv/bin/python benchmarks/run_benchmark.py --span-days 2 --only gzip,duckdb     # two days, one window each

The fake server (`FakeExportServer`) runs in its own process, so its CPU never counts against the tool. It serves
a fixed synthetic dataset: `--days` days (default 2) of `--events-per-day` events (default 504 000, so 1 008 000
in all; ~1.7 KB of NDJSON each, `--members-per-hour` gzip members per hour at `--gzip-level`). Members are built
once and cached under `--cache-dir`, so re-runs start in seconds.

Every round runs each candidate once, in turn (interleaved), so the machine's noise hits them alike:

    gzip      `gzip -dc` over the day's members (extracted from the archive beforehand) to /dev/null: the floor
    duckdb    `amplitude-export run` for the day into a fresh DuckDB file
    parquet   `amplitude-export run` for the day into a fresh Parquet directory
    postgres  the same pipeline into a fresh PostgreSQL schema (skipped with a note when unreachable); the CLI
              has no `--schema`, so this one runs `pipeline.run` in a subprocess with `PostgresSink(schema=...)`

A run downloads the day from the fake server over loopback (fresh data dir) unless `--landed`, which puts the
archive into the data dir first (outside the timing) so only the load is measured. For each candidate: wall
seconds, events/s, CPU seconds (user+sys of the whole process tree: the CLI, the forkserver and the parse
workers; sampled from /proc every 50 ms, the root process's own figure exact from `wait4`) and peak RSS and
PSS summed over the tree (PSS counts a page shared by several processes once; RSS is sampled every 50 ms, PSS
every 0.5 s, as reading it is dear). Medians over rounds; peaks are maxima. `--write-docs` puts the table into
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DAY0 = datetime(2025, 7, 1, tzinfo=UTC)
API_KEY, SECRET_KEY = "bench-key", "bench-secret"
CANDIDATES = ("gzip", "duckdb", "parquet", "postgres")
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------- the server


def serve(args: argparse.Namespace) -> None:
    """Server process: build (or find in the cache) every member, then print the URL and serve until killed."""
    from amplitude_export.fake_server import FakeExportServer

    last = DAY0 + timedelta(days=args.days) - timedelta(hours=1)
    server = FakeExportServer(
        api_key=API_KEY,
        secret_key=SECRET_KEY,
        seed=7,
        events_per_hour=args.events_per_day // 24,
        members_per_hour=args.members_per_hour,
        data_start=DAY0,
        data_end=last,
        cache_dir=args.cache_dir / "members",
        compresslevel=args.gzip_level,
    )
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    server.start()
    server.window_members(DAY0, last)  # build the members now, not inside the first timed run
    print(server.url, flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()


# ---------------------------------------------------------------------------------------------- measuring


_PSS_EVERY = 10  # polls: reading smaps_rollup of a 700 MB process costs ~13 ms of kernel time on this VM

def _tree(pid: int, cpu: dict[int, float], *, pss_too: bool = True) -> tuple[int, int]:
    """Resident and proportional bytes (RSS, PSS) of `pid` and all its descendants; records each one's CPU
    seconds so far in `cpu`. PSS (0 unless `pss_too`) is dear to read: polled every 50 ms it took ~0.8 CPU s
    from a 4 s run of the tool (the same two cores), so `measure` reads it every `_PSS_EVERY` polls.

    Walking /proc (not RUSAGE_CHILDREN) is what counts the parse workers: they are the forkserver's children,
    and the forkserver is never waited for. PSS splits each shared page among the processes that map it, so
    its sum is the tree's real footprint; the RSS sum counts the libraries the workers share once per process.
    """
    rss = pss = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            cpu[current] = (int(fields[11]) + int(fields[12])) / _TICK
            rss += int(fields[21]) * _PAGE  # rss, in pages
            if pss_too:
                with open(f"/proc/{current}/smaps_rollup") as rollup:
                    for line in rollup:
                        if line.startswith("Pss:"):
                            pss += int(line.split()[1]) * 1024
                            break
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    stack += [int(c) for c in children.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            continue
    return rss, pss


def measure(
    command: list[str], env: dict[str, str] | None = None
) -> tuple[float, float, tuple[int, int], str]:
    """Wall seconds, CPU seconds of the process tree, peak summed (RSS, PSS), and stdout+stderr of `command`."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed below, after the process ends
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    peak = peak_pss = 0
    cpu: dict[int, float] = {}
    polls = 0
    while True:
        rss, pss = _tree(process.pid, cpu, pss_too=polls % _PSS_EVERY == 0)
        polls += 1
        peak, peak_pss = max(peak, rss), max(peak_pss, pss)
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            break
        time.sleep(0.05)
    wall = time.perf_counter() - start
    # wait4 gives the root's CPU plus that of every descendant it (transitively) reaped; the samples add the
    # ones never reaped (parse workers under an unwaited forkserver). Each undercounts, neither double counts.
    total = max(sum(cpu.values()), usage.ru_utime + usage.ru_stime)
    log.seek(0)
    out = log.read().decode(errors="replace")
    log.close()
    if process.returncode:
        raise SystemExit(f"{command[:3]}... failed with exit code {process.returncode}:\n{out[-3000:]}")
    return wall, total, (peak, peak_pss), out


# ---------------------------------------------------------------------------------------------- candidates


def _run_command(url: str, dest: str, data_dir: Path, day: datetime, last: datetime) -> list[str]:
    return [
        str(ROOT / ".venv/bin/amplitude-export"), "run", "--base-url", url, "--api-key", API_KEY,
        "--secret-key", SECRET_KEY, "--start", f"{day:%Y-%m-%d}", "--end", f"{last:%Y-%m-%d}",
        "--dest", dest, "--data-dir", str(data_dir), "--log-dir", str(data_dir / "logs"), "--no-progress",
        "--lag-hours", "0",
    ]  # fmt: skip


_PG_SCRIPT = """
import sys
from datetime import UTC, datetime
from pathlib import Path
from amplitude_export.client import ExportClient
from amplitude_export.config import load_credentials
from amplitude_export.pipeline import run
from amplitude_export.sinks.postgres import PostgresSink
url, dest, schema, data_dir, day, last = sys.argv[1:7]
credentials = load_credentials(api_key="{key}", secret_key="{secret}", base_url=url)
with ExportClient(credentials) as client:
    sink = PostgresSink(dest, schema=schema)
    try:
        report = run(client, sink, project="{key}", start=day, end=last, data_dir=Path(data_dir), lag_hours=0)
    finally:
        sink.close()
print(report.summary())
sys.exit(report.exit_code)
""".replace("{key}", API_KEY).replace("{secret}", SECRET_KEY)


def postgres_ready() -> str | None:
    """None if the PostgreSQL sink can be used, else why not."""
    try:
        import psycopg

        from amplitude_export.sinks import postgres  # noqa: F401
    except ImportError as exc:
        return f"PostgreSQL sink not importable: {exc}"
    try:
        psycopg.connect(PG_URL, connect_timeout=3).close()
    except psycopg.Error as exc:
        return f"PostgreSQL not reachable at {PG_URL}: {str(exc).strip().splitlines()[0]}"
    return None


def drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def land_archive(url: str, cache_dir: Path, day: datetime) -> Path:
    """The day's archive, downloaded once from the fake server and kept in the cache."""
    from amplitude_export.windows import Window

    window = Window(day, day + timedelta(hours=23))
    target = cache_dir / "landed" / f"{window.name}.zip"
    if not target.exists():
        data_dir = cache_dir / "landing"
        shutil.rmtree(data_dir, ignore_errors=True)
        command = [
            str(ROOT / ".venv/bin/amplitude-export"), "extract", "--base-url", url, "--api-key", API_KEY,
            "--secret-key", SECRET_KEY, "--start", f"{day:%Y-%m-%d}", "--end", f"{day:%Y-%m-%d}",
            "--data-dir", str(data_dir), "--log-dir", str(data_dir / "logs"), "--no-progress", "--lag-hours", "0",
        ]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        target.parent.mkdir(parents=True, exist_ok=True)
        (data_dir / "raw" / target.name).rename(target)
        shutil.rmtree(data_dir, ignore_errors=True)
    return target


def count_events(out: str) -> int:
    match = re.search(r"events loaded: ([\d,]+); duplicates dropped: ([\d,]+)", out)
    if not match:
        raise SystemExit(f"no 'events loaded' in the run's output:\n{out[-2000:]}")
    return int(match.group(1).replace(",", "")) + int(match.group(2).replace(",", ""))


# ---------------------------------------------------------------------------------------------- report


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except OSError:
        mem_kb = 0
    import duckdb
    import pyarrow

    return {
        "nproc": str(os.cpu_count()),
        "memory": f"{mem_kb / 2**20:.1f} GiB",
        "cpu": model,
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "python": platform.python_version(),
        "duckdb": duckdb.__version__,
        "pyarrow": pyarrow.__version__,
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def table(results: dict[str, list[tuple[float, float, tuple[int, int], int]]]) -> str:
    floor = statistics.median(w / n for w, _, _, n in results["gzip"]) if results.get("gzip") else None
    lines = [
        (
            "| candidate | events | wall s (median) | events/s | × `gzip -dc` | CPU s (median) | CPU µs/event | "
            "peak RSS (sum, max) | peak PSS (sum, max) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in results.items():
        if not runs:
            continue
        events = runs[0][3]
        wall = statistics.median(w for w, _, _, _ in runs)
        cpu = statistics.median(c for _, c, _, _ in runs)
        peak = max(p[0] for _, _, p, _ in runs)
        peak_pss = max(p[1] for _, _, p, _ in runs)
        ratio = f"{floor / (wall / events):.2f}" if floor else "–"
        lines.append(
            f"| {name} | {events:,} | {wall:.1f} | {events / wall:,.0f} | {ratio} | {cpu:.1f} | "
            f"{cpu / events * 1e6:.1f} | {peak / 2**20:,.0f} MiB | {peak_pss / 2**20:,.0f} MiB |"
        )
    return "\n".join(lines)


def write_docs(text: str) -> None:
    """Replace the generated section of docs/BENCHMARKS.md (between the markers), or append one."""
    path = ROOT / "docs" / "BENCHMARKS.md"
    begin, end = "<!-- run_benchmark:begin -->", "<!-- run_benchmark:end -->"
    block = f"{begin}\n{text}\n{end}"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in current and end in current:
        current = current[: current.index(begin)] + block + current[current.index(end) + len(end) :]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(current)


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--days", type=int, default=2, help="days the fake server holds")
    parser.add_argument("--day", type=int, default=0, help="which day (0-based) each run loads")
    parser.add_argument("--span-days", type=int, default=1,
                        help="days each run loads from --day on (one window per day; gzip -dc reads them all)")
    parser.add_argument("--events-per-day", type=int, default=504_000)
    parser.add_argument("--members-per-hour", type=int, default=3)
    parser.add_argument("--gzip-level", type=int, default=6, help="the members' gzip level")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/amplitude_export_run_benchmark"))
    parser.add_argument("--only", default=",".join(CANDIDATES))
    parser.add_argument("--baseline-src", type=Path,
                        help="also run `duckdb`, `postgres` with PYTHONPATH=this src dir (older checkout), as `*-base`")
    parser.add_argument("--landed", action="store_true", help="put the archive in the data dir before each run")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/BENCHMARKS.md")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cache_dir = args.cache_dir.resolve()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    if args.serve:
        serve(args)
        return

    names = [n for n in args.only.split(",") if n]
    if args.baseline_src:
        for base in ("duckdb", "postgres"):
            if base in names:
                names.insert(names.index(base) + 1, f"{base}-base")
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--days", str(args.days), "--events-per-day", str(args.events_per_day),
         "--members-per-hour", str(args.members_per_hour), "--gzip-level", str(args.gzip_level),
         "--cache-dir", str(args.cache_dir)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="amplitude-bench-", dir=args.cache_dir))
    try:
        print("starting the fake server (first start builds the members: a few minutes)...", flush=True)
        url = server.stdout.readline().strip() if server.stdout else ""
        if not url:
            raise SystemExit("the fake server did not start")
        day = DAY0 + timedelta(days=args.day)
        last = day + timedelta(days=args.span_days - 1)
        if args.span_days < 1 or args.day + args.span_days > args.days:
            raise SystemExit(f"--day {args.day} --span-days {args.span_days} is outside the {args.days} days served")
        archives = [land_archive(url, args.cache_dir, day + timedelta(days=n)) for n in range(args.span_days)]
        members = work / "members"
        members.mkdir()
        for archive in archives:
            with zipfile.ZipFile(archive) as zf:
                infos = [i for i in zf.infolist() if i.filename.endswith(".json.gz")]
                for info in infos:
                    (members / info.filename.replace("/", "_")).write_bytes(zf.read(info))
        files = sorted(members.glob("*.json.gz"))
        raw_bytes = int(subprocess.run(["sh", "-c", f"gzip -dc {members}/*.json.gz | wc -c"],
                                       capture_output=True, text=True, check=True).stdout)
        lines = int(subprocess.run(["sh", "-c", f"gzip -dc {members}/*.json.gz | wc -l"],
                                   capture_output=True, text=True, check=True).stdout)
        info = machine()
        pg_note = postgres_ready() if "postgres" in names else None
        if pg_note:
            names = [n for n in names if not n.startswith("postgres")]
        mode = "archive already landed in the data dir" if args.landed else "download from the fake server included"
        header = [
            (
                f"Machine: nproc {info['nproc']}, {info['memory']} RAM, {info['cpu']}; Python {info['python']}, "
                f"duckdb {info['duckdb']}, pyarrow {info['pyarrow']}. Date: {info['date']}. Load average at "
                f"start: {info['load']}."
            ),
            (
                f"Dataset: the fake server holds {args.days} days × {args.events_per_day:,} events; each run loads "
                + (f"day {day:%Y-%m-%d}" if day == last else f"days {day:%Y-%m-%d}..{last:%Y-%m-%d}")
                + f": {lines:,} events in {len(files)} members, "
                f"{sum(a.stat().st_size for a in archives) / 1e6:.1f} MB "
                f"zipped (gzip level {args.gzip_level}), {raw_bytes / 1e6:.0f} MB of NDJSON "
                f"({raw_bytes / max(lines, 1):,.0f} B/event). Runs: {mode}; {args.rounds} rounds, interleaved."
            ),
        ]
        if pg_note:
            header.append(f"PostgreSQL skipped: {pg_note}.")
        if args.baseline_src:
            header.append(f"`*-base`: the same command with the package imported from {args.baseline_src}.")
        print("\n".join(header), flush=True)

        results: dict[str, list[tuple[float, float, tuple[int, int], int]]] = {name: [] for name in names}
        for round_ in range(args.rounds):
            for name in names:
                data_dir = work / f"{name}-{round_}"
                data_dir.mkdir()
                if args.landed:
                    (data_dir / "raw").mkdir()
                    for archive in archives:
                        shutil.copyfile(archive, data_dir / "raw" / archive.name)
                schema = f"bench_{os.getpid()}_{round_}"
                if name == "gzip":
                    command = ["sh", "-c", "gzip -dc " + " ".join(str(f) for f in files) + " > /dev/null"]
                elif name in ("duckdb", "duckdb-base"):
                    command = _run_command(url, f"duckdb:{data_dir / 'events.duckdb'}", data_dir, day, last)
                elif name == "parquet":
                    command = _run_command(url, f"parquet:{data_dir / 'events'}", data_dir, day, last)
                elif name in ("postgres", "postgres-base"):
                    drop_schema(schema)
                    command = [sys.executable, "-c", _PG_SCRIPT, url, PG_URL, schema, str(data_dir),
                               f"{day:%Y-%m-%d}", f"{last:%Y-%m-%d}"]
                else:
                    raise SystemExit(f"unknown candidate {name}")
                try:
                    env = None
                    if name.endswith("-base"):
                        env = {**os.environ, "PYTHONPATH": str(args.baseline_src.resolve())}
                    wall, cpu, peak, out = measure(command, env)
                finally:
                    if name.startswith("postgres"):
                        drop_schema(schema)
                events = lines if name == "gzip" else count_events(out)
                results[name].append((wall, cpu, peak, events))
                print(f"round {round_ + 1} {name:8s} {wall:7.2f} s  {events / wall:9,.0f} ev/s  cpu {cpu:7.2f} s  "
                      f"peak {peak[0] / 2**20:6,.0f} MiB RSS {peak[1] / 2**20:6,.0f} MiB PSS  ({events:,} events)",
                      flush=True)
                shutil.rmtree(data_dir, ignore_errors=True)
        text = "\n\n".join(["\n".join(header), table(results)])
        print("\n" + text)
        if args.write_docs:
            write_docs(text)
            print("\nwritten to docs/BENCHMARKS.md")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

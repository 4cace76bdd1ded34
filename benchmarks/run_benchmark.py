"""End-to-end benchmark: this tool and the peers a user would otherwise pick, against the fake Export API.

    .venv/bin/python benchmarks/run_benchmark.py --rounds 3 --write-docs     # the table in docs/BENCHMARKS.md
    .venv/bin/python benchmarks/run_benchmark.py --only gzip,duckdb --datasets synthetic-2pct
    .venv/bin/python benchmarks/run_benchmark.py --only gzip,duckdb,postgres --baseline-src /path/to/old/src  # A/B
    .venv/bin/python benchmarks/run_benchmark.py --tiny     # a few hundred events, 1 round: the test runs this

Datasets, one day each, each served by its own fake server process (so its CPU never counts against a candidate):

    synthetic       `synthetic.py`'s day with no line varied (`--events-per-day` events)
    synthetic-2pct  the same with 2 % of lines varied as real exports vary (needs the fake server's `variation`)
    real-lines      a corpus grown from the seven real export lines in tests/data (benchmarks/corpus.py:
                    mutated, `--corpus-lines` lines), served as it is (`FakeExportServer(lines_file=...)`)

Candidates, each run once per round and dataset, in turn (interleaved), so the machine's noise hits them alike:

    gzip      `gzip -dc` over the day's members (extracted beforehand) to /dev/null: the floor
    duckdb    `amplitude-export run` for the day into a fresh DuckDB file
    parquet   the same into a fresh Parquet directory
    iceberg   the same into a fresh Iceberg warehouse directory (`iceberg:DIR`, SQLite catalog)
    delta     the same into a fresh Delta Lake table (a local path)
    postgres  the same into a fresh PostgreSQL schema (reported unavailable when the server is not reachable)
    pandas    benchmarks/peers/pandas_script.py: download, unzip, `pd.read_json` per member, concat, DuckDB
    airbyte   Airbyte's `airbyte-source-amplitude` from PyPI, in benchmarks/.venv-airbyte (made on first use
              unless `--tiny`), reading the events stream (benchmarks/peers/airbyte_source.py)
    spark     the Spark data source in `local[2]` into Parquet (benchmarks/spark_read.py), JVM start included;
              it prints its phases, whose medians follow the table (needs the `[spark]` extra and Java 17)

Every candidate but gzip downloads the day from the fake server over loopback (unless `--landed`, which puts
the archive in the tool's data dir beforehand). Measured per run: wall seconds, CPU seconds and peak RSS and PSS
of the whole process tree (benchmarks/measure.py); medians over rounds, peaks are maxima. Per dataset, outside
the timing, the tool's reader reads the archive once to count the lines its compiled parser took (n/a while
the reader has no such count).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from measure import Measured, measure

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "benchmarks"
DAY = datetime(2025, 7, 1, tzinfo=UTC)
LAST = DAY + timedelta(hours=23)
API_KEY, SECRET_KEY = "bench-key", "bench-secret-0123"  # Airbyte masks the secret in its logs: keep it long
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
DATASETS = {"synthetic": 0.0, "synthetic-2pct": 0.02, "real-lines": None}  # name -> lines varied (None: corpus)
CANDIDATES = ("gzip", "duckdb", "parquet", "iceberg", "delta", "postgres", "pandas", "airbyte", "spark")
TOOL = ("duckdb", "duckdb-base", "parquet", "iceberg", "delta", "postgres", "postgres-base")
AIRBYTE = "airbyte-source-amplitude==0.6.19"
AIRBYTE_VENV = HERE / ".venv-airbyte"


@dataclass
class Dataset:
    name: str
    variation: float | None
    corpus: Path | None = None
    url: str = ""
    members: list[Path] = field(default_factory=list)
    archive: Path | None = None
    lines: int = 0
    raw_bytes: int = 0
    compiled: float | None = None  # share of lines the compiled parser took, if the reader counts them
    unavailable: str = ""  # why the dataset cannot be served, if it cannot


# ---------------------------------------------------------------------------------------------- the servers


def variation_supported() -> bool:
    from amplitude_export.fake_server import FakeExportServer

    return "variation" in inspect.signature(FakeExportServer).parameters


def serve(args: argparse.Namespace) -> None:
    """Server process: build (or find in the cache) every member of the day, print the URL, serve until killed."""
    from amplitude_export.fake_server import FakeExportServer

    options: dict[str, object] = {}
    if args.corpus:
        options["lines_file"] = args.corpus
    else:
        options["events_per_hour"] = args.events_per_day // 24
        if variation_supported():
            options["variation"] = args.variation
    server = FakeExportServer(
        api_key=API_KEY, secret_key=SECRET_KEY, seed=7, members_per_hour=args.members_per_hour, data_start=DAY,
        data_end=LAST, cache_dir=args.members_dir, compresslevel=args.gzip_level, **options,
    )  # fmt: skip
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    server.start()
    server.window_members(DAY, LAST)  # build the members now, not inside the first timed run
    print(server.url, flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()


def _source_key(*paths: Path) -> str:
    """Cached data is keyed by the code that makes it, so a changed generator never serves stale members."""
    digest = hashlib.blake2b(digest_size=5)
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def start_server(dataset: Dataset, args: argparse.Namespace) -> subprocess.Popen[str]:
    package = ROOT / "src" / "amplitude_export"
    key = _source_key(package / "synthetic.py", package / "fake_export.py")
    command = [
        sys.executable, __file__, "--serve", "--members-per-hour", str(args.members_per_hour),
        "--gzip-level", str(args.gzip_level), "--events-per-day", str(args.events_per_day),
        "--members-dir", str(args.cache_dir / f"members-{dataset.name}-{args.events_per_day}-{key}"),
    ]  # fmt: skip
    if dataset.corpus:
        command += ["--corpus", str(dataset.corpus)]
    else:
        command += ["--variation", str(dataset.variation)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def build_corpus(args: argparse.Namespace) -> Path:
    import corpus

    key = _source_key(HERE / "corpus.py", corpus.REAL_LINES)
    path = args.cache_dir / f"corpus-{args.corpus_lines}-{key}.jsonl"
    if not path.exists():
        print(f"building the corpus of {args.corpus_lines:,} lines from the real ones...", flush=True)
    return corpus.build(path, args.corpus_lines, DAY)


def land(dataset: Dataset, args: argparse.Namespace, work: Path) -> None:
    """Download the day's archive (for `--landed`) and extract its members (for `gzip -dc`)."""
    target = work / f"{dataset.name}.zip"
    data_dir = work / f"landing-{dataset.name}"
    command = [
        str(ROOT / ".venv/bin/amplitude-export"), "extract", "--base-url", dataset.url, "--api-key", API_KEY,
        "--secret-key", SECRET_KEY, "--start", f"{DAY:%Y-%m-%d}", "--end", f"{DAY:%Y-%m-%d}", "--data-dir",
        str(data_dir), "--log-dir", str(data_dir / "logs"), "--no-progress", "--lag-hours", "0",
    ]  # fmt: skip
    extracted = subprocess.run(command, capture_output=True, text=True)
    if extracted.returncode:
        raise SystemExit(f"could not download {dataset.name}:\n{extracted.stdout[-2000:]}{extracted.stderr[-2000:]}")
    (archive,) = (data_dir / "raw").glob("*.zip")
    archive.rename(target)
    shutil.rmtree(data_dir)
    dataset.archive = target
    members = work / f"members-{dataset.name}"
    members.mkdir()
    with zipfile.ZipFile(target) as zf:
        for info in zf.infolist():
            if info.filename.endswith(".json.gz"):
                path = members / info.filename.replace("/", "_")
                path.write_bytes(zf.read(info))
                dataset.members.append(path)
    raw = subprocess.run(["sh", "-c", 'gzip -dc "$@" | wc -lc', "sh", *map(str, dataset.members)],
                         capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    dataset.lines, dataset.raw_bytes = int(raw[0]), int(raw[1])
    dataset.compiled = compiled_share(target)


# ---------------------------------------------------------------------------------------------- candidates


def airbyte_python(create: bool) -> tuple[Path | None, str]:
    """The Airbyte connector's interpreter, made on first use if `create`; else None and why not."""
    python = AIRBYTE_VENV / "bin" / "python"
    if not python.exists():
        if not create:
            return None, f"{AIRBYTE_VENV.relative_to(ROOT)} is not there (a run without --tiny makes it)"
        print(f"installing {AIRBYTE} into {AIRBYTE_VENV.relative_to(ROOT)}...", flush=True)
        made = subprocess.run([sys.executable, "-m", "venv", str(AIRBYTE_VENV)], capture_output=True, text=True)
        if not made.returncode:
            made = subprocess.run([str(python), "-m", "pip", "install", "-q", AIRBYTE], capture_output=True, text=True)
        if made.returncode:
            shutil.rmtree(AIRBYTE_VENV, ignore_errors=True)
            last = (made.stderr.strip() or made.stdout.strip()).splitlines()[-1:]
            return None, f"pip could not install {AIRBYTE}: {' '.join(last)}"
    check = subprocess.run([str(python), "-c", "import source_amplitude"], capture_output=True, text=True)
    if check.returncode:
        return None, f"source_amplitude does not import: {check.stderr.strip().splitlines()[-1:]}"
    return python, ""


def spark_unavailable() -> str:
    if importlib.util.find_spec("pyspark") is None:
        return "pyspark is not installed: pip install -e '.[spark]'"
    if shutil.which("java") is None:
        return "no java on PATH (Spark needs Java 17)"
    return ""


def postgres_unavailable() -> str:
    try:
        import psycopg

        psycopg.connect(PG_URL, connect_timeout=3).close()
    except ImportError as exc:
        return f"psycopg not importable: {exc}"
    except psycopg.Error as exc:
        return f"PostgreSQL not reachable at {PG_URL}: {str(exc).strip().splitlines()[0]}"
    return ""


def drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def unavailable(args: argparse.Namespace, names: list[str]) -> dict[str, str]:
    """Candidate -> why it cannot run here (reported in the table, never a failure)."""
    why: dict[str, str] = {}
    if any(name.startswith("postgres") for name in names) and (reason := postgres_unavailable()):
        why.update({name: reason for name in names if name.startswith("postgres")})
    if "pandas" in names and importlib.util.find_spec("pandas") is None:
        why["pandas"] = "pandas is not installed in this interpreter"
    if "spark" in names and (reason := spark_unavailable()):
        why["spark"] = reason
    if "airbyte" in names:
        args.airbyte_python, reason = airbyte_python(create=not args.tiny)
        if reason:
            why["airbyte"] = reason
    return why


def command_for(name: str, dataset: Dataset, data_dir: Path, args: argparse.Namespace) -> list[str]:
    day = f"{DAY:%Y-%m-%d}"
    if name == "gzip":
        return ["sh", "-c", 'gzip -dc "$@" > /dev/null', "sh", *map(str, dataset.members)]
    if name == "pandas":
        return [sys.executable, str(HERE / "peers/pandas_script.py"), dataset.url, API_KEY, SECRET_KEY,
                f"{DAY:%Y%m%dT%H}", f"{LAST:%Y%m%dT%H}", f"duckdb:{data_dir / 'events.duckdb'}"]  # fmt: skip
    if name == "airbyte":
        return [str(args.airbyte_python), str(HERE / "peers/airbyte_source.py"), dataset.url, API_KEY, SECRET_KEY, day]
    if name == "spark":
        return [sys.executable, str(HERE / "spark_read.py"), dataset.url, API_KEY, SECRET_KEY, day,
                str(data_dir / "events")]
    dest = {
        "duckdb": f"duckdb:{data_dir / 'events.duckdb'}",
        "parquet": f"parquet:{data_dir / 'events'}",
        "iceberg": f"iceberg:{data_dir / 'warehouse'}",
        "delta": f"delta:{data_dir / 'events'}",
        "postgres": PG_URL,
    }[name.removesuffix("-base")]
    command = [
        str(ROOT / ".venv/bin/amplitude-export"), "run", "--base-url", dataset.url, "--api-key", API_KEY,
        "--secret-key", SECRET_KEY, "--start", day, "--end", day, "--dest", dest, "--data-dir", str(data_dir),
        "--log-dir", str(data_dir / "logs"), "--no-progress", "--lag-hours", "0",
    ]  # fmt: skip
    if name.startswith("postgres"):
        command += ["--schema", data_dir.name.replace("-", "_")]
    return command


_SPARK_PHASES = re.compile(r"spark phases: session ([\d.]+) s, job ([\d.]+) s")
_TOOL_COUNTS = re.compile(r"events loaded: ([\d,]+); duplicates dropped: ([\d,]+)(?:; lines rejected: ([\d,]+))?")
# Reads the archive as the tool's runs do and prints the reader's line counts: all, and those the compiled parser
# gave to the msgspec path ("-" while the reader does not count them).
_PROBE = """
import sys
from datetime import datetime, timedelta
from pathlib import Path
from amplitude_export import reader
from amplitude_export.windows import Window
try:
    from amplitude_export.parse import FAST_PARSER
except ImportError:  # a baseline from before the parse module
    from amplitude_export.reader import FAST_PARSER
day = datetime.fromisoformat(sys.argv[2])
probe = reader.WindowReader(Path(sys.argv[1]), Window(day, day + timedelta(hours=23)), run_id="probe", rejects_dir=None)
for _ in probe.batches():
    pass
slow = probe.lines_total if FAST_PARSER is None else getattr(probe, "slow_lines", None)
print(probe.lines_total, "-" if slow is None else slow)
"""


def lines_handled(name: str, result: Measured) -> int:
    """How many lines the candidate says it took (loaded, dropped as duplicates or rejected)."""
    if name in TOOL:
        match = _TOOL_COUNTS.search(result.output)
        if not match:
            raise SystemExit(f"{name}: no 'events loaded' in the run's output:\n{result.output[-2000:]}")
        return sum(int(group.replace(",", "")) for group in match.groups() if group)
    return int(result.output.strip().splitlines()[-1])


def compiled_share(archive: Path) -> float | None:
    """The share of the archive's lines the reader's compiled parser takes, or None if the reader cannot say."""
    probe = subprocess.run([sys.executable, "-c", _PROBE, str(archive), DAY.isoformat()],
                           capture_output=True, text=True, check=True)  # fmt: skip
    total, slow = probe.stdout.split()
    return None if slow == "-" or not int(total) else 1 - int(slow) / int(total)


@dataclass
class Run:
    result: Measured
    lines: int


def run_once(name: str, dataset: Dataset, work: Path, args: argparse.Namespace) -> Run:
    data_dir = work / f"{name}-{dataset.name}-{os.getpid()}"
    data_dir.mkdir()
    if args.landed and name in TOOL and dataset.archive:
        (data_dir / "raw").mkdir()
        shutil.copyfile(dataset.archive, data_dir / "raw" / dataset.archive.name)
    env = None
    if name.endswith("-base"):
        env = {**os.environ, "PYTHONPATH": str(args.baseline_src.resolve())}
    schema = data_dir.name.replace("-", "_")
    try:
        result = measure(command_for(name, dataset, data_dir, args), env)
        if result.returncode:
            raise SystemExit(f"{name} on {dataset.name} failed ({result.returncode}):\n{result.output[-3000:]}")
        return Run(result, dataset.lines if name == "gzip" else lines_handled(name, result))
    finally:
        if name.startswith("postgres"):
            drop_schema(schema)
        shutil.rmtree(data_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- report


def machine(airbyte: Path | None) -> str:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    import duckdb
    import pyarrow

    from amplitude_export import __version__

    versions = [f"amplitude-export {__version__}", f"Python {platform.python_version()}",
                f"duckdb {duckdb.__version__}", f"pyarrow {pyarrow.__version__}"]  # fmt: skip
    if importlib.util.find_spec("pandas"):
        import pandas

        versions.append(f"pandas {pandas.__version__}")
    if airbyte:
        # the connector pins few of its dependencies: what pip resolved the day its virtualenv was made matters
        probe = ("from importlib.metadata import version as v\n"
                 "print(', '.join(f'{n} {v(n)}' for n in ('airbyte-cdk', 'pydantic', 'pendulum', 'requests')))")
        found = subprocess.run([str(airbyte), "-c", probe], capture_output=True, text=True)
        extra = f" ({found.stdout.strip()})" if found.returncode == 0 else ""
        versions.append(AIRBYTE.replace("==", " ") + extra)
    gzip_version = subprocess.run(["gzip", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return (
        f"Machine: {os.cpu_count()} cores ({model}), {mem_kb / 2**20:.1f} GiB RAM, load average at start "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}. Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. "
        f"Versions: {', '.join(versions)}, {gzip_version}."
    )


def _median(runs: list[Run], value: str) -> float:
    return statistics.median(getattr(run.result, value) for run in runs)


def table(
    datasets: list[Dataset], names: list[str], results: dict[tuple[str, str], list[Run]], why: dict[str, str]
) -> str:
    rows = [
        "| dataset | candidate | events/s | × `gzip -dc` | wall s | CPU s | CPU µs/event | peak RSS | peak PSS "
        "| compiled path |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dataset in datasets:
        if dataset.unavailable:
            rows.append(f"| {dataset.name} | – | unavailable: {dataset.unavailable} | | | | | | | |")
            continue
        floor = results.get((dataset.name, "gzip"))
        floor_rate = dataset.lines / _median(floor, "wall") if floor else None
        for name in names:
            if name in why:
                rows.append(f"| {dataset.name} | {name} | unavailable: {why[name]} | | | | | | | |")
                continue
            runs = results.get((dataset.name, name))
            if not runs:
                rows.append(f"| {dataset.name} | {name} | not run (stopped) | | | | | | | |")
                continue
            wall, cpu = _median(runs, "wall"), _median(runs, "cpu")
            rate = dataset.lines / wall
            compiled = "" if name not in TOOL else "n/a" if dataset.compiled is None else f"{dataset.compiled:.2%}"
            # spark counts the rows it wrote: the day's repeated uuids are not among them
            miss = {run.lines for run in runs} - {dataset.lines} if name != "spark" else set()
            note = f" (took {miss.pop():,} of {dataset.lines:,} lines)" if miss else ""
            rows.append(
                f"| {dataset.name} | {name}{note} | {rate:,.0f} | {_ratio(rate / floor_rate if floor_rate else 0)} | "
                f"{wall:.2f} | {cpu:.2f} | {cpu / dataset.lines * 1e6:.1f} | "
                f"{max(r.result.rss for r in runs) / 2**20:,.0f} MiB | "
                f"{max(r.result.pss for r in runs) / 2**20:,.0f} MiB | {compiled} |"
            )
    return "\n".join(rows)


def _ratio(value: float) -> str:
    """Two decimals, or two significant digits below 0.01 (Spark's start-up on the tiny day)."""
    return f"{value:.2f}" if value >= 0.01 or value == 0 else f"{value:.2g}"


def ratios(datasets: list[Dataset], results: dict[tuple[str, str], list[Run]]) -> str:
    """The targets' ratios from the medians above: events/s of one candidate over another's, and for the peers
    also their CPU seconds over the tool's (steadier on a busy machine; PostgreSQL's server is not in its tree)."""

    def median(dataset: str, name: str, value: str) -> float | None:
        runs = results.get((dataset, name))
        return _median(runs, value) if runs else None

    out = []
    for dataset in (d.name for d in datasets if not d.unavailable):
        parts = []
        for peer in ("pandas", "airbyte"):
            tool, other = median(dataset, "duckdb", "wall"), median(dataset, peer, "wall")
            tool_cpu, other_cpu = median(dataset, "duckdb", "cpu"), median(dataset, peer, "cpu")
            if tool and other and tool_cpu and other_cpu:
                parts.append(f"duckdb ÷ {peer} {other / tool:.1f}× (CPU {other_cpu / tool_cpu:.1f}×)")
        postgres, duckdb = median(dataset, "postgres", "wall"), median(dataset, "duckdb", "wall")
        if postgres and duckdb:
            parts.append(f"postgres ÷ duckdb {duckdb / postgres:.2f}×")
        if (spark := median(dataset, "spark", "wall")) and duckdb:
            parts.append(f"spark ÷ duckdb {duckdb / spark:.2f}×")
            phases = [_SPARK_PHASES.search(run.result.output) for run in results[dataset, "spark"]]
            if all(phases):
                session = statistics.median(float(m.group(1)) for m in phases if m)
                job = statistics.median(float(m.group(2)) for m in phases if m)
                parquet = median(dataset, "parquet", "wall")
                cli = f" (the CLI into Parquet, the same download and parse: {parquet:.1f} s)" if parquet else ""
                rows = results[dataset, "spark"][0].lines
                parts.append(f"spark's time: JVM and session {session:.1f} s, the read into Parquet {job:.1f} s{cli}, "
                             f"{rows:,} rows (the day's repeats dropped)")
        if parts:
            out.append(f"- {dataset}: {', '.join(parts)}")
    varied, plain = median("synthetic-2pct", "duckdb", "wall"), median("synthetic", "duckdb", "wall")
    if varied and plain:
        out.append(f"- duckdb on synthetic-2pct ÷ duckdb on synthetic: {plain / varied:.2f}×")
    return "\n".join(out)


def targets(datasets: list[Dataset], results: dict[tuple[str, str], list[Run]]) -> str:
    """Where this run stands against the speed issue's targets (docs/BENCHMARKS.md, "Targets"): a table written
    with the run, so the verdicts are always those of the figures beside them."""
    served = [d.name for d in datasets if not d.unavailable]

    def over(tool: str, other: str, value: str = "wall", only: str | None = None) -> list[float]:
        """`other`'s median over `tool`'s, per dataset: how many times faster (or leaner) the tool is."""
        out = []
        for dataset in (name for name in served if only in (None, name)):
            mine, theirs = results.get((dataset, tool)), results.get((dataset, other))
            if mine and theirs:
                out.append(_median(theirs, value) / _median(mine, value))
        return out

    def span(values: list[float], unit: str = "×", digits: int = 2) -> str:
        low, high = (f"{value:.{digits}f}" for value in (min(values), max(values)))
        return f"{low}{unit}" if low == high else f"{low}–{high}{unit}"

    rows = ["| target | measured | |", "|---|---|---|"]

    def row(target: str, values: list[float], met: Callable[[list[float]], bool], shown: Callable[[], str]) -> None:
        verdict = ("met" if met(values) else "not met") if values else "not measured"
        rows.append(f"| {target} | {shown() if values else '–'} | {verdict} |")

    floor, real = over("duckdb", "gzip", only="synthetic-2pct"), over("duckdb", "gzip", only="real-lines")
    row("DuckDB ≥ 1.0× `gzip -dc` on `synthetic-2pct`", floor, lambda v: v[0] >= 1.0,
        lambda: span(floor) + (f" ({span(real)} on `real-lines`)" if real else ""))
    varied, plain = results.get(("synthetic-2pct", "duckdb")), results.get(("synthetic", "duckdb"))
    steady = [_median(plain, "wall") / _median(varied, "wall")] if varied and plain else []
    row("varied day ≥ 0.95× the 0 % day", steady, lambda v: v[0] >= 0.95, lambda: span(steady))
    for peer, goal, label in (("pandas", 10, "the pandas script"), ("airbyte", 25, "Airbyte's connector")):
        wall, cpu = over("duckdb", peer), over("duckdb", peer, "cpu")
        row(f"≥ {goal}× {label}", wall, lambda v, goal=goal: min(v) >= goal,
            lambda wall=wall, cpu=cpu: f"{span(wall, digits=1)} (CPU {span(cpu, digits=1)})")
    postgres = over("postgres", "duckdb")
    row("PostgreSQL ≥ half of DuckDB", postgres, lambda v: min(v) >= 0.5, lambda: span(postgres))
    peaks = [max(run.result.rss for run in runs) / 2**20 for (_, name), runs in results.items() if name == "duckdb"]
    row("DuckDB's peak RSS < 1 GB for the day", peaks, lambda v: max(v) * 2**20 < 1e9, lambda: span(peaks, " MiB", 0))
    compiled = [d.compiled for d in datasets if d.name == "synthetic-2pct" and d.compiled is not None]
    row("compiled path ≥ 99.9 % of the varied day", compiled, lambda v: v[0] >= 0.999, lambda: f"{compiled[0]:.2%}")
    return "\n".join(rows)


def write_docs(path: Path, text: str) -> None:
    """Replace the generated section of `path` (between the markers), or append one."""
    begin, end = "<!-- run_benchmark:begin -->", "<!-- run_benchmark:end -->"
    block = f"{begin}\n{text}\n{end}"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in current and end in current:
        current = current[: current.index(begin)] + block + current[current.index(end) + len(end) :]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(current)


# ---------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--only", default=",".join(CANDIDATES), help="candidates, comma separated")
    parser.add_argument("--events-per-day", type=int, default=504_000, help="synthetic datasets' events")
    parser.add_argument("--corpus-lines", type=int, default=500_000, help="real-lines dataset's lines")
    parser.add_argument("--members-per-hour", type=int, default=3)
    parser.add_argument("--gzip-level", type=int, default=6, help="the members' gzip level")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/amplitude_export_run_benchmark"))
    parser.add_argument("--baseline-src", type=Path,
                        help="also run duckdb and postgres with PYTHONPATH=this src dir (an older checkout), as *-base")
    parser.add_argument("--landed", action="store_true", help="the tool's archive is in its data dir beforehand")
    parser.add_argument("--tiny", action="store_true",
                        help="480 events a dataset, 1 round, a fresh cache; the Airbyte virtualenv is not made")
    parser.add_argument("--write-docs", action="store_true", help="write the table into --docs")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variation", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--members-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.events_per_day = args.corpus_lines = 480
        args.rounds, args.members_per_hour, args.gzip_level = 1, 1, 1
        args.cache_dir = Path(tempfile.mkdtemp(prefix="amplitude-bench-tiny-"))
    args.cache_dir = args.cache_dir.resolve()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    return args


def _server_processes(postmaster: int) -> list[int]:
    """The PostgreSQL server's processes: its postmaster and the postmaster's children."""
    pids = [postmaster]
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def server_at_our_priority(names: list[str]) -> tuple[str, int | None, dict[int, int]]:
    """Give the PostgreSQL server at PG_URL, when it runs on this machine, this benchmark's scheduling priority
    when that is higher.

    A run into PostgreSQL is the client and the server, but only the client inherits a `nice -n -10`: the server,
    left at its own priority, would lose its core to the client's threads. New backends inherit the postmaster's.
    Returns a line for the table's header, the postmaster and the priorities to put back.
    """
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    if not any(name.startswith("postgres") for name in names) or ours >= 0:
        return "", None, {}
    import psycopg

    with psycopg.connect(PG_URL, connect_timeout=5) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        try:
            postmaster = int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:  # the server runs elsewhere
            return "", None, {}
    old: dict[int, int] = {}
    for pid in _server_processes(postmaster):
        try:
            old[pid] = os.getpriority(os.PRIO_PROCESS, pid)
            os.setpriority(os.PRIO_PROCESS, pid, ours)
        except OSError:
            old.pop(pid, None)
    if postmaster not in old:
        restore_priorities(None, old)
        return "", None, {}
    return f"The PostgreSQL server's processes ran at the benchmark's priority (nice {ours}).", postmaster, old


def restore_priorities(postmaster: int | None, old: dict[int, int]) -> None:
    """Put back the priorities `server_at_our_priority` changed; backends started since get the postmaster's."""
    pids = set(old) | set(_server_processes(postmaster) if postmaster else ())
    for pid in pids:
        try:
            os.setpriority(os.PRIO_PROCESS, pid, old.get(pid, old.get(postmaster or -1, 0)))
        except OSError:
            continue


def main() -> None:
    args = parse_args()
    if args.serve:
        serve(args)
        return
    names = [name for name in args.only.split(",") if name]
    for base in ("duckdb", "postgres") if args.baseline_src else ():
        if base in names:
            names.insert(names.index(base) + 1, f"{base}-base")
    datasets = [Dataset(name, DATASETS[name]) for name in args.datasets.split(",") if name]
    servers: list[subprocess.Popen[str]] = []
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.cache_dir))
    postmaster, priorities = None, {}
    try:
        why = unavailable(args, names)
        for dataset in datasets:
            if dataset.variation and not variation_supported():
                dataset.unavailable = "the fake server has no `variation` option yet"
                continue
            if dataset.variation is None:
                dataset.corpus = build_corpus(args)
            servers.append(start_server(dataset, args))
        print("starting the fake servers (the first start builds the members: minutes for a full day)...", flush=True)
        served = [d for d in datasets if not d.unavailable]
        for dataset, server in zip(served, servers, strict=True):
            dataset.url = server.stdout.readline().strip() if server.stdout else ""
            if not dataset.url:
                raise SystemExit(f"the fake server for {dataset.name} did not start")
            land(dataset, args, work)
        header = [machine(getattr(args, "airbyte_python", None))]
        for dataset in served:
            assert dataset.archive is not None
            header.append(
                f"Dataset {dataset.name}: {dataset.lines:,} lines in {len(dataset.members)} members, "
                f"{dataset.archive.stat().st_size / 1e6:.1f} MB zipped (gzip level {args.gzip_level}), "
                f"{dataset.raw_bytes / 1e6:,.0f} MB of NDJSON "
                f"({dataset.raw_bytes / max(dataset.lines, 1):,.0f} B/line)."
            )
        mode = "archive in the tool's data dir beforehand" if args.landed else "download from the fake server included"
        header.append(f"Runs: {mode}; {args.rounds} round(s), interleaved; medians, peaks are maxima.")
        server_line, postmaster, priorities = server_at_our_priority([name for name in names if name not in why])
        if server_line:
            header.append(server_line)
        if args.baseline_src:
            header.append(f"`*-base`: the same command with the package imported from {args.baseline_src}.")
        print("\n".join(header), flush=True)

        results: dict[tuple[str, str], list[Run]] = {}
        try:
            for round_ in range(args.rounds):
                for dataset in served:
                    for name in (name for name in names if name not in why):
                        run = run_once(name, dataset, work, args)
                        results.setdefault((dataset.name, name), []).append(run)
                        r = run.result
                        print(f"round {round_ + 1} {dataset.name:14s} {name:11s} {r.wall:7.2f} s "
                              f"{dataset.lines / r.wall:9,.0f} ev/s  cpu {r.cpu:7.2f} s  "
                              f"peak {r.rss / 2**20:6,.0f} MiB RSS {r.pss / 2**20:6,.0f} MiB PSS",
                              flush=True)  # fmt: skip
        except KeyboardInterrupt:  # a long run stopped by hand still reports the runs it finished
            header.append(f"Stopped by hand in round {round_ + 1}: medians of the runs each candidate finished.")
        text = "\n\n".join(["\n".join(header), table(datasets, names, results, why), ratios(datasets, results),
                            targets(datasets, results)])
        print("\n" + text)
        if args.write_docs:
            write_docs(args.docs, text)
            print(f"\nwritten to {args.docs}")
    finally:
        restore_priorities(postmaster, priorities)
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
        if args.tiny:
            shutil.rmtree(args.cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

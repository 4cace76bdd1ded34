"""What one window costs PostgreSQL's server, with `events`' JSON columns typed `json` and typed `jsonb`.

    .venv/bin/python benchmarks/postgres_server.py --rounds 3      # the table in docs/POSTGRES.md ("Speed")
    .venv/bin/python benchmarks/postgres_server.py --tiny          # 2,000 events, 1 round: the test runs this

The window's batches are made once, before any timing: `amplitude_export.synthetic` events (~1.7 KB of JSON a
line, none varied) parsed by the reader's parser (`parse.parse_chunk`). Each round writes them with
`PostgresSink.write_window` into a fresh schema of each kind in turn (interleaved), then writes the next window
(the next hours' events, other uuids) into the table that holds the first (what a table's growth costs), then
reloads the first window (its rows deleted and written again). `--drop-uuid-index` drops `events`' UNIQUE
(uuid) before the writes, to see that key's share (a diagnosis: without it a stored uuid is not caught).
Measured per write: the server backend's CPU (from /proc, so the server must run on this machine), the client's
CPU, and the WAL the write produced (`pg_current_wal_lsn`), each per event; medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pyarrow as pa

from amplitude_export import parse, synthetic
from amplitude_export.archive import ArchiveMember
from amplitude_export.ledger import HourRecord
from amplitude_export.schema import JSON_COLUMNS
from amplitude_export.sinks.postgres import PostgresSink
from amplitude_export.windows import Window

URL = os.environ.get("AMP_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
START = datetime(2025, 7, 1, tzinfo=UTC)
TICKS = os.sysconf("SC_CLK_TCK")


class WindowRead:
    """The reader's side of a window, already parsed: what `write_window` takes."""

    def __init__(self, batches: list[pa.RecordBatch], records: list[HourRecord]) -> None:
        self.batches = iter(batches)
        self._records = records

    def hour_records(self) -> list[HourRecord]:
        return self._records


def window_of(events: int, after: int = 0) -> tuple[Window, list[pa.RecordBatch], list[HourRecord]]:
    """`events` synthetic events over up to 24 upload hours from `after` hours past START, parsed as the reader
    parses them."""
    hours = max(1, min(24, events // 1000))
    batches, records = [], []
    for index in range(after, after + hours):
        at = START + timedelta(hours=index)
        hour = synthetic.generate_hour(at, project_id=7, seed=index, events=events // hours)
        lines = [json.dumps(event, separators=(",", ":")).encode() for event in hour]
        member = ArchiveMember(f"{at:%Y%m%dT%H}#0.json.gz", at, index, 0, 0)
        context = parse.Context("bench.zip", "bench", "bench", START, 4096, False)
        part, _ = parse.parse_chunk(lines, 1, member, index, context)
        assert part.batch is not None and not part.rejects
        batches += [part.batch.slice(start, 4096) for start in range(0, part.batch.num_rows, 4096)]
        records.append(HourRecord(hour=at, status="loaded", lines_read=len(lines)))
    return Window(START + timedelta(hours=after), START + timedelta(hours=after + hours - 1)), batches, records


def backend_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_schema(schema: str, kind: str) -> None:
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    PostgresSink(URL, schema=schema).close()  # the tables this version makes
    if kind == "jsonb":
        with psycopg.connect(URL, autocommit=True) as conn:
            for name in JSON_COLUMNS:
                conn.execute(f'ALTER TABLE "{schema}".events ALTER COLUMN "{name}" TYPE jsonb USING "{name}"::jsonb')


def write(schema: str, window: Window, batches: list[pa.RecordBatch], records: list[HourRecord]) -> dict[str, float]:
    with PostgresSink(URL, schema=schema) as sink:
        pid = sink.conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        lsn = sink.conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
        server, client, wall = backend_cpu(pid), client_cpu(), time.perf_counter()
        sink.write_window("bench", window, WindowRead(batches, records))  # type: ignore[arg-type]
        wall, server, client = time.perf_counter() - wall, backend_cpu(pid) - server, client_cpu() - client
        wal = sink.conn.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", [lsn]).fetchone()[0]  # type: ignore[index]
    return {"server": server, "client": client, "wal": float(wal), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=192_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="2,000 events, 1 round")
    parser.add_argument("--drop-uuid-index", action="store_true", help="write without the UNIQUE (uuid) index")
    args = parser.parse_args()
    if args.tiny:
        args.events, args.rounds = 2_000, 1
    window, batches, records = window_of(args.events)
    following = window_of(args.events, after=(window.end - window.start) // timedelta(hours=1) + 1)
    events = sum(batch.num_rows for batch in batches)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for kind in ("json", "jsonb"):
            schema = f"bench_server_{kind}_{os.getpid()}"
            make_schema(schema, kind)
            if args.drop_uuid_index:
                with psycopg.connect(URL, autocommit=True) as conn:
                    conn.execute(f'ALTER TABLE "{schema}".events DROP CONSTRAINT events_uuid_key')
            try:
                for load in ("first load", "next window", "reload"):
                    this = following if load == "next window" else (window, batches, records)
                    results.setdefault((kind, load), []).append(write(schema, *this))
            finally:
                with psycopg.connect(URL, autocommit=True) as conn:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    without = ", without the uuid index" if args.drop_uuid_index else ""
    print(f"{events:,} events in one window of {len(records)} hour(s), {args.rounds} round(s){without}, medians\n")
    print("| JSON columns | write | server CPU µs/event | client CPU µs/event | WAL bytes/event | wall s |")
    print("|---|---|---:|---:|---:|---:|")
    for (kind, load), runs in results.items():
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(f"| `{kind}` | {load} | {1e6 * median['server'] / events:.1f} | {1e6 * median['client'] / events:.1f}"
              f" | {median['wal'] / events:,.0f} | {median['wall']:.2f} |")  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""A day of export lines grown from the real ones in tests/data/real-export-events.jsonl, for the benchmark.

    .venv/bin/python benchmarks/corpus.py OUT.jsonl --lines 500000 --day 2025-07-01
    .venv/bin/python benchmarks/corpus.py OUT.jsonl --tiny    # 700 lines: the test runs this

Each output line is one of the seven real lines (in turn, so the key sets and nesting stay theirs, including
the trimmed line without nine keys), mutated as a real project's day differs from one event to the next: a new
uuid (the trimmed line gets one too: export lines always have it) and `$insert_id`; upload times spread over
the day in order (the fake server places a line in the hour of its `server_upload_time`), the other timestamps
consistent with it (some events late by days, a few timestamps without the fraction); user and device ids from
a pool; and property values that vary in type the way real exports do: the same key a number in one event and
a string in another, integral floats, booleans, arrays, absent keys, non-ASCII text.
Deterministic for (lines, day, seed).
"""

from __future__ import annotations

import argparse
import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

REAL_LINES = Path(__file__).resolve().parent.parent / "tests" / "data" / "real-export-events.jsonl"
_TIME = "%Y-%m-%d %H:%M:%S.%f"
_PLACES = [
    ("Puchong Batu Dua Belas", "Malaysia", "Selangor"), ("São Paulo", "Brazil", "São Paulo"),
    ("Zürich", "Switzerland", "Zurich"), ("東京", "Japan", "Tokyo"), ("Kraków", "Poland", "Lesser Poland"),
    ("Austin", "United States", "Texas"), (None, None, None),
]  # fmt: skip
_SCREENS = ["Property Drops", "Home", "Portfolio", "Ünïcödé ✓", "Settings"]


def _uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def _stamp(moment: datetime, rng: random.Random) -> str:
    text = moment.strftime(_TIME)
    return text[:-7] if rng.random() < 0.01 else text  # Amplitude occasionally drops the fraction


def _vary(value: object, rng: random.Random) -> object:
    """A property value of the same meaning, in one of the types real exports carry for it."""
    draw = rng.random()
    if isinstance(value, bool) or value is None:
        return rng.random() < 0.5 if draw < 0.9 else ("true" if draw < 0.95 else None)
    if isinstance(value, int | float):
        number = round(rng.uniform(0, 2 * abs(value) + 10), rng.choice((0, 0, 2)))
        if draw < 0.15:
            return str(int(number)) if number == int(number) else str(number)  # a number sent as a string
        if draw < 0.25:
            return float(int(number))  # an integral float
        return int(number) if number == int(number) else number
    if isinstance(value, str):
        if value.isdigit():
            return int(value) if draw < 0.5 else str(rng.randint(0, 99))
        return rng.choice(_SCREENS) if draw < 0.2 else value
    if isinstance(value, list):
        return rng.sample(value, rng.randint(0, len(value)))
    return value


def _properties(props: dict, rng: random.Random) -> dict:
    varied = {key: _vary(value, rng) for key, value in props.items() if rng.random() > 0.05}
    if rng.random() < 0.1:
        varied[rng.choice(["Current Screen", "ab_test", "Position in List"])] = _vary(rng.choice(["x", 3, 1.5]), rng)
    return varied


def mutate(template: dict, upload: datetime, rng: random.Random, users: list[tuple[str, str]]) -> dict:
    event = dict(template)
    user = rng.randrange(len(users))
    # every export line has a uuid: the trimmed real line lost its own when it was published
    event["uuid"] = str(_uuid(rng))
    if "$insert_id" in event:
        event["$insert_id"] = str(_uuid(rng)).upper()
    late = timedelta(seconds=rng.expovariate(1 / 30)) if rng.random() < 0.95 else timedelta(days=rng.randint(1, 9))
    received = upload - timedelta(milliseconds=rng.randint(1, 9))
    event_time = received - late
    event["server_upload_time"] = _stamp(upload, rng)
    event["server_received_time"] = _stamp(received, rng)
    event["client_upload_time"] = _stamp(received, rng)
    event["processed_time"] = _stamp(upload + timedelta(milliseconds=rng.randint(100, 2000)), rng)
    event["event_time"] = event["client_event_time"] = _stamp(event_time, rng)
    if event.get("user_id") is not None:
        event["user_id"] = users[user][0]
    event["device_id"] = users[user][1]
    event["amplitude_id"] = 1_200_000_000_000 + user
    if isinstance(event.get("session_id"), int) and event["session_id"] > 0:
        event["session_id"] = int(event_time.timestamp() * 1000) - rng.randint(0, 600_000)
    if isinstance(event.get("event_id"), int):
        event["event_id"] = rng.randint(1, 10**9)
    if "city" in event and event.get("country") is not None:
        event["city"], event["country"], event["region"] = rng.choice(_PLACES)
    if event.get("ip_address") is not None:
        event["ip_address"] = f"203.0.113.{rng.randint(1, 254)}"
    event["event_properties"] = _properties(event.get("event_properties") or {}, rng)
    if rng.random() < 0.3:
        event["user_properties"] = _properties({"plan": "pro", "logins": 3, "beta": True}, rng)
    return event


def build(path: Path, lines: int, day: datetime, seed: int = 7, people: int = 20_000) -> Path:
    """Write the corpus to `path` (once: an existing file is kept) and return it."""
    if path.exists():
        return path
    templates = [json.loads(line) for line in REAL_LINES.read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    users = [(str(_uuid(rng)), str(_uuid(rng)).upper()) for _ in range(people)]
    step = 86_400 / lines
    partial = path.with_suffix(".tmp")
    with partial.open("w", encoding="utf-8") as out:
        for n in range(lines):
            upload = day + timedelta(seconds=n * step + rng.random() * step)
            event = mutate(templates[n % len(templates)], upload, rng, users)
            out.write(json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n")
    partial.rename(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--lines", type=int, default=500_000)
    parser.add_argument("--day", default="2025-07-01")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--tiny", action="store_true", help="700 lines (each real line a hundred times)")
    args = parser.parse_args()
    if args.tiny:
        args.lines = 700
    day = datetime.strptime(args.day, "%Y-%m-%d").replace(tzinfo=UTC)
    print(build(args.out, args.lines, day, args.seed))


if __name__ == "__main__":
    main()

"""PII controls (--exclude-columns, --hash-columns): the Arrow transform against Python's own HMAC and JSON, the
rejects' redaction, and, end to end through the CLI against the fake server, that no original value reaches a
destination, a rejects file, a log or the report, and that hashes are stable across runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from conftest import API_KEY, POSTGRES_URL, SECRET_KEY
from sink_helpers import batch, event, hour

from amplitude_export.errors import UsageError
from amplitude_export.fake_server import FakeExportServer
from amplitude_export.privacy import HASH_KEY_ENV, Privacy, hash_text, parse_targets
from amplitude_export.report import write_report
from amplitude_export.sinks import open_sink

KEY = b"a test key that is long enough!!"
LONG_KEY = bytes(range(100))  # longer than SHA-256's block: HMAC hashes it first
DAY = datetime(2024, 3, 1, tzinfo=UTC)


def privacy(exclude: str = "", hashed: str = "", key: bytes = KEY, deleted: tuple[int, ...] = ()) -> Privacy:
    return Privacy(exclude=parse_targets("--exclude-columns", exclude), hash=parse_targets("--hash-columns", hashed),
                   key=key, deleted=deleted)


# -- the transform ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [KEY, LONG_KEY, b"k"])
def test_hashed_text_is_pythons_hmac_sha256_and_nulls_stay_null(key: bytes) -> None:
    texts = ["alice", "", "é東京🎉", "x" * 5000, None, "user-1", "user-1"]
    rows = [event(f"u{n}", hour(0), n, user_id=text) for n, text in enumerate(texts, 1)]
    out, dropped = privacy(hashed="user_id,device_id", key=key).transform(batch(rows))
    assert dropped == 0
    assert out.column("user_id").to_pylist() == [None if t is None else hash_text(key, t) for t in texts]
    assert out.column("device_id").to_pylist() == [hash_text(key, r["device_id"]) for r in rows]
    assert out.column("uuid").to_pylist() == [r["uuid"] for r in rows]  # same rows, same order
    assert out.schema.equals(batch(rows).schema)


def test_json_keys_are_hashed_or_removed_keeping_every_other_value() -> None:
    props = [
        {"email": "a@example.com", "plan": "pro", "big": 12345678901234567890123, "price": 1.5},
        {"email": None, "plan": "free"},  # a JSON null stays null
        {"plan": "x", "addr": {"city": "Zürich", "zip": "8000"}},
        {"email": 42, "nested": {"email": "not this one"}},  # only the named path
        None,
    ]
    rows = [event(f"u{n}", hour(0), n, user_properties=None if p is None else json.dumps(p, ensure_ascii=False))
            for n, p in enumerate(props, 1)]
    out, _ = privacy(exclude="user_properties.addr.city", hashed="user_properties.email").transform(batch(rows))
    got = [None if text is None else json.loads(text) for text in out.column("user_properties").to_pylist()]
    assert got == [
        {"email": hash_text(KEY, "a@example.com"), "plan": "pro", "big": 12345678901234567890123, "price": 1.5},
        {"email": None, "plan": "free"},
        {"plan": "x", "addr": {"zip": "8000"}},
        {"email": hash_text(KEY, "42"), "nested": {"email": "not this one"}},
        None,
    ]


def test_a_column_also_covers_the_value_extra_kept_for_it() -> None:
    # the reader keeps a value that does not fit its column's type in `_extra`, under the export's key
    rows = [event("u1", hour(0), 1, user_id=None, ip_address=None,
                  _extra=json.dumps({"user_id": 12345, "ip_address": ["10.0.0.1"], "is_bot": False})),
            event("u2", hour(0), 2, _extra=json.dumps({"ip_address": "10.0.0.2"}))]
    out, _ = privacy(exclude="ip_address", hashed="user_id").transform(batch(rows))
    assert [None if t is None else json.loads(t) for t in out.column("_extra").to_pylist()] == [
        {"user_id": hash_text(KEY, "12345"), "is_bot": False}, None]  # nothing left: NULL, as the reader has it
    assert out.column("ip_address").null_count == 2


def test_deleted_users_rows_are_left_out_also_by_the_id_extra_kept() -> None:
    rows = [event(f"u{n}", hour(0), n) for n in range(1, 6)]
    rows[2].update(amplitude_id=None, _extra=json.dumps({"amplitude_id": str(rows[0]["amplitude_id"])}))
    rows[3].update(amplitude_id=None, _extra=json.dumps({"amplitude_id": "not a number"}))
    out, dropped = privacy(deleted=(rows[0]["amplitude_id"], rows[4]["amplitude_id"])).transform(batch(rows))
    assert dropped == 3 and out.column("uuid").to_pylist() == ["u2", "u4"]


@pytest.mark.parametrize(("exclude", "hashed", "message"), [
    ("ip_adress", "", "unknown column 'ip_adress' (did you mean ip_address?)"),
    ("uuid", "", "uuid cannot be left out or hashed"),
    ("", "_upload_hour", "_upload_hour cannot be left out or hashed"),
    ("user_id.email", "", "user_id is not a JSON column"),
    ("", "amplitude_id", "amplitude_id holds integer values, not text"),
    ("user_id", "user_id", "user_id: both in --exclude-columns and --hash-columns"),
    ("user_properties..x", "", "a key path is keys joined by dots"),
])
def test_bad_column_names_are_usage_errors(exclude: str, hashed: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        privacy(exclude, hashed)
    assert message in str(caught.value)


def test_the_key_comes_from_the_environment_and_is_never_shown(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=HASH_KEY_ENV):
        Privacy.from_options(None, "user_id", environ={}, env_file=None)
    (tmp_path / ".env").write_text(f"{HASH_KEY_ENV}=from-the-dotenv-file-0123456789\n")
    made = Privacy.from_options("ip_address", "user_id", environ={}, env_file=tmp_path / ".env")
    assert "from-the-dotenv" not in repr(made) + made.describe()
    assert made.transform(batch([event("u1", hour(0), 1)]))[0].column("user_id")[0].as_py() == hash_text(
        b"from-the-dotenv-file-0123456789", "user-1")


# -- rejects ---------------------------------------------------------------------------------------------------


def test_a_reject_is_redacted_withheld_or_dropped() -> None:
    controls = privacy(exclude="ip_address,_extra.secret", hashed="user_id,user_properties.email", deleted=(77,))
    line = {"user_id": "bob", "ip_address": "10.1.2.3", "user_properties": {"email": "b@x.org", "k": 1},
            "secret": "s", "other": 1}
    redacted = controls.reject({"member": "m", "line": 3, "error": "no string uuid", "text": json.dumps(line)})
    assert redacted is not None and json.loads(redacted["text"]) == {
        "user_id": hash_text(KEY, "bob"), "user_properties": {"email": hash_text(KEY, "b@x.org"), "k": 1},
        "other": 1}
    broken = controls.reject({"member": "m", "line": 4, "error": "invalid JSON", "text": '{"user_id": "bob", "ip'})
    assert broken is not None and broken["text"] is None and "withheld" in broken["withheld"]
    assert controls.reject({"member": "m", "line": 5, "error": "x", "text": '{"amplitude_id": 77, "u'}) is None
    untouched = {"member": "m", "line": 6, "error": "x", "text": "{nope"}
    assert privacy(deleted=(77,)).reject(untouched) == untouched  # deletions alone leave other rejects as they are


# -- end to end ------------------------------------------------------------------------------------------------

HASH_KEY = "the project's hash key, kept out of logs 1234"
BROKEN_USER, BROKEN_IP = "broken-line-user-7f3a", "198.51.100.77"
NO_UUID_USER, NO_UUID_IP = "no-uuid-user-2b9c", "198.51.100.78"
BROKEN_NAME, NO_UUID_NAME = "Broken Line Name 3c8a", "No Uuid Name 5d1e"  # under user_properties.name


@pytest.fixture(scope="module")
def lines_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """Two days of the fake's events, plus a line without a uuid (loaded: real exports have them), and a line that
    is not JSON and one that is not an object, which land in the rejects files; each with a user id and an IP."""
    with FakeExportServer(events_per_hour=15, data_start=DAY, data_end=DAY.replace(day=2, hour=23)) as twin:
        events = [e for h in range(48) for e in twin.hour_lines(DAY.replace(day=1 + h // 24, hour=h % 24))]
    path = tmp_path_factory.mktemp("lines") / "events.jsonl"
    extra = [
        json.dumps({"user_id": NO_UUID_USER, "ip_address": NO_UUID_IP, "event_type": "x",
                    "user_properties": {"name": NO_UUID_NAME}, "server_upload_time": "2024-03-01 05:10:00.000000"}),
        json.dumps({"user_id": BROKEN_USER, "ip_address": BROKEN_IP, "user_properties": {"name": BROKEN_NAME},
                    "server_upload_time": "2024-03-02 07:00:00.000000"})[:-1] + " BROKEN",
        json.dumps([{"user_id": BROKEN_USER, "ip_address": BROKEN_IP, "user_properties": {"name": BROKEN_NAME},
                     "server_upload_time": "2024-03-02 08:00:00.000000"}]),
    ]
    path.write_text("\n".join([json.dumps(e, ensure_ascii=False) for e in events] + extra) + "\n")
    return path, events


DESTINATIONS = ["duckdb", "parquet", "postgres", "iceberg", "delta"]


def dest_url(kind: str, tmp_path: Path, name: str, pg_schema: str) -> str:
    if kind == "postgres":
        return f"{POSTGRES_URL}?schema={pg_schema}_{name}"
    return {"duckdb": f"duckdb:{tmp_path / name}.duckdb", "parquet": f"parquet:{tmp_path / name}",
            "iceberg": f"iceberg:{tmp_path / name}", "delta": f"delta:{tmp_path / name / 'events'}"}[kind]


@pytest.fixture
def schemas(pg_schema: str) -> Iterator[str]:
    import psycopg

    yield pg_schema
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        for suffix in ("one",):
            conn.execute(f'DROP SCHEMA IF EXISTS "{pg_schema}_{suffix}" CASCADE')


def cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from amplitude_export.cli import main; main()", *args],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def environment(server: FakeExportServer, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
    return {**env, "AMP_API_KEY": API_KEY, "AMP_SECRET_KEY": SECRET_KEY, "AMP_BASE_URL": server.url, **extra}


def every_text(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(root.rglob("*")) if p.is_file())


def run_private(server: FakeExportServer, url: str, tmp_path: Path, name: str,
                hashed: str = "user_id") -> tuple[pa.Table, str]:
    """`run` two days into `url` hashing `hashed` and leaving out ip_address; the rows stored, and the text of
    everything else the run left behind: rejects, logs, its output, and the destination's report."""
    env = environment(server, **{HASH_KEY_ENV: HASH_KEY})
    done = cli(["run", "--start", "2024-03-01", "--end", "2024-03-02", "--dest", url, "--no-progress",
                "--hash-columns", hashed, "--exclude-columns", "ip_address",
                "--data-dir", f"data-{name}", "--log-dir", f"logs-{name}"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert not list((tmp_path / f"data-{name}" / "raw").glob("*.zip"))  # archives hold the originals
    sink = open_sink(url, read_only=True)
    try:
        table = sink.read_arrow()
    finally:
        sink.close()
    report = write_report(url, tmp_path / f"report-{name}.html")
    left = every_text(tmp_path / f"data-{name}" / "rejects") + every_text(tmp_path / f"logs-{name}")
    return table, left + report.read_text() + done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", DESTINATIONS)
def test_no_original_value_reaches_destination_rejects_logs_or_report(
    kind: str, tmp_path: Path, lines_file: tuple[Path, list[dict[str, Any]]], schemas: str
) -> None:
    path, events = lines_file
    originals = {e["user_id"] for e in events if e.get("user_id")} | {NO_UUID_USER, BROKEN_USER}
    addresses = {e["ip_address"] for e in events if e.get("ip_address")} | {NO_UUID_IP, BROKEN_IP}
    with FakeExportServer(lines_file=path) as server:
        table, left = run_private(server, dest_url(kind, tmp_path, "one", schemas), tmp_path, "one")
    everything = "\n".join(json.dumps(row, default=str) for row in table.to_pylist()) + left
    assert not {text for text in originals | addresses if text in everything}
    assert HASH_KEY not in everything
    assert table.column("ip_address").null_count == table.num_rows
    hashes: dict[str | None, set[str | None]] = {None: {hash_text(HASH_KEY.encode(), NO_UUID_USER)}}
    for e in events:  # a uuid's copies may carry different users
        hashes.setdefault(e["uuid"], set()).add(e["user_id"] and hash_text(HASH_KEY.encode(), e["user_id"]))
    assert all(row["user_id"] in hashes[row["uuid"]] for row in table.to_pylist())
    rejects = [json.loads(line) for p in (tmp_path / "data-one" / "rejects").glob("*.jsonl")
               for line in p.read_text().splitlines()]
    assert len(rejects) == 2 and all(r["text"] is None and r["withheld"] for r in rejects)


@pytest.mark.slow
def test_hashed_ids_are_the_same_in_two_runs(tmp_path: Path, lines_file: tuple[Path, list[dict[str, Any]]]) -> None:
    with FakeExportServer(lines_file=lines_file[0]) as server:
        runs = [run_private(server, f"duckdb:{tmp_path / name}.duckdb", tmp_path, name)[0] for name in ("a", "b")]
    first, second = ({row["uuid"]: row["user_id"] for row in table.to_pylist()} for table in runs)
    assert first == second and len(set(first.values())) > 10


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["duckdb", "iceberg"])
def test_a_key_inside_a_json_column_is_hashed_everywhere_and_alike_in_two_runs(
    kind: str, tmp_path: Path, lines_file: tuple[Path, list[dict[str, Any]]]
) -> None:
    path, events = lines_file
    served = [e for e in events if (e.get("user_properties") or {}).get("name")]
    names = {e["user_properties"]["name"] for e in served} | {NO_UUID_NAME, BROKEN_NAME}
    users = {e["user_id"] for e in events if e.get("user_id")} | {NO_UUID_USER, BROKEN_USER}
    # as written, and as JSON writes them with non-ASCII letters escaped
    needles = {text for value in names | users for text in (value, json.dumps(value)[1:-1])}
    key = HASH_KEY.encode()
    with FakeExportServer(lines_file=path) as server:
        runs = [run_private(server, dest_url(kind, tmp_path, name, ""), tmp_path, name,
                            hashed="user_id,user_properties.name") for name in ("one", "two")]
    expected: dict[str | None, list[dict[str, Any]]] = {None: [{"name": hash_text(key, NO_UUID_NAME)}]}
    for e in events:  # the name hashed, every other key as served; a uuid's copies may carry different users
        props = dict(e["user_properties"])
        if "name" in props:
            props["name"] = hash_text(key, props["name"])
        expected.setdefault(e["uuid"], []).append(props)
    for table, left in runs:
        rows = table.to_pylist()
        everything = "\n".join(json.dumps(row, default=str, ensure_ascii=False) for row in rows) + left
        assert not {text for text in needles if text in everything}
        properties = [(row["uuid"], json.loads(row["user_properties"])) for row in rows if row["user_properties"]]
        assert len(properties) > 500
        assert all(props in expected[uuid] for uuid, props in properties)
    first, second = ({row["uuid"]: (row["user_id"], row["user_properties"]) for row in table.to_pylist()}
                     for table, _ in runs)
    assert first == second


def test_keep_raw_with_pii_controls_warns_that_archives_hold_originals(
    tmp_path: Path, fake_server: FakeExportServer
) -> None:
    env = environment(fake_server, **{HASH_KEY_ENV: HASH_KEY})
    done = cli(["run", "--start", "2024-03-01", "--end", "2024-03-01", "--no-progress", "--keep-raw",
                "--hash-columns", "device_id"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "they hold the original values" in done.stderr and "they hold the original values" in done.stdout
    assert list((tmp_path / "data" / "raw").glob("*.zip"))


def test_a_short_hash_key_is_warned_of_once_on_the_terminal_and_in_the_log(
    tmp_path: Path, fake_server: FakeExportServer
) -> None:
    env = environment(fake_server, **{HASH_KEY_ENV: "short"})
    done = cli(["run", "--start", "2024-03-01", "--end", "2024-03-01", "--no-progress", "--hash-columns", "user_id",
                "--log-dir", str(tmp_path / "logs")], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("is shorter than 16 bytes") == 1, done.stderr
    assert every_text(tmp_path / "logs").count("is shorter than 16 bytes") == 1


@pytest.mark.parametrize(("args", "env_key", "needle"), [
    (["--hash-columns", "user_id"], None, HASH_KEY_ENV),
    (["--exclude-columns", "ip_adress"], None, "did you mean ip_address"),
    (["--hash-columns", "amplitude_id"], HASH_KEY, "only text columns"),
    (["--sync-deletions", "--exclude-columns", "amplitude_id"], None, "by amplitude_id"),
])
def test_bad_privacy_flags_are_one_line_and_exit_2_before_anything_is_made(
    tmp_path: Path, fake_server: FakeExportServer, args: list[str], env_key: str | None, needle: str
) -> None:
    env = environment(fake_server, **({HASH_KEY_ENV: env_key} if env_key else {}))
    done = cli(["run", "--start", "2024-03-01", "--end", "2024-03-01", *args], env, tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and needle in lines[0], done.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "logs").exists()


def test_load_takes_the_same_controls(tmp_path: Path, fake_server: FakeExportServer) -> None:
    env = environment(fake_server, **{HASH_KEY_ENV: HASH_KEY})
    assert cli(["extract", "--start", "2024-03-01", "--end", "2024-03-01"], env, tmp_path).returncode == 0
    done = cli(["load", "--exclude-columns", "ip_address,city", "--no-progress"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    sink = open_sink(f"duckdb:{tmp_path / 'data' / 'amplitude.duckdb'}", read_only=True)
    try:
        table: pa.Table = sink.read_arrow()
    finally:
        sink.close()
    assert table.num_rows and table.column("city").null_count == table.num_rows
    assert not list((tmp_path / "data" / "raw").glob("*.zip"))

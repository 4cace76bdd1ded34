"""Shared fixtures. Keep each small and documented; helpers for one module belong in its test file."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from s3 import LoopbackS3, loopback_s3

from amplitude_export.fake_server import FakeExportServer

API_KEY = "demo-key"
SECRET_KEY = "demo-secret"
DAY = datetime(2024, 3, 1, tzinfo=UTC)  # the fake server's default test data: 2024-03-01 00..23 UTC
# real Export API lines (a copy of shared/reference/real-export-events.jsonl), kept in the repository so a fresh
# clone passes wherever it sits
REAL_EVENTS = Path(__file__).resolve().parent / "data" / "real-export-events.jsonl"

# the JVMs the tests start (Spark's, also in the doc examples and the benchmark) live for seconds: JIT tiers and
# parallel GC threads only cost CPU there, and no test checks a JVM's speed
os.environ.setdefault("JDK_JAVA_OPTIONS", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")


# modules whose tests share costly module-scoped state (a Spark session; a doc page's earlier blocks, which a
# block on another worker would run again; loaded destinations): one worker runs each of them
ONE_WORKER_MODULES = ("tests/test_doc_examples.py", "tests/test_spark.py", "tests/test_report.py")


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist load` (the default of `-n`), except that each of ONE_WORKER_MODULES goes to one worker.

    xdist's own `loadgroup` cannot do it here: it renames node ids, which pytest 9 no longer lets it do."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModulesTogether(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in ONE_WORKER_MODULES else nodeid

    return ModulesTogether(config, log)


@pytest.fixture(scope="session")
def fake_members(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The member cache of every `fake_server` of a worker: a member's cache name holds everything it is built
    from (seed, hour, version, counts, deletions), so servers alike share it and build the day once."""
    return tmp_path_factory.mktemp("fake-members")


@pytest.fixture
def fake_server(fake_members: Path) -> Iterator[FakeExportServer]:
    """A fake Export API on loopback with one day of data (2024-03-01, 20 events an hour, one member each).

    Tests that need other options build their own: `with FakeExportServer(...) as srv:`.
    """
    with FakeExportServer(
        api_key=API_KEY,
        secret_key=SECRET_KEY,
        events_per_hour=20,
        data_start=DAY,
        data_end=DAY.replace(hour=23),
        cache_dir=fake_members,
    ) as server:
        yield server


POSTGRES_URL = os.environ.get("AMP_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def destination_url(kind: str, tmp_path: Path, pg_schema: str) -> str:
    """The URL of a new destination of `kind` (duckdb, parquet, postgres, iceberg, delta) in `tmp_path`, or in
    schema `pg_schema` for PostgreSQL."""
    return {"duckdb": f"duckdb:{tmp_path / 'amplitude.duckdb'}", "parquet": f"parquet:{tmp_path / 'lake'}",
            "postgres": f"{POSTGRES_URL}?schema={pg_schema}", "iceberg": f"iceberg:{tmp_path / 'warehouse'}",
            "delta": f"delta:{tmp_path / 'lake' / 'events'}"}[kind]


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema name on POSTGRES_URL, dropped afterwards. The server must be reachable: tests
    that use it fail, never skip, without it (CI must not pass without PostgreSQL)."""
    import psycopg

    name = f"amp_test_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def pg_role() -> Iterator[tuple[str, str]]:
    """A fresh LOGIN role `test_<hex>` with no privileges beyond PUBLIC's (no CREATE on the database), and the
    name of a schema `test_<hex>` (not created). Both, and anything the role owns, are dropped afterwards."""
    import psycopg

    if "postgres@" not in POSTGRES_URL:
        pytest.fail("AMP_TEST_POSTGRES_URL must name user postgres for privilege tests")
    token = uuid.uuid4().hex[:12]
    role, schema = f"test_role_{token}", f"test_{token}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
    yield role, schema
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        conn.execute(f'DROP OWNED BY "{role}"')
        conn.execute(f'DROP ROLE "{role}"')


def url_for(role: str) -> str:
    """POSTGRES_URL as `role` instead of postgres."""
    return POSTGRES_URL.replace("postgres@", f"{role}@", 1)


@pytest.fixture(scope="session")
def s3() -> Iterator[LoopbackS3]:
    """A real S3-compatible server (moto's server mode) on loopback for the session; see tests/s3.py."""
    with loopback_s3() as server:
        yield server


@pytest.fixture
def s3_bucket(s3: LoopbackS3) -> str:
    """A fresh, empty bucket on the loopback S3 server."""
    return s3.new_bucket()


@pytest.fixture(scope="session")
def s3_process() -> Iterator[LoopbackS3]:
    """The same server in a child process, for in-process clients that hold the GIL while they wait on it
    (delta-rs's file system handler); see tests/s3.py."""
    with loopback_s3(process=True) as server:
        yield server

"""A password in a destination URL, typed or percent-encoded inside an `iceberg:` URL's catalog, never reaches
the terminal, the run's log or the report."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import API_KEY, POSTGRES_URL, SECRET_KEY

from amplitude_export.fake_server import FakeExportServer

PASSWORD = "pw-never-shown-5d1f"  # the server trusts loopback, so any password connects


def with_password(url: str) -> str:
    scheme, _, rest = url.partition("://")
    user, _, host = rest.rpartition("@")
    return f"{scheme}://{user or 'postgres'}:{PASSWORD}@{host}"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMP_")}
    env.update(AMP_API_KEY=API_KEY, AMP_SECRET_KEY=SECRET_KEY)
    return subprocess.run([sys.executable, "-c", "from amplitude_export.cli import main; main()", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def everything_said(results: list[subprocess.CompletedProcess[str]], tmp_path: Path) -> str:
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".log", ".html", ".json")]
    return "".join(r.stdout + r.stderr for r in results) + "".join(p.read_text(errors="replace") for p in files)


def commands(dest: str, server: FakeExportServer, tmp_path: Path,
             *more: list[str]) -> list[subprocess.CompletedProcess[str]]:
    results = [cli("run", "--base-url", server.url, "--start", "2024-03-01", "--end", "2024-03-01", "--no-progress",
                   "--dest", dest, "--log-dir", str(tmp_path / "logs"), cwd=tmp_path)]
    assert results[0].returncode == 0, results[0].stderr
    for args in (["status"], ["verify"], ["report", "--out", str(tmp_path / "report.html")], *more):
        results.append(cli(*args, "--dest", dest, cwd=tmp_path))
        assert results[-1].returncode == 0, results[-1].stderr
    return results


def test_a_postgresql_password_is_never_shown(fake_server: FakeExportServer, tmp_path: Path, pg_schema: str) -> None:
    dest = f"{with_password(POSTGRES_URL)}?schema={pg_schema}"
    results = commands(dest, fake_server, tmp_path)
    said = everything_said(results, tmp_path)
    assert "report.html" in str(list(tmp_path.iterdir())) and pg_schema in said
    assert PASSWORD not in said


def test_a_percent_encoded_catalog_password_is_never_shown(fake_server: FakeExportServer, tmp_path: Path) -> None:
    pytest.importorskip("pyiceberg")
    namespace = f"amp_test_{uuid.uuid4().hex[:12]}"
    catalog = with_password(POSTGRES_URL) + "?application_name=amp-test"  # its own `?`: it must be encoded
    dest = f"iceberg:{tmp_path / 'wh'}?catalog={quote(catalog, safe='')}&namespace={namespace}"
    try:
        results = commands(dest, fake_server, tmp_path, ["maintain", "--older-than", "1d"])
        closed = dest.replace(quote("127.0.0.1:5432", safe=""), quote("127.0.0.1:9", safe=""))
        results.append(cli("status", "--dest", closed, cwd=tmp_path))  # an error that quotes the URL
        assert results[-1].returncode == 4 and results[-1].stderr.startswith("error: "), results[-1].stderr
        said = everything_said(results, tmp_path)
        assert "%3A%2A%2A%2A%40" in said or "***" in said
        assert PASSWORD not in said
    finally:
        from amplitude_export.sinks.iceberg import IcebergSink

        with IcebergSink(dest.removeprefix("iceberg:"), read_only=True) as sink:
            sink.catalog.drop_table((namespace, "events"))
            sink.catalog.drop_namespace(namespace)


@pytest.mark.parametrize("text", [
    "iceberg:/w?catalog=" + quote(f"postgresql://postgres:{PASSWORD}@127.0.0.1:9/test?application_name=x"),
    "iceberg:/w?catalog=" + quote(f"postgresql://postgres:{PASSWORD}@127.0.0.1:9/test?application_name=x", safe=""),
    f"error: cannot open iceberg:wh?catalog=postgresql://postgres:{PASSWORD}@h/db: refused",
    f"postgresql://postgres@h/db?sslpassword={PASSWORD}&schema=x",
    f"postgresql://postgres:a/{PASSWORD}@127.0.0.1:9/test",  # a password holding a `/`
    f"postgresql://postgres@h/db?password=a%26{PASSWORD}&schema=x",  # an encoded `&` inside the password
])
def test_every_spelling_of_a_url_password_is_masked(text: str) -> None:
    from amplitude_export.sinks.postgres_url import redact
    from amplitude_export.storage import mask_urls

    assert PASSWORD not in mask_urls(text) and "***" in mask_urls(text)
    if text.startswith("postgresql://"):
        assert PASSWORD not in redact(text)


def test_a_password_misread_as_a_port_is_not_shown(tmp_path: Path) -> None:
    result = cli("status", "--dest", f"postgresql://postgres:a/{PASSWORD}@127.0.0.1:9/test", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert PASSWORD not in result.stderr and "a/" not in result.stderr.split("has port")[-1]

"""The docs kept honest: install lines name real extras, and what the docs say the code does, it does."""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

from amplitude_export.sinks.postgres import PostgresSink

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "src").rglob("*.py"))]


def test_every_install_line_names_an_extra_that_exists() -> None:
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = {
        (path.relative_to(ROOT).as_posix(), extra)
        for path in TEXTS
        for extra in re.findall(r"amplitude-export\[([\w-]+)\]", path.read_text(encoding="utf-8"))
    }
    assert named and {(where, extra) for where, extra in named if extra not in extras} == set()


def test_the_documented_delete_filters_by_what_the_sink_deletes_by() -> None:
    def filtered(statement: str) -> list[str]:
        return re.findall(r"\b(_\w+) (?:=|BETWEEN)", statement)

    code = re.search(r'"(DELETE FROM \{\} WHERE [^"]*)"', inspect.getsource(PostgresSink.write_window))
    docs = re.search(r"`(DELETE FROM events WHERE [^`]*)`", (ROOT / "docs" / "POSTGRES.md").read_text())
    assert code and docs
    assert filtered(docs.group(1)) == filtered(code.group(1)) == ["_project", "_upload_hour"]


def test_the_report_docs_cover_every_destination() -> None:
    text = (ROOT / "docs" / "REPORT.md").read_text()
    rows = re.findall(r"^\| `(duckdb:|parquet:|delta:|postgresql://)", text, re.MULTILINE)
    assert {"duckdb:", "parquet:", "delta:", "postgresql://"} <= set(rows)
    assert "not supported yet" not in text

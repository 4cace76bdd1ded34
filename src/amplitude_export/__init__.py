"""amplitude-export: move raw events out of Amplitude's Export API into DuckDB, Parquet, PostgreSQL and pandas."""

from __future__ import annotations

__version__ = "0.1.0"

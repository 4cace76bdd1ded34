"""`amplitude-export report`: one self-contained HTML page about what a destination holds.

The way through the package is one way: `snapshot` (the ledger and the event columns the figures need, read
through the sink's public reads into a DuckDB file of the report's own) -> `figures` (every number, by SQL;
`health` for the data-health tables) -> `page` (the template `page.html` filled in, with `charts`' Vega-Lite specs
and the Vega JavaScript inlined). Any destination a sink writes can be reported on. Only aggregates leave the
database: the page's size grows with the number of days and hours in the range, not with the number of events.

The page embeds its figures once, as JSON (`<script type="application/json" id="report-data">`), and draws them
with Vega-Lite specs (`chart_specs`); the Vega, Vega-Lite and vega-embed JavaScript ships with the package
(`report_assets/`, refreshed by tools/vendor_vega.sh) and is inlined, so the page opens offline. See docs/REPORT.md.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import StorageError, os_reason
from ..storage import mask_urls, redact
from .charts import chart_specs, vega_versions
from .figures import TOP, gather
from .page import render_html
from .snapshot import take_snapshot


def write_report(
    dest: str,
    out: Path,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    project: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Path:
    """Write the HTML report of destination `dest` to `out`; return `out`.

    `dest` is any destination `run` writes: `duckdb:PATH`, `parquet:DIR` (or an fsspec URL such as
    `parquet:s3://bucket/prefix`) or `postgresql://...`.

    `start` and `end` are UTC upload hours, both inclusive (default: everything the destination holds). `project`
    picks the ledger to read; by default the only one there (a destination holding several needs it named).
    `storage_options` go to the filesystem of a `parquet:` URL on object storage, as for `read_arrow`.
    """
    with take_snapshot(dest, project, storage_options) as snapshot:
        data = gather(snapshot, start=start, end=end)
    data["meta"]["destination"] = redact(mask_urls(dest), storage_options)
    out = Path(out)
    html = render_html(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    # written beside `out` and renamed: a full disk leaves the previous report, or none, never half of one
    part = out.with_name(f".{out.name}.part")
    try:
        part.write_text(html, encoding="utf-8")
        os.replace(part, out)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise StorageError(out, os_reason(exc)) from None
    return out


__all__ = ["TOP", "chart_specs", "gather", "render_html", "take_snapshot", "vega_versions", "write_report"]

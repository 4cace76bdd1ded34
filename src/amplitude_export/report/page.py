"""The report's page: the template `page.html` filled with tiles, tables, the figures as JSON and the charts.

The template, its CSS (`style.css`) and the script that draws the charts (`render.js`) are package data; every
value put into the template is escaped here (`html.escape`, or JSON that cannot end its `<script>` early).
"""

from __future__ import annotations

import html
import json
from importlib import resources
from string import Template
from typing import Any

from ..ledger import EMPTY, FAILED, LOADED, TOO_LARGE
from .charts import chart_specs, javascript, vega_credit
from .figures import MISSING

HERE = resources.files(__package__)


def _text(name: str) -> str:
    return (HERE / name).read_text(encoding="utf-8")


def _script_safe(text: str) -> str:
    """JSON that cannot end its <script> element early (JSON reads `<\\/` as `</`)."""
    return text.replace("</", "<\\/")


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(rows: list[dict[str, Any]], columns: list[str], *, empty: str, classes: str = "") -> str:
    if not rows:
        return f'<p class="none">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        status = row.get("status")
        attr = f' class="st-{html.escape(str(status))}"' if status else ""
        cells = "".join(
            f"<td{' class=num' if isinstance(row.get(c), int | float) else ''}>"
            f"{html.escape(_fmt(row.get(c)))}</td>"
            for c in columns
        )
        body.append(f"<tr{attr}>{cells}</tr>")
    return f'<table class="{classes}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7_200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3_600:.1f} h"
    return f"{seconds / 86_400:.1f} days"


def _others(rows: list[dict[str, Any]]) -> str:
    """A sentence on the values left out of a top chart (hover a bar for approximate users)."""
    other = next((row for row in rows if row.get("other")), None)
    if other is None:
        return "Hover a bar for its users (approximate)."
    return html.escape(f"Not drawn: {other['other']:,} more values, {other['share']:.1%} of events.")


def _tile(label: str, value: str, note: str = "") -> str:
    extra = f"<small>{html.escape(note)}</small>" if note else ""
    return f'<div class="tile"><span>{html.escape(label)}</span><b>{html.escape(value)}</b>{extra}</div>'


def render_html(data: dict[str, Any]) -> str:
    """The whole page: figures as a JSON island, chart specs, the inlined JavaScript, tables for the rest."""
    meta, totals, health, lateness = data["meta"], data["totals"], data["health"], data["lateness"]
    by_status = totals["hours_by_status"]
    quantiles = lateness["quantiles"]
    failed_hours = by_status.get(FAILED, 0) + by_status.get(TOO_LARGE, 0)
    tiles = "".join([
        _tile("events", f"{totals['events']:,}", "uploaded in the range"),
        _tile("distinct users", f"{totals['users']:,}", "amplitude_id"),
        _tile("hours loaded", f"{by_status.get(LOADED, 0):,}", f"of {totals['hours']:,}"),
        _tile("hours empty", f"{by_status.get(EMPTY, 0):,}", "no data (404)"),
        _tile("hours failed", f"{failed_hours:,}", "retried by the next run"),
        _tile("hours not loaded", f"{by_status.get(MISSING, 0):,}", "never asked for"),
        _tile("duplicates dropped", f"{totals['duplicates']:,}", "same uuid again"),
        _tile("lines rejected", f"{totals['rejects']:,}", "not a JSON event"),
        _tile("complete through", totals["complete_through"] or "n/a", "this hour and all before it done"),
    ])  # fmt: skip
    p99 = quantiles.get("p99")
    lateness_rows = [{"quantile": name, "lateness": _duration(quantiles.get(name))}
                     for name in ("p50", "p90", "p99", "p999", "max") if name in quantiles]  # fmt: skip
    unknown = health["unknown_fields"]
    retried = health["retried_hours"]
    split = health["split_windows"]
    mismatches = health["ledger_mismatches"]
    hourly_note = ""
    if meta.get("hourly_from") and meta["start"] and meta["hourly_from"][:13] != meta["start"]:
        hourly_note = f" (the last {meta['hourly_days']} days of the range)"
    checks = [
        ("duplicate lines dropped (uuid seen before)", health["duplicates"]),
        ("lines rejected (not a JSON event with a uuid)", health["rejects"]),
        ("fields kept in _extra (distinct keys)", len(unknown)),
        ("hours retried (attempts > 1)", sum(r["hours"] for r in retried)),
        ("windows split (fetched in parts after a 400 or 504)", len(split)),
        ("hours fetched in a split window's parts", sum(r["hours"] for r in split)),
        ("hours failed or too large", failed_hours),
        ("hours whose stored events differ from the ledger", len(mismatches)),
    ]
    daily_note = (
        "By UTC day of <code>event_time</code>. A day stays pale until the destination is complete through "
        "the day's end plus the 99th percentile of lateness"
        + (f" ({html.escape(_duration(p99))})" if p99 is not None else "")
        + ": until then late events keep arriving for it."
    )
    windows = data["windows"]
    return Template(_text("page.html")).substitute(
        title=html.escape(f"Amplitude export report: {meta.get('destination', '')}"),
        css=_text("style.css"),
        javascript=javascript(),
        destination=html.escape(meta.get("destination", "")),
        project=html.escape(str(meta["project"])),
        range_text=html.escape(
            f"{meta['start']} .. {meta['end']} UTC (upload hours)" if meta["start"] else "empty destination"
        ),
        generated_at=html.escape(meta["generated_at"]),
        tiles=tiles,
        section_hourly=_section(
            "chart-hourly",
            "Events per upload hour" + hourly_note,
            "Bars: events stored per UTC upload hour. Shaded: hours the ledger holds as empty (grey), failed "
            "(red) or too large (dark red), and hours no run has asked for yet (orange). Hover for the reason.",
        ),
        section_daily=_section("chart-daily", "Events per day", daily_note),
        section_users=_section(
            "chart-users",
            "Daily active users and new users",
            "Distinct <code>amplitude_id</code> per event day; new users are those whose first event anywhere in "
            "the destination falls on that day. Dashed: days still filling in.",
        ),
        section_streams=_streams_section(data.get("streams") or {}),
        section_types=_section("chart-types", "Top event types", "By events in the range. " + _others(
            data["event_types"])),
        section_platforms=_section("chart-platforms", "Platforms",
                                   "<code>platform</code> as the SDK reports it. " + _others(data["platforms"])),
        section_countries=_section("chart-countries", "Countries",
                                   "From Amplitude's IP geolocation. " + _others(data["countries"])),
        p99=html.escape(_duration(p99)),
        lateness_table=_table(lateness_rows, ["quantile", "lateness"], empty="no events"),
        negative=f"{lateness['negative']:,}",
        unknown=f"{lateness['unknown']:,}",
        health_table=_table([{"check": check, "value": value} for check, value in checks], ["check", "value"],
                            empty=""),
        failed_table=_table(health["failed"], ["start", "end", "status", "hours", "reason"],
                            empty="No failed hours."),
        unknown_table=_table(unknown, ["key", "kind", "events", "first_hour"],
                             empty="No unknown fields or mistyped values."),
        retried_table=_table(retried[:200], ["start", "end", "hours", "attempts", "status"],
                             empty="No hour needed a second attempt."),
        split_table=_table(split[:200], ["window", "hours", "attempts", "statuses"],
                           empty="No window had to be split."),
        mismatch_table=_table(mismatches[:200], ["hour", "ledger", "stored"],
                              empty="Every loaded hour holds exactly the events its ledger row counts."),
        windows_open=" open" if len(windows) <= 40 else "",
        windows_count=f"{len(windows):,}",
        windows_table=_table(
            windows,
            ["start", "end", "status", "hours", "events", "duplicates", "rejects", "bytes", "reason"],
            empty="The ledger is empty.",
            classes="windows",
        ),
        vega_credit=html.escape(vega_credit()),
        island=_script_safe(json.dumps(data, separators=(",", ":"), default=str, allow_nan=False)),
        specs=_script_safe(json.dumps(chart_specs(annotations=bool((data.get("streams") or {}).get("annotations"))),
                                      separators=(",", ":"))),
        render_js=_text("render.js"),  # draws every chart; body[data-rendered] tells a test when all are done
    )


def _streams_section(streams: dict[str, Any]) -> str:
    """"Other streams": the tables `run --streams` loaded, the cohorts by size, and where the annotations are."""
    if not streams:
        return ""
    annotations = streams["annotations"]
    drawn = (f"{len(annotations):,} annotations fall in the range: drawn on the events-per-day chart as dashed "
             "rules with their labels." if annotations else "No annotation falls in the range.")
    return (
        '<section id="other-streams"><h2>Other streams</h2>'
        '<p class="note">The tables <code>run --streams</code> loaded beside <code>events</code>, with the rows each '
        f"holds for the project. {html.escape(drawn)}</p>"
        + _table(streams["tables"], ["table", "rows", "loaded_at", "note"], empty="")
        + "<h3>Cohorts</h3><p class=\"note\">By size, as Amplitude computed it (archived cohorts left out).</p>"
        + _table(streams["cohorts"], ["cohort", "id", "size", "last_computed"], empty="No cohorts loaded.",
                 classes="cohorts")
        + "</section>"
    )


def _section(chart_id: str, heading: str, text: str) -> str:
    return (
        f'<section><h2>{html.escape(heading)}</h2><p class="note">{text}</p>'
        f'<div class="chart" id="{chart_id}"></div></section>'
    )

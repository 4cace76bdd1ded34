"""The report's charts: a Vega-Lite spec per chart and the Vega JavaScript the page inlines to draw them."""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

from ..ledger import EMPTY, FAILED, LOADED, TOO_LARGE
from .figures import MISSING

STATUS_COLORS = {
    LOADED: "#4c78a8",
    EMPTY: "#bab0ac",
    FAILED: "#e45756",
    TOO_LARGE: "#9d2a2a",
    MISSING: "#f2a93b",
}
ANNOTATION_COLOR = "#7a5195"
ASSETS = resources.files("amplitude_export") / "report_assets"
VEGA_FILES = ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js")  # in load order: embed needs the other two


def vega_versions() -> dict[str, str]:
    """The versions of the Vega, Vega-Lite and vega-embed builds the report inlines (tools/vendor_vega.sh)."""
    versions: dict[str, str] = json.loads((ASSETS / "versions.json").read_text(encoding="utf-8"))
    return versions


def _field(name: str, kind: str, **more: Any) -> dict[str, Any]:
    return {"field": name, "type": kind, **more}


def chart_specs(*, annotations: bool = False) -> dict[str, dict[str, Any]]:
    """The Vega-Lite spec of each chart, by the id of its container; data comes from named datasets at render.
    With `annotations`, the daily chart also draws the `annotations` dataset: a vertical rule and its label per
    annotation (only then: a layer over an empty dataset makes Vega warn)."""
    schema = f"https://vega.github.io/schema/vega-lite/v{vega_versions()['vega-lite'].split('.')[0]}.json"
    hour = _field("hour", "temporal", scale={"type": "utc"})
    hour_label = _field("label", "nominal", title="hour")
    hourly = {
        "data": {"name": "hourly"},
        "transform": [
            {"calculate": "time(toDate(datum.hour)) + 3600000", "as": "hour_end"},
            {"calculate": "utcFormat(toDate(datum.hour), '%Y-%m-%d %H:00 UTC')", "as": "label"},
        ],
        "layer": [
            # every hour, shaded unless loaded: filtering instead would leave an empty layer, which Vega warns about
            {
                "mark": "rect",
                "encoding": {
                    "x": hour,
                    "x2": {"field": "hour_end"},
                    "color": _field("status", "nominal"),  # the layers share the colour scale set below
                    "opacity": {"condition": {"test": "datum.status == 'loaded'", "value": 0}, "value": 0.45},
                    "tooltip": [hour_label, _field("status", "nominal"), _field("reason", "nominal")],
                },
            },
            # rects from hour to hour + 1 and from 0 up: a bar mark with x and x2 would be drawn horizontally
            {
                "mark": "rect",
                "encoding": {
                    "x": {**hour, "title": "upload hour (UTC)"},
                    "x2": {"field": "hour_end"},
                    "y": _field("events", "quantitative", title="events"),
                    "y2": {"datum": 0},
                    "color": _field(
                        "status", "nominal", title="ledger", legend={"symbolOpacity": 1},
                        scale={"domain": list(STATUS_COLORS), "range": list(STATUS_COLORS.values())},
                    ),
                    "tooltip": [hour_label, _field("events", "quantitative"), _field("status", "nominal"),
                                _field("attempts", "quantitative"),
                                _field("split_from", "nominal", title="split from")],
                },
            },
        ],
        "width": "container",
        "height": 220,
    }  # fmt: skip
    day = _field("day", "temporal", timeUnit="utcyearmonthdate", title="event day (UTC)")
    day_tip = _field("day", "nominal", title="day")
    daily = {
        "data": {"name": "daily"},
        "transform": [{"calculate": "datum.final ? 'final' : 'still filling in'", "as": "state"}],
        "mark": "bar",
        "encoding": {
            "x": day,
            "y": _field("events", "quantitative", title="events"),
            "color": _field("state", "nominal", title="day",
                            scale={"domain": ["final", "still filling in"], "range": ["#4c78a8", "#a0c4e8"]}),
            "tooltip": [day_tip, *(_field(n, "quantitative") for n in ("events", "users", "new_users")),
                        _field("state", "nominal")],
        },
        "width": "container",
        "height": 200,
    }  # fmt: skip
    if annotations:
        marked = {**_field("day", "temporal", timeUnit="utcyearmonthdate")}
        note = [_field("day", "nominal", title="annotation"), _field("label", "nominal"),
                _field("category", "nominal")]
        bars = {key: daily.pop(key) for key in ("transform", "mark", "encoding")}
        daily["layer"] = [
            bars,
            {"data": {"name": "annotations"}, "mark": {"type": "rule", "color": ANNOTATION_COLOR, "strokeDash": [4, 2]},
             "encoding": {"x": marked, "tooltip": note}},
            {"data": {"name": "annotations"},
             "mark": {"type": "text", "align": "left", "baseline": "top", "dx": 3, "color": ANNOTATION_COLOR},
             "encoding": {"x": marked, "y": {"value": 2}, "text": _field("label", "nominal"), "tooltip": note}},
        ]  # fmt: skip
    users = {
        "data": {"name": "daily"},
        "transform": [
            {"fold": ["users", "new_users"], "as": ["measure", "count"]},
            {"calculate": "datum.measure == 'users' ? 'active users' : 'new users'", "as": "measure"},
        ],
        "mark": {"type": "line", "point": True},
        "encoding": {
            "x": day,
            "y": _field("count", "quantitative", title="distinct amplitude_id"),
            "color": _field("measure", "nominal", title=None),
            "strokeDash": _field("final", "nominal", legend=None,
                                 scale={"domain": [True, False], "range": [[1, 0], [4, 3]]}),
            "tooltip": [day_tip, _field("measure", "nominal"), _field("count", "quantitative")],
        },
        "width": "container",
        "height": 200,
    }  # fmt: skip

    def ranked(name: str, title: str) -> dict[str, Any]:
        return {
            "data": {"name": name},
            "transform": [{"filter": "!datum.other"}],
            "mark": "bar",
            "encoding": {
                "y": _field("value", "nominal", sort=None, title=title),
                "x": _field("events", "quantitative", title="events", axis={"format": "~s"}),
                "tooltip": [_field("value", "nominal", title=title), _field("events", "quantitative"),
                            _field("users", "quantitative", title="users (approx.)"),
                            _field("share", "quantitative", format=".1%")],
            },
            "width": 270,  # fixed: "container" width with a discrete height makes Vega-Lite warn
        }  # fmt: skip

    lateness = {
        "data": {"name": "lateness"},
        "mark": "bar",
        "encoding": {
            "x": _field("bucket", "nominal", sort={"field": "order"}, title="server_upload_time - event_time"),
            "y": _field("events", "quantitative", title="events", scale={"type": "sqrt"}),  # the long tail shows
            "tooltip": [_field("bucket", "nominal"), _field("events", "quantitative")],
        },
        "width": "container",
        "height": 200,
    }
    charts = {
        "chart-hourly": hourly,
        "chart-daily": daily,
        "chart-users": users,
        "chart-types": ranked("event_types", "event_type"),
        "chart-platforms": ranked("platforms", "platform"),
        "chart-countries": ranked("countries", "country"),
        "chart-lateness": lateness,
    }
    return {key: {"$schema": schema, **spec} for key, spec in charts.items()}




def vega_credit() -> str:
    return ", ".join(f"{name} {version}" for name, version in vega_versions().items())


def javascript() -> str:
    """Vega, Vega-Lite and vega-embed, shipped as package data (no network), as one script."""
    notice = f"/*! {vega_credit()}: BSD-3-Clause; licences in amplitude_export/report_assets/LICENSES.txt */\n"
    bundle = notice + "\n".join((ASSETS / name).read_text(encoding="utf-8") for name in VEGA_FILES)
    # only `</script` could end the element early; replacing every `</` would break regex literals like /</g
    return re.sub(r"</(script)", r"<\\/\1", bundle, flags=re.IGNORECASE)


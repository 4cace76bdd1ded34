"""The fake Amplitude project behind the fake server's other APIs: cohorts, annotations, event types, taxonomy,
active users, session lengths and deletion jobs, all derived from the same synthetic events it exports.

Everything is deterministic for (project, seed, data range). Cohort members and taxonomy come from a *sample*:
the events of the first hours of the data (at most a day, at most `SAMPLE_LINES` lines), so every member is a
user whose events the Export API serves. Counts per day (active users, sessions) come from the events served
for that day's upload hours, after deletions, in UTC (Amplitude uses the project's time zone; the fake's is UTC).

Deletion jobs follow the User Privacy API's life (`staging` -> `submitted` -> scrubbed -> `done`): once a job's
`active_scrub_done_date` is set its users' events uploaded before the end of the job's day are no longer
exported, and they leave every cohort.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import cached_property
from typing import Any

from .synthetic import _EVENT_TYPES, _users, utc_hour

DEFAULT_START = datetime(2024, 3, 1, tzinfo=UTC)  # where the data begins when the server has no data_start
SPAN_DAYS = 7  # the span annotations fall in when the server has no data_end
SAMPLE_LINES = 50_000
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)

# (name, description, rule on a sampled user, archived); a rule sees the user's pool entry and sampled activity
_COHORTS: tuple[tuple[str, str, Callable[[Any, dict[str, Any]], bool], bool], ...] = (
    ("Purchasers", "Users who completed a purchase", lambda u, a: "Purchase Completed" in a["types"], False),
    ("iOS users", "Users on an iPhone", lambda u, a: u.platform == "iOS", False),
    ("Power users", "Users with two or more events", lambda u, a: a["count"] >= 2, False),
    ("DACH & Japan", "Users in Germany, Switzerland or Japan",
     lambda u, a: u.template["country"] in ("Germany", "Switzerland", "Japan"), False),
    ("Spring campaign (old)", "Signed up from the spring campaign",
     lambda u, a: u.props["initial_utm_campaign"] == "spring_2024", True),
)  # fmt: skip
_CATEGORIES = {"session_start": "Session", "session_end": "Session", "Purchase Completed": "Commerce",
               "Add to Cart": "Commerce", "Property Pre-Order Submitted": "Commerce"}  # others: "Engagement"
_ANNOTATIONS = (  # (day offset, hour, label, details, category, chart_id, hours it lasts)
    (0, 9, "Release 2.0.0", "Checkout rewritten", "Releases", None, None),
    (1, 14, "Spring campaign starts", "Newsletter and paid search", "Campaigns", None, 72),
    (2, 3, "Ingestion delayed", "Uploads late by up to an hour", "Incidents", None, 3),
    (3, 12, "Pricing page test", None, None, "abc123", None),
    (5, 0, "Release 2.0.1 🎉", "Fixes for Zürich and 東京 users", "Releases", None, None),
)


def short_id(*parts: object, length: int = 7) -> str:
    """A stable lowercase id like Amplitude's cohort ids (`1a2b3c4`)."""
    return hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=16).hexdigest()[:length]


def parse_day(text: str) -> date:
    """`YYYY-MM-DD` or `YYYYMMDD` (the deletion docs use both)."""
    digits = text.replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        raise ValueError(f"{text!r} is not YYYY-MM-DD or YYYYMMDD")
    return date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))


@dataclass
class DeletionJob:
    """One User Privacy API job: a day it runs on and the users in it."""

    day: date
    status: str = "staging"
    users: list[dict[str, Any]] = field(default_factory=list)  # {amplitude_id, requester, requested_on_day}
    active_scrub_done_date: date | None = None

    def as_json(self, *, include_user_ids: dict[int, str | None] | None = None) -> dict[str, Any]:
        users = [dict(user) for user in self.users]
        if include_user_ids is not None:
            for user in users:
                user["user_id"] = include_user_ids.get(user["amplitude_id"])
        job: dict[str, Any] = {"day": self.day.isoformat(), "status": self.status, "amplitude_ids": users}
        if self.active_scrub_done_date is not None:
            job["active_scrub_done_date"] = self.active_scrub_done_date.isoformat()
        return job


class FakeProject:
    """The project's data beyond raw events. `lines(hour)` gives the events served for an upload hour (after
    deletions), `generated(hour)` the events before them; both are the fake Export API's."""

    def __init__(self, *, project_id: int, seed: int, data_start: datetime | None, data_end: datetime | None,
                 generated: Callable[[datetime], list[dict[str, Any]]],
                 lines: Callable[[datetime], list[dict[str, Any]]]) -> None:
        self.project_id = project_id
        self.seed = seed
        self.start = utc_hour(data_start) if data_start else DEFAULT_START
        self.end = utc_hour(data_end) if data_end else self.start + SPAN_DAYS * DAY - HOUR
        self._generated = generated
        self._lines = lines
        self._lock = threading.RLock()
        self._sample: dict[int, dict[str, Any]] | None = None
        self._property_types: dict[str, dict[str, set[str]]] = {name: {} for name, _ in _EVENT_TYPES}
        self._days: dict[date, dict[int, list[dict[str, Any]]]] = {}
        self.cohort_generations: dict[str, int] = {}
        self.annotations = [self._annotation(index, *spec) for index, spec in enumerate(_ANNOTATIONS)]
        self.jobs: list[DeletionJob] = []

    @cached_property
    def pool(self) -> dict[int, Any]:
        """amplitude_id -> the synthetic user (made on first use: a server that only exports never pays it)."""
        return {user.template["amplitude_id"]: user for user in _users(self.project_id, self.seed)}

    # -- the sample ------------------------------------------------------------------------------------------

    def sample(self) -> dict[int, dict[str, Any]]:
        """amplitude_id -> {types: Counter of event types, count}, over the first hours of the data (before
        deletions)."""
        with self._lock:
            if self._sample is None:
                seen: dict[int, dict[str, Any]] = {}
                lines = 0
                hour = self.start
                while hour < self.start + DAY and hour <= self.end and lines < SAMPLE_LINES:
                    for event in self._generated(hour):
                        entry = seen.setdefault(int(event["amplitude_id"]), {"types": Counter(), "count": 0})
                        entry["types"][event["event_type"]] += 1
                        entry["count"] += 1
                        lines += 1
                        props = self._property_types.setdefault(event["event_type"], {})
                        for key, value in event["event_properties"].items():
                            props.setdefault(key, set()).add(_json_type(value))
                    hour += HOUR
                self._sample = seen
            return self._sample

    def property_types(self) -> dict[str, dict[str, set[str]]]:
        """event type -> property -> the JSON types its values took in the sample."""
        self.sample()
        return self._property_types

    # -- cohorts ---------------------------------------------------------------------------------------------

    def cohort_ids(self) -> list[str]:
        return [short_id(self.project_id, self.seed, name) for name, *_ in _COHORTS]

    def recompute(self, cohort_id: str) -> None:
        """Amplitude recomputed the cohort: `lastComputed` moves on a day and about a tenth of members leave."""
        if cohort_id not in self.cohort_ids():
            raise KeyError(cohort_id)
        with self._lock:
            self.cohort_generations[cohort_id] = self.cohort_generations.get(cohort_id, 0) + 1

    def members(self, cohort_id: str) -> list[int]:
        """The cohort's amplitude ids now, sorted; scrubbed users are gone."""
        index = self.cohort_ids().index(cohort_id)
        rule = _COHORTS[index][2]
        generation = self.cohort_generations.get(cohort_id, 0)
        scrubbed = self.scrubbed()
        out = []
        for amplitude_id, activity in sorted(self.sample().items()):
            user = self.pool.get(amplitude_id)  # a lines file's users are not the pool's: in no cohort
            if user is None or amplitude_id in scrubbed or not rule(user, activity):
                continue
            if generation and hashlib.blake2b(f"{cohort_id}:{amplitude_id}:{generation}".encode(),
                                              digest_size=1).digest()[0] < 26:
                continue
            out.append(amplitude_id)
        return out

    def cohort(self, cohort_id: str) -> dict[str, Any]:
        """The COHORT object of `GET /api/3/cohorts` (timestamps in epoch seconds, as the docs' sample)."""
        index = self.cohort_ids().index(cohort_id)
        name, description, _, archived = _COHORTS[index]
        created = int((self.start - timedelta(days=30 - index)).timestamp())
        computed = int((self.end + HOUR).timestamp()) + 60 * index
        computed += 86_400 * self.cohort_generations.get(cohort_id, 0)
        return {
            "appId": self.project_id, "archived": archived, "definition": {"version": 3, "cohortType": "UNIQUES"},
            "description": description, "finished": True, "id": cohort_id, "name": name,
            "owners": ["analyst@example.com"], "viewers": [], "published": True, "size": len(self.members(cohort_id)),
            "type": "redshift", "lastMod": created + 3600, "createdAt": created, "lastComputed": computed,
            "hidden": False, "is_predictive": False, "is_official_content": index == 0, "metadata": None,
            "view_count": 3 * index + 1, "popularity": None, "last_viewed": None, "chart_id": None,
            "edit_id": None, "location_id": None, "shortcut_ids": [],
        }  # fmt: skip

    def user_id(self, amplitude_id: int) -> str | None:
        user = self.pool.get(amplitude_id)
        return None if user is None else user.template["user_id"]

    def user_props(self, amplitude_id: int) -> dict[str, Any]:
        user = self.pool.get(amplitude_id)
        return {} if user is None else user.props

    # -- annotations, event types, taxonomy ------------------------------------------------------------------

    def _annotation(self, index: int, offset: int, hour: int, label: str, details: str | None,
                    category: str | None, chart_id: str | None, lasts: int | None) -> dict[str, Any]:
        start = max(self.start, min((self.start + offset * DAY).replace(hour=hour), self.end))
        end = start + lasts * HOUR if lasts else None
        names = sorted({spec[4] for spec in _ANNOTATIONS if spec[4]})
        return {"id": 160419 + index, "start": start.isoformat(), "end": end.isoformat() if end else None,
                "label": label, "details": details,
                "category": {"id": 6789 + names.index(category), "name": category} if category else None,
                "chart_id": chart_id}

    def categories(self) -> list[dict[str, Any]]:
        return [{"id": 6789 + index, "name": name}
                for index, name in enumerate(sorted({spec[4] for spec in _ANNOTATIONS if spec[4]}))]

    def event_types(self) -> list[str]:
        return [name for name, _ in _EVENT_TYPES if name != "$identify"]

    def event_totals(self) -> Counter[str]:
        totals: Counter[str] = Counter()
        for activity in self.sample().values():
            totals.update(activity["types"])
        return totals

    def taxonomy_categories(self) -> list[dict[str, Any]]:
        names = sorted({*_CATEGORIES.values(), "Engagement"})
        return [{"id": 400 + index, "name": name} for index, name in enumerate(names)]

    def taxonomy_event(self, event_type: str) -> dict[str, Any]:
        return {"event_type": event_type, "category": {"name": _CATEGORIES.get(event_type, "Engagement")},
                "description": f"Tracked when {event_type.lower().replace('_', ' ')} happens",
                "display_name": event_type.replace("_", " ").title(), "is_active": True,
                "is_hidden_from_dropdowns": False, "is_hidden_from_persona_results": False,
                "is_hidden_from_pathfinder": False, "is_hidden_from_timeline": event_type == "session_end",
                "tags": ["core"] if event_type in _CATEGORIES else [], "owner": "analyst@example.com"}

    def taxonomy_event_properties(self, event_type: str | None) -> list[dict[str, Any]]:
        """The properties of `event_type`, or without it the shared ones (those of two or more event types)."""
        found = self.property_types()
        if event_type is None:
            owners: Counter[str] = Counter(key for props in found.values() for key in props)
            merged: dict[str, set[str]] = {}
            for props in found.values():
                for key, kinds in props.items():
                    if owners[key] > 1:
                        merged.setdefault(key, set()).update(kinds)
            return [_property(key, kinds, None) for key, kinds in sorted(merged.items())]
        return [_property(key, kinds, event_type) for key, kinds in sorted(found[event_type].items())]

    def taxonomy_user_properties(self, show_deleted: bool) -> list[dict[str, Any]]:
        kinds: dict[str, set[str]] = {}
        for user in list(self.pool.values())[:200]:
            for key, value in user.props.items():
                kinds.setdefault(key, set()).add(_json_type(value))
        out = [{"user_property": f"gp:{key}", "description": "", "type": _type_name(kind), "enum_values": "",
                "regex": "", "is_array_type": False, "is_hidden": False, "classifications": [], "deleted": False}
               for key, kind in sorted(kinds.items())]
        if show_deleted:
            out.append({**out[0], "user_property": "gp:legacy_tier", "deleted": True})
        return out

    # -- active users and sessions ---------------------------------------------------------------------------

    def day_events(self, day: date) -> dict[int, list[dict[str, Any]]]:
        """amplitude_id -> that user's events served for the day's 24 upload hours (cached per day)."""
        with self._lock:
            if day not in self._days:
                first = datetime(day.year, day.month, day.day, tzinfo=UTC)
                users: dict[int, list[dict[str, Any]]] = {}
                for hour in (first + HOUR * offset for offset in range(24)):
                    for event in self._lines(hour):
                        users.setdefault(int(event["amplitude_id"]), []).append(event)
                self._days[day] = users
            return self._days[day]

    def forget_days(self) -> None:
        """Drop the per-day cache (deletions changed what is served)."""
        with self._lock:
            self._days.clear()

    def first_days(self, last: date) -> dict[int, date]:
        """amplitude_id -> the first day (from the data's start to `last`) the user has events."""
        first: dict[int, date] = {}
        day = self.start.date()
        while day <= last:
            for amplitude_id in self.day_events(day):
                first.setdefault(amplitude_id, day)
            day += DAY
        return first

    def session_seconds(self, day: date) -> float:
        """The day's average session length in seconds: from each session's start to its last event."""
        sessions: dict[tuple[int, int], int] = {}
        for amplitude_id, events in self.day_events(day).items():
            for event in events:
                session = int(float(event["session_id"]))  # varied lines carry it as a string or a float
                if session == -1:
                    continue
                moment = datetime.fromisoformat(event["event_time"]).replace(tzinfo=UTC)
                millis = int(moment.timestamp() * 1000)
                sessions[(amplitude_id, session)] = max(sessions.get((amplitude_id, session), 0), millis - session)
        return round(sum(sessions.values()) / len(sessions) / 1000, 1) if sessions else 0.0

    # -- deletions -------------------------------------------------------------------------------------------

    def scrubbed(self) -> dict[int, date]:
        """amplitude_id -> the day of the earliest scrubbed job holding it."""
        out: dict[int, date] = {}
        for job in self.jobs:
            if job.active_scrub_done_date is not None:
                for user in job.users:
                    out.setdefault(user["amplitude_id"], job.day)
        return out

    def deleted_in(self, hour: datetime) -> set[int]:
        """The amplitude ids whose events of upload hour `hour` a scrubbed job removed (up to the end of its day)."""
        return {key for key, day in self.scrubbed().items()
                if hour < datetime(day.year, day.month, day.day, tzinfo=UTC) + DAY}

    def deletions_key(self) -> str:
        """A short digest of which users are scrubbed up to which day ('' for none): part of the fake Export
        API's member cache key, so exports change when deletions do."""
        scrubbed = self.scrubbed()
        if not scrubbed:
            return ""
        text = ",".join(f"{key}@{day}" for key, day in sorted(scrubbed.items()))
        return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()

    def resolve(self, amplitude_ids: Iterable[int], user_ids: Iterable[str]) -> tuple[list[int], list[Any]]:
        """(known amplitude ids, the ids given that match no user of the project)."""
        by_user = {user.template["user_id"]: key for key, user in self.pool.items() if user.template["user_id"]}
        known: list[int] = []
        invalid: list[Any] = []
        for amplitude_id in amplitude_ids:
            (known if amplitude_id in self.pool else invalid).append(amplitude_id)
        for user_id in user_ids:
            if user_id in by_user:
                known.append(by_user[user_id])
            else:
                invalid.append(user_id)
        return list(dict.fromkeys(known)), invalid

    def schedule(self, amplitude_ids: list[int], requester: str, today: date) -> DeletionJob:
        """Add users to the staging job (the batch's first request sets its day, 14 days on) or start one."""
        job = next((job for job in self.jobs if job.status == "staging"), None)
        if job is None:
            job = DeletionJob(day=today + 14 * DAY)
            self.jobs.append(job)
        present = {user["amplitude_id"] for user in job.users}
        job.users += [{"amplitude_id": amplitude_id, "requester": requester,
                       "requested_on_day": today.isoformat()} for amplitude_id in amplitude_ids
                      if amplitude_id not in present]
        return job


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "any" if value is not None else "null"


def _type_name(kinds: set[str]) -> str:
    kinds = kinds - {"null"}
    return next(iter(kinds)) if len(kinds) == 1 and kinds != {"array"} else "any"


def _property(key: str, kinds: set[str], event_type: str | None) -> dict[str, Any]:
    prop: dict[str, Any] = {"event_property": key}
    if event_type is not None:
        prop["event_type"] = event_type
    prop.update({"description": "", "type": _type_name(kinds), "regex": "", "enum_values": "",
                 "is_array_type": "array" in kinds, "is_required": False, "is_hidden": False,
                 "classifications": []})
    return prop

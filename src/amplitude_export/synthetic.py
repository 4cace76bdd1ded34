"""Deterministic, realistic Amplitude export events, for the fake Export API and benchmarks.

`generate_hour` makes the events Amplitude would export for one upload hour: the 55 top-level keys of a
real export line in the export's order, nested objects whose keys vary and whose types drift, unicode, null
user ids, late events, a few duplicate uuids (inside the hour and, occasionally, again in the next hour),
about 1.7 KB of JSON per event. The same arguments always give the same events; `version` simulates
Amplitude re-exporting an hour with changed content.

`variation` (default `DEFAULT_VARIATION`, 2 %) is the share of lines that vary at the top level as real exports
do (`VARIATIONS`): `paying` and `sample_rate` with their documented types, keys some SDKs omit, keys Amplitude
added later, numbers sent as strings, integral numbers written as floats, timestamps without microseconds, and
an array or a bare string where the documented type is a string. Variation 0 gives the uniform lines of old.

Uuids depend on (project, seed, hour, position) only, never on `version` or on other events, so the uuid of
a previous hour's event can be named without generating that hour (cross-hour duplicates rely on this).
"""

from __future__ import annotations

import gc
import hashlib
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

Event = dict[str, Any]

# The 55 top-level keys of a real export line, in the export's (alphabetical) order.
EXPORT_KEYS: tuple[str, ...] = (
    "$insert_id", "$insert_key", "$schema", "adid", "amplitude_attribution_ids", "amplitude_event_type",
    "amplitude_id", "app", "city", "client_event_time", "client_upload_time", "country", "data", "data_type",
    "device_brand", "device_carrier", "device_family", "device_id", "device_manufacturer", "device_model",
    "device_type", "dma", "event_id", "event_properties", "event_time", "event_type",
    "global_user_properties", "group_properties", "groups", "idfa", "ip_address", "is_attribution_event",
    "language", "library",
    "location_lat", "location_lng", "os_name", "os_version", "partner_id", "paying", "plan", "platform",
    "processed_time", "region", "sample_rate", "server_received_time", "server_upload_time", "session_id",
    "source_id", "start_version", "user_creation_time", "user_id", "user_properties", "uuid", "version_name",
)  # fmt: skip

# Keys some real lines lack (the 7th reference line); `uuid` is never dropped so dedupe tests stay exact.
OPTIONAL_KEYS: tuple[str, ...] = (
    "$insert_key", "$schema", "adid", "amplitude_event_type", "amplitude_attribution_ids", "city",
    "ip_address",
)  # fmt: skip

DEFAULT_VARIATION = 0.02  # share of lines varied as real exports vary (VARIATIONS)
DUPLICATE_RATE = 0.002  # share of an hour's lines that repeat an event of the same hour
MISSING_KEYS_RATE = 0.005  # share of events that lack OPTIONAL_KEYS
NULL_USER_RATE = 0.12  # share of users (devices) without a user_id

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)

_PLACES: tuple[tuple[str, str, str, str | None, float, float], ...] = (
    ("San Francisco", "United States", "California", "San Francisco-Oakland-San Jose, CA", 37.77, -122.42),
    ("New York", "United States", "New York", "New York, NY", 40.71, -74.01),
    ("Burlington", "United States", "Vermont", "Burlington, VT-Plattsburgh, NY", 44.48, -73.21),
    ("São Paulo", "Brazil", "São Paulo", None, -23.55, -46.63),
    ("München", "Germany", "Bayern", None, 48.14, 11.58),
    ("Zürich", "Switzerland", "Zürich", None, 47.37, 8.54),
    ("Łódź", "Poland", "Łódź Voivodeship", None, 51.76, 19.46),
    ("東京", "Japan", "東京都", None, 35.68, 139.69),
    ("北京", "China", "北京市", None, 39.90, 116.40),
    ("서울", "South Korea", "서울특별시", None, 37.57, 126.98),
    ("Puchong Batu Dua Belas", "Malaysia", "Selangor", None, 3.03, 101.62),
    ("Montréal", "Canada", "Québec", None, 45.50, -73.57),
    ("Reykjavík", "Iceland", "Höfuðborgarsvæði", None, 64.15, -21.94),
    ("Zaragoza", "Spain", "Aragón", None, 41.65, -0.89),
)
_LANGUAGES = (
    "English",
    "Portuguese",
    "German",
    "Japanese",
    "Chinese",
    "Korean",
    "Polish",
    "French",
    "Spanish",
)

# (platform, os_name, os versions, device_family, device_type, brand, manufacturer, model, library, carrier)
_DEVICES: tuple[tuple[Any, ...], ...] = (
    ("iOS", "ios", ("17.5", "18.5", "18.6"), "Apple iPhone", "Apple iPhone 15 Pro", None, "Apple",
     "iPhone16,1", "amplitude-flutter/4.3.2_amplitude-swift/1.13.6", "T-Mobile"),
    ("iOS", "ios", ("18.5",), "Apple arm64", None, None, None, None, "amplitude-swift/1.13.6", "Unknown"),
    ("Android", "android", ("13", "14", "15"), "Samsung Galaxy", "Samsung Galaxy S24", "samsung", "samsung",
     "SM-S921B", "amplitude-android/1.16.8", "Vodafone"),
    ("Android", "android", ("14",), "Google Pixel", "Google Pixel 8", "google", "Google", "Pixel 8",
     "amplitude-kotlin/1.19.1", "NTT DOCOMO"),
    ("Web", "Chrome", ("126", "127"), "Windows", None, None, None, None, "amplitude-ts/2.11.1", None),
    ("Web", "Chrome Mobile", ("93",), "Apple iPhone", "Apple iPhone", None, None, None, "amplitude-js/5.2.2",
     None),
    ("Web", "Safari", ("17.5",), "Mac", None, None, None, None, "amplitude-ts/2.11.1", None),
    ("Web", "Firefox", ("128.0",), "Linux", None, None, None, None, "amplitude-ts/2.11.1", None),
    (None, None, (None,), None, None, None, None, None, "http/2.0", None),
    (None, None, (None,), None, None, None, None, None, "segment", None),
)  # fmt: skip
_APP_VERSIONS = ("1.0.79", "1.0.80", "1.0.81", "2.0.0-beta.1", "2.0.0")
_NAMES = ("Ana", "Jürgen", "Zoë", "Łukasz", "François", "さくら", "李雷", "민준", "Ólafur", "Renée", "Søren")

_PRODUCTS = ("Expired Pre Order", "Property 0", "抹茶ラテ", "北京烤鸭", "Crème brûlée 🍮", "Café Zürich",
             "🎉 Summer Sale", "Açaí bowl", "Smørrebrød", "김치찌개", "Piña colada 🍹")  # fmt: skip
_SCREENS = ("Property Drops", "Home", "Checkout 🛒", "Einstellungen", "設定", "Perfil", "Mon compte")
_REFERRERS = (
    "https://www.google.com/",
    "https://t.co/",
    "https://example.com/blog/ünïcödé",
    "",
    "android-app://x",
)


def _money(rng: random.Random) -> Any:
    value = round(rng.uniform(1, 500), 2)
    roll = rng.random()
    # drifting type: the same key a float, an int, or a string
    return value if roll < 0.6 else int(value) if roll < 0.85 else f"{value:.2f}"


def _small_int(rng: random.Random) -> Any:
    value = rng.randint(0, 40)
    return value if rng.random() < 0.8 else str(value)


def _flag(rng: random.Random) -> Any:
    roll = rng.random()
    return True if roll < 0.45 else False if roll < 0.9 else "true" if roll < 0.95 else None


def _pick(options: tuple[Any, ...]) -> Any:
    return lambda rng: options[int(rng.random() * len(options))]


# event type -> (insert_id style, property makers); an event includes each property with probability 0.85
_EVENT_TYPES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("session_start", {}),
    ("session_end", {}),
    ("Property Pre-Order Submitted", {
        "Total Price": _money, "Drop Id": _small_int, "Number of Shares": _small_int,
        "Drop Type": _pick(("Pre-Order", "Sale", "Buy Anytime")), "Price per Share": _money,
        "Property": _pick(_PRODUCTS)}),
    ("Hero Section Viewed", {
        "Hero Section Type": _pick(("preOrderSale", "banner", "carousel")), "Hero Section Index": _small_int,
        "Current Screen": _pick(_SCREENS)}),
    ("Drop Card Tapped", {
        "Status": _pick(("buying", "sold out", "coming soon ⏳")), "Position in List": _small_int,
        "Drop Id": _small_int, "Drop Type": _pick(("Buy Anytime", "Sale")), "Price per Share": _money,
        "Property": _pick(_PRODUCTS), "Current Screen": _pick(_SCREENS)}),
    ("view_page", {
        "referer": _pick(_REFERRERS), "originalURL": _pick(
            ("https://shop.example/ja/商品", "https://shop.example/de/größe", "https://shop.example/")),
        "title": _pick(("Startseite", "ホーム", "Accueil – Boutique", "Home 🏠"))}),
    ("Play Song", {
        "is enterprise?": _flag, "user type": _pick(("user", "admin")), "num of favorites": _small_int,
        "notifications enabled?": _flag, "persona": _pick(("millennial", "gen z", "boomer")),
        "basket": lambda rng: ["eye of newt", "stone of jordan", "scimitar"][: rng.randint(0, 3)],
        "NPS": _small_int, "company size": _pick(("1-10", "500+", 500))}),
    ("Add to Cart", {
        "sku": lambda rng: f"SKU-{rng.randint(1000, 9999)}", "quantity": _small_int, "price": _money,
        "currency": _pick(("USD", "EUR", "JPY", "BRL")), "product name": _pick(_PRODUCTS),
        "options": lambda rng: {"size": rng.choice(("S", "M", "L", 42)), "gift": _flag(rng)}}),
    ("Search", {
        "query": _pick(("chaussures", "日本酒", "kimchi 김치", "crème", "naïve café ☕", "")),
        "results": _small_int, "filters": lambda rng: rng.sample(["price", "brand", "color", "größe"], 2)}),
    ("Purchase Completed", {
        "revenue": _money, "order id": lambda rng: rng.randint(10**6, 10**9),
        "coupon": _pick((None, "WELCOME10", "夏セール")),
        "items": lambda rng: [{"sku": f"SKU-{rng.randint(1000, 9999)}", "qty": rng.randint(1, 3)}
                              for _ in range(rng.randint(1, 3))]}),
    ("$identify", {}),
)  # fmt: skip
_TYPE_WEIGHTS = (8, 8, 5, 10, 10, 12, 6, 8, 8, 3, 2)


class _User:
    """One device of the project; `template` holds an event's keys, in order, with this device's values.

    An event starts as a copy of the template (a fast C-level copy) and overwrites the keys that vary.
    """

    __slots__ = ("attribution", "groups", "platform", "props", "template")

    def __init__(self, rng: random.Random, index: int, project_id: int) -> None:
        place = rng.choice(_PLACES) if rng.random() < 0.85 else None
        device = rng.choice(_DEVICES)
        platform = device[0]
        self.platform = platform
        self.props: dict[str, Any] = {
            "plan": rng.choice(("free", "pro", "enterprise", 3)),
            "name": rng.choice(_NAMES) + (" 👋" if rng.random() < 0.2 else ""),
            "initial_referrer": rng.choice(_REFERRERS),
            "initial_utm_source": rng.choice(("google", "newsletter", "twitter", "EMPTY")),
            "initial_utm_campaign": rng.choice(("spring_2024", "sommer-aktion", "新春キャンペーン", "EMPTY")),
            "age": rng.randint(18, 80) if rng.random() < 0.7 else str(rng.randint(18, 80)),
            "cohort": f"2024-W{rng.randint(1, 52):02d}",
        }
        self.attribution = [f"{rng.getrandbits(128):032x}"] if rng.random() < 0.4 else None
        self.groups = [str(rng.randint(1, 50))] if rng.random() < 0.15 else None
        device_id = _uuid_from(rng.getrandbits(128))
        created = rng.randint(1_600_000_000, 1_700_000_000) * 1000 if rng.random() < 0.5 else None
        self.template: Event = dict.fromkeys(EXPORT_KEYS)
        self.template.update(
            {
                "adid": _uuid_from(rng.getrandbits(128))
                if platform == "Android" and rng.random() < 0.5
                else None,
                "amplitude_id": 10**12 + rng.randint(0, 10**12),
                "app": project_id,
                "city": place[0] if place else None,
                "country": place[1] if place else None,
                "device_brand": device[5],
                "device_carrier": device[9],
                "device_family": device[3],
                "device_id": device_id.upper() if rng.random() < 0.5 else device_id,
                "device_manufacturer": device[6],
                "device_model": device[7],
                "device_type": device[4],
                "dma": place[3] if place else None,
                "idfa": _uuid_from(rng.getrandbits(128)).upper()
                if platform == "iOS" and rng.random() < 0.3
                else None,
                "ip_address": rng.choice(
                    (
                        f"203.0.113.{rng.randint(1, 254)}",
                        f"198.51.100.{rng.randint(1, 254)}",
                        f"2001:db8::{index:x}",
                    )
                ),
                "language": rng.choice(_LANGUAGES) if platform else None,
                "library": device[8],
                "location_lat": place[4] if place and platform == "iOS" else None,
                "location_lng": place[5] if place and platform == "iOS" else None,
                "os_name": device[1],
                "os_version": rng.choice(device[2]),
                "platform": platform,
                "region": place[2] if place else None,
                "start_version": rng.choice(_APP_VERSIONS) if platform else None,
                "user_creation_time": _Clock()(created) if created else None,
                "user_id": None if rng.random() < NULL_USER_RATE else _uuid_from(rng.getrandbits(128)),
                "version_name": rng.choice(_APP_VERSIONS) if platform else None,
            }
        )


_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def _uuid_hex(h: str) -> str:
    """A version-4 uuid's text from 32 random hex digits."""
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


def _uuid_from(bits: int) -> str:
    return _uuid_hex(f"{bits:032x}")


_POOL = 251  # property sets per event type and hour


@lru_cache(maxsize=8)
def _users(project_id: int, seed: int, count: int = 4096) -> tuple[_User, ...]:
    """The project's devices; events of every hour draw from the same pool, as real users come back."""
    rng = random.Random(f"users:{project_id}:{seed}")
    return tuple(_User(rng, index, project_id) for index in range(count))


def utc_hour(moment: datetime) -> datetime:
    """The UTC hour holding `moment`; a naive datetime is taken as UTC (never as local time)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _hour_key(project_id: int, seed: int, hour: datetime) -> bytes:
    return f"{project_id}:{seed}:{int(utc_hour(hour).timestamp()) // 3600}".encode()


def _hour_ms(hour: datetime) -> int:
    return int((hour.astimezone(UTC) - _EPOCH) / timedelta(milliseconds=1))


def event_uuid(hour: datetime, index: int, *, project_id: int, seed: int) -> str:
    """The uuid of the `index`-th distinct event of `hour`: a pure function, so other hours can reuse it."""
    digest = hashlib.blake2b(_hour_key(project_id, seed, hour) + index.to_bytes(8, "little"), digest_size=16)
    return _uuid_hex(digest.hexdigest())


def distinct_count(events: int) -> int:
    """How many of an hour's `events` lines are distinct events; the rest repeat one of them.

    Every hour of 20 lines or more holds at least one repeat, so small test hours exercise dedupe too.
    """
    if events < 20:
        return events
    return events - max(1, round(events * DUPLICATE_RATE))


_MMSS: tuple[str, ...] = tuple(f"{second // 60:02d}:{second % 60:02d}" for second in range(3600))
_MILLIS: tuple[str, ...] = tuple(f".{milli:03d}000" for milli in range(1000))


class _Clock:
    """Formats milliseconds since the epoch as Amplitude does (`YYYY-MM-DD HH:MM:SS.ffffff`), from tables.

    strftime costs more than the rest of an event, and most timestamps fall in a handful of hours.
    """

    def __init__(self) -> None:
        self._prefixes: dict[int, str] = {}

    def __call__(self, millis: int) -> str:
        hour, rest = divmod(millis, 3_600_000)
        prefix = self._prefixes.get(hour)
        if prefix is None:
            prefix = (_EPOCH + timedelta(hours=hour)).strftime("%Y-%m-%d %H:")
            self._prefixes[hour] = prefix
        second, milli = divmod(rest, 1000)
        return prefix + _MMSS[second] + _MILLIS[milli]


def generate_hour(
    hour: datetime,
    *,
    project_id: int,
    seed: int,
    events: int,
    version: int = 0,
    previous_events: int = 0,
    variation: float = DEFAULT_VARIATION,
) -> list[Event]:
    """The `events` export lines of upload hour `hour` (UTC), deterministic for the arguments.

    About 0.2% of lines (at least one in an hour of 20 or more) repeat an earlier event of the hour. When
    `previous_events` (the line count of the hour before) is given, about one event in 5,000, and one more in
    half of the hours, reuses a uuid of that hour, as when Amplitude receives an event again in a later upload
    hour. A different `version` changes every event's content but keeps the uuids and cross-hour repeats.
    About `variation` of the lines vary (`VARIATIONS`, one to three each), drawn from a stream of their own: the
    other lines, and every uuid, are those of variation 0.
    """
    if events <= 0:
        return []
    hour = utc_hour(hour)
    rng = random.Random(_hour_key(project_id, seed, hour) + f":v{version}".encode())
    users = _users(project_id, seed)
    clock = _Clock()
    base_ms = _hour_ms(hour)
    distinct = distinct_count(events)
    uuids = _uuids(hour, project_id=project_id, seed=seed, distinct=distinct, previous_events=previous_events)
    lines: list[Event] = []
    random_ = rng.random
    type_choices = rng.choices([name for name, _ in _EVENT_TYPES], weights=_TYPE_WEIGHTS, k=distinct)
    # each event copies one of a few hundred property sets drawn for this hour: drawing per event is too slow
    pools = {
        name: [{key: make(rng) for key, make in makers.items() if random_() < 0.85} for _ in range(_POOL)]
        for name, makers in _EVENT_TYPES
    }
    gc_was_enabled = gc.isenabled()
    gc.disable()  # millions of small acyclic dicts: the cyclic collector only costs time here
    try:
        for index in range(distinct):
            user = users[int(random_() * len(users))]
            event_type = type_choices[index]
            props = dict(pools[event_type][int(random_() * _POOL)])
            lines.append(_event(rng, user, clock, base_ms, version, next(uuids), event_type, props))
    finally:
        if gc_was_enabled:
            gc.enable()
    if variation > 0:
        vary(lines, random.Random(_hour_key(project_id, seed, hour) + f":vary:v{version}".encode()), variation)

    for _ in range(events - distinct):
        # the same event twice in one hour: an exact copy at another position
        lines.insert(rng.randrange(len(lines) + 1), dict(lines[rng.randrange(distinct)]))
    return lines


def hour_uuids(
    hour: datetime, *, project_id: int, seed: int, events: int, previous_events: int = 0
) -> set[str]:
    """The distinct uuids `generate_hour` gives for these arguments (any version), without making the events.

    Only the uuids are drawn, no event is built: exactly-once checks over a million events stay quick.
    """
    distinct = distinct_count(events) if events > 0 else 0
    return set(
        _uuids(
            utc_hour(hour),
            project_id=project_id,
            seed=seed,
            distinct=distinct,
            previous_events=previous_events,
        )
    )


def _uuids(
    hour: datetime, *, project_id: int, seed: int, distinct: int, previous_events: int
) -> Iterator[str]:
    """The uuid of each distinct event of the hour, in order.

    Cross-hour repeats are picked from the uuid digests alone, so a re-export (another version, more events)
    keeps them: odd-numbered events, one in 5,000, plus event #1 in half of the hours, take the uuid of an
    even-numbered (so never itself replaced) event of the previous hour.
    """
    uuid_hasher = hashlib.blake2b(_hour_key(project_id, seed, hour), digest_size=16)
    previous_half = (distinct_count(previous_events) + 1) // 2 if previous_events > 0 else 0
    again_first = uuid_hasher.copy().digest()[0] & 1 == 1
    for index in range(distinct):
        hasher = uuid_hasher.copy()
        hasher.update(index.to_bytes(8, "little"))
        digest = hasher.hexdigest()
        if (
            previous_half
            and index & 1
            and ((index == 1 and again_first) or int(digest[24:32], 16) % 2500 == 0)
        ):
            source = 2 * (int(digest[:8], 16) % previous_half)
            yield event_uuid(hour - HOUR, source, project_id=project_id, seed=seed)
        else:
            yield _uuid_hex(digest)


_DATA_SHAPES: tuple[Callable[[], dict[str, Any]], ...] = (
    lambda: {"path": "/2/httpapi", "user_properties_updated": True, "group_first_event": {}, "group_ids": {}},
    lambda: {"path": "/2/httpapi", "group_first_event": {}, "group_ids": {}},
    lambda: {"group_ids": {}, "group_first_event": {}},
    lambda: {"first_event": True},
)


def _event(
    rng: random.Random,
    user: _User,
    clock: _Clock,
    base_ms: int,
    version: int,
    uuid: str,
    event_type: str,
    props: dict[str, Any],
) -> Event:
    random_ = rng.random
    # one draw of 128 bits feeds the many small choices below (a draw per choice costs more than the rest)
    bits = rng.getrandbits(128)
    upload = base_ms + (bits & 0xFFFFFFFF) % 3_600_000
    bits >>= 32
    if bits & 0x1F == 0:  # about 3%: a late event, days old, uploaded now
        delay = int(random_() * 10 * 86_400_000)
    else:
        delay = int(random_() * 1_200_000)
    bits >>= 5
    event_ms = upload - delay
    received = upload - 4 - (bits & 0xFF)
    bits >>= 8
    identify = event_type == "$identify"
    if version:
        props["export_revision"] = version  # a re-export carries corrected content
    server_upload = clock(upload)
    if bits & 0x1F == 0:
        server_upload = server_upload[:19]  # Amplitude occasionally drops the fraction
    bits >>= 5
    event_time = clock(event_ms)
    rare = bits & 0xF  # each value in 1/16 of events
    bits >>= 4
    platform = user.platform
    event = user.template.copy()
    event["$insert_id"] = uuid[::-1] if platform else f"{event_type}:{bits & 0x3FF}"
    if rare == 1:
        event["$insert_key"] = f"{uuid.replace('-', '')[:30]}#{(bits >> 10) & 0x1FF}"
        event["$schema"] = 13
    if user.attribution:
        event["amplitude_attribution_ids"] = list(user.attribution)
    if identify:
        event["amplitude_event_type"] = "identify"
    event["client_event_time"] = event_time
    event["client_upload_time"] = clock(received - 1)
    event["data"] = _DATA_SHAPES[(bits >> 19) & 3]()
    event["data_type"] = "identify" if identify else "event"
    event["event_id"] = (bits >> 21) & 0x3FFFFFFF if platform is None else (bits >> 21) & 0xFFF
    event["event_properties"] = props
    event["event_time"] = event_time
    event["event_type"] = event_type
    if rare in (2, 3):
        event["global_user_properties"] = {"tier": "gold" if rare == 2 else 2}
    if user.groups:
        event["group_properties"] = {"company": {"tier": "enterprise", "seats": 250}}
        event["groups"] = {"company": list(user.groups)}
    else:
        event["group_properties"] = {}
        event["groups"] = {}
    if rare == 4:
        event["is_attribution_event"] = False
    event["plan"] = {"branch": "main", "source": "web", "version": str(version + 3)} if rare == 5 else {}
    event["processed_time"] = clock(upload + 1500 + version)
    event["server_received_time"] = clock(received)
    event["server_upload_time"] = server_upload
    event["session_id"] = -1 if platform is None else event_ms - ((bits >> 51) & 0x1FFFFF)
    event["user_properties"] = dict(user.props) if (bits >> 72) & 3 else {}
    event["uuid"] = uuid
    if rare == 6 and random_() < MISSING_KEYS_RATE * 16:
        for key in OPTIONAL_KEYS:
            del event[key]
    return event


# ---------------------------------------------------------------------------------------------- variation


def _documented_types(event: Event, rng: random.Random) -> None:
    event["paying"] = rng.random() < 0.3  # documented a boolean; seen as null in most exports
    if rng.random() < 0.5:
        event["sample_rate"] = rng.choice((0.1, 0.5, 1))


def _omitted_keys(event: Event, rng: random.Random) -> None:
    for key in rng.sample(OPTIONAL_KEYS + ("dma", "idfa", "adid", "partner_id", "plan", "source_id"), 3):
        event.pop(key, None)


# keys an export may carry that the schema does not know (yet): they land in _extra
NEW_KEYS = frozenset({"$insert_origin", "event_source", "ingestion_metadata", "is_bot"})


def _new_keys(event: Event, rng: random.Random) -> None:
    event[rng.choice(("$insert_origin", "event_source", "ingestion_metadata"))] = rng.choice(
        ("sdk", {"source_name": "segment", "version": 2}, None, 3))
    if rng.random() < 0.3:
        event["is_bot"] = False


def _numbers_as_strings(event: Event, rng: random.Random) -> None:
    for key in rng.sample(("event_id", "session_id", "app", "amplitude_id", "location_lat"), 2):
        if event.get(key) is not None:
            event[key] = str(event[key])


def _integral_floats(event: Event, rng: random.Random) -> None:
    for key in ("event_id", "session_id", "$schema"):
        if isinstance(event.get(key), int):
            event[key] = float(event[key])  # 241.0: a JS SDK's number, fits an integer column


def _seconds_only(event: Event, rng: random.Random) -> None:
    for key in ("client_event_time", "client_upload_time", "event_time", "processed_time", "server_received_time"):
        value = event.get(key)
        if isinstance(value, str) and rng.random() < 0.6:
            event[key] = value[:19]


def _arrays_and_strings(event: Event, rng: random.Random) -> None:
    roll = rng.random()
    if roll < 0.4:  # documented a string, often an array in real exports: both fit its JSON column
        event["amplitude_attribution_ids"] = f"{rng.getrandbits(128):032x}"
    elif roll < 0.7:
        event["device_carrier"] = [event.get("device_carrier") or "Unknown"]  # an array where text is documented
    else:
        event["is_attribution_event"] = "false"  # a string where a boolean is documented


# What a varied line may get (one to three of them); each is seen in real exports or allowed by Amplitude's docs.
VARIATIONS: tuple[Callable[[Event, random.Random], None], ...] = (
    _documented_types, _omitted_keys, _new_keys, _numbers_as_strings, _integral_floats, _seconds_only,
    _arrays_and_strings,
)


def vary(events: list[Event], rng: random.Random, share: float) -> None:
    """Vary about `share` of `events` in place, each with one to three of `VARIATIONS`; `uuid` is never touched."""
    for event in events:
        if rng.random() < share:
            for change in rng.sample(VARIATIONS, rng.choice((1, 1, 2, 3))):
                change(event, rng)


def encode_lines(events: list[Event]) -> list[bytes]:
    """Events as export lines (compact JSON, UTF-8), as the fake server writes them."""
    import msgspec

    encode = msgspec.json.encode
    return [encode(event) for event in events]

"""Credentials and hosts: from flags, the environment (`AMP_API_KEY`, `AMP_SECRET_KEY`, `AMP_BASE_URL`) or `.env`.

Flags win over the environment, which wins over `.env` in the working directory. The secret key is held in a
`Secret` whose `repr` and `str` never show it, so it cannot leak through a log line or a traceback's locals.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values

from .errors import EnvFileError, UsageError
from .storage import mask_urls

# Seconds from a window's first attempt after which no new attempt starts (`ExportClient`, --retry-timeout): long
# enough for a few full retries of a slow export, short enough that one window that keeps failing does not hold
# up an hourly schedule.
RETRY_TIMEOUT = 1800.0
REGION_HOSTS = {
    "us": "https://amplitude.com",
    "eu": "https://analytics.eu.amplitude.com",
}


class Secret:
    """A string that does not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself: only for building the Authorization header."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class Credentials:
    """What it takes to call one project's Export API."""

    api_key: str
    secret_key: Secret
    region: str
    base_url: str

    @property
    def host_label(self) -> str:
        """Region and host, for messages."""
        return f"{self.region.upper()} host {self.base_url}"


def load_credentials(
    *,
    api_key: str | None = None,
    secret_key: str | None = None,
    region: str | None = None,
    base_url: str | None = None,
    env_file: Path | None = Path(".env"),
    environ: dict[str, str] | None = None,
) -> Credentials:
    """Resolve credentials and host: flags first, then the environment, then `.env`."""
    env = dict(os.environ if environ is None else environ)
    file_values = read_env_file(env_file)

    def pick(flag: str | None, name: str) -> str | None:
        return flag or env.get(name) or file_values.get(name) or None

    key = pick(api_key, "AMP_API_KEY")
    secret = pick(secret_key, "AMP_SECRET_KEY")
    chosen_region = (pick(region, "AMP_REGION") or "us").lower()
    if chosen_region not in REGION_HOSTS:
        raise UsageError(f"unknown region {chosen_region!r}: use us or eu")
    url = pick(base_url, "AMP_BASE_URL")
    url = check_base_url(url, "--base-url" if base_url else "AMP_BASE_URL") if url else REGION_HOSTS[chosen_region]
    missing = [name for name, value in (("AMP_API_KEY", key), ("AMP_SECRET_KEY", secret)) if not value]
    if missing:
        raise UsageError(
            f"missing {' and '.join(missing)}: set {'them' if len(missing) > 1 else 'it'} in the environment or "
            ".env, or pass --api-key/--secret-key"
        )
    assert key and secret
    return Credentials(api_key=key, secret_key=Secret(secret), region=chosen_region, base_url=url)


def read_env_file(path: Path | None) -> dict[str, str]:
    """The values of a `.env` file (none when there is no such file); a line that does not parse is an
    EnvFileError naming the file and the line, never the line itself, which may hold a key."""
    if path is None or not path.is_file():
        return {}
    from dotenv.parser import parse_stream

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EnvFileError(f"{path} is not UTF-8 text (byte {exc.start:,})") from None
    # dotenv_values would log each bad line and skip it: say so once, ourselves, and stop
    bad = [binding.original.line for binding in parse_stream(io.StringIO(text)) if binding.error]
    if bad:
        lines = f"line {bad[0]} does not" if len(bad) == 1 else f"lines {', '.join(map(str, bad))} do not"
        raise EnvFileError(f"{path}: {lines} parse as KEY=VALUE")
    return {key: value for key, value in dotenv_values(stream=io.StringIO(text)).items() if value is not None}


def check_base_url(url: str, source: str = "--base-url") -> str:
    """`url` as the base the client adds `/api/2/export` to: `http(s)://host[:port]`, a trailing slash allowed.

    Anything after the host is refused rather than guessed at: a base URL with a path (such as the export path
    itself) makes every request answer 404, which would read as hours without data.
    """
    text = url.strip()
    try:
        parts = urlsplit(text)
        shown = _without_password(text)
    except ValueError:  # an unclosed `[` of an IPv6 host
        raise UsageError(f"{source} must look like https://host[:port], got {mask_urls(text)!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{source} must look like https://host[:port], got {shown!r}")
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        raise UsageError(f"{source} {shown}: the port is not a number from 0 to 65535") from None
    origin = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
    if "@" in parts.netloc:
        raise UsageError(f"{source} must not carry credentials: give {origin} and set AMP_API_KEY and "
                         "AMP_SECRET_KEY")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        what = "a path" if parts.path not in ("", "/") else "a query" if parts.query else "a fragment"
        raise UsageError(f"{source} {shown} has {what}: give the host alone, {origin} (the tool adds "
                         "/api/2/export itself)")
    return origin


def _without_password(url: str) -> str:
    """`url` with any user and password in it replaced by ***, for messages."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


def other_region(region: str) -> str:
    """The region that is not `region` (for diagnosing a 401 caused by the wrong host)."""
    return "eu" if region == "us" else "us"

"""A PostgreSQL destination's URL: our own `schema=` parameter, checks libpq leaves to connect time, and its
password kept out of every message."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ..errors import UsageError
from ..storage import PASSWORD_PARAMETERS

_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^@?#]*)@")  # a password may hold a `/`
# not storage.mask_urls's value pattern, which reads URLs inside text and so stops at a space: in this one URL a
# space belongs to the password (libpq refuses it, but `check_url` still quotes the URL)
_PASSWORD_PARAM = re.compile(rf"([?&]{PASSWORD_PARAMETERS}=)[^&#]*", re.IGNORECASE)


def split_schema(url: str) -> tuple[str, str | None]:
    """`url` without our own `schema=` query parameter (libpq would refuse it), and that parameter's value."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url, None  # libpq says what is wrong with it
    params = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for key, value in params if key == "schema"]
    if not schemas:
        return url, None
    if not schemas[-1]:
        raise UsageError("the destination's schema= parameter is empty")
    query = urlencode([(key, value) for key, value in params if key != "schema"])
    return urlunsplit(parts._replace(query=query)), schemas[-1]


def check_url(url: str) -> None:
    """Refuse, as bad input (exit 2), a URL libpq cannot parse or whose port is not a port number.

    libpq only checks the port when it connects, where its complaint would look like an unreachable server.
    """
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise UsageError(f"cannot read the PostgreSQL URL {redact(url)}: {one_line(exc, secrets(url))}") from None
    for port in str(params.get("port") or "").split(","):  # one port per host, empty for the default
        port = port.strip()
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            shown = "***" if any(port in secret for secret in secrets(url)) else port  # a misread password
            raise UsageError(f"the PostgreSQL URL {redact(url)} has port {shown!r}: use a number from 1 to 65535")


def one_line(exc: BaseException, hidden: list[str]) -> str:
    """`exc`'s text on one line, with the `hidden` strings (see `secrets`) scrubbed out."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    for secret in hidden:
        text = text.replace(secret, "***")
    return text


def redact(url: str) -> str:
    """`url` without its password (in the user info or a `password=` parameter), safe for any message."""
    url = _USERINFO.sub(lambda m: f"{m.group(1)}{m.group(2).split(':', 1)[0]}@", url, count=1)
    return _PASSWORD_PARAM.sub(r"\1***", url)


def secrets(url: str) -> list[str]:
    """Every spelling of the password in `url`, to scrub from server and driver messages."""
    found: list[str] = []
    match = _USERINFO.match(url)
    if match and ":" in match.group(2):
        found.append(match.group(2).split(":", 1)[1])
    found += [m.group(0).split("=", 1)[1] for m in _PASSWORD_PARAM.finditer(url)]
    found += [unquote(s) for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)

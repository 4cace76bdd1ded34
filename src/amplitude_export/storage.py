"""Storage options: what object-store destinations pass to their filesystem (credentials, endpoint, region).

`--storage-option KEY=VALUE` (repeatable) becomes a dict handed to fsspec as keyword arguments, the same dict the
library takes as `storage_options=`. Values are strings, except `true`/`false` (booleans), values starting
with `{` or `[`, which are JSON (nested options such as `client_kwargs={"region_name": "eu-west-1"}`), and
digits given for a parameter of the filesystem's constructor whose default is an integer (`max_concurrency=4`).

Values may be secrets, so nothing here ever puts one in a message, and `redact` takes them out of text that
came from elsewhere (a library's error naming the endpoint, a log line).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .errors import UsageError

MASK = "***"
INTEGER = re.compile(r"^-?\d+$")
MIN_MASKED = 3  # shorter values are no secret, and masking them would garble every message


def parse_options(pairs: Iterable[str], flag: str = "--storage-option") -> dict[str, Any]:
    """`KEY=VALUE` strings as a dict; a pair without `=`, an empty key or bad JSON is a UsageError that names the
    option by its position, never by its text (which may be a secret)."""
    options: dict[str, Any] = {}
    for position, pair in enumerate(pairs, 1):
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"{flag} #{position}: expected KEY=VALUE (the value is not shown)")
        options[key] = _value(value, f"{flag} {key}")
    return options


def _value(text: str, where: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lstrip().startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}: a value starting with {{ or [ must be JSON ({exc.msg} at "
                             f"character {exc.pos}; the value is not shown)") from None
    return text


def fsspec_options(protocol: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments for an fsspec filesystem of `protocol`: `options`, plus for S3 the region from
    `AWS_REGION` when neither the options nor `AWS_DEFAULT_REGION` give one (botocore reads only the latter;
    the AWS CLI, DuckDB and delta-rs read both). Endpoint and keys come from botocore's own chain
    (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, profiles, roles) unless given here."""
    result = _typed(protocol, dict(options or {}))
    region = os.environ.get("AWS_REGION")
    if protocol in ("s3", "s3a") and region and not os.environ.get("AWS_DEFAULT_REGION"):
        client = dict(result.get("client_kwargs") or {})
        if "region_name" not in client:
            client["region_name"] = region
            result["client_kwargs"] = client
    return result


def _typed(protocol: str, options: dict[str, Any]) -> dict[str, Any]:
    """Options given as text whose parameter in the filesystem's constructor defaults to an integer, as integers
    (`max_concurrency=4` from the command line); text for a boolean parameter is a UsageError (any non-empty
    string would count as true); every other value as given."""
    import fsspec

    try:
        parameters = inspect.signature(fsspec.get_filesystem_class(protocol).__init__).parameters
    except (ValueError, TypeError):
        return options
    for key, value in options.items():
        parameter = parameters.get(key)
        if parameter is None or not isinstance(value, str):
            continue
        if type(parameter.default) is bool:
            raise UsageError(f"storage option {key} takes true or false (the value given is not shown)")
        if type(parameter.default) is int and INTEGER.match(value):
            options[key] = int(value)
    return options


def secrets_of(options: Mapping[str, Any] | None) -> list[str]:
    """Every string value in `options` (nested ones too) long enough to mask, longest first."""
    found: set[str] = set()

    def walk(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, Mapping):
            for item in value.values():
                yield from walk(item)
        elif isinstance(value, list | tuple):
            for item in value:
                yield from walk(item)

    for value in walk(dict(options or {})):
        if len(value) >= MIN_MASKED:
            found.add(value)
    return sorted(found, key=len, reverse=True)  # a value inside a longer one must not break the longer one


# a URL's password, as typed (`://user:pw@`) or percent-encoded inside another URL's parameter (`%3A%2F%2Fuser%3Apw%40`)
_URL_PASSWORD = re.compile(r"(://[^/:@\s]*:)[^@\s]*?@")
_ENCODED_PASSWORD = re.compile(
    r"((?:%3A|:)(?:%2F|/){2}(?:(?!%2F|%40|[/@&?\s]).)*?%3A)(?:(?!%40|[@&\s]).)*%40", re.IGNORECASE)
# the query parameters that carry a password (libpq's); `sinks.postgres_url` masks the same ones
PASSWORD_PARAMETERS = r"(?:ssl)?password"
# As typed, a value ends at `&`, so an encoded `&` (`%26`) inside it is part of the password; inside an encoded
# URL (`%3Fpassword%3D`), `%26` is where that URL's next parameter starts.
_PASSWORD_PARAM = re.compile(
    rf"([?&]{PASSWORD_PARAMETERS}=)[^&#\s]*|((?:[?&]|%3F|%26){PASSWORD_PARAMETERS}(?:=|%3D))(?:(?!%26|&|#|\s).)*",
    re.IGNORECASE)


def mask_urls(text: str) -> str:
    """`text` with the password of every URL in it replaced by `***`: in a URL's user info, typed or
    percent-encoded (a catalog URL inside an `iceberg:` URL), or a `password=` parameter."""
    text = _URL_PASSWORD.sub(rf"\1{MASK}@", text)
    text = _ENCODED_PASSWORD.sub(rf"\1{MASK}%40", text)
    return _PASSWORD_PARAM.sub(lambda match: f"{match[1] or match[2]}{MASK}", text)


def redact(text: str, options: Mapping[str, Any] | None) -> str:
    """`text` with every storage option value in it replaced by `***`."""
    for secret in secrets_of(options):
        text = text.replace(secret, MASK)
    return text


class Redactor(logging.Filter):
    """A handler filter that masks storage option values in records (message and traceback) before they are
    written."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__()
        self.options = dict(options)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage(), self.options), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.options)
        return True

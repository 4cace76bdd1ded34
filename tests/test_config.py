"""Configuration: precedence of flags, environment and .env; secrets never printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from amplitude_export.config import load_credentials
from amplitude_export.errors import UsageError


def test_flags_win_over_environment_and_dotenv(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("AMP_API_KEY=file-key\nAMP_SECRET_KEY=file-secret\n")
    creds = load_credentials(env_file=env_file, environ={})
    assert creds.api_key == "file-key" and creds.secret_key.reveal() == "file-secret"
    creds = load_credentials(env_file=env_file, environ={"AMP_API_KEY": "env-key"})
    assert creds.api_key == "env-key" and creds.secret_key.reveal() == "file-secret"
    creds = load_credentials(api_key="flag-key", env_file=env_file, environ={"AMP_API_KEY": "env-key"})
    assert creds.api_key == "flag-key"


def test_region_picks_host_and_base_url_overrides() -> None:
    env = {"AMP_API_KEY": "k", "AMP_SECRET_KEY": "s"}
    assert load_credentials(environ=env, env_file=None).base_url == "https://amplitude.com"
    assert load_credentials(region="eu", environ=env, env_file=None).base_url == "https://analytics.eu.amplitude.com"
    custom = load_credentials(base_url="http://127.0.0.1:9/", environ=env, env_file=None)
    assert custom.base_url == "http://127.0.0.1:9"
    with pytest.raises(UsageError):
        load_credentials(region="mars", environ=env, env_file=None)
    with pytest.raises(UsageError):
        load_credentials(base_url="ftp://x", environ=env, env_file=None)


def test_missing_credentials_name_the_variables() -> None:
    with pytest.raises(UsageError, match="AMP_SECRET_KEY"):
        load_credentials(api_key="k", environ={}, env_file=None)


def test_secret_never_in_repr_or_str() -> None:
    creds = load_credentials(api_key="k", secret_key="hunter2-very-secret", environ={}, env_file=None)
    assert "hunter2" not in repr(creds)
    assert "hunter2" not in str(creds.secret_key)
    assert "hunter2" not in f"{creds}"

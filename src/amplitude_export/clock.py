"""The one clock: every "now" in the package comes from `now()`, so a test can fix time in one place.

Call it as `clock.now()` (not `from .clock import now`), so that replacing `amplitude_export.clock.now`
(pytest's `monkeypatch.setattr`) reaches every caller.
"""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> datetime:
    """The current moment, in UTC (aware)."""
    return datetime.now(UTC)

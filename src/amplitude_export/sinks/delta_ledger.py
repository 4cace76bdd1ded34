"""The ledger of a Delta destination: in the commit info of the events table's commits, cached in `_amplitude_ledger/`.

A commit of the events table carries its ledger rows (key `amplitude_export`: the project, one JSON object per
hour, and a deletion job's record where it applies one), so the log is the record of the ledger.
`_amplitude_ledger/`, a small Delta table inside the table's directory, is a cache of it (one row per project and
hour, with the `events_version` that set it; the deletion jobs and the version it folded up to in its own commit
info): an open reads it, then folds in the commits after that version, so a writer killed before rewriting it
loses nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import DeltaError, TableNotFoundError

from ..ledger import DeletionRecord, HourRecord
from .delta_tables import META, DeltaTables
from .ledger_table import record_from_row, records_table
from .staging import first_line

log = logging.getLogger(__name__)

LEDGER_DIR = "_amplitude_ledger"
META_FORMAT = 1
CACHE_EVERY = 16  # commits a writer makes before it rewrites `_amplitude_ledger` (and when it closes)
LEDGER_SCHEMA = records_table("", []).schema.append(pa.field("events_version", pa.int64()))

Cache = tuple[list[dict[str, Any]], dict[str, Any]]  # the cache's rows, and its commit info


class DeltaLedger:
    """The ledger rows and deletion jobs of the events table at `uri`, folded from its commits."""

    def __init__(self, uri: str, options: dict[str, str]) -> None:
        self.uri = uri
        self.options = options
        self.cache_uri = f"{uri.rstrip('/')}/{LEDGER_DIR}"
        self._hours: dict[str, dict[datetime, tuple[HourRecord, int]]] = {}  # record, events version
        self._deletions: dict[str, dict[date, DeletionRecord]] = {}  # the deletion jobs applied, by project
        self._folded = -1  # the events version up to which `_hours` holds every commit's ledger rows
        self._cached = -1  # the same for `_amplitude_ledger`
        self._handler: Any = None

    def read_cache(self) -> Cache:
        """The cache's ledger rows, and its commit info (the deletion jobs, the version it folded up to)."""
        try:
            cache = DeltaTable(self.cache_uri, storage_options=self.options)
        except TableNotFoundError:
            return [], {}
        return cache.to_pyarrow_table().to_pylist(), DeltaTables.payload(cache)

    def load(self, cache: Cache, table: DeltaTable) -> None:
        """Take in what `read_cache` read, then the commits of `table` after it."""
        cached, meta = cache
        for row in cached:
            version = row.pop("events_version")
            self._keep(row["project"], record_from_row(row), version)
        for project, records in meta.get("deletions", {}).items():
            for data in records:
                self._keep_deletion(project, DeletionRecord.from_dict(data))
        self._folded = max(self._folded, int(meta.get("folded", -1)))
        self._cached = self._folded  # what the cache holds, so what a rewrite of it would add
        self.fold(table)

    def projects(self) -> list[str]:
        """The projects the ledger holds hours for, sorted."""
        return sorted(project for project, hours in self._hours.items() if hours)

    def hours(self, project: str, only: Iterable[datetime] | None = None) -> dict[datetime, HourRecord]:
        """Every ledger row of `project` (or those of the hours `only`), by hour."""
        hours = self._hours.get(project, {})
        return {hour: hours[hour][0] for hour in (sorted(hours) if only is None else only) if hour in hours}

    def deletions(self, project: str) -> list[DeletionRecord]:
        """The deletion jobs applied to `project`, by day."""
        days = self._deletions.get(project, {})
        return [days[day] for day in sorted(days)]

    def _keep_deletion(self, project: str, record: DeletionRecord) -> None:
        self._deletions.setdefault(project, {})[record.day] = record

    def _keep(self, project: str, record: HourRecord, version: int) -> None:
        self._hours.setdefault(project, {})[record.hour.astimezone(UTC)] = (record, version)
        self._folded = max(self._folded, version)

    def fold(self, table: DeltaTable, project: str | None = None, records: list[HourRecord] | None = None) -> None:
        """Take in the ledger rows of the commits after `_folded`, up to the table's version, from their commit
        files (`history()` numbers versions from the loaded snapshot, so a commit landing meanwhile would be
        misnumbered); or, when the version is our commit of `records` right after `_folded`, from those."""
        latest = table.version()
        if project is not None and records is not None and latest == self._folded + 1:
            for record in records:
                self._keep(project, record, latest)
            return
        for version in range(self._folded + 1, latest + 1):
            payload = self._commit_payload(version)
            if payload is not None:
                for data in payload["ledger"]:
                    self._keep(payload["project"], HourRecord.from_dict(data), version)
                if payload.get("deletion"):
                    self._keep_deletion(payload["project"], DeletionRecord.from_dict(payload["deletion"]))
        self._folded = max(self._folded, latest)

    def _commit_payload(self, version: int) -> dict[str, Any] | None:
        import pyarrow.fs as pafs
        from deltalake.fs import DeltaStorageHandler

        if self._handler is None:
            self._handler = pafs.PyFileSystem(DeltaStorageHandler(self.uri, self.options))
        try:
            with self._handler.open_input_stream(f"_delta_log/{version:020d}.json") as stream:
                lines = stream.read().decode().splitlines()
        except FileNotFoundError:  # removed by Delta's log cleanup: older than delta.logRetentionDuration
            log.warning("%s: commit %d is gone from _delta_log; its ledger rows are lost", self.uri, version)
            return None
        infos = [json.loads(line).get("commitInfo") or {} for line in lines if line.strip()]
        return next((info[META] for info in infos if isinstance(info.get(META), dict)), None)

    def save(self, *, every: int = CACHE_EVERY, strict: bool = False) -> None:
        """Rewrite `_amplitude_ledger` as one file holding the ledger, once it lacks `every` commits (a later
        writer's rewrite simply wins: each one holds every commit up to its `events_version`). A failure is
        only logged unless `strict`: the next open folds the commits the cache lacks."""
        if self._folded - self._cached < max(every, 1):
            return
        try:
            self._write_cache()
        except (DeltaError, OSError) as exc:
            if strict:
                raise
            log.warning("%s: could not update %s: %s", self.uri, LEDGER_DIR, first_line(exc))

    def _write_cache(self) -> None:
        parts = [LEDGER_SCHEMA.empty_table()]
        for project, hours in self._hours.items():
            table = records_table(project, [record for record, _ in hours.values()])
            versions = [hours[hour.astimezone(UTC)][1] for hour in table.column("hour").to_pylist()]
            parts.append(table.append_column("events_version", pa.array(versions, pa.int64())))
        deletions = {project: [record.to_dict() for _, record in sorted(days.items())]
                     for project, days in self._deletions.items()}
        info = {"format": META_FORMAT, "folded": self._folded, "deletions": deletions}
        write_deltalake(self.cache_uri, pa.concat_tables(parts), mode="overwrite", storage_options=self.options,
                        commit_properties=CommitProperties(custom_metadata={META: info}))
        self._cached = self._folded


def commit_properties(project: str, records: list[HourRecord], retries: int | None = None,
                      deletion: DeletionRecord | None = None) -> CommitProperties:
    """The commit info that carries `records` (and a deletion job's `deletion`) in an events table's commit."""
    payload: dict[str, Any] = {"format": META_FORMAT, "project": project, "ledger": [r.to_dict() for r in records]}
    if deletion is not None:
        payload["deletion"] = deletion.to_dict()
    return CommitProperties(custom_metadata={META: payload}, max_commit_retries=retries)

"""How one window's rows reach PostgreSQL's `events`, inside the window's transaction.

Rows go by binary COPY (`postgres_copy`) straight into `events`, a chunk at a time under a savepoint; a chunk that
meets a uuid stored under another hour or project is rolled back and its rows go to a temporary stage instead,
merged with `ON CONFLICT (uuid) DO NOTHING` (the stored row wins). See docs/POSTGRES.md.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import psycopg
import pyarrow as pa
from psycopg import sql
from psycopg.copy import QueuedLibpqWriter

from ..schema import COLUMN_NAMES
from ..windows import Window
from .postgres_copy import COPY_SIGNATURE, encode_binary
from .staging import FirstCopies, StagedCounts, count_hours

STAGE = "_amplitude_stage"
# A window's rows go straight into `events`, a chunk at a time, each chunk under a savepoint: a chunk that meets a
# uuid stored under another hour is rolled back and re-sent to the stage, so the chunk size bounds what a conflict
# wastes and the rows held for re-sending. Past 64 subtransactions other sessions' snapshots get slower, so a
# window opens fewer; after a few conflicts the rest of the window goes to the stage directly.
CHUNK_BYTES = 64 << 20
MAX_SAVEPOINTS = 48
MAX_CONFLICTS = 2


class WindowLoad:
    """Sends one window's rows to the server inside the window's transaction (the caller deletes its hours first).

    Rows go by binary COPY straight into `events`, `chunk_bytes` of encoded rows at a time, each chunk under a
    savepoint, so the rows need no second pass through a stage. That is safe because `first` drops the window's
    repeated uuids before they are sent, and the rows the window's reload deleted no longer conflict. A uuid
    stored under another hour or project still makes the COPY fail (UNIQUE): the chunk is rolled back to its
    savepoint and its rows (held until the chunk commits) are sent to the stage, which `merge` merges with
    `ON CONFLICT (uuid) DO NOTHING`, so the stored row wins as before. Once `first` overflows, rows pass with
    their repeats: from then on all go to the stage, where the merge keeps the first copy of each uuid by `_seq`
    (every earlier row, in `events` already, wins over a later one by the conflict).
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        events: sql.Identifier,
        window: Window,
        first: FirstCopies,
        chunk_bytes: int,
        jsonb: frozenset[str] = frozenset(),
    ) -> None:
        self.conn = conn
        self.events = events
        self.first = first
        self.chunk_bytes = chunk_bytes
        self.jsonb = jsonb  # the JSON columns `events` types `jsonb` (`encode_binary`)
        self.counts = StagedCounts(window)  # rows per upload hour the batches held; refuses rows outside
        self.inserted: dict[datetime, int] = {}  # rows per upload hour that went into `events`
        self.route: Counter[str] = Counter()  # rows sent "direct" and to the "stage"; chunks that "conflicted"
        self.stage_rows = 0
        self._savepoints = 0
        self._stage_made = False

    @property
    def staged(self) -> dict[datetime, int]:
        """Rows per upload hour the batches held, before repeats were dropped."""
        return self.counts.staged

    def send(self, batches: Iterable[pa.RecordBatch]) -> None:
        parts = self._parts(batches)
        pending = next(parts, None)
        while pending is not None:
            direct = self.route["conflicted"] < MAX_CONFLICTS and self._savepoints < MAX_SAVEPOINTS
            if not direct or self.first.overflowed:
                self._to_stage(itertools.chain([pending], parts))
                return
            pending = self._chunk(pending, parts)

    def _parts(self, batches: Iterable[pa.RecordBatch]) -> Iterator[tuple[pa.RecordBatch, int]]:
        """Each batch without the repeats `first` drops, and the `_seq` of its first row (arrival order)."""
        seq = 0
        for batch in batches:
            if batch.num_rows == 0:
                continue
            self.counts.add(batch)
            part = self.first.filter(batch)
            if part.num_rows:
                yield part, seq
                seq += part.num_rows

    def _copy(self, table: sql.Composable, numbered: bool) -> Any:
        columns = (*COLUMN_NAMES, "_seq") if numbered else COLUMN_NAMES
        statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(
            table, sql.SQL(", ").join(map(sql.Identifier, columns))
        )
        cursor = self.conn.cursor()
        # a queue and a thread send to the server while the next batch is encoded: the two overlap on two cores
        return cursor.copy(statement, writer=QueuedLibpqWriter(cursor))

    def _chunk(
        self, first_part: tuple[pa.RecordBatch, int], parts: Iterator[tuple[pa.RecordBatch, int]]
    ) -> tuple[pa.RecordBatch, int] | None:
        """COPY parts into `events` under a savepoint until `chunk_bytes`; the part that starts the next chunk."""
        held = [first_part]  # re-sent to the stage if the chunk conflicts
        following = None
        self._savepoints += 1
        try:
            with self.conn.transaction(), self._copy(self.events, numbered=False) as copy:
                copy.write(COPY_SIGNATURE)
                size = 0
                for index, (part, seq) in enumerate(itertools.chain([first_part], parts)):
                    if index and (self.first.overflowed or size >= self.chunk_bytes):
                        following = (part, seq)
                        break
                    if index:
                        held.append((part, seq))
                    data = encode_binary(part, None, self.jsonb)
                    copy.write(data)
                    size += data.size
        except psycopg.errors.UniqueViolation:
            self.route["conflicted"] += 1
            self._to_stage(held)
            return following
        for part, _ in held:
            self.route["direct"] += part.num_rows
            count_hours(part, self.inserted)
        return following

    def _to_stage(self, parts: Iterable[tuple[pa.RecordBatch, int]]) -> None:
        stage = sql.Identifier(STAGE)
        if not self._stage_made:
            self.conn.execute(
                sql.SQL("CREATE TEMP TABLE {} (LIKE {}, _seq bigint) ON COMMIT DROP").format(stage, self.events)
            )
            self._stage_made = True
        with self._copy(stage, numbered=True) as copy:
            copy.write(COPY_SIGNATURE)
            for part, seq in parts:
                copy.write(encode_binary(part, seq, self.jsonb))
                self.route["stage"] += part.num_rows
                self.stage_rows += part.num_rows

    def merge(self) -> None:
        """Move the staged rows whose uuid `events` lacks into `events`, counting them into `inserted`.

        The stage holds each uuid once unless the window had more uuids than `first` keeps (it overflowed): only
        then is the stage sorted to pick the first copies (a sort of the whole window).
        """
        if not self.stage_rows:
            return
        columns = sql.SQL(", ").join(map(sql.Identifier, COLUMN_NAMES))
        # NULL uuids are one group to DISTINCT ON: give each its own, as each is an event
        first_copies = sql.SQL(
            " DISTINCT ON (uuid, CASE WHEN uuid IS NULL THEN _seq END) {columns} FROM {stage}"
            " ORDER BY uuid, CASE WHEN uuid IS NULL THEN _seq END, _seq"
        )
        source = (first_copies if self.first.overflowed else sql.SQL(" {columns} FROM {stage}")).format(
            columns=columns, stage=sql.Identifier(STAGE)
        )
        statement = sql.SQL(
            "WITH inserted AS ("
            " INSERT INTO {events} ({columns}) SELECT{source}"
            " ON CONFLICT (uuid) DO NOTHING RETURNING _upload_hour)"
            " SELECT _upload_hour, count(*) FROM inserted GROUP BY _upload_hour"
        ).format(events=self.events, columns=columns, source=source)
        for hour, count in self.conn.execute(statement).fetchall():
            self.inserted[hour] = self.inserted.get(hour, 0) + count

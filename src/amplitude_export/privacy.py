"""PII controls and deleted users, applied to a window's Arrow batches before a sink sees them.

`Privacy` is what a load does to every batch on its way to the destination, in this order:

1. rows of deleted users (the `amplitude_id`s the destination's deletions ledger holds, `deletions.py`) are left
   out, so a window reloaded later (a lookback, `--refresh`) never brings them back;
2. excluded columns (`--exclude-columns ip_address,location_lat`) become NULL: the table keeps its shape;
3. hashed columns (`--hash-columns user_id,device_id`) hold HMAC-SHA256(`AMP_HASH_KEY`, value) as 64 lowercase
   hex digits, the same for the same value and key in every run, so joins still work;
4. a target may be a key inside a JSON column (`user_properties.email`, `event_properties.card.last4`): the key
   is removed, or its value replaced by the hash of its text (a JSON string's own text, else its JSON text).

A top-level column also covers its key in `_extra`, where the reader keeps a value that did not fit the column's
type. Rejected lines (`rejects/`) are redacted the same way in Python (they are few); a line that does not read
as a JSON object cannot be redacted and its text is withheld. A reject of a deleted user is dropped.

The transform is vectorised: pyarrow.compute for masks and NULL columns, an in-memory DuckDB for what Arrow has
no kernel for (SHA-256 and JSON paths), one query per batch over the columns concerned; no Python runs per
row. HMAC is built from DuckDB's `sha256` as RFC 2104 does it (`sha256(k^opad || sha256(k^ipad || m))`), with the
padded key passed as a query parameter so it never appears in SQL text or an error message; a test holds it
equal to Python's `hmac`. DuckDB rewrites a JSON value it edits: same values, the edited key last.
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from .errors import UsageError
from .schema import ALL_COLUMNS, JSON, PROVENANCE_COLUMNS, STRING

log = logging.getLogger(__name__)

HASH_KEY_ENV = "AMP_HASH_KEY"
SHORT_KEY = 16  # bytes; a shorter key is accepted with a warning (HMAC's strength is the key's)
# Columns exactly-once and provenance rest on: never excluded or hashed.
PROTECTED = frozenset({"uuid"} | {c.name for c in PROVENANCE_COLUMNS if c.name != "_extra"})
_BY_NAME = {c.name: c for c in ALL_COLUMNS}
_BY_SOURCE = {c.source: c for c in ALL_COLUMNS if c.source}
_BLOCK = 64  # SHA-256's block size, for the HMAC pads
_WITHHELD = ("the line does not read as a JSON object, so --exclude-columns/--hash-columns could not be applied "
             "to it: its text is withheld")
_AMPLITUDE_ID = re.compile(r'"amplitude_id"\s*:\s*"?(-?\d+)')


@dataclass(frozen=True)
class Target:
    """A column of `events`, or a key path inside one of its JSON columns (`user_properties.email`)."""

    column: str
    keys: tuple[str, ...] = ()

    def __str__(self) -> str:
        return ".".join((self.column, *self.keys))


def parse_targets(option: str, text: str | None) -> list[Target]:
    """`a,b.c,...` as targets; an unknown column, a key of a column that is not JSON, or a protected column is a
    UsageError naming `option`."""
    targets: list[Target] = []
    for item in (part.strip() for part in (text or "").split(",")):
        if not item:
            continue
        name, *keys = item.split(".")
        column = _BY_NAME.get(name) or _BY_SOURCE.get(name)
        if column is None:
            near = difflib.get_close_matches(name, list(_BY_NAME), n=1)
            hint = f" (did you mean {near[0]}?)" if near else " (the columns of `events` are in docs/SCHEMA.md)"
            raise UsageError(f"{option}: unknown column {name!r}{hint}")
        if column.name in PROTECTED:
            raise UsageError(f"{option}: {column.name} cannot be left out or hashed: exactly-once loading and the "
                             "ledger rest on it")
        if keys and column.kind != JSON:
            raise UsageError(f"{option}: {item!r}: {column.name} is not a JSON column, so it has no keys")
        if any(not key or '"' in key for key in keys):
            raise UsageError(f"{option}: {item!r}: a key path is keys joined by dots, without quotes")
        target = Target(column.name, tuple(keys))
        if target not in targets:
            targets.append(target)
    return targets


def read_hash_key(environ: dict[str, str] | None = None, env_file: Path | None = Path(".env")) -> bytes:
    """`AMP_HASH_KEY` from the environment, else `.env`; missing or empty is a UsageError."""
    env = os.environ if environ is None else environ
    value = env.get(HASH_KEY_ENV)
    if not value:
        from .config import read_env_file

        value = read_env_file(env_file).get(HASH_KEY_ENV)
    if not value:
        raise UsageError(f"--hash-columns needs a key: set {HASH_KEY_ENV} (the same key in every run keeps hashed "
                         "values joinable)")
    return value.encode()


def hash_text(key: bytes, text: str) -> str:
    """HMAC-SHA256(key, text as UTF-8) as 64 lowercase hex digits: what a hashed value becomes."""
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def _pads(key: bytes) -> tuple[bytes, bytes]:
    """RFC 2104's inner and outer padded keys."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


def _path(keys: tuple[str, ...]) -> str:
    return "$" + "".join(f'."{key}"' for key in keys)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _patch(keys: tuple[str, ...], value: str) -> str:
    """A JSON merge patch setting `keys` to `value` (NULL removes the key)."""
    for key in reversed(keys):
        value = f"json_object({_literal(key)}, {value})"
    return value


_HMAC_SQL = "sha256($outer || unhex(sha256($inner || encode({value}))))"


class Privacy:
    """What loads do to every batch and reject: see the module. Build it with `from_options` (the CLI's flags)
    or directly; `with_deleted` adds the users a destination's deletions ledger holds."""

    def __init__(self, *, exclude: Iterable[Target] = (), hash: Iterable[Target] = (), key: bytes | None = None,
                 deleted: Iterable[int] = ()) -> None:
        self.exclude = list(exclude)
        self.hash = list(hash)
        both = sorted(str(t) for t in set(self.exclude) & set(self.hash))
        if both:
            raise UsageError(f"{', '.join(both)}: both in --exclude-columns and --hash-columns; choose one")
        for target in self.hash:
            kind = _BY_NAME[target.column].kind
            if not target.keys and kind != STRING:
                raise UsageError(f"--hash-columns: {target.column} holds {kind} values, not text: only text columns "
                                 "and keys inside JSON columns can be hashed (use --exclude-columns)")
        if self.hash and not key:
            raise UsageError(f"--hash-columns needs a key: set {HASH_KEY_ENV}")
        self._key = key
        self._pads = _pads(key) if key else None
        self.deleted = frozenset(int(i) for i in deleted)
        self._deleted = pa.array(sorted(self.deleted), pa.int64())
        self._con: Any = None
        self._null_columns = [t.column for t in self.exclude if not t.keys]
        self._sql_columns = self._plan()
        self._queries: dict[tuple[str, ...], str] = {}

    @classmethod
    def from_options(cls, exclude_columns: str | None, hash_columns: str | None,
                     environ: dict[str, str] | None = None, env_file: Path | None = Path(".env"),
                     warn: bool = True) -> Privacy:
        """The CLI's --exclude-columns and --hash-columns (comma-separated), the key from `AMP_HASH_KEY`; `warn`
        of a short key."""
        exclude = parse_targets("--exclude-columns", exclude_columns)
        hashed = parse_targets("--hash-columns", hash_columns)
        key = read_hash_key(environ, env_file) if hashed else None
        if warn and key is not None and len(key) < SHORT_KEY:
            log.warning("%s is shorter than %d bytes: hashed values are only as hard to reverse as the key is to "
                        "guess", HASH_KEY_ENV, SHORT_KEY)
        return cls(exclude=exclude, hash=hashed, key=key)

    def with_deleted(self, amplitude_ids: Iterable[int]) -> Privacy:
        """The same controls, also leaving out the rows of `amplitude_ids`."""
        return Privacy(exclude=self.exclude, hash=self.hash, key=self._key, deleted=self.deleted | set(amplitude_ids))

    def __repr__(self) -> str:  # never the key
        return (f"Privacy(exclude={[str(t) for t in self.exclude]}, hash={[str(t) for t in self.hash]}, "
                f"deleted={len(self.deleted)} users)")

    @property
    def pii(self) -> bool:
        """Whether any column or key is excluded or hashed (raw archives then hold values the destination lacks)."""
        return bool(self.exclude or self.hash)

    @property
    def active(self) -> bool:
        """Whether batches are changed at all."""
        return self.pii or bool(self.deleted)

    def describe(self) -> str:
        """One line for the log: what is left out and hashed (never the key)."""
        parts = []
        if self.exclude:
            parts.append("excluded: " + ", ".join(map(str, self.exclude)))
        if self.hash:
            parts.append("hashed (HMAC-SHA256): " + ", ".join(map(str, self.hash)))
        if self.deleted:
            parts.append(f"rows of {len(self.deleted):,} deleted users left out")
        return "; ".join(parts) or "no privacy controls"

    # -- batches ---------------------------------------------------------------------------------------------

    def apply(self, batches: Iterable[pa.RecordBatch]) -> Applied:
        """`batches` transformed one by one, lazily; the result counts the deleted users' rows it left out."""
        return Applied(self, batches)

    def transform(self, batch: pa.RecordBatch) -> tuple[pa.RecordBatch, int]:
        """One batch transformed, and how many rows of deleted users it left out."""
        dropped = 0
        if self.deleted and batch.num_rows:
            drop = self._deleted_rows(batch)
            if drop is not None:
                dropped = pc.sum(drop).as_py() or 0
                if dropped:
                    batch = batch.filter(pc.invert(drop))
        if not self.pii or not batch.num_rows:
            return batch, dropped
        columns = batch.columns
        for name in self._null_columns:
            index = batch.schema.get_field_index(name)
            columns[index] = pa.nulls(batch.num_rows, batch.schema.field(index).type)
        if self._sql_columns:
            for name, values in self._rewrite(batch).items():
                columns[batch.schema.get_field_index(name)] = values
        return pa.RecordBatch.from_arrays(columns, schema=batch.schema), dropped

    def _plan(self) -> dict[str, list[tuple[tuple[str, ...], bool]]]:
        """Per column rewritten in SQL: its edits, as (key path or () for the column itself, hashed?)."""
        edits: dict[str, list[tuple[tuple[str, ...], bool]]] = {}
        for target, hashed in [(t, False) for t in self.exclude] + [(t, True) for t in self.hash]:
            if target.keys or hashed:
                edits.setdefault(target.column, []).append((target.keys, hashed))
            if not target.keys and target.column != "_extra":
                # the value the reader kept in _extra, under the export's own key, when it did not fit the column
                edits.setdefault("_extra", []).append(((_BY_NAME[target.column].source,), hashed))
        if any(t.column == "_extra" and not t.keys for t in self.exclude):
            edits.pop("_extra", None)  # the whole column goes
        return edits

    def _connection(self) -> Any:
        if self._con is None:
            import duckdb

            self._con = duckdb.connect(":memory:", config={"threads": 1})
        return self._con

    def _query(self, names_present: tuple[str, ...]) -> str:
        """One SQL query over `_amplitude_values(v0, v1, ...)`, one column per rewritten column present, giving
        the rewritten `v0, v1, ...`: one nested SELECT per edit, so each refers to the last result by name (one
        expression per column would repeat the value for each edit, exponentially). One query per batch, not
        one per column: each costs about a millisecond before any row is touched."""
        if names_present in self._queries:
            return self._queries[names_present]
        columns = [(column, self._sql_columns[column]) for column in names_present]
        names = [f"v{n}" for n in range(len(columns))]
        sql = "SELECT * FROM _amplitude_values"
        for step in range(max(len(edits) for _, edits in columns)):
            extracts, values = [], []
            for name, (_column, edits) in zip(names, columns, strict=True):
                extracts.append(name)
                values.append(f"{self._sql_edit(name, edits[step])} AS {name}" if step < len(edits) else name)
                if step < len(edits) and edits[step][0] and edits[step][1]:  # a hashed key: its text, once
                    extracts.append(f"json_extract_string({name}, {_literal(_path(edits[step][0]))}) AS x{name}")
            sql = f"SELECT {', '.join(values)} FROM (SELECT {', '.join(extracts)} FROM ({sql}))"
        # the reader's `_extra` is NULL, not {}, when nothing is left in it
        sql = "SELECT " + ", ".join(f"NULLIF({name}, '{{}}') AS {name}" if column == "_extra" else name
                                    for name, (column, _) in zip(names, columns, strict=True)) + f" FROM ({sql})"
        self._queries[names_present] = sql
        return sql

    @staticmethod
    def _sql_edit(name: str, edit: tuple[tuple[str, ...], bool]) -> str:
        keys, hashed = edit
        if not keys:  # a text column, hashed whole
            return _HMAC_SQL.format(value=name)
        if hashed:  # JSON null and a missing key extract as NULL: left as they are
            digest = _HMAC_SQL.format(value=f"x{name}")
            return (f"CASE WHEN x{name} IS NULL THEN {name} "
                    f"ELSE json_merge_patch({name}, {_patch(keys, digest)})::VARCHAR END")
        path = _literal(_path(keys))
        return (f"CASE WHEN json_exists({name}, {path}) "
                f"THEN json_merge_patch({name}, {_patch(keys, 'NULL')})::VARCHAR ELSE {name} END")

    def _rewrite(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        """The columns rewritten in SQL. Each distinct value is computed once (a batch repeats a user's ids and
        properties): each column is dictionary-encoded, the dictionaries (padded with NULLs to one length)
        rewritten in one query, and the rows taken back."""
        encoded = {column: pc.dictionary_encode(batch.column(column)) for column in self._sql_columns
                   if batch.column(column).null_count < batch.num_rows}  # `_extra` is mostly NULL
        if not encoded:
            return {}
        longest = max(len(e.dictionary) for e in encoded.values())
        table = pa.table({f"v{n}": pa.concat_arrays([e.dictionary, pa.nulls(longest - len(e.dictionary), pa.string())])
                          for n, e in enumerate(encoded.values())})
        con = self._connection()
        con.register("_amplitude_values", table)
        try:
            sql = self._query(tuple(encoded))
            params = {"inner": self._pads[0], "outer": self._pads[1]} if "$inner" in sql and self._pads else None
            result = con.sql(sql, params=params).to_arrow_table()
        finally:
            con.unregister("_amplitude_values")
        return {column: pc.take(result.column(n).combine_chunks().slice(0, len(e.dictionary)).cast(pa.string()),
                                e.indices)
                for n, (column, e) in enumerate(encoded.items())}

    def _deleted_rows(self, batch: pa.RecordBatch) -> pa.Array | None:
        """A mask of the rows whose amplitude_id (or the one `_extra` kept, as text) is a deleted user's."""
        ids = batch.column("amplitude_id")
        drop = pc.fill_null(pc.is_in(ids, value_set=self._deleted), False)
        extra = batch.column("_extra")
        kept = pc.and_(ids.is_null(), extra.is_valid())
        if pc.any(kept).as_py():
            texts = extra.filter(kept)
            con = self._connection()
            con.register("_amplitude_values", pa.table({"e": texts}))
            try:
                found = con.sql("SELECT TRY_CAST(json_extract_string(e, '$.amplitude_id') AS BIGINT) AS id "
                                    "FROM _amplitude_values").to_arrow_table().column("id").combine_chunks()
            finally:
                con.unregister("_amplitude_values")
            # `drop` is False wherever `kept` is True (no amplitude_id there): only those places change
            drop = pc.replace_with_mask(drop, kept, pc.fill_null(pc.is_in(found, value_set=self._deleted), False))
        return drop if pc.any(drop).as_py() else None

    # -- rejects ---------------------------------------------------------------------------------------------

    def reject(self, reject: dict[str, Any]) -> dict[str, Any] | None:
        """A rejected line's record as the rejects file may hold it: None for a deleted user's line; with PII
        controls, its text redacted (parsed as a JSON object) or else withheld."""
        text = reject.get("text")
        if self.deleted and isinstance(text, str) and mentions(text, self.deleted):
            return None
        if not self.pii or not isinstance(text, str):
            return reject
        try:
            line = msgspec.json.decode(text)
        except (msgspec.DecodeError, RecursionError):
            line = None
        if not isinstance(line, dict):
            return {**reject, "text": None, "withheld": _WITHHELD}
        for target, hashed in [(t, False) for t in self.exclude] + [(t, True) for t in self.hash]:
            self._redact(line, target, hashed)
        return {**reject, "text": msgspec.json.encode(line).decode()}

    def _redact(self, line: dict[str, Any], target: Target, hashed: bool) -> None:
        if target.column == "_extra":  # unknown keys sit at the line's top level
            unknown = [key for key in line if key not in _BY_SOURCE] if not target.keys else [target.keys[0]]
            for key in unknown:
                self._edit(line, (key, *target.keys[1:]), hashed)
            return
        self._edit(line, (_BY_NAME[target.column].source, *target.keys), hashed)

    def _edit(self, node: Any, keys: tuple[str, ...], hashed: bool) -> None:
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or keys[-1] not in node:
            return
        if not hashed:
            del node[keys[-1]]
        elif node[keys[-1]] is not None:
            value = node[keys[-1]]
            text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
            assert self._key is not None
            node[keys[-1]] = hash_text(self._key, text)


class Applied:
    """Batches on their way through `Privacy.transform`; `deleted_rows` counts the deleted users' rows left out."""

    def __init__(self, privacy: Privacy, batches: Iterable[pa.RecordBatch]) -> None:
        self.privacy = privacy
        self._batches = batches
        self.deleted_rows = 0

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        for batch in self._batches:
            batch, dropped = self.privacy.transform(batch)
            self.deleted_rows += dropped
            if batch.num_rows:
                yield batch


def mentions(text: str, amplitude_ids: frozenset[int] | set[int]) -> bool:
    """Whether `text` (a line of an export) holds an `amplitude_id` among `amplitude_ids`."""
    return any(int(found) in amplitude_ids for found in _AMPLITUDE_ID.findall(text))

"""Where an Iceberg destination lives: the `iceberg:` URL, its catalog, and the `events` table in it.

    iceberg:DIR                                   local warehouse DIR, SQLite catalog DIR/catalog.db
    iceberg:DIR?catalog=postgresql://me@host/db   local warehouse, SQL catalog in PostgreSQL
    iceberg:s3://bucket/wh?catalog=sqlite:////abs/catalog.db     warehouse on an object store, SQL catalog
    iceberg:https://catalog.example/api?warehouse=NAME            a REST catalog (Polaris, Nessie, Glue, Unity...)
    iceberg:?catalog=NAME                         a catalog named in pyiceberg's own configuration

`namespace=` (default `amplitude`) and `table=` (default `events`) name the table. Storage options (the CLI's
`--storage-option`) are pyiceberg catalog properties (`s3.endpoint`, `credential`, ...); the fsspec names that
`parquet:` URLs take for S3 (`endpoint_url`, `key`, `secret`, `region`) are translated. See docs/ICEBERG.md.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import duckdb
import pyarrow as pa

from ..errors import DestinationError, UsageError
from ..schema import ALL_COLUMNS, BOOLEAN, FLOAT, INTEGER, JSON, STRING, TIMESTAMP
from ..storage import mask_urls
from .maintenance import lost_file_hint
from .staging import foreign_entries, foreign_message

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.schema import Schema
    from pyiceberg.table import Table

INSTALL = "pip install 'amplitude-export[iceberg]'"
CATALOG_NAME = "amplitude_export"  # the name pyiceberg's environment configuration can refine
NAMESPACE = "amplitude"
TABLE = "events"
PARTITION = "server_upload_day"
PARTITION_FIELD_ID = 1000
MARKER = "amplitude-export.table"  # a table property: this table was made by amplitude-export (format 1)
TABLE_PROPERTIES = {
    "format-version": "2",  # the version every engine in docs/ICEBERG.md reads
    MARKER: "1",
    "write.parquet.compression-codec": "zstd",
    # each commit writes a new metadata file; keep the last 100 and delete older ones, as other engines would
    "write.metadata.delete-after-commit.enabled": "true",
}
OBJECT_STORES = ("s3", "s3a", "s3n", "gs", "gcs", "abfs", "abfss", "wasb", "wasbs", "oss", "hdfs", "viewfs", "hf")
# fsspec's names for S3 options (what `parquet:` URLs take) and pyiceberg's for the same
FSSPEC_NAMES = {"endpoint_url": "s3.endpoint", "key": "s3.access-key-id", "secret": "s3.secret-access-key",
                "region": "s3.region", "region_name": "s3.region"}
CREATE_ATTEMPTS = 4


def require_pyiceberg() -> None:
    """Raise the one-line UsageError naming the extra when pyiceberg (or its SQL catalog's SQLAlchemy) is missing."""
    try:
        import pyiceberg.catalog.sql  # noqa: F401
        import pyiceberg.io.pyarrow  # noqa: F401
    except ImportError:
        raise UsageError(f"Iceberg destinations need pyiceberg: {INSTALL}") from None


def masked(text: str) -> str:
    """`text` with the password of any URL in it replaced by `***`, typed or percent-encoded."""
    return mask_urls(text)


@dataclass
class Location:
    """An `iceberg:` URL taken apart: the catalog's properties, and the table's namespace and name."""

    label: str  # the URL without passwords, for messages
    catalog_name: str
    properties: dict[str, str] = field(default_factory=dict)
    namespace: str = NAMESPACE
    table: str = TABLE
    sqlite: Path | None = None  # the SQLite catalog file, when the catalog is one

    @property
    def identifier(self) -> tuple[str, str]:
        """(namespace, table)."""
        return (self.namespace, self.table)


def parse(rest: str, storage_options: dict[str, Any] | None = None) -> Location:
    """The Location that `iceberg:REST` names; a UsageError for what cannot be one."""
    where, _, query = rest.partition("?")
    try:
        options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError:
        raise UsageError(f"iceberg:{masked(rest)}: cannot read the options after '?' (KEY=VALUE&...)") from None
    unknown = set(options) - {"catalog", "namespace", "table", "warehouse"}
    if unknown:
        raise UsageError(f"iceberg:{masked(rest)}: unknown option {sorted(unknown)[0]!r}: use catalog=, warehouse=, "
                         "namespace= or table=")
    location = Location(f"iceberg:{masked(rest)}", CATALOG_NAME, properties=_catalog_properties(storage_options))
    for key in ("namespace", "table"):
        if key in options and not options[key].strip():
            raise UsageError(f"iceberg:{masked(rest)}: {key}= is empty: name one, or leave it out for the default")
    if "." in options.get("table", ""):
        raise UsageError(f"iceberg:{masked(rest)}: table={options['table']!r} holds a '.', which engines read as a "
                         "namespace: name the namespace with namespace=")
    location.namespace = options.get("namespace") or NAMESPACE
    location.table = options.get("table") or TABLE
    catalog = options.get("catalog", "")
    scheme = where.partition("://")[0].lower() if "://" in where else ""
    if scheme in ("http", "https"):
        location.properties.update(type="rest", uri=where)
        if options.get("warehouse"):
            location.properties["warehouse"] = options["warehouse"]
        return location
    if catalog and "://" not in catalog:  # a catalog named in ~/.pyiceberg.yaml or PYICEBERG_CATALOG__NAME__*
        location.catalog_name = catalog
        if where:
            location.properties["warehouse"] = where
        return location
    if not where:
        raise UsageError(f"iceberg:{masked(rest)}: name a warehouse directory or URL, a REST catalog URL, or "
                         "?catalog=NAME of a configured catalog")
    if scheme in ("", "file"):
        warehouse = Path(where.removeprefix("file://")).expanduser().absolute()
        if "#" in str(warehouse):
            raise UsageError(f"iceberg:{masked(rest)}: pyiceberg reads a '#' in a file path as the start of a URL "
                             "fragment and would write elsewhere: choose a directory without '#'")
        location.properties["warehouse"] = file_uri(warehouse)
        if not catalog:
            location.sqlite = warehouse / "catalog.db"
            catalog = f"sqlite:///{location.sqlite}"
    elif scheme in OBJECT_STORES:
        location.properties["warehouse"] = where
        if not catalog:
            raise UsageError(f"iceberg:{masked(rest)}: a warehouse on {scheme}:// needs a catalog: add "
                             "?catalog=sqlite:////PATH/catalog.db, ?catalog=postgresql://... or a REST catalog URL")
    else:
        raise UsageError(f"iceberg:{masked(rest)}: cannot tell a warehouse from {scheme}:// (use a directory, an "
                         "object store URL such as s3://bucket/prefix, or a REST catalog's http(s) URL)")
    _set_catalog(location, catalog, rest)
    return location


def _set_catalog(location: Location, catalog: str, rest: str) -> None:
    scheme = catalog.partition("://")[0].lower()
    if scheme in ("http", "https"):
        location.properties.update(type="rest", uri=catalog)
    elif scheme.startswith("sqlite"):
        location.properties.update(type="sql", uri=catalog)
        path = catalog.partition(":///")[2]
        location.sqlite = Path(path) if path and path != ":memory:" else None
    elif scheme.startswith(("postgresql", "postgres")):
        driver = "postgresql+psycopg" if scheme in ("postgresql", "postgres") else scheme
        location.properties.update(type="sql", uri=f"{driver}://{catalog.partition('://')[2]}")
    else:
        raise UsageError(f"iceberg:{masked(rest)}: catalog={masked(catalog)} is not sqlite:///PATH, "
                         "postgresql://..., an http(s) REST catalog URL or a configured catalog's name")


def _catalog_properties(storage_options: dict[str, Any] | None) -> dict[str, str]:
    """Storage options as pyiceberg catalog properties (strings), fsspec's S3 names translated; the S3 endpoint
    and region from the environment variables the AWS tools read, where the options give none (pyiceberg's
    pyarrow FileIO reads the keys from the environment itself, but neither of these: without a region it asks
    AWS where the bucket is)."""
    properties: dict[str, str] = {}
    for name, variables in (("s3.endpoint", ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")),
                            ("s3.region", ("AWS_REGION", "AWS_DEFAULT_REGION"))):
        value = next((os.environ[v] for v in variables if os.environ.get(v)), None)
        if value:
            properties[name] = value
    for key, value in (storage_options or {}).items():
        if key == "client_kwargs" and isinstance(value, dict):
            properties.update(_catalog_properties(value))
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        properties[FSSPEC_NAMES.get(key, key)] = str(value)
    return properties


def file_uri(path: Path) -> str:
    """A local warehouse's URI. Not `Path.as_uri()`: pyiceberg's file IO takes the path of a file URI as it
    stands, without percent-decoding, so `my%20wh` would be a directory beside `my wh` holding its tables (and
    no encoding of a `#` reaches the directory, hence the caller's refusal)."""
    return "file://" + path.as_posix()


def load(location: Location, *, create: bool) -> Catalog:
    """The catalog, created (SQLite file and warehouse directory) only when `create`."""
    require_pyiceberg()
    from pyiceberg.catalog import load_catalog
    from pyiceberg.exceptions import NoSuchPropertyException

    if location.sqlite is not None:
        if create:
            own = location.properties.get("warehouse") == file_uri(location.sqlite.parent)  # the warehouse's catalog
            if own and not location.sqlite.is_file():
                _check_empty(location.sqlite.parent, location)
            _mkdir(location.sqlite.parent, location)
        elif not location.sqlite.is_file():
            raise DestinationError(f"{location.label}: no Iceberg catalog at {location.sqlite}")
    warehouse = location.properties.get("warehouse", "")
    if create and warehouse.startswith("file://"):
        _mkdir(Path(warehouse.removeprefix("file://")), location)
    try:
        return load_catalog(location.catalog_name, **location.properties)
    except ImportError as exc:
        raise UsageError(f"{location.label}: the catalog needs {exc.name or exc}: {_install_for(exc)}") from None
    except (ValueError, NoSuchPropertyException) as exc:
        raise UsageError(f"{location.label}: {_first_line(exc)}") from None


def _install_for(exc: ImportError) -> str:
    name = (exc.name or "").lower()
    if name.startswith("psycopg"):
        return "pip install 'amplitude-export[iceberg,postgres]'"
    return INSTALL


def _check_empty(path: Path, location: Location) -> None:
    """Refuse to make a warehouse where other files are: its `maintain` deletes the files no snapshot needs."""
    # another first run may be creating the same catalog at this moment (its journal is `catalog.db-journal`)
    if path.is_dir() and (others := foreign_entries((p.name for p in path.iterdir()), prefixes=("catalog.db",))):
        raise DestinationError(foreign_message(f"{location.label}: {path}", others, "Iceberg catalog (catalog.db)",
                                               "a new warehouse needs an empty or new directory"))


def _mkdir(path: Path, location: Location) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DestinationError(f"cannot create {path} for {location.label}: {exc.strerror or exc}") from None


ICEBERG_KINDS = {STRING: "string", INTEGER: "long", FLOAT: "double", BOOLEAN: "boolean", TIMESTAMP: "timestamptz",
                 JSON: "string"}


def events_schema() -> Schema:
    """The `events` columns as an Iceberg schema: field ids 1..n in `schema.ALL_COLUMNS` order, all optional."""
    from pyiceberg.schema import Schema
    from pyiceberg.types import BooleanType, DoubleType, LongType, NestedField, StringType, TimestamptzType

    types = {"string": StringType(), "long": LongType(), "double": DoubleType(), "boolean": BooleanType(),
             "timestamptz": TimestamptzType()}
    return Schema(*[NestedField(n, c.name, types[ICEBERG_KINDS[c.kind]], required=False)
                    for n, c in enumerate(ALL_COLUMNS, start=1)])


def open_events(location: Location, *, create: bool) -> tuple[Catalog, Table]:
    """The catalog and its events table (`load`, `open_table`), both created when missing and `create`.

    Two first runs at once race to create the catalog's tables, the namespace and the table, and a SQL catalog
    checks, then inserts: the slower run's insert fails on the other's row. That run opens again (up to
    `CREATE_ATTEMPTS` times) and finds them made. (A table's create is settled by pyiceberg itself.)
    """
    made = _new_directories(location) if create else []
    for attempt in range(1, CREATE_ATTEMPTS + 1):
        catalog = None
        try:
            catalog = load(location, create=create)
            return catalog, open_table(catalog, location, create=create)
        except Exception as exc:
            if catalog is not None:
                _dispose(catalog)
            if not create or attempt == CREATE_ATTEMPTS or not lost_race(exc):
                _remove_empty(made)  # an unreachable catalog leaves no empty warehouse behind
                raise
        time.sleep(random.uniform(0.02, 0.1) * attempt)  # noqa: S311 - spreads the racers, not a secret
    raise AssertionError("unreachable")


def _new_directories(location: Location) -> list[Path]:
    """The local directories `load` would create (the warehouse's, the SQLite catalog's, and their missing
    parents), deepest first."""
    leaves = [location.sqlite.parent] if location.sqlite is not None else []
    warehouse = location.properties.get("warehouse", "")
    if warehouse.startswith("file://"):
        leaves.append(Path(warehouse.removeprefix("file://")))
    missing: list[Path] = []
    for leaf in leaves:
        missing += [path for path in (leaf, *leaf.parents) if not path.exists() and path not in missing]
    return sorted(missing, key=lambda path: len(path.parts), reverse=True)


def _remove_empty(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.rmdir()  # only an empty one: what another process put there meanwhile stays
        except OSError:
            pass


def lost_race(exc: BaseException) -> bool:
    """Whether `exc` is what a catalog raises when another writer created the same object first: a namespace or
    table that exists, a row that exists (sqlite: "UNIQUE constraint failed"), a catalog table that exists
    (sqlite: "table ... already exists", PostgreSQL: DuplicateTable), or sqlite's "database is locked"."""
    from pyiceberg import exceptions

    if isinstance(exc, exceptions.NamespaceAlreadyExistsError | exceptions.TableAlreadyExistsError):
        return True
    try:
        import sqlalchemy.exc
    except ImportError:
        return False
    if isinstance(exc, sqlalchemy.exc.IntegrityError):
        return True
    message = str(exc).lower()
    return isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.ProgrammingError) and (
        "already exists" in message or "database is locked" in message)


def _dispose(catalog: Catalog) -> None:
    engine = getattr(catalog, "engine", None)  # a SQL catalog's connection pool
    if engine is not None:
        engine.dispose()


def open_table(catalog: Catalog, location: Location, *, create: bool) -> Table:
    """The events table, created (with its namespace) when missing and `create`; checked to have our columns."""
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.transforms import DayTransform

    schema = events_schema()
    if create:
        catalog.create_namespace_if_not_exists(location.namespace)
        source = schema.find_field("server_upload_time").field_id
        spec = PartitionSpec(PartitionField(source, PARTITION_FIELD_ID, DayTransform(), PARTITION))
        table = catalog.create_table_if_not_exists(location.identifier, schema=schema, partition_spec=spec,
                                                   properties=TABLE_PROPERTIES)
    else:
        try:
            table = catalog.load_table(location.identifier)
        except (NoSuchTableError, NoSuchNamespaceError):
            raise DestinationError(f"{location.label}: no table {'.'.join(location.identifier)}") from None
    theirs = [(f.name, str(f.field_type)) for f in table.schema().fields]
    ours = [(f.name, str(f.field_type)) for f in schema.fields]
    if theirs != ours:
        pairs = enumerate(zip(theirs, ours, strict=False))
        at = next((n for n, (a, b) in pairs if a != b), min(len(theirs), len(ours)))
        want = " ".join(ours[at]) if at < len(ours) else "no more columns"
        found = " ".join(theirs[at]) if at < len(theirs) else "none"
        raise DestinationError(f"{location.label}: {'.'.join(location.identifier)} is not an amplitude-export "
                               f"events table (column {at + 1}: {want} expected, {found} found)")
    return table


class Errors:
    """Turns what catalogs, FileIO and DuckDB raise into one-line DestinationErrors (passwords masked)."""

    def __init__(self, label: str, doing: str) -> None:
        self.label, self.doing = label, doing

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _tb: object) -> None:
        if exc is None or isinstance(exc, DestinationError | KeyboardInterrupt) or not isinstance(exc, Exception):
            return
        if isinstance(exc, known_errors()):
            message = lost_file_hint(masked(_first_line(exc)), self.label)
            raise DestinationError(f"{self.doing} {self.label}: {message}") from exc


def known_errors() -> tuple[type[BaseException], ...]:
    """The exception types of the libraries the sink drives (imported lazily: the extra may be missing)."""
    from pyiceberg import exceptions

    # ValueError: pyarrow's S3 filesystem refusing its options (a key without a secret)
    kinds: list[type[BaseException]] = [duckdb.Error, OSError, ValueError, pa.ArrowException, exceptions.RESTError,
                                        exceptions.CommitFailedException, exceptions.NoSuchTableError,
                                        exceptions.NoSuchNamespaceError, exceptions.ValidationException]
    try:
        import sqlalchemy.exc

        kinds.append(sqlalchemy.exc.SQLAlchemyError)
    except ImportError:
        pass
    return tuple(kinds)


def without_retries(table: Table) -> Table:
    """`table` with pyiceberg's commit retries off, in this process's copy of its metadata only (the property is
    never committed): a refused commit comes back to `IcebergSink._commit`, which computes it again."""
    from pyiceberg.table import Table

    properties = {**table.metadata.properties, "commit.retry.num-retries": "0"}
    metadata = table.metadata.model_copy(update={"properties": properties})
    return Table(table.name(), metadata, table.metadata_location, table.io, table.catalog, table.config)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__

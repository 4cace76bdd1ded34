"""The script a user writes before reaching for a tool: download the export, unzip, pandas, write the table.

    python benchmarks/peers/pandas_script.py BASE_URL API_KEY SECRET_KEY 20250701T00 20250701T23 duckdb:out.duckdb
    python benchmarks/peers/pandas_script.py ... parquet:out.parquet

It holds the whole archive, every member's frame and their concatenation in memory at once, as such scripts do.
Nested values (objects, arrays) and columns whose type drifts between lines become JSON text, the usual fix
after the first "could not convert" error. Prints the number of rows written.
"""

import gzip
import io
import json
import sys
import zipfile

import httpx
import pandas as pd


def as_text(value):
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value if isinstance(value, str) else json.dumps(value)


def main() -> None:
    base_url, api_key, secret_key, start, end, target = sys.argv[1:7]
    response = httpx.get(
        f"{base_url}/api/2/export", params={"start": start, "end": end}, auth=(api_key, secret_key), timeout=None
    )
    response.raise_for_status()
    frames = []
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        for name in archive.namelist():
            if name.endswith(".json.gz"):
                with gzip.open(archive.open(name)) as member:
                    frames.append(pd.read_json(member, lines=True))
    events = pd.concat(frames, ignore_index=True)
    for column in events.columns:
        if events[column].dtype == object:
            events[column] = events[column].map(as_text)
    kind, _, path = target.partition(":")
    if kind == "duckdb":
        import duckdb

        with duckdb.connect(path) as con:
            con.execute("CREATE TABLE events AS SELECT * FROM events")
    elif kind == "parquet":
        events.to_parquet(path)
    else:
        raise SystemExit(f"unknown target {target}")
    print(len(events))


if __name__ == "__main__":
    main()

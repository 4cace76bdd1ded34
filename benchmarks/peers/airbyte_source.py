"""Airbyte's Amplitude source (`airbyte-source-amplitude` from PyPI), reading the `events` stream from a given host.

    benchmarks/.venv-airbyte/bin/python benchmarks/peers/airbyte_source.py BASE_URL API_KEY SECRET_KEY 2025-07-01

Runs in the connector's own virtualenv (run_benchmark.py makes it). The connector has no setting for the host of
its events stream (`Events.url_base` is amplitude.com or the EU host, chosen by `data_region`), so this points
that one property at BASE_URL and freezes the connector's clock at the end of the day, so it asks for that one
24-hour slice (it slices from `start_date` to now). Everything else is the connector's own code, run through the
CDK's entrypoint as `read --config --catalog`; the messages it would print are counted instead (as a destination
reading them would, minus the writing). Prints the number of records.
"""

import json
import sys
import tempfile
from pathlib import Path

import pendulum
from airbyte_cdk.entrypoint import AirbyteEntrypoint
from source_amplitude import SourceAmplitude
from source_amplitude.streams import Events


def main() -> None:
    base_url, api_key, secret_key, day = sys.argv[1:5]
    Events.url_base = property(lambda self: f"{base_url}/api/")
    pendulum.set_test_now(pendulum.parse(day).add(hours=23, minutes=59))
    config = {"api_key": api_key, "secret_key": secret_key, "start_date": f"{day}T00:00:00Z"}
    catalog = {
        "streams": [
            {
                "stream": {"name": "events", "json_schema": {}, "supported_sync_modes": ["full_refresh"]},
                "sync_mode": "full_refresh",
                "destination_sync_mode": "append",
            }
        ]
    }
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        (Path(tmp) / "catalog.json").write_text(json.dumps(catalog))
        entrypoint = AirbyteEntrypoint(SourceAmplitude())
        args = entrypoint.parse_args(["read", "--config", f"{tmp}/config.json", "--catalog", f"{tmp}/catalog.json"])
        records = 0
        for message in entrypoint.run(args):
            if message.startswith('{"type":"RECORD"'):
                records += 1
            elif '"level":"ERROR"' in message or '"type":"TRACE"' in message and '"error"' in message:
                print(message, file=sys.stderr)
    print(records)


if __name__ == "__main__":
    main()

"""A real S3-compatible server on loopback for the tests: moto's server mode (ThreadedMotoServer) on 127.0.0.1 and
a free port, one per test session, a fresh bucket per test.

Nothing may reach AWS: while the server runs, this process's environment holds dummy credentials, no shared
config or credentials files, no instance metadata lookups, and `AWS_ENDPOINT_URL` pointing at a closed loopback
port, so a filesystem that was not given the server's endpoint fails at once instead of calling amazonaws.com.
Subprocesses get `env()` (the same, minus or plus the endpoint).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "loopback-test-key",
    "AWS_SECRET_ACCESS_KEY": "loopback-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
# every AWS variable a developer's shell may hold that could send a request elsewhere or sign it differently
CLEARED = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REGION",
           "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
           "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")


def closed_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class LoopbackS3:
    endpoint: str  # http://127.0.0.1:PORT
    dead_endpoint: str  # a loopback URL nothing answers: the default endpoint of the session

    @property
    def options(self) -> dict[str, Any]:
        """storage_options that reach this server."""
        return {"endpoint_url": self.endpoint}

    def filesystem(self) -> Any:
        """An s3fs filesystem on this server (fsspec caches it per options, like the sink's own)."""
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint)

    def new_bucket(self) -> str:
        name = f"test-{uuid.uuid4().hex[:16]}"
        self.filesystem().mkdir(name)
        return name

    def env(self, *, endpoint: bool = False, **extra: str) -> dict[str, str]:
        """The environment for a subprocess: this one's without AMP_* and foreign AWS_* variables, the dummy
        credentials, and the endpoint of this server (`endpoint=True`) or of a closed port."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AMP_", "AWS_"))}
        base.update(DUMMY_ENV, AWS_ENDPOINT_URL=self.endpoint if endpoint else self.dead_endpoint)
        base.update(extra)
        return base


@contextmanager
def loopback_s3(*, process: bool = False) -> Iterator[LoopbackS3]:
    """Start moto's S3 server on 127.0.0.1 and a free port; stop it and restore the environment afterwards.

    With `process`, the server runs in a child process (`python -m moto.server`) instead of a thread: a client
    that holds the GIL while it waits on the network (delta-rs's file system handler) never gets an answer from
    a server thread in its own process."""
    from moto.server import ThreadedMotoServer

    saved = {name: os.environ.get(name) for name in (*DUMMY_ENV, *CLEARED)}
    for name in CLEARED:
        os.environ.pop(name, None)
    server_s3 = LoopbackS3("", f"http://127.0.0.1:{closed_port()}")
    os.environ.update(DUMMY_ENV, AWS_ENDPOINT_URL=server_s3.dead_endpoint)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server: Any = None
    try:
        if process:
            port = closed_port()
            server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_for(port, server)
            yield LoopbackS3(f"http://127.0.0.1:{port}", server_s3.dead_endpoint)
        else:
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            host, port = server.get_host_and_port()
            yield LoopbackS3(f"http://{host}:{port}", server_s3.dead_endpoint)
    finally:
        if isinstance(server, subprocess.Popen):
            server.terminate()
            server.wait()
        elif server is not None:
            server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _wait_for(port: int, process: subprocess.Popen[bytes]) -> None:
    """Until the child server accepts connections on `port` (it exits: fail)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto's server exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("moto's server did not start within 30 s")

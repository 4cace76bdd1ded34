"""A real HTTP server on loopback that answers each path with its next scripted answer.

For the few client tests that need answers the fake APIs do not give (a refusal body of a given shape, an expired
pre-signed link): the client still talks HTTP over a socket, as it does to Amplitude.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx


@dataclass
class Seen:
    """One request the server received."""

    method: str
    path: str  # with the query
    headers: dict[str, str]  # names lowercased


@dataclass
class ScriptedServer:
    """Answers `routes[path]` in order (an `httpx.Response` each: status, headers, body); a path with no answer
    left, or not in `routes`, fails the test through `errors`."""

    routes: dict[str, list[httpx.Response]]
    seen: list[Seen] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        script = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                script.seen.append(Seen("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
                queue = script.routes.get(self.path.split("?", 1)[0])
                if not queue:
                    script.errors.append(f"unscripted request: GET {self.path}")
                    self.send_error(599, "unscripted")
                    return
                answer = queue.pop(0)
                body = answer.content
                self.send_response(answer.status_code)
                for name, value in answer.headers.items():
                    if name.lower() not in ("content-length", "transfer-encoding"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ScriptedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Every Python and shell example in README.md and docs/*.md runs as written (as sqlite-utils keeps its docs).

Each page runs in a temporary directory of its own, its blocks in order, so a block may use what an earlier one
on the page left (a DuckDB file, a dlt pipeline). The environment is a new user's after the README's install:
PATH starts at this virtualenv's bin, and AMP_BASE_URL / AMP_API_KEY / AMP_SECRET_KEY name a fake Export API on
loopback with a week of events (2024-03-01 to 2024-03-07, a few an hour; 404 outside it). dlt keeps its home in
the page's directory and sends no telemetry. Shell blocks run through `bash -e -o pipefail`, Python blocks
through this virtualenv's python; a block must exit 0, and whatever it leaves running (a server started with
`&`) is killed when it ends.

A block that cannot run here (your own keys, S3, Spark, Airflow, a new virtualenv) says so just before its fence:
`<!-- doc-test: skip (the reason) -->`; pytest reports it as skipped, with that reason (`-ra`). Every fence names
its language, so a shell example cannot hide in an unlabelled block.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from amplitude_export.fake_server import FakeExportServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNERS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash", "console": "console"}
SKIP = re.compile(r"<!--\s*doc-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")
DIRECTIVE = re.compile(r"<!--\s*doc-test:")
FIXED_PORT = re.compile(r"--port[= ]+([1-9]\d*)")
BLOCK_TIMEOUT = 600
DATA_START = datetime(2024, 3, 1, tzinfo=UTC)
DATA_END = datetime(2024, 3, 7, 23, tzinfo=UTC)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    skip: str | None  # the reason given in the Markdown

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT).as_posix()}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The page's fenced blocks, each with the skip reason of a `doc-test` comment right before its fence."""
    found = []
    previous = None
    for token in MarkdownIt("commonmark").parse(page.read_text(encoding="utf-8")):
        if token.type == "fence" and token.map is not None:
            marker = SKIP.search(previous.content) if previous is not None and previous.type == "html_block" else None
            found.append(Block(page, token.map[0] + 1, token.info.strip().split(" ")[0], token.content,
                               marker.group("reason").strip() if marker else None))
        previous = token
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks_of(page)]
RUNNABLE = [block for block in ALL_BLOCKS if block.language in RUNNERS]


def test_every_fence_names_its_language_and_every_directive_is_a_skip_of_a_runnable_block() -> None:
    unlabelled = [block.where for block in ALL_BLOCKS if not block.language]
    assert unlabelled == [], "label these blocks (```bash, ```python, ```text, ...)"
    skipped_but_not_run_anyway = [block.where for block in ALL_BLOCKS if block.skip and block.language not in RUNNERS]
    assert skipped_but_not_run_anyway == []
    directives = sum(len(DIRECTIVE.findall(page.read_text(encoding="utf-8"))) for page in PAGES)
    assert directives == sum(1 for block in ALL_BLOCKS if block.skip), "a doc-test comment not right before a fence"
    assert len([block for block in RUNNABLE if not block.skip]) >= 5  # the extraction found the examples


@dataclass
class PageRun:
    """One page's directory and environment, and how far through its blocks it has run."""

    directory: Path
    env: dict[str, str]
    done: list[Block] = field(default_factory=list)
    failed: Block | None = None


@pytest.fixture(scope="module")
def server() -> Iterator[FakeExportServer]:
    with FakeExportServer(api_key="doc-key", secret_key="doc-secret", events_per_hour=12, seed=11,
                          data_start=DATA_START, data_end=DATA_END) as fake:
        yield fake


@pytest.fixture(scope="module")
def page_runs(server: FakeExportServer, tmp_path_factory: pytest.TempPathFactory) -> dict[Path, PageRun]:
    runs = {}
    bin_dir = str(Path(sys.executable).parent)
    for page in PAGES:
        directory = tmp_path_factory.mktemp(page.stem)
        (directory / "work").mkdir()
        env = {name: value for name, value in os.environ.items()
               if not name.startswith(("AMP_", "DLT_", "VIRTUAL_ENV", "PYTHON"))}
        env.update(PATH=f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}", AMP_BASE_URL=server.url,
                   AMP_API_KEY="doc-key", AMP_SECRET_KEY="doc-secret", DLT_DATA_DIR=str(directory / "dlt-home"),
                   RUNTIME__DLTHUB_TELEMETRY="false")
        runs[page] = PageRun(directory / "work", env)
    return runs


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.where for block in RUNNABLE])
def test_example_runs_as_written(block: Block, page_runs: dict[Path, PageRun]) -> None:
    if block.skip:
        pytest.skip(f"{block.where}: {block.skip}")
    state = page_runs[block.page]
    earlier = [b for b in RUNNABLE if b.page == block.page and b.line < block.line and not b.skip]
    for before in earlier:  # what this block may rely on, when it is run alone (`-k`)
        if before not in state.done and state.failed is None:
            run_in_page(before, state)
    if state.failed is not None:
        pytest.fail(f"not run: {state.failed.where}, earlier on the page, failed", pytrace=False)
    run_in_page(block, state)


def run_in_page(block: Block, state: PageRun) -> None:
    try:
        run_block(block, state.directory, state.env)
    except BaseException:
        state.failed = block
        raise
    state.done.append(block)


def run_block(block: Block, cwd: Path, env: dict[str, str]) -> None:
    """Run one block in `cwd`; fail with its output unless it exits 0. Its leftover processes are killed."""
    scripts = cwd.parent
    stem = f"{block.page.stem}-{block.line}"
    if RUNNERS[block.language] == "python":
        script = scripts / f"{stem}.py"
        script.write_text(block.code)
        command = [sys.executable, str(script)]
    else:
        script = scripts / f"{stem}.sh"
        script.write_text(console_commands(block.code) if block.language == "console" else block.code)
        command = ["bash", "-e", "-o", "pipefail", str(script)]
    out_path, err_path = scripts / f"{stem}.out", scripts / f"{stem}.err"
    port = FIXED_PORT.search(block.code)
    with port_lock(int(port.group(1)) if port else None), out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                   start_new_session=True)  # its own process group: `&` jobs included
        try:
            code = process.wait(timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            kill_group(process.pid)
            process.wait()
    seconds = time.monotonic() - started
    print(f"{block.where}: exit {code} in {seconds:.1f} s")
    if code != 0:
        said = (out_path.read_text(errors="replace") + err_path.read_text(errors="replace"))[-6000:]
        outcome = f"timed out after {BLOCK_TIMEOUT} s" if code is None else f"exited {code}"
        pytest.fail(f"{block.where} ({block.language}) {outcome}:\n{block.code}\n--- output ---\n{said}",
                    pytrace=False)


def console_commands(text: str) -> str:
    """The commands of a ```console block: lines after a `$ ` prompt, with their `\\` continuations."""
    commands, continued = [], False
    for line in text.splitlines():
        if continued or line.startswith("$ "):
            commands.append(line if continued else line[2:])
            continued = line.rstrip().endswith("\\")
    return "\n".join(commands) + "\n"


def kill_group(pgid: int) -> None:
    """SIGTERM to what is left of the block's process group, SIGKILL after 10 s."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


@contextmanager
def port_lock(port: int | None) -> Iterator[None]:
    """A block that listens on a fixed port (the README's fake server on 8080) holds a lock for this machine
    while it runs, so two checkouts' test runs take turns; a port that another program holds fails the test."""
    if port is None:
        yield
        return
    with open(Path(tempfile.gettempdir()) / f"amplitude-export-doc-examples-{port}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as exc:
                pytest.fail(f"port {port} is taken by another program ({exc}): the example needs it", pytrace=False)
        yield

"""Parse members into parts: in this thread, on parse threads, or in worker processes.

Members are dealt round-robin, member i to worker i % count, and each worker hands its parts over through its own
small bounded queue; reading the queues in member order then gives rows in member order then line order with no
reorder buffer, and memory stays bounded whatever the archive's size. Threads are used when the compiled parser
is at hand (it and ISA-L's inflate release the GIL, and no batch is copied through a pipe); worker processes,
which send Arrow IPC bytes back, otherwise.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue as queue_module
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from . import schema
from .archive import ArchiveMember, Opener, landed_members, member_chunks
from .errors import ArchiveError
from .live import LiveMembers, StreamAbandoned
from .parse import LINE_BYTES, Context, Part, parse_chunk
from .threads import lower_priority
from .tuning import tune_for_bulk_loading

if TYPE_CHECKING:  # the context classes exist only where those start methods do
    from multiprocessing.context import ForkServerContext, SpawnContext

_QUEUE_PARTS = 2  # parts a worker may have waiting; bounds memory across threads and processes
Numbered = Iterable[tuple[int, ArchiveMember]]  # members with their index in the reader's member list


def member_parts(opener: Opener, ctx: Context, index: int, member: ArchiveMember) -> Iterator[Part]:
    """Parts of one member, at least one (so an empty member is still accounted for)."""
    produced = False
    number = 1
    for segments in member_chunks(opener, index, member, ctx.batch_rows * LINE_BYTES):
        produced = True
        part, lines = parse_chunk(segments, number, member, index, ctx)
        number += lines
        yield part
    if not produced:
        yield Part(index, None, 0, [], set())


def parts_here(ctx: Context, numbered: Numbered) -> Generator[Part, None, None]:
    """Parts of the landed archive's members, in order, parsed in this thread."""
    with landed_members(ctx.path) as opener:
        for index, member in numbered:
            yield from member_parts(opener, ctx, index, member)


def parts_on_threads(
    ctx: Context, numbered: Numbered, workers: int, live: LiveMembers | None = None, background: bool = False
) -> Generator[Part, None, None]:
    """Parts of the members, parsed on `workers` threads, in member order; a `live` archive's members are dealt
    to the threads as they arrive (`numbered` then yields each as it arrives, for the reader to list it).
    `background`: the threads run at a lower CPU priority (`threads.lower_priority`)."""
    if live is not None:
        count = max(1, workers)
        dealt: list[Numbered] = [_dealt(live, k, count) for k in range(count)]
    else:
        listed = list(numbered)
        numbered = listed
        count = min(workers, len(listed))
        dealt = [listed[k::count] for k in range(count)]
    queues: list[queue_module.Queue[tuple[Any, ...]]] = [
        queue_module.Queue(maxsize=_QUEUE_PARTS) for _ in range(count)
    ]
    stop = threading.Event()
    threads = [
        threading.Thread(target=_thread_worker, args=(ctx, dealt[k], queues[k], stop, live, background),
                         name=f"amplitude-export-parse-{k}", daemon=True)
        for k in range(count)
    ]
    for thread in threads:
        thread.start()
    try:
        yield from _in_member_order(ctx, numbered, count, lambda k, _: queues[k].get(), lambda message: message[1])
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)


def parts_in_processes(ctx: Context, numbered: list[tuple[int, ArchiveMember]], workers: int
                       ) -> Generator[Part, None, None]:
    """Parts of the landed archive's members, parsed in `workers` processes, in member order."""
    mp = _context()
    if mp.get_start_method() == "forkserver":
        mp.set_forkserver_preload([__name__])
    count = min(workers, len(numbered))
    queues = [mp.Queue(maxsize=_QUEUE_PARTS) for _ in range(count)]
    processes = [
        mp.Process(target=_process_worker, args=(ctx, numbered[k::count], queues[k]), daemon=True)
        for k in range(count)
    ]
    for process in processes:
        process.start()

    def unpack(message: tuple[Any, ...]) -> Part:
        _, index, payload, lines, rejects, unknown, slow = message
        batch = None
        if payload is not None:
            batch = pa.ipc.read_record_batch(pa.py_buffer(payload), schema.ARROW_SCHEMA)
        return Part(index, batch, lines, rejects, unknown, slow)

    try:
        yield from _in_member_order(
            ctx, numbered, count, lambda k, member: _receive(queues[k], processes[k], member), unpack
        )
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=5)
        for q in queues:
            q.close()
            q.cancel_join_thread()


def _in_member_order(
    ctx: Context,
    numbered: Numbered,
    count: int,
    receive: Callable[[int, ArchiveMember], tuple[Any, ...]],
    unpack: Callable[[tuple[Any, ...]], Part],
) -> Iterator[Part]:
    """The parts of every member, in member order: member i comes from worker i % count (`receive(k, member)`
    gives worker k's next message), until its "end"; a worker's "error", "abandoned" or "crash" is raised here."""
    for index, member in numbered:
        while True:
            message = receive(index % count, member)
            if message[0] == "end":
                break
            if message[0] == "error":
                raise ArchiveError(message[1], path=ctx.path, member=message[2])
            if message[0] == "crash":
                raise RuntimeError(f"reader worker failed on {member.name}: {message[1]}")
            if message[0] == "abandoned":
                raise StreamAbandoned(message[1])
            yield unpack(message)


class _Stopped(Exception):
    """The consumer gave up: a parse thread stops where it is."""


def _produce(ctx: Context, members: Numbered, send: Any, live: LiveMembers | None = None) -> None:
    """Parse the members dealt to one worker, handing `send` each ("part", part) and then ("end", index).

    Members come from the landed archive, or from `live` as they download. A broken member ends the worker with
    ("error", reason, member), a streamed load given up with ("abandoned", reason, None), anything else with
    ("crash", text, None), so the reader never waits for a worker that has died.
    """
    try:
        with contextlib.ExitStack() as stack:
            opener = live.open if live is not None else stack.enter_context(landed_members(ctx.path))
            for index, member in members:
                for part in member_parts(opener, ctx, index, member):
                    send(("part", part))
                send(("end", index))
    except ArchiveError as exc:
        send(("error", exc.reason, exc.member))
    except StreamAbandoned as exc:
        send(("abandoned", str(exc), None))
    except _Stopped:
        raise
    except BaseException as exc:  # report anything else rather than leave the reader waiting
        send(("crash", f"{type(exc).__name__}: {exc}", None))


def _process_worker(ctx: Context, members: list[tuple[int, ArchiveMember]], out: Any) -> None:
    """Worker process body: `_produce`, with each part's batch sent as Arrow IPC bytes."""
    tune_for_bulk_loading()

    def send(message: tuple[Any, ...]) -> None:
        if message[0] == "part":
            part = message[1]
            payload = part.batch.serialize().to_pybytes() if part.batch is not None else None
            message = ("part", part.member, payload, part.lines, part.rejects, part.unknown, part.slow)
        out.put(message)

    _produce(ctx, members, send)


def _thread_worker(
    ctx: Context, members: Numbered, out: Any, stop: Any, live: LiveMembers | None, background: bool
) -> None:
    """Parse thread body: `_produce`, parts handed over as they are; stops when the reader sets `stop`."""
    if background:
        lower_priority()

    def send(message: tuple[Any, ...]) -> None:
        while not stop.is_set():
            try:
                out.put(message, timeout=0.2)
                return
            except queue_module.Full:
                pass
        raise _Stopped

    try:
        _produce(ctx, members, send, live)
    except _Stopped:
        pass


def _dealt(live: LiveMembers, first: int, step: int) -> Iterator[tuple[int, ArchiveMember]]:
    """Members first, first + step, ... of a live archive, each once it has arrived."""
    index = first
    while (member := live.get(index)) is not None:
        yield index, member
        index += step


def _receive(source: Any, process: Any, member: ArchiveMember) -> tuple[Any, ...]:
    """The next message from a worker; a worker that died without a word is an error, not a hang."""
    while True:
        try:
            return source.get(timeout=1.0)
        except queue_module.Empty:
            if not process.is_alive():
                try:  # it may have sent its last words just before exiting
                    return source.get(timeout=0.5)
                except queue_module.Empty:
                    pass
                raise RuntimeError(f"reader worker died (exit code {process.exitcode}) on {member.name}") from None


def _context() -> ForkServerContext | SpawnContext:
    """forkserver: safe when the parent holds threads (DuckDB's pool) and cheap per worker once preloaded."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")

"""Work on a daemon thread, with its outcome in a future; an iterator produced ahead on its own thread."""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TypeVar

_T = TypeVar("_T")


# how much a background thread lowers its CPU priority: a nice value of 5 weighs about a third of 0
BACKGROUND_NICE = 5


def lower_priority() -> None:
    """Lower the calling thread's CPU priority by BACKGROUND_NICE, for good (until the thread ends).

    Only on Linux, where a nice value belongs to a thread; elsewhere it would apply to the whole process,
    the caller's threads included, so nothing is done.
    """
    if sys.platform != "linux":
        return
    me = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, me, os.getpriority(os.PRIO_PROCESS, me) + BACKGROUND_NICE)
    except OSError:
        pass


def in_daemon_thread(work: Callable[[], _T], *, name: str, background: bool = False) -> Future[_T]:
    """Start `work()` on a daemon thread; its result, or what it raised, arrives in the returned future.
    `background`: the thread runs at a lower CPU priority (`lower_priority`).

    Not a ThreadPoolExecutor: its threads are joined when the interpreter exits, so a Ctrl-C during a stalled
    request or a long hash would wait for them. A daemon thread cut off at exit leaves nothing that is trusted
    later: a download's `.part` file is fetched again, a hash is computed again.
    """
    future: Future[_T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        if background:
            lower_priority()
        try:
            future.set_result(work())
        except BaseException as exc:  # noqa: BLE001 - raised again where the result is needed
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


_END = object()


def prefetched(items: Iterator[_T], *, depth: int, name: str) -> Iterator[_T]:
    """`items` in their order, produced on their own thread up to `depth` ahead of the consumer.

    For a consumer that holds something others wait on while it asks for the next item: DuckDB holds its Arrow
    scan's lock while it pulls a batch, so the Python work of making the batch, done here instead, no longer
    stalls its other threads. What `items` raises is raised here, in its place. Closing this generator (or
    leaving it early) stops the producer and waits for it, so nothing still runs `items` afterwards.
    """
    slots: queue.Queue[tuple[object, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put((item, None), timeout=0.05)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put((_END, None))
        except BaseException as exc:  # noqa: BLE001 - raised again on the consumer's side
            slots.put((_END, exc))

    producer = threading.Thread(target=produce, name=name, daemon=True)
    producer.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        while producer.is_alive():  # unblock a producer waiting for a free slot
            try:
                slots.get(timeout=0.05)
            except queue.Empty:
                pass
        producer.join()

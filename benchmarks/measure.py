"""Run a command and measure it: wall seconds, CPU seconds and peak memory of its whole process tree."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_POLL = 0.05  # seconds between samples, so every wall time may include up to this much waiting
_PSS_EVERY = 10  # polls between PSS reads: reading smaps_rollup of a large process costs kernel time


@dataclass
class Measured:
    wall: float  # seconds
    cpu: float  # user + system seconds of the process tree
    rss: int  # peak of the tree's summed resident bytes
    pss: int  # peak of the tree's summed proportional bytes (a page shared by n processes counts 1/n in each)
    returncode: int
    output: str  # stdout and stderr, interleaved


def _tree(pid: int, cpu: dict[int, float], *, pss_too: bool) -> tuple[int, int]:
    """Summed RSS and PSS (0 unless `pss_too`) of `pid` and all its descendants; records each one's CPU seconds
    so far in `cpu`.

    Walking /proc (not RUSAGE_CHILDREN) is what counts processes nobody waits for (a forkserver's workers).
    """
    rss = pss = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            cpu[current] = (int(fields[11]) + int(fields[12])) / _TICK
            rss += int(fields[21]) * _PAGE
            if pss_too:
                with open(f"/proc/{current}/smaps_rollup") as rollup:
                    for line in rollup:
                        if line.startswith("Pss:"):
                            pss += int(line.split()[1]) * 1024
                            break
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    stack += [int(c) for c in children.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            continue
    return rss, pss


def measure(command: list[str], env: dict[str, str] | None = None) -> Measured:
    """Run `command` to its end, sampling its process tree; its output is kept in a file, not a pipe."""
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        peak_rss = peak_pss = polls = 0
        cpu: dict[int, float] = {}
        try:
            while True:
                rss, pss = _tree(process.pid, cpu, pss_too=polls % _PSS_EVERY == 0)
                polls += 1
                peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    process.returncode = os.waitstatus_to_exitcode(status)
                    break
                time.sleep(_POLL)
        except BaseException:  # stopped by hand: leave no candidate running
            process.kill()
            process.wait()
            raise
        wall = time.perf_counter() - start
        # wait4 counts the root and every descendant it (transitively) reaped; the samples add the ones never
        # reaped. Each undercounts, neither double counts.
        total = max(sum(cpu.values()), usage.ru_utime + usage.ru_stime)
        log.seek(0)
        output = log.read().decode(errors="replace")
    return Measured(wall, total, peak_rss, peak_pss, process.returncode, output)

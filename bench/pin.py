"""CPU pinning for runs on more cores: each proxy on cores of its own, the load elsewhere.

On this project's 2-core machine wrk, the backends and the proxy share both
cores, so no proxy gets far above 2x another: what one saves goes to wrk and
nginx. ``--pin PROXY:LOAD`` (cpu lists, as taskset takes them: ``2:4-15``)
puts every proxy's processes and threads on PROXY and wrk, the backends and
the probes on LOAD, so that a proxy's req/s is what its own cores can do.
Threads a process starts later inherit its affinity.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bench.process import Launcher

if TYPE_CHECKING:
    from bench.scenarios import Bed, Target


class PinError(ValueError):
    pass


def cpu_list(text: str) -> frozenset[int]:
    """``"0,2-4"`` -> {0, 2, 3, 4}; every cpu must be one this process may use."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise PinError(f"not a cpu list: {text!r} (e.g. 2 or 4-15 or 0,2-3)") from None
        if first > last:
            raise PinError(f"not a cpu list: {text!r} ({part}: the range runs backwards)")
        cpus.update(range(first, last + 1))
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise PinError(f"cpus {sorted(cpus - allowed)} are not available (have {sorted(allowed)})")
    return frozenset(cpus)


def parse(spec: str) -> tuple[frozenset[int], frozenset[int]]:
    """``"PROXY:LOAD"`` -> (proxy cpus, load cpus), which must not overlap."""
    proxy, sep, load = spec.partition(":")
    if not sep:
        raise PinError(f"--pin wants PROXY:LOAD cpu lists (e.g. 1:0 or 2:4-15), not {spec!r}")
    p, q = cpu_list(proxy), cpu_list(load)
    if p & q:
        raise PinError(f"--pin: the proxy's and the load's cpus overlap: {sorted(p & q)}")
    return p, q


def pin_tree(pids: Sequence[int], cpus: frozenset[int]) -> int:
    """Pin every thread of *pids* to *cpus*; the number of threads pinned."""
    n = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # gone
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), cpus)
                n += 1
            except OSError:
                continue  # exited meanwhile
    return n


def pinned(launcher: Launcher, cpus: frozenset[int]) -> Launcher:
    """*launcher* whose commands run on *cpus* (taskset; exec keeps it)."""
    mask = ",".join(map(str, sorted(cpus)))

    def launch(argv: Sequence[str]) -> list[str]:
        return ["taskset", "-c", mask, *launcher(argv)]

    return launch


def pin_beds(
    targets: Sequence[Target], beds: Sequence[Bed], proxy: frozenset[int], load: frozenset[int]
) -> None:
    """--pin: the proxies (not ``direct``, which is the backends) on *proxy*,
    every other process of the beds and every wrk on *load*."""
    mine = {id(t.process) for t in targets if t.peer != "direct"}
    for t in targets:
        if t.peer != "direct":
            pin_tree(t.process.pids(), proxy)
        t.launcher = pinned(t.launcher, load)
    for bed in beds:
        for proc in bed.processes:
            if id(proc) not in mine:
                pin_tree(proc.pids(), load)
    say = f"bench: pinned: proxies on cpus {sorted(proxy)}, load on {sorted(load)}"
    print(say, file=sys.stderr)

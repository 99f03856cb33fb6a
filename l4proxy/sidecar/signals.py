"""Signals while a process starts: a reload request (SIGHUP) never kills anything.

Theory of operation
-------------------
SIGHUP means "reload the rules". Its default action is to terminate, so a
SIGHUP that reaches a process before it has a handler kills it: a worker
that is still importing or loading its first rules, or the supervisor before
its event loop runs (issue 12: a SIGHUP every 50 ms after a worker crash
killed four workers in a row). Two rules close that window:

* A process installs its SIGHUP handler before anything else it runs
  (:func:`hold_reloads`, first thing in ``l4proxy run``). Until the event
  loop takes over, the handler only records the request; the worker then
  reloads once after its first load if one arrived during it. A request
  before the first load needs nothing: that load reads the latest rules.
* The supervisor starts workers with SIGHUP *blocked* (:func:`reloads_blocked`
  around the fork). The signal mask survives ``exec``, so a SIGHUP forwarded
  to a worker before its handler exists stays pending in the kernel instead
  of killing it, and is delivered to the handler the moment
  :func:`hold_reloads` unblocks it. The interpreter's own start-up (before
  any of our code runs) is covered this way too, which no handler could do.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_blocked_depth = 0
_mask_before: set[int | signal.Signals] = set()


class HeldReloads:
    """Reload requests that arrived before the event loop's handler existed."""

    def __init__(self) -> None:
        self.requested = False
        self.count = 0

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.count += 1


def hold_reloads() -> HeldReloads:
    """Record SIGHUP from now on, then unblock it (a parent may have blocked it)."""
    held = HeldReloads()
    signal.signal(signal.SIGHUP, held.on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    return held


@contextmanager
def reloads_blocked() -> Iterator[None]:
    """SIGHUP blocked in this thread (and in children forked meanwhile).

    Nests: concurrent spawns (one per worker slot, across ``await``) keep it
    blocked until the last one is done. A SIGHUP for this process meanwhile
    stays pending and is handled on unblocking.
    """
    global _blocked_depth, _mask_before
    if _blocked_depth == 0:
        _mask_before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    _blocked_depth += 1
    try:
        yield
    finally:
        _blocked_depth -= 1
        if _blocked_depth == 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, _mask_before)

"""Signals while a process starts: a reload never kills it, a stop is never lost.

Theory of operation
-------------------
SIGHUP means "reload the rules". Its default action is to terminate, so a
SIGHUP that reaches a process before it has a handler kills it: a worker
that is still importing or loading its first rules, or the supervisor before
its event loop runs (issue 12: a SIGHUP every 50 ms after a worker crash
killed four workers in a row). SIGUSR1 ("reopen the access log", as Envoy's:
logrotate sends it) is fatal by default in the same way.

SIGTERM (and SIGINT) mean "drain and stop", and the event loop's handler
does that. Before it exists, the default action either kills the process
without a drain (a worker still loading its rules, whose listeners' queued
connections are then reset) or, for a process that is PID 1 of its PID
namespace (a container without an init), *discards* the signal: the kernel
delivers nothing to PID 1 that it has no handler for, and a SIGTERM in the
supervisor's first tens of milliseconds was lost; it ran until the SIGKILL.

Three rules close those windows:

* A process blocks the four (and :data:`IGNORED`) at its entry point's
  first step, before it imports anything (``l4proxy.cli``'s first
  statement, for the console script and ``python -m l4proxy`` alike:
  ``cli._hold_at_first_step``), where before it had handlers only once
  the imports up to :func:`hold_signals` were done, 12 to 40 ms later: a
  SIGHUP or SIGUSR1 meanwhile killed the sidecar, a SIGTERM killed it
  undrained. A signal blocked stays pending until the handlers exist.
* A process installs its handlers for the four before anything else it
  runs after those imports (:func:`hold_signals`: ``l4proxy run``'s first
  step, in :func:`l4proxy.cli.main`), then unblocks them. Until the event
  loop takes over, they only record what came: the worker reloads once after its first load if a
  SIGHUP arrived during it (a request before that load needs nothing: the
  load reads the latest rules), reopens its access log if a SIGUSR1 did,
  and a process that recorded a SIGTERM or SIGINT stops as soon as its
  loop's handlers exist (the supervisor without starting its workers, a
  worker by draining after its first load).
* The supervisor starts workers with the four *blocked*
  (:func:`start_signals_blocked` around the fork). The signal mask
  survives ``exec``, so a signal forwarded to a worker before its handlers
  exist stays pending in the kernel instead of killing it, and is delivered
  to them the moment :func:`hold_signals` unblocks it. The interpreter's
  own start-up (before any of our code runs) is covered this way too, which
  no handler could do. (The supervisor's own interpreter start-up is not,
  its first 20 to 30 ms, before any code of ours runs: as PID 1 of its
  container a signal then is discarded, SIGTERM included, as the kernel
  does for a namespace's init without a handler; otherwise a SIGHUP or
  SIGUSR1 then still takes its default action. A parent that starts it
  with them blocked closes that too.)

Once a worker serves, a stop must reach what serves before it serves
anything more, or a worker paused when the SIGTERM came (SIGSTOP, a CPU
quota's throttling) answers the clients queued meanwhile keep-alive
before its event loop runs the handler: a worker whose compiled relay
accepts on its own thread blocks SIGTERM and SIGINT in every thread and
the relay hears them (a signalfd: Worker.hear_stop_signals; one that came
before was held as above), and any other worker tells its relay from the
signal's handler at the interpreter's level (run._heard_first), which
runs before the event loop's next step.

And two more, for the rest of a process's life:

* SIGUSR2 means nothing to l4proxy (HAProxy's master reloads on it, nginx
  upgrades its binary): it is ignored (:data:`IGNORED`, from
  :func:`hold_signals` on, blocked across a worker's start as the four),
  and each one is said (:func:`say_ignored`), where its default action
  killed the supervisor, and so the sidecar, or a worker (restarted, its
  connections cut): ``kubectl exec ... kill -USR2``, or a process group's
  signal that an init such as dumb-init forwards.
* Closing the event loop gives each of its signals the default action
  again, while a stopped process still runs its last steps (the loop's
  close, the interpreter's exit: tenths of a second): a SIGHUP or SIGUSR1
  the supervisor forwarded meanwhile, or a second SIGTERM, killed it by
  signal (a worker that drained said "died with signal 10 (SIGUSR1) while
  draining", the supervisor's exit status 143 where it was 0). Once
  stopped, a process ignores them (:func:`done_with_signals`).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (asyncio imports ssl: not before lean.keep_out, cli.main)
    import asyncio

# SIGHUP last: see hold_signals. SIGUSR1 ("reopen the access log":
# access_log_file) is fatal by default too.
HELD = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
# Meaningless to l4proxy and fatal by default: ignored (SIG_IGN survives the
# exec of a worker), said by the event loop.
IGNORED = (signal.SIGUSR2,)

log = logging.getLogger("l4proxy")

_blocked_depth = 0
_mask_before: set[int | signal.Signals] = set()
_held: HeldSignals | None = None


class HeldSignals:
    """What arrived before the event loop's handlers existed."""

    def __init__(self) -> None:
        self.requested = False  # a reload (SIGHUP)
        self.count = 0
        self.stop_requested = False  # SIGTERM or SIGINT
        self.reopen_requested = False  # SIGUSR1: reopen --access-log

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.requested = True
            self.count += 1
        elif signum == signal.SIGUSR1:
            self.reopen_requested = True
        else:
            self.stop_requested = True


def hold_signals() -> HeldSignals:
    """Record SIGTERM, SIGINT, SIGUSR1 and SIGHUP from now on, then unblock them (a
    parent may have blocked them). Once per process: a second call returns
    the same record."""
    global _held
    if _held is None:
        held = HeldSignals()
        for sig in IGNORED:
            signal.signal(sig, signal.SIG_IGN)
        for sig in HELD:  # (SIGHUP caught means the stop signals are too)
            signal.signal(sig, held.on_signal)
        _held = held
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {*HELD, *IGNORED})
    return _held


def say_ignored(loop: asyncio.AbstractEventLoop) -> None:
    """The loop says each of :data:`IGNORED` that comes (and ignores it)."""
    for sig in IGNORED:
        loop.add_signal_handler(sig, _said_ignored, sig)


def _said_ignored(sig: int) -> None:
    log.info(
        "%s ignored: it means nothing to l4proxy (SIGHUP reloads the rules, SIGUSR1 reopens "
        "--access-log, SIGTERM drains and stops)",
        signal.Signals(sig).name,
    )


def done_with_signals(loop: asyncio.AbstractEventLoop) -> None:
    """The process stopped (its loop's last step): its loop's handlers give
    way to SIG_IGN, where closing the loop would restore the default action,
    fatal to a process that is only exiting now (a SIGHUP or SIGUSR1 the
    supervisor forwarded, a second SIGTERM)."""
    # SIG_IGN first, and never the loop's remove_signal_handler(): it sets
    # SIG_DFL before we could set SIG_IGN, and a storm's signal in between
    # killed the process all the same (a CI run: a worker "died with signal
    # 10 (SIGUSR1) while draining"). uvloop restores nothing at its close;
    # asyncio's close() would restore SIG_DFL for each handler it holds, so
    # it is told it holds none.
    for sig in (*HELD, *IGNORED):
        signal.signal(sig, signal.SIG_IGN)
    handlers = getattr(loop, "_signal_handlers", None)  # (asyncio's; uvloop's is not visible)
    if isinstance(handlers, dict):
        handlers.clear()


@contextmanager
def start_signals_blocked() -> Iterator[None]:
    """SIGTERM, SIGINT, SIGUSR1 and SIGHUP (and :data:`IGNORED`) blocked in this
    thread (and in children forked meanwhile).

    Nests: concurrent spawns (one per worker slot, across ``await``) keep
    them blocked until the last one is done. A signal for this process
    meanwhile stays pending and is handled on unblocking.
    """
    global _blocked_depth, _mask_before
    if _blocked_depth == 0:
        _mask_before = signal.pthread_sigmask(signal.SIG_BLOCK, {*HELD, *IGNORED})
    _blocked_depth += 1
    try:
        yield
    finally:
        _blocked_depth -= 1
        if _blocked_depth == 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, _mask_before)

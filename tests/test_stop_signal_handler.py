"""The stop signal's handler at the interpreter's level takes no lock.

A worker whose relay does not hear SIGTERM itself (the pure relay; the
compiled one without a signalfd) tells it from the signal's Python handler
(run._heard_first -> Worker.stop_signalled -> the relay's
stop_signalled()). CPython runs that handler on the main thread between two
of its instructions, which may be inside the pure relay's ``with
self._lock:`` (add(), drain(), ...: the worker hands connections on from
that thread): a handler that took the lock (a threading.Lock, not
reentrant) would wait on its own thread for ever, the worker hung. The
pure twin's stop_signalled() sets a flag and writes the wake-up socket
(the relay's thread reads both); the compiled twin's takes its own C
mutex, which no thread holds while Python code runs (each of its holds is
a few C statements), then the pure relay's, lock-free.

The test, in a subprocess (a hang is a timeout, not a stuck suite): the
real handler (run._heard_first), SIGTERM sent to the process itself while
its main thread holds the pure relay's lock, 200 times, the relay's thread
running: each time the handler ran inside the lock and returned.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from l4proxy.dataplane import _relay_py
    from l4proxy.sidecar.run import _heard_first
    which = sys.argv[1]
    if which == "compiled":
        from l4proxy.dataplane._ext import relay as twin
    else:
        twin = _relay_py
    relay = twin.HttpRelay(lambda *a: None, lambda *a: None)
    pure = relay if which == "pure" else relay.slow
    relay.start()
    inside = []

    def heard():
        inside.append(pure._lock.locked())
        relay.stop_signalled()

    _heard_first(signal.SIGTERM, heard)
    for i in range(200):
        with pure._lock:
            os.kill(os.getpid(), signal.SIGTERM)
            spin = sum(range(100))  # (the handler runs at the next instruction)
    relay.close()
    assert inside == [True] * 200, inside
    print("returned", len(inside))
    """
)


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_the_stop_handler_returns_while_the_main_thread_holds_the_relays_lock(
    which: str,
) -> None:
    try:
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, which],
            capture_output=True,
            timeout=60,
            env=os.environ.copy(),
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the stop signal's handler hung on the relay's lock (a deadlock)")
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, out
    assert "returned 200" in out, out

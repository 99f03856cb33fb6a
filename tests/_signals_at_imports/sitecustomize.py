"""Tests only (tests/test_signals_at_start.py), first on a process's
PYTHONPATH: with ``L4PROXY_TEST_SIGNALS_AT_IMPORTS=SIGHUP,SIGUSR1,...`` in
its environment, the process sends itself those signals in turn, one at
each module it imports from the moment ``l4proxy.cli`` begins (its first
statement: the entry point's first step, the console script's or
``python -m l4proxy``'s) until SIGHUP has a handler of its own, then says
on standard error how many it sent (``signals at imports: N sent before
the handlers``) and sends no more. The imports are the start-up's steps
(tens of milliseconds of them): a storm that covers exactly the window
from the entry point's first step to its handlers, at the same places in
every run. The variable is taken out of the environment here: the
process's children (workers) send none."""

from __future__ import annotations

import os
import sys

_SPEC = os.environ.pop("L4PROXY_TEST_SIGNALS_AT_IMPORTS", "")

if _SPEC:
    _signal = sys.modules["_signal"]  # (builtin, loaded by the interpreter's start)
    _sigs = [getattr(_signal, name) for name in _SPEC.split(",")]
    _sent = [0]

    def _hook(event: str, args: tuple[object, ...]) -> None:
        if event != "import" or _sent[0] < 0 or "l4proxy.cli" not in sys.modules:
            return
        if callable(_signal.getsignal(_signal.SIGHUP)):  # handlers: done
            sys.stderr.write(f"signals at imports: {_sent[0]} sent before the handlers\n")
            sys.stderr.flush()
            _sent[0] = -1
            return
        os.kill(os.getpid(), _sigs[_sent[0] % len(_sigs)])
        _sent[0] += 1

    sys.addaudithook(_hook)

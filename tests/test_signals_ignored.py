"""Signals that must not kill a sidecar that means nothing by them, or that
has stopped already.

SIGUSR2 means nothing to l4proxy (HAProxy's master reloads on it, nginx
upgrades its binary); its default action killed the supervisor (the
sidecar) and each worker (restarted, its connections cut). It is ignored
and said, in a worker from its fork on.

A process that stopped still runs its last steps (the event loop's close,
the interpreter's exit), where closing the loop gave SIGHUP, SIGUSR1 and
SIGTERM their default action again: the supervisor forwarding a SIGUSR1 or
SIGHUP then killed a worker that had drained (said: died with signal 10
(SIGUSR1) while draining), and a late signal killed the supervisor (exit
status by signal, where it was 0). Real ``l4proxy run``, both
implementations, signals sent until the process exits.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.mesh import IMPLS
from tests.test_access_log_reopen import Sidecar, _tree, sidecar

SAID = "SIGUSR2 ignored: it means nothing to l4proxy"


def _each(car: Sidecar, sig: int) -> int:
    """*sig* to the supervisor and each worker: how many got it."""
    sent = 0
    for pid in _tree(car.proc.pid):
        try:
            os.kill(pid, sig)
            sent += 1
        except ProcessLookupError:  # (one exiting)
            pass
    return sent


@pytest.mark.parametrize("impl", list(IMPLS))
def test_sigusr2_to_the_supervisor_and_each_worker_is_said_and_kills_nothing(
    impl: str, tmp_path: Path
) -> None:
    with sidecar(tmp_path, impl, "--workers", "2") as car:
        assert _each(car, signal.SIGUSR2) == 3
        car.wait_said(SAID, 3)  # (the supervisor, each worker)
        assert car.request("m-0") == 200
        assert _each(car, signal.SIGUSR2) == 3  # (the same three: none replaced)
        car.wait_said(SAID, 6)
        text = car.stderr()
        assert "died" not in text and "restarting" not in text, text
        car.proc.terminate()
        assert car.proc.wait(timeout=60) == 0, car.stderr()


def test_a_sigusr2_storm_on_every_process_while_workers_start_kills_nothing(
    tmp_path: Path,
) -> None:
    """SIGUSR2 every 2 ms to the supervisor (once it said its start: its
    interpreter's own start-up is no one's, signals) and to each worker
    from its fork on (before its interpreter runs: blocked, then ignored),
    until both workers serve, and ten rounds more."""
    sent = [0]

    def storm(car: Sidecar) -> None:
        car.wait_said("supervisor: 2 worker(s)")
        deadline = time.monotonic() + 30
        extra = 10
        while time.monotonic() < deadline and car.proc.poll() is None and extra:
            sent[0] += _each(car, signal.SIGUSR2)
            time.sleep(0.002)
            extra -= car.stderr().count(" worker: listening") >= 2

    with sidecar(tmp_path, "compiled-uvloop", "--workers", "2", on_start=storm) as car:
        assert sent[0] > 20
        assert car.request("m-0") == 200
        text = car.stderr()
        assert "died" not in text and "restarting" not in text, text
        car.proc.terminate()
        assert car.proc.wait(timeout=60) == 0, car.stderr()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", [("--workers", "2"), ("--single-process",)], ids=["2", "single"])
def test_signals_after_the_sigterm_until_the_exit_kill_nothing(
    impl: str, mode: tuple[str, ...], tmp_path: Path
) -> None:
    """SIGTERM, then SIGHUP, SIGUSR1 (each forwarded to the workers: a
    reopen, a reload) and SIGTERM again, one every 1 ms, drawn with a fixed
    seed, to the supervisor until it exits: the drain ends in exit 0, no
    worker died (fails before: the workers killed by a forwarded SIGUSR1
    or SIGHUP once stopped, or the supervisor by one after its loop)."""
    draw = random.Random(12)
    log_file = tmp_path / "access.log"
    with sidecar(tmp_path, impl, *mode, "--access-log", str(log_file)) as car:
        assert car.request("m-0") == 200
        car.proc.send_signal(signal.SIGTERM)
        sent = 0
        deadline = time.monotonic() + 60
        while car.proc.poll() is None and time.monotonic() < deadline:
            sig = draw.choice([signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM])
            try:
                car.proc.send_signal(sig)
            except ProcessLookupError:
                break
            sent += 1
            time.sleep(0.001)
        assert car.proc.wait(timeout=60) == 0, car.stderr()
        assert sent > 10
        assert "died" not in car.stderr(), car.stderr()
    assert "m-0" in log_file.read_text()

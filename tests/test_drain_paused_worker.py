"""From the SIGTERM on every answer says close, even a paused worker's.

A review paused a worker (SIGSTOP; a CPU quota's throttling does the same)
with clients queued on its gateway listener, sent the SIGTERM, and let it
run again: the compiled relay's thread, which accepts and serves on its
own, took the queue and answered it keep-alive before the event loop ran
its SIGTERM handler and began the drain (the pure relay's worker too,
more rarely: its loop accepted and handed them on before the handler's
turn). Now the compiled relay hears SIGTERM and SIGINT on its own thread
(a signalfd: "Stop signals" in ext/relay.pyx), in the batch before any
accept or answer of it, and the pure relay's worker is told by the
signal's handler at the interpreter's next instruction
(run._heard_first): each answer says ``connection: close``.

A real ``l4proxy run`` of each implementation (tests/test_drain_keepalive.py's
sidecar and backend), real signals; the test waits until the worker has
the SIGTERM pending (/proc: ShdPnd) before it lets it run.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path

import pytest

from tests.mesh import IMPLS
from tests.test_drain_dead_worker import _stopped
from tests.test_drain_keepalive import GET, WAIT, Sidecar, read_answer, reads_eof, running

CLIENTS = 4
FLAGS = ("--drain-duration", "10", "--drain-quiet", "0")


def _sigterm_pending(pid: int) -> bool:
    """*pid* has a SIGTERM pending for the process (not handled yet)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    [shared] = [int(ln.split()[1], 16) for ln in lines if ln.startswith("ShdPnd:")]
    return bool(shared & (1 << (signal.SIGTERM - 1)))


def _paused_through_the_sigterm(sidecar: Sidecar, pid: int, single: bool) -> None:
    """The SIGTERM sent (to the supervisor, which forwards it, or to the
    single process) while worker *pid* is stopped; once the worker has it
    pending, it runs again."""
    if single:
        os.kill(pid, signal.SIGTERM)
    else:
        sidecar.proc.send_signal(signal.SIGTERM)
    sidecar.until(lambda: _sigterm_pending(pid), "the SIGTERM pending at the worker")
    os.kill(pid, signal.SIGCONT)


def _worker(sidecar: Sidecar, single: bool) -> int:
    if single:
        return sidecar.proc.pid
    [pid] = re.findall(r"worker 0 started \(pid (\d+)\)", sidecar.log())
    return int(pid)


@pytest.mark.parametrize("single", [False, True], ids=["supervised", "single-process"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_clients_queued_at_a_paused_worker_are_answered_saying_close(
    tmp_path: Path, impl: str, single: bool
) -> None:
    """The worker stopped, four clients queued with a GET each, the
    SIGTERM pending, the worker running again: four 200s saying close,
    each followed by EOF, and the sidecar exits 0. Before, the compiled
    relay answered most of them keep-alive (its thread served the queue
    before the drain began)."""
    mode = ("--single-process",) if single else ("--workers", "1")
    with running(tmp_path, impl, *FLAGS, *mode) as (sidecar, backend):
        pid = _worker(sidecar, single)
        os.kill(pid, signal.SIGSTOP)
        sidecar.until(lambda: _stopped(pid), "the worker stopped")
        clients = [socket.create_connection(sidecar.listen, timeout=WAIT) for _ in range(CLIENTS)]
        for sock in clients:
            sock.sendall(GET % b"/")
        _paused_through_the_sigterm(sidecar, pid, single)
        said = []
        for sock in clients:
            with sock:
                status, fields, body = read_answer(sock)
                assert (status, body) == (200, b"ok\n")
                said.append(fields.get("connection"))
                assert reads_eof(sock)
        assert said == [["close"]] * CLIENTS, sidecar.log()
        assert sidecar.proc.wait(timeout=WAIT) == 0
        assert backend.arrived["/"] == CLIENTS


def test_an_answer_that_came_while_the_worker_was_paused_says_close(tmp_path: Path) -> None:
    """A keep-alive client's request in flight at the backend; the worker
    stopped, the backend's answer sent meanwhile (it waits in the relay's
    upstream socket), the SIGTERM pending, the worker running again: the
    answer says close and EOF follows. (The compiled relay: its thread
    hears the signal in the batch that reads the answer.)"""
    with running(tmp_path, "compiled-uvloop", *FLAGS, "--workers", "1") as (sidecar, backend):
        pid = _worker(sidecar, False)
        with sidecar.connect() as sock:
            sock.sendall(GET % b"/")
            assert "connection" not in read_answer(sock)[1]  # (kept alive)
            sock.sendall(GET % b"/slow")
            assert backend.held.acquire(timeout=WAIT)
            os.kill(pid, signal.SIGSTOP)
            sidecar.until(lambda: _stopped(pid), "the worker stopped")
            backend.gate.set()
            _paused_through_the_sigterm(sidecar, pid, False)
            status, fields, _ = read_answer(sock)
            assert (status, fields.get("connection")) == (200, ["close"]), sidecar.log()
            assert reads_eof(sock)
        assert sidecar.proc.wait(timeout=WAIT) == 0

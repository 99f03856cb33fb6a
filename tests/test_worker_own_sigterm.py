"""A worker that drains on a SIGTERM of its own leaves its listeners to the next one.

A review of the supervisor's listener copies (kept until a slot's worker
exits, a drain's retired listener shut down for every copy) sent SIGTERM
to a worker alone, not to the supervisor (an operator recycling it; a
worker whose control channel is gone drains too): the worker drained and
exited, the supervisor restarted it, and the replacement inherited its
listener as the drain left it, not listening (``shutdown(SHUT_RD)``):
every client was refused from then on, until the pod restarted, and the
replacement's accept loop spun on the socket's hang-up (a core, and the
pure worker's log a line each turn). Before that change the drain's SYN
filter stayed on the supervisor's copy, and every client's connect timed
out instead. Now the supervisor makes a slot's copies listen again, the
filter off, before it starts the slot's next worker outside a stop
(listener.listen_again).

The same review found the stop's replacements for a worker that dies
while draining started back to back until the stop's deadline where one
cannot start (72 starts in 22 s): each after the first now waits the
slot's back-off (0.1 s doubling to 5 s), as restarts outside a stop do.

Real ``l4proxy run`` processes (tests/test_drain_keepalive.py's), both
implementations, real signals and sockets; counts, never times.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path

import pytest

from l4proxy.dataplane.listener import bind_listener, listen_again
from l4proxy.sidecar.worker import _refuse_handshakes
from tests.mesh import IMPLS
from tests.test_drain_dead_worker import _listens
from tests.test_drain_keepalive import GET, WAIT, Sidecar, read_answer, running

FLAGS = ("--workers", "1", "--drain-duration", "5", "--drain-quiet", "0")
REQUESTS = 8
_SO_GET_FILTER = 26  # (SO_ATTACH_FILTER's number: Linux, asm-generic)


def _workers(sidecar: Sidecar) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker 0 started \(pid (\d+)\)", sidecar.log())]


def _answers(sidecar: Sidecar) -> list[int]:
    """REQUESTS GETs, each on a connection of its own: their statuses (0: refused)."""
    out = []
    for _ in range(REQUESTS):
        try:
            sock = sidecar.connect()
        except ConnectionRefusedError:
            out.append(0)
            continue
        with sock:
            sock.sendall(GET % b"/")
            out.append(read_answer(sock)[0])
    return out


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_worker_recycled_by_its_own_sigterm_is_replaced_by_one_that_serves(
    tmp_path: Path, impl: str
) -> None:
    """SIGTERM to the worker alone, three times, each once its replacement
    serves: each replacement answers every request, its listener listens,
    the supervisor holds as many fds as before the first; then the
    supervisor's SIGTERM stops the sidecar, exit 0. Before, the first
    replacement's every client was refused (and with the drain's filter
    alone, before that, timed out)."""
    with running(tmp_path, impl, *FLAGS) as (sidecar, backend):
        assert _answers(sidecar) == [200] * REQUESTS
        fds = _fds(sidecar.proc.pid)
        for round_ in range(1, 4):
            worker = _workers(sidecar)[-1]
            os.kill(worker, signal.SIGTERM)
            sidecar.until(
                lambda n=round_: (
                    len(_workers(sidecar)) > n and sidecar.log().count(" worker: listening: ") > n
                ),
                "its replacement listening",
            )
            assert _answers(sidecar) == [200] * REQUESTS, sidecar.log()
            assert _listens(sidecar.listen[1])
        assert backend.arrived["/"] == 4 * REQUESTS
        # a drain of its own is no failure: said once each, not as a death
        # (each hands its listeners over: tests/test_worker_hand_over.py)
        sidecar.until(
            lambda: sidecar.log().count("drained on its own SIGTERM and exited (status 0)") == 3,
            "the three exits",
        )
        assert _fds(sidecar.proc.pid) == fds
        log = sidecar.log()
        assert "accept on" not in log, log  # (the pure worker's accept loop spinning)
        assert "cannot start worker" not in log, log
        assert "died with" not in log, log
        sidecar.proc.send_signal(signal.SIGTERM)
        assert sidecar.proc.wait(timeout=WAIT) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("port", ["0", "named"])
def test_listen_again_undoes_what_a_drain_did_to_a_listener(port: str) -> None:
    """A listener as a drain leaves it (the SYN filter, then shut down:
    worker._refuse_handshakes, worker._stop_listening without the close),
    bound to port 0 (its port went back to the kernel with its listening)
    or to a port named: listen_again makes it listen on its port, the
    filter off, and a client is accepted; again, nothing changes."""
    lst = bind_listener("127.0.0.1", 0 if port == "0" else _free_port(), "gateway")
    with lst.sock:
        assert _refuse_handshakes(lst.sock)
        assert lst.sock.getsockopt(socket.SOL_SOCKET, _SO_GET_FILTER, 1024) != b""
        lst.sock.shutdown(socket.SHUT_RD)
        assert not lst.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        for _ in range(2):
            listen_again(lst)
            assert lst.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            assert lst.sock.getsockname() == lst.address
            assert lst.sock.getsockopt(socket.SOL_SOCKET, _SO_GET_FILTER, 1024) == b""
        with socket.create_connection(lst.address, timeout=WAIT) as client:
            lst.sock.setblocking(True)
            lst.sock.settimeout(WAIT)
            conn, peer = lst.sock.accept()
            with conn:
                assert peer == client.getsockname()


def test_the_stops_replacements_for_a_worker_that_cannot_start_back_off(tmp_path: Path) -> None:
    """SIGTERM with --drain-inbound (the listener still listening in the
    drain), the pod's labels file gone (a worker started now exits 2:
    its argv names it), the draining worker killed: the first worker to
    drain its listener starts at once, each one after it after the
    slot's back-off (0.2, 0.4, ... 5 s): within the stop's deadline
    (--drain-duration 2 and the 10 s grace) seven at most, and the
    sidecar exits 0. Before, about forty (as fast as they could start)."""
    labels = tmp_path / "labels"
    labels.write_text('app="shop"\n')
    flags = (*FLAGS[:2], "--drain-duration", "2", "--drain-inbound", "2")
    with running(tmp_path, "compiled-uvloop", *flags, "--pod-labels-file", str(labels)) as (
        sidecar,
        _,
    ):
        [worker] = _workers(sidecar)
        sidecar.proc.send_signal(signal.SIGTERM)
        sidecar.until(lambda: "[w0] draining for up to" in sidecar.log(), "the drain")
        labels.unlink()
        os.kill(worker, signal.SIGKILL)
        assert sidecar.proc.wait(timeout=WAIT + 15) == 0
        log = sidecar.log()
        starts = log.count("worker 0 started to drain its listeners")
        assert 2 <= starts <= 7, log
        assert "starting one to drain its listeners in 0.2s" in log, log

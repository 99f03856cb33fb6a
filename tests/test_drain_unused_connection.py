"""A drain closes the connections that never sent a byte, in connection mode too.

With ``--http-routing connection`` the worker's event loop reads each
connection's first request head (``Worker._peek``) before it routes the
connection. A review found that a connection taken and never used (a
client's spare, a load balancer's pre-opened one) held the drain until
``--header-timeout`` and then got a 408, where the per-request relay's
drain closes it at once (as Envoy closes idle downstream connections at
its drain). Now the drain closes it (a FIN): a gateway listener's at the
drain's start, every one once outbound stops. One whose head has begun
is left to finish, and one taken less than ``DRAIN_FRESH_S`` before is
closed a second after it was taken if it sent nothing meanwhile (its
client connected to send a request: it gets its answer).

A real ``l4proxy run`` of each implementation (tests/test_drain_keepalive.py's
sidecar and backend), real sockets, a real SIGTERM.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from l4proxy.sidecar.worker import DRAIN_FRESH_S
from tests.mesh import IMPLS
from tests.test_drain_keepalive import GET, read_answer, reads_eof, running

FLAGS = (
    *("--http-routing", "connection", "--workers", "1"),
    *("--drain-duration", "20", "--drain-quiet", "0", "--header-timeout", "20"),
)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_connection_that_never_sent_a_byte_is_closed_at_the_drain(
    tmp_path: Path, impl: str
) -> None:
    """Three gateway connections at the SIGTERM: one taken over a second
    before that never sent a byte reads EOF (before: a 408 at
    --header-timeout, the drain held till then); one whose head had begun
    gets its answer once the head ends; one taken a moment before the
    SIGTERM gets the answer to the request it sends once the drain began.
    Nothing is cut and the sidecar exits 0."""
    with running(tmp_path, impl, *FLAGS) as (sidecar, backend):
        idle, partial = sidecar.connect(), sidecar.connect()
        partial.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\n")  # (its empty line after the SIGTERM)
        time.sleep(DRAIN_FRESH_S)  # (idle is no fresh connection at the drain)
        fresh = sidecar.connect()
        sidecar.proc.send_signal(signal.SIGTERM)
        assert reads_eof(idle)
        sidecar.until(lambda: "[w0] draining for up to" in sidecar.log(), "the drain")
        fresh.sendall(GET % b"/")
        partial.sendall(b"\r\n")
        for sock in (fresh, partial):
            with sock:
                status, _, body = read_answer(sock)
                assert (status, body) == (200, b"ok\n")
        idle.close()
        assert sidecar.proc.wait(timeout=30) == 0
        log = sidecar.log()
        # (the 408's words, not its number alone: "408" is in a port such as 40861)
        assert "cut" not in log and " 408 " not in log and "header timeout" not in log, log
        assert backend.arrived == {"/": 2}

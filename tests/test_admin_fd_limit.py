"""The admin endpoint at the supervisor's fd limit: one line, not a flood.

The supervisor's admin endpoint is an asyncio server. When accept() fails
for want of fds (EMFILE), CPython 3.11's accept loop reports the error with
a traceback and goes on trying, a hundred times per wake-up, then tries
again a second later (CPython gh-151615): a fault run that lowered the
supervisor's RLIMIT_NOFILE (prlimit) under an admin client's load found
1,400 tracebacks (8,000 log lines) in 7 s. Now the loop's report says it
once in ten seconds, one line, and the connections that waited are served
once fds are free again.

A real ``l4proxy run`` (tests/test_drain_keepalive.py's), a real EMFILE
(tests/test_drain_dead_worker.py's prlimit), real admin clients.
"""

from __future__ import annotations

import socket
from pathlib import Path

from tests.test_drain_dead_worker import ROOT, _starts_failing, root_fixture  # noqa: F401
from tests.test_drain_keepalive import WAIT, running

CLIENTS = 3


def _ask_ready(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=WAIT)
    sock.sendall(b"GET /ready HTTP/1.0\r\n\r\n")
    return sock


def _status(sock: socket.socket) -> int:
    with sock:
        answer = b""
        while data := sock.recv(65536):
            answer += data
    return int(answer.split(b" ", 2)[1])


@ROOT
def test_an_admin_accept_out_of_fds_is_said_once_and_its_clients_served_after(
    tmp_path: Path,
) -> None:
    """The supervisor at its fd limit, three admin clients waiting: the
    log says the accept failed once, without a traceback (before: a
    hundred tracebacks at the first try); the limit restored, each client
    gets its answer."""
    with running(tmp_path, "compiled-uvloop", "--workers", "1") as (sidecar, _):
        with _starts_failing(sidecar):
            clients = [_ask_ready(sidecar.admin) for _ in range(CLIENTS)]
            sidecar.until(lambda: "Too many open files" in sidecar.log(), "the accept's failure")
        assert [_status(sock) for sock in clients] == [200] * CLIENTS
        log = sidecar.log()
        assert log.count("Too many open files") == 1, log
        assert "Traceback" not in log and "out of system resource" not in log, log
        assert "its connections wait, tried again each second" in log, log

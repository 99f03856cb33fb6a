"""``/healthcheck/fail`` tells the gateway listeners' keep-alive clients to
leave, as Envoy's listeners of the default drain type do while its health
check is failed (``DrainManagerImpl::drainClose()`` answers true then):
each answer says ``connection: close`` and its connection closes after it;
a connection between requests stays open until its next answer (Envoy
closes idle ones only in a drain proper); ``/healthcheck/ok`` ends it. The
app's own connections (not a gateway listener's) are left alone. Before,
``/healthcheck/fail`` took ``/ready`` down and nothing else: a load
balancer that moved new connections away left its keep-alive clients on
the pod.

The real ``l4proxy run`` of tests/test_drain_keepalive.py, compiled and
pure, with a supervisor and two workers (the flag goes to each over its
control channel) or ``--single-process``. The relays' side, the app's
connections among it: tests/test_drain_relay_twins.py.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import urllib.request
from pathlib import Path

import pytest

from tests.mesh import IMPLS
from tests.test_drain_keepalive import (
    GET,
    WAIT,
    Backend,
    Sidecar,
    read_answer,
    reads_eof,
    running,
)


def post(sidecar: Sidecar, path: str) -> int:
    req = urllib.request.Request(f"http://{sidecar.admin}{path}", method="POST")
    with urllib.request.urlopen(req, timeout=WAIT) as r:
        return int(r.status)


def keeps(sock: socket.socket, path: bytes = b"/") -> bool:
    """A request on *sock* answered 200; whether its answer let the
    connection persist (no ``connection: close``; one that says close must
    be followed by EOF)."""
    sock.sendall(GET % path)
    status, fields, _ = read_answer(sock)
    assert status == 200
    if fields.get("connection") == ["close"]:
        assert reads_eof(sock)
        return False
    return True


@pytest.mark.parametrize("flags", [("--workers", "2"), ("--single-process",)])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_answers_say_close_while_the_health_check_is_failed(
    tmp_path: Path, impl: str, flags: tuple[str, ...]
) -> None:
    """After POST /healthcheck/fail: the answer to a head begun before it
    says close (the upstream's keep-alive replaced) and EOF follows; a
    connection idle since before it was not closed (its next request is
    answered) and closes after that answer; every new connection's first
    answer says close (six: both workers, as the kernel spreads them).
    After POST /healthcheck/ok a connection keeps again."""
    with running(tmp_path, impl, *flags) as (sidecar, backend):
        idle, begun = sidecar.connect(), sidecar.connect()
        assert keeps(idle) and keeps(begun)
        begun.sendall(b"GET /ka HTTP/1.1\r\nHost: gw\r\n")  # (its empty line after the POST)
        assert post(sidecar, "/healthcheck/fail") == 200
        begun.sendall(b"\r\n")
        status, fields, body = read_answer(begun)
        assert (status, body, fields["connection"]) == (200, b"ka\n", ["close"]), fields
        assert reads_eof(begun)
        assert not keeps(idle)  # (closed at the POST, it would read EOF before an answer)
        for _ in range(6):
            with sidecar.connect() as sock:
                assert not keeps(sock)
        assert post(sidecar, "/healthcheck/ok") == 200
        with sidecar.connect() as sock:
            assert keeps(sock) and keeps(sock)
        assert sidecar.proc.poll() is None
        assert backend.arrived == {"/": 2 + 1 + 6 + 2, "/ka": 1}


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_worker_restarted_while_the_health_check_is_failed_says_close(
    tmp_path: Path, impl: str
) -> None:
    """The flag lives in the supervisor: a worker it starts while the flag
    is set (the one before SIGKILLed) answers saying close from its first
    request, and keeps again after /healthcheck/ok."""
    with running(tmp_path, impl, "--workers", "1") as (sidecar, _):
        assert post(sidecar, "/healthcheck/fail") == 200
        [pid] = re.findall(r"worker 0 started \(pid (\d+)\)", sidecar.log())
        os.kill(int(pid), signal.SIGKILL)
        sidecar.until(
            lambda: sidecar.log().count(" worker: listening: ") == 2, "a new worker listening"
        )
        for _ in range(2):
            with sidecar.connect() as sock:
                assert not keeps(sock)
        assert post(sidecar, "/healthcheck/ok") == 200
        with sidecar.connect() as sock:
            assert keeps(sock) and keeps(sock)


class ClosingBackend(Backend):
    """HTTP/1.1 on 127.0.0.1:0 as servers answer a request that says
    ``connection: close``: the answer says so too and the connection
    closes after it; else keep-alive. :attr:`heads`: the request heads it
    read, in order."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        super().__init__()

    def _on_head(self, conn: socket.socket, head: bytes) -> bool:
        self.heads.append(head)
        close = re.search(rb"(?im)^connection:[ \t]*close[ \t]*$", head) is not None
        said = b"Connection: close\r\n" if close else b""
        conn.sendall(b"HTTP/1.1 200 OK\r\n%sContent-Length: 3\r\n\r\nok\n" % said)
        return not close


@pytest.mark.parametrize("impl", list(IMPLS))
def test_connection_mode_tells_new_connections_to_close_while_failed(
    tmp_path: Path, impl: str
) -> None:
    """--http-routing connection relays a gateway connection at L4 after
    its first head: the answers are the upstream's. Before, /healthcheck/fail
    changed /ready alone there. While the flag is set a connection taken
    sends its first request saying ``connection: close`` (the last line of
    its head; its other lines as sent): its upstream answers so and closes,
    the client reads the close and EOF, as a request-mode answer closes it.
    A connection relayed before the POST cannot be told (L4): it keeps.
    After /healthcheck/ok a new connection's request goes as sent and keeps."""
    backend = ClosingBackend()
    sidecar = Sidecar(tmp_path, impl, backend, "--http-routing", "connection")  # type: ignore[arg-type]
    try:
        before = sidecar.connect()
        assert keeps(before) and keeps(before)
        assert post(sidecar, "/healthcheck/fail") == 200
        for _ in range(3):
            with sidecar.connect() as sock:
                sock.sendall(b"GET /told HTTP/1.1\r\nHost: gw\r\nX-A: 1\r\n\r\n")
                status, fields, body = read_answer(sock)
                assert (status, body, fields.get("connection")) == (200, b"ok\n", ["close"])
                assert reads_eof(sock)
        assert keeps(before)  # (relayed at L4 since before: not told)
        told = [h for h in backend.heads if h.startswith(b"GET /told ")]
        assert told == [b"GET /told HTTP/1.1\r\nHost: gw\r\nX-A: 1\r\nconnection: close"] * 3
        with sidecar.connect() as sock:  # (an upgrade is not told: no close on a tunnel)
            sock.sendall(b"GET /ws HTTP/1.1\r\nHost: gw\r\nConnection: upgrade\r\n")
            sock.sendall(b"Upgrade: websocket\r\n\r\n")
            assert read_answer(sock)[0] == 200
        assert b"close" not in backend.heads[-1]
        assert post(sidecar, "/healthcheck/ok") == 200
        with sidecar.connect() as sock:
            assert keeps(sock) and keeps(sock)
        assert b"close" not in backend.heads[-1]
        assert sidecar.proc.poll() is None
    finally:
        sidecar.close()
        backend.close()

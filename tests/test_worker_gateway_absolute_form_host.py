"""An absolute-form request whose Host header names another host, through a
real worker of each relay twin on a gateway listener (an Istio Gateway of
every host, a VirtualService sending every request to one backend that
records the request lines it reads):

* ``GET http://b.example/x`` with ``Host: a.example`` is answered 400 and
  the connection closed, nothing of it (nor of a request pipelined behind
  it) reaching the backend, as HAProxy answers it. It was routed by the
  target's authority and forwarded with the Host as sent, so a backend
  that reads Host rather than the target (RFC 9112 §3.2.2 has a proxy
  make Host from the target) served a.example a request routed for
  b.example;
* a Host that names the same host (another ASCII case, a default port
  written on one side only) still goes upstream as sent.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from tests._worker import (
    WEB_HOST,
    drive_gateway,
    every_host_gateway,
    gateway_virtual_service,
    web_entry,
)
from tests.conftest import accept_until_closed

TWINS = ["pure", "compiled"]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Recorder:
    """A backend on 127.0.0.1 that answers every request head it reads
    with OK and keeps its request line."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lines: list[bytes] = []
        self.lock = threading.Lock()
        accept_until_closed(self.listener, self._start)

    def _start(self, conn: socket.socket) -> None:
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                with self.lock:
                    self.lines.append(head.split(b"\r\n", 1)[0])
                conn.sendall(OK)

    def close(self) -> None:
        self.listener.close()


def _rules(port: int, backend: Recorder) -> str:
    routes = f"  - route: [{{destination: {{host: {WEB_HOST}}}}}]\n"
    return (
        every_host_gateway(port)
        + gateway_virtual_service("site", '"*"', routes)
        + web_entry(backend.port)
    )


def _exchange(address: tuple[str, int], data: bytes) -> tuple[bytes, bool]:
    """What the relay answered *data* on a new connection, and whether it
    closed the connection (its FIN read within 5 s of the last byte)."""
    s = socket.create_connection(address, 10)
    s.settimeout(5)
    got = b""
    try:
        s.sendall(data)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return got, True
            got += chunk
            if got.count(b"HTTP/1.1 ") == data.count(b" HTTP/1.1\r\n") and got.endswith(b"ok"):
                return got, False
    except TimeoutError:
        return got, False
    finally:
        s.close()


def _drive(
    which: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data: bytes
) -> tuple[bytes, bool, list[bytes]]:
    backend = Recorder()
    try:
        got, closed = drive_gateway(
            which,
            monkeypatch,
            tmp_path / "rules.yaml",
            lambda port: _rules(port, backend),
            lambda address: _exchange(address, data),
        )
    finally:
        backend.close()
    with backend.lock:
        return got, closed, list(backend.lines)


@pytest.mark.parametrize("which", TWINS)
def test_a_host_that_names_another_host_is_refused(
    which: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = (
        b"GET /first HTTP/1.1\r\nHost: a.example\r\n\r\n"
        b"GET http://b.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n"
        b"GET /after HTTP/1.1\r\nHost: a.example\r\n\r\n"
    )
    got, closed, lines = _drive(which, monkeypatch, tmp_path, data)
    assert got.startswith(OK + b"HTTP/1.1 400 Bad Request\r\n"), got
    assert got.endswith(b"\r\n\r\nHost header differs from the request-target's authority"), got
    assert closed
    assert lines == [b"GET /first HTTP/1.1"]


@pytest.mark.parametrize("which", TWINS)
def test_a_host_that_names_the_same_host_goes_as_sent(
    which: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = (
        b"GET http://A.example:80/x HTTP/1.1\r\nHost: a.EXAMPLE\r\n\r\n"
        b"GET https://a.example/y HTTP/1.1\r\nHost: a.example:443\r\n\r\n"
    )
    got, closed, lines = _drive(which, monkeypatch, tmp_path, data)
    assert got.count(OK) == 2 and not closed, got
    assert lines == [b"GET http://A.example:80/x HTTP/1.1", b"GET https://a.example/y HTTP/1.1"]

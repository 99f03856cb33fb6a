"""A drain tells keep-alive clients to leave, as Envoy's drain close does.

A review (SIGTERM to a gateway under keep-alive load) found the clients'
connections served for the whole ``--drain-duration``, never told
``Connection: close``, and then reset. Now (see "Drain" in
``l4proxy/dataplane/_relay_py.py``): each answer after the drain began
says ``connection: close`` and its connection then reads EOF; a
connection between requests reads EOF at once; a request in flight gets
its whole answer; what the deadline cuts is counted in the log.

Each test runs a real ``l4proxy run`` (a supervisor and its worker, or
``--single-process``), compiled and pure, with a gateway listener on
loopback port 0 (read back from its log) in front of a backend of our own
that holds the slow answers until the test lets them go: the order of
events is made by the test, never by a clock.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4proxy.dataplane._exchange_py import Client, Close, Exchange, Route
from l4proxy.dataplane.framing import parse_response_head
from tests._worker import gateway_service
from tests.mesh import IMPLS

REPO = Path(__file__).resolve().parent.parent
SLOW_BODY = bytes(range(256)) * 400  # 100 KiB, whole or not
STREAM_BODY = b"s" * 20000
WAIT = 30.0  # a socket's timeout: a test that fails fails within it, never waits on it


class Backend:
    """HTTP/1.1 on 127.0.0.1:0, keep-alive, a thread per connection. Paths:
    ``/`` a short answer; ``/ka`` the same saying ``Connection: keep-alive``
    (nginx's); ``/slow`` held whole until :attr:`gate` is set; ``/stream``
    its head and half its body at once, the rest after :attr:`gate`.
    :attr:`arrived` counts the requests by path; :attr:`held` is set once
    a held one arrived."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.held = threading.Semaphore(0)
        self.arrived: Counter[str] = Counter()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                try:
                    if not self._on_head(conn, head):
                        return
                except OSError:
                    return

    def _on_head(self, conn: socket.socket, head: bytes) -> bool:
        """Answer the request of *head* on *conn*: whether the connection
        goes on (a subclass's to say otherwise)."""
        path = head.split(b" ", 2)[1].decode()
        self.arrived[path] += 1
        self._answer(conn, path)
        return True

    def _answer(self, conn: socket.socket, path: str) -> None:
        if path == "/slow":
            self.held.release()
            self.gate.wait()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(SLOW_BODY) + SLOW_BODY
            )
        elif path == "/stream":
            half = len(STREAM_BODY) // 2
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(STREAM_BODY)
                + STREAM_BODY[:half]
            )
            self.held.release()
            self.gate.wait()
            conn.sendall(STREAM_BODY[half:])
        elif path == "/ka":
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nka\n"
            )
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")

    def close(self) -> None:
        self.gate.set()
        self.sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sidecar:
    """``l4proxy run`` as a gateway on 127.0.0.1:0 in front of *backend*,
    the implementation *impl* (tests.mesh.IMPLS), its log in a file."""

    def __init__(self, tmp: Path, impl: str, backend: Backend, *flags: str) -> None:
        rules = tmp / "rules"
        rules.mkdir()
        (rules / "gateway.yaml").write_text(gateway_service(backend.port))
        self.log_path = tmp / "log"
        env_extra, impl_args = IMPLS[impl]
        env = {k: v for k, v in os.environ.items() if k != "L4PROXY_NO_EXTENSIONS"}
        env.update(env_extra)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        # (a test that posts to the admin endpoint takes a port free now, known before start)
        self.admin = f"127.0.0.1:{_free_port()}" if "--admin" not in flags else ""
        argv = [
            *(sys.executable, "-m", "l4proxy", "run", "--no-transparent"),
            *("--listen", "127.0.0.1:0", "--rules", str(rules), "--header-timeout", "60"),
            *(("--admin", self.admin) if self.admin else ()),
            *impl_args,
            *flags,
        ]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
        self.until(lambda: " worker: listening: " in self.log(), "the worker listening")
        line = next(ln for ln in self.log().splitlines() if " worker: listening: " in ln)
        host, port = line.split("listening: gateway:")[1].split(";")[0].rsplit(":", 1)
        self.listen = (host, int(port))
        want = "relay=pure" if "L4PROXY_NO_EXTENSIONS" in env_extra else "relay=compiled"
        assert want in line, line

    def log(self) -> str:
        return self.log_path.read_text()

    def until(self, cond: object, what: str) -> None:
        assert callable(cond)
        deadline = time.monotonic() + WAIT
        while not cond():
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}):\n{self.log()}"
            assert time.monotonic() < deadline, f"{what} within {WAIT}s:\n{self.log()}"
            time.sleep(0.05)

    def connect(self) -> socket.socket:
        return socket.create_connection(self.listen, timeout=WAIT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)


@contextlib.contextmanager
def running(tmp: Path, impl: str, *flags: str) -> Iterator[tuple[Sidecar, Backend]]:
    backend = Backend()
    sidecar = Sidecar(tmp, impl, backend, *flags)
    try:
        yield sidecar, backend
    finally:
        backend.close()
        sidecar.close()


def read_answer(sock: socket.socket) -> tuple[int, dict[str, list[str]], bytes]:
    """One response from *sock*: its status, its fields (lowercase names,
    each one's values in order) and its body (Content-Length framed)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"EOF before a whole head: {buf!r}"
        buf += data
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    fields: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields.setdefault(name.strip().lower(), []).append(value.strip())
    length = int(fields["content-length"][0])
    while len(body) < length:
        data = sock.recv(65536)
        assert data, f"EOF after {len(body)} of {length} body bytes"
        body += data
    assert len(body) == length, "bytes after the answer"
    return int(lines[0].split()[1]), fields, body


def reads_eof(sock: socket.socket) -> bool:
    """The peer closed cleanly (FIN) and sent nothing more."""
    return sock.recv(65536) == b""


GET = b"GET %s HTTP/1.1\r\nHost: gw\r\n\r\n"


@pytest.mark.parametrize("impl", list(IMPLS))
def test_keep_alive_clients_are_told_to_leave_at_sigterm(tmp_path: Path, impl: str) -> None:
    """SIGTERM to the supervisor: a connection between requests reads EOF;
    the next answer on a connection whose next head had begun says
    ``connection: close`` (an upstream's ``keep-alive`` replaced, an
    HTTP/1.0 client's too) and EOF follows it; a request in flight at the
    upstream gets its whole answer, saying close; one whose head went out
    before gets the rest of its body, then EOF. Nothing was cut and no
    request was sent twice. Before, each kept being served, nothing said
    close, and the deadline reset them."""
    with running(tmp_path, impl, "--workers", "1", "--drain-duration", "20") as (sidecar, backend):
        idle, partial, old, slow, stream = (sidecar.connect() for _ in range(5))
        for sock in (idle, partial):
            sock.sendall(GET % b"/")
            status, fields, body = read_answer(sock)
            assert (status, body) == (200, b"ok\n") and "connection" not in fields
        old.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert read_answer(old)[1]["connection"] == ["keep-alive"]
        partial.sendall(b"GET /ka HTTP/1.1\r\nHost: gw\r\n")  # (its empty line after the SIGTERM)
        old.sendall(b"GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n")
        slow.sendall(GET % b"/slow")
        stream.sendall(GET % b"/stream")
        assert backend.held.acquire(timeout=WAIT) and backend.held.acquire(timeout=WAIT)
        head = b""
        while b"\r\n\r\n" not in head:  # its head went out before the drain
            head += stream.recv(65536)
        assert b"connection" not in head.lower(), head

        sidecar.proc.send_signal(signal.SIGTERM)
        assert reads_eof(idle)  # (before: reset at the deadline)
        for sock in (partial, old):
            sock.sendall(b"\r\n")
            status, fields, body = read_answer(sock)
            assert (status, body, fields["connection"]) == (200, b"ka\n", ["close"]), fields
            assert reads_eof(sock)
        backend.gate.set()
        status, fields, body = read_answer(slow)
        assert (status, fields["connection"], body) == (200, ["close"], SLOW_BODY)
        assert reads_eof(slow)
        rest = b""
        while data := stream.recv(65536):  # to its EOF
            rest += data
        assert head.split(b"\r\n\r\n", 1)[1] + rest == STREAM_BODY

        assert sidecar.proc.wait(timeout=WAIT) == 0
        log = sidecar.log()
        assert "cut" not in log, log
        assert backend.arrived == {"/": 3, "/ka": 2, "/slow": 1, "/stream": 1}


@pytest.mark.parametrize("impl", list(IMPLS))
def test_an_idle_keep_alive_connection_reads_eof_at_quitquitquit(tmp_path: Path, impl: str) -> None:
    """POST /quitquitquit drains as SIGTERM does: a keep-alive connection
    that served a request and one that never sent a byte read EOF (a FIN,
    no reset) with nothing more, and the process exits 0."""
    with running(tmp_path, impl, "--single-process", "--drain-duration", "20") as (sidecar, _):
        used, fresh = sidecar.connect(), sidecar.connect()
        used.sendall(GET % b"/")
        assert read_answer(used)[0] == 200
        req = urllib.request.Request(f"http://{sidecar.admin}/quitquitquit", method="POST")
        with urllib.request.urlopen(req, timeout=WAIT) as r:
            assert r.status == 200
        assert reads_eof(used) and reads_eof(fresh)
        assert sidecar.proc.wait(timeout=WAIT) == 0


@pytest.mark.parametrize("impl", list(IMPLS))
def test_the_log_says_how_many_connections_the_deadline_cut(tmp_path: Path, impl: str) -> None:
    """A request still waiting at the deadline is cut, and the worker says
    so, with the count: that one (the idle connection beside it left at the
    drain's start, and is not among them). Before, the relay's connections
    were cut unsaid (only the L4 pump's were counted)."""
    with running(tmp_path, impl, "--workers", "1", "--drain-duration", "1") as (sidecar, backend):
        idle, slow = sidecar.connect(), sidecar.connect()
        idle.sendall(GET % b"/")
        assert read_answer(idle)[0] == 200
        slow.sendall(GET % b"/slow")
        assert backend.held.acquire(timeout=WAIT)
        sidecar.proc.send_signal(signal.SIGTERM)
        assert reads_eof(idle)
        assert sidecar.proc.wait(timeout=WAIT) == 0
        cuts = re.findall(r"passed: cut (\d+) connection\(s\) still open", sidecar.log())
        assert cuts == ["1"], sidecar.log()
        with pytest.raises(ConnectionResetError):
            slow.recv(65536)


# -- the pure core ---------------------------------------------------------------------


def _answered(ex: Exchange, response: bytes) -> list[object]:
    """Route the head *ex* has, and feed it *response*: the actions."""
    out: list[object] = list(ex.routed(reused=False))
    return out + list(ex.upstream_data(response))


def test_an_exchange_between_requests_closes_at_the_drain() -> None:
    ex = Exchange()
    assert isinstance(ex.client_data(GET % b"/")[0], Route)
    _answered(ex, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert ex.drain() == [Close(quiet=False)]  # (the lingering close: FIN)
    assert ex.client_data(GET % b"/") == []  # nothing read after it


@pytest.mark.parametrize("upstream", [b"", b"Connection: keep-alive\r\n"])
def test_an_answer_after_the_drain_says_close_and_closes(upstream: bytes) -> None:
    ex = Exchange()
    assert ex.client_data(b"GET / HTTP/1.1\r\nHost: gw\r\n") == []  # a head begun
    assert ex.drain() == []
    assert isinstance(ex.client_data(b"\r\n")[0], Route)
    out = _answered(ex, b"HTTP/1.1 200 OK\r\n" + upstream + b"Content-Length: 2\r\n\r\nok")
    [head, *_] = [a.data for a in out if isinstance(a, Client)]
    resp = parse_response_head(head, 65536)
    assert resp is not None and resp.values("connection") == ["close"]
    assert out[-1] == Close(quiet=False)

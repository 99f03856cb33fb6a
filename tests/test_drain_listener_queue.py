"""A listener that a drain closes serves what waits in its accept queue.

An SRE review found that closing a listening socket resets the
connections the kernel had completed into its accept queue and the
proxy had not taken yet: four clients opening a connection per request
each got one ``ConnectionResetError`` after sending their request at the
SIGTERM (those connections never reached the proxy: no access log line),
at the end of ``--drain-inbound``, and, with ``--drain-strategy
immediate``, the instant reconnect of each keep-alive client whose idle
connection the drain closed. Now (see :meth:`Worker.stop_accepting`) a
listener stops taking new handshakes first (a socket filter drops new
SYNs: the client's retransmission finds it closed and is refused), what
its queue holds and what completes meanwhile is taken and served (one
request, answered ``connection: close``), and then it closes.

The real ``l4proxy run`` of tests/test_drain_keepalive.py, compiled and
pure, and, for a queue whose content the test makes itself, an
in-process worker (tests/_worker.py) whose event loop takes nothing
until the drain begins. A refused connect is what a client of a closed
listener gets and is fine; what must not happen is a reset, or an EOF
without an answer, on a connection whose request was sent.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from l4proxy.dataplane.listener import bind_listener
from tests._worker import _worker_twin, gateway_service, worker_on
from tests.mesh import IMPLS
from tests.test_drain_keepalive import GET, WAIT, Backend, Sidecar, running

CLIENTS = 4
BEFORE = 20  # requests each client has answered before the SIGTERM


def _ask(sock: socket.socket) -> tuple[str, bool]:
    """A GET on *sock*: ``answered`` (a whole 200), ``reset`` or ``eof``
    (no whole answer), and whether the answer said ``connection: close``."""
    try:
        sock.sendall(GET % b"/")
        buf = b""
        while not buf.endswith(b"\r\n\r\nok\n"):
            data = sock.recv(65536)
            if not data:
                return "eof", True
            buf += data
    except (ConnectionResetError, BrokenPipeError):
        return "reset", True
    assert buf.startswith(b"HTTP/1.1 200 "), buf
    return "answered", b"\r\nconnection: close\r\n" in buf.lower()


def _one_request(address: tuple[str, int]) -> str:
    """A GET on a new connection to *address*: ``refused`` (the connect),
    else what :func:`_ask` says."""
    try:
        sock = socket.create_connection(address, timeout=WAIT)
    except ConnectionRefusedError:
        return "refused"
    with sock:
        return _ask(sock)[0]


class Clients:
    """*n* threads, each calling a client of its own, ``make()``, again and
    again until :meth:`stop`; the outcomes it returns counted, each
    thread's apart."""

    def __init__(self, n: int, make: Callable[[], Callable[[], str]]) -> None:
        self.counts = [Counter[str]() for _ in range(n)]
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(c, make())) for c in self.counts]
        for t in self.threads:
            t.start()

    def _run(self, counts: Counter[str], one: Callable[[], str]) -> None:
        while not self.stopping.is_set():
            outcome = one()
            counts[outcome] += 1
            if outcome == "refused":
                self.stopping.wait(0.001)  # (a closed listener: not a spin)

    def answered_each(self, n: int) -> bool:
        return all(c["answered"] >= n for c in self.counts)

    def stop(self) -> Counter[str]:
        self.stopping.set()
        for t in self.threads:
            t.join(WAIT)
        return sum(self.counts, Counter[str]())


def _drain_under_churn(sidecar: Sidecar, clients: Clients) -> Counter[str]:
    """SIGTERM once each client had BEFORE answers; the outcomes once the
    sidecar exited (0) and every client was refused after that."""
    sidecar.until(lambda: clients.answered_each(BEFORE), f"{BEFORE} answers each")
    sidecar.proc.send_signal(signal.SIGTERM)
    assert sidecar.proc.wait(timeout=WAIT) == 0
    refused = [c["refused"] for c in clients.counts]
    deadline = time.monotonic() + WAIT
    while not all(c["refused"] > r for c, r in zip(clients.counts, refused, strict=True)):
        assert time.monotonic() < deadline, f"a refusal each after the exit: {clients.counts}"
        time.sleep(0.01)
    return clients.stop()


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_connection_per_request_is_never_reset_at_sigterm(tmp_path: Path, impl: str) -> None:
    """Four clients each opening a connection per request as fast as they
    are answered, SIGTERM (the gateway listener closes at once): every
    request sent was answered; the rest were refused connects. Before,
    each client got about one reset, the connection the queue held."""
    flags = ("--workers", "1", "--drain-duration", "10", "--drain-quiet", "0")
    with running(tmp_path, impl, *flags) as (sidecar, _):
        clients = Clients(CLIENTS, lambda: lambda: _one_request(sidecar.listen))
        try:
            outcomes = _drain_under_churn(sidecar, clients)
        finally:
            clients.stop()
        assert outcomes["reset"] == outcomes["eof"] == 0, outcomes
        assert set(outcomes) == {"answered", "refused"}, outcomes


@pytest.mark.parametrize("impl", list(IMPLS))
def test_the_end_of_drain_inbound_resets_nothing(tmp_path: Path, impl: str) -> None:
    """--drain-inbound 1: the listener serves a second more after the
    SIGTERM (each answer saying close), then closes under the same churn:
    nothing sent is reset or left unanswered. Before, resets at its close."""
    flags = ("--workers", "1", "--drain-duration", "10", "--drain-quiet", "0")
    with running(tmp_path, impl, *flags, "--drain-inbound", "1") as (sidecar, _):
        clients = Clients(CLIENTS, lambda: lambda: _one_request(sidecar.listen))
        try:
            outcomes = _drain_under_churn(sidecar, clients)
        finally:
            clients.stop()
        assert outcomes["reset"] == outcomes["eof"] == 0, outcomes
        assert set(outcomes) == {"answered", "refused"}, outcomes


class _KeepAlive:
    """A keep-alive client: one connection while its answers keep it, a
    new one at once after an answer that said close or a failure."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.sock: socket.socket | None = None

    def __call__(self) -> str:
        fresh = self.sock is None
        if self.sock is None:
            try:
                self.sock = socket.create_connection(self.address, timeout=WAIT)
            except ConnectionRefusedError:
                return "refused"
        outcome, closes = _ask(self.sock)
        if closes:
            self.sock.close()
            self.sock = None
        # A kept connection that closes as the next request goes out is the
        # race every HTTP client knows (an idempotent request is sent again
        # on a new connection; RFC 9112 9.3.1): "idle_closed"; on a new
        # connection the same EOF is a request lost.
        if outcome == "eof" and not fresh:
            return "idle_closed"
        return outcome


@pytest.mark.parametrize("impl", list(IMPLS))
def test_immediate_strategys_reconnects_are_never_reset(tmp_path: Path, impl: str) -> None:
    """--drain-strategy immediate with four keep-alive clients that
    reconnect at once: their idle connections close at the SIGTERM, and
    each reconnect is answered or refused, never reset. Before, each
    client's reconnect landed in the queue of the closing listener: reset."""
    flags = ("--workers", "1", "--drain-duration", "10", "--drain-quiet", "0")
    with running(tmp_path, impl, *flags, "--drain-strategy", "immediate") as (sidecar, _):
        clients = Clients(CLIENTS, lambda: _KeepAlive(sidecar.listen))
        try:
            outcomes = _drain_under_churn(sidecar, clients)
        finally:
            clients.stop()
        assert outcomes["reset"] == outcomes["eof"] == 0, outcomes


# -- a queue the test fills -------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "routing"), [("pure", "request"), ("pure", "connection"), ("compiled", "connection")]
)
def test_the_connections_queued_at_the_drain_are_served(
    which: str, routing: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Five connections completed into the gateway listener's accept queue
    while the worker's event loop took nothing (the test holds it), each
    with its request sent, then the drain: each is answered (the relay's
    answer saying close; the L4 pump's relayed as the backend gave it).
    Before, the listener closed at once and all five were reset."""
    _worker_twin(which, monkeypatch)
    backend = Backend()
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(backend.port))

    async def main() -> list[str]:
        lst = bind_listener("127.0.0.1", 0, "gateway")
        async with worker_on([lst], rules, http_routing=routing) as (_, worker):
            # (no await from here to the drain: the loop accepts nothing)
            socks = [socket.create_connection(lst.address, timeout=WAIT) for _ in range(5)]
            for sock in socks:
                sock.sendall(GET % b"/")
            drained = asyncio.ensure_future(worker.drain(WAIT, quiet=0))
            loop = asyncio.get_running_loop()
            outcomes = await asyncio.gather(
                *(loop.run_in_executor(None, _answer_of, sock) for sock in socks)
            )
            await drained
            return list(outcomes)

    try:
        assert asyncio.run(main()) == ["answered"] * 5
    finally:
        backend.close()


def _answer_of(sock: socket.socket) -> str:
    """What *sock*, its request sent, gets: ``answered``, ``reset``, ``eof``."""
    with sock:
        buf = b""
        try:
            while not buf.endswith(b"ok\n"):
                data = sock.recv(65536)
                if not data:
                    return "eof"
                buf += data
        except ConnectionResetError:
            return "reset"
        assert buf.startswith(b"HTTP/1.1 200 "), buf
        return "answered"

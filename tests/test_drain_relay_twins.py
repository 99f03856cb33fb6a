"""The relays' side of a drain, each twin in-process (see "Drain" in
``l4proxy/dataplane/_relay_py.py`` and ``ext/relay.pyx``):
``drain(spread=...)`` closes the connections between requests one after
another, the k-th of N (in the order they were taken) at k * spread / N;
``discourage()`` makes a gateway listener's answers say close, closes
nothing between requests, leaves the app's own connections alone, and
ends when turned off.

Clients are socketpairs handed to the relay (``add``), with a gateway
listener's origin or an outbound one; the backend is tests/test_drain_keepalive.py's.
The spread is seen by the order and the batches of the closes, with a
bound on the clock far from the rule's times (0.75 s apart; a relay
closes on its tick, a quarter of a second).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from l4proxy.dataplane._relay_py import Decision
from l4proxy.rules.classify import Origin
from tests.conftest import load_twin
from tests.test_drain_keepalive import GET, WAIT, Backend, read_answer, reads_eof

TWINS = ("pure", "compiled")
GATEWAY = Origin(None, 8000, True)
OUTBOUND = Origin("198.19.0.10", 8080, False)


@contextlib.contextmanager
def relay_to_backend(which: str) -> Iterator[tuple[Any, Backend]]:
    backend = Backend()
    endpoint = ("127.0.0.1", backend.port)
    relay: Any = load_twin("relay", which).HttpRelay(
        lambda head, origin: Decision(endpoints=(endpoint,)), lambda *a: None
    )
    relay.start()
    try:
        yield relay, backend
    finally:
        relay.close()
        backend.close()


def client(relay: Any, origin: Origin) -> socket.socket:
    ours, theirs = socket.socketpair()
    ours.settimeout(WAIT)
    relay.add(theirs, origin)
    return ours


def _until_head_relayed(sock: socket.socket) -> None:
    """Until the answer's head reached *sock* (peeked, left to read): the
    backend sent it, and the relay may not have read it yet."""
    deadline = time.monotonic() + WAIT
    while b"\r\n\r\n" not in sock.recv(65536, socket.MSG_PEEK):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def keeps(sock: socket.socket) -> bool:
    """A request on *sock* answered 200; whether its answer let the
    connection persist (one that says close must be followed by EOF)."""
    sock.sendall(GET % b"/")
    status, fields, _ = read_answer(sock)
    assert status == 200
    if fields.get("connection") == ["close"]:
        assert reads_eof(sock)
        return False
    return True


def closes(socks: list[socket.socket], within: float) -> list[list[int]]:
    """Wait for every one of *socks* to read EOF (a FIN, nothing more),
    within *within* s in all: the batches found readable at once, by their
    index in *socks* (epoll, not select(): in a long run the test process's
    fds may be numbered past select()'s 1024)."""
    batches = []
    pending = len(socks)
    deadline = time.monotonic() + within
    with selectors.DefaultSelector() as sel:
        for i, s in enumerate(socks):
            sel.register(s, selectors.EVENT_READ, i)
        while pending:
            left = max(0.0, deadline - time.monotonic())
            ready = sel.select(left)
            assert ready, f"{pending} connection(s) still open after {within}s"
            batch = sorted(key.data for key, _ in ready)
            for i in batch:
                assert reads_eof(socks[i])
                sel.unregister(socks[i])
                pending -= 1
            batches.append(batch)
    return batches


@pytest.mark.parametrize("which", TWINS)
def test_a_spread_drain_closes_idle_connections_in_turn(which: str) -> None:
    """drain(spread=3) with four idle gateway connections: EOF in the order
    they were taken, the first alone or with one other, the last 2 s or
    more after the drain (2.25 s by the rule). Before (no spread), all at
    once."""
    with relay_to_backend(which) as (relay, _):
        socks = [client(relay, GATEWAY) for _ in range(4)]
        for sock in socks:  # (one after another: the order they are taken)
            assert keeps(sock)
        started = time.monotonic()
        relay.drain(inbound_only=True, spread=3.0)
        batches = closes(socks, WAIT)
        took = time.monotonic() - started
        assert [i for batch in batches for i in batch] == [0, 1, 2, 3], batches
        assert len(batches[0]) <= 2, batches
        assert took >= 2.0, (took, batches)


@pytest.mark.parametrize("which", TWINS)
def test_a_connection_scheduled_that_takes_a_request_closes_after_its_answer(
    which: str,
) -> None:
    """drain(spread=60) with two idle connections: the first closes at once;
    the second, due in 30 s, sends a request meanwhile and is answered,
    saying close, then EOF."""
    with relay_to_backend(which) as (relay, _):
        first, second = client(relay, GATEWAY), client(relay, GATEWAY)
        assert keeps(first) and keeps(second)
        relay.drain(inbound_only=True, spread=60.0)
        assert reads_eof(first)
        assert not keeps(second)


@pytest.mark.parametrize("which", TWINS)
def test_discourage_tells_a_gateway_listeners_clients_alone(which: str) -> None:
    """discourage(True): a gateway listener's connection idle since before
    it is not closed, and its next answer says close; the app's own
    connection (outbound) keeps. discourage(False): a new gateway
    connection keeps."""
    with relay_to_backend(which) as (relay, _):
        inbound, app = client(relay, GATEWAY), client(relay, OUTBOUND)
        assert keeps(inbound) and keeps(app)
        relay.discourage(True)
        assert not keeps(inbound)  # (closed at once, it would read EOF before an answer)
        assert keeps(app) and keeps(app)
        fresh = client(relay, GATEWAY)
        assert not keeps(fresh)  # (taken while it holds)
        relay.discourage(False)
        again = client(relay, GATEWAY)
        assert keeps(again) and keeps(again)


@pytest.mark.parametrize("ok_before_its_end", [False, True], ids=["failed", "fail-then-ok"])
@pytest.mark.parametrize("which", TWINS)
def test_an_answer_whose_head_went_out_before_discourage_keeps_as_it_said(
    which: str, ok_before_its_end: bool
) -> None:
    """A gateway connection's answer whose head went out (keeping the
    client) before discourage(True): its connection stays after its body,
    as that head said (Envoy asks drainClose() at a response's head),
    and its next answer says close; with discourage(False) before its
    end, nothing was told: the next answer keeps too. The compiled twin
    cleared the head's keep at discourage(True) and closed after the body,
    discourage(False) or not; the pure one closed unless discourage(False)
    came first. A fresh connection's answer says when each change took."""
    with relay_to_backend(which) as (relay, backend):
        sock = client(relay, GATEWAY)
        sock.sendall(GET % b"/stream")
        assert backend.held.acquire(timeout=WAIT)  # (its head and half its body sent)
        _until_head_relayed(sock)
        relay.discourage(True)
        assert not keeps(client(relay, GATEWAY))  # (applied)
        if ok_before_its_end:
            relay.discourage(False)
            assert keeps(client(relay, GATEWAY))
        backend.gate.set()
        status, fields, _ = read_answer(sock)
        assert status == 200 and "connection" not in fields, fields
        assert keeps(sock) is ok_before_its_end  # (not closed after its body: answered)

"""--access-log for connections routed at L4: what the pump reports of
each connection's end for the line, both twins."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.conftest import load_twin
from tests.test_pump import Net, make_pump, take_ended, wait_for

# -- what the pump reports ---------------------------------------------------------------


@pytest.fixture(params=["compiled", "pure"])
def twin(request: pytest.FixtureRequest) -> ModuleType:
    return load_twin("pump", request.param)


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net()
    yield n
    n.close()


def test_the_pump_reports_each_ends_bytes_each_way_and_when(twin: ModuleType, net: Net) -> None:
    """ends(): a token's connection's bytes moved client to upstream (its
    pending bytes first) and back, and when it ended, on time.monotonic()'s
    clock; a hand-off that never was a connection: none; ended() as before."""
    p = make_pump(twin)
    client, server = net.pair(p, pending_upstream=b"head:", token=7)
    client.sendall(b"x" * 1000)
    got = b""
    while len(got) < 1005:
        got += server.recv(65536)
    server.sendall(b"y" * 300)
    assert len(client.recv(65536, socket.MSG_WAITALL)) == 300
    before = time.monotonic()
    client.close()
    server.close()
    r, w = os.pipe()
    p.add(r, w, token=8)  # (not sockets: closed at once)
    deadline = time.monotonic() + 5
    ends: list[tuple[int, int, int, float]] = []
    while len(ends) < 2 and time.monotonic() < deadline:
        ends += p.ends()
        time.sleep(0.005)
    after = time.monotonic()
    by_token = {e[0]: e for e in ends}
    assert sorted(by_token) == [7, 8]
    assert by_token[7][1:3] == (1005, 300)
    assert before <= by_token[7][3] <= after
    assert by_token[8][1:3] == (0, 0)
    quiet = net.pair(p, token=9)
    quiet[0].close()
    quiet[1].close()
    assert take_ended(p, 1) == [9]  # (ended(): the tokens alone)
    assert wait_for(lambda: p.active == 0)

"""``l4proxy_refused_total{reason="fd_limit"}`` counts each connection
refused for want of an fd once, and nothing else.

A real worker of each relay twin on a gateway listener (the pure one:
the worker's accept; the compiled one: the relay's), in this process,
whose RLIMIT_NOFILE is lowered to the fds it holds: N clients that find
no fd free are each reset and counted one, and an accept() that finds no
fd with nothing waiting counts none (Linux takes the new socket's fd
before it looks at the queue, so accept() fails with EMFILE on an empty
queue too). Before: every accept() that found no fd counted one at least,
whatever waited; the sidecar's counter said 2 for 1 refused connection.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4proxy.sidecar.worker import Worker
from tests._scripted import Scripted, _response, _status, _until
from tests._worker import drive_gateway, gateway_service

N = 5
GET = b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n"


def _lowest_free_fd() -> int:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


@contextlib.contextmanager
def _fds_left(n: int) -> Iterator[int]:
    """This process's soft RLIMIT_NOFILE lowered so that *n* fds are left
    to open (the lowest free ones); yields the first of them."""
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    free = _lowest_free_fd()
    resource.setrlimit(resource.RLIMIT_NOFILE, (free + n, limits[1]))
    try:
        yield free
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def _reset(s: socket.socket, address: tuple[str, int]) -> bool:
    """Whether *s*, connected to *address*, is reset there unanswered (its
    connect() may already see the reset)."""
    try:
        s.connect(address)
        s.recv(1)
    except ConnectionResetError:
        return True
    return False


def _fds() -> dict[int, str]:
    """What each fd of this process is."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # (listdir's own)
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def _is_socket(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_each_connection_refused_for_want_of_an_fd_counts_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    """No fd left: N clients, each reset unanswered, count N. Then one fd
    left: a client accepted takes it, and the accept after it (nothing
    waiting) finds none and counts nothing; that client is answered once
    the limit is back. ``l4proxy_refused_total{reason="fd_limit"}`` == N
    (before: N + 1)."""
    backend = Scripted([])
    counted: list[float] = []

    def drained(worker: Worker) -> None:
        rows = worker.counter_snapshot().get("l4proxy_refused_total", {})
        counted.append(sum(v for k, v in rows.items() if dict(k).get("reason") == "fd_limit"))

    def talk(address: tuple[str, int]) -> tuple[list[bool], int]:
        # (every socket of the clients made before the limit: connect() takes no fd)
        refused = [socket.socket() for _ in range(N)]
        served = socket.socket()
        try:
            for s in (*refused, served):
                s.settimeout(5)
            before = sorted(_fds().values())
            with _fds_left(0):
                resets = [_reset(s, address) for s in refused]
            # (the worker's reserve fd open again, that the accept closed:
            # maybe under another number, once this thread took its own)
            assert _until(lambda: sorted(_fds().values()) == before), (before, _fds())
            with _fds_left(1) as last:
                served.connect(address)
                assert _until(lambda: _is_socket(last)), "not accepted"
                # (time for the accept after it to find no fd: counted 0
                # whether it did or not; 1 before)
                time.sleep(0.3)
            served.sendall(GET)
            return resets, _status(_response(served))
        finally:
            for s in (*refused, served):
                s.close()

    try:
        resets, status = drive_gateway(
            which,
            monkeypatch,
            tmp_path / "rules.yaml",
            lambda _port: gateway_service(backend.endpoint[1]),
            talk,
            drained=drained,
        )
    finally:
        backend.close()
    assert resets == [True] * N
    assert status == 200
    assert counted == [N]

"""A worker whose relay thread is stuck is replaced, and a stop still stops.

The supervisor's watchdog pings each worker's event loop over its control
channel. The per-request relay serves on a thread of its own (the compiled
twin's epoll loop without the GIL, the pure twin's Python thread), so a
worker whose relay thread was stuck (an endless loop, a deadlock) still
answered, and was never replaced while it served nothing; a compiled one
never read the SIGTERM it alone hears (its signalfd). Now the watchdog's
``alive`` asks how long the relay's thread has gone without a turn (each
turn stores its time; an idle one turns four times a second), and one
stuck for ``--watchdog-timeout`` is killed and restarted. A stop while it
is stuck ends at the stop's deadline (the supervisor kills it there).

And an accept loop on a listener that no longer listens (accept() says
EINVAL; its hang-up keeps it readable) pauses it and says so once, in both
twins, where the compiled one spun and the pure one logged each turn.

Real ``l4proxy run`` processes (tests/test_drain_keepalive.py's), the relay
thread hung through the test hook ``L4PROXY_TEST_HANG_RELAY=PATH:SECONDS``
(read once at a worker's start: the one worker that removes PATH sleeps its
relay's thread, as a stuck one would; its successors serve).
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.conftest import _skip_or_fail
from tests.mesh import IMPLS
from tests.test_drain_keepalive import GET, WAIT, Sidecar, read_answer, running


def _workers(sidecar: Sidecar) -> list[int]:
    return [int(p) for p in re.findall(r"worker 0 started \(pid (\d+)\)", sidecar.log())]


def _answered(sidecar: Sidecar, n: int) -> int:
    """How many of *n* GETs, each on its own connection, got a 200."""
    ok = 0
    for _ in range(n):
        with sidecar.connect() as sock:
            sock.sendall(GET % b"/")
            status, _, body = read_answer(sock)
            ok += (status, body) == (200, b"ok\n")
    return ok


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_worker_whose_relay_thread_is_stuck_is_replaced(
    tmp_path: Path, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first worker's relay thread sleeps for an hour from its start:
    its event loop answers the watchdog, its clients nothing. The watchdog
    (2 s) kills it as stuck, once; its successor answers 8 GETs of 8 and
    lives on while idle (its loop turns without traffic: no second kill
    over three more timeouts); SIGTERM: exit 0. Before: never replaced."""
    marker = tmp_path / "hang"
    marker.write_text("")
    monkeypatch.setenv("L4PROXY_TEST_HANG_RELAY", f"{marker}:3600")
    flags = ("--workers", "1", "--watchdog-timeout", "2", "--drain-quiet", "0")
    with running(tmp_path, impl, *flags) as (sidecar, _):
        sidecar.until(lambda: len(_workers(sidecar)) == 2, "a second worker")
        first, second = _workers(sidecar)
        log = sidecar.log()
        assert not marker.exists()
        assert log.count("L4PROXY_TEST_HANG_RELAY: the relay's thread sleeps") == 1, log
        assert f"(pid {first}): its relay thread has not turned for" in log, log
        assert "has not answered" not in log, log  # (its event loop did answer)
        sidecar.until(lambda: "[w0] " in sidecar.log().split(f"pid {second}")[-1], "w0 up")
        assert _answered(sidecar, 8) == 8
        # the replacement starts as every worker does (sidecar/lean.py's worker_env)
        with open(f"/proc/{second}/environ", "rb") as f:
            assert b"PYTHONMALLOC=malloc" in f.read().split(b"\0")
        time.sleep(6.0)  # three watchdog timeouts, idle: the relay's loop still turns
        assert _workers(sidecar) == [first, second], sidecar.log()
        assert sidecar.log().count("its relay thread has not turned") == 1, sidecar.log()
        sidecar.proc.send_signal(signal.SIGTERM)
        assert sidecar.proc.wait(timeout=WAIT) == 0, sidecar.log()


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_stop_ends_while_the_relay_thread_is_stuck(
    tmp_path: Path, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog off, the worker's relay thread stuck (an hour): a
    client's GET waits unanswered; SIGTERM to the supervisor: the sidecar
    exits 0 by the stop's deadline (--drain-duration 1 + the supervisor's
    grace), the worker killed there if its drain did not end (the compiled
    relay alone hears the SIGTERM: it never does)."""
    marker = tmp_path / "hang"
    marker.write_text("")
    monkeypatch.setenv("L4PROXY_TEST_HANG_RELAY", f"{marker}:3600")
    flags = ("--workers", "1", "--watchdog-timeout", "0", "--drain-duration", "1")
    with running(tmp_path, impl, *flags, "--drain-quiet", "0") as (sidecar, _):
        sidecar.until(lambda: not marker.exists(), "the relay hung")
        client = sidecar.connect()
        client.sendall(GET % b"/")
        sidecar.proc.send_signal(signal.SIGTERM)
        assert sidecar.proc.wait(timeout=WAIT) == 0, sidecar.log()
        client.close()
        log = sidecar.log()
        assert len(_workers(sidecar)) == 1, log
        if impl == "compiled-uvloop":
            assert "worker 0 still draining at the deadline: killed" in log, log


_SYS_PIDFD_OPEN, _SYS_PIDFD_GETFD = 434, 438  # x86_64 and aarch64 alike


def _listener_copy(pid: int, port: int) -> socket.socket:
    """A copy (pidfd_getfd) of *pid*'s socket listening on *port*."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":
                inodes.add(fields[9])
    fd_dir = f"/proc/{pid}/fd"
    target = next(
        int(n) for n in os.listdir(fd_dir) if os.readlink(f"{fd_dir}/{n}")[8:-1] in inodes
    )
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(_SYS_PIDFD_OPEN, pid, 0)
    assert pidfd >= 0, os.strerror(ctypes.get_errno())
    try:
        fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, target, 0)
        assert fd >= 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(pidfd)
    return socket.socket(fileno=fd)


def _cpu_ticks(pid: int) -> int:
    """utime + stime of every thread of *pid*, in clock ticks."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


@pytest.mark.parametrize("impl", list(IMPLS))
def test_an_accept_loop_on_a_listener_that_stopped_listening_pauses(
    tmp_path: Path, impl: str
) -> None:
    """The worker's listener shut down from outside (shutdown(SHUT_RD) on a
    copy: it listens no more, its hang-up keeps it readable, accept() says
    EINVAL): the worker says so once and watches it again each second,
    where the compiled relay's loop spun on it (a core) and the pure
    worker's logged a line each turn. Over 3 s: one line, and the worker
    spends under a second of CPU."""
    if os.geteuid() != 0:
        _skip_or_fail("pidfd_getfd(2) on the supervisor needs root here")
    with running(tmp_path, impl, "--workers", "1") as (sidecar, _):
        [worker] = _workers(sidecar)
        sidecar.until(lambda: "[w0] " in sidecar.log(), "w0 up")
        copy = _listener_copy(sidecar.proc.pid, sidecar.listen[1])
        try:
            copy.shutdown(socket.SHUT_RD)
            sidecar.until(lambda: "(it does not listen)" in sidecar.log(), "the EINVAL said")
            before = _cpu_ticks(worker)
            time.sleep(3.0)
            spent = _cpu_ticks(worker) - before
        finally:
            copy.close()
        log = sidecar.log()
        assert log.count("(it does not listen)") == 1, log
        assert spent < os.sysconf("SC_CLK_TCK"), spent  # (spinning: about 3 s of it)
        assert _workers(sidecar) == [worker]

"""A SIGTERM while a worker is dead: its listeners' queues are served, not reset.

The supervisor holds a copy of every worker's listening sockets, so that a
worker's death loses no connection the kernel completed: the replacement
accepts them. At a SIGTERM it closes its copies (the workers' copies keep
the sockets open until their drains close them). A review found the case
where no worker held them: a worker died, its replacement not started yet
(the restart's back-off, a spawn that failed), and the supervisor's copy
was the last one. Its close reset every connection in the accept queue,
whose clients had sent their requests. Now a slot with no live worker at
the stop gets one more, started at once, which drains as any worker does
(its queue served, one request each answered ``connection: close``), and
the supervisor's copies are closed once that worker holds the sockets.
A worker that dies as the SIGTERM comes (its exit not reaped yet, so it
looked alive) is such a slot too: its copies are closed once it answered
after the SIGTERM, and one that exits instead gets one more to drain.

A real ``l4proxy run`` (tests/test_drain_keepalive.py's), a real EMFILE
for its restarts (its RLIMIT_NOFILE lowered, prlimit(2)), real signals.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import _skip_or_fail
from tests.mesh import IMPLS
from tests.test_drain_keepalive import GET, WAIT, Sidecar, read_answer, running

CLIENTS = 4


@pytest.fixture(name="root")
def root_fixture() -> None:
    """prlimit(2) on the sidecar: root (skipped otherwise; under CI=true, a
    failure, as every test that cannot run there)."""
    if os.geteuid() != 0:
        _skip_or_fail("prlimit(2) on the sidecar needs root here")


ROOT = pytest.mark.usefixtures("root")
FLAGS = ("--workers", "1", "--drain-duration", "10", "--drain-quiet", "0")


@contextlib.contextmanager
def _starts_failing(sidecar: Sidecar) -> Iterator[None]:
    """The supervisor's RLIMIT_NOFILE lowered below its first free fd (its
    next socketpair(), a worker's start, fails: EMFILE), then restored
    (where it still runs)."""
    sup = sidecar.proc.pid
    soft, hard = resource.prlimit(sup, resource.RLIMIT_NOFILE)
    fds = sorted(int(fd) for fd in os.listdir(f"/proc/{sup}/fd"))
    first_free = next(i for i in range(len(fds) + 1) if i >= len(fds) or fds[i] != i)
    resource.prlimit(sup, resource.RLIMIT_NOFILE, (first_free, hard))
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):  # (exited: nothing to restore)
            resource.prlimit(sup, resource.RLIMIT_NOFILE, (soft, hard))


def _queued_behind_a_dead_worker(sidecar: Sidecar) -> list[socket.socket]:
    """The worker killed, its restarts failing into a back-off of 3.2 s
    (the third failure); CLIENTS connections completed meanwhile into
    the listener, which only the supervisor holds now, each with a GET
    sent. (Within _starts_failing.)"""
    [worker] = re.findall(r"worker 0 started \(pid (\d+)\)", sidecar.log())
    os.kill(int(worker), signal.SIGKILL)
    sidecar.until(lambda: "retrying in 3.2s" in sidecar.log(), "a back-off of 3.2 s")
    clients = [socket.create_connection(sidecar.listen, timeout=WAIT) for _ in range(CLIENTS)]
    for sock in clients:
        sock.sendall(GET % b"/")
    return clients


def _outcome(sock: socket.socket) -> str:
    """``answered`` (a 200 saying close) or ``reset``."""
    with sock:
        try:
            status, fields, body = read_answer(sock)
        except ConnectionResetError:
            return "reset"
    assert (status, body, fields["connection"]) == (200, b"ok\n", ["close"]), fields
    return "answered"


@ROOT
@pytest.mark.parametrize("impl", list(IMPLS))
def test_the_queue_of_a_dead_workers_listener_is_served_at_sigterm(
    tmp_path: Path, impl: str
) -> None:
    """The worker killed, its restarts failing (EMFILE) into a back-off of
    seconds; four clients connect meanwhile (the kernel completes their
    handshakes into the supervisor's copy of the listener) and send a GET;
    the limit restored, SIGTERM: each gets its answer, saying close (the
    worker started to drain takes them as draining ones: see
    Worker.drain_first), and the sidecar exits 0. Before, the supervisor
    closed the last copy of the listener and all four read a reset."""
    with running(tmp_path, impl, *FLAGS) as (sidecar, backend):
        with _starts_failing(sidecar):
            clients = _queued_behind_a_dead_worker(sidecar)
        assert backend.arrived["/"] == 0  # (queued: no worker took them)
        sidecar.proc.send_signal(signal.SIGTERM)
        assert [_outcome(sock) for sock in clients] == ["answered"] * CLIENTS, sidecar.log()
        assert sidecar.proc.wait(timeout=WAIT) == 0
        log = sidecar.log()
        assert "worker 0 started to drain its listeners" in log, log
        assert "[w0] draining for up to" in log, log


@ROOT
def test_a_worker_that_cannot_start_to_drain_is_said_and_the_stop_goes_on(
    tmp_path: Path,
) -> None:
    """The same, the starts still failing at the SIGTERM: the one start to
    drain fails too; the log says the queue is reset, and the sidecar exits
    0 at once (no back-off, no deadline waited for)."""
    with running(tmp_path, "compiled-uvloop", *FLAGS) as (sidecar, _):
        with _starts_failing(sidecar):
            clients = _queued_behind_a_dead_worker(sidecar)
            sidecar.proc.send_signal(signal.SIGTERM)
            assert sidecar.proc.wait(timeout=WAIT) == 0
        assert [_outcome(sock) for sock in clients] == ["reset"] * CLIENTS
        log = sidecar.log()
        assert "cannot start worker 0 to drain its listeners" in log, log
        assert "[w0] draining" not in log, log


def _stopped(pid: int) -> bool:
    """Every thread of *pid* stopped (SIGSTOP is delivered asynchronously:
    one still running could accept a connection the test means to queue)."""
    tasks = os.listdir(f"/proc/{pid}/task")
    states = [
        Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks
    ]
    return all(state in "tT" for state in states)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_the_queue_of_a_worker_that_dies_as_the_sigterm_comes_is_served(
    tmp_path: Path, impl: str
) -> None:
    """The worker stopped (SIGSTOP), four clients queued with a GET each,
    then the worker killed and the supervisor sent SIGTERM at once: the
    supervisor handles the stop before it reaps the death, when the
    worker still looked alive (no returncode). Each client gets its answer
    saying close from a worker started to drain, and the sidecar exits 0.
    Before, the supervisor closed its copies of the listener as a live
    worker's, the last ones, and all four read a reset."""
    with running(tmp_path, impl, *FLAGS) as (sidecar, backend):
        [worker] = re.findall(r"worker 0 started \(pid (\d+)\)", sidecar.log())
        os.kill(int(worker), signal.SIGSTOP)
        sidecar.until(lambda: _stopped(int(worker)), "the worker stopped")
        clients = [socket.create_connection(sidecar.listen, timeout=WAIT) for _ in range(CLIENTS)]
        for sock in clients:
            sock.sendall(GET % b"/")
        os.kill(int(worker), signal.SIGKILL)
        sidecar.proc.send_signal(signal.SIGTERM)
        assert [_outcome(sock) for sock in clients] == ["answered"] * CLIENTS, sidecar.log()
        assert sidecar.proc.wait(timeout=WAIT) == 0
        assert backend.arrived["/"] == CLIENTS
        assert "worker 0 started to drain its listeners" in sidecar.log(), sidecar.log()


def _listens(port: int) -> bool:
    """Whether a socket of this network namespace listens on 127.0.0.1:*port*
    (/proc/net/tcp: state 0A). A listener a drain retired listens no more,
    whoever holds a copy of it (worker._stop_listening)."""
    local = f"0100007F:{port:04X}"
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(row.split()[1] == local and row.split()[3] == "0A" for row in rows)


def test_a_worker_that_dies_while_draining_is_said(tmp_path: Path) -> None:
    """SIGTERM, a request held in flight at the backend, the worker killed
    mid-drain once its listener was retired: the log says it died while
    draining (its connections cut), and the sidecar exits 0 at once, no
    worker started for a listener that listens no more. Before, a worker
    that crashed in its drain went unsaid."""
    with running(tmp_path, "compiled-uvloop", *FLAGS) as (sidecar, backend):
        [worker] = re.findall(r"worker 0 started \(pid (\d+)\)", sidecar.log())
        slow = sidecar.connect()
        slow.sendall(GET % b"/slow")
        assert backend.held.acquire(timeout=WAIT)
        sidecar.proc.send_signal(signal.SIGTERM)
        sidecar.until(lambda: not _listens(sidecar.listen[1]), "the listener retired")
        os.kill(int(worker), signal.SIGKILL)
        assert sidecar.proc.wait(timeout=WAIT) == 0
        with slow, contextlib.suppress(ConnectionResetError):
            assert slow.recv(65536) == b""  # (cut: EOF or a reset, no answer)
        log = sidecar.log()
        line = f"worker 0 (pid {worker}) died with signal 9 (SIGKILL) while draining"
        assert log.count(line) == 1, log
        assert "starting one to drain" not in log, log


@pytest.mark.parametrize("impl", list(IMPLS))
def test_the_queue_of_a_worker_that_dies_in_its_drain_is_served(tmp_path: Path, impl: str) -> None:
    """SIGTERM with --drain-inbound (the gateway listener still listening
    in the drain), the draining worker stopped, four clients queued with a
    GET each, the worker killed: the supervisor, whose copy of the
    listener is the last one, starts one more worker, which drains it:
    each client gets its answer, saying close, and the sidecar exits 0.
    Before, the supervisor had closed its copy once the worker answered
    after the SIGTERM, and all four read a reset when the worker died."""
    flags = (*FLAGS, "--drain-inbound", "5")
    with running(tmp_path, impl, *flags) as (sidecar, backend):
        [worker] = re.findall(r"worker 0 started \(pid (\d+)\)", sidecar.log())
        sidecar.proc.send_signal(signal.SIGTERM)
        sidecar.until(lambda: "[w0] draining for up to" in sidecar.log(), "the drain")
        os.kill(int(worker), signal.SIGSTOP)
        sidecar.until(lambda: _stopped(int(worker)), "the worker stopped")
        clients = [socket.create_connection(sidecar.listen, timeout=WAIT) for _ in range(CLIENTS)]
        for sock in clients:
            sock.sendall(GET % b"/")
        os.kill(int(worker), signal.SIGKILL)
        assert [_outcome(sock) for sock in clients] == ["answered"] * CLIENTS, sidecar.log()
        assert sidecar.proc.wait(timeout=WAIT) == 0
        assert backend.arrived["/"] == CLIENTS
        log = sidecar.log()
        died = f"worker 0 (pid {worker}) died with signal 9 (SIGKILL) while draining"
        assert log.count(died) == 1, log
        assert "starting one to drain its listeners" in log, log
        assert "worker 0 started to drain its listeners" in log, log

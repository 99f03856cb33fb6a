"""A worker sent SIGTERM alone hands its listeners over: no client is refused.

A worker recycled by a SIGTERM of its own (``kill <worker pid>``, not a
stop of the supervisor) drained as at a stop: its drain retired its
listeners for every process holding them (the SYN filter, then
``shutdown(SHUT_RD)``: worker._stop_listening), and the supervisor made
its copies listen again and started the slot's next worker only once it
exited. Every client of that slot was refused (a reset) for the whole
drain: up to ``--drain-quiet`` while idle, ``--drain-duration`` with a
request in flight. Now (run._Leaving, Supervisor._see_out) the worker
tells the supervisor over its control channel, the supervisor starts
the slot's next worker at once, the old one serves on until that one
answers (it accepts from then on, on the same sockets: one accept
queue), then stops accepting without ending their listening
(Worker.hand_over) and drains its connections: Envoy's and HAProxy's
hand-over, the new process accepting before the old one stops.

Real ``l4proxy run`` processes (tests/test_drain_keepalive.py's), both
implementations, one worker and two, a client connecting every 50 ms
through the gateway listener, real signals; counts, never times.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from l4proxy.dataplane.listener import bind_listener
from l4proxy.sidecar import run
from l4proxy.sidecar.admin import WorkerView
from l4proxy.sidecar.channel import (
    HEADER,
    MAX_REQUEST,
    FrameDecoder,
    SupervisorEnd,
    decode_request,
    encode_answer,
)
from l4proxy.sidecar.supervisor import Supervisor
from tests._worker import _worker_twin, gateway_service, worker_on
from tests.mesh import IMPLS
from tests.test_drain_keepalive import (
    GET,
    SLOW_BODY,
    WAIT,
    Backend,
    Sidecar,
    read_answer,
    reads_eof,
    running,
)
from tests.test_stats_scrape import _recorded, _rows, _worker

SLOW = 2  # requests held at the backend across the SIGTERM, in the worker sent it


def _started(sidecar: Sidecar, slot: int) -> list[int]:
    return [int(pid) for pid in re.findall(rf"worker {slot} started \(pid (\d+)\)", sidecar.log())]


def _listening(sidecar: Sidecar, workers: str) -> tuple[int, list[int]]:
    """Once each of *workers* listens: worker 0's pid, and every worker's."""
    sidecar.until(
        lambda: sidecar.log().count(" worker: listening: ") == int(workers), "every worker"
    )
    [old] = _started(sidecar, 0)
    return old, [old, *(_started(sidecar, 1) if workers == "2" else [])]


def _exited(pid: int) -> str:
    """The supervisor's word that worker 0's process *pid*, sent SIGTERM
    alone, drained and exited 0."""
    return f"worker 0 (pid {pid}) drained on its own SIGTERM and exited (status 0)"


def _until_exited(sidecar: Sidecar, pid: int, what: str = "the old worker's exit") -> None:
    sidecar.until(lambda: _exited(pid) in sidecar.log(), what)


def _stop(sidecar: Sidecar) -> None:
    """The supervisor's SIGTERM: the sidecar exits 0."""
    sidecar.proc.send_signal(signal.SIGTERM)
    assert sidecar.proc.wait(timeout=WAIT) == 0, sidecar.log()


def _held_request(sidecar: Sidecar, backend: Backend) -> socket.socket:
    """A connection whose GET /slow the backend holds (until its gate)."""
    sock = sidecar.connect()
    sock.sendall(GET % b"/slow")
    assert backend.held.acquire(timeout=WAIT), sidecar.log()
    return sock


def _answer_held(backend: Backend, held: list[socket.socket]) -> int:
    """The backend's gate opened: each of *held* gets its whole answer
    (200, SLOW_BODY), then is closed; how many."""
    backend.gate.set()
    for sock in held:
        with sock:
            assert read_answer(sock)[:3:2] == (200, SLOW_BODY)
    return len(held)


def _holder(sidecar: Sidecar, client: socket.socket, pids: list[int]) -> int | None:
    """Which of *pids* holds the sidecar's end of *client*'s connection
    (/proc/net/tcp's row for it, its inode among a process's fds)."""
    local = f"0100007F:{sidecar.listen[1]:04X}"
    remote = f"0100007F:{client.getsockname()[1]:04X}"
    rows = [r.split() for r in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    inodes = {f"socket:[{r[9]}]" for r in rows if r[1] == local and r[2] == remote}
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return pid
    return None


def _held_in(sidecar: Sidecar, backend: Backend, pid: int, pids: list[int]) -> list[socket.socket]:
    """SLOW requests held at the backend, each on a connection *pid*
    accepted (with two workers, the kernel picks one of their sockets:
    connections are opened until SIGTERM's worker holds SLOW), and the
    others held too."""
    mine: list[socket.socket] = []
    others: list[socket.socket] = []
    while len(mine) < SLOW:
        assert len(others) < 40, "the kernel never picked the worker's socket"
        sock = _held_request(sidecar, backend)
        (mine if _holder(sidecar, sock, pids) == pid else others).append(sock)
    return mine + others


class Prober(threading.Thread):
    """A client that opens a connection every 50 ms, sends a GET on it and
    reads the answer: each one's status, or the error it met (refused,
    reset, an EOF before the answer)."""

    def __init__(self, sidecar: Sidecar) -> None:
        super().__init__(daemon=True)
        self.sidecar = sidecar
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self.unready: list[str] = []  # /ready's answers other than 200, asked after each
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                with socket.create_connection(self.sidecar.listen, timeout=WAIT) as sock:
                    sock.sendall(GET % b"/")
                    self.statuses.append(read_answer(sock)[0])
            except (OSError, AssertionError) as exc:
                self.errors.append(repr(exc))
            try:
                urllib.request.urlopen(f"http://{self.sidecar.admin}/ready", timeout=WAIT)
            except urllib.error.HTTPError as exc:
                self.unready.append(f"{exc.code} {exc.read()!r}")
            self.halt.wait(0.05)

    def answered(self) -> int:
        return len(self.statuses) + len(self.errors)

    def more(self, n: int) -> None:
        """Until *n* more connections were tried."""
        want = self.answered() + n
        self.sidecar.until(lambda: self.answered() >= want, f"{n} more probes")


@pytest.mark.parametrize(
    ("workers", "routing"), [("1", "request"), ("2", "request"), ("1", "connection")]
)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_worker_sent_sigterm_alone_refuses_no_client(
    tmp_path: Path, impl: str, workers: str, routing: str
) -> None:
    """SIGTERM to worker 0 alone, SLOW requests in flight at the backend
    and a client connecting every 50 ms: no connection refused or reset,
    each answered 200; the slot's next worker starts while the old one
    still serves, the old one hands its listeners over, its requests in
    flight get their whole answers, and it exits 0 (said); connections go
    on being answered once it is gone (its successor serves its
    sockets); the supervisor's SIGTERM then stops everything, exit 0.
    Before, every connection to the slot was refused from the SIGTERM
    until the old worker exited (its drain's retired listeners). Per-request routing
    (the relay accepts: the compiled one on its own thread) and per
    connection (the event loop accepts, the L4 pump relays)."""
    flags = ("--workers", workers, "--drain-duration", "20", "--drain-quiet", "5")
    flags += ("--http-routing", routing)
    with running(tmp_path, impl, *flags) as (sidecar, backend):
        old, pids = _listening(sidecar, workers)
        slow = _held_in(sidecar, backend, old, pids)
        prober = Prober(sidecar)
        prober.start()
        try:
            prober.more(5)
            os.kill(old, signal.SIGTERM)
            prober.more(20)
            assert prober.errors == [], (prober.errors, sidecar.log())  # (before: each refused)
            sidecar.until(lambda: "hands its listeners over to it" in sidecar.log(), "hand-over")
            [_, new] = _started(sidecar, 0)
            prober.more(20)
            # /stats counts the old worker (first asked now) while it drains
            tried = prober.answered()
            assert _stat(sidecar, "l4proxy_connections_total") >= tried + len(slow)
            # the old worker still holds its requests: it has not exited
            assert "drained on its own SIGTERM" not in sidecar.log(), sidecar.log()
            _answer_held(backend, slow)
            _until_exited(sidecar, old)
            prober.more(20)
        finally:
            prober.halt.set()
            prober.join(timeout=WAIT)
        assert prober.errors == [], (prober.errors, sidecar.log())
        # the pod stayed ready: the old worker answers for its slot until it hands over
        assert prober.unready == [], (prober.unready, sidecar.log())
        assert set(prober.statuses) == {200} and len(prober.statuses) >= 65
        assert not os.path.exists(f"/proc/{old}/stat") or _zombie_or_gone(old)
        os.kill(new, 0)  # (alive)
        # the successor starts as every worker does (sidecar/lean.py's worker_env)
        environ = Path(f"/proc/{new}/environ").read_bytes().split(b"\0")
        assert b"PYTHONMALLOC=malloc" in environ and b"MALLOC_ARENA_MAX=1" in environ
        log = sidecar.log()
        assert f"worker 0 (pid {old}) drains on a SIGTERM of its own" in log, log
        assert "died with" not in log and "stopped on its own" not in log, log
        assert "accept on" not in log, log
        _stop(sidecar)


def _stat(sidecar: Sidecar, name: str) -> float:
    """*name*'s series in the admin endpoint's /stats, summed."""
    text = urllib.request.urlopen(f"http://{sidecar.admin}/stats", timeout=WAIT).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + " ", name + "{"))
    )


def _zombie_or_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] == "Z"
    except FileNotFoundError:
        return True


def test_a_stop_while_a_worker_hands_over_drains_both(tmp_path: Path) -> None:
    """SIGTERM to the worker alone, a request held in flight at the
    backend; once it handed its listeners over, SIGTERM to the supervisor:
    both the old worker and its successor drain, the held request gets its
    whole answer, and the sidecar exits 0 (the old worker too: said)."""
    flags = ("--workers", "1", "--drain-duration", "20", "--drain-quiet", "0")
    with running(tmp_path, "compiled-uvloop", *flags) as (sidecar, backend):
        held = _held_request(sidecar, backend)
        [old] = _started(sidecar, 0)
        os.kill(old, signal.SIGTERM)
        sidecar.until(lambda: "hands its listeners over to it" in sidecar.log(), "hand-over")
        sidecar.proc.send_signal(signal.SIGTERM)
        sidecar.until(lambda: "stopping: draining" in sidecar.log(), "the stop")
        time.sleep(0.2)  # (the stop under way: the held answer comes after it began)
        _answer_held(backend, [held])
        assert sidecar.proc.wait(timeout=WAIT) == 0, sidecar.log()
        log = sidecar.log()
        assert _exited(old) in log
        assert "died with" not in log and "killed" not in log, log


@contextlib.contextmanager
def _held_labels(tmp: Path) -> Iterator[tuple[Path, threading.Event]]:
    """A --pod-labels-file that is a FIFO, written for the supervisor's
    read and the first worker's, then for the next reader (the slot's next
    worker, which waits in open() until then) once the event is set."""
    fifo = tmp / "labels"
    os.mkfifo(fifo)
    successor_may_start = threading.Event()

    def feed() -> None:
        for turn in range(3):
            if turn == 2:
                successor_may_start.wait()
            # (once a reader opens it; one stopped before it read: EPIPE)
            with contextlib.suppress(BrokenPipeError), open(fifo, "w") as f:
                f.write('app="shop"\n')
            while True:  # until that reader closed it: the next open is the next reader's
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:  # (ENXIO: no reader)
                    break
                time.sleep(0.01)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        yield fifo, successor_may_start
    finally:
        successor_may_start.set()
        with contextlib.suppress(OSError):  # (a feeder still waiting for a reader: released)
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        feeder.join(timeout=WAIT)


def test_the_old_worker_serves_until_its_successor_answers(tmp_path: Path) -> None:
    """SIGTERM to the worker alone while its successor cannot start yet
    (its --pod-labels-file a FIFO no one writes to: it waits in open()):
    the old worker goes on serving (no client refused, nothing handed
    over) and answers /ready for its slot (200 at once each time; the
    successor's silence took 3 s and then 503 before); once the successor
    reads its labels it answers, the old worker hands its listeners over
    and exits 0, and the client was never refused."""
    with _held_labels(tmp_path) as (labels, successor_may_start):
        flags = ("--workers", "1", "--drain-duration", "20", "--pod-labels-file", str(labels))
        with running(tmp_path, "compiled-uvloop", *flags) as (sidecar, _):
            [old] = _started(sidecar, 0)
            prober = Prober(sidecar)
            prober.start()
            try:
                prober.more(5)
                os.kill(old, signal.SIGTERM)
                sidecar.until(lambda: len(_started(sidecar, 0)) == 2, "the successor's start")
                unready = len(prober.unready)
                prober.more(20)
                assert len(prober.unready) == unready == 0, (prober.unready, sidecar.log())
                assert prober.errors == [], (prober.errors, sidecar.log())
                assert "hands its listeners over to it" not in sidecar.log(), sidecar.log()
                successor_may_start.set()
                _until_exited(sidecar, old)
                prober.more(10)
            finally:
                prober.halt.set()
                prober.join(timeout=WAIT)
            assert prober.errors == [] and prober.unready == [], (prober.errors, sidecar.log())
            assert "hands its listeners over to it" in sidecar.log()
            _stop(sidecar)


@pytest.mark.parametrize("when", ["at once", "before the hand-over"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_sigterm_to_the_worker_and_the_supervisor_at_once_is_a_stop(
    tmp_path: Path, impl: str, when: str
) -> None:
    """SIGTERM to the worker and to the supervisor, at once (a process
    group's, systemd's control-group kill: whichever the supervisor hears
    first) or once the supervisor took the worker's word and started its
    successor, before the hand-over (the old worker then told
    ``stopping``: it drains as at a stop): a request held in flight gets
    its whole answer, every process drains (a successor started meanwhile
    too) and the sidecar exits 0, nothing killed or dead."""
    flags = ("--workers", "1", "--drain-duration", "20", "--drain-quiet", "0")
    with running(tmp_path, impl, *flags) as (sidecar, backend):
        held = _held_request(sidecar, backend)
        [old] = _started(sidecar, 0)
        os.kill(old, signal.SIGTERM)
        if when != "at once":
            sidecar.until(lambda: "drains on a SIGTERM of its own" in sidecar.log(), "its word")
        sidecar.proc.send_signal(signal.SIGTERM)
        sidecar.until(lambda: "stopping: draining" in sidecar.log(), "the stop")
        _answer_held(backend, [held])
        assert sidecar.proc.wait(timeout=WAIT) == 0, sidecar.log()
        log = sidecar.log()
        assert "died with" not in log and "killed" not in log, log
        # (the successor's accept on a listener the old one's drain retired: debug)
        assert "it does not listen" not in log, log
        if when != "at once":
            assert "hands its listeners over to it" not in log, log
            # (it drained on the stop, not on its own SIGTERM: said so)
            assert "drained on its own SIGTERM" not in log, log
            assert (
                f"worker 0 (pid {old}) drained on the supervisor's stop, before its hand-over "
                "and exited (status 0)"
            ) in log, log


@pytest.mark.parametrize("impl", list(IMPLS))
def test_no_word_of_the_successor_keeps_the_old_worker_serving(tmp_path: Path, impl: str) -> None:
    """SIGTERM to the worker alone while its successor cannot start
    (its --pod-labels-file a FIFO no one writes to), --drain-duration 1:
    past it the old worker and the supervisor say so, once each, and the
    old worker keeps serving its slot (each request answered 200, /ready
    200), where it handed over to nobody and exited, the slot serving
    nothing (clients waiting in the accept queue, /ready 503) until a
    successor started; once the successor starts, the old one hands over
    and exits 0."""
    with _held_labels(tmp_path) as (labels, successor_may_start):
        flags = ("--workers", "1", "--drain-duration", "1", "--pod-labels-file", str(labels))
        with running(tmp_path, impl, *flags) as (sidecar, _):
            [old] = _started(sidecar, 0)
            os.kill(old, signal.SIGTERM)
            said = f"worker 0 (pid {old}): its successor has not started"
            sidecar.until(lambda: said in sidecar.log(), "the supervisor's word")
            sidecar.until(
                lambda: "this one keeps serving until it does" in sidecar.log(), "the worker's"
            )
            prober = Prober(sidecar)
            prober.start()
            try:
                prober.more(10)
            finally:
                prober.halt.set()
                prober.join(timeout=WAIT)
            assert prober.statuses == [200] * len(prober.statuses), sidecar.log()
            assert (prober.errors, prober.unready) == ([], []), sidecar.log()
            assert len(prober.statuses) >= 10
            log = sidecar.log()
            assert log.count(said) == 1, log
            assert "drained on its own SIGTERM" not in log, log
            assert not _zombie_or_gone(old), log
            successor_may_start.set()
            _until_exited(sidecar, old)
            assert "hands its listeners over to it" in sidecar.log()
            with sidecar.connect() as client:
                client.sendall(GET % b"/")
                assert read_answer(client)[0] == 200
            _stop(sidecar)


KEEPS = "its answers keep their clients until it hands over"


@pytest.mark.parametrize("then", ["hand-over", "stop"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_the_old_worker_keeps_its_clients_until_it_hands_over(
    tmp_path: Path, impl: str, then: str
) -> None:
    """SIGTERM to the worker alone while its successor cannot start yet:
    the old worker serves its slot, and its answers keep their keep-alive
    clients (no ``connection: close``: 5 requests on one connection), where
    each said close from the SIGTERM on (its relay's stop handling: needless
    churn while it was its slot's only server); once the successor answers
    and it hands over, or the supervisor stops (its drain at once), that
    client, idle between requests, is closed (EOF)."""
    with _held_labels(tmp_path) as (labels, successor_may_start):
        flags = ("--workers", "1", "--drain-duration", "20", "--pod-labels-file", str(labels))
        with running(tmp_path, impl, *flags) as (sidecar, _):
            [old] = _started(sidecar, 0)
            os.kill(old, signal.SIGTERM)
            sidecar.until(lambda: KEEPS in sidecar.log(), "the worker's word")
            with sidecar.connect() as client:
                closes = []
                for _ in range(5):
                    client.sendall(GET % b"/")
                    status, fields, _body = read_answer(client)
                    assert status == 200
                    closes.append(fields.get("connection", []))
                assert closes == [[]] * 5, (closes, sidecar.log())
                assert "hands its listeners over to it" not in sidecar.log()
                if then == "stop":
                    sidecar.proc.send_signal(signal.SIGTERM)
                    sidecar.until(lambda: "stopping: draining" in sidecar.log(), "the stop")
                else:
                    successor_may_start.set()
                    sidecar.until(
                        lambda: "hands its listeners over to it" in sidecar.log(), "the hand-over"
                    )
                assert reads_eof(client), sidecar.log()  # (between requests: closed)
            if then == "stop":
                successor_may_start.set()
                assert sidecar.proc.wait(timeout=WAIT) == 0, sidecar.log()
                return
            _until_exited(sidecar, old)
            _stop(sidecar)


def _children(pid: int) -> int:
    """How many processes *pid* has (alive or not reaped yet)."""
    return len(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


@pytest.mark.parametrize("impl", list(IMPLS))
def test_successors_sigtermed_as_they_start_back_off(tmp_path: Path, impl: str) -> None:
    """Something that SIGTERMs each new worker as it starts (3 of them,
    after the first): each successor starts after the slot's back-off
    (said: 0.2, 0.4, 0.8, 1.6 s), where the next started at once, and one
    that leaves while a worker before it still serves hands over at once
    (to it) and exits: at most 3 processes at each start (the one
    serving, the new one, one draining), where each waited for a
    successor that answered. The slot is served throughout (every probe
    200), and the fourth successor serves it in the end, the four before
    it drained and exited 0."""
    flags = ("--workers", "1", "--drain-duration", "20")
    with running(tmp_path, impl, *flags) as (sidecar, _):
        [first] = _started(sidecar, 0)
        prober = Prober(sidecar)
        prober.start()
        counts: list[int] = []
        try:
            prober.more(3)
            os.kill(first, signal.SIGTERM)
            for n in range(2, 5):
                sidecar.until(lambda n=n: len(_started(sidecar, 0)) >= n, f"worker {n}")
                pid = _started(sidecar, 0)[n - 1]
                counts.append(_children(sidecar.proc.pid))
                os.kill(pid, signal.SIGTERM)
            for pid in _started(sidecar, 0)[:4]:
                _until_exited(sidecar, pid, f"the exit of {pid}")
            prober.more(3)
        finally:
            prober.halt.set()
            prober.join(timeout=WAIT)
        log = sidecar.log()
        delays = re.findall(r"left [\d.]+s after its start: its successor starts in ([\d.]+)s", log)
        assert delays == ["0.2", "0.4", "0.8", "1.6"], log
        assert max(counts) <= 3, (counts, log)
        assert (prober.errors, prober.unready) == ([], []), log
        assert set(prober.statuses) == {200}, log
        assert len(_started(sidecar, 0)) == 5, log
        _stop(sidecar)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_successor_that_starts_in_a_stop_says_no_einval(tmp_path: Path, impl: str) -> None:
    """SIGTERM to the worker alone while its successor cannot start yet,
    then the supervisor's stop: the old worker drains on the stop (said
    so, where the line said it drained on its own SIGTERM) and retires
    the listeners; the successor, let start then, drains on its held
    SIGTERM: its accept on a listener that listens no more (EINVAL) is
    a stop's, said at debug, where it warned ``(it does not listen)``."""
    with _held_labels(tmp_path) as (labels, successor_may_start):
        flags = ("--workers", "1", "--drain-duration", "20", "--pod-labels-file", str(labels))
        with running(tmp_path, impl, *flags) as (sidecar, _):
            [old] = _started(sidecar, 0)
            os.kill(old, signal.SIGTERM)
            sidecar.until(lambda: "drains on a SIGTERM of its own" in sidecar.log(), "its word")
            sidecar.until(lambda: len(_started(sidecar, 0)) == 2, "the successor's start")
            sidecar.proc.send_signal(signal.SIGTERM)
            said = f"worker 0 (pid {old}) drained on the supervisor's stop, before its hand-over"
            sidecar.until(lambda: said in sidecar.log(), "the old worker's exit")
            successor_may_start.set()
            assert sidecar.proc.wait(timeout=WAIT) == 0, sidecar.log()
            log = sidecar.log()
            assert "it does not listen" not in log, log
            assert "drained on its own SIGTERM" not in log, log


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_reload_reaches_the_worker_that_serves_until_its_successor_answers(
    tmp_path: Path, impl: str
) -> None:
    """SIGHUP to the supervisor while a worker sent SIGTERM alone still
    serves its slot (its successor held in open() on a FIFO labels file),
    the rule files polled once an hour: the old worker reloads at once
    (rules generation 2, said) and routes the next request to the new
    rules' backend. The supervisor forwarded SIGHUP (and SIGUSR1) only to
    each slot's current worker: the old one served the old rules until
    it handed over (up to --drain-duration, a poll aside), and wrote its
    access log lines to the rotated file until it exited."""
    with _held_labels(tmp_path) as (labels, successor_may_start):
        flags = ("--workers", "1", "--drain-duration", "20", "--pod-labels-file", str(labels))
        flags += ("--reload-interval", "3600")
        with running(tmp_path, impl, *flags) as (sidecar, backend):
            [old] = _started(sidecar, 0)
            other = Backend()
            try:
                os.kill(old, signal.SIGTERM)
                sidecar.until(lambda: len(_started(sidecar, 0)) == 2, "the successor's start")
                (tmp_path / "rules" / "gateway.yaml").write_text(gateway_service(other.port))
                sidecar.proc.send_signal(signal.SIGHUP)
                sidecar.until(lambda: "rules generation 2 loaded" in sidecar.log(), "the reload")
                assert "hands its listeners over to it" not in sidecar.log(), sidecar.log()
                with sidecar.connect() as sock:  # (the old worker's: the successor waits)
                    sock.sendall(GET % b"/")
                    assert read_answer(sock)[0] == 200
                assert (other.arrived["/"], backend.arrived["/"]) == (1, 0)
                successor_may_start.set()
                _until_exited(sidecar, old)
            finally:
                other.close()
            _stop(sidecar)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_stats_counts_what_the_old_worker_holds_open_while_it_drains(
    tmp_path: Path, impl: str
) -> None:
    """A request held at the backend in a worker sent SIGTERM alone, once
    it handed its listeners over: /stats' l4proxy_active_connections
    counts it (1) until its answer (0), where only each slot's current
    worker's gauges were summed (0 throughout: the old worker's
    connection, counted in l4proxy_connections_total, was not open)."""
    flags = ("--workers", "1", "--drain-duration", "20", "--http-routing", "request")
    with running(tmp_path, impl, *flags) as (sidecar, backend):
        held = _held_request(sidecar, backend)
        assert _stat(sidecar, "l4proxy_active_connections") == 1
        [old] = _started(sidecar, 0)
        os.kill(old, signal.SIGTERM)
        sidecar.until(lambda: "hands its listeners over to it" in sidecar.log(), "hand-over")
        assert _stat(sidecar, "l4proxy_active_connections") == 1  # (was 0)
        _answer_held(backend, [held])
        sidecar.until(
            lambda: f"worker 0 (pid {old}) drained on its own SIGTERM" in sidecar.log(), "exit"
        )
        assert _stat(sidecar, "l4proxy_active_connections") == 0
        _stop(sidecar)


def _counted(sidecar: Sidecar, answered: int) -> None:
    """/stats' istio_requests_total comes to *answered* (a request is
    counted as its exchange ends, which may be just after its client read
    the answer: scraped again until then) and stays there."""
    sidecar.until(
        lambda: _stat(sidecar, "istio_requests_total") >= answered, f"{answered} requests counted"
    )
    assert _stat(sidecar, "istio_requests_total") == answered, sidecar.log()


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_stats_keeps_what_the_old_worker_served_after_its_last_scrape(
    tmp_path: Path, impl: str, workers: str
) -> None:
    """/stats scraped, then requests served by worker 0 before its
    SIGTERM alone (each on a connection of its own), and SLOW held in it
    at the backend across its hand-over, answered once it handed over
    (its drain): with no scrape between, once it exited /stats'
    istio_requests_total is every request the clients got an answer for,
    the old worker's last ones too. Before, a worker that exited had its
    last *scraped* counts moved to its slot's base: what it served since
    was lost (here 2 to 12 requests short), and l4proxy canary, which
    promotes or rolls back from these counts, missed them. Now it gives
    the supervisor its final counts as it exits (its answer to
    ``final``)."""
    flags = ("--workers", workers, "--drain-duration", "20", "--http-routing", "request")
    with running(tmp_path, impl, *flags) as (sidecar, backend):
        old, pids = _listening(sidecar, workers)
        answered = 0

        def quick(n: int) -> None:
            nonlocal answered
            for _ in range(n):
                with sidecar.connect() as sock:
                    sock.sendall(GET % b"/")
                    assert read_answer(sock)[0] == 200
                    answered += 1

        quick(5)
        _counted(sidecar, answered)  # (the old worker's last scrape)
        slow = _held_in(sidecar, backend, old, pids)
        quick(10)  # (with one worker, all in the old one)
        os.kill(old, signal.SIGTERM)
        sidecar.until(lambda: "hands its listeners over to it" in sidecar.log(), "hand-over")
        quick(5)  # (its successor's, or worker 1's)
        answered += _answer_held(backend, slow)
        _until_exited(sidecar, old)
        _counted(sidecar, answered)
        quick(3)  # (and counted once: not again at a later scrape)
        _counted(sidecar, answered)
        _stop(sidecar)


@pytest.mark.parametrize("when", ["before the hand-over", "after it"])
def test_the_watchdog_kills_a_hung_worker_that_drains_on_its_own_sigterm(
    tmp_path: Path, when: str
) -> None:
    """A worker sent SIGTERM alone that hangs (SIGSTOP) once its word came,
    before it handed its listeners over (its successor held in open() on a
    FIFO labels file: it serves the slot meanwhile) or after (a request
    in flight held at the backend: it drains): the watchdog
    (--watchdog-timeout 1) kills it as any hung worker (said), and it is
    reaped as one that died draining. It watched only each slot's current
    worker: the hung one was killed at its deadline, twice
    --drain-duration and 10 s after its word (50 s here), holding what it
    took meanwhile. A successor held before its first answer is not
    killed (the start-up allowance, 60 s here), and serves once released."""
    with _held_labels(tmp_path) as (labels, successor_may_start):
        flags = ("--workers", "1", "--drain-duration", "20", "--pod-labels-file", str(labels))
        flags += ("--watchdog-timeout", "1", "--watchdog-start-timeout", "60")
        with running(tmp_path, "compiled-uvloop", *flags) as (sidecar, backend):
            [old] = _started(sidecar, 0)
            # (in flight in the old worker: it drains, not exits)
            held = _held_request(sidecar, backend)
            os.kill(old, signal.SIGTERM)
            sidecar.until(lambda: len(_started(sidecar, 0)) == 2, "the successor's start")
            if when != "before the hand-over":
                successor_may_start.set()
                sidecar.until(
                    lambda: "hands its listeners over to it" in sidecar.log(), "hand-over"
                )
            os.kill(old, signal.SIGSTOP)
            try:
                sidecar.until(
                    lambda: (
                        f"worker 0 (pid {old}) has not answered for 1.0s; killing it"
                        in sidecar.log()
                    ),
                    "the watchdog's kill",
                )
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(old, signal.SIGCONT)
            sidecar.until(
                lambda: (
                    f"worker 0 (pid {old}) died with signal 9 (SIGKILL) while draining"
                    in sidecar.log()
                ),
                "its reaping",
            )
            held.close()  # (cut with the hung worker)
            successor_may_start.set()
            with sidecar.connect() as sock:
                sock.sendall(GET % b"/")
                assert read_answer(sock)[0] == 200
            assert len(_started(sidecar, 0)) == 2, sidecar.log()  # (the successor lives)
            _stop(sidecar)


# -- /stats across the word: the supervisor's bookkeeping, real channel ends --


class _Exiting:
    """A worker process as the supervisor sees it (asyncio's Process):
    its exit is the test's to give (*exit*)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited = asyncio.Event()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def exit(self) -> None:
        self.returncode = 0
        self._exited.set()

    def kill(self) -> None:
        raise AssertionError("killed")


async def _end(
    sock: socket.socket, stats: bytes, word_first: Callable[[], bool] | None = None
) -> None:
    """A worker's end of its control channel answering ``stats`` with the
    recorded payload *stats*, ``final`` too (a leaving worker's last
    counts, as a real one gives them: it served nothing since its scrape)
    and anything else True; ``leaving`` (its word)
    is held, and said just before the first ``stats`` answer where
    *word_first* is given, that answer written once *word_first* says that
    the supervisor took the word (a SIGTERM to the worker while a /stats
    round waits for it)."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    decoder = FrameDecoder(MAX_REQUEST)
    word: int | None = None
    while data := await loop.sock_recv(sock, 65536):
        for frame in decoder.feed(data):
            op = decode_request(frame)
            if op == "leaving":
                word = frame.id
                continue
            if op == "final":  # (answered at once: the test says when it exits)
                await loop.sock_sendall(sock, HEADER.pack(len(stats), frame.id) + stats)
                continue
            if op == "stats":
                if word_first is not None and word is not None:
                    await loop.sock_sendall(sock, encode_answer(word, True))
                    word = None
                    while not word_first():
                        await asyncio.sleep(0.001)
                await loop.sock_sendall(sock, HEADER.pack(len(stats), frame.id))
                await loop.sock_sendall(sock, stats)
            else:
                await loop.sock_sendall(sock, encode_answer(frame.id, True))


def test_a_scrape_that_the_worker_s_word_overtakes_counts_it_once() -> None:
    """A /stats round under way when its worker's word comes (a SIGTERM to
    it alone: the supervisor reads its ``leaving`` before its ``stats``
    answer): that answer is the leaving worker's, not its slot's. It was
    taken for the slot's, beside the Leaving's counts (with a scrape
    before, its 40 connections counted twice in that one: 80), and went to
    the slot's base at its successor's first answer, then again at its
    exit: the summed counter jumped by the old worker's whole history for
    good (Prometheus' rate(), l4proxy canary): here 40, then 87 (its 40
    twice and the successor's 7). Seen on real processes: a scrape asked
    of a worker stopped (SIGSTOP), SIGTERM, SIGCONT, 1 time in 3 with the
    compiled relay: l4proxy_connections_total 40, then 80 for good. The
    supervisor's real code over real channel ends (socketpairs)."""
    with _view(40) as old_view, _view(7) as new_view:
        old_stats, new_stats = asyncio.run(_recorded([old_view, new_view]))

    async def main() -> list[float]:
        sup = Supervisor(argparse.Namespace(drain_duration=20.0), [[]])
        [slot] = sup.slots
        ours, theirs = socket.socketpair()
        old = _Exiting(101)
        end = asyncio.ensure_future(_end(theirs, old_stats, lambda: bool(slot.leaving)))
        link = SupervisorEnd(ours, lambda why: None)
        await link.open()
        slot.proc, slot.link = old, link  # type: ignore[assignment]
        slot.notice = link.tell("leaving")
        waiting = asyncio.ensure_future(sup._wait_worker(slot, old))  # type: ignore[arg-type]
        sums = [_connections(await sup.stats())]  # the word comes during it
        assert await waiting is None and len(slot.leaving) == 1
        end2, link2 = await _successor(slot, new_stats)
        sums.append(_connections(await sup.stats()))  # the successor's first answer
        sums.append(_connections(await sup.stats()))
        old.exit()
        task = slot.leaving[0].task
        assert task is not None
        await task
        sums.append(_connections(await sup.stats()))  # its counts in the base now
        link2.close()
        for t in (end, end2):
            t.cancel()
        await asyncio.gather(end, end2, return_exceptions=True)
        return sums

    assert asyncio.run(main()) == [40, 47, 47, 47]  # was [40, 87, 87, 87]


@contextlib.contextmanager
def _view(connections: int) -> Iterator[WorkerView]:
    with _worker(_rows(3, seed=connections), connections) as view:
        yield view


def _connections(stats: Any) -> float:
    """The supervisor's /stats sum of l4proxy_connections_total."""
    return float(sum(stats.sample.series["l4proxy_connections_total"].values()))


async def _successor(slot: Any, stats: bytes) -> tuple[asyncio.Future[None], SupervisorEnd]:
    """*slot*'s next worker (pid 102), its end answering ``stats`` with
    *stats* over a real channel (a socketpair): its task and link."""
    ours, theirs = socket.socketpair()
    end = asyncio.ensure_future(_end(theirs, stats))
    link = SupervisorEnd(ours, lambda why: None)
    await link.open()
    slot.proc, slot.link = _Exiting(102), link
    return end, link


async def _end_with_final(sock: socket.socket, scraped: bytes, final: bytes) -> None:
    """A leaving worker's end: ``leaving`` answered at once (its word),
    ``final`` held; the first ``stats`` answered with *scraped*, the next
    one too, but only after ``final``'s answer *final* was written (its
    last counts, then a scrape's answer built before them: the two
    crossing on the channel as it exits); anything else True."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    decoder = FrameDecoder(MAX_REQUEST)
    final_id: int | None = None
    scrapes = 0
    while data := await loop.sock_recv(sock, 65536):
        for frame in decoder.feed(data):
            op = decode_request(frame)
            if op == "final":
                final_id = frame.id
                continue
            if op == "stats":
                scrapes += 1
                if scrapes == 2:
                    assert final_id is not None
                    await loop.sock_sendall(sock, HEADER.pack(len(final), final_id) + final)
                await loop.sock_sendall(sock, HEADER.pack(len(scraped), frame.id) + scraped)
            else:  # (``leaving`` too: the test asks it once it scraped)
                await loop.sock_sendall(sock, encode_answer(frame.id, True))


def test_a_leaving_worker_s_final_counts_reach_the_base_once() -> None:
    """A worker that drains on its own SIGTERM answers ``final`` with its
    counts as it exits (45 connections, where the last scrape of it saw
    40), and a scrape's answer built before them comes after them on the
    channel (40 again): /stats counts 47 (the successor's 7 and its
    scrape's 40) until it exits, then 52 for good: its final 45 in the
    base, once. Before, its last scrape's 40 went to the base and the
    5 it served since were lost (47 for good). The supervisor's real
    code over real channel ends (socketpairs)."""
    with _view(40) as scraped_view, _view(45) as final_view, _view(7) as new_view:
        scraped, final, new_stats = asyncio.run(_recorded([scraped_view, final_view, new_view]))

    async def main() -> list[float]:
        sup = Supervisor(argparse.Namespace(drain_duration=20.0), [[]])
        [slot] = sup.slots
        ours, theirs = socket.socketpair()
        old = _Exiting(101)
        end = asyncio.ensure_future(_end_with_final(theirs, scraped, final))
        link = SupervisorEnd(ours, lambda why: None)
        await link.open()
        slot.proc, slot.link = old, link  # type: ignore[assignment]
        sums = [_connections(await sup.stats())]
        slot.notice = link.tell("leaving")
        assert await sup._wait_worker(slot, old) is None  # type: ignore[arg-type]
        [leaving] = slot.leaving
        end2, link2 = await _successor(slot, new_stats)
        sums.append(_connections(await sup.stats()))  # (the final, then the scrape's answer)
        assert leaving.final is not None and leaving.final.done()
        old.exit()
        theirs.close()  # (its end of the channel goes with it)
        assert leaving.task is not None
        await leaving.task
        assert slot.leaving == []
        sums.append(_connections(await sup.stats()))  # its final counts in the base now
        sums.append(_connections(await sup.stats()))
        link2.close()
        for t in (end, end2):
            t.cancel()
        await asyncio.gather(end, end2, return_exceptions=True)
        return sums

    assert asyncio.run(main()) == [40, 47, 52, 52]  # was [40, 47, 47, 47]


# -- a stop that comes just before ``serving``: a real worker, both relays --


@pytest.mark.parametrize("then", ["its signal's handler", "stopping"])
@pytest.mark.parametrize("which", ["compiled", "pure"])
def test_a_stop_just_before_serving_wins_over_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str, then: str
) -> None:
    """A worker sent SIGTERM alone said so (``leaving``); the supervisor's
    stop's SIGTERM reaches it just after the supervisor wrote ``serving``,
    and ``serving`` is read between the signal's first half (the relay's
    stop handling: the compiled relay's signalfd, the pure one's handler
    first) and its second (the event loop's handler, which counts it):
    ``serving`` takes the stop handling back, where it cannot tell. The
    stop wins as soon as the loop hears it, or the supervisor's
    ``stopping`` (written before its SIGTERM) is read: a new client's
    answer says ``connection: close`` again. Before, the stop handling
    stayed taken back (each answer kept its keep-alive client) until the
    drain's own step. The ordering made by hand, each half called as the
    worker calls it (run._serve), over a real control channel."""
    _worker_twin(which, monkeypatch)
    backend = Backend()
    rules = tmp_path / "gateway.yaml"
    rules.write_text(gateway_service(backend.port))

    def asked(address: tuple[str, int]) -> list[str]:
        with socket.create_connection(address, timeout=WAIT) as sock:
            sock.sendall(GET % b"/")
            status, fields, _ = read_answer(sock)
            assert status == 200
            return fields.get("connection", [])

    async def main() -> list[list[str]]:
        loop = asyncio.get_running_loop()
        lst = bind_listener("127.0.0.1", 0, "gateway")
        async with worker_on([lst], rules, http_routing="request") as (_, worker):

            async def connection_field() -> list[str]:
                await worker.flush_relay_reports()  # (the compiled relay's turn: applied)
                return await loop.run_in_executor(None, asked, lst.address)

            leaving = run._Leaving()
            leaving.withdraw = worker.stop_withdrawn
            leaving.reassert = worker.stop_signalled
            ours, theirs = socket.socketpair()
            view = WorkerView(worker, "test")
            control = asyncio.ensure_future(
                run._answer_supervisor(theirs, view, asyncio.Event(), leaving)
            )
            link = SupervisorEnd(ours, lambda why: None)
            await link.open()
            try:
                word = link.tell("leaving")
                seen = [await connection_field()]  # (before any signal: keep-alive)
                worker.stop_signalled()  # its own SIGTERM: the relay's half,
                leaving.stop_heard()  # then the loop's
                handed = asyncio.ensure_future(leaving.handed_over(20.0))
                assert await word is True
                worker.stop_signalled()  # the stop's SIGTERM: the relay's half only
                assert await link.ask("serving", WAIT) is True  # (taken back)
                if then == "stopping":
                    assert await link.ask("stopping", WAIT) is True
                else:
                    leaving.stop_heard()
                seen.append(await connection_field())
                if then != "stopping":
                    assert await link.ask("stopping", WAIT) is True
                assert await handed is False  # (a stop: drained as ever)
                return seen
            finally:
                link.close()
                control.cancel()
                await asyncio.gather(control, return_exceptions=True)
                theirs.close()

    try:
        assert asyncio.run(main()) == [[], ["close"]]  # was [[], []]
    finally:
        backend.close()


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_stats_scraped_throughout_a_worker_s_own_exit_counts_each_request_once(
    tmp_path: Path, impl: str, workers: str
) -> None:
    """/stats scraped without a pause (a thread, every few ms) from before
    worker 0's SIGTERM alone until after its exit, requests served
    throughout: no scrape ever counts more requests than were sent (its
    final counts and a crossing scrape's answer, or its final counts and
    the base, never both), the count never goes back, and once it exited
    it is every request answered (review8: the final counts raced by
    scrapes)."""
    flags = ("--workers", workers, "--drain-duration", "20", "--http-routing", "request")
    with running(tmp_path, impl, *flags) as (sidecar, backend):
        old, pids = _listening(sidecar, workers)
        sent = answered = 0
        seen: list[float] = []
        done = threading.Event()

        def scrape() -> None:
            while not done.is_set():
                seen.append(_stat(sidecar, "istio_requests_total"))
                time.sleep(0.005)

        def quick(n: int) -> None:
            nonlocal sent, answered
            for _ in range(n):
                sent += 1
                with sidecar.connect() as sock:
                    sock.sendall(GET % b"/")
                    assert read_answer(sock)[0] == 200
                    answered += 1

        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
        try:
            quick(10)
            slow = _held_in(sidecar, backend, old, pids)
            sent += len(slow)
            quick(10)
            os.kill(old, signal.SIGTERM)
            sidecar.until(lambda: "hands its listeners over to it" in sidecar.log(), "hand-over")
            quick(10)
            answered += _answer_held(backend, slow)
            _until_exited(sidecar, old)
            quick(5)
            _counted(sidecar, answered)
        finally:
            done.set()
            scraper.join(timeout=WAIT)
        assert len(seen) > 20, len(seen)
        assert max(seen) <= sent, (max(seen), sent, sidecar.log())
        assert all(b >= a for a, b in itertools.pairwise(seen)), seen
        _stop(sidecar)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_stop_while_a_worker_drains_on_its_own_sigterm_waits_for_no_final(
    tmp_path: Path, impl: str
) -> None:
    """Worker 0 sent a SIGTERM alone (asked ``final``), SLOW requests held
    in it across its hand-over, then the supervisor's stop: once the held
    requests are answered every process exits 0 at once, the old worker
    having written its final counts (no warning that it could not, nobody
    killed), the stop not held up by the final counts' waits
    (FINAL_COUNTS_WAIT_S, Supervisor.FINAL_WAIT_S) (review8)."""
    flags = ("--workers", "1", "--drain-duration", "20", "--http-routing", "request")
    with running(tmp_path, impl, *flags) as (sidecar, backend):
        old, pids = _listening(sidecar, "1")
        slow = _held_in(sidecar, backend, old, pids)
        os.kill(old, signal.SIGTERM)
        sidecar.until(lambda: "hands its listeners over to it" in sidecar.log(), "hand-over")
        sidecar.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        t0 = time.monotonic()
        _answer_held(backend, slow)
        assert sidecar.proc.wait(timeout=WAIT) == 0, sidecar.log()
        took = time.monotonic() - t0
        log = sidecar.log()
        assert "were not written" not in log, log
        assert "killed" not in log, log
        assert _exited(old) in log, log
        assert took < 4.0, (took, log)

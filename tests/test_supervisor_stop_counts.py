"""At the supervisor's stop, a worker's last counts reach /stats as it exits.

With ``--workers N`` the admin endpoint's /stats sums what each worker
answers; a worker that does not answer counts with its last answer. At
the supervisor's own stop (SIGTERM to the sidecar) the workers drain and
exit one by one, while the supervisor, its admin endpoint included,
lives on until the last one has: a worker that drained at once (idle)
counted with its last scrape's counts for the rest of the stop, and what
it served since (requests answered after the last scrape, before the
SIGTERM or in its drain) was not in any /stats scraped then, the last
scrapes of the pod (a scraper that samples during the drain; l4proxy
canary reading its counts). A worker that drains on a SIGTERM of its own
gave its final counts as it exits already (its answer to ``final``:
tests/test_worker_hand_over.py); now every worker told ``stopping`` is
asked for them too (Supervisor._stop_one, _take_slot_final).

Real ``l4proxy run`` processes (tests/test_drain_keepalive.py's), both
implementations, two workers; counts, never times.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.mesh import IMPLS
from tests.test_drain_keepalive import GET, WAIT, read_answer, running
from tests.test_worker_hand_over import (
    _answer_held,
    _counted,
    _holder,
    _listening,
    _zombie_or_gone,
)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_worker_that_exits_in_the_stop_gives_its_last_counts(tmp_path: Path, impl: str) -> None:
    """Two workers; /stats scraped; a GET /slow held at the backend in
    one worker (the kernel picks); then GETs until 3 of them were served by the other worker
    (each connection's holder read from /proc), none scraped; SIGTERM to
    the supervisor: the other worker, idle, drains and exits at once,
    the held one waits. /stats then counts every answered GET (the held
    one is not answered yet), the exited worker's last 3 and more
    included: before, those were missing (its last scraped counts stood
    for it until the supervisor exited)."""
    flags = ("--workers", "2", "--drain-duration", "20", "--drain-quiet", "0")
    with running(tmp_path, impl, *flags, "--http-routing", "request") as (sidecar, backend):
        _, pids = _listening(sidecar, "2")
        answered = 0

        def quick() -> int | None:
            """A GET answered 200 on a connection of its own: the pid of
            the worker that served it."""
            nonlocal answered
            with sidecar.connect() as sock:
                sock.sendall(GET % b"/")
                assert read_answer(sock)[0] == 200
                answered += 1
                return _holder(sidecar, sock, pids)  # (keep-alive: its end still open)

        for _ in range(6):
            quick()
        _counted(sidecar, answered)  # (both workers' last scrape)
        held = sidecar.connect()
        held.sendall(GET % b"/slow")
        assert backend.held.acquire(timeout=WAIT), sidecar.log()
        slow = _holder(sidecar, held, pids)
        assert slow in pids, (slow, pids)
        [other] = [pid for pid in pids if pid != slow]
        by_other = 0
        while by_other < 3:
            assert answered < 200, "the kernel never picked the other worker's socket"
            by_other += quick() == other
        sidecar.proc.send_signal(signal.SIGTERM)
        sidecar.until(lambda: _zombie_or_gone(other), "the idle worker's exit")
        _counted(sidecar, answered)
        answered += _answer_held(backend, [held])
        assert sidecar.proc.wait(timeout=WAIT) == 0, sidecar.log()

"""``--drain-strategy gradual`` (Envoy's default) closes the keep-alive
connections between requests one after another, not in one burst: the
k-th of N, in the order they were taken, at k/N of the first quarter of
``--drain-duration``. ``immediate`` (Istio's, and l4proxy's default since
gradual held every drain with idle clients that quarter longer: see the
README's drain) closes them all at the SIGTERM.

The real ``l4proxy run`` of tests/test_drain_keepalive.py, compiled and
pure. The spread is seen by counting and ordering the closes, with bounds
on the clock far from the rule's times (2 s apart here; the relay closes
on its tick, a quarter of a second).
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from tests.mesh import IMPLS
from tests.test_drain_keepalive import GET, WAIT, Sidecar, read_answer, running
from tests.test_drain_relay_twins import closes

N = 5


def _keep_alive_clients(sidecar: Sidecar, n: int) -> list[socket.socket]:
    """*n* connections, taken in this order, each with one request answered
    (the connection kept) and then idle."""
    socks = []
    for _ in range(n):
        sock = sidecar.connect()
        sock.sendall(GET % b"/")
        status, fields, _ = read_answer(sock)
        assert status == 200 and "connection" not in fields
        socks.append(sock)
    return socks


@pytest.mark.parametrize("impl", list(IMPLS))
def test_idle_connections_close_one_after_another(tmp_path: Path, impl: str) -> None:
    """--drain-duration 40: five idle connections close over its first 10 s,
    the k-th at 2k s from the SIGTERM (the first at once). They read EOF in
    the order they were taken, the first alone or with one other, and the
    last 7 s or more after the SIGTERM (8 s by the rule: a bound the clock
    cannot break). Before, all five at once: one batch."""
    flags = ("--workers", "1", "--drain-duration", "40", "--drain-quiet", "0")
    with running(tmp_path, impl, *flags, "--drain-strategy", "gradual") as (sidecar, _):
        socks = _keep_alive_clients(sidecar, N)
        sidecar.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        batches = closes(socks, WAIT)
        took = time.monotonic() - started
        assert [i for batch in batches for i in batch] == list(range(N)), batches
        assert len(batches[0]) <= 2, batches
        assert took >= 7.0, (took, batches)
        assert sidecar.proc.wait(timeout=WAIT) == 0
        assert "cut" not in sidecar.log(), sidecar.log()


@pytest.mark.parametrize("impl", list(IMPLS))
def test_the_default_closes_every_idle_connection_at_once(tmp_path: Path, impl: str) -> None:
    """No --drain-strategy: immediate (Istio's): with --drain-duration 400,
    the five close within the test's 30 s, where gradual would close the
    k-th at 20k s (fails with gradual the default, as it was)."""
    flags = ("--workers", "1", "--drain-duration", "400", "--drain-quiet", "0")
    with running(tmp_path, impl, *flags) as (sidecar, _):
        socks = _keep_alive_clients(sidecar, N)
        sidecar.proc.send_signal(signal.SIGTERM)
        closes(socks, WAIT)
        assert sidecar.proc.wait(timeout=WAIT) == 0

"""``l4proxy run --single-process`` watches its own relay thread.

With workers, the supervisor's watchdog kills and restarts a worker whose
relay thread has not turned for ``--watchdog-timeout``
(tests/test_relay_watchdog.py). A lone process had no watchdog: a stuck
relay thread served nothing for ever while the event loop still answered
the admin endpoint (a liveness probe there passed, the pod was never
restarted), and the compiled relay's thread, the only one that reads the
SIGTERM (its signalfd), never heard a stop either, until the kubelet's
SIGKILL. Now the process checks its relay at the watchdog's cadence and
exits 1 past the timeout (its container is restarted), /ready answers 503
``STALLED`` meanwhile, and a stop while it is stuck ends by the stop's
deadline (``--drain-duration`` + 10 s).

Real ``l4proxy run`` processes (tests/test_drain_keepalive.py's), both
implementations, the relay thread hung through the test hook
``L4PROXY_TEST_HANG_RELAY=PATH:SECONDS``.
"""

from __future__ import annotations

import re
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from l4proxy.sidecar.watchdog import DRAIN_GRACE_S, check_interval
from tests.mesh import IMPLS
from tests.test_drain_keepalive import GET, WAIT, Sidecar, read_answer, running
from tests.test_reload import big_rules

TIMEOUT = 2.0  # --watchdog-timeout
INTERVAL = check_interval(TIMEOUT)  # its checks' cadence (the supervisor's)


def _ready(sidecar: Sidecar) -> tuple[int, str]:
    """/ready's status and body."""
    try:
        with urllib.request.urlopen(f"http://{sidecar.admin}/ready", timeout=WAIT) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    marker = tmp_path / "hang"
    marker.write_text("")
    monkeypatch.setenv("L4PROXY_TEST_HANG_RELAY", f"{marker}:3600")
    return marker


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_lone_process_whose_relay_thread_is_stuck_exits(
    tmp_path: Path, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay thread sleeps for an hour from the start: /ready turns 503
    STALLED (from a third of the timeout, 1 s at least), and the process
    says why and exits 1 once its relay has not turned for the timeout,
    within one check's interval of it. Before: it served nothing, /ready
    answered LIVE, and it never exited."""
    marker = _hang(tmp_path, monkeypatch)
    flags = ("--single-process", "--watchdog-timeout", str(TIMEOUT))
    with running(tmp_path, impl, *flags) as (sidecar, _):
        sidecar.until(lambda: not marker.exists(), "the relay hung")
        answers: list[tuple[int, str]] = []
        deadline = time.monotonic() + WAIT  # (before: it never exited)
        while sidecar.proc.poll() is None and time.monotonic() < deadline:
            try:
                answers.append(_ready(sidecar))
            except OSError:  # (it exited meanwhile)
                break
            time.sleep(0.05)
        assert sidecar.proc.wait(timeout=WAIT) == 1, sidecar.log()
        log = sidecar.log()
        said = re.findall(
            r"the relay thread has not turned for ([\d.]+)s \(--watchdog-timeout 2\.0s\): "
            r"stuck, it serves nothing; exiting \(status 1\) for the container to be "
            r"restarted \(--single-process: no supervisor restarts a worker\)",
            log,
        )
        assert len(said) == 1, log
        # (its stall as the check saw it: the hang began before the first turn;
        # 0.5 s for a check that came late on a loaded machine)
        assert TIMEOUT <= float(said[0]) < TIMEOUT + INTERVAL + 0.5, log
        assert (503, "STALLED\n") in answers, answers
        assert answers[0] == (200, "LIVE\n"), answers  # (the first 1 s of the hang)
        assert set(answers) <= {(200, "LIVE\n"), (503, "STALLED\n")}, answers


def _get(sock: socket.socket) -> bool:
    """A GET on *sock*: whether it was answered 200 ok."""
    sock.sendall(GET % b"/")
    status, _, body = read_answer(sock)
    return (status, body) == (200, b"ok\n")


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_healthy_lone_process_is_not_killed_under_load(tmp_path: Path, impl: str) -> None:
    """The watchdog on (2 s), the relay busy and a big rule set (1,000
    ServiceEntries and 1,000 RouteRules) reloaded five times (SIGHUP; each
    load holds the GIL for most of a second, while the event loop and the
    pure relay's thread wait their turns for it): every GET answered (on a
    keep-alive connection and each on a new one), /ready LIVE at each ask,
    no exit; then SIGTERM: exit 0."""
    flags = ("--single-process", "--watchdog-timeout", str(TIMEOUT), "--drain-duration", "2")
    with running(tmp_path, impl, *flags) as (sidecar, _):
        big = tmp_path / "rules" / "big.yaml"
        asked = answered = 0
        with sidecar.connect() as keep:
            for i in range(5):
                loads = sidecar.log().count(" loaded from ")
                big.write_text(big_rules(1000) + "\n" * i)
                sidecar.proc.send_signal(signal.SIGHUP)
                while sidecar.log().count(" loaded from ") == loads:
                    assert sidecar.proc.poll() is None, sidecar.log()
                    with sidecar.connect() as fresh:
                        answered += _get(keep) + _get(fresh)
                    assert _ready(sidecar) == (200, "LIVE\n"), sidecar.log()
                    asked += 1
        assert sidecar.log().count(" loaded from ") >= 6, sidecar.log()
        assert asked >= 5 and answered == 2 * asked, (answered, asked)
        time.sleep(2 * TIMEOUT)  # idle: the relay's loop still turns
        assert _ready(sidecar) == (200, "LIVE\n")
        assert "has not turned" not in sidecar.log(), sidecar.log()
        sidecar.proc.send_signal(signal.SIGTERM)
        assert sidecar.proc.wait(timeout=WAIT) == 0, sidecar.log()
        assert sidecar.log().splitlines()[-1].endswith(" stopped"), sidecar.log()


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_stop_while_the_lone_relay_thread_is_stuck_ends_by_the_deadline(
    tmp_path: Path, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog off, the relay thread stuck (an hour), a GET waiting;
    SIGTERM: the process ends by the stop's deadline (--drain-duration 1 +
    10 s), exit 1, saying the relay thread did not end. The compiled
    relay's thread, which alone reads the SIGTERM, never does: the event
    loop takes it (said). Before: the compiled one never stopped, the pure
    one took 21 s (its close waited 10 s for the thread, twice), exit 0."""
    marker = _hang(tmp_path, monkeypatch)
    flags = ("--single-process", "--watchdog-timeout", "0", "--drain-duration", "1")
    with running(tmp_path, impl, *flags, "--drain-quiet", "0") as (sidecar, _):
        sidecar.until(lambda: not marker.exists(), "the relay hung")
        with sidecar.connect() as client:
            client.sendall(GET % b"/")
            sidecar.proc.send_signal(signal.SIGTERM)
            # (the deadline, and 3 s for a loaded machine)
            assert sidecar.proc.wait(timeout=1 + DRAIN_GRACE_S + 3) == 1, sidecar.log()
        log = sidecar.log()
        assert "(stuck); exit status 1" in log.splitlines()[-1], log
        assert log.count("stopped, but the relay thread did not end") == 1, log
        took = log.count("SIGTERM: the relay thread, which reads it, has not for")
        assert took == (impl == "compiled-uvloop"), log


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_worker_whose_relay_thread_is_stuck_is_unready_until_replaced(
    tmp_path: Path, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same /ready with a supervisor: its worker's relay thread stuck,
    /ready (the supervisor's, which asks the worker) answers 503 STALLED
    until the watchdog kills the worker, and LIVE again once its successor
    serves. Before: LIVE throughout."""
    marker = _hang(tmp_path, monkeypatch)
    flags = ("--workers", "1", "--watchdog-timeout", str(TIMEOUT))
    with running(tmp_path, impl, *flags) as (sidecar, _):
        sidecar.until(lambda: not marker.exists(), "the relay hung")
        answers = []
        deadline = time.monotonic() + WAIT
        while "its relay thread has not turned for" not in sidecar.log():
            assert time.monotonic() < deadline, sidecar.log()
            answers.append(_ready(sidecar))
            time.sleep(0.05)
        assert (503, "STALLED\n") in answers, answers
        sidecar.until(lambda: _ready(sidecar) == (200, "LIVE\n"), "its successor ready")
        with sidecar.connect() as sock:
            assert _get(sock)
        sidecar.proc.send_signal(signal.SIGTERM)
        assert sidecar.proc.wait(timeout=WAIT) == 0, sidecar.log()

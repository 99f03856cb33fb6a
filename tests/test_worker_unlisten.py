"""A listener's close does not hold the event loop while the compiled relay
lets go of it.

Worker.stop_accepting (each step of a drain) and Worker.hand_over ask the
compiled relay's loop, which accepts on the listeners in its own thread, to
stop accepting on each one they close, and must not close it, nor tell the
relay to drain, before that loop let go of it (HttpRelay.unlisten: at its
thread's next turn). unlisten() waited for that on the event loop's thread,
2 s at most per listener: while the relay's thread was busy or stuck, the
admin endpoint (--single-process: /ready, /stats), the watchdog's pings,
the L4 connections and the signals waited with it. Now the event loop
polls for it (Worker._relay_let_go), and says so where the relay's thread
did not let go in time (the listener closes then anyway, as before).

An in-process worker (tests/_worker.py) with the compiled relay (the pure
one accepts nowhere: the event loop does), whose relay thread the test puts
to sleep (hang_for_test), and the real admin endpoint on the worker's loop,
probed by a thread: the /ready answers counted between the start of
stop_accepting and its *then*, which runs once the relay let go.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from pathlib import Path

import pytest

import l4proxy.sidecar.worker as worker_module
from l4proxy.dataplane.listener import bind_listener
from l4proxy.sidecar.admin import AdminServer, WorkerView
from tests._worker import _worker_twin, gateway_service, worker_on
from tests.test_drain_keepalive import WAIT, Backend

HANG_S = 1.5  # the relay's thread sleeps this long from the hang_for_test()
STUCK_S = 3.0  # ... and this long where it is to let go after UNLISTEN_WAIT_S (0.2 s)
ASLEEP_S = 0.5  # ... and is asleep once it has not turned for this long (idle: 4 turns a second)


class _Probe(threading.Thread):
    """GET /ready on a new connection, again and again until stopped:
    :attr:`answered` counts the whole answers."""

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.answered = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            with socket.create_connection(self.address, timeout=WAIT) as sock:
                sock.sendall(b"GET /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                buf = b""
                while data := sock.recv(65536):
                    buf += data
            assert buf.startswith(b"HTTP/1.1 "), buf
            self.answered += 1


@pytest.mark.parametrize("in_time", [True, False], ids=["lets-go", "stuck"])
def test_stop_accepting_serves_the_admin_endpoint_while_the_relay_lets_go(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    in_time: bool,
) -> None:
    """The relay's thread asleep (HANG_S or STUCK_S, ASLEEP_S of it gone), the
    worker stops accepting on its gateway listener: /ready is answered
    (3 times at least: hundreds, where none was before) between the start
    of stop_accepting and its *then*. *in_time*: the relay's thread wakes
    within UNLISTEN_WAIT_S and lets go of the listener before *then*, no
    warning. Else (UNLISTEN_WAIT_S 0.2 s): *then* runs with the listener
    still the relay's, one warning names it, and the relay's thread lets
    go of it when it wakes."""
    _worker_twin("compiled", monkeypatch)
    if not in_time:
        monkeypatch.setattr(worker_module, "UNLISTEN_WAIT_S", 0.2)
    caplog.set_level(logging.WARNING, logger="l4proxy.sidecar.worker")
    backend = Backend()
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(backend.port))

    async def main() -> tuple[int, bool]:
        lst = bind_listener("127.0.0.1", 0, "gateway")
        async with worker_on([lst], rules) as (_, worker):
            relay: object = worker.relay
            assert relay is not None and hasattr(relay, "listening")  # (the compiled twin)
            admin = AdminServer(WorkerView(worker, "test"), lambda: None)
            await admin.start("127.0.0.1", 0)
            probe = _Probe(admin.address)
            probe.start()
            try:
                while probe.answered < 3:
                    await asyncio.sleep(0.01)
                assert relay.listening(0)  # type: ignore[attr-defined]
                relay.hang_for_test(HANG_S if in_time else STUCK_S)  # type: ignore[attr-defined]
                while relay.stalled() < ASLEEP_S:  # type: ignore[attr-defined]
                    await asyncio.sleep(0.01)
                seen: dict[str, int | bool] = {}

                def then() -> None:
                    seen["answered"] = probe.answered
                    seen["listening"] = relay.listening(0)  # type: ignore[attr-defined]

                before = probe.answered
                await worker.stop_accepting(then=then)
                while relay.listening(0):  # type: ignore[attr-defined]
                    await asyncio.sleep(0.01)  # (stuck: it lets go when it wakes)
            finally:
                probe.done.set()
                await asyncio.get_running_loop().run_in_executor(None, probe.join)
                await admin.close()
            return int(seen["answered"]) - before, bool(seen["listening"])

    try:
        answered, listening = asyncio.run(main())
    finally:
        backend.close()
    assert answered >= 3, answered  # (before: 0, 1 at most for an answer under way)
    warnings = [
        r.getMessage() for r in caplog.records if "did not stop accepting" in r.getMessage()
    ]
    if in_time:
        assert not listening  # (then ran once the relay's loop let go)
        assert warnings == []
    else:
        assert listening
        assert len(warnings) == 1, warnings
        assert "gateway" in warnings[0], warnings

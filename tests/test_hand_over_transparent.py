"""Transparent inbound through a hand-over: no client refused or reset.

A worker sent SIGTERM alone (``kill <worker pid>``, not a stop) hands its
listeners over to the slot's next worker (tests/test_worker_hand_over.py
drives it on a gateway listener on loopback). Here the listener is the
transparent one of a pod set up by ``l4proxy-init`` (network namespaces,
iptables' REDIRECT in PREROUTING): another pod calls the client pod's
app, each connection redirected to the sidecar, which finds the original
destination (SO_ORIGINAL_DST), classifies it inbound and relays it to
the local app, on the shared outbound port or on ``--inbound-port``.
While the worker hands over, a caller connects again and again (each
request on a connection of its own): every one is answered 200, none
refused or reset, and ``l4proxy_inbound_total`` counts each once (the old
worker's last connections too: its final counts, given as it exits).
Counts, never times.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from tests.mesh import IMPLS, PYTHON, VIP, Mesh, service_entry

pytestmark = pytest.mark.netns

# A caller in another pod: GET / on a connection of its own, again and
# again until a line comes on stdin; each outcome a line of its stdout (the
# test counts them), its errors (refused, reset, an EOF before a whole
# answer, a status not 200) named.
CALLER = r"""
import socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
with open(sys.stdout.fileno(), "w", buffering=1, closefd=False) as log:
    while not stop.is_set():
        try:
            with socket.create_connection((host, port), 5) as c:
                c.settimeout(5)
                c.sendall(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := c.recv(65536):
                    data += chunk
            head = data.split(b"\r\n", 1)[0]
            ok = head.startswith(b"HTTP/1.") and head.split()[1:2] == [b"200"]
            log.write("200\n" if ok else f"bad {data[:80]!r}\n")
        except OSError as exc:
            log.write(f"error {exc!r}\n")
"""

APP_PORT = 9090


class _Outcomes(threading.Thread):
    """The caller's lines, read as they come."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.lines: list[str] = []

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.decode().rstrip("\n"))

    def __len__(self) -> int:
        return len(self.lines)


def _until(mesh: Mesh, cond: object, what: str, timeout: float = 30.0) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        assert mesh.sidecar is not None and mesh.sidecar.alive(), mesh.sidecar_log(5000)
        assert time.monotonic() < deadline, f"{what} within {timeout}s:\n{mesh.sidecar_log(5000)}"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("impl", "routing", "inbound_port"),
    [
        ("compiled-uvloop", "connection", None),
        ("pure-asyncio", "connection", None),
        ("compiled-uvloop", "request", None),
        ("compiled-uvloop", "connection", "15006"),
    ],
)
def test_transparent_inbound_through_a_hand_over_refuses_no_client(
    mesh: Mesh, impl: str, routing: str, inbound_port: str | None
) -> None:
    """SIGTERM to the client pod's worker alone while a caller pod calls
    the pod's app through the sidecar's transparent inbound capture (the
    shared port 15001, or ``--inbound-port 15006``), a connection per
    request: each answered 200 before, during and after the hand-over
    (none refused, reset or cut); the old worker hands its listeners over
    and exits 0; /stats counts every connection once."""
    run_args: tuple[str, ...] = ("--http-routing", routing, "--drain-duration", "20")
    if inbound_port is None:
        mesh.start(impl, run_args=run_args)
    else:
        env, args = IMPLS[impl]
        mesh.env.update(env)
        mesh.write_rules(
            service_entry("bootcamp", VIP, 8080, mesh.endpoints()), name="registry.yaml"
        )
        mesh.start_client(
            init_args=("-z", inbound_port),
            run_args=(*args, *run_args, "--inbound-port", inbound_port),
        )
    assert mesh.client is not None and mesh.sidecar is not None
    sidecar = mesh.sidecar
    mesh.serve_bootcamp(mesh.client, "client-app", "9", port=APP_PORT)
    mesh.client.wait_listening(APP_PORT)
    if inbound_port is not None:
        mesh.client.wait_listening(int(inbound_port))
    [old] = sidecar.worker_pids()
    before = sidecar.stat("l4proxy_inbound_total")
    caller = mesh.net.add_pod("caller")
    proc = caller.popen(
        [PYTHON, "-c", CALLER, mesh.client.ipv4, str(APP_PORT)],
        user=1000,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=mesh.env,
    )
    out = _Outcomes(proc)
    out.start()
    try:
        _until(mesh, lambda: len(out) >= 20, "20 calls")
        os.kill(old, signal.SIGTERM)
        _until(mesh, lambda: "hands its listeners over to it" in mesh.sidecar_log(), "hand-over")
        n = len(out)
        _until(mesh, lambda: len(out) >= n + 20, "20 calls after the hand-over")
        exited = f"worker 0 (pid {old}) drained on its own SIGTERM and exited (status 0)"
        _until(mesh, lambda: exited in mesh.sidecar_log(), "the old worker's exit")
        n = len(out)
        _until(mesh, lambda: len(out) >= n + 20, "20 calls after its exit")
    finally:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(b"\n")
            proc.stdin.close()
        proc.wait(timeout=30)
        out.join(timeout=30)
    outcomes = out.lines
    assert [o for o in outcomes if o != "200"] == [], (outcomes, mesh.sidecar_log())
    assert len(outcomes) >= 60
    log = mesh.sidecar_log()
    assert f"worker 0 (pid {old}) drains on a SIGTERM of its own" in log, log
    assert "died with" not in log and "killed" not in log, log
    [new] = sidecar.worker_pids()
    assert new != old
    assert re.search(rf"worker 0 \(pid {new}\) accepts: pid {old} hands", log), log
    # each connection counted once: the old worker's last ones too (its final counts)
    assert sidecar.stat("l4proxy_inbound_total") == before + len(outcomes), log

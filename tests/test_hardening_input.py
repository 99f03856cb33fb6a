"""Hardening (issue 8): hostile and odd client input against one live sidecar.

All tests in this module share one mesh and one sidecar (started with
``--header-timeout 1``), on purpose: after every test the same worker must
still be serving (no restart, no new pid) and the fd count must come back
to where it was. Each case is a real connection from the client pod as uid
1000 through l4proxy-init's REDIRECT. The module runs twice, with a sidecar
per ``--http-routing`` mode (issue 11): ``connection`` (the pump relays
after the first head) and ``request`` (the relay reads every head); where
the two legitimately differ on the wire, ``echo_answer`` says how.

Backends in the "odd" pod (see tests/_hardening.py):

=================  ======  ====================================================
VIP                proto   backend
=================  ======  ====================================================
198.19.0.40:8081   HTTP    HTTP_ECHO: answers each request with its raw bytes
198.19.0.41:8082   HTTP    TCP_ECHO (declared HTTP: non-HTTP bytes go at L4)
198.19.0.42:8083   TCP     OBSERVER: prints how each connection ended
198.19.0.43:8084   TCP     OBSERVER rst: resets each connection after 1st bytes
=================  ======  ====================================================
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from l4proxy.demo.podnet import Pod, PodNetwork
from tests._hardening import (
    HTTP_ECHO,
    OBSERVER,
    SLOWLORIS,
    TCP_ECHO,
    echo_answer,
    exchange,
    settle_fds,
    wait_until,
)
from tests.conftest import _check_netns, _skip_or_fail
from tests.mesh import PYTHON, ROUTING_MODES, VIP, Mesh, service_entry

pytestmark = pytest.mark.netns

ECHO_VIP, RAW_VIP, OBS_VIP, RST_VIP = "198.19.0.40", "198.19.0.41", "198.19.0.42", "198.19.0.43"


class Observer:
    """Collects the OBSERVER backend's per-connection lines."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode().strip())


class Hostile:
    def __init__(self, mesh: Mesh, odd: Pod, observers: dict[str, Observer], mode: str) -> None:
        self.mesh = mesh
        self.mode = mode  # --http-routing: "connection" or "request"
        self.odd = odd
        self.observers = observers
        assert mesh.sidecar is not None and mesh.client is not None
        self.sidecar = mesh.sidecar
        self.client = mesh.client
        self.workers = mesh.sidecar.worker_pids()
        self.baseline_fds = mesh.sidecar.fd_count()
        self.baseline_listing = mesh.sidecar.open_fds()

    def ex(
        self, vip: str, port: int, steps: Sequence[tuple[str, object]], timeout: float = 10
    ) -> dict[str, Any]:
        return exchange(self.client, vip, port, steps, timeout)


@pytest.fixture(scope="module")
def hostile(http_routing: str) -> Iterator[Hostile]:
    """One sidecar per --http-routing mode; every test runs against both."""
    mode = http_routing
    ok, why = _check_netns()
    if not ok:
        _skip_or_fail(why)
    with PodNetwork() as net, Mesh(net) as mesh:
        mesh.start_backends()
        odd = net.add_pod("odd", labels={"app": "odd"})
        mesh.procs.append(odd.popen([PYTHON, "-c", HTTP_ECHO, "8081"], user=1000))
        mesh.procs.append(odd.popen([PYTHON, "-c", TCP_ECHO, "8082"], user=1000))
        observers = {}
        for port, behaviour in ((8083, "eof"), (8084, "rst")):
            proc = odd.popen(
                [PYTHON, "-u", "-c", OBSERVER, str(port), behaviour],
                user=1000,
                stdout=subprocess.PIPE,
            )
            mesh.procs.append(proc)
            observers[behaviour] = Observer(proc)
        for port in (8081, 8082, 8083, 8084):
            odd.wait_listening(port)
        ep: list[tuple[str, dict[str, str]]] = [(odd.ipv4, {})]
        mesh.write_rules(
            service_entry("bootcamp", VIP, 8080, mesh.endpoints()),
            service_entry("echo", ECHO_VIP, 8081, ep),
            service_entry("raw", RAW_VIP, 8082, ep),
            service_entry("obs", OBS_VIP, 8083, ep, "TCP", "tcp-obs"),
            service_entry("rst", RST_VIP, 8084, ep, "TCP", "tcp-rst"),
            name="registry.yaml",
        )
        mesh.start_client(run_args=("--header-timeout", "1", *ROUTING_MODES[mode]))
        yield Hostile(mesh, odd, observers, mode)


@pytest.fixture(autouse=True)
def same_worker_afterwards(hostile: Hostile) -> Iterator[None]:
    """Every case: the same worker serves afterwards, other clients unaffected, no leak."""
    yield
    s = hostile.sidecar
    assert s.alive(), hostile.mesh.sidecar_log()
    assert s.worker_pids() == hostile.workers, hostile.mesh.sidecar_log()
    assert s.stat("l4proxy_worker_restarts_total") == 0
    versions, _, failures = hostile.mesh.split(n=3)
    assert not failures and sum(versions.values()) == 3
    assert settle_fds(s, hostile.baseline_fds) <= hostile.baseline_fds, (
        f"at the start:\n{hostile.baseline_listing}\nnow:\n{s.open_fds()}\n{s.admin('/stats')}"
    )


# -- the head: slow, large, malformed ---------------------------------------------


def test_slowloris_is_bounded_by_header_timeout_and_others_are_served(hostile: Hostile) -> None:
    """40 clients trickle a head one byte per 0.1 s: each gets 408 and a close after
    about --header-timeout (1 s), however long it would go on; meanwhile curl
    requests are answered at once."""
    slow = hostile.client.popen(
        [PYTHON, "-c", SLOWLORIS, VIP, "8080", "40", "0.1"],
        user=1000,
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)  # the slow heads are in flight
    t0 = time.monotonic()
    lines = hostile.mesh.curl(f"http://{VIP}:8080/", 10)
    fast = time.monotonic() - t0
    out, _ = slow.communicate(timeout=60)
    results = json.loads(out)
    assert lines.count("200") == 10, lines
    assert fast < 5, fast  # curl's own startup dominates; 40 stuck heads do not
    for lasted, got in results:
        assert got.startswith("HTTP/1.1 408 Request Timeout"), got
        assert 0.9 <= lasted < 4, lasted
    assert hostile.sidecar.stat('l4proxy_refused_total{reason="header_timeout"}') >= 40


def test_a_client_that_sends_nothing_gets_408_after_the_header_timeout(
    hostile: Hostile,
) -> None:
    """A connection that never sends a byte holds a slot for --header-timeout,
    not for --idle-timeout (an hour): the L4 path times its peek from accept,
    the relay a connection's first head from its hand-off."""
    before = hostile.sidecar.stat('l4proxy_refused_total{reason="header_timeout"}')
    r = hostile.ex(VIP, 8080, [])
    assert r["data"].startswith(b"HTTP/1.1 408 Request Timeout\r\n"), r
    assert r["data"].endswith(b"\r\n\r\nrequest header timeout"), r
    assert r["end"] == "eof" and 0.9 <= r["elapsed"] < 4, r
    after = hostile.sidecar.stat('l4proxy_refused_total{reason="header_timeout"}')
    assert after == before + 1


def test_head_over_64kib_is_answered_431(hostile: Hostile) -> None:
    head = b"GET / HTTP/1.1\r\nHost: bootcamp\r\n" + b"X-Pad: " + b"a" * 70000 + b"\r\n\r\n"
    r = hostile.ex(VIP, 8080, [("send", head)])
    assert r["data"].startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), r
    assert r["end"] == "eof", r


def test_many_header_lines_over_64kib_is_answered_431(hostile: Hostile) -> None:
    head = b"GET / HTTP/1.1\r\nHost: bootcamp\r\n" + b"X-A: b\r\n" * 10000 + b"\r\n"
    r = hostile.ex(VIP, 8080, [("send", head)])
    assert r["data"].startswith(b"HTTP/1.1 431 "), r


def test_obs_fold_is_rejected_with_400(hostile: Hostile) -> None:
    """obs-fold (a header continued on a line that starts with SP/HTAB) is a 400.

    RFC 9112 §5.2 lets a proxy reject it or unfold it; we forward bytes
    verbatim and never rewrite them, so unfolding would mean routing on a
    header value the upstream would read differently. Rejecting is the only
    consistent choice (see "Decisions" in l4proxy/dataplane/_peek_py.py)."""
    head = b"GET / HTTP/1.1\r\nHost: echo\r\nX-Long: one\r\n  two\r\n\r\n"
    r = hostile.ex(ECHO_VIP, 8081, [("send", head)])
    assert r["data"].startswith(b"HTTP/1.1 400 Bad Request\r\n"), r
    assert r["end"] == "eof"


def test_bad_request_with_a_body_in_flight_still_gets_its_answer(hostile: Hostile) -> None:
    """A 400 for a head the client follows with a large body: the client reads
    the 400, not a reset (we shut down our side before closing)."""
    head = b"POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
    r = hostile.ex(ECHO_VIP, 8081, [("send", head + b"x" * (8 << 20))])
    assert r["data"].startswith(b"HTTP/1.1 400 Bad Request\r\n"), r


# -- not HTTP on an HTTP port: L4, untouched -------------------------------------


def _client_hello() -> bytes:
    """A real TLS ClientHello, as the ssl module would put it on the wire."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="raw.default.svc.cluster.local")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\x00\xff" + os.urandom(256 * 1024), id="binary-256KiB"),
        pytest.param(b"GET \x00\x01\x02 not http" + os.urandom(4096), id="get-then-binary"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(1024), id="h2-preface"),
        pytest.param(_client_hello(), id="tls-client-hello"),
    ],
)
def test_non_http_on_an_http_port_is_relayed_untouched(hostile: Hostile, payload: bytes) -> None:
    r = hostile.ex(RAW_VIP, 8082, [("send", payload), ("shut", None)])
    assert r["end"] == "eof", r
    assert r["data"] == payload


# -- HTTP that is odd but valid: spliced after the first head, byte-identical ----

REQ = b"GET /a HTTP/1.1\r\nHost: echo\r\n\r\n"
CASES: dict[str, tuple[list[bytes], list[tuple[str, object]], int]] = {}


def _case(name: str, reqs: list[bytes], steps: list[tuple[str, object]] | None = None) -> None:
    CASES[name] = (reqs, steps or [("send", b"".join(reqs))], 0)


_case(
    "pipelined",
    [
        REQ,
        b"GET /b HTTP/1.1\r\nHost: echo\r\n\r\n",
        b"GET /c HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n",
    ],
)
_case(
    "content-length",
    [
        b"POST /up HTTP/1.1\r\nHost: echo\r\nContent-Length: 11\r\n"
        b"Connection: close\r\n\r\nhello\r\nbody"
    ],
)
_case(
    "chunked",
    [
        b"POST /up HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
    ],
)
_case("http10-no-host", [b"GET /old HTTP/1.0\r\nUser-Agent: x\r\n\r\n"])
_case(
    "absolute-form",
    [
        b"GET http://echo.default.svc.cluster.local:8081/p?q=1 HTTP/1.1\r\n"
        b"Host: ECHO.default.svc.cluster.local:8081\r\nConnection: close\r\n\r\n"
    ],
)
_case(
    "odd-case-names",
    [b"GET / HTTP/1.1\r\nhOsT: echo\r\nx-MiXeD-CaSe: V\r\nCONNECTION: close\r\n\r\n"],
)
_case(
    "obs-text",
    [b"GET /lf HTTP/1.1\r\nHost: echo\r\nX-Latin: caf\xe9\r\nConnection: close\r\n\r\n"],
)
_trickled = b"GET /slow HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n"
CASES["head-in-5-byte-pieces"] = (
    [_trickled],
    [
        s
        for i in range(0, len(_trickled), 5)
        for s in (("send", _trickled[i : i + 5]), ("sleep", 0.01))
    ],
    0,
)
_big = b"y" * 200000
_expect = (
    b"PUT /e HTTP/1.1\r\nHost: echo\r\nExpect: 100-continue\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_big)
)
CASES["expect-100-continue"] = (
    [_expect + _big],
    [("send", _expect), ("expect", b"HTTP/1.1 100 Continue\r\n\r\n"), ("send", _big)],
    1,
)


@pytest.mark.parametrize("case", list(CASES))
def test_odd_but_valid_http_reaches_the_backend_byte_identical(hostile: Hostile, case: str) -> None:
    """The backend answers with the raw bytes it got; what comes back must be
    exactly what that backend sent for exactly the bytes the client sent."""
    reqs, steps, continues = CASES[case]
    r = hostile.ex(ECHO_VIP, 8081, steps)
    assert r["error"] is None, r
    assert r["data"] == echo_answer(reqs, continues, hostile.mode)
    assert r["end"] == "eof"


# -- half-close and resets ----------------------------------------------------------


def test_client_half_close_after_a_request_still_gets_the_response(hostile: Hostile) -> None:
    r = hostile.ex(ECHO_VIP, 8081, [("send", REQ), ("shut", None)])
    assert r["data"] == echo_answer([REQ], http_routing=hostile.mode), r
    assert r["end"] == "eof"
    # The bootcamp app too (it answers, then sees our EOF and closes).
    r = hostile.ex(
        VIP, 8080, [("send", b"GET / HTTP/1.1\r\nHost: bootcamp\r\n\r\n"), ("shut", None)]
    )
    assert b"Hello Kubernetes bootcamp!" in r["data"], r
    assert r["end"] == "eof"


def test_client_reset_is_passed_on_as_a_reset_upstream(hostile: Hostile) -> None:
    obs = hostile.observers["eof"]
    before = len(obs.lines)
    for _ in range(5):
        r = hostile.ex(OBS_VIP, 8083, [("send", b"x" * 1000), ("sleep", 0.2), ("reset", None)])
        assert r["end"] == "we-reset", r
    assert wait_until(lambda: len(obs.lines) >= before + 5, 5), obs.lines
    # A reset, never a clean EOF that would pass a truncated stream off as complete.
    assert obs.lines[before:] == ["reset 1000"] * 5


def test_upstream_reset_is_passed_on_as_a_reset_to_the_client(hostile: Hostile) -> None:
    for _ in range(5):
        r = hostile.ex(RST_VIP, 8084, [("send", b"x" * 100), ("sleep", 0.5)])
        assert r["end"] == "reset", r
    assert hostile.sidecar.stat("l4proxy_resets_total") >= 5


def test_client_gone_during_the_head_or_the_connect(hostile: Hostile) -> None:
    """Clients that vanish before routing (half a head, then RST or FIN)."""
    for steps in (
        [("send", b"GET / HTTP/1.1\r\nHo"), ("reset", None)],
        [("send", b"GET / HTTP/1.1\r\nHo"), ("shut", None)],
        [("shut", None)],
        [("reset", None)],
    ):
        r = hostile.ex(VIP, 8080, steps, timeout=5)
        assert r["error"] is None, r

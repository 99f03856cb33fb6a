"""LEAST_REQUEST orders endpoints by what they really carry, in both HTTP modes.

In-process: a real :class:`~l4proxy.sidecar.worker.Worker` on a gateway
listener on loopback, a real :class:`~l4proxy.rules.watch.RuleWatcher`, and
two backends, A and B, on 127.0.0.1. ``x-pin: a`` routes to A alone (a
subset); everything else goes to A or B by LEAST_REQUEST. The test pins long-
lived work on A (connections, tunnels, requests in flight), then sends new
work unpinned: all of it must go to B, which carries less. A round robin
sends half of it to A, which is what LEAST_REQUEST did where it did not see
A's load:

* ``--http-routing connection``: the worker never counted the connections
  it handed to the pump (``active_per_endpoint`` was read, never written);
* ``--http-routing request``: a tunnel (Upgrade, CONNECT) left the count
  once handed to the pump, and the compiled relay's own pick did not see
  the requests its slow path (chunked bodies, Expect, tunnels) had in flight.

Counts are waited for, never slept for. Every test runs on both twins (the
compiled pump and relay, and the pure ones).
"""

from __future__ import annotations

import asyncio
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

import l4proxy.dataplane.pump as pump_module
import l4proxy.dataplane.relay as relay_module
import l4proxy.sidecar.worker as worker_module
from l4proxy.sidecar.admin import WorkerView, clusters_text
from l4proxy.sidecar.worker import Worker
from tests._worker import GATEWAY_HOST, gateway_routes, gateway_service, gateway_worker
from tests.conftest import load_twin

N = 3  # long-lived things pinned on A

# A and B (versions a and b) behind a gateway; x-pin: a routes to A alone.
ROUTES = """
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: svc}
spec:
  host: svc.default.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: %s}}
  subsets:
  - {name: a, labels: {version: a}}
  - {name: b, labels: {version: b}}
""" + gateway_routes(
    f"""\
  - match:
    - headers:
        x-pin: {{exact: a}}
    route:
    - destination: {{host: {GATEWAY_HOST}, subset: a}}
  - route:
    - destination: {{host: {GATEWAY_HOST}}}
""",
    api="v1alpha3",
)


@pytest.fixture(params=["compiled", "pure"])
def twin(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The worker builds this twin's pump and relay (the choice is made at
    import: l4proxy.dataplane._impl)."""
    which: str = request.param
    monkeypatch.setattr(pump_module, "Pump", load_twin("pump", which).Pump)
    monkeypatch.setattr(relay_module, "IMPLEMENTATION", which)
    monkeypatch.setattr(worker_module, "HttpRelay", load_twin("relay", which).HttpRelay)
    yield which


class Backend:
    """Answers its name; holds (never answers) ``/hold`` and WebSocket
    upgrades (101, then silence) until the other side closes, or release():
    ``held`` counts those it holds now."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.held = 0
        self.holding: list[socket.socket] = []
        self.lock = threading.Lock()
        backend = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while line := self.rfile.readline():
                    head = line
                    while (h := self.rfile.readline()) not in (b"\r\n", b""):
                        head += h
                    if b"upgrade: websocket" in head.lower():
                        self.wfile.write(
                            b"HTTP/1.1 101 Switching Protocols\r\n"
                            b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                        )
                        backend.hold(self.connection, self.rfile)
                        return
                    if line.split()[1].endswith(b"/hold"):
                        backend.hold(self.connection, self.rfile)
                        return
                    body = backend.name.encode()
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n" + body)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.endpoint = ("127.0.0.1", self.server.server_address[1])

    def hold(self, conn: socket.socket, rfile: Any) -> None:
        with self.lock:
            self.held += 1
            self.holding.append(conn)
        try:
            while rfile.read1(65536):
                pass
        except OSError:
            pass
        finally:
            with self.lock:
                self.held -= 1

    def release(self) -> None:
        """Close what is held (a request in flight ends only so: its client
        may have half-closed, and waits for the answer)."""
        with self.lock:
            held, self.holding = self.holding, []
        for conn in held:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def backends() -> Iterator[tuple[Backend, Backend]]:
    a, b = Backend("a"), Backend("b")
    yield a, b
    a.close()
    b.close()


def wait_for(what: str, check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.005)


def read_head(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def get(s: socket.socket, pin: bool = False) -> str:
    """One GET on *s* (kept alive); the name of the backend that answered."""
    s.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\n%s\r\n" % (b"x-pin: a\r\n" if pin else b""))
    data = read_head(s)
    while len(data.split(b"\r\n\r\n", 1)[1]) < 1:
        data += s.recv(4096)
    assert data.startswith(b"HTTP/1.1 200 "), data
    return data.split(b"\r\n\r\n", 1)[1].decode()


def tunnel(address: tuple[str, int]) -> socket.socket:
    """A WebSocket to A, established (its 101 read)."""
    s = socket.create_connection(address, timeout=10)
    s.sendall(
        b"GET /ws HTTP/1.1\r\nHost: gw\r\nx-pin: a\r\n"
        b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert read_head(s).startswith(b"HTTP/1.1 101 "), "no tunnel"
    return s


def slow_in_flight(address: tuple[str, int]) -> socket.socket:
    """A request to A that A does not answer: in flight, on the compiled
    relay's slow path (which takes absolute-form targets, as it takes
    CONNECT, Upgrade and transfer codings other than chunked)."""
    s = socket.create_connection(address, timeout=10)
    s.sendall(b"GET http://gw/hold HTTP/1.1\r\nHost: gw\r\nx-pin: a\r\n\r\n")
    return s


def run_worker(
    tmp_path: Path,
    backends: tuple[Backend, Backend],
    mode: str,
    policy: str,
    scenario: Callable[[Worker, tuple[str, int]], Coroutine[Any, Any, None]],
) -> None:
    a, b = backends
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        gateway_service(a.endpoint[1], b.endpoint[1], labels=("a", "b")) + ROUTES % policy
    )

    async def main() -> None:
        async with gateway_worker(rules, http_routing=mode) as (_, worker, address):
            await scenario(worker, address)

    asyncio.run(main())


def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking client step off the worker's loop."""
    return asyncio.get_running_loop().run_in_executor(None, fn, *args)


def endpoint_stats(worker: Worker, twin: str) -> dict[tuple[str, int], dict[str, Any]]:
    (cluster,) = WorkerView(worker, twin).clusters_now()
    return {(ep["address"], ep["port"]): ep for ep in cluster["endpoints"]}


def test_per_connection_counts_the_connections_in_the_pump(
    tmp_path: Path, backends: tuple[Backend, Backend], twin: str
) -> None:
    """--http-routing connection: N keep-alive connections pinned on A stay
    counted while the pump relays them; N new connections all go to B (the
    last one at N - 1 against N); each counts until the pump reports its
    end, and /clusters shows the counts (cx_active)."""
    a, b = backends

    async def scenario(worker: Worker, address: tuple[str, int]) -> None:
        def connect_and_get(pin: bool) -> tuple[socket.socket, str]:
            s = socket.create_connection(address, timeout=10)
            return s, get(s, pin)

        opened: list[socket.socket] = []
        try:
            for _ in range(N):
                s, name = await in_thread(connect_and_get, True)
                opened.append(s)
                assert name == "a"
            assert worker.connection_snapshot() == {a.endpoint: N}
            names = []
            for _ in range(N):
                s, name = await in_thread(connect_and_get, False)
                opened.append(s)
                names.append(name)
            assert names == ["b"] * N, f"LEAST_REQUEST sent new connections to A: {names}"
            stats = endpoint_stats(worker, twin)
            assert stats[a.endpoint]["cx_active"] == stats[b.endpoint]["cx_active"] == N
            assert "rq_active" not in stats[a.endpoint]
            text = clusters_text(WorkerView(worker, twin).clusters_now())
            assert f"127.0.0.1:{a.endpoint[1]}::cx_active::{N}\n" in text
        finally:
            for s in opened:
                s.close()
        await in_thread(
            wait_for, "every connection's end reported", lambda: worker.connection_snapshot() == {}
        )
        stats = endpoint_stats(worker, twin)
        assert stats[a.endpoint]["cx_active"] == stats[b.endpoint]["cx_active"] == 0

    run_worker(tmp_path, backends, "connection", "LEAST_REQUEST", scenario)


@pytest.mark.parametrize("held", ["tunnel", "slow_path"])
def test_per_request_counts_tunnels_and_the_slow_paths_requests(
    tmp_path: Path, backends: tuple[Backend, Backend], twin: str, held: str
) -> None:
    """--http-routing request, LEAST_REQUEST (the newer name of LEAST_REQUEST):
    N WebSockets to A (in the pump once upgraded), or N requests in flight
    to A on the compiled relay's slow path, count as A's requests; 2 N
    requests after them, one at a time, all go to B. The tunnels count until
    the pump reports their end; /clusters shows the counts (rq_active)."""
    a = backends[0]
    pin = tunnel if held == "tunnel" else slow_in_flight

    async def scenario(worker: Worker, address: tuple[str, int]) -> None:
        assert worker.relay is not None
        opened: list[socket.socket] = []
        try:
            for _ in range(N):
                opened.append(await in_thread(pin, address))
            await in_thread(wait_for, f"A holds {N}", lambda: a.held == N)
            if twin == "compiled":  # what this test is about: not the C loop's requests
                assert worker.relay.stats()["slow_path"] == N
            # (a tunnel counts twice for a moment: the worker counts it before
            # the relay's pool forgets its request, never after)
            relay = worker.relay
            await in_thread(wait_for, f"A counts {N}", lambda: relay.pools.active(a.endpoint) == N)
            client = await in_thread(socket.create_connection, address, 10)
            opened.append(client)
            names = [await in_thread(get, client) for _ in range(2 * N)]
            assert names == ["b"] * (2 * N), f"LEAST_REQUEST sent requests to A: {names}"
            stats = endpoint_stats(worker, twin)
            assert stats[a.endpoint]["rq_active"] == N
        finally:
            for s in opened:
                s.close()
            a.release()
        await in_thread(
            wait_for,
            "A's tunnels or requests counted down",
            lambda: relay.pools.active(a.endpoint) == 0 and worker.connection_snapshot() == {},
        )
        assert endpoint_stats(worker, twin)[a.endpoint]["rq_active"] == 0

    run_worker(tmp_path, backends, "request", "LEAST_REQUEST", scenario)

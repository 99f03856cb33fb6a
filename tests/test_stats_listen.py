"""``l4proxy run --stats-listen``: a read-only scrape endpoint outside the pod."""

from __future__ import annotations

import asyncio
import select
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
import yaml

from l4proxy.inject import InjectOptions, inject_text
from l4proxy.sidecar.admin import AdminServer
from tests.mesh import PYTHON, VIP, Mesh, route_rule


class Page:
    """A /stats page of fixed text (an Exposition's pieces)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def pieces(self, keep: Any = None) -> list[str]:
        return [self.text]


class Source:
    """An admin source with fixed answers (the endpoint's own logic is under test)."""

    health_check_failed = False

    async def ready(self) -> bool:
        return True

    async def state(self) -> str:
        return "LIVE"

    async def stats(self) -> Page:
        return Page("istio_requests_total 3\n")

    async def stats_json(self) -> dict[str, Any]:
        return {"istio_requests_total": 3}

    async def config_dump(self) -> Any:
        return {"secret": "the whole config"}

    async def clusters(self) -> Any:
        return []


def fetch(url: str, method: str = "GET") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_stats_endpoint_serves_stats_and_ready_only() -> None:
    quits: list[int] = []

    async def main() -> dict[str, tuple[int, str]]:
        server = AdminServer(Source(), lambda: quits.append(1), stats_only=True)
        await server.start("127.0.0.1", 0)
        base = "http://{}:{}".format(*server.address)
        out = {}
        for path, method in (
            ("/stats", "GET"),
            ("/stats/prometheus", "GET"),
            ("/stats?format=json", "GET"),
            ("/ready", "GET"),
            ("/config_dump", "GET"),
            ("/clusters", "GET"),
            ("/quitquitquit", "POST"),
        ):
            out[f"{method} {path}"] = await asyncio.to_thread(fetch, base + path, method)
        await server.close()
        return out

    got = asyncio.run(main())
    assert got["GET /stats"] == (200, "istio_requests_total 3\n")
    assert got["GET /stats/prometheus"] == got["GET /stats"]  # Istio's path on 15090
    assert got["GET /stats?format=json"][0] == 200
    assert got["GET /ready"] == (200, "LIVE\n")
    assert got["GET /config_dump"][0] == 404 and "secret" not in got["GET /config_dump"][1]
    assert got["GET /clusters"][0] == 404
    assert got["POST /quitquitquit"][0] == 405 and quits == []


def test_inject_stats_port_adds_the_listener_and_prometheus_annotations() -> None:
    plain = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  selector: {matchLabels: {app: a}}
  template:
    metadata: {labels: {app: a}}
    spec:
      containers: [{name: app, image: app}]
"""
    out = inject_text(plain, InjectOptions(http_routing="request", stats_port=15090)).text
    (dep,) = [d for d in yaml.safe_load_all(out) if d]
    tpl = dep["spec"]["template"]
    sidecar = tpl["spec"]["initContainers"][1]
    assert sidecar["command"][-2:] == ["--stats-listen", "0.0.0.0:15090"]
    notes = tpl["metadata"]["annotations"]
    assert notes["prometheus.io/port"] == "15090" and notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/path"] == "/stats/prometheus"
    # injecting again without it takes out what we added, and only that
    again = inject_text(out, InjectOptions()).text
    assert again == inject_text(plain, InjectOptions()).text


@pytest.mark.netns
def test_prometheus_in_another_pod_scrapes_the_sidecar(mesh: Mesh) -> None:
    mesh.start(
        "compiled-uvloop",
        route_rule({"v2": 100}),
        run_args=("--http-routing", "request", "--stats-listen", "0.0.0.0:15090"),
    )
    assert mesh.client is not None
    mesh.curl(f"http://{VIP}:8080/", 5)
    scraper = mesh.bootcamp[0]  # any other pod: the pod network, not loopback
    code = (
        "import sys,urllib.request,urllib.error\n"
        "def get(p, m='GET'):\n"
        "    try:\n"
        "        req = urllib.request.Request(sys.argv[1] + p, method=m)\n"
        "        r = urllib.request.urlopen(req, timeout=5)\n"
        "        return r.status, r.read().decode()\n"
        "    except urllib.error.HTTPError as e:\n"
        "        return e.code, ''\n"
        "s, body = get('/stats/prometheus')\n"
        "print(s, [l for l in body.splitlines() if l.startswith('istio_requests_total{')])\n"
        "print(get('/quitquitquit', 'POST')[0])\n"
    )
    url = f"http://{mesh.client.ipv4}:15090"
    out = scraper.run([PYTHON, "-c", code, url], user=1000, timeout=20).stdout.splitlines()
    assert out[0].startswith("200 ") and 'destination_version="v2"' in out[0], out
    assert out[0].count("istio_requests_total{") == 1 and out[0].endswith(" 5']"), out
    assert out[1] == "405"  # read-only: the sidecar is still there
    assert mesh.sidecar is not None and mesh.sidecar.alive()


def test_the_stats_endpoint_bounds_slow_and_greedy_clients(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """--stats-listen may face the network. A client trickling a header line
    every 0.2 s held its connection for ever (a fresh 5 s per line), any
    number of them could, and a 64 KiB line logged a traceback each time."""
    import l4proxy.sidecar.admin as admin

    monkeypatch.setattr(admin, "HEAD_TIMEOUT_S", 0.6, raising=False)
    monkeypatch.setattr(admin, "MAX_CLIENTS", 2, raising=False)

    def trickle(address: tuple[str, int]) -> float:
        """Seconds until the server closes a head that never ends."""
        started = time.monotonic()
        with socket.create_connection(address, timeout=10) as s:
            s.sendall(b"GET /stats HTTP/1.1\r\n")
            poller = select.poll()  # (not select(): no fd limit of 1024)
            poller.register(s, select.POLLIN)
            for i in range(50):
                if poller.poll(200):  # readable: closed
                    break
                try:
                    s.sendall(b"X-%d: y\r\n" % i)
                except OSError:
                    break
        return time.monotonic() - started

    def long_line(address: tuple[str, int]) -> bytes:
        with socket.create_connection(address, timeout=10) as s:
            s.sendall(b"GET /stats HTTP/1.1\r\nX: " + b"y" * 20000 + b"\r\n\r\n")
            return s.recv(100)

    def closed(s: socket.socket) -> bool:
        s.settimeout(5)
        try:
            return s.recv(100) == b""
        except ConnectionResetError:
            return True

    async def main() -> tuple[float, bytes, tuple[int, str], list[bool], tuple[int, int]]:
        server = AdminServer(Source(), lambda: None, stats_only=True)
        await server.start("127.0.0.1", 0)
        address = server.address
        held = await asyncio.to_thread(trickle, address)
        answer = await asyncio.to_thread(long_line, address)
        idle = [socket.create_connection(address) for _ in range(2)]
        await asyncio.sleep(0.1)  # both are being served (waiting for a head)
        # A new one takes the place of the oldest idle one: idle connections
        # (anyone in the pod can open 64) turned the readiness probe away.
        third = await asyncio.to_thread(fetch, "http://{}:{}/ready".format(*address))
        gone = [await asyncio.to_thread(closed, idle[0])]
        counts = (server.evicted, server.turned_away)
        for s in idle:
            s.close()
        await server.close()
        return held, answer, third, gone, counts

    held, answer, third, gone, counts = asyncio.run(main())
    assert held < 3.0, held  # closed at HEAD_TIMEOUT_S (0.6 s), not after 50 lines
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert third == (200, "LIVE\n")  # was: closed at once
    assert gone == [True] and counts == (1, 0)


def test_head_gets_no_body_and_no_worker_answering_is_503() -> None:
    """HEAD got the body too; /config_dump and /clusters with no worker
    answering (all restarting, or busy past 3 s) said 200 "null"."""

    class Silent(Source):
        async def config_dump(self) -> Any:
            return None

        async def clusters(self) -> Any:
            return None

    def raw(address: tuple[str, int], request: bytes) -> bytes:
        with socket.create_connection(address, timeout=5) as s:
            s.sendall(request)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        return data

    async def main() -> list[object]:
        server = AdminServer(Silent(), lambda: None)
        await server.start("127.0.0.1", 0)
        url = "http://{}:{}".format(*server.address)
        head = await asyncio.to_thread(raw, server.address, b"HEAD /ready HTTP/1.1\r\n\r\n")
        out = [head]
        for path in ("/config_dump", "/clusters", "/clusters?format=json"):
            out.append((await asyncio.to_thread(fetch, url + path))[0])
        await server.close()
        return out

    head, *codes = asyncio.run(main())
    assert isinstance(head, bytes)
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: 5\r\n" in head
    assert head.endswith(b"\r\n\r\n")  # the head only
    assert codes == [503, 503, 503]


def test_the_admin_port_speaks_as_envoy_s() -> None:
    """/stats/prometheus on the admin port too (Envoy's path, which a
    scrape configuration names: it was 404 there), statuses with their
    reason phrases (was "404 Error"), a 405 with its Allow, and a format it
    does not know refused (was the text, silently)."""

    def raw(address: tuple[str, int], request: bytes) -> bytes:
        with socket.create_connection(address, timeout=5) as s:
            s.sendall(request)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        return data

    async def main(stats_only: bool, requests: list[bytes]) -> list[bytes]:
        server = AdminServer(Source(), lambda: None, stats_only=stats_only)
        await server.start("127.0.0.1", 0)
        out = [await asyncio.to_thread(raw, server.address, r) for r in requests]
        await server.close()
        return out

    prom, xml, cxml, quit_get, missing = asyncio.run(
        main(
            False,
            [
                b"GET /stats/prometheus HTTP/1.1\r\n\r\n",
                b"GET /stats?format=xml HTTP/1.1\r\n\r\n",
                b"GET /clusters?format=xml HTTP/1.1\r\n\r\n",
                b"GET /quitquitquit HTTP/1.1\r\n\r\n",
                b"GET /nope HTTP/1.1\r\n\r\n",
            ],
        )
    )
    assert prom.startswith(b"HTTP/1.1 200 OK\r\n") and prom.endswith(b"istio_requests_total 3\n")
    assert xml.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"'xml'" in xml
    assert cxml.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert quit_get.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert b"\r\nallow: POST\r\n" in quit_get
    assert missing.startswith(b"HTTP/1.1 404 Not Found\r\n") and b"/stats/prometheus" in missing
    (post,) = asyncio.run(main(True, [b"POST /stats HTTP/1.1\r\n\r\n"]))
    assert post.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert b"\r\nallow: GET, HEAD\r\n" in post


def test_a_request_with_a_body_gets_its_whole_answer() -> None:
    """The endpoint reads the head only: closing with a request body unread
    sent an RST, which cut the answer short at the client (curl: "Connection
    reset by peer", no status). The body is now read and dropped before the
    close, within limits."""
    body = b"x" * 300_000

    def post(address: tuple[str, int]) -> bytes:
        with socket.create_connection(address, timeout=10) as s:
            s.sendall(b"POST /ready HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body))
            s.sendall(body)
            time.sleep(0.3)  # the answer and the close are done before we read
            got = b""
            while data := s.recv(65536):
                got += data
            return got

    async def main() -> bytes:
        server = AdminServer(Source(), lambda: None)
        await server.start("127.0.0.1", 0)
        try:
            return await asyncio.to_thread(post, server.address)
        finally:
            await server.close()

    answer = asyncio.run(main())
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"LIVE\n"), answer


def _unsendable() -> int:
    """An answer size that a client with a small receive buffer, not reading,
    cannot take whole: more than the server's socket send buffer can grow to."""
    with open("/proc/sys/net/ipv4/tcp_wmem") as f:
        return max(8 << 20, int(f.read().split()[2]) + (2 << 20))


def _hogs(address: tuple[str, int], request: bytes, n: int) -> list[socket.socket]:
    """*n* clients that send *request* and never read (a 4 KiB receive buffer)."""
    out = []
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(address)
        s.sendall(request)
        out.append(s)
    return out


async def _reset(hogs: list[socket.socket], within: float) -> int:
    """How many of *hogs* the server has reset (POLLERR/POLLHUP), waiting up to *within* s."""
    poll = select.poll()
    for s in hogs:
        poll.register(s, select.POLLERR | select.POLLHUP)
    deadline = time.monotonic() + within
    while True:
        gone = sum(1 for _, ev in poll.poll(0) if ev & (select.POLLERR | select.POLLHUP))
        if gone == len(hogs) or time.monotonic() > deadline:
            return gone
        await asyncio.sleep(0.1)


async def _get(address: tuple[str, int], path: str, within: float) -> tuple[bytes, float]:
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(b"GET %s HTTP/1.1\r\n\r\n" % path.encode())
        answer = await asyncio.wait_for(reader.read(), within)
    except ConnectionError:
        answer = b""
    finally:
        writer.close()
    return answer, time.monotonic() - started


def test_clients_that_do_not_read_their_answers_do_not_hold_the_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """64 clients that asked for a big /config_dump and did not read it held
    every place for 30 s: /ready (the kubelet's readiness probe) was reset
    meanwhile, and each held ~3 copies of the answer (1.3 GB for 8 MB).

    With 8 places here, not 64: on a loaded machine writing 64 big answers
    took longer than SEND_STALL_S, so the first client was reset as stalled
    before /ready came, which then found a free place and evicted none."""
    import l4proxy.sidecar.admin as admin

    monkeypatch.setattr(admin, "MAX_CLIENTS", 8)
    big = "x" * _unsendable()

    class Big(Source):
        async def config_dump(self) -> Any:
            return {"rules": big}

    async def main() -> None:
        server = AdminServer(Big(), lambda: None)
        await server.start("127.0.0.1", 0)
        hogs = _hogs(server.address, b"GET /config_dump HTTP/1.1\r\n\r\n", admin.MAX_CLIENTS)
        try:
            for _ in range(300):  # every one has its answer, and is not taking it
                await asyncio.sleep(0.1)  # (30 s at most: 64 big answers on a loaded machine)
                if server.clients == admin.MAX_CLIENTS and not server._reading:
                    break
            assert server.clients == admin.MAX_CLIENTS and not server._reading
            assert server.stalled == 0  # (every place held: none reset yet)
            ready, took = await _get(server.address, "/ready", 5.0)
            assert ready.startswith(b"HTTP/1.1 200 ") and ready.endswith(b"LIVE\n"), ready
            # (at once; 5 s for a loaded machine: before, it was reset, or waited 30 s)
            assert took < 5.0 and server.turned_away == 0, (took, server.turned_away)
            # the oldest one made room (reset), and one answer is held for the rest
            assert server.evicted == 1
            assert len({id(a) for a in server._answers.values()}) == 1
            assert len(server._answers) == admin.MAX_CLIENTS - 1
            # the rest are reset when they have taken nothing for SEND_STALL_S
            assert await _reset(hogs, admin.SEND_STALL_S + 3) == len(hogs)
            for _ in range(20):
                if server.clients == 0:
                    break
                await asyncio.sleep(0.05)
            assert server.clients == 0 and not server._answers
            assert server.stalled == admin.MAX_CLIENTS - 1
        finally:
            for s in hogs:
                s.close()
            await server.close()

    asyncio.run(main())


def test_answers_not_taken_hold_at_most_answer_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Different big answers (a /stats that changes between requests) that
    their clients do not take: the oldest are reset to keep what is held
    within ANSWER_BYTES."""
    import l4proxy.sidecar.admin as admin

    size = _unsendable()
    monkeypatch.setattr(admin, "ANSWER_BYTES", 3 * size + size // 2)  # 3 of them
    monkeypatch.setattr(admin, "SEND_STALL_S", 1.0)
    scrapes = iter(range(1000))

    class Changing(Source):
        async def stats(self) -> Page:
            return Page(f"l4proxy_scrapes {next(scrapes)}\n" + "#" * size)

    async def main() -> None:
        server = AdminServer(Changing(), lambda: None, stats_only=True)
        await server.start("127.0.0.1", 0)
        hogs = _hogs(server.address, b"GET /stats HTTP/1.1\r\n\r\n", 8)
        try:
            held = 0
            for _ in range(30):
                await asyncio.sleep(0.1)
                held = max(held, sum(len(a) for a in server._answers.values()))
                if server.evicted + len(server._sending) == len(hogs):
                    break
            assert 0 < held <= admin.ANSWER_BYTES, held
            assert len(server._sending) == 3 and server.evicted == 5
            stats, _ = await _get(server.address, "/stats", 1.0)
            head, _, body = stats.partition(b"\r\n\r\n")  # a client that reads gets it whole
            assert head.startswith(b"HTTP/1.1 200 ") and body.endswith(b"#" * size), head
            assert await _reset(hogs, admin.SEND_STALL_S + 3) == len(hogs)
        finally:
            for s in hogs:
                s.close()
            await server.close()

    asyncio.run(main())

"""The pump on real TCP sockets (127.0.0.1), over both twins.

Every test builds the production shape: a client connected to a listener whose
accepted socket is handed to the pump as ``client_fd``, and an ``upstream_fd``
connected to a server whose accepted socket the test drives. Loopback TCP (not
socketpair) so that half-close and RST behave as the kernel makes them.

Each test also checks what a sidecar depends on after it: the pump's thread is
still alive, nothing raised out of it, and its connections were all released.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import os
import random
import resource
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import _skip_or_fail, load_twin

KiB = 1024
MiB = 1024 * KiB
NEVER = 1 << 62  # a splice threshold no test reaches
MODES = {"recv": NEVER, "splice": 0, "switch": 256 * KiB}
LINGER0 = struct.pack("ii", 1, 0)


@pytest.fixture(params=["compiled", "pure"])
def twin(request: pytest.FixtureRequest) -> ModuleType:
    return load_twin("pump", request.param)


@pytest.fixture(autouse=True)
def no_thread_exceptions(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    seen: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", seen.append)
    yield
    assert not seen, f"an exception escaped a thread: {seen[0].exc_value!r}"


def pump_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("l4proxy-pump")]


class Net:
    """Two listeners: where clients connect (the 'sidecar' side) and the server."""

    def __init__(self) -> None:
        self.front = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.back = socket.create_server(("127.0.0.1", 0), backlog=4096)

    def close(self) -> None:
        self.front.close()
        self.back.close()

    def pair(
        self,
        pump: Any,
        pending_upstream: bytes = b"",
        pending_client: bytes = b"",
        small_buffers: bool = False,
        token: int = 0,
    ) -> tuple[socket.socket, socket.socket]:
        """Return (client, server), relayed by *pump* through two fresh fds."""
        client = socket.create_connection(self.front.getsockname())
        proxy_client, _ = self.front.accept()
        proxy_upstream = socket.create_connection(self.back.getsockname())
        server, _ = self.back.accept()
        if small_buffers:
            for s in (client, proxy_client, proxy_upstream, server):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * KiB)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * KiB)
        proxy_client.setblocking(False)
        proxy_upstream.setblocking(False)
        pump.add(
            proxy_client.detach(),
            proxy_upstream.detach(),
            pending_upstream,
            pending_client,
            token=token,
        )
        client.settimeout(10)
        server.settimeout(10)
        return client, server


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net()
    yield n
    n.close()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def settled_fd_count() -> int:
    """The fd count to compare a test's end with: garbage from earlier tests
    collected, and the count unchanged for 50 ms (at most 2 s), else an fd
    an earlier test left to a collection or a thread closed during this
    one, and the end counted fewer (19 == 23 once under load)."""
    gc.collect()
    n, since, end = fd_count(), time.monotonic(), time.monotonic() + 2.0
    while time.monotonic() < end and time.monotonic() - since < 0.05:
        time.sleep(0.005)
        if (now := fd_count()) != n:
            n, since = now, time.monotonic()
    return n


def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.002)
    return pred()


_pumps: list[Any] = []


def make_pump(twin: ModuleType, **kw: Any) -> Any:
    p = twin.Pump(**kw)
    _pumps.append(p)
    p.start()
    return p


@pytest.fixture(autouse=True)
def close_pumps() -> Iterator[None]:
    """A failing test must not leave its pump (and thread) to the next one."""
    yield
    while _pumps:
        _pumps.pop().close()


def fill(sender: socket.socket, data: bytes, pump: Any | None = None) -> tuple[int, int]:
    """Send *data* without blocking until the sender stays blocked (EAGAIN
    five times in a row, 20 ms apart): (bytes sent, peak pump-held bytes)."""
    sender.setblocking(False)
    view = memoryview(data)
    sent, stalls, peak = 0, 0, 0
    while stalls < 5:
        try:
            sent += sender.send(view[sent : sent + 64 * KiB])
            stalls = 0
        except BlockingIOError:
            stalls += 1
            time.sleep(0.02)
        if pump is not None:
            peak = max(peak, pump.stats()["buffered"])
        assert sent < len(data), "the pump keeps swallowing bytes: no backpressure"
    sender.setblocking(True)
    return sent, peak


def finish(p: Any) -> dict[str, int]:
    """Common epilogue: everything released, thread alive, then close."""
    assert wait_for(lambda: p.active == 0), p.stats()
    assert pump_threads(), "the pump thread died"
    st: dict[str, int] = p.stats()
    assert st["buffered"] == 0, st
    p.close()
    return st


def read_all(s: socket.socket) -> bytes:
    out = bytearray()
    while True:
        b = s.recv(1 * MiB)
        if not b:
            return bytes(out)
        out += b


def read_until_gone(s: socket.socket) -> str:
    """Read until EOF or RST; say which."""
    try:
        while s.recv(64 * KiB):
            pass
    except ConnectionResetError:
        return "reset"
    return "eof"


def send_then_shut(s: socket.socket, data: bytes, chunks: list[int] | None = None) -> None:
    if chunks is None:
        s.sendall(data)
    else:
        view = memoryview(data)
        for n in chunks:
            s.sendall(view[:n])
            view = view[n:]
            if n % 7 == 0:
                time.sleep(0.0005)  # let some chunks arrive alone
        s.sendall(view)
    s.shutdown(socket.SHUT_WR)


def exchange(
    client: socket.socket,
    server: socket.socket,
    up: bytes,
    down: bytes,
    up_chunks: list[int] | None = None,
    down_chunks: list[int] | None = None,
) -> tuple[bytes, bytes]:
    """Send *up* client→server and *down* server→client at the same time, each
    followed by SHUT_WR; return what each end read until EOF."""
    senders = [
        threading.Thread(target=send_then_shut, args=(client, up, up_chunks)),
        threading.Thread(target=send_then_shut, args=(server, down, down_chunks)),
    ]
    for t in senders:
        t.start()
    got: dict[str, bytes] = {}
    reader = threading.Thread(target=lambda: got.__setitem__("up", read_all(server)))
    reader.start()
    got["down"] = read_all(client)
    reader.join()
    for t in senders:
        t.join()
    return got["up"], got["down"]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# -- integrity -----------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("size", [0, 1, 64 * KiB - 1, 64 * KiB, 64 * KiB + 1, 10 * MiB])
def test_every_byte_both_ways(twin: ModuleType, net: Net, mode: str, size: int) -> None:
    p = make_pump(twin, splice_threshold=MODES[mode])
    rnd = random.Random(size)
    up, down = rnd.randbytes(size), rnd.randbytes(size)
    client, server = net.pair(p)
    got_up, got_down = exchange(client, server, up, down)
    assert (len(got_up), sha(got_up)) == (size, sha(up))
    assert (len(got_down), sha(got_down)) == (size, sha(down))
    client.close()
    server.close()
    st = finish(p)
    assert st["bytes_upstream"] == st["bytes_downstream"] == size
    assert (st["accepted"], st["closed"], st["resets"], st["errors"]) == (1, 1, 0, 0)
    # threshold 0 splices from the first read, even one that only sees EOF
    assert st["spliced"] == (1 if mode == "splice" or size > MODES[mode] else 0)


@pytest.mark.parametrize("mode", list(MODES))
def test_random_chunked_stream_with_pending(twin: ModuleType, net: Net, mode: str) -> None:
    """Random write sizes and pauses on both ends, peeked bytes on both sides:
    order is pending first, then the stream, nothing lost or repeated."""
    rnd = random.Random(4)
    p = make_pump(twin, splice_threshold=MODES[mode], buffer_size=16 * KiB)
    head, hello = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", rnd.randbytes(100 * KiB)
    up, down = rnd.randbytes(3 * MiB + 17), rnd.randbytes(2 * MiB + 3)

    def chunks(total: int) -> list[int]:
        out: list[int] = []
        while sum(out) < total - 200 * KiB:
            out.append(rnd.choice([1, 2, 7, 100, 1460, 4096, 65535, 65536, 65537, 150_000]))
        return out

    client, server = net.pair(p, pending_upstream=head, pending_client=hello)
    got_up, got_down = exchange(client, server, up, down, chunks(len(up)), chunks(len(down)))
    assert sha(got_up) == sha(head + up)
    assert sha(got_down) == sha(hello + down)
    client.close()
    server.close()
    st = finish(p)
    assert st["bytes_upstream"] == len(head + up)
    assert st["bytes_downstream"] == len(hello + down)


def test_pending_bytes_go_first_even_when_large(twin: ModuleType, net: Net) -> None:
    """A pending head larger than the socket buffers is written before any byte
    the client sends, in splice mode too."""
    p = make_pump(twin, splice_threshold=0, buffer_size=4 * KiB)
    head = random.Random(1).randbytes(3 * MiB)
    client, server = net.pair(p, pending_upstream=head, small_buffers=True)
    client.sendall(b"BODY")
    client.shutdown(socket.SHUT_WR)
    assert read_all(server) == head + b"BODY"
    server.close()
    assert read_all(client) == b""
    client.close()
    finish(p)


def _gib_pattern(i: int, block: bytes) -> bytes:
    return struct.pack(">Q", i) + block[8:]  # every MiB differs: reordering shows


def test_one_gib_each_way(twin: ModuleType, net: Net) -> None:
    """1 GiB per direction at once, byte-identical (sha256), default settings
    (so both the recv/send start and the switch to splice are crossed)."""
    p = make_pump(twin)
    client, server = net.pair(p)
    block = random.Random(9).randbytes(MiB)
    n = 1024
    expect = hashlib.sha256()
    for i in range(n):
        expect.update(_gib_pattern(i, block))

    def send(s: socket.socket) -> None:
        for i in range(n):
            s.sendall(_gib_pattern(i, block))
        s.shutdown(socket.SHUT_WR)

    def digest(s: socket.socket, out: dict[str, tuple[int, str]], key: str) -> None:
        h, total = hashlib.sha256(), 0
        buf = bytearray(4 * MiB)
        view = memoryview(buf)
        while k := s.recv_into(buf):
            h.update(view[:k])
            total += k
        out[key] = (total, h.hexdigest())

    got: dict[str, tuple[int, str]] = {}
    threads = [
        threading.Thread(target=send, args=(client,)),
        threading.Thread(target=send, args=(server,)),
        threading.Thread(target=digest, args=(server, got, "up")),
    ]
    for t in threads:
        t.start()
    digest(client, got, "down")
    for t in threads:
        t.join()
    assert got["up"] == got["down"] == (n * MiB, expect.hexdigest())
    client.close()
    server.close()
    st = finish(p)
    assert st["spliced"] == 1
    assert st["bytes_upstream"] == st["bytes_downstream"] == n * MiB


# -- half-close and reset ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["recv", "splice"])
def test_client_half_close_still_gets_response(twin: ModuleType, net: Net, mode: str) -> None:
    p = make_pump(twin, splice_threshold=MODES[mode])
    client, server = net.pair(p)
    client.sendall(b"GET / HTTP/1.0\r\n\r\n")
    client.shutdown(socket.SHUT_WR)
    assert read_all(server) == b"GET / HTTP/1.0\r\n\r\n"  # EOF reached the server
    body = random.Random(2).randbytes(2 * MiB)
    server.sendall(body)  # ... which still writes its response
    server.close()
    assert read_all(client) == body
    client.close()
    st = finish(p)
    assert (st["resets"], st["errors"]) == (0, 0)


def test_server_first_then_server_half_close(twin: ModuleType, net: Net) -> None:
    """A server-first protocol: the greeting flows with no client byte; the
    server's EOF reaches the client while the client keeps sending."""
    p = make_pump(twin)
    client, server = net.pair(p)
    server.sendall(b"220 hello\r\n")
    server.shutdown(socket.SHUT_WR)
    assert read_all(client) == b"220 hello\r\n"
    client.sendall(b"QUIT\r\n")
    client.shutdown(socket.SHUT_WR)
    assert read_all(server) == b"QUIT\r\n"
    client.close()
    server.close()
    finish(p)


@pytest.mark.parametrize("who", ["client", "server"])
def test_reset_is_propagated(twin: ModuleType, net: Net, who: str) -> None:
    p = make_pump(twin)
    client, server = net.pair(p)
    client.sendall(b"ping")
    assert server.recv(4) == b"ping"
    resetter, other = (client, server) if who == "client" else (server, client)
    resetter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
    resetter.close()
    assert read_until_gone(other) == "reset"
    other.close()
    st = finish(p)
    assert (st["resets"], st["closed"]) == (1, 1)


def test_add_closes_both_fds_when_it_raises(twin: ModuleType) -> None:
    """add() owns the fds whatever happens: pending bytes that are not bytes
    raised in the pure twin before it took them, and both fds leaked."""
    p = make_pump(twin)
    a, b = socket.socketpair()
    fds = (a.detach(), b.detach())
    with pytest.raises(TypeError):
        p.add(*fds, pending_upstream=object())  # type: ignore[arg-type]
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    finish(p)


def test_bytes_sent_before_a_reset_go_on_first(twin: ModuleType, net: Net) -> None:
    """A server writes its last answer and resets (SO_LINGER 0, or a close
    with unread input). A direct client reads the answer, then the reset;
    when both were queued before the pump looked (here: it starts after),
    the pump read SO_ERROR first and reset the client with none of it."""
    p = twin.Pump()
    _pumps.append(p)
    client, server = net.pair(p)
    answer = b"final answer " * 100
    server.sendall(answer)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
    server.close()
    time.sleep(0.05)  # both in the pump's socket before it looks
    p.start()
    got = bytearray()
    how = "eof"
    try:
        while chunk := client.recv(64 * KiB):
            got += chunk
    except ConnectionResetError:
        how = "reset"
    assert (bytes(got), how) == (answer, "reset")
    client.close()
    st = finish(p)
    assert st["resets"] == 1


def test_reset_while_bytes_are_held(twin: ModuleType, net: Net) -> None:
    """The server resets while the pump holds bytes for it: the client is
    reset, the held buffer is released."""
    p = make_pump(twin, buffer_size=16 * KiB, splice_threshold=NEVER)
    client, server = net.pair(p, small_buffers=True)
    fill(client, bytes(16 * MiB))
    assert p.stats()["buffered"] > 0
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
    server.close()
    assert read_until_gone(client) == "reset"
    client.close()
    st = finish(p)
    assert st["resets"] == 1


# -- backpressure, idle, drain, close ----------------------------------------------------


@pytest.mark.parametrize("mode", ["recv", "splice"])
def test_backpressure_bounds_pump_memory(twin: ModuleType, net: Net, mode: str) -> None:
    """A server that stops reading blocks the client (EAGAIN) instead of
    making the pump buffer: held bytes stay within buffer_size (splice: the
    pipe, sized to buffer_size)."""
    bufsize = 16 * KiB
    p = make_pump(twin, buffer_size=bufsize, splice_threshold=MODES[mode])
    client, server = net.pair(p, small_buffers=True)
    stream = random.Random(3).randbytes(16 * MiB)
    sent, peak = fill(client, stream, p)
    peak = max(peak, p.stats()["buffered"])
    assert 0 < peak <= bufsize, peak
    assert sent < 4 * MiB  # kernel buffers (set to 32 KiB each) + one pump buffer
    # Resume reading: everything arrives, in order.
    client.shutdown(socket.SHUT_WR)
    got = read_all(server)
    assert (len(got), sha(got)) == (sent, sha(stream[:sent]))
    client.close()
    server.close()
    finish(p)


def test_idle_timeout_closes_both_sides(twin: ModuleType, net: Net) -> None:
    p = make_pump(twin, idle_timeout=0.3)
    idle_c, idle_s = net.pair(p)
    busy_c, busy_s = net.pair(p)
    idle_c.sendall(b"x")
    assert idle_s.recv(1) == b"x"
    t0 = time.monotonic()
    # The busy connection moves a byte every 0.1 s and must survive.
    while time.monotonic() - t0 < 0.8:
        busy_c.sendall(b"y")
        assert busy_s.recv(1) == b"y"
        time.sleep(0.1)
    assert read_until_gone(idle_c) == "eof"
    assert read_until_gone(idle_s) == "eof"
    assert p.active == 1
    assert p.stats()["idle_timeouts"] == 1
    busy_c.close()
    busy_s.close()
    st = finish(p)
    assert (st["idle_timeouts"], st["closed"]) == (1, 2)


def test_drain_waits_then_force_closes(twin: ModuleType, net: Net) -> None:
    p = make_pump(twin)
    quick_c, quick_s = net.pair(p)
    stuck_c, stuck_s = net.pair(p)

    def finish_quickly() -> None:
        time.sleep(0.1)
        quick_c.close()
        quick_s.close()

    threading.Thread(target=finish_quickly).start()
    t0 = time.monotonic()
    assert p.drain(0.5) == 1  # the quick one ended by itself, the stuck one did not
    assert 0.5 <= time.monotonic() - t0 < 3
    assert read_until_gone(stuck_c) == "reset"
    assert read_until_gone(stuck_s) == "reset"
    before = fd_count()
    a, b = socket.socketpair()
    with pytest.raises(RuntimeError):
        p.add(a.detach(), b.detach())
    assert fd_count() == before  # refused fds were closed
    stuck_c.close()
    stuck_s.close()
    st = finish(p)
    assert st["force_closed"] == 1


def test_drain_with_nothing_left_returns_zero(twin: ModuleType, net: Net) -> None:
    p = make_pump(twin)
    c, s = net.pair(p)
    c.close()
    s.close()
    assert p.drain(5.0) == 0
    finish(p)


def test_close_with_live_connections_releases_everything(twin: ModuleType, net: Net) -> None:
    base = settled_fd_count()
    p = make_pump(twin, buffer_size=4 * KiB)
    pairs = [net.pair(p, pending_client=b"hi", small_buffers=True) for _ in range(100)]
    for c, _ in pairs[:10]:
        fill(c, bytes(16 * MiB))  # leave bytes held inside the pump
    assert p.stats()["buffered"] > 0
    p.close()
    p.close()  # idempotent
    assert not pump_threads()
    for c, s in pairs:
        assert read_until_gone(c) in ("eof", "reset")
        assert read_until_gone(s) in ("eof", "reset")
        c.close()
        s.close()
    assert fd_count() == base
    st = p.stats()
    assert (st["active"], st["closed"], st["force_closed"], st["buffered"]) == (0, 100, 100, 0)
    a, b = socket.socketpair()
    with pytest.raises(RuntimeError):
        p.add(a.detach(), b.detach())
    assert fd_count() == base
    with pytest.raises(RuntimeError):
        p.start()


def test_close_before_start_closes_queued_fds(twin: ModuleType, net: Net) -> None:
    base = settled_fd_count()
    p = twin.Pump()
    c, s = net.pair(p)  # queued, never relayed
    assert p.active == 1
    p.close()
    assert read_until_gone(c) == "reset"
    c.close()
    s.close()
    assert fd_count() == base


# -- scale and accounting ------------------------------------------------------------


def test_fd_count_is_stable_over_1000_short_relays(twin: ModuleType, net: Net) -> None:
    p = make_pump(twin)
    base = settled_fd_count()
    for i in range(1000):
        c, s = net.pair(p, pending_upstream=b"GET /%d\r\n\r\n" % i)
        c.shutdown(socket.SHUT_WR)
        assert read_all(s) == b"GET /%d\r\n\r\n" % i
        s.sendall(b"ok")
        s.close()
        assert read_all(c) == b"ok"
        c.close()
    assert wait_for(lambda: p.active == 0)
    assert fd_count() == base
    st = finish(p)
    assert (st["accepted"], st["closed"], st["resets"], st["errors"]) == (1000, 1000, 0, 0)


def test_two_thousand_concurrent_connections(twin: ModuleType, net: Net) -> None:
    n = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * n + 200
    if soft < need:
        # Root (CAP_SYS_RESOURCE) may raise the hard limit too; restored below.
        raised = hard if hard == resource.RLIM_INFINITY else max(hard, need)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, raised))
        except (ValueError, OSError) as exc:
            _skip_or_fail(f"RLIMIT_NOFILE {soft}/{hard} < {need} and cannot be raised: {exc}")
    base = settled_fd_count()
    p = make_pump(twin)
    try:
        pairs = [net.pair(p) for _ in range(n)]
        assert p.active == n
        for i, (c, _) in enumerate(pairs):
            c.sendall(b"req %05d" % i)
        for i, (_, s) in enumerate(pairs):
            assert s.recv(9, socket.MSG_WAITALL) == b"req %05d" % i
            s.sendall(b"resp %05d" % i)
        for i, (c, _) in enumerate(pairs):
            assert c.recv(10, socket.MSG_WAITALL) == b"resp %05d" % i
        assert p.active == n
        for c, s in pairs:
            c.close()
            s.close()
        st = finish(p)
        assert (st["closed"], st["resets"], st["errors"]) == (n, 0, 0)
        assert fd_count() == base
    finally:
        p.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_bad_fds_are_counted_not_fatal(twin: ModuleType, net: Net) -> None:
    """Fds that are not sockets: the connection is closed and counted as an
    error; the thread lives on and relays the next connection."""
    p = make_pump(twin)
    base = settled_fd_count()
    r, w = os.pipe()
    p.add(r, w)
    assert wait_for(lambda: p.active == 0)
    assert p.stats()["errors"] == 1
    assert fd_count() == base
    for fd in (r, w):  # closed by the pump (and not reused by anyone here)
        with pytest.raises(OSError) as info:
            os.fstat(fd)
        assert info.value.errno == errno.EBADF
    a, b = socket.socketpair()
    fa = a.detach()
    with pytest.raises(ValueError):
        p.add(fa, fa)
    b.close()
    c, s = net.pair(p)
    c.sendall(b"still here")
    assert s.recv(10) == b"still here"
    c.close()
    s.close()
    finish(p)


def test_stats_and_parameters(twin: ModuleType) -> None:
    p = twin.Pump()
    assert set(p.stats()) >= {
        "active",
        "accepted",
        "closed",
        "bytes_upstream",
        "bytes_downstream",
        "resets",
        "idle_timeouts",
        "errors",
        "spliced",
        "buffered",
        "force_closed",
        "wakeups",
        "urgent",
        "pipes_used",
        "pipes_free",
        "pipe_refusals",
    }
    assert p.max_pipes == 1024
    p.start()
    p.start()  # idempotent
    assert len(pump_threads()) == 1
    p.close()
    bad_args = (
        {"idle_timeout": 0},
        {"buffer_size": 10},
        {"splice_threshold": -1},
        {"max_pipes": -1},
    )
    for bad in bad_args:
        with pytest.raises(ValueError):
            twin.Pump(**bad)


def test_churn_with_mixed_endings(twin: ModuleType, net: Net) -> None:
    """Short connections from several threads at once, ending every way a
    peer can: both FIN, client half-close, a RST from either side, mid-stream.
    The pump survives, counts each, and gives back every fd."""
    p = make_pump(twin, splice_threshold=32 * KiB)
    base = settled_fd_count()
    lock = threading.Lock()
    kinds: dict[str, int] = {}

    def one(rnd: random.Random) -> None:
        kind = rnd.choice(["fin", "half", "rst-client", "rst-server"])
        with lock:
            c, s = net.pair(p, pending_upstream=b"hello")
            kinds[kind] = kinds.get(kind, 0) + 1
        body = rnd.randbytes(rnd.choice([10, 1000, 100 * KiB]))
        try:
            if kind in ("fin", "half"):
                c.sendall(body)
                c.shutdown(socket.SHUT_WR)
                assert read_all(s) == b"hello" + body
                s.sendall(body)
                if kind == "fin":
                    s.close()
                else:
                    s.shutdown(socket.SHUT_WR)  # the client reads on to EOF
                assert read_all(c) == body
            else:
                resetter, other = (c, s) if kind == "rst-client" else (s, c)
                c.sendall(body)
                resetter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
                resetter.close()
                assert read_until_gone(other) in ("eof", "reset")
        finally:
            c.close()
            s.close()

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(100):
            one(rnd)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wait_for(lambda: p.active == 0)
    st = p.stats()
    # Pooled pipes stay open for the next connection; nothing else does.
    assert st["pipes_used"] == 0, st
    assert fd_count() == base + 2 * st["pipes_free"]
    st = finish(p)
    assert st["accepted"] == st["closed"] == 400
    assert st["errors"] == 0
    # A RST may reach the pump as a reset, or after the peer already saw
    # everything (then an EOF): at most one reset per RST connection.
    assert st["resets"] <= kinds.get("rst-client", 0) + kinds.get("rst-server", 0)


# -- ends reported back (the worker's LEAST_REQUEST counts) -------------------------------


def readable(fd: int, timeout: float = 0.0) -> bool:
    """Whether *fd* is readable within *timeout* seconds (poll, not
    select: a long test run leaves the relays' pooled splice pipes at
    high numbers, and an fd past 1023 is out of select()'s range)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def take_ended(p: Any, n: int) -> list[int]:
    """Tokens from p.ended() until *n* came (or 5 s passed), each woken by
    ended_fd as the worker's loop is."""
    got: list[int] = []
    deadline = time.monotonic() + 5
    while len(got) < n and time.monotonic() < deadline:
        if readable(p.ended_fd, max(0.0, deadline - time.monotonic())):
            got += p.ended()
    return got


def test_every_ending_reports_its_token_once(twin: ModuleType, net: Net) -> None:
    """A connection added with a token is reported by ended() once it has
    ended, whatever ended it: both sides done, a reset, a hand-off that was
    not a socket, the pump's close. One without a token is not reported; an
    add() that raised reports nothing (the caller knows already)."""
    p = make_pump(twin)
    assert p.ended() == [] and not readable(p.ended_fd)
    clean = net.pair(p, token=1)
    reset = net.pair(p, token=2)
    quiet = net.pair(p)  # no token
    live = net.pair(p, token=5)
    clean[0].close()
    clean[1].close()
    reset[1].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
    reset[1].close()
    r, w = os.pipe()
    p.add(r, w, token=3)  # not sockets: closed at once, counted as an error
    quiet[0].close()
    quiet[1].close()
    assert sorted(take_ended(p, 3)) == [1, 2, 3]
    assert wait_for(lambda: p.active == 1)  # only live is left (quiet ended unreported)
    assert p.ended() == [] and not readable(p.ended_fd)
    a, b = socket.socketpair()
    with pytest.raises(ValueError):
        p.add(a.fileno(), a.detach(), token=6)
    b.close()
    p.close()  # resets live
    assert p.ended() == [5]
    assert p.ended() == []
    for c, s in (live, reset, clean, quiet):
        c.close()
        s.close()


def test_a_drain_and_a_queue_never_started_report_their_tokens(twin: ModuleType, net: Net) -> None:
    """Force-closed by a drain's deadline, or closed while still queued (the
    pump never started): reported too, so no count stays up for ever."""
    p = make_pump(twin)
    stuck = net.pair(p, token=10)
    assert p.drain(0.05) == 1
    assert take_ended(p, 1) == [10]
    with pytest.raises(RuntimeError):  # draining: refused, not reported
        a, b = socket.socketpair()
        p.add(a.detach(), b.detach(), token=11)
    p.close()
    assert p.ended() == []
    queued = twin.Pump()
    pair = net.pair(queued, token=12)
    queued.close()
    assert queued.ended() == [12]
    for c, s in (stuck, pair):
        c.close()
        s.close()


def test_many_ends_wake_the_watcher_and_none_is_lost(twin: ModuleType, net: Net) -> None:
    """Connections ending from several threads at once while the watcher
    takes the list: each token comes exactly once."""
    p = make_pump(twin)
    n = 400
    lock = threading.Lock()

    def churn(first: int) -> None:
        for token in range(first, n + 1, 4):
            with lock:
                c, s = net.pair(p, token=token)
            c.close()
            s.close()

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(1, 5)]
    for t in threads:
        t.start()
    got = take_ended(p, n)
    for t in threads:
        t.join()
    got += take_ended(p, n - len(got))
    assert sorted(got) == list(range(1, n + 1))
    finish(p)


# -- urgent data (issue 12) --------------------------------------------------------

PAST_SWITCH = 512 * KiB  # more than the default splice_threshold: the direction splices


def recv_exactly(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        b = s.recv(n - len(out))
        if not b:
            break  # EOF: the caller's comparison says what was missing
        out += b
    return bytes(out)


def ends(
    client: socket.socket, server: socket.socket, direction: str
) -> tuple[socket.socket, socket.socket]:
    return (client, server) if direction == "up" else (server, client)


@pytest.mark.parametrize("mode", ["switch", "splice", "recv"])
@pytest.mark.parametrize("direction", ["up", "down"])
def test_urgent_byte_is_delivered_inline_and_nothing_spins(
    twin: ModuleType, net: Net, mode: str, direction: str
) -> None:
    """One send(MSG_OOB) in the middle of a stream. splice() cannot read past
    an urgent mark (tcp_read_sock stops there, EAGAIN for ever while epoll
    keeps reporting the socket readable), so the pump steps over it with
    recv(). Every byte arrives once, in order, the urgent one in its place
    (SO_OOBINLINE), before any FIN; then the pump goes back to sleep."""
    p = make_pump(twin, splice_threshold=MODES[mode])
    src, dst = ends(*net.pair(p), direction)
    rnd = random.Random(12)
    head, tail = rnd.randbytes(PAST_SWITCH), rnd.randbytes(64 * KiB + 1)
    src.sendall(head)
    assert recv_exactly(dst, len(head)) == head
    src.send(b"!", socket.MSG_OOB)
    src.sendall(tail)
    got = recv_exactly(dst, 1 + len(tail))
    assert (len(got), got[:1], sha(got[1:])) == (1 + len(tail), b"!", sha(tail))
    # Nothing left to do: the loop must sleep (a spin is thousands a second).
    before = p.stats()["wakeups"]
    time.sleep(0.3)
    assert p.stats()["wakeups"] - before <= 2
    src.shutdown(socket.SHUT_WR)
    assert read_all(dst) == b""
    dst.shutdown(socket.SHUT_WR)
    assert read_all(src) == b""
    src.close()
    dst.close()
    st = finish(p)
    assert (st["resets"], st["errors"]) == (0, 0)
    assert st["bytes_upstream" if direction == "up" else "bytes_downstream"] == (
        len(head) + 1 + len(tail)
    )
    assert st["spliced"] == (0 if mode == "recv" else 1)


@pytest.mark.parametrize("mode", ["switch", "recv"])
def test_urgent_bytes_then_fin_lose_nothing(twin: ModuleType, net: Net, mode: str) -> None:
    """The issue's report: urgent byte(s), more data, then FIN at once. The
    server must not see a clean EOF with the bytes after the mark missing.
    Several urgent bytes in a row too (the kernel keeps one mark: the older
    ones are plain data then)."""
    p = make_pump(twin, splice_threshold=MODES[mode])
    client, server = net.pair(p)
    rnd = random.Random(13)
    expect = bytearray()
    for i in range(6):
        chunk = rnd.randbytes(PAST_SWITCH if i == 0 else rnd.choice([1, 1460, 65537]))
        client.sendall(chunk)
        expect += chunk
        for _ in range(1 + i % 3):
            client.send(b"%d" % i, socket.MSG_OOB)
            expect += b"%d" % i
    client.shutdown(socket.SHUT_WR)
    got = read_all(server)
    assert (len(got), sha(got)) == (len(expect), sha(bytes(expect)))
    server.close()
    assert read_all(client) == b""
    client.close()
    st = finish(p)
    assert (st["resets"], st["errors"], st["bytes_upstream"]) == (0, 0, len(expect))


# -- pipes (issue 12) ----------------------------------------------------------------


def relay_in_steps(src: socket.socket, dst: socket.socket, data: bytes) -> None:
    """Send *data* 64 KiB at a time, reading each piece at the other end
    before the next (no FIN): the pump has moved every byte when this returns."""
    for i in range(0, len(data), 64 * KiB):
        piece = data[i : i + 64 * KiB]
        src.sendall(piece)
        assert recv_exactly(dst, len(piece)) == piece


def end_both(client: socket.socket, server: socket.socket) -> None:
    client.shutdown(socket.SHUT_WR)
    assert read_all(server) == b""
    server.shutdown(socket.SHUT_WR)
    assert read_all(client) == b""
    client.close()
    server.close()


def test_pipes_are_pooled_and_reused(twin: ModuleType, net: Net) -> None:
    """Connections one after another: each takes the pipes the last one gave
    back (at most 2 pipes in all, not 2 more per connection), and close()
    closes them."""
    p = make_pump(twin, splice_threshold=0)
    base = settled_fd_count()
    rnd = random.Random(15)
    for _ in range(3):
        client, server = net.pair(p)
        up, down = rnd.randbytes(MiB), rnd.randbytes(MiB)
        got_up, got_down = exchange(client, server, up, down)
        assert (sha(got_up), sha(got_down)) == (sha(up), sha(down))
        client.close()
        server.close()
        assert wait_for(lambda: p.active == 0)
        st = p.stats()
        # One pipe per direction at most, or one for both when a direction
        # was done before the other asked: never more pipes per connection.
        assert (st["pipes_used"], st["pipe_refusals"]) == (0, 0), st
        assert 1 <= st["pipes_free"] <= 2, st
        assert fd_count() == base + 2 * st["pipes_free"]
    st = finish(p)  # close(): the pool too
    assert st["spliced"] == 3
    assert fd_count() == base - 3  # and the pump's epoll and eventfds (wake-up, ends)


def test_max_pipes_bounds_splicing_not_relaying(twin: ModuleType, net: Net) -> None:
    """max_pipes=1: the connection holding the pipe splices, the next one is
    refused a pipe (counted) and relays through recv/send; no byte is lost."""
    p = make_pump(twin, splice_threshold=0, max_pipes=1)
    rnd = random.Random(16)
    a_client, a_server = net.pair(p)
    a_data = rnd.randbytes(MiB)
    relay_in_steps(a_client, a_server, a_data)  # a's upstream direction holds the pipe
    b_client, b_server = net.pair(p)
    b_data = rnd.randbytes(3 * MiB)
    # b asks at 0 bytes and every MiB after a refusal (at 1, 2 and maybe 3
    # MiB, as reads happen to fall): refused each time, a holds the only pipe.
    relay_in_steps(b_client, b_server, b_data)
    st = p.stats()
    assert (st["spliced"], st["pipes_used"], st["pipes_free"]) == (1, 1, 0), st
    assert 3 <= st["pipe_refusals"] <= 4, st
    # counted just after the write that let the server read them: wait
    assert wait_for(lambda: p.stats()["bytes_upstream"] == len(a_data) + len(b_data))
    end_both(a_client, a_server)
    end_both(b_client, b_server)
    st = finish(p)
    assert st["pipes_used"] + st["pipes_free"] <= 1
    assert (st["resets"], st["errors"]) == (0, 0)


def test_pipe_with_bytes_in_it_is_closed_not_pooled(twin: ModuleType, net: Net) -> None:
    """A connection reset while its pipe holds bytes: the pipe is closed (its
    bytes must never reach another connection), not pooled."""
    p = make_pump(twin, splice_threshold=0, buffer_size=16 * KiB)
    base = settled_fd_count()
    client, server = net.pair(p, small_buffers=True)
    fill(client, bytes(16 * MiB))  # the server does not read: the pipe fills
    st = p.stats()
    assert st["pipes_used"] == 1 and st["buffered"] > 0, st
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
    server.close()
    assert read_until_gone(client) == "reset"
    client.close()
    assert wait_for(lambda: p.active == 0)
    st = p.stats()
    assert (st["pipes_used"], st["pipes_free"]) == (0, 0), st
    assert fd_count() == base  # the pipe was closed with the connection
    finish(p)


@contextlib.contextmanager
def fds_exhausted() -> Iterator[None]:
    """A real fd limit: RLIMIT_NOFILE's soft limit just above the highest fd
    open, every free number below it taken. Any fd this process asks for
    meanwhile (the pump's pipe2()) fails with EMFILE. Restored on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    hogs: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
    try:
        while True:
            try:
                hogs.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                assert exc.errno == errno.EMFILE, exc
                break
        yield
    finally:
        for fd in hogs:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_pipe_refused_at_fd_limit_then_spliced_once_fds_free_up(twin: ModuleType, net: Net) -> None:
    """EMFILE when a direction asks for its pipe: counted, the bytes go
    through recv/send, and once fds are free again the next ask (after 1 MiB)
    gets a pipe. One EMFILE must not turn splice off for good."""
    p = make_pump(twin, splice_threshold=0)
    client, server = net.pair(p)
    rnd = random.Random(17)
    before, after = rnd.randbytes(256 * KiB), rnd.randbytes(4 * MiB)
    with fds_exhausted():
        relay_in_steps(client, server, before)
        st = p.stats()
    assert (st["pipe_refusals"], st["spliced"], st["pipes_used"]) == (1, 0, 0), st
    relay_in_steps(client, server, after)
    st = p.stats()
    assert (st["pipe_refusals"], st["spliced"], st["pipes_used"]) == (1, 1, 1), st
    assert wait_for(lambda: p.stats()["bytes_upstream"] == len(before) + len(after))
    end_both(client, server)
    st = finish(p)
    assert (st["resets"], st["errors"]) == (0, 0)


def test_fd_budget_counts_pipes() -> None:
    """--max-pipes defaults to --max-connections / 4 (HAProxy's maxpipes);
    with no --max-connections, to what the fd limit leaves at 2.5 fds per
    connection; the warning fires exactly when 2 c + 2 p + reserve > limit."""
    from l4proxy.dataplane import pump

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert (pump.max_pipes_for(1000), pump.max_pipes_for(1000, 0)) == (250, 0)
    assert pump.max_pipes_for(1000, 7) == 7
    conns = (soft - pump.FDS_RESERVED) * 2 // 5
    pipes = pump.max_pipes_for(0)
    assert pipes == conns // 4
    assert 2 * conns + 2 * pipes + pump.FDS_RESERVED <= soft
    assert pump.fd_budget_warning(0, pipes) is None
    assert pump.fd_budget_warning(conns, pipes) is None
    fits = (soft - pump.FDS_RESERVED - 2 * 10) // 2
    assert pump.fd_budget_warning(fits, 10) is None
    warning = pump.fd_budget_warning(fits + 1, 10)
    assert warning is not None and "RLIMIT_NOFILE" in warning and "--max-pipes" in warning

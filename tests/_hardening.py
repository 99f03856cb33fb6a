"""Test support for tests/test_hardening_*.py: hostile clients and odd backends.

Everything here runs inside the pods of a :class:`tests.mesh.Mesh` as small
Python scripts (``python -c``), so that the bytes on the wire are exactly the
ones a test chose, which curl would not let us do.

Backends (in one "odd" pod, each on its own port):

* ``HTTP_ECHO``: a deterministic HTTP/1.1 server. It frames each request
  (Content-Length, chunked, ``Expect: 100-continue``, HTTP/1.0 closes) and
  answers ``200`` with the raw request bytes (head and body) as the body. A
  client can therefore compute the exact answer it must get back: anything
  the proxy changed on the way in or out shows. ``GET /sleep/S`` waits S
  seconds before answering (a request in flight).
* ``TCP_ECHO``: every byte back until EOF, then close (half-close aware).
* ``OBSERVER``: reads until EOF or reset and prints one line per
  connection (``eof N`` / ``reset N``), or resets the connection itself
  after the first bytes when started with ``rst``.

Clients: ``EXCHANGE`` reads a JSON list of steps on stdin (send, sleep,
expect, shut, reset) and prints what came back, and how the connection
ended, as JSON.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

from l4proxy.demo.podnet import Pod
from tests.conftest import sent_up
from tests.mesh import PYTHON, Sidecar

HTTP_ECHO = r"""
import re, socket, sys, threading, time
def serve(c):
    buf = b""
    def more():
        nonlocal buf
        d = c.recv(65536)
        if not d:
            raise EOFError
        buf += d
    try:
        while True:
            while not re.search(rb"\r?\n\r?\n", buf):
                more()
            i = re.search(rb"\r?\n\r?\n", buf).end()
            head, buf = buf[:i], buf[i:]
            low = head.lower()
            if b"\nexpect: 100-continue" in low:
                c.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = b""
            if b"\ntransfer-encoding: chunked" in low:
                while True:
                    while b"\r\n" not in buf:
                        more()
                    j = buf.index(b"\r\n")
                    size = int(buf[:j].split(b";")[0], 16)
                    need = j + 2 + size + 2
                    while len(buf) < need:
                        more()
                    body, buf = body + buf[:need], buf[need:]
                    if size == 0:
                        break
            else:
                m = re.search(rb"\ncontent-length: *(\d+)", low)
                n = int(m.group(1)) if m else 0
                while len(buf) < n:
                    more()
                body, buf = buf[:n], buf[n:]
            raw = head + body
            if head.startswith(b"GET /sleep/"):
                time.sleep(float(head[11:].split(b" ", 1)[0]))
            close = head.split(b"\r\n", 1)[0].endswith(b"HTTP/1.0") or b"\nconnection: close" in low
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n" % (
                len(raw), b"connection: close\r\n" if close else b"") + raw)
            if close:
                break
    except (EOFError, OSError):
        pass
    c.close()
s = socket.create_server(("", int(sys.argv[1])), backlog=256)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# Accepts, reads a request head, and resets the connection (SO_LINGER 0):
# every request fails after its connect succeeded.
RESETTER = r"""
import socket, struct, sys, threading
def serve(c):
    try:
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = c.recv(65536)
            if not d:
                break
            buf += d
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    c.close()
s = socket.create_server(("", int(sys.argv[1])), backlog=256)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

TCP_ECHO = r"""
import socket, sys, threading
def serve(c):
    try:
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
        c.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    c.close()
s = socket.create_server(("", int(sys.argv[1])), backlog=1024)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

OBSERVER = r"""
import socket, struct, sys, threading
mode = sys.argv[2]
def serve(c):
    n = 0
    try:
        while True:
            d = c.recv(65536)
            if not d:
                print("eof", n, flush=True)
                break
            n += len(d)
            if mode == "rst":
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                print("sent-rst", n, flush=True)
                break
    except ConnectionResetError:
        print("reset", n, flush=True)
    except OSError as e:
        print("error", n, e, flush=True)
    c.close()
s = socket.create_server(("", int(sys.argv[1])), backlog=1024)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

EXCHANGE = r"""
import json, socket, struct, sys, time
spec = json.load(sys.stdin)
out = {"connected": False, "end": None, "error": None}
buf = b""
t0 = time.monotonic()
c = None
try:
    c = socket.create_connection((spec["host"], spec["port"]), spec.get("connect_timeout", 5))
    out["connected"] = True
    c.settimeout(spec.get("timeout", 10))
    for kind, arg in spec["steps"]:
        if kind == "send":
            c.sendall(bytes.fromhex(arg))
        elif kind == "sleep":
            time.sleep(arg)
        elif kind == "shut":
            c.shutdown(socket.SHUT_WR)
        elif kind == "expect":
            want = bytes.fromhex(arg)
            while want not in buf:
                d = c.recv(65536)
                if not d:
                    raise EOFError("closed before the expected bytes")
                buf += d
        elif kind == "reset":
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
            c = None
            out["end"] = "we-reset"
            break
    while c is not None:
        d = c.recv(65536)
        if not d:
            out["end"] = "eof"
            break
        buf += d
except ConnectionResetError as e:
    out["end"] = "reset"
except socket.timeout:
    out["end"] = "timeout"
except Exception as e:
    out["error"] = type(e).__name__ + ": " + str(e)
out["data"] = buf.hex()
out["elapsed"] = time.monotonic() - t0
print(json.dumps(out))
"""

# Slowloris: N connections trickle a head one byte every `gap` seconds until
# the proxy answers or closes; each reports how long it lasted and what came.
SLOWLORIS = r"""
import json, socket, sys, threading, time
host, port, n, gap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
results = [None] * n
def one(i):
    t0 = time.monotonic()
    got = b""
    try:
        c = socket.create_connection((host, port), 5)
        c.setblocking(False)
        c.sendall(b"GET / HTTP/1.1\r\nHost: bootcamp\r\n")
        while time.monotonic() - t0 < 30:
            try:
                c.send(b"X")
            except BlockingIOError:
                pass
            time.sleep(gap)
            try:
                d = c.recv(4096)
                got += d
                if not d:
                    break
            except BlockingIOError:
                pass
    except OSError as e:
        got += ("<%s>" % type(e).__name__).encode()
    results[i] = [time.monotonic() - t0, got[:40].decode("latin-1")]
ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps(results))
"""

# Hold N connections open through the proxy: each sends a message and expects
# it back (TCP echo: the line; HTTP echo: a keep-alive GET, echoed as the
# response body), then waits for "go" on stdin, exchanges again on the same
# connection, and closes.
HOLDER = r"""
import json, socket, sys, time
host, port, n, proto = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def message(tag, i):
    if proto == "tcp":
        return b"%s %d\n" % (tag, i)
    return b"GET /%s/%d HTTP/1.1\r\nHost: echo\r\n\r\n" % (tag, i)
def echoed(m, buf):
    if proto == "tcp":
        return m in buf
    # (a request comes back as its answer's body, as the sidecar sent it:
    # its lines, then the first try's x-envoy-attempt-count)
    return m[:-2] + b"x-envoy-attempt-count: 1\r\n\r\n" in buf
def talk(c, m):
    c.sendall(m)
    buf = b""
    while not echoed(m, buf):
        d = c.recv(65536)
        if not d:
            return "bad:" + repr(buf[:80]) if buf else "eof"
        buf += d
    return "ok"
conns, first = [], []
for i in range(n):
    try:
        c = socket.create_connection((host, port), 3)
        c.settimeout(3)
        first.append(talk(c, message(b"hello", i)))
        if first[-1] == "ok":  # (one refused with a clean close is not held)
            conns.append(c)
    except ConnectionResetError:
        first.append("reset")
    except socket.timeout:
        first.append("timeout")
    except OSError as e:
        first.append(type(e).__name__)
print(json.dumps(first), flush=True)
sys.stdin.readline()
again = []
for i, c in enumerate(conns):
    try:
        again.append(talk(c, message(b"again", i)))
    except OSError as e:
        again.append(type(e).__name__)
    c.close()
print(json.dumps(again), flush=True)
"""


def exchange(
    pod: Pod,
    host: str,
    port: int,
    steps: Sequence[tuple[str, object]],
    timeout: float = 10,
) -> dict[str, Any]:
    """Run one scripted connection as uid 1000 in *pod*; data comes back as bytes."""
    wire = [(k, a.hex() if isinstance(a, bytes) else a) for k, a in steps]
    spec = {"host": host, "port": port, "steps": wire, "timeout": timeout}
    r = pod.run([PYTHON, "-c", EXCHANGE], user=1000, input=json.dumps(spec), timeout=timeout + 30)
    out: dict[str, Any] = json.loads(r.stdout)
    out["data"] = bytes.fromhex(out["data"])
    return out


def echo_answer(
    raw_requests: Iterable[bytes], continues: int = 0, http_routing: str = "connection"
) -> bytes:
    """What HTTP_ECHO answers to these requests (each: head + body, verbatim),
    as a client gets it through a sidecar in *http_routing* mode.

    ``connection``: every byte both ways as sent. ``request``: the
    per-request relay takes a bare ``Connection: close`` out of an HTTP/1.1
    head before it goes upstream, so that the upstream connection can be
    reused (README, "Weighted routing per connection, or per request"): the
    echo shows the head without that line and does not close; the relay
    closes the client connection instead, and says so by adding
    ``connection: close`` to the response head it forwards, where the echo
    would have put it; and it adds the first try's ``x-envoy-attempt-count:
    1`` before the head's empty line (Envoy's router, as Istio configures
    it). Bodies and every other byte are unchanged.
    """
    out = b"HTTP/1.1 100 Continue\r\n\r\n" * continues
    for raw in raw_requests:
        first = raw.split(b"\r\n", 1)[0]
        close = first.endswith(b"HTTP/1.0") or b"\nconnection: close" in raw.lower()
        seen = sent_up(without_connection_close(raw)) if http_routing == "request" else raw
        out += b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n" % (
            len(seen),
            b"connection: close\r\n" if close else b"",
        )
        out += seen
    return out


def without_connection_close(raw: bytes) -> bytes:
    """*raw* (head + body) with the head's ``Connection: close`` line removed,
    for HTTP/1.1 (an HTTP/1.0 request closes anyway and is left as it is)."""
    m = re.search(rb"\r?\n\r?\n", raw)
    assert m is not None, raw
    head, body = raw[: m.end()], raw[m.end() :]
    if not re.match(rb"[^\n]* HTTP/1\.1\r?\n", head):
        return raw
    return re.sub(rb"(?im)^connection:[ \t]*close[ \t]*\r?\n", b"", head, count=1) + body


def wait_until(pred: Any, timeout: float = 10, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def settle_fds(sidecar: Sidecar, baseline: int, timeout: float = 10) -> int:
    """Wait for the fd count to come back to *baseline*; return the last count.

    The count that met the baseline is the one returned, not a fresh one: the
    sidecar opens fds for a moment now and then (the admin endpoint's
    connection for the last count's /stats, closed a moment after curl's), so
    a second count could see one of those and fail a check that held."""
    deadline = time.monotonic() + timeout
    while (count := sidecar.fd_count()) > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


def rss_kib(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total

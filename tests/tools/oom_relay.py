"""Run by tests/test_relay_oom.py with tests/tools/failmalloc.so preloaded.

For nth = 1..N: a fresh compiled relay, then the nth allocation the relay
makes itself fails while one request goes through it. The request is a POST
to a route whose body is, byte for byte, another request (GET /admin, which
routing refuses). Prints one JSON line per nth: what the client got, what the
upstream served, and how many allocations failed; a crash ends the output.
"""

from __future__ import annotations

import ctypes
import http.server
import json
import socket
import sys
import threading
import time
from typing import Any

from l4proxy.dataplane._impl import load_compiled
from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import Choice, Verdict

ORIGIN = ("198.19.0.10", 8080)
SMUGGLED = b"\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n"
# a head over the relay's first (1 KiB) buffer, with a Connection line the
# relay takes out: the upstream head is built in parts
HEAD = (
    b"POST /public HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * 900 + b"\r\n"
    b"Connection: keep-alive\r\nContent-Length: %d\r\nX-Pad2: "
    % len(SMUGGLED)
    + b"q" * 300
    + b"\r\n\r\n"
)


def relay_range() -> tuple[int, int]:
    lo, hi = 1 << 64, 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "/relay.cpython" in line:
                a, b = (int(x, 16) for x in line.split()[0].split("-"))
                lo, hi = min(lo, a), max(hi, b)
    assert hi, "the compiled relay is not mapped"
    return lo, hi


def hand_off_with_bytes(fm: Any, lo: int, hi: int, rounds: int) -> None:
    """add() with the bytes already read (its hand-off record, then their copy)."""
    mod = load_compiled("relay")
    for nth in range(1, rounds + 1):
        relay = mod.HttpRelay(lambda h, o: Decision(local=(404, "no")), lambda *a: None)
        relay.start()
        ours, theirs = socket.socketpair()
        fm.failmalloc_arm(lo, hi, nth)
        try:
            relay.add(theirs, ORIGIN, data=b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            outcome = "added"
        except MemoryError:
            outcome = "MemoryError"
        ours.settimeout(2)
        try:
            got = ours.recv(100).decode("latin-1")
        except OSError as exc:
            got = f"<{type(exc).__name__}>"
        failures = fm.failmalloc_failures()
        fm.failmalloc_arm(0, 0, 0)
        ours.close()
        relay.close()
        print(json.dumps({"nth": nth, "add": outcome, "failed": failures, "client": got}))


def main() -> None:
    rounds, mode = int(sys.argv[1]), sys.argv[2]
    fast = mode == "fast"
    fm = ctypes.CDLL(None)
    fm.failmalloc_arm.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_long]
    fm.failmalloc_failures.restype = ctypes.c_long
    load_compiled("relay")
    lo, hi = relay_range()
    if mode == "add":
        hand_off_with_bytes(fm, lo, hi, rounds)
        return
    mod = load_compiled("relay")
    served: list[str] = []

    class Upstream(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            served.append(f"{self.command} {self.path}")
            body = f"served {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = ("127.0.0.1", server.server_address[1])

    def decide(head: Any, origin: Any) -> Decision:
        if head.path == "/public":
            return Decision((endpoint,))
        return Decision(local=(403, "forbidden"))

    def resolve(head: Any, origin: Any) -> Verdict:
        if head.path == "/public":
            return Verdict((Choice(1, (endpoint,)),))
        return Verdict(local=(403, "forbidden"))

    for nth in range(1, rounds + 1):
        served.clear()
        kw: dict[str, Any] = {"resolve": resolve} if fast else {}
        relay = mod.HttpRelay(decide, lambda *a: None, **kw)
        relay.start()
        ours, theirs = socket.socketpair()
        relay.add(theirs, ORIGIN)
        time.sleep(0.02)  # taken by the loop: what fails is the request's
        fm.failmalloc_arm(lo, hi, nth)
        ours.sendall(HEAD + SMUGGLED)
        ours.settimeout(2)
        got = b""
        try:
            while data := ours.recv(65536):
                got += data
                if got.endswith(b"served /public"):
                    break
        except OSError as exc:  # reset, or nothing in 2 s
            got += f"<{type(exc).__name__}>".encode()
        time.sleep(0.05)  # anything else the upstream would serve
        failures = fm.failmalloc_failures()
        fm.failmalloc_arm(0, 0, 0)
        ours.close()
        relay.close()
        print(
            json.dumps(
                {
                    "nth": nth,
                    "failed": failures,
                    "client": got.decode("latin-1")[-60:],
                    "served": list(served),
                }
            ),
            flush=True,
        )
    server.shutdown()


if __name__ == "__main__":
    main()

"""The demo's keep-alive client: one TCP connection per URL, many requests on it.

curl in the demo sends ``Connection: close``: a connection per request, so
per-connection and per-request routing split its requests alike. A real
client (a connection pool, a browser, a gRPC channel) keeps a connection
open and sends request after request on it; with ``l4proxy run
--http-routing connection`` such a connection follows the subset its first
request drew, for as long as it lives (Istio #13908). This client shows the
other case: the demo's sidecars run ``--http-routing request``, so a 50/50
rule splits the requests of one connection, and a rule swap (a rollback)
reaches that connection at its very next request.

Theory of operation
-------------------
One process in the client pod (as uid 1000, captured by l4proxy-init like
curl) for the whole tutorial. It opens one connection per URL at the first
batch and keeps it across every step and rule swap. The demo drives it over
stdin/stdout, one line each way: it writes a number N, the client sends N
``GET`` requests on each URL's connection in turn, one at a time (each waits
for its response: no pipelining), and answers one JSON line, a list with per
URL::

    {"url", "requests", "failed", "versions", "pods", "first", "connections", "local"}

``first`` is the pod that answered the batch's first request (the first one
after a rule swap), ``connections`` how many connections this URL has used
so far (1 unless the far side closed one: then the next request opens
another, and the count says so), ``local`` the connection's local
address:port. Nothing here is random and the requests are strictly
sequential, so with the demo's ``--seed`` (the sidecars' weighted draws) a
run's splits repeat exactly.

    python -m l4proxy.demo.keepalive http://bootcamp:8080/ http://198.18.0.14/bootcamp
"""

from __future__ import annotations

import http.client
import json
import sys
import urllib.parse
from collections import Counter
from typing import Any

from l4proxy.demo.bootcamp import ANSWER

TIMEOUT_S = 10.0


class KeepAliveConnection:
    """One URL, one HTTP/1.1 connection (another only if the far side closes it)."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url}: expected http://HOST[:PORT]/PATH")
        self.url = url
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=TIMEOUT_S)
        self.connections = 0
        self.local = ""

    def _ensure_open(self) -> None:
        # http.client would reconnect silently on its own; open here instead,
        # so that every connection this client uses is counted.
        if self.conn.sock is None:
            self.conn.connect()
            self.connections += 1
            sock = self.conn.sock
            assert sock is not None
            host, port = sock.getsockname()[:2]
            self.local = f"{host}:{port}"

    def get(self) -> tuple[str, str] | None:
        """One request; (pod, version) of the answer, or None when it failed."""
        try:
            self._ensure_open()
            self.conn.request("GET", self.path)
            resp = self.conn.getresponse()
            body = resp.read().decode(errors="replace")
        except (OSError, http.client.HTTPException):
            self.conn.close()
            return None
        m = ANSWER.search(body)
        if resp.status != 200 or m is None:
            return None
        return m.group(1), "v" + m.group(2)

    def batch(self, n: int) -> dict[str, Any]:
        versions: Counter[str] = Counter()
        pods: Counter[str] = Counter()
        failed = 0
        first = ""
        for i in range(n):
            got = self.get()
            if got is None:
                failed += 1
                continue
            pod, version = got
            pods[pod] += 1
            versions[version] += 1
            if i == 0:
                first = pod
        return {
            "url": self.url,
            "requests": n,
            "failed": failed,
            "versions": dict(versions),
            "pods": dict(pods),
            "first": first,
            "connections": self.connections,
            "local": self.local,
        }


def main(argv: list[str] | None = None) -> int:
    urls = sys.argv[1:] if argv is None else argv
    if not urls:
        print("usage: python -m l4proxy.demo.keepalive URL...", file=sys.stderr)
        return 2
    clients = [KeepAliveConnection(u) for u in urls]
    for line in sys.stdin:  # one batch per line, until the demo closes stdin
        n = int(line)
        print(json.dumps([c.batch(n) for c in clients]), flush=True)
    for c in clients:
        c.conn.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Memory: a proxy's RSS while it holds many idle client connections and their upstreams.

Each client connection sends one keep-alive request and reads the answer,
so that every proxy has connected upstream (l4proxy peeks the head before
it connects) and both sides are then idle. RSS is summed over the proxy's
process tree and measured before and after (PSS too: for a tree like l4proxy's
supervisor + worker, summed RSS counts the shared interpreter pages twice).

A proxied connection costs two descriptors in the proxy; when the hard
RLIMIT_NOFILE (not raisable without CAP_SYS_RESOURCE) is below what the
requested count needs, the test holds as many as fit and also reports the
RSS extrapolated linearly to the requested count.
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import asdict, dataclass

from bench.peers import MAX_CONNECTIONS
from bench.scenarios import Target


class MemoryTestError(RuntimeError):
    pass


@dataclass(frozen=True)
class MemoryResult:
    target: str
    requested: int
    held: int
    rss_before: int  # bytes
    rss_held: int  # bytes
    pss_held: int = 0  # bytes: shared pages split among the tree (see process.pss_bytes)
    processes: int = 1  # in the proxy's tree (nginx: master + worker; l4proxy: + supervisor)

    @property
    def per_connection(self) -> float:
        return (self.rss_held - self.rss_before) / self.held if self.held else 0.0

    @property
    def rss_at_requested(self) -> float:
        """RSS at the requested count (measured, or extrapolated when fewer fit)."""
        return self.rss_before + self.per_connection * self.requested

    def as_dict(self) -> dict[str, object]:
        return {
            **asdict(self),
            "per_connection": self.per_connection,
            "rss_at_requested": self.rss_at_requested,
        }


def connection_budget(requested: int) -> int:
    return min(requested, MAX_CONNECTIONS - 50)


def _open_idle(host: str, port: int, count: int, batch: int = 250) -> list[socket.socket]:
    request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: l4proxy-bench\r\n\r\n"
    payload = request.encode()
    held: list[socket.socket] = []
    try:
        for start in range(0, count, batch):
            chunk = []
            for _ in range(min(batch, count - start)):
                s = socket.create_connection((host, port), timeout=15)
                chunk.append(s)
                s.sendall(payload)
            held.extend(chunk)
            for s in chunk:
                answer = b""
                while not (b"| v=" in answer and answer.endswith(b"\n")):
                    data = s.recv(4096)
                    if not data:
                        raise MemoryTestError(
                            f"{host}:{port} closed connection {len(held)} before answering"
                        )
                    answer += data
    except BaseException:
        for s in held:
            s.close()
        raise
    return held


def hold_idle(target: Target, requested: int, settle_s: float = 1.0) -> MemoryResult:
    """Open *requested* (or as many as fit) idle proxied connections; measure RSS."""
    if target.group != "loopback":
        raise MemoryTestError("the memory test runs against loopback targets")
    host, _, port = target.url.removeprefix("http://").rstrip("/").rpartition(":")
    count = connection_budget(requested)
    before = target.process.rss_bytes()
    held = _open_idle(host, int(port), count)
    try:
        time.sleep(settle_s)
        rss = target.process.rss_bytes()
        pss = target.process.pss_bytes()
        procs = len(target.process.pids())
    finally:
        for s in held:
            with contextlib.suppress(OSError):
                s.close()
    time.sleep(settle_s)  # let the proxy tear the pairs down before the next one
    return MemoryResult(target.name, requested, count, before, rss, pss, procs)

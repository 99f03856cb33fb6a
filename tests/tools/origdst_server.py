#!/usr/bin/env python3
"""Test tool: accept TCP connections and tell each client where it landed.

Usage: origdst_server.py LABEL PORT [PORT ...]

Listens on every PORT over IPv4 (0.0.0.0) and, where the namespace has IPv6,
over IPv6 ([::], v6only). For each accepted connection it writes one JSON
line to the client and to stdout, then closes:

    {"label": "a", "port": 15001, "original_dst": "198.19.0.10:8080", "peer": "..."}

``port`` is the listening port the connection reached; ``original_dst`` is
what ``getsockopt(SO_ORIGINAL_DST)`` returns: the address the client dialled
before a nat REDIRECT rewrote it (for a connection that was not redirected,
the local address itself; null without a conntrack entry).
Standard library only: it runs as any user, in any namespace.
"""

from __future__ import annotations

import json
import selectors
import socket
import struct
import sys

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value
SOL_IPV6 = 41


def original_dst(conn: socket.socket) -> str | None:
    try:
        if conn.family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # sockaddr_in
            port = struct.unpack_from("!H", raw, 2)[0]
            return f"{socket.inet_ntop(socket.AF_INET, raw[4:8])}:{port}"
        raw = conn.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)  # sockaddr_in6
        port = struct.unpack_from("!H", raw, 2)[0]
        return f"[{socket.inet_ntop(socket.AF_INET6, raw[8:24])}]:{port}"
    except OSError:
        return None


def listeners(ports: list[int]) -> list[socket.socket]:
    socks = []
    for port in ports:
        s4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s4.bind(("0.0.0.0", port))
        socks.append(s4)
        try:
            s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s6.bind(("::", port))
            socks.append(s6)
        except OSError:
            pass  # no IPv6 in this namespace
    for s in socks:
        s.listen(64)
    return socks


def main() -> None:
    label, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
    sel = selectors.DefaultSelector()
    for s in listeners(ports):
        sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            listener = key.fileobj
            assert isinstance(listener, socket.socket)
            conn, peer = listener.accept()
            with conn:
                report = {
                    "label": label,
                    "port": listener.getsockname()[1],
                    "original_dst": original_dst(conn),
                    "peer": str(peer[0]),
                }
                line = json.dumps(report) + "\n"
                conn.sendall(line.encode())
                sys.stdout.write(line)
                sys.stdout.flush()


if __name__ == "__main__":
    main()

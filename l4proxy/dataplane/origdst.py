"""Where a redirected connection was going: ``SO_ORIGINAL_DST``.

iptables ``REDIRECT`` rewrites the destination of a connection to the local
listener; conntrack remembers the original. ``SO_ORIGINAL_DST`` (80, from
linux/netfilter_ipv4.h; the same number at ``SOL_IPV6`` in
linux/netfilter_ipv6/ip6_tables.h as ``IP6T_SO_ORIGINAL_DST``) reads it back:
a ``sockaddr_in`` (16 bytes) for IPv4 and a ``sockaddr_in6`` (28 bytes) for
IPv6. A connection that nobody redirected has no NAT entry and the call fails
with ENOENT.
"""

from __future__ import annotations

import socket
import struct

SO_ORIGINAL_DST = 80
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """Return ``(ip, port)`` the client dialled, or None if not redirected."""
    try:
        # An IPv4 client on a dual-stack ("::") listener has a v4-mapped peer
        # address; its conntrack entry is IPv4, so ask at SOL_IP.
        if sock.family == socket.AF_INET6 and not sock.getpeername()[0].startswith("::ffff:"):
            raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
            port = struct.unpack_from("!H", raw, 2)[0]
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    except OSError:
        return None

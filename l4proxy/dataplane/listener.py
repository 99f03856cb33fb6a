"""Listening sockets: bound once (by the supervisor), served by the workers.

Kept apart from the worker so that the supervisor, which only binds and
hands sockets on, imports neither the rule loader nor the event-loop code:
it is a second interpreter in every pod, and its memory counts.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from dataclasses import dataclass

BACKLOG = 4096
# SO_DETACH_FILTER (Linux's, asm-generic): the worker's drain filter off
# (worker._refuse_handshakes attaches it: SO_ATTACH_FILTER)
_SO_DETACH_FILTER = getattr(socket, "SO_DETACH_FILTER", 27)


@dataclass
class Listener:
    """A bound listening socket and what it is for."""

    sock: socket.socket
    mode: str  # "outbound" | "inbound" (transparent, SO_ORIGINAL_DST) or "gateway"
    address: tuple[str, int]

    @property
    def transparent(self) -> bool:
        return self.mode in ("outbound", "inbound")

    @property
    def name(self) -> str:
        host, port = self.address
        return f"{self.mode}:{'[' + host + ']' if ':' in host else host}:{port}"


def _bound(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # "::" accepts IPv4 too (dual stack): one listener serves both families.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def check_port_free(host: str, port: int) -> None:
    """Raise OSError (EADDRINUSE) when another socket holds *host*:*port*.

    Several workers' listeners share a port with ``SO_REUSEPORT``, and so
    would any other process's (of the same user) that set it too: a second
    sidecar started on the same port took part of the traffic, silently. A
    throwaway bind without ``SO_REUSEPORT``, before the group binds, fails
    on any holder. (For the supervisor's first bind only: a restarted worker
    inherits the sockets bound then.)
    """
    if port != 0:  # (port 0: the kernel picks a free one)
        _bound(host, port, reuse_port=False).close()


def bind_listener(host: str, port: int, mode: str, reuse_port: bool = False) -> Listener:
    sock = _bound(host, port, reuse_port)
    try:
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return Listener(sock=sock, mode=mode, address=(host, sock.getsockname()[1]))


def listen_again(lst: Listener) -> None:
    """Make *lst*'s socket listen and take new handshakes again, as at its
    bind (the supervisor's copy, for the next worker of its slot outside a
    stop). A worker drains on a SIGTERM of its own too (sent to it, not to
    the supervisor; its control channel gone), and its drain retired its
    listeners for every copy of them: the SYN filter attached
    (worker._refuse_handshakes; still there where it died retiring one)
    and ``shutdown(SHUT_RD)`` (worker._stop_listening), which took the
    socket out of the listening table. Its replacement inherited a socket
    that refused every client, and whose readiness (a hang-up) its accept
    loop spun on. A socket whose port went back to the kernel with its
    listening (one bound to port 0) is bound to its port again first.
    Raises OSError where it cannot listen on its address again."""
    sock = lst.sock
    with contextlib.suppress(OSError):  # (ENOENT: no filter)
        sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return
    try:
        sock.bind(lst.address)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # (EINVAL: still bound to it, a port named)
            raise
    sock.listen(BACKLOG)

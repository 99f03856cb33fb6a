"""The pump: relays bytes between a client socket and its upstream socket.

The public face of the relay: the compiled twin (``l4proxy.dataplane._ext.pump``, from
``ext/pump.pyx``; its loop runs without the GIL) when it was built, else the
pure-Python twin (``l4proxy.dataplane._pump_py``); ``L4PROXY_NO_EXTENSIONS=1`` forces the
pure one. The choice is made in :mod:`l4proxy.dataplane._impl`, nowhere else;
``IMPLEMENTATION`` says which runs ("compiled" or "pure").

Usage, from the sidecar's event loop once the routing decision is made::

    pump = Pump(idle_timeout=3600.0)
    pump.start()
    ...
    # The pump owns both fds from here on, whatever happens.
    pump.add(client.detach(), upstream.detach(), pending_upstream=peeked_head)
    ...
    forced = pump.drain(45.0)     # SIGTERM: refuse new work, let relays finish
    pump.close()

Read the theory of operation (fd ownership, half-close, resets, buffers,
splice, urgent data, the pipe pool) at the top of ``l4proxy/dataplane/_pump_py.py`` and
``ext/pump.pyx``.

File descriptors
----------------
A worker holds 2 fds per relayed connection (client, upstream), 2 per pipe
(at most ``max_pipes``, pooled: in use or free) and about ``FDS_RESERVED`` of
its own (listeners, epoll, eventfds, admin, DNS, the reserve fd, logs). So
``2 × --max-connections + 2 × --max-pipes + FDS_RESERVED`` must stay within
RLIMIT_NOFILE, or accept() and connect() meet EMFILE before
``--max-connections`` refuses anything. :func:`max_pipes_for` gives the
default ``--max-pipes`` and :func:`fd_budget_warning` says when the sum does
not fit.
"""

from __future__ import annotations

import resource
from typing import TYPE_CHECKING

from l4proxy.dataplane import _impl

__all__ = [
    "FDS_RESERVED",
    "IMPLEMENTATION",
    "Pump",
    "fd_budget_warning",
    "max_pipes_for",
]

FDS_RESERVED = 64  # a worker's own fds, besides connections and pipes

_mod, IMPLEMENTATION = _impl.load("pump")

if TYPE_CHECKING:
    # Both twins have this interface (l4proxy/dataplane/_ext/pump.pyi mirrors it).
    from l4proxy.dataplane._pump_py import Pump
else:
    Pump = _mod.Pump


def max_pipes_for(max_connections: int, max_pipes: int = -1) -> int:
    """The pump's ``max_pipes`` for a worker: *max_pipes* when given (>= 0;
    0 turns splice off), else HAProxy's default ``maxpipes = maxconn / 4``
    (bulk transfers are the minority; the rest relay through recv/send).
    Without ``--max-connections`` the connections the fd limit allows stand
    in for it: ``2 c + 2 c/4 + FDS_RESERVED = RLIMIT_NOFILE``."""
    if max_pipes >= 0:
        return max_pipes
    if max_connections <= 0:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20  # fs.nr_open's default: no process gets more
        max_connections = max(0, soft - FDS_RESERVED) * 2 // 5
    return max(1, max_connections // 4)


def fd_budget_warning(max_connections: int, max_pipes: int) -> str | None:
    """What to tell the operator when ``--max-connections`` and the pipes
    cannot all have their fds under this process's RLIMIT_NOFILE; None when
    they fit (or connections are unlimited: then EMFILE is the limit)."""
    if max_connections <= 0:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    need = 2 * max_connections + 2 * max_pipes + FDS_RESERVED
    if soft == resource.RLIM_INFINITY or need <= soft:
        return None
    return (
        f"--max-connections {max_connections} with {max_pipes} pipes needs {need} fds "
        f"(2 per connection + 2 per pipe + {FDS_RESERVED}) but RLIMIT_NOFILE is {soft}: "
        f"accept() will fail with EMFILE first; raise the limit (ulimit -n, "
        f"LimitNOFILE=) or lower --max-connections / --max-pipes"
    )

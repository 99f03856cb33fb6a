"""The pump: relays bytes between a client socket and its upstream socket.

The public face of the relay: the compiled twin (``l4proxy._ext.pump``, from
``ext/pump.pyx``; its loop runs without the GIL) when it was built, else the
pure-Python twin (``l4proxy._pump_py``); ``L4PROXY_NO_EXTENSIONS=1`` forces the
pure one. The choice is made in :mod:`l4proxy._impl`, nowhere else;
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
splice) at the top of ``l4proxy/_pump_py.py`` and ``ext/pump.pyx``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from l4proxy import _impl

__all__ = ["IMPLEMENTATION", "Pump"]

_mod, IMPLEMENTATION = _impl.load("pump")

if TYPE_CHECKING:
    # Both twins have this interface (l4proxy/_ext/pump.pyi mirrors it).
    from l4proxy._pump_py import Pump
else:
    Pump = _mod.Pump

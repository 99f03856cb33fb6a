"""The per-request HTTP/1.1 relay: routes every request of a keep-alive connection.

The public face of the relay: the compiled twin (``l4proxy.dataplane._ext.relay``,
from ``ext/relay.pyx``; its steady state runs without the GIL and without
Python per request) when it was built, else the pure-Python twin
(``l4proxy.dataplane._relay_py``); ``L4PROXY_NO_EXTENSIONS=1`` forces the pure
one. The choice is made in :mod:`l4proxy.dataplane._impl`, nowhere else;
``IMPLEMENTATION`` says which runs ("compiled" or "pure").

Both take ``decide`` (where one request goes, asked per request). The
compiled one also takes ``resolve``: a :class:`~l4proxy.dataplane.verdict.Verdict`
per request shape, which it caches and applies itself (the weighted draw and
the endpoint order per request); ``report_rows`` receives its metrics,
aggregated. Read the theory of operation in ``l4proxy/dataplane/_relay_py.py``
and ``ext/relay.pyx``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from l4proxy.dataplane import _impl
from l4proxy.dataplane._relay_py import UNROUTED, Decision

__all__ = ["IMPLEMENTATION", "UNROUTED", "Decision", "HttpRelay"]

_mod, IMPLEMENTATION = _impl.load("relay")

if TYPE_CHECKING:
    from l4proxy.dataplane._relay_py import HttpRelay
else:
    HttpRelay = _mod.HttpRelay

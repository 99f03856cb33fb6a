"""Peek at an HTTP/1.x request head, to route a connection before forwarding it.

The public face of the head parser: the compiled twin (``l4proxy.dataplane._ext.peek``,
from ``ext/peek.pyx``) when it was built, else the pure-Python twin
(``l4proxy.dataplane._peek_py``); ``L4PROXY_NO_EXTENSIONS=1`` forces the pure one. The
choice is made in :mod:`l4proxy.dataplane._impl`, nowhere else. The exception classes
and :class:`RequestHead` are the same objects under either twin.

Usage (sans-IO; the caller owns the socket)::

    parser = HeadParser(max_head=65536)
    while (head := parser.feed(await reader.read(4096))) is None:
        ...                       # bound this loop by time, too
    route(head.host, head.path)   # NotHTTP: route at L4; HeadError: answer .status
    upstream.write(parser.buffered)

Read the theory of operation and the decisions (bare LF and obs-fold
rejected, ...) in ``l4proxy/dataplane/_peek_py.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from l4proxy.dataplane import _impl
from l4proxy.dataplane._peek_py import HeadError, NotHTTP, RequestHead

__all__ = [
    "IMPLEMENTATION",
    "HeadError",
    "HeadParser",
    "NotHTTP",
    "RequestHead",
    "parse_head",
]

_mod, IMPLEMENTATION = _impl.load("peek")

if TYPE_CHECKING:
    # Both twins have this interface (l4proxy/dataplane/_ext/peek.pyi mirrors it).
    from l4proxy.dataplane._peek_py import HeadParser, parse_head
else:
    HeadParser = _mod.HeadParser
    parse_head = _mod.parse_head

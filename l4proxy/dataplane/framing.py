"""HTTP/1.1 message framing: where each request and response body ends.

The public face of the framer: the compiled twin (``l4proxy.dataplane._ext.framing``,
from ``ext/framing.pyx``) when it was built, else the pure-Python twin
(``l4proxy.dataplane._framing_py``); the choice is made in :mod:`l4proxy.dataplane._impl`. Read
the theory of operation and the strictness decisions (what is refused as
smuggling) in ``l4proxy/dataplane/_framing_py.py``.

Usage (sans-IO; the caller owns the sockets)::

    kind, length = response_framing(request_head, response_head)
    body = BodyFramer(kind, length, error_status=502)
    while not body.done:
        if n := body.blind():        # chunk data / Content-Length bytes
            body.skip(splice(up, down, n))
        else:
            used = body.feed(buf)    # framing bytes: chunk sizes, trailers
            forward(buf[:used])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from l4proxy.dataplane import _impl
from l4proxy.dataplane._framing_py import (
    Framing,
    FramingError,
    ResponseHead,
    bodiless_head,
    crlf_head,
    head_may_end,
    parse_response_head,
    request_framing,
    response_framing,
)

__all__ = [
    "IMPLEMENTATION",
    "BodyFramer",
    "Framing",
    "FramingError",
    "ResponseHead",
    "bodiless_head",
    "crlf_head",
    "head_may_end",
    "parse_response_head",
    "request_framing",
    "response_framing",
]

_mod, IMPLEMENTATION = _impl.load("framing")

if TYPE_CHECKING:
    from l4proxy.dataplane._framing_py import BodyFramer
else:
    BodyFramer = _mod.BodyFramer

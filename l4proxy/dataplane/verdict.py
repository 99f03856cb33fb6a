"""What the route table answers for a request, for the compiled relay to apply.

The per-request relay asks Python where a request goes; the compiled relay
(``ext/relay.pyx``) asks it once per distinct request *shape* (origin,
method, Host, target, and the headers some route matches on) and caches the
answer, a :class:`Verdict`, for ``ttl`` seconds. What must happen per
request, it does itself from the verdict: the weighted draw between the
choices, and the endpoint order (round-robin, random or least connections).
So a verdict holds everything a decision needs except the random draw.

Python decides, compiled code applies: building a verdict is
:meth:`l4proxy.rules.routing.RouteTable.choices` plus classification; applying
it has no Python in it.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import NamedTuple

__all__ = ["SHAPE_FULL", "SHAPE_HEADERS", "SHAPE_METHOD", "SHAPE_PATH", "Choice", "Verdict"]

Endpoint = tuple[str, int]

# What a verdict depends on besides the origin and Host (Verdict.shape): the
# relay keys its cache by these only, so that /users/1 and /users/2 share a
# verdict when no route of their service looks at paths.
SHAPE_PATH = 1  # the request target (path and query)
SHAPE_METHOD = 2
SHAPE_HEADERS = 4  # the headers some route matches on
SHAPE_FULL = SHAPE_PATH | SHAPE_METHOD | SHAPE_HEADERS


class Choice(NamedTuple):
    """One weighted destination of a route: a subset's endpoints.

    ``policy``: ``ROUND_ROBIN``, ``RANDOM``, ``LEAST_CONN`` (active requests
    per endpoint), or ``ORDERED`` (try ``endpoints`` in the order given).
    ``balance_key`` names the round-robin counter (subsets shared by routes
    share it). ``tag`` comes back in the relay's reports (metrics, outlier
    detection). ``status``: the answer when ``endpoints`` is empty (503 no
    healthy upstream; 500 for a Gateway API backend that resolves to nothing).
    """

    weight: int
    endpoints: tuple[Endpoint, ...]
    policy: str = "ROUND_ROBIN"
    balance_key: Hashable = None
    tag: Hashable = None
    status: int = 503


class Verdict(NamedTuple):
    """Where requests of one shape go: weighted ``choices``, or a ``local`` answer.

    ``ttl``: seconds the relay may apply this verdict to later requests of the
    same shape without asking again (0: this request only). A rule swap or an
    endpoint failure forgets it sooner (``HttpRelay.invalidate``). ``shape``
    (``SHAPE_*`` bits): what of a request besides origin and Host the verdict
    depends on; the same for every request to one origin and Host.
    """

    choices: tuple[Choice, ...] = ()
    local: tuple[int, str] | None = None
    tag: Hashable = None
    ttl: float = 1.0
    shape: int = SHAPE_FULL

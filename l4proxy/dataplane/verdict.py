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

from collections.abc import Hashable, Mapping
from typing import NamedTuple

__all__ = [
    "SHAPE_FULL",
    "SHAPE_HEADERS",
    "SHAPE_METHOD",
    "SHAPE_PATH",
    "SHAPE_TESTS",
    "TEST_KINDS",
    "Choice",
    "Verdict",
    "request_bits",
]

Endpoint = tuple[str, int]

# What a verdict depends on besides the origin and Host (Verdict.shape): the
# relay keys its cache by these only, so that /users/1 and /users/2 share a
# verdict when no route of their service looks at paths.
SHAPE_PATH = 1  # the request target (path and query)
SHAPE_METHOD = 2
SHAPE_HEADERS = 4  # the headers some route matches on
SHAPE_FULL = SHAPE_PATH | SHAPE_METHOD | SHAPE_HEADERS
# The target (and the headers matched exactly or by prefix) only through
# Verdict.tests: /users/1 and /users/2 share a verdict when they pass the same
# tests (what Ingress paths and uri matches read), and so do end-user: jason
# and end-user: ann when no route names either, so that ids in paths and
# headers do not each ask Python. SHAPE_PATH wins over the target's tests,
# SHAPE_HEADERS adds the values of every key header.
SHAPE_TESTS = 16

# The kinds of a test of a request (l4proxy.rules.routing.RequestTest), in
# the order the compiled relay numbers them.
TEST_KINDS = ("target_prefix", "exact", "path_prefix", "segments", "header_exact", "header_prefix")

RequestTest = tuple[str, str]


def target_path(target: str) -> str:
    """The path of an origin-form target: up to its first ``?`` or ``#``."""
    cut = len(target)
    for sep in "?#":
        i = target.find(sep, 0, cut)
        if i != -1:
            cut = i
    return target[:cut]


def request_bits(
    tests: tuple[RequestTest, ...], target: str, headers: Mapping[str, str] | None = None
) -> bytes:
    """Which of *tests* a request passes (its origin-form *target*, its
    *headers* by lowercase name, as ``dict(head.headers)`` makes them): bit
    ``i % 8`` of byte ``i // 8`` for test ``i`` (the compiled relay keys its
    verdicts by the same bytes). Tests read the path as sent: a target with
    a dot-segment (``/public/../private`` passes ``segments /public``) never
    gets here, the head parsers refuse it."""
    path = target_path(target)
    out = bytearray((len(tests) + 7) // 8)
    for i, (kind, value) in enumerate(tests):
        if kind == "target_prefix":
            hit = target.startswith(value)
        elif kind == "exact":
            hit = path == value
        elif kind == "path_prefix":
            hit = path.startswith(value)
        elif kind == "segments":
            hit = path == value or path.startswith(value + "/")
        elif kind in ("header_exact", "header_prefix"):
            name, _, match = value.partition(":")
            got = (headers or {}).get(name)
            hit = got is not None and (
                got == match if kind == "header_exact" else got.startswith(match)
            )
        else:
            raise ValueError(f"unknown request test {kind!r}")
        if hit:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


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
    same shape without asking again (0: this request only); once it expires,
    the compiled relay asks again with one request and serves the others
    the expired verdict until the answer is cached (1 s at most). A rule
    swap or an endpoint failure forgets it at once (``HttpRelay.invalidate``). ``shape``
    (``SHAPE_*`` bits): what of a request besides origin and Host the verdict
    depends on; the same for every request to one origin and Host, as are
    ``tests`` (with ``SHAPE_TESTS``: the target is read only through them).
    ``timeout``: the route's timeout in seconds (0: none), from the end of the
    request to the end of its response; past it the relay answers 504
    ``upstream request timeout``, or cuts a response that began.
    """

    choices: tuple[Choice, ...] = ()
    local: tuple[int, str] | None = None
    tag: Hashable = None
    ttl: float = 1.0
    shape: int = SHAPE_FULL
    tests: tuple[RequestTest, ...] = ()
    timeout: float = 0.0

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

import base64
import functools
import hashlib
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import NamedTuple

__all__ = [
    "BACKOFF_MAX_FACTOR",
    "DEFAULT_MAX_MIRRORS",
    "DEFAULT_RETRY_BACKOFF",
    "HASH_COOKIE",
    "HASH_HEADER",
    "HASH_KINDS",
    "HASH_QUERY",
    "HASH_SOURCE_IP",
    "MIRROR_MAX_IDLE",
    "MIRROR_READ_LIMIT",
    "MIRROR_SCALE",
    "MIRROR_TIMEOUT",
    "RETRY_4XX",
    "RETRY_5XX",
    "RETRY_GATEWAY_ERROR",
    "RETRY_RESET",
    "RETRY_STATUS_CODES",
    "SESSION_COOKIE",
    "SESSION_HEADER",
    "SHAPE_FULL",
    "SHAPE_HEADERS",
    "SHAPE_METHOD",
    "SHAPE_PATH",
    "SHAPE_TESTS",
    "TEST_KINDS",
    "AnswerStatus",
    "Choice",
    "Fault",
    "HashOn",
    "HeadEdits",
    "Mirror",
    "PathRewrite",
    "RetryPolicy",
    "SessionPersistence",
    "Verdict",
    "cookie_named",
    "cookie_value",
    "endpoint_hash",
    "hash_key",
    "hash_order",
    "no_endpoint_body",
    "request_bits",
    "session_token",
    "shadow_head",
    "shadow_host",
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
    *headers* by lowercase name, as routing's ``request_headers`` joins
    them): bit
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


# Envoy's retry_on policies that the relays act on (RetryPolicy.on). A
# failed connect always moves on to the next endpoint, policy or not, so
# connect-failure needs no bit; the policies of HTTP/2 and gRPC never occur.
RETRY_5XX = 1  # any 5xx, and a reset before the response head
RETRY_GATEWAY_ERROR = 2  # 502, 503, 504, and a reset (Envoy counts it as a 5xx)
RETRY_RESET = 4  # the upstream closed or reset before the response head
RETRY_4XX = 8  # retriable-4xx: 409
RETRY_STATUS_CODES = 16  # retriable-status-codes: RetryPolicy.codes
_RETRY_BITS = {
    "5xx": RETRY_5XX,
    "gateway-error": RETRY_GATEWAY_ERROR,
    "reset": RETRY_RESET,
    "retriable-4xx": RETRY_4XX,
    "retriable-status-codes": RETRY_STATUS_CODES,
}
RETRY_ON_RESET = RETRY_5XX | RETRY_GATEWAY_ERROR | RETRY_RESET
# the retry_on policies under which Envoy's router retries a failed connect
# (RetryStateImpl::wouldRetryFromReset: a reset, before the request or not,
# counts as a 5xx): RetryPolicy.on_connect
_RETRY_CONNECT = frozenset(
    {"connect-failure", "reset-before-request", "reset", "5xx", "gateway-error"}
)


# Envoy's default base interval between retries (RetryPolicy.backoff); the
# longest wait is BACKOFF_MAX_FACTOR times it (Envoy's default max_interval)
DEFAULT_RETRY_BACKOFF = 0.025
BACKOFF_MAX_FACTOR = 10


class RetryPolicy(NamedTuple):
    """A route's retry policy as the relays apply it (Envoy's, as Istio
    configures it from a VirtualService's ``http[].retries``).

    ``attempts``: retries after the first try; ``per_try_timeout``: seconds
    a try may go without a response head (0: none; then the try is given
    up, a reset to Envoy: retried when ``on_reset``, else the 504);
    ``on``: ``RETRY_*`` bits;
    ``codes``: the retriable status codes (``RETRY_STATUS_CODES``);
    ``backoff``: the base interval (seconds) of the wait before each retry
    (:meth:`backoff_s`);
    ``ignore_previous_hosts``: a retry goes to an endpoint not tried yet
    first, those tried last (Envoy's previous_hosts retry host predicate,
    Istio's ``retryIgnorePreviousHosts``, its default); False: to the
    request's endpoints in the order the route drew them, so the endpoint
    that failed first again (a failed connect's endpoint is dropped from
    the request's either way: the relay's own retry, not the policy's);
    ``on_connect``: the policy retries a failed connect (Envoy's router
    does under connect-failure, reset-before-request, reset, 5xx and
    gateway-error). A failed connect here moves on to the next endpoint,
    policy or not (the next try's x-envoy-attempt-count counts it, as
    Envoy's); under such a policy the move is one of its ``attempts``, a
    retry counted and sent after its backoff, as Envoy's spends one of
    its retries on it and waits its backoff timer, to an endpoint tried
    already when none is left untried (the one tried least recently: one
    endpoint refusing is dialled 1 + ``attempts`` times, as Envoy's
    ``previous_hosts`` predicate only prefers a host not tried yet), and
    with none left the request is answered as with no endpoint left;
    without one it spends nothing and goes at once, each endpoint dialled
    once. Where every connect failed, or the tries went
    on failed connects, the request's 503 says UF and, under such a
    policy, URX, as Envoy's says (no bit of ``on``: it holds no request;
    a policy of it alone, ``connect-failure`` or ``reset-before-request``,
    is :attr:`in_effect` all the same, with a ``perTryTimeout`` or
    without, as Envoy's retries a failed connect under it).
    """

    attempts: int
    per_try_timeout: float = 0.0
    on: int = 0
    codes: frozenset[int] = frozenset()
    backoff: float = DEFAULT_RETRY_BACKOFF
    ignore_previous_hosts: bool = True
    on_connect: bool = False

    @classmethod
    def of(
        cls,
        attempts: int,
        per_try_timeout: float,
        retry_on: Iterable[str],
        codes: Iterable[int],
        backoff: float = DEFAULT_RETRY_BACKOFF,
        ignore_previous_hosts: bool = True,
    ) -> RetryPolicy:
        """From Envoy's policy names (those without a bit do nothing here,
        nor does ``retriable-status-codes`` without a code)."""
        on = 0
        for name in retry_on:
            on |= _RETRY_BITS.get(name, 0)
        names = frozenset(retry_on)
        codes = frozenset(codes)
        if not codes:
            on &= ~RETRY_STATUS_CODES
        on_connect = not names.isdisjoint(_RETRY_CONNECT)
        return cls(attempts, per_try_timeout, on, codes, backoff, ignore_previous_hosts, on_connect)

    @property
    def in_effect(self) -> bool:
        """Whether the relays have anything to do for this policy: a try
        left and a policy that may fire here (``on``: then every request
        is held for a replay; ``on_connect``: a failed connect spends its
        tries, nothing held), or at least a per-try timeout (a try past
        it gets the 504; nothing held). Otherwise the relays take it as
        no policy at all (None), so it costs nothing per request."""
        return self.attempts > 0 and (bool(self.on) or self.on_connect or self.per_try_timeout > 0)

    def backoff_s(self, n: int, u: float) -> float:
        """The wait before the *n*-th retry (1, 2, ...), given *u* uniform in
        [0, 1): Envoy's JitteredExponentialBackOffStrategy, a uniformly
        random time in [0, (2^n - 1) * base), at most ``BACKOFF_MAX_FACTOR``
        times base (the multiplier stops growing once it passed that:
        25 ms, 75 ms, 175 ms, then 250 ms for the default base). The
        compiled relay's backoff_delay() is its twin."""
        if self.backoff <= 0:
            return 0.0
        cap = BACKOFF_MAX_FACTOR * self.backoff
        mult = 1.0
        for _ in range(1, n):
            if mult * self.backoff > cap:
                break
            mult = mult * 2 + 1
        return min(u * mult * self.backoff, cap)

    @property
    def on_reset(self) -> bool:
        """Whether a try whose connection closed before its response head
        is retried."""
        return bool(self.on & RETRY_ON_RESET)

    def on_status(self, status: int) -> bool:
        """Whether a try answered with this final status is retried."""
        on = self.on
        return bool(
            (on & RETRY_5XX and 500 <= status <= 599)
            or (on & RETRY_GATEWAY_ERROR and status in (502, 503, 504))
            or (on & RETRY_4XX and status == 409)
            or (on & RETRY_STATUS_CODES and status in self.codes)
        )


Header = tuple[str, str]


class PathRewrite(NamedTuple):
    """How a request's target is rewritten before it goes upstream (Envoy's
    ``prefix_rewrite``, a Gateway API ``URLRewrite`` path): the first
    ``strip`` characters of its path (the target up to its first ``?``; at
    most the whole path) are replaced by ``prefix``; ``strip`` -1 replaces
    the whole path. The query, if any, follows unchanged; a path left empty
    is ``/``. So ``PathRewrite(4, "/v2")`` sends ``/api/users?id=1`` as
    ``/v2/users?id=1``, ``PathRewrite(4, "")`` sends ``/api`` as ``/``, and
    ``PathRewrite(-1, "/x")`` sends ``/a/b?q`` as ``/x?q``. The route table
    gives the ``strip`` of the match that a verdict's shape selects (the
    same for every request the verdict is applied to); an absolute-form
    target (``http://host/path``) has its path rewritten the same way."""

    strip: int
    prefix: str


class HeadEdits(NamedTuple):
    """What the relay changes in the heads of the requests a :class:`Choice`
    takes, and of their final responses (Envoy's
    ``request_headers_to_add``/``_remove``, ``response_headers_to_add``/
    ``_remove``, ``prefix_rewrite`` and ``host_rewrite_literal``, as Istio
    and the Gateway API configure them).

    In a head, the lines whose name (case-insensitive) is in ``*_remove`` or
    among ``*_set``'s names are left out; then the ``*_set`` lines, then the
    ``*_add`` lines, go in the order given before the empty line that ends
    the head. ``path`` rewrites the request target; ``authority`` replaces
    the value of the request's Host line. Names are lowercase tokens and
    values hold no CR, LF or NUL (the route table checked them); none is a
    field that frames a message or is hop-by-hop (Content-Length,
    Transfer-Encoding, Connection, Keep-Alive, Proxy-Connection, TE,
    Upgrade, Trailer, Expect) nor Host (``authority`` is). A retry sends the
    same edited head. Interim (1xx) responses are not edited.

    The relay's own answers to a request that goes to its choice's
    endpoints get the response edits too, by the same rule (as Envoy's
    router finalizes its local replies with the route's and the weighted
    cluster's header mutations): the 503 ``no healthy upstream`` after each
    candidate's connect failed, a circuit breaker's 503 (``overflow``, with
    ``x-envoy-overloaded``), the 503 ``overloaded`` when the relay is out of
    file descriptors, the 504 ``upstream request timeout`` of the route's
    timeout, the 503 of an upstream that closed before any byte of the
    response, and the 502 of one that closed within its head or sent one that
    cannot be framed, before a final head went out. The answer's own lines
    named in ``response_remove`` or among ``response_set``'s names are left
    out, then the ``response_set`` and ``response_add`` lines go before its
    empty line; its framing (``content-length``, ``connection: close``) is
    never touched, as no edit names it. A HEAD request's answer is the
    edited head alone. So is the answer to a request whose drawn choice has
    no endpoint (an empty subset, every endpoint ejected, a backend not
    resolved: its ``status``, 503 ``no healthy upstream`` or 500 ``backend
    not resolved``): Envoy's router sends it as a local reply too
    (NoHealthyUpstream, ClusterNotFound), finalized with the route's and
    the weighted cluster's header mutations, and the CORS filter's lines
    come with the edits. Not edited: a fault's abort (Envoy's fault filter
    runs before the CORS filter and the router: its answer has no CORS
    lines), a route's own answer (a redirect, a direct response: its lines
    come from the route table), the 400 of a path rewrite that makes a
    dot-segment or of a request body that cannot be framed, and the
    answers to a request before it is routed (400, 408, 413, 431, ...)
    or with no route (no edits to apply)."""

    request_set: tuple[Header, ...] = ()
    request_add: tuple[Header, ...] = ()
    request_remove: tuple[str, ...] = ()
    response_set: tuple[Header, ...] = ()
    response_add: tuple[Header, ...] = ()
    response_remove: tuple[str, ...] = ()
    path: PathRewrite | None = None
    authority: str | None = None


# Envoy's fault filter's answer for an aborted request (its local reply body)
FAULT_ABORT_BODY = "fault filter abort"
# the share of requests a fault applies to, in parts per million
FAULT_SCALE = 1_000_000


class Fault(NamedTuple):
    """A route's fault injection (Envoy's fault filter, as Istio configures it
    from a VirtualService's ``http[].fault``), drawn per request by the relay:
    with probability ``delay_ppm`` / :data:`FAULT_SCALE` the request waits
    ``delay`` seconds before it goes upstream (from its head's arrival;
    the route's timeout starts after it); then, independently, with
    probability ``abort_ppm`` / :data:`FAULT_SCALE` it is answered
    ``abort_status`` with the body :data:`FAULT_ABORT_BODY` (after the delay,
    if both fell) and never goes upstream. A request whose body is not all
    here when the abort goes gets it with ``connection: close``, then the
    connection closes (Envoy's response before the request is complete);
    a complete body is dropped and the connection stays as its head asks.
    A request answered locally (its route's answer, or none of its
    destination's endpoints) is drawn for too, before that answer. A client
    that leaves during the delay ends it; nothing is counted against an
    endpoint. Both draws use the relay's seeded RNG. ``tag``: what the
    relay's reports of an aborted request carry instead of its choice's
    (None: its choice's); Istio labels an abort's metrics with no
    destination workload or version, as no upstream host was picked."""

    delay: float = 0.0
    delay_ppm: int = 0
    abort_status: int = 0
    abort_ppm: int = 0
    tag: Hashable = None


# What a consistent-hash choice hashes (HashOn.kind)
HASH_HEADER = "header"
HASH_COOKIE = "cookie"
HASH_QUERY = "query"
HASH_SOURCE_IP = "source_ip"
HASH_KINDS = (HASH_HEADER, HASH_COOKIE, HASH_QUERY, HASH_SOURCE_IP)

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_M64 = (1 << 64) - 1


def hash_key(value: bytes) -> int:
    """The 64-bit key of a hashed value (a header's, a cookie's, a query
    parameter's bytes): FNV-1a. The compiled relay's twin is hash_fnv()."""
    h = _FNV_OFFSET
    for b in value:
        h = ((h ^ b) * _FNV_PRIME) & _M64
    return h


def endpoint_hash(ep: Endpoint) -> int:
    """An endpoint's 64-bit identity in the rendezvous draw:
    :func:`hash_key` of ``"address:port"`` (an IPv6 address as it is
    written in the endpoint, without brackets)."""
    return hash_key(f"{ep[0]}:{ep[1]}".encode())


def _mix(x: int) -> int:
    # splitmix64's finalizer: every bit of x moves about half of the result's
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def hash_order(key: int, hashes: Sequence[int]) -> list[int]:
    """The order a consistent-hash choice tries its endpoints in for a
    request with *key*: the indices of *hashes* (:func:`endpoint_hash` of
    each endpoint) by descending score ``mix(key ^ hash)``, ties by index
    (rendezvous, or highest-random-weight, hashing). A key always goes to
    the same endpoint while it stays; an endpoint that goes (ejected,
    scaled away) moves only its own keys, each to its next in this order,
    and one that comes takes about 1/n of the keys: the guarantees of
    Envoy's ring hash and Maglev without a table. Its retries go down the
    same order."""
    scores = [_mix(key ^ h) for h in hashes]
    return sorted(range(len(hashes)), key=lambda i: (-scores[i], i))


# Round robin's first endpoint. A new round-robin counter (one per
# balance key: RouteTable._rr, the compiled relay's R.rr slots, the pure
# relay's mirror positions) starts at an offset drawn for it, not at 0:
# every worker starting each subset at its first endpoint (and again at
# each rule load or table sweep that makes its counters anew) sent that
# endpoint more than its share, with low-rate clients spread over N
# workers or a canary reloading its weights every step. Envoy does the
# same: its round robin's index per host set starts at a seed drawn once
# per load balancer, that is per worker (EdfLoadBalancerBase's seed_,
# RoundRobinLoadBalancer::refreshHostSource). The offset is a keyed hash
# of the balance key, not a draw of any RNG whose sequence something else
# depends on (the weights' draws, the backoffs' jitter): with --seed
# (seed + the worker's index) it is the same run after run, in both
# twins; without one, the salt comes from os.urandom.


def rr_salt(seed: int | None) -> int:
    """The 64-bit salt of the round-robin starts (:func:`rr_start`): from
    *seed* (``--seed`` plus the worker's index: the same starts every run,
    in both twins), else from ``os.urandom``."""
    if seed is None:
        return int.from_bytes(os.urandom(8), "little")
    return _mix(hash_key(f"round robin {int(seed)}".encode()))


def _key_text(key: object) -> str:
    # a balance key as text that does not depend on the process (never
    # hash() of a str, which PYTHONHASHSEED randomizes) nor on a label
    # set's insertion order: a tuple's parts, a mapping's items sorted
    if isinstance(key, tuple):
        return "(" + ",".join(_key_text(k) for k in key) + ")"
    if isinstance(key, Mapping):
        return "{" + ",".join(f"{k!r}:{v!r}" for k, v in sorted(key.items())) + "}"
    return repr(key)


def rr_start(salt: int, key: Hashable) -> int:
    """Where a new round-robin counter for *key* starts: a 64-bit value
    (its first pick is this modulo the number of endpoints), a keyed hash
    of *key* under *salt* (:func:`rr_salt`)."""
    mac = hashlib.blake2b(
        _key_text(key).encode("utf-8", "backslashreplace"),
        digest_size=8,
        key=(salt & _M64).to_bytes(8, "little"),
    )
    return int.from_bytes(mac.digest(), "little")


def cookie_value(draw: int) -> str:
    """The value of a cookie the relay generates (HashOn.ttl) from a 64-bit
    draw of its RNG: 16 lowercase hex digits (as Envoy's, which hashes the
    client's address)."""
    return f"{draw & _M64:016x}"


class HashOn(NamedTuple):
    """What a ``HASH`` choice hashes per request to order its endpoints
    (:func:`hash_order`): Envoy's hash policy as Istio configures it from a
    DestinationRule's ``loadBalancer.consistentHash``. Requests with the
    same value go to the same endpoint (sticky sessions); the weighted
    draw between a route's destinations stays per request, as in Istio.

    ``kind`` :data:`HASH_HEADER`: the value of the request's header
    ``name`` (lowercase; OWS trimmed, Latin-1 bytes: what
    ``Request.headers`` holds, where a name on several lines has their
    values joined with ``,``, as Envoy hashes every value: routing's
    ``request_headers``); present but empty is the empty value.
    :data:`HASH_COOKIE`: the value of the first cookie named ``name``
    (case-sensitive) in the request's ``cookie`` lines (in order: their
    values joined with ``; ``), pairs split on ``;`` and trimmed, one pair
    of surrounding double quotes removed; empty is absent. :data:`HASH_QUERY`:
    the first value of the query parameter ``name`` in the target, as sent
    (not percent-decoded; no ``=``: the empty value), as routing's
    ``_query_params`` reads it. :data:`HASH_SOURCE_IP` (``name`` empty):
    the client's address, the peer of the proxy's connection from it, as
    its packed bytes (4 for IPv4, 16 for IPv6: ``ipaddress``'s ``packed``;
    an IPv4-mapped IPv6 peer is its 16); at a gateway listener with trusted
    proxies, the client address taken from X-Forwarded-For where it names
    one (``forwarding.packed_ip`` of the trusted client address: see
    ``forwarding.py``). The key is :func:`hash_key` of the
    value's bytes.

    A request without the value gets a random key (Envoy: a random host),
    unless ``ttl`` is not None (a cookie only): then the relay generates a
    cookie (:func:`cookie_value` of a draw), hashes its value as if the
    request had sent it, and the final response head gets
    :meth:`set_cookie`'s line after the choice's response edits (the
    client's next request sends it back and sticks)."""

    kind: str
    name: str
    ttl: int | None = None  # seconds (0: a session cookie, no Max-Age)
    path: str = ""  # the generated cookie's Path ("": none)

    def key_of(
        self, target: str, headers: Mapping[str, str], source: bytes | None = None
    ) -> bytes | None:
        """The bytes this policy hashes in a request (its origin-form
        *target*, its *headers* by lowercase name, its client's packed
        address *source*, None: unknown), None: absent."""
        if self.kind == HASH_SOURCE_IP:
            return source
        if self.kind == HASH_HEADER:
            got = headers.get(self.name)
            return None if got is None else got.encode("latin-1")
        if self.kind == HASH_COOKIE:
            value = cookie_named(headers.get("cookie", ""), self.name)
            return None if value is None else value.encode("latin-1") or None
        if self.kind == HASH_QUERY:
            q = target.find("?")
            if q == -1:
                return None
            for param in target[q + 1 :].split("#", 1)[0].split("&"):
                name, _, value = param.partition("=")
                if name == self.name:
                    return value.encode("latin-1")
            return None
        raise ValueError(f"unknown hash kind {self.kind!r}")

    def set_cookie(self, value: str) -> str:
        """The ``set-cookie`` value for a generated cookie: Envoy's
        ``NAME="VALUE"; Max-Age=TTL; Path=PATH; HttpOnly`` (Max-Age only
        for a ttl above 0, Path only when given)."""
        out = f'{self.name}="{value}"'
        if self.ttl:
            out += f"; Max-Age={self.ttl}"
        if self.path:
            out += f"; Path={self.path}"
        return out + "; HttpOnly"


# What a rule's session persistence reads its token from (SessionPersistence.kind)
SESSION_COOKIE = "cookie"
SESSION_HEADER = "header"


@functools.lru_cache(maxsize=4096)
def session_token(ep: Endpoint) -> str:
    """The token that names endpoint *ep* for session persistence:
    standard base64 (padded) of ``address:port``, an IPv6 address in
    brackets (``[::1]:8080``): what Envoy's stateful session filter
    encodes (``MS4yLjMuNDo4MA==`` is ``1.2.3.4:80``)."""
    address, port = ep
    text = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    return base64.b64encode(text.encode()).decode("ascii")


class SessionPersistence(NamedTuple):
    """A route's session persistence (the Gateway API's HTTPRoute rule
    ``sessionPersistence``, as Envoy Gateway configures Envoy's stateful
    session filter): a client that sends a token naming one of the route's
    endpoints goes to that endpoint while it is one of them.

    The token is :func:`session_token` of an endpoint. ``kind``
    :data:`SESSION_COOKIE`: the value of the first cookie named ``name``
    (case-sensitive) in the request's ``cookie`` lines (in order), pairs
    split on ``;`` and trimmed, one pair of surrounding double quotes
    removed (as :class:`HashOn` reads one); :data:`SESSION_HEADER`: the
    value of the request's header ``name`` (lowercase; OWS trimmed), on one
    line only (several lines join with ``,``, which no token holds). Empty
    is absent.

    A request whose token names an endpoint among its route's
    destinations' (the healthy ones, as :class:`Choice` has them) goes to
    that destination, not drawn, and that endpoint first, the rest of the
    destination's in its load balancer's order after it (a failed connect
    moves on as ever). Any other request is routed as without a token
    (drawn, balanced). The final response head an endpoint answers gets
    :meth:`line` for that endpoint, unless the request's token named it:
    a client keeps its token while its endpoint serves it, and gets a new
    one when another did. The relay's own answers get none. Nothing is
    kept in the proxy: any worker, process or restart honours a token.

    ``path``: the cookie's ``Path`` (from the route's match, see
    :mod:`l4proxy.rules._gateway_api`); ``max_age``: its ``Max-Age`` in
    seconds (a permanent cookie), None for a session cookie. A header
    token has neither."""

    kind: str
    name: str
    path: str = "/"
    max_age: int | None = None

    def sent(self, headers: Iterable[tuple[str, str]]) -> str | None:
        """The token a request sent, from its header fields (lowercase
        names, trimmed values, in order: ``RequestHead.headers``, or the
        joined ``Request.headers`` items); None: none."""
        if self.kind == SESSION_HEADER:
            values = [v for k, v in headers if k == self.name]
            return (values[0] or None) if len(values) == 1 else None
        for k, v in headers:
            if k == "cookie":
                got = cookie_named(v, self.name)
                if got is not None:
                    return got or None
        return None

    def line(self, ep: Endpoint) -> tuple[str, str]:
        """The response header line that gives the client *ep*'s token: a
        cookie, Envoy's ``set-cookie: NAME="TOKEN"; Max-Age=N; Path=P;
        HttpOnly`` (Max-Age only for a permanent one); or ``NAME: TOKEN``."""
        name, before, after = self.parts()
        return name, before + session_token(ep) + after

    def parts(self) -> tuple[str, str, str]:
        """:meth:`line` around its token: (the header's name, the value
        before the token, the value after it), what the compiled relay
        writes a token between (nothing searched for: a cookie name may
        hold any token's text)."""
        if self.kind == SESSION_HEADER:
            return self.name, "", ""
        after = '"'
        if self.max_age is not None:
            after += f"; Max-Age={self.max_age}"
        if self.path:
            after += f"; Path={self.path}"
        return "set-cookie", f'{self.name}="', after + "; HttpOnly"


def cookie_named(value: str, name: str) -> str | None:
    """The value of the first cookie named *name* in a ``cookie`` line's
    *value*: pairs split on ``;`` and trimmed, one pair of surrounding
    double quotes removed (maybe empty); None: none named so."""
    for pair in value.split(";"):
        key, eq, got = pair.strip(" \t").partition("=")
        if eq and key == name:
            if len(got) >= 2 and got[0] == got[-1] == '"':
                got = got[1:-1]
            return got
    return None


class Choice(NamedTuple):
    """One weighted destination of a route: a subset's endpoints.

    ``policy``: ``ROUND_ROBIN``, ``RANDOM``, ``LEAST_REQUEST`` (active requests
    per endpoint), ``HASH`` (consistent hashing on ``hash_on``: the order
    :func:`hash_order` gives the request's key), or ``ORDERED`` (try
    ``endpoints`` in the order given).
    ``balance_key`` names the round-robin counter (subsets shared by routes
    share it). ``tag`` comes back in the relay's reports (metrics, outlier
    detection). ``status``: the answer when ``endpoints`` is empty (503 no
    healthy upstream; 500 for a Gateway API backend that resolves to nothing).
    ``edits``: what the relay changes in the heads of its requests and
    responses (None: nothing).

    **A tag per endpoint.** ``endpoint_tags``: where the endpoints differ in
    what the reports must tell apart (their ``version`` label: a Service's
    pods of v1 and v2 with no rule, a route to a Service that two
    Deployments back during a rolling update or a canary by replica
    count), a tag per endpoint, parallel to ``endpoints`` (the same length,
    else the verdict is refused as one that cannot be applied: the
    relays' 503, counted in ``errors``); empty, the common case of one
    version, where every request is reported with ``tag`` and nothing is
    done per endpoint. A request of such a choice is reported (metrics,
    and outlier detection from then on) with the tag of the endpoint of
    its *last try that reached an endpoint*: the relay took one of the
    endpoint's pooled connections, or began a connect to it, for the
    request. So a relayed answer counts under the endpoint that answered;
    a retry to another endpoint moves it there (a failed connect's next
    candidate, a pooled connection's one retry, a retry policy's try). A
    request answered by the relay before any try reached an endpoint keeps
    ``tag``: none of its endpoints, a circuit breaker's overflow or a
    wait for a connection that ends first (no connection was the
    endpoint's to give), a fault's abort (its own ``Fault.tag``), a local
    answer, a client gone during a fault's delay. A connect failure to
    every candidate (the 503 ``no healthy upstream`` after each one's
    connect failed: Envoy's response flag ``UF``) counts under the last
    candidate tried, as Istio labels it since 1.8: such a request never
    reached a peer to exchange metadata with, and the source reporter
    falls back to the upstream host's own labels (istio/proxy#3051, a 503
    ``UF`` labelled with the endpoint's workload; before, ``unknown``:
    istio/istio#28387), the host being the last one Envoy tried. Out of
    file descriptors (the 503 ``overloaded``) counts under the endpoint
    the relay was connecting to. The decision's own row
    (``l4proxy_decisions_total``) is the choice's ``tag``. Istio labels a
    request by the pod that answered (the upstream peer's metadata):
    counted per choice, v3's 500s were v1's, or neither's (``unknown``),
    and a canary judged on its version's series was judged on another's
    answers, or on none.
    """

    weight: int
    endpoints: tuple[Endpoint, ...]
    policy: str = "ROUND_ROBIN"
    balance_key: Hashable = None
    tag: Hashable = None
    status: int = 503
    edits: HeadEdits | None = None
    hash_on: HashOn | None = None  # with policy HASH only
    endpoint_tags: tuple[Hashable, ...] = ()  # () or one per endpoint (a mixed destination)


def no_endpoint_body(status: int) -> str:
    """The body of the router's answer to a request whose choice has no
    endpoint (its ``status``): Envoy's ``no healthy upstream`` for 503,
    else ``backend not resolved`` (a Gateway API backend that resolves to
    nothing)."""
    return "no healthy upstream" if status == 503 else "backend not resolved"


# Request mirroring (Mirror): the share mirrored in parts per million (a
# fault's scale: the relays draw both alike); how
# long a copy may take, from its connect to the server's close, when its
# route has no timeout; how many bytes of a copy's answer are read (and
# thrown away) at most, before it is closed as done; and how many copies a
# relay keeps in flight at most
MIRROR_SCALE = FAULT_SCALE
MIRROR_TIMEOUT = 15.0
MIRROR_READ_LIMIT = 1 << 20
DEFAULT_MAX_MIRRORS = 256
MIRROR_MAX_IDLE = 64  # idle copy connections per mirror endpoint
_SHADOW = b"-shadow"
# the lines of a request head that a copy leaves out: the client's
# hop-by-hop lines (the copy's connection is the relay's own, kept alive)
_SHADOW_DROPS = (b"connection", b"keep-alive", b"proxy-connection")


# AnswerStatus's states
_AS_STATUS, _AS_HEAD, _AS_DONE = 0, 1, 2
_STATUS_LINE = 12  # b"HTTP/1.1 200": what a status line's code needs


class AnswerStatus:
    """The status of a copy's answer, read as its bytes arrive (the relays
    throw the rest away): the code of the first final head. A head begins
    ``HTTP/1.`` one digit, a space and three digits (its first 12 bytes;
    what follows is not read); a 1xx code but 101 is an interim head,
    skipped to its empty line (a line ending in LF with nothing before it
    but CRs: every CR in a line is ignored) and the next head read; any
    other code is final. Bytes that do not begin a head so make the status 0
    (not HTTP/1.x), as does an answer that ends before a final head
    (:attr:`status` stays 0). Once final, the rest is not looked at
    (:attr:`done`). The compiled relay reads the same way, byte for byte,
    whatever the bytes and however they are cut into reads."""

    __slots__ = ("_line", "_state", "_text", "status")

    def __init__(self) -> None:
        self.status = 0
        self._state = _AS_STATUS
        self._text = bytearray()  # the status line's first bytes, so far
        self._line = 0  # _AS_HEAD: bytes of the current line but CR

    @property
    def done(self) -> bool:
        return self._state == _AS_DONE

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n and self._state != _AS_DONE:
            if self._state == _AS_STATUS:
                take = min(n - i, _STATUS_LINE - len(self._text))
                self._text += data[i : i + take]
                i += take
                if len(self._text) == _STATUS_LINE:
                    self._head_begins(bytes(self._text))
                continue
            b = data[i]
            i += 1
            if b == 0x0A:  # LF
                if not self._line:  # the interim head's empty line
                    self._state = _AS_STATUS
                    self._text.clear()
                self._line = 0
            elif b != 0x0D:
                self._line += 1

    def _head_begins(self, text: bytes) -> None:
        code = text[9:12]
        if not (
            text[:7] == b"HTTP/1."
            and 0x30 <= text[7] <= 0x39
            and text[8] == 0x20
            and all(0x30 <= d <= 0x39 for d in code)
        ):
            self._state = _AS_DONE  # not HTTP/1.x: status 0
            return
        status = int(code)
        if 100 <= status < 200 and status != 101:
            self._state = _AS_HEAD
            self._line = _STATUS_LINE  # (within the status line)
            return
        self.status = status
        self._state = _AS_DONE


def shadow_host(value: bytes) -> bytes:
    """The Host of a mirrored copy: ``-shadow`` after the host name, before
    its port (Envoy's shadow authority, as Istio's mirroring shows it):
    ``reviews:9080`` becomes ``reviews-shadow:9080``, ``reviews``
    ``reviews-shadow``, ``[::1]:80`` ``[::1]-shadow:80``. *value* has its
    optional whitespace trimmed already."""
    colon = value.rfind(b":")
    if colon == -1 or value.rfind(b"]") > colon:
        return value + _SHADOW
    return value[:colon] + _SHADOW + value[colon:]


def shadow_head(head: bytes) -> bytes:
    """The head of a request's mirrored copy, from *head* as the relay sent
    it upstream (its route's edits applied; the request line, its header
    lines and the empty line, each ending in CRLF or a bare LF, as the
    client's may): the same lines in the same order, each ending in CRLF,
    but a ``Host`` line's value through :func:`shadow_host` (its optional
    whitespace trimmed: ``Host: v``, the name as sent) and no
    ``Connection``, ``Keep-Alive`` or ``Proxy-Connection`` line (the
    client's hop-by-hop lines: the copy's connection is the relay's, kept
    alive between copies, see :class:`Mirror`). Names are matched
    case-insensitively. The compiled relay builds the same bytes. Its
    first line is the first that is not empty: an empty line before the
    request line (the relays drop those before they stage a head) would
    end the copy's head there, and its body would go as a request."""
    lines = head.lstrip(b"\r\n").split(b"\n")
    out = [lines[0].removesuffix(b"\r")]
    for raw in lines[1:]:
        line = raw.removesuffix(b"\r")
        if not line:
            break
        name, colon, value = line.partition(b":")
        low = name.lower()
        if colon and low in _SHADOW_DROPS:
            continue
        if colon and low == b"host":
            line = name + b": " + shadow_host(value.strip(b" \t"))
        out.append(line)
    return b"\r\n".join(out) + b"\r\n\r\n"


class Mirror(NamedTuple):
    """Where a copy of each request of a route also goes (Envoy's
    ``request_mirror_policies``, as Istio configures them from a
    VirtualService's ``mirror``/``mirrors`` and the Gateway API from a
    ``RequestMirror`` filter): to one of ``endpoints`` (round robin over
    them, chosen when the request is drawn, skipping names not resolved
    yet: the relays know no ejections, the route table leaves an ejected
    endpoint out as a Choice's), for a share
    ``ppm`` / :data:`MIRROR_SCALE` of the requests, drawn per request with
    the relay's seeded RNG (1,000,000: every request, no draw).

    A copy is fire and forget: its response is read and thrown away, and
    nothing about it reaches the client, the route's metrics, its retries,
    or outlier detection. It goes once the request has been read whole and
    its bytes went to the primary (the primary's first): :func:`shadow_head`
    of the head as sent upstream, then the body bytes exactly as sent
    (chunked stays chunked). It goes whatever becomes of the primary (as
    Envoy's shadow does): a request without a body that no try took (every
    connect failed, a circuit breaker's or an fd shortage's 503, the route
    timeout before a connection) goes from its head as it would have been
    sent.

    **The copies' pool.** A copy goes on a connection of the relay's own
    pool of copy connections, per endpoint (never the routes' pool: a
    copy never takes a primary's connection, nor counts in its endpoint's
    LEAST_REQUEST, circuit breakers or ``/clusters``): the newest idle one
    to its endpoint, else a new one. Its answer is read to its end by its
    framing (RFC 9112 6.3: interim 1xx heads skipped; no body after the
    final head of an answer to a HEAD, nor of a 1xx, 204 or 304; else
    ``Content-Length``, ``chunked`` to its last chunk and trailers, else
    the server's close) and thrown away. Then the connection goes back idle
    (**reusable**) unless the answer was close-delimited, was HTTP/1.0, or
    said ``Connection: close``; or its request was HTTP/1.0 (whose server
    closes after it: the copy's head has no ``Connection`` line); or the
    final head is one whose framing the relay does not read (a
    malformed or over-long head, several ``Content-Length`` lines, a
    transfer coding other than ``chunked`` alone, a bad chunk): such a
    copy ends at that point with its head's status, and its connection is
    reset. Idle copy connections: at most :data:`MIRROR_MAX_IDLE` per
    endpoint (the copy that would be one more closes its connection),
    closed after the relay's pool idle timeout, and one that turns readable
    or is hung up while idle (the server closed it) is closed at once,
    never handed out. An endpoint the route table no longer names (a pod a
    reload removed: the relay's ``retain_endpoints``, at the moment it
    drains the routes' pool) gives back its idle copy connections at once,
    and a copy in flight to it closes its connection at its end instead of
    leaving it idle, as the routes' pool does with a removed endpoint's
    (Envoy drains a removed host's pools); named again before that end, it
    goes idle as before. A mirror taken off a route whose endpoints the
    table still names (its service's, another route's) keeps its idle copy
    connections until the idle timeout, as Envoy keeps a cluster's pools
    while its hosts remain. A copy on a reused connection whose send fails,
    or whose connection is reset or closed before any byte of its answer
    came, goes once more on a new connection (Envoy's rule for a pooled
    connection), and that try is the copy (its end reported, its deadline
    still the first's). The copy ends: at its answer's end (its connection
    idle again or closed), at the server's close (an answer cut short, or
    none), once :data:`MIRROR_READ_LIMIT` bytes of its answer were read
    (its connection reset, and done: the rest is of no interest, and an
    endless answer costs no more), or fails at a connect, send or receive
    error or at its deadline (its connection reset): the route's timeout
    from the copy's start, or :data:`MIRROR_TIMEOUT` when the route has
    none. The relays count idle copy connections in ``stats()`` as
    ``mirror_idle``, and the connections they opened for copies as
    ``mirror_connects``.

    Every copy drawn is started (``mirrored``) or counted as dropped
    (``mirror_dropped``), but for the cases below that are neither. Dropped:
    a request whose bytes as sent are over the relay's replay limit
    (64 KiB) or whose body was spliced; one whose answer began before it
    was read whole; one whose body was not all read and sent when the relay
    gave it up (no try took it, its primary failed before its end); one
    that becomes a tunnel (Upgrade, CONNECT); a draw while the relay
    already has its most copies in flight (``max_mirrors``); a mirror with
    no endpoint, or none resolved; a copy whose socket or connect fails at
    once. Never mirrored, and not counted: a request answered locally
    before any try (its route's answer, a fault's abort, none of its
    destination's endpoints); a retry of one (its copy went once); a
    request its client cut (or left) before it was read whole, or left
    before any try took it (during a connect or a fault's delay); a
    request still waiting when the relay closes. A fault's
    delay holds its copy back with it. The relays count ``mirrored``
    (copies started), ``mirror_dropped`` and ``mirror_failed`` in
    ``stats()``, and ``mirror_active`` in flight.

    Every copy started is reported once when it ends, as a request is (the
    relay's ``report`` callback, or a row of the compiled relay's
    ``report_rows``), with ``tag``: the status of its answer's first final
    head as :class:`AnswerStatus` reads it (0: none came before the copy
    ended, or the answer was not HTTP/1.x), and the seconds it took. A copy
    dropped, or still in flight when the relay closes, is not reported. Its
    seconds run from its start (the connection taken, idle or new) to its
    end. The worker tags every mirror (a
    :class:`~l4proxy.rules.routing.MirrorTag`: its copies' rows are a metric
    family of their own); a relay reports a copy of a Mirror without a tag
    with ``None``, as a request's. The copies' reports are what the mirror's
    own sidecar would report in a mesh (Istio's ``reporter="destination"``):
    the only account of how the mirrored version answers.

    ``balance_key`` names the round-robin counter, as a
    :class:`Choice`'s does. ``endpoint_tags``: as a :class:`Choice`'s, a
    tag per endpoint where the mirror's endpoints differ in version (empty
    where they do not; parallel to ``endpoints``, else the verdict is
    refused as a Choice's is): a copy is reported with the tag of the endpoint it
    went to (drawn with the request; its retry on a new connection goes to
    the same one), as the mirror's own sidecar labels its requests by
    itself; one dropped is not reported."""

    endpoints: tuple[Endpoint, ...]
    ppm: int = MIRROR_SCALE
    balance_key: Hashable = None
    tag: Hashable = None
    endpoint_tags: tuple[Hashable, ...] = ()  # () or one per endpoint (a mixed destination)


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
    ``upstream request timeout``, or cuts a response that began. ``retry``:
    the route's retry policy (None: the relay's own retries only).
    ``local_headers``: more header lines of the ``local`` answer (a
    redirect's ``location``), each a lowercase name and a value without CR,
    LF or NUL. ``fault``: the route's fault injection (None: none).
    ``mirrors``: where copies of its requests also go, each drawn on its
    own (:class:`Mirror`; none for a ``local`` answer). ``session``: the
    route's session persistence (:class:`SessionPersistence`; None: none):
    a request whose token names an endpoint of ``choices`` goes there
    instead of being drawn. ``decided``: the ``local`` answer is a route's
    (a redirect, a direct response, a preflight's, the 404 of no route
    matched): ``l4proxy_decisions_total`` counts each request it answers
    under ``tag``, as a choice's requests are counted under the choice's;
    a refusal before any route (no route of an Ingress, REGISTRY_ONLY) is
    no decision.
    """

    choices: tuple[Choice, ...] = ()
    local: tuple[int, str] | None = None
    tag: Hashable = None
    ttl: float = 1.0
    shape: int = SHAPE_FULL
    tests: tuple[RequestTest, ...] = ()
    timeout: float = 0.0
    retry: RetryPolicy | None = None
    local_headers: tuple[Header, ...] = ()
    fault: Fault | None = None
    mirrors: tuple[Mirror, ...] = ()
    session: SessionPersistence | None = None
    decided: bool = False

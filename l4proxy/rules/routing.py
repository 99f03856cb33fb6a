"""The one routing model, and sans-IO route selection.

Every rule kind the loader reads (RouteRule, VirtualService + DestinationRule,
ServiceEntry, Ingress) compiles into one :class:`RouteTable`; this module knows
nothing about YAML, files or sockets.

Theory of operation
-------------------
A table holds:

* **services**, keyed by FQDN host (``bootcamp.default.svc.cluster.local``).
  A :class:`Service` has ports, VIP addresses, aliases (the names a Host header
  may use) and, per service port, the endpoints that serve it.
* **routes**, per destination host, in evaluation order (RouteRules sorted by
  precedence, VirtualService routes in list order). A :class:`Route` has OR'ed
  :class:`Match` blocks (none = catch-all) and weighted :class:`Destination`\\ s,
  each naming a :class:`Subset` (a label selector plus its load-balancing policy).
* **ingress paths** for gateway mode: Ingress paths, and one catch-all path per
  Gateway API listener or Istio Gateway server (and hostname) whose service is
  a *gateway service* (``role="gateway"``): a host with no endpoints of its
  own whose routes are the attached HTTPRoutes' rules or the bound
  VirtualServices' http routes, so a gateway connection is routed in two
  steps (listener and Host → gateway service → its first matching route).

:meth:`RouteTable.decide` walks the destination host's routes; the first route
whose match accepts the request picks one destination *at random by weight*
(as Envoy does per request), then the subset's policy orders that subset's
endpoints (its policy on the target's service port, where a DestinationRule's
``portLevelSettings`` names that port: :meth:`Subset.on_port`). No matching
route means round robin over every endpoint of the service, which is the
tutorial's "no rule" 2:1 split over two v1 pods and one v2 pod (RouteRule's
rule), unless the host is *unmatched-refusing*: a
VirtualService's or an HTTPRoute's host (and every gateway service), whose
request no route matches is answered 404 (Envoy's NR; the Gateway API's
"MUST be 404"). That holds on the ports and for the callers some ``http``
route of the host can apply to (its match blocks' ``port`` and
``sourceLabels``): elsewhere, as in Istio, the host has no route
configuration of its own and keeps the round robin; so do raw connections.
Each kind of route has its ports, as Istio's listeners do: a ``tcp`` route
never applies on an HTTP port (Istio's HTTP listener has the ``http``
routes alone), and an ``http`` route applies on a TCP port of a service
with HTTP ports only where it names that port (:meth:`RouteTable._match`).

A route may also change what it forwards, and :meth:`RouteTable.choices`
and :meth:`RouteTable.decide` say how, per destination: its header edits and
its destination's merged as Envoy applies Istio's lists (``_edits.compose``:
one destination's set wins over its route's, with several the route's
wins), its Host rewrite, and its path rewrite with the ``strip`` of the
match block that took the request (:class:`UriRewrite`), the same for every
request a relay's verdict applies to (they pass the same shape tests, so
the same block). A route may answer itself instead (:class:`LocalAnswer`):
a direct response, or a :class:`Redirect` whose ``location`` is built from
the request (``per_request`` where it keeps the request's path, query or
Host, so no verdict caches it). A route may also inject faults
(:class:`~l4proxy.dataplane.verdict.Fault`: a delay, an abort): both methods
carry the matched route's for the relay to draw per request (``decide()``
none for a raw connection: nothing is injected at L4). And it may mirror
its requests (:class:`MirrorPolicy`: a VirtualService's ``mirror`` or
``mirrors``, an HTTPRoute's ``RequestMirror``): both methods resolve each
mirror's destination to its endpoints as a destination's
(:class:`~l4proxy.dataplane.verdict.Mirror`), for a request that goes
upstream only (none on a route's own answer, nor for a raw connection).
A route's CORS policy (:class:`CorsPolicy`) answers a preflight from an
allowed Origin itself, after its fault (drawn first: Istio puts Envoy's
fault filter before the CORS filter) and before its own answer, and sets the
Access-Control-* lines of an allowed Origin's response over its edits;
the Origin and Access-Control-Request-Method are then key headers of its
host's verdicts (:meth:`RouteTable.match_headers`), so that each Origin is
decided, and cached, on its own. A route's session persistence
(:class:`~l4proxy.dataplane.verdict.SessionPersistence`, an HTTPRoute
rule's ``sessionPersistence``) comes with its destinations for the relay
(the cookie's Path from the block that matched: :func:`session_cookie_path`);
:meth:`RouteTable.decide` honours a request's token itself: the
destination that has the endpoint it names (among the healthy ones, as
:meth:`RouteTable.choices` gives them) instead of the weighted draw, and
that endpoint first.

The only mutable state is load-balancer state: round-robin counters per
(host, port, subset) and the RNG. It lives in the table, so a reload (a new
table) starts counters afresh, and it is excluded from equality: two tables
built from equivalent input compare equal whatever traffic they have seen.
Decisions are synchronous and never block; a table is used by one event loop.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import random
import re
import string
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple

from l4proxy.dataplane.verdict import (
    HASH_SOURCE_IP,
    MIRROR_SCALE,
    SESSION_HEADER,
    Fault,
    HashOn,
    HeadEdits,
    Mirror,
    PathRewrite,
    SessionPersistence,
    cookie_value,
    endpoint_hash,
    hash_key,
    hash_order,
    rr_salt,
    rr_start,
    session_token,
)
from l4proxy.rules._edits import DEFAULT_PORTS, compose, location
from l4proxy.rules._regex import Pattern, compile_regex, global_replace

__all__ = [
    "HTTP_PROTOCOLS",
    "LB_POLICIES",
    "NO_HEALTHY_STATUS",
    "NO_ROUTE",
    "NO_ROUTE_STATUS",
    "SIMPLE_POLICIES",
    "CorsPolicy",
    "Decision",
    "Destination",
    "Endpoint",
    "HttpRetry",
    "IngressPath",
    "Labels",
    "LocalAnswer",
    "Match",
    "MirrorPolicy",
    "OutlierPolicy",
    "PoolSettings",
    "Redirect",
    "Request",
    "RequestShape",
    "RequestTest",
    "Route",
    "RouteTable",
    "Service",
    "ServicePort",
    "StringMatch",
    "Subset",
    "UriRewrite",
]

# A DestinationRule's loadBalancer.simple policies; LB_POLICIES adds "HASH",
# its consistentHash (Subset.hash_on: what each request is hashed on)
SIMPLE_POLICIES = ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM")
LB_POLICIES = (*SIMPLE_POLICIES, "HASH")
# Application protocols whose traffic is HTTP/1.x or h2 and therefore gets L7
# routing. GRPC and HTTP2 are listed because the peek falls back to L4 routing
# by itself when the bytes are not HTTP/1.x.
HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC"})
DEFAULT = "default"  # route name when no rule matched; subset name of "all endpoints"
# Route name of a request no route of an unmatched-refusing host matched (not
# a DNS name, so no rule's name); answered NO_ROUTE_STATUS.
NO_ROUTE = "no_route"
NO_ROUTE_STATUS = 404
# What a gateway service's host begins with (``gateway:NS/GW/LISTENER/HOST``,
# a Gateway listener's or an Istio Gateway server's name; not a DNS name):
# a host of no endpoint, no destination (is_gateway_host)
GATEWAY_HOST_PREFIX = "gateway:"


def is_gateway_host(host: str) -> bool:
    """Whether *host* is a gateway service's (:data:`GATEWAY_HOST_PREFIX`),
    not a destination's."""
    return host.startswith(GATEWAY_HOST_PREFIX)


# The answer when a destination has endpoints but its outlier detection
# ejected every one (Envoy's "no healthy upstream"), whatever the route's
# unresolved_status (a Gateway API route's 500 is for a backend with none).
NO_HEALTHY_STATUS = 503

# One thing a route reads of a request, as a test a relay can evaluate
# without this module: (kind, value). Kinds, over an origin-form target whose
# *path* is the target up to its first "?" or "#":
#   "target_prefix"  the whole target starts with value (Istio's uri prefix)
#   "exact"          the path is value
#   "path_prefix"    the path starts with value (Ingress StringPrefix)
#   "segments"       the path is value or starts with value + "/" (whole
#                    path elements: Kubernetes Prefix, Gateway API PathPrefix)
# and over a header (value "name:match"; its value as request_headers()
# joins its lines, OWS trimmed; absent: never passed):
#   "header_exact"   the header's value is match
#   "header_prefix"  the header's value starts with match
# l4proxy.dataplane.verdict.request_bits evaluates them.
RequestTest = tuple[str, str]


class RequestShape(NamedTuple):
    """What besides Host routing a request reads (:meth:`RouteTable.request_shape`).

    ``tests``: the target, and the headers matched exactly or by prefix, are
    read only through these tests, so requests that pass the same ones are
    routed alike (``()``: neither is read); None: some route reads the target
    otherwise (a regex, query parameters). ``headers``: some route reads
    headers otherwise (a regex; with ``tests`` None, any header match), so
    their values matter.
    """

    tests: tuple[RequestTest, ...] | None
    method: bool
    headers: bool

    def merged(self, other: RequestShape) -> RequestShape:
        method = self.method or other.method
        if self.tests is None or other.tests is None:
            reads = any(
                k.startswith("header_") for k, _ in (*(self.tests or ()), *(other.tests or ()))
            )
            return RequestShape(None, method, self.headers or other.headers or reads)
        tests = tuple(dict.fromkeys((*self.tests, *other.tests)))
        return RequestShape(tests, method, self.headers or other.headers)


class Labels(Mapping[str, str]):
    """An immutable, hashable label set (``{"app": "bootcamp", "version": "v1"}``)."""

    __slots__ = ("_dict", "_key")

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._dict: dict[str, str] = dict(items)
        self._key: tuple[tuple[str, str], ...] = tuple(sorted(self._dict.items()))

    def __getitem__(self, key: str) -> str:
        return self._dict[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._dict)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Labels):
            return self._key == other._key
        if isinstance(other, Mapping):
            return self._dict == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Labels({self._dict!r})"

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self._key)

    def selects(self, labels: Mapping[str, str]) -> bool:
        """True if *labels* has every label of this selector (a subset match)."""
        return all(labels.get(k) == v for k, v in self._key)


NO_LABELS = Labels()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address:port that serves a service port; ``port`` is the target port."""

    address: str
    port: int
    labels: Mapping[str, str] = NO_LABELS

    def __post_init__(self) -> None:
        if not isinstance(self.labels, Labels):
            object.__setattr__(self, "labels", Labels(self.labels))

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "port": self.port, "labels": dict(self.labels)}


@dataclass(frozen=True, slots=True)
class ServicePort:
    number: int
    name: str
    protocol: str = "TCP"

    @property
    def is_http(self) -> bool:
        """Whether the proxy peeks the request head on this port (L7 routing)."""
        return self.protocol.upper() in HTTP_PROTOCOLS

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "name": self.name,
            "protocol": self.protocol,
            "http": self.is_http,
        }


@dataclass(frozen=True)
class Service:
    """A destination host and what serves it.

    ``port_endpoints`` pairs each service port number with the endpoints that
    serve it (a ServiceEntry endpoint may map ports by name, so the target port
    differs per service port). :attr:`endpoints` is their union in order.
    """

    host: str
    ports: tuple[ServicePort, ...] = ()
    port_endpoints: tuple[tuple[int, tuple[Endpoint, ...]], ...] = ()
    addresses: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    resolution: str = "STATIC"
    # "gateway": a Gateway API listener's or an Istio Gateway server's routes
    # (no endpoints, no names, no VIP; reached only through an ingress path).
    # See the module docstring.
    role: Literal["service", "gateway"] = "service"

    @classmethod
    def create(
        cls,
        host: str,
        ports: Sequence[ServicePort],
        endpoints: Sequence[Endpoint],
        *,
        addresses: Sequence[str] = (),
        aliases: Sequence[str] = (),
        resolution: str = "STATIC",
    ) -> Service:
        """A service whose every port is served by *endpoints* on their ``port``.

        Convenient for single-port services; the loader builds ``port_endpoints``
        itself for multi-port entries.
        """
        per_port = tuple((p.number, tuple(endpoints)) for p in ports)
        return cls(host, tuple(ports), per_port, tuple(addresses), tuple(aliases), resolution)

    def __hash__(self) -> int:
        return hash(self.host)

    def port(self, number: int) -> ServicePort | None:
        for p in self.ports:
            if p.number == number:
                return p
        return None

    def port_by_name(self, name: str) -> ServicePort | None:
        for p in self.ports:
            if p.name == name:
                return p
        return None

    def endpoints_for(self, port: int) -> tuple[Endpoint, ...]:
        for number, eps in self.port_endpoints:
            if number == port:
                return eps
        return ()

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        seen: dict[Endpoint, None] = {}
        for _, eps in self.port_endpoints:
            for ep in eps:
                seen.setdefault(ep, None)
        return tuple(seen)

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "aliases": list(self.aliases),
            "addresses": list(self.addresses),
            "resolution": self.resolution,
            "role": self.role,
            "ports": [p.to_json() for p in self.ports],
            "endpoints": {
                str(number): [ep.to_json() for ep in eps] for number, eps in self.port_endpoints
            },
        }


MatchKind = Literal["exact", "prefix", "regex", "path_prefix", "present"]


@dataclass(frozen=True)
class StringMatch:
    """Istio's StringMatch. ``regex`` must match the whole value (Envoy semantics).

    ``path_prefix`` is the Gateway API's PathPrefix: whole path elements, a
    trailing ``/`` ignored (``/a`` matches ``/a`` and ``/a/b``, not ``/ab``).
    ``present`` (no value) is Envoy's present_match, what Istio makes of an
    empty match (``x-canary: {}``) or the regex ``*``: the header or query
    parameter is there, whatever its value.
    """

    kind: MatchKind
    value: str
    _pattern: Pattern | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind == "regex" and self._pattern is None:
            object.__setattr__(self, "_pattern", compile_regex(self.value))

    def matches(self, s: str | None) -> bool:
        if s is None:
            return False
        if self.kind == "present":
            return True
        if self.kind == "exact":
            return s == self.value
        if self.kind == "prefix":
            return s.startswith(self.value)
        if self.kind == "path_prefix":
            base = self.value.rstrip("/")
            return s == base or s.startswith(base + "/")
        assert self._pattern is not None
        return self._pattern.fullmatch(s) is not None

    def header_test(self, name: str) -> RequestTest | None:
        """This match of header *name* as a :data:`RequestTest`; None for a
        regex. Presence is the empty prefix (an absent header passes no test)."""
        if self.kind in ("exact", "prefix"):
            return (f"header_{self.kind}", f"{name}:{self.value}")
        if self.kind == "present":
            return ("header_prefix", f"{name}:")
        return None

    def matches_ignoring_case(self, s: str) -> bool:
        """:meth:`matches` with ASCII letters of either case alike, for an
        exact or prefix URI match under ``ignoreUriCase`` (Envoy's
        ``case_sensitive: false``, which leaves a regex as it is)."""
        if self.kind not in ("exact", "prefix"):
            return self.matches(s)
        low = self.value.translate(_ASCII_LOWER)
        got = s.translate(_ASCII_LOWER)
        return got == low if self.kind == "exact" else got.startswith(low)

    def path_test(self) -> RequestTest | None:
        """This match of a URI as a :data:`RequestTest` (:meth:`Match.matches`
        compares exact and path_prefix without the query, a prefix against
        the whole target); None for a regex."""
        if self.kind == "exact":
            return ("exact", self.value)
        if self.kind == "prefix":
            return ("target_prefix", self.value)
        if self.kind == "path_prefix":
            return ("segments", self.value.rstrip("/"))
        return None

    def to_json(self) -> dict[str, str]:
        return {self.kind: self.value}


@dataclass(frozen=True)
class Request:
    """What the peek learned from an HTTP request head. Header names lowercase."""

    method: str = "GET"
    path: str = "/"
    authority: str = ""
    scheme: str = "http"
    headers: Mapping[str, str] = field(default_factory=dict)
    # the client's packed address (the relay's peer_of), what a consistent
    # hash on the source IP reads; None: unknown
    source: bytes | None = None

    def __post_init__(self) -> None:
        if any(k != k.lower() for k in self.headers):
            object.__setattr__(self, "headers", {k.lower(): v for k, v in self.headers.items()})


def request_headers(fields: Iterable[tuple[str, str]]) -> dict[str, str]:
    """A head's header fields (lowercase names, in order, repeats kept) as
    :attr:`Request.headers` holds them, each name once: a name sent on
    several lines has their values joined, with ``,`` (RFC 9110 5.3), as
    Envoy's header matchers read them (``getAllOfHeaderAsString``), so a
    header a client repeats is matched whole, never by its last line alone.

    ``cookie`` lines are joined with ``; `` instead, as RFC 9113 8.2.3
    joins the cookie fields of a request into one line (Envoy's HTTP/2
    codec does): a cookie match then finds a cookie whichever line carried
    it. Envoy's HTTP/1 codec keeps them apart and its matcher joins them
    with ``,``, where a regex written for one Cookie line (Istio's
    ``^(.*?;)?(user=jason)(;.*)?$``) misses a cookie of a second line; a
    user agent sends one line (RFC 6265 5.4), intermediaries more.

    Linear in the lines (each name's values gathered, joined once)."""
    values: dict[str, list[str]] = {}
    for name, value in fields:
        got = values.get(name)
        if got is None:
            values[name] = [value]
        else:
            got.append(value)
    return {
        name: vs[0] if len(vs) == 1 else ("; " if name == "cookie" else ",").join(vs)
        for name, vs in values.items()
    }


def _query_params(target: str) -> dict[str, str]:
    """The request target's query parameters, first value of each name, as
    sent: split on ``&`` and each at its first ``=`` (none: the value is
    empty), nothing percent-decoded and ``+`` left a plus, as Envoy's
    query parameter match reads them (``parseQueryString``, not the
    decoding one). ``tag=c%2B%2B`` is not ``c++``."""
    q = target.find("?")
    if q == -1:
        return {}
    query = target[q + 1 :].split("#", 1)[0]
    out: dict[str, str] = {}
    for param in query.split("&"):
        if param:
            name, _, value = param.partition("=")
            out.setdefault(name, value)
    return out


# ASCII letters to lowercase, nothing else (Envoy's case-insensitive path
# compare folds ASCII only)
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _strip_query(path: str) -> str:
    cut = len(path)
    for sep in "?#":
        i = path.find(sep)
        if i != -1 and i < cut:
            cut = i
    return path[:cut]


@dataclass(frozen=True)
class Match:
    """One match block: every condition set here must hold (AND)."""

    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()
    source_labels: Labels = NO_LABELS
    port: int | None = None
    # Query parameters (Gateway API, VirtualService queryParams): name (exact,
    # case-sensitive) → match of its first value in the request target's query.
    query: tuple[tuple[str, StringMatch], ...] = ()
    # VirtualService withoutHeaders: the request matches only if none of
    # these does, an absent header read as empty (Envoy's invert_match with
    # treat_missing_header_as_empty, as Istio configures it; a presence
    # match inverted: the header is absent).
    without_headers: tuple[tuple[str, StringMatch], ...] = ()
    # VirtualService ignoreUriCase: an exact or prefix uri compares ASCII
    # letters of either case alike (a regex as written); only with a uri.
    ignore_uri_case: bool = False

    @property
    def needs_request(self) -> bool:
        """True if this block looks at the HTTP request (so never matches raw TCP)."""
        return bool(
            self.uri
            or self.scheme
            or self.method
            or self.authority
            or self.headers
            or self.query
            or self.without_headers
        )

    def header_tests(self) -> Iterator[tuple[str, RequestTest | None]]:
        """(name, test) for each header this block reads, headers and
        withoutHeaders alike (the inverted result is a function of the same
        test's outcome); test None where the outcome is not enough: a regex,
        or an inverted exact match of the empty value (absent and ``x`` fail
        it alike, yet the absent header, read as empty, matches it)."""
        for name, sm in self.headers:
            yield name, sm.header_test(name)
        for name, sm in self.without_headers:
            empty = sm.kind == "exact" and not sm.value
            yield name, None if empty else sm.header_test(name)

    def matches(self, port: int, request: Request | None, source: Mapping[str, str]) -> bool:
        if self.port is not None and self.port != port:
            return False
        if not self.source_labels.selects(source):
            return False
        if not self.needs_request:
            return True
        if request is None:
            return False
        if self.uri is not None:
            # Envoy compares exact and regex paths without the query string,
            # a prefix against the whole :path.
            path = request.path if self.uri.kind == "prefix" else _strip_query(request.path)
            if self.ignore_uri_case:
                if not self.uri.matches_ignoring_case(path):
                    return False
            elif not self.uri.matches(path):
                return False
        if self.query:
            params = _query_params(request.path)
            if not all(m.matches(params.get(name)) for name, m in self.query):
                return False
        if self.scheme is not None and not self.scheme.matches(request.scheme):
            return False
        if self.method is not None and not self.method.matches(request.method):
            return False
        if self.authority is not None and not self.authority.matches(request.authority):
            return False
        if not all(m.matches(request.headers.get(name)) for name, m in self.headers):
            return False
        return not any(
            m.matches(request.headers.get(name, None if m.kind == "present" else ""))
            for name, m in self.without_headers
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("uri", "scheme", "method", "authority"):
            m: StringMatch | None = getattr(self, key)
            if m is not None:
                out[key] = m.to_json()
        if self.headers:
            out["headers"] = {name: m.to_json() for name, m in self.headers}
        if self.query:
            out["query"] = {name: m.to_json() for name, m in self.query}
        if self.without_headers:
            out["without_headers"] = {name: m.to_json() for name, m in self.without_headers}
        if self.ignore_uri_case:
            out["ignore_uri_case"] = True
        if self.source_labels:
            out["source_labels"] = dict(self.source_labels)
        if self.port is not None:
            out["port"] = self.port
        return out


# The largest maxRequestsPerConnection Istio takes (its API: "up to 2^29")
MAX_REQUESTS_PER_CONNECTION: Final = 2**29


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """A DestinationRule's ``trafficPolicy.connectionPool``, as the sidecar
    applies it to the upstream connection pool of each endpoint (per
    worker). None: not set; for the first three, the sidecar's flag
    (``l4proxy run --pool-max-requests``, ``--pool-idle-timeout``,
    ``--connect-timeout``).

    ``max_requests``: ``http.maxRequestsPerConnection``, requests a
    connection carries before it is closed (0: unlimited, Istio's default;
    1: no reuse). ``idle_timeout``: ``http.idleTimeout``, seconds a pooled
    connection may stay idle. ``connect_timeout``: ``tcp.connectTimeout``,
    seconds a connect may take.

    Istio's circuit breakers, which no flag sets (None: unlimited):
    ``max_connections``: ``tcp.maxConnections``, connections open to the
    endpoint at once (a request beyond waits pending for one);
    ``max_pending``: ``http.http1MaxPendingRequests``, requests waiting
    for a connection at once; ``max_active``: ``http.http2MaxRequests``,
    requests in flight at once. A request beyond the pending or active
    limit is answered 503 at once (Envoy's overflow).
    """

    max_requests: int | None = None
    idle_timeout: float | None = None
    connect_timeout: float | None = None
    max_connections: int | None = None
    max_pending: int | None = None
    max_active: int | None = None
    # pool_settings()' per endpoint only: the fields that a destination
    # without them also reaches the endpoint with, whose value is therefore
    # this one or the sidecar's flag, whichever is the stricter
    or_flag: frozenset[str] = frozenset()

    @property
    def is_set(self) -> bool:
        """Whether any setting is set."""
        return any(getattr(self, name) is not None for name in POOL_FIELDS)

    def strictest(self, other: PoolSettings) -> PoolSettings:
        """Both settings at once, field by field: a set value beats an unset
        one (for the circuit breakers too: a limit beats none); of two set
        values the smaller (``max_requests`` 0, unlimited, counts as the
        largest). Commutative and associative, so the merge of many does
        not depend on their order."""
        mr = self.max_requests
        if other.max_requests is not None and (
            mr is None or mr == 0 or (other.max_requests != 0 and other.max_requests < mr)
        ):
            mr = other.max_requests
        return PoolSettings(
            mr,
            _smaller(self.idle_timeout, other.idle_timeout),
            _smaller(self.connect_timeout, other.connect_timeout),
            _smaller_int(self.max_connections, other.max_connections),
            _smaller_int(self.max_pending, other.max_pending),
            _smaller_int(self.max_active, other.max_active),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {_POOL_JSON_NAMES[n]: getattr(self, n) for n in POOL_FIELDS}
        if self.or_flag:
            out["or_flag"] = sorted(_POOL_JSON_NAMES[f] for f in self.or_flag)
        return out

    def resolved(self, flags: PoolSettings) -> PoolSettings:
        """With the sidecar's *flags* (every field that has a flag set) for
        what is not set, and the stricter of this and the flag where
        :attr:`or_flag` says so: what the endpoint's connections use. The
        circuit breakers have no flag (None in *flags*): this one's, or
        unlimited."""
        out = []
        for name in POOL_FIELDS:
            mine, flag = getattr(self, name), getattr(flags, name)
            if mine is None:
                out.append(flag)
            elif name in self.or_flag:
                out.append(getattr(PoolSettings(**{name: mine}).strictest(flags), name))
            else:
                out.append(mine)
        return PoolSettings(*out)


POOL_FIELDS: Final = (
    "max_requests",
    "idle_timeout",
    "connect_timeout",
    "max_connections",
    "max_pending",
    "max_active",
)
# the fields a sidecar flag sets (what a destination that leaves one unset
# reaches an endpoint with): only these can be in or_flag; the circuit
# breakers have none, unset is unlimited, so the merge keeps the limit
FLAGGED_POOL_FIELDS: Final = ("max_requests", "idle_timeout", "connect_timeout")
_POOL_JSON_NAMES: Final = {
    "max_requests": "max_requests_per_connection",
    "idle_timeout": "idle_timeout",
    "connect_timeout": "connect_timeout",
    "max_connections": "max_connections",
    "max_pending": "http1_max_pending_requests",
    "max_active": "http2_max_requests",
}
# Istio's circuit breaker fields are int32 (its pilot sets Envoy's above 0)
MAX_CIRCUIT_BREAKER: Final = 2**31 - 1


NO_POOL_SETTINGS: Final = PoolSettings()


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """A DestinationRule's ``trafficPolicy.outlierDetection``, as the
    sidecar applies it (``l4proxy/rules/health.py``). Each field has
    Istio's (Envoy's) default, so ``OutlierPolicy()`` is what
    ``outlierDetection: {}`` asks for.

    * ``consecutive_5xx``: ``consecutive5xxErrors``; ejected after that many
      5xx in a row (0: off). Counts the application's 5xx responses and,
      unless ``split_local``, the proxy's own gateway failures (failed
      connects, responses that fail) as Envoy counts them (503/504).
    * ``consecutive_gateway``: ``consecutiveGatewayErrors``; the same for
      502, 503 and 504 only (0: off, Istio's default). Another 5xx ends
      its run, as in Envoy.
    * ``split_local``: ``splitExternalLocalOriginErrors``; the proxy's own
      failures then count only towards ``consecutive_local``
      (``consecutiveLocalOriginFailures``, 0: off; the rule's 0 is unset, 5,
      as Istio's pilot).
    * ``interval``: seconds; a span the endpoint stays healthy after an
      ejection takes one ejection off the multiplier (Envoy's sweep).
    * ``base_ejection``: ``baseEjectionTime``, seconds; the n-th ejection
      lasts n times as long, up to :attr:`max_ejection`.
    * ``max_ejection_percent``: ``maxEjectionPercent`` (0 in the rule: unset,
      10, as Istio); the share of each destination's endpoints that may be
      ejected (:meth:`RouteTable.ejection_groups`), counting the one to be,
      with no floor (Envoy since 1.27: with 10, fewer than 10 pods eject
      none).
    * ``min_health_percent``: ``minHealthPercent``, the destination's panic
      threshold: below that share of healthy endpoints it takes them all
      (0, Istio's default: never; every endpoint ejected is 503 ``no
      healthy upstream``).
    """

    consecutive_5xx: int = 5
    consecutive_gateway: int = 0
    split_local: bool = False
    consecutive_local: int = 5
    interval: float = 10.0
    base_ejection: float = 30.0
    max_ejection_percent: float = 10.0
    min_health_percent: float = 0.0

    @property
    def max_ejection(self) -> float:
        """Envoy's max_ejection_time default: 300 s, or the base if longer."""
        return max(300.0, self.base_ejection)

    @property
    def counts_statuses(self) -> bool:
        """Whether the application's 5xx responses count (the relay then
        reports them: ``EndpointSettings.report_5xx``)."""
        return self.consecutive_5xx > 0 or self.consecutive_gateway > 0

    def most_eager(self, other: OutlierPolicy) -> OutlierPolicy:
        """Both policies at once, for an endpoint that destinations with
        each reach (:meth:`RouteTable.outlier_policies`), field by field the
        one that ejects sooner and longer: each counter the smallest that is
        on (0, off, loses to any), ``split_local`` only if both split,
        the shorter ``interval``, the longer ``base_ejection``, the larger
        ``max_ejection_percent`` and ``min_health_percent``. Commutative and
        associative, so the merge of many does not depend on their order."""
        return OutlierPolicy(
            _smallest_on(self.consecutive_5xx, other.consecutive_5xx),
            _smallest_on(self.consecutive_gateway, other.consecutive_gateway),
            self.split_local and other.split_local,
            _smallest_on(self.consecutive_local, other.consecutive_local),
            min(self.interval, other.interval),
            max(self.base_ejection, other.base_ejection),
            max(self.max_ejection_percent, other.max_ejection_percent),
            max(self.min_health_percent, other.min_health_percent),
        )

    def to_json(self) -> dict[str, Any]:
        """Istio's field names, in snake case (``max_ejection_time``: Envoy's,
        :attr:`max_ejection`)."""
        return {
            "consecutive_5xx_errors": self.consecutive_5xx,
            "consecutive_gateway_errors": self.consecutive_gateway,
            "split_external_local_origin_errors": self.split_local,
            "consecutive_local_origin_failures": self.consecutive_local,
            "interval": self.interval,
            "base_ejection_time": self.base_ejection,
            "max_ejection_time": self.max_ejection,
            "max_ejection_percent": self.max_ejection_percent,
            "min_health_percent": self.min_health_percent,
        }

    def healthy_of(
        self, eps: Sequence[Endpoint], healthy: Callable[[Endpoint], bool]
    ) -> tuple[Endpoint, ...]:
        """The endpoints a destination with this policy takes: its healthy
        ones, unless fewer than ``min_health_percent`` of *eps* are (the
        panic threshold: then all of them, Envoy's panic mode). With the
        threshold at 0 (Istio's default) never all: none healthy is none."""
        up = tuple(e for e in eps if healthy(e))
        if len(up) * 100 < self.min_health_percent * len(eps):
            return tuple(eps)
        return up


def _smallest_on(a: int, b: int) -> int:
    """The smaller of two counters, 0 (off) counting as the largest."""
    if a == 0 or b == 0:
        return a or b
    return min(a, b)


def _smaller(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _smaller_int(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


@dataclass(frozen=True)
class Subset:
    """A named label selector over a service's endpoints, with its LB policy
    and the connection pool settings of the connections it opens (its
    DestinationRule subset's ``connectionPool``, else the rule's own), and
    those of its traffic to each service port that the rule's
    ``portLevelSettings`` name (:meth:`on_port`)."""

    name: str
    labels: Labels = NO_LABELS
    load_balancer: str = "ROUND_ROBIN"
    pool: PoolSettings = NO_POOL_SETTINGS
    # its DestinationRule subset's outlierDetection, else the rule's own;
    # None: none (the sidecar's own detection, see health.py)
    outlier: OutlierPolicy | None = None
    # with load_balancer "HASH" (a consistentHash): what each request is
    # hashed on (the subset's own loadBalancer, else the rule's)
    hash_on: HashOn | None = None
    # (service port, this subset as it is on that port) for each port
    # that a DestinationRule's portLevelSettings names, sorted by port:
    # the policy its traffic to that port takes in place of the above
    # (_objects.policy_subset merges them as Istio's pilot does)
    ports: tuple[tuple[int, Subset], ...] = ()

    def on_port(self, port: int) -> Subset:
        """This subset as its traffic to service *port* takes it (the
        target's port, :meth:`RouteTable._target_port`: Istio keys a
        cluster, and so its policy, on the service port)."""
        for number, subset in self.ports:
            if number == port:
                return subset
        return self

    def policy_json(self) -> dict[str, Any]:
        """Its load balancer, consistent hash, connection pool and outlier
        detection, as ``to_json`` of a service or destination has them."""
        return {
            "load_balancer": self.load_balancer,
            "hash_on": hash_on_json(self.hash_on),
            "connection_pool": self.pool.to_json() if self.pool.is_set else None,
            "outlier_detection": self.outlier.to_json() if self.outlier is not None else None,
        }

    def port_level_json(self) -> list[dict[str, Any]]:
        """Each port's own policy (:attr:`ports`), as :meth:`policy_json`
        with its ``port``."""
        return [{"port": number, **subset.policy_json()} for number, subset in self.ports]


# the policy of a host that no DestinationRule sets one for (RouteTable._own)
_NO_POLICY: Final = Subset(DEFAULT)


@dataclass(frozen=True)
class Destination:
    """One weighted choice of a route. ``port`` None: the port that was dialled."""

    host: str
    subset: Subset
    weight: int = 100
    port: int | None = None
    # what it changes in its requests' and responses' heads (a
    # VirtualService's http[].route[].headers, a backendRef's header
    # modifiers); None: nothing. Its route's edits go with them
    # (RouteTable.choices: compose).
    headers: HeadEdits | None = None
    # why none of *host*'s endpoints may serve it, whatever the registry
    # holds ("" none): a Gateway API backend in another namespace that no
    # ReferenceGrant permits. Its share is answered as a host not resolved.
    refused: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "subset": self.subset.name,
            "labels": dict(self.subset.labels),
            **self.subset.policy_json(),
            "port_level": self.subset.port_level_json(),
            "weight": self.weight,
            "port": self.port,
            "headers": edits_json(self.headers),
            **({"refused": self.refused} if self.refused else {}),
        }


@dataclass(frozen=True)
class MirrorPolicy:
    """Where a route also sends a copy of a share of its requests (Envoy's
    request mirror policy): *destination* as a route destination names it
    (host, subset, port; its weight unused), for ``ppm`` /
    :data:`~l4proxy.dataplane.verdict.MIRROR_SCALE` of the requests (a
    VirtualService's ``mirror`` with ``mirrorPercentage``, an entry of its
    ``mirrors``, an HTTPRoute's ``RequestMirror`` filter)."""

    destination: Destination
    ppm: int = MIRROR_SCALE

    def to_json(self) -> dict[str, Any]:
        d = self.destination
        return {
            "host": d.host,
            "subset": d.subset.name,
            "labels": dict(d.subset.labels),
            "port": d.port,
            "percent": self.ppm * 100 / MIRROR_SCALE,
            **({"refused": d.refused} if d.refused else {}),
        }


def version_and_workload(host: str, subset: str, endpoints: Sequence[Endpoint]) -> tuple[str, str]:
    """The ``destination_version`` and ``destination_workload`` of a
    subset's requests, as Istio's metrics label them: its endpoints'
    ``version`` label (else the subset's name, else ``unknown``), and
    ``APP-VERSION`` (``app`` label, else the host's first name). Of one
    endpoint: the labels of the requests that endpoint answered.

    Endpoints whose ``version`` labels differ (:func:`versions_differ`: a
    route to every pod of a service whose versions share it, no rule, a
    rolling update) are ``unknown`` and ``unknown``: no one version may
    take the others' answers (counted per choice, v3's 500s were v1's and
    a healthy canary rolled back). That is the label of such a choice's
    requests that no endpoint answered (none reached, a circuit breaker's,
    a fault's abort); the others are labelled by the endpoint of their
    last try, as Istio labels a request by the pod that answered:
    :func:`endpoint_versions`, the relays' ``Choice.endpoint_tags``."""
    labels = endpoints[0].labels if endpoints else {}
    if versions_differ(endpoints):
        return "unknown", "unknown"
    version = labels.get("version", subset or "unknown")
    return version, f"{labels.get('app', host.split('.', 1)[0])}-{version}"


def versions_differ(endpoints: Sequence[Endpoint]) -> bool:
    """Whether *endpoints* differ in their ``version`` label (one without
    it differs from one with it): a destination whose requests are
    labelled per endpoint."""
    if len(endpoints) < 2:
        return False
    first = endpoints[0].labels.get("version")
    return any(e.labels.get("version") != first for e in endpoints)


def endpoint_versions(
    host: str, subset: str, endpoints: Sequence[Endpoint], of: Sequence[Endpoint] | None = None
) -> tuple[tuple[str, str], ...]:
    """Where *endpoints* differ in version, :func:`version_and_workload` of
    each endpoint of *of* (default: *endpoints*) alone, in order: the
    labels of the requests each one answers. Empty where they do not
    differ (the common case: every request takes the destination's
    labels, and nothing is built per endpoint). *of*: the endpoints a
    request tries, some of *endpoints* (the first of a decision's)."""
    if not versions_differ(endpoints):
        return ()
    return tuple(
        version_and_workload(host, subset, (e,)) for e in (endpoints if of is None else of)
    )


@dataclass(frozen=True, slots=True)
class MirrorTag:
    """A mirror's ``tag`` (:class:`~l4proxy.dataplane.verdict.Mirror`): what
    its copies' reports carry, the destination its copies went to, in
    Istio's metric labels (a class of its own: never equal to a route
    choice's tag, whose reports are another metric)."""

    service: str  # the mirror destination's host
    route: str  # the route that mirrors
    subset: str
    version: str
    workload: str


# Envoy's CORS filter's names: the request headers it reads, the response
# headers it writes (lowercase, as the relays send header lines)
ORIGIN = "origin"
AC_REQUEST_METHOD = "access-control-request-method"
AC_REQUEST_HEADERS = "access-control-request-headers"
CORS_KEY_HEADERS = frozenset({ORIGIN, AC_REQUEST_METHOD})
PREFLIGHT_STATUS = 200


@dataclass(frozen=True)
class CorsPolicy:
    """A route's CORS policy (a VirtualService's ``corsPolicy``, an
    HTTPRoute rule's ``CORS`` filter) as Envoy's CORS filter applies it
    (``source/extensions/filters/http/cors/cors_filter.cc``), with Istio's
    translation (``TranslateCORSPolicy``): the lists joined with ``,``,
    ``max_age`` whole seconds as text ("" none).

    An Origin is allowed when some of ``origins`` matches it or matches
    ``*`` (so ``exact: "*"`` allows every Origin, and so does a regex such
    as ``.*``); the answers echo the request's Origin, never ``*``.
    ``forward_unmatched``: a preflight from an Origin not allowed goes
    upstream untouched (Istio's ``unmatchedPreflights: FORWARD``, the
    default); False (``IGNORE``): it is answered 200 without
    ``access-control-allow-origin``, as Envoy's filter answers it."""

    origins: tuple[StringMatch, ...]
    allow_methods: str = ""
    allow_headers: str = ""
    expose_headers: str = ""
    max_age: str = ""
    allow_credentials: bool = False
    forward_unmatched: bool = True

    def allows(self, origin: str) -> bool:
        return any(m.matches("*") or m.matches(origin) for m in self.origins)

    def preflight(self, request: Request) -> LocalAnswer | None:
        """The filter's own answer to *request* (None: it goes on, to the
        route and upstream, :meth:`response_lines` added if allowed): a
        preflight (OPTIONS, a non-empty Origin and
        Access-Control-Request-Method) from an allowed Origin, or from any
        Origin when not ``forward_unmatched``. 200, no body; its lines in
        Envoy's order. ``allow_methods`` ``*`` echoes the requested method,
        ``allow_headers`` ``*`` the requested headers (then the answer is
        per request: that header is no key of the relay's cache; none
        requested, no line, where Envoy sends an empty one)."""
        origin = request.headers.get(ORIGIN, "")
        method = request.headers.get(AC_REQUEST_METHOD, "")
        if request.method != "OPTIONS" or not origin or not method:
            return None
        allowed = self.allows(origin)
        if not allowed and self.forward_unmatched:
            return None
        lines: list[tuple[str, str]] = []
        if allowed:
            lines.append(("access-control-allow-origin", origin))
        if self.allow_credentials:
            lines.append(("access-control-allow-credentials", "true"))
        if self.allow_methods:
            value = method if self.allow_methods == "*" else self.allow_methods
            lines.append(("access-control-allow-methods", value))
        if self.allow_headers:
            value = self.allow_headers
            if value == "*":
                value = request.headers.get(AC_REQUEST_HEADERS, "")
            if value:
                lines.append(("access-control-allow-headers", value))
        if self.max_age:
            lines.append(("access-control-max-age", self.max_age))
        return LocalAnswer(
            PREFLIGHT_STATUS, "", tuple(lines), per_request=self.allow_headers == "*"
        )

    def response_lines(self, request: Request | None) -> tuple[tuple[str, str], ...]:
        """What the filter sets in the response to *request* that it let
        through (its encodeHeaders): none without an allowed Origin."""
        origin = request.headers.get(ORIGIN, "") if request is not None else ""
        if not origin or not self.allows(origin):
            return ()
        lines = [("access-control-allow-origin", origin)]
        if self.allow_credentials:
            lines.append(("access-control-allow-credentials", "true"))
        if self.expose_headers:
            lines.append(("access-control-expose-headers", self.expose_headers))
        return tuple(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "allow_origins": [m.to_json() for m in self.origins],
            "allow_methods": self.allow_methods,
            "allow_headers": self.allow_headers,
            "expose_headers": self.expose_headers,
            "max_age": self.max_age,
            "allow_credentials": self.allow_credentials,
            "unmatched_preflights": "FORWARD" if self.forward_unmatched else "IGNORE",
        }


def with_cors_lines(
    edits: HeadEdits | None, lines: tuple[tuple[str, str], ...]
) -> HeadEdits | None:
    """*edits* with the CORS filter's response *lines* over them: Envoy's
    filter sets its headers after the route's response header edits (its
    encodeHeaders sees the router's result), so they replace any line of
    the same name the route set or added."""
    if not lines:
        return edits
    base = edits or HeadEdits()
    names = {n for n, _ in lines}
    return base._replace(
        response_set=(*(h for h in base.response_set if h[0] not in names), *lines),
        response_add=tuple(h for h in base.response_add if h[0] not in names),
    )


def _unserved_edits(
    route: Route, request: Request | None, lines: tuple[tuple[str, str], ...]
) -> HeadEdits | None:
    """The edits of the router's answer to a request that *route* has no
    destination for (every backendRef of weight 0: 500): the route's own
    header edits and the CORS filter's *lines*, as Envoy finalizes the
    direct response a Gateway API implementation gives such a route with
    the route's response header mutations; none for a raw connection,
    which has no head."""
    if request is None:
        return None
    return with_cors_lines(route.headers, lines)


def _answer_with_cors(answer: LocalAnswer, lines: tuple[tuple[str, str], ...]) -> LocalAnswer:
    """A route's own answer (a redirect, a direct response) with the CORS
    filter's *lines*: Envoy's router answers it, and the filter's
    encodeHeaders runs on it as on an upstream's response."""
    if not lines:
        return answer
    names = {n for n, _ in lines}
    kept = tuple(h for h in answer.headers if h[0] not in names)
    return dataclasses.replace(answer, headers=(*kept, *lines))


def hash_on_json(hash_on: HashOn | None) -> dict[str, Any] | None:
    """A consistent hash's policy as JSON (None: not one): ``kind``
    (header, cookie, query, source_ip), ``name``, and for a cookie ``ttl`` (seconds;
    None: never generated) and ``path``."""
    if hash_on is None:
        return None
    out: dict[str, Any] = {"kind": hash_on.kind, "name": hash_on.name}
    if hash_on.kind == "cookie":
        out.update(ttl=hash_on.ttl, path=hash_on.path)
    return out


# Envoy's retry policies (x-envoy-retry-on) that an HTTP/1.1 exchange can
# meet, and those it never can (HTTP/2 stream resets, gRPC statuses, HTTP/3)
# or that need what Istio does not configure (retriable headers, Envoy's
# rate limit service): accepted, with no effect.
RETRY_ON_POLICIES: Final = (
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-4xx",
    "retriable-status-codes",
)
RETRY_ON_NO_OPS: Final = (
    "refused-stream",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
    "reset-before-request",
)
# Istio's policy when a VirtualService gives attempts but no retryOn
# (DefaultPolicy() in pilot's route/retry package), with its status code
ISTIO_DEFAULT_RETRY_ON: Final = (
    "connect-failure",
    "refused-stream",
    "unavailable",
    "cancelled",
    "retriable-status-codes",
)
ISTIO_DEFAULT_RETRY_CODES: Final = (503,)
# Envoy's base interval between retries when none is given (the relays'
# l4proxy.dataplane.verdict.DEFAULT_RETRY_BACKOFF: the same value)
DEFAULT_RETRY_BACKOFF: Final = 0.025


@dataclass(frozen=True)
class HttpRetry:
    """A route's retry policy: a VirtualService's ``http[].retries``
    (Istio's HTTPRetry), as Istio configures Envoy's. ``attempts``: retries
    after the first try (at least 1: ``attempts: 0`` is no policy at all);
    ``per_try_timeout``: seconds a try may take before its response head (0:
    none); ``retry_on``: Envoy's policy names, without the status codes,
    which are in ``codes`` (``retriable-status-codes``); ``backoff``: the
    base interval of Envoy's jittered exponential backoff before each retry
    (seconds; ``backoff``, Envoy's 25 ms by default; the longest wait is 10
    times it); ``ignore_previous_hosts``: a retry prefers an endpoint not
    tried yet (``retryIgnorePreviousHosts``, true by default, as Istio's)."""

    attempts: int
    per_try_timeout: float = 0.0
    retry_on: tuple[str, ...] = ISTIO_DEFAULT_RETRY_ON
    codes: tuple[int, ...] = ISTIO_DEFAULT_RETRY_CODES
    backoff: float = DEFAULT_RETRY_BACKOFF
    ignore_previous_hosts: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "per_try_timeout": self.per_try_timeout,
            "retry_on": list(self.retry_on),
            "codes": list(self.codes),
            "backoff": self.backoff,
            "ignore_previous_hosts": self.ignore_previous_hosts,
        }


def edits_json(edits: HeadEdits | None) -> dict[str, Any] | None:
    """A route's or a destination's header edits as JSON (None: none)."""
    if edits is None:
        return None
    out: dict[str, Any] = {}
    for side in ("request", "response"):
        part = {
            op: getattr(edits, f"{side}_{op}")
            for op in ("set", "add", "remove")
            if getattr(edits, f"{side}_{op}")
        }
        if part:
            out[side] = {
                op: list(v) if op == "remove" else [list(h) for h in v] for op, v in part.items()
            }
    if edits.authority is not None:
        out["authority"] = edits.authority
    return out


@dataclass(frozen=True)
class UriRewrite:
    """How a route rewrites its requests' paths, by the kind of the match
    block that took the request (:meth:`for_match`).

    ``prefix``: a VirtualService's ``rewrite.uri``, Envoy's
    ``prefix_rewrite`` as Istio configures it: *value* replaces what the
    block's uri matched: a ``prefix`` match its prefix; an ``exact`` or
    ``regex`` match the whole path (the query stays); a block without a uri
    match (Istio gives Envoy prefix ``/``) the first ``/`` (``/v2`` on
    ``/a`` sends ``/v2a``: write a prefix match). ``segments``: an HTTPRoute
    URLRewrite's ``ReplacePrefixMatch`` (only with PathPrefix matches): the
    matched path elements are replaced, a trailing ``/`` of either ignored
    (the API's table: ``/foo`` → ``/xyz`` sends ``/foo/bar`` as
    ``/xyz/bar``, ``/foo/`` as ``/xyz/``, ``/foo`` → ``/`` sends ``/foo`` as
    ``/``). ``full``: ``ReplaceFullPath``: the whole path. ``regex``: a
    VirtualService's ``rewrite.uriRegexRewrite``, Envoy's ``regex_rewrite``:
    every match of the RE2 regex *match* in the path (the target up to its
    first ``?``; the query stays) replaced by *value*, its ``\\N`` the
    groups (:func:`~l4proxy.rules._regex.global_replace`), whatever block
    matched (a result that does not begin with ``/`` gets one): the new
    path depends on the request's, so a route with one reads the whole
    target (:meth:`RouteTable.request_shape`), and each path is a verdict
    of its own."""

    kind: Literal["prefix", "segments", "full", "regex"]
    value: str
    match: str = ""  # kind regex: the regex
    _pattern: Pattern | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind == "regex" and self._pattern is None:
            object.__setattr__(self, "_pattern", compile_regex(self.match))

    def for_request(self, match: Match, target: str | None) -> PathRewrite | None:
        """The rewrite of a request to *target* that *match* took (None: a
        regex rewrite of a raw connection, which has no target)."""
        if self.kind != "regex":
            return self.for_match(match)
        if target is None:
            return None
        assert self._pattern is not None
        path = global_replace(self._pattern, self.value, target.split("?", 1)[0])
        # (a result without its leading "/", as "\\1" of "^/(.*)$" gives, is
        # sent with one: an origin-form target, whatever the client's form;
        # Envoy would send it as it is)
        return PathRewrite(-1, path if path.startswith("/") else "/" + path)

    def for_match(self, match: Match) -> PathRewrite:
        uri = match.uri
        if self.kind == "full":
            return PathRewrite(-1, self.value)
        if self.kind == "segments":
            strip = len(uri.value.rstrip("/")) if uri is not None else 0
            return PathRewrite(strip, self.value.rstrip("/"))
        if uri is None:
            return PathRewrite(1, self.value)  # Istio's match: prefix "/"
        if uri.kind == "prefix":
            return PathRewrite(len(uri.value), self.value)
        if uri.kind == "path_prefix":  # (Istio's path_separated_prefix)
            return PathRewrite(len(uri.value.rstrip("/")), self.value)
        return PathRewrite(-1, self.value)  # exact, regex: the whole path

    def to_json(self) -> dict[str, str]:
        if self.kind == "regex":
            return {"kind": self.kind, "match": self.match, "value": self.value}
        return {"kind": self.kind, "value": self.value}


# The redirect codes Envoy's RedirectAction has (Istio's and the Gateway API's)
REDIRECT_CODES: Final = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class Redirect:
    """A route's redirect (a VirtualService's ``redirect``, an HTTPRoute's
    RequestRedirect): its answer, with the ``location`` built per request
    (:meth:`answer`).

    ``scheme``, ``host``: the Location's (None: the request's); ``path``:
    replaces the request's path (Envoy's ``path_redirect``: the query stays
    unless it has one); ``prefix``: replaces the path elements the
    PathPrefix match matched (RequestRedirect's ``ReplacePrefixMatch``, as
    ``UriRewrite("segments")``); neither: the target stays. ``port``: the
    Location's; ``port_from_request``: the port the request was sent to
    (Istio's ``derivePort: FROM_REQUEST_PORT``); ``gateway``: the Gateway
    API's port rules (else Envoy's, as Istio configures them: a port that
    is the scheme's default is left out and the Host's port stays);
    ``https_redirect``: it is an Istio Gateway server's ``httpsRedirect``
    (``_istio_gateway.HTTPS_REDIRECT``), whose Location those rules build
    (``https://HOST/PATH?QUERY``, the Host's port left out), said so in
    :meth:`to_json`."""

    status: int = 301
    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    port_from_request: bool = False
    path: str | None = None
    prefix: str | None = None
    gateway: bool = False
    https_redirect: bool = False
    # more lines of the answer (the route's response headers' set and add)
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def per_request(self) -> bool:
        """Whether the location keeps anything of the request: its Host (no
        ``host``), its path or query (no ``path`` with a query of its own)."""
        return self.host is None or self.path is None or "?" not in self.path

    def answer(
        self, request: Request | None, port: int, match: Match, host: str = ""
    ) -> LocalAnswer:
        """The answer to *request*, sent to *port*, that block *match* took;
        *host* stands for the Host of a request without one (HTTP/1.0).

        A target that is no path is not redirected (nothing to put in a
        Location): ``CONNECT`` gets 403, as Envoy refuses a CONNECT its
        route does not allow, and an asterisk-form ``OPTIONS *`` 404, as
        Envoy answers a request whose path is not a path. A Host's empty
        port (``a.example.com:``) is left out (RFC 3986 §6.2.3). Where the
        Location would keep the request's host and there is none (no Host,
        an empty one, at a gateway listener, which has no name to give) it
        is not written (``https:///p`` names no host): 400, as Envoy
        answers a request without Host (and, by Istio's default, 426 to
        any HTTP/1.0 one)."""
        request = request or Request()
        if request.method == "CONNECT":
            return LocalAnswer(403, "CONNECT is not redirected", per_request=True)
        if not request.path.startswith("/"):
            return LocalAnswer(404, "no redirect of a target that is no path", per_request=True)
        authority = request.authority or host
        if authority.endswith(":"):
            authority = authority[:-1]
        port_redirect = port if self.port_from_request else self.port
        if not self.gateway and port_redirect == DEFAULT_PORTS.get(self.scheme or request.scheme):
            port_redirect = None  # (Istio: "do not put explicit :80 or :443")
        prefix = None
        if self.prefix is not None:
            prefix = UriRewrite("segments", self.prefix).for_match(match)
        where = location(
            target=request.path,
            host=authority,
            scheme=request.scheme,
            new_scheme=self.scheme,
            new_host=self.host,
            new_port=port_redirect,
            derive="gateway" if self.gateway else "envoy",
            listener_port=port,
            path=self.path,
            path_rewrite=prefix,
        )
        if self.host is None and not authority and not where.startswith("/"):
            return LocalAnswer(400, "no host to redirect to", per_request=True)
        return LocalAnswer(self.status, "", (("location", where), *self.headers), self.per_request)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "scheme": self.scheme,
            "host": self.host,
            "port": "from request" if self.port_from_request else self.port,
            "path": self.path,
            "prefix": self.prefix,
            "port_rules": (
                "istio gateway httpsRedirect"
                if self.https_redirect
                else "gateway api"
                if self.gateway
                else "envoy"
            ),
            "headers": [list(h) for h in self.headers],
        }


@dataclass(frozen=True)
class Route:
    """Matches (OR'ed; empty = any request) → weighted destinations."""

    name: str
    destinations: tuple[Destination, ...]
    matches: tuple[Match, ...] = ()
    protocol: Literal["http", "tcp"] = "http"
    # The answer when the chosen destination has no endpoint at all (its host is
    # not in the registry, or its name resolved to no address), or when the
    # route has no destination (a Gateway API rule whose weights are all 0).
    # Istio answers 503; the Gateway API says 500 for an unresolved backend.
    # Not part of equality: it is each API's convention for the same routing,
    # and an HTTPRoute and the equivalent VirtualService must compare equal.
    unresolved_status: int = field(default=503, compare=False)
    # Seconds from the end of the request (read whole) to the end of its
    # response: Envoy's route timeout (VirtualService http[].timeout, an
    # HTTPRoute rule's timeouts.request); 0 is none, Istio's default. Past it
    # the client gets 504, or its connection cut once the response began.
    timeout: float = 0.0
    # Envoy's retry policy (VirtualService http[].retries); None: none, the
    # relay's own retries only (a reused connection's, failed connects)
    retries: HttpRetry | None = None
    # What it changes in the heads of its requests and responses (a
    # VirtualService's http[].headers, an HTTPRoute rule's header
    # modifiers; ``authority``: rewrite.authority, URLRewrite's hostname;
    # ``path`` unused: see ``rewrite``); None: nothing
    headers: HeadEdits | None = None
    # how its requests' paths are rewritten (per match: UriRewrite.for_match)
    rewrite: UriRewrite | None = None
    # the route answers itself instead of a destination (then it has none):
    # a redirect (built per request), or a direct response
    redirect: Redirect | None = None
    direct: LocalAnswer | None = None
    # its fault injection (VirtualService http[].fault, RouteRule
    # httpFault), drawn per request by the relay; None: none
    fault: Fault | None = None
    # where copies of its requests also go (VirtualService mirror, mirrors;
    # RouteRule mirror; HTTPRoute RequestMirror), each drawn on its own
    mirrors: tuple[MirrorPolicy, ...] = ()
    # its CORS policy (VirtualService corsPolicy, HTTPRoute CORS filter):
    # preflights answered, actual responses' Access-Control-* lines; None: none
    cors: CorsPolicy | None = None
    # its session persistence (an HTTPRoute rule's sessionPersistence), its
    # cookie's path left "" (each match block's: session_for); None: none
    session: SessionPersistence | None = None

    def applies(self, port: int, request: Request | None, source: Mapping[str, str]) -> bool:
        if not self.matches:
            return True
        return any(m.matches(port, request, source) for m in self.matches)

    def matched(self, port: int, request: Request | None, source: Mapping[str, str]) -> Match:
        """The first match block that takes *request* (Istio makes one
        Envoy route of each, in order; ``Match()`` when the route has none):
        the one a path rewrite strips."""
        return next((m for m in self.matches if m.matches(port, request, source)), Match())

    def serves(self, port: int, source: Mapping[str, str] | None) -> bool:
        """Whether some request on *port* from a caller labelled *source*
        (None: any caller) can take this route: the match blocks' port and
        source labels, what Istio filters a port's route configuration by."""
        return not self.matches or any(
            (m.port is None or m.port == port)
            and (source is None or m.source_labels.selects(source))
            for m in self.matches
        )

    @property
    def edits_heads(self) -> bool:
        """Whether requests or responses it takes are edited (headers, a
        rewrite; its own or a destination's)."""
        return (
            self.headers is not None
            or self.rewrite is not None
            or any(d.headers is not None for d in self.destinations)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "protocol": self.protocol,
            "match": [m.to_json() for m in self.matches],
            "route": [d.to_json() for d in self.destinations],
            "unresolved_status": self.unresolved_status,
            "timeout": self.timeout,
            "retries": self.retries.to_json() if self.retries is not None else None,
            "headers": edits_json(self.headers),
            "rewrite": self.rewrite.to_json() if self.rewrite is not None else None,
            "redirect": self.redirect.to_json() if self.redirect is not None else None,
            "direct_response": self.direct.to_json() if self.direct is not None else None,
            "fault": (
                # (its tag is the worker's, for the relays' reports: not the rule's)
                {k: v for k, v in self.fault._asdict().items() if k != "tag"}
                if self.fault is not None
                else None
            ),
            "mirrors": [m.to_json() for m in self.mirrors],
            "cors": self.cors.to_json() if self.cors is not None else None,
            "session_persistence": (
                None if self.session is None else session_json(self.session, self.matches)
            ),
        }


PathType = Literal["Exact", "Prefix", "StringPrefix", "Default"]


@dataclass(frozen=True)
class IngressPath:
    """One Ingress path (or the default backend) → service host and port.

    ``Prefix`` is Kubernetes' element-wise prefix (``/a`` matches ``/a/b``, not
    ``/ab``); ``StringPrefix`` is Istio 0.7's ``/a.*`` (plain string prefix).
    ``host`` None means any host. ``port`` is a number or a port name.
    """

    name: str
    host: str | None
    path: str
    path_type: PathType
    service: str
    port: int | str
    # Gateway API listeners: only connections to this local port (None: any).
    listener_port: int | None = None

    def matches_path(self, path: str) -> bool:
        if self.path_type == "Default":
            return True
        if self.path_type == "Exact":
            return path == self.path
        if self.path_type == "StringPrefix":
            return path.startswith(self.path)
        prefix = self.path.rstrip("/")
        return path == prefix or path.startswith(prefix + "/") or prefix == ""

    def path_test(self) -> RequestTest | None:
        """:meth:`matches_path` as a :data:`RequestTest` (None: the default
        backend, which tests nothing)."""
        if self.path_type == "Default":
            return None
        if self.path_type == "Exact":
            return ("exact", self.path)
        if self.path_type == "StringPrefix":
            return ("path_prefix", self.path)
        return ("segments", self.path.rstrip("/"))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "host": self.host,
            "path": self.path,
            "path_type": self.path_type,
            "service": self.service,
            "port": self.port,
            "listener_port": self.listener_port,
        }


@dataclass(frozen=True)
class WeightedSubset:
    """One destination of a route, for :meth:`RouteTable.choices`.

    ``endpoints``: the healthy ones, in table order (all when none is;
    with an outlier detection policy, all below its panic threshold, else
    possibly none). ``key`` names the round-robin counter; None (and no
    endpoints) when the destination's host is not in the registry, and for
    the one of subset ``none`` that stands for a route with none (every
    weight 0), whose requests all get its ``status`` and ``edits``.
    ``status``: the answer when ``endpoints`` is empty: the route's
    ``unresolved_status`` for a destination without endpoints,
    :data:`NO_HEALTHY_STATUS` for one whose endpoints were all ejected.
    """

    weight: int
    service: Service
    subset: str
    endpoints: tuple[Endpoint, ...]
    policy: str
    key: tuple[str, int, str, Labels] | None
    status: int = 503
    # what the relay changes in the heads of the requests sent to it and of
    # their responses: the route's headers, rewrite and the destination's
    # headers together (None: nothing)
    edits: HeadEdits | None = None
    # with policy "HASH": what the relay hashes per request to order the
    # endpoints (verdict.HashOn, hash_order); None otherwise
    hash_on: HashOn | None = None
    # every endpoint of the destination where outlier detection ejected
    # them all (endpoints empty, status NO_HEALTHY_STATUS): the pods its
    # requests are labelled by, as those that reached them were
    ejected: tuple[Endpoint, ...] = ()


@dataclass(frozen=True)
class LocalAnswer:
    """A route's own answer instead of a destination: a redirect
    (VirtualService ``redirect``, HTTPRoute ``RequestRedirect``) or a direct
    response (``directResponse``). ``headers``: lowercase names and values
    (a redirect's ``location``); ``per_request``: True when the answer was
    built from this request's target or Host beyond what the route matched
    (a redirect that keeps the path), so the relay must not apply it to
    other requests of the same shape (verdict ttl 0)."""

    status: int
    body: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    per_request: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "body": self.body,
            "headers": [list(h) for h in self.headers],
            "per_request": self.per_request,
        }


@dataclass(frozen=True)
class RouteChoices:
    """The route a request matched and its weighted destinations (see
    :meth:`RouteTable.choices`); ``status`` answers a destination without
    endpoints (503; 500 for a Gateway API backend that resolves to nothing;
    503 where every empty destination is so because its endpoints were all
    ejected: each one's own is ``WeightedSubset.status``), or, with no
    subsets and route :data:`NO_ROUTE`, a request no route matched (404)."""

    service: Service
    route: str
    subsets: tuple[WeightedSubset, ...]
    status: int = 503
    timeout: float = 0.0  # the route's (Route.timeout)
    retries: HttpRetry | None = None  # the route's (Route.retries)
    # the route answers itself (a redirect, a direct response): no subsets
    answer: LocalAnswer | None = None
    # the route's fault injection (http[].fault), for the relay to draw
    fault: Fault | None = None
    # where copies of its requests also go (Route.mirrors, resolved; none
    # with an answer): for the relay
    mirrors: tuple[Mirror, ...] = ()
    # the route's session persistence, its cookie's path the matched
    # block's (session_for; none with an answer): for the relay
    session: SessionPersistence | None = None


@dataclass(frozen=True)
class Decision:
    """Where one request/connection goes.

    ``endpoints`` is the order to try: the load balancer's pick first, then the
    rest of the subset for a retry on connect failure. Empty means nothing can
    serve it: the proxy answers ``status`` (503; 500 for a Gateway API backend
    that resolves to nothing, but 503 where its endpoints were all ejected;
    404 with route :data:`NO_ROUTE`: no route matched a request to a
    VirtualService's or an HTTPRoute's host).

    Its requests' metric labels: :func:`version_and_workload` of
    ``endpoints``; where they differ in version, those of the endpoint of
    each request's last try (:func:`endpoint_versions`, the relay
    decision's ``endpoint_tags``).

    ``session``: its route's session persistence (the matched block's
    cookie path), with endpoints only: the relay gives the client the
    token of the endpoint that answers (``endpoints`` begins with the one
    the request's token named, when that one is still among them).
    """

    service: Service
    route: str
    subset: str
    endpoints: list[Endpoint]
    status: int = 503
    timeout: float = 0.0  # the route's (Route.timeout): 0, none
    retries: HttpRetry | None = None  # the route's (Route.retries)
    edits: HeadEdits | None = None  # the chosen subset's (WeightedSubset.edits)
    # the route answers itself (RouteChoices.answer): no endpoints
    answer: LocalAnswer | None = None
    fault: Fault | None = None  # the route's (RouteChoices.fault)
    # where copies of the request also go (RouteChoices.mirrors): only
    # with endpoints to send the request to
    mirrors: tuple[Mirror, ...] = ()
    session: SessionPersistence | None = None  # the route's (RouteChoices.session)
    # every endpoint of the destination where outlier detection ejected
    # them all (endpoints empty, status NO_HEALTHY_STATUS): the pods its
    # requests are labelled by (WeightedSubset.ejected)
    ejected: tuple[Endpoint, ...] = ()


def _normalize_ip(ip: str) -> str | None:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        # A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
        return str(addr.ipv4_mapped)
    return str(addr)


def _is_http_port(service: Service, port: int) -> bool:
    """Whether *port* is an HTTP port of *service* (a port it does not
    declare is not: its routes apply there as on a TCP port)."""
    sport = service.port(port)
    return sport is not None and sport.is_http


def _split_host_port(host: str) -> tuple[str, int | None]:
    host = host.strip()
    if host.startswith("["):  # [v6]:port
        end = host.find("]")
        if end == -1:
            return host.lower(), None
        rest = host[end + 1 :]
        name = host[1:end]
        if rest.startswith(":") and rest[1:].isdigit():
            return name.lower(), int(rest[1:])
        return name.lower(), None
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        if port.isdigit():
            return name.lower().rstrip("."), int(port)
    return host.lower().rstrip("."), None


_SubsetKey = tuple[str, int, Labels]


class RouteTable:
    """Services, routes and ingress paths; answers routing questions.

    See the module docstring for the theory of operation. Build one with
    :func:`l4proxy.rules.load_rules`, or directly in tests.
    """

    def __init__(
        self,
        services: Iterable[Service] = (),
        routes: Mapping[str, Sequence[Route]] | None = None,
        *,
        load_balancers: Mapping[str, str] | None = None,
        hash_policies: Mapping[str, HashOn] | None = None,
        pools: Mapping[str, PoolSettings] | None = None,
        outliers: Mapping[str, OutlierPolicy] | None = None,
        port_policies: Mapping[str, Mapping[int, Subset]] | None = None,
        ingress: Sequence[IngressPath] = (),
        unmatched: Iterable[str] = (),
        namespace: str = "default",
        domain: str = "cluster.local",
        seed: int | None = None,
        unserved_ports: Mapping[int, str] | None = None,
    ) -> None:
        self.namespace = namespace
        self.domain = domain
        # The ports of Istio Gateway servers not served (HTTPS, TLS, TCP...:
        # a load warning each), with what each is: the worker warns of a
        # --listen port that only such a server names. Not part of what the
        # table routes (not in its identity).
        self.unserved_ports: dict[int, str] = dict(unserved_ports or {})
        self._routes: dict[str, tuple[Route, ...]] = {
            host: tuple(rs) for host, rs in (routes or {}).items() if rs
        }
        # Hosts whose requests no route matches are answered NO_ROUTE_STATUS
        # (VirtualService, HTTPRoute, gateway services); the others' take
        # the round robin over every endpoint (RouteRule, no rule).
        # A host with an http route that matches every request never has
        # one unmatched: left out, so that tables that route alike compare
        # equal (a RouteRule and the equivalent VirtualService, both
        # catch-alls). A tcp route takes no request (_match: never on an
        # HTTP port).
        self._unmatched: frozenset[str] = frozenset(
            h
            for h in unmatched
            if not any(not r.matches and r.protocol == "http" for r in self._routes.get(h, ()))
        )
        self._services: dict[str, Service] = {}
        for svc in services:
            self._services.setdefault(svc.host, svc)
        self._load_balancers: dict[str, str] = dict(load_balancers or {})
        # Per host whose DestinationRule's own loadBalancer is a
        # consistentHash ("HASH" above): what its requests without a subset
        # are hashed on (a subset's is Subset.hash_on).
        self._hash_policies: dict[str, HashOn] = dict(hash_policies or {})
        # Per host, its DestinationRule's own connectionPool: that of the
        # connections its requests open without a subset (a subset's is
        # Subset.pool). Unset ones are left out, so that a rule without
        # settings and none at all compare equal.
        self._pools: dict[str, PoolSettings] = {h: p for h, p in (pools or {}).items() if p.is_set}
        # Per host, its DestinationRule's own outlierDetection: that of its
        # requests without a subset (a subset's is Subset.outlier).
        self._outliers: dict[str, OutlierPolicy] = dict(outliers or {})
        # Per host, its DestinationRule's portLevelSettings: per service
        # port, the policy of its requests without a subset there, as a
        # subset DEFAULT of no labels (a subset's is Subset.ports).
        self._port_policies: dict[str, dict[int, Subset]] = {
            h: dict(sorted(m.items())) for h, m in (port_policies or {}).items() if m
        }
        # Each host's own policy as that subset, on every port and on its
        # ports' (_own); the hosts of none take the round robin.
        self._own_policies: dict[str, Subset] = {
            h: Subset(
                DEFAULT,
                NO_LABELS,
                self._load_balancers.get(h, "ROUND_ROBIN"),
                self._pools.get(h, NO_POOL_SETTINGS),
                self._outliers.get(h),
                self._hash_policies.get(h),
                tuple(self._port_policies.get(h, {}).items()),
            )
            for h in {
                *self._load_balancers,
                *self._hash_policies,
                *self._pools,
                *self._outliers,
                *self._port_policies,
            }
        }
        self._ingress: tuple[IngressPath, ...] = tuple(ingress)

        # Derived indexes (not part of equality: they follow from the above).
        self._by_name: dict[str, Service] = {}
        # A VIP is an address *and* a port, as Istio's outbound listeners are
        # (10.9.9.9_80, 10.9.9.9_81): two services may share an address on
        # different ports (the load refuses a clash on the same address and
        # port), each reached on its own. (address, port) → its first
        # service listing both, and that port of it.
        self._by_address: dict[tuple[str, int], tuple[Service, ServicePort]] = {}
        self._by_network: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Service]] = []
        # _by_network by (IP version, prefix length), then (the block's first
        # address, a port of its service) → (the block's place in
        # _by_network, its service and that port): an address is looked up
        # once per prefix length, where each connection to an address no
        # VIP is walked every block (50,000 CIDR addresses: 19 ms of a
        # worker per connection)
        self._network_index: dict[
            tuple[int, int], dict[tuple[int, int], tuple[int, Service, ServicePort]]
        ] = {}
        for svc in self._services.values():
            if svc.role == "gateway":
                continue  # reached only through its ingress paths
            for name in (svc.host, *svc.aliases):
                self._by_name.setdefault(name.lower(), svc)
            for addr in svc.addresses:
                norm: str | None
                if "/" in addr:
                    net = ipaddress.ip_network(addr, strict=False)
                    if net.num_addresses == 1:
                        norm = str(net.network_address)
                    else:
                        norm = None
                        self._by_network.append((net, svc))
                        # (a block listed twice with the port: the first
                        # wins; where blocks nest, the most specific does:
                        # service_for_address)
                        blocks = self._network_index.setdefault((net.version, net.prefixlen), {})
                        start = int(net.network_address)
                        for sport in svc.ports:
                            blocks.setdefault(
                                (start, sport.number), (len(self._by_network), svc, sport)
                            )
                else:
                    norm = _normalize_ip(addr)
                if norm is not None:
                    for sport in svc.ports:
                        self._by_address.setdefault((norm, sport.number), (svc, sport))
        self._http_ports = frozenset(
            p.number
            for svc in self._services.values()
            if svc.role == "service"
            for p in svc.ports
            if p.is_http
        )
        # Routes in the order tried: L7 routes first for a parsed request,
        # L4 routes first for a raw connection; either kind can serve both
        # on a TCP port (``_match`` says where: never a tcp route on an
        # HTTP port).
        self._order: dict[tuple[str, bool], tuple[Route, ...]] = {}
        for host, rs in self._routes.items():
            http = tuple(r for r in rs if r.protocol == "http")
            tcp = tuple(r for r in rs if r.protocol == "tcp")
            self._order[(host, True)] = http + tcp
            self._order[(host, False)] = tcp + http

        # Load-balancer state (mutable; excluded from equality).
        self._rng = random.Random(seed)
        # round-robin positions per balance key, each new one starting at
        # its own drawn offset (rr_start: from the seed, else the OS;
        # never a draw of _rng, whose sequence the weights' draws are)
        self._rr: dict[tuple[str, int, str, Labels], int] = {}
        self._rr_salt = rr_salt(seed)
        self._subset_cache: dict[_SubsetKey, tuple[Endpoint, ...]] = {}
        # (host, port) → (label, value) → the indices of the endpoints that carry it
        self._label_index: dict[tuple[str, int], dict[tuple[str, str], list[int]]] = {}
        self._endpoint_pools: dict[tuple[str, int], PoolSettings] | None = None
        self._endpoint_outliers: dict[tuple[str, int], OutlierPolicy] | None = None
        self._named_endpoints: frozenset[tuple[str, int]] | None = None
        self._ejection_groups: dict[tuple[str, int], tuple[tuple[Endpoint, ...], ...]] | None = None

    @classmethod
    def empty(cls) -> RouteTable:
        return cls()

    def reseed(self, seed: int | None) -> None:
        """Restart the weighted choice's RNG (tests; per-worker seeding),
        and the round robin's counters at the starts *seed* gives them
        (each at its own offset: :func:`rr_start`)."""
        self._rng.seed(seed)
        self._rr.clear()
        self._rr_salt = rr_salt(seed)

    # -- equality -----------------------------------------------------------

    def _identity(self) -> tuple[Any, ...]:
        return (
            self.namespace,
            self.domain,
            tuple(sorted(self._services.items())),
            tuple(sorted(self._routes.items())),
            tuple(sorted(self._load_balancers.items())),
            tuple(sorted(self._hash_policies.items())),
            tuple(sorted(self._pools.items())),
            tuple(sorted(self._outliers.items())),
            tuple(sorted((h, tuple(m.items())) for h, m in self._port_policies.items())),
            self._ingress,
            tuple(sorted(self._unmatched)),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RouteTable):
            return NotImplemented
        return self._identity() == other._identity()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"<RouteTable {len(self._services)} services, "
            f"{sum(len(r) for r in self._routes.values())} routes, "
            f"{len(self._ingress)} ingress paths>"
        )

    # -- lookups ------------------------------------------------------------

    def services(self) -> list[Service]:
        return list(self._services.values())

    def named_endpoints(self) -> frozenset[tuple[str, int]]:
        """Every (address, port) the table routes to, over all its services
        (the pairs of ``svc.endpoints``), computed once."""
        if self._named_endpoints is None:
            self._named_endpoints = frozenset(
                (ep.address, ep.port) for svc in self._services.values() for ep in svc.endpoints
            )
        return self._named_endpoints

    def prepare(self) -> RouteTable:
        """Compute, where the table is made (a reload's or a DNS expansion's
        thread), what the worker's swap hooks read of it on the event loop
        (:meth:`named_endpoints`, :meth:`pool_settings`,
        :meth:`outlier_policies`, each kept): with tens of thousands of
        endpoints each took tens of milliseconds on the loop at the swap.
        Returns the table."""
        self.named_endpoints()
        if self._endpoint_pools is None:
            self._endpoint_pools = self._compute_pool_settings()
        if self._endpoint_outliers is None:
            self._endpoint_outliers = self._compute_outlier_policies()
        return self

    def service(self, host: str) -> Service | None:
        return self._services.get(host)

    def routes_for(self, host: str) -> tuple[Route, ...]:
        return self._routes.get(host, ())

    def _own(self, host: str, port: int | None = None) -> Subset:
        """*host*'s DestinationRule's own policy, that of its requests
        without a subset, as a subset DEFAULT: on service *port* when
        given (its ``portLevelSettings`` entry for that port, if any)."""
        own = self._own_policies.get(host, _NO_POLICY)
        return own if port is None else own.on_port(port)

    def load_balancer(self, host: str, port: int | None = None) -> str:
        """*host*'s DestinationRule's own load balancer (on service *port*
        when given); ROUND_ROBIN without one."""
        return self._own(host, port).load_balancer

    def hash_on(self, host: str, port: int | None = None) -> HashOn | None:
        """What *host*'s requests without a subset are hashed on: its
        DestinationRule's own consistentHash (on service *port* when given;
        None: not one)."""
        return self._own(host, port).hash_on

    def pool(self, host: str, port: int | None = None) -> PoolSettings:
        """*host*'s DestinationRule's own ``connectionPool`` (what its
        requests without a subset use, on service *port* when given; all
        None: none)."""
        return self._own(host, port).pool

    def pool_settings(self) -> dict[tuple[str, int], PoolSettings]:
        """The connection pool settings of every endpoint (address, target
        port: the pairs of ``svc.endpoints`` over :meth:`services`) that has
        any, sorted by endpoint.

        The upstream pools are per endpoint, not per Envoy cluster (host and
        subset), so an endpoint takes the settings of every destination that
        can reach it, merged by :meth:`PoolSettings.strictest`, a field that
        some of them leave unset (the sidecar's flag there) named in
        ``or_flag`` (:meth:`PoolSettings.resolved` takes the stricter of it
        and the flag); a circuit breaker (no flag) that some set and others
        leave unset (unlimited) is the set one, the strictest, and not in
        ``or_flag``; an endpoint that none sets anything for is left out.
        The destinations: each route
        destination's subset (``Subset.pool``: the DestinationRule subset's
        own ``connectionPool``, which replaces the rule's as a whole, else
        the rule's), over the endpoints of that subset on the destination's
        port (any port without one); and the host's own settings
        (:meth:`pool`) over its endpoints on each port where some request
        or connection may take no route (the round robin over every
        endpoint): every port unless a route without conditions takes all
        of that port's traffic. (A VirtualService host's unmatched requests
        are answered 404, but its bytes that are not HTTP/1.x still take the
        round robin: counted, which errs on the strict side.) On a port
        that a ``portLevelSettings`` entry names, each of these is the
        settings there (:meth:`Subset.on_port`).
        """
        if self._endpoint_pools is None:
            self._endpoint_pools = self._compute_pool_settings()
        return dict(self._endpoint_pools)

    def _compute_pool_settings(self) -> dict[tuple[str, int], PoolSettings]:
        # every destination's settings over the endpoints it reaches, unset
        # ones too: a destination without a field reaches the endpoint with
        # the sidecar's flag, which the merge must not forget
        reach: dict[tuple[str, int], list[PoolSettings]] = {}

        def add(eps: Iterable[Endpoint], settings: PoolSettings) -> None:
            for ep in eps:
                reach.setdefault((ep.address, ep.port), []).append(settings)

        for svc, number, eps, subset in self._destinations():
            if subset is None:
                add(eps, self._own(svc.host, number).pool)
            else:
                add(self._subset_endpoints(svc, number, subset.labels), subset.on_port(number).pool)
        out: dict[tuple[str, int], PoolSettings] = {}
        for key, settings in reach.items():
            if not any(s.is_set for s in settings):
                continue
            merged = functools.reduce(PoolSettings.strictest, settings)
            bound = frozenset(
                name
                for name in FLAGGED_POOL_FIELDS
                if getattr(merged, name) is not None
                and any(getattr(s, name) is None for s in settings)
            )
            out[key] = dataclasses.replace(merged, or_flag=bound)
        return dict(sorted(out.items()))

    def outlier(self, host: str, port: int | None = None) -> OutlierPolicy | None:
        """*host*'s DestinationRule's own ``outlierDetection`` (that of its
        requests without a subset, the default route's, on service *port*
        when given; None: none)."""
        return self._own(host, port).outlier

    def outlier_policies(self) -> dict[tuple[str, int], OutlierPolicy]:
        """The outlier detection policy of every endpoint (address, target
        port, as :meth:`pool_settings`) that some destination with a policy
        can reach, sorted by endpoint; one that only destinations without a
        policy reach is left out (the sidecar's own detection).

        Outlier state is kept per endpoint, not per Envoy cluster, so an
        endpoint takes the policy of every destination that can reach it,
        merged by :meth:`OutlierPolicy.most_eager`: each route destination's
        (``Subset.outlier``: the DestinationRule subset's own, which replaces
        the rule's as a whole, else the rule's), over the endpoints of that
        subset on the destination's port (any port without one); and the
        host's own (:meth:`outlier`) over its endpoints on each port where
        some request or connection may take no route, as for
        :meth:`pool_settings`; on a port that a ``portLevelSettings`` entry
        names, each of these is the policy there.
        """
        if self._endpoint_outliers is None:
            self._endpoint_outliers = self._compute_outlier_policies()
        return dict(self._endpoint_outliers)

    def _compute_outlier_policies(self) -> dict[tuple[str, int], OutlierPolicy]:
        out: dict[tuple[str, int], OutlierPolicy] = {}

        def add(eps: Iterable[Endpoint], policy: OutlierPolicy) -> None:
            for ep in eps:
                key = (ep.address, ep.port)
                got = out.get(key)
                out[key] = policy if got is None else got.most_eager(policy)

        for svc, number, eps, subset in self._destinations():
            if subset is None:
                host_policy = self._own(svc.host, number).outlier
                if host_policy is not None:
                    add(eps, host_policy)
            elif (policy := subset.on_port(number).outlier) is not None:
                add(self._subset_endpoints(svc, number, subset.labels), policy)
        return dict(sorted(out.items()))

    def ejection_groups(self, ep: Endpoint) -> tuple[tuple[Endpoint, ...], ...]:
        """The destinations that can send requests to *ep* (its address and
        target port), each as all of its endpoints, ejected or not: what
        outlier detection bounds an ejection of *ep* by
        (``maxEjectionPercent``), as Envoy bounds one per cluster, whose
        hosts are a subset's (``outbound|PORT|SUBSET|HOST``). A destination
        is a route's (its subset's endpoints on its port, on each port
        without one) or a service port's own where some request or
        connection may take no route, as :meth:`outlier_policies` finds
        them. Empty: no destination names *ep*."""
        if self._ejection_groups is None:
            self._ejection_groups = self._compute_ejection_groups()
        return self._ejection_groups.get((ep.address, ep.port), ())

    def _compute_ejection_groups(self) -> dict[tuple[str, int], tuple[tuple[Endpoint, ...], ...]]:
        groups: dict[tuple[str, int], dict[tuple[Endpoint, ...], None]] = {}

        def add(eps: tuple[Endpoint, ...]) -> None:
            for ep in eps:
                groups.setdefault((ep.address, ep.port), {})[eps] = None

        for svc, number, eps, subset in self._destinations():
            add(eps if subset is None else self._subset_endpoints(svc, number, subset.labels))
        return {key: tuple(got) for key, got in groups.items()}

    def _destinations(
        self,
    ) -> Iterator[tuple[Service, int, tuple[Endpoint, ...], Subset | None]]:
        """Each destination that requests and connections reach endpoints
        through, as (service, port, that port's endpoints, subset): a
        service port where some may take no route (subset None: the host's
        own settings apply), then each route destination on each port it
        names (every port without one), with its subset, but not a ``tcp``
        route that applies on no port of its host (each is HTTP). What
        pool_settings(), outlier_policies() and ejection_groups() walk."""
        for svc in self._services.values():
            for number, eps in svc.port_endpoints:
                if not self._takes_every_connection(svc, number):
                    yield svc, number, eps, None
        for host, routes in self._routes.items():
            routed = self._services.get(host)
            for route in routes:
                if (
                    route.protocol == "tcp"
                    and routed is not None
                    and any(route.serves(p.number, None) for p in routed.ports)
                    and not self.route_ports(routed, route)
                ):
                    continue  # (every port it names is HTTP: it takes nothing)
                for dest in route.destinations:
                    target = None if dest.refused else self._services.get(dest.host)
                    if target is None:
                        continue
                    for number, eps in target.port_endpoints:
                        if dest.port is None or dest.port == number:
                            yield target, number, eps, dest.subset

    def _takes_every_connection(self, service: Service, port: int) -> bool:
        """Whether some route of *service* takes every request and raw
        connection on *port*, whoever the caller (a match block that reads
        nothing of the request, names no source labels and no other port;
        never a ``tcp`` route on an HTTP port, and an ``http`` route on a
        TCP port of a service with HTTP ports only if the block names that
        port, as :meth:`_match` skips them otherwise), so that none takes
        the round robin over every endpoint."""
        http_port = _is_http_port(service, port)
        tcp_port = not http_port and any(p.is_http for p in service.ports)
        for route in self._routes.get(service.host, ()):
            if http_port and route.protocol == "tcp":
                continue
            for m in route.matches or (Match(),):
                if m.needs_request or m.source_labels or m.port not in (None, port):
                    continue
                if tcp_port and route.protocol == "http" and m.port != port:
                    continue
                return True
        return False

    def route_ports(self, service: Service, route: Route) -> list[int]:
        """The ports of *service* where *route* (one of its routes) can
        take some request or connection: those its match blocks name (every
        port for a block without one), less the HTTP ports for a ``tcp``
        route (Istio's HTTP listener has no tcp route) and, for an ``http``
        route of a service with HTTP ports, the TCP ports it does not name
        (:meth:`_match`). What ``validate -v`` says of a route that does not
        serve every port."""
        any_http = any(p.is_http for p in service.ports)
        out = []
        for p in service.ports:
            if not route.serves(p.number, None):
                continue
            if route.protocol == "tcp" and p.is_http:
                continue
            if (
                route.protocol == "http"
                and any_http
                and not p.is_http
                and not any(m.port == p.number for m in route.matches)
            ):
                continue
            out.append(p.number)
        return out

    def refuses_unmatched(
        self, service: Service, port: int, source: Mapping[str, str] | None = None
    ) -> bool:
        """Whether a request to *service* on *port* from a caller labelled
        *source* (None: any caller) that no route matches is answered
        :data:`NO_ROUTE_STATUS` rather than spread over every endpoint: the
        host is a VirtualService's or an HTTPRoute's and one of its ``http``
        routes serves that port and caller (see the module docstring)."""
        if service.host not in self._unmatched:
            return False
        return any(
            r.protocol == "http" and r.serves(port, source)
            for r in self._routes.get(service.host, ())
        )

    @property
    def ingress_paths(self) -> tuple[IngressPath, ...]:
        return self._ingress

    def is_http_port(self, port: int) -> bool:
        """Whether any known service declares *port* as HTTP (peek unknown destinations)."""
        return port in self._http_ports

    def service_for_address(self, ip: str, port: int) -> tuple[Service, ServicePort] | None:
        """The service whose VIP (ServiceEntry ``addresses``) is *ip* on
        *port*: a VIP is an address and a port, as Istio's outbound
        listeners are, so services that share an address on different
        ports are each found on theirs. An address that is a VIP itself
        is found before the CIDR blocks that hold it, and an address in
        nested blocks finds the most specific (Envoy's longest prefix).
        An address known only on other ports is None (what no VIP is:
        the Host header, then passthrough or REGISTRY_ONLY's refusal, as
        classify() says)."""
        norm = _normalize_ip(ip)
        if norm is None:
            return None
        found = self._by_address.get((norm, port))
        if found is None and self._network_index:
            addr = ipaddress.ip_address(norm)
            n, bits = int(addr), addr.max_prefixlen
            # (the most specific block wins, as Envoy's filter chain match
            # picks the longest destination prefix of Istio's wildcard
            # listener for CIDR ServiceEntries; blocks of one length are
            # disjoint but for one listed twice, where the first wins)
            best: tuple[int, Service, ServicePort] | None = None
            longest = -1
            for (version, prefixlen), blocks in self._network_index.items():
                if version == addr.version and prefixlen > longest:
                    got = blocks.get((n >> (bits - prefixlen) << (bits - prefixlen), port))
                    if got is not None:
                        best, longest = got, prefixlen
            if best is not None:
                found = (best[1], best[2])
        return found

    def service_for_host(self, host: str, port: int) -> tuple[Service, ServicePort] | None:
        """The service a Host header names: short name, name.ns, name.ns.svc, FQDN,
        each with or without ``:port``, or a VIP literal. *port* is the port dialled."""
        name, _ = _split_host_port(host)
        svc = self._by_name.get(name)
        if svc is None:
            return self.service_for_address(name, port) if _normalize_ip(name) else None
        sport = svc.port(port)
        return None if sport is None else (svc, sport)

    # -- selection ----------------------------------------------------------

    def decide(
        self,
        service: Service,
        port: int,
        request: Request | None,
        source_labels: Mapping[str, str] = NO_LABELS,
        *,
        healthy: Callable[[Endpoint], bool] | None = None,
        active: Callable[[Endpoint], int] | None = None,
        source: bytes | None = None,
    ) -> Decision:
        """Pick route, subset and endpoint order for one request (or TCP connection).

        *request* None means raw TCP: only match blocks that do not look at the
        request (port, source labels, none at all) can match. *source*: a raw
        connection's client's packed address (a request's is its own
        ``Request.source``), what a consistent hash on the source IP reads.
        """
        route = self._match(service, port, request, source_labels)
        if route is not None:
            status = route.unresolved_status
            # (a raw connection has no request to delay or answer: nothing
            # is injected at L4)
            fault = route.fault if request is not None else None
            cors = route.cors if request is not None else None
            preflight = cors.preflight(request) if cors is not None and request else None
            if preflight is not None:  # (Istio's filters: fault, then CORS, then router)
                return Decision(
                    service,
                    route.name,
                    "none",
                    [],
                    preflight.status,
                    route.timeout,
                    route.retries,
                    answer=preflight,
                    fault=fault,
                )
            cors_lines = cors.response_lines(request) if cors is not None else ()
            answer = self._answer(route, service, port, request, source_labels)
            if answer is not None:  # a redirect, a direct response
                answer = _answer_with_cors(answer, cors_lines)
                return Decision(
                    service,
                    route.name,
                    "none",
                    [],
                    answer.status,
                    route.timeout,
                    route.retries,
                    answer=answer,
                    fault=fault,
                )
            if not route.destinations:  # every weight 0 (Gateway API): nothing serves it
                return Decision(
                    service,
                    route.name,
                    "none",
                    [],
                    status,
                    route.timeout,
                    route.retries,
                    _unserved_edits(route, request, cors_lines),
                    fault=fault,
                )
            # a request's session token: the destination with the endpoint
            # it names, not drawn (none valid: the draw, as without one)
            matched = Match()
            session: SessionPersistence | None = None
            pinned: tuple[Destination, Endpoint] | None = None
            if request is not None:
                matched = route.matched(port, request, source_labels)
                if route.session is not None:
                    session = session_for(route.session, matched)
                    pinned = self._pinned(route, service, port, session, request, healthy)
            dest = pinned[0] if pinned is not None else self._pick(route.destinations)
            # what the request and its answer get changed (a raw connection
            # has no head to edit): the answer of a target not resolved too
            edits = None
            if request is not None:
                edits = with_cors_lines(self._edits(route, dest, matched, request.path), cors_lines)
            target = self._target(service, dest)
            if target is None:  # (its answer edited as its share's: choices())
                return Decision(
                    service,
                    route.name,
                    dest.subset.name,
                    [],
                    status,
                    route.timeout,
                    route.retries,
                    edits,
                    fault=fault,
                )
            tport = self._target_port(target, dest, port, same=target is service)
            eps = self._subset_endpoints(target, tport, dest.subset.labels)
            key = (target.host, tport, dest.subset.name, dest.subset.labels)
            sub = dest.subset.on_port(tport)  # (its policy on that port)
            hkey, made = self._hash_key(sub.load_balancer, sub.hash_on, request, source)
            ordered = self._balance(eps, key, sub.load_balancer, healthy, active, sub.outlier, hkey)
            if pinned is not None and ordered:  # the token's endpoint first, then as balanced
                ordered = [pinned[1], *(e for e in ordered if e != pinned[1])]
            if eps and not ordered:  # every endpoint ejected: no healthy upstream
                status = NO_HEALTHY_STATUS
            # (no generated cookie on the 503 of no endpoint, as the compiled
            # relay and Envoy, whose router sets it on an upstream's response only)
            edits = _with_cookie(edits, sub.hash_on, made if ordered else None)
            mirrors: tuple[Mirror, ...] = ()
            if request is not None and ordered:  # (none at L4, none on a local answer)
                mirrors = self._mirrors(route, service, port, healthy)
            return Decision(
                target,
                route.name,
                dest.subset.name,
                ordered,
                status,
                route.timeout,
                route.retries,
                edits,
                fault=fault,
                mirrors=mirrors,
                session=session if ordered else None,
                ejected=() if ordered else eps,
            )
        if request is not None and self.refuses_unmatched(service, port, source_labels):
            return Decision(service, NO_ROUTE, "none", [], NO_ROUTE_STATUS)
        eps = service.endpoints_for(port)
        key = (service.host, port, DEFAULT, NO_LABELS)
        own = self._own(service.host, port)
        hkey, made = self._hash_key(own.load_balancer, own.hash_on, request, source)
        ordered = self._balance(eps, key, own.load_balancer, healthy, active, own.outlier, hkey)
        edits = _with_cookie(None, own.hash_on, made if ordered else None)
        return Decision(
            service, DEFAULT, DEFAULT, ordered, edits=edits, ejected=() if ordered else eps
        )

    def _pinned(
        self,
        route: Route,
        service: Service,
        port: int,
        session: SessionPersistence,
        request: Request,
        healthy: Callable[[Endpoint], bool] | None,
    ) -> tuple[Destination, Endpoint] | None:
        """The destination of *route* (the first, in order, that has it)
        and the endpoint that *request*'s session token names, among each
        destination's endpoints as :meth:`choices` gives them (the healthy
        ones, :meth:`_healthy`); None: no token, or one that names none of
        them (a forged one, a pod gone or ejected, another route's)."""
        sent = session.sent(request.headers.items())
        if sent is None:
            return None
        for dest in route.destinations:
            target = self._target(service, dest)
            if target is None:  # (not resolved, or refused: no endpoint of it serves)
                continue
            tport = self._target_port(target, dest, port, same=target is service)
            eps = self._healthy(
                self._subset_endpoints(target, tport, dest.subset.labels),
                healthy,
                dest.subset.on_port(tport).outlier,
            )
            for e in eps:
                if session_token((e.address, e.port)) == sent:
                    return dest, e
        return None

    def _hash_key(
        self,
        policy: str,
        hash_on: HashOn | None,
        request: Request | None,
        source: bytes | None = None,
    ) -> tuple[int | None, str | None]:
        """A consistent hash's key for *request* and the value of the cookie
        generated for it (None: none): the hash of what *hash_on* reads in
        it; a request without it a random key, unless *hash_on* generates a
        cookie (a ttl): then a random cookie's value, hashed as if sent
        (the response sets it, :func:`_with_cookie`). A raw connection
        (None): its client's address *source* for a hash on the source IP,
        else a random key; no cookie. Not a hash policy: (None, None)."""
        if policy != "HASH" or hash_on is None:
            return None, None
        if request is None and source is not None and hash_on.kind == HASH_SOURCE_IP:
            return hash_key(source), None  # (Envoy's TCP proxy hashes it too)
        if request is not None:
            value = hash_on.key_of(request.path, request.headers, request.source)
            if value is not None:
                return hash_key(value), None
            if hash_on.ttl is not None:
                made = cookie_value(self._rng.getrandbits(64))
                return hash_key(made.encode()), made
        return self._rng.getrandbits(64), None  # Envoy: a random host

    def _match(
        self, service: Service, port: int, request: Request | None, source: Mapping[str, str]
    ) -> Route | None:
        """The first route of *service* that applies (None: the default route).

        On an HTTP port no ``tcp`` route applies, to a request or to a raw
        connection (h2, gRPC, TLS bytes: routed per connection by the
        ``http`` routes): Istio's listener there is an HTTP connection
        manager whose route configuration is built from the ``http`` routes
        alone, so a VirtualService of ``tcp`` routes only leaves that port
        to the default route (its load warns). A raw connection to a TCP
        port of a service that also has HTTP ports takes no ``http`` route
        unless one names that port: those routes are the HTTP ports'
        (Istio: a VirtualService's ``http`` routes never apply to a TCP
        port), so a canary of the HTTP API does not move the service's
        database connections. A service with no HTTP port at all keeps
        taking them per connection (the port not named http that made
        Istio users' rules look ignored)."""
        http_port = _is_http_port(service, port)
        tcp_port = request is None and not http_port and any(p.is_http for p in service.ports)
        for route in self._order.get((service.host, request is not None), ()):
            if http_port and route.protocol == "tcp":
                continue
            if (
                tcp_port
                and route.protocol == "http"
                and not any(m.port == port for m in route.matches)
            ):
                continue
            if route.applies(port, request, source):
                return route
        return None

    def choices(
        self,
        service: Service,
        port: int,
        request: Request,
        source_labels: Mapping[str, str] = NO_LABELS,
        *,
        healthy: Callable[[Endpoint], bool] | None = None,
    ) -> RouteChoices:
        """What :meth:`decide` chooses from for *request*, without choosing.

        The route that applies and each of its destinations with its weight,
        its healthy endpoints (all of them when none is: panic mode, as in
        :meth:`_balance`; with an outlier detection policy, when fewer than
        its ``min_health_percent`` are, else possibly none) and its
        load-balancing policy. The per-request
        relay caches this and draws from it per request itself
        (:class:`l4proxy.dataplane.verdict.Verdict`).
        """
        route = self._match(service, port, request, source_labels)
        if route is None and self.refuses_unmatched(service, port, source_labels):
            return RouteChoices(service, NO_ROUTE, (), NO_ROUTE_STATUS)
        if route is None:
            own = self._own(service.host, port)
            policy = own.load_balancer
            key = (service.host, port, DEFAULT, NO_LABELS)
            hash_on = own.hash_on if policy == "HASH" else None
            all_eps = service.endpoints_for(port)
            eps = self._healthy(all_eps, healthy, own.outlier)
            only = WeightedSubset(
                1,
                service,
                DEFAULT,
                eps,
                policy,
                key,
                hash_on=hash_on,
                ejected=() if eps else all_eps,
            )
            return RouteChoices(service, DEFAULT, (only,))
        if route.cors is not None:
            preflight = route.cors.preflight(request)
            if preflight is not None:  # (after the fault, before the router: Istio's order)
                return RouteChoices(
                    service,
                    route.name,
                    (),
                    preflight.status,
                    route.timeout,
                    route.retries,
                    preflight,
                    route.fault,
                )
        cors_lines = route.cors.response_lines(request) if route.cors is not None else ()
        answer = self._answer(route, service, port, request, source_labels)
        if answer is not None:  # a redirect, a direct response
            answer = _answer_with_cors(answer, cors_lines)
            return RouteChoices(
                service,
                route.name,
                (),
                route.unresolved_status,
                route.timeout,
                route.retries,
                answer,
                route.fault,
            )
        if not route.destinations:  # every weight 0 (Gateway API): nothing serves it
            edits = _unserved_edits(route, request, cors_lines)
            nothing = WeightedSubset(
                1, service, "none", (), "", None, route.unresolved_status, edits
            )
            return RouteChoices(
                service,
                route.name,
                (nothing,),
                route.unresolved_status,
                route.timeout,
                route.retries,
                fault=route.fault,
            )
        matched = route.matched(port, request, source_labels)
        path = request.path if request is not None else None
        out: list[WeightedSubset] = []
        unresolved = ejected = False
        for dest in route.destinations:
            target = self._target(service, dest)
            if target is None:
                unresolved = True
                out.append(
                    WeightedSubset(
                        dest.weight,
                        service,
                        dest.subset.name,
                        (),
                        "",
                        None,
                        route.unresolved_status,
                        with_cors_lines(self._edits(route, dest, matched, path), cors_lines),
                    )
                )
                continue
            tport = self._target_port(target, dest, port, same=target is service)
            all_eps = self._subset_endpoints(target, tport, dest.subset.labels)
            sub = dest.subset.on_port(tport)  # (its policy on that port)
            eps = self._healthy(all_eps, healthy, sub.outlier)
            status = route.unresolved_status
            if not all_eps:
                unresolved = True
            elif not eps:
                ejected = True
                status = NO_HEALTHY_STATUS
            key = (target.host, tport, dest.subset.name, dest.subset.labels)
            out.append(
                WeightedSubset(
                    dest.weight,
                    target,
                    dest.subset.name,
                    eps,
                    sub.load_balancer,
                    key,
                    status,
                    with_cors_lines(self._edits(route, dest, matched, path), cors_lines),
                    sub.hash_on if sub.load_balancer == "HASH" else None,
                    () if eps else all_eps,
                )
            )
        # One answer for the route's empty destinations (the per-request
        # relay's Choice.status is the route's): 503 no healthy upstream
        # where every empty one is so by ejection, else the route's own
        # (each destination's is WeightedSubset.status).
        status = NO_HEALTHY_STATUS if ejected and not unresolved else route.unresolved_status
        return RouteChoices(
            service,
            route.name,
            tuple(out),
            status,
            route.timeout,
            route.retries,
            fault=route.fault,
            mirrors=self._mirrors(route, service, port, healthy),
            session=None if route.session is None else session_for(route.session, matched),
        )

    def _mirrors(
        self,
        route: Route,
        service: Service,
        port: int,
        healthy: Callable[[Endpoint], bool] | None,
    ) -> tuple[Mirror, ...]:
        """*route*'s mirrors for a request to *service* dialled on *port*:
        each one's destination resolved as a route destination's (its
        port, else the one dialled; its subset's endpoints, the healthy ones
        as :meth:`_healthy` takes them), none where its host is not in the
        registry (the relay counts those copies as dropped). Each has a
        round-robin counter of its own (``balance_key``), apart from the
        routes' own; a mirror whose endpoints differ in version a
        :class:`MirrorTag` per endpoint (``Mirror.endpoint_tags``)."""
        out = []
        for m in route.mirrors:
            dest = m.destination
            target = self._target(service, dest)
            if target is None:
                out.append(Mirror((), m.ppm, None))
                continue
            tport = self._target_port(target, dest, port, same=target is service)
            eps = self._healthy(
                self._subset_endpoints(target, tport, dest.subset.labels),
                healthy,
                dest.subset.on_port(tport).outlier,
            )
            key = ("mirror", target.host, tport, dest.subset.name, dest.subset.labels)
            version, workload = version_and_workload(target.host, dest.subset.name, eps)
            tag = MirrorTag(target.host, route.name, dest.subset.name, version, workload)
            # (each copy reported by the endpoint it went to, where they differ)
            tags = tuple(
                MirrorTag(target.host, route.name, dest.subset.name, v, w)
                for v, w in endpoint_versions(target.host, dest.subset.name, eps)
            )
            out.append(Mirror(tuple((e.address, e.port) for e in eps), m.ppm, key, tag, tags))
        return tuple(out)

    @staticmethod
    def _answer(
        route: Route,
        service: Service,
        port: int,
        request: Request | None,
        source: Mapping[str, str],
    ) -> LocalAnswer | None:
        """*route*'s own answer to *request* (None: it has destinations).
        A direct response with status 201 or 3xx gets a ``location``, the
        request's own URL, as Envoy's router adds one (RFC 9110 10.2.2):
        built per request. A request without a Host (HTTP/1.0) is taken
        for one to *service* on *port*, the name it reached (its location
        was ``http:///path``, which names no host; Istio's Envoy refuses
        HTTP/1.0 unless told a default host); at a gateway listener, which
        has no name, its location is relative where it can be
        (:func:`location`)."""
        host = service.host if port == 80 else f"{service.host}:{port}"
        if is_gateway_host(service.host):  # (a listener: no name to give)
            host = ""
        if route.direct is not None:
            d = route.direct
            if request is not None and (d.status == 201 or 300 <= d.status <= 399):
                where = location(
                    target=request.path,
                    host=request.authority or host,
                    scheme=request.scheme,
                    new_scheme=None,
                    new_host=None,
                    new_port=None,
                    derive="envoy",
                )
                return dataclasses.replace(
                    d, headers=(("location", where), *d.headers), per_request=True
                )
            return d
        if route.redirect is not None:
            match = route.matched(port, request, source)
            return route.redirect.answer(request, port, match, host)
        return None

    @staticmethod
    def _edits(
        route: Route, dest: Destination, matched: Match, target: str | None
    ) -> HeadEdits | None:
        """What a request that *route*'s block *matched* took, sent to
        *dest*, and its response, get changed in their heads.

        The route's and the destination's header edits as Envoy applies the
        lists Istio gives it: with one destination Istio appends the
        destination's to the route's list, so the destination's set wins and
        neither's remove touches the other's lines; with several, the
        destination's are its weighted cluster's, which Envoy applies first
        and the route's after (``most_specific_header_mutations_wins``
        false): the route's set wins, and its remove drops what the
        destination added. The Host: the route's rewrite, else the
        destination's (Istio's order either way). The path: the route's
        rewrite of what *matched* matched (of *target*, the request's, for a
        regex rewrite)."""
        if len(route.destinations) == 1:
            edits = compose(route.headers, dest.headers, one_list=True)
        else:
            edits = compose(dest.headers, route.headers, one_list=False)
        authority = next(
            (e.authority for e in (route.headers, dest.headers) if e and e.authority), None
        )
        path = route.rewrite.for_request(matched, target) if route.rewrite is not None else None
        if edits is None and authority is None and path is None:
            return None
        return (edits or HeadEdits())._replace(path=path, authority=authority)

    @staticmethod
    def _healthy(
        eps: Sequence[Endpoint],
        healthy: Callable[[Endpoint], bool] | None,
        outlier: OutlierPolicy | None = None,
    ) -> tuple[Endpoint, ...]:
        """The endpoints a destination takes: without *outlier* (no policy)
        its healthy ones, all when none is (Envoy's panic mode); with one,
        :meth:`OutlierPolicy.healthy_of` (its panic threshold; none may be
        left: 503)."""
        if healthy is None:
            return tuple(eps)
        if outlier is not None:
            return outlier.healthy_of(eps, healthy)
        up = tuple(e for e in eps if healthy(e))
        return up or tuple(eps)  # all down: try them all (Envoy's panic mode)

    def request_shape(self, service: Service) -> RequestShape:
        """What besides Host routing *service*'s requests reads: the target
        and headers (through which tests), the method, other headers."""
        target: list[RequestTest] | None = []
        header_tests: list[RequestTest] = []
        method = headers = matched = False
        for route in self._order.get((service.host, True), ()):
            if route.cors is not None:
                # (its answer reads the method, the Origin and
                # Access-Control-Request-Method: key headers, by value)
                method = headers = matched = True
            if route.rewrite is not None and route.rewrite.kind == "regex":
                target = None  # (the new path depends on the whole old one)
            for m in route.matches:
                test = m.uri.path_test() if m.uri is not None else None
                if m.query or m.ignore_uri_case or (m.uri is not None and test is None):
                    target = None
                elif test is not None and target is not None:
                    target.append(test)
                method = method or m.method is not None
                for _, header in m.header_tests():
                    matched = True
                    if header is None:
                        headers = True
                    else:
                        header_tests.append(header)
        if target is None:
            return RequestShape(None, method, matched)
        return RequestShape(tuple(dict.fromkeys((*target, *header_tests))), method, headers)

    def gateway_shape(self, host: str | None, port: int | None = None) -> RequestShape:
        """:meth:`request_shape` of a gateway request with Host *host* on
        listener *port*: the tests of the Ingress paths that Host may take
        (:meth:`ingress`) and what the routes of their services read."""
        chosen, default = self._ingress_group(host, port)
        tests = tuple(dict.fromkeys(t for p in chosen if (t := p.path_test()) is not None))
        shape = RequestShape(tests, False, False)
        for name in dict.fromkeys(p.service for p in (*chosen, *([default] if default else []))):
            svc = self._services.get(name)
            if svc is not None:
                shape = shape.merged(self.request_shape(svc))
        return shape

    def timed_routes(self) -> list[tuple[str, str, float]]:
        """(host, route name, timeout in seconds) of every route with a
        timeout, sorted: what --http-routing connection cannot enforce."""
        return sorted(
            (host, route.name, route.timeout)
            for host, routes in self._routes.items()
            for route in routes
            if route.timeout > 0
        )

    def retried_routes(self) -> list[tuple[str, str]]:
        """(host, route name) of every route with a retry policy, sorted:
        what --http-routing connection cannot apply either."""
        return sorted(
            (host, route.name)
            for host, routes in self._routes.items()
            for route in routes
            if route.retries is not None
        )

    def edited_routes(self) -> list[tuple[str, str]]:
        """(host, route name) of every route that edits heads (its own or a
        destination's headers, requests' or responses'; a path or Host
        rewrite), sorted: what --http-routing connection does not do
        (nothing is edited at L4; a route's own answer is given there)."""
        return sorted(
            (host, route.name)
            for host, routes in self._routes.items()
            for route in routes
            if route.edits_heads
        )

    def faulted_routes(self) -> list[tuple[str, str]]:
        """(host, route name) of every route with a fault injection,
        sorted: what --http-routing connection does not do (nothing is
        delayed or aborted at L4)."""
        return sorted(
            (host, route.name)
            for host, routes in self._routes.items()
            for route in routes
            if route.fault is not None
        )

    def mirrored_routes(self) -> list[tuple[str, str]]:
        """(host, route name) of every route that mirrors its requests,
        sorted: what --http-routing connection does not do (nothing is
        copied at L4)."""
        return sorted(
            (host, route.name)
            for host, routes in self._routes.items()
            for route in routes
            if route.mirrors
        )

    def cors_routes(self) -> list[tuple[str, str]]:
        """(host, route name) of every route with a CORS policy, sorted:
        what --http-routing connection applies only in part (a preflight
        that opens a connection is answered; no response is edited at L4)."""
        return sorted(
            (host, route.name)
            for host, routes in self._routes.items()
            for route in routes
            if route.cors is not None
        )

    def session_routes(self) -> list[tuple[str, str]]:
        """(host, route name) of every route with session persistence,
        sorted: what --http-routing connection does only in part (a
        connection goes where its first request's token says; no token is
        given, as no response is edited at L4)."""
        return sorted(
            (host, route.name)
            for host, routes in self._routes.items()
            for route in routes
            if route.session is not None
        )

    def _hashes(self) -> Iterator[tuple[str, str, HashOn]]:
        """(host, subset, policy) of every consistent hash in use: each
        host's own (subset ``default``) and each route destination's, on
        every port and on those of its ``portLevelSettings``."""
        subsets = [(host, own) for host, own in self._own_policies.items()]
        for routes in self._routes.values():
            for route in routes:
                subsets.extend((dest.host, dest.subset) for dest in route.destinations)
        for host, subset in subsets:
            for sub in (subset, *(s for _, s in subset.ports)):
                if sub.hash_on is not None:
                    yield host, sub.name, sub.hash_on

    @functools.cached_property
    def hashes_sources(self) -> bool:
        """Whether some consistent hash reads the client's address
        (useSourceIp): what the worker then asks of each connection."""
        return any(h.kind == HASH_SOURCE_IP for _, _, h in self._hashes())

    def generated_cookies(self) -> list[tuple[str, str]]:
        """(host, subset) of every consistent hash that generates a cookie
        (``httpCookie.ttl``; the host's own policy: subset ``default``),
        sorted: what --http-routing connection does not do (no head is
        edited at L4, so no ``set-cookie`` goes)."""
        return sorted({(host, subset) for host, subset, h in self._hashes() if h.ttl is not None})

    def match_headers(self) -> frozenset[str]:
        """Every header name some route matches on (lowercase): with the
        method, Host and target, what a request's route depends on."""
        names: set[str] = set()
        for routes in self._order.values():
            for route in routes:
                for m in route.matches:
                    names.update(name for name, _ in m.header_tests())
                if route.cors is not None:
                    names.update(CORS_KEY_HEADERS)
        return frozenset(names)

    def _pick(self, destinations: tuple[Destination, ...]) -> Destination:
        if len(destinations) == 1:
            return destinations[0]
        total = sum(d.weight for d in destinations)
        if total <= 0:
            return destinations[0]
        r = self._rng.randrange(total)
        for d in destinations:
            r -= d.weight
            if r < 0:
                return d
        return destinations[-1]  # unreachable: r < total

    def _target(self, service: Service, dest: Destination) -> Service | None:
        """The service *dest* routes to from *service*'s route: *service*
        itself, the registry's, or None (not resolved, or refused)."""
        if dest.refused:
            return None
        return service if dest.host == service.host else self._services.get(dest.host)

    @staticmethod
    def _target_port(target: Service, dest: Destination, dialled: int, *, same: bool) -> int:
        if dest.port is not None:
            return dest.port
        if same or target.port(dialled) is not None or len(target.ports) != 1:
            return dialled
        # Another host with a single port: Istio lets the port be omitted.
        return target.ports[0].number

    def _subset_endpoints(self, svc: Service, port: int, labels: Labels) -> tuple[Endpoint, ...]:
        """The endpoints of *svc* on *port* that *labels* select, in their
        order: those that carry its rarest label, tried (an index of the
        port's endpoints by label, made once), where each subset tried every
        endpoint: pool_settings() and outlier_policies() of 5,000 subsets
        over 5,000 endpoints held a worker's event loop for 25 s at each
        reload."""
        key = (svc.host, port, labels)
        eps = self._subset_cache.get(key)
        if eps is None:
            every = svc.endpoints_for(port)
            if not labels:
                eps = every
            else:
                index = self._label_index.get((svc.host, port))
                if index is None:
                    index = defaultdict(list)
                    for i, e in enumerate(every):
                        for item in e.labels.items():
                            index[item].append(i)
                    self._label_index[(svc.host, port)] = index
                rarest = min((index.get(item, []) for item in labels.items()), key=len)
                eps = tuple(every[i] for i in rarest if labels.selects(every[i].labels))
            self._subset_cache[key] = eps
        return eps

    def _balance(
        self,
        eps: Sequence[Endpoint],
        key: tuple[str, int, str, Labels],
        policy: str,
        healthy: Callable[[Endpoint], bool] | None,
        active: Callable[[Endpoint], int] | None,
        outlier: OutlierPolicy | None = None,
        hkey: int | None = None,
    ) -> list[Endpoint]:
        # Without a policy, all down: try them all anyway (Envoy's panic
        # mode) rather than fail a request that might succeed; with one, its
        # panic threshold says (none left: the caller answers 503).
        candidates = list(self._healthy(eps, healthy, outlier))
        if not candidates:
            return []
        if policy == "HASH" and hkey is not None:
            # consistent hashing on the request's key (_hash_key) over the
            # candidates in table order, what choices() gives the compiled
            # relay: both send a key to the same endpoint
            hashes = [endpoint_hash((e.address, e.port)) for e in candidates]
            return [candidates[i] for i in hash_order(hkey, hashes)]
        n = len(candidates)
        if policy == "RANDOM":
            start = self._rng.randrange(n)
        else:
            # a new counter starts at its drawn offset, not at the first
            # endpoint (Envoy's random start: see rr_start)
            at = self._rr.get(key)
            start = (rr_start(self._rr_salt, key) if at is None else at) % n
            self._rr[key] = start + 1
        ordered = candidates[start:] + candidates[:start]
        if policy == "LEAST_REQUEST" and active is not None:
            # Every candidate compared, not Envoy's two drawn at random (its
            # FULL_SCAN: the README's Load balancing says why; the compiled
            # relay's pick() does the same). Stable sort: equally loaded
            # endpoints keep the round-robin order, so an idle subset still
            # spreads evenly.
            ordered.sort(key=active)
        return ordered

    # -- gateway mode -------------------------------------------------------

    def ingress(
        self, host: str | None, path: str, port: int | None = None
    ) -> tuple[Service, ServicePort] | None:
        """Gateway mode: the Ingress backend for *host* (Host header) and *path*.

        The most specific host wins (exact, then ``*.suffix``, then rules
        without host); within it Exact paths are tried first, then prefixes
        longest first; then the default backend. None: no route, or the
        backend service is not in the registry. *port* is the local port the
        connection arrived on: paths of a Gateway listener on another port are
        skipped (None: none is).
        """
        hit = self.ingress_path(host, path, port)
        return None if hit is None else self.ingress_backend(hit)

    def ingress_path(
        self, host: str | None, path: str, port: int | None = None
    ) -> IngressPath | None:
        """The Ingress path (or default backend) :meth:`ingress` takes for
        *host*, *path* and *port*, whether or not its backend resolves."""
        path = _strip_query(path) or "/"
        chosen, default = self._ingress_group(host, port)
        exact = [p for p in chosen if p.path_type == "Exact"]
        prefixes = sorted((p for p in chosen if p.path_type != "Exact"), key=lambda p: -len(p.path))
        return next((p for p in (*exact, *prefixes) if p.matches_path(path)), default)

    def ingress_backend(self, hit: IngressPath) -> tuple[Service, ServicePort] | None:
        """*hit*'s backend service and port; None while the registry has no
        such service, or the service no such port."""
        svc = self._services.get(hit.service)
        if svc is None:
            return None
        sport = svc.port(hit.port) if isinstance(hit.port, int) else svc.port_by_name(hit.port)
        return None if sport is None else (svc, sport)

    def _ingress_group(
        self, host: str | None, port: int | None
    ) -> tuple[list[IngressPath], IngressPath | None]:
        """The Ingress paths a request with Host *host* on *port* chooses
        from (the most specific host's), and the default backend."""
        name = None if not host else _split_host_port(host)[0]
        groups: list[list[IngressPath]] = [[], [], []]
        default: IngressPath | None = None
        for ip in self._ingress:
            if ip.listener_port is not None and port is not None and ip.listener_port != port:
                continue
            if ip.path_type == "Default":
                default = default or ip
            elif ip.host is None:
                groups[2].append(ip)
            elif name is not None and ip.host == name:
                groups[0].append(ip)
            elif (
                name is not None
                and ip.host.startswith("*.")
                and name.endswith(ip.host[1:])
                # Ingress: one label; the Gateway API: one or more
                and (ip.listener_port is not None or "." not in name[: -len(ip.host) + 1])
            ):
                groups[1].append(ip)
        if groups[1]:  # the longest wildcard suffix that matches
            longest = max(len(ip.host or "") for ip in groups[1])
            groups[1] = [ip for ip in groups[1] if len(ip.host or "") == longest]
        return next((g for g in groups if g), []), default

    # -- dump ---------------------------------------------------------------

    def _route_json(self, host: str, route: Route) -> dict[str, Any]:
        """*route* of *host* as JSON, with ``not_on``: the ports of host's
        service that its match blocks serve and its kind does not
        (:meth:`route_ports`: an HTTP port for a ``tcp`` route, a TCP port
        it does not name for an ``http`` one), and ``ports``, those it
        serves, where there are any such."""
        out = route.to_json()
        svc = self._services.get(host)
        if svc is None or svc.role != "service":
            return out
        ports = self.route_ports(svc, route)
        not_on = [
            p.number for p in svc.ports if route.serves(p.number, None) and p.number not in ports
        ]
        if not_on:
            out["ports"] = ports
            out["not_on"] = not_on
        return out

    def to_json(self) -> dict[str, Any]:
        """The whole table as JSON-able data (admin ``/config_dump``, ``validate -v``)."""
        return {
            "namespace": self.namespace,
            "domain": self.domain,
            "services": [
                {
                    **svc.to_json(),
                    **self._own(svc.host).policy_json(),
                    "port_level": self._own(svc.host).port_level_json(),
                }
                for svc in self._services.values()
            ],
            "routes": {
                host: [self._route_json(host, r) for r in rs] for host, rs in self._routes.items()
            },
            # hosts whose unmatched requests get 404, with the ports where
            # that holds (for some caller): see refuses_unmatched
            "unmatched": {
                host: sorted(p.number for p in svc.ports if self.refuses_unmatched(svc, p.number))
                for host in sorted(self._unmatched)
                if (svc := self._services.get(host)) is not None
            },
            # the ports of each routed host where some route takes every
            # request and connection: nothing is left to "otherwise" there
            "caught": {
                host: caught
                for host in sorted(self._routes)
                if (svc := self._services.get(host)) is not None
                and (
                    caught := [
                        p.number for p in svc.ports if self._takes_every_connection(svc, p.number)
                    ]
                )
            },
            "ingress": [p.to_json() for p in self._ingress],
            # per endpoint, what its upstream connections use (pool_settings)
            "connection_pools": {
                endpoint_name(address, port): settings.to_json()
                for (address, port), settings in self.pool_settings().items()
            },
            # per endpoint, the outlier detection policy it is held to
            # (outlier_policies)
            "outlier_policies": {
                endpoint_name(address, port): policy.to_json()
                for (address, port), policy in self.outlier_policies().items()
            },
        }


def _with_cookie(
    edits: HeadEdits | None, hash_on: HashOn | None, made: str | None
) -> HeadEdits | None:
    """*edits* with the generated cookie *made* (None: none) set in the
    response: its ``set-cookie`` line after the route's and destination's
    own response lines (verdict.HashOn.set_cookie)."""
    if made is None or hash_on is None:
        return edits
    edits = edits or HeadEdits()
    line = ("set-cookie", hash_on.set_cookie(made))
    return edits._replace(response_add=(*edits.response_add, line))


# a regular expression's metacharacters (an element with one is no literal
# path), and what a cookie's Path cannot hold: ';' (it would end the
# attribute), a control character, anything not ASCII (see _networking)
_REGEX_META = re.compile(r"[\\.^$|?*+()\[\]{}]")
_NOT_IN_COOKIE_PATH = re.compile(r"[^\x20-\x7e]|;")


@functools.lru_cache(maxsize=1024)
def session_cookie_path(match: Match) -> str:
    """The Path of the session cookie of a request that *match* took, as
    Envoy Gateway derives it from the route's path match: an Exact path's
    value, a PathPrefix's (its trailing ``/`` dropped, as the route keeps
    it: ``/cart`` covers ``/cart`` and ``/cart/x``), a
    RegularExpression's longest prefix of whole elements without a
    regular expression's metacharacter (GEP-1619's rule:
    ``/p1/p2/.*/p3`` gives ``/p1/p2``; Envoy Gateway stops only at an
    element with a ``*``), none for one with alternatives (``|``); no path
    match, ``/``. Elements from the first that a cookie's Path cannot hold
    (``;``, a control character, non-ASCII) on are left out; nothing
    left, ``/``."""
    uri = match.uri
    if uri is None or (uri.kind == "regex" and "|" in uri.value):
        return "/"
    keep: list[str] = []
    for element in uri.value.split("/"):
        if _NOT_IN_COOKIE_PATH.search(element) or (
            uri.kind == "regex" and _REGEX_META.search(element)
        ):
            break
        keep.append(element)
    path = "/".join(keep)
    return path if path.startswith("/") else "/"


def session_for(session: SessionPersistence, matched: Match) -> SessionPersistence:
    """*session* (a route's) for a request that its block *matched* took:
    a cookie's with that block's path (:func:`session_cookie_path`)."""
    if session.kind == SESSION_HEADER:
        return session
    return session._replace(path=session_cookie_path(matched))


def session_json(session: SessionPersistence, matches: Sequence[Match]) -> dict[str, Any]:
    """A route's session persistence for ``validate -v``: its kind, name,
    and for a cookie its ``max_age`` (None: a session cookie) and the
    ``paths`` of its match blocks' cookies, in order."""
    out: dict[str, Any] = {"kind": session.kind, "name": session.name}
    if session.kind != SESSION_HEADER:
        out["max_age"] = session.max_age
        out["paths"] = [session_cookie_path(m) for m in matches or (Match(),)]
    return out


def endpoint_name(address: str, port: int) -> str:
    """``address:port``, an IPv6 address in brackets (``[::1]:8080``)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"

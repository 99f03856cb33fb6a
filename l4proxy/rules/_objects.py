"""What each document said, before the cross-document checks.

The kind readers (``_routerule``, ``_networking``, ``_ingress``,
``_gateway_api``, ``_istio_gateway_servers``) turn one document into one of these
drafts; ``_table`` checks them against each other
(subsets against DestinationRules, labels against ServiceEntry endpoints,
duplicate names and hosts) and compiles the :class:`~l4proxy.rules.routing.RouteTable`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from l4proxy.dataplane.verdict import Fault, HashOn, HeadEdits, SessionPersistence
from l4proxy.rules._schema import Ctx, Where, dotted, integer
from l4proxy.rules._yaml import Path
from l4proxy.rules.routing import (
    NO_POOL_SETTINGS,
    CorsPolicy,
    HttpRetry,
    IngressPath,
    Labels,
    LocalAnswer,
    Match,
    OutlierPolicy,
    PoolSettings,
    Redirect,
    Service,
    Subset,
    UriRewrite,
)

# Endpoints a load's ServiceEntries may make: each port of a service has its
# own copy of every endpoint (its target port), so a ServiceEntry makes its
# ports times its endpoints (times its hosts, for DNS ones without endpoints,
# each its own name). 5,000 services of 50 pods on two ports are 500,000.
# Without a bound an 850 KB ServiceEntry of 1,000 ports and 30,000 endpoints
# made 30 million (2.4 GB, 30 s), and one at the node budget 260 million.
MAX_ENDPOINTS = 500_000


class EndpointBudget:
    """What is left of :data:`MAX_ENDPOINTS` for one load (:class:`Env`)."""

    def __init__(self, limit: int = MAX_ENDPOINTS) -> None:
        self.limit = limit
        self.taken = 0

    def take(self, n: int) -> bool:
        """Whether *n* more endpoints fit (then they are taken)."""
        if self.taken + n > self.limit:
            return False
        self.taken += n
        return True


@dataclass(frozen=True)
class Env:
    """Loader parameters: the namespace of objects without one (the
    sidecar's own), the cluster domain; the labels of the pod the sidecar
    runs in (None: not known, as to ``l4proxy validate`` without
    ``--pod-labels``), which pick the DestinationRules of a
    ``workloadSelector`` that apply (``_table._policies``); and the load's
    :class:`EndpointBudget` (one Env a load)."""

    namespace: str = "default"
    domain: str = "cluster.local"
    endpoints: EndpointBudget = field(
        default_factory=EndpointBudget, compare=False, hash=False, repr=False
    )
    pod_labels: Mapping[str, str] | None = field(default=None, compare=False, hash=False)


def fqdn(host: str, namespace: str, env: Env) -> str:
    """A rule's host as the table keys it.

    ``name`` and ``name.ns.svc`` are expanded the way Kubernetes DNS resolves
    them from a pod; anything else with a dot is taken as written (we cannot
    tell ``bootcamp.default`` from ``example.com``).
    """
    host = host.lower().rstrip(".")
    if "." not in host:
        return f"{host}.{namespace}.svc.{env.domain}"
    if host.endswith(".svc"):
        return f"{host}.{env.domain}"
    return host


def aliases(host: str, env: Env) -> tuple[str, ...]:
    """The other names a Host header may use for *host* (see ``fqdn``)."""
    suffix = f".svc.{env.domain}"
    if not host.endswith(suffix):
        return ()
    parts = host[: -len(suffix)].split(".")
    if len(parts) != 2:
        return ()
    name, ns = parts
    out = [f"{name}.{ns}", f"{name}.{ns}.svc"]
    if ns == env.namespace:
        out.insert(0, name)
    return tuple(out)


def oldest_first(created: float | None) -> tuple[bool, float]:
    """The sort key of an object by its ``metadata.creationTimestamp``
    (*created*), the oldest first, one without it after every one with it
    (as an object not yet created is the newest), as Istio orders the
    VirtualServices merged at a gateway and the Gateway API the routes
    whose matches tie. Each caller breaks ties its own way."""
    return (created is None, created or 0.0)


@dataclass
class DestinationDraft:
    host: str  # FQDN
    weight: int
    port: int | None
    subset: str | None  # VirtualService: a DestinationRule subset's name
    labels: Labels | None  # RouteRule: an inline label selector
    where: Where
    headers: HeadEdits | None = None  # Destination.headers


# The name in a VirtualService's ``gateways`` (and a match block's) that
# stands for the sidecars' own traffic
MESH = "mesh"


@dataclass(frozen=True)
class GatewayRef:
    """A name in a VirtualService's ``gateways`` or a match block's:
    ``mesh`` (the sidecars; namespace ``""``) or an Istio Gateway, by
    namespace and name as Istio resolves the reference (a short name is in
    the VirtualService's namespace)."""

    namespace: str
    name: str
    where: Where = field(compare=False)

    @property
    def is_mesh(self) -> bool:
        return not self.namespace and self.name == MESH

    @property
    def key(self) -> str:
        """``mesh``, or ``namespace/name``."""
        return MESH if self.is_mesh else f"{self.namespace}/{self.name}"


@dataclass
class MatchBlockDraft:
    """One ``match`` block of a VirtualService http route some block of
    which names ``gateways``: its match, and the gateways it applies at
    (empty: those of its VirtualService)."""

    match: Match
    gateways: tuple[GatewayRef, ...]


@dataclass
class RouteDraft:
    name: str
    protocol: Literal["http", "tcp"]
    matches: tuple[Match, ...]
    destinations: list[DestinationDraft]
    timeout: float = 0.0  # seconds (Route.timeout); 0: none
    retries: HttpRetry | None = None  # Route.retries
    headers: HeadEdits | None = None  # Route.headers
    rewrite: UriRewrite | None = None  # Route.rewrite
    redirect: Redirect | None = None  # Route.redirect
    direct: LocalAnswer | None = None  # Route.direct
    fault: Fault | None = None  # Route.fault
    # Route.mirrors: each mirror's destination and its share (ppm)
    mirrors: list[tuple[DestinationDraft, int]] = field(default_factory=list)
    cors: CorsPolicy | None = None  # Route.cors
    # Where a match block names gateways: every block, in order (matches
    # then holds each block's match, none taken for a catch-all); None: no
    # block names one, and matches is the route's everywhere it applies
    blocks: tuple[MatchBlockDraft, ...] | None = None
    # its line, and each match's (a VirtualService's: for the warnings of
    # routes merged at a gateway; None, {}: a RouteRule's)
    where: Where | None = None
    lines: dict[Match, Where] = field(default_factory=dict)


@dataclass
class RuleDraft:
    """One RouteRule or VirtualService."""

    kind: str
    name: str
    namespace: str
    hosts: list[str]
    routes: list[RouteDraft]
    where: Where
    precedence: int = 0
    # A VirtualService's spec.gateways; None: not given, the sidecars only
    gateways: tuple[GatewayRef, ...] | None = None
    # A VirtualService's metadata.creationTimestamp, seconds since the
    # epoch: the order its routes are merged in at a gateway; None: not given
    created: float | None = None

    @property
    def bound(self) -> tuple[str, ...]:
        """The gateways it applies at (:attr:`GatewayRef.key`), ``mesh``
        among them where it routes the sidecars' traffic."""
        if self.gateways is None:
            return (MESH,)
        return tuple(dict.fromkeys(g.key for g in self.gateways))


@dataclass
class PortPolicyDraft:
    """One entry of a trafficPolicy's ``portLevelSettings``: the policy of
    the traffic to service port ``port``, all of it (what it leaves out is
    the default, not its trafficPolicy's: Istio's API says so, and pilot's
    GetPortLevelTrafficPolicy takes the entry alone)."""

    port: int
    load_balancer: str | None
    where: Where
    pool: PoolSettings | None = None  # its connectionPool
    outlier: OutlierPolicy | None = None  # its outlierDetection
    # with load_balancer "HASH" (its loadBalancer.consistentHash): what
    # each request is hashed on
    hash_on: HashOn | None = None


@dataclass
class SubsetDraft:
    name: str
    labels: Labels
    load_balancer: str | None
    where: Where
    # its trafficPolicy.connectionPool; None: none, the rule's applies
    pool: PoolSettings | None = None
    # its trafficPolicy.outlierDetection; None: none, the rule's applies
    outlier: OutlierPolicy | None = None
    # with load_balancer "HASH" (its loadBalancer.consistentHash): what
    # each request is hashed on
    hash_on: HashOn | None = None
    # its trafficPolicy.portLevelSettings, by service port
    port_level: dict[int, PortPolicyDraft] = field(default_factory=dict)


@dataclass
class PolicyDraft:
    """One DestinationRule."""

    name: str
    namespace: str
    host: str
    load_balancer: str | None
    subsets: dict[str, SubsetDraft] = field(default_factory=dict)
    where: Where | None = None
    pool: PoolSettings | None = None  # trafficPolicy.connectionPool
    outlier: OutlierPolicy | None = None  # trafficPolicy.outlierDetection
    # with load_balancer "HASH" (loadBalancer.consistentHash): what each
    # request is hashed on
    hash_on: HashOn | None = None
    # trafficPolicy.portLevelSettings, by service port
    port_level: dict[int, PortPolicyDraft] = field(default_factory=dict)
    # workloadSelector.matchLabels: the client pods (sidecars) of its
    # namespace it applies to (empty: every one); None: no workloadSelector,
    # every sidecar the rule is exported to
    selector: Labels | None = None
    # metadata.creationTimestamp, seconds since the epoch: of two rules of a
    # workloadSelector that select one pod, the older applies (pilot's
    # order); None: not given
    created: float | None = None


# A load balancer policy and, with "HASH", what it hashes (Subset.load_balancer,
# Subset.hash_on)
Balancer = tuple[str, HashOn | None]


def rule_lb(policy: PolicyDraft | None) -> Balancer:
    """The load balancer of a host's requests without a subset: its
    DestinationRule's own loadBalancer (none: ROUND_ROBIN)."""
    if policy is None or policy.load_balancer is None:
        return "ROUND_ROBIN", None
    return policy.load_balancer, policy.hash_on


def subset_lb(sd: SubsetDraft, rule: Balancer) -> Balancer:
    """A subset's load balancer: its own loadBalancer (simple or
    consistentHash, with what it hashes), else the rule's."""
    return rule if sd.load_balancer is None else (sd.load_balancer, sd.hash_on)


def rule_pool(policy: PolicyDraft | None) -> PoolSettings:
    """The connection pool settings of a host's requests without a subset:
    its DestinationRule's own (none: all unset)."""
    return (policy.pool if policy else None) or NO_POOL_SETTINGS


def subset_pool(sd: SubsetDraft, rule: PoolSettings) -> PoolSettings:
    """A subset's connection pool settings: its own connectionPool, all of
    it (what it leaves unset is not taken from the rule's: Istio's
    MergeTrafficPolicy replaces the field whole), else the rule's."""
    return rule if sd.pool is None else sd.pool


def rule_outlier(policy: PolicyDraft | None) -> OutlierPolicy | None:
    """The outlier detection of a host's requests without a subset: its
    DestinationRule's own (None: none)."""
    return policy.outlier if policy else None


def subset_outlier(sd: SubsetDraft, rule: OutlierPolicy | None) -> OutlierPolicy | None:
    """A subset's outlier detection: its own outlierDetection, all of it
    (what it leaves unset is Istio's default, not the rule's: Istio's
    MergeTrafficPolicy replaces the field whole), else the rule's."""
    return rule if sd.outlier is None else sd.outlier


def policy_subset(
    policy: PolicyDraft | None, sd: SubsetDraft | None, name: str, labels: Labels
) -> Subset:
    """The :class:`Subset` *name* (*labels*) of *policy*'s host, with the
    policy of its DestinationRule subset *sd* (None: the rule's own, for
    a destination without a subset), on every port and on each port
    that a ``portLevelSettings`` entry names (``Subset.ports``).

    On a service port, as Istio's pilot merges them
    (MergeSubsetTrafficPolicy): the rule's entry for the port, whole,
    else the rule's own policy; then, with *sd*, the subset's entry for
    the port, whole, else each component the subset's trafficPolicy sets
    in place of that one's. Whole: an entry's load balancer, connection
    pool and outlier detection replace the others', what it leaves out
    is the default (round robin, the flags, none), never inherited."""

    def on(port: int | None) -> Subset:
        lb, pool, outlier = rule_lb(policy), rule_pool(policy), rule_outlier(policy)
        entry = policy.port_level.get(port) if policy is not None and port is not None else None
        if entry is not None:
            lb, pool, outlier = _whole(entry)
        if sd is not None:
            own = sd.port_level.get(port) if port is not None else None
            if own is not None:
                lb, pool, outlier = _whole(own)
            else:
                lb, pool = subset_lb(sd, lb), subset_pool(sd, pool)
                outlier = subset_outlier(sd, outlier)
        return Subset(name, labels, lb[0], pool, outlier, lb[1])

    ports = sorted(
        {*(policy.port_level if policy is not None else ()), *(sd.port_level if sd else ())}
    )
    return dataclasses.replace(on(None), ports=tuple((p, on(p)) for p in ports))


def _whole(entry: PortPolicyDraft) -> tuple[Balancer, PoolSettings, OutlierPolicy | None]:
    """A portLevelSettings entry's components, the defaults for those it
    leaves out."""
    lb: Balancer = (entry.load_balancer or "ROUND_ROBIN", entry.hash_on)
    return lb, entry.pool or NO_POOL_SETTINGS, entry.outlier


@dataclass
class ServiceDraft:
    """One host of a ServiceEntry."""

    entry: str
    service: Service
    where: Where


@dataclass
class IngressDraft:
    path: IngressPath
    where: Where


MAX_RELATIVE_WEIGHT = 2**31 - 1  # Istio's weight is an int32


def weights(
    ctx: Ctx, entries: list[tuple[Any, Path]], path: Path, relative: bool = False
) -> list[int] | None:
    """Route weights: one entry may omit its weight (100); several must total 100.

    Istio 0.x and v1alpha3 required exactly 100 and a wrong total took hosts
    down (istio/api #586), so a wrong total is refused here, before any use.
    With *relative* (VirtualService: Istio 1.15 and later, istio/istio
    #39544), a destination gets ``weight / sum of weights`` of the requests:
    any total above 0 does, and a lone destination gets them all whatever
    its weight says.
    """
    if len(entries) == 1 and entries[0][0] is None:
        return [100]
    limit = MAX_RELATIVE_WEIGHT if relative else 100
    out: list[int] = []
    ok = True
    for value, wpath in entries:
        if value is None:
            out.append(0)  # Istio: an omitted weight among several is 0
            continue
        w = integer(ctx, value, wpath, 0, limit, what="weight")
        if w is None:
            ok = False
        else:
            out.append(w)
    if not ok:
        return None
    if relative and len(entries) == 1:
        return [100]  # a lone destination gets everything, whatever its weight
    total = sum(out)
    if relative and total <= 0:
        ctx.error(path, "route weights total 0: at least one destination needs a weight above 0")
        return None
    if relative and total != 100:  # (allowed since Istio 1.15: a typo shows here)
        shares = ", ".join(f"{100 * w / total:.4g} %" for w in out)
        ctx.note(
            path,
            f"route weights total {total}, not 100: the destinations get {shares} of the "
            "requests (weight / total, as Istio since 1.15)",
        )
    if not relative and total != 100:
        ctx.error(
            path,
            f"route weights total {total} (must total 100)"
            + ("" if len(entries) > 1 else f": {dotted(entries[0][1])} must be 100 or omitted"),
        )
        return None
    return out


# -- Gateway API (HTTPRoute, Gateway) -----------------------------------------


@dataclass
class ListenerDraft:
    name: str
    port: int
    hostname: str | None  # lower case; ``*.example.com`` allowed
    all_namespaces: bool  # allowedRoutes.namespaces.from: All (else Same)
    where: Where


@dataclass
class GatewayDraft:
    name: str
    namespace: str
    listeners: list[ListenerDraft]
    where: Where


@dataclass
class ParentDraft:
    kind: Literal["Service", "Gateway"]
    name: str
    namespace: str
    port: int | None
    section: str | None
    where: Where
    # the namespace as the reference writes it (None: not given, the
    # route's): the API's CEL rules on parentRefs compare it so
    written_namespace: str | None = None


@dataclass
class BackendDraft:
    host: str  # FQDN of the backend Service
    name: str
    port: int
    weight: int
    where: Where
    headers: HeadEdits | None = None  # its filters' (Destination.headers)
    # another namespace's Service: (the route's namespace, the Service's),
    # which a ReferenceGrant in the Service's must permit; None: the route's
    crossing: tuple[str, str] | None = None


@dataclass(frozen=True)
class GrantDraft:
    """A ReferenceGrant (gateway.networking.k8s.io): in *namespace*, the
    objects of *targets* ((group, kind, name); name None: any of that kind)
    may be referred to from the objects of *sources* ((group, kind,
    namespace)). A reference to another namespace needs one; the grant
    lives in the namespace referred to, as its owner's consent."""

    name: str
    namespace: str
    sources: tuple[tuple[str, str, str], ...]
    targets: tuple[tuple[str, str, str | None], ...]
    where: Where

    def permits(self, source: tuple[str, str, str], target: tuple[str, str, str]) -> bool:
        """Whether *source* (group, kind, namespace) may refer to *target*
        (group, kind, name) in this grant's namespace."""
        group, kind, name = target
        return source in self.sources and any(
            (g, k) == (group, kind) and n in (None, name) for g, k, n in self.targets
        )


@dataclass
class HttpMatchDraft:
    match: Match
    # Gateway API precedence, smaller first: path kind (Exact, PathPrefix,
    # RegularExpression, PathPrefix /), longer path first, method given first, more headers
    # first, more query parameters first.
    rank: tuple[int, int, int, int, int]
    where: Where | None = None  # its line (None: a rule's default match, every request)


@dataclass
class HttpRuleDraft:
    name: str  # the compiled route's name
    matches: list[HttpMatchDraft]  # empty: every request
    backends: list[BackendDraft]
    where: Where
    timeout: float = 0.0  # timeouts.request, seconds (Route.timeout); 0: none
    retries: HttpRetry | None = None  # retry (Route.retries)
    headers: HeadEdits | None = None  # its filters' (Route.headers)
    rewrite: UriRewrite | None = None  # URLRewrite's path (Route.rewrite)
    redirect: Redirect | None = None  # RequestRedirect (Route.redirect)
    # RequestMirror filters (Route.mirrors): each one's backend and share (ppm)
    mirrors: list[tuple[BackendDraft, int]] = field(default_factory=list)
    cors: CorsPolicy | None = None  # its CORS filter (Route.cors)
    session: SessionPersistence | None = None  # sessionPersistence (Route.session)


@dataclass
class HttpRouteDraft:
    name: str
    namespace: str
    parents: list[ParentDraft]
    hostnames: list[str]
    rules: list[HttpRuleDraft]
    where: Where
    # metadata.creationTimestamp, seconds since the epoch: the older of two
    # routes wins a tie of precedence (the API's rule); None: not given
    created: float | None = None


# -- Istio Gateway (networking.istio.io) -----------------------------------------


@dataclass(frozen=True)
class ServerHostDraft:
    """One of an Istio Gateway server's ``hosts``: which VirtualServices it
    admits (*namespace*: theirs, or ``*`` for any) and for which names
    (*hostname*: ``*``, ``*.example.com`` or a name, lower case)."""

    namespace: str
    hostname: str
    where: Where = field(compare=False)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.hostname}"


@dataclass
class ServerDraft:
    port: int  # port.number: the local port of a gateway listener
    port_name: str  # port.name, unique in its Gateway
    hosts: list[ServerHostDraft]
    where: Where
    # tls.httpsRedirect: every request of its names answered 301 to https
    https_redirect: bool = False


@dataclass
class IstioGatewayDraft:
    name: str
    namespace: str
    servers: list[ServerDraft]  # its HTTP servers, the ones served
    where: Where
    # its HTTPS and TLS servers, not served (a warning each): ``server I
    # (PROTOCOL, port N)``, for the messages that list its servers
    skipped: list[str] = field(default_factory=list)
    # of those, (port number, ``server I (PROTOCOL, port N)``): the worker
    # warns of a --listen port that only such a server names
    unserved: list[tuple[int, str]] = field(default_factory=list)


# Routes the table may hold in all, counted as they are compiled: each host
# of a VirtualService, and each hostname an HTTPRoute gives a Gateway
# listener, holds its own copy of every route, so the count is hosts times
# routes. 2,000 VirtualServices of three hosts and ten routes each are
# 60,000. Without a bound a 220 KB VirtualService of 2,000 hosts and 2,000
# routes was 4 million routes (30 s, 2 GB), an HTTPRoute's 140 KB of 1,500
# hostnames and rules 42 s and 1.9 GB, and one at the node budget took the
# sidecar's reload thread past any memory limit.
MAX_ROUTES = 100_000


class RouteBudget:
    """What is left of :data:`MAX_ROUTES` for one load. The first take
    over it is an error at the object that made it (one for the load),
    and every take after it fails: the load fails, and nothing more is
    compiled."""

    def __init__(self, limit: int = MAX_ROUTES) -> None:
        self.limit = limit
        self.taken = 0
        self.spent = False

    def take(self, n: int, where: Where, what: str) -> bool:
        """Whether *n* more routes fit; *what* says whose they are."""
        if self.spent:
            return False
        if self.taken + n <= self.limit:
            self.taken += n
            return True
        self.spent = True
        before = f" (with the {self.taken:,} before them)" if self.taken else ""
        where.error(
            f"{what} are {n:,} routes{before}, more than the {self.limit:,} the "
            "rules may make in all: each host (each hostname at a Gateway listener) "
            "holds its own copy of every route its object has, so give one object "
            "fewer hosts or fewer routes"
        )
        return False

"""Cross-document checks, and compiling the drafts into one RouteTable.

Rules, subsets and the registry are checked together because Istio users were
bitten by them drifting apart (a route naming a subset that did not exist
yet gave 503s, istio/istio #5204): here a table that would misroute is never
built. What only *may* become valid later (a rule for a service no
ServiceEntry describes yet) is a warning, so that rules and registry can live
in separate files and be rolled out in either order.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from l4proxy.rules._errors import UNRESOLVED
from l4proxy.rules._gateway_api import Compiler
from l4proxy.rules._istio_gateway import bind, check_claims, check_paths, routes_for
from l4proxy.rules._objects import (
    MESH,
    DestinationDraft,
    Env,
    GatewayDraft,
    GrantDraft,
    HttpRouteDraft,
    IngressDraft,
    IstioGatewayDraft,
    PolicyDraft,
    RouteBudget,
    RouteDraft,
    RuleDraft,
    ServiceDraft,
    oldest_first,
    policy_subset,
)
from l4proxy.rules._schema import Where
from l4proxy.rules.routing import (
    DEFAULT,
    Destination,
    Endpoint,
    Labels,
    MirrorPolicy,
    Route,
    RouteTable,
    Service,
    Subset,
)


class Selectable:
    """The distinct label sets of a service's endpoints, indexed by label:
    whether a selector selects any of them is tried on the sets that carry
    its rarest label (and remembered), where every endpoint was tried for
    every subset and every route's labels, each time with the service's
    endpoints gathered anew: a DestinationRule of 6,000 subsets over
    6,000 endpoints was 29 s of the reload thread (and 500 KB)."""

    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        self.sets: list[Labels] = list(dict.fromkeys(Labels(e.labels) for e in endpoints))
        self.by_label: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, labels in enumerate(self.sets):
            for item in labels.items():
                self.by_label[item].append(i)
        self.seen: dict[Labels, bool] = {}

    def any(self, selector: Labels) -> bool:
        """Whether *selector* selects some endpoint."""
        got = self.seen.get(selector)
        if got is None:
            if not selector:
                got = bool(self.sets)
            else:
                rarest = min((self.by_label.get(item, []) for item in selector.items()), key=len)
                got = any(selector.selects(self.sets[i]) for i in rarest)
            self.seen[selector] = got
        return got


@dataclass
class Drafts:
    """Everything the documents said, in file order."""

    rules: list[RuleDraft] = field(default_factory=list)
    policies: list[PolicyDraft] = field(default_factory=list)
    services: list[ServiceDraft] = field(default_factory=list)
    ingress: list[IngressDraft] = field(default_factory=list)
    http_routes: list[HttpRouteDraft] = field(default_factory=list)
    gateways: list[GatewayDraft] = field(default_factory=list)
    grants: list[GrantDraft] = field(default_factory=list)
    istio_gateways: list[IstioGatewayDraft] = field(default_factory=list)
    # FQDNs of skipped Kubernetes Services, for a better "no ServiceEntry" hint.
    k8s_services: set[str] = field(default_factory=set)
    # each service's endpoints by label, made when first asked (selectable())
    _selectable: dict[str, Selectable] = field(default_factory=dict)
    # each host's DestinationRules that apply on other pods of this
    # namespace than this one (_policies): the rule without a
    # workloadSelector, those of a selector; a subset a route names must be
    # in each, so that one set of files loads or fails alike on every pod
    elsewhere: dict[str, list[PolicyDraft]] = field(default_factory=dict)

    def selectable(self, svc: Service) -> Selectable:
        got = self._selectable.get(svc.host)
        if got is None:
            got = self._selectable[svc.host] = Selectable(svc.endpoints)
        return got


def subset_name(labels: Labels) -> str:
    """The name a RouteRule's inline label set gets (``{version: v1}`` → ``v1``).

    A DestinationRule subset with the same labels lends its name instead, so a
    RouteRule and the equivalent VirtualService + DestinationRule compile to
    the same table.
    """
    if not labels:
        return DEFAULT
    return "-".join(labels[k] for k in sorted(labels))


def build_table(d: Drafts, env: Env, seed: int | None) -> RouteTable:
    services = _registry(d)
    policies = _policies(d, services, env)
    warned: set[tuple[int, str]] = set()
    memo: dict[tuple[int, bool], Destination | None] = {}
    claimed = check_claims(d.istio_gateways, d.gateways, d.ingress)
    served = bind(d.istio_gateways, d.rules)
    # (a VirtualService host served at a Gateway now: VirtualService, host
    # → those Gateways, for the "no ServiceEntry" warning of its mesh side)
    live: dict[tuple[int, str], list[str]] = defaultdict(list)
    for vh in served:
        for b in vh.bindings:
            gw = f"{b.gateway.namespace}/{b.gateway.name}"
            if gw not in live[(id(b.rule), b.host)]:
                live[(id(b.rule), b.host)].append(gw)
    budget = RouteBudget()
    routes = _routes(d, env, services, policies, warned, memo, live, budget)
    _check_ingress(d, services)
    # (a VirtualService of Istio Gateways only routes no mesh host)
    mesh = [r for r in d.rules if MESH in r.bound]
    routed = {h: r.where for r in mesh for h in r.hosts}
    gateway_api = Compiler(services, policies, routed, env, d.grants, budget)
    gateway_api.compile(d.http_routes, d.gateways)
    routes.update(gateway_api.routes)
    for vh in served:
        if vh.bindings and not budget.take(
            sum(len(b.routes) for b in vh.bindings),
            vh.bindings[0].rule.where,
            f"the routes of {vh.key}",
        ):
            continue
        routes[vh.key] = [
            *vh.own_routes(),
            *(
                r
                for b, rd in vh.routes()
                for r in _compile(
                    b.rule, vh.key, [rd], d, services, policies, warned, memo, vh.port
                )
            ),
        ]
    if claimed:
        check_paths(served, [*(i.path for i in d.ingress), *gateway_api.ingress], d.gateways)
    # A request no route matches: Istio answers 404 for a VirtualService's
    # host (Envoy's NR), at a gateway too, the Gateway API says 404 for an
    # HTTPRoute's parent; RouteRules (Istio 0.7) fell back to every
    # endpoint, and still do.
    unmatched = {h for r in mesh if r.kind == "VirtualService" for h in r.hosts}
    unmatched.update(gateway_api.routes)
    unmatched.update(vh.key for vh in served)
    return RouteTable(
        [*services.values(), *gateway_api.gateway_services, *(vh.service() for vh in served)],
        routes,
        load_balancers={h: p.load_balancer for h, p in policies.items() if p.load_balancer},
        hash_policies={h: p.hash_on for h, p in policies.items() if p.hash_on is not None},
        pools={h: p.pool for h, p in policies.items() if p.pool is not None},
        outliers={h: p.outlier for h, p in policies.items() if p.outlier is not None},
        port_policies={
            h: dict(policy_subset(p, None, DEFAULT, Labels()).ports)
            for h, p in policies.items()
            if p.port_level
        },
        ingress=[
            *(i.path for i in d.ingress),
            *gateway_api.ingress,
            *(vh.ingress_path() for vh in served),
        ],
        unmatched=unmatched,
        unserved_ports={
            port: f"Gateway {gw.namespace}/{gw.name} {what}"
            for gw in d.istio_gateways
            for port, what in gw.unserved
        },
        namespace=env.namespace,
        domain=env.domain,
        seed=seed,
    )


# VIP address:port pairs a load's ServiceEntries may have (each host's
# addresses times its ports, summed), checked against one another one pair
# at a time: a real registry has a few per service (2,000 ServiceEntries of
# one address and two ports are 4,000). Without a bound a 25 KB ServiceEntry
# of 300 hosts, 300 addresses and 300 ports was 27 million pairs, each host
# after the first an error at every one of them: 18 GB and 9 minutes of the
# reload thread, a sidecar OOM-killed by its own rules.
MAX_VIPS = 100_000


def _registry(d: Drafts) -> dict[str, Service]:
    services: dict[str, Service] = {}
    origin: dict[str, ServiceDraft] = {}
    by_name: dict[str, str] = {}
    by_vip: dict[tuple[str, int], str] = {}
    vips = 0  # pairs checked so far (MAX_VIPS)
    over: set[str] = set()  # the ServiceEntries told they are over it (once each)
    for sd in d.services:
        svc = sd.service
        first = origin.get(svc.host)
        if first is not None:
            sd.where.error(
                f"host {svc.host} is already described by ServiceEntry {first.entry} "
                f"({first.where.location}); one host, one ServiceEntry"
            )
            continue
        clash = next((by_name[n] for n in svc.aliases if n in by_name), None)
        if clash is not None:
            sd.where.error(f"host {svc.host} has a short name that {clash} already uses")
            continue
        pairs = len(svc.addresses) * len(svc.ports)
        if vips + pairs > MAX_VIPS:
            # (said once per ServiceEntry, at its first host over the bound)
            if sd.where.location not in over:
                over.add(sd.where.location)
                before = f" with the {vips:,} of the hosts before it" if vips else ""
                sd.where.error(
                    f"the {len(svc.addresses):,} addresses and {len(svc.ports):,} ports of "
                    f"{svc.host} are {pairs:,} VIP address:port pairs,{before} more than "
                    f"the {MAX_VIPS:,} the rules may have: describe a range of addresses "
                    "with one CIDR block (one pair per port)"
                )
            # (its host kept, its addresses not: the table built beside the
            # error, which the load reports, indexes no pair of it, where
            # 300 hosts sharing 300 addresses and 300 ports were 27 million)
            svc = replace(svc, addresses=())
            pairs = 0
        vips += pairs
        # (its first clash only: the next are the same mistake, and a
        # ServiceEntry of many hosts sharing many addresses and ports made
        # one error of each pair of each host)
        vip_clash = next(
            (
                (addr, p.number, other)
                for addr in (svc.addresses if pairs else ())
                for p in svc.ports
                if (other := by_vip.setdefault((addr, p.number), svc.host)) != svc.host
            ),
            None,
        )
        if vip_clash is not None:
            addr, number, other = vip_clash
            sd.where.error(
                f"address {addr} port {number} is already the VIP of {other}; "
                "give each service its own address, or its own ports on a shared one"
            )
        services[svc.host] = svc
        origin[svc.host] = sd
        for n in (svc.host, *svc.aliases):
            by_name.setdefault(n, svc.host)
    _nested_blocks(services, origin)
    return services


def _nested_blocks(services: dict[str, Service], origin: dict[str, ServiceDraft]) -> None:
    """A warning at each ServiceEntry host one of whose CIDR blocks lies
    inside another host's on a port both list (its first such block only).

    Istio admits it: a CIDR ServiceEntry's port is a wildcard listener
    whose filter chains match the blocks, and Envoy picks the longest
    prefix, so the inner block's connections go to its host and the rest
    of the outer block's to the other (as ``service_for_address`` finds
    them). Likely a mistake all the same (a broad egress range over a
    service's own), so said; a block listed twice on a port is the VIP
    clash above, an error. CIDR blocks are nested or disjoint, so one
    sweep of each (IP version, port)'s blocks, sorted by start and then
    the widest first, finds every pair: a block nests in the innermost
    block still open where it starts."""
    blocks: dict[tuple[int, int], list[tuple[int, int, str, str]]] = defaultdict(list)
    for svc in services.values():
        for addr in svc.addresses:
            if "/" not in addr:
                continue
            net = ipaddress.ip_network(addr, strict=False)
            if net.num_addresses == 1:
                continue
            start = int(net.network_address)
            for p in svc.ports:
                key = (net.version, p.number)
                blocks[key].append((start, start + net.num_addresses - 1, addr, svc.host))
    warned: set[str] = set()
    for (_, port), found in sorted(blocks.items()):
        found.sort(key=lambda b: (b[0], -b[1]))
        open_: list[tuple[int, int, str, str]] = []
        for block in found:
            while open_ and open_[-1][1] < block[0]:
                open_.pop()
            outer = open_[-1] if open_ else None
            open_.append(block)
            if outer is None or outer[3] == block[3] or block[3] in warned:
                continue
            if (outer[0], outer[1]) == (block[0], block[1]):
                continue  # (the same block: the VIP clash, an error)
            warned.add(block[3])
            other = outer[3]
            origin[block[3]].where.warning(
                f"address block {block[2]} of {block[3]} lies inside {outer[2]}, a VIP "
                f"block of {other} ({origin[other].where.location}), on port {port}: "
                f"connections to its addresses go to {block[3]}, the most specific block "
                f"(as Envoy's longest prefix match picks it for Istio), the rest of "
                f"{outer[2]} to {other}; if that is not meant, give them disjoint blocks"
            )


def _describe_endpoints(svc: Service) -> str:
    sets = sorted({str(Labels(e.labels)) or "(no labels)" for e in svc.endpoints})
    return "; ".join(sets) if sets else "none"


def _no_service(where: Where, host: str, d: Drafts, what: str, reason: str | None = None) -> None:
    """*host* names no service: a warning at *where* saying *what* waits
    for one ("this route applies once one is loaded"); *reason*
    UNRESOLVED where requests are sent there meanwhile, and fail."""
    hint = ""
    if host in d.k8s_services:
        hint = (
            " (a Kubernetes Service carries no endpoint addresses: describe it with a "
            "ServiceEntry listing the pods)"
        )
    where.warning(f"{host} has no ServiceEntry in these files; {what}{hint}", reason)


def _policies(d: Drafts, services: dict[str, Service], env: Env) -> dict[str, PolicyDraft]:
    """Each host's DestinationRule on this sidecar: the one without a
    ``workloadSelector`` (two for one host are an error), in place of which
    one of a ``workloadSelector`` that selects this pod applies
    (:func:`_selected`). Every rule is checked against the registry,
    applied here or not."""
    policies: dict[str, PolicyDraft] = {}
    selected: dict[str, list[PolicyDraft]] = defaultdict(list)
    alike: dict[tuple[str, str, Labels], PolicyDraft] = {}
    for p in d.policies:
        assert p.where is not None
        if p.selector is not None:
            same = alike.setdefault((p.host, p.namespace, p.selector), p)
            if same is not p:
                assert same.where is not None
                p.where.error(
                    f"host {p.host} already has DestinationRule {same.name} "
                    f"({same.where.location}) of the same workloadSelector "
                    f"({p.selector or 'no labels'}); merge their subsets into one"
                )
                continue
            if _selects(p, env):
                selected[p.host].append(p)
        else:
            first = policies.get(p.host)
            if first is not None:
                assert first.where is not None
                p.where.error(
                    f"host {p.host} already has DestinationRule {first.name} "
                    f"({first.where.location}); merge their subsets into one"
                )
                continue
            policies[p.host] = p
        _check_policy(p, d, services)
    for host, rules in selected.items():
        catch_all = policies.get(host)
        policies[host] = _selected(rules, catch_all)
        if catch_all is not None:  # (applies on the pods the selectors do not select)
            d.elsewhere.setdefault(host, []).append(catch_all)
    for (host, namespace, _), p in alike.items():
        if namespace == env.namespace and policies.get(host) is not p:
            d.elsewhere.setdefault(host, []).append(p)  # (applies on the pods it selects)
    return policies


def _selects(p: PolicyDraft, env: Env) -> bool:
    """Whether DestinationRule *p* of a ``workloadSelector`` applies on
    this sidecar, as pilot's SidecarScope.DestinationRule has it: on the
    sidecars of its own namespace (``--namespace``) whose pod has every
    label of its ``matchLabels`` (``--pod-labels``). Where it does not,
    or the pod's labels are not known (``validate`` without
    ``--pod-labels``), a note (a warning for another namespace's, which
    applies on no pod of this one)."""
    assert p.where is not None and p.selector is not None
    sel = f"workloadSelector ({p.selector or 'no labels: every pod'})"
    if p.namespace != env.namespace:
        p.where.warning(
            f"not applied: a DestinationRule of a workloadSelector applies on the sidecars of "
            f"its own namespace ({p.namespace}) only, as in Istio, and this sidecar's is "
            f"{env.namespace} (--namespace)"
        )
        return False
    if env.pod_labels is None:
        p.where.note(
            f"applies on the sidecars of the pods of {p.namespace} that its {sel} selects; "
            "checked here as for a pod it does not select (the pod's labels are not known: "
            "give --pod-labels to check these rules as on one it selects)"
        )
        return False
    if not p.selector.selects(env.pod_labels):
        p.where.note(
            f"not applied: its {sel} does not select this pod "
            f"({Labels(env.pod_labels) or 'no labels'}: --pod-labels, --pod-labels-file)"
        )
        return False
    return True


def _selected(rules: list[PolicyDraft], catch_all: PolicyDraft | None) -> PolicyDraft:
    """The DestinationRule that applies on this pod of *rules*, those of a
    ``workloadSelector`` that select it (one host's): the oldest (its
    ``creationTimestamp``, one without it the newest), then the first by
    name, as pilot sorts them, whole, in place of *catch_all* (the host's
    rule without a selector, if any: pilot's SidecarScope.DestinationRule
    returns the first that selects the proxy before it). The others are a
    warning each."""
    rules = sorted(rules, key=lambda p: (*oldest_first(p.created), p.name))
    won = rules[0]
    assert won.where is not None
    for p in rules[1:]:
        assert p.where is not None
        p.where.warning(
            f"not applied: DestinationRule {won.name} ({won.where.location}) selects this pod "
            f"for host {p.host} too, and applies, the "
            + ("older" if won.created != p.created else "first by name")
            + " (by creationTimestamp, then name, as in Istio)"
        )
    instead = ""
    if catch_all is not None:
        assert catch_all.where is not None
        instead = f", in place of DestinationRule {catch_all.name} ({catch_all.where.location})"
    won.where.note(f"applies on this pod (its workloadSelector selects it){instead}")
    return won


def _check_policy(p: PolicyDraft, d: Drafts, services: dict[str, Service]) -> None:
    """DestinationRule *p* against the registry: its host's service, the
    ports of its portLevelSettings, what its subsets select."""
    assert p.where is not None
    svc = services.get(p.host)
    if svc is None:
        _no_service(p.where, p.host, d, "this DestinationRule applies once one is loaded")
        return
    entries = [*p.port_level.values()]
    entries.extend(e for s in p.subsets.values() for e in s.port_level.values())
    for entry in entries:
        if svc.port(entry.port) is None:
            ports = ", ".join(str(q.number) for q in svc.ports)
            entry.where.warning(
                f"port {entry.port} is not a port of {p.host} (ports: {ports}); "
                "this portLevelSettings entry applies to no traffic"
            )
    for s in p.subsets.values():
        if not d.selectable(svc).any(s.labels):
            s.where.error(
                f"subset {s.name} ({s.labels or 'no labels'}) selects no endpoint of "
                f"{p.host} (its endpoints have: {_describe_endpoints(svc)})"
            )


def _routes(
    d: Drafts,
    env: Env,
    services: dict[str, Service],
    policies: dict[str, PolicyDraft],
    warned: set[tuple[int, str]],
    memo: dict[tuple[int, bool], Destination | None],
    live: dict[tuple[int, str], list[str]],
    budget: RouteBudget,
) -> dict[str, list[Route]]:
    """The routes of the sidecars' hosts: each host's RouteRules, or its
    VirtualService's routes that apply to the mesh (``routes_for``).
    *live*: the Istio Gateways at which a VirtualService's host is served
    already, by ``(id(rule), host)``."""
    owners: dict[str, list[RuleDraft]] = defaultdict(list)
    for rule in d.rules:
        if MESH not in rule.bound:
            continue  # (an Istio Gateway's only: ``_istio_gateway``)
        for host in rule.hosts:
            prior = owners[host]
            # Two VirtualServices (or a VirtualService and RouteRules) for one
            # host: Istio merged them in an order users could not predict.
            clash = next(
                (r for r in prior if r.kind == "VirtualService" or rule.kind == "VirtualService"),
                None,
            )
            if clash is not None:
                rule.where.error(
                    f"host {host} is already routed by {clash.kind} {clash.name} "
                    f"({clash.where.location}); route one host from one VirtualService "
                    "(or from RouteRules only)"
                )
                continue
            prior.append(rule)
    table: dict[str, list[Route]] = {}
    mesh_of: dict[int, list[RouteDraft]] = {}  # id(rule) → its mesh routes (once a rule)
    for host, rules in owners.items():
        if not rules or budget.spent:
            continue
        # RouteRules: precedence high first, then namespace/name ascending
        # (Istio 0.7 broke ties by config key); a VirtualService is alone.
        rules.sort(key=lambda r: (-r.precedence, r.namespace, r.name))
        compiled: list[Route] = []
        for rule in rules:
            if host not in services and (id(rule), host) not in warned:
                warned.add((id(rule), host))
                at = live.get((id(rule), host))
                _no_service(
                    rule.where,
                    host,
                    d,
                    f"for mesh traffic this {rule.kind} applies once one is loaded; at "
                    f"Gateway{'s' if len(at) > 1 else ''} {', '.join(at)} it routes {host} now"
                    if at
                    else f"this {rule.kind} applies once one is loaded",
                )
            mesh_routes = mesh_of.get(id(rule))
            if mesh_routes is None:
                mesh_routes = mesh_of[id(rule)] = routes_for(rule, MESH)
            if not budget.take(len(mesh_routes), rule.where, f"its routes for host {host}"):
                break
            svc = services.get(host)
            if svc is not None:
                for rd in mesh_routes:
                    _check_tcp_ports(rd, host, svc, mesh_routes)
            compiled.extend(_compile(rule, host, mesh_routes, d, services, policies, warned, memo))
        table[host] = compiled
    return table


def _compile(
    rule: RuleDraft,
    host: str,
    routes: list[RouteDraft],
    d: Drafts,
    services: dict[str, Service],
    policies: dict[str, PolicyDraft],
    warned: set[tuple[int, str]],
    memo: dict[tuple[int, bool], Destination | None],
    gateway_port: int | None = None,
) -> list[Route]:
    """*routes* of *rule* for *host* (a gateway service's, on
    *gateway_port*), their destinations resolved; a route with an error at
    a destination is left out (the load fails). A VirtualService's routes
    may be compiled for the mesh and for gateway services: each
    destination (a mirror's: *mirror*) is resolved, and what is wrong with
    it said, once (*memo*: by ``(id, mirror)``, what it resolved to)."""
    compiled: list[Route] = []

    def resolve(dd: DestinationDraft, mirror: bool) -> Destination | None:
        key = (id(dd), mirror)
        if key not in memo:
            memo[key] = _destination(dd, d, services, policies, warned, id(rule), mirror=mirror)
        return memo[key]

    for rd in routes:
        dests = []
        for dd in rd.destinations:
            dest = resolve(dd, False)
            if dest is not None:
                dests.append(dest)
                # (once per host of the mesh, once per gateway port)
                checked = (id(dd), f"port {gateway_port or host}")
                if checked not in warned:
                    warned.add(checked)
                    _check_port_required(dd, rule.kind, host, rd, services, gateway_port)
        mirrors = []
        for dd, ppm in rd.mirrors:
            dest = resolve(dd, True)
            if dest is not None:
                mirrors.append(MirrorPolicy(dest, ppm))
        if len(dests) == len(rd.destinations) and len(mirrors) == len(rd.mirrors):
            compiled.append(
                Route(
                    rd.name,
                    tuple(dests),
                    rd.matches,
                    rd.protocol,
                    timeout=rd.timeout,
                    retries=rd.retries,
                    headers=rd.headers,
                    rewrite=rd.rewrite,
                    redirect=rd.redirect,
                    direct=rd.direct,
                    fault=rd.fault,
                    mirrors=tuple(mirrors),
                    cors=rd.cors,
                )
            )
    return compiled


def _destination(
    dd: DestinationDraft,
    d: Drafts,
    services: dict[str, Service],
    policies: dict[str, PolicyDraft],
    warned: set[tuple[int, str]],
    rule_id: int,
    *,
    mirror: bool = False,
) -> Destination | None:
    """A route's destination (*mirror*: a mirror's), its subset resolved;
    None after an error at it."""
    policy = policies.get(dd.host)
    svc = services.get(dd.host)
    subset: Subset
    if dd.subset is not None:
        if policy is None:
            dd.where.error(
                f"subset {dd.subset} is not defined: no DestinationRule for host {dd.host} "
                "(add one with this subset's labels)"
            )
            return None
        sd = policy.subsets.get(dd.subset)
        if sd is None:
            defined = ", ".join(policy.subsets) or "none"
            at = f" ({policy.where.location})" if policy.where is not None else ""
            # (one of a workloadSelector applies on this pod alone: say so, and where it is)
            why = (
                f"; {policy.name}{at} applies on this pod, its workloadSelector "
                f"({policy.selector or 'no labels'}) selecting it: define the subset there too"
                if policy.selector is not None
                else ""
            )
            dd.where.error(
                f"subset {dd.subset} is not defined by DestinationRule {policy.name} for "
                f"host {dd.host} (it defines: {defined}){why}"
            )
            return None
        if not _subset_everywhere(dd, d, policy):
            return None
        subset = policy_subset(policy, sd, sd.name, sd.labels)
    elif dd.labels:
        same = None
        if policy is not None:
            same = next((s for s in policy.subsets.values() if s.labels == dd.labels), None)
        if same is not None:
            subset = policy_subset(policy, same, same.name, same.labels)
        else:
            subset = policy_subset(policy, None, subset_name(dd.labels), dd.labels)
        if svc is not None and not d.selectable(svc).any(dd.labels):
            dd.where.error(
                f"route labels {dd.labels} select no endpoint of {dd.host} "
                f"(its endpoints have: {_describe_endpoints(svc)})"
            )
            return None
    else:
        subset = policy_subset(policy, None, DEFAULT, Labels())
    if svc is None:
        if (rule_id, dd.host) not in warned:
            warned.add((rule_id, dd.host))
            _no_service(
                dd.where,
                dd.host,
                d,
                "nothing is mirrored to it until one is loaded (the route applies now)"
                if mirror
                else "this route applies once one is loaded",
                None if mirror or dd.weight == 0 else UNRESOLVED,
            )
    elif dd.port is not None and svc.port(dd.port) is None:
        ports = ", ".join(str(p.number) for p in svc.ports)
        dd.where.error(f"port {dd.port} is not a port of {dd.host} (ports: {ports})")
        return None
    return Destination(dd.host, subset, dd.weight, dd.port, dd.headers)


def _subset_everywhere(dd: DestinationDraft, d: Drafts, policy: PolicyDraft) -> bool:
    """Whether the subset *dd* names is defined by each DestinationRule of
    its host that applies on another pod of this namespace (``d.elsewhere``:
    the rule without a workloadSelector, those of one), as it is by
    *policy*, the one that applies here; an error at *dd* if not. In Istio
    such a pod's route finds no cluster (503s); here the files that one pod
    loads would be refused on another, and ``validate`` without
    ``--pod-labels`` would pass what a selected pod's sidecar refuses."""
    for other in d.elsewhere.get(dd.host, []):
        if dd.subset in other.subsets:
            continue
        assert other.where is not None
        defined = ", ".join(other.subsets) or "none"
        if other.selector is None:
            pods = f"on the pods that the workloadSelector of {policy.name} does not select"
        else:
            pods = f"on the pods its workloadSelector ({other.selector or 'no labels'}) selects"
        dd.where.error(
            f"subset {dd.subset} is not defined by DestinationRule {other.name} "
            f"({other.where.location}) for host {dd.host} (it defines: {defined}), which "
            f"applies {pods}, in place of {policy.name}: define the subset in each (in "
            "Istio those pods' requests find no cluster)"
        )
        return False
    return True


def _check_tcp_ports(rd: RouteDraft, host: str, svc: Service, routes: list[RouteDraft]) -> None:
    """A ``tcp`` route whose every port (those its match blocks name,
    every port of *svc* without one) is HTTP applies nowhere: Istio's
    listener on an HTTP port is an HTTP connection manager whose route
    configuration is built from the ``http`` routes alone (the default
    route to the whole service where none applies), and so is l4proxy's.
    A warning at the route's line; ports it names that *svc* has not are
    left to the other checks."""
    if rd.protocol != "tcp" or rd.where is None:
        return
    named = {m.port for m in rd.matches if m.port is not None}
    any_port = not rd.matches or any(m.port is None for m in rd.matches)
    ports = [p for p in svc.ports if any_port or p.number in named]
    if not ports or not all(p.is_http for p in ports):
        return
    numbers = ", ".join(str(p.number) for p in ports)
    protocols = "/".join(dict.fromkeys(p.protocol for p in ports))
    said = (
        f"port {numbers} of {host} is {protocols}"
        if len(ports) == 1
        else f"ports {numbers} of {host} are {protocols}"
    )
    http = any(r.protocol == "http" for r in routes)
    then = (
        "its requests take the http routes, else the whole service (the default route)"
        if http
        else "its requests take the whole service, the default route (this VirtualService "
        "has no http route)"
    )
    if len(ports) > 1:
        then = then.replace("its requests", "their requests")
    rd.where.warning(
        f"this tcp route routes nothing: tcp routes serve TCP ports only; {said}: {then}"
    )


def _check_port_required(
    dd: DestinationDraft,
    kind: str,
    host: str,
    rd: RouteDraft,
    services: dict[str, Service],
    gateway_port: int | None = None,
) -> None:
    """A destination without a port goes to the port that was dialled (or
    to the only port of its host; at an Istio Gateway, *gateway_port*, the
    server's): on a host with several ports, none of which is a port the
    route is dialled on, every request it takes is answered 503. Istio's
    analyzer warns (IST0112); so does the load."""
    target = services.get(dd.host)
    if dd.port is not None or target is None or len(target.ports) < 2 or dd.host == host:
        return
    routed = services.get(host)
    dialled: list[int] | None = None  # None: the routed host is not known yet
    if gateway_port is not None:
        dialled = [gateway_port]
    elif routed is not None:
        named = {m.port for m in rd.matches if m.port is not None}
        any_port = not rd.matches or any(m.port is None for m in rd.matches)
        http_only = rd.protocol == "http" and any(p.is_http for p in routed.ports)
        # (a tcp route is never dialled on an HTTP port: _check_tcp_ports)
        dialled = [
            p.number
            for p in routed.ports
            if not (rd.protocol == "tcp" and p.is_http)
            and (p.number in named or (any_port and (p.is_http or not http_only)))
        ]
    missing = [n for n in (dialled or []) if target.port(n) is None]
    if dialled is not None and not missing:
        return
    ports = ", ".join(str(p.number) for p in target.ports)
    how = (
        "set destination.port.number"
        if kind == "VirtualService"
        else "a RouteRule cannot name one: route with a VirtualService"
    )
    if missing:
        nums = ", ".join(map(str, missing))
        what = (
            f"a request to {host} port {nums} goes to port {nums} of {dd.host}, which has "
            "none, and is answered 503"
        )
    else:
        what = "a request goes to the port it was dialled on, answered 503 if it has not that one"
    dd.where.warning(f"port required: host {dd.host} has ports {ports}; {what} ({how})")


def _check_ingress(d: Drafts, services: dict[str, Service]) -> None:
    default: IngressDraft | None = None
    for ing in d.ingress:
        p = ing.path
        if p.path_type == "Default":
            if default is not None:
                ing.where.error(
                    f"a default backend is already set by Ingress {default.path.name} "
                    f"({default.where.location}); keep one"
                )
                continue
            default = ing
        svc = services.get(p.service)
        if svc is None:
            _no_service(
                ing.where,
                p.service,
                d,
                "this Ingress path answers 503 until one is loaded",
                UNRESOLVED,
            )
            continue
        found = svc.port(p.port) if isinstance(p.port, int) else svc.port_by_name(p.port)
        if found is None:
            ports = ", ".join(f"{q.number} ({q.name})" for q in svc.ports)
            ing.where.error(f"service {p.service} has no port {p.port} (ports: {ports})")

"""Small rule files that expand into huge tables are refused, cheaply.

The YAML node budget (tests/test_config_yaml.py) bounds what a load reads;
these are products of what it read: each host of a ServiceEntry has its
every address and port as VIPs, each host of a VirtualService (each
hostname of an HTTPRoute at a Gateway listener) its own copy of every
route, each port of a ServiceEntry its own copy of every endpoint (and of
every address its DNS names are answered with). A 25 KB ServiceEntry of
300 hosts, addresses and ports made 27 million VIP clash errors (18 GB, 9
minutes); a 220 KB VirtualService of 2,000 hosts and 2,000 routes 4
million routes (2 GB, 30 s); an HTTPRoute of 3,000 hostnames compared
every pair of them (9 million comparisons); an 850 KB ServiceEntry of
1,000 ports and 30,000 endpoints made 30 million (2.4 GB). The sidecar's
reload thread ran each (the worker's event loop the DNS ones): a pod
OOM-killed by its own rules, or a reload that never ended. Each is now a
bounded error at its file and line (or a lookup, or a bounded expansion),
counted here, and the sidecar's watcher keeps serving the last good table.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import random
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

import l4proxy.rules._gateway_api as gateway_api
from l4proxy.rules import ConfigError, load_rules
from l4proxy.rules._objects import MAX_ENDPOINTS, MAX_ROUTES
from l4proxy.rules._table import MAX_VIPS, Selectable
from l4proxy.rules.dns import DnsEndpoints, Resolution, resolved_table
from l4proxy.rules.routing import Endpoint, Labels, RouteTable, Service, ServicePort
from l4proxy.rules.watch import RuleWatcher
from tests._worker import gateway_service
from tests.test_dns import ScriptedResolver

SVC = (
    "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: backend}\nspec:\n"
    "  hosts: [backend.default.svc.cluster.local]\n"
    "  ports: [{number: 80, name: http, protocol: HTTP}]\n"
    "  resolution: STATIC\n  endpoints: [{address: 192.168.0.1}]\n---\n"
)


def _ip(i: int) -> str:
    return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


def service_entry(hosts: int, addresses: int, ports: int) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se}\nspec:\n"
        f"  hosts: [{', '.join(f'h{i}.example.com' for i in range(hosts))}]\n"
        f"  addresses: [{', '.join(_ip(i) for i in range(addresses))}]\n"
        "  ports:\n"
        + "".join(f"  - {{number: {i + 1}, name: tcp-{i}, protocol: TCP}}\n" for i in range(ports))
        + "  resolution: STATIC\n  endpoints: [{address: 192.168.0.1}]\n"
    )


def virtual_service(hosts: int, routes: int, gateway: bool = False) -> str:
    text = ""
    if gateway:
        text = (
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n"
            "  servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: ['*']}]\n"
            "---\n"
        )
    return (
        SVC
        + text
        + "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\n"
        + "spec:\n"
        + ("  gateways: [gw]\n" if gateway else "")
        + f"  hosts: [{', '.join(f'h{i}.example.com' for i in range(hosts))}]\n"
        + "  http:\n"
        + "".join(
            f"  - match: [{{uri: {{prefix: /p{i}}}}}]\n"
            "    route: [{destination: {host: backend.default.svc.cluster.local}}]\n"
            for i in range(routes)
        )
    )


def http_route(hostnames: list[str], rules: int) -> str:
    return (
        SVC + "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw}\n"
        "spec:\n  gatewayClassName: x\n  listeners: [{name: http, port: 8080, protocol: HTTP}]\n"
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n"
        "spec:\n  parentRefs: [{name: gw}]\n"
        f"  hostnames: [{', '.join(hostnames)}]\n"
        "  rules:\n"
        + "".join(
            f"  - matches: [{{path: {{type: PathPrefix, value: /p{i}}}}}]\n"
            "    backendRefs: [{name: backend, port: 80}]\n"
            for i in range(rules)
        )
    )


def errors_of(tmp_path: Path, text: str) -> list[str]:
    f = tmp_path / "rules.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_rules([str(f)])
    return [str(d) for d in exc.value.diagnostics if d.severity == "error"]


def test_a_service_entry_whose_hosts_share_its_addresses_is_one_error_a_host(
    tmp_path: Path,
) -> None:
    """30 hosts, 30 addresses, 30 ports: each host after the first
    clashes with the first, said once (before: once for each of its 900
    address:port pairs, 26,100 errors; 300 of each were 26.9 million)."""
    errors = errors_of(tmp_path, service_entry(30, 30, 30))
    assert len(errors) == 29
    assert all("is already the VIP of h0.example.com" in e for e in errors)
    assert errors[0].startswith(f"{tmp_path / 'rules.yaml'}:5: ServiceEntry se: address 10.0.0.0")


def test_vip_pairs_over_the_bound_are_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """400 addresses and 300 ports of one host: 120,000 pairs over
    MAX_VIPS, one error at the ServiceEntry (before: loaded, the pairs
    checked one by one); 300 hosts of 300 each: still one, and the table
    the load builds beside its errors indexes no more pairs than the bound
    (before: every host's, 27 million, 6 s, the VIPs indexed by address
    and port)."""
    assert MAX_VIPS == 100_000
    indexed: list[int] = []
    init = RouteTable.__init__

    def counting(self: RouteTable, services: Any = (), *args: Any, **kwargs: Any) -> None:
        services = list(services)
        indexed.append(sum(len(s.addresses) * len(s.ports) for s in services))
        init(self, services, *args, **kwargs)

    monkeypatch.setattr(RouteTable, "__init__", counting)
    [error] = errors_of(tmp_path, service_entry(1, 400, 300))
    assert error.startswith(f"{tmp_path / 'rules.yaml'}:5: ServiceEntry se: the 400 addresses")
    assert "120,000 VIP address:port pairs" in error and "100,000" in error
    [error] = errors_of(tmp_path, service_entry(300, 300, 300))
    assert "with the 90,000 of the hosts before it" in error
    assert indexed and max(indexed) <= MAX_VIPS, indexed


@pytest.mark.parametrize("gateway", [False, True], ids=["mesh", "istio-gateway"])
def test_a_virtual_service_of_many_hosts_and_routes_is_one_error(
    tmp_path: Path, gateway: bool
) -> None:
    """400 hosts of 300 routes are 120,000 routes, each host its own
    copy: one error at the VirtualService (before: built, 4 million routes
    of 2,000 of each took 2 GB); 40 hosts of 300 load."""
    assert MAX_ROUTES == 100_000
    [error] = errors_of(tmp_path, virtual_service(400, 300, gateway))
    assert "VirtualService vs: " in error and "more than the 100,000" in error
    (tmp_path / "rules.yaml").write_text(virtual_service(40, 300, gateway))
    table = load_rules([str(tmp_path / "rules.yaml")]).table
    if not gateway:
        assert len(table.routes_for("h39.example.com")) == 300


def test_an_http_route_of_many_hostnames_and_rules_is_refused_at_its_bounds(
    tmp_path: Path,
) -> None:
    """400 hostnames and 300 rules (120,000 routes once compiled): one
    error a list, the CRD's maxItems, before a rule is read (where the
    route budget refused it, counted; an HTTPRoute within the CRD's bounds
    makes at most 32 parents x 16 hostnames x 128 matches)."""
    errors = errors_of(tmp_path, http_route([f"h{i}.example.com" for i in range(400)], 300))
    assert [e.split(": ", 2)[2] for e in errors] == [
        "spec.hostnames has 400 hostnames; the API allows 16 (the CRD's maxItems: an API "
        "server refuses the object)",
        "spec.rules has 300 rules; the API allows 16 (the CRD's maxItems: an API server "
        "refuses the object)",
    ]


def test_a_listeners_wider_hostnames_are_looked_up_not_compared_pairwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3,000 hostnames on one listener (188 routes of 16 hostnames, the CRD's
    bound) and their wildcard: each takes the
    wildcard's rule after its own, found by its parent domains (a few
    comparisons each; before: every pair, 9 million)."""
    calls = 0
    covers = gateway_api._covers

    def counting(wider: str | None, hostname: str | None) -> bool:
        nonlocal calls
        calls += 1
        return covers(wider, hostname)

    monkeypatch.setattr(gateway_api, "_covers", counting)
    names = ["'*.example.com'", *(f"h{i}.a.example.com" for i in range(3000))]
    # (16 a route, the CRD's bound: 188 routes)
    routes = [http_route(names[i : i + 16], 1) for i in range(0, len(names), 16)]
    text = routes[0] + "".join(
        "---\n" + r.split("---\n")[-1].replace("{name: r}", f"{{name: r{i}}}")
        for i, r in enumerate(routes[1:])
    )
    (tmp_path / "rules.yaml").write_text(text)
    table = load_rules([str(tmp_path / "rules.yaml")]).table
    assert len([k for k in table.to_json()["routes"] if k.startswith("gateway")]) == 3001
    assert calls <= 4 * 3001


def test_the_watcher_keeps_serving_the_last_good_table(tmp_path: Path) -> None:
    """The sidecar's reload: each bomb saved beside good rules is refused
    with its file and line, and the table served stays the last good."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "registry.yaml").write_text(gateway_service(8081, 8082))
    watcher = RuleWatcher([str(rules)], interval=3600, settle=0)
    assert watcher.load_now()
    table = watcher.state.table
    for bomb in (service_entry(300, 300, 300), virtual_service(1100, 100)):
        (rules / "bomb.yaml").write_text(bomb)
        watcher.load_now()
        st = watcher.state
        assert st.table is table
        assert st.last_error is not None and st.last_error.startswith(f"{rules / 'bomb.yaml'}:")
        assert "more than the 100,000" in st.last_error


def ported_entry(name: str, ports: int, endpoints: int, first: int = 0) -> str:
    """A ServiceEntry of *ports* ports and *endpoints* endpoints (none:
    resolution DNS, its hosts its endpoints)."""
    return (
        f"apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\n"
        + "spec:\n"
        + (
            f"  hosts: [{name}.example.com]\n  resolution: STATIC\n"
            if endpoints
            else f"  hosts: [{', '.join(f'h{i}.{name}.example.com' for i in range(2000))}]\n"
            "  resolution: DNS\n"
        )
        + "  ports:\n"
        + "".join(f"  - {{number: {i + 1}, name: tcp-{i}, protocol: TCP}}\n" for i in range(ports))
        + (
            "  endpoints:\n"
            + "".join(f"  - {{address: {_ip(first + i)}}}\n" for i in range(endpoints))
            if endpoints
            else ""
        )
    )


def test_endpoints_over_the_bound_are_one_error(tmp_path: Path) -> None:
    """Each port of a ServiceEntry has its own copy of each endpoint:
    two of 300 ports and 1,000 endpoints are 600,000, the second refused
    at its endpoints (before: loaded; 1,000 ports of 30,000 took 2.4 GB);
    2,000 DNS hosts of 300 ports (each host its own endpoint) the same."""
    assert MAX_ENDPOINTS == 500_000
    text = ported_entry("a", 300, 1000) + "---\n" + ported_entry("b", 300, 1000, 1000)
    [error] = errors_of(tmp_path, text)
    line = [n for n, got in enumerate(text.splitlines(), 1) if got == "  endpoints:"][1]
    assert error.startswith(f"{tmp_path / 'rules.yaml'}:{line}: ServiceEntry b: "), error
    assert "ServiceEntry b: its 300 ports and 1,000 endpoints are 300,000 endpoint entries" in error
    assert "with the 300,000 before them, more than the 500,000" in error
    [error] = errors_of(tmp_path, ported_entry("d", 300, 0))
    assert "ServiceEntry d: its 300 ports and 2,000 hosts (DNS, each its own endpoint)" in error
    (tmp_path / "rules.yaml").write_text(ported_entry("a", 300, 1000))
    [svc] = load_rules([str(tmp_path / "rules.yaml")]).table.services()
    assert len(svc.endpoints) == 300 * 1000  # (one a port: what the bound counts)


def _dns_service(ports: int, names: int, addresses: int) -> tuple[RouteTable, DnsEndpoints]:
    """A DNS ServiceEntry of *ports* ports and *names* endpoint names, each
    answered with *addresses* addresses (a hostile external zone's)."""
    hosts = [f"n{i}.zone.example" for i in range(names)]
    svc = Service.create(
        "ext.example.com",
        [ServicePort(i + 1, f"tcp-{i}", "TCP") for i in range(ports)],
        [Endpoint(h, 443, {"name": h}) for h in hosts],
        resolution="DNS",
    )
    base = RouteTable([svc])
    answers: dict[str, Resolution | Exception] = {
        h: Resolution(tuple(f"10.{i}.{j >> 8}.{j & 255}" for j in range(addresses)), 30, "dns")
        for i, h in enumerate(hosts)
    }
    dns = DnsEndpoints(ScriptedResolver(answers))
    dns.track(base)
    asyncio.run(dns.refresh_due())
    return base, dns


def test_dns_answers_expand_within_the_endpoint_bound(caplog: pytest.LogCaptureFixture) -> None:
    """4 ports, 3 names of 100 addresses: 1,200 entries over a bound of
    600, so each name keeps the first 50 of its addresses in sorted order
    (the same subset in every worker, at every refresh), said once."""
    base, dns = _dns_service(4, 3, 100)
    with caplog.at_level(logging.WARNING, logger="l4proxy.dns"):
        table = resolved_table(base, dns.names, limit=600)
    [svc] = table.services()
    for _, eps in svc.port_endpoints:
        assert len(eps) == 150
        for i in range(3):
            kept = [e.address for e in eps if e.labels["name"] == f"n{i}.zone.example"]
            every = sorted(f"10.{i}.0.{j}" for j in range(100))
            assert kept == every[:50]
    [said] = [r.getMessage() for r in caplog.records]
    assert "1200 endpoint entries" in said and "each name keeps 50 of its addresses" in said
    full = resolved_table(base, dns.names, limit=1200).services()[0]
    assert sum(len(eps) for _, eps in full.port_endpoints) == 1200


def test_a_hostile_zones_answers_make_at_most_the_bound() -> None:
    """100 ports, 10 names of 4,000 addresses each (a TCP answer's most):
    4 million entries on the worker's event loop at each change (6.6 s,
    323 MB), now MAX_ENDPOINTS at most."""
    base, dns = _dns_service(100, 10, 4000)
    [svc] = resolved_table(base, dns.names).services()
    assert sum(len(eps) for _, eps in svc.port_endpoints) <= MAX_ENDPOINTS


def subsets_and_routes(n: int) -> str:
    """A ServiceEntry of *n* endpoints each labelled its own, a
    DestinationRule of *n* subsets each selecting one, and a
    VirtualService of *n* routes each to one subset."""
    return (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se}\nspec:\n"
        "  hosts: [svc.example.com]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n"
        "  resolution: STATIC\n  endpoints:\n"
        + "".join(f"  - {{address: {_ip(i)}, labels: {{v: x{i}, app: a}}}}\n" for i in range(n))
        + "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr}\n"
        "spec:\n  host: svc.example.com\n"
        "  trafficPolicy: {outlierDetection: {consecutive5xxErrors: 3}}\n  subsets:\n"
        + "".join(
            f"  - {{name: s{i}, labels: {{v: x{i}}}, trafficPolicy: "
            f"{{connectionPool: {{tcp: {{maxConnections: {i + 1}}}}}}}}}\n"
            for i in range(n)
        )
        + "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\n"
        "spec:\n  hosts: [svc.example.com]\n  http:\n"
        + "".join(
            f"  - match: [{{uri: {{prefix: /p{i}}}}}]\n"
            f"    route: [{{destination: {{host: svc.example.com, subset: s{i}}}}}]\n"
            for i in range(n)
        )
    )


def test_subsets_find_their_endpoints_by_label_not_by_trying_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2,000 subsets over 2,000 endpoints: the load's check that each
    selects an endpoint, and the worker's pool settings and outlier
    policies per subset (on its event loop at each reload), try the
    endpoints that carry the subset's rarest label: a few selects each
    (before: every endpoint for every subset, 10 million; 5,000 of each
    held a worker 25 s), with what each subset reaches unchanged."""
    calls = 0
    selects = Labels.selects

    def counting(self: Labels, labels: Mapping[str, str]) -> bool:
        nonlocal calls
        calls += 1
        return selects(self, labels)

    monkeypatch.setattr(Labels, "selects", counting)
    (tmp_path / "rules.yaml").write_text(subsets_and_routes(2000))
    table = load_rules([str(tmp_path / "rules.yaml")]).table
    pools = table.pool_settings()
    outliers = table.outlier_policies()
    assert calls <= 4 * 2000, calls
    assert len(outliers) == 2000
    for i in (0, 1234, 1999):
        assert pools[(_ip(i), 80)].max_connections == i + 1


def test_the_label_index_selects_what_trying_each_endpoint_selects() -> None:
    """Seeded random label sets and selectors: the table's subset endpoints
    and the load's check agree with every endpoint tried, in order."""
    rng = random.Random(7)
    values = ("a", "b", "c")
    eps = [
        Endpoint(
            f"10.0.0.{i}",
            80,
            {k: rng.choice(values) for k in ("x", "y", "z") if rng.random() < 0.7},
        )
        for i in range(60)
    ]
    svc = Service.create("s.example.com", [ServicePort(80, "http", "HTTP")], eps)
    table = RouteTable([svc])
    index = Selectable(eps)
    for _ in range(300):
        labels = Labels({k: rng.choice(values) for k in ("x", "y", "z", "w") if rng.random() < 0.5})
        every = tuple(e for e in eps if labels.selects(e.labels))
        assert table._subset_endpoints(svc, 80, labels) == every
        assert index.any(labels) == bool(every)


def test_an_address_in_a_cidr_vip_is_looked_up_per_prefix_length(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seeded overlapping CIDR blocks (IPv4 and IPv6) of 40 services: each
    address finds the service a walk of the blocks finds (the most
    specific block holding it, Envoy's longest prefix; of one block listed
    twice, the first), and no block is tried one by one
    (before: every block for every connection to an address no VIP is,
    50,000 of them 19 ms a connection)."""
    rng = random.Random(11)
    services = []
    for i in range(40):
        blocks = []
        for _ in range(3):
            if rng.random() < 0.7:
                prefix = rng.randrange(8, 31)
                net = ipaddress.ip_network(
                    f"10.{rng.randrange(4)}.{rng.randrange(256)}.0/{prefix}", strict=False
                )
            else:
                prefix = rng.randrange(96, 127)
                net = ipaddress.ip_network(
                    f"fd00::{rng.randrange(4):x}:{rng.randrange(65536):x}:0/{prefix}", strict=False
                )
            blocks.append(str(net))
        services.append(
            Service.create(
                f"s{i}.example.com",
                [ServicePort(80, "tcp", "TCP")],
                [Endpoint("192.168.0.1", 80)],
                addresses=blocks,
            )
        )
    table = RouteTable(services)
    walk = [(ipaddress.ip_network(a), s) for s in services for a in s.addresses]
    tried = 0
    contains = ipaddress._BaseNetwork.__contains__

    def counting(self: Any, other: Any) -> bool:
        nonlocal tried
        tried += 1
        return contains(self, other)

    probes = [
        f"10.{rng.randrange(4)}.{rng.randrange(256)}.{rng.randrange(256)}" for _ in range(300)
    ]
    probes += [
        f"fd00::{rng.randrange(4):x}:{rng.randrange(65536):x}:{rng.randrange(65536):x}"
        for _ in range(300)
    ]
    expected = {}
    for ip in probes:
        addr = ipaddress.ip_address(ip)
        holding = [(net, s) for net, s in walk if addr.version == net.version and addr in net]
        longest = max((net.prefixlen for net, _ in holding), default=None)
        expected[ip] = next((s.host for net, s in holding if net.prefixlen == longest), None)
    monkeypatch.setattr(ipaddress._BaseNetwork, "__contains__", counting)
    found = 0
    for ip in probes:
        got = table.service_for_address(ip, 80)
        assert (got[0].host if got else None) == expected[ip], ip
        found += got is not None
    assert tried == 0 and found > 100


def test_a_regex_of_megabytes_is_refused_before_re2_sees_it(tmp_path: Path) -> None:
    """A 5 MB uri regex: one short error at its line, and nothing of RE2's
    on stderr (before: RE2's simplifier wrote 24,000 lines there, 1 s and
    195 MB, and the error quoted the 5 MB whole)."""
    f = tmp_path / "rules.yaml"
    f.write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\n"
        "spec:\n  hosts: [svc.example.com]\n  http:\n"
        f"  - match: [{{uri: {{regex: '{'(a|b)' * 1_000_000}'}}}}]\n"
        "    route: [{destination: {host: svc.example.com}}]\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "l4proxy", "validate", str(f)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith(str(f))]
    assert len(errors) == 1 and errors[0].startswith(f"{f}:7: VirtualService vs: regex "), errors
    assert "5,000,000 characters long, more than the 65,536" in errors[0]
    assert len(done.stdout) + len(done.stderr) < 2000, done.stderr[:500]


def test_an_http_route_rules_matches_make_its_route_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rule of 64 matches (the CRD's bound) is one route of them all,
    made once (before: made again at each match with one more, 3,000
    matches 3,000 routes of 4.5 million matches in all; 40,000 matches,
    which the bound now refuses, took 6 s)."""
    made = 0
    route = gateway_api.Route

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal made
        made += 1
        return route(*args, **kwargs)

    monkeypatch.setattr(gateway_api, "Route", counting)
    replace = dataclasses.replace

    def counting_replace(obj: Any, **changes: Any) -> Any:
        nonlocal made
        made += isinstance(obj, route)
        return replace(obj, **changes)

    monkeypatch.setattr(dataclasses, "replace", counting_replace)
    rules = http_route(["h.example.com"], 1).replace(
        "  - matches: [{path: {type: PathPrefix, value: /p0}}]\n",
        "  - matches:\n"
        + "".join(f"    - {{path: {{type: PathPrefix, value: /p{i}}}}}\n" for i in range(64)),
    )
    (tmp_path / "rules.yaml").write_text(rules)
    table = load_rules([str(tmp_path / "rules.yaml")]).table
    [(key, [r])] = [(k, v) for k, v in table.to_json()["routes"].items() if k.startswith("gateway")]
    assert len(r["match"]) == 64, key
    assert made == 1

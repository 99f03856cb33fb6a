"""Small rule files that expand into huge tables are refused, cheaply.

The YAML node budget (tests/test_config_yaml.py) bounds what a load reads;
these are products of what it read: each host of a ServiceEntry has its
every address and port as VIPs, each host of a VirtualService (each
hostname of an HTTPRoute at a Gateway listener) its own copy of every
route. A 25 KB ServiceEntry of 300 hosts, addresses and ports made 27
million VIP clash errors (18 GB, 9 minutes); a 220 KB VirtualService of
2,000 hosts and 2,000 routes 4 million routes (2 GB, 30 s); an HTTPRoute of
3,000 hostnames compared every pair of them (9 million comparisons). The
sidecar's reload thread ran each: a pod OOM-killed by its own rules, or a
reload that never ended. Each is now a bounded error at its file and line
(or a lookup), counted here, and the sidecar's watcher keeps serving the
last good table.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import l4proxy.rules._gateway_api as gateway_api
from l4proxy.rules import ConfigError, load_rules
from l4proxy.rules._objects import MAX_ENDPOINTS, MAX_ROUTES
from l4proxy.rules._table import MAX_VIPS
from l4proxy.rules.watch import RuleWatcher
from tests._worker import gateway_service

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


def test_vip_pairs_over_the_bound_are_one_error(tmp_path: Path) -> None:
    """400 addresses and 300 ports of one host: 120,000 pairs over
    MAX_VIPS, one error at the ServiceEntry (before: loaded, the pairs
    checked one by one); 300 hosts of 300 each: still one."""
    assert MAX_VIPS == 100_000
    [error] = errors_of(tmp_path, service_entry(1, 400, 300))
    assert error.startswith(f"{tmp_path / 'rules.yaml'}:5: ServiceEntry se: the 400 addresses")
    assert "120,000 VIP address:port pairs" in error and "100,000" in error
    [error] = errors_of(tmp_path, service_entry(300, 300, 300))
    assert "with the 90,000 of the hosts before it" in error


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


def test_an_http_route_of_many_hostnames_and_rules_is_one_error(tmp_path: Path) -> None:
    [error] = errors_of(tmp_path, http_route([f"h{i}.example.com" for i in range(400)], 300))
    assert error.startswith(f"{tmp_path / 'rules.yaml'}:")
    assert "HTTPRoute r: its 300 rules' matches at 400 parents and hostnames are 120,000" in error


def test_a_listeners_wider_hostnames_are_looked_up_not_compared_pairwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3,000 hostnames on one listener and their wildcard: each takes the
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
    (tmp_path / "rules.yaml").write_text(http_route(names, 1))
    load_rules([str(tmp_path / "rules.yaml")])
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
    for bomb in (service_entry(300, 300, 300), virtual_service(2000, 100)):
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

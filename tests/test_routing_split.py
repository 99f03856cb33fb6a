"""The observed split matches the weights (chi-square), and no rule means an exact 2:1.

The tables are loaded from rule files as the sidecar loads them. The chi-square
statistic is compared with the critical value at p = 1e-8 (no scipy; the
suite's false-failure budget, see ALPHA in tests/mesh.py): a split that
deviates from the weights by chance fails once in 10^8 seeds, and a biased
picker fails every time (test_chi_square_catches_a_biased_split: 45/55
against 50/50 at N = 10,000 gives ~100, three times the critical value).
Seeds are fixed, so the test is repeatable.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from l4proxy.rules import load_rules
from l4proxy.rules.routing import Request, RouteTable, Service

DATA = os.path.join(os.path.dirname(__file__), "data", "rules")
REGISTRY = os.path.join(DATA, "registry.yaml")
HOST = "bootcamp.default.svc.cluster.local"
N = 3000
# Critical values of the chi-square distribution at p = 1e-8 by degrees of
# freedom: df 1 is z^2 for the two-sided normal quantile z = 5.7307; df 2 has
# the closed form -2 ln(p).
CRITICAL = {1: 5.730729**2, 2: -2 * math.log(1e-8)}


def chi_square(observed: Counter[str], weights: dict[str, int]) -> float:
    total = sum(observed.values())
    wsum = sum(weights.values())
    stat = 0.0
    for key, w in weights.items():
        expected = total * w / wsum
        stat += (observed[key] - expected) ** 2 / expected
    return stat


def rule_table(tmp_path: Path, weights: dict[str, int], seed: int) -> tuple[RouteTable, Service]:
    entries = "".join(
        f"  - labels: {{version: {v}}}\n    weight: {w}\n" for v, w in weights.items()
    )
    f = tmp_path / "rule.yaml"
    f.write_text(
        textwrap.dedent("""\
        apiVersion: config.istio.io/v1alpha2
        kind: RouteRule
        metadata: {name: split}
        spec:
          destination: {name: bootcamp}
          route:
        """)
        + entries
    )
    table = load_rules([str(f), REGISTRY], seed=seed).table
    svc = table.service(HOST)
    assert svc is not None
    return table, svc


def observe(table: RouteTable, svc: Service, n: int = N) -> Counter[str]:
    version: Counter[str] = Counter()
    for _ in range(n):
        d = table.decide(svc, 8080, Request(path="/bootcamp"))
        version[d.endpoints[0].labels["version"]] += 1
        assert d.subset in ("default", d.endpoints[0].labels["version"])
    return version


@pytest.mark.parametrize("weights", [{"v1": 50, "v2": 50}, {"v1": 20, "v2": 80}])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_weighted_split_passes_chi_square(
    tmp_path: Path, weights: dict[str, int], seed: int
) -> None:
    table, svc = rule_table(tmp_path, weights, seed)
    seen = observe(table, svc)
    assert sum(seen.values()) == N
    stat = chi_square(seen, weights)
    assert stat < CRITICAL[len(weights) - 1], (seen, stat)


def test_chi_square_catches_a_biased_split(tmp_path: Path) -> None:
    """The test above can fail: a 50/50 rule observed against 45/55 weights does."""
    table, svc = rule_table(tmp_path, {"v1": 50, "v2": 50}, seed=1)
    seen = observe(table, svc, n=10_000)
    assert chi_square(seen, {"v1": 45, "v2": 55}) > CRITICAL[1]


def test_all_weight_on_one_subset_is_exact(tmp_path: Path) -> None:
    table, svc = rule_table(tmp_path, {"v1": 0, "v2": 100}, seed=1)
    assert observe(table, svc) == {"v2": N}


def test_no_rule_is_exactly_two_to_one() -> None:
    """The tutorial's even spread: 2 v1 pods + 1 v2 pod, round robin, no rule."""
    table = load_rules([REGISTRY]).table
    svc = table.service(HOST)
    assert svc is not None
    seen = observe(table, svc)
    assert seen == {"v1": 2000, "v2": 1000}
    pods: Counter[str] = Counter()
    for _ in range(N):
        pods[table.decide(svc, 8080, None).endpoints[0].address] += 1
    assert pods == {"198.18.0.11": 1000, "198.18.0.12": 1000, "198.18.0.13": 1000}


def test_round_robin_inside_a_subset_is_even(tmp_path: Path) -> None:
    table, svc = rule_table(tmp_path, {"v1": 100}, seed=1)
    pods: Counter[str] = Counter()
    for _ in range(N):
        pods[table.decide(svc, 8080, Request()).endpoints[0].address] += 1
    assert pods == {"198.18.0.11": 1500, "198.18.0.12": 1500}


@pytest.mark.parametrize("seed", [1, 2])
def test_virtual_service_weights_are_relative(tmp_path: Path, seed: int) -> None:
    """Istio 1.15 on (istio/istio #39544): a destination gets weight / sum of
    weights; 1 and 2 is a third and two thirds. l4proxy refused any total but
    100, so such a VirtualService, valid for Istio, was rejected whole."""
    f = tmp_path / "vs.yaml"
    f.write_text(
        textwrap.dedent("""\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: split}
        spec:
          hosts: [bootcamp]
          http:
          - route:
            - destination: {host: bootcamp, subset: v1}
              weight: 1
            - destination: {host: bootcamp, subset: v2}
              weight: 2
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: split}
        spec:
          host: bootcamp
          subsets:
          - {name: v1, labels: {version: v1}}
          - {name: v2, labels: {version: v2}}
        """)
    )
    result = load_rules([str(f), REGISTRY], seed=seed)  # (raises ConfigError if refused)
    svc = result.table.service(HOST)
    assert svc is not None
    seen = observe(result.table, svc)
    assert chi_square(seen, {"v1": 1, "v2": 2}) < CRITICAL[1], seen

"""What rules written for a recent Istio meet when loaded: values that ask
for what the sidecar does anyway are accepted and change nothing
(``exportTo`` that reaches this sidecar, ``tls`` mode DISABLE,
``loadBalancer.simple: UNSPECIFIED``); what they cannot have is one error
that says why, at its file and line (another namespace's ``exportTo``, a
TLS mode that originates TLS, ``http[].delegate``, ``loadBalancer.warmup``);
the error for a ``simple`` policy it does not know lists exactly those it
takes.

``WEB`` is a service of two HTTP ports, 8080 and 9090, with two v1 pods
and a v2 one.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from l4proxy.rules import ConfigError, Diagnostic, LoadResult, load_rules
from l4proxy.rules.routing import RouteTable, Subset

HOST = "web.default.svc.cluster.local"
WEB = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web}
spec:
  hosts: [web.default.svc.cluster.local]
  ports:
  - {number: 8080, name: http, protocol: HTTP}
  - {number: 9090, name: http-admin, protocol: HTTP}
  resolution: STATIC
  endpoints:
  - {address: 198.18.2.1, labels: {app: web, version: v1}}
  - {address: 198.18.2.2, labels: {app: web, version: v1}}
  - {address: 198.18.2.3, labels: {app: web, version: v2}}
"""
DR = """\
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web}
spec:
  host: web.default.svc.cluster.local
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
"""
VS = """\
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web.default.svc.cluster.local]
  http:
  - route:
    - {destination: {host: web.default.svc.cluster.local, subset: v1}, weight: 80}
    - {destination: {host: web.default.svc.cluster.local, subset: v2}, weight: 20}
"""


def write(tmp_path: Path, text: str) -> str:
    f = tmp_path / "rules.yaml"
    f.write_text(textwrap.dedent(text))
    return str(f)


def load(tmp_path: Path, text: str, *, namespace: str = "default") -> LoadResult:
    return load_rules([write(tmp_path, text)], namespace=namespace, seed=7)


def table_json(tmp_path: Path, text: str, *, namespace: str = "default") -> dict[str, Any]:
    return load(tmp_path, text, namespace=namespace).table.to_json()


def errors_of(tmp_path: Path, text: str, *, namespace: str = "default") -> list[Diagnostic]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, namespace=namespace)
    return info.value.errors


def line_of(text: str, marker: str) -> int:
    lines = [i for i, line in enumerate(text.splitlines(), 1) if marker in line]
    assert len(lines) == 1, marker
    return lines[0]


def subsets(table: RouteTable) -> dict[str, Subset]:
    (route,) = table.routes_for(HOST)
    return {d.subset.name: d.subset for d in route.destinations}


# -- loadBalancer.simple ------------------------------------------------------


def test_unspecified_is_the_default_round_robin(tmp_path: Path) -> None:
    """``simple: UNSPECIFIED`` (Istio's enum zero: "Istio will select an
    appropriate default") is the sidecar's default, round robin: the same
    table as a rule without a loadBalancer."""
    text = WEB + DR + "  trafficPolicy:\n    loadBalancer: {simple: UNSPECIFIED}\n" + VS
    result = load(tmp_path, text)
    assert result.table.load_balancer(HOST, 8080) == "ROUND_ROBIN"
    assert result.table.to_json() == table_json(tmp_path, WEB + DR + VS)


def test_a_subset_s_unspecified_replaces_the_rule_s_policy(tmp_path: Path) -> None:
    """Given in a subset (v2), UNSPECIFIED is the default all the same,
    not the rule's policy: pilot's MergeTrafficPolicy takes a subset's
    loadBalancer whole, and an unspecified one is the default."""
    text = (
        WEB
        + DR
        + "    trafficPolicy:\n      loadBalancer: {simple: UNSPECIFIED}\n"
        + "  trafficPolicy:\n    loadBalancer: {simple: RANDOM}\n"
        + VS
    )
    got = subsets(load(tmp_path, text).table)
    assert (got["v1"].load_balancer, got["v2"].load_balancer) == ("RANDOM", "ROUND_ROBIN")


@pytest.mark.parametrize("simple", ["PASSTHROUGH", "FASTEST", "least_request"])
def test_an_unknown_policy_s_error_lists_exactly_the_values_that_load(
    tmp_path: Path, simple: str
) -> None:
    """The names the error lists are the values ``simple`` takes: each
    of them loads, and no other Istio SimpleLB name is missing from it
    (PASSTHROUGH aside, the one refused: original destination)."""
    text = WEB + DR + f"  trafficPolicy:\n    loadBalancer: {{simple: {simple}}}\n" + VS
    (err,) = errors_of(tmp_path, text)
    assert err.line == line_of(text, "simple:")
    what = "is not implemented by l4proxy" if simple == "PASSTHROUGH" else "is not known"
    assert err.message.startswith(f"load balancer {simple} {what}"), err.message
    names = set(re.findall(r"\b[A-Z][A-Z_]+[A-Z]\b", err.message.split(simple, 1)[1]))
    istio = {"UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST"}
    assert names == istio - {"PASSTHROUGH"}
    for name in sorted(names):
        ok = WEB + DR + f"  trafficPolicy:\n    loadBalancer: {{simple: {name}}}\n" + VS
        load(tmp_path, ok)  # (raises if refused)


def test_least_request_is_least_conn_by_its_deprecated_name(tmp_path: Path) -> None:
    def policy(simple: str) -> dict[str, Any]:
        lb = f"  trafficPolicy:\n    loadBalancer: {{simple: {simple}}}\n"
        return table_json(tmp_path, WEB + DR + lb + VS)

    assert policy("LEAST_REQUEST") == policy("LEAST_CONN")
    assert policy("LEAST_REQUEST")["services"][0]["load_balancer"] == "LEAST_REQUEST"


@pytest.mark.parametrize("field", ["warmup: {duration: 10s}", "warmupDurationSecs: 10s"])
def test_a_warmup_is_not_implemented_not_unknown(tmp_path: Path, field: str) -> None:
    """``loadBalancer.warmup`` (Istio 1.24) and the deprecated
    ``warmupDurationSecs`` are Istio's fields: refused as not implemented,
    with what that means, not as a typo."""
    name = field.split(":")[0]
    text = (
        WEB + DR + "  trafficPolicy:\n    loadBalancer:\n      simple: ROUND_ROBIN\n"
        f"      {field}\n" + VS
    )
    (err,) = errors_of(tmp_path, text)
    assert err.line == line_of(text, f"{name}:")
    assert err.message == (
        f"spec.trafficPolicy.loadBalancer.{name} is not implemented by l4proxy; remove it "
        "(the sidecar would not honour it); a new endpoint takes its full share of requests "
        "at once (no slow start)"
    )


# -- trafficPolicy.tls --------------------------------------------------------

PORT_9090 = (
    "    portLevelSettings:\n    - port: {number: 9090}\n      loadBalancer: {simple: RANDOM}\n"
)


@pytest.mark.parametrize(
    ("plain", "tls"),
    [
        # the rule's
        (
            "  trafficPolicy:\n    loadBalancer: {simple: RANDOM}\n",
            "  trafficPolicy:\n    loadBalancer: {simple: RANDOM}\n    tls: {mode: DISABLE}\n",
        ),
        # a trafficPolicy of tls alone (Istio takes it: it sets the mode)
        ("", "  trafficPolicy:\n    tls: {mode: DISABLE}\n"),
        # without a mode: DISABLE, the enum's zero
        ("", "  trafficPolicy:\n    tls: {}\n"),
        # a port's
        (
            "  trafficPolicy:\n" + PORT_9090,
            "  trafficPolicy:\n" + PORT_9090 + "      tls: {mode: DISABLE}\n",
        ),
    ],
    ids=["rule", "tls alone", "no mode", "port"],
)
def test_tls_mode_disable_changes_nothing(tmp_path: Path, plain: str, tls: str) -> None:
    """Mode DISABLE asks for plain TCP to the endpoints, what the sidecar
    always opens: the table is the one without it."""
    assert table_json(tmp_path, WEB + DR + tls + VS) == table_json(tmp_path, WEB + DR + plain + VS)


def test_a_subset_s_tls_mode_disable_changes_nothing(tmp_path: Path) -> None:
    own = "    trafficPolicy:\n      loadBalancer: {simple: RANDOM}\n"
    tls = own + "      tls: {mode: DISABLE}\n"
    assert table_json(tmp_path, WEB + DR + tls + VS) == table_json(tmp_path, WEB + DR + own + VS)


def test_a_setting_beside_mode_disable_is_a_warning(tmp_path: Path) -> None:
    text = (
        WEB + DR + "  trafficPolicy:\n    tls:\n      mode: DISABLE\n      sni: web.example\n" + VS
    )
    (note,) = [d for d in load(tmp_path, text).notes if "tls" in d.message]
    assert (note.severity, note.line) == ("warning", line_of(text, "sni:"))
    assert note.message == (
        "spec.trafficPolicy.tls.sni does nothing with mode DISABLE (nor in Istio); remove it"
    )


@pytest.mark.parametrize("mode", ["SIMPLE", "MUTUAL", "ISTIO_MUTUAL"])
@pytest.mark.parametrize(
    ("policy", "where"),
    [
        ("  trafficPolicy:\n    tls: {mode: MODE}\n", "spec.trafficPolicy.tls"),
        (
            "  trafficPolicy:\n" + PORT_9090 + "      tls: {mode: MODE}\n",
            "spec.trafficPolicy.portLevelSettings[0].tls",
        ),
    ],
    ids=["rule", "port"],
)
def test_a_mode_that_originates_tls_is_refused_and_says_why(
    tmp_path: Path, mode: str, policy: str, where: str
) -> None:
    text = WEB + DR + policy.replace("MODE", mode) + VS
    (err,) = errors_of(tmp_path, text)
    assert err.line == line_of(text, "tls:")
    assert err.message == (
        f"{where} is not implemented by l4proxy; remove it (the sidecar would not honour it); "
        f"mode {mode} would have the sidecar originate TLS, and its upstream connections are "
        "plain TCP (mode DISABLE, which it accepts)"
    )


def test_an_unknown_tls_mode_is_an_error(tmp_path: Path) -> None:
    text = WEB + DR + "    trafficPolicy:\n      tls: {mode: disable}\n" + VS
    (err,) = errors_of(tmp_path, text)
    assert err.line == line_of(text, "tls:")
    assert err.message.startswith("spec.subsets[1].trafficPolicy.tls.mode 'disable' is not known")


# -- exportTo -----------------------------------------------------------------

# each kind's document with ``exportTo: EXPORT`` on its own line, at the
# end of its spec; WEB, DR and VS otherwise
_KINDS = {
    "ServiceEntry": (WEB + "  exportTo: EXPORT\n" + DR + VS),
    "DestinationRule": (WEB + DR + "  exportTo: EXPORT\n" + VS),
    "VirtualService": (WEB + DR + VS.replace("  http:\n", "  exportTo: EXPORT\n  http:\n")),
}


def _with_namespace(text: str, kind: str, namespace: str) -> str:
    """*text* with *kind*'s object in *namespace* (its hosts are named in
    full: the same service in any namespace)."""
    head = f"kind: {kind}\nmetadata: {{name: web}}\n"
    assert head in text
    return text.replace(head, f"kind: {kind}\nmetadata: {{name: web, namespace: {namespace}}}\n")


@pytest.mark.parametrize("kind", list(_KINDS))
@pytest.mark.parametrize(
    ("export", "namespace"),
    [
        ("['*']", "default"),  # every namespace: Istio's default
        ("[]", "default"),  # the default again
        ("['.']", "default"),  # the object's own, which is the sidecar's
        ("[default]", "default"),  # the sidecar's by name
        ("['.']", "shop"),  # an object of shop, to a sidecar of shop
        ("[default, shop]", "shop"),
    ],
)
def test_an_export_that_reaches_this_sidecar_changes_nothing(
    tmp_path: Path, kind: str, export: str, namespace: str
) -> None:
    """The sidecar applies every object it loads; an exportTo that
    exports the object to the sidecar's namespace (``--namespace``) asks
    for that: the table is the one without it."""
    plain = _with_namespace(_KINDS[kind].replace("  exportTo: EXPORT\n", ""), kind, namespace)
    text = _with_namespace(_KINDS[kind].replace("EXPORT", export), kind, namespace)
    assert text != plain
    assert table_json(tmp_path, text, namespace=namespace) == table_json(
        tmp_path, plain, namespace=namespace
    )


@pytest.mark.parametrize("kind", list(_KINDS))
@pytest.mark.parametrize(
    ("export", "shown"),
    [
        ("['.']", "['.'] ('.' is the KIND's namespace, shop)"),
        ("[shop]", "['shop']"),
        ("[shop, other]", "['shop', 'other']"),
    ],
)
def test_an_export_that_hides_the_object_from_this_sidecar_is_an_error(
    tmp_path: Path, kind: str, export: str, shown: str
) -> None:
    """An object of namespace shop exported to shop alone: Istio would
    not apply it to a sidecar of default, and l4proxy would. One error,
    at the exportTo, that says so and what to do."""
    text = _with_namespace(_KINDS[kind].replace("EXPORT", export), kind, "shop")
    (err,) = errors_of(tmp_path, text)
    assert err.line == line_of(text, "exportTo:")
    assert err.kind == kind
    assert err.message == (
        f"spec.exportTo {shown.replace('KIND', kind)} keeps this {kind} from the sidecars of "
        "namespace default, this one's (--namespace), which l4proxy does not implement: it "
        f"applies every object it loads; leave the {kind} out of this sidecar's rule files, "
        "or export it with '*'"
    )


@pytest.mark.parametrize(
    ("kind", "export", "marker", "message"),
    [
        (
            "ServiceEntry",
            "['~']",
            "exportTo:",
            "spec.exportTo ['~'] keeps this ServiceEntry from the sidecars of namespace default",
        ),
        (
            "DestinationRule",
            "['~']",
            "exportTo:",
            "spec.exportTo[0] '~' (none) is for a ServiceEntry (Istio refuses it)",
        ),
        (
            "VirtualService",
            "['*', shop]",
            "exportTo:",
            "spec.exportTo holds '*' beside other entries (Istio refuses it",
        ),
        (
            "DestinationRule",
            "['.', default]",
            "exportTo:",
            "spec.exportTo[1] 'default' is given twice ('.' is namespace default)",
        ),
        ("VirtualService", "[Shop]", "exportTo:", "spec.exportTo[0] 'Shop' is not a namespace"),
        ("ServiceEntry", "'*'", "exportTo:", "spec.exportTo must be a list, not the string '*'"),
    ],
)
def test_an_export_istio_refuses_is_an_error(
    tmp_path: Path, kind: str, export: str, marker: str, message: str
) -> None:
    text = _KINDS[kind].replace("EXPORT", export)
    (err,) = errors_of(tmp_path, text)
    assert err.line == line_of(text, marker)
    assert err.message.startswith(message), err.message


# -- http[].delegate ----------------------------------------------------------

DELEGATING = """\
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web.default.svc.cluster.local]
  http:
  - match: [{uri: {prefix: /api}}]
    delegate: {name: web-api, namespace: default}
  - route: [{destination: {host: web.default.svc.cluster.local, subset: v1}}]
"""
DELEGATE = """\
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-api}
spec:
  http:
  - match: [{uri: {prefix: /api/v2}}]
    route: [{destination: {host: web.default.svc.cluster.local, subset: v2}}]
"""


def test_a_delegate_is_one_error_at_its_line(tmp_path: Path) -> None:
    """Not a second one for the route it has in place of a destination."""
    text = WEB + DR + DELEGATING
    (err,) = errors_of(tmp_path, text)
    assert (err.file, err.line) == (str(tmp_path / "rules.yaml"), line_of(text, "delegate:"))
    assert err.message == (
        "spec.http[0].delegate is not implemented by l4proxy; remove it (the sidecar would not "
        "honour it); put the delegate VirtualService's http routes in this one, their matches "
        "narrowed by this route's, as pilot merges them"
    )


def test_the_delegate_itself_says_what_it_is(tmp_path: Path) -> None:
    """A VirtualService without hosts is the delegate (Istio: hosts "must
    be empty for a delegate VirtualService"): its error says so."""
    text = WEB + DR + DELEGATING + DELEGATE
    errs = errors_of(tmp_path, text)
    assert [e.name for e in errs] == ["web", "web-api"]
    assert errs[1].line == line_of(text, "metadata: {name: web-api}") + 1
    assert errs[1].message == (
        "spec.hosts is required (a VirtualService without hosts is the delegate of another's "
        "http[].delegate, which l4proxy does not implement: put its http routes in that "
        "VirtualService)"
    )

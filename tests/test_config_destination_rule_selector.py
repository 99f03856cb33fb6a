"""A DestinationRule's ``workloadSelector`` (Istio's: the client pods, the
sidecars, the rule applies on). Loaded with the pod's labels
(``load_rules(pod_labels=...)``, the sidecar's ``--pod-labels``): a rule
whose ``matchLabels`` the pod has applies in place of the host's rule
without a selector; one it does not, or of another namespace than the
sidecar's, does not; with the labels not known (``validate`` without
``--pod-labels``) none does, with a note. Before, ``workloadSelector`` was
an error (not implemented), so such a rule never loaded."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pytest

from l4proxy.cli import build_parser
from l4proxy.rules import ConfigError, load_rules
from l4proxy.rules.routing import Labels, RouteTable

HOST = "web.default.svc.cluster.local"

REGISTRY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web}
spec:
  hosts: [web.default.svc.cluster.local]
  addresses: [10.0.0.1]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.1.0.1, labels: {version: v1}}
  - {address: 10.1.0.2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web]
  http:
  - route:
    - destination: {host: web, subset: pinned}
"""
# the host's rule without a selector: subset pinned is v1, RANDOM
EVERYONE = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-all}
spec:
  host: web
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
  subsets:
  - name: pinned
    labels: {version: v1}
"""
# of the pods labelled track=canary: subset pinned is v2, LEAST_REQUEST
CANARY = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-canary}
spec:
  host: web
  workloadSelector:
    matchLabels: {track: canary}
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
  subsets:
  - name: pinned
    labels: {version: v2}
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def load(tmp_path: Path, *docs: str, **kw: object) -> tuple[RouteTable, list[str]]:
    """The table of REGISTRY and *docs*, and its notes and warnings
    (``LINE: severity: message``)."""
    f = write(tmp_path, "rules.yaml", "\n---\n".join((REGISTRY, *docs)))
    result = load_rules([f], **kw)  # type: ignore[arg-type]
    return result.table, [f"{n.line}: {n.severity}: {n.message}" for n in result.notes]


def errors(tmp_path: Path, *docs: str, **kw: object) -> list[str]:
    f = write(tmp_path, "rules.yaml", "\n---\n".join((REGISTRY, *docs)))
    with pytest.raises(ConfigError) as exc:
        load_rules([f], **kw)  # type: ignore[arg-type]
    return [f"{d.line}: {d.message}" for d in exc.value.diagnostics if d.severity == "error"]


def pinned(table: RouteTable) -> tuple[Labels, str]:
    """What subset pinned selects, and the host's load balancer."""
    (route,) = table.routes_for(HOST)
    return route.destinations[0].subset.labels, table.load_balancer(HOST)


def line(tmp_path: Path, needle: str, after: int = 0) -> int:
    """The line of rules.yaml that holds *needle*, the first after line *after*."""
    lines = (tmp_path / "rules.yaml").read_text().splitlines()
    return next(i for i, ln in enumerate(lines, 1) if i > after and needle in ln)


def doc(tmp_path: Path, name: str) -> int:
    """The first line of the document of metadata.name *name* (its diagnostics' line)."""
    return line(tmp_path, f"name: {name}") - 2


def test_the_rule_applies_on_a_pod_it_selects_in_place_of_the_other(tmp_path: Path) -> None:
    table, notes = load(tmp_path, EVERYONE, CANARY, pod_labels={"app": "a", "track": "canary"})
    assert pinned(table) == (Labels({"version": "v2"}), "LEAST_REQUEST")
    assert [n for n in notes if "applies" in n] == [
        f"{doc(tmp_path, 'web-canary')}: note: applies on this pod (its workloadSelector "
        f"selects it), in place of DestinationRule web-all ({tmp_path / 'rules.yaml'}:"
        f"{doc(tmp_path, 'web-all')})"
    ]


@pytest.mark.parametrize(
    "pod_labels", [{}, {"track": "stable"}, {"app": "canary"}], ids=["none", "other", "key"]
)
def test_the_rule_does_not_apply_on_a_pod_it_does_not_select(
    tmp_path: Path, pod_labels: dict[str, str]
) -> None:
    table, notes = load(tmp_path, EVERYONE, CANARY, pod_labels=pod_labels)
    assert pinned(table) == (Labels({"version": "v1"}), "RANDOM")
    shown = ",".join(f"{k}={v}" for k, v in sorted(pod_labels.items())) or "no labels"
    assert (
        f"{doc(tmp_path, 'web-canary')}: note: not applied: "
        "its workloadSelector (track=canary) does not " in ("\n".join(notes))
    )
    assert f"does not select this pod ({shown}: --pod-labels, --pod-labels-file)" in "\n".join(
        notes
    )


def test_without_the_pods_labels_the_rule_is_checked_and_not_applied(tmp_path: Path) -> None:
    """validate without --pod-labels: the table is a pod's the rule does not
    select, and a note says so and how to check the other case."""
    table, notes = load(tmp_path, EVERYONE, CANARY)
    assert pinned(table) == (Labels({"version": "v1"}), "RANDOM")
    assert [n for n in notes if "workloadSelector" in n] == [
        f"{doc(tmp_path, 'web-canary')}: note: "
        "applies on the sidecars of the pods of default that its "
        "workloadSelector (track=canary) selects; checked here as for a pod it does not "
        "select (the pod's labels are not known: give --pod-labels to check these rules as "
        "on one it selects)"
    ]


def test_alone_it_applies_on_the_pods_it_selects_and_no_rule_on_the_others(
    tmp_path: Path,
) -> None:
    table, _ = load(tmp_path, CANARY, pod_labels={"track": "canary"})
    assert pinned(table) == (Labels({"version": "v2"}), "LEAST_REQUEST")
    # on a pod it does not select, no rule defines the route's subset: the
    # error it is without the rule
    assert errors(tmp_path, CANARY, pod_labels={}) == [
        f"{line(tmp_path, 'subset: pinned')}: subset pinned is not defined: no "
        f"DestinationRule for host {HOST} (add one with this subset's labels)"
    ]


def test_an_empty_selector_selects_every_pod_with_a_warning(tmp_path: Path) -> None:
    every = CANARY.replace("    matchLabels: {track: canary}\n", "    matchLabels: {}\n")
    table, notes = load(tmp_path, EVERYONE, every, pod_labels={})
    assert pinned(table) == (Labels({"version": "v2"}), "LEAST_REQUEST")
    assert (
        f"{line(tmp_path, 'workloadSelector:')}: warning: "
        "spec.workloadSelector has no matchLabels: it selects "
        "every pod of namespace default, whose sidecars take this DestinationRule over one "
        "without a workloadSelector (Istio warns: workload selector specified without labels)"
    ) in notes


def test_a_rule_of_another_namespace_applies_on_no_pod_of_this_one(tmp_path: Path) -> None:
    """pilot honours a workloadSelector on the sidecars of the rule's own
    namespace only (it never exports one): the pod's labels match, and the
    rule does not apply; a warning, as it applies on no pod of this one."""
    other = CANARY.replace("name: web-canary}", "name: web-canary, namespace: shop}").replace(
        "host: web\n", f"host: {HOST}\n"
    )
    table, notes = load(tmp_path, EVERYONE, other, pod_labels={"track": "canary"})
    assert pinned(table) == (Labels({"version": "v1"}), "RANDOM")
    assert (
        f"{doc(tmp_path, 'web-canary')}: warning: "
        "not applied: a DestinationRule of a workloadSelector applies "
        "on the sidecars of its own namespace (shop) only, as in Istio, and this sidecar's "
        "is default (--namespace)"
    ) in notes


def test_of_two_rules_that_select_the_pod_the_older_applies(tmp_path: Path) -> None:
    """pilot sorts a host's rules of a selector by creationTimestamp, then
    name, and takes the first that selects the proxy."""
    newer = CANARY.replace(
        "name: web-canary}", 'name: a-newer, creationTimestamp: "2025-01-02T00:00:00Z"}'
    )
    older = (
        CANARY.replace(
            "name: web-canary}", 'name: z-older, creationTimestamp: "2025-01-01T00:00:00Z"}'
        )
        .replace("{track: canary}", "{app: web}")
        .replace("LEAST_REQUEST", "RANDOM")
    )
    table, notes = load(tmp_path, newer, older, pod_labels={"app": "web", "track": "canary"})
    assert table.load_balancer(HOST) == "RANDOM"
    assert (
        f"{doc(tmp_path, 'a-newer')}: warning: not applied: DestinationRule "
        f"z-older ({tmp_path / 'rules.yaml'}:{doc(tmp_path, 'z-older')}) "
        f"selects this pod for host {HOST} too, and applies, the older (by creationTimestamp, "
        "then name, as in Istio)"
    ) in notes
    # without timestamps: the first by name
    table, _ = load(
        tmp_path,
        CANARY.replace("name: web-canary}", "name: b}"),
        CANARY.replace("name: web-canary}", "name: a}")
        .replace("{track: canary}", "{app: web}")
        .replace("LEAST_REQUEST", "RANDOM"),
        pod_labels={"app": "web", "track": "canary"},
    )
    assert table.load_balancer(HOST) == "RANDOM"


def test_two_rules_of_one_selector_for_one_host_are_an_error(tmp_path: Path) -> None:
    """As two rules without one are (pilot merges both kinds; l4proxy asks
    for one rule), whatever the pod's labels."""
    again = CANARY.replace("name: web-canary}", "name: web-canary-2}")
    got = errors(tmp_path, EVERYONE, CANARY, again)
    assert got == [
        f"{doc(tmp_path, 'web-canary-2')}: host {HOST} already has DestinationRule web-canary "
        f"({tmp_path / 'rules.yaml'}:{doc(tmp_path, 'web-canary}')}) of the same "
        "workloadSelector (track=canary); merge their subsets into one"
    ]


@pytest.mark.parametrize(
    ("selector", "export", "expected"),
    [
        (
            '{"app*": x}',
            None,
            "label name 'app*' in spec.workloadSelector.matchLabels is not a valid label name "
            "(Kubernetes': at most 63 letters, digits, '-', '_' and '.', beginning and ending "
            "with a letter or digit, after an optional DNS prefix and '/', as in "
            "app.kubernetes.io/name)",
        ),
        (
            '{track: "no good"}',
            None,
            "label track='no good' in spec.workloadSelector.matchLabels is not a valid label "
            "value (Kubernetes': at most 63 letters, digits, '-', '_' and '.', beginning and "
            "ending with a letter or digit, or empty)",
        ),
        (
            "{track: 1}",
            None,
            "label track in spec.workloadSelector.matchLabels must be a string, not the "
            'number 1 (quote it: track: "1")',
        ),
        (
            "{track: canary}",
            '["*"]',
            "spec.exportTo[0] '*': a DestinationRule with a workloadSelector cannot be exported "
            "beyond its own namespace (default: '.'); Istio refuses it and applies it on the "
            "sidecars of that namespace only",
        ),
        (
            "{track: canary}",
            '[".", "shop"]',
            "spec.exportTo[1] 'shop': a DestinationRule with a workloadSelector cannot be "
            "exported beyond its own namespace (default: '.'); Istio refuses it and applies it "
            "on the sidecars of that namespace only",
        ),
        (
            "{track: canary}",
            '[".", "default"]',
            "spec.exportTo holds 2 entries: a DestinationRule with a workloadSelector may name "
            "its own namespace once ('.'), and no other (Istio refuses it)",
        ),
    ],
    ids=["key", "value", "integer", "export-all", "export-other", "export-twice"],
)
def test_what_istio_refuses_is_an_error_at_its_line(
    tmp_path: Path, selector: str, export: str | None, expected: str
) -> None:
    text = CANARY.replace("{track: canary}", selector)
    if export is not None:
        text = text.replace("  host: web\n", f"  host: web\n  exportTo: {export}\n")
    got = errors(tmp_path, text)
    assert len(got) == 1 and got[0].endswith(f": {expected}"), got
    line = int(got[0].split(":")[0])
    text = (tmp_path / "rules.yaml").read_text().splitlines()[line - 1]
    assert ("exportTo" in text) if export else ("matchLabels" in text or "track" in text)


def test_own_namespace_export_is_accepted(tmp_path: Path) -> None:
    for export in ('["."]', "[default]", "[]"):
        text = CANARY.replace("  host: web\n", f"  host: web\n  exportTo: {export}\n")
        table, _ = load(tmp_path, EVERYONE, text, pod_labels={"track": "canary"})
        assert pinned(table) == (Labels({"version": "v2"}), "LEAST_REQUEST"), export


SAYS_MATCH_LABELS = (
    "unknown field spec.workloadSelector.labels: a DestinationRule's workloadSelector says "
    "matchLabels (labels is a Sidecar's or a ServiceEntry's); write matchLabels: {KEY: VALUE}"
)


def test_a_sidecar_selector_field_is_a_typo_at_its_line(tmp_path: Path) -> None:
    """A Sidecar's selector says ``labels``; a DestinationRule's
    ``matchLabels``: the error says which to write (before, only that
    matchLabels was expected)."""
    text = CANARY.replace("matchLabels:", "labels:")
    assert errors(tmp_path, text) == [
        f"{line(tmp_path, '    labels: {track')}: {SAYS_MATCH_LABELS}"
    ]


def test_labels_beside_another_unknown_field_are_each_an_error(tmp_path: Path) -> None:
    """``labels`` and another unknown field: each at its line, ``labels``
    said once (not again as a field fields() does not know)."""
    text = CANARY.replace("matchLabels:", "labels:").replace(
        "  workloadSelector:\n", "  workloadSelector:\n    namespace: default\n"
    )
    assert errors(tmp_path, text) == [
        f"{line(tmp_path, '    labels: {track')}: {SAYS_MATCH_LABELS}",
        f"{line(tmp_path, '    namespace: default')}: unknown field "
        "spec.workloadSelector.namespace (expected one of: matchLabels)",
    ]


def test_validate_takes_the_pods_labels(tmp_path: Path) -> None:
    """``l4proxy validate --pod-labels``: the rules as that pod's sidecar loads them."""
    f = write(tmp_path, "rules.yaml", "\n---\n".join((REGISTRY, EVERYONE, CANARY)))
    outs = {}
    for extra in ([], ["--pod-labels", "track=canary"]):
        args = build_parser().parse_args(["validate", "-v", *extra, f])
        out, err = io.StringIO(), io.StringIO()
        assert args.func(args, out, err) == 0, err.getvalue()
        outs[bool(extra)] = out.getvalue() + err.getvalue()
    assert "checked here as for a pod it does not select" in outs[False]
    assert "applies on this pod (its workloadSelector selects it)" in outs[True]
    assert "subset pinned (version=v1; RANDOM)" in outs[False]
    assert "subset pinned (version=v2; LEAST_REQUEST)" in outs[True]


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("bad", [" =x", "app", "=web", "app=web,track"])
def test_validate_and_run_read_the_pod_labels_alike(
    command: str, bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One parser for both commands: ``run`` took ``--pod-labels ' =x'`` as a
    label of an empty name where ``validate`` refused it (exit 2)."""
    paths = ["rules/"] if command == "validate" else []
    with pytest.raises(SystemExit) as exc:
        build_parser(command).parse_args([command, "--pod-labels", bad, *paths])
    assert exc.value.code == 2
    assert "argument --pod-labels: expected key=value[,key=value]" in capsys.readouterr().err
    args = build_parser(command).parse_args(
        [command, "--pod-labels", " app = web ,,track=canary", *paths]
    )
    assert args.pod_labels == {"app": "web", "track": "canary"}


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize(
    ("bad", "said"),
    [
        (
            "track=canary app=web",
            "label track='canary app=web' is not a Kubernetes label value (at most 63 "
            "letters, digits, '-', '_' and '.', beginning and ending with a letter or digit, "
            "or empty); expected key=value[,key=value] (labels separated by ','), got "
            "'track=canary app=web'",
        ),
        (
            "app*=web",
            "label name 'app*' is not a Kubernetes label name (at most 63 letters, digits, "
            "'-', '_' and '.', beginning and ending with a letter or digit, after an optional "
            "DNS prefix and '/'); expected key=value[,key=value], got 'app*=web'",
        ),
        (
            "app=web,track=-canary",
            "label track='-canary' is not a Kubernetes label value",
        ),
    ],
    ids=["space-separated", "name", "value"],
)
def test_a_pod_label_that_is_not_kubernetes_syntax_is_refused(
    command: str, bad: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pod's labels are Kubernetes': ``--pod-labels 'track=canary
    app=web'`` (labels separated by a space) was read as one label whose
    value no selector matches, and the sidecar routed as for a pod without
    it; now exit 2 with the option, the syntax and what was given, in both
    commands."""
    paths = ["rules/"] if command == "validate" else []
    with pytest.raises(SystemExit) as exc:
        build_parser(command).parse_args([command, "--pod-labels", bad, *paths])
    assert exc.value.code == 2
    assert f"argument --pod-labels: {said}" in capsys.readouterr().err
    args = build_parser(command).parse_args(
        [command, "--pod-labels", "app.kubernetes.io/name=web,track=,v=1.2_b", *paths]
    )
    assert args.pod_labels == {"app.kubernetes.io/name": "web", "track": "", "v": "1.2_b"}


def test_validate_takes_the_pods_labels_file(tmp_path: Path) -> None:
    """``l4proxy validate --pod-labels-file``: the Downward API file the
    sidecar reads, its --pod-labels over it, as ``l4proxy run`` merges them."""
    f = write(tmp_path, "rules.yaml", "\n---\n".join((REGISTRY, EVERYONE, CANARY)))
    labels = write(tmp_path, "labels", 'app="web"\ntrack="canary"\n')
    seen = {}
    for extra in ([], ["--pod-labels", "track=stable"]):
        args = build_parser().parse_args(["validate", "-v", "--pod-labels-file", labels, *extra, f])
        out, err = io.StringIO(), io.StringIO()
        assert args.func(args, out, err) == 0, err.getvalue()
        seen[bool(extra)] = out.getvalue() + err.getvalue()
    assert "subset pinned (version=v2; LEAST_REQUEST)" in seen[False]
    assert "subset pinned (version=v1; RANDOM)" in seen[True]


@pytest.mark.parametrize(
    "pod_labels", [None, {}, {"track": "canary"}], ids=["unknown", "not-selected", "selected"]
)
@pytest.mark.parametrize("missing", ["canary", "everyone"])
def test_a_subset_a_route_names_must_be_in_each_rule_that_applies_on_a_pod(
    tmp_path: Path, pod_labels: dict[str, str] | None, missing: str
) -> None:
    """The route's subset ``pinned`` in the rule without a selector, not in
    the selector's (or the other way round): before, the files loaded on the
    pods of one rule and were refused on the others', and ``validate``
    without ``--pod-labels`` passed what a canary pod's sidecar refused.
    Now an error on every pod, at the route, naming the rule without it."""
    everyone, canary = EVERYONE, CANARY
    if missing == "canary":
        canary = canary.replace("name: pinned", "name: other")
    else:
        everyone = everyone.replace("name: pinned", "name: other")
    [err] = errors(tmp_path, everyone, canary, pod_labels=pod_labels)
    assert err.startswith(f"{line(tmp_path, 'subset: pinned')}: subset pinned is not defined by ")
    rule = {"canary": "web-canary", "everyone": "web-all"}[missing]
    assert f"DestinationRule {rule}" in err and "(it defines: other)" in err, err


def test_a_subset_in_each_rule_that_applies_on_a_pod_loads_on_every_pod(tmp_path: Path) -> None:
    """(a rule of another namespace applies on no pod of this one: not asked)"""
    other = CANARY.replace("metadata: {name: web-canary}", "metadata: {name: c, namespace: x}")
    other = other.replace("host: web\n", f"host: {HOST}\n").replace("name: pinned", "name: o")
    for pod_labels in (None, {}, {"track": "canary"}):
        table, _ = load(tmp_path, EVERYONE, CANARY, other, pod_labels=pod_labels)
        assert table.routes_for(HOST)


def test_a_subset_the_rule_applied_here_lacks_names_it_where_it_is(tmp_path: Path) -> None:
    """On a pod the rule of a selector selects, a route's subset it does not
    define is an error that names where that rule is and why it is the one
    applied (before: only its name, as for a host's only rule, and a user
    looked for the subset in the rule without a selector, which has it)."""
    other = CANARY.replace("  - name: pinned\n", "  - name: other\n")
    got = errors(tmp_path, EVERYONE, other, pod_labels={"track": "canary"})
    assert got == [
        f"{line(tmp_path, 'subset: pinned')}: subset pinned is not defined by DestinationRule "
        f"web-canary for host {HOST} (it defines: other); web-canary "
        f"({tmp_path / 'rules.yaml'}:{doc(tmp_path, 'web-canary')}) applies on this pod, its "
        "workloadSelector (track=canary) selecting it: define the subset there too"
    ]

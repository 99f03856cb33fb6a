"""A file held back must not leave a route sending requests to no service.

Per-file isolation (l4proxy.rules.watch) serves the other files' changes
while a broken file is held back. A ServiceEntry added in a file saved with
an error, beside the route that sends it a share, was held back (left out,
or its file at the last good version, without it) while the route went
live: that share of svc's requests failed, with a "no ServiceEntry"
warning, where loading all or nothing had kept the last good table. The
loader marks such warnings (reason UNRESOLVED: a route's share of weight
above 0, an HTTPRoute backendRef, an Ingress backend), and a held
combination with one that the table served has not is not served: the
whole last good table keeps serving, as where the combination would lose
an object.

A real :class:`~l4proxy.rules.watch.RuleWatcher` loading real files.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

import l4proxy.rules.watch as rulewatch
from l4proxy.rules import UNRESOLVED, load_rules
from l4proxy.rules.watch import RuleWatcher
from tests.test_reload_per_file import write

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "deploy" / "examples" / "gateway-api"
SVC3 = "svc3.default.svc.cluster.local"
HOST = "svc.default.svc.cluster.local"
# svc: endpoints of versions v1 and v2
SERVICE = f"""\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: svc}}
spec:
  hosts: [{HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: 8081}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: 8082}}, labels: {{version: v2}}}}
"""


def subsets(*names: str) -> str:
    """svc's DestinationRule, a subset per version in *names*."""
    rows = "".join(f"  - {{name: {n}, labels: {{version: {n}}}}}\n" for n in names)
    return (
        "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\n"
        f"metadata: {{name: svc}}\nspec:\n  host: {HOST}\n  subsets:\n{rows}"
    )


def split(v1: int, v2: int = -1, *, other: str = "") -> str:
    """svc's VirtualService: *v1* % to subset v1, the rest to subset v2 (or,
    with *other*, to that host, no subset)."""
    v2 = 100 - v1 if v2 < 0 else v2
    second = f"{{host: {other}}}" if other else f"{{host: {HOST}, subset: v2}}"
    return (
        "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\n"
        f"metadata: {{name: svc}}\nspec:\n  hosts: [{HOST}]\n  http:\n  - route:\n"
        f"    - destination: {{host: {HOST}, subset: v1}}\n      weight: {v1}\n"
        f"    - destination: {second}\n      weight: {v2}\n"
    )


def other_service(n: int) -> str:
    """Another service's ServiceEntry: a change no route depends on."""
    return (
        "apiVersion: networking.istio.io/v1beta1\nkind: ServiceEntry\n"
        f"metadata: {{name: other{n}}}\nspec:\n  hosts: [other{n}.example.com]\n"
        "  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: STATIC\n"
        f"  endpoints: [{{address: 198.18.0.{n}}}]\n"
    )


def service3(broken: bool) -> str:
    """svc3's ServiceEntry; *broken*: its resolution misspelt (line 8)."""
    return (
        "apiVersion: networking.istio.io/v1beta1\nkind: ServiceEntry\n"
        f"metadata: {{name: svc3}}\nspec:\n  hosts: [{SVC3}]\n"
        "  ports: [{number: 80, name: http, protocol: HTTP}]\n"
        "  endpoints: [{address: 127.0.0.1, ports: {http: 8083}}]\n"
        f"  resolution: {'STATC' if broken else 'STATIC'}\n"
    )


def shares(watcher: RuleWatcher) -> dict[str, int]:
    """svc's split in the table served, by subset (svc3's: by host)."""
    [r] = watcher.state.table.routes_for(HOST)
    return {
        d.host.split(".")[0] if d.host != HOST else d.subset.name: d.weight
        for d in r.destinations
        if d.subset is not None
    }


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    d = tmp_path / "rules"
    d.mkdir()
    write(d / "service.yaml", SERVICE)
    write(d / "subsets.yaml", subsets("v1", "v2"))
    write(d / "route.yaml", split(100))
    return d


def test_a_route_to_a_service_entry_in_a_new_broken_file_keeps_the_last_good_table(
    rules: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """svc3.yaml (new, its resolution misspelt) and a split that sends 10 %
    of svc's requests to svc3, saved together: left out, svc3.yaml would
    leave that 10 % failing; the whole last good table keeps serving (100 %
    to v1), the log says why, naming route.yaml's warning. Fixed, both go
    live. Before, the split went live at once, svc3's share with no
    ServiceEntry."""
    watcher = RuleWatcher([str(rules)], interval=3600, settle=0)
    assert watcher.load_now()
    table = watcher.state.table
    write(rules / "svc3.yaml", service3(broken=True))
    write(rules / "route.yaml", split(90, 10, other=SVC3))
    with caplog.at_level(logging.INFO, logger=rulewatch.log.name):
        assert not watcher.load_now()
    st = watcher.state
    assert (st.table, st.generation, shares(watcher)) == (table, 1, {"v1": 100, "v2": 0})
    assert st.last_error is not None and st.last_error.startswith(f"{rules / 'svc3.yaml'}:8: ")
    [said] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said.startswith(
        f"rules: with {rules / 'svc3.yaml'} left out, 1 share(s) of requests would go to a "
        f"host that no ServiceEntry describes: {rules / 'route.yaml'}:10: warning: "
        f"VirtualService svc: {SVC3} has no ServiceEntry in these files"
    ), said
    assert "the whole last good table keeps serving" in said
    write(rules / "svc3.yaml", service3(broken=False))
    assert watcher.load_now()
    assert shares(watcher) == {"v1": 90, "svc3": 10}


def test_a_service_entry_added_to_a_file_saved_broken_keeps_the_last_good_table(
    rules: Path,
) -> None:
    """service.yaml gains svc3's ServiceEntry, saved with an error in it,
    beside the split to svc3: service.yaml is held at its last good version
    (without svc3), so the split's 10 % would fail; not served."""
    watcher = RuleWatcher([str(rules)], interval=3600, settle=0)
    assert watcher.load_now()
    write(rules / "service.yaml", SERVICE + "---\n" + service3(broken=True))
    write(rules / "route.yaml", split(90, 10, other=SVC3))
    assert not watcher.load_now()
    assert (watcher.state.generation, shares(watcher)) == (1, {"v1": 100, "v2": 0})


def test_a_route_to_no_service_that_is_served_already_does_not_hold_the_table(
    rules: Path,
) -> None:
    """The table served sends 10 % to svc3 already (its warning is said, the
    share fails: the user's own doing); typo.yaml saved broken beside a new
    ServiceEntry of another file: that goes live, route.yaml's warning being
    no new one (the file moved down a line: compared by object and
    message, not by line). A rule that held the table for any warning of
    reason UNRESOLVED kept the last good table here."""
    write(rules / "route.yaml", split(90, 10, other=SVC3))
    watcher = RuleWatcher([str(rules)], interval=3600, settle=0)
    assert watcher.load_now()
    write(rules / "typo.yaml", "kind: ConfigMap\ndata: [\n")
    write(rules / "more.yaml", other_service(1))
    write(rules / "route.yaml", "# moved down a line\n" + split(90, 10, other=SVC3))
    assert watcher.load_now()
    assert watcher.state.table.service("other1.example.com") is not None
    assert [h.path for h in watcher.state.held] == [str(rules / "typo.yaml")]


def test_an_httproute_backend_in_a_new_broken_file_keeps_the_last_good_table(
    tmp_path: Path,
) -> None:
    """The Gateway API's tutorial at all-v1; then bootcamp-v3's ServiceEntry
    in a new file saved broken, beside the HTTPRoute's 50 % to bootcamp-v3:
    not served (the backendRef's warning is of reason UNRESOLVED)."""
    d = tmp_path / "rules"
    d.mkdir()
    shutil.copy(REPO / "tests" / "data" / "gateway-api" / "registry-per-version.yaml", d)
    shutil.copy(EXAMPLES / "gateway.yaml", d)
    shutil.copy(EXAMPLES / "httproute-all-v1.yaml", d / "route.yaml")
    watcher = RuleWatcher([str(d)], interval=3600, settle=0)
    assert watcher.load_now()
    digest = watcher.state.digest
    v3 = (
        "apiVersion: networking.istio.io/v1alpha3\nkind: ServiceEntry\n"
        "metadata: {name: bootcamp-v3}\nspec:\n"
        "  hosts: [bootcamp-v3.default.svc.cluster.local]\n"
        "  ports: [{number: 8080, name: http, protocol: HTTP}]\n"
        "  endpoints: [{address: 198.18.0.14}]\n  resolution: STATC\n"
    )
    write(d / "v3.yaml", v3)
    write(
        d / "route.yaml",
        (EXAMPLES / "httproute-50-v2.yaml").read_text().replace("bootcamp-v2", "bootcamp-v3"),
    )
    assert not watcher.load_now()
    assert (watcher.state.generation, watcher.state.digest) == (1, digest)
    write(d / "v3.yaml", v3.replace("STATC", "STATIC"))
    assert watcher.load_now()


@pytest.mark.parametrize(
    ("route", "unresolved"),
    [
        (split(90, 10, other=SVC3), 1),  # a share of svc's requests
        (split(100, 0, other=SVC3), 0),  # weight 0: no request goes there
        (  # a mirror: a copy, the request itself is served by v1
            split(100).replace("  - route:\n", f"  - mirror: {{host: {SVC3}}}\n    route:\n"),
            0,
        ),
    ],
    ids=["share", "weight-0", "mirror"],
)
def test_the_loader_marks_a_share_sent_to_no_service(
    tmp_path: Path, route: str, unresolved: int
) -> None:
    d = tmp_path / "rules"
    d.mkdir()
    (d / "service.yaml").write_text(SERVICE + "---\n" + subsets("v1", "v2"))
    (d / "route.yaml").write_text(route)
    notes = load_rules([str(d)]).notes
    assert any(SVC3 in n.message for n in notes), notes
    assert sum(n.reason == UNRESOLVED for n in notes) == unresolved, notes


def test_an_unattached_httproutes_backend_is_not_marked(tmp_path: Path) -> None:
    """An HTTPRoute attached to nothing serves nothing: its backendRef to no
    service is said (once it attaches) but sends no request."""
    d = tmp_path / "rules"
    d.mkdir()
    shutil.copy(REPO / "tests" / "data" / "gateway-api" / "registry-per-version.yaml", d)
    route = (EXAMPLES / "httproute-50-v2.yaml").read_text().replace("bootcamp-v2", "bootcamp-v3")
    mesh = '  - group: ""                       # the mesh: traffic to the bootcamp Service\n'
    mesh += "    kind: Service\n    name: bootcamp\n    port: 8080\n"
    assert mesh in route
    (d / "route.yaml").write_text(route.replace(mesh, ""))  # (no Gateway in d)
    notes = load_rules([str(d)]).notes
    [said] = [n for n in notes if "bootcamp-v3" in n.message]
    assert said.message.startswith("once this HTTPRoute attaches: backendRef bootcamp-v3")
    assert said.reason is None
    (d / "route.yaml").write_text(route)  # attached to the Service bootcamp: marked
    [said] = [n for n in load_rules([str(d)]).notes if "bootcamp-v3" in n.message]
    assert said.reason == UNRESOLVED

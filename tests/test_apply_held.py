"""``l4proxy create|replace|delete`` judge a change as the sidecar would load it.

The sidecar holds a broken rule file back (at its last good version, or
left out where it has none) and serves the other files' changes
(l4proxy.rules.watch). Apply validated the whole directory: a good
``replace`` (a VirtualService's rollback) was refused for an unrelated file
that someone else had saved with a typo. Now the files of DIR invalid
already are left out of apply's check, with a warning that names each error
(file and line); a change whose own file is invalid, one that makes another
file invalid, one that needs more of an invalid file than the files needed
before, and one that sends requests to a host no ServiceEntry describes
while a file is held back are still refused, each saying why, and DIR is
left byte for byte as it was.

Every test runs the real CLI (``python -m l4proxy``) on real files; the
last one a real sidecar (``l4proxy run``) that serves the change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._worker import gateway_service
from tests.test_reload_held_unresolved import SERVICE, other_service, split, subsets
from tests.test_reload_per_file import Sidecar, backends, route, sidecar, write

REPO = Path(__file__).resolve().parents[1]
BROKEN = "kind: ConfigMap\ndata: [\n"  # a YAML syntax error at line 3, column 1
# A ServiceEntry of its own whose resolution is misspelt (line 6): YAML that
# parses, a document that does not load
MISSPELT = (
    "apiVersion: networking.istio.io/v1beta1\nkind: ServiceEntry\n"
    "metadata: {name: other2}\nspec:\n  hosts: [other2.example.com]\n"
    "  resolution: STATC\n  ports: [{number: 80, name: http, protocol: HTTP}]\n"
)


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    """svc's ServiceEntry, DestinationRule and VirtualService (all to v1),
    each in a file of its own, and another service's ServiceEntry."""
    d = tmp_path / "rules"
    d.mkdir()
    (d / "service.yaml").write_text(SERVICE)
    (d / "subsets.yaml").write_text(subsets("v1", "v2"))
    (d / "route.yaml").write_text(split(100))
    (d / "other.yaml").write_text(other_service(1))
    return d


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.startswith(".")}


def l4(verb: str, f: Path | str, d: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "l4proxy", verb, "-f", str(f), "--rules", str(d), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def source(tmp_path: Path, name: str, text: str) -> Path:
    """*text* as FILE, outside DIR."""
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("broken", "where", "error"),
    [
        (BROKEN, "3:1", "YAML syntax error"),
        (MISSPELT, "6", "ServiceEntry other2: resolution 'STATC' is not known"),
    ],
    ids=["yaml", "schema"],
)
@pytest.mark.parametrize("verb", ["create", "replace", "delete"])
def test_a_change_beside_an_unrelated_broken_file_is_done_with_a_warning(
    rules: Path, tmp_path: Path, verb: str, broken: str, where: str, error: str
) -> None:
    """typo.yaml (never valid: a YAML syntax error, or a document that does
    not load) beside a create, a replace (a rollback of svc to v1 50 %) and
    a delete: each is done, and typo.yaml's error is said as a warning with
    its file and line. Before, each was refused (exit 1) for typo.yaml."""
    typo = rules / "typo.yaml"
    typo.write_text(broken)
    change = {
        "create": ("more.yaml", other_service(3)),
        "replace": ("rollback.yaml", split(50)),
        "delete": ("other.yaml", other_service(1)),
    }
    name, text = change[verb]
    f = source(tmp_path, name, text)
    step = l4(verb, f, rules)
    assert step.returncode == 0, step.stderr
    assert f"{typo}:{where}: warning: {error}" in step.stderr, step.stderr
    assert (
        f"l4proxy {verb}: warning: {typo} is invalid and not part of this {verb}" in step.stderr
    ), step.stderr
    after = snapshot(rules)
    if verb == "create":
        assert after["more.yaml"] == text.encode()
    elif verb == "replace":
        assert after["route.yaml"] == text.encode()
    else:
        assert "other.yaml" not in after
    assert after["typo.yaml"] == broken.encode()


def test_a_change_whose_own_file_is_broken_is_refused_with_its_file_and_line(
    rules: Path, tmp_path: Path
) -> None:
    """A rollback with a weight out of range beside typo.yaml: refused for
    its own error (its file and line), typo.yaml named as a warning; DIR as
    it was. Before, typo.yaml's error alone was said (the file apply found
    first), and the change's own was never looked at."""
    (rules / "typo.yaml").write_text(BROKEN)
    before = snapshot(rules)
    bad = source(tmp_path, "rollback.yaml", split(50).replace("weight: 50", "weight: -5", 1))
    step = l4("replace", bad, rules)
    assert step.returncode == 1, step.stderr
    line = 1 + bad.read_text().splitlines().index("      weight: -5")
    assert f"{bad}:{line}: VirtualService svc: " in step.stderr, step.stderr
    assert f"refused: {bad} is invalid" in step.stderr and "nothing changed" in step.stderr
    assert f"{rules / 'typo.yaml'}:3:1: warning: YAML syntax error" in step.stderr
    assert snapshot(rules) == before


@pytest.mark.parametrize("typo", [False, True], ids=["alone", "beside-a-broken-file"])
def test_a_change_that_makes_another_file_invalid_is_refused_saying_so(
    rules: Path, tmp_path: Path, typo: bool
) -> None:
    """subsets.yaml replaced by one without subset v1, which route.yaml
    names: the change loads on its own but route.yaml would not, and the
    sidecar would hold route.yaml back at the same text (refused again)
    and keep its whole last good table. Refused, naming route.yaml and its
    error's line, with or without an unrelated broken file beside; before,
    the refusal said the directory would be invalid (and, beside typo.yaml,
    said typo.yaml's error alone)."""
    if typo:
        (rules / "typo.yaml").write_text(BROKEN)
    before = snapshot(rules)
    step = l4("replace", source(tmp_path, "subsets.yaml", subsets("v2")), rules)
    assert step.returncode == 1, step.stderr
    route_yaml = rules / "route.yaml"
    assert f"{route_yaml}:8: VirtualService svc: subset v1 is not defined" in step.stderr
    assert f"refused: this replace makes {route_yaml} invalid" in step.stderr, step.stderr
    assert "nothing changed" in step.stderr
    assert snapshot(rules) == before


def test_a_delete_that_makes_another_file_invalid_is_refused_saying_so(rules: Path) -> None:
    """delete of svc's DestinationRule, whose subsets route.yaml names."""
    before = snapshot(rules)
    step = l4("delete", rules / "subsets.yaml", rules)
    assert step.returncode == 1, step.stderr
    assert f"refused: this delete makes {rules / 'route.yaml'} invalid" in step.stderr
    assert snapshot(rules) == before


@pytest.mark.parametrize("verb", ["replace", "delete"])
def test_a_change_beside_a_broken_file_the_others_need_is_done_where_it_needs_no_more(
    rules: Path, tmp_path: Path, verb: str
) -> None:
    """subsets.yaml saved broken: the sidecar serves its last good version,
    whose text apply cannot read, and with subsets.yaml left out route.yaml
    does not load (its subsets are not defined), before the change as after
    it. A rollback of route.yaml to v1 50 % names the subsets it named
    before, and a delete of other.yaml touches nothing of it: each adds no
    error, and is done, with a warning that says what is left out and what
    the files need. Before, each was refused for subsets.yaml."""
    subsets_yaml = rules / "subsets.yaml"
    subsets_yaml.write_text(BROKEN)
    if verb == "replace":
        step = l4(verb, source(tmp_path, "rollback.yaml", split(50)), rules)
    else:
        step = l4(verb, rules / "other.yaml", rules)
    assert step.returncode == 0, step.stderr
    assert f"{subsets_yaml}:3:1: warning: YAML syntax error" in step.stderr
    assert (
        f"l4proxy {verb}: warning: with {subsets_yaml} left out the files do not load "
        f"(2 errors), before this {verb} as after it: they need what it holds" in step.stderr
    ), step.stderr
    assert "subset v1 is not defined" not in step.stderr  # (not errors of what is served)
    if verb == "replace":
        assert (rules / "route.yaml").read_text() == split(50)
    else:
        assert not (rules / "other.yaml").exists()


def test_a_change_that_needs_more_of_a_broken_file_is_refused_saying_so(
    rules: Path, tmp_path: Path
) -> None:
    """As above, but the new route names subset v3, which route.yaml did not
    name before: whether subsets.yaml's last good version defines it, apply
    cannot tell. Refused, naming the error it adds and the file to fix."""
    subsets_yaml = rules / "subsets.yaml"
    subsets_yaml.write_text(BROKEN)
    before = snapshot(rules)
    f = source(tmp_path, "rollback.yaml", split(50).replace("subset: v2", "subset: v3"))
    step = l4("replace", f, rules)
    assert step.returncode == 1, step.stderr
    assert f"{f}:10: VirtualService svc: subset v3 is not defined" in step.stderr
    assert "subset v1 is not defined" not in step.stderr  # (unmet before too)
    assert (
        f"refused: with {subsets_yaml} left out (invalid already: the sidecar holds it back) "
        "the files do not load, before this replace either, and this replace adds 1 error"
    ) in step.stderr, step.stderr
    assert f"fix {subsets_yaml} first; nothing changed" in step.stderr
    assert snapshot(rules) == before


def test_a_change_that_would_send_requests_to_no_service_beside_a_broken_file_is_refused(
    rules: Path, tmp_path: Path
) -> None:
    """A split that sends 10 % to svc3, which no ServiceEntry describes: on
    its own it is done with the loader's warning (the share fails until one
    is loaded); beside typo.yaml the sidecar would keep its whole last good
    table (typo.yaml, held back, may be what describes svc3), so apply
    refuses it, saying so."""
    svc3 = "svc3.default.svc.cluster.local"
    f = source(tmp_path, "route.yaml", split(90, 10, other=svc3))
    (rules / "typo.yaml").write_text(BROKEN)
    before = snapshot(rules)
    step = l4("replace", f, rules)
    assert step.returncode == 1, step.stderr
    assert f"{f}:10: warning: VirtualService svc: {svc3} has no ServiceEntry" in step.stderr
    assert f"refused: with {rules / 'typo.yaml'} held back" in step.stderr, step.stderr
    assert "whole last good table" in step.stderr
    assert snapshot(rules) == before
    (rules / "typo.yaml").unlink()
    step = l4("replace", f, rules)
    assert step.returncode == 0, step.stderr
    assert f"{svc3} has no ServiceEntry" in step.stderr


def test_replace_names_a_file_it_cannot_read_where_an_object_is_missing(
    rules: Path, tmp_path: Path
) -> None:
    """route.yaml saved with a YAML syntax error: apply cannot tell which
    objects it holds, and says so where replace finds no file for FILE's."""
    (rules / "route.yaml").write_text(BROKEN)
    step = l4("replace", source(tmp_path, "rollback.yaml", split(50)), rules)
    assert step.returncode == 1, step.stderr
    assert "VirtualService default/svc is not in" in step.stderr
    assert f"{rules / 'route.yaml'} cannot be parsed (line 3" in step.stderr, step.stderr


def test_help_says_how_a_broken_file_of_dir_is_judged() -> None:
    step = subprocess.run(
        [sys.executable, "-m", "l4proxy", "replace", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    )
    assert "invalid already" in step.stdout and "held back" in step.stdout, step.stdout


def test_a_rollback_beside_a_broken_file_goes_live_in_the_sidecar(tmp_path: Path) -> None:
    """The brief's case end to end: a sidecar (two workers) serves svc 100 %
    to v1; someone saves typo.yaml broken, and the sidecar holds it back.
    ``replace --admin`` of the route (all to v2) is done, waits until both
    workers serve it, and every request gets v2. Before, exit 1."""
    rules = tmp_path / "rules"
    rules.mkdir()
    with backends() as (p1, p2):
        write(rules / "registry.yaml", gateway_service(p1, p2, labels=("v1", "v2")))
        write(rules / "route.yaml", route(100))
        with sidecar(rules) as sc:
            assert set(sc.versions()) == {"v1"}
            write(rules / "typo.yaml", BROKEN)
            typo = str(rules / "typo.yaml")
            sc.until(lambda: held(sc) == [typo], "held typo.yaml")
            f = source(tmp_path, "route.yaml", route(0))
            step = l4("replace", f, rules, "--admin", sc.admin)
            assert step.returncode == 0, step.stderr
            assert f"live: {sc.admin} serves rules generation" in step.stdout
            assert f"{rules / 'typo.yaml'}:3:1: warning: YAML syntax error" in step.stderr
            assert set(sc.versions()) == {"v2"}
            assert held(sc) == [typo]


def held(sc: Sidecar) -> list[str]:
    """The files /config_dump says the sidecar holds back."""
    return [h["file"] for h in json.loads(sc.get("/config_dump")[1])["held"]]

"""``l4proxy canary --match ... --iterations N``: A/B testing (Flagger's A/B
testing strategy): for N intervals the requests that match one of the
alternatives go to the canary, every other one to stable; the state
machine, the documents (one RouteRule per alternative beside the main one),
their state, display and JSON, and the command end to end."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace

import pytest
import yaml

from l4proxy.canary._analysis import (
    Conflict,
    Event,
    HeaderMatch,
    Policy,
    PolicyError,
    Rollout,
    Sample,
    advance,
    check,
    parse_match,
    resume,
    run_table,
)
from l4proxy.canary.command import (
    Display,
    competing,
    document,
    documents,
    documents_text,
    event_json,
    save_state,
    splice_documents,
)
from l4proxy.cli import main
from l4proxy.rules import load_rules
from l4proxy.rules.routing import Request
from tests import test_canary_kube as tk
from tests.conftest import serving
from tests.test_canary_core import ERRORS, GOOD, QUIET, USER_FILE, unstamped

INSIDER = HeaderMatch("x-canary", "exact", "insider")
COOKIE = HeaderMatch("cookie", "regex", "^(.*?;)?(canary=always)(;.*)?$")
P = Policy(
    steps=(5, 10, 25, 50, 100),
    interval=1,
    threshold=2,
    min_requests=10,
    match=(INSIDER, COOKIE),
    iterations=3,
)
REGISTRY = os.path.join(os.path.dirname(__file__), "data", "rules", "registry.yaml")
HOST = "bootcamp.default.svc.cluster.local"
OURS = "canary-bootcamp.yaml"


# -- the options ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("x-canary=insider", INSIDER),
        ("X-Canary=insider", INSIDER),  # header names are case-insensitive
        ("cookie~^(.*?;)?(canary=always)(;.*)?$", COOKIE),
        ("x-v=a=b~c", HeaderMatch("x-v", "exact", "a=b~c")),  # the name ends at the first
        ("x-v~a=b", HeaderMatch("x-v", "regex", "a=b")),
    ],
)
def test_a_match_option_is_a_header_and_an_exact_value_or_a_regex(
    text: str, want: HeaderMatch
) -> None:
    assert parse_match(text) == want
    assert str(want) == (text if text[0] != "X" else text.lower())


@pytest.mark.parametrize("text", ["x-canary", "=insider", "~^a$", ""])
def test_a_match_option_without_a_header_and_a_value_is_refused(text: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(f"--match {text}: expected HEADER=VALUE")):
        parse_match(text)


def test_a_policy_with_a_match_has_its_iterations_for_stages() -> None:
    assert P.stages == (0, 0, 0)
    with pytest.raises(PolicyError, match=r"--iterations: intervals from 1 to 1000 .*, got 0"):
        replace(P, iterations=0)
    with pytest.raises(PolicyError, match="--match and --mirror"):
        replace(P, mirror=1)
    with pytest.raises(PolicyError, match="--iterations needs --match"):
        replace(P, match=())


@contextlib.contextmanager
def _unread_sidecar() -> Iterator[tuple[str, list[str]]]:
    """A sidecar's admin endpoint that records each read: an option refused
    must be refused before any."""
    reads: list[str] = []

    def reply(target: str) -> bytes | None:
        reads.append(target)
        return None

    with serving(reply) as address:
        yield address, reads


def _run(tmp_path: pathlib.Path, *extra: str) -> int:
    shutil.copy(REGISTRY, tmp_path)
    argv = ["canary", "bootcamp", "--stable", "v1", "--canary", "v2", "--rules", str(tmp_path)]
    return main([*argv, *extra])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--match", "x-canary=insider", "--steps", "5,100"], "--match and --steps: "),
        (["--match", "x-canary=insider", "--step-weight", "10"], "--match and --step-weight: "),
        (
            ["--match", "x-canary=insider", "--step-weight", "10", "--max-weight", "50"],
            "--match and --step-weight: ",
        ),
        (["--match", "x-canary=insider", "--max-weight", "50"], "--match and --max-weight: "),
        (["--match", "x-canary=insider", "--mirror"], "--match and --mirror: "),
        (["--iterations", "3"], "--iterations needs --match HEADER=VALUE (or HEADER~REGEX)"),
        (["--match", "x-canary=a", "--iterations", "0"], "--iterations: intervals from 1 to 1000"),
        (
            ["--match", "x-canary=a", "--iterations", "1001"],
            "--iterations: intervals from 1 to 1000 (each is kept in the rollout's state), "
            "got 1001",
        ),
        (["--match", "x-canary"], "--match x-canary: expected HEADER=VALUE"),
        (
            ["--match", "x-canary=insider", "--match", "cookie~(canary=always"],
            "--match cookie~(canary=always: regex '(canary=always' in "
            "spec.match.request.headers.cookie is invalid: missing )",
        ),
        (
            ["--match", "x canary=insider"],
            "--match x canary=insider: header name 'x canary' is not an HTTP field name",
        ),
    ],
    ids=[
        "steps",
        "step-weight",
        "max-weight-too",
        "max-weight",
        "mirror",
        "iterations-alone",
        "iterations-0",
        "iterations-1001",
        "no-value",
        "bad-regex",
        "bad-header",
    ],
)
def test_match_options_that_do_not_make_an_ab_test_exit_2_before_anything_is_written(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    with _unread_sidecar() as (admin, reads):
        code = _run(tmp_path, "--metrics", admin, *extra)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert reads == [] and sorted(os.listdir(tmp_path)) == ["registry.yaml"]


def test_the_help_shows_ab_testing(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["canary", "--help"])
    out = capsys.readouterr().out
    assert "--match HEADER=VALUE|HEADER~REGEX" in out and "--iterations N" in out
    assert "--match 'cookie~^(.*?;)?(canary=always)(;.*)?$'" in out


# -- the state machine ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("samples", "steps", "end"),
    [
        # N passing intervals promote, and no weight moves before
        ([GOOD] * 3, [0, 1, 2, 2], "promoted"),
        # a fail stays at the interval it was; it is tried again
        ([GOOD, ERRORS, GOOD, GOOD], [0, 1, 1, 2, 2], "promoted"),
        # --threshold fails roll back
        ([ERRORS, GOOD, ERRORS], [0, 0, 1, 1], "rolled_back"),
        # too few matching requests: a halt, nothing counted
        ([QUIET, QUIET, GOOD], [0, 0, 0, 1], "progressing"),
    ],
    ids=["passes", "fail-again", "threshold", "halt"],
)
def test_ab_rollouts(samples: list[Sample], steps: list[int], end: str) -> None:
    events = run_table(P, samples)
    assert [e.rollout.step for e in events] == steps
    assert events[-1].rollout.phase == end
    weights = [e.rollout.weight for e in events]
    assert weights[:-1] == [0] * (len(events) - 1)
    assert weights[-1] == {"promoted": 100, "rolled_back": 0, "progressing": 0}[end]


def test_an_ab_rollout_is_never_mirrored() -> None:
    """Weight 0 while progressing, as a mirrored one: the match says which."""
    events = run_table(P, [GOOD, GOOD, GOOD])
    assert [e.rollout.ab_testing for e in events] == [True, True, True, False]
    assert not any(e.rollout.mirrored or e.mirrored for e in events)
    assert events[0].rollout.match == (INSIDER, COOKIE)
    rolled_back = run_table(P, [ERRORS, ERRORS])[-1].rollout
    assert (rolled_back.weight, rolled_back.ab_testing) == (0, False)


def _at(policy: Policy, passes: int) -> Rollout:
    """The A/B rollout of *policy* after *passes* passed intervals, as the
    state file gives it back."""
    r = resume(policy, "svc", "v1", "v2", None, 0).rollout
    for i in range(passes):
        r = advance(policy, r, check(policy, GOOD), i + 1).rollout
    return Rollout.from_json(json.loads(json.dumps(r.to_json())))


def test_the_state_holds_the_alternatives() -> None:
    saved = _at(P, 1)
    assert saved.match == (INSIDER, COOKIE) and saved.step == 1
    assert saved.to_json()["match"] == [
        {"header": "x-canary", "exact": "insider"},
        {"header": "cookie", "regex": "^(.*?;)?(canary=always)(;.*)?$"},
    ]


def test_a_state_file_from_before_ab_testing_reads_as_none() -> None:
    old = {
        "service": "svc",
        "stable": "v1",
        "canary": "v2",
        "phase": "progressing",
        "step": 1,
        "weight": 25,
        "failed_checks": 0,
        "steps": [5, 25, 50, 100],
    }
    assert Rollout.from_json(old).match == ()


@pytest.mark.parametrize(
    "match", [[{"header": "x"}], [{"header": "x", "exact": "a", "regex": "b"}], ["x=a"]]
)
def test_a_broken_match_in_the_state_is_bad_state(match: list[object]) -> None:
    data = _at(P, 0).to_json() | {"match": match}
    with pytest.raises(ValueError, match="bad state: match"):
        Rollout.from_json(data)


@pytest.mark.parametrize(
    ("policy", "step"),
    [
        (P, 2),
        # the same alternatives in another order: the same test
        (replace(P, match=(COOKIE, INSIDER)), 2),
        # more iterations: the passes are kept
        (replace(P, iterations=10), 2),
        # fewer than it passed: the last one (one more pass promotes)
        (replace(P, iterations=2), 1),
    ],
    ids=["same", "reordered", "more", "fewer"],
)
def test_resume_keeps_the_intervals_passed(policy: Policy, step: int) -> None:
    ev = resume(policy, "svc", "v1", "v2", _at(P, 2), 10)
    assert ev.kind == "resume"
    assert (ev.rollout.step, ev.rollout.weight, ev.rollout.steps) == (step, 0, policy.stages)
    assert ev.rollout.match == (INSIDER, COOKIE)  # as saved: the documents keep their names


def test_resume_with_other_alternatives_is_a_conflict() -> None:
    saved = _at(P, 2)
    with pytest.raises(Conflict, match="resume it with the same alternatives") as exc:
        resume(replace(P, match=(INSIDER,)), "svc", "v1", "v2", saved, 10)
    assert "--match 'x-canary=insider' --match 'cookie~^(.*?;)?(canary=always)(;.*)?$'" in str(
        exc.value
    )
    assert "is A/B testing (requests with x-canary=insider or cookie~" in str(exc.value)
    assert "2/3 intervals passed" in str(exc.value)
    with pytest.raises(Conflict, match=re.escape("promote|abort svc")):
        resume(Policy(steps=(5, 100)), "svc", "v1", "v2", saved, 10)


def test_a_weighted_rollout_resumed_with_a_match_is_a_conflict() -> None:
    weighted = Rollout("svc", "v1", "v2", step=1, weight=25, steps=(5, 25, 100))
    with pytest.raises(Conflict, match="is at 25 %, not A/B testing: resume it without --match"):
        resume(P, "svc", "v1", "v2", weighted, 10)


def test_another_canary_while_one_is_ab_tested_is_refused() -> None:
    with pytest.raises(Conflict, match=r"is A/B testing .*: finish it first"):
        resume(P, "svc", "v1", "v3", _at(P, 0), 1)


def test_an_ended_ab_test_restarts_with_its_new_alternatives() -> None:
    ended = run_table(P, [ERRORS, ERRORS])[-1].rollout
    ev = resume(replace(P, match=(INSIDER,)), "svc", "v1", "v2", ended, 10, restart=True)
    assert (ev.kind, ev.rollout.match, ev.rollout.step) == ("start", (INSIDER,), 0)


# -- the documents --------------------------------------------------------------------------------
AB = Rollout("bootcamp", "v1", "v2", steps=(0, 0, 0), match=(INSIDER, COOKIE))


def test_an_ab_test_owns_one_document_per_alternative() -> None:
    docs = [yaml.safe_load(text) for _, text in documents(AB)]
    assert [name for name, _ in documents(AB)] == [
        "canary-bootcamp",
        "canary-bootcamp-match-1",
        "canary-bootcamp-match-2",
    ]
    assert docs[0]["spec"]["route"] == [{"labels": {"version": "v1"}, "weight": 100}]
    assert "match" not in docs[0]["spec"] and docs[0]["spec"]["precedence"] == 0
    for d, (name, want) in zip(
        docs[1:],
        [("x-canary", {"exact": "insider"}), ("cookie", {"regex": COOKIE.value})],
        strict=True,
    ):
        assert d["spec"]["match"] == {"request": {"headers": {name: want}}}
        assert d["spec"]["precedence"] == 1
        assert d["spec"]["route"] == [{"labels": {"version": "v2"}, "weight": 100}]
    assert list(yaml.safe_load_all(documents_text(AB))) == docs


@pytest.mark.parametrize(
    "ended", [replace(AB, phase="promoted", weight=100), replace(AB, phase="rolled_back")]
)
def test_an_ended_ab_test_has_its_main_document_alone(ended: Rollout) -> None:
    assert documents_text(ended) == document(ended)


def _version_of(table_dir: pathlib.Path, headers: dict[str, str]) -> set[str]:
    """The versions a request with *headers* may go to, as the sidecar's
    route table chooses (weight > 0)."""
    table = load_rules([str(table_dir)], namespace="default", domain="cluster.local").table
    svc = table.service(HOST)
    assert svc is not None
    rc = table.choices(svc, 8080, Request(path="/", authority="bootcamp:8080", headers=headers))
    return {e.labels["version"] for ws in rc.subsets if ws.weight for e in ws.endpoints}


@pytest.mark.parametrize(
    ("headers", "version"),
    [
        ({"x-canary": "insider"}, "v2"),
        ({"X-Canary": "insider"}, "v2"),
        ({"cookie": "a=1;canary=always;b=2"}, "v2"),
        # Flagger's regex: no space after a ';', as a browser sends them
        ({"cookie": "a=1; canary=always"}, "v1"),
        ({"cookie": "canary=always"}, "v2"),
        ({}, "v1"),
        ({"x-canary": "insiders"}, "v1"),  # exact
        ({"cookie": "canary=never"}, "v1"),
    ],
)
def test_the_documents_load_and_route_the_matching_requests_to_the_canary(
    tmp_path: pathlib.Path, headers: dict[str, str], version: str
) -> None:
    shutil.copy(REGISTRY, tmp_path)
    (tmp_path / OURS).write_text(documents_text(AB))
    assert _version_of(tmp_path, headers) == {version}


def test_a_user_rule_with_a_match_above_ours_keeps_its_requests(tmp_path: pathlib.Path) -> None:
    """Testers pinned to v1 at precedence 2: above the match documents' 1."""
    shutil.copy(REGISTRY, tmp_path)
    (tmp_path / OURS).write_text(documents_text(AB))
    (tmp_path / "pinned.yaml").write_text(
        "apiVersion: config.istio.io/v1alpha2\nkind: RouteRule\nmetadata: {name: pinned}\n"
        "spec:\n  destination: {name: bootcamp}\n  precedence: 2\n"
        "  match: {request: {headers: {x-tester: {exact: 'yes'}}}}\n"
        "  route: [{labels: {version: v1}}]\n"
    )
    assert _version_of(tmp_path, {"x-canary": "insider", "x-tester": "yes"}) == {"v1"}
    assert _version_of(tmp_path, {"x-canary": "insider"}) == {"v2"}


def _splice(text: str, r: Rollout) -> str:
    from l4proxy.canary.command import canary_owns

    return splice_documents(text, documents(r), lambda n: canary_owns("canary-bootcamp", n))


def test_a_rules_file_keeps_the_users_documents_byte_for_byte() -> None:
    during = _splice(USER_FILE, AB)
    assert during == USER_FILE + "---\n" + documents_text(AB)
    assert _splice(during, replace(AB, step=1)) == during  # a pass: the same documents
    promoted = replace(AB, phase="promoted", weight=100)
    assert _splice(during, promoted) == USER_FILE + "---\n" + document(promoted)


def test_a_rules_file_loses_only_our_match_documents_wherever_they_are() -> None:
    """Ours first, the user's in between: each match document goes with one
    separator, and the user's documents keep their bytes."""
    main_doc, m1, m2 = (text for _, text in documents(AB))
    user_a, user_b = USER_FILE.split("---   # a separator with a comment\n")
    text = m1 + "---\n" + user_a + "--- # two\n" + main_doc + "---\n" + m2 + "---\n" + user_b
    rolled_back = replace(AB, phase="rolled_back")
    assert _splice(text, rolled_back) == user_a + "--- # two\n" + document(rolled_back) + (
        "---\n" + user_b
    )


def test_competing_ignores_our_documents_but_sees_the_users(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text(_splice(USER_FILE, AB))
    assert competing([str(f)], "bootcamp", str(f), "canary-bootcamp") == []
    # the same documents in another file are not ours: the main one competes
    (found,) = competing([str(f)], "bootcamp", str(tmp_path / "x"), "canary-bootcamp")
    assert found.endswith(": RouteRule canary-bootcamp routes every request of bootcamp")
    user = "---\nkind: RouteRule\nmetadata: {name: mine}\nspec: {destination: {name: bootcamp}}\n"
    f.write_text(_splice(USER_FILE, AB) + user)
    (found,) = competing([str(f)], "bootcamp", str(f), "canary-bootcamp")
    assert "RouteRule mine routes every request of bootcamp" in found


# -- the display and --json -----------------------------------------------------------------------
def _shown(events: list[Event], as_json: bool = False) -> list[str]:
    out = io.StringIO()
    display = Display(out, as_json, P)
    for ev in events:
        display.emit(ev)
    return (out.getvalue() if as_json else unstamped(out.getvalue())).splitlines()


def test_the_display_says_what_is_ab_tested() -> None:
    lines = _shown(run_table(P, [GOOD, QUIET, ERRORS, GOOD, GOOD]))
    assert lines[0].startswith(
        "svc: v1 -> v2, A/B: requests with x-canary=insider or "
        "cookie~^(.*?;)?(canary=always)(;.*)?$ to v2 for 3 intervals every 1 s;"
    )
    assert lines[1].startswith("  v2 A/B 1/3" + " " * 19 + "    100 req  success 100.0 %")
    assert lines[1].endswith("pass -> A/B 2/3")
    assert lines[2].startswith("  v2 A/B 2/3 ") and lines[2].endswith("(--min-requests)")
    assert lines[3].startswith("  v2 A/B 2/3 ") and lines[3].endswith("; stays A/B 2/3")
    assert lines[4].startswith("  v2 A/B 2/3 ") and lines[4].endswith("pass -> A/B 3/3")
    assert lines[5].startswith("  v2 A/B 3/3 ")
    assert lines[5].endswith("pass -> PROMOTED: v2 takes 100 % of svc")


def test_a_resume_while_ab_testing_says_so() -> None:
    (_, resumed) = _shown([resume(P, "svc", "v1", "v2", _at(P, 1), 10)])
    assert resumed == "  resumed at A/B 2/3 (step 2/3, 0 failed checks so far)"


def test_json_events_carry_the_match() -> None:
    events = run_table(P, [GOOD, GOOD, GOOD])
    docs = [json.loads(line) for line in _shown(events, as_json=True)]
    want = [m.to_json() for m in (INSIDER, COOKIE)]
    assert [d["event"] for d in docs] == ["start", "check", "check", "promoted"]
    assert all(d["match"] == want for d in docs)
    assert all("mirror" not in d for d in docs)
    assert "match" not in event_json(run_table(replace(P, match=(), iterations=0), [GOOD])[1])


# -- by hand, from another process ----------------------------------------------------------------
def _saved_in(tmp_path: pathlib.Path, r: Rollout) -> None:
    """A rollout as a killed command left it: its state and its documents."""
    shutil.copy(REGISTRY, tmp_path)
    r = replace(r, service="bootcamp")
    save_state(str(tmp_path / ".canary-bootcamp.state.json"), r)
    (tmp_path / OURS).write_text(documents_text(r))


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run(
        [sys.executable, "-m", "l4proxy", "canary", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_status_from_another_process_shows_the_alternatives(tmp_path: pathlib.Path) -> None:
    _saved_in(tmp_path, _at(P, 2))
    done = _cli("status", "bootcamp", "--rules", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert unstamped(done.stdout).startswith(
        "bootcamp: v1 -> v2 progressing A/B: requests with x-canary=insider or "
        "cookie~^(.*?;)?(canary=always)(;.*)?$ to v2, 2/3 intervals passed, 0 failed checks"
    )


@pytest.mark.parametrize(("action", "code", "version"), [("promote", 0, "v2"), ("abort", 1, "v1")])
def test_promote_and_abort_from_another_process_remove_the_match_documents(
    tmp_path: pathlib.Path, action: str, code: int, version: str
) -> None:
    _saved_in(tmp_path, _at(P, 1))
    assert _version_of(tmp_path, {"x-canary": "insider"}) == {"v2"}
    done = _cli(action, "bootcamp", "--rules", str(tmp_path))
    assert done.returncode == code, done.stderr
    (doc,) = yaml.safe_load_all((tmp_path / OURS).read_text())
    assert doc["metadata"]["name"] == "canary-bootcamp"
    assert _version_of(tmp_path, {"x-canary": "insider"}) == {version}
    assert _version_of(tmp_path, {}) == {version}


def test_promote_by_hand_in_a_rules_file_removes_only_ours(tmp_path: pathlib.Path) -> None:
    user = pathlib.Path(REGISTRY).read_text() + USER_FILE.split("\n", 5)[-1]
    rules = tmp_path / "rules.yaml"
    rules.write_text(_splice(user, replace(_at(P, 1), service="bootcamp")))
    save_state(
        str(tmp_path / ".canary-bootcamp.state.json"), replace(_at(P, 1), service="bootcamp")
    )
    assert main(["canary", "promote", "bootcamp", "--rules", str(rules)]) == 0
    promoted = Rollout.from_json(json.loads((tmp_path / ".canary-bootcamp.state.json").read_text()))
    assert rules.read_text() == user + "---\n" + document(promoted)


# -- the ConfigMap --------------------------------------------------------------------------------
api = tk.api  # the fake API server (fixtures, from test_canary_kube)
token = tk.token
no_backoff = tk.no_backoff


def test_the_configmap_key_holds_the_match_documents_while_ab_testing(
    api: tk.FakeAPI, token: str, tmp_path: pathlib.Path
) -> None:
    api.objects[tk.CM_PATH] = tk.configmap(tk.bootcamp_data())
    store = tk.store(api, token)
    ab = replace(AB, updated=1.0)
    assert store.commit(ab) is True
    data = api.objects[tk.CM_PATH]["data"]
    assert data[OURS] == documents_text(ab)
    assert store.load_state() == ab
    for key, text in data.items():  # as the kubelet mounts it
        (tmp_path / key).write_text(text)
    assert _version_of(tmp_path, {"cookie": "canary=always"}) == {"v2"}
    assert _version_of(tmp_path, {}) == {"v1"}
    promoted = replace(ab, phase="promoted", weight=100, updated=2.0)
    assert store.commit(promoted, expected=ab) is True
    assert api.objects[tk.CM_PATH]["data"][OURS] == document(promoted)


def test_an_ab_test_through_the_api_promotes(
    api: tk.FakeAPI, token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    api.objects[tk.CM_PATH] = tk.configmap(tk.bootcamp_data())
    api.prometheus = {"increase": "100", "* 100": "100", "histogram_quantile": "12"}
    argv = tk.canary(api, token, "bootcamp", "--stable", "v1", "--canary", "v2")
    argv += ["--match", "x-canary=insider", "--iterations", "2", "--interval", "0.01"]
    assert main([*argv, "--prometheus", api.url, "--json", "--progress-deadline", "1"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["start", "check", "promoted"]
    puts = [r.body for r in api.api() if r.method == "PUT"]
    keys = [len(list(yaml.safe_load_all(b["data"][OURS]))) for b in puts]
    assert keys == [2, 2, 1]  # the match document while testing; the state alone at a pass


# -- end to end: a sidecar that routes with the rules as written ----------------------------------
def _requests() -> list[dict[str, str]]:
    """One read's worth of requests: 100, of which 20 carry x-canary: insider
    and 10 the canary cookie (every 5th and every 10th, not both)."""
    out: list[dict[str, str]] = []
    for i in range(100):
        if i % 5 == 0:
            out.append({"x-canary": "insider"})
        elif i % 10 == 7:
            out.append({"cookie": "canary=always; session=1"})
        else:
            out.append({"cookie": "session=1"})
    return out


@contextlib.contextmanager
def _routing_sidecar(
    tmp_path: pathlib.Path, v2_code: str = "200"
) -> Iterator[tuple[str, dict[str, float]]]:
    """A sidecar serving the rules directory *tmp_path* through the real
    loader: between two reads it routes :func:`_requests` by the route table
    loaded from it (a route or an endpoint counts its share of a request), and v2
    answers *v2_code*; its generation moves when our file changes. Yields
    its address and what each version served."""
    seen = [""]
    served = {"v1": 0.0, "v2": 0.0}

    def reply(target: str) -> bytes | None:
        doc = tmp_path / OURS
        text = doc.read_text() if doc.exists() else ""
        if text != seen[-1]:
            seen.append(text)
        table = load_rules([str(tmp_path)], namespace="default", domain="cluster.local").table
        svc = table.service(HOST)
        assert svc is not None
        for headers in _requests():
            rc = table.choices(svc, 8080, Request(authority="bootcamp:8080", headers=headers))
            total = sum(ws.weight for ws in rc.subsets)
            for ws in rc.subsets:  # (no rule yet: the service's endpoints, v2 one of 3)
                for e in ws.endpoints:
                    served[e.labels["version"]] += ws.weight / total / len(ws.endpoints)
        n = served["v2"]
        lab = (
            'destination_service_name="bootcamp",destination_version="v2",'
            f'response_code="{v2_code}"'
        )
        return (
            "# TYPE istio_requests_total counter\n"
            f"istio_requests_total{{{lab}}} {n}\n"
            f'istio_request_duration_milliseconds_bucket{{{lab},le="10"}} {n}\n'
            f'istio_request_duration_milliseconds_bucket{{{lab},le="+Inf"}} {n}\n'
            f"l4proxy_rules_generation {len(seen)}\n"
        ).encode()

    with serving(reply) as address:
        yield address, served


def _ab_on_sidecar(tmp_path: pathlib.Path, admin: str, *extra: str) -> int:
    # a halt that should not be (no matching request reached v2) rolls back
    # in a second, not in ten minutes
    timing = ["--interval", "0.05", "--wait-live", "1", "--progress-deadline", "1", "--json"]
    match = ["--match", "X-Canary=insider", "--match", "cookie~^(.*?;)?(canary=always)(;.*)?$"]
    return _run(tmp_path, "--metrics", admin, *match, *timing, *extra)


def test_an_ab_test_on_a_sidecar_promotes_after_its_iterations(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """30 of each read's 100 requests match (20 by the header, 10 by the
    cookie): v2 serves those alone while the test runs, judged in each of
    its intervals, then all of them once promoted."""
    with _routing_sidecar(tmp_path) as (admin, _):
        code = _ab_on_sidecar(tmp_path, admin, "--iterations", "3", "--min-requests", "25")
    out, err = capsys.readouterr()
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0, (out, err)
    checks = [(e["event"], e["step"], e["check"]["requests"]) for e in events if "check" in e]
    assert checks == [("check", 1, 30), ("check", 2, 30), ("promoted", 2, 30)]
    (doc,) = yaml.safe_load_all((tmp_path / OURS).read_text())
    assert doc["spec"]["route"] == [{"labels": {"version": "v2"}, "weight": 100}]


def test_an_ab_test_on_a_sidecar_rolls_back_a_failing_canary(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with _routing_sidecar(tmp_path, v2_code="503") as (admin, _):
        code = _ab_on_sidecar(tmp_path, admin, "--threshold", "2")
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1, events
    assert [e["event"] for e in events] == ["start", "check", "rolled_back"]
    assert events[-1]["reason"].startswith("2 failed checks (--threshold 2): success rate 0.0 %")
    (doc,) = yaml.safe_load_all((tmp_path / OURS).read_text())
    assert doc["spec"]["route"] == [{"labels": {"version": "v1"}, "weight": 100}]


def test_a_killed_ab_test_resumes_at_its_interval_and_refuses_other_alternatives(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = replace(_at(P, 2), service="bootcamp", stable="v1", canary="v2")
    _saved_in(tmp_path, saved)
    with _routing_sidecar(tmp_path) as (admin, _):
        code = _ab_on_sidecar(tmp_path, admin, "--iterations", "3", "--match", "x-other=1")
        assert code == 2
        assert "resume it with the same alternatives" in capsys.readouterr().err
        assert (
            Rollout.from_json(json.loads((tmp_path / ".canary-bootcamp.state.json").read_text()))
            == saved
        )
        code = _ab_on_sidecar(tmp_path, admin, "--iterations", "3")
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0, events
    assert [(e["event"], e["step"]) for e in events] == [("resume", 2), ("promoted", 2)]


# -- ended by hand, or interrupted, while A/B testing -------------------------------------------
def test_an_ab_test_left_as_it_is_says_the_matched_requests_still_go_to_the_canary(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_canary_core import ended_in_first_interval

    options = ("--match", "x-canary=insider", "--on-abort", "leave")
    code, _, err = ended_in_first_interval(tmp_path, capsys, "sigterm", *options)
    assert code == 3
    assert "interrupted; the requests with x-canary=insider still go to v2" in err


def test_the_prompt_on_a_terminal_says_the_matched_requests_still_go_to_the_canary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from l4proxy.canary.command import _ask

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal("l\n"))
    err = io.StringIO()
    old = signal.getsignal(signal.SIGINT)
    try:
        assert _ask(err, _at(P, 0)) == "leave"
    finally:
        signal.signal(signal.SIGINT, old)
    assert "leave it as it is (l: the requests with x-canary=insider or cookie~" in err.getvalue()


def test_json_start_and_resume_events_carry_the_iterations() -> None:
    start = event_json(resume(P, "svc", "v1", "v2", None, 0))
    resumed = event_json(resume(P, "svc", "v1", "v2", _at(P, 1), 10))
    want = [INSIDER.to_json(), COOKIE.to_json()]
    assert (start["iterations"], start["match"]) == (3, want)
    assert (resumed["iterations"], resumed["match"]) == (3, want)
    assert "mirror" not in start

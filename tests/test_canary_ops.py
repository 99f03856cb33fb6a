"""``l4proxy canary`` as an operator meets it: what it says when the sidecars
do not serve what it wrote, and a rollout changed under it.

The sidecar here is an admin endpoint on 127.0.0.1 (:class:`Sidecar`) over
the rules directory the command writes, loading it as ``l4proxy run`` loads
a rules directory: a real :class:`~l4proxy.rules.watch.RuleWatcher`, at each
read of its ``/stats`` where the files changed (the sidecars poll their
rules every second), file by file: a file whose text does not load is held
back (served at its last good version, or left out) while the others' changes
go live; where even that does not load, the whole last good table keeps
serving. Its ``/stats`` and ``/config_dump`` say so as the sidecar's do
(digest, generation, ``l4proxy_rules_file_held{file}``; ``last_error``,
``loaded_at``, ``held``). It watches its own copy of the directory, as a pod
mounts a ConfigMap (another path, the same names), synced at each read; a
file it is told to refuse (:meth:`Sidecar.refuse`) reaches that copy broken
at its next change, as a sidecar that refuses the file as written then sees
it (one of another version, say), while the command's files stay as it
wrote them. Its traffic follows the weights
of the canary's document as it last loaded it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from l4proxy.rules.watch import FILE_HELD, RuleWatcher, fingerprint
from tests.conftest import readable, serving
from tests.test_canary_core import unstamped

REGISTRY = os.path.join(os.path.dirname(__file__), "data", "rules", "registry.yaml")
TYPO = "kind: ConfigMap\ndata: [\n"  # the reviewer's: a YAML syntax error at 3:1
DOCUMENT = "canary-bootcamp.yaml"


class Sidecar:
    """One sidecar over *rules* (see the module doc). Each read of
    ``/stats`` syncs its copy of the directory (*mount*) and reloads it if
    its files changed, then counts *per_read* more requests, split by the
    served weights (v1 takes them all where no canary document is served),
    *fail_v2* of v2's answered 500; *on_read*, if set, is called with the
    read's number (from 1) first."""

    def __init__(
        self, rules: pathlib.Path, mount: pathlib.Path, fail_v2: float = 0.0, per_read: int = 100
    ) -> None:
        self.rules = rules
        self.mount = mount
        self.fail_v2 = fail_v2
        self.per_read = per_read
        self.watcher = RuleWatcher([str(mount)], interval=3600, settle=0)
        self.tried: object = None  # the mount's fingerprint at the last load
        self.ever_held: set[str] = set()
        self.reads = 0
        self.counts: Counter[tuple[str, str]] = Counter()
        self.on_read: Callable[[int], None] | None = None
        self.frozen = False  # True: it loads nothing more (its watch stuck)
        # file name -> the one text of it it still takes (see refuse)
        self.refusing: dict[str, str] = {}

    @property
    def generation(self) -> int:
        return self.watcher.state.generation

    def refuse(self, name: str) -> None:
        """From now on the file *name* reaches the mount broken (:data:`TYPO`)
        once its text changes: this sidecar refuses what is written there
        next, and holds the file at its last good version."""
        path = self.rules / name
        self.refusing[name] = path.read_text() if path.exists() else ""

    def sync(self) -> None:
        """The mount as the rules directory is now (a file refused: broken),
        each changed file renamed into place as the kubelet swaps a
        ConfigMap's."""
        want = {}
        for p in sorted(self.rules.iterdir()):
            if p.suffix in (".yaml", ".yml") and not p.name.startswith("."):
                text = p.read_text()
                refused = self.refusing.get(p.name, text) != text
                want[p.name] = TYPO if refused else text
        for p in self.mount.iterdir():
            if p.name not in want:
                p.unlink()
        for name, text in want.items():
            dest = self.mount / name
            if not dest.exists() or dest.read_text() != text:
                tmp = self.mount / f".{name}.tmp"
                tmp.write_text(text)
                tmp.rename(dest)

    def reload(self) -> None:
        if self.frozen and self.tried is not None:
            return
        self.sync()
        fp = fingerprint([str(self.mount)])
        if fp == self.tried:
            return  # (a refused load waits for the next change, as the watcher does)
        self.tried = fp
        self.watcher.load_now()
        self.ever_held |= {h.path for h in self.watcher.state.held}

    def weights(self) -> dict[str, int]:
        served = self.watcher.last_good.get().get(str(self.mount / DOCUMENT))
        if served is None:
            return {"v1": 100}
        spec = yaml.safe_load(served[1])["spec"]
        return {r["labels"]["version"]: r["weight"] for r in spec["route"]}

    def stats(self) -> bytes:
        self.reads += 1
        if self.on_read is not None:
            self.on_read(self.reads)
        self.reload()
        w = self.weights()
        v2 = self.per_read * w.get("v2", 0) // 100
        failed = round(v2 * self.fail_v2)
        self.counts["v1", "200"] += self.per_read - v2
        self.counts["v2", "200"] += v2 - failed
        self.counts["v2", "500"] += failed
        lines = ["# TYPE istio_requests_total counter"]
        for (version, code), n in sorted(self.counts.items()):
            lab = (
                f'reporter="source",destination_service_name="bootcamp",'
                f'destination_version="{version}",response_code="{code}"'
            )
            lines.append(f"istio_requests_total{{{lab}}} {n}")
            lines.append(f'istio_request_duration_milliseconds_bucket{{{lab},le="10"}} {n}')
            lines.append(f'istio_request_duration_milliseconds_bucket{{{lab},le="+Inf"}} {n}')
        st = self.watcher.state
        lines += [f"l4proxy_rules_generation {st.generation}", f"l4proxy_rules_digest {st.digest}"]
        lines += [f"# TYPE {FILE_HELD} gauge"] + [
            f'{FILE_HELD}{{file="{f}"}} {self.watcher.counters.get(FILE_HELD, file=f):g}'
            for f in sorted(self.ever_held)
        ]
        return ("\n".join(lines) + "\n").encode()

    def config_dump(self) -> bytes:
        dump = self.watcher.state.to_json()
        del dump["table"]
        return json.dumps(dump).encode()

    def reply(self, target: str) -> bytes | None:
        if target.startswith("/stats"):
            return self.stats()
        if target == "/config_dump":
            return self.config_dump()
        return None


@contextlib.contextmanager
def sidecar(rules: pathlib.Path, **kwargs: Any) -> Iterator[tuple[Sidecar, str]]:
    """A :class:`Sidecar` over *rules* (the registry copied there) and its
    admin address, its rules loaded once."""
    shutil.copy(REGISTRY, rules)
    with tempfile.TemporaryDirectory(prefix="l4proxy-mount-") as mount:
        s = Sidecar(rules, pathlib.Path(mount), **kwargs)
        s.reload()
        with serving(s.reply) as address:
            yield s, address


def canary(rules: pathlib.Path, admin: str, *extra: str) -> int:
    from l4proxy.cli import main

    argv = ["canary", "bootcamp", "--stable", "v1", "--canary", "v2", "--rules", str(rules)]
    return main([*argv, "--metrics", admin, "--interval", "0.05", "--wait-live", "0.5", *extra])


def by_hand(action: str, rules: pathlib.Path, *extra: str) -> int:
    from l4proxy.cli import main

    return main(["canary", action, "bootcamp", "--rules", str(rules), *extra])


def routes(rules: pathlib.Path) -> dict[str, int]:
    doc = yaml.safe_load((rules / "canary-bootcamp.yaml").read_text())
    return {r["labels"]["version"]: r["weight"] for r in doc["spec"]["route"]}


def commit(
    rules: pathlib.Path, weight: int, steps: tuple[int, ...] = (50, 100), **fields: Any
) -> None:
    """A rollout of bootcamp from v1 to v2 at *weight* written as the command writes it."""
    from l4proxy.canary._analysis import Rollout
    from l4proxy.canary.command import FileStore, Paths, RulesWriter

    paths = Paths.of(str(rules), "bootcamp")
    store = FileStore(paths, RulesWriter(paths, "bootcamp", "default", "cluster.local"))
    store.commit(Rollout("bootcamp", "v1", "v2", weight=weight, steps=steps, **fields))


# -- a rollback (or abort) the sidecars do not serve --------------------------------
def more(rules: pathlib.Path) -> None:
    """A change of another file than the canary's: a ServiceEntry of its own."""
    (rules / "more.yaml").write_text(
        "apiVersion: networking.istio.io/v1alpha3\nkind: ServiceEntry\n"
        "metadata: {name: other}\nspec:\n  hosts: [other.example.com]\n"
        "  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: STATIC\n"
        "  endpoints: [{address: 198.18.0.99}]\n"
    )


def test_a_rollback_the_sidecars_hold_back_beside_another_change_is_not_served(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sidecar refuses the canary's own file as the rollback writes it
    (whatever the reason: a loader of another version, say), and holds it
    at its last good version, 30 % to v2, while another file's change goes
    live beside it. That change moved the rules digest the command waits
    on, and it printed "ROLLED BACK", exit 1, with v2 still at 30 %. The
    file held back is read from the sidecar's /stats
    (l4proxy_rules_file_held{file}, by name: its path is the sidecar's
    copy's): ROLLBACK NOT SERVED, exit 4, with the file's error."""

    def on_read(n: int) -> None:
        # reads: 1 the start, 2 live at 30 %, 3 the window, 4 the first
        # check, which rolls back; 5 the first after the rollback's write
        if n == 4:
            s.refuse(DOCUMENT)
        elif n == 5:
            more(tmp_path)

    with sidecar(tmp_path, fail_v2=0.5) as (s, admin):
        s.on_read = on_read
        code = canary(tmp_path, admin, "--steps", "30,100", "--threshold", "1")
    out, err = capsys.readouterr()
    out = unstamped(out)
    assert code == 4, (out, err)
    mount = s.mount / DOCUMENT
    last = out.splitlines()[-1]
    assert (
        "fail -> ROLLBACK NOT SERVED: 100 % to v1 is written, but the sidecars hold "
        f"canary-bootcamp.yaml back, as last loaded: {mount}:3:1: YAML syntax error" in last
    ), last
    err = unstamped(err)  # (its lines say when, as stdout's do)
    assert "\nl4proxy canary: ROLLBACK NOT SERVED: " in f"\n{err}" and f"holds {mount} back " in err
    assert routes(tmp_path) == {"v1": 100}  # written
    assert s.weights() == {"v1": 70, "v2": 30}  # and not served
    assert str(s.mount / "more.yaml") in s.watcher.state.sources  # beside the other change


def test_a_rollback_not_served_is_said_in_json(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def on_read(n: int) -> None:
        if n == 4:
            s.refuse(DOCUMENT)
        elif n == 5:
            more(tmp_path)

    with sidecar(tmp_path, fail_v2=0.5) as (s, admin):
        s.on_read = on_read
        code = canary(tmp_path, admin, "--steps", "30,100", "--threshold", "1", "--json")
    out = capsys.readouterr().out
    last = json.loads(out.splitlines()[-1])
    assert code == 4
    assert (last["event"], last["served"]) == ("rolled_back", False)
    assert last["not_served"].startswith("the sidecars hold canary-bootcamp.yaml back, ")


def test_a_rollback_beside_a_broken_file_the_sidecars_hold_back_is_served_with_a_warning(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reviewer's run: the canary fails its checks, and an unrelated
    broken file appears meanwhile. The sidecar holds that file back and
    serves the rollback beside it (it loads file by file): rolled back,
    exit 1, and a warning, once, names the file held and its error (it
    keeps its rules from loading as written)."""
    with sidecar(tmp_path, fail_v2=0.5) as (s, admin):
        # reads: 1 the start, 2 live at 30 %, 3 the window, 4 the first
        # check; the broken file comes with the second check's read
        s.on_read = lambda n: (tmp_path / "typo.yaml").write_text(TYPO) if n == 5 else None
        code = canary(tmp_path, admin, "--steps", "30,50,100", "--threshold", "2")
    out, err = capsys.readouterr()
    out = unstamped(out)
    assert code == 1, (out, err)
    assert "fail -> ROLLED BACK: 100 % to v1; " in out.splitlines()[-1]
    typo = s.mount / "typo.yaml"
    warning = f"l4proxy canary: warning: http://{admin}/stats holds {typo} back (its text "
    assert unstamped(err).count(warning) == 1, err
    assert f"as it is refused: {typo}:3:1: YAML syntax error" in err
    assert "the canary's document is served beside it" in err
    assert s.weights() == {"v1": 100}


def test_an_abort_the_sidecars_refuse_says_so_and_again(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``abort --metrics`` beside a copy of the canary's document saved in
    another file (a.yaml, loaded first): the sidecar refuses the directory
    as a whole (the document twice, even at its last good version), and
    stays at the canary's 50 %. It said "rolled_back" (exit 1) with a
    warning; now NOT SERVED (exit 4) with the sidecar's last error. Said
    again, the document unchanged (nothing to wait for): the sidecar still
    refuses every change since, so NOT SERVED again; once the copy is
    removed and the sidecar loads the rules, the abort is rolled back
    (exit 1)."""
    with sidecar(tmp_path) as (s, admin):
        commit(tmp_path, 50)
        s.reload()
        assert s.weights() == {"v1": 50, "v2": 50}
        shutil.copy(tmp_path / DOCUMENT, tmp_path / "a.yaml")
        assert by_hand("abort", tmp_path, "--metrics", admin, "--wait-live", "0.3") == 4
        out, err = capsys.readouterr()
        assert " rolled back at 0 % " in out  # the state, as status says it
        assert "l4proxy canary: ROLLBACK NOT SERVED: the sidecars still serve rules " in err
        assert f"{s.mount / DOCUMENT}:6: RouteRule canary-bootcamp: duplicate name" in err
        assert by_hand("abort", tmp_path, "--metrics", admin, "--wait-live", "0.3") == 4
        assert "ROLLBACK NOT SERVED: " in capsys.readouterr().err
        (tmp_path / "a.yaml").unlink()
        s.reload()
        assert by_hand("abort", tmp_path, "--metrics", admin, "--wait-live", "0.3") == 1
        assert "NOT SERVED" not in capsys.readouterr().err
    assert s.weights() == {"v1": 100}


def test_an_abort_said_again_is_not_served_while_the_sidecars_hold_the_document_back(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``abort --metrics`` said again asked whether the sidecars refuse
    every change since the document was written (an error, and rules
    loaded before it). A sidecar that holds the document back loads the
    other files' changes all the same: after one, the abort said again was
    "rolled_back", exit 1, with v2 still at 50 %. It is NOT SERVED while
    the sidecar holds the document back, and rolled back once it loads it."""
    with sidecar(tmp_path) as (s, admin):
        commit(tmp_path, 50)
        s.reload()
        s.refuse(DOCUMENT)
        assert by_hand("abort", tmp_path, "--metrics", admin, "--wait-live", "0.3") == 4
        capsys.readouterr()
        more(tmp_path)
        s.reload()  # another file's change, loaded after the abort was written
        assert str(s.mount / "more.yaml") in s.watcher.state.sources
        assert by_hand("abort", tmp_path, "--metrics", admin) == 4
        err = capsys.readouterr().err
        assert "ROLLBACK NOT SERVED: the sidecars hold canary-bootcamp.yaml back, as last " in err
        assert s.weights() == {"v1": 50, "v2": 50}
        s.refusing.clear()  # it takes the document as written again
        s.reload()
        assert by_hand("abort", tmp_path, "--metrics", admin) == 1
        assert "NOT SERVED" not in capsys.readouterr().err
    assert s.weights() == {"v1": 100}


def test_an_abort_without_metrics_says_it_is_not_checked_and_names_a_broken_file(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``abort`` without --metrics said "rolled_back" and nothing else,
    beside a file that keeps the sidecars from loading anything. Nothing
    tells here what the sidecars serve (one that sets a broken file aside
    serves the abort), so it exits as written (1), and warns: not checked
    live, and the rules as written do not load, naming the file."""
    shutil.copy(REGISTRY, tmp_path)
    commit(tmp_path, 50)
    (tmp_path / "typo.yaml").write_text(TYPO)
    assert by_hand("abort", tmp_path) == 1
    err = capsys.readouterr().err
    assert "warning: the abort is written, not checked live (no --metrics or --prometheus" in err
    assert "the rules as written do not load (" in err and "typo.yaml:3:1" in err
    (tmp_path / "typo.yaml").unlink()
    assert by_hand("abort", tmp_path) == 1
    err = capsys.readouterr().err
    assert "not checked live" in err and "do not load" not in err


# -- a step refused mid-rollout ------------------------------------------------------
COMPETING = os.path.join(
    os.path.dirname(__file__),
    "..",
    "deploy",
    "examples",
    "bootcamp",
    "bootcamp-route-rule-all-v1.yaml",
)


def test_a_competing_rule_mid_rollout_is_a_failed_check_then_a_rollback(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rule without a match copied in mid-rollout: the next weight was
    refused and the command exited 2, the canary left at 30 % with
    nothing judging it (the README promises never to). Each refused step
    is a failed check now (the line says which stage was not written and
    why), and --threshold of them roll back."""
    with sidecar(tmp_path) as (s, admin):
        s.on_read = lambda n: shutil.copy(COMPETING, tmp_path / "mine.yaml") if n == 4 else None
        code = canary(tmp_path, admin, "--steps", "30,50,100", "--threshold", "2")
    out, err = capsys.readouterr()
    assert code == 1, (out, err)
    lines = unstamped(out).splitlines()
    assert lines[-2].endswith(
        f"fail (1/2): 50 % not written: {tmp_path}/mine.yaml:2: RouteRule bootcamp-default "
        "routes every request of bootcamp; stays at 30 %"
    ), lines[-2]
    assert "success 100.0 % >= 99 ok" in lines[-2]  # the interval itself passed
    assert (
        "fail -> ROLLED BACK: 100 % to v1; 2 failed checks (--threshold 2): 50 % not " in lines[-1]
    )
    assert routes(tmp_path) == {"v1": 100} and s.weights() == {"v1": 100}


def test_a_broken_file_fixed_in_time_costs_one_failed_check(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broken file beside ours when the next weight is written: exit 2
    with the canary at its weight. Now a failed check; fixed before the
    next interval's write, the rollout goes on to its promotion."""

    def on_read(n: int) -> None:
        if n == 4:  # the first check's read: the write of 50 % follows it
            (tmp_path / "typo.yaml").write_text(TYPO)
        elif n == 5:  # the second check's
            (tmp_path / "typo.yaml").unlink()

    with sidecar(tmp_path) as (s, admin):
        s.on_read = on_read
        code = canary(tmp_path, admin, "--steps", "30,50,100", "--threshold", "3")
    out, err = capsys.readouterr()
    assert code == 0, (out, err)
    assert (
        "fail (1/3): 50 % not written: refused: the rules would be invalid at weight 50: "
        f"{tmp_path}/typo.yaml:3:1: " in out
    ), out
    assert "; stays at 30 %" in out and "PROMOTED" in out.splitlines()[-1]
    assert s.weights() == {"v2": 100}


def test_a_resume_refused_at_the_start_says_the_rollout_stays_as_it_was(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before the analysis runs (exit 2, nothing written), a run
    that would resume a rollout says it is left at its weight, unjudged."""
    with sidecar(tmp_path) as (_, admin):
        commit(tmp_path, 50)
        shutil.copy(COMPETING, tmp_path / "mine.yaml")
        assert canary(tmp_path, admin, "--steps", "50,100") == 2
    err = capsys.readouterr().err
    assert "RouteRule bootcamp-default routes every request of bootcamp" in err
    assert "nothing written: the rollout of bootcamp stays as it was (v2 keeps 50 %), and " in err
    assert "nothing judges v2 until this runs" in err


def test_a_service_no_serviceentry_describes_is_refused_before_anything_is_written(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SERVICE misspelt (bootcmp): its RouteRule validated (a warning, no
    ServiceEntry for the host) and was written at 5 %, and the rollout
    halted, no request ever reaching it, until --progress-deadline rolled
    it back (exit 1). Refused first (exit 2), nothing written, naming the
    services the rules have."""
    from l4proxy.cli import main

    with sidecar(tmp_path) as (_, admin):
        argv = ["canary", "bootcmp", "--stable", "v1", "--canary", "v2", "--rules", str(tmp_path)]
        argv += ["--metrics", admin, "--interval", "0.05", "--wait-live", "0.5"]
        assert main([*argv, "--progress-deadline", "0.1"]) == 2
    err = capsys.readouterr().err
    assert (
        "l4proxy canary: bootcmp: no ServiceEntry for bootcmp.default.svc.cluster.local in the "
        "rules, so no request can go to it (the services: bootcamp.default.svc.cluster.local); "
        "check the name, or add its ServiceEntry"
    ) in err, err
    assert not [p.name for p in tmp_path.iterdir() if "canary-" in p.name]


# -- --restart of a promoted rollout -------------------------------------------------
def test_restart_of_a_promoted_rollout_is_refused(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--restart`` after v1 -> v2 was promoted started it again at its
    first step: 90 % back to v1 at once, unjudged, which abort refuses to
    do. Refused (exit 2, nothing written), saying what to run instead; a
    rolled-back rollout still restarts."""
    with sidecar(tmp_path) as (s, admin):
        assert canary(tmp_path, admin, "--steps", "10,100") == 0
        files = {p.name: p.read_text() for p in tmp_path.iterdir()}
        capsys.readouterr()
        assert canary(tmp_path, admin, "--steps", "10,100", "--restart") == 2
        err = capsys.readouterr().err
        assert "was promoted (v2 takes 100 %); --restart would start it again at its first " in err
        assert "sending 90 % of the requests back to v1 at once, unjudged" in err
        assert "l4proxy canary bootcamp --stable v2 --canary v1 ..." in err
        assert {p.name: p.read_text() for p in tmp_path.iterdir()} == files
        assert s.weights() == {"v2": 100}
        commit(tmp_path, 0, (10, 100), phase="rolled_back")  # rolled back: it starts again
        assert canary(tmp_path, admin, "--steps", "10,100", "--restart") == 0


# -- the canary's document edited under it ------------------------------------------
def _edit_to_all_v2(rules: pathlib.Path) -> None:
    doc = rules / "canary-bootcamp.yaml"
    doc.write_text(
        doc.read_text().replace("weight: 70", "weight: 0").replace("weight: 30", "weight: 100")
    )


def test_a_hand_edit_of_the_canarys_document_mid_interval_is_not_judged_a_pass(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reviewer set v2 to 100 in canary-bootcamp.yaml during the 30 %
    step: that step was judged and printed "v2 30 %", a pass, on traffic
    that was mostly v2's. The document is compared with what the command
    wrote before each verdict: changed, the interval is a failed check (as
    a competing change is), ours is written again, and the rollout goes
    on. Each line shows the canary's share of the requests the sidecars
    counted, which showed the edit (100 %) where the weight said 30."""
    with sidecar(tmp_path) as (s, admin):
        # read 3: the first window starts; the edit lands just after
        s.on_read = lambda n: _edit_to_all_v2(tmp_path) if n == 3 else None
        code = canary(tmp_path, admin, "--steps", "30,50,100", "--threshold", "2")
    out, err = capsys.readouterr()
    assert code == 0, (out, err)
    lines = unstamped(out).splitlines()
    edited = next(line for line in lines if "changed under the canary" in line)
    assert edited.startswith("  v2  30 % "), edited
    assert "   100 req (100 %)  " in edited  # what the routing did
    assert edited.endswith(
        f"fail (1/2): {tmp_path}/canary-bootcamp.yaml was changed under the canary (it routed "
        "at weight 30); not judged, and written again; stays at 30 %"
    ), edited
    after = lines[lines.index(edited) + 1]
    assert after.startswith("  v2  30 % ") and "    30 req (30 %)  " in after, after
    assert after.endswith("pass -> 50 %")
    assert "PROMOTED" in lines[-1] and s.weights() == {"v2": 100}


# -- Prometheus down at the start ------------------------------------------------------
def test_a_prometheus_that_is_down_is_refused_before_anything_is_written(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--prometheus`` on a port nothing listens on: the first weight (5 %)
    was written, then the command warned and waited, with nothing to judge
    with. Refused first (exit 2), nothing written, as --metrics to a dead
    sidecar is. (The port is bound here and not listened on: refused, and
    nobody else's.)"""
    import socket

    from l4proxy.cli import main

    shutil.copy(REGISTRY, tmp_path)
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{dead.getsockname()[1]}"
        argv = ["canary", "bootcamp", "--stable", "v1", "--canary", "v2", "--rules", str(tmp_path)]
        assert main([*argv, "--prometheus", url, "--interval", "0.05"]) == 2
    err = capsys.readouterr().err
    assert f"--prometheus {url}: cannot be read, so no interval could be judged; " in err
    assert "nothing written (" in err and "Connection refused" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.yaml"]


# -- what the lines say -----------------------------------------------------------------
def _display(as_json: bool = False) -> tuple[Any, Any]:
    import io

    from l4proxy.canary._analysis import Policy
    from l4proxy.canary.command import Display

    out = io.StringIO()
    return Display(out, as_json, Policy(steps=(20, 100), threshold=3)), out


def test_a_check_whose_metrics_were_not_read_says_unknown_not_0_and_ok() -> None:
    """An unreadable interval printed "0 req  success - % >= 99 NO  p99 - ms
    <= 500 ok": nothing was counted, and the p99 was not ok, it was not
    known. --json said "requests": 0.0 for it, and 16.0 for 16 requests."""
    from l4proxy.canary._analysis import Check, Event, Rollout

    r = Rollout("bootcamp", "v1", "v2", weight=20, failed_checks=1, steps=(20, 100))
    unread = Check("fail", None, None, None, ("metrics unreadable: x",))
    display, _ = _display()
    line = display.line(Event("check", r, unread, 20))
    assert line.startswith("  v2  20 % ████ ")
    assert "      ? req  success and p99 unknown  fail (1/3): metrics unreadable: x" in line
    assert "0 req" not in line and " ok" not in line
    display, out = _display(as_json=True)
    display.emit(Event("check", r, unread, 20))
    display.emit(Event("check", r, Check("pass", 16.0, 100.0, 0.99), 20))
    unknown, counted = (json.loads(x)["check"] for x in out.getvalue().splitlines())
    assert unknown["requests"] is None
    assert counted["requests"] == 16 and isinstance(counted["requests"], int)


def test_a_halt_says_halt_once() -> None:
    from l4proxy.canary._analysis import Event, Policy, Rollout, Sample, check

    r = Rollout("bootcamp", "v1", "v2", weight=20, steps=(20, 100))
    display, _ = _display()
    halt = check(Policy(steps=(20, 100)), Sample(9, 0, 1.0))
    line = display.line(Event("check", r, halt, 20))
    assert line.endswith("(too few to judge)  halt: 9 canary requests < 10 (--min-requests)")


@pytest.mark.parametrize(
    ("n", "noun", "plural", "said"),
    [
        (0, "failed check", "", "0 failed checks"),
        (1, "failed check", "", "1 failed check"),
        (2, "check", "", "2 checks"),
        (1.0, "request", "", "1 request"),  # (a count Prometheus gave: a float)
        (2.5, "request", "", "2.5 requests"),
        (1, "copy", "copies", "1 copy"),
        (3, "copy", "copies", "3 copies"),
    ],
)
def test_a_count_is_said_in_the_singular_for_one(
    n: float, noun: str, plural: str, said: str
) -> None:
    from l4proxy.canary._analysis import count

    assert count(n, noun, plural) == said


ONE_PLURAL = re.compile(r"(?<![\d.])1 (?:[a-z-]+ )?[a-z]+s\b")


def test_one_failed_check_is_said_so_in_every_line(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reviewer's "1 failed checks": a rollout of --threshold 1 and
    --min-requests 1 said "1 failed checks roll back", ">= 1 requests" and
    "ROLLED BACK ...; 1 failed checks (--threshold 1)", and status "1 failed
    checks, 1 checks". Every count of one is singular now (and its verb)."""
    with sidecar(tmp_path, fail_v2=1.0) as (_, admin):
        code = canary(tmp_path, admin, "--steps", "50,100", "--threshold", "1")
        assert by_hand("status", tmp_path) == 1
        again = ["--restart", "--min-requests", "1", "--threshold", "2"]
        code2 = canary(tmp_path, admin, "--steps", "50,100", *again)
    out = unstamped(capsys.readouterr().out)
    assert (code, code2) == (1, 1), out
    lines = out.splitlines()
    assert lines[0].endswith(
        "a check passes with success >= 99 %, p99 <= 500 ms, >= 10 requests; "
        "1 failed check rolls back"
    ), lines[0]
    assert lines[1].endswith(
        "fail -> ROLLED BACK: 100 % to v1; 1 failed check (--threshold 1): "
        "success rate 0.0 % < 99 %"
    ), lines[1]
    assert "rolled back at 0 % " in lines[2], lines[2]
    assert " 1 failed check, 1 check; 1 failed check (--threshold 1): " in lines[2], lines[2]
    assert lines[3].endswith(">= 1 request; 2 failed checks roll back"), lines[3]
    assert not ONE_PLURAL.findall(out), ONE_PLURAL.findall(out)


def test_counts_of_one_in_the_check_lines_are_singular() -> None:
    """A halt on one request, a mirrored interval of one copy, a p99 unknown
    for one request, a waiting start resumed after one failed check, and
    Prometheus' copies missing after one request of stable."""
    from l4proxy.canary._analysis import Event, Policy, Rollout, Sample, check
    from l4proxy.canary._metrics import copies_missing

    display, _ = _display()
    r = Rollout("bootcamp", "v1", "v2", weight=20, steps=(20, 100))
    halt = check(Policy(steps=(20, 100)), Sample(1, 0, 1.0))
    assert display.line(Event("check", r, halt, 20)).endswith(
        "     1 req  (too few to judge)  halt: 1 canary request < 10 (--min-requests)"
    )
    m = Rollout("bootcamp", "v1", "v2", weight=0, steps=(0, 20, 100))
    halt = check(Policy(steps=(20, 100), mirror=1), Sample(1, 0, 1.0), mirrored=True)
    line = display.line(Event("check", m, halt, 0, mirrored=True))
    assert line.endswith(
        "     1 copy  (too few to judge)  halt: 1 copy or canary request < 10 (--min-requests)"
    ), line
    unknown = check(Policy(steps=(20, 100), min_requests=1), Sample(1, 0, None))
    assert unknown.reasons == ("p99 unknown: no latency histogram for 1 request",)
    waiting = Rollout("bootcamp", "v1", "v2", "waiting", steps=(20, 100), failed_checks=1)
    head = display.line(Event("resume", waiting))
    assert head.endswith("(nothing routed to v2 yet, 1 failed check so far)"), head
    assert "; 3 failed checks roll back" in head
    why = copies_missing(None, 1.0, 1, "bootcamp", "v2")
    assert "although stable served 1 request in the interval" in why, why


def test_status_says_rolled_back_in_words(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(REGISTRY, tmp_path)
    commit(tmp_path, 0, phase="rolled_back", reason="2 failed checks")
    assert by_hand("status", tmp_path) == 1
    assert "bootcamp: v1 -> v2 rolled back at 0 % " in capsys.readouterr().out
    assert by_hand("status", tmp_path, "--json") == 1
    assert json.loads(capsys.readouterr().out)["phase"] == "rolled_back"  # the state's word


def test_metrics_and_prometheus_together_are_said_to_exclude_each_other(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said "give the metrics: --metrics ... or --prometheus URL", as if
    neither had been given."""
    from l4proxy.cli import main

    shutil.copy(REGISTRY, tmp_path)
    argv = ["canary", "bootcamp", "--stable", "v1", "--canary", "v2", "--rules", str(tmp_path)]
    assert main([*argv, "--metrics", "127.0.0.1:1", "--prometheus", "http://127.0.0.1:1"]) == 2
    assert "--metrics and --prometheus: give one of them" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("saved", "stable", "canary", "previous"),
    [
        # v2 promoted, v1 rolled out as the new canary: it had 0, not v2's 100
        (("v1", "v2", "promoted", 100), "v2", "v1", 0),
        # rolled back, restarted: the canary's weight, 0
        (("v1", "v2", "rolled_back", 0), "v1", "v2", 0),
        # v2 promoted, then v3 against it: v3 was not routed
        (("v1", "v2", "promoted", 100), "v2", "v3", 0),
        # v1 rolled back against v2, restarted: v1 had 0
        (("v2", "v1", "rolled_back", 0), "v2", "v1", 0),
        # v2 rolled back, then v1 rolled out against it: v1, stable, had 100
        (("v1", "v2", "rolled_back", 0), "v2", "v1", 100),
    ],
)
def test_a_new_rollouts_previous_weight_is_its_canarys_share_before_it(
    saved: tuple[str, str, str, int], stable: str, canary: str, previous: int
) -> None:
    """The --json start event of canary v1 after v2 was promoted said
    "previous_weight": 100, v2's weight, where v1's share was 0."""
    from l4proxy.canary._analysis import Policy, Rollout, resume

    s_stable, s_canary, phase, weight = saved
    before = Rollout("bootcamp", s_stable, s_canary, phase, weight=weight, steps=(50, 100))  # type: ignore[arg-type]
    ev = resume(Policy(steps=(50, 100)), "bootcamp", stable, canary, before, 0.0, restart=True)
    assert (ev.kind, ev.previous_weight) == ("start", previous)


# -- two commands on one rollout --------------------------------------------------------
def _state(rules: pathlib.Path) -> dict[str, Any]:
    path = rules / ".canary-bootcamp.state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_a_second_command_on_a_running_rollout_is_refused_while_the_first_runs(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two commands on one service: the second "resumed at 10 %" and went
    on, and the first ended with exit 2 and a Python repr of the state.
    The state names the command that drives the rollout (its pid): a second
    one is refused (exit 2, nothing written) while that process runs; once
    it stops (SIGTERM: it leaves the weights and gives the rollout up) the
    next one resumes it."""
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
    with sidecar(tmp_path) as (_, admin):
        argv = ["canary", "bootcamp", "--stable", "v1", "--canary", "v2", "--rules"]
        argv += [str(tmp_path), "--metrics", admin, "--steps", "30,100", "--interval", "600"]
        first = subprocess.Popen(
            [sys.executable, "-m", "l4proxy", *argv, "--on-abort", "leave"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60  # a bound on a wait, not a measurement
            while (_state(tmp_path).get("owner") or {}).get("pid") != first.pid:
                assert first.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            # the first is done writing (its 30 % step written, no temporary
            # file of a write under way, the files alike at three looks in a
            # row): the snapshot is of the files it waits its interval on
            files, alike = {}, 0
            while alike < 3:
                assert first.poll() is None and time.monotonic() < deadline
                now = {p.name: p.read_text() for p in tmp_path.iterdir()}
                settled = now == files and not any(n.endswith((".tmp", ".validate")) for n in now)
                alike = alike + 1 if settled else 0
                files = now
                time.sleep(0.1)
            assert routes(tmp_path) == {"v1": 70, "v2": 30}
            assert canary(tmp_path, admin, "--steps", "30,100") == 2
            err = capsys.readouterr().err
            assert (
                f"the rollout of bootcamp (v1 -> v2 at 30 %, run by pid {first.pid} on " in err
            ), err
            assert f"stop it first (kill -TERM {first.pid}: it leaves the weights " in err
            assert "Rollout(" not in err
            assert {p.name: p.read_text() for p in tmp_path.iterdir()} == files
            assert by_hand("status", tmp_path) == 0
            assert f"; run by pid {first.pid} on " in capsys.readouterr().out
        finally:
            first.send_signal(signal.SIGTERM)
            out, err = first.communicate(timeout=60)
        assert first.returncode == 3, (out, err)
        assert _state(tmp_path)["owner"] is None  # given up as it stopped
        assert canary(tmp_path, admin, "--steps", "30,100") == 0
    assert "resumed at 30 %" in capsys.readouterr().out


def test_a_rollout_taken_over_is_said_in_words_not_a_repr(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The state replaced under a running command by another command's
    progressing rollout (one that took it over): it stops without writing,
    saying what the rollout is now, where it printed Rollout(...)."""
    from l4proxy.canary._analysis import Owner, Rollout
    from l4proxy.canary.command import save_state

    other = Rollout(
        "bootcamp", "v1", "v2", weight=50, steps=(30, 50, 100), owner=Owner("node-2", 7)
    )
    with sidecar(tmp_path) as (s, admin):
        state = str(tmp_path / ".canary-bootcamp.state.json")
        s.on_read = lambda n: save_state(state, other) if n == 3 else None
        assert canary(tmp_path, admin, "--steps", "30,50,100") == 2
    err = capsys.readouterr().err
    assert (
        "the rollout of bootcamp was changed by someone else (it is now v1 -> v2 at 50 %, "
        "run by pid 7 on node-2); stopped without writing"
    ) in err
    assert "Rollout(" not in err


def test_an_owner_elsewhere_holds_the_rollout_while_its_lease_lasts() -> None:
    """Another host's (or pid namespace's) process cannot be asked: its
    lease, renewed at each of its writes, says whether it still runs."""
    from l4proxy.canary._analysis import Owner
    from l4proxy.canary.command import alive, this_process

    me = this_process(60.0)
    pod = Owner("canary-job-x7k2p", me.pid, me.pidns, me.started, lease_until=1000.0)
    assert alive(pod, me, 999.0) and not alive(pod, me, 1000.0)
    assert alive(me, me, 0.0)  # this process runs, whatever the lease
    gone = Owner(me.host, me.pid, me.pidns, me.started + 1)  # the pid used again
    assert not alive(gone, me, 0.0)


def _elsewhere(lease_until: float) -> Any:
    """A command on another host (a Job's pod) holding the rollout until
    *lease_until*: its process cannot be asked from here."""
    from l4proxy.canary._analysis import Owner

    return Owner("canary-job-x7k2p", 7, "pid:[4026532999]", 1234, lease_until)


def test_a_lost_pods_rollout_is_taken_over_once_its_hold_ends(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Job's pod lost with its node (SIGKILL: it never gave the rollout
    up) holds it in the state until its lease ends. The Job's next pod,
    another host, was refused (exit 2), which fails the Job
    (podFailurePolicy) where the next pod was to resume the rollout. It
    waits for the hold to end, saying so, and then takes the rollout over:
    nothing of the rollout is read or written before."""
    import time

    lease_until = time.time() + 1.0
    first: list[tuple[float, str]] = []
    with sidecar(tmp_path) as (s, admin):
        commit(tmp_path, 30, (30, 100), owner=_elsewhere(lease_until))
        # the command's first read of the sidecar: once it waited, before it writes
        s.on_read = lambda n: (
            first.append((time.time(), _state(tmp_path)["owner"]["host"])) if n == 1 else None
        )
        assert canary(tmp_path, admin, "--steps", "30,100") == 0
    out = unstamped(capsys.readouterr().out)
    [(at, holder)] = first
    assert at >= lease_until and holder == "canary-job-x7k2p"
    assert (
        "bootcamp: v1 -> v2 at 30 %, run by pid 7 on canary-job-x7k2p, elsewhere (another "
        "host or pid namespace: a process this command cannot ask); waiting for its hold to "
        "end, in 1 s unless it writes again, then this command takes the rollout over" in out
    ), out
    assert "\n  resumed at 30 % " in out
    assert "\n  taken over from pid 7 on canary-job-x7k2p: its hold ended\n" in out
    assert "PROMOTED" in out.splitlines()[-1]


def test_a_hold_renewed_while_it_is_waited_for_is_waited_for_again(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder elsewhere writes again while this command waits (it
    runs: a laptop's command, say): the wait reads the state again and goes
    on to the renewed lease's end."""
    import time
    from dataclasses import replace

    from l4proxy.canary import command

    state = str(tmp_path / ".canary-bootcamp.state.json")
    reads: list[int] = []
    renewed = time.time() + 1.0
    load = command.FileStore.load_state

    def load_and_renew(store: Any) -> Any:
        reads.append(1)
        if len(reads) == 2:  # the wait's first read again: the holder has written since
            r = command.load_state(state)
            assert r is not None and r.owner is not None
            command.save_state(state, replace(r, owner=replace(r.owner, lease_until=renewed)))
        return load(store)

    monkeypatch.setattr(command.FileStore, "load_state", load_and_renew)
    first: list[float] = []
    with sidecar(tmp_path) as (s, admin):
        commit(tmp_path, 30, (30, 100), owner=_elsewhere(time.time() + 0.2))
        s.on_read = lambda n: first.append(time.time()) if n == 1 else None
        assert canary(tmp_path, admin, "--steps", "30,100") == 0
    assert len(reads) >= 3 and first[0] >= renewed


def test_sigterm_while_waiting_for_a_hold_exits_3_with_nothing_written(
    tmp_path: pathlib.Path,
) -> None:
    """SIGTERM (a Job deleted) while the command waits for another's hold
    ends it as SIGTERM does a running one: exit 3, and nothing written (it
    held nothing)."""
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
    with sidecar(tmp_path) as (_, admin):
        commit(tmp_path, 30, (30, 100), owner=_elsewhere(time.time() + 600))
        files = {p.name: p.read_text() for p in tmp_path.iterdir()}
        argv = ["canary", "bootcamp", "--stable", "v1", "--canary", "v2", "--rules"]
        argv += [str(tmp_path), "--metrics", admin, "--steps", "30,100"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "l4proxy", *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + 60  # a bound on a wait, not a measurement
            line = ""
            while "waiting for its hold to end" not in line:
                left = deadline - time.monotonic()
                assert left > 0 and readable(proc.stdout, left), line
                line = proc.stdout.readline()
                assert line, "the command ended without waiting"
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        assert proc.returncode == 3, (out, err)
        assert (
            "l4proxy canary: interrupted while waiting for another command's hold on the "
            "rollout of bootcamp to end; nothing written" in err
        ), err
        assert {p.name: p.read_text() for p in tmp_path.iterdir()} == files


def test_a_rollout_taken_over_mid_run_stops_this_command_without_writing(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The state replaced under a running command by the same stage, held
    by another command (one that took it over as this one's hold had
    lapsed: a laptop asleep past its lease, say). The holder was not
    compared (two states that differ in it alone are the same rollout):
    this command wrote over it at its next check, and both drove the
    rollout. It stops without writing, saying who holds it now."""
    import time
    from dataclasses import replace

    from l4proxy.canary.command import load_state, save_state

    state = str(tmp_path / ".canary-bootcamp.state.json")

    def take_over(n: int) -> None:
        if n == 3:  # the first window starts; the interval's end reads the state
            r = load_state(state)
            assert r is not None
            save_state(state, replace(r, owner=_elsewhere(time.time() + 600)))

    with sidecar(tmp_path) as (s, admin):
        s.on_read = take_over
        assert canary(tmp_path, admin, "--steps", "30,50,100") == 2
    err = capsys.readouterr().err
    assert (
        "the rollout of bootcamp was taken over by another l4proxy canary (v1 -> v2 at 30 %, "
        "run by pid 7 on canary-job-x7k2p); stopped without writing"
    ) in err, err
    assert _state(tmp_path)["owner"]["host"] == "canary-job-x7k2p"
    assert routes(tmp_path) == {"v1": 70, "v2": 30}


def test_an_abort_that_meets_the_running_commands_check_is_written_on_it(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``abort --metrics`` reads the sidecars between reading the state and
    writing it; the running command saved its check in that time (it does
    every interval), and the abort was refused as "changed meanwhile" (exit
    2, with a repr of the state). It is applied to the rollout as it is now."""
    from dataclasses import replace

    from l4proxy.canary.command import load_state, save_state

    state = str(tmp_path / ".canary-bootcamp.state.json")

    def a_check_lands(n: int) -> None:
        if n == 1:  # the abort's first read of the sidecar
            r = load_state(state)
            assert r is not None
            save_state(state, replace(r, checks=r.checks + 1, updated=r.updated + 1))

    with sidecar(tmp_path) as (s, admin):
        commit(tmp_path, 50)
        s.on_read = a_check_lands
        assert by_hand("abort", tmp_path, "--metrics", admin) == 1
    out, err = capsys.readouterr()
    assert " rolled back at 0 % " in out and " 1 check; aborted by hand" in out, (out, err)
    assert s.weights() == {"v1": 100}


# -- times and progress -------------------------------------------------------------------
def test_every_line_says_when_and_a_long_wait_says_it_waits(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No line said when it happened, and nothing was printed while the
    command waited (an interval of a minute, --wait-live of 150 s on
    Kubernetes). Each line starts with the UTC time, and a wait prints a
    progress line at most every PROGRESS_EVERY seconds (30; a tenth of an
    interval here, so that one comes): of the interval, and of the sidecars
    not serving a change yet."""
    from l4proxy.canary import command

    monkeypatch.setattr(command, "PROGRESS_EVERY", 0.05)
    with sidecar(tmp_path) as (s, admin):
        assert canary(tmp_path, admin, "--steps", "30,100", "--interval", "0.5") == 0
        out = unstamped(capsys.readouterr().out)  # every line starts with the time
        assert (
            "  ... v2 at weight 30: " in out and " s of the 0.5 s interval, judged at its " in out
        )
        s.frozen = True  # the next change never goes live
        commit(tmp_path, 0, (30, 100), phase="rolled_back")  # (restarted below)
        assert canary(tmp_path, admin, "--steps", "30,100", "--restart", "--threshold", "1") == 4
    out = unstamped(capsys.readouterr().out)
    assert "  ... waiting for the sidecars to serve the change: " in out
    assert " s of --wait-live 0.5 s (http://" in out


def test_stderr_says_when_as_stdout_does(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every line on stdout starts with the time, and nothing on stderr
    did: a warning, an error, NOT SERVED. A Job's log interleaves the two,
    and a warning could not be placed among the check lines. Each line on
    stderr starts with the time too, in the same form."""
    shutil.copy(REGISTRY, tmp_path)
    commit(tmp_path, 50)
    (tmp_path / "typo.yaml").write_text(TYPO)
    assert by_hand("abort", tmp_path) == 1
    err = capsys.readouterr().err
    assert unstamped(err).startswith("l4proxy canary: warning: the abort is written, not ")
    assert by_hand("status", tmp_path / "nosuch") == 2
    err = capsys.readouterr().err
    assert unstamped(err).startswith(f"l4proxy canary: {tmp_path}/nosuch: no such rules file ")


def test_json_events_say_when_and_no_progress(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import re

    from l4proxy.canary import command

    monkeypatch.setattr(command, "PROGRESS_EVERY", 0.05)
    with sidecar(tmp_path) as (_, admin):
        assert canary(tmp_path, admin, "--steps", "30,100", "--interval", "0.5", "--json") == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["start", "check", "promoted"]
    for e in events:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", e["time"]), e

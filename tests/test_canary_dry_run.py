"""``l4proxy canary ... --dry-run`` as a user runs it: the command line in
another process, a real rules directory, the operator tests' sidecar
(tests/test_canary_ops.Sidecar) for its metrics, real webhook servers on
127.0.0.1 (tests/test_canary_webhooks.HookServer). The preview says, for
each step, the routes its documents give, the checks an interval runs and
their thresholds, the gates its pass asks and where it leads; nothing is
written (not even the directory's lock file), no webhook is called, and it
exits 0. What a run refuses, it refuses with the run's error (exit 2)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.test_canary_core import unstamped
from tests.test_canary_ops import COMPETING, commit, routes, sidecar
from tests.test_canary_webhooks import HookServer, always

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE = ".canary-bootcamp.state.json"
DOC = "canary-bootcamp.yaml"


def _canary(rules: pathlib.Path, admin: str, *more: str) -> subprocess.CompletedProcess[str]:
    """``l4proxy canary bootcamp --stable v1 --canary v2 --rules RULES
    --metrics ADMIN MORE`` in a process of its own, as a shell runs it."""
    argv = ["canary", "bootcamp", "--stable", "v1", "--canary", "v2", "--rules", str(rules)]
    return subprocess.run(
        [sys.executable, "-m", "l4proxy", *argv, "--metrics", admin, *more],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
        timeout=120,
    )


def _files(rules: pathlib.Path) -> dict[str, tuple[bytes, int]]:
    """Every file of *rules*, hidden ones too: its bytes and its mtime."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in rules.iterdir()}


def _hooks_file(tmp: pathlib.Path, hooks: HookServer) -> pathlib.Path:
    """A --webhooks file in Flagger's form: a hook of every type but the
    confirm-promotion one (given with --webhook), each at its own path."""
    path = tmp / "hooks.yaml"
    entries = [
        ("approve", "confirm-rollout"),
        ("smoke", "pre-rollout"),
        ("load", "rollout"),
        ("more", "confirm-traffic-increase"),
        ("stop", "rollback"),
        ("notify", "post-rollout"),
        ("chat", "event"),
    ]
    path.write_text(
        "webhooks:\n"
        + "".join(f"  - {{name: {n}, type: {t}, url: '{hooks.url}/{n}'}}\n" for n, t in entries)
    )
    return path


@pytest.fixture
def rules(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """The rules directory (its registry copied in by the sidecar), apart
    from the webhook files (tmp_path)."""
    d = tmp_path / "rules"
    d.mkdir()
    yield d


def test_a_dry_run_says_each_step_and_writes_nothing(
    rules: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """Each step's routes, checks and gates, the gates before the first
    write and the hooks of every interval; exit 0, every file as it was (no
    state, no document, no lock file), no webhook called (the event hook
    included). Then the same command run for real writes those weights in
    that order and asks those gates."""
    with HookServer({}).serving() as hooks, sidecar(rules) as (_, admin):
        hooks.answers.update({n: always(200) for n in ("approve", "smoke", "load", "more")})
        hooks.answers.update({n: always(200) for n in ("gate", "notify", "chat")})
        hooks.answers["stop"] = always(404)  # (a 2xx rolls back)
        options = ["--steps", "10,50,100", "--interval", "0.2", "--threshold", "2"]
        options += ["--webhooks", str(_hooks_file(tmp_path, hooks))]
        options += ["--webhook", hooks.hook("confirm-promotion", "gate")]
        before = _files(rules)
        dry = _canary(rules, admin, *options, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert _files(rules) == before and sorted(before) == ["registry.yaml"]
        assert hooks.calls == []
        as_json = _canary(rules, admin, *options, "--dry-run", "--json")
        assert as_json.returncode == 0, as_json.stderr
        assert _files(rules) == before and hooks.calls == []
        run = _canary(rules, admin, *options, "--json")
        assert run.returncode == 0, run.stderr
    lines = unstamped(dry.stdout).splitlines()
    assert lines[0].startswith("bootcamp: v1 -> v2, steps 10,50,100 every 0.2 s; a check passes ")
    where = rules / DOC
    check = "every 0.2 s a check of v2's requests: success >= 99 %, p99 <= 500 ms, >= 10 requests"
    more = 'confirm-traffic-increase "more"'
    assert lines[1:] == [
        "  dry run: nothing written, no webhook called, nothing waited for. A run writes "
        f"RouteRule canary-bootcamp to {where} at each step, as follows where every check "
        "passes and every gate says yes",
        '  before step 1: confirm-rollout "approve" (asked every 0.2 s until it says yes); '
        'pre-rollout "smoke" (each failure a failed check, asked again each interval); '
        f'{more}; rollback "stop" each interval; meanwhile its state says it waits, and '
        "nothing is routed",
        f"  step 1/3: v1 90 %, v2 10 %; {check}; its pass asks {more}, then goes on to 50 %",
        f"  step 2/3: v1 50 %, v2 50 %; {check}; its pass asks {more}; confirm-promotion "
        f"{hooks.url}/gate, then goes on to 100 %",
        f"  step 3/3: v1 0 %, v2 100 %; {check}; its pass promotes it: v1 0 %, v2 100 %",
        '  webhooks: rollout "load" at each interval\'s start; rollback "stop" before each '
        'verdict (a 2xx rolls back); post-rollout "notify" once the end is written; event '
        '"chat" hears every line',
        "  a failed check stays at its step, and 2 failed checks (--threshold) roll back: "
        "ROLLED BACK, v1 100 %, v2 0 %; an interval with fewer than 10 requests is a halt, "
        "and 600 s of them roll back (--progress-deadline)",
    ], dry.stdout
    events = [json.loads(x) for x in as_json.stdout.splitlines()]
    assert events[0]["event"] == "start" and events[0]["dry_run"] is True
    assert [h["name"] for h in events[0]["webhooks"]] == [
        "",  # (--webhook's, first: no name)
        "approve",
        "smoke",
        "load",
        "more",
        "stop",
        "notify",
        "chat",
    ]
    steps = [e for e in events[1:] if "step" in e]
    assert [(e["weight"], e["routes"], [g["type"] for g in e["gates"]]) for e in steps] == [
        (10, {"v1": 90, "v2": 10}, ["confirm-traffic-increase"]),
        (50, {"v1": 50, "v2": 50}, ["confirm-traffic-increase", "confirm-promotion"]),
        (100, {"v1": 0, "v2": 100}, []),
    ]
    assert [e["then"] for e in steps] == [
        {"step": 1, "weight": 50},
        {"step": 2, "weight": 100},
        "promoted",
    ]
    assert steps[0]["check"] == {
        "interval": 0.2,
        "min_success_rate": 99.0,
        "max_p99_ms": 500.0,
        "min_requests": 10,
    }
    assert "weight: 90" in steps[0]["document"] and "weight: 10" in steps[0]["document"]
    end = events[-1]
    assert end["promoted"]["routes"] == {"v1": 0, "v2": 100}
    assert end["rolled_back"] == {
        "routes": {"v1": 100, "v2": 0},
        "threshold": 2,
        "progress_deadline": 600.0,
    }
    assert [b["type"] for b in end["before_start"]] == [
        "confirm-rollout",
        "pre-rollout",
        "confirm-traffic-increase",
    ]
    # what the run did: those weights in turn, those gates asked
    judged = [json.loads(x) for x in run.stdout.splitlines()]
    judged = [e for e in judged if e["event"] in ("check", "promoted") and "pre_rollout" not in e]
    assert [e["previous_weight"] for e in judged] == [10, 50, 100], run.stdout
    assert len(hooks.of("gate")) == 1 and len(hooks.of("more")) == 3
    assert routes(rules) == {"v2": 100}


@pytest.mark.parametrize(
    ("case", "options", "said"),
    [
        (
            "misspelt service",
            ["--service", "bootcmp"],
            "bootcmp: no ServiceEntry for bootcmp.default.svc.cluster.local in the rules",
        ),
        ("bad steps", ["--steps", "50,10"], "--steps: weights must rise strictly within 1..100"),
        ("a competing rule", ["--competing"], "RouteRule bootcamp-default routes every request"),
        (
            "a broken file",
            ["--broken"],
            "refused: the rules would be invalid at weight 5: ",
        ),
        ("a bad --match", ["--match", "x-canary~("], "--match x-canary~(: regex '(' in spec"),
        ("no metrics source", ["--no-metrics"], "give the metrics: --metrics HOST:PORT"),
        ("promote --dry-run", ["--promote"], "--dry-run previews a rollout"),
    ],
)
def test_a_dry_run_is_refused_where_a_run_is_with_its_error(
    rules: pathlib.Path, case: str, options: list[str], said: str
) -> None:
    """exit 2, the run's message (the same line), nothing written by
    either. promote and abort are no run to preview: --dry-run of them is
    refused, and nothing ends."""
    service = "bootcamp"
    with sidecar(rules) as (_, admin):
        if "--service" in options:
            service = options[1]
            options = []
        if options == ["--competing"]:
            shutil.copy(COMPETING, rules / "mine.yaml")
            options = []
        if options == ["--broken"]:
            (rules / "typo.yaml").write_text("kind: ConfigMap\ndata: [\n")
            options = []
        if options == ["--no-metrics"]:
            admin, options = "", []
        words = ["canary", service, "--stable", "v1", "--canary", "v2", "--rules", str(rules)]
        if options == ["--promote"]:
            commit(rules, 30)
            words, options = ["canary", "promote", "bootcamp", "--rules", str(rules)], []
        words += ["--metrics", admin] if admin else []
        words += [*options, "--interval", "0.05", "--wait-live", "0.5"]
        before = _files(rules)

        def run(*more: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "l4proxy", *words, *more],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": ROOT},
                timeout=120,
            )

        dry = run("--dry-run")
        assert (dry.returncode, _files(rules)) == (2, before), dry.stderr
        assert said in dry.stderr, dry.stderr
        if case == "promote --dry-run":
            return
        real = run()
        # (a run makes the directory's lock file as it reads the rules: no write of the rules)
        after = {k: v for k, v in _files(rules).items() if k != ".l4proxy.lock"}
        assert (real.returncode, after) == (2, before), real.stderr
    assert unstamped(dry.stderr) == unstamped(real.stderr)


def test_a_dry_run_of_a_resumed_rollout_with_other_steps(rules: pathlib.Path) -> None:
    """Saved at 30 % of 10,20,30,50,100 (one failed check), previewed with
    25,50,75,100: it stays at 30 % (written already), and goes on to 50 %
    through the gate; the state and the document keep their bytes."""
    with sidecar(rules) as (_, admin):
        commit(rules, 30, steps=(10, 20, 30, 50, 100), step=2, checks=2, failed_checks=1)
        before = _files(rules)
        gate = "--webhook", "confirm-traffic-increase=http://gate.test/more"
        dry = _canary(rules, admin, "--steps", "25,50,75,100", *gate, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert _files(rules) == before
    lines = unstamped(dry.stdout).splitlines()
    check = "every 60 s a check of v2's requests: success >= 99 %, p99 <= 500 ms, >= 10 requests"
    gated = "asks confirm-traffic-increase http://gate.test/more, then goes on to"
    assert lines[1:3] == [
        "  resumed at 30 % (step 2/5, 1 failed check so far)",
        "  the plan changed (it was steps 10,20,30,50,100): it stays at 30 %, judged there, "
        "and a pass goes on to 50 %",
    ]
    assert lines[4:8] == [
        f"  step 2/5: v1 70 %, v2 30 % (written already); {check}; its pass {gated} 50 %",
        f"  step 3/5: v1 50 %, v2 50 %; {check}; its pass {gated} 75 %",
        f"  step 4/5: v1 25 %, v2 75 %; {check}; its pass {gated} 100 %",
        f"  step 5/5: v1 0 %, v2 100 %; {check}; its pass promotes it: v1 0 %, v2 100 %",
    ], dry.stdout


def test_a_dry_run_waits_for_no_other_command_and_says_what_a_run_would_meet(
    rules: pathlib.Path,
) -> None:
    """A rollout run by a live process of this host: a run is refused
    (exit 2), the preview says so and goes on (exit 0). One held from
    another host: a run waits for the hold to end; the preview says how
    long, and does not wait."""
    from l4proxy.canary._analysis import Owner
    from l4proxy.canary.command import this_process

    with sidecar(rules) as (_, admin):
        me = this_process(0.0)  # (this test's process: alive, on this host)
        commit(rules, 30, owner=Owner(me.host, me.pid, me.pidns, me.started, time.time() + 600))
        before = _files(rules)
        dry = _canary(rules, admin, "--steps", "30,100", "--dry-run")
        real = _canary(rules, admin, "--steps", "30,100")
        assert _files(rules) == before
        elsewhere = Owner("canary-job-x7k2p", 7, "", 0, time.time() + 300)
        commit(rules, 30, owner=elsewhere)
        before = _files(rules)
        started = time.monotonic()
        away = _canary(rules, admin, "--steps", "30,100", "--dry-run")
        assert time.monotonic() - started < 60  # a bound on a wait (of 300 s), not a timing
        assert _files(rules) == before
    assert real.returncode == 2 and "stop it first" in real.stderr
    assert dry.returncode == 0, dry.stderr
    assert (
        f"  run by pid {me.pid} on {socket.gethostname()}: a run now is refused (exit 2: "
        f"stop it first, kill -TERM {me.pid}), and would do this once it has stopped"
    ) in unstamped(dry.stdout).splitlines()
    assert away.returncode == 0, away.stderr
    said = [x for x in unstamped(away.stdout).splitlines() if x.startswith("  run by ")]
    assert said and said[0].startswith(
        "  run by pid 7 on canary-job-x7k2p, elsewhere: a run now waits for its hold to end (in "
    ), away.stdout


def test_a_dry_run_of_a_rollout_that_ended_says_so(rules: pathlib.Path) -> None:
    """A promoted rollout run again is reported as it ended; its document,
    removed, is written again by a run: not by the preview."""
    with sidecar(rules) as (_, admin):
        commit(rules, 100, phase="promoted", reason="every step passed")
        (rules / DOC).unlink()
        before = _files(rules)
        dry = _canary(rules, admin, "--steps", "50,100", "--dry-run")
        assert (dry.returncode, _files(rules)) == (0, before), dry.stderr
    lines = unstamped(dry.stdout).splitlines()
    assert "-> PROMOTED: v2 takes 100 % of bootcamp" in lines[0], lines
    assert lines[1] == (
        "  dry run: nothing written; a run reports this rollout as it ended (exit 0), and "
        f"writes its documents ({rules / DOC}) again only where they are not as it ended"
    )


def test_a_dry_run_of_a_mirrored_sticky_gateway_api_rollout(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The mirrored intervals in one line, the sticky cookies of each
    weighted step, the HTTPRoute each step is; a --gateway not in the rules
    refused as a run refuses it."""
    from l4proxy.cli import main
    from tests.test_canary_gateway_api import GATEWAY_API, PER_VERSION
    from tests.test_canary_gateway_api import _sidecar as gateway_sidecar

    shutil.copy(PER_VERSION, tmp_path)
    argv = ["canary", "bootcamp", "--rules", str(tmp_path), *GATEWAY_API, "--mirror", "3"]
    argv += ["--steps", "50,100", "--session-affinity", "c", "--primary-cookie", "p"]
    with gateway_sidecar(tmp_path) as admin:
        before = _files(tmp_path)
        assert main([*argv, "--metrics", admin, "--dry-run"]) == 0
        assert _files(tmp_path) == before
        lines = unstamped(capsys.readouterr().out).splitlines()
        assert main([*argv, "--metrics", admin, "--gateway", "nosuch", "--dry-run"]) == 2
        dry = unstamped(capsys.readouterr().err)
        assert main([*argv, "--metrics", admin, "--gateway", "nosuch"]) == 2
        assert unstamped(capsys.readouterr().err) == dry
    assert "--gateway nosuch: no such Gateway in the rules" in dry, dry
    check = "every 60 s a check of bootcamp-v2's"
    thresholds = "success >= 99 %, p99 <= 500 ms, >= 10"
    assert lines[2:5] == [
        "  steps 1-3/5: bootcamp-v1 100 %, bootcamp-v2 0 %, every request copied to "
        f"bootcamp-v2; {check} answers to the copies (and its own requests): {thresholds} "
        "copies; each pass goes on to the next; step 3's pass goes on to 50 %",
        "  step 4/5: bootcamp-v1 50 %, bootcamp-v2 50 %, every request with cookie c to "
        f"bootcamp-v2, with p to bootcamp-v1; {check} requests: {thresholds} requests; its "
        "pass goes on to 100 %",
        "  step 5/5: bootcamp-v1 0 %, bootcamp-v2 100 %, every request with cookie c to "
        f"bootcamp-v2, with p to bootcamp-v1; {check} requests: {thresholds} requests; its "
        "pass promotes it: bootcamp-v1 0 %, bootcamp-v2 100 %",
    ], lines
    assert "A run writes HTTPRoute canary-bootcamp to " in lines[1]
    assert "(a run draws its own cookie value)" in lines[1]


def test_a_later_step_refused_is_named(
    rules: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a later step's documents would be refused (a store that
    refuses 50 % here: the rules give no such case, each step's documents
    differing in their weights alone), the preview exits 2 naming the
    step, as a run would count a failed check there each interval."""
    import argparse

    from l4proxy.canary import command
    from l4proxy.canary._analysis import Rollout
    from l4proxy.canary.command import CanaryError, FileStore
    from l4proxy.cli import main

    made = command._store

    class Refusing(FileStore):
        def would_install(self, r: Rollout) -> None:
            if r.weight == 50:
                raise CanaryError("refused: the rules would be invalid at weight 50: (a test's)")
            super().would_install(r)

    def store(args: argparse.Namespace, service: str, dry: bool = False) -> FileStore:
        s = made(args, service, dry)
        assert isinstance(s, FileStore) and s.writer.read_only == dry
        return Refusing(s.paths, s.writer)

    monkeypatch.setattr(command, "_store", store)
    with sidecar(rules) as (_, admin):
        argv = ["canary", "bootcamp", "--stable", "v1", "--canary", "v2", "--rules", str(rules)]
        before = _files(rules)
        assert main([*argv, "--metrics", admin, "--steps", "10,50,100", "--dry-run"]) == 2
        assert _files(rules) == before
    err = unstamped(capsys.readouterr().err)
    assert err.splitlines() == [
        "l4proxy canary: --dry-run: step 2/3 (50 %) would be refused: refused: the rules would "
        "be invalid at weight 50: (a test's)",
        "  a run writes the steps before it, then counts each interval this step is refused a "
        "failed check (--threshold of them roll back)",
    ], err

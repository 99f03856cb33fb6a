"""``l4proxy canary``'s gates across a resume: a rollout at a last step of
100 whose raise no confirm-promotion webhook confirmed (a state an earlier
version wrote, which asked the gate only once 100 % had passed; a run
without the hook) asks it before it promotes; one whose raise it
confirmed is not asked again. A command SIGKILLed while its start waits
on a gate: ``status`` says nothing runs the rollout, and the same command
run again resumes the wait (its checksum, its failed pre-rollout checks,
the gates it passed). The hooks are real HTTP servers on 127.0.0.1, port
0 (tests/test_canary_webhooks.HookServer); the killed command a real
process."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from tests.test_canary_core import _fake_prometheus, _healthy, unstamped
from tests.test_canary_webhooks import HookServer, _routes, always, first, rollout
from tests.test_canary_webhooks_phases import ROOT, _canary, _ctrl_c_raises, _interrupt, _state

__all__ = ["_ctrl_c_raises"]  # (the fixture: SIGINT raises KeyboardInterrupt here)

STATE = ".canary-bootcamp.state.json"


def _old_state_at_100(rules: pathlib.Path) -> None:
    """The state file as l4proxy canary wrote it before confirm-promotion
    was asked at the raise to a last step of 100 (04e0141: no checksum,
    started or hold), of a rollout at that step: it had asked
    confirm-traffic-increase for the raise, and would have asked
    confirm-promotion at the pass that promotes."""
    now = time.time()
    (rules / STATE).write_text(
        json.dumps(
            {
                "service": "bootcamp",
                "stable": "v1",
                "canary": "v2",
                "phase": "progressing",
                "step": 2,
                "weight": 100,
                "failed_checks": 0,
                "checks": 2,
                "reason": "",
                "updated": now,
                "steps": [10, 50, 100],
                "judged": now,
                "match": [],
                "gateway": None,
                "session_affinity": None,
                "owner": None,
            },
            indent=1,
        )
    )


def test_an_old_state_at_a_last_step_of_100_asks_confirm_promotion(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Resumed, its pass at 100 % asks the gate, which holds it once, then
    promotes. It promoted with no call: neither version ever asked."""
    _old_state_at_100(tmp_path)
    with HookServer({"gate": first(1, 403)}).serving() as hooks:
        code = rollout(
            tmp_path, "--steps", "10,50,100", "--webhook", hooks.hook("confirm-promotion", "gate")
        )
    out = unstamped(capsys.readouterr().out)
    assert len(hooks.of("gate")) == 2, out
    assert code == 0, out
    lines = out.splitlines()
    assert lines[1] == "  resumed at 100 % (step 3/3, 0 failed checks so far)"
    assert lines[2].endswith(
        f"pass -> promotion held: confirm-promotion {hooks.url}/gate: HTTP 403: said 403; "
        "stays at 100 %"
    ), lines[2]
    assert lines[3].endswith("pass -> PROMOTED: v2 takes 100 % of bootcamp")
    assert [b["phase"] for b in hooks.of("gate")] == ["Progressing", "WaitingPromotion"]
    state = _state(tmp_path)
    assert state is not None and state["phase"] == "promoted"


def _interrupting_at(k: int) -> Any:
    """A rollout hook that interrupts the command at its *k*-th call (the
    weights left: --on-abort leave), 200 otherwise."""

    def load(n: int, body: dict[str, Any]) -> int:
        if n == k:
            _interrupt()
        return 200

    return load


@pytest.mark.parametrize("gated", [True, False])
def test_a_raise_to_100_is_confirmed_once(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], gated: bool
) -> None:
    """A run raises 50 -> 100 (with or without a confirm-promotion hook)
    and is interrupted at 100 %; resumed with the hook, the pass at 100 %
    asks it only where the raise was not confirmed by it (the state says
    so: promotion_confirmed)."""
    with HookServer({"gate": always(200), "load": _interrupting_at(2)}).serving() as hooks:
        gate = ["--webhook", hooks.hook("confirm-promotion", "gate")]
        load = ["--webhook", hooks.hook("rollout", "load")]
        first_run = rollout(
            tmp_path, "--on-abort", "leave", "--steps", "50,100", *load, *(gate if gated else [])
        )
        assert first_run == 3
        state = _state(tmp_path)
        assert state is not None
        assert (state["weight"], state["promotion_confirmed"]) == (100, gated)
        asked = len(hooks.of("gate"))
        assert asked == (1 if gated else 0)
        assert rollout(tmp_path, "--steps", "50,100", *load, *gate) == 0
        assert len(hooks.of("gate")) - asked == (0 if gated else 1)
    capsys.readouterr()
    assert _routes(tmp_path) == [("v2", 100)]


def test_a_first_stage_of_100_is_confirmed_once(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--steps 100: the gate is asked before the first stage is written
    (the promotion in all but name), and the pass at it promotes without
    asking again."""
    with HookServer({"gate": always(200)}).serving() as hooks:
        code = rollout(
            tmp_path, "--steps", "100", "--webhook", hooks.hook("confirm-promotion", "gate")
        )
    capsys.readouterr()
    assert code == 0
    assert len(hooks.of("gate")) == 1


# -- a command SIGKILLed while its start waits on a gate ------------------------------
Answer = Callable[[int, dict[str, Any]], "int | None"]


@contextlib.contextmanager
def _killed_while_waiting(
    rules: pathlib.Path,
    answers: dict[str, Answer],
    given: Sequence[tuple[str, str]],
    kill_at: str,
    *options: str,
) -> Iterator[tuple[HookServer, int]]:
    """Run ``l4proxy canary`` as a process of its own with *options* and
    the webhooks *given* (TYPE, NAME of *answers*), and SIGKILL it during
    the second call of the hook *kill_at* (its state recorded the wait
    after the first). Yields the hooks, still serving *answers* (the
    command run again calls them), and the killed command's pid."""
    spawned: list[subprocess.Popen[str]] = []
    ready = threading.Event()
    answer = answers[kill_at]

    def killing(n: int, body: dict[str, Any]) -> int | None:
        if n != 2:
            return answer(n, body)
        assert ready.wait(30)
        spawned[0].send_signal(signal.SIGKILL)
        spawned[0].wait()
        return None  # (nobody reads the answer)

    healthy = _fake_prometheus(lambda n, path, q: _healthy(q))
    with HookServer({**answers, kill_at: killing}).serving() as hooks, healthy as url:
        shutil.copy(os.path.join(ROOT, "tests", "data", "rules", "registry.yaml"), rules)
        argv = [sys.executable, "-m", "l4proxy", "canary", "bootcamp", "--stable", "v1"]
        argv += ["--canary", "v2", "--rules", str(rules), "--prometheus", url]
        argv += ["--interval", "0.05", *options]
        for kind, name in given:
            argv += ["--webhook", hooks.hook(kind, name)]
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        spawned.append(proc)
        ready.set()
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == -signal.SIGKILL, out + err
        yield hooks, proc.pid


def test_status_says_a_killed_commands_wait_is_run_by_nobody_and_a_run_resumes_it(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILLed while its confirm-rollout gate says no: the state still
    says waiting, with the killed command as its owner. status says that
    command is gone and nothing waits on the gate (it said "run by pid N",
    a process that no longer runs). The same command run again resumes
    the wait, as the command taken over, with the rollout's checksum, in
    Flagger's Waiting phase (it started a new rollout: another checksum,
    Initialized, and no word of the one it replaced), and starts once the
    gate says yes."""
    answers: dict[str, Answer] = {"gate": first(2, 403)}
    given = [("confirm-rollout", "gate")]
    with _killed_while_waiting(tmp_path, answers, given, "gate", "--steps", "10,100") as (
        hooks,
        pid,
    ):
        state = _state(tmp_path)
        assert state is not None
        assert (state["phase"], state["owner"]["pid"]) == ("waiting", pid)
        status = _canary("status", "bootcamp", "--rules", str(tmp_path))
        assert status.returncode == 0, status.stderr
        said = unstamped(status.stdout).strip()
        assert f"run by pid {pid} " not in said + " ", said
        assert re.fullmatch(
            r"bootcamp: v1 -> v2 waiting to start \(steps 10,100; nothing routed to v2 yet\), "
            r"0 failed checks, 0 checks; held since \S+Z by confirm-rollout "
            rf"{re.escape(hooks.url)}/gate: HTTP 403: said 403; nothing runs it: its command "
            rf"\(pid {pid} on \S+\) is gone; run the same command again to resume it, or "
            r"l4proxy canary abort bootcamp",
            said,
        ), said
        as_json = _canary("status", "bootcamp", "--rules", str(tmp_path), "--json")
        assert json.loads(as_json.stdout)["run_by"] is None
        code = rollout(
            tmp_path, "--steps", "10,100", "--webhook", hooks.hook("confirm-rollout", "gate")
        )
        calls = hooks.of("gate")
    out = unstamped(capsys.readouterr().out)
    assert code == 0, out
    assert len(calls) == 3  # the killed command's two, then the one that said yes
    assert [c["phase"] for c in calls] == ["Initialized", "Waiting", "Waiting"]
    assert {c["checksum"] for c in calls} == {state["checksum"]}
    lines = out.splitlines()
    assert (
        lines[1] == "  resumed waiting to start (nothing routed to v2 yet, 0 failed checks so far)"
    )
    assert re.fullmatch(rf"  taken over from pid {pid} on \S+: its process is gone", lines[2])
    assert lines[3].startswith(f"  v2 confirmed: confirm-rollout {hooks.url}/gate: HTTP 200")
    assert _routes(tmp_path) == [("v2", 100)]


def test_a_killed_commands_failed_pre_rollout_checks_count_on(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--threshold 2, a pre-rollout hook that always fails: killed after
    its first failure (counted in the state), the command run again
    rolls back at its first (it started over at 0 failed checks: a Job
    whose pods are lost each interval would never reach the threshold);
    the confirm-rollout gate it passed is not asked again."""
    answers: dict[str, Answer] = {"gate": always(200), "smoke": always(500)}
    given = [("confirm-rollout", "gate"), ("pre-rollout", "smoke")]
    with _killed_while_waiting(
        tmp_path, answers, given, "smoke", "--steps", "10,100", "--threshold", "2"
    ) as (hooks, _):
        state = _state(tmp_path)
        assert state is not None
        assert (state["phase"], state["failed_checks"], state["hold"]["gate"]) == (
            "waiting",
            1,
            "pre-rollout",
        )
        code = rollout(
            tmp_path,
            "--steps",
            "10,100",
            "--threshold",
            "2",
            *("--webhook", hooks.hook("confirm-rollout", "gate")),
            *("--webhook", hooks.hook("pre-rollout", "smoke")),
        )
        gate, smoke = hooks.of("gate"), hooks.of("smoke")
    out = unstamped(capsys.readouterr().out)
    assert code == 1, out
    assert (len(gate), len(smoke)) == (1, 3)  # the killed command's, then one failure
    assert "fail -> ROLLED BACK: 100 % to v1; 2 failed checks (--threshold 2)" in out
    assert _routes(tmp_path) == [("v1", 100)]


def test_ctrl_c_leaves_a_resumed_wait_waiting_run_by_nobody(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command run again over a killed one's wait, interrupted while
    the gate still says no: the wait is the rollout's, not this command's
    to undo; it stays waiting, with no owner (it was put back as the
    killed command left it, still naming it), and status says nothing
    runs it."""
    answers: dict[str, Answer] = {"gate": always(403)}
    given = [("confirm-rollout", "gate")]

    def interrupting(n: int, body: dict[str, Any]) -> int:
        if n == 3:
            _interrupt()
        return 403

    with _killed_while_waiting(tmp_path, answers, given, "gate", "--steps", "10,100") as (
        hooks,
        _,
    ):
        hooks.answers["gate"] = interrupting
        code = rollout(
            tmp_path, "--steps", "10,100", "--webhook", hooks.hook("confirm-rollout", "gate")
        )
    captured = capsys.readouterr()
    assert code == 3, captured
    state = _state(tmp_path)
    assert state is not None
    assert (state["phase"], state["owner"]) == ("waiting", None)
    status = unstamped(_canary("status", "bootcamp", "--rules", str(tmp_path)).stdout)
    assert status.strip().endswith(
        "; nothing runs it; run the same command again to resume it, or l4proxy canary abort "
        "bootcamp"
    ), status
    assert "it still waits" in captured.err


def test_status_says_who_runs_a_rollout_as_this_host_can_tell() -> None:
    """This host's process that runs (this one): run by it; another host's
    whose lease lasts: run by it (it cannot be asked: its lease says);
    whose lease is over: nobody, since when; none named (given up):
    nobody; an ended rollout: nothing said."""
    from dataclasses import replace

    from l4proxy.canary._analysis import Rollout
    from l4proxy.canary.command import run_by_words, this_process

    me = this_process(0.0)
    r = Rollout("bootcamp", "v1", "v2", weight=50, steps=(50, 100))
    now = time.time()
    live = replace(me, host="canary-job-x7k2p", pid=7, lease_until=now + 300)
    lapsed = replace(live, lease_until=now - 5)
    assert run_by_words(replace(r, owner=me)) == f"; run by {me}"
    assert run_by_words(replace(r, owner=live)) == "; run by pid 7 on canary-job-x7k2p"
    assert run_by_words(replace(r, owner=lapsed)).startswith(
        "; nothing runs it: its command (pid 7 on canary-job-x7k2p, elsewhere: it cannot be "
        "asked from here) holds it no more, its lease over since "
    )
    assert run_by_words(replace(r, owner=None)) == (
        "; nothing runs it; run the same command again to resume it, or l4proxy canary "
        "promote|abort bootcamp"
    )
    assert run_by_words(replace(r, phase="promoted", owner=lapsed)) == ""


def test_resume_takes_a_wait_up_where_its_plan_is_the_runs() -> None:
    """resume() of a waiting rollout: the same plan resumes it (its
    checksum, failed checks and hold kept, still waiting); other steps,
    other versions or --restart start a new rollout."""
    from dataclasses import replace

    from l4proxy.canary._analysis import Hold, Policy, resume, waiting

    policy = Policy(steps=(10, 100))
    new = resume(policy, "bootcamp", "v1", "v2", None, 1.0).rollout
    saved = replace(waiting(new), failed_checks=1, hold=Hold("pre-rollout", "smoke: 500", 2.0))
    ev = resume(policy, "bootcamp", "v1", "v2", saved, 9.0)
    assert (ev.kind, ev.rollout) == ("resume", replace(saved, judged=9.0))
    for other in (
        resume(Policy(steps=(20, 100)), "bootcamp", "v1", "v2", saved, 9.0),
        resume(policy, "bootcamp", "v1", "v3", saved, 9.0),
        resume(policy, "bootcamp", "v1", "v2", saved, 9.0, restart=True),
    ):
        assert other.kind == "start"
        assert (other.rollout.failed_checks, other.rollout.hold) == (0, None)
        assert other.rollout.checksum != saved.checksum


def test_a_command_killed_while_confirm_promotion_holds_is_told_and_resumed(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The other wait on a gate: confirm-promotion holds a progressing
    rollout at 50 % and its command is SIGKILLed. status says the rollout
    waits for promotion and that nothing runs it (it said "run by pid N");
    run again, it resumes at 50 %, taken over, the hold kept (Flagger's
    WaitingPromotion), and is promoted once the gate says yes."""
    answers: dict[str, Answer] = {"gate": first(2, 403)}
    given = [("confirm-promotion", "gate")]
    with _killed_while_waiting(tmp_path, answers, given, "gate", "--steps", "50,100") as (
        hooks,
        pid,
    ):
        status = unstamped(_canary("status", "bootcamp", "--rules", str(tmp_path)).stdout)
        assert re.fullmatch(
            r"bootcamp: v1 -> v2 waiting for promotion at 50 % \S+ +step 1/2, 0 failed checks, "
            rf"1 check; held since \S+Z by confirm-promotion {re.escape(hooks.url)}/gate: "
            rf"HTTP 403: said 403; nothing runs it: its command \(pid {pid} on \S+\) is gone; "
            r"run the same command again to resume it, or l4proxy canary promote\|abort "
            r"bootcamp",
            status.strip(),
        ), status
        code = rollout(
            tmp_path, "--steps", "50,100", "--webhook", hooks.hook("confirm-promotion", "gate")
        )
        calls = hooks.of("gate")
    out = unstamped(capsys.readouterr().out)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[1] == "  resumed at 50 % (step 1/2, 0 failed checks so far)"
    assert re.fullmatch(rf"  taken over from pid {pid} on \S+: its process is gone", lines[2])
    assert [c["phase"] for c in calls] == ["Progressing", "WaitingPromotion", "WaitingPromotion"]
    assert _routes(tmp_path) == [("v2", 100)]


def test_a_rollout_resumed_with_other_steps_stays_where_it_stands_and_asks_the_gate(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reviewer's: saved at 30 % (step 3 of 10,20,30,50,100), run again
    with --steps 25,50,75,100. It jumped to 50 % as it resumed, with no
    check and without asking confirm-traffic-increase. It stays at 30 %,
    judged there, and its pass goes on to 50 % through the gate (which
    holds it once here)."""
    from tests.test_canary_ops import REGISTRY, commit

    shutil.copy(REGISTRY, tmp_path)
    commit(tmp_path, 30, steps=(10, 20, 30, 50, 100), step=2, checks=2)
    assert _routes(tmp_path) == [("v1", 70), ("v2", 30)]
    seen: list[object] = []

    def gate(n: int, body: dict[str, Any]) -> int:
        seen.append(_routes(tmp_path))  # what the sidecars route as it is asked
        return 403 if n == 1 else 200

    with HookServer({"gate": gate}).serving() as hooks:
        code = rollout(
            tmp_path,
            "--steps",
            "25,50,75,100",
            "--webhook",
            hooks.hook("confirm-traffic-increase", "gate"),
        )
    out = unstamped(capsys.readouterr().out)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[1:3] == [
        "  resumed at 30 % (step 2/5, 0 failed checks so far)",
        "  the plan changed (it was steps 10,20,30,50,100): it stays at 30 %, judged there, "
        "and a pass goes on to 50 %",
    ], out
    assert lines[3].endswith(
        f"pass -> 50 % held: confirm-traffic-increase {hooks.url}/gate: HTTP 403: said 403; "
        "stays at 30 %"
    ), lines[3]
    assert [line.rsplit("pass -> ", 1)[-1] for line in lines[4:]] == [
        "50 %",
        "75 %",
        "100 %",
        "PROMOTED: v2 takes 100 % of bootcamp",
    ], out
    # each raise asked (30 -> 50 twice, 50 -> 75, 75 -> 100), each at the weight it raises
    assert seen == [
        [("v1", 70), ("v2", 30)],
        [("v1", 70), ("v2", 30)],
        [("v1", 50), ("v2", 50)],
        [("v1", 25), ("v2", 75)],
    ], seen
    state = _state(tmp_path)
    assert state is not None and state["phase"] == "promoted"
    assert state["steps"] == [25, 30, 50, 75, 100]

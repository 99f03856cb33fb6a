"""``l4proxy canary``'s webhooks in a real rollout, where the rollout is
when each is called: the promotion's gate before a last step of 100, the
phases Flagger's payloads carry (Initialized, Waiting, WaitingPromotion),
the rollout's checksum, a start held by its webhooks as the state, status,
abort and --json see it, and what the event webhooks hear (stderr too).
The hooks are real HTTP servers on 127.0.0.1, port 0
(tests/test_canary_webhooks.HookServer)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.test_canary_core import unstamped
from tests.test_canary_webhooks import HookServer, _routes, always, first, rollout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(rules: pathlib.Path) -> dict[str, Any] | None:
    path = rules / ".canary-bootcamp.state.json"
    return json.loads(path.read_text()) if path.exists() else None


def _canary(*words: str) -> subprocess.CompletedProcess[str]:
    """``l4proxy canary WORDS`` as another process (another shell's)."""
    return subprocess.run(
        [sys.executable, "-m", "l4proxy", "canary", *words],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
        timeout=60,
    )


@pytest.fixture(autouse=True)
def _ctrl_c_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt here, as in a shell: an xdist worker
    ignores it (its controller takes Ctrl-C), and a Ctrl-C test would then
    wait at its gate for ever."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _interrupt() -> None:
    """Ctrl-C, to the command running on the main thread (from a hook's
    handler, while the command waits for its answer)."""
    main = threading.main_thread().ident
    assert main is not None
    signal.pthread_kill(main, signal.SIGINT)


def test_confirm_promotion_is_asked_before_a_last_step_of_100_is_written(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Steps ending at 100 (the default, and every example): the raise to
    100 % sends the canary every request, so the gate is asked before it,
    at 50 %. Asked once 100 % had passed, it approved nothing."""
    seen: list[object] = []

    def gate(n: int, body: dict[str, Any]) -> int:
        seen.append(_routes(tmp_path))
        return 403 if n <= 2 else 200

    with HookServer({"gate": gate}).serving() as hooks:
        code = rollout(
            tmp_path, "--steps", "50,100", "--webhook", hooks.hook("confirm-promotion", "gate")
        )
    out = unstamped(capsys.readouterr().out)
    assert seen == [[("v1", 50), ("v2", 50)]] * 3, out
    assert code == 0, out
    held = [line for line in out.splitlines() if " held: " in line]
    assert len(held) == 2
    assert held[0].endswith(
        f"pass -> 100 % (the promotion) held: confirm-promotion {hooks.url}/gate: HTTP 403: "
        "said 403; stays at 50 %"
    )
    assert out.splitlines()[-1].endswith("pass -> PROMOTED: v2 takes 100 % of bootcamp")
    assert _routes(tmp_path) == [("v2", 100)]


def test_a_failed_check_while_the_promotion_is_held_stays_waiting_promotion(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Flagger's WaitingPromotion lasts until the gate opens: a failed
    check meanwhile asks no gate, and the rollout hooks after it still say
    WaitingPromotion (they said Progressing: the hold was forgotten)."""
    answers = {"gate": first(2, 403), "load": lambda n, body: 500 if n == 2 else 200}
    with HookServer(answers).serving() as hooks:
        code = rollout(
            tmp_path,
            "--steps",
            "50",
            "--webhook",
            hooks.hook("rollout", "load"),
            "--webhook",
            hooks.hook("confirm-promotion", "gate"),
        )
    out = unstamped(capsys.readouterr().out)
    assert code == 0, out
    # pass (held), fail, pass (held), pass (promoted)
    assert [b["phase"] for b in hooks.of("load")] == [
        "Progressing",
        "WaitingPromotion",
        "WaitingPromotion",
        "WaitingPromotion",
    ]
    assert [b["phase"] for b in hooks.of("gate")] == [
        "Progressing",
        "WaitingPromotion",
        "WaitingPromotion",
    ]


def test_nothing_is_called_progressing_before_the_start_was_confirmed(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The plan line's event goes out Initialized (nothing started), and no
    rollback hook is asked before the confirm-rollout gate was (Flagger
    asks them in Progressing, Waiting and WaitingPromotion alone): then
    Waiting while it holds, Progressing once the analysis runs."""
    answers = {"gate": first(1, 403), "rb": always(404), "events": always(200)}
    with HookServer(answers).serving() as hooks:
        code = rollout(
            tmp_path,
            "--steps",
            "50",
            "--webhook",
            hooks.hook("confirm-rollout", "gate"),
            "--webhook",
            hooks.hook("rollback", "rb"),
            "--webhook",
            hooks.hook("event", "events"),
        )
    capsys.readouterr()
    assert code == 0
    asked = [name for name, _ in hooks.calls if name != "events"]
    assert asked[:3] == ["gate", "rb", "gate"]  # the gate first, then each interval
    assert [b["phase"] for b in hooks.of("rb")] == ["Waiting", "Progressing"]
    events = hooks.of("events")
    assert events[0]["phase"] == "Initialized"  # the plan line
    assert events[0]["metadata"]["eventMessage"].startswith("bootcamp: v1 -> v2, steps 50")


def test_json_says_nothing_is_written_while_the_start_waits(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The start event, the gate's and the failed pre-rollout check's come
    before anything is written: phase waiting, weight 0, written false
    (they said progressing at the first step's weight)."""
    answers = {"gate": first(1, 403), "smoke": first(1, 500)}
    with HookServer(answers).serving() as hooks:
        code = rollout(
            tmp_path,
            "--json",
            "--steps",
            "10,100",
            "--webhook",
            hooks.hook("confirm-rollout", "gate"),
            "--webhook",
            hooks.hook("pre-rollout", "smoke"),
        )
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    before = events[:5]  # start, waiting, confirmed, pre-rollout fail, pre-rollout pass
    assert [(e["event"], e.get("effect")) for e in before] == [
        ("start", None),
        ("webhook", "waiting"),
        ("webhook", "confirmed"),
        ("check", None),
        ("check", None),
    ]
    assert {e["phase"] for e in before} == {"waiting"}
    assert [e.get("weight") for e in before] == [0, None, None, 0, 0]
    assert [e.get("written") for e in before if e["event"] != "webhook"] == [False] * 3
    assert "written" not in events[5] and events[5]["weight"] == 100  # judged at 10 %, raised


def test_a_rollback_hook_before_the_start_says_not_started(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rollback hook's 2xx while the confirm-rollout gate holds, with no
    pre-rollout hook: the line says v2 never started (it said
    "pre-rollout"), and so does status (it said "at 0 % step 1/2")."""
    answers = {"gate": always(403), "rb": first(1, 404)}
    with HookServer(answers).serving() as hooks:
        code = rollout(
            tmp_path,
            "--steps",
            "10,100",
            "--webhook",
            hooks.hook("confirm-rollout", "gate"),
            "--webhook",
            hooks.hook("rollback", "rb"),
        )
    out = unstamped(capsys.readouterr().out)
    assert code == 1, out
    assert out.splitlines()[-1] == (
        f"  v2 not started                 -> ROLLED BACK: 100 % to v1; webhook rollback "
        f"{hooks.url}/rb: HTTP 200: ok"
    )
    status = _canary("status", "bootcamp", "--rules", str(tmp_path))
    assert unstamped(status.stdout).strip() == (
        "bootcamp: v1 -> v2 rolled back before it started (nothing was routed to v2), "
        f"0 failed checks, 0 checks; webhook rollback {hooks.url}/rb: HTTP 200: ok"
    )


def test_a_start_held_by_its_webhooks_is_in_the_state_and_abort_ends_it(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """While the confirm-rollout gate holds, status (another shell) says
    the rollout waits, on what and since when, and who runs it (it said
    "no rollout"); abort ends it (rolled back, never started) and the
    waiting command stops at its next interval, writing nothing, and
    exits as that end. The post-rollout hook given to both is called
    once: by the command that ran the rollout."""
    said: dict[str, subprocess.CompletedProcess[str]] = {}
    rules = str(tmp_path)

    def gate(n: int, body: dict[str, Any]) -> int:
        if n == 2:  # once its hold is recorded
            said["status"] = _canary("status", "bootcamp", "--rules", rules)
            said["abort"] = _canary("abort", "bootcamp", "--rules", rules, "--webhook", notify_hook)
        elif n > 2:
            _interrupt()  # the abort went unseen: end the wait (the test fails)
        return 403

    with HookServer({"gate": gate, "notify": always(200)}).serving() as hooks:
        notify_hook = hooks.hook("post-rollout", "notify")
        code = rollout(
            tmp_path,
            "--steps",
            "10,100",
            "--webhook",
            hooks.hook("confirm-rollout", "gate"),
            "--webhook",
            notify_hook,
        )
    out = unstamped(capsys.readouterr().out)
    status = unstamped(said["status"].stdout).strip()
    assert said["status"].returncode == 0, said["status"].stderr
    assert re.fullmatch(
        r"bootcamp: v1 -> v2 waiting to start \(steps 10,100; nothing routed to v2 yet\), "
        r"0 failed checks, 0 checks; held since \S+Z by confirm-rollout "
        rf"{re.escape(hooks.url)}/gate: HTTP 403: said 403; run by pid {os.getpid()} on \S+",
        status,
    ), status
    assert said["abort"].returncode == 1, said["abort"].stderr
    assert "post-rollout webhooks: left to the command that runs the rollout" in (
        said["abort"].stdout
    )
    assert code == 1, out
    assert out.splitlines()[-2] == (
        "  v2 not started                 -> ROLLED BACK: 100 % to v1; aborted by hand before "
        "it started (ended by hand)"
    )
    assert [b["phase"] for b in hooks.of("notify")] == ["Failed"]
    assert len(hooks.of("gate")) == 2  # nothing asked after the abort
    state = _state(tmp_path)
    assert state is not None
    assert (state["phase"], state["started"], state["owner"], state["reason"]) == (
        "rolled_back",
        False,
        None,
        "aborted by hand before it started",
    )
    assert _routes(tmp_path) == [("v1", 100)]  # the abort's


def test_status_says_the_promotion_is_held(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """While confirm-promotion holds, status says so (Flagger's
    WaitingPromotion), by what and since when."""
    said: list[str] = []

    def gate(n: int, body: dict[str, Any]) -> int:
        if n == 2:
            said.append(_canary("status", "bootcamp", "--rules", str(tmp_path)).stdout)
        return 403 if n <= 2 else 200

    with HookServer({"gate": gate}).serving() as hooks:
        code = rollout(
            tmp_path, "--steps", "50,100", "--webhook", hooks.hook("confirm-promotion", "gate")
        )
    capsys.readouterr()
    assert code == 0
    assert re.fullmatch(
        r"bootcamp: v1 -> v2 waiting for promotion at 50 % \S+ +step 1/2, 0 failed checks, "
        r"1 check; held since \S+Z by confirm-promotion "
        rf"{re.escape(hooks.url)}/gate: HTTP 403: said 403; run by pid \d+ on \S+",
        unstamped(said[0]).strip(),
    ), said[0]


def test_ctrl_c_while_the_start_waits_puts_the_state_back_and_tells_the_event_hooks(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The waiting rollout was recorded; interrupted, nothing of it stays
    (there was no state before), and the event hooks hear the warning the
    command prints on stderr, as a Warning."""
    seen: list[object] = []

    def gate(n: int, body: dict[str, Any]) -> int:
        if n == 2:
            seen.append(_state(tmp_path))
            _interrupt()
        return 403

    with HookServer({"gate": gate, "events": always(200)}).serving() as hooks:
        code = rollout(
            tmp_path,
            "--webhook",
            hooks.hook("confirm-rollout", "gate"),
            "--webhook",
            hooks.hook("event", "events"),
        )
    err = capsys.readouterr().err
    assert code == 3, err
    assert isinstance(seen[0], dict) and seen[0]["phase"] == "waiting"
    assert _state(tmp_path) is None and _routes(tmp_path) is None
    told = hooks.of("events")[-1]["metadata"]
    assert told["eventType"] == "Warning"
    assert told["eventMessage"].startswith(
        "interrupted before the rollout of bootcamp started (its webhooks held it); nothing written"
    )


def test_the_event_hooks_hear_a_rollout_stopped_because_it_changed_under_it(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its state removed meanwhile: the command stops without writing
    (exit 2), which it says on stderr; the event hooks hear it too."""

    def load(n: int, body: dict[str, Any]) -> int:
        if n == 2:
            (tmp_path / ".canary-bootcamp.state.json").unlink()
        return 200

    with HookServer({"load": load, "events": always(200)}).serving() as hooks:
        code = rollout(
            tmp_path,
            "--steps",
            "10,50,100",
            "--webhook",
            hooks.hook("rollout", "load"),
            "--webhook",
            hooks.hook("event", "events"),
        )
    err = capsys.readouterr().err
    assert code == 2, err
    told = hooks.of("events")[-1]["metadata"]
    assert (told["eventType"], told["eventMessage"]) == (
        "Warning",
        "the rollout of bootcamp was changed by someone else (its state was removed); "
        "stopped without writing",
    )


def _left_at_50(rules: pathlib.Path, hooks: HookServer) -> int:
    """A rollout left at its first weight, 50 % (Ctrl-C, the weights left),
    *hooks*' event hook given, its rollout hook /load (which interrupts)."""
    return rollout(
        rules,
        "--on-abort",
        "leave",
        "--steps",
        "50,100",
        "--webhook",
        hooks.hook("rollout", "load"),
        "--webhook",
        hooks.hook("event", "events"),
    )


def _interrupting(n: int, body: dict[str, Any]) -> int:
    _interrupt()
    return 200


def test_the_event_hooks_hear_a_rollout_left_at_its_weight(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Interrupted, the weights left: the warning that says so on stderr
    goes to the event hooks too, a Warning."""
    with HookServer({"load": _interrupting, "events": always(200)}).serving() as hooks:
        code = _left_at_50(tmp_path, hooks)
    capsys.readouterr()
    assert code == 3
    left = hooks.of("events")[-1]["metadata"]
    assert (left["eventType"], left["eventMessage"]) == (
        "Warning",
        "interrupted; v2 keeps 50 %, and nothing judges v2 now: run the same command "
        "again to resume, or l4proxy canary promote|abort bootcamp",
    )


def test_abort_calls_the_post_rollout_and_event_hooks_given_it(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rollout left at its weight, then aborted from another shell with
    hooks (promote's are alike): its post-rollout hook hears the end once
    (not when it is said again), with the rollout's checksum; its event
    hook hears what abort prints, stderr's warning and the line."""
    answers = {"load": _interrupting, "events": always(200), "notify": always(200)}
    with HookServer(answers).serving() as hooks:
        assert _left_at_50(tmp_path, hooks) == 3
        told = len(hooks.of("events"))
        given = ["--webhook", hooks.hook("post-rollout", "notify")]
        given += ["--webhook", hooks.hook("event", "events")]
        for _ in range(2):  # the second says it again
            aborted = _canary("abort", "bootcamp", "--rules", str(tmp_path), *given)
            assert aborted.returncode == 1, aborted.stderr
    capsys.readouterr()
    (notified,) = hooks.of("notify")
    assert notified["phase"] == "Failed"
    assert notified["checksum"] == hooks.of("load")[0]["checksum"]
    heard = [
        (e["metadata"]["eventType"], e["metadata"]["eventMessage"]) for e in hooks.of("events")
    ]
    first_abort = heard[told:][:2]  # its warning (stderr), then its line
    assert first_abort[0] == (
        "Warning",
        "warning: the abort is written, not checked live (no --metrics or --prometheus: give "
        "one to wait until the sidecars serve it)",
    )
    assert first_abort[1][0] == "Warning"
    assert first_abort[1][1].startswith("bootcamp: v1 -> v2 rolled back at 0 %")


def test_every_call_of_a_rollout_carries_its_checksum_and_a_new_rollout_another(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Flagger's payload has a checksum naming the Canary's configuration:
    here the rollout's, the same in each call of it and in its state, and
    another for the next rollout (--restart after a rollback)."""
    checksums: list[set[str]] = []
    for load in (always(500), always(200)):
        with HookServer({"load": load, "notify": always(200)}).serving() as hooks:
            rollout(
                tmp_path,
                "--threshold",
                "1",
                "--steps",
                "50",
                "--restart",
                "--webhook",
                hooks.hook("rollout", "load"),
                "--webhook",
                hooks.hook("post-rollout", "notify"),
            )
        calls = hooks.of("load") + hooks.of("notify")
        checksums.append({b["checksum"] for b in calls})
        state = _state(tmp_path)
        assert state is not None and checksums[-1] == {state["checksum"]}
    capsys.readouterr()
    assert all(len(c) == 1 and re.fullmatch(r"[0-9a-f]{10}", next(iter(c))) for c in checksums)
    assert checksums[0] != checksums[1]


def test_json_shows_no_path_of_a_named_hook_and_no_query_of_any(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A chat's webhook URL holds its secret in the path or the query: the
    --json events list and report the hooks without them (scheme and host,
    a name, and an unnamed hook's path)."""
    hooks_file = tmp_path.parent / f"{tmp_path.name}-hooks.yaml"
    answers = {"SECRET?token=abc": always(200), "load?token=xyz": always(200)}
    with HookServer(answers).serving() as hooks:
        hooks_file.write_text(
            f"webhooks:\n  - name: slack\n    type: event\n    url: {hooks.url}/SECRET?token=abc\n"
        )
        code = rollout(
            tmp_path,
            "--json",
            "--steps",
            "50",
            "--webhook",
            hooks.hook("rollout", "load?token=xyz"),
            "--webhooks",
            str(hooks_file),
        )
    out = capsys.readouterr().out
    assert code == 0
    assert len(hooks.of("SECRET?token=abc")) == 2  # it was called
    assert "SECRET" not in out and "token" not in out
    start = json.loads(out.splitlines()[0])
    assert [w["url"] for w in start["webhooks"]] == [f"{hooks.url}/load", hooks.url]

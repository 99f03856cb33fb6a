"""``l4proxy canary``'s gates across a resume: a rollout at a last step of
100 whose raise no confirm-promotion webhook confirmed (a state an earlier
version wrote, which asked the gate only once 100 % had passed; a run
without the hook) asks it before it promotes; one whose raise it
confirmed is not asked again. The hooks are real HTTP servers on
127.0.0.1, port 0 (tests/test_canary_webhooks.HookServer)."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import pytest

from tests.test_canary_core import unstamped
from tests.test_canary_webhooks import HookServer, _routes, always, first, rollout
from tests.test_canary_webhooks_phases import _ctrl_c_raises, _interrupt, _state

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

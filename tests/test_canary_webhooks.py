"""``l4proxy canary``'s webhooks (Flagger's analysis.webhooks): the decisions
on their answers (l4proxy.canary._analysis, _webhooks), table-driven."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from l4proxy.canary._analysis import (
    Check,
    Policy,
    Rollout,
    advance,
    first_gate,
    gate_of,
    resume,
    with_hook_failures,
)
from l4proxy.canary._webhooks import (
    DEFAULT_TIMEOUT,
    HookResult,
    Webhook,
    WebhookError,
    event_payload,
    parse_file,
    parse_option,
    payload,
    post,
)

PASS = Check("pass", 100, 100.0, 12.0)
FAIL = Check("fail", 100, 80.0, 12.0, ("success rate 80.0 % < 99 %",))
HALT = Check("halt", 3, 100.0, 12.0, ("3 canary requests < 10 (--min-requests)",))


def _at(policy: Policy, step: int) -> Rollout:
    """A progressing rollout of *policy* at its *step*-th stage."""
    r = resume(policy, "svc", "v1", "v2", None, 0.0).rollout
    stages = policy.stages
    return Rollout("svc", "v1", "v2", step=step, weight=stages[step], steps=stages, match=r.match)


WEIGHTED = Policy(steps=(10, 50, 100), threshold=2)
MIRRORED = Policy(steps=(50,), mirror=2, threshold=2)


@pytest.mark.parametrize(
    ("policy", "step", "result", "gate"),
    [
        (WEIGHTED, 0, PASS, "confirm-traffic-increase"),  # 10 -> 50
        (WEIGHTED, 1, PASS, "confirm-traffic-increase"),  # 50 -> 100
        (WEIGHTED, 2, PASS, "confirm-promotion"),  # a pass at the last step promotes
        (WEIGHTED, 1, FAIL, ""),
        (WEIGHTED, 1, HALT, ""),
        (MIRRORED, 0, PASS, ""),  # mirror 1 -> mirror 2: no weight moves
        (MIRRORED, 1, PASS, "confirm-traffic-increase"),  # mirror -> the first live weight
        (MIRRORED, 2, PASS, "confirm-promotion"),
    ],
)
def test_the_gate_a_pass_goes_through(policy: Policy, step: int, result: Check, gate: str) -> None:
    assert gate_of(policy, _at(policy, step), result) == gate


def test_the_gate_of_an_ab_test_is_the_promotion_alone() -> None:
    from l4proxy.canary._analysis import HeaderMatch

    ab = Policy(steps=(5,), match=(HeaderMatch("x-canary", "exact", "1"),), iterations=3)
    assert [gate_of(ab, _at(ab, i), PASS) for i in range(3)] == ["", "", "confirm-promotion"]


def test_the_first_gate_is_a_weight_only() -> None:
    """A new rollout's first stage is the canary's first live weight,
    unless it is mirrored (no client gets the canary's answers)."""
    assert first_gate(_at(WEIGHTED, 0)) == "confirm-traffic-increase"
    assert first_gate(_at(MIRRORED, 0)) == ""


def test_a_held_pass_is_judged_and_stays_at_its_stage() -> None:
    """A gate that holds: the pass is counted (the progress deadline is
    kept away) and the rollout neither moves on nor promotes; a fail while
    it holds counts toward the threshold as any."""
    r = _at(WEIGHTED, 2)
    ev = advance(WEIGHTED, r, PASS, 50.0, held="confirm-promotion gate: HTTP 403")
    assert (ev.kind, ev.rollout.step, ev.rollout.weight, ev.rollout.phase) == (
        "check",
        2,
        100,
        "progressing",
    )
    assert (ev.rollout.checks, ev.rollout.judged, ev.held) == (
        1,
        50.0,
        "confirm-promotion gate: HTTP 403",
    )
    assert advance(WEIGHTED, r, PASS, 50.0).kind == "promoted"  # not held: promoted
    ev = advance(WEIGHTED, ev.rollout, FAIL, 60.0, held="")
    ev = advance(WEIGHTED, ev.rollout, FAIL, 70.0, held="")
    assert ev.kind == "rolled_back"


@pytest.mark.parametrize(
    ("graded", "verdict", "reasons"),
    [
        (PASS, "fail", ("rollout hook: HTTP 500",)),
        # a halt is judged: the hook failed whatever the traffic
        (HALT, "fail", ("rollout hook: HTTP 500",)),
        (FAIL, "fail", ("rollout hook: HTTP 500", "success rate 80.0 % < 99 %")),
    ],
)
def test_a_rollout_hook_failure_fails_the_check(
    graded: Check, verdict: str, reasons: tuple[str, ...]
) -> None:
    out = with_hook_failures(graded, ("rollout hook: HTTP 500",))
    assert (out.verdict, out.reasons, out.requests) == (verdict, reasons, graded.requests)
    assert with_hook_failures(graded, ()) is graded


# -- declaring them --------------------------------------------------------------------
CANARY = """\
apiVersion: flagger.app/v1beta1
kind: Canary
metadata: {name: podinfo, namespace: test}
spec:
  analysis:
    interval: 1m
    webhooks:
      - name: "load test"
        url: http://flagger-loadtester.test/
        timeout: 1m30s
        metadata: {cmd: "hey -z 1m http://podinfo-canary.test:9898/"}
      - name: gate
        type: confirm-promotion
        url: http://flagger-loadtester.test/gate/check
        retries: 2
        muteAlert: true
"""


def test_a_flagger_canary_gives_its_webhooks() -> None:
    hooks = parse_file(CANARY, "canary.yaml")
    assert hooks == (
        Webhook(
            "load test",
            "rollout",  # Flagger: no type is a rollout hook
            "http://flagger-loadtester.test/",
            90.0,
            (("cmd", "hey -z 1m http://podinfo-canary.test:9898/"),),
        ),
        Webhook(
            "gate",
            "confirm-promotion",
            "http://flagger-loadtester.test/gate/check",
            DEFAULT_TIMEOUT,
            retries=2,
        ),
    )
    # the list alone, and under webhooks, say the same
    listed = yaml.safe_load(CANARY)["spec"]["analysis"]["webhooks"]
    assert parse_file(yaml.safe_dump(listed), "x") == hooks
    assert parse_file(yaml.safe_dump({"webhooks": listed}), "x") == hooks


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"url": "http://h/"}, "webhooks[0]: name is required"),
        ({"name": "a"}, 'webhooks[0] ("a"): url is required'),
        ({"name": "a", "url": "ftp://h/"}, "is not an http:// or https:// URL"),
        ({"name": "a", "url": "http://h/", "type": "pre"}, "type 'pre' is not one of"),
        ({"name": "a", "url": "http://h/", "timeout": "10"}, "timeout '10': a duration"),
        ({"name": "a", "url": "http://h/", "timeout": "0s"}, "more than 0"),
        ({"name": "a", "url": "http://h/", "metadata": {"n": 1}}, "is not a string"),
        ({"name": "a", "url": "http://h/", "metdata": {}}, "no field 'metdata'"),
    ],
)
def test_a_webhook_that_cannot_be_used_is_named(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(WebhookError, match=r"^hooks\.yaml: webhooks") as exc:
        parse_file(yaml.safe_dump([entry]), "hooks.yaml")
    assert message in str(exc.value)


def test_the_option_is_type_equals_url() -> None:
    assert parse_option("rollback=http://h:8080/rb") == Webhook("", "rollback", "http://h:8080/rb")
    with pytest.raises(WebhookError, match="expected TYPE=URL"):
        parse_option("http://h/")


def test_the_payload_is_flaggers() -> None:
    hook = Webhook("n", "rollout", "http://h/", metadata=(("cmd", "hey"), ("eventType", "x")))
    assert payload(hook, "bootcamp", "shop", "Progressing") == {
        "name": "bootcamp",
        "namespace": "shop",
        "phase": "Progressing",
        "metadata": {"cmd": "hey", "eventType": "x"},
    }
    # an event's: the event's keys, and the hook's where they do not clash
    assert event_payload(hook, "bootcamp", "shop", "Failed", "rolled back", True, 12.5) == {
        "name": "bootcamp",
        "namespace": "shop",
        "phase": "Failed",
        "metadata": {
            "eventMessage": "rolled back",
            "eventType": "Warning",
            "timestamp": "12500",
            "cmd": "hey",
        },
    }


@pytest.mark.parametrize(
    ("statuses", "retries", "tries", "ok"),
    [
        ([503, 200], 1, 2, True),  # a 5xx is tried again
        ([None, 429, 200], 2, 3, True),  # no answer, 429 too
        ([503, 200], 0, 1, False),  # no retries: the first answer
        ([501, 200], 3, 1, False),  # 501 is never tried again
        ([404, 200], 3, 1, False),  # nor a 4xx
    ],
)
def test_retries_are_go_retryablehttps(
    statuses: list[int | None], retries: int, tries: int, ok: bool
) -> None:
    hook = Webhook("n", "rollout", "http://h/", retries=retries)
    answers = iter(statuses)
    slept: list[float] = []
    result = post(hook, {}, lambda h, body: HookResult(h, next(answers)), slept.append)
    assert (result.tries, result.ok) == (tries, ok)
    assert slept == [1.0, 2.0][: tries - 1]  # 1 s, doubled

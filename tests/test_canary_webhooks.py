"""``l4proxy canary``'s webhooks (Flagger's analysis.webhooks): the decisions
on their answers (l4proxy.canary._analysis, _webhooks), table-driven, and
each type's effect on a real rollout, the hooks real HTTP servers on
127.0.0.1 (port 0) answering programmed status codes."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import pathlib
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import yaml

from l4proxy.canary._analysis import (
    Check,
    Hold,
    Policy,
    Rollout,
    advance,
    first_gates,
    gates_of,
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
from tests.conftest import _skip_or_fail
from tests.test_canary_core import _fake_prometheus, _healthy, unstamped

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
RAISE = ("confirm-traffic-increase",)
PROMOTION = ("confirm-traffic-increase", "confirm-promotion")


@pytest.mark.parametrize(
    ("policy", "step", "result", "gates"),
    [
        (WEIGHTED, 0, PASS, RAISE),  # 10 -> 50
        # 50 -> 100, a last step of 100: every request to the canary, the
        # promotion in all but name, is confirmed before it is written
        (WEIGHTED, 1, PASS, PROMOTION),
        # at 100, its raise confirmed by no confirm-promotion webhook (a
        # state from before it was asked there): asked before the promotion
        (WEIGHTED, 2, PASS, ("confirm-promotion",)),
        (WEIGHTED, 1, FAIL, ()),
        (WEIGHTED, 1, HALT, ()),
        (MIRRORED, 0, PASS, ()),  # mirror 1 -> mirror 2: no weight moves
        (MIRRORED, 1, PASS, RAISE),  # mirror -> the first live weight
        (MIRRORED, 2, PASS, PROMOTION),  # 50 -> promoted: a raise, and the promotion
    ],
)
def test_the_gates_a_pass_goes_through(
    policy: Policy, step: int, result: Check, gates: tuple[str, ...]
) -> None:
    assert gates_of(policy, _at(policy, step), result) == gates


def test_a_raise_to_100_confirmed_is_not_asked_again() -> None:
    """At a last step of 100 whose raise a confirm-promotion webhook
    confirmed, the pass promotes with no gate; the raise records it, and
    only where the gate's webhooks said yes (none called: not)."""
    at_50 = _at(WEIGHTED, 1)
    assert gates_of(WEIGHTED, replace(_at(WEIGHTED, 2), promotion_confirmed=True), PASS) == ()
    raised = advance(WEIGHTED, at_50, PASS, 1.0, promotion_confirmed=True).rollout
    assert (raised.weight, raised.promotion_confirmed) == (100, True)
    assert gates_of(WEIGHTED, raised, PASS) == ()
    unconfirmed = advance(WEIGHTED, at_50, PASS, 1.0).rollout
    assert (unconfirmed.weight, unconfirmed.promotion_confirmed) == (100, False)
    assert gates_of(WEIGHTED, unconfirmed, PASS) == ("confirm-promotion",)
    # kept in the state; a state without it (an earlier version's): not confirmed
    assert Rollout.from_json(raised.to_json()) == raised
    old = raised.to_json()
    del old["promotion_confirmed"]
    assert Rollout.from_json(old).promotion_confirmed is False


def test_the_gate_of_an_ab_test_is_the_promotion_alone() -> None:
    from l4proxy.canary._analysis import HeaderMatch

    ab = Policy(steps=(5,), match=(HeaderMatch("x-canary", "exact", "1"),), iterations=3)
    assert [gates_of(ab, _at(ab, i), PASS) for i in range(3)] == [(), (), ("confirm-promotion",)]


def test_the_first_gates_are_a_weights() -> None:
    """A new rollout's first stage is the canary's first live weight,
    unless it is mirrored (no client gets the canary's answers); a first
    stage of 100 is the promotion too."""
    assert first_gates(_at(WEIGHTED, 0)) == RAISE
    assert first_gates(_at(MIRRORED, 0)) == ()
    assert first_gates(_at(Policy(steps=(100,)), 0)) == PROMOTION


def test_a_held_pass_is_judged_and_stays_at_its_stage() -> None:
    """A gate that holds: the pass is counted (the progress deadline is
    kept away) and the rollout neither moves on nor promotes, the hold in
    it since the gate first held; a fail while it holds counts toward the
    threshold as any, and keeps the hold (Flagger's WaitingPromotion)."""
    r = _at(WEIGHTED, 1)
    held = Hold("confirm-promotion", "confirm-promotion gate: HTTP 403", 50.0)
    ev = advance(WEIGHTED, r, PASS, 50.0, held=held)
    assert (ev.kind, ev.rollout.step, ev.rollout.weight, ev.rollout.phase) == (
        "check",
        1,
        50,
        "progressing",
    )
    assert (ev.rollout.checks, ev.rollout.judged, ev.held, ev.rollout.hold) == (
        1,
        50.0,
        "confirm-promotion gate: HTTP 403",
        held,
    )
    assert advance(WEIGHTED, r, PASS, 50.0).rollout.weight == 100  # not held: raised
    # held again: since the first time; and only the promotion's gate is asked
    again = advance(WEIGHTED, ev.rollout, PASS, 60.0, held=replace(held, since=60.0))
    assert again.rollout.hold == held
    assert gates_of(WEIGHTED, again.rollout, PASS) == ("confirm-promotion",)
    ev = advance(WEIGHTED, again.rollout, FAIL, 70.0)
    assert ev.rollout.hold == held
    ev = advance(WEIGHTED, ev.rollout, FAIL, 80.0)
    assert (ev.kind, ev.rollout.hold) == ("rolled_back", None)


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
    assert payload(hook, "bootcamp", "shop", "Progressing", "85d557f47b") == {
        "name": "bootcamp",
        "namespace": "shop",
        "phase": "Progressing",
        "checksum": "85d557f47b",
        "metadata": {"cmd": "hey", "eventType": "x"},
    }
    # an event's: the event's keys, and the hook's where they do not clash
    got = event_payload(hook, "bootcamp", "shop", "Failed", "85d", "rolled back", True, 12.5)
    assert got == {
        "name": "bootcamp",
        "namespace": "shop",
        "phase": "Failed",
        "checksum": "85d",
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


# -- real rollouts ------------------------------------------------------------------------
Answer = Callable[[int, dict[str, Any]], "int | None"]


class HookServer:
    """Webhooks on 127.0.0.1: a POST to /NAME is answered by
    ``answers[NAME](n, body)`` (n: the calls to NAME, from 1): a status, or
    None for no answer at all until the server stops (a hook that times
    out). Every call is kept, in order, as (NAME, body)."""

    def __init__(self, answers: dict[str, Answer]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.url = ""

    def of(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [body for n, body in self.calls if n == name]

    def hook(self, kind: str, name: str) -> str:
        """``--webhook TYPE=URL`` of /NAME here."""
        return f"{kind}={self.url}/{name}"

    @contextlib.contextmanager
    def serving(self) -> Iterator[HookServer]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                name = self.path.lstrip("/")
                with server.lock:
                    server.calls.append((name, body))
                    n = sum(1 for k, _ in server.calls if k == name)
                status = server.answers[name](n, body)
                if status is None:
                    server.stopping.wait(10)
                    return
                text = b"ok" if status < 300 else f"said {status}\n".encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, *a: object) -> None:
                pass

        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{srv.server_address[1]}"
        try:
            yield self
        finally:
            self.stopping.set()
            srv.shutdown()
            srv.server_close()


def always(status: int) -> Answer:
    return lambda n, body: status


def first(k: int, status: int, then: int = 200) -> Answer:
    """*status* for the first *k* calls, then *then*."""
    return lambda n, body: status if n <= k else then


def _routes(rules: pathlib.Path) -> list[tuple[str, int]] | None:
    """The canary document's (version, weight) routes; None: not written."""
    doc = rules / "canary-bootcamp.yaml"
    if not doc.exists():
        return None
    return [
        (x["labels"]["version"], x["weight"])
        for x in yaml.safe_load(doc.read_text())["spec"]["route"]
    ]


def rollout(rules: pathlib.Path, *options: str, success: str = "100") -> int:
    """A rollout of bootcamp from v1 to v2 in *rules* (tests/data/rules'
    registry), every interval 0.05 s and judged on a Prometheus whose
    numbers are healthy (a success rate of *success*)."""
    from l4proxy.cli import main

    here = os.path.dirname(__file__)
    shutil.copy(os.path.join(here, "data", "rules", "registry.yaml"), rules)
    argv = ["canary", "bootcamp", "--stable", "v1", "--canary", "v2", "--rules", str(rules)]
    with _fake_prometheus(lambda n, path, q: _healthy(q, success=success)) as url:
        return main([*argv, "--prometheus", url, "--interval", "0.05", *options])


def test_a_confirm_rollout_gate_holds_the_start_until_it_answers_2xx(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing is written while it says no (Flagger's manual approval),
    and it is asked every interval; once it says yes, the rollout starts."""
    seen: list[object] = []

    def gate(n: int, body: dict[str, Any]) -> int:
        seen.append(_routes(tmp_path))  # what the sidecars route as it is asked
        return 403 if n <= 2 else 200

    with HookServer({"gate": gate}).serving() as hooks:
        code = rollout(
            tmp_path, "--steps", "50", "--webhook", hooks.hook("confirm-rollout", "gate")
        )
    out = unstamped(capsys.readouterr().out)
    assert code == 0, out  # promoted
    assert seen == [None, None, None]  # nothing written until it said yes
    assert [b["phase"] for b in hooks.of("gate")] == ["Initialized", "Waiting", "Waiting"]
    checksum = hooks.of("gate")[0]["checksum"]
    assert hooks.of("gate")[0] == {
        "name": "bootcamp",
        "namespace": "default",
        "phase": "Initialized",
        "checksum": checksum,
        "metadata": {},
    }
    assert [b["checksum"] for b in hooks.of("gate")] == [checksum] * 3
    lines = out.splitlines()
    assert lines[1].startswith(
        f"  v2 waiting: confirm-rollout {hooks.url}/gate: HTTP 403: said 403"
    )
    assert "nothing written yet; asked again every 0.05 s" in lines[1]
    assert lines[2].startswith(f"  v2 confirmed: confirm-rollout {hooks.url}/gate: HTTP 200")
    assert _routes(tmp_path) == [("v2", 100)]


def test_a_pre_rollout_failure_is_a_failed_check_and_threshold_of_them_roll_back(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing goes to the canary before it passes; each failure counts
    toward --threshold, which rolls the rollout back (written: every
    request to stable), and post-rollout hooks hear of it."""
    answers = {"smoke": always(500), "notify": always(200)}
    with HookServer(answers).serving() as hooks:
        code = rollout(
            tmp_path,
            "--threshold",
            "2",
            "--webhook",
            hooks.hook("pre-rollout", "smoke"),
            "--webhook",
            hooks.hook("post-rollout", "notify"),
        )
    out = unstamped(capsys.readouterr().out)
    assert code == 1, out  # rolled back
    assert len(hooks.of("smoke")) == 2
    assert [b["phase"] for b in hooks.of("notify")] == ["Failed"]
    lines = out.splitlines()
    assert lines[1] == (
        f"  v2 pre-rollout                 fail (1/2): pre-rollout {hooks.url}/smoke: HTTP 500: "
        "said 500; nothing routed to v2 yet"
    )
    assert lines[2].startswith("  v2 pre-rollout                 fail -> ROLLED BACK: 100 % to v1;")
    assert _routes(tmp_path) == [("v1", 100)]
    state = json.loads((tmp_path / ".canary-bootcamp.state.json").read_text())
    assert (state["phase"], state["failed_checks"]) == ("rolled_back", 2)


def test_a_pre_rollout_failure_counts_on_into_the_analysis(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It fails once, then passes: the rollout starts then (not before),
    with that failed check counted; one more (a rollout hook's) reaches
    --threshold 2."""
    seen: list[object] = []

    def smoke(n: int, body: dict[str, Any]) -> int:
        seen.append(_routes(tmp_path))
        return 500 if n == 1 else 200

    with HookServer({"smoke": smoke, "load": first(1, 200, 500)}).serving() as hooks:
        code = rollout(
            tmp_path,
            "--threshold",
            "2",
            "--steps",
            "50,100",
            "--webhook",
            hooks.hook("pre-rollout", "smoke"),
            "--webhook",
            hooks.hook("rollout", "load"),
        )
    out = unstamped(capsys.readouterr().out)
    assert (code, seen) == (1, [None, None]), out
    assert len(hooks.of("load")) == 2  # a pass at 50 %, then the failure that rolls back
    assert "fail -> ROLLED BACK: 100 % to v1; 2 failed checks (--threshold 2): rollout " in out


def test_a_rollout_hook_failure_fails_its_interval_and_threshold_of_them_roll_back(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The numbers are healthy: the hook's 500 alone fails each check."""
    with HookServer({"load": always(500)}).serving() as hooks:
        code = rollout(
            tmp_path,
            "--threshold",
            "2",
            "--steps",
            "50,100",
            "--webhook",
            hooks.hook("rollout", "load"),
        )
    out = unstamped(capsys.readouterr().out)
    assert code == 1, out
    lines = out.splitlines()
    assert lines[1].endswith(
        f"fail (1/2): rollout {hooks.url}/load: HTTP 500: said 500; stays at 50 %"
    ), lines[1]
    assert "success 100.0 % >= 99 ok" in lines[1]  # the numbers passed
    assert len(hooks.of("load")) == 2
    assert _routes(tmp_path) == [("v1", 100)]


def test_a_rollout_hook_that_times_out_fails_its_interval(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No answer within the hook's timeout (a file gives it) is a failure."""
    hooks_file = tmp_path.parent / f"{tmp_path.name}-hooks.yaml"
    with HookServer({"slow": lambda n, body: None}).serving() as hooks:
        hooks_file.write_text(
            yaml.safe_dump([{"name": "slow", "url": f"{hooks.url}/slow", "timeout": "200ms"}])
        )
        code = rollout(tmp_path, "--threshold", "1", "--webhooks", str(hooks_file))
    out = unstamped(capsys.readouterr().out)
    assert code == 1, out
    assert (
        'fail -> ROLLED BACK: 100 % to v1; 1 failed check (--threshold 1): rollout "slow": ' in out
    )
    assert "no answer within 0.2 s" in out
    assert len(hooks.of("slow")) == 1


def test_a_rollback_hook_that_answers_2xx_rolls_back_at_once(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Asked before the start and before each verdict: 404 says nothing,
    200 rolls back, and that interval is never judged (cut short, as an
    abort)."""
    with HookServer({"rb": first(2, 404), "notify": always(200)}).serving() as hooks:
        code = rollout(
            tmp_path,
            "--steps",
            "20,40,60,100",
            "--webhook",
            hooks.hook("rollback", "rb"),
            "--webhook",
            hooks.hook("post-rollout", "notify"),
        )
    out = unstamped(capsys.readouterr().out)
    assert code == 1, out
    assert len(hooks.of("rb")) == 3  # the start, 20 % (judged, pass), 40 %
    last = out.splitlines()[-2]  # (then the post-rollout hook's line)
    assert last.startswith("  v2  40 % ")
    assert last.endswith(
        f"interval cut short, not judged  -> ROLLED BACK: 100 % to v1; webhook rollback "
        f"{hooks.url}/rb: HTTP 200: ok"
    )
    assert [b["phase"] for b in hooks.of("notify")] == ["Failed"]
    assert _routes(tmp_path) == [("v1", 100)]


def test_a_confirm_promotion_gate_holds_the_promotion_and_the_checks_go_on(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each pass at the last step asks it; while it says no, the canary
    stays at its weight (no promotion written), judged every interval."""
    seen: list[object] = []

    def gate(n: int, body: dict[str, Any]) -> int:
        seen.append(_routes(tmp_path))
        return 403 if n <= 2 else 200

    with HookServer({"gate": gate, "load": always(200)}).serving() as hooks:
        code = rollout(
            tmp_path,
            "--steps",
            "50",
            "--webhook",
            hooks.hook("confirm-promotion", "gate"),
            "--webhook",
            hooks.hook("rollout", "load"),
        )
    out = unstamped(capsys.readouterr().out)
    assert code == 0, out
    assert seen == [[("v1", 50), ("v2", 50)]] * 3
    held = [line for line in out.splitlines() if "held" in line]
    assert len(held) == 2
    assert held[0].endswith(
        f"pass -> promotion held: confirm-promotion {hooks.url}/gate: HTTP 403: said 403; "
        "stays at 50 %"
    )
    # the rollout hooks went on, the second and third while it was held
    assert [b["phase"] for b in hooks.of("load")] == [
        "Progressing",
        "WaitingPromotion",
        "WaitingPromotion",
    ]
    assert _routes(tmp_path) == [("v2", 100)]


def test_a_confirm_traffic_increase_gate_holds_each_raise_of_the_weight(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Asked before the first weight (nothing written while it holds) and
    before each raise, the promotion's too (Flagger asks it there, before
    confirm-promotion); a no keeps the weight, judged again."""
    seen: list[object] = []

    def gate(n: int, body: dict[str, Any]) -> int:
        seen.append(_routes(tmp_path))
        return 403 if n in (1, 3) else 200

    with HookServer({"gate": gate}).serving() as hooks:
        code = rollout(
            tmp_path,
            "--steps",
            "20,60",
            "--webhook",
            hooks.hook("confirm-traffic-increase", "gate"),
        )
    out = unstamped(capsys.readouterr().out)
    assert code == 0, out
    assert seen == [
        None,  # 0 -> 20: held, nothing written
        None,  # said yes
        [("v1", 80), ("v2", 20)],  # 20 -> 60: held
        [("v1", 80), ("v2", 20)],  # said yes
        [("v1", 40), ("v2", 60)],  # 60 -> the promotion's 100 %
    ]
    assert "pass -> 60 % held: confirm-traffic-increase " in out
    assert _routes(tmp_path) == [("v2", 100)]


def test_a_post_rollout_failure_is_only_logged(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with HookServer({"notify": always(500)}).serving() as hooks:
        code = rollout(tmp_path, "--steps", "50", "--webhook", hooks.hook("post-rollout", "notify"))
    captured = capsys.readouterr()
    assert code == 0, captured  # promoted, whatever the hook said
    assert [b["phase"] for b in hooks.of("notify")] == ["Succeeded"]
    assert unstamped(captured.out).splitlines()[-1] == (
        f"  v2 post-rollout {hooks.url}/notify: HTTP 500: said 500 (only logged)"
    )
    assert "warning: post-rollout " in captured.err and "only logged" in captured.err


def test_every_event_goes_to_the_event_hooks(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each line printed is an event POSTed (Flagger's event payload), as
    plain text (no bar, no column padding); a failing event hook is only
    logged, once."""
    with HookServer({"events": always(200), "down": always(503)}).serving() as hooks:
        code = rollout(
            tmp_path,
            "--steps",
            "50",
            "--webhook",
            hooks.hook("event", "events"),
            "--webhook",
            hooks.hook("event", "down"),
        )
    captured = capsys.readouterr()
    assert code == 0, captured
    lines = unstamped(captured.out).splitlines()
    events = hooks.of("events")
    assert [e["metadata"]["eventMessage"] for e in events] == [
        " ".join(line.replace("█", " ").split()) for line in lines
    ]
    assert events[1]["metadata"]["eventMessage"].startswith("v2 50 % 250 req success 100.0 %")
    # the start is said before anything is written: Flagger's Initialized
    assert [e["phase"] for e in events] == ["Initialized", "Succeeded"]
    assert [e["metadata"]["eventType"] for e in events] == ["Normal", "Normal"]
    assert len(hooks.of("down")) == 2
    assert captured.err.count(f"event {hooks.url}/down: HTTP 503") == 1


def test_json_events_carry_the_webhooks_and_their_calls(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with HookServer({"load": always(200), "gate": first(1, 403)}).serving() as hooks:
        code = rollout(
            tmp_path,
            "--steps",
            "50",
            "--json",
            "--webhook",
            hooks.hook("rollout", "load"),
            "--webhook",
            hooks.hook("confirm-promotion", "gate"),
        )
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert [e["event"] for e in events] == ["start", "check", "promoted"]
    assert [w["type"] for w in events[0]["webhooks"]] == ["rollout", "confirm-promotion"]
    assert events[1]["held"].startswith(f"confirm-promotion {hooks.url}/gate: HTTP 403")
    assert [(c["type"], c["status"], c["ok"]) for c in events[1]["webhook_calls"]] == [
        ("rollout", 200, True),
        ("confirm-promotion", 403, False),
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--webhook", "pre=http://h/"], "--webhook pre=http://h/: expected TYPE=URL"),
        (["--webhooks", "/nonexistent/hooks.yaml"], "--webhooks /nonexistent/hooks.yaml: cannot"),
    ],
)
def test_webhooks_that_cannot_be_used_exit_2_before_anything_is_written(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    assert rollout(tmp_path, *options) == 2
    assert message in capsys.readouterr().err
    assert _routes(tmp_path) is None


def test_the_progress_deadline_counts_from_the_start_not_from_the_wait_before_it(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A confirm-rollout gate held the start longer than --progress-deadline:
    the first interval, too quiet to judge, is a halt (the deadline counts
    the analysis' time), and the next one passes. Counted from the
    rollout's creation, the wait made that first halt roll it back."""
    from l4proxy.cli import main

    shutil.copy(os.path.join(os.path.dirname(__file__), "data", "rules", "registry.yaml"), tmp_path)

    def numbers(n: int, path: str, query: str) -> str:
        return "3" if n <= 3 and "increase" in query else _healthy(query)  # a halt, then healthy

    argv = ["canary", "bootcamp", "--stable", "v1", "--canary", "v2", "--rules", str(tmp_path)]
    with HookServer({"gate": first(4, 403)}).serving() as hooks, _fake_prometheus(numbers) as url:
        code = main(
            [
                *argv,
                "--prometheus",
                url,
                "--interval",
                "0.3",
                "--progress-deadline",
                "0.9",
                "--steps",
                "50",
                "--webhook",
                hooks.hook("confirm-rollout", "gate"),
            ]
        )
    out = unstamped(capsys.readouterr().out)
    assert code == 0, out  # promoted
    assert len(hooks.of("gate")) == 5  # held for four intervals, 1.2 s
    assert "halt: 3 canary requests < 10 (--min-requests)" in out


def test_a_loopback_hook_is_called_directly_whatever_http_proxy_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Go's ProxyFromEnvironment (Flagger's client) never proxies a
    loopback address; urllib would send it to the proxy (here: nothing
    listens there, so the call fails)."""
    with HookServer({"h": always(200)}).serving() as hooks:
        for var in ("http_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(var, "http://127.0.0.1:9")  # discard: refused
        for host in ("127.0.0.1", "localhost"):
            url = hooks.url.replace("127.0.0.1", host)
            result = post(Webhook("", "rollout", f"{url}/h", timeout=5), {})
            assert result.ok, result
    assert len(hooks.of("h")) == 2


@pytest.fixture
def https_hook(tmp_path: pathlib.Path) -> Iterator[str]:
    """An https server on 127.0.0.1 (port 0) with a self-signed certificate,
    answering every POST 200; yields its URL."""
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        _skip_or_fail(
            "no openssl to make a certificate (make test installs ca-certificates, which needs it)"
        )
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"https://127.0.0.1:{srv.server_address[1]}/h"
    finally:
        srv.shutdown()
        srv.server_close()


def test_disable_tls_skips_the_certificate_check(https_hook: str) -> None:
    checked = post(Webhook("n", "rollout", https_hook, timeout=5), {})
    assert (checked.status, "CERTIFICATE_VERIFY_FAILED" in checked.detail) == (None, True)
    assert post(Webhook("n", "rollout", https_hook, timeout=5, disable_tls=True), {}).ok

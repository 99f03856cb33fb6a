"""``l4proxy canary --mirror``: mirrored intervals before the steps (Flagger's
mirroring pre-stage, and blue/green mirroring), their document and their
samples (the canary's answers to copies: l4proxy_mirror_requests_total)."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import pathlib
import shutil
import signal
from collections.abc import Iterator
from dataclasses import replace

import pytest
import yaml

from l4proxy.canary._analysis import (
    Conflict,
    Event,
    Policy,
    PolicyError,
    Rollout,
    Sample,
    advance,
    check,
    gates_of,
    resume,
    run_table,
)
from l4proxy.canary._metrics import (
    MIRROR_DROPPED,
    CounterWindow,
    MetricsError,
    copies_missing,
    dropped_query,
    promql,
    read_sidecar,
    totals_of,
)
from l4proxy.canary.command import Display, competing, document, event_json
from l4proxy.rules import load_rules
from tests.conftest import serving
from tests.test_canary_core import (
    ERRORS,
    GOOD,
    QUIET,
    _fake_prometheus,
    _healthy,
    _rollout_in,
    _routes,
    ended_in_first_interval,
    stats,
    unstamped,
)
from tests.test_canary_core import P as CORE_POLICY

P = replace(CORE_POLICY, mirror=2)  # (test_canary_core's, two mirrored intervals first)


# -- the state machine ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("policy", "samples", "weights", "end"),
    [
        # two mirrored intervals (weight 0, copies), then the steps
        (P, [GOOD] * 6, [0, 0, 5, 25, 50, 100, 100], "promoted"),
        # a fail while mirrored counts toward --threshold, and stays mirrored
        (P, [ERRORS, GOOD, GOOD], [0, 0, 0, 5], "progressing"),
        # the threshold reached while mirrored: rolled back (weight 0, no mirror)
        (P, [ERRORS, ERRORS], [0, 0, 0], "rolled_back"),
        # one failed while mirrored, one after: 1 + 1 = threshold
        (P, [ERRORS, GOOD, GOOD, ERRORS], [0, 0, 0, 5, 0], "rolled_back"),
        # too few copies: a halt, as for requests
        (P, [QUIET, QUIET, GOOD], [0, 0, 0, 0], "progressing"),
        # blue/green mirroring: --mirror 3 --steps 100
        (
            Policy(steps=(100,), interval=1, threshold=2, mirror=3),
            [GOOD] * 4,
            [0, 0, 0, 100, 100],
            "promoted",
        ),
    ],
    ids=["pre-stage", "fail-counts", "threshold", "cumulative", "halt", "blue-green"],
)
def test_mirrored_rollouts(
    policy: Policy, samples: list[Sample], weights: list[int], end: str
) -> None:
    events = run_table(policy, samples)
    assert [e.rollout.weight for e in events] == weights
    assert events[-1].rollout.phase == end


def test_which_checks_were_mirrored() -> None:
    events = run_table(P, [GOOD, ERRORS, GOOD, GOOD])
    assert [e.mirrored for e in events] == [False, True, True, True, False]
    assert [e.rollout.mirrored for e in events] == [True, True, True, False, False]
    assert events[0].rollout.steps == (0, 0, 5, 25, 50, 100)


def test_a_mirrored_halt_says_copies() -> None:
    c = check(P, QUIET, mirrored=True)
    assert c.reasons == ("3 copies and canary requests < 10 (--min-requests)",)


def test_a_rollback_is_not_mirrored() -> None:
    r = run_table(P, [ERRORS, ERRORS])[-1].rollout
    assert (r.phase, r.weight, r.mirrored) == ("rolled_back", 0, False)


def test_mirror_must_not_be_negative() -> None:
    with pytest.raises(PolicyError, match="--mirror"):
        Policy(steps=(100,), mirror=-1)


def test_mirror_has_an_upper_bound() -> None:
    """Each mirrored interval is a stage in the state: --mirror 10000000
    wrote a 50 MB state file (a ConfigMap's annotations hold 256 KiB)."""
    assert Policy(steps=(100,), mirror=1000).stages[999] == 0
    with pytest.raises(PolicyError, match=r"--mirror: intervals from 0 \(none\) to 1000 "):
        Policy(steps=(100,), mirror=1001)


def test_mirror_past_its_bound_exits_2_before_anything_is_written(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from l4proxy.cli import main

    queries: list[str] = []

    def answer(n: int, path: str, query: str) -> str:
        queries.append(query)
        return "0"  # a halt: a wrong start rolls back in a second

    argv = ["canary", "bootcamp", "--stable", "v1", "--canary", "v2", "--rules", str(tmp_path)]
    timing = ["--interval", "0.05", "--progress-deadline", "1"]
    with _fake_prometheus(answer) as url:
        assert main([*argv, "--prometheus", url, *timing, "--mirror", "1001"]) == 2
    assert "--mirror: intervals from 0 (none) to 1000" in capsys.readouterr().err
    assert queries == [] and os.listdir(tmp_path) == []


def test_a_service_after_mirror_is_named_in_the_error(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse takes the word after --mirror for its N: it said only
    "invalid int value: 'bootcamp'"."""
    from l4proxy.cli import main

    with pytest.raises(SystemExit):
        main(["canary", "--mirror", "bootcamp", "--stable", "v1", "--canary", "v2"])
    assert (
        "argument --mirror: takes a number of intervals, got 'bootcamp'; put SERVICE first "
        "(l4proxy canary SERVICE --mirror ...) or give N"
    ) in capsys.readouterr().err


def _at(policy: Policy, passes: int) -> Rollout:
    """The rollout of *policy* after *passes* passed intervals, as the state
    file gives it back."""
    r = resume(policy, "svc", "v1", "v2", None, 0).rollout
    for i in range(passes):
        r = advance(policy, r, check(policy, GOOD, r.mirrored), i + 1).rollout
    return Rollout.from_json(json.loads(json.dumps(r.to_json())))


@pytest.mark.parametrize(
    ("passes", "policy", "step", "weight"),
    [
        # the same options: where it stood
        (1, P, 1, 0),
        (3, P, 3, 25),
        # more mirrored intervals: the ones passed are kept
        (1, replace(P, mirror=4), 1, 0),
        # no more than it passed, or none: the interval under way stays
        # mirrored (judged, and its pass goes live through the gate), where
        # it went live at once, ungated
        (1, replace(P, mirror=1), 1, 0),
        (1, replace(P, mirror=0), 1, 0),
        # past the mirrored stage: never mirrored again (more of them before
        # its weight change nothing ahead of it), never lower, never raised
        # unjudged (5 % stays, then 10 %: it went to 10 % at once)
        (3, replace(P, mirror=5), 3, 25),
        (2, replace(P, mirror=0, steps=(10, 100)), 0, 5),
    ],
    ids=["in-same", "past-same", "in-more", "in-fewer", "in-none", "past-more", "past-none"],
)
def test_resume_in_and_after_the_mirrored_stage(
    passes: int, policy: Policy, step: int, weight: int
) -> None:
    saved = _at(P, passes)
    ev = resume(policy, "svc", "v1", "v2", saved, 10)
    assert ev.kind == "resume"
    assert (ev.rollout.step, ev.rollout.weight) == (step, weight)
    assert ev.rollout.steps[ev.rollout.step] == weight


def test_a_state_file_from_before_mirroring_resumes_as_it_was() -> None:
    """No zeros in its steps: never mirrored, whatever --mirror says now."""
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
    saved = Rollout.from_json(old)
    assert not saved.mirrored
    ev = resume(replace(P, mirror=0), "svc", "v1", "v2", saved, 10)
    assert (ev.rollout.weight, ev.rollout.steps) == (25, (5, 25, 50, 100))
    # with --mirror now: the steps change, and it goes on at 25 %, not mirrored
    ev = resume(P, "svc", "v1", "v2", saved, 10)
    assert (ev.rollout.weight, ev.rollout.mirrored) == (25, False)


def test_another_canary_while_one_is_mirrored_is_refused() -> None:
    with pytest.raises(Conflict, match="is mirrored: finish it first"):
        resume(P, "svc", "v1", "v3", _at(P, 0), 1)


# -- the document ----------------------------------------------------------------------
REGISTRY = os.path.join(os.path.dirname(__file__), "data", "rules", "registry.yaml")
HOST = "bootcamp.default.svc.cluster.local"


def test_the_document_mirrors_only_while_mirrored() -> None:
    mirrored = Rollout("bootcamp", "v1", "v2", weight=0, steps=(0, 5, 100))
    doc = yaml.safe_load(document(mirrored))["spec"]
    assert doc["route"] == [{"labels": {"version": "v1"}, "weight": 100}]
    assert doc["mirror"] == {"name": "bootcamp", "labels": {"version": "v2"}}
    for r in (
        replace(mirrored, step=1, weight=5),
        replace(mirrored, phase="rolled_back"),
        replace(mirrored, phase="promoted", weight=100),
    ):
        assert "mirror" not in yaml.safe_load(document(r))["spec"], r


def test_the_mirrored_document_loads_as_a_sidecar_loads_it(tmp_path: pathlib.Path) -> None:
    """Through the real rules loader: every request to v1, each copied to
    v2, and the copies reported as l4proxy_mirror_requests_total labels
    them (MirrorTag): the service and version that the samples select."""
    from l4proxy.rules.routing import Request

    shutil.copy(REGISTRY, tmp_path)
    ours = tmp_path / "canary-bootcamp.yaml"
    ours.write_text(document(Rollout("bootcamp", "v1", "v2", weight=0, steps=(0, 100))))
    table = load_rules([str(tmp_path)], namespace="default", domain="cluster.local").table
    svc = table.service(HOST)
    assert svc is not None
    rc = table.choices(svc, 8080, Request(path="/", authority="bootcamp:8080"))
    assert [(ws.weight, {e.labels["version"] for e in ws.endpoints}) for ws in rc.subsets] == [
        (100, {"v1"})
    ]
    (m,) = rc.mirrors
    assert m.tag is not None
    assert (m.tag.service, m.tag.version) == (HOST, "v2")
    # and our own document, mirror and all, is not taken for a competing rule
    assert competing([str(ours)], "bootcamp", str(ours), "canary-bootcamp") == []


# -- the samples: /stats with both families ----------------------------------------------
def copies(ok: float, failed: float, buckets: dict[str, float]) -> str:
    """The v2 copies' answers in a sidecar's /stats (the labels and buckets of
    istio_requests_total; *failed*: no answer at all, response_code 0)."""
    lab = (
        'reporter="source",destination_service="bootcamp.default.svc.cluster.local",'
        'destination_service_name="bootcamp",destination_version="v2",'
        'destination_workload="bootcamp-v2",response_code="{c}"'
    )
    lines = [
        "# TYPE l4proxy_mirror_requests_total counter",
        "l4proxy_mirror_requests_total 0",
        f"l4proxy_mirror_requests_total{{{lab.format(c='200')}}} {ok}",
        f"l4proxy_mirror_requests_total{{{lab.format(c='0')}}} {failed}",
    ]
    for le, n in buckets.items():
        lines.append(
            "l4proxy_mirror_request_duration_milliseconds_bucket"
            f'{{{lab.format(c="200")},le="{le}"}} {n}'
        )
    return "\n".join(lines) + "\n"


def _deltas(*readings: str, mirrored: bool = True) -> list[tuple[float, float, float | None]]:
    """(requests, errors, p99) of v2 between consecutive readings of one sidecar."""
    w = CounterWindow()
    out = []
    for text in readings:
        values, _ = read_sidecar("http://a/stats", text, mirrored)
        t = totals_of(w.read({"a": values}), "bootcamp", "v2", mirrored)
        out.append((t.requests, t.errors, t.sample().p99_ms))
    return out[1:]


NO_V2 = stats(0, 0, {})  # a sidecar whose canary served no request itself


def test_a_mirrored_sample_is_the_copies_answers() -> None:
    before = NO_V2 + copies(100, 0, {"10": 100, "+Inf": 100})
    after = NO_V2 + copies(190, 10, {"10": 190, "+Inf": 190})
    assert _deltas(before, after) == [(100, 10, pytest.approx(9.9))]
    # the same text outside a mirrored interval: the copies are not the canary's requests
    assert _deltas(before, after, mirrored=False) == [(0, 0, None)]


def test_a_mirrored_sample_adds_what_the_canary_served_itself() -> None:
    """Testers pinned to v2 by a header rule: their requests count too."""
    before = stats(10, 0, {"10": 10, "+Inf": 10}) + copies(100, 0, {"10": 100, "+Inf": 100})
    after = stats(28, 2, {"10": 30, "+Inf": 30}) + copies(150, 0, {"10": 150, "+Inf": 150})
    ((requests, errors, p99),) = _deltas(before, after)
    assert (requests, errors) == (20 + 50, 2)
    assert p99 == pytest.approx(9.9)


def test_a_sidecar_that_restarted_counts_its_copies_anew() -> None:
    before = NO_V2 + copies(500, 0, {"+Inf": 500})
    after = NO_V2 + copies(40, 2, {"+Inf": 40})  # lower: it restarted
    assert [(n, e) for n, e, _ in _deltas(before, after)] == [(42, 2)]


def test_a_sidecar_without_the_copies_family_is_named_at_a_mirrored_interval() -> None:
    """An l4proxy from before it: the canary would be judged on pinned
    requests alone, or halt for ever."""
    with pytest.raises(MetricsError, match="http://a/stats has no l4proxy_mirror_requests_total"):
        read_sidecar("http://a/stats", NO_V2, mirrored=True)
    read_sidecar("http://a/stats", NO_V2)  # outside one: not needed
    # declared with no copies yet: a sidecar that counts them
    read_sidecar("http://a/stats", NO_V2 + "# TYPE l4proxy_mirror_requests_total counter\n", True)


# -- the samples: Prometheus --------------------------------------------------------------
def test_promql_at_a_mirrored_interval_sums_both_families() -> None:
    """Each family's rate() apart, told apart by a label, then summed: one
    selector of both (__name__=~"A|B") is an error in Prometheus once both
    have a series with the same labels (see the promtool test below)."""
    sel = 'reporter="source",destination_service_name="bootcamp",destination_version="v2"'
    ok = f'{sel},response_code!~"5.*|0"'

    def both(function: str, a: str, b: str, s: str) -> str:
        return " or ".join(
            f'label_replace({function}({n}{{{s}}}[30s]), "l4proxy_canary_family", "{n}", "", "")'
            for n in (a, b)
        )

    req = ("istio_requests_total", "l4proxy_mirror_requests_total")
    buckets = (
        "istio_request_duration_milliseconds_bucket",
        "l4proxy_mirror_request_duration_milliseconds_bucket",
    )
    q = promql("bootcamp", "v2", 30, mirrored=True)
    assert q["requests"] == f"sum({both('increase', *req, sel)})"
    assert q["success_rate"] == (
        f"sum({both('rate', *req, ok)}) / sum({both('rate', *req, sel)}) * 100"
    )
    assert q["p99"] == f"histogram_quantile(0.99, sum({both('rate', *buckets, sel)}) by (le))"
    assert q["copies"] == f"sum(increase(l4proxy_mirror_requests_total{{{sel}}}[30s]))"
    assert "__name__" not in "".join(q.values())
    # --reporter applies to both
    assert 'reporter="destination"' in promql("bootcamp", "v2", 30, "destination", True)["p99"]


# promtool evaluates the queries where it is installed (tests/test_checkout's
# EXEMPT_SKIPS says why that skip is allowed)
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool")


# Series of the canary's own requests and of its copies' answers, with the
# same labels (as a sidecar reports them), scraped every 15 s, each rising
# by its increment at every scrape. promtool evaluates at 2m over [1m]: five
# samples 60 s apart end to end, so increase() is 4 increments, nothing
# extrapolated.
_SERIES = {
    # family: (response_code, le) -> increment per scrape
    "istio_requests_total": {("200", ""): 3, ("503", ""): 1},
    "l4proxy_mirror_requests_total": {("200", ""): 33, ("0", ""): 3},
    "istio_request_duration_milliseconds_bucket": {
        ("200", "10"): 1,
        ("200", "100"): 4,
        ("200", "+Inf"): 4,
    },
    "l4proxy_mirror_request_duration_milliseconds_bucket": {
        ("200", "10"): 1,
        ("200", "100"): 21,
        ("200", "+Inf"): 21,
    },
}


@needs_promtool
@pytest.mark.parametrize(
    ("families", "expected"),
    [
        # both families, same labels: 16 requests (4 failed) and 144 copies
        # (12 without an answer); 8 of 100 buckets' counts at <= 10 ms
        (
            ("istio", "l4proxy_mirror"),
            {
                "requests": 16 + 144,
                "success_rate": (12 + 132) / 160 * 100,
                "p99": 10 + 90 * (0.99 * 100 - 8) / (100 - 8),
            },
        ),
        # copies alone (the canary serves no client while mirrored)
        (
            ("l4proxy_mirror",),
            {
                "requests": 144,
                "success_rate": 132 / 144 * 100,
                "p99": 10 + 90 * (0.99 * 84 - 4) / (84 - 4),
            },
        ),
        # no copies' family at all (an older sidecar): the requests alone,
        # not an empty vector
        (
            ("istio",),
            {
                "requests": 16,
                "success_rate": 12 / 16 * 100,
                "p99": 10 + 90 * (0.99 * 16 - 4) / (16 - 4),
            },
        ),
    ],
    ids=["both", "copies-only", "requests-only"],
)
def test_the_mirrored_queries_in_a_real_promql_engine(
    tmp_path: pathlib.Path, families: tuple[str, ...], expected: dict[str, float]
) -> None:
    """promtool evaluates promql(mirrored=True) on series of both families
    with the same labels: the old __name__=~ selector was "vector cannot
    contain metrics with the same labelset" there (prometheus#11397)."""
    import subprocess

    lab = 'reporter="source",destination_service_name="bootcamp",destination_version="v2"'
    series = []
    for name, rows in _SERIES.items():
        if not name.startswith(families):
            continue
        for (code, le), inc in rows.items():
            extra = f',le="{le}"' if le else ""
            series.append(
                {"series": f'{name}{{{lab},response_code="{code}"{extra}}}', "values": f"0+{inc}x8"}
            )
    queries = promql("bootcamp", "v2", 60, mirrored=True)
    # 1 where the answer is within 1e-9 of what the test computed (promtool
    # compares floats exactly); an empty answer (no sample) fails as well
    tests = [
        {
            "expr": f"abs(({queries[key]}) - {value!r}) < bool 1e-9",
            "eval_time": "2m",
            "exp_samples": [{"labels": "{}", "value": 1}],
        }
        for key, value in expected.items()
    ]
    doc = {
        "evaluation_interval": "1m",
        "tests": [{"interval": "15s", "input_series": series, "promql_expr_test": tests}],
    }
    path = tmp_path / "mirrored.yaml"
    path.write_text(yaml.safe_dump(doc))
    run = subprocess.run(
        ["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


@needs_promtool
def test_the_copies_dropped_are_those_of_the_sidecars_that_route_the_service(
    tmp_path: pathlib.Path,
) -> None:
    """promtool evaluates dropped_query: the increase of
    l4proxy_http_mirror_dropped_total (no labels of its own) summed over
    the scrape targets that report requests to bootcamp (a: 4 x 2, b: 4 x
    5), not over one that routes another service (c: 4 x 100)."""
    import subprocess

    def target(instance: str) -> str:
        return f'instance="{instance}:15090",job="pods"'

    lab = 'reporter="source",destination_service_name="%s",destination_version="v1"'
    series = []
    for instance, service, dropped in (
        ("a", "bootcamp", 2),
        ("b", "bootcamp", 5),
        ("c", "shop", 100),
    ):
        t = target(instance)
        series.append({"series": f"{MIRROR_DROPPED}{{{t}}}", "values": f"0+{dropped}x8"})
        requests = f'istio_requests_total{{{t},{lab % service},response_code="200"}}'
        series.append({"series": requests, "values": "0+10x8"})
    doc = {
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "15s",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": dropped_query("bootcamp", 60),
                        "eval_time": "2m",
                        "exp_samples": [{"labels": "{}", "value": 4 * (2 + 5)}],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "dropped.yaml"
    path.write_text(yaml.safe_dump(doc))
    run = subprocess.run(
        ["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_no_copies_in_prometheus_while_stable_had_traffic_is_the_family_missing() -> None:
    assert "no l4proxy_mirror_requests_total of bootcamp v2" in copies_missing(
        None, 250.0, 10, "bootcamp", "v2"
    )
    assert copies_missing(0.0, 250.0, 10, "bootcamp", "v2") == ""  # series, no copies
    assert copies_missing(None, 5.0, 10, "bootcamp", "v2") == ""  # too little traffic: a halt
    assert copies_missing(None, None, 10, "bootcamp", "v2") == ""


# -- the display and --json ------------------------------------------------------------------
def _shown(events: list[Event], as_json: bool = False) -> list[str]:
    out = io.StringIO()
    display = Display(out, as_json, P)
    for ev in events:
        display.emit(ev)
    return (out.getvalue() if as_json else unstamped(out.getvalue())).splitlines()


def test_the_display_says_what_is_mirrored() -> None:
    lines = _shown(run_table(P, [GOOD, QUIET, ERRORS, GOOD, GOOD]))
    assert lines[0].startswith("svc: v1 -> v2, mirror 2 intervals, then steps 5,25,50,100 every")
    assert lines[1].startswith("  v2 mirror " + " " * 20 + "   100 copies  success 100.0 %")
    assert lines[1].endswith("pass -> mirror 2/2")
    assert lines[2].endswith("halt: 3 copies and canary requests < 10 (--min-requests)")
    assert "     3 copies  (too few to judge)" in lines[2]
    assert lines[3].endswith("stays mirrored")
    assert lines[4].endswith("pass -> 5 %")
    assert lines[5].startswith("  v2   5 % █") and "   100 req  " in lines[5]


def test_a_resume_while_mirrored_says_so() -> None:
    saved = _at(P, 1)
    (_, resumed) = _shown([resume(P, "svc", "v1", "v2", saved, 10)])
    assert resumed == "  resumed at mirrored 2/2 (step 2/6, 0 failed checks so far)"


def test_a_mirrored_resume_without_mirror_says_it_stays_mirrored_for_the_interval() -> None:
    """In its first mirrored interval, run again without --mirror: that
    interval stays mirrored, judged on the copies, and its pass goes live
    at 5 % (through confirm-traffic-increase); it went live at 5 % at once.
    ``--json`` says the stages it had."""
    ev = resume(replace(P, mirror=0), "svc", "v1", "v2", _at(P, 0), 10)
    assert (ev.rollout.mirrored, ev.rollout.steps, ev.replanned) == (
        True,
        (0, 5, 25, 50, 100),
        (0, 0, 5, 25, 50, 100),
    )
    (_, resumed, changed) = _shown([ev])
    assert resumed == "  resumed at mirrored 1/1 (step 1/5, 0 failed checks so far)"
    assert changed == (
        "  the plan changed (it was mirror 2 intervals, then steps 5,25,50,100): it stays "
        "mirrored, judged there, and a pass goes on to 5 %"
    )
    (line,) = _shown([ev], as_json=True)
    assert json.loads(line)["steps_before"] == [0, 0, 5, 25, 50, 100]
    assert gates_of(P, ev.rollout, check(P, GOOD, True)) == ("confirm-traffic-increase",)
    assert advance(P, ev.rollout, check(P, GOOD, True), 11).rollout.weight == 5


def test_json_check_events_say_mirror() -> None:
    events = run_table(P, [GOOD, GOOD, GOOD])
    docs = [json.loads(line) for line in _shown(events, as_json=True)]
    # the start's: the plan, 2 mirrored intervals
    assert [d.get("mirror") for d in docs] == [2, True, True, None]
    assert docs[1]["check"]["requests"] == 100 and docs[1]["steps"] == [0, 0, 5, 25, 50, 100]
    assert "mirror" not in event_json(events[-1])  # a check at 5 %


# -- end to end: a rules directory, Prometheus or a sidecar -----------------------------------
def test_a_mirrored_rollout_with_prometheus(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One mirrored interval, judged on both families, the copies the
    sidecars that route bootcamp dropped shown beside it; then 50 % and
    100 %."""
    docs: list[str] = []
    queries: list[str] = []

    def answer(n: int, path: str, query: str) -> str:
        queries.append(query)
        docs.append((tmp_path / "canary-bootcamp.yaml").read_text())
        return "3" if MIRROR_DROPPED in query else _healthy(query)

    with _fake_prometheus(answer) as url:
        code = _rollout_in(
            tmp_path, url, "--mirror", "--steps", "50,100", "--progress-deadline", "1"
        )
    captured = capsys.readouterr()
    assert code == 0, captured
    mirrored = [q for q in queries if "l4proxy_mirror_" in q or MIRROR_DROPPED in q]
    assert len(mirrored) == 5 and queries[:5] == mirrored  # the first interval's, and only
    assert queries[4] == dropped_query("bootcamp", 0.05)
    assert "mirror:" in docs[0] and all("mirror:" not in d for d in docs[5:])
    (line,) = [x for x in captured.out.splitlines() if "copies" in x]
    assert "  3 dropped (all mirrors)  pass -> 50 %" in line
    assert "pass -> 50 %" in captured.out
    assert _routes(tmp_path) == [("v2", 100)]


def test_a_mirrored_rollout_with_prometheus_lacking_the_copies_fails_its_checks(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Prometheus has stable's requests but no copies' series: failed checks
    naming the family, then the rollback (no mirror left), never halts."""

    def answer(n: int, path: str, query: str) -> str | None:
        if "l4proxy_mirror_requests_total{" in query:
            return "NaN"  # (the fake answers a value: NaN is read as none)
        return "0" if 'destination_version="v2"' in query else "250"

    with _fake_prometheus(answer) as url:
        code = _rollout_in(
            tmp_path, url, "--mirror", "3", "--threshold", "2", "--progress-deadline", "1"
        )
    out = capsys.readouterr().out
    assert code == 1, out
    assert "fail (1/2): metrics unreadable: Prometheus has no l4proxy_mirror_requests_total" in out
    assert "ROLLED BACK" in out
    doc = (tmp_path / "canary-bootcamp.yaml").read_text()
    assert "mirror:" not in doc and _routes(tmp_path) == [("v1", 100)]


@contextlib.contextmanager
def _mirroring_sidecar(tmp_path: pathlib.Path, family: bool = True) -> Iterator[str]:
    """A sidecar serving the rules directory *tmp_path*: its generation moves
    when the canary's document changes; between two reads, stable served 100
    requests, each copied to v2 while the document mirrors (100 answers 200),
    and v2 served its weight's share itself. *family*: it reports copies."""
    reads = itertools.count(1)
    seen = [""]
    served = {"v1": 0, "v2": 0, "copies": 0}

    def reply(target: str) -> bytes | None:
        next(reads)
        doc = tmp_path / "canary-bootcamp.yaml"
        text = doc.read_text() if doc.exists() else ""
        if text != seen[-1]:
            seen.append(text)
        spec = yaml.safe_load(text)["spec"] if text else {"route": []}
        weight = {x["labels"]["version"]: x["weight"] for x in spec["route"]}
        served["v2"] += weight.get("v2", 0)
        served["v1"] += weight.get("v1", 0)
        if "mirror" in spec:
            served["copies"] += weight.get("v1", 0)
        lab = 'destination_service_name="bootcamp",destination_version="v2",response_code="200"'
        body = (
            "# TYPE istio_requests_total counter\n"
            f"istio_requests_total{{{lab}}} {served['v2']}\n"
            f'istio_request_duration_milliseconds_bucket{{{lab},le="10"}} {served["v2"]}\n'
            f'istio_request_duration_milliseconds_bucket{{{lab},le="+Inf"}} {served["v2"]}\n'
            f"l4proxy_rules_generation {len(seen)}\n"
        )
        if family:
            n = served["copies"]
            body += (
                "# TYPE l4proxy_mirror_requests_total counter\n"
                f"l4proxy_mirror_requests_total{{{lab}}} {n}\n"
                f'l4proxy_mirror_request_duration_milliseconds_bucket{{{lab},le="10"}} {n}\n'
                f'l4proxy_mirror_request_duration_milliseconds_bucket{{{lab},le="+Inf"}} {n}\n'
            )
        return body.encode()

    with serving(reply) as address:
        yield address


def _mirrored_on_sidecar(tmp_path: pathlib.Path, admin: str, *extra: str) -> int:
    from l4proxy.cli import main

    shutil.copy(REGISTRY, tmp_path)
    argv = ["canary", "bootcamp", "--stable", "v1", "--canary", "v2", "--rules", str(tmp_path)]
    # a halt that should not be (no copies) rolls back in a second, not in ten minutes
    timing = ["--interval", "0.05", "--wait-live", "1", "--progress-deadline", "1", "--json"]
    return main([*argv, "--metrics", admin, *timing, *extra])


def test_blue_green_mirroring_on_a_sidecar(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--mirror 2 --steps 100: two intervals judged on copies alone (v2
    serves nothing then), then 100 %, then promoted."""
    with _mirroring_sidecar(tmp_path) as admin:
        code = _mirrored_on_sidecar(tmp_path, admin, "--mirror", "2", "--steps", "100")
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0, events
    checks = [(e["event"], e.get("mirror"), e["weight"]) for e in events if "check" in e]
    assert checks == [("check", True, 0), ("check", True, 100), ("promoted", None, 100)]
    assert all(e["check"]["verdict"] == "pass" for e in events if "check" in e)


def test_a_sidecar_without_the_copies_family_stops_a_mirrored_rollout_before_any_write(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with _mirroring_sidecar(tmp_path, family=False) as admin:
        code = _mirrored_on_sidecar(tmp_path, admin, "--mirror", "--steps", "100")
    err = capsys.readouterr().err
    assert code == 2
    assert "has no l4proxy_mirror_requests_total" in err and "upgrade the sidecar" in err
    assert not (tmp_path / "canary-bootcamp.yaml").exists()


def test_status_of_a_mirrored_rollout(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from l4proxy.canary.command import save_state
    from l4proxy.cli import main

    save_state(
        str(tmp_path / ".canary-bootcamp.state.json"), replace(_at(P, 0), service="bootcamp")
    )
    assert main(["canary", "status", "bootcamp", "--rules", str(tmp_path)]) == 0
    assert unstamped(capsys.readouterr().out).startswith(
        "bootcamp: v1 -> v2 progressing mirrored: every request copied to v2, 0 % live, "
        "step 1/6, 0 failed checks"
    )


# -- ended by hand, or interrupted, while mirrored ----------------------------------------------
def test_a_mirrored_rollout_left_as_it_is_says_the_mirror_stays_on(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not "v2 keeps 0 %": every request is still sent twice."""
    options = ("--mirror", "2", "--steps", "50,100", "--on-abort", "leave")
    code, _, err = ended_in_first_interval(tmp_path, capsys, "sigterm", *options)
    assert code == 3
    assert "interrupted; the mirror stays on: every request is still copied to v2" in err


def test_the_prompt_on_a_terminal_says_the_mirror_stays_on(
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
    assert "leave it as it is (l: the mirror stays on: every request is still copied to v2)" in (
        err.getvalue()
    )


def test_json_start_and_resume_events_carry_the_mirrored_intervals() -> None:
    start = event_json(resume(P, "svc", "v1", "v2", None, 0))
    resumed = event_json(resume(P, "svc", "v1", "v2", _at(P, 1), 10))
    assert (start["mirror"], resumed["mirror"]) == (2, 2)
    assert "mirror" not in event_json(resume(replace(P, mirror=0), "svc", "v1", "v2", None, 0))


def test_a_refusal_while_mirrored_says_mirrored(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not "at weight 0": the document that was refused mirrors."""
    (tmp_path / "broken.yaml").write_text(
        "apiVersion: config.istio.io/v1alpha2\nkind: RouteRule\nspec: [\n"
    )
    with _fake_prometheus(lambda n, path, query: _healthy(query)) as url:
        code = _rollout_in(tmp_path, url, "--mirror", "--progress-deadline", "1")
    err = capsys.readouterr().err
    assert code == 2
    assert "refused: the rules would be invalid while mirrored (weight 0, every request" in err


# -- copies dropped (--metrics) -------------------------------------------------------------
def test_a_mirrored_sample_from_the_sidecars_counts_the_copies_they_dropped() -> None:
    """Dropped copies (the in-flight cap under load) are never judged: the
    interval's delta of l4proxy_http_mirror_dropped_total, summed over the
    sidecars, goes with the sample."""
    from l4proxy.canary.command import SidecarMetrics

    dropped = {"http://a/stats": [5.0, 12.0], "http://b/stats": [1.0, 4.0]}

    def get(url: str) -> str:
        n = dropped[url].pop(0)
        return NO_V2 + copies(0, 0, {}) + f"l4proxy_http_mirror_dropped_total {n:g}\n"

    metrics = SidecarMetrics(["http://a", "http://b"], "bootcamp", get)
    metrics.start_window(mirrored=True)
    assert metrics.sample("v2", 1, mirrored_from="v1").copies_dropped == 7 + 3


def test_a_mirrored_check_shows_the_copies_dropped() -> None:
    graded = check(P, Sample(100, 0, 12.0, copies_dropped=42), mirrored=True)
    ev = Event("check", _at(P, 1), graded, 0, True)
    (line,) = _shown([ev])
    assert "  42 dropped (all mirrors)  pass -> mirror 2/2" in line
    assert event_json(ev)["check"]["copies_dropped"] == 42
    assert "copies_dropped" not in event_json(advance(P, _at(P, 0), check(P, GOOD), 1))["check"]

"""The canary analysis (l4proxy.canary._analysis) and its metrics arithmetic, table-driven."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import pathlib
import re
import shutil
import signal
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import yaml

from l4proxy.canary._analysis import (
    Conflict,
    GatewayRoute,
    HeaderMatch,
    Hold,
    Policy,
    PolicyError,
    Rollout,
    Sample,
    advance,
    check,
    gates_of,
    resume,
    run_table,
    steps_from,
)
from l4proxy.canary._metrics import (
    REQUESTS,
    CounterWindow,
    MetricsError,
    Series,
    histogram_quantile,
    http_get,
    marks_of,
    marks_query,
    parse_query_response,
    parse_text,
    promql,
    query_url,
    read_sidecar,
    sample_from_prometheus,
    targets_query,
    totals_of,
)
from l4proxy.canary.command import PrometheusMetrics, competing, document, splice
from l4proxy.stats import DIGEST, GENERATION, START_TIME, RulesMark
from tests.conftest import serving

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")


def unstamped(text: str) -> str:
    """The command's text output without the time each line starts with
    (UTC, ISO 8601 to the second), which every line must have."""
    out = []
    for line in text.split("\n"):
        if line:
            m = STAMP.match(line)
            assert m is not None, f"no time at the start of {line!r}"
            line = line[m.end() :]
        out.append(line)
    return "\n".join(out)


P = Policy(
    steps=(5, 25, 50, 100),
    interval=1,
    threshold=2,
    min_success_rate=99,
    max_p99_ms=500,
    min_requests=10,
)
GOOD = Sample(100, 0, 12.0)
ERRORS = Sample(100, 20, 12.0)  # 80 % success
SLOW = Sample(100, 0, 900.0)
QUIET = Sample(3, 0, 12.0)


@pytest.mark.parametrize(
    ("samples", "weights", "end"),
    [
        # promotion: every step passes, the last one promotes
        ([GOOD] * 4, [5, 25, 50, 100, 100], "promoted"),
        # errors: two failed checks (threshold 2) roll back, from wherever
        ([GOOD, ERRORS, ERRORS], [5, 25, 25, 0], "rolled_back"),
        # latency alone fails too
        ([SLOW, SLOW], [5, 5, 0], "rolled_back"),
        # too little traffic halts: no step, no failed check; then it goes on
        (
            [QUIET, QUIET, GOOD, QUIET, GOOD, GOOD, GOOD],
            [5, 5, 5, 25, 25, 50, 100, 100],
            "promoted",
        ),
        # failed checks are not reset by a pass (Flagger): 1 + 1 = threshold
        ([ERRORS, GOOD, SLOW], [5, 5, 25, 0], "rolled_back"),
        # nothing at all: halts forever, never promotes
        ([Sample(0, 0, None)] * 5, [5] * 6, "progressing"),
    ],
    ids=["promote", "errors", "latency", "halt", "cumulative", "no-traffic"],
)
def test_rollouts(samples: list[Sample], weights: list[int], end: str) -> None:
    events = run_table(P, samples)
    assert [e.rollout.weight for e in events] == weights
    assert events[-1].rollout.phase == end


@pytest.mark.parametrize(
    ("sample", "verdict", "reason"),
    [
        (Sample(100, 1, 500.0), "pass", ""),  # 99 % and 500 ms: the limits pass
        (Sample(100, 2, 10.0), "fail", "success rate 98.0 % < 99 %"),
        (Sample(100, 0, 500.1), "fail", "p99 500 ms > 500 ms"),
        (Sample(9, 0, 1.0), "halt", "9 canary requests < 10"),
        # requests but no histogram: a latency that cannot be read never passes
        (Sample(10, 0, None), "fail", "p99 unknown: no latency histogram for 10 requests"),
        (Sample(100, 0, math.inf), "fail", "p99 beyond the largest latency bucket > 500 ms"),
    ],
)
def test_check(sample: Sample, verdict: str, reason: str) -> None:
    c = check(P, sample)
    assert c.verdict == verdict
    assert reason in "; ".join(c.reasons)


def test_resume_keeps_the_step_and_never_restarts_a_rolled_back_canary() -> None:
    ev = resume(P, "svc", "v1", "v2", None, 0)
    assert (ev.kind, ev.rollout.weight) == ("start", 5)
    mid = advance(P, ev.rollout, check(P, GOOD), 1).rollout
    mid = advance(P, mid, check(P, ERRORS), 2).rollout
    again = resume(P, "svc", "v1", "v2", Rollout.from_json(mid.to_json()), 3)
    assert (again.kind, again.rollout.weight, again.rollout.failed_checks) == ("resume", 25, 1)
    back = advance(P, again.rollout, check(P, ERRORS), 4).rollout
    assert (back.phase, back.weight) == ("rolled_back", 0)
    ended = resume(P, "svc", "v1", "v2", back, 5)
    assert (ended.kind, ended.rollout.weight) == ("rolled_back", 0)  # not 5 % again
    assert resume(P, "svc", "v1", "v2", back, 5, restart=True).rollout.weight == 5
    # another canary while this one progresses: refused; after it ended: new rollout
    with pytest.raises(Conflict, match=r"promote\|abort"):
        resume(P, "svc", "v1", "v3", mid, 6)
    assert resume(P, "svc", "v2", "v3", back, 6).kind == "start"


def test_a_rollout_that_judges_nothing_for_the_progress_deadline_rolls_back() -> None:
    """Halts alone (no traffic to judge) held a rollout half-shifted, and its
    Job running, for ever; now progress_deadline seconds of them roll back
    (Flagger's progressDeadlineSeconds). A pass or a fail is progress."""
    p = Policy(steps=(5, 25, 50, 100), interval=1, min_requests=10, progress_deadline=4)
    events = run_table(p, [QUIET] * 10)
    assert [e.rollout.weight for e in events] == [5, 5, 5, 5, 0]  # 4 s: the 4th halt
    assert events[-1].rollout.phase == "rolled_back"
    assert "nothing judged for 4 s (--progress-deadline 4, " in events[-1].rollout.reason
    # the clock starts again at every interval judged
    events = run_table(p, [QUIET] * 3 + [GOOD] + [QUIET] * 3 + [ERRORS] + [QUIET] * 3)
    assert events[-1].rollout.phase == "progressing" and events[-1].rollout.weight == 25
    # two intervals at least: one quiet interval longer than the deadline is not it
    long = replace(p, interval=900, progress_deadline=600)
    assert [e.rollout.weight for e in run_table(long, [QUIET] * 3)] == [5, 5, 0]
    # 0: for ever, as before
    events = run_table(replace(p, progress_deadline=0), [QUIET] * 50)
    assert events[-1].rollout.phase == "progressing"
    # time stopped (the Job not running) does not count: a resume starts it again
    saved = run_table(p, [QUIET] * 3)[-1].rollout
    again = resume(p, "svc", "v1", "v2", Rollout.from_json(saved.to_json()), 1000).rollout
    assert advance(p, again, check(p, QUIET), 1001).rollout.phase == "progressing"
    assert advance(p, again, check(p, QUIET), 1004).rollout.phase == "rolled_back"


@pytest.mark.parametrize(
    ("saved_steps", "step", "steps", "resumed_steps", "resumed_step", "next_weight"),
    [
        # the reviewer's: 30 % at step 3 of 10,20,30,50,100, run again with
        # 25,50,75,100: it stays at 30 % (it jumped to 50 %, no gate asked)
        ((10, 20, 30, 50, 100), 2, (25, 50, 75, 100), (25, 30, 50, 75, 100), 1, 50),
        # never lower: 50 % stays, then 60 %
        ((5, 25, 50, 100), 2, (10, 20, 40, 60, 80, 100), (10, 20, 40, 50, 60, 80, 100), 3, 60),
        # the weight one of the new steps: the new list as it is
        ((10, 20, 30, 50, 100), 3, (25, 50, 75, 100), (25, 50, 75, 100), 1, 75),
        # under every new step: it stays, then the first of them
        ((5, 25, 50, 100), 0, (10, 100), (5, 10, 100), 0, 10),
        # over every new step: it stays, and its pass promotes (100: the promotion)
        ((10, 60, 100), 1, (10, 50), (10, 50, 60), 2, 100),
    ],
)
def test_resume_with_other_steps_stays_where_it_stands_and_goes_on_along_them(
    saved_steps: tuple[int, ...],
    step: int,
    steps: tuple[int, ...],
    resumed_steps: tuple[int, ...],
    resumed_step: int,
    next_weight: int,
) -> None:
    """A resume moves no weight: the rollout is judged where it stands, and
    its pass goes on to the first new step above it, asking the gate of that
    raise. It jumped to the first new step at or above its weight, with no
    check and no gate."""
    weight = saved_steps[step]
    saved = Rollout("svc", "v1", "v2", step=step, weight=weight, steps=saved_steps)
    policy = Policy(steps=steps)
    ev = resume(policy, "svc", "v1", "v2", Rollout.from_json(saved.to_json()), 0)
    r = ev.rollout
    assert (ev.kind, r.weight, r.steps, r.step) == ("resume", weight, resumed_steps, resumed_step)
    assert ev.previous_weight == weight
    assert ev.replanned == (() if resumed_steps == saved_steps[step:] else saved_steps)
    assert gates_of(policy, r, check(policy, GOOD))[0] == "confirm-traffic-increase"
    after = advance(policy, r, check(policy, GOOD), 1).rollout
    assert after.weight == next_weight
    # resumed again with the same options: where it stands, not replanned again
    again = resume(policy, "svc", "v1", "v2", Rollout.from_json(r.to_json()), 2)
    assert (again.rollout.steps, again.rollout.step, again.replanned) == (r.steps, r.step, ())


def test_resume_with_other_steps_asks_its_gates_anew() -> None:
    """A confirm-promotion hold at 50 % (toward 100 %) resumed with steps
    50,75,100: the raise to 75 % asks confirm-traffic-increase (the hold
    would have skipped it, as a confirm-promotion hold does), and the hold
    is gone from the state; the checksum of a state without one stays."""
    held = Hold("confirm-promotion", "HTTP 403", 5.0)
    saved = Rollout("svc", "v1", "v2", step=1, weight=50, steps=(10, 50, 100), hold=held)
    policy = Policy(steps=(50, 75, 100))
    assert gates_of(policy, saved, check(policy, GOOD)) == ("confirm-promotion",)
    r = resume(policy, "svc", "v1", "v2", saved, 10).rollout
    assert (r.weight, r.steps, r.hold) == (50, (50, 75, 100), None)
    assert gates_of(policy, r, check(policy, GOOD)) == ("confirm-traffic-increase",)
    assert r.webhook_checksum == saved.webhook_checksum


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": (5, 5)}, "rise strictly"),
        ({"steps": (0, 50)}, "rise strictly"),
        ({"steps": (5, 101)}, "rise strictly"),
        ({"steps": (5,), "threshold": 0}, "--threshold"),
        ({"steps": (5,), "interval": 0}, "--interval"),
        ({"steps": (5,), "interval": math.inf}, "--interval: must be > 0 seconds and finite"),
        ({"steps": (5,), "interval": math.nan}, "--interval"),
        ({"steps": (5,), "progress_deadline": -1}, "--progress-deadline"),
        ({"steps": (5,), "progress_deadline": math.inf}, "--progress-deadline"),
    ],
)
def test_bad_policies_name_the_option(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        Policy(**kwargs)  # type: ignore[arg-type]


def test_step_weight() -> None:
    assert steps_from(10, 50) == (10, 20, 30, 40, 50)
    assert steps_from(30, 100) == (30, 60, 90, 100)


# -- metrics -----------------------------------------------------------------------
def stats(v2_ok: float, v2_5xx: float, buckets: dict[str, float], gen: int = 1) -> str:
    lab = (
        'reporter="source",destination_service="bootcamp.default.svc.cluster.local",'
        'destination_service_name="bootcamp",destination_version="{v}",'
        'destination_workload="bootcamp-{v}",response_code="{c}"'
    )
    lines = [
        "# TYPE istio_requests_total counter",
        "istio_requests_total 0",
        f"istio_requests_total{{{lab.format(v='v2', c='200')}}} {v2_ok}",
        f"istio_requests_total{{{lab.format(v='v2', c='503')}}} {v2_5xx}",
        f"istio_requests_total{{{lab.format(v='v1', c='500')}}} 999",
        f"l4proxy_rules_generation {gen}",
    ]
    for le, n in buckets.items():
        lines.append(
            "istio_request_duration_milliseconds_bucket"
            f'{{{lab.format(v="v2", c="200")},le="{le}"}} {n}'
        )
    return "\n".join(lines) + "\n"


def test_totals_and_quantile() -> None:
    values, _ = parse_text(stats(90, 10, {"10": 50, "100": 99, "+Inf": 100}))
    t = totals_of(values, "bootcamp", "v2")
    assert (t.requests, t.errors) == (100, 10)
    # rank 99 is the 49th of 49 in (10, 100]: the bucket's top
    assert t.sample().p99_ms == pytest.approx(100.0)
    assert histogram_quantile(0.5, {10.0: 50, 100.0: 99, math.inf: 100}) == pytest.approx(10.0)
    # in +Inf: beyond every finite bound (Prometheus says 100, a number it does not know)
    assert histogram_quantile(0.99, {10.0: 0, 100.0: 0, math.inf: 100}) == math.inf
    assert histogram_quantile(0.99, {math.inf: 100}) == math.inf  # it said 0
    assert histogram_quantile(0.99, {10.0: 0, math.inf: 0}) is None
    assert histogram_quantile(0.9, {100.0: 10, 200.0: 20, math.inf: 20}) == pytest.approx(180.0)
    assert totals_of(values, "bootcamp.default.svc.cluster.local", "v2").requests == 100


def test_a_request_with_no_response_failed() -> None:
    """response_code 0: a request that got no response at all (reset, its
    client gone, the idle timeout), which the sidecar counts as Envoy does:
    a failure of the canary's, not a success (it was: not a 5xx)."""
    text = stats(90, 5, {"+Inf": 100})  # and as many 0 as 503:
    zero = [ln.replace('"503"', '"0"') for ln in text.splitlines() if '"503"' in ln]
    t = totals_of(parse_text(text + "\n".join(zero) + "\n")[0], "bootcamp", "v2")
    assert (t.requests, t.errors) == (100, 10)


def test_counter_window_sums_sidecars_and_handles_a_restart() -> None:
    w = CounterWindow()
    a1, _ = parse_text(stats(100, 0, {"+Inf": 100}))
    b1, _ = parse_text(stats(10, 0, {"+Inf": 10}))
    assert w.read({"a": a1, "b": b1}) == {}  # the baseline: history never counts
    a2, _ = parse_text(stats(130, 5, {"+Inf": 135}))
    b2, _ = parse_text(stats(4, 1, {"+Inf": 5}))  # b restarted: lower counters
    t = totals_of(w.read({"a": a2, "b": b2}), "bootcamp", "v2")
    assert (t.requests, t.errors) == (30 + 5 + 4 + 1, 5 + 1)
    assert t.buckets[math.inf] == 35 + 5


def test_a_sidecar_without_request_metrics_is_named() -> None:
    with pytest.raises(MetricsError, match="--http-routing request"):
        read_sidecar("http://x/stats", "# TYPE l4proxy_rules_generation gauge\n")


# -- Prometheus: the queries and the answers, over a real socket --------------------
def test_promql_is_flaggers_istio_queries() -> None:
    q = promql("bootcamp", "v2", 30)
    sel = 'reporter="source",destination_service_name="bootcamp",destination_version="v2"'
    assert q["success_rate"] == (
        f'sum(rate(istio_requests_total{{{sel},response_code!~"5.*|0"}}[30s])) / '
        f"sum(rate(istio_requests_total{{{sel}}}[30s])) * 100"
    )
    assert q["p99"] == (
        "histogram_quantile(0.99, sum(rate("
        f"istio_request_duration_milliseconds_bucket{{{sel}}}[30s])) by (le))"
    )
    assert q["requests"] == f"sum(increase(istio_requests_total{{{sel}}}[30s]))"


@pytest.fixture
def prometheus() -> Iterator[tuple[str, list[str]]]:
    seen: list[str] = []
    answers = {"increase": "250", "* 100": "98.5", "histogram_quantile": "NaN"}

    def answer(n: int, path: str, query: str) -> str:
        seen.append(f"{path} {query}")
        return next(v for k, v in answers.items() if k in query)

    with _fake_prometheus(answer) as url:
        yield url, seen


def test_prometheus_source(prometheus: tuple[str, list[str]]) -> None:
    url, seen = prometheus
    s = PrometheusMetrics(url, "bootcamp", "source").sample("v2", 10)
    assert s.requests == 250 and s.errors == pytest.approx(250 * 0.015) and s.p99_ms is None
    assert all(line.startswith("/api/v1/query ") for line in seen) and len(seen) == 3
    assert any('destination_version="v2"' in line and "[10s]" in line for line in seen)


def test_a_canary_answering_only_5xx_is_all_errors() -> None:
    """No non-5xx series: Flagger's success-rate ratio is an empty vector.
    It read as "no errors", so a canary failing every request passed."""
    s = sample_from_prometheus({"requests": 100.0, "success_rate": None, "p99": 12.0})
    assert (s.requests, s.errors) == (100.0, 100.0)
    assert check(P, s).verdict == "fail"
    quiet = sample_from_prometheus({"requests": 0.0, "success_rate": None, "p99": None})
    assert (quiet.requests, quiet.errors) == (0.0, 0.0)  # no traffic: nothing to judge


@pytest.mark.parametrize(
    ("body", "value"),
    [
        ('{"status":"success","data":{"resultType":"vector","result":[]}}', None),
        ('{"status":"success","data":{"resultType":"scalar","result":[1,"2.5"]}}', 2.5),
        ('{"status":"error","error":"parse error at char 3"}', "parse error at char 3"),
        ("<html>", "not JSON"),
        # data a list: AttributeError, exit 1 (the code of a rollback)
        ('{"status":"success","data":[1]}', "data is not an object"),
        ('{"status":"success","data":{"resultType":"vector","result":["x"]}}', "unexpected"),
    ],
)
def test_prometheus_answers(body: str, value: object) -> None:
    if isinstance(value, str):
        with pytest.raises(MetricsError, match=value):
            parse_query_response("u", body)
    else:
        assert parse_query_response("u", body) == value
    assert query_url("prom:9090", "up").startswith("http://prom:9090/api/v1/query?query=up")


# -- the document ------------------------------------------------------------------
USER_FILE = """\
# the user's registry, with a comment
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: bootcamp}
spec: {hosts: [bootcamp.default.svc.cluster.local]}
---   # a separator with a comment
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata:
  name: other
spec:
  destination: {name: other}
  route: [{labels: {version: v1}}]
"""


def test_splice_keeps_every_other_document_byte_for_byte() -> None:
    r = Rollout("bootcamp", "v1", "v2", weight=5, steps=(5, 100))
    once = splice(USER_FILE, document(r), "canary-bootcamp")
    assert once.startswith(USER_FILE) and once.endswith(document(r))
    r2 = Rollout("bootcamp", "v1", "v2", weight=100, phase="promoted", steps=(5, 100))
    twice = splice(once, document(r2), "canary-bootcamp")
    assert twice == USER_FILE + "---\n" + document(r2)
    assert "weight: 0" not in document(r2) and "version: v1" not in document(r2)


def test_competing_rules_are_named(tmp_path: object) -> None:
    import pathlib

    d = pathlib.Path(str(tmp_path))
    (d / "a.yaml").write_text(USER_FILE)
    (d / "b.yaml").write_text(
        "apiVersion: config.istio.io/v1alpha2\nkind: RouteRule\nmetadata: {name: pin}\n"
        "spec:\n  destination: {name: bootcamp}\n  precedence: 2\n"
        "  match: {request: {headers: {x-test: {exact: a}}}}\n  route: [{labels: {version: v2}}]\n"
        "---\napiVersion: config.istio.io/v1alpha2\nkind: RouteRule\nmetadata: {name: all}\n"
        "spec:\n  destination: {name: bootcamp}\n  route: [{labels: {version: v1}}]\n"
    )
    files = [str(d / "a.yaml"), str(d / "b.yaml")]
    found = competing(files, "bootcamp", "", "canary-bootcamp")
    assert found == [f"{d / 'b.yaml'}:10: RouteRule all routes every request of bootcamp"]


def _route_rule(destination: str, namespace: str = "") -> str:
    meta = f"{{name: all, namespace: {namespace}}}" if namespace else "{name: all}"
    return (
        f"apiVersion: config.istio.io/v1alpha2\nkind: RouteRule\nmetadata: {meta}\n"
        f"spec:\n  destination: {destination}\n  route: [{{labels: {{version: v1}}}}]\n"
    )


def _virtual_service(host: str, namespace: str = "") -> str:
    meta = f"{{name: vs, namespace: {namespace}}}" if namespace else "{name: vs}"
    return (
        f"apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {meta}\n"
        f"spec:\n  hosts: [{host}]\n  http: [{{route: [{{destination: {{host: {host}}}}}]}}]\n"
    )


@pytest.mark.parametrize(
    ("doc", "rules_namespace", "competes"),
    [
        (_route_rule("{name: bootcamp}"), "default", True),
        (_route_rule("{name: bootcamp, namespace: default}"), "default", True),
        # another namespace's bootcamp: another host
        (_route_rule("{name: bootcamp, namespace: shop}"), "default", False),
        (_route_rule("{name: bootcamp}", namespace="shop"), "default", False),
        (_route_rule("{name: bootcamp, namespace: default}", namespace="shop"), "default", True),
        (_route_rule("{name: bootcamp, domain: example.org}"), "default", False),
        # -n shop: the rules' namespace, where the canary's document is
        (_route_rule("{name: bootcamp}"), "shop", True),
        (_route_rule("{name: bootcamp, namespace: default}"), "shop", False),
        (_virtual_service("bootcamp"), "default", True),
        (_virtual_service("bootcamp", namespace="shop"), "default", False),
        # a host with a dot is taken as written (Istio's rule, the loader's):
        # the host bootcamp.default, not bootcamp's
        (_virtual_service("bootcamp.default"), "default", False),
        (_virtual_service("bootcamp.shop"), "default", False),
        # NAME.NS.svc is expanded (Kubernetes DNS): bootcamp's host, from any namespace
        (_virtual_service("bootcamp.default.svc"), "default", True),
        (_virtual_service("bootcamp.default.svc", namespace="shop"), "default", True),
        (_virtual_service("Bootcamp."), "default", True),
        (_virtual_service("bootcamp.default.svc.cluster.local", namespace="shop"), "default", True),
        (_virtual_service("bootcamp.shop.svc.cluster.local"), "default", False),
    ],
    ids=[
        "rr",
        "rr-our-namespace",
        "rr-destination-elsewhere",
        "rr-of-another-namespace",
        "rr-of-another-namespace-for-ours",
        "rr-another-domain",
        "rr-rules-namespace",
        "rr-default-from-shop",
        "vs",
        "vs-of-another-namespace",
        "vs-name-dot-namespace",
        "vs-another-namespace-host",
        "vs-name-ns-svc",
        "vs-name-ns-svc-from-elsewhere",
        "vs-short-in-capitals-rooted",
        "vs-fqdn-from-elsewhere",
        "vs-another-fqdn",
    ],
)
def test_competing_resolves_names_in_their_namespace(
    tmp_path: pathlib.Path, doc: str, rules_namespace: str, competes: bool
) -> None:
    """A rule names a service as the loader resolves it: a same-named
    service of another namespace is another host, and its rules never
    compete with the canary's (they were refused, naming them)."""
    f = tmp_path / "user.yaml"
    f.write_text(doc)
    found = competing([str(f)], "bootcamp", "", "canary-bootcamp", namespace=rules_namespace)
    assert bool(found) == competes, found


def _named_as_ours(destination: str) -> str:
    """The user's RouteRule canary-bootcamp of namespace shop: another
    object than the canary's (default/canary-bootcamp), whatever its name."""
    return (
        "apiVersion: config.istio.io/v1alpha2\nkind: RouteRule\n"
        "metadata: {name: canary-bootcamp, namespace: shop}\n"
        f"spec:\n  destination: {destination}\n  route: [{{labels: {{version: v1}}}}]\n"
    )


def _file_store(rules: pathlib.Path) -> Any:
    from l4proxy.canary.command import FileStore, Paths, RulesWriter

    paths = Paths.of(str(rules), "bootcamp")
    return FileStore(paths, RulesWriter(paths, "bootcamp", "default", "cluster.local"))


REGISTRY = os.path.join(os.path.dirname(__file__), "data", "rules", "registry.yaml")
R25 = Rollout("bootcamp", "v1", "v2", weight=25, steps=(25, 100))


def test_a_rule_named_as_ours_in_another_namespace_keeps_its_bytes(
    tmp_path: pathlib.Path,
) -> None:
    """A rules file holding the user's shop/canary-bootcamp (for shop's
    bootcamp): the canary's document replaced it, by name alone, and the
    user's rule was gone. Ours is appended beside it."""
    rules = tmp_path / "rules.yaml"
    user = pathlib.Path(REGISTRY).read_text() + "---\n" + _named_as_ours("{name: bootcamp}")
    rules.write_text(user)
    assert _file_store(rules).commit(R25) is True
    assert rules.read_text() == user + "---\n" + document(R25)


def test_a_rule_named_as_ours_in_another_namespace_is_not_another_rollouts(
    tmp_path: pathlib.Path,
) -> None:
    """--rules DIR where another file holds the user's shop/canary-bootcamp:
    refused as the canary's document of a rollout run with --rules FILE."""
    shutil.copy(REGISTRY, tmp_path)
    (tmp_path / "shop.yaml").write_text(_named_as_ours("{name: bootcamp}"))
    assert _file_store(tmp_path).commit(R25) is True
    assert (tmp_path / "canary-bootcamp.yaml").read_text() == document(R25)


def test_a_rule_named_as_ours_in_another_namespace_can_compete(tmp_path: pathlib.Path) -> None:
    """In our own rules file, shop/canary-bootcamp routing default's
    bootcamp for every request was skipped as ours: it competes."""
    f = tmp_path / "rules.yaml"
    f.write_text(_named_as_ours("{name: bootcamp, namespace: default}"))
    assert competing([str(f)], "bootcamp", str(f), "canary-bootcamp") == [
        f"{f}:1: RouteRule canary-bootcamp routes every request of bootcamp"
    ]
    f.write_text(document(R25))  # ours: in the rules' namespace
    assert competing([str(f)], "bootcamp", str(f), "canary-bootcamp") == []


@pytest.mark.parametrize(
    ("host", "refused"), [("bootcamp.default", False), ("bootcamp.default.svc", True)]
)
def test_a_virtual_service_names_the_service_as_the_loader_expands_its_host(
    tmp_path: pathlib.Path, host: str, refused: bool
) -> None:
    """A VirtualService for ``bootcamp.default`` was refused as competing;
    Istio and the loader take a host with a dot as written, so it routes
    the host bootcamp.default (once a ServiceEntry names it), never
    bootcamp's: the rollout runs beside it. ``bootcamp.default.svc`` is
    bootcamp's host, expanded as Kubernetes DNS expands it: refused."""
    from l4proxy.canary.command import CanaryError

    shutil.copy(REGISTRY, tmp_path)
    (tmp_path / "vs.yaml").write_text(_virtual_service(host))
    store = _file_store(tmp_path)
    if refused:
        with pytest.raises(CanaryError, match="VirtualService vs routes host bootcamp"):
            store.commit(R25)
    else:
        assert store.commit(R25) is True


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--max-weight", "50"], "--max-weight goes with --step-weight"),  # was ignored: to 100
        (["--step-weight", "0"], "--step-weight: must be within 1..100"),  # was the default
        (["--steps", "5,50", "--max-weight", "20"], "--max-weight goes with --step-weight"),
        (["--stable", "v1 # x"], "--stable 'v1 # x' is not a label value"),
        (["--canary", "v2_"], "--canary 'v2_' is not a label value"),
    ],
)
def test_canary_options_that_would_be_ignored_or_misread_are_refused(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], argv: list[str], why: str
) -> None:
    from l4proxy.cli import main

    base = ["canary", "bootcamp", "--rules", str(tmp_path), "--metrics", "127.0.0.1:1"]
    versions = ["--stable", "v1", "--canary", "v2"]
    assert main([*base, *versions, *argv]) == 2
    assert why in capsys.readouterr().err


def test_the_document_quotes_the_versions() -> None:
    """1.10 unquoted is the number 1.1, on is true, 'v2 # x' is v2."""
    r = Rollout("bootcamp", "1.9", "1.10", weight=50)
    doc = yaml.safe_load(document(r))
    assert [x["labels"]["version"] for x in doc["spec"]["route"]] == ["1.9", "1.10"]


Rows = list[dict[str, Any]]  # a Prometheus answer's data.result


def _mark_rows(target: str, generation: float, digest: float | None) -> Rows:
    """One scrape target's rules marks, as Prometheus answers them."""
    labels = {"job": "pods", "instance": f"{target}:15090", "pod": target}
    rows: Rows = [{"metric": {"__name__": GENERATION, **labels}, "value": [1, f"{generation:g}"]}]
    if digest is not None:
        rows.append({"metric": {"__name__": DIGEST, **labels}, "value": [1, f"{digest:g}"]})
    return rows


def _moving_marks() -> Callable[[str], Rows | None]:
    """One sidecar whose rules move at every read: each change is live at once."""
    reads = itertools.count(1)
    return lambda query: _mark_rows("caller-0", 1, next(reads))


@contextlib.contextmanager
def _fake_prometheus(
    answer: Callable[[int, str, str], str | None],
    marks: Callable[[str], Rows | None] | None = None,
) -> Iterator[str]:
    """A Prometheus whose answer to the n-th query (from 1) of the canary's
    numbers is *answer*(n, path, query): a value, or None for a 503. The
    sidecars' rules marks (and ``up``) are *marks*(query) instead (None: a
    503), uncounted; by default :func:`_moving_marks`."""
    asked = itertools.count(1)
    marks = marks or _moving_marks()

    def reply(target: str) -> bytes | None:
        parts = urllib.parse.urlsplit(target)
        query = urllib.parse.parse_qs(parts.query)["query"][0]
        result: Rows | None
        if GENERATION in query:
            result = marks(query)
        else:
            value = answer(next(asked), parts.path, query)
            result = None if value is None else [{"metric": {}, "value": [1, value]}]
        if result is None:
            return None
        data = {"resultType": "vector", "result": result}
        return json.dumps({"status": "success", "data": data}).encode()

    with serving(reply) as address:
        yield f"http://{address}"


def _healthy(query: str, success: str = "100") -> str:
    return "250" if "increase" in query else success if "* 100" in query else "12"


def _rollout_in(tmp_path: pathlib.Path, url: str, *extra: str) -> int:
    from l4proxy.cli import main

    shutil.copy(os.path.join(os.path.dirname(__file__), "data", "rules", "registry.yaml"), tmp_path)
    argv = ["canary", "bootcamp", "--stable", "v1", "--canary", "v2", "--rules", str(tmp_path)]
    return main([*argv, "--prometheus", url, "--interval", "0.05", *extra])


def ended_in_first_interval(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], how: str, *options: str
) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a rollout with *options* ended in
    its first interval, as its sample is read: ``abort`` from another
    shell, or SIGTERM (handled as Ctrl-C)."""
    from l4proxy.cli import main

    def answer(n: int, path: str, query: str) -> str:
        if n == 1 and how == "abort":
            assert main(["canary", "abort", "bootcamp", "--rules", str(tmp_path)]) == 1
        elif n == 1:
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)
        return _healthy(query)

    with _fake_prometheus(answer) as url:
        code = _rollout_in(tmp_path, url, "--progress-deadline", "1", *options)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# A rollout ended in its first interval, by strategy: its options, how its
# last line starts, and what its last --json event says of the strategy
ENDED_STRATEGIES = {
    # the interval at 50 %: an interrupted one showed "v2   0 %", the
    # rollback's weight, and "previous_weight": null
    "weighted": (
        ("--steps", "50,100"),
        "  v2  50 % ",
        lambda last: last["previous_weight"] == 50 and "mirror" not in last and "match" not in last,
    ),
    "mirrored": (
        ("--mirror", "2", "--steps", "50,100"),
        "  v2 mirror ",
        lambda last: last.get("mirror") is True,
    ),
    "ab": (
        ("--match", "x-canary=insider"),
        "  v2 A/B 1/10 ",
        lambda last: (
            last["match"] == [HeaderMatch("x-canary", "exact", "insider").to_json()]
            and "mirror" not in last
        ),
    ),
}
ENDED_HOW = pytest.mark.parametrize(
    ("how", "extra", "note"),
    [("abort", (), "(ended by hand)"), ("sigterm", ("--on-abort", "rollback"), "(interrupted)")],
    ids=["abort", "interrupted"],
)


@ENDED_HOW
@pytest.mark.parametrize("strategy", list(ENDED_STRATEGIES))
def test_a_rollout_ended_in_its_first_interval_shows_that_interval(
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    strategy: str,
    how: str,
    extra: tuple[str, ...],
    note: str,
) -> None:
    """Its last line was "v2   0 %", a weight the rollout never had (or
    never had in that interval); and it was "fail ->", for an interval
    never judged. It says the interval was cut short, neither pass nor fail."""
    options, prefix, _ = ENDED_STRATEGIES[strategy]
    code, out, _ = ended_in_first_interval(tmp_path, capsys, how, *options, *extra)
    assert code == 1, out
    last = unstamped(out.splitlines()[-1])
    assert last.startswith(prefix), last
    assert "  interval cut short, not judged  -> ROLLED BACK: 100 % to v1; " in last, last
    assert "fail" not in last and "pass" not in last
    assert last.endswith(note)


@ENDED_HOW
@pytest.mark.parametrize("strategy", list(ENDED_STRATEGIES))
def test_a_rollout_ended_in_its_first_interval_says_its_strategy_in_json(
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    strategy: str,
    how: str,
    extra: tuple[str, ...],
    note: str,
) -> None:
    options, _, says = ENDED_STRATEGIES[strategy]
    code, out, _ = ended_in_first_interval(tmp_path, capsys, how, *options, "--json", *extra)
    last = json.loads(out.splitlines()[-1])
    assert (code, last["event"], last.get("cut_short")) == (1, "rolled_back", True)
    assert "check" not in last  # never judged
    assert says(last), last


def _routes(tmp_path: pathlib.Path) -> list[tuple[str, int]]:
    doc = yaml.safe_load((tmp_path / "canary-bootcamp.yaml").read_text())
    return [(x["labels"]["version"], x["weight"]) for x in doc["spec"]["route"]]


def test_an_abort_during_a_metrics_read_is_not_overwritten(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``l4proxy canary abort`` from another shell lands while the
    controller reads the metrics: the controller wrote its next weight over
    it and went on to promote the canary the user had just aborted."""
    from l4proxy.cli import main

    def answer(n: int, path: str, query: str) -> str:
        if n == 4:  # the second interval: the abort comes now
            assert main(["canary", "abort", "bootcamp", "--rules", str(tmp_path)]) == 1
        return _healthy(query)

    with _fake_prometheus(answer) as url:
        code = _rollout_in(tmp_path, url, "--steps", "25,50,100")
    out = unstamped(capsys.readouterr().out)
    assert code == 1, out  # rolled back: the abort stands
    # (the interval at 50 % was never judged: neither pass nor fail)
    assert out.splitlines()[-1].startswith("  v2  50 % ")
    assert out.splitlines()[-1].endswith(
        "  interval cut short, not judged  -> ROLLED BACK: 100 % to v1; aborted by hand "
        "(ended by hand)"
    )
    assert "fail" not in out.splitlines()[-1]
    assert _routes(tmp_path) == [("v1", 100)]


def test_a_rollback_is_written_when_another_file_is_broken(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The canary fails its checks while someone has saved a broken rule
    file beside ours: the rollback's document was refused (the rules would
    be invalid), the state said rolled back and the sidecars went on with
    50 %, loading it again once that file was fixed. A rollback is written."""

    def answer(n: int, path: str, query: str) -> str:
        if n == 1:
            (tmp_path / "other.yaml").write_text("kind: [\n")
        return _healthy(query, success="50")

    with _fake_prometheus(answer) as url:
        code = _rollout_in(tmp_path, url, "--steps", "50,100", "--threshold", "2")
    out = capsys.readouterr()
    assert code == 1, out  # rolled back
    assert _routes(tmp_path) == [("v1", 100)]


def test_one_unreadable_interval_is_a_failed_check_not_the_end(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Prometheus answers 503 once, mid-rollout: that interval is a failed
    check (as Flagger counts it) and the rollout goes on. It ended the
    command (exit 2) with the canary at 50 % and nothing watching it."""
    asked: list[str] = []

    def answer(n: int, path: str, query: str) -> str | None:
        asked.append(query)
        return None if n == 4 else _healthy(query)  # the second interval's first query

    with _fake_prometheus(answer) as url:
        code = _rollout_in(tmp_path, url, "--steps", "50,100", "--threshold", "2")
    out = capsys.readouterr().out
    assert code == 0, out  # promoted
    assert "metrics unreadable" in out and "HTTP 503" in out
    assert len(asked) == 3 + 1 + 3  # pass (3 queries), unreadable at its first, pass


def test_an_abort_after_the_promotion_is_refused(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``abort`` of a promoted rollout sent every request back to stable,
    the version the analysis had just replaced. Flagger rolls back by hand
    only while its analysis runs: a promotion stands. Refused (exit 2),
    nothing written, and the message says how to go back: a new rollout."""
    from l4proxy.canary.command import abort_after_promotion
    from l4proxy.cli import main

    shutil.copy(REGISTRY, tmp_path)
    promoted = Rollout(
        "bootcamp", "v1", "v2", phase="promoted", weight=100, step=1, steps=(50, 100)
    )
    _file_store(tmp_path).commit(promoted)
    files = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert main(["canary", "abort", "bootcamp", "--rules", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "the rollout of bootcamp from v1 to v2 was promoted (v2 takes 100 %)" in err
    assert "roll it out as a new canary: l4proxy canary bootcamp --stable v2 --canary v1" in err
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == files  # nothing written
    gateway = replace(promoted, gateway=GatewayRoute(8080))
    assert "l4proxy canary bootcamp --gateway-api --stable v2" in abort_after_promotion(gateway)
    # a rollout that is still going, or rolled back already, is aborted as before
    _file_store(tmp_path).commit(replace(promoted, phase="progressing", weight=50, step=0))
    assert main(["canary", "abort", "bootcamp", "--rules", str(tmp_path)]) == 1
    assert main(["canary", "abort", "bootcamp", "--rules", str(tmp_path)]) == 1
    assert _routes(tmp_path) == [("v1", 100)]


def test_a_promote_after_the_rollback_is_refused(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``promote`` of a rolled-back rollout sent every request to the
    canary the analysis (or an abort) had just judged failed. A rollback
    stands, as a promotion does: refused (exit 2), nothing written, and
    the message says how to try again: the rollout anew."""
    from l4proxy.canary.command import promote_after_rollback
    from l4proxy.cli import main

    shutil.copy(REGISTRY, tmp_path)
    rolled = Rollout("bootcamp", "v1", "v2", phase="rolled_back", weight=0, step=1, steps=(50, 100))
    _file_store(tmp_path).commit(rolled)
    files = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert main(["canary", "promote", "bootcamp", "--rules", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "the rollout of bootcamp from v1 to v2 was rolled back (v1 takes 100 %)" in err
    assert "roll it out anew, judged as any: l4proxy canary bootcamp --stable v1 --canary v2" in err
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == files  # nothing written
    gateway = replace(rolled, gateway=GatewayRoute(8080))
    assert "l4proxy canary bootcamp --gateway-api --stable v1" in promote_after_rollback(gateway)
    # a rollout that is still going is promoted as before, and said again once promoted
    _file_store(tmp_path).commit(replace(rolled, phase="progressing", weight=50, step=0))
    assert main(["canary", "promote", "bootcamp", "--rules", str(tmp_path)]) == 0
    assert main(["canary", "promote", "bootcamp", "--rules", str(tmp_path)]) == 0
    assert _routes(tmp_path) == [("v2", 100)]


def test_an_abort_is_written_when_a_sidecar_cannot_be_read(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``abort --metrics`` with a sidecar down: it read the sidecars before
    writing anything, and an unreachable one refused the abort (exit 2, the
    canary left at 50 %). An abort is an emergency: written, with a warning."""
    from l4proxy.canary.command import FileStore, Paths, RulesWriter
    from l4proxy.cli import main

    shutil.copy(os.path.join(os.path.dirname(__file__), "data", "rules", "registry.yaml"), tmp_path)
    paths = Paths.of(str(tmp_path), "bootcamp")
    store = FileStore(paths, RulesWriter(paths, "bootcamp", "default", "cluster.local"))
    store.commit(Rollout("bootcamp", "v1", "v2", weight=50, steps=(50, 100)))
    assert _routes(tmp_path) == [("v1", 50), ("v2", 50)]
    argv = ["canary", "abort", "bootcamp", "--rules", str(tmp_path), "--metrics", "127.0.0.1:1"]
    assert main(argv) == 1  # rolled back
    assert "warning: " in capsys.readouterr().err
    assert _routes(tmp_path) == [("v1", 100)]


def test_a_file_commit_says_whether_the_document_changed(tmp_path: pathlib.Path) -> None:
    """As the ConfigMap store: a resume at the same weight writes nothing,
    and the controller waits for no reload."""
    from l4proxy.canary.command import FileStore, Paths, RulesWriter

    shutil.copy(os.path.join(os.path.dirname(__file__), "data", "rules", "registry.yaml"), tmp_path)
    paths = Paths.of(str(tmp_path), "bootcamp")
    store = FileStore(paths, RulesWriter(paths, "bootcamp", "default", "cluster.local"))
    r = Rollout("bootcamp", "v1", "v2", weight=50, steps=(50, 100))
    assert store.commit(r) is True
    assert store.commit(r, expected=r) is False
    assert store.commit(Rollout("bootcamp", "v1", "v2", weight=100, steps=(50, 100))) is True


@contextlib.contextmanager
def _stuck_sidecar() -> Iterator[str]:
    """A sidecar admin endpoint whose rules generation never moves (its
    ConfigMap not synced yet)."""

    body = (
        b"# TYPE istio_requests_total counter\nistio_requests_total 0\n"
        b"# TYPE l4proxy_rules_generation gauge\nl4proxy_rules_generation 7\n"
    )
    with serving(lambda target: body) as address:
        yield address


def test_an_abort_not_live_in_time_is_written_and_exits_as_not_served(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``abort --metrics`` whose change does not reach the sidecar within
    --wait-live (a kubelet that syncs the ConfigMap a minute later): the abort
    is written, but not served: exit 4, saying so loudly, not error (2), nor
    rolled back (1), which it said with a warning while the canary kept its
    traffic."""
    from l4proxy.canary.command import FileStore, Paths, RulesWriter
    from l4proxy.cli import main

    shutil.copy(os.path.join(os.path.dirname(__file__), "data", "rules", "registry.yaml"), tmp_path)
    paths = Paths.of(str(tmp_path), "bootcamp")
    store = FileStore(paths, RulesWriter(paths, "bootcamp", "default", "cluster.local"))
    store.commit(Rollout("bootcamp", "v1", "v2", weight=50, steps=(50, 100)))
    with _stuck_sidecar() as admin:
        argv = ["canary", "abort", "bootcamp", "--rules", str(tmp_path), "--metrics", admin]
        assert main([*argv, "--wait-live", "0.3"]) == 4
    err = capsys.readouterr().err
    assert "ROLLBACK NOT SERVED: " in err and "still serve rules generation 7" in err
    assert "--wait-live" in err
    assert _routes(tmp_path) == [("v1", 100)]


@pytest.mark.parametrize("moving", [True, False])
def test_a_promote_by_hand_with_prometheus_waits_until_it_is_live(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], moving: bool
) -> None:
    """``promote --prometheus`` returned as soon as it was written, not live
    (``--metrics`` waited): a script that promotes then checks found the old
    weights. It now waits for the sidecars' rules marks, as Prometheus
    scrapes them, to move past the change; not within --wait-live, it says
    the promotion is not served (written all the same), exit 4."""
    from l4proxy.canary.command import FileStore, Paths, RulesWriter
    from l4proxy.cli import main

    shutil.copy(os.path.join(os.path.dirname(__file__), "data", "rules", "registry.yaml"), tmp_path)
    paths = Paths.of(str(tmp_path), "bootcamp")
    store = FileStore(paths, RulesWriter(paths, "bootcamp", "default", "cluster.local"))
    store.commit(Rollout("bootcamp", "v1", "v2", weight=50, steps=(50, 100)))
    reads: list[str] = []

    def marks(query: str) -> Rows:
        reads.append(query)
        return _mark_rows("caller-0", 1, len(reads) if moving else 5)

    with _fake_prometheus(lambda n, path, query: None, marks) as url:
        argv = ["canary", "promote", "bootcamp", "--rules", str(tmp_path), "--prometheus", url]
        assert main([*argv, "--wait-live", "1.5"]) == (0 if moving else 4)
    err = capsys.readouterr().err
    assert _routes(tmp_path) == [("v2", 100)]
    if moving:  # read before the change, then once after: live
        assert len(reads) == 2 and err == "", err
    else:
        assert len(reads) >= 2 and "PROMOTION NOT SERVED: " in err and "--wait-live" in err, err


def test_a_change_is_live_on_a_sidecar_whose_worker_restarted_meanwhile(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sidecar's worker restarted after the change: its generation went
    from 7 to 1 and never past 7 again, so every step waited --wait-live and
    warned "still serves rules generation 1". Its files' digest says the
    change is live."""
    from l4proxy.canary.command import FileStore, Paths, RulesWriter
    from l4proxy.cli import main

    shutil.copy(os.path.join(os.path.dirname(__file__), "data", "rules", "registry.yaml"), tmp_path)
    paths = Paths.of(str(tmp_path), "bootcamp")
    store = FileStore(paths, RulesWriter(paths, "bootcamp", "default", "cluster.local"))
    store.commit(Rollout("bootcamp", "v1", "v2", weight=50, steps=(50, 100)))
    reads = []

    def stats(target: str) -> bytes:
        reads.append(target)
        gen, digest = (7, 5) if len(reads) == 1 else (1, 6)  # before the change / after
        return (
            b"# TYPE istio_requests_total counter\nistio_requests_total 0\n"
            b"l4proxy_rules_generation %d\nl4proxy_rules_digest %d\n" % (gen, digest)
        )

    with serving(stats) as admin:
        argv = ["canary", "abort", "bootcamp", "--rules", str(tmp_path), "--metrics", admin]
        assert main([*argv, "--wait-live", "3"]) == 1
    assert "warning" not in capsys.readouterr().err
    assert len(reads) == 2
    assert _routes(tmp_path) == [("v1", 100)]


def test_wait_live_defaults_to_the_delay_of_where_the_rules_are_written() -> None:
    """5 s for a rules directory (sidecars poll it every second), 150 s for a
    ConfigMap: the kubelet projects a change on its sync period (a minute by
    default) plus its cache's delay, so 5 s failed every step with --configmap."""
    from l4proxy.canary.command import CanaryError, wait_live_of
    from l4proxy.cli import build_parser

    def args(*extra: str) -> float:
        ns = build_parser("canary").parse_args(["canary", "bootcamp", *extra])
        return wait_live_of(ns)

    assert args("--rules", "/etc/l4proxy") == 5.0
    assert args("--configmap", "default/l4proxy-rules") == 150.0
    assert args("--configmap", "l4proxy-rules", "--wait-live", "20") == 20.0
    # with --prometheus, one scrape interval more: 5 s failed nearly every step
    # (a "not live" is a failed check: a healthy canary rolled back)
    assert args("--rules", "/etc/l4proxy", "--prometheus", "http://prom:9090") == 65.0
    assert args("--configmap", "l4proxy-rules", "--prometheus", "http://prom:9090") == 210.0
    with pytest.raises(CanaryError, match="more than 0"):
        args("--rules", "/etc/l4proxy", "--wait-live", "0")


def test_wait_live_is_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    from l4proxy.cli import main

    with pytest.raises(SystemExit):
        main(["canary", "--help"])
    assert "--wait-live SECONDS" in capsys.readouterr().out


@contextlib.contextmanager
def _watching_sidecar(tmp_path: pathlib.Path, fails: Callable[[int], bool]) -> Iterator[str]:
    """A sidecar serving the rules directory *tmp_path*: its generation
    moves when the canary's document changes, its canary answers 100 x 200
    between two reads; the n-th read (from 1) answers 503 when *fails*(n)."""
    reads = itertools.count(1)
    seen = [""]  # the document's text at each change of generation

    def reply(target: str) -> bytes | None:
        n = next(reads)
        doc = tmp_path / "canary-bootcamp.yaml"
        text = doc.read_text() if doc.exists() else ""
        if text != seen[-1]:
            seen.append(text)
        if fails(n):
            return None
        lab = 'destination_service_name="bootcamp",destination_version="v2",response_code="200"'
        return (
            "# TYPE istio_requests_total counter\n"
            f"istio_requests_total{{{lab}}} {100 * n}\n"
            f'istio_request_duration_milliseconds_bucket{{{lab},le="10"}} {100 * n}\n'
            f'istio_request_duration_milliseconds_bucket{{{lab},le="+Inf"}} {100 * n}\n'
            f"l4proxy_rules_generation {len(seen)}\n"
        ).encode()

    with serving(reply) as address:
        yield address


def _rollout_on_sidecar(tmp_path: pathlib.Path, admin: str) -> int:
    from l4proxy.cli import main

    shutil.copy(os.path.join(os.path.dirname(__file__), "data", "rules", "registry.yaml"), tmp_path)
    argv = ["canary", "bootcamp", "--stable", "v1", "--canary", "v2", "--rules", str(tmp_path)]
    extra = ["--interval", "0.05", "--threshold", "2", "--steps", "50,100", "--wait-live", "1"]
    return main([*argv, "--metrics", admin, *extra])


def test_a_sidecar_unreadable_after_a_weight_is_written_is_a_failed_check(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sidecar answers 503 once, just after 100 % was written (while the
    controller waited for it to be live): the command ended with exit 2 and
    the canary at 100 %, progressing, with nothing watching it. It is a
    failed check, and the analysis goes on (here: to promotion)."""
    # reads: 1 start, 2 live at 50 %, 3 window, 4 sample, 5 live at 100 %
    with _watching_sidecar(tmp_path, lambda n: n == 5) as admin:
        code = _rollout_on_sidecar(tmp_path, admin)
    out = capsys.readouterr().out
    assert code == 0, out  # promoted
    assert "fail (1/2): metrics unreadable" in out and "HTTP 503" in out
    assert "PROMOTED" in out
    assert _routes(tmp_path) == [("v2", 100)]


def test_a_rollback_not_seen_live_exits_as_rolled_back_with_a_warning(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sidecar goes away after the first check: two failed checks roll
    back; the rollback is written, but the sidecar cannot confirm it. Exit
    1 (rolled back: what was done) with the ROLLED BACK line and a warning,
    not exit 2 with the state left progressing."""
    with _watching_sidecar(tmp_path, lambda n: n >= 5) as admin:
        code = _rollout_on_sidecar(tmp_path, admin)
    captured = capsys.readouterr()
    assert code == 1, captured
    assert "ROLLED BACK" in captured.out
    assert "warning: metrics unreadable" in captured.err
    assert _routes(tmp_path) == [("v1", 100)]
    state = json.loads((tmp_path / ".canary-bootcamp.state.json").read_text())
    assert state["phase"] == "rolled_back"


def test_a_rollback_json_event_is_printed_when_it_is_not_seen_live(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from l4proxy.cli import main

    with _watching_sidecar(tmp_path, lambda n: n >= 2) as admin:
        shutil.copy(
            os.path.join(os.path.dirname(__file__), "data", "rules", "registry.yaml"), tmp_path
        )
        argv = ["canary", "bootcamp", "--stable", "v1", "--canary", "v2", "--rules", str(tmp_path)]
        extra = ["--interval", "0.05", "--threshold", "1", "--wait-live", "1", "--json"]
        code = main([*argv, "--metrics", admin, *extra])
    out = capsys.readouterr().out
    assert code == 1, out
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["event"] for e in events] == ["start", "rolled_back"]
    assert "metrics unreadable" in events[-1]["reason"]


def test_a_weight_not_live_in_time_is_a_failed_check(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first weight never reaches the sidecar within --wait-live: it
    ended the command (exit 2) with the canary at its weight. A failed
    check (here the threshold: rolled back), and the rollback, not live
    either, exits 4: written, not served."""
    from l4proxy.cli import main

    shutil.copy(os.path.join(os.path.dirname(__file__), "data", "rules", "registry.yaml"), tmp_path)
    with _stuck_sidecar() as admin:
        argv = ["canary", "bootcamp", "--stable", "v1", "--canary", "v2", "--rules", str(tmp_path)]
        code = main([*argv, "--metrics", admin, "--threshold", "1", "--wait-live", "0.1"])
    captured = capsys.readouterr()
    assert code == 4, captured
    assert "ROLLBACK NOT SERVED: 100 % to v1 is written, but " in captured.out
    assert "not live: " in captured.out  # the failed check's reason
    assert "l4proxy canary: ROLLBACK NOT SERVED: " in captured.err
    assert _routes(tmp_path) == [("v1", 100)]


def _disk_full_on_rollback(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, failures: int
) -> tuple[int, list[str]]:
    """A canary answering 50 % 5xx, --threshold 1, whose rollback meets
    *failures* OSErrors (ENOSPC) on the rules directory; the store's
    end_retry without waits. Returns the exit code and the writes tried."""
    import errno

    from l4proxy.canary.command import FileStore
    from l4proxy.rules import apply

    monkeypatch.setattr(FileStore, "end_retry", (0.0,) * len(FileStore.end_retry))
    real, tried, armed = apply._install, [], [False]

    def install(source: str, target: str) -> None:
        if armed[0]:
            tried.append(os.path.basename(target))
            if len(tried) <= failures:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(source, target)

    monkeypatch.setattr(apply, "_install", install)

    def answer(n: int, path: str, query: str) -> str:
        armed[0] = True  # after the first weight is written
        return _healthy(query, success="50")

    with _fake_prometheus(answer) as url:
        code = _rollout_in(tmp_path, url, "--steps", "50,100", "--threshold", "1")
    return code, tried


def test_a_rollback_on_a_full_disk_for_a_moment_is_written_again(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An OSError writing the rollback ended the command (exit 2) with the
    canary at 50 %: the rollback is tried again (FileStore.end_retry)."""
    code, tried = _disk_full_on_rollback(tmp_path, monkeypatch, failures=2)
    captured = capsys.readouterr()
    assert code == 1, captured
    assert "ROLLED BACK" in captured.out
    assert captured.err.count("rollback not written") == 2
    assert _routes(tmp_path) == [("v1", 100)]
    assert tried[:3] == [".canary-bootcamp.state.json"] * 3  # two refused, then written


def test_a_rollback_never_written_says_it_was_not_applied(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from l4proxy.canary.command import FileStore

    code, tried = _disk_full_on_rollback(tmp_path, monkeypatch, failures=1000)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "the rollback was NOT applied" in err and "No space left on device" in err
    assert "still routes as before (50 %)" in err
    assert len(tried) == len(FileStore.end_retry) + 1
    assert _routes(tmp_path) == [("v1", 50), ("v2", 50)]
    state = json.loads((tmp_path / ".canary-bootcamp.state.json").read_text())
    assert (state["phase"], state["weight"]) == ("progressing", 50)


def test_a_canary_slower_than_the_largest_bucket_fails_its_p99() -> None:
    """The reviewer's case, through the sidecar's own exposition: every
    canary request takes 70 s (beyond the 60000 ms bucket). p99 read 0 ms
    and the check passed; it is beyond every bucket, and fails."""
    from l4proxy.sidecar.worker import _DURATION_BUCKETS_MS, Worker, _SubsetTag
    from l4proxy.stats import Counters

    tag = _SubsetTag("bootcamp.default.svc.cluster.local", "r", "v2", "v2", "bootcamp-v2")
    c = Counters()
    w = CounterWindow()
    w.read({"s": parse_text(c.render())[0]})
    none = (0,) * len(_DURATION_BUCKETS_MS)
    Worker._add_rows(c, [], [(tag, 200, 100, 100 * 70.0, none, 0)])
    s = totals_of(w.read({"s": parse_text(c.render())[0]}), "bootcamp", "v2").sample()
    assert (s.requests, s.p99_ms) == (100, math.inf)
    graded = check(P, s)
    assert graded.verdict == "fail"
    assert graded.reasons == ("p99 beyond the largest latency bucket > 500 ms",)


def test_a_bucket_that_did_not_move_still_bounds_the_next() -> None:
    """Zero deltas were dropped from the window: a bucket whose count did
    not move vanished, and the next one was interpolated from 0 ms."""
    w = CounterWindow()
    w.read({"a": parse_text(stats(5, 0, {"100": 5, "250": 5, "+Inf": 5}))[0]})
    t = totals_of(
        w.read({"a": parse_text(stats(105, 0, {"100": 5, "250": 105, "+Inf": 105}))[0]}),
        "bootcamp",
        "v2",
    )
    assert t.buckets == {100.0: 0, 250.0: 100, math.inf: 100}
    assert t.sample().p99_ms == pytest.approx(100 + 150 * 0.99)  # not 250 * 0.99


def test_a_p99_beyond_the_buckets_is_shown_and_is_valid_json() -> None:
    """inf as text is "+Inf" (as le="+Inf"); JSON has no Infinity
    (json.dumps wrote it bare, which JSON parsers refuse): "+Inf" too."""
    import io

    from l4proxy.canary._analysis import Event
    from l4proxy.canary.command import Display

    r = Rollout("bootcamp", "v1", "v2", weight=5, failed_checks=1, steps=P.steps)
    ev = Event("check", r, check(P, Sample(100, 0, math.inf)), 5)
    text, as_json = io.StringIO(), io.StringIO()
    Display(text, False, P).emit(ev)
    Display(as_json, True, P).emit(ev)
    assert "p99 +Inf ms <= 500 NO" in text.getvalue()

    def no_constants(name: str) -> object:
        raise AssertionError(f"not JSON: {name}")

    doc = json.loads(as_json.getvalue(), parse_constant=no_constants)
    assert doc["check"]["p99_ms"] == "+Inf" and doc["check"]["verdict"] == "fail"


def test_requests_without_a_latency_histogram_fail_the_p99_check(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Prometheus' histogram_quantile is NaN when only the +Inf bucket has
    data (a canary slower than every bucket, on sidecars that wrote no zero
    buckets) or the buckets are not kept: p99 unknown, and the check passed
    on success alone. With requests to judge, it fails."""

    def answer(n: int, path: str, query: str) -> str:
        return "NaN" if "histogram_quantile" in query else _healthy(query)

    with _fake_prometheus(answer) as url:
        code = _rollout_in(tmp_path, url, "--steps", "50,100", "--threshold", "1")
    out = capsys.readouterr().out
    assert code == 1, out
    assert "p99    - ms <= 500 NO" in out
    assert "p99 unknown: no latency histogram for 250 requests" in out
    assert _routes(tmp_path) == [("v1", 100)]


def test_max_p99_off_judges_on_success_alone(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Prometheus without the latency histogram failed every check (p99
    unknown) and no option turned the latency check off: --max-p99 off does,
    and the rollout says so."""

    def answer(n: int, path: str, query: str) -> str:
        return "NaN" if "histogram_quantile" in query else _healthy(query)

    with _fake_prometheus(answer) as url:
        code = _rollout_in(
            tmp_path, url, "--steps", "50,100", "--threshold", "1", "--max-p99", "off"
        )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "success >= 99 %, p99 not checked, >= 10 requests" in out
    assert "p99    - ms (not checked)  pass" in out
    assert _routes(tmp_path) == [("v2", 100)]
    off = replace(P, max_p99_ms=math.inf)
    assert check(off, Sample(100, 0, math.inf)).verdict == "pass"
    assert check(off, Sample(100, 5, None)).reasons == ("success rate 95.0 % < 99 %",)


@pytest.mark.parametrize("bad", ["inf", "-inf", "fast", ""])
def test_max_p99_takes_milliseconds_or_off(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    from l4proxy.cli import main

    argv = ["canary", "bootcamp", "--rules", "x", "--stable", "v1", "--canary", "v2"]
    with pytest.raises(SystemExit) as exc:
        main([*argv, f"--max-p99={bad}"])
    assert exc.value.code == 2
    assert "argument --max-p99: milliseconds or off, got" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ((1000, 40), (990, 45)),  # the 200s went down, the 503s did not
        ((5, 40), (990, None)),  # no 503 yet since the restart: that series is gone
    ],
)
def test_a_sidecar_restart_counts_all_its_series_anew(
    before: tuple[float, float], after: tuple[float, float | None]
) -> None:
    """A sidecar restarted within the interval. Reset was decided per
    series: the 200s (lower) counted whole, the 503s (40 -> 45, higher)
    counted 5: 995 requests, 5 errors, a pass, for a canary failing 45 of
    1035. One series down (or gone) is a restart of the whole sidecar."""

    def series(ok: float, err: float | None) -> dict[Series, float]:
        def key(code: str) -> Series:
            labels = {"destination_service_name": "bootcamp", "destination_version": "v2"}
            return (REQUESTS, tuple(sorted({**labels, "response_code": code}.items())))

        return {key("200"): ok} | ({} if err is None else {key("503"): err})

    w = CounterWindow()
    w.read({"a": series(*before), "b": series(7, 0)})
    t = totals_of(w.read({"a": series(*after), "b": series(17, 0)}), "bootcamp", "v2")
    assert (t.requests, t.errors) == (sum(x or 0 for x in after) + 10, after[1] or 0)
    if after[1]:
        assert check(P, t.sample()).verdict == "fail"


def test_a_restart_every_counter_of_which_passed_its_old_value_is_told_by_the_start_time() -> None:
    """A sidecar restarted within the interval and served more since than
    before (5 -> 990 successes, 40 -> 45 errors): no counter went down, so
    only its process_start_time_seconds tells the restart. Without it the
    deltas (985, 5) passed a canary failing 45 of 1035."""

    def stats(ok: float, err: float, started: float | None) -> dict[Series, float]:
        def key(code: str) -> Series:
            labels = {"destination_service_name": "bootcamp", "destination_version": "v2"}
            return (REQUESTS, tuple(sorted({**labels, "response_code": code}.items())))

        start = {} if started is None else {(START_TIME, ()): started}
        return {key("200"): ok, key("503"): err} | start

    w = CounterWindow()
    w.read({"a": stats(5, 40, 1000.0)})
    t = totals_of(w.read({"a": stats(990, 45, 2000.0)}), "bootcamp", "v2")
    assert (t.requests, t.errors) == (1035, 45)
    assert check(P, t.sample()).verdict == "fail"
    # the same start time: deltas, as before
    t = totals_of(w.read({"a": stats(1990, 45, 2000.0)}), "bootcamp", "v2")
    assert (t.requests, t.errors) == (1000, 0)
    # an older sidecar without the gauge: deltas (the restart cannot be told)
    w = CounterWindow()
    w.read({"a": stats(5, 40, None)})
    t = totals_of(w.read({"a": stats(990, 45, None)}), "bootcamp", "v2")
    assert (t.requests, t.errors) == (990, 5)


def test_sidecar_and_prometheus_reads_never_go_through_http_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With http_proxy set (a Job or shell with a proxy to the outside),
    the canary's and ``l4proxy create --admin``'s reads of 127.0.0.1:15000
    went to the proxy. They go direct, as the Kubernetes client does."""
    import urllib.request

    from l4proxy.rules import apply

    hits: list[str] = []

    def server(name: str) -> Callable[[str], bytes]:
        def reply(target: str) -> bytes:
            hits.append(name)
            return b"# TYPE istio_requests_total counter\nl4proxy_rules_generation 4\n"

        return reply

    with serving(server("sidecar")) as sidecar, serving(server("proxy")) as proxy:
        for var in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(var, raising=False)
        for var in ("http_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(var, f"http://{proxy}")
        monkeypatch.setattr(urllib.request, "_opener", None)  # built again from the env
        http_get(f"http://{sidecar}/stats")
        assert apply.rules_mark(sidecar).generation == 4
    assert hits == ["sidecar", "sidecar"]


@pytest.mark.parametrize("value", ["NaN", "+Inf", "-1"])
def test_a_request_count_that_is_not_a_count_is_unreadable(value: str) -> None:
    """NaN compares false with every limit: a canary whose sidecar said NaN
    requests passed its checks. An unreadable sidecar (a failed check)."""
    text = stats(90, 10, {"+Inf": 100}).replace(" 90\n", f" {value}\n")
    with pytest.raises(MetricsError, match=f"is {value.lstrip('+').lower()}.*not a count"):
        read_sidecar("http://x/stats", text)


@pytest.mark.parametrize("value", ["NaN", "+Inf", "-Inf"])
def test_an_abort_with_a_sidecar_saying_nan_is_written(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """l4proxy_rules_generation NaN (not an l4proxy's): int() of it raised
    ValueError (OverflowError for inf), and the abort ended with a
    traceback and exit 1. A mark that is not a number is no mark."""
    from l4proxy.canary.command import FileStore, Paths, RulesWriter
    from l4proxy.cli import main

    shutil.copy(os.path.join(os.path.dirname(__file__), "data", "rules", "registry.yaml"), tmp_path)
    paths = Paths.of(str(tmp_path), "bootcamp")
    store = FileStore(paths, RulesWriter(paths, "bootcamp", "default", "cluster.local"))
    store.commit(Rollout("bootcamp", "v1", "v2", weight=50, steps=(50, 100)))
    body = (
        "# TYPE istio_requests_total counter\nistio_requests_total 0\n"
        f"l4proxy_rules_generation {value}\nl4proxy_rules_digest {value}\n"
    ).encode()
    with serving(lambda target: body) as admin:
        argv = ["canary", "abort", "bootcamp", "--rules", str(tmp_path), "--metrics", admin]
        assert main(argv) == 1  # rolled back
    assert "Error" not in capsys.readouterr().err
    assert _routes(tmp_path) == [("v1", 100)]


def test_an_unexpected_error_exits_2_not_1(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bug escaped run() as a traceback, exit 1: what a Job's
    podFailurePolicy and a script read as "rolled back"."""
    from l4proxy.canary import command

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(command, "resume", broken)
    with _fake_prometheus(lambda n, path, query: _healthy(query)) as url:
        assert _rollout_in(tmp_path, url) == 2
    err = capsys.readouterr().err
    assert "l4proxy canary: unexpected error: RuntimeError: boom (" in err
    assert "a bug, please report it" in err


def test_an_abort_that_meets_another_writer_exits_2_saying_so(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stored rollout changed between an abort's read and its write
    (Superseded): a traceback, exit 1."""
    from l4proxy.canary.command import FileStore, Paths, RulesWriter, Superseded
    from l4proxy.cli import main

    shutil.copy(os.path.join(os.path.dirname(__file__), "data", "rules", "registry.yaml"), tmp_path)
    paths = Paths.of(str(tmp_path), "bootcamp")
    store = FileStore(paths, RulesWriter(paths, "bootcamp", "default", "cluster.local"))
    store.commit(Rollout("bootcamp", "v1", "v2", weight=50, steps=(50, 100)))

    def meanwhile(self: FileStore, r: Rollout, expected: Rollout | None = None) -> bool:
        raise Superseded(None)

    monkeypatch.setattr(FileStore, "commit", meanwhile)
    assert main(["canary", "abort", "bootcamp", "--rules", str(tmp_path)]) == 2
    assert (
        "the rollout changed meanwhile (its state was removed); nothing written"
        in capsys.readouterr().err
    )


def test_a_prometheus_ratio_exactly_at_the_limits_passes() -> None:
    """(990/60)/(1000/60)*100 is 98.99999999999999 in floating point: a
    canary at exactly 99 % failed --min-success-rate 99 (and shown as
    "99.0 % >= 99 NO"). Likewise a p99 of 500.0000000000001 ms."""
    import io

    from l4proxy.canary._analysis import Event
    from l4proxy.canary.command import Display

    def answer(value: float) -> float | None:
        data = {"resultType": "vector", "result": [{"metric": {}, "value": [1, repr(value)]}]}
        return parse_query_response("u", json.dumps({"status": "success", "data": data}))

    rate = (990 / 60) / (1000 / 60) * 100
    assert rate < 99  # the arithmetic, not a choice
    s = sample_from_prometheus(
        {
            "requests": answer(1000.0),
            "success_rate": answer(rate),
            "p99": answer(0.1 * 3 * 1000 / 300 * 500),
        }
    )
    assert s.p99_ms is not None and s.p99_ms > 500
    graded = check(P, s)
    assert (graded.verdict, graded.reasons) == ("pass", ())
    out = io.StringIO()
    r = Rollout("bootcamp", "v1", "v2", weight=5, steps=P.steps)
    Display(out, False, P).emit(Event("check", r, graded, 5))
    assert "success  99.0 % >= 99 ok  p99  500 ms <= 500 ok  pass" in out.getvalue()
    # and a hair below is still below
    assert check(P, Sample(1000, 10.001, 12.0)).verdict == "fail"


# -- Prometheus: a change is judged once the sidecars serve it --------------------------
class _Sidecars:
    """Sidecars as Prometheus scrapes them, serving the rules directory
    *tmp_path* with a delay: each pod serves the canary's document as it was
    *lag* reads of the rules marks ago (the kubelet projecting a ConfigMap a
    minute late); the pods of *stuck* never load anything new. *judged* has,
    for each query of the canary's numbers, whether every pod served the
    document as it is then."""

    def __init__(
        self, tmp_path: pathlib.Path, lag: int, pods: tuple[str, ...], stuck: tuple[str, ...] = ()
    ) -> None:
        self.doc = tmp_path / "canary-bootcamp.yaml"
        self.lag, self.pods, self.stuck = lag, pods, stuck
        self.seen: list[str] = []  # the document at each read of the marks
        self.judged: list[bool] = []
        self.log: list[str] = []  # "marks" or "numbers", in turn

    def now(self) -> str:
        return self.doc.read_text() if self.doc.exists() else ""

    def served(self, pod: str) -> str | None:
        if not self.seen:
            return None  # nobody asked: whatever it serves, it was never seen live
        return self.seen[0 if pod in self.stuck else max(0, len(self.seen) - 1 - self.lag)]

    def marks(self, query: str) -> Rows:
        self.log.append("marks")
        self.seen.append(self.now())
        rows: Rows = []
        for pod in self.pods:
            served = self.served(pod) or ""
            rows += _mark_rows(pod, len(set(self.seen)), zlib.crc32((pod + served).encode()) + 1)
        return rows

    def answer(self, n: int, path: str, query: str) -> str:
        self.log.append("numbers")
        self.judged.append(all(self.served(pod) == self.now() for pod in self.pods))
        return _healthy(query)


def test_prometheus_judges_a_weight_only_once_every_sidecar_serves_it(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reviewer's case: with --prometheus the command judged at once
    after each change, so with a ConfigMap (the kubelet projects it up to a
    minute or two later) the window of the step to 100 % held traffic routed
    at 50 %, and passed it: promoted with 100 % never measured. Each change
    now waits until Prometheus shows every sidecar serving it."""
    monkeypatch.setattr(PrometheusMetrics, "POLL", 0.01)
    sidecars = _Sidecars(tmp_path, lag=3, pods=("caller-0", "caller-1"))
    with _fake_prometheus(sidecars.answer, sidecars.marks) as url:
        code = _rollout_in(tmp_path, url, "--steps", "50,100", "--wait-live", "10")
    captured = capsys.readouterr()
    assert code == 0, captured
    assert "PROMOTED" in captured.out and "warning" not in captured.err
    assert sidecars.judged == [True] * 6  # two checks of three queries, all on live weights
    # the probe of Prometheus before anything is written; then before each
    # weight: the marks before it, then three reads that still show the
    # rules before it (the lag), then the one that shows it live
    first = sidecars.log.index("numbers")
    assert sidecars.log[:first] == ["marks"] * (1 + 5)


def test_prometheus_a_weight_a_sidecar_never_serves_is_a_failed_check(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As with --metrics (test_a_weight_not_live_in_time_is_a_failed_check):
    one sidecar never loads the change within --wait-live; that is a failed
    check (here the threshold: rolled back, before any window was judged),
    and the rollback, not live either, exits 4 (not served), naming it."""
    monkeypatch.setattr(PrometheusMetrics, "POLL", 0.01)
    sidecars = _Sidecars(tmp_path, lag=0, pods=("caller-0", "caller-1"), stuck=("caller-1",))
    with _fake_prometheus(sidecars.answer, sidecars.marks) as url:
        code = _rollout_in(tmp_path, url, "--threshold", "1", "--wait-live", "0.2")
    captured = capsys.readouterr()
    assert code == 4, captured
    assert "ROLLBACK NOT SERVED: " in captured.out and "not live: " in captured.out
    assert "l4proxy canary: ROLLBACK NOT SERVED: " in captured.err
    assert 'pod="caller-1"' in captured.err and "still serves rules generation" in captured.err
    assert "caller-0" not in captured.err  # the one that loaded it is not blamed
    assert "numbers" not in sidecars.log  # nothing judged on a weight not live
    assert _routes(tmp_path) == [("v1", 100)]


def test_prometheus_without_rules_marks_each_window_starts_wait_live_after_its_change(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sidecars whose rules marks Prometheus does not have (not scraped):
    one warning, and each change is taken as live --wait-live after it was
    written, the next window (an --interval long) starting then."""
    times: list[tuple[str, float]] = []

    def marks(query: str) -> Rows:
        times.append(("marks", time.monotonic()))
        return []  # no l4proxy_rules_* series at all

    def answer(n: int, path: str, query: str) -> str:
        times.append(("numbers", time.monotonic()))
        return _healthy(query)

    with _fake_prometheus(answer, marks) as url:
        code = _rollout_in(tmp_path, url, "--steps", "50,100", "--wait-live", "0.3")
    captured = capsys.readouterr()
    assert code == 0, captured
    assert captured.err.count("warning: ") == 1
    assert "Prometheus has no l4proxy_rules_digest nor l4proxy_rules_generation" in captured.err
    assert "taken as live 0.3 s (--wait-live) after it is written" in captured.err
    # read once to probe Prometheus, then before each of the three changes
    # (50 %, 100 %, promoted), never polled
    kinds = [k for k, _ in times]
    assert kinds == ["marks"] + ["marks", *["numbers"] * 3] * 2 + ["marks"]
    for i in (1, 5):  # each check's first query: --wait-live + --interval after its change
        assert times[i + 1][1] - times[i][1] >= 0.3 + 0.05


def test_prometheus_wait_live_drops_a_pod_gone_and_waits_for_one_down_or_new() -> None:
    """After the change: a pod deleted (no ``up`` any more) is not waited
    for; one whose scrapes fail (``up`` 0, its series stale) is, as is a new
    one until its workers agree on files (digest -1 first)."""
    from l4proxy.canary.command import NotLive

    def fake(after: Callable[[int, str], Rows]) -> tuple[PrometheusMetrics, list[str]]:
        asked: list[str] = []

        def get(url: str) -> str:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["query"][0]
            asked.append("up" if query.startswith('{__name__=~"up|') else "marks")
            rows = after(len(asked), query) if len(asked) > 1 else before
            return json.dumps(
                {"status": "success", "data": {"resultType": "vector", "result": rows}}
            )

        p = PrometheusMetrics("prom:9090", "bootcamp", "source", get=get)
        p.POLL = 0.0
        return p, asked

    before = _mark_rows("a", 3, 10) + _mark_rows("b", 3, 20)
    moved = _mark_rows("a", 4, 11)

    # b deleted: not in the answer, no up either
    p, asked = fake(lambda n, q: [] if "up|" in q else moved)
    p.wait_live(p.before_change(), 5)
    assert asked == ["marks", "marks", "up"]
    names = '__name__=~"up|l4proxy_rules_generation|l4proxy_rules_digest"'
    assert targets_query(['{instance="b:15090",job="pods",pod="b"}', '{x="1"}']) == (
        f'{{{names},instance="b:15090",job="pods",pod="b"}} or {{{names},x="1"}}'
    )

    # b's scrapes fail: up 0, waited for until --wait-live
    b = {"job": "pods", "instance": "b:15090", "pod": "b"}
    down: Rows = [{"metric": {"__name__": "up", **b}, "value": [1, "0"]}]
    p, asked = fake(lambda n, q: down if "up|" in q else moved)
    with pytest.raises(NotLive, match=r'pod="b"\} is not scraped \(up 0\) 0.05 s after'):
        p.wait_live(p.before_change(), 0.05)

    # b back with the change, and c new: live once c's workers agree
    def new(n: int, q: str) -> Rows:
        return moved + _mark_rows("b", 4, 21) + _mark_rows("c", 1, -1 if n < 4 else 30)

    p, asked = fake(new)
    p.wait_live(p.before_change(), 5)
    assert asked == ["marks"] * 4  # before, c at -1 twice, then c at 30


def test_prometheus_windows_are_the_interval_to_the_millisecond() -> None:
    """The range was the interval rounded up to a second: 1.5 s read 2 s,
    half a second before the window started (after a change: traffic at
    the weight before it)."""
    assert "[1500ms]" in promql("bootcamp", "v2", 1.5)["requests"]
    assert "[60s]" in promql("bootcamp", "v2", 60)["requests"]
    assert "[50ms]" in promql("bootcamp", "v2", 0.05)["p99"]
    q = marks_query("bootcamp")
    assert q == (
        '{__name__=~"l4proxy_rules_generation|l4proxy_rules_digest|l4proxy_rules_file_held"} '
        "and on (job, instance) "
        'istio_requests_total{reporter="source",destination_service_name="bootcamp"}'
    )
    rows = [(dict(r["metric"]), float(r["value"][1])) for r in _mark_rows("a", 2, math.nan)]
    assert marks_of(rows) == {'{instance="a:15090",job="pods",pod="a"}': RulesMark(2, None)}


# -- --rules DIR and --rules FILE in one directory ------------------------------------------------
def test_rules_file_beside_a_directory_rollouts_document_is_refused(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --rules DIR rollout left DIR/canary-bootcamp.yaml; a rollout with
    --rules DIR/registry.yaml appended a second canary-bootcamp RouteRule to
    that file, and the sidecars watching DIR refused the duplicate name."""
    from l4proxy.cli import main

    with _fake_prometheus(lambda n, path, query: _healthy(query)) as url:
        assert _rollout_in(tmp_path, url, "--steps", "100") == 0
        registry = tmp_path / "registry.yaml"
        before = registry.read_bytes()
        argv = ["canary", "bootcamp", "--stable", "v1", "--canary", "v2", "--restart"]
        code = main([*argv, "--rules", str(registry), "--prometheus", url, "--interval", "0.05"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{tmp_path}/canary-bootcamp.yaml holds the canary's RouteRule canary-bootcamp" in err
    assert f"--rules {registry} would add a second one" in err
    assert registry.read_bytes() == before


def test_rules_directory_beside_a_file_rollouts_document_is_refused(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The other way round: a --rules DIR/registry.yaml rollout left its
    RouteRule canary-bootcamp in registry.yaml; --rules DIR would write
    DIR/canary-bootcamp.yaml beside it."""
    from l4proxy.cli import main

    shutil.copy(os.path.join(os.path.dirname(__file__), "data", "rules", "registry.yaml"), tmp_path)
    registry = tmp_path / "registry.yaml"
    argv = ["canary", "bootcamp", "--stable", "v1", "--canary", "v2", "--interval", "0.05"]
    with _fake_prometheus(lambda n, path, query: _healthy(query)) as url:
        assert main([*argv, "--rules", str(registry), "--prometheus", url, "--steps", "100"]) == 0
        capsys.readouterr()
        code = main([*argv, "--rules", str(tmp_path), "--prometheus", url, "--restart"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{registry}:" in err and ": RouteRule canary-bootcamp is the canary's" in err
    assert f"would write another in {tmp_path}/canary-bootcamp.yaml" in err
    assert not (tmp_path / "canary-bootcamp.yaml").exists()

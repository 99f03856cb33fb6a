"""Prometheus text exposition of the counters."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from l4proxy.stats import Counters, RulesMark, render_prometheus


def test_render_counters_with_labels_and_gauges() -> None:
    c = Counters()
    c.describe("l4proxy_decisions_total", "counter", "Routing decisions.")
    c.inc("l4proxy_decisions_total", service="bootcamp", subset="v1")
    c.inc("l4proxy_decisions_total", service="bootcamp", subset="v1")
    c.inc("l4proxy_decisions_total", subset="v2", service="bootcamp")
    text = c.render({"l4proxy_active_connections": 3})
    lines = text.splitlines()
    assert "# HELP l4proxy_decisions_total Routing decisions." in lines
    assert "# TYPE l4proxy_decisions_total counter" in lines
    assert 'l4proxy_decisions_total{service="bootcamp",subset="v1"} 2' in lines
    assert 'l4proxy_decisions_total{service="bootcamp",subset="v2"} 1' in lines
    assert "l4proxy_active_connections 3" in lines
    assert c.total("l4proxy_decisions_total") == 3


def test_label_values_are_escaped() -> None:
    c = Counters()
    c.inc("x_total", error='say "no"\nnow')
    assert 'x_total{error="say \\"no\\"\\nnow"} 1' in c.render().splitlines()


def test_described_but_unused_counter_shows_zero() -> None:
    c = Counters()
    c.describe("l4proxy_drain_cut_total", "counter", "Cut.")
    assert "l4proxy_drain_cut_total 0" in c.render().splitlines()


def test_a_labelled_family_without_series_is_its_help_and_type_alone() -> None:
    """As Prometheus clients write one: no ``NAME 0`` (a series with no
    labels beside the family's others); its series once it has some, and
    its header alone again once the last is dropped."""
    c = Counters()
    c.describe("l4proxy_rules_file_held", "gauge", "Held.", labelled=True)
    header = ["# HELP l4proxy_rules_file_held Held.", "# TYPE l4proxy_rules_file_held gauge"]
    assert c.render().splitlines() == header
    c.set("l4proxy_rules_file_held", 1, file="a.yaml")
    assert c.render().splitlines() == [*header, 'l4proxy_rules_file_held{file="a.yaml"} 1']
    c.discard("l4proxy_rules_file_held", file="a.yaml")
    assert c.render().splitlines() == header
    c.describe("l4proxy_rules_file_held", "gauge", "Held.")  # described again, unlabelled
    assert c.render().splitlines() == [*header, "l4proxy_rules_file_held 0"]


def test_a_snapshot_sees_a_batch_whole() -> None:
    """The relay's thread writes a histogram row as several adds (buckets,
    +Inf, _sum, _count); a scrape between two of them saw +Inf above _count.
    A batch holds the lock for all of them; a snapshot waits for it."""
    import threading

    from l4proxy.stats import LockedCounters

    c = LockedCounters()
    inside, release = threading.Event(), threading.Event()
    seen: list[dict[str, float]] = []

    def writer() -> None:
        with c.batch():
            c.inc("h_bucket", 1, le="+Inf")
            inside.set()
            release.wait(5)
            c.inc("h_count", 1)

    def reader() -> None:
        snap = c.snapshot()
        seen.append({k: sum(v.values()) for k, v in snap.items()})

    w = threading.Thread(target=writer)
    w.start()
    assert inside.wait(5)
    r = threading.Thread(target=reader)
    r.start()
    r.join(0.2)
    assert r.is_alive()  # waiting for the batch
    release.set()
    w.join(5)
    r.join(5)
    assert seen == [{"h_bucket": 1, "h_count": 1}]


def test_the_workers_report_of_a_row_is_one_batch() -> None:
    """Every add of the relay's report happens inside the batch."""
    import types

    from l4proxy.sidecar.worker import _DURATION_BUCKETS_MS, _NO_SOURCE, Worker
    from l4proxy.stats import LabelSet, LockedCounters

    outside: list[str] = []

    class Checking(LockedCounters):
        def _check(self, name: str) -> None:
            if not self._lock._is_owned():  # type: ignore[attr-defined]
                outside.append(name)

        def add(self, name: str, labels: Mapping[str, str], amount: float = 1) -> None:
            self._check(name)
            super().add(name, labels, amount)

        def add_set(self, name: str, key: LabelSet, amount: float = 1) -> None:
            self._check(name)
            super().add_set(name, key, amount)

        def add_histogram(self, family: str, key: LabelSet, *row: Any) -> None:
            self._check(family)
            super().add_histogram(family, key, *row)

    counters = Checking()
    worker = types.SimpleNamespace(
        relay_counters=counters, _add_rows=Worker._add_rows, _source=_NO_SOURCE
    )
    buckets = (1,) + (0,) * (len(_DURATION_BUCKETS_MS) - 1)
    Worker._report_rows(worker, [], [(None, 200, 1, 0.001, buckets, 0)])  # type: ignore[arg-type]
    assert counters.total("istio_requests_total") == 1
    assert counters.total("istio_request_duration_milliseconds_count") == 1
    assert outside == []


def test_rules_mark_from_stats_and_when_a_change_is_live() -> None:
    text = "# TYPE l4proxy_rules_generation untyped\nl4proxy_rules_generation 3\n"
    assert RulesMark.parse(text) == RulesMark(3, None)  # an l4proxy before digests
    assert RulesMark.parse(text + "l4proxy_rules_digest 281474976710655\n") == RulesMark(
        3, 2**48 - 1
    )
    assert RulesMark.parse("istio_requests_total 5\n") is None  # not an l4proxy
    before = RulesMark(3, 10)
    assert RulesMark(1, 11).past(before)  # a restarted worker on the new files
    assert not RulesMark(9, 10).past(before)  # reloaded (SIGHUP), the same files
    assert not RulesMark(4, -1).past(before)  # workers on different files
    assert not RulesMark(4, 0).past(before)  # one that loaded no rules
    assert RulesMark(4, 11).past(RulesMark(3, -1))  # before unknown: the generation too
    assert not RulesMark(3, 11).past(RulesMark(3, -1))
    assert RulesMark(4).past(RulesMark(3)) and not RulesMark(3).past(RulesMark(3))


def test_a_histogram_row_writes_every_bucket_zeros_included() -> None:
    """As Prometheus clients do: every le of a series, cumulative. 100
    requests of 70 s wrote only le="+Inf", and a reader could not tell that
    the finite buckets end at 60000 ms (the canary read p99 = 0 ms)."""
    from l4proxy.sidecar.worker import _DURATION_BUCKETS_MS, Worker, _SubsetTag

    tag = _SubsetTag("bootcamp.default.svc.cluster.local", "r", "v2", "v2", "bootcamp-v2")
    c = Counters()
    none = (0,) * len(_DURATION_BUCKETS_MS)
    Worker._add_rows(c, [], [(tag, 200, 100, 100 * 70.0, none, 0)])
    fast = tuple(int(le == 5) for le in _DURATION_BUCKETS_MS)  # one request of 2 ms
    Worker._add_rows(c, [], [(tag, 200, 1, 0.002, fast, 0)])
    series = c.snapshot()["istio_request_duration_milliseconds_bucket"]
    les = {dict(labels)["le"]: v for labels, v in series.items()}
    assert list(les) == [*map(str, _DURATION_BUCKETS_MS), "+Inf"]
    assert les["1"] == 0 and les["5"] == 1 and les["60000"] == 1 and les["+Inf"] == 101


def test_a_mirrored_copys_rows_are_a_family_of_their_own() -> None:
    """A copy's answer (Mirror.tag, a MirrorTag) is counted apart from the
    requests clients got answers to: the canary reads the one, Istio's
    queries the other."""
    from l4proxy.rules.routing import MirrorTag
    from l4proxy.sidecar.worker import _DURATION_BUCKETS_MS, Worker, _SubsetTag

    host = "bootcamp.default.svc.cluster.local"
    c = Counters()
    fast = tuple(int(le == 5) for le in _DURATION_BUCKETS_MS)
    Worker._add_rows(
        c, [], [(_SubsetTag(host, "r", "v1", "v1", "bootcamp-v1"), 200, 3, 0.006, fast, 0)]
    )
    two = tuple(2 * n for n in fast)
    Worker._add_rows(
        c, [], [(MirrorTag(host, "r", "v2", "v2", "bootcamp-v2"), 503, 2, 0.004, two, 0)]
    )
    snap = c.snapshot()
    (real,) = snap["istio_requests_total"].items()
    (copies,) = snap["l4proxy_mirror_requests_total"].items()
    assert dict(real[0])["destination_version"] == "v1" and real[1] == 3
    labels = dict(copies[0])
    assert (labels["destination_version"], labels["destination_workload"]) == ("v2", "bootcamp-v2")
    assert (labels["response_code"], labels["destination_service_name"], copies[1]) == (
        "503",
        "bootcamp",
        2,
    )
    assert {
        dict(k)["le"]: v
        for k, v in snap["l4proxy_mirror_request_duration_milliseconds_bucket"].items()
    }["5"] == 2
    assert list(snap["l4proxy_mirror_request_duration_milliseconds_count"].values()) == [2]
    assert all(
        dict(k)["destination_version"] == "v1"
        for k in snap["istio_request_duration_milliseconds_count"]
    )


def test_a_rules_mark_that_is_not_a_number_is_absent() -> None:
    """int() of NaN raised ValueError, of inf OverflowError: l4proxy canary
    --metrics and create --admin ended with a traceback."""
    assert RulesMark.parse("l4proxy_rules_generation NaN\n") is None
    assert RulesMark.parse("l4proxy_rules_generation +Inf\n") is None
    text = "l4proxy_rules_generation 3\nl4proxy_rules_digest NaN\n"
    assert RulesMark.parse(text) == RulesMark(3, None)
    assert RulesMark.of({"l4proxy_rules_generation": 2.0, "l4proxy_rules_digest": -math.inf}) == (
        RulesMark(2, None)
    )


def test_a_choice_whose_pods_differ_in_version_is_labelled_unknown() -> None:
    """Istio labels a request by the pod that answered; the relays count it
    per choice. A choice over every pod of a service (no rule, or a route to
    a Service whose versions share it) was labelled with its first pod's
    version: a review saw v3's 500s counted as v1's and a healthy canary
    rolled back. Such a choice is unknown; one version's pods keep theirs."""
    from l4proxy.rules.routing import Endpoint, Labels, version_and_workload

    def pod(ip: str, version: str) -> Endpoint:
        return Endpoint(ip, 8080, Labels({"app": "bootcamp", "version": version}))

    host = "bootcamp.default.svc.cluster.local"
    v1, v1b, v3 = pod("198.18.0.11", "v1"), pod("198.18.0.12", "v1"), pod("198.18.0.13", "v3")
    assert version_and_workload(host, "default", (v1, v1b)) == ("v1", "bootcamp-v1")
    assert version_and_workload(host, "default", (v1, v3)) == ("unknown", "unknown")
    assert version_and_workload(host, "v2", ()) == ("v2", "bootcamp-v2")


def test_a_histogram_is_one_family_its_buckets_in_bound_order() -> None:
    """istio_request_duration_milliseconds goes out as Prometheus clients
    write a histogram: one HELP and TYPE histogram, then per label set its
    buckets by le (not in text order: "+Inf" before "1", "10" before "5"),
    +Inf last, its _sum and _count; it went out as three untyped families."""
    from l4proxy.sidecar.worker import _DURATION_BUCKETS_MS, Worker, _SubsetTag

    host = "bootcamp.default.svc.cluster.local"
    c = Counters()
    fast = tuple(int(le == 5) for le in _DURATION_BUCKETS_MS)
    for version in ("v2", "v1"):
        tag = _SubsetTag(host, "r", version, version, f"bootcamp-{version}")
        Worker._add_rows(c, [], [(tag, 200, 1, 0.002, fast, 0)])
    lines = render_prometheus(c.snapshot(), c.help(), {}).splitlines()
    start = lines.index("# TYPE istio_request_duration_milliseconds histogram")
    assert lines[start - 1].startswith("# HELP istio_request_duration_milliseconds ")
    family = lines[start + 1 : start + 1 + 2 * (len(_DURATION_BUCKETS_MS) + 3)]
    names = [line.split("{")[0] for line in family]
    one = ["_bucket"] * (len(_DURATION_BUCKETS_MS) + 1) + ["_sum", "_count"]
    assert names == [f"istio_request_duration_milliseconds{s}" for s in one * 2]
    les = [line.split('le="')[1].split('"')[0] for line in family if "_bucket" in line]
    assert les == [*map(str, _DURATION_BUCKETS_MS), "+Inf"] * 2
    versions = [line.split('destination_version="')[1][:2] for line in family]
    assert versions == ["v1"] * len(one) + ["v2"] * len(one)
    assert not any("TYPE istio_request_duration_milliseconds_" in line for line in lines)


def test_every_family_a_worker_exports_is_typed(tmp_path: Path) -> None:
    """What a real worker's /stats says, after a request: every family has
    a HELP and a TYPE, none untyped (the gauges read when it renders, the
    pump's, the relay's and the rules', went out untyped: 46 of them)."""
    import asyncio
    import socket

    from l4proxy.sidecar.admin import WorkerView
    from tests._scripted import Scripted, _response
    from tests._worker import gateway_service, gateway_worker

    pod = Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(pod.endpoint[1]))
    got: dict[str, str] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, worker, address):
            loop = asyncio.get_running_loop()
            with await loop.run_in_executor(None, socket.create_connection, address, 10) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
                await loop.run_in_executor(None, _response, s)
            assert worker.relay is not None
            worker.relay.flush_reports(1.0)
            got["text"] = (await WorkerView(worker, "compiled").stats()).text()

    try:
        asyncio.run(main())
    finally:
        pod.close()
    lines = got["text"].splitlines()
    types = {line.split()[2]: line.split()[3] for line in lines if line.startswith("# TYPE ")}
    helps = {line.split()[2] for line in lines if line.startswith("# HELP ")}
    assert "istio_request_duration_milliseconds" in types
    assert {name for name, kind in types.items() if kind == "untyped"} == set()
    assert set(types) - helps == set()

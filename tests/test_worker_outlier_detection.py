"""A DestinationRule's ``trafficPolicy.outlierDetection`` from the rule file
to a real worker's routing, both relay twins: the application's 5xx eject an
endpoint where a rule asks (and only there), an ejected destination with
Istio's ``minHealthPercent`` 0 answers 503 ``no healthy upstream`` (above it
the panic threshold sends it on), and a reload that removes the rule stops
the counting."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from l4proxy.rules.routing import Endpoint
from tests._scripted import Scripted, _answer, _response, _status
from tests._worker import (
    GATEWAY_HOST,
    _worker_twin,
    connected,
    gateway_destination_rule,
    gateway_routes,
    gateway_service,
    gateway_subsets,
    gateway_worker,
)

HOST = "svc.default.svc.cluster.local"


def _outlier_rule(**fields: str) -> str:
    """A DestinationRule for the gateway's service with these
    ``outlierDetection`` fields."""
    body = "".join(f"\n      {name}: {value}" for name, value in fields.items())
    return gateway_destination_rule(f"    outlierDetection:{body or ' {}'}\n")


def _get(s: socket.socket) -> tuple[int, bytes]:
    s.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    raw = _response(s)
    return _status(raw), raw


def _ep(port: int) -> Endpoint:
    return Endpoint("127.0.0.1", port)


async def _until(cond: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("which", ["pure", "compiled"])
@pytest.mark.parametrize("rule", [True, False], ids=["rule", "no-rule"])
def test_an_endpoints_5xx_eject_it_where_a_rule_asks(
    which: str, rule: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two endpoints in round robin, A answering 503 to everything: with
    ``consecutive5xxErrors: 2`` A is ejected at its second 503, and the next
    10 requests on the same keep-alive connection all go to B. Without the
    rule the sidecar's own detection counts no application status: A keeps
    its share (5 of the 10). (The round robin starts at A or B, its drawn
    offset: the first four alternate from either.)"""
    _worker_twin(which, monkeypatch)
    a = Scripted([_answer(503)] * 100)
    b = Scripted([])
    rules = tmp_path / "rules.yaml"
    text = gateway_service(a.endpoint[1], b.endpoint[1])
    if rule:
        text += _outlier_rule(
            consecutive5xxErrors="2", baseEjectionTime="60s", maxEjectionPercent="50"
        )
    rules.write_text(text)
    got: dict[str, Any] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, worker, address):
            loop = asyncio.get_running_loop()
            async with connected(address) as s:
                first = [await loop.run_in_executor(None, _get, s) for _ in range(4)]
                got["first"] = [status for status, _ in first]
                if rule:  # (the report reaches Python on its loop: wait for it)
                    await _until(
                        lambda: not worker.health.is_healthy(_ep(a.endpoint[1])), "not ejected"
                    )
                after = len(a.requests)
                got["then"] = [(await loop.run_in_executor(None, _get, s))[0] for _ in range(10)]
                got["a_then"] = len(a.requests) - after
                got["a"] = worker.health.describe(_ep(a.endpoint[1]))

    try:
        asyncio.run(main())
    finally:
        a.close()
        b.close()
    assert got["first"] in ([503, 200, 503, 200], [200, 503, 200, 503]), got
    if rule:
        assert got["then"] == [200] * 10 and got["a_then"] == 0, got
        assert (got["a"]["ejections"], got["a"]["status_failures"]) == (1, 2), got["a"]
        assert got["a"]["outlier_detection"] == "DestinationRule"
    else:
        assert sorted(got["then"]) == [200] * 5 + [503] * 5 and got["a_then"] == 5, got
        assert got["a"]["ejections"] == 0 and got["a"]["status_failures"] == 0, got["a"]


@pytest.mark.parametrize("which", ["pure", "compiled"])
@pytest.mark.parametrize("min_health", [None, "50"])
def test_a_destination_all_ejected(
    which: str, min_health: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One endpoint, ejected at its first 503: with Istio's default
    ``minHealthPercent`` (0: no panic) the next requests are the proxy's own
    503 ``no healthy upstream`` and reach no endpoint; with 50 the share
    healthy (0 %) is below it, so the request goes to the ejected one anyway
    (Envoy's panic mode)."""
    _worker_twin(which, monkeypatch)
    a = Scripted([_answer(503)] * 100)
    rules = tmp_path / "rules.yaml"
    fields = {"consecutive5xxErrors": "1", "baseEjectionTime": "60s", "maxEjectionPercent": "100"}
    if min_health is not None:
        fields["minHealthPercent"] = min_health
    rules.write_text(gateway_service(a.endpoint[1]) + _outlier_rule(**fields))
    got: dict[str, Any] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, worker, address):
            loop = asyncio.get_running_loop()
            async with connected(address) as s:
                got["first"] = (await loop.run_in_executor(None, _get, s))[0]
                await _until(lambda: not worker.health.is_healthy(_ep(a.endpoint[1])), "ejected")
                before = len(a.requests)
                got["then"] = [await loop.run_in_executor(None, _get, s) for _ in range(3)]
                got["reached"] = len(a.requests) - before

    try:
        asyncio.run(main())
    finally:
        a.close()
    assert got["first"] == 503
    if min_health is None:
        assert [status for status, _ in got["then"]] == [503] * 3
        assert all(raw.endswith(b"no healthy upstream") for _, raw in got["then"]), got["then"]
        assert got["reached"] == 0
    else:
        assert got["reached"] == 3


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_reload_without_the_rule_stops_counting_statuses(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``consecutive5xxErrors: 100`` A's three 503s are counted; after a
    reload that removes the rule its next three are not (the relay no
    longer reports them); after one that brings it back, one more 503 is
    counted. The reports reach Python in order, so once that last one is
    counted, any report of the three before it would have been too."""
    _worker_twin(which, monkeypatch)
    a = Scripted([_answer(503)] * 100)
    rules = tmp_path / "rules.yaml"
    plain = gateway_service(a.endpoint[1])
    with_rule = plain + _outlier_rule(consecutive5xxErrors="100")
    rules.write_text(with_rule)
    counted: list[int] = []
    policies: list[bool] = []

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (watcher, worker, address):
            loop = asyncio.get_running_loop()
            ep = _ep(a.endpoint[1])
            start = 0
            for text, n in ((with_rule, 3), (plain, 3), (with_rule, 1)):
                if rules.read_text() != text:
                    rules.write_text(text)
                    assert await watcher.reload()
                policies.append(worker.health.policy(ep) is not None)
                async with connected(address) as s:
                    for _ in range(n):
                        assert (await loop.run_in_executor(None, _get, s))[0] == 503
                if text is with_rule:
                    await _until(
                        lambda least=start + n: (
                            worker.health.describe(ep)["status_failures"] >= least
                        ),
                        "counted",
                    )
                    counted.append(worker.health.describe(ep)["status_failures"] - start)
                    start = worker.health.describe(ep)["status_failures"]

    try:
        asyncio.run(main())
    finally:
        a.close()
    assert policies == [True, False, True]
    assert counted == [3, 1], counted


@pytest.mark.parametrize("rule", [True, False], ids=["rule", "no-rule"])
def test_per_connection_a_rule_counts_failed_connects(rule: bool, tmp_path: Path) -> None:
    """--http-routing connection sees no status: a rule's detection counts
    failed connects. A refuses every connect, B answers; 8 connections in
    round robin: with ``consecutive5xxErrors: 1`` A is ejected at its first
    refusal (1 connect tried), with the sidecar's own detection at its third."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refusing = closed.getsockname()[1]  # (held, never listening: refused)
    b = Scripted([])
    rules = tmp_path / "rules.yaml"
    text = gateway_service(refusing, b.endpoint[1])
    if rule:
        text += _outlier_rule(consecutive5xxErrors="1", maxEjectionPercent="50")
    rules.write_text(text)
    got: dict[str, Any] = {}

    def one(address: tuple[str, int]) -> int:
        with socket.create_connection(address, timeout=10) as s:
            return _get(s)[0]

    async def main() -> None:
        async with gateway_worker(rules, http_routing="connection") as (_, worker, address):
            loop = asyncio.get_running_loop()
            got["statuses"] = [await loop.run_in_executor(None, one, address) for _ in range(8)]
            got["a"] = worker.health.describe(_ep(refusing))

    try:
        asyncio.run(main())
    finally:
        b.close()
        closed.close()
    assert got["statuses"] == [200] * 8  # (a refused connect: the next endpoint)
    assert got["a"]["connect_failures"] == (1 if rule else 3), got["a"]
    assert got["a"]["ejections"] == 1


def test_the_relays_reports_reach_health_in_order_one_wake_up_per_batch(
    tmp_path: Path,
) -> None:
    """Reports that arrive while the event loop is busy (here: made from
    the loop itself, before it yields) wake it once, and reach health in
    their order: three 5xx, an answer (which ends the run), two 5xx leave
    a run of two, five counted."""
    from l4proxy.sidecar.worker import _SubsetTag

    a = Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(a.endpoint[1]) + _outlier_rule(consecutive5xxErrors="100"))
    got: dict[str, Any] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, worker, _address):
            wakes: list[Any] = []
            on_loop = worker._on_loop

            def counted(fn: Any, *args: Any) -> bool:
                wakes.append(fn)
                return on_loop(fn, *args)

            worker._on_loop = counted  # type: ignore[method-assign]
            tag = _SubsetTag(HOST, "default", "default", "unknown", "svc-unknown")
            key = ("127.0.0.1", a.endpoint[1])
            for status in (503, 500, 502, 0, 504, 500):
                if status:
                    worker._relay_answered_5xx(key, tag, status)
                else:
                    worker._relay_answered(key, tag)
            for _ in range(5):
                await asyncio.sleep(0)
            got["wakes"] = len(wakes)
            got["a"] = worker.health.describe(_ep(a.endpoint[1]))

    try:
        asyncio.run(main())
    finally:
        a.close()
    assert got["wakes"] == 1
    assert (got["a"]["status_failures"], got["a"]["consecutive_failures"]) == (5, 2), got["a"]
    assert got["a"]["successes"] == 1


def test_reports_past_the_bound_are_dropped_and_counted(tmp_path: Path) -> None:
    """A stalled loop (here: the loop itself, not yielding) holds 65536
    reports at most: the 3 past it are dropped, counted in /stats, and the
    65536 are all heard once it runs."""
    from l4proxy.sidecar.worker import _MAX_REPORTS, _SubsetTag

    a = Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(a.endpoint[1]) + _outlier_rule(consecutive5xxErrors="0"))
    got: dict[str, Any] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, worker, _address):
            tag = _SubsetTag(HOST, "default", "default", "unknown", "svc-unknown")
            key = ("127.0.0.1", a.endpoint[1])
            for _ in range(_MAX_REPORTS + 3):
                worker._relay_answered_5xx(key, tag, 500)
            got["dropped"] = worker.relay_counters.get("l4proxy_outlier_reports_dropped_total")
            for _ in range(5):
                await asyncio.sleep(0)
            got["counted"] = worker.health.describe(_ep(a.endpoint[1]))["status_failures"]

    try:
        asyncio.run(main())
    finally:
        a.close()
    assert got["dropped"] == 3
    assert got["counted"] == _MAX_REPORTS


def _subset_v1_rule(fields: str) -> str:
    """Subsets v1 and v2 of the gateway's service, its ``outlierDetection``
    *fields* (a flow map's), and every request routed to v1."""
    return gateway_subsets(
        "v1", "v2", traffic_policy=f"    outlierDetection: {fields}"
    ) + gateway_routes(f"  - route:\n    - destination: {{host: {GATEWAY_HOST}, subset: v1}}\n")


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_max_ejection_percent_is_a_subsets_share(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four pods, subset v1 of A and B, every request routed to v1, and
    ``maxEjectionPercent: 50``: A and B each answer two 503s, then 200.
    The round robin's first one's second 503 ejects it (one of v1's two:
    A or B, wherever the counter's drawn offset starts it); the other's
    would eject all of v1, so the bound refuses it, as Envoy's detector of
    the cluster ``outbound|8080|v1|svc`` does, and the next requests all
    reach that other one (200). Counted over the service's four pods, it
    went too (two of four) and every later request was the proxy's own 503
    ``no healthy upstream`` for the 60 s of the ejection."""
    _worker_twin(which, monkeypatch)
    pods = [Scripted([_answer(503)] * 2), Scripted([_answer(503)] * 2), Scripted([]), Scripted([])]
    a, b, c, d = pods
    rules = tmp_path / "rules.yaml"
    text = gateway_service(*(p.endpoint[1] for p in pods), labels=("v1", "v1", "v2", "v2"))
    fields = "{consecutive5xxErrors: 2, baseEjectionTime: 60s, maxEjectionPercent: 50}"
    rules.write_text(text + _subset_v1_rule(fields))
    got: dict[str, Any] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, worker, address):
            loop = asyncio.get_running_loop()
            s = await loop.run_in_executor(None, socket.create_connection, address, 10)
            try:
                got["first"] = [(await loop.run_in_executor(None, _get, s))[0] for _ in range(4)]
                # (each 503 reaches Python on its loop, in order: the second
                # endpoint's second last)
                await _until(
                    lambda: all(
                        worker.health.describe(_ep(p.endpoint[1]))["status_failures"] == 2
                        for p in (a, b)
                    ),
                    "A's and B's 503s not counted",
                )
                got["then"] = [await loop.run_in_executor(None, _get, s) for _ in range(4)]
                got["a"] = worker.health.describe(_ep(a.endpoint[1]))
                got["b"] = worker.health.describe(_ep(b.endpoint[1]))
            finally:
                s.close()

    try:
        asyncio.run(main())
    finally:
        for p in pods:
            p.close()
    assert got["first"] == [503] * 4, got
    assert [status for status, _ in got["then"]] == [200] * 4, got["then"]
    # the first in the round robin ejected, the second kept by the bound
    (first, ejected), (second, kept) = sorted(
        ((a, got["a"]), (b, got["b"])), key=lambda pd: pd[1]["healthy"]
    )
    assert (ejected["healthy"], ejected["ejections"]) == (False, 1), got
    assert (kept["healthy"], kept["ejections_suppressed"]) == (True, 1), got
    assert (len(first.requests), len(second.requests)) == (2, 6)
    assert len(c.requests) + len(d.requests) == 0

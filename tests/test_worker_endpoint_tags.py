"""A Service whose pods differ in version, through a real worker, both
relay twins: with no rule (every pod takes requests, round robin), and
with a VirtualService route to the Service without a subset (a rolling
update, a canary by replica count), ``istio_requests_total`` counts each
request under the ``destination_version`` and ``destination_workload`` of
the pod that answered it, as Istio does: v1's rows are what v1's two pods
served, v2's what its one served, exactly, and none is ``unknown``.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from tests._scripted import Scripted, _response, _status
from tests._worker import (
    GATEWAY_HOST,
    _worker_twin,
    connected,
    gateway_routes,
    gateway_service,
    gateway_subsets,
    gateway_worker,
)

HOST = GATEWAY_HOST
N = 30

NO_SUBSET_ROUTE = gateway_routes(
    f"""\
  - route:
    - destination: {{host: {HOST}}}
"""
)


def _ask(s: socket.socket, n: int) -> list[int]:
    out = []
    for i in range(n):
        s.sendall(f"GET /items/{i} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        out.append(_status(_response(s)))
    return out


@pytest.mark.parametrize("rule", ["", NO_SUBSET_ROUTE], ids=["no-rule", "route-without-subset"])
@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_each_request_is_labelled_by_the_pod_that_answered(
    which: str, rule: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _worker_twin(which, monkeypatch)
    v1a, v1b, v2 = Scripted([]), Scripted([]), Scripted([])
    rules = tmp_path / "rules.yaml"
    ports = (v1a.endpoint[1], v1b.endpoint[1], v2.endpoint[1])
    rules.write_text(gateway_service(*ports, labels=("v1", "v1", "v2")) + rule)
    statuses: list[int] = []
    counted: dict[tuple[str, str, str], float] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, worker, address):
            loop = asyncio.get_running_loop()
            async with connected(address) as s:
                statuses.extend(await loop.run_in_executor(None, _ask, s, N))
            assert worker.relay is not None
            worker.relay.flush_reports(1.0)
            snapshot = worker.relay_counters.snapshot()
            for labels, n in snapshot["istio_requests_total"].items():
                d = dict(labels)
                key = (d["destination_version"], d["destination_workload"], d["response_code"])
                counted[key] = counted.get(key, 0) + n

    try:
        asyncio.run(main())
    finally:
        for b in (v1a, v1b, v2):
            b.close()
    assert statuses == [200] * N
    served = [len(b.requests) for b in (v1a, v1b, v2)]
    assert served == [N // 3] * 3  # (round robin)
    assert counted == {
        ("v1", "svc-v1", "200"): served[0] + served[1],
        ("v2", "svc-v2", "200"): served[2],
    }


MIRRORED_TO_EVERY_POD = gateway_subsets("v1") + gateway_routes(
    f"""\
  - route:
    - destination: {{host: {HOST}, subset: v1}}
    mirror: {{host: {HOST}}}
    mirrorPercentage: {{value: 100.0}}
"""
)


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_mirrors_copies_are_labelled_by_the_pod_they_went_to(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """v1 serves every request; a copy of each goes to any pod of the
    Service (no subset: v1's two and v2's one, round robin): the copies'
    family counts each under the version of the pod it went to, what each
    pod read of copies (their Host ``gw-shadow``); the requests are v1's."""
    _worker_twin(which, monkeypatch)
    v1a, v1b, v2 = Scripted([]), Scripted([]), Scripted([])
    rules = tmp_path / "rules.yaml"
    ports = (v1a.endpoint[1], v1b.endpoint[1], v2.endpoint[1])
    rules.write_text(gateway_service(*ports, labels=("v1", "v1", "v2")) + MIRRORED_TO_EVERY_POD)
    requests: dict[str, float] = {}
    copies: dict[str, float] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, worker, address):
            loop = asyncio.get_running_loop()
            async with connected(address) as s:
                assert await loop.run_in_executor(None, _ask, s, N) == [200] * N
            assert worker.relay is not None
            for _ in range(500):  # (the copies end as the pods answer them)
                if not worker.relay.stats().get("mirror_active", 0):
                    break
                await asyncio.sleep(0.01)
            worker.relay.flush_reports(1.0)
            snapshot = worker.relay_counters.snapshot()
            for family, out in (
                ("istio_requests_total", requests),
                ("l4proxy_mirror_requests_total", copies),
            ):
                for labels, n in snapshot.get(family, {}).items():
                    version = dict(labels)["destination_version"]
                    out[version] = out.get(version, 0) + n

    try:
        asyncio.run(main())
    finally:
        for b in (v1a, v1b, v2):
            b.close()

    def shadows(b: Scripted) -> int:
        return sum(b"\r\nHost: gw-shadow\r\n" in r for r in b.requests)

    got = [shadows(b) for b in (v1a, v1b, v2)]
    assert sum(got) == N and got[2] == N // 3, got  # (round robin)
    assert requests == {"v1": N}
    assert copies == {"v1": got[0] + got[1], "v2": got[2]}


def test_the_canary_refuses_a_backend_whose_pods_differ_in_version(tmp_path: Path) -> None:
    """``l4proxy canary --gateway-api`` selects each backend's series by its
    (destination_service_name, destination_version): a backend Service
    whose pods differ in version has its requests counted under each
    pod's, as above, and no one version selects them (its ``unknown``,
    what it read before, only what no pod answered): refused, naming the
    option and the versions; one version per backend selects that one."""
    from dataclasses import replace

    from l4proxy.canary.command import CanaryError, backend_targets
    from tests.test_canary_gateway_api import PER_VERSION, R, _table

    probe = replace(R, weight=50)
    (tmp_path / "one").mkdir()
    assert backend_targets(_table(tmp_path / "one", probe), probe, "default", "cluster.local") == {
        "bootcamp-v1": ("bootcamp-v1", "v1"),
        "bootcamp-v2": ("bootcamp-v2", "v2"),
    }
    text = Path(PER_VERSION).read_text()
    pod = "  - {address: 198.18.0.13, labels: {app: bootcamp, version: v2}}"
    assert text.endswith(pod + "\n")
    mixed = tmp_path / "mixed"
    (mixed / "t").mkdir(parents=True)
    registry = mixed / "registry.yaml"
    registry.write_text(text + pod.replace(".13", ".14").replace("v2}", "v3}") + "\n")
    with pytest.raises(CanaryError) as refused:
        backend_targets(
            _table(mixed / "t", probe, str(registry)), probe, "default", "cluster.local"
        )
    assert "--canary bootcamp-v2: its endpoints differ in version label (v2, v3)" in str(
        refused.value
    )

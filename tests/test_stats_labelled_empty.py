"""A labelled family with no series yet has its ``# HELP`` and ``# TYPE``
lines alone on ``/stats``, as Prometheus' client_python and Envoy's
/stats/prometheus write it; an unlabelled counter not counted yet says
``NAME 0``.

Before, every described family without a series was written ``NAME 0``:
``istio_requests_total 0`` and ``l4proxy_rules_file_held 0`` right after
start, a sample with no labels beside the family's labelled ones, which
``max by (file) (l4proxy_rules_file_held)`` shows as a ``file=""`` series.
A real ``l4proxy run`` of each implementation, two workers (the
supervisor's sum of what each worker says of its families) and one
``--single-process``: every format of /stats.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.mesh import IMPLS
from tests.test_access_log_reopen import sidecar
from tests.test_run_cli import _get

# families with labels, each described where it is counted (none counted
# before a request: no DNS name in the rules, no rule file held)
LABELLED = (
    "istio_requests_total",
    "l4proxy_connections_total",
    "l4proxy_decisions_total",
    "l4proxy_dns_addresses",
    "l4proxy_dns_lookups_total",
    "l4proxy_dns_stale",
    "l4proxy_mirror_requests_total",
    "l4proxy_refused_total",
    "l4proxy_rules_file_held",
    "l4proxy_upstream_connect_failures_total",
)
# unlabelled counters described where they are counted, none counted yet
UNLABELLED = (
    "l4proxy_drain_cut_total",
    "l4proxy_inbound_total",
    "l4proxy_outlier_reports_dropped_total",
    "l4proxy_passthrough_total",
)


def _samples(page: str) -> dict[str, list[str]]:
    """Each family's sample lines by the name they start with."""
    out: dict[str, list[str]] = {}
    for line in page.splitlines():
        if line and not line.startswith("#"):
            out.setdefault(re.split(r"[{ ]", line, maxsplit=1)[0], []).append(line)
    return out


def _types(page: str) -> set[str]:
    return {line.split()[2] for line in page.splitlines() if line.startswith("# TYPE ")}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", [("--workers", "2"), ("--single-process",)], ids=["2", "single"])
def test_a_labelled_family_without_series_has_no_sample(
    impl: str, mode: tuple[str, ...], tmp_path: Path
) -> None:
    labelled = LABELLED + (("l4proxy_worker_connections_total",) if "--workers" in mode else ())
    with sidecar(tmp_path, impl, *mode) as car:
        url = f"http://127.0.0.1:{car.admin}"
        pages = {
            path: _get(url + path)[1]
            for path in ("/stats", "/stats/prometheus", "/stats?format=prometheus")
        }
        as_json = json.loads(_get(url + "/stats?format=json")[1])
        assert car.request("m-1") == 200
        # (the compiled relay hands its rows over once a second: until they came)
        deadline = time.monotonic() + 20
        while "istio_requests_total{" not in (after := _get(url + "/stats")[1]):
            assert time.monotonic() < deadline, after
            time.sleep(0.05)
    for path, page in pages.items():
        samples = _samples(page)
        assert set(labelled) <= _types(page), path
        assert {name: samples[name] for name in labelled if name in samples} == {}, path
        assert [samples.get(name) for name in UNLABELLED] == [
            [f"{name} 0"] for name in UNLABELLED
        ], path
    assert [name for name in labelled if name in as_json] == []
    # after a request: its series, and no sample without labels beside them
    samples = _samples(after)
    for name in ("istio_requests_total", "l4proxy_connections_total", "l4proxy_decisions_total"):
        assert samples.get(name), (name, after)
        assert all(line.startswith(name + "{") for line in samples[name]), samples[name]
    assert "l4proxy_rules_file_held" not in samples

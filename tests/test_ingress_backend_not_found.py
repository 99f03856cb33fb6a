"""An Ingress path whose backend service is not in the registry (no
ServiceEntry loaded yet, or one deleted) is answered 503, as Envoy answers
a route to a cluster it does not have, not 404: the path exists, its
backend does not (a request no path takes still falls to the default
backend, or 404 without one: tests/test_classify.py). Once the service's
ServiceEntry is loaded the path serves, on the same keep-alive connection;
both relay twins, a real worker."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from tests._scripted import Scripted, _response, _status
from tests._worker import _worker_twin, connected, gateway_service, gateway_worker
from tests.test_access_log_worker import _read_lines

INGRESS = """
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: paths}
spec:
  rules:
  - http:
      paths:
      - path: /gone
        pathType: Prefix
        backend: {service: {name: gone, port: {number: 80}}}
"""

# the service the /gone path names, once it is loaded: svc's endpoint
GONE = """
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: gone}
spec:
  hosts: [gone.default.svc.cluster.local]
  addresses: [198.19.200.2]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 127.0.0.1, ports: {http: %d}}
"""


def _get(s: socket.socket, path: str) -> bytes:
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
    return _response(s)


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_path_whose_service_is_not_loaded_answers_503_until_it_is(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _worker_twin(which, monkeypatch)
    backend = Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(backend.endpoint[1]) + INGRESS)
    before: list[bytes] = []
    after: list[bytes] = []

    r, w = os.pipe()

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request", access_log_fd=w) as (
            watcher,
            _,
            address,
        ):
            loop = asyncio.get_running_loop()
            async with connected(address) as s:
                for path in ("/gone/a", "/other", "/gone"):
                    before.append(await loop.run_in_executor(None, _get, s, path))
                generation = watcher.state.generation
                rules.write_text(
                    gateway_service(backend.endpoint[1]) + INGRESS + GONE % backend.endpoint[1]
                )
                assert watcher.load_now() and watcher.state.generation > generation
                for _ in range(100):  # (the worker takes the new table)
                    got = await loop.run_in_executor(None, _get, s, "/gone/b")
                    if _status(got) == 200:
                        break
                    await asyncio.sleep(0.02)
                after.append(got)

    try:
        asyncio.run(main())
    finally:
        backend.close()
        os.close(w)
    lines = _read_lines(r)
    # the unloaded service's path: 503; the default backend (svc) takes
    # what no path matches
    assert [_status(r) for r in before] == [503, 200, 503], before
    assert before[0].endswith(b"\r\n\r\nno healthy upstream"), before[0]
    assert [_status(r) for r in after] == [200], after
    # (the backend saw the default backend's request and the loaded path's)
    assert [r.split(b" ", 2)[1] for r in backend.requests] == [b"/other", b"/gone/b"]
    # its access log line: Envoy's NC, cluster_not_found, no cluster
    gone = [ln for ln in lines if ln.startswith(b"[") and b'"GET /gone/a ' in ln]
    assert len(gone) == 1, lines
    assert b" 503 NC cluster_not_found " in gone[0], gone

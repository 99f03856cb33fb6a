"""GETs to the sidecars' admin endpoints and to Prometheus, never through a proxy.

``urllib.request.urlopen`` honours ``http_proxy``/``HTTP_PROXY`` from the
environment: in a Job or a shell with a proxy for the outside world, reads
of ``127.0.0.1:15000`` or an in-cluster Prometheus went to the proxy (which
answered for them, or could not reach them). These are always direct, as
the Kubernetes API client (:mod:`l4proxy.canary.kube`) is.
"""

from __future__ import annotations

import urllib.request
from typing import IO

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def urlopen(url: str, timeout: float) -> IO[bytes]:
    """``urllib.request.urlopen`` with no proxy, whatever the environment says."""
    response: IO[bytes] = _DIRECT.open(url, timeout=timeout)
    return response

"""Endpoint health: passive outlier detection on gateway failures.

An endpoint that fails ``consecutive_failures`` times in a row is ejected
for ``base_ejection`` seconds times the number of times it has been ejected
(capped at ``max_ejection``), like Envoy's outlier detection. While ejected
the router skips it; when the time is up it is tried again (a success clears
its count, a failure counts again).

What counts (the data planes report it; ``l4proxy/sidecar/worker.py`` feeds
it here): a *failure* is a gateway failure, the proxy's own evidence that the
endpoint is broken; Envoy maps these to 503 (504 for a timeout) and counts
them in ``consecutive_gateway_failure`` and ``consecutive_5xx`` when local and
external errors are not split (its default). ``consecutive_failures`` (3;
Envoy's default is 5) is the one threshold for both kinds:

* a failed connect: refused, timed out, a name not resolved (``kind``
  ``"connect"``; both HTTP routing modes, and TCP);
* with ``--http-routing request``, a response that fails on an established
  connection (``kind`` ``"response"``): the connection closed or reset before
  any response byte (the client gets the proxy's 502), or before the
  response's end (a body cut short), or a response the proxy cannot frame
  (502). A request on a *reused* connection that is sent once more (the
  relay's one retry) is not counted against the endpoint whose connection
  failed: a server may close an idle keep-alive connection at any moment
  (RFC 9112 9.3.1), the retry is for that race, and an endpoint that is
  really down fails its new connections. The retry's own failure counts.

A *success*: with ``--http-routing request``, a complete response, whatever
its status; per connection (``--http-routing connection``, TCP), a connect
(the proxy sees no response there). A connect in request mode is no
success: an endpoint that accepts and resets every request would clear its
count with each connect (Envoy does not map a connect to a result either
where a protocol runs above it). Nor is a response head: Envoy reports a
status when its head arrives and a reset after it; counted so, an endpoint
that cuts every body short alternates success and failure and is never
ejected. A status the application sends itself (its 500, or its own
502/503/504) is not counted either way: Envoy counts those too, but Istio
turns detection on only where a DestinationRule's ``outlierDetection`` asks
for it, while l4proxy's is always on, with no such switch; an application
that answers 503 to every request of a kind (a dependency down) would lose
half its pods to ejection. Neither counts: the proxy's own local answers
(404, 503 ``no healthy upstream``), a client's error or a client gone, an
idle timeout, and running out of fds (ours).

The request-mode relay reports every failure, but a success only when it may
change something: an endpoint's first answer, its first after a failure of
its own, and every endpoint's first after a failure reported by another path
(the L4 path, the compiled relay's pure half): the steady state calls
nothing here (the compiled relay stays without the GIL). ``successes`` in
:meth:`describe` counts those reports, not every answer.

As in Envoy:

* only time ends an ejection: a connect that was under way when the endpoint
  was ejected may still succeed, and that does not bring it back early;
* failures while ejected (those connects, or panic mode, below) are not
  counted towards the next ejection, which would otherwise follow the first
  failure after it came back, twice as long;
* the multiplier decays: each ``base_ejection`` seconds (Envoy's 10 s
  ``interval`` by default) an endpoint stays healthy after an ejection takes
  one ejection off its count, so a blip a week after a bad day is ejected for
  ``base_ejection`` again, not ``max_ejection``.

Bounded ejection (``max_ejection_percent``, default 50): an ejection that
would leave more than that share of the endpoints that the caller names as
*peers* (the service's endpoints on that port) ejected does not happen; the
failure is still counted (``ejections_suppressed``), and the endpoint is
ejected on a later failure once another one has come back. At least one
endpoint may always be ejected, whatever the percentage (as in Envoy), so a
single bad pod of two or three is still steered around. The bound keeps a
burst of failures that is not the endpoints' fault (our own fd limit, a
network blip) from ejecting most of a service at once. 50 rather than
Envoy's/Istio's 10: with the two or three pods a subset typically has here,
10 % would mean "one", which is what the floor gives anyway.
``RouteTable.decide`` falls back to all endpoints when every one is
unhealthy (panic mode), so ejection steers traffic but never empties a
service.

State is keyed by ``(address, port)`` and survives rule reloads: a reload
must not forget that a pod is down. It is per worker process. The worker
drops the state of endpoints no table names any more (:meth:`retain`), or pod
churn would grow it for the life of the sidecar.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class _EndpointLike(Protocol):
    @property
    def address(self) -> str: ...
    @property
    def port(self) -> int: ...


@dataclass
class _State:
    consecutive_failures: int = 0
    connect_failures: int = 0
    response_failures: int = 0
    successes: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    last_error: str = ""
    ejections_suppressed: int = 0


class EndpointHealth:
    def __init__(
        self,
        consecutive_failures: int = 3,
        base_ejection: float = 10.0,
        max_ejection: float = 300.0,
        max_ejection_percent: float = 50.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consecutive_failures = consecutive_failures
        self.max_ejection_percent = max_ejection_percent
        self.base_ejection = base_ejection
        self.max_ejection = max_ejection
        self._clock = clock
        self._states: dict[tuple[str, int], _State] = {}

    def _state(self, ep: _EndpointLike) -> _State:
        key = (ep.address, ep.port)
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = _State()
        return st

    def is_healthy(self, ep: _EndpointLike) -> bool:
        st = self._states.get((ep.address, ep.port))
        return st is None or st.ejected_until <= self._clock()

    def success(self, ep: _EndpointLike) -> None:
        st = self._state(ep)
        st.consecutive_failures = 0
        st.successes += 1

    def failure(
        self,
        ep: _EndpointLike,
        error: str,
        peers: Sequence[_EndpointLike] = (),
        kind: str = "connect",
    ) -> None:
        """Count a gateway failure; eject after enough in a row, within the bound.

        *peers*: the endpoints *ep* shares its service port with (itself
        included or not); empty means no bound is applied. *kind*:
        ``"connect"`` or ``"response"`` (see the module's doc); both count
        alike, the totals are kept apart for :meth:`describe`.
        """
        st = self._state(ep)
        if kind == "response":
            st.response_failures += 1
        else:
            st.connect_failures += 1
        st.last_error = error
        now = self._clock()
        if st.ejected_until > now:
            return  # ejected: not counted towards the next ejection
        st.consecutive_failures += 1
        if st.consecutive_failures < self.consecutive_failures:
            return
        if not self._may_eject(ep, peers):
            st.ejections_suppressed += 1
            return
        if st.ejections and self.base_ejection > 0:  # healthy since the last one: decay
            healthy_for = now - st.ejected_until
            st.ejections = max(0, st.ejections - int(healthy_for // self.base_ejection))
        # (counted no further than the maximum needs: after a very bad day
        # the decay takes at most max_ejection / base_ejection spans)
        most = 1
        if self.base_ejection > 0:
            most = max(1, math.ceil(self.max_ejection / self.base_ejection))
        st.ejections = min(st.ejections + 1, most)
        duration = min(self.base_ejection * st.ejections, self.max_ejection)
        st.ejected_until = now + duration
        st.consecutive_failures = 0

    def retain(self, endpoints: Iterable[_EndpointLike]) -> int:
        """Forget every endpoint but *endpoints* (those the live table names);
        returns how many were forgotten."""
        keep = {(ep.address, ep.port) for ep in endpoints}
        gone = [key for key in self._states if key not in keep]
        for key in gone:
            del self._states[key]
        return len(gone)

    def _may_eject(self, ep: _EndpointLike, peers: Sequence[_EndpointLike]) -> bool:
        others = {(p.address, p.port) for p in peers} - {(ep.address, ep.port)}
        if not others:
            return True
        total = len(others) + 1
        allowed = max(1, int(total * self.max_ejection_percent / 100))
        ejected = sum(1 for a, p in others if not self._healthy_key((a, p)))
        return ejected + 1 <= allowed

    def _healthy_key(self, key: tuple[str, int]) -> bool:
        st = self._states.get(key)
        return st is None or st.ejected_until <= self._clock()

    def describe(self, ep: _EndpointLike) -> dict[str, Any]:
        st = self._states.get((ep.address, ep.port)) or _State()
        now = self._clock()
        return {
            "healthy": st.ejected_until <= now,
            "ejected_for_s": round(max(0.0, st.ejected_until - now), 3),
            "ejections": st.ejections,
            "consecutive_failures": st.consecutive_failures,
            "connect_failures": st.connect_failures,
            "response_failures": st.response_failures,
            "successes": st.successes,
            "last_error": st.last_error,
            "ejections_suppressed": st.ejections_suppressed,
        }

"""Endpoint health: passive outlier detection on connect failures.

An endpoint that fails ``consecutive_failures`` connects in a row is ejected
for ``base_ejection`` seconds times the number of times it has been ejected
(capped at ``max_ejection``), like Envoy's outlier detection. While ejected
the router skips it; when the time is up it is tried again (a success clears
its count, a failure counts again). As in Envoy:

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
    total_failures: int = 0
    total_successes: int = 0
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
        st.total_successes += 1

    def failure(self, ep: _EndpointLike, error: str, peers: Sequence[_EndpointLike] = ()) -> None:
        """Count a failed connect; eject after enough in a row, within the bound.

        *peers*: the endpoints *ep* shares its service port with (itself
        included or not); empty means no bound is applied.
        """
        st = self._state(ep)
        st.total_failures += 1
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
            "connect_failures": st.total_failures,
            "connect_successes": st.total_successes,
            "last_error": st.last_error,
            "ejections_suppressed": st.ejections_suppressed,
        }

"""Endpoint health: passive outlier detection on connect failures.

An endpoint that fails ``consecutive_failures`` connects in a row is ejected
for ``base_ejection`` seconds times the number of times it has been ejected
(capped at ``max_ejection``), like Envoy's outlier detection. At most
``max_ejection_percent`` of a subset is ever treated as unhealthy by the
router (``RouteTable.decide`` falls back to all endpoints when every one is
unhealthy), so ejection can steer traffic but never empties a service.

State is keyed by ``(address, port)`` and survives rule reloads: a reload
must not forget that a pod is down.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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


class EndpointHealth:
    def __init__(
        self,
        consecutive_failures: int = 3,
        base_ejection: float = 10.0,
        max_ejection: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consecutive_failures = consecutive_failures
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
        st.ejected_until = 0.0

    def failure(self, ep: _EndpointLike, error: str) -> None:
        st = self._state(ep)
        st.consecutive_failures += 1
        st.total_failures += 1
        st.last_error = error
        if st.consecutive_failures >= self.consecutive_failures and self.is_healthy(ep):
            st.ejections += 1
            duration = min(self.base_ejection * st.ejections, self.max_ejection)
            st.ejected_until = self._clock() + duration
            st.consecutive_failures = 0

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
        }

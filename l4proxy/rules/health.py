"""Endpoint health: passive outlier detection.

Two detections, per endpoint (``address, port``):

* the sidecar's own, always on, on gateway failures only (below);
* a DestinationRule's ``trafficPolicy.outlierDetection``
  (:class:`~l4proxy.rules.routing.OutlierPolicy`, given per endpoint by
  :meth:`EndpointHealth.configure`), which also counts the application's
  5xx responses, as Istio's does (see "A DestinationRule's detection").

The sidecar's own detection:

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
  any response byte (the client gets the proxy's 503, Envoy's), or before the
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
would leave more than that share of a destination's endpoints ejected does
not happen; the failure is still counted (``ejections_suppressed``), and the
endpoint is ejected on a later failure once another one has come back. The
caller names the destinations as *groups*: each destination that can send
requests to the endpoint (a route's subset on its port, or a service port's
own; ``RouteTable.ejection_groups``), with all of its endpoints, and the
bound must hold in each. Envoy bounds an ejection per cluster, and Istio
makes a cluster of each subset (``outbound|8080|v1|svc``): over the whole
service port, a subset of two pods of four could lose both (two of four is
50 %), and its requests then found no healthy upstream. State is one per
endpoint, though (below): a pod in two destinations (subset v1 and the
service as a whole, or two subsets whose labels overlap) has one run of
failures and one ejection, counted from whichever route sent the request,
where Envoy has one per cluster; so it is ejected only where that leaves
every destination that holds it within the bound, Envoy's guarantee for
each of its clusters. (A destination of four pods may then keep two
failing pods of a subset of two where Envoy's cluster of the four would
eject both: its subset's cluster would not.) At least one
endpoint may always be ejected, whatever the percentage (as Envoy did
before 1.27, and does with ``always_eject_one_host``), so a single bad pod of
two or three is still steered around. The bound keeps a
burst of failures that is not the endpoints' fault (our own fd limit, a
network blip) from ejecting most of a service at once. 50 rather than
Envoy's/Istio's 10: with the two or three pods a subset typically has here,
10 % would mean "one", which is what the floor gives anyway.
``RouteTable.decide`` falls back to all endpoints when every one is
unhealthy (panic mode), so ejection steers traffic but never empties a
service.

A DestinationRule's detection (``outlierDetection``; Istio's defaults in
:class:`~l4proxy.rules.routing.OutlierPolicy`), where the table's
``outlier_policies()`` names the endpoint (several rules reaching one pod:
the most eager of each field), replaces the sidecar's for that endpoint:

* ``consecutive5xxErrors`` (5; 0: off): a run of 5xx responses ends in an
  ejection. The relay reports the application's 5xx responses of these
  endpoints (``EndpointSettings.report_5xx``), each complete one, and each
  try that the route's retry policy retried; the proxy's own gateway failures
  count too, as the 503 (504) Envoy makes of them.
* ``consecutiveGatewayErrors`` (0: off): the same for 502, 503 and 504, and
  the proxy's own failures; another 5xx ends the run, as in Envoy.
* ``splitExternalLocalOriginErrors``: the proxy's own failures count only
  towards ``consecutiveLocalOriginFailures`` (5; 0 is unset, 5, as Istio's
  pilot sets it only above 0); any response, 5xx
  or not, ends that run (Envoy ends it at a connect, which a pooled relay
  does not report).
* a response below 500 ends every run;
* ``baseEjectionTime`` (30 s) times the number of ejections, up to 300 s or
  the base if longer (Envoy's ``max_ejection_time``); each ``interval`` (10
  s) healthy after an ejection takes one off the multiplier;
* ``maxEjectionPercent`` (10) of each destination's endpoints (above: the
  subset's, as Envoy's cluster is the subset) may be ejected,
  counting the one to be, with no floor: Envoy's rule since 1.27 (Istio
  never sets ``always_eject_one_host``), so with the default 10 % a
  destination of fewer than 10 pods ejects none, and a single pod is never
  ejected below 100 %. An ejection the bound stops ends the run, as in
  Envoy: the endpoint needs another whole run to be ejected;
* ``minHealthPercent`` (0) is the destination's panic threshold, applied by
  the route table (``RouteTable.decide``): with 0, Istio's default, a
  destination whose every endpoint is ejected answers 503 ``no healthy
  upstream`` until one comes back; with the sidecar's own detection (or
  above the threshold) it takes them all.

Differences from Envoy: an ejection ends when its time is up, not at the next
``interval`` sweep; there is no success-rate detection (Istio turns it off);
the reports of the compiled loop and of its pure slow path reach Python by
two queues, so a 5xx and a 200 on the same endpoint at the same moment may be
counted in either order (a run off by one, once).

A reload that changes an endpoint's detection (a rule's policy added,
changed or removed) starts its runs again, and ends an ejection that a rule's
detection made: Envoy builds a changed cluster anew, and removing a
misbehaving ``outlierDetection`` must be a one-step rollback. An ejection the
sidecar's own detection made stays.

State is keyed by ``(address, port)`` and survives rule reloads: a reload
must not forget that a pod is down. It is per worker process. The worker
drops the state of endpoints no table names any more (:meth:`retain`), or pod
churn would grow it for the life of the sidecar.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Protocol

from l4proxy.rules.routing import OutlierPolicy

# Envoy counts the proxy's own failures as these statuses when local and
# external errors are not split: a failed or reset connection 503, a timeout 504
_GATEWAY_STATUSES = frozenset({502, 503, 504})


class _EndpointLike(Protocol):
    @property
    def address(self) -> str: ...
    @property
    def port(self) -> int: ...


@dataclass(frozen=True, slots=True)
class _Params:
    """What one endpoint's detection uses: the sidecar's own (gateway
    failures only) or a DestinationRule's (:class:`OutlierPolicy`)."""

    consecutive_5xx: int  # 0: off
    consecutive_gateway: int  # 0: off
    consecutive_local: int  # split_local only; 0: off
    split_local: bool
    decay: float  # seconds healthy that take one ejection off
    base_ejection: float
    max_ejection: float
    max_ejection_percent: float
    source: str  # "sidecar" or "DestinationRule" (describe())

    @classmethod
    def of(cls, policy: OutlierPolicy) -> _Params:
        return cls(
            policy.consecutive_5xx,
            policy.consecutive_gateway,
            policy.consecutive_local,
            policy.split_local,
            policy.interval,
            policy.base_ejection,
            policy.max_ejection,
            policy.max_ejection_percent,
            "DestinationRule",
        )


@dataclass
class _State:
    consecutive_failures: int = 0  # the sidecar's gateway failures; a rule's 5xx
    consecutive_gateway: int = 0  # a rule's consecutiveGatewayErrors run
    consecutive_local: int = 0  # a rule's split local-origin run
    connect_failures: int = 0
    response_failures: int = 0
    status_failures: int = 0  # 5xx responses counted (a rule's detection)
    successes: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    last_error: str = ""
    ejections_suppressed: int = 0
    ejected_by: str = ""  # the detection (_Params.source) of the last ejection

    def reset(self) -> None:
        self.consecutive_failures = self.consecutive_gateway = self.consecutive_local = 0


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
        self._sidecar = _Params(
            0,
            consecutive_failures,
            0,
            False,
            base_ejection,
            base_ejection,
            max(max_ejection, base_ejection),  # (a base above the cap is its own, as Envoy)
            max_ejection_percent,
            "sidecar",
        )
        self._params: dict[tuple[str, int], _Params] = {}
        self._policies: dict[tuple[str, int], OutlierPolicy] = {}

    def configure(self, policies: Mapping[tuple[str, int], OutlierPolicy]) -> None:
        """The DestinationRules' ``outlierDetection`` per endpoint (address,
        port), from the live table (``RouteTable.outlier_policies()``); every
        other endpoint takes the sidecar's own detection. The endpoints'
        counts and ejections are kept: a reload must not forget that a pod
        is down, nor that it is failing."""
        if policies == self._policies:  # (no copy: tens of thousands at a swap)
            return
        old = self._params
        self._policies = dict(policies)
        self._params = {key: _Params.of(p) for key, p in self._policies.items()}
        for key in old.keys() | self._params.keys():
            st = self._states.get(key)
            if st is None or old.get(key) == self._params.get(key):
                continue
            st.reset()  # (runs counted under other settings)
            if st.ejected_by == "DestinationRule":
                st.ejected_until = min(st.ejected_until, self._clock())

    def policy(self, ep: _EndpointLike) -> OutlierPolicy | None:
        """The DestinationRule's detection *ep* takes (None: the sidecar's)."""
        return self._policies.get((ep.address, ep.port))

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
        """A complete response below 500 (per connection: a connect): every
        run of failures ends."""
        st = self._state(ep)
        st.reset()
        st.successes += 1

    def failure(
        self,
        ep: _EndpointLike,
        error: str,
        groups: Sequence[Sequence[_EndpointLike]] = (),
        kind: str = "connect",
    ) -> None:
        """Count a gateway failure, the proxy's own (a failed connect, a
        response that failed); eject after enough in a row, within the bound.

        *groups*: the destinations that hold *ep*, each as its endpoints
        (*ep* included or not), the bound applied in each; empty means none
        is applied (a rule's: *ep* alone). *kind*:
        ``"connect"`` or ``"response"`` (see the module's doc); both count
        alike, the totals are kept apart for :meth:`describe`.
        """
        st = self._state(ep)
        if kind == "response":
            st.response_failures += 1
        else:
            st.connect_failures += 1
        st.last_error = error
        p = self._params.get((ep.address, ep.port), self._sidecar)
        if self._ejected(st):
            return
        if p.split_local:  # a rule's: its own run, and no 5xx
            st.consecutive_local += 1
            tripped = 0 < p.consecutive_local <= st.consecutive_local
        else:  # as Envoy's 503 (504 for a timeout): both runs
            st.consecutive_failures += 1
            st.consecutive_gateway += 1
            tripped = self._tripped(st, p)
        if tripped:
            self._eject(ep, st, p, groups)

    def status(
        self, ep: _EndpointLike, code: int, groups: Sequence[Sequence[_EndpointLike]] = ()
    ) -> None:
        """Count the application's 5xx response *code* (a DestinationRule's
        detection only: the relay reports them for its endpoints); *groups*
        as :meth:`failure`'s."""
        st = self._state(ep)
        st.status_failures += 1
        st.last_error = f"upstream answered {code}"
        p = self._params.get((ep.address, ep.port))
        if p is None or self._ejected(st):
            return
        # a response: the connection worked (the split local run ends, as
        # Envoy's ends at a connect)
        st.consecutive_local = 0
        st.consecutive_failures += 1
        if code in _GATEWAY_STATUSES:
            st.consecutive_gateway += 1
        else:  # another 5xx ends the gateway run (Envoy)
            st.consecutive_gateway = 0
        if self._tripped(st, p):
            self._eject(ep, st, p, groups)

    @staticmethod
    def _tripped(st: _State, p: _Params) -> bool:
        return (0 < p.consecutive_5xx <= st.consecutive_failures) or (
            0 < p.consecutive_gateway <= st.consecutive_gateway
        )

    def _ejected(self, st: _State) -> bool:
        # ejected: failures are not counted towards the next ejection
        return st.ejected_until > self._clock()

    def _eject(
        self,
        ep: _EndpointLike,
        st: _State,
        p: _Params,
        groups: Sequence[Sequence[_EndpointLike]],
    ) -> None:
        if not all(self._may_eject(ep, peers, p) for peers in groups or ((),)):
            st.ejections_suppressed += 1
            if p.source != "sidecar":  # Envoy: the run ends, another is needed
                st.reset()
            return
        now = self._clock()
        if st.ejections and p.decay > 0:  # healthy since the last one: decay
            healthy_for = now - st.ejected_until
            st.ejections = max(0, st.ejections - int(healthy_for // p.decay))
        # (counted no further than the maximum needs: after a very bad day
        # the decay takes at most max_ejection / base_ejection spans)
        most = 1
        if p.base_ejection > 0:
            most = max(1, math.ceil(p.max_ejection / p.base_ejection))
        st.ejections = min(st.ejections + 1, most)
        duration = min(p.base_ejection * st.ejections, p.max_ejection)
        st.ejected_until = now + duration
        st.ejected_by = p.source
        st.reset()

    def retain(self, endpoints: Iterable[_EndpointLike]) -> int:
        """Forget every endpoint but *endpoints* (those the live table names);
        returns how many were forgotten."""
        return self.retain_keys({(ep.address, ep.port) for ep in endpoints})

    def retain_keys(self, keep: AbstractSet[tuple[str, int]]) -> int:
        """:meth:`retain` of the (address, port) pairs *keep* (a table's
        ``named_endpoints()``, made with it: nothing built at the swap)."""
        gone = [key for key in self._states if key not in keep]
        for key in gone:
            del self._states[key]
        return len(gone)

    def _may_eject(self, ep: _EndpointLike, peers: Sequence[_EndpointLike], p: _Params) -> bool:
        """Whether the bound lets *ep* be ejected now from the destination
        whose endpoints are *peers*: the sidecar's with a floor of one, a
        rule's as Envoy since 1.27 (the share ejected, counting *ep*, at
        most the percentage). No *peers*: the sidecar's always may (no
        bound), a rule's counts *ep* alone."""
        others = {(q.address, q.port) for q in peers} - {(ep.address, ep.port)}
        ejected = sum(1 for key in others if not self._healthy_key(key))
        total = len(others) + 1
        if p.source != "sidecar":
            return (ejected + 1) * 100 <= p.max_ejection_percent * total
        if not others:
            return True
        return ejected + 1 <= max(1, int(total * p.max_ejection_percent / 100))

    def _healthy_key(self, key: tuple[str, int]) -> bool:
        st = self._states.get(key)
        return st is None or st.ejected_until <= self._clock()

    def describe(self, ep: _EndpointLike) -> dict[str, Any]:
        key = (ep.address, ep.port)
        st = self._states.get(key) or _State()
        p = self._params.get(key, self._sidecar)
        now = self._clock()
        return {
            "healthy": st.ejected_until <= now,
            "ejected_for_s": round(max(0.0, st.ejected_until - now), 3),
            "ejections": st.ejections,
            "consecutive_failures": max(
                st.consecutive_failures, st.consecutive_gateway, st.consecutive_local
            ),
            "connect_failures": st.connect_failures,
            "response_failures": st.response_failures,
            "status_failures": st.status_failures,
            "successes": st.successes,
            "last_error": st.last_error,
            "ejections_suppressed": st.ejections_suppressed,
            "outlier_detection": p.source,
        }

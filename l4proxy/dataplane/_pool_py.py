"""Upstream connection pools of one worker, sans-IO; the pure twin.

The per-request relay checks out an upstream connection per request and
returns it when the exchange is over (:class:`~l4proxy.dataplane._exchange_py.Release`).
:class:`Pools` decides which idle connection to hand out, which to keep and
which to close; it never touches a socket. Connections are opaque handles
(the relay uses fds); endpoints are ``(host, port)`` keys.

Theory of operation
-------------------
* One LIFO stack of idle connections per endpoint: the most recently used
  connection is handed out first (it is the least likely to have been closed
  by the server's idle timeout), the oldest ones expire.
* A connection is only ever idle *or* checked out. The relay watches idle
  connections for readability: an idle connection that turns readable was
  closed by the server (or sent bytes nobody asked for) and is
  :meth:`Pools.evict`-ed, never handed out (Envoy hands out a pooled
  connection only when known idle). One whose FIN came in the very read
  that completed its last response is checked in not reusable (the relays
  ask for EPOLLRDHUP, which says so on that event): pooled, it would be
  handed out in the same step, before any idle event could evict it (a
  pipelined request, the next client's head in the same epoll batch).
* Bounds: at most ``max_idle`` idle connections per endpoint (the excess is
  closed at check-in), ``idle_timeout`` seconds idle (closed by
  :meth:`Pools.expire`), ``max_requests`` requests per connection (closed
  at check-in once reached; 0 means unlimited).
* ``active`` counts checked-out connections per endpoint, connecting ones
  included: the live request count LEAST_REQUEST and outlier detection read.
  A request counts from its assignment (:meth:`Pools.connecting`), as
  Envoy's LEAST_REQUEST and HAProxy's leastconn count: counted from the
  connect's end, every request sent while an endpoint was slow to accept
  saw it idle and went to it.
* ``active`` also counts what LEAST_REQUEST must see that is not this pool's:
  :meth:`Pools.add_external` (any thread), the worker's connections routed
  at L4 and the tunnels (Upgrade, CONNECT) the relay handed to the L4 pump,
  until they end. ``on_active``, when set, hears of every change of this
  pool's own count (the compiled relay feeds its slow path's count to its
  C loop's LEAST_REQUEST this way).
* An endpoint the route table no longer names (a pod a reload removed)
  gives back its idle connections at once (:meth:`Pools.remove_endpoint`),
  and those in flight to it are closed at check-in, not pooled: kept, they
  held a draining pod's connections open for ``idle_timeout``. Named again
  before they are checked in (:meth:`Pools.restore_endpoint`), they are
  pooled as before.
* Per endpoint, ``max_requests`` and ``idle_timeout`` may differ from the
  options' (an Istio DestinationRule's ``connectionPool`` per destination):
  :meth:`Pools.endpoint_settings`, an :class:`EndpointSettings` per
  endpoint (the relay's connect timeout too). The whole mapping is replaced
  at once; an endpoint it does not name has the options'. A change applies
  from then on: ``max_requests`` at the next check-in, ``idle_timeout`` at
  the next :meth:`Pools.expire`.
* An endpoint's circuit breakers (``max_connections``, ``max_pending``,
  ``max_active``, in its :class:`EndpointSettings`) are the relay's to
  apply (see "Circuit breakers" in ``_relay_py.py``): the pool counts what
  they limit, :meth:`Pools.connections` (checked out, connecting included,
  and idle) and :meth:`Pools.own_active` (``active`` without
  :meth:`Pools.add_external`'s), and decides nothing more.

Every decision returns the handles the relay must close; counters explain
them in ``/stats`` and ``/clusters``.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

__all__ = ["EndpointSettings", "PoolOptions", "Pools", "checked_endpoint_settings"]

MAX_REQUESTS_LIMIT: Final = 2**31 - 1  # the compiled relay's int (Istio's is an int32)

COUNTERS: Final = (
    "opened",  # new upstream connections, once connected (a checkout that found none idle)
    "reused",  # checkouts served from the idle stack
    "returned",  # check-ins kept idle
    "closed_unreusable",  # check-ins the exchange said not to reuse
    "closed_max_requests",
    "closed_overflow",  # over max_idle at check-in
    "evicted",  # idle connections the server closed (or spoke on)
    "expired",  # idle longer than idle_timeout
    "closed_removed",  # the route table no longer names its endpoint (idle, or at check-in)
)


@dataclass(frozen=True)
class PoolOptions:
    max_idle: int = 1024  # per endpoint (idle ones are at most the peak of requests in flight)
    idle_timeout: float = 30.0  # seconds
    max_requests: int = 0  # per connection; 0: unlimited

    def __post_init__(self) -> None:
        if self.max_idle < 0 or self.idle_timeout < 0 or self.max_requests < 0:
            raise ValueError(f"pool options must not be negative: {self}")


class EndpointSettings(NamedTuple):
    """One upstream endpoint's pool and connect settings, resolved (an
    Istio DestinationRule's ``trafficPolicy.connectionPool``), and whether
    outlier detection counts its 5xx answers (its ``outlierDetection``'s
    ``consecutive5xxErrors`` or ``consecutiveGatewayErrors``): with
    *report_5xx* the relay reports each final response of status 500 or
    above through ``answered_5xx`` (every one, a failure for the news of
    ``answered``), without it the application's statuses are answers like
    any other (see "Outlier detection" in ``_relay_py.py``)."""

    max_requests: int  # per connection; 0: unlimited (http.maxRequestsPerConnection)
    idle_timeout: float  # seconds an idle pooled connection is kept (http.idleTimeout)
    connect_timeout: float  # seconds (tcp.connectTimeout)
    report_5xx: bool = False  # its 5xx answers to answered_5xx (outlierDetection)
    # circuit breakers, per endpoint and relay (see "Circuit breakers" in
    # _relay_py.py); 0: unlimited
    max_connections: int = 0  # open upstream connections (tcp.maxConnections)
    max_pending: int = 0  # requests waiting for one (http.http1MaxPendingRequests)
    max_active: int = 0  # requests in flight (http.http2MaxRequests)


def checked_endpoint_settings(
    settings: Mapping[tuple[str, int], Any],
) -> dict[tuple[str, int], EndpointSettings]:
    """*settings* (``HttpRelay.endpoint_settings()``'s) as a new dict, keys
    ``(str, int)``, values :class:`EndpointSettings` (a tuple of 3 to 7
    fields, the missing ones their defaults: ``report_5xx`` False, the
    circuit breakers 0); ValueError for a value out of range: a count
    (``max_requests``, ``max_connections``, ``max_pending``,
    ``max_active``) not an int from 0 to 2**31 - 1, a timeout not a finite
    number of seconds above 0, a ``report_5xx`` not a bool."""
    out: dict[tuple[str, int], EndpointSettings] = {}
    n_fields = len(EndpointSettings._fields)
    # each distinct value checked once: a table's tens of thousands of
    # endpoints share a few (checked on the event loop at each swap)
    # (by value and type: True == 1, yet a bool is no count)
    seen: dict[tuple[Any, ...], EndpointSettings] = {}
    for key, value in settings.items():
        host, port = key
        value = tuple(value)
        typed = (value, tuple(map(type, value)))
        if (done := seen.get(typed)) is not None:
            out[(str(host), int(port))] = done
            continue
        if not 3 <= len(value) <= n_fields:
            raise ValueError(f"{host}:{port}: 3 to {n_fields} settings, not {len(value)}")
        s = EndpointSettings(*value)
        for name in ("max_requests", "max_connections", "max_pending", "max_active"):
            n = getattr(s, name)
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_REQUESTS_LIMIT:
                raise ValueError(
                    f"{host}:{port}: {name} must be an int from 0 (unlimited) "
                    f"to {MAX_REQUESTS_LIMIT}, not {n!r}"
                )
        for name in ("idle_timeout", "connect_timeout"):
            t = getattr(s, name)
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf:
                raise ValueError(
                    f"{host}:{port}: {name} must be a finite number of seconds above 0, not {t!r}"
                )
        if not isinstance(s.report_5xx, bool):
            raise ValueError(f"{host}:{port}: report_5xx must be a bool, not {s.report_5xx!r}")
        out[(str(host), int(port))] = seen[typed] = s._replace(
            idle_timeout=float(s.idle_timeout), connect_timeout=float(s.connect_timeout)
        )
    return out


@dataclass
class _Idle:
    handle: Hashable
    since: float
    requests: int


@dataclass
class _Endpoint:
    idle: list[_Idle] = field(default_factory=list)  # a stack: newest last
    active: int = 0
    out: set[Hashable] = field(default_factory=set)  # the checked-out handles


class Pools:
    """The idle and checked-out upstream connections of one worker."""

    def __init__(self, options: PoolOptions | None = None) -> None:
        self.options = options or PoolOptions()
        self._endpoints: dict[Hashable, _Endpoint] = {}
        self._where: dict[Hashable, Hashable] = {}  # idle handle -> endpoint
        self._requests: dict[Hashable, int] = {}  # checked-out handle -> requests so far
        self._removed: set[Hashable] = set()  # checked out; closed at check-in (remove_endpoint)
        self.counters: collections.Counter[str] = collections.Counter({k: 0 for k in COUNTERS})
        # add_external()'s counts: written by other threads, hence the lock
        self._external: dict[Hashable, int] = {}
        self._external_lock = threading.Lock()
        self.on_active: Callable[[Hashable, int], None] | None = None
        # endpoint_settings(): the endpoints whose settings are not the options'
        self.settings: dict[Hashable, EndpointSettings] = {}

    def endpoint_settings(self, settings: Mapping[Any, EndpointSettings]) -> list[Hashable]:
        """The endpoints' own ``max_requests`` and ``idle_timeout`` (the
        pool's thread), replacing the previous ones; an endpoint not in
        *settings* has the options'. Applied from now on: at the next
        check-in, the next expire(). Returned: the idle connections that
        have already served as many requests as their endpoint now allows,
        to close (counted ``closed_max_requests``, as at a check-in)."""
        self.settings = dict(settings)
        out: list[Hashable] = []
        for key, ep in self._endpoints.items():
            limit = self._max_requests(key)
            if limit and any(i.requests >= limit for i in ep.idle):
                out += [i.handle for i in ep.idle if i.requests >= limit]
                ep.idle = [i for i in ep.idle if i.requests < limit]
        for h in out:
            del self._where[h]
        self.counters["closed_max_requests"] += len(out)
        return out

    def _max_requests(self, endpoint: Hashable) -> int:
        """Requests a connection to *endpoint* carries (its own, else the options')."""
        s = self.settings.get(endpoint)
        return self.options.max_requests if s is None else s.max_requests

    def _counted(self, endpoint: Hashable, ep: _Endpoint, n: int) -> None:
        ep.active += n
        if self.on_active is not None:
            self.on_active(endpoint, n)

    def add_external(self, endpoint: Hashable, n: int) -> None:
        """*n* more connections or requests to *endpoint* that are not this
        pool's (any thread): active() counts them, as LEAST_REQUEST must."""
        with self._external_lock:
            left = self._external.get(endpoint, 0) + n
            if left:
                self._external[endpoint] = left
            else:
                self._external.pop(endpoint, None)

    def _ep(self, endpoint: Hashable) -> _Endpoint:
        ep = self._endpoints.get(endpoint)
        if ep is None:
            ep = self._endpoints[endpoint] = _Endpoint()
        return ep

    def checkout(self, endpoint: Hashable) -> Hashable | None:
        """An idle connection to *endpoint*, or None: open one, then opened()."""
        ep = self._ep(endpoint)
        if not ep.idle:
            return None
        idle = ep.idle.pop()
        del self._where[idle.handle]
        self._requests[idle.handle] = idle.requests
        self._counted(endpoint, ep, 1)
        ep.out.add(idle.handle)
        self.counters["reused"] += 1
        return idle.handle

    def connecting(self, endpoint: Hashable, handle: Hashable) -> None:
        """A new connection to *endpoint* is being opened as *handle*: checked
        out from now on (counted in active()); then connected(), or discard()
        when its connect fails."""
        if handle in self._requests or handle in self._where:
            raise ValueError(f"handle {handle!r} is already pooled")
        self._requests[handle] = 0
        ep = self._ep(endpoint)
        self._counted(endpoint, ep, 1)
        ep.out.add(handle)

    def connected(self) -> None:
        """The connect of a connection given to connecting() succeeded."""
        self.counters["opened"] += 1

    def opened(self, endpoint: Hashable, handle: Hashable) -> None:
        """A new connection to *endpoint*, connected, is checked out as *handle*."""
        self.connecting(endpoint, handle)
        self.connected()

    def checkin(
        self, endpoint: Hashable, handle: Hashable, reusable: bool, now: float
    ) -> list[Hashable]:
        """The exchange on *handle* is over; the handles to close."""
        requests = self._requests.pop(handle) + 1
        ep = self._ep(endpoint)
        self._counted(endpoint, ep, -1)
        ep.out.discard(handle)
        o = self.options
        max_requests = self._max_requests(endpoint)
        if not reusable:
            self._removed.discard(handle)
            self.counters["closed_unreusable"] += 1
        elif handle in self._removed:
            self._removed.remove(handle)
            self.counters["closed_removed"] += 1
        elif max_requests and requests >= max_requests:
            self.counters["closed_max_requests"] += 1
        elif len(ep.idle) >= o.max_idle:
            self.counters["closed_overflow"] += 1
        else:
            ep.idle.append(_Idle(handle, now, requests))
            self._where[handle] = endpoint
            self.counters["returned"] += 1
            return []
        return [handle]

    def discard(self, endpoint: Hashable, handle: Hashable) -> bool:
        """A checked-out connection failed (connect error, reset): forget it.

        Returns False (and changes nothing) for a handle not checked out,
        e.g. one already checked in: forgetting twice must not miscount.
        """
        if self._requests.pop(handle, None) is None:
            return False
        ep = self._ep(endpoint)
        self._counted(endpoint, ep, -1)
        ep.out.discard(handle)
        self._removed.discard(handle)
        return True

    def evict(self, handle: Hashable) -> bool:
        """An idle connection became readable (closed by the server): drop it.

        Returns whether it was idle here (the relay then closes it).
        """
        endpoint = self._where.pop(handle, None)
        if endpoint is None:
            return False
        ep = self._endpoints[endpoint]
        ep.idle = [i for i in ep.idle if i.handle != handle]
        self.counters["evicted"] += 1
        return True

    def expire(self, now: float) -> list[Hashable]:
        """Idle connections older than ``idle_timeout`` (their endpoint's,
        endpoint_settings()): the handles to close.

        An endpoint with nothing idle and nothing checked out is forgotten
        here: PassthroughCluster makes one of every address an app calls, so
        keeping them would grow the table for good."""
        default = now - self.options.idle_timeout
        settings = self.settings
        out: list[Hashable] = []
        empty: list[Hashable] = []
        for key, ep in self._endpoints.items():
            s = settings.get(key) if settings else None
            limit = default if s is None else now - s.idle_timeout
            if ep.idle and ep.idle[0].since <= limit:
                keep = [i for i in ep.idle if i.since > limit]
                out += [i.handle for i in ep.idle if i.since <= limit]
                ep.idle = keep
            if not ep.idle and not ep.active:
                empty.append(key)
        for key in empty:
            del self._endpoints[key]
        for h in out:
            del self._where[h]
        self.counters["expired"] += len(out)
        return out

    def remove_endpoint(self, endpoint: Hashable) -> list[Hashable]:
        """*endpoint* left the route table: its idle connections, to close;
        those checked out are closed at check-in (both counted
        ``closed_removed``)."""
        ep = self._endpoints.get(endpoint)
        if ep is None:
            return []
        out = [i.handle for i in ep.idle]
        ep.idle = []
        for h in out:
            del self._where[h]
        self._removed |= ep.out
        self.counters["closed_removed"] += len(out)
        if not ep.active:
            del self._endpoints[endpoint]
        return out

    def restore_endpoint(self, endpoint: Hashable) -> None:
        """*endpoint* is named again (a DNS answer that dropped an address and
        gave it back): its connections in flight are pooled at check-in."""
        ep = self._endpoints.get(endpoint)
        if ep is not None:
            self._removed -= ep.out

    def active(self, endpoint: Hashable) -> int:
        """Requests in flight to *endpoint*, and what add_external() counts
        (LEAST_REQUEST's count)."""
        ep = self._endpoints.get(endpoint)
        return (ep.active if ep else 0) + self._external.get(endpoint, 0)

    def idle(self, endpoint: Hashable) -> int:
        ep = self._endpoints.get(endpoint)
        return len(ep.idle) if ep else 0

    def own_active(self, endpoint: Hashable) -> int:
        """Requests in flight to *endpoint* of this pool alone (connecting
        ones too; not add_external()'s): what ``max_active`` limits."""
        ep = self._endpoints.get(endpoint)
        return ep.active if ep else 0

    def connections(self, endpoint: Hashable) -> int:
        """Open connections to *endpoint*: checked out (connecting ones too)
        and idle; what ``max_connections`` limits."""
        ep = self._endpoints.get(endpoint)
        return len(ep.out) + len(ep.idle) if ep else 0

    def snapshot(self) -> dict[Hashable, tuple[int, int]]:
        """``{endpoint: (active, idle)}`` for /clusters (active as active()
        counts)."""
        with self._external_lock:
            external = dict(self._external)
        out = {k: (v.active + external.pop(k, 0), len(v.idle)) for k, v in self._endpoints.items()}
        out.update({k: (n, 0) for k, n in external.items()})
        return out

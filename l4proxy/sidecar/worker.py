"""One worker: listeners, the routing decision per connection, hand-off to the pump.

Theory of operation
-------------------
The worker runs an asyncio event loop (uvloop by default). The loop sees
only listening sockets and, for each accepted connection, the short phase
before the routing decision: reading ``SO_ORIGINAL_DST``, peeking the HTTP
request head, and connecting upstream. It waits for readiness with
``add_reader``/``add_writer`` on raw fds and always removes the watcher
before going on (see :func:`_wait_fd`), so by the time both sockets are
detached and handed to the :class:`~l4proxy.dataplane.pump.Pump` the loop holds no
reference to either fd. The pump's own thread then moves every byte until
both sides are closed.

Why not asyncio transports for the relay: on this machine a plain
asyncio-Protocol relay on uvloop 0.23 aborted the process ("double free or
corruption") under ``Connection: close`` churn. No relayed byte passes
through a transport here, and the churn soak in tests/ proves the path.

Per connection (steps 1 to 4 are decided by
:func:`l4proxy.rules.classify.classify`, a pure function of the table, the
original destination and the head; this module reads, connects and acts):

1. transparent listeners: ``original_destination()``; none, or the
   listener's own address, means somebody dialled 15001 directly: refused
   (no loops).
2. original destination is one of the pod's own addresses: inbound; forward
   to it unchanged (the local app), no routing.
3. outbound: the ServiceEntry whose address is the destination; else, on a
   port some service declares HTTP, the Host header of the peeked head.
   Unknown: pass through to the original destination (Istio's
   PassthroughCluster) or refuse under ``REGISTRY_ONLY``.
4. HTTP ports: the head is peeked (bounded by ``max_head`` bytes and
   ``header_timeout`` seconds); bytes that are not HTTP are routed at L4 and
   forwarded untouched; other TCP ports are never read before the decision
   (a server-first protocol works). A head's empty lines before its request
   line are not forwarded, and an ``OPTIONS *`` is answered 404, as the
   per-request relay does both (:func:`_no_path`).
5. the route table decides the subset and the order of endpoints to try;
   each connect is bounded by ``connect_timeout``; failures feed outlier
   detection; when none answers: ``503 no healthy upstream`` on HTTP, a
   close on TCP.

Weighted routing is per connection: the first request on a connection
decides, later requests on the same keep-alive connection follow it. With
``--http-routing request`` step 4 hands HTTP connections (and gateway
listeners' connections) to the per-request relay instead
(``l4proxy/dataplane/_relay_py.py``): it routes every request head through
:meth:`Worker._decide_request` (the same classification, per head) and
gives back, for the pump, what turns out not to be HTTP or becomes a tunnel.

Access log of connections routed at L4
--------------------------------------
With ``--access-log`` (and the per-request relay, whose writer it is), a
connection routed at L4 gets a line when it ends, as Envoy's tcp_proxy
logs one (:func:`~l4proxy.dataplane.accesslog.connection_record`): the
connections of TCP ports, inbound ones, and those the relay hands back
whose first bytes are not HTTP (on a gateway listener, their 400 answer's
line). What the line says is gathered on the connection's way to the
pump, in a :class:`_ConnLog` (its start, its addresses, the cluster and
endpoint it was routed to, or why none took it), and the pump reports
the rest at its end (:meth:`Pump.ends`: the bytes each way, when), which
the event loop hears of already for LEAST_REQUEST's counts (a token per
connection, given to every one while the log is on). The line is
formatted here, in Python, once per connection end, and goes to the
relay's writer (:meth:`HttpRelay.access_log_line`) with its own lines,
whole. Python already runs per such connection (its decision and connect
are this event loop's), never per byte: the pump's loop pays a few stores
per connection end. With the log off nothing of this runs (no
:class:`_ConnLog`, tokens only for LEAST_REQUEST's counts, as before). A
tunnel after its request line is not logged again (its request's line
is the relay's, as Envoy writes one per upgraded stream).

Istio's TCP metrics
-------------------
The same connections but inbound ones (what reaches the pod is its
callers' to report) are counted in ``istio_tcp_*``
(:mod:`l4proxy.sidecar.istio_metrics`): opened when handed to the pump,
closed with their bytes each way when the pump reports their end, under
the key of their destination's pod, made once per pod (:meth:`Worker._tcp_key`)
and held per connection by its token. One that no upstream took is
counted as Istio's stats filter counts it (at its close: opened and closed
at once, no byte sent), its ``response_flags`` its line's: every connect
failed (``UF,URX``, under the endpoint last tried), none to try (``UH``,
under the choice; REGISTRY_ONLY's ``BlackHoleCluster``), tcp.maxConnections
(``UO``); the key goes with the refusal (:attr:`Refused.tcp`). A connection
routed by its HTTP request head (``--http-routing connection``) and a
tunnel are HTTP requests, not counted there.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import functools
import ipaddress
import itertools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn

from l4proxy.dataplane import accesslog, peek, pump
from l4proxy.dataplane import relay as http_relay
from l4proxy.dataplane._exchange_py import OVERFLOW_BODY, OVERFLOW_HEADERS, local_response
from l4proxy.dataplane._pool_py import EndpointSettings, PoolOptions
from l4proxy.dataplane._relay_py import Decision as RelayDecision
from l4proxy.dataplane._relay_py import peer_of
from l4proxy.dataplane.accesslog import DEFAULT_BUFFER, NO_TAG, AccessLog, TagLog
from l4proxy.dataplane.accesslog import NC as NC_FLAG
from l4proxy.dataplane.accesslog import NR as NR_FLAG
from l4proxy.dataplane.forwarding import Forwarding
from l4proxy.dataplane.listener import Listener
from l4proxy.dataplane.origdst import original_destination
from l4proxy.dataplane.relay import HttpRelay
from l4proxy.dataplane.verdict import (
    SHAPE_HEADERS,
    SHAPE_METHOD,
    SHAPE_PATH,
    SHAPE_TESTS,
    Choice,
    Fault,
    RetryPolicy,
    Verdict,
)
from l4proxy.rules.classify import UNREAD, Classification, Kind, Origin, Unread, classify
from l4proxy.rules.health import EndpointHealth
from l4proxy.rules.routing import DEFAULT as DEFAULT_SUBSET
from l4proxy.rules.routing import (
    NO_POOL_SETTINGS,
    NO_ROUTE,
    NO_ROUTE_STATUS,
    Decision,
    Endpoint,
    HttpRetry,
    Labels,
    MirrorTag,
    PoolSettings,
    Request,
    RequestShape,
    RequestTest,
    RouteTable,
    Service,
    ServicePort,
    WeightedSubset,
    endpoint_name,
    endpoint_versions,
    is_gateway_host,
    request_headers,
    version_and_workload,
    versions_differ,
)
from l4proxy.rules.watch import RuleWatcher
from l4proxy.sidecar import istio_metrics
from l4proxy.stats import Counters, LabelSet, LockedCounters, Sample, label_set

log = logging.getLogger("l4proxy.worker")

# a row's labels where no sidecar's own are given (Worker._add_rows' callers
# but a worker's: a test's)
_NO_SOURCE = istio_metrics.source_labels({}, "")

MAX_ATTEMPTS = 3  # endpoints tried per connection before giving up
LINGER_SECONDS = 2.0  # after an error answer: how long to swallow what still comes
# accept()/socket() errors that mean "this process (or the system) is out of fds"
FD_EXHAUSTED = (errno.EMFILE, errno.ENFILE)
NOT_LISTENING_PAUSE_S = 1.0  # a listener accept() says EINVAL of: not watched that long
# A listener being closed (stop_accepting) takes what completes in its accept
# queue until the kernel holds no handshake under way for its port (SYN-RECV,
# asked of sock_diag each RETIRE_POLL_S), for this long at most (and within
# the drain's deadline): a handshake whose last ACK was lost completes when
# the SYN-ACK goes again at 1 s (TCP_TIMEOUT_INIT) or the client sends its
# request again, and a long path's round trip takes a second or so; one
# still under way then is most likely a SYN whose sender is gone (a scanner,
# a spoofed source: an exposed gateway always has some), which would hold
# every drain to its deadline. Where sock_diag cannot be asked: this long.
HANDSHAKE_GRACE_S = 3.0
RETIRE_POLL_S = 0.02
# The compiled relay's loop lets go of a listener the worker stops accepting
# on at its next turn (HttpRelay.unlisten); the event loop polls for that
# each UNLISTEN_POLL_S, for UNLISTEN_WAIT_S at most (a stuck relay thread:
# the listener closes anyway), where unlisten() waited, holding the loop.
UNLISTEN_POLL_S = 0.001
UNLISTEN_WAIT_S = 2.0
# A drain closes a connection whose first request head has not begun (a
# never-used one: _Unused) once it was taken this long ago, as the relay's
# drain leaves a connection this young for its first head (DRAIN_FRESH_S,
# _relay_py._DRAIN_FRESH_S): its client connected to send a request.
DRAIN_FRESH_S = 1.0


@dataclass
class WorkerOptions:
    connect_timeout: float = 10.0
    header_timeout: float = 10.0
    max_head: int = 65536
    idle_timeout: float = 3600.0
    outbound_policy: str = "ALLOW_ANY"  # or REGISTRY_ONLY
    source_labels: dict[str, str] = field(default_factory=dict)
    max_connections: int = 0  # 0 = unlimited
    max_pipes: int = -1  # splice pipes; -1: pump.max_pipes_for(), 0: never splice
    # "connection": the first request head routes the connection (compiled
    # pump); "request": every request is routed on its own (the per-request
    # relay, l4proxy/dataplane/relay.py: compiled, or its pure twin).
    http_routing: str = "request"
    ejection_time: float = 10.0  # outlier detection's base ejection (see health.py)
    pool: PoolOptions = field(default_factory=PoolOptions)  # --pool-*: upstream pools
    # --access-log: the fd its lines go to (-1: off; the relays write
    # duplicates of it), --access-log-format json, and the bytes buffered
    # before lines are dropped
    access_log_fd: int = -1
    access_log_json: bool = False
    access_log_buffer: int = DEFAULT_BUFFER
    # --trusted-proxies: the gateway listeners' forwarding headers believe
    # so many proxies in front (l4proxy/dataplane/forwarding.py)
    trusted_proxies: int = 0
    # --cluster-name: Istio's metrics' source_cluster and destination_cluster
    cluster_name: str = istio_metrics.DEFAULT_CLUSTER


def local_addresses() -> set[str]:
    """Every address configured in this network namespace (for "is it inbound?").

    Read from /proc rather than netlink: it needs no event loop (pyroute2's
    synchronous API cannot run inside a running one) and no privileges.
    IPv4 local addresses are the ``/32 host LOCAL`` leaves of the FIB trie;
    IPv6 ones are listed in ``if_inet6``.
    """
    out: set[str] = set()
    try:
        with open("/proc/net/fib_trie") as f:
            last = ""
            for line in f:
                parts = line.split()
                if parts[:1] == ["|--"] and len(parts) > 1:
                    last = parts[1]
                elif "/32 host LOCAL" in line and last:
                    out.add(last)
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexaddr = line.split()[0]
                out.add(str(ipaddress.IPv6Address(bytes.fromhex(hexaddr))))
    except OSError:
        pass
    return out


class Refused(Exception):
    """The connection is answered (or closed) without an upstream."""

    def __init__(
        self,
        why: str,
        status: int | None = None,
        body: str | None = None,
        headers: str = "",
        *,
        tcp: LabelSet | None = None,
    ) -> None:
        super().__init__(why)
        self.why = why
        self.status = status
        # (the reason when no body is given; "" is a body: a route's answer
        # without one, a preflight's, is sent with none)
        self.body = why if body is None else body
        self.headers = headers  # more header lines of the answer (CRLF each)
        # a TCP connection no upstream took: its key in Istio's TCP metrics
        # (Worker._tcp_key, its response_flags said), counted opened and
        # closed at its refusal; None: not counted there
        self.tcp = tcp


@functools.lru_cache(maxsize=256)
def _retry_policy(retries: HttpRetry | None) -> RetryPolicy | None:
    """A route's retry policy as the relays apply it (one object per
    policy: the compiled relay interns them); None when it has nothing to
    do here (only policies that never fire on HTTP/1.1, no failed connect
    among them, and no per-try timeout: see RetryPolicy.in_effect), so
    that no request is held for a replay that cannot come."""
    if retries is None:
        return None
    policy = RetryPolicy.of(
        retries.attempts,
        retries.per_try_timeout,
        retries.retry_on,
        retries.codes,
        retries.backoff,
        retries.ignore_previous_hosts,
    )
    return policy if policy.in_effect else None


def _warn_ignored_timeouts(table: RouteTable) -> None:
    """--http-routing connection relays bytes: a route's timeout is not
    enforced there, nor its retry policy, its header edits and rewrites or
    its fault injection, nor its mirrors, nor its CORS policy but a first
    request's preflight. Said at each table that has one,
    never silently."""
    _warn_unapplied(
        "route timeouts are not enforced with --http-routing connection "
        "(only per request, the default)",
        [f"{host} route {name or '(unnamed)'} {t:g} s" for host, name, t in table.timed_routes()],
    )
    _warn_unapplied(
        "retry policies (http[].retries, httpReqRetries, an HTTPRoute's retry) are not "
        "applied with --http-routing connection "
        "(only per request, the default)",
        [f"{host} route {name or '(unnamed)'}" for host, name in table.retried_routes()],
    )
    _warn_unapplied(
        "header edits and rewrites (http[].headers, rewrite, an HTTPRoute's header "
        "and URL rewrite filters) are not applied with --http-routing connection, "
        "which forwards a connection's bytes untouched (only per request, the default; "
        "redirects and direct responses are answered)",
        [f"{host} {name or '(unnamed)'}" for host, name in table.edited_routes()],
    )
    _warn_unapplied(
        "fault injection (http[].fault) is not applied with --http-routing connection, "
        "which sees no request past a connection's first (only per request, the "
        "default)",
        [f"{host} {name or '(unnamed)'}" for host, name in table.faulted_routes()],
    )
    _warn_unapplied(
        "a consistent hash's generated cookie (loadBalancer.consistentHash.httpCookie.ttl) "
        "is never set with --http-routing connection, which edits no response (a "
        "connection goes where its first request hashes; only per request, the "
        "default)",
        [f"{host} subset {subset}" for host, subset in table.generated_cookies()],
    )
    _warn_unapplied(
        "session persistence (an HTTPRoute's sessionPersistence) is applied only in part "
        "with --http-routing connection: a connection goes where its first request's token "
        "says, but no token is given, as no response is edited at L4 (only per request, "
        "the default)",
        [f"{host} {name or '(unnamed)'}" for host, name in table.session_routes()],
    )
    _warn_unapplied(
        "request mirroring (http[].mirror, mirrors, an HTTPRoute's RequestMirror) is not "
        "applied with --http-routing connection, which copies no request (only per "
        "request, the default)",
        [f"{host} {name or '(unnamed)'}" for host, name in table.mirrored_routes()],
    )
    _warn_unapplied(
        "CORS policies (http[].corsPolicy, an HTTPRoute's CORS filter) are applied only in "
        "part with --http-routing connection: a preflight that opens a connection is "
        "answered, but no response gets Access-Control-* headers and a connection's later "
        "requests are not looked at (only per request, the default)",
        [f"{host} {name or '(unnamed)'}" for host, name in table.cors_routes()],
    )


def _warn_unlistened(table: RouteTable, listening: frozenset[int]) -> None:
    """A Gateway API listener's or an Istio Gateway server's port that no
    ``--listen`` of this gateway serves: its routes are never reached, and
    a request on the ports listened to is answered 404 ``no route``. The
    likeliest slip of a migration (Istio's ingress Service maps port 80
    to the pod's 8080), said at each table that has one. A sidecar (no
    gateway listener) says nothing: its rules may name another pod's
    gateway. The converse too: a port listened on whose only Istio Gateway
    server is one not served (an HTTPS server's 443, a load warning), where
    nothing routes and a TLS client's handshake is answered 400."""
    if not listening:
        return
    missing = sorted(
        {
            (ip.listener_port, ip.name)
            for ip in table.ingress_paths
            if ip.listener_port is not None and ip.listener_port not in listening
        }
    )
    _warn_unapplied(
        f"gateway ports no --listen serves (listening on {', '.join(map(str, sorted(listening)))}):"
        " their routes are never reached, a request is answered 404 no route; listen on"
        " the port, or set the Gateway's port to one listened on",
        [f"port {port} ({name})" for port, name in missing],
    )
    # the converse: a port listened on whose only server is one not served
    # (an HTTPS server's 443): TLS clients would get a plain-text 400
    routed = {ip.listener_port for ip in table.ingress_paths}
    _warn_unapplied(
        "--listen ports whose only Gateway server is not served: nothing routes there (a TLS"
        " client's handshake is answered 400); terminate TLS in front and forward to an HTTP"
        " server's port, or drop the --listen",
        [
            f"port {port} ({what})"
            for port, what in sorted(table.unserved_ports.items())
            if port in listening and port not in routed and None not in routed
        ],
    )


def _warn_unapplied(what: str, items: list[str]) -> None:
    """The warning that *what* is not done for *items* (none: no warning)."""
    if items:
        log.warning("%s: %s", what, _first_five(items))


def _first_five(items: list[str]) -> str:
    """*items* for a log line: the first five, and how many more."""
    more = f" and {len(items) - 5} more" if len(items) > 5 else ""
    return ", ".join(items[:5]) + more


class Worker:
    def __init__(
        self,
        listeners: Iterable[Listener],
        rules: RuleWatcher,
        options: WorkerOptions,
        counters: Counters | None = None,
        health: EndpointHealth | None = None,
    ) -> None:
        self.listeners = list(listeners)
        self.rules = rules
        self.opts = options
        self.counters = counters or Counters()
        self.health = health or EndpointHealth(base_ejection=options.ejection_time)
        rules.on_publish.append(self._forget_gone_endpoints)
        self.health.configure(rules.state.table.outlier_policies())  # (the table loaded)
        gateway_ports = frozenset(lst.address[1] for lst in self.listeners if lst.mode == "gateway")
        rules.on_publish.append(lambda table: _warn_unlistened(table, gateway_ports))
        _warn_unlistened(rules.state.table, gateway_ports)
        max_pipes = pump.max_pipes_for(options.max_connections, options.max_pipes)
        self.pump = pump.Pump(idle_timeout=options.idle_timeout, max_pipes=max_pipes)
        if budget := pump.fd_budget_warning(options.max_connections, max_pipes):
            log.warning("%s", budget)
        self.local_ips: set[str] = set()
        self.listener_ports: set[int] = set()
        self.handshakes: set[asyncio.Task[None]] = set()
        # connections a relay's thread handed to the event loop whose call
        # has not run yet (_hand_to_loop): in no handshake and in no relay,
        # a drain waits for them too (_settle), or its pump stopped taking
        # connections before they came (a reset at a hand-over)
        self._to_loop = 0
        # held to count it, and by the loop as it moves a connection on
        # (from _to_loop to a handshake, from a handshake to the pump): a
        # relay's thread that counts what the worker holds under it
        # (connections_held, --max-connections) counts each once
        self._to_loop_lock = threading.RLock()
        # the compiled relay accepts and checks --max-connections against
        # its own connections and these others (_tell_relay_external)
        self._relay_counts_others = False
        # the connections whose first head _peek awaits, none of it come
        # yet (fd -> _Unused): a drain closes them (_close_unused)
        self._unused: dict[int, _Unused] = {}
        self._retiring: set[asyncio.Task[None]] = set()  # stop_accepting's listeners
        # LEAST_REQUEST's count of the connections this worker routes at L4, per
        # endpoint: from the endpoint's choice (its connect included) until
        # the pump reports the connection's end (a token per connection:
        # _pump_add, _pump_ended). See "LEAST_REQUEST's counts" in _count.
        self.active_per_endpoint: dict[tuple[str, int], int] = {}
        self._active_lock = threading.Lock()  # the relay's thread counts too
        self._pumped: dict[int, tuple[str, int]] = {}  # pump token -> endpoint
        self._tokens = itertools.count(1)
        # the access log's lines of connections routed at L4 (see "Access log
        # of connections routed at L4"): pump token -> what its line says
        # (the event loop's alone)
        self._logged: dict[int, _ConnLog] = {}
        self._log_l4 = options.access_log_fd >= 0 and options.http_routing == "request"
        # Istio's metrics: this pod's labels on every series (see
        # l4proxy/sidecar/istio_metrics.py), and the TCP connections the
        # pump relays (pump token -> their series' key, the event loop's
        # alone), each series' key per destination endpoint, made once
        self._source = istio_metrics.source_labels(
            options.source_labels, rules.namespace, options.cluster_name
        )
        self._tcp_open: dict[int, LabelSet] = {}
        self._tcp_keys: dict[tuple[_TcpDestination, int], LabelSet] = {}
        # /healthcheck/fail (fail_health_check): with --http-routing
        # connection, a gateway listener's connection taken meanwhile sends
        # its first request saying close (_said_close)
        self._health_check_failed = False
        self.draining = False
        self.inbound_until = 0.0  # draining: inbound accepted until then (--drain-inbound)
        self._loop: asyncio.AbstractEventLoop | None = None
        # the relays' outlier reports, in order, for the event loop
        # (_endpoint_report): one wake-up of the loop per batch, not per report
        self._reports: list[tuple[Any, ...]] = []
        self._reports_lock = threading.Lock()
        self._reports_due = False  # a _drain_reports is scheduled
        self._reserve_fd = -1  # see _shed()
        self._fd_limit_logged = 0.0
        self._not_listening_said: set[str] = set()  # listeners accept() said EINVAL of (logged)
        self.stop_heard = False  # a stop signal came (stop_signalled, run._serve's)
        self._last_accept = 0.0  # monotonic time of the last accept (the drain's quiet)
        self._relay_listeners: dict[int, int] = {}  # fd -> index: the relay accepts there
        self._all_listeners: list[Listener] = []  # by the index the relay knows
        self._describe_counters()
        # The per-request relay (--http-routing request) runs its own thread;
        # what it counts goes to relay_counters (locked: /stats reads them
        # from the event loop's thread).
        self.relay_counters = LockedCounters()
        self.relay_counters.describe(
            "l4proxy_outlier_reports_dropped_total",
            "counter",
            "Relay reports to outlier detection dropped: more than 65536 waited for a "
            "stalled event loop.",
        )
        self.relay: HttpRelay | None = None
        # The table whose key headers the compiled relay keys its cache by
        # (see _table_published); a verdict from any other is not cached.
        self._relay_table: RouteTable | None = rules.state.table
        # a DestinationRule's connectionPool: the relay's per-endpoint pool and
        # connect timeout, and the connect timeout of the connections Python
        # makes (TCP ports, the L4 path); told before _table_published lets
        # the relay ask for verdicts of the new table
        self._connect_timeouts: dict[tuple[str, int], float] = {}
        # ... and tcp.maxConnections of the connections routed at L4 (per
        # endpoint, this worker's: Envoy's TCP proxy's upstream_cx_overflow),
        # with the connections each such limit refused
        self._max_connections: dict[tuple[str, int], int] = {}
        self.cx_overflows: dict[tuple[str, int], int] = {}
        rules.on_publish.append(self._apply_pool_settings)
        if options.http_routing == "request":
            compiled: dict[str, Any] = {}
            if http_relay.IMPLEMENTATION == "compiled":
                # Verdicts per request shape, applied in the compiled loop;
                # rule swaps and endpoint failures make it ask again.
                compiled = {
                    "resolve": self._resolve_request,
                    "report_rows": self._report_rows,
                    "key_headers": sorted(rules.state.table.match_headers()),
                    "buckets": _DURATION_BUCKETS_MS,
                }
                rules.on_publish.append(self._table_published)
                # and the listeners: accept and the original destination in
                # the compiled loop too (HTTP connections never meet Python)
                compiled.update(
                    accepted=self._relay_accepted,
                    classify_origin=self._relay_classify_origin,
                    accepts=self._relay_accepts,
                    max_connections=options.max_connections,
                )
            self.relay = HttpRelay(
                self._decide_request,
                self._from_relay,
                decide_peer=True,
                pool=options.pool,
                connect_timeout=options.connect_timeout,
                header_timeout=options.header_timeout,
                idle_timeout=options.idle_timeout,
                report=self._report_request,
                connect_failed=self._relay_connect_failed,
                response_failed=self._relay_response_failed,
                answered=self._relay_answered,
                answered_5xx=self._relay_answered_5xx,
                refused=self._relay_refused,
                max_head=options.max_head,
                seed=rules.seed,  # (the weights' draws, the compiled loop's; the backoffs')
                access_log=(
                    AccessLog(
                        options.access_log_fd,
                        options.access_log_json,
                        _access_log_tag,
                        options.access_log_buffer,
                    )
                    if options.access_log_fd >= 0
                    else None
                ),
                # (a gateway listener's requests: X-Forwarded-For, x-request-id, ...)
                forwarding=Forwarding(options.trusted_proxies),
                **compiled,
            )
            _describe_istio(self.relay_counters)
            rules.on_publish.append(self._retain_pooled_endpoints)
            self.relay.retain_endpoints(rules.state.table.named_endpoints())
        else:
            # a field never silently ignored: this mode cannot time a request
            rules.on_publish.append(_warn_ignored_timeouts)
            _warn_ignored_timeouts(rules.state.table)
        self._apply_pool_settings(rules.state.table)

    # -- lifecycle ---------------------------------------------------------
    def _describe_counters(self) -> None:
        # One decision, one count: l4proxy_decisions_total counts every
        # request (a connection, with --http-routing connection) a route
        # table decided, once, under the service the decision names
        # (Decision.service: the destination, or the routed service itself
        # where no destination serves it: a gateway's redirect, direct
        # response, 404 of no route matched, a backend not resolved), its
        # route and subset; a route's own answer is a decision too. Not
        # counted: what no route was asked for (a head refused, an Ingress
        # miss, REGISTRY_ONLY's refusal, a gateway's OPTIONS *) and what
        # goes where it was dialled (PassthroughCluster). The compiled
        # relay's fast path counts a verdict's request in its rows (a
        # route's local answer by Verdict.decided), its slow path and the
        # pure relay in _decide_request: one rule for both twins.
        c = self.counters
        c.describe(
            "l4proxy_connections_total",
            "counter",
            "Connections accepted, by listener.",
            labelled=True,
        )
        c.describe(
            "l4proxy_decisions_total",
            "counter",
            "Routing decisions, by destination service, route and subset.",
            labelled=True,
        )
        c.describe(
            "l4proxy_upstream_connect_failures_total",
            "counter",
            "Failed upstream connects, by destination service (PassthroughCluster: a"
            " destination no rule names) and error. Per endpoint: /clusters (a label per"
            " pod address would grow with every pod ever replaced).",
            labelled=True,
        )
        c.describe(
            "l4proxy_refused_total",
            "counter",
            "Connections answered without upstream, by reason.",
            labelled=True,
        )
        c.describe(
            "l4proxy_passthrough_total",
            "counter",
            "Connections to unknown destinations relayed at L4 (per-request HTTP ones: "
            "istio_requests_total's PassthroughCluster).",
        )
        c.describe("l4proxy_inbound_total", "counter", "Inbound connections forwarded to the app.")
        c.describe(
            "l4proxy_drain_cut_total",
            "counter",
            "Connections still open at the drain's deadline (--drain-duration), cut.",
        )

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.pump.start()
        self._loop.add_reader(self.pump.ended_fd, self._pump_ended)
        self._take_reserve()
        self.refresh_local_addresses()
        relay_accepts = self.relay is not None and hasattr(self.relay, "listen")
        for index, lst in enumerate(self.listeners):
            self.listener_ports.add(lst.address[1])
            if relay_accepts:
                assert self.relay is not None
                gateway = lst.mode == "gateway"
                origin = Origin(None, lst.address[1], True) if gateway else None
                accepting: Any = self.relay  # the compiled twin (listen() is its own)
                accepting.listen(lst.sock.fileno(), index, gateway, origin)
                self._relay_listeners[lst.sock.fileno()] = index
            else:
                self._loop.add_reader(lst.sock.fileno(), self._on_acceptable, lst)
        self._all_listeners = list(self.listeners)
        if self.relay is not None:
            self.relay.start()
            _test_hang_relay(self.relay)
        if relay_accepts and self.opts.max_connections:
            self._relay_counts_others = True
            self._loop.call_soon(self._tell_relay_external)

    def refresh_local_addresses(self) -> None:
        try:
            self.local_ips = local_addresses()
        except Exception as exc:  # netlink unavailable: inbound detection off
            log.warning("cannot list local addresses (%s); inbound detection is off", exc)
            self.local_ips = set()

    async def stop_accepting(
        self,
        keep: tuple[str, ...] = (),
        then: Callable[[], None] | None = None,
        until: float | None = None,
    ) -> None:
        """Close the listeners, except those whose mode is in *keep*, losing
        no connection the kernel completed for them, nor one whose handshake
        was under way: they close in the background (:meth:`retired` waits
        for them), by *until* (monotonic; the drain's deadline) at the latest.

        Theory of operation. Closing a listening socket resets every
        connection waiting in its accept queue: handshakes the kernel
        completed that the worker had not taken yet, whose clients have
        sent their requests (a review saw one reset per busy client at each
        SIGTERM). ``shutdown(SHUT_RD)`` on a listener (HAProxy's pause) does
        the same on Linux. It also ends the handshakes still under way (the
        kernel drops their SYN-RECV entries once the listener is gone): a
        client whose last ACK was lost or is slow to come has a connection
        it holds open and sends its request on, and reads a reset. So a
        listener is retired in three steps:

        1. it takes no new handshake: a classic BPF filter drops each
           segment that opens one (SYN without ACK; see
           :func:`_refuse_handshakes`, the per-socket form of the
           ``iptables --syn -j DROP`` HAProxy's reloads use), while the
           segments of handshakes under way and of connections pass. The
           client retransmits its SYN a second later and is refused by then
           (or, among several workers' ``SO_REUSEPORT`` listeners, lands on
           one still open). Its accept loop (this loop's reader, or the
           compiled relay's: ``unlisten()``) stops watching it.
        2. *then* runs (the relay's drain: the connections handed to it
           below are taken once it applies, so each is served one request
           and told to close; handed before, one whose request was not read
           yet would be closed as idle).
        3. what its queue holds is taken and served as any connection, and
           again each ``RETIRE_POLL_S`` until the kernel holds no handshake
           under way for its port (:func:`_handshakes_under_way`: asked
           before the queue is taken, so that one completing in between is
           taken too; the filter lets no new one begin), and then it
           closes: at once, most times. A handshake whose last ACK was
           lost completes when the listener's SYN-ACK goes again (1 s) or
           the client sends its request again, a long path's a round trip
           late: each is waited for, ``HANDSHAKE_GRACE_S`` at most (one
           still under way then is most likely a SYN whose sender is gone,
           which would hold the drain to its deadline), within *until*.
           Where the kernel cannot be asked (no sock_diag), the queue is
           taken for ``HANDSHAKE_GRACE_S``. Before, it was taken for 0.2 s
           ("a round trip"), and a client slower than that, holding a
           connection it had sent its request on, was reset.

        A connection taken so from an inbound or gateway listener is served
        even though inbound stopped (it came before the close:
        ``inbound_ok``); the shared outbound port's inbound ones are reset
        as at any time of the drain.
        """
        assert self._loop is not None
        closing = [lst for lst in self.listeners if lst.mode not in keep]
        self.listeners = [lst for lst in self.listeners if lst.mode in keep]
        asked = []
        for lst in closing:
            _refuse_handshakes(lst.sock)
            asked.append(self._stop_accepting_on(lst))
        try:
            await self._relay_let_go(asked)
        except asyncio.CancelledError:  # (Worker.close): in no list any more
            for lst in closing:
                _stop_listening(lst.sock)
            raise
        if then is not None:
            then()
        if not closing:
            return
        for lst in closing:
            self._take_queued(lst)
        if until is None:
            until = time.monotonic() + HANDSHAKE_GRACE_S
        task = self._loop.create_task(self._retire(closing, until))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _stop_accepting_on(self, lst: Listener) -> tuple[int, str] | None:
        """No accept on *lst* from here on, by the event loop, and by the
        compiled relay's loop once it lets go of the fd (asked here: the
        index and name to await with :meth:`_relay_let_go`, None where it
        never accepted there); its socket is left open (stop_accepting
        retires it, hand_over closes it), and must stay open until then."""
        assert self._loop is not None
        index = self._relay_listeners.pop(lst.sock.fileno(), None)
        try:
            self._loop.remove_reader(lst.sock.fileno())
        except (ValueError, OSError):
            pass
        if index is None or self.relay is None:
            return None
        accepting: Any = self.relay  # the compiled twin (see start())
        accepting.unlisten(index, 0.0)
        return index, lst.name

    async def _relay_let_go(self, asked: list[tuple[int, str] | None]) -> None:
        """Until the compiled relay's loop has let go of the listeners
        *asked* (:meth:`_stop_accepting_on`), UNLISTEN_WAIT_S at most,
        polled from the event loop: unlisten() waited for it, and held the
        loop (the admin endpoint, the watchdog's pings, the L4 connections,
        signals) 2 s per listener where the relay's thread was stuck."""
        accepting: Any = self.relay
        left = [a for a in asked if a is not None and accepting.listening(a[0])]
        until = time.monotonic() + UNLISTEN_WAIT_S
        while left and time.monotonic() < until:
            await asyncio.sleep(UNLISTEN_POLL_S)
            left = [a for a in left if accepting.listening(a[0])]
        if left:
            log.warning(
                "the relay's thread did not stop accepting on %s within %.0fs "
                "(stuck?): they close anyway",
                ", ".join(name for _, name in left),
                UNLISTEN_WAIT_S,
            )

    async def _retire(self, closing: list[Listener], until: float) -> None:
        """stop_accepting's step 3: take what *closing*'s queues hold until
        no handshake is under way for a listener's port (or *until*), then
        close it (_stop_listening: for the supervisor's copy too)."""
        grace_ends = min(until, time.monotonic() + HANDSHAKE_GRACE_S)
        left = list(closing)
        try:
            while left:
                await asyncio.sleep(RETIRE_POLL_S)
                under_way = _handshakes_under_way()
                now = time.monotonic()
                for lst in list(left):
                    pending = None if under_way is None else under_way.get(lst.address[1], 0)
                    self._take_queued(lst)  # (after the count: one completed between is here)
                    if pending == 0 or now >= grace_ends:
                        if pending:
                            log.info(
                                "%s closes with %d handshake(s) still under way for its port",
                                lst.name,
                                pending,
                            )
                        _stop_listening(lst.sock)
                        left.remove(lst)
        finally:
            for lst in left:  # (cancelled: Worker.close)
                _stop_listening(lst.sock)

    async def retired(self) -> None:
        """Until the listeners :meth:`stop_accepting` closes are closed."""
        while self._retiring:
            await asyncio.wait(set(self._retiring))

    def _take_queued(self, lst: Listener) -> None:
        """Accept what *lst*'s queue holds now (a listener being retired:
        stop_accepting) and serve each connection."""
        inbound_ok = lst.mode != "outbound"
        while True:
            try:
                conn, peer = lst.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of fds: what is left is reset at the close
                if exc.errno != errno.EINVAL:  # (EINVAL: retired already, by another copy's
                    # drain: a stop while a worker handed its listeners over, Worker.hand_over)
                    log.warning("accept on %s while closing it failed: %s", lst.name, exc)
                return
            self._accepted(conn, peer, lst, inbound_ok)

    async def drain(
        self,
        timeout: float,
        quiet: float = 0.0,
        inbound: float = 0.0,
        gradual: bool = False,
        close_by: float | None = None,
    ) -> int:
        """SIGTERM: stop inbound now (or after *inbound* s), outbound once the
        app is gone; then close.

        Theory of operation. A pod that is told to stop gets SIGTERM in every
        container at once, and the app's own shutdown often calls out (flush
        to a queue, deregister, a last write): a sidecar that stops capturing
        at once fails those calls (Istio #36660, #34855). So:

        * inbound stops at once: the gateway and ``--inbound-port`` listeners
          close (new connections are refused by the kernel; what their
          accept queues held is served first: :meth:`stop_accepting`), and
          an inbound connection arriving on the shared outbound port is
          reset. The pod is leaving its Service's endpoints; callers go
          elsewhere.
        * outbound (what the app dials, captured on ``--port``) is accepted and
          routed as before until the app is gone, or until *timeout* passes.
        * "the app is gone" is Istio's EXIT_ON_ZERO_ACTIVE_CONNECTIONS: no
          connection open (relayed or being set up, inbound ones included,
          an idle keep-alive one too) for *quiet* seconds: none accepted, and
          none closed, in that time, counted from the SIGTERM at the
          earliest. The sidecar cannot see the app's process (another
          container, another pid namespace); an app that is silent for
          *quiet* seconds and then calls out again finds the sidecar gone, so
          *quiet* should exceed the app's longest pause while shutting down.
          ``quiet`` 0 stops outbound at once too (the behaviour before).

        * *inbound* > 0 (a gateway behind a load balancer): inbound is still
          accepted for that long (within *timeout*), while /ready answers 503.
          A load balancer learns that the pod is going from its own health
          checks or from the endpoints, seconds after the SIGTERM; meanwhile
          it still sends new connections, which a closed listener refuses
          (what a preStop sleep works around, as a kubelet feature or with a
          ``sleep`` binary an image may not have).

        * keep-alive connections of the per-request relay are told to leave,
          as Envoy's drain close tells HTTP/1 clients (the relay's
          "Drain"): inbound ones (a gateway listener's) at once, even while
          *inbound* still accepts new ones (Envoy's graceful drain: the
          listener open, keep-alive discouraged), outbound ones once
          outbound stops (Istio drains inbound alone: the app still calls
          out). Each answer from then on says ``connection: close`` and its
          connection closes after it (FIN); a request in flight finishes.
          Those between requests close at once, or, *gradual* (Envoy's
          ``--drain-strategy gradual``), one after another over the first
          quarter of what is left of *timeout* as each step begins (the
          relay's *spread*; Envoy spreads its drain's first callbacks over
          a quarter of its drain time so), so that their clients come back
          spread out rather than in one burst onto the other pods. They
          kept being served until the deadline before, and were then reset.
          A connection whose first head this loop waits for (``_peek``:
          every HTTP one with ``--http-routing connection``) and that sent
          nothing yet is closed at the same two steps (``_close_unused``).

        The listeners that close take no new handshake before the relay is
        told (:meth:`stop_accepting`'s *then*): a keep-alive client whose
        idle connection closes and that reconnects at once is refused, not
        queued on a listener about to close.

        Then the listeners close, and connections in flight get what is left
        of *timeout* to finish; the count of those the deadline cut (the
        relay's and the L4 pump's) is returned, and counted in
        ``l4proxy_drain_cut_total``. The relay's thread is waited for until
        *close_by* (monotonic; None: 10 s from the close) at most: one
        stuck is left running (:meth:`relay_stalled` says so then).
        """
        self.draining = True
        now = time.monotonic()
        deadline = now + timeout
        relay = self.relay

        def drain_inbound() -> None:
            if relay is not None:
                relay.drain(inbound_only=True, spread=timeout / 4 if gradual else 0.0)
            self._close_unused(gateway_only=True)

        self.inbound_until = min(now + inbound, deadline)
        outbound = ("outbound",) if quiet > 0 else ()
        # (inbound also arrives on the shared outbound port, without
        # --inbound-port: it stays open while inbound is served)
        serving_inbound = inbound > 0
        every = ("outbound", "inbound", "gateway")
        # the listeners that close now take no new handshake before the
        # idle keep-alive connections are closed: those clients' instant
        # reconnects are refused, not queued on a listener about to close
        await self.stop_accepting(
            keep=every if serving_inbound else outbound, then=drain_inbound, until=deadline
        )
        self._last_accept = max(self._last_accept, now)
        busy_at = now  # when a connection was last seen open (polled)
        while self.listeners and time.monotonic() < deadline:
            t = time.monotonic()
            if serving_inbound and t >= self.inbound_until:
                await self.stop_accepting(keep=outbound, until=deadline)
                serving_inbound = False
            idle = (
                self.pump.active == 0
                and not self.handshakes
                and not self._to_loop
                and self.relay_active() == 0
            )
            if not idle:
                busy_at = t
            # quiet since the last connection closed, not since the last one
            # opened: a keep-alive client that called out until a moment ago
            # is the app still shutting down
            if not serving_inbound and idle and t - max(self.last_accept(), busy_at) >= quiet:
                log.info("draining: no connection for %.1fs; outbound stops", quiet)
                break
            await asyncio.sleep(0.1 if serving_inbound else min(0.1, max(quiet, 0.01)))

        def drain_all() -> None:
            if relay is not None:  # outbound too: nothing new comes any more
                left = max(0.0, deadline - time.monotonic())
                relay.drain(spread=left / 4 if gradual else 0.0)
            self._close_unused(gateway_only=False)

        await self.stop_accepting(then=drain_all, until=deadline)
        await self.retired()  # (each by the deadline: what it took is served below)
        return await self._finish(deadline, close_by)

    async def hand_over(
        self, timeout: float, gradual: bool = False, close_by: float | None = None
    ) -> int:
        """A SIGTERM to this worker alone, not a stop (run._serve: the
        supervisor said so): the supervisor's next worker for this slot
        accepts from the same listening sockets (inherited: one accept
        queue), so this one stops accepting and lets go of its copies
        without ending their listening (no SYN filter, no
        ``shutdown(SHUT_RD)``: :meth:`stop_accepting` retires a listener so
        for every copy, and the successor would refuse every client), and
        what their queues hold is the successor's to take; nothing is
        refused. Then its connections drain as at the end of
        :meth:`drain` (keep-alive clients told to leave, at once or
        *gradual*, requests in flight finishing within *timeout*, what is
        left then cut: how many). Nothing waits for quiet, and inbound
        taken before is served: the pod is not leaving."""
        assert self._loop is not None
        self.draining = True
        now = time.monotonic()
        deadline = now + timeout
        self.inbound_until = deadline
        handing, self.listeners = self.listeners, []
        try:
            await self._relay_let_go([self._stop_accepting_on(lst) for lst in handing])
        finally:
            for lst in handing:  # (not the last copy: the supervisor's, the successor's)
                lst.sock.close()
        if self.relay is not None:
            self.relay.drain(spread=timeout / 4 if gradual else 0.0)
        self._close_unused(gateway_only=False)
        return await self._finish(deadline, close_by)

    async def _finish(self, deadline: float, close_by: float | None) -> int:
        """A drain's end, its listeners closed: the connections in flight
        finish until *deadline*; those left then are cut (how many)."""
        await self._settle(deadline)
        while self.relay_active() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # requests in flight in the relay finish
        cut = 0
        if self.relay is not None:
            # what is left at the deadline is cut; its access log's writer
            # stays for the lines of the pump's connections
            wait = 10.0 if close_by is None else max(0.0, close_by - time.monotonic())
            cut = self.relay.close(access_log=not self._log_l4, wait=wait)
            # what its thread handed to the loop before it ended goes to the
            # pump before the pump drains (its call had not run yet)
            await self._settle(deadline)
        forced = await self._drain_pump(deadline)
        self._close_access_log()
        if cut + forced:
            self.counters.inc("l4proxy_drain_cut_total", cut + forced)
        return cut + forced

    async def _settle(self, deadline: float) -> None:
        """The connections on their way to the pump end their way (until
        *deadline*): the handshakes, and the connections a relay's thread
        handed to the loop whose call has not run yet (it makes their
        handshake, or adds them to the pump)."""
        while (self.handshakes or self._to_loop) and time.monotonic() < deadline:
            if self.handshakes:
                await asyncio.wait(
                    set(self.handshakes), timeout=max(0.0, deadline - time.monotonic())
                )
            else:
                await asyncio.sleep(0.005)  # (the call runs at the loop's next turn)

    def reopen_access_log(self, fd: int) -> bool:
        """SIGUSR1: the access log's lines (HTTP and L4 alike: one writer,
        the relay's) go to *fd*'s file from now on; *fd* stays the caller's
        (l4proxy.sidecar.access_log_file). False: no relay writes one."""
        return self.relay is not None and bool(self.relay.reopen_access_log(fd))

    def _close_unused(self, gateway_only: bool) -> None:
        """The drain's close of the connections whose first request head
        has not begun (``_peek`` waits for it: the general path, every
        connection with ``--http-routing connection``), a gateway
        listener's alone with *gateway_only*, as the relay's drain closes
        its connections between requests (Envoy closes idle downstream
        connections at its drain): a FIN, no answer. Before, each held the
        drain until ``--header-timeout`` and its 408. One with a byte come
        and not read yet is left (its head is arriving: read next), and one
        taken less than ``DRAIN_FRESH_S`` ago is closed then if nothing
        came meanwhile (its client connected to send a request, as the
        relay's drain leaves it)."""
        assert self._loop is not None
        now = time.monotonic()
        for unused in list(self._unused.values()):
            if gateway_only and unused.mode != "gateway":
                continue
            if unused.taken + DRAIN_FRESH_S > now:
                self._loop.call_later(unused.taken + DRAIN_FRESH_S - now, unused.close_if_unused)
            else:
                unused.close_if_unused()

    def stop_signalled(self) -> None:
        """SIGTERM or SIGINT came, heard by its handler (run._serve: before
        the event loop gets to the drain): from now on every answer on a
        gateway listener's connection says ``connection: close`` (the
        relay's stop_signalled()), so that none given meanwhile keeps its
        client: the relay's thread serves on its own, and a worker paused
        (SIGSTOP, a CPU quota's throttling) with clients queued when the
        signal came served them before the loop ran the drain. The drain
        follows (:meth:`drain`). A compiled relay hears the signals itself
        (:meth:`hear_stop_signals`)."""
        self.stop_heard = True
        if self.relay is not None:
            self.relay.stop_signalled()

    def stop_withdrawn(self) -> None:
        """The stop signal was a SIGTERM to this worker alone (run._Leaving:
        the supervisor said so): it serves its slot on until its successor
        accepts, so answers keep their clients again until its hand-over
        (:meth:`hand_over` tells them to leave), where each said
        ``connection: close`` from the SIGTERM on (:meth:`stop_signalled`),
        needless churn while it was its slot's only server."""
        if self.relay is not None:
            self.relay.stop_withdrawn()

    def hear_stop_signals(self, signals: Sequence[int], on_signal: Callable[[], None]) -> bool:
        """Have the compiled relay's thread, which accepts and serves
        without the event loop, hear *signals* itself (a signalfd: its
        "Stop signals"), so that a batch of its with the signal takes it
        before any accept or answer (:meth:`stop_signalled`'s, before the
        event loop could): *on_signal* is then called on the event loop.
        False where there is no such relay, or no signalfd to be had (no
        fd left: said), the handler's way then. The caller blocks
        *signals* in every thread, before any starts. Before :meth:`start`."""
        if self.relay is None or not hasattr(self.relay, "take_stop_signals"):
            return False
        loop = asyncio.get_running_loop()
        hearing: Any = self.relay  # the compiled twin (take_stop_signals() is its own)
        try:
            hearing.take_stop_signals(signals, lambda: loop.call_soon_threadsafe(on_signal))
        except OSError as exc:
            log.warning(
                "the relay cannot hear the stop signals itself (%s): its handler tells it", exc
            )
            return False
        return True

    def drain_first(self) -> None:
        """Before :meth:`start`, for a worker whose stop was asked while it
        started (a SIGTERM held until its loop runs: signals; the one the
        supervisor starts to drain a dead worker's listeners): the relay
        drains its gateway listeners' connections from the first it takes,
        as :meth:`drain`'s first step has it. Its thread takes connections
        from its start, and the drain begins a loop step later: those it
        took meanwhile (a queue waiting since the worker before died) were
        served as keep-alive ones, their answers not saying close."""
        if self.relay is not None:
            self.relay.drain(inbound_only=True)

    async def _drain_pump(self, deadline: float) -> int:
        """The L4 pump's connections finish until *deadline*; those still
        open then are cut (reset): how many. Their access log lines say so
        as a request's cut at the deadline does (``DC``,
        ``accesslog.DRAIN_CUT``), and Istio's TCP metrics count their
        close with that flag (``response_flags="DC"``: their series opened
        said ``-``): each connection the pump had not reported ended at
        the deadline (its ends taken first) is marked (_ConnLog.cut, its
        key :func:`_drain_cut`) before the pump resets it; the ends of
        those it reset are taken then (counted closed, their lines
        written), the access log on or not."""
        while self.pump.active and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.pump.active:
            self._pump_ended()  # (the ends before the deadline: as they were)
            for clog in self._logged.values():
                clog.cut()
            for token, tcp in self._tcp_open.items():
                self._tcp_open[token] = _drain_cut(tcp)
        loop = asyncio.get_running_loop()
        forced: int = await loop.run_in_executor(None, self.pump.drain, 0.0)
        self._pump_ended()
        return forced

    def fail_health_check(self, failed: bool) -> None:
        """``/healthcheck/fail`` (*failed*) and ``/healthcheck/ok``: while
        failed, every answer on a gateway listener's connection says
        ``connection: close`` and its connection closes after it; one
        between requests stays until its next answer (the relay's
        ``discourage``: Envoy's drain close while the server's health
        check is failed, which moves a load balancer's keep-alive clients
        off the pod with its new connections). The app's own connections
        (outbound) are left alone. A drain goes on whatever this says.

        With ``--http-routing connection`` (no relay) the answers are the
        upstream's, relayed at L4: a gateway listener's connection taken
        meanwhile sends its first request saying ``connection: close``
        (:func:`_said_close`), so that its upstream answers so and closes
        it after that answer, the client told; one relayed before cannot
        be told."""
        self._health_check_failed = failed
        if self.relay is not None:
            self.relay.discourage(failed)

    def last_accept(self) -> float:
        """When a connection was last accepted (monotonic), here or in the relay."""
        relay_accept = getattr(self.relay, "last_accept", None)
        return max(self._last_accept, relay_accept() if relay_accept else 0.0)

    def _tell_relay_external(self) -> None:
        """--max-connections: the relay counts its own connections; these
        are the others (on their way to the loop, handshakes, pump), told
        every 50 ms, and at once as its thread hands one to the loop
        (_tell_relay_now)."""
        if self.relay is None or self._loop is None or not self._relay_listeners:
            return
        self._tell_relay_now()
        self._loop.call_later(0.05, self._tell_relay_external)

    def _tell_relay_now(self) -> None:
        """The compiled relay's count of the others (see
        _tell_relay_external; any thread). Under ``_to_loop_lock``: a count
        the loop made before a hand-over is not told after the relay's
        thread told the one with it."""
        if not self._relay_counts_others or not self._relay_listeners:
            return
        accepting: Any = self.relay  # the compiled twin (see start())
        with self._to_loop_lock:
            accepting.set_external_active(self._outside_relay())

    def _outside_relay(self) -> int:
        """The client connections held outside the relay: handed to the
        loop by its thread (their call not run yet), in a handshake, in the
        pump. Read in the order a connection moves from one to the next
        (each added to the next before it leaves the last): a read on
        another thread that races a move counts it twice, never not at
        all; under ``_to_loop_lock``, once (the loop moves them under it)."""
        return self._to_loop + len(self.handshakes) + self.pump.active

    def in_transit(self) -> int:
        """Connections a relay's thread handed to the loop whose call has
        not run yet (in no handshake, in no relay: _hand_to_loop)."""
        return self._to_loop

    def connections_held(self) -> int:
        """The client connections this worker holds: what --max-connections
        bounds, and ``l4proxy_active_connections``. The relay's first: a
        connection it hands to the loop leaves it before it is on its way
        there (see _outside_relay)."""
        return self.relay_active() + self._outside_relay()

    def relay_stalled(self) -> float:
        """Seconds the per-request relay's thread has gone without a turn
        while it runs (0.0: it turns, or there is none; after the relay's
        close, one left running, stuck): the watchdog's ``alive``
        (run._answer_supervisor), the lone process's own watch
        (run._watch_alone), /ready (admin.WorkerView.state); the relays'
        "Liveness"."""
        return float(self.relay.stalled()) if self.relay is not None else 0.0

    def relay_active(self) -> int:
        return self.relay.active() if self.relay is not None else 0

    def counter_sample(self) -> Sample:
        """The event loop's counters and the relay thread's, for /stats,
        compact (stats.Sample). A family both count
        (``l4proxy_decisions_total``: per connection on the loop, per
        request in the relay; ``l4proxy_refused_total``) is summed per
        label set. What the compiled relay counted since its last report
        is not in it: :meth:`flush_relay_reports` first."""
        sample = self.counters.sample()
        sample.add(self.relay_counters.sample())
        return sample

    async def flush_relay_reports(self) -> None:
        """Have the compiled relay hand over what it counted (its rows,
        once a second otherwise) and wait for it, up to 0.5 s, on another
        thread: the event loop serves meanwhile (a /ready, a connection
        to route), where it waited for the relay's thread to report."""
        if self.relay is not None and http_relay.IMPLEMENTATION == "compiled":
            await asyncio.to_thread(self.relay.flush_reports, 0.5)

    def counter_snapshot(self) -> dict[str, dict[Any, float]]:
        """:meth:`counter_sample`, the compiled relay's rows handed over
        first (waiting on this thread), every sample apart (Sample.expanded)."""
        if self.relay is not None:
            self.relay.flush_reports(0.5)  # the compiled relay counts in C: hand it over
        return self.counter_sample().expanded()

    def pool_snapshot(self) -> dict[tuple[str, int], tuple[int, int]] | None:
        """``{endpoint: (requests in flight, idle connections)}`` of the
        relay's upstream pools, for /clusters; None without the relay."""
        if self.relay is None:
            return None
        for _ in range(10):  # the pure relay's thread may change the pools meanwhile
            try:
                snapshot = self.relay.pools.snapshot()
                return {k: v for k, v in snapshot.items() if isinstance(k, tuple)}
            except RuntimeError:
                continue
        return {}

    def connection_snapshot(self) -> dict[tuple[str, int], int]:
        """``{endpoint: connections}`` routed at L4 and not ended yet (what
        LEAST_REQUEST orders by with --http-routing connection), for /clusters."""
        with self._active_lock:
            return dict(self.active_per_endpoint)

    def counter_help(self) -> dict[str, tuple[str, str]]:
        return {**self.counters.help(), **self.relay_counters.help()}

    def counter_labelled(self) -> frozenset[str]:
        """The families of :meth:`counter_help` whose series have labels."""
        return self.counters.labelled() | self.relay_counters.labelled()

    def close(self) -> None:
        for t in list(self.handshakes) + list(self._retiring):
            t.cancel()
        if self.relay is not None:
            self.relay.close(access_log=not self._log_l4)
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self.pump.ended_fd)
            except (ValueError, OSError):
                pass
        self.pump.close()
        self._close_access_log()
        if self._reserve_fd >= 0:
            os.close(self._reserve_fd)
            self._reserve_fd = -1

    def _close_access_log(self) -> None:
        """The pump's last ends (a drain's, a close's resets) get their
        lines, then the relay's access log is closed (its writer kept
        open till now for them)."""
        if not self._log_l4 or self.relay is None:
            return
        self._pump_ended()
        self.relay.close_access_log()

    # -- accepting -----------------------------------------------------------
    def _on_acceptable(self, lst: Listener) -> None:
        assert self._loop is not None
        if lst.sock.fileno() == -1:  # (handed over in this loop turn: hand_over)
            return
        for _ in range(64):  # bounded burst: let other callbacks run
            try:
                conn, peer = lst.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE/ENFILE: out of fds. Existing connections are unharmed.
                # Refuse what waits in the accept queue now (with RST, through
                # the reserve fd), rather than leave clients hanging there, and
                # back off briefly rather than spin on a readable listener.
                if exc.errno in (*FD_EXHAUSTED, errno.ENOBUFS, errno.ENOMEM):
                    # Counted: the connections reset, each once. Linux takes
                    # the new fd before it looks at the queue: an EMFILE with
                    # nothing waiting refused nobody; what waits while there
                    # is no reserve fd is counted when reset (or served) later.
                    shed = self._shed(lst) if exc.errno in FD_EXHAUSTED else 0
                    if shed:
                        self.counters.inc("l4proxy_refused_total", shed, reason="fd_limit")
                    now = time.monotonic()
                    if now - self._fd_limit_logged > 10:
                        self._fd_limit_logged = now
                        log.warning(
                            "accept on %s: %s; refusing new connections for now "
                            "(keep 2 x --max-connections + 2 x --max-pipes + 64 "
                            "below the fd limit)",
                            lst.name,
                            os.strerror(exc.errno or 0),
                        )
                    self._pause_accept(lst)
                    return
                if exc.errno == errno.EINVAL:
                    # It does not listen (shut down: a drain's retired
                    # listener, whose hang-up keeps it readable): watched
                    # again each second rather than spun on, said once.
                    if lst.name not in self._not_listening_said:
                        self._not_listening_said.add(lst.name)
                        # (a stop's: another copy's drain retired it, debug)
                        said = log.debug if self.draining or self.stop_heard else log.warning
                        said(
                            "accept on %s failed: %s (it does not listen); "
                            "watched again each %.0fs, said once",
                            lst.name,
                            exc,
                            NOT_LISTENING_PAUSE_S,
                        )
                    self._pause_accept(lst, NOT_LISTENING_PAUSE_S)
                    return
                log.warning("accept on %s failed: %s", lst.name, exc)
                return
            self._accepted(conn, peer, lst)

    def _accepted(
        self, conn: socket.socket, peer: Any, lst: Listener, inbound_ok: bool = False
    ) -> None:
        """Serve *conn*, just accepted on *lst* (*inbound_ok*: see _act)."""
        self.counters.inc("l4proxy_connections_total", listener=lst.mode)
        self._last_accept = time.monotonic()
        limit = self.opts.max_connections
        if limit and self.connections_held() >= limit:
            self.counters.inc("l4proxy_refused_total", reason="max_connections")
            _reset(conn)
            return
        conn.setblocking(False)
        if self.relay is not None and self._straight_to_relay(conn, lst, peer):
            return
        self._handshake(self._serve(conn, lst, inbound_ok))

    def _handshake(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run *coro* (one connection's way to the pump) on the loop, counted
        in ``handshakes`` until it ends (drain and --max-connections read them)."""
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self.handshakes.add(task)
        task.add_done_callback(self.handshakes.discard)

    def _take_reserve(self) -> None:
        if self._reserve_fd < 0:
            try:
                self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._reserve_fd = -1  # still out of fds: next time

    def _shed(self, lst: Listener) -> int:
        """Out of fds: reset the connections waiting in *lst*'s accept queue.

        The reserve fd (libuv's "EMFILE trick") is what makes this possible:
        closed, it frees the one slot each accept() needs for the moment it
        takes to reset that connection. Another thread (the pump) may win the
        slot; then accept() fails again and we only pause.
        """
        if self._reserve_fd < 0:
            return 0
        os.close(self._reserve_fd)
        self._reserve_fd = -1
        shed = 0
        try:
            while shed < 256:
                try:
                    conn, _ = lst.sock.accept()
                except OSError:  # EAGAIN: queue empty; EMFILE: slot taken
                    break
                _reset(conn)
                shed += 1
        finally:
            self._take_reserve()
        return shed

    def _pause_accept(self, lst: Listener, pause: float = 0.1) -> None:
        assert self._loop is not None
        fd = lst.sock.fileno()
        self._loop.remove_reader(fd)

        def resume() -> None:
            self._take_reserve()
            if lst in self.listeners and lst.sock.fileno() == fd:  # not closed meanwhile
                self._loop.add_reader(fd, self._on_acceptable, lst)  # type: ignore[union-attr]

        self._loop.call_later(pause, resume)

    def _straight_to_relay(self, conn: socket.socket, lst: Listener, peer: Any) -> bool:
        """Hand *conn* to the per-request relay now, when the table says so
        for where it was going: no task, no await (the accept path of every
        HTTP connection), with *peer*, the client's address accept() gave
        (the relay's access log keeps it: no getpeername() per connection,
        none that a client's reset leaves without a peer). False: it takes
        the general path (_serve)."""
        assert self.relay is not None
        if lst.mode == "gateway":
            origin = Origin(None, lst.address[1], True)
        else:
            dst = original_destination(conn)
            if dst is None:
                return False
            origin = Origin(dst[0], dst[1], False)
        if self._classify(self.rules.state.table, origin, UNREAD).kind is not Kind.RELAY:
            return False
        self.relay.add(conn, origin, peer=peer)
        return True

    # -- one connection ------------------------------------------------------
    async def _serve(self, conn: socket.socket, lst: Listener, inbound_ok: bool = False) -> None:
        clog = _ConnLog.start() if self._log_l4 else None
        deciding = self._decide_and_connect(conn, lst, clog, inbound_ok)
        await self._to_pump(conn, deciding, lst.name, clog)

    async def _to_pump(
        self,
        conn: socket.socket,
        deciding: Coroutine[Any, Any, _Routed],
        where: str,
        clog: _ConnLog | None = None,
    ) -> None:
        """Await the decision and connect, then hand both sockets to the pump;
        answer or close *conn* when refused. *clog*: what its access log
        line says (a line at its end, or at its refusal)."""
        upstream: socket.socket | None = None
        try:
            upstream, pending, endpoint, tcp = await deciding
            if clog is not None:
                clog.upstream_local = _sockname(upstream)
            conn_fd = conn.detach()
            up_fd = upstream.detach()
            upstream = None
            # From here the pump owns both fds and closes each exactly once.
            counted = None if endpoint is None else (endpoint.address, endpoint.port)
            self._pump_add(conn_fd, up_fd, pending, b"", counted, clog, tcp)
        except _HandedToRelay:
            pass  # the relay owns conn now
        except _DrainClosed:
            conn.close()  # (a FIN: nothing came, nothing to answer)
        except Refused as r:
            self.counters.inc("l4proxy_refused_total", reason=r.why)
            sent = 0
            if r.status is None:
                conn.close()
            else:
                answer = local_response(r.status, r.body, headers=r.headers)
                if _send_quietly(conn, answer):
                    sent = len(answer)
                    if clog is not None:  # (its line before the linger's wait)
                        self._log_refused(clog, r, sent)
                        clog = None
                    await _linger_close(conn, LINGER_SECONDS)
                else:
                    conn.close()
            if clog is not None:
                self._log_refused(clog, r, sent)
            if r.tcp is not None:  # (opened and closed at once, as Istio counts it at its close)
                self.counters.add_set(istio_metrics.TCP_OPENED, r.tcp)
                self._tcp_closed(r.tcp, 0, sent)
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception:
            log.exception("error handling a connection on %s", where)
            conn.close()
        finally:
            if upstream is not None:
                upstream.close()

    async def _decide_and_connect(
        self,
        conn: socket.socket,
        lst: Listener,
        clog: _ConnLog | None = None,
        inbound_ok: bool = False,
    ) -> _Routed:
        origin: Origin | None
        if lst.mode == "gateway":
            origin = Origin(None, lst.address[1], True)
        else:
            dst = original_destination(conn)
            origin = None if dst is None else Origin(dst[0], dst[1], False)
        if clog is not None:
            clog.addresses(conn, origin)
        # Whether to read the head is decided by the table live now; what to
        # route by is decided by the table live once the head is complete
        # (classified again below): a head can take up to --header-timeout to
        # arrive, and a head that arrives after a reload follows the new rules.
        table = self.rules.state.table
        c = self._classify(table, origin, UNREAD)
        head: peek.RequestHead | None = None
        pending = b""
        if c.kind is Kind.RELAY:
            assert origin is not None
            self._hand_to_relay(conn, origin)
        if c.kind is Kind.READ_HEAD:
            head, pending = await self._peek(conn, lst.mode)
            table = self.rules.state.table  # one table from here on: the decision's
            c = self._classify(table, origin, head)
            if head is not None and origin is not None and _no_path(head, origin, c):
                raise Refused(ABSOLUTE_PATH_REJECTED, 404, "")  # (as _decide_request's)
        routed = await self._act(conn, c, origin, table, head, pending, clog, inbound_ok)
        if head is not None and lst.mode == "gateway" and self._health_check_failed:
            return routed._replace(pending=_said_close(head, routed.pending))
        return routed

    def _classify(
        self, table: RouteTable, origin: Origin | None, head: peek.RequestHead | Unread | None
    ) -> Classification:
        return classify(
            table,
            origin,
            head,
            local_ips=self.local_ips,
            listener_ports=self.listener_ports,
            registry_only=self.opts.outbound_policy == "REGISTRY_ONLY",
            per_request=self.relay is not None,
        )

    async def _act(
        self,
        conn: socket.socket,
        c: Classification,
        origin: Origin | None,
        table: RouteTable,
        head: peek.RequestHead | None,
        pending: bytes,
        clog: _ConnLog | None = None,
        inbound_ok: bool = False,
    ) -> _Routed:
        """Carry out a connection's classification: connect upstream (the
        pump relays from there) or refuse. *clog*: what its access log line
        says, filled in on the way. *inbound_ok*: taken from the queue of
        an inbound listener as it closed (stop_accepting): served, not
        refused as inbound is once it stopped."""
        if c.kind is Kind.REFUSED:
            if clog is not None:
                clog.refused(c.why)
            tcp = None
            if c.why == "registry_only" and head is None:  # (Istio's BlackHoleCluster: UH)
                tcp = self._tcp_key(BLACKHOLE, accesslog.UH)
            raise Refused(c.why, c.status, c.body, tcp=tcp)
        if c.kind is Kind.ROUTE:
            assert c.service is not None and c.port is not None
            return await self._route(conn, table, c.service, c.port, head, pending, clog)
        # INBOUND and PASSTHROUGH: a transparent listener's original destination.
        assert origin is not None and origin.ip is not None, c
        if clog is not None:  # (Istio's clusters for them)
            inbound = c.kind is Kind.INBOUND
            clog.cluster = f"inbound|{origin.port}||" if inbound else PASSTHROUGH
            clog.upstream_host = accesslog.address_text((origin.ip, origin.port))
        if c.kind is Kind.INBOUND:
            # Inbound: the pod's own address. Forward to the local app as is.
            if self.draining and time.monotonic() >= self.inbound_until and not inbound_ok:
                # Draining: inbound stops at SIGTERM (the pod is leaving the
                # endpoints; callers retry elsewhere), or --drain-inbound
                # seconds after it. Outbound continues.
                _reset(conn)
                raise Refused("draining_inbound")
            self.counters.inc("l4proxy_inbound_total")
            up = await self._connect((origin.ip, origin.port))
            if up is None:
                if clog is not None:
                    clog.flags |= accesslog.UF | accesslog.URX
                raise Refused("inbound_unreachable")
            return _Routed(up, b"", None)  # (reporter=destination's: not reported)
        if c.kind is Kind.PASSTHROUGH:
            self.counters.inc("l4proxy_passthrough_total")
            try:
                up = await self._connect((origin.ip, origin.port), http=head is not None)
            except Refused as r:  # no fd for its socket (OM)
                if r.why == "fd_limit" and head is None:
                    r.tcp = self._tcp_key(None, accesslog.OM)
                raise
            if up is None:
                if clog is not None:
                    clog.flags |= accesslog.UF | accesslog.URX
                raise Refused(
                    "passthrough_unreachable",
                    503 if head else None,
                    "upstream connect error",
                    tcp=None if head else self._tcp_key(None, accesslog.UF | accesslog.URX),
                )
            # (bytes that are not HTTP, or a TCP port: Istio's TCP metrics)
            tcp = self._tcp_key(None) if head is None else None
            return _Routed(up, pending, None, tcp)
        raise AssertionError(f"not an L4 classification: {c}")  # READ_HEAD, RELAY: the caller's

    async def _route(
        self,
        conn: socket.socket,
        table: RouteTable,
        service: Service,
        port: ServicePort,
        head: peek.RequestHead | None,
        pending: bytes,
        clog: _ConnLog | None = None,
    ) -> _Routed:
        request = None
        # the client's address, where a consistent hash on the source IP needs it
        source = peer_of(conn) if table.hashes_sources else None
        if head is not None:
            request = Request(
                method=head.method,
                path=head.path,
                authority=head.host or "",
                headers=request_headers(head.headers),
                source=source,
            )
        decision: Decision = table.decide(
            service,
            port.number,
            request,
            self.opts.source_labels,
            healthy=self.health.is_healthy,
            active=self._active_for,
            source=source,
        )
        self.counters.inc(
            "l4proxy_decisions_total",
            service=decision.service.host,
            route=decision.route,
            subset=decision.subset,
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s:%d route=%s subset=%s try=%s",
                service.host,
                port.number,
                decision.route,
                decision.subset,
                [f"{e.address}:{e.port}" for e in decision.endpoints[:MAX_ATTEMPTS]],
            )
        if clog is not None:  # (its cluster, or NR: a route's own the L4 line has not)
            tport = _cluster_port(decision.service, service, port.number)
            said = _access_log_tag(_Tag(decision, tport))
            clog.cluster, clog.flags = said.upstream_cluster, clog.flags | said.flags
        if decision.answer is not None:  # a redirect, a direct response
            a = decision.answer
            raise Refused(
                "route_answer",
                a.status,
                a.body,
                "".join(f"{name}: {value}\r\n" for name, value in a.headers),
            )
        # -- issue 14 (HTTPRoute): a backend that resolves to nothing answers 500 --
        if not decision.endpoints and decision.status != 503:
            if decision.route == NO_ROUTE:  # a VirtualService's or HTTPRoute's host: 404
                raise Refused("no_route", decision.status, _local_body(decision.status))
            if clog is not None:  # (a backend of no endpoint: Envoy's no healthy upstream)
                clog.flags |= accesslog.UH
            raise Refused(
                "unresolved_backend",
                decision.status if head is not None else None,
                "backend not resolved",
                tcp=self._tcp_refused(head, decision, (), accesslog.UH),
            )
        # -- end issue 14 --
        tried: Endpoint | None = None  # (the last one tried)
        for i, ep in enumerate(decision.endpoints[:MAX_ATTEMPTS]):
            key = (ep.address, ep.port)
            limit = self._max_connections.get(key)
            if limit and self.active_per_endpoint.get(key, 0) >= limit:
                # tcp.maxConnections: the endpoint chosen, overflowing, is the
                # answer (Envoy's upstream_cx_overflow); one tried after a
                # failed connect is passed over
                self.cx_overflows[key] = self.cx_overflows.get(key, 0) + 1
                if i:
                    continue
                if clog is not None:
                    clog.flags |= accesslog.UO
                raise Refused(
                    "overflow",
                    503 if head is not None else None,
                    OVERFLOW_BODY,
                    OVERFLOW_HEADERS,
                    tcp=self._tcp_refused(head, decision, decision.endpoints, accesslog.UO),
                )
            # counted from here, its connect included (as the relay counts a
            # request: _pool_py.py), and handed to the pump counted
            self._count(key, 1)
            tried = ep
            if clog is not None:  # (UPSTREAM_HOST: the last one tried)
                clog.upstream_host = accesslog.address_text(key)
            try:
                up = await self._connect(key, ep, decision.service, http=head is not None)
            except Refused as r:  # no fd for its socket (OM): under the endpoint tried
                self._count(key, -1)
                if r.why == "fd_limit":
                    r.tcp = self._tcp_refused(head, decision, (ep,), accesslog.OM)
                raise
            except BaseException:
                self._count(key, -1)
                raise
            if up is not None:
                # (a connection routed by its request head is an HTTP
                # request's; the relays count those, per request)
                if head is not None:
                    return _Routed(up, pending, ep)
                tcp = self._tcp_key((decision.service.host, decision.subset, (ep,)))
                return _Routed(up, pending, ep, tcp)
            self._count(key, -1)
        # every connect failed (tcp_proxy's UF, its attempts used up: URX),
        # counted under the last endpoint tried (as a request is: README);
        # or none was tried (UH), under the choice's pods (ejected: all)
        flags = accesslog.UH if tried is None else accesslog.UF | accesslog.URX
        if clog is not None:
            clog.flags |= flags
        of = (decision.endpoints or decision.ejected) if tried is None else (tried,)
        raise Refused(
            "no_healthy_upstream",
            503 if head is not None else None,
            "no healthy upstream",
            tcp=self._tcp_refused(head, decision, of, flags),
        )

    def _active_for(self, ep: Endpoint) -> int:
        """LEAST_REQUEST's count of *ep*: with the per-request relay, its pools'
        (which add this worker's own: _count); else this worker's."""
        if self.relay is not None:
            return self.relay.pools.active((ep.address, ep.port))
        return self.active_per_endpoint.get((ep.address, ep.port), 0)

    # -- LEAST_REQUEST's counts -----------------------------------------------------

    def _count(self, endpoint: tuple[str, int], n: int) -> None:
        """*n* more connections of this worker's to *endpoint* (any thread).

        A connection routed at L4 counts from the choice of its endpoint
        (_route) until the pump reports its end; so does a tunnel (Upgrade,
        CONNECT) the per-request relay hands over, from the hand-off
        (_from_relay, on the relay's thread: the relay's own count of its
        request ends only after that). With the relay, the count is its too
        (add_external): its LEAST_REQUEST, in the C loop or in _decide_request,
        orders by its requests in flight and these together."""
        with self._active_lock:
            left = self.active_per_endpoint.get(endpoint, 0) + n
            if left:
                self.active_per_endpoint[endpoint] = left
            else:
                self.active_per_endpoint.pop(endpoint, None)
        if self.relay is not None:
            self.relay.add_external(endpoint, n)

    def _pump_add(
        self,
        client_fd: int,
        upstream_fd: int,
        to_upstream: bytes,
        to_client: bytes,
        counted: tuple[str, int] | None,
        clog: _ConnLog | None = None,
        tcp: LabelSet | None = None,
    ) -> None:
        """pump.add(); *counted*: the endpoint this connection is counted
        against (_count), which stays counted until the pump reports its end
        (_pump_ended), or is counted down here when add() raises; *clog*:
        its access log line's values, its line written at that end; *tcp*:
        its key in Istio's TCP metrics (:meth:`_tcp_key`), counted opened
        here and closed, with its bytes, at that end."""
        token = 0
        if counted is not None or clog is not None or tcp is not None:
            token = next(self._tokens)
        if counted is not None:
            with self._active_lock:
                self._pumped[token] = counted
        if clog is not None:
            self._logged[token] = clog
        try:
            # The pump counts the connection from now: its handshake no
            # longer (its task's end is told a loop step later, and an
            # accept in between would count the connection twice against
            # --max-connections; a relay's thread counts under the lock)
            with self._to_loop_lock:
                self.pump.add(client_fd, upstream_fd, to_upstream, to_client, token=token)
                with contextlib.suppress(RuntimeError):  # (no loop running: no task)
                    self.handshakes.discard(asyncio.current_task())
        except BaseException:
            if token:
                self._forget_token(token)
                self._logged.pop(token, None)
            raise
        if tcp is not None:
            self._tcp_open[token] = tcp
            self.counters.add_set(istio_metrics.TCP_OPENED, tcp)

    def _pump_ended(self) -> None:
        """The pump's ended_fd is readable (loop): connections that ended,
        each forgotten, and with the access log on, its line written."""
        for token, up, down, ended in self.pump.ends():  # (taken off the pump)
            try:
                self._forget_token(token)
                tcp = self._tcp_open.pop(token, None)
                if tcp is not None:
                    self._tcp_closed(tcp, up, down)
                clog = self._logged.pop(token, None)
                if clog is not None:
                    self._log_line(clog, up, down, ended)
            except Exception:
                log.exception("forgetting pumped connection %d", token)

    def _log_line(self, clog: _ConnLog, received: int, sent: int, ended: float) -> None:
        """The access log's line of a connection routed at L4 that ended at
        *ended* (monotonic), having moved these bytes each way."""
        assert self.relay is not None
        ms = max(0, int((ended - clog.started) * 1000))
        rec = clog.record(received, sent, ms)
        self.relay.access_log_line(accesslog.format_line(rec, self.opts.access_log_json))

    def _log_refused(self, clog: _ConnLog, r: Refused, sent: int) -> None:
        """The line of a connection no upstream took (*r*), *sent* bytes of
        its answer sent (a gateway's 400 to bytes that are not HTTP)."""
        if r.why in _UNLOGGED_REFUSALS:
            return
        if r.why == "fd_limit":
            clog.flags |= accesslog.OM
        if sent:
            clog.status = r.status or 0
        self._log_line(clog, 0, sent, time.monotonic())

    def _tcp_closed(self, tcp: LabelSet, received: int, sent: int) -> None:
        """A TCP connection counted under *tcp* ended, having moved these
        bytes each way (client to upstream, upstream to client)."""
        c = self.counters
        c.add_set(istio_metrics.TCP_CLOSED, tcp)
        c.add_set(istio_metrics.TCP_RECEIVED, tcp, received)
        c.add_set(istio_metrics.TCP_SENT, tcp, sent)

    def _tcp_key(self, destination: _TcpDestination, flags: int = 0) -> LabelSet:
        """The key of a TCP connection's series in Istio's TCP metrics: to
        *destination* (the service's host, the subset and the endpoints
        that name its workload: the one that took it, the last one tried
        when every connect failed, the choice's when none was tried; None:
        PassthroughCluster; BLACKHOLE: what REGISTRY_ONLY refused), from
        this pod, its ``response_flags`` the access log's *flags* (none
        for a connection an upstream took). Made once per destination
        endpoint and flags (a pod replaced makes a new one: the keys are
        forgotten all at once past 4096)."""
        cached = (destination, flags)
        key = self._tcp_keys.get(cached)
        if key is not None:
            return key
        tag: _SubsetTag | None
        if destination is None:
            tag = None
        elif isinstance(destination, str):  # (_refusal_tag's: no workload, no version)
            tag = _no_destination_tag(destination, "")
        else:
            host, subset, eps = destination
            version, workload = version_and_workload(host, subset, eps)
            tag = _SubsetTag(host, "", subset, version, workload, 0, _peer(eps))
        labels = istio_metrics.tcp_labels(
            self._source,
            _destination(tag, self.opts.cluster_name),
            istio_metrics.response_flags(flags),
        )
        if len(self._tcp_keys) >= 4096:
            self._tcp_keys.clear()
        key = self._tcp_keys[cached] = label_set(labels)
        return key

    def _tcp_refused(
        self,
        head: peek.RequestHead | None,
        decision: Decision,
        endpoints: Sequence[Endpoint],
        flags: int,
    ) -> LabelSet | None:
        """The key of a connection *decision* routed that no upstream took,
        for *flags*: a TCP connection's (*head* None), labelled by
        *endpoints*; None for a request routed by its head (an HTTP
        request's, not a TCP connection's)."""
        if head is not None:
            return None
        return self._tcp_key((decision.service.host, decision.subset, tuple(endpoints)), flags)

    def _forget_token(self, token: int) -> None:
        with self._active_lock:
            endpoint = self._pumped.pop(token, None)
        if endpoint is not None:
            self._count(endpoint, -1)

    # -- per-request routing: the relay's callbacks ----------------------------
    #
    # The relay (l4proxy/dataplane/_relay_py.py) owns HTTP connections on its own thread
    # and asks _decide_request for every request head; the table it reads is
    # the one live at that moment (a swap is one assignment). What must run on
    # the event loop (outlier detection, the L4 hand-off, the loop's counters)
    # is passed there with call_soon_threadsafe.

    def _hand_to_relay(self, conn: socket.socket, origin: Origin) -> NoReturn:
        assert self.relay is not None
        self.relay.add(conn, origin)
        raise _HandedToRelay

    def _decide_request(
        self, head: peek.RequestHead, origin: Origin, peer: bytes | None = None
    ) -> RelayDecision:
        """Route one request head (relay thread); *peer*: its client's
        packed address (the relay's decide_peer: a consistent hash on the
        source IP reads it)."""
        table = self.rules.state.table
        c = self._classify(table, origin, head)
        if _no_path(head, origin, c):
            # (the compiled relay hands every target but origin-form to its
            # pure relay, which asks here)
            return RelayDecision(local=(404, ""), tag=_ABSOLUTE_PATH_TAG)
        if c.kind is Kind.REFUSED:
            assert c.status is not None  # a request is always answered
            return RelayDecision(local=(c.status, c.body), tag=_refusal_tag(c))
        if c.kind is Kind.PASSTHROUGH:
            assert origin.ip is not None
            return RelayDecision(((origin.ip, origin.port),))  # PassthroughCluster
        assert c.kind is Kind.ROUTE and c.service is not None and c.port is not None, c
        service, port = c.service, c.port
        authority = head.host or ""
        request = Request(
            method=head.method,
            path=head.path,
            authority=authority,
            headers=request_headers(head.headers),
            source=peer,
        )
        relay = self.relay
        assert relay is not None
        decision = table.decide(
            service,
            port.number,
            request,
            self.opts.source_labels,
            healthy=self.health.is_healthy,
            active=lambda ep: relay.pools.active((ep.address, ep.port)),
        )
        self.relay_counters.inc(  # (see "One decision, one count" in _describe_counters)
            "l4proxy_decisions_total",
            service=decision.service.host,
            route=decision.route,
            subset=decision.subset,
        )
        # (the ports of Istio's cluster name, outbound|PORT|SUBSET|HOST: the
        # access log's; the destination's, as the compiled relay's verdicts have it)
        dialled = port.number
        tport = _cluster_port(decision.service, service, dialled)
        if decision.answer is not None:  # a redirect, a direct response, a preflight's
            a = decision.answer
            return RelayDecision(
                local=(a.status, a.body),
                local_headers=a.headers,
                tag=_Tag(decision, dialled),
                # (a preflight's route may have a fault: drawn first, as
                # Istio puts Envoy's fault filter before the CORS filter)
                fault=_abort_tagged(decision.fault, decision.service.host, decision.route, dialled),
            )
        if not decision.endpoints:  # (its fault first: Envoy's filter runs before the router)
            fault = _abort_tagged(decision.fault, decision.service.host, decision.route, dialled)
            if decision.status == NO_ROUTE_STATUS:  # no route: nothing to edit
                body = _local_body(decision.status)
                return RelayDecision(
                    local=(decision.status, body), tag=_Tag(decision, dialled), fault=fault
                )
            # the router's 503 (500: a backend not resolved), which the
            # relay edits as its other own answers: the route's and the
            # destination's response edits, the CORS filter's lines
            return RelayDecision(
                tag=_Tag(decision, tport),
                edits=decision.edits,
                fault=fault,
                status=decision.status,
            )
        tried = decision.endpoints[:MAX_ATTEMPTS]
        return RelayDecision(
            tuple((e.address, e.port) for e in tried),
            tag=_Tag(decision, tport),
            timeout=decision.timeout,
            retry=_retry_policy(decision.retries),
            edits=decision.edits,
            fault=_abort_tagged(decision.fault, decision.service.host, decision.route, dialled),
            mirrors=decision.mirrors,
            # (pods of several versions: each request labelled by the one
            # that answered it, as the compiled relay's verdicts have it)
            endpoint_tags=_endpoint_tags(
                decision.service, decision.route, decision.subset, decision.endpoints, tport, tried
            ),
            session=decision.session,  # (its token's endpoint first already: decide())
        )

    def _resolve_request(self, head: peek.RequestHead, origin: Origin) -> Verdict:
        """Where requests shaped like *head* go, for the compiled relay to
        cache and apply (relay thread); :meth:`_decide_request` without the
        draw. The relay asks again after a rule swap or a failed connect,
        and at the latest after ``Verdict.ttl`` (an ejection ends)."""
        table = self.rules.state.table
        verdict = self._verdict_for(table, head, origin)
        if table is not self._relay_table:  # live, but not yet the relay's (_table_published)
            return verdict._replace(ttl=0)
        return verdict

    def _verdict_for(self, table: RouteTable, head: peek.RequestHead, origin: Origin) -> Verdict:
        c = self._classify(table, origin, head)
        # What else than origin and Host the verdict reads: at a gateway, the
        # Ingress paths the Host may take and their services' routes; else the
        # routes of the service the origin and Host name.
        if origin.gateway:
            shape = _shape_bits(table.gateway_shape(head.host, origin.port))
        else:
            shape = _Shape(0)
        if c.kind is Kind.REFUSED:
            assert c.status is not None  # a request is always answered
            tag = _refusal_tag(c)
            return Verdict(local=(c.status, c.body), tag=tag, shape=shape.bits, tests=shape.tests)
        if c.kind is Kind.PASSTHROUGH:
            assert origin.ip is not None
            choice = Choice(1, ((origin.ip, origin.port),), "ORDERED")
            return Verdict((choice,), shape=shape.bits, tests=shape.tests)
        assert c.kind is Kind.ROUTE and c.service is not None and c.port is not None, c
        request = Request(
            method=head.method,
            path=head.path,
            authority=head.host or "",
            headers=request_headers(head.headers),
        )
        rc = table.choices(
            c.service,
            c.port.number,
            request,
            self.opts.source_labels,
            healthy=self.health.is_healthy,
        )
        if not origin.gateway:
            shape = _shape_bits(table.request_shape(c.service))
        dialled = c.port.number
        if rc.answer is not None:  # a redirect, a direct response, a preflight's
            a = rc.answer
            tag = _no_destination_tag(rc.service.host, rc.route, dialled)
            return Verdict(
                local=(a.status, a.body),
                local_headers=a.headers,
                tag=tag,
                ttl=0.0 if a.per_request else 1.0,
                shape=shape.bits,
                tests=shape.tests,
                fault=_abort_tagged(rc.fault, rc.service.host, rc.route, dialled),  # (drawn first)
                decided=True,  # (the route's answer: a decision, as _decide_request counts it)
            )
        if not rc.subsets:  # no route matched (404): nothing to edit
            tag = _no_destination_tag(rc.service.host, rc.route, dialled)
            body = _local_body(rc.status)
            return Verdict(
                local=(rc.status, body),
                tag=tag,
                shape=shape.bits,
                tests=shape.tests,
                fault=_abort_tagged(rc.fault, rc.service.host, rc.route, dialled),
                decided=True,
            )
        choices = tuple(
            Choice(
                ws.weight,
                tuple((e.address, e.port) for e in ws.endpoints),
                ws.policy or "ROUND_ROBIN",
                ws.key,
                # (every endpoint ejected: UH, under the pods its requests reached)
                _subset_tag(
                    ws.service,
                    rc.route,
                    ws.subset,
                    ws.endpoints or ws.ejected,
                    _ws_port(ws, dialled),
                ),
                ws.status,  # (each its own: 503 where all ejected, 500 unresolved)
                ws.edits,
                ws.hash_on,  # (policy HASH: the relay hashes each request on it)
                # (pods of several versions: each request labelled by the
                # one that answered it; none for one version, the common case)
                _endpoint_tags(
                    ws.service, rc.route, ws.subset, ws.endpoints, _ws_port(ws, dialled)
                ),
            )
            for ws in rc.subsets
        )
        return Verdict(
            choices,
            shape=shape.bits,
            tests=shape.tests,
            timeout=rc.timeout,
            retry=_retry_policy(rc.retries),
            fault=_abort_tagged(rc.fault, rc.service.host, rc.route, dialled),
            mirrors=rc.mirrors,
            session=rc.session,
        )

    def _forget_gone_endpoints(self, table: RouteTable) -> None:
        """A new table is live: outlier state of endpoints it no longer names
        (pods gone, addresses rotated) is dropped, or churn grew it for ever;
        the DestinationRules' outlierDetection per endpoint is the table's."""
        named = table.named_endpoints()  # (made with the table: RouteTable.prepare)
        self.health.retain_keys(named)
        self.health.configure(table.outlier_policies())
        for key in [k for k in self.cx_overflows if k not in named]:
            del self.cx_overflows[key]

    def _retain_pooled_endpoints(self, table: RouteTable) -> None:
        """A new table is live (loop): the relay closes the pooled upstream
        connections of endpoints it no longer names (a pod a reload removed),
        which would otherwise hold the pod's drain for --pool-idle-timeout."""
        if self.relay is not None:
            self.relay.retain_endpoints(table.named_endpoints())

    def _apply_pool_settings(self, table: RouteTable) -> None:
        """A new table is live (loop): each endpoint's connectionPool settings
        (a DestinationRule's), what a rule leaves unset being the flags'."""
        pool = self.opts.pool
        flags = PoolSettings(pool.max_requests, pool.idle_timeout, self.opts.connect_timeout)
        by_rules = table.pool_settings()
        # and the endpoints whose application 5xx a rule's outlierDetection
        # counts: the relay reports those responses (the steady state of the
        # others reports nothing)
        report_5xx = {ep for ep, p in table.outlier_policies().items() if p.counts_statuses}
        settings: dict[tuple[str, int], EndpointSettings] = {}
        # resolved once per distinct rule settings (tens of thousands of
        # endpoints share a few; this runs on the loop at each swap)
        made: dict[tuple[PoolSettings, bool], EndpointSettings] = {}
        for ep in by_rules.keys() | report_5xx:
            key = (by_rules.get(ep, NO_POOL_SETTINGS), ep in report_5xx)
            if (e := made.get(key)) is None:
                r = key[0].resolved(flags)  # (every field set)
                assert r.max_requests is not None and r.idle_timeout and r.connect_timeout
                e = made[key] = EndpointSettings(
                    r.max_requests,
                    r.idle_timeout,
                    r.connect_timeout,
                    key[1],
                    r.max_connections or 0,
                    r.max_pending or 0,
                    r.max_active or 0,
                )
            settings[ep] = e
        self._connect_timeouts = {ep: e.connect_timeout for ep, e in settings.items()}
        self._max_connections = {
            ep: e.max_connections for ep, e in settings.items() if e.max_connections
        }
        if self.relay is not None:
            self.relay.endpoint_settings(settings)
            return
        unpooled = [
            endpoint_name(host, port)
            for (host, port), s in by_rules.items()
            if s.max_requests is not None
            or s.idle_timeout is not None
            or s.max_pending is not None
            or s.max_active is not None
        ]
        if unpooled:
            log.warning(
                "connectionPool http settings (maxRequestsPerConnection, idleTimeout, "
                "http1MaxPendingRequests, http2MaxRequests) are not applied with "
                "--http-routing connection, which pools no upstream connection and sees no "
                "request (only per request, the default; tcp.connectTimeout and "
                "tcp.maxConnections are): %s",
                _first_five(unpooled),
            )

    def _table_published(self, table: RouteTable) -> None:
        """A new table is live (loop): the relay's verdicts are stale.

        The table went live before this runs, and the relay's thread may
        resolve a request in between: its verdict is from the new table but
        would be cached under the old epoch and keyed by the old key headers
        (a header the new table matches on would be missing from the key: one
        user's canary verdict applied to everyone). So a verdict is cacheable
        only once its table is the one the relay was last told of."""
        if self.relay is not None:
            self.relay.invalidate(sorted(table.match_headers()))
        self._relay_table = table

    def _report_rows(
        self,
        decided: list[tuple[_SubsetTag | None, int]],
        answered: list[_AnsweredRow],
    ) -> None:
        """What the compiled relay counted since its last report (relay
        thread): decisions, and responses with their duration histogram
        (one batch: a scrape sees a report whole, +Inf equal to _count)."""
        c = self.relay_counters
        with c.batch():
            self._add_rows(c, decided, answered, self._source)

    @staticmethod
    def _add_rows(
        c: Counters,
        decided: list[tuple[_SubsetTag | None, int]],
        answered: list[_AnsweredRow],
        source: Mapping[str, str] = _NO_SOURCE,
    ) -> None:
        """Add the relay's rows to *c*: decisions, and answers (a
        request's or a mirrored copy's) with their durations' histogram,
        labelled by their tags, statuses and response flags (the access
        log's bits: :func:`_response_flags`) and *source*, this sidecar's
        labels."""
        for subset, n in decided:
            if subset is not None:  # PassthroughCluster: no decision (as per connection)
                labels = {"service": subset.service, "route": subset.route, "subset": subset.subset}
                c.add("l4proxy_decisions_total", labels, n)
        for tag, status, count, seconds, buckets, flags in answered:
            # (sorted once: every series')
            key = label_set(_istio_labels(tag, status, source, flags))
            # a mirrored copy's answer (Mirror.tag): a family of its own,
            # never a request the client got an answer to
            mirrored = isinstance(tag, MirrorTag)
            total = istio_metrics.MIRROR_REQUESTS if mirrored else istio_metrics.REQUESTS
            family = istio_metrics.MIRROR_DURATION if mirrored else istio_metrics.DURATION
            c.add_set(total, key, count)
            c.add_histogram(family, key, _DURATION_BUCKETS_MS, buckets, count, seconds * 1000.0)

    def _report_request(self, tag: _ReportTag, status: int, seconds: float, flags: int) -> None:
        """One response delivered by the pure relay (its thread), with its
        access log's flag bits: as one row."""
        ms = seconds * 1000.0
        index = next((i for i, le in enumerate(_DURATION_BUCKETS_MS) if ms <= le), None)
        buckets = tuple(int(i == index) for i in range(len(_DURATION_BUCKETS_MS)))
        self._report_rows([], [(tag, status, 1, seconds, buckets, flags)])

    def _relay_classify_origin(self, ip: str, port: int) -> tuple[bool, Origin]:
        """Whether connections the relay accepted for (*ip*, *port*) are its
        own (relay thread; cached per destination until a swap, 1 s at most)."""
        origin = Origin(ip, port, False)
        c = self._classify(self.rules.state.table, origin, UNREAD)
        return c.kind is Kind.RELAY, origin

    def _relay_accepted(self, conn: socket.socket, index: int) -> None:
        """A connection the relay accepted that is not HTTP for it (relay
        thread): the general path, on the event loop. --max-connections
        is checked again here, as _accepted checks it: the relay checked
        its accept against a count of the others told up to 50 ms ago, and
        the connections it handed to the loop since were in none (a burst
        of TCP connections was served whole, past the limit)."""
        limit = self.opts.max_connections
        if limit:
            with self._to_loop_lock:  # (none counted twice as the loop moves it on)
                held = self.connections_held()
            if held >= limit:
                self.relay_counters.inc("l4proxy_refused_total", reason="max_connections")
                _reset(conn)
                return
        if not self._hand_to_loop(self._serve_accepted, conn, index):
            _reset(conn)

    def _serve_accepted(self, conn: socket.socket, index: int) -> None:
        conn.setblocking(False)
        self._handshake(self._serve(conn, self._all_listeners[index]))

    def _relay_accepts(self, index: int, n: int) -> None:
        """Connections the relay accepted on listener *index* (relay thread)."""
        mode = self._all_listeners[index].mode
        self.relay_counters.inc("l4proxy_connections_total", n, listener=mode)

    def _relay_refused(self, why: str) -> None:
        """A connection the relay closed without routing it (relay thread):
        counted as the L4 path counts its refusals (a slow head: header_timeout)."""
        self.relay_counters.inc("l4proxy_refused_total", reason=why)

    def _hand_to_loop(self, fn: Any, *args: Any) -> bool:
        """A relay's thread hands a connection to the loop: *fn* (which
        makes its handshake or gives it to the pump at once) runs there, the
        connection counted in ``_to_loop`` until then (a drain waits for it).
        False: the loop is gone, nothing runs."""
        with self._to_loop_lock:
            self._to_loop += 1
        handed = False
        try:
            handed = self._on_loop(self._took_from_thread, fn, *args)
        finally:
            if not handed:  # (or it raised: counted down all the same)
                with self._to_loop_lock:
                    self._to_loop -= 1
        if handed:
            self._tell_relay_now()  # (its next accept counts this one)
        return handed

    def _took_from_thread(self, fn: Any, *args: Any) -> None:
        with self._to_loop_lock:  # (its next place counts it as this count lets go)
            try:
                fn(*args)
            finally:
                self._to_loop -= 1

    def _on_loop(self, fn: Any, *args: Any) -> bool:
        loop = self._loop
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: shutting down
            return False
        return True

    # (tag: the request's; a _SubsetTag in the compiled relay's reports, and
    # in the pure one's where a destination's endpoints differ in version)

    def _relay_connect_failed(self, addr: tuple[str, int], tag: _AnyTag, why: str) -> None:
        self._endpoint_report(addr, tag, why)

    def _relay_response_failed(self, addr: tuple[str, int], tag: _AnyTag, why: str) -> None:
        self._endpoint_report(addr, tag, why, "response")

    def _relay_answered(self, addr: tuple[str, int], tag: _AnyTag) -> None:
        self._endpoint_report(addr, tag, "")

    def _relay_answered_5xx(self, addr: tuple[str, int], tag: _AnyTag, status: int) -> None:
        self._endpoint_report(addr, tag, "", "status", status)

    def _endpoint_report(self, *report: Any) -> None:
        """A relay's outlier report (its thread): to :meth:`_endpoint_result`
        on the event loop, in order with the others. Queued, and the loop
        woken once per batch: an application answering 5xx to every request
        a rule counts would otherwise cost a wake-up of the loop (a write to
        its self-pipe) per request."""
        with self._reports_lock:
            if len(self._reports) >= _MAX_REPORTS:  # the loop is stalled: bounded
                self.relay_counters.inc("l4proxy_outlier_reports_dropped_total")
                return
            self._reports.append(report)
            if self._reports_due:
                return
            self._reports_due = True
        if not self._on_loop(self._drain_reports):  # shutting down: nothing hears
            with self._reports_lock:
                self._reports.clear()
                self._reports_due = False

    def _drain_reports(self) -> None:
        with self._reports_lock:
            reports, self._reports = self._reports, []
            self._reports_due = False
        for report in reports:
            try:
                self._endpoint_result(*report)
            except Exception:  # (a bug: the reports after it still count)
                log.exception("outlier report %r failed", report)

    def _endpoint_result(
        self,
        addr: tuple[str, int],
        tag: _Tag | _SubsetTag | None,
        why: str,
        kind: str = "connect",
        status: int = 0,
    ) -> None:
        """Outlier detection for the relay's reports (event loop): a failed
        connect, a failed response (*kind* ``"response"``), an application's
        5xx *status* that a rule's outlierDetection counts (*kind*
        ``"status"``), or (no *why*, no *status*) an answer. See
        l4proxy/rules/health.py for what each is."""
        ep = None
        service: Service | None = None
        if isinstance(tag, _Tag):
            service = tag.decision.service
            ep = next((e for e in tag.decision.endpoints if (e.address, e.port) == addr), None)
        elif isinstance(tag, _SubsetTag):
            service = self.rules.state.table.service(tag.service)
            if service is not None:
                ep = next((e for e in service.endpoints if (e.address, e.port) == addr), None)
        if not why and not status:
            if ep is not None:
                self.health.success(ep)
            return
        if ep is not None and service is not None:
            # (the bound on its ejection: each destination it is in, as Envoy
            # bounds one per cluster, a subset's; see l4proxy/rules/health.py)
            groups = self.rules.state.table.ejection_groups(ep)
            healthy = self.health.is_healthy(ep)
            if status:
                self.health.status(ep, status, groups)
            else:
                self.health.failure(ep, why, groups, kind)
            if healthy and not self.health.is_healthy(ep) and self.relay is not None:
                # ejected now: verdicts cached since the failure (the relay
                # forgot its cache then, before this ran) still hold it
                self.relay.invalidate()
        if kind != "connect":
            return
        self.counters.inc(
            "l4proxy_upstream_connect_failures_total", service=_cluster(service), error=why
        )

    def _from_relay(
        self,
        client: socket.socket,
        upstream: socket.socket | None,
        to_client: bytes,
        to_upstream: bytes,
        origin: Origin,
        endpoint: tuple[str, int] | None = None,
    ) -> None:
        """The relay gives a connection back (its thread): a tunnel to
        *endpoint*, counted from here (_count), or bytes that are not HTTP."""
        counted = endpoint if upstream is not None else None
        if counted is not None:
            self._count(counted, 1)
        if not self._hand_to_loop(
            self._after_relay, client, upstream, to_client, to_upstream, origin, counted
        ):
            client.close()
            if upstream is not None:
                upstream.close()
            if counted is not None:
                self._count(counted, -1)

    def _after_relay(
        self,
        client: socket.socket,
        upstream: socket.socket | None,
        to_client: bytes,
        to_upstream: bytes,
        origin: Origin,
        counted: tuple[str, int] | None = None,
    ) -> None:
        if upstream is not None:  # Upgrade/CONNECT: the L4 pump relays both ways
            self._pump_add(client.detach(), upstream.detach(), to_upstream, to_client, counted)
            return
        clog = _ConnLog.start() if self._log_l4 else None
        routing = self._route_l4(client, origin, to_upstream, clog)
        self._handshake(self._to_pump(client, routing, "relay", clog))

    async def _route_l4(
        self, conn: socket.socket, origin: Origin, pending: bytes, clog: _ConnLog | None = None
    ) -> _Routed:
        """Bytes on an HTTP port that are not HTTP: routed per connection, at L4."""
        if clog is not None:
            clog.addresses(conn, origin)
        table = self.rules.state.table
        c = self._classify(table, origin, None)
        return await self._act(conn, c, origin, table, None, pending, clog)

    async def _peek(self, conn: socket.socket, mode: str) -> tuple[peek.RequestHead | None, bytes]:
        """Read the request head of *conn*, taken on a listener of *mode*.
        Returns (head or None if not HTTP, bytes read). Until its first
        byte comes, a drain may close it (_close_unused: _DrainClosed)."""
        parser = peek.HeadParser(self.opts.max_head)
        taken = time.monotonic()
        deadline = taken + self.opts.header_timeout
        used = False  # a byte came
        while True:
            try:
                data = conn.recv(16384)
            except (BlockingIOError, InterruptedError):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Refused("header_timeout", 408, "request header timeout") from None
                if used:
                    readable = await _wait_fd(conn.fileno(), False, left)
                else:
                    readable = await self._wait_first_byte(conn, mode, taken, left)
                if not readable:
                    raise Refused("header_timeout", 408, "request header timeout") from None
                continue
            except OSError as exc:
                raise Refused("client_error") from exc
            used = True
            if not data:
                if parser.buffered:
                    # The client sent something and half-closed: not a complete
                    # head; forward at L4 rather than guess.
                    return None, parser.buffered
                raise Refused("client_closed")
            try:
                head = parser.feed(data)
            except peek.NotHTTP:
                return None, parser.buffered
            except peek.HeadError as exc:
                # (Envoy's details where the parser has them: a
                # Transfer-Encoding other than chunked)
                why = exc.details or f"bad_request_{exc.status}"
                raise Refused(why, exc.status, exc.reason) from exc
            if head is not None:
                # Empty lines before the request line (RFC 9112 §2.2: a
                # server SHOULD ignore at least one; the parser skips CRLFs
                # and bare LFs there, nothing else) are not sent upstream:
                # the backend reads the head from its request line, as the
                # relay sends it ("Empty lines" in _exchange_py). The bytes
                # after the head go as they came.
                return head, parser.buffered.lstrip(b"\r\n")

    async def _wait_first_byte(
        self, conn: socket.socket, mode: str, taken: float, timeout: float
    ) -> bool:
        """_wait_fd for *conn*'s first byte, the connection listed as
        never used meanwhile (``_unused``): False on timeout; raises
        _DrainClosed where a drain closed it (_close_unused)."""
        fd = conn.fileno()
        unused = self._unused[fd] = _Unused(conn, mode, taken)
        try:
            readable = await _wait_fd(fd, False, timeout, unused)
        finally:
            if self._unused.get(fd) is unused:
                del self._unused[fd]
        if readable is None:
            raise _DrainClosed
        return readable

    async def _connect(
        self,
        addr: tuple[str, int],
        ep: Endpoint | None = None,
        service: Service | None = None,
        *,
        http: bool = False,
    ) -> socket.socket | None:
        """Connect with a timeout; report to outlier detection; None on failure.

        Out of fds for the upstream socket is our problem, not the endpoint's:
        it raises :class:`Refused` (503 on HTTP) and is not counted against the
        endpoint, or a connection flood would eject healthy pods.
        """
        host, port = addr
        timeout = self._connect_timeouts.get((host, port), self.opts.connect_timeout)
        numeric = _numeric_sockaddr(host, port)
        infos: list[tuple[Any, ...]] = []
        err = "no address"
        if numeric is not None:
            infos = [numeric]
        else:  # a host name (DNS endpoint before its first answer): resolve off-loop
            # (a failed lookup is this endpoint's failed connect: the next
            # endpoint is tried, and the client gets the 503 if none is left)
            try:
                infos = list(
                    await asyncio.wait_for(
                        asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM),
                        timeout,
                    )
                )
            except (OSError, TimeoutError) as exc:
                err = "name lookup timed out" if isinstance(exc, TimeoutError) else str(exc)
        for family, stype, proto, _, sockaddr in infos[:2]:
            try:
                sock = socket.socket(family, stype, proto)
            except OSError as exc:
                if exc.errno in FD_EXHAUSTED:
                    raise Refused("fd_limit", 503 if http else None, "overloaded") from exc
                raise
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                rc = sock.connect_ex(sockaddr)
                if rc in (errno.EINPROGRESS, errno.EAGAIN):
                    if not await _wait_fd(sock.fileno(), True, timeout):
                        raise OSError(errno.ETIMEDOUT, "connect timeout")
                    rc = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if rc != 0:
                    raise OSError(rc, os.strerror(rc))
            except OSError as exc:
                sock.close()
                err = exc.strerror or str(exc)
                continue
            except BaseException:
                sock.close()
                raise
            if ep is not None:
                self.health.success(ep)
            return sock
        if ep is not None:
            self.health.failure(ep, err, self.rules.state.table.ejection_groups(ep))
            if self.relay is not None:  # the relay's next answer from each endpoint is news
                self.relay.report_next_successes()
        self.counters.inc(
            "l4proxy_upstream_connect_failures_total", service=_cluster(service), error=err
        )
        return None


# Outlier reports queued for the event loop at most (_endpoint_report)
_MAX_REPORTS = 65536


def _cluster(service: Service | None) -> str:
    """The ``service`` label of a connect failure (Istio's name for a
    destination no rule names)."""
    return service.host if service is not None else PASSTHROUGH


PASSTHROUGH = "PassthroughCluster"  # Istio's name for a destination no rule names


BLACKHOLE = "BlackHoleCluster"  # Istio's cluster of what REGISTRY_ONLY refuses at L4
# refusals of connections no destination was found for: no access log line
_UNLOGGED_REFUSALS = frozenset({"not_redirected", "draining_inbound"})


@dataclass(slots=True)
class _ConnLog:
    """What the access log's line of a connection routed at L4 says (see
    "Access log of connections routed at L4"), filled in on its way to
    the pump: its start (wall clock, and monotonic for its duration), its
    addresses, its UPSTREAM_CLUSTER and the endpoint it went to (the last
    one tried when none took it), this side of that connection, the flags
    of why none took it, and a refusal's answer's status (a gateway's 400)."""

    wall: float
    started: float
    downstream_local: str | None = None
    downstream_remote: str | None = None
    cluster: str = ""
    upstream_host: str | None = None
    upstream_local: str | None = None
    flags: int = 0
    status: int = 0
    http: bool = False  # its line is an HTTP answer's (DPE), not tcp_proxy's

    @classmethod
    def start(cls) -> _ConnLog:
        return cls(time.time(), time.monotonic())

    def addresses(self, conn: socket.socket, origin: Origin | None) -> None:
        self.downstream_local, self.downstream_remote = accesslog.connection_addresses(conn, origin)

    def cut(self) -> None:
        """Still open at the drain's deadline, which cuts it: DC, and the
        details of a request cut so (accesslog.DRAIN_CUT: LOCAL_CUT)."""
        self.flags |= accesslog.DC | accesslog.LOCAL_CUT

    def refused(self, why: str) -> None:
        """A classification's refusal: REGISTRY_ONLY's (Istio's BlackHoleCluster,
        a cluster of no endpoint: UH), a gateway's to bytes that are not
        HTTP (its 400's line, DPE); not_redirected's has no line
        (_UNLOGGED_REFUSALS)."""
        if why == "registry_only":
            self.cluster, self.flags = BLACKHOLE, self.flags | accesslog.UH
        elif why == "gateway_not_http":
            self.http, self.flags = True, self.flags | accesslog.DPE

    def record(self, received: int, sent: int, duration_ms: int) -> accesslog.Record:
        rec = accesslog.connection_record(
            self.wall,
            self.flags,
            received,
            sent,
            duration_ms,
            self.upstream_host,
            self.cluster,
            self.upstream_local,
            self.downstream_local,
            self.downstream_remote,
        )
        if self.http:  # (its 400's, as a head the parser refused: DPE, no destination)
            return rec._replace(status=self.status, local=True, flags=self.flags)
        return rec


def _said_close(head: peek.RequestHead, pending: bytes) -> bytes:
    """*pending* (a connection's first request, *head*, and what followed
    it) with ``connection: close`` added to its head, as the last line
    (``--http-routing connection`` while the health check is failed: the
    upstream answers saying close, and closes). As it was where the head
    closes already (HTTP/1.0 without keep-alive, a ``close`` of its own)
    or asks for a tunnel (Upgrade, CONNECT: Envoy says close on no such
    answer)."""
    if not head.keep_alive or head.method == "CONNECT":
        return pending
    if any(name == "upgrade" for name, _ in head.headers):
        return pending
    end = pending.find(b"\r\n\r\n")  # (the head's: a bare LF was refused, see peek)
    if end < 0:
        return pending
    return pending[: end + 2] + b"connection: close\r\n" + pending[end + 2 :]


def _sockname(sock: socket.socket) -> str | None:
    try:
        return accesslog.address_text(sock.getsockname())
    except OSError:
        return None


# a TCP connection's destination in Istio's TCP metrics (Worker._tcp_key)
_TcpDestination = tuple[str, str, tuple[Endpoint, ...]] | str | None


class _HandedToRelay(Exception):
    """Control flow: the connection now belongs to the per-request relay."""


class _DrainClosed(Exception):
    """Control flow: a drain closed the connection before its first byte
    (Worker._close_unused)."""


class _Unused:
    """A connection whose first byte _peek awaits (Worker._unused): *mode*
    its listener's, *taken* when the wait began (its accept's loop turn)."""

    __slots__ = ("conn", "mode", "settle", "taken")

    def __init__(self, conn: socket.socket, mode: str, taken: float) -> None:
        self.conn = conn
        self.mode = mode
        self.taken = taken
        self.settle: Callable[[bool | None], None] | None = None  # (_wait_fd's)

    def close_if_unused(self) -> None:
        """The drain's close: the wait ends (_DrainClosed), but where a
        byte came meanwhile (its head is arriving: its wait ends readable,
        or did already)."""
        if self.settle is None or self.conn.fileno() == -1:
            return
        try:
            arrived = bool(self.conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            arrived = False
        except OSError:  # (a reset: closed all the same)
            arrived = False
        if not arrived:
            self.settle(None)


class _Routed(NamedTuple):
    """A connection's way to the pump, once decided and connected: its
    upstream, the bytes read of the client to send first, the endpoint it
    counts against (None: not a route's), and its key in Istio's TCP
    metrics (None: not counted there: inbound, a request routed by its
    head)."""

    upstream: socket.socket
    pending: bytes
    endpoint: Endpoint | None
    tcp: LabelSet | None = None


class _Tag(NamedTuple):
    """What the relay passes back with each request's reports (*port*:
    its destination's, for the access log's cluster name)."""

    decision: Decision
    port: int = 0


# Istio's request-duration buckets (ms): the compiled relay's rows count
# by them, the pure relay's requests are put in them here
_DURATION_BUCKETS_MS = istio_metrics.DURATION_BUCKETS_MS


def _describe_istio(c: Counters) -> None:
    c.describe(
        "istio_requests_total",
        "counter",
        "Requests by source, destination, response code and response flags (reporter=source).",
        labelled=True,
    )
    c.describe(
        "l4proxy_mirror_requests_total",
        "counter",
        "Mirrored copies by the mirror's service and version, and its answer's code "
        "(0: none); what the mirror's own sidecar would report (reporter=destination).",
        labelled=True,
    )
    # istio_request_duration_milliseconds_{bucket,sum,count}: one histogram
    # family as /stats renders it (stats.METRIC_HELP)


class _SubsetTag(NamedTuple):
    """What the compiled relay passes back with its reports: one subset of a
    route (hashable: the relay counts per tag)."""

    service: str
    route: str
    subset: str
    version: str
    workload: str
    port: int = 0  # the destination's (the access log's cluster name; 0: none)
    # the labels Istio's metrics read of its pods (istio_metrics.peer_labels:
    # destination_app, destination_canonical_*); none where they differ in
    # version (each request is labelled by its pod's own tag) or are unknown
    peer: Labels = istio_metrics.NO_PEER


_AnyTag = _Tag | _SubsetTag | None  # an outlier report's tag (the request's)
# a report's: a request's, a copy's (MirrorTag), a refused head's (the relays' UNROUTED)
_ReportTag = _Tag | _SubsetTag | MirrorTag | str | None
# an answered row of a relay's report: its tag, status, count, seconds in all,
# duration buckets, and the access log's flag bits (:func:`_response_flags`)
_AnsweredRow = tuple[_ReportTag, int, int, float, tuple[int, ...], int]


# response_flags of a TCP connection the drain's deadline cut: its line's
_DRAIN_CUT_FLAGS = istio_metrics.response_flags(accesslog.DC)


def _drain_cut(key: LabelSet) -> LabelSet:
    """*key* (Worker._tcp_key) of a TCP connection the drain's deadline
    cut: its ``response_flags`` DC, as its access log line says."""
    return tuple((k, _DRAIN_CUT_FLAGS if k == "response_flags" else v) for k, v in key)


def _local_body(status: int) -> str:
    """The body of a local answer to a request whose decision has no endpoint."""
    if status == NO_ROUTE_STATUS:
        return "no route matched"  # a VirtualService's or HTTPRoute's host (Envoy's NR)
    return "no healthy upstream" if status == 503 else "backend not resolved"


def _no_destination_tag(service: str, route: str, port: int = 0) -> _SubsetTag:
    """The tag of a request that no destination answered (a route's own
    answer, no route, a fault's abort, a refusal, a rule of weights 0):
    subset ``none``, version and workload ``unknown``, as Istio labels
    what reached no upstream host."""
    return _SubsetTag(service, route, "none", "unknown", "unknown", port)


def _abort_tagged(fault: Fault | None, service: str, route: str, port: int = 0) -> Fault | None:
    """*fault* whose aborted requests are reported with no destination
    workload or version: Istio's labels for an abort (response flag FI),
    which picks no upstream host, so that a fault injected into a route
    under canary analysis counts against neither version."""
    if fault is None or not fault.abort_ppm:
        return fault
    return fault._replace(tag=_no_destination_tag(service, route, port))


# Envoy's RESPONSE_CODE_DETAILS of a request whose path is no path (OPTIONS *)
ABSOLUTE_PATH_REJECTED = "absolute_path_rejected"
# ... its tag: no destination (Istio's labels all unknown), no route
_ABSOLUTE_PATH_TAG = _no_destination_tag("unknown", ABSOLUTE_PATH_REJECTED)


def _no_path(head: peek.RequestHead, origin: Origin, c: Classification) -> bool:
    """Whether *head* is an asterisk-form ``OPTIONS *`` to answer 404: no
    path a route could match, so Envoy's connection manager answers it
    before any route is asked (absolute_path_rejected, no body), at a
    gateway and on a sidecar's port of a known service alike; not a
    decision. What passes through to an unknown destination (Istio's TCP
    proxy there) still goes. Per request (_decide_request) and per
    connection (its first head) alike."""
    return head.path == "*" and (origin.gateway or c.kind is Kind.ROUTE)


def _refusal_tag(c: Classification) -> _SubsetTag:
    """Istio's labels for a request no route took: ``BlackHoleCluster`` for a
    destination REGISTRY_ONLY blocks, ``unknown`` for no route (404); not
    PassthroughCluster, which is traffic that went where it was dialled."""
    service = "BlackHoleCluster" if c.why == "registry_only" else "unknown"
    return _no_destination_tag(service, c.why or "refused")


class _Shape(NamedTuple):
    """A verdict's ``shape`` and ``tests``."""

    bits: int
    tests: tuple[RequestTest, ...] = ()


def _shape_bits(s: RequestShape) -> _Shape:
    bits = (SHAPE_METHOD if s.method else 0) | (SHAPE_HEADERS if s.headers else 0)
    if s.tests is None:
        return _Shape(bits | SHAPE_PATH)
    return _Shape(bits | (SHAPE_TESTS if s.tests else 0), s.tests)


def _subset_tag(
    service: Service, route: str, subset: str, endpoints: tuple[Endpoint, ...], port: int = 0
) -> _SubsetTag:
    if subset == "none" and not endpoints:  # a route with no destination (weights 0)
        return _no_destination_tag(service.host, route, port)
    version, workload = version_and_workload(service.host, subset, endpoints)
    return _SubsetTag(service.host, route, subset, version, workload, port, _peer(endpoints))


def _peer(endpoints: Sequence[Endpoint]) -> Labels:
    """The pod labels Istio's metrics read of a destination's *endpoints*
    (its first's, as :func:`version_and_workload` reads its version);
    none where they differ in version, or there is none."""
    if not endpoints or versions_differ(endpoints):
        return istio_metrics.NO_PEER
    return istio_metrics.peer_labels(endpoints[0].labels)


def _endpoint_tags(
    service: Service,
    route: str,
    subset: str,
    endpoints: Sequence[Endpoint],
    port: int = 0,
    of: Sequence[Endpoint] | None = None,
) -> tuple[_SubsetTag, ...]:
    """A destination's tag per endpoint (``Choice.endpoint_tags``,
    ``Decision.endpoint_tags``) where its *endpoints* differ in version:
    each one's labels (:func:`endpoint_versions`), for each of *of*
    (default: *endpoints*; a decision's: the ones it tries); a request is
    counted under the tag of the endpoint that answered it, as Istio labels
    it by the pod. Empty where they do not differ: every request under
    :func:`_subset_tag`'s (unknown for a mixed one, when no endpoint
    answered: nothing reached, a circuit breaker's)."""
    host = service.host
    return tuple(
        _SubsetTag(
            host, route, subset, version, workload, port, istio_metrics.peer_labels(e.labels)
        )
        for e, (version, workload) in zip(
            endpoints if of is None else of,
            endpoint_versions(host, subset, endpoints, of),
            strict=False,  # (none where they do not differ)
        )
    )


def _ws_port(ws: WeightedSubset, dialled: int) -> int:
    """The port of a route destination's cluster name (its key's: the
    target port; the *dialled* one where it has none)."""
    return ws.key[1] if ws.key is not None else dialled


def _cluster_port(target: Service, service: Service, dialled: int) -> int:
    """The port of a decision's cluster name: the one dialled, or the
    destination service's only port when it is another service without
    the one dialled (routing's _target_port, less a destination's own
    port, which a Decision does not carry)."""
    if target is service or target.port(dialled) is not None or len(target.ports) != 1:
        return dialled
    return target.ports[0].number


def _access_log_tag(tag: _Tag | _SubsetTag | None) -> TagLog:
    """What the access log says of a relay tag (see
    l4proxy/dataplane/accesslog.py): Istio's cluster name,
    ``outbound|PORT|SUBSET|HOST`` (no subset named: empty), and route
    name; ``PassthroughCluster`` (route ``allow_any``) for a destination
    no rule names; for a local answer: NR and ``route_not_found`` where
    no route took the request, NC and ``cluster_not_found`` for an
    Ingress path whose service is not loaded, ``block_all`` for a
    destination REGISTRY_ONLY refuses (Istio's BlackHoleCluster route)."""
    if tag is None:
        return TagLog(PASSTHROUGH, "allow_any")
    if isinstance(tag, _Tag):
        d = tag.decision
        host, route, subset, port = d.service.host, d.route, d.subset, tag.port
    elif isinstance(tag, _SubsetTag):
        host, route, subset, port = tag.service, tag.route, tag.subset, tag.port
        if host == "BlackHoleCluster":  # (_refusal_tag's)
            return TagLog("", "block_all")
        if host == "unknown":  # a refusal (_refusal_tag's): route is its reason
            if route == "no_ingress_route":
                return TagLog("", "", NR_FLAG, "route_not_found")
            if route == "ingress_backend_not_found":  # (Envoy's route to no cluster)
                return TagLog("", "", NC_FLAG, "cluster_not_found")
            if route == ABSOLUTE_PATH_REJECTED:  # (OPTIONS *: _decide_request)
                return TagLog("", "", 0, ABSOLUTE_PATH_REJECTED)
            return NO_TAG
    else:
        return NO_TAG
    if route == NO_ROUTE:
        return TagLog("", "", NR_FLAG, "route_not_found")
    # a gateway service's host: no upstream took it (its route answered it:
    # a redirect, 404 no route matched, the 500 of a backend not resolved
    # or refused, weights 0): no cluster, as Istio's gateway logs it
    if is_gateway_host(host):
        return TagLog("", route)
    named = "" if subset in ("none", DEFAULT_SUBSET) else subset
    return TagLog(f"outbound|{port}|{named}|{host}", route)


def _destination(tag: _ReportTag, cluster: str) -> dict[str, str]:
    """Istio's ``destination_*`` labels of a row's *tag* (*cluster*: this
    sidecar's, where every destination it knows is).

    A request whose head was refused before any route was asked (a relay's
    ``UNROUTED``: two Host lines, ``Host: a b``, a dot-segment, 400) is
    ``unknown`` in every ``destination_*`` label, a gateway's and a
    sidecar's alike: Istio's stats name a destination by the route
    (``allow_any``: ``PassthroughCluster``), the cluster, else the Host
    read, and such a request has none; nothing was passed through."""
    peer: Mapping[str, str] = istio_metrics.NO_PEER
    if tag is None:
        service, name, version, workload = "unknown", PASSTHROUGH, "unknown", "unknown"
    elif isinstance(tag, str):  # UNROUTED (the one str a relay reports)
        service = name = version = workload = "unknown"
    elif isinstance(tag, _SubsetTag | MirrorTag):
        service, version, workload = tag.service, tag.version, tag.workload
        name = service.split(".", 1)[0]
        if isinstance(tag, _SubsetTag):
            peer = tag.peer
    else:
        d = tag.decision
        service = d.service.host
        name = service.split(".", 1)[0]
        if d.subset == "none" and not d.endpoints:  # a local answer (404, weights 0):
            version = workload = "unknown"  # labelled as the compiled relay's are
        else:  # (every endpoint ejected: UH, under the pods its requests reached)
            pods = d.endpoints or d.ejected
            version, workload = version_and_workload(service, d.subset, pods)
            peer = _peer(pods)
    if is_gateway_host(service):  # (no service answered: Istio's gateway says unknown)
        service = name = version = workload = "unknown"
        peer = istio_metrics.NO_PEER
    return istio_metrics.destination_labels(service, name, version, workload, peer, cluster)


def _istio_labels(
    tag: _ReportTag, status: int, source: Mapping[str, str] = _NO_SOURCE, flags: int = 0
) -> dict[str, str]:
    """Istio's standard metric labels of a request's row (*source*: the
    sidecar's, :func:`istio_metrics.source_labels`; *flags*: the access
    log's bits of its requests), so that Istio's dashboards, Flagger's and
    Argo's queries find it. A mirrored copy's (a :class:`MirrorTag`,
    l4proxy's own family) keeps the few the canary reads: what the
    mirror's own sidecar would say of it (no response flags: a copy has
    no line)."""
    cluster = source.get("source_cluster", istio_metrics.DEFAULT_CLUSTER)
    destination = _destination(tag, cluster)
    if isinstance(tag, MirrorTag):
        return {
            "reporter": "source",
            **{k: destination[k] for k in _MIRROR_DESTINATION},
            "response_code": str(status),
        }
    return istio_metrics.request_labels(source, destination, status, _response_flags(tag, flags))


def _response_flags(tag: _ReportTag, flags: int) -> str:
    """``response_flags`` of requests a relay reported with the access
    log's *flags* (the pure relay's bits as its line takes them; the
    compiled relay's rows', its final flags and LOCAL_VERDICT): the flags
    their line shows (:func:`accesslog.shown_flags`), a route's own
    answer's (NR, NC) from its *tag* as the log describes it."""
    if not flags:
        return istio_metrics.NO_FLAGS
    said = NO_TAG
    if flags & accesslog.LOCAL_VERDICT and not isinstance(tag, str | MirrorTag):
        said = _access_log_tag(tag)
    return istio_metrics.response_flags(accesslog.shown_flags(flags, said))


# the destination labels of a mirrored copy's rows (as Istio's were before
# the full set: the canary selects by them)
_MIRROR_DESTINATION = (
    "destination_service",
    "destination_service_name",
    "destination_version",
    "destination_workload",
)


async def _wait_fd(
    fd: int, writable: bool, timeout: float, unused: _Unused | None = None
) -> bool | None:
    """Wait until *fd* is readable (or writable); False on timeout; None
    where *unused* (a connection's wait for its first byte) was told to
    close (_Unused.close_if_unused).

    The watcher is removed before returning, whatever happens: the fd is about
    to be handed to the pump thread, and the event loop must not keep a poll
    handle on it (uvloop/libuv must never see an fd after it changes owner).
    One future and one timer handle per wait (no asyncio.wait_for: this runs
    for nearly every connection, twice).
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bool | None] = loop.create_future()

    def settle(ok: bool | None) -> None:
        if not fut.done():
            fut.set_result(ok)

    if unused is not None:
        unused.settle = settle

    timer = loop.call_later(timeout, settle, False)  # first: it raises for a bad timeout
    if writable:
        loop.add_writer(fd, settle, True)
    else:
        loop.add_reader(fd, settle, True)
    try:
        return await fut
    finally:
        timer.cancel()
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _stop_listening(sock: socket.socket) -> None:
    """Close a listener the drain retired, and end its listening for
    every process that holds it: ``shutdown(SHUT_RD)`` takes a listening
    socket out of the kernel's listening table (Linux: the queue's
    connections reset as by the close, new handshakes refused), so that
    the supervisor's copy, kept through the stop for a worker to drain
    should this one die (Supervisor._drains_anew), leaves no socket
    listening that no one serves. Only here, at the drain: a worker that
    dies otherwise leaves its listeners listening for its replacement."""
    with contextlib.suppress(OSError):  # (ENOTCONN: not listening)
        sock.shutdown(socket.SHUT_RD)
    sock.close()


def _numeric_sockaddr(host: str, port: int) -> tuple[Any, ...] | None:
    """getaddrinfo()'s answer for a literal address, without the call (and its
    allocations) on the per-connection path; None for a host name."""
    try:
        if ":" in host:
            socket.inet_pton(socket.AF_INET6, host)
            return (socket.AF_INET6, socket.SOCK_STREAM, 0, "", (host, port, 0, 0))
        socket.inet_pton(socket.AF_INET, host)
        return (socket.AF_INET, socket.SOCK_STREAM, 0, "", (host, port))
    except OSError:
        return None


def _send_quietly(conn: socket.socket, data: bytes) -> bool:
    """Send a short answer on a fresh socket (its send buffer is empty); False if
    the client is gone."""
    try:
        conn.send(data, socket.MSG_NOSIGNAL)
    except OSError:
        return False
    return True


async def _linger_close(conn: socket.socket, timeout: float) -> None:
    """Close after an error answer without destroying it (a "lingering close").

    The client may still be sending (the rest of an oversized head, a request
    body behind a bad head, a slowloris trickle). close() on a socket with
    unread bytes makes the kernel send RST, and a RST makes the client's
    kernel drop the answer we just sent before the client reads it: the
    client sees "connection reset" instead of our 400/408/431/503. So: send
    FIN (shutdown SHUT_WR), read and discard until the client closes too or
    *timeout* passes, then close. Runs in the connection's own task, so the
    drain and ``--max-connections`` count it.
    """
    try:
        conn.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if not conn.recv(65536):
                    break
            except (BlockingIOError, InterruptedError):
                left = deadline - time.monotonic()
                if left <= 0 or not await _wait_fd(conn.fileno(), False, left):
                    break
    except OSError:
        pass
    finally:
        conn.close()


def _test_hang_relay(relay: HttpRelay) -> None:
    """Tests only: ``L4PROXY_TEST_HANG_RELAY=PATH:SECONDS`` (read once, at
    the start) has the relay's thread sleep SECONDS at once, as a stuck one
    would (HttpRelay.hang_for_test), in the one worker that removes PATH:
    its successors serve."""
    spec = os.environ.get("L4PROXY_TEST_HANG_RELAY")
    if not spec:
        return
    path, _, seconds = spec.rpartition(":")
    try:
        os.unlink(path)
    except OSError:
        return
    log.warning("L4PROXY_TEST_HANG_RELAY: the relay's thread sleeps %ss", seconds)
    relay.hang_for_test(float(seconds))


def _reset(conn: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): tells the client at once, frees the fd."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    conn.close()


# A classic BPF socket filter (SO_ATTACH_FILTER) that drops each TCP segment
# whose flags are SYN without ACK, the first of a handshake, and passes every
# other: run on a listener, it sees the TCP header first (the flags at byte
# 13). See Worker.stop_accepting.
_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)  # (Linux's, asm-generic)
_DROP_SYNS = b"".join(
    struct.pack("HBBI", *insn)
    for insn in (
        (0x30, 0, 0, 13),  # ldb [13]: the TCP flags
        (0x54, 0, 0, 0x12),  # and #(SYN|ACK)
        (0x15, 0, 1, 0x02),  # jeq #SYN: drop, else pass
        (0x06, 0, 0, 0),  # ret #0: drop
        (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1: the whole segment
    )
)


# sock_diag (NETLINK_SOCK_DIAG): the TCP sockets in SYN-RECV, a handshake's
# request sockets among them (what ``ss -tn state syn-recv`` lists)
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_DUMP_REQUEST = 0x301  # NLM_F_REQUEST | NLM_F_DUMP
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_SYN_RECV = 3


def _handshakes_under_way() -> dict[int, int] | None:
    """The TCP handshakes this network namespace's kernel holds under way
    (SYN-RECV: its SYN-ACK sent, the client's ACK not come), counted by
    local port, IPv4 and IPv6 (a dual-stack listener's, IPv4 ones too);
    None where sock_diag cannot be asked. A listener's handshakes are
    those of its port: another listener's on the same port (another
    address, another worker's ``SO_REUSEPORT`` one) count too, which only
    keeps a retiring listener open longer (stop_accepting)."""
    counts: dict[int, int] = {}
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(1.0)
            for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
                # inet_diag_req_v2: family, protocol, ext, pad, states; an
                # inet_diag_sockid of zeros (no filter: a dump), its cookie
                # INET_DIAG_NOCOOKIE
                req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_SYN_RECV)
                req += b"\0" * 40 + b"\xff" * 8
                head = struct.pack(
                    "=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_DUMP_REQUEST, seq, 0
                )
                nl.sendall(head + req)
                if not _count_dumped(nl, counts):
                    return None
    except (OSError, struct.error) as exc:  # (a reply cut short: not asked, as no sock_diag)
        log.debug("cannot ask sock_diag for the handshakes under way: %s", exc)
        return None
    return counts


def _count_dumped(nl: socket.socket, counts: dict[int, int]) -> bool:
    """Read one sock_diag dump from *nl* to its end, each socket counted
    by its local port in *counts*: whether it ended well."""
    while True:
        data = nl.recv(65536)
        if not data:
            return False
        off = 0
        while off + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, off)
            if kind == _NLMSG_DONE:
                return True
            if kind == _NLMSG_ERROR or length < 16:
                return False
            if length >= 16 + 8:  # inet_diag_msg: family, state, timer, retrans, sport
                (port,) = struct.unpack_from("!H", data, off + 20)
                counts[port] = counts.get(port, 0) + 1
            off += (length + 3) & ~3


def _refuse_handshakes(sock: socket.socket) -> bool:
    """Make listener *sock* take no new handshake (its SYNs dropped; the
    connections in its queue and the handshakes under way go on): whether
    the filter took. Connections accepted afterwards inherit it, where it
    drops nothing (a SYN on an open connection is not one to answer)."""
    program = array.array("B", _DROP_SYNS)  # (its address: struct sock_fprog's pointer)
    fprog = struct.pack("HP", len(_DROP_SYNS) // 8, program.buffer_info()[0])
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError as exc:  # (no BPF: the queue is still taken, as far as it goes)
        log.debug("cannot filter new handshakes on a closing listener: %s", exc)
        return False
    return True

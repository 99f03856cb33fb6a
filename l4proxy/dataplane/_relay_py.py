"""The per-request HTTP/1.1 relay, pure Python: I/O shell around Exchange and Pools.

Theory of operation
===================
A :class:`HttpRelay` owns one daemon thread running a level-triggered
``select.epoll`` loop, like the L4 pump (``l4proxy/dataplane/_pump_py.py``): the
worker's event loop never sees a relayed socket. The worker hands over a
client connection whose original destination is an HTTP port with
:meth:`HttpRelay.add`; from then on this thread owns its fd.

Per client connection an :class:`~l4proxy.dataplane._exchange_py.Exchange` says what
to do; this module only performs it:

* :class:`Route`: ask the ``decide`` callback (the route table, the weighted
  draw, the endpoint choice: Python decides) for the head, with the table
  generation current at that moment; check out an idle upstream connection
  to the first candidate endpoint from :class:`~l4proxy.dataplane._pool_py.Pools`, or
  connect one (non-blocking; a failed connect tries the next candidate and
  is reported for outlier detection); no candidate left: 503.
* bytes to a side are sent at once; what the kernel does not take is held
  (one buffer per side) and the other side is not read until it drains.
* a send to the upstream that fails (a reset: a server answering before it
  read the body, a 413, resets the connection as it closes) stops the
  sending only: what the server sent before is read first, and is the
  client's answer; then its end (a retry only with nothing received).
* :class:`Retry` (a pooled connection closed before any answer, or a try
  the route's retry policy gives up): to another candidate endpoint when
  there is one (the one whose connection failed goes last: Istio's retry
  policy skips the previous hosts, unless its
  ``retryIgnorePreviousHosts`` is false; a policy's try's stale pooled
  connection is retried on its endpoint); a retry's
  failed connect moves on to the next candidate, as a first attempt's does.
  A policy's retry goes once its backoff passed (see "Timers"), on an idle
  pooled connection to its endpoint when there is one, as a first try
  (Envoy's retries go through the connection pool), else on a new one; the
  pooled connection's retry (on a new connection) and a failed connect's
  next candidate at once, unless that move is one of the policy's tries
  (a policy that retries a failed connect): then it too waits its
  backoff, as Envoy's retry after a failed connect does, and goes as a
  policy's retry (``_connect_error``), to the failed endpoint again when
  every other candidate was tried (it goes last, not dropped: one endpoint
  refusing is dialled 1 + attempts times, as Envoy's ``previous_hosts``
  predicate falls back to a tried host).
* :class:`Release`: the upstream goes back to its pool (watched for
  readability: a server that closes an idle connection gets it evicted) or
  is closed; how it served the request goes to outlier detection (below).
* :meth:`HttpRelay.retain_endpoints` (a new route table went live): the
  endpoints it no longer names give back their idle pooled connections at
  once, and those in flight are closed when they are released; the
  copies' pool's too (see "Request mirroring").
* :meth:`HttpRelay.endpoint_settings` (a DestinationRule's
  ``connectionPool`` per destination): an endpoint's own connect timeout,
  requests per connection and pool idle timeout
  (:class:`~l4proxy.dataplane._pool_py.EndpointSettings`), where the
  constructor's are the default, and whether its 5xx answers are reported
  (its ``outlierDetection``'s; see "Outlier detection") and its circuit
  breakers (below); applied on the relay's thread, from then on (the next
  connect, check-in, expiry, response).
* :class:`Tunnel` (Upgrade, CONNECT) and :class:`NotHTTPConnection` hand
  the sockets to the ``l4`` callback (the L4 pump), with what is held and
  the tunnel's endpoint. The tunnel's request leaves the pool's count only
  once ``l4`` has returned: the worker counts the tunnel from there until
  the pump reports its end (:meth:`HttpRelay.add_external`), so LEAST_REQUEST
  never sees an endpoint carrying WebSockets as idle.
* :class:`Close`: after the held bytes are sent, ``shutdown(SHUT_WR)`` and a
  short lingering read, so a client still sending does not turn our answer
  into a RST.

Outlier detection (``l4proxy/rules/health.py``): ``connect_failed`` hears of
every failed connect, ``response_failed`` of every gateway failure on an
established connection (:class:`Release` with a *failure*: closed or reset
before the response's end, a response that cannot be framed), ``answered`` of
a complete response, but only when that may change the count: an endpoint's
first answer, and its first after any failure this relay reported or
:meth:`HttpRelay.report_next_successes` announced (a failure reported
elsewhere). Every answer reported would cost the worker's event loop a
wake-up per request. A connect is no success here (see health.py). The
application's statuses are answers like any other, except where the
endpoint's settings ask for its 5xx (``EndpointSettings.report_5xx``: its
DestinationRule's ``outlierDetection`` counts them): there every final
response of status 500 to 599, complete, or a try's that the retry
policy retries (Envoy tells outlier detection each attempt's status), goes
to ``answered_5xx`` with its status, every one, and counts as a failure
does for the news above (the endpoint's next answer is reported, and the
compiled twin's other relay reports every endpoint's next). The check
costs an answer below 500 one compare. A tunnel's head (101, a CONNECT's
2xx) is an answer as before; interim heads and local answers are not
reported; a 5xx whose body is cut short is a failure (``response_failed``),
as any other answer's.

Tags: a request is reported (``report``, and outlier detection's callbacks)
with its decision's ``tag`` (``report`` with its status, its seconds and
the flag bits its access log line takes, ``Done``'s and
``_Conn.log_flags``, whether the log is on or not: Istio's
``response_flags``); where its endpoints differ in version
(``Decision.endpoint_tags``), with the tag of the endpoint of its last try
that reached one (``_reached``: ``_take_idle`` took one of its
connections, ``_connect`` began one; ``_Conn.ep_tags`` by endpoint, built
per such request, none for the others), the rule of
``verdict.Choice.endpoint_tags``; a copy with its endpoint's
(``_mirror_endpoint``).

Session persistence (``Decision.session``, an HTTPRoute rule's
``sessionPersistence``): ``decide`` routes a request whose token names one
of its route's endpoints to that endpoint first; here, each try that
reaches an endpoint (``_session_try``, where ``_reached`` is) sets the
exchange's :attr:`~l4proxy.dataplane._exchange_py.Exchange.session_line`
to that endpoint's token, or to none where the request's token named it:
the final head an endpoint answers gives the client the token of the one
that answered (a failed connect's next candidate, a retry's endpoint), as
Envoy's stateful session filter does. A request without session
persistence pays an attribute test where a try begins.

Circuit breakers (``EndpointSettings.max_connections``, ``max_pending``,
``max_active``: a DestinationRule's ``connectionPool.tcp.maxConnections``,
``http.http1MaxPendingRequests``, ``http.http2MaxRequests``), per endpoint
and per relay, where Envoy's count per cluster and proxy (our pools are per
endpoint, as the other connectionPool settings are); 0 is unlimited, and
an endpoint without them pays a dict lookup per try (``_try``). A try
(a first one, a policy's retry, the pooled connection's retry, a failed
connect's next candidate) to an endpoint with ``max_active`` requests of
this relay in flight (``Pools.own_active``: not the L4 counts) is not sent:
Envoy's local 503 ``upstream connect error or disconnect/reset before
headers. reset reason: overflow`` with ``x-envoy-overloaded: true``, the
client connection kept as for the other local answers, counted in
:meth:`HttpRelay.overflows` and as the request's 503 in the reports, no
report to outlier detection (the endpoint did nothing), and no other
candidate tried (the load balancer chose; the overflow is the answer). A
retry's request that overflows is lost, answered so too (UO in the access
log, never retried: Envoy's router never retries an overflow), as one with
no fd for its connection is answered a first try's 503 ``overloaded`` (OM;
``Exchange.retry_refused``). A try that needs a new connection to an
endpoint whose open ones (checked out, connecting, idle:
``Pools.connections``) are ``max_connections`` takes an idle one if there
is one, else waits (``_pend``), in order, while fewer than ``max_pending``
wait there (0: unlimited), else overflows. A waiting request has no
upstream: its client is watched for a reset (which takes it out of the
line, as its close does), its route timeout runs (the 504 takes it out), a
per-try timeout gives the try up as a connect's would. It goes when its
endpoint is kicked (``_kicks``: a connection of it released reusable, then
checked out to the first waiting request instead of idle; one closed, then
a new one; ``endpoint_settings`` raising or removing a limit):
``_serve_pending`` before the loop waits again, no scan of the line when
nothing changed, no wake-up while nothing can go. An endpoint that left the
table (``retain_endpoints``) serves its waiting requests as a connect to it
does today (they go, on connections closed at check-in).
:meth:`HttpRelay.pending` says how many wait per endpoint.

Timers (checked every ``_TICK`` seconds): an incomplete request head older
than ``header_timeout`` gets 408 (the same answer as the L4 path's, counted
through the ``refused`` callback as ``header_timeout``); a connection's first
head is timed from its hand-off, as the L4 path times its peek from accept
(a client that connects and sends nothing gets the 408 too), later heads
from their first byte (idle keep-alive is not a slow head); a connection
idle for ``idle_timeout`` is closed, between requests or in the middle of
one (a hung upstream); idle pooled connections expire after their
endpoint's pool idle timeout (``endpoint_settings``, else the pool's), at
the tick: within a tick of it, a timeout shorter than the tick too. A route
with a timeout (``Decision.timeout``, Envoy's route timeout) times its
request from the request's last byte read (``Exchange.request_complete``:
the head's, for a request without a body, or for one whose body came
whole with it, so a slow connect counts) to
the response's last byte; past it ``Exchange.upstream_timeout`` says what
to do (504, or a reset once the response began), and the upstream
connection is closed, never pooled.
A route with a retry policy (``Decision.retry``) with a per-try timeout
times each try the same way, the first from the request's last byte read,
each retry from its start (a policy's, after its backoff; the next
endpoint's after a failed connect too: every try its own timer, as
Envoy's); past it ``Exchange.try_timeout`` says what to do
(a retry, else the 504). The route timeout is not started again by a retry:
it bounds every try together, as Envoy's. A policy's retry waits Envoy's
jittered exponential backoff first (``RetryPolicy.backoff_s``, drawn from
this relay's ``random.Random``): the connection has no upstream then, no
per-try timer runs, the route timeout does (its 504 ends the wait); the
loop wakes for the soonest of every backoff's end, route deadline,
per-try deadline and connect deadline (``_next_timer``, kept no later than
each where it is set; the 0.25 s tick is too coarse: a timeout of 100 ms
fires at 100 ms, as Envoy's), fires the timers due, sends the retries due,
gives up the connects due and finds the soonest again (``_timers_due``:
one scan; about once per route timeout in the steady state, the soonest
then being the oldest request in flight's). The tick (idle and header
timeouts, the pool's expiry) judges the exchanges' timers and the connect
deadlines too, a backstop. A policy's wait is no idleness: the idle
timeout runs from the retry's send. While a request is in flight the
client, not read then, is watched for its reset alone (``_WATCH_RESET``:
nothing wanted, edge-triggered; epoll says ``EPOLLHUP``/``EPOLLERR``
anyway): a client gone ends the exchange, its upstream closed, no retry
more, whether or not it half-closed or pipelined its next request first
(the compiled twin's lazy ``EPOLLIN``, then the same mask); a FIN alone
says neither, a half-close whose answer is still due.

Fault injection (``Decision.fault``, a route's
:class:`~l4proxy.dataplane.verdict.Fault`: Envoy's fault filter, which runs
before the router): per request of the route, two draws of this
relay's ``random.Random``, the delay's then the abort's (none for a share of
0 or all). A delayed request waits in ``ROUTING`` with no upstream and no
timer of its route (``_Conn.fault_until``, one of ``_timers_due``'s: Envoy's
route timeout starts when the router gets the request), its client
watched for a reset (which ends it: nothing went upstream), the pipelined
requests behind it unread; then it goes as any (``_go``), or is aborted. An
abort is a local answer (``Exchange.refuse(whole=True)``): its status and
``FAULT_ABORT_BODY``, reported with ``Fault.tag`` (else the route's), no endpoint told or
counted; a request body all here already (read with its head: a delayed
request's client is not read) is dropped and the connection goes on as
its head asked, one not complete closes it (``connection: close``, the
lingering close: Envoy's response before the request is complete). A
request answered locally by its route (its decision's ``local``, or none
of its destination's endpoints: the router's 503, edited as the relay's
other own answers, see ``HeadEdits``) is drawn for as well, first:
delayed, then its local answer (``_Conn.fault_local``), or aborted
instead.

Request mirroring (``Decision.mirrors``, each a
:class:`~l4proxy.dataplane.verdict.Mirror`: Istio's ``mirror``, the Gateway
API's ``RequestMirror``): a request routed upstream has each mirror drawn
on its own (``_draw_mirrors``, before its fault's draws; this relay's
``random.Random``, no draw for ``MIRROR_SCALE``), and the
endpoint of each drawn then (round robin per ``balance_key``, skipping names
not resolved yet). The Exchange keeps the request's bytes as sent upstream
(``Exchange.mirror``: the first try's, at most the replay limit) and says
``Shadow`` once it was read whole and sent, or given up before
(``Exchange._given_up``: a request without a body that no try took, its
connects failed, a circuit breaker's or no fd's 503, the route timeout
before a connection, has the head as it would have been sent; one not
read whole, none: its copies dropped). Then, once the batch of actions
sent the primary its bytes (``_Conn.shadows_due``, ``_mirrors_due``: the
primary first, its copies whatever its send did), each drawn mirror gets a
copy (``_mirror``): ``shadow_head`` of the head as sent and the body bytes
as sent (``_Shadow``, non-blocking, in this epoll), on a connection of
the copies' pool (``_shadow_pool``: a Pools of its own, MIRROR_MAX_IDLE
idle per endpoint, the relay's pool idle timeout; never the routes'
pool): the newest idle one to its endpoint, else a new one
(``mirror_connects``). The answer is read and thrown away to its end by
its framing (``_shadow_read``: ``parse_response_head``, interim heads
skipped, ``_copy_framing``, a ``BodyFramer``); then the connection goes
back idle (``_ShadowIdle``, watched: any event evicts it, before anything
in the batch could take it) unless the answer or the request may not
leave it reusable; a final head it cannot frame ends the copy with a
reset. A copy on a reused connection that fails before any answer byte
goes once more on a new one (``_shadow_retry``). Else it ends at the
server's close, or once ``MIRROR_READ_LIMIT`` bytes of it were read
(done: reset), or fails (a connect, send or receive error, its deadline:
the route's timeout from its start, else ``MIRROR_TIMEOUT``;
``_timers_due``, the tick a backstop) and is reset. Its first bytes are
read for its status on the way (``_Shadow.answer``, an
``AnswerStatus``), and at its end, whichever, the copy is reported
(``report``: its Mirror's tag, that status, the seconds since its
start, no flags; not one the relay closes in flight). Idle copy connections expire
at the tick (``Pools.expire``); those to an endpoint the route table no
longer names are closed when :meth:`HttpRelay.retain_endpoints` says so
(``Pools.remove_endpoint``, as the routes' pool's), and a copy in flight
to it closes its connection at its end (its check-in); the new connection
of a copy's retry is not marked so, as a request's new one is not. Nothing else of it touches
the client, the pool, the request's report or outlier detection. Dropped
(``mirror_dropped``): bytes past the replay limit, an answer that began
before the request's end, a body not all read when the request was given
up, a tunnel's request, ``max_mirrors`` copies in flight already, no
endpoint to use, a socket or connect failing at once. A request answered
locally before any try (a fault's abort forgets its draw:
``_fault_abort``), cut by its client before it was read whole, or retried
(one copy) has no more.

Access log (``access_log``, an :class:`~l4proxy.dataplane.accesslog.AccessLog`:
``--access-log``): a line per request counted (``_count``: answered,
answered here, or cut short), formatted by
:func:`~l4proxy.dataplane.accesslog.format_line` from what ``_route``
kept of its head (``_Conn.log_head``, its start), what its ``Done``
says (its flags, the body's bytes read), the bytes queued for the client
(``_Conn.sent``), the endpoint of its last try that reached one
(``_Conn.upstream``: ``_take_idle``, ``_connect``) and the shell's own
flags (``_Conn.log_flags``: a fault's delay, the idle timeout; the local
answers' reasons go with ``Exchange.refuse``). A head the parser refused
gets its line too, from its first line (``Exchange.refused_line``). Its
DOWNSTREAM_REMOTE_ADDRESS is the address the connection was taken with
(``_Conn.address``: accept()'s, handed to :meth:`HttpRelay.add`, else
asked as it is taken), never asked at the line: a client that reset its
connection (``0 DC``) has no peer left to ask for. The
line goes to a :class:`~l4proxy.dataplane.accesslog.LineWriter` of the
relay's own (never waited for: a full buffer drops the line, counted),
or to ``AccessLog.sink`` (the compiled twin's buffer); the worker's lines
of connections routed at L4 join them there (:meth:`HttpRelay.access_log_line`;
``close(access_log=False)`` keeps the writer for those a drain ends, till
:meth:`HttpRelay.close_access_log`). Without an access log nothing of this
runs but the counting of ``_Conn.sent``.

Forwarding headers (``forwarding``, a
:class:`~l4proxy.dataplane.forwarding.Forwarding`: the worker's
``--trusted-proxies``): a connection whose origin is a gateway listener's
(``origin.gateway``) is ``_Conn.forward``, with its draw of the relay's
request-id stream (``RequestIds``, from ``seed``, else the OS) made as it
is taken; each of its heads gets a request id and the forwarding headers,
with the client's address (``peer_text`` of ``_Conn.address``), where ``_route``
starts
(``Exchange.forward``): before the decision and its edits, so that the
access log of a local answer has them too (``_Conn.log_xff``, ``log_rid``:
the values sent upstream, which the line says instead of the client's).
Other connections, and every connection of a relay made without it, pay
an attribute test per request.

Drain (:meth:`HttpRelay.drain`, the worker's SIGTERM: Envoy's drain close
of its HTTP/1 connections): the connections it names (a gateway
listener's, ``origin.gateway``: inbound, Envoy's ``InboundOnly``; or every
one) are told :meth:`Exchange.drain` on the relay's thread, those taken
afterwards as they are taken: every answer from then on says
``connection: close`` and closes its connection after it, a connection
between requests closes (FIN, the lingering close), a request in flight
goes on. When they close is drain()'s *spread*: 0 (Envoy's
``drain_strategy`` immediate), all at once; else (Envoy's gradual, which
the worker asks with a quarter of what is left of the drain) the N
between requests close one after another, the k-th (k from 0, in the
order they were taken) at k * spread / N from the drain's start, so that
their clients reconnect spread out, not in one burst. One scheduled that
takes a request meanwhile is told as the others are: its answer says
close (``_idle_closes``; the tick closes those due, at most ``_TICK``
late). One whose next head came and is not read yet is left to be read,
and one taken less than ``_DRAIN_FRESH_S`` ago that has sent nothing is
due again then (its client connected to send a request; closed at once,
it read EOF for it). The relay's thread then serves what is left as before;
:meth:`HttpRelay.close` cuts what is still open at the drain's deadline
(a reset) and says how many it cut; a request cut so is logged ``0 DC``
with ``accesslog.DRAIN_CUT``, Envoy's ``downstream_local_disconnect(...)``
for a close the proxy made (``accesslog.LOCAL_CUT``), not a client's
``downstream_remote_disconnect``.

:meth:`HttpRelay.stop_signalled` is the worker's stop signal, heard
before the drain begins: what discourage() does, for good, so that no
answer after the signal keeps its client while the event loop gets to
the drain (the compiled twin hears the signal on its own thread: its
"Stop signals").

:meth:`HttpRelay.discourage` is the drain's first half without the drain
(Envoy's ``drainClose()`` while the server's health check is failed,
``/healthcheck/fail``, for a listener of the default drain type): while
it is on, every answer on a gateway listener's connection says
``connection: close`` and closes its connection after it (``Exchange.draining``
set, on those taken meanwhile too), and a connection between requests
is left alone until its next answer, as Envoy leaves it, as is one whose
final head went out before (it keeps as that head said: Envoy asks
``drainClose()`` at each response's head); off, answers let their
clients persist again (one told already closes). The app's own
connections (outbound) are left alone, as Envoy's ``modify_only`` egress
listeners are. The per-request cost of both: an attribute test where an
answer decides whether the client persists.

Liveness: each turn of the loop stores its time (``_turn``; the poll's
timeout is never past the next tick, ``_TICK``, so an idle loop turns four
times a second). :meth:`HttpRelay.stalled` says how long ago the last one
began while the thread should be running: a thread stuck (an endless loop,
a deadlock, a callback that never returns) relays nothing, while the
worker's event loop still answers the supervisor's watchdog, which asks
for it (``alive``: run._answer_supervisor) and replaces such a worker (a
``--single-process`` one asks itself and exits: run._watch_alone; /ready
says ``STALLED`` meanwhile). A thread :meth:`HttpRelay.close` gave up
waiting for is still counted (stuck). :meth:`HttpRelay.hang_for_test`
(tests only) sleeps the thread at its next wake-up.

Ownership of file descriptors: a socket belongs to exactly one of: the
hand-off queue, a client connection, a checked-out upstream, the pool's idle
set, a mirrored copy, the copies' pool's idle set, or (after a tunnel) the
L4 callback. Every path that drops one closes
it exactly once (``_close_client``, ``_drop_upstream``).
"""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from l4proxy.dataplane import accesslog
from l4proxy.dataplane._exchange_py import (
    CONTINUE_100,
    OVERFLOW_BODY,
    OVERFLOW_HEADERS,
    Action,
    Client,
    Close,
    ConnectRetry,
    Done,
    Exchange,
    NotHTTPConnection,
    Phase,
    Release,
    Retry,
    Route,
    Shadow,
    Tunnel,
    Upstream,
    edit_bytes,
    header_lines,
    session_line,
)
from l4proxy.dataplane._framing_py import (
    BodyFramer,
    Framing,
    FramingError,
    ResponseHead,
    head_may_end,
    parse_response_head,
)
from l4proxy.dataplane._peek_py import DEFAULT_MAX_HEAD, MAX_CL_DIGITS, RequestHead
from l4proxy.dataplane._pool_py import (
    EndpointSettings,
    PoolOptions,
    Pools,
    checked_endpoint_settings,
)
from l4proxy.dataplane.forwarding import Forwarding, RequestIds, packed_ip, peer_text
from l4proxy.dataplane.verdict import (
    DEFAULT_MAX_MIRRORS,
    FAULT_ABORT_BODY,
    FAULT_SCALE,
    MIRROR_MAX_IDLE,
    MIRROR_READ_LIMIT,
    MIRROR_TIMEOUT,
    AnswerStatus,
    Fault,
    HeadEdits,
    Mirror,
    RetryPolicy,
    SessionPersistence,
    no_endpoint_body,
    rr_salt,
    rr_start,
    session_token,
    shadow_head,
)

__all__ = ["UNROUTED", "Decision", "HttpRelay"]

_EPOLLIN: Final = select.EPOLLIN
_EPOLLOUT: Final = select.EPOLLOUT
_EPOLLERR: Final = select.EPOLLERR
_EPOLLHUP: Final = select.EPOLLHUP
_EPOLLRDHUP: Final = select.EPOLLRDHUP
# A client in flight, not read, stays in epoll with nothing wanted: epoll
# says EPOLLHUP and EPOLLERR whatever the mask (a TCP peer's reset: both; its
# FIN alone: neither, so a half-close wakes nothing), edge-triggered: once.
# (The mask 0 means not in epoll.)
_WATCH_RESET: Final = select.EPOLLET
_SEND_FLAGS: Final = socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT
_LINGER0: Final = struct.pack("ii", 1, 0)
_READ: Final = 65536
_TICK: Final = 0.25
_LINGER_S: Final = 2.0
_DRAIN_FRESH_S: Final = 1.0  # a drain leaves a connection this young for its first head
_FD_EXHAUSTED: Final = (errno.EMFILE, errno.ENFILE)
_MAX_REMEMBERED: Final = 4096  # endpoints whose last answer was reported
# drain()'s scope (see "Drain"): none, a gateway listener's connections, all
_DRAIN_NONE: Final = 0
_INBOUND: Final = 1
_ALL: Final = 2

# The tag a request is reported with whose head was refused before any route
# was asked (400, 431, 505: no decision, no destination), where a decision's
# tag None is a destination no rule names (PassthroughCluster's): the worker
# labels it unknown, as Istio's stats do a request that took no route and no
# cluster.
UNROUTED: Final = "unrouted"

Endpoint = tuple[str, int]


class Decision(NamedTuple):
    """What ``decide`` answers for one request head.

    ``endpoints``: candidates in order (the relay tries each once); empty
    with ``local`` set: answer locally with ``(status, body)`` (a route's
    own answer, as it is); empty without: the router's answer for a choice
    with no endpoint, ``status`` (a Choice's: 503 ``no healthy upstream``,
    else ``backend not resolved``), with the response edits of ``edits``
    (see ``HeadEdits``). ``tag`` is
    passed back in reports (service and subset, for the metrics).
    ``timeout``: the route's (seconds, 0: none; see "Timers"); ``retry``:
    its retry policy (None: none; see "Retry policy" in ``_exchange_py.py``).
    ``edits``: what is changed in the request's head and its final
    response's (:class:`~l4proxy.dataplane.verdict.HeadEdits`; None:
    nothing); ``local_headers``: more header lines of the ``local`` answer;
    ``fault``: the route's fault injection, drawn by the relay
    (:class:`~l4proxy.dataplane.verdict.Fault`; None: none);
    ``mirrors``: where copies of the request also go
    (:class:`~l4proxy.dataplane.verdict.Mirror`).
    ``endpoint_tags``: where the endpoints differ in version, a tag per
    endpoint, parallel to ``endpoints`` (else refused: a ValueError, the
    503 of a ``decide`` that raised); empty where they do not. The request
    is reported with the tag of the endpoint of its last try that reached
    one, else with ``tag``: the rule of
    :class:`~l4proxy.dataplane.verdict.Choice`'s ``endpoint_tags``.
    ``session``: the route's session persistence
    (:class:`~l4proxy.dataplane.verdict.SessionPersistence`; None: none):
    ``decide`` put the endpoint the request's token names first already
    (where it is still one of the route's); the relay gives the client the
    token of the endpoint that answers, unless the request's token named
    it (see "Session persistence").
    """

    endpoints: tuple[Endpoint, ...] = ()
    local: tuple[int, str] | None = None
    tag: Any = None
    timeout: float = 0.0
    retry: RetryPolicy | None = None
    edits: HeadEdits | None = None
    local_headers: tuple[tuple[str, str], ...] = ()
    fault: Fault | None = None
    mirrors: tuple[Mirror, ...] = ()
    status: int = 503
    endpoint_tags: tuple[Any, ...] = ()
    session: SessionPersistence | None = None


@dataclass(eq=False)
class _Up:
    sock: socket.socket
    endpoint: Endpoint
    out: bytearray = field(default_factory=bytearray)
    connecting: bool = False
    reused: bool = False
    owner: _Conn | None = None  # None while idle in the pool
    mask: int = 0
    send_failed: bool = False  # a send to it failed (a reset): never pooled
    peer_closed: bool = False  # its FIN came (EPOLLRDHUP): never pooled
    sent: bool = False  # the kernel took a byte of the current request
    local: str | None = None  # this side's address, once the access log asked

    @property
    def fd(self) -> int:
        return self.sock.fileno()


# a routed request's local answer: its status, body, more header lines, and
# whether the relay edits it (the router's answer for a choice with no
# endpoint; a route's own answer is not)
_Local = tuple[int, str, str, bool]

# a mirror drawn for a request: the endpoint its copy goes to (None: none
# to use, dropped) and its Mirror's tag (the copy's report)
_Drawn = tuple[Endpoint | None, Any]


@dataclass(eq=False)
class _Shadow:
    """A mirrored copy of a request in flight (see "Request mirroring"): its
    connection (of the copies' pool: new, or reused), what is still to
    send, its deadline, how its answer is framed as it comes, and what its
    report at its end says: its Mirror's tag, the status of its answer
    (read as its bytes come) and the time of its start."""

    sock: socket.socket
    fd: int
    out: bytearray
    deadline: float
    tag: Any
    started: float
    endpoint: Endpoint
    payload: bytes  # the copy's bytes (a reused connection's retry sends them again)
    head_request: bool  # a HEAD's copy: no body after its final head
    keep: bool  # its connection may go back idle (not an HTTP/1.0 request's)
    reused: bool = False  # on an idle connection of the copies' pool
    connecting: bool = True
    mask: int = 0
    got: int = 0  # answer bytes read and thrown away (MIRROR_READ_LIMIT at most)
    answer: AnswerStatus = field(default_factory=AnswerStatus)
    head: bytearray = field(default_factory=bytearray)  # an answer head, till complete
    head_clean: int = 0  # ... its first bytes that hold no end of a head (_shadow_read)
    body: BodyFramer | None = None  # the final head's body, once it came


@dataclass(eq=False)
class _ShadowIdle:
    """An idle connection of the copies' pool (its Pools handle: its fd),
    watched for readability or a hang-up (the server closed it: evicted)."""

    sock: socket.socket
    fd: int
    endpoint: Endpoint
    mask: int = 0


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    origin: Any
    ex: Exchange
    last_active: float
    head_started: float | None = None  # first byte of a pending head
    out: bytearray = field(default_factory=bytearray)
    up: _Up | None = None
    candidates: list[Endpoint] = field(default_factory=list)
    decision: Decision | None = None
    started: float = 0.0  # when the current head completed
    closing: float = 0.0  # lingering-close deadline, 0: not closing
    quiet: bool = False  # closing: the client cannot send more (no lingering read)
    eof: bool = False  # closing: the client half-closed; its answer still goes out
    mask: int = 0
    fd: int = -1
    # the last routed request's Decision.tag (its reports, outlier
    # detection's), or that of the endpoint of its last try that reached one
    # (Decision.endpoint_tags, by endpoint: ep_tags, None where it has none)
    tag: Any = None
    ep_tags: dict[Endpoint, Any] | None = None
    # the current request's session persistence (Decision.session; None:
    # none), and the token it sent (None: none)
    session: SessionPersistence | None = None
    session_sent: str | None = None
    timeout: float = 0.0  # the current request's route timeout (0: none)
    deadline: float = 0.0  # ... when it passes: set once the request is read whole
    per_try: float = 0.0  # the current request's per-try timeout (0: none)
    try_deadline: float = 0.0  # ... when the current try's passes
    backoff_until: float = 0.0  # ... a policy's retry waiting: when it connects (0: none)
    # _perform's actions still to do, and whether a _perform is running for
    # this connection: an action that yields more actions (a local answer and
    # the next pipelined head) queues them instead of recursing, which 2,000
    # pipelined requests answered locally took past Python's recursion limit
    todo: deque[Action] = field(default_factory=deque)
    performing: bool = False
    # waiting for a connection to this endpoint (max_connections: _pend)
    pending: Endpoint | None = None
    # a fault's delay (see "Fault injection"): when it ends (0: none), and
    # the abort's status then (0: none, the request goes on)
    fault_until: float = 0.0
    fault_abort: int = 0
    # ... and, for a request with a local answer (its route's, or none of
    # its destination's endpoints), that answer then when no abort fell
    fault_local: _Local | None = None
    # the client's address (accept()'s, HttpRelay.add's peer; else asked as
    # it was taken: None, unknown), and its packed form (peer_of), once
    # decide_peer asked: None unknown; ``...`` not asked yet
    address: Any = None
    peer: Any = ...
    # the current request's mirrors drawn (see "Request mirroring"), until
    # its Shadow starts their copies, and their deadline from a connect
    mirrors: tuple[_Drawn, ...] = ()
    mirror_timeout: float = 0.0
    # ... Shadows of this batch of actions, each with its mirrors and their
    # deadline, started once the primary's bytes went (_perform_queued)
    shadows_due: list[tuple[Shadow, tuple[_Drawn, ...], float]] | None = None
    # the access log's (see "Access log"): the current request's head and
    # start (wall clock), the shell's flags for it, the endpoint of its
    # last try that reached one, the bytes queued for the client since the
    # last request ended; the connection's addresses (``...``: not asked)
    log_head: RequestHead | None = None
    log_start: float = 0.0
    log_flags: int = 0
    upstream: Endpoint | None = None
    sent: int = 0
    log_local: Any = ...
    log_remote: Any = ...
    # a gateway listener's connection (see "Forwarding headers"): its
    # client's address (``...``: not asked), and the current request's
    # X-Forwarded-For and x-request-id as sent upstream (the access log's)
    forward: bool = False
    rid_connection: int = 0  # (its request ids' second half: RequestIds.connection())
    peer_text: Any = ...
    log_xff: bytes | None = None
    log_rid: bytes | None = None


def _bytes_waiting(sock: socket.socket) -> bool:
    """A byte of the client's on *sock* that the relay has not read yet (a
    head that came since the last read: its event is served next)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # (EAGAIN: nothing; a reset: its event says so)
        return False


def _gateway(c: _Conn) -> bool:
    """*c* is a gateway listener's connection (inbound: see "Drain")."""
    return getattr(c.origin, "gateway", False) is True


def peer_address(sock: socket.socket) -> Any:
    """*sock*'s peer's address (getpeername()'s), None when it has none (a
    peer gone: a client that reset its connection has no peer to ask for)."""
    try:
        return sock.getpeername()
    except OSError:
        return None


def peer_of(sock: socket.socket, addr: Any = None) -> bytes | None:
    """The packed address (4 or 16 bytes) of *sock*'s peer, what a
    consistent hash on the source IP hashes (verdict.HashOn); None when it
    has none (a socketpair, a peer gone). *addr*: the peer's address as
    accept() returned it (None: asked of the kernel)."""
    if addr is None:
        addr = peer_address(sock)
        if addr is None:
            return None
    if sock.family == socket.AF_INET:
        return socket.inet_pton(socket.AF_INET, addr[0])
    if sock.family == socket.AF_INET6:
        return socket.inet_pton(socket.AF_INET6, addr[0].partition("%")[0])
    return None


class HttpRelay:
    """Per-request HTTP/1.1 relay on a background epoll thread (pure twin)."""

    def __init__(
        self,
        decide: Callable[..., Decision],
        l4: Callable[
            [socket.socket, socket.socket | None, bytes, bytes, Any, Endpoint | None], None
        ],
        pool: PoolOptions | None = None,
        connect_timeout: float = 5.0,
        header_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        report: Callable[[Any, int, float, int], None] | None = None,
        connect_failed: Callable[[Endpoint, Any, str], None] | None = None,
        response_failed: Callable[[Endpoint, Any, str], None] | None = None,
        answered: Callable[[Endpoint, Any], None] | None = None,
        refused: Callable[[str], None] | None = None,
        max_head: int = DEFAULT_MAX_HEAD,
        seed: int | None = None,
        *,
        answered_5xx: Callable[[Endpoint, Any, int], None] | None = None,
        decide_peer: bool = False,
        max_mirrors: int = DEFAULT_MAX_MIRRORS,
        access_log: accesslog.AccessLog | None = None,
        forwarding: Forwarding | None = None,
    ) -> None:
        self.decide = decide
        # decide(head, origin, peer): with the client's packed address too
        # (peer_of; a consistent hash on the source IP reads it)
        self.decide_peer = decide_peer
        self.max_head = max_head  # request and response heads, trailer sections
        self.l4 = l4
        self.pools = Pools(pool)
        self.connect_timeout = connect_timeout
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.report = report
        # outlier detection (see "Outlier detection" above)
        self.connect_failed = connect_failed
        self.response_failed = response_failed
        self.answered = answered
        self.answered_5xx = answered_5xx  # (endpoint, tag, status): report_5xx's
        self._failures_seen = 0  # report_next_successes() calls: a generation
        self._answer_reported: dict[Endpoint, int] = {}  # ... at each one's last answered()
        self.refused = refused  # a connection closed unrouted, with the reason
        self.ep = select.epoll()
        self._lock = threading.Lock()
        self._queue: list[tuple[socket.socket, Any, bytes, int, Any]] = []
        self._stop = False
        # drain(): the connections that drain, as asked (under the lock) and
        # as applied (the relay's thread): _DRAIN_NONE, _INBOUND or _ALL
        self._drain_next = _DRAIN_NONE
        self._drain = _DRAIN_NONE
        # ... the seconds over which those between requests close, as asked,
        # and those to close later, by when (due times in order)
        self._spread_next = 0.0
        self._idle_closes: deque[tuple[float, _Conn]] = deque()
        # discourage(): as asked (under the lock) and as applied
        self._discourage_next = False
        self._discourage = False
        self._stopped = False  # stop_signalled(), asked: discourage()'s, for good
        self._turn = 0.0  # time.monotonic() of the loop's last turn (see "Liveness")
        self._closed = False  # close() was called: its thread is waited for once
        self._test_hang = 0.0  # hang_for_test(): seconds to sleep at the next wake-up
        self._cut = 0  # client connections close() cut (see "Drain")
        self._named: frozenset[Endpoint] | None = None  # retain_endpoints(), as applied
        self._named_next: frozenset[Endpoint] | None = None  # ... and as last given
        # endpoint_settings(), as last given (applied: self.pools.settings)
        self._settings_next: dict[Endpoint, EndpointSettings] | None = None
        # circuit breakers (see "Circuit breakers"): the requests waiting
        # per endpoint, in order (a dict as an ordered set: O(1) removal),
        # the endpoints whose waiting requests may go now (_serve_pending),
        # and the overflow answers per endpoint
        self._pending: dict[Endpoint, dict[_Conn, None]] = {}
        self._kicks: set[Endpoint] = set()
        self._overflows: dict[Endpoint, int] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.ep.register(self._wake_r.fileno(), _EPOLLIN)
        self._conns: dict[int, _Conn] = {}
        self._ups: dict[int, _Up] = {}  # every upstream fd: checked out or idle
        self._idle: dict[int, _Up] = {}
        self._deadlines: dict[int, float] = {}  # connecting upstream fd -> deadline
        # the soonest _Conn.backoff_until, deadline or try_deadline, or earlier (0: none)
        self._next_timer = 0.0
        # the backoffs' jitter (--seed: the same waits every run)
        self._random = random.Random(None if seed is None else f"jitter {seed}")
        # a gateway listener's forwarding headers, and its request ids
        self.forwarding = forwarding
        self._request_ids = RequestIds(seed) if forwarding is not None else None
        # request mirroring: the copies in flight (at most max_mirrors), and
        # each mirror's round-robin position (by its balance_key)
        self.max_mirrors = max_mirrors
        self._shadows: dict[int, _Shadow] = {}
        # ... the copies' own pool of connections per mirror endpoint (never
        # the routes': a copy counts in no endpoint's active), its idle ones
        # by fd (watched: evicted when the server closes one)
        self._shadow_pool = Pools(
            PoolOptions(max_idle=MIRROR_MAX_IDLE, idle_timeout=self.pools.options.idle_timeout)
        )
        self._shadow_idle: dict[int, _ShadowIdle] = {}
        self._mirror_rr: dict[Any, int] = {}
        # where a mirror's new position starts (rr_start: an offset per
        # balance key, from the seed, else the OS; not a draw of _random)
        self.rr_salt = rr_salt(seed)
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "connections",
                "requests",
                "local_answers",
                "connect_errors",
                "timeouts",
                "errors",
                "retries",
                "timer_scans",
                "mirrored",
                "mirror_dropped",
                "mirror_failed",
                "mirror_connects",
                # the compiled twin's requests, decisions and copies its
                # table of rows could not count (its count_row()); this
                # twin reports each one through report(): never any
                "metrics_dropped",
                # response head bytes looked at again after the read that
                # began the head (Exchange._response_head_bytes: linear in
                # the head's size however it is split; tests count it)
                "response_head_rescan_bytes",
                # the same for a mirrored copy's answer head (_shadow_read)
                "mirror_head_rescan_bytes",
            ),
            0,
        )
        self._thread = threading.Thread(target=self._run, name="l4proxy-relay", daemon=True)
        # the access log (see "Access log"): its lines' sink, its writer
        self.access_log = access_log
        self._log_writer: accesslog.LineWriter | None = None
        self._log_line: Callable[[bytes], None] | None = None
        if access_log is not None:
            if access_log.sink is not None:
                self._log_line = access_log.sink
            else:
                self._log_writer = accesslog.LineWriter(os.dup(access_log.fd), access_log.buffer)
                self._log_line = self._log_writer.line

    # -- the worker's side --------------------------------------------------

    def start(self) -> None:
        self._turn = time.monotonic()  # (its first turn is due)
        self._thread.start()

    def stalled(self) -> float:
        """Seconds since the loop's thread last began a turn, while it runs
        (started and alive, one that :meth:`close` gave up waiting for
        included: stuck; 0.0 otherwise: see "Liveness"). Any thread."""
        if not self._thread.is_alive():
            return 0.0
        return max(0.0, time.monotonic() - self._turn)

    def hang_for_test(self, seconds: float) -> None:
        """Tests only (the worker's start, where ``L4PROXY_TEST_HANG_RELAY``
        says so: Worker.start): the loop's thread sleeps
        *seconds* at its next wake-up, as a stuck one would. Any thread."""
        with self._lock:
            self._test_hang = seconds
        self._wake()

    def add(
        self,
        sock: socket.socket,
        origin: Any,
        data: bytes = b"",
        requests: int = 0,
        peer: Any = None,
    ) -> None:
        """Take *sock* (an accepted client); *data*: bytes already read from it.

        *origin* (where the client was going) is passed back to ``decide``
        and ``l4`` as it is. *requests*: request heads already served on this
        connection (by the compiled relay, which hands over the requests it
        does not serve itself): bytes that are not HTTP after a request are
        a 400, not a connection to relay at L4. *peer*: the client's address
        as accept() returned it (None: the kernel is asked as the
        connection is taken), what its access log lines, forwarding headers
        and source-IP hash say: kept, never asked again, so that a client
        that resets its connection still has its address in its line.
        """
        with self._lock:
            self._queue.append((sock, origin, data, requests, peer))
        self._wake()

    def drain(self, inbound_only: bool = False, spread: float = 0.0) -> None:
        """Drain the client connections (see "Drain"): a gateway listener's
        alone with *inbound_only*, else every one, those open now and those
        taken from now on (any thread; applied on the relay's). Those it
        names between requests close at once (*spread* 0), or one after
        another over *spread* seconds. Asked again with a wider scope, it
        widens (those it adds spread over its own *spread*); never narrows."""
        with self._lock:
            scope = _INBOUND if inbound_only else _ALL
            if scope > self._drain_next:
                self._drain_next = scope
                self._spread_next = max(0.0, spread)
        self._wake()

    def discourage(self, on: bool) -> None:
        """While *on*, every answer on a gateway listener's connection says
        ``connection: close`` and closes its connection after it; one
        between requests is left open (see "Drain": Envoy's drain close
        while the health check is failed). Off again: answers keep their
        clients, but where a drain says otherwise (any thread; applied on
        the relay's)."""
        with self._lock:
            self._discourage_next = bool(on)
        self._wake()

    def stop_signalled(self) -> None:
        """The worker's stop signal came (its handler, before the drain
        begins: run._serve): from now on every answer on a gateway
        listener's connection says ``connection: close``, as while
        discourage() is on, for good (discourage(False) leaves it); the
        drain follows (drain()). Any thread; applied on the relay's. Takes
        no lock: a signal's handler calls it, between any two instructions
        of the main thread, which may hold this relay's lock then (add())."""
        self._stopped = True  # (read under the lock with the queue: see _take_queue)
        self._wake()

    def stop_withdrawn(self) -> None:
        """The stop signal was a SIGTERM to this worker alone, the
        supervisor not stopping (run._Leaving): it serves its slot on until
        its successor accepts, so answers keep their clients again (where
        discourage() or a drain does not say otherwise) until its hand-over
        (drain()). Before, each of them said ``connection: close`` from the
        SIGTERM on. Any thread but a signal handler's; applied on the
        relay's."""
        with self._lock:
            self._stopped = False
        self._wake()

    def close(self, access_log: bool = True, wait: float = 10.0) -> int:
        """Stop the relay's thread, closing every connection; *access_log*
        False: the access log's writer stays for lines from elsewhere
        (:meth:`access_log_line`) until :meth:`close_access_log`. Returns
        how many client connections it cut (reset, or never served: taken
        and not yet relayed); not those closing already after their last
        answer (see "Drain"). The thread is waited for *wait* seconds at
        most (a callback stuck: it is left running, and :meth:`stalled`
        says for how long). A second call returns 0, waiting for nothing."""
        first, self._closed = not self._closed, True
        with self._lock:
            self._stop = True
        self._wake()
        if self._thread.is_alive():
            if first:
                self._thread.join(wait)
        elif self._thread.ident is None and self._wake_r.fileno() >= 0:
            # Never started: no thread closes what it would have (the
            # connections queued, the epoll and the wake-up socketpair).
            self._take_queue(time.monotonic())
            self._shutdown()
        if access_log:  # (after the thread: its last lines too)
            self.close_access_log()
        cut, self._cut = self._cut, 0
        return cut

    def close_access_log(self) -> None:
        """Write what the access log buffered (a second at most) and close
        its writer (after ``close(access_log=False)``)."""
        if self._log_writer is not None:
            self._log_writer.close()

    def reopen_access_log(self, fd: int) -> bool:
        """The access log's writer writes to *fd*'s file from now on
        (:meth:`accesslog.LineWriter.reopen`); *fd* stays the caller's.
        False: this relay writes no access log of its own (none, a sink,
        or closed)."""
        return self._log_writer is not None and self._log_writer.reopen(fd)

    def access_log_line(self, line: bytes) -> None:
        """A line from elsewhere in the worker (a connection routed at L4),
        to this relay's writer with its own lines, whole (any thread;
        dropped, counted, when its buffer is full or it is closed)."""
        if self._log_line is not None:
            self._log_line(line)

    def flush_access_log(self, timeout: float = 1.0) -> bool:
        """Wait (at most *timeout* s) until the access log's lines buffered
        so far were written; whether they were (none to write: True)."""
        if self._log_writer is None:
            return True
        return self._log_writer.flush(timeout)

    def active(self) -> int:
        """Client connections owned (queued or relayed); any thread may ask."""
        with self._lock:
            queued = len(self._queue)
        return queued + len(self._conns)

    def retain_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """The endpoints the live route table names (any thread; applied on
        the relay's). One the previous call named and this one does not has
        left the table (a pod a reload removed): its idle pooled connections
        are closed at once, and those in flight to it are closed at check-in
        instead of pooled (``pool_closed_removed``), or they held the pod's
        graceful shutdown for the pool's idle timeout. The copies' pool
        does the same at the same moment (see "Request mirroring"): its
        idle connections to it closed, a copy in flight to it closes its
        connection at its end instead of leaving it idle. One named again
        (a DNS answer that dropped an address and gave it back) keeps those
        in flight; endpoints never named (PassthroughCluster's) are left
        alone."""
        named = frozenset(endpoints)
        with self._lock:
            self._named_next = named
        self._wake()

    def endpoint_settings(self, settings: Mapping[Endpoint, EndpointSettings]) -> None:
        """Each endpoint's own connect timeout, requests per upstream
        connection, pool idle timeout and ``report_5xx`` (any thread;
        applied on the relay's), replacing the previous call's: an endpoint
        not in *settings* has the constructor's (``pool``,
        ``connect_timeout``; its 5xx not reported), one not met yet gets its
        own when it is. Applied from then on, to the connections open too:
        ``max_requests`` when one is released, ``idle_timeout`` at the next
        expiry (the tick), ``connect_timeout`` at the next connect,
        ``report_5xx`` at the next response, the circuit breakers at the
        next try (a limit raised or gone: the waiting requests go at
        once, up to the new one). ValueError for a value out of
        range (a negative count, a timeout not finite and above 0,
        ``report_5xx`` not a bool)."""
        checked = checked_endpoint_settings(settings)
        with self._lock:
            self._settings_next = checked
        self._wake()

    def overflows(self) -> dict[Endpoint, int]:
        """The circuit breakers' 503 answers per endpoint since the start (a
        new dict; any thread)."""
        return dict(self._overflows)

    def pending(self) -> dict[Endpoint, int]:
        """Requests waiting for a connection per endpoint now (max_connections;
        a new dict, any thread)."""
        return {k: len(v) for k, v in list(self._pending.items())}

    def report_next_successes(self) -> None:
        """Outlier detection counted a failure this relay did not report (the
        L4 path's, the other twin's): report every endpoint's next answer
        (any thread)."""
        # (two at once may make one step: either way it is not the value
        # an endpoint's last report saw)
        self._failures_seen += 1

    def add_external(self, endpoint: Endpoint, n: int) -> None:
        """*n* more connections to *endpoint* that are not this relay's (any
        thread): the worker's L4 connections and the tunnels it took over.
        ``pools.active()``, which LEAST_REQUEST orders by, counts them."""
        self.pools.add_external(endpoint, n)

    def invalidate(self, key_headers: object = None) -> None:
        """The compiled twin forgets its cached verdicts here; this twin asks
        ``decide`` for every request and caches nothing."""

    def flush_reports(self, timeout: float = 0.5) -> None:
        """The compiled twin hands over the metrics it aggregated; this twin
        reports every request as it is answered."""

    def stats(self) -> dict[str, int]:
        out = dict(self.counters)
        out.update({f"pool_{k}": v for k, v in self.pools.counters.items()})
        out["active"] = len(self._conns)
        out["pool_idle"] = len(self._idle)
        out["mirror_active"] = len(self._shadows)
        out["mirror_idle"] = len(self._shadow_idle)
        if self._log_writer is not None:
            out.update(self._log_writer.stats())
        return out

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x", socket.MSG_DONTWAIT)
        except OSError:
            pass  # full: the loop is awake anyway

    # -- the loop -------------------------------------------------------------

    def _run(self) -> None:
        next_tick = time.monotonic() + _TICK
        while True:
            try:
                if self._kicks:
                    self._serve_pending(time.monotonic())
                wake = next_tick
                if self._next_timer and self._next_timer < wake:
                    wake = self._next_timer  # a deadline or a backoff: the tick is too coarse
                if self._kicks:  # (kicked while served: a connect that failed at once)
                    wake = 0.0
                events = self.ep.poll(max(0.0, wake - time.monotonic()), 256)
                now = self._turn = time.monotonic()  # (a turn: see "Liveness")
                # Whose each event is, as the batch starts: a number closed
                # and reused within the batch (a connect) must not get the
                # old socket's event.
                batch = [
                    (
                        fd,
                        ev,
                        self._conns.get(fd)
                        or self._ups.get(fd)
                        or self._shadows.get(fd)
                        or self._shadow_idle.get(fd),
                    )
                    for fd, ev in events
                ]
                # Idle pooled connections with an event (the server closed
                # them, or spoke) leave the pool before anything in the batch
                # can check one out: a request ahead in the batch would (the
                # copies' pool's too: a copy started in the batch would).
                for fd, _, was in batch:
                    if (isinstance(was, _Up) and was.owner is None) or isinstance(was, _ShadowIdle):
                        self._on_event(fd, 0, now, was)
                for fd, ev, was in batch:
                    if fd == self._wake_r.fileno():
                        if self._take_queue(now):
                            self._shutdown()
                            return
                    else:
                        self._on_event(fd, ev, now, was)
                if now >= next_tick:
                    self._tick(now)
                    next_tick = now + _TICK
                if self._next_timer and now >= self._next_timer:
                    self._timers_due(now)
            except Exception:  # the thread must not die: count and go on
                self.counters["errors"] += 1

    def _take_queue(self, now: float) -> bool:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            queue, self._queue = self._queue, []
            stop = self._stop
            named, self._named_next = self._named_next, None
            settings, self._settings_next = self._settings_next, None
            drain, spread = self._drain_next, self._spread_next
            discourage = self._discourage_next or self._stopped
            hang, self._test_hang = self._test_hang, 0.0
        if hang:  # (tests only: hang_for_test)
            time.sleep(hang)
        if named is not None and not stop:
            self._retain(named)
        if (drain != self._drain or discourage != self._discourage) and not stop:
            self._apply_drain(drain, spread, discourage, now)
        if settings is not None:
            for handle in self.pools.endpoint_settings(settings):
                up = self._idle.get(int(handle))  # type: ignore[call-overload]
                if up is not None:
                    self._drop_upstream(up)
            self._kicks.update(self._pending)  # a limit raised or gone: they go
        for sock, origin, data, requests, peer in queue:
            if stop:
                self._cut += 1
                sock.close()
                continue
            sock.setblocking(False)
            # Urgent data (send(MSG_OOB)) is read in its place in the stream:
            # without SO_OOBINLINE recv() skips the urgent byte (a body a
            # byte short), as the pump's sockets and the compiled twin's.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
            try:  # small answers go out at once (no Nagle delay behind a head)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # not TCP (a test's socketpair)
            # The first head is timed from here (see "Timers").
            ex = Exchange(self.max_head, counters=self.counters)
            c = _Conn(sock, origin, ex, now, head_started=now, fd=sock.fileno())
            c.address = peer if peer is not None else peer_address(sock)
            c.ex.requests = requests
            c.forward = self.forwarding is not None and getattr(origin, "gateway", False) is True
            if c.forward:
                assert self._request_ids is not None
                c.rid_connection = self._request_ids.connection()
            self._conns[c.fd] = c
            self.counters["connections"] += 1
            if (self._drain and self._drains(c)) or (self._discourage and _gateway(c)):
                c.ex.draining = True  # (taken while draining: served, then closed)
            try:  # this connection's failure is its own, not the batch's
                self._interest(c)
                if data:
                    self._perform(c, c.ex.client_data(data), now)
            except Exception:  # OSError (a client gone already), or a bug
                if c.fd in self._conns:
                    self._abort(c)
                else:
                    self.counters["errors"] += 1
        return stop

    def _drains(self, c: _Conn, scope: int | None = None) -> bool:
        """Whether *c* is among the connections drain() named (or *scope*
        names)."""
        scope = self._drain if scope is None else scope
        return scope == _ALL or (scope == _INBOUND and _gateway(c))

    def _apply_drain(self, drain: int, spread: float, discourage: bool, now: float) -> None:
        """drain() and discourage(), on the relay's thread (see "Drain"):
        the connections the drain names now and did not before are told,
        those between requests closed now or scheduled (_idle_closes);
        a gateway listener's that no drain names say close as discourage()
        says."""
        before, self._drain = self._drain, drain
        self._discourage = discourage
        idle: list[_Conn] = []
        for c in list(self._conns.values()):
            if c.closing:
                continue  # (after its last answer already)
            if not self._drains(c):
                c.ex.draining = discourage and _gateway(c)
            elif not self._drains(c, before):
                if c.ex.between_requests:
                    idle.append(c)
                c.ex.drain_told()  # (its answer says close; drain() closes it between requests)
        n = len(idle)
        for k, c in enumerate(idle):
            self._idle_closes.append((now + k * spread / n, c))
        if n and len(self._idle_closes) > n:  # (a second drain's: merged in order)
            self._idle_closes = deque(sorted(self._idle_closes, key=lambda due: due[0]))
        self._close_idle_due(now)

    def _close_idle_due(self, now: float) -> None:
        """The connections drain() scheduled to close by *now*: closed where
        still between requests (one that took a request meanwhile closes
        after its answer, as every draining one; one with a byte of its
        next head waiting is left to be read). One taken less than
        ``_DRAIN_FRESH_S`` ago that has sent nothing yet is due again then:
        its client connected to send a request, and closed at once it read
        EOF for it."""
        later: list[tuple[float, _Conn]] = []
        while self._idle_closes and self._idle_closes[0][0] <= now:
            _, c = self._idle_closes.popleft()
            if self._conns.get(c.fd) is not c or c.closing:
                continue  # (gone, or closing already)
            if c.ex.between_requests and _bytes_waiting(c.sock):
                continue  # (its next head came: answered, saying close)
            taken = c.head_started  # (not None between requests: none came yet)
            if taken is not None and c.ex.between_requests and taken + _DRAIN_FRESH_S > now:
                later.append((taken + _DRAIN_FRESH_S, c))
                continue
            try:  # this connection's failure is its own, not the batch's
                closing = c.ex.drain()  # (a Close between requests, else nothing)
                if closing:
                    self._perform(c, closing, now)
            except Exception:
                if c.fd in self._conns:
                    self._abort(c)
        if later:
            self._idle_closes.extend(later)
            self._idle_closes = deque(sorted(self._idle_closes, key=lambda due: due[0]))

    def _retain(self, named: frozenset[Endpoint]) -> None:
        """retain_endpoints(), on the relay's thread: the routes' pool and
        the copies' pool alike."""
        before, self._named = self._named, named
        if before is None:
            return
        for endpoint in before - named:
            for handle in self.pools.remove_endpoint(endpoint):
                up = self._idle.get(int(handle))  # type: ignore[call-overload]
                if up is not None:
                    self._drop_upstream(up)
            for handle in self._shadow_pool.remove_endpoint(endpoint):
                idle = self._shadow_idle.get(int(handle))  # type: ignore[call-overload]
                if idle is not None:
                    self._shadow_evict(idle)
        for endpoint in named - before:
            self.pools.restore_endpoint(endpoint)
            self._shadow_pool.restore_endpoint(endpoint)

    def _shutdown(self) -> None:
        for c in list(self._conns.values()):
            if not c.closing or c.out:  # (a lingering close's answer went whole)
                self._cut += 1
            # (its request's line: a drain cut, ours; Envoy's DC still)
            self._close_client(c, reset=True, cut=accesslog.CUT | accesslog.LOCAL_CUT)
        for up in list(self._ups.values()):
            self._drop_upstream(up)
        for sh in list(self._shadows.values()):
            self._shadow_end(sh, None)
        for idle in list(self._shadow_idle.values()):
            self._shadow_evict(idle)
        self.ep.close()
        self._wake_r.close()
        self._wake_w.close()

    def _on_event(
        self, fd: int, ev: int, now: float, was: _Conn | _Up | _Shadow | _ShadowIdle | None
    ) -> None:
        """*fd*'s event; *was*: whose the number was when the batch began."""
        if isinstance(was, _ShadowIdle):  # an idle copy connection: the server closed it
            if self._shadow_idle.get(fd) is was:
                self._shadow_pool.evict(fd)
                self._shadow_evict(was)
            return  # (else evicted already this batch, or checked out since)
        if fd in self._shadows:
            sh = self._shadows[fd]
            if sh is was:
                self._shadow_event(sh, ev, now)
            return  # (else a copy's number reused in this batch: not its event)
        c = self._conns.get(fd)
        up = self._ups.get(fd) if c is None else None
        if c is None and up is None:
            # closed earlier in this batch; should a number we closed have
            # been registered again by mistake, it must not wake us for ever
            # (idle pooled connections are in _ups too: never this one)
            try:
                self.ep.unregister(fd)
            except OSError:
                pass
            return
        if (c if c is not None else up) is not was:
            return  # closed in this batch and the number reused: not its event
        if c is not None:
            try:
                self._client_event(c, ev, now)
            except Exception:  # OSError, or a bug: this connection, not the thread
                self._abort(c)
            return
        assert up is not None
        if up.owner is None:  # idle in the pool: the server closed it, or spoke
            # ... or the event is from before it came back to the pool,
            # earlier in this batch: nothing to read, and it stays
            try:
                up.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                pass
            self.pools.evict(fd)
            self._drop_upstream(up)
            return
        owner = up.owner
        try:
            self._upstream_event(owner, up, ev, now)
        except Exception:  # OSError, or a bug: this connection, not the thread
            self._abort(owner)

    def _client_event(self, c: _Conn, ev: int, now: float) -> None:
        if ev & _EPOLLOUT and c.out:
            self._flush_client(c)
            if c.fd not in self._conns:
                return  # the last bytes went out and a quiet close closed it
        if c.closing:
            if ev & (_EPOLLIN | _EPOLLHUP | _EPOLLERR):
                try:
                    if not c.sock.recv(_READ):
                        if not c.out or ev & (_EPOLLHUP | _EPOLLERR):
                            self._close_client(c)
                            return
                        # half-closed (SHUT_WR): it still reads; the rest
                        # of its answer goes out, then the close
                        c.eof = c.quiet = True
                except BlockingIOError:
                    pass
                except OSError:
                    self._close_client(c)
                    return
            self._interest(c)
            return
        if ev & (_EPOLLIN | _EPOLLHUP | _EPOLLERR) and self._reading_client(c):
            data = c.sock.recv(_READ)
            c.last_active = now
            if not data:
                self._perform(c, c.ex.client_eof(), now)
            else:
                if c.ex.phase == Phase.HEAD and c.head_started is None:
                    c.head_started = now
                self._perform(c, c.ex.client_data(data), now)
        elif ev & (_EPOLLHUP | _EPOLLERR) and not c.out:
            self._abort(c)  # gone while we waited for its upstream (or a retry)
            return
        if c.fd in self._conns:
            self._interest(c)
            # The client took what was held for it: its upstream is read
            # again (it was not while c.out held bytes: backpressure).
            if c.up is not None and c.up.owner is c and not c.up.connecting:
                self._interest_up(c.up)

    def _upstream_event(self, c: _Conn, up: _Up, ev: int, now: float) -> None:
        if ev & _EPOLLRDHUP:
            # The server closed its side: its FIN came with (or after) what
            # this event reads. Were the response that completes in this read
            # pooled, a request in the same step (a pipelined one, the next
            # client's in this batch) would take the connection and go onto
            # a half-closed socket (a POST, not retried: a 503).
            up.peer_closed = True
        if up.connecting:
            if not ev & (_EPOLLOUT | _EPOLLERR | _EPOLLHUP):
                return
            # Reading SO_ERROR clears it: the reason goes along from here.
            err = up.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._deadlines.pop(up.fd, None)
            if err:
                self._connect_error(c, up, now, os.strerror(err))
                return
            up.connecting = False
            self.pools.connected()
            self._perform(c, c.ex.routed(False), now)
            if c.fd in self._conns and c.up is up:
                self._interest_up(up)
            return
        # Read first, then send: an answer that came (an early 413, say)
        # ends the exchange before more of the body is pushed at a server
        # that may have reset the connection already.
        if ev & (_EPOLLIN | _EPOLLHUP | _EPOLLERR) and not c.out:
            try:
                data = up.sock.recv(_READ)
            except ConnectionError:
                data = b""
            c.last_active = now
            if data:
                self._perform(c, c.ex.upstream_data(data), now)
            else:
                self._perform(c, c.ex.upstream_eof(), now)
        if (
            c.fd in self._conns
            and c.up is up
            and ev & _EPOLLOUT
            and up.out
            and not self._flush_up(up)
        ):
            self._perform(c, self._send_failed(c, up, now), now)
        if c.fd in self._conns:
            self._interest(c)
            if c.up is up:
                self._interest_up(up)

    def _send_failed(self, c: _Conn, up: _Up, now: float) -> list[Action]:
        """A send to *up* failed: the connection is dead (reset), but what the
        server sent before it may wait in our receive queue: a server
        answering early (413, 401) before reading the body closes with the
        body unread, and its kernel resets the connection. That answer is the
        client's. So: stop sending (held request bytes dropped), read what is
        pending into the exchange, then take the connection's end
        (upstream_eof) if the exchange is still on it: only a request with
        nothing received back may be retried (a reused connection) or get
        the 503; one of which the kernel took no byte (a pooled connection
        reset before its first send) never left, and may be sent again
        whatever its method: its bytes, all of them held, go back to the
        exchange. The actions, for the caller to perform (or queue)."""
        up.send_failed = True
        unsent = None if up.sent else bytes(up.out)
        up.out.clear()
        actions: list[Action] = []

        def retried() -> bool:  # a retry policy gave this try up: its bytes are no more
            return any(isinstance(a, Retry) for a in actions)

        while c.ex.phase == Phase.EXCHANGE and not retried():
            try:
                data = up.sock.recv(_READ)
            except OSError:  # BlockingIOError: nothing more (not a reset)
                break
            if not data:
                break
            c.last_active = now
            actions += c.ex.upstream_data(data)
        if c.ex.phase == Phase.EXCHANGE and not retried():
            actions += c.ex.upstream_eof(unsent)
        return actions

    def _reading_client(self, c: _Conn) -> bool:
        # Not while bytes are held for either side: for the client (our
        # answer first), or for its upstream (backpressure: a fast client
        # must not fill our memory with what a slow upstream has not taken).
        held_up = c.up is not None and bool(c.up.out)
        return not c.out and not held_up and c.ex.wants_client_data

    # -- actions ----------------------------------------------------------------

    def _perform(self, c: _Conn, actions: list[Action], now: float) -> None:
        if c.performing:  # from an action of the _perform below: next, in order
            c.todo.extendleft(reversed(actions))
            return
        c.performing = True
        try:
            c.todo.extend(actions)
            while c.todo:
                self._perform_queued(c, now)
        finally:
            c.performing = False
            c.todo.clear()
        if c.head_started is None and c.fd in self._conns and c.ex.head_pending:
            c.head_started = now  # the rest of a pipelined segment: timed from here
        if c.timeout and not c.deadline and c.fd in self._conns and c.ex.request_complete:
            c.deadline = now + c.timeout  # the route timeout runs from here
            self._timer_at(c.deadline)
        up = c.up
        if (
            c.per_try
            and not c.try_deadline
            and up is not None
            and up.owner is c
            and not up.connecting
            and c.fd in self._conns
            and c.ex.request_complete
        ):
            # ... and the try's per-try timer, once its connection is ready
            # too (a connect's end, an idle pooled one taken: both call
            # this), as Envoy's starts at the later of the pool's
            # onPoolReady and the request's end: a connect (bounded by the
            # connect timeout) or a wait in line for a connection is no
            # part of it. Every try's (a first try's, a policy's retry's,
            # the relay's own move's, the reused connection's one
            # retry's: each clears c.try_deadline as it goes); the
            # compiled twin's try_timer()
            c.try_deadline = now + c.per_try
            self._timer_at(c.try_deadline)

    def _perform_queued(self, c: _Conn, now: float) -> None:
        while c.todo:
            a = c.todo.popleft()
            if c.fd not in self._conns:
                c.todo.clear()
                break  # handed off or closed by an earlier action
            if isinstance(a, Route):
                self._route(c, a.head, now)
            elif isinstance(a, Upstream):
                # Held and sent once per batch of actions: a head and its body
                # bytes go out in one segment (one send, no Nagle stall).
                assert c.up is not None
                c.up.out += a.data
            elif isinstance(a, Client):
                c.out += a.data
                c.sent += len(a.data)
            elif isinstance(a, Release):
                sent = True
                if c.up is not None and not c.up.connecting:
                    sent = self._flush_up(c.up)
                    if a.failure:
                        self._response_failed(c.up.endpoint, c.tag, a.failure)
                    elif a.answered:
                        self._answered(c.up.endpoint, c.tag, a.status)
                self._release(c, a.reusable and sent, now)
            elif isinstance(a, Retry):
                # To another endpoint when there is one: the one whose
                # (pooled) connection failed goes last, as Istio's default
                # retry policy skips previous hosts (not under a policy that
                # does not: the candidates as drawn, the same endpoint
                # first; nor for a policy's try's stale pooled connection,
                # the one retry of its own: the endpoint the policy's order
                # chose, an idle connection closed being no failure of it);
                # a failed connect moves on to the next (_connect_error).
                # The failed connection was candidates[0]'s (_route). The
                # pooled connection's retry goes on a new connection at
                # once; a policy's after its backoff, on an idle pooled one
                # when there is one (_timers_due).
                if c.pending is not None:  # (a try that waited: none times out, _perform)
                    self._unpend(c)
                retry = c.ex.retry if a.policy else None
                if retry.ignore_previous_hosts if retry is not None else c.ex.tries == 0:
                    failed = c.candidates[0]
                    c.candidates = [e for e in c.candidates if e != failed] + [failed]
                c.up = None
                # the next try's per-try timer (the pooled connection's one
                # retry's too) afresh, from its connection's readiness
                # (_perform), as Envoy's
                c.try_deadline = 0.0
                if retry is not None:
                    # after its backoff (_timers_due)
                    self.counters["retries"] += 1
                    wait = retry.backoff_s(c.ex.tries, self._random.random())
                    c.backoff_until = now + wait
                    self._timer_at(c.backoff_until)
                    # the idle timeout runs from the retry's send: a wait
                    # (a user's backoff of 30 s) is no idleness
                    c.last_active = c.backoff_until
                    continue
                self._try(c, c.candidates[0], now, pooled=False)
            elif isinstance(a, Shadow):
                # its copies start after the primary's bytes went (below),
                # with the mirrors drawn for this request (a Done clears them)
                due = (a, c.mirrors, c.mirror_timeout)
                c.mirrors = ()
                if c.shadows_due is None:
                    c.shadows_due = [due]
                else:
                    c.shadows_due.append(due)
            elif isinstance(a, Done):
                self._count(c, a.status, a.local, now, a.flags, a.received)
            elif isinstance(a, Tunnel | NotHTTPConnection):
                self._hand_off(c, a)
            elif isinstance(a, Close):
                if a.reset:
                    self._close_client(c, reset=True)
                else:
                    self._start_close(c, now, a.quiet)
        if c.fd in self._conns:
            up = c.up
            if (
                up is not None
                and up.owner is c
                and not up.connecting
                and up.out
                and not self._flush_up(up)
            ):
                after = self._send_failed(c, up, now)
                if c.shadows_due is not None:  # (they go whatever the primary does)
                    self._mirrors_due(c, now)
                c.todo.extend(after)
                return  # (done by _perform's loop, then this again)
        if c.shadows_due is not None:  # (the primary's bytes went first)
            self._mirrors_due(c, now)
        if c.fd in self._conns and c.out:
            self._flush_client(c)
        if c.fd in self._conns:
            self._interest(c)
            if c.up is not None and c.up.owner is c and not c.up.connecting:
                self._interest_up(c.up)

    def _count(
        self, c: _Conn, status: int, local: bool, now: float, flags: int = 0, received: int = 0
    ) -> None:
        """A request is over (answered, or cut short): counted, reported,
        logged (*flags*, *received*: its Done's, for the access log; its
        flags and the shell's own go with its report too)."""
        bits = flags | c.log_flags
        if self._log_line is not None:
            try:
                self._log(c, status, local, now, bits, received)
            except Exception:  # (a bug, a describe() that raised: the request goes on)
                self.counters["errors"] += 1
        c.sent = 0
        c.log_flags = 0
        if c.pending is not None:  # (its route timeout's 504)
            self._unpend(c)
        self.counters["requests"] += 1
        if local:
            self.counters["local_answers"] += 1
        c.timeout = c.deadline = 0.0  # its route timeout with it
        c.per_try = c.try_deadline = 0.0
        c.backoff_until = 0.0  # (a retry waiting: the route timeout's 504 went)
        c.mirrors = ()  # (not read whole: never mirrored)
        d, c.decision = c.decision, None  # this request's, used up here
        if self.report is not None:
            # No decision: a head refused before routing (400, 431):
            # UNROUTED, no duration (not the previous request's). Else its
            # tag: its decision's, a fault's abort's, or that of the
            # endpoint of its last try that reached one (_reached).
            tag = c.tag if d is not None else UNROUTED
            self.report(tag, status, now - c.started if d is not None else 0.0, bits)

    def _log(
        self, c: _Conn, status: int, local: bool, now: float, flags: int, received: int
    ) -> None:
        """The access log's line of the request c ends (see "Access log"):
        a routed one's (c.decision), or a head's the parser refused."""
        assert self._log_line is not None and self.access_log is not None
        if c.log_local is ...:
            c.log_local, c.log_remote = accesslog.connection_addresses(c.sock, c.origin, c.address)
        head = c.log_head if c.decision is not None else None
        if head is not None:
            method: bytes | None = head.method.encode("latin-1")
            path: bytes | None = head.target.encode("latin-1")
            protocol: bytes | None = head.version.encode("latin-1")
            start, duration = c.log_start, now - c.started
            tag = self.access_log.describe(c.tag)
            upstream = accesslog.address_text(c.upstream)
            up = c.up
            upstream_local = _local_of(up) if up is not None and not up.connecting else None
        else:  # a head refused: its first line as far as it reads, no destination
            parts = (c.ex.refused_line or b"").split(b" ")
            method, path, protocol = parts if len(parts) == 3 else (None, None, None)
            c.ex.refused_line = None
            since = c.head_started if c.head_started is not None else now
            start, duration = time.time() - (now - since), now - since
            tag, upstream, upstream_local = accesslog.NO_TAG, None, None
        rec = accesslog.Record(
            start,
            method,
            path,
            protocol,
            status,
            local,
            flags,
            received,
            c.sent,
            int(duration * 1000),
            c.log_xff if c.forward and head is not None else _header(head, "x-forwarded-for"),
            _header(head, "user-agent"),
            c.log_rid if c.forward and head is not None else _header(head, "x-request-id"),
            head.host.encode("latin-1") if head is not None and head.host else None,
            upstream,
            tag,
            upstream_local,
            c.log_local,
            c.log_remote,
        )
        self._log_line(accesslog.format_line(rec, self.access_log.json))

    def _route(self, c: _Conn, head: RequestHead, now: float) -> None:
        c.head_started = None
        c.started = now
        if self._log_line is not None:  # (see "Access log")
            c.log_head = head
            c.log_start = time.time()
            c.upstream = None
        trusted = None
        if c.forward:  # (see "Forwarding headers")
            assert self.forwarding is not None and self._request_ids is not None
            if c.peer_text is ...:
                c.peer_text = peer_text(c.sock, c.address)
            c.log_rid = self._request_ids.next(c.rid_connection)
            c.log_xff, trusted = c.ex.forward(self.forwarding, c.peer_text, c.log_rid)
        try:
            if self.decide_peer:
                if c.peer is ...:  # (the address the connection was taken with)
                    c.peer = None if c.address is None else peer_of(c.sock, c.address)
                # (a gateway's trusted client, taken from X-Forwarded-For with
                # --trusted-proxies, is the one a hash on the source IP reads)
                d = self.decide(head, c.origin, c.peer if trusted is None else packed_ip(trusted))
            else:
                d = self.decide(head, c.origin)
            # (what it says to write out, checked: a ValueError for a line
            # break in a value... answers as a decide() that raised)
            local_headers = header_lines(d.local_headers) if d.local is not None else ""
            if d.edits is not None and d.local is None:
                edit_bytes(d.edits)  # (checked once per distinct edits: cached)
            if d.endpoint_tags and len(d.endpoint_tags) != len(d.endpoints):
                raise ValueError("endpoint_tags not parallel to endpoints")
            for m in d.mirrors:
                if m.endpoint_tags and len(m.endpoint_tags) != len(m.endpoints):
                    raise ValueError("a mirror's endpoint_tags not parallel to its endpoints")
        except Exception:
            self.counters["errors"] += 1
            d = Decision(local=(503, "no healthy upstream"))
            local_headers = ""
        c.decision = d
        c.tag = d.tag
        c.session = d.session if d.endpoints and d.local is None else None
        if c.session is not None:
            c.session_sent = c.session.sent(head.headers)
        # (a destination whose endpoints differ in version: each try that
        # reaches one moves c.tag to its tag, _reached; a handful, by endpoint)
        c.ep_tags = (
            dict(zip(d.endpoints, d.endpoint_tags, strict=True)) if d.endpoint_tags else None
        )
        c.timeout = c.per_try = 0.0  # (set below for a request that goes)
        c.deadline = 0.0
        # (a policy not in effect is none: nothing held for it)
        retry = d.retry if d.retry is not None and d.retry.in_effect else None
        c.ex.retry = retry
        c.try_deadline = 0.0
        if d.local is not None or not d.endpoints:
            # (Envoy's fault filter runs before the router: a fault's delay
            # and abort come first, then the local answer)
            if d.local is not None:  # the route's own answer: as it is
                local = (*d.local, local_headers, False)
            else:  # the router's, edited as its other own answers (HeadEdits)
                c.ex.edits = d.edits
                local = (d.status, no_endpoint_body(d.status), "", True)
            if d.fault is not None and self._fault(c, d.fault, now):
                if c.fault_until:
                    c.fault_local = local
                return  # delayed (_timers_due goes on with it) or aborted
            self._refuse_local(c, local, now)
            return
        c.ex.edits = d.edits
        refused = c.ex.refused_rewrite()  # (a path rewrite made a dot-segment)
        if refused is not None:
            self._perform(c, refused, now)
            return
        c.candidates = list(d.endpoints)
        if d.mirrors:
            self._draw_mirrors(c, d)
        if d.fault is not None and self._fault(c, d.fault, now):
            return  # delayed (_timers_due goes on with it) or aborted
        self._go(c, now)

    def _go(self, c: _Conn, now: float) -> None:
        """The routed request's first try; its route and per-try timers
        start once it is read whole (_perform), after a fault's delay."""
        d = c.decision
        assert d is not None
        c.timeout = d.timeout
        retry = c.ex.retry
        c.per_try = retry.per_try_timeout if retry is not None else 0.0
        if c.ex.continue_due():  # (Expect: 100-continue: not in BYTES_SENT)
            c.out += CONTINUE_100
        self._try(c, c.candidates[0], now)

    def _falls(self, ppm: int) -> bool:
        """A draw of this relay's RNG: True with probability ppm / FAULT_SCALE
        (a fault's share, a mirror's: MIRROR_SCALE is FAULT_SCALE; none for
        0 or FAULT_SCALE and above)."""
        if ppm <= 0:
            return False
        return ppm >= FAULT_SCALE or self._random.random() * FAULT_SCALE < ppm

    def _fault(self, c: _Conn, fault: Fault, now: float) -> bool:
        """A route's fault injection for this request (see "Fault
        injection"): the delay's draw, then the abort's; True when the
        request is delayed (it waits in ROUTING, no upstream, its client
        watched for a reset: _timers_due ends the wait) or aborted (a
        local answer, its body read and dropped)."""
        delayed = fault.delay > 0 and self._falls(fault.delay_ppm)
        aborted = self._falls(fault.abort_ppm)
        if delayed:
            c.log_flags |= accesslog.DI
            c.fault_until = now + fault.delay
            c.fault_abort = fault.abort_status if aborted else 0
            c.last_active = c.fault_until  # (a wait is no idleness)
            self._timer_at(c.fault_until)
            return True
        if aborted:
            self._fault_abort(c, fault, now)
            return True
        return False

    def _fault_abort(self, c: _Conn, fault: Fault, now: float) -> None:
        """A fault's abort, reported with ``Fault.tag`` (else its choice's):
        tagged when it is answered, not when drawn, so that a client gone
        during the delay before it is reported as the compiled twin does,
        under its choice's tag. Its mirrors drawn are forgotten: an abort
        is never mirrored, nor counted."""
        c.mirrors = ()
        c.ex.mirror = None
        if fault.tag is not None and c.decision is not None:
            c.decision = c.decision._replace(tag=fault.tag)  # (its reports')
            c.tag = fault.tag
        self._perform(
            c,
            c.ex.refuse(fault.abort_status, FAULT_ABORT_BODY, whole=True, flags=accesslog.FI),
            now,
        )

    def _refuse_local(self, c: _Conn, local: _Local, now: float) -> None:
        """A routed request's local answer (_route's): its status, body,
        header lines and whether it is edited (the router's, for a choice
        with no endpoint: Exchange.edits set). Given before any try, as a
        fault's abort is: a request body all here already is read and
        dropped, the connection kept as its head asks (refuse()'s *whole*)."""
        status, body, headers, edited = local
        # (the route's own answer: its tag says why, NR for no route; the
        # router's for a choice with no endpoint: UH, but a 500's)
        why = (accesslog.UH if status == 503 else 0) if edited else accesslog.LOCAL_VERDICT
        refused = c.ex.refuse(status, body, headers, whole=True, edited=edited, flags=why)
        self._perform(c, refused, now)

    def _fault_over(self, c: _Conn, now: float) -> None:
        """A fault's delay passed: the abort's answer, else the first try."""
        c.fault_until = 0.0
        status, c.fault_abort = c.fault_abort, 0
        local, c.fault_local = c.fault_local, None
        if status:
            assert c.decision is not None and c.decision.fault is not None
            self._fault_abort(c, c.decision.fault, now)
        elif local is not None:  # no endpoint, or the route's local answer
            self._refuse_local(c, local, now)
        else:
            self._go(c, now)
            self._perform(c, [], now)  # (the timers: from now, as _route's caller's)

    # -- request mirroring (see "Request mirroring") ---------------------------

    def _draw_mirrors(self, c: _Conn, d: Decision) -> None:
        """A request routed upstream, before its fault's draws: each of its
        mirrors drawn on its own (no draw for MIRROR_SCALE), in order, and
        its endpoint chosen then (round robin; None: none to use, dropped
        when the copy would start); the Exchange keeps the request's bytes
        as sent for the copies (Shadow, once read whole and sent). A
        tunnel's (Upgrade, CONNECT) are dropped."""
        drawn = tuple(m for m in d.mirrors if self._falls(m.ppm))
        if not drawn:
            return
        head = c.ex.head
        if head is None or head.method == "CONNECT" or head.header("upgrade") is not None:
            self.counters["mirror_dropped"] += len(drawn)
            return
        c.mirrors = tuple(map(self._mirror_endpoint, drawn))
        c.mirror_timeout = d.timeout if d.timeout > 0 else MIRROR_TIMEOUT
        c.ex.mirror = bytearray()

    def _mirrors_due(self, c: _Conn, now: float) -> None:
        """The Shadows of c's batch of actions, after its primary's bytes
        went (they wait for no copy's socket, connect or bytes)."""
        due, c.shadows_due = c.shadows_due, None
        for a, drawn, timeout in due or ():
            self._mirror(a, drawn, now, timeout)

    def _mirror(self, a: Shadow, drawn: tuple[_Drawn, ...], now: float, timeout: float) -> None:
        """The request was read whole and sent (or given up: Exchange's
        _given_up): a copy to each mirror drawn (its endpoint chosen then:
        _draw_mirrors), dropped for bytes past the replay limit or not all
        held, max_mirrors copies in flight, a socket or connect failing at
        once; each copy's deadline *timeout* seconds from *now*, its start."""
        payload = b""
        line = b""
        if a.data is not None:
            payload = shadow_head(a.data[: a.head_length]) + a.data[a.head_length :]
            line = payload[: payload.find(b"\r\n")]
        for endpoint, tag in drawn:
            if (
                a.data is None
                or endpoint is None
                or len(self._shadows) >= self.max_mirrors
                or not self._shadow_start(endpoint, tag, payload, line, now, timeout)
            ):
                self.counters["mirror_dropped"] += 1

    def _mirror_endpoint(self, m: Mirror) -> _Drawn:
        """The mirror's next endpoint, round robin, skipping names not
        resolved yet (None when it has none to use), and the tag of its
        copy's report: the endpoint's (Mirror.endpoint_tags), else the
        mirror's."""
        key = m.balance_key if m.balance_key is not None else ("mirror", m.endpoints)
        n = len(m.endpoints)
        start = self._mirror_rr.get(key)
        if start is None:  # a new position: at its drawn offset (see rr_start)
            start = rr_start(self.rr_salt, key) % max(n, 1)
        for i in range(n):
            k = (start + i) % n
            endpoint = m.endpoints[k]
            if _numeric(endpoint[0]):
                if key not in self._mirror_rr and len(self._mirror_rr) >= _MAX_REMEMBERED:
                    self._mirror_rr.clear()
                self._mirror_rr[key] = (k + 1) % n
                return endpoint, (m.endpoint_tags[k] if m.endpoint_tags else m.tag)
        return None, m.tag

    def _shadow_start(
        self, endpoint: Endpoint, tag: Any, payload: bytes, line: bytes, now: float, timeout: float
    ) -> bool:
        """A copy (*line*: its request line) on the newest idle connection of
        the copies' pool to *endpoint*, else a new one (non-blocking), its
        deadline *timeout* seconds from *now*: False when it failed at once."""
        handle = self._shadow_pool.checkout(endpoint)
        mask = 0
        if handle is not None:
            idle = self._shadow_idle.pop(int(handle))  # type: ignore[call-overload]
            sock, connecting, mask = idle.sock, False, idle.mask  # (watched while idle)
        else:
            connected = self._shadow_connect(endpoint)
            if connected is None:
                return False
            sock, connecting = connected, True
        sh = _Shadow(
            sock,
            sock.fileno(),
            bytearray(payload),
            now + timeout,
            tag,
            now,
            endpoint,
            payload,
            head_request=line.startswith(b"HEAD "),
            # (an HTTP/1.0 request's server closes after it: the copy's head
            # has no Connection line)
            keep=not line.endswith(b" HTTP/1.0"),
            reused=not connecting,
            connecting=connecting,
        )
        sh.mask = mask
        self._shadows[sh.fd] = sh
        self.counters["mirrored"] += 1
        self._set_mask(sh.fd, sh, _EPOLLOUT)
        self._timer_at(sh.deadline)
        return True

    def _shadow_connect(self, endpoint: Endpoint) -> socket.socket | None:
        """A new connection of the copies' pool to *endpoint*, connecting
        (checked out in the pool); None when its socket or connect failed
        at once."""
        family = socket.AF_INET6 if ":" in endpoint[0] else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            return None
        try:
            sock.setblocking(False)
            sock.connect(endpoint)
        except BlockingIOError:
            pass
        except OSError:
            sock.close()
            return None
        self._shadow_pool.connecting(endpoint, sock.fileno())
        self.counters["mirror_connects"] += 1
        return sock

    def _shadow_event(self, sh: _Shadow, ev: int, now: float) -> None:
        """A copy's connect ends, its bytes go, its answer is read and
        thrown away to its end by its framing (_shadow_read), or it ends at
        the server's close, or it fails (a connect, send or receive error).
        On a reused connection, a send error, or a close or reset before any
        byte of its answer, sends it once more on a new one (_shadow_retry)."""
        try:
            if sh.connecting:
                if not ev & (_EPOLLOUT | _EPOLLERR | _EPOLLHUP):
                    return
                if sh.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    self._shadow_end(sh, now, failed=True)
                    return
                sh.connecting = False
                self._shadow_pool.connected()
            while sh.out:
                n = sh.sock.send(sh.out, _SEND_FLAGS)
                del sh.out[:n]
            if ev & (_EPOLLIN | _EPOLLHUP | _EPOLLERR):
                data = sh.sock.recv(_READ)
                if not data:
                    if sh.reused and not sh.got:
                        self._shadow_retry(sh, now)
                    else:  # the answer's end if close-delimited, else cut short
                        self._shadow_end(sh, now)
                    return
                if self._shadow_read(sh, data, now):
                    return
        except BlockingIOError:
            pass
        except OSError:
            if sh.reused and not sh.got:
                self._shadow_retry(sh, now)
            else:
                self._shadow_end(sh, now, failed=True)
            return
        self._set_mask(sh.fd, sh, _EPOLLOUT if sh.out else _EPOLLIN)

    def _shadow_read(self, sh: _Shadow, data: bytes, now: float) -> bool:
        """Bytes of a copy's answer: its status read (AnswerStatus), its
        interim heads skipped, its final head's framing (_copy_framing) and
        its body's end found (BodyFramer); True when the copy ended here: its
        answer's end (its connection idle again, or closed when it may not
        be reused or bytes followed the answer), a final head it cannot
        frame (reset), or MIRROR_READ_LIMIT bytes read (reset)."""
        sh.got += len(data)
        if not sh.answer.done:
            sh.answer.feed(data)
        rest: bytes | bytearray = data
        try:
            if sh.body is None and self._shadow_head_may_end(sh, data):
                while True:
                    # (a bare LF read as a line end, as shadow_answer_head()
                    # reads it: the answer goes nowhere)
                    head = parse_response_head(sh.head, self.max_head)
                    if head is None:
                        rest = b""
                        break
                    if 100 <= head.status < 200 and head.status != 101:
                        del sh.head[: head.head_length]  # an interim head
                        continue
                    framing = _copy_framing(head, sh.head_request)
                    if framing is None:
                        self._shadow_end(sh, now, reset=True)
                        return True
                    sh.keep = sh.keep and framing[0] != Framing.CLOSE
                    sh.keep = sh.keep and head.version == "HTTP/1.1"
                    sh.keep = sh.keep and all(
                        t.lower() != "close" for t in head.values("connection")
                    )
                    sh.body = BodyFramer(framing[0], framing[1], 502, self.max_head)
                    rest, sh.head = sh.head[head.head_length :], bytearray()
                    break
            if sh.body is not None:
                used = sh.body.feed(rest)
                if sh.body.done:
                    # (bytes after the answer: the server is confused)
                    self._shadow_end(sh, now, keep=sh.keep and used == len(rest))
                    return True
        except FramingError:  # a head or a chunk it cannot frame
            self._shadow_end(sh, now, reset=True)
            return True
        if sh.got >= MIRROR_READ_LIMIT:
            self._shadow_end(sh, now, reset=True)
            return True
        return False

    def _shadow_head_may_end(self, sh: _Shadow, data: bytes) -> bool:
        """*data* added to a copy's answer head (sh.head): whether it is
        to be judged now. A head trickled in is judged again only once its
        end may be there (an empty line's LF, LF or LF, CR, LF:
        parse_response_head says None without one), looked for from where
        the last look stopped, or once past max_head; not from its start at
        each read (quadratic in its size): head_may_end, as
        Exchange._response_head_bytes. Its first read is judged at once."""
        old = len(sh.head)
        sh.head += data
        parse, sh.head_clean, looked = head_may_end(sh.head, old, sh.head_clean, self.max_head)
        self.counters["mirror_head_rescan_bytes"] += looked
        return parse

    def _shadow_retry(self, sh: _Shadow, now: float) -> None:
        """A copy on a reused connection that failed before any byte of its
        answer (the server closed it as the copy came): its bytes again on a
        new connection, the same copy (its start, its deadline); failed when
        that connect fails at once. The copy stays in _shadows throughout:
        stats()' mirror_active, read from other threads, never counts it
        ended while it goes on (a reader waiting for none in flight read 0
        between the two and saw the retry's request come after)."""
        old = sh.fd
        self._shadow_pool.discard(sh.endpoint, old)
        if sh.mask:
            self.ep.unregister(old)
            sh.mask = 0
        sh.sock.close()
        sock = self._shadow_connect(sh.endpoint)
        if sock is None:
            del self._shadows[old]
            self.counters["mirror_failed"] += 1
            if self.report is not None:
                self.report(sh.tag, sh.answer.status, now - sh.started, 0)
            return
        again = _Shadow(
            sock,
            sock.fileno(),
            bytearray(sh.payload),
            sh.deadline,
            sh.tag,
            sh.started,
            sh.endpoint,
            sh.payload,
            sh.head_request,
            sh.keep,
        )
        self._shadows[again.fd] = again  # (the old one's number, often: replaced)
        if again.fd != old:
            del self._shadows[old]
        self._set_mask(again.fd, again, _EPOLLOUT)

    def _shadow_end(
        self,
        sh: _Shadow,
        now: float | None,
        failed: bool = False,
        reset: bool = False,
        keep: bool = False,
    ) -> None:
        """A copy is over at *now*: its connection back idle in the copies'
        pool when *keep* (and the pool keeps it), else closed (reset when it
        failed, or when *reset*: enough of its answer was read, or it cannot
        be framed), and reported (its Mirror's tag, its answer's status, the
        seconds since its start); *now* None: the relay closes, not
        reported. Its counts (mirror_failed, and mirror_active: _shadows)
        change once its socket is closed or idle: stats(), read from other
        threads, never says a copy ended while its socket is still open."""
        if (
            keep
            and now is not None
            and not self._shadow_pool.checkin(sh.endpoint, sh.fd, True, now)
        ):
            idle = _ShadowIdle(sh.sock, sh.fd, sh.endpoint, sh.mask)
            self._shadow_idle[sh.fd] = idle
            self._set_mask(idle.fd, idle, _EPOLLIN | _EPOLLRDHUP)  # readable while idle: evict
        else:
            if not keep:
                self._shadow_pool.discard(sh.endpoint, sh.fd)
            if sh.mask:
                self.ep.unregister(sh.fd)
                sh.mask = 0
            if failed or reset:
                try:
                    sh.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
                except OSError:
                    pass
            sh.sock.close()
        del self._shadows[sh.fd]
        if failed:
            self.counters["mirror_failed"] += 1
        if now is not None and self.report is not None:
            self.report(sh.tag, sh.answer.status, now - sh.started, 0)

    def _shadow_evict(self, idle: _ShadowIdle) -> None:
        """An idle copy connection closed: the server closed it (evicted
        from the copies' pool), it expired, or the relay closes."""
        del self._shadow_idle[idle.fd]
        if idle.mask:
            self.ep.unregister(idle.fd)
            idle.mask = 0
        idle.sock.close()

    def _shadow_timers(self, now: float) -> float:
        """Fail the copies past their deadline: the soonest of the others'
        (0: none)."""
        soonest = 0.0
        for sh in list(self._shadows.values()):
            if sh.deadline <= now:
                self._shadow_end(sh, now, failed=True)
            elif not soonest or sh.deadline < soonest:
                soonest = sh.deadline
        return soonest

    def _try(self, c: _Conn, endpoint: Endpoint, now: float, pooled: bool = True) -> None:
        """A try to *endpoint*: on an idle pooled connection (*pooled*), else
        a new one; within its circuit breakers (see "Circuit breakers"): at
        ``max_active`` the overflow answer, at ``max_connections`` an idle
        one whatever *pooled* says, else it waits (_pend), or with
        ``max_pending`` waiting already the overflow answer. Without
        limits: a dict lookup more, where an endpoint has settings."""
        s = self.pools.settings.get(endpoint) if self.pools.settings else None
        if s is not None and (s.max_active or s.max_connections):
            if s.max_active and self.pools.own_active(endpoint) >= s.max_active:
                self._overflow(c, endpoint, now)
                return
            if (
                (pooled or s.max_connections)
                and endpoint not in self._pending  # (first come, first served)
                and self._take_idle(c, endpoint, now)
            ):
                return
            if s.max_connections and self.pools.connections(endpoint) >= s.max_connections:
                waiting = self._pending.get(endpoint)
                if not s.max_pending or waiting is None or len(waiting) < s.max_pending:
                    self._pend(c, endpoint)
                else:
                    self._overflow(c, endpoint, now)
                return
            self._connect(c, endpoint, now)
            return
        if not (pooled and self._take_idle(c, endpoint, now)):
            self._connect(c, endpoint, now)

    def _overflow(self, c: _Conn, endpoint: Endpoint, now: float) -> None:
        """A circuit breaker's answer: Envoy's 503 (no report to outlier
        detection: the endpoint did nothing), UO; a retry's too, its request
        lost (Exchange.retry_refused: never retried, as Envoy's router
        never retries an overflow)."""
        self._overflows[endpoint] = self._overflows.get(endpoint, 0) + 1
        c.up = None
        if c.ex.phase == Phase.ROUTING:
            refused = c.ex.refuse(
                503, OVERFLOW_BODY, OVERFLOW_HEADERS, edited=True, flags=accesslog.UO
            )
        else:
            refused = c.ex.retry_refused(503, OVERFLOW_BODY, OVERFLOW_HEADERS, accesslog.UO)
        self._perform(c, refused, now)

    def _pend(self, c: _Conn, endpoint: Endpoint) -> None:
        """c waits for a connection to *endpoint* (at max_connections), last
        in line: served when one of its connections is released reusable or
        closes (_serve_pending), or a new limit lets it go. The client is
        watched for its reset meanwhile (_interest), its route timeout runs."""
        c.up = None
        c.pending = endpoint
        self._pending.setdefault(endpoint, {})[c] = None

    def _unpend(self, c: _Conn) -> None:
        endpoint = c.pending
        c.pending = None
        assert endpoint is not None
        waiting = self._pending.get(endpoint)
        if waiting is not None:
            waiting.pop(c, None)
            if not waiting:
                del self._pending[endpoint]

    def _serve_pending(self, now: float) -> None:
        """The kicked endpoints' waiting requests, first come first served:
        each on an idle connection (one just released), else a new one while
        below the endpoint's limits; the rest wait for the next kick (a
        release, a close, endpoint_settings): no scan when nothing changed."""
        kicks, self._kicks = self._kicks, set()
        for endpoint in kicks:
            while True:
                waiting = self._pending.get(endpoint)
                if not waiting:
                    break
                c = next(iter(waiting))
                s = self.pools.settings.get(endpoint)
                limit = s.max_connections if s is not None else 0
                if (
                    s is not None
                    and s.max_active
                    and (self.pools.own_active(endpoint) >= s.max_active)
                ):
                    break
                idle = self.pools.idle(endpoint) > 0
                if not idle and limit and self.pools.connections(endpoint) >= limit:
                    break
                self._unpend(c)
                try:
                    if not (idle and self._take_idle(c, endpoint, now)):
                        self._connect(c, endpoint, now)
                    if c.fd in self._conns:
                        self._interest(c)
                except Exception:  # OSError, or a bug: this connection, not the thread
                    if c.fd in self._conns:
                        self._abort(c)

    def _take_idle(self, c: _Conn, endpoint: Endpoint, now: float) -> bool:
        """A try (the first, or a retry policy's) on an idle pooled
        connection to *endpoint*, when it has one (False: none)."""
        handle = self.pools.checkout(endpoint)
        if handle is None:
            return False
        up = self._idle.pop(int(handle))  # type: ignore[call-overload]
        up.owner = c
        up.reused = True
        up.sent = False
        c.up = up
        c.upstream = endpoint
        if c.ep_tags is not None:
            self._reached(c, endpoint)
        if c.session is not None:
            self._session_try(c, endpoint)
        self._perform(c, c.ex.routed(True), now)
        return True

    @staticmethod
    def _reached(c: _Conn, endpoint: Endpoint) -> None:
        """A try of c's request reached *endpoint* (one of its connections
        taken, or a connect begun), of a destination whose endpoints differ
        in version: the request is reported with its tag from now on
        (Choice.endpoint_tags' rule)."""
        assert c.ep_tags is not None
        c.tag = c.ep_tags.get(endpoint, c.tag)

    @staticmethod
    def _session_try(c: _Conn, endpoint: Endpoint) -> None:
        """A try of c's request, under session persistence, goes to
        *endpoint*: the final head it answers gets that endpoint's token,
        unless the request's token named it (see "Session persistence")."""
        assert c.session is not None
        if session_token(endpoint) == c.session_sent:
            c.ex.session_line = None
        else:
            c.ex.session_line = session_line(c.session, endpoint)

    def _connect(self, c: _Conn, endpoint: Endpoint, now: float) -> None:
        if c.ep_tags is not None:
            self._reached(c, endpoint)
        if c.session is not None:
            self._session_try(c, endpoint)
        family = socket.AF_INET6 if ":" in endpoint[0] else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            if exc.errno not in _FD_EXHAUSTED:
                raise
            # Out of fds is ours, not the endpoint's: not reported to
            # connect_failed (a flood must not eject healthy pods); the L4
            # path's answer, 503 "overloaded", OM (Envoy's router would say
            # UF, a local connection failure: one flag for one cause here);
            # a retry's too, its request lost (Exchange.retry_refused).
            c.up = None
            if self.refused is not None:
                self.refused("fd_limit")
            if c.ex.phase == Phase.ROUTING:
                refused = c.ex.refuse(503, "overloaded", edited=True, flags=accesslog.OM)
            else:
                refused = c.ex.retry_refused(503, "overloaded", "", accesslog.OM)
            self._perform(c, refused, now)
            return
        c.upstream = endpoint  # (a connect begun, whatever becomes of it)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)  # (see _take_queue)
        up = _Up(sock, endpoint, connecting=True, owner=c)
        self._ups[up.fd] = up
        # counted from here, not from the connect's end (see _pool_py.py)
        self.pools.connecting(endpoint, up.fd)
        c.up = up
        if not _numeric(endpoint[0]):
            # A DNS endpoint before its first answer: a getaddrinfo() here
            # would block every connection of this thread.
            self._connect_error(c, up, now, "not resolved yet")
            return
        try:
            sock.connect(endpoint)
        except BlockingIOError:
            pass
        except OSError as exc:
            self._connect_error(c, up, now, exc.strerror or str(exc))
            return
        own = self.pools.settings.get(endpoint)
        timeout = self.connect_timeout if own is None else own.connect_timeout
        deadline = self._deadlines[up.fd] = now + timeout
        self._timer_at(deadline)  # (_timers_due: on time, not on the tick)
        self.ep.register(up.fd, _EPOLLOUT)
        up.mask = _EPOLLOUT

    def _connect_error(self, c: _Conn, up: _Up, now: float, why: str = "") -> None:
        self.counters["connect_errors"] += 1
        endpoint = up.endpoint
        if not why:  # from the tick: the deadline passed
            why = "connect timeout"
        self._deadlines.pop(up.fd, None)
        self._drop_upstream(up)
        c.up = None
        self._answer_reported.pop(endpoint, None)  # its next answer is news
        if self.connect_failed is not None:
            self.connect_failed(endpoint, c.tag if c.decision else None, why)
        if endpoint in c.candidates:
            c.candidates.remove(endpoint)
        p = c.ex.retry
        if p is not None and p.on_connect and c.ex.tries < p.attempts:
            # the policy's try may dial it again: last, behind those not
            # tried yet (each one tried goes last: the least recently tried
            # first), as Envoy's previous_hosts predicate prefers a host not
            # tried yet and its load balancer takes a tried one when none is
            # left: one endpoint refusing is dialled 1 + attempts times (the
            # compiled twin's retry_order() in connect_failed_next())
            c.candidates.append(endpoint)
        # the next candidate (a first attempt's, or a retry's), unless the
        # retry policy that retries a failed connect has spent its tries
        step = c.ex.connect_failed() if c.candidates else ConnectRetry.SPENT
        if step is ConnectRetry.POLICY:
            # one of the policy's tries (Envoy's upstream_rq_retry counts
            # it): after its backoff, as Envoy's retry after a failed
            # connect waits its backoff timer (RetryWithBackoff), then
            # through the pool, its own per-try timer from its
            # connection's readiness (_perform, as a Retry's)
            retry = c.ex.retry
            assert retry is not None
            self.counters["retries"] += 1
            c.try_deadline = 0.0
            c.backoff_until = now + retry.backoff_s(c.ex.tries, self._random.random())
            self._timer_at(c.backoff_until)
            c.last_active = c.backoff_until  # (a wait is no idleness)
            if c.fd in self._conns:
                self._interest(c)  # (watched for its reset meanwhile)
        elif step is ConnectRetry.OWN:
            # the relay's own move, at once; the next try's per-try timer
            # afresh, from its connection's readiness (_perform: the failed
            # try's never started, its connection never ready)
            c.try_deadline = 0.0
            self._try(c, c.candidates[0], now, pooled=False)
        elif c.ex.phase == Phase.ROUTING:
            # (no try took it: a body all here is read and dropped, the
            # connection kept as its head asks, as the route timeout's 504
            # while connecting keeps it; Envoy's connect failure comes after
            # its router buffered the body: a local reply to a request read
            # whole. The compiled twin's connect_failed_next())
            refused = c.ex.refuse(
                503, "no healthy upstream", whole=True, edited=True, flags=accesslog.UF
            )
            self._perform(c, refused, now)
        else:  # a retry's last connect failed (or the policy's tries are spent): lost
            self._perform(c, c.ex.upstream_eof(connect_failed=True), now)

    def _response_failed(self, endpoint: Endpoint, tag: Any, why: str) -> None:
        self._answer_reported.pop(endpoint, None)  # its next answer is news
        if self.response_failed is not None:
            self.response_failed(endpoint, tag, why)

    def _answered(self, endpoint: Endpoint, tag: Any, status: int = 0) -> None:
        """A complete response of *status* (0: a tunnel's): reported when
        news, or a 5xx its endpoint's settings ask for, always (see "Outlier
        detection")."""
        if 500 <= status < 600:  # (Envoy's 5xx; a status line may say 999)
            s = self.pools.settings.get(endpoint)
            if s is not None and s.report_5xx:
                self._answer_reported.pop(endpoint, None)  # its next answer is news
                if self.answered_5xx is not None:
                    self.answered_5xx(endpoint, tag, status)
                return
        seen = self._failures_seen
        if self._answer_reported.get(endpoint) == seen:
            return
        if len(self._answer_reported) >= _MAX_REMEMBERED:
            self._answer_reported.clear()  # (forgetting costs a report each)
        self._answer_reported[endpoint] = seen
        if self.answered is not None:
            self.answered(endpoint, tag)

    def _release(self, c: _Conn, reusable: bool, now: float) -> None:
        up = c.up
        c.up = None
        if up is None:
            return
        if up.connecting:
            self._drop_upstream(up)
            return
        closing = self.pools.checkin(
            up.endpoint,
            up.fd,
            reusable and not up.out and not up.send_failed and not up.peer_closed,
            now,
        )
        if closing:
            up.owner = None  # checked in: the pool has forgotten it already
            self._drop_upstream(up)
            return
        up.owner = None
        self._idle[up.fd] = up
        self._set_mask(up.fd, up, _EPOLLIN | _EPOLLRDHUP)  # readable while idle: evict
        if self._pending and up.endpoint in self._pending:
            self._kicks.add(up.endpoint)  # the first waiting request takes it

    def _hand_off(self, c: _Conn, a: Tunnel | NotHTTPConnection) -> None:
        up = c.up
        if up is not None and isinstance(a, Tunnel):
            self._answered(up.endpoint, c.tag)  # its 101 (or 2xx to CONNECT)
        handle = up.fd if up is not None else -1
        try:
            self._forget_client(c)
            to_up = b""
            if up is not None:
                self._forget_upstream(up)
                to_up = bytes(up.out)
            data = a.data if isinstance(a, NotHTTPConnection) else b""
            endpoint = up.endpoint if up is not None else None
            self.l4(
                c.sock, up.sock if up else None, bytes(c.out), to_up or data, c.origin, endpoint
            )
        finally:
            # l4 counts the tunnel from here (add_external): never uncounted
            # between, nor counted for good when something above raised
            if up is not None:
                self.pools.discard(up.endpoint, handle)
                if self._pending and up.endpoint in self._pending:
                    self._kicks.add(up.endpoint)  # (the tunnel's is no pooled one now)

    def _start_close(self, c: _Conn, now: float, quiet: bool = False) -> None:
        if c.up is not None:
            self._release(c, False, now)
        c.closing = now + _LINGER_S
        c.quiet = quiet
        if not c.out:
            self._linger(c)

    def _linger(self, c: _Conn) -> None:
        """The answer is sent: FIN, then read until the client's (or _LINGER_S),
        so that a client still sending does not turn the answer into a reset;
        a quiet client (Close.quiet) is closed at once."""
        if c.quiet:
            self._close_client(c)
            return
        try:
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close_client(c)
            return
        c.closing = time.monotonic() + _LINGER_S  # from the answer's end, however long it took

    # -- sending ---------------------------------------------------------------

    def _flush_client(self, c: _Conn) -> None:
        while c.out:
            try:
                n = c.sock.send(c.out, _SEND_FLAGS)
            except BlockingIOError:
                return
            del c.out[:n]
        if c.closing:
            self._linger(c)

    def _flush_up(self, up: _Up) -> bool:
        """Send what waits for the upstream; False: it failed (a reset, a
        broken pipe), which is the upstream's end, not the client's: once
        what it sent before is read (_send_failed), the exchange decides (a
        retry when nothing was answered and the request may be sent again,
        else a 503), as the compiled twin does."""
        while up.out:
            try:
                n = up.sock.send(up.out, _SEND_FLAGS)
            except BlockingIOError:
                return True
            except OSError:
                return False
            del up.out[:n]
            up.sent = True
        return True

    # -- epoll interest ----------------------------------------------------------

    def _interest(self, c: _Conn) -> None:
        want = 0
        if c.out:
            want |= _EPOLLOUT
        if (c.closing and not c.eof) or self._reading_client(c):
            want |= _EPOLLIN
        elif not want and not c.closing and c.ex.phase in (Phase.ROUTING, Phase.EXCHANGE):
            # Its request in flight, the client is not read: watched for its
            # reset alone (EPOLLHUP, EPOLLERR: _client_event ends it), else a
            # stalled try, the tries and backoffs of a policy went on for a
            # client gone. Not for EPOLLRDHUP: a FIN alone is a half-close,
            # whose answer still goes out (level-triggered, it would fire
            # for ever). The same one epoll_ctl as the removal was.
            want = _WATCH_RESET
        self._set_mask(c.fd, c, want)

    def _interest_up(self, up: _Up) -> None:
        c = up.owner
        want = 0
        if up.out:
            want |= _EPOLLOUT
        if c is not None and not c.out:
            # and the server's FIN, said by the event that reads the bytes
            # before it (_upstream_event): no syscall more, and no wake-up
            # more (a FIN makes the socket readable anyway)
            want |= _EPOLLIN | _EPOLLRDHUP
        self._set_mask(up.fd, up, want)

    def _set_mask(self, fd: int, obj: _Conn | _Up | _Shadow | _ShadowIdle, want: int) -> None:
        if obj.mask == want:
            return
        if obj.mask == 0 and want:
            try:
                self.ep.register(fd, want)
            except FileExistsError:
                self.ep.modify(fd, want)
        elif want:
            self.ep.modify(fd, want)
        else:
            # EPOLLHUP ignores the mask: a registered fd with nothing wanted
            # would wake us for ever once its peer hangs up.
            self.ep.unregister(fd)
        obj.mask = want

    # -- closing -------------------------------------------------------------------

    def _forget_client(self, c: _Conn) -> None:
        self._conns.pop(c.fd, None)
        if c.mask:
            self.ep.unregister(c.fd)
            c.mask = 0

    def _forget_upstream(self, up: _Up) -> None:
        self._ups.pop(up.fd, None)
        self._idle.pop(up.fd, None)
        self._deadlines.pop(up.fd, None)
        if up.mask:
            self.ep.unregister(up.fd)
            up.mask = 0

    def _drop_upstream(self, up: _Up) -> None:
        if up.owner is not None and up.fd in self._ups:
            self.pools.discard(up.endpoint, up.fd)  # connecting or not
        self._forget_upstream(up)
        up.owner = None
        up.sock.close()
        if self._pending and up.endpoint in self._pending:
            self._kicks.add(up.endpoint)  # below max_connections: one may connect

    def _close_client(self, c: _Conn, reset: bool = False, cut: int = accesslog.CUT) -> None:
        """Close *c* (with a RST: *reset*); a request of it not counted yet
        is counted cut (*cut*: the access log's bits saying so)."""
        if c.pending is not None:
            self._unpend(c)
        if c.decision is not None:
            # a routed request not counted yet: dropped here (the client
            # reset, the idle timeout), counted with what the client got
            self._count(c, c.ex.sent_status, False, time.monotonic(), cut, c.ex.received)
        if c.up is not None:
            up, c.up = c.up, None
            self._drop_upstream(up)
        self._forget_client(c)
        if reset:
            try:
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
            except OSError:
                pass
        c.sock.close()

    def _abort(self, c: _Conn) -> None:
        self.counters["errors"] += 1
        self._close_client(c, reset=True)

    def _timer_at(self, t: float) -> None:
        """_next_timer no later than t (a deadline or a backoff's end just
        set: _timers_due fires it then)."""
        if not self._next_timer or t < self._next_timer:
            self._next_timer = t

    def _timers_due(self, now: float) -> None:
        """_next_timer passed: one scan of the connections fires the route
        and per-try timeouts due (_exchange_timers), then sends the policy's
        retries whose backoff passed (their per-try timer starts), gives up
        the connects past their deadline (_connect_error), and
        _next_timer becomes the soonest of what still runs (0: none). A
        deadline past is fired and cleared here, never left due (the loop
        would spin). A connection whose request ended during its backoff
        (the route timeout's 504: _count; closed: gone from _conns) waits
        no more."""
        self.counters["timer_scans"] += 1
        self._next_timer = 0.0  # (what is scheduled below, if anything, sets it)
        soonest = 0.0
        for c in list(self._conns.values()):
            if c.fd not in self._conns:
                continue
            self._exchange_timers(c, now)
            if c.fd not in self._conns:
                continue
            if c.fault_until and c.ex.phase != Phase.ROUTING:
                c.fault_until = 0.0  # (not due for ever)
                c.fault_local = None
            if c.fault_until and c.fault_until <= now:
                try:
                    self._fault_over(c, now)
                    if c.fd in self._conns:
                        self._interest(c)
                except Exception:  # OSError, or a bug: this connection, not the thread
                    self._abort(c)
                    continue
                if c.fd not in self._conns:
                    continue
            if c.backoff_until and (
                c.up is not None or c.ex.phase not in (Phase.ROUTING, Phase.EXCHANGE)
            ):
                c.backoff_until = 0.0  # (its exchange ended otherwise: not due for ever)
            if c.backoff_until and c.backoff_until <= now:
                c.backoff_until = 0.0
                # its per-try timer from its connection's readiness, or the
                # request's end if later (_perform), as a first try's
                c.try_deadline = 0.0
                try:
                    # through the pool, as a first try (Envoy's retries):
                    # a stale one gets the reused connection's own retry
                    self._try(c, c.candidates[0], now)
                    if c.fd in self._conns:
                        self._interest(c)
                except Exception:  # OSError, or a bug: this connection, not the thread
                    self._abort(c)
                    continue
            up = c.up
            connect_by = self._deadlines.get(up.fd, 0.0) if up is not None else 0.0
            if connect_by and connect_by <= now and up is not None and up.owner is c:
                self.counters["timeouts"] += 1
                self._connect_error(c, up, now)  # (the tick's too, a backstop)
                if c.fd not in self._conns:
                    continue
            for t in (c.backoff_until, c.deadline, c.try_deadline, connect_by, c.fault_until):
                if t > now and (not soonest or t < soonest):
                    soonest = t
        if self._shadows:
            t = self._shadow_timers(now)
            if t and (not soonest or t < soonest):
                soonest = t
        if soonest:
            self._timer_at(soonest)

    def _exchange_timers(self, c: _Conn, now: float) -> None:
        """c's route and per-try timeouts, fired (and cleared) when past."""
        if c.deadline and c.deadline <= now and c.fd in self._conns:
            # the route timeout: before the connect timeout (the request
            # is over, whatever its connect does)
            self.counters["timeouts"] += 1
            c.deadline = 0.0
            try:
                self._perform(c, c.ex.upstream_timeout(), now)
            except Exception:  # OSError, or a bug: this connection, not the thread
                self._abort(c)
        if c.try_deadline and c.try_deadline <= now and c.fd in self._conns:
            # the retry policy's per-try timeout (Retry sets it again)
            c.try_deadline = 0.0
            try:
                actions = c.ex.try_timeout()
                if actions:
                    self.counters["timeouts"] += 1
                self._perform(c, actions, now)
            except Exception:  # OSError, or a bug: this connection, not the thread
                self._abort(c)

    def _tick(self, now: float) -> None:
        if self._idle_closes:
            self._close_idle_due(now)  # (a gradual drain's: see "Drain")
        for c in list(self._conns.values()):
            # (_timers_due fires these on time: here a backstop)
            self._exchange_timers(c, now)
        for fd, deadline in list(self._deadlines.items()):
            up = self._ups.get(fd)
            if deadline <= now and up is not None and up.owner is not None:
                self.counters["timeouts"] += 1
                self._connect_error(up.owner, up, now)
        for c in list(self._conns.values()):
            if c.closing:
                # the linger runs from the answer's last byte (_linger);
                # until then a slow reader gets it, within the idle timeout
                if (c.closing <= now and not c.out) or c.last_active + self.idle_timeout <= now:
                    self._close_client(c)
            elif c.head_started is not None and c.head_started + self.header_timeout <= now:
                self.counters["timeouts"] += 1
                if self.refused is not None:
                    self.refused("header_timeout")
                c.head_started = None
                c.ex.phase = Phase.CLOSED
                c.out += _timeout_answer()
                self._start_close(c, now)
                self._flush_client(c)
                if c.fd in self._conns:
                    self._interest(c)
            elif c.last_active + self.idle_timeout <= now:
                # Between requests, or in an exchange where no byte moved
                # either way (a hung upstream): closed with its upstream, as
                # the L4 pump closes an idle relay. Progress either way reads
                # (backpressure couples the sides), so last_active moves.
                self.counters["timeouts"] += 1
                c.log_flags |= accesslog.SI  # (a request in flight: Envoy's stream idle timeout)
                self._close_client(c)
        for handle in self.pools.expire(now):
            up = self._idle.get(int(handle))  # type: ignore[call-overload]
            if up is not None:
                self._drop_upstream(up)
        if self._shadows:
            self._shadow_timers(now)  # (_timers_due's: a backstop)
        for handle in self._shadow_pool.expire(now):
            idle = self._shadow_idle.get(int(handle))  # type: ignore[call-overload]
            if idle is not None:
                self._shadow_evict(idle)


def _copy_framing(head: ResponseHead, head_request: bool) -> tuple[Framing, int] | None:
    """How a copy's answer's body after its final *head* ends (RFC 9112
    6.3; *head_request*: a HEAD's copy), or None for a head whose framing
    the relays do not read (see verdict.Mirror, "The copies' pool"):
    Content-Length with Transfer-Encoding, several Content-Length values or
    one not a number, a transfer coding other than ``chunked`` alone (or any
    in HTTP/1.0), a 101 (a copy asks for no Upgrade)."""
    te = head.values("transfer-encoding")
    cl = head.values("content-length")
    if head.status == 101 or (te and cl) or len(cl) > 1:
        return None
    length = 0
    if cl:
        if not (cl[0].isascii() and cl[0].isdigit() and len(cl[0]) <= MAX_CL_DIGITS):
            return None
        length = int(cl[0])
    if te and (head.version == "HTTP/1.0" or len(te) > 1 or te[0].lower() != "chunked"):
        return None
    if head_request or head.status in (204, 304):
        return Framing.NONE, 0
    if te:
        return Framing.CHUNKED, 0
    if cl:
        return (Framing.LENGTH, length) if length else (Framing.NONE, 0)
    return Framing.CLOSE, 0


def _timeout_answer() -> bytes:
    from l4proxy.dataplane._exchange_py import local_response

    return local_response(408, "request header timeout")  # as the L4 path's


def _numeric(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            pass
    return False


def _local_of(up: _Up) -> str | None:
    """UPSTREAM_LOCAL_ADDRESS: this side of *up* (asked once per connection)."""
    if up.local is None:
        try:
            up.local = accesslog.address_text(up.sock.getsockname())
        except OSError:
            return None
    return up.local


# a header's lines an access log line joins at most (the compiled twin's LOG_SPANS)
_LOG_LINES = 16


def _header(head: RequestHead | None, name: str) -> bytes | None:
    """A request header's values for the access log, its lines joined by
    "," (Envoy's HTTP/1 codec's), the first :data:`_LOG_LINES` of them (of
    X-Forwarded-For the last: the proxies' end), as the compiled twin reads
    them; None when absent."""
    if head is None:
        return None
    values = [v for k, v in head.headers if k == name]
    values = values[-_LOG_LINES:] if name == "x-forwarded-for" else values[:_LOG_LINES]
    return ",".join(values).encode("latin-1") if values else None

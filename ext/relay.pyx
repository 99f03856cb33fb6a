# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The per-request HTTP/1.1 relay, compiled: the twin of l4proxy/dataplane/_relay_py.py.

Read the theory of operation and the decisions in ``_relay_py.py`` (the I/O
shell) and ``_exchange_py.py`` (one connection's exchange, sans-IO): this
module does the same for the requests it handles, and hands the others to a
pure :class:`~l4proxy.dataplane._relay_py.HttpRelay` it owns, so that every
request is served by exactly one of the two, identically.

Theory of operation
===================
One background thread alternates between two halves:

* ``run()``: a C loop entered ``with nogil`` that owns an epoll instance,
  every client connection and upstream connection of the fast path, the
  upstream pools and the verdict cache. It touches no Python object. It
  returns to Python only when something needs Python (below), when asked to
  stop, or every ``FLUSH_S`` seconds to hand over the metrics it counted.
* ``_service()``: Python, with the GIL: it does what the loop asked for, then
  the thread goes back into ``run()``.

The steady state of a keep-alive connection therefore runs no Python: the
head is scanned by the request-head scanner (``_head_scan.pxi``, the one
``HeadParser`` uses), the route comes from the *verdict cache*, the upstream
connection from the pool, and the response is framed by a C recogniser of
response heads and the chunked machine (``_chunked.pxi``).

The fast path and the slow path
-------------------------------
A complete request head is served here when it is the common case: no error,
origin-form target without a dot-segment, exactly one valid Host, no
Transfer-Encoding but ``chunked`` alone (HTTP/1.1, no Content-Length), no
``Expect`` but one ``100-continue`` (HTTP/1.1), no ``Upgrade``, no
Connection field naming other fields, not ``CONNECT`` (``fast_head()``).
Anything else (a head error, a dot-segment in the path, a first request
that is not HTTP, an absolute-form target, another transfer coding, a
tunnel) is a
rare event: the connection, with every byte read from it, is handed to the
pure relay at that request boundary (``HttpRelay.add(..., requests=n)``),
which answers it (400, 431, an L4 tunnel, ...) exactly as it would have
answered it from the first byte. A dot-segment (``has_dot_segment`` in
``_head_scan.pxi``) is handed over before any verdict is looked up: its
path passes the tests of the rule it would escape (``/public/../private``
those of ``/public``), so a cached verdict would route it. A
response head that the C recogniser does not take (HTTP/1.0, several
Content-Length lines, a malformed line, a transfer coding other than
``chunked``, a line ending in a bare LF) is judged by
``parse_response_head``/``response_framing`` in Python: the same code the
pure twin runs (a bare-LF head written again with CRLF, ``crlf_head``,
in ``c.rhead`` before it goes).

Verdicts: Python decides, compiled code applies
-----------------------------------------------
``resolve(head, origin)`` (Python: the route table, classification, health)
answers a :class:`~l4proxy.dataplane.verdict.Verdict`: a local answer, or a
weighted list of :class:`~l4proxy.dataplane.verdict.Choice` (a subset's
endpoints and load-balancing policy). What a verdict depends on is the
request's origin, method, Host, target and the headers named by
``key_headers`` (every header any route matches on); the loop caches the
verdict under those bytes for ``Verdict.ttl`` seconds (a miss asks
``resolve`` again; once expired, one request asks while the others are
served the expired verdict, for ``STALE_S`` at most, so that an expiry
does not send every connection's next request to Python), and *applies*
it per request: the weighted draw, the
round-robin, random or least-connections order of the endpoints (by
``ep_load()``: this loop's requests in flight to the endpoint, and those
:meth:`HttpRelay.add_external` tells of: the slow path's, the worker's
connections routed at L4 and the tunnels in the pump, until they end). A
rule swap or an endpoint failure calls :meth:`HttpRelay.invalidate` (a
relaxed atomic increment the loop checks per lookup): the next request asks
Python again. A keep-alive connection's request with the method, target and
Host of one before it takes its last hit's verdict without the lookup, when
the lookup would find it again (``last_verdict()``).
Without ``resolve``, ``decide`` is asked for every request (tests; the
verdict is then one ordered choice, used once).

Retry policy
------------
A route's retry policy (``Verdict.retry``, "Retry policy" in
``_exchange_py.py``) is interned as a ``Retry_`` the verdicts and the
connections point at (a policy not in effect, ``RetryPolicy.in_effect``, is
NULL), counted: a reference per verdict that points at it (``_retry`` takes
it, ``verdict_free`` lets it go) and one while a connection's request
follows it (``apply_verdict`` takes it, ``conn_drop_held`` lets it go at the
exchange's end, ``reset_exchange``, or when the connection is freed,
``bury``: a cached verdict may go while a request still follows its policy).
All on the loop's thread (``close()`` after it stopped). When a table passed
twice what the last sweep kept (plus ``INTERN_SLACK``), ``_sweep_interned``
frees those nothing refers to, before a new one is interned: a reload per
deploy bringing new policies does not grow the relay for ever. A request
under one keeps its bytes in ``c.replay`` whatever its method (unless its
``on`` is 0: a per-try timer alone, nothing to replay); the decision points
are the final response head (``head_out``: a status the policy names), the
upstream's end before that head (``on_upstream_eof``), a response head that
cannot be framed (``HttpRelay._response``: a protocol error, a reset to
Envoy, where the 502 went without a policy) and the per-try timer
(``exchange_timer``), each through ``can_retry`` and ``policy_retry``.
Without a policy each of these costs a test of ``c.retry``, the steady
state nothing more. A retry waits Envoy's jittered exponential backoff first
(``backoff_delay``: uniformly random in [0, (2^n - 1) * base) before the
n-th, at most 10 times base; base 25 ms unless the policy says, drawn from
``Relay.jitter``, a xorshift of its own seeded from Python): the connection
waits in ``P_CONNECT`` without an upstream, ``c.backoff_until`` set, no
per-try timer running (Envoy starts it when the retry is sent), the route
timeout running (its 504 ends the wait); then the try goes on an idle
pooled connection to ``c.cand[0]`` when it has one (``take_idle``, as a
first try: Envoy's retries go through the pool), else on a new one. A try
on a pooled connection has the reused connection's one retry whatever the
policy, not one of its tries (``reuse_retry_done``: ``c.retried`` for the
first try, ``c.reuse_retried`` for a policy's, cleared in ``policy_retry``
and ``connect_failed_next``: nothing more on the path without a policy).
``R.next_timer``, no later than
the soonest of every wait's end, route deadline (``resp_deadline``),
per-try deadline and connect deadline (an upstream's ``deadline``),
shortens the epoll timeout, the 0.25 s tick being too coarse: a timeout of
100 ms fires at 100 ms, as Envoy's, not up to a tick later. Where one of
them is set, a compare and a store keep it so; when it passes,
``timers_due`` scans the connections once, fires the timers due
(``exchange_timer``), sends the retries due (``retry_send``) and finds the
soonest again (the steady state scans about once per route timeout). The
relay's own retries (a failed connect's next endpoint, the reused
connection's one retry) go at once, as Envoy's do, the next endpoint's
try with its per-try timer afresh. Under a policy that retries a failed
connect (``Retry_.on_connect``) the move to the next endpoint is one of
its tries (``connect_failed_next``, as Envoy's router spends one of its
retries on it: a retry counted; out of tries, the request is answered as
with no endpoint left) and waits its backoff first, as Envoy's
(``RetryWithBackoff``), as ``policy_retry``'s wait does: ``retry_send``
then, its per-try timer from there. The failed endpoint stays a candidate
then, last (``retry_order``), so the try dials it again when every other
one was tried (one endpoint refusing: 1 + attempts connects), as Envoy's
``previous_hosts`` predicate falls back to a tried host.

Head edits
----------
A choice's head edits ("Head edits" in ``_exchange_py.py``:
``Choice.edits``, a ``HeadEdits``) are interned as an ``Edits_`` per
distinct edits (``_edit``: one block, its names and lines in it, as
``edit_bytes()`` computes them for both twins; counted and swept as the
retry policies are: a reference per choice that points at it, and one
while a request holds it, from ``apply_verdict`` to the exchange's end: a
request's response may outlive its verdict). ``pick()`` keeps the drawn
choice's in ``c.edits``; ``apply_verdict`` rewrites the head staged in ``c.rhead`` (and the copy
``c.replay`` holds for a retry, the head alone by then) with its request
edits (``edit_request``: the fast path's target is origin-form; an
absolute-form one goes to the pure relay, which sends it in origin-form;
a rewritten path with a dot-segment is answered 400 and closed,
``rewrite_refused``),
and ``final_head`` sends the final response head through
``send_edited_head`` when there are response edits (interim heads go as
before); the relay's own answers to such a request (``local_answer``'s
when its connects failed, a circuit breaker or no fd; ``upstream_failed``'s
503, 502 and 504) go through ``answer_edited``, which edits them as
``edit_local_answer()`` does; the answer of a choice with no endpoint
(``Choice_.empty``: 503 ``no healthy upstream``, 500 ``backend not
resolved``; in decide mode a ``Decision`` without endpoints nor ``local``,
converted to such a choice) is built edited by ``edit_local_answer()``
itself when the verdict is converted (``_local_verdict``'s *edits*), so
that ``pick()`` hands it out as before, at no cost per request; a fault's
abort and the other local answers as before. A request whose choice has none pays a
pointer store in ``pick()`` and a test in ``apply_verdict`` (which takes
the reference when there are edits) and ``final_head``; ``reset_exchange``
tests ``c.holds`` where it tested ``c.retry``. The edited head is built in
C, bounded by the head and the route's edits; out of memory the connection
is aborted. A local verdict's ``local_headers`` are in its answer's bytes
(``_local_verdict``).

Consistent hashing
------------------
A choice of policy ``HASH`` (``Choice.hash_on``, a ``verdict.HashOn``) is
``LB_HASH`` with a ``HashOn_`` of its own (``_hash_on``: the kind, the
name, each endpoint's ``endpoint_hash()`` in the choice's order, and, with
a ttl, the ``set-cookie`` line's bytes around the generated value; freed
with the choice, ``verdict_free``). ``pick()`` hands such a choice to
``hash_pick`` (through ``R.hash_pick``, as ``edit_request``): the key is
``hash_fnv`` (FNV-1a 64, ``hash_key()``'s twin) of what ``request_key``
reads of the head as received (``c.inb``, what ``resolve`` parsed:
``HashOn.key_of``'s header, cookie or query parameter), else a random
draw (``rng_next``), or with a ttl a generated cookie's (16 hex digits of
a draw, hashed as if sent); ``HK_SOURCE_IP``'s (``source_ip``) is of the
client's packed address (``hash_source``: a gateway listener's request's
trusted client address where ``fwd_lines`` took one from its
X-Forwarded-For, ``Fwd_.src``; else the peer's), ``peer_of()``'s 4 or 16 bytes, which
``new_conn`` keeps in the Conn from accept()'s address (``accept_on``, or
``add()``'s *peer*), else ``conn_peer`` asks of the kernel (one
``getpeername``) the first time a connection needs it (``c.peer``,
``c.peer_len``, ``c.peer_port``: 0 not asked, -1 unknown, then a random
key; no cookie for this kind, its ttl ignored). In decide mode a relay made with ``decide_peer`` calls
``decide(head, origin, peer)`` with those bytes (None: unknown), and so
does its pure relay (``slow``, made with it too) with ``peer_of()``. The
candidates are the first
``MAX_ATTEMPTS`` by descending ``hash_mix(key ^ endpoint hash)``, ties by
index (``hash_order()``): retries go down the same order. A generated
cookie's line is the Conn's (``c.set_cookie``, malloc'd: the verdict may go
before the response comes; out of memory: a random key, no cookie), held
as the edits are (``c.holds``; freed by ``conn_drop_held`` at the
exchange's end, each pipelined request its own, a retry keeps it);
``c.edit_resp`` sends the final response head through
``send_edited_head``, which adds it after the choice's response edits,
before the empty line (interim heads and a fault's abort go as before; the
relay's own answers that ``answer_edited`` edits get it too).
A request whose choice is not ``HASH`` pays a compare of ``ch.policy`` in
``pick()`` (and no ``getpeername``); ``final_head`` tests ``c.edit_resp`` where it tested
``c.edits`` and its ``response``.

Session persistence
-------------------
A route verdict with a session persistence (``Verdict.session``, a
``verdict.SessionPersistence``: an HTTPRoute rule's ``sessionPersistence``)
has a ``Session_`` of its own (``_session``: the cookie's or header's name,
the token line's bytes around the token, and the token of each endpoint of
each choice, ``session_token()``'s, made in Python; freed with the verdict,
``verdict_free``). ``pick()`` hands such a verdict to ``session_choice``
(through ``R.session_choice``, as ``hash_pick``) instead of the weighted
draw: the token the head as received sent (``session_sent``: the cookie
as ``cookie_value_in`` reads a hashed one, or the header's one line,
``SessionPersistence.sent``'s twin) is compared with each choice's
endpoints' tokens, in order; the choice of the first that has it is taken,
that endpoint kept in ``R.sess_pin`` (no local whose address pick() takes:
no stack-protector canary for every request), else the draw as usual.
Once the choice's order is made (its policy's, ``hash_pick``'s too),
``session_pin`` puts the pinned endpoint first (the others after it in
their order; one past ``MAX_ATTEMPTS`` comes in, the last candidate goes)
and gives the Conn a ``Sess_`` (malloc'd, held as the edits are:
``c.holds``, freed by ``conn_drop_held``; out of memory: none, the request
goes as routed without a token): each candidate's token and the line's
bytes, copied (the verdict may go before the response comes), and the
pinned endpoint. ``c.edit_resp`` sends the final head through
``send_edited_head``, which adds the line of the endpoint that answered
(``c.up``'s, one of the candidates) last, unless it is the pinned one; a
header token's own lines in the upstream's head are left out (Envoy sets
that header). The relay's own answers (``answer_edited``) get none. A
verdict without one pays a test of ``v.session`` in ``pick()`` and one
after its order; nothing else changes.

Tags per endpoint
-----------------
A choice whose endpoints differ in version (``Choice.endpoint_tags``: a
tag per endpoint; the rule of which one a request is reported with is
there) has ``Choice_.ep_tags``, each endpoint's tag id parallel to
``eps`` (``_ep_tags``, interned by ``_tag_id`` as the choice's own; freed
with the choice, ``verdict_free``); NULL for the others, the common case.
``pick()`` sets ``c.mixed`` from it (a store per request) and, when set,
each candidate's tag id in ``c.cand_tag``, parallel to ``c.cand``:
round-robin, random and ordered orders by index, ``LEAST_REQUEST``'s and
``hash_pick``'s sorts carry each candidate's index in ``ch.eps``
alongside (in ``c.cand_tag``, then its tag: no array on ``pick()``'s
stack, whose canary every request would pay); the candidates'
reorderings (``retry_order``, ``connect_failed_next``) move the tags
with them. A try that reaches an
endpoint (``take_idle``; ``connect_to`` once past a circuit breaker's
line, before anything else can fail) sets ``c.tag`` to its candidate's
(``reached()``: at most MAX_ATTEMPTS compares, only when ``c.mixed``),
which everything after it reports (the request's row, ``request_done``;
outlier detection's outcomes): a uniform choice pays the test of
``c.mixed`` in ``take_idle`` and ``connect_to``. The choice's own tag
stays in ``l4proxy_decisions_total``'s row (counted before any try) and
on a request answered before a try reached an endpoint. A mirror's
``Mirror_.ep_tags`` likewise: ``mirror_draw`` copies the tag of the
endpoint drawn into the ``Dest_`` (its copy's report). ``_sweep_tags``
marks the cached verdicts' ``ep_tags`` and, for a connection with
``c.mixed``, its candidates' tags (its next try's).

Fault injection
---------------
A route's fault injection (``Verdict.fault``, "Fault injection" in
``_relay_py.py``: Envoy's fault filter) is interned as a ``Fault_`` per
distinct fault (``_fault``, with its abort's answer as a local verdict),
which ``Verdict_.fault`` points at (NULL: none, or one that never falls),
counted as retry policies are: a reference per verdict (``verdict_free``
lets it go) and one while a request waits out its delay (``c.fault``: its
abort's answer is read then; ``fault_over``, ``fault_forget`` let it go),
swept by ``_sweep_interned``. ``apply_verdict`` draws it per request, cached verdict or
not, once ``pick()`` chose (``fault_drawn``: ``rng_next``, the delay's
then the abort's, none for a share of 0 or all); a local verdict's, or a
choice's with no endpoint, before its local answer (Envoy's fault filter
runs before the router): delayed, the answer is a copy the Conn owns
(``fault_local``: its verdict may be freed meanwhile; ``fault_forget``).
A delayed request waits
in ``P_CONNECT`` with no upstream, ``c.fault_until`` set and no timer of
its route started (``request_read`` comes after it), its client watched
for a reset as a backoff's wait is; ``timers_due`` ends the wait
(``fault_over``: the first try, or the abort). An abort
(``fault_abort``) is a local answer, reported under its answer's tag
(``Fault.tag``, kept by ``_tag_id`` and marked by ``_sweep_tags`` while
the fault is interned) where it has one: a request body all here already
(read with its head: a delayed request's client is not read) is dropped
and the connection stays as its head asks; one not complete gets the
answer with ``connection: close`` and the lingering close, as Envoy's
connection manager does for a response before the request is complete.
A verdict without a fault pays one pointer test per request.

Request mirroring
-----------------
A route's mirrors (``Verdict.mirrors``, "Request mirroring" in
``_relay_py.py``) are part of its verdict (``Mirror_``: the share, a
round-robin slot per ``balance_key``, the endpoints as EPs; ``_mirrors``,
freed by ``verdict_free``). ``apply_verdict`` draws them for a request
routed upstream, before its fault (``mirror_draw``, through
``R.mirror_draw``: ``rng_next`` per mirror, none for all or none), and
copies each drawn one's next resolved endpoint's address into the
request's ``Plan_`` (``c.shadow``, malloc'd, held as the edits are:
``c.holds``, freed uncounted by ``conn_drop_held`` when the request ends
before its copies start or are dropped: a fault's abort, a client that
cut it or left). The request's bytes as sent are kept in ``c.replay``
from there, as a retry policy's are (``c.replayable``; what retries do
is unchanged: every decision that retries tests the policy, or the
method, first). Once the request was read whole and sent
(``send_request``, ``client_event``: ``c.req_left`` 0 there, a test of
``c.shadow`` more), after the primary's ``flush_up`` (its bytes first;
before ``upstream_send_failed`` when that failed: the copies go
whatever the primary does), ``mirror_start`` builds ``shadow_head`` of
the head (``Plan_.head_len`` bytes of the replay) and the body bytes
after it, and opens a ``Shadow`` per copy (``K_SHADOW`` in the loop's
epoll, dispatched in ``run()``; no EP, no Conn) on a connection of the
copies' pool: the newest idle one of its endpoint's ``SEP`` (a small
table of the mirror endpoints that have idle copy connections, scanned
by address, each freed with its last idle one; never an EP: a copy
counts in no ``active``, ``n_open`` or circuit breaker), else a new one
(``shadow_connect``, ``mirror_connects``). It sends them, reads and
throws away its answer to its end by its framing (``shadow_read``:
``shadow_answer_head`` reads a head as the pure twin's
``parse_response_head`` and ``_copy_framing`` do, interim heads skipped;
``shadow_body``, the chunked machine), then (``SH_ANSWERED``) its
connection goes back idle, newest first, at most ``MIRROR_IDLE_MAX``
per endpoint, watched (any event: ``shadow_evict``), expired by
``tick`` after the pool idle timeout, unless the answer or the request
leaves it not reusable (``Shadow.keep``) or its endpoint left the route
table (``Shadow.removed``: ``retain_endpoints`` closes a gone endpoint's
idle copy connections and marks the copies in flight to it at the moment
it does the routes' pool's, ``shadows_retain``, by address: its EP may
be swept; a copy's retry on a new connection is unmarked, as a request's
new connection is); a final head or a chunk it does
not frame ends the copy with a reset (``SH_UNFRAMED``). On a reused
connection a send error, or a close or reset before any answer byte,
sends the copy once more on a new one (``shadow_retry``; its bytes kept
in ``Shadow.out`` until its first answer byte). Else it ends at the
server's close (done), or once ``MIRROR_READ`` bytes
(``MIRROR_READ_LIMIT``) were read (done, ``SH_ENOUGH``: reset, an
endless answer costs no more), or fails at a connect, send or receive
error or at its deadline (the route's timeout from its start, else
``MIRROR_TIMEOUT``: ``shadow_timers``, from ``timers_due`` and
``tick``), then is closed (a reset when it failed) and buried after the
batch. What it reads goes through ``answer_scan`` until that is done
(``verdict.AnswerStatus`` in a few bytes of the Shadow: a head's first
12 bytes collected across reads, interim heads skipped to their empty
line), and ``shadow_end`` counts the copy in a row of its Mirror's tag
(``Mirror_.tag``, interned with its verdict and copied through
``Dest_`` into the Shadow, which ``_sweep_tags`` marks while any holds
it): that status (``ST_NONE`` for none), the seconds from its start;
not one the relay closes in flight (``SH_CLOSED``). When the relay gives
the request up before that
(``mirror_give_up``: from ``local_answer``, its connects failed, a
circuit breaker, no fd; from ``upstream_failed``, the route timeout
before a connection, the primary failing before the request's end, a
body not framed; from ``complete`` with the request cut, answered before
its end), a request without a body that no try took (``c.req_left`` 0
with ``c.shadow`` still set) starts its copies from its head held in
``c.replay`` (Envoy sends the shadow whatever the primary does); one
whose body was not all read and sent is not held whole: dropped.
Dropped (``mirror_dropped``): a replay gone past ``REPLAY_LIMIT`` (or a
body spliced, which only goes once it is), a final answer begun before
the request's end (an interim 100 Continue is none: c.replay is kept
while ``c.shadow`` waits), a body not all read when the request was
given up, ``max_mirrors`` copies in flight, a mirror without a resolved
endpoint, a socket or connect failing at once. Tunnels and the other
requests the pure relay answers are its (``slow``, made with the same
``max_mirrors``: its copies reported through ``report``, as its requests
are). A verdict without mirrors costs a test in
``apply_verdict``, one of ``c.shadow`` per request read whole and per
body read, and one per local answer, failure, and answer before the
request's end.

Outlier detection
-----------------
What ``_relay_py.py`` says under "Outlier detection", without the GIL: the
loop queues an endpoint's failures and its answers that are news
(``outcome()``: its first, or its first since any failure was reported; an
EP keeps the generation ``Relay.failures_seen`` had at its last answer
reported) and returns to Python, which hands them on in order; the steady
state queues nothing. A failed connect goes to Python at once, as before
(the connection waits for its next candidate). A failure reported by either
relay, or by the worker (``report_next_successes()``), makes every
endpoint's next answer news in both. An endpoint whose settings ask for
its 5xx (``EndpointSettings.report_5xx``, kept in its EP as its pool
settings are) has every final answer of status 500 to 599 queued
(``OD_5XX``, with its status in ``out_status``), a complete one or a try
its retry policy retries, for ``answered_5xx``: a failure to the news, as
a gateway failure is. The steady state pays one compare of the status at
an answer.

Circuit breakers
----------------
What ``_relay_py.py`` says under "Circuit breakers", per EP (its
``max_connections``, ``max_pending``, ``max_active``, set with its pool
settings) and per half: this loop counts its own, its pure relay its own
(its requests are rare ones). ``try_ep()`` (a first try, a policy's retry,
the pooled connection's retry, a failed connect's next candidate)
answers ``R_overflow`` at ``max_active`` (``overflow()``: counted in the
EP's ``overflows``, no outcome; a retry's request lost, answered so too:
``retry_refused()``); ``connect_to()`` at ``max_connections``
(``n_open``: connections opened and not closed, ``up_close()`` counting
them down) links the Conn at the tail of its EP's line (``pend_head``,
``Conn.pend_ep``), or overflows with ``max_pending`` waiting. A waiting
Conn is in ``P_CONNECT`` without an upstream, as a backoff's wait, its
client watched for a reset, its route timer running (no per-try timer:
a try's starts once its connection is ready, ``try_timer()``, as Envoy's
pending request has none); it leaves the line in ``route_timeout()``
(its 504) and ``conn_forget()``. ``up_release()`` pooling a connection, ``up_close()``
and a new limit kick the EP (``Relay.kick_head``); ``serve_pending()``,
at the top of ``run()``'s loop, checks out to the waiting ones in order
while the limits allow (before epoll waits: no wake-up, no scan of a line
nothing changed). An EP with a line or a kick is never swept; a swept EP's
overflows stay counted (``_overflows_gone``). Without limits the steady
state pays a compare at a try and where a connection opens, closes or
goes idle (``pend_head``).

Access log
----------
``access_log`` (an ``accesslog.AccessLog``: ``--access-log``) gives every
Conn a ``LogConn`` (``c.lg``, at ``new_conn``: its addresses, the origin's
text from ``accept_on`` or ``add()``) and the loop ``R.alog``: a bounded
buffer and a writer thread of its own, in C (``l4_alog_*``:
``accesslog.LineWriter``'s twin), whose lock the loop holds for a
``memcpy`` per line and never while the fd is written: a reader that
stops loses lines (counted: full, a line is dropped), not requests. A
routed request's head is read where it starts (``apply_verdict``:
``log_capture``, through ``R.log_capture``, into the connection's
``LogReq``, made for its first request: the values a line says of it,
escaped in one pass, at most their ``accesslog.CAPS``; its start, wall
clock; its Content-Length), its line formatted where it is counted
(``request_done``: ``log_done``, through ``R.log_done``, then
``l4_log_line``: the separators as C literals) as
``accesslog.format_line`` formats the pure twin's, into ``R.log_line``,
no Python: its tag's cluster and route from ``R.log_tags`` (each tag id's
``TagLog``, escaped by ``_log_tag`` when ``_tag_id`` gives it), the
endpoint's text from its EP (made once), the start's second's text from
``R.log_sec_text`` (made once a second), its flags
from ``c.lflags``, which the paths a request served upstream never takes
set as they answer or give up (a verdict's local answer its
``Verdict_.lflags``: the route's own, UH, UF, UO, OM, FI; ``upstream_failed``
its ``why``'s; ``route_timeout``, ``request_cut``, ``tick``'s idle timeout,
a fault's delay; cleared where ``apply_verdict`` starts a request), and
URX from the retry policy's tries (``row_flags``). The same flags key
the request's metrics row, log or no log (Istio's ``response_flags``):
``request_done`` gives ``count_row`` its status and ``row_flags`` in one
word (``row_key``; LF_LOCALV as ``RF_LOCALV``, the worker naming a route's
own answer's flags from its tag, as ``log_done`` does from
``R.log_tags``), so a row is probed and compared as before and a request
with no flag set and no retry pays one test for them. UPSTREAM_HOST
is c.up's endpoint, else the one ``log_upstream`` kept of a try given up
(``up_discard``, a failed connect); BYTES_SENT is ``c.client_bytes`` (the
local answers count theirs), BYTES_RECEIVED the Content-Length less
``c.req_left``, or a chunked body's ``c.req_chunked`` (``take_chunked``,
never inlined: ``body_take`` stays small). The pure relay's lines (the
requests it is handed) go to the same buffer (``_log_sink``), and so do
the worker's lines of connections routed at L4 (``access_log_line``;
``close(access_log=False)`` keeps the writer for those a drain ends, till
``close_access_log``). With the
log off a request pays a test of ``c.lg`` in ``apply_verdict`` and one in
``request_done`` (bench.instructions: the compiled loop's ~4,190
instructions per keep-alive request of a gateway listener, as before);
with it on, ``log_capture`` and ``log_done``, about 2,200 more (no system call but a
getsockname per upstream connection and, once per client connection,
its local address where no origin gives it; the writer thread's
write()s apart). DOWNSTREAM_REMOTE_ADDRESS is the client's address as
``new_conn`` kept it (``peer_log_text``: accept()'s, or asked as the
connection was taken, never at the line: a client that reset its
connection, ``0 DC``, has no peer left to ask for).

Forwarding headers
------------------
A relay made with ``forwarding`` (``forwarding.Forwarding``: the worker's
``--trusted-proxies``) gives a gateway listener's requests
X-Forwarded-For, X-Forwarded-Proto, x-envoy-external-address and a new
x-request-id, as an Istio ingress gateway's Envoy does (read
``l4proxy/dataplane/forwarding.py``; ``_forwarding.pxi`` is the twin of
its ``forwarded_head``): such a connection has a ``Fwd_`` (``c.fwd``,
``new_conn``'s *gateway*: a gateway ``Lst``, or a hand-off whose origin
says ``gateway``), ``summarize`` notes the lines they replace as drops,
and ``on_head`` stages the head as sent upstream through ``fwd_stage``
(before the verdict, its retries' replay and its copies' take it; a
route's edits after it). Its request ids are the relay's own splitmix64
stream (``Relay.rid``); the pure relay it hands rare requests to draws
its own. Any other connection pays a test of ``c.fwd`` and a store where
its head is summarized (and a test of ``h.n_xff`` per header line no
other test took) and a test where it is staged; with the log on, one more
in ``log_capture``.

Drain
-----
``drain()`` (the worker's SIGTERM: read "Drain" in ``_relay_py.py`` and
``_exchange_py.py``) asks the loop, under the lock as ``stop`` is, to
drain the gateway listeners' connections (``DRAIN_INBOUND``: ``c.gateway``,
a gateway ``Lst``'s or a hand-off whose origin says ``gateway``) or every
one (``DRAIN_ALL``), with the seconds its connections between requests
close over (``drain_spread``); ``discourage()`` sets or clears
``DRAIN_DISCOURAGE`` beside the scope (the health check failed: the
gateway listeners' answers say close, nothing closes between requests).
The pure relay it hands requests to is told too. ``run()`` applies a
change before the hand-off queue is taken (``drain_conns``, with the
value before): a connection the scope names now and did not before is
marked ``c.draining``; one between requests (``P_HEAD``, no byte of a next
head) gets ``c.drain_at``, the k-th of N (in ``R.conns``' order: the order
they were taken, but for one whose place a closed one's successor took)
at k * spread / N from now, and ``drain_due`` closes each one due that is
still between requests through ``start_close`` (its answer's last bytes
first, then FIN and the lingering read): the first at once, the others
at the tick after theirs (``R.drain_next``, read only where the tick
runs), but one with a byte of a head waiting unread (``bytes_waiting``)
and one taken less than ``DRAIN_FRESH_S`` ago that has sent nothing (due
again then: its client connected to send a request); one whose final head went out already has ``c.keeps_client``
cleared, so ``complete()`` closes it after the body. A gateway
listener's connection the scope does not name is marked, or unmarked, as
``DRAIN_DISCOURAGE`` says, and its ``c.keeps_client`` is left as its
final head said: Envoy asks ``drainClose()`` at each response's head,
so a head that went out keeping the client before ``/healthcheck/fail``
keeps it, and ``/healthcheck/ok`` before the next answer leaves nothing
told (as the pure twin). ``new_conn`` marks those taken afterwards
(``drains()``). ``final_head`` then sends ``connection: close`` (an
upstream's keep-alive replaced, as for a client that asked to close) and
the local answers (``local_answer``, ``fault_abort``,
``upstream_failed``) their closing variant. The steady state pays one
test of ``c.draining`` in ``final_head``'s keep, a byte of the ``Conn``
it reads anyway. ``close()`` says how many connections it cut (its
``_shutdown``), their requests' lines ``0 DC`` with ``LF_LOCAL_CUT``'s
details (``accesslog.DRAIN_CUT``: Envoy's for a close the proxy made).

Stop signals: ``take_stop_signals()`` (the worker's SIGTERM and SIGINT,
blocked in every thread: run._serve) gives the loop a signalfd, so that
the thread that serves is the one that hears the stop: a batch with it
takes it first (``stop_signal()``, before any accept or answer of the
batch: a worker paused with clients queued, SIGSTOP or a CPU quota's
throttling, when the SIGTERM came answers none of them keep-alive once
it runs again), sets ``DRAIN_STOPPED`` beside the scope (the gateway
listeners' answers say close, as ``DRAIN_DISCOURAGE``'s, for good:
``discourage(False)`` leaves it), and has Python call the worker back
(``R.stop_seen``), whose drain follows. Before, the loop's thread served
such a queue before the event loop had run its handler.

Liveness: each turn of the loop stores its time (``R.turn_ns``, after
``epoll_wait``, whose timeout is never past the next tick: ``TICK_S``, so
an idle loop turns four times a second). ``stalled()`` says how long ago
the last one began while the thread should be running: a loop stuck
(an endless loop, a deadlock, a callback that never returns) answers
nothing and reads no stop signal, while the worker's event loop still
answers the supervisor's watchdog, which asks for it (``alive``:
run._answer_supervisor) and replaces such a worker (a ``--single-process``
one asks itself and exits: run._watch_alone; /ready says ``STALLED``
meanwhile). A thread close() gave up waiting for is still counted (stuck).
``hang_for_test()`` (tests only) sleeps the thread at its next service.

Ownership of file descriptors
-----------------------------
A client fd belongs to the hand-off queue, then to one ``Conn``, then either
is closed by ``conn_close()`` or handed on (to the pure relay, with its
bytes). An upstream fd belongs to one ``Up``: checked out by a ``Conn`` or
idle in its endpoint's pool; ``up_close()`` closes it. A mirrored copy's
fd belongs to its ``Shadow``, in flight or idle in its ``SEP``;
``shadow_end()`` or ``shadow_evict()`` closes it. An fd leaves epoll
before it is closed. A ``Conn`` or ``Up`` closed while a batch of events is
handled is only marked and buried after the batch.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int16_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc, qsort, realloc
from libc.string cimport memchr, memcmp, memcpy, memmove, memset, strlen
from libc.errno cimport (
    ECONNABORTED, EAGAIN, EINPROGRESS, EINTR, EINVAL, EMFILE, ENFILE, ENOBUFS, ENOMEM, errno,
)

cimport linux as sys_

import logging
import os
import socket as _socket
import threading
import time as _time_mod

from l4proxy.dataplane import _relay_py
from l4proxy.dataplane import accesslog as _accesslog
from l4proxy.dataplane import forwarding as _forwarding
from l4proxy.dataplane._exchange_py import (
    DOT_SEGMENT_REASON,
    OVERFLOW_BODY,
    OVERFLOW_HEADERS,
    RESET_BEFORE_HEADERS,
    RESET_BEFORE_HEADERS_RETRIED,
    check_header,
    edit_bytes,
    edit_local_answer,
    header_lines,
    local_response,
    response_hop_by_hop,
)
from l4proxy.dataplane._framing_py import (
    CHUNKED_ERRORS,
    MAX_CHUNK_LINE,
    MAX_CHUNK_SIZE,
    Framing,
    FramingError,
    bodiless_head,
    crlf_head,
    parse_response_head,
    response_framing,
)
from l4proxy.dataplane._peek_py import DEFAULT_MAX_HEAD as _DEFAULT_MAX_HEAD
from l4proxy.dataplane._peek_py import RequestHead
from l4proxy.dataplane._pool_py import COUNTERS as _POOL_COUNTERS
from l4proxy.dataplane._pool_py import PoolOptions, checked_endpoint_settings
from l4proxy.dataplane.peek import parse_head

_log = logging.getLogger("l4proxy.worker")
from l4proxy.dataplane.verdict import TEST_KINDS as _TEST_KIND_NAMES
from l4proxy.dataplane.verdict import BACKOFF_MAX_FACTOR, FAULT_ABORT_BODY, FAULT_SCALE, Choice, Verdict
from l4proxy.dataplane.verdict import (
    DEFAULT_MAX_MIRRORS,
    MIRROR_MAX_IDLE,
    MIRROR_READ_LIMIT,
    MIRROR_SCALE,
    MIRROR_TIMEOUT,
)
from l4proxy.dataplane.verdict import (HASH_COOKIE, HASH_HEADER, HASH_QUERY, HASH_SOURCE_IP,
                                       SESSION_HEADER, endpoint_hash, no_endpoint_body,
                                       rr_salt, rr_start, session_token)

Decision = _relay_py.Decision

__all__ = ["Decision", "HttpRelay"]

include "_bytes.pxi"
include "_head_scan.pxi"
include "_chunked.pxi"


cdef extern from "<sys/socket.h>" nogil:
    int socket(int domain, int type, int protocol)
    int connect(int fd, const void *addr, sys_.socklen_t len)
    int accept4(int fd, void *addr, sys_.socklen_t *len, int flags)
    struct sockaddr:
        unsigned short sa_family
    int getpeername(int fd, sockaddr *addr, sys_.socklen_t *len)
    struct sockaddr_storage:
        unsigned short ss_family
    enum:
        AF_INET
        AF_INET6
        SOCK_NONBLOCK
        SOCK_CLOEXEC

cdef extern from "<netinet/in.h>" nogil:
    ctypedef uint32_t in_addr_t
    struct in_addr:
        in_addr_t s_addr
    struct sockaddr_in:
        unsigned short sin_family
        uint16_t sin_port
        in_addr sin_addr
    struct in6_addr:
        unsigned char s6_addr[16]
    struct sockaddr_in6:
        unsigned short sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id
    enum:
        IPPROTO_TCP
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)

cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)

cdef extern from *:
    """
    #define L4R_ADD(p, v) ((void)__atomic_fetch_add((p), (v), __ATOMIC_RELAXED))
    #define L4R_LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
    #define L4R_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
    """
    void L4R_ADD(int64_t *p, int64_t v) nogil
    int64_t L4R_LOAD(int64_t *p) nogil
    void L4R_STORE(int64_t *p, int64_t v) nogil

cdef extern from "<fcntl.h>" nogil:
    int c_open "open"(const char *path, int flags)
    enum:
        O_RDONLY


# -- constants ----------------------------------------------------------------

cdef enum:
    MAX_EVENTS = 256
    READ_SIZE = 65536
    MAX_ATTEMPTS = 3
    MAX_KEY_HEADERS = 16
    MAX_DROP_LINES = 8
    FWD_MAX_XFF = 8           # X-Forwarded-For lines a gateway's fast path joins (_forwarding.pxi)
    MAX_NAMED = 16            # fields a response's Connection names, found without malloc
    MAX_BUCKETS = 24
    CACHE_SLOTS = 4096        # power of two
    CACHE_MAX = 2048          # entries before the cache is cleared
    LINE_MAX = 512            # the longest method SP target an entry keeps (Entry.line)
    ROWS_SLOTS = 1024         # power of two
    REPLAY_LIMIT = 65536
    MAX_OUTCOMES = 1024

# Row.status of a request that ended with no response head sent (a reset):
# reported as response code 0 (Envoy's), apart from the decisions' rows (0)
cdef int ST_NONE = -1

cdef double TICK_S = 0.25
cdef double FLUSH_S = 1.0
cdef double NOT_LISTENING_PAUSE_S = 1.0  # a listener accept() says EINVAL of: not watched
cdef double LINGER_S = 2.0
cdef double DRAIN_FRESH_S = 1.0  # a drain leaves a connection this young for its first head
cdef double STALE_S = 1.0  # how long past its ttl a verdict serves while refilled
cdef uint64_t FAULT_PPM = FAULT_SCALE  # a fault's and a mirror's shares are of this (verdict.py's)
cdef double MIRROR_S = MIRROR_TIMEOUT   # a copy's deadline when its route has no timeout
cdef int64_t MIRROR_READ = MIRROR_READ_LIMIT  # a copy's answer read at most, then reset
cdef int MIRROR_IDLE_MAX = MIRROR_MAX_IDLE  # idle copy connections per mirror endpoint

# what an epoll registration points at
cdef enum:
    K_CONN = 1
    K_UP = 2
    K_LST = 3
    K_SHADOW = 4

cdef enum:  # how a copy ends (shadow_end())
    SH_DONE = 0            # the server closed: closed
    SH_FAILED = 1          # a connect, send or receive error, its deadline: reset, mirror_failed
    SH_ENOUGH = 2          # MIRROR_READ of its answer read: reset, not failed
    SH_CLOSED = 3          # the relay closes: closed, not reported
    SH_ANSWERED = 4        # its answer's end (its framing's): idle again if Shadow.keep, else closed
    SH_UNFRAMED = 5        # a final head (or a chunk) it does not frame: reset, not failed
    SF_HEAD = -1           # Shadow.framing until its answer's final head came

cdef enum:  # a copy's answer read as verdict.AnswerStatus reads it (answer_scan())
    AS_STATUS = 0          # a head's first STATUS_LINE bytes, collected across reads
    AS_HEAD = 1            # an interim head (1xx but 101): skipped to its empty line
    AS_DONE = 2            # a final head's status read, or not HTTP/1.x: the rest unread
    STATUS_LINE = 12       # b"HTTP/1.1 200": what a status line's code needs

cdef enum:
    MAX_LSTS = 16
    MAX_OTHERS = 1024      # accepted connections waiting for Python, per return
    INTERN_LIMIT = 4096    # origins or endpoints before the first sweep (_sweep)
    INTERN_SLACK = 16      # retry policies, head edits or faults past twice the live (_sweep_interned)
    SPLICE_MIN = 131072    # a body this long (still to come) is spliced
    SPL_RESP = 1           # Conn.splicing: the response body (upstream -> client)
    SPL_REQ = 2            # ... the request body (client -> upstream)
    PIPE_SIZE = 1048576    # asked of F_SETPIPE_SZ for it (the kernel may give less)
    ACCEPT_BATCH = 64
    SO_ORIGINAL_DST = 80
    SOL_IP = 0
    SHAPE_ORIGIN = 9       # the key of an origin's class entry

# an origin's class (what classify() says of an unread connection)
cdef enum:
    OC_RELAY = 1           # HTTP: this relay
    OC_OTHER = 2           # anything else: the worker's general path

# drain()'s scope (Relay.drain_req, Relay.draining): none, the gateway
# listeners' connections (inbound: Envoy's DrainDirection InboundOnly), all;
# and beside it discourage()'s bit: the gateway listeners' answers say close
cdef enum:
    DRAIN_NONE = 0
    DRAIN_INBOUND = 1
    DRAIN_ALL = 2
    DRAIN_SCOPE = 3          # the scope's bits
    DRAIN_DISCOURAGE = 4
    DRAIN_STOPPED = 8        # the stop signal came: DRAIN_DISCOURAGE's, for good

# client connection phases
cdef enum:
    P_HEAD = 0       # reading a request head
    P_RESOLVE = 1    # waiting for Python (a verdict)
    P_CONNECT = 2    # head complete, upstream connecting
    P_EXCH = 3       # request going up, response coming down
    P_CLOSING = 4    # answer sent or being sent, then a lingering close

# req_left of a chunked request body: more to come until its machine ends
cdef int64_t REQ_CHUNKED = 0x7FFFFFFFFFFFFFFF

cdef enum:
    N_CHUNK_ERRORS = 16  # above the chunked machine's E_* (0: none, 1..14)

# response framing (Framing's values)
cdef enum:
    F_NONE = 0
    F_LENGTH = 1
    F_CHUNKED = 2
    F_CLOSE = 3

# response progress
cdef enum:
    RS_HEAD = 0
    RS_BODY = 1
    RS_DONE = 2

# what a verdict depends on besides origin and Host (verdict.py's SHAPE_*)
cdef enum:
    SHAPE_PATH = 1
    SHAPE_METHOD = 2
    SHAPE_HEADERS = 4
    SHAPE_FULL = 7
    SHAPE_ONLY = 8       # the key of a shape entry: origin and Host
    SHAPE_TESTS = 16     # the target only through the shape entry's tests

# tests of the request target (verdict.py's TEST_KINDS, in that order)
cdef enum:
    T_TARGET_PREFIX = 0
    T_EXACT = 1
    T_PATH_PREFIX = 2
    T_SEGMENTS = 3
    T_HEADER_EXACT = 4
    T_HEADER_PREFIX = 5

# verdict kinds
cdef enum:
    V_LOCAL = 0
    V_ROUTE = 1

# load-balancing policies
cdef enum:
    LB_ROUND_ROBIN = 0
    LB_RANDOM = 1
    LB_LEAST_REQUEST = 2
    LB_ORDERED = 3
    LB_HASH = 4

_POLICIES = {"ROUND_ROBIN": LB_ROUND_ROBIN, "RANDOM": LB_RANDOM,
             "LEAST_REQUEST": LB_LEAST_REQUEST, "ORDERED": LB_ORDERED, "HASH": LB_HASH}

# what a LB_HASH choice hashes (HashOn_.kind)
cdef enum:
    HK_HEADER = 0
    HK_COOKIE = 1
    HK_QUERY = 2
    HK_SOURCE_IP = 3       # the client's address (the Conn's peer, conn_peer())
    EQ = 0x3D              # (bytes it splits on: _bytes.pxi's others)
    AMP = 0x26
    DQUOTE = 0x22

# where a session persistence's token is (Session_.kind)
cdef enum:
    SK_COOKIE = 0
    SK_HEADER = 1

class _Unhashable:
    """The key a fault with an unhashable tag is interned under (HttpRelay._fault):
    its own, by identity, swept as any once no verdict or Conn holds it."""

    __slots__ = ()


_HASH_KINDS = {HASH_HEADER: HK_HEADER, HASH_COOKIE: HK_COOKIE, HASH_QUERY: HK_QUERY,
               HASH_SOURCE_IP: HK_SOURCE_IP}

# what the loop asks Python for (Conn.need)
cdef enum:
    N_NONE = 0
    N_RESOLVE = 1       # a verdict for the head in c.inb
    N_SLOW = 2          # hand the connection to the pure relay
    N_RESPONSE = 3      # judge the response head in c.rhead
    N_CONNECT_FAILED = 4
    N_CONNECT_OK = 5

# how an endpoint served a request (outcome()): an answer, or why it failed
cdef enum:
    OD_ANSWERED = 0
    OD_BEFORE = 1       # closed (or reset) before any response byte
    OD_MID = 2          # ... before the response's end
    OD_TIMEOUT = 3      # the route's timeout passed before the response's end
    OD_5XX = 4          # an answer of 500 to 599, of an EP with report_5xx (out_status)
    OD_CHUNKED = 16     # + the chunked machine's E_*: a response body's framing
    OD_TEXT = 64        # + an index in _outcome_texts: judged in Python

# a retry policy's RETRY_* bits (verdict.py)
cdef enum:
    RT_5XX = 1
    RT_GATEWAY_ERROR = 2
    RT_RESET = 4
    RT_4XX = 8
    RT_STATUS_CODES = 16
    RT_ON_RESET = 7       # 5xx, gateway-error, reset: a close before the response head

# counters (stats())
cdef enum:
    CT_CONNECTIONS
    CT_REQUESTS
    CT_LOCAL
    CT_CONNECT_ERRORS
    CT_TIMEOUTS
    CT_ERRORS
    CT_ACTIVE
    CT_IDLE
    CT_OPENED
    CT_REUSED
    CT_RETURNED
    CT_CLOSED_UNREUSABLE
    CT_CLOSED_MAX_REQUESTS
    CT_CLOSED_OVERFLOW
    CT_EVICTED
    CT_EXPIRED
    CT_CLOSED_REMOVED
    CT_CACHE_HITS
    CT_CACHE_MISSES
    CT_SLOW
    CT_SPLICED
    CT_PY_HEADS
    CT_URGENT
    CT_RETRIES
    CT_TIMER_SCANS
    CT_MIRRORED
    CT_MIRROR_DROPPED
    CT_MIRROR_FAILED
    CT_MIRROR_ACTIVE
    CT_MIRROR_CONNECTS
    CT_MIRROR_IDLE
    CT_METRICS_DROPPED
    CT_HEAD_RESCAN
    CT_MIRROR_HEAD_RESCAN
    N_CT

_STAT_NAMES = (
    "connections", "requests", "local_answers", "connect_errors", "timeouts", "errors",
    "active", "pool_idle", "pool_opened", "pool_reused", "pool_returned",
    "pool_closed_unreusable", "pool_closed_max_requests", "pool_closed_overflow",
    "pool_evicted", "pool_expired", "pool_closed_removed", "verdict_cache_hits",
    "verdict_cache_misses", "slow_path", "spliced", "response_heads_in_python", "urgent",
    "retries", "timer_scans", "mirrored", "mirror_dropped", "mirror_failed", "mirror_active",
    "mirror_connects", "mirror_idle", "metrics_dropped", "response_head_rescan_bytes",
    "mirror_head_rescan_bytes",
)


# -- the access log's writer and records (see "Access log") ------------------------

cdef extern from *:
    """
    #include <errno.h>
    #include <fcntl.h>
    #include <poll.h>
    #include <pthread.h>
    #include <signal.h>
    #include <stdint.h>
    #include <stdio.h>
    #include <stdlib.h>
    #include <string.h>
    #include <time.h>
    #include <unistd.h>
    #include <arpa/inet.h>
    #include <netinet/in.h>
    #include <sys/socket.h>
    #include <sys/stat.h>

    #define L4_LINE_MAX 4096  /* PIPE_BUF: a write() of at most this to a pipe is atomic */

    /* The access log's buffer and its writer thread: push() appends a line
       under the lock (never waits on the fd: a line that does not fit is
       dropped and counted), the thread takes the buffer whole (two of
       them, swapped) every 0.1 s, or at once when it is half full or a
       flush is asked, and writes it in chunks of at most L4_LINE_MAX
       bytes ending at a line's end; a write error drops the rest of that
       batch, counted (errors, dropped, the first errno kept for Python to
       log once). A line a short write began in a file (a full disk) that
       the next write could not end is cut off the file again (l4_alog_cut):
       no torn line, the next one glued to it. No Python, no GIL:
       accesslog.LineWriter's twin. */
    typedef struct {
        int fd;
        pthread_mutex_t lock;
        pthread_cond_t wake, idle;
        char *fill, *spare;
        size_t fill_len, cap;
        int stop, writing, running;
        int orphan;  /* close() gave up on the thread: it frees all as it ends */
        int64_t lines, dropped, errors;
        int first_errno;
        /* a reopen (SIGUSR1): the fd to switch to once batch reopen_after
           (the one holding every line pushed before it) is written, or,
           when that batch was still being filled (reopen_split: its length
           at the reopen), once the part before the lines pushed after it is */
        int reopen_fd;
        int64_t batches, reopen_after;
        size_t reopen_split;  /* (0: the whole batch) */
        pthread_t thread;
    } l4_alog;

    static void l4_deadline(struct timespec *ts, double s) {
        clock_gettime(CLOCK_MONOTONIC, ts);
        if (s < 0) s = 0;
        ts->tv_sec += (time_t)s;
        ts->tv_nsec += (long)((s - (double)(time_t)s) * 1e9);
        if (ts->tv_nsec >= 1000000000L) { ts->tv_sec += 1; ts->tv_nsec -= 1000000000L; }
    }

    static void l4_alog_lost(l4_alog *a, const char *p, size_t n, int err) {
        int64_t lines = 0;
        for (size_t i = 0; i < n; i++) lines += p[i] == '\\n';
        pthread_mutex_lock(&a->lock);
        a->errors += 1;
        a->dropped += lines;
        if (!a->first_errno) a->first_errno = err ? err : EIO;
        pthread_mutex_unlock(&a->lock);
    }

    static off_t l4_alog_file_size(int fd) {  /* -1: not a regular file */
        struct stat st;
        return fstat(fd, &st) == 0 && S_ISREG(st.st_mode) ? st.st_size : -1;
    }

    /* A write failed after a short one left p[line:pos), a line's start,
       at the end of a regular file (of size torn_end then): cut it off
       again while no write came after it (the size unchanged: another
       worker's append on a full disk fails as ours did), so the file holds
       whole lines only; the line is dropped with the rest. Where the rest
       of the batch begins: the line's start, or pos when it stays. */
    static size_t l4_alog_cut(l4_alog *a, const char *p, size_t pos, off_t torn_end) {
        const char *nl = pos ? memrchr(p, '\\n', pos) : NULL;
        size_t line = nl != NULL ? (size_t)(nl - p) + 1 : 0;
        off_t frag = (off_t)(pos - line);
        if (frag == 0 || torn_end < frag || l4_alog_file_size(a->fd) != torn_end) return pos;
        return ftruncate(a->fd, torn_end - frag) == 0 ? line : pos;
    }

    static void l4_alog_write(l4_alog *a, const char *p, size_t n) {
        size_t pos = 0;
        off_t torn_end = -1;  /* a short write's: the file's size after it */
        while (pos < n) {
            size_t end = n - pos > L4_LINE_MAX ? pos + L4_LINE_MAX : n;
            if (end < n) {
                const char *nl = memrchr(p + pos, '\\n', end - pos);
                if (nl != NULL) end = (size_t)(nl - p) + 1;
            }
            while (pos < end) {
                ssize_t w = write(a->fd, p + pos, end - pos);
                if (w > 0) {
                    pos += (size_t)w;
                    torn_end = pos < end ? l4_alog_file_size(a->fd) : -1;
                    continue;
                }
                if (w == 0) errno = EIO;  /* (nothing written: not a loop that spins) */
                else if (errno == EINTR) continue;
                if (errno == EAGAIN) {  /* a non-blocking fd: wait for room */
                    int stop;
                    pthread_mutex_lock(&a->lock);
                    stop = a->stop;
                    pthread_mutex_unlock(&a->lock);
                    if (!stop) {
                        struct pollfd pf = {a->fd, POLLOUT, 0};
                        poll(&pf, 1, 100);
                        continue;
                    }
                }
                int err = errno;
                if (torn_end >= 0) pos = l4_alog_cut(a, p, pos, torn_end);
                l4_alog_lost(a, p + pos, n - pos, err);
                return;
            }
        }
    }

    static void l4_alog_switch(l4_alog *a) {  /* (a->lock held, no write under way) */
        dup3(a->reopen_fd, a->fd, O_CLOEXEC);
        close(a->reopen_fd);
        a->reopen_fd = -1;
    }

    static void l4_alog_free(l4_alog *a) {
        if (a->reopen_fd >= 0) close(a->reopen_fd);
        close(a->fd);
        pthread_mutex_destroy(&a->lock);
        pthread_cond_destroy(&a->wake);
        pthread_cond_destroy(&a->idle);
        free(a->fill);
        free(a->spare);
        free(a);
    }

    static void *l4_alog_run(void *arg) {
        l4_alog *a = (l4_alog *)arg;
        sigset_t all;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, NULL);  /* (signals are the main thread's) */
        pthread_mutex_lock(&a->lock);
        for (;;) {
            if (!a->fill_len) {
                struct timespec ts;
                if (a->stop) break;
                l4_deadline(&ts, 0.1);
                pthread_cond_timedwait(&a->wake, &a->lock, &ts);
                continue;
            }
            char *batch = a->fill;
            size_t n = a->fill_len;
            a->fill = a->spare;
            a->fill_len = 0;
            a->spare = batch;
            a->writing = 1;
            a->batches += 1;
            size_t split = (a->reopen_fd >= 0 && a->batches == a->reopen_after) ? a->reopen_split : 0;
            pthread_mutex_unlock(&a->lock);
            if (split > 0 && split < n) {  /* a reopen came while this batch was filled */
                l4_alog_write(a, batch, split);
                pthread_mutex_lock(&a->lock);
                if (a->reopen_fd >= 0) l4_alog_switch(a);
                pthread_mutex_unlock(&a->lock);
                l4_alog_write(a, batch + split, n - split);
            } else {
                l4_alog_write(a, batch, n);
            }
            pthread_mutex_lock(&a->lock);
            a->writing = 0;
            if (a->reopen_fd >= 0 && a->batches >= a->reopen_after) l4_alog_switch(a);
            pthread_cond_broadcast(&a->idle);
        }
        a->running = 0;
        int orphan = a->orphan;
        pthread_cond_broadcast(&a->idle);
        pthread_mutex_unlock(&a->lock);
        if (orphan) l4_alog_free(a);
        return NULL;
    }

    static l4_alog *l4_alog_new(int fd, size_t cap) {
        pthread_condattr_t ca;
        l4_alog *a = (l4_alog *)calloc(1, sizeof(l4_alog));
        if (a == NULL) return NULL;
        a->fd = fd;
        a->reopen_fd = -1;
        a->cap = cap < L4_LINE_MAX ? L4_LINE_MAX : cap;
        a->fill = (char *)malloc(a->cap);
        a->spare = (char *)malloc(a->cap);
        if (a->fill == NULL || a->spare == NULL) goto fail;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_mutex_init(&a->lock, NULL);
        pthread_cond_init(&a->wake, &ca);
        pthread_cond_init(&a->idle, &ca);
        pthread_condattr_destroy(&ca);
        a->running = 1;
        if (pthread_create(&a->thread, NULL, l4_alog_run, a) == 0) return a;
        pthread_mutex_destroy(&a->lock);
        pthread_cond_destroy(&a->wake);
        pthread_cond_destroy(&a->idle);
    fail:
        free(a->fill);
        free(a->spare);
        free(a);
        return NULL;
    }

    static int l4_alog_push(l4_alog *a, const char *p, size_t n) {
        int r = 0;
        pthread_mutex_lock(&a->lock);
        if (a->stop || a->fill_len + n > a->cap) {
            a->dropped += 1;
            r = -1;
        } else {
            memcpy(a->fill + a->fill_len, p, n);
            a->fill_len += n;
            a->lines += 1;
            if (a->fill_len >= a->cap / 2) pthread_cond_signal(&a->wake);
        }
        pthread_mutex_unlock(&a->lock);
        return r;
    }

    /* Write to fd's file from now on (a duplicate of fd; fd stays the
       caller's): the lines pushed so far still go to the file open now
       (the writer switches after the batch that holds them), so a log
       rotated by renaming keeps every line of its period. -1: closed, or
       no fd to spare (errno). */
    static int l4_alog_reopen(l4_alog *a, int fd) {
        int nfd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
        if (nfd < 0) return -1;
        pthread_mutex_lock(&a->lock);
        if (a->stop) {
            pthread_mutex_unlock(&a->lock);
            close(nfd);
            errno = EBADF;
            return -1;
        }
        if (a->reopen_fd >= 0) close(a->reopen_fd);  /* (a later reopen wins) */
        a->reopen_fd = nfd;
        a->reopen_after = a->batches + (a->fill_len ? 1 : 0);
        /* (lines pushed after this one, into the same buffer before the
           writer takes it, are the new file's) */
        a->reopen_split = a->fill_len;
        if (!a->writing && !a->fill_len) l4_alog_switch(a);
        else pthread_cond_signal(&a->wake);
        pthread_mutex_unlock(&a->lock);
        return 0;
    }

    /* Wait (at most timeout s) until what is buffered was written: 1 when it was. */
    static int l4_alog_flush(l4_alog *a, double timeout) {
        struct timespec ts;
        int r;
        l4_deadline(&ts, timeout);
        pthread_mutex_lock(&a->lock);
        pthread_cond_signal(&a->wake);
        while ((a->fill_len || a->writing) && a->running)
            if (pthread_cond_timedwait(&a->idle, &a->lock, &ts) == ETIMEDOUT) break;
        r = !(a->fill_len || a->writing);
        pthread_mutex_unlock(&a->lock);
        return r;
    }

    /* Flush (within timeout), stop the thread, close the fd, free: 1; 0 when
       the thread is still in a write() that does not return (a pipe whose
       reader stopped): then it frees all itself if that write ever ends
       (the orphan), and the caller forgets a. */
    static int l4_alog_close(l4_alog *a, double timeout) {
        struct timespec ts;
        pthread_t thread = a->thread;
        int done, flushed = l4_alog_flush(a, timeout);
        l4_deadline(&ts, flushed ? 0.5 : 0.0);
        pthread_mutex_lock(&a->lock);
        a->stop = 1;
        pthread_cond_signal(&a->wake);
        while (a->running)
            if (pthread_cond_timedwait(&a->idle, &a->lock, &ts) == ETIMEDOUT) break;
        done = !a->running;
        if (!done) a->orphan = 1;
        pthread_mutex_unlock(&a->lock);
        if (!done) {
            pthread_detach(thread);
            return 0;
        }
        pthread_join(thread, NULL);
        l4_alog_free(a);
        return 1;
    }

    /* A line from its 24 values (accesslog.JSON_KEYS' order; n 0: absent;
       numbers as text), as accesslog.format_line() writes it: Istio's TEXT
       format, or its JSON keys (numbers as numbers, absent as null). The
       separators are literals (their sizes known here: copied inline); at
       most L4_LINE_MAX bytes (the values' caps). */
    typedef struct { const char *p; int n; } l4_val;

    static inline char *l4_put(char *o, const char *p, int n) {
        memcpy(o, p, (size_t)n);
        return o + n;
    }

    static int l4_log_line(char *out, int json, const l4_val *v) {
        char *o = out;
    #define L4_LIT(s) (memcpy(o, s, sizeof(s) - 1), o += sizeof(s) - 1)
    #define L4_VAL(i) (v[i].n > 0 ? (o = l4_put(o, v[i].p, v[i].n)) : (*o++ = '-', o))
    #define L4_STR(i) (v[i].n > 0 ? (*o++ = '"', o = l4_put(o, v[i].p, v[i].n), *o++ = '"', o) \
                                  : (memcpy(o, "null", 4), o += 4))
    #define L4_NUM(i) (o = l4_put(o, v[i].p, v[i].n))
        if (json) {
            L4_LIT("{\\"start_time\\":"); L4_STR(0);
            L4_LIT(",\\"method\\":"); L4_STR(1);
            L4_LIT(",\\"path\\":"); L4_STR(2);
            L4_LIT(",\\"protocol\\":"); L4_STR(3);
            L4_LIT(",\\"response_code\\":"); L4_NUM(4);
            L4_LIT(",\\"response_flags\\":"); L4_STR(5);
            L4_LIT(",\\"response_code_details\\":"); L4_STR(6);
            L4_LIT(",\\"connection_termination_details\\":"); L4_STR(7);
            L4_LIT(",\\"upstream_transport_failure_reason\\":"); L4_STR(8);
            L4_LIT(",\\"bytes_received\\":"); L4_NUM(9);
            L4_LIT(",\\"bytes_sent\\":"); L4_NUM(10);
            L4_LIT(",\\"duration\\":"); L4_NUM(11);
            L4_LIT(",\\"upstream_service_time\\":"); L4_STR(12);
            L4_LIT(",\\"x_forwarded_for\\":"); L4_STR(13);
            L4_LIT(",\\"user_agent\\":"); L4_STR(14);
            L4_LIT(",\\"request_id\\":"); L4_STR(15);
            L4_LIT(",\\"authority\\":"); L4_STR(16);
            L4_LIT(",\\"upstream_host\\":"); L4_STR(17);
            L4_LIT(",\\"upstream_cluster\\":"); L4_STR(18);
            L4_LIT(",\\"upstream_local_address\\":"); L4_STR(19);
            L4_LIT(",\\"downstream_local_address\\":"); L4_STR(20);
            L4_LIT(",\\"downstream_remote_address\\":"); L4_STR(21);
            L4_LIT(",\\"requested_server_name\\":"); L4_STR(22);
            L4_LIT(",\\"route_name\\":"); L4_STR(23);
            L4_LIT("}\\n");
        } else {
            L4_LIT("["); L4_VAL(0); L4_LIT("] \\""); L4_VAL(1); L4_LIT(" "); L4_VAL(2);
            L4_LIT(" "); L4_VAL(3); L4_LIT("\\" "); L4_VAL(4); L4_LIT(" "); L4_VAL(5);
            L4_LIT(" "); L4_VAL(6); L4_LIT(" "); L4_VAL(7); L4_LIT(" \\""); L4_VAL(8);
            L4_LIT("\\" "); L4_VAL(9); L4_LIT(" "); L4_VAL(10); L4_LIT(" "); L4_VAL(11);
            L4_LIT(" "); L4_VAL(12); L4_LIT(" \\""); L4_VAL(13); L4_LIT("\\" \\""); L4_VAL(14);
            L4_LIT("\\" \\""); L4_VAL(15); L4_LIT("\\" \\""); L4_VAL(16); L4_LIT("\\" \\"");
            L4_VAL(17); L4_LIT("\\" "); L4_VAL(18); L4_LIT(" "); L4_VAL(19); L4_LIT(" ");
            L4_VAL(20); L4_LIT(" "); L4_VAL(21); L4_LIT(" "); L4_VAL(22); L4_LIT(" ");
            L4_VAL(23); L4_LIT("\\n");
        }
    #undef L4_LIT
    #undef L4_VAL
    #undef L4_STR
    #undef L4_NUM
        return (int)(o - out);
    }

    /* lines, dropped, write errors, the first write error's errno */
    static void l4_alog_counts(l4_alog *a, int64_t *out) {
        pthread_mutex_lock(&a->lock);
        out[0] = a->lines;
        out[1] = a->dropped;
        out[2] = a->errors;
        out[3] = a->first_errno;
        pthread_mutex_unlock(&a->lock);
    }

    static double l4_wall_s(void) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }

    /* START_TIME, accesslog.time_text()'s twin: 24 bytes */
    static int l4_time_text(char *out, double wall) {
        int64_t ms = (int64_t)(wall * 1000);
        time_t sec = (time_t)(ms / 1000);
        struct tm tm;
        size_t n;
        gmtime_r(&sec, &tm);
        n = strftime(out, 32, "%Y-%m-%dT%H:%M:%S", &tm);
        return (int)n + snprintf(out + n, 8, ".%03dZ", (int)(ms % 1000));
    }

    /* the IMF-fixdate of second sec (_exchange_py.http_date()'s: RFC 9110
       5.6.7, English names whatever the locale): 29 bytes at out, no NUL */
    static void l4_http_date(char *out, int64_t sec) {
        static const char days[7][4] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
        static const char months[12][4] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
        char text[64];
        time_t t = (time_t)sec;
        struct tm tm;
        gmtime_r(&t, &tm);
        snprintf(text, sizeof text, "%s, %02d %s %04d %02d:%02d:%02d GMT", days[tm.tm_wday % 7],
                 tm.tm_mday, months[tm.tm_mon % 12], tm.tm_year + 1900, tm.tm_hour, tm.tm_min,
                 tm.tm_sec);
        memcpy(out, text, 29);
    }

    /* "ip:port", "[ip6]:port" (an IPv4-mapped one as IPv4), at most 63
       bytes; 0 for another family */
    static int l4_sa_text(char *out, const void *addr) {
        const struct sockaddr *sa = (const struct sockaddr *)addr;
        char host[INET6_ADDRSTRLEN];
        if (sa->sa_family == AF_INET) {
            const struct sockaddr_in *s = (const struct sockaddr_in *)addr;
            inet_ntop(AF_INET, &s->sin_addr, host, sizeof host);
            return snprintf(out, 64, "%s:%u", host, (unsigned)ntohs(s->sin_port));
        }
        if (sa->sa_family == AF_INET6) {
            const struct sockaddr_in6 *s = (const struct sockaddr_in6 *)addr;
            if (IN6_IS_ADDR_V4MAPPED(&s->sin6_addr)) {
                inet_ntop(AF_INET, s->sin6_addr.s6_addr + 12, host, sizeof host);
                return snprintf(out, 64, "%s:%u", host, (unsigned)ntohs(s->sin6_port));
            }
            inet_ntop(AF_INET6, &s->sin6_addr, host, sizeof host);
            return snprintf(out, 64, "[%s]:%u", host, (unsigned)ntohs(s->sin6_port));
        }
        return 0;
    }

    static int l4_ep_text(char *out, int v6, uint32_t addr, const unsigned char *addr6,
                          uint16_t port) {
        struct sockaddr_in sa;
        struct sockaddr_in6 sa6;
        if (v6) {
            memset(&sa6, 0, sizeof sa6);
            sa6.sin6_family = AF_INET6;
            memcpy(&sa6.sin6_addr, addr6, 16);
            sa6.sin6_port = port;
            return l4_sa_text(out, &sa6);
        }
        memset(&sa, 0, sizeof sa);
        sa.sin_family = AF_INET;
        sa.sin_addr.s_addr = addr;
        sa.sin_port = port;
        return l4_sa_text(out, &sa);
    }
    """
    ctypedef struct l4_alog:
        pass
    ctypedef struct l4_val:
        const char *p
        int n
    int log_line "l4_log_line"(char *out, int json, const l4_val *v) nogil
    l4_alog *alog_new "l4_alog_new"(int fd, size_t cap) nogil
    int alog_push "l4_alog_push"(l4_alog *a, const char *p, size_t n) nogil
    int alog_flush "l4_alog_flush"(l4_alog *a, double timeout) nogil
    int alog_reopen "l4_alog_reopen"(l4_alog *a, int fd) nogil
    int alog_close "l4_alog_close"(l4_alog *a, double timeout) nogil
    void alog_counts "l4_alog_counts"(l4_alog *a, int64_t *out) nogil
    double wall_s "l4_wall_s"() nogil
    int time_text "l4_time_text"(char *out, double wall) nogil
    void http_date "l4_http_date"(char *out, int64_t sec) nogil
    int sa_text "l4_sa_text"(char *out, const void *addr) nogil
    int ep_text "l4_ep_text"(char *out, int v6, uint32_t addr, const unsigned char *addr6,
                             uint16_t port) nogil
    int getsockname(int fd, sockaddr *addr, sys_.socklen_t *len) nogil

cdef enum:
    LOG_ADDR = 64          # an address's text (l4_sa_text's)
    LOG_LINE = 4096        # accesslog.LINE_MAX: a line is one write()
    # the head's values a request's line says (LogReq.n, .off), escaped
    LH_METHOD = 0
    LH_PATH = 1
    LH_PROTOCOL = 2
    LH_XFF = 3
    LH_UA = 4
    LH_RID = 5
    LH_AUTHORITY = 6
    N_LH = 7
    LOG_HEAD = 2240        # their caps (accesslog.CAPS) summed, at least
    LOG_SPANS = 16         # a header's lines joined (more: not read)

# the access log's bits (accesslog's: one source)
cdef uint32_t LF_UH = _accesslog.UH
cdef uint32_t LF_UT = _accesslog.UT
cdef uint32_t LF_UF = _accesslog.UF
cdef uint32_t LF_UC = _accesslog.UC
cdef uint32_t LF_UO = _accesslog.UO
cdef uint32_t LF_DI = _accesslog.DI
cdef uint32_t LF_FI = _accesslog.FI
cdef uint32_t LF_DC = _accesslog.DC
cdef uint32_t LF_URX = _accesslog.URX
cdef uint32_t LF_SI = _accesslog.SI
cdef uint32_t LF_DPE = _accesslog.DPE
cdef uint32_t LF_UPE = _accesslog.UPE
cdef uint32_t LF_OM = _accesslog.OM
cdef uint32_t LF_FLAGS = _accesslog.FLAGS
cdef uint32_t LF_LOCALV = _accesslog.LOCAL_VERDICT
cdef uint32_t LF_CUT = _accesslog.CUT
cdef uint32_t LF_LOCAL_CUT = _accesslog.LOCAL_CUT
cdef uint32_t LF_ROUTE_TO = _accesslog.ROUTE_TIMEOUT  # (with UT: no URX, row_flags())
cdef bytes _DRAIN_CUT = _accesslog.DRAIN_CUT.encode()  # (kept: LOG_DRAIN_CUT points into it)
cdef const char *LOG_DRAIN_CUT = _DRAIN_CUT
cdef uint32_t LF_PATH = _accesslog.PATH_REFUSED
cdef uint32_t LF_RETRIED = _accesslog.RETRIED_FAILURES
# a metrics row's LF_LOCALV (row_key(): the flags in 16 bits, above the 15 flags)
cdef uint32_t RF_LOCALV = 1 << 15
assert _accesslog.FLAGS < RF_LOCALV, "the response flags no longer fit a row's key"
cdef int N_FLAG_NAMES = len(_accesslog.FLAG_NAMES)
cdef int CAP_LH[N_LH]
CAP_LH[:] = [_accesslog.CAPS[k] for k in ("method", "path", "protocol", "x_forwarded_for",
                                          "user_agent", "request_id", "authority")]
if sum(CAP_LH) > LOG_HEAD:
    raise ImportError("LOG_HEAD is less than accesslog.CAPS' head values")

cdef struct LogTag_:
    # what a tag's lines say (accesslog.TagLog, its values escaped as a
    # line has them; one block): per tag id (Relay.log_tags)
    uint32_t flags         # its local answer's (NR)
    int cluster_len        # 0: absent
    int route_len
    int details_len
    char *cluster
    char *route
    char *details

cdef struct LogReq:
    # the current request's, from log_capture() to log_done() (malloc'd
    # for a connection's first, kept till it is freed)
    double wall            # its start, wall clock
    int64_t cl             # its Content-Length (-1: none, or chunked)
    bint open              # a request's, not logged yet
    int up_len             # UPSTREAM_HOST of a try given up (0: none)
    char up[LOG_ADDR]
    int off[N_LH]          # each head value's bytes in head, escaped (n 0: absent)
    int n[N_LH]
    char head[LOG_HEAD]

cdef struct LogConn:
    # a client connection's, while the access log is on (Conn.lg)
    bint asked             # local and remote asked (once)
    int local_len
    int remote_len
    char local[LOG_ADDR]   # DOWNSTREAM_LOCAL_ADDRESS: its origin's, else getsockname
    char remote[LOG_ADDR]  # DOWNSTREAM_REMOTE_ADDRESS
    LogReq *req


# -- state ------------------------------------------------------------------

cdef struct Buf:
    char *p                # the bytes: p[0:len]
    size_t len
    size_t cap             # of the block, which begins off bytes before p
    size_t off             # dropped from the front (buf_drop), not moved yet

cdef struct Up
cdef struct Conn
cdef struct Fwd_
cdef struct Head

cdef struct EP:
    # one upstream endpoint: its pool of idle connections (newest first)
    uint32_t addr          # network order (IPv4)
    uint16_t port          # network order
    bint numeric           # False: a name not resolved yet (connects fail)
    bint v6                # an IPv6 address, in addr6
    unsigned char addr6[16]
    int index              # in Relay.eps
    int64_t answer_seen    # Relay.failures_seen at its last answer reported; 0: none
    int64_t active         # checked-out connections, connecting ones too (LEAST_REQUEST's count)
    int64_t ext            # ... and the endpoint's others (add_external; atomic, see ep_load)
    int n_idle
    Up *idle_head
    Up *idle_tail
    # its pool and connect settings: the relay's (Relay's own fields), or
    # endpoint_settings()' for it (set by the loop's thread: _ep_settings)
    int max_requests       # per connection; 0: unlimited
    double pool_idle_timeout
    double connect_timeout
    bint report_5xx        # its answers of 500 to 599 go to answered_5xx (OD_5XX)
    # circuit breakers (0: unlimited; see "Circuit breakers")
    int max_connections    # open connections: checked out, connecting, idle (n_open)
    int max_pending        # requests waiting for one (pend_head ..., n_pending)
    int max_active         # requests in flight (active)
    int n_open
    int64_t n_pending      # (pending() reads it)
    Conn *pend_head        # waiting requests, oldest first (Conn.pend_*)
    Conn *pend_tail
    int64_t overflows      # the breakers' 503s (atomic: overflows() reads it)
    bint kicked            # in Relay.kick_head's list: its waiting ones may go
    EP *kick_next
    int log_len            # the access log's text of it ("ip:port"; 0: not made yet)
    char log_text[LOG_ADDR]

cdef struct Up:
    int kind               # K_UP
    int fd
    uint32_t mask
    EP *ep
    Conn *owner            # NULL while idle
    Buf out
    bint connecting
    bint reused
    bint closed
    bint send_failed       # a send to it failed (a reset): never pooled
    bint peer_closed       # its FIN came (EPOLLRDHUP): never pooled
    bint sent              # the kernel took a byte of the current request
    bint removed           # its endpoint left the route table: closed at check-in
    int requests
    int local_len          # the access log's UPSTREAM_LOCAL_ADDRESS, once asked (0: not)
    char local[LOG_ADDR]
    double idle_since
    double deadline        # connect deadline
    Up *idle_prev
    Up *idle_next
    Up *grave_next

cdef struct Verdict_
cdef struct Edits_

cdef struct HashOn_:
    # a LB_HASH choice's verdict.HashOn (see "Consistent hashing"): one
    # block, this, then the endpoints' hashes, then its bytes; freed with
    # its choice (verdict_free)
    int kind               # HK_*
    const char *name       # a header's (lowercase), a cookie's or a query parameter's
    Py_ssize_t name_len
    uint64_t *ep_hash      # endpoint_hash() of each of the choice's eps, in order
    const char *ck_pre     # ttl set: the set-cookie line before the generated value
    size_t ck_pre_len      # (NULL: no ttl, a random key for a request without one)
    const char *ck_post    # ... and after it (its CR LF included)
    size_t ck_post_len

cdef struct Session_:
    # a route verdict's verdict.SessionPersistence (see "Session
    # persistence"): one block, this, then the tokens' offsets, then each
    # choice's first token's index, then its bytes; freed with its verdict
    int kind               # SK_*
    const char *name       # the cookie's name, or the header's (lowercase)
    Py_ssize_t name_len
    const char *pre        # the token's line before the token ("set-cookie: sid=\"")
    size_t pre_len
    const char *post       # ... and after it (its CR LF included)
    size_t post_len
    Py_ssize_t *tok        # the tokens of every choice's endpoints, in order: offsets
                           # in bytes (tok[k] to tok[k + 1])
    int *first             # per choice, the index in tok of its first endpoint's
    const char *bytes

cdef struct Sess_:
    # a request's session persistence (see "Session persistence"), from
    # pick() to its exchange's end: one block, this, then its bytes; the
    # Conn's (c.holds)
    EP *pinned             # the candidate the request's token named (NULL: none)
    int n
    EP *ep[MAX_ATTEMPTS]   # its candidates (as pick() made them), each with its token
    const char *tok[MAX_ATTEMPTS]
    size_t tok_len[MAX_ATTEMPTS]
    const char *pre        # the token line's bytes (Session_'s)
    size_t pre_len
    const char *post
    size_t post_len
    const char *drop       # a header token's name: the upstream head's lines of it go
    Py_ssize_t drop_len    # (0: a cookie's, added)

cdef struct Retry_:
    # a route's retry policy (verdict.RetryPolicy), interned: one per
    # distinct policy, freed by a sweep once nothing refers to it (refs;
    # see "Retry policy")
    Py_ssize_t refs        # the verdicts pointing at it, and the Conns under it
    int attempts
    double per_try         # seconds; 0: none
    double backoff         # the base interval before a retry, seconds (backoff_delay)
    double backoff_max     # ... and the longest wait
    uint32_t on            # RT_*
    uint64_t codes[8]      # RT_STATUS_CODES: bit (status - 100), 100..611
    bint ignore_prev       # a retry prefers another endpoint (retry_order); else cand as drawn
    bint on_connect        # it retries a failed connect (RetryPolicy.on_connect: a
                           # try of its each, connect_failed_next; URX on UF)

cdef struct Choice_:
    uint32_t weight
    int policy
    int tag
    int rr                 # round-robin counter slot
    int n_eps
    EP **eps
    Verdict_ *empty        # the answer when it has no endpoint
    Edits_ *edits          # its requests' and responses' head edits (NULL: none); interned
    HashOn_ *hash          # LB_HASH: what it hashes (owned)
    int *ep_tags           # a tag id per endpoint, parallel to eps (owned; NULL: every
                           # request takes tag, the common case; see "Tags per endpoint")

cdef struct Fault_:
    # a route's fault injection (verdict.Fault), interned per distinct
    # fault as Retry_ is: a delayed Conn points at its answer past its verdict
    Py_ssize_t refs        # the verdicts pointing at it, and the Conns it delays
    double delay           # seconds (0: none)
    uint64_t delay_ppm     # of FAULT_SCALE
    uint64_t abort_ppm
    Verdict_ *answer       # the abort's (V_LOCAL, its status, FAULT_ABORT_BODY)

cdef struct Mirror_:
    # a route's verdict.Mirror (see "Request mirroring"), part of its verdict
    uint64_t ppm           # of FAULT_PPM (MIRROR_SCALE is FAULT_SCALE)
    int rr                 # round-robin counter slot
    int tag                # Mirror.tag's id: its copies' reports (_sweep_tags marks it)
    int n_eps
    EP **eps
    int *ep_tags           # a tag id per endpoint (owned; NULL: its copies take tag)

cdef struct Dest_:
    # a drawn copy's endpoint, its address copied (the EP may be freed first)
    uint32_t addr          # network order
    uint16_t port
    bint v6
    bint usable            # False: the mirror had no endpoint to use (dropped)
    int tag                # its Mirror_'s (the verdict may be freed first)
    unsigned char addr6[16]

cdef struct Plan_:
    # a request's drawn copies, until it was read whole and sent (one block)
    int n
    size_t head_len        # c.replay[:head_len] is the head as sent
    double timeout         # each copy's deadline from its connect
    Dest_ *d

cdef struct Shadow:
    # a copy in flight (Relay.shadows), or an idle connection of the copies'
    # pool (idle: in its SEP's list, newest first); never the routes' pool
    int kind               # K_SHADOW
    int fd
    uint32_t mask
    bint connecting
    bint closed
    bint idle              # idle, watched: any event evicts it (the server closed it)
    bint reused            # on an idle connection: failing before any answer byte retries
    bint keep              # its connection may go back idle at its answer's end
    bint head_req          # a HEAD's copy: no body after its final head
    bint removed           # its endpoint left the route table: closed at its end, never idle
    Buf out                # its bytes, whole while a retry may send them again (reused)
    size_t sent            # ... how many went
    Buf inb                # its answer's heads, until the final one is whole
    size_t inb_clean       # sh.inb[:inb_clean] holds no end of a head (see head_end_in())
    int framing            # its answer's body (F_*) once its final head came; SF_HEAD before
    int64_t left           # F_LENGTH: body bytes still to come
    Chunked k              # F_CHUNKED: the chunked machine
    int64_t got            # answer bytes read and thrown away (MIRROR_READ at most)
    double deadline
    double started         # its start (the connection taken): its report's duration from there
    double idle_since      # idle: since when (expired after the pool idle timeout)
    Dest_ d                # its endpoint: its copies' pool's key
    int tag                # its Mirror's: reported with its status at its end (shadow_end)
    int status             # its answer's first final head's (0: none yet, or not HTTP/1.x)
    unsigned char answer   # AS_*: how far answer_scan() read
    unsigned char text_len # AS_STATUS: the bytes of text so far
    unsigned char in_line  # AS_HEAD: the current line has a byte but CR
    char text[STATUS_LINE] # AS_STATUS: a head's first bytes
    Shadow *prev           # (Relay.shadows in flight; its SEP's idle list when idle)
    Shadow *next
    Shadow *grave_next

cdef struct SEP:
    # an endpoint of the copies' pool, while it has idle connections
    # (Relay.seps; freed with its last): its address, the idle ones
    Dest_ d
    int n_idle
    Shadow *idle_head      # the newest: handed out first
    Shadow *idle_tail      # the oldest: expired first

cdef struct Verdict_:
    int kind
    int n
    Choice_ *choices
    uint64_t total
    int status
    int tag
    uint32_t lflags        # V_LOCAL: the access log's bits of its answer (LF_*)
    Fault_ *fault          # V_ROUTE: the route's fault injection (NULL: none); interned
    char *keep             # the local answer when the connection stays
    size_t keep_len
    char *keep10           # ... the same to an HTTP/1.0 client ("connection: keep-alive")
    size_t keep10_len
    char *close            # ... when it closes
    size_t close_len
    double timeout         # V_ROUTE: the route's timeout, seconds (0: none)
    Retry_ *retry          # V_ROUTE: the route's retry policy (NULL: none); interned
    int n_mirrors          # V_ROUTE: its mirrors (owned)
    Mirror_ *mirrors
    Session_ *session      # V_ROUTE: its session persistence (owned; NULL: none)
    bint decided           # V_LOCAL: a route's answer (Verdict.decided): a decision row

cdef struct Test_:
    int kind               # T_*
    int key                # T_HEADER_*: the key header's index
    size_t len
    const char *value

cdef struct Tests_:        # one block: this, the tests, their values
    int n
    Test_ *t

cdef struct Entry:
    uint64_t hash
    char *key
    size_t key_len
    Verdict_ *v            # NULL: a shape entry (origin, Host) -> shape
    Tests_ *tests          # a shape entry's tests (SHAPE_TESTS), owned
    int shape              # ... or an origin's class entry: OC_*
    uint32_t origin        # an origin's class entry: its origin id
    double expires
    int64_t epoch
    char *line             # a verdict entry's: the method SP target of a head that found
    uint32_t line_len      # it while R.cache_gen was line_gen (malloc'ed, line_cap bytes;
    uint32_t line_cap      # last_verdict())
    uint64_t line_gen
    unsigned char asked    # expired, and one request went to Python for it

cdef struct Conn:
    # (sized for 10k idle connections: the wide fields first, the states and
    # flags as bytes at the end)
    int kind               # K_CONN
    int fd
    uint32_t mask
    uint32_t origin
    int requests           # request heads completed on this connection
    int tag
    int status
    int idx                # in Relay.conns
    int fail_errno         # N_CONNECT_FAILED: why
    int pipe_r             # splicing: the body's pipe
    int pipe_w
    int pipe_cap
    int rhead_clean        # c.rhead[:rhead_clean] holds no end of a head (see head_end_in())
    uint32_t lflags        # the access log's bits of the current request (LF_*)
    LogConn *lg            # the access log's (NULL: it is off)
    Fwd_ *fwd              # a gateway listener's forwarding headers (NULL: none; fwd_conn())
    Entry *last_shape      # the last cache hit's shape entry and verdict entry
    Entry *last_verdict    # (NULL: none), valid while R.cache_gen is last_gen
    uint64_t last_gen      # (last_verdict())
    Buf inb                # client bytes not consumed; a head starts at 0
    Buf out                # to the client
    Scanner s
    Up *up
    # the current request
    size_t head_len
    int64_t req_left       # request body bytes still to forward (REQ_CHUNKED: until rck ends)
    Chunked *rck           # a chunked request body's machine (allocated for it)
    int64_t req_chunked    # ... its bytes taken (the access log's BYTES_RECEIVED)
    int64_t resp_left
    Chunked ck
    Buf rhead              # response bytes before the final head is complete
    int64_t up_bytes       # response bytes received for this request
    int64_t client_bytes   # response bytes forwarded to the client
    Buf replay             # bytes sent upstream, while a retry may resend them
    int64_t piped          # splicing: bytes in the pipe, not yet sent to the client
    EP *cand[MAX_ATTEMPTS]
    int cand_tag[MAX_ATTEMPTS]  # c.mixed: each candidate's tag id, parallel to cand
    double started
    double head_started    # 0: no head pending
    double last_active
    double fault_until     # a fault's delay: when it ends (0: none; fault_drawn())
    Fault_ *fault          # ... the fault, a reference held till then (fault_forget)
    Verdict_ *fault_answer # ... and the abort's answer then (NULL: the request goes),
                           # or the local answer's copy (fault_local; owned)
    double closing         # lingering-close deadline; 0: not closing
    double drain_at        # a drain closes it then if between requests (0: no; drain_due)
    double timeout         # the current request's route timeout (0: none)
    double resp_deadline   # ... when it passes: set once the request is read whole
    Retry_ *retry          # the current request's retry policy (NULL: none)
    Edits_ *edits          # ... its choice's head edits (NULL: none; set by pick())
    char *set_cookie       # ... its final response head's generated cookie line (owned;
    size_t set_cookie_len  #     NULL: none; set by pick())
    Sess_ *sess            # ... its session persistence (owned; NULL: none; session_pin())
    double try_deadline    # ... the current try's per-try timeout, when it passes
    double backoff_until   # ... a retry waiting its backoff: when it connects (0: none)
    int tries              # ... the policy's retries so far (a failed connect's
                           #     under p.on_connect among them: connect_failed_next)
    int conn_fails         # ... its tries whose connect failed, moved on from, no
                           #     policy's (connect_failed_next; zeroed by conn_drop_held)
    Verdict_ *empty        # pick(): the chosen subset's answer when empty
    Plan_ *shadow          # the request's drawn copies, until they start (owned; c.holds)
    EP *fail_ep
    Conn *need_next
    Conn *grave_next
    EP *pend_ep            # waiting for a connection to it (max_connections); NULL: not
    Conn *pend_prev
    Conn *pend_next
    signed char phase
    signed char need
    signed char rs         # RS_*
    signed char framing
    signed char n_cand
    unsigned char keep_alive       # the head asks to keep the connection
    unsigned char http10           # ... and is HTTP/1.0
    unsigned char keeps_client     # the final response head as sent lets the client persist
    unsigned char sent_persistent
    unsigned char method_head
    unsigned char idempotent
    unsigned char client_eof
    unsigned char resp_persistent
    unsigned char resp_hop         # HOP_*: the final response head's hop-by-hop lines
    unsigned char splicing         # SPL_RESP, SPL_REQ: a body goes through the pipe
    unsigned char no_splice        # ... not in this exchange any more (splice_fallback)
    unsigned char replayable
    unsigned char replay_staged    # c.replay is yet the head staged in c.rhead (replay_unstage)
    unsigned char retried          # the request is being sent again (c.replay)
    unsigned char never_left       # a reused connection failed before the kernel took a byte
    unsigned char reuse_retried    # a policy's try (c.tries > 0) had its reused connection's retry
    unsigned char closed
    unsigned char solo             # accepted by this loop: no other fd shares its file
    unsigned char no_linger        # the client cannot send more: close, no lingering read
    unsigned char unwanted         # EPOLLIN fired while the client was not to be read
    unsigned char slow_after_flush # hand to the pure relay once c.out is sent (_to_slow)
    unsigned char uncounted        # a routed request not counted yet (request_done)
    unsigned char scanning         # in head_step()'s loop (a call from below returns)
    unsigned char fault_local      # c.fault_answer: a local answer's copy, freed with it
    unsigned char holds            # c.retry, c.edits, c.set_cookie or c.sess is set
                                   # (conn_drop_held)
    unsigned char edit_resp        # the final response head goes through send_edited_head
    unsigned char mixed            # the request's choice has a tag per endpoint (c.cand_tag)
    unsigned char gateway          # a gateway listener's connection (drain_conns: inbound)
    unsigned char draining         # no answer keeps the connection (see "Drain")
    unsigned char continued        # the relay said 100 Continue to this request (body_here_read;
                                   # c.holds set: conn_drop_held() clears it)
    signed char peer_len           # c.peer's length (conn_peer): 4, 16; 0: not asked yet,
    unsigned char peer[16]         #     -1: unknown (getpeername failed, not IP)
    uint16_t peer_port             # ... and its port (network order)

cdef struct Row:
    int tag
    uint32_t key           # row_key(): its status (0: a decision, count only; ST_NONE:
                           #     answered with no status) and its requests' response flags
    int64_t count
    double sum_s
    int64_t buckets[MAX_BUCKETS]

cdef struct Lst:
    # a listener whose connections this loop accepts (--http-routing request)
    int kind               # K_LST
    int fd
    uint32_t mask
    int index              # the worker's
    bint gateway           # its connections go to this relay, origin gw_origin
    uint32_t gw_origin
    bint removed
    double paused_until    # out of fds, or not listening: not watched until then
    int64_t accepted       # since the last report
    int einval             # accept() said EINVAL (it does not listen): 1 to say, 2 said

cdef struct Other:
    int fd
    int lst
    uint32_t addr          # the original destination (network order); 0: none
    uint16_t port          # network order

cdef struct Handoff:
    int fd
    uint32_t origin
    char *data
    size_t len
    char *local            # the access log's DOWNSTREAM_LOCAL_ADDRESS (NULL: ask the fd)
    int local_len
    bint gateway           # a gateway listener's connection (its origin's .gateway)
    sockaddr_storage peer  # the client's address, accept()'s (add()'s peer)
    sys_.socklen_t peer_n  # ... its length (0: none given: asked of the fd)
    Handoff *next

cdef struct Span:  # bytes of a head
    const unsigned char *p
    Py_ssize_t n


cdef struct Edits_:
    # a choice's head edits (verdict.HeadEdits, as edit_bytes() in
    # _exchange_py.py has them), interned as Retry_ is: one block, this,
    # then its names' spans, then its bytes (see "Head edits")
    Py_ssize_t refs        # the choices pointing at it, and the Conns under it
    bint request           # a request head changes
    bint response          # a final response head changes
    int n_req_drop
    Span *req_drop         # lowercase names whose request lines go
    const char *req_lines  # added before a request head's empty line
    size_t req_lines_len
    int n_resp_drop
    Span *resp_drop        # ... a final response head's
    const char *resp_lines
    size_t resp_lines_len
    bint path              # the target's path rewritten: its first strip bytes
    Py_ssize_t strip       # (-1: all of it) replaced by prefix
    const char *prefix
    size_t prefix_len
    const char *authority  # the Host lines' value (NULL: as they are)
    size_t authority_len


# -- heads seen before ------------------------------------------------------------
#
# A server answers a keep-alive connection's requests with the same head,
# byte for byte, mostly: nginx's five lines differ from one answer to the
# next only in their Date, once a second. response_head() judges a head
# line by line (~800 instructions for nginx's); a head whose bytes are
# those of a head judged before gets the same verdict, since the verdict
# of a complete head is made of its bytes alone (the lines up to the empty
# line that ends it, and R.max_head, fixed at creation) but for what the
# request adds after (a HEAD's framing: head_facts()). So upstream_bytes()
# keeps the last final head (1) it judged for an endpoint, up to
# MEMO_HEAD_MAX bytes, with what response_head() found in it (HeadMemo),
# and a response whose first bytes are those bytes, the empty line
# included, has that head: one memcmp(), no line judged. A head that
# differs costs the memcmp() to its first different byte and the copy of
# the new head. The slots are R.memo[MEMO_HEADS], one chosen by the
# endpoint's address (a hint only: a hit is a byte compare, whichever
# head a slot holds), so that the endpoints of a route answering with
# heads of their own do not replace each other's at every response. Only
# the loop's thread reads and writes them (upstream_bytes()).
cdef enum:
    MEMO_HEADS = 8
    MEMO_HEAD_MAX = 256

cdef struct HeadMemo:
    Py_ssize_t len         # head[:len] is the head (0: none kept)
    int status
    int tokens             # its Connection tokens (TOK_*, as response_head() keeps them)
    int n_cl               # Content-Length lines (0 or 1)
    long long cl
    bint v10
    bint te_chunked
    char head[MEMO_HEAD_MAX]


cdef struct Relay:
    int epfd
    int wakefd
    int sigfd              # take_stop_signals()'s signalfd (-1: none; see "Stop signals")
    bint stop_seen         # ... read: Python calls the worker back (the loop's)
    # fixed at creation (connect_timeout, pool_idle_timeout, max_requests:
    # the defaults, an EP's own are in it)
    double connect_timeout
    double header_timeout
    double idle_timeout
    int max_head
    # send_client_head()'s: the first fields a response's Connection names
    # (in the relay, not on the stack: final_head() on the fast path has
    # no array of its own, so no stack-protector canary)
    Span named[MAX_NAMED]
    Buf edited             # edit_request()'s head as it is built
    # edit_request() and send_edited_head(), called through these: never
    # inlined into apply_verdict() and final_head() (called once each, the
    # C compiler would, and every request would pay for their registers)
    int (*edit_request)(Relay *R, Conn *c, const Edits_ *e, double now) noexcept nogil
    int (*send_edited_head)(Relay *R, Conn *c, Py_ssize_t hl, bint keep) noexcept nogil
    void (*hash_pick)(Relay *R, Conn *c, const Choice_ *ch) noexcept nogil  # (pick()'s, as these)
    Choice_ *(*session_choice)(Relay *R, Conn *c, Verdict_ *v) noexcept nogil  # (pick()'s)
    void (*session_pin)(Relay *R, Conn *c, Verdict_ *v, const Choice_ *ch) noexcept nogil
    EP *sess_pin           # session_choice()'s: the endpoint the request's token named
    void (*mirror_draw)(Relay *R, Conn *c, Verdict_ *v) noexcept nogil  # (apply_verdict()'s)
    void (*mirror_start)(Relay *R, Conn *c, double now) noexcept nogil  # (request sent whole)
    char *bad_chunk[N_CHUNK_ERRORS]    # 400 answers to a chunked request body's errors
    size_t bad_chunk_len[N_CHUNK_ERRORS]
    int max_idle
    double pool_idle_timeout
    int max_requests
    bint decide_only       # no resolve(): ask Python for every request
    int n_buckets
    double bounds[MAX_BUCKETS]
    # guarded by lock
    sys_.pthread_mutex_t lock
    Handoff *q_head
    Handoff *q_tail
    bint stop
    int drain_req          # drain()'s scope and discourage()'s bit, as last asked (DRAIN_*)
    double drain_spread    # ... the seconds the drain asked last spreads its closes over
    bint flush_req         # flush_reports() waits for a flush
    bint py_req            # Python left work for the loop's thread (retain_endpoints,
                           # endpoint_settings)
    # loop thread
    char *scratch
    Lines lines            # head_step()'s scan's header lines (summarize())
    HeadMemo memo[MEMO_HEADS]  # upstream_bytes()'s last final heads (see "Heads seen before")
    Conn *need_head
    Conn *need_tail
    EP *kick_head          # endpoints whose waiting requests may go (serve_pending)
    Conn *cgrave
    Up *ugrave
    Shadow *sgrave
    Shadow *shadows        # the copies in flight (at most max_mirrors)
    int n_shadows
    int max_mirrors
    SEP **seps             # the copies' pool: endpoints with idle copy connections
    int n_seps
    int cap_seps
    EP **eps
    int n_eps
    int cap_eps
    uint64_t *rr
    int n_rr
    int cap_rr
    Entry *cache
    int cache_used
    int64_t cache_epoch
    uint64_t cache_gen     # bumped by every cache_put() and cache_clear()
    Row *rows
    int rows_used
    uint64_t rng
    uint64_t seed
    bint seeded            # reset rng to seed at each new table (_set_keys)
    int n_keys
    char *keys[MAX_KEY_HEADERS]
    int key_len[MAX_KEY_HEADERS]
    bint keys_overflow     # more names than keys: a verdict reading headers is not cached
    double next_tick
    double next_flush
    double next_timer      # the soonest of every Conn's backoff_until, resp_deadline
                           # and try_deadline, or earlier (0: none; timers_due())
    uint64_t jitter        # backoff_delay()'s xorshift state (not rng: weights stay as seeded)
    # a gateway listener's forwarding headers (_forwarding.pxi): whether its
    # connections get them, Forwarding.trusted_hops, the request ids' state
    bint fwd_on
    int fwd_hops
    uint64_t rid
    int (*fwd_lines)(Relay *R, Conn *c, Head *h) noexcept nogil  # (fwd_stage's rare heads)
    bint flush_due
    int n_head_timeouts    # for refused("header_timeout"), on the next return
    int n_fd_limit         # for refused("fd_limit")
    # outlier detection: what the endpoints' responses told, for Python
    # (outcome(): failures, and answers that are news)
    int n_outcomes
    int out_ep[MAX_OUTCOMES]   # EP index
    int out_tag[MAX_OUTCOMES]
    int out_why[MAX_OUTCOMES]  # OD_*: 0, an answer; else a failure's reason
    int out_status[MAX_OUTCOMES]  # OD_5XX's status
    int64_t failures_seen  # bumped by each failure reported (atomic): a generation
    # conns for the timers: a simple intrusive list
    Conn **conns
    int n_conns
    int cap_conns
    int64_t epoch          # bumped by invalidate() (atomic)
    # accept (compiled: listen())
    Lst *lsts[MAX_LSTS]
    int n_lsts
    uint32_t unlisten      # bits of lsts to stop watching (under lock)
    int reserve_fd         # /dev/null: freed to shed the accept queue at EMFILE
    int max_conns          # 0: no limit
    int64_t external_active  # the worker's other connections (atomic)
    int n_max_conns        # for refused("max_connections")
    int n_not_listening    # listeners whose accept() said EINVAL, to say (Python logs)
    int64_t turn_ns        # CLOCK_MONOTONIC ns of the loop's last turn (atomic; see "Liveness")
    Other others[MAX_OTHERS]
    int n_others
    int64_t last_accept_ns # CLOCK_MONOTONIC (atomic)
    int draining           # drain_req, as applied (the loop's; new_conn reads it)
    double drain_next      # the soonest Conn.drain_at, or earlier (0: none; drain_due)
    int64_t ctr[<int>N_CT]
    # the access log (NULL: off; see "Access log"): its buffer and writer,
    # the format, a line as it is built (the loop's), each tag id's
    # values; log_capture() and log_done(), called through these (never
    # inlined into apply_verdict() and request_done(): a request with the
    # log off pays a test of c.lg in each)
    l4_alog *alog
    bint log_json
    char *log_line
    LogTag_ **log_tags
    int n_log_tags
    char log_addr[LOG_ADDR]  # (accept_on()'s origin text)
    int64_t log_sec          # log_time()'s second, and its text
    int log_sec_len
    char log_sec_text[32]
    int64_t date_sec         # date_stamp()'s second, and its IMF-fixdate
    char date_text[32]
    void (*log_capture)(Relay *R, Conn *c) noexcept nogil
    void (*log_done)(Relay *R, Conn *c, int status, bint local, double now) noexcept nogil


cdef inline double now_s() noexcept nogil:
    cdef sys_.timespec ts
    sys_.clock_gettime(sys_.CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline uint64_t xorshift(uint64_t *state) noexcept nogil:
    # xorshift64*: seeded from Python (--seed), good enough for weights and jitter
    cdef uint64_t x = state[0]
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    state[0] = x
    return x * <uint64_t>0x2545F4914F6CDD1D


cdef inline uint64_t rng_next(Relay *R) noexcept nogil:
    return xorshift(&R.rng)


# -- buffers -------------------------------------------------------------------

# Buffers come and go with every request (a head in, a head out, the replay
# copy), 50 or more live at once under load: more than glibc's per-thread
# cache keeps (7 a size), so malloc and free went to the arena's bins, 2 %
# of a keep-alive request's CPU. First-size blocks freed go to a small
# per-thread stack instead, bounded (64 KiB a thread), and an idle
# connection still holds no buffer. The thread's stack is found through one
# pointer in static TLS (initial-exec: a load off %fs, where a __thread
# array in a module loaded by dlopen() cost a call to __tls_get_addr on
# every get and put, 2 % of the loop's instructions); the stack itself is
# allocated on the thread's first put.
cdef extern from *:
    """
    #include <stdlib.h>
    #define L4_BUF_FIRST 1024
    #define L4_POOL_MAX 64
    typedef struct { int n; void *p[L4_POOL_MAX]; } l4_pool_t;
    static __thread l4_pool_t *l4_pool __attribute__((tls_model("initial-exec")));
    static inline void *l4_pool_get(void) {
        l4_pool_t *s = l4_pool;
        return (s && s->n) ? s->p[--s->n] : malloc(L4_BUF_FIRST);
    }
    static inline void l4_pool_put(void *p) {
        l4_pool_t *s = l4_pool;
        if (s == NULL)
            s = l4_pool = (l4_pool_t *)calloc(1, sizeof(l4_pool_t));
        if (s && s->n < L4_POOL_MAX) s->p[s->n++] = p; else free(p);
    }
    static void l4_pool_drain(void) {
        l4_pool_t *s = l4_pool;
        if (s == NULL) return;
        while (s->n) free(s->p[--s->n]);
        free(s);
        l4_pool = NULL;
    }
    static int l4_pool_size(void) { return l4_pool ? l4_pool->n : 0; }
    """
    size_t BUF_FIRST "L4_BUF_FIRST"
    void *pool_get "l4_pool_get"() noexcept nogil
    void pool_put "l4_pool_put"(void *p) noexcept nogil
    void pool_drain "l4_pool_drain"() noexcept nogil
    int pool_size "l4_pool_size"() noexcept nogil


cdef inline void buf_release(char *p, size_t cap) noexcept nogil:
    if cap == BUF_FIRST:
        pool_put(p)
    else:
        free(p)


cdef int buf_add(Buf *b, const char *data, size_t n) noexcept nogil:
    cdef size_t cap
    cdef char *p
    if n == 0:
        return 0
    if b.off and b.off + b.len + n > b.cap:
        # no room after the bytes: what buf_drop() left goes to the block's
        # start now, one move for every drop since (a read's worth of
        # pipelined heads dropped one by one moved the rest each time)
        memmove(b.p - b.off, b.p, b.len)
        b.p -= b.off
        b.off = 0
    if b.len + n > b.cap:
        if b.cap == 0 and n <= BUF_FIRST:
            p = <char*>pool_get()
            cap = BUF_FIRST
        else:
            cap = b.cap * 2 if b.cap else BUF_FIRST
            while cap < b.len + n:
                cap *= 2
            p = <char*>realloc(b.p, cap)
        if p == NULL:
            return -1
        b.p = p
        b.cap = cap
    memcpy(b.p + b.len, data, n)
    b.len += n
    return 0


# x-envoy-attempt-count: Istio's virtual hosts have Envoy's
# include_request_attempt_count, so its router tells the upstream which try
# each request is (1, a retry 2, ...), replacing any the client sent. The
# staged head gets the first try's line before its empty line, after the
# client's lines (theirs dropped: summarize()) and a gateway's forwarding
# headers (the end of Fwd_.block), as Envoy's router adds it after the
# lines its connection manager added; a route's head edits apply after
# it, as Envoy's router sets it before the route's header mutations. A retry
# policy's try, and a try whose connect failed (Envoy's router counts it:
# its connect-failure retry), rewrite it in c.replay, or in c.rhead when the
# first try was still connecting (count_attempt(), policy_retry(),
# connect_failed_next()); the relay's own retry of a reused connection is no
# try: its count stays.


cdef inline int stage_attempt(Buf *o) noexcept nogil:
    """The first try's x-envoy-attempt-count line, then the head's empty
    line (CR LF: scan_into() refuses a head whose lines end in a bare LF)."""
    return buf_add(o, b"x-envoy-attempt-count: 1\r\n\r\n", 28)


cdef int attempt_count(Buf *b, int n) noexcept nogil:
    """The head at b's start (c.replay: the head as sent, then the body;
    or c.rhead) saying x-envoy-attempt-count: *n*: its first such line's
    value replaced, or the line added before the empty line where a
    route's edits removed it (Envoy's router sets it again for each
    retry). A policy's retry only: a search through the head's lines, and
    a new buffer where the value's length changes (9 to 10). -1 when out
    of memory."""
    cdef char digits[12]
    cdef int d = 0, k
    cdef size_t s, e, vs, ve
    cdef const char *lf
    cdef Buf out
    if b.len == 0:
        return 0
    while True:  # (n >= 2)
        digits[11 - d] = <char>(0x30 + n % 10)
        d += 1
        n //= 10
        if n == 0:
            break
    lf = <const char*>memchr(b.p, LF, b.len)
    if lf == NULL:
        return 0
    s = <size_t>(lf - b.p) + 1
    while s < b.len:
        lf = <const char*>memchr(b.p + s, LF, b.len - s)
        if lf == NULL:
            return 0
        e = <size_t>(lf - b.p)
        if e == s or (e == s + 1 and b.p[s] == CR):  # the empty line: none
            vs = ve = s
            break
        if e - s >= 22 and eq_lower(<const unsigned char*>b.p + s, b"x-envoy-attempt-count:", 22):
            vs = s + 22
            ve = e - 1 if b.p[e - 1] == CR else e
            while vs < ve and (b.p[vs] == SP or b.p[vs] == HTAB):
                vs += 1
            while ve > vs and (b.p[ve - 1] == SP or b.p[ve - 1] == HTAB):
                ve -= 1
            if ve - vs == <size_t>d:  # the same length: in place
                memcpy(b.p + vs, digits + 12 - d, <size_t>d)
                return 0
            break
        s = e + 1
    else:
        return 0
    memset(&out, 0, sizeof(out))
    k = buf_add(&out, b.p, vs)
    if vs == ve and (vs == 0 or b.p[vs - 1] == LF):  # (a line of its own)
        k |= buf_add(&out, b"x-envoy-attempt-count: ", 23)
        k |= buf_add(&out, digits + 12 - d, <size_t>d)
        k |= buf_add(&out, b"\r\n", 2)
    else:
        k |= buf_add(&out, digits + 12 - d, <size_t>d)
    k |= buf_add(&out, b.p + ve, b.len - ve)
    if k:
        buf_free(&out)
        return -1
    buf_free(b)
    b[0] = out
    return 0


cdef int count_attempt(Conn *c) noexcept nogil:
    """c's request, about to be tried again (a policy's retry, or the next
    endpoint after a failed connect), says which try it goes as: 1 + the
    policy's retries + the tries whose connect failed, no policy's (c.tries +
    c.conn_fails; _attempt() in _exchange_py.py). In c.replay (a retry of a
    request that went: the head as sent, then its body), or in c.rhead (the
    first try's head, staged while it connects) and the copy c.replay may
    hold of it already (mirror_draw()'s: send_request() takes c.replay's
    start for the head sent, the one retry and the copies too). -1 when
    out of memory."""
    cdef int k, n = c.tries + c.conn_fails + 1
    cdef size_t m
    if c.retried:
        return attempt_count(&c.replay, n)
    k = attempt_count(&c.rhead, n)
    if c.replay.len and k == 0:
        m = c.replay.len
        k = attempt_count(&c.replay, n)
        if c.shadow != NULL:  # (its head's length: 9 to 10 adds a byte)
            c.shadow.head_len = c.shadow.head_len + c.replay.len - m
    return k


cdef inline void replay_add(Conn *c, const char *data, size_t n) noexcept nogil:
    """Keep a copy for a retry; out of memory, no retry: a copy with a gap
    would send a different request."""
    if c.replayable and buf_add(&c.replay, data, n) != 0:
        buf_free(&c.replay)
        c.replayable = False


# A request to keep for a retry is held from its head on (on_head() for an
# idempotent one, apply_verdict() under a retry policy), but its head is not
# copied then: until send_request() sends it, c.replay's bytes are the head
# staged in c.rhead (c.replay_staged, c.replay empty). send_request() then
# sends the head from its block and makes that block c.replay's, where it
# has no body bytes to send with it and the upstream's buffer is empty (a
# keep-alive GET: the copy of each head was ~90 instructions); else, and
# where c.replay is read before the head went (a mirror's copies given up:
# mirror_draw()), the head is copied as before (replay_unstage()).

cdef inline void replay_unstage(Conn *c) noexcept nogil:
    """c.replay from the staged head: a copy of it (see above)."""
    if c.replay_staged:
        c.replay_staged = False
        replay_add(c, c.rhead.p, c.rhead.len)


cdef int send_staged(Up *u, Conn *c) noexcept nogil:
    """Send c's head, staged, to u (its buffer empty), from the head's block,
    which becomes c.replay's: what the kernel takes at once goes without a
    copy, the rest (none, mostly) is copied into u.out for flush_up() (a
    send that failed meets its error again there). -1: out of memory."""
    cdef ssize_t n
    c.replay_staged = False
    buf_free(&c.replay)
    c.replay = c.rhead
    c.rhead.p = NULL
    c.rhead.len = c.rhead.cap = c.rhead.off = 0
    n = sys_.send_nc(u.fd, c.replay.p, c.replay.len, sys_.MSG_NOSIGNAL | sys_.MSG_DONTWAIT)
    if n > 0:
        u.sent = True
    else:
        n = 0
    if <size_t>n < c.replay.len:
        return buf_add(&u.out, c.replay.p + n, c.replay.len - <size_t>n)
    return 0


cdef inline void buf_drop(Buf *b, size_t n) noexcept nogil:
    """Remove the first n bytes (moved by the next buf_add() that needs the
    room); an empty buffer is freed (HAProxy's dynamic buffers: an idle
    connection holds no buffer at all)."""
    if n >= b.len:
        b.len = 0
    else:
        b.p += n
        b.off += n
        b.len -= n
    if b.len == 0:
        buf_release(b.p - b.off, b.cap)
        b.p = NULL
        b.cap = b.off = 0


cdef inline void buf_free(Buf *b) noexcept nogil:
    if b.p != NULL:
        buf_release(b.p - b.off, b.cap)
    b.p = NULL
    b.len = b.cap = b.off = 0


# -- epoll ---------------------------------------------------------------------

# A mask that wants nothing, for a socket that stays in epoll: epoll says
# EPOLLHUP and EPOLLERR whatever the mask (a TCP peer's reset: both; its FIN
# alone: neither, so a half-close says nothing), and edge-triggered they are
# said once, not for ever to a state that has no use for them (P_RESOLVE).
# (The mask 0 means not in epoll.)
cdef extern from *:
    """
    #define L4R_WATCH_RESET ((uint32_t)EPOLLET)
    /* a bit no epoll call is given: a Conn's mask with it differs from
       whatever interest() wants (set_mask() then re-arms: run()) */
    #define L4R_MASK_STALE ((uint32_t)1 << 27)
    """
    const uint32_t WATCH_RESET "L4R_WATCH_RESET"
    const uint32_t MASK_STALE "L4R_MASK_STALE"


cdef inline int set_mask(Relay *R, int fd, uint32_t *mask, uint32_t want,
                         void *ptr) noexcept nogil:
    """Watch fd for *want*; -1 (the mask as it was, errno set) when epoll
    refuses (ENOMEM, ENOSPC at max_user_watches, EPERM: not pollable): the
    caller gives the fd up, which would otherwise never be woken. Inline,
    the test alone: most calls (interest() after each step) want what is
    watched already, and paid a call and the stack protector's canary
    (its epoll_event is on the stack) for the test."""
    if mask[0] == want:
        return 0
    return epoll_set(R, fd, mask, want, ptr)


cdef int epoll_set(Relay *R, int fd, uint32_t *mask, uint32_t want, void *ptr) noexcept nogil:
    """set_mask()'s epoll_ctl(), where the mask changes."""
    cdef sys_.epoll_event ev
    cdef int r = 0
    ev.events = want
    ev.data.ptr = ptr
    if mask[0] == 0:
        r = sys_.epoll_ctl(R.epfd, sys_.EPOLL_CTL_ADD, fd, &ev)
    elif want:
        r = sys_.epoll_ctl(R.epfd, sys_.EPOLL_CTL_MOD, fd, &ev)
    else:
        # EPOLLHUP ignores the mask: a registered fd with nothing wanted
        # would wake the loop for ever once its peer hangs up. (A failure
        # means it was not registered: not watched either way.)
        sys_.epoll_ctl(R.epfd, sys_.EPOLL_CTL_DEL, fd, &ev)
    if r != 0:
        return -1
    mask[0] = want
    return 0


cdef inline bint reading_client(Conn *c) noexcept nogil:
    # not while either side holds unsent bytes: a connection buffers one read
    if c.out.len or (c.up != NULL and c.up.out.len):
        return False
    if c.phase == P_HEAD:
        return not c.client_eof
    if c.phase == P_EXCH:
        if c.splicing == SPL_REQ:
            return c.req_left > 0 and c.piped == 0  # (splice_moves)
        return c.req_left > 0
    return False


cdef void interest(Relay *R, Conn *c) noexcept nogil:
    cdef uint32_t want = 0
    if c.closed:
        return
    if c.out.len or (c.splicing == SPL_RESP and c.piped and c.up != NULL):
        want |= sys_.EPOLLOUT
    if (c.phase == P_CLOSING and not c.client_eof) or reading_client(c):
        want |= sys_.EPOLLIN
    elif not c.client_eof and c.phase != P_HEAD:  # in flight, not read
        if c.mask & sys_.EPOLLIN and not c.unwanted:
            # Lazily: a client rarely sends while its request is answered,
            # so EPOLLIN stays registered through the exchange (two
            # epoll_ctl calls fewer per request) until it fires unwanted
            # (client_event), which drops it until the next request. Never
            # once the client's EOF was read (a half-close while the rest of
            # a closing answer waits for it): level-triggered, an EOF is
            # readable for ever, and the loop spun at 100 % CPU until the
            # client read the answer's end.
            want |= sys_.EPOLLIN
        elif not want:
            # ... and once it fired (a FIN, a pipelined request), or where it
            # was never there (a head handed off with the connection), the
            # client is watched for its reset alone (WATCH_RESET), not out of
            # epoll: a reset then went unseen through every try and backoff,
            # the upstream held, until the answer or the idle timeout. The
            # same one epoll_ctl as the removal was, and the next request's
            # EPOLLIN a MOD where it was an ADD.
            want = WATCH_RESET
    if set_mask(R, c.fd, &c.mask, want, c) != 0:
        conn_abort(R, c)  # (callers look at c.closed after a step)


cdef void interest_up(Relay *R, Up *u) noexcept nogil:
    cdef uint32_t want = 0
    if u.closed:
        return
    if u.connecting:
        want = sys_.EPOLLOUT
    elif u.owner == NULL:
        want = sys_.EPOLLIN  # idle: readable means the server closed it
    else:
        if u.out.len or (u.owner.splicing == SPL_REQ and u.owner.piped):
            want |= sys_.EPOLLOUT
        if u.owner.splicing == SPL_RESP:
            if u.owner.resp_left and u.owner.piped == 0:  # (splice_moves)
                want |= sys_.EPOLLIN
        elif not u.owner.out.len:
            want |= sys_.EPOLLIN
    if want & sys_.EPOLLIN:
        # the server's FIN, said by the event that reads the bytes before
        # it (upstream_event): no syscall more, and no wake-up more (a FIN
        # makes the socket readable anyway)
        want |= sys_.EPOLLRDHUP
    if set_mask(R, u.fd, &u.mask, want, u) != 0:
        if u.owner != NULL:
            conn_abort(R, u.owner)  # its upstream with it
        else:
            up_close(R, u)  # idle: out of the pool


# -- upstream connections and pools ------------------------------------------

cdef void idle_unlink(EP *ep, Up *u) noexcept nogil:
    if u.idle_prev != NULL:
        u.idle_prev.idle_next = u.idle_next
    else:
        ep.idle_head = u.idle_next
    if u.idle_next != NULL:
        u.idle_next.idle_prev = u.idle_prev
    else:
        ep.idle_tail = u.idle_prev
    u.idle_prev = u.idle_next = NULL
    ep.n_idle -= 1


cdef void up_close(Relay *R, Up *u) noexcept nogil:
    """Close an upstream connection, wherever it is (idle, checked out)."""
    cdef sys_.epoll_event ev
    if u.closed:
        return
    if u.owner == NULL and not u.connecting and u.ep != NULL and (
            u.idle_prev != NULL or u.ep.idle_head == u):
        idle_unlink(u.ep, u)
        L4R_ADD(&R.ctr[<int>CT_IDLE], -1)
    if u.mask:
        sys_.epoll_ctl(R.epfd, sys_.EPOLL_CTL_DEL, u.fd, &ev)
        u.mask = 0
    sys_.close(u.fd)
    u.closed = True
    u.grave_next = R.ugrave
    R.ugrave = u
    u.ep.n_open -= 1
    if u.ep.pend_head != NULL:
        kick(R, u.ep)  # below max_connections: one may connect


cdef void kick(Relay *R, EP *ep) noexcept nogil:
    """ep's waiting requests may go (a connection released or closed, a
    new limit): serve_pending(), before the loop waits again."""
    if not ep.kicked:
        ep.kicked = True
        ep.kick_next = R.kick_head
        R.kick_head = ep


cdef void pend_unlink(Conn *c) noexcept nogil:
    """c waits no more (served, answered, gone)."""
    cdef EP *ep = c.pend_ep
    if c.pend_prev != NULL:
        c.pend_prev.pend_next = c.pend_next
    else:
        ep.pend_head = c.pend_next
    if c.pend_next != NULL:
        c.pend_next.pend_prev = c.pend_prev
    else:
        ep.pend_tail = c.pend_prev
    c.pend_prev = c.pend_next = NULL
    c.pend_ep = NULL
    L4R_ADD(&ep.n_pending, -1)  # (pending() reads it from another thread)


cdef void up_release(Relay *R, Conn *c, bint reusable, double now) noexcept nogil:
    """The exchange on c.up is over: back to its pool, or closed."""
    cdef Up *u = c.up
    cdef EP *ep
    c.up = NULL
    if u == NULL:
        return
    u.owner = NULL
    ep = u.ep
    ep.active -= 1  # counted from its assignment, connecting or not (connect_to)
    if u.connecting:
        up_close(R, u)
        return
    u.requests += 1
    if not reusable or u.out.len or u.send_failed or u.peer_closed:
        L4R_ADD(&R.ctr[<int>CT_CLOSED_UNREUSABLE], 1)
    elif u.removed:
        L4R_ADD(&R.ctr[<int>CT_CLOSED_REMOVED], 1)
    elif ep.max_requests and u.requests >= ep.max_requests:
        L4R_ADD(&R.ctr[<int>CT_CLOSED_MAX_REQUESTS], 1)
    elif ep.n_idle >= R.max_idle:
        L4R_ADD(&R.ctr[<int>CT_CLOSED_OVERFLOW], 1)
    else:
        L4R_ADD(&R.ctr[<int>CT_RETURNED], 1)
        L4R_ADD(&R.ctr[<int>CT_IDLE], 1)
        u.idle_since = now
        u.reused = True
        u.idle_prev = NULL
        u.idle_next = ep.idle_head
        if ep.idle_head != NULL:
            ep.idle_head.idle_prev = u
        else:
            ep.idle_tail = u
        ep.idle_head = u
        ep.n_idle += 1
        interest_up(R, u)
        if ep.pend_head != NULL:
            kick(R, ep)  # the first waiting request takes it
        return
    up_close(R, u)


cdef void up_discard(Relay *R, Conn *c) noexcept nogil:
    """c.up failed (reset, error): close it, never pool it."""
    cdef Up *u = c.up
    c.up = NULL
    if u == NULL:
        return
    log_upstream(c, u.ep)  # (the access log's UPSTREAM_HOST, if no later try reaches one)
    u.ep.active -= 1
    u.owner = NULL
    up_close(R, u)


# -- client connections ----------------------------------------------------------

cdef void need_unlink(Relay *R, Conn *c) noexcept nogil:
    """Take c off the list of questions for Python (ask_python)."""
    cdef Conn *p = R.need_head
    cdef Conn *prev = NULL
    while p != NULL and p != c:
        prev = p
        p = p.need_next
    if p != NULL:
        if prev == NULL:
            R.need_head = c.need_next
        else:
            prev.need_next = c.need_next
        if R.need_tail == c:
            R.need_tail = prev
    c.need = N_NONE
    c.need_next = NULL


cdef void conn_forget(Relay *R, Conn *c, bint closing) noexcept nogil:
    """Take c out of the loop (epoll, timers, a question for Python); the fd
    is left as it is. *closing*: the caller closes the fd next, which takes a
    solo fd out of epoll by itself (no epoll_ctl)."""
    cdef sys_.epoll_event ev
    cdef int i
    if c.pend_ep != NULL:
        pend_unlink(c)
    if c.need != N_NONE:
        # closed with a question pending (a step asked, then a flush to a
        # client gone failed): bury() frees c before _service reads the list
        need_unlink(R, c)
    if c.mask and not (closing and c.solo):
        sys_.epoll_ctl(R.epfd, sys_.EPOLL_CTL_DEL, c.fd, &ev)
        c.mask = 0
    splice_stop(c)
    R.n_conns -= 1
    R.conns[c.idx] = R.conns[R.n_conns]
    R.conns[c.idx].idx = c.idx
    c.closed = True
    c.grave_next = R.cgrave
    R.cgrave = c
    L4R_ADD(&R.ctr[<int>CT_ACTIVE], -1)


cdef void conn_close(Relay *R, Conn *c, bint reset) noexcept nogil:
    cdef sys_.linger lg
    if c.closed:
        return
    if c.uncounted:  # dropped mid-request (a reset, the idle timeout)
        request_cut(R, c, now_s())
    if c.up != NULL:
        up_discard(R, c)
    conn_forget(R, c, True)
    if reset:
        lg.l_onoff = 1
        lg.l_linger = 0
        sys_.setsockopt(c.fd, sys_.SOL_SOCKET, sys_.SO_LINGER, &lg, sizeof(lg))
    sys_.close(c.fd)


cdef void conn_abort(Relay *R, Conn *c) noexcept nogil:
    L4R_ADD(&R.ctr[<int>CT_ERRORS], 1)
    conn_close(R, c, True)


cdef void ask_python(Relay *R, Conn *c, int need) noexcept nogil:
    if c.need != N_NONE:  # one question at a time (a bug otherwise: counted)
        L4R_ADD(&R.ctr[<int>CT_ERRORS], 1)
        return
    c.need = need
    c.need_next = NULL
    if R.need_tail != NULL:
        R.need_tail.need_next = c
    else:
        R.need_head = c
    R.need_tail = c


cdef void linger(Relay *R, Conn *c) noexcept nogil:
    """The answer is sent: FIN, then read until the client's (or LINGER_S),
    so that a client still sending does not turn the answer into a reset.
    Unless it cannot send more (no_linger): then close at once, as nginx's
    lingering_close does when nothing is left to read."""
    if c.no_linger:
        conn_close(R, c, False)
    elif sys_.shutdown(c.fd, sys_.SHUT_WR) != 0:
        conn_close(R, c, False)
    else:
        c.closing = now_s() + LINGER_S  # from the answer's end, however long it took


cdef inline bint done_talking(Conn *c) noexcept nogil:
    """After an exchange: the client has nothing more to send (RFC 9112 9.6:
    it asked to close, and every byte it sent was read)."""
    return c.client_eof or (not c.keep_alive and c.req_left == 0 and c.inb.len == 0)


cdef void start_close(Relay *R, Conn *c, double now) noexcept nogil:
    if c.closed:  # (a failed to_client() aborted it: its fd number may be reused)
        return
    # A body still going through the pipe ends here (its upstream is gone,
    # or going): what the pipe holds of an answer is the client's, after
    # what c.out holds and before the close (splice_body must not run
    # again: it splices from c.up); a request body's bytes go nowhere.
    # (An answer spliced has begun: upstream_failed() queued no local
    # answer ahead of these bytes.)
    if c.splicing == SPL_RESP:
        if splice_fallback(R, c) != 0:
            return  # gone (aborted)
    elif c.splicing == SPL_REQ:
        splice_stop(c)
    if c.up != NULL:
        up_release(R, c, False, now)
    c.backoff_until = 0  # (a retry waiting: the route timeout's 504 went, say)
    c.phase = P_CLOSING
    c.closing = now + LINGER_S  # linger() sets it again when the answer's last byte goes
    c.no_linger = c.no_linger or c.client_eof
    c.head_started = 0
    if not c.out.len:
        linger(R, c)


cdef inline bint drains(int draining, bint gateway) noexcept nogil:
    """Whether a connection (a gateway listener's or not) is told to leave
    under *draining* (Relay.draining: see "Drain")."""
    cdef int scope = draining & DRAIN_SCOPE
    return scope == DRAIN_ALL or (gateway and (scope == DRAIN_INBOUND
                                               or draining & (DRAIN_DISCOURAGE | DRAIN_STOPPED)))


cdef inline bint between_requests(Conn *c) noexcept nogil:
    """No request under way, no byte of a next head, the client not gone."""
    return c.phase == P_HEAD and c.inb.len == 0 and c.need == N_NONE and not c.client_eof


cdef void drain_conns(Relay *R, int before, double spread, double now) noexcept nogil:
    """drain() and discourage(): R.draining as applied now, *before* as it
    was (see "Drain"); run()'s, as it applies a change asked. A connection
    the scope names now and did not before is told to leave (those between
    requests closed over *spread* seconds), a gateway listener's the scope
    does not name as discourage() says."""
    cdef int i, k = 0, n = 0
    cdef int scope = R.draining & DRAIN_SCOPE, was = before & DRAIN_SCOPE
    cdef Conn *c
    for i in range(R.n_conns):
        c = R.conns[i]
        if c.phase == P_CLOSING:
            continue  # (after its last answer already)
        if not drains(scope, c.gateway):
            # (discourage()'s, or none: asked at each answer's head, as
            # Envoy asks drainClose(); a final head out already stands)
            c.draining = drains(R.draining, c.gateway)
        elif not drains(was, c.gateway):
            c.draining = True
            if between_requests(c):
                n += 1
                c.drain_at = -1.0  # (its time below)
            elif c.phase != P_HEAD:
                c.keeps_client = False  # a final head out already: closed after its body
    if n == 0:
        return
    for i in range(R.n_conns):  # (nothing closed since: the same connections)
        c = R.conns[i]
        if c.drain_at == -1.0:
            c.drain_at = now + k * spread / n
            k += 1
    R.drain_next = now
    drain_due(R, now)


cdef void drain_due(Relay *R, double now) noexcept nogil:
    """The connections a drain scheduled (c.drain_at) by *now*: closed if
    between requests (the close now, what the last answer left in c.out
    first, FIN and the lingering read, as after an answer that says close);
    one that took a request meanwhile is closed after its answer, as every
    draining one; one with a byte of its next head waiting is left to be
    read, and one taken less than DRAIN_FRESH_S ago that has sent nothing
    yet is due again then (a client that connected to send its request:
    closed at once, it read EOF for it). R.drain_next becomes the soonest
    left (0: none)."""
    cdef int i = 0
    cdef double soonest = 0
    cdef Conn *c
    while i < R.n_conns:
        c = R.conns[i]
        i += 1
        if not c.drain_at:
            continue
        if c.drain_at > now:
            if not soonest or c.drain_at < soonest:
                soonest = c.drain_at
            continue
        c.drain_at = 0
        if not between_requests(c) or bytes_waiting(c.fd):
            continue  # (its request, read or not yet: answered, saying close)
        if c.head_started and c.head_started + DRAIN_FRESH_S > now:
            # taken a moment ago, its first request not here yet: its client
            # connected to send one; closed now, it would read EOF for it
            c.drain_at = c.head_started + DRAIN_FRESH_S
            if not soonest or c.drain_at < soonest:
                soonest = c.drain_at
            continue
        c.no_linger = False
        start_close(R, c, now)
        settle(R, c)
        if c.closed:
            i -= 1  # conn_forget() moved the last one here
    R.drain_next = soonest


cdef inline bint bytes_waiting(int fd) noexcept nogil:
    """A byte of the client's that the loop has not read yet (a head that
    came since the last read: its EPOLLIN is served next)."""
    cdef char b
    return sys_.recv(fd, &b, 1, sys_.MSG_PEEK | sys_.MSG_DONTWAIT) > 0


cdef int send_buf(int fd, Buf *b) noexcept nogil:
    """Send what *b* holds, as far as the kernel takes it; -1 on an error."""
    cdef ssize_t n
    while b.len:
        n = sys_.send_nc(fd, b.p, b.len, sys_.MSG_NOSIGNAL | sys_.MSG_DONTWAIT)
        if n < 0:
            if errno == EINTR:
                continue
            return 0 if errno == EAGAIN else -1
        buf_drop(b, <size_t>n)
    return 0


cdef void flush_client(Relay *R, Conn *c) noexcept nogil:
    if send_buf(c.fd, &c.out) != 0:
        conn_abort(R, c)
        return
    if c.out.len:
        return
    if c.slow_after_flush:
        c.slow_after_flush = False
        ask_python(R, c, N_SLOW)
    if c.phase == P_CLOSING:
        linger(R, c)


cdef void settle(Relay *R, Conn *c) noexcept nogil:
    """After a step on c: send what waits for the client, then watch what c
    and its upstream wait for now (a connecting upstream keeps EPOLLOUT)."""
    if c.closed:
        return
    if c.out.len:
        flush_client(R, c)
        if c.closed:
            return
    interest(R, c)
    if c.up != NULL:
        interest_up(R, c.up)


cdef inline int flush_up(Relay *R, Up *u) noexcept nogil:
    """-1: the upstream failed (the caller decides what that means)."""
    cdef size_t before = u.out.len
    cdef int r = send_buf(u.fd, &u.out)
    if u.out.len < before:
        u.sent = True
    return r


cdef inline int to_client(Relay *R, Conn *c, const char *data, size_t n) noexcept nogil:
    """Queue bytes for the client (sent at the end of the step)."""
    if buf_add(&c.out, data, n) != 0:
        conn_abort(R, c)
        return -1
    return 0


cdef int answer_client(Relay *R, Conn *c, const char *data, size_t n) noexcept nogil:
    """Queue a local answer (local_response()'s bytes) for the client: its
    head alone, up to its empty line, when the request is a HEAD (RFC 9110
    9.3.2: the head a GET would get, no body; a keep-alive client would
    read the body as the next response); dated now (date_stamp())."""
    cdef size_t i, at = c.out.len
    if c.method_head:
        for i in range(3, n):
            if data[i] == LF and data[i - 1] == CR and data[i - 2] == LF and data[i - 3] == CR:
                n = i + 1
                break
    if to_client(R, c, data, n) != 0:
        return -1
    date_stamp(R, c, at)
    return 0


cdef void date_stamp(Relay *R, Conn *c, size_t at) noexcept nogil:
    """The relay's own answer just queued at c.out[at:] says the current
    second: its answers are built once (local_response(), at the relay's
    start or a verdict's conversion), so their date line's 29 bytes are
    overwritten with R.date_text, an IMF-fixdate made again only when the
    wall clock's second has changed (http_date() in _exchange_py.py, as
    Envoy's date provider: one clock read per local answer). Its head is
    scanned for the line (none where a route's edits removed it); no
    answer an upstream sent passes here."""
    cdef char *p = c.out.p + at
    cdef size_t n = c.out.len - at, i = 0
    cdef int64_t sec
    while i + 37 < n:  # (LF, "date: ", 29 bytes, CR, LF)
        if p[i] == LF:
            if p[i + 1] == CR:
                return  # the head's end
            if memcmp(p + i + 1, b"date: ", 6) == 0 and p[i + 36] == CR:
                sec = <int64_t>wall_s()
                if sec != R.date_sec:
                    http_date(R.date_text, sec)
                    R.date_sec = sec
                memcpy(p + i + 7, R.date_text, 29)
                return
        i += 1


# -- request heads ------------------------------------------------------------------

cdef struct Head:
    Py_ssize_t ms, me, ts, te
    int minor
    int host_count
    Py_ssize_t host_s, host_e
    long long cl
    int cl_error
    bint cl_repeated       # a second Content-Length line, or a list ("5, 5")
    bint te_seen
    int te_lines
    bint te_chunked        # one Transfer-Encoding line, "chunked" alone
    bint conn_close
    bint conn_keep_alive
    bint expect
    int expect_lines
    bint expect_continue   # one Expect line, "100-continue" alone
    bint upgrade
    int n_drop
    Py_ssize_t drop_s[MAX_DROP_LINES]   # hop-by-hop lines not sent upstream
    Py_ssize_t drop_e[MAX_DROP_LINES]
    bint drop_overflow
    bint names_fields      # a Connection token other than close, keep-alive
    Py_ssize_t key_s[MAX_KEY_HEADERS]
    Py_ssize_t key_e[MAX_KEY_HEADERS]
    bint keys_repeated     # a key header on more than one line
    # a gateway listener's head (fwd_field()): its X-Forwarded-For values
    # (-1: another head's, set by summarize()'s caller), and whether an
    # X-Forwarded-Proto stays
    int n_xff
    Py_ssize_t xff_s[FWD_MAX_XFF]
    Py_ssize_t xff_e[FWD_MAX_XFF]
    bint xfp


cdef void summarize(Relay *R, Scanner *s, const unsigned char *buf, Head *h,
                    const Lines *L) noexcept nogil:
    """What the fast path needs from a complete head (mirrors build() in peek.pyx);
    with h.n_xff 0 (not -1: the caller's), a gateway listener's, whose
    forwarding headers' lines are noted too (fwd_field()). Its header lines
    where the scan found them (L: every one, lines_whole()), or split again
    (L NULL: next_field())."""
    cdef Py_ssize_t p = s.headers_start, i, ls, ns, ne, vs, ve, k
    cdef int j, li = 0
    cdef int t
    cdef Field f
    h.ms = s.method_start
    h.me = s.method_end
    h.ts = s.method_end + 1
    h.te = s.target_end
    h.minor = buf[s.target_end + 8] - 0x30
    h.host_count = 0
    h.host_s = h.host_e = 0
    h.cl = -1
    h.cl_error = 0
    h.cl_repeated = False
    h.te_seen = h.conn_close = h.conn_keep_alive = h.expect = h.upgrade = False
    h.te_lines = 0
    h.te_chunked = False
    h.expect_lines = 0
    h.expect_continue = False
    h.n_drop = 0
    h.drop_overflow = h.names_fields = False
    h.keys_repeated = False
    # the key headers' slots (a test reads one of them: _tests() takes no
    # header but a key's, and a new set of keys clears the cache, _set_keys)
    for j in range(R.n_keys):
        h.key_s[j] = -1
        h.key_e[j] = -1
    while True:
        if L != NULL:
            if li == L.n:
                break
            field_at(buf, p, L.colon[li], L.lf[li], &f)
            li += 1
        elif not next_field(buf, p, s.head_length, &f):
            break
        ls = f.ls
        i = f.lf
        ns = f.ns
        ne = f.ne
        vs = f.vs
        ve = f.ve
        k = ne - ns
        if k == 4 and eq_lower(buf + ns, b"host", 4):
            h.host_count += 1
            if h.host_count == 1:
                h.host_s = vs
                h.host_e = ve
        elif k == 14 and eq_lower(buf + ns, b"content-length", 14):
            # (said again: upstream_head() sends it on one line, the pure relay)
            if h.cl >= 0 or memchr(buf + vs, COMMA, <size_t>(ve - vs)) != NULL:
                h.cl_repeated = True
            if h.cl_error == 0:
                h.cl_error = parse_content_length(buf, vs, ve, &h.cl)
        elif k == 17 and eq_lower(buf + ns, b"transfer-encoding", 17):
            h.te_seen = True
            h.te_lines += 1
            h.te_chunked = ve - vs == 7 and eq_lower(buf + vs, b"chunked", 7)
        elif k == 10 and eq_lower(buf + ns, b"connection", 10):
            t = connection_tokens(buf, vs, ve)
            h.conn_close = h.conn_close or (t & TOK_CLOSE) != 0
            h.conn_keep_alive = h.conn_keep_alive or (t & TOK_KEEP) != 0
            # upstream_head() in _exchange_py.py: a line of close and
            # keep-alive tokens alone goes in HTTP/1.1 and later minors (a
            # validated value holds no CR but its line's end: its tokens
            # are the trimmed value's); one that names TE (RFC 9110 §10.1.4
            # asks a client sending TE to: Perl's LWP does) goes too, TE
            # itself dropped below unless it says trailers; one that names
            # other fields to drop, or TE in HTTP/1.0: the pure relay
            if t & (TOK_FIELD | TOK_UPGRADE) or (t & TOK_TE and h.minor == 0):
                h.names_fields = True
            elif h.minor >= 1:
                drop_line(h, ls, i)
        elif k == 10 and eq_lower(buf + ns, b"keep-alive", 10):
            drop_line(h, ls, i)
        elif k == 16 and eq_lower(buf + ns, b"proxy-connection", 16):
            drop_line(h, ls, i)
        elif k == 2 and eq_lower(buf + ns, b"te", 2) \
                and not (ve - vs == 8 and eq_lower(buf + vs, b"trailers", 8)):
            drop_line(h, ls, i)
        elif k == 6 and eq_lower(buf + ns, b"expect", 6):
            h.expect = True
            h.expect_lines += 1
            h.expect_continue = ve - vs == 12 and eq_lower(buf + vs, b"100-continue", 12)
        elif k == 7 and eq_lower(buf + ns, b"upgrade", 7):
            h.upgrade = True
        elif k == 21 and eq_lower(buf + ns, b"x-envoy-attempt-count", 21):
            drop_line(h, ls, i)  # (the relay says its own: stage_attempt())
        elif h.n_xff >= 0 and k >= 12 and (buf[ns] | 0x20) == 0x78:  # x-...
            fwd_field(R, h, buf, ls, i, ns, k, vs, ve)
        for j in range(R.n_keys):
            if k == R.key_len[j] and eq_lower(buf + ns, R.keys[j], k):
                # (on a second line, routing reads their values joined,
                # request_headers(): the key holds the last alone, so such
                # a head's verdict is neither looked up nor cached, make_key)
                if h.key_s[j] >= 0:
                    h.keys_repeated = True
                h.key_s[j] = vs
                h.key_e[j] = ve
        p = i + 1


cdef inline void drop_line(Head *h, Py_ssize_t ls, Py_ssize_t lf) noexcept nogil:
    """The header line from ls to its LF (lf) is not sent upstream."""
    if h.n_drop < MAX_DROP_LINES:
        h.drop_s[h.n_drop] = ls
        h.drop_e[h.n_drop] = lf + 1
        h.n_drop += 1
    else:
        h.drop_overflow = True


include "_forwarding.pxi"


cdef bint fast_head(const unsigned char *buf, Head *h) noexcept nogil:
    """Whether the fast path serves this head; else the pure relay does."""
    if h.host_count != 1 or not all_host(buf, h.host_s, h.host_e):
        return False
    if buf[h.ts] != SLASH:  # absolute-form, asterisk-form, authority-form
        return False
    # a dot-segment in the path: refused (400) by the pure relay's parser,
    # before any verdict (cached or not) is looked at
    if has_dot_segment(buf, h.ts, h.te):
        return False
    if h.me - h.ms == 7 and memcmp(buf + h.ms, b"CONNECT", 7) == 0:
        return False
    # (a Connection field that names fields: they go too, in the pure relay;
    # a Content-Length said more than once goes as one line there)
    if h.cl_error or h.cl_repeated or h.upgrade or h.drop_overflow or h.names_fields:
        return False
    # Expect: 100-continue is answered here (body_here_read()) and goes up
    # as it is; another expectation goes to the pure relay
    if h.expect and not (h.expect_lines == 1 and h.expect_continue and h.minor == 1):
        return False
    # a chunked body, framed here; other codings, and CL with TE (refused),
    # go to the pure relay
    return not h.te_seen or chunked_only(h)


cdef inline bint chunked_only(Head *h) noexcept nogil:
    """The head's body is chunked and nothing else: one Transfer-Encoding
    line, "chunked" alone, no Content-Length, HTTP/1.1."""
    return h.te_lines == 1 and h.te_chunked and h.cl < 0 and h.minor == 1


cdef bint method_is(const unsigned char *buf, Head *h, const char *m, int n) noexcept nogil:
    return h.me - h.ms == n and memcmp(buf + h.ms, m, n) == 0


cdef bint idempotent(const unsigned char *buf, Head *h) noexcept nogil:
    return (method_is(buf, h, b"GET", 3) or method_is(buf, h, b"HEAD", 4)
            or method_is(buf, h, b"OPTIONS", 7) or method_is(buf, h, b"TRACE", 5)
            or method_is(buf, h, b"PUT", 3) or method_is(buf, h, b"DELETE", 6))


# -- the verdict cache ------------------------------------------------------------

# The cache's hash: a key 8 bytes at a time (FNV-1a, a byte at a time, was
# 4 % of a keep-alive request's instructions), from a seed drawn once per
# process, so that no client can aim its hosts and paths at one slot.
cdef uint64_t KEY_SEED = <uint64_t>int.from_bytes(os.urandom(8), "little")
cdef uint64_t MIX_A = <uint64_t>0xFF51AFD7ED558CCD
cdef uint64_t MIX_B = <uint64_t>0xC4CEB9FE1A85EC53


cdef inline uint64_t mix(uint64_t h, uint64_t w) noexcept nogil:
    h = (h ^ w) * MIX_A
    return h ^ (h >> 32)


cdef inline uint64_t key_hash(const char *p, size_t n) noexcept nogil:
    cdef uint64_t h = KEY_SEED ^ n, w
    cdef size_t i = 0
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        h = mix(h, w)
        i += 8
    if i < n:
        h = mix(h, load_upto8(<const unsigned char*>p + i, n - i))
    h ^= h >> 29
    h *= MIX_B
    return h ^ (h >> 32)


cdef bint test_passes(const Test_ *t, const unsigned char *target, Py_ssize_t tn,
                      Py_ssize_t pn) noexcept nogil:
    """Whether the target (tn bytes; its path: the first pn) passes t."""
    cdef Py_ssize_t vn = <Py_ssize_t>t.len
    if t.kind == T_TARGET_PREFIX:
        return tn >= vn and memcmp(target, t.value, vn) == 0
    if t.kind == T_EXACT:
        return pn == vn and memcmp(target, t.value, vn) == 0
    if t.kind == T_PATH_PREFIX:
        return pn >= vn and memcmp(target, t.value, vn) == 0
    # T_SEGMENTS: the value, or the value and a "/"
    return pn >= vn and memcmp(target, t.value, vn) == 0 and (pn == vn or target[vn] == SLASH)


cdef bint header_passes(const Test_ *t, const unsigned char *buf, Head *h) noexcept nogil:
    """Whether the head's key header t.key (its last line, OWS trimmed, as
    summarize() found it) passes t; an absent header passes none. Never
    for a head with a key header on several lines (h.keys_repeated:
    make_key() returns first), whose value routing reads joined."""
    cdef Py_ssize_t vs = h.key_s[t.key], vn = <Py_ssize_t>t.len
    if vs < 0:
        return False
    if t.kind == T_HEADER_EXACT:
        return h.key_e[t.key] - vs == vn and memcmp(buf + vs, t.value, vn) == 0
    return h.key_e[t.key] - vs >= vn and memcmp(buf + vs, t.value, vn) == 0


cdef Py_ssize_t test_bits(const Tests_ *T, const unsigned char *buf, Head *h,
                          char *out) noexcept nogil:
    """Which tests of T the head in buf passes, as verdict.request_bits()
    writes them into out ((T.n + 7) // 8 bytes, returned)."""
    cdef const unsigned char *target = buf + h.ts
    cdef Py_ssize_t tn = h.te - h.ts, pn = 0, nb = (T.n + 7) // 8
    cdef int i
    cdef bint hit
    while pn < tn and target[pn] != b'?' and target[pn] != b'#':
        pn += 1
    memset(out, 0, nb)
    for i in range(T.n):
        if T.t[i].kind >= T_HEADER_EXACT:
            hit = header_passes(&T.t[i], buf, h)
        else:
            hit = test_passes(&T.t[i], target, tn, pn)
        if hit:
            out[i >> 3] = <char>(<uint8_t>out[i >> 3] | (1 << (i & 7)))
    return nb


cdef Tests_ *_tests(tests, dict key_index, int n_keys) except NULL:
    """verdict.tests ((kind, value) pairs, TEST_KINDS) as one malloc'ed block;
    a header test names a key header (*key_index*: name -> index, below
    *n_keys*). KeyError: an unknown kind, or a header that is not a key;
    ValueError (encoding): a value no request byte can equal."""
    cdef Py_ssize_t n = len(tests), size, i
    cdef Tests_ *T
    cdef char *p
    kinds = [_TEST_KINDS[kind] for kind, _ in tests]
    keys = []
    values = []
    for kind, value in tests:
        if kind.startswith("header_"):
            name, _, value = value.partition(":")
            if not 0 <= key_index[name] < n_keys:  # (never so: _set_keys)
                raise KeyError(name)
            keys.append(key_index[name])
        else:
            keys.append(-1)
        values.append(str(value).encode("latin-1"))
    size = sizeof(Tests_) + n * sizeof(Test_) + sum(len(b) for b in values)
    T = <Tests_*>malloc(size)
    if T == NULL:
        raise MemoryError()
    T.n = <int>n
    T.t = <Test_*>(<char*>T + sizeof(Tests_))
    p = <char*>T.t + n * sizeof(Test_)
    for i in range(n):
        T.t[i].kind = kinds[i]
        T.t[i].key = keys[i]
        T.t[i].len = <size_t>len(values[i])
        memcpy(p, PyBytes_AS_STRING(values[i]), T.t[i].len)
        T.t[i].value = p
        p += T.t[i].len
    return T


_TEST_KINDS = {kind: i for i, kind in enumerate(_TEST_KIND_NAMES)}


cdef Py_ssize_t make_key(Relay *R, Conn *c, const unsigned char *buf, Head *h,
                         char *out, Py_ssize_t cap, int shape,
                         const Tests_ *tests=NULL) noexcept nogil:
    """The cache key of a head into out; its length, or -1 if it does not fit.

    Origin and Host always; the method, the target (or which of *tests* it
    passes) and the key headers when *shape* says the verdict depends on them
    (SHAPE_* bits; SHAPE_ONLY: the key of the shape entry itself).
    """
    cdef Py_ssize_t n = 0, need
    cdef int j
    if shape & SHAPE_TESTS and (tests == NULL or shape & SHAPE_PATH):
        return -1  # (never made so: _resolve keeps one of the two)
    if shape & SHAPE_HEADERS and R.keys_overflow:
        return -1  # the key would miss some header the verdict reads
    if shape & (SHAPE_HEADERS | SHAPE_TESTS) and h.keys_repeated:
        return -1  # a header on several lines: routing reads all (summarize())
    need = 8 + (h.me - h.ms) + (h.host_e - h.host_s) + (h.te - h.ts) + 3
    if shape & SHAPE_TESTS:
        need += (tests.n + 7) // 8 + 1
    for j in range(R.n_keys):
        need += 2 + (h.key_e[j] - h.key_s[j] if h.key_s[j] >= 0 else 0)
    if need > cap:
        return -1
    memcpy(out, &c.origin, 4)
    out[4] = <char>shape
    n = 5
    memcpy(out + n, buf + h.host_s, h.host_e - h.host_s)
    n += h.host_e - h.host_s
    out[n] = 0
    n += 1
    if shape & SHAPE_METHOD:
        memcpy(out + n, buf + h.ms, h.me - h.ms)
        n += h.me - h.ms
        out[n] = 0
        n += 1
    if shape & SHAPE_PATH:
        memcpy(out + n, buf + h.ts, h.te - h.ts)
        n += h.te - h.ts
        out[n] = 0
        n += 1
    elif shape & SHAPE_TESTS:
        n += test_bits(tests, buf, h, out + n)
    if not shape & SHAPE_HEADERS:
        return n
    for j in range(R.n_keys):
        if h.key_s[j] < 0:
            out[n] = 0
            n += 1
        else:
            out[n] = 1
            n += 1
            memcpy(out + n, buf + h.key_s[j], h.key_e[j] - h.key_s[j])
            n += h.key_e[j] - h.key_s[j]
        out[n] = 0
        n += 1
    return n


cdef void verdict_free(Verdict_ *v) noexcept nogil:
    """Free v (the loop's thread, or after it stopped): its references to
    the interned retry policy and head edits go with it (a sweep frees
    those nothing refers to, HttpRelay._sweep_interned)."""
    cdef int i
    if v == NULL:
        return
    if v.retry != NULL:
        v.retry.refs -= 1
    if v.fault != NULL:
        v.fault.refs -= 1
    for i in range(v.n_mirrors):
        free(v.mirrors[i].eps)
        free(v.mirrors[i].ep_tags)
    free(v.mirrors)
    for i in range(v.n):
        free(v.choices[i].eps)
        free(v.choices[i].ep_tags)
        verdict_free(v.choices[i].empty)
        if v.choices[i].edits != NULL:
            v.choices[i].edits.refs -= 1
        free(v.choices[i].hash)
    free(v.choices)
    free(v.session)
    free(v.keep)
    free(v.keep10)
    free(v.close)
    free(v)


cdef void cache_clear(Relay *R) noexcept nogil:
    cdef int i
    R.cache_gen += 1  # (a connection's last entries may be gone: last_verdict())
    for i in range(CACHE_SLOTS):
        if R.cache[i].key != NULL:
            free(R.cache[i].key)
            verdict_free(R.cache[i].v)
            free(R.cache[i].tests)
            free(R.cache[i].line)
            R.cache[i].key = NULL
            R.cache[i].v = NULL
            R.cache[i].tests = NULL
            R.cache[i].line = NULL
            R.cache[i].line_cap = 0
    R.cache_used = 0


cdef Entry *cache_get(Relay *R, const char *key, size_t n, uint64_t hash, double now,
                      bint shape=False) noexcept nogil:
    """The entry under key; NULL: ask Python.

    Stale while revalidated: an entry expired less than STALE_S ago sends
    one request to Python (which refills it) and serves the others while
    that one is out, so that an expiry does not send every connection's
    next request to Python at once. A shape entry (*shape*) is served
    stale without asking: the verdict lookup after it asks for both. A
    rule swap or an endpoint failure clears the cache (the epoch): nothing
    stale outlives them.
    """
    cdef int64_t epoch = L4R_LOAD(&R.epoch)
    cdef uint32_t i = <uint32_t>(hash & (CACHE_SLOTS - 1))
    cdef Entry *e
    if epoch != R.cache_epoch:
        cache_clear(R)
        R.cache_epoch = epoch
        return NULL
    while True:
        e = &R.cache[i]
        if e.key == NULL:
            return NULL
        if e.hash == hash and e.key_len == n and memcmp(e.key, key, n) == 0:
            if e.expires > now:
                return e
            if now >= e.expires + STALE_S:
                return NULL
            if shape or e.asked:
                return e
            e.asked = True
            return NULL
        i = (i + 1) & (CACHE_SLOTS - 1)


cdef void cache_put(Relay *R, const char *key, size_t n, uint64_t hash, Verdict_ *v,
                    int shape, double expires, int64_t epoch, uint32_t origin=0,
                    Tests_ *tests=NULL) noexcept nogil:
    """Cache v (or a shape entry: v NULL, with its tests); the entry owns
    both, freed here if they are not kept."""
    cdef uint32_t i
    cdef Entry *e
    R.cache_gen += 1  # (an entry added or replaced: last_verdict())
    if epoch != L4R_LOAD(&R.epoch) or epoch != R.cache_epoch:
        verdict_free(v)  # resolved against a table that is gone already
        free(tests)
        return
    if R.cache_used >= CACHE_MAX:
        cache_clear(R)
    i = <uint32_t>(hash & (CACHE_SLOTS - 1))
    while True:
        e = &R.cache[i]
        if e.key == NULL:
            break
        if e.hash == hash and e.key_len == n and memcmp(e.key, key, n) == 0:
            verdict_free(e.v)  # expired: replaced in place
            free(e.tests)
            e.v = v
            e.tests = tests
            e.shape = shape
            e.origin = origin
            e.expires = expires
            e.asked = False
            return
        i = (i + 1) & (CACHE_SLOTS - 1)
    e.key = <char*>malloc(n if n else 1)
    if e.key == NULL:
        verdict_free(v)
        free(tests)
        return
    memcpy(e.key, key, n)
    e.key_len = n
    e.hash = hash
    e.v = v
    e.tests = tests
    e.shape = shape
    e.origin = origin
    e.expires = expires
    e.epoch = epoch
    e.asked = False
    R.cache_used += 1


# -- metrics rows ------------------------------------------------------------------

cdef inline uint32_t row_key(int status, uint32_t flags) noexcept nogil:
    """A row's key besides its tag: *status* (0: a decision; ST_NONE: no
    status) in the low 16 bits, as an int16; the response flags above
    (*flags*: row_flags(), RF_LOCALV for a route's own answer; 0 for a
    decision and a mirrored copy). A decision's key is 0; an answer's
    never is."""
    return (<uint32_t>status & 0xFFFF) | (flags << 16)


cdef void count_row(Relay *R, int tag, uint32_t key, double seconds) noexcept nogil:
    """One observation (a decision: key 0; a request's or a copy's end)
    in the row of its (tag, key: row_key()'s status and flags), a slot of
    R.rows taken for a new one. The table takes ROWS_SLOTS / 2 rows (open
    addressing stays short) until the next flush: a new row past that is not counted, but in
    CT_METRICS_DROPPED (stats' metrics_dropped, /stats'
    l4proxy_http_metrics_dropped_total), and makes the flush due at the end
    of this turn of the loop (run() returns, _run flushes) rather than at
    FLUSH_S: what is dropped is at most one turn's new rows beyond the
    bound. The pure twin reports every request on its own (``report``),
    into the worker's counters as these rows go: it drops none. A row
    that exists costs its probe as before; only the drop pays more. The
    slot is hashed from the tag and the status (the key's low bits): a
    status's rows that differ in flags alone (few: a 200 and a 200 whose
    body was cut, UC or DC) probe on from one slot."""
    cdef uint32_t i = <uint32_t>((<uint32_t>tag * <uint32_t>2654435761) ^ key) & (ROWS_SLOTS - 1)
    cdef Row *r
    cdef int b
    cdef double ms
    while True:
        r = &R.rows[i]
        if r.count == 0 and r.tag == 0 and r.key == 0:
            if R.rows_used >= ROWS_SLOTS // 2:
                # full until the next flush (hundreds of tags and statuses
                # within one: not a mesh's), which is due now
                L4R_ADD(&R.ctr[<int>CT_METRICS_DROPPED], 1)
                R.flush_due = True
                return
            r.tag = tag + 1  # 0 marks a free slot
            r.key = key
            R.rows_used += 1
            break
        if r.tag == tag + 1 and r.key == key:
            break
        i = (i + 1) & (ROWS_SLOTS - 1)
    r.count += 1
    if key:
        r.sum_s += seconds
        ms = seconds * 1000.0
        b = 0
        while b < R.n_buckets and ms > R.bounds[b]:
            b += 1
        r.buckets[b] += 1


# -- the access log ------------------------------------------------------------------
# (see "Access log": log_capture() where a routed request starts, log_done()
# where it is counted, through R's pointers; the bits set where the relay
# answers or gives up, each on a path a request served upstream never takes)

cdef enum:
    N_LOG_FIELDS = 24     # a line's values (accesslog.JSON_KEYS; l4_log_line())
cdef char *TRUNC = NULL           # accesslog.TRUNCATED
cdef int TRUNC_LEN = 0
cdef char *FLAG_NAME[32]          # accesslog.FLAG_NAMES
cdef int FLAG_NAME_LEN[32]
cdef const char *HEX_UPPER = b"0123456789ABCDEF"
cdef const char *HEX_LOWER = b"0123456789abcdef"


cdef unsigned char ESC_TEXT[256]    # each byte's escaped length alone (accesslog's tables)
cdef unsigned char ESC_JSON[256]
for _b in range(256):
    ESC_TEXT[_b] = 2 if _b in (0x22, 0x5C) else 1 if 0x20 <= _b < 0x7F else 4
    ESC_JSON[_b] = 2 if _b in (0x22, 0x5C) else 1 if 0x20 <= _b < 0x7F else 6


cdef inline int log_put(char *out, unsigned char b, bint json) noexcept nogil:
    """An input byte escaped alone into out: its length (ESC_*)."""
    if b == DQUOTE or b == 0x5C:
        out[0] = 0x5C
        out[1] = <char>b
        return 2
    if 0x20 <= b < 0x7F:
        out[0] = <char>b
        return 1
    if json:  # \u00hh: the byte as a code point (ISO-8859-1)
        memcpy(out, b"\\u00", 4)
        out[4] = HEX_LOWER[b >> 4]
        out[5] = HEX_LOWER[b & 15]
        return 6
    memcpy(out, b"\\x", 2)  # \xHH
    out[2] = HEX_UPPER[b >> 4]
    out[3] = HEX_UPPER[b & 15]
    return 4


cdef int utf8_len(const unsigned char *p, Py_ssize_t left) noexcept nogil:
    """The length of the valid UTF-8 character at p (2 to 4; *left* bytes
    from there), 0 where none starts (accesslog.utf8_length()'s twin)."""
    cdef unsigned char b = p[0], lo = 0x80, hi = 0xBF
    cdef int k, j
    if 0xC2 <= b <= 0xDF:
        k = 2
    elif 0xE0 <= b <= 0xEF:
        k = 3
        if b == 0xE0:
            lo = 0xA0
        elif b == 0xED:
            hi = 0x9F
    elif 0xF0 <= b <= 0xF4:
        k = 4
        if b == 0xF0:
            lo = 0x90
        elif b == 0xF4:
            hi = 0x8F
    else:
        return 0
    if left < k or p[1] < lo or p[1] > hi:
        return 0
    for j in range(2, k):
        if p[j] < 0x80 or p[j] > 0xBF:
            return 0
    return k


cdef int log_char(char *out, const unsigned char *p, Py_ssize_t left, bint json,
                  int *took) noexcept nogil:
    """The character at p escaped into out (NULL: measured only), one unit
    of accesslog._units(): its escaped length; *took*: its input bytes (a
    valid UTF-8 character's, as it is, a C1 control's two escaped; else
    one byte, escaped alone by log_put())."""
    cdef unsigned char b = p[0]
    cdef int k = utf8_len(p, left) if b >= 0x80 else 0
    if k == 0:
        took[0] = 1
        if out == NULL:
            return ESC_JSON[b] if json else ESC_TEXT[b]
        return log_put(out, b, json)
    took[0] = k
    if b == 0xC2 and p[1] < 0xA0:  # a C1 control, U+0080 to U+009F
        if out != NULL:
            if json:  # \u00hh
                memcpy(out, b"\\u00", 4)
                out[4] = HEX_LOWER[p[1] >> 4]
                out[5] = HEX_LOWER[p[1] & 15]
            else:  # \xC2\xHH
                memcpy(out, b"\\xC2\\x", 6)
                out[6] = HEX_UPPER[p[1] >> 4]
                out[7] = HEX_UPPER[p[1] & 15]
        return 6 if json else 8
    if out != NULL:
        memcpy(out, p, <size_t>k)
    return k


cdef int log_escape_end(char *out, int cap, const unsigned char **ps, const Py_ssize_t *ns,
                        int k, bint json) noexcept nogil:
    """log_escape()'s cut keeping the end (X-Forwarded-For's): TRUNC, then
    the end of the joined value that fits, from an element's start where
    one is in it (past a comma and the spaces after it), else from the
    first whole character that fits (accesslog._end()'s twin). The value
    is joined into a block of its own (a value cut: rare); out of memory,
    TRUNC alone."""
    cdef Py_ssize_t i, n = 0, pos = 0, start, before
    cdef int room = cap - TRUNC_LEN, o = TRUNC_LEN, took, escaped = 0
    cdef unsigned char *v
    cdef const unsigned char *comma
    for i in range(k):
        n += ns[i] + (1 if i else 0)
    memcpy(out, TRUNC, TRUNC_LEN)
    v = <unsigned char*>malloc(n if n else 1)
    if v == NULL:
        return TRUNC_LEN
    n = 0
    for i in range(k):
        if i:
            v[n] = 0x2C
            n += 1
        memcpy(v + n, ps[i], <size_t>ns[i])
        n += ns[i]
    while pos < n:  # (its length escaped)
        escaped += log_char(NULL, v + pos, n - pos, json, &took)
        pos += took
    pos = 0
    while escaped > room:  # (the first character whose end fits)
        escaped -= log_char(NULL, v + pos, n - pos, json, &took)
        pos += took
    start = before = pos
    while before > 0 and (v[before - 1] == 0x20 or v[before - 1] == 0x09):
        before -= 1
    if before > 0 and v[before - 1] != 0x2C:  # (within an element: the next one's)
        comma = <const unsigned char*>memchr(v + pos, 0x2C, <size_t>(n - pos))
        start = n if comma == NULL else comma - v + 1
    while start < n and (v[start] == 0x20 or v[start] == 0x09):
        start += 1
    if start < n:
        pos = start
    while pos < n:
        o += log_char(out + o, v + pos, n - pos, json, &took)
        pos += took
    free(v)
    return o


cdef int log_escape(char *out, int cap, const unsigned char **ps, const Py_ssize_t *ns, int k,
                    bint json, bint keep_end) noexcept nogil:
    """The *k* values ps[i][:ns[i]] joined by "," and escaped into *out*, at
    most *cap* bytes: a longer one cut at a whole escape or character,
    TRUNC after it, or with *keep_end* its end after TRUNC
    (log_escape_end()) (accesslog.escape()'s twin); the bytes written."""
    cdef Py_ssize_t i, j, m
    cdef int n = 0, room, u, took
    cdef bint stop = False
    cdef const unsigned char *esc = ESC_TEXT
    cdef const unsigned char *p
    if json:
        esc = ESC_JSON
    # the whole value as long as it fits (the common case: one pass)
    for i in range(k):
        if i:
            if n + 1 > cap:
                stop = True
                break
            out[n] = 0x2C
            n += 1
        p = ps[i]
        m = ns[i]
        j = 0
        while j < m:
            if esc[p[j]] == 1:  # (printable ASCII: the bytes of most values)
                if n + 1 > cap:
                    stop = True
                    break
                out[n] = <char>p[j]
                n += 1
                j += 1
                continue
            u = log_char(NULL, p + j, m - j, json, &took)
            if n + u > cap:
                stop = True
                break
            n += log_char(out + n, p + j, m - j, json, &took)
            j += took
        if stop:
            break
    if not stop:
        return n
    if keep_end:
        return log_escape_end(out, cap, ps, ns, k, json)
    # too long: again, cut to leave room for TRUNC
    n = 0
    stop = False
    room = cap - TRUNC_LEN
    i = 0
    while i < k and not stop:
        if i:
            if n + 1 > room:
                break
            out[n] = 0x2C
            n += 1
        p = ps[i]
        m = ns[i]
        j = 0
        while j < m:
            if n + log_char(NULL, p + j, m - j, json, &took) > room:
                stop = True
                break
            n += log_char(out + n, p + j, m - j, json, &took)
            j += took
        i += 1
    memcpy(out + n, TRUNC, TRUNC_LEN)
    return n + TRUNC_LEN


cdef void log_value(LogReq *q, int which, int *at, const unsigned char **ps,
                    const Py_ssize_t *ns, int k, bint json) noexcept nogil:
    """A head value of q, escaped at q.head[*at:] (absent: none, n 0)."""
    q.off[which] = at[0]
    q.n[which] = log_escape(q.head + at[0], CAP_LH[which], ps, ns, k, json,
                            which == LH_XFF) if k else 0
    at[0] += q.n[which]


cdef void log_headers(LogReq *q, const unsigned char *b, Py_ssize_t p, Py_ssize_t end, int *at,
                      bint json) noexcept nogil:
    """The X-Forwarded-For, User-Agent, X-Request-ID and Host values of the
    head b[:end] whose header lines start at p, one pass over its lines
    (several lines of one: joined by ",", Envoy's HTTP/1 codec's; LOG_SPANS
    at most, X-Forwarded-For's last ones: the end the proxies in front
    appended)."""
    cdef const unsigned char *ps[4][LOG_SPANS]
    cdef Py_ssize_t ns[4][LOG_SPANS]
    cdef int k[4]
    cdef int w
    cdef Py_ssize_t n
    cdef Field f
    k[0] = k[1] = k[2] = k[3] = 0
    while next_field(b, p, end, &f):
        n = f.ne - f.ns
        w = -1
        if n == 15 and eq_lower(b + f.ns, b"x-forwarded-for", 15):
            w = 0
        elif n == 10 and eq_lower(b + f.ns, b"user-agent", 10):
            w = 1
        elif n == 12 and eq_lower(b + f.ns, b"x-request-id", 12):
            w = 2
        elif n == 4 and eq_lower(b + f.ns, b"host", 4):
            w = 3
        if w == 0 and k[0] == LOG_SPANS:  # (the last ones: the first goes)
            memmove(&ps[0][0], &ps[0][1], (LOG_SPANS - 1) * sizeof(ps[0][0]))
            memmove(&ns[0][0], &ns[0][1], (LOG_SPANS - 1) * sizeof(ns[0][0]))
            k[0] -= 1
        if w >= 0 and k[w] < LOG_SPANS:
            ps[w][k[w]] = b + f.vs
            ns[w][k[w]] = f.ve - f.vs
            k[w] += 1
        p = f.lf + 1
    log_value(q, LH_XFF, at, ps[0], ns[0], k[0], json)
    log_value(q, LH_UA, at, ps[1], ns[1], k[1], json)
    log_value(q, LH_RID, at, ps[2], ns[2], k[2], json)
    log_value(q, LH_AUTHORITY, at, ps[3], ns[3], k[3], json)


cdef void log_capture(Relay *R, Conn *c) noexcept nogil:
    """A routed request starts (apply_verdict()): what its line says of its
    head (c.inb, gone before its end), escaped, into the connection's
    LogReq (made for its first request, kept); its start; its bits and
    chunked bytes afresh. A gateway listener's header values are those of
    the head as staged for upstream (c.rhead, its request line the same):
    its forwarding headers' (Envoy's %REQ()% reads the mutated head). Out
    of memory: no line for it."""
    cdef LogReq *q = c.lg.req
    cdef const unsigned char *b = <const unsigned char*>c.inb.p
    cdef Scanner *s = &c.s
    cdef const unsigned char *ps[1]
    cdef Py_ssize_t ns[1]
    cdef int at = 0
    cdef bint json = R.log_json
    c.req_chunked = 0
    if q == NULL:
        q = c.lg.req = <LogReq*>malloc(sizeof(LogReq))
        if q == NULL:
            return
    q.wall = wall_s()
    q.cl = c.req_left  # (REQ_CHUNKED: a chunked body)
    q.up_len = 0
    q.open = True
    ps[0] = b + s.method_start
    ns[0] = s.method_end - s.method_start
    log_value(q, LH_METHOD, &at, ps, ns, 1, json)
    ps[0] = b + s.method_end + 1
    ns[0] = s.target_end - s.method_end - 1
    log_value(q, LH_PATH, &at, ps, ns, 1, json)
    ps[0] = b + s.target_end + 1
    ns[0] = 8  # HTTP/1.x
    log_value(q, LH_PROTOCOL, &at, ps, ns, 1, json)
    if c.fwd != NULL:
        log_headers(q, <const unsigned char*>c.rhead.p, s.headers_start, <Py_ssize_t>c.rhead.len,
                    &at, json)
    else:
        log_headers(q, b, s.headers_start, s.head_length, &at, json)


cdef void log_upstream(Conn *c, const EP *ep) noexcept nogil:
    """UPSTREAM_HOST of a try given up (up_discard(), a failed connect):
    the request's, unless a later try reaches another (its c.up at the
    end). A name not resolved yet is none (the pure twin's too)."""
    if c.lg == NULL or c.lg.req == NULL or not ep.numeric:
        return
    c.lg.req.up_len = ep_log_text(<EP*>ep, c.lg.req.up)


cdef inline int int_text(char *out, int64_t v) noexcept nogil:
    """*v* in decimal into out (24 bytes); its length."""
    cdef char digits[24]
    cdef int k = 0, i
    cdef uint64_t u = <uint64_t>v if v >= 0 else <uint64_t>(-v)
    while True:
        digits[k] = <char>(0x30 + u % 10)
        k += 1
        u //= 10
        if u == 0:
            break
    if v < 0:
        digits[k] = 0x2D
        k += 1
    for i in range(k):  # (reversed)
        out[i] = digits[k - 1 - i]
    return k


cdef const char *log_details(uint32_t f, int status, bint local) noexcept nogil:
    """RESPONSE_CODE_DETAILS (accesslog.details()'s twin; NULL: the tag's,
    a route's own answer)."""
    cdef bint after = not local and status > 0
    if f & LF_PATH:
        return b"path_normalization_failed"
    if f & LF_FI:
        return b"fault_filter_abort"
    if f & LF_UH:
        return b"no_healthy_upstream"
    if f & LF_UO:
        return b"upstream_reset_before_response_started{overflow}"
    if f & LF_UF:
        return b"upstream_reset_before_response_started{connection_failure}"
    if f & LF_OM:
        return b"overload_manager"
    if f & LF_UT:
        return b"upstream_response_timeout"
    if f & LF_UPE:
        if after:
            return b"upstream_reset_after_response_started{protocol_error}"
        return b"upstream_reset_before_response_started{protocol_error}"
    if f & LF_UC:
        if after:
            return b"upstream_reset_after_response_started{connection_termination}"
        return b"upstream_reset_before_response_started{connection_termination}"
    if f & LF_SI:
        return b"stream_idle_timeout"
    if f & LF_DC:
        if f & LF_LOCAL_CUT:
            return LOG_DRAIN_CUT
        return b"downstream_remote_disconnect"
    if f & LF_DPE:
        return b"http1.codec_error"
    if f & LF_LOCALV:
        return NULL
    return b"direct_response" if local else b"via_upstream"


cdef uint32_t row_flags(Conn *c, int status, bint local) noexcept nogil:
    """The response flags a request's line shows (accesslog.final_flags()
    of c.lflags, and the URX of Exchange._done()), but a route's own
    answer's from its tag: log_done()'s, and its metrics row's
    (request_done(): Istio's response_flags, with the log off too)."""
    cdef uint32_t f = c.lflags, shown, failed
    cdef Retry_ *p = c.retry
    shown = f & LF_FLAGS
    if f & LF_CUT and not shown & ~(LF_DI | LF_URX):
        shown |= LF_DC
    failed = shown & LF_RETRIED
    # (the route timeout's UT: never URX, as Envoy's onResponseTimeout()
    # asks no retry state, a retry waiting its backoff or the last try on)
    if p != NULL and p.attempts > 0 and not f & LF_ROUTE_TO:
        if shown & LF_UF and p.on_connect:  # (every connect failed: Exchange._done()'s)
            shown |= LF_URX
        elif c.tries >= p.attempts and ((failed and p.on & RT_ON_RESET) or (
                not (failed or local or f & LF_CUT) and retry_status(p, status))):
            shown |= LF_URX
    return shown


cdef void log_done(Relay *R, Conn *c, int status, bint local, double now) noexcept nogil:
    """The request c counts now (request_done()): its line, formatted as
    accesslog.format_line() formats the pure twin's, to R.alog's buffer
    (never waited for: full, the line is dropped and counted)."""
    cdef LogReq *q = c.lg.req
    cdef LogConn *g = c.lg
    cdef LogTag_ *t = NULL
    cdef bint json = R.log_json
    cdef uint32_t f = c.lflags, shown, failed
    cdef const char *why
    cdef int64_t received
    cdef char when[32]
    cdef char nums[4][24]
    cdef char flags_txt[64]
    cdef l4_val v[N_LOG_FIELDS]
    cdef int k, i, n
    cdef sockaddr_storage ss
    cdef sys_.socklen_t sl
    cdef Up *u = c.up
    cdef const char *up_p = NULL
    cdef int up_n = 0, local_n = 0
    if q == NULL or not q.open:
        return  # (out of memory when it started)
    q.open = False
    if not g.asked:  # the connection's addresses, once
        g.asked = True
        if g.local_len == 0:
            sl = sizeof(ss)
            if getsockname(c.fd, <sockaddr*>&ss, &sl) == 0:
                g.local_len = sa_text(g.local, &ss)
        # (accept()'s address, kept: a client that reset its connection
        # has no peer left for getpeername() to find)
        g.remote_len = peer_log_text(c, g.remote)
    shown = row_flags(c, status, local)
    if 0 <= c.tag < R.n_log_tags:
        t = R.log_tags[c.tag]
    why = log_details(shown | (f & ~LF_FLAGS), status, local)
    failed = shown & ~(LF_DI | LF_URX)  # (no UPSTREAM_LOCAL_ADDRESS then)
    if f & LF_LOCALV and t != NULL:
        shown |= t.flags
    if u != NULL:
        if not u.connecting and not failed and not local:
            if u.local_len == 0:
                sl = sizeof(ss)
                if getsockname(u.fd, <sockaddr*>&ss, &sl) == 0:
                    u.local_len = sa_text(u.local, &ss)
            local_n = u.local_len
        if u.ep.numeric:
            up_n = ep_log_text(u.ep, q.up)
            up_p = q.up
    elif q.up_len:
        up_p = q.up
        up_n = q.up_len
    if q.cl == REQ_CHUNKED:
        received = c.req_chunked
    else:
        received = q.cl - (c.req_left if 0 <= c.req_left <= q.cl else q.cl)
    # the values, in JSON_KEYS' order (n 0: absent; numbers and flags as text)
    v[0].p = when
    v[0].n = log_time(R, when, q.wall)
    for i in range(3):  # method, path, protocol
        v[1 + i].p = q.head + q.off[LH_METHOD + i]
        v[1 + i].n = q.n[LH_METHOD + i]
    v[4].p = nums[0]
    v[4].n = int_text(nums[0], status)
    v[5].p = flags_txt
    v[5].n = 0
    if not shown & LF_FLAGS:
        flags_txt[0] = 0x2D
        v[5].n = 1
    else:
        for i in range(N_FLAG_NAMES):
            if shown >> i & 1:
                if v[5].n:
                    flags_txt[v[5].n] = 0x2C
                    v[5].n += 1
                memcpy(flags_txt + v[5].n, FLAG_NAME[i], <size_t>FLAG_NAME_LEN[i])
                v[5].n += FLAG_NAME_LEN[i]
    if why != NULL:
        v[6].p = why
        v[6].n = <int>strlen(why)
    else:
        v[6].p = t.details if t != NULL else NULL
        v[6].n = t.details_len if t != NULL else 0
    v[7].n = v[8].n = v[12].n = v[22].n = 0  # (no such thing here: "-", null)
    v[7].p = v[8].p = v[12].p = v[22].p = NULL
    v[9].p = nums[1]
    v[9].n = int_text(nums[1], received)
    v[10].p = nums[2]
    v[10].n = int_text(nums[2], c.client_bytes)
    v[11].p = nums[3]
    v[11].n = int_text(nums[3], <int64_t>((now - c.started) * 1000))
    for i in range(4):  # x-forwarded-for, user-agent, x-request-id, authority
        v[13 + i].p = q.head + q.off[LH_XFF + i]
        v[13 + i].n = q.n[LH_XFF + i]
    v[17].p = up_p
    v[17].n = up_n
    v[18].p = t.cluster if t != NULL and not f & LF_LOCALV else NULL
    v[18].n = t.cluster_len if t != NULL and not f & LF_LOCALV else 0
    v[19].p = u.local if local_n else NULL
    v[19].n = local_n
    v[20].p = g.local
    v[20].n = g.local_len
    v[21].p = g.remote
    v[21].n = g.remote_len
    v[23].p = t.route if t != NULL else NULL
    v[23].n = t.route_len if t != NULL else 0
    n = log_line(R.log_line, json, v)
    alog_push(R.alog, R.log_line, <size_t>n)


cdef int ep_log_text(EP *ep, char *out) noexcept nogil:
    """*ep*'s "ip:port" into out (LOG_ADDR): made once, kept in the EP."""
    if ep.log_len == 0:
        ep.log_len = ep_text(ep.log_text, ep.v6, ep.addr, ep.addr6, ep.port)
    memcpy(out, ep.log_text, <size_t>ep.log_len)
    return ep.log_len


cdef int log_time(Relay *R, char *out, double wall) noexcept nogil:
    """START_TIME (time_text()'s), its seconds' text made once per second."""
    cdef int64_t ms = <int64_t>(wall * 1000)
    cdef int64_t sec = ms // 1000
    cdef int frac = <int>(ms % 1000)
    if sec != R.log_sec or R.log_sec_len == 0:
        R.log_sec_len = time_text(R.log_sec_text, <double>sec) - 5  # (without ".000Z")
        R.log_sec = sec
    memcpy(out, R.log_sec_text, <size_t>R.log_sec_len)
    out[R.log_sec_len] = 0x2E
    out[R.log_sec_len + 1] = <char>(0x30 + frac // 100)
    out[R.log_sec_len + 2] = <char>(0x30 + frac // 10 % 10)
    out[R.log_sec_len + 3] = <char>(0x30 + frac % 10)
    out[R.log_sec_len + 4] = 0x5A
    return R.log_sec_len + 5


# -- the exchange -------------------------------------------------------------------



cdef void request_done(Relay *R, Conn *c, int status, bint local, double now) noexcept nogil:
    """The routed request is over (answered, or cut short): counted once."""
    if not c.uncounted:
        return
    c.uncounted = False
    L4R_ADD(&R.ctr[<int>CT_REQUESTS], 1)
    if local:
        L4R_ADD(&R.ctr[<int>CT_LOCAL], 1)
    # its row's flags: those its line shows (Istio's response_flags),
    # none but where a flag was set or a retry may add URX (c.tries)
    cdef uint32_t flags = 0
    if c.lflags | <uint32_t>c.tries:
        flags = row_flags(c, status, local)
        if c.lflags & LF_LOCALV:
            flags |= RF_LOCALV
    count_row(R, c.tag, row_key(status if status else ST_NONE, flags), now - c.started)
    if c.lg != NULL:  # (the access log's line: see "Access log")
        R.log_done(R, c, status, local, now)


cdef inline void request_cut(Relay *R, Conn *c, double now) noexcept nogil:
    """The request ends unanswered (a reset, the client gone, an idle
    timeout): counted with the status of the final head the client got, else
    0 (Envoy's response code for a request reset before its response); the
    access log's DC unless a flag says why (route_timeout(), tick())."""
    c.lflags |= LF_CUT
    request_done(R, c, c.status if c.rs != RS_HEAD else 0, False, now)


cdef inline void fault_forget(Conn *c) noexcept nogil:
    """A delayed request's answer is no longer to be given (its copy of a
    local answer, fault_local: freed), its fault no longer held."""
    if c.fault_local:
        verdict_free(c.fault_answer)
        c.fault_local = False
    c.fault_answer = NULL
    if c.fault != NULL:
        c.fault.refs -= 1
        c.fault = NULL


cdef Verdict_ *verdict_copy_local(const Verdict_ *v) noexcept nogil:
    """A local answer's copy (its status, tag and bytes; NULL: out of
    memory), for a delayed request that outlives its verdict."""
    cdef Verdict_ *w = <Verdict_*>calloc(1, sizeof(Verdict_))
    if w == NULL:
        return NULL
    w.kind = V_LOCAL
    w.status = v.status
    w.tag = v.tag
    w.lflags = v.lflags
    w.keep = <char*>malloc(v.keep_len or 1)
    w.keep10 = <char*>malloc(v.keep10_len or 1)
    w.close = <char*>malloc(v.close_len or 1)
    if w.keep == NULL or w.keep10 == NULL or w.close == NULL:
        verdict_free(w)
        return NULL
    memcpy(w.keep, v.keep, v.keep_len)
    memcpy(w.keep10, v.keep10, v.keep10_len)
    memcpy(w.close, v.close, v.close_len)
    w.keep_len = v.keep_len
    w.keep10_len = v.keep10_len
    w.close_len = v.close_len
    return w


cdef void conn_drop_held(Conn *c) noexcept nogil:
    """c's request no longer follows its retry policy nor its head edits:
    the references apply_verdict() took go. At the exchange's end
    (reset_exchange) and when c is freed (bury): never while a retry, a
    response to edit or a pipelined request's answer may still read them."""
    c.holds = False
    c.conn_fails = 0
    if c.retry != NULL:
        c.retry.refs -= 1
        c.retry = NULL
        c.try_deadline = 0
        c.backoff_until = 0
        c.tries = 0
    if c.edits != NULL:
        c.edits.refs -= 1
        c.edits = NULL
    c.edit_resp = False
    c.continued = False
    free(c.set_cookie)
    c.set_cookie = NULL
    c.set_cookie_len = 0
    free(c.sess)
    c.sess = NULL
    free(c.shadow)  # (copies neither started nor dropped: an abort, a client's cut)
    c.shadow = NULL


cdef void reset_exchange(Conn *c) noexcept nogil:
    c.rs = RS_HEAD
    c.timeout = 0
    c.resp_deadline = 0
    c.no_splice = False
    c.framing = F_NONE
    c.resp_left = 0
    buf_free(&c.rhead)
    c.resp_persistent = False
    c.resp_hop = 0
    c.keeps_client = False
    c.status = 0
    c.up_bytes = 0
    c.client_bytes = 0
    buf_free(&c.replay)
    c.replayable = False
    c.replay_staged = False
    c.retried = False
    c.never_left = False
    if c.holds:  # (a policy or edits only: no stores per request without)
        conn_drop_held(c)
    c.req_left = 0
    free(c.rck)
    c.rck = NULL


cdef void outcome(Relay *R, Conn *c, EP *ep, int why) noexcept nogil:
    """How *ep* served c's request, for outlier detection (see "Outlier
    detection" in _relay_py.py): a failure (*why*, OD_*) is always queued for
    Python; an answer (0) only when it is news, the endpoint's first, or its
    first since a failure was reported: the steady state queues nothing. An
    answer of c.status 500 to 599, where ep.report_5xx, is queued as
    OD_5XX, always, and counts as a failure."""
    cdef int64_t seen
    if why == OD_ANSWERED:
        if 500 <= c.status < 600 and ep.report_5xx:
            ep.answer_seen = 0  # its next answer is news
            if R.n_outcomes >= MAX_OUTCOMES:
                return
            R.out_status[R.n_outcomes] = c.status
            why = OD_5XX
        else:
            seen = L4R_LOAD(&R.failures_seen)
            if ep.answer_seen == seen or R.n_outcomes >= MAX_OUTCOMES:
                return
            ep.answer_seen = seen
    else:
        ep.answer_seen = 0  # its next answer is news
        if R.n_outcomes >= MAX_OUTCOMES:
            return  # (1024 failures in one turn of the loop: it is ejected anyway)
    R.out_ep[R.n_outcomes] = ep.index
    R.out_tag[R.n_outcomes] = c.tag
    R.out_why[R.n_outcomes] = why
    R.n_outcomes += 1


cdef void upstream_failed(Relay *R, Conn *c, int status, const char *reason, size_t n,
                          const char *kept, size_t kn, const char *kept10, size_t k10n,
                          double now, int why) noexcept nogil:
    """Give up on this exchange (_upstream_failed in _exchange_py.py): answer
    when no final head went out (interim ones may have), counted either way.
    *reason*: that answer, saying "connection: close"; *kept*: the same
    without (NULL: a gateway failure's local answer it is not), sent when
    the client connection stays: the request was read whole and its head
    asked to persist (_keeps_after_local_answer); *kept10*: the same saying
    "connection: keep-alive", to an HTTP/1.0 client that stays; a gateway failure's
    (*status* 503, 502, 504) gets the response edits of the request's choice
    (answer_edited; a request body that cannot be framed, 400, none).
    *why*: OD_* when the
    upstream failed (outlier detection hears of it); OD_ANSWERED (0) when
    it is not the upstream's failure (a request body that cannot be
    framed), or no endpoint is to blame (the route timeout while
    connecting)."""
    cdef size_t before = c.out.len
    if c.shadow != NULL:  # (given up before the request's end, or before a connection)
        mirror_give_up(R, c, now)
    # the access log's why (the pure twin's _upstream_failed(); UF, UO or OM
    # already there: a retry's connect failed, connect_failed_next(), or a
    # retry refused, retry_refused())
    if why == OD_BEFORE or why == OD_MID:
        if not c.lflags & (LF_UF | LF_UO | LF_OM):
            c.lflags |= LF_UC
    elif why == OD_TIMEOUT or (why == OD_ANSWERED and status == 504):
        c.lflags |= LF_UT
    elif why != OD_ANSWERED:  # (a response the upstream framed wrong)
        c.lflags |= LF_UPE
    else:  # (a request body the client framed wrong)
        c.lflags |= LF_DPE
    if c.up != NULL:
        if why != OD_ANSWERED:
            outcome(R, c, c.up.ep, why)
        up_discard(R, c)
    if c.rs == RS_HEAD:
        c.status = status
        if (kept != NULL and c.keep_alive and c.req_left == 0 and not c.client_eof
                and not c.draining):
            if c.http10:  # (it asked: Connection: keep-alive; told so)
                kept = kept10
                kn = k10n
            if answer_edited(R, c, kept, kn, status >= 500) != 0:
                return  # out of memory: aborted
            c.client_bytes += c.out.len - before
            request_done(R, c, status, True, now)
            if c.splicing == SPL_REQ:  # (the body's bytes in the pipe go nowhere)
                splice_stop(c)
            # the head, when its connect failed or timed out before it was
            # sent (send_request() drops it); a pipelined request waits after it
            buf_drop(&c.inb, c.head_len)
            c.head_len = 0
            next_request(R, c, now)
            return
        if reason != NULL and answer_edited(R, c, reason, n, status >= 500) != 0:
            return  # out of memory: aborted
        c.client_bytes += c.out.len - before
        request_done(R, c, status, True, now)
    else:  # a body cut short: counted with its head's status (as Envoy does)
        request_cut(R, c, now)
    if not c.closed:
        start_close(R, c, now)




cdef inline void timer_at(Relay *R, double t) noexcept nogil:
    """R.next_timer no later than t (a deadline or a backoff's end just
    set: timers_due() fires it then)."""
    if R.next_timer == 0 or t < R.next_timer:
        R.next_timer = t


cdef inline void try_timer(Relay *R, Conn *c, double now) noexcept nogil:
    """The current try's per-try timer starts now, if it has not, once
    both its connection is ready (c.up connected: a connect's end, an idle
    pooled one handed out) and the request was read whole (c.req_left 0):
    Envoy's from the later of the pool's onPoolReady and the request's end
    (UpstreamRequest::onPoolReady, Filter::onRequestComplete), so a connect
    (bounded by the connect timeout) or a wait in line for a connection is
    no part of it. Every try's: a first try's, a policy's retry's, the
    relay's own move's, the reused connection's one retry's (each clears
    c.try_deadline as it goes: policy_retry, connect_failed_next,
    on_upstream_eof). Called where either happens: request_read (the
    request's end; send_request calls it as the connection is ready)."""
    if c.retry != NULL and c.retry.per_try > 0 and c.try_deadline == 0 and c.req_left == 0 \
            and c.up != NULL and not c.up.connecting:
        c.try_deadline = now + c.retry.per_try
        timer_at(R, c.try_deadline)


cdef inline void request_read(Relay *R, Conn *c, double now) noexcept nogil:
    """The request was read whole (c.req_left 0), or its try's connection
    became ready after that (send_request): its route timeout runs from
    the request's end (Envoy's, from the end of the downstream request),
    and its try's per-try timeout from now once its connection is ready
    (try_timer); R.next_timer no later than either (a compare, a store at
    most: timers_due())."""
    if c.timeout > 0 and c.resp_deadline == 0:
        c.resp_deadline = now + c.timeout
        timer_at(R, c.resp_deadline)
    try_timer(R, c, now)


cdef bint body_here(Conn *c) noexcept nogil:
    """Whether the request's body is all in c.inb already, after its head
    (read with it), before any of it was taken (send_request()): a
    Content-Length body's bytes, or a chunked body's last chunk and
    trailers (its machine run on a copy: nothing taken, c.rck as it was;
    one that cannot be framed is not here: its 400 comes at the send)."""
    cdef int64_t avail = <int64_t>(c.inb.len - c.head_len)
    cdef Chunked k
    if c.rck == NULL:
        return c.req_left <= avail
    k = c.rck[0]
    chunked(&k, <const unsigned char*>c.inb.p + c.head_len, <Py_ssize_t>avail)
    return k.state == C_DONE


cdef void body_here_read(Relay *R, Conn *c, double now) noexcept nogil:
    """A request with a body, about to take its first try: where its body
    came whole with its head (body_here()), its route timeout (if set)
    runs from now, its connect's time and a wait in line
    for a connection counted, as Envoy's router's from the request's end
    (Filter::onRequestComplete: it buffers the body while the connection
    is made); else from the body's last byte read (request_read()). Its
    per-try timer starts at its connection's readiness all the same
    (try_timer(): c.req_left 0 once send_request() took the body). Never
    on the path of a request without a body (the caller's c.req_left).
    Called through BODY_HERE_READ: never inlined into its callers (the
    chunked machine's copy on its stack would cost them a stack-protector
    canary, a request without a body too).

    A body not here whose head says ``Expect: 100-continue`` (fast_head()
    took one such line alone, HTTP/1.1: every other expectation, and an
    HTTP/1.0 one, is the pure relay's) is told ``100 Continue`` now, as
    Envoy's connection manager answers it itself (proxy_100_continue
    false): the request goes upstream, so the client sends its body while
    the connection is made, not after its own wait (curl's 1 s) or the
    upstream's 100. The upstream's own 100 to it is dropped
    (upstream_bytes(), c.continued): the client gets one. Not counted in
    BYTES_SENT (c.client_bytes: no retry is lost to it, can_retry())."""
    if body_here(c):
        if c.timeout > 0 and c.resp_deadline == 0:
            c.resp_deadline = now + c.timeout
            timer_at(R, c.resp_deadline)
    elif expects_continue(<const unsigned char*>c.inb.p, <Py_ssize_t>c.head_len):
        if to_client(R, c, CONTINUE_100, CONTINUE_100_LEN) != 0:
            return
        c.continued = True
        c.holds = True  # (conn_drop_held() clears c.continued at the exchange's end)


cdef const char *CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
cdef size_t CONTINUE_100_LEN = 25


cdef bint expects_continue(const unsigned char *b, Py_ssize_t n) noexcept nogil:
    """Whether the request head b[:n] (its request line first, its empty
    line last) has a line ``Expect: 100-continue`` (the name and the value
    as ASCII case-insensitive, the value's blanks trimmed)."""
    cdef Py_ssize_t i = 0, j, vs, ve
    while i < n:
        if b[i] == LF and i + 8 < n and (b[i + 1] | 0x20) == 0x65 \
                and eq_lower(b + i + 1, b"expect", 6) and b[i + 7] == COLON:
            vs = i + 8
            j = vs
            while j < n and b[j] != LF:
                j += 1
            ve = j
            while vs < ve and (b[vs] == SP or b[vs] == HTAB):
                vs += 1
            while ve > vs and (b[ve - 1] == SP or b[ve - 1] == HTAB or b[ve - 1] == CR):
                ve -= 1
            return ve - vs == 12 and eq_lower(b + vs, b"100-continue", 12)
        i += 1
    return False


cdef void (*BODY_HERE_READ)(Relay *R, Conn *c, double now) noexcept nogil
BODY_HERE_READ = body_here_read


cdef bint retry_status(const Retry_ *p, int status) noexcept nogil:
    """Whether the policy retries a try answered with this final status."""
    cdef int b = status - 100
    return ((p.on & RT_5XX and 500 <= status <= 599)
            or (p.on & RT_GATEWAY_ERROR and 502 <= status <= 504)
            or (p.on & RT_4XX and status == 409)
            or (p.on & RT_STATUS_CODES and 0 <= b < 512
                and (p.codes[b >> 6] >> (b & 63)) & 1))


cdef inline bint can_retry(Conn *c) noexcept nogil:
    """The route's retry policy has a try left, and the request is held
    whole for it (read to its end, every byte in c.replay, at most
    REPLAY_LIMIT: a retry's longer x-envoy-attempt-count, 10, may take a
    copy of exactly the limit past it, attempt_count()), nothing of the
    response having reached the client (_can_retry in _exchange_py.py).
    c.up: the try to give up, its connection ready (NULL: a retry's last
    connect failed). A try waiting in line for a connection (c.pend_ep) or
    still connecting is never given up here: no response or reset of its
    own comes, and its per-try timer has not started (try_timer())."""
    return (c.retry != NULL and c.tries < c.retry.attempts
            and c.up != NULL
            and c.req_left == 0 and c.replayable and c.replay.len <= REPLAY_LIMIT
            and c.client_bytes == 0 and c.splicing == 0)


cdef double backoff_delay(Relay *R, const Retry_ *p, int n) noexcept nogil:
    """The wait before the *n*-th retry (1, 2, ...): Envoy's jittered
    exponential backoff, uniformly random in [0, (2^n - 1) * base), at most
    p.backoff_max; the multiplier stops growing once past it (the twin of
    RetryPolicy.backoff_s() in verdict.py)."""
    cdef double mult = 1, d
    cdef int i
    if p.backoff <= 0:
        return 0
    for i in range(1, n):
        if mult * p.backoff > p.backoff_max:
            break
        mult = mult * 2 + 1
    # 53 random bits: uniform in [0, 1)
    d = <double>(xorshift(&R.jitter) >> 11) * (1.0 / 9007199254740992.0) * mult * p.backoff
    return d if d < p.backoff_max else p.backoff_max


cdef void policy_retry(Relay *R, Conn *c, int why, double now) noexcept nogil:
    """Give the try on c.up up (closed, never pooled; *why*: how its
    endpoint served it, OD_*) and send the request
    again once its backoff passed (backoff_delay; retry_send()), to another
    endpoint first (retry_order; without c.retry.ignore_prev, to the
    candidates as drawn: the same endpoint), its per-try timer started again
    once the retry's connection is ready (try_timer(); _policy_retry in _exchange_py.py; the route timeout runs on, and
    answers 504 should it pass during the backoff). Meanwhile c waits in
    P_CONNECT without an upstream, c.backoff_until set, R.next_timer no
    later than it (timers_due()). Every caller has can_retry(): c.up is
    set, its connection ready (never a try in line for one, c.pend_ep, nor
    one connecting: neither has a per-try timer running, try_timer())."""
    cdef EP *ep = c.up.ep
    outcome(R, c, ep, why)
    up_discard(R, c)
    c.tries += 1
    L4R_ADD(&R.ctr[<int>CT_RETRIES], 1)
    # the next try, on a pooled connection, has the reused connection's one
    # retry of its own (reuse_retry_done); what the given-up try's showed
    # (never_left) is not its
    c.reuse_retried = False
    c.never_left = False
    if c.phase == P_EXCH:
        # the request went: c.replay holds it whole; the try's response
        # head (bytes of it) goes
        c.retried = True
        buf_free(&c.rhead)
    # (else the first try was still connecting: its head, staged in
    # c.rhead, and its body in c.inb go as a first try's)
    # the retry says which try it is (out of memory: the connection goes)
    if count_attempt(c) != 0:
        conn_abort(R, c)
        return
    c.rs = RS_HEAD
    c.up_bytes = 0
    c.status = 0
    c.framing = F_NONE
    c.resp_left = 0
    c.try_deadline = 0  # (Envoy's starts at the retry's pool ready: try_timer())
    if c.retry.ignore_prev:
        retry_order(c, ep)
    c.phase = P_CONNECT
    c.backoff_until = now + backoff_delay(R, c.retry, c.tries)
    timer_at(R, c.backoff_until)
    # the idle timeout runs from the retry's send: a wait (a user's backoff
    # of 30 s, say) is no idleness, and the tick closed the client at the
    # idle timeout with no answer
    c.last_active = c.backoff_until


cdef void retry_send(Relay *R, Conn *c, double now) noexcept nogil:
    """A retry's backoff passed: the try goes (its per-try timer starts
    once its connection is ready, try_timer()) on an idle pooled connection to c.cand[0] when it has one, as a
    first try does (Envoy's retries go through the connection pool; a stale
    one gets the reused connection's own retry, on_upstream_eof), else on a
    new one."""
    cdef EP *ep = c.cand[0]
    c.backoff_until = 0
    c.try_deadline = 0  # (from its connection's readiness on: try_timer())
    try_ep(R, c, ep, now, True)


cdef void timers_due(Relay *R, double now) noexcept nogil:
    """R.next_timer passed: one scan of the connections fires what is due
    (exchange_timer(): the route timeout, the per-try timeout; then a
    retry's backoff: retry_send(); then a connect's deadline:
    connect_timed_out()), and R.next_timer becomes the soonest
    of what still runs (0: none). A compare and a store where a deadline is
    set is all the hot path pays; the steady state (keep-alive requests
    answered well within a route timeout) comes here about once per timeout:
    after a scan the soonest is the oldest request in flight's, a timeout
    from its start. No spin: a deadline of a connection the loop judges
    (need N_NONE) is left in the past only where it no longer applies (a
    per-try timer once a final head went out; either outside an exchange,
    where no timer judges it, as before), and such a one is not counted; a
    connection waiting on Python counts with whatever it has, Python
    answering (run() returns for it) before the loop waits again. A connection whose exchange ended
    otherwise during its backoff (the route timeout's 504, the client gone)
    is not waiting any more: reset_exchange(), start_close() and
    conn_forget() see to it; one in any other state is dropped from the
    wait rather than left due for ever."""
    cdef int i = 0
    cdef Conn *c
    cdef double soonest = 0, t
    cdef bint judged
    L4R_ADD(&R.ctr[<int>CT_TIMER_SCANS], 1)
    R.next_timer = 0  # (what is scheduled below, if anything, sets it)
    while i < R.n_conns:
        c = R.conns[i]
        i += 1
        judged = c.phase == P_CONNECT or c.phase == P_EXCH
        if c.need == N_NONE and judged and exchange_timer(R, c, now):
            if not c.closed:
                settle(R, c)  # a 504 goes out now
            if c.closed:
                i -= 1  # conn_forget() moved the last one here
                continue
            judged = c.phase == P_CONNECT or c.phase == P_EXCH
        if c.fault_until:
            if c.phase != P_CONNECT or c.up != NULL or c.need != N_NONE:
                c.fault_until = 0  # (not due for ever)
                fault_forget(c)
            elif c.fault_until <= now:
                fault_over(R, c, now)
                settle(R, c)
                if c.closed:
                    i -= 1  # conn_forget() moved the last one here
                    continue
                judged = c.phase == P_CONNECT or c.phase == P_EXCH
            elif soonest == 0 or c.fault_until < soonest:
                soonest = c.fault_until
        if c.backoff_until:
            if c.phase != P_CONNECT or c.up != NULL or c.need != N_NONE or c.retry == NULL:
                c.backoff_until = 0
            elif c.backoff_until <= now:
                retry_send(R, c, now)
                settle(R, c)
                if c.closed:
                    i -= 1  # conn_forget() moved the last one here
                    continue
                judged = c.phase == P_CONNECT or c.phase == P_EXCH
            elif soonest == 0 or c.backoff_until < soonest:
                soonest = c.backoff_until
        if not judged:
            continue
        if c.up != NULL and c.up.connecting:
            if c.need == N_NONE and c.up.deadline <= now:
                connect_timed_out(R, c)  # (Python answers before the loop waits)
            elif soonest == 0 or c.up.deadline < soonest:
                soonest = c.up.deadline
        if c.resp_deadline and (c.resp_deadline > now or c.need != N_NONE) \
                and (soonest == 0 or c.resp_deadline < soonest):
            soonest = c.resp_deadline
        if c.try_deadline and c.rs == RS_HEAD and (c.try_deadline > now or c.need != N_NONE) \
                and (soonest == 0 or c.try_deadline < soonest):
            soonest = c.try_deadline
    if R.shadows != NULL:
        t = shadow_timers(R, now)
        if t and (soonest == 0 or t < soonest):
            soonest = t
    if soonest:
        timer_at(R, soonest)


cdef inline int head_out(Relay *R, Conn *c, Py_ssize_t hl, double now) noexcept nogil:
    """The final response head is c.rhead[:hl] (status, framing known): a
    status the route's retry policy names is dropped with its connection
    and the request sent again (an answer of its endpoint, as any
    application status); else it goes out (final_head), and the request
    is never sent again. -1 when the connection went away."""
    if c.retry != NULL:
        if retry_status(c.retry, c.status) and can_retry(c):
            policy_retry(R, c, OD_ANSWERED, now)
            return -1 if c.closed else 0  # (out of memory: aborted)
        if c.replayable:
            buf_free(&c.replay)
            c.replayable = False
    return final_head(R, c, hl, now)


cdef void route_timeout(Relay *R, Conn *c, double now) noexcept nogil:
    """The route's timeout passed before the response's end
    (upstream_timeout() in _exchange_py.py): 504 "upstream request timeout"
    when no final head went out, else the client connection is reset (a
    clean close would pass a cut close-delimited body off as whole). The
    upstream is closed either way, a gateway failure unless still connecting."""
    cdef int64_t take
    cdef bint bad = False
    L4R_ADD(&R.ctr[<int>CT_TIMEOUTS], 1)
    c.resp_deadline = 0
    if c.pend_ep != NULL:  # it waited for a connection: no more
        pend_unlink(c)
    if c.rs == RS_HEAD and c.req_left and c.head_len and body_here(c):
        # before its send, its body all here (body_here_read()): read and
        # dropped with its head (upstream_failed()), the client connection
        # kept as after a request without a body, as Envoy keeps it after
        # its local reply to a request read whole. Its copies first, while
        # c.req_left says the body is not held (c.replay has its head
        # alone): dropped, as the pure twin's _given_up() drops them
        if c.shadow != NULL:
            mirror_give_up(R, c, now)
        take = body_take(c, c.inb.p + c.head_len, <int64_t>(c.inb.len - c.head_len), &bad)
        c.head_len += <size_t>take
    if c.rs == RS_HEAD:
        upstream_failed(R, c, 504, _LOCAL_504, _LOCAL_504_LEN,
                        _LOCAL_504_KEEP, _LOCAL_504_KEEP_LEN,
                        _LOCAL_504_KEEP10, _LOCAL_504_KEEP10_LEN, now,
                        OD_ANSWERED if c.up == NULL or c.up.connecting else OD_TIMEOUT)
        return
    if c.up != NULL:
        outcome(R, c, c.up.ep, OD_TIMEOUT)
        up_discard(R, c)
    c.lflags |= LF_UT
    conn_close(R, c, True)  # (counted there: the status the client got)


cdef void complete(Relay *R, Conn *c, bint upstream_closed, bint request_cut, double now) noexcept nogil:
    """Both messages are over (_response_complete in _exchange_py.py)."""
    if not exchange_done(R, c, upstream_closed, request_cut, now):
        start_close(R, c, now)
    else:
        next_request(R, c, now)


cdef bint exchange_done(Relay *R, Conn *c, bint upstream_closed, bint request_cut,
                        double now) noexcept nogil:
    """complete() up to what comes next on the client connection: the
    request counted and logged, its upstream released; whether the client
    connection stays (its next request) or closes."""
    cdef bint close_delimited = c.framing == F_CLOSE
    cdef bint reusable = (not upstream_closed and not request_cut and not close_delimited
                          and c.resp_persistent and c.sent_persistent
                          and c.splicing != SPL_REQ)
    if c.splicing == SPL_REQ:  # answered before its body was all sent
        splice_stop(c)
    if request_cut and c.shadow != NULL:  # (its copies dropped: answered before its end)
        mirror_give_up(R, c, now)
    # as its head told the client (final_head), unless the request was cut
    # or the client left since
    cdef bint keep = c.keeps_client and not request_cut and not c.client_eof
    request_done(R, c, c.status, False, now)
    c.no_linger = done_talking(c)
    if c.up != NULL:
        outcome(R, c, c.up.ep, OD_ANSWERED)
        if upstream_closed:
            up_discard(R, c)
        else:
            up_release(R, c, reusable, now)
    return keep


cdef int forward_body(Relay *R, Conn *c, const char *data, size_t n, double now) noexcept nogil:
    """Response body bytes from upstream; -1 when the connection went away."""
    cdef Py_ssize_t used
    if c.framing == F_LENGTH:
        used = <Py_ssize_t>n if <int64_t>n < c.resp_left else <Py_ssize_t>c.resp_left
        c.resp_left -= used
        if c.resp_left == 0:
            c.rs = RS_DONE
    elif c.framing == F_CHUNKED:
        used = chunked(&c.ck, <const unsigned char*>data, <Py_ssize_t>n)
        if c.ck.state == C_ERROR:
            # the head went out already: nothing to answer (502 unsent), no
            # retry; the bytes before the refused one go first, as they
            # would have in a read of their own, then the close
            if used and to_client(R, c, data, <size_t>used) != 0:
                return -1
            c.client_bytes += used
            upstream_failed(R, c, 502, NULL, 0, NULL, 0, NULL, 0, now,
                            OD_CHUNKED + (c.ck.error if 0 < c.ck.error < N_CHUNK_ERRORS else 0))
            return -1
        if c.ck.state == C_DONE:
            c.rs = RS_DONE
    elif c.framing == F_CLOSE:
        used = <Py_ssize_t>n
    else:
        used = 0
        c.rs = RS_DONE
    if used:
        if to_client(R, c, data, <size_t>used) != 0:
            return -1
        c.client_bytes += used
    if used < <Py_ssize_t>n:  # bytes after a complete response: the server is confused
        c.resp_persistent = False
    if c.rs == RS_DONE:
        complete(R, c, False, c.req_left > 0, now)
        return -1 if c.closed else 0
    return 0


cdef bint header_is(const unsigned char *p, Py_ssize_t n, const char *name, int k) noexcept nogil:
    return n == k and eq_lower(p, name, k)


# What a final response head holds of hop-by-hop lines (c.resp_hop): none
# but Connection lines of close / keep-alive alone (0: it may go as it is),
# lines to drop (Connection lines with other tokens, Keep-Alive,
# Proxy-Connection, Upgrade), and fields its Connection field names, to
# find (any token but close, keep-alive and upgrade); and apart, whether a
# Connection line says keep-alive (a client we close must not read it
# beside our close: final_head()), and whether one says close (final_head()
# adds none then).
cdef enum:
    HOP_LINES = 1
    HOP_NAMED = 2
    HOP_KEEP = 4
    HOP_CLOSE = 8


# c.resp_hop of each combination of a head's Connection tokens (TOK_*, six
# bits): a token other than close and keep-alive has its line go, and the
# field it names (any but upgrade) with it.
cdef unsigned char HOP_OF[64]


cdef void _init_hop_of():
    cdef int t
    for t in range(64):
        HOP_OF[t] = ((HOP_LINES if t & TOK_OTHER else 0)
                     | (HOP_NAMED if t & (TOK_FIELD | TOK_TE) else 0)
                     | (HOP_KEEP if t & TOK_KEEP else 0)
                     | (HOP_CLOSE if t & TOK_CLOSE else 0))


_init_hop_of()


# The common header line, judged 32 bytes at a time (SSE2): its first 16
# bytes say where its ":" is and whether every byte before it is a letter, a
# digit or "-" (token bytes all: the names name_fast() takes), and with the
# next 16 where its first control byte is, the CR of its CRLF in most lines.
# Such a line needs nothing more: its value's bytes up to that control byte
# are field-value bytes, and value_end() goes on from that byte where it is
# not the CR of a CRLF (HTAB, a refused byte), or from the window's end in a
# longer line, judging what it would have judged from the ":". Where fewer
# than 32 bytes follow the line's start (the last line of a head with a
# short body after it), the second 16 are the buffer's last, their bits of
# bytes already seen shifted out. name_fast() then value_end() read the
# line's first bytes twice, the 16 after the ":" as a block of their own.
# The status line's end is found the same way (first_ctl32(): no memchr(),
# and its reason's bytes need no field_ok()). Any other line is judged byte
# by byte (L4_LINE_SLOW), as is every line without SSE2, or with fewer than
# 16 bytes left.
cdef extern from *:
    """
    #include <stdint.h>
    #include <sys/types.h>
    #ifdef __SSE2__
    #include <emmintrin.h>
    #endif
    #define L4_LINE_SLOW (-3)
    #ifdef __SSE2__
    /* Which of the 16 bytes are controls (below 0x20) or DEL: a bit each. */
    static inline unsigned l4_ctl16(__m128i x) {
        return (unsigned)_mm_movemask_epi8(_mm_or_si128(
            _mm_cmpeq_epi8(_mm_min_epu8(x, _mm_set1_epi8(0x1F)), x),
            _mm_cmpeq_epi8(x, _mm_set1_epi8(0x7F))));
    }
    /* Which are letters, digits or "-" (the bytes l4_name_fast() takes). */
    static inline unsigned l4_namech16(__m128i x) {
        __m128i t = _mm_sub_epi8(_mm_or_si128(x, _mm_set1_epi8(0x20)), _mm_set1_epi8(0x61));
        __m128i d = _mm_sub_epi8(x, _mm_set1_epi8(0x30));
        return (unsigned)_mm_movemask_epi8(_mm_or_si128(
            _mm_or_si128(_mm_cmpeq_epi8(_mm_min_epu8(t, _mm_set1_epi8(25)), t),
                         _mm_cmpeq_epi8(_mm_min_epu8(d, _mm_set1_epi8(9)), d)),
            _mm_cmpeq_epi8(x, _mm_set1_epi8(0x2D))));
    }
    static inline unsigned l4_colon16(__m128i x) {
        return (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(x, _mm_set1_epi8(0x3A)));
    }
    #endif
    /* The header line at b[ls:] (ls < n, b[ls] no CR): when its name is 1
       to 15 letters, digits or "-" followed by its ":" (see above), *colon
       is the ":"'s index and the result value_end()'s from there (its CR;
       -1: more to come; -2: a refused byte); L4_LINE_SLOW otherwise. */
    static inline ssize_t l4_line_fast(const unsigned char *b, ssize_t ls, ssize_t n,
                                       ssize_t *colon) {
    #ifdef __SSE2__
        __m128i x0;
        unsigned ctl, cm, want;
        ssize_t e, up;
        if (ls + 16 > n)
            return L4_LINE_SLOW;
        x0 = _mm_loadu_si128((const __m128i *)(b + ls));
        cm = l4_colon16(x0);
        /* the name's bits: those below its ":" (no ":": all 32, which the
           name's 16 never are) */
        want = (cm & -cm) - 1;
        if (want == 0 || (l4_namech16(x0) & want) != want)
            return L4_LINE_SLOW;
        *colon = ls + __builtin_ctz(cm);
        /* the next 16 bytes, or the last 16 of b[:n] where fewer follow,
           their bits of bytes already seen shifted out */
        if (ls + 32 <= n) {
            up = ls + 16;
            ctl = l4_ctl16(x0) | (l4_ctl16(_mm_loadu_si128((const __m128i *)(b + up))) << 16);
        } else {
            up = n - 16;
            ctl = l4_ctl16(x0) | ((l4_ctl16(_mm_loadu_si128((const __m128i *)(b + up)))
                                   >> (ls + 16 - up)) << 16);
        }
        if (!ctl)  /* (the value goes on past the window) */
            return l4_value_end(b, up + 16, n);
        e = ls + __builtin_ctz(ctl);  /* (after the ":": none in the name) */
        if (b[e] == 0x0D && e + 1 < n && b[e + 1] == 0x0A)
            return e;
        return l4_value_end(b, e, n);
    #else
        (void)b; (void)ls; (void)n; (void)colon;
        return L4_LINE_SLOW;
    #endif
    }
    /* Where the first control byte (below 0x20) or DEL of b[:n] is, when
       it is within its first 32 bytes (n >= 32); else 32, as without SSE2. */
    static inline int l4_first_ctl32(const unsigned char *b) {
    #ifdef __SSE2__
        unsigned ctl = l4_ctl16(_mm_loadu_si128((const __m128i *)b))
                       | (l4_ctl16(_mm_loadu_si128((const __m128i *)(b + 16))) << 16);
        return ctl ? __builtin_ctz(ctl) : 32;
    #else
        (void)b;
        return 32;
    #endif
    }
    """
    Py_ssize_t LINE_SLOW "L4_LINE_SLOW"
    Py_ssize_t line_fast "l4_line_fast"(const unsigned char *b, Py_ssize_t ls, Py_ssize_t n,
                                        Py_ssize_t *colon) noexcept nogil
    int first_ctl32 "l4_first_ctl32"(const unsigned char *b) noexcept nogil


cdef inline void value_span(const unsigned char *b, Py_ssize_t colon, Py_ssize_t le,
                            Py_ssize_t *vs, Py_ssize_t *ve) noexcept nogil:
    """The value of the header line whose ":" is at colon and whose CR is at
    le, without the OWS around it: b[vs:ve]."""
    cdef Py_ssize_t i = colon + 1, j = le
    while i < j and is_ows(b[i]):
        i += 1
    while j > i and is_ows(b[j - 1]):
        j -= 1
    vs[0] = i
    ve[0] = j


cdef inline int response_head_fast(Relay *R, Conn *c, Py_ssize_t *head_len) noexcept nogil:
    """Recognise the common response head in c.rhead: response_head(), the
    common line judged 32 bytes at a time."""
    return response_head(R, c, <const unsigned char*>c.rhead.p, <Py_ssize_t>c.rhead.len,
                         head_len, True, NULL)


cdef int response_head_memo(Relay *R, Conn *c, const unsigned char *b, Py_ssize_t n,
                            Py_ssize_t *head_len, HeadMemo *m) noexcept nogil:
    """response_head() of b[:n] (the response's bytes so far), 32 bytes at
    a time, where they do not begin with the head kept in *m*; with it,
    that head's verdict (1) without judging a line. A head judged 1 here is
    kept in *m* in its place (see "Heads seen before")."""
    if m.len and n >= m.len and memcmp(b, m.head, <size_t>m.len) == 0:
        head_len[0] = m.len
        head_facts(c, m.status, m.tokens, m.v10, m.te_chunked, m.n_cl, m.cl)  # (1: as when kept)
        return 1
    return response_head(R, c, b, n, head_len, True, m)


cdef inline int memo_slot(const void *ep) noexcept nogil:
    """The slot of R.memo for the endpoint at *ep* (a hint: see "Heads seen
    before")."""
    cdef uintptr_t a = <uintptr_t>ep
    return <int>(((a >> 6) ^ (a >> 12)) & (MEMO_HEADS - 1))


cdef inline int head_facts(Conn *c, int status, int tokens, bint v10, bint te_chunked,
                           int n_cl, long long cl) noexcept nogil:
    """What a final head response_head() took says, set in c: its status,
    whether the server keeps the connection, the hop-by-hop lines to drop
    and the body's framing (none for a HEAD request's answer). 2 for a 204
    with a Content-Length or Transfer-Encoding line, a 304 with a
    Transfer-Encoding line: Python drops them (bodiless_head(), see
    _framing_py's Decisions); 1 otherwise (a test in the branch of the
    bodiless statuses only: nothing on a 200's way)."""
    c.status = status
    # HTTP/1.0 persists only when it says keep-alive (RFC 9112 §9.3)
    c.resp_persistent = (tokens & TOK_CLOSE) == 0 and ((tokens & TOK_KEEP) != 0 or not v10)
    c.resp_hop = HOP_OF[tokens]
    if c.method_head or status == 204 or status == 304:
        c.framing = F_NONE
        if (te_chunked and (status == 204 or status == 304)) or (n_cl and status == 204):
            return 2
    elif te_chunked:
        c.framing = F_CHUNKED
    elif n_cl:
        c.framing = F_LENGTH if cl > 0 else F_NONE
        c.resp_left = cl
    else:
        c.framing = F_CLOSE
    return 1


cdef int response_head(Relay *R, Conn *c, const unsigned char *b, Py_ssize_t n,
                       Py_ssize_t *head_len, bint fast, HeadMemo *keep) noexcept nogil:
    """Recognise the common response head in b[:n], the response's bytes so
    far (c.rhead's, or a read's: upstream_bytes()).

    0: incomplete; 1: done (c.status, c.framing, c.resp_left,
    c.resp_persistent, c.resp_hop set, *head_len); 2: not the common case
    (Python judges it: parse_response_head and response_framing); 3: an
    interim head alone (*head_len).

    One pass, line by line: the lines are judged as they are found, and the
    verdict waits for the head's end (a head that is not the common case but
    not complete yet is 0, as before its end was known). With *fast*, the
    status line's end and the common header line 32 bytes at a time
    (line_fast(), above); without, every line as any other (name_fast(),
    the token bytes one by one, value_end()): the same verdict (the tests
    compare them: test_relay_response_heads.py). With *keep* (not NULL), a
    head judged 1 is kept there with what was found in it, where it fits
    (response_head_memo()).
    """
    cdef Py_ssize_t i, ls, le, vs, ve, colon, k, j, end, sl
    cdef const unsigned char *lf
    cdef int n_cl = 0, n_te = 0, status = 0, lines = 0
    # the Connection tokens of every line (TOK_*), with TOK_OTHER for a
    # Keep-Alive, Proxy-Connection or Upgrade line: a line to drop
    cdef int tokens = 0
    cdef long long cl = -1
    cdef bint te_chunked = False, v10 = False, odd = False, plain = False
    if n == 0:  # an empty buffer is freed (b NULL): memchr must not see it
        return 0
    # the status line: "HTTP/1.1 DDD reason" CRLF (or HTTP/1.0); where its
    # first control byte is the CR of a CRLF, its reason's bytes are all
    # field-value bytes (plain)
    sl = first_ctl32(b) if fast and n >= 32 else 32
    if sl < 31 and b[sl] == CR and b[sl + 1] == LF:
        sl += 1
        plain = True
    else:
        lf = <const unsigned char*>memchr(b, LF, <size_t>n)
        if lf == NULL:
            return 2 if n > R.max_head else 0
        sl = lf - b  # the LF of the status line
    if sl < 13 or memcmp(b, b"HTTP/1.", 7) != 0 or b[8] != SP \
            or not (b[7] == 0x31 or b[7] == 0x30) or b[sl - 1] != CR \
            or not (0x31 <= b[9] <= 0x39 and 0x30 <= b[10] <= 0x39 and 0x30 <= b[11] <= 0x39) \
            or (sl - 1 > 12 and (b[12] != SP or not (plain or field_ok(b + 13, sl - 14)))):
        odd = True
    else:
        v10 = b[7] == 0x30
        status = (b[9] - 0x30) * 100 + (b[10] - 0x30) * 10 + (b[11] - 0x30)
        # a tunnel or refused (101), an interim head from an HTTP/1.0 server:
        # Python (an interim head alone: passed on as it is, below)
        odd = status == 101 or (status < 200 and v10)
    # header lines, each ending in CRLF, up to the empty line
    i = sl + 1
    while True:
        le = line_fast(b, i, n, &colon) if fast and not odd and i < n and b[i] != CR else LINE_SLOW
        if le != LINE_SLOW:  # (its name and ":" found)
            lines += 1
            ls = i
            if le == -1:
                return 2 if n > R.max_head else 0
        else:
            if i >= n or (b[i] == CR and i + 1 >= n):
                return 2 if n > R.max_head else 0
            if b[i] == LF:
                return 2  # a bare LF ends the head: Python takes it (crlf_head())
            if b[i] == CR and b[i + 1] == LF:
                end = i + 2
                break
            lines += 1
            ls = i
            if odd:
                colon = i
                le = -2
            else:
                # the name: 1 to 15 letters, digits or "-" and its ":" at once
                # (SSE2), else a token byte at a time; then the value, its
                # bytes judged on the way to its CRLF (value_end: le, the CR)
                k = name_fast(b + ls) if ls + 16 <= n else 0
                if k:
                    colon = ls + k
                else:
                    colon = ls
                    while colon < n and TCHAR[b[colon]]:
                        colon += 1
                    if colon == n:
                        return 2 if n > R.max_head else 0  # (no LF yet)
                le = value_end(b, colon + 1, n) if colon > ls and b[colon] == COLON else -2
                if le == -1:
                    return 2 if n > R.max_head else 0
        if le == -2:  # not the common case: the line ends at its LF
            odd = True
            lf = <const unsigned char*>memchr(b + colon, LF, <size_t>(n - colon))
            if lf == NULL:
                return 2 if n > R.max_head else 0
            i = lf - b + 1
            continue
        # the names weighed here, by their length first (one switch: most
        # lines are none of them); the value, without its OWS, b[vs:ve]
        k = colon - ls
        if k == 14:
            if eq_lower(b + ls, b"content-length", 14):
                value_span(b, colon, le, &vs, &ve)
                n_cl += 1
                if n_cl > 1 or ve - vs < 1 or ve - vs > 18:
                    odd = True
                else:
                    cl = 0
                    for j in range(vs, ve):
                        if not (0x30 <= b[j] <= 0x39):
                            odd = True
                            break
                        cl = cl * 10 + (b[j] - 0x30)
        elif k == 17:
            if eq_lower(b + ls, b"transfer-encoding", 17):
                value_span(b, colon, le, &vs, &ve)
                n_te += 1
                if n_te > 1 or v10 or not (ve - vs == 7 and eq_lower(b + vs, b"chunked", 7)):
                    odd = True  # (in HTTP/1.0 Python refuses it, unless no body may follow)
                te_chunked = True
        elif k == 10:  # Connection or Keep-Alive (hop-by-hop lines: send_client_head)
            if eq_lower(b + ls, b"connection", 10):
                value_span(b, colon, le, &vs, &ve)
                # (nginx's "keep-alive" at once: connection_tokens()'s first test)
                if ve - vs == 10 and eq_lower(b + vs, b"keep-alive", 10):
                    tokens |= TOK_KEEP
                else:
                    tokens |= connection_tokens(b, vs, ve)
            elif eq_lower(b + ls, b"keep-alive", 10):
                tokens |= TOK_OTHER
        elif k == 16:
            if eq_lower(b + ls, b"proxy-connection", 16):
                tokens |= TOK_OTHER
        elif k == 7:
            if eq_lower(b + ls, b"upgrade", 7):
                tokens |= TOK_OTHER  # (a 101 is Python's, above: a tunnel's head goes as it is)
        i = le + 2
    if odd or end > R.max_head or (n_cl and n_te):
        return 2  # (CL with TE: Python refuses it, with its reason)
    if status < 200:
        # interim (100 Continue): passed on as it is; with header lines
        # (103 Early Hints) Python judges it
        if lines:
            return 2
        head_len[0] = end
        return 3
    if head_facts(c, status, tokens, v10, te_chunked, n_cl, cl) == 2:
        return 2  # (a 204's or 304's framing lines: dropped in Python)
    head_len[0] = end
    if keep != NULL and end <= MEMO_HEAD_MAX:
        memcpy(keep.head, b, <size_t>end)
        keep.len = end
        keep.status = status
        keep.tokens = tokens
        keep.v10 = v10
        keep.te_chunked = te_chunked
        keep.n_cl = n_cl
        keep.cl = cl
    return 1


cdef bint says_close(const unsigned char *b, Py_ssize_t end) noexcept nogil:
    """Whether a response head's Connection headers name "close"."""
    cdef Py_ssize_t i, le, colon, vs
    cdef const unsigned char *lf
    cdef bint close = False, keep = False
    lf = <const unsigned char*>memchr(b, LF, <size_t>end)
    i = lf - b + 1
    while i < end:
        lf = <const unsigned char*>memchr(b + i, LF, <size_t>(end - i))
        if lf == NULL:
            break
        le = lf - b
        if le > i and b[le - 1] == CR:
            le -= 1
        colon = i
        while colon < le and b[colon] != COLON:
            colon += 1
        if colon < le and header_is(b + i, colon - i, b"connection", 10):
            vs = colon + 1
            scan_connection(b, vs, le, &close, &keep)
        i = (lf - b) + 1
    return close


cdef inline Py_ssize_t colon_at(const unsigned char *b, Py_ssize_t i, Py_ssize_t le) noexcept nogil:
    """Where b[i:le], a header line of a validated head, has its ":" (le: none)."""
    cdef const unsigned char *p = <const unsigned char*>memchr(b + i, COLON, <size_t>(le - i))
    return le if p == NULL else p - b


cdef inline Py_ssize_t line_end(const unsigned char *b, Py_ssize_t i, const unsigned char *lf) noexcept nogil:
    """Where the line from i to its LF at lf ends, without the CR before it."""
    cdef Py_ssize_t le = lf - b
    return le - 1 if (le > i and b[le - 1] == CR) else le


cdef inline int bytes_cmp(const unsigned char *a, Py_ssize_t an, const unsigned char *b,
                          Py_ssize_t bn) noexcept nogil:
    """a[:an] against b[:bn] in the order of their bytes, ASCII-lowercased."""
    cdef Py_ssize_t i, n = an if an < bn else bn
    cdef int d
    for i in range(n):
        d = <int>LOWER[a[i]] - <int>LOWER[b[i]]
        if d != 0:
            return d
    return <int>(an > bn) - <int>(an < bn)


cdef int span_cmp(const void *x, const void *y) noexcept nogil:
    """qsort()'s order of Spans: bytes_cmp."""
    cdef const Span *a = <const Span*>x
    cdef const Span *b = <const Span*>y
    return bytes_cmp(a.p, a.n, b.p, b.n)


cdef bint among(const Span *named, Py_ssize_t n, const unsigned char *p, Py_ssize_t k) noexcept nogil:
    """Whether p[:k] is one of named[:n] (sorted by span_cmp), whatever the
    case of its letters: a binary search (no local's address taken, as
    bsearch() would need: no stack-protector canary where it is inlined)."""
    cdef Py_ssize_t lo = 0, hi = n, mid
    cdef int d
    while lo < hi:
        mid = (lo + hi) >> 1
        d = bytes_cmp(named[mid].p, named[mid].n, p, k)
        if d == 0:
            return True
        if d < 0:
            lo = mid + 1
        else:
            hi = mid
    return False


cdef inline bint names_a_field(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    """Whether the Connection token p[:n] names a field that goes with it:
    not empty, not close or keep-alive (options), never Content-Length,
    Transfer-Encoding or Host (client_head() in _exchange_py.py)."""
    if n == 5:
        return not eq_lower(p, b"close", 5)
    if n == 10:
        return not eq_lower(p, b"keep-alive", 10)
    if n == 14:
        return not eq_lower(p, b"content-length", 14)
    if n == 17:
        return not eq_lower(p, b"transfer-encoding", 17)
    if n == 4:
        return not eq_lower(p, b"host", 4)
    return n > 0


cdef Py_ssize_t named_fields(const unsigned char *b, Py_ssize_t end, Span *out,
                             Py_ssize_t cap) noexcept nogil:
    """How many fields the Connection lines of the response head b (its
    lines end before end, the empty line) name (names_a_field), on one line
    or several; the first cap of them, as spans of b, in out."""
    cdef const unsigned char *lf = <const unsigned char*>memchr(b, LF, <size_t>end)
    cdef Py_ssize_t i = lf - b + 1, le, colon, j, es, ee, n = 0
    while i < end:
        lf = <const unsigned char*>memchr(b + i, LF, <size_t>(end - i))
        if lf == NULL:  # (never: the head was judged whole)
            break
        le = line_end(b, i, lf)
        colon = colon_at(b, i, le)
        if colon < le and header_is(b + i, colon - i, b"connection", 10):
            j = colon + 1
            while True:  # its tokens, each without the OWS around it
                es = j
                while j < le and b[j] != COMMA:
                    j += 1
                ee = j
                while es < ee and is_ows(b[es]):
                    es += 1
                while ee > es and is_ows(b[ee - 1]):
                    ee -= 1
                if names_a_field(b + es, ee - es):
                    if n < cap:
                        out[n].p = b + es
                        out[n].n = ee - es
                    n += 1
                if j == le:
                    break
                j += 1
        i = lf - b + 1
    return n


cdef inline bint hop_line(const unsigned char *b, Py_ssize_t i, Py_ssize_t colon,
                          const Span *named, Py_ssize_t n) noexcept nogil:
    """Whether the header line at i (its ":" at colon) of a response head
    is hop-by-hop: Connection, Keep-Alive, Proxy-Connection, Upgrade, or a
    field the Connection field names (named[:n], sorted)."""
    cdef Py_ssize_t k = colon - i
    if k == 10:
        if eq_lower(b + i, b"connection", 10) or eq_lower(b + i, b"keep-alive", 10):
            return True
    elif header_is(b + i, k, b"proxy-connection", 16) or header_is(b + i, k, b"upgrade", 7):
        return True
    return n > 0 and among(named, n, b + i, k)


cdef int send_without_hop_lines(Relay *R, Conn *c, Py_ssize_t hl, const Span *named,
                                Py_ssize_t n, bint keep) noexcept nogil:
    """send_client_head()'s sending: c.rhead[:hl] without its hop-by-hop
    lines (hop_line), runs of the lines kept at once, with the relay's own
    connection line before the empty line that ends the head."""
    cdef const unsigned char *b = <const unsigned char*>c.rhead.p
    cdef const unsigned char *lf = <const unsigned char*>memchr(b, LF, <size_t>hl)
    cdef Py_ssize_t i = lf - b + 1, run = 0, sent = 0, le
    # the empty line that ends the head (its CR LF: a head with a bare LF
    # was written again with CRLF, _response())
    cdef Py_ssize_t end = hl - 2
    while i < end:
        lf = <const unsigned char*>memchr(b + i, LF, <size_t>(end - i))
        if lf == NULL:  # (never: the head was judged whole; the rest goes as it is)
            break
        le = line_end(b, i, lf)
        if hop_line(b, i, colon_at(b, i, le), named, n):  # dropped
            if i > run:
                if to_client(R, c, c.rhead.p + run, <size_t>(i - run)) != 0:
                    return -1
                sent += i - run
            run = lf - b + 1
        i = lf - b + 1
    if to_client(R, c, c.rhead.p + run, <size_t>(end - run)) != 0:
        return -1
    sent += end - run
    if not keep:
        if to_client(R, c, b"connection: close\r\n", 19) != 0:
            return -1
        sent += 19
    elif b[7] == 0x30 or c.http10:  # (the status line was validated: b[7] is its minor)
        if to_client(R, c, b"connection: keep-alive\r\n", 24) != 0:
            return -1
        sent += 24
    if to_client(R, c, c.rhead.p + end, <size_t>(hl - end)) != 0:
        return -1
    c.client_bytes += sent + hl - end
    return 0


cdef int send_client_head(Relay *R, Conn *c, Py_ssize_t hl, bint keep) noexcept nogil:
    """client_head() in _exchange_py.py, for a head it rewrites (one with
    hop-by-hop lines, c.resp_hop, or that does not persist to a client that
    does): c.rhead[:hl] without its Connection, Keep-Alive,
    Proxy-Connection and Upgrade lines nor the fields its Connection field
    names, with "connection: close" added for a client that does not stay,
    "connection: keep-alive" for one that does when the response or the
    request is HTTP/1.0. The names are looked up sorted (among): no head
    costs more than n log n, however many it names. -1 when the connection
    went away."""
    cdef const unsigned char *b = <const unsigned char*>c.rhead.p
    cdef Py_ssize_t end = hl - 2  # (the empty line's CR LF)
    cdef Span *few = R.named
    cdef Span *named = few
    cdef Py_ssize_t n = 0
    cdef int r
    if c.resp_hop & HOP_NAMED:
        n = named_fields(b, end, few, MAX_NAMED)
        if n > MAX_NAMED:
            named = <Span*>malloc(<size_t>n * sizeof(Span))
            if named == NULL:
                conn_abort(R, c)
                return -1
            named_fields(b, end, named, n)
        if n > 1:
            qsort(named, <size_t>n, sizeof(Span), span_cmp)
    r = send_without_hop_lines(R, c, hl, named, n, keep)
    if named != few:
        free(named)
    return r


cdef bint edit_drops(const Span *names, int n, const unsigned char *p, Py_ssize_t k) noexcept nogil:
    """Whether the field name p[:k] is one of names[:n] (lowercase), whatever
    the case of its letters (a route's few names: a scan)."""
    cdef int j
    for j in range(n):
        if names[j].n == k and eq_lower(p, <const char*>names[j].p, k):
            return True
    return False


cdef int answer_edited(Relay *R, Conn *c, const char *data, size_t n, bint edited) noexcept nogil:
    """answer_client() for the relay's own answer to a request, *edited*
    when it is one whose choice was drawn (see HeadEdits in verdict.py):
    then, where its final head would be edited (c.edit_resp), the answer's
    head (local_response()'s, its lines ending in CRLF) without the lines
    c.edits names, with its lines and then a generated cookie's line
    (c.set_cookie: the pure twin has it among the edits' lines) before
    the empty line, then the body, none for a HEAD request
    (edit_local_answer() in _exchange_py.py). Never on the path of a
    request its upstream answers. -1 when the connection went away (out
    of memory: aborted)."""
    cdef const Edits_ *e = c.edits
    cdef const Span *drop = NULL
    cdef int n_drop = 0
    cdef const char *lines = NULL
    cdef size_t lines_len = 0
    cdef const unsigned char *b = <const unsigned char*>data
    cdef const unsigned char *lf
    cdef Py_ssize_t i, run, le, end = 0
    cdef size_t at = c.out.len
    if not edited or not c.edit_resp:
        return answer_client(R, c, data, n)
    if e != NULL and e.response:
        drop = e.resp_drop
        n_drop = e.n_resp_drop
        lines = e.resp_lines
        lines_len = e.resp_lines_len
    for i in range(3, <Py_ssize_t>n):
        if b[i] == LF and b[i - 1] == CR and b[i - 2] == LF and b[i - 3] == CR:
            end = i - 1  # the empty line
            break
    if end == 0:  # (never: local_response()'s heads end so)
        return answer_client(R, c, data, n)
    lf = <const unsigned char*>memchr(b, LF, <size_t>end)
    i = lf - b + 1  # (the status line goes as it is)
    run = 0
    while i < end:
        lf = <const unsigned char*>memchr(b + i, LF, <size_t>(end - i))
        le = line_end(b, i, lf)
        if edit_drops(drop, n_drop, b + i, colon_at(b, i, le) - i):
            if i > run and to_client(R, c, data + run, <size_t>(i - run)) != 0:
                return -1
            run = lf - b + 1
        i = lf - b + 1
    if (to_client(R, c, data + run, <size_t>(end - run)) != 0
            or to_client(R, c, lines, lines_len) != 0
            or to_client(R, c, c.set_cookie, c.set_cookie_len) != 0
            or to_client(R, c, data + end, 2) != 0):
        return -1
    date_stamp(R, c, at)
    if c.method_head:
        return 0
    return to_client(R, c, data + end + 2, n - <size_t>end - 2)


cdef int send_edited_head(Relay *R, Conn *c, Py_ssize_t hl, bint keep) noexcept nogil:
    """final_head()'s sending of c.rhead[:hl] when the request's choice
    edits its response, or the client is HTTP/1.0 and stays (client_head()
    then edit_response_head() in _exchange_py.py): rewritten where
    send_client_head() would rewrite it (its hop-by-hop lines left out, the
    relay's own connection line), or with "connection: close" added where
    final_head() adds it, or "connection: keep-alive" to a kept HTTP/1.0
    client where the head does not say it; either way
    without the lines c.edits names, with its lines added after the
    relay's own, then a generated cookie's line (c.set_cookie; c.edits
    NULL or without response edits when that alone brought it here), then
    a session token's line (c.sess: the answering endpoint's token, unless
    the request's named it; a header token's own lines left out). -1 when
    the connection went away."""
    cdef const Edits_ *e = c.edits
    cdef const Sess_ *ss = c.sess
    cdef const char *tok = NULL
    cdef size_t tok_len = 0, sess_len = 0
    cdef const char *sdrop = NULL
    cdef Py_ssize_t sdrop_len = 0
    cdef int k
    cdef const Span *drop = NULL
    cdef int n_drop = 0
    cdef const char *lines = NULL
    cdef size_t lines_len = 0
    cdef const unsigned char *b = <const unsigned char*>c.rhead.p
    cdef const unsigned char *lf = <const unsigned char*>memchr(b, LF, <size_t>hl)
    cdef Py_ssize_t i = lf - b + 1, run = 0, sent = 0, le, colon
    cdef Py_ssize_t end = hl - 2  # (the empty line's CR LF)
    cdef bint hop = (c.resp_hop & (HOP_LINES | HOP_NAMED) or (keep and not c.resp_persistent)
                     or (not keep and c.resp_hop & HOP_KEEP and c.resp_persistent))
    cdef const char *own = NULL
    cdef size_t own_len = 0
    cdef Span *few = R.named
    cdef Span *named = few
    cdef Py_ssize_t n = 0
    if e != NULL and e.response:
        drop = e.resp_drop
        n_drop = e.n_resp_drop
        lines = e.resp_lines
        lines_len = e.resp_lines_len
    if ss != NULL and c.up != NULL and c.up.ep != ss.pinned:
        for k in range(ss.n):
            if ss.ep[k] == c.up.ep:
                tok = ss.tok[k]
                tok_len = ss.tok_len[k]
                break
        if tok != NULL:
            sess_len = ss.pre_len + tok_len + ss.post_len
            sdrop = ss.drop
            sdrop_len = ss.drop_len
    if hop:
        if c.resp_hop & HOP_NAMED:  # (as send_client_head)
            n = named_fields(b, end, few, MAX_NAMED)
            if n > MAX_NAMED:
                named = <Span*>malloc(<size_t>n * sizeof(Span))
                if named == NULL:
                    conn_abort(R, c)
                    return -1
                named_fields(b, end, named, n)
            if n > 1:
                qsort(named, <size_t>n, sizeof(Span), span_cmp)
        if not keep:
            own = b"connection: close\r\n"
            own_len = 19
        elif b[7] == 0x30 or c.http10:
            own = b"connection: keep-alive\r\n"
            own_len = 24
    elif not keep and not c.resp_hop & HOP_CLOSE:
        own = b"connection: close\r\n"
        own_len = 19
    elif keep and c.http10 and not c.resp_hop & HOP_KEEP:
        own = b"connection: keep-alive\r\n"  # (client_head(): such a client closes else)
        own_len = 24
    while i < end:
        lf = <const unsigned char*>memchr(b + i, LF, <size_t>(end - i))
        if lf == NULL:  # (never: the head was judged whole)
            break
        le = line_end(b, i, lf)
        colon = colon_at(b, i, le)
        if ((hop and hop_line(b, i, colon, named, n))
                or (colon < le and edit_drops(drop, n_drop, b + i, colon - i))
                or (sdrop_len and colon - i == sdrop_len and eq_lower(b + i, sdrop, sdrop_len))):
            if i > run:
                if to_client(R, c, c.rhead.p + run, <size_t>(i - run)) != 0:
                    break  # (aborted)
                sent += i - run
            run = lf - b + 1
        i = lf - b + 1
    if named != few:
        free(named)
    if c.closed:
        return -1
    if (to_client(R, c, c.rhead.p + run, <size_t>(end - run)) != 0
            or to_client(R, c, own, own_len) != 0):
        return -1
    if sdrop_len and lines_len:  # (a header token replaces the edits' lines of its name too)
        lines_len = lines_without(R, c, lines, lines_len, sdrop, sdrop_len)
        if c.closed:
            return -1
    elif to_client(R, c, lines, lines_len) != 0:
        return -1
    if (to_client(R, c, c.set_cookie, c.set_cookie_len) != 0
            or (sess_len and (to_client(R, c, ss.pre, ss.pre_len) != 0
                              or to_client(R, c, tok, tok_len) != 0
                              or to_client(R, c, ss.post, ss.post_len) != 0))
            or to_client(R, c, c.rhead.p + end, <size_t>(hl - end)) != 0):
        return -1
    c.client_bytes += (sent + (end - run)
                       + <Py_ssize_t>(own_len + lines_len + c.set_cookie_len + sess_len)
                       + hl - end)
    return 0


cdef size_t lines_without(Relay *R, Conn *c, const char *lines, size_t n,
                          const char *name, Py_ssize_t name_len) noexcept nogil:
    """Send the header lines *lines* (each ``name: value`` CRLF, as the
    edits' block holds them) but those named *name* (lowercase): Envoy's
    header session state sets its header after the route's response
    headers, replacing theirs. The bytes sent (the connection may have
    gone: c.closed)."""
    cdef const unsigned char *b = <const unsigned char*>lines
    cdef const unsigned char *lf
    cdef Py_ssize_t i = 0, run = 0, end = <Py_ssize_t>n
    cdef size_t out = 0
    while i < end:
        lf = <const unsigned char*>memchr(b + i, LF, <size_t>(end - i))
        if lf == NULL:
            break
        if (colon_at(b, i, line_end(b, i, lf)) - i == name_len
                and eq_lower(b + i, name, name_len)):
            if i > run:
                if to_client(R, c, lines + run, <size_t>(i - run)) != 0:
                    return out
                out += <size_t>(i - run)
            run = lf - b + 1
        i = lf - b + 1
    if end > run and to_client(R, c, lines + run, <size_t>(end - run)) == 0:
        out += <size_t>(end - run)
    return out


cdef inline bint client_keeps(Conn *c) noexcept nogil:
    """Whether the client connection stays after the response whose final
    head was just judged (final_head())."""
    return (c.keep_alive and c.framing != F_CLOSE and c.req_left == 0
            and not c.client_eof and not c.draining)


cdef inline bint head_as_is(Conn *c, bint keep) noexcept nogil:
    """Whether final_head() sends the final head as it came (*keep*: the
    client stays): no edits, no hop-by-hop line to drop, nothing to say of
    the connection that it does not say; its branches' tests, negated."""
    return not (c.edit_resp or c.resp_hop & (HOP_LINES | HOP_NAMED)
                or (keep and not c.resp_persistent)
                or (not keep and c.resp_hop & HOP_KEEP and c.resp_persistent)
                or (not keep and not c.resp_hop & HOP_CLOSE))


cdef int answer_from_read(Relay *R, Conn *c, const char *data, size_t n, double now) noexcept nogil:
    """The whole answer to c's request, as it came, is data[:n], what was
    just read from its upstream, and goes as it is to a client that stays
    (final_head()'s common case; see upstream_bytes()): the exchange ends
    as final_head() ends it, the request counted, logged and its upstream
    released before the answer can reach the client (as when it waited in
    c.out for the step's end), then the answer is sent from there, what
    the kernel does not take at once copied into c.out for flush_client()
    (a send that failed meets its error again there), then the next
    request, or the close. -1 when the connection went away."""
    cdef ssize_t sent
    cdef bint keep
    c.keeps_client = True
    c.client_bytes += <Py_ssize_t>n
    c.resp_left = 0
    c.rs = RS_DONE
    keep = exchange_done(R, c, False, c.req_left > 0, now)
    if c.closed:
        return -1
    sent = sys_.send_nc(c.fd, data, n, sys_.MSG_NOSIGNAL | sys_.MSG_DONTWAIT)
    if sent < 0:
        sent = 0
    if <size_t>sent < n and to_client(R, c, data + sent, n - <size_t>sent) != 0:
        return -1
    if not keep:
        start_close(R, c, now)
    else:
        next_request(R, c, now)
    return -1 if c.closed else 0


cdef int final_head(Relay *R, Conn *c, Py_ssize_t hl, double now) noexcept nogil:
    """The final response head is c.rhead[:hl] (status, framing known):
    forward it, then what followed it. -1 when the connection went away.

    Whether the client connection persists is the client's (_client_persists
    in _exchange_py.py), not the upstream's. The head goes as client_head()
    in _exchange_py.py sends it. One with no hop-by-hop line to drop
    (c.resp_hop: nginx's "Connection: keep-alive" is none) goes as it is to
    a client that stays when it persists, and to one that does not with
    "connection: close" added unless it says close; any other is rewritten
    (send_client_head), as is one saying keep-alive to a client that does
    not stay (it would read "keep-alive" and our "close"). While draining
    (c.draining, see "Drain") no client stays."""
    cdef bint keep = client_keeps(c)
    cdef Py_ssize_t end
    cdef size_t rest
    cdef Buf held
    cdef int r
    c.keeps_client = keep
    if c.edit_resp:  # (response edits, or a generated cookie's line)
        if R.send_edited_head(R, c, hl, keep) != 0:
            return -1
    elif (c.resp_hop & (HOP_LINES | HOP_NAMED) or (keep and not c.resp_persistent)
            or (not keep and c.resp_hop & HOP_KEEP and c.resp_persistent)):
        if send_client_head(R, c, hl, keep) != 0:
            return -1
    elif not keep and not c.resp_hop & HOP_CLOSE:
        # the client does not read our close otherwise; the header goes
        # before the empty line that ends the head (its CR LF)
        end = hl - 2
        if to_client(R, c, c.rhead.p, end) != 0:
            return -1
        if to_client(R, c, b"connection: close\r\n", 19) != 0:
            return -1
        if to_client(R, c, c.rhead.p + end, hl - end) != 0:
            return -1
        c.client_bytes += hl + 19
    else:
        rest = c.rhead.len - hl
        if c.out.len == 0 and ((c.framing == F_LENGTH and <int64_t>rest == c.resp_left)
                               or (c.framing == F_NONE and rest == 0)):
            # the whole answer, as it came, in what was read (the common
            # keep-alive answer): c.rhead's block becomes c.out, no copy
            # (what forward_body() and complete() do after the copies)
            buf_free(&c.out)
            c.out = c.rhead
            c.rhead.p = NULL
            c.rhead.len = c.rhead.cap = c.rhead.off = 0
            c.client_bytes += hl + <Py_ssize_t>rest
            c.resp_left = 0
            c.rs = RS_DONE
            complete(R, c, False, c.req_left > 0, now)
            return -1 if c.closed else 0
        if to_client(R, c, c.rhead.p, hl) != 0:
            return -1
        c.client_bytes += hl
    c.rs = RS_BODY
    if c.framing == F_CHUNKED:
        memset(&c.ck, 0, sizeof(Chunked))
        c.ck.max_trailers = R.max_head
    rest = c.rhead.len - hl
    if rest:
        # what followed the head, from c.rhead's block taken out of c (the
        # exchange may end in forward_body and the next request's head be
        # staged in c.rhead): no copy
        held = c.rhead
        c.rhead.p = NULL
        c.rhead.len = c.rhead.cap = c.rhead.off = 0
        r = forward_body(R, c, held.p + hl, rest, now)
        buf_free(&held)
        if r != 0:
            return -1
    else:
        buf_free(&c.rhead)
        if c.framing == F_NONE:
            c.rs = RS_DONE
            complete(R, c, False, c.req_left > 0, now)
            return -1 if c.closed else 0
    return 0


cdef inline bint head_end_in(const unsigned char *b, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Whether an empty line starts in b[i:n]: an LF, then LF or CR LF, all
    in b[i:n] (where a head may end: response_head() finds no end of a head
    without one, and says 0 unless n > max_head). A look from i = the
    previous look's n - 2 misses none that straddles it."""
    cdef const unsigned char *lf
    while i < n - 1:
        lf = <const unsigned char*>memchr(b + i, LF, <size_t>(n - 1 - i))
        if lf == NULL:
            return False
        i = lf - b + 1
        if b[i] == LF or (b[i] == CR and i + 1 < n and b[i + 1] == LF):
            return True
    return False


cdef int upstream_bytes(Relay *R, Conn *c, const char *data, size_t n, double now) noexcept nogil:
    cdef Py_ssize_t hl = 0, k
    cdef int r
    cdef size_t rest, old
    cdef bint keep
    cdef HeadMemo *memo
    c.up_bytes += n
    if c.replayable and c.retry == NULL and c.shadow == NULL:  # a response began: never send this request again
        buf_free(&c.replay)  # (under a retry policy: once its final head is judged, head_out)
        c.replayable = False
        c.replay_staged = False
    if c.rs == RS_BODY:
        return forward_body(R, c, data, n, now)
    if c.rs == RS_DONE:
        return 0
    memo = &R.memo[memo_slot(c.up.ep)]
    if c.rhead.len == 0:
        # the response's first bytes, judged where they were read: a whole
        # answer that goes as it came to a client that stays (a keep-alive
        # GET's, mostly) goes from there, not copied into c.rhead first
        r = response_head_memo(R, c, <const unsigned char*>data, <Py_ssize_t>n, &hl, memo)
        if r == 1 and c.retry == NULL and c.out.len == 0:
            rest = n - <size_t>hl
            keep = client_keeps(c)
            if keep and head_as_is(c, keep) and (
                    (c.framing == F_LENGTH and <int64_t>rest == c.resp_left)
                    or (c.framing == F_NONE and rest == 0)):
                return answer_from_read(R, c, data, n, now)
        if buf_add(&c.rhead, data, n) != 0:
            conn_abort(R, c)
            return -1
        c.rhead_clean = 0
    else:
        old = c.rhead.len
        if buf_add(&c.rhead, data, n) != 0:
            conn_abort(R, c)
            return -1
        # a head trickled in: judged again only once its end may be here
        # (head_end_in(), from where the last look stopped), not from its
        # start at each read (quadratic in its size)
        if <size_t>c.rhead_clean <= old and c.rhead.len <= <size_t>R.max_head:
            k = c.rhead_clean - 2 if c.rhead_clean > 2 else 0
            L4R_ADD(&R.ctr[<int>CT_HEAD_RESCAN], <int64_t>c.rhead.len - k)
            if not head_end_in(<const unsigned char*>c.rhead.p, k, <Py_ssize_t>c.rhead.len):
                c.rhead_clean = <int>c.rhead.len
                return 0
        c.rhead_clean = 0
        L4R_ADD(&R.ctr[<int>CT_HEAD_RESCAN], <int64_t>c.rhead.len)
        r = response_head_memo(R, c, <const unsigned char*>c.rhead.p, <Py_ssize_t>c.rhead.len,
                               &hl, memo)
    while r == 3:  # an interim head: to the client, then the next head
        # (none to an HTTP/1.0 client: RFC 9110 §15.2; nor a 100 where the
        # relay said its own: body_here_read())
        if not c.http10 and not (c.continued and c.rhead.p[9] == b'1'
                                 and c.rhead.p[10] == b'0' and c.rhead.p[11] == b'0'):
            if to_client(R, c, c.rhead.p, <size_t>hl) != 0:
                return -1
            c.client_bytes += hl  # (no retry after it: can_retry)
        buf_drop(&c.rhead, <size_t>hl)
        r = response_head_fast(R, c, &hl) if c.rhead.len else 0
    if r == 0:
        return 0
    if r == 2:
        L4R_ADD(&R.ctr[<int>CT_PY_HEADS], 1)
        ask_python(R, c, N_RESPONSE)
        return 0
    return head_out(R, c, hl, now)


# -- long bodies: spliced ------------------------------------------------------------
# Once a Content-Length body has SPLICE_MIN bytes still to come and nothing
# waits to be sent on its way, the rest goes through a pipe with splice(2):
# upstream -> pipe -> client for a response (SPL_RESP), client -> pipe ->
# upstream for a request that can no longer be replayed (SPL_REQ); one at a
# time. The bytes never enter user space. The pipe is the connection's own
# (made for this body, closed at its end: no fds held between requests); it
# is filled only when empty, as the pump's (backpressure as with c.out: a
# pipe counts slots, one per segment spliced, so "full" cannot be told from
# the bytes it holds). An urgent mark stops splice() (see pump.pyx): an
# empty pipe, a readable socket, nothing spliced and sockatmark() says one;
# this body then goes back to the copy path, the pipe's bytes first
# (splice_fallback).

cdef void splice_stop(Conn *c) noexcept nogil:
    if c.splicing:
        sys_.close(c.pipe_r)
        sys_.close(c.pipe_w)
        c.splicing = False
        c.piped = 0


cdef int splice_start(Relay *R, Conn *c, int direction) noexcept nogil:
    """A pipe for the rest of this body; -1 (the copy path goes on) without."""
    cdef int p[2]
    cdef int cap
    if c.no_splice or sys_.pipe2(p, sys_.O_NONBLOCK | sys_.O_CLOEXEC) < 0:
        c.no_splice = True
        return -1
    sys_.fcntl(p[1], sys_.F_SETPIPE_SZ, <int>PIPE_SIZE)
    cap = sys_.fcntl(p[1], sys_.F_GETPIPE_SZ)
    if cap <= 0:
        sys_.close(p[0])
        sys_.close(p[1])
        c.no_splice = True
        return -1
    c.pipe_r = p[0]
    c.pipe_w = p[1]
    c.pipe_cap = cap
    c.piped = 0
    c.splicing = <unsigned char>direction
    L4R_ADD(&R.ctr[<int>CT_SPLICED], 1)
    return 0


cdef int splice_fallback(Relay *R, Conn *c) noexcept nogil:
    """The copy path for the rest of this body, the pipe's bytes queued first
    (order kept); -1 when the connection went away."""
    cdef ssize_t n
    while c.piped > 0:
        n = sys_.read(c.pipe_r, R.scratch, READ_SIZE if c.piped > READ_SIZE else <size_t>c.piped)
        if n < 0 and errno == EINTR:
            continue
        if n <= 0:
            conn_abort(R, c)
            return -1
        if c.splicing == SPL_RESP:
            if to_client(R, c, R.scratch, <size_t>n) != 0:
                return -1
        elif buf_add(&c.up.out, R.scratch, <size_t>n) != 0:
            conn_abort(R, c)
            return -1
        c.piped -= n
    splice_stop(c)
    c.no_splice = True
    return 0


cdef enum:
    SP_WAIT = 0            # splice_moves: moved what it could, wait for epoll
    SP_OUT_FAILED          # the receiving side failed
    SP_IN_EOF              # the sending side closed before the body's end
    SP_IN_FAILED           # ... or failed
    SP_MARK                # readable, yet nothing to splice: an urgent mark


cdef int splice_moves(Conn *c, int src, int dst, int64_t *left, bint may_send, bint readable,
                      double now) noexcept nogil:
    """Move a body through c's pipe: pipe -> *dst* while it takes it (and
    *may_send*), *src* -> pipe when the pipe is empty and *left* bytes are
    to come. *readable*: epoll said *src* is. SP_*."""
    cdef ssize_t n
    cdef int64_t want
    cdef bint moved = True, first = True
    cdef unsigned int flags = sys_.SPLICE_F_NONBLOCK | sys_.SPLICE_F_MOVE
    while moved:
        moved = False
        if c.piped and may_send:
            n = sys_.splice(c.pipe_r, NULL, dst, NULL, <size_t>c.piped, flags)
            if n > 0:
                c.piped -= n
                c.last_active = now
                moved = True
            elif n == 0 or (errno != EAGAIN and errno != EINTR):
                return SP_OUT_FAILED
        if left[0] and c.piped == 0:
            # Only into an empty pipe: one with bytes may be full (its
            # slots), and splice() into it fails (EAGAIN) like one at a mark.
            want = c.pipe_cap
            if want > left[0]:
                want = left[0]
            n = sys_.splice(src, NULL, c.pipe_w, NULL, <size_t>want, flags)
            if n > 0:
                c.piped += n
                left[0] -= n
                c.last_active = now
                moved = True
            elif n == 0:
                # at a mark with the FIN queued behind it splice() says EOF
                # (pump.pyx): what follows the mark is for recv()
                return SP_MARK if sys_.sockatmark(src) == 1 else SP_IN_EOF
            elif errno != EAGAIN and errno != EINTR:
                return SP_IN_FAILED
            elif first and readable and sys_.sockatmark(src) == 1:
                # (readable, yet nothing: the bytes may have gone earlier in
                # this batch, to the other side's event; that is no mark)
                return SP_MARK
            first = False
    return SP_WAIT


cdef void splice_body(Relay *R, Conn *c, bint readable, double now) noexcept nogil:
    """The response body: upstream -> pipe -> client (splice_moves)."""
    cdef int64_t before = c.resp_left
    cdef ssize_t n
    cdef int r = splice_moves(c, c.up.fd, c.fd, &c.resp_left, not c.out.len, readable, now)
    c.up_bytes += before - c.resp_left
    c.client_bytes += before - c.resp_left
    if r == SP_OUT_FAILED:
        conn_abort(R, c)  # the client went away mid-body
    elif r == SP_IN_EOF or r == SP_IN_FAILED:
        # closed or reset before the body's end: the pipe's bytes first
        if splice_fallback(R, c) == 0:
            on_upstream_eof(R, c, now)
    elif r == SP_MARK:
        L4R_ADD(&R.ctr[<int>CT_URGENT], 1)
        splice_fallback(R, c)  # recv() takes it from here
    elif c.resp_left == 0 and c.piped == 0:
        splice_stop(c)
        c.rs = RS_DONE
        # bytes after the body: the server is confused (as forward_body
        # sees them in the read that ends a copied body); pooled, the
        # connection would hand them to the next request as its answer.
        # Its FIN (0), or an error (a reset): the body's last bytes may have
        # been read here from the client's EPOLLOUT, the upstream unwatched
        # while the pipe held bytes, so no event said EPOLLRDHUP; pooled, a
        # request in this step (a pipelined one) would take a half-closed
        # connection (a POST: a 503)
        n = sys_.recv(c.up.fd, R.scratch, 1, sys_.MSG_PEEK | sys_.MSG_DONTWAIT)
        if n > 0:
            c.resp_persistent = False
        elif n == 0 or errno != EAGAIN:
            c.up.peer_closed = True
        complete(R, c, False, c.req_left > 0, now)


cdef void splice_request(Relay *R, Conn *c, bint readable, double now) noexcept nogil:
    """The request body: client -> pipe -> upstream (splice_moves)."""
    cdef Up *u = c.up
    cdef int r = splice_moves(c, c.fd, u.fd, &c.req_left, True, readable, now)
    if r == SP_OUT_FAILED:  # the server went away mid-body (or answered, and reset)
        upstream_send_failed(R, c, now)
    elif r == SP_IN_EOF:  # a request body cut short
        c.client_eof = True
        request_cut(R, c, now)
        splice_stop(c)
        up_discard(R, c)
        start_close(R, c, now)
    elif r == SP_IN_FAILED:
        conn_abort(R, c)
    elif r == SP_MARK:
        L4R_ADD(&R.ctr[<int>CT_URGENT], 1)
        if splice_fallback(R, c) == 0 and flush_up(R, u) != 0:
            upstream_send_failed(R, c, now)
    elif c.req_left == 0 and c.piped == 0:
        splice_stop(c)
        request_read(R, c, now)
        if c.shadow != NULL:  # (its copies dropped: a spliced body is not held)
            R.mirror_start(R, c, now)
        if c.rs == RS_DONE:
            complete(R, c, False, False, now)


cdef int64_t body_take(Conn *c, const char *p, int64_t n, bint *bad) noexcept nogil:
    """How many of the n client bytes at p belong to the request body (the
    rest is the next request's). *bad: a chunked body that cannot be framed;
    then the bytes before the refused one, to forward before bad_body() (as
    they would have gone in a read of their own)."""
    cdef int64_t used
    if c.rck == NULL:
        used = n if n < c.req_left else c.req_left
        c.req_left -= used
        return used
    used = TAKE_CHUNKED(c, p, n)
    if c.rck.state == C_ERROR:
        bad[0] = True
    return used


cdef int64_t take_chunked(Conn *c, const char *p, int64_t n) noexcept nogil:
    """body_take()'s chunked body: the machine over p[:n], its bytes
    counted (the access log's BYTES_RECEIVED). Called through TAKE_CHUNKED:
    never inlined into body_take(), which stays small enough to be inlined
    itself (its *bad* then never on the stack: no stack-protector canary
    for a request without a chunked body)."""
    cdef int64_t used = chunked(c.rck, <const unsigned char*>p, <Py_ssize_t>n)
    c.req_chunked += used
    if c.rck.state == C_DONE:
        c.req_left = 0
    return used


cdef int64_t (*TAKE_CHUNKED)(Conn *c, const char *p, int64_t n) noexcept nogil
TAKE_CHUNKED = take_chunked


cdef void bad_body(Relay *R, Conn *c, double now) noexcept nogil:
    """A chunked request body that cannot be framed: 400 (when no response
    byte went out yet) and close (_upstream_failed in _exchange_py.py)."""
    cdef int e = c.rck.error if 0 < c.rck.error < N_CHUNK_ERRORS else 0
    upstream_failed(R, c, 400, R.bad_chunk[e], R.bad_chunk_len[e], NULL, 0, NULL, 0, now,
                    OD_ANSWERED)


cdef void send_request(Relay *R, Conn *c, double now) noexcept nogil:
    """The upstream is ready: the head (rewritten) and what body bytes are here."""
    cdef Up *u = c.up
    cdef const char *b = c.inb.p
    cdef Py_ssize_t hl = <Py_ssize_t>c.head_len, avail
    cdef int64_t take
    cdef bint bad = False
    # Out of memory for any part: the connection goes (a request with a
    # part left out would frame the rest as something else).
    if c.retried and c.replay.len:
        if buf_add(&u.out, c.replay.p, c.replay.len) != 0:
            conn_abort(R, c)
            return
    else:
        # the head was rewritten when it completed: it is c.replay's start
        # when replayable, else rebuilt here
        avail = <Py_ssize_t>c.inb.len - hl
        take = body_take(c, b + hl, avail, &bad)
        if c.replay_staged and u.out.len == 0 and take == 0 and not bad:
            if send_staged(u, c) != 0:  # (the head alone: its block is the replay's)
                conn_abort(R, c)
                return
        else:
            replay_unstage(c)
            if u.out.len == 0:  # (the upstream head, staged): its block moves
                buf_free(&u.out)
                u.out = c.rhead
                c.rhead.p = NULL
                c.rhead.len = c.rhead.cap = c.rhead.off = 0
            elif buf_add(&u.out, c.rhead.p, c.rhead.len) != 0:
                conn_abort(R, c)
                return
        buf_free(&c.rhead)
        if bad:  # the head and the body bytes before the refused one go first
            if take > 0 and buf_add(&u.out, b + hl, <size_t>take) != 0:
                conn_abort(R, c)
                return
            flush_up(R, u)
            bad_body(R, c, now)
            return
        if take > 0:
            if buf_add(&u.out, b + hl, <size_t>take) != 0:
                conn_abort(R, c)
                return
            replay_add(c, b + hl, <size_t>take)
        buf_drop(&c.inb, <size_t>(hl + take))
        c.head_len = 0
        if c.replayable and c.replay.len > REPLAY_LIMIT:
            buf_free(&c.replay)
            c.replayable = False
    if c.req_left == 0:
        request_read(R, c, now)
    c.phase = P_EXCH
    c.rs = RS_HEAD
    # the primary's bytes first, then its copies (before a failed send's
    # end of the exchange: they go whatever the primary does)
    if flush_up(R, u) != 0:
        if c.shadow != NULL and c.req_left == 0:
            R.mirror_start(R, c, now)
        upstream_send_failed(R, c, now)
    elif c.shadow != NULL and c.req_left == 0:
        R.mirror_start(R, c, now)




cdef inline int64_t ep_load(EP *ep) noexcept nogil:
    """What LEAST_REQUEST orders by: this loop's requests to *ep* (connecting
    ones too) and those it does not hold (``ext``: the slow path's, the
    worker's L4 connections and the tunnels in the pump, until they end),
    which other threads store (HttpRelay.add_external)."""
    return ep.active + L4R_LOAD(&ep.ext)


cdef inline uint64_t hash_fnv_on(uint64_t h, const unsigned char *p, Py_ssize_t n) noexcept nogil:
    """FNV-1a 64 going on from h over p[:n]."""
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ p[i]) * <uint64_t>0x100000001B3
    return h


cdef inline uint64_t hash_fnv(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    """FNV-1a 64 of p[:n]: verdict.hash_key()'s twin."""
    return hash_fnv_on(<uint64_t>0xCBF29CE484222325, p, n)


cdef inline uint64_t hash_mix(uint64_t x) noexcept nogil:
    """splitmix64's finalizer: verdict._mix()'s twin."""
    x = (x ^ (x >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * <uint64_t>0x94D049BB133111EB
    return x ^ (x >> 31)


cdef bint cookie_value_in(const unsigned char *b, Py_ssize_t i, Py_ssize_t end,
                          const char *name, Py_ssize_t name_len,
                          const unsigned char **v, Py_ssize_t *vn) noexcept nogil:
    """The value of the first cookie named name[:name_len] in the cookie
    line's value b[i:end] (verdict.cookie_named): pairs split on ";", each trimmed, one pair of
    surrounding double quotes removed, into *v, *vn (maybe empty); False:
    none named so."""
    cdef Py_ssize_t ps, pe, e, vs, ve
    cdef const unsigned char *q
    while i <= end:
        q = <const unsigned char*>memchr(b + i, SEMI, <size_t>(end - i))
        pe = end if q == NULL else q - b
        ps = i
        i = pe + 1
        while ps < pe and is_ows(b[ps]):
            ps += 1
        while pe > ps and is_ows(b[pe - 1]):
            pe -= 1
        q = <const unsigned char*>memchr(b + ps, EQ, <size_t>(pe - ps))
        if q == NULL:
            continue
        e = q - b
        if e - ps != name_len or memcmp(b + ps, name, <size_t>name_len) != 0:
            continue
        vs = e + 1
        ve = pe
        if ve - vs >= 2 and b[vs] == DQUOTE and b[ve - 1] == DQUOTE:
            vs += 1
            ve -= 1
        v[0] = b + vs
        vn[0] = ve - vs
        return True
    return False


cdef bint request_key(const unsigned char *b, Py_ssize_t hl, const HashOn_ *h,
                      uint64_t *key) noexcept nogil:
    """The key (hash_fnv) of what h hashes in the request head b[:hl] (as
    received: what HashOn.key_of reads of Request.headers and the target),
    into *key; False: absent. A header on several lines: their values
    trimmed and joined with "," (request_headers() in routing.py), hashed
    as they go; a cookie: the first named so in the cookie lines, in order
    (their values joined with "; ")."""
    cdef const unsigned char *lf = <const unsigned char*>memchr(b, LF, <size_t>hl)
    cdef const unsigned char *q
    cdef const unsigned char *cv = NULL
    cdef Py_ssize_t cn = 0
    cdef Py_ssize_t i, le, vs, ve, ts, te, ps, pe, e
    cdef bint found = False
    cdef uint64_t k = <uint64_t>0xCBF29CE484222325
    cdef const char *name = h.name
    cdef Py_ssize_t name_len = h.name_len
    if lf == NULL:  # (never: a validated head)
        return False
    if h.kind == HK_QUERY:
        # the target: the request line's second word (origin-form here)
        le = line_end(b, 0, lf)
        q = <const unsigned char*>memchr(b, SP, <size_t>le)
        if q == NULL:
            return False
        ts = q - b + 1
        q = <const unsigned char*>memchr(b + ts, SP, <size_t>(le - ts))
        te = le if q == NULL else q - b
        q = <const unsigned char*>memchr(b + ts, QMARK, <size_t>(te - ts))
        if q == NULL:
            return False
        i = q - b + 1
        q = <const unsigned char*>memchr(b + i, HASH, <size_t>(te - i))
        if q != NULL:
            te = q - b
        while i <= te:
            q = <const unsigned char*>memchr(b + i, AMP, <size_t>(te - i))
            pe = te if q == NULL else q - b
            ps = i
            i = pe + 1
            q = <const unsigned char*>memchr(b + ps, EQ, <size_t>(pe - ps))
            e = pe if q == NULL else q - b
            if e - ps == name_len and memcmp(b + ps, name, <size_t>name_len) == 0:
                key[0] = hash_fnv(b + e + (1 if e < pe else 0), pe - e - (1 if e < pe else 0))
                return True
        return False
    if h.kind == HK_COOKIE:
        name = b"cookie"
        name_len = 6
    i = named_value(b, lf - b + 1, hl, name, name_len, &vs, &ve)
    while i >= 0:
        if h.kind == HK_COOKIE:
            if cookie_value_in(b, vs, ve, h.name, h.name_len, &cv, &cn):
                # the first named so, in any line (empty: absent)
                if cn == 0:
                    return False
                key[0] = hash_fnv(cv, cn)
                return True
        else:
            if found:
                k = hash_fnv_on(k, <const unsigned char*>b",", 1)
            k = hash_fnv_on(k, b + vs, ve - vs)
            found = True
        i = named_value(b, i, hl, name, name_len, &vs, &ve)
    if found:
        key[0] = k
    return found


cdef inline Py_ssize_t named_value(const unsigned char *b, Py_ssize_t i, Py_ssize_t hl,
                                   const char *name, Py_ssize_t name_len,
                                   Py_ssize_t *vs, Py_ssize_t *ve) noexcept nogil:
    """The next header line of the head b[:hl], from the line at b[i], named
    *name* (lowercase; the empty line ends the search): its value, OWS
    trimmed, in b[vs[0]:ve[0]], and the index of the line after it
    returned; -1 when none is left."""
    cdef const unsigned char *lf
    cdef Py_ssize_t le, colon, s, e
    while i < hl:
        lf = <const unsigned char*>memchr(b + i, LF, <size_t>(hl - i))
        if lf == NULL:
            return -1
        le = line_end(b, i, lf)
        if le == i:
            return -1  # the empty line
        colon = colon_at(b, i, le)
        if colon - i == name_len and eq_lower(b + i, name, name_len):
            s = colon + 1
            e = le
            while s < e and is_ows(b[s]):
                s += 1
            while e > s and is_ows(b[e - 1]):
                e -= 1
            vs[0] = s
            ve[0] = e
            return lf - b + 1
        i = lf - b + 1
    return -1


cdef int conn_peer(Conn *c) noexcept nogil:
    """The client's packed address (peer_of() in _relay_py.py: AF_INET's 4
    bytes of sin_addr, AF_INET6's 16 of sin6_addr) in c.peer, its length
    returned: accept()'s (new_conn()), else asked of the kernel once per
    connection (one getpeername), -1 when unknown (it failed, or the peer
    is no IP's)."""
    cdef sockaddr_storage ss
    cdef sys_.socklen_t n = sizeof(ss)
    if c.peer_len != 0:
        return c.peer_len
    c.peer_len = -1
    memset(&ss, 0, sizeof(ss))
    if getpeername(c.fd, <sockaddr*>&ss, &n) == 0:
        peer_from(c, &ss, n)
    return c.peer_len


cdef void peer_from(Conn *c, sockaddr_storage *ss, sys_.socklen_t n) noexcept nogil:
    """c.peer, c.peer_len and c.peer_port of the client's address *ss* (n
    bytes of it: accept()'s, getpeername()'s); -1 for one that is no IP's."""
    c.peer_len = -1
    if ss.ss_family == AF_INET and n >= sizeof(sockaddr_in):
        memcpy(c.peer, &(<sockaddr_in*>ss).sin_addr, 4)
        c.peer_port = (<sockaddr_in*>ss).sin_port
        c.peer_len = 4
    elif ss.ss_family == AF_INET6 and n >= sizeof(sockaddr_in6):
        memcpy(c.peer, &(<sockaddr_in6*>ss).sin6_addr, 16)
        c.peer_port = (<sockaddr_in6*>ss).sin6_port
        c.peer_len = 16


cdef int peer_log_text(Conn *c, char *out) noexcept nogil:
    """The client's address as DOWNSTREAM_REMOTE_ADDRESS says it (l4_sa_text's
    form) into out (LOG_ADDR bytes), from c.peer (conn_peer()); 0: none."""
    cdef uint32_t a4 = 0
    if conn_peer(c) <= 0:
        return 0
    if c.peer_len == 4:
        memcpy(&a4, c.peer, 4)
    return ep_text(out, c.peer_len == 16, a4, c.peer, c.peer_port)


cdef void hash_pick(Relay *R, Conn *c, const Choice_ *ch) noexcept nogil:
    """pick()'s endpoint order for a LB_HASH choice (hash_order() in
    verdict.py): the request's key, FNV-1a of what ch.hash names, or a
    random one when the request has none, or the key of a cookie generated
    for it (its line in c.set_cookie, for the final response head); then
    the first MAX_ATTEMPTS endpoints by descending hash_mix(key ^ their
    hash), ties by index. HK_SOURCE_IP's key: FNV-1a of the client's
    packed address (conn_peer()), a random one when it is unknown."""
    cdef const HashOn_ *h = ch.hash
    cdef uint64_t key, draw, sc
    cdef uint64_t score[MAX_ATTEMPTS]
    cdef char *line
    cdef const unsigned char *src
    cdef int i, j, d
    if h.kind == HK_SOURCE_IP:
        # (no cookie for it: _hash_on gives it no ttl's line)
        d = hash_source(c, &src)
        key = hash_fnv(src, d) if d > 0 else rng_next(R)
    elif request_key(<const unsigned char*>c.inb.p, <Py_ssize_t>c.head_len, h, &key):
        pass
    elif h.ck_pre == NULL:
        key = rng_next(R)  # (Envoy: a random host)
    else:
        # a cookie for the client to send back: 16 lowercase hex digits of
        # a draw (cookie_value()), hashed as if the request had sent it
        draw = rng_next(R)
        key = draw
        line = <char*>malloc(h.ck_pre_len + 16 + h.ck_post_len)
        if line != NULL:  # (out of memory: a random key, no cookie)
            memcpy(line, h.ck_pre, h.ck_pre_len)
            for i in range(16):
                d = <int>((draw >> (60 - 4 * i)) & 0xF)
                line[h.ck_pre_len + i] = <char>(0x30 + d if d < 10 else 0x57 + d)
            memcpy(line + h.ck_pre_len + 16, h.ck_post, h.ck_post_len)
            key = hash_fnv(<const unsigned char*>line + h.ck_pre_len, 16)
            free(c.set_cookie)  # (none: pick() runs once per request; a line never leaks)
            c.set_cookie = line
            c.set_cookie_len = h.ck_pre_len + 16 + h.ck_post_len
            c.holds = True  # (conn_drop_held frees it)
            c.edit_resp = True
    # the first MAX_ATTEMPTS by score, descending (an insertion sort; a
    # later endpoint passes an earlier one only with a higher score)
    for i in range(ch.n_eps):
        sc = hash_mix(key ^ h.ep_hash[i])
        if c.n_cand < MAX_ATTEMPTS:
            j = c.n_cand
            c.n_cand += 1
        elif sc > score[MAX_ATTEMPTS - 1]:
            j = MAX_ATTEMPTS - 1
        else:
            continue
        while j > 0 and sc > score[j - 1]:
            score[j] = score[j - 1]
            c.cand[j] = c.cand[j - 1]
            c.cand_tag[j] = c.cand_tag[j - 1]
            j -= 1
        score[j] = sc
        c.cand[j] = ch.eps[i]
        c.cand_tag[j] = i  # (its index in ch.eps alongside: then its tag)
    if c.mixed:
        for i in range(c.n_cand):
            c.cand_tag[i] = ch.ep_tags[c.cand_tag[i]]


cdef bint session_sent(const unsigned char *b, Py_ssize_t hl, const Session_ *s,
                       const unsigned char **v, Py_ssize_t *vn) noexcept nogil:
    """The token the request head b[:hl] (as received) sent into *v, *vn
    (SessionPersistence.sent): a cookie's, the first named s.name in the
    cookie lines, in order (cookie_value_in); a header's, its value on its
    one line, trimmed; False: none (absent, empty, a header on several
    lines)."""
    cdef const unsigned char *lf = <const unsigned char*>memchr(b, LF, <size_t>hl)
    cdef const unsigned char *cv = NULL
    cdef Py_ssize_t cn = 0
    cdef Py_ssize_t i, vs, ve
    cdef const char *name = s.name
    cdef Py_ssize_t name_len = s.name_len
    cdef int found = 0
    if lf == NULL:  # (never: a validated head)
        return False
    if s.kind == SK_COOKIE:
        name = b"cookie"
        name_len = 6
    i = named_value(b, lf - b + 1, hl, name, name_len, &vs, &ve)
    while i >= 0:
        if s.kind == SK_COOKIE:
            if cookie_value_in(b, vs, ve, s.name, s.name_len, &cv, &cn):
                v[0] = cv
                vn[0] = cn
                return cn > 0  # (the first named so; empty: absent)
        else:
            found += 1
            v[0] = b + vs
            vn[0] = ve - vs
        i = named_value(b, i, hl, name, name_len, &vs, &ve)
    return found == 1 and vn[0] > 0


cdef Choice_ *session_choice(Relay *R, Conn *c, Verdict_ *v) noexcept nogil:
    """pick()'s choice for a verdict with a session persistence (see
    "Session persistence"): that of the first endpoint, in choice order,
    whose token is the one the request sent (it in R.sess_pin), else the
    weighted draw's (R.sess_pin NULL)."""
    cdef const Session_ *s = v.session
    cdef const unsigned char *t = NULL
    cdef Py_ssize_t tn = 0, k
    cdef uint64_t r
    cdef int i, j
    R.sess_pin = NULL
    if session_sent(<const unsigned char*>c.inb.p, <Py_ssize_t>c.head_len, s, &t, &tn):
        for i in range(v.n):
            for j in range(v.choices[i].n_eps):
                k = s.first[i] + j
                if (s.tok[k + 1] - s.tok[k] == tn
                        and memcmp(s.bytes + s.tok[k], t, <size_t>tn) == 0):
                    R.sess_pin = v.choices[i].eps[j]
                    return &v.choices[i]
    if v.n > 1 and v.total > 0:
        r = rng_next(R) % v.total
        for i in range(v.n):
            if r < v.choices[i].weight:
                return &v.choices[i]
            r -= v.choices[i].weight
    return &v.choices[0]


cdef void session_pin(Relay *R, Conn *c, Verdict_ *v, const Choice_ *ch) noexcept nogil:
    """After pick() ordered choice *ch*'s candidates (see "Session
    persistence"): the endpoint the request's token named (R.sess_pin)
    first, the others after it in their order; then the request's Sess_,
    each candidate's token and the token line's bytes, for the final head
    (send_edited_head). Out of memory: no Sess_ (no token given)."""
    cdef const Session_ *s = v.session
    cdef EP *pin = R.sess_pin
    cdef int first = s.first[ch - v.choices]
    cdef int i, j, at, t = 0
    cdef Py_ssize_t k
    cdef size_t size
    cdef Sess_ *ss
    cdef char *p
    cdef int idx[MAX_ATTEMPTS]
    R.sess_pin = NULL
    if c.n_cand == 0:
        return
    if pin != NULL:
        at = -1
        for i in range(c.n_cand):
            if c.cand[i] == pin:
                at = i
                break
        if at >= 0:
            t = c.cand_tag[at]
        else:  # (past MAX_ATTEMPTS in its order: it comes in, the last goes)
            if c.n_cand < MAX_ATTEMPTS:
                c.n_cand += 1
            at = c.n_cand - 1
            if c.mixed:
                for j in range(ch.n_eps):
                    if ch.eps[j] == pin:
                        t = ch.ep_tags[j]
                        break
        i = at
        while i > 0:
            c.cand[i] = c.cand[i - 1]
            c.cand_tag[i] = c.cand_tag[i - 1]
            i -= 1
        c.cand[0] = pin
        c.cand_tag[0] = t
    size = sizeof(Sess_) + s.pre_len + s.post_len
    if s.kind == SK_HEADER:
        size += <size_t>s.name_len
    for i in range(c.n_cand):
        idx[i] = -1
        for j in range(ch.n_eps):
            if ch.eps[j] == c.cand[i]:
                idx[i] = first + j
                size += <size_t>(s.tok[first + j + 1] - s.tok[first + j])
                break
    ss = <Sess_*>malloc(size)
    if ss == NULL:
        return
    p = <char*>ss + sizeof(Sess_)
    ss.pinned = pin
    ss.n = c.n_cand
    for i in range(c.n_cand):
        ss.ep[i] = c.cand[i]
        ss.tok[i] = NULL
        ss.tok_len[i] = 0
        k = idx[i]
        if k < 0:  # (never: a candidate is one of its choice's)
            continue
        ss.tok[i] = p
        ss.tok_len[i] = <size_t>(s.tok[k + 1] - s.tok[k])
        memcpy(p, s.bytes + s.tok[k], ss.tok_len[i])
        p += ss.tok_len[i]
    memcpy(p, s.pre, s.pre_len)
    ss.pre = p
    ss.pre_len = s.pre_len
    p += s.pre_len
    memcpy(p, s.post, s.post_len)
    ss.post = p
    ss.post_len = s.post_len
    p += s.post_len
    ss.drop = NULL
    ss.drop_len = 0
    if s.kind == SK_HEADER:
        memcpy(p, s.name, <size_t>s.name_len)
        ss.drop = p
        ss.drop_len = s.name_len
    free(c.sess)  # (none: pick() runs once per request)
    c.sess = ss
    c.holds = True  # (conn_drop_held frees it)
    c.edit_resp = True


cdef void pick(Relay *R, Conn *c, Verdict_ *v) noexcept nogil:
    """The weighted draw and the endpoint order of one request; for a
    choice with a tag per endpoint, each candidate's (c.cand_tag, c.mixed:
    see "Tags per endpoint"); under a session persistence, the choice and
    the first endpoint its token names (see "Session persistence")."""
    cdef Choice_ *ch = &v.choices[0]
    cdef uint64_t r
    cdef int i, j, k, n, start, best
    cdef EP *tmp
    if v.session != NULL:
        ch = R.session_choice(R, c, v)
    elif v.n > 1 and v.total > 0:
        r = rng_next(R) % v.total
        for i in range(v.n):
            if r < v.choices[i].weight:
                ch = &v.choices[i]
                break
            r -= v.choices[i].weight
    c.tag = ch.tag
    c.mixed = ch.ep_tags != NULL
    c.empty = ch.empty
    c.edits = ch.edits  # (its reference: apply_verdict(), which tests it)
    n = ch.n_eps
    c.n_cand = 0
    if n == 0:
        return
    if ch.policy == LB_HASH:
        R.hash_pick(R, c, ch)
        if v.session != NULL:
            R.session_pin(R, c, v, ch)
        return
    if ch.policy == LB_RANDOM:
        start = <int>(rng_next(R) % <uint64_t>n)
    elif ch.policy == LB_ORDERED:
        start = 0
    else:
        start = <int>(R.rr[ch.rr] % <uint64_t>n)
        R.rr[ch.rr] += 1
    if ch.policy == LB_LEAST_REQUEST:
        # the first MAX_ATTEMPTS of a stable sort by active count, from
        # start (each one's index in ch.eps alongside, in c.cand_tag: then
        # its tag; an array on the stack would cost every pick() a
        # stack-protector canary)
        for i in range(n):
            k = (start + i) % n
            tmp = ch.eps[k]
            if c.n_cand < MAX_ATTEMPTS:
                c.n_cand += 1
                j = c.n_cand - 1
            elif ep_load(tmp) < ep_load(c.cand[MAX_ATTEMPTS - 1]):
                j = MAX_ATTEMPTS - 1
            else:
                continue
            c.cand[j] = tmp
            c.cand_tag[j] = k
            while j > 0 and ep_load(c.cand[j]) < ep_load(c.cand[j - 1]):
                tmp = c.cand[j]
                c.cand[j] = c.cand[j - 1]
                c.cand[j - 1] = tmp
                k = c.cand_tag[j]
                c.cand_tag[j] = c.cand_tag[j - 1]
                c.cand_tag[j - 1] = k
                j -= 1
        if c.mixed:
            for i in range(c.n_cand):
                c.cand_tag[i] = ch.ep_tags[c.cand_tag[i]]
    else:
        for i in range(n if n < MAX_ATTEMPTS else MAX_ATTEMPTS):
            c.cand[i] = ch.eps[(start + i) % n]
        c.n_cand = n if n < MAX_ATTEMPTS else MAX_ATTEMPTS
        if c.mixed:
            for i in range(c.n_cand):
                c.cand_tag[i] = ch.ep_tags[(start + i) % n]
    if v.session != NULL:
        R.session_pin(R, c, v, ch)




cdef int edit_lines(Buf *out, const unsigned char *b, Py_ssize_t i, Py_ssize_t end,
                    const Span *drop, int n_drop, const Edits_ *host) noexcept nogil:
    """The header lines of a head b from i to end (its empty line) into
    out (_edited_lines() in _exchange_py.py): those named in drop[:n_drop]
    left out, the Host lines' value host.authority (host NULL: as they
    are). Nonzero when out of memory."""
    cdef const unsigned char *lf
    cdef Py_ssize_t le, colon, run = i
    cdef int failed = 0
    while i < end:
        lf = <const unsigned char*>memchr(b + i, LF, <size_t>(end - i))
        if lf == NULL:  # (never: the head was judged whole)
            break
        le = line_end(b, i, lf)
        colon = colon_at(b, i, le)
        if colon < le and edit_drops(drop, n_drop, b + i, colon - i):
            failed |= buf_add(out, <const char*>b + run, <size_t>(i - run))
            run = lf - b + 1
        elif host != NULL and header_is(b + i, colon - i, b"host", 4):
            failed |= buf_add(out, <const char*>b + run, <size_t>(colon + 1 - run))
            failed |= buf_add(out, b" ", 1)
            failed |= buf_add(out, host.authority, host.authority_len)
            run = le  # (its CR LF, or LF, follows)
        i = lf - b + 1
    failed |= buf_add(out, <const char*>b + run, <size_t>(end - run))
    return failed


cdef int edit_request(Relay *R, Conn *c, const Edits_ *e, double now) noexcept nogil:
    """The head staged in c.rhead (as sent upstream) with the request's
    choice's edits (edit_request_head() in _exchange_py.py), and so the copy
    c.replay holds for a retry (the head alone yet: its body follows in
    send_request). A fast-path head's target is origin-form. -1 when out
    of memory: the connection is aborted (a head half edited must not go);
    -1 too when the path rewritten has a dot-segment the parser would
    refuse on input: answered as it would (rewrite_refused()), and so is
    a head whose first line is not METHOD SP TARGET SP ... (never: the
    head staged starts with its request line, drop_empty_lines(); not
    read past its end if it were)."""
    cdef const unsigned char *b = <const unsigned char*>c.rhead.p
    cdef Py_ssize_t hl = <Py_ssize_t>c.rhead.len
    cdef const unsigned char *lf = <const unsigned char*>memchr(b, LF, <size_t>hl)
    cdef const unsigned char *q = NULL
    cdef const unsigned char *sp = NULL
    cdef Py_ssize_t first, ts, te, pe, n, cut
    cdef Py_ssize_t end = hl - 2  # (the empty line's CR LF: stage_attempt()'s)
    cdef Buf *out = &R.edited  # (empty between calls; in R, not on the stack: no canary)
    cdef int failed = 0
    if lf != NULL:
        sp = <const unsigned char*>memchr(b, SP, <size_t>(lf - b))
    if sp != NULL:
        q = <const unsigned char*>memchr(sp + 1, SP, <size_t>(lf - sp - 1))
    if q == NULL:
        rewrite_refused(R, c, now)
        return -1
    first = lf - b + 1
    ts = sp - b + 1
    if e.path and b[ts] == SLASH:
        te = q - b
        q = <const unsigned char*>memchr(b + ts, QMARK, <size_t>(te - ts))
        pe = te if q == NULL else q - b
        n = pe - ts
        cut = n if (e.strip < 0 or e.strip > n) else e.strip
        failed |= buf_add(out, <const char*>b, <size_t>ts)
        if e.prefix_len == 0 and cut == n:  # a path left empty is "/"
            failed |= buf_add(out, b"/", 1)
        else:
            failed |= buf_add(out, e.prefix, e.prefix_len)
            failed |= buf_add(out, <const char*>b + ts + cut, <size_t>(n - cut))
        failed |= buf_add(out, <const char*>b + pe, <size_t>(first - pe))
        if not failed and has_dot_segment(<const unsigned char*>out.p, ts,
                                          <Py_ssize_t>out.len - (first - te)):
            buf_free(out)
            rewrite_refused(R, c, now)
            return -1
    else:
        failed |= buf_add(out, <const char*>b, <size_t>first)
    failed |= edit_lines(out, b, first, end, e.req_drop, e.n_req_drop,
                         e if e.authority != NULL else NULL)
    failed |= buf_add(out, e.req_lines, e.req_lines_len)
    failed |= buf_add(out, <const char*>b + end, <size_t>(hl - end))
    if failed:
        buf_free(out)
        conn_abort(R, c)
        return -1
    buf_free(&c.rhead)
    c.rhead = out[0]
    out.p = NULL
    out.len = out.cap = out.off = 0
    if c.replayable and not c.replay_staged:  # (a staged replay is c.rhead's)
        buf_free(&c.replay)
        replay_add(c, c.rhead.p, c.rhead.len)
    return 0


cdef void rewrite_refused(Relay *R, Conn *c, double now) noexcept nogil:
    """A path rewrite made a dot-segment: the parser's answer to such a
    target on input (400, R_dot_segment), the connection closed, nothing
    upstream (refused_rewrite() in _exchange_py.py)."""
    cdef size_t before = c.out.len
    answer_client(R, c, R_dot_segment.close, R_dot_segment.close_len)
    if c.closed:
        return
    c.lflags |= LF_PATH
    c.client_bytes += c.out.len - before
    request_done(R, c, 400, True, now)
    buf_drop(&c.inb, c.head_len)
    c.head_len = 0
    buf_free(&c.rhead)
    c.no_linger = done_talking(c)
    start_close(R, c, now)


cdef void local_answer(Relay *R, Conn *c, Verdict_ *v, double now, bint edited,
                       bint whole) noexcept nogil:
    """refuse() in _exchange_py.py: the connection stays when the head asks
    for it and the request has no body, or (*whole*: the route's own
    answer, or the router's for a choice with no endpoint, before any try;
    the 503 of a first try's every connect failed, connect_failed_next():
    a circuit breaker's and out of fds' refuse it at once, as Envoy's pool
    does before its router read the body) its whole body came with its head: dropped (body_take(), counted as
    read: BYTES_RECEIVED), as a fault's abort drops it; else the answer
    says ``connection: close``. A kept HTTP/1.0 client gets the variant
    that says ``connection: keep-alive`` (v.keep10). *edited*: the relay's
    own answer to a request whose choice was drawn (none answered, a
    circuit breaker, out of fds), which gets its response edits
    (answer_edited)."""
    cdef bint keep = c.keep_alive and not c.client_eof and not c.draining
    cdef bint bad = False
    cdef int64_t take = 0
    cdef size_t before = c.out.len
    if c.shadow != NULL:  # (drawn: its connects failed, a circuit breaker, no fd)
        mirror_give_up(R, c, now)
    if v.tag >= 0:
        c.tag = v.tag
    if keep and c.req_left:
        if whole:
            take = body_take(c, c.inb.p + c.head_len, <int64_t>(c.inb.len - c.head_len), &bad)
        keep = c.req_left == 0 and not bad
    if not keep:
        answer_edited(R, c, v.close, v.close_len, edited)
    elif c.http10:
        answer_edited(R, c, v.keep10, v.keep10_len, edited)
    else:
        answer_edited(R, c, v.keep, v.keep_len, edited)
    if c.closed:
        return
    c.lflags |= v.lflags  # (the access log's: why the relay answers)
    c.client_bytes += c.out.len - before
    request_done(R, c, v.status, True, now)
    buf_drop(&c.inb, c.head_len + <size_t>take if keep else c.head_len)
    c.head_len = 0
    buf_free(&c.rhead)
    c.no_linger = done_talking(c)
    if keep:
        next_request(R, c, now)
    else:
        start_close(R, c, now)


cdef void apply_verdict(Relay *R, Conn *c, Verdict_ *v, double now) noexcept nogil:
    cdef Up *u
    cdef EP *ep
    cdef Verdict_ *empty
    c.started = now
    c.uncounted = True
    c.lflags = 0  # (its row's flags and its line's, from here)
    if c.lg != NULL:  # (the access log's: see "Access log")
        R.log_capture(R, c)
    if v.kind == V_LOCAL:
        if v.decided and not R.decide_only:
            count_row(R, v.tag, 0, 0.0)  # l4proxy_decisions_total: a route's answer
        if v.fault != NULL:
            if v.tag >= 0:
                c.tag = v.tag  # (an abort's answer is tagged as the local one)
            if fault_drawn(R, c, v.fault, v, now):
                return  # (the fault filter before the router: delayed or aborted)
        local_answer(R, c, v, now, False, True)
        return
    pick(R, c, v)
    empty = c.empty
    c.empty = NULL  # (a part of v, which may be freed once this returns)
    if not R.decide_only:
        count_row(R, c.tag, 0, 0.0)  # l4proxy_decisions_total
    if c.n_cand == 0:
        c.edits = NULL  # (no reference taken: its answer is local)
        if empty == NULL:
            empty = v
        if v.fault != NULL and fault_drawn(R, c, v.fault, empty, now):
            return  # (the fault filter before the router: delayed or aborted)
        local_answer(R, c, empty, now, False, True)
        return
    c.timeout = v.timeout
    if c.edits != NULL:
        c.edits.refs += 1  # (the request's, until conn_drop_held())
        c.holds = True
        if c.edits.response:
            c.edit_resp = True
        if c.edits.request and R.edit_request(R, c, c.edits, now) != 0:
            return  # (out of memory: aborted; or answered: a dot-segment made)
    if v.retry != NULL:
        c.retry = v.retry
        v.retry.refs += 1
        c.holds = True
        # every method is held for the policy's tries (Envoy retries any):
        # the head as sent upstream, staged in c.rhead; its body follows
        # (not for a policy that never retries: its per-try timeout only)
        if v.retry.on and not c.replayable:
            c.replayable = True
            c.replay_staged = True  # (see replay_unstage())
    if v.n_mirrors:
        R.mirror_draw(R, c, v)
    if v.fault != NULL and fault_drawn(R, c, v.fault, NULL, now):
        return  # delayed (timers_due() goes on with it) or aborted
    if c.req_left == 0:
        request_read(R, c, now)  # a request without a body: its connect counts
    else:  # one whose body came with its head: its connect too; else its 100 Continue
        BODY_HERE_READ(R, c, now)
        if c.closed:
            return  # (out of memory for the 100: aborted)
    try_ep(R, c, c.cand[0], now, True)


cdef inline bint share_falls(Relay *R, uint64_t ppm) noexcept nogil:
    """A draw of the relay's RNG: True with probability ppm / FAULT_SCALE
    (a fault's share, a mirror's; none for 0 or FAULT_PPM and above)."""
    if ppm == 0:
        return False
    return ppm >= FAULT_PPM or rng_next(R) % FAULT_PPM < ppm


cdef bint fault_drawn(Relay *R, Conn *c, Fault_ *f, Verdict_ *local,
                      double now) noexcept nogil:
    """A route's fault injection for this request (see "Fault injection"):
    the delay's draw, then the abort's. True when the request is delayed
    (it waits in P_CONNECT with no upstream and no timer of its route,
    c.fault_until set, R.next_timer no later: timers_due() ends the wait,
    fault_over()) or aborted (fault_abort()). *local*: the request's local
    answer (its route's, or its choice's with no endpoint; NULL: it goes
    upstream), given after a delay with no abort: a copy (its verdict may
    be freed meanwhile), c.fault_local."""
    cdef bint delayed = share_falls(R, f.delay_ppm) and f.delay > 0
    cdef bint aborted = share_falls(R, f.abort_ppm)
    cdef Verdict_ *copy = NULL
    if delayed:
        if not aborted and local != NULL:
            copy = verdict_copy_local(local)
            if copy == NULL:  # (out of memory: answered now, undelayed)
                local_answer(R, c, local, now, False, True)
                return True
        c.phase = P_CONNECT
        c.lflags |= LF_DI
        c.fault_until = now + f.delay
        c.fault_answer = f.answer if aborted else copy
        c.fault_local = copy != NULL
        c.fault = f  # (held: its answer is read when the delay ends)
        f.refs += 1
        c.last_active = c.fault_until  # (a wait is no idleness)
        timer_at(R, c.fault_until)
        return True
    if aborted:
        fault_abort(R, c, f.answer, now)
        return True
    return False


cdef void fault_over(Relay *R, Conn *c, double now) noexcept nogil:
    """A fault's delay passed: the abort's answer, else the first try (its
    route and per-try timers from now, as Envoy's router's)."""
    cdef Verdict_ *answer = c.fault_answer
    cdef Fault_ *f = c.fault
    c.fault_until = 0
    c.fault_answer = NULL
    c.fault = NULL
    if c.fault_local:  # a local answer's copy: given, freed
        c.fault_local = False
        local_answer(R, c, answer, now, False, True)
        verdict_free(answer)
    elif answer != NULL:
        fault_abort(R, c, answer, now)
    if f != NULL:
        f.refs -= 1  # (after its answer went: no sweep runs meanwhile)
    if answer != NULL:
        return
    if c.req_left == 0:
        request_read(R, c, now)
    else:
        BODY_HERE_READ(R, c, now)
        if c.closed:
            return  # (out of memory for the 100: aborted)
    try_ep(R, c, c.cand[0], now, True)


cdef void fault_abort(Relay *R, Conn *c, Verdict_ *v, double now) noexcept nogil:
    """A fault's abort: the local answer (local_answer()'s, its status and
    FAULT_ABORT_BODY, with the tag pick() chose). A request body all here
    already is dropped (body_take()) and the connection kept as the head
    asks; one not complete (or not framed) closes it: the answer says
    ``connection: close``, then the lingering close (Envoy's
    downstream_rq_response_before_rq_complete; refuse(whole=True) in
    _exchange_py.py)."""
    cdef bint keep = c.keep_alive and not c.client_eof and not c.draining
    cdef bint bad = False
    cdef int64_t take = 0
    cdef size_t before = c.out.len
    if v.tag >= 0:
        c.tag = v.tag  # (Fault.tag: what an abort's reports carry)
    if keep and c.req_left:
        take = body_take(c, c.inb.p + c.head_len, <int64_t>(c.inb.len - c.head_len), &bad)
        keep = c.req_left == 0 and not bad
    if not keep:
        answer_client(R, c, v.close, v.close_len)
    elif c.http10:
        answer_client(R, c, v.keep10, v.keep10_len)
    else:
        answer_client(R, c, v.keep, v.keep_len)
    if c.closed:
        return
    c.lflags |= v.lflags  # (FI)
    c.client_bytes += c.out.len - before
    request_done(R, c, v.status, True, now)
    buf_drop(&c.inb, c.head_len + <size_t>take if keep else c.head_len)
    c.head_len = 0
    buf_free(&c.rhead)
    if not keep:
        c.no_linger = done_talking(c)
        start_close(R, c, now)
        return
    next_request(R, c, now)


cdef inline void try_ep(Relay *R, Conn *c, EP *ep, double now, bint pooled) noexcept nogil:
    """A try to *ep*: on its idle pooled connection (*pooled*), else a new
    one (connect_to: within max_connections, or waiting behind those that
    wait already); at max_active the overflow answer. Without limits: a
    compare more than before, and one where a connection is idle."""
    if ep.max_active and ep.active >= ep.max_active:
        overflow(R, c, ep, now)
    elif ep.idle_head != NULL and (pooled or ep.max_connections) and ep.pend_head == NULL:
        take_idle(R, c, ep, now)  # (with requests waiting, theirs: first come first served)
    else:
        connect_to(R, c, ep, now)


cdef void overflow(Relay *R, Conn *c, EP *ep, double now) noexcept nogil:
    """A circuit breaker's answer: Envoy's 503 (no outcome: the endpoint did
    nothing), UO; a retry's too, its request lost (retry_refused())."""
    L4R_ADD(&ep.overflows, 1)
    if c.retried:
        retry_refused(R, c, R_overflow, now)
    else:
        local_answer(R, c, R_overflow, now, True, False)


cdef void retry_refused(Relay *R, Conn *c, Verdict_ *v, double now) noexcept nogil:
    """A retry (the reused connection's own, or the policy's) refused before
    it reached an upstream: a circuit breaker's overflow (R_overflow), no fd
    for its connection (R_overloaded). The request is lost: answered as a
    first try so refused is (*v*'s answer, edited), the client connection
    kept as after a gateway failure's answer (upstream_failed; c.up is NULL:
    no outcome), the line saying v's why (not the 503 and UC of a
    connection that closed: none was open). Never retried, as a first try
    so refused is not (Envoy's router never retries an overflow):
    Exchange.retry_refused in _exchange_py.py."""
    c.lflags |= v.lflags
    upstream_failed(R, c, v.status, v.close, v.close_len, v.keep, v.keep_len, v.keep10,
                    v.keep10_len, now, OD_BEFORE)


cdef void serve_pending(Relay *R, double now) noexcept nogil:
    """The kicked endpoints' waiting requests, first come first served: each
    on an idle connection (one just released), else a new one while below
    the endpoint's limits; the rest wait for the next kick (no scan when
    nothing changed). A closed Conn is buried by the caller."""
    cdef EP *ep
    cdef Conn *c
    while R.kick_head != NULL:
        ep = R.kick_head
        R.kick_head = ep.kick_next
        ep.kick_next = NULL
        ep.kicked = False
        while ep.pend_head != NULL:
            if ep.max_active and ep.active >= ep.max_active:
                break
            if ep.idle_head == NULL and ep.max_connections and ep.n_open >= ep.max_connections:
                break
            c = ep.pend_head
            pend_unlink(c)
            if ep.idle_head != NULL:
                take_idle(R, c, ep, now)
            else:
                connect_to(R, c, ep, now)
            settle(R, c)


cdef void reached(Conn *c, const EP *ep) noexcept nogil:
    """A try of c's request reached *ep* (one of its connections taken, or
    a connect begun), of a choice with a tag per endpoint (c.mixed): the
    request is reported with ep's tag from now on (see "Tags per
    endpoint"). A candidate's: found among c.cand, at most MAX_ATTEMPTS."""
    cdef int i
    for i in range(c.n_cand):
        if c.cand[i] == ep:
            c.tag = c.cand_tag[i]
            return


cdef inline void take_idle(Relay *R, Conn *c, EP *ep, double now) noexcept nogil:
    """A try (the first, or a retry policy's) on *ep*'s idle pooled
    connection (ep.idle_head, not NULL): checked out, the request sent."""
    cdef Up *u = ep.idle_head
    if c.mixed:
        reached(c, ep)
    idle_unlink(ep, u)
    L4R_ADD(&R.ctr[<int>CT_IDLE], -1)
    L4R_ADD(&R.ctr[<int>CT_REUSED], 1)
    u.owner = c
    u.reused = True
    u.sent = False
    ep.active += 1
    c.up = u
    send_request(R, c, now)


cdef inline int connect_addr(int fd, bint v6, uint32_t addr, const unsigned char *addr6,
                             uint16_t port) noexcept nogil:
    """connect() fd to an endpoint's address (addr, or addr6 when v6; both
    and port in network order): connect()'s result."""
    cdef sockaddr_in sa
    cdef sockaddr_in6 sa6
    if v6:
        memset(&sa6, 0, sizeof(sa6))
        sa6.sin6_family = AF_INET6
        sa6.sin6_port = port
        memcpy(sa6.sin6_addr.s6_addr, addr6, 16)
        return connect(fd, &sa6, sizeof(sa6))
    memset(&sa, 0, sizeof(sa))
    sa.sin_family = AF_INET
    sa.sin_port = port
    sa.sin_addr.s_addr = addr
    return connect(fd, &sa, sizeof(sa))


cdef void connect_to(Relay *R, Conn *c, EP *ep, double now) noexcept nogil:
    cdef int fd, one = 1, r
    cdef Up *u
    c.phase = P_CONNECT
    if ep.max_connections and ep.n_open >= ep.max_connections:
        if ep.max_pending and ep.n_pending >= ep.max_pending:
            overflow(R, c, ep, now)
            return
        # waits (in P_CONNECT, no upstream: watched for its reset, its
        # route timeout running) for serve_pending()
        c.up = NULL
        c.pend_ep = ep
        c.pend_next = NULL
        c.pend_prev = ep.pend_tail
        if ep.pend_tail != NULL:
            ep.pend_tail.pend_next = c
        else:
            ep.pend_head = c
        ep.pend_tail = c
        L4R_ADD(&ep.n_pending, 1)
        return
    if c.mixed:  # (a connect begun, whatever becomes of it; not a wait in line)
        reached(c, ep)
    if not ep.numeric:
        c.fail_ep = ep
        c.fail_errno = -1  # "not resolved yet"
        L4R_ADD(&R.ctr[<int>CT_CONNECT_ERRORS], 1)
        ask_python(R, c, N_CONNECT_FAILED)
        return
    fd = socket(AF_INET6 if ep.v6 else AF_INET, sys_.SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0 and (errno == EMFILE or errno == ENFILE):
        # Out of fds is ours, not the endpoint's: no outlier detection (a
        # flood must not eject healthy pods); the L4 path's 503 "overloaded",
        # OM (Envoy's router would say UF, a local connection failure: one
        # flag for one cause here); a retry's too, its request lost
        R.n_fd_limit += 1
        if c.retried:
            retry_refused(R, c, R_overloaded, now)
        else:
            local_answer(R, c, R_overloaded, now, True, False)
        return
    if fd < 0:
        c.fail_ep = ep
        c.fail_errno = errno
        L4R_ADD(&R.ctr[<int>CT_CONNECT_ERRORS], 1)
        ask_python(R, c, N_CONNECT_FAILED)
        return
    sys_.setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
    # Urgent data (send(MSG_OOB)) is read in its place in the stream: without
    # SO_OOBINLINE recv() skips the urgent byte (a body a byte short), as
    # the pump's sockets have it (accepted clients: from the listener,
    # listen(); handed-off ones: new_conn())
    sys_.setsockopt(fd, sys_.SOL_SOCKET, sys_.SO_OOBINLINE, &one, sizeof(one))
    r = connect_addr(fd, ep.v6, ep.addr, ep.addr6, ep.port)
    if r != 0 and errno != EINPROGRESS:
        c.fail_ep = ep
        c.fail_errno = errno
        sys_.close(fd)
        L4R_ADD(&R.ctr[<int>CT_CONNECT_ERRORS], 1)
        ask_python(R, c, N_CONNECT_FAILED)
        return
    u = <Up*>calloc(1, sizeof(Up))
    if u == NULL:
        sys_.close(fd)
        conn_abort(R, c)
        return
    u.kind = K_UP
    u.fd = fd
    u.ep = ep
    ep.n_open += 1
    u.owner = c
    u.connecting = True
    u.deadline = now + ep.connect_timeout
    timer_at(R, u.deadline)  # (timers_due(): on time, not on the tick)
    # LEAST_REQUEST counts a request from its assignment (Envoy's LEAST_REQUEST,
    # HAProxy's leastconn): counted from the connect's end, every request
    # sent meanwhile saw a slow endpoint as idle and went to it
    ep.active += 1
    c.up = u
    interest_up(R, u)


cdef void connected(Relay *R, Conn *c, Up *u, double now) noexcept nogil:
    cdef int err = 0
    cdef sys_.socklen_t len = sizeof(err)
    sys_.getsockopt(u.fd, sys_.SOL_SOCKET, sys_.SO_ERROR, &err, &len)
    if err:
        c.fail_ep = u.ep
        c.fail_errno = err
        c.up = NULL
        u.owner = NULL
        u.ep.active -= 1
        up_close(R, u)
        L4R_ADD(&R.ctr[<int>CT_CONNECT_ERRORS], 1)
        ask_python(R, c, N_CONNECT_FAILED)
        return
    u.connecting = False
    L4R_ADD(&R.ctr[<int>CT_OPENED], 1)
    # (no news for outlier detection: an answer is, see outcome())
    send_request(R, c, now)


cdef void connect_failed_next(Relay *R, Conn *c, double now) noexcept nogil:
    """After Python heard of a failed connect: the next candidate (a first
    attempt's, or a retry's; at once, or after the backoff of a policy that
    retries a failed connect: retry_send()), or 503 no healthy upstream
    (none left, or such a policy out of tries). Under such a policy with a
    try left the failed endpoint stays a candidate, last (retry_order()):
    its try dials it again when no candidate is left untried; without one
    it is dropped, each endpoint dialled once."""
    cdef int i, j = 0
    cdef EP *failed = c.fail_ep
    cdef const Retry_ *p = c.retry
    log_upstream(c, failed)  # (the access log's UPSTREAM_HOST, if no later try reaches one)
    if p != NULL and p.on_connect and c.tries < p.attempts:
        # the policy's try may dial it again: it goes last, behind those not
        # tried yet (each candidate tried goes last, so the least recently
        # tried comes first), as Envoy's previous_hosts predicate prefers a
        # host not tried yet and its load balancer takes a tried one when
        # none is left (host_selection_retry_max_attempts: the last pick
        # stands): one endpoint refusing is dialled 1 + attempts times
        retry_order(c, failed)
    else:
        for i in range(c.n_cand):
            if c.cand[i] != failed:
                c.cand[j] = c.cand[i]
                c.cand_tag[j] = c.cand_tag[i]  # (its tag along: read when c.mixed)
                j += 1
        c.n_cand = j
    if c.n_cand and (p == NULL or not p.on_connect or c.tries < p.attempts):
        # that was a try (Envoy's router counts one whose connect failed:
        # its connect-failure retry): the next says one more
        # (connect_failed() in _exchange_py.py). Under a policy that
        # retries a failed connect, one of its tries, as Envoy's spends one
        # of num_retries on it (shouldRetryReset()) and counts it in
        # upstream_rq_retry; else the relay's own, counted until the
        # exchange's end (c.holds: conn_drop_held() zeroes it)
        if p != NULL and p.on_connect:
            c.tries += 1
            L4R_ADD(&R.ctr[<int>CT_RETRIES], 1)
        else:
            c.conn_fails += 1
            c.holds = True
        if count_attempt(c) != 0:
            conn_abort(R, c)
            return
        if p != NULL and p.on_connect:
            # the policy's retry waits its backoff, as Envoy's after a
            # failed connect (RetryWithBackoff: its backoff timer), in
            # P_CONNECT without an upstream; then retry_send(): the try
            # through the pool, its own per-try timer from its connection's
            # readiness (try_timer(); policy_retry's wait).
            # A try of the policy's: on a pooled connection it has the
            # reused connection's one retry of its own (reuse_retry_done),
            # and what an earlier try's send showed (never_left) is not
            # its, as policy_retry() clears them (an earlier try's, or an
            # earlier request's, reuse retry left reuse_retried set: a
            # stale pooled connection here was the client's 503, or spent
            # a try, where the pure twin's routed() retries it)
            c.reuse_retried = False
            c.never_left = False
            c.try_deadline = 0
            c.phase = P_CONNECT
            c.backoff_until = now + backoff_delay(R, p, c.tries)
            timer_at(R, c.backoff_until)
            c.last_active = c.backoff_until  # (a wait is no idleness)
            return
        # the relay's own move, at once: the next try's per-try timer
        # afresh, from its connection's readiness (try_timer(): a failed
        # try's never started, its connection never ready)
        c.try_deadline = 0
        try_ep(R, c, c.cand[0], now, False)
    elif c.retried:  # a retry's last connect failed (or the policy's tries
        # are spent): the request is lost
        # (503 no healthy upstream and UF, as Envoy answers a retry whose
        # connect failed and as a first attempt's every connect failing
        # is answered; no policy retries it: can_retry() wants a try on)
        c.lflags |= LF_UF
        upstream_failed(R, c, 503, _LOCAL_503_CONNECT, _LOCAL_503_CONNECT_LEN,
                        _LOCAL_503_CONNECT_KEEP, _LOCAL_503_CONNECT_KEEP_LEN,
                        _LOCAL_503_CONNECT_KEEP10, _LOCAL_503_CONNECT_KEEP10_LEN, now, OD_BEFORE)
    else:  # (no try took it: a body all here is dropped, as the route
        # timeout's 504 while connecting drops it, route_timeout(); Envoy's
        # connect failure comes after its router buffered the body)
        local_answer(R, c, R_no_upstream, now, True, True)


cdef void retry_order(Conn *c, EP *failed) noexcept nogil:
    """A retry's candidates: the endpoint whose connection failed goes last
    (Istio's default retry policy skips the previous hosts), the others keep
    their order; it stays one, the last resort."""
    cdef int i, j = 0, n = c.n_cand
    cdef int tag = c.tag  # (the failed one's, read when c.mixed)
    for i in range(n):
        if c.cand[i] != failed:
            c.cand[j] = c.cand[i]
            c.cand_tag[j] = c.cand_tag[i]  # (its tag along)
            j += 1
        else:
            tag = c.cand_tag[i]
    if j == n and n < MAX_ATTEMPTS:  # (not a candidate: it always is one)
        n += 1
    for i in range(j, n):
        c.cand[i] = failed
        c.cand_tag[i] = tag
    c.n_cand = n


cdef Verdict_ *R_no_upstream = NULL  # 503 "no healthy upstream", both variants
cdef Verdict_ *R_overloaded = NULL   # 503 "overloaded": out of fds
cdef Verdict_ *R_overflow = NULL     # 503 a circuit breaker's (overflow())
cdef Verdict_ *R_dot_segment = NULL  # 400 a path rewrite's dot-segment (rewrite_refused())


cdef inline bint reuse_retry_done(Conn *c) noexcept nogil:
    """The current try had the reused connection's one retry already (or
    may not have it). The first try's is c.retried (also set by a policy's
    retry of a request that went, whose tries are no reused connection's
    retry); a retry policy's try's (c.tries > 0: on a pooled connection,
    retry_send) is c.reuse_retried, cleared as it starts (policy_retry, or
    connect_failed_next for the policy's try after a failed connect): a
    stale pooled connection is no policy attempt, whatever the policy.
    Without a policy c.tries is 0: the test is c.retried's, as before."""
    return c.reuse_retried if c.tries else c.retried


cdef void on_upstream_eof(Relay *R, Conn *c, double now) noexcept nogil:
    cdef EP *ep
    if c.up_bytes == 0:
        if c.up != NULL and c.up.reused and not reuse_retry_done(c) and c.replayable \
                and (c.idempotent or c.never_left):  # (not a retry policy's hold)
            # once more, on a new connection, to another endpoint first (a
            # policy's try: to the same endpoint, the one its order chose:
            # an idle connection closed is no failure of it)
            c.retried = True  # (send_request sends c.replay)
            c.reuse_retried = True
            ep = c.up.ep
            up_discard(R, c)
            # its per-try timer afresh, from the new connection's readiness
            # (try_timer(): its connect is no part of it)
            c.try_deadline = 0
            if c.tries == 0:
                retry_order(c, ep)
            try_ep(R, c, c.cand[0], now, False)
            return
        if c.retry != NULL and c.retry.on & RT_ON_RESET and can_retry(c):
            policy_retry(R, c, OD_BEFORE, now)
            return
        # Envoy's answer to a reset before the response (connection
        # termination: 503, UC), saying so once a policy's retry went
        if c.tries:
            upstream_failed(R, c, 503, _LOCAL_503_RESET_RETRIED, _LOCAL_503_RESET_RETRIED_LEN,
                            _LOCAL_503_RESET_RETRIED_KEEP, _LOCAL_503_RESET_RETRIED_KEEP_LEN,
                            _LOCAL_503_RESET_RETRIED_KEEP10, _LOCAL_503_RESET_RETRIED_KEEP10_LEN,
                            now, OD_BEFORE)
        else:
            upstream_failed(R, c, 503, _LOCAL_503_RESET, _LOCAL_503_RESET_LEN,
                            _LOCAL_503_RESET_KEEP, _LOCAL_503_RESET_KEEP_LEN,
                            _LOCAL_503_RESET_KEEP10, _LOCAL_503_RESET_KEEP10_LEN, now, OD_BEFORE)
        return
    if c.rs == RS_BODY and c.framing == F_CLOSE:
        complete(R, c, True, c.req_left > 0, now)
        return
    if c.rs == RS_HEAD and c.retry != NULL and c.retry.on & RT_ON_RESET and can_retry(c):
        policy_retry(R, c, OD_MID, now)  # closed within the response head
        return
    upstream_failed(R, c, 502, _LOCAL_502_MID, _LOCAL_502_MID_LEN,
                    _LOCAL_502_MID_KEEP, _LOCAL_502_MID_KEEP_LEN,
                    _LOCAL_502_MID_KEEP10, _LOCAL_502_MID_KEEP10_LEN, now, OD_MID)


cdef void upstream_send_failed(Relay *R, Conn *c, double now) noexcept nogil:
    """A send to c.up failed: the connection is dead (reset), but what the
    server sent before it may wait in our receive queue: a server answering
    early (413, 401) before reading the body closes with the body unread, and
    its kernel resets the connection. That answer is the client's. So: stop
    sending (held request bytes dropped, a request splice stopped), read
    what is pending through the response path, then take the connection's
    end (on_upstream_eof) if the exchange is still on it: only a request
    with nothing received back may be retried (a reused connection) or get
    the 503. Python judging a response head (c.need) stops the reading; the
    loop reads the rest after it, as any response's. A request of which the
    kernel took no byte (a pooled connection reset before its first send)
    never left: it may be sent again whatever its method, its bytes (all
    held in u.out) kept for that as an idempotent request's are."""
    cdef Up *u = c.up
    cdef ssize_t n
    u.send_failed = True
    if u.reused and not u.sent and not reuse_retry_done(c) \
            and c.up_bytes == 0 and u.out.len <= REPLAY_LIMIT:
        c.never_left = True
        if not c.replayable:
            buf_free(&c.replay)
            c.replay = u.out  # (moved: u.out is left empty)
            u.out.p = NULL
            u.out.len = u.out.cap = 0
            c.replayable = True
    buf_free(&u.out)
    c.no_splice = True
    if c.splicing == SPL_REQ:
        splice_stop(c)  # the body's bytes in the pipe go nowhere
    elif c.splicing == SPL_RESP and splice_fallback(R, c) != 0:
        return  # (the response's bytes in the pipe first: order kept)
    while not c.closed and c.up == u and c.need == N_NONE:
        n = sys_.recv_nc(u.fd, R.scratch, READ_SIZE, sys_.MSG_DONTWAIT)
        if n < 0 and errno == EINTR:
            continue
        if n <= 0:
            break  # its end (a reset, once its bytes are read), or nothing more
        c.last_active = now
        upstream_bytes(R, c, R.scratch, <size_t>n, now)
    if not c.closed and c.up == u and c.need == N_NONE:
        on_upstream_eof(R, c, now)


# the upstream closed or reset before any response byte (on_upstream_eof):
# Envoy's local reply to a stream reset for connection termination, and
# the same once a retry policy's try went ("retried and the latest")
cdef char *_LOCAL_503_RESET = NULL
cdef size_t _LOCAL_503_RESET_LEN = 0
cdef char *_LOCAL_503_RESET_RETRIED = NULL
cdef size_t _LOCAL_503_RESET_RETRIED_LEN = 0
cdef char *_LOCAL_502_MID = NULL
cdef size_t _LOCAL_502_MID_LEN = 0
cdef char *_LOCAL_408 = NULL
cdef size_t _LOCAL_408_LEN = 0
cdef char *_LOCAL_504 = NULL
cdef size_t _LOCAL_504_LEN = 0
# ... as the client gets them when its connection stays (upstream_failed)
cdef char *_LOCAL_503_RESET_KEEP = NULL
cdef size_t _LOCAL_503_RESET_KEEP_LEN = 0
cdef char *_LOCAL_503_RESET_RETRIED_KEEP = NULL
cdef size_t _LOCAL_503_RESET_RETRIED_KEEP_LEN = 0
cdef char *_LOCAL_502_MID_KEEP = NULL
cdef size_t _LOCAL_502_MID_KEEP_LEN = 0
cdef char *_LOCAL_504_KEEP = NULL
cdef size_t _LOCAL_504_KEEP_LEN = 0
# ... and to an HTTP/1.0 client that stays ("connection: keep-alive")
cdef char *_LOCAL_503_RESET_KEEP10 = NULL
cdef size_t _LOCAL_503_RESET_KEEP10_LEN = 0
cdef char *_LOCAL_503_RESET_RETRIED_KEEP10 = NULL
cdef size_t _LOCAL_503_RESET_RETRIED_KEEP10_LEN = 0
cdef char *_LOCAL_502_MID_KEEP10 = NULL
cdef size_t _LOCAL_502_MID_KEEP10_LEN = 0
cdef char *_LOCAL_504_KEEP10 = NULL
cdef size_t _LOCAL_504_KEEP10_LEN = 0
# a retry whose last connect failed (connect_failed_next), as R_no_upstream's
cdef char *_LOCAL_503_CONNECT = NULL
cdef size_t _LOCAL_503_CONNECT_LEN = 0
cdef char *_LOCAL_503_CONNECT_KEEP = NULL
cdef size_t _LOCAL_503_CONNECT_KEEP_LEN = 0
cdef char *_LOCAL_503_CONNECT_KEEP10 = NULL
cdef size_t _LOCAL_503_CONNECT_KEEP10_LEN = 0


cdef void drop_empty_lines(Relay *R, Conn *c) noexcept nogil:
    """Drop the empty lines (CRLF or a bare LF) that scan() skipped before
    the request line (RFC 9112 §2.2: a server SHOULD ignore them; Envoy
    never sends them on) from c.inb, and move the scanner's offsets with
    them: the head from here on starts with its request line, and so does
    each copy made of it (c.rhead as sent upstream, c.replay, a mirror's
    shadow_head(), the pure relay's bytes after a hand-over), which every
    reader of them assumes (edit_request() read before its buffer, and a
    mirror's copy ended at the first empty line). The head limit counted them
    (scan() judges at most max_head bytes from the stream's start, empty
    lines included); no byte count of the access log does (a request's is
    its body's)."""
    cdef Py_ssize_t d = c.s.method_start
    buf_drop(&c.inb, <size_t>d)
    head_shift(&c.s, &R.lines, d)


cdef void head_shift(Scanner *s, Lines *L, Py_ssize_t d) noexcept nogil:
    """The offsets of s's head, and of its lines where L holds them, once
    its first d bytes are gone (drop_empty_lines())."""
    cdef int i
    s.method_start = 0
    s.method_end -= d
    s.target_end -= d
    s.headers_start -= d
    s.line_start -= d
    s.head_length -= d
    s.pos -= d
    if L.owner == s:  # (where the scan found the header lines: summarize())
        if L.first >= 0:
            L.first -= d
        for i in range(L.n):
            L.colon[i] -= d
            L.lf[i] -= d


cdef void on_head(Relay *R, Conn *c, double now) noexcept nogil:
    """A request head is complete in c.inb: route it (fast path) or hand over."""
    cdef const unsigned char *b
    cdef Head h
    cdef char key[2048]
    cdef Py_ssize_t n, p
    cdef Entry *e
    cdef Entry *se
    cdef Verdict_ *v
    cdef int i, failed
    cdef Chunked *rck
    if c.s.method_start:  # empty lines came before the request line
        drop_empty_lines(R, c)
    b = <const unsigned char*>c.inb.p
    h.n_xff = -1
    if c.fwd != NULL:  # (a gateway listener's: see _forwarding.pxi)
        h.n_xff = 0
        h.xfp = False
    summarize(R, &c.s, b, &h, &R.lines if lines_whole(&R.lines, &c.s) else NULL)
    c.requests += 1
    # a chunked body's machine (chunked_only(): fast_head() took it)
    rck = <Chunked*>calloc(1, sizeof(Chunked)) if h.te_seen else NULL
    if not fast_head(b, &h) or (h.te_seen and rck == NULL):
        free(rck)
        c.requests -= 1
        c.phase = P_RESOLVE
        ask_python(R, c, N_SLOW)
        return
    c.head_started = 0
    c.head_len = <size_t>c.s.head_length
    c.http10 = h.minor == 0
    c.method_head = method_is(b, &h, b"HEAD", 4)
    c.idempotent = idempotent(b, &h)
    # (the exchange's fields are as reset_exchange() leaves them: a head is
    # scanned only in P_HEAD, which a new Conn starts in, zeroed, and
    # next_request() enters after resetting them; nothing in P_HEAD sets them)
    if h.minor >= 1:
        c.keep_alive = not h.conn_close
    else:  # HTTP/1.0 persists only when it says keep-alive (RFC 9112 §9.3)
        c.keep_alive = h.conn_keep_alive and not h.conn_close
        if c.keep_alive:
            # its final head goes through send_edited_head, which tells it
            # "connection: keep-alive" where the head does not (an HTTP/1.1
            # server need not): no test for it on an HTTP/1.1 request's way
            c.edit_resp = True
            c.holds = True  # (conn_drop_held() clears it at the exchange's end)
    c.req_left = h.cl if h.cl > 0 else 0
    if rck != NULL:
        rck.max_trailers = R.max_head
        c.rck = rck
        c.req_left = REQ_CHUNKED
    # the head as sent upstream (upstream_head()), staged in c.rhead: its
    # lines but the drops, the first try's x-envoy-attempt-count, its end
    c.rhead.len = 0
    failed = 0
    if c.fwd != NULL:  # a gateway listener's: with its forwarding headers
        failed = fwd_stage(R, c, &h)
    else:
        n = c.s.head_length - 2  # (its empty line's CR LF: stage_attempt())
        p = 0
        for i in range(h.n_drop):
            failed |= buf_add(&c.rhead, c.inb.p + p, <size_t>(h.drop_s[i] - p))
            p = h.drop_e[i]
        failed |= buf_add(&c.rhead, c.inb.p + p, <size_t>(n - p))
        failed |= stage_attempt(&c.rhead)
    # (HTTP/1.1 and later: a close went with its line; HTTP/1.0: sent as it came)
    c.sent_persistent = h.minor >= 1 or c.keep_alive
    if failed:  # out of memory: a head with a part left out must not go up
        conn_abort(R, c)
        return
    if c.idempotent:
        c.replayable = True
        c.replay_staged = True  # (see replay_unstage())
    c.phase = P_RESOLVE
    if R.decide_only:
        ask_python(R, c, N_RESOLVE)
        return
    v = last_verdict(R, c, b, &h, now)
    if v != NULL:
        L4R_ADD(&R.ctr[<int>CT_CACHE_HITS], 1)
        apply_verdict(R, c, v, now)
        return
    # what requests to this origin and Host are routed by, then the verdict
    n = make_key(R, c, b, &h, key, sizeof(key), SHAPE_ONLY)
    se = NULL
    if n >= 0:
        se = cache_get(R, key, <size_t>n, key_hash(key, <size_t>n), now, True)
    e = NULL
    if se != NULL:
        n = make_key(R, c, b, &h, key, sizeof(key), se.shape, se.tests)
        if n >= 0:
            e = cache_get(R, key, <size_t>n, key_hash(key, <size_t>n), now)
    if e == NULL or e.v == NULL:
        L4R_ADD(&R.ctr[<int>CT_CACHE_MISSES], 1)
        ask_python(R, c, N_RESOLVE)
        return
    L4R_ADD(&R.ctr[<int>CT_CACHE_HITS], 1)
    c.last_shape = se
    c.last_verdict = e
    c.last_gen = R.cache_gen
    if e.line_gen != R.cache_gen:
        keep_line(R, e, b, &h)
    apply_verdict(R, c, e.v, now)


# -- the connection's last verdict --------------------------------------------
#
# A keep-alive connection's requests mostly repeat the one before it: the
# same method, target and Host. The lookup (on_head()) makes the shape
# entry's key, hashes it and probes the cache, then the verdict's key (which
# tests of the shape entry the target passes), hashes and probes again:
# ~600 instructions. last_verdict() finds the same verdict with two
# comparisons, from what each side keeps between requests:
#
# * the connection: the shape entry and verdict entry of its last cache hit,
#   and R.cache_gen then (c.last_shape, c.last_verdict, c.last_gen: 24
#   bytes; no bytes of its last head, 10k idle connections hold these);
# * the verdict entry: the method SP target of a head that found it while
#   R.cache_gen had its value now (Entry.line, line_gen: written by the
#   first hit in each generation, keep_line()).
#
# R.cache_gen is bumped by every cache_put() and cache_clear(): while it
# holds, no entry was added, replaced or freed, so a lookup finds what it
# found before. A head with the entry's origin and Host (its key's first
# bytes), and the line's method and target, makes the key the head of that
# line made with the same shape entry (the one of that origin and Host,
# which the connection's last hit found in the same generation): make_key()
# reads nothing else when no key header is configured (R.n_keys 0; with key
# headers the lookup runs, as routes matching on headers are the rarer
# tables). So the lookup would find this verdict entry, when both entries
# are live: an expired one, or a shape entry served stale, takes the lookup
# (which asks Python for them), as does an epoch the cache is not at (the
# lookup clears it). A hit is the lookup's hit, counted as one.


cdef inline Verdict_ *last_verdict(Relay *R, Conn *c, const unsigned char *b, Head *h,
                                   double now) noexcept nogil:
    """The verdict of c's last cache hit, when the lookup of this head would
    find it again; NULL: look it up (see above)."""
    cdef Entry *se = c.last_shape
    cdef Entry *e = c.last_verdict
    cdef Py_ssize_t rl = h.te - h.ms, hn = h.host_e - h.host_s
    if e == NULL or c.last_gen != R.cache_gen or e.line_gen != R.cache_gen or R.n_keys \
            or L4R_LOAD(&R.epoch) != R.cache_epoch \
            or not (se.expires > now and e.expires > now):
        return NULL
    if rl != <Py_ssize_t>e.line_len or <Py_ssize_t>e.key_len <= 5 + hn or e.key[5 + hn] != 0 \
            or memcmp(e.line, b + h.ms, <size_t>rl) != 0 \
            or memcmp(e.key + 5, b + h.host_s, <size_t>hn) != 0 \
            or memcmp(e.key, &c.origin, 4) != 0:
        return NULL
    return e.v


cdef void keep_line(Relay *R, Entry *e, const unsigned char *b, Head *h) noexcept nogil:
    """Keep this head's method SP target in the verdict entry e, which the
    lookup found for it in the cache's current generation (a line longer
    than LINE_MAX, or no memory: none kept, last_verdict() then misses)."""
    cdef size_t rl = <size_t>(h.te - h.ms)
    cdef char *p
    if rl > LINE_MAX:
        return
    if rl > e.line_cap:
        p = <char*>realloc(e.line, rl)
        if p == NULL:
            return
        e.line = p
        e.line_cap = <uint32_t>rl
    memcpy(e.line, b + h.ms, rl)
    e.line_len = <uint32_t>rl
    e.line_gen = R.cache_gen


cdef void head_step(Relay *R, Conn *c, double now) noexcept nogil:
    """Scan what the client sent for a head (phase HEAD), and the next one
    while each is answered here and the connection stays (pipelined requests
    answered locally: local_answer() -> next_request() -> head_step() comes
    back here). A loop: one call deeper per request was thousands of frames
    for one read, flat only where the C compiler turned tail calls into
    jumps."""
    cdef int code
    cdef Py_ssize_t limit
    if c.scanning:
        return  # from below the loop (next_request): it goes on with the head
    c.scanning = True
    while c.inb.len and c.phase == P_HEAD and not c.closed:
        if c.head_started == 0:
            c.head_started = now
        limit = <Py_ssize_t>c.inb.len if <Py_ssize_t>c.inb.len < R.max_head else R.max_head
        code = scan_into(&c.s, <const unsigned char*>c.inb.p, limit, &R.lines)
        if code == NEED_MORE and <Py_ssize_t>c.inb.len > R.max_head:
            code = E_TOO_LARGE
        if code == NEED_MORE:
            break
        if code == COMPLETE:
            on_head(R, c, now)  # (the phase is P_HEAD again only after an answer)
            continue
        c.phase = P_RESOLVE  # an error or not HTTP: the pure relay answers it
        ask_python(R, c, N_SLOW)
        break
    c.scanning = False  # (c closed: still allocated until bury())


cdef void next_request(Relay *R, Conn *c, double now) noexcept nogil:
    c.phase = P_HEAD
    c.unwanted = False
    memset(&c.s, 0, sizeof(Scanner))
    c.head_started = 0
    c.last_active = now
    reset_exchange(c)
    head_step(R, c, now)  # a pipelined request may be waiting


# -- events ---------------------------------------------------------------------------

cdef void client_event(Relay *R, Conn *c, uint32_t ev, double now) noexcept nogil:
    cdef ssize_t n
    cdef int64_t take
    cdef bint bad = False
    if ev & sys_.EPOLLOUT and c.out.len:
        flush_client(R, c)
        if c.closed:
            return
    if c.splicing == SPL_RESP and ev & (sys_.EPOLLOUT | sys_.EPOLLHUP | sys_.EPOLLERR) \
            and c.need == N_NONE and c.up != NULL:
        splice_body(R, c, False, now)
        if c.closed:
            return
    if c.phase == P_CLOSING:
        if ev & (sys_.EPOLLIN | sys_.EPOLLHUP | sys_.EPOLLERR):
            n = sys_.recv_nc(c.fd, R.scratch, READ_SIZE, sys_.MSG_DONTWAIT)
            if n == 0 and c.out.len and not ev & (sys_.EPOLLHUP | sys_.EPOLLERR):
                # half-closed (SHUT_WR): it still reads; the rest of its
                # answer goes out, then the close (no lingering read)
                c.client_eof = True
                c.no_linger = True
            elif n == 0 or (n < 0 and errno != EAGAIN and errno != EINTR):
                conn_close(R, c, False)
                return
        interest(R, c)
        return
    if ev & (sys_.EPOLLIN | sys_.EPOLLHUP | sys_.EPOLLERR) and reading_client(c) \
            and c.phase == P_EXCH and (c.splicing == SPL_REQ or (
                c.splicing == 0 and c.rck == NULL and c.req_left >= SPLICE_MIN
                and not c.replayable
                and c.up != NULL and not c.up.connecting and not c.up.out.len
                and splice_start(R, c, SPL_REQ) == 0)):
        splice_request(R, c, True, now)
    elif ev & (sys_.EPOLLIN | sys_.EPOLLHUP | sys_.EPOLLERR) and reading_client(c):
        n = sys_.recv_nc(c.fd, R.scratch, READ_SIZE, sys_.MSG_DONTWAIT)
        if n < 0:
            if errno == EAGAIN or errno == EINTR:
                interest(R, c)
                return
            conn_abort(R, c)
            return
        c.last_active = now
        if n == 0:
            c.client_eof = True
            if c.phase == P_HEAD:  # between requests, or a head cut short
                start_close(R, c, now)
                if not c.closed:
                    interest(R, c)
                return
            # a request body cut short
            request_cut(R, c, now)
            if c.up != NULL:
                up_discard(R, c)
            start_close(R, c, now)
        elif c.phase == P_HEAD:
            if buf_add(&c.inb, R.scratch, <size_t>n) != 0:
                conn_abort(R, c)
                return
            head_step(R, c, now)
        else:  # request body bytes
            take = body_take(c, R.scratch, n, &bad)
            if bad:
                # the body bytes before the refused one go first, as they
                # would have in a read of their own (the pure twin's order)
                if take > 0 and buf_add(&c.up.out, R.scratch, <size_t>take) != 0:
                    conn_abort(R, c)
                    return
                flush_up(R, c.up)
                bad_body(R, c, now)
                settle(R, c)  # the 400 goes out now (a return here left it queued)
                return
            if buf_add(&c.up.out, R.scratch, <size_t>take) != 0:
                conn_abort(R, c)
                return
            if c.replayable:
                replay_add(c, R.scratch, <size_t>take)
                if c.replay.len > REPLAY_LIMIT:
                    buf_free(&c.replay)
                    c.replayable = False
            if take < n:  # pipelined bytes: they wait for this exchange's end
                if buf_add(&c.inb, R.scratch + take, <size_t>(n - take)) != 0:
                    conn_abort(R, c)
                    return
            if c.req_left == 0:
                request_read(R, c, now)
            # the primary's bytes first, then its copies (see send_request())
            if flush_up(R, c.up) != 0:
                if c.shadow != NULL and c.req_left == 0:
                    R.mirror_start(R, c, now)
                upstream_send_failed(R, c, now)
            else:
                if c.shadow != NULL and c.req_left == 0:
                    R.mirror_start(R, c, now)
                if c.req_left == 0 and c.rs == RS_DONE:
                    complete(R, c, False, False, now)
    elif ev & (sys_.EPOLLHUP | sys_.EPOLLERR) and not c.out.len and c.phase != P_RESOLVE:
        conn_abort(R, c)  # gone while we waited for its upstream
        return
    elif ev & sys_.EPOLLIN:
        c.unwanted = True  # the lazy EPOLLIN (see interest()): drop it now
    settle(R, c)


cdef void upstream_event(Relay *R, Up *u, uint32_t ev, double now) noexcept nogil:
    cdef Conn *c = u.owner
    cdef ssize_t n
    cdef char peek
    if ev & sys_.EPOLLRDHUP:
        # The server closed its side: its FIN came with (or after) what this
        # event reads. Were the response that completes in this read pooled,
        # a request in the same step (a pipelined one, the next client's in
        # this batch) would take the connection and go onto a half-closed
        # socket (a POST, not retried: a 503).
        u.peer_closed = True
    if c == NULL:  # idle in the pool: the server closed it, or spoke
        # ... or the event is from before it came back to the pool, earlier
        # in this batch (a client's event finished its response): nothing
        # to read, and it stays (a rare case: the syscall is not per request)
        if sys_.recv(u.fd, &peek, 1, sys_.MSG_PEEK | sys_.MSG_DONTWAIT) < 0 and errno == EAGAIN:
            return
        L4R_ADD(&R.ctr[<int>CT_EVICTED], 1)
        up_close(R, u)
        return
    if u.connecting:
        if ev & (sys_.EPOLLOUT | sys_.EPOLLERR | sys_.EPOLLHUP):
            connected(R, c, u, now)
    else:
        # Read first, then send: an answer that came (an early 413, say)
        # ends the exchange before more of the body is pushed at a server
        # that may have reset the connection already.
        if ev & (sys_.EPOLLIN | sys_.EPOLLHUP | sys_.EPOLLERR) \
                and c.need == N_NONE and c.splicing != SPL_REQ and (c.splicing == SPL_RESP or (
                    not c.out.len and c.rs == RS_BODY and c.framing == F_LENGTH
                    and c.resp_left >= SPLICE_MIN and splice_start(R, c, SPL_RESP) == 0)):
            splice_body(R, c, True, now)
        elif ev & (sys_.EPOLLIN | sys_.EPOLLHUP | sys_.EPOLLERR) \
                and not c.out.len and c.need == N_NONE:
            n = sys_.recv_nc(u.fd, R.scratch, READ_SIZE, sys_.MSG_DONTWAIT)
            if n < 0 and (errno == EAGAIN or errno == EINTR):
                pass
            else:
                c.last_active = now
                if n > 0:
                    upstream_bytes(R, c, R.scratch, <size_t>n, now)
                else:
                    on_upstream_eof(R, c, now)
        if not c.closed and c.up == u and ev & sys_.EPOLLOUT and u.out.len:
            if flush_up(R, u) != 0:
                upstream_send_failed(R, c, now)
        if not c.closed and c.up == u and c.splicing == SPL_REQ and not u.out.len \
                and ev & (sys_.EPOLLOUT | sys_.EPOLLHUP | sys_.EPOLLERR) and c.need == N_NONE:
            splice_request(R, c, False, now)
    settle(R, c)


cdef void take_queue(Relay *R, double now) noexcept nogil:
    cdef Handoff *h
    cdef Handoff *nx
    cdef Conn *c
    cdef Conn **grown
    cdef int one = 1
    sys_.pthread_mutex_lock(&R.lock)
    h = R.q_head
    R.q_head = R.q_tail = NULL
    sys_.pthread_mutex_unlock(&R.lock)
    while h != NULL:
        nx = h.next
        new_conn(R, h.fd, h.origin, h.data, h.len, False, now, h.local, h.local_len,
                 h.gateway, &h.peer if h.peer_n else NULL, h.peer_n)
        free(h.data)
        free(h.local)
        free(h)
        h = nx


cdef void new_conn(Relay *R, int fd, uint32_t origin, const char *data, size_t n,
                   bint solo, double now, const char *local, int local_len,
                   bint gateway, sockaddr_storage *peer, sys_.socklen_t peer_n) noexcept nogil:
    """A client connection of this relay from now on (fd owned here). *solo*:
    accepted by this loop (TCP_NODELAY comes from the listener), and read at
    once, before epoll knows it: the request is usually there already, and a
    connection answered and closed without waiting on the client costs no
    epoll_ctl (HAProxy's speculative read). *local*: the access log's
    DOWNSTREAM_LOCAL_ADDRESS (its origin's; NULL: asked of the fd). *gateway*:
    a gateway listener's, which gets the forwarding headers when this relay
    adds them (fwd_conn()) and drains with DRAIN_INBOUND (see "Drain").
    *peer*: the client's address as accept()
    returned it (peer_n its length; NULL: asked of the fd now when the
    access log will say it): c.peer from here, never asked again, so that a
    client that resets its connection still has it in its line (a
    getpeername() then finds no peer)."""
    cdef Conn *c = <Conn*>calloc(1, sizeof(Conn))
    cdef Conn **grown
    cdef int one = 1
    if R.n_conns == R.cap_conns:
        grown = <Conn**>realloc(R.conns, sizeof(Conn*) * (R.cap_conns * 2 + 64))
        if grown != NULL:
            R.conns = grown
            R.cap_conns = R.cap_conns * 2 + 64
    if c == NULL or R.n_conns == R.cap_conns:
        free(c)
        sys_.close(fd)
        return
    c.kind = K_CONN
    c.fd = fd
    c.origin = origin
    c.gateway = gateway
    # (taken while draining: served, then closed; see "Drain")
    c.draining = drains(R.draining, gateway)
    if peer != NULL:
        peer_from(c, peer, peer_n)
    elif R.alog != NULL:
        conn_peer(c)
    if R.alog != NULL:  # (see "Access log")
        c.lg = <LogConn*>calloc(1, sizeof(LogConn))
        if c.lg == NULL:
            free(c)
            sys_.close(fd)
            return
        if local != NULL and 0 < local_len <= LOG_ADDR:
            memcpy(c.lg.local, local, <size_t>local_len)
            c.lg.local_len = local_len
    if gateway and R.fwd_on and fwd_conn(R, c) != 0:
        free(c.lg)
        free(c)
        sys_.close(fd)
        return
    c.last_active = now
    c.head_started = now  # the first head is timed from the hand-off
    c.phase = P_HEAD
    c.idx = R.n_conns
    R.conns[R.n_conns] = c
    R.n_conns += 1
    L4R_ADD(&R.ctr[<int>CT_CONNECTIONS], 1)
    L4R_ADD(&R.ctr[<int>CT_ACTIVE], 1)
    c.solo = solo
    if solo:
        client_event(R, c, sys_.EPOLLIN, now)
        return
    sys_.setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
    sys_.setsockopt(c.fd, sys_.SOL_SOCKET, sys_.SO_OOBINLINE, &one, sizeof(one))  # (connect_to)
    if n:
        if buf_add(&c.inb, data, n) != 0:
            conn_abort(R, c)
            return
        head_step(R, c, now)
    settle(R, c)


# -- accept ---------------------------------------------------------------------------

cdef inline void reset_close(int fd) noexcept nogil:
    cdef sys_.linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    sys_.setsockopt(fd, sys_.SOL_SOCKET, sys_.SO_LINGER, &lg, sizeof(lg))
    sys_.close(fd)


cdef void to_others(Relay *R, int fd, Lst *l, uint32_t addr, uint16_t port) noexcept nogil:
    """For the worker's general path (Python), on the next return."""
    if R.n_others == MAX_OTHERS:
        reset_close(fd)  # a thousand at once waiting for Python: shed
        R.n_max_conns += 1
        return
    R.others[R.n_others].fd = fd
    R.others[R.n_others].lst = l.index
    R.others[R.n_others].addr = addr
    R.others[R.n_others].port = port
    R.n_others += 1


cdef int shed(Relay *R, Lst *l) noexcept nogil:
    """Out of fds: reset what waits in the accept queue, through the reserve fd
    (libuv's EMFILE trick, as the worker's accept does)."""
    cdef int n = 0, fd
    if R.reserve_fd < 0:
        return 0
    sys_.close(R.reserve_fd)
    R.reserve_fd = -1
    while n < 256:
        fd = accept4(l.fd, NULL, NULL, SOCK_CLOEXEC)
        if fd < 0:
            break
        reset_close(fd)
        n += 1
    R.reserve_fd = c_open(b"/dev/null", O_RDONLY | sys_.O_CLOEXEC)
    return n


cdef void accept_on(Relay *R, Lst *l, double now) noexcept nogil:
    cdef int fd, k, n
    cdef sockaddr_in dst
    cdef sockaddr_storage peer
    cdef sys_.socklen_t len, peer_n
    cdef char key[16]
    cdef Entry *e
    cdef sys_.epoll_event ev
    for k in range(ACCEPT_BATCH):
        peer_n = sizeof(peer)  # (the client's address: the access log's, the forwarding's)
        fd = accept4(l.fd, <sockaddr*>&peer, &peer_n, SOCK_NONBLOCK | SOCK_CLOEXEC)
        if fd < 0:
            if errno == EINTR or errno == ECONNABORTED:
                continue
            if errno == EMFILE or errno == ENFILE or errno == ENOBUFS or errno == ENOMEM:
                n = shed(R, l) if (errno == EMFILE or errno == ENFILE) else 0
                # the connections reset, each once (an EMFILE with nothing
                # waiting refused nobody: Linux takes the fd first; see the
                # worker's _on_acceptable)
                R.n_fd_limit += n
                # not watched for 100 ms rather than spin on a readable listener
                l.paused_until = now + 0.1
                sys_.epoll_ctl(R.epfd, sys_.EPOLL_CTL_DEL, l.fd, &ev)
                l.mask = 0
            elif errno == EINVAL:
                # It does not listen (shut down: a drain's retired listener;
                # its hang-up keeps it readable): not watched for a second
                # rather than spin on it, said once (Python: _service)
                l.paused_until = now + NOT_LISTENING_PAUSE_S
                sys_.epoll_ctl(R.epfd, sys_.EPOLL_CTL_DEL, l.fd, &ev)
                l.mask = 0
                if l.einval == 0:
                    l.einval = 1
                    R.n_not_listening += 1
            return
        l.accepted += 1
        L4R_STORE(&R.last_accept_ns, <int64_t>(now * 1e9))
        if R.max_conns and L4R_LOAD(&R.ctr[<int>CT_ACTIVE]) + L4R_LOAD(&R.external_active) \
                + R.n_others >= R.max_conns:
            R.n_max_conns += 1
            reset_close(fd)
            continue
        if l.gateway:
            new_conn(R, fd, l.gw_origin, NULL, 0, True, now, NULL, 0, True, &peer, peer_n)
            continue
        len = sizeof(dst)
        memset(&dst, 0, sizeof(dst))
        if sys_.getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, &dst, &len) != 0 \
                or dst.sin_family != AF_INET:
            to_others(R, fd, l, 0, 0)  # not redirected, or IPv6: Python says
            continue
        memcpy(key, &dst.sin_addr.s_addr, 4)
        memcpy(key + 4, &dst.sin_port, 2)
        key[6] = <char>SHAPE_ORIGIN
        e = cache_get(R, key, 7, key_hash(key, 7), now)
        if e != NULL and e.shape == OC_RELAY:
            # (the access log's DOWNSTREAM_LOCAL_ADDRESS: the original destination)
            new_conn(R, fd, e.origin, NULL, 0, True, now, R.log_addr,
                     sa_text(R.log_addr, &dst) if R.alog != NULL else 0, False, &peer, peer_n)
        else:  # another kind of connection, or not known yet: Python says
            to_others(R, fd, l, dst.sin_addr.s_addr, dst.sin_port)


cdef void watch_listeners(Relay *R, double now) noexcept nogil:
    """Unlisten what Python asked to; watch again what was paused."""
    cdef uint32_t drop
    cdef int i
    cdef Lst *l
    cdef sys_.epoll_event ev
    sys_.pthread_mutex_lock(&R.lock)
    drop = R.unlisten
    R.unlisten = 0
    sys_.pthread_mutex_unlock(&R.lock)
    for i in range(R.n_lsts):
        l = R.lsts[i]
        if l.removed:
            continue
        if drop & ((<uint32_t>1) << i):
            if l.mask:
                sys_.epoll_ctl(R.epfd, sys_.EPOLL_CTL_DEL, l.fd, &ev)
                l.mask = 0
            l.removed = True
        elif l.mask == 0 and l.paused_until <= now:
            set_mask(R, l.fd, &l.mask, sys_.EPOLLIN, l)  # (refused: again next time)


cdef bint exchange_timer(Relay *R, Conn *c, double now) noexcept nogil:
    """An exchange's timers (timers_due(); the tick's too, a backstop): whether
    one passed and was acted on.

    The route timeout first, before the connect timeout (the request is
    over, whatever its connect does); then the retry policy's per-try
    timeout, ignored once a final head went out (as Envoy ignores it): a
    timed-out try is a reset to Envoy, retried only under the policies
    that retry one (RT_ON_RESET); else, or out of tries, the route
    timeout's answer."""
    if c.resp_deadline and c.resp_deadline <= now:
        c.lflags |= LF_ROUTE_TO  # (its UT has no URX, the per-try timeout's may: row_flags())
        route_timeout(R, c, now)
        return True
    if not (c.try_deadline and c.try_deadline <= now and c.rs == RS_HEAD):
        return False
    c.try_deadline = 0
    if c.retry != NULL and c.retry.on & RT_ON_RESET and can_retry(c):
        L4R_ADD(&R.ctr[<int>CT_TIMEOUTS], 1)
        # (the try's connection is ready: its timer starts no sooner,
        # try_timer(); can_retry() wants c.up)
        policy_retry(R, c, OD_TIMEOUT, now)
    else:
        route_timeout(R, c, now)
    return True


cdef void connect_timed_out(Relay *R, Conn *c) noexcept nogil:
    """c's connect passed its deadline: given up, and Python told (the
    next candidate, a retry, or the 503)."""
    cdef Up *u = c.up
    L4R_ADD(&R.ctr[<int>CT_TIMEOUTS], 1)
    c.up = NULL
    u.owner = NULL
    u.ep.active -= 1
    c.fail_ep = u.ep
    c.fail_errno = -2  # "connect timeout"
    up_close(R, u)
    L4R_ADD(&R.ctr[<int>CT_CONNECT_ERRORS], 1)
    ask_python(R, c, N_CONNECT_FAILED)


# -- request mirroring ------------------------------------------------------------

cdef void mirror_draw(Relay *R, Conn *c, Verdict_ *v) noexcept nogil:
    """Each of v's mirrors drawn on its own (rng_next; no draw for all or
    none), and each drawn one's endpoint then: the next of its round robin
    that is resolved (its address copied into c.shadow; none: the copy is
    dropped when it would start). The request's bytes as sent are held in
    c.replay from here (the head as sent, staged in c.rhead, then its body:
    send_request(), client_event()) till its copies start (mirror_start())."""
    cdef Plan_ *p
    cdef Mirror_ *m
    cdef EP *ep
    cdef Dest_ *d
    cdef int i, j, k, start
    p = <Plan_*>calloc(1, sizeof(Plan_) + <size_t>v.n_mirrors * sizeof(Dest_))
    if p == NULL:
        L4R_ADD(&R.ctr[<int>CT_MIRROR_DROPPED], v.n_mirrors)
        return
    p.d = <Dest_*>(<char*>p + sizeof(Plan_))
    for i in range(v.n_mirrors):
        m = &v.mirrors[i]
        if not share_falls(R, m.ppm):
            continue
        d = &p.d[p.n]
        p.n += 1
        d.tag = m.tag
        start = <int>(R.rr[m.rr] % <uint64_t>m.n_eps) if m.n_eps else 0
        for j in range(m.n_eps):
            k = (start + j) % m.n_eps
            ep = m.eps[k]
            if ep.numeric:
                R.rr[m.rr] = <uint64_t>(k + 1)
                if m.ep_tags != NULL:  # (its copy reported by the endpoint it goes to)
                    d.tag = m.ep_tags[k]
                d.usable = True
                d.v6 = ep.v6
                d.addr = ep.addr
                d.port = ep.port
                memcpy(d.addr6, ep.addr6, 16)
                break
    if p.n == 0:
        free(p)
        return
    p.head_len = c.rhead.len
    p.timeout = v.timeout if v.timeout > 0 else MIRROR_S
    c.shadow = p
    c.holds = True  # (conn_drop_held() frees it uncounted: an abort, a client's cut)
    if not c.replayable:
        c.replayable = True
        replay_add(c, c.rhead.p, c.rhead.len)
    else:  # (mirror_give_up() may read c.replay before the head went)
        replay_unstage(c)


cdef int shadow_head(Buf *out, const char *h, size_t hl) noexcept nogil:
    """verdict.shadow_head() of the head h[:hl]: its lines each ending in
    CR LF, no Connection, Keep-Alive or Proxy-Connection line, a Host
    line's value with -shadow after its host name (shadow_host()), then
    the empty line (the copy's connection is the relay's, kept alive). -1:
    out of memory. Its first line is the first that is not empty: were an
    empty line before the request line still in h (drop_empty_lines()
    leaves none), it would end the copy's head there, and the request's
    body would go as the next request on the copy's connection."""
    cdef size_t i = 0, e, le, colon, vs, ve, hc, j
    cdef const char *lf
    cdef const unsigned char *u = <const unsigned char*>h
    cdef bint first = True
    cdef int failed = 0
    while i < hl and (h[i] == 13 or h[i] == 10):
        i += 1
    while i < hl:
        lf = <const char*>memchr(h + i, 10, hl - i)
        le = <size_t>(lf - h) if lf != NULL else hl
        e = le
        if e > i and h[e - 1] == 13:
            e -= 1
        if first:
            failed |= buf_add(out, h + i, e - i)
            failed |= buf_add(out, b"\r\n", 2)
            first = False
            i = le + 1
            continue
        if e == i:
            break  # the empty line
        lf = <const char*>memchr(h + i, 58, e - i)
        if lf != NULL:
            colon = <size_t>(lf - h)
            if header_is(u + i, <Py_ssize_t>(colon - i), b"connection", 10) \
                    or header_is(u + i, <Py_ssize_t>(colon - i), b"keep-alive", 10) \
                    or header_is(u + i, <Py_ssize_t>(colon - i), b"proxy-connection", 16):
                i = le + 1
                continue
            if header_is(u + i, <Py_ssize_t>(colon - i), b"host", 4):
                vs = colon + 1
                ve = e
                while vs < ve and (h[vs] == 32 or h[vs] == 9):
                    vs += 1
                while ve > vs and (h[ve - 1] == 32 or h[ve - 1] == 9):
                    ve -= 1
                # the host name's end: before the last colon, unless a ']' follows it
                hc = ve
                j = ve
                while j > vs:
                    j -= 1
                    if h[j] == 93:  # ']': an IPv6 literal, no port after it
                        break
                    if h[j] == 58:
                        hc = j
                        break
                failed |= buf_add(out, h + i, colon - i)
                failed |= buf_add(out, b": ", 2)
                failed |= buf_add(out, h + vs, hc - vs)
                failed |= buf_add(out, b"-shadow", 7)
                failed |= buf_add(out, h + hc, ve - hc)
                failed |= buf_add(out, b"\r\n", 2)
                i = le + 1
                continue
        failed |= buf_add(out, h + i, e - i)
        failed |= buf_add(out, b"\r\n", 2)
        i = le + 1
    failed |= buf_add(out, b"\r\n", 2)
    return -1 if failed else 0


cdef void mirror_start(Relay *R, Conn *c, double now) noexcept nogil:
    """c's request was read whole and sent (its first try's bytes in
    c.replay; called after the primary's flush: its bytes go first): a
    copy to each mirror drawn (mirror_draw()), dropped when its bytes went
    past REPLAY_LIMIT (or were spliced), an answer began before the
    request's end, max_mirrors copies are in flight, the mirror had no
    endpoint, or its socket or connect failed at once."""
    # (an interim head, 100 Continue, is no answer: c.rhead holds a final one begun)
    mirror_copies(R, c, c.replayable and c.rs == RS_HEAD and c.rhead.len == 0, now)


cdef void mirror_give_up(Relay *R, Conn *c, double now) noexcept nogil:
    """The relay gives c's request up before its copies started: its
    connects failed, a circuit breaker or no fd left answered 503, the
    route timeout passed before a connection, the primary failed before
    the request's end, a body could not be framed (local_answer(),
    upstream_failed()). A copy goes whatever the primary did (Envoy's
    shadow): a request without a body, which no try sent (c.req_left 0
    with c.shadow still set), goes from its head held in c.replay; one
    whose body was not all read and sent is not held whole: dropped."""
    mirror_copies(R, c, c.replayable and c.req_left == 0 and c.replay.len <= REPLAY_LIMIT, now)


cdef void mirror_copies(Relay *R, Conn *c, bint whole, double now) noexcept nogil:
    """c.shadow's copies: each started (c.replay's bytes: shadow_head() of
    its head, then its body) when *whole*, else dropped and counted."""
    cdef Plan_ *p = c.shadow
    cdef Buf pay
    cdef int i
    cdef const char *lf
    cdef size_t le = 0
    cdef bint head_req = False, keep = True
    c.shadow = NULL
    memset(&pay, 0, sizeof(Buf))
    whole = whole and c.replay.len >= p.head_len
    if whole and (shadow_head(&pay, c.replay.p, p.head_len) != 0
                  or buf_add(&pay, c.replay.p + p.head_len, c.replay.len - p.head_len) != 0):
        whole = False
    if whole:
        # its request line (shadow_head() ends it in CR LF): a HEAD's answer
        # has no body; an HTTP/1.0 request's server closes after it
        lf = <const char*>memchr(pay.p, 10, pay.len)
        le = <size_t>(lf - pay.p) - 1 if lf != NULL else 0
        head_req = le >= 5 and memcmp(pay.p, b"HEAD ", 5) == 0
        keep = not (le >= 9 and memcmp(pay.p + le - 9, b" HTTP/1.0", 9) == 0)
    for i in range(p.n):
        if not whole or not p.d[i].usable or R.n_shadows >= R.max_mirrors \
                or shadow_open(R, &p.d[i], &pay, now, p.timeout, head_req, keep) != 0:
            L4R_ADD(&R.ctr[<int>CT_MIRROR_DROPPED], 1)
    buf_free(&pay)
    free(p)


# -- the copies' pool (see "Request mirroring") ------------------------------------

cdef inline bint same_dest(const Dest_ *a, const Dest_ *b) noexcept nogil:
    if a.port != b.port or a.v6 != b.v6:
        return False
    return memcmp(a.addr6, b.addr6, 16) == 0 if a.v6 else a.addr == b.addr


cdef SEP *sep_find(Relay *R, const Dest_ *d, bint make) noexcept nogil:
    """The copies' pool's entry of d's endpoint (a scan: mirror endpoints
    with idle connections are few); made when *make* (NULL out of memory)."""
    cdef int i, cap
    cdef SEP *sp
    cdef SEP **grown
    for i in range(R.n_seps):
        if same_dest(&R.seps[i].d, d):
            return R.seps[i]
    if not make:
        return NULL
    if R.n_seps == R.cap_seps:
        cap = R.cap_seps * 2 if R.cap_seps else 8
        grown = <SEP**>realloc(R.seps, <size_t>cap * sizeof(SEP*))
        if grown == NULL:
            return NULL
        R.seps = grown
        R.cap_seps = cap
    sp = <SEP*>calloc(1, sizeof(SEP))
    if sp == NULL:
        return NULL
    memcpy(&sp.d, d, sizeof(Dest_))
    R.seps[R.n_seps] = sp
    R.n_seps += 1
    return sp


cdef void sep_unlink(Relay *R, SEP *sp, Shadow *sh) noexcept nogil:
    """sh leaves sp's idle list (taken by a copy, evicted, expired); sp is
    freed with its last (the table holds endpoints with idle ones only)."""
    cdef int i
    if sh.prev != NULL:
        sh.prev.next = sh.next
    else:
        sp.idle_head = sh.next
    if sh.next != NULL:
        sh.next.prev = sh.prev
    else:
        sp.idle_tail = sh.prev
    sh.prev = sh.next = NULL
    sh.idle = False
    sp.n_idle -= 1
    L4R_ADD(&R.ctr[<int>CT_MIRROR_IDLE], -1)
    if sp.n_idle == 0:
        for i in range(R.n_seps):
            if R.seps[i] == sp:
                R.n_seps -= 1
                R.seps[i] = R.seps[R.n_seps]
                break
        free(sp)


cdef int shadow_connect(Relay *R, Shadow *sh) noexcept nogil:
    """A new connection of the copies' pool to sh.d for sh, non-blocking,
    in the loop's epoll; -1 when its socket or connect failed at once."""
    cdef int fd, r
    fd = socket(AF_INET6 if sh.d.v6 else AF_INET, sys_.SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        return -1
    r = connect_addr(fd, sh.d.v6, sh.d.addr, sh.d.addr6, sh.d.port)
    if (r != 0 and errno != EINPROGRESS) or set_mask(R, fd, &sh.mask, sys_.EPOLLOUT, sh) != 0:
        sys_.close(fd)
        return -1
    sh.fd = fd
    sh.connecting = True
    L4R_ADD(&R.ctr[<int>CT_MIRROR_CONNECTS], 1)
    return 0


cdef int shadow_open(Relay *R, Dest_ *d, Buf *pay, double now, double timeout,
                     bint head_req, bint keep) noexcept nogil:
    """A copy to d on the newest idle connection of the copies' pool to it,
    else a new one, with pay's bytes to send and *timeout* seconds from now;
    -1 when it failed at once."""
    cdef Shadow *sh = NULL
    cdef SEP *sp = sep_find(R, d, False)
    if sp != NULL:
        sh = sp.idle_head
        sep_unlink(R, sp, sh)
        sh.reused = True
        if buf_add(&sh.out, pay.p, pay.len) != 0 \
                or set_mask(R, sh.fd, &sh.mask, sys_.EPOLLOUT, sh) != 0:
            # (buried, not freed: an event of it may wait later in this
            # batch; bury() frees it and its bytes after the batch)
            set_mask(R, sh.fd, &sh.mask, 0, sh)
            reset_close(sh.fd)
            sh.fd = -1
            sh.closed = True
            sh.grave_next = R.sgrave
            R.sgrave = sh
            return -1
    else:
        sh = <Shadow*>calloc(1, sizeof(Shadow))
        if sh == NULL:
            return -1
        memcpy(&sh.d, d, sizeof(Dest_))
        if buf_add(&sh.out, pay.p, pay.len) != 0 or shadow_connect(R, sh) != 0:
            buf_free(&sh.out)
            free(sh)
            return -1
    sh.kind = K_SHADOW
    sh.framing = SF_HEAD
    sh.head_req = head_req
    sh.keep = keep
    sh.started = now
    sh.deadline = now + timeout
    sh.tag = d.tag
    sh.next = R.shadows
    if R.shadows != NULL:
        R.shadows.prev = sh
    R.shadows = sh
    R.n_shadows += 1
    L4R_ADD(&R.ctr[<int>CT_MIRRORED], 1)
    L4R_ADD(&R.ctr[<int>CT_MIRROR_ACTIVE], 1)
    timer_at(R, sh.deadline)
    return 0


cdef void answer_scan(Shadow *sh, const unsigned char *p, size_t n) noexcept nogil:
    """verdict.AnswerStatus.feed(): the bytes of a copy's answer read
    next, until sh.answer is AS_DONE (sh.status its first final head's
    code, 0 for none). A head's first STATUS_LINE bytes are collected
    across reads in sh.text, then answer_head() reads them; an interim
    head's lines are skipped to the empty one (a line ending in LF with
    nothing but an optional CR before it: sh.in_line says whether the
    current one had a byte besides CR)."""
    cdef size_t i = 0, take
    cdef unsigned char b
    while i < n and sh.answer != AS_DONE:
        if sh.answer == AS_STATUS:
            take = min(n - i, <size_t>(STATUS_LINE - sh.text_len))
            memcpy(sh.text + sh.text_len, p + i, take)
            sh.text_len += <unsigned char>take
            i += take
            if sh.text_len == STATUS_LINE:
                answer_head(sh)
            continue
        b = p[i]
        i += 1
        if b == 10:
            if not sh.in_line:  # the interim head's empty line: the next head
                sh.answer = AS_STATUS
                sh.text_len = 0
            sh.in_line = False
        elif b != 13:
            sh.in_line = True


cdef void answer_head(Shadow *sh) noexcept nogil:
    """A head's first STATUS_LINE bytes (sh.text): ``HTTP/1.``, a digit, a
    space and three digits, else not HTTP/1.x (done, status 0); a 1xx code
    but 101 is an interim head (skipped: within its status line), any
    other final (done, its status)."""
    cdef const unsigned char *t = <const unsigned char*>sh.text
    cdef int status
    sh.answer = AS_DONE
    if memcmp(t, b"HTTP/1.", 7) != 0 or not (48 <= t[7] <= 57) or t[8] != 32 \
            or not (48 <= t[9] <= 57 and 48 <= t[10] <= 57 and 48 <= t[11] <= 57):
        return
    status = (t[9] - 48) * 100 + (t[10] - 48) * 10 + (t[11] - 48)
    if 100 <= status < 200 and status != 101:
        sh.answer = AS_HEAD
        sh.in_line = True
        return
    sh.status = status


cdef int shadow_answer_head(Relay *R, Shadow *sh, Py_ssize_t *head_len) noexcept nogil:
    """The head at the start of a copy's answer (sh.inb), read as the pure
    twin reads it (parse_response_head(), _copy_framing()): 0, incomplete;
    1, a final head whose framing it reads (sh.framing, sh.left, sh.k and
    sh.keep set, *head_len); 2, an interim head (*head_len); -1, one it
    does not frame: malformed, larger than max_head, a 101, Content-Length
    with Transfer-Encoding, several Content-Length values or one not a
    number, a transfer coding but chunked alone (or one in HTTP/1.0)."""
    cdef const unsigned char *b = <const unsigned char*>sh.inb.p
    cdef Py_ssize_t n = <Py_ssize_t>sh.inb.len, limit, i, e, le, colon, vs, ve, j, end
    cdef const unsigned char *lf
    cdef int n_cl = 0, n_te = 0, tokens = 0, status
    cdef int64_t cl = 0
    cdef bint bad = False
    limit = n if n <= R.max_head else R.max_head
    if n == 0:
        return 0
    # its end first (a line with nothing but an optional CR): judged whole
    i = 0
    while True:
        lf = <const unsigned char*>memchr(b + i, LF, <size_t>(limit - i))
        if lf == NULL:
            return -1 if n > R.max_head else 0
        le = lf - b
        if (le == i or (le == i + 1 and b[i] == CR)) and i > 0:
            end = le + 1
            break
        if le == i or (le == i + 1 and b[i] == CR):
            return -1  # an empty status line
        i = le + 1
    # the status line: HTTP/1.D DDD, then nothing or a space and its reason
    lf = <const unsigned char*>memchr(b, LF, <size_t>end)
    e = lf - b
    if e > 0 and b[e - 1] == CR:
        e -= 1
    if e < 12 or memcmp(b, b"HTTP/1.", 7) != 0 or not (0x30 <= b[7] <= 0x39) or b[8] != SP \
            or not (0x30 <= b[9] <= 0x39 and 0x30 <= b[10] <= 0x39 and 0x30 <= b[11] <= 0x39) \
            or (e > 12 and b[12] != SP):
        return -1
    for j in range(13, e):
        if not field_value_byte(b[j]):
            return -1
    status = (b[9] - 0x30) * 100 + (b[10] - 0x30) * 10 + (b[11] - 0x30)
    i = lf - b + 1
    while True:  # its header lines: a token, ":", a field value
        lf = <const unsigned char*>memchr(b + i, LF, <size_t>(end - i))
        le = lf - b
        e = le - 1 if (le > i and b[le - 1] == CR) else le
        if e == i:
            break  # the empty line
        colon = i
        while colon < e and TCHAR[b[colon]]:
            colon += 1
        if colon == i or colon == e or b[colon] != COLON:
            return -1
        for j in range(colon + 1, e):
            if not field_value_byte(b[j]):
                return -1
        vs = colon + 1
        ve = e
        while vs < ve and is_ows(b[vs]):
            vs += 1
        while ve > vs and is_ows(b[ve - 1]):
            ve -= 1
        if header_is(b + i, colon - i, b"content-length", 14):
            n_cl += 1
            if ve - vs < 1 or ve - vs > 18:
                bad = True  # (and no digit read: 19 of them overflow cl)
            else:
                for j in range(vs, ve):
                    if not (0x30 <= b[j] <= 0x39):
                        bad = True
                        break
                    cl = cl * 10 + (b[j] - 0x30)
        elif header_is(b + i, colon - i, b"transfer-encoding", 17):
            n_te += 1
            if not (ve - vs == 7 and eq_lower(b + vs, b"chunked", 7)):
                bad = True
        elif header_is(b + i, colon - i, b"connection", 10):
            tokens |= connection_tokens(b, vs, ve)
        i = le + 1
    head_len[0] = end
    if 100 <= status < 200 and status != 101:
        return 2
    if status == 101 or bad or n_cl > 1 or n_te > 1 or (n_cl and n_te) or (n_te and b[7] == 0x30):
        return -1
    sh.keep = sh.keep and b[7] == 0x31 and not (tokens & TOK_CLOSE)
    if sh.head_req or status == 204 or status == 304:
        sh.framing = F_NONE
    elif n_te:
        sh.framing = F_CHUNKED
        memset(&sh.k, 0, sizeof(Chunked))
        sh.k.state = C_SIZE0
        sh.k.max_trailers = R.max_head
    elif n_cl and cl:
        sh.framing = F_LENGTH
        sh.left = cl
    elif n_cl:
        sh.framing = F_NONE
    else:
        sh.framing = F_CLOSE
        sh.keep = False
    return 1


cdef int shadow_body(Shadow *sh, const unsigned char *p, Py_ssize_t n) noexcept nogil:
    """The next n bytes after a copy's final head: 1, its answer ended in
    them (bytes after it: sh.keep cleared, the server is confused); 0, not
    yet; -1, a chunk it cannot frame."""
    cdef Py_ssize_t used
    if sh.framing == F_CLOSE:
        return 0
    if sh.framing == F_NONE:
        used = 0
    elif sh.framing == F_LENGTH:
        used = n if n < sh.left else <Py_ssize_t>sh.left
        sh.left -= used
        if sh.left:
            return 0
    else:
        used = chunked(&sh.k, p, n)
        if sh.k.state == C_ERROR:
            return -1
        if sh.k.state != C_DONE:
            return 0
    if used < n:
        sh.keep = False
    return 1


cdef int shadow_read(Relay *R, Shadow *sh, const unsigned char *p, Py_ssize_t n) noexcept nogil:
    """n bytes of a copy's answer: its status read (answer_scan()), its
    interim heads skipped, its final head's framing read and its body's end
    found; how the copy ends here (SH_ANSWERED, SH_UNFRAMED, SH_ENOUGH, or
    SH_FAILED out of memory), -1 when it goes on."""
    cdef Py_ssize_t hl = 0, k
    cdef int r = 0
    cdef size_t old
    cdef const unsigned char *b
    sh.got += n
    if sh.answer != AS_DONE:
        answer_scan(sh, p, <size_t>n)
    if sh.framing == SF_HEAD:
        old = sh.inb.len
        if buf_add(&sh.inb, <const char*>p, <size_t>n) != 0:
            return SH_FAILED
        if old:
            # a head trickled in: judged again only once its end may be
            # here (head_end_in(), from where the last look stopped; or an
            # empty first line, refused at once), not from its start at
            # each read (quadratic in its size), as upstream_bytes() does
            if sh.inb_clean <= old and sh.inb.len <= <size_t>R.max_head:
                k = <Py_ssize_t>sh.inb_clean - 2 if sh.inb_clean > 2 else 0
                b = <const unsigned char*>sh.inb.p
                L4R_ADD(&R.ctr[<int>CT_MIRROR_HEAD_RESCAN], <int64_t>sh.inb.len - k)
                if not head_end_in(b, k, <Py_ssize_t>sh.inb.len) and not (
                        k == 0 and (b[0] == LF or (b[0] == CR and sh.inb.len > 1 and b[1] == LF))):
                    sh.inb_clean = sh.inb.len
                    return SH_ENOUGH if sh.got >= MIRROR_READ else -1
            L4R_ADD(&R.ctr[<int>CT_MIRROR_HEAD_RESCAN], <int64_t>sh.inb.len)
        sh.inb_clean = 0
        while True:
            r = shadow_answer_head(R, sh, &hl)
            if r != 2:
                break
            buf_drop(&sh.inb, <size_t>hl)  # an interim head
        if r < 0:
            return SH_UNFRAMED
        if r == 1:
            r = shadow_body(sh, <const unsigned char*>sh.inb.p + hl, <Py_ssize_t>sh.inb.len - hl)
            buf_free(&sh.inb)
        else:
            r = 0
    else:
        r = shadow_body(sh, p, n)
    if r < 0:
        return SH_UNFRAMED
    if r > 0:
        return SH_ANSWERED
    if sh.got >= MIRROR_READ:
        return SH_ENOUGH
    return -1


cdef void shadow_retry(Relay *R, Shadow *sh, double now) noexcept nogil:
    """A copy on a reused connection failed before any byte of its answer
    (the server closed it as the copy came): its bytes again (kept whole in
    sh.out) on a new connection, the same copy (its start, its deadline);
    failed when that fails at once."""
    set_mask(R, sh.fd, &sh.mask, 0, sh)
    sys_.close(sh.fd)
    sh.fd = -1
    sh.reused = False
    sh.removed = False  # (a new connection, as a request's retry's: not marked)
    sh.sent = 0
    if shadow_connect(R, sh) != 0:
        shadow_end(R, sh, SH_FAILED, now)


cdef int shadow_send(Shadow *sh) noexcept nogil:
    """Send what is left of a copy's bytes, as far as the kernel takes them;
    -1 on an error. Sent whole, they are freed, but on a reused connection
    (a retry may send them again: freed at the first answer byte)."""
    cdef ssize_t n
    while sh.sent < sh.out.len:
        n = sys_.send_nc(sh.fd, sh.out.p + sh.sent, sh.out.len - sh.sent,
                         sys_.MSG_NOSIGNAL | sys_.MSG_DONTWAIT)
        if n < 0:
            if errno == EINTR:
                continue
            return 0 if errno == EAGAIN else -1
        sh.sent += <size_t>n
    if not sh.reused:
        buf_free(&sh.out)
        sh.sent = 0
    return 0


cdef void shadow_event(Relay *R, Shadow *sh, uint32_t ev, double now) noexcept nogil:
    """An idle copy connection's event: the server closed it (or spoke),
    evicted. A copy's connect ends, its bytes go, its answer is read and
    thrown away to its end by its framing (shadow_read()), or until the
    server closes, MIRROR_READ bytes of it were read (done: reset, an
    endless answer costs no more), or it fails (a connect, send or receive
    error); on a reused connection, a send error, or a close or reset before
    any answer byte, sends it once more on a new one (shadow_retry())."""
    cdef int err = 0, how
    cdef sys_.socklen_t len = sizeof(err)
    cdef ssize_t n
    if sh.idle:
        shadow_evict(R, sh)
        return
    if sh.connecting:
        if not ev & (sys_.EPOLLOUT | sys_.EPOLLERR | sys_.EPOLLHUP):
            return
        sys_.getsockopt(sh.fd, sys_.SOL_SOCKET, sys_.SO_ERROR, &err, &len)
        if err:
            shadow_end(R, sh, SH_FAILED, now)
            return
        sh.connecting = False
    if sh.sent < sh.out.len:
        if shadow_send(sh) != 0:
            if sh.reused and sh.got == 0:
                shadow_retry(R, sh, now)
            else:
                shadow_end(R, sh, SH_FAILED, now)
            return
    elif ev & (sys_.EPOLLIN | sys_.EPOLLHUP | sys_.EPOLLERR):
        n = sys_.recv_nc(sh.fd, R.scratch, READ_SIZE, sys_.MSG_DONTWAIT)
        if n <= 0 and not (n < 0 and (errno == EAGAIN or errno == EINTR)):
            if sh.reused and sh.got == 0:
                shadow_retry(R, sh, now)
            else:  # the server's close: the end of a close-delimited answer, or cut short
                shadow_end(R, sh, SH_DONE if n == 0 else SH_FAILED, now)
            return
        if n > 0:
            if sh.out.p != NULL:  # (a reused connection's: no retry from here)
                buf_free(&sh.out)
                sh.sent = 0
            how = shadow_read(R, sh, <const unsigned char*>R.scratch, n)
            if how >= 0:
                shadow_end(R, sh, how, now)
                return
    if set_mask(R, sh.fd, &sh.mask, sys_.EPOLLOUT if sh.sent < sh.out.len else sys_.EPOLLIN, sh) != 0:
        shadow_end(R, sh, SH_FAILED, now)


cdef void shadow_end(Relay *R, Shadow *sh, int how, double now) noexcept nogil:
    """A copy is over (*how*: SH_*): its connection idle again in the
    copies' pool at its answer's end when it may be reused and its
    endpoint has fewer than MIRROR_IDLE_MAX idle (watched for the server's
    close), else out of epoll and closed (reset when it failed, read
    enough or could not be framed), freed after the batch (bury());
    counted in a row of its tag (its answer's status, ST_NONE for none,
    and the seconds from its start to *now*), but when the relay closes it
    (SH_CLOSED)."""
    cdef SEP *sp
    if sh.prev != NULL:
        sh.prev.next = sh.next
    else:
        R.shadows = sh.next
    if sh.next != NULL:
        sh.next.prev = sh.prev
    sh.prev = sh.next = NULL
    R.n_shadows -= 1
    L4R_ADD(&R.ctr[<int>CT_MIRROR_ACTIVE], -1)
    if how == SH_FAILED:
        L4R_ADD(&R.ctr[<int>CT_MIRROR_FAILED], 1)
    if how != SH_CLOSED:
        count_row(R, sh.tag, row_key(sh.status if sh.status else ST_NONE, 0),
                  now - sh.started)
    buf_free(&sh.out)
    buf_free(&sh.inb)
    sh.sent = 0
    if how == SH_ANSWERED and sh.keep and not sh.removed:
        sp = sep_find(R, &sh.d, False)
        if (sp == NULL or sp.n_idle < MIRROR_IDLE_MAX) \
                and set_mask(R, sh.fd, &sh.mask, sys_.EPOLLIN | sys_.EPOLLRDHUP, sh) == 0:
            if sp == NULL:
                sp = sep_find(R, &sh.d, True)
            if sp != NULL:
                # idle: newest first; what the next copy finds set as a new one's
                sh.idle = True
                sh.idle_since = now
                sh.reused = False
                sh.got = 0
                sh.status = 0
                sh.answer = AS_STATUS
                sh.text_len = 0
                sh.in_line = 0
                sh.left = 0
                sh.next = sp.idle_head
                if sp.idle_head != NULL:
                    sp.idle_head.prev = sh
                else:
                    sp.idle_tail = sh
                sp.idle_head = sh
                sp.n_idle += 1
                L4R_ADD(&R.ctr[<int>CT_MIRROR_IDLE], 1)
                return
    set_mask(R, sh.fd, &sh.mask, 0, sh)
    if sh.fd < 0:
        pass  # (a retry's connect failed at once: none open)
    elif how == SH_FAILED or how == SH_ENOUGH or how == SH_UNFRAMED:
        reset_close(sh.fd)
    else:
        sys_.close(sh.fd)
    sh.fd = -1
    sh.closed = True
    sh.grave_next = R.sgrave
    R.sgrave = sh


cdef void shadows_retain(Relay *R, const Dest_ *d, bint gone) noexcept nogil:
    """retain_endpoints() for the copies' pool, as for the routes' pool
    (_apply_pending_named): d's endpoint left the route table (*gone*): its
    idle copy connections closed now, the copies in flight to it marked to
    close their connection at their end (shadow_end) instead of leaving it
    idle; named again: unmarked. A scan of the copies in flight (at most
    max_mirrors) per endpoint that left or came back, at a table swap."""
    cdef Shadow *sh = R.shadows
    cdef SEP *sp
    while sh != NULL:
        if same_dest(&sh.d, d):
            sh.removed = gone
        sh = sh.next
    if not gone:
        return
    sp = sep_find(R, d, False)
    while sp != NULL:  # (freed with its last idle one: found again, or NULL)
        shadow_evict(R, sp.idle_head)
        sp = sep_find(R, d, False)


cdef void shadow_evict(Relay *R, Shadow *sh) noexcept nogil:
    """An idle copy connection closed: the server closed it (or spoke),
    it expired, or the relay closes; freed after the batch (bury())."""
    cdef SEP *sp = sep_find(R, &sh.d, False)
    if sp != NULL:
        sep_unlink(R, sp, sh)
    set_mask(R, sh.fd, &sh.mask, 0, sh)
    sys_.close(sh.fd)
    sh.fd = -1
    sh.closed = True
    sh.grave_next = R.sgrave
    R.sgrave = sh


cdef double shadow_timers(Relay *R, double now) noexcept nogil:
    """Fail the copies past their deadline: the soonest of the others' (0:
    none). At most max_mirrors of them."""
    cdef Shadow *sh = R.shadows
    cdef Shadow *nx
    cdef double soonest = 0
    while sh != NULL:
        nx = sh.next
        if sh.deadline <= now:
            shadow_end(R, sh, SH_FAILED, now)
        elif soonest == 0 or sh.deadline < soonest:
            soonest = sh.deadline
        sh = nx
    return soonest


cdef void tick(Relay *R, double now) noexcept nogil:
    cdef int i = 0, k
    cdef Conn *c
    cdef EP *ep
    cdef size_t at
    while i < R.n_conns:
        c = R.conns[i]
        i += 1
        if c.need != N_NONE:
            continue
        if (c.phase == P_CONNECT or c.phase == P_EXCH) and exchange_timer(R, c, now):
            if not c.closed:
                settle(R, c)  # a 504 goes out now
            if c.closed:
                i -= 1  # conn_forget() moved the last one here
            continue
        if c.up != NULL and c.up.connecting and c.up.deadline <= now:
            connect_timed_out(R, c)  # (timers_due() fires it on time: a backstop)
        elif c.phase == P_CLOSING:
            # the linger runs from the answer's last byte (linger); until
            # then a slow reader gets its answer, within the idle timeout
            if (c.closing <= now and not c.out.len) or c.last_active + R.idle_timeout <= now:
                conn_close(R, c, False)
                i -= 1
        elif c.phase == P_HEAD and c.head_started and c.head_started + R.header_timeout <= now:
            L4R_ADD(&R.ctr[<int>CT_TIMEOUTS], 1)
            R.n_head_timeouts += 1
            at = c.out.len
            if to_client(R, c, _LOCAL_408, _LOCAL_408_LEN) != 0:
                i -= 1  # aborted: conn_forget() moved the last one here
                continue
            date_stamp(R, c, at)
            buf_free(&c.inb)
            start_close(R, c, now)
            if not c.closed:
                flush_client(R, c)
            if not c.closed:
                interest(R, c)
            if c.closed:  # (still readable: buried after the tick)
                i -= 1
        elif c.last_active + R.idle_timeout <= now:
            # between requests, or in an exchange where no byte moved either
            # way (a hung upstream): closed with its upstream, as the L4 pump
            # closes an idle relay (backpressure couples the sides: progress
            # either way reads, so last_active moves)
            L4R_ADD(&R.ctr[<int>CT_TIMEOUTS], 1)
            c.lflags |= LF_SI  # (a request in flight: Envoy's stream idle timeout)
            conn_close(R, c, False)
            i -= 1
    for k in range(R.n_eps):
        ep = R.eps[k]
        while ep.idle_tail != NULL and ep.idle_tail.idle_since + ep.pool_idle_timeout <= now:
            L4R_ADD(&R.ctr[<int>CT_EXPIRED], 1)
            up_close(R, ep.idle_tail)
    if R.shadows != NULL:
        shadow_timers(R, now)  # (timers_due()'s: a backstop)
    k = 0
    while k < R.n_seps:  # idle copy connections past the pool idle timeout, oldest first
        if R.seps[k].idle_tail.idle_since + R.pool_idle_timeout <= now:
            shadow_evict(R, R.seps[k].idle_tail)  # (its last: the last SEP moved to k)
            continue
        k += 1


cdef Session_ *_session(session, choices) except? NULL:
    """A route verdict's verdict.SessionPersistence as the loop's block
    (see "Session persistence"); NULL for none. ValueError for one whose
    line cannot be written out (check_header()) or is not ASCII."""
    if session is None:
        return NULL
    kind = SK_HEADER if session.kind == SESSION_HEADER else SK_COOKIE
    line_name, before, after = session.parts()
    check_header(line_name, session.line(("0.0.0.0", 0))[1])
    pre = f"{line_name}: {before}".encode("ascii")
    post = (after + "\r\n").encode("ascii")
    name = session.name.encode("ascii")
    tokens = [session_token((str(e[0]), int(e[1]))).encode("ascii")
              for choice in choices for e in choice.endpoints]
    cdef Py_ssize_t n = len(tokens), n_choices = len(choices), i, off = 0
    cdef size_t head = (sizeof(Session_) + <size_t>(n + 1) * sizeof(Py_ssize_t)
                        + <size_t>(n_choices + 1) * sizeof(int))
    cdef Session_ *s = <Session_*>calloc(
        1, head + len(name) + len(pre) + len(post) + sum(len(t) for t in tokens) + 1)
    cdef char *p
    if s == NULL:
        raise MemoryError()
    s.kind = kind
    s.tok = <Py_ssize_t*>(<char*>s + sizeof(Session_))
    s.first = <int*>(<char*>s.tok + <size_t>(n + 1) * sizeof(Py_ssize_t))
    k = 0
    for i, choice in enumerate(choices):
        s.first[i] = k
        k += len(choice.endpoints)
    s.first[n_choices] = k
    p = <char*>s + head
    s.bytes = p
    for i in range(n):
        s.tok[i] = off
        memcpy(p + off, PyBytes_AS_STRING(tokens[i]), len(tokens[i]))
        off += len(tokens[i])
    s.tok[n] = off
    p += off
    memcpy(p, PyBytes_AS_STRING(name), len(name))
    s.name = p
    s.name_len = len(name)
    p += len(name)
    memcpy(p, PyBytes_AS_STRING(pre), len(pre))
    s.pre = p
    s.pre_len = len(pre)
    p += len(pre)
    memcpy(p, PyBytes_AS_STRING(post), len(post))
    s.post = p
    s.post_len = len(post)
    return s


cdef HashOn_ *_hash_on(on, endpoints) except NULL:
    """A HASH choice's verdict.HashOn as the loop's block (see "Consistent
    hashing"): ValueError for none, or one that would write out a line
    break."""
    if on is None:
        raise ValueError("a HASH choice without hash_on")
    kind = _HASH_KINDS[on.kind] if on.kind in _HASH_KINDS else None
    if kind is None:
        raise ValueError(f"unknown hash kind {on.kind!r}")
    name = (on.name.lower() if kind == HK_HEADER else on.name).encode("latin-1")
    pre = post = b""
    # (the client's address is never absent: no cookie for it, unknown is random)
    ttl = None if kind == HK_SOURCE_IP else on.ttl
    if ttl is not None:
        mark = "\x00" * 16
        line = ("set-cookie: " + on.set_cookie(mark)).encode("latin-1")
        parts = line.split(mark.encode("latin-1"))
        if len(parts) != 2 or b"\r" in line or b"\n" in line:
            raise ValueError(f"a cookie line that cannot be written out: {line!r}")
        pre, post = parts[0], parts[1] + b"\r\n"
    hashes = [endpoint_hash((str(e[0]), int(e[1]))) for e in endpoints]
    cdef Py_ssize_t n = len(hashes), i
    cdef size_t head = sizeof(HashOn_) + <size_t>n * sizeof(uint64_t)
    cdef HashOn_ *h = <HashOn_*>calloc(1, head + len(name) + len(pre) + len(post) + 1)
    cdef char *p
    if h == NULL:
        raise MemoryError()
    h.kind = kind
    h.ep_hash = <uint64_t*>(<char*>h + sizeof(HashOn_))
    for i in range(n):
        h.ep_hash[i] = hashes[i]
    p = <char*>h + head
    memcpy(p, PyBytes_AS_STRING(name), len(name))
    h.name = p
    h.name_len = len(name)
    p += len(name)
    if ttl is not None:
        memcpy(p, PyBytes_AS_STRING(pre), len(pre))
        h.ck_pre = p
        h.ck_pre_len = len(pre)
        p += len(pre)
        memcpy(p, PyBytes_AS_STRING(post), len(post))
        h.ck_post = p
        h.ck_post_len = len(post)
    return h


cdef void bury(Relay *R) noexcept nogil:
    cdef Conn *c
    cdef Up *u
    cdef Shadow *sh
    while R.cgrave != NULL:
        c = R.cgrave
        R.cgrave = c.grave_next
        if c.holds:
            conn_drop_held(c)
        fault_forget(c)
        if c.lg != NULL:
            free(c.lg.req)
            free(c.lg)
        free(c.fwd)
        buf_free(&c.inb)
        buf_free(&c.out)
        buf_free(&c.rhead)
        buf_free(&c.replay)
        free(c.rck)
        free(c)
    while R.ugrave != NULL:
        u = R.ugrave
        R.ugrave = u.grave_next
        buf_free(&u.out)
        free(u)
    while R.sgrave != NULL:
        sh = R.sgrave
        R.sgrave = sh.grave_next
        buf_free(&sh.out)
        free(sh)


cdef void stop_signal(Relay *R, double now) noexcept nogil:
    """The stop signals' signalfd is readable (see "Stop signals"): read,
    DRAIN_STOPPED asked and applied now, Python to call the worker back."""
    cdef char info[128]  # (a struct signalfd_siginfo)
    cdef int before
    while sys_.read(R.sigfd, info, sizeof(info)) == sizeof(info):
        R.stop_seen = True
    sys_.pthread_mutex_lock(&R.lock)
    R.drain_req |= DRAIN_STOPPED
    sys_.pthread_mutex_unlock(&R.lock)
    if not R.draining & DRAIN_STOPPED:
        before = R.draining
        R.draining |= DRAIN_STOPPED
        drain_conns(R, before, 0.0, now)


cdef int run(Relay *R) noexcept nogil:
    """Serve until Python is needed (1), a flush is due (2) or stop (3)."""
    cdef sys_.epoll_event events[MAX_EVENTS]
    cdef int n, i, timeout
    cdef double now, wake
    cdef uint64_t junk
    cdef void *ptr
    cdef bint py_req
    cdef int drain, before
    cdef double spread
    while True:
        if R.kick_head != NULL:
            serve_pending(R, now_s())
            bury(R)
            if R.need_head != NULL:
                return 1
        now = now_s()
        wake = R.next_tick
        if R.next_timer and R.next_timer < wake:
            wake = R.next_timer  # a deadline or a backoff: the tick is too coarse
        timeout = <int>((wake - now) * 1000) + 1
        if timeout < 0 or R.kick_head != NULL:  # (kicked while served)
            timeout = 0
        n = sys_.epoll_wait_nc(R.epfd, events, MAX_EVENTS, timeout)
        now = now_s()
        L4R_STORE(&R.turn_ns, <int64_t>(now * 1e9))  # (a turn: see "Liveness")
        if R.sigfd >= 0:  # the stop before anything else of the batch ("Stop signals")
            for i in range(n if n > 0 else 0):
                if events[i].data.ptr == <void*>R:
                    stop_signal(R, now)
                    events[i].data.ptr = NULL  # (below: a wake-up's)
        # Idle pooled connections with an event (the server closed them, or
        # spoke) leave the pool before anything in the batch can check one
        # out: a request ahead of the close in the batch would take it.
        for i in range(n if n > 0 else 0):
            ptr = events[i].data.ptr
            if ptr != NULL and (<Up*>ptr).kind == K_UP and (<Up*>ptr).owner == NULL \
                    and not (<Up*>ptr).closed:
                upstream_event(R, <Up*>ptr, events[i].events, now)
            elif ptr != NULL and (<Up*>ptr).kind == K_SHADOW and (<Shadow*>ptr).idle \
                    and not (<Shadow*>ptr).closed:
                shadow_evict(R, <Shadow*>ptr)  # (the copies' pool: the same)
        for i in range(n if n > 0 else 0):
            ptr = events[i].data.ptr
            if ptr == NULL:  # the wake-up eventfd
                sys_.read(R.wakefd, &junk, sizeof(junk))
                continue
            if (<Lst*>ptr).kind == K_LST:
                if not (<Lst*>ptr).removed:
                    accept_on(R, <Lst*>ptr, now)
            elif (<Conn*>ptr).kind == K_CONN:
                if not (<Conn*>ptr).closed and (<Conn*>ptr).need == N_NONE:
                    client_event(R, <Conn*>ptr, events[i].events, now)
                elif not (<Conn*>ptr).closed and (<Conn*>ptr).mask \
                        and events[i].events & (sys_.EPOLLHUP | sys_.EPOLLERR):
                    # gone while Python is asked about it (an upstream event
                    # earlier in this batch): an edge-triggered watch
                    # (WATCH_RESET) says so once; the mask marked stale, the
                    # interest() after Python's answer re-arms it
                    # (EPOLL_CTL_MOD) and epoll says it again
                    (<Conn*>ptr).mask |= MASK_STALE
            elif (<Up*>ptr).kind == K_SHADOW:
                if not (<Shadow*>ptr).closed:
                    shadow_event(R, <Shadow*>ptr, events[i].events, now)
            elif not (<Up*>ptr).closed:
                if (<Up*>ptr).owner == NULL or (<Up*>ptr).owner.need == N_NONE:
                    upstream_event(R, <Up*>ptr, events[i].events, now)
        bury(R)
        sys_.pthread_mutex_lock(&R.lock)
        if R.stop:
            sys_.pthread_mutex_unlock(&R.lock)
            return 3
        if R.flush_req:
            R.flush_req = False
            R.flush_due = True
        py_req = R.py_req
        R.py_req = False
        drain = R.drain_req
        spread = R.drain_spread
        sys_.pthread_mutex_unlock(&R.lock)
        if drain != R.draining:  # (before the queue: new_conn() reads it)
            before = R.draining
            R.draining = drain
            drain_conns(R, before, spread, now)
        take_queue(R, now)
        if now >= R.next_tick:
            tick(R, now)
            R.next_tick = now + TICK_S
            if R.drain_next and now >= R.drain_next:
                drain_due(R, now)  # (a gradual drain's; see "Drain")
        if R.next_timer and now >= R.next_timer:
            timers_due(R, now)
        if R.n_lsts:
            watch_listeners(R, now)
        bury(R)
        if now >= R.next_flush:
            R.next_flush = now + FLUSH_S
            R.flush_due = R.rows_used > 0 or R.n_lsts > 0
        if (R.need_head != NULL or R.flush_due or R.n_outcomes or R.n_head_timeouts
                or R.n_fd_limit or R.n_others or R.n_max_conns or py_req or R.stop_seen
                or R.n_not_listening):
            return 1


# -- Python's side ----------------------------------------------------------------

cdef class HttpRelay:
    """Per-request HTTP/1.1 relay on a background thread (compiled twin).

    The interface of :class:`l4proxy.dataplane._relay_py.HttpRelay`, plus:
    ``resolve`` (verdicts the loop caches and applies; without it ``decide``
    is asked per request), ``report_rows`` (the loop's metrics, aggregated:
    ``report_rows(decided, answered)`` with ``decided`` a list of ``(tag,
    count)`` and ``answered`` of ``(tag, status, count, seconds_sum,
    bucket_counts, flags)``, bucket counts per ``buckets`` bound in ms, not
    cumulative, the last one above every bound, *flags* the response flags
    its requests' access log lines show (``accesslog``'s bits, with
    ``LOCAL_VERDICT`` where the tag's own say more: row_flags(), row_key());
    what the loop's table of
    rows could not take before its next flush is counted in ``stats()``'s
    ``metrics_dropped``: see count_row), ``key_headers`` and
    ``seed``; ``decide_peer`` as the pure relay's (and passed on to it).
    Requests the fast path does not take go to :attr:`slow`, a
    pure relay with the same callbacks (``report`` there).
    """

    cdef Relay *R
    cdef object decide, l4, resolve, report_rows, refused
    cdef bint decide_peer          # decide(head, origin, peer): the client's packed address too
    cdef object accepted, classify_origin, accepts
    cdef public object connect_failed, response_failed, answered, answered_5xx
    cdef readonly object slow
    cdef object _thread
    cdef dict _origin_ids
    cdef dict _origins             # id -> origin (ids are reused once swept)
    cdef list _free_oids
    cdef object _intern_lock       # the interned tables: add() runs on other threads
    cdef readonly int intern_limit
    cdef int _swept_origins, _swept_eps
    cdef readonly int sweeps
    cdef dict _ep_ids
    cdef list _ep_keys
    cdef dict _external            # add_external()'s counts (under _intern_lock)
    cdef dict _overflows_gone      # overflows() of the EPs a sweep freed (under _intern_lock)
    cdef dict _rr_ids
    cdef object _rr_salt           # where a new slot starts (rr_start; not R.rng's draw)
    cdef dict _tag_ids
    cdef dict _key_index           # key header name -> its index in the Head
    cdef list _tags
    cdef list _free_tags           # ids of _tags nothing refers to (None there): reused
    cdef Py_ssize_t _live_tags     # ... how many the last _sweep_tags kept
    cdef bint _started, _closed
    cdef bint _stuck               # close() left the thread running (a callback hung)
    cdef double _test_hang         # hang_for_test(): seconds to sleep at the next service
    cdef object _buckets
    cdef object _on_stop_signal    # take_stop_signals()'s callback
    cdef object _pending_keys
    cdef object _named, _pending_named  # retain_endpoints(): as applied, as last given
    cdef dict _settings            # endpoint_settings(): as applied (the loop's thread)
    cdef object _pending_settings  # ... and as last given, until applied
    cdef list _flushed
    cdef list _outcome_texts       # OD_TEXT's reasons, until the outcomes are reported
    cdef dict _retries             # RetryPolicy -> its Retry_ (an address), interned
    cdef dict _edits               # HeadEdits -> its Edits_ (an address; 0: nothing), interned
    cdef dict _faults              # Fault -> its Fault_ (an address; 0: never falls), interned
                                   #     (one with an unhashable tag: an _Unhashable of its own)
    cdef Py_ssize_t _live_retries, _live_edits, _live_faults  # ... how many the last sweep kept
    cdef readonly int interned_sweeps  # _sweep_interned() runs
    cdef readonly int tag_sweeps       # _sweep_tags() runs
    cdef readonly object access_log    # an accesslog.AccessLog (None: off)
    cdef bint _log_warned              # a write error was logged (once)
    cdef dict _log_last                # the access log's counters, last read

    def __cinit__(self, *args, **kwargs):
        self.R = NULL

    def __init__(self, decide, l4, pool=None, double connect_timeout=5.0,
                 double header_timeout=10.0, double idle_timeout=300.0, report=None,
                 connect_failed=None, response_failed=None, answered=None, refused=None, *,
                 answered_5xx=None, resolve=None,
                 report_rows=None, accepted=None, classify_origin=None, accepts=None,
                 int max_connections=0,
                 key_headers=(), buckets=(), seed=None, int max_head=_DEFAULT_MAX_HEAD,
                 int intern_limit=INTERN_LIMIT, bint decide_peer=False,
                 int max_mirrors=DEFAULT_MAX_MIRRORS, access_log=None, forwarding=None):
        cdef Relay *R
        cdef sys_.epoll_event ev
        global _LOCAL_503_RESET, _LOCAL_503_RESET_LEN, _LOCAL_502_MID, _LOCAL_502_MID_LEN
        global _LOCAL_503_RESET_RETRIED, _LOCAL_503_RESET_RETRIED_LEN
        global _LOCAL_503_RESET_RETRIED_KEEP, _LOCAL_503_RESET_RETRIED_KEEP_LEN
        global _LOCAL_503_RESET_RETRIED_KEEP10, _LOCAL_503_RESET_RETRIED_KEEP10_LEN
        global _LOCAL_408, _LOCAL_408_LEN, _LOCAL_504, _LOCAL_504_LEN, R_no_upstream, R_overloaded, R_overflow
        global R_dot_segment
        global _LOCAL_503_RESET_KEEP, _LOCAL_503_RESET_KEEP_LEN, _LOCAL_502_MID_KEEP
        global _LOCAL_502_MID_KEEP_LEN, _LOCAL_504_KEEP, _LOCAL_504_KEEP_LEN
        global _LOCAL_503_CONNECT, _LOCAL_503_CONNECT_LEN
        global _LOCAL_503_CONNECT_KEEP, _LOCAL_503_CONNECT_KEEP_LEN
        global _LOCAL_503_RESET_KEEP10, _LOCAL_503_RESET_KEEP10_LEN, _LOCAL_502_MID_KEEP10
        global _LOCAL_502_MID_KEEP10_LEN, _LOCAL_504_KEEP10, _LOCAL_504_KEEP10_LEN
        global _LOCAL_503_CONNECT_KEEP10, _LOCAL_503_CONNECT_KEEP10_LEN
        if self.R != NULL:
            raise RuntimeError("HttpRelay.__init__ called twice")
        pool = pool or PoolOptions()
        if len(buckets) >= MAX_BUCKETS:
            raise ValueError(f"at most {MAX_BUCKETS - 1} histogram buckets")
        self.decide = decide
        self.decide_peer = decide_peer
        self.l4 = l4
        self.resolve = resolve
        self.report_rows = report_rows
        self.refused = refused
        self.accepted = accepted
        self.classify_origin = classify_origin
        self.accepts = accepts
        self.connect_failed = connect_failed
        self.response_failed = response_failed
        self.answered = answered
        self.answered_5xx = answered_5xx
        self._outcome_texts = []
        self._retries = {}
        self._edits = {}
        self._faults = {}
        self.access_log = access_log
        self.slow = _relay_py.HttpRelay(
            decide, l4, pool, connect_timeout, header_timeout, idle_timeout, report,
            self._slow_connect_failed, self._slow_response_failed, self._slow_answered,
            refused, max_head, answered_5xx=self._slow_answered_5xx, decide_peer=decide_peer,
            max_mirrors=max_mirrors,
            # (its lines to this relay's buffer: one writer, whole lines)
            access_log=None if access_log is None else access_log._replace(sink=self._log_sink),
            forwarding=forwarding,  # (its request ids a stream of its own, os.urandom's)
        )
        # the slow path's requests, as the loop's LEAST_REQUEST must see them
        self.slow.pools.on_active = self.add_external
        self._origin_ids = {}
        self._origins = {}
        self._free_oids = []
        self._intern_lock = threading.Lock()
        self.intern_limit = max(1, intern_limit)
        self._ep_ids = {}
        self._ep_keys = []
        self._settings = {}
        self._external = {}
        self._overflows_gone = {}
        self._rr_ids = {}
        # a new round-robin slot starts at its key's offset (rr_start), from
        # the seed, else the OS: never a draw of R.rng (weights stay as
        # seeded) nor of R.jitter (the backoffs')
        self._rr_salt = rr_salt(seed)
        self.slow.rr_salt = self._rr_salt  # (its mirrors' positions: the same starts)
        self._tag_ids = {}
        self._tags = []
        self._free_tags = []
        self._buckets = tuple(buckets)
        self._flushed = []
        if _LOCAL_503_RESET == NULL:
            _LOCAL_503_RESET = _dup(local_response(503, RESET_BEFORE_HEADERS),
                                    &_LOCAL_503_RESET_LEN)
            _LOCAL_503_RESET_KEEP = _dup(
                local_response(503, RESET_BEFORE_HEADERS, close=False),
                &_LOCAL_503_RESET_KEEP_LEN)
            _LOCAL_503_RESET_KEEP10 = _dup(
                local_response(503, RESET_BEFORE_HEADERS, close=False, http10=True),
                &_LOCAL_503_RESET_KEEP10_LEN)
            _LOCAL_503_RESET_RETRIED = _dup(local_response(503, RESET_BEFORE_HEADERS_RETRIED),
                                            &_LOCAL_503_RESET_RETRIED_LEN)
            _LOCAL_503_RESET_RETRIED_KEEP = _dup(
                local_response(503, RESET_BEFORE_HEADERS_RETRIED, close=False),
                &_LOCAL_503_RESET_RETRIED_KEEP_LEN)
            _LOCAL_503_RESET_RETRIED_KEEP10 = _dup(
                local_response(503, RESET_BEFORE_HEADERS_RETRIED, close=False, http10=True),
                &_LOCAL_503_RESET_RETRIED_KEEP10_LEN)
            _LOCAL_502_MID = _dup(
                local_response(502, "upstream closed the connection mid-response"),
                &_LOCAL_502_MID_LEN)
            _LOCAL_408 = _dup(_relay_py._timeout_answer(), &_LOCAL_408_LEN)
            _LOCAL_504 = _dup(local_response(504, "upstream request timeout"), &_LOCAL_504_LEN)
            _LOCAL_502_MID_KEEP = _dup(
                local_response(502, "upstream closed the connection mid-response", close=False),
                &_LOCAL_502_MID_KEEP_LEN)
            _LOCAL_504_KEEP = _dup(local_response(504, "upstream request timeout", close=False),
                                   &_LOCAL_504_KEEP_LEN)
            _LOCAL_503_CONNECT = _dup(local_response(503, "no healthy upstream"),
                                      &_LOCAL_503_CONNECT_LEN)
            _LOCAL_503_CONNECT_KEEP = _dup(
                local_response(503, "no healthy upstream", close=False),
                &_LOCAL_503_CONNECT_KEEP_LEN)
            _LOCAL_502_MID_KEEP10 = _dup(
                local_response(502, "upstream closed the connection mid-response",
                               close=False, http10=True),
                &_LOCAL_502_MID_KEEP10_LEN)
            _LOCAL_504_KEEP10 = _dup(
                local_response(504, "upstream request timeout", close=False, http10=True),
                &_LOCAL_504_KEEP10_LEN)
            _LOCAL_503_CONNECT_KEEP10 = _dup(
                local_response(503, "no healthy upstream", close=False, http10=True),
                &_LOCAL_503_CONNECT_KEEP10_LEN)
            R_no_upstream = _local_verdict(503, "no healthy upstream", -1)
            R_overloaded = _local_verdict(503, "overloaded", -1)
            R_overflow = _local_verdict(503, OVERFLOW_BODY, -1, OVERFLOW_HEADERS)
            R_dot_segment = _local_verdict(400, DOT_SEGMENT_REASON, -1)
            # (the access log's: why the relay answers)
            R_no_upstream.lflags = LF_UF
            R_overloaded.lflags = LF_OM
            R_overflow.lflags = LF_UO
            R_dot_segment.lflags = LF_PATH
            _log_init()
        R = <Relay*>calloc(1, sizeof(Relay))
        if R == NULL:
            raise MemoryError()
        self.R = R
        R.epfd = sys_.epoll_create1(sys_.EPOLL_CLOEXEC)
        R.wakefd = sys_.eventfd(0, sys_.EFD_CLOEXEC | sys_.EFD_NONBLOCK)
        R.sigfd = -1
        sys_.pthread_mutex_init(&R.lock, NULL)
        if R.epfd < 0 or R.wakefd < 0:
            raise OSError(errno, "epoll/eventfd")
        ev.events = sys_.EPOLLIN
        ev.data.ptr = NULL
        sys_.epoll_ctl(R.epfd, sys_.EPOLL_CTL_ADD, R.wakefd, &ev)
        R.connect_timeout = connect_timeout
        R.header_timeout = header_timeout
        R.idle_timeout = idle_timeout
        R.max_head = max_head
        R.edit_request = edit_request
        R.send_edited_head = send_edited_head
        R.hash_pick = hash_pick
        R.session_choice = session_choice
        R.session_pin = session_pin
        R.mirror_draw = mirror_draw
        R.mirror_start = mirror_start
        R.max_mirrors = max(0, max_mirrors)
        for i in range(N_CHUNK_ERRORS):
            reason = (CHUNKED_ERRORS[i].format(max_trailers=max_head) if i in CHUNKED_ERRORS
                      else "malformed chunked body")
            R.bad_chunk[i] = _dup(local_response(400, reason), &R.bad_chunk_len[i])
        R.max_idle = pool.max_idle
        R.pool_idle_timeout = pool.idle_timeout
        R.max_requests = pool.max_requests
        R.decide_only = resolve is None
        R.max_conns = max_connections
        R.reserve_fd = -1
        R.n_buckets = len(self._buckets)
        for i, b in enumerate(self._buckets):
            R.bounds[i] = b
        R.scratch = <char*>malloc(READ_SIZE)
        R.cache = <Entry*>calloc(CACHE_SLOTS, sizeof(Entry))
        R.rows = <Row*>calloc(ROWS_SLOTS, sizeof(Row))
        if R.scratch == NULL or R.cache == NULL or R.rows == NULL:
            raise MemoryError()
        if seed is not None:  # --seed: the same draws every run, from each rule swap on
            R.seed = ((int(seed) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF) | 1
            R.seeded = True
        else:
            R.seed = (int.from_bytes(os.urandom(8), "little")) | 1
        R.rng = R.seed
        R.jitter = (R.seed * <uint64_t>0xD1B54A32D192ED03) | 1  # (its own sequence)
        if forwarding is not None:  # (see "Forwarding headers")
            R.fwd_on = True
            R.fwd_hops = int(forwarding.trusted_hops)
            R.fwd_lines = fwd_lines
            R.rid = _forwarding.request_id_state(seed)
        R.failures_seen = 1  # (an EP's answer_seen starts at 0: its first answer is news)
        self._set_keys(key_headers)
        R.next_tick = now_s() + TICK_S
        R.next_flush = now_s() + FLUSH_S
        if access_log is not None:  # (see "Access log")
            R.log_line = <char*>malloc(LOG_LINE)
            if R.log_line == NULL:
                raise MemoryError()
            R.log_json = bool(access_log.json)
            R.log_capture = log_capture
            R.log_done = log_done
            fd = os.dup(access_log.fd)
            R.alog = alog_new(fd, max(0, int(access_log.buffer)))
            if R.alog == NULL:
                os.close(fd)
                raise MemoryError()

    def __dealloc__(self):
        cdef Relay *R = self.R
        cdef Handoff *h
        cdef int i
        if R == NULL:
            return
        if self._stuck or (self._started and not self._closed):
            return  # the thread still runs: leak rather than crash
        h = R.q_head
        while h != NULL:
            sys_.close(h.fd)
            free(h.data)
            free(h.local)
            R.q_head = h.next
            free(h)
            h = R.q_head
        while R.n_conns:
            conn_close(R, R.conns[0], True)
        while R.shadows != NULL:
            shadow_end(R, R.shadows, SH_CLOSED, 0.0)
        while R.n_seps:
            shadow_evict(R, R.seps[0].idle_head)
        bury(R)
        if R.cache != NULL:
            cache_clear(R)
        for i in range(R.n_eps):
            while R.eps[i].idle_head != NULL:
                up_close(R, R.eps[i].idle_head)
            free(R.eps[i])
        bury(R)
        for i in range(R.n_keys):
            free(R.keys[i])
        if R.reserve_fd >= 0:
            sys_.close(R.reserve_fd)
        for i in range(R.n_lsts):
            free(R.lsts[i])
        for i in range(R.n_others):
            sys_.close(R.others[i].fd)
        if R.epfd >= 0:
            sys_.close(R.epfd)
        if R.wakefd >= 0:
            sys_.close(R.wakefd)
        if R.sigfd >= 0:
            sys_.close(R.sigfd)
        free(R.eps)
        free(R.seps)
        free(R.rr)
        free(R.cache)
        free(R.rows)
        free(R.conns)
        free(R.scratch)
        for i in range(N_CHUNK_ERRORS):
            free(R.bad_chunk[i])
        if R.alog != NULL:
            alog_close(R.alog, 0.0)
        _free_log_tags(R)
        free(R.log_line)
        sys_.pthread_mutex_destroy(&R.lock)
        free(R)
        for addr in (self._retries or {}).values():
            free(<Retry_*><size_t>addr)
        for addr in (self._edits or {}).values():
            free(<Edits_*><size_t>addr)
        _free_faults(self._faults)
        self.R = NULL

    cdef void _apply_pending_keys(self):
        """The key headers invalidate() left for the loop thread, if any."""
        if self._pending_keys is not None:
            keys, self._pending_keys = self._pending_keys, None
            self._set_keys(keys)

    cdef void _set_keys(self, names):
        """The header names the cache keys and header tests read (the loop
        thread, or before it starts): cached verdicts go, as their keys and
        tests number the names."""
        cdef Relay *R = self.R
        cdef int i, n = 0
        cdef bytes b
        cdef char *fresh[MAX_KEY_HEADERS]
        cache_clear(R)
        if R.seeded:  # a new table: as the route table reseeds its RNG (--seed),
            R.rng = R.seed  # and not at a failed connect's forgetting
        # What the loop can compare byte for byte (rule validation lets
        # only tokens through); a name left out, or past the key's room,
        # and a verdict reading headers is not cached (keys_overflow).
        # Everything is made before anything changes: the index numbers
        # exactly the names stored, whatever fails.
        names = [s.lower() for s in names]
        stored = []
        overflow = False
        for s in names:
            try:
                b = s.encode("ascii")
            except UnicodeEncodeError:
                overflow = True
                continue
            if len(stored) == MAX_KEY_HEADERS:
                overflow = True
                break
            stored.append(b)
        for n in range(len(stored)):
            fresh[n] = <char*>malloc(len(stored[n]) + 1)
            if fresh[n] == NULL:
                for i in range(n):
                    free(fresh[i])
                raise MemoryError()
        for i in range(R.n_keys):
            free(R.keys[i])
        for i, b in enumerate(stored):
            memcpy(fresh[i], <char*>b, len(b))
            R.keys[i] = fresh[i]
            R.key_len[i] = len(b)
        R.n_keys = len(stored)
        R.keys_overflow = overflow
        self._key_index = {b.decode("ascii"): i for i, b in enumerate(stored)}

    def _request_bits(self, tests, bytes head):
        """verdict.request_bits() as the loop computes it for the request
        head *head* (tests: the twins must agree)."""
        cdef Scanner sc
        cdef Head h
        cdef Tests_ *T
        cdef char out[512]
        cdef Py_ssize_t nb
        memset(&sc, 0, sizeof(Scanner))
        if scan(&sc, <const unsigned char*>PyBytes_AS_STRING(head), len(head)) != COMPLETE:
            raise ValueError("not a complete request head")
        h.n_xff = -1
        summarize(self.R, &sc, <const unsigned char*>PyBytes_AS_STRING(head), &h, NULL)
        T = _tests(tests, self._key_index, self.R.n_keys)
        try:
            if (T.n + 7) // 8 > <int>sizeof(out):
                raise ValueError("too many tests")
            nb = test_bits(T, <const unsigned char*>PyBytes_AS_STRING(head), &h, out)
            return PyBytes_FromStringAndSize(out, nb)
        finally:
            free(T)

    def _split_once(self, bytes head, chunks, bint gateway=False):
        """summarize() of the request head *head*, scanned as head_step()
        scans it, in pieces of *chunks* bytes, then the rest: with the lines
        the scan found (when its last call found them all) and split again
        (next_field()); (whether it had the lines, whether both agree, byte
        for byte). Empty lines before it dropped as drop_empty_lines() drops
        them. Tests: the two ways must agree."""
        cdef Scanner sc
        cdef Lines L
        cdef Head a, b
        cdef const unsigned char *p = <const unsigned char*>PyBytes_AS_STRING(head)
        cdef Py_ssize_t n = len(head), upto = 0, d
        cdef int code = NEED_MORE
        cdef bint whole
        memset(&sc, 0, sizeof(Scanner))
        memset(&L, 0, sizeof(Lines))
        for k in list(chunks) + [n]:
            upto = min(upto + k, n)
            code = scan_into(&sc, p, upto, &L)
            if code != NEED_MORE:
                break
        if code != COMPLETE:
            raise ValueError(f"not a complete request head ({code})")
        d = sc.method_start
        head_shift(&sc, &L, d)
        whole = lines_whole(&L, &sc)
        memset(&a, 0, sizeof(Head))
        memset(&b, 0, sizeof(Head))
        a.n_xff = b.n_xff = 0 if gateway else -1
        summarize(self.R, &sc, p + d, &a, &L if whole else NULL)
        summarize(self.R, &sc, p + d, &b, NULL)
        return whole, memcmp(&a, &b, sizeof(Head)) == 0

    def _response_head(self, bytes raw, bint head_request=False, bint fast=True,
                       int memo=-1):
        """response_head() of the response bytes *raw* (the answer to a HEAD
        request with *head_request*), 32 bytes at a time with *fast*, else
        byte by byte: (its result, the head's length, then c.status,
        c.framing, c.resp_left, c.resp_persistent and c.resp_hop as it left
        them in a zeroed connection). The bytes are read from a block of
        their size alone (ASan: no byte past them read). Tests: both ways
        must agree, and with parse_response_head() and response_framing().
        With *memo* 0 to MEMO_HEADS - 1, response_head_memo() with that slot
        of the relay's heads seen before (upstream_bytes()'s way; a relay
        not started only: the loop's thread owns them)."""
        cdef Conn *c
        cdef Py_ssize_t hl = 0, n = len(raw)
        cdef int r
        if memo >= MEMO_HEADS:
            raise ValueError(f"memo: a slot below {MEMO_HEADS}")
        c = <Conn*>calloc(1, sizeof(Conn))
        if c == NULL:
            raise MemoryError
        c.rhead.p = <char*>malloc(n if n else 1)
        if c.rhead.p == NULL:
            free(c)
            raise MemoryError
        memcpy(c.rhead.p, PyBytes_AS_STRING(raw), n)
        c.rhead.len = c.rhead.cap = <size_t>n
        c.method_head = head_request
        if memo >= 0:
            r = response_head_memo(self.R, c, <const unsigned char*>c.rhead.p, n, &hl,
                                   &self.R.memo[memo])
        else:
            r = response_head(self.R, c, <const unsigned char*>c.rhead.p, n, &hl, fast, NULL)
        try:
            return (r, hl, c.status, c.framing, c.resp_left, bool(c.resp_persistent),
                    c.resp_hop)
        finally:
            free(c.rhead.p)
            free(c)

    def _log_escape(self, values, int cap, bint json=False, bint keep_end=False):
        """log_escape() of the bytes *values* (a header's lines: joined by
        ",") at most *cap* bytes, as a line gets it (tests: the twin of
        accesslog.escape() of the values joined). The bytes past *cap* in
        its block are checked untouched: ValueError if it wrote there."""
        cdef list held = [bytes(v) for v in values]
        cdef int k = len(held), i, n
        cdef const unsigned char *ps[LOG_SPANS]
        cdef Py_ssize_t ns[LOG_SPANS]
        cdef char *out
        if not 0 < k <= LOG_SPANS or cap < TRUNC_LEN:
            raise ValueError(f"1 to {LOG_SPANS} values, a cap of {TRUNC_LEN} bytes at least")
        for i in range(k):
            ps[i] = <const unsigned char*>PyBytes_AS_STRING(held[i])
            ns[i] = len(held[i])
        out = <char*>malloc(<size_t>cap + 64)
        if out == NULL:
            raise MemoryError()
        try:
            memset(out, 0xA5, <size_t>cap + 64)
            n = log_escape(out, cap, ps, ns, k, json, keep_end)
            for i in range(cap, cap + 64):
                if <unsigned char>out[i] != 0xA5:
                    raise ValueError(f"log_escape() wrote past its cap ({cap}) at {i}")
            if not 0 <= n <= cap:
                raise ValueError(f"log_escape() said {n} bytes for a cap of {cap}")
            return PyBytes_FromStringAndSize(out, n)
        finally:
            free(out)

    # -- the worker's side --------------------------------------------------

    @property
    def pools(self):
        return _Pools(self)

    def listen(self, int fd, int index, bint gateway=False, gateway_origin=None):
        """Accept on listening socket *fd* in this loop (before start()).

        A gateway listener's connections are this relay's, with origin
        *gateway_origin*. A transparent listener's are this relay's when
        ``classify_origin(ip, port)`` (asked once per original destination and
        rule swap) says so; the others, and those with no original
        destination, go to ``accepted(sock, index)`` (the worker's general
        path). The fd stays the caller's: close it only after unlisten().
        """
        cdef Relay *R = self.R
        cdef Lst *l
        cdef int one = 1
        if self._started:
            raise RuntimeError("listen() after start()")
        if R.n_lsts == MAX_LSTS:
            raise ValueError(f"at most {MAX_LSTS} listeners")
        l = <Lst*>calloc(1, sizeof(Lst))
        if l == NULL:
            raise MemoryError()
        l.kind = K_LST
        l.fd = fd
        l.index = index
        l.gateway = gateway
        if gateway:
            l.gw_origin = self._origin_id(gateway_origin)
        R.lsts[R.n_lsts] = l
        R.n_lsts += 1
        if R.reserve_fd < 0:
            R.reserve_fd = c_open(b"/dev/null", O_RDONLY | sys_.O_CLOEXEC)
        # inherited by every connection accepted from it (one setsockopt, not
        # one per connection); the worker's L4 connections get it too, as
        # their upstream sockets have it already (Envoy sets it on both sides);
        # SO_OOBINLINE too (connect_to), as the pump's sockets have it
        sys_.setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        sys_.setsockopt(fd, sys_.SOL_SOCKET, sys_.SO_OOBINLINE, &one, sizeof(one))
        set_mask(R, l.fd, &l.mask, sys_.EPOLLIN, l)  # (refused: watch_listeners() asks again)

    def unlisten(self, int index, double timeout=2.0):
        """Stop accepting on the listener *index*: True once the loop has
        (then the caller may close it; one never listened to, or let go of
        already, too), False if it had not within *timeout* seconds. Timeout
        0 asks and returns at once: :meth:`listening` says when the loop has
        let go (the worker polls it from its event loop, which a wait here
        would hold)."""
        cdef Relay *R = self.R
        cdef int i
        import time as _time
        for i in range(R.n_lsts):
            if R.lsts[i].index != index or R.lsts[i].removed:
                continue
            if not self._started or self._closed or not self._thread.is_alive():
                set_mask(R, R.lsts[i].fd, &R.lsts[i].mask, 0, R.lsts[i])
                R.lsts[i].removed = True
                return True
            sys_.pthread_mutex_lock(&R.lock)
            R.unlisten |= (<uint32_t>1) << i
            sys_.pthread_mutex_unlock(&R.lock)
            self._wake()
            deadline = _time.monotonic() + timeout
            while not R.lsts[i].removed and _time.monotonic() < deadline:
                _time.sleep(0.001)
            return bool(R.lsts[i].removed)
        return True

    def listening(self, int index):
        """Whether the loop still accepts on the listener *index* (listen()
        and no unlisten() applied yet: the loop's thread applies one at its
        next turn; one whose thread is gone is let go of here)."""
        cdef Relay *R = self.R
        cdef int i
        for i in range(R.n_lsts):
            if R.lsts[i].index != index or R.lsts[i].removed:
                continue
            if self._started and (self._closed or not self._thread.is_alive()):
                set_mask(R, R.lsts[i].fd, &R.lsts[i].mask, 0, R.lsts[i])
                R.lsts[i].removed = True
                return False
            return True
        return False

    def set_external_active(self, int64_t n):
        """The worker's connections outside this relay, for max_connections."""
        L4R_STORE(&self.R.external_active, n)

    def last_accept(self):
        """CLOCK_MONOTONIC seconds of the last accept here (0: none yet)."""
        return L4R_LOAD(&self.R.last_accept_ns) / 1e9

    def start(self):
        if self._started:
            return
        self.slow.start()
        self._thread = threading.Thread(target=self._run, name="l4proxy-relay", daemon=True)
        self._started = True
        L4R_STORE(&self.R.turn_ns, <int64_t>(now_s() * 1e9))  # (its first turn is due)
        self._thread.start()

    def stalled(self):
        """Seconds since the loop's thread last began a turn, while it runs
        (started and alive, one that close() gave up waiting for included:
        stuck; 0.0 otherwise), the pure relay's thread this one hands
        requests to included (see "Liveness"). Any thread."""
        cdef double mine = 0.0
        if self._started and self._thread.is_alive():
            mine = max(0.0, _time_mod.monotonic() - L4R_LOAD(&self.R.turn_ns) / 1e9)
        return max(mine, self.slow.stalled())

    def hang_for_test(self, double seconds):
        """Tests only (the worker's start, where ``L4PROXY_TEST_HANG_RELAY``
        says so: Worker.start): the loop's thread sleeps
        *seconds* at its next service, as a stuck one would (no turn, no
        stop signal read). Any thread."""
        self._test_hang = seconds
        sys_.pthread_mutex_lock(&self.R.lock)
        self.R.py_req = True
        sys_.pthread_mutex_unlock(&self.R.lock)
        self._wake()

    def add(self, sock, origin, data=b"", requests=0, peer=None):
        """Take *sock* (an accepted client); *data*: bytes already read from
        it; *peer*: its address as accept() returned it (None: asked of the
        kernel as it is taken; see the pure twin's)."""
        cdef Relay *R = self.R
        cdef Handoff *h
        cdef bytes d = bytes(data)
        cdef uint32_t oid = self._origin_id(origin)
        cdef sockaddr_storage ss
        cdef sys_.socklen_t peer_n = _sockaddr_of(peer, &ss) if peer is not None else 0
        sock.setblocking(False)  # splice() has no per-call flag for the socket's side
        fd = sock.detach()
        if self._closed:
            sys_.close(fd)
            return
        h = <Handoff*>calloc(1, sizeof(Handoff))
        if h == NULL:
            sys_.close(fd)
            raise MemoryError()
        h.fd = fd
        h.origin = oid
        h.gateway = getattr(origin, "gateway", False) is True  # (new_conn: fwd_on's, the drain's)
        if peer_n:
            memcpy(&h.peer, &ss, peer_n)
            h.peer_n = peer_n
        if R.alog != NULL:  # (the access log's DOWNSTREAM_LOCAL_ADDRESS: its origin's)
            local = _accesslog.origin_address(origin)
            if local is not None:
                text = local.encode()
                h.local = <char*>malloc(len(text))
                if h.local != NULL:
                    memcpy(h.local, <char*>text, len(text))
                    h.local_len = len(text)
        if len(d):
            h.data = <char*>malloc(len(d))
            if h.data == NULL:
                free(h.local)
                free(h)
                sys_.close(fd)
                raise MemoryError()
            memcpy(h.data, <char*>d, len(d))
            h.len = len(d)
        sys_.pthread_mutex_lock(&R.lock)
        if R.q_tail != NULL:
            R.q_tail.next = h
        else:
            R.q_head = h
        R.q_tail = h
        sys_.pthread_mutex_unlock(&R.lock)
        self._wake()

    cdef void _wake(self):
        cdef uint64_t one = 1
        sys_.write(self.R.wakefd, &one, sizeof(one))

    def retain_endpoints(self, endpoints):
        """The endpoints the live route table names (the worker's thread;
        applied on the loop's, in _service): see the pure twin's. The pure
        relay this one hands requests to has its own pools: told too."""
        named = frozenset(endpoints)
        self.slow.retain_endpoints(named)
        if self._closed:
            return
        self._pending_named = named
        sys_.pthread_mutex_lock(&self.R.lock)
        self.R.py_req = True
        sys_.pthread_mutex_unlock(&self.R.lock)
        self._wake()

    def endpoint_settings(self, settings):
        """Each endpoint's own connect timeout, requests per upstream
        connection, pool idle timeout, report_5xx and circuit breakers
        (waiting requests kicked: a new limit lets them go; any thread; applied on
        the loop's, in _service): see the pure twin's. Its EP holds them (read where
        the relay's own were: no lookup per request); an endpoint not
        interned yet gets them when it is (_new_ep). The pure relay this
        one hands requests to has its own pools: told too."""
        checked = checked_endpoint_settings(settings)
        self.slow.endpoint_settings(checked)
        if self._closed:
            return
        self._pending_settings = checked
        sys_.pthread_mutex_lock(&self.R.lock)
        self.R.py_req = True
        sys_.pthread_mutex_unlock(&self.R.lock)
        self._wake()

    cdef _apply_pending_settings(self):
        """endpoint_settings(), on the loop's thread: every interned EP's
        settings, its own or the relay's. An idle connection that has
        already served as many requests as its endpoint now allows is
        closed (as its check-in would have): a limit a rule set applies
        from the next request on, as Envoy's new pool for a changed
        cluster does."""
        cdef int k
        cdef EP *ep
        cdef Up *u
        cdef Up *nxt
        if self._pending_settings is None:
            return
        self._settings, self._pending_settings = self._pending_settings, None
        for k in range(self.R.n_eps):
            ep = self.R.eps[k]
            self._ep_settings(ep, self._ep_keys[k])
            if ep.pend_head != NULL:
                kick(self.R, ep)  # a limit raised or gone: they go (run())
            u = ep.idle_head
            while u != NULL:
                nxt = u.idle_next
                if ep.max_requests and u.requests >= ep.max_requests:
                    L4R_ADD(&self.R.ctr[<int>CT_CLOSED_MAX_REQUESTS], 1)
                    up_close(self.R, u)
                u = nxt

    cdef int _ep_settings(self, EP *ep, key) except -1:
        """*ep*'s settings: endpoint_settings()' for *key*, else the relay's."""
        cdef Relay *R = self.R
        s = self._settings.get(key) if self._settings else None
        if s is None:
            ep.max_requests = R.max_requests
            ep.pool_idle_timeout = R.pool_idle_timeout
            ep.connect_timeout = R.connect_timeout
            ep.report_5xx = False
            ep.max_connections = ep.max_pending = ep.max_active = 0
        else:
            ep.max_requests = s.max_requests
            ep.pool_idle_timeout = s.idle_timeout
            ep.connect_timeout = s.connect_timeout
            ep.report_5xx = s.report_5xx
            ep.max_connections = s.max_connections
            ep.max_pending = s.max_pending
            ep.max_active = s.max_active
        return 0

    cdef _apply_pending_named(self):
        """retain_endpoints(), on the loop's thread: the idle connections of
        an endpoint that left the table are closed, those in flight marked
        to be closed at check-in (up_release); named again, unmarked. The
        copies' pool the same (shadows_retain)."""
        cdef Relay *R = self.R
        cdef EP *ep
        cdef Up *u
        cdef Dest_ d
        cdef int i
        if self._pending_named is None:
            return
        named, self._pending_named = self._pending_named, None
        before, self._named = self._named, named
        if before is None:
            return
        gone = set()
        back = set()
        for key in before - named:
            if _dest_of(key, &d):  # (the copies' pool's: by address, its EP may be swept)
                shadows_retain(R, &d, True)
            i = self._ep_ids.get(key, -1)
            if i < 0:
                continue
            gone.add(i)
            ep = R.eps[i]
            while ep.idle_head != NULL:
                L4R_ADD(&R.ctr[<int>CT_CLOSED_REMOVED], 1)
                up_close(R, ep.idle_head)
        for key in named - before:
            if _dest_of(key, &d):
                shadows_retain(R, &d, False)
            i = self._ep_ids.get(key, -1)
            if i >= 0:
                back.add(i)
        if gone or back:
            for i in range(R.n_conns):
                u = R.conns[i].up
                if u != NULL and u.ep.index in gone:
                    u.removed = True
                elif u != NULL and u.ep.index in back:
                    u.removed = False

    def report_next_successes(self):
        """Outlier detection counted a failure this relay did not report (the
        L4 path's): report every endpoint's next answer (any thread)."""
        L4R_ADD(&self.R.failures_seen, 1)
        self.slow.report_next_successes()

    def invalidate(self, key_headers=None):
        """Forget every cached verdict (a rule swap, an endpoint's health)."""
        if key_headers is not None:
            self._pending_keys = list(key_headers)
        L4R_ADD(&self.R.epoch, 1)
        self._wake()

    def drain(self, bint inbound_only=False, double spread=0.0):
        """Drain the client connections (see "Drain"): the gateway listeners'
        alone with *inbound_only*, else every one, those open now and those
        taken from now on; the pure relay's too (any thread; applied on the
        loop's). Those it names between requests close at once (*spread*
        0), or one after another over *spread* seconds. Asked again with a
        wider scope, it widens (those it adds spread over its own *spread*);
        never narrows."""
        cdef int scope = DRAIN_INBOUND if inbound_only else DRAIN_ALL
        self.slow.drain(inbound_only, spread)
        if self._closed:
            return
        sys_.pthread_mutex_lock(&self.R.lock)
        if scope > (self.R.drain_req & DRAIN_SCOPE):
            self.R.drain_req = (self.R.drain_req & ~DRAIN_SCOPE) | scope
            self.R.drain_spread = spread if spread > 0 else 0.0
        sys_.pthread_mutex_unlock(&self.R.lock)
        self._wake()

    def discourage(self, bint on):
        """While *on*, every answer on a gateway listener's connection says
        ``connection: close`` and closes its connection after it; one
        between requests is left open (see "Drain": Envoy's drain close
        while the health check is failed); the pure relay's too. Off again:
        answers keep their clients, but where a drain says otherwise (any
        thread; applied on the loop's)."""
        self.slow.discourage(on)
        if self._closed:
            return
        sys_.pthread_mutex_lock(&self.R.lock)
        if on:
            self.R.drain_req |= DRAIN_DISCOURAGE
        else:
            self.R.drain_req &= ~DRAIN_DISCOURAGE
        sys_.pthread_mutex_unlock(&self.R.lock)
        self._wake()


    def stop_signalled(self):
        """The worker's stop signal came, heard elsewhere than here (the
        event loop's handler): from now on every answer on a gateway
        listener's connection says close (see "Stop signals"); the pure
        relay's too (any thread; applied on the loop's). The drain
        follows (drain())."""
        self.slow.stop_signalled()  # (lock-free: see the pure twin's)
        if self._closed:
            return
        # A signal's Python handler calls this (run._heard_first, where the
        # relay has no signalfd), between two instructions of the main
        # thread: safe because no thread holds R.lock while Python code
        # runs (each hold is a few C statements, the GIL never taken or
        # given up in one). Keep it so (tests/test_stop_signal_handler.py).
        sys_.pthread_mutex_lock(&self.R.lock)
        self.R.drain_req |= DRAIN_STOPPED
        sys_.pthread_mutex_unlock(&self.R.lock)
        self._wake()

    def stop_withdrawn(self):
        """The stop signal was a SIGTERM to this worker alone, the
        supervisor not stopping (run._Leaving): DRAIN_STOPPED cleared, so
        that answers keep their clients again (where discourage() or a
        drain does not say otherwise) until its hand-over (drain()); the
        pure relay's too. A stop signal heard afterwards sets it again."""
        self.slow.stop_withdrawn()
        if self._closed:
            return
        sys_.pthread_mutex_lock(&self.R.lock)
        self.R.drain_req &= ~DRAIN_STOPPED
        sys_.pthread_mutex_unlock(&self.R.lock)
        self._wake()

    def take_stop_signals(self, signals, on_signal):
        """Hear *signals* (SIGTERM, SIGINT) on the loop's thread, through a
        signalfd, before it serves anything more (see "Stop signals"), and
        call *on_signal()* (on that thread) once each comes. The caller
        blocks them in every thread of the process (a signal a handler took
        never reaches the signalfd). Before start()."""
        cdef sys_.sigset_t mask
        cdef sys_.epoll_event ev
        cdef int fd
        if self._started or self.R.sigfd >= 0:
            raise RuntimeError("take_stop_signals() once, before start()")
        sys_.sigemptyset(&mask)
        for sig in signals:
            sys_.sigaddset(&mask, int(sig))
        fd = sys_.signalfd(-1, &mask, sys_.SFD_NONBLOCK | sys_.SFD_CLOEXEC)
        if fd < 0:
            raise OSError(errno, "signalfd")
        self._on_stop_signal = on_signal
        self.R.sigfd = fd
        ev.events = sys_.EPOLLIN
        ev.data.ptr = <void*>self.R  # (no Conn, Up nor Lst: see run())
        sys_.epoll_ctl(self.R.epfd, sys_.EPOLL_CTL_ADD, fd, &ev)
    def close(self, bint access_log=True, double wait=10.0):
        """Stop the loop, close every connection (the pure relay's too);
        *access_log* False: the access log's writer stays for lines from
        elsewhere (access_log_line()) until close_access_log(). Returns how
        many client connections it cut, the pure relay's with them (see its
        close()); a second call returns 0. Each thread (this loop's, the
        pure relay's) is waited for *wait* seconds at most: one stuck is
        left running, and stalled() says for how long."""
        cdef int cut
        if self._closed:
            return 0
        sys_.pthread_mutex_lock(&self.R.lock)
        self.R.stop = True
        sys_.pthread_mutex_unlock(&self.R.lock)
        self._wake()
        if self._started and self._thread.is_alive():
            self._thread.join(wait)
        self._closed = True
        cut = self.slow.close(wait=wait)
        if self._started and self._thread.is_alive():
            # Still in a Python callback after *wait*: what it uses is left
            # as it is, never freed (nor by __dealloc__) under it.
            self._stuck = True
            return cut + L4R_LOAD(&self.R.ctr[<int>CT_ACTIVE])
        cut += self._shutdown()
        # Every connection is gone: the interned retry policies go now, not
        # in __dealloc__ only, which the cyclic GC reaches after tp_clear
        # set _retries to None (they leaked). The cached verdicts that point
        # at them go first (verdict_free lets go of their references).
        cache_clear(self.R)
        for addr in self._retries.values():
            free(<Retry_*><size_t>addr)
        self._retries.clear()
        for addr in self._edits.values():  # (the same: head edits)
            free(<Edits_*><size_t>addr)
        self._edits.clear()
        _free_faults(self._faults)  # (the same: faults)
        # The requests _shutdown cut (in flight: a drain that timed out) were
        # counted after the loop's last flush (its thread is gone, so the
        # rows are ours): handed over here, as the pure twin reports them.
        try:
            self._flush()
        except Exception:
            L4R_ADD(&self.R.ctr[<int>CT_ERRORS], 1)
        if access_log:  # its last lines (the requests _shutdown cut) written first
            self.close_access_log()
        # Not left to __dealloc__: self.slow holds bound methods of self,
        # so a closed relay is freed by the cyclic GC only, whenever (the
        # reserve fd too, or each relay closed kept a /dev/null open).
        sys_.close(self.R.epfd)
        sys_.close(self.R.wakefd)
        if self.R.reserve_fd >= 0:
            sys_.close(self.R.reserve_fd)
        if self.R.sigfd >= 0:
            sys_.close(self.R.sigfd)
        self.R.epfd = self.R.wakefd = self.R.reserve_fd = self.R.sigfd = -1
        return cut

    def active(self):
        """Client connections owned (queued or relayed); any thread may ask."""
        cdef int queued = 0
        cdef Handoff *h
        sys_.pthread_mutex_lock(&self.R.lock)
        h = self.R.q_head
        while h != NULL:
            queued += 1
            h = h.next
        sys_.pthread_mutex_unlock(&self.R.lock)
        return queued + L4R_LOAD(&self.R.ctr[<int>CT_ACTIVE]) + self.slow.active()

    def stats(self):
        cdef int i
        out = {name: L4R_LOAD(&self.R.ctr[i]) for i, name in enumerate(_STAT_NAMES)}
        slow = self.slow.stats()
        for k, v in slow.items():
            if k != "connections":  # every one of those was counted here first
                out[k] = out.get(k, 0) + v
        out["slow_path"] = L4R_LOAD(&self.R.ctr[<int>CT_SLOW])
        if self.access_log is not None:
            out.update(self._log_counts())
        return out

    cdef dict _log_counts(self):
        """The access log's counters (kept once it is closed)."""
        cdef int64_t n[4]
        if self.R.alog != NULL:
            alog_counts(self.R.alog, n)
            self._log_last = {"access_log_lines": n[0], "access_log_dropped": n[1],
                              "access_log_write_errors": n[2]}
            if n[3] and not self._log_warned:
                self._log_warned = True
                _accesslog.log.warning(
                    "access log: a write failed (%s): its line(s) dropped; later failures are "
                    "counted in l4proxy_access_log_write_errors_total, not logged",
                    os.strerror(<int>n[3]))
        return dict(self._log_last or {})

    def flush_access_log(self, double timeout=1.0):
        """Wait (at most *timeout* s) until the access log's lines buffered
        so far were written; whether they were (none to write: True)."""
        cdef int r = 1
        if self.R.alog != NULL:
            with nogil:
                r = alog_flush(self.R.alog, timeout)
        return bool(r)

    def close_access_log(self):
        """Write what the access log buffered (a second at most) and close
        its writer: after close(access_log=False), on the thread that calls
        access_log_line() (the worker's loop), once that sends no more."""
        cdef int flushed
        cdef l4_alog *a = self.R.alog
        if a == NULL or self._stuck:  # (stuck: its thread may push yet; left, see close())
            return
        with nogil:
            flushed = alog_flush(a, 1.0)
        self._log_counts()  # (kept: stats() after close(), the last batch's drops too)
        # Forgotten before it is freed, the GIL held: _log_sink, the pure
        # relay's thread (still running where its close() gave up joining
        # it), holds the GIL from its read of R.alog to its push's end, so
        # it pushed before this or finds NULL, never a writer alog_close()
        # frees under it (its push hung on the freed lock, the GIL held)
        self.R.alog = NULL
        with nogil:
            alog_close(a, 1.0 if flushed else 0.0)

    def reopen_access_log(self, int fd):
        """The access log's writer writes to *fd*'s file from now on
        (--access-log reopened: SIGUSR1): the lines taken so far still go
        to the file open now, the writer switches after them (l4_alog_reopen);
        *fd* stays the caller's. On the worker's loop thread (as
        close_access_log). False: no access log, or closed."""
        cdef int r
        if self.R.alog == NULL:
            return False
        with nogil:
            r = alog_reopen(self.R.alog, fd)
        if r != 0:
            raise OSError(errno, os.strerror(errno))
        return True

    def access_log_line(self, bytes line):
        """A line from elsewhere in the worker (a connection routed at L4):
        to this relay's buffer, written by its writer with its own lines,
        whole; dropped (counted) when the buffer is full, ignored once
        the access log is closed."""
        self._log_sink(line)

    def _log_sink(self, bytes line):
        """The pure relay's lines (its thread): to this relay's buffer; the
        GIL held throughout (see close_access_log())."""
        cdef l4_alog *a = self.R.alog if self.R != NULL else NULL
        if a != NULL:
            alog_push(a, PyBytes_AS_STRING(line), <size_t>PyBytes_GET_SIZE(line))

    def add_external(self, endpoint, int64_t n):
        """*n* more requests or connections to *endpoint* that this loop does
        not hold (any thread): the slow path's (its pools tell), the
        worker's L4 connections and the tunnels it took over. The loop's
        LEAST_REQUEST adds them to its own (ep_load); the count lives here,
        under the intern lock, and in the endpoint's EP while it has one."""
        cdef int64_t left
        key = (str(endpoint[0]), int(endpoint[1]))
        with self._intern_lock:
            left = self._external.get(key, 0) + n
            if left:
                self._external[key] = left
            else:
                self._external.pop(key, None)
            i = self._ep_ids.get(key)
            if i is not None:
                L4R_STORE(&self.R.eps[<int>i].ext, left)

    def pool_active(self, endpoint):
        with self._intern_lock:  # not while a sweep moves the EPs
            i = self._ep_ids.get(endpoint)
            mine = self.R.eps[<int>i].active if i is not None else 0
            return mine + self._external.get(endpoint, 0)

    def overflows(self):
        """The circuit breakers' 503 answers per endpoint since the start,
        this loop's and its pure relay's (a new dict; any thread)."""
        cdef int64_t n
        with self._intern_lock:  # not while a sweep moves the EPs
            out = dict(self._overflows_gone)
            for key, i in self._ep_ids.items():
                n = L4R_LOAD(&self.R.eps[<int>i].overflows)
                if n:
                    out[key] = out.get(key, 0) + n
        for key, n in self.slow.overflows().items():
            out[key] = out.get(key, 0) + n
        return out

    def pending(self):
        """Requests waiting for a connection per endpoint now, this loop's
        and its pure relay's (a new dict; any thread)."""
        cdef int64_t n
        with self._intern_lock:
            out = {}
            for key, i in self._ep_ids.items():
                n = L4R_LOAD(&self.R.eps[<int>i].n_pending)
                if n:
                    out[key] = n
        for key, n in self.slow.pending().items():
            out[key] = out.get(key, 0) + n
        return out

    def pool_snapshot(self):
        out = {}
        with self._intern_lock:
            external = dict(self._external)
            for key, i in self._ep_ids.items():
                out[key] = (self.R.eps[<int>i].active + external.pop(key, 0),
                            self.R.eps[<int>i].n_idle)
        for key, n in external.items():
            out[key] = (n, 0)
        for key, (_, n) in self.slow.pools.snapshot().items():  # its active: in external
            x = out.get(key, (0, 0))
            out[key] = (x[0], x[1] + n)
        return out

    # -- the loop thread ---------------------------------------------------------

    def _run(self):
        cdef int r
        while True:
            with nogil:
                r = run(self.R)
            if r == 3:
                try:  # what the last turn told outlier detection, as the metrics
                    self._report_outcomes()
                except BaseException:
                    L4R_ADD(&self.R.ctr[<int>CT_ERRORS], 1)
                self._flush()
                pool_drain()  # this thread's spare buffers go with it
                return
            try:
                self._service()
                if self._sweep_due():
                    self._sweep()
                if self.R.flush_due:
                    self.R.flush_due = False
                    self._flush()
            except BaseException:  # the thread must not die: count and go on
                L4R_ADD(&self.R.ctr[<int>CT_ERRORS], 1)
            waiters, self._flushed = self._flushed, []
            for ev in waiters:
                ev.set()

    cdef _say_not_listening(self):
        """A listener whose accept() said EINVAL (it does not listen) is
        said once, and watched again each NOT_LISTENING_PAUSE_S (accept_on)."""
        cdef Relay *R = self.R
        cdef int i
        R.n_not_listening = 0
        for i in range(R.n_lsts):
            if R.lsts[i].einval == 1:
                R.lsts[i].einval = 2
                # (stopping or draining: another copy's drain retired it, as
                # a stop that lands while a worker hands over has it: debug)
                said = _log.debug if R.draining & (DRAIN_STOPPED | DRAIN_SCOPE) else _log.warning
                said(
                    "accept on listener %d failed: [Errno %d] %s (it does not listen); "
                    "watched again each %.0fs, said once",
                    R.lsts[i].index, EINVAL, os.strerror(EINVAL), NOT_LISTENING_PAUSE_S)

    cdef int _shutdown(self):
        """Close everything; how many client connections it cut (not those
        closing after their last answer, sent whole: see "Drain")."""
        cdef Relay *R = self.R
        cdef int i, cut = 0
        cdef Handoff *h
        cdef double now = now_s()
        while R.n_conns:
            if R.conns[0].phase != P_CLOSING or R.conns[0].out.len:
                cut += 1
            R.conns[0].lflags |= LF_LOCAL_CUT  # (its request's line: a drain cut, ours)
            conn_close(R, R.conns[0], True)
        while R.shadows != NULL:
            shadow_end(R, R.shadows, SH_CLOSED, 0.0)
        while R.n_seps:
            shadow_evict(R, R.seps[0].idle_head)
        bury(R)
        sys_.pthread_mutex_lock(&R.lock)
        h = R.q_head
        R.q_head = R.q_tail = NULL
        sys_.pthread_mutex_unlock(&R.lock)
        while h != NULL:
            sys_.close(h.fd)
            cut += 1
            free(h.data)
            free(h.local)
            R.q_head = h.next
            free(h)
            h = R.q_head
        for i in range(R.n_eps):
            while R.eps[i].idle_head != NULL:
                up_close(R, R.eps[i].idle_head)
        for i in range(R.n_others):
            reset_close(R.others[i].fd)
        cut += R.n_others
        R.n_others = 0
        bury(R)
        pool_drain()  # the buffers just freed, on whichever thread shuts down
        return cut

    cdef _service(self):
        """Do what the loop asked for, in order."""
        cdef Relay *R = self.R
        cdef Conn *c
        cdef double now
        if self._test_hang:  # (tests only: hang_for_test)
            hang, self._test_hang = self._test_hang, 0.0
            _time_mod.sleep(hang)
        if R.n_not_listening:
            self._say_not_listening()
        if R.stop_seen:  # (see "Stop signals")
            R.stop_seen = False
            self.slow.stop_signalled()
            try:
                self._on_stop_signal()
            except BaseException:  # (the rest of the service goes on)
                L4R_ADD(&R.ctr[<int>CT_ERRORS], 1)
        self._apply_pending_keys()
        self._apply_pending_named()
        self._apply_pending_settings()
        # (first: a failed connect reported below came after these)
        self._report_outcomes()
        while R.need_head != NULL:
            c = R.need_head
            R.need_head = c.need_next
            if R.need_head == NULL:
                R.need_tail = NULL
            need = c.need
            c.need = N_NONE
            if c.closed:
                continue
            now = now_s()
            try:
                if need == N_RESOLVE:
                    self._resolve(c, now)
                elif need == N_SLOW:
                    self._to_slow(c)
                    continue
                elif need == N_RESPONSE:
                    self._response(c, now)
                elif need == N_CONNECT_FAILED:
                    self._connect_failed(c, now)
            except BaseException:
                L4R_ADD(&R.ctr[<int>CT_ERRORS], 1)
                if not c.closed:
                    conn_close(R, c, True)
            if c.need == N_NONE:
                settle(R, c)
        bury(R)
        if R.n_others:
            self._others(now_s())
        refusals = [
            ("header_timeout", R.n_head_timeouts),
            ("fd_limit", R.n_fd_limit),
            ("max_connections", R.n_max_conns),
        ]
        R.n_head_timeouts = R.n_fd_limit = R.n_max_conns = 0
        if self.refused is not None:
            for why, n in refusals:
                for _ in range(n):
                    self.refused(why)
        self._report_outcomes()

    cdef _report_outcomes(self):
        """outcome()'s queue, to the callbacks, in order."""
        cdef Relay *R = self.R
        cdef int i, why
        if not R.n_outcomes:
            return
        queued = [(R.out_ep[i], R.out_tag[i], R.out_why[i],
                   R.out_status[i] if R.out_why[i] == OD_5XX else 0)
                  for i in range(R.n_outcomes)]
        R.n_outcomes = 0
        texts, self._outcome_texts = self._outcome_texts, []
        for ep, tag, why, status in queued:
            key = self._ep_keys[ep]
            if why == OD_ANSWERED:
                if self.answered is not None:
                    self.answered(key, self._tag(tag))
                continue
            if why == OD_5XX:  # a failure to the news, as below
                self.slow.report_next_successes()
                if self.answered_5xx is not None:
                    self.answered_5xx(key, self._tag(tag), status)
                continue
            if why == OD_BEFORE:
                reason = "upstream closed the connection before a response"
            elif why == OD_TIMEOUT:
                reason = "upstream request timeout"
            elif why == OD_MID:
                reason = "upstream closed the connection mid-response"
            elif why >= OD_TEXT:
                reason = texts[why - OD_TEXT]
            else:
                reason = CHUNKED_ERRORS.get(why - OD_CHUNKED, "malformed chunked body")
                reason = reason.format(max_trailers=R.max_head)
            # (the cache is kept: a failure alone changes no verdict; an
            # ejection does, and the worker then calls invalidate(). Forgetting
            # it on every failure sent every request to Python while an
            # endpoint, or a client, made responses fail.)
            self.slow.report_next_successes()
            if self.response_failed is not None:
                self.response_failed(key, self._tag(tag), reason)

    cdef int _outcome_text(self, str reason) except -1:
        """OD_TEXT's code for *reason* (a failure judged in Python)."""
        self._outcome_texts.append(reason)
        return OD_TEXT + len(self._outcome_texts) - 1

    cdef _others(self, double now):
        """Accepted connections Python must look at: classify their original
        destination (cached per destination), then this relay or the worker."""
        cdef Relay *R = self.R
        cdef int i, n = R.n_others
        cdef Other o
        cdef char key[16]
        cdef int64_t epoch = L4R_LOAD(&R.epoch)
        cdef uint32_t oid
        cdef bint mine
        R.n_others = 0
        for i in range(n):
            o = R.others[i]
            sock = _socket.socket(fileno=o.fd)
            try:
                mine = False
                if o.addr and self.classify_origin is not None:
                    ip = _socket.inet_ntop(_socket.AF_INET, (<char*>&o.addr)[:4])
                    port = int.from_bytes((<char*>&o.port)[:2], "big")
                    mine, origin = self.classify_origin(ip, port)
                    oid = self._origin_id(origin) if mine else 0
                    memcpy(key, &o.addr, 4)
                    memcpy(key + 4, &o.port, 2)
                    key[6] = <char>SHAPE_ORIGIN
                    if epoch == R.cache_epoch:
                        cache_put(R, key, 7, key_hash(key, 7), NULL,
                                  OC_RELAY if mine else OC_OTHER, now + 1.0, epoch, oid)
                if mine:
                    local = f"{ip}:{port}".encode()  # (the access log's, as accept_on()'s)
                    new_conn(R, sock.detach(), oid, NULL, 0, True, now, local, len(local),
                             False, NULL, 0)  # (its peer asked now: conn_peer())
                elif self.accepted is not None:
                    self.accepted(sock, o.lst)
                else:
                    sock.close()
            except BaseException:
                L4R_ADD(&R.ctr[<int>CT_ERRORS], 1)
                if sock.fileno() >= 0:
                    sock.close()

    cdef object _tag(self, int tag):
        return self._tags[tag] if 0 <= tag < len(self._tags) else None

    cdef uint32_t _origin_id(self, origin) except? 0xFFFFFFFF:
        with self._intern_lock:
            try:
                return self._origin_ids[origin]
            except KeyError:
                hashable = True
            except TypeError:  # unhashable: one id per connection (tests)
                hashable = False
            oid = self._free_oids.pop() if self._free_oids else len(self._origins)
            self._origins[oid] = origin
            if hashable:
                self._origin_ids[origin] = oid
            return oid

    def table_sizes(self):
        """How many origins and endpoints the loop has interned (bounded:
        _sweep), and how many sweeps ran."""
        return {"origins": len(self._origins), "endpoints": self.R.n_eps,
                "balance_slots": self.R.n_rr, "sweeps": self.sweeps}

    cdef _sweep_due(self):
        cdef Relay *R = self.R
        return (len(self._origins) > max(self.intern_limit, 2 * self._swept_origins)
                or R.n_eps > max(self.intern_limit, 2 * self._swept_eps))

    cdef _sweep(self):
        """Forget the origins and endpoints nothing uses any more (loop thread).

        Every distinct original destination on an HTTP port is an origin
        here, and every distinct endpoint of a verdict an EP, PassthroughCluster
        included: an app that calls many external addresses would grow both
        for ever. Run when a table doubled since the last sweep (amortized
        O(1) per entry). The verdict cache goes first (its keys name origins,
        its verdicts hold EPs); what a connection, a queued hand-off, a
        listener or a pooled or checked-out upstream connection uses stays,
        under its id. Round-robin positions restart (they live in verdicts),
        each at its key's offset (rr_start; drawn anew without --seed).
        """
        cdef Relay *R = self.R
        cdef int i, k, n = 0
        cdef Conn *c
        cdef Handoff *h
        cdef EP *ep
        if R.n_outcomes:  # EP indices wait to be reported: next time
            return
        bury(R)
        cache_clear(R)
        with self._intern_lock:
            live = set()
            for i in range(R.n_conns):
                live.add(R.conns[i].origin)
            for i in range(R.n_lsts):
                if R.lsts[i].gateway:
                    live.add(R.lsts[i].gw_origin)
            sys_.pthread_mutex_lock(&R.lock)
            h = R.q_head
            while h != NULL:
                live.add(h.origin)
                h = h.next
            sys_.pthread_mutex_unlock(&R.lock)
            for oid in [o for o in self._origins if o not in live]:
                origin = self._origins.pop(oid)
                try:
                    if self._origin_ids.get(origin) == oid:
                        del self._origin_ids[origin]
                except TypeError:
                    pass
                self._free_oids.append(oid)
            self._swept_origins = len(self._origins)
            used = set()
            for i in range(R.n_conns):
                c = R.conns[i]
                for k in range(c.n_cand):
                    used.add(c.cand[k].index)
                if c.fail_ep != NULL:
                    used.add(c.fail_ep.index)
                if c.up != NULL:
                    used.add(c.up.ep.index)
            keys = []
            for k in range(R.n_eps):
                ep = R.eps[k]
                if ep.active or ep.n_idle or ep.n_pending or ep.kicked or k in used:
                    keys.append(self._ep_keys[k])
                    ep.index = n
                    R.eps[n] = ep
                    n += 1
                else:
                    if ep.overflows:  # (overflows() counts them still)
                        key = self._ep_keys[k]
                        self._overflows_gone[key] = self._overflows_gone.get(key, 0) + ep.overflows
                    free(ep)
            R.n_eps = n
            self._ep_keys = keys
            self._ep_ids = {key: i for i, key in enumerate(keys)}
            self._swept_eps = n
            self._rr_ids = {}
            R.n_rr = 0
            if not R.seeded:  # (the slots made anew start at offsets drawn anew)
                self._rr_salt = rr_salt(None)
            self.sweeps += 1

    cdef int _tag_id(self, tag) except -2:
        """The id of a verdict's tag (interned per distinct tag; an
        unhashable one gets an id per conversion), from the ids
        _sweep_tags freed first."""
        try:
            return self._tag_ids[tag]
        except KeyError:
            hashable = True
        except TypeError:
            hashable = False
        if self._free_tags:
            tid = self._free_tags.pop()
            self._tags[tid] = tag
        else:
            tid = len(self._tags)
            self._tags.append(tag)
        if self.R.alog != NULL:
            self._log_tag(tid, tag)
        if hashable:
            self._tag_ids[tag] = tid
        return tid

    cdef _log_tag(self, int tid, tag):
        """What the access log says of tag id *tid* (the loop's thread, the
        loop waiting: R.log_tags grows here alone): its TagLog's values
        escaped as a line has them."""
        cdef Relay *R = self.R
        cdef LogTag_ **grown
        cdef LogTag_ *t
        cdef int n
        cdef bytes cluster, route, details
        try:
            d = self.access_log.describe(tag)
        except Exception:  # (its lines say nothing of it: the request goes on)
            L4R_ADD(&R.ctr[<int>CT_ERRORS], 1)
            d = _accesslog.NO_TAG
        json = R.log_json
        cluster = _accesslog.escape(d.upstream_cluster.encode("utf-8", "replace"),
                                    _accesslog.CAPS["upstream_cluster"], json)
        route = _accesslog.escape(d.route_name.encode("utf-8", "replace"),
                                  _accesslog.CAPS["route_name"], json)
        details = _accesslog.escape(d.details.encode("utf-8", "replace"),
                                    _accesslog.CAPS["response_code_details"], json)
        if tid >= R.n_log_tags:
            n = max(tid + 1, 2 * R.n_log_tags, 16)
            grown = <LogTag_**>realloc(R.log_tags, n * sizeof(LogTag_*))
            if grown == NULL:
                raise MemoryError()
            memset(grown + R.n_log_tags, 0, (n - R.n_log_tags) * sizeof(LogTag_*))
            R.log_tags = grown
            R.n_log_tags = n
        t = <LogTag_*>malloc(sizeof(LogTag_) + len(cluster) + len(route) + len(details) + 1)
        if t == NULL:
            raise MemoryError()
        t.flags = int(d.flags) & LF_FLAGS
        t.cluster = <char*>t + sizeof(LogTag_)
        t.cluster_len = len(cluster)
        t.route = t.cluster + t.cluster_len
        t.route_len = len(route)
        t.details = t.route + t.route_len
        t.details_len = len(details)
        memcpy(t.cluster, <char*>cluster, t.cluster_len)
        memcpy(t.route, <char*>route, t.route_len)
        memcpy(t.details, <char*>details, t.details_len)
        free(R.log_tags[tid])
        R.log_tags[tid] = t

    cdef _sweep_tags(self):
        """Free the tag ids nothing refers to (the loop's thread, before a
        conversion takes any id: what holds one is all here): each reload
        may bring new tags (subsets or routes renamed), an unhashable tag
        one per conversion; kept, they grew for the life of the process.
        What reads an id later, marked: the cached verdicts (theirs, their
        choices' and empty answers', their mirrors'), every connection's
        c.tag (its reports: failures, outcomes), a delayed request's local
        answer and its drawn copies not started (c.shadow), the interned
        faults' aborts (Fault.tag), those waiting in the grave, the copies
        in flight and buried after the batch (their reports at their end:
        Mirror.tag), the metric rows not yet flushed (_flush), the queued
        outcomes. A freed id is reused only once
        nothing reads it. Run when the ids in use passed twice what the
        last sweep kept, plus INTERN_SLACK (amortized O(1) per id)."""
        cdef Relay *R = self.R
        cdef Verdict_ *v
        cdef Conn *c
        cdef Shadow *sh
        cdef int i, j, k
        cdef Py_ssize_t n = len(self._tags)
        live = bytearray(n + 1)  # (index n: an id out of range, -1 below)
        marks = []
        if R.cache != NULL:
            for i in range(CACHE_SLOTS):
                v = R.cache[i].v
                if R.cache[i].key == NULL or v == NULL:
                    continue
                marks.append(v.tag)
                for j in range(v.n):
                    marks.append(v.choices[j].tag)
                    if v.choices[j].empty != NULL:
                        marks.append(v.choices[j].empty.tag)
                    if v.choices[j].ep_tags != NULL:
                        for k in range(v.choices[j].n_eps):
                            marks.append(v.choices[j].ep_tags[k])
                for j in range(v.n_mirrors):
                    marks.append(v.mirrors[j].tag)
                    if v.mirrors[j].ep_tags != NULL:
                        for k in range(v.mirrors[j].n_eps):
                            marks.append(v.mirrors[j].ep_tags[k])
        for addr in self._faults.values():  # (an abort's tag: Fault.tag)
            if addr:
                marks.append((<Fault_*><size_t>addr).answer.tag)
        for i in range(R.n_conns):
            c = R.conns[i]
            marks.append(c.tag)
            if c.mixed:  # (its next try's tag: its candidates')
                for j in range(c.n_cand):
                    marks.append(c.cand_tag[j])
            if c.fault_local:
                marks.append(c.fault_answer.tag)
            if c.shadow != NULL:
                for j in range(c.shadow.n):
                    marks.append(c.shadow.d[j].tag)
        c = R.cgrave
        while c != NULL:
            marks.append(c.tag)
            c = c.grave_next
        sh = R.shadows
        while sh != NULL:
            marks.append(sh.tag)
            sh = sh.next
        sh = R.sgrave
        while sh != NULL:
            marks.append(sh.tag)
            sh = sh.grave_next
        for i in range(ROWS_SLOTS):
            if R.rows[i].tag > 0:
                marks.append(R.rows[i].tag - 1)
        for i in range(R.n_outcomes):
            marks.append(R.out_tag[i])
        for t in marks:
            if 0 <= t < n:
                live[t] = 1
        free = set(self._free_tags)
        for t in range(n):
            if not live[t] and t not in free:
                tag = self._tags[t]
                self._tags[t] = None
                try:
                    if self._tag_ids.get(tag) == t:
                        del self._tag_ids[tag]
                except TypeError:
                    pass
                self._free_tags.append(t)
        self._live_tags = n - len(self._free_tags)
        self.tag_sweeps += 1

    @property
    def interned_tags(self):
        """How many tag ids are in use (bounded: _sweep_tags)."""
        return len(self._tags) - len(self._free_tags)

    cdef EP *_ep(self, key) except NULL:
        cdef Relay *R = self.R
        i = self._ep_ids.get(key)
        if i is not None:
            return R.eps[<int>i]
        with self._intern_lock:  # add_external() (other threads) reads these
            return self._new_ep(key)

    cdef EP *_new_ep(self, key) except NULL:
        cdef Relay *R = self.R
        cdef EP *ep
        cdef EP **grown
        cdef bytes host
        cdef uint32_t addr
        if R.n_eps == R.cap_eps:
            grown = <EP**>realloc(R.eps, sizeof(EP*) * (R.cap_eps * 2 + 16))
            if grown == NULL:
                raise MemoryError()
            R.eps = grown
            R.cap_eps = R.cap_eps * 2 + 16
        ep = <EP*>calloc(1, sizeof(EP))
        if ep == NULL:
            raise MemoryError()
        host = str(key[0]).encode("ascii", "replace")
        ep.numeric = inet_pton(AF_INET, host, &addr) == 1
        ep.addr = addr if ep.numeric else 0
        if not ep.numeric and inet_pton(AF_INET6, host, ep.addr6) == 1:
            ep.numeric = ep.v6 = True
        ep.port = htons(<uint16_t>int(key[1]))
        ep.ext = self._external.get(key, 0)
        self._ep_settings(ep, key)
        ep.index = R.n_eps
        R.eps[R.n_eps] = ep
        self._ep_ids[key] = R.n_eps
        self._ep_keys.append(key)
        R.n_eps += 1
        return ep

    cdef int _rr_slot(self, key) except -1:
        cdef Relay *R = self.R
        cdef uint64_t *grown
        i = self._rr_ids.get(key)
        if i is not None:
            return i
        if R.n_rr == R.cap_rr:
            grown = <uint64_t*>realloc(R.rr, sizeof(uint64_t) * (R.cap_rr * 2 + 16))
            if grown == NULL:
                raise MemoryError()
            R.rr = grown
            R.cap_rr = R.cap_rr * 2 + 16
        R.rr[R.n_rr] = <uint64_t>rr_start(self._rr_salt, key)  # (not 0: Envoy's random start)
        self._rr_ids[key] = R.n_rr
        R.n_rr += 1
        return R.n_rr - 1

    cdef Retry_ *_retry(self, policy) except? NULL:
        """A RetryPolicy as the loop's struct, interned (None, or a policy
        not in effect: NULL)."""
        cdef Retry_ *p
        cdef int b
        if policy is None or not policy.in_effect:
            return NULL
        addr = self._retries.get(policy)
        if addr is not None:
            p = <Retry_*><size_t>addr
            p.refs += 1
            return p
        if len(self._retries) >= 2 * self._live_retries + INTERN_SLACK:
            self._sweep_interned()
        p = <Retry_*>calloc(1, sizeof(Retry_))
        if p == NULL:
            raise MemoryError()
        p.attempts = min(int(policy.attempts), 0x7FFFFFFF)
        p.per_try = max(0.0, float(policy.per_try_timeout))
        p.backoff = max(0.0, float(policy.backoff))
        p.backoff_max = p.backoff * BACKOFF_MAX_FACTOR
        p.on = <uint32_t>int(policy.on)
        p.ignore_prev = bool(policy.ignore_previous_hosts)
        p.on_connect = bool(policy.on_connect)
        for code in policy.codes:
            b = int(code) - 100
            if 0 <= b < 512:
                p.codes[b >> 6] |= (<uint64_t>1) << (b & 63)
        self._retries[policy] = <size_t>p
        p.refs = 1
        return p

    cdef Edits_ *_edit(self, edits) except? NULL:
        """A HeadEdits as the loop's struct, interned per distinct edits, as
        retry policies are (None, or edits that change nothing: NULL)."""
        cdef Edits_ *p
        cdef Span *spans
        cdef char *text
        cdef size_t at = 0
        cdef int i
        if edits is None:
            return NULL
        addr = self._edits.get(edits)
        if addr is not None:
            p = <Edits_*><size_t>addr
            if p != NULL:
                p.refs += 1
            return p
        if len(self._edits) >= 2 * self._live_edits + INTERN_SLACK:
            self._sweep_interned()
        e = edit_bytes(edits)
        if not e.request and not e.response:
            self._edits[edits] = 0
            return NULL
        names = sorted(e.request_drop) + sorted(e.response_drop)
        blob = b"".join(names) + e.request_lines + e.response_lines + e.prefix + (e.authority or b"")
        p = <Edits_*>calloc(1, sizeof(Edits_) + len(names) * sizeof(Span) + len(blob) + 1)
        if p == NULL:
            raise MemoryError()
        spans = <Span*>(<char*>p + sizeof(Edits_))
        text = <char*>(spans + len(names))
        memcpy(text, <char*>blob, len(blob))
        for i, name in enumerate(names):
            spans[i].p = <const unsigned char*>(text + at)
            spans[i].n = len(name)
            at += len(name)
        p.request = e.request
        p.response = e.response
        p.n_req_drop = len(e.request_drop)
        p.req_drop = spans
        p.n_resp_drop = len(e.response_drop)
        p.resp_drop = spans + p.n_req_drop
        p.req_lines = text + at
        p.req_lines_len = len(e.request_lines)
        at += p.req_lines_len
        p.resp_lines = text + at
        p.resp_lines_len = len(e.response_lines)
        at += p.resp_lines_len
        p.path = e.strip is not None
        p.strip = e.strip if e.strip is not None else 0
        p.prefix = text + at
        p.prefix_len = len(e.prefix)
        at += p.prefix_len
        if e.authority is not None:
            p.authority = text + at
            p.authority_len = len(e.authority)
        self._edits[edits] = <size_t>p
        p.refs = 1
        return p

    cdef _sweep_interned(self):
        """Free the interned retry policies and head edits nothing refers to
        (the loop's thread: the only one that changes their refs).

        Each reload may bring new distinct ones (a header value per deploy,
        a retry timeout tuned over time): kept, they grew for the life of
        the process. A verdict (cached, or being applied) and a connection
        whose request follows one hold a reference (verdict_free,
        conn_drop_held let it go); one still referred to stays interned,
        for the next verdict that asks for it. Run when a table passed
        twice what the last sweep kept, plus INTERN_SLACK (amortized O(1)
        per entry interned). Edits that change nothing (0) hold no memory
        of their own but their key's: they go too."""
        cdef Retry_ *r
        cdef Edits_ *e
        cdef Fault_ *f
        for policy, addr in list(self._retries.items()):
            r = <Retry_*><size_t>addr
            if r.refs == 0:
                del self._retries[policy]
                free(r)
        for edits, addr in list(self._edits.items()):
            e = <Edits_*><size_t>addr
            if e == NULL or e.refs == 0:
                del self._edits[edits]
                free(e)
        for fault, addr in list(self._faults.items()):
            f = <Fault_*><size_t>addr
            if f == NULL or f.refs == 0:
                del self._faults[fault]
                if f != NULL:
                    verdict_free(f.answer)
                    free(f)
        self._live_retries = len(self._retries)
        self._live_edits = len(self._edits)
        self._live_faults = len(self._faults)
        self.interned_sweeps += 1

    @property
    def interned_edits(self):
        """How many distinct head edits this relay holds (bounded:
        _sweep_interned; none after close())."""
        return len(self._edits)

    @property
    def interned_retries(self):
        """How many distinct retry policies this relay holds (bounded:
        _sweep_interned; none after close())."""
        return len(self._retries)

    cdef Verdict_ *_convert(self, verdict) except NULL:
        """A Verdict (Python) as the loop's struct."""
        cdef Verdict_ *v
        cdef Choice_ *ch
        cdef int i, j
        if len(self._tags) - len(self._free_tags) >= 2 * self._live_tags + INTERN_SLACK:
            self._sweep_tags()  # (before this verdict takes an id)
        if verdict.local is not None:
            status, body = verdict.local
            v = _local_verdict(status, body, self._tag_id(verdict.tag),
                               header_lines(verdict.local_headers))
            v.lflags = LF_LOCALV  # (the route's own answer: its tag says why)
            v.decided = bool(verdict.decided)
            try:
                v.fault = self._fault(verdict.fault)
            except BaseException:
                verdict_free(v)
                raise
            return v
        choices = verdict.choices
        v = _local_verdict(503, "no healthy upstream", self._tag_id(verdict.tag))
        v.lflags = LF_UH
        v.kind = V_ROUTE
        v.timeout = max(0.0, float(verdict.timeout))
        v.retry = self._retry(verdict.retry)
        v.choices = <Choice_*>calloc(len(choices) or 1, sizeof(Choice_))
        if v.choices == NULL:
            verdict_free(v)
            raise MemoryError()
        v.n = len(choices)  # (not before: verdict_free() reads that many choices)
        v.total = 0
        try:  # (verdict_free takes a half-built one: its parts start NULL)
            for i, choice in enumerate(choices):
                ch = &v.choices[i]
                ch.weight = max(0, int(choice.weight))
                v.total += ch.weight
                ch.policy = _POLICIES.get(choice.policy, LB_ROUND_ROBIN)
                ch.tag = self._tag_id(choice.tag)
                ch.rr = self._rr_slot(choice.balance_key)
                ch.edits = self._edit(choice.edits)
                if ch.policy == LB_HASH:
                    ch.hash = _hash_on(choice.hash_on, choice.endpoints)
                if len(choice.endpoints) == 0:
                    # the router's answer, edited as its other own answers
                    # (HeadEdits), here once: pick() hands it out as it is
                    status = choice.status
                    body = no_endpoint_body(status)
                    ch.empty = _local_verdict(status, body, ch.tag, "", choice.edits)
                    ch.empty.lflags = LF_UH if status == 503 else 0
                ch.eps = <EP**>calloc(len(choice.endpoints) or 1, sizeof(EP*))
                if ch.eps == NULL:
                    raise MemoryError()
                for j, e in enumerate(choice.endpoints):
                    ch.eps[j] = self._ep((str(e[0]), int(e[1])))
                    ch.n_eps = j + 1
                ch.ep_tags = self._ep_tags(choice.endpoint_tags, ch.n_eps)
        except BaseException:
            verdict_free(v)
            raise
        if v.n == 1 and v.choices[0].n_eps == 0:
            v.tag = v.choices[0].tag
        try:
            self._mirrors(v, verdict.mirrors)
            v.session = _session(verdict.session, choices)
        except BaseException:
            verdict_free(v)
            raise
        v.fault = self._fault(verdict.fault)
        return v

    cdef _mirrors(self, Verdict_ *v, mirrors):
        """A route verdict's mirrors (verdict.Mirror) as its Mirror_s: each
        endpoint an EP, a round-robin slot per balance_key (else per
        endpoints, as the pure twin's), its tag's id (its copies' reports)."""
        cdef Mirror_ *m
        cdef int i, j
        if not mirrors:
            return
        v.mirrors = <Mirror_*>calloc(len(mirrors), sizeof(Mirror_))
        if v.mirrors == NULL:
            raise MemoryError()
        v.n_mirrors = len(mirrors)  # (verdict_free() frees each one's eps, NULL or not)
        for i, mirror in enumerate(mirrors):
            m = &v.mirrors[i]
            m.ppm = min(max(0, int(mirror.ppm)), MIRROR_SCALE)
            m.tag = self._tag_id(mirror.tag)
            key = mirror.balance_key
            m.rr = self._rr_slot(("mirror", tuple(mirror.endpoints)) if key is None else key)
            m.eps = <EP**>calloc(len(mirror.endpoints) or 1, sizeof(EP*))
            if m.eps == NULL:
                raise MemoryError()
            for j, e in enumerate(mirror.endpoints):
                m.eps[j] = self._ep((str(e[0]), int(e[1])))
                m.n_eps = j + 1
            m.ep_tags = self._ep_tags(mirror.endpoint_tags, m.n_eps)

    cdef int *_ep_tags(self, tags, int n) except? NULL:
        """A choice's or a mirror's endpoint_tags as tag ids (malloc'd, the
        struct's own), parallel to its n endpoints; NULL for none (every
        request takes its tag). Not parallel: ValueError (refused)."""
        cdef int *out
        cdef int i
        if not tags:
            return NULL
        if len(tags) != n:
            raise ValueError("endpoint_tags not parallel to endpoints")
        out = <int*>malloc(<size_t>n * sizeof(int))
        if out == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                out[i] = self._tag_id(tags[i])
        except BaseException:
            free(out)
            raise
        return out

    cdef Fault_ *_fault(self, fault) except? NULL:
        """A Fault as the loop's struct, interned per distinct fault, as
        retry policies are (None, or one that never falls: NULL)."""
        cdef Fault_ *p
        if fault is None:
            return NULL
        key = fault
        try:
            addr = self._faults.get(fault)
        except TypeError:  # an unhashable Fault.tag: one entry per conversion, as its tag's id
            key = _Unhashable()
            addr = None
        if addr is not None:
            p = <Fault_*><size_t>addr
            if p != NULL:
                p.refs += 1
            return p
        if len(self._faults) >= 2 * self._live_faults + INTERN_SLACK:
            self._sweep_interned()
        delay_ppm = min(max(0, int(fault.delay_ppm)), FAULT_SCALE)
        abort_ppm = min(max(0, int(fault.abort_ppm)), FAULT_SCALE)
        if float(fault.delay) <= 0:
            delay_ppm = 0  # (no wait: no draw either, as in the pure twin)
        if not delay_ppm and not abort_ppm:
            self._faults[key] = 0
            return NULL
        p = <Fault_*>calloc(1, sizeof(Fault_))
        if p == NULL:
            raise MemoryError()
        p.delay = float(fault.delay) if delay_ppm else 0.0
        p.delay_ppm = delay_ppm
        p.abort_ppm = abort_ppm
        try:
            tid = -1 if fault.tag is None else self._tag_id(fault.tag)
            p.answer = _local_verdict(int(fault.abort_status), FAULT_ABORT_BODY, tid)
            p.answer.lflags = LF_FI
        except BaseException:
            free(p)
            raise
        self._faults[key] = <size_t>p
        p.refs = 1
        return p

    @property
    def interned_faults(self):
        """How many distinct faults this relay holds (bounded:
        _sweep_interned; none after close())."""
        return len(self._faults)

    cdef Verdict_ *_checked(self, verdict) except? NULL:
        """_convert(verdict), or NULL, counted as an error (as a resolve()
        that raised), when it says to write out what must not be (a line
        break in a header's value...: edit_bytes() and header_lines() raise
        ValueError); MemoryError goes on. The decide-only path's NULL: its
        503 converted here."""
        try:
            return self._convert(verdict)
        except MemoryError:
            raise
        except Exception:
            L4R_ADD(&self.R.ctr[<int>CT_ERRORS], 1)
        if self.R.decide_only:
            return self._convert(Verdict(local=(503, "no healthy upstream")))
        return NULL

    cdef _head_object(self, Conn *c):
        return parse_head(PyBytes_FromStringAndSize(c.inb.p, c.head_len), self.R.max_head)

    cdef _resolve(self, Conn *c, double now):
        cdef Relay *R = self.R
        cdef Verdict_ *v
        cdef Head h
        cdef char key[2048]
        cdef char vkey[2048]
        cdef Py_ssize_t n, sn
        cdef Tests_ *tests
        cdef const unsigned char *src
        cdef int64_t epoch = L4R_LOAD(&R.epoch)
        # invalidate() set them with the epoch just read (both under the GIL,
        # as this): a verdict cached under it is keyed by them
        self._apply_pending_keys()
        head = self._head_object(c)
        origin = self._origins[c.origin]
        if R.decide_only:
            try:
                if self.decide_peer:
                    # (peer_of()'s bytes, asked once per connection; a gateway's
                    # trusted client from X-Forwarded-For: hash_source())
                    n = hash_source(c, &src)
                    peer = PyBytes_FromStringAndSize(<const char*>src, n) if n > 0 else None
                    d = self.decide(head, origin, peer)
                else:
                    d = self.decide(head, origin)
            except Exception:
                L4R_ADD(&R.ctr[<int>CT_ERRORS], 1)
                d = Decision(local=(503, "no healthy upstream"))
            if d.local is not None:
                verdict = Verdict(local=d.local, tag=d.tag, local_headers=d.local_headers,
                                  fault=d.fault)
            elif not d.endpoints:  # (the router's answer: a choice's, edited)
                # (its endpoint_tags, which must be none, checked as the pure
                # twin checks them: a tag without an endpoint is refused)
                verdict = Verdict((Choice(1, (), "ORDERED", None, d.tag, d.status, d.edits,
                                          endpoint_tags=tuple(d.endpoint_tags)),),
                                  fault=d.fault)
            else:
                verdict = Verdict(
                    (Choice(1, tuple(d.endpoints), "ORDERED", None, d.tag, edits=d.edits,
                            endpoint_tags=tuple(d.endpoint_tags)),),
                    timeout=d.timeout, retry=d.retry, fault=d.fault, mirrors=d.mirrors,
                    session=d.session)
            v = self._checked(verdict)
            try:
                apply_verdict(R, c, v, now)
            finally:
                verdict_free(v)
            return
        try:
            verdict = self.resolve(head, origin)
        except Exception:
            L4R_ADD(&R.ctr[<int>CT_ERRORS], 1)
            verdict = Verdict(local=(503, "no healthy upstream"))
        v = self._checked(verdict)
        if v == NULL:  # (not to be written out: counted, answered as an error)
            verdict = Verdict(local=(503, "no healthy upstream"))
            v = self._convert(verdict)
        ttl = verdict.ttl
        shape = verdict.shape & (SHAPE_FULL | SHAPE_TESTS)
        if shape & SHAPE_PATH or not verdict.tests:
            shape &= ~SHAPE_TESTS
        cacheable = ttl > 0 and epoch == R.cache_epoch
        tests = NULL
        if cacheable and shape & SHAPE_TESTS:
            try:
                tests = _tests(verdict.tests, self._key_index, R.n_keys)
            except (KeyError, ValueError):
                cacheable = False  # a test the loop cannot evaluate: this request only
            except BaseException:
                verdict_free(v)
                raise
        if cacheable:
            h.n_xff = -1
            summarize(R, &c.s, <const unsigned char*>c.inb.p, &h, NULL)
            # the verdict's key (which tests this target passes), then the
            # shape entry's, which takes the tests
            n = make_key(R, c, <const unsigned char*>c.inb.p, &h, vkey, sizeof(vkey), shape,
                         tests)
            sn = make_key(R, c, <const unsigned char*>c.inb.p, &h, key, sizeof(key), SHAPE_ONLY)
            if sn >= 0:
                cache_put(R, key, <size_t>sn, key_hash(key, <size_t>sn), NULL, shape,
                          now + ttl, epoch, 0, tests)
            else:
                free(tests)
            if n >= 0:
                apply_verdict(R, c, v, now)
                cache_put(R, vkey, <size_t>n, key_hash(vkey, <size_t>n), v, shape,
                          now + ttl, epoch)
                return
        try:
            apply_verdict(R, c, v, now)
        finally:
            verdict_free(v)

    cdef _to_slow(self, Conn *c):
        """Hand c, with every byte read from it, to the pure relay."""
        cdef Relay *R = self.R
        cdef int fd = c.fd
        if c.out.len:
            # The answer to the request before (pipelined ahead of this one)
            # is not all sent: the pure relay cannot take it over, so the
            # connection changes hands once flush_client() has sent it.
            flush_client(R, c)
            if c.closed:
                return
            if c.out.len:
                c.slow_after_flush = True
                interest(R, c)
                return
        data = PyBytes_FromStringAndSize(c.inb.p, c.inb.len) if c.inb.len else b""
        requests = c.requests
        origin = self._origins[c.origin]
        if c.up != NULL:
            up_discard(R, c)
        conn_forget(R, c, False)
        L4R_ADD(&R.ctr[<int>CT_SLOW], 1)
        sock = _socket.socket(fileno=fd)
        self.slow.add(sock, origin, data, requests=requests, peer=_peer_address(c))

    cdef _response(self, Conn *c, double now):
        """A response head the C recogniser did not take: judged in Python.
        One with a line ending in a bare LF (a legacy server's) goes on with
        CRLF: c.rhead's head is written again (crlf_head(), as the pure
        twin's Exchange sends it); so is a 204's or 304's without its
        framing lines (bodiless_head(), see _framing_py's Decisions)."""
        cdef Py_ssize_t hl
        cdef Buf out
        cdef int k
        raw = PyBytes_FromStringAndSize(c.rhead.p, c.rhead.len)
        method = "HEAD" if c.method_head else "GET"
        req = RequestHead(method, "/", "/", "HTTP/1.1", (), None, 0, True, None, False, False)
        while True:
            try:
                resp = parse_response_head(raw, self.R.max_head)
                if resp is None:
                    return  # wait for more
                kind, length = response_framing(req, resp)
            except FramingError as exc:  # (a response's: status 502)
                if c.retry != NULL and c.retry.on & RT_ON_RESET and can_retry(c):
                    # a protocol error is a reset to Envoy: retried as one
                    # (the try's connection closed, a gateway failure)
                    policy_retry(self.R, c, self._outcome_text(exc.reason), now)
                    return
                answer = local_response(exc.status, exc.reason)
                kept = local_response(exc.status, exc.reason, close=False)
                kept10 = local_response(exc.status, exc.reason, close=False, http10=True)
                upstream_failed(self.R, c, exc.status, answer, len(answer), kept, len(kept),
                                kept10, len(kept10), now, self._outcome_text(exc.reason))
                return
            if kind == Framing.TUNNEL:  # 101 without Upgrade, 2xx to CONNECT: refused above
                answer = local_response(502, "unexpected tunnel response")
                kept = local_response(502, "unexpected tunnel response", close=False)
                kept10 = local_response(502, "unexpected tunnel response", close=False,
                                        http10=True)
                upstream_failed(self.R, c, 502, answer, len(answer), kept, len(kept),
                                kept10, len(kept10), now,
                                self._outcome_text("unexpected tunnel response"))
                return
            hl = resp.head_length
            head = crlf_head(raw[:hl]) if resp.bare_lf else raw[:hl]
            if resp.status == 204 or resp.status == 304:  # (its framing lines go: Decisions)
                head = bodiless_head(head, resp.status)
            if len(head) != hl or resp.bare_lf:
                memset(&out, 0, sizeof(out))
                k = buf_add(&out, <const char*>head, <size_t>len(head))
                k |= buf_add(&out, c.rhead.p + hl, c.rhead.len - <size_t>hl)
                if k != 0:  # out of memory
                    buf_free(&out)
                    conn_abort(self.R, c)
                    return
                buf_free(&c.rhead)
                c.rhead = out
                raw = head + raw[hl:]
                hl = len(head)
            if 100 <= resp.status < 200:  # interim: forward, another head follows
                # (none to an HTTP/1.0 client: RFC 9110 §15.2; nor a 100
                # where the relay said its own: body_here_read())
                if not c.http10 and not (c.continued and resp.status == 100):
                    if to_client(self.R, c, c.rhead.p, hl) != 0 or c.closed:
                        return  # out of memory: aborted
                    c.client_bytes += hl
                buf_drop(&c.rhead, hl)
                raw = raw[hl:]
                r = response_head_fast(self.R, c, &hl)
                if r == 1:
                    head_out(self.R, c, hl, now)
                    return
                if r == 0:
                    return
                continue
            c.status = resp.status
            tokens = {t.lower() for t in resp.values("connection")}
            c.resp_persistent = "close" not in tokens and (
                resp.version != "HTTP/1.0" or "keep-alive" in tokens)
            c.resp_hop = (((HOP_LINES | HOP_NAMED) if response_hop_by_hop(raw[:hl]) else 0)
                          | (HOP_KEEP if "keep-alive" in tokens else 0)
                          | (HOP_CLOSE if says_close(<const unsigned char*>c.rhead.p, hl) else 0))
            c.framing = int(kind)
            c.resp_left = length
            head_out(self.R, c, hl, now)
            return

    cdef _connect_failed(self, Conn *c, double now):
        cdef EP *ep = c.fail_ep
        key = self._ep_keys[ep.index]
        if c.fail_errno == -1:
            why = "not resolved yet"
        elif c.fail_errno == -2:
            why = "connect timeout"
        else:
            why = os.strerror(c.fail_errno)
        tag = self._tag(c.tag)
        L4R_ADD(&self.R.epoch, 1)  # health may change: decide again
        ep.answer_seen = 0  # its next answer is news, and the pure relay's
        self.slow.report_next_successes()
        if self.connect_failed is not None:
            self.connect_failed(key, tag, why)
        connect_failed_next(self.R, c, now)

    # The pure relay's reports (its thread): a failure there makes every
    # endpoint's next answer here news too.

    def _slow_connect_failed(self, endpoint, tag, why):
        L4R_ADD(&self.R.epoch, 1)
        L4R_ADD(&self.R.failures_seen, 1)
        if self.connect_failed is not None:
            self.connect_failed(endpoint, tag, why)

    def _slow_response_failed(self, endpoint, tag, why):
        L4R_ADD(&self.R.failures_seen, 1)  # (the cache kept: see _report_outcomes)
        if self.response_failed is not None:
            self.response_failed(endpoint, tag, why)

    def _slow_answered(self, endpoint, tag):
        if self.answered is not None:
            self.answered(endpoint, tag)

    def _slow_answered_5xx(self, endpoint, tag, status):
        L4R_ADD(&self.R.failures_seen, 1)  # (a failure to the news, as above)
        if self.answered_5xx is not None:
            self.answered_5xx(endpoint, tag, status)

    cdef _flush(self):
        """Hand the loop's metrics to report_rows, and start counting afresh."""
        cdef Relay *R = self.R
        cdef Row *r
        cdef int i, b, status
        cdef int64_t n
        cdef uint32_t flags
        decided = []
        answered = []
        for i in range(ROWS_SLOTS):
            r = &R.rows[i]
            if r.tag == 0:
                continue
            tag = self._tags[r.tag - 1] if r.tag - 1 < len(self._tags) and r.tag > 0 else None
            if r.key == 0:
                decided.append((tag, r.count))
            else:
                status = <int16_t>(r.key & 0xFFFF)
                flags = r.key >> 16
                answered.append((tag, status if status != ST_NONE else 0, r.count, r.sum_s,
                                 tuple(r.buckets[b] for b in range(R.n_buckets + 1)),
                                 (flags & LF_FLAGS) | (LF_LOCALV if flags & RF_LOCALV else 0)))
            memset(r, 0, sizeof(Row))
        R.rows_used = 0
        if R.alog != NULL and not self._log_warned:  # (a write error: logged once)
            self._log_counts()
        if self.report_rows is not None and (decided or answered):
            self.report_rows(decided, answered)
        for i in range(R.n_lsts):
            if R.lsts[i].accepted and self.accepts is not None:
                n = R.lsts[i].accepted
                R.lsts[i].accepted = 0
                self.accepts(R.lsts[i].index, n)

    def flush_reports(self, double timeout=0.5):
        """Have the loop hand what it counted to ``report_rows`` now, and
        wait (at most *timeout* s) until it has: /stats reads fresh numbers."""
        if not self._started or self._closed:
            return
        ev = threading.Event()
        self._flushed.append(ev)
        sys_.pthread_mutex_lock(&self.R.lock)
        self.R.flush_req = True
        sys_.pthread_mutex_unlock(&self.R.lock)
        self._wake()
        ev.wait(timeout)


cdef class _Pools:
    """``relay.pools``: what the worker asks of the pure twin's Pools."""

    cdef HttpRelay relay

    def __init__(self, HttpRelay relay):
        self.relay = relay

    def active(self, endpoint):
        return self.relay.pool_active(endpoint)

    def snapshot(self):
        return self.relay.pool_snapshot()


cdef char *_dup(bytes b, size_t *n) except NULL:
    """A C copy of *b*, kept for the life of the process (one per answer)."""
    cdef char *p = <char*>malloc(len(b) if len(b) else 1)
    if p == NULL:
        raise MemoryError()
    memcpy(p, <char*>b, len(b))
    n[0] = len(b)
    return p


cdef void _free_faults(dict faults):
    """The interned faults (close(), __dealloc__): freed, forgotten."""
    if not faults:
        return
    for addr in faults.values():
        if addr:
            verdict_free((<Fault_*><size_t>addr).answer)
            free(<Fault_*><size_t>addr)
    faults.clear()


cdef bint _dest_of(key, Dest_ *d) except -1:
    """*key* (address, port) as a copy's endpoint in *d* (as mirror_draw()
    copies an EP's); False for a name not resolved (never a copy's)."""
    cdef bytes host = str(key[0]).encode("ascii", "replace")
    cdef uint32_t addr
    memset(d, 0, sizeof(Dest_))
    d.port = htons(<uint16_t>int(key[1]))
    if inet_pton(AF_INET, host, &addr) == 1:
        d.addr = addr
        return True
    if inet_pton(AF_INET6, host, d.addr6) == 1:
        d.v6 = True
        return True
    return False


cdef sys_.socklen_t _sockaddr_of(peer, sockaddr_storage *ss) except? 0:
    """*peer* (a socket address as accept() returns it: (host, port, ...))
    as a sockaddr in *ss*, its length returned; 0 for one that is no IP
    address's (a socketpair's)."""
    cdef bytes host
    memset(ss, 0, sizeof(sockaddr_storage))
    if not isinstance(peer, tuple) or len(peer) < 2 or not isinstance(peer[0], str):
        return 0
    host = peer[0].partition("%")[0].encode("ascii", "replace")
    if inet_pton(AF_INET, host, &(<sockaddr_in*>ss).sin_addr) == 1:
        (<sockaddr_in*>ss).sin_family = AF_INET
        (<sockaddr_in*>ss).sin_port = htons(<uint16_t>int(peer[1]))
        return sizeof(sockaddr_in)
    if inet_pton(AF_INET6, host, &(<sockaddr_in6*>ss).sin6_addr) == 1:
        (<sockaddr_in6*>ss).sin6_family = AF_INET6
        (<sockaddr_in6*>ss).sin6_port = htons(<uint16_t>int(peer[1]))
        return sizeof(sockaddr_in6)
    return 0


cdef object _peer_address(Conn *c):
    """c's client address (c.peer: accept()'s, or asked once) as accept()
    returns one, for the pure relay a connection is handed to; None: unknown."""
    if c.peer_len == 4:
        return (_socket.inet_ntop(_socket.AF_INET, (<char*>c.peer)[:4]), ntohs(c.peer_port))
    if c.peer_len == 16:
        return (_socket.inet_ntop(_socket.AF_INET6, (<char*>c.peer)[:16]), ntohs(c.peer_port), 0, 0)
    return None


cdef Verdict_ *_local_verdict(int status, body, int tag, str headers="",
                              edits=None) except NULL:
    """A local answer (local_response()'s, its three variants: kept, kept
    to an HTTP/1.0 client, closed); with *edits* (a HeadEdits: the
    router's answer for a choice with no endpoint) their response edits
    applied (edit_local_answer(): answer_client() cuts a HEAD request's
    answer at the edited head's end)."""
    cdef bytes keep = edit_local_answer(
        local_response(status, body, close=False, headers=headers), edits)
    cdef bytes keep10 = edit_local_answer(
        local_response(status, body, close=False, headers=headers, http10=True), edits)
    cdef bytes close = edit_local_answer(
        local_response(status, body, close=True, headers=headers), edits)
    cdef Verdict_ *v = <Verdict_*>calloc(1, sizeof(Verdict_))
    if v == NULL:
        raise MemoryError()
    v.kind = V_LOCAL
    v.status = status
    v.tag = tag
    v.keep = <char*>malloc(len(keep))
    v.keep10 = <char*>malloc(len(keep10))
    v.close = <char*>malloc(len(close))
    if v.keep == NULL or v.keep10 == NULL or v.close == NULL:
        verdict_free(v)
        raise MemoryError()
    memcpy(v.keep, <char*>keep, len(keep))
    memcpy(v.keep10, <char*>keep10, len(keep10))
    memcpy(v.close, <char*>close, len(close))
    v.keep_len = len(keep)
    v.keep10_len = len(keep10)
    v.close_len = len(close)
    return v


cdef void _log_init() except *:
    """The access log's texts from accesslog (its twin's: one source)."""
    global TRUNC, TRUNC_LEN
    cdef size_t n
    TRUNC = _dup(_accesslog.TRUNCATED, &n)
    TRUNC_LEN = <int>n
    for i, name in enumerate(_accesslog.FLAG_NAMES):
        FLAG_NAME[i] = _dup(name.encode(), &n)
        FLAG_NAME_LEN[i] = <int>n
    if len(_accesslog.JSON_KEYS) != N_LOG_FIELDS:  # (l4_log_line() writes them)
        raise ImportError("accesslog.JSON_KEYS is not the compiled relay's")


cdef void _free_log_tags(Relay *R) noexcept nogil:
    cdef int i
    for i in range(R.n_log_tags):
        free(R.log_tags[i])
    free(R.log_tags)
    R.log_tags = NULL
    R.n_log_tags = 0

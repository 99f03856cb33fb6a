"""One client connection of the per-request HTTP/1.1 proxy, sans-IO; pure twin.

The data plane routes every request of a keep-alive connection on its own
(a canary split, a rule swap and a rollback reach a long-lived connection at
its next request: Istio #13908), and reuses upstream connections across
requests and clients. :class:`Exchange` is the decision part of that: it is
fed the client's and the upstream's bytes and says what to do, as a list of
actions; it owns no socket, no clock and no route table. The I/O shell (the
relay) performs the actions, and asks the route table when told
:class:`Route`.

Theory of operation
-------------------
A connection runs a cycle of phases, one request in flight at a time (a
pipelined request waits, unread or in ``_inbox``, until the response to the
one before it is complete)::

    HEAD ──head──► ROUTING ──routed()──► EXCHANGE ──response done──► HEAD ...
      │                  └──refuse()──► local answer ─────────────────┘
      └─ first bytes not HTTP ──► NotHTTP (the shell relays at L4)

* ``HEAD``: client bytes go to a request-head parser
  (:class:`~l4proxy.dataplane._peek_py.HeadParser`; its refusals are the smuggling
  rules for heads). A complete head yields :class:`Route`.
* ``ROUTING``: the shell decides with the table generation current *now*,
  checks out an upstream connection (pooled or new) and calls
  :meth:`Exchange.routed`, or calls :meth:`Exchange.refuse` for a local
  answer (404 for an Ingress miss, 503 ``no healthy upstream``, ...).
* ``EXCHANGE``: the head (rewritten, see below) and the request body go
  upstream, framed by a :class:`~l4proxy.dataplane._framing_py.BodyFramer`; response
  heads come back (1xx interim ones are passed on, then the final one), and
  the response body, framed by its own :class:`BodyFramer`. The exchange is
  over when both messages are complete; then the upstream is released
  (:class:`Release`, reusable or not) and the next request head is read,
  unless the connection must close.
* A 101 to an Upgrade request or a 2xx to CONNECT ends HTTP on this
  connection: :class:`Tunnel` hands both sockets to the L4 relay.

Decisions
---------
* *Hop-by-hop fields* (RFC 9110 §7.6.1). The upstream gets the client's
  head without the fields that are about the client's connection alone
  (:func:`upstream_head`): ``Keep-Alive``, ``Proxy-Connection``, ``TE``
  (unless it says only ``trailers``, as Envoy keeps it), the fields the
  Connection field names (never ``Content-Length``, ``Transfer-Encoding``
  or ``Host``: the proxy framed the body by them), and in HTTP/1.1 (or a
  later 1.x, persistent as 1.1 is) the Connection lines themselves. So a
  ``Connection: close`` client does not cost an upstream handshake per
  request (*upstream reuse*: HAProxy's
  default ``http-server-close`` behaviour towards the client, with reuse
  towards the server). Kept: an HTTP/1.0 request's Connection lines that
  say ``close`` or ``keep-alive`` (its hop to the server persists only if
  asked), and an Upgrade request's Connection lines that name ``upgrade``
  with its ``Upgrade`` field and the fields those lines name (the server
  must see the upgrade asked, and h2c's ``HTTP2-Settings``: RFC 7540
  §3.2.1).
  A final response head loses its hop-by-hop fields on the way to the
  client (:func:`client_head`): ``Keep-Alive``, ``Proxy-Connection``,
  ``Upgrade`` (a server's offer to upgrade its own connection: Apache with
  mod_http2 sends ``Upgrade: h2,h2c`` and ``Connection: Upgrade,
  Keep-Alive`` on every answer), the fields the Connection field names
  (never ``Content-Length``, ``Transfer-Encoding`` or ``Host``) and the
  Connection lines; the relay then says its own ``connection: close`` or
  ``connection: keep-alive`` when the client's hop needs it (see "Client
  persistence is the client's"). A head whose Connection lines say only
  ``close`` / ``keep-alive`` and that has none of the others is not
  rewritten where its word will do: to a client that stays when it
  persists (nginx's ``Connection: keep-alive`` on every answer, the
  relay's own word), to one that does not with ``connection: close``
  added unless it says close. A 101's head (and a 2xx to CONNECT) goes as
  it is: the tunnel is the upgrade; interim heads (100, 103) go as they
  came.
  Nothing else in a head is rewritten (lines are dropped whole, never
  edited, and one line may be added) but what a route's head edits say
  (next) and, on a gateway listener's connection, its forwarding headers
  before them (:meth:`Exchange.forward`, ``forwarding.py``), and bodies
  never are.
* *Expect: 100-continue* (Envoy's default, ``proxy_100_continue``
  false): the relay says its own ``100 Continue`` to an HTTP/1.1 request
  that expects it, its body not all here, as the request goes upstream
  (:meth:`Exchange.continue_due`, the shell's first try); its head goes up
  as it came, and the upstream's 100 to it is dropped: one reaches the
  client. None before a local answer, to HTTP/1.0, to a request with no
  body or its body here, to another expectation.
* *One Content-Length* (RFC 9110 §8.6): a request whose Content-Length
  is said more than once, equal values (on two lines, or a list on one:
  ``5, 5``; the parser refuses differing ones), goes upstream with one
  line, ``Content-Length: 5`` in the first one's place (its name as
  sent), the others dropped, as HAProxy sends it: a server that refuses a
  repeated Content-Length or a list (llhttp, Node's, does), or reads
  ``5, 5`` as another number, would answer or frame otherwise than the
  relay framed it. The compiled
  twin hands such a head to the pure relay (``fast_head()``).
* *Empty lines* before a request line (CRLF or a bare LF: RFC 9112 §2.2
  says a server SHOULD ignore at least one, and the parser skips them)
  are dropped with its head: the head sent upstream, a retry's and a
  mirror's copy start with the request line, as every reader of them
  (:func:`edit_request_head`, ``verdict.shadow_head``) assumes, and as
  Envoy sends it. They count towards the head limit (the parser reads
  them), not as request bytes of the access log (a body's). The compiled
  twin drops them from its buffer as the head completes
  (``drop_empty_lines``).
* *Head edits* (a route's ``HeadEdits``, Envoy's header and
  ``prefix_rewrite`` / ``host_rewrite_literal`` options: the shell sets
  :attr:`Exchange.edits` before :meth:`Exchange.routed`): the head sent
  upstream (as above) loses the lines named in ``request_remove`` or
  among ``request_set``'s names, gets the ``request_set`` then
  ``request_add`` lines before its empty line (:func:`edit_request_head`),
  its target's path rewritten (``path``: origin-form, or an absolute-form
  target's path part; the query kept, an empty path ``/``) and its Host
  lines' values replaced (``authority``; a head without one gets one); a
  retry sends the same edited head. An absolute-form target under request
  edits goes in origin-form, its Host the authority rewritten or else the
  target's (:func:`edited_target`: an origin server reads an absolute-form
  target's authority, not Host). A rewritten path with a dot-segment is
  never sent: the parser's 400 for such a target on input, the connection
  closed (:meth:`Exchange.refused_rewrite`). Edits and a local answer's
  headers that must not be written out (a name that is no token, a value
  with CR, LF or NUL, an authority or prefix with a control, space or
  ``#``) raise ValueError in :func:`edit_bytes` / :func:`header_lines`:
  the relays answer the request as a decision that raised. The final
  response head as :func:`client_head` sends it loses the lines
  ``response_remove`` or ``response_set`` name, and gets the
  ``response_set`` then ``response_add`` lines after the relay's own
  connection line (:func:`edit_response_head`). The relay's own answers
  to a request whose choice was drawn (the 503 or 500 when it has no
  endpoint; the 503s when its connects failed,
  a circuit breaker's, out of fds; the 503 of a connection closed before
  the response, the 502s and the 504 of
  :meth:`Exchange._upstream_failed` and :meth:`Exchange.upstream_timeout`)
  get the same response edits before their empty line
  (:func:`edit_local_answer`; :meth:`Exchange.refuse`'s *edited*);
  interim heads, a tunnel's 101, a fault's abort and the other local
  answers are not edited (a local answer to a HEAD request is its head
  alone: :func:`local_response`'s *head_only*; see ``HeadEdits`` in
  ``verdict.py``). Names
  are compared case-insensitively, added lines are ``name: value`` with
  CRLF; the framing and hop-by-hop fields and Host are never touched
  (:func:`edit_bytes`).
* *Session persistence* (an HTTPRoute rule's ``sessionPersistence``: the
  shell sets :attr:`Exchange.session_line` for each try, from its
  endpoint): the final head the upstream answers gets the session token's
  line last, after the relay's own and the edits' (a header token's own
  lines in the upstream's head left out first: Envoy sets that header);
  the shell sets none where the request's token named that endpoint
  already. Interim heads, a tunnel's head and the relay's own answers get
  none (see ``SessionPersistence`` in ``verdict.py``).
* An upstream connection is reusable only when the request sent on it was
  persistent, both messages ended by their framing (not by a close), the
  response did not say ``Connection: close`` (or was HTTP/1.0 without
  ``keep-alive``), and no byte came after the response.
* *Client persistence is the client's* (HAProxy's and Envoy's rule): the
  client connection stays open when its request was persistent, the
  response is not close-delimited, the request body was read to its end
  when the final response head arrived, and the client has not
  half-closed; whether the *upstream* connection persists does not matter.
  A response head that says ``Connection: close`` (or an HTTP/1.0 one
  without ``keep-alive``) then goes to the client without its hop-by-hop
  fields (its Connection lines, its ``Keep-Alive`` lines: the upstream
  connection is closed, not pooled, their ``timeout`` / ``max`` are not
  the client's; those its Connection field names, whether ``close`` is on
  their line or on another), with ``connection: keep-alive`` added when
  the response or the request is HTTP/1.0 (such a client closes
  otherwise): see :func:`client_head`. The framing headers are never
  rewritten. A client connection that does not stay is told
  ``connection: close`` (added unless the head says it and has nothing
  else to drop). A close-delimited response is framed by the close, so
  the client connection ends with it, whatever was asked.
* *Retry* (Envoy's rule for pooled HTTP/1 connections): if a *reused*
  upstream connection closes before any response byte, the request is sent
  once more on a new connection, when the method is idempotent (RFC 9110
  §9.2.2) and every byte sent so far is still held (at most
  ``replay_limit``), or whatever the method when the connection failed
  before the kernel took a byte of the request (it never left: the shell
  says so, with the bytes it held, to :meth:`Exchange.upstream_eof`).
  Otherwise the client gets Envoy's answer to a connection terminated
  before the response (503, :data:`RESET_BEFORE_HEADERS`), or a close if a
  final response head was already forwarded (interim ones, 100 Continue, do not count: a final
  answer is still due after them). Each try on a pooled connection (the
  first, or a retry policy's: the shell takes one for it too) has this
  retry once, not one of the policy's tries whatever the policy.
* *Retry policy* (Envoy's, a VirtualService's ``http[].retries``: the
  shell sets :attr:`Exchange.retry` before :meth:`Exchange.routed`): a try
  may be given up and the request sent again (:class:`Retry` with
  *policy*), at most ``attempts`` times, only while the whole request is
  held (read to its end, every byte kept: at most ``replay_limit``; with a
  policy every method is held, as Envoy retries any method; a policy
  whose ``on`` is 0, a per-try timeout or a failed connect's retry
  alone, holds nothing: the shell takes one not ``in_effect`` as none)
  and nothing of
  the response went to the client (not even an interim head). The shell
  sends a retry after Envoy's jittered exponential backoff
  (``RetryPolicy.backoff_s``: random, up to 25 ms before the first retry,
  75 ms, 175 ms, then 250 ms for the default base interval), during which
  no per-try timer runs and the route timeout may still answer the 504. A final
  response head whose status the policy names (``5xx``, ``gateway-error``,
  ``retriable-4xx``, the codes) is dropped with its connection, which is
  closed, never pooled; it was an answer (:class:`Release` *answered*, as
  any application status is). A connection closed or reset before the
  final head (the 503 without a policy), or a final head that cannot be
  framed (the 502 without a policy: an upstream protocol error, a reset to
  Envoy), is retried under
  ``5xx``, ``gateway-error`` or ``reset`` (a gateway failure for outlier
  detection, as without a policy); the
  shell's per-try timer (:meth:`Exchange.try_timeout`) is a reset to
  Envoy: retried under the same policies, else the 504; it is ignored
  once a final head went out (Envoy). Each try's runs from the later of
  its connection's readiness (a connect's end, an idle pooled one taken)
  and the request's end, as Envoy's (``onPoolReady``,
  ``onRequestComplete``): never while the try connects (the connect
  timeout bounds that) or waits for a connection.
  The route timeout spans every try and backoff. The reused-connection
  retry above is not one of the policy's tries, and a failed connect moves
  on to the next endpoint with or without a policy, as before. Under a
  policy that retries a failed connect (``RetryPolicy.on_connect``) the
  move is one of its tries, as Envoy's router spends one of its retries
  on it, and none left ends the request as no endpoint left does; the
  shell sends it after its backoff (:attr:`ConnectRetry.POLICY`), as any
  retry of the policy, since Envoy's connect-failure retry waits its
  backoff timer too (``RetryWithBackoff``). Without one it spends none
  and goes at once (:attr:`ConnectRetry.OWN`), as the reused-connection
  retry does. Under such a policy the shell keeps the failed endpoint a
  candidate, last (not dropped, as without one): the try dials an
  endpoint not tried yet first, else the one tried least recently, so one
  endpoint refusing for a moment (a pod restarting) gets 1 + ``attempts``
  connects, as Envoy's: Istio's retry policy's ``previous_hosts``
  predicate (``host_selection_retry_max_attempts: 5``) only makes its
  load balancer pick again, keeping a tried host when none other is left.
  Either way it was a try: the next says one more in its
  x-envoy-attempt-count (:meth:`Exchange.connect_failed`), as Envoy's,
  and runs a per-try timer of its own (the shell's: from its
  connection's readiness), as Envoy's retry is a new upstream request.
  Out of tries, the last
  try's outcome is the client's.
* *Counting*: every request whose head was read is counted once
  (:class:`Done`), however it ends: answered, answered locally, or cut
  short (a reset, a malformed body, a client gone mid-request). A request
  cut short is counted with the status of the final head the client got (a
  200 whose body was cut counts as 200, as Envoy counts it), else 0 (no
  response began: Envoy's ``response_code`` 0). The shell counts the
  requests it drops itself (a client reset, an idle timeout) the same way
  (:attr:`Exchange.sent_status`).
* A response that ends before the request body does (an early 413, say)
  closes both connections after it: the rest of the body is never read.
* *Outlier detection* (``l4proxy/rules/health.py``): :class:`Release` says
  how the endpoint served the request. A complete response, whatever its
  status, is an answer (a tunnel's 101 or 2xx too: the shell reports it). A
  gateway failure: the upstream connection closed or reset before any
  response byte (not retried, or the retry's), or before the response's end,
  or a response that cannot be framed. A request sent once more after a
  reused connection failed, a client's error and a client gone tell nothing.
* *Route timeout* (Envoy's, ``http[].timeout``): the shell times the
  request from its last byte read (:attr:`Exchange.request_complete`: a
  body that came whole with its head, from its routing, its connect
  counted, as Envoy's router buffers it while connecting) and
  calls :meth:`Exchange.upstream_timeout` when the route's timeout passes
  before the response's end: 504 ``upstream request timeout`` (Envoy's
  local reply) when no final head went out, else the client connection is
  reset (the response cut); the upstream connection is closed either way
  (its late answer must not reach the next request) and counts as a gateway
  failure (Envoy reports a timeout to outlier detection as a 504), unless it
  was still connecting.
* Error answers are the proxy's own, ``connection: close``: 400/431/505 for
  a head or body that cannot be framed unambiguously, or whose path has a
  dot-segment (routed by the path as sent, served by a server that removes
  them as another: see "Decisions" in ``_peek_py.py``); 502 for an upstream
  response that cannot, unless it may keep the connection (next).
* A gateway failure's local answer (503 or 502, the route timeout's 504, a
  retry refused: 503 UO or OM) keeps the client connection, as Envoy's
  local replies do, when the request was read whole (its body too: where
  the next request starts is known, and a pipelined one waits unread in
  ``_inbox``), its head asked to persist and the client has not
  half-closed; otherwise it says ``connection: close`` and the connection
  closes (a body half-read would be taken for the next request's head).
  Envoy closes only where the response went before the request's end
  (``downstream_rq_response_before_rq_complete``), as here.
* *Drain* (Envoy's drain close of an HTTP/1 connection: the sidecar was
  told to stop, see ``Worker.drain``): once the shell calls
  :meth:`Exchange.drain`, no answer lets the client persist. The next final
  head says ``connection: close`` (:func:`client_head` with *keep* False,
  an upstream's ``keep-alive`` replaced, to an HTTP/1.0 client too), a
  local answer too, and the connection closes after it (the lingering
  close); a final head that went out before the drain, saying nothing,
  is followed by the close alone. No request is read after it (one
  pipelined behind is dropped unanswered, as after any close). A
  connection between requests, no byte of a next head read, is closed
  at once (:class:`Close`, the lingering close: FIN); a client racing a
  request onto it reads the close before any byte of an answer, which an
  HTTP client retries (an idempotent request; RFC 9112 §9.3.1). A request
  in flight goes on as before: only the connection's end changes. The shell
  chooses when each connection is told (a gradual drain spreads the closes
  of those :attr:`Exchange.between_requests`; :meth:`Exchange.drain_told`
  for the others), and sets ``draining`` alone, and clears it, for Envoy's
  drain close while the health check is failed (``HttpRelay.discourage``:
  the answers say close, nothing closes between requests, and a final head
  that went out before stands, as Envoy asks ``drainClose()`` at a
  response's head).
* Every local answer that keeps an HTTP/1.0 client (one that asked:
  ``Connection: keep-alive``), a gateway failure's as the others
  (:meth:`Exchange.refuse`: a route's own, the 404 of no route, the 503 of
  no endpoint, a fault's abort), says so: ``connection: keep-alive``, as
  an upstream's answer to it is told (:func:`client_head`); an HTTP/1.0
  client told nothing reads the answer to the close.
"""

from __future__ import annotations

import email.utils
import enum
import functools
import re
import time
from typing import Final, NamedTuple

# The head parser and the body framer through their choosers: the compiled
# twins when built (they are the per-byte work), the pure ones otherwise.
from l4proxy.dataplane import accesslog
from l4proxy.dataplane._peek_py import DEFAULT_MAX_HEAD, E_DOT_SEGMENT, ERRORS, has_dot_segment
from l4proxy.dataplane.forwarding import Forwarding, forwarded_head
from l4proxy.dataplane.framing import (
    BodyFramer,
    Framing,
    FramingError,
    ResponseHead,
    bodiless_head,
    crlf_head,
    head_may_end,
    parse_response_head,
    request_framing,
    response_framing,
)
from l4proxy.dataplane.peek import HeadError, HeadParser, NotHTTP, RequestHead
from l4proxy.dataplane.verdict import SESSION_COOKIE, HeadEdits, RetryPolicy, SessionPersistence

__all__ = [
    "Client",
    "Close",
    "Done",
    "EditBytes",
    "Exchange",
    "NotHTTPConnection",
    "Phase",
    "Release",
    "Retry",
    "Route",
    "SessionLine",
    "Shadow",
    "Tunnel",
    "Upstream",
    "check_edits",
    "check_header",
    "client_head",
    "edit_bytes",
    "edit_local_answer",
    "edit_request_head",
    "edit_response_head",
    "header_lines",
    "local_response",
    "response_hop_by_hop",
    "session_line",
    "upstream_head",
]

DEFAULT_REPLAY_LIMIT: Final = 65536
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# The standard reason phrases (RFC 9110 §15 and the registry's others), as
# Envoy sends them with its local replies; "Unknown" for a status without one.
REASONS: Final = {
    100: "Continue",
    101: "Switching Protocols",
    102: "Processing",
    103: "Early Hints",
    200: "OK",
    201: "Created",
    202: "Accepted",
    203: "Non-Authoritative Information",
    204: "No Content",
    205: "Reset Content",
    206: "Partial Content",
    207: "Multi-Status",
    208: "Already Reported",
    226: "IM Used",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    304: "Not Modified",
    305: "Use Proxy",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    409: "Conflict",
    410: "Gone",
    411: "Length Required",
    412: "Precondition Failed",
    413: "Content Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    416: "Range Not Satisfiable",
    417: "Expectation Failed",
    421: "Misdirected Request",
    422: "Unprocessable Content",
    423: "Locked",
    424: "Failed Dependency",
    425: "Too Early",
    426: "Upgrade Required",
    428: "Precondition Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    451: "Unavailable For Legal Reasons",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
    506: "Variant Also Negotiates",
    507: "Insufficient Storage",
    508: "Loop Detected",
    510: "Not Extended",
    511: "Network Authentication Required",
}


class Phase(enum.IntEnum):
    HEAD = 0  # reading a request head
    ROUTING = 1  # head complete, waiting for routed() or refuse()
    EXCHANGE = 2  # request going up, response coming down
    TUNNEL = 3  # handed to the L4 relay
    CLOSED = 4


# -- actions, for the shell to perform in order -------------------------------


class Route(NamedTuple):
    """Decide where *head* goes; then call routed() or refuse()."""

    head: RequestHead


class Upstream(NamedTuple):
    """Send *data* to the upstream connection."""

    data: bytes


class Client(NamedTuple):
    """Send *data* to the client."""

    data: bytes


class Release(NamedTuple):
    """The upstream connection is done with: back to its pool, or closed.

    And how its endpoint served the request, for outlier detection (see
    "Outlier detection" above): *answered*, a complete response (or a
    try's final head the retry policy retries), its final *status*;
    *failure*, why the response failed (a gateway failure); neither,
    nothing to tell.
    """

    reusable: bool
    answered: bool = False
    failure: str = ""
    status: int = 0  # the answer's final status (answered)


class Retry(NamedTuple):
    """Open a new upstream connection (to another endpoint when there is
    one: the shell's choice); call routed(False). *policy*: one of the
    route's retry policy's tries (see "Retry policy"), not the reused
    connection's retry: the shell waits its backoff first
    (``RetryPolicy.backoff_s`` of :attr:`Exchange.tries`). Either way its
    per-try timer starts again once its connection is ready."""

    policy: bool = False


class Shadow(NamedTuple):
    """The current request was read whole and sent upstream (its first
    try's bytes), or given up before its copies went (see
    ``Exchange._given_up``): copies of it go to its mirrors now (see
    ``verdict.Mirror``), once the primary's bytes went. *data*: the head as
    sent upstream and the body bytes exactly as sent; None when they went
    past the replay limit or were not all read (the copies are dropped).
    Only asked for with :attr:`Exchange.mirror` set."""

    data: bytes | None
    head_length: int = 0  # data[:head_length] is the head as sent


class Done(NamedTuple):
    """A response was delivered (for the per-version metrics), or the
    request ended without one; for its access log line (see
    ``l4proxy/dataplane/accesslog.py``): *flags*, its response flags and
    the log's other bits (why the proxy answered or gave up, the retry
    policy's tries used up: URX); *received*, the request body's bytes
    read."""

    status: int
    local: bool  # answered by the proxy itself
    flags: int = 0
    received: int = 0


class Tunnel(NamedTuple):
    """HTTP is over: relay both sockets at L4 (after sending what is queued)."""


class NotHTTPConnection(NamedTuple):
    """The connection's first bytes are not HTTP/1.x: relay *data* at L4."""

    data: bytes


class Close(NamedTuple):
    """Close the client connection (after sending what is queued).

    *quiet*: the client cannot send more (it closed its side, or asked to
    close and every byte it sent was read, RFC 9112 9.6), so no lingering read
    is needed before the close.

    *reset*: close at once with a reset, dropping what is queued: a response
    cut short by the route's timeout, which a clean close would pass off as
    the end of a close-delimited body."""

    quiet: bool = False
    reset: bool = False


Action = (
    Route | Upstream | Client | Release | Retry | Shadow | Done | Tunnel | NotHTTPConnection | Close
)


_DATE: tuple[int, str] = (0, "")  # http_date()'s second and its text


# The relay's own interim answer to ``Expect: 100-continue`` (Exchange.continue_due).
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


def http_date() -> str:
    """The current second as an IMF-fixdate (RFC 9110 §5.6.7: ``Sun, 06
    Nov 1994 08:49:37 GMT``, always 29 characters), made once a second,
    as Envoy's date provider does; the compiled relay's date_stamp() is
    its twin."""
    global _DATE
    now = int(time.time())
    cached = _DATE
    if cached[0] != now:
        cached = _DATE = (now, email.utils.formatdate(now, usegmt=True))
    return cached[1]


def local_response(
    status: int,
    body: str,
    close: bool = True,
    headers: str = "",
    head_only: bool = False,
    http10: bool = False,
    date: str | None = None,
) -> bytes:
    """The proxy's own answer, saying whether the connection closes after it;
    *headers*: more header lines, each ending in CRLF (the circuit breakers'
    ``x-envoy-overloaded: true``, a redirect's ``location``); a
    ``content-type`` among them replaces the default ``text/plain`` (a
    direct response's own, as Envoy lets a route's response headers set it),
    and an answer with an empty *body* (a redirect's) has none unless they
    give one (Envoy's local reply sets its ``text/plain`` only on a body).

    A status that has no body (1xx, 204, 304: RFC 9110 §6.4.1) gets none
    whatever *body* says, and no content-length for 1xx and 204 (§8.6);
    304's and the others' tell the length of *body*, as a GET would get it.
    *head_only*: the answer to a HEAD request (§9.3.2): the same head, no
    body. *http10*: the request was HTTP/1.0: an answer that keeps the
    connection says ``connection: keep-alive`` where a closing one says
    ``connection: close`` (RFC 9112 §9.3: such a client persists only when
    told; a client told nothing reads to the close, ab -k waits).

    Every answer says ``date:`` (*date*, else :func:`http_date`), before
    ``server:``, as Envoy's local replies do (its HTTP connection manager
    dates every response). The compiled relay builds its answers once and
    writes the current second over that line's value as it sends one
    (date_stamp()): the line's place and length are what it finds."""
    data = b"" if status < 200 or status in (204, 304) else body.encode()
    typed = headers[:13].lower() == "content-type:" or "\ncontent-type:" in headers.lower()
    length = "" if status < 200 or status == 204 else f"content-length: {len(body.encode())}\r\n"
    own = "connection: close\r\n" if close else "connection: keep-alive\r\n" if http10 else ""
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n"
        + length
        + ("" if typed or not body else "content-type: text/plain\r\n")
        + headers
        + own
        + f"date: {date or http_date()}\r\n"
        + "server: l4proxy\r\n\r\n"
    ).encode()
    return head if head_only else head + data


# A circuit breaker's answer (EndpointSettings' max_active, max_connections
# with max_pending): Envoy's local reply for a request its pool overflowed.
OVERFLOW_BODY: Final = (
    "upstream connect error or disconnect/reset before headers. reset reason: overflow"
)
OVERFLOW_HEADERS: Final = "x-envoy-overloaded: true\r\n"
# The upstream closed or reset its connection before any byte of the
# response: Envoy's local reply to an upstream reset for connection
# termination (503, response flag UC: the router's onUpstreamReset()), and
# the same once a retry policy's try went (the router's is_retry_). A
# close and a reset read the same to it, and to the relay: the connection's
# end. (A response head cut short, or one it cannot parse, is a protocol
# error to Envoy: 502.)
RESET_BEFORE_HEADERS: Final = (
    "upstream connect error or disconnect/reset before headers. "
    "reset reason: connection termination"
)
RESET_BEFORE_HEADERS_RETRIED: Final = (
    "upstream connect error or disconnect/reset before headers. "
    "retried and the latest reset reason: connection termination"
)


def upstream_head(raw: bytes, head: RequestHead) -> bytes:
    """*raw* (the head's bytes) as sent upstream: see "Hop-by-hop fields"
    and "One Content-Length".

    *raw* itself (the same object) when nothing is dropped."""
    lines = raw.split(b"\n")
    lengths = [v for n, v in head.headers if n == "content-length"]
    # (equal values: the parser refused any other)
    merging = len(lengths) > 1 or (len(lengths) == 1 and "," in lengths[0])
    merged = False
    upgrading = head.header("upgrade") is not None
    field: set[bytes] = set()
    upgrade: set[bytes] = set()  # what the Connection lines sent up name: kept
    for line in lines[1:]:
        tokens = _connection_tokens(line)
        if tokens is None:
            continue
        if upgrading and b"upgrade" in tokens:
            upgrade |= tokens  # the upgrade's own fields (HTTP2-Settings)
        else:
            field |= tokens
    named = field - upgrade - _CLOSE_OR_KEEP - _NEVER_DROPPED
    kept = [lines[0]]
    for line in lines[1:]:
        if merging and _field_name(line) == b"content-length":
            if not merged:  # the first line says the one length, the others go
                name = line.partition(b":")[0]
                kept.append(b"%s: %d\r" % (name, head.content_length or 0))
                merged = True
            continue
        if _sent_up(line, head, named, upgrading):
            kept.append(line)
    return b"\n".join(kept) if len(kept) < len(lines) or merging else raw


def _sent_up(line: bytes, head: RequestHead, named: set[bytes], upgrading: bool) -> bool:
    """Whether a request head's *line* goes upstream (see upstream_head())."""
    name = _field_name(line)
    if name == ATTEMPT_COUNT:  # (the relay says its own: with_attempt_count())
        return False
    if name is None or (name not in named and name not in _HOP_BY_HOP):
        return True
    if name == b"te":
        return _value(line).lower() == b"trailers"  # (trailers are read: Envoy keeps it)
    if name != b"connection":
        return False
    tokens = _connection_tokens(line) or set()  # (a Connection line: never None)
    if upgrading and b"upgrade" in tokens:
        return True
    # HTTP/1.0: its hop persists only if asked (a line naming only
    # fields that go, goes)
    return head.version == "HTTP/1.0" and not tokens <= named


# x-envoy-attempt-count: Istio's virtual hosts have Envoy's
# include_request_attempt_count, so its router tells the upstream which try
# each request is (1, a retry 2, ...), replacing any the client sent. The
# head as sent gets the first try's line before its empty line, after the
# client's lines (theirs dropped: _sent_up()) and a gateway's forwarding
# headers (forward()), as Envoy's router adds it after the lines its
# connection manager added; a route's head edits apply after it, as
# Envoy's router sets it before the route's header mutations. A retry
# policy's try, and a try whose connect failed (Envoy's router counts it:
# its connect-failure retry), rewrite it in the replay, or in the head when
# the first try was still connecting (attempt_counted(), _policy_retry(),
# connect_failed()); the relay's own retry of a reused
# connection is no try: its count stays.
ATTEMPT_COUNT: Final = b"x-envoy-attempt-count"
_FIRST_TRY: Final = ATTEMPT_COUNT + b": 1\r\n"


def with_attempt_count(head: bytes) -> bytes:
    """*head* (as sent upstream, its lines but the client's
    x-envoy-attempt-count) with the first try's line before its empty line
    (its CR LF: the parser refuses a bare LF): the compiled twin's
    stage_attempt()."""
    return head[:-2] + _FIRST_TRY + head[-2:]


def attempt_counted(data: bytes | bytearray, n: int) -> bytes:
    """*data* (a head as sent, then its body's bytes) saying
    x-envoy-attempt-count: *n*: its head's first such line's value replaced
    (OWS around it dropped), or the line added before the empty line where a
    route's edits removed it, as Envoy's router sets it again for each retry; the
    compiled twin's attempt_count()."""
    data = bytes(data)
    s = data.find(b"\n") + 1
    if s == 0:
        return data
    while s < len(data):
        e = data.find(b"\n", s)
        if e < 0:
            return data
        line = data[s:e]
        if line in (b"", b"\r"):  # the empty line: none
            return data[:s] + ATTEMPT_COUNT + b": %d\r\n" % n + data[s:]
        name, colon, _ = line.partition(b":")
        if colon and name.lower() == ATTEMPT_COUNT:
            vs = s + len(name) + 1
            ve = e - 1 if data[e - 1 : e] == b"\r" else e
            while vs < ve and data[vs] in b" \t":
                vs += 1
            while ve > vs and data[ve - 1] in b" \t":
                ve -= 1
            return data[:vs] + b"%d" % n + data[ve:]
        s = e + 1
    return data


# Request fields for this connection alone (RFC 9110 §7.6.1), dropped on the
# way up: those the Connection field names go too.
_HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te"))
# ... but never these, whatever Connection names: the body's framing and the
# authority (the proxy framed the body by them; dropping one would let the
# server frame it otherwise).
_NEVER_DROPPED = frozenset((b"content-length", b"transfer-encoding", b"host"))


def _field_name(line: bytes) -> bytes | None:
    """A header line's name, lower case (None for the empty line)."""
    name, colon, _ = line.partition(b":")
    return name.lower() if colon else None


def _value(line: bytes) -> bytes:
    return line.partition(b":")[2].strip(b" \t\r")


def _connection_tokens(line: bytes) -> set[bytes] | None:
    """A header line's tokens, lower case, when it is a Connection line
    (split at its ":" and around commas, CR included); else None."""
    name, colon, value = line.partition(b":")
    if not colon or name.lower() != b"connection":
        return None
    return {t.strip(b" \t\r").lower() for t in value.split(b",")}


def _asks_close(sent: bytes) -> bool:
    """Whether a Connection line of *sent* (a head as upstream_head() left
    it) still has ``close`` among its tokens: an Upgrade request's line that
    names ``upgrade`` (``upgrade, close``) is sent as it is, and the server
    closes after it (an HTTP/1.0 request's lines are not read here: its
    hop persists only when it asked, ``head.keep_alive``)."""
    return any(b"close" in (_connection_tokens(line) or ()) for line in sent.split(b"\n")[1:])


def response_hop_by_hop(raw: bytes) -> bool:
    """Whether the response head *raw* has a hop-by-hop line that no client
    may get (see "Hop-by-hop fields"): a ``Keep-Alive``,
    ``Proxy-Connection`` or ``Upgrade`` line, or a Connection line with a
    token other than ``close`` and ``keep-alive`` (it names a field, or
    ``upgrade``). A head without one (its Connection lines, if any, of
    ``close`` and ``keep-alive`` alone) may go as it is."""
    for line in raw.split(b"\n")[1:]:
        tokens = _connection_tokens(line)
        if tokens is None:
            if _field_name(line) in _RESPONSE_HOP_BY_HOP:
                return True
        elif not tokens <= _CLOSE_OR_KEEP:
            return True
    return False


def client_head(
    raw: bytes, resp: ResponseHead, keep: bool = False, request_http10: bool = False
) -> bytes:
    """*raw* (a final response head, not a tunnel's) as sent to the client,
    whose connection persists after it when *keep* (see "Client persistence
    is the client's" and "Hop-by-hop fields").

    A head with no hop-by-hop line to drop (:func:`response_hop_by_hop`)
    goes as it is to a client that stays when it persists (to an HTTP/1.0
    client with ``connection: keep-alive`` added unless it says keep-alive:
    an HTTP/1.1 server need not say it), and to a client
    that does not with ``connection: close`` added unless it says close or
    keep-alive (the client may have asked for the close, but the upstream did not see
    that request, so its answer may not say it; a client that does not read
    our close from the answer sends its next request into a closing socket:
    wrk does. HAProxy adds the header too).

    Any other head is rewritten, as is one whose Connection says keep-alive
    to a client that does not stay (nginx's: the client would read both
    ``keep-alive`` and our ``close``): its Connection lines, its ``Keep-Alive``,
    ``Proxy-Connection`` and ``Upgrade`` lines and the fields its Connection
    field (its lines together, as RFC 9110 §5.3 combines them) names go
    (never ``Content-Length``, ``Transfer-Encoding`` or ``Host``), and the
    relay says its own: ``connection: close`` to a client that does not
    stay, ``connection: keep-alive`` to one that does when the response or
    the request is HTTP/1.0 (a client persists after an HTTP/1.0 response,
    or as an HTTP/1.0 client, only when told), nothing else (HTTP/1.1
    persists). Lines are dropped whole, never edited; the line added goes
    before the empty line that ends the head.
    """
    if not response_hop_by_hop(raw):
        if keep and _persistent(resp):
            said = {t.lower() for t in resp.values("connection")} if request_http10 else ()
            if request_http10 and "keep-alive" not in said:
                return _with_line(raw, b"connection: keep-alive\r\n")
            return raw
        if not keep:
            tokens = {t.lower() for t in resp.values("connection")}
            if "close" in tokens:
                return raw
            if "keep-alive" not in tokens:  # (else its line goes: not beside our close)
                return _with_line(raw, b"connection: close\r\n")
    lines = raw.split(b"\n")
    field: set[bytes] = set()
    for line in lines[1:]:
        field |= _connection_tokens(line) or set()
    dropped = (field - _CLOSE_OR_KEEP - _NEVER_DROPPED) | _RESPONSE_HOP_BY_HOP
    out = b"\n".join([lines[0], *(x for x in lines[1:] if _field_name(x) not in dropped)])
    if not keep:
        return _with_line(out, b"connection: close\r\n")
    if resp.version == "HTTP/1.0" or request_http10:
        return _with_line(out, b"connection: keep-alive\r\n")
    return out


def _with_line(raw: bytes, line: bytes) -> bytes:
    """*raw* (a head) with *line* added before the empty line that ends it
    (its CR LF: a response head with a bare LF was written out again with
    CRLF, crlf_head())."""
    return raw[:-2] + line + raw[-2:]


# Response fields for the upstream's connection alone (RFC 9110 §7.6.1),
# dropped on the way to the client (a 101 is a tunnel's: it goes as it
# is), with the fields the Connection field names.
_RESPONSE_HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"upgrade"))
# Connection tokens that are about the connection alone ("" an empty one).
_CLOSE_OR_KEEP = frozenset((b"close", b"keep-alive", b""))


def _persistent(resp: ResponseHead) -> bool:
    tokens = {t.lower() for t in resp.values("connection")}
    if "close" in tokens:
        return False
    return resp.version != "HTTP/1.0" or "keep-alive" in tokens


def header_lines(headers: tuple[tuple[str, str], ...]) -> str:
    """*headers* (name, value pairs) as header lines, each ending in CRLF
    (a local answer's ``local_headers``, for local_response()). ValueError
    for a name that is no token or a value with CR, LF or NUL (see
    check_header()): never written out."""
    for name, value in headers:
        check_header(name, value)
    return "".join(f"{name}: {value}\r\n" for name, value in headers)


# What the relays write out of a route's edits and local headers, checked
# once per distinct edits (edit_bytes()) or verdict (header_lines()), whatever
# the table checked (a line break would split a head: request smuggling,
# response splitting): a name an RFC 9110 token, a value without CR, LF or
# NUL (Envoy's rule), a path prefix or authority without controls, spaces
# or "#" (they would end or cut the target, or the Host line's value).
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NOT_IN_VALUE: Final = re.compile(r"[\r\n\x00]")
_NOT_IN_TARGET: Final = re.compile(r"[\x00-\x20#\x7f]")


def check_name(name: object) -> None:
    """ValueError unless *name* is a header field name (a str token)."""
    if not isinstance(name, str) or _TOKEN.fullmatch(name) is None:
        raise ValueError(f"header name {name!r} is not a token (RFC 9110 5.1)")


def check_header(name: object, value: object) -> None:
    """ValueError unless *name* and *value* can go in a head as a line of
    their own (check_name(); a str value without CR, LF or NUL)."""
    check_name(name)
    if not isinstance(value, str) or _NOT_IN_VALUE.search(value) is not None:
        raise ValueError(f"header {name!r}: value {value!r} is no str without CR, LF or NUL")


def _check_target_part(what: str, text: object) -> None:
    if not isinstance(text, str) or _NOT_IN_TARGET.search(text) is not None:
        raise ValueError(f"{what} {text!r} is no str without controls, spaces or '#'")


def check_edits(edits: HeadEdits) -> None:
    """ValueError, saying which, for *edits* the relays must not write out
    (see check_header(); a path prefix or authority with a control, a
    space or "#", a strip that is no int)."""
    for name, value in (
        *edits.request_set,
        *edits.request_add,
        *edits.response_set,
        *edits.response_add,
    ):
        check_header(name, value)
    for name in (*edits.request_remove, *edits.response_remove):
        check_name(name)
    if edits.path is not None:
        if not isinstance(edits.path.strip, int):
            raise ValueError(f"path rewrite's strip {edits.path.strip!r} is no int")
        _check_target_part("path rewrite's prefix", edits.path.prefix)
    if edits.authority is not None:
        _check_target_part("authority", edits.authority)


class EditBytes(NamedTuple):
    """A :class:`~l4proxy.dataplane.verdict.HeadEdits` as both twins apply
    it (see "Head edits"): the lowercase names whose lines go, the lines
    added (``*_set``'s then ``*_add``'s, each ending in CRLF), the path
    rewrite's ``strip`` and prefix (``strip`` None: none), the authority
    (None: none). Values are UTF-8."""

    request_drop: frozenset[bytes]
    request_lines: bytes
    response_drop: frozenset[bytes]
    response_lines: bytes
    strip: int | None
    prefix: bytes
    authority: bytes | None

    @property
    def request(self) -> bool:
        """Whether a request head changes."""
        return bool(
            self.request_drop
            or self.request_lines
            or self.strip is not None
            or self.authority is not None
        )

    @property
    def response(self) -> bool:
        """Whether a final response head changes."""
        return bool(self.response_drop or self.response_lines)


# What an edit never touches, whatever the table said (it checks them): the
# fields that frame a message or are hop-by-hop, and Host (``authority``).
_NEVER_EDITED = frozenset(
    (
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"upgrade",
        b"trailer",
        b"expect",
        b"host",
    )
)


def _edit_name(name: str) -> bytes:
    return name.lower().encode()


def _edit_lines(headers: tuple[tuple[str, str], ...]) -> bytes:
    return b"".join(
        b"%s: %s\r\n" % (_edit_name(n), v.encode())
        for n, v in headers
        if _edit_name(n) not in _NEVER_EDITED
    )


@functools.lru_cache(maxsize=1024)
def edit_bytes(edits: HeadEdits) -> EditBytes:
    """*edits* as :class:`EditBytes` (computed once per distinct edits);
    ValueError for edits that must not be written out (check_edits())."""
    check_edits(edits)

    def drop(remove: tuple[str, ...], set_: tuple[tuple[str, str], ...]) -> frozenset[bytes]:
        names = {_edit_name(n) for n in remove} | {_edit_name(n) for n, _ in set_}
        return frozenset(names - _NEVER_EDITED)

    path = edits.path
    return EditBytes(
        drop(edits.request_remove, edits.request_set),
        _edit_lines(edits.request_set) + _edit_lines(edits.request_add),
        drop(edits.response_remove, edits.response_set),
        _edit_lines(edits.response_set) + _edit_lines(edits.response_add),
        None if path is None else max(-1, int(path.strip)),
        b"" if path is None else path.prefix.encode(),
        None if edits.authority is None else edits.authority.encode(),
    )


def _path_start(target: bytes) -> int:
    """Where *target*'s path begins: 0 for origin-form, after its authority
    for absolute-form (its length when it has neither path nor query); -1
    for any other form (``*``, CONNECT's authority)."""
    if target.startswith(b"/"):
        return 0
    scheme = target.find(b"://")
    if scheme < 0:
        return -1
    start = len(target)
    for sep in b"/?":
        i = target.find(bytes((sep,)), scheme + 3)
        if 0 <= i < start:
            start = i
    return start


def rewrite_target(target: bytes, strip: int, prefix: bytes) -> bytes:
    """*target* with its path rewritten (``PathRewrite``): an origin-form
    target's, or an absolute-form one's path part (after its authority);
    any other form (``*``, CONNECT's authority) is left as it is."""
    start = _path_start(target)
    if start < 0:
        return target
    query = target.find(b"?", start)
    end = len(target) if query < 0 else query
    n = end - start
    cut = n if strip < 0 or strip > n else strip
    path = prefix + target[start + cut : end]
    return target[:start] + (path or b"/") + target[end:]


def _edited_lines(raw: bytes, drop: frozenset[bytes], lines: bytes, host: bytes | None) -> bytes:
    """*raw* (a head) without its header lines named in *drop*, its Host
    lines' values *host* (None: as they are; a head without one gets one,
    first of the lines added), with *lines* before the empty line that ends
    it (its CR LF: a request head with a bare LF is refused, a response
    head's is written out again with CRLF);
    its first line as it is."""
    first = raw.index(b"\n") + 1
    end = len(raw) - 2
    out = [raw[:first]]
    hosts = 0
    for line in raw[first:end].split(b"\n")[:-1]:
        name, colon, _ = line.partition(b":")
        name = name.lower()
        if colon and name in drop:
            continue
        if colon and host is not None and name == b"host":
            out.append(line[: len(name) + 1] + b" " + host + b"\r\n")
            hosts += 1
        else:
            out.append(line + b"\n")
    if host is not None and not hosts:  # (an HTTP/1.0 request may have none)
        out.append(b"host: " + host + b"\r\n")
    out += [lines, raw[end:]]
    return b"".join(out)


def edited_target(target: bytes, e: EditBytes) -> tuple[bytes, bytes | None]:
    """*target* (a request's) as sent upstream under the request edits *e*,
    and the Host line's value then (None: as it is): its path rewritten
    (rewrite_target()); an absolute-form one in origin-form, its authority
    the Host's unless *e* rewrites it (Envoy forwards origin-form, its
    :authority the target's: an origin server reads an absolute-form
    target's authority, not Host, RFC 9112 3.2.2)."""
    if e.strip is not None:
        target = rewrite_target(target, e.strip, e.prefix)
    start = _path_start(target)
    if start <= 0:
        return target, e.authority
    authority = target[target.index(b"://") + 3 : start]
    path = target[start:]
    return (path if path.startswith(b"/") else b"/" + path), (
        authority if e.authority is None else e.authority
    )


# The parser's answer to a target with a dot-segment (see "Decisions" in
# _peek_py.py): a path rewrite that makes one is answered so (both twins).
DOT_SEGMENT_REASON: Final = ERRORS[E_DOT_SEGMENT][2]


def rewrite_refused(target: bytes, edits: HeadEdits) -> bool:
    """Whether *edits* rewrite the path of *target* (a request's) into one
    with a dot-segment (``/api../x`` with prefix ``/api`` made ``/``:
    ``/../x``): the parser refuses such a target on input, so it never goes
    upstream either (answered 400 DOT_SEGMENT_REASON, the connection
    closed). ValueError for edits that must not be written out."""
    e = edit_bytes(edits)
    if e.strip is None:
        return False
    path = edited_target(target, e)[0]
    return path.startswith(b"/") and has_dot_segment(path)


def _target_span(raw: bytes) -> tuple[int, int] | None:
    """Where the target of the head *raw*'s first line is (``raw[ts:te]``,
    between its first two SPs); None when that line has no two SPs (a
    request line always has them)."""
    first = raw.find(b"\n")
    ts = raw.find(b" ", 0, first) + 1 if first >= 0 else 0
    te = raw.find(b" ", ts, first) if ts else -1
    return None if te < 0 else (ts, te)


def edit_request_head(raw: bytes, edits: HeadEdits) -> bytes:
    """*raw* (a request head as upstream_head() sends it) with *edits*
    applied (see "Head edits"); *raw* itself when nothing changes.
    ValueError when its first line is no request line (never where
    :meth:`Exchange.refused_rewrite` let it go)."""
    e = edit_bytes(edits)
    if not e.request:
        return raw
    span = _target_span(raw)
    if span is None:
        raise ValueError("the head's first line is not a request line")
    ts, te = span
    target, host = edited_target(raw[ts:te], e)
    raw = raw[:ts] + target + raw[te:]
    return _edited_lines(raw, e.request_drop, e.request_lines, host)


def edit_response_head(raw: bytes, edits: HeadEdits) -> bytes:
    """*raw* (a final response head as client_head() sends it) with the
    response's *edits* applied (see "Head edits")."""
    e = edit_bytes(edits)
    if not e.response:
        return raw
    return _edited_lines(raw, e.response_drop, e.response_lines, None)


class SessionLine(NamedTuple):
    """A session token's line for a final response head (see *Session
    persistence*): ``line`` (``name: value`` and CRLF) goes last before its
    empty line, after the relay's own and its edits' lines; ``drop``: the
    lowercase name whose lines of the upstream's head go first (a header
    token's, which Envoy sets; b"" for a cookie's, which is added)."""

    drop: bytes
    line: bytes


def session_line(session: SessionPersistence, endpoint: tuple[str, int]) -> SessionLine:
    """The :class:`SessionLine` that gives *endpoint*'s token
    (``SessionPersistence.line``); its value is ASCII (the table checked
    the name and the cookie's path)."""
    name, value = session.line(endpoint)
    check_header(name, value)
    drop = b"" if session.kind == SESSION_COOKIE else name.encode()
    return SessionLine(drop, f"{name}: {value}\r\n".encode())


def edit_local_answer(answer: bytes, edits: HeadEdits | None) -> bytes:
    """*answer* (local_response()'s bytes, a HEAD request's head alone too)
    with the response's *edits* applied to its head (see "Head edits"): the
    relay's own answer to a request whose choice was drawn. Its framing
    lines stay: no edit names them."""
    if edits is None:
        return answer
    e = edit_bytes(edits)
    if not e.response:
        return answer
    end = answer.index(b"\r\n\r\n") + 4
    return _edited_lines(answer[:end], e.response_drop, e.response_lines, None) + answer[end:]


class ConnectRetry(enum.Enum):
    """What a failed connect with an endpoint left comes to
    (:meth:`Exchange.connect_failed`)."""

    OWN = "own"  # the next endpoint, the relay's own retry (no policy retries it)
    POLICY = "policy"  # the next endpoint, one of the policy's tries (a retry)
    SPENT = "spent"  # none: the policy's tries are spent


class Exchange:
    """The per-request proxy state of one client connection (sans-IO).

    Feed it with :meth:`client_data`, :meth:`upstream_data`,
    :meth:`client_eof` and :meth:`upstream_eof`; answer a :class:`Route`
    with :meth:`routed` or :meth:`refuse`. Each returns the actions to
    perform, in order. Read the client only while :attr:`wants_client_data`.
    """

    def __init__(
        self,
        max_head: int = DEFAULT_MAX_HEAD,
        replay_limit: int = DEFAULT_REPLAY_LIMIT,
        counters: dict[str, int] | None = None,
    ) -> None:
        self.phase = Phase.HEAD
        self.max_head = max_head
        self.replay_limit = replay_limit
        # the relay's counters (response_head_rescan_bytes); None: none kept
        self._counters = counters
        self.requests = 0  # request heads completed on this connection
        self.head: RequestHead | None = None
        self._parser = HeadParser(max_head)
        self._inbox = bytearray()  # client bytes after the current message
        self._client_eof = False
        # a head refused (HeadError): its first line, for the access log
        self.refused_line: bytes | None = None
        self.draining = False  # drain(): no answer keeps the connection (see "Drain")
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self._request: BodyFramer | None = None
        self._sent_head = b""
        self._sent_persistent = False  # the request as sent upstream keeps the connection
        self._replay: bytearray | None = None  # bytes sent upstream, while held
        self._reused = False
        self._retried = False
        self._retrying = False  # between Retry() and routed(): hold client bytes
        self.retry: RetryPolicy | None = None  # the route's (set by the shell)
        self.edits: HeadEdits | None = None  # the route's choice's (set by the shell)
        # the session token's line for the final head from upstream (set by
        # the shell per try, for its endpoint: session_line()); None: none
        self.session_line: SessionLine | None = None
        # the request's bytes as sent upstream, kept for its mirrors' copies
        # (the shell sets an empty one before routed(), and clears it for a
        # fault's abort; None: none wanted, or past the replay limit) until
        # Shadow hands them over
        self.mirror: bytearray | None = None
        self._mirroring = False  # ... a Shadow is still due for this request
        self._tries = 0  # the retry policy's retries so far (a failed connect's under on_connect)
        self._failed_connects = 0  # tries whose connect failed, moved on from, no policy's
        self._forwarded = False  # an interim response head went to the client
        self._continued = False  # the relay said 100 Continue itself (continue_due)
        self._response_head = bytearray()  # response bytes before the final head
        # ... its first bytes that hold no end of a head (_response_head_bytes)
        self._response_clean = 0
        self._response: BodyFramer | None = None
        self._response_persistent = False
        self._keeps_client = False  # the final head as sent lets the client persist
        self._upstream_bytes = 0  # response bytes received for this request
        self._received = 0  # request body bytes read (the access log's)
        self.status = 0

    # -- what the shell asks ------------------------------------------------

    @property
    def head_pending(self) -> bool:
        """Bytes of the next request head are here already (a pipelined
        segment's rest): its header timeout runs from now."""
        return self.phase == Phase.HEAD and bool(self._inbox or self._parser.buffered)

    @property
    def between_requests(self) -> bool:
        """No request under way, no byte of a next head here and the client
        not gone: what :meth:`drain` closes at once (see "Drain")."""
        return self.phase == Phase.HEAD and not self.head_pending and not self._client_eof

    @property
    def sent_status(self) -> int:
        """The status of the final response head the client got for the
        current request; 0 when none went out (Envoy's response code for a
        request reset before its response: the client saw no status)."""
        return self.status if self._response is not None else 0

    @property
    def received(self) -> int:
        """The current request's body bytes read so far (its access log's)."""
        return self._received

    @property
    def tries(self) -> int:
        """The retry policy's retries of the current request so far (the
        *n* of its latest :class:`Retry`, whose backoff the shell waits),
        the moves on from a failed connect it spent among them
        (:meth:`connect_failed`)."""
        return self._tries

    @property
    def request_complete(self) -> bool:
        """The current request was read whole (in ROUTING: its head, with
        no body, or with its body all in the bytes read with it,
        :meth:`_body_here`): its route timeout runs from now, as Envoy's
        from the request's end (its router buffers a body while the
        connection is made)."""
        if self.phase == Phase.EXCHANGE:
            return self._request is not None and self._request.done
        if self.phase == Phase.ROUTING and self.head is not None:
            return self._body_here()[0]
        return False

    def _body_here(self) -> tuple[bool, int]:
        """In ROUTING, before a try took the request: whether its body is
        all here already, in the bytes read with its head (a request
        without one: True), and how many of them it is (a chunked body's
        last chunk and trailers framed; one that cannot be framed is not
        here: its 400 comes at the send). Nothing is taken. The compiled
        twin's body_here()."""
        assert self.head is not None
        kind, length = request_framing(self.head)
        if kind == Framing.NONE:
            return True, 0
        framer = BodyFramer(kind, length, error_status=400, max_trailers=self.max_head)
        try:
            used = framer.feed(self._inbox)
        except FramingError:
            return False, 0
        return framer.done, used

    def continue_due(self) -> bool:
        """In ROUTING, as the request goes upstream (the shell's first try,
        after a fault's delay): whether the relay says ``100 Continue`` to
        it now (then it does: :data:`CONTINUE_100`), as Envoy's connection
        manager answers ``Expect: 100-continue`` itself (its default,
        ``proxy_100_continue`` false): an HTTP/1.1 head with one Expect
        line, ``100-continue`` (case-insensitive), whose body is not all
        here (:meth:`_body_here`; none, or ``Content-Length: 0``: no 100,
        RFC 9110 §10.1.1 lets a server omit it). The client sends its body
        while the connection is made, not after its own wait (curl's 1 s)
        or the upstream's 100, which is dropped (the head goes up as it
        came): the client gets one. An HTTP/1.0 client gets none (RFC 9110
        §15.2), nor a request answered locally (a route's answer, a fault's
        abort: its body unsent, the connection closed after the answer).
        The compiled twin's body_here_read()."""
        head = self.head
        if (
            head is None
            or not head.expect_continue  # (HTTP/1.1 and later: RequestHead's)
            or self._continued
            or self.phase != Phase.ROUTING
            or sum(1 for name, _ in head.headers if name == "expect") != 1
            or self._body_here()[0]
        ):
            return False
        self._continued = True
        return True

    @property
    def wants_client_data(self) -> bool:
        """Whether the shell should read the client now (backpressure)."""
        if self.phase == Phase.HEAD:
            return not self._client_eof
        if self.phase == Phase.EXCHANGE:
            # not while a retry reconnects: what arrives then must follow the
            # replayed head and body, not go ahead of them
            return self._request is not None and not self._request.done and not self._retrying
        return False

    # -- events -------------------------------------------------------------

    def drain(self) -> list[Action]:
        """The sidecar drains (see "Drain"): from now on every answer says
        ``connection: close`` and the connection closes after it. Between
        requests (no byte of a next head here, the client not gone) it
        closes now: :class:`Close`, the lingering close; else nothing to do
        yet."""
        self.drain_told()
        if self.between_requests:
            return self._close()
        return []

    def drain_told(self) -> None:
        """The drain names this connection (the shell chooses when, and
        closes it between requests: :meth:`drain`): every answer from now
        says ``connection: close``, and a final head that went out already
        saying nothing is followed by the close alone. ``draining`` set
        alone (``HttpRelay.discourage``) is read at each answer's head
        only: a head that went out stands, as Envoy asks ``drainClose()``
        at a response's head."""
        self.draining = True
        self._keeps_client = False  # (a head not out yet: made again, saying close)

    def client_data(self, data: bytes) -> list[Action]:
        if self.phase in (Phase.CLOSED, Phase.TUNNEL):
            return []
        self._inbox += data
        return self._advance()

    def client_eof(self) -> list[Action]:
        self._client_eof = True
        if self.phase == Phase.HEAD:
            return self._close()  # between requests, or a head cut short
        if self.phase == Phase.EXCHANGE and self._request is not None and not self._request.done:
            # a request body cut short: counted (Envoy's response code 0, DC)
            return [
                Release(False),
                self._done(self.sent_status, False, accesslog.CUT),
                *self._close(),
            ]
        return []  # half-closed after its request: answer, then close

    def routed(self, reused: bool) -> list[Action]:
        """An upstream connection is ready (*reused*: it came from the pool)."""
        if self.phase != Phase.EXCHANGE and self.phase != Phase.ROUTING:
            raise RuntimeError(f"routed() in phase {self.phase.name}")
        self._reused = reused
        if self.phase == Phase.EXCHANGE:  # a retry: send again all we held, then the rest
            assert self._replay is not None
            if reused:  # a policy's try on a pooled connection: its own one retry
                self._retried = False
            self._retrying = False
            return [Upstream(bytes(self._replay)), *self._advance()]
        assert self.head is not None
        kind, length = request_framing(self.head)
        self._request = BodyFramer(kind, length, error_status=400, max_trailers=self.max_head)
        self.phase = Phase.EXCHANGE
        # (a policy that never retries, its per-try timeout only, holds nothing)
        held = self._retryable_method() or (self.retry is not None and bool(self.retry.on))
        if self.edits is not None:  # (a retry sends the same: from the replay)
            self._sent_head = self._edited(self._sent_head)
        self._replay = bytearray(self._sent_head) if held else None
        if self.mirror is not None:
            self._mirroring = True
            self.mirror += self._sent_head
            if len(self.mirror) > self.replay_limit:  # (a head edited past it)
                self.mirror = None
        out: list[Action] = [Upstream(self._sent_head), *self._advance()]
        if self._mirroring and self._request.done:  # (a request without a body)
            out.insert(1, self._shadow())
        return out

    def forward(
        self, fwd: Forwarding, peer: bytes | None, request_id: bytes
    ) -> tuple[bytes | None, bytes | None]:
        """A gateway listener's forwarding headers (``forwarding.py``) on
        the current request's head as sent upstream, *peer* the client's
        address, *request_id* its x-request-id: the shell's, in ROUTING,
        before the route's head edits (a retry and a copy send the same).
        The X-Forwarded-For value it then says (None: none), for the access
        log, and the trusted client address taken from the X-Forwarded-For
        that came (None: *peer* is it), for a hash on the source IP."""
        # the first try's count (with_attempt_count()) goes after the
        # forwarding headers, as Envoy's router sets it after its
        # connection manager's lines: taken off, then added again
        head = self._sent_head
        end = len(head) - 2  # (its empty line's CR LF)
        assert head[end - len(_FIRST_TRY) : end] == _FIRST_TRY  # (_advance()'s)
        head = head[: end - len(_FIRST_TRY)] + head[end:]
        head, sent, trusted = forwarded_head(head, fwd, peer, request_id)
        self._sent_head = with_attempt_count(head)
        return sent, trusted

    def refused_rewrite(self) -> list[Action] | None:
        """When the route's edits (:attr:`edits`, set by the shell) rewrite
        the current request's path into one with a dot-segment (see
        rewrite_refused()): the parser's 400 answer, the connection closed;
        else None (ValueError for edits that must not be written out). A
        head whose first line has no target between two SPs is answered
        so too (never: the head sent starts with its request line, see
        "Empty lines"; the compiled twin's edit_request() the same)."""
        if self.edits is None:
            return None
        raw = self._sent_head
        span = _target_span(raw)
        if span is not None and not rewrite_refused(raw[span[0] : span[1]], self.edits):
            return None
        return self.refuse(400, DOT_SEGMENT_REASON, close=True, flags=accesslog.PATH_REFUSED)

    def refuse(
        self,
        status: int,
        body: str,
        headers: str = "",
        whole: bool = False,
        close: bool = False,
        edited: bool = False,
        flags: int = 0,
    ) -> list[Action]:
        """Answer the current request locally (no upstream); *headers*: more
        header lines for the answer (local_response's). A request body
        closes the connection after the answer (``connection: close``, the
        lingering close: Envoy's response before the request is complete),
        except with *whole* when all of it is here already: then it is
        read (the access log's BYTES_RECEIVED), dropped, and the connection
        stays as the head asks (an answer before any try: a fault's abort,
        see ``Fault``, a route's own answer, a choice's with no endpoint,
        the 503 of a first try whose every connect failed; Envoy keeps the
        connection of a local reply to a request it read whole). *close*:
        the connection closes after the answer whatever the head asked (a
        head refused as the parser would, see edits_refused()). *edited*:
        the relay's own answer to a request whose choice was drawn (no
        endpoint, none answered, a circuit breaker, out of fds), which gets
        :attr:`edits`' response edits. A HEAD request gets the answer's head
        alone; an HTTP/1.0 client whose connection stays is told
        ``connection: keep-alive`` (local_response()'s *http10*). *flags*:
        why, for the access log (``accesslog``'s bits: UH, UF, UO,
        FI...)."""
        if self.phase != Phase.ROUTING:
            raise RuntimeError(f"refuse() in phase {self.phase.name}")
        assert self.head is not None
        kind, length = request_framing(self.head)
        bodyless = kind == Framing.NONE
        complete, used = bodyless, 0
        if whole and not bodyless:
            framer = BodyFramer(kind, length, error_status=400, max_trailers=self.max_head)
            try:
                used = framer.feed(self._inbox)
                complete = framer.done
                self._received += used
            except FramingError:  # (not framed: a close, as one not complete)
                complete = False
        keep = (
            self.head.keep_alive
            and complete
            and not self._client_eof
            and not close
            and not self.draining
        )
        answer = local_response(
            status, body, not keep, headers, self._head_only(), self.head.version == "HTTP/1.0"
        )
        if edited:
            answer = edit_local_answer(answer, self.edits)
        out: list[Action] = [
            *self._given_up(),  # (mirrors drawn, no try took it: see _given_up)
            Client(answer),
            self._done(status, True, flags),
        ]
        if not keep:  # a body we would have to read first, or a client that leaves
            return out + self._close(self._done_talking(not complete))
        del self._inbox[:used]
        return out + self._next_request()

    def upstream_data(self, data: bytes) -> list[Action]:
        if self.phase != Phase.EXCHANGE:
            return []
        self._upstream_bytes += len(data)
        if self.retry is None or self._response is not None:
            # a response began: never send this request again (under a
            # retry policy, its final head may still say to: kept till then)
            self._replay = None
        try:
            if self._response is None:
                return self._response_head_bytes(data)
            return self._response_body_bytes(data)
        except FramingError as exc:
            return self._upstream_failed(exc.status, exc.reason, gateway=True)

    def upstream_eof(
        self, unsent: bytes | None = None, connect_failed: bool = False
    ) -> list[Action]:
        """The upstream connection ended. *unsent*: it failed before the
        kernel took any byte of this request, and these are all the bytes
        sent upstream for it so far (held, unsent): the request never left,
        so it may be sent again whatever its method (a retry's rules else).
        *connect_failed*: there was no connection, a retry's connect
        failed: 503 no healthy upstream, UF (Envoy's for a connect that
        failed), not the 503 and UC of a connection that closed."""
        if self.phase != Phase.EXCHANGE:
            return []
        never_left = (
            unsent is not None and self._upstream_bytes == 0 and len(unsent) <= self.replay_limit
        )
        if never_left and self._replay is None:
            self._replay = bytearray(unsent or b"")
        before = "upstream closed the connection before a response"
        if self._upstream_bytes == 0:
            if (
                self._reused
                and not self._retried
                and self._replay is not None
                and len(self._replay) <= self.replay_limit
                and (never_left or self._retryable_method())  # (not for a policy's hold)
            ):
                self._retried = True
                self._retrying = True
                return [Release(False), Retry()]
            if self.retry is not None and self.retry.on_reset and self._can_retry():
                return self._policy_retry(before)
            if connect_failed:  # (as Envoy, and as a first attempt's every connect failing)
                return self._upstream_failed(
                    503, "no healthy upstream", gateway=True, flags=accesslog.UF
                )
            # Envoy's answer (UC), saying so once a policy's retry went
            body = RESET_BEFORE_HEADERS_RETRIED if self._tries else RESET_BEFORE_HEADERS
            return self._upstream_failed(503, before, gateway=True, body=body)
        if (
            self._response is None
            and self.retry is not None
            and self.retry.on_reset
            and self._can_retry()
        ):  # closed within the response head: a reset before the response, to Envoy
            return self._policy_retry("upstream closed the connection mid-response")
        if self._response is not None and self._response.framing == Framing.CLOSE:
            # the request body still arriving: the client is still sending,
            # so the close lingers (as the compiled twin's complete() does)
            cut = self._request is not None and not self._request.done
            return self._response_complete(upstream_closed=True, request_cut=cut)
        # a head or a length-delimited/chunked body cut short
        return self._upstream_failed(
            502, "upstream closed the connection mid-response", gateway=True
        )

    def retry_refused(self, status: int, body: str, headers: str, flags: int) -> list[Action]:
        """A retry (the reused connection's own, or the policy's) was refused
        before it reached an upstream: a circuit breaker's overflow (UO), no
        fd for its connection (OM). The request is lost: answered as
        :meth:`refuse` answers a first try so refused (*status*, *body*,
        *headers*, the response edits), the client connection kept as after
        a gateway failure's answer, the line saying *flags*' why (not the
        503 and UC of a connection that closed: none was open). Never
        retried, as a first try so refused is not (Envoy's router never
        retries an overflow)."""
        if self.phase != Phase.EXCHANGE:
            return []
        return self._upstream_failed(status, body, gateway=True, flags=flags, headers=headers)

    def upstream_timeout(self) -> list[Action]:
        """The route's timeout passed before the response's end (see "Route
        timeout"); the upstream connection, connecting or not, is dropped.
        Its UT has no URX (accesslog.ROUTE_TIMEOUT: _done()), whether a
        retry waits its backoff or the last try runs: Envoy's
        onResponseTimeout() asks no retry state."""
        return self._timed_out(accesslog.UT | accesslog.ROUTE_TIMEOUT)

    def _timed_out(self, flags: int) -> list[Action]:
        """The 504 of the route timeout, or of a per-try timeout not retried
        (*flags* UT: URX where the policy's tries are spent, _done())."""
        if self.phase not in (Phase.ROUTING, Phase.EXCHANGE):
            return []
        reason = "upstream request timeout"
        if self.phase == Phase.ROUTING:  # still connecting: no endpoint to blame
            # (its request has no body, or its body came whole with its
            # head: the timeout runs from its end, request_complete; that
            # body is read and dropped, the connection kept as after a
            # request without one, as Envoy's local reply to a request read
            # whole; one with a body unread is closed, never read as the
            # next head)
            assert self.head is not None
            self.status = 504
            whole, used = self._body_here()
            keep = whole and self._keeps_after_local_answer()
            if whole:
                self._received += used
                del self._inbox[:used]
            answer = local_response(
                504, reason, not keep, head_only=self._head_only(), http10=self._http10()
            )
            return [
                *self._given_up(),
                Release(False),
                Client(edit_local_answer(answer, self.edits)),
                self._done(504, True, flags),
                *(self._next_request() if keep else self._close()),
            ]
        if self._response is None:
            return self._upstream_failed(504, reason, gateway=True, flags=flags)
        # (the status the client got, as for a body cut short)
        self.phase = Phase.CLOSED
        self._inbox.clear()
        return [
            Release(False, failure=reason),
            self._done(self.status, False, flags),
            Close(reset=True),
        ]

    def try_timeout(self) -> list[Action]:
        """The retry policy's per-try timeout passed (the shell times each
        try from the later of its connection's readiness and the request's
        end, as Envoy's: never while it connects or waits for a
        connection): the try is given up and the request sent
        again when the policy has a try left and the request is held, else
        as the route timeout (504). Ignored once a final response head went
        out, as Envoy ignores it once the response began. The try is
        routed (:meth:`routed`: phase EXCHANGE, not between a Retry and
        its connection): the shell starts no try's timer sooner, and stops
        it at each Retry."""
        if self.phase != Phase.EXCHANGE or self._response is not None:
            return []
        # a timed-out try is a reset to Envoy: retried only under the
        # policies that retry one (on_reset: 5xx, gateway-error, reset)
        if self.retry is not None and self.retry.on_reset and self._can_retry():
            return self._policy_retry("upstream request timeout")
        return self._timed_out(accesslog.UT)

    def connect_failed(self) -> ConnectRetry:
        """A try's connect failed (a first try's, a policy's retry's or the
        reused connection's one retry's) and the request has an endpoint
        left: may the shell move on to it? That was a try, as Envoy's router
        counts one whose connect failed (its connect-failure retry: the next
        try's x-envoy-attempt-count says one more), so the head about to go
        says the next try's count (the compiled twin's
        connect_failed_next()). Under a policy that retries a failed connect
        (``RetryPolicy.on_connect``) the move is one of its tries
        (:attr:`tries`; :attr:`ConnectRetry.POLICY`, which the shell counts
        as a retry), as Envoy's shouldRetryReset() spends one of its
        num_retries on it, and none is left once they are spent
        (:attr:`ConnectRetry.SPENT`: the shell answers as when no endpoint
        is left, nothing counted); without one, the relay's own
        (:attr:`ConnectRetry.OWN`), spending nothing."""
        p = self.retry
        if p is not None and p.on_connect:
            if self._tries >= p.attempts:
                return ConnectRetry.SPENT
            self._tries += 1
            step = ConnectRetry.POLICY
        else:
            self._failed_connects += 1
            step = ConnectRetry.OWN
        if self.phase == Phase.ROUTING:  # the first try: its head not sent yet
            self._sent_head = attempt_counted(self._sent_head, self._attempt())
        elif self.phase == Phase.EXCHANGE and self._replay is not None:  # a retry's
            self._replay[:] = attempt_counted(self._replay, self._attempt())
        return step

    # -- internals ------------------------------------------------------------

    def _attempt(self) -> int:
        """Which try of the current request goes next, as its
        x-envoy-attempt-count says: 1, then one more for each try before
        it, a policy's retry (a failed connect's, under a policy that
        retries one, among them) or a connect that failed (the reused
        connection's one retry is none: it says the count of the try it
        repeats)."""
        return self._tries + self._failed_connects + 1

    def _can_retry(self) -> bool:
        """The retry policy has a try left and the request is held whole
        for it, nothing of the response having reached the client; a try
        is on (not a retry's connect that failed: its end goes to the
        client)."""
        return (
            self.retry is not None
            and not self._retrying
            and self._tries < self.retry.attempts
            and self._request is not None
            and self._request.done
            and self._replay is not None
            and len(self._replay) <= self.replay_limit
            and not self._forwarded
        )

    def _policy_retry(self, failure: str, answered: bool = False, status: int = 0) -> list[Action]:
        """Give this try up (its connection is closed, never pooled) and send
        the request again: see "Retry policy". *answered*: the try's final
        head, of *status*, is one the policy retries."""
        self._tries += 1
        self._retrying = True
        if self._replay is not None:  # (the retry says which try it is)
            self._replay[:] = attempt_counted(self._replay, self._attempt())
        # the reused connection's own retry is for the try on the pooled
        # connection: not for this retry's connects failing (_reused is the
        # given-up try's until routed(), which clears it for a try on a
        # pooled connection), as reuse_retry_done() in the compiled twin
        self._retried = True
        self._response_head.clear()
        self._upstream_bytes = 0
        self.status = 0
        return [
            Release(False, answered=answered, failure=failure, status=status),
            Retry(policy=True),
        ]

    def _shadow(self) -> Shadow:
        """The request's bytes for its mirrors (once per request)."""
        self._mirroring = False
        data, self.mirror = self.mirror, None
        if data is None or self._response is not None or self._response_head:
            # (a final answer began before the request's end: no copy; an
            # interim one, 100 Continue, is none)
            return Shadow(None)
        return Shadow(bytes(data), len(self._sent_head))

    def _given_up(self) -> list[Action]:
        """The request ends before its copies went (see ``verdict.Mirror``):
        answered here after its mirrors were drawn (its connects failed, a
        circuit breaker, no fd, the route timeout before a connection), or
        its primary failed or answered before its end. A copy goes whatever
        the primary did (Envoy's shadow): a request without a body that no
        try took goes from its head as it would have been sent; one not
        read whole is not held (Shadow(None): its copies dropped). No
        copies due (none drawn, or they went): none."""
        if self._mirroring:  # a try took its head: the request not read whole
            self._mirroring = False
            self.mirror = None
            return [Shadow(None)]
        if self.mirror is None or self.phase != Phase.ROUTING:
            return []
        self.mirror = None
        assert self.head is not None
        if request_framing(self.head)[0] != Framing.NONE:
            return [Shadow(None)]
        head = self._sent_head
        if self.edits is not None:  # (as routed() would have sent it)
            head = self._edited(head)
        if len(head) > self.replay_limit:
            return [Shadow(None)]
        return [Shadow(head, len(head))]

    def _edited(self, head: bytes) -> bytes:
        """*head* with the route's request edits (:attr:`edits`), then the
        count of the try it goes as where retries passed or connects failed
        while the first try waited for its connection (try_timeout(),
        connect_failed()): Envoy's router sets
        a retry's x-envoy-attempt-count on the head the route's mutations
        made, as _policy_retry() rewrites it in the replay (the compiled
        twin's c.rhead, staged with the edits, is rewritten so)."""
        assert self.edits is not None
        head = edit_request_head(head, self.edits)
        n = self._attempt()
        return attempt_counted(head, n) if n > 1 else head

    def _retryable_method(self) -> bool:
        return self.head is not None and self.head.method in IDEMPOTENT

    def _advance(self) -> list[Action]:
        out: list[Action] = []
        if self.phase == Phase.HEAD and self._inbox:
            data = bytes(self._inbox)
            self._inbox.clear()
            try:
                head = self._parser.feed(data)
            except NotHTTP as exc:
                if self.requests == 0:
                    self.phase = Phase.TUNNEL
                    return [NotHTTPConnection(self._parser.buffered)]
                self._refused_line()
                return self._local_error(exc.status, exc.reason)
            except HeadError as exc:
                self._refused_line()
                te = accesslog.TE_REFUSED if exc.details == accesslog.INVALID_TE else 0
                return self._local_error(exc.status, exc.reason, te)
            if head is None:
                return out
            self.requests += 1
            self.head = head
            raw = self._parser.buffered
            self._inbox += raw[head.head_length :]
            raw_head = raw[: head.head_length].lstrip(b"\r\n")  # (see "Empty lines")
            self._sent_head = with_attempt_count(upstream_head(raw_head, head))
            self._sent_persistent = head.keep_alive or (
                head.version != "HTTP/1.0" and not _asks_close(self._sent_head)
            )
            self.phase = Phase.ROUTING
            return [Route(head)]
        if self.phase == Phase.EXCHANGE and self._request is not None and self._inbox:
            if self._request.done or self._retrying:
                return out  # pipelined bytes, or a reconnect: they wait
            try:
                used = self._request.feed(self._inbox)
            except FramingError as exc:
                # the body bytes framed before the refused one go first, as
                # they would have in a read of their own; then the 400
                if exc.used:
                    out.append(Upstream(bytes(self._inbox[: exc.used])))
                self._received += exc.used
                return out + self._upstream_failed(exc.status, exc.reason)
            self._received += used
            if used:
                chunk = bytes(self._inbox[:used])
                del self._inbox[:used]
                out.append(Upstream(chunk))
                if self._replay is not None:
                    self._replay += chunk
                    if len(self._replay) > self.replay_limit:
                        self._replay = None
                if self.mirror is not None:
                    self.mirror += chunk
                    if len(self.mirror) > self.replay_limit:
                        self.mirror = None
                if self._mirroring and self._request.done:
                    out.append(self._shadow())
            if self._request.done and self._response is not None and self._response.done:
                out += self._response_complete(upstream_closed=False)
        return out

    def _response_head_bytes(self, data: bytes) -> list[Action]:
        assert self.head is not None
        buf = self._response_head
        old = len(buf)
        buf += data
        # a head trickled in: parsed again only once its end may be here
        # (head_may_end: looked for from where the last look stopped)
        parse, self._response_clean, looked = head_may_end(
            buf, old, self._response_clean, self.max_head
        )
        if self._counters is not None:
            self._counters["response_head_rescan_bytes"] += looked
        if not parse:
            return []
        out: list[Action] = []
        while True:
            try:
                resp = parse_response_head(self._response_head, self.max_head)
                if resp is None:
                    return out
                kind, length = response_framing(self.head, resp)
            except FramingError as exc:  # interim heads already out: they stay
                if self.retry is not None and self.retry.on_reset and self._can_retry():
                    # a protocol error is a reset to Envoy: retried as one
                    return out + self._policy_retry(exc.reason)
                return out + self._upstream_failed(exc.status, exc.reason, gateway=True)
            raw = bytes(self._response_head[: resp.head_length])
            rest = bytes(self._response_head[resp.head_length :])
            self._response_head.clear()
            if resp.bare_lf:  # (a legacy server's: sent on with CRLF, see _framing_py)
                raw = crlf_head(raw)
            if kind == Framing.TUNNEL:
                self.status = resp.status
                self.phase = Phase.TUNNEL
                out += [Client(raw + rest)]
                if self._inbox:  # bytes after the request head: the new protocol's
                    out.append(Upstream(bytes(self._inbox)))
                    self._inbox.clear()
                return [*out, self._done(resp.status, False), Tunnel()]
            if 100 <= resp.status < 200:  # interim (100 Continue, 103): another head follows
                # (none to an HTTP/1.0 client: RFC 9110 §15.2; nor a 100 where
                # the relay said its own: continue_due)
                if not self._http10() and not (self._continued and resp.status == 100):
                    out.append(Client(raw))
                    self._forwarded = True
                    self._replay = None  # (a try after it would answer twice)
                self._response_head += rest
                continue
            if self.retry is not None and self.retry.on_status(resp.status) and self._can_retry():
                return out + self._policy_retry("", answered=True, status=resp.status)
            self._replay = None  # the final head goes out: never sent again
            self._response_persistent = _persistent(resp)
            keep = self._client_persists(kind)
            if resp.status == 204 or resp.status == 304:  # (see _framing_py's Decisions)
                raw = bodiless_head(raw, resp.status)
            raw = client_head(raw, resp, keep, self.head.version == "HTTP/1.0")
            if self.edits is not None:
                raw = edit_response_head(raw, self.edits)
            if self.session_line is not None and self.session_line.drop:
                # (after the edits: Envoy's header session state sets its
                # header after the route's response headers, replacing theirs)
                raw = _edited_lines(raw, frozenset((self.session_line.drop,)), b"", None)
            if self.session_line is not None:
                raw = _with_line(raw, self.session_line.line)
            self._keeps_client = keep
            out.append(Client(raw))
            self.status = resp.status
            self._response = BodyFramer(kind, length, error_status=502, max_trailers=self.max_head)
            if rest:
                out += self._response_body_bytes(rest)
            elif self._response.done:
                out += self._maybe_complete()
            return out

    def _response_body_bytes(self, data: bytes) -> list[Action]:
        assert self._response is not None
        out: list[Action] = []
        try:
            used = self._response.feed(data)
        except FramingError as exc:
            # The head went out (nothing to answer: a cut): the body bytes
            # framed before the refused one go first, as they would have in
            # a read of their own, so the client gets the same bytes however
            # the server's were split. No retry: the head reached the client.
            if exc.used:
                out.append(Client(data[: exc.used]))
            return out + self._upstream_failed(exc.status, exc.reason, gateway=True)
        if used:
            out.append(Client(data[:used]))
        if used < len(data):  # bytes after a complete response: the server is confused
            self._response_persistent = False
        if self._response.done:
            out += self._maybe_complete()
        return out

    def _maybe_complete(self) -> list[Action]:
        assert self._request is not None
        if self._request.done:
            return self._response_complete(upstream_closed=False)
        # The response ended before the request body did: close both after it.
        return self._response_complete(upstream_closed=False, request_cut=True)

    def _client_persists(self, kind: Framing) -> bool:
        """Whether the client connection may stay open after a final
        response head framed as *kind* (so far): the upstream's persistence
        aside (see "Client persistence is the client's"); never while the
        sidecar drains (see "Drain")."""
        assert self.head is not None and self._request is not None
        return (
            self.head.keep_alive
            and kind != Framing.CLOSE
            and self._request.done
            and not self._client_eof
            and not self.draining
        )

    def _response_complete(self, upstream_closed: bool, request_cut: bool = False) -> list[Action]:
        assert self.head is not None and self._response is not None
        close_delimited = self._response.framing == Framing.CLOSE
        reusable = (
            not upstream_closed
            and not request_cut
            and not close_delimited
            and self._response_persistent
            and self._sent_persistent
        )
        out: list[Action] = [
            *(self._given_up() if request_cut else ()),
            self._done(self.status, False),
            Release(reusable, answered=True, status=self.status),
        ]
        # as its head told the client (_client_persists), unless the request
        # was cut, the client left or the drain began since (drain_told)
        keep_client = self._keeps_client and not request_cut and not self._client_eof
        if not keep_client:
            return out + self._close(self._done_talking(request_cut))
        return out + self._next_request()

    def _next_request(self) -> list[Action]:
        self.phase = Phase.HEAD
        self._parser = HeadParser(self.max_head)
        self._reset_exchange()
        return self._advance()  # a pipelined request may be waiting

    def _upstream_failed(
        self,
        status: int,
        reason: str,
        gateway: bool = False,
        flags: int = 0,
        headers: str = "",
        body: str | None = None,
    ) -> list[Action]:
        """Give up on this exchange: the upstream closes; answer if we still can
        (no final head went out: after interim ones, 100 Continue, a final
        answer is still due). Counted either way: with the status the client
        got when a final head went out (a body cut short is counted as its
        200, as Envoy counts it), else with the local answer's. *gateway*:
        the upstream's failure, not the client's (a request body that cannot
        be framed): outlier detection hears of it, and the answer gets the
        response edits (see "Head edits"). *flags*: the access log's why
        where *reason* does not tell it (UF: a retry's connect failed; UO,
        OM: a retry refused, retry_refused()); *headers*: the answer's own
        header lines (local_response's); *body*: the answer's body where it
        is not *reason*, which outlier detection hears (Envoy's words for a
        connection closed before the response, RESET_BEFORE_HEADERS)."""
        if not flags:  # (else the caller's)
            if not gateway:
                flags = accesslog.DPE  # (a request body the client framed wrong)
            elif reason == "upstream request timeout":
                flags = accesslog.UT
            elif reason.startswith("upstream closed"):
                flags = accesslog.UC
            else:  # a response the upstream framed wrong
                flags = accesslog.UPE
        out: list[Action] = [
            *self._given_up(),
            Release(False, failure=reason if gateway else ""),
        ]
        if self._response is None:
            self.status = status
            keep = (
                gateway
                and self._request is not None
                and self._request.done
                and self._keeps_after_local_answer()
            )
            answer = local_response(
                status,
                reason if body is None else body,
                not keep,
                headers,
                self._head_only(),
                self._http10(),
            )
            if gateway:
                answer = edit_local_answer(answer, self.edits)
            out += [Client(answer), self._done(status, True, flags)]
            if keep:  # see "A gateway failure's local answer"
                return out + self._next_request()
        else:
            out.append(self._done(self.status, False, flags | accesslog.CUT))
        return out + self._close()

    def _head_only(self) -> bool:
        """A local answer to the current request is its head alone: a HEAD
        request's (RFC 9110 §9.3.2)."""
        return self.head is not None and self.head.method == "HEAD"

    def _keeps_after_local_answer(self) -> bool:
        """After a gateway failure's local answer to a request read whole:
        the client connection stays when its head asked for it (an HTTP/1.0
        one that said ``Connection: keep-alive``, told ``connection:
        keep-alive``, as :meth:`refuse` tells it), has not half-closed, and
        the sidecar does not drain (see "Drain")."""
        assert self.head is not None
        return self.head.keep_alive and not self._client_eof and not self.draining

    def _http10(self) -> bool:
        """The current request is HTTP/1.0: a local answer that keeps its
        connection says so (local_response()'s *http10*)."""
        return self.head is not None and self.head.version == "HTTP/1.0"

    def _local_error(self, status: int, reason: str, flags: int = 0) -> list[Action]:
        """Answer a head the parser refused (*flags*: the access log's
        bits beside DPE) and close."""
        self.status = status
        return [
            Client(local_response(status, reason)),
            Done(status, True, accesslog.DPE | flags),
            *self._close(),
        ]

    def _refused_line(self) -> None:
        """The first line of a head the parser refused, for its access log
        line (its method, target and version, as far as they read): after
        the empty lines it skipped (see "Empty lines")."""
        raw = self._parser.buffered.lstrip(b"\r\n")[: accesslog.LINE_MAX]
        self.refused_line = raw.split(b"\n", 1)[0].rstrip(b"\r")

    def _done(self, status: int, local: bool, flags: int = 0) -> Done:
        """The request's Done, with its bytes read and, when its retry
        policy's tries are used up on an outcome the policy retries (a
        status it names, a failure it retries on), URX (Envoy's
        UpstreamRetryLimitExceeded; the compiled twin's row_flags()); so
        too where every connect of its last try failed (UF) under a policy
        that retries a failed connect: the relay's own retries of those
        (the next endpoint) were used up (RetryPolicy.on_connect). Never
        for the route timeout's UT (accesslog.ROUTE_TIMEOUT, dropped here):
        Envoy's onResponseTimeout() sets UT alone, its URX coming only from
        a retry its retry state refused (shouldRetry*: no retries left)."""
        p = self.retry
        route_timeout = flags & accesslog.ROUTE_TIMEOUT
        flags &= ~accesslog.ROUTE_TIMEOUT
        if p is not None and p.attempts > 0 and not route_timeout:
            if flags & accesslog.UF and p.on_connect:
                flags |= accesslog.URX
            elif self._tries >= p.attempts:
                failure = flags & accesslog.RETRIED_FAILURES
                answered = not (failure or local or flags & accesslog.CUT)
                if (failure and p.on_reset) or (answered and p.on_status(status)):
                    flags |= accesslog.URX
        return Done(status, local, flags, self._received)

    def _done_talking(self, request_cut: bool) -> bool:
        """After an exchange: the client has nothing more to send."""
        assert self.head is not None
        return self._client_eof or (
            not self.head.keep_alive and not request_cut and not self._inbox
        )

    def _close(self, quiet: bool = False) -> list[Action]:
        self.phase = Phase.CLOSED
        self._inbox.clear()
        return [Close(quiet or self._client_eof)]

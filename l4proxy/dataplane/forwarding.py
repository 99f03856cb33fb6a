"""The headers a gateway listener's requests get on their way upstream:
X-Forwarded-For, X-Forwarded-Proto, x-envoy-external-address, x-request-id.

Theory of operation
===================
An Istio ingress gateway is Envoy with an HTTP connection manager of
``use_remote_address: true`` and ``xff_num_trusted_hops`` set from
``gatewayTopology.numTrustedProxies`` (0 unless set); Envoy Gateway's is
the same. Before it routes, that connection manager rewrites every request
head (``ConnectionManagerUtility::mutateRequestHeaders``), and applications
behind it read the client's address in X-Forwarded-For and correlate logs
and traces by ``x-request-id`` (Istio's default access log prints it). A
connection accepted on an ``l4proxy run --listen`` listener (its origin is
a gateway's: ``Origin.gateway``) gets the same, both relay twins alike, with
``--trusted-proxies N`` (:class:`Forwarding`) for Envoy's hops; a sidecar's
transparent traffic gets nothing of it (Istio's sidecars run with
``use_remote_address: false``: no address appended).

What the head as sent upstream (its hop-by-hop lines dropped, see
``_exchange_py.py``) becomes (:func:`forwarded_head`):

* **X-Forwarded-For**: the client's lines go and one line takes their
  place: their values that are not empty, joined by ``,`` (Envoy's HTTP/1
  codec joins a header's lines so), then the client connection's own
  address, ``,``-separated as Envoy's ``appendXff`` appends it. The address
  of an IPv4 client on an IPv6 listener is its IPv4 text. A peer without
  an IP address (a socketpair) appends nothing, as Envoy's does not.
* **X-Forwarded-Proto**: ``http``: the gateway never terminates TLS. With
  0 trusted hops the client's lines go first (Envoy overwrites what an
  untrusted hop says); with N > 0 a client's lines stay as they are and
  ``http`` is added only where it sent none: a TLS-terminating proxy in
  front says ``https`` and is believed.
* **x-envoy-external-address**: the *trusted client address*: with 0 hops
  the client connection's address; with N, the Nth address from the right
  of the X-Forwarded-For that came (before the append) where that is an IP
  address (:func:`trusted_address`, Envoy's ``getLastAddressFromXFF``),
  else the connection's. The client's lines go. It is also the address a
  DestinationRule's ``consistentHash: {useSourceIp: true}`` hashes
  (:func:`packed_ip` of it; the relays' hash on the source IP): Envoy's
  connection manager makes it the request's downstream remote address,
  which its hash policy reads, so that with a load balancer in front each
  client, not the balancer, keeps its pod.
* **x-request-id**: a new uuid4 for every request, whatever the client
  sent (its lines go). Every request at such a gateway is an *edge
  request* to Envoy: since Envoy made ``internal_address_config`` explicit
  (``explicit_internal_address_config``, its default now) no address is
  internal unless configured, Istio configures none at a gateway, and it
  leaves ``preserve_external_request_id`` false. A retry sends the same id,
  and so does a mirrored copy (Envoy's shadow carries its primary's).
* **Removed**, as from Envoy's external requests: :data:`EDGE_REMOVED`
  (``x-envoy-internal``, the retry and timeout controls a client could
  otherwise hand to the Envoys behind the gateway, ...), and
  ``x-forwarded-client-cert`` (Istio's gateway sanitizes it where the
  client presented no certificate: every connection here).

The lines added go in that order before the head's empty line, after the
client's; a route's head edits apply after them (Envoy's router edits the
headers its connection manager mutated), so a route may still set or
remove one. Routing reads the head as the client sent it: a route's header
match, and Istio's ``httpsRedirect`` exemption for ``X-Forwarded-Proto:
https`` (``l4proxy/rules/_istio_gateway.py``), see the client's lines;
Envoy routes on the mutated head. The access log's X-Forwarded-For and
X-Request-ID of such a request are the values sent upstream (Envoy's
``%REQ()%`` reads the mutated head), its 404s' and redirects' too.

The bound
---------
The relays' limit on a request head (``max_head``: 431 past it) is on the
head the client sent, as Envoy's ``max_request_headers_kb`` is on the
headers its codec read, before the connection manager mutates them: a
head of exactly ``max_head`` bytes goes, with these lines. What they add
is bounded: ``x-forwarded-for: ADDRESS`` 64 bytes where the client sent
none (17, an address's text of at most 45, inet_ntop's, CR LF; joining k
client lines into one line adds at most 3 + the address: each line it
replaces had at least 17 bytes besides its value), ``x-forwarded-proto:
http`` 25, ``x-envoy-external-address: ADDRESS`` 73, ``x-request-id: ID``
52: 214 bytes, each client line of those names removed only lessening it
(142 for a client on 127.0.0.1); and every request's
``x-envoy-attempt-count: N`` (26 bytes for a first try, a digit more per
tenfold retries; see ``_exchange_py.py``). So the head sent upstream is at
most ``max_head`` + 240 bytes + a route's request edits (a retry's
count's digits apart). Neither twin has a buffer this could overrun: the
pure one's head is bytes; the compiled one stages it in ``c.rhead``, a
buffer that grows (``buf_add``), and a connection's lines are made once
in ``Fwd_.block``, 264 bytes for at most 242 (the lines, the id's line,
the first try's count and the head's CR LF; see ``_forwarding.pxi``). A
head and body past the replay limit (64 KiB) this way are neither retried
nor mirrored, in both twins alike.

Where l4proxy differs: Envoy appends its own local address instead of a
loopback client's (an Envoy-internal quirk); l4proxy appends the loopback
address. Envoy's ``x-envoy-internal``, ``via``, ``x-forwarded-port`` and
``preserve_external_request_id`` options are not offered.

Request ids
-----------
:class:`RequestIds` draws them from splitmix64, a 64-bit counter through a
finalizer, which never repeats a draw within 2^64: an id is a uuid4's
text (its version and variant bits set) of two draws, the request's own
(its first half: the first 8 hex digits are what Envoy's trace sampling
reads, ``UuidUtils::uuidModBy``) and its connection's (the second half,
drawn when the connection came; its text made then): unique within a
relay, and 128 random bits apart from another relay's. So a request
costs one draw and 16 hex digits, no system call. Each relay has its own
stream, seeded once from ``os.urandom`` where it is made (in its worker,
after the fork), or from ``--seed`` (:func:`request_id_state`: the same
stream for the same seed in both twins, so that their upstream heads are
byte-identical in tests). The compiled twin (``ext/_forwarding.pxi``)
draws the same numbers in the same order (a connection's at its accept,
a request's when its head is complete) and writes the same text; the pure
relay it hands rare requests to has a stream of its own from
``os.urandom``. The ids are unique and unguessable in practice, not
secret: a tracing id.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Hashable
from typing import Any, Final, NamedTuple

__all__ = [
    "EDGE_REMOVED",
    "Forwarding",
    "RequestIds",
    "forwarded_head",
    "ip_text",
    "packed_ip",
    "peer_text",
    "request_id_state",
    "trusted_address",
    "uuid_text",
]

_MASK: Final = (1 << 64) - 1
_GOLDEN: Final = 0x9E3779B97F4A7C15

# Envoy's cleanInternalHeaders() for an edge request (default "x-envoy"
# prefix), and x-envoy-internal, which it removes from every request first;
# x-forwarded-client-cert (Istio's SANITIZE_SET, no client certificate);
# x-envoy-external-address, set anew. l4proxy itself reads none of them.
EDGE_REMOVED: Final = (
    b"x-envoy-internal",
    b"x-envoy-external-address",
    b"x-forwarded-client-cert",
    b"x-envoy-decorator-operation",
    b"x-envoy-downstream-service-cluster",
    b"x-envoy-downstream-service-node",
    b"x-envoy-retriable-status-codes",
    b"x-envoy-retriable-header-names",
    b"x-envoy-retry-on",
    b"x-envoy-retry-grpc-on",
    b"x-envoy-max-retries",
    b"x-envoy-upstream-alt-stat-name",
    b"x-envoy-upstream-rq-timeout-ms",
    b"x-envoy-upstream-rq-per-try-timeout-ms",
    b"x-envoy-upstream-rq-timeout-alt-response",
    b"x-envoy-expected-rq-timeout-ms",
    b"x-envoy-force-trace",
    b"x-envoy-ip-tags",
    b"x-envoy-original-url",
    b"x-envoy-hedge-on-per-try-timeout",
)
_REMOVED: Final = frozenset((*EDGE_REMOVED, b"x-request-id"))


class Forwarding(NamedTuple):
    """A gateway's forwarding headers (see above): *trusted_hops*, the
    proxies in front whose X-Forwarded-For and X-Forwarded-Proto are
    believed (Envoy's ``xff_num_trusted_hops``, Istio's
    ``numTrustedProxies``; ``--trusted-proxies``)."""

    trusted_hops: int = 0


def request_id_state(seed: Hashable | None) -> int:
    """The first state of a relay's request-id stream: from ``os.urandom``
    without a seed; from *seed* (an int: ``--seed`` with the worker's index
    added) the same in both twins."""
    if seed is None:
        return int.from_bytes(os.urandom(8), "little")
    n = int(seed) if isinstance(seed, int) else int.from_bytes(repr(seed).encode()[:8], "little")
    return (n * 0xD1342543DE82EF95 + 0x2545F4914F6CDD1D) & _MASK


def _splitmix(state: int) -> tuple[int, int]:
    """splitmix64: the next state and its draw."""
    state = (state + _GOLDEN) & _MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return state, z ^ (z >> 31)


def uuid_text(hi: int, lo: int) -> bytes:
    """Two 64-bit draws as a uuid4's text (its bytes big-endian, version 4,
    variant 10): 36 lowercase characters."""
    hi = (hi & ~0xF000) | 0x4000
    lo = (lo & 0x3FFFFFFFFFFFFFFF) | 0x8000000000000000
    return b"%08x-%04x-%04x-%04x-%012x" % (
        hi >> 32,
        (hi >> 16) & 0xFFFF,
        hi & 0xFFFF,
        lo >> 48,
        lo & 0xFFFFFFFFFFFF,
    )


class RequestIds:
    """A relay's x-request-id stream (see "Request ids")."""

    def __init__(self, seed: Hashable | None = None) -> None:
        self.state = request_id_state(seed)

    def connection(self) -> int:
        """A connection's draw: the second half of each of its ids."""
        self.state, lo = _splitmix(self.state)
        return lo

    def next(self, connection: int) -> bytes:
        """A request's id, on the connection whose draw is *connection*."""
        self.state, hi = _splitmix(self.state)
        return uuid_text(hi, connection)


def ip_text(text: bytes) -> bytes | None:
    """*text* as an IP address's canonical text (inet_ntop's), None when it
    is none (Envoy's parseInternetAddress: an IPv4 dotted quad, else IPv6;
    no brackets, port or zone)."""
    try:
        s = text.decode("ascii")
    except UnicodeDecodeError:
        return None
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_ntop(family, socket.inet_pton(family, s)).encode()
        except (OSError, ValueError):
            continue
    return None


def packed_ip(text: bytes) -> bytes | None:
    """An IP address's text (:func:`ip_text`'s) packed: 4 bytes for IPv4,
    else 16 (an IPv4-mapped IPv6 text stays 16), as a connection's peer is
    packed for a hash on the source IP (``_relay_py.peer_of``); None when it
    is none."""
    try:
        s = text.decode("ascii")
    except UnicodeDecodeError:
        return None
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_pton(family, s)
        except (OSError, ValueError):
            continue
    return None


def trusted_address(xff: bytes, hops: int) -> bytes | None:
    """The *hops*-th address from the right of X-Forwarded-For *xff* (its
    lines joined), canonical; None when there are fewer, or it is no IP
    address (Envoy's getLastAddressFromXFF with hops - 1 skipped)."""
    for _ in range(hops - 1):
        comma = xff.rfind(b",")
        if comma < 0:
            return None
        xff = xff[:comma]
    element = xff[xff.rfind(b",") + 1 :].strip(b" \t\r\n\x0b\x0c")
    return ip_text(element) if element else None


def peer_text(sock: socket.socket, addr: Any) -> bytes | None:
    """*sock*'s peer address *addr* (as accept() returned it, or asked of
    the kernel once as the connection was taken) as X-Forwarded-For appends
    it (an IPv4-mapped IPv6 one as IPv4); None where it has none, or no IP
    address. The kernel is not asked again: a client that reset its
    connection meanwhile has no peer, and its request none to append."""
    if addr is None:
        return None
    if sock.family == socket.AF_INET:
        return str(addr[0]).encode()
    if sock.family == socket.AF_INET6:
        packed = socket.inet_pton(socket.AF_INET6, str(addr[0]).partition("%")[0])
        if packed[:12] == b"\0" * 10 + b"\xff\xff":
            return socket.inet_ntop(socket.AF_INET, packed[12:]).encode()
        return socket.inet_ntop(socket.AF_INET6, packed).encode()
    return None


def forwarded_head(
    raw: bytes, fwd: Forwarding, peer: bytes | None, request_id: bytes
) -> tuple[bytes, bytes | None, bytes | None]:
    """*raw* (a request head as sent upstream) with the forwarding headers
    (see above), the X-Forwarded-For value it then says (None: none), the
    access log's, and the trusted client address where it was taken from
    the X-Forwarded-For that came (trusted hops; None: the connection's
    *peer* is it), what a hash on the source IP reads. The compiled twin's
    is fwd_stage()."""
    first = raw.index(b"\n") + 1
    end = len(raw) - 2  # (its empty line's CR LF: the parser refuses a bare LF)
    out = [raw[:first]]
    xff: list[bytes] = []
    proto = False  # a client's X-Forwarded-Proto stays (trusted hops)
    for line in raw[first:end].split(b"\n")[:-1]:
        name, colon, value = line.partition(b":")
        name = name.lower()
        if colon and name == b"x-forwarded-for":
            value = value.rstrip(b"\r").strip(b" \t")
            if value:
                xff.append(value)
            continue
        if colon and name == b"x-forwarded-proto":
            if not fwd.trusted_hops:
                continue
            proto = True
        elif colon and name in _REMOVED:
            continue
        out.append(line + b"\n")
    came = b",".join(xff)
    sent = b",".join((*xff, peer)) if peer is not None else came
    if sent:
        out.append(b"x-forwarded-for: " + sent + b"\r\n")
    if not proto:
        out.append(b"x-forwarded-proto: http\r\n")
    trusted = trusted_address(came, fwd.trusted_hops) if fwd.trusted_hops and came else None
    external = peer if trusted is None else trusted
    if external is not None:
        out.append(b"x-envoy-external-address: " + external + b"\r\n")
    out += [b"x-request-id: " + request_id + b"\r\n", raw[end:]]
    return b"".join(out), sent or None, trusted
